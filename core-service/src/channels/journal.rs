//! The journal of durable queues: one log partition per core holding, in order, the
//! persistent messages that entered a durable queue and the sequence numbers of those that
//! left, each tagged with its queue. A restart replays it.
//!
//! One writer task takes the entries in the order the queues produced them (under the broker
//! lock), packs whatever is waiting into one log batch and reports durability to the
//! publishers waiting for a confirm. Every queue shares the batch and its fsync: with a
//! partition per queue, four busy queues cost four fsyncs per round of confirms.
//!
//! The writer knows where every live message was last written. The prefix before the oldest
//! one is truncated; when an old message pins a long prefix (a slow queue behind a busy
//! one), the writer copies the still-live messages of the oldest batches forward, so the
//! prefix can go. This is the compaction of RabbitMQ's message store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::mpsc;
use tracing::{info, warn};
use tributary_proto::v1::{self, queue_journal_entry::Entry};
use tributary_storage::{BatchToAppend, LogStore, PartitionKey};

use super::EventTx;

/// Entries packed into one log batch at most.
const MAX_BATCH_ENTRIES: usize = 8192;
const MAX_BATCH_BYTES: usize = 8 << 20;
const READ_CHUNK: usize = 8 << 20;
/// Truncation is made durable by the log, so it runs at most this often.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);
/// Bytes of old batches read per compaction round.
const COMPACT_READ: usize = 4 << 20;

/// Something waiting until every journal entry it covers is durable: a publisher confirm
/// or a transaction's commit-ok. It holds one count for its creator until [`Self::done`] is
/// called once by it, and one per journal entry.
pub(crate) struct Completion {
    remaining: AtomicUsize,
    failed: AtomicBool,
    tx: EventTx,
    event: v1::ChannelEvent,
}

impl Completion {
    pub fn new(tx: EventTx, event: v1::ChannelEvent) -> Arc<Self> {
        Arc::new(Self {
            remaining: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            tx,
            event,
        })
    }

    pub fn hold(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks one count done; the last one sends the event (a confirm turns into a nack if
    /// any entry failed).
    pub fn done(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut event = self.event.clone();
            if self.failed.load(Ordering::Acquire) {
                match &mut event.event {
                    Some(v1::channel_event::Event::Confirm(c)) => c.ack = false,
                    _ => {
                        event.event =
                            Some(v1::channel_event::Event::ChannelError(v1::ChannelError {
                                code: 541,
                                text: "INTERNAL_ERROR - the queue journal could not be written"
                                    .into(),
                                class_id: 90,
                                method_id: 20,
                            }))
                    }
                }
            }
            let _ = self.tx.send(event);
        }
    }
}

enum Op {
    Entry(v1::QueueJournalEntry, Option<Arc<Completion>>),
    /// A queue was deleted: its messages stop pinning the journal.
    Drop(u64),
    /// The core is shutting down: write what is queued, then stop.
    Close,
}

/// The writer's input, shared by every durable queue.
#[derive(Clone)]
pub(crate) struct SharedJournal {
    tx: mpsc::UnboundedSender<Op>,
    writer: Arc<parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl SharedJournal {
    /// Stops the writer once what is queued is written, and waits for it.
    pub async fn close(&self) {
        let _ = self.tx.send(Op::Close);
        let handle = self.writer.lock().take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }

    pub fn for_queue(&self, queue: u64) -> Journal {
        Journal {
            tx: self.tx.clone(),
            queue,
        }
    }
}

/// One durable queue's side of the journal.
pub(crate) struct Journal {
    tx: mpsc::UnboundedSender<Op>,
    queue: u64,
}

impl Journal {
    pub fn message(&self, mut m: v1::JournaledMessage, completion: Option<&Arc<Completion>>) {
        if let Some(c) = completion {
            c.hold();
        }
        m.queue = self.queue;
        let entry = v1::QueueJournalEntry {
            entry: Some(Entry::Message(m)),
        };
        if let Err(mpsc::error::SendError(Op::Entry(_, Some(c)))) =
            self.tx.send(Op::Entry(entry, completion.cloned()))
        {
            c.done(false);
        }
    }

    pub fn removed(&self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        let entry = v1::QueueJournalEntry {
            entry: Some(Entry::Removed(v1::RemovedMessages {
                seqs,
                queue: self.queue,
            })),
        };
        let _ = self.tx.send(Op::Entry(entry, None));
    }

    pub fn drop_queue(&self) {
        let _ = self.tx.send(Op::Drop(self.queue));
    }
}

/// Where each live message was last written, by (queue, seq).
#[derive(Default)]
struct Live {
    at: HashMap<(u64, u64), i64>,
    /// Live messages per batch offset.
    per_batch: BTreeMap<i64, u32>,
}

impl Live {
    fn insert(&mut self, key: (u64, u64), offset: i64) {
        if let Some(old) = self.at.insert(key, offset) {
            self.unref(old);
        }
        *self.per_batch.entry(offset).or_default() += 1;
    }
    fn remove(&mut self, key: (u64, u64)) {
        if let Some(old) = self.at.remove(&key) {
            self.unref(old);
        }
    }
    fn unref(&mut self, offset: i64) {
        if let Some(n) = self.per_batch.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                self.per_batch.remove(&offset);
            }
        }
    }
    fn drop_queue(&mut self, queue: u64) {
        let keys: Vec<_> = self.at.keys().filter(|k| k.0 == queue).copied().collect();
        for k in keys {
            self.remove(k);
        }
    }
    fn apply(&mut self, e: &v1::QueueJournalEntry, offset: i64) {
        match &e.entry {
            Some(Entry::Message(m)) => self.insert((m.queue, m.seq), offset),
            Some(Entry::Removed(r)) => {
                for s in &r.seqs {
                    self.remove((r.queue, *s));
                }
            }
            None => {}
        }
    }
}

/// What a replay found: the messages still in each known queue, by sequence number.
pub(crate) struct Replayed {
    pub queues: HashMap<u64, BTreeMap<u64, v1::JournaledMessage>>,
    live: Live,
    end: i64,
}

impl Replayed {
    /// A journal with nothing in it (just made).
    pub fn empty() -> Self {
        Self {
            queues: HashMap::new(),
            live: Live::default(),
            end: 0,
        }
    }
}

/// Reads the whole journal. Entries of queues not in `known` (deleted ones) are skipped.
pub(crate) async fn replay(
    log: &Arc<dyn LogStore>,
    key: PartitionKey,
    known: &HashSet<u64>,
) -> Result<Replayed, String> {
    let mut out = Replayed {
        queues: HashMap::new(),
        live: Live::default(),
        end: 0,
    };
    let bounds = log.bounds(key).await.map_err(|e| e.to_string())?;
    let mut from = bounds.start_offset;
    out.end = bounds.end_offset;
    while from < bounds.end_offset {
        let batches = log
            .read(key, from, READ_CHUNK)
            .await
            .map_err(|e| e.to_string())?;
        if batches.is_empty() {
            break;
        }
        for b in batches {
            from = b.base_offset + b.record_count.max(1) as i64;
            let batch = v1::QueueJournalBatch::decode(b.payload)
                .map_err(|e| format!("journal batch at offset {}: {e}", b.base_offset))?;
            for e in batch.entries {
                let queue = match &e.entry {
                    Some(Entry::Message(m)) => m.queue,
                    Some(Entry::Removed(r)) => r.queue,
                    None => continue,
                };
                if !known.contains(&queue) {
                    continue;
                }
                out.live.apply(&e, b.base_offset);
                match e.entry {
                    Some(Entry::Message(m)) => {
                        out.queues.entry(queue).or_default().insert(m.seq, m);
                    }
                    Some(Entry::Removed(r)) => {
                        if let Some(q) = out.queues.get_mut(&queue) {
                            for s in r.seqs {
                                q.remove(&s);
                            }
                        }
                    }
                    None => {}
                }
            }
        }
    }
    Ok(out)
}

/// Starts the writer; `replayed` is what the replay of this partition found.
/// `compact_after`: a live message that many batches behind the end is copied forward.
pub(crate) fn start(
    log: Arc<dyn LogStore>,
    key: PartitionKey,
    replayed: &mut Replayed,
    compact_after: i64,
) -> SharedJournal {
    let (tx, rx) = mpsc::unbounded_channel();
    let live = std::mem::take(&mut replayed.live);
    let writer = tokio::spawn(write(log, key, rx, live, replayed.end, compact_after));
    SharedJournal {
        tx,
        writer: Arc::new(parking_lot::Mutex::new(Some(writer))),
    }
}

async fn write(
    log: Arc<dyn LogStore>,
    key: PartitionKey,
    mut rx: mpsc::UnboundedReceiver<Op>,
    mut live: Live,
    mut end: i64,
    compact_after: i64,
) {
    let mut last_maintenance = Instant::now();
    let mut truncated = 0i64;
    while let Some(first) = rx.recv().await {
        let mut entries = Vec::new();
        let mut completions = Vec::new();
        let mut bytes = 0usize;
        let mut closing = false;
        let mut next = Some(first);
        while let Some(op) = next.take() {
            match op {
                Op::Entry(e, c) => {
                    if let Some(Entry::Message(m)) = &e.entry {
                        bytes += m.body.len() + m.properties.len() + 64;
                    }
                    entries.push(e);
                    completions.extend(c);
                }
                Op::Drop(queue) => live.drop_queue(queue),
                Op::Close => {
                    closing = true;
                    break;
                }
            }
            if entries.len() < MAX_BATCH_ENTRIES && bytes < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !entries.is_empty() {
            let batch = v1::QueueJournalBatch { entries };
            match append(&log, key, &batch).await {
                Ok(offset) => {
                    end = offset + 1;
                    for e in &batch.entries {
                        live.apply(e, offset);
                    }
                    if !completions.is_empty() {
                        // Waiting here would serialise appends behind each fsync; the next
                        // batch is appended while this one syncs (the log groups the fsyncs).
                        let log = log.clone();
                        tokio::spawn(async move {
                            let ok = log.wait_durable(key, offset + 1).await.is_ok();
                            for c in completions {
                                c.done(ok);
                            }
                        });
                    }
                }
                Err(e) => {
                    warn!(partition = %key, error = %e, "queue journal append failed");
                    for c in completions {
                        c.done(false);
                    }
                }
            }
        }
        if closing {
            return;
        }
        if last_maintenance.elapsed() >= MAINTAIN_EVERY {
            last_maintenance = Instant::now();
            compact(&log, key, &mut live, end, compact_after).await;
            // Everything before the oldest batch with a live message can go.
            let keep_from = live.per_batch.keys().next().copied().unwrap_or(end);
            if keep_from > truncated {
                match log.truncate_prefix(key, keep_from).await {
                    Ok(_) => truncated = keep_from,
                    Err(e) => {
                        warn!(partition = %key, error = %e, "queue journal truncation failed")
                    }
                }
            }
        }
    }
}

async fn append(
    log: &Arc<dyn LogStore>,
    key: PartitionKey,
    batch: &v1::QueueJournalBatch,
) -> Result<i64, tributary_storage::StorageError> {
    log.append(
        key,
        BatchToAppend {
            record_count: 1,
            max_timestamp_ms: crate::now_ms(),
            payload: batch.encode_to_vec().into(),
        },
    )
    .await
}

/// Copies the live messages of the oldest batches forward when they pin a long prefix.
async fn compact(
    log: &Arc<dyn LogStore>,
    key: PartitionKey,
    live: &mut Live,
    end: i64,
    compact_after: i64,
) {
    let Some(&oldest) = live.per_batch.keys().next() else {
        return;
    };
    if end - oldest < compact_after {
        return;
    }
    let batches = match log.read(key, oldest, COMPACT_READ).await {
        Ok(b) => b,
        Err(e) => {
            warn!(partition = %key, error = %e, "queue journal compaction could not read");
            return;
        }
    };
    let mut moved = Vec::new();
    for b in batches {
        let Ok(batch) = v1::QueueJournalBatch::decode(b.payload) else {
            continue;
        };
        for e in batch.entries {
            if let Some(Entry::Message(m)) = &e.entry
                && live.at.get(&(m.queue, m.seq)) == Some(&b.base_offset)
            {
                moved.push(e);
            }
        }
    }
    if moved.is_empty() {
        return;
    }
    let n = moved.len();
    let batch = v1::QueueJournalBatch { entries: moved };
    match append(log, key, &batch).await {
        Ok(offset) => {
            // The copies must be on disk before the originals can be truncated.
            if let Err(e) = log.wait_durable(key, offset + 1).await {
                warn!(partition = %key, error = %e, "queue journal compaction could not sync");
                return;
            }
            for e in &batch.entries {
                live.apply(e, offset);
            }
            info!(partition = %key, messages = n, "queue journal: copied old live messages forward");
        }
        Err(e) => warn!(partition = %key, error = %e, "queue journal compaction append failed"),
    }
}
