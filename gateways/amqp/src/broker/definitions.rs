//! RabbitMQ definitions (exchanges, queues, bindings, as `rabbitmqctl export_definitions`
//! writes them) turned into the core requests this gateway makes for the same declares, with
//! the same argument mapping, so an imported queue is one a client can declare again with its
//! usual arguments (and is refused, 406, with other ones, as on RabbitMQ).

use amq_protocol::types::FieldTable;
use tributary_proto::v1;

use super::args::{self, DELAYED_ARG, ExchangeType};
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
