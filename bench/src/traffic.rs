//! What the MQTT and AMQP benches share: the send schedule (warm-up, duration, count, rate),
//! the first failure of any connection, and the end of a run (drain, verdict, report).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::task::JoinSet;

use crate::{
    BenchError, BenchOptions, DRAIN_IDLE, Report, Tally, drain_deliveries, pace, progress_bar,
};

/// Bound on opening one connection (and its subscription) and on each setup step.
pub(crate) const CONNECT_WAIT: Duration = Duration::from_secs(20);
/// Bound on waiting for outstanding acknowledgements (confirms, PUBACKs) after the last send.
pub(crate) const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// Connections opened at once: enough to open thousands quickly, few enough not to overflow a
/// broker's listen backlog (a dropped SYN costs a 1 s retransmit).
pub(crate) const CONNECT_PARALLEL: usize = 64;
/// Bound on closing connections at the end; closing is best effort.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The first thing that went wrong on any connection. Later errors are usually consequences
/// of the first (a broker that died fails every connection), so only the first is kept.
#[derive(Default)]
pub(crate) struct Failure {
    set: AtomicBool,
    first: Mutex<Option<BenchError>>,
}

impl Failure {
    pub(crate) fn set(&self, error: BenchError) {
        let mut first = self.first.lock();
        if first.is_none() {
            *first = Some(error);
        }
        self.set.store(true, Ordering::Release);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    pub(crate) fn take(&self) -> Option<BenchError> {
        self.first.lock().take()
    }
}

/// When producers send and when they stop: shared by every producer of a run.
pub(crate) struct Schedule {
    pub(crate) start: Instant,
    end_at: Instant,
    warm_end: Instant,
    /// Messages per second per producer.
    rate: Option<f64>,
    count: Option<u64>,
    measuring: AtomicBool,
    /// Sends begun since measuring started (what `count` limits).
    claimed: AtomicU64,
    failure: Arc<Failure>,
}

impl Schedule {
    /// Starts the clock; with no warm-up, measuring starts now.
    pub(crate) fn new(opts: &BenchOptions, tally: &Tally, failure: Arc<Failure>) -> Self {
        let start = Instant::now();
        let schedule = Self {
            start,
            end_at: start + opts.warmup + opts.duration,
            warm_end: start + opts.warmup,
            rate: opts.rate.map(|r| r as f64 / opts.producers as f64),
            count: opts.count,
            measuring: AtomicBool::new(false),
            claimed: AtomicU64::new(0),
            failure,
        };
        if opts.warmup.is_zero() {
            schedule.start_measuring(tally);
        }
        schedule
    }

    /// The run's sending time is over.
    pub(crate) fn over(&self) -> bool {
        Instant::now() >= self.end_at
    }

    fn start_measuring(&self, tally: &Tally) {
        tally.start_measuring();
        self.measuring.store(true, Ordering::Release);
    }

    /// Waits until a producer may send its message `seq`; false when it must stop instead
    /// (time is up, `count` messages were sent, or the run failed).
    pub(crate) async fn next(&self, seq: u64) -> bool {
        if self.failure.is_set() || Instant::now() >= self.end_at {
            return false;
        }
        // A slow rate must not hold a producer past the end of the run.
        if tokio::time::timeout_at(self.end_at.into(), pace(self.start, seq, self.rate))
            .await
            .is_err()
        {
            return false;
        }
        if let Some(count) = self.count
            && self.measuring.load(Ordering::Acquire)
            && self.claimed.fetch_add(1, Ordering::AcqRel) >= count
        {
            return false;
        }
        !self.failure.is_set()
    }

    /// Runs until every producer task ended: starts measuring when the warm-up is over and
    /// keeps the progress bar current. Returns the bar, for the drain to go on with.
    pub(crate) async fn drive(
        &self,
        opts: &BenchOptions,
        tally: &Tally,
        producers: &mut JoinSet<()>,
    ) -> Option<indicatif::ProgressBar> {
        let bar = progress_bar(opts);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let measuring = self.measuring.load(Ordering::Acquire);
            tokio::select! {
                joined = producers.join_next() => match joined {
                    None => break,
                    Some(Err(e)) if e.is_panic() => {
                        self.failure.set(BenchError::Io(format!("a producer panicked: {e}")));
                    }
                    Some(_) => {}
                },
                _ = tokio::time::sleep_until(self.warm_end.into()), if !measuring => {
                    self.start_measuring(tally);
                }
                _ = tick.tick() => {
                    if let Some(bar) = &bar {
                        let len = bar.length().unwrap_or(0);
                        bar.set_position(self.start.elapsed().as_secs().min(len));
                        bar.set_message(format!(
                            "{} sent, {} received",
                            tally.sent_count(),
                            tally.received_count()
                        ));
                    }
                }
            }
        }
        bar
    }
}

/// Waits (bounded, see [`crate::DRAIN_IDLE`]) until every expected delivery arrived or the run
/// failed.
pub(crate) async fn drain(tally: &Tally, failure: &Failure, bar: Option<&indicatif::ProgressBar>) {
    drain_deliveries(
        tally,
        || failure.is_set(),
        |t| {
            if let Some(bar) = bar {
                bar.set_message(format!(
                    "draining: {} of {} deliveries",
                    t.received_count(),
                    t.expected_count()
                ));
            }
        },
    )
    .await;
}

/// Fills the report and gives the verdict: the first failure, else loss or disorder.
pub(crate) fn conclude(
    mut report: Report,
    opts: &BenchOptions,
    tally: &Tally,
    failure: &Failure,
    elapsed: Duration,
    send_seconds: f64,
    ordered: bool,
) -> Result<Report, BenchError> {
    if let Some(error) = failure.take() {
        return Err(error);
    }
    let totals = tally.totals();
    let (_, measured) = tally.measured();
    // Nothing measured arrived (e.g. everything was lost): fall back to the whole run.
    let seconds = if measured > 0.0 {
        measured
    } else {
        elapsed.as_secs_f64()
    };
    report.finish(opts, tally, seconds, send_seconds);
    totals.check(DRAIN_IDLE, ordered)?;
    Ok(report)
}

/// A fresh suffix for this run's topic/queue names, so runs never share state.
pub(crate) fn run_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

pub(crate) fn unreachable(opts: &BenchOptions, detail: impl std::fmt::Display) -> BenchError {
    BenchError::Unreachable {
        target: opts.target.clone(),
        secs: CONNECT_WAIT.as_secs(),
        detail: detail.to_string(),
    }
}
