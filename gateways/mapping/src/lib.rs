//! The cross-protocol mapping: how a message of one protocol becomes the core's record
//! envelope and back. docs/compat/mapping.md has the table, row by row, with the test of
//! each row. Used by the gateways and wired into the core by the server (the core itself
//! links no protocol codec: it is handed [`kafka::decode_batch`] as a function).

pub mod kafka;

/// Why a message could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("malformed Kafka record batch: {0}")]
    KafkaBatch(String),
}
