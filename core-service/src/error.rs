//! The core's errors, each with the stable [`ErrorCode`] that gateways map to their protocol.

use prost::Message;
use tributary_proto::v1::{ErrorCode, ErrorDetail};
use tributary_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("namespace '{0}' does not exist")]
    NamespaceNotFound(String),
    #[error("namespace '{0}' already exists")]
    NamespaceExists(String),
    #[error("stream '{0}' does not exist")]
    StreamNotFound(String),
    #[error("stream '{0}' already exists")]
    StreamExists(String),
    #[error("stream '{stream}' has no partition {partition} (it has {count})")]
    PartitionNotFound {
        stream: String,
        partition: u32,
        count: u32,
    },
    #[error("offset {requested} is out of range (readable {start}..{end})")]
    OffsetOutOfRange {
        requested: i64,
        start: i64,
        end: i64,
    },
    #[error("batch of {size} bytes exceeds max_message_bytes {limit}")]
    RecordTooLarge { size: usize, limit: i64 },
    #[error("producer {producer_id}: expected sequence {expected}, got {got}")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    #[error("producer {producer_id}: epoch {got} is fenced by epoch {current}")]
    ProducerFenced {
        producer_id: i64,
        got: i32,
        current: i32,
    },
    #[error("producer {0} is unknown on this partition and did not start at sequence 0")]
    UnknownProducer(i64),
    #[error("timer '{0}' does not exist")]
    TimerNotFound(String),
    #[error("group '{0}' does not exist")]
    GroupNotFound(String),
    #[error("member '{0}' is not in the group")]
    UnknownMember(String),
    #[error("generation {got} is not the group's current generation {current}")]
    IllegalGeneration { got: i32, current: i32 },
    #[error("the group is rebalancing: rejoin")]
    RebalanceInProgress,
    #[error("inconsistent group protocol: {0}")]
    InconsistentGroupProtocol(String),
    #[error("group '{0}' still has members")]
    GroupNotEmpty(String),
    #[error("queue '{0}' does not exist")]
    QueueNotFound(String),
    #[error("session not found: {0}")]
    SessionNotFound(String),
    #[error("user '{0}' does not exist")]
    UserNotFound(String),
    #[error("user '{0}' already exists")]
    UserExists(String),
    #[error("queue '{0}' already exists with a different configuration")]
    QueueExists(String),
    #[error("lease '{0}' has expired or was replaced")]
    LeaseExpired(String),
    #[error(
        "queue '{0}' is full (a max_length or max_length_bytes limit, overflow reject-publish)"
    )]
    QueueFull(String),
    #[error("address '{0}' does not exist")]
    AddressNotFound(String),
    #[error("{0}")]
    ResourceLocked(String),
    #[error("conflicting concurrent change: {0}")]
    Conflict(String),
    #[error("{0} is not supported by this version of the core")]
    Unsupported(String),
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("the core is shutting down")]
    ShuttingDown,
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error(
        "the log holds {partitions} partitions (for example {example}) but the metadata store names no stream, queue or body log: refusing to start rather than delete them; check meta, meta_url and meta_namespace (to start afresh, empty the data directory and the object store's prefix)"
    )]
    LogWithoutMetadata { partitions: usize, example: String },
    #[error("storage failure: {0}")]
    Storage(#[source] StorageError),
    #[error("internal error: {0}")]
    Internal(String),
    /// A unit asked of a core whose shard the deployment's placement does not give it: the
    /// caller routed by another placement than the node's (a bug, or a version mismatch).
    #[error("{0} is placed in shard {placed}, and this core serves shard {served}", placed = .1, served = .2)]
    WrongShard(String, u32, u32),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("invalid transaction state: {0}")]
    InvalidTxnState(String),
    #[error("concurrent transactions: {0}")]
    ConcurrentTransactions(String),
    #[error("transaction timeout {got} ms is not within 1..={max} ms (transaction_max_timeout_ms)")]
    InvalidTransactionTimeout { got: i32, max: i64 },
    #[error("invalid producer id mapping: {0}")]
    InvalidProducerIdMapping(String),
    #[error("transaction '{0}' does not exist")]
    TransactionNotFound(String),
    #[error("transaction already resolved: {0}")]
    TransactionAlreadyResolved(String),
}

impl From<StorageError> for CoreError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::OffsetOutOfRange {
                requested,
                start,
                end,
                ..
            } => Self::OffsetOutOfRange {
                requested,
                start,
                end,
            },
            StorageError::ShuttingDown => Self::ShuttingDown,
            StorageError::Corrupt { .. } => Self::Corrupt(e.to_string()),
            other => Self::Storage(other),
        }
    }
}

impl CoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NamespaceNotFound(_) => ErrorCode::NamespaceNotFound,
            Self::NamespaceExists(_) => ErrorCode::NamespaceExists,
            Self::StreamNotFound(_) => ErrorCode::StreamNotFound,
            Self::StreamExists(_) => ErrorCode::StreamExists,
            Self::PartitionNotFound { .. } => ErrorCode::PartitionNotFound,
            Self::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            Self::RecordTooLarge { .. } => ErrorCode::RecordTooLarge,
            Self::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
            Self::ProducerFenced { .. } => ErrorCode::ProducerFenced,
            Self::UnknownProducer(_) => ErrorCode::UnknownProducer,
            Self::TimerNotFound(_) => ErrorCode::TimerNotFound,
            Self::GroupNotFound(_) => ErrorCode::GroupNotFound,
            Self::UnknownMember(_) => ErrorCode::UnknownMember,
            Self::IllegalGeneration { .. } => ErrorCode::IllegalGeneration,
            Self::RebalanceInProgress => ErrorCode::RebalanceInProgress,
            Self::InconsistentGroupProtocol(_) => ErrorCode::InconsistentGroupProtocol,
            Self::GroupNotEmpty(_) => ErrorCode::GroupNotEmpty,
            Self::QueueNotFound(_) => ErrorCode::QueueNotFound,
            Self::SessionNotFound(_) => ErrorCode::SessionNotFound,
            Self::UserNotFound(_) => ErrorCode::UserNotFound,
            Self::UserExists(_) => ErrorCode::UserExists,
            Self::QueueExists(_) => ErrorCode::QueueExists,
            Self::LeaseExpired(_) => ErrorCode::LeaseExpired,
            Self::QueueFull(_) => ErrorCode::QueueFull,
            Self::AddressNotFound(_) => ErrorCode::AddressNotFound,
            Self::ResourceLocked(_) => ErrorCode::ResourceLocked,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Unsupported(_) => ErrorCode::Unsupported,
            Self::InvalidConfig(_) => ErrorCode::InvalidConfig,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::Corrupt(_) | Self::LogWithoutMetadata { .. } => ErrorCode::CorruptData,
            Self::Storage(_) => ErrorCode::StorageFailure,
            Self::Internal(_) | Self::WrongShard(..) => ErrorCode::Internal,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::InvalidTxnState(_) => ErrorCode::InvalidTxnState,
            Self::ConcurrentTransactions(_) => ErrorCode::ConcurrentTransactions,
            Self::InvalidTransactionTimeout { .. } => ErrorCode::InvalidTransactionTimeout,
            Self::InvalidProducerIdMapping(_) => ErrorCode::InvalidProducerIdMapping,
            Self::TransactionNotFound(_) => ErrorCode::TransactionNotFound,
            Self::TransactionAlreadyResolved(_) => ErrorCode::TransactionAlreadyResolved,
        }
    }

    fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument(_) | Self::RecordTooLarge { .. } | Self::InvalidConfig(_) => {
                Code::InvalidArgument
            }
            Self::NamespaceNotFound(_)
            | Self::StreamNotFound(_)
            | Self::PartitionNotFound { .. }
            | Self::TimerNotFound(_)
            | Self::GroupNotFound(_)
            | Self::QueueNotFound(_)
            | Self::SessionNotFound(_)
            | Self::UserNotFound(_)
            | Self::AddressNotFound(_)
            | Self::TransactionNotFound(_) => Code::NotFound,
            Self::NamespaceExists(_)
            | Self::StreamExists(_)
            | Self::QueueExists(_)
            | Self::UserExists(_) => Code::AlreadyExists,
            Self::LeaseExpired(_) | Self::ResourceLocked(_) | Self::WrongShard(..) => {
                Code::FailedPrecondition
            }
            Self::QueueFull(_) => Code::ResourceExhausted,
            Self::OffsetOutOfRange { .. } => Code::OutOfRange,
            Self::OutOfOrderSequence { .. }
            | Self::ProducerFenced { .. }
            | Self::UnknownProducer(_)
            | Self::UnknownMember(_)
            | Self::IllegalGeneration { .. }
            | Self::RebalanceInProgress
            | Self::InconsistentGroupProtocol(_)
            | Self::GroupNotEmpty(_)
            | Self::InvalidTxnState(_)
            | Self::InvalidProducerIdMapping(_)
            | Self::TransactionAlreadyResolved(_) => Code::FailedPrecondition,
            Self::ConcurrentTransactions(_) => Code::Aborted,
            Self::InvalidTransactionTimeout { .. } => Code::InvalidArgument,
            Self::Conflict(_) => Code::Aborted,
            Self::Unsupported(_) => Code::Unimplemented,
            Self::ShuttingDown | Self::Storage(_) => Code::Unavailable,
            Self::Corrupt(_) | Self::LogWithoutMetadata { .. } => Code::DataLoss,
            Self::Internal(_) => Code::Internal,
            Self::Unauthenticated(_) => Code::Unauthenticated,
        }
    }
}

impl From<CoreError> for tonic::Status {
    fn from(e: CoreError) -> Self {
        let code = e.code();
        let message = e.to_string();
        let detail = ErrorDetail {
            code: code as i32,
            message: message.clone(),
        };
        let mut status =
            tonic::Status::with_details(e.grpc_code(), message, detail.encode_to_vec().into());
        if let Ok(v) = code.as_str_name().parse() {
            status
                .metadata_mut()
                .insert(tributary_proto::ERROR_CODE_METADATA, v);
        }
        status
    }
}

pub type CoreResult<T> = Result<T, CoreError>;
