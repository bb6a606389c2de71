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

/// A consumer group's position in one partition.
#[derive(Debug, Clone)]
pub struct PartitionLag {
    pub stream: String,
    pub partition: u32,
    /// -1: nothing committed.
    pub committed: i64,
    pub commit_time_ms: i64,
    /// The partition's end offset; `None` when the stream or partition is gone.
    pub end: Option<i64>,
    /// Records between the committed offset (the log start when nothing is committed) and
    /// the end, never below 0; `None` when the partition is gone.
    pub lag: Option<i64>,
}

impl crate::Core {
    /// Every consumer group of `namespace` with its lag per committed partition; each stream
    /// is described once however many groups read it. The one lag rule of the admin API and
    /// the metrics.
    pub async fn group_lags(
        &self,
        namespace: &str,
    ) -> crate::CoreResult<Vec<(v1::GroupSummary, Vec<PartitionLag>)>> {
        let mut bounds: std::collections::HashMap<String, Vec<v1::PartitionInfo>> =
            std::collections::HashMap::new();
        let mut out = Vec::new();
        for g in self.list_groups(namespace).await? {
            let committed = self
                .fetch_offsets(v1::FetchOffsetsRequest {
                    namespace: namespace.to_string(),
                    group: g.group.clone(),
                    partitions: vec![],
                    require_stable: false,
                })
                .await?;
            let mut lags = Vec::with_capacity(committed.len());
            for c in committed {
                let stream = c.stream.map(|id| id.name).unwrap_or_default();
                if !bounds.contains_key(&stream) {
                    let info = self
                        .describe_stream(&v1::StreamId::new(namespace, &stream))
                        .await
                        .map(|s| s.partition_info)
                        .unwrap_or_default();
                    bounds.insert(stream.clone(), info);
                }
                let partition = bounds[&stream].iter().find(|p| p.partition == c.partition);
                let end = partition.map(|p| p.end_offset);
                let lag = partition.map(|p| {
                    let from = if c.offset < 0 {
                        p.start_offset
                    } else {
                        c.offset
                    };
                    (p.end_offset - from).max(0)
                });
                lags.push(PartitionLag {
                    stream,
                    partition: c.partition,
                    committed: c.offset,
                    commit_time_ms: c.commit_time_ms,
                    end,
                    lag,
                });
            }
            out.push((g, lags));
        }
        Ok(out)
    }
}
