//! Moving messages through a queue: enqueue, receive (lease), ack, nack, change-lease, and
//! dead letters.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use prost::Message;
use tracing::{debug, warn};
use tributary_proto::v1;
use tributary_storage::BatchToAppend;

use super::settings::{MAX_DEDUP_ID, MAX_VISIBILITY_MS, Overflow};
use super::shared::Body;
use super::state::{DeadLetter, Leased, is_transient};
use super::tail::TailBatch;
use super::{ByteTally, Guarded, QueueHandle, decode_batch};
use crate::error::{CoreError, CoreResult};
use crate::{Core, now_ms};

/// Ready messages kept loaded when the log has them: deliveries come from memory.
const WINDOW: usize = 1024;
/// Live messages (ready, leased, delayed) loaded at most per queue; beyond it receives
/// wait until some settle.
const MAX_LOADED: usize = 262_144;
/// Live messages loaded at most while looking past FIFO groups that are busy.
const FIFO_LOOKAHEAD: usize = 16_384;
/// Bytes read from the log per window refill.
const FILL_CHUNK: usize = 1 << 20;
const MAX_RECEIVE: u32 = 1000;
const MAX_WAIT_MS: i32 = 60_000;
const MAX_ENQUEUE: usize = 10_000;

/// An enqueue appended and not yet durable (see [`Core::enqueue_append`]).
pub(crate) struct PendingEnqueue {
    h: Arc<QueueHandle>,
    records: Vec<v1::Record>,
    mode: EnqueueMode,
    resp: v1::EnqueueResponse,
    now_idx: Vec<usize>,
    later: Vec<(usize, i64)>,
    inserted: Vec<String>,
    /// Base offset and count of the appended batch.
    appended: Option<(i64, i64)>,
    /// The journal's end once the dedup ids of delayed records are in it.
    dedup_end: Option<i64>,
    /// Overflow reject-publish-dlx refused the records: these dead letters go, then the
    /// enqueue fails with QUEUE_FULL.
    refused: Option<Vec<DeadLetter>>,
}

/// How an enqueue treats its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EnqueueMode {
    /// From a client: dedup window, delays and overflow apply.
    Client,
    /// Moved by the core (dead letters, redrive, a timer that fired): already checked.
    Internal,
}

/// `<queue id>-<offset>-<lease seq>`, all hex: names one lease of one message of one
/// incarnation of a queue, from any connection or gateway.
pub(crate) fn lease_id(queue: u64, offset: i64, seq: u64) -> String {
    format!("{queue:x}-{offset:x}-{seq:x}")
}

fn parse_lease_id(id: &str) -> CoreResult<(u64, i64, u64)> {
    let bad = || CoreError::InvalidArgument(format!("'{}' is not a lease id", id.escape_debug()));
    let mut parts = id.split('-');
    let (Some(q), Some(o), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let q = u64::from_str_radix(q, 16).map_err(|_| bad())?;
    let o = i64::from_str_radix(o, 16).map_err(|_| bad())?;
    let s = u64::from_str_radix(s, 16).map_err(|_| bad())?;
    Ok((q, o, s))
}

fn check_ms(what: &str, v: i64, max: i64) -> CoreResult<()> {
    if !(0..=max).contains(&v) {
        return Err(CoreError::InvalidArgument(format!(
            "{what} must be 0..={max} ms, got {v}"
        )));
    }
    Ok(())
}

impl Core {
    pub async fn enqueue(&self, req: v1::EnqueueRequest) -> CoreResult<v1::EnqueueResponse> {
        self.check_running()?;
        let id = req
            .queue
            .ok_or_else(|| CoreError::InvalidArgument("queue is required".into()))?;
        let h = self.queue(&id)?;
        self.enqueue_records(&h, req.records, EnqueueMode::Client, None)
            .await
    }

    /// Enqueues a batch of records into `h`. Records due later go to the timer service
    /// (client mode); the rest are appended as one batch and answered once durable.
    pub(crate) async fn enqueue_records(
        &self,
        h: &Arc<QueueHandle>,
        records: Vec<v1::Record>,
        mode: EnqueueMode,
        timer_id: Option<&str>,
    ) -> CoreResult<v1::EnqueueResponse> {
        let pending = self
            .enqueue_append(h, records, mode, timer_id, None)
            .await?;
        self.enqueue_finish(pending).await
    }

    /// The first half of an enqueue: checks (dedup, overflow) and the append of what goes
    /// now, without waiting for it to be durable. With `shared`, the records are already
    /// in the namespace's shared body log and the queue gets a reference to them (when all
    /// of them go now; otherwise the ones that do are copied).
    pub(crate) async fn enqueue_append(
        &self,
        h: &Arc<QueueHandle>,
        mut records: Vec<v1::Record>,
        mode: EnqueueMode,
        timer_id: Option<&str>,
        shared: Option<&v1::SharedBatchRef>,
    ) -> CoreResult<PendingEnqueue> {
        h.check_live()?;
        if records.is_empty() || records.len() > MAX_ENQUEUE {
            return Err(CoreError::InvalidArgument(format!(
                "an enqueue takes 1..={MAX_ENQUEUE} records, got {}",
                records.len()
            )));
        }
        let settings = h.settings();
        let now = now_ms();
        let window = settings.dedup_window_ms();
        let delay = settings.delivery_delay_ms.unwrap_or(0);
        let mut resp = v1::EnqueueResponse {
            message_ids: vec![-1; records.len()],
            duplicate: vec![false; records.len()],
        };
        for r in &mut records {
            if r.timestamp_ms <= 0 {
                r.timestamp_ms = now;
            }
            if let Some(p) = &r.properties
                && (p.dedup_id.len() > MAX_DEDUP_ID || p.dedup_id.chars().any(char::is_control))
            {
                return Err(CoreError::InvalidArgument(format!(
                    "a dedup id is 1..={MAX_DEDUP_ID} printable characters"
                )));
            }
        }
        // Which records go now, which wait for a timer, which are duplicates.
        let mut now_idx = Vec::new();
        let mut later = Vec::new();
        let mut inserted = Vec::new();
        let mut g = h.guarded.lock().await;
        for (i, r) in records.iter().enumerate() {
            if mode == EnqueueMode::Client && window > 0 {
                let dedup = r.properties.as_ref().map_or("", |p| p.dedup_id.as_str());
                if !dedup.is_empty() {
                    if !g.dedup.insert(now, dedup, r.timestamp_ms + window) {
                        resp.duplicate[i] = true;
                        continue;
                    }
                    inserted.push(dedup.to_string());
                }
            }
            let deliver_at = r.properties.as_ref().map_or(0, |p| p.deliver_at_ms);
            let due = deliver_at.max(if delay > 0 { now + delay } else { 0 });
            if mode == EnqueueMode::Client && due > now {
                later.push((i, due));
            } else {
                now_idx.push(i);
            }
        }
        let new_bytes: u64 = now_idx.iter().map(|i| records[*i].value.len() as u64).sum();
        if mode == EnqueueMode::Client
            && matches!(
                settings.overflow,
                Some(Overflow::RejectPublish | Overflow::RejectPublishDlx)
            )
        {
            // Refused when the ready messages with these would be over a limit (RabbitMQ's
            // check); all of the request or none.
            let over_count = settings.max_length.is_some_and(|max| {
                let ready = g.st.ready_loaded() as i64 + (h.durable_end() - g.st.cursor()).max(0);
                ready + now_idx.len() as i64 > max
            });
            let over_bytes = match (settings.max_length_bytes, &g.bytes) {
                (Some(max), Some(b)) => {
                    g.st.ready_bytes() + b.unloaded() + new_bytes > max.max(0) as u64
                }
                _ => false,
            };
            if over_count || over_bytes {
                for d in &inserted {
                    g.dedup.forget(d);
                }
                if settings.overflow != Some(Overflow::RejectPublishDlx) {
                    return Err(CoreError::QueueFull(h.record.name.clone()));
                }
                drop(g);
                // Dead-lettered by the second half, out of every lock the caller may hold
                // (a fan-out holds its namespace's order lock, which a dead-letter route to
                // several queues takes again).
                let refused = records
                    .iter()
                    .zip(&resp.duplicate)
                    .filter(|(_, dup)| !**dup)
                    .map(|(r, _)| DeadLetter {
                        offset: -1,
                        reason: "max-length",
                        delivery_count: 0,
                        record: Arc::new(r.clone()),
                    })
                    .collect();
                return Ok(PendingEnqueue {
                    h: h.clone(),
                    records,
                    mode,
                    resp,
                    now_idx: Vec::new(),
                    later: Vec::new(),
                    inserted: Vec::new(),
                    appended: None,
                    dedup_end: None,
                    refused: Some(refused),
                });
            }
        }
        let mut appended = None;
        if !now_idx.is_empty() {
            let n = now_idx.len() as i64;
            let (value_bytes_before, value_bytes) = match &mut g.bytes {
                Some(b) => {
                    b.durable_at(h.durable_end());
                    (Some(b.appended()), new_bytes)
                }
                None => (None, 0),
            };
            let mut batch = match shared {
                Some(r) if now_idx.len() == records.len() => v1::QueueMessageBatch {
                    shared: Some(*r),
                    value_bytes_before,
                    value_bytes,
                    ..Default::default()
                },
                _ => v1::QueueMessageBatch {
                    records: now_idx.iter().map(|i| records[*i].clone()).collect(),
                    timer_id: timer_id.unwrap_or_default().to_string(),
                    shared: None,
                    value_bytes_before,
                    value_bytes,
                },
            };
            let payload = Bytes::from(batch.encode_to_vec());
            // Kept for the consumers as appended (see [`super::tail`]).
            let for_tail = (h.consumers.load(Ordering::Acquire) > 0).then(|| match batch.shared {
                Some(r) => TailBatch::Shared(r),
                None => TailBatch::Records(Arc::new(std::mem::take(&mut batch.records))),
            });
            // Appended under the queue's lock: a fan-out holds its namespace's order lock
            // around these appends, so references in every queue follow the body log.
            let base = self
                .inner
                .log
                .append(
                    h.data,
                    BatchToAppend {
                        record_count: n as u32,
                        max_timestamp_ms: now,
                        payload,
                    },
                )
                .await;
            match base {
                Ok(base) => {
                    appended = Some((base, n));
                    if let Some(t) = for_tail {
                        g.tail.push(base, n, new_bytes as usize, t);
                    }
                    if let Some(b) = &mut g.bytes {
                        b.append(base + n, new_bytes);
                    }
                }
                Err(e) => {
                    for d in &inserted {
                        g.dedup.forget(d);
                    }
                    return Err(e.into());
                }
            }
        }
        // Dedup ids of records that wait for a timer are not in the messages log until
        // then: the journal keeps them, so a restart still knows them.
        let mut dedup_ops = Vec::new();
        if window > 0 {
            for (i, _) in &later {
                let r = &records[*i];
                if let Some(p) = r.properties.as_ref().filter(|p| !p.dedup_id.is_empty()) {
                    dedup_ops.push(v1::queue_state_op::Op::Dedup(v1::QueueDedupEntry {
                        dedup_id: p.dedup_id.clone(),
                        expires_at_ms: r.timestamp_ms + window,
                        offset: -1,
                    }));
                }
            }
        }
        let dedup_end = self.write_ops(h, &mut g, dedup_ops).await?;
        drop(g);
        Ok(PendingEnqueue {
            h: h.clone(),
            records,
            mode,
            resp,
            now_idx,
            later,
            inserted,
            appended,
            dedup_end,
            refused: None,
        })
    }

    /// The second half of an enqueue: waits until the batch is durable, then hands delayed
    /// records to the timer service and applies drop-head overflow.
    pub(crate) async fn enqueue_finish(
        &self,
        p: PendingEnqueue,
    ) -> CoreResult<v1::EnqueueResponse> {
        let PendingEnqueue {
            h,
            records,
            mode,
            mut resp,
            now_idx,
            later,
            inserted,
            appended,
            dedup_end,
            refused,
        } = p;
        if let Some(refused) = refused {
            self.move_dead_letters(&h, refused).await?;
            return Err(CoreError::QueueFull(h.record.name.clone()));
        }
        self.journal_durable(&h, dedup_end).await?;
        if let Some((base, n)) = appended {
            if let Err(e) = self.inner.log.wait_durable(h.data, base + n).await {
                let mut g = h.guarded.lock().await;
                for d in &inserted {
                    g.dedup.forget(d);
                }
                return Err(e.into());
            }
            for (k, i) in now_idx.iter().enumerate() {
                resp.message_ids[*i] = base + k as i64;
            }
            metrics::counter!("tributary_queue_enqueued_total").increment(n as u64);
            h.ready.notify_waiters();
            // The owner watches the head's expiry.
            h.wake.notify_one();
        }
        for (i, due) in later {
            let mut r = records[i].clone();
            if let Some(p) = r.properties.as_mut() {
                p.deliver_at_ms = 0;
            }
            let timer = v1::Timer {
                id: String::new(),
                due_at_ms: due,
                namespace: h.record.namespace.clone(),
                action: Some(v1::timer::Action::Enqueue(v1::EnqueueRequest {
                    queue: Some(v1::QueueId {
                        namespace: h.record.namespace.clone(),
                        name: h.record.name.clone(),
                    }),
                    records: vec![r],
                })),
            };
            self.schedule_timer(timer).await?;
            self.note_timer_delayed(
                &v1::QueueId {
                    namespace: h.record.namespace.clone(),
                    name: h.record.name.clone(),
                },
                1,
            );
        }
        let settings = h.settings();
        if mode == EnqueueMode::Client
            && settings.overflow == Some(Overflow::DropHead)
            && (settings.max_length.is_some() || settings.max_length_bytes.is_some())
        {
            self.drop_head(&h).await?;
        }
        Ok(resp)
    }

    /// Overflow drop-head: the oldest ready messages beyond `max_length`, then beyond
    /// `max_length_bytes`, become dead letters. As in RabbitMQ, a message larger than the
    /// byte limit went in and goes out with everything before it.
    async fn drop_head(&self, h: &Arc<QueueHandle>) -> CoreResult<()> {
        let settings = h.settings();
        let dead = {
            let mut g = h.guarded.lock().await;
            let mut dead = Vec::new();
            if let Some(max) = settings.max_length {
                let ready = g.st.ready_loaded() as i64 + (h.durable_end() - g.st.cursor()).max(0);
                let excess = (ready - max).max(0) as usize;
                if excess > 0 {
                    self.fill_window(h, &mut g, excess).await?;
                    dead = g.st.drop_head(excess);
                }
            }
            if let Some(max) = settings.max_length_bytes {
                let max = max.max(0) as u64;
                loop {
                    let unloaded = g.bytes.as_ref().map_or(0, ByteTally::unloaded);
                    if g.st.ready_bytes() + unloaded <= max {
                        break;
                    }
                    // Loaded messages are older than those not loaded yet.
                    if g.st.ready_loaded() == 0 {
                        self.fill_window(h, &mut g, WINDOW).await?;
                    }
                    match g.st.drop_oldest() {
                        Some(d) => dead.push(d),
                        None => break,
                    }
                }
            }
            dead
        };
        self.move_dead_letters(h, dead).await
    }

    /// Loads messages from the log until `want` are ready in memory (or the log is done).
    pub(super) async fn fill_window(
        &self,
        h: &QueueHandle,
        g: &mut Guarded,
        want: usize,
    ) -> CoreResult<()> {
        self.fill_window_to(h, g, want, h.durable_end()).await
    }

    /// [`Core::fill_window`], reading no further than `end`. Transient messages from before
    /// the queue opened (a restart) are passed over and settled, not loaded: their
    /// settlement is journalled here (not awaited: a crash before it is durable leaves them
    /// to be dropped again at the next open).
    pub(super) async fn fill_window_to(
        &self,
        h: &QueueHandle,
        g: &mut Guarded,
        want: usize,
        end: i64,
    ) -> CoreResult<()> {
        let mut ops = Vec::new();
        let filled = self.fill_window_ops(h, g, want, end, &mut ops).await;
        if !ops.is_empty() {
            let passed: usize = ops
                .iter()
                .map(|op| match op {
                    v1::queue_state_op::Op::Settle(s) => s.offsets.len(),
                    _ => 0,
                })
                .sum();
            debug!(queue = %h.label(), count = passed, "transient messages from before the restart dropped");
            metrics::counter!("tributary_queue_transient_dropped_total").increment(passed as u64);
            self.write_ops(h, g, ops).await?;
        }
        filled
    }

    async fn fill_window_ops(
        &self,
        h: &QueueHandle,
        g: &mut Guarded,
        want: usize,
        end: i64,
        ops: &mut Vec<v1::queue_state_op::Op>,
    ) -> CoreResult<()> {
        while g.st.ready_loaded() < want && g.st.cursor() < end && g.st.loaded() < MAX_LOADED {
            // What was just appended is taken as it was appended; the rest from the log.
            let batches: Vec<(i64, TailBatch, u64)> = match g.tail.at(g.st.cursor()) {
                Some(kept) => vec![kept],
                None => {
                    let read = self
                        .inner
                        .log
                        .read(h.data, g.st.cursor(), FILL_CHUNK)
                        .await?;
                    let mut decoded = Vec::with_capacity(read.len());
                    for b in read {
                        let batch = decode_batch(&b.payload)?;
                        let kind = match batch.shared {
                            Some(r) => TailBatch::Shared(r),
                            None => TailBatch::Records(Arc::new(batch.records)),
                        };
                        decoded.push((b.base_offset, kind, batch.value_bytes));
                    }
                    decoded
                }
            };
            if batches.is_empty() {
                break;
            }
            for (base_offset, kind, value_bytes) in batches {
                let records = match kind {
                    TailBatch::Records(records) => records,
                    TailBatch::Shared(r) => {
                        let before_open = base_offset < h.data_end_at_open;
                        match self
                            .read_shared(&h.record.namespace, &r, before_open)
                            .await?
                        {
                            Body::Ready(records) => records,
                            // Its publish is still finishing; it wakes the readers.
                            Body::Pending => return Ok(()),
                            Body::Lost => {
                                warn!(queue = %h.label(), offset = base_offset, count = r.count, "skipping messages whose shared body was lost in a crash before their publish was acknowledged");
                                if base_offset >= g.st.cursor()
                                    && let Some(t) = &mut g.bytes
                                {
                                    t.advance(value_bytes);
                                }
                                g.st.skip_to(base_offset + i64::from(r.count));
                                continue;
                            }
                        }
                    }
                };
                for (i, r) in records.iter().enumerate() {
                    let o = base_offset + i as i64;
                    if o < g.st.cursor() {
                        continue;
                    }
                    if o >= end || g.st.ready_loaded() >= want {
                        break;
                    }
                    if let Some(t) = &mut g.bytes {
                        t.advance(r.value.len() as u64);
                    }
                    if o < h.data_end_at_open && is_transient(r) {
                        g.st.pass(o, ops);
                    } else {
                        g.st.load(o, Arc::new(r.clone()));
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn receive(&self, req: v1::ReceiveRequest) -> CoreResult<Vec<v1::LeasedMessage>> {
        self.check_running()?;
        let id = req
            .queue
            .ok_or_else(|| CoreError::InvalidArgument("queue is required".into()))?;
        let h = self.queue(&id)?;
        let max = req.max_messages.clamp(1, MAX_RECEIVE) as usize;
        let vis = if req.visibility_timeout_ms == 0 {
            h.settings().visibility_ms()
        } else {
            req.visibility_timeout_ms
        };
        check_ms("visibility_timeout_ms", vis, MAX_VISIBILITY_MS)?;
        if !(0..=MAX_WAIT_MS).contains(&req.wait_time_ms) {
            return Err(CoreError::InvalidArgument(format!(
                "wait_time_ms must be 0..={MAX_WAIT_MS}, got {}",
                req.wait_time_ms
            )));
        }
        if h.exclusive.load(Ordering::Acquire) {
            return Err(CoreError::Conflict(format!(
                "queue '{}' has an exclusive consumer",
                h.record.name
            )));
        }
        h.touch();
        let _consumer = Self::consumer_guard(&h);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_time_ms as u64);
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let notified = h.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            h.check_live()?;
            let (leased, dead) = self.lease_some(&h, max, vis, !req.no_wait_durable).await?;
            let had_dead = !dead.is_empty();
            self.move_dead_letters(&h, dead).await?;
            if !leased.is_empty() {
                h.wake.notify_one();
                return Ok(leased
                    .into_iter()
                    .map(|l| to_leased_message(h.record.id, l))
                    .collect());
            }
            if had_dead {
                continue;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                _ = shutdown.changed() => return Err(CoreError::ShuttingDown),
            }
        }
    }

    /// One attempt at leasing up to `max` messages, durable before it returns.
    pub(super) async fn lease_some(
        &self,
        h: &QueueHandle,
        max: usize,
        vis: i64,
        durable: bool,
    ) -> CoreResult<(Vec<Leased>, Vec<DeadLetter>)> {
        let (leased, dead, end) = {
            let mut g = h.guarded.lock().await;
            let now = now_ms();
            let mut ops = Vec::new();
            self.fill_window(h, &mut g, max.max(WINDOW)).await?;
            let (mut leased, mut dead) = g.st.lease(now, max, vis, &mut ops);
            // FIFO groups may hold back every loaded message: look further into the log,
            // up to a bound (a backlog of one busy group stays on disk), and only while the
            // log gives more (a shared body not yet durable gives nothing for now).
            while leased.len() < max
                && g.st.cursor() < h.durable_end()
                && g.st.loaded() < FIFO_LOOKAHEAD
            {
                let before = (g.st.cursor(), g.st.loaded());
                let want = g.st.ready_loaded() + WINDOW;
                self.fill_window(h, &mut g, want).await?;
                if (g.st.cursor(), g.st.loaded()) == before {
                    break;
                }
                let (more, more_dead) = g.st.lease(now, max - leased.len(), vis, &mut ops);
                leased.extend(more);
                dead.extend(more_dead);
            }
            let end = self.write_ops(h, &mut g, ops).await?;
            (leased, dead, end)
        };
        // A lease held for a subscription's life does not outlive a restart anyway: its
        // journal entry (which only tells a restart the message was delivered) need not be
        // on disk before the message goes out. A lease with a deadline must be.
        if durable && vis <= MAX_VISIBILITY_MS {
            self.journal_durable(h, end).await?;
        }
        Ok((leased, dead))
    }

    /// Lease ids of this queue, parsed; ids of another queue (or an older incarnation of
    /// this one) are `None`.
    fn parse_leases(h: &QueueHandle, ids: &[String]) -> CoreResult<Vec<Option<(i64, u64)>>> {
        ids.iter()
            .map(|id| {
                let (q, o, s) = parse_lease_id(id)?;
                Ok((q == h.record.id).then_some((o, s)))
            })
            .collect()
    }

    /// Settles leased messages. Returns the lease ids that no longer held their message
    /// (expired, replaced or already settled): those messages were not acknowledged.
    pub async fn ack(&self, queue: &v1::QueueId, lease_ids: &[String]) -> CoreResult<Vec<String>> {
        self.settle_leases(queue, lease_ids, true).await
    }

    /// [`Core::ack`]; `durable`: answers once the acks are on disk. An auto-ack
    /// subscription does not wait: a crash before then delivers the message again, never
    /// loses it.
    pub async fn settle_leases(
        &self,
        queue: &v1::QueueId,
        lease_ids: &[String],
        durable: bool,
    ) -> CoreResult<Vec<String>> {
        let h = self.queue(queue)?;
        let parsed = Self::parse_leases(&h, lease_ids)?;
        let mut expired = Vec::new();
        let end = {
            let mut g = h.guarded.lock().await;
            let now = now_ms();
            let mut ops = Vec::new();
            for (id, p) in lease_ids.iter().zip(parsed) {
                let ok = p.is_some_and(|(o, s)| g.st.ack(now, o, s, &mut ops).is_ok());
                if !ok {
                    expired.push(id.clone());
                }
            }
            self.write_ops(&h, &mut g, ops).await?
        };
        if durable {
            self.journal_durable(&h, end).await?;
        }
        Ok(expired)
    }

    /// Lease ids well formed and of this incarnation of the queue (a staged ack). A queue
    /// that does not exist (deleted while its deliveries were out) has nothing to settle:
    /// its acks are accepted and settle nothing, as RabbitMQ takes an ack of a delivery of
    /// a deleted queue.
    pub(crate) fn check_lease_ids(
        &self,
        queue: &v1::QueueId,
        lease_ids: &[String],
    ) -> CoreResult<()> {
        let h = match self.queue(queue) {
            Ok(h) => h,
            Err(CoreError::QueueNotFound(_)) => {
                for id in lease_ids {
                    parse_lease_id(id)?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for (id, p) in lease_ids.iter().zip(Self::parse_leases(&h, lease_ids)?) {
            if p.is_none() {
                return Err(CoreError::InvalidArgument(format!(
                    "lease '{id}' is not of queue '{}' (or of an older queue of that name)",
                    queue.name
                )));
            }
        }
        Ok(())
    }

    /// The acks of a committed staged transaction: settles the messages the lease ids name,
    /// whichever lease holds them now, durably. Returns how many were not there to settle.
    /// A queue gone (or declared anew since) has nothing to settle.
    pub(crate) async fn settle_committed(
        &self,
        queue: &v1::QueueId,
        lease_ids: &[String],
    ) -> CoreResult<usize> {
        let h = match self.queue(queue) {
            Ok(h) => h,
            Err(CoreError::QueueNotFound(_)) => return Ok(lease_ids.len()),
            Err(e) => return Err(e),
        };
        let parsed = Self::parse_leases(&h, lease_ids)?;
        let mut missed = 0;
        let end = {
            let mut g = h.guarded.lock().await;
            let now = now_ms();
            let mut ops = Vec::new();
            for p in parsed {
                if !p.is_some_and(|(o, _)| g.st.settle_offset(now, o, &mut ops)) {
                    missed += 1;
                }
            }
            self.write_ops(&h, &mut g, ops).await?
        };
        self.journal_durable(&h, end).await?;
        Ok(missed)
    }

    /// Gives leased messages back (ready again after `delay_ms`) or, without requeue,
    /// dead-letters them (reason "rejected"). Stale lease ids are skipped.
    pub async fn nack(
        &self,
        queue: &v1::QueueId,
        lease_ids: &[String],
        requeue: bool,
        delay_ms: i64,
    ) -> CoreResult<()> {
        check_ms("delay_ms", delay_ms, MAX_VISIBILITY_MS)?;
        let h = self.queue(queue)?;
        let parsed = Self::parse_leases(&h, lease_ids)?;
        let mut dead = Vec::new();
        let end = {
            let mut g = h.guarded.lock().await;
            let now = now_ms();
            let mut ops = Vec::new();
            for (o, s) in parsed.into_iter().flatten() {
                if let Ok(Some(d)) = g.st.nack(now, o, s, requeue, delay_ms, &mut ops) {
                    dead.push(d);
                }
            }
            self.write_ops(&h, &mut g, ops).await?
        };
        self.journal_durable(&h, end).await?;
        h.ready.notify_waiters();
        h.wake.notify_one();
        self.move_dead_letters(&h, dead).await
    }

    /// Extends (or, with 0, ends) leases. All or nothing: if any lease id is stale, none
    /// changes and the call fails with LEASE_EXPIRED.
    pub async fn change_lease(
        &self,
        queue: &v1::QueueId,
        lease_ids: &[String],
        visibility_ms: i64,
    ) -> CoreResult<()> {
        check_ms("visibility_timeout_ms", visibility_ms, MAX_VISIBILITY_MS)?;
        let h = self.queue(queue)?;
        let parsed = Self::parse_leases(&h, lease_ids)?;
        let end = {
            let mut g = h.guarded.lock().await;
            let now = now_ms();
            g.st.tick(now);
            for (id, p) in lease_ids.iter().zip(&parsed) {
                if !p.is_some_and(|(o, s)| g.st.holds(now, o, s)) {
                    return Err(CoreError::LeaseExpired(id.clone()));
                }
            }
            let mut ops = Vec::new();
            // A lease named twice changes once (a release would make its second change
            // stale, after the first had already changed the state).
            let mut seen = std::collections::HashSet::new();
            for (o, s) in parsed.into_iter().flatten().filter(|l| seen.insert(*l)) {
                g.st.change_lease(now, o, s, visibility_ms, &mut ops)
                    .map_err(|_| CoreError::Internal("a checked lease went stale".into()))?;
            }
            self.write_ops(&h, &mut g, ops).await?
        };
        self.journal_durable(&h, end).await?;
        h.wake.notify_one();
        if visibility_ms == 0 {
            h.ready.notify_waiters();
        }
        Ok(())
    }

    /// Sends dead letters to the queue's dead-letter queue (or drops them, counted, when it
    /// has none), then settles them here. The target gets them first: a crash in between
    /// leaves a copy in both, never in neither.
    ///
    /// Boxed: moving enqueues, and an enqueue may dead-letter (drop-head).
    pub(crate) fn move_dead_letters<'a>(
        &'a self,
        h: &'a Arc<QueueHandle>,
        dead: Vec<DeadLetter>,
    ) -> BoxFuture<'a, CoreResult<()>> {
        Box::pin(self.move_dead_letters_now(h, dead))
    }

    async fn move_dead_letters_now(
        &self,
        h: &Arc<QueueHandle>,
        dead: Vec<DeadLetter>,
    ) -> CoreResult<()> {
        if dead.is_empty() {
            return Ok(());
        }
        let settings = h.settings();
        if settings.dead_letter_expired == Some(false) && dead.iter().any(|d| d.reason == "expired")
        {
            let (expired, dead): (Vec<_>, Vec<_>) =
                dead.into_iter().partition(|d| d.reason == "expired");
            debug!(queue = %h.label(), count = expired.len(), "expired messages discarded (the queue dead-letters no expired message)");
            metrics::counter!("tributary_queue_discarded_total").increment(expired.len() as u64);
            self.settle_dead_letters(h, &expired, true).await?;
            return self.move_dead_letters(h, dead).await;
        }
        let now = now_ms();
        for d in &dead {
            metrics::counter!("tributary_queue_dead_lettered_total", "reason" => d.reason)
                .increment(1);
        }
        let records: Vec<v1::Record> = dead
            .iter()
            .map(|d| {
                let mut r = (*d.record).clone();
                let p = r.properties.get_or_insert_default();
                p.dead_letter_reason = d.reason.to_string();
                p.dead_letter_queue = h.record.name.clone();
                p.dead_lettered_at_ms = now;
                p.dead_letter_delivery_count = d.delivery_count;
                p.dead_letter_original_address = p.publish_address.clone();
                p.dead_letter_original_key = p.address.clone();
                note_dead_letter(p, &h.record.name, d.reason, now);
                // A message does not carry its old expiry into the dead letters.
                p.expires_at_ms = 0;
                r
            })
            .collect();
        let moved = if let Some(q) = &settings.dead_letter_queue {
            let target = v1::QueueId {
                namespace: h.record.namespace.clone(),
                name: q.clone(),
            };
            match self.queue(&target) {
                Ok(dlq) => self
                    .enqueue_records(&dlq, records, EnqueueMode::Internal, None)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            }
        } else if let Some(address) = &settings.dead_letter_address {
            self.route_dead_letters(
                &h.record.namespace,
                address,
                settings.dead_letter_routing_key.as_deref(),
                records,
            )
            .await
        } else {
            debug!(queue = %h.label(), count = dead.len(), "dead letters discarded (the queue has no dead-letter target)");
            metrics::counter!("tributary_queue_discarded_total").increment(dead.len() as u64);
            Ok(())
        };
        let settle = match moved {
            Ok(()) => true,
            Err(e @ (CoreError::QueueNotFound(_) | CoreError::AddressNotFound(_))) => {
                warn!(queue = %h.label(), error = %e, count = dead.len(), "the dead-letter target does not exist; messages dropped");
                metrics::counter!("tributary_queue_discarded_total").increment(dead.len() as u64);
                true
            }
            Err(e) => {
                warn!(queue = %h.label(), error = %e, "dead letters could not be moved; they stay in the queue (records refused by reject-publish-dlx are lost)");
                false
            }
        };
        self.settle_dead_letters(h, &dead, settle).await
    }

    /// Dead letters out of the queue (`settle`) or back in it.
    async fn settle_dead_letters(
        &self,
        h: &Arc<QueueHandle>,
        dead: &[DeadLetter],
        settle: bool,
    ) -> CoreResult<()> {
        let end = {
            let mut g = h.guarded.lock().await;
            let mut ops = Vec::new();
            for d in dead {
                if settle {
                    g.st.settle_moved(d.offset, &mut ops);
                } else {
                    g.st.unmove(d.offset);
                }
            }
            self.write_ops(h, &mut g, ops).await?
        };
        self.journal_durable(h, end).await?;
        if !settle {
            h.ready.notify_waiters();
        }
        Ok(())
    }

    /// A delayed enqueue whose timer fired: appended with the timer's id, so that a crash
    /// before the timer is gone does not enqueue it twice (see the timer service).
    pub(crate) async fn enqueue_from_timer(
        &self,
        req: &v1::EnqueueRequest,
        timer_id: &str,
    ) -> CoreResult<()> {
        let id = req.queue.clone().unwrap_or_default();
        let h = self.queue(&id)?;
        self.enqueue_records(
            &h,
            req.records.clone(),
            EnqueueMode::Internal,
            Some(timer_id),
        )
        .await?;
        // Overflow drop-head still holds the queue to its limits: what the timer released
        // pushes the oldest out (a trim after the write, so the write stays exactly once).
        let settings = h.settings();
        if settings.overflow == Some(Overflow::DropHead)
            && (settings.max_length.is_some() || settings.max_length_bytes.is_some())
        {
            self.drop_head(&h).await?;
        }
        Ok(())
    }

    /// The end of a queue's messages log (where a timer's batch will land).
    pub(crate) fn queue_data_end(&self, id: &v1::QueueId) -> Option<i64> {
        self.queue(id).ok().map(|h| h.durable_end())
    }

    /// Whether a batch stamped with this timer id is in the queue's log from `from` on.
    pub(crate) async fn queue_timer_batch_exists(
        &self,
        id: &v1::QueueId,
        from: i64,
        timer_id: &str,
    ) -> CoreResult<bool> {
        let Ok(h) = self.queue(id) else {
            return Ok(false);
        };
        let mut at = from.max(self.inner.log.bounds(h.data).await?.start_offset);
        let end = h.durable_end();
        while at < end {
            let batches = self.inner.log.read(h.data, at, FILL_CHUNK).await?;
            let Some(last) = batches.last() else { break };
            at = last.next_offset();
            for b in batches {
                if decode_batch(&b.payload)?.timer_id == timer_id {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Counts a consumer of the queue while the guard lives.
    pub(crate) fn consumer_guard(h: &Arc<QueueHandle>) -> ConsumerGuard {
        h.consumers.fetch_add(1, Ordering::AcqRel);
        ConsumerGuard(h.clone())
    }
}

pub(crate) struct ConsumerGuard(Arc<QueueHandle>);

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        self.0.consumers.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
        self.0.wake.notify_one();
    }
}

/// Counts a dead-lettering in the record's history: the entry for (queue, reason) goes up
/// by one, or is added, and moves to the front (most recent first, as AMQP's x-death is
/// ordered). A new entry keeps where the record had been published until then.
pub(crate) fn note_dead_letter(p: &mut v1::SystemProperties, queue: &str, reason: &str, now: i64) {
    let history = &mut p.dead_letter_history;
    let mut entry = match history
        .iter()
        .position(|e| e.queue == queue && e.reason == reason)
    {
        Some(i) => history.remove(i),
        None => v1::DeadLetterCount {
            queue: queue.to_string(),
            reason: reason.to_string(),
            count: 0,
            first_at_ms: now,
            last_at_ms: now,
            original_address: p.publish_address.clone(),
            original_key: p.address.clone(),
        },
    };
    entry.count += 1;
    entry.last_at_ms = now;
    p.dead_letter_history.insert(0, entry);
}

pub(super) fn to_leased_message(queue: u64, l: Leased) -> v1::LeasedMessage {
    v1::LeasedMessage {
        lease_id: lease_id(queue, l.offset, l.seq),
        message_id: l.offset,
        record: Some((*l.record).clone()),
        delivery_count: l.delivery_count,
        lease_expires_at_ms: l.deadline,
        redelivered: l.delivery_count > 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_history_counts_per_queue_and_reason_most_recent_first() {
        let mut p = v1::SystemProperties {
            publish_address: "in".into(),
            address: "job".into(),
            ..Default::default()
        };
        note_dead_letter(&mut p, "work", "rejected", 10);
        p.publish_address = "dlx".into();
        note_dead_letter(&mut p, "parking", "expired", 20);
        note_dead_letter(&mut p, "work", "rejected", 30);
        let h: Vec<_> = p
            .dead_letter_history
            .iter()
            .map(|e| {
                (
                    e.queue.as_str(),
                    e.reason.as_str(),
                    e.count,
                    e.first_at_ms,
                    e.last_at_ms,
                    e.original_address.as_str(),
                    e.original_key.as_str(),
                )
            })
            .collect();
        assert_eq!(
            h,
            vec![
                ("work", "rejected", 2, 10, 30, "in", "job"),
                ("parking", "expired", 1, 20, 20, "dlx", "job"),
            ]
        );
    }
}
