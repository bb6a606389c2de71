//! The records of fetched batches, whatever protocol wrote them: envelope records as they
//! are, Kafka batches (stored as the client sent them) decoded by the Kafka codec.

use bytes::BytesMut;
use serde_json::{Value, json};
use tributary_gateway_kafka::batch::{OPAQUE_FORMAT, append_stored, encode_envelope};
use tributary_proto::v1;

/// One record, for printing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Shown {
    pub fn json(&self) -> Value {
        json!({
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "key": self.key.as_deref().map(text),
            "value": self.value.as_deref().map(text),
            "headers": self.headers.iter().map(|(k, v)| json!({"name": k, "value": text(v)})).collect::<Vec<_>>(),
        })
    }
}

/// Bytes as text: UTF-8 as it is, anything else with its invalid bytes replaced.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every data record of `batch` (Kafka control records left out).
pub fn decode(batch: &v1::RecordBatch) -> Result<Vec<Shown>, String> {
    let mut bytes = BytesMut::new();
    if batch.opaque_format == OPAQUE_FORMAT {
        append_stored(&mut bytes, &batch.opaque, batch.base_offset);
    } else if batch.opaque.is_empty() {
        encode_envelope(&mut bytes, batch).map_err(|e| e.to_string())?;
    } else {
        return Err(format!(
            "a batch in a format this CLI does not read: {}",
            batch.opaque_format
        ));
    }
    // The encoder may split envelope records into several Kafka batches: read them all.
    let sets = kafka_protocol::records::RecordBatchDecoder::decode_all(&mut bytes.freeze())
        .map_err(|e| e.to_string())?;
    Ok(sets
        .into_iter()
        .flat_map(|set| set.records)
        .filter(|r| !r.control)
        .map(|r| Shown {
            offset: r.offset,
            timestamp_ms: r.timestamp,
            key: r.key.map(|k| k.to_vec()),
            value: r.value.map(|v| v.to_vec()),
            headers: r
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.map(|v| v.to_vec()).unwrap_or_default()))
                .collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_records_decode_with_their_offsets() {
        let batch = v1::RecordBatch {
            records: vec![
                v1::Record {
                    key: b"k".to_vec().into(),
                    value: b"v1".to_vec().into(),
                    headers: vec![v1::Header {
                        name: "h".into(),
                        value: b"x".to_vec().into(),
                    }],
                    timestamp_ms: 5,
                    properties: None,
                },
                v1::Record {
                    key: Default::default(),
                    value: b"v2".to_vec().into(),
                    headers: vec![],
                    timestamp_ms: 6,
                    properties: None,
                },
            ],
            record_count: 2,
            base_offset: 40,
            append_time_ms: 5,
            ..Default::default()
        };
        let shown = decode(&batch).unwrap();
        assert_eq!(shown.len(), 2);
        assert_eq!(shown[0].offset, 40);
        assert_eq!(shown[0].value.as_deref(), Some(&b"v1"[..]));
        assert_eq!(shown[0].headers, vec![("h".to_string(), b"x".to_vec())]);
        assert_eq!(shown[1].offset, 41);
    }
}
