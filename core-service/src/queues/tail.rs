//! The batches a queue appended last, kept as they were appended, so a consumer that keeps
//! up takes its messages from memory instead of reading back (through the blocking pool)
//! and decoding what was just written. Offsets in a messages log are never reused, so an
//! entry is what the log holds at its offsets; the log stays the source of truth for
//! anything not (or no longer) here.
//!
//! Kept only while the queue has consumers, bounded per queue and for the whole engine.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tributary_proto::v1;

/// Value bytes one queue keeps at most. 1 MiB (under 1,000 messages of 1 KiB) was too
/// little: consumers a few prefetch windows behind missed it and read the log back, which
/// costs more CPU per message and put them further behind (on one core, AMQP confirms
/// 4 -> 4 had an end-to-end p99 of about 1 s). The engine-wide budget still bounds the sum.
const QUEUE_TAIL_BYTES: usize = 8 << 20;
/// Value bytes every queue together keeps at most.
const TOTAL_TAIL_BYTES: usize = 64 << 20;
/// Accounted per record on top of its value (properties, the entry itself).
const RECORD_OVERHEAD: usize = 128;

/// What one appended batch holds.
#[derive(Clone)]
pub(crate) enum TailBatch {
    Records(Arc<Vec<v1::Record>>),
    /// A reference to records in the namespace's shared body log (a fan-out).
    Shared(v1::SharedBatchRef),
}

struct Entry {
    base: i64,
    count: i64,
    value_bytes: u64,
    cost: usize,
    batch: TailBatch,
}

/// The engine-wide byte budget the tails share.
pub(crate) type TailBudget = Arc<AtomicUsize>;

pub(crate) struct Tail {
    entries: VecDeque<Entry>,
    bytes: usize,
    budget: TailBudget,
}

impl Tail {
    pub(crate) fn new(budget: TailBudget) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    /// Keeps a batch appended at `base` with `count` records and `value_bytes` of values.
    /// An entry that does not fit is not kept (the log has it).
    pub(crate) fn push(&mut self, base: i64, count: i64, value_bytes: usize, batch: TailBatch) {
        let cost = value_bytes + RECORD_OVERHEAD * count.max(1) as usize;
        if cost > QUEUE_TAIL_BYTES {
            return;
        }
        while self.bytes + cost > QUEUE_TAIL_BYTES {
            self.pop_front();
        }
        let before = self.budget.fetch_add(cost, Ordering::AcqRel);
        if before + cost > TOTAL_TAIL_BYTES {
            self.budget.fetch_sub(cost, Ordering::AcqRel);
            return;
        }
        self.bytes += cost;
        self.entries.push_back(Entry {
            base,
            count,
            value_bytes: value_bytes as u64,
            cost,
            batch,
        });
    }

    /// The kept batch holding offset `at` (with its base and value bytes), forgetting the
    /// ones before it.
    pub(crate) fn at(&mut self, at: i64) -> Option<(i64, TailBatch, u64)> {
        while self.entries.front().is_some_and(|e| e.base + e.count <= at) {
            self.pop_front();
        }
        self.entries
            .front()
            .filter(|e| e.base <= at)
            .map(|e| (e.base, e.batch.clone(), e.value_bytes))
    }

    /// Forgets everything (no consumer left, or the queue's messages were removed).
    pub(crate) fn clear(&mut self) {
        while !self.entries.is_empty() {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.cost;
            self.budget.fetch_sub(e.cost, Ordering::AcqRel);
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize) -> TailBatch {
        TailBatch::Records(Arc::new(vec![v1::Record::default(); n]))
    }

    #[test]
    fn finds_the_batch_holding_an_offset_and_forgets_older_ones() {
        let budget = TailBudget::default();
        let mut t = Tail::new(budget.clone());
        t.push(10, 2, 100, records(2));
        t.push(12, 3, 100, records(3));
        assert_eq!(t.at(9).map(|(b, _, _)| b), None);
        assert_eq!(t.at(11).map(|(b, _, _)| b), Some(10));
        assert_eq!(t.at(14).map(|(b, _, _)| b), Some(12));
        assert_eq!(t.entries.len(), 1);
        assert_eq!(t.at(15).map(|(b, _, _)| b), None);
        assert_eq!(budget.load(Ordering::Acquire), 0);
    }

    #[test]
    fn stays_within_its_bounds() {
        let budget = TailBudget::default();
        let mut t = Tail::new(budget.clone());
        for i in 0..100 {
            t.push(i, 1, 64 << 10, records(1));
        }
        assert!(t.bytes <= QUEUE_TAIL_BYTES);
        assert_eq!(budget.load(Ordering::Acquire), t.bytes);
        // The oldest went first; the newest are there.
        assert_eq!(t.at(99).map(|(b, _, _)| b), Some(99));
        t.push(200, 1, QUEUE_TAIL_BYTES * 2, records(1));
        assert_eq!(t.at(200).map(|(b, _, _)| b), None);
        // The engine-wide budget: other queues' tails took all of it.
        budget.fetch_add(TOTAL_TAIL_BYTES, Ordering::AcqRel);
        let mut other = Tail::new(budget.clone());
        other.push(0, 1, 10, records(1));
        assert_eq!(other.at(0).map(|(b, _, _)| b), None);
        budget.fetch_sub(TOTAL_TAIL_BYTES, Ordering::AcqRel);
        drop((t, other));
        assert_eq!(budget.load(Ordering::Acquire), 0);
    }
}
