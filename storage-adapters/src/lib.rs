//! Storage behind two traits, so the core never knows where bytes live.
//!
//! - [`LogStore`]: partitioned append-only logs of opaque batches with dense offsets.
//! - [`MetaStore`]: a small ordered key-value store with atomic compare-and-set
//!   transactions, for metadata, committed offsets, producer state and timers.
//!
//! Adapters: [`local`] (the embedded default: a segmented, CRC-checked, group-fsynced log and
//! a redb metadata store), [`memory`] (for tests), [`object_log`] (a log on any OpenDAL object
//! store with the local log as its cache), [`routed`] (several of these by name, a partition
//! on the one its stream or queue chose), and the metadata servers [`etcd_meta`],
//! [`sql_meta`] (PostgreSQL, MariaDB/MySQL) and [`redis_meta`]. The traits deal only in whole
//! batches, offsets and keys, so the core never changes with the backend.

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

pub mod contract;
pub mod etcd_meta;
pub mod local;
pub mod memory;
pub mod object_log;
pub mod prefixed;
pub mod redb_meta;
pub mod redis_meta;
mod remote;
pub mod routed;
pub mod sql_meta;

pub use etcd_meta::EtcdMetaStore;
pub use prefixed::PrefixedMetaStore;
pub use redis_meta::RedisMetaStore;
pub use remote::redact_url;
pub use sql_meta::{MysqlMetaStore, PostgresMetaStore};

/// One partition of one stream. Streams are known to storage only by their numeric id,
/// so stream names never become file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub stream_id: u64,
    pub partition: u32,
}

impl PartitionKey {
    pub fn new(stream_id: u64, partition: u32) -> Self {
        Self {
            stream_id,
            partition,
        }
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.stream_id, self.partition)
    }
}

/// A batch handed to [`LogStore::append`]. The payload is opaque to storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchToAppend {
    /// Number of offsets the batch occupies (at least 1).
    pub record_count: u32,
    /// Largest timestamp in the batch; drives time retention and time look-ups.
    pub max_timestamp_ms: i64,
    pub payload: Bytes,
}

/// A batch as read back, with the offset storage assigned to its first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub base_offset: i64,
    pub record_count: u32,
    pub max_timestamp_ms: i64,
    pub payload: Bytes,
}

impl StoredBatch {
    /// The offset after the batch's last record.
    pub fn next_offset(&self) -> i64 {
        self.base_offset + i64::from(self.record_count)
    }
}

/// Where a partition's readable range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionBounds {
    /// First readable offset.
    pub start_offset: i64,
    /// Offset after the last durable record: everything below it survives a crash.
    pub end_offset: i64,
    /// Bytes held on storage for the partition.
    pub size_bytes: u64,
}

/// How much of a partition to keep. `None` keeps everything on that axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    pub max_age_ms: Option<i64>,
    pub max_bytes: Option<u64>,
    pub now_ms: i64,
}

impl RetentionPolicy {
    /// How many of the oldest units of storage (segments, objects) the policy drops.
    /// `units` are `(max timestamp, bytes)`, oldest first, and hold every unit of the
    /// partition; the last one (the one being written) is never dropped.
    pub fn units_to_drop(&self, units: &[(i64, u64)]) -> usize {
        let removable = &units[..units.len().saturating_sub(1)];
        let by_age = self.max_age_ms.filter(|a| *a >= 0).map_or(0, |age| {
            let cutoff = self.now_ms.saturating_sub(age);
            removable.iter().take_while(|(ts, _)| *ts < cutoff).count()
        });
        let by_size = self.max_bytes.map_or(0, |max| {
            let mut total: u64 = units.iter().map(|(_, size)| size).sum();
            removable
                .iter()
                .take_while(|(_, size)| {
                    let keep = total.saturating_sub(*size) >= max;
                    total -= if keep { *size } else { 0 };
                    keep
                })
                .count()
        });
        by_age.max(by_size)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "corrupt data in {path} at byte {position}: {reason}; restore this file from a backup or move it away (data after this point in the partition is unreadable)"
    )]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("partition {0} does not exist")]
    PartitionNotFound(PartitionKey),
    #[error(
        "offset {requested} is out of range for partition {partition} (readable {start}..{end})"
    )]
    OffsetOutOfRange {
        partition: PartitionKey,
        requested: i64,
        start: i64,
        end: i64,
    },
    #[error("batch of {size} bytes is larger than the storage limit of {limit} bytes")]
    BatchTooLarge { size: usize, limit: usize },
    #[error(
        "partition {0} stopped taking writes after an earlier storage failure; restart the server"
    )]
    Poisoned(PartitionKey),
    #[error(
        "data directory {path} is in use by another process (lock file {path}/.lock); stop that process or choose another --data-dir"
    )]
    Locked { path: PathBuf },
    #[error("metadata store: {0}")]
    Meta(String),
    #[error("{store} is unavailable: {reason}")]
    Unavailable { store: String, reason: String },
    #[error("storage is shutting down")]
    ShuttingDown,
    #[error(
        "storage backend '{name}' is not configured on this server (available: {})",
        available.join(", ")
    )]
    UnknownBackend {
        name: String,
        available: Vec<String>,
    },
    #[error(
        "partition {partition} is stored on {stored_on}, but its stream or queue names {named}"
    )]
    BackendMismatch {
        partition: PartitionKey,
        stored_on: String,
        named: String,
    },
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Partitioned append-only logs.
///
/// Offsets are dense per partition: a batch of `n` records takes `n` consecutive offsets.
/// `append` makes a batch visible to nobody until it is durable; `wait_durable` resolves
/// once everything below an offset survives a crash, and only durable batches are read.
/// Appends are ordered per partition; callers that need check-then-append atomicity
/// (idempotent producers) serialise their own appends to a partition.
#[async_trait]
pub trait LogStore: Send + Sync + 'static {
    /// Creates an empty partition starting at offset 0. Creating an existing one is a no-op.
    async fn create_partition(&self, partition: PartitionKey) -> Result<()>;
    /// The backends a partition can be created on, the default first; empty for a store
    /// that is one backend only ([`routed::RoutedLogStore`] has several).
    fn backend_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// Creates the partition on the named backend (`None`: the default). An existing
    /// partition stays where it is.
    async fn create_partition_on(
        &self,
        partition: PartitionKey,
        backend: Option<&str>,
    ) -> Result<()> {
        match backend {
            None => self.create_partition(partition).await,
            Some(name) => Err(StorageError::UnknownBackend {
                name: name.to_string(),
                available: self.backend_names(),
            }),
        }
    }
    /// Removes the partition and all its data.
    async fn delete_partition(&self, partition: PartitionKey) -> Result<()>;
    /// Every partition the store holds.
    async fn list_partitions(&self) -> Result<Vec<PartitionKey>>;
    /// Writes the batch and returns its base offset. The batch is not durable (nor
    /// readable) until [`LogStore::wait_durable`] for its end offset returns.
    async fn append(&self, partition: PartitionKey, batch: BatchToAppend) -> Result<i64>;
    /// Waits until every offset below `end_offset` is durable.
    async fn wait_durable(&self, partition: PartitionKey, end_offset: i64) -> Result<()>;
    /// Reads durable batches starting with the one that holds `from_offset`, up to
    /// `max_bytes` of payload, always at least one batch when one is available.
    /// `from_offset == end` gives an empty result; outside `start..=end` is an error.
    async fn read(
        &self,
        partition: PartitionKey,
        from_offset: i64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>>;
    async fn bounds(&self, partition: PartitionKey) -> Result<PartitionBounds>;
    /// A watch over the durable end offset, for long-polling readers.
    fn watch_end(&self, partition: PartitionKey) -> Result<watch::Receiver<i64>>;
    /// Makes offsets below `before_offset` unreadable and frees what storage it can.
    /// Returns the new start offset. Never moves the start backwards or past the end.
    async fn truncate_prefix(&self, partition: PartitionKey, before_offset: i64) -> Result<i64>;
    /// Drops whole units of storage (segments, objects) that the policy no longer keeps.
    /// Returns the new start offset.
    async fn apply_retention(
        &self,
        partition: PartitionKey,
        policy: RetentionPolicy,
    ) -> Result<i64>;
    /// The base offset of the first batch whose max timestamp is >= `timestamp_ms`.
    async fn offset_for_timestamp(
        &self,
        partition: PartitionKey,
        timestamp_ms: i64,
    ) -> Result<Option<i64>>;
    /// Makes everything written durable and marks a clean shutdown.
    async fn close(&self) -> Result<()>;
}

/// A condition of a [`MetaStore::txn`]: the key's current value must equal `value`
/// (`None` = the key must be absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// Ordered key-value metadata with atomic multi-key compare-and-set.
///
/// Shaped after etcd transactions so that etcd, SQL and embedded stores all fit.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>>;
    /// Entries with `start <= key < end` in key order, at most `limit`.
    async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>>;
    /// Applies `ops` atomically and durably if every check holds; returns whether it did.
    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<bool>;

    async fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.txn(
            vec![],
            vec![Op::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            }],
        )
        .await?;
        Ok(())
    }
    async fn delete(&self, key: &[u8]) -> Result<()> {
        self.txn(vec![], vec![Op::Delete { key: key.to_vec() }])
            .await?;
        Ok(())
    }
    /// Sets `key` to `new` (`None` deletes) if it currently equals `expected`.
    async fn compare_and_set(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        let op = match new {
            Some(v) => Op::Put {
                key: key.to_vec(),
                value: v.to_vec(),
            },
            None => Op::Delete { key: key.to_vec() },
        };
        self.txn(
            vec![Check {
                key: key.to_vec(),
                value: expected.map(<[u8]>::to_vec),
            }],
            vec![op],
        )
        .await
    }
    /// Every entry whose key starts with `prefix`.
    async fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>> {
        match prefix_end(prefix) {
            Some(end) => self.scan(prefix, &end, limit).await,
            None => self.scan(prefix, &[0xff; 64], limit).await,
        }
    }
}

/// The smallest key greater than every key with this prefix, if one exists.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
