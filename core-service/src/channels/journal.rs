//! The journal of a durable queue: one log partition per queue holding, in order, the
//! persistent messages that entered it and the sequence numbers of those that left. A
//! restart replays it; the prefix whose messages have all left is truncated.
//!
//! One writer task per queue takes the entries in the order the queue produced them (under
//! the broker lock), packs whatever is waiting into one log batch, and reports durability
//! to the publishers waiting for a confirm. Many publishers therefore share one append and
//! one fsync, which is where the confirm throughput comes from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use prost::Message;
use tokio::sync::mpsc;
use tracing::warn;
use tributary_proto::v1::{self, queue_journal_entry::Entry};
use tributary_storage::{BatchToAppend, LogStore, PartitionKey};

use super::EventTx;

/// Entries packed into one log batch at most.
const MAX_BATCH_ENTRIES: usize = 8192;
const MAX_BATCH_BYTES: usize = 8 << 20;
const READ_CHUNK: usize = 8 << 20;
const TRUNCATE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// The queue was deleted: drop its partition and stop.
    Drop,
}

/// The queue's side of its journal.
pub(crate) struct Journal {
    tx: mpsc::UnboundedSender<Op>,
    /// The smallest sequence number still in the queue (ready or unacked), or the next one.
    min_live: Arc<AtomicU64>,
}

impl Journal {
    pub fn message(&self, m: v1::JournaledMessage, completion: Option<&Arc<Completion>>) {
        if let Some(c) = completion {
            c.hold();
        }
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
            entry: Some(Entry::Removed(v1::RemovedMessages { seqs })),
        };
        let _ = self.tx.send(Op::Entry(entry, None));
    }

    pub fn set_min_live(&self, seq: u64) {
        self.min_live.store(seq, Ordering::Release);
    }

    pub fn drop_queue(&self) {
        let _ = self.tx.send(Op::Drop);
    }
}

/// What a replay found: the messages still in the queue, by sequence number.
pub(crate) struct Replayed {
    pub messages: BTreeMap<u64, v1::JournaledMessage>,
    pub next_seq: u64,
    batches: VecDeque<(i64, u64)>,
}

impl Replayed {
    pub fn empty() -> Self {
        Self {
            messages: BTreeMap::new(),
            next_seq: 1,
            batches: VecDeque::new(),
        }
    }
}

pub(crate) async fn replay(log: &Arc<dyn LogStore>, key: PartitionKey) -> Result<Replayed, String> {
    let mut out = Replayed {
        messages: BTreeMap::new(),
        next_seq: 1,
        batches: VecDeque::new(),
    };
    let bounds = log.bounds(key).await.map_err(|e| e.to_string())?;
    let mut from = bounds.start_offset;
    let mut max_seq = 0u64;
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
                match e.entry {
                    Some(Entry::Message(m)) => {
                        max_seq = max_seq.max(m.seq);
                        out.messages.insert(m.seq, m);
                    }
                    Some(Entry::Removed(r)) => {
                        for s in r.seqs {
                            out.messages.remove(&s);
                        }
                    }
                    None => {}
                }
            }
            out.batches.push_back((b.base_offset, max_seq));
        }
    }
    out.next_seq = max_seq + 1;
    Ok(out)
}

/// Starts the writer of a queue's journal.
pub(crate) fn start(
    log: Arc<dyn LogStore>,
    log_id: u64,
    replayed: Option<&mut Replayed>,
    next_seq: u64,
) -> Journal {
    let (tx, rx) = mpsc::unbounded_channel();
    let min_live = Arc::new(AtomicU64::new(next_seq));
    let batches = replayed
        .map(|r| std::mem::take(&mut r.batches))
        .unwrap_or_default();
    let max_seq = batches.back().map_or(0, |b| b.1);
    tokio::spawn(write(
        log,
        PartitionKey::new(log_id, 0),
        rx,
        min_live.clone(),
        batches,
        max_seq,
    ));
    Journal { tx, min_live }
}

async fn write(
    log: Arc<dyn LogStore>,
    key: PartitionKey,
    mut rx: mpsc::UnboundedReceiver<Op>,
    min_live: Arc<AtomicU64>,
    mut batches: VecDeque<(i64, u64)>,
    mut max_seq: u64,
) {
    let mut last_truncation = std::time::Instant::now();
    while let Some(first) = rx.recv().await {
        let mut entries = Vec::new();
        let mut completions = Vec::new();
        let mut bytes = 0usize;
        let mut drop_queue = false;
        let mut next = Some(first);
        while let Some(op) = next.take() {
            match op {
                Op::Entry(e, c) => {
                    if let Some(Entry::Message(m)) = &e.entry {
                        max_seq = max_seq.max(m.seq);
                        bytes += m.body.len() + m.properties.len() + 64;
                    }
                    entries.push(e);
                    completions.extend(c);
                }
                Op::Drop => {
                    drop_queue = true;
                    break;
                }
            }
            if entries.len() < MAX_BATCH_ENTRIES && bytes < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if drop_queue {
            for c in completions {
                c.done(false);
            }
            if let Err(e) = log.delete_partition(key).await {
                warn!(partition = %key, error = %e, "could not delete a deleted queue's journal");
            }
            return;
        }
        if entries.is_empty() {
            continue;
        }
        let payload = v1::QueueJournalBatch { entries }.encode_to_vec();
        let batch = BatchToAppend {
            record_count: 1,
            max_timestamp_ms: crate::now_ms(),
            payload: payload.into(),
        };
        match log.append(key, batch).await {
            Ok(offset) => {
                batches.push_back((offset, max_seq));
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
        // Everything before the first batch that still holds a live message can go; the
        // log makes a truncation durable, so it runs at most once a second.
        if last_truncation.elapsed() < TRUNCATE_EVERY {
            continue;
        }
        last_truncation = std::time::Instant::now();
        let live = min_live.load(Ordering::Acquire);
        let mut cut = None;
        while batches.len() > 1 && batches[0].1 < live {
            batches.pop_front();
            cut = batches.front().map(|b| b.0);
        }
        if let Some(before) = cut
            && let Err(e) = log.truncate_prefix(key, before).await
        {
            warn!(partition = %key, error = %e, "queue journal truncation failed");
        }
    }
}
