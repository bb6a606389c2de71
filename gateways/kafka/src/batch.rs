//! Kafka record batches (magic 2) as the gateway stores and serves them.
//!
//! Batches are kept byte for byte as the producer sent them, compressed or not, so a fetch
//! returns exactly what was produced and the gateway never decompresses. Only the fixed
//! 61-byte header is read here. `kafka_protocol::records::RecordBatchDecoder::decode_batch_info`
//! reads the same header but returns neither each batch's byte span nor its max timestamp
//! and last offset delta, which the core needs, so the header is parsed by hand.

use bytes::{Buf, Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tributary_proto::v1;

/// Names the opaque format in the core: a Kafka v2 record batch.
pub use tributary_mapping::kafka::OPAQUE_FORMAT;

/// Bytes before the records in a v2 batch.
pub const HEADER_LEN: usize = 61;
const LENGTH_OFFSET: usize = 8;
const LEADER_EPOCH_OFFSET: usize = 12;
const MAGIC_OFFSET: usize = 16;
const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;

const TRANSACTIONAL_BIT: i16 = 1 << 4;
const CONTROL_BIT: i16 = 1 << 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("record batch truncated: {have} bytes, header says {need}")]
    Truncated { have: usize, need: usize },
    #[error("record batch magic {0} is not supported (only v2 batches)")]
    UnsupportedMagic(i8),
    #[error("record batch CRC mismatch: header {expected:#010x}, computed {actual:#010x}")]
    Crc { expected: u32, actual: u32 },
    #[error("record batch is malformed: {0}")]
    Malformed(String),
}

/// What the gateway reads off a batch header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    pub record_count: u32,
    pub max_timestamp_ms: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
    pub control: bool,
}

/// Splits `records` (the bytes of one partition in a Produce request) into batches, checking
/// each one's CRC32C and header.
pub fn split_batches(mut records: Bytes) -> Result<Vec<(BatchHeader, Bytes)>, BatchError> {
    let mut out = Vec::new();
    while !records.is_empty() {
        if records.len() < HEADER_LEN {
            return Err(BatchError::Truncated {
                have: records.len(),
                need: HEADER_LEN,
            });
        }
        let length = i32::from_be_bytes(
            records[LENGTH_OFFSET..LENGTH_OFFSET + 4]
                .try_into()
                .expect("4 bytes"),
        );
        let total = usize::try_from(length)
            .ok()
            .and_then(|l| l.checked_add(LEADER_EPOCH_OFFSET))
            .filter(|t| *t >= HEADER_LEN)
            .ok_or_else(|| BatchError::Malformed(format!("batch length {length}")))?;
        if records.len() < total {
            return Err(BatchError::Truncated {
                have: records.len(),
                need: total,
            });
        }
        let batch = records.split_to(total);
        out.push((parse_header(&batch)?, batch));
    }
    Ok(out)
}

fn parse_header(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let magic = batch[MAGIC_OFFSET] as i8;
    if magic != 2 {
        return Err(BatchError::UnsupportedMagic(magic));
    }
    let expected = u32::from_be_bytes(
        batch[CRC_OFFSET..CRC_OFFSET + 4]
            .try_into()
            .expect("4 bytes"),
    );
    let actual = crc32c::crc32c(&batch[ATTRIBUTES_OFFSET..]);
    if expected != actual {
        return Err(BatchError::Crc { expected, actual });
    }
    let mut h = &batch[ATTRIBUTES_OFFSET..HEADER_LEN];
    let attributes = h.get_i16();
    let last_offset_delta = h.get_i32();
    let _base_timestamp = h.get_i64();
    let max_timestamp = h.get_i64();
    let producer_id = h.get_i64();
    let producer_epoch = h.get_i16();
    let base_sequence = h.get_i32();
    let record_count = h.get_i32();
    if record_count <= 0 {
        return Err(BatchError::Malformed(format!(
            "record count {record_count}"
        )));
    }
    // Offsets are assigned densely by the core: a produced batch must cover exactly its
    // records (Kafka's broker refuses the same).
    if last_offset_delta != record_count - 1 {
        return Err(BatchError::Malformed(format!(
            "last offset delta {last_offset_delta} does not match {record_count} records"
        )));
    }
    Ok(BatchHeader {
        record_count: record_count as u32,
        max_timestamp_ms: max_timestamp,
        producer_id,
        producer_epoch,
        base_sequence,
        transactional: attributes & TRANSACTIONAL_BIT != 0,
        control: attributes & CONTROL_BIT != 0,
    })
}

/// Appends a stored batch to a fetch response with the offset the core assigned. The base
/// offset is outside the CRC, so the checksum stays valid.
pub fn append_stored(out: &mut BytesMut, opaque: &[u8], base_offset: i64) {
    let start = out.len();
    out.extend_from_slice(opaque);
    if opaque.len() >= HEADER_LEN {
        out[start..start + 8].copy_from_slice(&base_offset.to_be_bytes());
    }
}

/// Encodes a batch written by another protocol (envelope records) as a Kafka v2 batch, so
/// Kafka consumers read every stream whatever wrote it.
pub fn encode_envelope(out: &mut BytesMut, batch: &v1::RecordBatch) -> Result<(), BatchError> {
    if let Some(marker) = &batch.control {
        return encode_control(out, batch, marker);
    }
    let base_timestamp = batch.append_time_ms;
    let records: Vec<Record> = batch
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: batch.base_offset + i as i64,
            sequence: -1,
            timestamp: if r.timestamp_ms > 0 {
                r.timestamp_ms
            } else {
                base_timestamp
            },
            key: (!r.key.is_empty()).then(|| r.key.clone()),
            value: Some(r.value.clone()),
            headers: tributary_mapping::kafka::headers_of(r)
                .into_iter()
                .map(|(name, value)| (StrBytes::from_string(name), Some(value)))
                .collect::<IndexMap<_, _>>(),
        })
        .collect();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(out, records.iter(), &options)
        .map_err(|e| BatchError::Malformed(format!("cannot encode envelope batch: {e}")))
}

/// A transaction marker as Kafka's control batch: one record whose key is
/// (version 0, type 0 abort / 1 commit) and whose value is (version 0, coordinator epoch).
fn encode_control(
    out: &mut BytesMut,
    batch: &v1::RecordBatch,
    marker: &v1::ControlMarker,
) -> Result<(), BatchError> {
    let mut key = BytesMut::with_capacity(4);
    key.extend_from_slice(&0i16.to_be_bytes());
    key.extend_from_slice(&i16::from(marker.commit).to_be_bytes());
    let mut value = BytesMut::with_capacity(6);
    value.extend_from_slice(&0i16.to_be_bytes());
    value.extend_from_slice(&marker.coordinator_epoch.to_be_bytes());
    let record = Record {
        transactional: true,
        control: true,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: batch.producer_id,
        producer_epoch: i16::try_from(batch.producer_epoch).unwrap_or(-1),
        timestamp_type: TimestampType::Creation,
        offset: batch.base_offset,
        sequence: -1,
        timestamp: batch.append_time_ms,
        key: Some(key.freeze()),
        value: Some(value.freeze()),
        headers: IndexMap::new(),
    };
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(out, std::iter::once(&record), &options)
        .map_err(|e| BatchError::Malformed(format!("cannot encode a control batch: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    fn sample(n: usize) -> Bytes {
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: 7,
                producer_epoch: 1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: 10 + i as i32,
                timestamp: 1_000 + i as i64,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(format!("v{i}"))),
                headers: IndexMap::new(),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            records.iter(),
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        buf.freeze()
    }

    #[test]
    fn header_fields_are_read() {
        let batches = split_batches(sample(3)).unwrap();
        assert_eq!(batches.len(), 1);
        let h = &batches[0].0;
        assert_eq!(h.record_count, 3);
        assert_eq!(h.max_timestamp_ms, 1_002);
        assert_eq!(
            (h.producer_id, h.producer_epoch, h.base_sequence),
            (7, 1, 10)
        );
    }

    #[test]
    fn bad_crc_truncation_and_garbage_are_refused() {
        let good = sample(2);
        let mut bad = BytesMut::from(&good[..]);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(
            split_batches(bad.freeze()),
            Err(BatchError::Crc { .. })
        ));
        for cut in [1, 20, HEADER_LEN, good.len() - 1] {
            assert!(matches!(
                split_batches(good.slice(..cut)),
                Err(BatchError::Truncated { .. })
            ));
        }
        let mut negative = BytesMut::from(&good[..]);
        negative[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(matches!(
            split_batches(negative.freeze()),
            Err(BatchError::Malformed(_))
        ));
        let mut magic1 = BytesMut::from(&good[..]);
        magic1[MAGIC_OFFSET] = 1;
        assert_eq!(
            split_batches(magic1.freeze()),
            Err(BatchError::UnsupportedMagic(1))
        );
    }

    #[test]
    fn stored_batches_get_their_offsets_and_stay_valid() {
        let mut out = BytesMut::new();
        append_stored(&mut out, &sample(2), 40);
        let set = RecordBatchDecoder::decode(&mut out.freeze()).unwrap();
        let offsets: Vec<i64> = set.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![40, 41]);
    }

    #[test]
    fn transaction_markers_become_control_batches() {
        let marker = v1::RecordBatch {
            records: vec![v1::Record::default()],
            record_count: 1,
            producer_id: 42,
            producer_epoch: 3,
            base_offset: 17,
            append_time_ms: 1_700_000_000_000,
            transactional: true,
            control: Some(v1::ControlMarker {
                commit: true,
                coordinator_epoch: 0,
            }),
            ..Default::default()
        };
        let mut out = BytesMut::new();
        encode_envelope(&mut out, &marker).unwrap();
        let bytes = out.freeze();
        let (header, _) = split_batches(bytes.clone()).unwrap().remove(0);
        assert!(header.control && header.transactional);
        assert_eq!((header.producer_id, header.producer_epoch), (42, 3));
        let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes.clone()).unwrap();
        let rec = &set.records[0];
        assert_eq!(rec.offset, 17);
        assert_eq!(rec.key.as_deref(), Some(&[0u8, 0, 0, 1][..]));
    }

    #[test]
    fn envelope_batches_become_kafka_batches() {
        let batch = v1::RecordBatch {
            records: vec![v1::Record {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"hello"),
                headers: vec![v1::Header {
                    name: "h".into(),
                    value: Bytes::from_static(b"x"),
                }],
                timestamp_ms: 5,
                properties: None,
            }],
            base_offset: 9,
            ..Default::default()
        };
        let mut out = BytesMut::new();
        encode_envelope(&mut out, &batch).unwrap();
        let set = RecordBatchDecoder::decode(&mut out.freeze()).unwrap();
        assert_eq!(set.records[0].offset, 9);
        assert_eq!(set.records[0].value.as_deref(), Some(&b"hello"[..]));
        assert_eq!(set.records[0].timestamp, 5);
    }
}
