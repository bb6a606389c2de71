//! The deployment's catalog of namespaces, for a core serving one shard of a cluster: each
//! namespace is made and held by its home shard's core, so no one core knows them all. The
//! home writes an entry next to its own record, in the metadata store all shards share,
//! fenced by the same shard lease, and any shard's core lists them from there.
//!
//! Keys, in the catalog's prefix (`catalog/` of the deployment's metadata namespace):
//!
//! ```text
//! ns/<home shard, 6 digits>/<namespace>    the NamespaceRecord as JSON
//! ```
//!
//! Keyed by home shard first, so that a shard's core reads only its own entries when it
//! opens. Entry and record are two writes (the shard's metadata has a prefix of its own), so
//! each change is ordered to end where a retry finishes it (the record first when making,
//! the entry first when deleting), and the home's core puts its entries right when it opens.

use std::collections::BTreeMap;

use tracing::info;

use crate::meta::NamespaceRecord;
use crate::{Core, CoreResult, meta};

const NAMESPACES: &str = "ns/";

fn namespace_key(shard: u32, name: &str) -> Vec<u8> {
    format!("{NAMESPACES}{shard:06}/{name}").into_bytes()
}

fn shard_prefix(shard: u32) -> Vec<u8> {
    format!("{NAMESPACES}{shard:06}/").into_bytes()
}

impl Core {
    /// Every namespace of the deployment: from the catalog in a cluster serving shards, else
    /// this core's own.
    pub async fn list_all_namespaces(&self) -> CoreResult<Vec<NamespaceRecord>> {
        let Some(catalog) = &self.inner.catalog else {
            return Ok(self.list_namespaces());
        };
        let mut all = BTreeMap::new();
        for (_, raw) in catalog
            .scan_prefix(NAMESPACES.as_bytes(), usize::MAX)
            .await?
        {
            let record: NamespaceRecord = meta::from_json("catalogued namespace", &raw)?;
            all.insert(record.name.clone(), record);
        }
        Ok(all.into_values().collect())
    }

    /// Lists a namespace this core made (or has) in the catalog.
    pub(crate) async fn catalog_namespace(&self, record: &NamespaceRecord) -> CoreResult<()> {
        let (Some(catalog), Some(p)) = (&self.inner.catalog, self.inner.config.placement) else {
            return Ok(());
        };
        let key = namespace_key(p.shard, &record.name);
        if catalog.get(&key).await?.is_none() {
            catalog.put(&key, &meta::to_json(record)).await?;
        }
        Ok(())
    }

    /// Takes a namespace out of the catalog, before its record goes.
    pub(crate) async fn uncatalog_namespace(&self, name: &str) -> CoreResult<()> {
        let (Some(catalog), Some(p)) = (&self.inner.catalog, self.inner.config.placement) else {
            return Ok(());
        };
        catalog.delete(&namespace_key(p.shard, name)).await?;
        Ok(())
    }

    /// Makes this shard's catalog entries say what its records do: a change that stopped
    /// between its two writes is finished (an entry without a record goes, a record without
    /// an entry gets one). Records of namespaces whose home is another shard (every shard made
    /// `default` before placements were checked) are not listed.
    pub(crate) async fn reconcile_catalog(&self) -> CoreResult<()> {
        let (Some(catalog), Some(p)) = (&self.inner.catalog, self.inner.config.placement) else {
            return Ok(());
        };
        let mut listed = BTreeMap::new();
        for (key, raw) in catalog
            .scan_prefix(&shard_prefix(p.shard), usize::MAX)
            .await?
        {
            let record: NamespaceRecord = meta::from_json("catalogued namespace", &raw)?;
            listed.insert(record.name, key);
        }
        let ours: Vec<NamespaceRecord> = self
            .list_namespaces()
            .into_iter()
            .filter(|n| p.is_home_of(&n.name))
            .collect();
        for record in &ours {
            if listed.remove(&record.name).is_none() {
                info!(namespace = %record.name, "catalog: listing a namespace its home made");
                catalog
                    .put(
                        &namespace_key(p.shard, &record.name),
                        &meta::to_json(record),
                    )
                    .await?;
            }
        }
        for (name, key) in listed {
            info!(namespace = %name, "catalog: unlisting a namespace its home no longer has");
            catalog.delete(&key).await?;
        }
        Ok(())
    }
}
