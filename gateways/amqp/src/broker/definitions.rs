//! RabbitMQ definitions (exchanges, queues, bindings, as `rabbitmqctl export_definitions`
//! writes them) turned into the core requests this gateway makes for the same declares, with
//! the same argument mapping, so an imported queue is one a client can declare again with its
//! usual arguments (and is refused, 406, with other ones, as on RabbitMQ).

use amq_protocol::types::FieldTable;
use tributary_proto::v1;

use amq_protocol::types::AMQPValue;

use super::args::{self, DELAYED_ARG, EXTRA_POLICY, EXTRA_POLICY_DEFINITION, ExchangeType};
use super::{fields, namespace_of};

/// queue.declare of a durable or transient, non-exclusive queue (definitions hold no
/// exclusive queues: they die with their connection).
pub fn queue(
    vhost: &str,
    name: &str,
    durable: bool,
    auto_delete: bool,
    arguments: &FieldTable,
) -> Result<v1::DeclareQueueRequest, String> {
    let a = args::QueueArgs::parse(&fields::encode_table(arguments)).map_err(|r| r.text)?;
    if a.quorum && (!durable || auto_delete) {
        return Err(format!(
            "quorum queue '{name}' must be durable and not auto-delete"
        ));
    }
    Ok(v1::DeclareQueueRequest {
        id: Some(v1::QueueId {
            namespace: namespace_of(vhost),
            name: name.into(),
        }),
        config: Some(a.config),
        durable,
        exclusive: false,
        auto_delete,
        passive: false,
        owner: String::new(),
    })
}

/// queue.declare of a queue a RabbitMQ policy applied to when it was imported: the settings
/// of `effective` (the declared arguments merged with the policy's keys, as RabbitMQ
/// resolves them), the identity of `declared`, and the policy's name and the keys it carried
/// (`definition`, JSON). Clients that redeclare the queue with their own arguments are then
/// answered as on RabbitMQ, where a policy is no part of a queue's identity.
#[allow(clippy::too_many_arguments)]
pub fn queue_with_policy(
    vhost: &str,
    name: &str,
    durable: bool,
    auto_delete: bool,
    declared: &FieldTable,
    effective: &FieldTable,
    policy: &str,
    definition: &str,
) -> Result<v1::DeclareQueueRequest, String> {
    let own = queue(vhost, name, durable, auto_delete, declared)?;
    let mut req = queue(vhost, name, durable, auto_delete, effective)?;
    let config = req.config.get_or_insert_default();
    config.extra = own.config.unwrap_or_default().extra;
    config.extra.insert(EXTRA_POLICY.into(), policy.into());
    config
        .extra
        .insert(EXTRA_POLICY_DEFINITION.into(), definition.into());
    Ok(req)
}

/// The x-arguments clients declare a core queue with (the inverse of [`queue`]).
pub fn queue_arguments(config: &v1::QueueConfig) -> FieldTable {
    let mut keys: Vec<&String> = config
        .extra
        .keys()
        .filter(|k| args::is_identity_arg(k))
        .collect();
    keys.sort();
    let mut t = FieldTable::default();
    for k in keys {
        t.insert(k.as_str().into(), args::identity_value(k, &config.extra[k]));
    }
    t
}

/// The policy an import applied to a core queue: its name and the keys it carried (JSON).
pub fn queue_policy(config: &v1::QueueConfig) -> Option<(&str, &str)> {
    Some((
        config.extra.get(EXTRA_POLICY)?.as_str(),
        config
            .extra
            .get(EXTRA_POLICY_DEFINITION)
            .map_or("{}", String::as_str),
    ))
}

/// The exchange type and arguments of a core address (the inverse of [`exchange`]), or None
/// for an address no exchange.declare makes (an MQTT topic tree).
pub fn exchange_of(
    kind: v1::AddressKind,
    arguments: &std::collections::HashMap<String, String>,
) -> Option<(String, FieldTable)> {
    if matches!(
        kind,
        v1::AddressKind::MqttTopic | v1::AddressKind::Stream | v1::AddressKind::Unspecified
    ) {
        return None;
    }
    let mut t = FieldTable::default();
    if let Some(inner) = arguments.get(DELAYED_ARG) {
        t.insert(DELAYED_ARG.into(), fields::long_str(inner));
        return Some(("x-delayed-message".into(), t));
    }
    Some((args::kind_name(kind).into(), t))
}

/// A binding's arguments as field values (the inverse of [`binding`]'s header bytes:
/// `int:`, `bool:` and `float:` tagged numbers, text otherwise).
pub fn binding_arguments(b: &v1::Binding) -> FieldTable {
    let mut t = FieldTable::default();
    for h in &b.arguments {
        let text = String::from_utf8_lossy(&h.value).into_owned();
        let v = if let Some(n) = text.strip_prefix("int:").and_then(|n| n.parse().ok()) {
            AMQPValue::LongLongInt(n)
        } else if let Some(b) = text.strip_prefix("bool:").and_then(|b| b.parse().ok()) {
            AMQPValue::Boolean(b)
        } else if let Some(f) = text.strip_prefix("float:").and_then(|f| f.parse().ok()) {
            AMQPValue::Double(f)
        } else {
            fields::long_str(&text)
        };
        t.insert(h.name.as_str().into(), v);
    }
    t
}

/// exchange.declare.
pub fn exchange(
    vhost: &str,
    name: &str,
    kind: &str,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: &FieldTable,
) -> Result<v1::DeclareAddressRequest, String> {
    if name.is_empty() || name.starts_with("amq.") {
        return Err(format!("exchange '{name}' is predeclared"));
    }
    let t = ExchangeType::parse(kind, &fields::encode_table(arguments)).map_err(|r| r.text)?;
    let mut extra = std::collections::HashMap::new();
    if t.delayed {
        extra.insert(DELAYED_ARG.to_string(), args::kind_name(t.kind).to_string());
    }
    Ok(v1::DeclareAddressRequest {
        namespace: namespace_of(vhost),
        name: name.into(),
        kind: t.kind as i32,
        durable,
        auto_delete,
        internal,
        passive: false,
        arguments: extra,
    })
}

/// queue.bind (`to_queue`) or exchange.bind.
pub fn binding(
    vhost: &str,
    source: &str,
    to_queue: bool,
    destination: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> Result<v1::Binding, String> {
    if source.is_empty() {
        return Err("bindings of the default exchange are implicit".into());
    }
    let mut args: Vec<(String, Vec<u8>)> = arguments
        .inner()
        .iter()
        .filter_map(|(k, v)| fields::header_bytes(v).map(|b| (k.as_str().to_string(), b)))
        .collect();
    args.sort();
    Ok(v1::Binding {
        namespace: namespace_of(vhost),
        source_address: source.into(),
        destination: Some(if to_queue {
            v1::binding::Destination::Queue(destination.into())
        } else {
            v1::binding::Destination::Address(destination.into())
        }),
        pattern: routing_key.into(),
        arguments: args
            .into_iter()
            .map(|(name, value)| v1::Header {
                name,
                value: value.into(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(s: &str) -> AMQPValue {
        fields::long_str(s)
    }

    #[test]
    fn declared_arguments_come_back_from_the_core_queue() {
        let mut t = FieldTable::default();
        t.insert("x-message-ttl".into(), AMQPValue::LongInt(500));
        t.insert("x-dead-letter-exchange".into(), long("dlx"));
        t.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        let req = queue("/", "q", true, false, &t).unwrap();
        let back = queue_arguments(req.config.as_ref().unwrap());
        assert_eq!(
            back.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(500))
        );
        assert_eq!(
            back.inner().get("x-dead-letter-exchange"),
            Some(&long("dlx"))
        );
        assert_eq!(
            back.inner().get("x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        // Declared again from what came back: the same core settings.
        let again = queue("/", "q", true, false, &back).unwrap();
        assert_eq!(again.config, req.config);
    }

    #[test]
    fn a_policy_sets_the_settings_not_the_identity() {
        let mut declared = FieldTable::default();
        declared.insert("x-message-ttl".into(), AMQPValue::LongInt(500));
        let mut effective = declared.clone();
        effective.insert("x-max-length".into(), AMQPValue::LongInt(3));
        let req = queue_with_policy(
            "v",
            "q",
            true,
            false,
            &declared,
            &effective,
            "lim",
            r#"{"max-length":3}"#,
        )
        .unwrap();
        let c = req.config.unwrap();
        assert_eq!(c.max_length, Some(3));
        assert!(!c.extra.contains_key("x-max-length"));
        assert_eq!(queue_policy(&c), Some(("lim", r#"{"max-length":3}"#)));
        assert!(queue_arguments(&c).inner().get("x-max-length").is_none());
    }

    #[test]
    fn exchanges_and_binding_arguments_invert() {
        let mut args = FieldTable::default();
        args.insert(DELAYED_ARG.into(), long("topic"));
        let x = exchange("/", "d", "x-delayed-message", true, false, false, &args).unwrap();
        let kind = v1::AddressKind::try_from(x.kind).unwrap();
        let (t, back) = exchange_of(kind, &x.arguments).unwrap();
        assert_eq!(t, "x-delayed-message");
        assert_eq!(back.inner().get(DELAYED_ARG), Some(&long("topic")));
        assert_eq!(
            exchange_of(v1::AddressKind::Fanout, &Default::default())
                .unwrap()
                .0,
            "fanout"
        );
        assert!(exchange_of(v1::AddressKind::MqttTopic, &Default::default()).is_none());

        let mut bargs = FieldTable::default();
        bargs.insert("x-match".into(), long("all"));
        bargs.insert("n".into(), AMQPValue::LongInt(7));
        let b = binding("/", "h", true, "q", "", &bargs).unwrap();
        let back = binding_arguments(&b);
        assert_eq!(back.inner().get("x-match"), Some(&long("all")));
        assert_eq!(back.inner().get("n"), Some(&AMQPValue::LongLongInt(7)));
        assert_eq!(binding("/", "h", true, "q", "", &back).unwrap(), b);
    }
}
