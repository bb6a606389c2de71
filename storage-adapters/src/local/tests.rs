use std::io::Write;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn small_config() -> LocalLogConfig {
    LocalLogConfig {
        segment_bytes: 300,
        fsync: FsyncPolicy::Always,
        index_interval_bytes: 64,
    }
}

fn batch(count: u32, ts: i64, payload: &[u8]) -> BatchToAppend {
    BatchToAppend {
        record_count: count,
        max_timestamp_ms: ts,
        payload: Bytes::copy_from_slice(payload),
    }
}

const P: PartitionKey = PartitionKey {
    stream_id: 7,
    partition: 3,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn append_durable(store: &LocalLogStore, b: BatchToAppend) -> i64 {
    let count = b.record_count;
    let base = store.append(P, b).await.unwrap();
    store
        .wait_durable(P, base + i64::from(count))
        .await
        .unwrap();
    base
}

async fn read_all(store: &LocalLogStore, from: i64) -> Vec<StoredBatch> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let got = store.read(P, at, 1).await.unwrap();
        let Some(last) = got.last() else { return out };
        at = last.next_offset();
        out.extend(got);
    }
}

#[derive(Debug, Clone)]
enum Action {
    Append { count: u32, ts: i64, len: usize },
    Read { at_pct: u8, max_bytes: usize },
    Truncate { at_pct: u8 },
    Retain { max_bytes: u64 },
    CleanRestart,
    CrashRestart { garbage: Vec<u8> },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (1u32..5, 0i64..1000, 0usize..120).prop_map(|(count, ts, len)| Action::Append { count, ts, len }),
        3 => (0u8..=100, 1usize..400).prop_map(|(at_pct, max_bytes)| Action::Read { at_pct, max_bytes }),
        1 => (0u8..=100).prop_map(|at_pct| Action::Truncate { at_pct }),
        1 => (100u64..2000).prop_map(|max_bytes| Action::Retain { max_bytes }),
        1 => Just(Action::CleanRestart),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(|garbage| Action::CrashRestart { garbage }),
    ]
}

/// What the log must hold: every acknowledged batch, by base offset.
#[derive(Default)]
struct Model {
    batches: Vec<StoredBatch>,
    start: i64,
    next: i64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(actions in proptest::collection::vec(action(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut store = LocalLogStore::open(dir.path(), small_config()).unwrap();
            store.create_partition(P).await.unwrap();
            let mut model = Model::default();
            for (i, act) in actions.into_iter().enumerate() {
                match act {
                    Action::Append { count, ts, len } => {
                        let payload: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                        let base = append_durable(&store, batch(count, ts, &payload)).await;
                        prop_assert_eq!(base, model.next);
                        model.batches.push(StoredBatch { base_offset: base, record_count: count, max_timestamp_ms: ts, payload: payload.into() });
                        model.next += i64::from(count);
                    }
                    Action::Read { at_pct, max_bytes } => {
                        let at = model.start + (model.next - model.start) * i64::from(at_pct) / 100;
                        let got = store.read(P, at, max_bytes).await.unwrap();
                        let expect: Vec<_> = model.batches.iter().filter(|b| b.next_offset() > at).collect();
                        prop_assert_eq!(got.is_empty(), expect.is_empty());
                        for (g, e) in got.iter().zip(expect.iter()) {
                            prop_assert_eq!(g, *e);
                        }
                        let total: usize = got.iter().map(|b| b.payload.len()).sum();
                        if got.len() > 1 {
                            prop_assert!(total <= max_bytes);
                        }
                    }
                    Action::Truncate { at_pct } => {
                        let at = model.start + (model.next - model.start) * i64::from(at_pct) / 100;
                        let start = store.truncate_prefix(P, at).await.unwrap();
                        model.start = model.start.max(at);
                        prop_assert_eq!(start, model.start);
                        model.batches.retain(|b| b.next_offset() > model.start);
                    }
                    Action::Retain { max_bytes } => {
                        let policy = RetentionPolicy { max_age_ms: None, max_bytes: Some(max_bytes), now_ms: 0 };
                        let start = store.apply_retention(P, policy).await.unwrap();
                        prop_assert!(start >= model.start);
                        model.start = start;
                        model.batches.retain(|b| b.next_offset() > model.start);
                        // Retention keeps at least max_bytes worth of log when it has it.
                        let bounds = store.bounds(P).await.unwrap();
                        prop_assert_eq!(bounds.start_offset, start);
                    }
                    Action::CleanRestart => {
                        store.close().await.unwrap();
                        drop(store);
                        store = LocalLogStore::open(dir.path(), small_config()).unwrap();
                    }
                    Action::CrashRestart { garbage } => {
                        drop(store);
                        // A torn write: junk after the last acknowledged frame.
                        let part_dir = dir.path().join(P.to_string());
                        let mut logs: Vec<_> = fs::read_dir(&part_dir).unwrap()
                            .map(|e| e.unwrap().path())
                            .filter(|p| p.extension().is_some_and(|e| e == "log"))
                            .collect();
                        logs.sort();
                        let mut f = OpenOptions::new().append(true).open(logs.last().unwrap()).unwrap();
                        f.write_all(&garbage).unwrap();
                        drop(f);
                        store = LocalLogStore::open(dir.path(), small_config()).unwrap();
                    }
                }
                let bounds = store.bounds(P).await.unwrap();
                prop_assert_eq!(bounds.end_offset, model.next);
                prop_assert_eq!(bounds.start_offset, model.start);
            }
            // Everything acknowledged and not truncated is there, in order, exactly once.
            let all = read_all(&store, model.start).await;
            prop_assert_eq!(all.len(), model.batches.len());
            for (g, e) in all.iter().zip(model.batches.iter()) {
                prop_assert_eq!(g, e);
            }
            Ok(())
        })?;
    }
}

#[test]
fn appends_continue_after_torn_tail_and_offsets_stay_dense() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = LocalLogStore::open(dir.path(), LocalLogConfig::default()).unwrap();
        store.create_partition(P).await.unwrap();
        for i in 0..10 {
            append_durable(&store, batch(2, i, b"abc")).await;
        }
        drop(store);
        // Half a frame header, as a crash in the middle of a write leaves it.
        let seg = dir
            .path()
            .join(P.to_string())
            .join(format!("{:020}.log", 0));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&encode_frame(20, 1, 0, b"never acknowledged")[..17])
            .unwrap();
        drop(f);
        let store = LocalLogStore::open(dir.path(), LocalLogConfig::default()).unwrap();
        assert_eq!(store.bounds(P).await.unwrap().end_offset, 20);
        assert_eq!(append_durable(&store, batch(1, 0, b"next")).await, 20);
        let all = read_all(&store, 0).await;
        assert_eq!(all.len(), 11);
        assert_eq!(&all[10].payload[..], b"next");
    });
}

#[test]
fn damage_after_clean_shutdown_is_reported_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = LocalLogStore::open(dir.path(), LocalLogConfig::default()).unwrap();
        store.create_partition(P).await.unwrap();
        for i in 0..5 {
            append_durable(&store, batch(1, i, b"payload")).await;
        }
        store.close().await.unwrap();
        drop(store);
        let seg = dir
            .path()
            .join(P.to_string())
            .join(format!("{:020}.log", 0));
        let mut bytes = fs::read(&seg).unwrap();
        let len = bytes.len();
        bytes[len - 2] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let err = LocalLogStore::open(dir.path(), LocalLogConfig::default())
            .err()
            .expect("must fail");
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains("00000000000000000000.log"),
            "{err}"
        );
        // Nothing was touched: the file is exactly as damaged as before.
        assert_eq!(fs::read(&seg).unwrap(), bytes);
    });
}

#[test]
fn damage_in_a_sealed_segment_is_corruption_even_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = LocalLogStore::open(dir.path(), small_config()).unwrap();
        store.create_partition(P).await.unwrap();
        for i in 0..20 {
            append_durable(&store, batch(1, i, &[7u8; 50])).await;
        }
        drop(store); // crash: no clean marker
        let part_dir = dir.path().join(P.to_string());
        let seg = segment_path(&part_dir, 0);
        fs::remove_file(index_path(&part_dir, 0)).unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        bytes[40] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();
        let err = LocalLogStore::open(dir.path(), small_config())
            .err()
            .expect("must fail");
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    });
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = LocalLogStore::open(dir.path(), LocalLogConfig::default()).unwrap();
    let err = LocalLogStore::open(dir.path(), LocalLogConfig::default())
        .err()
        .expect("must fail");
    assert!(matches!(err, StorageError::Locked { .. }), "{err}");
}

#[test]
fn concurrent_appends_share_fsyncs_and_wake_watchers() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = LocalLogStore::open(dir.path(), LocalLogConfig::default()).unwrap();
        store.create_partition(P).await.unwrap();
        let mut watch = store.watch_end(P).unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut bases = Vec::new();
                for i in 0..50 {
                    let base = store
                        .append(P, batch(1, 0, &[t as u8, i as u8]))
                        .await
                        .unwrap();
                    store.wait_durable(P, base + 1).await.unwrap();
                    bases.push(base);
                }
                bases
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (0..400).collect::<Vec<i64>>());
        watch.changed().await.unwrap();
        assert_eq!(*watch.borrow(), 400);
    });
}

#[test]
fn interval_policy_acknowledges_after_the_periodic_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = LocalLogConfig {
            fsync: FsyncPolicy::Interval(Duration::from_millis(5)),
            ..LocalLogConfig::default()
        };
        let store = LocalLogStore::open(dir.path(), config).unwrap();
        store.create_partition(P).await.unwrap();
        let base = store.append(P, batch(3, 0, b"x")).await.unwrap();
        store.wait_durable(P, base + 3).await.unwrap();
        assert_eq!(store.bounds(P).await.unwrap().end_offset, 3);
    });
}

#[test]
fn time_lookup_and_time_retention() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = LocalLogStore::open(dir.path(), small_config()).unwrap();
        store.create_partition(P).await.unwrap();
        for i in 0..30 {
            append_durable(&store, batch(1, i * 10, &[1u8; 40])).await;
        }
        assert_eq!(store.offset_for_timestamp(P, 95).await.unwrap(), Some(10));
        assert_eq!(store.offset_for_timestamp(P, 10_000).await.unwrap(), None);
        let policy = RetentionPolicy {
            max_age_ms: Some(100),
            max_bytes: None,
            now_ms: 300,
        };
        let start = store.apply_retention(P, policy).await.unwrap();
        assert!(start > 0 && start <= 20, "start {start}");
        let first = store.read(P, start, 1).await.unwrap();
        assert_eq!(first[0].base_offset, start);
        assert!(matches!(
            store.read(P, 0, 1).await,
            Err(StorageError::OffsetOutOfRange { .. })
        ));
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever bytes the active segment holds, recovery never panics: after a crash it cuts
    /// the bad tail and serves what is valid; after a clean shutdown it either opens or
    /// reports corruption.
    #[test]
    fn recovery_survives_arbitrary_segment_bytes(
        valid in 0usize..4,
        junk in proptest::collection::vec(any::<u8>(), 0..300),
        clean in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            {
                let store = LocalLogStore::open(dir.path(), LocalLogConfig::default()).unwrap();
                store.create_partition(P).await.unwrap();
                for i in 0..valid {
                    append_durable(&store, batch(1, i as i64, b"ok")).await;
                }
                if clean {
                    store.close().await.unwrap();
                }
            }
            let seg = dir.path().join(P.to_string()).join(format!("{:020}.log", 0));
            let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
            f.write_all(&junk).unwrap();
            drop(f);
            match LocalLogStore::open(dir.path(), LocalLogConfig::default()) {
                Ok(store) => {
                    let end = store.bounds(P).await.unwrap().end_offset;
                    prop_assert!(end >= valid as i64);
                    let all = read_all(&store, 0).await;
                    prop_assert_eq!(all.iter().map(|b| i64::from(b.record_count)).sum::<i64>(), end);
                }
                Err(e) => {
                    prop_assert!(clean, "a crash restart must recover, got {}", e);
                    prop_assert!(matches!(e, StorageError::Corrupt { .. }), "{}", e);
                }
            }
            Ok(())
        })?;
    }
}
