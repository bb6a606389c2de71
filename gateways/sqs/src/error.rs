//! SQS errors as AWS answers them: the error's shape name (the JSON protocol's `__type`,
//! from which the SDKs pick an exception class), its query-protocol code (the XML
//! `<Code>` and the `x-amzn-query-error` header, which boto3 shows as the error code), the
//! HTTP status and whose fault it is.

use http::StatusCode;

/// One failed request (or one failed batch entry).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SqsError {
    /// The JSON protocol's shape name, e.g. `QueueDoesNotExist`.
    pub shape: &'static str,
    /// The query protocol's code, e.g. `AWS.SimpleQueueService.NonExistentQueue`.
    pub code: &'static str,
    pub status: StatusCode,
    /// `Sender` (the caller's fault) or `Receiver` (ours).
    pub sender: bool,
    pub message: String,
}

macro_rules! errors {
    ($($fn:ident => $shape:literal, $code:literal, $status:expr, $sender:expr;)*) => {
        impl SqsError {
            $(
                pub fn $fn(message: impl Into<String>) -> Self {
                    Self {
                        shape: $shape,
                        code: $code,
                        status: $status,
                        sender: $sender,
                        message: message.into(),
                    }
                }
            )*
        }
    };
}

const BAD: StatusCode = StatusCode::BAD_REQUEST;
const FORBIDDEN: StatusCode = StatusCode::FORBIDDEN;

errors! {
    queue_does_not_exist => "QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", BAD, true;
    queue_name_exists => "QueueNameExists", "QueueAlreadyExists", BAD, true;
    invalid_attribute_name => "InvalidAttributeName", "InvalidAttributeName", BAD, true;
    invalid_attribute_value => "InvalidAttributeValue", "InvalidAttributeValue", BAD, true;
    invalid_parameter_value => "InvalidParameterValue", "InvalidParameterValue", BAD, true;
    missing_parameter => "MissingParameter", "MissingParameter", BAD, true;
    invalid_action => "InvalidAction", "InvalidAction", BAD, true;
    invalid_message_contents => "InvalidMessageContents", "InvalidMessageContents", BAD, true;
    batch_entry_ids_not_distinct => "BatchEntryIdsNotDistinct", "AWS.SimpleQueueService.BatchEntryIdsNotDistinct", BAD, true;
    empty_batch_request => "EmptyBatchRequest", "AWS.SimpleQueueService.EmptyBatchRequest", BAD, true;
    too_many_entries => "TooManyEntriesInBatchRequest", "AWS.SimpleQueueService.TooManyEntriesInBatchRequest", BAD, true;
    batch_request_too_long => "BatchRequestTooLong", "AWS.SimpleQueueService.BatchRequestTooLong", BAD, true;
    invalid_batch_entry_id => "InvalidBatchEntryId", "AWS.SimpleQueueService.InvalidBatchEntryId", BAD, true;
    receipt_handle_is_invalid => "ReceiptHandleIsInvalid", "ReceiptHandleIsInvalid", BAD, true;
    unsupported_operation => "UnsupportedOperation", "AWS.SimpleQueueService.UnsupportedOperation", BAD, true;
    resource_not_found => "ResourceNotFoundException", "ResourceNotFoundException", BAD, true;
    over_limit => "OverLimit", "OverLimit", FORBIDDEN, true;
    serialization => "SerializationException", "SerializationException", BAD, true;
    request_too_large => "RequestEntityTooLarge", "RequestEntityTooLarge", StatusCode::PAYLOAD_TOO_LARGE, true;
    internal => "InternalError", "InternalError", StatusCode::INTERNAL_SERVER_ERROR, false;
    unavailable => "ServiceUnavailable", "ServiceUnavailable", StatusCode::SERVICE_UNAVAILABLE, false;
    access_denied => "AccessDenied", "AccessDenied", FORBIDDEN, true;
}

impl SqsError {
    /// An error the signature check gave (its code doubles as the shape name).
    pub fn auth(code: &'static str, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            shape: code,
            code,
            status,
            sender: true,
            message: message.into(),
        }
    }

    /// `Value X for parameter P is invalid. Reason: R.`, AWS's wording.
    pub fn bad_value(parameter: &str, value: impl std::fmt::Display, reason: &str) -> Self {
        Self::invalid_parameter_value(format!(
            "Value {value} for parameter {parameter} is invalid. Reason: {reason}."
        ))
    }

    pub fn missing(parameter: &str) -> Self {
        Self::missing_parameter(format!(
            "The request must contain the parameter {parameter}."
        ))
    }

    pub fn no_queue() -> Self {
        Self::queue_does_not_exist("The specified queue does not exist.")
    }

    pub fn fault(&self) -> &'static str {
        if self.sender { "Sender" } else { "Receiver" }
    }
}

pub type SqsResult<T> = Result<T, SqsError>;
