//! Namespaces, streams and their partitions: admin, append, fetch, offsets, producers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::select_all;
use parking_lot::RwLock;
use prost::Message;
use tracing::{info, instrument, warn};
use tributary_proto::v1;
use tributary_storage::{BatchToAppend, Check, Op, PartitionKey, RetentionPolicy};

use crate::error::{CoreError, CoreResult};
use crate::groups::CommitCheck;
use crate::log_intents::LogChange;
use crate::meta::{
    self, EffectiveConfig, GroupRecord, NamespaceRecord, OffsetRecord, ProducerIdRecord,
    StreamRecord, StreamSettings, from_json, to_json, validate_name,
};
use crate::producers::{ProducerSnapshot, ProducerTable, SequenceCheck};
use crate::transactions::{AbortedTxn, PartitionTxns, aborted_prefix};
use crate::{Core, DEFAULT_NAMESPACE, now_ms};

/// Most partitions one stream may have.
pub const MAX_PARTITIONS: u32 = 10_000;
/// Kafka's epochs are 16-bit; a producer id whose epoch would overflow gets a new id.
const MAX_PRODUCER_EPOCH: i32 = i16::MAX as i32 - 1;
const SCAN_ALL: usize = usize::MAX;

pub(crate) struct StreamHandle {
    pub record: RwLock<StreamRecord>,
    partitions: RwLock<Vec<Arc<PartitionState>>>,
}

impl StreamHandle {
    pub fn partitions(&self) -> Vec<Arc<PartitionState>> {
        self.partitions.read().clone()
    }

    pub(crate) fn partition(&self, p: u32) -> CoreResult<Arc<PartitionState>> {
        let parts = self.partitions.read();
        parts.get(p as usize).cloned().ok_or_else(|| {
            let r = self.record.read();
            CoreError::PartitionNotFound {
                stream: format!("{}/{}", r.namespace, r.name),
                partition: p,
                count: parts.len() as u32,
            }
        })
    }
}

pub(crate) struct PartitionState {
    pub key: PartitionKey,
    /// Held from the sequence check to the end of the write, so that checks and appends of
    /// idempotent batches happen in one order.
    producers: tokio::sync::Mutex<ProducerTable>,
    snapshot_offset: AtomicI64,
    /// The end of everything appended here, durable or not: the furthest a WaitDurable may
    /// ask for (waiting past it would never end).
    appended_end: AtomicI64,
    /// Transactions open and aborted here (the coordinators are in transactions.rs).
    pub(crate) txns: parking_lot::Mutex<PartitionTxns>,
}

/// The header fields of a stored batch, decoded without its records: prost skips the
/// fields this message does not name.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredBatchHeader {
    #[prost(int64, tag = "6")]
    producer_id: i64,
    #[prost(int32, tag = "7")]
    producer_epoch: i32,
    #[prost(int32, tag = "8")]
    base_sequence: i32,
    #[prost(int64, tag = "10")]
    append_time_ms: i64,
    #[prost(string, tag = "12")]
    timer_id: String,
    #[prost(message, optional, tag = "13")]
    control: Option<v1::ControlMarker>,
}

fn stream_label(id: &v1::StreamId) -> String {
    format!("{}/{}", id.namespace, id.name)
}

pub(crate) fn namespace_or_default(ns: &str) -> &str {
    if ns.is_empty() { DEFAULT_NAMESPACE } else { ns }
}

fn stream_key(id: &v1::StreamId) -> (String, String) {
    (
        namespace_or_default(&id.namespace).to_string(),
        id.name.clone(),
    )
}

fn record_count(batch: &v1::RecordBatch) -> CoreResult<u32> {
    match (batch.records.is_empty(), batch.opaque.is_empty()) {
        (false, true) => u32::try_from(batch.records.len())
            .map_err(|_| CoreError::InvalidArgument("too many records in one batch".into())),
        (true, false) if batch.record_count > 0 => Ok(batch.record_count),
        (true, false) => Err(CoreError::InvalidArgument(
            "an opaque batch needs record_count > 0".into(),
        )),
        (false, false) => Err(CoreError::InvalidArgument(
            "a batch has either records or opaque, not both".into(),
        )),
        (true, true) => Err(CoreError::InvalidArgument("empty batch".into())),
    }
}

impl Core {
    // ---------------------------------------------------------------------------------
    // Start-up
    // ---------------------------------------------------------------------------------

    pub(crate) async fn load_metadata(&self) -> CoreResult<()> {
        let meta = &self.inner.meta;
        // First, before anything is written: a metadata store that knows nothing of a log
        // that holds data is the wrong store, not an empty deployment.
        self.check_log_has_metadata(&[
            meta::STREAM,
            crate::queues::QUEUE_KEY,
            crate::queues::SHARED_KEY,
        ])
        .await?;
        for (_, raw) in meta
            .scan_prefix(&meta::key(meta::NAMESPACE, &[]), SCAN_ALL)
            .await?
        {
            let ns: NamespaceRecord = from_json("namespace", &raw)?;
            self.inner.namespaces.write().insert(ns.name.clone(), ns);
        }
        // In a cluster serving shards, only the default namespace's home shard makes it.
        if !self.inner.namespaces.read().contains_key(DEFAULT_NAMESPACE)
            && self.placed_at_home(DEFAULT_NAMESPACE).is_ok()
        {
            self.create_namespace(DEFAULT_NAMESPACE, BTreeMap::new(), true)
                .await?;
        }
        // The core's own AMQP store of earlier versions: not migrated, said so once.
        for kind in ["amqpexchange", "amqpqueue", "amqpbinding", "amqpjournal"] {
            if !meta.scan_prefix(&meta::key(kind, &[]), 1).await?.is_empty() {
                warn!(
                    kind,
                    "AMQP definitions stored by an earlier version are ignored (not migrated): declare the exchanges, queues and bindings again"
                );
            }
        }
        let mut known = HashSet::new();
        for (_, raw) in meta
            .scan_prefix(&meta::key(meta::STREAM, &[]), SCAN_ALL)
            .await?
        {
            let record: StreamRecord = from_json("stream", &raw)?;
            let handle = self.open_stream(record).await?;
            for p in handle.partitions() {
                known.insert(p.key);
            }
        }
        self.reconcile_catalog().await?;
        // Queues of the queue engine own two partitions each.
        known.extend(self.queue_partitions().await?);
        // Partitions no record names: those of a create or delete that a crash interrupted
        // go, anything else stays (log_intents.rs).
        self.reconcile_log_partitions(&known).await
    }

    async fn open_stream(&self, record: StreamRecord) -> CoreResult<Arc<StreamHandle>> {
        let mut parts = Vec::with_capacity(record.partitions as usize);
        for p in 0..record.partitions {
            parts.push(
                self.open_partition(PartitionKey::new(record.id, p), record.backend.as_deref())
                    .await?,
            );
        }
        let key = (record.namespace.clone(), record.name.clone());
        let handle = Arc::new(StreamHandle {
            record: RwLock::new(record),
            partitions: RwLock::new(parts),
        });
        self.inner.streams.write().insert(key, handle.clone());
        Ok(handle)
    }

    /// Creates the partition in the log if needed (on `backend`, where it stays) and
    /// rebuilds its producer state.
    async fn open_partition(
        &self,
        key: PartitionKey,
        backend: Option<&str>,
    ) -> CoreResult<Arc<PartitionState>> {
        let log = &self.inner.log;
        log.create_partition_on(key, backend).await?;
        let snapshot_key = producer_snapshot_key(key);
        let snapshot: ProducerSnapshot = match self.inner.meta.get(&snapshot_key).await? {
            Some(raw) => from_json("producer snapshot", &raw)?,
            None => ProducerSnapshot::default(),
        };
        let bounds = log.bounds(key).await?;
        let mut table = snapshot.table;
        let replay_from = snapshot.offset.max(bounds.start_offset);
        self.scan_batch_headers(key, replay_from, |h, base, count| {
            if h.control.is_some() {
                // A transaction marker carries the producer's epoch at the time (bumped
                // when a coordinator fenced it), never a sequence.
                table.fence(h.producer_id, h.producer_epoch, h.append_time_ms);
            } else if h.producer_id > 0 {
                table.record(
                    h.producer_id,
                    h.producer_epoch,
                    h.base_sequence,
                    count,
                    base,
                    h.append_time_ms,
                );
            }
            true
        })
        .await?;
        let mut aborted = Vec::new();
        for (_, raw) in self
            .inner
            .meta
            .scan_prefix(&aborted_prefix(key.stream_id, key.partition), SCAN_ALL)
            .await?
        {
            let a: AbortedTxn = from_json("aborted transaction", &raw)?;
            aborted.push(a);
        }
        let state = Arc::new(PartitionState {
            key,
            producers: tokio::sync::Mutex::new(table),
            snapshot_offset: AtomicI64::new(snapshot.offset),
            appended_end: AtomicI64::new(bounds.end_offset),
            txns: parking_lot::Mutex::new(PartitionTxns::with_aborted(aborted)),
        });
        if bounds.end_offset - replay_from > self.inner.config.producer_snapshot_every {
            self.write_producer_snapshot(&state).await?;
        }
        Ok(state)
    }

    pub(crate) async fn write_producer_snapshot(&self, part: &PartitionState) -> CoreResult<()> {
        let mut table = part.producers.lock().await;
        // The table records a batch as soon as it is written, before it is durable. A
        // snapshot must not remember a batch a crash could still take back (a retry of it
        // would be answered as a duplicate), so wait until everything it remembers is durable.
        let written_end = table
            .producers
            .values()
            .flat_map(|e| e.batches.iter())
            .map(|b| b.base_offset + i64::from(b.record_count))
            .max()
            .unwrap_or(0);
        self.inner.log.wait_durable(part.key, written_end).await?;
        let offset = self.inner.log.bounds(part.key).await?.end_offset;
        table.expire(
            now_ms(),
            self.inner.config.producer_expiration.as_millis() as i64,
        );
        let snapshot = ProducerSnapshot {
            offset,
            table: table.clone(),
        };
        drop(table);
        self.inner
            .meta
            .put(&producer_snapshot_key(part.key), &to_json(&snapshot))
            .await?;
        part.snapshot_offset.fetch_max(offset, Ordering::AcqRel);
        Ok(())
    }

    /// Stores a record under a key that must not exist yet (another node may race us).
    async fn insert_new<T: serde::Serialize>(
        &self,
        key: Vec<u8>,
        record: &T,
        what: impl FnOnce() -> String,
    ) -> CoreResult<()> {
        if self
            .inner
            .meta
            .compare_and_set(&key, None, Some(&to_json(record)))
            .await?
        {
            Ok(())
        } else {
            Err(CoreError::Conflict(format!(
                "{} was created concurrently",
                what()
            )))
        }
    }

    // ---------------------------------------------------------------------------------
    // Namespaces
    // ---------------------------------------------------------------------------------

    pub async fn create_namespace(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        if_not_exists: bool,
    ) -> CoreResult<(NamespaceRecord, bool)> {
        validate_name("namespace", name)?;
        self.placed_at_home(name)?;
        let _admin = self.inner.admin.lock().await;
        let existing = self.inner.namespaces.read().get(name).cloned();
        if let Some(existing) = existing {
            if !if_not_exists {
                return Err(CoreError::NamespaceExists(name.into()));
            }
            // A make that failed between its record and its catalog entry ends here.
            self.catalog_namespace(&existing).await?;
            return Ok((existing, false));
        }
        let record = NamespaceRecord {
            name: name.into(),
            labels,
            created_at_ms: now_ms(),
        };
        self.insert_new(meta::key(meta::NAMESPACE, &[name]), &record, || {
            format!("namespace '{name}'")
        })
        .await?;
        self.inner
            .namespaces
            .write()
            .insert(name.into(), record.clone());
        self.catalog_namespace(&record).await?;
        Ok((record, true))
    }

    pub async fn delete_namespace(&self, name: &str) -> CoreResult<()> {
        if name == DEFAULT_NAMESPACE {
            return Err(CoreError::InvalidArgument(
                "the default namespace cannot be deleted".into(),
            ));
        }
        let _admin = self.inner.admin.lock().await;
        if !self.inner.namespaces.read().contains_key(name) {
            return Err(CoreError::NamespaceNotFound(name.into()));
        }
        let queues = self.queues_of(name).len();
        let addresses = self.address_count(name);
        if queues + addresses > 0 {
            return Err(CoreError::Conflict(format!(
                "namespace '{name}' still has {queues} queues and {addresses} addresses; delete them first"
            )));
        }
        let still_has = |streams: usize| {
            CoreError::Conflict(format!(
                "namespace '{name}' still has {streams} streams; delete them first"
            ))
        };
        if self.streams_spread() {
            // Its streams are made on other shards, which look the namespace up in the
            // catalog: unlisted first, so that no new one can start, then counted.
            self.uncatalog_namespace(name).await?;
            let streams = self.catalogued_streams(name).await?.len();
            if streams > 0 {
                let record = self.inner.namespaces.read().get(name).cloned();
                if let Some(record) = record {
                    self.catalog_namespace(&record).await?;
                }
                return Err(still_has(streams));
            }
        } else {
            let streams = self
                .inner
                .streams
                .read()
                .keys()
                .filter(|(ns, _)| ns == name)
                .count();
            if streams > 0 {
                return Err(still_has(streams));
            }
            self.uncatalog_namespace(name).await?;
        }
        self.inner
            .meta
            .delete(&meta::key(meta::NAMESPACE, &[name]))
            .await?;
        self.inner.namespaces.write().remove(name);
        Ok(())
    }

    pub fn list_namespaces(&self) -> Vec<NamespaceRecord> {
        self.inner.namespaces.read().values().cloned().collect()
    }

    /// Refuses a unit of `ns` other than a stream unless this core is the namespace's home
    /// ([`crate::Placement`]); a single core is every namespace's home.
    pub(crate) fn placed_at_home(&self, ns: &str) -> CoreResult<()> {
        match self.inner.config.placement {
            Some(p) if !p.is_home_of(ns) => Err(CoreError::WrongShard(
                format!("namespace '{ns}'"),
                tributary_proto::placement::shard_of(ns, p.shards),
                p.shard,
            )),
            _ => Ok(()),
        }
    }

    /// Refuses the stream `name` of `ns` unless this core's shard holds it.
    pub(crate) fn placed_here(&self, ns: &str, name: &str) -> CoreResult<()> {
        match self.inner.config.placement {
            Some(p) if !p.holds_stream(ns, name) => Err(CoreError::WrongShard(
                format!("stream '{ns}/{name}'"),
                tributary_proto::placement::shard_of_unit(
                    p.scheme,
                    ns,
                    Some(&tributary_proto::placement::stream_unit(name)),
                    p.shards,
                ),
                p.shard,
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn require_namespace(&self, ns: &str) -> CoreResult<()> {
        if self.inner.namespaces.read().contains_key(ns) {
            Ok(())
        } else {
            Err(CoreError::NamespaceNotFound(ns.into()))
        }
    }

    // ---------------------------------------------------------------------------------
    // Streams
    // ---------------------------------------------------------------------------------

    /// Whether a stream has `partition`: this core's own stream, or, when streams are spread
    /// over shards, the catalog's record of it (for a group's commits at the namespace's
    /// home). `counts` keeps what the catalog said per stream (`None`: no such stream), so
    /// that a commit of many partitions reads each stream's entry once.
    pub(crate) async fn partition_exists(
        &self,
        id: &v1::StreamId,
        partition: u32,
        counts: &mut HashMap<String, Option<u32>>,
    ) -> CoreResult<()> {
        let local = self
            .stream(id)
            .and_then(|h| h.partition(partition).map(|_| ()));
        if local.is_ok() || !self.streams_spread() {
            return local;
        }
        let (ns, name) = stream_key(id);
        let count = match counts.get(&name) {
            Some(count) => *count,
            None => {
                let count = self
                    .catalogued_stream(&ns, &name)
                    .await?
                    .map(|r| r.partitions);
                counts.insert(name, count);
                count
            }
        };
        match count {
            Some(count) if partition < count => Ok(()),
            Some(count) => Err(CoreError::PartitionNotFound {
                stream: stream_label(id),
                partition,
                count,
            }),
            None => Err(CoreError::StreamNotFound(stream_label(id))),
        }
    }

    pub(crate) fn stream(&self, id: &v1::StreamId) -> CoreResult<Arc<StreamHandle>> {
        self.inner
            .streams
            .read()
            .get(&stream_key(id))
            .cloned()
            .ok_or_else(|| CoreError::StreamNotFound(stream_label(id)))
    }

    /// The log store backend a new stream or queue goes to: the one asked for, else the
    /// store's default; `None` when the store has a single backend and none was asked for.
    pub(crate) fn resolve_backend(&self, requested: Option<&str>) -> CoreResult<Option<String>> {
        let names = self.inner.log.backend_names();
        match requested {
            None => Ok(names.into_iter().next()),
            Some(name) if names.iter().any(|n| n == name) => Ok(Some(name.to_string())),
            Some(name) if names.is_empty() => Err(CoreError::InvalidConfig(format!(
                "storage '{name}' cannot be chosen: this server has a single log store"
            ))),
            Some(name) => Err(CoreError::InvalidConfig(format!(
                "storage '{name}' is not configured on this server (available: {})",
                names.join(", ")
            ))),
        }
    }

    /// Creates a stream. Returns its description and whether it was created now.
    #[instrument(skip_all, fields(stream = %stream_label(&id)))]
    pub async fn create_stream(
        &self,
        id: v1::StreamId,
        partitions: u32,
        settings: StreamSettings,
        if_not_exists: bool,
        validate_only: bool,
    ) -> CoreResult<(v1::StreamInfo, bool)> {
        self.check_running()?;
        let (ns, name) = stream_key(&id);
        validate_name("stream", &name)?;
        self.placed_here(&ns, &name)?;
        self.require_namespace_anywhere(&ns).await?;
        let partitions = if partitions == 0 {
            self.inner.config.default_partitions
        } else {
            partitions
        };
        if partitions > MAX_PARTITIONS {
            return Err(CoreError::InvalidArgument(format!(
                "at most {MAX_PARTITIONS} partitions, got {partitions}"
            )));
        }
        settings.validate()?;
        let backend = self.resolve_backend(settings.storage.as_deref())?;
        let _admin = self.inner.admin.lock().await;
        // A delete of a namespace this core holds may have run while this waited for the lock
        // (one held elsewhere is checked again as the stream is listed).
        if self.owns_namespace(&ns) {
            self.require_namespace(&ns)?;
        }
        if let Ok(existing) = self.stream(&id) {
            if !if_not_exists {
                return Err(CoreError::StreamExists(stream_label(&id)));
            }
            // A create whose catalog entry failed ends here.
            let record = existing.record.read().clone();
            self.catalog_stream_if_missing(&record).await?;
            return Ok((self.describe_handle(&existing).await?, false));
        }
        self.check_delay_target(&ns, &name, &settings)?;
        if validate_only {
            let record = StreamRecord {
                namespace: ns,
                name,
                id: 0,
                uuid: String::new(),
                partitions,
                settings,
                created_at_ms: now_ms(),
                backend,
            };
            return Ok((self.info_without_bounds(&record), false));
        }
        let stream_id = self.next_counter("stream_id").await?;
        let record = StreamRecord {
            namespace: ns.clone(),
            name: name.clone(),
            id: stream_id,
            uuid: new_uuid(),
            partitions,
            settings,
            created_at_ms: now_ms(),
            backend,
        };
        // Partitions first, then the record: a crash in between leaves orphan partitions
        // that the next start removes (the intent names them), never a stream without its
        // partitions.
        self.begin_log_change(stream_id, LogChange::Create).await?;
        for p in 0..partitions {
            self.inner
                .log
                .create_partition_on(PartitionKey::new(stream_id, p), record.backend.as_deref())
                .await?;
        }
        self.insert_new(meta::key(meta::STREAM, &[&ns, &name]), &record, || {
            format!("stream '{ns}/{name}'")
        })
        .await?;
        self.end_log_change(stream_id).await?;
        let listed = record.clone();
        let handle = self.open_stream(record).await?;
        self.ensure_stream_address(&ns, &name).await?;
        self.start_stream_forwarders(&handle, 0, true);
        info!(partitions, "stream created");
        // Last: a failure leaves a working stream that a retry (or the next open) lists.
        match self.catalog_stream(&listed).await {
            Err(CoreError::NamespaceNotFound(ns)) => {
                // Its namespace was deleted at its home meanwhile: nothing of it stays.
                self.delete_stream_locked(&id).await?;
                return Err(CoreError::NamespaceNotFound(ns));
            }
            done => done?,
        }
        Ok((self.describe_handle(&handle).await?, true))
    }

    #[instrument(skip_all, fields(stream = %stream_label(id)))]
    pub async fn delete_stream(&self, id: &v1::StreamId) -> CoreResult<()> {
        let _admin = self.inner.admin.lock().await;
        self.delete_stream_locked(id).await
    }

    /// [`Self::delete_stream`] with the admin lock held.
    async fn delete_stream_locked(&self, id: &v1::StreamId) -> CoreResult<()> {
        let handle = self.stream(id)?;
        let (ns, name) = stream_key(id);
        let stream_id = handle.record.read().id;
        self.uncatalog_stream(&ns, &name).await?;
        self.begin_log_change(stream_id, LogChange::Delete).await?;
        self.inner
            .meta
            .delete(&meta::key(meta::STREAM, &[&ns, &name]))
            .await?;
        self.forget_target(&ns, &crate::router::Target::Stream(name.clone()))
            .await?;
        self.drop_stream_address(&ns, &name).await?;
        self.inner.streams.write().remove(&(ns, name));
        for part in handle.partitions() {
            self.inner.log.delete_partition(part.key).await?;
            self.inner
                .meta
                .delete(&producer_snapshot_key(part.key))
                .await?;
        }
        self.end_log_change(stream_id).await?;
        info!("stream deleted");
        Ok(())
    }

    pub async fn list_streams(&self, namespace: &str) -> CoreResult<Vec<v1::StreamInfo>> {
        let ns = namespace_or_default(namespace);
        if self.streams_spread() {
            // Held by the shards their placement gives them: listed from the catalog,
            // without their partitions' bounds (which each stream's own shard answers).
            self.require_namespace_anywhere(ns).await?;
            return Ok(self
                .catalogued_streams(ns)
                .await?
                .iter()
                .map(|r| self.info_without_bounds(r))
                .collect());
        }
        self.require_namespace(ns)?;
        let handles: Vec<_> = self
            .inner
            .streams
            .read()
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|(_, h)| h.clone())
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(self.describe_handle(&h).await?);
        }
        Ok(out)
    }

    /// Every stream of every namespace, for the admin API.
    pub async fn list_all_streams(&self) -> CoreResult<Vec<v1::StreamInfo>> {
        let handles: Vec<_> = self.inner.streams.read().values().cloned().collect();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(self.describe_handle(&h).await?);
        }
        Ok(out)
    }

    pub async fn describe_stream(&self, id: &v1::StreamId) -> CoreResult<v1::StreamInfo> {
        let handle = self.stream(id)?;
        self.describe_handle(&handle).await
    }

    /// The configs in force for a stream, defaults filled in.
    pub fn effective_config(&self, id: &v1::StreamId) -> CoreResult<EffectiveConfig> {
        let handle = self.stream(id)?;
        let settings = handle.record.read().settings.clone();
        Ok(EffectiveConfig::resolve(
            &settings,
            &self.inner.config.stream_defaults,
        ))
    }

    fn info_without_bounds(&self, r: &StreamRecord) -> v1::StreamInfo {
        let eff = EffectiveConfig::resolve(&r.settings, &self.inner.config.stream_defaults);
        v1::StreamInfo {
            id: Some(v1::StreamId::new(&r.namespace, &r.name)),
            uuid: r.uuid.clone(),
            partitions: r.partitions,
            config: Some(v1::StreamConfig {
                retention_ms: Some(eff.retention_ms),
                retention_bytes: Some(eff.retention_bytes),
                max_message_bytes: Some(eff.max_message_bytes),
                cleanup_policy: Some(eff.cleanup_policy),
                extra: r.settings.extra.clone().into_iter().collect(),
                storage: r.backend.clone(),
                delay_target: r.settings.delay_target.clone(),
            }),
            created_at_ms: r.created_at_ms,
            partition_info: Vec::new(),
            explicit_configs: [
                ("retention_ms", r.settings.retention_ms.is_some()),
                ("retention_bytes", r.settings.retention_bytes.is_some()),
                ("max_message_bytes", r.settings.max_message_bytes.is_some()),
                ("cleanup_policy", r.settings.cleanup_policy.is_some()),
                ("storage", r.settings.storage.is_some()),
                ("delay_target", r.settings.delay_target.is_some()),
            ]
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| k.to_string())
            .collect(),
        }
    }

    async fn describe_handle(&self, handle: &StreamHandle) -> CoreResult<v1::StreamInfo> {
        let record = handle.record.read().clone();
        let mut info = self.info_without_bounds(&record);
        for part in handle.partitions() {
            let b = self.inner.log.bounds(part.key).await?;
            info.partition_info.push(v1::PartitionInfo {
                partition: part.key.partition,
                start_offset: b.start_offset,
                end_offset: b.end_offset,
                size_bytes: b.size_bytes as i64,
            });
        }
        Ok(info)
    }

    async fn save_stream_record(&self, old: &StreamRecord, new: &StreamRecord) -> CoreResult<()> {
        let key = meta::key(meta::STREAM, &[&new.namespace, &new.name]);
        if !self
            .inner
            .meta
            .compare_and_set(&key, Some(&to_json(old)), Some(&to_json(new)))
            .await?
        {
            return Err(CoreError::Conflict(format!(
                "stream '{}/{}' changed concurrently",
                new.namespace, new.name
            )));
        }
        Ok(())
    }

    #[instrument(skip_all, fields(stream = %stream_label(id)))]
    pub async fn create_partitions(
        &self,
        id: &v1::StreamId,
        total: u32,
        validate_only: bool,
    ) -> CoreResult<v1::StreamInfo> {
        let _admin = self.inner.admin.lock().await;
        let handle = self.stream(id)?;
        let old = handle.record.read().clone();
        if total <= old.partitions {
            return Err(CoreError::InvalidArgument(format!(
                "stream has {} partitions; the new count must be larger, got {total}",
                old.partitions
            )));
        }
        if total > MAX_PARTITIONS {
            return Err(CoreError::InvalidArgument(format!(
                "at most {MAX_PARTITIONS} partitions, got {total}"
            )));
        }
        if validate_only {
            return self.describe_handle(&handle).await;
        }
        let mut added = Vec::new();
        for p in old.partitions..total {
            added.push(
                self.open_partition(PartitionKey::new(old.id, p), old.backend.as_deref())
                    .await?,
            );
        }
        let new = StreamRecord {
            partitions: total,
            ..old.clone()
        };
        self.save_stream_record(&old, &new).await?;
        *handle.record.write() = new.clone();
        handle.partitions.write().extend(added);
        self.start_stream_forwarders(&handle, old.partitions, true);
        self.catalog_stream(&new).await?;
        self.describe_handle(&handle).await
    }

    #[instrument(skip_all, fields(stream = %stream_label(id)))]
    pub async fn update_stream_config(
        &self,
        id: &v1::StreamId,
        set: StreamSettings,
        reset: &[String],
        validate_only: bool,
    ) -> CoreResult<v1::StreamInfo> {
        let _admin = self.inner.admin.lock().await;
        let handle = self.stream(id)?;
        let old = handle.record.read().clone();
        let mut settings = old.settings.clone();
        for name in reset {
            match name.as_str() {
                "retention_ms" => settings.retention_ms = None,
                "retention_bytes" => settings.retention_bytes = None,
                "max_message_bytes" => settings.max_message_bytes = None,
                "cleanup_policy" => settings.cleanup_policy = None,
                "delay_target" => settings.delay_target = None,
                "storage" => {
                    return Err(CoreError::InvalidConfig(
                        "storage is chosen when a stream is created and cannot be reset".into(),
                    ));
                }
                other => match other.strip_prefix("extra.") {
                    Some(k) => {
                        settings.extra.remove(k);
                    }
                    None => {
                        return Err(CoreError::InvalidConfig(format!(
                            "unknown config '{other}' to reset"
                        )));
                    }
                },
            }
        }
        settings.retention_ms = set.retention_ms.or(settings.retention_ms);
        settings.retention_bytes = set.retention_bytes.or(settings.retention_bytes);
        settings.max_message_bytes = set.max_message_bytes.or(settings.max_message_bytes);
        settings.cleanup_policy = set.cleanup_policy.or(settings.cleanup_policy);
        settings.extra.extend(set.extra);
        settings.delay_target = set.delay_target.or(settings.delay_target);
        if let Some(storage) = set.storage
            && Some(&storage) != old.backend.as_ref()
        {
            return Err(CoreError::InvalidConfig(format!(
                "storage is chosen when a stream is created and cannot change: this one is on '{}', not '{storage}'",
                old.backend.as_deref().unwrap_or("the default store")
            )));
        }
        settings.validate()?;
        self.check_delay_target(&old.namespace, &old.name, &settings)?;
        if validate_only {
            let mut info = self.describe_handle(&handle).await?;
            info.config = self
                .info_without_bounds(&StreamRecord { settings, ..old })
                .config;
            return Ok(info);
        }
        let new = StreamRecord {
            settings,
            ..old.clone()
        };
        let becomes_delay_line =
            old.settings.delay_target.is_none() && new.settings.delay_target.is_some();
        self.save_stream_record(&old, &new).await?;
        *handle.record.write() = new.clone();
        self.catalog_stream(&new).await?;
        if becomes_delay_line {
            self.start_delay_line(&handle).await?;
        }
        self.describe_handle(&handle).await
    }

    pub async fn delete_records(
        &self,
        id: &v1::StreamId,
        partition: u32,
        before: i64,
    ) -> CoreResult<i64> {
        let part = self.stream(id)?.partition(partition)?;
        let bounds = self.inner.log.bounds(part.key).await?;
        // -1 means "up to the high watermark", as in Kafka's DeleteRecords.
        let before = if before == -1 {
            bounds.end_offset
        } else {
            before
        };
        if before < 0 || before > bounds.end_offset {
            return Err(CoreError::OffsetOutOfRange {
                requested: before,
                start: bounds.start_offset,
                end: bounds.end_offset,
            });
        }
        Ok(self.inner.log.truncate_prefix(part.key, before).await?)
    }

    /// Moves a counter up to at least `floor` (never down), so that [`Self::next_counter`]
    /// hands out only values above it.
    pub(crate) async fn raise_counter_to(&self, name: &str, floor: u64) -> CoreResult<()> {
        let (from, raised) = self
            .update_counter(name, |v| (v < floor).then_some(floor))
            .await?;
        if raised.is_some() {
            warn!(
                counter = name,
                from,
                to = floor,
                "id counter raised past the partitions in the log"
            );
        }
        Ok(())
    }

    /// A new producer id. Each shard of a cluster counts its own, so a core serving a shard
    /// spreads them (`count × shards + shard`): two shards never hand out the same id, which
    /// a partition's producer table (keyed by id alone) relies on once one namespace's
    /// producers and partitions are in different shards. A single core counts 1, 2, 3, ...
    pub(crate) async fn next_producer_id(&self) -> CoreResult<i64> {
        let count = self.next_counter("producer_id").await?;
        let id = match self.inner.config.placement {
            Some(p) => count
                .checked_mul(u64::from(p.shards.max(1)))
                .and_then(|v| v.checked_add(u64::from(p.shard))),
            None => Some(count),
        };
        id.and_then(|v| i64::try_from(v).ok())
            .ok_or_else(|| CoreError::Corrupt("the producer id counter overflowed".into()))
    }

    pub(crate) async fn next_counter(&self, name: &str) -> CoreResult<u64> {
        let (value, next) = self.update_counter(name, |v| Some(v + 1)).await?;
        Ok(next.unwrap_or(value + 1))
    }

    /// Compare-and-sets a counter to `change(current)` (left as it is on `None`), retrying
    /// on a concurrent change; returns the value it saw and the one it wrote.
    async fn update_counter(
        &self,
        name: &str,
        change: impl Fn(u64) -> Option<u64>,
    ) -> CoreResult<(u64, Option<u64>)> {
        let key = meta::key(meta::COUNTER, &[name]);
        loop {
            let current = self.inner.meta.get(&key).await?;
            let value = match &current {
                Some(raw) => u64::from_le_bytes(
                    raw[..]
                        .try_into()
                        .map_err(|_| CoreError::Corrupt(format!("counter '{name}'")))?,
                ),
                None => 0,
            };
            let Some(next) = change(value) else {
                return Ok((value, None));
            };
            if self
                .inner
                .meta
                .compare_and_set(&key, current.as_deref(), Some(&next.to_le_bytes()))
                .await?
            {
                return Ok((value, Some(next)));
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Append and fetch
    // ---------------------------------------------------------------------------------

    /// Appends one batch durably and returns where it landed.
    #[instrument(skip_all, fields(stream = tracing::field::Empty, partition = req.partition))]
    pub async fn append(&self, req: v1::AppendRequest) -> CoreResult<v1::AppendResponse> {
        self.check_running()?;
        let id = req
            .stream
            .ok_or_else(|| CoreError::InvalidArgument("stream is required".into()))?;
        tracing::Span::current().record("stream", stream_label(&id));
        let defer_durable = req.defer_durable;
        let mut batch = req
            .batch
            .ok_or_else(|| CoreError::InvalidArgument("batch is required".into()))?;
        let count = record_count(&batch)?;
        let handle = match self.stream(&id) {
            Ok(h) => h,
            Err(CoreError::StreamNotFound(_))
                if req.auto_create && self.inner.config.auto_create_streams =>
            {
                self.create_stream(id.clone(), 0, StreamSettings::default(), true, false)
                    .await?;
                self.stream(&id)?
            }
            Err(e) => return Err(e),
        };
        let part = handle.partition(req.partition)?;
        let max_bytes = EffectiveConfig::resolve(
            &handle.record.read().settings,
            &self.inner.config.stream_defaults,
        )
        .max_message_bytes;

        let now = now_ms();
        for r in &mut batch.records {
            if r.timestamp_ms == 0 {
                r.timestamp_ms = now;
            }
        }
        let max_ts = match batch.records.iter().map(|r| r.timestamp_ms).max() {
            Some(ts) => ts,
            None if batch.max_timestamp_ms > 0 => batch.max_timestamp_ms,
            None => now,
        };
        batch.max_timestamp_ms = max_ts;
        batch.append_time_ms = now;
        batch.base_offset = 0;
        batch.record_count = count;
        // Producer ids start at 1, so the proto3 default 0 means "not idempotent".
        let idempotent = batch.producer_id > 0;
        if batch.control.is_some() {
            return Err(CoreError::InvalidArgument(
                "control batches are written by the transaction coordinator only".into(),
            ));
        }
        if batch.transactional && !idempotent {
            return Err(CoreError::InvalidArgument(
                "a transactional batch needs a producer id".into(),
            ));
        }
        let transactional = batch.transactional;
        let (pid, epoch, seq) = (batch.producer_id, batch.producer_epoch, batch.base_sequence);
        let payload = Bytes::from(batch.encode_to_vec());
        if payload.len() as i64 > max_bytes {
            return Err(CoreError::RecordTooLarge {
                size: payload.len(),
                limit: max_bytes,
            });
        }
        let bytes_in = payload.len();
        let to_append = BatchToAppend {
            record_count: count,
            max_timestamp_ms: max_ts,
            payload,
        };

        let log = &self.inner.log;
        let base = if idempotent {
            let mut table = part.producers.lock().await;
            match table.check(pid, epoch, seq, count)? {
                SequenceCheck::Duplicate {
                    base_offset,
                    record_count,
                } => {
                    drop(table);
                    if !defer_durable {
                        log.wait_durable(part.key, base_offset + i64::from(record_count))
                            .await?;
                    }
                    let start = log.bounds(part.key).await.map_or(-1, |b| b.start_offset);
                    return Ok(v1::AppendResponse {
                        base_offset,
                        duplicate: true,
                        append_time_ms: now,
                        log_start_offset: start,
                    });
                }
                SequenceCheck::Accept => {
                    if transactional {
                        part.txns.lock().check_append(pid, epoch)?;
                    }
                    let base = log.append(part.key, to_append).await?;
                    table.record(pid, epoch, seq, count, base, now);
                    base
                }
            }
        } else {
            log.append(part.key, to_append).await?
        };
        let end = base + i64::from(count);
        part.appended_end.fetch_max(end, Ordering::AcqRel);
        if !defer_durable {
            log.wait_durable(part.key, end).await?;
        }
        metrics::counter!("tributary_records_in_total").increment(u64::from(count));
        metrics::counter!("tributary_bytes_in_total").increment(bytes_in as u64);
        if end - part.snapshot_offset.load(Ordering::Acquire)
            > self.inner.config.producer_snapshot_every
        {
            // (The snapshot waits for durability itself, so a deferred append may start it.)
            // Bump first so that concurrent appends do not all start a snapshot.
            part.snapshot_offset.store(end, Ordering::Release);
            let core = self.clone();
            let part = part.clone();
            tokio::spawn(async move {
                if let Err(e) = core.write_producer_snapshot(&part).await {
                    warn!(partition = %part.key, error = %e, "producer snapshot failed");
                }
            });
        }
        // The batch is stored: a log closing meanwhile (a shutdown, a shard handed to another
        // node) must not turn that into a failure the client would retry, storing it twice.
        // The log start is then unknown, which Kafka says with -1.
        let start = log.bounds(part.key).await.map_or(-1, |b| b.start_offset);
        Ok(v1::AppendResponse {
            base_offset: base,
            duplicate: false,
            append_time_ms: now,
            log_start_offset: start,
        })
    }

    /// Waits until a partition is durable below `end_offset`: the second half of an append
    /// made with `defer_durable`.
    #[instrument(skip_all, fields(stream = tracing::field::Empty, partition = req.partition))]
    pub async fn wait_durable(
        &self,
        req: v1::WaitDurableRequest,
    ) -> CoreResult<v1::WaitDurableResponse> {
        self.check_running()?;
        let id = req
            .stream
            .ok_or_else(|| CoreError::InvalidArgument("stream is required".into()))?;
        tracing::Span::current().record("stream", stream_label(&id));
        let part = self.stream(&id)?.partition(req.partition)?;
        let appended = part.appended_end.load(Ordering::Acquire);
        if req.end_offset > appended {
            return Err(CoreError::InvalidArgument(format!(
                "end offset {} is past the partition's last append (end {appended})",
                req.end_offset
            )));
        }
        self.inner
            .log
            .wait_durable(part.key, req.end_offset)
            .await?;
        let start = self.inner.log.bounds(part.key).await?.start_offset;
        Ok(v1::WaitDurableResponse {
            log_start_offset: start,
        })
    }

    /// Appends a batch the core itself builds (a transaction marker) durably, outside the
    /// sequence checks; the marker's epoch fences older epochs of its producer here.
    pub(crate) async fn append_control_batch(
        &self,
        part: &PartitionState,
        batch: v1::RecordBatch,
    ) -> CoreResult<i64> {
        let (pid, epoch, now) = (
            batch.producer_id,
            batch.producer_epoch,
            batch.append_time_ms,
        );
        let to_append = BatchToAppend {
            record_count: 1,
            max_timestamp_ms: batch.max_timestamp_ms,
            payload: Bytes::from(batch.encode_to_vec()),
        };
        let log = &self.inner.log;
        let mut table = part.producers.lock().await;
        let base = log.append(part.key, to_append).await?;
        table.fence(pid, epoch, now);
        drop(table);
        log.wait_durable(part.key, base + 1).await?;
        Ok(base)
    }

    /// Reads from several partitions, waiting up to `max_wait_ms` for `min_bytes`.
    #[instrument(skip_all, fields(partitions = req.partitions.len()))]
    pub async fn fetch(&self, req: v1::FetchRequest) -> CoreResult<v1::FetchResponse> {
        self.check_running()?;
        if req.max_wait_ms < 0 || req.max_bytes < 0 || req.min_bytes < 0 {
            return Err(CoreError::InvalidArgument(
                "max_wait_ms, max_bytes and min_bytes must be >= 0".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.max_wait_ms as u64);
        // Bounded well under the gRPC message limit whatever the client asks for.
        let max_total = match req.max_bytes {
            0 => 50 << 20,
            n => (n as usize).min(128 << 20),
        };
        let mut shutdown = self.inner.shutdown.subscribe();
        // Subscribe before reading so that data arriving in between still wakes us.
        let mut resolved = Vec::with_capacity(req.partitions.len());
        let mut watches = Vec::new();
        for fp in &req.partitions {
            let target = fp
                .stream
                .as_ref()
                .ok_or_else(|| CoreError::InvalidArgument("stream is required".into()))
                .and_then(|id| self.stream(id))
                .and_then(|h| h.partition(fp.partition));
            if let Ok(part) = &target {
                let mut rx = self.inner.log.watch_end(part.key)?;
                rx.borrow_and_update();
                watches.push(rx);
            }
            resolved.push(target);
        }
        loop {
            let mut out = Vec::with_capacity(req.partitions.len());
            let mut total = 0usize;
            for (fp, target) in req.partitions.iter().zip(&resolved) {
                let mut fetched = v1::FetchedPartition {
                    stream: fp.stream.clone(),
                    partition: fp.partition,
                    ..Default::default()
                };
                match target {
                    Err(e) => {
                        fetched.error = e.code() as i32;
                        fetched.error_message = e.to_string();
                    }
                    Ok(part) => {
                        let limit = match fp.max_bytes {
                            n if n > 0 => (n as usize).min(max_total.saturating_sub(total)),
                            _ => max_total.saturating_sub(total),
                        };
                        match self
                            .read_partition(part, fp.offset, limit, total == 0)
                            .await
                        {
                            Ok((bounds, mut batches)) => {
                                fetched.start_offset = bounds.start_offset;
                                fetched.end_offset = bounds.end_offset;
                                let txns = part.txns.lock();
                                let lso = txns.last_stable_offset(bounds.end_offset);
                                fetched.last_stable_offset = lso;
                                if req.read_committed {
                                    batches.retain(|b| b.base_offset < lso);
                                    let upper = batches.last().map_or(fp.offset, |b| {
                                        b.base_offset + i64::from(b.record_count)
                                    });
                                    fetched.aborted_transactions =
                                        txns.aborted_between(fp.offset, upper);
                                }
                                drop(txns);
                                total += batches.iter().map(|b| b.encoded_len()).sum::<usize>();
                                fetched.batches = batches;
                            }
                            Err(e) => {
                                let bounds =
                                    self.inner.log.bounds(part.key).await.unwrap_or_default();
                                fetched.start_offset = bounds.start_offset;
                                fetched.end_offset = bounds.end_offset;
                                fetched.last_stable_offset =
                                    part.txns.lock().last_stable_offset(bounds.end_offset);
                                fetched.error = e.code() as i32;
                                fetched.error_message = e.to_string();
                            }
                        }
                    }
                }
                out.push(fetched);
            }
            let errors = out.iter().any(|p| p.error != 0);
            if total >= req.min_bytes.max(1) as usize
                || req.min_bytes == 0
                || errors
                || watches.is_empty()
                || *self.inner.shutdown.borrow()
                || tokio::time::Instant::now() >= deadline
            {
                let records: u64 = out
                    .iter()
                    .flat_map(|p| &p.batches)
                    .map(|b| u64::from(b.record_count))
                    .sum();
                metrics::counter!("tributary_records_out_total").increment(records);
                metrics::counter!("tributary_bytes_out_total").increment(total as u64);
                return Ok(v1::FetchResponse { partitions: out });
            }
            let changed = select_all(watches.iter_mut().map(|rx| Box::pin(rx.changed())));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = shutdown.changed() => {}
            }
            for rx in &mut watches {
                rx.borrow_and_update();
            }
        }
    }

    pub(crate) async fn read_partition(
        &self,
        part: &PartitionState,
        offset: i64,
        max_bytes: usize,
        first: bool,
    ) -> CoreResult<(tributary_storage::PartitionBounds, Vec<v1::RecordBatch>)> {
        let log = &self.inner.log;
        let bounds = log.bounds(part.key).await?;
        if max_bytes == 0 && !first {
            if offset < bounds.start_offset || offset > bounds.end_offset {
                return Err(CoreError::OffsetOutOfRange {
                    requested: offset,
                    start: bounds.start_offset,
                    end: bounds.end_offset,
                });
            }
            return Ok((bounds, Vec::new()));
        }
        let stored = log.read(part.key, offset, max_bytes.max(1)).await?;
        let mut batches = Vec::with_capacity(stored.len());
        for s in stored {
            let mut b = v1::RecordBatch::decode(s.payload).map_err(|e| {
                CoreError::Corrupt(format!(
                    "undecodable batch at {}@{}: {e}",
                    part.key, s.base_offset
                ))
            })?;
            b.base_offset = s.base_offset;
            b.record_count = s.record_count;
            batches.push(b);
        }
        // An append landing between the bounds read and the data read would otherwise be
        // returned with an end offset that does not cover it: read the bounds again.
        let read_end = batches
            .last()
            .map_or(0, |b| b.base_offset + i64::from(b.record_count));
        let bounds = if read_end > bounds.end_offset {
            log.bounds(part.key).await?
        } else {
            bounds
        };
        Ok((bounds, batches))
    }

    pub async fn list_offsets(
        &self,
        req: v1::ListOffsetsRequest,
    ) -> CoreResult<v1::ListOffsetsResponse> {
        let id = req
            .stream
            .ok_or_else(|| CoreError::InvalidArgument("stream is required".into()))?;
        let part = self.stream(&id)?.partition(req.partition)?;
        let log = &self.inner.log;
        let bounds = log.bounds(part.key).await?;
        use v1::list_offsets_request::Spec;
        match req.spec {
            None | Some(Spec::Latest(_)) => Ok(v1::ListOffsetsResponse {
                offset: if req.read_committed {
                    part.txns.lock().last_stable_offset(bounds.end_offset)
                } else {
                    bounds.end_offset
                },
                timestamp_ms: -1,
            }),
            Some(Spec::Earliest(_)) => Ok(v1::ListOffsetsResponse {
                offset: bounds.start_offset,
                timestamp_ms: -1,
            }),
            Some(Spec::TimestampMs(ts)) => {
                let Some(base) = log.offset_for_timestamp(part.key, ts).await? else {
                    return Ok(v1::ListOffsetsResponse {
                        offset: -1,
                        timestamp_ms: -1,
                    });
                };
                let (_, batches) = self.read_partition(&part, base, 1, true).await?;
                let Some(batch) = batches.into_iter().next() else {
                    return Ok(v1::ListOffsetsResponse {
                        offset: -1,
                        timestamp_ms: -1,
                    });
                };
                // Envelope batches can be narrowed to the record; opaque ones answer with
                // the batch and leave the rest to the gateway that understands them.
                let hit =
                    batch.records.iter().enumerate().find(|(i, r)| {
                        r.timestamp_ms >= ts && batch.base_offset + *i as i64 >= base
                    });
                Ok(match hit {
                    Some((i, r)) => v1::ListOffsetsResponse {
                        offset: batch.base_offset + i as i64,
                        timestamp_ms: r.timestamp_ms,
                    },
                    None if batch.records.is_empty() => v1::ListOffsetsResponse {
                        offset: batch.base_offset.max(base),
                        timestamp_ms: batch.max_timestamp_ms,
                    },
                    None => v1::ListOffsetsResponse {
                        offset: -1,
                        timestamp_ms: -1,
                    },
                })
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Producers
    // ---------------------------------------------------------------------------------

    /// Allocates a producer id, or bumps the epoch of an existing one (fencing older epochs).
    pub async fn init_producer(
        &self,
        req: v1::InitProducerRequest,
    ) -> CoreResult<v1::InitProducerResponse> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        let meta = &self.inner.meta;
        if !req.transactional_id.is_empty() {
            return self
                .init_transactional_producer(&ns, &req.transactional_id, &req)
                .await;
        }
        if req.producer_id > 0 {
            let key = meta::key(meta::PRODUCER_EPOCH, &[&req.producer_id.to_string()]);
            let current = meta
                .get(&key)
                .await?
                .ok_or(CoreError::UnknownProducer(req.producer_id))?;
            let r: ProducerIdRecord = from_json("producer", &current)?;
            if r.epoch != req.producer_epoch {
                return Err(CoreError::ProducerFenced {
                    producer_id: r.producer_id,
                    got: req.producer_epoch,
                    current: r.epoch,
                });
            }
            let next = self.next_epoch(r).await?;
            let next_key = meta::key(meta::PRODUCER_EPOCH, &[&next.producer_id.to_string()]);
            if !meta
                .compare_and_set(&key, Some(&current), Some(&to_json(&next)))
                .await?
            {
                return Err(CoreError::Conflict(format!(
                    "producer {} re-initialised concurrently",
                    r.producer_id
                )));
            }
            if next_key != key {
                meta.put(&next_key, &to_json(&next)).await?;
            }
            return Ok(v1::InitProducerResponse {
                producer_id: next.producer_id,
                producer_epoch: next.epoch,
            });
        }
        let pid = self.next_producer_id().await?;
        let record = ProducerIdRecord {
            producer_id: pid,
            epoch: 0,
        };
        meta.put(
            &meta::key(meta::PRODUCER_EPOCH, &[&pid.to_string()]),
            &to_json(&record),
        )
        .await?;
        Ok(v1::InitProducerResponse {
            producer_id: pid,
            producer_epoch: 0,
        })
    }

    /// The producer's next epoch, or a new producer id once the epoch would overflow.
    pub(crate) async fn next_epoch(&self, r: ProducerIdRecord) -> CoreResult<ProducerIdRecord> {
        Ok(if r.epoch >= MAX_PRODUCER_EPOCH {
            ProducerIdRecord {
                producer_id: self.next_producer_id().await?,
                epoch: 0,
            }
        } else {
            ProducerIdRecord {
                producer_id: r.producer_id,
                epoch: r.epoch + 1,
            }
        })
    }

    // ---------------------------------------------------------------------------------
    // Committed offsets and groups
    // ---------------------------------------------------------------------------------

    #[instrument(skip_all, fields(group = %req.group))]
    /// Commits the request's offsets in one metadata transaction. A partition whose stream
    /// or partition does not exist is left out and returned (STREAM_NOT_FOUND /
    /// PARTITION_NOT_FOUND); the others are committed. When every partition is left out,
    /// nothing is written (the group is not created).
    pub async fn commit_offsets(
        &self,
        req: v1::CommitOffsetsRequest,
    ) -> CoreResult<Vec<v1::RejectedOffset>> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        validate_name("group", &req.group)?;
        self.require_namespace(&ns)?;
        if let Some(generation) = req.generation
            && let CommitCheck::Refuse(e) =
                self.inner
                    .groups
                    .check_commit(&ns, &req.group, &req.member_id, generation)
        {
            return Err(e);
        }
        let now = now_ms();
        let mut ops = Vec::with_capacity(req.offsets.len() + 1);
        let mut rejected = Vec::new();
        let mut catalogued = HashMap::new();
        for c in &req.offsets {
            let id = c
                .stream
                .as_ref()
                .ok_or_else(|| CoreError::InvalidArgument("stream is required".into()))?;
            validate_name("stream", &id.name)?;
            if c.offset < -1 {
                return Err(CoreError::InvalidArgument(format!(
                    "offset must be >= -1, got {}",
                    c.offset
                )));
            }
            let sid = v1::StreamId::new(&ns, &id.name);
            if let Err(e) = self
                .partition_exists(&sid, c.partition, &mut catalogued)
                .await
            {
                rejected.push(v1::RejectedOffset {
                    stream: Some(sid),
                    partition: c.partition,
                    error: e.code() as i32,
                    error_message: e.to_string(),
                });
                continue;
            }
            let record = OffsetRecord {
                offset: c.offset,
                metadata: c.metadata.clone(),
                commit_time_ms: if c.commit_time_ms > 0 {
                    c.commit_time_ms
                } else {
                    now
                },
                leader_epoch: c.leader_epoch,
            };
            ops.push(Op::Put {
                key: offset_key(&ns, &req.group, &id.name, c.partition),
                value: to_json(&record),
            });
        }
        if ops.is_empty() && !rejected.is_empty() {
            return Ok(rejected);
        }
        let group_key = meta::key(meta::GROUP, &[&ns, &req.group]);
        if self.inner.meta.get(&group_key).await?.is_none() {
            let g = GroupRecord {
                created_at_ms: now,
                protocol_type: String::new(),
            };
            ops.push(Op::Put {
                key: group_key,
                value: to_json(&g),
            });
        }
        self.inner.meta.txn(Vec::<Check>::new(), ops).await?;
        Ok(rejected)
    }

    pub async fn fetch_offsets(
        &self,
        req: v1::FetchOffsetsRequest,
    ) -> CoreResult<Vec<v1::CommittedOffset>> {
        let ns = namespace_or_default(&req.namespace).to_string();
        validate_name("group", &req.group)?;
        let mut out = Vec::new();
        let to_proto = |stream: &str, partition: u32, r: OffsetRecord| v1::CommittedOffset {
            stream: Some(v1::StreamId::new(&ns, stream)),
            partition,
            offset: r.offset,
            metadata: r.metadata,
            commit_time_ms: r.commit_time_ms,
            leader_epoch: r.leader_epoch,
        };
        if req.partitions.is_empty() {
            let prefix = meta::prefix(meta::OFFSET, &[&ns, &req.group]);
            for (k, v) in self.inner.meta.scan_prefix(&prefix, SCAN_ALL).await? {
                let parts = meta::parts(meta::OFFSET, &k);
                let (Some(stream), Some(p)) =
                    (parts.get(2), parts.get(3).and_then(|p| p.parse().ok()))
                else {
                    continue;
                };
                out.push(to_proto(stream, p, from_json("offset", &v)?));
            }
        } else {
            for fp in &req.partitions {
                let id = fp
                    .stream
                    .as_ref()
                    .ok_or_else(|| CoreError::InvalidArgument("stream is required".into()))?;
                let key = offset_key(&ns, &req.group, &id.name, fp.partition);
                let record = match self.inner.meta.get(&key).await? {
                    Some(raw) => from_json("offset", &raw)?,
                    None => OffsetRecord {
                        offset: -1,
                        metadata: String::new(),
                        commit_time_ms: -1,
                        leader_epoch: -1,
                    },
                };
                out.push(to_proto(&id.name, fp.partition, record));
            }
        }
        Ok(out)
    }

    pub async fn list_groups(&self, namespace: &str) -> CoreResult<Vec<v1::GroupSummary>> {
        let ns = namespace_or_default(namespace).to_string();
        let mut out = Vec::new();
        for (k, v) in self
            .inner
            .meta
            .scan_prefix(&meta::prefix(meta::GROUP, &[&ns]), SCAN_ALL)
            .await?
        {
            let parts = meta::parts(meta::GROUP, &k);
            let Some(group) = parts.get(1) else { continue };
            let record: GroupRecord = from_json("group", &v)?;
            let committed = self
                .inner
                .meta
                .scan_prefix(&meta::prefix(meta::OFFSET, &[&ns, group]), SCAN_ALL)
                .await?
                .len();
            out.push(v1::GroupSummary {
                namespace: ns.clone(),
                group: group.clone(),
                state: "Empty".into(),
                protocol_type: record.protocol_type,
                committed_partitions: committed as u32,
            });
        }
        for (group, state, protocol_type) in self.inner.groups.list(&ns) {
            match out.iter_mut().find(|s| s.group == group) {
                Some(s) => {
                    s.state = state.name().into();
                    s.protocol_type = protocol_type;
                }
                None => out.push(v1::GroupSummary {
                    namespace: ns.clone(),
                    group,
                    state: state.name().into(),
                    protocol_type,
                    committed_partitions: 0,
                }),
            }
        }
        // Member-lease groups (RocketMQ): their own entry unless one of the same name is only
        // known by its committed offsets.
        for (group, protocol_type) in self.inner.groups.leases.groups_of(&ns) {
            match out.iter_mut().find(|s| {
                s.group == group
                    && (s.protocol_type == protocol_type
                        || (s.state == "Empty" && s.protocol_type.is_empty()))
            }) {
                Some(s) => {
                    s.state = "Stable".into();
                    s.protocol_type = protocol_type;
                }
                None => out.push(v1::GroupSummary {
                    namespace: ns.clone(),
                    group,
                    state: "Stable".into(),
                    protocol_type,
                    committed_partitions: 0,
                }),
            }
        }
        out.sort_by(|a, b| {
            a.group
                .cmp(&b.group)
                .then_with(|| a.protocol_type.cmp(&b.protocol_type))
        });
        Ok(out)
    }

    pub async fn delete_group(&self, namespace: &str, group: &str) -> CoreResult<()> {
        let ns = namespace_or_default(namespace).to_string();
        let group_key = meta::key(meta::GROUP, &[&ns, group]);
        let had_members = self.inner.groups.remove_if_empty(&ns, group)?;
        if self.inner.meta.get(&group_key).await?.is_none() {
            return if had_members {
                Ok(())
            } else {
                Err(CoreError::GroupNotFound(group.into()))
            };
        }
        let mut ops = vec![Op::Delete { key: group_key }];
        for (k, _) in self
            .inner
            .meta
            .scan_prefix(&meta::prefix(meta::OFFSET, &[&ns, group]), SCAN_ALL)
            .await?
        {
            ops.push(Op::Delete { key: k });
        }
        self.inner.meta.txn(Vec::new(), ops).await?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Retention
    // ---------------------------------------------------------------------------------

    /// Applies every stream's retention once. Returns how many partitions moved their start.
    pub async fn enforce_retention(&self) -> CoreResult<usize> {
        let handles: Vec<_> = self.inner.streams.read().values().cloned().collect();
        let mut moved = 0;
        for h in handles {
            let eff = EffectiveConfig::resolve(
                &h.record.read().settings,
                &self.inner.config.stream_defaults,
            );
            let policy = RetentionPolicy {
                max_age_ms: (eff.retention_ms >= 0).then_some(eff.retention_ms),
                max_bytes: (eff.retention_bytes >= 0).then_some(eff.retention_bytes as u64),
                now_ms: now_ms(),
            };
            if policy.max_age_ms.is_none() && policy.max_bytes.is_none() {
                continue;
            }
            for part in h.partitions() {
                let before = self.inner.log.bounds(part.key).await?.start_offset;
                let after = self.inner.log.apply_retention(part.key, policy).await?;
                moved += usize::from(after > before);
                let dropped = part.txns.lock().forget_below(after);
                for last in dropped {
                    self.inner
                        .meta
                        .delete(&crate::transactions::aborted_key(
                            part.key.stream_id,
                            part.key.partition,
                            last,
                        ))
                        .await?;
                }
            }
        }
        Ok(moved)
    }

    // ---------------------------------------------------------------------------------
    // Group membership (state in groups.rs; here the namespace checks)
    // ---------------------------------------------------------------------------------

    #[instrument(skip_all, fields(group = %req.group, member = %req.member_id))]
    pub async fn join_group(&self, req: v1::JoinGroupRequest) -> CoreResult<v1::JoinGroupResponse> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        validate_name("group", &req.group)?;
        self.require_namespace(&ns)?;
        self.inner.groups.join(&ns, req).await
    }

    #[instrument(skip_all, fields(group = %req.group, member = %req.member_id))]
    pub async fn sync_group(&self, req: v1::SyncGroupRequest) -> CoreResult<v1::SyncGroupResponse> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        self.inner.groups.sync(&ns, req).await
    }

    pub fn heartbeat(&self, req: &v1::HeartbeatRequest) -> CoreResult<v1::HeartbeatResponse> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace);
        self.inner.groups.heartbeat(ns, req)
    }

    pub fn leave_group(&self, req: &v1::LeaveGroupRequest) -> v1::LeaveGroupResponse {
        let ns = namespace_or_default(&req.namespace);
        v1::LeaveGroupResponse {
            unknown_member_ids: self.inner.groups.leave(ns, &req.group, &req.member_ids),
        }
    }

    /// Live membership if any; else "Empty" for a group with committed offsets, or "Dead".
    pub async fn describe_group(
        &self,
        namespace: &str,
        group: &str,
    ) -> CoreResult<v1::DescribeGroupResponse> {
        let ns = namespace_or_default(namespace).to_string();
        if let Some(d) = self.inner.groups.describe(&ns, group) {
            return Ok(d);
        }
        let known = self
            .inner
            .meta
            .get(&meta::key(meta::GROUP, &[&ns, group]))
            .await?;
        let protocol_type = match known {
            Some(raw) => from_json::<GroupRecord>("group", &raw)?.protocol_type,
            None => {
                return Ok(v1::DescribeGroupResponse {
                    state: "Dead".into(),
                    ..Default::default()
                });
            }
        };
        Ok(v1::DescribeGroupResponse {
            state: "Empty".into(),
            protocol_type,
            ..Default::default()
        })
    }

    pub(crate) async fn run_group_timeouts(self) {
        let mut tick = tokio::time::interval(crate::groups::GROUP_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.inner.groups.tick();
        }
    }

    pub(crate) async fn run_retention(self) {
        let mut tick = tokio::time::interval(self.inner.config.retention_check_interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.enforce_retention().await {
                warn!(error = %e, "retention pass failed");
            }
        }
    }

    /// The log end offset of a partition, used by timers to bound their duplicate check.
    pub(crate) async fn end_offset(
        &self,
        id: &v1::StreamId,
        partition: u32,
    ) -> CoreResult<Option<i64>> {
        match self.stream(id).and_then(|h| h.partition(partition)) {
            Ok(part) => Ok(Some(self.inner.log.bounds(part.key).await?.end_offset)),
            Err(CoreError::StreamNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether a batch appended by `timer_id` exists at or after `from` in the partition.
    pub(crate) async fn timer_batch_exists(
        &self,
        id: &v1::StreamId,
        partition: u32,
        from: i64,
        timer_id: &str,
    ) -> CoreResult<bool> {
        let Ok(part) = self.stream(id).and_then(|h| h.partition(partition)) else {
            return Ok(false);
        };
        let mut found = false;
        self.scan_batch_headers(part.key, from, |h, _, _| {
            found = h.timer_id == timer_id;
            !found
        })
        .await?;
        Ok(found)
    }

    /// Visits the header of every durable batch from `from` on (clamped to the start)
    /// until `visit` returns false. Used by recovery paths, never on a hot path.
    async fn scan_batch_headers(
        &self,
        key: PartitionKey,
        from: i64,
        mut visit: impl FnMut(&StoredBatchHeader, i64, u32) -> bool,
    ) -> CoreResult<()> {
        let log = &self.inner.log;
        let bounds = log.bounds(key).await?;
        let mut at = from.max(bounds.start_offset);
        while at < bounds.end_offset {
            let batches = log.read(key, at, 4 << 20).await?;
            let Some(last) = batches.last() else { break };
            at = last.next_offset();
            for b in batches {
                let h = StoredBatchHeader::decode(b.payload).map_err(|e| {
                    CoreError::Corrupt(format!("undecodable batch at {key}@{}: {e}", b.base_offset))
                })?;
                if !visit(&h, b.base_offset, b.record_count) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn producer_snapshot_key(key: PartitionKey) -> Vec<u8> {
    meta::key(
        meta::PRODUCER_SNAPSHOT,
        &[&key.stream_id.to_string(), &key.partition.to_string()],
    )
}

fn offset_key(ns: &str, group: &str, stream: &str, partition: u32) -> Vec<u8> {
    meta::key(
        meta::OFFSET,
        &[ns, group, stream, &format!("{partition:010}")],
    )
}

/// A random RFC 4122 version 4 UUID.
fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
