//! A log store over several named backends, so a stream or queue can choose where its
//! partitions live (a long-retention topic on an object store, a hot queue on the local log).
//!
//! Each partition lives on exactly one backend, chosen when it is created
//! ([`LogStore::create_partition_on`]). Which one is not recorded here: at open every
//! backend lists its partitions, and that listing is the routing table. The stream or queue
//! record in the metadata store names the backend too, so a restart without that backend
//! configured refuses to open it instead of creating it empty elsewhere.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use tokio::sync::watch;
use tracing::warn;

use crate::{
    BatchToAppend, LogStore, PartitionBounds, PartitionKey, Result, RetentionPolicy, StorageError,
    StoredBatch,
};

/// One backend of a [`RoutedLogStore`].
pub struct Backend {
    /// What streams and queues name it by (`local`, `opendal`, `memory`).
    pub name: String,
    pub store: Arc<dyn LogStore>,
}

/// Routes every partition to the backend it was created on.
pub struct RoutedLogStore {
    /// The default first.
    backends: Vec<Backend>,
    routes: RwLock<HashMap<PartitionKey, usize>>,
}

impl RoutedLogStore {
    /// Lists every backend's partitions; `backends[0]` is the default. A partition found on
    /// two backends (possible only if the metadata store was reset while the data stayed)
    /// is routed to the first one listed, with a warning.
    pub async fn open(backends: Vec<Backend>) -> Result<Arc<Self>> {
        assert!(!backends.is_empty(), "a routed log store needs a backend");
        let mut routes = HashMap::new();
        for (index, backend) in backends.iter().enumerate() {
            for key in backend.store.list_partitions().await? {
                if let Some(first) = routes.get(&key) {
                    let first: &Backend = &backends[*first];
                    warn!(
                        partition = %key,
                        used = %first.name,
                        ignored = %backend.name,
                        "a partition exists on two storage backends; using the first"
                    );
                    continue;
                }
                routes.insert(key, index);
            }
        }
        Ok(Arc::new(Self {
            backends,
            routes: RwLock::new(routes),
        }))
    }

    fn store(&self, partition: PartitionKey) -> Result<&Arc<dyn LogStore>> {
        let index = *self
            .routes
            .read()
            .get(&partition)
            .ok_or(StorageError::PartitionNotFound(partition))?;
        Ok(&self.backends[index].store)
    }

    fn backend_index(&self, name: Option<&str>) -> Result<usize> {
        match name {
            None => Ok(0),
            Some(name) => self
                .backends
                .iter()
                .position(|b| b.name == name)
                .ok_or_else(|| StorageError::UnknownBackend {
                    name: name.to_string(),
                    available: self.backend_names(),
                }),
        }
    }
}

#[async_trait]
impl LogStore for RoutedLogStore {
    fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name.clone()).collect()
    }

    async fn create_partition_on(
        &self,
        partition: PartitionKey,
        backend: Option<&str>,
    ) -> Result<()> {
        let wanted = self.backend_index(backend)?;
        if let Some(existing) = self.routes.read().get(&partition).copied() {
            // An existing partition stays where its data is; naming another backend for it
            // is a mismatch between the metadata and the data, reported rather than hidden.
            if backend.is_some() && existing != wanted {
                return Err(StorageError::BackendMismatch {
                    partition,
                    stored_on: self.backends[existing].name.clone(),
                    named: self.backends[wanted].name.clone(),
                });
            }
            return Ok(());
        }
        self.backends[wanted]
            .store
            .create_partition(partition)
            .await?;
        self.routes.write().insert(partition, wanted);
        Ok(())
    }

    async fn create_partition(&self, partition: PartitionKey) -> Result<()> {
        self.create_partition_on(partition, None).await
    }

    async fn delete_partition(&self, partition: PartitionKey) -> Result<()> {
        let Ok(store) = self.store(partition) else {
            return Ok(());
        };
        store.delete_partition(partition).await?;
        self.routes.write().remove(&partition);
        Ok(())
    }

    async fn list_partitions(&self) -> Result<Vec<PartitionKey>> {
        let mut keys: Vec<_> = self.routes.read().keys().copied().collect();
        keys.sort();
        Ok(keys)
    }

    async fn append(&self, partition: PartitionKey, batch: BatchToAppend) -> Result<i64> {
        self.store(partition)?.append(partition, batch).await
    }

    async fn wait_durable(&self, partition: PartitionKey, end_offset: i64) -> Result<()> {
        self.store(partition)?
            .wait_durable(partition, end_offset)
            .await
    }

    async fn read(
        &self,
        partition: PartitionKey,
        from_offset: i64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>> {
        self.store(partition)?
            .read(partition, from_offset, max_bytes)
            .await
    }

    async fn bounds(&self, partition: PartitionKey) -> Result<PartitionBounds> {
        self.store(partition)?.bounds(partition).await
    }

    fn watch_end(&self, partition: PartitionKey) -> Result<watch::Receiver<i64>> {
        self.store(partition)?.watch_end(partition)
    }

    async fn truncate_prefix(&self, partition: PartitionKey, before_offset: i64) -> Result<i64> {
        self.store(partition)?
            .truncate_prefix(partition, before_offset)
            .await
    }

    async fn apply_retention(
        &self,
        partition: PartitionKey,
        policy: RetentionPolicy,
    ) -> Result<i64> {
        self.store(partition)?
            .apply_retention(partition, policy)
            .await
    }

    async fn offset_for_timestamp(
        &self,
        partition: PartitionKey,
        timestamp_ms: i64,
    ) -> Result<Option<i64>> {
        self.store(partition)?
            .offset_for_timestamp(partition, timestamp_ms)
            .await
    }

    async fn close(&self) -> Result<()> {
        let mut first_error = None;
        for backend in &self.backends {
            if let Err(e) = backend.store.close().await {
                warn!(backend = %backend.name, error = %e, "closing a storage backend failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::memory::MemoryLogStore;

    fn batch(text: &'static str) -> BatchToAppend {
        BatchToAppend {
            record_count: 1,
            max_timestamp_ms: 1,
            payload: Bytes::from_static(text.as_bytes()),
        }
    }

    async fn two() -> (
        Arc<RoutedLogStore>,
        Arc<MemoryLogStore>,
        Arc<MemoryLogStore>,
    ) {
        let hot = Arc::new(MemoryLogStore::new());
        let cold = Arc::new(MemoryLogStore::new());
        let routed = RoutedLogStore::open(vec![
            Backend {
                name: "hot".into(),
                store: hot.clone(),
            },
            Backend {
                name: "cold".into(),
                store: cold.clone(),
            },
        ])
        .await
        .unwrap();
        (routed, hot, cold)
    }

    #[tokio::test]
    async fn partitions_live_on_the_backend_they_were_created_on() {
        let (routed, hot, cold) = two().await;
        let a = PartitionKey::new(1, 0);
        let b = PartitionKey::new(2, 0);
        routed.create_partition(a).await.unwrap();
        routed.create_partition_on(b, Some("cold")).await.unwrap();
        routed.append(a, batch("to hot")).await.unwrap();
        routed.append(b, batch("to cold")).await.unwrap();
        routed.wait_durable(b, 1).await.unwrap();
        assert_eq!(hot.list_partitions().await.unwrap(), vec![a]);
        assert_eq!(cold.list_partitions().await.unwrap(), vec![b]);
        assert_eq!(cold.read(b, 0, 1024).await.unwrap()[0].payload, "to cold");
        assert_eq!(routed.read(b, 0, 1024).await.unwrap()[0].payload, "to cold");
        assert_eq!(routed.list_partitions().await.unwrap(), vec![a, b]);
        routed.delete_partition(b).await.unwrap();
        assert!(cold.list_partitions().await.unwrap().is_empty());
        assert!(matches!(
            routed.bounds(b).await,
            Err(StorageError::PartitionNotFound(_))
        ));
    }

    #[tokio::test]
    async fn routes_are_rebuilt_from_the_backends_listings() {
        let (routed, hot, cold) = two().await;
        let b = PartitionKey::new(2, 0);
        routed.create_partition_on(b, Some("cold")).await.unwrap();
        drop(routed);
        let reopened = RoutedLogStore::open(vec![
            Backend {
                name: "hot".into(),
                store: hot,
            },
            Backend {
                name: "cold".into(),
                store: cold,
            },
        ])
        .await
        .unwrap();
        // Named again on reopen (as the core does): found where it is.
        reopened.create_partition_on(b, Some("cold")).await.unwrap();
        reopened.append(b, batch("x")).await.unwrap();
        // Naming the wrong backend for an existing partition is an error, not a new copy.
        let err = reopened
            .create_partition_on(b, Some("hot"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("stored on cold"),
            "unexpected error: {err}"
        );
    }

    #[tokio::test]
    async fn an_unknown_backend_is_refused_with_the_ones_available() {
        let (routed, _, _) = two().await;
        let err = routed
            .create_partition_on(PartitionKey::new(3, 0), Some("s3"))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("'s3'") && text.contains("hot, cold"),
            "{text}"
        );
        assert!(routed.list_partitions().await.unwrap().is_empty());
    }
}
