//! RabbitMQ's queue x-arguments and exchange types, mapped onto the core's neutral queue
//! configuration and address kinds.

use std::collections::BTreeMap;

use amq_protocol::types::{AMQPValue, FieldTable};
use tributary_proto::v1;

use super::fields::{self, as_bool, as_i64, as_str};
use super::refusal::{COMMAND_INVALID, PRECONDITION_FAILED, Res, refuse};

/// Queue arguments whose value is part of a queue's identity: a redeclare with another
/// value is refused (406), as RabbitMQ does. They are kept in the core queue's `extra`
/// (canonical text), so that the core's own equivalence check covers them.
const IDENTITY_ARGS: &[&str] = &[
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-priority",
    "x-queue-type",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-tributary-storage",
];

/// `extra` key of the durability an exclusive queue was declared with (exclusive queues go
/// with their connection, so the core keeps them non-durable whatever the client asked).
pub const EXTRA_DURABLE: &str = "amqp.durable";

/// `extra` key of the RabbitMQ policy `tributary import rabbitmq` applied to a queue (its
/// name), and, under `amqp.policy.definition`, the policy keys it carried (JSON). The
/// queue's x-argument keys in `extra` stay the ones its clients declare: a policy is not
/// part of a queue's identity in RabbitMQ, so a redeclare with the declared arguments alone
/// is equivalent (see [`declared_equivalent`]).
pub const EXTRA_POLICY: &str = "amqp.policy";
pub const EXTRA_POLICY_DEFINITION: &str = "amqp.policy.definition";

fn is_policy_key(k: &str) -> bool {
    k == EXTRA_POLICY || k == EXTRA_POLICY_DEFINITION
}

/// What a queue.declare asks of the core.
#[derive(Debug, Clone, Default)]
pub struct QueueArgs {
    pub config: v1::QueueConfig,
    pub quorum: bool,
}

fn int(t: &FieldTable, k: &str, min: i64) -> Res<Option<i64>> {
    match t.inner().get(k) {
        None => Ok(None),
        Some(v) => match as_i64(v) {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(refuse(
                PRECONDITION_FAILED,
                format!("invalid arg '{k}': expected an integer >= {min}"),
            )),
        },
    }
}

fn canonical(v: &AMQPValue) -> String {
    if let Some(n) = as_i64(v) {
        return n.to_string();
    }
    if let Some(s) = as_str(v) {
        return s;
    }
    if let Some(b) = as_bool(v) {
        return b.to_string();
    }
    format!("{v:?}")
}

impl QueueArgs {
    pub fn parse(raw: &[u8]) -> Res<Self> {
        let t = fields::decode_table(raw).map_err(|e| refuse(PRECONDITION_FAILED, e))?;
        let mut c = v1::QueueConfig {
            message_ttl_ms: int(&t, "x-message-ttl", 0)?,
            expires_ms: int(&t, "x-expires", 1)?,
            max_length: int(&t, "x-max-length", 0)?,
            max_length_bytes: int(&t, "x-max-length-bytes", 0)?,
            max_priority: int(&t, "x-max-priority", 0)?.map(|n| n.min(255) as u32),
            ..Default::default()
        };
        // A message is dead-lettered once delivered more often than the limit allows
        // (delivered limit + 1 times without an ack).
        c.max_delivery_count = int(&t, "x-delivery-limit", 0)?
            .map(|n| n.saturating_add(1).min(u32::MAX as i64) as u32);
        if let Some(v) = t.inner().get("x-overflow") {
            match as_str(v).as_deref() {
                Some(o @ ("drop-head" | "reject-publish" | "reject-publish-dlx")) => {
                    c.overflow = Some(o.to_string());
                }
                _ => {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        "invalid arg 'x-overflow': expected drop-head, reject-publish or reject-publish-dlx",
                    ));
                }
            }
        }
        if c.overflow.is_none() && (c.max_length.is_some() || c.max_length_bytes.is_some()) {
            // RabbitMQ's default: the oldest ready messages make room.
            c.overflow = Some("drop-head".into());
        }
        c.dead_letter_address = t.inner().get("x-dead-letter-exchange").and_then(as_str);
        c.dead_letter_routing_key = t.inner().get("x-dead-letter-routing-key").and_then(as_str);
        if c.dead_letter_routing_key.is_some() && c.dead_letter_address.is_none() {
            return Err(refuse(
                PRECONDITION_FAILED,
                "invalid arg 'x-dead-letter-routing-key': it needs x-dead-letter-exchange",
            ));
        }
        if t.inner()
            .get("x-single-active-consumer")
            .and_then(as_bool)
            .unwrap_or(false)
        {
            c.single_active_consumer = Some(true);
        }
        // Tributary's own argument: the log store backend the queue lives on (`local`,
        // `opendal`), chosen at declaration. RabbitMQ ignores x-arguments it does not know,
        // so a declaration carrying it stays portable.
        if let Some(v) = t.inner().get("x-tributary-storage") {
            match as_str(v) {
                Some(name) if !name.is_empty() => c.storage = Some(name),
                _ => {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        "invalid arg 'x-tributary-storage': expected a storage backend name (local or opendal)",
                    ));
                }
            }
        }
        let mut quorum = false;
        match t.inner().get("x-queue-type").and_then(as_str).as_deref() {
            None | Some("classic") => {}
            Some("quorum") => quorum = true,
            Some("stream") => {
                return Err(refuse(
                    PRECONDITION_FAILED,
                    "x-queue-type 'stream' is not supported by this AMQP gateway; Kafka clients read the same core's streams",
                ));
            }
            Some(other) => {
                return Err(refuse(
                    PRECONDITION_FAILED,
                    format!("invalid arg 'x-queue-type': unknown type '{other}'"),
                ));
            }
        }
        let mut extra = BTreeMap::new();
        for key in IDENTITY_ARGS {
            if let Some(v) = t.inner().get(*key) {
                let text = canonical(v);
                if *key == "x-queue-type" && text == "classic" {
                    continue;
                }
                extra.insert((*key).to_string(), text);
            }
        }
        c.extra = extra.into_iter().collect();
        Ok(Self { config: c, quorum })
    }
}

/// The field value a client declares an identity argument with, from its canonical text in
/// `extra` (the inverse of [`QueueArgs::parse`] for what it keeps): integers for the limits,
/// a boolean for x-single-active-consumer, text for the others.
pub fn identity_value(key: &str, text: &str) -> AMQPValue {
    match key {
        "x-message-ttl" | "x-expires" | "x-max-length" | "x-max-length-bytes"
        | "x-max-priority" | "x-delivery-limit" => match text.parse::<i64>() {
            Ok(n) => AMQPValue::LongLongInt(n),
            Err(_) => fields::long_str(text),
        },
        "x-single-active-consumer" => AMQPValue::Boolean(text == "true"),
        _ => fields::long_str(text),
    }
}

/// Whether `key` of a core queue's `extra` is an argument a client declared.
pub fn is_identity_arg(key: &str) -> bool {
    IDENTITY_ARGS.contains(&key)
}

/// The first identity argument in which two declarations differ (for the 406 text).
pub fn first_difference(asked: &v1::QueueConfig, have: &v1::QueueConfig) -> Option<String> {
    let keys: std::collections::BTreeSet<&String> =
        asked.extra.keys().chain(have.extra.keys()).collect();
    keys.into_iter()
        .filter(|k| !is_policy_key(k))
        .find(|k| asked.extra.get(*k) != have.extra.get(*k))
        .cloned()
}

/// Whether a declare the core found different from `have` only differs by the settings an
/// imported policy added: `have` carries a policy and the declared arguments are the same.
/// (Any other difference shows in `extra`, which holds every identity argument.)
pub fn declared_equivalent(asked: &v1::QueueConfig, have: &v1::QueueConfig) -> bool {
    have.extra.contains_key(EXTRA_POLICY) && first_difference(asked, have).is_none()
}

/// An exchange type: the core address kind and whether it delays (x-delayed-message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeType {
    pub kind: v1::AddressKind,
    pub delayed: bool,
}

/// Address argument that marks an x-delayed-message exchange (its routing type is the kind).
pub const DELAYED_ARG: &str = "x-delayed-type";

pub fn kind_name(kind: v1::AddressKind) -> &'static str {
    match kind {
        v1::AddressKind::Direct => "direct",
        v1::AddressKind::Fanout => "fanout",
        v1::AddressKind::Topic => "topic",
        v1::AddressKind::Headers => "headers",
        v1::AddressKind::MqttTopic => "mqtt-topic",
        v1::AddressKind::Stream => "x-stream",
        v1::AddressKind::Unspecified => "unknown",
    }
}

fn parse_kind(s: &str) -> Option<v1::AddressKind> {
    Some(match s {
        "direct" => v1::AddressKind::Direct,
        "fanout" => v1::AddressKind::Fanout,
        "topic" => v1::AddressKind::Topic,
        "headers" => v1::AddressKind::Headers,
        // A stream's own exchange: declarable (for an existing stream), not creatable.
        "x-stream" => v1::AddressKind::Stream,
        _ => return None,
    })
}

impl ExchangeType {
    pub fn parse(kind: &str, arguments: &[u8]) -> Res<Self> {
        if kind == "x-delayed-message" {
            let t = fields::decode_table(arguments).map_err(|e| refuse(PRECONDITION_FAILED, e))?;
            let inner = t
                .inner()
                .get(DELAYED_ARG)
                .and_then(as_str)
                .and_then(|s| parse_kind(&s))
                .ok_or_else(|| {
                    refuse(
                        PRECONDITION_FAILED,
                        "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                    )
                })?;
            return Ok(Self {
                kind: inner,
                delayed: true,
            });
        }
        parse_kind(kind)
            .map(|kind| Self {
                kind,
                delayed: false,
            })
            .ok_or_else(|| refuse(COMMAND_INVALID, format!("invalid exchange type '{kind}'")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, LongString};

    fn table(entries: &[(&str, AMQPValue)]) -> Vec<u8> {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        fields::encode_table(&t).to_vec()
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
    }

    #[test]
    fn x_arguments_map_to_the_queue_config() {
        let raw = table(&[
            ("x-message-ttl", AMQPValue::LongInt(500)),
            ("x-max-length", AMQPValue::ShortShortUInt(3)),
            ("x-overflow", long("reject-publish")),
            ("x-dead-letter-exchange", long("dlx")),
            ("x-queue-type", long("quorum")),
            ("x-delivery-limit", AMQPValue::LongInt(2)),
            ("x-tributary-storage", long("opendal")),
        ]);
        let a = QueueArgs::parse(&raw).unwrap();
        assert!(a.quorum);
        assert_eq!(a.config.storage.as_deref(), Some("opendal"));
        assert_eq!(a.config.message_ttl_ms, Some(500));
        assert_eq!(a.config.max_length, Some(3));
        assert_eq!(a.config.overflow.as_deref(), Some("reject-publish"));
        assert_eq!(a.config.dead_letter_address.as_deref(), Some("dlx"));
        assert_eq!(a.config.max_delivery_count, Some(3));
        assert_eq!(a.config.extra.get("x-message-ttl").unwrap(), "500");
    }

    #[test]
    fn bad_arguments_are_precondition_failed() {
        for raw in [
            table(&[("x-message-ttl", AMQPValue::LongInt(-1))]),
            table(&[("x-overflow", long("nope"))]),
            table(&[("x-dead-letter-routing-key", long("k"))]),
            table(&[("x-queue-type", long("stream"))]),
            table(&[("x-tributary-storage", AMQPValue::LongInt(1))]),
            table(&[("x-tributary-storage", long(""))]),
        ] {
            assert_eq!(
                QueueArgs::parse(&raw).unwrap_err().code,
                PRECONDITION_FAILED
            );
        }
    }

    #[test]
    fn a_policy_is_not_part_of_the_identity() {
        let declared = QueueArgs::parse(&table(&[("x-message-ttl", AMQPValue::LongInt(500))]))
            .unwrap()
            .config;
        let mut have = declared.clone();
        have.max_length = Some(10);
        have.extra.insert(EXTRA_POLICY.into(), "limits".into());
        have.extra.insert(
            EXTRA_POLICY_DEFINITION.into(),
            r#"{"max-length":10}"#.into(),
        );
        assert!(declared_equivalent(&declared, &have));
        let other = QueueArgs::parse(&table(&[("x-message-ttl", AMQPValue::LongInt(5))]))
            .unwrap()
            .config;
        assert!(!declared_equivalent(&other, &have));
        assert_eq!(
            first_difference(&other, &have).as_deref(),
            Some("x-message-ttl")
        );
        // Without a policy, settings the core found different are not waved through.
        have.extra.remove(EXTRA_POLICY);
        assert!(!declared_equivalent(&declared, &have));
    }

    #[test]
    fn classic_type_is_the_same_as_none() {
        let a = QueueArgs::parse(&table(&[("x-queue-type", long("classic"))])).unwrap();
        let b = QueueArgs::parse(&[]).unwrap();
        assert_eq!(first_difference(&a.config, &b.config), None);
    }

    #[test]
    fn exchange_types() {
        assert_eq!(
            ExchangeType::parse("topic", &[]).unwrap().kind,
            v1::AddressKind::Topic
        );
        assert_eq!(
            ExchangeType::parse("nope", &[]).unwrap_err().code,
            COMMAND_INVALID
        );
        let d = ExchangeType::parse(
            "x-delayed-message",
            &table(&[(DELAYED_ARG, long("fanout"))]),
        )
        .unwrap();
        assert!(d.delayed && d.kind == v1::AddressKind::Fanout);
        assert_eq!(
            ExchangeType::parse("x-delayed-message", &[])
                .unwrap_err()
                .code,
            PRECONDITION_FAILED
        );
    }
}
