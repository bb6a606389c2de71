//! AMQP reply codes and how a failed command, or a refused core call, becomes one.

use tributary_gateway_common::client::error_code;
use tributary_proto::v1::ErrorCode;

pub const NO_ROUTE: u32 = 312;
pub const CONNECTION_FORCED: u32 = 320;
pub const ACCESS_REFUSED: u32 = 403;
pub const NOT_FOUND: u32 = 404;
pub const RESOURCE_LOCKED: u32 = 405;
pub const PRECONDITION_FAILED: u32 = 406;
pub const COMMAND_INVALID: u32 = 503;
pub const CHANNEL_ERROR: u32 = 504;
pub const NOT_ALLOWED: u32 = 530;
pub const NOT_IMPLEMENTED: u32 = 540;
pub const INTERNAL_ERROR: u32 = 541;

/// A failed command: closes the channel, or the connection for connection-level codes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{text}")]
pub struct Refusal {
    pub code: u32,
    pub text: String,
    pub connection: bool,
}

pub type Res<T> = Result<T, Refusal>;

pub fn refuse(code: u32, text: impl Into<String>) -> Refusal {
    let name = match code {
        CONNECTION_FORCED => "CONNECTION_FORCED",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    };
    Refusal {
        code,
        text: format!("{name} - {}", text.into()),
        connection: matches!(
            code,
            CONNECTION_FORCED
                | COMMAND_INVALID
                | CHANNEL_ERROR
                | NOT_ALLOWED
                | NOT_IMPLEMENTED
                | INTERNAL_ERROR
        ),
    }
}

pub fn no_queue(queue: &str, vhost: &str) -> Refusal {
    refuse(NOT_FOUND, format!("no queue '{queue}' in vhost '{vhost}'"))
}

pub fn no_exchange(exchange: &str, vhost: &str) -> Refusal {
    refuse(
        NOT_FOUND,
        format!("no exchange '{exchange}' in vhost '{vhost}'"),
    )
}

pub fn locked(queue: &str, vhost: &str) -> Refusal {
    refuse(
        RESOURCE_LOCKED,
        format!(
            "cannot obtain exclusive access to locked queue '{queue}' in vhost '{vhost}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
        ),
    )
}

/// What a core call's failure means to the client: the codes a broker answers with; a core
/// that is unavailable (restarting, taking over, or a cluster node that does not serve the
/// vhost's shard) closes the connection 320 CONNECTION_FORCED, as RabbitMQ does when a node
/// goes away, which clients take as "reconnect" (the Java client's automatic recovery, say);
/// the rest an internal error that closes the connection.
pub fn from_status(status: &tonic::Status) -> Refusal {
    let text = status.message().to_string();
    match error_code(status) {
        ErrorCode::ShuttingDown => refuse(
            CONNECTION_FORCED,
            format!("the core is unavailable, reconnect: {text}"),
        ),
        ErrorCode::QueueNotFound | ErrorCode::AddressNotFound | ErrorCode::NamespaceNotFound => {
            refuse(NOT_FOUND, text)
        }
        ErrorCode::ResourceLocked => refuse(RESOURCE_LOCKED, text),
        ErrorCode::Conflict
        | ErrorCode::QueueExists
        | ErrorCode::InvalidConfig
        | ErrorCode::InvalidArgument
        | ErrorCode::QueueFull
        | ErrorCode::LeaseExpired => refuse(PRECONDITION_FAILED, text),
        ErrorCode::Unsupported => refuse(NOT_IMPLEMENTED, text),
        _ => refuse(INTERNAL_ERROR, format!("the core failed: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_core_closes_the_connection_320_and_a_failure_541() {
        let r = from_status(&tonic::Status::unavailable(
            "shard 0 is not served by this node",
        ));
        assert_eq!((r.code, r.connection), (CONNECTION_FORCED, true));
        assert!(r.text.starts_with("CONNECTION_FORCED - "), "{}", r.text);
        let r = from_status(&tonic::Status::internal("disk full"));
        assert_eq!((r.code, r.connection), (INTERNAL_ERROR, true));
        let r = from_status(&tonic::Status::invalid_argument("bad"));
        assert_eq!((r.code, r.connection), (PRECONDITION_FAILED, false));
    }
}
