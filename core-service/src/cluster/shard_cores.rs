//! A core per shard: what serves the shards a node owns ([`super::shards`]). Each shard's
//! state lives in storage of its own (a metadata key prefix and an object-store prefix,
//! which [`ShardStorage`] opens under the shard's lease), so a node that takes a shard over
//! opens its core from shared storage and finds every acknowledged record, and the node it
//! took the shard from is fenced out of both.
//!
//! The shard key of every unit is its namespace ([`shard_of`]): exchanges route to queues,
//! MQTT topics to sessions, and transactions span partitions only inside a namespace, so one
//! shard holds everything a namespace routes among.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use tonic::service::Routes;
use tracing::{info, warn};
use tributary_storage::{LogStore, MetaStore, PrefixedMetaStore};

use super::shards::{ShardHost, ShardLease};
use crate::{Core, CoreConfig};
use tributary_proto::placement::{Placement, Scheme};

/// The shard a namespace's units live in, of `shards`: the same on every node and gateway.
pub use tributary_proto::placement::shard_of;

/// The metadata key prefix of a shard's core, inside the deployment's namespace.
pub fn shard_meta_prefix(shard: u32) -> Vec<u8> {
    format!("shards/{shard:06}/").into_bytes()
}

/// Opens the stores one shard's core runs on, fenced by its lease: the metadata store as
/// [`ShardLease::fenced`] under [`shard_meta_prefix`], the log with the lease's epoch and
/// [`ShardLease::holds`] asked before every object write.
#[async_trait]
pub trait ShardStorage: Send + Sync + 'static {
    async fn open(
        &self,
        lease: &ShardLease,
    ) -> Result<(Arc<dyn LogStore>, Arc<dyn MetaStore>), String>;
    /// The deployment's catalog (the core's catalog.rs) as `lease`'s owner writes it:
    /// [`shard_catalog`] of the metadata store all shards share.
    fn catalog(&self, lease: &ShardLease) -> Arc<dyn MetaStore>;
}

/// The deployment's catalog, under `catalog/` of the metadata store all shards share, fenced
/// by `lease` as the shard's own metadata is.
pub fn shard_catalog(shared: Arc<dyn MetaStore>, lease: &ShardLease) -> Arc<dyn MetaStore> {
    Arc::new(PrefixedMetaStore::new(
        lease.fenced(shared),
        b"catalog/".to_vec(),
    ))
}

/// What a node does with a shard's core once it is open and before it serves calls (the
/// server declares its configured MQTT rules of the shard's namespaces). An error gives the
/// shard back, as a core that cannot open does.
pub type OnOpen =
    Arc<dyn Fn(Core, u32) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The cores of the shards this node serves.
pub struct ShardCores {
    storage: Arc<dyn ShardStorage>,
    config: CoreConfig,
    shards: u32,
    scheme: Scheme,
    on_open: Option<OnOpen>,
    cores: RwLock<BTreeMap<u32, Served>>,
}

/// A shard's core and its gRPC services, built once when the shard is taken.
struct Served {
    core: Core,
    routes: Routes,
}

impl ShardCores {
    /// Cores for a deployment of `shards` placing units by `scheme`; each is told its shard
    /// ([`CoreConfig::placement`]) so that it refuses units placed elsewhere.
    pub fn new(
        storage: Arc<dyn ShardStorage>,
        config: CoreConfig,
        shards: u32,
        scheme: Scheme,
    ) -> Self {
        Self {
            storage,
            config,
            shards,
            scheme,
            on_open: None,
            cores: RwLock::new(BTreeMap::new()),
        }
    }

    /// Runs `on_open` on each shard's core before it serves.
    pub fn with_on_open(mut self, on_open: OnOpen) -> Self {
        self.on_open = Some(on_open);
        self
    }

    /// The core of `shard`, if this node serves it.
    pub fn core(&self, shard: u32) -> Option<Core> {
        self.cores.read().get(&shard).map(|s| s.core.clone())
    }

    /// The gRPC services of `shard`'s core, if this node serves it.
    pub fn routes(&self, shard: u32) -> Option<Routes> {
        self.cores.read().get(&shard).map(|s| s.routes.clone())
    }

    /// How the deployment places units on its shards.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The shards this node serves.
    pub fn shards(&self) -> Vec<u32> {
        self.cores.read().keys().copied().collect()
    }
}

#[async_trait]
impl ShardHost for ShardCores {
    async fn serve(&self, lease: ShardLease) -> Result<(), String> {
        let shard = lease.shard();
        let (log, meta) = self.storage.open(&lease).await?;
        let config = CoreConfig {
            placement: Some(Placement {
                shard,
                shards: self.shards,
                scheme: self.scheme,
            }),
            ..self.config.clone()
        };
        let catalog = self.storage.catalog(&lease);
        let core = Core::open_in_shard(log, meta, catalog, config)
            .await
            .map_err(|e| format!("opening the core of shard {shard}: {e}"))?;
        if let Some(on_open) = &self.on_open
            && let Err(e) = on_open(core.clone(), shard).await
        {
            if let Err(closed) = core.shutdown().await {
                warn!(shard, error = %closed, "cluster: a shard's core did not shut down cleanly");
            }
            return Err(format!("preparing the core of shard {shard}: {e}"));
        }
        info!(shard, epoch = lease.epoch(), "cluster: serving a shard");
        let routes = crate::grpc::routes(core.clone());
        self.cores.write().insert(shard, Served { core, routes });
        Ok(())
    }

    async fn stop(&self, shard: u32) {
        let served = self.cores.write().remove(&shard);
        if let Some(Served { core, .. }) = served {
            if let Err(e) = core.shutdown().await {
                warn!(shard, error = %e, "cluster: a shard's core did not shut down cleanly");
            }
            info!(shard, "cluster: stopped serving a shard");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_prefixes_sort_in_shard_order() {
        assert_eq!(shard_meta_prefix(7), b"shards/000007/".to_vec());
        assert!(shard_meta_prefix(9) < shard_meta_prefix(10));
    }
}
