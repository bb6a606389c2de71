//! Load generators behind `tributary bench <protocol>`. Each speaks its protocol through the
//! client library its users run (librdkafka for Kafka), so the same run can be pointed at
//! Tributary or at any other broker and the numbers compare.
//!
//! Every message carries (producer, sequence, send time); consumers check that each one
//! arrives exactly once and in order per producer, and measure end-to-end latency. A run that
//! loses messages reports the loss and fails: it never reports throughput for lost messages.

pub mod kafka;

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Options common to every protocol's bench.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// HOST:PORT of the broker.
    pub target: String,
    pub producers: usize,
    pub consumers: usize,
    /// Message size in bytes (at least the 20-byte stamp).
    pub size: usize,
    pub duration: Duration,
    /// Total messages per second over all producers; `None` = as fast as possible.
    pub rate: Option<u64>,
    /// Kafka acks: "all", "1" or "0".
    pub acks: String,
    pub partitions: i32,
    /// Kafka compression codec: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// Traffic before measuring starts (warms caches, JITs nothing, settles groups).
    pub warmup: Duration,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("no broker answered at {target} within {secs} s ({detail})")]
    Unreachable {
        target: String,
        secs: u64,
        detail: String,
    },
    #[error("the broker refused: {0}")]
    Refused(String),
    #[error("{lost} of {sent} messages were never received (waited {secs} s after the last send)")]
    Lost { sent: u64, lost: u64, secs: u64 },
    #[error("{0} messages arrived more than once or out of order")]
    Disorder(u64),
    #[error("invalid option: {0}")]
    Invalid(String),
}

/// What a run measured. Field names are fixed: scripts read the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub protocol: String,
    pub target: String,
    pub sent: u64,
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub size: usize,
    pub seconds: f64,
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
    /// End-to-end latency (send to receive), milliseconds.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Send to acknowledgement, milliseconds.
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
}

impl Report {
    pub fn table(&self) -> String {
        format!(
            "{} bench against {}\n\
             sent        {:>12}\n\
             received    {:>12}  (duplicates {}, out of order {})\n\
             throughput  {:>12.0} msg/s  {:>8.1} MB/s  ({} B messages, {:.1} s)\n\
             end-to-end  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms\n\
             ack         p50 {:.2} ms  p99 {:.2} ms",
            self.protocol,
            self.target,
            self.sent,
            self.received,
            self.duplicates,
            self.out_of_order,
            self.msgs_per_sec,
            self.mb_per_sec,
            self.size,
            self.seconds,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.ack_p50_ms,
            self.ack_p99_ms
        )
    }
}

/// Microsecond histogram up to an hour, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The stamp at the start of every message: producer, sequence, send time (ns since epoch).
pub(crate) const STAMP: usize = 20;

pub(crate) fn stamp(buf: &mut [u8], producer: u32, seq: u64, sent_ns: u64) {
    buf[0..4].copy_from_slice(&producer.to_be_bytes());
    buf[4..12].copy_from_slice(&seq.to_be_bytes());
    buf[12..20].copy_from_slice(&sent_ns.to_be_bytes());
}

pub(crate) fn read_stamp(buf: &[u8]) -> Option<(u32, u64, u64)> {
    if buf.len() < STAMP {
        return None;
    }
    Some((
        u32::from_be_bytes(buf[0..4].try_into().ok()?),
        u64::from_be_bytes(buf[4..12].try_into().ok()?),
        u64::from_be_bytes(buf[12..20].try_into().ok()?),
    ))
}

pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let mut b = vec![0u8; 32];
        stamp(&mut b, 7, 99, 123_456);
        assert_eq!(read_stamp(&b), Some((7, 99, 123_456)));
        assert_eq!(read_stamp(&b[..10]), None);
    }
}
