//! Benchmarks of an in-process `Core` (no gRPC, no gateway) on the memory adapters and on the
//! local log + redb in a temporary directory with the default fsync policy (fsync before
//! every acknowledgement):
//!
//! - `append`: acknowledged appends of one envelope batch of 16 records x 1 KiB, awaited one
//!   at a time and from 32 concurrent appenders on one partition (group commit);
//! - `fetch`: sequential 1 MiB fetches from a partition pre-filled with 64 MiB of such
//!   batches. Local-log reads are page-cache reads: the data was just written.
//!
//! Throughput is bytes of record values. Run with `cargo bench -p tributary-core --bench core`;
//! temporary directories go under the system temp dir (override with `TMPDIR`) and are
//! removed afterwards.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tributary_core::meta::StreamSettings;
use tributary_core::{Core, CoreConfig, DEFAULT_NAMESPACE};
use tributary_proto::v1;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::memory::{MemoryLogStore, MemoryMetaStore};
use tributary_storage::redb_meta::RedbMetaStore;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const RECORDS: usize = 16;
const VALUE: usize = KIB;
const BATCH_VALUE_BYTES: usize = RECORDS * VALUE;
const CONCURRENCY: [usize; 2] = [1, 32];
const FETCH_FILL_BYTES: usize = 64 * MIB;
const FETCH_MAX_BYTES: i32 = MIB as i32;
/// Appenders used to fill the fetch partition; on the local log this makes the fill a
/// matter of group-committed fsyncs instead of one fsync per batch.
const FILL_TASKS: usize = 32;

#[derive(Clone, Copy)]
enum Storage {
    Memory,
    Local,
}

impl Storage {
    fn name(self) -> &'static str {
        match self {
            Storage::Memory => "memory",
            Storage::Local => "local_fsync_always",
        }
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A fresh core. The returned directory (local storage only) must outlive it.
fn open_core(rt: &Runtime, storage: Storage) -> (Option<TempDir>, Core) {
    let config = CoreConfig::default();
    match storage {
        Storage::Memory => {
            let core = rt
                .block_on(Core::open(
                    Arc::new(MemoryLogStore::new()),
                    Arc::new(MemoryMetaStore::new()),
                    config,
                ))
                .expect("open core");
            (None, core)
        }
        Storage::Local => {
            let dir = tempfile::Builder::new()
                .prefix("tributary-core-bench-")
                .tempdir()
                .expect("tempdir");
            let core = rt
                .block_on(open_local(dir.path(), config))
                .expect("open core");
            (Some(dir), core)
        }
    }
}

async fn open_local(dir: &Path, config: CoreConfig) -> tributary_core::CoreResult<Core> {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default())?;
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb"))?);
    Core::open(log, meta, config).await
}

fn records() -> Vec<v1::Record> {
    (0..RECORDS)
        .map(|i| v1::Record {
            value: Bytes::from(
                (0..VALUE)
                    .map(|j| ((i * 131 + j * 31) % 251) as u8)
                    .collect::<Vec<u8>>(),
            ),
            ..Default::default()
        })
        .collect()
}

fn append_request(stream: &v1::StreamId, records: &[v1::Record]) -> v1::AppendRequest {
    v1::AppendRequest {
        stream: Some(stream.clone()),
        partition: 0,
        batch: Some(v1::RecordBatch {
            records: records.to_vec(),
            ..Default::default()
        }),
        auto_create: false,
        defer_durable: false,
    }
}

async fn create_stream(core: &Core, name: &str) -> v1::StreamId {
    let id = v1::StreamId::new(DEFAULT_NAMESPACE, name);
    core.create_stream(id.clone(), 1, StreamSettings::default(), false, false)
        .await
        .expect("create stream");
    id
}

/// `total` acknowledged appends spread over `tasks` concurrent tasks, each awaiting its
/// appends one at a time, as a gateway connection does.
async fn run_appenders(
    core: &Core,
    stream: &v1::StreamId,
    records: &Arc<Vec<v1::Record>>,
    tasks: usize,
    total: u64,
) {
    let tasks_u64 = tasks as u64;
    let handles: Vec<_> = (0..tasks_u64)
        .map(|i| {
            let n = total / tasks_u64 + u64::from(i < total % tasks_u64);
            let core = core.clone();
            let stream = stream.clone();
            let records = records.clone();
            tokio::spawn(async move {
                for _ in 0..n {
                    core.append(append_request(&stream, &records))
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for h in futures::future::join_all(handles).await {
        h.expect("appender task");
    }
}

fn bench_append(c: &mut Criterion, rt: &Runtime) {
    let records = Arc::new(records());
    let mut group = c.benchmark_group("append");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(BATCH_VALUE_BYTES as u64));
    for storage in [Storage::Memory, Storage::Local] {
        let (dir, core) = open_core(rt, storage);
        for tasks in CONCURRENCY {
            let id = BenchmarkId::new(
                storage.name(),
                format!("{RECORDS}x{}KiB_{tasks}tasks", VALUE / KIB),
            );
            let sample = Cell::new(0u32);
            // One iteration = one acknowledged batch. Each sample appends to a fresh stream
            // that is deleted afterwards, so memory and disk use stay bounded by one sample
            // and no sample pays for the data of the ones before it.
            group.bench_function(id, |b| {
                b.to_async(rt).iter_custom(|iters| {
                    let core = core.clone();
                    let records = records.clone();
                    let n = sample.get();
                    sample.set(n + 1);
                    async move {
                        let stream = create_stream(&core, &format!("append-{tasks}-{n}")).await;
                        let started = Instant::now();
                        run_appenders(&core, &stream, &records, tasks, iters).await;
                        let elapsed = started.elapsed();
                        core.delete_stream(&stream).await.expect("delete stream");
                        elapsed
                    }
                })
            });
        }
        rt.block_on(core.shutdown()).expect("shutdown");
        drop(dir);
    }
    group.finish();
}

fn bench_fetch(c: &mut Criterion, rt: &Runtime) {
    // Skip the 64 MiB fills when a filter on the command line rules this group out.
    if !filters().is_empty() && !filters().iter().any(|f| f.contains("fetch")) {
        return;
    }
    let records = Arc::new(records());
    let batches = (FETCH_FILL_BYTES / BATCH_VALUE_BYTES) as u64;
    let mut group = c.benchmark_group("fetch");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for storage in [Storage::Memory, Storage::Local] {
        let (dir, core) = open_core(rt, storage);
        let fill_started = Instant::now();
        let stream = rt.block_on(async {
            let stream = create_stream(&core, "fetch").await;
            run_appenders(&core, &stream, &records, FILL_TASKS, batches).await;
            stream
        });
        println!(
            "fetch fill ({}): {} MiB in {batches} batches, {:.2?}",
            storage.name(),
            FETCH_FILL_BYTES / MIB,
            fill_started.elapsed()
        );
        let end = (batches as usize * RECORDS) as i64;
        let request = |offset: i64| v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: Some(stream.clone()),
                partition: 0,
                offset,
                max_bytes: FETCH_MAX_BYTES,
            }],
            max_bytes: FETCH_MAX_BYTES,
            min_bytes: 0,
            max_wait_ms: 0,
            read_committed: false,
        };
        // Every batch has the same size, so every fetch from a batch boundary returns as many
        // records as this first one; wrapping before a short tail keeps that true.
        let probe = rt.block_on(core.fetch(request(0))).expect("fetch");
        let per_fetch: i64 = probe.partitions[0]
            .batches
            .iter()
            .map(|b| i64::from(b.record_count))
            .sum();
        assert!(per_fetch > 0, "the probe fetch returned nothing");
        group.throughput(Throughput::Bytes(per_fetch as u64 * VALUE as u64));
        let id = BenchmarkId::new(
            storage.name(),
            format!(
                "{}MiB_of_{RECORDS}x{}KiB_batches",
                FETCH_MAX_BYTES as usize / MIB,
                VALUE / KIB
            ),
        );
        let cursor = Cell::new(0i64);
        group.bench_function(id, |b| {
            b.to_async(rt).iter_custom(|iters| {
                let core = core.clone();
                let cursor = &cursor;
                let request = &request;
                async move {
                    let mut from = cursor.get();
                    let started = Instant::now();
                    for _ in 0..iters {
                        let got = core.fetch(request(from)).await.expect("fetch");
                        let last = got.partitions[0].batches.last().expect("a non-empty fetch");
                        from = last.base_offset + i64::from(last.record_count);
                        if end - from < per_fetch {
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
        rt.block_on(core.shutdown()).expect("shutdown");
        drop(dir);
    }
    group.finish();
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
    let mut c = Criterion::default().configure_from_args();
    bench_append(&mut c, &rt);
    bench_fetch(&mut c, &rt);
    c.final_summary();
}
