//! The "commit-log offset" of a message. RocketMQ clients treat it as an opaque 64-bit
//! position (in message ids, `CONSUMER_SEND_MSG_BACK`, `VIEW_MESSAGE_BY_ID`); here it names
//! a record of the core: 15 bits of a hash of the stream name, 8 bits of partition and 40
//! bits of offset. A lookup checks the hash against the candidate streams.

const OFFSET_BITS: u32 = 40;
const PARTITION_BITS: u32 = 8;

/// FNV-1a of the name, folded to 15 bits (the sign bit stays clear).
pub fn stream_hash(stream: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in stream.as_bytes() {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    ((h ^ (h >> 15)) & 0x7fff) as u16
}

pub fn encode(stream: &str, partition: u32, offset: i64) -> i64 {
    ((stream_hash(stream) as i64) << (OFFSET_BITS + PARTITION_BITS))
        | (((partition & 0xff) as i64) << OFFSET_BITS)
        | (offset & ((1i64 << OFFSET_BITS) - 1))
}

/// (stream hash, partition, offset).
pub fn decode(position: i64) -> (u16, u32, i64) {
    (
        ((position >> (OFFSET_BITS + PARTITION_BITS)) & 0x7fff) as u16,
        ((position >> OFFSET_BITS) & 0xff) as u32,
        position & ((1i64 << OFFSET_BITS) - 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_stay_positive() {
        for (s, p, o) in [
            ("TopicTest", 0, 0),
            ("%RETRY%g", 255, (1 << 40) - 1),
            ("x", 7, 12345),
        ] {
            let pos = encode(s, p, o);
            assert!(pos >= 0);
            assert_eq!(decode(pos), (stream_hash(s), p, o));
        }
        assert_ne!(stream_hash("a"), stream_hash("b"));
    }
}
