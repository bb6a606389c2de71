//! RocketMQ's message encodings: the stored form a pull returns and a check-back carries
//! (`MessageDecoder.decode` on the client), the batch form `SEND_BATCH_MESSAGE` sends, the
//! properties string, message ids and body compression.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes};

/// `MessageDecoder.MESSAGE_MAGIC_CODE` (v1: one-byte topic length).
const MAGIC_V1: i32 = -626843481;
/// v2: two-byte topic length.
const MAGIC_V2: i32 = -626843477;

/// `MessageSysFlag` bits.
pub mod sys_flag {
    pub const COMPRESSED: i32 = 1;
    pub const MULTI_TAGS: i32 = 1 << 1;
    pub const TRANSACTION_PREPARED: i32 = 1 << 2;
    pub const TRANSACTION_COMMIT: i32 = 2 << 2;
    pub const TRANSACTION_ROLLBACK: i32 = 3 << 2;
    pub const TRANSACTION_MASK: i32 = 3 << 2;
    pub const BORNHOST_V6: i32 = 1 << 4;
    pub const STOREHOST_V6: i32 = 1 << 5;
    /// RocketMQ 5: the compression codec of a compressed body (0 or 3 zlib, 1 lz4, 2 zstd).
    pub const COMPRESSION_TYPE_MASK: i32 = 7 << 8;
}

/// Names of the properties the protocol itself reads (`MessageConst`).
pub mod property {
    pub const KEYS: &str = "KEYS";
    pub const TAGS: &str = "TAGS";
    pub const WAIT: &str = "WAIT";
    pub const DELAY: &str = "DELAY";
    pub const RETRY_TOPIC: &str = "RETRY_TOPIC";
    pub const REAL_TOPIC: &str = "REAL_TOPIC";
    pub const REAL_QUEUE_ID: &str = "REAL_QID";
    pub const TRANSACTION_PREPARED: &str = "TRAN_MSG";
    pub const PRODUCER_GROUP: &str = "PGROUP";
    pub const MIN_OFFSET: &str = "MIN_OFFSET";
    pub const MAX_OFFSET: &str = "MAX_OFFSET";
    pub const UNIQ_KEY: &str = "UNIQ_KEY";
    pub const MAX_RECONSUME_TIMES: &str = "MAX_RECONSUME_TIMES";
    pub const CONSUME_START_TIME: &str = "CONSUME_START_TIME";
    pub const ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
    pub const START_DELIVER_TIME: &str = "__STARTDELIVERTIME";
    pub const TIMER_DELIVER_MS: &str = "TIMER_DELIVER_MS";
    pub const TIMER_DELAY_SEC: &str = "TIMER_DELAY_SEC";
    pub const TIMER_DELAY_MS: &str = "TIMER_DELAY_MS";
    pub const MESSAGE_TYPE: &str = "MSG_TYPE";
    pub const CORRELATION_ID: &str = "CORRELATION_ID";
    pub const REPLY_TO_CLIENT: &str = "REPLY_TO_CLIENT";
    pub const CLUSTER: &str = "CLUSTER";
}

const NAME_VALUE_SEPARATOR: char = '\u{1}';
const PROPERTY_SEPARATOR: char = '\u{2}';

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MessageError {
    #[error("truncated message batch")]
    Truncated,
    #[error("a batch entry's length does not match its fields")]
    BadLength,
    #[error(
        "the message body is compressed with a codec this gateway does not read (lz4 or zstd); use zlib"
    )]
    Compression,
    #[error("the compressed message body does not inflate: {0}")]
    Inflate(String),
    #[error("the properties are not UTF-8")]
    Properties,
}

/// Decodes `a\x01b\x02c\x01d\x02` into ordered pairs (entries without a separator are
/// dropped, as the client does).
pub fn decode_properties(s: &str) -> Vec<(String, String)> {
    s.split(PROPERTY_SEPARATOR)
        .filter_map(|kv| {
            let (k, v) = kv.split_once(NAME_VALUE_SEPARATOR)?;
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

pub fn encode_properties(props: &[(String, String)]) -> String {
    let mut s = String::new();
    for (k, v) in props {
        s.push_str(k);
        s.push(NAME_VALUE_SEPARATOR);
        s.push_str(v);
        s.push(PROPERTY_SEPARATOR);
    }
    s
}

pub fn get<'a>(props: &'a [(String, String)], name: &str) -> Option<&'a str> {
    props
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

pub fn set(props: &mut Vec<(String, String)>, name: &str, value: impl Into<String>) {
    let value = value.into();
    match props.iter_mut().find(|(k, _)| k == name) {
        Some(p) => p.1 = value,
        None => props.push((name.to_string(), value)),
    }
}

pub fn remove(props: &mut Vec<(String, String)>, name: &str) {
    props.retain(|(k, _)| k != name);
}

/// A message as the broker stores and serves it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub topic: String,
    pub queue_id: i32,
    pub flag: i32,
    pub queue_offset: i64,
    pub commit_log_offset: i64,
    pub sys_flag: i32,
    pub born_timestamp: i64,
    pub born_host: SocketAddr,
    pub store_timestamp: i64,
    pub store_host: SocketAddr,
    pub reconsume_times: i32,
    pub prepared_transaction_offset: i64,
    pub body: Bytes,
    pub properties: Vec<(String, String)>,
}

fn put_host(out: &mut Vec<u8>, host: &SocketAddr) {
    match host.ip() {
        IpAddr::V4(ip) => out.put_slice(&ip.octets()),
        IpAddr::V6(ip) => out.put_slice(&ip.octets()),
    }
    out.put_i32(host.port() as i32);
}

impl StoredMessage {
    /// The stored form (`MessageDecoder.decode` reads it); body uncompressed.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let props = encode_properties(&self.properties);
        let topic = self.topic.as_bytes();
        let mut sys_flag =
            self.sys_flag & !(sys_flag::COMPRESSED | sys_flag::COMPRESSION_TYPE_MASK);
        sys_flag &= !(sys_flag::BORNHOST_V6 | sys_flag::STOREHOST_V6);
        if self.born_host.is_ipv6() {
            sys_flag |= sys_flag::BORNHOST_V6;
        }
        if self.store_host.is_ipv6() {
            sys_flag |= sys_flag::STOREHOST_V6;
        }
        let host_len = |h: &SocketAddr| if h.is_ipv6() { 20 } else { 8 };
        let long_topic = topic.len() > 255;
        let total = 4
            + 4
            + 4
            + 4
            + 4
            + 8
            + 8
            + 4
            + 8
            + host_len(&self.born_host)
            + 8
            + host_len(&self.store_host)
            + 4
            + 8
            + 4
            + self.body.len()
            + if long_topic { 2 } else { 1 }
            + topic.len()
            + 2
            + props.len();
        out.reserve(total);
        out.put_i32(total as i32);
        out.put_i32(if long_topic { MAGIC_V2 } else { MAGIC_V1 });
        out.put_i32(body_crc(&self.body));
        out.put_i32(self.queue_id);
        out.put_i32(self.flag);
        out.put_i64(self.queue_offset);
        out.put_i64(self.commit_log_offset);
        out.put_i32(sys_flag);
        out.put_i64(self.born_timestamp);
        put_host(out, &self.born_host);
        out.put_i64(self.store_timestamp);
        put_host(out, &self.store_host);
        out.put_i32(self.reconsume_times);
        out.put_i64(self.prepared_transaction_offset);
        out.put_i32(self.body.len() as i32);
        out.put_slice(&self.body);
        if long_topic {
            out.put_i16(topic.len() as i16);
        } else {
            out.put_u8(topic.len() as u8);
        }
        out.put_slice(topic);
        out.put_i16(props.len() as i16);
        out.put_slice(props.as_bytes());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// The id RocketMQ calls offsetMsgId: store host and commit-log offset, in hex.
    pub fn offset_msg_id(&self) -> String {
        message_id(&self.store_host, self.commit_log_offset)
    }
}

fn get_host(b: &mut Bytes, v6: bool) -> Result<SocketAddr, MessageError> {
    let need = if v6 { 20 } else { 8 };
    if b.remaining() < need {
        return Err(MessageError::Truncated);
    }
    let ip: IpAddr = if v6 {
        let mut o = [0u8; 16];
        b.copy_to_slice(&mut o);
        IpAddr::V6(o.into())
    } else {
        let mut o = [0u8; 4];
        b.copy_to_slice(&mut o);
        IpAddr::V4(Ipv4Addr::from(o))
    };
    let port = b.get_i32();
    Ok(SocketAddr::new(ip, port.clamp(0, 65535) as u16))
}

/// Reads the stored messages of a pull response body (what the client's
/// `MessageDecoder.decodes` does); for tests, benchmarks and tools.
pub fn decode_stored(mut body: Bytes) -> Result<Vec<StoredMessage>, MessageError> {
    let mut out = Vec::new();
    while body.has_remaining() {
        if body.remaining() < 4 {
            return Err(MessageError::Truncated);
        }
        let total = body.get_i32();
        if total < 4 || total as usize - 4 > body.remaining() {
            return Err(MessageError::BadLength);
        }
        let mut m = body.split_to(total as usize - 4);
        if m.remaining() < 4 + 4 + 4 + 4 + 8 + 8 + 4 + 8 {
            return Err(MessageError::Truncated);
        }
        let magic = m.get_i32();
        let _crc = m.get_i32();
        let queue_id = m.get_i32();
        let flag = m.get_i32();
        let queue_offset = m.get_i64();
        let commit_log_offset = m.get_i64();
        let sys_flag = m.get_i32();
        let born_timestamp = m.get_i64();
        let born_host = get_host(&mut m, sys_flag & sys_flag::BORNHOST_V6 != 0)?;
        if m.remaining() < 8 {
            return Err(MessageError::Truncated);
        }
        let store_timestamp = m.get_i64();
        let store_host = get_host(&mut m, sys_flag & sys_flag::STOREHOST_V6 != 0)?;
        if m.remaining() < 4 + 8 + 4 {
            return Err(MessageError::Truncated);
        }
        let reconsume_times = m.get_i32();
        let prepared_transaction_offset = m.get_i64();
        let body_len = m.get_i32();
        if body_len < 0 || body_len as usize > m.remaining() {
            return Err(MessageError::BadLength);
        }
        let msg_body = m.split_to(body_len as usize);
        let topic_len = if magic == MAGIC_V2 {
            if m.remaining() < 2 {
                return Err(MessageError::Truncated);
            }
            m.get_i16().max(0) as usize
        } else {
            if m.remaining() < 1 {
                return Err(MessageError::Truncated);
            }
            m.get_u8() as usize
        };
        if topic_len + 2 > m.remaining() {
            return Err(MessageError::Truncated);
        }
        let topic = String::from_utf8_lossy(&m.split_to(topic_len)).into_owned();
        let props_len = m.get_i16().max(0) as usize;
        if props_len > m.remaining() {
            return Err(MessageError::Truncated);
        }
        let props = std::str::from_utf8(&m[..props_len]).map_err(|_| MessageError::Properties)?;
        out.push(StoredMessage {
            topic,
            queue_id,
            flag,
            queue_offset,
            commit_log_offset,
            sys_flag,
            born_timestamp,
            born_host,
            store_timestamp,
            store_host,
            reconsume_times,
            prepared_transaction_offset,
            body: msg_body,
            properties: decode_properties(props),
        });
    }
    Ok(out)
}

/// `UtilAll.crc32(body) & 0x7FFFFFFF`.
pub fn body_crc(body: &[u8]) -> i32 {
    (crc32fast::hash(body) & 0x7fff_ffff) as i32
}

/// `MessageDecoder.createMessageId`: address, port and offset as upper-case hex.
pub fn message_id(host: &SocketAddr, offset: i64) -> String {
    let mut b = Vec::with_capacity(28);
    put_host(&mut b, host);
    b.put_i64(offset);
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Reverses [`message_id`]: the broker address and commit-log offset, when well formed.
pub fn parse_message_id(id: &str) -> Option<(SocketAddr, i64)> {
    if !id.is_ascii() || (id.len() != 32 && id.len() != 56) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&id[i..i + 2], 16).ok())
        .collect();
    let mut b = Bytes::from(bytes?);
    let ip: IpAddr = if id.len() == 32 {
        let mut o = [0u8; 4];
        b.copy_to_slice(&mut o);
        IpAddr::V4(Ipv4Addr::from(o))
    } else {
        let mut o = [0u8; 16];
        b.copy_to_slice(&mut o);
        IpAddr::V6(o.into())
    };
    let port = b.get_i32();
    let offset = b.get_i64();
    Some((SocketAddr::new(ip, u16::try_from(port).ok()?), offset))
}

/// One message of a `SEND_BATCH_MESSAGE` body (`MessageDecoder.encodeMessages`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchEntry {
    pub flag: i32,
    pub body: Bytes,
    pub properties: Vec<(String, String)>,
}

pub fn decode_batch(mut body: Bytes) -> Result<Vec<BatchEntry>, MessageError> {
    let mut out = Vec::new();
    while body.has_remaining() {
        if body.remaining() < 20 {
            return Err(MessageError::Truncated);
        }
        let size = body.get_i32();
        if size < 22 || (size as usize - 4) > body.remaining() {
            return Err(MessageError::BadLength);
        }
        let mut entry = body.split_to(size as usize - 4);
        let _magic = entry.get_i32();
        let _crc = entry.get_i32();
        let flag = entry.get_i32();
        let body_len = entry.get_i32();
        if body_len < 0 || body_len as usize + 2 > entry.remaining() {
            return Err(MessageError::BadLength);
        }
        let msg_body = entry.split_to(body_len as usize);
        let props_len = entry.get_i16();
        if props_len < 0 || props_len as usize != entry.remaining() {
            return Err(MessageError::BadLength);
        }
        let props = std::str::from_utf8(&entry).map_err(|_| MessageError::Properties)?;
        out.push(BatchEntry {
            flag,
            body: msg_body,
            properties: decode_properties(props),
        });
    }
    Ok(out)
}

/// The body as stored: inflated when the producer compressed it (zlib, the client's default
/// above 4 KiB), so that every protocol reads the same bytes.
pub fn uncompressed_body(sys_flag: i32, body: Bytes, limit: usize) -> Result<Bytes, MessageError> {
    if sys_flag & sys_flag::COMPRESSED == 0 {
        return Ok(body);
    }
    match (sys_flag & sys_flag::COMPRESSION_TYPE_MASK) >> 8 {
        0 | 3 => {
            let mut out = Vec::with_capacity(body.len() * 4);
            flate2::read::ZlibDecoder::new(&body[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| MessageError::Inflate(e.to_string()))?;
            if out.len() > limit {
                return Err(MessageError::Inflate(format!(
                    "inflates beyond {limit} bytes"
                )));
            }
            Ok(out.into())
        }
        _ => Err(MessageError::Compression),
    }
}

/// Tags of a subscription expression: `None` for every tag (`*` or empty).
pub fn parse_tag_expression(expr: &str) -> Option<Vec<String>> {
    let expr = expr.trim();
    if expr.is_empty() || expr == "*" {
        return None;
    }
    Some(
        expr.split("||")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredMessage {
        StoredMessage {
            topic: "TopicTest".into(),
            queue_id: 3,
            flag: 0,
            queue_offset: 17,
            commit_log_offset: 1 << 40,
            sys_flag: 0,
            born_timestamp: 1_700_000_000_000,
            born_host: "10.0.0.1:5555".parse().unwrap(),
            store_timestamp: 1_700_000_000_001,
            store_host: "127.0.0.1:10911".parse().unwrap(),
            reconsume_times: 0,
            prepared_transaction_offset: 0,
            body: Bytes::from_static(b"hello"),
            properties: vec![
                ("TAGS".into(), "TagA".into()),
                ("UNIQ_KEY".into(), "ABC".into()),
            ],
        }
    }

    #[test]
    fn stored_form_has_the_lengths_the_client_reads() {
        let m = sample();
        let bytes = m.encode();
        let mut b = Bytes::from(bytes.clone());
        assert_eq!(b.get_i32() as usize, bytes.len());
        assert_eq!(b.get_i32(), MAGIC_V1);
        assert_eq!(b.get_i32(), body_crc(b"hello"));
        assert_eq!(b.get_i32(), 3);
        b.advance(4);
        assert_eq!(b.get_i64(), 17);
        assert_eq!(b.get_i64(), 1 << 40);
        // sysflag, born ts, born host, store ts, store host, reconsume, prepared offset
        b.advance(4 + 8 + 8 + 8 + 8 + 4 + 8);
        assert_eq!(b.get_i32(), 5);
        b.advance(5);
        assert_eq!(b.get_u8(), 9);
        b.advance(9);
        let plen = b.get_i16() as usize;
        assert_eq!(plen, b.remaining());
        assert_eq!(
            decode_properties(std::str::from_utf8(&b).unwrap()),
            m.properties
        );
    }

    #[test]
    fn stored_messages_decode_back() {
        let mut long = sample();
        long.topic = "t".repeat(300);
        long.born_host = "[::1]:5".parse().unwrap();
        let mut bytes = sample().encode();
        long.encode_into(&mut bytes);
        let back = decode_stored(Bytes::from(bytes.clone())).unwrap();
        assert_eq!(
            back,
            vec![sample(), {
                let mut l = long.clone();
                l.sys_flag |= sys_flag::BORNHOST_V6;
                l
            }]
        );
        for cut in 1..bytes.len() {
            let r = decode_stored(Bytes::from(bytes[..cut].to_vec()));
            assert!(r.is_err() || r.unwrap().len() == 1, "cut {cut}");
        }
    }

    #[test]
    fn message_ids_round_trip() {
        let host: SocketAddr = "127.0.0.1:10911".parse().unwrap();
        let id = message_id(&host, 123456789);
        assert_eq!(id.len(), 32);
        assert_eq!(parse_message_id(&id), Some((host, 123456789)));
        let v6: SocketAddr = "[::1]:10911".parse().unwrap();
        assert_eq!(parse_message_id(&message_id(&v6, 5)), Some((v6, 5)));
        assert_eq!(parse_message_id("nothex"), None);
        assert_eq!(parse_message_id(&"Z".repeat(32)), None);
    }

    #[test]
    fn batches_decode_and_bad_ones_are_refused() {
        let mut body = Vec::new();
        for (i, text) in ["a", "bb"].iter().enumerate() {
            let props = encode_properties(&[("UNIQ_KEY".into(), format!("K{i}"))]);
            body.put_i32((20 + text.len() + 2 + props.len()) as i32);
            body.put_i32(0);
            body.put_i32(0);
            body.put_i32(i as i32);
            body.put_i32(text.len() as i32);
            body.put_slice(text.as_bytes());
            body.put_i16(props.len() as i16);
            body.put_slice(props.as_bytes());
        }
        let entries = decode_batch(Bytes::from(body.clone())).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].body, Bytes::from_static(b"bb"));
        assert_eq!(entries[1].flag, 1);
        assert_eq!(get(&entries[1].properties, "UNIQ_KEY"), Some("K1"));
        let first = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
        for cut in (1..body.len()).filter(|c| *c != first) {
            assert!(
                decode_batch(Bytes::from(body[..cut].to_vec())).is_err(),
                "cut {cut}"
            );
        }
        let mut bad = body.clone();
        bad[3] = 200;
        assert!(decode_batch(Bytes::from(bad)).is_err());
    }

    #[test]
    fn zlib_bodies_are_inflated_and_other_codecs_refused() {
        use std::io::Write;
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&[7u8; 10_000]).unwrap();
        let z = Bytes::from(enc.finish().unwrap());
        let out = uncompressed_body(sys_flag::COMPRESSED, z.clone(), 1 << 20).unwrap();
        assert_eq!(out.len(), 10_000);
        assert!(uncompressed_body(sys_flag::COMPRESSED, z.clone(), 100).is_err());
        assert_eq!(
            uncompressed_body(sys_flag::COMPRESSED | (2 << 8), z, 1 << 20),
            Err(MessageError::Compression)
        );
        assert!(uncompressed_body(sys_flag::COMPRESSED, Bytes::from_static(b"junk"), 100).is_err());
    }

    #[test]
    fn tag_expressions() {
        assert_eq!(parse_tag_expression("*"), None);
        assert_eq!(parse_tag_expression(""), None);
        assert_eq!(
            parse_tag_expression("TagA || TagB"),
            Some(vec!["TagA".to_string(), "TagB".to_string()])
        );
    }

    proptest::proptest! {
        #[test]
        fn batch_decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode_batch(Bytes::from(bytes.clone()));
            let _ = decode_stored(Bytes::from(bytes));
        }
    }
}
