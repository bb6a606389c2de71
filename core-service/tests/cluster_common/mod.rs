//! What the cluster tests share. Each test crate uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tributary_core::cluster::shard_cores::{ShardStorage, shard_catalog, shard_meta_prefix};
use tributary_core::cluster::shards::ShardLease;
use tributary_storage::object_log::{AckPoint, ObjectLogConfig, ObjectLogStore, WriteGuard};
use tributary_storage::routed::{Backend, RoutedLogStore};
use tributary_storage::{
    Check, LogStore, MetaStore, Op, PrefixedMetaStore, Result as StorageResult, StorageError,
};

/// A node's own connection to the metadata store, which the test can cut.
pub struct Cuttable {
    inner: Arc<dyn MetaStore>,
    pub cut: AtomicBool,
    /// Calls made: reads (get, scan) and transactions.
    pub reads: AtomicU64,
    pub txns: AtomicU64,
}

impl Cuttable {
    pub fn new(inner: Arc<dyn MetaStore>) -> Self {
        Self {
            inner,
            cut: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            txns: AtomicU64::new(0),
        }
    }

    fn check(&self) -> StorageResult<()> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(StorageError::Meta("cut off".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl MetaStore for Cuttable {
    async fn get(&self, key: &[u8]) -> StorageResult<Option<Bytes>> {
        self.check()?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
    }
    async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> StorageResult<Vec<(Vec<u8>, Bytes)>> {
        self.check()?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.scan(start, end, limit).await
    }
    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> StorageResult<bool> {
        self.check()?;
        self.txns.fetch_add(1, Ordering::Relaxed);
        self.inner.txn(checks, ops).await
    }
}

/// Each shard's log under `<bucket>/shards/<shard>` (a filesystem standing in for the object
/// store, as in the object-log tests), its cache under the node's own directory.
pub struct FsShards {
    pub bucket: PathBuf,
    pub cache: PathBuf,
    pub meta: Arc<dyn MetaStore>,
}

#[async_trait]
impl ShardStorage for FsShards {
    async fn open(
        &self,
        lease: &ShardLease,
    ) -> Result<(Arc<dyn LogStore>, Arc<dyn MetaStore>), String> {
        let shard = lease.shard();
        let root = self.bucket.join(format!("shards/{shard:06}"));
        std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        let op = ObjectLogStore::operator(
            "fs",
            vec![("root".into(), root.display().to_string())],
            "test bucket",
        )
        .await
        .map_err(|e| e.to_string())?;
        // What an earlier term cached here is stale: the object store has what was acked.
        let cache = self.cache.join(format!("shard-{shard}"));
        let _ = std::fs::remove_dir_all(&cache);
        let config = ObjectLogConfig {
            ack: AckPoint::Shared,
            upload_interval: Duration::from_millis(5),
            write_guard: Some(WriteGuard(Arc::new(lease.holds()))),
            epoch: lease.epoch(),
            ..Default::default()
        };
        let store = ObjectLogStore::open(op, "test bucket", cache, config)
            .await
            .map_err(|e| e.to_string())?;
        let log = RoutedLogStore::open(vec![Backend {
            name: "opendal".into(),
            store,
        }])
        .await
        .map_err(|e| e.to_string())?;
        let meta: Arc<dyn MetaStore> = Arc::new(PrefixedMetaStore::new(
            lease.fenced(self.meta.clone()),
            shard_meta_prefix(shard),
        ));
        Ok((log, meta))
    }

    fn catalog(&self, lease: &ShardLease) -> Arc<dyn MetaStore> {
        shard_catalog(self.meta.clone(), lease)
    }
}
