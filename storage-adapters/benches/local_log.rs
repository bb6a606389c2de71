//! Benchmarks of the local segment log: acknowledged (fsynced) append throughput with group
//! commit, the same under the interval fsync policy, sequential read throughput, and a
//! printed ack-latency report next to the raw fsync latency of the disk under the data dir.
//!
//! Run with `cargo bench -p tributary-storage --bench local_log`. Data goes to temporary
//! directories under the system temp dir (override with `TMPDIR`); they are removed afterwards.
//! Read numbers come from a freshly written partition, so they are page-cache reads.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tributary_storage::local::{FsyncPolicy, LocalLogConfig, LocalLogStore};
use tributary_storage::{BatchToAppend, LogStore, PartitionKey};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const PARTITION: PartitionKey = PartitionKey {
    stream_id: 1,
    partition: 0,
};
const CONCURRENCY: [usize; 3] = [1, 8, 64];
const BATCH_SIZES: [usize; 2] = [16 * KIB, 64 * KIB];
const INTERVAL: Duration = Duration::from_millis(5);
const READ_FILL_BYTES: usize = 256 * MIB;
const READ_BATCH: usize = 16 * KIB;
const READ_MAX_BYTES: usize = MIB;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A fresh store with one empty partition. The returned directory must outlive the store.
fn open_store(rt: &Runtime, fsync: FsyncPolicy) -> (TempDir, Arc<LocalLogStore>) {
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-")
        .tempdir()
        .expect("tempdir");
    let config = LocalLogConfig {
        fsync,
        ..LocalLogConfig::default()
    };
    // The interval policy spawns its fsync task on the current runtime.
    let _guard = rt.enter();
    let store = LocalLogStore::open(dir.path().join("log"), config).expect("open store");
    rt.block_on(store.create_partition(PARTITION))
        .expect("create partition");
    (dir, store)
}

fn payload(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>())
}

fn batch(payload: &Bytes) -> BatchToAppend {
    BatchToAppend {
        record_count: 1,
        max_timestamp_ms: 0,
        payload: payload.clone(),
    }
}

/// Appends one batch and waits until it is durable; returns the ack latency.
async fn append_durable(store: &LocalLogStore, payload: &Bytes) -> Duration {
    let started = Instant::now();
    let base = store
        .append(PARTITION, batch(payload))
        .await
        .expect("append");
    store
        .wait_durable(PARTITION, base + 1)
        .await
        .expect("wait_durable");
    started.elapsed()
}

/// Spreads `total` append+wait_durable calls over `tasks` concurrent tasks.
/// Returns every ack latency.
async fn run_appenders(
    store: &Arc<LocalLogStore>,
    payload: &Bytes,
    tasks: usize,
    total: u64,
) -> Vec<Duration> {
    let tasks_u64 = tasks as u64;
    let handles: Vec<_> = (0..tasks_u64)
        .map(|i| {
            let n = total / tasks_u64 + u64::from(i < total % tasks_u64);
            let store = store.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    lat.push(append_durable(&store, &payload).await);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total as usize);
    for h in handles {
        all.extend(h.await.expect("appender task"));
    }
    all
}

fn bench_append(c: &mut Criterion, rt: &Runtime, group_name: &str, fsync: FsyncPolicy) {
    let mut group = c.benchmark_group(group_name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for size in BATCH_SIZES {
        let payload = payload(size);
        group.throughput(Throughput::Bytes(size as u64));
        for tasks in CONCURRENCY {
            let (_dir, store) = open_store(rt, fsync);
            let id = BenchmarkId::new(format!("{}KiB", size / KIB), format!("{tasks}tasks"));
            // One iteration = one acknowledged batch; `iters` batches are spread over
            // `tasks` concurrent appenders, so time/iter is the inverse of aggregate rate.
            group.bench_function(id, |b| {
                b.to_async(rt).iter_custom(|iters| {
                    let store = store.clone();
                    let payload = payload.clone();
                    async move {
                        let started = Instant::now();
                        run_appenders(&store, &payload, tasks, iters).await;
                        started.elapsed()
                    }
                })
            });
            drop(store);
        }
    }
    group.finish();
}

fn bench_append_always(c: &mut Criterion, rt: &Runtime) {
    bench_append(c, rt, "append_fsync_always", FsyncPolicy::Always);
}

fn bench_append_interval(c: &mut Criterion, rt: &Runtime) {
    bench_append(
        c,
        rt,
        "append_fsync_interval_5ms",
        FsyncPolicy::Interval(INTERVAL),
    );
}

fn bench_read(c: &mut Criterion, rt: &Runtime) {
    // Skip the 256 MiB fill when a filter on the command line rules this group out.
    if !filters().is_empty() && !filters().iter().any(|f| f.contains("read")) {
        return;
    }
    let (_dir, store) = open_store(rt, FsyncPolicy::Always);
    let payload = payload(READ_BATCH);
    let batches = (READ_FILL_BYTES / READ_BATCH) as i64;
    let fill_started = Instant::now();
    rt.block_on(async {
        for _ in 0..batches {
            store
                .append(PARTITION, batch(&payload))
                .await
                .expect("append");
        }
        store
            .wait_durable(PARTITION, batches)
            .await
            .expect("wait_durable");
    });
    let fill = fill_started.elapsed();
    println!(
        "read fill: {} MiB in {} batches of {} KiB, {:.2?} ({:.0} MiB/s, one fsync at the end)",
        READ_FILL_BYTES / MIB,
        batches,
        READ_BATCH / KIB,
        fill,
        (READ_FILL_BYTES / MIB) as f64 / fill.as_secs_f64()
    );

    let mut group = c.benchmark_group("read_sequential");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(READ_MAX_BYTES as u64));
    let name = format!(
        "{}MiB_reads_of_{}KiB_batches",
        READ_MAX_BYTES / MIB,
        READ_BATCH / KIB
    );
    // One iteration = one `read(p, offset, 1 MiB)`; the cursor walks the partition from the
    // start and wraps at the end. 1 MiB is a whole number of batches, so every read returns
    // exactly 1 MiB of payload.
    let cursor = Cell::new(0i64);
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let store = store.clone();
            let cursor = &cursor;
            async move {
                let mut from = cursor.get();
                let started = Instant::now();
                for _ in 0..iters {
                    let got = store
                        .read(PARTITION, from, READ_MAX_BYTES)
                        .await
                        .expect("read");
                    let last = got.last().expect("a non-empty read");
                    from = last.next_offset();
                    if from >= batches {
                        from = 0;
                    }
                    std::hint::black_box(got);
                }
                let elapsed = started.elapsed();
                cursor.set(from);
                elapsed
            }
        })
    });
    group.finish();
}

struct Summary {
    count: usize,
    mean: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn summarize(mut v: Vec<Duration>) -> Summary {
    v.sort_unstable();
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Summary {
        count: v.len(),
        mean: v.iter().sum::<Duration>() / v.len() as u32,
        p50: pick(0.50),
        p99: pick(0.99),
        max: v[v.len() - 1],
    }
}

fn print_summary(label: &str, s: &Summary) {
    println!(
        "{label:<44} n={:<6} p50={:>9.3?} p99={:>9.3?} mean={:>9.3?} max={:>9.3?}",
        s.count, s.p50, s.p99, s.mean, s.max
    );
}

/// Times `write_at` of 4 KiB followed by `fdatasync`, 200 times: once overwriting the same
/// block (pure data flush), once appending (the file grows, as the log's segments do).
fn fsync_latency_report() {
    const ITERS: usize = 200;
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-fsync-")
        .tempdir()
        .expect("tempdir");
    let block = vec![0x5au8; 4 * KIB];
    for (label, grow) in [
        ("fdatasync, 4 KiB overwrite", false),
        ("fdatasync, 4 KiB append (file grows)", true),
    ] {
        let path = dir.path().join(if grow { "append" } else { "overwrite" });
        let file: File = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("open fsync test file");
        file.write_all_at(&block, 0).expect("write");
        file.sync_all().expect("fsync");
        let mut lat = Vec::with_capacity(ITERS);
        for i in 0..ITERS {
            let pos = if grow {
                ((i + 1) * block.len()) as u64
            } else {
                0
            };
            let started = Instant::now();
            file.write_all_at(&block, pos).expect("write");
            file.sync_data().expect("fdatasync");
            lat.push(started.elapsed());
        }
        print_summary(label, &summarize(lat));
    }
}

/// Ack latency (append -> wait_durable) of 16 KiB batches for 8 and 64 concurrent appenders
/// on one partition, under both fsync policies.
fn ack_latency_report(rt: &Runtime) {
    const RUN: Duration = Duration::from_secs(2);
    let payload = payload(16 * KIB);
    for (policy_name, fsync) in [
        ("always", FsyncPolicy::Always),
        ("interval 5ms", FsyncPolicy::Interval(INTERVAL)),
    ] {
        for tasks in [8usize, 64] {
            let (_dir, store) = open_store(rt, fsync);
            // Warm up briefly, then run for a fixed time.
            rt.block_on(run_appenders(&store, &payload, tasks, (tasks * 4) as u64));
            let lat = rt.block_on(async {
                let deadline = Instant::now() + RUN;
                let handles: Vec<_> = (0..tasks)
                    .map(|_| {
                        let store = store.clone();
                        let payload = payload.clone();
                        tokio::spawn(async move {
                            let mut lat = Vec::new();
                            while Instant::now() < deadline {
                                lat.push(append_durable(&store, &payload).await);
                            }
                            lat
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for h in handles {
                    all.extend(h.await.expect("appender task"));
                }
                all
            });
            let s = summarize(lat);
            let mib_s = (s.count * 16 * KIB) as f64 / MIB as f64 / RUN.as_secs_f64();
            print_summary(&format!("ack 16 KiB, {policy_name}, {tasks} appenders"), &s);
            println!("{:<44} ~{mib_s:.1} MiB/s acknowledged", "");
        }
    }
}

/// The latency report is printed unless a criterion filter excludes it, and never in
/// `--test` / `--list` mode.
fn want_latency_report() -> bool {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return false;
    }
    let filters = filters();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| "latency_report".contains(f.as_str()))
}

/// Positional (filter) arguments given to the bench binary.
fn filters() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect()
}

fn main() {
    let rt = runtime();
    if want_latency_report() {
        println!("== latency_report ==");
        fsync_latency_report();
        ack_latency_report(&rt);
        println!();
    }
    let mut c = Criterion::default().configure_from_args();
    bench_append_always(&mut c, &rt);
    bench_append_interval(&mut c, &rt);
    bench_read(&mut c, &rt);
    c.final_summary();
}
