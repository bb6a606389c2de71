//! Redrive: a task that moves messages out of a (dead-letter) queue, back to the queue each
//! came from or to a named one, reporting progress, cancellable. Each message is enqueued
//! to its target before it is acked in the source (at least once).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{info, warn};
use tributary_proto::v1;

use super::delivery::EnqueueMode;
use crate::error::{CoreError, CoreResult};
use crate::{Core, now_ms};

const BATCH: u32 = 100;
/// How long a message being moved stays leased in the source.
const MOVE_LEASE_MS: i64 = 60_000;

pub(crate) struct Task {
    id: String,
    source: v1::QueueId,
    destination: String,
    destination_address: String,
    destination_key: String,
    status: Mutex<(&'static str, String)>,
    moved: AtomicI64,
    to_move: i64,
    started_at_ms: i64,
    cancelled: AtomicBool,
}

impl Task {
    fn to_proto(&self) -> v1::RedriveTask {
        let (status, failure) = self.status.lock().clone();
        v1::RedriveTask {
            task_id: self.id.clone(),
            source: Some(self.source.clone()),
            destination: self.destination.clone(),
            destination_address: self.destination_address.clone(),
            destination_key: self.destination_key.clone(),
            status: status.into(),
            moved: self.moved.load(Ordering::Acquire),
            to_move: self.to_move,
            failure_reason: failure,
            started_at_ms: self.started_at_ms,
        }
    }
    fn running(&self) -> bool {
        matches!(self.status.lock().0, "RUNNING" | "CANCELLING")
    }
}

impl Core {
    pub async fn start_redrive(&self, req: v1::StartRedriveRequest) -> CoreResult<String> {
        self.check_running()?;
        let mut source = req
            .source
            .ok_or_else(|| CoreError::InvalidArgument("source is required".into()))?;
        let h = self.queue(&source)?;
        source.namespace = h.record.namespace.clone();
        if !req.destination_address.is_empty() {
            if !req.destination.is_empty() {
                return Err(CoreError::InvalidArgument(
                    "a redrive goes to a destination queue or through a destination address, not both".into(),
                ));
            }
            self.require_address(&source.namespace, &req.destination_address)?;
        } else if !req.destination_key.is_empty() {
            return Err(CoreError::InvalidArgument(
                "a destination key needs a destination address".into(),
            ));
        }
        if !req.destination.is_empty() {
            self.queue(&v1::QueueId {
                namespace: source.namespace.clone(),
                name: req.destination.clone(),
            })?;
        }
        let tasks = &self.inner.queues.redrives;
        if tasks
            .lock()
            .values()
            .any(|t| t.running() && t.source == source)
        {
            return Err(CoreError::Conflict(format!(
                "a redrive of queue '{}' is already running",
                source.name
            )));
        }
        let info = self.queue_info(&h).await;
        let task = Arc::new(Task {
            id: format!("r-{:016x}", rand::random::<u64>()),
            source,
            destination: req.destination,
            destination_address: req.destination_address,
            destination_key: req.destination_key,
            status: Mutex::new(("RUNNING", String::new())),
            moved: AtomicI64::new(0),
            to_move: info.messages_ready + info.messages_delayed,
            started_at_ms: now_ms(),
            cancelled: AtomicBool::new(false),
        });
        tasks.lock().insert(task.id.clone(), task.clone());
        let core = self.clone();
        let rate = req.max_messages_per_second;
        let id = task.id.clone();
        tokio::spawn(async move {
            let outcome = core.run_redrive(&task, rate).await;
            let mut status = task.status.lock();
            *status = match outcome {
                Ok(()) if task.cancelled.load(Ordering::Acquire) => ("CANCELLED", String::new()),
                Ok(()) => ("COMPLETED", String::new()),
                Err(e) => {
                    warn!(task = %task.id, error = %e, "redrive failed");
                    ("FAILED", e.to_string())
                }
            };
            info!(task = %task.id, moved = task.moved.load(Ordering::Acquire), status = status.0, "redrive ended");
        });
        Ok(id)
    }

    async fn run_redrive(&self, task: &Task, rate: u32) -> CoreResult<()> {
        let started = tokio::time::Instant::now();
        // A paced move takes no more than a second's worth at a time: the rest stay visible
        // in the source (and counted there) until their turn.
        let batch = if rate > 0 { rate.min(BATCH) } else { BATCH };
        while !task.cancelled.load(Ordering::Acquire) {
            let got = self
                .receive(v1::ReceiveRequest {
                    queue: Some(task.source.clone()),
                    max_messages: batch,
                    visibility_timeout_ms: MOVE_LEASE_MS,
                    wait_time_ms: 0,
                    consumer: format!("redrive {}", task.id),
                    no_wait_durable: false,
                })
                .await?;
            if got.is_empty() {
                return Ok(());
            }
            let mut got = got.into_iter();
            while let Some(m) = got.next() {
                if task.cancelled.load(Ordering::Acquire) {
                    // Cancelled mid-batch: what was not moved goes back at once.
                    let rest: Vec<String> = std::iter::once(m.lease_id)
                        .chain(got.map(|m| m.lease_id))
                        .collect();
                    self.nack(&task.source, &rest, true, 0).await?;
                    return Ok(());
                }
                let mut record = m.record.unwrap_or_default();
                let p = record.properties.get_or_insert_default();
                if !task.destination_address.is_empty() {
                    let key = if task.destination_key.is_empty() {
                        p.dead_letter_original_key.clone()
                    } else {
                        task.destination_key.clone()
                    };
                    clear_dead_letter(p);
                    // Through the MQTT bridge's exchange, MQTT subscribers take it too.
                    let sessions = self
                        .deliver_exchange_publish_to_sessions(
                            &task.source.namespace,
                            &task.destination_address,
                            &key,
                            std::slice::from_ref(&record),
                        )
                        .await;
                    let routed = self
                        .route_records(
                            &task.source.namespace,
                            &task.destination_address,
                            &key,
                            vec![record],
                            EnqueueMode::Internal,
                        )
                        .await?;
                    if routed.first().copied().unwrap_or(0) + sessions == 0 {
                        // Never a silent drop: the message stays, the task says why.
                        self.nack(&task.source, &[m.lease_id], true, 0).await?;
                        return Err(CoreError::InvalidArgument(format!(
                            "message {} routes nowhere through address '{}' with key '{}'",
                            m.message_id, task.destination_address, key
                        )));
                    }
                    self.ack(&task.source, &[m.lease_id]).await?;
                    self.pace_redrive(task, started, rate).await;
                    continue;
                }
                let target = if task.destination.is_empty() {
                    p.dead_letter_queue.clone()
                } else {
                    task.destination.clone()
                };
                if target.is_empty() {
                    self.nack(&task.source, &[m.lease_id], true, 0).await?;
                    return Err(CoreError::InvalidArgument(format!(
                        "message {} has no source queue to go back to; give a destination",
                        m.message_id
                    )));
                }
                clear_dead_letter(p);
                let dest = self.queue(&v1::QueueId {
                    namespace: task.source.namespace.clone(),
                    name: target,
                })?;
                self.enqueue_records(&dest, vec![record], EnqueueMode::Internal, None)
                    .await?;
                self.ack(&task.source, &[m.lease_id]).await?;
                self.pace_redrive(task, started, rate).await;
            }
        }
        Ok(())
    }

    /// Counts a moved message; with a rate, waits until the average is back at it (pacing,
    /// not synchronisation).
    async fn pace_redrive(&self, task: &Task, started: tokio::time::Instant, rate: u32) {
        let moved = task.moved.fetch_add(1, Ordering::AcqRel) + 1;
        if rate > 0 {
            let due = started + Duration::from_secs_f64(moved as f64 / f64::from(rate));
            tokio::time::sleep_until(due).await;
        }
    }

    pub fn list_redrives(&self, source: Option<&v1::QueueId>) -> Vec<v1::RedriveTask> {
        let mut out: Vec<_> = self
            .inner
            .queues
            .redrives
            .lock()
            .values()
            .filter(|t| source.is_none_or(|s| s.name == t.source.name))
            .map(|t| t.to_proto())
            .collect();
        out.sort_by_key(|t| t.started_at_ms);
        out
    }

    pub fn cancel_redrive(&self, task_id: &str) -> CoreResult<v1::RedriveTask> {
        let tasks = self.inner.queues.redrives.lock();
        let t = tasks.get(task_id).ok_or_else(|| {
            CoreError::InvalidArgument(format!("no redrive task '{}'", task_id.escape_debug()))
        })?;
        t.cancelled.store(true, Ordering::Release);
        {
            let mut status = t.status.lock();
            if status.0 == "RUNNING" {
                status.0 = "CANCELLING";
            }
        }
        Ok(t.to_proto())
    }
}

/// A message leaving its dead-letter queue is no dead letter any more.
fn clear_dead_letter(p: &mut v1::SystemProperties) {
    p.dead_letter_reason.clear();
    p.dead_letter_queue.clear();
    p.dead_lettered_at_ms = 0;
    p.dead_letter_delivery_count = 0;
}
