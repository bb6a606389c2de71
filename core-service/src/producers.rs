//! Idempotent producer state per partition: for each producer id, its epoch and the last five
//! batches it wrote (sequence range and offsets), so a retried batch gets its original offset
//! back instead of being written twice.
//!
//! The state is rebuilt after a restart from a snapshot in the metadata store plus a replay of
//! the batches appended after the snapshot (every stored batch carries its producer fields),
//! so it survives crashes without a metadata write per append.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, CoreResult};

/// How many recent batches per producer are remembered for duplicate detection (as Kafka).
pub const REMEMBERED_BATCHES: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMark {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: i64,
    pub record_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub epoch: i32,
    pub batches: VecDeque<BatchMark>,
    pub last_write_ms: i64,
}

/// The outcome of checking an idempotent batch before it is appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// New and in order: append it.
    Accept,
    /// Already written: answer with the original offsets.
    Duplicate { base_offset: i64, record_count: u32 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerTable {
    pub producers: HashMap<i64, ProducerEntry>,
}

fn next_seq(seq: i32) -> i32 {
    if seq == i32::MAX { 0 } else { seq + 1 }
}

/// Last sequence of a batch, wrapping like Kafka's sequences do.
pub fn last_seq(first_seq: i32, record_count: u32) -> i32 {
    ((i64::from(first_seq) + i64::from(record_count) - 1) % (i64::from(i32::MAX) + 1)) as i32
}

impl ProducerTable {
    pub fn check(
        &self,
        pid: i64,
        epoch: i32,
        first_seq: i32,
        count: u32,
    ) -> CoreResult<SequenceCheck> {
        if first_seq < 0 {
            return Err(CoreError::InvalidArgument(format!(
                "base_sequence {first_seq} is negative"
            )));
        }
        let last = last_seq(first_seq, count);
        let Some(entry) = self.producers.get(&pid) else {
            return if first_seq == 0 {
                Ok(SequenceCheck::Accept)
            } else {
                Err(CoreError::UnknownProducer(pid))
            };
        };
        if epoch < entry.epoch {
            return Err(CoreError::ProducerFenced {
                producer_id: pid,
                got: epoch,
                current: entry.epoch,
            });
        }
        if epoch > entry.epoch {
            // A new epoch starts its sequences again from 0.
            return if first_seq == 0 {
                Ok(SequenceCheck::Accept)
            } else {
                Err(CoreError::OutOfOrderSequence {
                    producer_id: pid,
                    expected: 0,
                    got: first_seq,
                })
            };
        }
        if let Some(b) = entry
            .batches
            .iter()
            .find(|b| b.first_seq == first_seq && b.last_seq == last)
        {
            return Ok(SequenceCheck::Duplicate {
                base_offset: b.base_offset,
                record_count: b.record_count,
            });
        }
        let expected = entry.batches.back().map_or(0, |b| next_seq(b.last_seq));
        if first_seq == expected {
            Ok(SequenceCheck::Accept)
        } else {
            Err(CoreError::OutOfOrderSequence {
                producer_id: pid,
                expected,
                got: first_seq,
            })
        }
    }

    /// Records an appended batch (also used when replaying the log after a restart).
    pub fn record(
        &mut self,
        pid: i64,
        epoch: i32,
        first_seq: i32,
        count: u32,
        base_offset: i64,
        now_ms: i64,
    ) {
        let entry = self.producers.entry(pid).or_insert_with(|| ProducerEntry {
            epoch,
            batches: VecDeque::new(),
            last_write_ms: now_ms,
        });
        if epoch != entry.epoch {
            entry.epoch = epoch;
            entry.batches.clear();
        }
        entry.batches.push_back(BatchMark {
            first_seq,
            last_seq: last_seq(first_seq, count),
            base_offset,
            record_count: count,
        });
        while entry.batches.len() > REMEMBERED_BATCHES {
            entry.batches.pop_front();
        }
        entry.last_write_ms = entry.last_write_ms.max(now_ms);
    }

    /// Moves a producer to a newer epoch without a batch (a transaction marker written by a
    /// coordinator that fenced it): its older epochs are refused from here on.
    pub fn fence(&mut self, pid: i64, epoch: i32, now_ms: i64) {
        if pid <= 0 {
            return;
        }
        let entry = self.producers.entry(pid).or_insert_with(|| ProducerEntry {
            epoch,
            batches: VecDeque::new(),
            last_write_ms: now_ms,
        });
        if epoch > entry.epoch {
            entry.epoch = epoch;
            entry.batches.clear();
        }
        entry.last_write_ms = entry.last_write_ms.max(now_ms);
    }

    /// Forgets producers that have not written for `max_idle_ms` (Kafka's producer.id.expiration.ms).
    pub fn expire(&mut self, now_ms: i64, max_idle_ms: i64) {
        self.producers
            .retain(|_, e| now_ms.saturating_sub(e.last_write_ms) <= max_idle_ms);
    }
}

/// What the metadata store keeps per partition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProducerSnapshot {
    /// The table covers every batch below this offset.
    pub offset: i64,
    pub table: ProducerTable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_gaps_and_fencing() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(1, 0, 0, 3).unwrap(), SequenceCheck::Accept);
        t.record(1, 0, 0, 3, 100, 0);
        assert_eq!(t.check(1, 0, 3, 2).unwrap(), SequenceCheck::Accept);
        t.record(1, 0, 3, 2, 103, 0);
        assert_eq!(
            t.check(1, 0, 0, 3).unwrap(),
            SequenceCheck::Duplicate {
                base_offset: 100,
                record_count: 3
            }
        );
        assert!(matches!(
            t.check(1, 0, 7, 1),
            Err(CoreError::OutOfOrderSequence { expected: 5, .. })
        ));
        assert!(matches!(
            t.check(2, 0, 4, 1),
            Err(CoreError::UnknownProducer(2))
        ));
        assert_eq!(t.check(1, 1, 0, 1).unwrap(), SequenceCheck::Accept);
        t.record(1, 1, 0, 1, 105, 0);
        assert!(matches!(
            t.check(1, 0, 5, 1),
            Err(CoreError::ProducerFenced { current: 1, .. })
        ));
    }

    #[test]
    fn only_the_last_five_batches_are_remembered_and_sequences_wrap() {
        let mut t = ProducerTable::default();
        for i in 0..7 {
            t.record(9, 0, i, 1, i64::from(i), 0);
        }
        assert!(matches!(
            t.check(9, 0, 0, 1),
            Err(CoreError::OutOfOrderSequence { .. })
        ));
        assert!(matches!(
            t.check(9, 0, 2, 1),
            Ok(SequenceCheck::Duplicate { base_offset: 2, .. })
        ));
        let mut w = ProducerTable::default();
        w.record(5, 0, 0, 1, 0, 0);
        w.producers
            .get_mut(&5)
            .unwrap()
            .batches
            .back_mut()
            .unwrap()
            .last_seq = i32::MAX - 1;
        assert_eq!(w.check(5, 0, i32::MAX, 2).unwrap(), SequenceCheck::Accept);
        assert_eq!(last_seq(i32::MAX, 2), 0);
    }
}
