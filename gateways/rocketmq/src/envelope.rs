//! A RocketMQ message as a core record and back. The body is the record's value, every
//! property is a header of the same name (in order), `KEYS` is also the record key (so Kafka
//! clients see the business key), and the fields RocketMQ keeps outside the properties are
//! headers under `rocketmq.`. The record's timestamp is the append time the core stamps
//! (RocketMQ's store time, what offset-by-time looks up); the producer's clock is kept in
//! `rocketmq.born_timestamp`. See docs/compat/rocketmq.md.

use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use tributary_proto::v1;

use crate::message::{self, StoredMessage, property};

pub const H_FLAG: &str = "rocketmq.flag";
pub const H_BORN_HOST: &str = "rocketmq.born_host";
pub const H_BORN_TIMESTAMP: &str = "rocketmq.born_timestamp";
pub const H_RECONSUME_TIMES: &str = "rocketmq.reconsume_times";
const PREFIX: &str = "rocketmq.";

/// A message as a producer sent it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub flag: i32,
    pub body: Bytes,
    pub properties: Vec<(String, String)>,
    pub born_timestamp: i64,
    pub born_host: SocketAddr,
    pub reconsume_times: i32,
}

pub fn to_record(m: &Outgoing) -> v1::Record {
    let mut headers: Vec<v1::Header> = m
        .properties
        .iter()
        .map(|(k, v)| v1::Header {
            name: k.clone(),
            value: Bytes::from(v.clone().into_bytes()),
        })
        .collect();
    let mut extra = |name: &str, value: String| {
        headers.push(v1::Header {
            name: name.to_string(),
            value: Bytes::from(value.into_bytes()),
        })
    };
    if m.flag != 0 {
        extra(H_FLAG, m.flag.to_string());
    }
    extra(H_BORN_TIMESTAMP, m.born_timestamp.to_string());
    extra(H_BORN_HOST, m.born_host.to_string());
    if m.reconsume_times != 0 {
        extra(H_RECONSUME_TIMES, m.reconsume_times.to_string());
    }
    v1::Record {
        key: message::get(&m.properties, property::KEYS)
            .map(|k| Bytes::from(k.to_string().into_bytes()))
            .unwrap_or_default(),
        value: m.body.clone(),
        headers,
        timestamp_ms: 0,
        properties: Some(v1::SystemProperties {
            origin_protocol: "rocketmq".into(),
            message_id: message::get(&m.properties, property::UNIQ_KEY)
                .unwrap_or_default()
                .to_string(),
            ..Default::default()
        }),
    }
}

/// Where a fetched record sits.
pub struct Position<'a> {
    pub topic: &'a str,
    pub queue_id: u32,
    pub offset: i64,
    /// The batch's append time (the record's timestamp when it has none).
    pub append_time_ms: i64,
    pub store_host: SocketAddr,
}

/// A record of any protocol as RocketMQ consumers see it.
pub fn from_record(rec: &v1::Record, at: &Position<'_>) -> StoredMessage {
    let mut properties = Vec::with_capacity(rec.headers.len());
    let mut flag = 0;
    let mut born_timestamp = None;
    let mut born_host = None;
    let mut reconsume_times = 0;
    for h in &rec.headers {
        let value = String::from_utf8_lossy(&h.value);
        match h.name.as_str() {
            H_FLAG => flag = value.parse().unwrap_or(0),
            H_BORN_TIMESTAMP => born_timestamp = value.parse().ok(),
            H_BORN_HOST => born_host = value.parse().ok(),
            H_RECONSUME_TIMES => reconsume_times = value.parse().unwrap_or(0),
            name if name.starts_with(PREFIX) => {}
            // The properties string cannot carry its own separators.
            name if name.is_empty() || name.contains(['\u{1}', '\u{2}']) => {}
            _ if value.contains(['\u{1}', '\u{2}']) => {}
            name => properties.push((name.to_string(), value.into_owned())),
        }
    }
    if message::get(&properties, property::KEYS).is_none()
        && !rec.key.is_empty()
        && let Ok(k) = std::str::from_utf8(&rec.key)
        && !k.contains(['\u{1}', '\u{2}'])
    {
        properties.push((property::KEYS.to_string(), k.to_string()));
    }
    if message::get(&properties, property::UNIQ_KEY).is_none()
        && let Some(id) = rec.properties.as_ref().map(|p| &p.message_id)
        && !id.is_empty()
        && !id.contains(['\u{1}', '\u{2}'])
    {
        properties.push((property::UNIQ_KEY.to_string(), id.clone()));
    }
    let store_timestamp = if rec.timestamp_ms > 0 {
        rec.timestamp_ms
    } else {
        at.append_time_ms
    };
    StoredMessage {
        topic: at.topic.to_string(),
        queue_id: at.queue_id as i32,
        flag,
        queue_offset: at.offset,
        commit_log_offset: crate::ids::encode(at.topic, at.queue_id, at.offset),
        sys_flag: 0,
        born_timestamp: born_timestamp.unwrap_or(store_timestamp),
        born_host: born_host.unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
        store_timestamp,
        store_host: at.store_host,
        reconsume_times,
        prepared_transaction_offset: 0,
        body: rec.value.clone(),
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_envelope() {
        let out = Outgoing {
            flag: 3,
            body: Bytes::from_static(b"body"),
            properties: vec![
                ("KEYS".into(), "k1 k2".into()),
                ("TAGS".into(), "TagA".into()),
                ("UNIQ_KEY".into(), "ID1".into()),
                ("color".into(), "red".into()),
            ],
            born_timestamp: 42,
            born_host: "10.1.2.3:4567".parse().unwrap(),
            reconsume_times: 2,
        };
        let rec = to_record(&out);
        assert_eq!(rec.key, Bytes::from_static(b"k1 k2"));
        let at = Position {
            topic: "T",
            queue_id: 1,
            offset: 9,
            append_time_ms: 1000,
            store_host: "127.0.0.1:10911".parse().unwrap(),
        };
        let m = from_record(&rec, &at);
        assert_eq!(m.properties, out.properties);
        assert_eq!((m.flag, m.born_timestamp, m.reconsume_times), (3, 42, 2));
        assert_eq!(m.born_host, out.born_host);
        assert_eq!(
            (m.store_timestamp, m.queue_offset, m.queue_id),
            (1000, 9, 1)
        );
    }

    #[test]
    fn a_kafka_record_reads_as_a_message() {
        let rec = v1::Record {
            key: Bytes::from_static(b"order-7"),
            value: Bytes::from_static(b"v"),
            headers: vec![
                v1::Header {
                    name: "trace".into(),
                    value: Bytes::from_static(b"abc"),
                },
                v1::Header {
                    name: "bad\u{1}name".into(),
                    value: Bytes::from_static(b"x"),
                },
            ],
            timestamp_ms: 77,
            properties: None,
        };
        let at = Position {
            topic: "T",
            queue_id: 0,
            offset: 0,
            append_time_ms: 1000,
            store_host: "127.0.0.1:10911".parse().unwrap(),
        };
        let m = from_record(&rec, &at);
        assert_eq!(
            m.properties,
            vec![
                ("trace".to_string(), "abc".to_string()),
                ("KEYS".to_string(), "order-7".to_string())
            ]
        );
        assert_eq!((m.store_timestamp, m.born_timestamp), (77, 77));
    }
}
