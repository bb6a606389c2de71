//! Delivery accounting shared by every protocol's bench: what was sent (acknowledged), what
//! arrived, once or more, in order or not, and how long it took.
//!
//! Each delivery stream (an MQTT subscriber, a Kafka group, an AMQP queue) owns a [`Sink`] that
//! remembers, per producer, which sequence numbers it has seen; the shared [`Tally`] only holds
//! counters, so consumers do not contend on one lock per message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::{TallyTotals, histogram, now_ns, read_stamp};

/// Counters for one run.
pub struct Tally {
    producers: usize,
    sent: AtomicU64,
    expected: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    /// Deliveries of messages sent after the warm-up (the measured ones).
    measured: AtomicU64,
    /// Wall clock (ns since epoch) when measuring starts; 0 = from the beginning.
    measure_from_ns: AtomicU64,
    /// Last measured delivery, as ns since epoch.
    last_delivery_ns: AtomicU64,
    /// First and last delivery of any message (ns since epoch; first starts at u64::MAX).
    first_any_ns: AtomicU64,
    last_any_ns: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    acks: Mutex<Histogram<u64>>,
}

impl Tally {
    pub fn new(producers: usize) -> Self {
        Self {
            producers,
            sent: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            measure_from_ns: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            first_any_ns: AtomicU64::new(u64::MAX),
            last_any_ns: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
            acks: Mutex::new(histogram()),
        }
    }

    /// Messages sent from now on are the measured ones (call when the warm-up ends).
    pub fn start_measuring(&self) {
        self.measure_from_ns.store(now_ns(), Ordering::Release);
    }

    pub fn measure_from_ns(&self) -> u64 {
        self.measure_from_ns.load(Ordering::Acquire)
    }

    /// One message accepted by the broker (acknowledged, or written where nothing acknowledges),
    /// which `copies` consumers must each receive.
    pub fn sent(&self, copies: u64) {
        self.sent.fetch_add(1, Ordering::AcqRel);
        self.expected.fetch_add(copies, Ordering::AcqRel);
    }

    /// Time from send to acknowledgement of one message.
    pub fn ack_latency(&self, since: Instant) {
        let us = (since.elapsed().as_micros() as u64).max(1);
        let _ = self.acks.lock().record(us);
    }

    pub fn sent_count(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    pub fn expected_count(&self) -> u64 {
        self.expected.load(Ordering::Acquire)
    }

    pub fn received_count(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// Every expected delivery arrived.
    pub fn complete(&self) -> bool {
        self.received_count() >= self.expected_count()
    }

    /// A new delivery stream.
    pub fn sink(&self) -> Sink {
        Sink {
            seen: (0..self.producers).map(|_| Seen::default()).collect(),
            latency: histogram(),
        }
    }

    /// Folds a finished sink's latencies into the run's histogram.
    pub fn absorb(&self, sink: &Sink) {
        let _ = self.latency.lock().add(&sink.latency);
    }

    pub fn totals(&self) -> TallyTotals {
        TallyTotals {
            sent: self.sent.load(Ordering::Acquire),
            expected: self.expected.load(Ordering::Acquire),
            received: self.received.load(Ordering::Acquire),
            duplicates: self.duplicates.load(Ordering::Acquire),
            out_of_order: self.out_of_order.load(Ordering::Acquire),
        }
    }

    /// Deliveries of measured messages, and the seconds from the start of measuring to the last
    /// of them.
    pub fn measured(&self) -> (u64, f64) {
        let from = self.measure_from_ns();
        let last = self.last_delivery_ns.load(Ordering::Acquire);
        (
            self.measured.load(Ordering::Acquire),
            last.saturating_sub(from) as f64 / 1e9,
        )
    }

    /// Seconds from the first delivery to the last, of any message (0 before two arrived).
    pub fn delivery_span(&self) -> f64 {
        let first = self.first_any_ns.load(Ordering::Acquire);
        let last = self.last_any_ns.load(Ordering::Acquire);
        last.saturating_sub(first) as f64 / 1e9
    }

    pub fn latency(&self) -> Histogram<u64> {
        self.latency.lock().clone()
    }

    pub fn acks(&self) -> Histogram<u64> {
        self.acks.lock().clone()
    }
}

/// Which sequence numbers of one producer a sink has seen.
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    /// Highest sequence seen + 1.
    high: u64,
}

impl Seen {
    /// Marks `seq`; returns false when it was already there.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        fresh
    }
}

/// One delivery stream's view: every copy a consumer (or a queue's consumers) receives.
pub struct Sink {
    seen: Vec<Seen>,
    latency: Histogram<u64>,
}

/// What one delivery was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// First copy, in order.
    New,
    /// First copy, but a later sequence of the same producer arrived before it.
    Late,
    /// Seen before.
    Duplicate,
    /// Not a bench message (no stamp, unknown producer).
    Foreign,
}

impl Sink {
    /// Accounts one received payload.
    pub fn record(&mut self, tally: &Tally, payload: &[u8]) -> Delivery {
        let Some((producer, seq, sent_ns)) = read_stamp(payload) else {
            return Delivery::Foreign;
        };
        let Some(seen) = self.seen.get_mut(producer as usize) else {
            return Delivery::Foreign;
        };
        if !seen.insert(seq) {
            tally.duplicates.fetch_add(1, Ordering::AcqRel);
            return Delivery::Duplicate;
        }
        let kind = if seq + 1 < seen.high {
            tally.out_of_order.fetch_add(1, Ordering::AcqRel);
            Delivery::Late
        } else {
            seen.high = seq + 1;
            Delivery::New
        };
        tally.received.fetch_add(1, Ordering::AcqRel);
        let now = now_ns();
        tally.first_any_ns.fetch_min(now, Ordering::AcqRel);
        tally.last_any_ns.fetch_max(now, Ordering::AcqRel);
        if sent_ns >= tally.measure_from_ns() {
            let _ = self
                .latency
                .record((now.saturating_sub(sent_ns) / 1000).max(1));
            tally.measured.fetch_add(1, Ordering::AcqRel);
            tally.last_delivery_ns.fetch_max(now, Ordering::AcqRel);
        }
        kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp;

    fn msg(p: u32, seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; 24];
        stamp(&mut b, p, seq, now_ns());
        b
    }

    #[test]
    fn counts_new_late_duplicate_and_foreign() {
        let t = Tally::new(2);
        let mut s = t.sink();
        for _ in 0..3 {
            t.sent(1);
        }
        assert_eq!(s.record(&t, &msg(0, 0)), Delivery::New);
        assert_eq!(s.record(&t, &msg(0, 2)), Delivery::New);
        assert_eq!(s.record(&t, &msg(0, 1)), Delivery::Late);
        assert_eq!(s.record(&t, &msg(0, 1)), Delivery::Duplicate);
        assert_eq!(s.record(&t, &msg(5, 0)), Delivery::Foreign);
        assert_eq!(s.record(&t, b"short"), Delivery::Foreign);
        let totals = t.totals();
        assert_eq!(
            (totals.received, totals.duplicates, totals.out_of_order),
            (3, 1, 1)
        );
        assert!(t.complete());
        assert!(totals.check(std::time::Duration::ZERO, false).is_ok());
        assert!(totals.check(std::time::Duration::ZERO, true).is_err());
    }

    #[test]
    fn missing_copies_are_loss() {
        let t = Tally::new(1);
        t.sent(3); // fan-out to three consumers
        let mut a = t.sink();
        a.record(&t, &msg(0, 0));
        assert!(!t.complete());
        let err = t.totals().check(std::time::Duration::from_secs(1), true);
        assert!(matches!(err, Err(crate::BenchError::Lost { lost: 2, .. })));
    }
}
