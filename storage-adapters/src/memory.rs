//! In-memory adapters for tests: the same contracts as the local ones, nothing on disk.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::{
    BatchToAppend, Check, LogStore, MetaStore, Op, PartitionBounds, PartitionKey, Result,
    RetentionPolicy, StorageError, StoredBatch,
};

struct MemPartition {
    batches: Vec<StoredBatch>,
    start_offset: i64,
    next_offset: i64,
    end_tx: watch::Sender<i64>,
}

impl MemPartition {
    fn new() -> Self {
        Self {
            batches: Vec::new(),
            start_offset: 0,
            next_offset: 0,
            end_tx: watch::channel(0).0,
        }
    }
    fn size(&self) -> u64 {
        self.batches.iter().map(|b| b.payload.len() as u64).sum()
    }
}

/// A log kept in memory. Every append is immediately "durable".
#[derive(Default)]
pub struct MemoryLogStore {
    partitions: Mutex<HashMap<PartitionKey, MemPartition>>,
}

impl MemoryLogStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        key: PartitionKey,
        f: impl FnOnce(&mut MemPartition) -> Result<T>,
    ) -> Result<T> {
        let mut parts = self.partitions.lock();
        let part = parts
            .get_mut(&key)
            .ok_or(StorageError::PartitionNotFound(key))?;
        f(part)
    }
}

#[async_trait]
impl LogStore for MemoryLogStore {
    async fn create_partition(&self, key: PartitionKey) -> Result<()> {
        self.partitions
            .lock()
            .entry(key)
            .or_insert_with(MemPartition::new);
        Ok(())
    }

    async fn delete_partition(&self, key: PartitionKey) -> Result<()> {
        self.partitions.lock().remove(&key);
        Ok(())
    }

    async fn list_partitions(&self) -> Result<Vec<PartitionKey>> {
        let mut keys: Vec<_> = self.partitions.lock().keys().copied().collect();
        keys.sort();
        Ok(keys)
    }

    async fn append(&self, key: PartitionKey, batch: BatchToAppend) -> Result<i64> {
        if batch.record_count == 0 {
            return Err(StorageError::Meta(
                "a batch must hold at least one record".into(),
            ));
        }
        self.with(key, |p| {
            let base = p.next_offset;
            p.batches.push(StoredBatch {
                base_offset: base,
                record_count: batch.record_count,
                max_timestamp_ms: batch.max_timestamp_ms,
                payload: batch.payload,
            });
            p.next_offset += i64::from(batch.record_count);
            p.end_tx.send_replace(p.next_offset);
            Ok(base)
        })
    }

    async fn wait_durable(&self, key: PartitionKey, _end_offset: i64) -> Result<()> {
        self.with(key, |_| Ok(()))
    }

    async fn read(
        &self,
        key: PartitionKey,
        from: i64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>> {
        self.with(key, |p| {
            if from < p.start_offset || from > p.next_offset {
                return Err(StorageError::OffsetOutOfRange {
                    partition: key,
                    requested: from,
                    start: p.start_offset,
                    end: p.next_offset,
                });
            }
            let mut out = Vec::new();
            let mut total = 0;
            for b in p.batches.iter().filter(|b| b.next_offset() > from) {
                if !out.is_empty() && total + b.payload.len() > max_bytes {
                    break;
                }
                total += b.payload.len();
                out.push(b.clone());
                if total >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
    }

    async fn bounds(&self, key: PartitionKey) -> Result<PartitionBounds> {
        self.with(key, |p| {
            Ok(PartitionBounds {
                start_offset: p.start_offset,
                end_offset: p.next_offset,
                size_bytes: p.size(),
            })
        })
    }

    fn watch_end(&self, key: PartitionKey) -> Result<watch::Receiver<i64>> {
        self.with(key, |p| Ok(p.end_tx.subscribe()))
    }

    async fn truncate_prefix(&self, key: PartitionKey, before: i64) -> Result<i64> {
        self.with(key, |p| {
            let new_start = before.min(p.next_offset);
            if new_start > p.start_offset {
                p.start_offset = new_start;
                p.batches.retain(|b| b.next_offset() > new_start);
            }
            Ok(p.start_offset)
        })
    }

    async fn apply_retention(&self, key: PartitionKey, policy: RetentionPolicy) -> Result<i64> {
        self.with(key, |p| {
            // Memory keeps batches as its unit; the last one is kept like an active segment.
            let units: Vec<_> = p
                .batches
                .iter()
                .map(|b| (b.max_timestamp_ms, b.payload.len() as u64))
                .collect();
            let drop = policy.units_to_drop(&units);
            let removed: Vec<_> = p.batches.drain(..drop).collect();
            if let Some(last) = removed.last() {
                p.start_offset = p.start_offset.max(last.next_offset());
            }
            Ok(p.start_offset)
        })
    }

    async fn offset_for_timestamp(&self, key: PartitionKey, ts: i64) -> Result<Option<i64>> {
        self.with(key, |p| {
            Ok(p.batches
                .iter()
                .find(|b| b.max_timestamp_ms >= ts)
                .map(|b| b.base_offset.max(p.start_offset)))
        })
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Metadata kept in a `BTreeMap`.
#[derive(Default)]
pub struct MemoryMetaStore {
    map: Mutex<BTreeMap<Vec<u8>, Bytes>>,
}

impl MemoryMetaStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl MetaStore for MemoryMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.map.lock().get(key).cloned())
    }

    async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>> {
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(self
            .map
            .lock()
            .range(start.to_vec()..end.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<bool> {
        let mut map = self.map.lock();
        if !checks
            .iter()
            .all(|c| map.get(&c.key).map(|v| &v[..]) == c.value.as_deref())
        {
            return Ok(false);
        }
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    map.insert(key, Bytes::from(value));
                }
                Op::Delete { key } => {
                    map.remove(&key);
                }
            }
        }
        Ok(true)
    }
}
