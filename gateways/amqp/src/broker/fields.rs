//! AMQP field tables and typed values: decoding, encoding, and the comparisons RabbitMQ
//! makes (an argument given as a long int equals the same number as a short one).

use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::basic::parse_properties;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::Bytes;

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

pub fn encode_table(t: &FieldTable) -> Bytes {
    if t.inner().is_empty() {
        return Bytes::new();
    }
    cookie_factory::r#gen(gen_field_table(t), Vec::new())
        .map(|(v, _)| Bytes::from(v))
        .unwrap_or_default()
}

pub fn decode_properties(raw: &[u8]) -> Option<BasicProperties> {
    if raw.is_empty() {
        return Some(BasicProperties::default());
    }
    parse_properties(raw).ok().map(|(_, p)| p)
}

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

pub fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A header value as the core's router compares it (bytes): a string as it is; another
/// scalar with its type in front ("int:1", "bool:true"), so that a string never equals a
/// number (as in RabbitMQ's headers exchange) while the value stays readable to consumers of
/// other protocols; `None` for values a headers exchange cannot match on (tables, arrays).
/// A void binding argument matches any value (empty bytes).
pub fn header_bytes(v: &AMQPValue) -> Option<Vec<u8>> {
    if let AMQPValue::LongString(s) = v {
        return Some(s.as_bytes().to_vec());
    }
    if let Some(s) = as_str(v) {
        return Some(s.into_bytes());
    }
    if let Some(n) = as_i64(v) {
        return Some(format!("int:{n}").into_bytes());
    }
    if let Some(b) = as_bool(v) {
        return Some(format!("bool:{b}").into_bytes());
    }
    match v {
        AMQPValue::Float(f) => Some(format!("float:{f}").into_bytes()),
        AMQPValue::Double(f) => Some(format!("float:{f}").into_bytes()),
        AMQPValue::Void => Some(Vec::new()),
        _ => None,
    }
}
