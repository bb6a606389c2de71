//! Kafka record batches to envelope records.
//!
//! | Kafka | Envelope |
//! |---|---|
//! | key (null or bytes) | `key` (null and empty are both empty) |
//! | value (null or bytes) | `value` (null is empty) |
//! | headers, in order | `headers` (a null value becomes empty) |
//! | timestamp (create or log-append time) | `timestamp_ms` |
//! | - | `properties.origin_protocol = "kafka"` |
//!
//! Control batches (transaction markers) carry no records for other protocols and map to
//! none.

use bytes::Bytes;
use kafka_protocol::records::RecordBatchDecoder;
use tributary_proto::v1;

use crate::MappingError;

/// The core's name for a Kafka v2 record batch kept byte for byte.
pub const OPAQUE_FORMAT: &str = "kafka.record-batch.v2";

/// Decodes one or more stored Kafka v2 batches (decompressing them) into envelope records,
/// in offset order. Control records are left out.
pub fn decode_batch(opaque: &Bytes) -> Result<Vec<v1::Record>, MappingError> {
    let mut buf = opaque.clone();
    let sets = RecordBatchDecoder::decode_all(&mut buf)
        .map_err(|e| MappingError::KafkaBatch(e.to_string()))?;
    let mut out = Vec::new();
    for set in sets {
        for r in set.records {
            if r.control {
                continue;
            }
            out.push(v1::Record {
                key: r.key.unwrap_or_default(),
                value: r.value.unwrap_or_default(),
                headers: r
                    .headers
                    .into_iter()
                    .map(|(name, value)| v1::Header {
                        name: name.to_string(),
                        value: value.unwrap_or_default(),
                    })
                    .collect(),
                timestamp_ms: r.timestamp,
                properties: Some(v1::SystemProperties {
                    origin_protocol: "kafka".into(),
                    ..Default::default()
                }),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use indexmap::IndexMap;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    fn record(offset: i64, key: Option<&str>, value: &str, control: bool) -> Record {
        let mut headers = IndexMap::new();
        headers.insert(
            StrBytes::from_static_str("trace"),
            Some(Bytes::from_static(b"t-1")),
        );
        headers.insert(StrBytes::from_static_str("empty"), None);
        Record {
            transactional: control,
            control,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: if control { 7 } else { -1 },
            producer_epoch: if control { 0 } else { -1 },
            timestamp_type: TimestampType::Creation,
            offset,
            sequence: -1,
            timestamp: 1_700_000_000_000 + offset,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
            headers,
        }
    }

    fn encode(records: &[Record], compression: Compression) -> Bytes {
        let mut out = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut out,
            records.iter(),
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .unwrap();
        out.freeze()
    }

    #[test]
    fn compressed_batches_become_envelope_records() {
        for compression in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let bytes = encode(
                &[
                    record(0, Some("k"), "v0", false),
                    record(1, None, "v1", false),
                ],
                compression,
            );
            let got = decode_batch(&bytes).unwrap();
            assert_eq!(got.len(), 2, "{compression:?}");
            assert_eq!(got[0].key, Bytes::from_static(b"k"));
            assert_eq!(got[0].value, Bytes::from_static(b"v0"));
            assert_eq!(got[1].key, Bytes::new());
            assert_eq!(got[1].timestamp_ms, 1_700_000_000_001);
            let names: Vec<_> = got[0].headers.iter().map(|h| h.name.as_str()).collect();
            assert_eq!(names, ["trace", "empty"]);
            assert_eq!(got[0].headers[0].value, Bytes::from_static(b"t-1"));
            assert_eq!(got[0].properties.as_ref().unwrap().origin_protocol, "kafka");
        }
    }

    #[test]
    fn control_records_map_to_nothing() {
        let bytes = encode(
            &[record(5, Some("\0\0\0\x01"), "", true)],
            Compression::None,
        );
        assert!(decode_batch(&bytes).unwrap().is_empty());
    }

    #[test]
    fn truncated_and_garbage_batches_are_errors() {
        let bytes = encode(&[record(0, Some("k"), "v", false)], Compression::Gzip);
        for cut in [1, 10, 40, 61, bytes.len() - 1] {
            assert!(
                decode_batch(&bytes.slice(..cut)).is_err(),
                "a batch cut at {cut} bytes was accepted"
            );
        }
        assert!(decode_batch(&Bytes::from_static(&[0xff; 80])).is_err());
    }
}
