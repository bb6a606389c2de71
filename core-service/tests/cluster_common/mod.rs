//! What the cluster tests share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use tributary_storage::{Check, MetaStore, Op, Result as StorageResult, StorageError};

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
