//! Kafka record batches to envelope records.
//!
//! | Kafka | Envelope |
//! |---|---|
//! | key (null or bytes) | `key` (null and empty are both empty) |
//! | value (null or bytes) | `value` (null is empty) |
//! | headers, in order | `headers` (a null value becomes empty) |
//! | timestamp (create or log-append time) | `timestamp_ms` |
//! | - | `properties.origin_protocol = "kafka"` |
//! | header `tributary.deliver-at-ms` (decimal ms since the epoch) | `properties.deliver_at_ms` |
//! | header `tributary.delay-ms` (decimal ms after the record's timestamp) | `properties.deliver_at_ms` |
//!
//! The delivery-time headers are kept as they are and only mean something on a delay line
//! (a topic with `tributary.delay.target.topic`, docs/compat/mapping.md). A value that is
//! not a decimal number is ignored (the record is due at once); `deliver-at-ms` wins when
//! both are there.
//!
//! Control batches (transaction markers) carry no records for other protocols and map to
//! none.
//!
//! Envelope records to Kafka: key, value, headers and timestamp as above, and the system
//! properties Kafka has no field for as named headers after the record's own
//! ([`PROPERTY_HEADERS`]; only those that are set, and not when the record already has a
//! header of that name).

use bytes::Bytes;
use kafka_protocol::records::RecordBatchDecoder;
use tributary_proto::v1;

use crate::MappingError;

/// The core's name for a Kafka v2 record batch kept byte for byte.
pub const OPAQUE_FORMAT: &str = "kafka.record-batch.v2";

/// The envelope properties a Kafka record carries as headers, by header name.
pub const PROPERTY_HEADERS: [&str; 3] = [
    "tributary.content-type",
    "tributary.correlation-id",
    "tributary.reply-to",
];

/// Header naming a record's delivery time, in ms since the Unix epoch (a decimal string).
pub const DELIVER_AT_HEADER: &str = "tributary.deliver-at-ms";
/// Header naming a record's delay, in ms after its timestamp (a decimal string).
pub const DELAY_HEADER: &str = "tributary.delay-ms";

/// The delivery time a record's headers ask for (0: none), relative delays counted from
/// `timestamp` (or from `now` when the record has none).
pub fn deliver_at<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    timestamp: i64,
    now: i64,
) -> i64 {
    let number = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    let (mut at, mut delay) = (None, None);
    for (name, value) in headers {
        match name {
            DELIVER_AT_HEADER => at = at.or(number(value)),
            DELAY_HEADER => delay = delay.or(number(value)),
            _ => {}
        }
    }
    match (at, delay) {
        (Some(at), _) => at.max(0),
        (None, Some(d)) => {
            let base = if timestamp > 0 { timestamp } else { now };
            base.saturating_add(d.max(0))
        }
        (None, None) => 0,
    }
}

/// A record's headers as a Kafka consumer sees them: its own, then the properties of
/// [`PROPERTY_HEADERS`] that are set.
pub fn headers_of(record: &v1::Record) -> Vec<(String, Bytes)> {
    let mut out: Vec<(String, Bytes)> = record
        .headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect();
    let Some(p) = &record.properties else {
        return out;
    };
    let values = [
        Bytes::copy_from_slice(p.content_type.as_bytes()),
        p.correlation_id.clone(),
        Bytes::copy_from_slice(p.reply_to.as_bytes()),
    ];
    for (name, value) in PROPERTY_HEADERS.iter().zip(values) {
        if !value.is_empty() && !record.headers.iter().any(|h| h.name == *name) {
            out.push((name.to_string(), value));
        }
    }
    out
}

/// Decodes one or more stored Kafka v2 batches (decompressing them) into envelope records,
/// in offset order. Control records are left out.
pub fn decode_batch(opaque: &Bytes) -> Result<Vec<v1::Record>, MappingError> {
    let mut buf = opaque.clone();
    let sets = RecordBatchDecoder::decode_all(&mut buf)
        .map_err(|e| MappingError::KafkaBatch(e.to_string()))?;
    let mut out = Vec::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for set in sets {
        for r in set.records {
            if r.control {
                continue;
            }
            let deliver_at_ms = deliver_at(
                r.headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_deref().unwrap_or_default())),
                r.timestamp,
                now,
            );
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
                    deliver_at_ms,
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

    #[test]
    fn delivery_time_headers() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            pairs
                .iter()
                .map(|(n, v)| (*n, v.as_bytes()))
                .collect::<Vec<_>>()
        };
        assert_eq!(deliver_at(h(&[]), 100, 5), 0);
        assert_eq!(
            deliver_at(h(&[(DELIVER_AT_HEADER, "1700000000000")]), 1, 5),
            1_700_000_000_000
        );
        assert_eq!(deliver_at(h(&[(DELAY_HEADER, "250")]), 1_000, 5), 1_250);
        assert_eq!(deliver_at(h(&[(DELAY_HEADER, " 250 ")]), 0, 5), 255);
        assert_eq!(
            deliver_at(
                h(&[(DELAY_HEADER, "10"), (DELIVER_AT_HEADER, "7")]),
                1_000,
                5
            ),
            7
        );
        assert_eq!(deliver_at(h(&[(DELAY_HEADER, "soon")]), 1_000, 5), 0);
        assert_eq!(deliver_at(h(&[(DELAY_HEADER, "-4")]), 1_000, 5), 1_000);
        assert_eq!(deliver_at(h(&[("other", "9")]), 1_000, 5), 0);
    }
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
    fn properties_without_a_kafka_field_become_named_headers() {
        let record = v1::Record {
            headers: vec![
                v1::Header {
                    name: "site".into(),
                    value: Bytes::from_static(b"north"),
                },
                v1::Header {
                    name: "tributary.reply-to".into(),
                    value: Bytes::from_static(b"own"),
                },
            ],
            properties: Some(v1::SystemProperties {
                content_type: "text/plain".into(),
                correlation_id: Bytes::from_static(b"c1"),
                reply_to: "replies".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let got: Vec<_> = headers_of(&record)
            .into_iter()
            .map(|(n, v)| (n, String::from_utf8(v.to_vec()).unwrap()))
            .collect();
        let want = [
            ("site", "north"),
            ("tributary.reply-to", "own"),
            ("tributary.content-type", "text/plain"),
            ("tributary.correlation-id", "c1"),
        ];
        assert_eq!(
            got,
            want.map(|(n, v)| (n.to_string(), v.to_string())).to_vec()
        );
        assert!(headers_of(&v1::Record::default()).is_empty());
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
