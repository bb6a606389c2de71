//! The queue engine: competing-consumer queues with per-message state, shared by every
//! protocol (SQS queues, AMQP queues, MQTT persistent sessions and RocketMQ POP build on it).
//!
//! A queue is two log partitions, the model of Kafka share groups and Pulsar subscriptions:
//! its messages (a message's id is its offset) and its state journal (leases, releases,
//! settlements, snapshots). In memory a queue holds only a window of the log ([`state`]):
//! a backlog stays on disk until consumers get near it.
//!
//! Each queue is its own unit: its own lock, its own owner task that sleeps until the
//! queue's next deadline (a lease expiring, a delay ending, the queue expiring). There is no
//! lock over all queues beyond the name table, and no periodic scan of every queue.
//!
//! Durability: an enqueue answers once its batch is durable; a lease, ack, nack or change
//! answers once its journal entry is. Delayed messages wait in the durable timer service.
//! Dead letters are enqueued to their target before they leave the source, so a crash in
//! between may leave a copy in both (at least once), never in neither.

mod delivery;
mod reader_served;
mod redrive;
pub(crate) mod settings;
mod shared;
pub(crate) use shared::SHARED_KEY;
pub(crate) mod state;
mod subscription;
mod tail;

pub use reader_served::ReaderServedSubscription;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use tributary_proto::v1;
use tributary_storage::{BatchToAppend, PartitionKey};

use crate::error::{CoreError, CoreResult};
use crate::log_intents::LogChange;
use crate::meta::{self, from_json, to_json, validate_name};
use crate::{Core, now_ms};

pub(crate) use delivery::{EnqueueMode, PendingEnqueue};
use settings::QueueSettings;
pub(crate) use shared::SharedPending;
use state::{QueueState, Replay};

pub(crate) const QUEUE_KEY: &str = "queue";
/// Journal ops written between two snapshots at most.
const SNAPSHOT_EVERY_OPS: usize = 8192;
/// Messages enqueued between two snapshots of a queue that dedupes (bounds the rescan of
/// dedup ids after a restart).
const SNAPSHOT_EVERY_ENQUEUED: i64 = 16_384;
const READ_CHUNK: usize = 4 << 20;
/// Messages the owner task keeps loaded at the head of a backlog nobody consumes.
const HEAD_WINDOW: usize = 16;
/// Messages a queue looks at, at most, when it opens (for transient messages to drop).
const OPEN_LOOK_AHEAD: i64 = 4096;

/// A queue as the metadata store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct QueueRecord {
    pub namespace: String,
    pub name: String,
    /// Names its two log partitions; a recreated queue gets a new one, so lease ids of the
    /// old queue never match the new one.
    pub id: u64,
    pub settings: QueueSettings,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub owner: String,
    pub created_at_ms: i64,
    /// The log store backend of its partitions (see `StreamRecord::backend`).
    #[serde(default)]
    pub backend: Option<String>,
}

/// Dedup ids seen inside the queue's window.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    seen: HashMap<String, i64>,
    by_expiry: VecDeque<(i64, String)>,
}

impl Dedup {
    fn prune(&mut self, now: i64) {
        while let Some((t, _)) = self.by_expiry.front() {
            if *t > now {
                break;
            }
            let (t, id) = self.by_expiry.pop_front().expect("front exists");
            if self.seen.get(&id) == Some(&t) {
                self.seen.remove(&id);
            }
        }
    }
    /// Records the id unless it is already in the window; returns whether it was new.
    fn insert(&mut self, now: i64, id: &str, expires_at: i64) -> bool {
        self.prune(now);
        if self.seen.contains_key(id) {
            return false;
        }
        self.seen.insert(id.to_string(), expires_at);
        self.by_expiry.push_back((expires_at, id.to_string()));
        true
    }
    fn forget(&mut self, id: &str) {
        self.seen.remove(id);
    }
    fn entries(&self) -> Vec<v1::QueueDedupEntry> {
        self.seen
            .iter()
            .map(|(id, t)| v1::QueueDedupEntry {
                dedup_id: id.clone(),
                expires_at_ms: *t,
                offset: -1,
            })
            .collect()
    }
}

/// Value bytes in a queue's messages log, for `max_length_bytes`: running totals of what
/// was appended and of what lies before the state's cursor (loaded, skipped or purged).
/// The ready messages not loaded hold the difference. Each appended batch carries the
/// total before it (`value_bytes_before`), from which a restart takes both back.
#[derive(Debug, Default)]
pub(crate) struct ByteTally {
    appended: u64,
    cursor: u64,
    /// Appends perhaps not durable yet: (log end after each, running total after each).
    pending: VecDeque<(i64, u64)>,
    /// The running total at the durable end last seen.
    durable: u64,
}

impl ByteTally {
    /// Value bytes of the ready messages not loaded (appends not yet durable included).
    pub fn unloaded(&self) -> u64 {
        self.appended.saturating_sub(self.cursor)
    }
    /// The running total before the next append.
    pub fn appended(&self) -> u64 {
        self.appended
    }
    /// A batch of `bytes` was appended, ending the log at `end`.
    pub fn append(&mut self, end: i64, bytes: u64) {
        self.appended += bytes;
        self.pending.push_back((end, self.appended));
    }
    /// The running total at `durable_end` (a durable end: appends are whole batches).
    pub fn durable_at(&mut self, durable_end: i64) -> u64 {
        while let Some(&(end, total)) = self.pending.front() {
            if end > durable_end {
                break;
            }
            self.durable = total;
            self.pending.pop_front();
        }
        self.durable
    }
    /// Messages of `bytes` passed the cursor.
    pub fn advance(&mut self, bytes: u64) {
        self.cursor += bytes;
    }
    /// The cursor moved to `durable_end` (a purge).
    pub fn advance_to(&mut self, durable_end: i64) {
        self.cursor = self.cursor.max(self.durable_at(durable_end));
    }
}

/// What one queue's lock guards.
pub(crate) struct Guarded {
    pub st: QueueState,
    pub dedup: Dedup,
    /// Kept for queues with `max_length_bytes` only.
    pub bytes: Option<ByteTally>,
    /// The last appended batches, while the queue has consumers.
    pub tail: tail::Tail,
    ops_since_snapshot: usize,
    data_end_at_snapshot: i64,
}

pub(crate) struct QueueHandle {
    /// As declared; its `settings` are those at open, [`QueueHandle::settings`] the current
    /// ones (`UpdateQueue` replaces them in place).
    pub record: QueueRecord,
    settings: RwLock<Arc<QueueSettings>>,
    /// The messages log's end when the queue was opened (see [`shared`]).
    data_end_at_open: i64,
    /// Where the search for the oldest shared body this queue needs stands.
    ref_scan: Mutex<shared::RefScan>,
    data: PartitionKey,
    journal: PartitionKey,
    guarded: tokio::sync::Mutex<Guarded>,
    /// Wakes receivers: messages may be ready.
    ready: Notify,
    /// Wakes the owner task: a deadline may have moved.
    wake: Notify,
    data_end: watch::Receiver<i64>,
    deleted: AtomicBool,
    consumers: AtomicU32,
    /// An exclusive subscription holds the queue.
    exclusive: AtomicBool,
    /// Single active consumer: the subscription whose turn it is (0 = nobody's), always
    /// the first of `turns`.
    active_subscriber: AtomicU64,
    /// Single active consumer: the subscriptions in the order they started; each one's
    /// turn comes when those before it have ended.
    turns: Mutex<VecDeque<u64>>,
    next_subscriber: AtomicU64,
    last_used_ms: AtomicI64,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl QueueHandle {
    fn label(&self) -> String {
        format!("{}/{}", self.record.namespace, self.record.name)
    }
    fn durable_end(&self) -> i64 {
        *self.data_end.borrow()
    }
    fn check_live(&self) -> CoreResult<()> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(CoreError::QueueNotFound(self.record.name.clone()));
        }
        Ok(())
    }
    fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }
    pub(crate) fn settings(&self) -> Arc<QueueSettings> {
        self.settings.read().clone()
    }
}

#[derive(Default)]
pub(crate) struct QueueTable {
    queues: RwLock<HashMap<(String, String), Arc<QueueHandle>>>,
    /// Per namespace: the log that fan-outs store their records in once.
    shared: RwLock<HashMap<String, Arc<shared::SharedBodies>>>,
    redrives: Mutex<HashMap<String, Arc<redrive::Task>>>,
    /// Per queue: messages waiting in the timer service for their delivery time (a delayed
    /// enqueue), counted with the queue's delayed messages.
    timer_delayed: Mutex<HashMap<(String, String), i64>>,
    /// The byte budget every queue's [`tail::Tail`] shares.
    tail_budget: tail::TailBudget,
}

fn queue_key(ns: &str, name: &str) -> Vec<u8> {
    meta::key(QUEUE_KEY, &[ns, name])
}

pub(crate) fn decode_batch(payload: &[u8]) -> CoreResult<v1::QueueMessageBatch> {
    v1::QueueMessageBatch::decode(payload)
        .map_err(|e| CoreError::Corrupt(format!("queue message batch: {e}")))
}

impl Core {
    fn queue_ns(&self, id: &v1::QueueId) -> CoreResult<(String, String)> {
        let ns = crate::streams::namespace_or_default(&id.namespace).to_string();
        validate_name("queue", &id.name)?;
        Ok((ns, id.name.clone()))
    }

    pub(crate) fn queue(&self, id: &v1::QueueId) -> CoreResult<Arc<QueueHandle>> {
        let (ns, name) = self.queue_ns(id)?;
        self.inner
            .queues
            .queues
            .read()
            .get(&(ns, name.clone()))
            .cloned()
            .ok_or(CoreError::QueueNotFound(name))
    }

    pub async fn declare_queue(
        &self,
        req: v1::DeclareQueueRequest,
    ) -> CoreResult<(v1::QueueInfo, bool)> {
        self.check_running()?;
        let id = req
            .id
            .ok_or_else(|| CoreError::InvalidArgument("queue id is required".into()))?;
        let (ns, name) = self.queue_ns(&id)?;
        self.placed_at_home(&ns)?;
        self.require_namespace(&ns)?;
        let settings = QueueSettings::from_proto(&req.config.unwrap_or_default())?;
        let _admin = self.inner.admin.lock().await;
        if let Ok(h) = self.queue(&id) {
            let r = &h.record;
            if r.exclusive && r.owner != req.owner {
                return Err(CoreError::ResourceLocked(format!(
                    "queue '{name}' is exclusive to another connection"
                )));
            }
            if !req.passive
                && (*h.settings() != settings
                    || r.durable != req.durable
                    || r.exclusive != req.exclusive
                    || r.auto_delete != req.auto_delete)
            {
                return Err(CoreError::QueueExists(name));
            }
            h.touch();
            return Ok((self.queue_info(&h).await, false));
        }
        if req.passive {
            return Err(CoreError::QueueNotFound(name));
        }
        if let Some(dl) = &settings.dead_letter_queue {
            validate_name("dead-letter queue", dl)?;
        }
        let backend = self.resolve_backend(settings.storage.as_deref())?;
        let record = QueueRecord {
            namespace: ns.clone(),
            name: name.clone(),
            id: self.next_counter("stream_id").await?,
            settings,
            durable: req.durable,
            exclusive: req.exclusive,
            auto_delete: req.auto_delete,
            owner: req.owner,
            created_at_ms: now_ms(),
            backend,
        };
        // Partitions first, then the record: a crash in between leaves orphan partitions,
        // which the next start removes (the intent names them).
        let (data, journal) = partitions_of(record.id);
        let on = record.backend.as_deref();
        self.begin_log_change(record.id, LogChange::Create).await?;
        self.inner.log.create_partition_on(data, on).await?;
        self.inner.log.create_partition_on(journal, on).await?;
        self.inner
            .meta
            .put(&queue_key(&ns, &name), &to_json(&record))
            .await?;
        self.end_log_change(record.id).await?;
        let h = self.open_queue(record).await?;
        self.start_queue_owner(&h);
        info!(queue = %h.label(), "queue declared");
        Ok((self.queue_info(&h).await, true))
    }

    /// Replaces a queue's configuration in place (SQS SetQueueAttributes and tags, policies
    /// applied to a queue that exists). What the queue's stored state depends on cannot
    /// change: FIFO, priorities, the dedup window and whether bytes are counted. A new
    /// message TTL applies to messages loaded from now on; leases keep their deadlines.
    pub async fn update_queue(
        &self,
        id: &v1::QueueId,
        config: &v1::QueueConfig,
    ) -> CoreResult<v1::QueueInfo> {
        self.check_running()?;
        let mut new = QueueSettings::from_proto(config)?;
        let _admin = self.inner.admin.lock().await;
        let h = self.queue(id)?;
        let old = h.settings();
        // The backend is the queue's for life: an update that does not name it keeps it.
        match &new.storage {
            None => new.storage.clone_from(&old.storage),
            Some(s) if Some(s) != h.record.backend.as_ref() => {
                return Err(CoreError::InvalidArgument(format!(
                    "queue '{}': storage cannot change on a queue that exists (it is on '{}')",
                    h.record.name,
                    h.record.backend.as_deref().unwrap_or("the default store")
                )));
            }
            Some(_) => {}
        }
        let fixed = [
            (
                "fifo",
                old.fifo.unwrap_or(false) != new.fifo.unwrap_or(false),
            ),
            ("max_priority", old.max_priority != new.max_priority),
            (
                "dedup_window_ms",
                old.dedup_window_ms() != new.dedup_window_ms(),
            ),
            (
                "max_length_bytes (set or unset)",
                old.max_length_bytes.is_some() != new.max_length_bytes.is_some(),
            ),
        ];
        if let Some((what, _)) = fixed.iter().find(|(_, changed)| *changed) {
            return Err(CoreError::InvalidArgument(format!(
                "queue '{}': {what} cannot change on a queue that exists",
                h.record.name
            )));
        }
        if let Some(dl) = &new.dead_letter_queue {
            validate_name("dead-letter queue", dl)?;
        }
        if *old != new {
            let record = QueueRecord {
                settings: new.clone(),
                ..h.record.clone()
            };
            self.inner
                .meta
                .put(
                    &queue_key(&record.namespace, &record.name),
                    &to_json(&record),
                )
                .await?;
            let policy = new.policy();
            *h.settings.write() = Arc::new(new);
            h.guarded.lock().await.st.policy = policy;
            // Deadlines and limits may have moved: the owner task looks again, and waiting
            // receivers try again.
            h.wake.notify_one();
            h.ready.notify_waiters();
            info!(queue = %h.label(), "queue configuration updated");
        }
        Ok(self.queue_info(&h).await)
    }

    pub async fn delete_queue(&self, req: v1::DeleteQueueRequest) -> CoreResult<i64> {
        let id = req
            .id
            .ok_or_else(|| CoreError::InvalidArgument("queue id is required".into()))?;
        let _admin = self.inner.admin.lock().await;
        let h = self.queue(&id)?;
        let count = {
            let g = h.guarded.lock().await;
            g.st.ready_loaded() as i64
                + g.st.leased_count() as i64
                + g.st.delayed_count() as i64
                + (h.durable_end() - g.st.cursor()).max(0)
        };
        if req.if_unused && h.consumers.load(Ordering::Acquire) > 0 {
            return Err(CoreError::Conflict(format!(
                "queue '{}' has consumers",
                id.name
            )));
        }
        if req.if_empty && count > 0 {
            return Err(CoreError::Conflict(format!(
                "queue '{}' is not empty",
                id.name
            )));
        }
        self.remove_queue(&h).await?;
        // Its delayed enqueues still fire (into nothing, or a new queue of the name): they
        // are no longer this queue's to count.
        self.inner
            .queues
            .timer_delayed
            .lock()
            .remove(&(h.record.namespace.clone(), h.record.name.clone()));
        Ok(count)
    }

    pub(super) async fn remove_queue(&self, h: &Arc<QueueHandle>) -> CoreResult<()> {
        let r = &h.record;
        self.begin_log_change(r.id, LogChange::Delete).await?;
        self.inner
            .meta
            .delete(&queue_key(&r.namespace, &r.name))
            .await?;
        self.inner
            .queues
            .queues
            .write()
            .remove(&(r.namespace.clone(), r.name.clone()));
        self.forget_target(&r.namespace, &crate::router::Target::Queue(r.name.clone()))
            .await?;
        h.deleted.store(true, Ordering::Release);
        h.ready.notify_waiters();
        self.inner.log.delete_partition(h.data).await?;
        self.inner.log.delete_partition(h.journal).await?;
        self.end_log_change(r.id).await?;
        info!(queue = %h.label(), "queue deleted");
        // Last: the owner task may be the caller (an expired queue deletes itself), and an
        // abort ends it at its next await.
        if let Some(t) = h.task.lock().take() {
            t.abort();
        }
        Ok(())
    }

    pub async fn purge_queue(&self, id: &v1::QueueId) -> CoreResult<i64> {
        let h = self.queue(id)?;
        let mut ops = Vec::new();
        let (n, end) = {
            let mut g = h.guarded.lock().await;
            g.st.tick(now_ms());
            let end = h.durable_end();
            let n = g.st.purge(end, &mut ops);
            g.tail.clear();
            if let Some(b) = &mut g.bytes {
                b.advance_to(end);
            }
            (n, self.write_ops(&h, &mut g, ops).await?)
        };
        self.journal_durable(&h, end).await?;
        Ok(n as i64)
    }

    /// Up to `max` messages of a queue from its oldest unsettled one, without leasing any
    /// (an operator browsing it). Ready messages not in memory yet are loaded first, as a
    /// receive would, so a queue nobody consumes still shows its head.
    pub async fn peek_queue(
        &self,
        id: &v1::QueueId,
        max: usize,
    ) -> CoreResult<Vec<crate::inspect::PeekedMessage>> {
        let h = self.queue(id)?;
        let peeked = {
            let mut g = h.guarded.lock().await;
            self.fill_window(&h, &mut g, max).await?;
            g.st.peek(max)
        };
        // Loading may have brought in messages whose time has passed (an expiry): the
        // owner task deals with them as it does after any fill.
        h.wake.notify_one();
        Ok(peeked
            .into_iter()
            .map(
                |(offset, state, delivery_count, record)| crate::inspect::PeekedMessage {
                    offset,
                    state,
                    delivery_count,
                    record,
                },
            )
            .collect())
    }

    /// The queues of a namespace.
    pub(crate) fn queues_of(&self, ns: &str) -> Vec<Arc<QueueHandle>> {
        self.inner
            .queues
            .queues
            .read()
            .values()
            .filter(|h| h.record.namespace == ns)
            .cloned()
            .collect()
    }

    pub async fn list_queues(&self, namespace: &str) -> CoreResult<Vec<v1::QueueInfo>> {
        let ns = crate::streams::namespace_or_default(namespace);
        let mut handles = self.queues_of(ns);
        handles.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(self.queue_info(&h).await);
        }
        Ok(out)
    }

    /// A delayed enqueue into a queue was scheduled (+1), or fired or cancelled (-1).
    pub(crate) fn note_timer_delayed(&self, queue: &v1::QueueId, delta: i64) {
        let ns = crate::streams::namespace_or_default(&queue.namespace).to_string();
        let mut counts = self.inner.queues.timer_delayed.lock();
        let n = counts.entry((ns.clone(), queue.name.clone())).or_insert(0);
        *n = (*n + delta).max(0);
        if *n == 0 {
            counts.remove(&(ns, queue.name.clone()));
        }
    }

    fn timer_delayed(&self, h: &QueueHandle) -> i64 {
        self.inner
            .queues
            .timer_delayed
            .lock()
            .get(&(h.record.namespace.clone(), h.record.name.clone()))
            .copied()
            .unwrap_or(0)
    }

    async fn queue_info(&self, h: &QueueHandle) -> v1::QueueInfo {
        let g = h.guarded.lock().await;
        let unloaded = (h.durable_end() - g.st.cursor()).max(0);
        let r = &h.record;
        // Described with the backend in use (the settings hold only what was asked for).
        let mut config = h.settings().to_proto();
        if r.backend.is_some() {
            config.storage.clone_from(&r.backend);
        }
        v1::QueueInfo {
            id: Some(v1::QueueId {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            }),
            config: Some(config),
            durable: r.durable,
            exclusive: r.exclusive,
            auto_delete: r.auto_delete,
            messages_ready: g.st.ready_loaded() as i64 + unloaded,
            messages_leased: g.st.leased_count() as i64,
            consumers: h.consumers.load(Ordering::Acquire),
            messages_delayed: g.st.delayed_count() as i64 + self.timer_delayed(h),
            created_at_ms: r.created_at_ms,
        }
    }

    /// The log partitions every recorded queue owns (so start-up does not take them for
    /// orphans).
    pub(crate) async fn queue_partitions(&self) -> CoreResult<Vec<PartitionKey>> {
        let mut out = Vec::new();
        for (_, raw) in self
            .inner
            .meta
            .scan_prefix(&meta::key(QUEUE_KEY, &[]), usize::MAX)
            .await?
        {
            let r: QueueRecord = from_json("queue", &raw)?;
            let (a, b) = partitions_of(r.id);
            out.extend([a, b]);
        }
        out.extend(self.shared_body_partitions().await?);
        Ok(out)
    }

    /// The records a messages-log batch holds: its own, or the shared body it references
    /// (none if that body was lost in a crash, or is not durable yet and `!at_open`).
    pub(crate) async fn batch_records(
        &self,
        ns: &str,
        payload: &[u8],
        at_open: bool,
    ) -> CoreResult<Arc<Vec<v1::Record>>> {
        let batch = decode_batch(payload)?;
        match batch.shared {
            None => Ok(Arc::new(batch.records)),
            Some(r) => match self.read_shared(ns, &r, at_open).await? {
                shared::Body::Ready(records) => Ok(records),
                shared::Body::Pending | shared::Body::Lost => Ok(Arc::new(Vec::new())),
            },
        }
    }

    /// Opens every durable queue from its journal; non-durable queues end with the process
    /// that had them. Their owner tasks and the shared body collectors start later, in
    /// [`Core::start_queue_tasks`], once every queue and the router are loaded: an owner
    /// moves dead letters (to queues and addresses that must be there to take them), and a
    /// collector cuts bodies below what the queues it sees need.
    pub(crate) async fn recover_queues(&self) -> CoreResult<()> {
        self.recover_shared_bodies().await?;
        for (key, raw) in self
            .inner
            .meta
            .scan_prefix(&meta::key(QUEUE_KEY, &[]), usize::MAX)
            .await?
        {
            let record: QueueRecord = from_json("queue", &raw)?;
            if !record.durable {
                let (a, b) = partitions_of(record.id);
                self.begin_log_change(record.id, LogChange::Delete).await?;
                self.inner.meta.delete(&key).await?;
                self.inner.log.delete_partition(a).await?;
                self.inner.log.delete_partition(b).await?;
                self.end_log_change(record.id).await?;
                continue;
            }
            self.open_queue(record).await?;
        }
        Ok(())
    }

    /// Starts the owner tasks of the recovered queues and the shared body collectors; called
    /// once recovery has loaded every queue and the router.
    pub(crate) fn start_queue_tasks(&self) {
        let handles: Vec<_> = self.inner.queues.queues.read().values().cloned().collect();
        for h in &handles {
            self.start_queue_owner(h);
        }
        let namespaces: Vec<String> = self.inner.queues.shared.read().keys().cloned().collect();
        for ns in namespaces {
            self.start_shared_body_collector(&ns);
        }
    }

    fn start_queue_owner(&self, h: &Arc<QueueHandle>) {
        let mut task = h.task.lock();
        if task.is_none() {
            *task = Some(tokio::spawn(self.clone().run_queue_owner(h.clone())));
        }
    }

    /// Builds a queue's handle from its journal (its owner task is started by the caller).
    async fn open_queue(&self, record: QueueRecord) -> CoreResult<Arc<QueueHandle>> {
        let log = &self.inner.log;
        let (data, journal) = partitions_of(record.id);
        log.create_partition_on(data, record.backend.as_deref())
            .await?;
        log.create_partition_on(journal, record.backend.as_deref())
            .await?;
        let data_bounds = log.bounds(data).await?;
        let mut replay = Replay::new(data_bounds.start_offset, data_bounds.end_offset);
        let jb = log.bounds(journal).await?;
        let mut at = jb.start_offset;
        while at < jb.end_offset {
            let batches = log.read(journal, at, READ_CHUNK).await?;
            let Some(last) = batches.last() else { break };
            at = last.next_offset();
            for b in batches {
                let batch = v1::QueueStateBatch::decode(&b.payload[..])
                    .map_err(|e| CoreError::Corrupt(format!("queue journal: {e}")))?;
                for op in batch.ops.iter().filter_map(|o| o.op.as_ref()) {
                    replay.apply(op).map_err(|e| {
                        CoreError::Corrupt(format!(
                            "queue '{}/{}' journal (partition {journal}): {e}",
                            record.namespace, record.name
                        ))
                    })?;
                }
            }
        }
        replay.cursor = replay.cursor.max(data_bounds.start_offset);
        // The records of the live messages, read back batch by batch.
        let mut records: HashMap<i64, Arc<v1::Record>> = HashMap::new();
        let mut cached: Option<(i64, i64)> = None;
        for offset in replay.live.keys().copied() {
            if offset < data_bounds.start_offset || offset >= data_bounds.end_offset {
                continue;
            }
            if cached.is_some_and(|(from, to)| (from..to).contains(&offset)) {
                continue;
            }
            for b in log.read(data, offset, 1).await? {
                cached = Some((b.base_offset, b.next_offset()));
                for (i, r) in self
                    .batch_records(&record.namespace, &b.payload, true)
                    .await?
                    .iter()
                    .enumerate()
                {
                    records.insert(b.base_offset + i as i64, Arc::new(r.clone()));
                }
            }
        }
        let mut st = QueueState::from_replay(record.settings.policy(), &replay, |o| {
            records.get(&o).cloned()
        });
        // Transient messages do not outlive a restart: those the journal had loaded go now
        // (whatever their phase), the others as the window reaches them.
        let mut open_ops = Vec::new();
        let dropped = st.drop_transient(&mut open_ops);
        let bytes = match record.settings.max_length_bytes {
            Some(_) => Some(
                self.restore_byte_tally(&record.namespace, data, replay.cursor)
                    .await?,
            ),
            None => None,
        };
        let now = now_ms();
        let mut dedup = Dedup::default();
        let window = record.settings.dedup_window_ms();
        if window > 0 {
            for e in &replay.dedup {
                if e.expires_at_ms > now {
                    dedup.insert(now, &e.dedup_id, e.expires_at_ms);
                }
            }
            // Dedup ids enqueued after the last snapshot are in the log only.
            let mut at = replay.data_end.max(data_bounds.start_offset);
            while at < data_bounds.end_offset {
                let batches = log.read(data, at, READ_CHUNK).await?;
                let Some(last) = batches.last() else { break };
                at = last.next_offset();
                for b in batches {
                    for r in self
                        .batch_records(&record.namespace, &b.payload, true)
                        .await?
                        .iter()
                    {
                        if let Some(p) = r.properties.as_ref().filter(|p| !p.dedup_id.is_empty()) {
                            let expires = r.timestamp_ms.saturating_add(window);
                            if expires > now {
                                dedup.insert(now, &p.dedup_id, expires);
                            }
                        }
                    }
                }
            }
        }
        let handle = Arc::new(QueueHandle {
            data_end_at_open: data_bounds.end_offset,
            ref_scan: Mutex::new(shared::RefScan::default()),
            data,
            journal,
            guarded: tokio::sync::Mutex::new(Guarded {
                st,
                dedup,
                bytes,
                tail: tail::Tail::new(self.inner.queues.tail_budget.clone()),
                ops_since_snapshot: 0,
                data_end_at_snapshot: replay.data_end,
            }),
            ready: Notify::new(),
            wake: Notify::new(),
            data_end: log.watch_end(data)?,
            deleted: AtomicBool::new(false),
            consumers: AtomicU32::new(0),
            exclusive: AtomicBool::new(false),
            active_subscriber: AtomicU64::new(0),
            turns: Mutex::new(VecDeque::new()),
            next_subscriber: AtomicU64::new(0),
            last_used_ms: AtomicI64::new(now),
            task: Mutex::new(None),
            settings: RwLock::new(Arc::new(record.settings.clone())),
            record,
        });
        {
            // The head of the backlog is looked at before anyone asks: the transient
            // messages there are dropped and out of the counts (a bounded read; the rest
            // are dropped as the window reaches them).
            let mut g = handle.guarded.lock().await;
            if dropped > 0 {
                metrics::counter!("tributary_queue_transient_dropped_total")
                    .increment(dropped as u64);
            }
            self.write_ops(&handle, &mut g, open_ops).await?;
            let end = handle
                .durable_end()
                .min(g.st.cursor().saturating_add(OPEN_LOOK_AHEAD));
            self.fill_window_to(&handle, &mut g, HEAD_WINDOW, end)
                .await?;
        }
        self.inner.queues.queues.write().insert(
            (handle.record.namespace.clone(), handle.record.name.clone()),
            handle.clone(),
        );
        Ok(handle)
    }

    /// A queue's byte totals after a restart: the running total after the log's last batch,
    /// and at `cursor` (the total before the batch that holds it plus the records of that
    /// batch before it). Two batch reads, however long the backlog.
    async fn restore_byte_tally(
        &self,
        ns: &str,
        data: PartitionKey,
        cursor: i64,
    ) -> CoreResult<ByteTally> {
        let log = &self.inner.log;
        let bounds = log.bounds(data).await?;
        if bounds.start_offset >= bounds.end_offset {
            return Ok(ByteTally::default());
        }
        let appended = match log.read(data, bounds.end_offset - 1, 1).await?.first() {
            Some(b) => {
                let batch = decode_batch(&b.payload)?;
                batch.value_bytes_before.unwrap_or(0) + batch.value_bytes
            }
            None => 0,
        };
        let cursor = cursor.max(bounds.start_offset);
        let at_cursor = if cursor >= bounds.end_offset {
            appended
        } else {
            match log.read(data, cursor, 1).await?.first() {
                Some(b) => {
                    let before = decode_batch(&b.payload)?.value_bytes_before.unwrap_or(0);
                    let records = self.batch_records(ns, &b.payload, true).await?;
                    let passed = (cursor - b.base_offset).max(0) as usize;
                    before
                        + records
                            .iter()
                            .take(passed)
                            .map(|r| r.value.len() as u64)
                            .sum::<u64>()
                }
                None => appended,
            }
        };
        Ok(ByteTally {
            appended,
            cursor: at_cursor.min(appended),
            pending: VecDeque::new(),
            durable: appended,
        })
    }

    /// The queue's owner: sleeps until its next deadline, then lets time pass in its state
    /// (expired leases and ended delays make messages ready) and wakes receivers. It also
    /// deletes the queue once it has been unused for its `expires_ms`.
    async fn run_queue_owner(self, h: Arc<QueueHandle>) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let woken = h.wake.notified();
            let now = now_ms();
            let (next, dead) = {
                let mut g = h.guarded.lock().await;
                g.st.tick(now);
                if g.st.take_woke() {
                    h.ready.notify_waiters();
                }
                // The head of a backlog is loaded, so that its expiry is seen without a
                // consumer (a queue with a TTL and a dead-letter target is a delay line).
                if g.st.ready_loaded() == 0
                    && g.st.cursor() < h.durable_end()
                    && let Err(e) = self.fill_window(&h, &mut g, HEAD_WINDOW).await
                {
                    warn!(queue = %h.label(), error = %e, "could not read the queue's head");
                }
                let mut dead = g.st.take_exhausted();
                dead.extend(g.st.expire_head(now));
                let next = [g.st.next_deadline(), g.st.head_expiry()]
                    .into_iter()
                    .flatten()
                    .min();
                (next, dead)
            };
            if let Err(e) = self.move_dead_letters(&h, dead).await {
                warn!(queue = %h.label(), error = %e, "could not move dead letters");
            }
            let expires_at = h.settings().expires_ms.and_then(|ms| {
                (h.consumers.load(Ordering::Acquire) == 0)
                    .then(|| h.last_used_ms.load(Ordering::Relaxed).saturating_add(ms))
            });
            if expires_at.is_some_and(|t| t <= now) {
                let _admin = self.inner.admin.lock().await;
                if !h.deleted.load(Ordering::Acquire) {
                    info!(queue = %h.label(), "queue unused for its expiry time; deleting it");
                    if let Err(e) = self.remove_queue(&h).await {
                        warn!(queue = %h.label(), error = %e, "could not delete an expired queue");
                    }
                }
                return;
            }
            let due = [next, expires_at].into_iter().flatten().min();
            let wait = due.map_or(Duration::from_secs(3600), |t| {
                Duration::from_millis((t - now).clamp(1, 3_600_000) as u64)
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = woken => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Appends journal ops (under the queue's lock, so the journal's order is the state's
    /// order), snapshotting when enough have piled up. Returns the journal end to wait for.
    async fn write_ops(
        &self,
        h: &QueueHandle,
        g: &mut Guarded,
        mut ops: Vec<v1::queue_state_op::Op>,
    ) -> CoreResult<Option<i64>> {
        if g.st.has_exhausted() {
            h.wake.notify_one();
        }
        // A lease that expired under this call made messages ready: wake their consumers
        // (the owner task's own tick would not see it any more).
        if g.st.take_woke() {
            h.ready.notify_waiters();
        }
        g.ops_since_snapshot += ops.len();
        let data_end = h.durable_end();
        let snapshot = g.ops_since_snapshot >= SNAPSHOT_EVERY_OPS
            || (h.settings().dedup_window_ms() > 0
                && data_end - g.data_end_at_snapshot >= SNAPSHOT_EVERY_ENQUEUED);
        if snapshot {
            ops.push(v1::queue_state_op::Op::Snapshot(
                g.st.snapshot(data_end, g.dedup.entries()),
            ));
        }
        if ops.is_empty() {
            return Ok(None);
        }
        let batch = v1::QueueStateBatch {
            ops: ops
                .into_iter()
                .map(|op| v1::QueueStateOp { op: Some(op) })
                .collect(),
        };
        let base = self
            .inner
            .log
            .append(
                h.journal,
                BatchToAppend {
                    record_count: 1,
                    max_timestamp_ms: now_ms(),
                    payload: Bytes::from(batch.encode_to_vec()),
                },
            )
            .await?;
        if snapshot {
            g.ops_since_snapshot = 0;
            g.data_end_at_snapshot = data_end;
            // Everything before the snapshot is no longer needed once it is durable; the
            // messages before the floor were all settled.
            let (log, journal, data, floor) =
                (self.inner.log.clone(), h.journal, h.data, g.st.floor());
            tokio::spawn(async move {
                if log.wait_durable(journal, base + 1).await.is_ok() {
                    let _ = log.truncate_prefix(journal, base).await;
                    let _ = log.truncate_prefix(data, floor).await;
                }
            });
        }
        Ok(Some(base + 1))
    }

    async fn journal_durable(&self, h: &QueueHandle, end: Option<i64>) -> CoreResult<()> {
        if let Some(end) = end {
            self.inner.log.wait_durable(h.journal, end).await?;
        }
        Ok(())
    }
}

fn partitions_of(id: u64) -> (PartitionKey, PartitionKey) {
    (PartitionKey::new(id, 0), PartitionKey::new(id, 1))
}
