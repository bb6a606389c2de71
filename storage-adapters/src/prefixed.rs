//! A metadata store seen through a key prefix: one deployment's store holding the state of
//! several cores side by side (a cluster's shards), each under a prefix of its own, while a
//! transaction of one of them can still check a key outside its prefix (the shard's lease,
//! which the wrapped store adds).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Check, MetaStore, Op, Result};

pub struct PrefixedMetaStore {
    inner: Arc<dyn MetaStore>,
    prefix: Vec<u8>,
}

impl PrefixedMetaStore {
    pub fn new(inner: Arc<dyn MetaStore>, prefix: impl Into<Vec<u8>>) -> Self {
        Self {
            inner,
            prefix: prefix.into(),
        }
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }
}

#[async_trait]
impl MetaStore for PrefixedMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.inner.get(&self.key(key)).await
    }

    async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>> {
        let found = self
            .inner
            .scan(&self.key(start), &self.key(end), limit)
            .await?;
        Ok(found
            .into_iter()
            .map(|(key, value)| (key[self.prefix.len()..].to_vec(), value))
            .collect())
    }

    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<bool> {
        let checks = checks
            .into_iter()
            .map(|c| Check {
                key: self.key(&c.key),
                value: c.value,
            })
            .collect();
        let ops = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => Op::Put {
                    key: self.key(&key),
                    value,
                },
                Op::Delete { key } => Op::Delete {
                    key: self.key(&key),
                },
            })
            .collect();
        self.inner.txn(checks, ops).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryMetaStore;

    #[tokio::test]
    async fn a_prefixed_store_keeps_the_contract() {
        let inner: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
        crate::contract::meta_store(Arc::new(PrefixedMetaStore::new(
            inner,
            b"shards/3/".to_vec(),
        )))
        .await;
    }

    #[tokio::test]
    async fn two_prefixes_never_see_each_others_keys() {
        let inner: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
        let a = PrefixedMetaStore::new(inner.clone(), b"shards/1/".to_vec());
        let b = PrefixedMetaStore::new(inner.clone(), b"shards/2/".to_vec());
        a.put(b"k", b"a").await.unwrap();
        b.put(b"k", b"b").await.unwrap();
        // A key sorting after every key of the prefix: a scan of "everything" stays inside.
        b.put(&[0xff; 4], b"b-last").await.unwrap();
        assert_eq!(a.get(b"k").await.unwrap().unwrap(), &b"a"[..]);
        let everything = a.scan(b"", &[0xff; 64], 100).await.unwrap();
        assert_eq!(everything, vec![(b"k".to_vec(), Bytes::from_static(b"a"))]);
        assert_eq!(inner.get(b"shards/2/k").await.unwrap().unwrap(), &b"b"[..]);
    }
}
