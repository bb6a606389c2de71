//! The gateway's own errors, and the mapping of core errors to Kafka error codes.

use kafka_protocol::error::ResponseError as K;
use tributary_gateway_common::client::error_code;
use tributary_proto::v1::ErrorCode;

/// Why a connection is closed. Each is logged once; other connections are not affected.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("request of {size} bytes exceeds socket.request.max.bytes {limit}")]
    TooLarge { size: i64, limit: usize },
    #[error("request frame of {0} bytes is too short for a request header")]
    ShortFrame(usize),
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("unsupported version {version} of {api:?}")]
    UnsupportedVersion {
        api: kafka_protocol::messages::ApiKey,
        version: i16,
    },
    #[error("cannot decode {api:?} v{version}: {reason}")]
    Decode {
        api: kafka_protocol::messages::ApiKey,
        version: i16,
        reason: String,
    },
    #[error("cannot encode the response to {api:?} v{version}: {reason}")]
    Encode {
        api: kafka_protocol::messages::ApiKey,
        version: i16,
        reason: String,
    },
    #[error("{0:?} before SASL authentication completed")]
    Unauthenticated(kafka_protocol::messages::ApiKey),
    #[error("SASL authentication failed: {0}")]
    AuthenticationFailed(String),
}

/// Where a core error surfaces: some core codes map differently per request kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Produce,
    Fetch,
    Group,
    Admin,
    InitProducer {
        version: i16,
    },
    /// A call to the transaction coordinator (AddPartitionsToTxn, AddOffsetsToTxn,
    /// TxnOffsetCommit, EndTxn) at this request version.
    Txn {
        version: i16,
    },
}

/// The Kafka error code for a failed core call.
pub fn kafka_error(status: &tonic::Status, ctx: Context) -> i16 {
    kafka_code(error_code(status), ctx)
}

pub fn kafka_code(code: ErrorCode, ctx: Context) -> i16 {
    let e = match code {
        ErrorCode::Unspecified => return 0,
        ErrorCode::StreamNotFound | ErrorCode::PartitionNotFound => K::UnknownTopicOrPartition,
        ErrorCode::NamespaceNotFound => K::UnknownTopicOrPartition,
        ErrorCode::OffsetOutOfRange => K::OffsetOutOfRange,
        ErrorCode::RecordTooLarge => K::MessageTooLarge,
        ErrorCode::OutOfOrderSequence => K::OutOfOrderSequenceNumber,
        ErrorCode::ProducerFenced => match ctx {
            Context::InitProducer { version } if version >= 4 => K::ProducerFenced,
            // KIP-588: coordinator calls of these versions know PRODUCER_FENCED.
            Context::Txn { version } if version >= 2 => K::ProducerFenced,
            _ => K::InvalidProducerEpoch,
        },
        ErrorCode::UnknownProducer => K::UnknownProducerId,
        ErrorCode::StreamExists => K::TopicAlreadyExists,
        ErrorCode::InvalidConfig => K::InvalidConfig,
        ErrorCode::InvalidArgument => match ctx {
            Context::Admin => K::InvalidRequest,
            Context::Group => K::InvalidGroupId,
            _ => K::InvalidRequest,
        },
        ErrorCode::GroupNotFound => K::GroupIdNotFound,
        ErrorCode::UnknownMember => K::UnknownMemberId,
        ErrorCode::IllegalGeneration => K::IllegalGeneration,
        ErrorCode::RebalanceInProgress => K::RebalanceInProgress,
        ErrorCode::InconsistentGroupProtocol => K::InconsistentGroupProtocol,
        ErrorCode::GroupNotEmpty => K::NonEmptyGroup,
        ErrorCode::Conflict => K::ConcurrentTransactions,
        ErrorCode::CorruptData => K::CorruptMessage,
        // Retriable: the client refreshes metadata and tries again, which is right when
        // the core restarts or is briefly unreachable.
        ErrorCode::ShuttingDown | ErrorCode::StorageFailure => match ctx {
            Context::Group | Context::Txn { .. } => K::CoordinatorNotAvailable,
            Context::Produce | Context::Fetch => K::NotLeaderOrFollower,
            _ => K::RequestTimedOut,
        },
        ErrorCode::Unsupported => K::UnsupportedVersion,
        ErrorCode::UserNotFound => K::ResourceNotFound,
        ErrorCode::InvalidTxnState => K::InvalidTxnState,
        ErrorCode::ConcurrentTransactions => K::ConcurrentTransactions,
        ErrorCode::InvalidTransactionTimeout => K::InvalidTransactionTimeout,
        ErrorCode::InvalidProducerIdMapping => K::InvalidProducerIdMapping,
        ErrorCode::NamespaceExists
        | ErrorCode::QueueNotFound
        | ErrorCode::QueueExists
        | ErrorCode::TimerNotFound
        | ErrorCode::LeaseExpired
        | ErrorCode::QueueFull
        | ErrorCode::AddressNotFound
        | ErrorCode::SessionTakenOver
        | ErrorCode::TransactionNotFound
        | ErrorCode::TransactionAlreadyResolved
        | ErrorCode::BindingNotFound
        | ErrorCode::Unauthenticated
        | ErrorCode::ResourceLocked
        | ErrorCode::AdministrativeAction
        | ErrorCode::SessionNotFound
        | ErrorCode::UserExists
        | ErrorCode::Internal => K::UnknownServerError,
    };
    e.code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotence_errors_map_to_kafkas() {
        assert_eq!(
            kafka_code(ErrorCode::OutOfOrderSequence, Context::Produce),
            45
        );
        assert_eq!(kafka_code(ErrorCode::ProducerFenced, Context::Produce), 47);
        assert_eq!(
            kafka_code(
                ErrorCode::ProducerFenced,
                Context::InitProducer { version: 4 }
            ),
            90
        );
        assert_eq!(kafka_code(ErrorCode::RecordTooLarge, Context::Produce), 10);
        assert_eq!(kafka_code(ErrorCode::Unspecified, Context::Produce), 0);
    }
}
