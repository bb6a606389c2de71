//! MQTT dead letters: QoS 1/2 messages a session drops (its queue full at
//! `session_max_queued`, or their message expiry passed before they were sent) go to the
//! namespace's address named by `mqtt_dead_letter_address` when one is configured, with
//! the topic as routing key in AMQP form (`a/b` as `a.b`, as the topic exchange bridge
//! has it, topic_exchange.rs) and the reason, like any queue's dead letters: an AMQP
//! exchange, or a stream's address (a Kafka topic), and from there to queues that the
//! admin API lists and redrives (docs/compat/mapping.md); a redrive through the bridge's
//! exchange with that key reaches the topic's MQTT subscribers again.
//!
//! Sessions drop under their lock, so the broker only notes the message in a bounded
//! buffer ([`DeadLetterBuffer`]) and a task routes what it holds. This is at most once:
//! a message dropped just before a crash, or when the buffer is full, is only counted, as
//! every drop was before (`tributary_session_dropped_total`).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::warn;
use tributary_proto::v1;

use crate::topic_exchange::swap_separators;
use crate::{Core, now_ms};

/// Dead letters waiting to be routed beyond which more are only counted.
const CAPACITY: usize = 65_536;
/// Routing failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A dropped message on its way to the dead-letter address.
pub(crate) struct SessionDeadLetter {
    pub namespace: String,
    pub client_id: String,
    pub message: v1::RoutedMessage,
    /// "max-length" (the session's queue was full) or "expired".
    pub reason: &'static str,
}

/// What the sessions dropped and the router has not taken yet.
#[derive(Default)]
pub(crate) struct DeadLetterBuffer {
    held: Mutex<Vec<SessionDeadLetter>>,
    added: Notify,
}

impl DeadLetterBuffer {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Notes a dropped message; false when the buffer is full (the drop stays a drop).
    pub(crate) fn push(&self, dead: SessionDeadLetter) -> bool {
        let mut held = self.held.lock();
        if held.len() >= CAPACITY {
            metrics::counter!("tributary_session_dead_letters_total", "outcome" => "overflow")
                .increment(1);
            return false;
        }
        held.push(dead);
        drop(held);
        self.added.notify_one();
        true
    }

    fn take(&self) -> Vec<SessionDeadLetter> {
        std::mem::take(&mut *self.held.lock())
    }
}

impl Core {
    /// Routes what the sessions drop to the dead-letter address until shutdown.
    pub(crate) async fn run_session_dead_letters(
        self,
        buffer: Arc<DeadLetterBuffer>,
        address: String,
    ) {
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut warned_at: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = buffer.added.notified() => {}
                _ = shutdown.changed() => return,
            }
            let dead = buffer.take();
            // One route per namespace, records in drop order.
            let mut by_ns: Vec<(String, Vec<v1::Record>)> = Vec::new();
            let now = now_ms();
            for d in dead {
                let mut record = d.message.record.unwrap_or_default();
                let p = record.properties.get_or_insert_default();
                p.dead_letter_reason = d.reason.to_string();
                p.dead_lettered_at_ms = now;
                p.dead_letter_original_address = self
                    .inner
                    .config
                    .mqtt_exchange
                    .clone()
                    .unwrap_or_else(|| p.publish_address.clone());
                p.dead_letter_original_key = swap_separators(&p.address);
                // A session is no queue to go back to: a redrive names its destination.
                p.dead_letter_queue.clear();
                p.expires_at_ms = 0;
                record.headers.push(v1::Header {
                    name: "tributary.mqtt-client-id".into(),
                    value: d.client_id.into_bytes().into(),
                });
                match by_ns.iter_mut().find(|(ns, _)| *ns == d.namespace) {
                    Some((_, records)) => records.push(record),
                    None => by_ns.push((d.namespace, vec![record])),
                }
            }
            for (ns, records) in by_ns {
                let count = records.len() as u64;
                match self.route_dead_letters(&ns, &address, None, records).await {
                    Ok(()) => {
                        metrics::counter!("tributary_session_dead_letters_total", "outcome" => "routed")
                            .increment(count);
                    }
                    Err(e) => {
                        metrics::counter!("tributary_session_dead_letters_total", "outcome" => "failed")
                            .increment(count);
                        if warned_at.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                            warn!(namespace = %ns, address = %address, error = %e, count, "MQTT dead letters could not be routed to mqtt_dead_letter_address; they stay dropped (at most one line every 10 s; counted in tributary_session_dead_letters_total{{outcome=\"failed\"}})");
                            warned_at = Some(std::time::Instant::now());
                        }
                    }
                }
            }
        }
    }
}
