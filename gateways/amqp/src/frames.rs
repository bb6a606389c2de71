//! AMQP frames on the wire. The framing (type, channel, size, payload, end octet) is read
//! here so that a frame's size is checked against the negotiated frame_max before its
//! payload is buffered, and so that a content header's property list can be forwarded as
//! received; method payloads are decoded and encoded by `amq-protocol`.

use amq_protocol::frame::{AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, parse_class};
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// The frame header before the payload: type, channel, size.
pub const HEADER_LEN: usize = 7;

/// The protocol header of AMQP 0-9-1, also sent back on a mismatch.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

pub const FRAME_ERROR: u16 = 501;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const NOT_IMPLEMENTED: u16 = 540;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds frame_max {max}")]
    TooLarge { size: usize, max: usize },
    #[error("frame end octet is {0:#04x}, expected 0xce")]
    BadEnd(u8),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
}

#[derive(Debug)]
pub struct RawFrame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Bytes,
}

/// Takes one whole frame off the front of `buf`, if one is there.
pub fn take_frame(buf: &mut BytesMut, frame_max: usize) -> Result<Option<RawFrame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(FrameError::UnknownType(kind));
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size + HEADER_LEN + 1 > frame_max {
        return Err(FrameError::TooLarge {
            size: size + HEADER_LEN + 1,
            max: frame_max,
        });
    }
    if buf.len() < HEADER_LEN + size + 1 {
        buf.reserve(HEADER_LEN + size + 1 - buf.len());
        return Ok(None);
    }
    let end = buf[HEADER_LEN + size];
    if end != FRAME_END {
        return Err(FrameError::BadEnd(end));
    }
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(size).freeze();
    buf.advance(1);
    Ok(Some(RawFrame {
        kind,
        channel,
        payload,
    }))
}

pub fn parse_method(payload: &[u8]) -> Option<AMQPClass> {
    match parse_class(payload) {
        Ok(([], m)) => Some(m),
        _ => None,
    }
}

/// The class and method ids at the start of a method payload.
pub fn method_ids(payload: &[u8]) -> (u16, u16) {
    if payload.len() < 4 {
        return (0, 0);
    }
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    )
}

/// A content header: class id, body size and the raw property flags and list.
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    pub properties: Bytes,
}

pub fn parse_content_header(payload: &Bytes) -> Option<ContentHeader> {
    if payload.len() < 14 {
        return None;
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let body_size = u64::from_be_bytes(payload[4..12].try_into().ok()?);
    Some(ContentHeader {
        class_id,
        body_size,
        properties: payload.slice(12..),
    })
}

pub fn put_method(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    let frame = AMQPFrame::Method(channel, method);
    if let Ok((v, _)) = cookie_factory::r#gen(gen_frame(&frame), Vec::new()) {
        out.extend_from_slice(&v);
    }
}

fn put_short_str(out: &mut BytesMut, s: &str) {
    // Names reach here from the core, which holds AMQP short strings (at most 255 bytes).
    let b = &s.as_bytes()[..s.len().min(255)];
    out.put_u8(b.len() as u8);
    out.extend_from_slice(b);
}

/// basic.deliver, encoded here rather than by the codec: it is written once per message,
/// and the generic encoder allocates for every frame.
pub fn put_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    let start = out.len();
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(0);
    out.put_u16(60);
    out.put_u16(60);
    put_short_str(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(redelivered as u8);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    let size = (out.len() - start - HEADER_LEN) as u32;
    out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    out.put_u8(FRAME_END);
}

pub fn encode_properties(p: &amq_protocol::protocol::BasicProperties) -> Bytes {
    cookie_factory::r#gen(amq_protocol::protocol::basic::gen_properties(p), Vec::new())
        .map(|(v, _)| Bytes::from(v))
        .unwrap_or_default()
}

pub fn put_heartbeat(out: &mut BytesMut) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// A content header frame carrying `properties` as they were received, then the body split
/// into frames of at most `frame_max`.
pub fn put_content(
    out: &mut BytesMut,
    channel: u16,
    properties: &[u8],
    body: &[u8],
    frame_max: usize,
) {
    out.reserve(HEADER_LEN * 2 + 14 + properties.len() + body.len() + 8);
    out.put_u8(FRAME_HEADER);
    out.put_u16(channel);
    out.put_u32((12 + properties.len()) as u32);
    out.put_u16(60);
    out.put_u16(0);
    out.put_u64(body.len() as u64);
    if properties.is_empty() {
        out.put_u16(0);
    } else {
        out.extend_from_slice(properties);
    }
    out.put_u8(FRAME_END);
    let chunk = frame_max.saturating_sub(HEADER_LEN + 1).max(1);
    for part in body.chunks(chunk) {
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(part.len() as u32);
        out.extend_from_slice(part);
        out.put_u8(FRAME_END);
    }
}

/// Runs the gateway's frame reader and method decoder over arbitrary bytes (the fuzz
/// target): never panics, whatever the input.
pub fn decode_stream(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = take_frame(&mut buf, 131_072) {
        match f.kind {
            FRAME_METHOD => {
                let _ = parse_method(&f.payload);
            }
            FRAME_HEADER => {
                if let Some(h) = parse_content_header(&f.payload) {
                    let _ = amq_protocol::protocol::basic::parse_properties(&h.properties[..]);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, channel: u16, payload: &[u8], end: u8) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        b.put_u16(channel);
        b.put_u32(payload.len() as u32);
        b.extend_from_slice(payload);
        b.put_u8(end);
        b
    }

    #[test]
    fn truncated_frames_wait_for_more() {
        let whole = frame(FRAME_HEARTBEAT, 0, &[], FRAME_END);
        for cut in 0..whole.len() {
            let mut b = BytesMut::from(&whole[..cut]);
            assert!(take_frame(&mut b, 4096).unwrap().is_none(), "cut at {cut}");
        }
        let mut b = whole.clone();
        assert!(take_frame(&mut b, 4096).unwrap().is_some());
        assert!(b.is_empty());
    }

    #[test]
    fn bad_end_oversized_and_unknown_type_are_errors() {
        let mut b = frame(FRAME_METHOD, 1, &[0, 10, 0, 10], 0x00);
        assert_eq!(take_frame(&mut b, 4096).err(), Some(FrameError::BadEnd(0)));
        let mut b = frame(FRAME_BODY, 1, &[0u8; 5000], FRAME_END);
        assert!(matches!(
            take_frame(&mut b, 4096),
            Err(FrameError::TooLarge { .. })
        ));
        let mut b = frame(9, 0, &[], FRAME_END);
        assert_eq!(
            take_frame(&mut b, 4096).err(),
            Some(FrameError::UnknownType(9))
        );
    }

    #[test]
    fn content_round_trips_through_frames() {
        let mut out = BytesMut::new();
        put_content(
            &mut out,
            3,
            &[0x80, 0x00, 4, b't', b'e', b'x', b't'],
            &[7u8; 300],
            128,
        );
        let h = take_frame(&mut out, 128).unwrap().unwrap();
        assert_eq!(h.kind, FRAME_HEADER);
        let ch = parse_content_header(&h.payload).unwrap();
        assert_eq!(ch.body_size, 300);
        let mut body = Vec::new();
        while let Some(f) = take_frame(&mut out, 128).unwrap() {
            assert_eq!(f.kind, FRAME_BODY);
            assert!(f.payload.len() <= 120);
            body.extend_from_slice(&f.payload);
        }
        assert_eq!(body, vec![7u8; 300]);
    }

    #[test]
    fn hand_encoded_deliver_matches_the_codec() {
        let mut out = BytesMut::new();
        put_deliver(&mut out, 7, "ctag", 42, true, "ex", "a.b");
        let f = take_frame(&mut out, 4096).unwrap().unwrap();
        assert_eq!((f.kind, f.channel), (FRAME_METHOD, 7));
        let Some(AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Deliver(d))) =
            parse_method(&f.payload)
        else {
            panic!("not a basic.deliver");
        };
        assert_eq!(d.consumer_tag.as_str(), "ctag");
        assert_eq!(d.delivery_tag, 42);
        assert!(d.redelivered);
        assert_eq!(d.exchange.as_str(), "ex");
        assert_eq!(d.routing_key.as_str(), "a.b");
        assert!(out.is_empty());
    }

    #[test]
    fn decode_stream_survives_garbage() {
        decode_stream(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 40, 0xCE]);
        decode_stream(&[
            2, 0, 1, 0, 0, 0, 14, 0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0xff, 0xff, 0xCE,
        ]);
        decode_stream(b"garbage in, nothing out");
    }
}
