//! Read-only views of the core's state for operators (the admin HTTP API and its console):
//! what a gateway never needs but a person looking at a running server does. Each type is a
//! plain snapshot, taken under the owner's lock and released at once.

use std::sync::Arc;

use tributary_proto::v1;

/// One queue message as it is now, seen without leasing it.
#[derive(Debug, Clone)]
pub struct PeekedMessage {
    /// Its offset in the queue's log.
    pub offset: i64,
    /// `ready`, `leased`, `delayed` or `moving` (being dead-lettered).
    pub state: &'static str,
    pub delivery_count: u32,
    pub record: Arc<v1::Record>,
}

/// One MQTT session.
#[derive(Debug, Clone)]
pub struct SessionSummary {
    pub namespace: String,
    pub client_id: String,
    pub connected: bool,
    /// 0 = ends with its connection, -1 = never expires.
    pub expiry_ms: i64,
    pub subscriptions: Vec<v1::SessionSubscription>,
    /// Sent and not yet acknowledged (QoS 1 and 2).
    pub inflight: usize,
    /// Waiting to be sent (receive-maximum reached, or disconnected).
    pub queued: usize,
}

/// Totals of the MQTT session broker since the process started.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionTotals {
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One router address (an AMQP exchange, an MQTT topic tree).
#[derive(Debug, Clone)]
pub struct AddressSummary {
    pub namespace: String,
    pub name: String,
    pub kind: v1::AddressKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: Vec<(String, String)>,
    pub bindings: usize,
}
