//! MQTT topics and the topic exchange, as RabbitMQ's MQTT plugin joins them: an MQTT publish
//! to topic `a/b` is also published to the namespace's exchange named by `mqtt_exchange`
//! (`amq.topic` by default in the server) with routing key `a.b`, so AMQP and SQS consumers
//! of queues bound there (`a.*`, `#`) receive MQTT messages; and an AMQP publish to that
//! exchange with key `a.b` reaches MQTT subscribers of `a/b` (docs/compat/mapping.md).
//!
//! `/` and `.` swap places both ways, as in RabbitMQ. An MQTT publish pays one address
//! lookup when the exchange does not exist or has no bindings. What MQTT published reaches
//! the sessions once: the bridge into the exchange routes to its bindings only, never back
//! to MQTT.

use tracing::debug;
use tributary_proto::v1;

use crate::error::CoreResult;
use crate::queues::EnqueueMode;
use crate::{Core, topics};

/// An MQTT topic as an AMQP routing key, or a routing key as an MQTT topic: `/` and `.`
/// swapped.
pub(crate) fn swap_separators(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            c => c,
        })
        .collect()
}

impl Core {
    /// The bridge's exchange in `ns`, when configured and something is bound to it.
    fn bridged_exchange(&self, ns: &str) -> Option<&str> {
        let name = self.inner.config.mqtt_exchange.as_deref()?;
        self.address_has_bindings(ns, name).then_some(name)
    }

    /// Publishes an MQTT message to the topic exchange (its topic as routing key, `/` and
    /// `.` swapped), durably; how many queues took it.
    pub(crate) async fn publish_mqtt_to_exchange(
        &self,
        ns: &str,
        message: &v1::RoutedMessage,
    ) -> CoreResult<u32> {
        let Some(exchange) = self.bridged_exchange(ns) else {
            return Ok(0);
        };
        let Some(record) = &message.record else {
            return Ok(0);
        };
        let topic = record
            .properties
            .as_ref()
            .map_or("", |p| p.address.as_str());
        if topic.is_empty() {
            return Ok(0);
        }
        let key = swap_separators(topic);
        let exchange = exchange.to_string();
        let routed = self
            .route_records(
                ns,
                &exchange,
                &key,
                vec![record.clone()],
                EnqueueMode::Internal,
            )
            .await?;
        Ok(routed.first().copied().unwrap_or(0))
    }

    /// A publish to the topic exchange by anything but MQTT (an AMQP publish, a redrive):
    /// delivered to the MQTT sessions subscribed to its key as a topic (`.` and `/`
    /// swapped), as QoS 1 messages; how many sessions took the first record.
    pub(crate) async fn deliver_exchange_publish_to_sessions(
        &self,
        ns: &str,
        address: &str,
        key: &str,
        records: &[v1::Record],
    ) -> u32 {
        if self.inner.config.mqtt_exchange.as_deref() != Some(address) || records.is_empty() {
            return 0;
        }
        let topic = swap_separators(key);
        if topics::validate_name(&topic).is_err() {
            // A key with MQTT wildcards, or none at all: no MQTT topic to deliver to.
            debug!(namespace = %ns, key, "topic exchange publish: the key is no MQTT topic name");
            return 0;
        }
        if !self.has_subscribers(ns, &topic) {
            return 0;
        }
        let mut first = None;
        for record in records {
            let mut record = record.clone();
            let p = record.properties.get_or_insert_default();
            p.address = topic.clone();
            p.publish_address.clear();
            let message = v1::RoutedMessage {
                record: Some(record),
                qos: 1,
                retain: false,
            };
            match self
                .deliver_to_sessions(ns, message, None, false, None)
                .await
            {
                Ok(n) => {
                    first.get_or_insert(n);
                }
                Err(e) => {
                    first.get_or_insert(0);
                    metrics::counter!("tributary_mapping_undeliverable_total").increment(1);
                    debug!(namespace = %ns, topic = %topic, error = %e, "topic exchange publish not delivered to MQTT sessions");
                }
            }
        }
        first.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separators_swap_both_ways() {
        assert_eq!(swap_separators("cities/london"), "cities.london");
        assert_eq!(swap_separators("cities.london"), "cities/london");
        assert_eq!(swap_separators("v1.2/x"), "v1/2.x");
        assert_eq!(swap_separators(&swap_separators("a/b.c/d")), "a/b.c/d");
    }
}
