//! Benchmarks of the queue engine in an in-process `Core` (no gRPC, no gateway), on the
//! memory adapters and on the local log + redb with fsync before every acknowledgement:
//!
//! - `queue_roundtrip`: enqueue a batch of 16 x 1 KiB, receive the 16, ack them, from 1 and
//!   8 concurrent producer/consumer pairs on one queue;
//! - `fanout`: publish a batch of 16 x 1 KiB to a fanout address bound to 10 durable
//!   queues, then receive and ack it from each queue.
//!
//! Throughput is records (and bytes of record values) through the queue, counting a fan-out
//! once per queue. Run with `cargo bench -p tributary-core --bench queues`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tributary_core::{Core, CoreConfig, DEFAULT_NAMESPACE};
use tributary_proto::v1::{self, AddressKind};
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::memory::{MemoryLogStore, MemoryMetaStore};
use tributary_storage::redb_meta::RedbMetaStore;

const RECORDS: usize = 16;
const VALUE: usize = 1024;
const FANOUT: usize = 10;

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

fn open_core(rt: &Runtime, storage: Storage) -> (Option<TempDir>, Core) {
    let config = CoreConfig::default();
    match storage {
        Storage::Memory => (
            None,
            rt.block_on(Core::open(
                Arc::new(MemoryLogStore::new()),
                Arc::new(MemoryMetaStore::new()),
                config,
            ))
            .expect("open core"),
        ),
        Storage::Local => {
            let dir = tempfile::Builder::new()
                .prefix("tributary-queue-bench-")
                .tempdir()
                .expect("temp dir");
            let core = rt
                .block_on(async {
                    let log =
                        LocalLogStore::open(dir.path().join("log"), LocalLogConfig::default())?;
                    let meta = Arc::new(RedbMetaStore::open(dir.path().join("meta.redb"))?);
                    Core::open(log, meta, config).await
                })
                .expect("open core");
            (Some(dir), core)
        }
    }
}

fn qid(name: &str) -> v1::QueueId {
    v1::QueueId {
        namespace: DEFAULT_NAMESPACE.into(),
        name: name.into(),
    }
}

fn records() -> Vec<v1::Record> {
    (0..RECORDS)
        .map(|i| v1::Record {
            value: Bytes::from(vec![(i % 251) as u8; VALUE]),
            ..Default::default()
        })
        .collect()
}

async fn declare(core: &Core, name: &str) {
    core.declare_queue(v1::DeclareQueueRequest {
        id: Some(qid(name)),
        durable: true,
        ..Default::default()
    })
    .await
    .expect("declare queue");
}

/// Receives and acks `n` messages from the queue.
async fn drain(core: &Core, queue: &str, n: usize) {
    let mut left = n;
    while left > 0 {
        let got = core
            .receive(v1::ReceiveRequest {
                queue: Some(qid(queue)),
                max_messages: left as u32,
                visibility_timeout_ms: 60_000,
                wait_time_ms: 5_000,
                consumer: String::new(),
                no_wait_durable: false,
            })
            .await
            .expect("receive");
        assert!(!got.is_empty(), "the queue ran dry");
        left -= got.len();
        let ids: Vec<String> = got.into_iter().map(|m| m.lease_id).collect();
        let expired = core.ack(&qid(queue), &ids).await.expect("ack");
        assert!(expired.is_empty());
    }
}

fn bench_roundtrip(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("queue_roundtrip");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(RECORDS as u64));
    for storage in [Storage::Memory, Storage::Local] {
        for pairs in [1usize, 8] {
            let (dir, core) = open_core(rt, storage);
            rt.block_on(declare(&core, "rt"));
            let recs = Arc::new(records());
            group.bench_function(
                BenchmarkId::new(storage.name(), format!("pairs{pairs}")),
                |b| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let start = Instant::now();
                            let tasks: Vec<_> = (0..pairs)
                                .map(|_| {
                                    let core = core.clone();
                                    let recs = recs.clone();
                                    let n = iters.div_ceil(pairs as u64);
                                    tokio::spawn(async move {
                                        for _ in 0..n {
                                            core.enqueue(v1::EnqueueRequest {
                                                queue: Some(qid("rt")),
                                                records: recs.to_vec(),
                                            })
                                            .await
                                            .expect("enqueue");
                                            drain(&core, "rt", RECORDS).await;
                                        }
                                    })
                                })
                                .collect();
                            for t in tasks {
                                t.await.expect("task");
                            }
                            // The pairs together ran (about) `iters` iterations.
                            start.elapsed()
                        })
                    });
                },
            );
            rt.block_on(core.shutdown()).expect("shutdown");
            drop(dir);
        }
    }
    group.finish();
}

fn bench_fanout(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("fanout");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements((RECORDS * FANOUT) as u64));
    for storage in [Storage::Memory, Storage::Local] {
        let (dir, core) = open_core(rt, storage);
        rt.block_on(async {
            core.declare_address(v1::DeclareAddressRequest {
                namespace: DEFAULT_NAMESPACE.into(),
                name: "fan".into(),
                kind: AddressKind::Fanout as i32,
                durable: true,
                ..Default::default()
            })
            .await
            .expect("address");
            for i in 0..FANOUT {
                let name = format!("f{i}");
                declare(&core, &name).await;
                core.bind(v1::Binding {
                    namespace: DEFAULT_NAMESPACE.into(),
                    source_address: "fan".into(),
                    destination: Some(v1::binding::Destination::Queue(name)),
                    ..Default::default()
                })
                .await
                .expect("bind");
            }
        });
        let recs = records();
        group.bench_function(
            BenchmarkId::new(storage.name(), format!("queues{FANOUT}")),
            |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let routed = core
                                .publish(v1::PublishRequest {
                                    namespace: DEFAULT_NAMESPACE.into(),
                                    address: "fan".into(),
                                    records: recs.clone(),
                                    ..Default::default()
                                })
                                .await
                                .expect("publish");
                            assert_eq!(routed.routed[0], FANOUT as u32);
                            let consumers: Vec<_> = (0..FANOUT)
                                .map(|i| {
                                    let core = core.clone();
                                    tokio::spawn(async move {
                                        drain(&core, &format!("f{i}"), RECORDS).await
                                    })
                                })
                                .collect();
                            for c in consumers {
                                c.await.expect("consumer");
                            }
                        }
                        start.elapsed()
                    })
                });
            },
        );
        rt.block_on(core.shutdown()).expect("shutdown");
        drop(dir);
    }
    group.finish();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut c = Criterion::default().configure_from_args();
    bench_roundtrip(&mut c, &rt);
    bench_fanout(&mut c, &rt);
    c.final_summary();
}
