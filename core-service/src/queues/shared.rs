//! Store once: a publish routed to several queues writes its records once, into its
//! namespace's shared body log, and each queue's log gets a reference (offset, count).
//!
//! Order: a fan-out appends its body and every reference under the namespace's order lock
//! (appends only; durability is awaited after), so within each queue references follow the
//! body log. The first reference at or after a queue's floor is therefore the oldest body
//! that queue still needs, and the body log is cut below the oldest such body of all
//! queues ([`Core::collect_shared_bodies`]).
//!
//! A reference can become durable before its body (two partitions, two fsyncs): a reader
//! that meets a body not yet readable waits for the publish to finish. After a crash, a
//! reference whose body never became durable belongs to a publish that was never
//! acknowledged; readers skip it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use tracing::{debug, warn};
use tributary_proto::v1;
use tributary_storage::{BatchToAppend, PartitionKey};

use super::delivery::{EnqueueMode, PendingEnqueue};
use super::{QueueHandle, decode_batch};
use crate::error::{CoreError, CoreResult};
use crate::log_intents::LogChange;
use crate::meta;
use crate::{Core, now_ms};

pub(crate) const SHARED_KEY: &str = "sharedbodies";
/// Decoded body batches kept for the other queues of a fan-out, which read them soon after:
/// at most this many, and at most this many bytes of values.
const CACHE_BATCHES: usize = 512;
const CACHE_BYTES: usize = 64 << 20;
/// How often the body log is cut behind the oldest body any queue still needs.
const COLLECT_EVERY: Duration = Duration::from_secs(5);

/// One namespace's shared body log.
pub(crate) struct SharedBodies {
    pub key: PartitionKey,
    /// Held while a fan-out appends its body and its references; see the module docs.
    order: tokio::sync::Mutex<()>,
    /// Bodies appended whose references are not all durable yet (by body offset).
    in_flight: Mutex<BTreeSet<i64>>,
    /// The durable end when the log was opened: references to bodies at or beyond it, in
    /// queue batches written before the open, are from publishes lost in a crash.
    end_at_open: i64,
    cache: Mutex<BodyCache>,
}

/// Decoded bodies by body offset, oldest first out, with their size.
#[derive(Default)]
struct BodyCache {
    bodies: HashMap<i64, (Arc<Vec<v1::Record>>, usize)>,
    order: VecDeque<i64>,
    bytes: usize,
}

impl BodyCache {
    fn get(&self, offset: i64) -> Option<Arc<Vec<v1::Record>>> {
        self.bodies.get(&offset).map(|(b, _)| b.clone())
    }

    fn insert(&mut self, offset: i64, records: Arc<Vec<v1::Record>>) {
        let size: usize = records.iter().map(|r| r.value.len() + r.key.len()).sum();
        if size > CACHE_BYTES || self.bodies.contains_key(&offset) {
            return;
        }
        while self.order.len() >= CACHE_BATCHES || self.bytes + size > CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, n)) = self.bodies.remove(&old) {
                self.bytes -= n;
            }
        }
        self.bodies.insert(offset, (records, size));
        self.order.push_back(offset);
        self.bytes += size;
    }
}

/// A shared enqueue appended and not yet durable (see [`Core::enqueue_shared_append`]).
pub(crate) struct SharedPending {
    shared: Arc<SharedBodies>,
    queues: Vec<Arc<QueueHandle>>,
    base: i64,
    n: i64,
    pending: Vec<CoreResult<PendingEnqueue>>,
}

/// Where a queue's search for its oldest body reference stands.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RefScan {
    /// Queue batches before this offset have been looked at.
    scanned_to: i64,
    /// The first reference found at or after the floor: (queue offset after it, body offset).
    first: Option<(i64, i64)>,
}

/// What reading a reference gives.
pub(crate) enum Body {
    Ready(Arc<Vec<v1::Record>>),
    /// Not durable yet: its publish is still in progress.
    Pending,
    /// Never became durable (a crash before the publish was acknowledged).
    Lost,
}

impl Core {
    /// The namespace's shared body log, made on first use.
    async fn shared_bodies(&self, ns: &str) -> CoreResult<Arc<SharedBodies>> {
        if let Some(s) = self.inner.queues.shared.read().get(ns) {
            return Ok(s.clone());
        }
        let _admin = self.inner.admin.lock().await;
        if let Some(s) = self.inner.queues.shared.read().get(ns) {
            return Ok(s.clone());
        }
        let id = self.next_counter("stream_id").await?;
        let key = PartitionKey::new(id, 0);
        self.begin_log_change(id, LogChange::Create).await?;
        self.inner.log.create_partition(key).await?;
        self.inner
            .meta
            .put(&meta::key(SHARED_KEY, &[ns]), &id.to_le_bytes())
            .await?;
        self.end_log_change(id).await?;
        let s = self.open_shared_bodies(ns, key, 0);
        self.start_shared_body_collector(ns);
        Ok(s)
    }

    fn open_shared_bodies(&self, ns: &str, key: PartitionKey, end: i64) -> Arc<SharedBodies> {
        let s = Arc::new(SharedBodies {
            key,
            order: tokio::sync::Mutex::new(()),
            in_flight: Mutex::new(BTreeSet::new()),
            end_at_open: end,
            cache: Mutex::new(BodyCache::default()),
        });
        self.inner
            .queues
            .shared
            .write()
            .insert(ns.to_string(), s.clone());
        s
    }

    /// Starts the task that cuts the namespace's body log every [`COLLECT_EVERY`]. Not
    /// before every queue is open: a queue it does not see keeps no body from being cut.
    pub(super) fn start_shared_body_collector(&self, ns: &str) {
        let core = self.clone();
        let ns = ns.to_string();
        let task = tokio::spawn(async move {
            let mut shutdown = core.inner.shutdown.subscribe();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(COLLECT_EVERY) => {}
                    _ = shutdown.changed() => return,
                }
                if let Err(e) = core.collect_shared_bodies(&ns).await {
                    warn!(namespace = %ns, error = %e, "could not cut the shared body log");
                }
            }
        });
        self.inner.tasks.lock().push(task);
    }

    /// The shared body logs of every namespace, at start-up (their collectors start with
    /// the queues' owner tasks, see [`Core::start_queue_tasks`]).
    pub(crate) async fn recover_shared_bodies(&self) -> CoreResult<()> {
        for (key, raw) in self
            .inner
            .meta
            .scan_prefix(&meta::key(SHARED_KEY, &[]), usize::MAX)
            .await?
        {
            let ns = meta::parts(SHARED_KEY, &key).remove(0);
            let id = u64::from_le_bytes(
                raw[..]
                    .try_into()
                    .map_err(|_| CoreError::Corrupt("shared body log id".into()))?,
            );
            let pk = PartitionKey::new(id, 0);
            self.inner.log.create_partition(pk).await?;
            let end = self.inner.log.bounds(pk).await?.end_offset;
            self.open_shared_bodies(&ns, pk, end);
        }
        Ok(())
    }

    /// The log partitions of the shared body logs (so start-up does not take them for
    /// orphans).
    pub(crate) async fn shared_body_partitions(&self) -> CoreResult<Vec<PartitionKey>> {
        let mut out = Vec::new();
        for (_, raw) in self
            .inner
            .meta
            .scan_prefix(&meta::key(SHARED_KEY, &[]), usize::MAX)
            .await?
        {
            if let Ok(b) = raw[..].try_into() {
                out.push(PartitionKey::new(u64::from_le_bytes(b), 0));
            }
        }
        Ok(out)
    }

    /// Enqueues the same records into several queues, storing them once; first half: the
    /// body and every queue's reference appended, in order, nothing waited for
    /// ([`Core::enqueue_shared_finish`] gives, per queue, the enqueue's answer or its error).
    pub(crate) async fn enqueue_shared_append(
        &self,
        ns: &str,
        queues: &[Arc<QueueHandle>],
        mut records: Vec<v1::Record>,
        mode: EnqueueMode,
    ) -> CoreResult<SharedPending> {
        let now = now_ms();
        for r in &mut records {
            if r.timestamp_ms <= 0 {
                r.timestamp_ms = now;
            }
        }
        let shared = self.shared_bodies(ns).await?;
        let n = records.len() as i64;
        let body = v1::QueueMessageBatch {
            records: records.clone(),
            ..Default::default()
        };
        let mut pending: Vec<CoreResult<PendingEnqueue>> = Vec::with_capacity(queues.len());
        let base = {
            let _order = shared.order.lock().await;
            let base = self
                .inner
                .log
                .append(
                    shared.key,
                    BatchToAppend {
                        record_count: n as u32,
                        max_timestamp_ms: now,
                        payload: Bytes::from(body.encode_to_vec()),
                    },
                )
                .await?;
            shared.in_flight.lock().insert(base);
            let reference = v1::SharedBatchRef {
                log_id: shared.key.stream_id,
                offset: base,
                count: n as u32,
            };
            for h in queues {
                pending.push(
                    self.enqueue_append(h, records.clone(), mode, None, Some(&reference))
                        .await,
                );
            }
            base
        };
        Ok(SharedPending {
            shared,
            queues: queues.to_vec(),
            base,
            n,
            pending,
        })
    }

    /// The second half: waits until the body and the references are durable.
    pub(crate) async fn enqueue_shared_finish(
        &self,
        p: SharedPending,
    ) -> CoreResult<Vec<CoreResult<v1::EnqueueResponse>>> {
        let SharedPending {
            shared,
            queues,
            base,
            n,
            pending,
        } = p;
        let body_durable = self.inner.log.wait_durable(shared.key, base + n).await;
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match (p, &body_durable) {
                (Ok(p), Ok(())) => self.enqueue_finish(p).await,
                (Ok(_), Err(e)) => Err(CoreError::Storage(tributary_storage::StorageError::Meta(
                    format!("the shared body log: {e}"),
                ))),
                (Err(e), _) => Err(e),
            });
        }
        shared.in_flight.lock().remove(&base);
        // Readers that met a reference before its body was durable wait for this.
        for h in &queues {
            h.ready.notify_waiters();
        }
        body_durable?;
        Ok(out)
    }

    /// The records a reference names.
    pub(crate) async fn read_shared(
        &self,
        ns: &str,
        r: &v1::SharedBatchRef,
        written_before_open: bool,
    ) -> CoreResult<Body> {
        let Some(shared) = self.inner.queues.shared.read().get(ns).cloned() else {
            return Ok(Body::Lost);
        };
        if shared.key.stream_id != r.log_id {
            return Ok(Body::Lost);
        }
        // A reference stored before this core opened, to a body at or past the log's end
        // then, names a body that never became durable: the offset is this core's to reuse,
        // so whatever body is there now is another message's.
        if written_before_open && r.offset >= shared.end_at_open {
            return Ok(Body::Lost);
        }
        if let Some(b) = shared.cache.lock().get(r.offset) {
            return Ok(Body::Ready(b));
        }
        let end = self.inner.log.bounds(shared.key).await?.end_offset;
        if r.offset >= end {
            return Ok(Body::Pending);
        }
        let batches = self.inner.log.read(shared.key, r.offset, 1).await?;
        let Some(b) = batches.into_iter().find(|b| b.base_offset == r.offset) else {
            return Ok(Body::Lost);
        };
        let records = Arc::new(decode_batch(&b.payload)?.records);
        shared.cache.lock().insert(r.offset, records.clone());
        Ok(Body::Ready(records))
    }

    /// Cuts the namespace's body log below the oldest body any queue still references.
    pub(crate) async fn collect_shared_bodies(&self, ns: &str) -> CoreResult<()> {
        let Some(shared) = self.inner.queues.shared.read().get(ns).cloned() else {
            return Ok(());
        };
        let bounds = self.inner.log.bounds(shared.key).await?;
        if bounds.start_offset >= bounds.end_offset {
            return Ok(());
        }
        // Taken under the order lock: every body before `limit` has all its references
        // appended, so the scans below see them once they are durable, or the body is
        // still in flight.
        let mut limit = {
            let _order = shared.order.lock().await;
            let end = self.inner.log.bounds(shared.key).await?.end_offset;
            let in_flight = shared.in_flight.lock().first().copied();
            in_flight.map_or(end, |b| b.min(end))
        };
        for h in self.queues_of(ns) {
            if let Some(oldest) = self.oldest_reference(&h).await? {
                limit = limit.min(oldest);
            }
        }
        if limit > bounds.start_offset {
            debug!(namespace = %ns, before = limit, "cutting the shared body log");
            self.inner.log.truncate_prefix(shared.key, limit).await?;
        }
        Ok(())
    }

    /// The body offset of the first reference at or after the queue's floor, if any:
    /// references in one queue follow the body log, so it is the oldest body it needs.
    async fn oldest_reference(&self, h: &QueueHandle) -> CoreResult<Option<i64>> {
        let floor = h.guarded.lock().await.st.floor();
        let mut scan = *h.ref_scan.lock();
        if let Some((end, body)) = scan.first
            && end > floor
        {
            return Ok(Some(body));
        }
        scan.first = None;
        let mut at = scan.scanned_to.max(floor);
        let end = h.durable_end();
        'scan: while at < end {
            let batches = self.inner.log.read(h.data, at, 1 << 20).await?;
            if batches.is_empty() {
                break;
            }
            for b in batches {
                if b.next_offset() <= at {
                    continue;
                }
                at = b.next_offset();
                if let Some(r) = decode_batch(&b.payload)?.shared {
                    scan.first = Some((b.next_offset(), r.offset));
                    break 'scan;
                }
            }
        }
        scan.scanned_to = at;
        *h.ref_scan.lock() = scan;
        Ok(scan.first.map(|(_, body)| body))
    }
}
