//! An AMQP message and the core's record envelope, both ways.
//!
//! A publish becomes a `Record`: the body is its value; the content-header properties map
//! to `SystemProperties` (content type and encoding, correlation id, reply-to, expiration,
//! priority, message id, type, user id, app id, delivery mode, timestamp) and each header
//! table entry to a record header (so a headers address can route on it and other
//! protocols can read it). The properties are also kept byte-for-byte in the record header
//! [`PROPERTIES_HEADER`], so an AMQP consumer gets exactly what was published (typed header
//! values included). A record from another protocol has no such header: its properties are
//! built from the envelope. docs/compat/amqp.md has the table.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use bytes::Bytes;
use tributary_proto::v1;

use super::fields::{as_i64, as_str, decode_properties, header_bytes, long_str};
use crate::frames::encode_properties;

/// Record header holding the AMQP content-header properties as published.
pub const PROPERTIES_HEADER: &str = "amqp.properties";
/// Header with the delay, in ms, of a message published to an x-delayed-message exchange.
pub const DELAY_HEADER: &str = "x-delay";

/// The record for a publish. `delayed`: the exchange delays by the `x-delay` header.
pub fn to_record(
    properties: &Bytes,
    body: Bytes,
    expiration_ms: i64,
    delayed: bool,
    now_ms: i64,
) -> v1::Record {
    let p = decode_properties(properties).unwrap_or_default();
    let mut headers = vec![v1::Header {
        name: PROPERTIES_HEADER.into(),
        value: properties.clone(),
    }];
    let mut deliver_at_ms = 0;
    if let Some(table) = p.headers() {
        for (k, v) in table.inner() {
            if delayed
                && k.as_str() == DELAY_HEADER
                && let Some(d) = as_i64(v).filter(|d| *d > 0)
            {
                deliver_at_ms = now_ms.saturating_add(d);
            }
            if let Some(value) = header_bytes(v) {
                headers.push(v1::Header {
                    name: k.as_str().to_string(),
                    value: value.into(),
                });
            }
        }
    }
    let short = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string());
    let props = v1::SystemProperties {
        content_type: short(p.content_type()).unwrap_or_default(),
        content_encoding: short(p.content_encoding()).unwrap_or_default(),
        correlation_id: p
            .correlation_id()
            .as_ref()
            .map(|s| Bytes::copy_from_slice(s.as_str().as_bytes()))
            .unwrap_or_default(),
        reply_to: short(p.reply_to()).unwrap_or_default(),
        expires_at_ms: if expiration_ms >= 0 {
            now_ms.saturating_add(expiration_ms)
        } else {
            0
        },
        priority: p.priority().map_or(0, u32::from),
        deliver_at_ms,
        message_id: short(p.message_id()).unwrap_or_default(),
        origin_protocol: "amqp".into(),
        // No delivery-mode is transient in AMQP (RabbitMQ); the core keeps 1 only until a
        // restart.
        delivery_mode: p.delivery_mode().map_or(1, u32::from),
        r#type: short(p.kind()).unwrap_or_default(),
        user_id: short(p.user_id()).unwrap_or_default(),
        app_id: short(p.app_id()).unwrap_or_default(),
        ..Default::default()
    };
    v1::Record {
        value: body,
        headers,
        timestamp_ms: p.timestamp().map_or(0, |t| (t as i64).saturating_mul(1000)),
        properties: Some(props),
        ..Default::default()
    }
}

/// What an AMQP consumer receives for a record: exchange, routing key, properties, body.
pub struct Delivered {
    pub exchange: String,
    pub routing_key: String,
    pub properties: Bytes,
    pub body: Bytes,
}

/// The engine's dead-letter reasons under RabbitMQ's names.
fn reason_name(reason: &str) -> &str {
    match reason {
        "max-deliveries" => "delivery_limit",
        "max-length" => "maxlen",
        other => other,
    }
}

/// A leased record as an AMQP delivery. `quorum`: the queue counts deliveries in
/// `x-delivery-count`, as RabbitMQ's quorum queues do.
pub fn delivered(m: &v1::LeasedMessage, quorum: bool) -> Delivered {
    let empty = v1::Record::default();
    let r = m.record.as_ref().unwrap_or(&empty);
    let sp = r.properties.clone().unwrap_or_default();
    let raw = r
        .headers
        .iter()
        .find(|h| h.name == PROPERTIES_HEADER)
        .map(|h| h.value.clone());
    let redelivery_count = (quorum && m.delivery_count > 1).then(|| m.delivery_count as i64 - 1);
    let properties = match raw {
        Some(raw) if sp.dead_letter_history.is_empty() && redelivery_count.is_none() => raw,
        Some(raw) => {
            let p = decode_properties(&raw).unwrap_or_default();
            amend(p, &sp, redelivery_count)
        }
        None => amend(from_envelope(r, &sp), &sp, redelivery_count),
    };
    Delivered {
        exchange: sp.publish_address.clone(),
        routing_key: sp.address.clone(),
        properties,
        body: r.value.clone(),
    }
}

/// Properties for a record published by another protocol: the envelope's fields, its
/// headers as long strings.
fn from_envelope(r: &v1::Record, sp: &v1::SystemProperties) -> BasicProperties {
    let mut p = BasicProperties::default();
    // AMQP short strings end at 255 bytes: a longer value (possible from other protocols)
    // is cut at a character boundary rather than written with a wrong length.
    let short = |s: &str| {
        let mut end = s.len().min(255);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        ShortString::from(s[..end].to_string())
    };
    if !sp.content_type.is_empty() {
        p = p.with_content_type(short(&sp.content_type));
    }
    if !sp.content_encoding.is_empty() {
        p = p.with_content_encoding(short(&sp.content_encoding));
    }
    let mut table = FieldTable::default();
    for h in r.headers.iter().filter(|h| h.name.len() <= 255) {
        table.insert(
            ShortString::from(h.name.clone()),
            AMQPValue::LongString(LongString::from(h.value.to_vec())),
        );
    }
    if !table.inner().is_empty() {
        p = p.with_headers(table);
    }
    if sp.delivery_mode != 0 {
        p = p.with_delivery_mode(sp.delivery_mode.min(255) as u8);
    }
    if sp.priority != 0 {
        p = p.with_priority(sp.priority.min(255) as u8);
    }
    if !sp.correlation_id.is_empty() {
        p = p.with_correlation_id(short(&String::from_utf8_lossy(&sp.correlation_id)));
    }
    if !sp.reply_to.is_empty() {
        p = p.with_reply_to(short(&sp.reply_to));
    }
    if !sp.message_id.is_empty() {
        p = p.with_message_id(short(&sp.message_id));
    }
    if r.timestamp_ms > 0 {
        p = p.with_timestamp((r.timestamp_ms / 1000) as u64);
    }
    if !sp.r#type.is_empty() {
        p = p.with_type(short(&sp.r#type));
    }
    if !sp.user_id.is_empty() {
        p = p.with_user_id(short(&sp.user_id));
    }
    if !sp.app_id.is_empty() {
        p = p.with_app_id(short(&sp.app_id));
    }
    p
}

/// Adds what the broker tells a consumer on top of the published properties: x-death and
/// the x-first-death-* headers of a dead-lettered message (whose expiration is dropped, as
/// RabbitMQ drops it, and kept as original-expiration), and x-delivery-count.
fn amend(p: BasicProperties, sp: &v1::SystemProperties, redeliveries: Option<i64>) -> Bytes {
    let mut headers = p.headers().clone().unwrap_or_default();
    let mut p = p;
    if !sp.dead_letter_history.is_empty() {
        let expiration = p.expiration().as_ref().map(|e| e.as_str().to_string());
        // x-death the publisher sent along (a dead letter published again): its counts
        // go on, as RabbitMQ's do.
        let mut earlier: Vec<FieldTable> = match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .filter_map(|v| match v {
                    AMQPValue::FieldTable(t) => Some(t.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut deaths = FieldArray::default();
        for d in &sp.dead_letter_history {
            let reason = reason_name(&d.reason);
            let before = earlier
                .iter()
                .position(|t| {
                    t.inner().get("queue").and_then(as_str).as_deref() == Some(d.queue.as_str())
                        && t.inner().get("reason").and_then(as_str).as_deref() == Some(reason)
                })
                .map(|i| earlier.remove(i));
            let count = d.count as i64
                + before
                    .as_ref()
                    .and_then(|t| t.inner().get("count").and_then(as_i64))
                    .unwrap_or(0);
            let mut e = FieldTable::default();
            e.insert("count".into(), AMQPValue::LongLongInt(count));
            e.insert("reason".into(), long_str(reason_name(&d.reason)));
            e.insert("queue".into(), long_str(&d.queue));
            e.insert(
                "time".into(),
                AMQPValue::Timestamp((d.first_at_ms / 1000).max(0) as u64),
            );
            e.insert("exchange".into(), long_str(&d.original_address));
            let mut keys = FieldArray::default();
            keys.push(long_str(&d.original_key));
            e.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
            if let Some(exp) = &expiration {
                e.insert("original-expiration".into(), long_str(exp));
            }
            deaths.push(AMQPValue::FieldTable(e));
        }
        for t in earlier {
            deaths.push(AMQPValue::FieldTable(t));
        }
        headers.insert("x-death".into(), AMQPValue::FieldArray(deaths));
        if let Some(first) = sp.dead_letter_history.iter().min_by_key(|d| d.first_at_ms) {
            for (k, v) in [
                ("x-first-death-reason", reason_name(&first.reason)),
                ("x-first-death-queue", first.queue.as_str()),
                ("x-first-death-exchange", first.original_address.as_str()),
            ] {
                if !headers.contains_key(k) {
                    headers.insert(ShortString::from(k), long_str(v));
                }
            }
        }
        p = without_expiration(p);
    }
    if let Some(n) = redeliveries {
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(n));
    }
    if headers.inner().is_empty() {
        return encode_properties(&p);
    }
    encode_properties(&p.with_headers(headers))
}

fn without_expiration(p: BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> Bytes {
        let mut h = FieldTable::default();
        h.insert("n".into(), AMQPValue::LongInt(7));
        h.insert("s".into(), long_str("x"));
        encode_properties(
            &BasicProperties::default()
                .with_content_type(ShortString::from("text/plain"))
                .with_priority(3)
                .with_expiration(ShortString::from("100"))
                .with_headers(h),
        )
    }

    fn leased(r: v1::Record, delivery_count: u32) -> v1::LeasedMessage {
        v1::LeasedMessage {
            record: Some(r),
            delivery_count,
            ..Default::default()
        }
    }

    #[test]
    fn properties_round_trip_byte_for_byte() {
        let raw = props();
        let mut r = to_record(&raw, Bytes::from_static(b"b"), 100, false, 1_000);
        let sp = r.properties.as_mut().unwrap();
        assert_eq!(sp.content_type, "text/plain");
        assert_eq!(sp.priority, 3);
        assert_eq!(sp.expires_at_ms, 1_100);
        assert!(
            r.headers
                .iter()
                .any(|h| h.name == "n" && &h.value[..] == b"int:7")
        );
        let d = delivered(&leased(r, 1), false);
        assert_eq!(d.properties, raw);
        assert_eq!(&d.body[..], b"b");
    }

    #[test]
    fn delayed_exchanges_read_x_delay() {
        let mut h = FieldTable::default();
        h.insert(DELAY_HEADER.into(), AMQPValue::LongInt(500));
        let raw = encode_properties(&BasicProperties::default().with_headers(h));
        let r = to_record(&raw, Bytes::new(), -1, true, 1_000);
        assert_eq!(r.properties.unwrap().deliver_at_ms, 1_500);
        let r = to_record(&raw, Bytes::new(), -1, false, 1_000);
        assert_eq!(r.properties.unwrap().deliver_at_ms, 0);
    }

    #[test]
    fn dead_letters_carry_x_death_without_expiration() {
        let mut r = to_record(&props(), Bytes::new(), 100, false, 0);
        let sp = r.properties.as_mut().unwrap();
        sp.dead_letter_history = vec![v1::DeadLetterCount {
            queue: "q".into(),
            reason: "expired".into(),
            count: 2,
            first_at_ms: 5_000,
            last_at_ms: 6_000,
            original_address: "ex".into(),
            original_key: "rk".into(),
        }];
        let d = delivered(&leased(r, 1), false);
        let p = decode_properties(&d.properties).unwrap();
        assert!(p.expiration().is_none());
        let h = p.headers().clone().unwrap();
        let Some(AMQPValue::FieldArray(deaths)) = h.inner().get("x-death") else {
            panic!("no x-death");
        };
        let AMQPValue::FieldTable(e) = &deaths.as_slice()[0] else {
            panic!("x-death entry is not a table");
        };
        assert_eq!(e.inner().get("count").and_then(as_i64), Some(2));
        assert_eq!(
            e.inner().get("reason").and_then(as_str).as_deref(),
            Some("expired")
        );
        assert_eq!(
            e.inner()
                .get("original-expiration")
                .and_then(as_str)
                .as_deref(),
            Some("100")
        );
        assert_eq!(
            h.inner()
                .get("x-first-death-queue")
                .and_then(as_str)
                .as_deref(),
            Some("q")
        );
    }

    #[test]
    fn quorum_queues_count_redeliveries() {
        let r = to_record(&props(), Bytes::new(), -1, false, 0);
        let d = delivered(&leased(r.clone(), 3), true);
        let p = decode_properties(&d.properties).unwrap();
        let h = p.headers().clone().unwrap();
        assert_eq!(h.inner().get("x-delivery-count").and_then(as_i64), Some(2));
        assert_eq!(delivered(&leased(r, 1), true).properties, props());
    }

    #[test]
    fn long_strings_of_other_protocols_stay_within_short_strings() {
        let r = v1::Record {
            headers: vec![v1::Header {
                name: "n".repeat(300),
                value: Bytes::from_static(b"v"),
            }],
            properties: Some(v1::SystemProperties {
                content_type: "é".repeat(200),
                ..Default::default()
            }),
            ..Default::default()
        };
        let d = delivered(&leased(r, 1), false);
        let p = decode_properties(&d.properties).expect("valid properties");
        assert!(p.content_type().as_ref().unwrap().as_str().len() <= 255);
        assert!(p.headers().is_none());
    }

    #[test]
    fn records_of_other_protocols_get_properties_from_the_envelope() {
        let r = v1::Record {
            value: Bytes::from_static(b"v"),
            headers: vec![v1::Header {
                name: "k".into(),
                value: Bytes::from_static(b"v1"),
            }],
            properties: Some(v1::SystemProperties {
                content_type: "application/json".into(),
                address: "t1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let d = delivered(&leased(r, 1), false);
        let p = decode_properties(&d.properties).unwrap();
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(d.routing_key, "t1");
        let h = p.headers().clone().unwrap();
        assert_eq!(h.inner().get("k").and_then(as_str).as_deref(), Some("v1"));
    }
}
