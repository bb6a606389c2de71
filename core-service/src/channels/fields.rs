//! AMQP field tables and message properties as the core needs them: queue arguments,
//! headers-exchange matching and the `x-death` header of dead-lettered messages. Messages
//! otherwise keep their properties as received, so this is off the hot path.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::basic::{gen_properties, parse_properties};
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use bytes::Bytes;

/// Decodes an AMQP-encoded field table (length-prefixed); empty input is an empty table.
pub fn decode_table(raw: &[u8]) -> Result<FieldTable, String> {
    if raw.is_empty() {
        return Ok(FieldTable::default());
    }
    match parse_field_table(raw) {
        Ok(([], t)) => Ok(t),
        Ok(_) => Err("trailing bytes after a field table".into()),
        Err(e) => Err(format!("malformed field table: {e}")),
    }
}

pub fn decode_properties(raw: &[u8]) -> Option<BasicProperties> {
    if raw.is_empty() {
        return Some(BasicProperties::default());
    }
    parse_properties(raw).ok().map(|(_, p)| p)
}

pub fn encode_properties(p: &BasicProperties) -> Bytes {
    cookie_factory::r#gen(gen_properties(p), Vec::new())
        .map(|(v, _)| Bytes::from(v))
        .unwrap_or_default()
}

/// The properties with one header set (quorum queues' `x-delivery-count`).
pub fn with_header(props: &Bytes, key: &str, value: AMQPValue) -> Bytes {
    let Some(p) = decode_properties(props) else {
        return props.clone();
    };
    let mut headers = p.headers().clone().unwrap_or_default();
    headers.insert(ShortString::from(key), value);
    encode_properties(&p.with_headers(headers))
}

/// An integer argument of any AMQP integer width.
pub fn as_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => *x as i64,
        AMQPValue::ShortShortUInt(x) => *x as i64,
        AMQPValue::ShortInt(x) => *x as i64,
        AMQPValue::ShortUInt(x) => *x as i64,
        AMQPValue::LongInt(x) => *x as i64,
        AMQPValue::LongUInt(x) => *x as i64,
        AMQPValue::LongLongInt(x) => *x,
        AMQPValue::Timestamp(x) => *x as i64,
        _ => return None,
    })
}

pub fn as_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

pub fn as_bool(v: &AMQPValue) -> Option<bool> {
    match v {
        AMQPValue::Boolean(b) => Some(*b),
        _ => None,
    }
}

/// Equality as RabbitMQ's headers exchange sees it: integers of different widths and the
/// two string kinds compare by value.
pub fn value_eq(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (as_i64(a), as_i64(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (as_str(a), as_str(b)) {
        return x == y;
    }
    a == b
}

/// Headers-exchange matching: `x-match` all (default) or any; `x-` keys are not matched; a
/// void value in the binding matches on presence alone.
pub fn headers_match(binding: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let any = binding
        .inner()
        .get("x-match")
        .and_then(as_str)
        .is_some_and(|m| m == "any" || m == "any-with-x");
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty).inner();
    let mut wanted = binding
        .inner()
        .iter()
        .filter(|(k, _)| !k.as_str().starts_with("x-"))
        .peekable();
    if wanted.peek().is_none() {
        return !any;
    }
    let mut matched = wanted.map(|(k, v)| match headers.get(k) {
        None => false,
        Some(h) => matches!(v, AMQPValue::Void) || value_eq(v, h),
    });
    if any {
        matched.any(|m| m)
    } else {
        matched.all(|m| m)
    }
}

/// Why a message was dead-lettered (the `reason` of its `x-death` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    Rejected,
    Expired,
    Maxlen,
    DeliveryLimit,
}

impl DeathReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Maxlen => "maxlen",
            Self::DeliveryLimit => "delivery_limit",
        }
    }
}

/// The properties of a dead-lettered copy: an `x-death` entry for (queue, reason) counted
/// up or added first, `x-first-death-*` set once, the per-message expiration moved into
/// the entry as `original-expiration` (so the copy does not expire again on the way).
pub fn dead_letter_properties(
    props: &[u8],
    queue: &str,
    reason: DeathReason,
    exchange: &str,
    routing_key: &str,
    now_ms: i64,
) -> Bytes {
    let Some(p) = decode_properties(props) else {
        return Bytes::copy_from_slice(props);
    };
    let mut headers = p.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = headers
        .inner()
        .get("x-death")
        .and_then(|v| match v {
            AMQPValue::FieldArray(a) => Some(a.as_slice().to_vec()),
            _ => None,
        })
        .unwrap_or_default();
    let same = |t: &FieldTable| {
        t.inner().get("queue").and_then(as_str).as_deref() == Some(queue)
            && t.inner().get("reason").and_then(as_str).as_deref() == Some(reason.as_str())
    };
    let existing = deaths.iter().position(|d| match d {
        AMQPValue::FieldTable(t) => same(t),
        _ => false,
    });
    let mut entry = match existing {
        Some(i) => match deaths.remove(i) {
            AMQPValue::FieldTable(t) => t,
            _ => FieldTable::default(),
        },
        None => FieldTable::default(),
    };
    let count = entry.inner().get("count").and_then(as_i64).unwrap_or(0) + 1;
    entry.insert("count".into(), AMQPValue::LongLongInt(count));
    entry.insert("reason".into(), long_str(reason.as_str()));
    entry.insert("queue".into(), long_str(queue));
    entry.insert(
        "time".into(),
        AMQPValue::Timestamp((now_ms / 1000).max(0) as u64),
    );
    entry.insert("exchange".into(), long_str(exchange));
    let mut keys = FieldArray::default();
    keys.push(long_str(routing_key));
    entry.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
    if let Some(exp) = p.expiration() {
        entry.insert("original-expiration".into(), long_str(exp.as_str()));
    }
    deaths.insert(0, AMQPValue::FieldTable(entry));
    let mut arr = FieldArray::default();
    for d in deaths {
        arr.push(d);
    }
    headers.insert("x-death".into(), AMQPValue::FieldArray(arr));
    for (k, v) in [
        ("x-first-death-reason", reason.as_str()),
        ("x-first-death-queue", queue),
        ("x-first-death-exchange", exchange),
    ] {
        if !headers.contains_key(k) {
            headers.insert(ShortString::from(k), long_str(v));
        }
    }
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    out = out.with_headers(headers);
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
    encode_properties(&out)
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn headers_all_and_any() {
        let h = table(&[("a", long_str("1")), ("b", AMQPValue::LongInt(2))]);
        let all = table(&[("a", long_str("1")), ("b", AMQPValue::LongLongInt(2))]);
        assert!(headers_match(&all, Some(&h)));
        let all_miss = table(&[("a", long_str("1")), ("c", long_str("x"))]);
        assert!(!headers_match(&all_miss, Some(&h)));
        let mut any = all_miss.clone();
        any.insert("x-match".into(), long_str("any"));
        assert!(headers_match(&any, Some(&h)));
        assert!(!headers_match(&any, None));
    }

    #[test]
    fn x_death_counts_per_queue_and_reason() {
        let props = encode_properties(
            &BasicProperties::default().with_expiration(ShortString::from("100")),
        );
        let once = dead_letter_properties(&props, "q", DeathReason::Expired, "ex", "rk", 5_000);
        let twice = dead_letter_properties(&once, "q", DeathReason::Expired, "ex", "rk", 6_000);
        let p = decode_properties(&twice).unwrap();
        assert!(p.expiration().is_none());
        let h = p.headers().clone().unwrap();
        let AMQPValue::FieldArray(deaths) = h.inner().get("x-death").unwrap() else {
            panic!("x-death is not an array");
        };
        assert_eq!(deaths.as_slice().len(), 1);
        let AMQPValue::FieldTable(e) = &deaths.as_slice()[0] else {
            panic!("entry is not a table");
        };
        assert_eq!(e.inner().get("count").and_then(as_i64), Some(2));
        assert_eq!(
            e.inner()
                .get("original-expiration")
                .and_then(as_str)
                .as_deref(),
            Some("100")
        );
        assert_eq!(
            h.inner()
                .get("x-first-death-reason")
                .and_then(as_str)
                .as_deref(),
            Some("expired")
        );
    }
}
