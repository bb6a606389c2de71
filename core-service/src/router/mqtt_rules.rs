//! Rules that map MQTT topic filters onto streams (docs/compat/mapping.md, "Rules"): a rule
//! `sensors/#` -> stream `sensors` appends every MQTT publish whose topic matches the
//! filter to the stream, the topic as the record key; and records of the stream whose key is
//! a topic the rule's filter matches reach MQTT subscribers on that topic (the others on the
//! stream's own name, as without rules).
//!
//! A rule is a binding of the namespace's address [`MQTT_RULES_ADDRESS`] (kind mqtt-topic,
//! durable), so rules are declared, listed and removed with the router's Bind, ListBindings
//! and Unbind, and survive restarts like any binding; the config file's `[[mqtt_stream_rules]]`
//! declare them at start ([`Core::declare_mqtt_rule`]). AMQP cannot name the address (`$` is
//! not allowed in its exchange names).

use std::collections::BTreeSet;

use tributary_proto::v1::{self, AddressKind};

use super::Target;
use crate::Core;
use crate::error::{CoreError, CoreResult};
use crate::meta::StreamSettings;
use crate::topics;

/// The address whose bindings are a namespace's MQTT rules.
pub const MQTT_RULES_ADDRESS: &str = "$mqtt";

impl Core {
    /// Declares a rule (idempotent): the rules' address if missing, the stream if missing
    /// (with the default partitions), and the binding.
    pub async fn declare_mqtt_rule(
        &self,
        namespace: &str,
        filter: &str,
        stream: &str,
    ) -> CoreResult<()> {
        topics::validate_filter(filter)
            .map_err(|e| CoreError::InvalidArgument(format!("MQTT rule filter '{filter}': {e}")))?;
        if filter.starts_with("$share/") {
            return Err(CoreError::InvalidArgument(format!(
                "MQTT rule filter '{filter}': a shared subscription is no topic filter"
            )));
        }
        self.create_stream(
            v1::StreamId::new(namespace.to_string(), stream.to_string()),
            0,
            StreamSettings::default(),
            true,
            false,
        )
        .await?;
        self.declare_address(v1::DeclareAddressRequest {
            namespace: namespace.to_string(),
            name: MQTT_RULES_ADDRESS.into(),
            kind: AddressKind::MqttTopic as i32,
            durable: true,
            ..Default::default()
        })
        .await?;
        self.bind(v1::Binding {
            namespace: namespace.to_string(),
            source_address: MQTT_RULES_ADDRESS.into(),
            destination: Some(v1::binding::Destination::Stream(stream.to_string())),
            pattern: filter.to_string(),
            arguments: Vec::new(),
        })
        .await
    }

    /// The streams the rules of `ns` send a publish to `topic` to.
    pub(crate) fn rule_streams(&self, ns: &str, topic: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Ok(a) = self.address(ns, MQTT_RULES_ADDRESS) else {
            return out;
        };
        if let Some(trie) = &a.bindings.read().trie {
            trie.for_each_match(topic, |t| {
                if let Target::Stream(s) = t {
                    out.insert(s.clone());
                }
            });
        }
        out
    }

    /// Whether a rule of `ns` leads to `stream` (asked on every append to it).
    pub(crate) fn has_rules_for(&self, ns: &str, stream: &str) -> bool {
        self.address(ns, MQTT_RULES_ADDRESS).is_ok_and(|a| {
            a.bindings
                .read()
                .all
                .iter()
                .any(|b| matches!(&b.target, Target::Stream(s) if s == stream))
        })
    }

    /// The filters of the rules of `ns` that lead to `stream`.
    pub(crate) fn rule_filters_of(&self, ns: &str, stream: &str) -> Vec<String> {
        let Ok(a) = self.address(ns, MQTT_RULES_ADDRESS) else {
            return Vec::new();
        };
        a.bindings
            .read()
            .all
            .iter()
            .filter(|b| matches!(&b.target, Target::Stream(s) if s == stream))
            .map(|b| b.pattern.clone())
            .collect()
    }
}
