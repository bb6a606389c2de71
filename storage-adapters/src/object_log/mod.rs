//! A log on any OpenDAL service (S3 and compatibles, GCS, Azure Blob, a filesystem), with
//! the local segment log as its write-ahead cache.
//!
//! Appends go to the local log, which gives them offsets, group-committed fsyncs and fast
//! reads of the hot tail. Sealed local segments are shipped whole as objects (one object per
//! segment, never one per message); older offsets are then read from the object store and
//! the local copies are evicted. Where an append is acknowledged is a setting:
//!
//! - [`AckPoint::Local`]: once the local cache has fsynced it. Survives a crash of the
//!   process; data not yet shipped is lost with the machine. Active segments are sealed and
//!   shipped at least every `seal_interval`, which bounds that window.
//! - [`AckPoint::Shared`]: once the object store holds it as well. Appends of every
//!   partition are gathered for `upload_interval` (or until `upload_bytes`) and written as
//!   one WAL object, so the request rate stays bounded however many partitions there are.
//!   A server started on an empty cache directory against the same bucket replays the WAL
//!   objects after the shipped segments and finds every acknowledged batch. Readers see a
//!   batch only once it is acknowledged, so no consumer sees a record the loss of the
//!   machine could undo.
//!
//! The object layout is in [`layout`].

mod layout;
mod remote;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::opendal::Operator;
use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::local::{LocalLogConfig, LocalLogStore};
use crate::{
    BatchToAppend, LogStore, PartitionBounds, PartitionKey, Result, RetentionPolicy, StorageError,
    StoredBatch,
};
use layout::{Marker, SegmentName, WalEntry};
use remote::RemoteSegment;

/// When an append counts as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPoint {
    /// Once the local cache has fsynced it.
    Local,
    /// Once the object store holds it too.
    Shared,
}

#[derive(Debug, Clone)]
pub struct ObjectLogConfig {
    pub ack: AckPoint,
    /// Shared ack: how long appends are gathered into one WAL object.
    pub upload_interval: Duration,
    /// Shared ack: a WAL object is written early once this many payload bytes wait.
    pub upload_bytes: usize,
    /// Active segments holding records older than this are sealed and shipped.
    pub seal_interval: Duration,
    /// How many shipped segments per partition stay in the local cache for fast reads.
    pub cached_segments: usize,
    /// Shared ack: an append not stored in the object store by then is answered with
    /// [`StorageError::Unavailable`] (it may still be stored later; it is not acknowledged).
    /// Once the WAL upload in progress has waited this long, the store counts as down: new
    /// appends are refused at once (nothing written) and appends still waiting are answered
    /// with that error, until an upload succeeds (see `Shared::store_down`).
    pub ack_timeout: Duration,
    /// The local cache's own settings (segment size, fsync policy).
    pub cache: LocalLogConfig,
    /// Asked before every object write; `false` refuses it. A cluster node passes its lease
    /// here, so a node that resumes after a pause longer than its lease writes nothing over
    /// its successor's objects, even before its watchdog ends it.
    pub write_guard: Option<WriteGuard>,
    /// A cluster node's fencing epoch (0: not a cluster node). Its WAL objects carry it in
    /// their names, and it marks where its WAL begins, so that objects an earlier epoch's
    /// node writes after the takeover are never replayed (see `layout`).
    pub epoch: u64,
}

/// See [`ObjectLogConfig::write_guard`].
#[derive(Clone)]
pub struct WriteGuard(pub Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteGuard")
    }
}

impl Default for ObjectLogConfig {
    fn default() -> Self {
        Self {
            ack: AckPoint::Local,
            upload_interval: Duration::from_millis(100),
            upload_bytes: 8 << 20,
            seal_interval: Duration::from_secs(60),
            cached_segments: 2,
            ack_timeout: Duration::from_secs(10),
            write_guard: None,
            epoch: 0,
            cache: LocalLogConfig {
                segment_bytes: 64 << 20,
                ..LocalLogConfig::default()
            },
        }
    }
}

pub struct ObjectLogStore {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct Shared {
    op: Operator,
    /// Names the store in errors and logs (scheme and root or bucket).
    name: String,
    cache: Arc<LocalLogStore>,
    config: ObjectLogConfig,
    parts: RwLock<HashMap<PartitionKey, Arc<Part>>>,
    pending: Mutex<Pending>,
    /// When the oldest entry of the WAL upload in progress was queued (None: no upload in
    /// progress). An upload is retried until it succeeds, so this stays set for as long as
    /// the object store takes nothing.
    uploading_since: Mutex<Option<tokio::time::Instant>>,
    pending_ready: Notify,
    ship_now: Notify,
    wal_seq: AtomicU64,
    /// WAL objects still needed: sequence -> the epoch in their name and the partition
    /// ranges they hold.
    wal_objects: Mutex<BTreeMap<u64, (u64, Vec<WalRange>)>>,
    closed: AtomicBool,
    stop: watch::Sender<bool>,
    /// Set once a close has stopped the uploader: what is not in the store then never will
    /// be (from this process).
    closed_done: watch::Sender<bool>,
}

/// Shared ack: how long one WAL PUT attempt may take before it is abandoned and retried,
/// plus a second per MiB of the object (so a large object on a slow link still goes through).
const WAL_PUT_TIMEOUT: Duration = Duration::from_secs(5);
/// Shared ack: failed WAL uploads are retried with backoff up to this far apart, which
/// bounds how long after the store's return the first acknowledgement comes.
const WAL_RETRY_MAX: Duration = Duration::from_secs(1);

/// A partition's entries in one WAL object: key, incarnation, end offset.
type WalRange = (PartitionKey, u64, i64);

#[derive(Default)]
struct Pending {
    entries: Vec<WalEntry>,
    bytes: usize,
    /// When the oldest entry was queued: a window closes `upload_interval` after it, so
    /// entries that waited through the previous upload go out with the next one at once.
    since: Option<tokio::time::Instant>,
}

impl Pending {
    fn push(&mut self, entry: WalEntry) {
        self.bytes += entry.payload.len();
        self.since.get_or_insert_with(tokio::time::Instant::now);
        self.entries.push(entry);
    }
}

struct Part {
    key: PartitionKey,
    incarnation: u64,
    /// Orders the local append with the WAL queue, so each partition's entries queue in
    /// offset order and the shared end advances over a contiguous prefix.
    append_lock: Mutex<()>,
    state: Mutex<PartState>,
    /// Shared ack: offsets below this are in the object store (and fsynced locally).
    shared_end: watch::Sender<i64>,
    /// One shipping pass at a time per partition.
    ship_lock: tokio::sync::Mutex<()>,
}

struct PartState {
    start_offset: i64,
    /// Shipped segments by base offset.
    remote: BTreeMap<i64, Arc<RemoteSegment>>,
    /// When the oldest record not yet in a shipped segment was appended.
    unshipped_since: Option<Instant>,
    deleted: bool,
}

impl PartState {
    fn remote_end(&self) -> i64 {
        self.remote
            .values()
            .next_back()
            .map_or(self.start_offset, |s| s.name.end)
            .max(self.start_offset)
    }
}

fn object_error(store: &str, what: &str, e: impl std::error::Error) -> StorageError {
    // The causes too: OpenDAL's own message stops at "error sending request", and what
    // the operator needs ("connection refused", a DNS failure) is in its sources.
    let mut reason = format!("{what}: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        reason.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    StorageError::Unavailable {
        store: format!("object store {store}"),
        reason,
    }
}

fn new_incarnation(key: PartitionKey) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ key.stream_id.rotate_left(17) ^ u64::from(key.partition).rotate_left(41)
}

impl ObjectLogStore {
    /// Connects to the object store, checks it answers, opens the cache under `cache_dir`
    /// and rebuilds every partition from the objects and the cache. Fails with one error
    /// naming the store when it is unreachable or refuses access; nothing is written then.
    pub async fn open(
        op: Operator,
        name: impl Into<String>,
        cache_dir: impl Into<PathBuf>,
        config: ObjectLogConfig,
    ) -> Result<Arc<Self>> {
        let name = name.into();
        op.check()
            .await
            .map_err(|e| object_error(&name, "cannot list the bucket or root", e))?;
        let cache = LocalLogStore::open(cache_dir, config.cache.clone())?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            op,
            name,
            cache,
            config,
            parts: RwLock::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            uploading_since: Mutex::new(None),
            pending_ready: Notify::new(),
            ship_now: Notify::new(),
            wal_seq: AtomicU64::new(0),
            wal_objects: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            stop,
            closed_done: watch::channel(false).0,
        });
        shared.rebuild().await?;
        // Subscribed here, not in the tasks: a close before a task first runs must still
        // be seen as a change.
        let mut tasks = vec![tokio::spawn(
            shared.clone().ship_loop(shared.stop.subscribe()),
        )];
        if shared.config.ack == AckPoint::Shared {
            tasks.push(tokio::spawn(
                shared.clone().upload_loop(shared.stop.subscribe()),
            ));
        }
        Ok(Arc::new(Self {
            shared,
            tasks: Mutex::new(tasks),
        }))
    }

    /// The OpenDAL service `scheme` ("s3", "fs", "gcs", "azblob", "memory") configured with
    /// that service's own option names, checked to answer a listing (nothing is written).
    pub async fn operator(
        scheme: &str,
        options: Vec<(String, String)>,
        name: &str,
    ) -> Result<Operator> {
        let mut options = options;
        if scheme == "fs" && !options.iter().any(|(k, _)| k == "atomic_write_dir") {
            // Object stores put an object whole or not at all; a filesystem does so only when
            // writes go through a temporary file renamed into place. Without it a crash in
            // the middle of an upload leaves half an object under its final name.
            if let Some((_, root)) = options.iter().find(|(k, _)| k == "root") {
                let tmp = format!("{}/.tmp", root.trim_end_matches('/'));
                options.push(("atomic_write_dir".into(), tmp));
            }
        }
        let op = Operator::via_iter(scheme, options)
            .map_err(|e| object_error(name, "cannot configure it", e))?
            .layer(::opendal::layers::TimeoutLayer::new())
            .layer(::opendal::layers::RetryLayer::new().with_max_times(3));
        op.check()
            .await
            .map_err(|e| object_error(name, "cannot list the bucket or root", e))?;
        Ok(op)
    }

    /// Seals and ships every partition's unshipped records now (tests and shutdown use it).
    pub async fn ship_all(&self) -> Result<()> {
        let parts: Vec<_> = self.shared.parts.read().values().cloned().collect();
        for part in parts {
            self.shared.ship(&part, true).await?;
        }
        self.shared.collect_wal().await;
        Ok(())
    }

    /// Stops the background work without flushing anything, as a crash would; the store
    /// must be dropped next. Tests use it to reopen the same cache in one process.
    #[cfg(test)]
    pub(crate) async fn abandon(&self) {
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// Offsets of a partition held in shipped segments (for tests and diagnostics).
    pub fn shipped_end(&self, key: PartitionKey) -> Result<i64> {
        Ok(self.shared.part(key)?.state.lock().remote_end())
    }
}

impl Shared {
    fn part(&self, key: PartitionKey) -> Result<Arc<Part>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::ShuttingDown);
        }
        self.parts
            .read()
            .get(&key)
            .cloned()
            .ok_or(StorageError::PartitionNotFound(key))
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> StorageError {
        StorageError::Unavailable {
            store: format!("object store {}", self.name),
            reason: format!("{what}: {e}"),
        }
    }

    /// Each epoch's first WAL sequence, from the start markers cluster nodes wrote.
    async fn epoch_starts(&self) -> Result<BTreeMap<u64, layout::EpochStart>> {
        let mut starts = BTreeMap::new();
        for entry in self.list("epochs/").await? {
            let Some(epoch) = layout::parse_epoch_start_name(entry.path()) else {
                continue;
            };
            let raw = self
                .op
                .read(entry.path())
                .await
                .map_err(|e| self.err("cannot read an epoch start marker", e))?;
            match layout::EpochStart::decode(&String::from_utf8_lossy(&raw.to_bytes())) {
                Some(start) => {
                    if start.shipped_ends.is_none() {
                        warn!(store = %self.name, marker = %entry.path(), "an epoch start marker was cut short (its node died writing it, before serving): it fences WAL objects only");
                    }
                    starts.insert(epoch, start);
                }
                // Cut before its first line: that node wrote nothing after it.
                None => {
                    warn!(store = %self.name, marker = %entry.path(), "ignoring an unreadable epoch start marker (its node died writing it, before serving)");
                    starts.insert(
                        epoch,
                        layout::EpochStart {
                            first_seq: u64::MAX,
                            shipped_ends: None,
                        },
                    );
                }
            }
        }
        Ok(starts)
    }

    /// Refuses object writes once the write guard says this node may no longer write.
    fn may_write(&self) -> Result<()> {
        match &self.config.write_guard {
            Some(guard) if !(guard.0)() => Err(self.err(
                "refusing to write",
                "this node no longer holds the cluster lease",
            )),
            _ => Ok(()),
        }
    }

    async fn put_marker(&self, key: PartitionKey, marker: Marker) -> Result<()> {
        self.may_write()?;
        self.op
            .write(&layout::marker_path(key), marker.encode())
            .await
            .map_err(|e| self.err("cannot write a partition marker", e))?;
        Ok(())
    }

    /// Lists markers, shipped segments and WAL objects, then brings the cache in line.
    async fn rebuild(&self) -> Result<()> {
        let started = Instant::now();
        let mut markers: HashMap<PartitionKey, Marker> = HashMap::new();
        for entry in self.list("partitions/").await? {
            let Some(key) = layout::parse_marker_name(entry.path()) else {
                continue;
            };
            let raw = self
                .op
                .read(entry.path())
                .await
                .map_err(|e| self.err("cannot read a partition marker", e))?;
            let marker = Marker::decode(&raw.to_bytes()).ok_or_else(|| {
                self.err(
                    "cannot rebuild",
                    format!("partition marker {} is damaged", entry.path()),
                )
            })?;
            markers.insert(key, marker);
        }
        let starts = self.epoch_starts().await?;
        if let Some(newest) = starts.keys().next_back() {
            // Fencing orders epochs: a writer outside them (epoch 0), or behind the newest
            // (a metadata store that lost the cluster's lease), would have its own writes
            // fenced out at the next start.
            if self.config.epoch == 0 {
                return Err(self.err(
                    "refusing to open",
                    format!("cluster nodes wrote here (epochs up to {newest}, under epochs/): open it as a cluster node (cluster_node) or use another bucket or root"),
                ));
            }
            if self.config.epoch <= *newest {
                return Err(self.err(
                    "refusing to open",
                    format!("this node's fencing epoch {} is not above epoch {newest} recorded under epochs/: the metadata store does not hold this cluster's lease (check meta, meta_url and meta_namespace)", self.config.epoch),
                ));
            }
        }
        let mut segments: HashMap<PartitionKey, Vec<SegmentName>> = HashMap::new();
        for entry in self.list("segments/").await? {
            if let Some((key, name)) = SegmentName::parse(entry.path()) {
                if layout::segment_fenced_out(key, &name, &starts) {
                    // Never part of this log: the node that shipped it had lost its lease.
                    warn!(store = %self.name, object = %entry.path(), epoch = name.epoch, "ignoring and deleting a segment shipped after a later epoch began (a node that had lost its lease)");
                    for path in [name.log_path(key), name.index_path(key)] {
                        self.op
                            .delete(&path)
                            .await
                            .map_err(|e| self.err("cannot delete a fenced-out segment", e))?;
                    }
                    continue;
                }
                segments.entry(key).or_default().push(name);
            }
        }
        let mut wal: HashMap<PartitionKey, Vec<WalEntry>> = HashMap::new();
        let mut wal_names: Vec<(u64, u64, String)> = self
            .list("wal/")
            .await?
            .iter()
            .filter_map(|e| {
                layout::parse_wal_name(e.path())
                    .map(|(seq, epoch)| (seq, epoch, e.path().to_string()))
            })
            .collect();
        wal_names.sort();
        let max_seq = wal_names.last().map_or(0, |(seq, _, _)| *seq);
        let (wal_names, fenced): (Vec<_>, Vec<_>) = wal_names
            .into_iter()
            .partition(|(seq, epoch, _)| !layout::fenced_out(*seq, *epoch, &starts));
        for (_, epoch, path) in fenced {
            // Never part of this log: the node that wrote it had lost its lease.
            warn!(store = %self.name, object = %path, epoch, "ignoring and deleting a WAL object written after a later epoch began (a node that had lost its lease)");
            self.op
                .delete(&path)
                .await
                .map_err(|e| self.err("cannot delete a fenced-out WAL object", e))?;
        }
        // Before any WAL object of this epoch exists: where it begins.
        if self.config.epoch > 0 && !starts.contains_key(&self.config.epoch) {
            let start = layout::EpochStart {
                first_seq: max_seq + 1,
                shipped_ends: Some(
                    segments
                        .iter()
                        .filter_map(|(key, names)| Some((*key, names.iter().map(|n| n.end).max()?)))
                        .collect(),
                ),
            };
            self.may_write()?;
            self.op
                .write(&layout::epoch_start_path(self.config.epoch), start.encode())
                .await
                .map_err(|e| self.err("cannot write the epoch's start marker", e))?;
        }
        let newest = wal_names.last().map(|(seq, _, _)| *seq);
        for (seq, epoch, path) in wal_names {
            let raw = self
                .op
                .read(&path)
                .await
                .map_err(|e| self.err("cannot read a WAL object", e))?;
            let entries = match layout::decode_wal(raw.to_bytes()) {
                Ok(entries) => entries,
                // One upload runs at a time, so only the newest object can be one a crash
                // interrupted (on a store whose writes are not atomic): nothing in it was
                // acknowledged. Damage anywhere else is corruption.
                Err(why) if Some(seq) == newest => {
                    warn!(store = %self.name, object = %path, reason = %why, "dropping an incomplete WAL object (an upload a crash interrupted; never acknowledged)");
                    self.op
                        .delete(&path)
                        .await
                        .map_err(|e| self.err("cannot delete an incomplete WAL object", e))?;
                    continue;
                }
                Err(why) => {
                    return Err(self.err(&format!("WAL object {path} is damaged"), why));
                }
            };
            let ranges = entries
                .iter()
                .map(|e| (e.key, e.incarnation, e.end_offset()))
                .collect();
            self.wal_objects.lock().insert(seq, (epoch, ranges));
            for e in entries {
                wal.entry(e.key).or_default().push(e);
            }
        }
        self.wal_seq.store(max_seq + 1, Ordering::Release);

        // Cache partitions with no marker were being deleted (the marker goes first) or
        // never finished being created: neither was acknowledged.
        for key in self.cache.list_partitions().await? {
            if !markers.contains_key(&key) {
                info!(partition = %key, "removing a cached partition the object store does not list");
                self.cache.delete_partition(key).await?;
            }
        }
        let mut resent = 0usize;
        for (key, marker) in markers {
            let mut names = segments.remove(&key).unwrap_or_default();
            names.sort_by_key(|n| n.base);
            let mut remote = BTreeMap::new();
            let mut expect = None;
            for name in names {
                if name.end <= marker.start_offset {
                    continue; // left over from retention; collected below
                }
                if expect.is_some_and(|e| e != name.base) {
                    return Err(self.err(
                        "cannot rebuild",
                        format!(
                            "partition {key}: segment at offset {} follows one ending at {}",
                            name.base,
                            expect.unwrap_or_default()
                        ),
                    ));
                }
                expect = Some(name.end);
                remote.insert(name.base, Arc::new(RemoteSegment::new(key, name)));
            }
            let seg_end = expect
                .unwrap_or(marker.start_offset)
                .max(marker.start_offset);
            let mut entries: Vec<WalEntry> = wal
                .remove(&key)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.incarnation == marker.incarnation)
                .collect();
            entries.sort_by_key(|e| e.base_offset);
            // Without shipped segments the start may fall inside a batch: the cache then
            // begins at that batch, so that its later records stay readable.
            let cache_base = entries
                .iter()
                .find(|e| e.end_offset() > seg_end)
                .map_or(seg_end, |e| e.base_offset.min(seg_end));
            let cached = self.cache.bounds(key).await.ok();
            let usable =
                cached.is_some_and(|b| b.start_offset <= seg_end && b.end_offset >= seg_end);
            if !usable {
                if cached.is_some() {
                    self.cache.delete_partition(key).await?;
                }
                self.cache.create_partition_at(key, cache_base).await?;
            }
            // Replay WAL entries after what the cache holds.
            let mut end = self.cache.bounds(key).await?.end_offset;
            let mut wal_end = seg_end;
            for e in entries {
                if e.end_offset() <= end {
                    wal_end = wal_end.max(e.end_offset());
                    continue;
                }
                if e.base_offset != end {
                    warn!(partition = %key, expected = end, found = e.base_offset, "WAL objects skip offsets; replay stops here");
                    break;
                }
                let batch = BatchToAppend {
                    record_count: e.record_count,
                    max_timestamp_ms: e.max_ts,
                    payload: e.payload.clone(),
                };
                let base = self.cache.append(key, batch).await?;
                debug_assert_eq!(base, e.base_offset);
                end = e.end_offset();
                self.cache.wait_durable(key, end).await?;
                wal_end = end;
            }
            let local = self.cache.bounds(key).await?;
            if local.start_offset < marker.start_offset {
                self.cache.truncate_prefix(key, marker.start_offset).await?;
            }
            // In the object store: the shipped segments, then the contiguous WAL entries.
            let stored_end = seg_end.max(wal_end).min(local.end_offset);
            let (shared_end, _) = watch::channel(stored_end);
            let part = Arc::new(Part {
                key,
                incarnation: marker.incarnation,
                append_lock: Mutex::new(()),
                state: Mutex::new(PartState {
                    start_offset: marker.start_offset,
                    remote,
                    unshipped_since: (local.end_offset > seg_end).then(Instant::now),
                    deleted: false,
                }),
                shared_end,
                ship_lock: tokio::sync::Mutex::new(()),
            });
            // A cluster node writes again, under its own epoch, what earlier epochs' WAL
            // objects hold and no segment does yet: a node that lost its lease may still
            // collect those objects (a pause past its lease), and what it ships instead is
            // fenced out (see layout).
            let resend_from = if self.config.epoch > 0 {
                seg_end.min(stored_end)
            } else {
                stored_end
            };
            if self.config.ack == AckPoint::Shared && local.end_offset > resend_from {
                // Fsynced locally before the crash but never uploaded, so never
                // acknowledged: upload it before anyone reads it.
                resent += self.requeue(&part, resend_from, local.end_offset).await?;
            }
            self.parts.write().insert(key, part);
        }
        info!(
            store = %self.name,
            partitions = self.parts.read().len(),
            wal_objects = self.wal_objects.lock().len(),
            resent_batches = resent,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "object-store log rebuilt"
        );
        Ok(())
    }

    async fn list(&self, dir: &str) -> Result<Vec<::opendal::Entry>> {
        match self.op.list_with(dir).recursive(true).await {
            Ok(entries) => Ok(entries),
            Err(e) if e.kind() == ::opendal::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.err(&format!("cannot list {dir}"), e)),
        }
    }

    /// Queues cached batches `from..to` for the next WAL object.
    async fn requeue(&self, part: &Part, from: i64, to: i64) -> Result<usize> {
        let mut at = from;
        let mut count = 0;
        while at < to {
            let batches = self.cache.read(part.key, at, 1 << 20).await?;
            if batches.is_empty() {
                break;
            }
            let mut pending = self.pending.lock();
            for b in batches {
                if b.base_offset >= to {
                    break;
                }
                at = b.next_offset();
                pending.push(WalEntry {
                    key: part.key,
                    incarnation: part.incarnation,
                    base_offset: b.base_offset,
                    record_count: b.record_count,
                    max_ts: b.max_timestamp_ms,
                    payload: b.payload,
                });
                count += 1;
            }
        }
        self.pending_ready.notify_one();
        Ok(count)
    }

    /// Shared ack: the object store is taken to be down while the WAL upload in progress
    /// holds an entry queued `ack_timeout` ago or more (it is retried until it succeeds).
    /// Appends are then refused before anything is written, so a producer retrying through
    /// the outage gets a prompt error instead of a 10 s wait per attempt, and its retries
    /// leave no copies behind to be uploaded later.
    fn store_down(&self) -> Option<StorageError> {
        let since = (*self.uploading_since.lock())?;
        let waited = since.elapsed();
        (waited >= self.config.ack_timeout).then(|| {
            self.err(
                "not acknowledged",
                format!(
                    "the object store has stored nothing for {} ms (uploads are retried; appends are refused until one succeeds)",
                    waited.as_millis()
                ),
            )
        })
    }

    /// The end offset readers may see: acknowledged data only.
    fn visible_end(&self, part: &Part, local_end: i64) -> i64 {
        match self.config.ack {
            AckPoint::Local => local_end,
            AckPoint::Shared => (*part.shared_end.borrow()).min(local_end),
        }
    }

    // ---------------------------------------------------------------------------------
    // Shared ack: WAL objects
    // ---------------------------------------------------------------------------------

    async fn upload_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let has_pending = !self.pending.lock().entries.is_empty();
            if !has_pending {
                tokio::select! {
                    _ = self.pending_ready.notified() => {}
                    _ = stop.changed() => {}
                }
            }
            let stopping = *stop.borrow();
            if !stopping && self.pending.lock().bytes < self.config.upload_bytes {
                // Gather a window's worth; a full window goes at once.
                let since = self
                    .pending
                    .lock()
                    .since
                    .unwrap_or_else(tokio::time::Instant::now);
                let deadline = since + self.config.upload_interval;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = self.pending_ready.notified() => {
                            if self.pending.lock().bytes >= self.config.upload_bytes {
                                break;
                            }
                        }
                        _ = stop.changed() => break,
                    }
                }
            }
            let window = std::mem::take(&mut *self.pending.lock());
            if !window.entries.is_empty() {
                *self.uploading_since.lock() = window.since;
                self.upload_window(window.entries).await;
                *self.uploading_since.lock() = None;
            }
            if *stop.borrow() && self.pending.lock().entries.is_empty() {
                return;
            }
        }
    }

    /// Writes one WAL object, retrying until it is stored or the store shuts down, then
    /// advances each partition's shared end.
    async fn upload_window(&self, entries: Vec<WalEntry>) {
        // Each partition's last offset in the window; the cache must have fsynced it first,
        // so that what the object store holds is never ahead of a local restart.
        let mut ends: HashMap<PartitionKey, i64> = HashMap::new();
        for e in &entries {
            let end = ends.entry(e.key).or_insert(e.end_offset());
            *end = (*end).max(e.end_offset());
        }
        for (key, end) in &ends {
            if let Err(e) = self.cache.wait_durable(*key, *end).await {
                debug!(partition = %key, error = %e, "cache fsync failed before a WAL upload");
            }
        }
        let body = layout::encode_wal(&entries);
        let seq = self.wal_seq.fetch_add(1, Ordering::AcqRel);
        let path = layout::wal_path(seq, self.config.epoch);
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let put_timeout = WAL_PUT_TIMEOUT + Duration::from_secs((body.len() >> 20) as u64);
        loop {
            if let Err(e) = self.may_write() {
                // Never acknowledged: the node is about to stop.
                warn!(store = %self.name, object = %path, error = %e, "WAL upload abandoned");
                return;
            }
            // Each attempt is bounded: a connection the store stopped answering (a network
            // black hole) would otherwise hold the uploader for opendal's timeouts and
            // retries (10 s per attempt, four attempts) after the store is back.
            let attempt =
                match tokio::time::timeout(put_timeout, self.op.write(&path, body.clone())).await {
                    Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {} ms", put_timeout.as_millis())),
                };
            match attempt {
                Ok(()) => break,
                Err(e) => {
                    metrics::counter!("tributary_storage_object_errors_total", "op" => "wal_put")
                        .increment(1);
                    warn!(store = %self.name, object = %path, error = %e, retry_in_ms = backoff.as_millis() as u64, "WAL upload failed; retrying");
                    if self.closed.load(Ordering::Acquire) && *self.stop.borrow() {
                        // Closing: the batches stay unacknowledged.
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(WAL_RETRY_MAX);
                }
            }
        }
        // Stored, but acknowledged only if the lease still held once the PUT was done: a
        // successor lists the store only after this node's lease ran out, so it has every
        // object finished before then; a later one may be ignored (see `layout`).
        if let Err(e) = self.may_write() {
            warn!(store = %self.name, object = %path, error = %e, "WAL object stored after the lease ran out; not acknowledged");
            return;
        }
        metrics::histogram!("tributary_storage_wal_upload_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("tributary_storage_wal_objects_total").increment(1);
        metrics::counter!("tributary_storage_wal_bytes_total").increment(body.len() as u64);
        let ranges = entries
            .iter()
            .map(|e| (e.key, e.incarnation, e.end_offset()))
            .collect();
        self.wal_objects
            .lock()
            .insert(seq, (self.config.epoch, ranges));
        let parts = self.parts.read();
        for (key, end) in ends {
            if let Some(part) = parts.get(&key) {
                part.shared_end.send_if_modified(|cur| {
                    let advance = end > *cur;
                    if advance {
                        *cur = end;
                    }
                    advance
                });
            }
        }
    }

    /// Deletes WAL objects whose every entry is in a shipped segment (or whose partition
    /// is gone).
    async fn collect_wal(&self) {
        let done: Vec<(u64, u64)> = {
            let parts = self.parts.read();
            let objects = self.wal_objects.lock();
            objects
                .iter()
                .filter(|(_, (_, ranges))| {
                    ranges.iter().all(|(key, incarnation, end)| {
                        parts.get(key).is_none_or(|p| {
                            p.incarnation != *incarnation || p.state.lock().remote_end() >= *end
                        })
                    })
                })
                .map(|(seq, (epoch, _))| (*seq, *epoch))
                .collect()
        };
        for (seq, epoch) in done {
            if self.may_write().is_err() {
                return;
            }
            match self.op.delete(&layout::wal_path(seq, epoch)).await {
                Ok(()) => {
                    self.wal_objects.lock().remove(&seq);
                }
                Err(e) => {
                    warn!(store = %self.name, seq, error = %e, "cannot delete a shipped WAL object; will retry");
                    return;
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Shipping sealed segments
    // ---------------------------------------------------------------------------------

    async fn ship_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let tick = (self.config.seal_interval / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.ship_now.notified() => {}
                _ = stop.changed() => return,
            }
            let parts: Vec<_> = self.parts.read().values().cloned().collect();
            for part in parts {
                let due = part
                    .state
                    .lock()
                    .unshipped_since
                    .is_some_and(|t| t.elapsed() >= self.config.seal_interval);
                if let Err(e) = self.ship(&part, due).await {
                    metrics::counter!("tributary_storage_object_errors_total", "op" => "ship")
                        .increment(1);
                    warn!(store = %self.name, partition = %part.key, error = %e, "shipping a segment failed; will retry");
                }
            }
            self.collect_wal().await;
        }
    }

    /// Uploads every sealed cache segment not yet shipped (sealing the active one first when
    /// `seal`), then evicts shipped segments beyond the cache's share.
    async fn ship(&self, part: &Part, seal: bool) -> Result<()> {
        let _turn = part.ship_lock.lock().await;
        if part.state.lock().deleted {
            return Ok(());
        }
        if seal {
            // Sealing fsyncs the segment, so a shipped segment holds only durable batches.
            self.cache.seal_active(part.key).await?;
        }
        let segments = self.cache.segments(part.key)?;
        for seg in segments.iter().filter(|s| s.sealed) {
            let remote_end = part.state.lock().remote_end();
            if seg.end_offset <= remote_end {
                continue;
            }
            if seg.base_offset > remote_end {
                return Err(StorageError::Corrupt {
                    path: seg.path.clone(),
                    position: 0,
                    reason: format!(
                        "cached segment starts at {} but the object store ends at {remote_end}",
                        seg.base_offset
                    ),
                });
            }
            let name = SegmentName {
                base: seg.base_offset,
                end: seg.end_offset,
                size: seg.size_bytes,
                max_ts: seg.max_timestamp_ms,
                epoch: self.config.epoch,
            };
            let started = Instant::now();
            self.may_write()?;
            remote::upload(&self.op, part.key, &name, seg)
                .await
                .map_err(|e| self.err("cannot upload a segment", e))?;
            // Counted as shipped (and its WAL collectable) only if the lease still held.
            self.may_write()?;
            metrics::histogram!("tributary_storage_segment_upload_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("tributary_storage_segments_shipped_total").increment(1);
            let end = name.end;
            part.state
                .lock()
                .remote
                .insert(name.base, Arc::new(RemoteSegment::new(part.key, name)));
            // A shipped segment is in the object store: its batches are stored whatever
            // the WAL uploads still queued for them do.
            part.shared_end.send_if_modified(|cur| {
                let advance = end > *cur;
                if advance {
                    *cur = end;
                }
                advance
            });
        }
        {
            let mut state = part.state.lock();
            let remote_end = state.remote_end();
            let local_end = segments.last().map_or(remote_end, |s| s.end_offset);
            if local_end <= remote_end {
                state.unshipped_since = None;
            }
        }
        // Evict shipped segments from the cache, keeping the newest few for readers.
        let remote_end = part.state.lock().remote_end();
        let shipped: Vec<_> = segments
            .iter()
            .filter(|s| s.sealed && s.end_offset <= remote_end)
            .collect();
        if shipped.len() > self.config.cached_segments {
            let keep_from = shipped[shipped.len() - self.config.cached_segments - 1].end_offset;
            self.cache.truncate_prefix(part.key, keep_from).await?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Start offset
    // ---------------------------------------------------------------------------------

    /// Moves the logical start to `new_start` (persisted in the marker first), then drops
    /// shipped segments and cached data below it.
    async fn move_start(&self, part: &Part, new_start: i64) -> Result<i64> {
        let start = {
            let state = part.state.lock();
            if state.deleted {
                return Err(StorageError::PartitionNotFound(part.key));
            }
            if new_start <= state.start_offset {
                return Ok(state.start_offset);
            }
            new_start
        };
        self.put_marker(
            part.key,
            Marker {
                incarnation: part.incarnation,
                start_offset: start,
            },
        )
        .await?;
        let dropped: Vec<Arc<RemoteSegment>> = {
            let mut state = part.state.lock();
            state.start_offset = state.start_offset.max(start);
            let gone: Vec<i64> = state
                .remote
                .values()
                .filter(|s| s.name.end <= start)
                .map(|s| s.name.base)
                .collect();
            gone.iter().filter_map(|b| state.remote.remove(b)).collect()
        };
        for seg in dropped {
            if self.may_write().is_err() {
                break; // a restart ignores segments below the start offset
            }
            for path in [seg.name.log_path(part.key), seg.name.index_path(part.key)] {
                if let Err(e) = self.op.delete(&path).await {
                    warn!(store = %self.name, object = %path, error = %e, "cannot delete a segment below the start offset; a restart ignores it");
                }
            }
        }
        let local = self.cache.bounds(part.key).await?;
        if start > local.start_offset {
            self.cache.truncate_prefix(part.key, start).await?;
        }
        Ok(start)
    }
}

#[async_trait]
impl LogStore for ObjectLogStore {
    async fn create_partition(&self, key: PartitionKey) -> Result<()> {
        let s = &self.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(StorageError::ShuttingDown);
        }
        if s.parts.read().contains_key(&key) {
            return Ok(());
        }
        let incarnation = new_incarnation(key);
        // The marker first: a cached partition without one is removed at the next start.
        s.put_marker(
            key,
            Marker {
                incarnation,
                start_offset: 0,
            },
        )
        .await?;
        s.cache.create_partition(key).await?;
        let (shared_end, _) = watch::channel(0);
        s.parts.write().entry(key).or_insert_with(|| {
            Arc::new(Part {
                key,
                incarnation,
                append_lock: Mutex::new(()),
                state: Mutex::new(PartState {
                    start_offset: 0,
                    remote: BTreeMap::new(),
                    unshipped_since: None,
                    deleted: false,
                }),
                shared_end,
                ship_lock: tokio::sync::Mutex::new(()),
            })
        });
        Ok(())
    }

    async fn delete_partition(&self, key: PartitionKey) -> Result<()> {
        let s = &self.shared;
        let Some(part) = s.parts.write().remove(&key) else {
            return Ok(());
        };
        part.state.lock().deleted = true;
        part.shared_end.send_modify(|_| {});
        let _turn = part.ship_lock.lock().await;
        s.may_write()?;
        match s.op.delete(&layout::marker_path(key)).await {
            Ok(()) => {}
            Err(e) if e.kind() == ::opendal::ErrorKind::NotFound => {}
            Err(e) => return Err(s.err("cannot delete a partition marker", e)),
        }
        s.cache.delete_partition(key).await?;
        if let Err(e) =
            s.op.delete_with(&layout::segments_dir(key))
                .recursive(true)
                .await
        {
            warn!(store = %s.name, partition = %key, error = %e, "cannot delete a deleted partition's segments; they are ignored");
        }
        Ok(())
    }

    async fn list_partitions(&self) -> Result<Vec<PartitionKey>> {
        let mut keys: Vec<_> = self.shared.parts.read().keys().copied().collect();
        keys.sort();
        Ok(keys)
    }

    async fn append(&self, key: PartitionKey, batch: BatchToAppend) -> Result<i64> {
        let s = &self.shared;
        let part = s.part(key)?;
        if s.config.ack == AckPoint::Shared
            && let Some(e) = s.store_down()
        {
            metrics::counter!("tributary_storage_appends_refused_total").increment(1);
            return Err(e);
        }
        let _order = part.append_lock.lock();
        let base = s.cache.append_now(key, &batch)?;
        {
            let mut state = part.state.lock();
            if state.unshipped_since.is_none() {
                state.unshipped_since = Some(Instant::now());
            }
        }
        if s.config.ack == AckPoint::Shared {
            let mut pending = s.pending.lock();
            pending.push(WalEntry {
                key,
                incarnation: part.incarnation,
                base_offset: base,
                record_count: batch.record_count,
                max_ts: batch.max_timestamp_ms,
                payload: batch.payload,
            });
            drop(pending);
            s.pending_ready.notify_one();
        }
        Ok(base)
    }

    async fn wait_durable(&self, key: PartitionKey, end_offset: i64) -> Result<()> {
        let s = &self.shared;
        s.cache.wait_durable(key, end_offset).await?;
        if s.config.ack == AckPoint::Local {
            return Ok(());
        }
        // Not `part()`, which refuses once a close began: the close uploads what was queued
        // before it, so a write appended then is waited for through the close, and refused only
        // once the close is over without it. Refused early, the write would be stored all the
        // same, and a client's retry would store it twice.
        let part = s
            .parts
            .read()
            .get(&key)
            .cloned()
            .ok_or(StorageError::PartitionNotFound(key))?;
        let mut rx = part.shared_end.subscribe();
        let mut closed_done = s.closed_done.subscribe();
        // A node whose lease is gone uploads nothing more: what is not in the store yet never
        // will be, so say so now instead of after the whole limit.
        if *rx.borrow() < end_offset {
            s.may_write()?;
        }
        let deadline = tokio::time::Instant::now() + s.config.ack_timeout;
        loop {
            if *rx.borrow_and_update() >= end_offset {
                return Ok(());
            }
            if *closed_done.borrow_and_update() {
                return Err(StorageError::ShuttingDown);
            }
            if part.state.lock().deleted {
                return Err(StorageError::PartitionNotFound(key));
            }
            // Also woken when the store would be known down: waiting on would only hold the
            // caller (and whatever is ordered behind it) for the rest of the limit.
            let down_at = s
                .uploading_since
                .lock()
                .map(|since| since + s.config.ack_timeout);
            let wake = down_at.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(StorageError::ShuttingDown);
                    }
                }
                _ = closed_done.changed() => {}
                () = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(s.err(
                            "not acknowledged",
                            format!(
                                "the object store did not store the write within {} ms",
                                s.config.ack_timeout.as_millis()
                            ),
                        ));
                    }
                    if let Some(e) = s.store_down() {
                        return Err(e);
                    }
                }
            }
        }
    }

    async fn read(
        &self,
        key: PartitionKey,
        from: i64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>> {
        let s = &self.shared;
        let part = s.part(key)?;
        let local = s.cache.bounds(key).await?;
        let (start, remote) = {
            let state = part.state.lock();
            let seg = state
                .remote
                .range(..=from)
                .next_back()
                .filter(|(_, seg)| seg.name.end > from)
                .map(|(_, seg)| seg.clone());
            (state.start_offset, seg)
        };
        let end = s.visible_end(&part, local.end_offset);
        if from < start || from > end {
            return Err(StorageError::OffsetOutOfRange {
                partition: key,
                requested: from,
                start,
                end,
            });
        }
        if from == end {
            return Ok(Vec::new());
        }
        let cached = if from >= local.start_offset {
            match s.cache.read(key, from, max_bytes).await {
                // Evicted since the bounds were read: the shipped segment has it.
                Err(StorageError::OffsetOutOfRange { .. }) if remote.is_some() => None,
                other => Some(other?),
            }
        } else {
            None
        };
        let mut batches = if let Some(batches) = cached {
            batches
        } else if let Some(seg) = remote {
            let started = Instant::now();
            let batches = seg
                .read(&s.op, from, max_bytes)
                .await
                .map_err(|e| s.err("cannot read a segment", e))?;
            metrics::histogram!("tributary_storage_cold_read_seconds")
                .record(started.elapsed().as_secs_f64());
            batches
        } else {
            return Err(StorageError::Corrupt {
                path: PathBuf::from(layout::segments_dir(key)),
                position: 0,
                reason: format!(
                    "offset {from} is neither cached (from {}) nor in a shipped segment",
                    local.start_offset
                ),
            });
        };
        batches.retain(|b| b.base_offset < end);
        Ok(batches)
    }

    async fn bounds(&self, key: PartitionKey) -> Result<PartitionBounds> {
        let s = &self.shared;
        let part = s.part(key)?;
        let local = s.cache.bounds(key).await?;
        let state = part.state.lock();
        // Bounds are read on every fetch: no listing of cache segments here. Eviction is
        // segment-aligned, so the cache holds everything from its start and the store only
        // adds the segments below it.
        let evicted_bytes: u64 = state
            .remote
            .values()
            .filter(|seg| seg.name.end <= local.start_offset)
            .map(|seg| seg.name.size)
            .sum();
        Ok(PartitionBounds {
            start_offset: state.start_offset,
            end_offset: s
                .visible_end(&part, local.end_offset)
                .max(state.start_offset),
            size_bytes: evicted_bytes + local.size_bytes,
        })
    }

    fn watch_end(&self, key: PartitionKey) -> Result<watch::Receiver<i64>> {
        let s = &self.shared;
        match s.config.ack {
            AckPoint::Local => s.cache.watch_end(key),
            AckPoint::Shared => Ok(s.part(key)?.shared_end.subscribe()),
        }
    }

    async fn truncate_prefix(&self, key: PartitionKey, before_offset: i64) -> Result<i64> {
        let part = self.shared.part(key)?;
        let end = self.bounds(key).await?.end_offset;
        self.shared.move_start(&part, before_offset.min(end)).await
    }

    async fn apply_retention(&self, key: PartitionKey, policy: RetentionPolicy) -> Result<i64> {
        let s = &self.shared;
        let part = s.part(key)?;
        // Units oldest first: shipped segments, then cached segments not yet shipped.
        let (start, mut units) = {
            let state = part.state.lock();
            let units: Vec<(i64, i64, u64)> = state
                .remote
                .values()
                .map(|seg| (seg.name.base, seg.name.max_ts, seg.name.size))
                .collect();
            (state.start_offset, units)
        };
        let remote_end = part.state.lock().remote_end();
        units.extend(
            s.cache
                .segments(key)?
                .iter()
                .filter(|seg| seg.end_offset > remote_end)
                .map(|seg| {
                    (
                        seg.base_offset.max(remote_end),
                        seg.max_timestamp_ms,
                        seg.size_bytes,
                    )
                }),
        );
        let shape: Vec<(i64, u64)> = units.iter().map(|(_, ts, size)| (*ts, *size)).collect();
        let drop = policy.units_to_drop(&shape);
        if drop == 0 || drop >= units.len() {
            return Ok(start);
        }
        let new_start = units[drop].0;
        info!(partition = %key, units = drop, new_start, "retention removes segments");
        s.move_start(&part, new_start).await
    }

    async fn offset_for_timestamp(
        &self,
        key: PartitionKey,
        timestamp_ms: i64,
    ) -> Result<Option<i64>> {
        let s = &self.shared;
        let part = s.part(key)?;
        let (start, candidates) = {
            let state = part.state.lock();
            let c: Vec<_> = state
                .remote
                .values()
                .filter(|seg| seg.name.max_ts >= timestamp_ms && seg.name.end > state.start_offset)
                .cloned()
                .collect();
            (state.start_offset, c)
        };
        let local_start = s.cache.bounds(key).await?.start_offset;
        for seg in candidates {
            if seg.name.base >= local_start {
                break; // the cache answers from here on
            }
            let found = seg
                .offset_for_timestamp(&s.op, timestamp_ms)
                .await
                .map_err(|e| s.err("cannot read a segment", e))?;
            if let Some(offset) = found {
                return Ok(Some(offset.max(start)));
            }
        }
        let found = s.cache.offset_for_timestamp(key, timestamp_ms).await?;
        let end = self.bounds(key).await?.end_offset;
        Ok(found.map(|o| o.max(start)).filter(|o| *o < end))
    }

    async fn close(&self) -> Result<()> {
        let s = &self.shared;
        if s.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Let the uploader write what is queued, then stop the background work.
        s.stop.send_replace(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        s.closed_done.send_replace(true);
        s.cache.close().await?;
        info!(store = %s.name, "object-store log closed");
        Ok(())
    }
}

impl Drop for ObjectLogStore {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        for t in self.tasks.lock().iter() {
            t.abort();
        }
    }
}
