//! RocketMQ Remoting frames: `total length | serialize type + header length | header | body`,
//! the header in either of the two encodings clients use (JSON, RocketMQ's binary form).
//!
//! Written by hand: the one crate that covers this (`rocketmq-protocol`, 50k lines, one
//! release, one maintainer, a C zstd build) is far more than these two small encodings, and
//! the gateway needs exact control over what a malformed frame does to the connection.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde_json::Value;

/// RocketMQ's default `com.rocketmq.remoting.frameMaxLength`: 16 MiB.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Flag bit of a response (`RemotingCommandType.RESPONSE_COMMAND`).
pub const FLAG_RESPONSE: i32 = 1;
/// Flag bit of a one-way request: no response is expected.
pub const FLAG_ONEWAY: i32 = 1 << 1;

/// The version number our responses carry (RocketMQ 4.9.4's `MQVersion.CURRENT_VERSION`);
/// clients only compare it for features newer than what this gateway answers.
pub const OUR_VERSION: i32 = 399;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerializeType {
    Json,
    RocketMq,
}

/// One request or response.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub code: i32,
    /// `LanguageCode` ordinal (JAVA = 0).
    pub language: u8,
    pub version: i32,
    pub opaque: i32,
    pub flag: i32,
    pub remark: Option<String>,
    pub ext: BTreeMap<String, String>,
    pub body: Bytes,
    pub serialize: SerializeType,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("frame of {0} bytes is above the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("frame length {0} is too small to hold a header length")]
    TooSmall(usize),
    #[error("header length {header} does not fit in a frame of {frame} bytes")]
    HeaderLength { header: usize, frame: usize },
    #[error("unknown serialize type {0}")]
    SerializeType(u8),
    #[error("malformed JSON header: {0}")]
    Json(String),
    #[error("malformed binary header: {0}")]
    Binary(&'static str),
}

impl Command {
    /// A request (used for the requests the broker sends to clients).
    pub fn request(code: i32, opaque: i32) -> Self {
        Self {
            code,
            language: 0,
            version: OUR_VERSION,
            opaque,
            flag: 0,
            remark: None,
            ext: BTreeMap::new(),
            body: Bytes::new(),
            serialize: SerializeType::Json,
        }
    }

    /// The response to `self`, with `code`, in the encoding the request used.
    pub fn response(&self, code: i32) -> Self {
        Self {
            code,
            language: 0,
            version: OUR_VERSION,
            opaque: self.opaque,
            flag: FLAG_RESPONSE,
            remark: None,
            ext: BTreeMap::new(),
            body: Bytes::new(),
            serialize: self.serialize,
        }
    }

    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    pub fn is_oneway(&self) -> bool {
        self.flag & FLAG_ONEWAY != 0
    }

    pub fn with_remark(mut self, remark: impl Into<String>) -> Self {
        self.remark = Some(remark.into());
        self
    }

    pub fn with_ext(mut self, name: &str, value: impl ToString) -> Self {
        self.ext.insert(name.to_string(), value.to_string());
        self
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The encoded frame, length prefix included.
    pub fn encode(&self) -> Bytes {
        let header = match self.serialize {
            SerializeType::Json => self.json_header(),
            SerializeType::RocketMq => self.binary_header(),
        };
        let ser: u32 = match self.serialize {
            SerializeType::Json => 0,
            SerializeType::RocketMq => 1,
        };
        let mut out = BytesMut::with_capacity(8 + header.len() + self.body.len());
        out.put_u32((4 + header.len() + self.body.len()) as u32);
        out.put_u32((ser << 24) | (header.len() as u32 & 0x00ff_ffff));
        out.put_slice(&header);
        out.put_slice(&self.body);
        out.freeze()
    }

    fn json_header(&self) -> Vec<u8> {
        let mut h = serde_json::Map::new();
        h.insert("code".into(), self.code.into());
        h.insert("flag".into(), self.flag.into());
        h.insert("language".into(), language_name(self.language).into());
        h.insert("opaque".into(), self.opaque.into());
        h.insert("serializeTypeCurrentRPC".into(), "JSON".into());
        h.insert("version".into(), self.version.into());
        if let Some(r) = &self.remark {
            h.insert("remark".into(), r.clone().into());
        }
        if !self.ext.is_empty() {
            let ext: serde_json::Map<String, Value> = self
                .ext
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            h.insert("extFields".into(), Value::Object(ext));
        }
        serde_json::to_vec(&Value::Object(h)).unwrap_or_default()
    }

    fn binary_header(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.put_i16(self.code as i16);
        b.put_u8(self.language);
        b.put_i16(self.version as i16);
        b.put_i32(self.opaque);
        b.put_i32(self.flag);
        match &self.remark {
            Some(r) => {
                b.put_i32(r.len() as i32);
                b.put_slice(r.as_bytes());
            }
            None => b.put_i32(0),
        }
        let mut ext = Vec::new();
        for (k, v) in &self.ext {
            ext.put_i16(k.len() as i16);
            ext.put_slice(k.as_bytes());
            ext.put_i32(v.len() as i32);
            ext.put_slice(v.as_bytes());
        }
        b.put_i32(ext.len() as i32);
        b.put_slice(&ext);
        b
    }
}

/// Takes one whole frame off the front of `buf` when it holds one. `Ok(None)`: more bytes
/// are needed. An error means the stream cannot be resynchronised: close the connection.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Command>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let total = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if total > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(total));
    }
    if total < 4 {
        return Err(FrameError::TooSmall(total));
    }
    if buf.len() < 4 + total {
        buf.reserve(4 + total - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut frame = buf.split_to(total).freeze();
    let mark = frame.get_u32();
    let ser = (mark >> 24) as u8;
    let header_len = (mark & 0x00ff_ffff) as usize;
    if header_len > frame.len() {
        return Err(FrameError::HeaderLength {
            header: header_len,
            frame: total,
        });
    }
    let header = frame.split_to(header_len);
    let body = frame;
    let mut cmd = match ser {
        0 => decode_json(&header)?,
        1 => decode_binary(header)?,
        other => return Err(FrameError::SerializeType(other)),
    };
    cmd.body = body;
    Ok(Some(cmd))
}

fn decode_json(header: &[u8]) -> Result<Command, FrameError> {
    let v: Value = serde_json::from_slice(header).map_err(|e| FrameError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| FrameError::Json("the header is not a JSON object".into()))?;
    let int = |name: &str| -> Result<i32, FrameError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(Value::Number(n)) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| FrameError::Json(format!("{name} is not a 32-bit integer"))),
            Some(_) => Err(FrameError::Json(format!("{name} is not a number"))),
        }
    };
    let code = int("code")?;
    let language = match obj.get("language") {
        Some(Value::String(s)) => language_code(s),
        Some(Value::Number(n)) => n.as_u64().unwrap_or(7).min(255) as u8,
        _ => 0,
    };
    let mut ext = BTreeMap::new();
    match obj.get("extFields") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => continue,
                    Value::Bool(_) | Value::Number(_) => v.to_string(),
                    _ => {
                        return Err(FrameError::Json(format!("extFields.{k} is not a string")));
                    }
                };
                ext.insert(k.clone(), v);
            }
        }
        Some(_) => return Err(FrameError::Json("extFields is not an object".into())),
    }
    let remark = match obj.get("remark") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(Command {
        code,
        language,
        version: int("version")?,
        opaque: int("opaque")?,
        flag: int("flag")?,
        remark,
        ext,
        body: Bytes::new(),
        serialize: SerializeType::Json,
    })
}

fn decode_binary(mut h: Bytes) -> Result<Command, FrameError> {
    fn need(h: &Bytes, n: usize, what: &'static str) -> Result<(), FrameError> {
        if h.remaining() < n {
            Err(FrameError::Binary(what))
        } else {
            Ok(())
        }
    }
    fn string(h: &mut Bytes, len: usize, what: &'static str) -> Result<String, FrameError> {
        need(h, len, what)?;
        String::from_utf8(h.split_to(len).to_vec()).map_err(|_| FrameError::Binary(what))
    }
    need(&h, 2 + 1 + 2 + 4 + 4 + 4, "truncated fixed fields")?;
    let code = h.get_i16() as i32;
    let language = h.get_u8();
    let version = h.get_i16() as i32;
    let opaque = h.get_i32();
    let flag = h.get_i32();
    let remark_len = h.get_i32();
    if remark_len < 0 {
        return Err(FrameError::Binary("negative remark length"));
    }
    let remark = if remark_len > 0 {
        Some(string(&mut h, remark_len as usize, "truncated remark")?)
    } else {
        None
    };
    need(&h, 4, "truncated extFields length")?;
    let ext_len = h.get_i32();
    if ext_len < 0 || ext_len as usize > h.remaining() {
        return Err(FrameError::Binary("extFields length beyond the header"));
    }
    let mut e = h.split_to(ext_len as usize);
    let mut ext = BTreeMap::new();
    while e.has_remaining() {
        need(&e, 2, "truncated extFields key length")?;
        let klen = e.get_i16();
        if klen < 0 {
            return Err(FrameError::Binary("negative extFields key length"));
        }
        let k = string(&mut e, klen as usize, "truncated extFields key")?;
        need(&e, 4, "truncated extFields value length")?;
        let vlen = e.get_i32();
        if vlen < 0 {
            return Err(FrameError::Binary("negative extFields value length"));
        }
        let v = string(&mut e, vlen as usize, "truncated extFields value")?;
        ext.insert(k, v);
    }
    Ok(Command {
        code,
        language,
        version,
        opaque,
        flag,
        remark,
        ext,
        body: Bytes::new(),
        serialize: SerializeType::RocketMq,
    })
}

const LANGUAGES: [&str; 13] = [
    "JAVA", "CPP", "DOTNET", "PYTHON", "DELPHI", "ERLANG", "RUBY", "OTHER", "HTTP", "GO", "PHP",
    "OMS", "RUST",
];

fn language_code(name: &str) -> u8 {
    LANGUAGES.iter().position(|l| *l == name).unwrap_or(7) as u8
}

fn language_name(code: u8) -> &'static str {
    LANGUAGES.get(code as usize).copied().unwrap_or("OTHER")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(serialize: SerializeType) -> Command {
        let mut c = Command::request(105, 42)
            .with_ext("topic", "TopicTest")
            .with_ext("acceptStandardJsonOnly", "true")
            .with_remark("r")
            .with_body(Bytes::from_static(b"hello"));
        c.serialize = serialize;
        c.flag = FLAG_ONEWAY;
        c
    }

    #[test]
    fn both_encodings_round_trip() {
        for ser in [SerializeType::Json, SerializeType::RocketMq] {
            let c = sample(ser);
            let mut buf = BytesMut::from(&c.encode()[..]);
            let back = decode(&mut buf).unwrap().unwrap();
            assert_eq!(back, c);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let bytes = sample(SerializeType::Json).encode();
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(decode(&mut buf), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn a_java_client_header_decodes() {
        let header = br#"{"code":105,"extFields":{"topic":"TBW102"},"flag":0,"language":"JAVA","opaque":3,"serializeTypeCurrentRPC":"JSON","version":435}"#;
        let mut buf = BytesMut::new();
        buf.put_u32(4 + header.len() as u32);
        buf.put_u32(header.len() as u32);
        buf.put_slice(header);
        let c = decode(&mut buf).unwrap().unwrap();
        assert_eq!((c.code, c.opaque, c.version), (105, 3, 435));
        assert_eq!(c.ext["topic"], "TBW102");
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut big = BytesMut::new();
        big.put_u32(MAX_FRAME_BYTES as u32 + 1);
        assert!(matches!(decode(&mut big), Err(FrameError::TooLarge(_))));
        let mut small = BytesMut::new();
        small.put_u32(2);
        small.put_u16(0);
        assert!(matches!(decode(&mut small), Err(FrameError::TooSmall(2))));
        let mut header_too_long = BytesMut::new();
        header_too_long.put_u32(8);
        header_too_long.put_u32(100);
        header_too_long.put_u32(0);
        assert!(matches!(
            decode(&mut header_too_long),
            Err(FrameError::HeaderLength { .. })
        ));
        let mut bad_type = BytesMut::new();
        bad_type.put_u32(4);
        bad_type.put_u32(7 << 24);
        assert!(matches!(
            decode(&mut bad_type),
            Err(FrameError::SerializeType(7))
        ));
        for header in [
            &b"{not json"[..],
            b"[1]",
            br#"{"code":"x"}"#,
            br#"{"extFields":3}"#,
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32(4 + header.len() as u32);
            buf.put_u32(header.len() as u32);
            buf.put_slice(header);
            assert!(matches!(decode(&mut buf), Err(FrameError::Json(_))));
        }
        let good = sample(SerializeType::RocketMq).encode();
        // Cut the binary header short inside its own declared length.
        let header_len =
            (u32::from_be_bytes([good[4], good[5], good[6], good[7]]) & 0xffffff) as usize;
        for keep in 0..header_len {
            let mut buf = BytesMut::new();
            buf.put_u32(4 + keep as u32);
            buf.put_u32((1 << 24) | keep as u32);
            buf.put_slice(&good[8..8 + keep]);
            assert!(
                matches!(decode(&mut buf), Err(FrameError::Binary(_))),
                "binary header cut at {keep}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf) {}
        }
    }
}
