//! Load generators behind `tributary bench <protocol>`. Each speaks its protocol through the
//! client library its users run (librdkafka for Kafka; RocketMQ and AMQP drive their own
//! connections with the protocol's codec), so the same run can be pointed at
//! Tributary or at any other broker and the numbers compare.
//!
//! Every message carries (producer, sequence, send time); consumers check that each one
//! arrives exactly once and in order per producer, and measure end-to-end latency. A run that
//! loses messages reports the loss and fails: it never reports throughput for lost messages.

pub mod amqp;
pub mod kafka;
pub mod mqtt;
pub mod report;
pub mod rocketmq;
pub mod sqs;
mod tally;
mod traffic;

pub use tally::Tally;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Options common to every protocol's bench. Protocol-specific ones say which protocol reads them.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// HOST:PORT of the broker.
    pub target: String,
    /// Kafka producers, MQTT publishers, AMQP publishers (one connection each).
    pub producers: usize,
    /// Kafka group members, MQTT subscribers, AMQP consumers (one connection each).
    pub consumers: usize,
    /// Message size in bytes (at least the 20-byte stamp).
    pub size: usize,
    /// Measured traffic time; the run also stops early once `count` messages were sent.
    pub duration: Duration,
    /// Total messages to send over all producers (after the warm-up); `None` = until `duration`.
    pub count: Option<u64>,
    /// Total messages per second over all producers; `None` = as fast as possible.
    pub rate: Option<u64>,
    /// Traffic before measuring starts (settles groups, fills caches).
    pub warmup: Duration,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Kafka acks: "all", "1" or "0".
    pub acks: String,
    /// Kafka partitions / RocketMQ queues of the bench topic.
    pub partitions: i32,
    /// Kafka compression codec: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// Kafka: produce everything first, then measure consumers reading from the start.
    pub from_start: bool,
    /// Kafka: transactional producers committing every this often (consumers read
    /// committed); `None` = idempotent (acks=all) or plain producers.
    pub transaction_commit: Option<Duration>,
    /// MQTT QoS 0/1/2. AMQP: 0 = no confirms and automatic acks, 1 = publisher confirms and
    /// manual acks (2 is refused).
    pub qos: u8,
    /// MQTT topics / AMQP queues. Producer i publishes to topic i % topics, consumer j listens to
    /// topic j % topics: 100 producers, 100 consumers, 100 topics = 100 pairs; 1 producer,
    /// 1,000 consumers, 1 topic = fan-out to 1,000.
    pub topics: usize,
    /// Extra connections that only connect (Kafka: and negotiate ApiVersions) and stay idle.
    pub idle_connections: usize,
    /// Messages a producer keeps unacknowledged (Kafka sends, MQTT QoS 1/2 publishes, AMQP
    /// unconfirmed publishes, RocketMQ sends); `None` = the protocol's default. A deeper window raises
    /// throughput at maximum rate and, with it, the time messages spend queued.
    pub inflight: Option<usize>,
    /// AMQP prefetch (basic.qos) per consumer.
    pub prefetch: u16,
    /// AMQP: durable queues and persistent (delivery-mode 2) messages.
    pub durable: bool,
    /// AMQP fan-out: when not 0, the bench declares a fanout exchange with this many queues
    /// bound to it (in place of `topics` queues on the default exchange), every publisher
    /// publishes to the exchange, and consumer j reads queue j % fanout. Each publish makes
    /// `fanout` deliveries: `sent` counts publishes, `received` deliveries.
    pub fanout: usize,
    /// Process id of the broker on this machine: its resident memory is read from /proc before
    /// and after the connections open, its CPU time before the connections open and after the
    /// run.
    pub broker_pid: Option<u32>,
    /// SQS: messages per request, 1 to 10: 1 = SendMessage and DeleteMessage, more =
    /// SendMessageBatch and DeleteMessageBatch; also ReceiveMessage's MaxNumberOfMessages.
    pub batch: usize,
    /// SQS: a FIFO queue (its name ends in `.fifo`), order checked per message group.
    pub fifo: bool,
    /// SQS FIFO: message groups each producer spreads its messages over.
    pub groups: usize,
    /// SQS: ReceiveMessage's WaitTimeSeconds (long polling), 1 to 20.
    pub wait_seconds: u32,
    /// SQS: name of the queue the run creates and deletes (default: a fresh name per run).
    pub queue: Option<String>,
    /// MQTT: Kafka bootstrap address of the same broker. The bench topic is then a Kafka
    /// topic (created with `partitions`) that MQTT publishers publish to, and `consumers`
    /// are one Kafka consumer group reading it (the cross-protocol IoT ingestion workload;
    /// docs/compat/mapping.md).
    pub kafka_consumers: Option<String>,
    /// Kafka: producers write a delay line of the bench topic (Tributary's
    /// `tributary.delay.target.topic`), each record with header `tributary.delay-ms` = this;
    /// consumers read the bench topic, so latencies include the delay.
    pub delay_ms: Option<u64>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            target: "127.0.0.1:9092".into(),
            producers: 1,
            consumers: 1,
            size: 1024,
            duration: Duration::from_secs(10),
            count: None,
            rate: None,
            warmup: Duration::ZERO,
            progress: false,
            acks: "all".into(),
            partitions: 6,
            compression: "none".into(),
            from_start: false,
            transaction_commit: None,
            qos: 1,
            topics: 1,
            idle_connections: 0,
            inflight: None,
            prefetch: 100,
            durable: true,
            fanout: 0,
            broker_pid: None,
            batch: 1,
            fifo: false,
            groups: 4,
            wait_seconds: 20,
            queue: None,
            kafka_consumers: None,
            delay_ms: None,
        }
    }
}

impl BenchOptions {
    /// Checks shared by every protocol.
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.size < STAMP {
            return Err(BenchError::Invalid(format!(
                "--size must be at least {STAMP} bytes (the stamp)"
            )));
        }
        if self.producers == 0 || self.consumers == 0 {
            return Err(BenchError::Invalid(
                "--producers and --consumers must be at least 1".into(),
            ));
        }
        if self.topics == 0 {
            return Err(BenchError::Invalid("--topics must be at least 1".into()));
        }
        if self.inflight == Some(0) {
            return Err(BenchError::Invalid("--inflight must be at least 1".into()));
        }
        if self.rate == Some(0) {
            return Err(BenchError::Invalid("--rate must be at least 1".into()));
        }
        if self.qos > 2 {
            return Err(BenchError::Invalid(format!(
                "--qos must be 0, 1 or 2, got {}",
                self.qos
            )));
        }
        if self.transaction_commit.is_some() && self.acks != "all" {
            return Err(BenchError::Invalid(
                "--transactional needs --acks all (transactions are idempotent)".into(),
            ));
        }
        if self.transaction_commit == Some(Duration::ZERO) {
            return Err(BenchError::Invalid("--commit-ms must be at least 1".into()));
        }
        if self.producers > u32::MAX as usize {
            return Err(BenchError::Invalid("too many producers".into()));
        }
        Ok(())
    }

    /// Consumers listening to topic `t` (consumer j listens to topic j % topics).
    pub fn consumers_of_topic(&self, t: usize) -> usize {
        (0..self.consumers).filter(|j| j % self.topics == t).count()
    }

    /// Copies of producer `p`'s messages that must arrive (one per consumer of its topic; one
    /// when a Kafka consumer group reads).
    pub fn copies_for_producer(&self, p: usize) -> u64 {
        if self.kafka_consumers.is_some() {
            return 1;
        }
        self.consumers_of_topic(p % self.topics) as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("no broker answered at {target} within {secs} s ({detail})")]
    Unreachable {
        target: String,
        secs: u64,
        detail: String,
    },
    /// The broker refused, failed or dropped a connection (the message says which and where).
    #[error("broker error: {0}")]
    Refused(String),
    #[error(
        "{lost} of {expected} expected deliveries never arrived (none arrived in the last {secs} s \
         of waiting after the last send)"
    )]
    Lost { expected: u64, lost: u64, secs: u64 },
    #[error("{0} messages arrived out of order")]
    Disorder(u64),
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
}

/// What a run measured. Field names are fixed: scripts read the JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub protocol: String,
    pub target: String,
    /// Name of the broker under test (`--broker`), for comparisons.
    pub broker: String,
    /// Name of the workload (`--label`), for comparisons.
    pub label: String,
    pub producers: usize,
    pub consumers: usize,
    pub idle_connections: usize,
    /// MQTT QoS / AMQP confirms (1) or not (0); Kafka: 1 for acks=1/all, 0 for acks=0.
    pub qos: u8,
    /// Messages acknowledged by the broker (or written, where nothing acknowledges).
    pub sent: u64,
    /// Distinct deliveries (a fan-out to N consumers counts N per message).
    pub received: u64,
    /// Deliveries expected: `sent` times the consumers of each message's topic.
    pub expected: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub size: usize,
    /// Seconds from the first send to the last delivery.
    pub seconds: f64,
    /// Deliveries per second.
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
    /// Sends per second (acknowledged), over the sending time only.
    pub sent_per_sec: f64,
    /// End-to-end latency (send to receive), milliseconds.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Send to acknowledgement, milliseconds (0 when nothing acknowledges).
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    /// Broker resident memory (KiB) before the bench connected and with every connection open,
    /// when `--broker-pid` was given.
    pub rss_kib_before: Option<u64>,
    pub rss_kib_connected: Option<u64>,
    /// (connected - before) per 1,000 connections, KiB.
    pub rss_kib_per_1000_conn: Option<f64>,
    /// Broker CPU time (user + system, all its threads) from before the bench connected to the
    /// end of the run, divided by `received`: microseconds per delivered message, when
    /// `--broker-pid` was given. Covers connection set-up, warm-up and draining too; /proc
    /// counts in 10 ms ticks, so short runs are coarse.
    pub broker_cpu_us_per_msg: Option<f64>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut t = format!(
            "{} bench against {}{}\n\
             clients     {} producers, {} consumers, {} idle connections, qos {}\n\
             sent        {:>12}  ({:.0}/s)\n\
             received    {:>12}  of {} expected (duplicates {}, out of order {})\n\
             throughput  {:>12.0} msg/s  {:>8.1} MB/s  ({} B messages, {:.1} s)\n\
             end-to-end  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms\n\
             ack         p50 {:.2} ms  p99 {:.2} ms",
            self.protocol,
            self.target,
            if self.label.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.label)
            },
            self.producers,
            self.consumers,
            self.idle_connections,
            self.qos,
            self.sent,
            self.sent_per_sec,
            self.received,
            self.expected,
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
        );
        if let (Some(b), Some(c)) = (self.rss_kib_before, self.rss_kib_connected) {
            t.push_str(&format!(
                "\nbroker rss  {b} KiB before, {c} KiB connected, {:.0} KiB per 1,000 connections",
                self.rss_kib_per_1000_conn.unwrap_or(0.0)
            ));
        }
        if let Some(us) = self.broker_cpu_us_per_msg {
            t.push_str(&format!("\nbroker cpu  {us:.1} µs per delivered message"));
        }
        t
    }

    /// Fills counts, throughput and latency from the tally. Throughput counts only deliveries
    /// of messages sent after the warm-up, over `seconds` (the measured window).
    pub(crate) fn finish(
        &mut self,
        opts: &BenchOptions,
        tally: &Tally,
        seconds: f64,
        send_seconds: f64,
    ) {
        let totals = tally.totals();
        let (measured, _) = tally.measured();
        let latency = tally.latency();
        let acks = tally.acks();
        self.target = opts.target.clone();
        self.producers = opts.producers;
        self.consumers = opts.consumers;
        self.idle_connections = opts.idle_connections;
        self.size = opts.size;
        self.sent = totals.sent;
        self.received = totals.received;
        self.expected = totals.expected;
        self.duplicates = totals.duplicates;
        self.out_of_order = totals.out_of_order;
        self.seconds = seconds;
        self.msgs_per_sec = measured as f64 / seconds.max(1e-9);
        self.mb_per_sec = self.msgs_per_sec * opts.size as f64 / 1e6;
        self.sent_per_sec = totals.sent as f64 / send_seconds.max(1e-9);
        self.p50_ms = ms(&latency, 0.5);
        self.p90_ms = ms(&latency, 0.9);
        self.p99_ms = ms(&latency, 0.99);
        self.p999_ms = ms(&latency, 0.999);
        self.max_ms = latency.max() as f64 / 1000.0;
        self.ack_p50_ms = ms(&acks, 0.5);
        self.ack_p99_ms = ms(&acks, 0.99);
    }
}

/// Counts a run ends with (see [`Tally::totals`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TallyTotals {
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
}

impl TallyTotals {
    /// The verdict every bench gives: loss and disorder fail the run.
    pub fn check(&self, drain: Duration, ordered: bool) -> Result<(), BenchError> {
        if self.received < self.expected {
            return Err(BenchError::Lost {
                expected: self.expected,
                lost: self.expected - self.received,
                secs: drain.as_secs(),
            });
        }
        if ordered && self.out_of_order > 0 {
            return Err(BenchError::Disorder(self.out_of_order));
        }
        Ok(())
    }
}

/// After the last send, deliveries are awaited as long as they keep coming: a run gives up
/// when none arrived for `DRAIN_IDLE`, or after `DRAIN_MAX` in all. A slow broker is told
/// apart from one that lost messages, and nothing waits forever.
pub(crate) const DRAIN_IDLE: Duration = Duration::from_secs(10);
pub(crate) const DRAIN_MAX: Duration = Duration::from_secs(120);

/// Waits until every expected delivery arrived, `give_up()` says so, or deliveries stopped
/// coming (see [`DRAIN_IDLE`]). `tick` runs every 250 ms (progress display).
pub(crate) async fn drain_deliveries(
    tally: &Tally,
    give_up: impl Fn() -> bool,
    mut tick: impl FnMut(&Tally),
) {
    let start = Instant::now();
    let mut seen = tally.received_count();
    let mut progressed = Instant::now();
    let mut shown = Instant::now();
    while !tally.complete() && !give_up() {
        if progressed.elapsed() >= DRAIN_IDLE || start.elapsed() >= DRAIN_MAX {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = tally.received_count();
        if now != seen {
            seen = now;
            progressed = Instant::now();
        }
        if shown.elapsed() >= Duration::from_millis(250) {
            shown = Instant::now();
            tick(tally);
        }
    }
}

/// Resident set size of a process, KiB, from /proc (Linux); `None` elsewhere or when gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Records broker memory around the connection phase.
pub(crate) fn note_rss(report: &mut Report, opts: &BenchOptions, before: Option<u64>) {
    let Some(pid) = opts.broker_pid else { return };
    let connected = rss_kib(pid);
    report.rss_kib_before = before;
    report.rss_kib_connected = connected;
    let conns = opts.producers + opts.consumers + opts.idle_connections;
    // Below a hundred connections the difference is mostly buffers and topic state.
    if let (Some(b), Some(c)) = (before, connected)
        && conns >= 100
    {
        report.rss_kib_per_1000_conn = Some((c as f64 - b as f64) * 1000.0 / conns as f64);
    }
}

/// Clock ticks per second of the CPU times in /proc/<pid>/stat: USER_HZ, which is 100 on Linux
/// (`getconf CLK_TCK` shows it) whatever the kernel's internal HZ.
const USER_HZ: u64 = 100;

/// CPU time a process has used, user + system over all its threads, in clock ticks
/// ([`USER_HZ`] a second), from /proc/<pid>/stat; `None` elsewhere than Linux or when gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line. Field 2, the command name, is
/// in parentheses and may itself hold spaces and ')', so fields are counted from after the
/// last ')': field 3 (the state) comes first there.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Microseconds of CPU per delivered message between two [`cpu_ticks`] readings; `None` when
/// a reading failed or nothing was delivered.
fn cpu_us_per_msg(before: Option<u64>, after: Option<u64>, received: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (received > 0).then(|| {
        after.saturating_sub(before) as f64 * (1_000_000 / USER_HZ) as f64 / received as f64
    })
}

/// Records the broker's CPU per delivered message, once `report` is finished; `before` is
/// [`cpu_ticks`] read where the memory before is read.
pub(crate) fn note_cpu(report: &mut Report, opts: &BenchOptions, before: Option<u64>) {
    let Some(pid) = opts.broker_pid else { return };
    report.broker_cpu_us_per_msg = cpu_us_per_msg(before, cpu_ticks(pid), report.received);
}

/// A progress bar over the measured seconds; `None` when progress is off.
pub(crate) fn progress_bar(opts: &BenchOptions) -> Option<indicatif::ProgressBar> {
    opts.progress.then(|| {
        let secs = (opts.warmup + opts.duration).as_secs().max(1);
        let bar = indicatif::ProgressBar::new(secs);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} s  {msg}")
                .expect("valid template"),
        );
        bar
    })
}

/// Paces one producer: when the next send of `seq` is due under `rate` msgs/s per producer.
pub(crate) async fn pace(begun: Instant, seq: u64, rate: Option<f64>) {
    if let Some(rate) = rate {
        let due = begun + Duration::from_secs_f64(seq as f64 / rate);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
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
pub const STAMP: usize = 20;

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

    #[test]
    fn cpu_ticks_from_proc_stat() {
        // The command name holds spaces and a ')': fields count from after the last ')'.
        let line = "4242 (my (broker) x) S 1 4242 4242 0 -1 4194560 9182 0 12 0 \
                    1234 567 0 0 20 0 9 0 31337 1048576000 20480 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17987 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_cpu_ticks(line), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("4242 (cut short) S 1 2 3"), None);
        assert_eq!(parse_cpu_ticks("no parentheses at all"), None);
        // This process: running these tests took some CPU, and the file parses.
        if cfg!(target_os = "linux") {
            assert!(cpu_ticks(std::process::id()).is_some());
        }
    }

    #[test]
    fn cpu_per_delivered_message() {
        // 250 ticks = 2.5 s of CPU over 100,000 deliveries = 25 µs each.
        assert_eq!(cpu_us_per_msg(Some(1000), Some(1250), 100_000), Some(25.0));
        assert_eq!(cpu_us_per_msg(None, Some(1250), 100_000), None);
        assert_eq!(cpu_us_per_msg(Some(1000), None, 100_000), None);
        assert_eq!(cpu_us_per_msg(Some(1000), Some(1250), 0), None);
    }

    #[test]
    fn reads_reports_without_the_cpu_field() {
        let r: Report = serde_json::from_str(r#"{"protocol":"mqtt","received":5}"#).unwrap();
        assert_eq!((r.received, r.broker_cpu_us_per_msg), (5, None));
        let r = Report {
            broker_cpu_us_per_msg: Some(12.34),
            ..r
        };
        assert!(
            r.table()
                .contains("broker cpu  12.3 µs per delivered message")
        );
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.broker_cpu_us_per_msg, Some(12.34));
    }
}
