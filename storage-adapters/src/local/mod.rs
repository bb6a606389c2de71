//! The embedded default log: one directory per partition holding segment files.
//!
//! Durability: appends are written with `pwrite` and acknowledged only after an `fdatasync`
//! that covers them. Concurrent appends share fsyncs (group commit): while one fsync runs,
//! later appends queue behind it and the next fsync covers all of them. With
//! [`FsyncPolicy::Interval`], a background task fsyncs every N ms and appends wait for it,
//! trading latency for fewer fsyncs; acknowledged data is durable under both policies.
//! Readers only ever see durable batches, so no consumer sees a record a crash could undo.
//!
//! Recovery: sealed segments were fsynced when they were rolled, so any damage in them is
//! corruption and stops the open with an error that names the file. The active segment is
//! scanned; after a crash, a torn tail (an incomplete or CRC-failing last stretch) is cut off:
//! it can only hold writes that were never acknowledged. After a clean shutdown (marker file)
//! every byte was fsynced, so damage anywhere is reported as corruption instead.

pub(crate) mod segment;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tracing::{info, warn};

use segment::{
    FrameProblem, SealedIndex, corrupt, decode_index, encode_frame, encode_index, index_path,
    read_frame, read_header, segment_path,
};

use crate::{
    BatchToAppend, LogStore, PartitionBounds, PartitionKey, Result, RetentionPolicy, StorageError,
    StoredBatch,
};

const CLEAN_SHUTDOWN_MARKER: &str = ".clean-shutdown";
const LOCK_FILE: &str = ".lock";
const START_OFFSET_FILE: &str = "start-offset";

/// When appends are fsynced. Both policies acknowledge only durable data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Fsync as soon as an append waits for durability; concurrent appends share fsyncs.
    Always,
    /// Fsync every N milliseconds; appends wait for the next one.
    Interval(Duration),
}

#[derive(Debug, Clone)]
pub struct LocalLogConfig {
    /// Roll to a new segment once the active one would grow past this.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u64,
}

impl Default for LocalLogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 30,
            fsync: FsyncPolicy::Always,
            index_interval_bytes: 16 * 1024,
        }
    }
}

pub struct LocalLogStore {
    root: PathBuf,
    config: LocalLogConfig,
    partitions: RwLock<HashMap<PartitionKey, Arc<PartitionLog>>>,
    // Held for the life of the store: the exclusive lock on the data directory.
    _lock: File,
    closed: AtomicBool,
}

struct PartitionLog {
    key: PartitionKey,
    dir: PathBuf,
    inner: Mutex<Inner>,
    durable_tx: watch::Sender<i64>,
    // One fsync at a time per partition: waiters queue here and are covered by the next one.
    sync_lock: tokio::sync::Mutex<()>,
    poisoned: AtomicBool,
}

struct Inner {
    segments: Vec<Segment>,
    next_offset: i64,
    start_offset: i64,
    durable_offset: i64,
    deleted: bool,
}

struct Segment {
    base: i64,
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    durable_size: u64,
    end_offset: i64,
    max_ts: i64,
    index: Vec<(i64, u64)>,
    last_indexed_pos: Option<u64>,
}

impl Segment {
    fn lookup(&self, offset: i64) -> u64 {
        match self.index.partition_point(|(o, _)| *o <= offset) {
            0 => 0,
            i => self.index[i - 1].1,
        }
    }
}

impl LocalLogStore {
    /// Opens (creating if needed) the log under `root`, recovering every partition.
    /// With [`FsyncPolicy::Interval`] this must run inside a tokio runtime.
    pub fn open(root: impl Into<PathBuf>, config: LocalLogConfig) -> Result<Arc<Self>> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| {
            StorageError::io(format!("cannot create log directory {}", root.display()), e)
        })?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(LOCK_FILE))
            .map_err(|e| {
                StorageError::io(format!("cannot open {}", root.join(LOCK_FILE).display()), e)
            })?;
        fs2::FileExt::try_lock_exclusive(&lock)
            .map_err(|_| StorageError::Locked { path: root.clone() })?;

        let marker = root.join(CLEAN_SHUTDOWN_MARKER);
        let clean = marker.exists();
        let mut partitions = HashMap::new();
        let entries = fs::read_dir(&root)
            .map_err(|e| StorageError::io(format!("cannot read {}", root.display()), e))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| StorageError::io(format!("cannot read {}", root.display()), e))?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(parse_partition_dir) else {
                continue;
            };
            let part = PartitionLog::open(key, entry.path(), &config, clean)?;
            partitions.insert(key, Arc::new(part));
        }
        if clean {
            // From here on the directory is live again: a crash must not look clean.
            fs::remove_file(&marker)
                .map_err(|e| StorageError::io(format!("cannot remove {}", marker.display()), e))?;
            sync_dir(&root)?;
        }
        info!(root = %root.display(), partitions = partitions.len(), clean, "local log opened");
        let store = Arc::new(Self {
            root,
            config,
            partitions: RwLock::new(partitions),
            _lock: lock,
            closed: AtomicBool::new(false),
        });
        if let FsyncPolicy::Interval(every) = store.config.fsync {
            let handle = tokio::runtime::Handle::try_current().map_err(|_| {
                StorageError::Meta("the interval fsync policy needs a tokio runtime".into())
            })?;
            let weak = Arc::downgrade(&store);
            handle.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(store) = weak.upgrade() else { return };
                    if store.closed.load(Ordering::Acquire) {
                        return;
                    }
                    let parts: Vec<_> = store.partitions.read().values().cloned().collect();
                    drop(store);
                    for part in parts {
                        if let Err(e) = part.sync_now().await {
                            warn!(partition = %part.key, error = %e, "periodic fsync failed");
                        }
                    }
                }
            });
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn partition(&self, key: PartitionKey) -> Result<Arc<PartitionLog>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::ShuttingDown);
        }
        self.partitions
            .read()
            .get(&key)
            .cloned()
            .ok_or(StorageError::PartitionNotFound(key))
    }
}

/// One segment of a local partition, as [`LocalLogStore::segments`] describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSegment {
    pub base_offset: i64,
    pub end_offset: i64,
    pub max_timestamp_ms: i64,
    pub size_bytes: u64,
    /// Sealed segments never change again; the last segment is the active one.
    pub sealed: bool,
    pub path: PathBuf,
    /// The sealed segment's sparse index file (`None` for the active segment).
    pub index_path: Option<PathBuf>,
}

impl LocalLogStore {
    /// Creates an empty partition whose first offset is `base_offset` (a tiered store keeps
    /// older offsets elsewhere). A no-op when the partition exists.
    pub async fn create_partition_at(&self, key: PartitionKey, base_offset: i64) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::ShuttingDown);
        }
        if self.partitions.read().contains_key(&key) {
            return Ok(());
        }
        let dir = self.root.join(key.to_string());
        let root = self.root.clone();
        let config = self.config.clone();
        let part = blocking(move || -> Result<PartitionLog> {
            fs::create_dir_all(&dir)
                .map_err(|e| StorageError::io(format!("cannot create {}", dir.display()), e))?;
            if base_offset > 0 {
                write_file_durably(
                    &dir.join(START_OFFSET_FILE),
                    &encode_start_offset(base_offset),
                )?;
            }
            sync_dir(&root)?;
            PartitionLog::open(key, dir, &config, false)
        })
        .await?;
        self.partitions
            .write()
            .entry(key)
            .or_insert_with(|| Arc::new(part));
        Ok(())
    }

    /// [`LogStore::append`] without the async wrapper, for callers that must order the
    /// append with their own bookkeeping under a lock.
    pub fn append_now(&self, key: PartitionKey, batch: &BatchToAppend) -> Result<i64> {
        self.partition(key)?.append(batch, &self.config)
    }

    /// The partition's segments, oldest first; only durable bytes are counted.
    pub fn segments(&self, key: PartitionKey) -> Result<Vec<LocalSegment>> {
        let part = self.partition(key)?;
        let inner = part.inner.lock();
        let last = inner.segments.len().saturating_sub(1);
        Ok(inner
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| LocalSegment {
                base_offset: s.base,
                end_offset: if i < last {
                    s.end_offset
                } else {
                    s.end_offset.min(inner.durable_offset)
                },
                max_timestamp_ms: s.max_ts,
                size_bytes: s.durable_size,
                sealed: i < last,
                path: s.path.clone(),
                index_path: (i < last).then(|| index_path(&part.dir, s.base)),
            })
            .collect())
    }

    /// Seals the active segment when it holds any record, so that it can be shipped
    /// elsewhere; the next append starts a new segment.
    pub async fn seal_active(&self, key: PartitionKey) -> Result<()> {
        let part = self.partition(key)?;
        blocking(move || {
            let mut inner = part.inner.lock();
            let active = inner
                .segments
                .last()
                .expect("a partition always has a segment");
            if inner.deleted || active.size == 0 {
                return Ok(());
            }
            let next = inner.next_offset;
            if let Err(e) = part.roll(&mut inner, next) {
                drop(inner);
                part.poison();
                return Err(e);
            }
            Ok(())
        })
        .await
    }
}

fn parse_partition_dir(name: &str) -> Option<PartitionKey> {
    let (s, p) = name.split_once('-')?;
    Some(PartitionKey::new(s.parse().ok()?, p.parse().ok()?))
}

/// Runs file-system work off the async workers; a panic in it is reported, not propagated.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        StorageError::io(
            "storage worker failed",
            std::io::Error::other(e.to_string()),
        )
    })?
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("cannot fsync directory {}", dir.display()), e))
}

fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let ctx = |e| StorageError::io(format!("cannot write {}", path.display()), e);
    let mut f = File::create(&tmp).map_err(ctx)?;
    std::io::Write::write_all(&mut f, bytes).map_err(ctx)?;
    f.sync_all().map_err(ctx)?;
    fs::rename(&tmp, path).map_err(ctx)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn open_segment_file(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| StorageError::io(format!("cannot open segment {}", path.display()), e))
}

/// Result of scanning a segment frame by frame.
struct Scan {
    size: u64,
    end_offset: i64,
    max_ts: i64,
    index: Vec<(i64, u64)>,
    last_indexed_pos: Option<u64>,
    /// Position and reason of the first bad frame, if any.
    problem: Option<(u64, String)>,
}

fn scan_segment(file: &File, path: &Path, base: i64, index_interval: u64) -> Result<Scan> {
    let len = file
        .metadata()
        .map_err(|e| StorageError::io(format!("cannot stat {}", path.display()), e))?
        .len();
    let mut scan = Scan {
        size: 0,
        end_offset: base,
        max_ts: i64::MIN,
        index: Vec::new(),
        last_indexed_pos: None,
        problem: None,
    };
    let mut pos = 0u64;
    while pos < len {
        match read_frame(file, pos, len) {
            Ok((h, _)) if h.base_offset != scan.end_offset => {
                scan.problem = Some((
                    pos,
                    format!(
                        "frame at offset {} where {} was expected",
                        h.base_offset, scan.end_offset
                    ),
                ));
                break;
            }
            Ok((h, _)) => {
                if scan
                    .last_indexed_pos
                    .is_none_or(|p| pos - p >= index_interval)
                {
                    scan.index.push((h.base_offset, pos));
                    scan.last_indexed_pos = Some(pos);
                }
                scan.end_offset = h.next_offset();
                scan.max_ts = scan.max_ts.max(h.max_ts);
                pos += h.total_len();
            }
            Err(FrameProblem::Truncated) => {
                scan.problem = Some((pos, "the file ends inside a frame".into()));
                break;
            }
            Err(FrameProblem::Invalid(why)) => {
                scan.problem = Some((pos, why));
                break;
            }
            Err(FrameProblem::Io(e)) => {
                return Err(StorageError::io(
                    format!("cannot read {}", path.display()),
                    e,
                ));
            }
        }
    }
    scan.size = pos;
    Ok(scan)
}

impl PartitionLog {
    fn open(key: PartitionKey, dir: PathBuf, config: &LocalLogConfig, clean: bool) -> Result<Self> {
        let ctx = |e| {
            StorageError::io(
                format!("cannot read partition directory {}", dir.display()),
                e,
            )
        };
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).map_err(ctx)? {
            let name = entry.map_err(ctx)?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(base) = name
                .strip_suffix(".log")
                .and_then(|b| b.parse::<i64>().ok())
            {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let persisted_start = read_start_offset(&dir)?;
        if bases.is_empty() {
            let base = persisted_start.unwrap_or(0);
            open_segment_file(&segment_path(&dir, base), true)?;
            sync_dir(&dir)?;
            bases.push(base);
        }

        let mut segments = Vec::with_capacity(bases.len());
        let last = bases.len() - 1;
        for (i, &base) in bases.iter().enumerate() {
            let path = segment_path(&dir, base);
            let file = open_segment_file(&path, false)?;
            let len = file
                .metadata()
                .map_err(|e| StorageError::io(format!("cannot stat {}", path.display()), e))?
                .len();
            let sealed_index = if i < last {
                fs::read(index_path(&dir, base))
                    .ok()
                    .and_then(|raw| decode_index(&raw))
                    .filter(|ix| ix.size == len)
            } else {
                None
            };
            let mut seg = match sealed_index {
                Some(ix) => Segment {
                    base,
                    path,
                    file: Arc::new(file),
                    size: len,
                    durable_size: len,
                    end_offset: ix.end_offset,
                    max_ts: ix.max_ts,
                    last_indexed_pos: ix.entries.last().map(|e| e.1),
                    index: ix.entries,
                },
                None => {
                    let scan = scan_segment(&file, &path, base, config.index_interval_bytes)?;
                    if let Some((pos, why)) = scan.problem {
                        if i < last || clean {
                            return Err(corrupt(&path, pos, why));
                        }
                        warn!(
                            partition = %key,
                            segment = %path.display(),
                            position = pos,
                            dropped_bytes = len - pos,
                            reason = %why,
                            "cutting off the torn tail of the active segment (unacknowledged writes from before a crash)"
                        );
                        file.set_len(pos).map_err(|e| {
                            StorageError::io(format!("cannot truncate {}", path.display()), e)
                        })?;
                    }
                    // Everything left on disk is now made durable, whatever fsyncs the
                    // previous process did or did not get to.
                    file.sync_data().map_err(|e| {
                        StorageError::io(format!("cannot fsync {}", path.display()), e)
                    })?;
                    Segment {
                        base,
                        path,
                        file: Arc::new(file),
                        size: scan.size,
                        durable_size: scan.size,
                        end_offset: scan.end_offset,
                        max_ts: scan.max_ts,
                        index: scan.index,
                        last_indexed_pos: scan.last_indexed_pos,
                    }
                }
            };
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                if prev.end_offset != seg.base {
                    return Err(corrupt(
                        &seg.path,
                        0,
                        format!(
                            "segment starts at offset {} but the previous one ends at {}",
                            seg.base, prev.end_offset
                        ),
                    ));
                }
            }
            seg.durable_size = seg.size;
            segments.push(seg);
        }
        let next_offset = segments.last().map_or(0, |s| s.end_offset);
        let first_base = segments.first().map_or(0, |s| s.base);
        let start_offset = persisted_start
            .unwrap_or(first_base)
            .max(first_base)
            .min(next_offset);
        let (durable_tx, _) = watch::channel(next_offset);
        Ok(Self {
            key,
            dir,
            inner: Mutex::new(Inner {
                segments,
                next_offset,
                start_offset,
                durable_offset: next_offset,
                deleted: false,
            }),
            durable_tx,
            sync_lock: tokio::sync::Mutex::new(()),
            poisoned: AtomicBool::new(false),
        })
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned(self.key));
        }
        Ok(())
    }

    fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
        // Wake waiters so they see the poison instead of waiting forever.
        self.durable_tx.send_modify(|_| {});
    }

    fn append(&self, batch: &BatchToAppend, config: &LocalLogConfig) -> Result<i64> {
        self.check_usable()?;
        if batch.record_count == 0 {
            return Err(StorageError::Meta(
                "a batch must hold at least one record".into(),
            ));
        }
        let mut inner = self.inner.lock();
        if inner.deleted {
            return Err(StorageError::PartitionNotFound(self.key));
        }
        let base = inner.next_offset;
        let frame = encode_frame(
            base,
            batch.record_count,
            batch.max_timestamp_ms,
            &batch.payload,
        );
        if frame.len() > segment::MAX_FRAME {
            return Err(StorageError::BatchTooLarge {
                size: frame.len(),
                limit: segment::MAX_FRAME,
            });
        }
        let active = inner
            .segments
            .last()
            .expect("a partition always has a segment");
        if active.size > 0
            && active.size + frame.len() as u64 > config.segment_bytes
            && let Err(e) = self.roll(&mut inner, base)
        {
            drop(inner);
            self.poison();
            return Err(e);
        }
        let active = inner
            .segments
            .last_mut()
            .expect("a partition always has a segment");
        let pos = active.size;
        if let Err(e) = active.file.write_all_at(&frame, pos) {
            drop(inner);
            self.poison();
            return Err(StorageError::io(
                format!("cannot write to {}", self.dir.display()),
                e,
            ));
        }
        active.size += frame.len() as u64;
        active.end_offset = base + i64::from(batch.record_count);
        active.max_ts = active.max_ts.max(batch.max_timestamp_ms);
        if active
            .last_indexed_pos
            .is_none_or(|p| pos - p >= config.index_interval_bytes)
        {
            active.index.push((base, pos));
            active.last_indexed_pos = Some(pos);
        }
        inner.next_offset = base + i64::from(batch.record_count);
        Ok(base)
    }

    /// Seals the active segment (fsync + index file) and starts a new one at `base`.
    /// Rare (once per segment_bytes), so doing its I/O under the partition lock is fine.
    fn roll(&self, inner: &mut Inner, base: i64) -> Result<()> {
        let old = inner
            .segments
            .last_mut()
            .expect("a partition always has a segment");
        old.file
            .sync_data()
            .map_err(|e| StorageError::io(format!("cannot fsync {}", old.path.display()), e))?;
        old.durable_size = old.size;
        let index = SealedIndex {
            end_offset: old.end_offset,
            max_ts: old.max_ts,
            size: old.size,
            entries: old.index.clone(),
        };
        write_file_durably(&index_path(&self.dir, old.base), &encode_index(&index))?;
        let path = segment_path(&self.dir, base);
        let file = open_segment_file(&path, true)?;
        sync_dir(&self.dir)?;
        inner.segments.push(Segment {
            base,
            path,
            file: Arc::new(file),
            size: 0,
            durable_size: 0,
            end_offset: base,
            max_ts: i64::MIN,
            index: Vec::new(),
            last_indexed_pos: None,
        });
        Ok(())
    }

    /// Fsyncs everything written so far and publishes the new durable end offset.
    async fn sync_now(&self) -> Result<()> {
        let (target, files) = {
            let inner = self.inner.lock();
            if inner.deleted || inner.durable_offset == inner.next_offset {
                return Ok(());
            }
            let files: Vec<_> = inner
                .segments
                .iter()
                .filter(|s| s.durable_size < s.size)
                .map(|s| (s.base, s.file.clone(), s.size))
                .collect();
            (inner.next_offset, files)
        };
        let started = Instant::now();
        let to_sync: Vec<_> = files.iter().map(|(_, f, _)| f.clone()).collect();
        let synced =
            tokio::task::spawn_blocking(move || to_sync.iter().try_for_each(|f| f.sync_data()))
                .await
                .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())));
        if let Err(e) = synced {
            self.poison();
            return Err(StorageError::io(
                format!("fsync failed in {}", self.dir.display()),
                e,
            ));
        }
        metrics::histogram!("tributary_storage_fsync_seconds")
            .record(started.elapsed().as_secs_f64());
        let mut inner = self.inner.lock();
        for (base, _, size) in files {
            if let Some(seg) = inner.segments.iter_mut().find(|s| s.base == base) {
                seg.durable_size = seg.durable_size.max(size);
            }
        }
        if target > inner.durable_offset {
            inner.durable_offset = target;
            self.durable_tx.send_replace(target);
        }
        Ok(())
    }

    async fn wait_durable(&self, end_offset: i64, policy: FsyncPolicy) -> Result<()> {
        let mut rx = self.durable_tx.subscribe();
        loop {
            self.check_usable()?;
            if *rx.borrow_and_update() >= end_offset {
                return Ok(());
            }
            if self.inner.lock().deleted {
                return Err(StorageError::PartitionNotFound(self.key));
            }
            match policy {
                FsyncPolicy::Always => {
                    // Either take the sync turn, or learn that a running fsync finished: every
                    // waiter it covered then leaves at once, instead of each passing through
                    // the lock in turn before the next group's fsync can start.
                    tokio::select! {
                        biased;
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return Err(StorageError::ShuttingDown);
                            }
                        }
                        _turn = self.sync_lock.lock() => {
                            if *self.durable_tx.borrow() >= end_offset {
                                return Ok(());
                            }
                            self.sync_now().await?;
                        }
                    }
                }
                FsyncPolicy::Interval(_) => {
                    if rx.changed().await.is_err() {
                        return Err(StorageError::ShuttingDown);
                    }
                }
            }
        }
    }

    fn read(&self, from: i64, max_bytes: usize) -> Result<Vec<StoredBatch>> {
        struct Piece {
            file: Arc<File>,
            path: PathBuf,
            pos: u64,
            limit: u64,
        }
        let (durable, pieces) = {
            let inner = self.inner.lock();
            if inner.deleted {
                return Err(StorageError::PartitionNotFound(self.key));
            }
            if from < inner.start_offset || from > inner.durable_offset {
                return Err(StorageError::OffsetOutOfRange {
                    partition: self.key,
                    requested: from,
                    start: inner.start_offset,
                    end: inner.durable_offset,
                });
            }
            if from == inner.durable_offset {
                return Ok(Vec::new());
            }
            let first = inner
                .segments
                .partition_point(|s| s.base <= from)
                .saturating_sub(1);
            let pieces: Vec<Piece> = inner.segments[first..]
                .iter()
                .enumerate()
                .map(|(i, s)| Piece {
                    file: s.file.clone(),
                    path: s.path.clone(),
                    pos: if i == 0 { s.lookup(from) } else { 0 },
                    limit: s.durable_size,
                })
                .collect();
            (inner.durable_offset, pieces)
        };
        let mut out = Vec::new();
        let mut total = 0usize;
        'segments: for piece in pieces {
            let mut pos = piece.pos;
            while pos < piece.limit {
                let header = read_header(&piece.file, pos, piece.limit)
                    .map_err(|p| problem_to_error(p, &piece.path, pos))?;
                if header.next_offset() <= from {
                    pos += header.total_len();
                    continue;
                }
                if header.base_offset >= durable {
                    break 'segments;
                }
                if !out.is_empty() && total + header.payload_len() > max_bytes {
                    break 'segments;
                }
                let (_, batch) = read_frame(&piece.file, pos, piece.limit)
                    .map_err(|p| problem_to_error(p, &piece.path, pos))?;
                total += batch.payload.len();
                out.push(batch);
                pos += header.total_len();
                if total >= max_bytes {
                    break 'segments;
                }
            }
        }
        Ok(out)
    }

    fn bounds(&self) -> Result<PartitionBounds> {
        let inner = self.inner.lock();
        if inner.deleted {
            return Err(StorageError::PartitionNotFound(self.key));
        }
        Ok(PartitionBounds {
            start_offset: inner.start_offset,
            end_offset: inner.durable_offset,
            size_bytes: inner.segments.iter().map(|s| s.size).sum(),
        })
    }

    /// Removes the first `count` segments (never the active one) and deletes their files.
    fn drop_leading_segments(&self, inner: &mut Inner, count: usize) -> Vec<PathBuf> {
        let count = count.min(inner.segments.len().saturating_sub(1));
        let removed: Vec<Segment> = inner.segments.drain(..count).collect();
        let first_base = inner.segments[0].base;
        inner.start_offset = inner.start_offset.max(first_base);
        removed
            .into_iter()
            .flat_map(|s| [s.path, index_path(&self.dir, s.base)])
            .collect()
    }

    fn truncate_prefix(&self, before: i64) -> Result<i64> {
        self.check_usable()?;
        let (start, garbage) = {
            let mut inner = self.inner.lock();
            if inner.deleted {
                return Err(StorageError::PartitionNotFound(self.key));
            }
            let new_start = before.min(inner.durable_offset);
            if new_start <= inner.start_offset {
                return Ok(inner.start_offset);
            }
            write_file_durably(
                &self.dir.join(START_OFFSET_FILE),
                &encode_start_offset(new_start),
            )?;
            inner.start_offset = new_start;
            let whole = inner
                .segments
                .iter()
                .skip(1)
                .take_while(|s| s.base <= new_start)
                .count();
            let garbage = self.drop_leading_segments(&mut inner, whole);
            (inner.start_offset, garbage)
        };
        remove_files(&garbage);
        Ok(start)
    }

    fn apply_retention(&self, policy: RetentionPolicy) -> Result<i64> {
        let (start, garbage) = {
            let mut inner = self.inner.lock();
            if inner.deleted {
                return Err(StorageError::PartitionNotFound(self.key));
            }
            let units: Vec<_> = inner.segments.iter().map(|s| (s.max_ts, s.size)).collect();
            let drop = policy.units_to_drop(&units);
            let garbage = self.drop_leading_segments(&mut inner, drop);
            (inner.start_offset, garbage)
        };
        if !garbage.is_empty() {
            info!(partition = %self.key, files = garbage.len(), new_start = start, "retention removed segments");
        }
        remove_files(&garbage);
        Ok(start)
    }

    fn offset_for_timestamp(&self, ts: i64) -> Result<Option<i64>> {
        let (start, durable, candidates) = {
            let inner = self.inner.lock();
            if inner.deleted {
                return Err(StorageError::PartitionNotFound(self.key));
            }
            let candidates: Vec<_> = inner
                .segments
                .iter()
                .filter(|s| s.max_ts >= ts && s.durable_size > 0)
                .map(|s| (s.file.clone(), s.path.clone(), s.durable_size))
                .collect();
            (inner.start_offset, inner.durable_offset, candidates)
        };
        for (file, path, limit) in candidates {
            let mut pos = 0;
            while pos < limit {
                let h =
                    read_header(&file, pos, limit).map_err(|p| problem_to_error(p, &path, pos))?;
                if h.base_offset >= durable {
                    return Ok(None);
                }
                if h.max_ts >= ts && h.next_offset() > start {
                    return Ok(Some(h.base_offset.max(start)));
                }
                pos += h.total_len();
            }
        }
        Ok(None)
    }
}

fn problem_to_error(problem: FrameProblem, path: &Path, pos: u64) -> StorageError {
    match problem {
        FrameProblem::Truncated => corrupt(path, pos, "durable data ends inside a frame"),
        FrameProblem::Invalid(why) => corrupt(path, pos, why),
        FrameProblem::Io(e) => StorageError::io(format!("cannot read {}", path.display()), e),
    }
}

fn remove_files(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = fs::remove_file(p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %p.display(), error = %e, "could not remove a deleted segment's file");
        }
    }
}

fn encode_start_offset(offset: i64) -> Vec<u8> {
    let mut v = offset.to_le_bytes().to_vec();
    v.extend_from_slice(&crc32c::crc32c(&offset.to_le_bytes()).to_le_bytes());
    v
}

fn read_start_offset(dir: &Path) -> Result<Option<i64>> {
    let path = dir.join(START_OFFSET_FILE);
    match fs::read(&path) {
        Ok(raw) if raw.len() == 12 && crc32c::crc32c(&raw[..8]).to_le_bytes() == raw[8..12] => {
            Ok(Some(i64::from_le_bytes(raw[..8].try_into().unwrap())))
        }
        Ok(_) => Err(corrupt(&path, 0, "bad start-offset file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(
            format!("cannot read {}", path.display()),
            e,
        )),
    }
}

#[async_trait]
impl LogStore for LocalLogStore {
    async fn create_partition(&self, key: PartitionKey) -> Result<()> {
        self.create_partition_at(key, 0).await
    }

    async fn delete_partition(&self, key: PartitionKey) -> Result<()> {
        let Some(part) = self.partitions.write().remove(&key) else {
            return Ok(());
        };
        part.inner.lock().deleted = true;
        part.durable_tx.send_modify(|_| {});
        let dir = part.dir.clone();
        let root = self.root.clone();
        blocking(move || -> Result<()> {
            fs::remove_dir_all(&dir)
                .map_err(|e| StorageError::io(format!("cannot remove {}", dir.display()), e))?;
            sync_dir(&root)
        })
        .await
    }

    async fn list_partitions(&self) -> Result<Vec<PartitionKey>> {
        let mut keys: Vec<_> = self.partitions.read().keys().copied().collect();
        keys.sort();
        Ok(keys)
    }

    async fn append(&self, key: PartitionKey, batch: BatchToAppend) -> Result<i64> {
        self.partition(key)?.append(&batch, &self.config)
    }

    async fn wait_durable(&self, key: PartitionKey, end_offset: i64) -> Result<()> {
        self.partition(key)?
            .wait_durable(end_offset, self.config.fsync)
            .await
    }

    async fn read(
        &self,
        key: PartitionKey,
        from: i64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>> {
        let part = self.partition(key)?;
        blocking(move || part.read(from, max_bytes)).await
    }

    async fn bounds(&self, key: PartitionKey) -> Result<PartitionBounds> {
        self.partition(key)?.bounds()
    }

    fn watch_end(&self, key: PartitionKey) -> Result<watch::Receiver<i64>> {
        Ok(self.partition(key)?.durable_tx.subscribe())
    }

    async fn truncate_prefix(&self, key: PartitionKey, before: i64) -> Result<i64> {
        let part = self.partition(key)?;
        blocking(move || part.truncate_prefix(before)).await
    }

    async fn apply_retention(&self, key: PartitionKey, policy: RetentionPolicy) -> Result<i64> {
        let part = self.partition(key)?;
        blocking(move || part.apply_retention(policy)).await
    }

    async fn offset_for_timestamp(&self, key: PartitionKey, ts: i64) -> Result<Option<i64>> {
        let part = self.partition(key)?;
        blocking(move || part.offset_for_timestamp(ts)).await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let parts: Vec<_> = self.partitions.read().values().cloned().collect();
        let mut poisoned = false;
        for part in parts {
            let _turn = part.sync_lock.lock().await;
            part.sync_now().await?;
            poisoned |= part.poisoned.load(Ordering::Acquire);
        }
        if !poisoned {
            let root = self.root.clone();
            blocking(move || write_file_durably(&root.join(CLEAN_SHUTDOWN_MARKER), b"clean\n"))
                .await?;
        }
        info!(root = %self.root.display(), "local log closed cleanly");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
