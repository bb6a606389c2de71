//! The transaction coordinator: one per (namespace, transactional id), shared by every
//! gateway (Kafka's transactional producers today).
//!
//! A transaction enrols partitions (`AddPartitions`) and consumer groups (`AddGroup`, with
//! offsets staged by `CommitTxnOffsets`). Its batches are appended to the partitions as they
//! come, flagged transactional; readers with `read_committed` stop at each partition's last
//! stable offset (the first offset of the oldest open transaction there). Ending it writes
//! a control marker (commit or abort) to every enrolled partition, records an abort in the
//! partition's aborted-transaction index, applies the staged offsets on commit, and marks
//! the coordinator complete.
//!
//! Durability: the coordinator's record lives in the metadata store and is written before
//! each step that depends on it, as Kafka's transaction log is: `Prepare*` before the first
//! marker, `Complete*` after the last. A restart re-registers open transactions in their
//! partitions and finishes any transaction found in `Prepare*`, so a commit or abort is
//! whole whatever was killed when. Markers written twice (a crash between a marker and the
//! `Complete*` record) are harmless to readers: a marker for a producer with no open
//! transaction changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, instrument, warn};
use tributary_proto::v1;

use crate::error::{CoreError, CoreResult};
use crate::meta::{self, from_json, to_json, validate_name};
use crate::streams::{PartitionState, namespace_or_default};
use crate::{Core, now_ms};

/// Kafka's transaction.max.timeout.ms default (15 minutes).
pub const DEFAULT_MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Kafka's transaction.timeout.ms default, for a coordinator that never got one.
const DEFAULT_TIMEOUT_MS: i32 = 60_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    #[default]
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "Empty",
            Self::Ongoing => "Ongoing",
            Self::PrepareCommit => "PrepareCommit",
            Self::PrepareAbort => "PrepareAbort",
            Self::CompleteCommit => "CompleteCommit",
            Self::CompleteAbort => "CompleteAbort",
        }
    }

    fn is_open(self) -> bool {
        matches!(
            self,
            Self::Ongoing | Self::PrepareCommit | Self::PrepareAbort
        )
    }
}

/// A partition enrolled in a transaction, and the offset below which none of the
/// transaction's batches can be (the partition's end when it was enrolled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledPartition {
    pub namespace: String,
    pub stream: String,
    pub partition: u32,
    pub first_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedOffset {
    pub stream: String,
    pub partition: u32,
    pub offset: i64,
    pub metadata: String,
    pub leader_epoch: i32,
}

/// The coordinator's record, under `txnid/<namespace>\0<transactional id>`. Its first two
/// fields are what earlier versions stored there (the producer id and epoch), so those
/// records read as an `Empty` coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    pub producer_id: i64,
    pub epoch: i32,
    #[serde(default)]
    pub state: TxnState,
    #[serde(default)]
    pub timeout_ms: i32,
    #[serde(default)]
    pub started_at_ms: i64,
    #[serde(default)]
    pub updated_at_ms: i64,
    #[serde(default)]
    pub partitions: Vec<EnrolledPartition>,
    /// Enrolled groups and the offsets staged for each.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<StagedOffset>>,
}

/// A transaction aborted in one partition, as the partition's index keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    /// The offset of the abort marker.
    pub last_offset: i64,
}

/// Per partition: the transactions open in it and those aborted in it.
#[derive(Debug, Default)]
pub(crate) struct PartitionTxns {
    /// producer id -> (epoch, first offset).
    open: HashMap<i64, (i32, i64)>,
    /// In marker order (ascending last_offset).
    aborted: Vec<AbortedTxn>,
}

impl PartitionTxns {
    pub(crate) fn with_aborted(aborted: Vec<AbortedTxn>) -> Self {
        Self {
            open: HashMap::new(),
            aborted,
        }
    }

    /// The last stable offset: nothing at or above it may belong to an open transaction.
    pub(crate) fn last_stable_offset(&self, end_offset: i64) -> i64 {
        self.open
            .values()
            .map(|(_, first)| *first)
            .min()
            .map_or(end_offset, |first| first.min(end_offset))
    }

    /// Whether a transactional batch of `producer_id` at `offset` belongs to a transaction
    /// aborted here.
    pub(crate) fn aborted_at(&self, producer_id: i64, offset: i64) -> bool {
        let start = self.aborted.partition_point(|a| a.last_offset < offset);
        self.aborted[start..]
            .iter()
            .any(|a| a.producer_id == producer_id && a.first_offset <= offset)
    }

    /// Aborted transactions overlapping offsets `from..to`.
    pub(crate) fn aborted_between(&self, from: i64, to: i64) -> Vec<v1::AbortedTransaction> {
        let start = self.aborted.partition_point(|a| a.last_offset < from);
        self.aborted[start..]
            .iter()
            .filter(|a| a.first_offset < to)
            .map(|a| v1::AbortedTransaction {
                producer_id: a.producer_id,
                first_offset: a.first_offset,
            })
            .collect()
    }

    /// A transactional batch may be appended only inside its producer's open transaction,
    /// by the epoch that opened it.
    pub(crate) fn check_append(&self, producer_id: i64, epoch: i32) -> CoreResult<()> {
        match self.open.get(&producer_id) {
            Some((open_epoch, _)) if *open_epoch == epoch => Ok(()),
            Some((open_epoch, _)) if *open_epoch > epoch => Err(CoreError::ProducerFenced {
                producer_id,
                got: epoch,
                current: *open_epoch,
            }),
            _ => Err(CoreError::InvalidTxnState(format!(
                "producer {producer_id} epoch {epoch} has no open transaction with this partition (AddPartitionsToTxn first)"
            ))),
        }
    }

    pub(crate) fn open(&mut self, producer_id: i64, epoch: i32, first_offset: i64) {
        let slot = self
            .open
            .entry(producer_id)
            .or_insert((epoch, first_offset));
        slot.0 = epoch;
    }

    fn close(&mut self, producer_id: i64) -> Option<i64> {
        self.open.remove(&producer_id).map(|(_, first)| first)
    }

    /// Drops what retention removed from the log; returns the markers' offsets dropped.
    pub(crate) fn forget_below(&mut self, start_offset: i64) -> Vec<i64> {
        let cut = self
            .aborted
            .partition_point(|a| a.last_offset < start_offset);
        self.aborted.drain(..cut).map(|a| a.last_offset).collect()
    }
}

pub(crate) fn aborted_key(stream_id: u64, partition: u32, last_offset: i64) -> Vec<u8> {
    meta::key(
        meta::TXN_ABORTED,
        &[
            &stream_id.to_string(),
            &partition.to_string(),
            &format!("{last_offset:020}"),
        ],
    )
}

pub(crate) fn aborted_prefix(stream_id: u64, partition: u32) -> Vec<u8> {
    meta::prefix(
        meta::TXN_ABORTED,
        &[&stream_id.to_string(), &partition.to_string()],
    )
}

type Entry = Arc<tokio::sync::Mutex<Option<TxnRecord>>>;

/// (namespace, group) -> (stream, partition) -> how many open transactions staged offsets.
type PendingOffsets = HashMap<(String, String), HashMap<(String, u32), usize>>;

/// The coordinators this core holds, each behind its own lock so that one transactional
/// id's calls run one at a time while others proceed.
#[derive(Default)]
pub(crate) struct TxnTable {
    entries: parking_lot::Mutex<HashMap<(String, String), Entry>>,
    /// Offsets staged by open transactions, for FetchOffsets' require_stable.
    pending: parking_lot::Mutex<PendingOffsets>,
}

impl TxnTable {
    /// Counts (`add`) or uncounts the staged offsets of a transaction's record.
    fn track(&self, ns: &str, r: &TxnRecord, add: bool) {
        let mut pending = self.pending.lock();
        for (group, offsets) in &r.groups {
            let key = (ns.to_string(), group.clone());
            let slot = pending.entry(key.clone()).or_default();
            for o in offsets {
                let p = (o.stream.clone(), o.partition);
                if add {
                    *slot.entry(p).or_default() += 1;
                } else if let Some(n) = slot.get_mut(&p) {
                    *n -= 1;
                    if *n == 0 {
                        slot.remove(&p);
                    }
                }
            }
            if slot.is_empty() {
                pending.remove(&key);
            }
        }
    }
}

fn txn_key(ns: &str, id: &str) -> Vec<u8> {
    meta::key(meta::TRANSACTIONAL_ID, &[ns, id])
}

/// The caller must be the producer the coordinator holds.
fn check_producer(r: &TxnRecord, producer_id: i64, epoch: i32) -> CoreResult<()> {
    if producer_id != r.producer_id {
        return Err(CoreError::InvalidProducerIdMapping(format!(
            "producer id {producer_id} is not the one this transactional id holds"
        )));
    }
    if epoch != r.epoch {
        return Err(CoreError::ProducerFenced {
            producer_id,
            got: epoch,
            current: r.epoch,
        });
    }
    Ok(())
}

fn info_of(ns: &str, id: &str, r: &TxnRecord) -> v1::TransactionInfo {
    v1::TransactionInfo {
        namespace: ns.to_string(),
        transactional_id: id.to_string(),
        producer_id: r.producer_id,
        producer_epoch: r.epoch,
        state: r.state.name().to_string(),
        timeout_ms: r.timeout_ms,
        started_at_ms: if r.state.is_open() {
            r.started_at_ms
        } else {
            0
        },
        partitions: r
            .partitions
            .iter()
            .map(|p| v1::TxnPartition {
                stream: Some(v1::StreamId {
                    namespace: p.namespace.clone(),
                    name: p.stream.clone(),
                }),
                partition: p.partition,
            })
            .collect(),
        groups: r.groups.keys().cloned().collect(),
        updated_at_ms: r.updated_at_ms,
    }
}

impl Core {
    fn txn_entry(&self, ns: &str, id: &str) -> Entry {
        self.inner
            .txns
            .entries
            .lock()
            .entry((ns.to_string(), id.to_string()))
            .or_default()
            .clone()
    }

    /// The coordinator's record, loaded into `slot` from the store on first use.
    async fn load_txn(
        &self,
        ns: &str,
        id: &str,
        slot: &mut Option<TxnRecord>,
    ) -> CoreResult<Option<TxnRecord>> {
        if slot.is_none()
            && let Some(raw) = self.inner.meta.get(&txn_key(ns, id)).await?
        {
            *slot = Some(from_json("transactional id", &raw)?);
        }
        Ok(slot.clone())
    }

    async fn save_txn(
        &self,
        ns: &str,
        id: &str,
        slot: &mut Option<TxnRecord>,
        mut r: TxnRecord,
    ) -> CoreResult<()> {
        r.updated_at_ms = now_ms();
        self.inner.meta.put(&txn_key(ns, id), &to_json(&r)).await?;
        // The pending-offsets index follows what the store holds.
        if let Some(old) = slot.as_ref().filter(|o| o.state.is_open()) {
            self.inner.txns.track(ns, old, false);
        }
        if r.state.is_open() {
            self.inner.txns.track(ns, &r, true);
        }
        *slot = Some(r);
        Ok(())
    }

    /// Rebuilds the coordinators after a restart: open transactions are registered in their
    /// partitions again, and those caught between their first and last marker are finished.
    pub(crate) async fn recover_transactions(&self) -> CoreResult<()> {
        let prefix = meta::key(meta::TRANSACTIONAL_ID, &[]);
        let mut finishing = Vec::new();
        for (key, raw) in self.inner.meta.scan_prefix(&prefix, usize::MAX).await? {
            let parts = meta::parts(meta::TRANSACTIONAL_ID, &key);
            let [ns, id] = parts.as_slice() else {
                warn!(key = %String::from_utf8_lossy(&key), "ignoring a malformed transactional id key");
                continue;
            };
            let r: TxnRecord = from_json("transactional id", &raw)?;
            if r.state.is_open() {
                for p in &r.partitions {
                    if let Some(part) = self.enrolled_partition(p) {
                        part.txns
                            .lock()
                            .open(r.producer_id, r.epoch, p.first_offset);
                    }
                }
            }
            if matches!(r.state, TxnState::PrepareCommit | TxnState::PrepareAbort) {
                finishing.push((ns.clone(), id.clone()));
            }
            if r.state.is_open() {
                self.inner.txns.track(ns, &r, true);
            }
            *self.txn_entry(ns, id).lock().await = Some(r);
        }
        for (ns, id) in finishing {
            let entry = self.txn_entry(&ns, &id);
            let mut slot = entry.lock().await;
            if let Some(r) = slot.clone() {
                info!(namespace = %ns, transactional_id = %id, state = r.state.name(), "finishing a transaction interrupted by a restart");
                self.complete_txn(&ns, &id, &mut slot, r).await?;
            }
        }
        Ok(())
    }

    fn enrolled_partition(&self, p: &EnrolledPartition) -> Option<Arc<PartitionState>> {
        let id = v1::StreamId {
            namespace: p.namespace.clone(),
            name: p.stream.clone(),
        };
        self.stream(&id).and_then(|h| h.partition(p.partition)).ok()
    }

    /// InitProducer for a transactional id: a new producer id, or the next epoch of the
    /// current one, which fences the previous producer. An open transaction of the previous
    /// epoch is aborted first (one in PrepareCommit is committed), so the new producer starts
    /// clean.
    pub(crate) async fn init_transactional_producer(
        &self,
        ns: &str,
        id: &str,
        req: &v1::InitProducerRequest,
    ) -> CoreResult<v1::InitProducerResponse> {
        validate_name("transactional id", id)?;
        self.refuse_when_spread("a transactional producer")?;
        let max = self.inner.config.transaction_max_timeout.as_millis() as i64;
        if req.transaction_timeout_ms <= 0 || i64::from(req.transaction_timeout_ms) > max {
            return Err(CoreError::InvalidTransactionTimeout {
                got: req.transaction_timeout_ms,
                max,
            });
        }
        let entry = self.txn_entry(ns, id);
        let mut slot = entry.lock().await;
        let current = self.load_txn(ns, id, &mut slot).await?;
        let mut next = match current {
            None => TxnRecord {
                producer_id: self.next_producer_id().await?,
                epoch: 0,
                state: TxnState::Empty,
                timeout_ms: req.transaction_timeout_ms,
                started_at_ms: 0,
                updated_at_ms: 0,
                partitions: Vec::new(),
                groups: BTreeMap::new(),
            },
            Some(mut r) => {
                // KIP-360: a producer that names its id and epoch may only bump itself.
                if req.producer_id > 0
                    && (req.producer_id != r.producer_id || req.producer_epoch != r.epoch)
                {
                    return Err(CoreError::ProducerFenced {
                        producer_id: req.producer_id,
                        got: req.producer_epoch,
                        current: r.epoch,
                    });
                }
                match r.state {
                    TxnState::Ongoing => {
                        info!(namespace = %ns, transactional_id = %id, "aborting the open transaction of a fenced producer");
                        r = self.fence_and_abort(ns, id, &mut slot, r).await?;
                    }
                    TxnState::PrepareCommit | TxnState::PrepareAbort => {
                        r = self.complete_txn(ns, id, &mut slot, r).await?;
                    }
                    _ => {}
                }
                let bumped = self.next_epoch_of(r.producer_id, r.epoch).await?;
                TxnRecord {
                    producer_id: bumped.0,
                    epoch: bumped.1,
                    state: TxnState::Empty,
                    timeout_ms: req.transaction_timeout_ms,
                    started_at_ms: 0,
                    partitions: Vec::new(),
                    groups: BTreeMap::new(),
                    ..r
                }
            }
        };
        next.timeout_ms = req.transaction_timeout_ms;
        let (producer_id, producer_epoch) = (next.producer_id, next.epoch);
        self.save_txn(ns, id, &mut slot, next).await?;
        Ok(v1::InitProducerResponse {
            producer_id,
            producer_epoch,
        })
    }

    /// The coordinator, checked against the caller, with an open transaction to add to.
    async fn open_txn_for(
        &self,
        p: &v1::TxnProducer,
        slot: &mut Option<TxnRecord>,
    ) -> CoreResult<TxnRecord> {
        let ns = namespace_or_default(&p.namespace);
        let mut r = self
            .load_txn(ns, &p.transactional_id, slot)
            .await?
            .ok_or_else(|| {
                CoreError::InvalidProducerIdMapping(format!(
                    "transactional id '{}' has no producer (InitProducerId first)",
                    p.transactional_id
                ))
            })?;
        check_producer(&r, p.producer_id, p.producer_epoch)?;
        match r.state {
            TxnState::PrepareCommit | TxnState::PrepareAbort => {
                return Err(CoreError::ConcurrentTransactions(format!(
                    "transaction '{}' is completing",
                    p.transactional_id
                )));
            }
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                r.state = TxnState::Ongoing;
                r.started_at_ms = now_ms();
                r.partitions.clear();
                r.groups.clear();
            }
            TxnState::Ongoing => {}
        }
        Ok(r)
    }

    /// Enrols partitions in the producer's transaction (opening one if none is), or with
    /// `verify_only` checks that they are enrolled. Either every partition is enrolled or,
    /// when one cannot be, none is.
    #[instrument(skip_all, fields(transactional_id = %req.producer.as_ref().map_or("", |p| p.transactional_id.as_str())))]
    pub async fn add_txn_partitions(
        &self,
        req: v1::AddPartitionsRequest,
    ) -> CoreResult<v1::AddPartitionsResponse> {
        self.check_running()?;
        let p = req
            .producer
            .ok_or_else(|| CoreError::InvalidArgument("producer is required".into()))?;
        let ns = namespace_or_default(&p.namespace).to_string();
        let entry = self.txn_entry(&ns, &p.transactional_id);
        let mut slot = entry.lock().await;
        if req.verify_only {
            let r = self
                .load_txn(&ns, &p.transactional_id, &mut slot)
                .await?
                .ok_or_else(|| CoreError::InvalidProducerIdMapping(p.transactional_id.clone()))?;
            check_producer(&r, p.producer_id, p.producer_epoch)?;
            let results = req
                .partitions
                .into_iter()
                .map(|tp| {
                    let enrolled = r.state == TxnState::Ongoing
                        && tp.stream.as_ref().is_some_and(|s| {
                            r.partitions.iter().any(|e| {
                                e.namespace == namespace_or_default(&s.namespace)
                                    && e.stream == s.name
                                    && e.partition == tp.partition
                            })
                        });
                    v1::TxnPartitionResult {
                        partition: Some(tp),
                        error: if enrolled {
                            0
                        } else {
                            v1::ErrorCode::InvalidTxnState as i32
                        },
                        error_message: String::new(),
                    }
                })
                .collect();
            return Ok(v1::AddPartitionsResponse { results });
        }
        let mut r = self.open_txn_for(&p, &mut slot).await?;
        // Resolve every partition before enrolling any.
        let mut resolved = Vec::with_capacity(req.partitions.len());
        let mut failed = false;
        for tp in &req.partitions {
            let target = tp
                .stream
                .as_ref()
                .ok_or_else(|| CoreError::InvalidArgument("stream is required".into()))
                .and_then(|s| {
                    let mut s = s.clone();
                    s.namespace = namespace_or_default(&s.namespace).to_string();
                    let part = self.stream(&s)?.partition(tp.partition)?;
                    Ok((s, part))
                });
            failed |= target.is_err();
            resolved.push(target);
        }
        if failed {
            let results = req
                .partitions
                .into_iter()
                .zip(resolved)
                .map(|(tp, t)| {
                    let (error, error_message) = match t {
                        Err(e) => (e.code() as i32, e.to_string()),
                        // Kafka's OPERATION_NOT_ATTEMPTED: the core's CONFLICT says the
                        // partition was fine but not enrolled because another was not.
                        Ok(_) => (
                            v1::ErrorCode::Conflict as i32,
                            "not attempted: another partition of the request failed".into(),
                        ),
                    };
                    v1::TxnPartitionResult {
                        partition: Some(tp),
                        error,
                        error_message,
                    }
                })
                .collect();
            return Ok(v1::AddPartitionsResponse { results });
        }
        let mut newly = Vec::new();
        for (s, part) in resolved.into_iter().flatten() {
            if r.partitions.iter().any(|e| {
                e.namespace == s.namespace
                    && e.stream == s.name
                    && e.partition == part.key.partition
            }) {
                continue;
            }
            let end = self.inner.log.bounds(part.key).await?.end_offset;
            r.partitions.push(EnrolledPartition {
                namespace: s.namespace.clone(),
                stream: s.name.clone(),
                partition: part.key.partition,
                first_offset: end,
            });
            newly.push((part, end));
        }
        // Registered before the record is saved: a crash in between loses both.
        for (part, end) in &newly {
            part.txns.lock().open(r.producer_id, r.epoch, *end);
        }
        if let Err(e) = self
            .save_txn(&ns, &p.transactional_id, &mut slot, r.clone())
            .await
        {
            for (part, _) in &newly {
                part.txns.lock().close(r.producer_id);
            }
            return Err(e);
        }
        let results = req
            .partitions
            .into_iter()
            .map(|tp| v1::TxnPartitionResult {
                partition: Some(tp),
                error: 0,
                error_message: String::new(),
            })
            .collect();
        Ok(v1::AddPartitionsResponse { results })
    }

    /// Enrols a consumer group: its offsets staged by `CommitTxnOffsets` are committed with
    /// the transaction.
    pub async fn add_txn_group(&self, req: v1::AddGroupRequest) -> CoreResult<()> {
        self.check_running()?;
        let p = req
            .producer
            .ok_or_else(|| CoreError::InvalidArgument("producer is required".into()))?;
        validate_name("group", &req.group)?;
        let ns = namespace_or_default(&p.namespace).to_string();
        let entry = self.txn_entry(&ns, &p.transactional_id);
        let mut slot = entry.lock().await;
        let mut r = self.open_txn_for(&p, &mut slot).await?;
        if r.groups.contains_key(&req.group) && slot.as_ref().is_some_and(|s| s == &r) {
            return Ok(());
        }
        r.groups.entry(req.group).or_default();
        self.save_txn(&ns, &p.transactional_id, &mut slot, r).await
    }

    /// Stages offsets for a group enrolled in the open transaction.
    pub async fn commit_txn_offsets(&self, req: v1::CommitTxnOffsetsRequest) -> CoreResult<()> {
        self.check_running()?;
        let p = req
            .producer
            .ok_or_else(|| CoreError::InvalidArgument("producer is required".into()))?;
        let ns = namespace_or_default(&p.namespace).to_string();
        if let Some(generation) = req.generation
            && let crate::groups::CommitCheck::Refuse(e) =
                self.inner
                    .groups
                    .check_commit(&ns, &req.group, &req.member_id, generation)
        {
            return Err(e);
        }
        let entry = self.txn_entry(&ns, &p.transactional_id);
        let mut slot = entry.lock().await;
        let mut r = self
            .load_txn(&ns, &p.transactional_id, &mut slot)
            .await?
            .ok_or_else(|| CoreError::InvalidProducerIdMapping(p.transactional_id.clone()))?;
        check_producer(&r, p.producer_id, p.producer_epoch)?;
        if r.state != TxnState::Ongoing || !r.groups.contains_key(&req.group) {
            return Err(CoreError::InvalidTxnState(format!(
                "group '{}' is not in an open transaction of '{}' (AddOffsetsToTxn first)",
                req.group, p.transactional_id
            )));
        }
        for c in &req.offsets {
            let s = c
                .stream
                .as_ref()
                .ok_or_else(|| CoreError::InvalidArgument("stream is required".into()))?;
            let mut id = s.clone();
            id.namespace = ns.clone();
            self.stream(&id)?.partition(c.partition)?;
            if c.offset < -1 {
                return Err(CoreError::InvalidArgument(format!(
                    "offset must be >= -1, got {}",
                    c.offset
                )));
            }
        }
        let staged = r.groups.entry(req.group).or_default();
        for c in req.offsets {
            let stream = c.stream.map(|s| s.name).unwrap_or_default();
            staged.retain(|o| !(o.stream == stream && o.partition == c.partition));
            staged.push(StagedOffset {
                stream,
                partition: c.partition,
                offset: c.offset,
                metadata: c.metadata,
                leader_epoch: c.leader_epoch,
            });
        }
        self.save_txn(&ns, &p.transactional_id, &mut slot, r).await
    }

    /// Commits or aborts the producer's open transaction. A retry of an end that already
    /// happened succeeds; ending a transaction that is not open is INVALID_TXN_STATE.
    #[instrument(skip_all, fields(transactional_id = %req.transaction_id, commit = req.commit))]
    pub async fn end_transaction(&self, req: v1::EndTransactionRequest) -> CoreResult<()> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        let id = req.transaction_id.as_str();
        let entry = self.txn_entry(&ns, id);
        let mut slot = entry.lock().await;
        let mut r = self
            .load_txn(&ns, id, &mut slot)
            .await?
            .ok_or_else(|| CoreError::InvalidProducerIdMapping(id.to_string()))?;
        check_producer(&r, req.producer_id, req.producer_epoch)?;
        let wanted = if req.commit {
            TxnState::PrepareCommit
        } else {
            TxnState::PrepareAbort
        };
        match (r.state, req.commit) {
            (TxnState::Ongoing, _) => {
                r.state = wanted;
                self.save_txn(&ns, id, &mut slot, r.clone()).await?;
                self.complete_txn(&ns, id, &mut slot, r).await?;
                Ok(())
            }
            (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => Ok(()),
            (state, _) if state == wanted => {
                self.complete_txn(&ns, id, &mut slot, r).await?;
                Ok(())
            }
            (TxnState::PrepareCommit | TxnState::PrepareAbort, _) => Err(
                CoreError::ConcurrentTransactions(format!("transaction '{id}' is completing")),
            ),
            (state, _) => Err(CoreError::InvalidTxnState(format!(
                "transaction '{id}' is {} and cannot be {}",
                state.name(),
                if req.commit { "committed" } else { "aborted" }
            ))),
        }
    }

    /// Writes the markers of a transaction in Prepare*, applies its staged offsets on
    /// commit, and records it complete.
    async fn complete_txn(
        &self,
        ns: &str,
        id: &str,
        slot: &mut Option<TxnRecord>,
        mut r: TxnRecord,
    ) -> CoreResult<TxnRecord> {
        let commit = match r.state {
            TxnState::PrepareCommit => true,
            TxnState::PrepareAbort => false,
            _ => return Ok(r),
        };
        let mut parts = Vec::with_capacity(r.partitions.len());
        for p in &r.partitions {
            match self.enrolled_partition(p) {
                Some(part) => parts.push(part),
                None => {
                    warn!(stream = %p.stream, partition = p.partition, "a partition of the transaction is gone; no marker written there");
                }
            }
        }
        // All markers at once: the log's group commit makes them durable together.
        futures::future::try_join_all(
            parts
                .iter()
                .map(|part| self.append_marker(part, r.producer_id, r.epoch, commit)),
        )
        .await?;
        if commit {
            for (group, offsets) in &r.groups {
                if offsets.is_empty() {
                    continue;
                }
                self.commit_offsets(v1::CommitOffsetsRequest {
                    namespace: ns.to_string(),
                    group: group.clone(),
                    offsets: offsets
                        .iter()
                        .map(|o| v1::CommittedOffset {
                            stream: Some(v1::StreamId {
                                namespace: ns.to_string(),
                                name: o.stream.clone(),
                            }),
                            partition: o.partition,
                            offset: o.offset,
                            metadata: o.metadata.clone(),
                            commit_time_ms: 0,
                            leader_epoch: o.leader_epoch,
                        })
                        .collect(),
                    generation: None,
                    member_id: String::new(),
                })
                .await?;
            }
        }
        r.state = if commit {
            TxnState::CompleteCommit
        } else {
            TxnState::CompleteAbort
        };
        r.partitions.clear();
        r.groups.clear();
        self.save_txn(ns, id, slot, r.clone()).await?;
        metrics::counter!(
            "tributary_transactions_completed_total",
            "outcome" => if commit { "commit" } else { "abort" }
        )
        .increment(1);
        Ok(r)
    }

    /// Aborts the open transaction under the producer's next epoch, which fences the producer
    /// that opened it (Kafka's coordinator does the same). The markers close the batches of
    /// the old producer id; when the epoch overflowed into a new id, the record takes it once
    /// the abort is complete.
    async fn fence_and_abort(
        &self,
        ns: &str,
        id: &str,
        slot: &mut Option<TxnRecord>,
        mut r: TxnRecord,
    ) -> CoreResult<TxnRecord> {
        let (pid, epoch) = self.next_epoch_of(r.producer_id, r.epoch).await?;
        if pid == r.producer_id {
            r.epoch = epoch;
        }
        r.state = TxnState::PrepareAbort;
        self.save_txn(ns, id, slot, r.clone()).await?;
        let mut done = self.complete_txn(ns, id, slot, r).await?;
        if pid != done.producer_id {
            done.producer_id = pid;
            done.epoch = epoch;
            self.save_txn(ns, id, slot, done.clone()).await?;
        }
        Ok(done)
    }

    /// The next epoch of a producer id, or a new id when the epoch would overflow.
    async fn next_epoch_of(&self, producer_id: i64, epoch: i32) -> CoreResult<(i64, i32)> {
        let next = self
            .next_epoch(meta::ProducerIdRecord { producer_id, epoch })
            .await?;
        Ok((next.producer_id, next.epoch))
    }

    /// Appends the end-of-transaction marker to one partition and closes the transaction
    /// there (recording an abort in the partition's index).
    async fn append_marker(
        &self,
        part: &PartitionState,
        producer_id: i64,
        epoch: i32,
        commit: bool,
    ) -> CoreResult<()> {
        let now = now_ms();
        let batch = v1::RecordBatch {
            records: vec![v1::Record {
                timestamp_ms: now,
                ..Default::default()
            }],
            record_count: 1,
            max_timestamp_ms: now,
            producer_id,
            producer_epoch: epoch,
            base_sequence: -1,
            append_time_ms: now,
            transactional: true,
            control: Some(v1::ControlMarker {
                commit,
                coordinator_epoch: 0,
            }),
            ..Default::default()
        };
        let offset = self.append_control_batch(part, batch).await?;
        let first = part.txns.lock().open.get(&producer_id).map(|(_, f)| *f);
        if !commit {
            let aborted = AbortedTxn {
                producer_id,
                first_offset: first.unwrap_or(offset),
                last_offset: offset,
            };
            self.inner
                .meta
                .put(
                    &aborted_key(part.key.stream_id, part.key.partition, offset),
                    &to_json(&aborted),
                )
                .await?;
            let mut txns = part.txns.lock();
            txns.close(producer_id);
            txns.aborted.push(aborted);
        } else {
            part.txns.lock().close(producer_id);
        }
        Ok(())
    }

    /// Aborts transactions open longer than their timeout, bumping the producer's epoch so
    /// that the producer that let it lapse is fenced (as Kafka's coordinator does).
    pub(crate) async fn abort_timed_out_transactions(&self) {
        let now = now_ms();
        let expire_after = self.inner.config.transactional_id_expiration.as_millis() as i64;
        let entries: Vec<((String, String), Entry)> = self
            .inner
            .txns
            .entries
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((ns, id), entry) in entries {
            let Ok(mut slot) = entry.try_lock() else {
                continue; // busy: a call is in progress, check again next round
            };
            let Some(r) = slot.clone() else { continue };
            let result = match r.state {
                TxnState::Ongoing
                    if now - r.started_at_ms
                        > i64::from(if r.timeout_ms > 0 {
                            r.timeout_ms
                        } else {
                            DEFAULT_TIMEOUT_MS
                        }) =>
                {
                    info!(namespace = %ns, transactional_id = %id, timeout_ms = r.timeout_ms, "transaction timed out: aborting it and fencing its producer");
                    metrics::counter!("tributary_transactions_timed_out_total").increment(1);
                    self.fence_and_abort(&ns, &id, &mut slot, r)
                        .await
                        .map(|_| ())
                }
                // A completion that failed (storage) is retried here.
                TxnState::PrepareCommit | TxnState::PrepareAbort => {
                    self.complete_txn(&ns, &id, &mut slot, r).await.map(|_| ())
                }
                state if !state.is_open() && now - r.updated_at_ms > expire_after => {
                    self.expire_transactional_id(&ns, &id, &mut slot).await
                }
                _ => Ok(()),
            };
            if let Err(e) = result {
                warn!(namespace = %ns, transactional_id = %id, error = %e, "could not complete a transaction; retrying later");
            }
        }
    }

    /// Forgets an idle transactional id: its next InitProducer starts with a new producer id.
    async fn expire_transactional_id(
        &self,
        ns: &str,
        id: &str,
        slot: &mut Option<TxnRecord>,
    ) -> CoreResult<()> {
        let Some(r) = slot.as_ref() else {
            return Ok(());
        };
        // Only if the store still holds what this core last wrote.
        if !self
            .inner
            .meta
            .compare_and_set(&txn_key(ns, id), Some(&to_json(r)), None)
            .await?
        {
            return Ok(());
        }
        info!(namespace = %ns, transactional_id = %id, "transactional id expired (idle)");
        *slot = None;
        let key = (ns.to_string(), id.to_string());
        let mut entries = self.inner.txns.entries.lock();
        // The table's and this round's clones only: nobody is waiting for the entry.
        if entries.get(&key).is_some_and(|e| Arc::strong_count(e) <= 2) {
            entries.remove(&key);
        }
        Ok(())
    }

    pub(crate) async fn run_transaction_timeouts(self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut tick = tokio::time::interval(self.inner.config.transaction_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.abort_timed_out_transactions().await;
                    if let Err(e) = self.forget_resolved_staged().await {
                        warn!(error = %e, "could not forget ended staged transactions; retrying later");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The partitions of a FetchOffsets request with offsets staged by an open transaction.
    pub fn unstable_offsets(&self, req: &v1::FetchOffsetsRequest) -> Vec<v1::FetchPartition> {
        let ns = namespace_or_default(&req.namespace).to_string();
        let pending = self.inner.txns.pending.lock();
        let Some(staged) = pending.get(&(ns.clone(), req.group.clone())) else {
            return Vec::new();
        };
        staged
            .keys()
            .filter(|(stream, partition)| {
                req.partitions.is_empty()
                    || req.partitions.iter().any(|fp| {
                        fp.partition == *partition
                            && fp.stream.as_ref().is_some_and(|s| &s.name == stream)
                    })
            })
            .map(|(stream, partition)| v1::FetchPartition {
                stream: Some(v1::StreamId {
                    namespace: ns.clone(),
                    name: stream.clone(),
                }),
                partition: *partition,
                ..Default::default()
            })
            .collect()
    }

    pub async fn describe_transactions(
        &self,
        namespace: &str,
        ids: &[String],
    ) -> CoreResult<v1::DescribeTransactionsResponse> {
        let ns = namespace_or_default(namespace).to_string();
        let mut out = v1::DescribeTransactionsResponse::default();
        for id in ids {
            let entry = self.txn_entry(&ns, id);
            let mut slot = entry.lock().await;
            match self.load_txn(&ns, id, &mut slot).await? {
                Some(r) => out.transactions.push(info_of(&ns, id, &r)),
                None => {
                    out.not_found.push(id.clone());
                    drop(slot);
                    // Do not keep an empty slot for every id someone asked about.
                    let mut entries = self.inner.txns.entries.lock();
                    if let Some(e) = entries.get(&(ns.clone(), id.clone()))
                        && Arc::strong_count(e) <= 2
                    {
                        entries.remove(&(ns.clone(), id.clone()));
                    }
                }
            }
        }
        Ok(out)
    }

    pub async fn list_transactions(
        &self,
        req: &v1::ListTransactionsRequest,
    ) -> CoreResult<Vec<v1::TransactionInfo>> {
        let ns = namespace_or_default(&req.namespace).to_string();
        let prefix = meta::prefix(meta::TRANSACTIONAL_ID, &[&ns]);
        let now = now_ms();
        let mut out = Vec::new();
        for (key, raw) in self.inner.meta.scan_prefix(&prefix, usize::MAX).await? {
            let parts = meta::parts(meta::TRANSACTIONAL_ID, &key);
            let Some(id) = parts.get(1) else { continue };
            let r: TxnRecord = from_json("transactional id", &raw)?;
            if (!req.states.is_empty() && !req.states.iter().any(|s| s == r.state.name()))
                || (!req.producer_ids.is_empty() && !req.producer_ids.contains(&r.producer_id))
                || (req.min_duration_ms > 0
                    && !(r.state.is_open() && now - r.started_at_ms >= req.min_duration_ms))
            {
                continue;
            }
            out.push(info_of(&ns, id, &r));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_stable_offset_and_aborted_ranges() {
        let mut t = PartitionTxns::default();
        assert_eq!(t.last_stable_offset(10), 10);
        t.open(7, 0, 4);
        t.open(8, 0, 6);
        assert_eq!(t.last_stable_offset(10), 4);
        assert!(t.check_append(7, 0).is_ok());
        assert!(matches!(
            t.check_append(7, 1),
            Err(CoreError::InvalidTxnState(_))
        ));
        t.open(7, 2, 4);
        assert!(matches!(
            t.check_append(7, 1),
            Err(CoreError::ProducerFenced { current: 2, .. })
        ));
        assert!(matches!(
            t.check_append(9, 0),
            Err(CoreError::InvalidTxnState(_))
        ));
        assert_eq!(t.close(7), Some(4));
        assert_eq!(t.last_stable_offset(10), 6);
        t.aborted.push(AbortedTxn {
            producer_id: 7,
            first_offset: 4,
            last_offset: 9,
        });
        t.aborted.push(AbortedTxn {
            producer_id: 8,
            first_offset: 12,
            last_offset: 15,
        });
        assert_eq!(t.aborted_between(0, 4).len(), 0);
        assert_eq!(t.aborted_between(0, 5).len(), 1);
        assert_eq!(t.aborted_between(10, 12).len(), 0);
        assert_eq!(t.aborted_between(9, 13).len(), 2);
        assert_eq!(t.forget_below(10), vec![9]);
        assert_eq!(t.aborted.len(), 1);
    }

    #[test]
    fn records_of_earlier_versions_read_as_empty_coordinators() {
        let old = br#"{"producer_id":5,"epoch":3}"#;
        let r: TxnRecord = serde_json::from_slice(old).unwrap();
        assert_eq!(r.state, TxnState::Empty);
        assert_eq!((r.producer_id, r.epoch), (5, 3));
        assert!(r.partitions.is_empty());
    }
}
