use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;

fn batch(n: u32, ts: i64, body: &str) -> BatchToAppend {
    BatchToAppend {
        record_count: n,
        max_timestamp_ms: ts,
        payload: Bytes::from(body.to_string()),
    }
}

fn fs_operator(dir: &std::path::Path) -> Operator {
    Operator::via_iter("fs", [("root".to_string(), dir.display().to_string())]).unwrap()
}

/// The bucket one test's objects go to. By default a fresh directory through OpenDAL's `fs`
/// service. With `TRIBUTARY_TEST_S3_ENDPOINT`, `_BUCKET`, `_ACCESS_KEY` and `_SECRET_KEY` set
/// (`scripts/test-stores.sh s3` starts moto's S3 server and exports them; `_REGION` is
/// optional, `us-east-1` by default) a fresh prefix of that S3 bucket, opened the way the
/// server opens one (`ObjectLogStore::operator`), so that tests running in parallel, and
/// runs against the same server, never see each other's objects. The prefixes are not
/// removed afterwards: moto keeps them in memory until it stops.
///
/// `TRIBUTARY_REQUIRE_S3=1` (which that script sets) without those variables fails the test
/// instead of falling back to the filesystem, as does a partial set.
struct TestBucket {
    op: Operator,
    name: String,
    /// The `fs` bucket's directory, removed on drop.
    _dir: Option<tempfile::TempDir>,
}

impl TestBucket {
    async fn new() -> Self {
        let Some(options) = s3_options() else {
            let dir = tempfile::tempdir().unwrap();
            return Self {
                op: fs_operator(dir.path()),
                name: "fs".into(),
                _dir: Some(dir),
            };
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = format!("/object-log-tests/{}-{nanos}-{n}/", std::process::id());
        let bucket = options
            .iter()
            .find(|(k, _)| k == "bucket")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let name = format!("s3 {bucket}{root}");
        let mut options = options;
        options.push(("root".into(), root));
        let op = ObjectLogStore::operator("s3", options, &name)
            .await
            .unwrap_or_else(|e| panic!("the S3 test bucket does not answer: {e}"));
        Self {
            op,
            name,
            _dir: None,
        }
    }

    async fn open(
        &self,
        cache: impl Into<std::path::PathBuf>,
        config: ObjectLogConfig,
    ) -> Arc<ObjectLogStore> {
        ObjectLogStore::open(self.op.clone(), self.name.clone(), cache.into(), config)
            .await
            .unwrap()
    }

    /// The paths of the objects under `dir` (such as `wal/`), listed from the bucket.
    async fn objects(&self, dir: &str) -> std::collections::BTreeSet<String> {
        match self.op.list_with(dir).recursive(true).await {
            Ok(entries) => entries
                .into_iter()
                .filter(|e| e.metadata().is_file())
                .map(|e| e.path().to_string())
                .collect(),
            Err(e) if e.kind() == ::opendal::ErrorKind::NotFound => Default::default(),
            Err(e) => panic!("cannot list {dir} in {}: {e}", self.name),
        }
    }
}

/// The S3 service's options from `TRIBUTARY_TEST_S3_*`, or None when none is set and S3 is
/// not required.
fn s3_options() -> Option<Vec<(String, String)>> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let required = var("TRIBUTARY_REQUIRE_S3").is_some_and(|v| v != "0");
    let wanted = [
        ("endpoint", "TRIBUTARY_TEST_S3_ENDPOINT"),
        ("bucket", "TRIBUTARY_TEST_S3_BUCKET"),
        ("access_key_id", "TRIBUTARY_TEST_S3_ACCESS_KEY"),
        ("secret_access_key", "TRIBUTARY_TEST_S3_SECRET_KEY"),
    ];
    let found: Vec<_> = wanted.iter().map(|(_, env)| var(env)).collect();
    if !required && found.iter().all(Option::is_none) {
        return None;
    }
    let missing: Vec<&str> = wanted
        .iter()
        .zip(&found)
        .filter(|(_, v)| v.is_none())
        .map(|((_, env), _)| *env)
        .collect();
    assert!(
        missing.is_empty(),
        "the object-log tests are to run on S3 ({}) but {} unset; \
         scripts/test-stores.sh s3 starts an S3 server and sets them",
        if required {
            "TRIBUTARY_REQUIRE_S3 is set"
        } else {
            "some TRIBUTARY_TEST_S3_* variables are set"
        },
        missing.join(", ")
    );
    let mut options: Vec<(String, String)> = wanted
        .iter()
        .zip(found)
        .map(|((key, _), v)| (key.to_string(), v.unwrap_or_default()))
        .collect();
    options.extend([
        (
            "region".into(),
            var("TRIBUTARY_TEST_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
        ),
        // Only what is given here: no credentials or region from the machine's AWS config.
        ("disable_config_load".into(), "true".into()),
    ]);
    Some(options)
}

/// The end offset of the segment a `segments/<key>/<stem>.{log,idx}` object belongs to.
fn segment_end(path: &str) -> i64 {
    let log = path
        .strip_suffix(".idx")
        .map_or(path.to_string(), |s| format!("{s}.log"));
    SegmentName::parse(&log)
        .unwrap_or_else(|| panic!("{path} is not a segment object"))
        .1
        .end
}

fn config(ack: AckPoint) -> ObjectLogConfig {
    ObjectLogConfig {
        ack,
        upload_interval: Duration::from_millis(20),
        // Long enough that only explicit ship_all calls seal.
        seal_interval: Duration::from_secs(3600),
        cached_segments: 1,
        cache: LocalLogConfig {
            segment_bytes: 300,
            ..LocalLogConfig::default()
        },
        ..ObjectLogConfig::default()
    }
}

async fn append(store: &ObjectLogStore, key: PartitionKey, b: BatchToAppend) -> i64 {
    let n = i64::from(b.record_count);
    let base = store.append(key, b).await.unwrap();
    store.wait_durable(key, base + n).await.unwrap();
    base
}

async fn read_all(store: &ObjectLogStore, key: PartitionKey, from: i64) -> Vec<StoredBatch> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let batches = store.read(key, at, 100).await.unwrap();
        let Some(last) = batches.last() else { break };
        at = last.next_offset();
        out.extend(batches);
    }
    out
}

#[tokio::test]
async fn shipped_segments_serve_reads_after_eviction() {
    let bucket = TestBucket::new().await;
    let cache = tempfile::tempdir().unwrap();
    let key = PartitionKey::new(1, 0);
    let store = bucket.open(cache.path(), config(AckPoint::Local)).await;
    store.create_partition(key).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..40 {
        let body = format!("record-{i:03}-{}", "x".repeat(i % 7 * 10));
        let base = append(&store, key, batch(2, 1000 + i as i64, &body)).await;
        assert_eq!(base, i as i64 * 2);
        expected.push(body);
    }
    store.ship_all().await.unwrap();
    let shipped = store.shipped_end(key).unwrap();
    assert_eq!(shipped, 80, "every record is in a shipped segment");
    let cached_start = store.shared.cache.bounds(key).await.unwrap().start_offset;
    assert!(cached_start > 0, "old segments were evicted from the cache");
    let got = read_all(&store, key, 0).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|b| String::from_utf8(b.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(bodies, expected, "reads cross from objects into the cache");
    // A read starting inside a batch returns that batch.
    let mid = store.read(key, 5, 1).await.unwrap();
    assert_eq!(mid[0].base_offset, 4);
    assert_eq!(
        store.offset_for_timestamp(key, 1003).await.unwrap(),
        Some(6)
    );
    assert_eq!(
        store.offset_for_timestamp(key, 1039).await.unwrap(),
        Some(78)
    );
    assert_eq!(store.offset_for_timestamp(key, 5000).await.unwrap(), None);
    let b = store.bounds(key).await.unwrap();
    assert_eq!((b.start_offset, b.end_offset), (0, 80));
    // Deleting records (DeleteRecords) drops whole segments and moves the start; the
    // segment objects wholly below it are deleted from the bucket, the others stay.
    let dir = layout::segments_dir(key);
    let before = bucket.objects(&dir).await;
    assert!(
        before.iter().any(|p| segment_end(p) <= 33) && before.iter().any(|p| segment_end(p) > 33),
        "segments on both sides of offset 33 are shipped: {before:?}"
    );
    let start = store.truncate_prefix(key, 33).await.unwrap();
    assert_eq!(start, 33);
    let kept: std::collections::BTreeSet<String> = before
        .iter()
        .filter(|p| segment_end(p) > 33)
        .cloned()
        .collect();
    assert_eq!(
        bucket.objects(&dir).await,
        kept,
        "segment objects below the new start are deleted"
    );
    assert!(store.read(key, 10, 100).await.is_err());
    assert_eq!(store.read(key, 33, 1).await.unwrap()[0].base_offset, 32);
    store.close().await.unwrap();
    drop(store);
    // A restart on an empty cache finds everything shipped, from the new start.
    let empty = tempfile::tempdir().unwrap();
    let store = bucket.open(empty.path(), config(AckPoint::Local)).await;
    let b = store.bounds(key).await.unwrap();
    assert_eq!((b.start_offset, b.end_offset), (33, 80));
    let got = read_all(&store, key, 33).await;
    assert_eq!(got.first().unwrap().base_offset, 32);
    assert_eq!(got.last().unwrap().next_offset(), 80);
    assert_eq!(append(&store, key, batch(1, 1, "after")).await, 80);
    store.close().await.unwrap();
}

/// The object store stops taking WAL objects (here: `wal` is a file, so no object can be
/// written under it) and comes back: the append waiting then is refused after `ack_timeout`
/// (not acknowledged, stored later), appends during the outage are refused at once with
/// nothing written, and appends are taken again by themselves once the store is back.
///
/// Always on a filesystem bucket, also under `TRIBUTARY_REQUIRE_S3`: the outage is made by
/// replacing the bucket's `wal` directory with a file, which S3 has no equivalent of (moto
/// cannot refuse writes to one prefix). An S3 endpoint that is cut (refused, then a black
/// hole) is `scripts/test-stores.sh store_loss`.
/// A node that lost its lease but resumed after its write guard passed (a pause between the
/// check and the request) still writes WAL objects and ships segments: the successor's epoch
/// start marker makes every later node ignore them, and nothing of the successor's is
/// overwritten or shadowed.
#[tokio::test]
async fn wal_objects_a_stale_epoch_writes_after_a_takeover_are_never_replayed() {
    let bucket = tempfile::tempdir().unwrap();
    let key = PartitionKey::new(1, 0);
    let node = |epoch: u64| {
        let cache = tempfile::tempdir().unwrap();
        let bucket = bucket.path().to_path_buf();
        async move {
            let store = ObjectLogStore::open(
                fs_operator(&bucket),
                "fs",
                cache.path(),
                ObjectLogConfig {
                    epoch,
                    ..config(AckPoint::Shared)
                },
            )
            .await
            .unwrap();
            (store, cache)
        }
    };
    let (old, _old_cache) = node(1).await;
    old.create_partition(key).await.unwrap();
    append(&old, key, batch(1, 1, "epoch 1")).await;

    // Epoch 2 takes over from the bucket while the old node still runs.
    let (new, _new_cache) = node(2).await;
    assert_eq!(read_all(&new, key, 0).await.len(), 1);
    // The old node, unaware, appends, uploads and ships a segment; the new one appends at
    // the same offset.
    append(&old, key, batch(1, 2, "stale")).await;
    old.ship_all().await.unwrap();
    append(&new, key, batch(1, 3, "epoch 2")).await;
    let segments_dir = bucket.path().join("segments").join(key.to_string());
    let segment_objects = || {
        std::fs::read_dir(&segments_dir)
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert!(segment_objects() >= 1, "the old node shipped nothing");
    let wal_objects = || -> Vec<String> {
        std::fs::read_dir(bucket.path().join("wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };

    // Epoch 3 from an empty cache: the stale object is ignored (and deleted), the rest kept.
    let (third, _third_cache) = node(3).await;
    let bodies: Vec<_> = read_all(&third, key, 0)
        .await
        .into_iter()
        .map(|b| b.payload)
        .collect();
    assert_eq!(
        bodies,
        [&b"epoch 1"[..], b"epoch 2"].map(Bytes::from_static)
    );
    // The old node's WAL objects went once it shipped its segment (it collected them); the
    // new node had written "epoch 1" again under its own epoch, so nothing is missing.
    let left = wal_objects();
    assert!(
        left.iter()
            .all(|n| !n.ends_with("-00000000000000000001.wal")),
        "{left:?}"
    );
    assert_eq!(segment_objects(), 0, "the stale segment was not deleted");
    for store in [old, new, third] {
        store.close().await.unwrap();
    }
    // A writer outside the epochs, or behind the newest, is refused: its own objects would
    // be fenced out at the next start.
    for (epoch, why) in [(0, "cluster nodes wrote here"), (3, "is not above epoch 3")] {
        let cache = tempfile::tempdir().unwrap();
        let refused = ObjectLogStore::open(
            fs_operator(bucket.path()),
            "fs",
            cache.path(),
            ObjectLogConfig {
                epoch,
                ..config(AckPoint::Shared)
            },
        )
        .await;
        let e = refused.err().expect("opened a fenced bucket");
        assert!(e.to_string().contains(why), "epoch {epoch}: {e}");
    }
}

/// A cluster node that lost its lease writes no object: nothing it appends after is
/// acknowledged, and nothing lands in the bucket.
#[tokio::test]
async fn a_closed_write_guard_stops_every_object_write() {
    let bucket = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let key = PartitionKey::new(1, 0);
    let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let guard = {
        let open = open.clone();
        WriteGuard(Arc::new(move || {
            open.load(std::sync::atomic::Ordering::SeqCst)
        }))
    };
    let store = ObjectLogStore::open(
        fs_operator(bucket.path()),
        "fs",
        cache.path(),
        ObjectLogConfig {
            ack_timeout: Duration::from_millis(300),
            write_guard: Some(guard),
            ..config(AckPoint::Shared)
        },
    )
    .await
    .unwrap();
    store.create_partition(key).await.unwrap();
    append(&store, key, batch(1, 1, "held")).await;
    let listed = |dir: &str| -> Vec<_> {
        std::fs::read_dir(bucket.path().join(dir))
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default()
    };
    let wal_before = listed("wal");
    assert_eq!(wal_before.len(), 1);

    open.store(false, std::sync::atomic::Ordering::SeqCst);
    let waiting = store.append(key, batch(1, 2, "lost")).await.unwrap();
    let e = store.wait_durable(key, waiting + 1).await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e}");
    let e = store
        .create_partition(PartitionKey::new(2, 0))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("no longer holds the cluster lease"),
        "{e}"
    );
    let e = store.ship_all().await.unwrap_err();
    assert!(
        e.to_string().contains("no longer holds the cluster lease"),
        "{e}"
    );
    assert_eq!(listed("wal"), wal_before);
    assert!(listed("segments").is_empty());
    assert_eq!(listed("partitions").len(), 1);
}

#[tokio::test]
async fn shared_ack_refuses_appends_while_the_store_is_down_and_recovers() {
    let bucket = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let key = PartitionKey::new(1, 0);
    let store = ObjectLogStore::open(
        fs_operator(bucket.path()),
        "fs",
        cache.path(),
        ObjectLogConfig {
            ack_timeout: Duration::from_millis(300),
            ..config(AckPoint::Shared)
        },
    )
    .await
    .unwrap();
    store.create_partition(key).await.unwrap();
    append(&store, key, batch(1, 1, "before")).await;

    let wal = bucket.path().join("wal");
    std::fs::remove_dir_all(&wal).unwrap();
    std::fs::write(&wal, b"not a directory").unwrap();
    let waiting = store.append(key, batch(1, 2, "cut")).await.unwrap();
    let started = Instant::now();
    let e = store.wait_durable(key, waiting + 1).await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Known down: refused at once, nothing written.
    let started = Instant::now();
    for _ in 0..5 {
        let e = store.append(key, batch(1, 3, "refused")).await.unwrap_err();
        assert!(matches!(e, StorageError::Unavailable { .. }), "{e}");
    }
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(store.bounds(key).await.unwrap().end_offset, 1);

    std::fs::remove_file(&wal).unwrap();
    // The uploader retries at most 1 s apart: appends are taken again within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let base = loop {
        match store.append(key, batch(1, 4, "after")).await {
            Ok(base) => break base,
            Err(StorageError::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
            }
            Err(e) => panic!("appends not taken again after the store returned: {e}"),
        }
    };
    store.wait_durable(key, base + 1).await.unwrap();
    let bodies: Vec<_> = read_all(&store, key, 0)
        .await
        .into_iter()
        .map(|b| b.payload)
        .collect();
    assert_eq!(
        bodies,
        [&b"before"[..], b"cut", b"after"].map(Bytes::from_static)
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn shared_ack_survives_the_loss_of_the_cache() {
    let bucket = TestBucket::new().await;
    let keys = [
        PartitionKey::new(1, 0),
        PartitionKey::new(1, 1),
        PartitionKey::new(2, 0),
    ];
    {
        let cache = tempfile::tempdir().unwrap();
        let store = bucket.open(cache.path(), config(AckPoint::Shared)).await;
        for key in keys {
            store.create_partition(key).await.unwrap();
        }
        // Concurrent appends across partitions share WAL objects.
        let store = Arc::new(store);
        let mut tasks = Vec::new();
        for (k, key) in keys.into_iter().enumerate() {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..30 {
                    append(&store, key, batch(1, i, &format!("{k}-{i}"))).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Ship part of one partition so the rebuild joins segments and WAL.
        store.ship_all().await.unwrap();
        for i in 30..35 {
            append(&store, keys[0], batch(1, i, &format!("0-{i}"))).await;
        }
        // The machine is lost: no close, the cache directory is gone.
        drop(store);
    }
    let cache = tempfile::tempdir().unwrap();
    let store = bucket.open(cache.path(), config(AckPoint::Shared)).await;
    for (k, key) in keys.into_iter().enumerate() {
        let want = if k == 0 { 35 } else { 30 };
        let got = read_all(&store, key, 0).await;
        let bodies: Vec<String> = got
            .iter()
            .map(|b| String::from_utf8(b.payload.to_vec()).unwrap())
            .collect();
        let expected: Vec<String> = (0..want).map(|i| format!("{k}-{i}")).collect();
        assert_eq!(bodies, expected, "partition {key}");
    }
    assert_eq!(append(&store, keys[0], batch(1, 0, "next")).await, 35);
    store.close().await.unwrap();
}

/// Shared ack: a WAL object stays in the bucket while any batch in it is only there, and is
/// deleted once its batches are in shipped segments; retention then deletes the segment
/// objects below the new start. Each is checked by listing the bucket before and after.
#[tokio::test]
async fn wal_objects_are_collected_once_shipped_and_retention_deletes_segments() {
    let bucket = TestBucket::new().await;
    let cache = tempfile::tempdir().unwrap();
    let key = PartitionKey::new(4, 0);
    let mut cfg = config(AckPoint::Shared);
    // No segment fills up: only ship_all seals and ships, so that every acknowledgement
    // comes from a WAL object (shipping a segment also acknowledges what it holds).
    cfg.cache.segment_bytes = 1 << 20;
    let store = bucket.open(cache.path(), cfg).await;
    store.create_partition(key).await.unwrap();
    for round in 0..3i64 {
        for i in 0..10 {
            append(
                &store,
                key,
                batch(1, round * 1000 + i, &format!("{round}-{i}")),
            )
            .await;
        }
        let held = bucket.objects("wal/").await;
        assert!(
            !held.is_empty(),
            "round {round}: acknowledged batches are in WAL objects"
        );
        store.shared.collect_wal().await;
        assert_eq!(
            bucket.objects("wal/").await,
            held,
            "round {round}: WAL objects whose batches are in no shipped segment stay"
        );
        store.ship_all().await.unwrap();
        assert_eq!(store.shipped_end(key).unwrap(), (round + 1) * 10);
        let left = bucket.objects("wal/").await;
        assert!(
            left.is_empty(),
            "round {round}: WAL objects whose batches are in shipped segments are deleted: {left:?}"
        );
    }
    // Three shipped segments, [0, 10), [10, 20), [20, 30); retention by age drops the two
    // older ones (the newest unit is never dropped).
    let dir = layout::segments_dir(key);
    let before = bucket.objects(&dir).await;
    let ends: std::collections::BTreeSet<i64> = before.iter().map(|p| segment_end(p)).collect();
    assert_eq!(ends, [10, 20, 30].into(), "{before:?}");
    let policy = RetentionPolicy {
        max_age_ms: Some(1000),
        max_bytes: None,
        now_ms: 2500,
    };
    assert_eq!(store.apply_retention(key, policy).await.unwrap(), 20);
    let kept: std::collections::BTreeSet<String> = before
        .iter()
        .filter(|p| segment_end(p) > 20)
        .cloned()
        .collect();
    assert!(!kept.is_empty());
    assert_eq!(
        bucket.objects(&dir).await,
        kept,
        "retention deletes the segment objects below the new start"
    );
    let got = read_all(&store, key, 20).await;
    let bodies: Vec<_> = got.iter().map(|b| b.payload.clone()).collect();
    let want: Vec<_> = (0..10).map(|i| Bytes::from(format!("2-{i}"))).collect();
    assert_eq!(bodies, want);
    store.close().await.unwrap();
}

mod model {
    use proptest::prelude::*;

    use super::*;

    const P: PartitionKey = PartitionKey {
        stream_id: 3,
        partition: 1,
    };

    #[derive(Debug, Clone)]
    enum Action {
        Append {
            count: u32,
            ts: i64,
            len: usize,
        },
        Read {
            at_pct: u8,
            max_bytes: usize,
        },
        Truncate {
            at_pct: u8,
        },
        Retain {
            max_bytes: u64,
        },
        Ship,
        CleanRestart,
        CrashRestart,
        /// Shared ack only: the machine is lost, the cache directory with it.
        LoseCache,
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            8 => (1u32..5, 0i64..1000, 0usize..120).prop_map(|(count, ts, len)| Action::Append { count, ts, len }),
            3 => (0u8..=100, 1usize..400).prop_map(|(at_pct, max_bytes)| Action::Read { at_pct, max_bytes }),
            1 => (0u8..=100).prop_map(|at_pct| Action::Truncate { at_pct }),
            1 => (100u64..2000).prop_map(|max_bytes| Action::Retain { max_bytes }),
            2 => Just(Action::Ship),
            1 => Just(Action::CleanRestart),
            1 => Just(Action::CrashRestart),
            1 => Just(Action::LoseCache),
        ]
    }

    #[derive(Default)]
    struct Model {
        batches: Vec<StoredBatch>,
        start: i64,
        next: i64,
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    async fn run(ack: AckPoint, actions: Vec<Action>) -> Result<(), TestCaseError> {
        let bucket = TestBucket::new().await;
        let mut cache = tempfile::tempdir().unwrap();
        let open = |cache: std::path::PathBuf| bucket.open(cache, config(ack));
        let mut store = open(cache.path().to_path_buf()).await;
        store.create_partition(P).await.unwrap();
        let mut m = Model::default();
        // A hang names its step instead of stalling the test run.
        let progress = Arc::new(parking_lot::Mutex::new((
            String::new(),
            std::time::Instant::now(),
        )));
        let watched = Arc::downgrade(&progress);
        std::thread::spawn(move || {
            while let Some(p) = watched.upgrade() {
                let (step, since) = p.lock().clone();
                if since.elapsed() > Duration::from_secs(30) {
                    // Output capture is inherited by this thread and lost on abort.
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr().lock(),
                        "object log model test hangs at {step}"
                    );
                    let _ = std::fs::write(
                        std::env::temp_dir().join("object-log-model-hang.txt"),
                        &step,
                    );
                    std::process::abort();
                }
                drop(p);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        for (i, act) in actions.into_iter().enumerate() {
            *progress.lock() = (format!("step {i}: {act:?}"), std::time::Instant::now());
            match act {
                Action::Append { count, ts, len } => {
                    let payload: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                    let b = BatchToAppend {
                        record_count: count,
                        max_timestamp_ms: ts,
                        payload: payload.clone().into(),
                    };
                    let base = append(&store, P, b).await;
                    prop_assert_eq!(base, m.next);
                    m.batches.push(StoredBatch {
                        base_offset: base,
                        record_count: count,
                        max_timestamp_ms: ts,
                        payload: payload.into(),
                    });
                    m.next += i64::from(count);
                }
                Action::Read { at_pct, max_bytes } => {
                    let at = m.start + (m.next - m.start) * i64::from(at_pct) / 100;
                    let got = store.read(P, at, max_bytes).await.unwrap();
                    let expect: Vec<_> =
                        m.batches.iter().filter(|b| b.next_offset() > at).collect();
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
                    let at = m.start + (m.next - m.start) * i64::from(at_pct) / 100;
                    let start = store.truncate_prefix(P, at).await.unwrap();
                    m.start = m.start.max(at);
                    prop_assert_eq!(start, m.start);
                    m.batches.retain(|b| b.next_offset() > m.start);
                }
                Action::Retain { max_bytes } => {
                    let policy = RetentionPolicy {
                        max_age_ms: None,
                        max_bytes: Some(max_bytes),
                        now_ms: 0,
                    };
                    let start = store.apply_retention(P, policy).await.unwrap();
                    prop_assert!(start >= m.start);
                    m.start = start;
                    m.batches.retain(|b| b.next_offset() > m.start);
                }
                Action::Ship => store.ship_all().await.unwrap(),
                Action::CleanRestart => {
                    store.close().await.unwrap();
                    drop(store);
                    store = open(cache.path().to_path_buf()).await;
                }
                Action::CrashRestart => {
                    store.abandon().await;
                    drop(store);
                    store = open(cache.path().to_path_buf()).await;
                }
                Action::LoseCache => {
                    if ack != AckPoint::Shared {
                        continue;
                    }
                    store.abandon().await;
                    drop(store);
                    cache = tempfile::tempdir().unwrap();
                    store = open(cache.path().to_path_buf()).await;
                }
            }
            let bounds = store.bounds(P).await.unwrap();
            prop_assert_eq!(bounds.end_offset, m.next, "end after step {}", i);
            prop_assert_eq!(bounds.start_offset, m.start, "start after step {}", i);
        }
        *progress.lock() = ("final read and close".into(), std::time::Instant::now());
        let all = read_all(&store, P, m.start).await;
        prop_assert_eq!(all.len(), m.batches.len());
        for (g, e) in all.iter().zip(m.batches.iter()) {
            prop_assert_eq!(g, e);
        }
        store.close().await.unwrap();
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn local_ack_log_matches_model(actions in proptest::collection::vec(action(), 1..50)) {
            rt().block_on(run(AckPoint::Local, actions))?;
        }

        #[test]
        fn shared_ack_log_matches_model(actions in proptest::collection::vec(action(), 1..50)) {
            rt().block_on(run(AckPoint::Shared, actions))?;
        }
    }
}

/// With the `hdfs` feature the hdfs-native service is registered: a name node that does not
/// answer is an unreachable store named in the error, not an unknown scheme.
#[cfg(feature = "hdfs")]
#[tokio::test]
async fn hdfs_native_is_compiled_in_with_the_feature() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = vec![
        ("name_node".to_string(), format!("hdfs://127.0.0.1:{port}")),
        ("root".to_string(), "/tributary".to_string()),
    ];
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        ObjectLogStore::operator("hdfs-native", options, "hdfs test"),
    )
    .await
    .expect("the check of an unreachable name node ends")
    .unwrap_err()
    .to_string();
    assert!(err.contains("hdfs test"), "{err}");
    assert!(!err.contains("cannot configure it"), "{err}");
}

/// A write appended before a close is uploaded by the close, and waiting for it goes on
/// through the close: it is answered durable. Refused there, it would be stored all the same,
/// and a client's retry would store it twice (a shard handed to another node while writes
/// were in flight did that).
#[tokio::test]
async fn a_write_waited_for_during_a_close_is_answered_durable() {
    let bucket = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let key = PartitionKey::new(1, 0);
    let store = ObjectLogStore::open(
        fs_operator(bucket.path()),
        "fs",
        cache.path(),
        ObjectLogConfig {
            // Only the close uploads.
            upload_interval: Duration::from_secs(3600),
            ..config(AckPoint::Shared)
        },
    )
    .await
    .unwrap();
    store.create_partition(key).await.unwrap();
    let base = store.append(key, batch(1, 1, "in flight")).await.unwrap();
    assert!(*store.shared.part(key).unwrap().shared_end.borrow() <= base);
    let closing = tokio::spawn({
        let store = store.clone();
        async move { store.close().await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !store.shared.closed.load(Ordering::Acquire) {
        assert!(
            std::time::Instant::now() < deadline,
            "the close never began"
        );
        tokio::task::yield_now().await;
    }
    store.wait_durable(key, base + 1).await.unwrap();
    closing.await.unwrap().unwrap();
    // And it is in the bucket.
    let cache = tempfile::tempdir().unwrap();
    let reopened = ObjectLogStore::open(
        fs_operator(bucket.path()),
        "fs",
        cache.path(),
        config(AckPoint::Shared),
    )
    .await
    .unwrap();
    let read = read_all(&reopened, key, 0).await;
    assert_eq!(read.len(), 1);
    assert_eq!(&read[0].payload[..], b"in flight");
}
