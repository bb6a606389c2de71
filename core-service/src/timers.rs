//! The durable timer service: a deliver-at index in the metadata store.
//!
//! A timer lives under `timer/<due ms, 20 digits>\0<ns>\0<id>`, so a prefix scan yields the
//! earliest first, plus `timerid/<ns>\0<id>` for cancel and list. Firing is exactly-once:
//! the timer moves atomically to `timerfiring/` together with the target partition's end
//! offset, then the append happens with the timer id stamped in the batch, then the firing
//! entry goes. After a crash in between, a firing entry is finished by first looking for
//! the stamped batch after the recorded offset, and appending only if it is not there.

use std::time::Duration;

use prost::Message;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use tributary_proto::v1;
use tributary_storage::{Check, Op};

use crate::error::{CoreError, CoreResult};
use crate::meta::{self, from_json, to_json, validate_name};
use crate::{Core, DEFAULT_NAMESPACE, now_ms};

const FIRE_BATCH: usize = 256;
/// Stream appends due together taken into firing in one metadata transaction, and their
/// firing entries removed in one: a delay line's records fire at a few metadata commits
/// per batch rather than two per timer (etcd allows 128 operations per transaction).
const FIRE_TOGETHER: usize = 40;

#[derive(Serialize, Deserialize)]
struct Firing {
    /// The target partition's end offset before the append; `None` if the stream did not exist.
    from_offset: Option<i64>,
    timer: Vec<u8>,
}

pub(crate) fn due_key(due: i64, ns: &str, id: &str) -> Vec<u8> {
    meta::key(meta::TIMER_DUE, &[&format!("{:020}", due.max(0)), ns, id])
}

/// The writes that store a new timer (its due entry and its id entry), and the check that
/// no timer of that id exists: for callers that schedule timers inside a transaction of
/// their own (a staged commit, a delay line with its position).
pub(crate) fn schedule_ops(timer: &v1::Timer, checks: &mut Vec<Check>, ops: &mut Vec<Op>) {
    let due = due_key(timer.due_at_ms, &timer.namespace, &timer.id);
    let by_id = meta::key(meta::TIMER_BY_ID, &[&timer.namespace, &timer.id]);
    checks.push(Check {
        key: by_id.clone(),
        value: None,
    });
    ops.push(Op::Put {
        key: due.clone(),
        value: timer.encode_to_vec(),
    });
    ops.push(Op::Put {
        key: by_id,
        value: due,
    });
}

fn append_target(timer: &v1::Timer) -> CoreResult<&v1::AppendRequest> {
    match &timer.action {
        Some(v1::timer::Action::Append(a)) => Ok(a),
        Some(
            v1::timer::Action::Route(_)
            | v1::timer::Action::Enqueue(_)
            | v1::timer::Action::SessionExpiry(_)
            | v1::timer::Action::Ack(_),
        )
        | None => Err(CoreError::InvalidArgument("a timer needs an action".into())),
    }
}

impl Core {
    pub async fn schedule_timer(&self, mut timer: v1::Timer) -> CoreResult<String> {
        self.check_running()?;
        if timer.namespace.is_empty() {
            timer.namespace = DEFAULT_NAMESPACE.into();
        }
        if timer.id.is_empty() {
            timer.id = format!(
                "t-{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            );
        }
        validate_name("timer id", &timer.id)?;
        if timer.due_at_ms <= 0 {
            return Err(CoreError::InvalidArgument(
                "due_at_ms must be a positive time in ms since the Unix epoch".into(),
            ));
        }
        match &timer.action {
            Some(v1::timer::Action::Route(m)) => {
                let topic = m
                    .record
                    .as_ref()
                    .and_then(|r| r.properties.as_ref())
                    .map_or("", |p| p.address.as_str());
                crate::topics::validate_name(topic)
                    .map_err(|e| CoreError::InvalidArgument(format!("the timer's topic: {e}")))?;
            }
            Some(v1::timer::Action::SessionExpiry(e)) => {
                if e.client_id.is_empty() {
                    return Err(CoreError::InvalidArgument(
                        "a session expiry names a client".into(),
                    ));
                }
            }
            Some(v1::timer::Action::Enqueue(e)) => {
                let queue = e.queue.as_ref().ok_or_else(|| {
                    CoreError::InvalidArgument("the timer's enqueue needs a queue".into())
                })?;
                validate_name("queue", &queue.name)?;
                if e.records.is_empty() {
                    return Err(CoreError::InvalidArgument(
                        "the timer's enqueue has no records".into(),
                    ));
                }
            }
            Some(v1::timer::Action::Ack(_)) => {
                return Err(CoreError::InvalidArgument(
                    "an ack timer is made by a staged transaction's commit only".into(),
                ));
            }
            _ => {
                let append = append_target(&timer)?;
                let stream = append.stream.as_ref().ok_or_else(|| {
                    CoreError::InvalidArgument("the timer's append needs a stream".into())
                })?;
                validate_name("stream", &stream.name)?;
                self.refuse_when_spread("a timer appending to a stream")?;
                let batch = append.batch.as_ref().ok_or_else(|| {
                    CoreError::InvalidArgument("the timer's append needs a batch".into())
                })?;
                if batch.records.is_empty() && (batch.opaque.is_empty() || batch.record_count == 0)
                {
                    return Err(CoreError::InvalidArgument(
                        "the timer's batch is empty".into(),
                    ));
                }
            }
        }
        let (mut checks, mut ops) = (Vec::new(), Vec::new());
        schedule_ops(&timer, &mut checks, &mut ops);
        let applied = self.inner.meta.txn(checks, ops).await?;
        if !applied {
            return Err(CoreError::Conflict(format!(
                "timer '{}' already exists",
                timer.id
            )));
        }
        metrics::gauge!("tributary_timers_pending").increment(1.0);
        self.inner.timers_changed.notify_one();
        Ok(timer.id)
    }

    pub async fn cancel_timer(&self, namespace: &str, id: &str) -> CoreResult<bool> {
        let ns = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        let by_id = meta::key(meta::TIMER_BY_ID, &[ns, id]);
        let Some(due) = self.inner.meta.get(&by_id).await? else {
            return Ok(false);
        };
        let enqueue_to = self
            .inner
            .meta
            .get(&due)
            .await?
            .and_then(|raw| v1::Timer::decode(&raw[..]).ok())
            .and_then(|t| match t.action {
                Some(v1::timer::Action::Enqueue(e)) => e.queue,
                _ => None,
            });
        let applied = self
            .inner
            .meta
            .txn(
                vec![Check {
                    key: by_id.clone(),
                    value: Some(due.to_vec()),
                }],
                vec![Op::Delete { key: by_id }, Op::Delete { key: due.to_vec() }],
            )
            .await?;
        if applied {
            metrics::gauge!("tributary_timers_pending").decrement(1.0);
            if let Some(q) = &enqueue_to {
                self.note_timer_delayed(q, -1);
            }
        }
        Ok(applied)
    }

    pub async fn list_timers(&self, namespace: &str, limit: usize) -> CoreResult<Vec<v1::Timer>> {
        let ns = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        let limit = if limit == 0 { 1000 } else { limit };
        let mut out = Vec::new();
        for (_, due) in self
            .inner
            .meta
            .scan_prefix(&meta::prefix(meta::TIMER_BY_ID, &[ns]), limit)
            .await?
        {
            if let Some(raw) = self.inner.meta.get(&due).await? {
                out.push(
                    v1::Timer::decode(raw)
                        .map_err(|e| CoreError::Corrupt(format!("timer: {e}")))?,
                );
            }
        }
        Ok(out)
    }

    /// Finishes timers that were firing when the previous process stopped.
    pub(crate) async fn recover_timers(&self) -> CoreResult<()> {
        let due = self
            .inner
            .meta
            .scan_prefix(&meta::key(meta::TIMER_DUE, &[]), usize::MAX)
            .await?;
        metrics::gauge!("tributary_timers_pending").set(due.len() as f64);
        // Delayed enqueues count among their queue's delayed messages.
        for (_, raw) in &due {
            if let Ok(v1::Timer {
                action: Some(v1::timer::Action::Enqueue(e)),
                ..
            }) = v1::Timer::decode(&raw[..])
            {
                self.note_timer_delayed(&e.queue.unwrap_or_default(), 1);
            }
        }
        for (key, raw) in self
            .inner
            .meta
            .scan_prefix(&meta::key(meta::TIMER_FIRING, &[]), usize::MAX)
            .await?
        {
            // Under the timer's lock, and only if still firing: a staged commit may be
            // finishing it too (after a failed pass, the loop comes back here).
            let parts = meta::parts(meta::TIMER_FIRING, &key);
            let [ns, id] = parts.as_slice() else {
                continue;
            };
            let _held = self.timer_lock(ns, id).lock().await;
            if self.inner.meta.get(&key).await?.as_deref() != Some(&raw[..]) {
                continue;
            }
            let firing: Firing = from_json("firing timer", &raw)?;
            self.finish_firing(key, firing).await?;
        }
        Ok(())
    }

    pub(crate) async fn run_timers(self) {
        let mut failed = false;
        loop {
            // After a failed pass a timer may be stuck half-fired: finish it first.
            let pass = async {
                if failed {
                    self.recover_timers().await?;
                }
                self.fire_due_timers().await
            };
            let next = match pass.await {
                Ok(next) => {
                    failed = false;
                    next
                }
                Err(e) => {
                    warn!(error = %e, "timer pass failed; retrying in 1 s");
                    failed = true;
                    Some(now_ms() + 1000)
                }
            };
            let wait = match next {
                Some(due) => Duration::from_millis(due.saturating_sub(now_ms()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.timers_changed.notified() => {}
            }
        }
    }

    /// Fires every timer that is due. Returns the due time of the next one, if any.
    async fn fire_due_timers(&self) -> CoreResult<Option<i64>> {
        let prefix = meta::key(meta::TIMER_DUE, &[]);
        loop {
            // Only the timers due by now: those waiting (a delay line holds thousands) are
            // not read on every pass.
            let now = now_ms();
            let end = meta::key(meta::TIMER_DUE, &[&format!("{:020}", now.max(0) + 1)]);
            let batch = self.inner.meta.scan(&prefix, &end, FIRE_BATCH).await?;
            let full = batch.len() == FIRE_BATCH;
            // Stream appends go together, in due order; the others one by one.
            let mut appends = Vec::new();
            for (key, raw) in batch {
                match v1::Timer::decode(&raw[..]) {
                    Ok(timer) if matches!(timer.action, Some(v1::timer::Action::Append(_))) => {
                        appends.push((key, raw.to_vec(), timer));
                        if appends.len() == FIRE_TOGETHER {
                            self.fire_appends(std::mem::take(&mut appends)).await?;
                        }
                    }
                    _ => {
                        self.fire_appends(std::mem::take(&mut appends)).await?;
                        self.fire(key, raw.to_vec()).await?;
                    }
                }
            }
            self.fire_appends(appends).await?;
            if !full {
                break;
            }
        }
        // The next one to wait for.
        let next = self.inner.meta.scan_prefix(&prefix, 1).await?;
        Ok(next.first().map(|(key, _)| {
            meta::parts(meta::TIMER_DUE, key)
                .first()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0)
        }))
    }

    /// The lock a timer fires under (see `Inner::timer_locks`).
    fn timer_lock(&self, ns: &str, id: &str) -> &tokio::sync::Mutex<()> {
        let locks = &self.inner.timer_locks;
        let h = meta::stable_hash(format!("{ns}\0{id}").as_bytes());
        &locks[(h % locks.len() as u64) as usize]
    }

    /// Fires one timer that is due now, unless something else already did: what a staged
    /// commit does with its writes before it answers, so that a reader that hears of the
    /// commit finds them. Waits for the timer loop if that has it in hand.
    pub(crate) async fn fire_now(&self, timer: &v1::Timer) -> CoreResult<()> {
        let due = due_key(timer.due_at_ms, &timer.namespace, &timer.id);
        let _held = self.timer_lock(&timer.namespace, &timer.id).lock().await;
        if let Some(raw) = self.inner.meta.get(&due).await? {
            return self.fire_locked(due, raw.to_vec()).await;
        }
        // Taken by the loop (done by now, under the lock), or a firing a failed pass left.
        let firing_key = meta::key(meta::TIMER_FIRING, &[&timer.namespace, &timer.id]);
        if let Some(raw) = self.inner.meta.get(&firing_key).await? {
            let firing: Firing = from_json("firing timer", &raw)?;
            self.finish_firing(firing_key, firing).await?;
        }
        Ok(())
    }

    /// Fires stream-append timers together: into firing in one transaction, appended one
    /// after the other (each exactly once, as [`Self::finish_firing`] does), their firing
    /// entries removed in one transaction. When one of them changed meanwhile (cancelled,
    /// fired by a staged commit), each is fired on its own instead.
    async fn fire_appends(&self, due: Vec<(Vec<u8>, Vec<u8>, v1::Timer)>) -> CoreResult<()> {
        if due.len() <= 1 {
            for (key, raw, _) in due {
                self.fire(key, raw).await?;
            }
            return Ok(());
        }
        // Every lock the timers fire under, in index order (fire_now takes one at a time).
        let locks = &self.inner.timer_locks;
        let mut indexes: Vec<usize> = due
            .iter()
            .map(|(_, _, t)| {
                (meta::stable_hash(format!("{}\0{}", t.namespace, t.id).as_bytes())
                    % locks.len() as u64) as usize
            })
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        let mut held = Vec::with_capacity(indexes.len());
        for i in indexes {
            held.push(locks[i].lock().await);
        }
        let mut checks = Vec::with_capacity(due.len());
        let mut ops = Vec::with_capacity(due.len() * 3);
        let mut firings = Vec::with_capacity(due.len());
        for (key, raw, timer) in &due {
            let append = append_target(timer)?;
            let stream = append.stream.clone().unwrap_or_default();
            let from_offset = self
                .end_offset(&stream, append.partition)
                .await
                .unwrap_or(None);
            let firing_key = meta::key(meta::TIMER_FIRING, &[&timer.namespace, &timer.id]);
            let firing = Firing {
                from_offset,
                timer: raw.clone(),
            };
            checks.push(Check {
                key: key.clone(),
                value: Some(raw.clone()),
            });
            ops.push(Op::Delete { key: key.clone() });
            ops.push(Op::Delete {
                key: meta::key(meta::TIMER_BY_ID, &[&timer.namespace, &timer.id]),
            });
            ops.push(Op::Put {
                key: firing_key.clone(),
                value: to_json(&firing),
            });
            firings.push((firing_key, firing));
        }
        if !self.inner.meta.txn(checks, ops).await? {
            drop(held);
            for (key, raw, _) in due {
                self.fire(key, raw).await?;
            }
            return Ok(());
        }
        metrics::gauge!("tributary_timers_pending").decrement(due.len() as f64);
        let mut done = Vec::with_capacity(firings.len());
        for (firing_key, firing) in firings {
            self.deliver_append(&firing).await?;
            done.push(Op::Delete { key: firing_key });
        }
        let fired = done.len() as u64;
        self.inner.meta.txn(Vec::new(), done).await?;
        metrics::counter!("tributary_timers_fired_total").increment(fired);
        Ok(())
    }

    async fn fire(&self, due_key: Vec<u8>, raw: Vec<u8>) -> CoreResult<()> {
        let parts = meta::parts(meta::TIMER_DUE, &due_key);
        let (ns, id) = match parts.as_slice() {
            [_, ns, id] => (ns.to_string(), id.to_string()),
            _ => (String::new(), String::new()),
        };
        let _held = self.timer_lock(&ns, &id).lock().await;
        // Fired meanwhile by a staged commit (or cancelled): nothing to do.
        if self.inner.meta.get(&due_key).await?.as_deref() != Some(&raw[..]) {
            return Ok(());
        }
        self.fire_locked(due_key, raw).await
    }

    async fn fire_locked(&self, due_key: Vec<u8>, raw: Vec<u8>) -> CoreResult<()> {
        let timer =
            v1::Timer::decode(&raw[..]).map_err(|e| CoreError::Corrupt(format!("timer: {e}")))?;
        if matches!(
            &timer.action,
            Some(
                v1::timer::Action::Route(_)
                    | v1::timer::Action::SessionExpiry(_)
                    | v1::timer::Action::Ack(_)
            )
        ) {
            return self.fire_route(due_key, raw.clone(), &timer).await;
        }
        let from_offset = match &timer.action {
            Some(v1::timer::Action::Enqueue(e)) => {
                self.queue_data_end(&e.queue.clone().unwrap_or_default())
            }
            _ => {
                let append = append_target(&timer)?;
                let stream = append.stream.clone().unwrap_or_default();
                self.end_offset(&stream, append.partition)
                    .await
                    .unwrap_or(None)
            }
        };
        let firing = Firing {
            from_offset,
            timer: raw.clone(),
        };
        let firing_key = meta::key(meta::TIMER_FIRING, &[&timer.namespace, &timer.id]);
        let applied = self
            .inner
            .meta
            .txn(
                vec![Check {
                    key: due_key.clone(),
                    value: Some(raw),
                }],
                vec![
                    Op::Delete { key: due_key },
                    Op::Delete {
                        key: meta::key(meta::TIMER_BY_ID, &[&timer.namespace, &timer.id]),
                    },
                    Op::Put {
                        key: firing_key.clone(),
                        value: to_json(&firing),
                    },
                ],
            )
            .await?;
        if !applied {
            return Ok(()); // cancelled meanwhile
        }
        metrics::gauge!("tributary_timers_pending").decrement(1.0);
        if let Some(v1::timer::Action::Enqueue(e)) = &timer.action {
            self.note_timer_delayed(&e.queue.clone().unwrap_or_default(), -1);
        }
        self.finish_firing(firing_key, firing).await
    }

    /// A delayed publish (MQTT topic or AMQP exchange) or a session expiry: done, then
    /// forgotten. At least once: a crash between the two does it again after the restart.
    async fn fire_route(
        &self,
        due_key: Vec<u8>,
        raw: Vec<u8>,
        timer: &v1::Timer,
    ) -> CoreResult<()> {
        match &timer.action {
            Some(v1::timer::Action::Route(message)) => {
                self.route(&timer.namespace, message.clone(), None, true)
                    .await;
            }
            Some(v1::timer::Action::SessionExpiry(e)) => {
                self.expire_disconnected_session(&timer.namespace, &e.client_id)
                    .await;
            }
            Some(v1::timer::Action::Ack(a)) => {
                // Settling a settled message again does nothing: a crash before the timer
                // is gone only repeats it.
                let queue = a.queue.clone().unwrap_or_default();
                match self.settle_committed(&queue, &a.lease_ids).await {
                    Ok(missed) if missed > 0 => {
                        debug!(timer = %timer.id, queue = %queue.name, missed, "committed acks of messages already gone")
                    }
                    Ok(_) => {}
                    Err(e @ (CoreError::ShuttingDown | CoreError::Storage(_))) => return Err(e),
                    Err(e) => {
                        warn!(timer = %timer.id, queue = %queue.name, error = %e, "committed acks could not be applied; dropping them");
                        metrics::counter!("tributary_timers_dropped_total").increment(1);
                    }
                }
            }
            _ => {}
        }
        let applied = self
            .inner
            .meta
            .txn(
                vec![Check {
                    key: due_key.clone(),
                    value: Some(raw),
                }],
                vec![
                    Op::Delete { key: due_key },
                    Op::Delete {
                        key: meta::key(meta::TIMER_BY_ID, &[&timer.namespace, &timer.id]),
                    },
                ],
            )
            .await?;
        if applied {
            metrics::gauge!("tributary_timers_pending").decrement(1.0);
            metrics::counter!("tributary_timers_fired_total").increment(1);
        }
        Ok(())
    }

    async fn finish_firing(&self, firing_key: Vec<u8>, firing: Firing) -> CoreResult<()> {
        let timer = v1::Timer::decode(&firing.timer[..])
            .map_err(|e| CoreError::Corrupt(format!("timer: {e}")))?;
        if let Some(v1::timer::Action::Enqueue(e)) = &timer.action {
            let queue = e.queue.clone().unwrap_or_default();
            let done = match firing.from_offset {
                Some(from) => {
                    self.queue_timer_batch_exists(&queue, from, &timer.id)
                        .await?
                }
                None => false,
            };
            if !done {
                match self.enqueue_from_timer(e, &timer.id).await {
                    Ok(()) => debug!(timer = %timer.id, queue = %queue.name, "timer fired"),
                    Err(e @ (CoreError::ShuttingDown | CoreError::Storage(_))) => return Err(e),
                    Err(e) => {
                        warn!(timer = %timer.id, queue = %queue.name, error = %e, "timer could not enqueue; dropping it");
                        metrics::counter!("tributary_timers_dropped_total").increment(1);
                    }
                }
            }
            self.inner.meta.delete(&firing_key).await?;
            metrics::counter!("tributary_timers_fired_total").increment(1);
            return Ok(());
        }
        self.deliver_append(&firing).await?;
        self.inner.meta.delete(&firing_key).await?;
        metrics::counter!("tributary_timers_fired_total").increment(1);
        Ok(())
    }

    /// A firing stream-append timer's batch appended, unless a crash left it appended
    /// already (found stamped with the timer's id past the offset the firing recorded).
    async fn deliver_append(&self, firing: &Firing) -> CoreResult<()> {
        let timer = v1::Timer::decode(&firing.timer[..])
            .map_err(|e| CoreError::Corrupt(format!("timer: {e}")))?;
        let mut append = append_target(&timer)?.clone();
        let stream = append.stream.clone().unwrap_or_default();
        let done = self
            .timer_batch_exists(
                &stream,
                append.partition,
                firing.from_offset.unwrap_or(0),
                &timer.id,
            )
            .await?;
        if !done {
            if let Some(batch) = append.batch.as_mut() {
                batch.timer_id = timer.id.clone();
            }
            match self.append(append).await {
                Ok(r) => debug!(timer = %timer.id, offset = r.base_offset, "timer fired"),
                Err(e @ (CoreError::ShuttingDown | CoreError::Storage(_))) => return Err(e),
                Err(e) => {
                    // The target is gone or refuses the batch: nothing to deliver to.
                    warn!(timer = %timer.id, stream = %stream, error = %e, "timer could not deliver; dropping it");
                    metrics::counter!("tributary_timers_dropped_total").increment(1);
                }
            }
        }
        Ok(())
    }
}
