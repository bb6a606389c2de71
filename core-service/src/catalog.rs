//! The deployment's catalog of namespaces, for a core serving one shard of a cluster: each
//! namespace is made and held by its home shard's core, so no one core knows them all. The
//! home writes an entry next to its own record, in the metadata store all shards share,
//! fenced by the same shard lease, and any shard's core lists them from there.
//!
//! Streams are listed the same way by the core of the shard holding each: under the stream
//! scheme (`placement::Scheme::Stream`) a namespace's streams are spread over shards, and its
//! home lists them, validates offset commits and finds a namespace's streams from here.
//!
//! Keys, in the catalog's prefix (`catalog/` of the deployment's metadata namespace):
//!
//! ```text
//! ns/<home shard, 6 digits>/<namespace>               the NamespaceRecord as JSON
//! stream/ns/<namespace>\0<stream>                      the StreamRecord as JSON
//! stream/shard/<shard, 6 digits>/<namespace>\0<stream> the same, written in the same txn
//! ```
//!
//! Keyed by shard too, so that a shard's core reads only its own entries when it opens.
//! Entry and record are two writes (the shard's metadata has a prefix of its own), so each
//! change is ordered to end where a retry finishes it (the record first when making or
//! changing, the entry first when deleting), and each core puts its entries right when it
//! opens.

use std::collections::BTreeMap;

use tracing::{info, warn};
use tributary_storage::{Check, Op};

use crate::meta::{NamespaceRecord, StreamRecord};
use crate::{Core, CoreError, CoreResult, Scheme, meta};

const NAMESPACES: &str = "ns/";
const STREAMS_BY_NAMESPACE: &str = "stream/ns/";
const STREAMS_BY_SHARD: &str = "stream/shard/";

fn stream_key(ns: &str, name: &str) -> Vec<u8> {
    format!("{STREAMS_BY_NAMESPACE}{ns}\0{name}").into_bytes()
}

fn streams_of(ns: &str) -> Vec<u8> {
    format!("{STREAMS_BY_NAMESPACE}{ns}\0").into_bytes()
}

fn shard_stream_key(shard: u32, ns: &str, name: &str) -> Vec<u8> {
    format!("{STREAMS_BY_SHARD}{shard:06}/{ns}\0{name}").into_bytes()
}

fn shard_streams(shard: u32) -> Vec<u8> {
    format!("{STREAMS_BY_SHARD}{shard:06}/").into_bytes()
}

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

    /// Whether namespace `ns` is held by this core (its home, or the only core).
    pub(crate) fn owns_namespace(&self, ns: &str) -> bool {
        self.inner.config.placement.is_none_or(|p| p.is_home_of(ns))
    }

    /// Whether namespaces' streams are spread apart from their homes, so that this core lists
    /// them, checks namespaces and validates commits from the catalog.
    pub(crate) fn streams_spread(&self) -> bool {
        self.inner.catalog.is_some()
            && self
                .inner
                .config
                .placement
                .is_some_and(|p| p.scheme == Scheme::Stream)
    }

    /// Refuses `what`, a path that would cross shards while streams are spread over them and
    /// is not built across shards yet (docs/design/intra-namespace-spreading.md).
    pub(crate) fn refuse_when_spread(&self, what: &str) -> CoreResult<()> {
        if self.streams_spread() {
            return Err(CoreError::Unsupported(format!(
                "{what} with streams spread over shards (placement scheme 'stream')"
            )));
        }
        Ok(())
    }

    /// Lists (or relists, after a change) a stream this core holds.
    ///
    /// A stream of a namespace homed on another shard is listed anew only while the
    /// namespace's entry is there, in one transaction: its home unlists a namespace before
    /// counting its streams here, so a create racing a delete either is counted (and the
    /// delete refused) or finds the namespace gone (NamespaceNotFound), never leaves a stream
    /// behind it. A stream already listed is relisted while its own entry is unchanged: the
    /// entry already holds a delete back, and a delete that was refused (and relists the
    /// namespace) must not fail a change made meanwhile.
    pub(crate) async fn catalog_stream(&self, record: &StreamRecord) -> CoreResult<()> {
        let (Some(catalog), Some(p)) = (&self.inner.catalog, self.inner.config.placement) else {
            return Ok(());
        };
        let ns = &record.namespace;
        let mut checks = Vec::new();
        if !p.is_home_of(ns) {
            let own = stream_key(ns, &record.name);
            let home = namespace_key(tributary_proto::placement::shard_of(ns, p.shards), ns);
            let (key, entry) = match catalog.get(&own).await? {
                Some(entry) => (own, entry),
                None => match catalog.get(&home).await? {
                    Some(entry) => (home, entry),
                    None => return Err(CoreError::NamespaceNotFound(ns.clone())),
                },
            };
            checks.push(Check {
                key,
                value: Some(entry.to_vec()),
            });
        }
        let value = meta::to_json(record);
        let listed = catalog
            .txn(
                checks,
                vec![
                    Op::Put {
                        key: stream_key(&record.namespace, &record.name),
                        value: value.clone(),
                    },
                    Op::Put {
                        key: shard_stream_key(p.shard, &record.namespace, &record.name),
                        value,
                    },
                ],
            )
            .await?;
        if !listed {
            return Err(CoreError::NamespaceNotFound(ns.clone()));
        }
        Ok(())
    }

    /// Lists a stream this core holds if its entry is missing (a create whose entry failed).
    pub(crate) async fn catalog_stream_if_missing(&self, record: &StreamRecord) -> CoreResult<()> {
        let (Some(catalog), Some(p)) = (&self.inner.catalog, self.inner.config.placement) else {
            return Ok(());
        };
        let key = shard_stream_key(p.shard, &record.namespace, &record.name);
        if catalog.get(&key).await?.is_none() {
            self.catalog_stream(record).await?;
        }
        Ok(())
    }

    /// Takes a stream out of the catalog, before its record goes.
    pub(crate) async fn uncatalog_stream(&self, ns: &str, name: &str) -> CoreResult<()> {
        let (Some(catalog), Some(p)) = (&self.inner.catalog, self.inner.config.placement) else {
            return Ok(());
        };
        catalog
            .txn(
                Vec::<Check>::new(),
                vec![
                    Op::Delete {
                        key: stream_key(ns, name),
                    },
                    Op::Delete {
                        key: shard_stream_key(p.shard, ns, name),
                    },
                ],
            )
            .await?;
        Ok(())
    }

    /// The catalogued record of a stream of the deployment, wherever it is held.
    pub(crate) async fn catalogued_stream(
        &self,
        ns: &str,
        name: &str,
    ) -> CoreResult<Option<StreamRecord>> {
        let Some(catalog) = &self.inner.catalog else {
            return Ok(None);
        };
        match catalog.get(&stream_key(ns, name)).await? {
            Some(raw) => Ok(Some(meta::from_json("catalogued stream", &raw)?)),
            None => Ok(None),
        }
    }

    /// Every catalogued stream of a namespace, in name order.
    pub(crate) async fn catalogued_streams(&self, ns: &str) -> CoreResult<Vec<StreamRecord>> {
        let Some(catalog) = &self.inner.catalog else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (_, raw) in catalog.scan_prefix(&streams_of(ns), usize::MAX).await? {
            out.push(meta::from_json("catalogued stream", &raw)?);
        }
        Ok(out)
    }

    /// Whether namespace `ns` exists: this core's own record, or, for a namespace whose home
    /// is another shard, the catalog's.
    pub(crate) async fn require_namespace_anywhere(&self, ns: &str) -> CoreResult<()> {
        if self.require_namespace(ns).is_ok() {
            return Ok(());
        }
        let (Some(catalog), Some(p)) = (&self.inner.catalog, self.inner.config.placement) else {
            return Err(CoreError::NamespaceNotFound(ns.into()));
        };
        if p.is_home_of(ns) {
            return Err(CoreError::NamespaceNotFound(ns.into()));
        }
        let home = tributary_proto::placement::shard_of(ns, p.shards);
        match catalog.get(&namespace_key(home, ns)).await? {
            Some(_) => Ok(()),
            None => Err(CoreError::NamespaceNotFound(ns.into())),
        }
    }

    /// Makes this shard's stream entries say what its records do (as [`Self::reconcile_catalog`]
    /// for namespaces).
    async fn reconcile_stream_catalog(&self) -> CoreResult<()> {
        let (Some(catalog), Some(p)) = (&self.inner.catalog, self.inner.config.placement) else {
            return Ok(());
        };
        let mut listed: BTreeMap<Vec<u8>, bytes::Bytes> = catalog
            .scan_prefix(&shard_streams(p.shard), usize::MAX)
            .await?
            .into_iter()
            .collect();
        let records: Vec<StreamRecord> = self
            .inner
            .streams
            .read()
            .values()
            .map(|h| h.record.read().clone())
            .collect();
        for record in records {
            let key = shard_stream_key(p.shard, &record.namespace, &record.name);
            let same = listed
                .remove(&key)
                .is_some_and(|v| v[..] == meta::to_json(&record)[..]);
            if !same {
                let label = format!("{}/{}", record.namespace, record.name);
                info!(stream = %label, "catalog: listing a stream as its record says");
                match self.catalog_stream(&record).await {
                    // Made as its namespace was deleted, then stopped before it could
                    // remove itself: kept, unlisted, for an operator to look at.
                    Err(CoreError::NamespaceNotFound(_)) => {
                        warn!(stream = %label, "catalog: a stream of a namespace deleted meanwhile is kept but not listed; delete it or make the namespace again");
                    }
                    done => done?,
                }
            }
        }
        for (_, raw) in listed {
            let record: StreamRecord = meta::from_json("catalogued stream", &raw)?;
            info!(stream = %format!("{}/{}", record.namespace, record.name), "catalog: unlisting a stream this shard no longer has");
            self.uncatalog_stream(&record.namespace, &record.name)
                .await?;
        }
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
        self.reconcile_stream_catalog().await
    }
}
