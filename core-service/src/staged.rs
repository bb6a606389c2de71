//! Staged transactions: writes (stream appends, queue enqueues) that the core holds durably
//! and makes if and when the transaction commits. RocketMQ half messages with their
//! check-back, AMQP `tx`, and a delay inside a transaction are all this one model.
//!
//! A transaction is one record in the metadata store, `staged/<ns>\0<id>`
//! ([`v1::StagedTransactionState`]): its writes, owner, context, check-back schedule and,
//! once it ended, its outcome. Nothing of it is in any log, so no reader can see it.
//!
//! Commit is one metadata transaction that checks the record is still the open one it read,
//! marks it committed and inserts one durable timer per write, due now (or at the write's
//! `deliver_at_ms`), with the id `staged-<transaction id>-<index>`. The timer service then
//! makes each write exactly once, across crashes (timers.rs stamps the timer id in the
//! batch and looks for it before writing again). Rollback marks the record rolled back and
//! drops its writes. An ended record is kept for `staged_outcome_retention` (an index
//! `stagedgc/<forget at>\0<ns>\0<id>` finds it) so that a retried resolve is answered.
//!
//! Check-backs: an open transaction with an owner and a check delay has an index entry
//! `stagedcheck/<ns>\0<due ms>\0<id>`. `ClaimStagedChecks` takes due entries and, in one
//! metadata transaction each (checked against the record it read), bumps the count and moves
//! the entry to its next due time, so two claimers never get the same check at once.

use prost::Message;
use tracing::{debug, warn};
use tributary_proto::v1;
use tributary_storage::{Check, Op};

use crate::error::{CoreError, CoreResult};
use crate::meta::{self, validate_name};
use crate::router::Target;
use crate::streams::namespace_or_default;
use crate::{Core, now_ms};

/// Writes one staged transaction may hold.
const MAX_WRITES: usize = 10_000;
/// Largest stored record of one staged transaction (writes and context).
const MAX_STAGED_BYTES: usize = 64 << 20;
/// Records in one staged enqueue (the queue engine's own limit).
const MAX_ENQUEUE: usize = 10_000;
const OPEN: u32 = 0;
const COMMITTED: u32 = 1;
const ROLLED_BACK: u32 = 2;
/// Compare-and-set rounds before a call gives up with CONFLICT.
const CAS_ROUNDS: usize = 16;
const DEFAULT_CLAIM_LIMIT: u32 = 100;
const MAX_CLAIM_LIMIT: u32 = 1000;
/// RocketMQ's transactionCheckInterval default, when the claimer gives none.
const DEFAULT_RECHECK_MS: i64 = 60_000;
const SCAN_PAGE: usize = 256;

fn staged_key(ns: &str, id: &str) -> Vec<u8> {
    meta::key(meta::STAGED, &[ns, id])
}

fn check_key(ns: &str, due: i64, id: &str) -> Vec<u8> {
    meta::key(
        meta::STAGED_CHECK,
        &[ns, &format!("{:020}", due.max(0)), id],
    )
}

fn gc_key(forget_at: i64, ns: &str, id: &str) -> Vec<u8> {
    meta::key(
        meta::STAGED_GC,
        &[&format!("{:020}", forget_at.max(0)), ns, id],
    )
}

/// The timer that makes write `index` of a committed transaction: zero-padded so that the
/// writes of one transaction, all due at the same time, fire in their order.
fn write_timer_id(txn: &str, index: usize) -> String {
    format!("staged-{txn}-{index:06}")
}

/// The timer of one destination (`sub`) of write `index`, a publish: ordered after the
/// writes before it and before the ones after it.
fn sub_timer_id(txn: &str, index: usize, sub: usize) -> String {
    format!("staged-{txn}-{index:06}-{sub:06}")
}

fn deliver_at(r: &v1::Record) -> i64 {
    r.properties.as_ref().map_or(0, |p| p.deliver_at_ms)
}

fn decode(raw: &[u8]) -> CoreResult<v1::StagedTransactionState> {
    v1::StagedTransactionState::decode(raw)
        .map_err(|e| CoreError::Corrupt(format!("staged transaction: {e}")))
}

fn outcome_name(outcome: u32) -> &'static str {
    if outcome == COMMITTED {
        "committed"
    } else {
        "rolled back"
    }
}

impl Core {
    /// Checks one write of a StageMessages call and fills in its namespace.
    fn check_staged_write(&self, ns: &str, w: &mut v1::StagedWrite) -> CoreResult<()> {
        if w.deliver_at_ms < 0 {
            return Err(CoreError::InvalidArgument(format!(
                "deliver_at_ms must be 0 or a time in ms since the Unix epoch, got {}",
                w.deliver_at_ms
            )));
        }
        let same_ns = |what: &str, target_ns: &mut String| -> CoreResult<()> {
            if target_ns.is_empty() {
                *target_ns = ns.to_string();
            } else if namespace_or_default(target_ns) != ns {
                return Err(CoreError::InvalidArgument(format!(
                    "a staged {what} must stay in the transaction's namespace '{ns}', not '{target_ns}'"
                )));
            }
            Ok(())
        };
        match &mut w.write {
            None => Err(CoreError::InvalidArgument(
                "a staged write needs an append, an enqueue, a publish or an ack".into(),
            )),
            Some(v1::staged_write::Write::Publish(p)) => {
                same_ns("publish", &mut p.namespace)?;
                if p.records.is_empty() || p.records.len() > MAX_ENQUEUE {
                    return Err(CoreError::InvalidArgument(format!(
                        "a staged publish takes 1..={MAX_ENQUEUE} records, got {}",
                        p.records.len()
                    )));
                }
                if !p.transaction_id.is_empty() {
                    return Err(CoreError::InvalidArgument(
                        "a staged publish belongs to its staged transaction, not to a transaction_id of its own".into(),
                    ));
                }
                // The address must exist now (as a publish would find out); what it routes
                // to is decided when the transaction commits.
                if !p.address.is_empty() {
                    self.check_address(ns, &p.address)?;
                }
                Ok(())
            }
            Some(v1::staged_write::Write::Ack(a)) => {
                let q = a.queue.as_mut().ok_or_else(|| {
                    CoreError::InvalidArgument("a staged ack needs a queue".into())
                })?;
                same_ns("ack", &mut q.namespace)?;
                validate_name("queue", &q.name)?;
                if a.lease_ids.is_empty() || a.lease_ids.len() > MAX_ENQUEUE {
                    return Err(CoreError::InvalidArgument(format!(
                        "a staged ack takes 1..={MAX_ENQUEUE} lease ids, got {}",
                        a.lease_ids.len()
                    )));
                }
                if w.deliver_at_ms > 0 {
                    return Err(CoreError::InvalidArgument(
                        "a staged ack is made at commit; it takes no deliver_at_ms".into(),
                    ));
                }
                self.check_lease_ids(q, &a.lease_ids)?;
                Ok(())
            }
            Some(v1::staged_write::Write::Append(a)) => {
                let id = a.stream.as_mut().ok_or_else(|| {
                    CoreError::InvalidArgument("a staged append needs a stream".into())
                })?;
                same_ns("append", &mut id.namespace)?;
                validate_name("stream", &id.name)?;
                self.refuse_when_spread("a staged append")?;
                let batch = a.batch.as_mut().ok_or_else(|| {
                    CoreError::InvalidArgument("a staged append needs a batch".into())
                })?;
                if batch.records.is_empty() && (batch.opaque.is_empty() || batch.record_count == 0)
                {
                    return Err(CoreError::InvalidArgument(
                        "a staged append's batch is empty".into(),
                    ));
                }
                if !batch.records.is_empty() && !batch.opaque.is_empty() {
                    return Err(CoreError::InvalidArgument(
                        "a batch has either records or an opaque payload, not both".into(),
                    ));
                }
                if batch.control.is_some() || batch.transactional || batch.producer_id > 0 {
                    return Err(CoreError::InvalidArgument(
                        "a staged append cannot be idempotent, transactional or a control batch (the staged transaction makes it exactly once)".into(),
                    ));
                }
                batch.timer_id.clear();
                batch.base_offset = 0;
                match self.stream(id) {
                    Ok(h) => {
                        h.partition(a.partition)?;
                        let max = meta::EffectiveConfig::resolve(
                            &h.record.read().settings,
                            &self.inner.config.stream_defaults,
                        )
                        .max_message_bytes;
                        let size = batch.encoded_len();
                        if size as i64 > max {
                            return Err(CoreError::RecordTooLarge { size, limit: max });
                        }
                    }
                    Err(CoreError::StreamNotFound(_))
                        if a.auto_create && self.inner.config.auto_create_streams =>
                    {
                        // Created when the write is made, as Append would.
                        let count = self.inner.config.default_partitions;
                        if a.partition >= count {
                            return Err(CoreError::PartitionNotFound {
                                stream: id.name.clone(),
                                partition: a.partition,
                                count,
                            });
                        }
                    }
                    Err(e) => return Err(e),
                }
                Ok(())
            }
            Some(v1::staged_write::Write::Enqueue(e)) => {
                let q = e.queue.as_mut().ok_or_else(|| {
                    CoreError::InvalidArgument("a staged enqueue needs a queue".into())
                })?;
                same_ns("enqueue", &mut q.namespace)?;
                validate_name("queue", &q.name)?;
                if e.records.is_empty() || e.records.len() > MAX_ENQUEUE {
                    return Err(CoreError::InvalidArgument(format!(
                        "a staged enqueue takes 1..={MAX_ENQUEUE} records, got {}",
                        e.records.len()
                    )));
                }
                self.queue(q)?;
                Ok(())
            }
        }
    }

    /// StageMessages: a new staged transaction, or more writes for an open one.
    pub async fn stage_messages(
        &self,
        req: v1::StageMessagesRequest,
    ) -> CoreResult<v1::StageMessagesResponse> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        self.require_namespace(&ns)?;
        if req.writes.is_empty() {
            return Err(CoreError::InvalidArgument(
                "StageMessages needs at least one write".into(),
            ));
        }
        if req.writes.len() > MAX_WRITES {
            return Err(CoreError::InvalidArgument(format!(
                "a staged transaction holds at most {MAX_WRITES} writes, got {}",
                req.writes.len()
            )));
        }
        if req.check_after_ms < 0 {
            return Err(CoreError::InvalidArgument(format!(
                "check_after_ms must be >= 0, got {}",
                req.check_after_ms
            )));
        }
        if req.timeout_ms < 0 {
            return Err(CoreError::InvalidArgument(format!(
                "timeout_ms must be >= 0, got {}",
                req.timeout_ms
            )));
        }
        if !req.owner.is_empty() {
            validate_name("owner", &req.owner)?;
        }
        let mut writes = req.writes;
        for w in &mut writes {
            self.check_staged_write(&ns, w)?;
        }
        if req.transaction_id.is_empty() {
            let id = format!("st-{:032x}", rand::random::<u128>());
            let now = now_ms();
            let next = if !req.owner.is_empty() && req.check_after_ms > 0 {
                now.saturating_add(req.check_after_ms)
            } else {
                0
            };
            let st = v1::StagedTransactionState {
                writes,
                owner: req.owner,
                context: req.context,
                staged_at_ms: now,
                next_check_at_ms: next,
                checks: 0,
                outcome: OPEN,
                resolved_at_ms: 0,
                check_after_ms: req.check_after_ms,
                expires_at_ms: if req.timeout_ms > 0 {
                    now.saturating_add(req.timeout_ms)
                } else {
                    0
                },
            };
            let value = st.encode_to_vec();
            if value.len() > MAX_STAGED_BYTES {
                return Err(CoreError::InvalidArgument(format!(
                    "a staged transaction is at most {MAX_STAGED_BYTES} bytes, this one {}",
                    value.len()
                )));
            }
            let key = staged_key(&ns, &id);
            let mut ops = vec![Op::Put {
                key: key.clone(),
                value,
            }];
            if next > 0 {
                ops.push(Op::Put {
                    key: check_key(&ns, next, &id),
                    value: Vec::new(),
                });
            }
            if st.expires_at_ms > 0 {
                // The sweep that forgets ended transactions rolls it back then if still open.
                ops.push(Op::Put {
                    key: gc_key(st.expires_at_ms, &ns, &id),
                    value: Vec::new(),
                });
            }
            let applied = self
                .inner
                .meta
                .txn(vec![Check { key, value: None }], ops)
                .await?;
            if !applied {
                return Err(CoreError::Conflict(format!(
                    "staged transaction '{id}' already exists"
                )));
            }
            metrics::counter!("tributary_staged_transactions_total").increment(1);
            debug!(namespace = %ns, transaction = %id, "staged transaction opened");
            return Ok(v1::StageMessagesResponse {
                transaction_id: id,
                staged_at_ms: now,
            });
        }
        let id = req.transaction_id;
        validate_name("transaction id", &id)?;
        let key = staged_key(&ns, &id);
        for _ in 0..CAS_ROUNDS {
            let Some(raw) = self.inner.meta.get(&key).await? else {
                return Err(CoreError::TransactionNotFound(id));
            };
            let mut st = decode(&raw)?;
            if st.outcome != OPEN {
                return Err(CoreError::TransactionAlreadyResolved(format!(
                    "staged transaction '{id}' was {} and takes no more writes",
                    outcome_name(st.outcome)
                )));
            }
            if st.writes.len() + writes.len() > MAX_WRITES {
                return Err(CoreError::InvalidArgument(format!(
                    "a staged transaction holds at most {MAX_WRITES} writes"
                )));
            }
            st.writes.extend(writes.iter().cloned());
            if !req.owner.is_empty() {
                st.owner = req.owner.clone();
            }
            if !req.context.is_empty() {
                st.context = req.context.clone();
            }
            let old_next = st.next_check_at_ms;
            if req.check_after_ms > 0 {
                st.check_after_ms = req.check_after_ms;
                st.next_check_at_ms = now_ms().saturating_add(req.check_after_ms);
            } else if old_next == 0 && !st.owner.is_empty() && st.check_after_ms > 0 {
                // An owner named only now: checks start from here.
                st.next_check_at_ms = now_ms().saturating_add(st.check_after_ms);
            }
            if st.owner.is_empty() || st.check_after_ms == 0 {
                st.next_check_at_ms = 0;
            }
            let value = st.encode_to_vec();
            if value.len() > MAX_STAGED_BYTES {
                return Err(CoreError::InvalidArgument(format!(
                    "a staged transaction is at most {MAX_STAGED_BYTES} bytes, this one would be {}",
                    value.len()
                )));
            }
            let mut ops = vec![Op::Put {
                key: key.clone(),
                value,
            }];
            if old_next != st.next_check_at_ms {
                if old_next > 0 {
                    ops.push(Op::Delete {
                        key: check_key(&ns, old_next, &id),
                    });
                }
                if st.next_check_at_ms > 0 {
                    ops.push(Op::Put {
                        key: check_key(&ns, st.next_check_at_ms, &id),
                        value: Vec::new(),
                    });
                }
            }
            let checks = vec![Check {
                key: key.clone(),
                value: Some(raw.to_vec()),
            }];
            if self.inner.meta.txn(checks, ops).await? {
                return Ok(v1::StageMessagesResponse {
                    transaction_id: id,
                    staged_at_ms: st.staged_at_ms,
                });
            }
        }
        Err(CoreError::Conflict(format!(
            "staged transaction '{id}' keeps changing; retry"
        )))
    }

    /// The durable timers that make one write of a committed transaction: one, or for a
    /// publish one per destination (routed now) and run of records due together; with, for
    /// a publish, how many destinations each record reached.
    fn staged_write_timers(
        &self,
        ns: &str,
        txn: &str,
        index: usize,
        w: v1::StagedWrite,
        now: i64,
    ) -> (Vec<v1::Timer>, Option<v1::PublishResponse>) {
        let at = now.max(w.deliver_at_ms);
        let timer = |id: String, due: i64, action| v1::Timer {
            id,
            due_at_ms: due,
            action: Some(action),
            namespace: ns.to_string(),
        };
        let Some(write) = w.write else {
            return (Vec::new(), None);
        };
        let one = |action| vec![timer(write_timer_id(txn, index), at, action)];
        match write {
            v1::staged_write::Write::Append(a) => (one(v1::timer::Action::Append(a)), None),
            v1::staged_write::Write::Ack(a) => (one(v1::timer::Action::Ack(a)), None),
            v1::staged_write::Write::Enqueue(e) => {
                let due = self.enqueue_due(&e, at, now);
                (
                    vec![timer(
                        write_timer_id(txn, index),
                        due,
                        v1::timer::Action::Enqueue(e),
                    )],
                    None,
                )
            }
            v1::staged_write::Write::Publish(mut p) => {
                let mut routed = vec![0u32; p.records.len()];
                let groups = self.route_targets(ns, &p.address, &p.routing_key, &mut p.records);
                let mut timers = Vec::new();
                for (idx, targets) in groups {
                    for i in &idx {
                        routed[*i] += targets.len() as u32;
                    }
                    for t in targets {
                        let records: Vec<v1::Record> =
                            idx.iter().map(|i| p.records[*i].clone()).collect();
                        match t {
                            Target::Queue(q) => {
                                let queue = v1::QueueId {
                                    namespace: ns.to_string(),
                                    name: q,
                                };
                                // Records due at different times (x-delay) go separately.
                                for run in records.chunk_by(|a, b| deliver_at(a) == deliver_at(b)) {
                                    let e = v1::EnqueueRequest {
                                        queue: Some(queue.clone()),
                                        records: run.to_vec(),
                                    };
                                    let due = self.enqueue_due(&e, at, now);
                                    let id = sub_timer_id(txn, index, timers.len());
                                    timers.push(timer(id, due, v1::timer::Action::Enqueue(e)));
                                }
                            }
                            Target::Stream(name) => {
                                let id = v1::StreamId::new(ns.to_string(), name);
                                let partitions =
                                    self.stream(&id).map_or(1, |h| h.partitions().len().max(1))
                                        as u64;
                                // As a publish does: by key hash, keyless ones to 0.
                                let mut by_partition: std::collections::BTreeMap<u32, Vec<_>> =
                                    Default::default();
                                for r in records {
                                    let part = if r.key.is_empty() {
                                        0
                                    } else {
                                        (meta::stable_hash(&r.key) % partitions) as u32
                                    };
                                    by_partition.entry(part).or_default().push(r);
                                }
                                for (partition, records) in by_partition {
                                    let a = v1::AppendRequest {
                                        stream: Some(id.clone()),
                                        partition,
                                        batch: Some(v1::RecordBatch {
                                            records,
                                            ..Default::default()
                                        }),
                                        auto_create: false,
                                        defer_durable: false,
                                    };
                                    let tid = sub_timer_id(txn, index, timers.len());
                                    timers.push(timer(tid, at, v1::timer::Action::Append(a)));
                                }
                            }
                            Target::Address(_) => {}
                        }
                    }
                }
                (timers, Some(v1::PublishResponse { routed }))
            }
        }
    }

    /// When a staged enqueue is made: as the queue engine releases a delayed message, per
    /// record delays and the queue's delivery delay are the timer's due time.
    fn enqueue_due(&self, e: &v1::EnqueueRequest, at: i64, now: i64) -> i64 {
        let mut due = at.max(e.records.iter().map(deliver_at).max().unwrap_or(0));
        if let Some(q) = e.queue.as_ref()
            && let Ok(h) = self.queue(q)
            && let Some(delay) = h.settings().delivery_delay_ms.filter(|d| *d > 0)
        {
            due = due.max(now.saturating_add(delay));
        }
        due
    }

    /// ResolveStaged: commits (the writes become timers in the same metadata transaction,
    /// then the ones due now are made before the answer) or rolls back. `resolved` is false
    /// when it had already ended the same way.
    pub async fn resolve_staged(
        &self,
        req: v1::ResolveStagedRequest,
    ) -> CoreResult<v1::ResolveStagedResponse> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        if req.transaction_id.is_empty() {
            return Err(CoreError::InvalidArgument(
                "transaction_id is required".into(),
            ));
        }
        let id = req.transaction_id;
        let key = staged_key(&ns, &id);
        for _ in 0..CAS_ROUNDS {
            let Some(raw) = self.inner.meta.get(&key).await? else {
                return Err(CoreError::TransactionNotFound(id));
            };
            let mut st = decode(&raw)?;
            if st.outcome != OPEN {
                let committed = st.outcome == COMMITTED;
                if committed == req.commit {
                    return Ok(v1::ResolveStagedResponse::default());
                }
                return Err(CoreError::TransactionAlreadyResolved(format!(
                    "staged transaction '{id}' was {} and cannot be {}",
                    outcome_name(st.outcome),
                    if req.commit {
                        "committed"
                    } else {
                        "rolled back"
                    }
                )));
            }
            let now = now_ms();
            let writes = std::mem::take(&mut st.writes);
            let next = st.next_check_at_ms;
            let (ops, checks, timers, published) = self.end_staged_ops(
                &ns,
                &id,
                &raw,
                &mut st,
                if req.commit { COMMITTED } else { ROLLED_BACK },
                now,
                next,
                if req.commit { writes } else { Vec::new() },
            );
            if !self.inner.meta.txn(checks, ops).await? {
                continue;
            }
            if !timers.is_empty() {
                metrics::gauge!("tributary_timers_pending").increment(timers.len() as f64);
                for t in &timers {
                    if let Some(v1::timer::Action::Enqueue(e)) = &t.action {
                        self.note_timer_delayed(&e.queue.clone().unwrap_or_default(), 1);
                    }
                }
                self.inner.timers_changed.notify_one();
            }
            metrics::counter!(
                "tributary_staged_transactions_completed_total",
                "outcome" => if req.commit { "commit" } else { "rollback" }
            )
            .increment(1);
            // Committed durably: the timers make the writes whatever happens now. Those due
            // now are made here, in order, so that whoever hears of the commit finds them.
            for t in timers.iter().filter(|t| t.due_at_ms <= now) {
                if let Err(e) = self.fire_now(t).await {
                    warn!(namespace = %ns, transaction = %id, timer = %t.id, error = %e, "a committed write is left to the timer service");
                    break;
                }
            }
            debug!(namespace = %ns, transaction = %id, commit = req.commit, writes = timers.len(), "staged transaction resolved");
            return Ok(v1::ResolveStagedResponse {
                resolved: true,
                published,
            });
        }
        Err(CoreError::Conflict(format!(
            "staged transaction '{id}' keeps changing; retry"
        )))
    }

    /// The metadata transaction that ends an open staged transaction: the record (read as
    /// `raw`) becomes the outcome, its check entry goes, a forget-entry is added, and on
    /// commit one timer per write is inserted.
    #[allow(clippy::too_many_arguments)]
    fn end_staged_ops(
        &self,
        ns: &str,
        id: &str,
        raw: &[u8],
        st: &mut v1::StagedTransactionState,
        outcome: u32,
        now: i64,
        check_due: i64,
        writes: Vec<v1::StagedWrite>,
    ) -> (
        Vec<Op>,
        Vec<Check>,
        Vec<v1::Timer>,
        Vec<v1::PublishResponse>,
    ) {
        let key = staged_key(ns, id);
        st.writes.clear();
        st.context.clear();
        st.outcome = outcome;
        st.resolved_at_ms = now;
        st.next_check_at_ms = 0;
        let keep = self.inner.config.staged_outcome_retention.as_millis() as i64;
        let mut checks = vec![Check {
            key: key.clone(),
            value: Some(raw.to_vec()),
        }];
        let mut ops = vec![
            Op::Put {
                key,
                value: st.encode_to_vec(),
            },
            Op::Put {
                key: gc_key(now.saturating_add(keep), ns, id),
                value: Vec::new(),
            },
        ];
        if check_due > 0 {
            ops.push(Op::Delete {
                key: check_key(ns, check_due, id),
            });
        }
        let mut timers = Vec::with_capacity(writes.len());
        let mut published = Vec::new();
        for (i, w) in writes.into_iter().enumerate() {
            let (made, routed) = self.staged_write_timers(ns, id, i, w, now);
            published.extend(routed);
            timers.extend(made);
        }
        for timer in &timers {
            crate::timers::schedule_ops(timer, &mut checks, &mut ops);
        }
        (ops, checks, timers, published)
    }

    /// ClaimStagedChecks: the due check-backs of a namespace, each claimed by moving its next
    /// check `recheck_after_ms` on; those past `max_checks` are rolled back instead.
    pub async fn claim_staged_checks(
        &self,
        req: v1::ClaimStagedChecksRequest,
    ) -> CoreResult<v1::ClaimStagedChecksResponse> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        let limit = match req.limit {
            0 => DEFAULT_CLAIM_LIMIT,
            n => n.min(MAX_CLAIM_LIMIT),
        } as usize;
        if req.recheck_after_ms < 0 {
            return Err(CoreError::InvalidArgument(format!(
                "recheck_after_ms must be >= 0, got {}",
                req.recheck_after_ms
            )));
        }
        let now = now_ms();
        let mut out = v1::ClaimStagedChecksResponse::default();
        let prefix = meta::prefix(meta::STAGED_CHECK, &[&ns]);
        let end = tributary_storage::prefix_end(&prefix).unwrap_or_else(|| vec![0xff; 64]);
        let mut start = prefix.clone();
        'scan: loop {
            let page = self.inner.meta.scan(&start, &end, SCAN_PAGE).await?;
            let full = page.len() == SCAN_PAGE;
            for (k, _) in &page {
                let parts = meta::parts(meta::STAGED_CHECK, k);
                let [_, due, id] = parts.as_slice() else {
                    continue;
                };
                let due: i64 = due.parse().unwrap_or(0);
                if due > now || out.checks.len() >= limit {
                    break 'scan;
                }
                self.claim_one(&ns, id, due, now, &req, &mut out).await?;
            }
            match page.last() {
                Some((k, _)) if full => {
                    start = k.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    async fn claim_one(
        &self,
        ns: &str,
        id: &str,
        due: i64,
        now: i64,
        req: &v1::ClaimStagedChecksRequest,
        out: &mut v1::ClaimStagedChecksResponse,
    ) -> CoreResult<()> {
        let key = staged_key(ns, id);
        let raw = self.inner.meta.get(&key).await?;
        let index_key = check_key(ns, due, id);
        let stale = || Op::Delete {
            key: index_key.clone(),
        };
        let Some(raw) = raw else {
            self.inner.meta.txn(Vec::new(), vec![stale()]).await?;
            return Ok(());
        };
        let mut st = decode(&raw)?;
        if st.outcome != OPEN || st.next_check_at_ms != due {
            // Another claimer moved it (or it ended) since the scan: the entry is not its
            // current one. Dropped only if the record still says so.
            let checks = vec![Check {
                key: key.clone(),
                value: Some(raw.to_vec()),
            }];
            self.inner.meta.txn(checks, vec![stale()]).await?;
            return Ok(());
        }
        if req.max_checks > 0 && st.checks >= req.max_checks {
            let (ops, checks, _, _) =
                self.end_staged_ops(ns, id, &raw, &mut st, ROLLED_BACK, now, due, Vec::new());
            if self.inner.meta.txn(checks, ops).await? {
                warn!(namespace = %ns, transaction = %id, checks = st.checks, "staged transaction rolled back: no answer after max_checks check-backs");
                metrics::counter!(
                    "tributary_staged_transactions_completed_total",
                    "outcome" => "discard"
                )
                .increment(1);
                out.discarded.push(id.to_string());
            }
            return Ok(());
        }
        st.checks += 1;
        let recheck = if req.recheck_after_ms > 0 {
            req.recheck_after_ms
        } else if st.check_after_ms > 0 {
            st.check_after_ms
        } else {
            DEFAULT_RECHECK_MS
        };
        st.next_check_at_ms = now.saturating_add(recheck);
        let checks = vec![Check {
            key: key.clone(),
            value: Some(raw.to_vec()),
        }];
        let ops = vec![
            Op::Put {
                key,
                value: st.encode_to_vec(),
            },
            stale(),
            Op::Put {
                key: check_key(ns, st.next_check_at_ms, id),
                value: Vec::new(),
            },
        ];
        if self.inner.meta.txn(checks, ops).await? {
            metrics::counter!("tributary_staged_transaction_checks_total").increment(1);
            out.checks.push(v1::StagedCheck {
                transaction_id: id.to_string(),
                owner: st.owner,
                context: st.context,
                checks: st.checks,
                staged_at_ms: st.staged_at_ms,
            });
        }
        Ok(())
    }

    /// Rolls back an open transaction past its timeout (its gateway never resolved it).
    async fn expire_staged(
        &self,
        ns: &str,
        id: &str,
        raw: &[u8],
        st: &mut v1::StagedTransactionState,
        now: i64,
    ) -> CoreResult<()> {
        let due = st.next_check_at_ms;
        let (ops, checks, _, _) =
            self.end_staged_ops(ns, id, raw, st, ROLLED_BACK, now, due, Vec::new());
        if self.inner.meta.txn(checks, ops).await? {
            debug!(namespace = %ns, transaction = %id, "staged transaction rolled back: not resolved within its timeout");
            metrics::counter!(
                "tributary_staged_transactions_completed_total",
                "outcome" => "timeout"
            )
            .increment(1);
        }
        Ok(())
    }

    /// Forgets the outcomes of staged transactions that ended longer ago than
    /// `staged_outcome_retention`, a page per metadata transaction. An ended record never
    /// changes again, so the deletes need no check; an open one (which has no forget entry
    /// unless something went wrong) is left alone.
    pub(crate) async fn forget_resolved_staged(&self) -> CoreResult<()> {
        let now = now_ms();
        let keep = self.inner.config.staged_outcome_retention.as_millis() as i64;
        let prefix = meta::key(meta::STAGED_GC, &[]);
        loop {
            let page = self.inner.meta.scan_prefix(&prefix, SCAN_PAGE).await?;
            let full = page.len() == SCAN_PAGE;
            let mut ops = Vec::new();
            let mut reached_future = false;
            for (k, _) in page {
                let parts = meta::parts(meta::STAGED_GC, &k);
                if let [at, ns, id] = parts.as_slice() {
                    if at.parse::<i64>().unwrap_or(0) > now {
                        reached_future = true;
                        break;
                    }
                    let key = staged_key(ns, id);
                    if let Some(raw) = self.inner.meta.get(&key).await?
                        && let Ok(mut st) = decode(&raw)
                    {
                        if st.outcome != OPEN {
                            // An expiry entry of one resolved before it: kept for its time.
                            if st.resolved_at_ms.saturating_add(keep) <= now {
                                ops.push(Op::Delete { key });
                            }
                        } else if st.expires_at_ms > 0 && st.expires_at_ms <= now {
                            self.expire_staged(ns, id, &raw, &mut st, now).await?;
                        }
                    }
                }
                ops.push(Op::Delete { key: k });
            }
            if !ops.is_empty() {
                self.inner.meta.txn(Vec::new(), ops).await?;
            }
            if reached_future || !full {
                return Ok(());
            }
        }
    }
}
