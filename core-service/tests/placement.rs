//! A core serving one shard of a cluster refuses the units its deployment's placement gives
//! to another shard, and hands out producer ids no other shard does.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;

use tributary_core::meta::StreamSettings;
use tributary_core::{Core, CoreConfig, CoreError, Placement, Scheme};
use tributary_proto::placement::{shard_of, shard_of_unit, stream_unit};
use tributary_proto::v1;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::memory::MemoryMetaStore;
use tributary_storage::redb_meta::RedbMetaStore;
use tributary_storage::{MetaStore, PrefixedMetaStore};

const SHARDS: u32 = 2;

async fn open(dir: &Path, placement: Option<Placement>) -> Core {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let spread = placement.is_some_and(|p| p.scheme == Scheme::Stream);
    let config = CoreConfig {
        placement,
        mqtt_streams: !spread,
        stream_exchanges: !spread,
        ..CoreConfig::default()
    };
    Core::open(log, meta, config).await.unwrap()
}

fn shard(shard: u32, scheme: Scheme) -> Option<Placement> {
    Some(Placement {
        shard,
        shards: SHARDS,
        scheme,
    })
}

async fn create_stream(core: &Core, ns: &str, name: &str) -> Result<(), CoreError> {
    core.create_stream(
        v1::StreamId::new(ns, name),
        1,
        StreamSettings::default(),
        false,
        false,
    )
    .await
    .map(|_| ())
}

async fn new_pid(core: &Core) -> i64 {
    core.init_producer(v1::InitProducerRequest::default())
        .await
        .unwrap()
        .producer_id
}

/// A namespace whose home is `shard`.
fn namespace_at(shard: u32) -> String {
    (0..)
        .map(|n| format!("tenant-{n}"))
        .find(|ns| shard_of(ns, SHARDS) == shard)
        .unwrap()
}

#[tokio::test]
async fn a_shard_core_refuses_the_units_of_namespaces_placed_elsewhere() {
    let home_of_default = shard_of("default", SHARDS);
    let other = 1 - home_of_default;
    let dir = tempfile::tempdir().unwrap();
    let home = open(
        &dir.path().join("home"),
        shard(home_of_default, Scheme::Namespace),
    )
    .await;
    let away = open(&dir.path().join("away"), shard(other, Scheme::Namespace)).await;

    // Only the default namespace's home makes it.
    let names = |core: &Core| -> Vec<String> {
        core.list_namespaces().into_iter().map(|n| n.name).collect()
    };
    assert_eq!(names(&home), vec!["default".to_string()]);
    assert!(names(&away).is_empty(), "{:?}", names(&away));

    create_stream(&home, "default", "kept").await.unwrap();
    let refused = create_stream(&away, "default", "lost").await.unwrap_err();
    assert!(
        matches!(refused, CoreError::WrongShard(_, placed, served) if placed == home_of_default && served == other),
        "{refused}"
    );
    let refused = away
        .create_namespace("default", Default::default(), true)
        .await
        .unwrap_err();
    assert!(matches!(refused, CoreError::WrongShard(..)), "{refused}");
    let refused = away
        .declare_queue(v1::DeclareQueueRequest {
            id: Some(v1::QueueId {
                namespace: "default".into(),
                name: "q".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(refused, CoreError::WrongShard(..)), "{refused}");
    // An auto-created stream is refused the same way, never made in the wrong shard.
    let appended = away
        .append(v1::AppendRequest {
            stream: Some(v1::StreamId::new("default", "auto")),
            batch: Some(v1::RecordBatch {
                records: vec![v1::Record::default()],
                ..Default::default()
            }),
            auto_create: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(appended, CoreError::WrongShard(..)), "{appended}");

    // A namespace at home in the other shard is made and used there.
    let theirs = namespace_at(other);
    away.create_namespace(&theirs, Default::default(), false)
        .await
        .unwrap();
    create_stream(&away, &theirs, "events").await.unwrap();
    home.shutdown().await.unwrap();
    away.shutdown().await.unwrap();
}

#[tokio::test]
async fn under_the_stream_scheme_a_shard_holds_only_its_streams() {
    let home_of_default = shard_of("default", SHARDS);
    let dir = tempfile::tempdir().unwrap();
    let home = open(dir.path(), shard(home_of_default, Scheme::Stream)).await;
    let placement = shard(home_of_default, Scheme::Stream).unwrap();
    let (here, elsewhere): (Vec<String>, Vec<String>) = (0..16)
        .map(|n| format!("topic-{n}"))
        .partition(|t| placement.holds_stream("default", t));
    assert!(!here.is_empty() && !elsewhere.is_empty());
    create_stream(&home, "default", &here[0]).await.unwrap();
    let refused = create_stream(&home, "default", &elsewhere[0])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, CoreError::WrongShard(ref what, _, _) if what.contains(&elsewhere[0])),
        "{refused}"
    );
    home.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_shards_never_hand_out_the_same_producer_id() {
    let dir = tempfile::tempdir().unwrap();
    let single = open(&dir.path().join("single"), None).await;
    assert_eq!(
        (new_pid(&single).await, new_pid(&single).await),
        (1, 2),
        "a single core counts from 1 as before"
    );
    let a = open(&dir.path().join("a"), shard(0, Scheme::Namespace)).await;
    let b = open(&dir.path().join("b"), shard(1, Scheme::Namespace)).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..5 {
        for core in [&a, &b] {
            let pid = new_pid(core).await;
            assert!(pid > 0);
            assert!(seen.insert(pid), "producer id {pid} handed out twice");
        }
    }
    // Each shard's ids are its own residue of the shard count.
    assert_eq!(new_pid(&a).await % i64::from(SHARDS), 0);
    assert_eq!(new_pid(&b).await % i64::from(SHARDS), 1);
    for core in [single, a, b] {
        core.shutdown().await.unwrap();
    }
}

/// A shard's core on its own metadata, listing namespaces in the `catalog` all shards share.
async fn open_in_shard(
    dir: &Path,
    meta: Arc<dyn MetaStore>,
    catalog: Arc<dyn MetaStore>,
    shard: u32,
) -> Core {
    open_placed(dir, meta, catalog, shard, Scheme::Namespace).await
}

async fn open_placed(
    dir: &Path,
    meta: Arc<dyn MetaStore>,
    catalog: Arc<dyn MetaStore>,
    shard: u32,
    scheme: Scheme,
) -> Core {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let spread = scheme == Scheme::Stream;
    let config = CoreConfig {
        placement: Some(Placement {
            shard,
            shards: SHARDS,
            scheme,
        }),
        mqtt_streams: !spread,
        stream_exchanges: !spread,
        ..CoreConfig::default()
    };
    Core::open_in_shard(log, meta, catalog, config)
        .await
        .unwrap()
}

async fn all_names(core: &Core) -> Vec<String> {
    core.list_all_namespaces()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect()
}

#[tokio::test]
async fn every_shard_lists_every_namespace_from_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let shared: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let catalog: Arc<dyn MetaStore> =
        Arc::new(PrefixedMetaStore::new(shared.clone(), b"catalog/".to_vec()));
    let metas: Vec<Arc<dyn MetaStore>> = (0..SHARDS)
        .map(|s| {
            Arc::new(PrefixedMetaStore::new(
                shared.clone(),
                format!("shards/{s}/").into_bytes(),
            )) as Arc<dyn MetaStore>
        })
        .collect();
    let dirs: Vec<_> = (0..SHARDS)
        .map(|s| dir.path().join(format!("shard-{s}")))
        .collect();
    let mut cores = Vec::new();
    for s in 0..SHARDS {
        cores.push(
            open_in_shard(
                &dirs[s as usize],
                metas[s as usize].clone(),
                catalog.clone(),
                s,
            )
            .await,
        );
    }
    let (a, b) = (namespace_at(0), namespace_at(1));
    cores[0]
        .create_namespace(&a, Default::default(), false)
        .await
        .unwrap();
    cores[1]
        .create_namespace(&b, Default::default(), false)
        .await
        .unwrap();
    let mut want = vec!["default".to_string(), a.clone(), b.clone()];
    want.sort();
    for core in &cores {
        assert_eq!(all_names(core).await, want);
    }
    // Each core itself holds only its own.
    assert!(!cores[0].list_namespaces().iter().any(|n| n.name == b));

    cores[1].delete_namespace(&b).await.unwrap();
    want.retain(|n| *n != b);
    assert_eq!(all_names(&cores[0]).await, want);

    // A change that stopped between its two writes is finished when the home opens: an
    // entry without its record goes, a record without its entry gets one back.
    let home = shard_of("default", SHARDS);
    let entry = |name: &str| format!("ns/{home:06}/{name}").into_bytes();
    catalog.delete(&entry("default")).await.unwrap();
    catalog
        .put(
            &entry("ghost"),
            br#"{"name":"ghost","labels":{},"created_at_ms":0}"#,
        )
        .await
        .unwrap();
    assert!(all_names(&cores[0]).await.contains(&"ghost".to_string()));
    for core in cores.drain(..) {
        core.shutdown().await.unwrap();
        drop(core);
    }
    let reopened = open_in_shard(
        &dirs[home as usize],
        metas[home as usize].clone(),
        catalog.clone(),
        home,
    )
    .await;
    assert_eq!(all_names(&reopened).await, want);
    reopened.shutdown().await.unwrap();
}

/// A catalog in which a namespace's home unlists `key` right after the `reads`-th next read
/// of it: a delete of the namespace landing while a create on another shard runs.
struct UnlistedAfterReads {
    inner: Arc<dyn MetaStore>,
    key: Vec<u8>,
    /// Reads of `key` left before it goes; 0: never.
    reads: AtomicUsize,
}

#[async_trait::async_trait]
impl MetaStore for UnlistedAfterReads {
    async fn get(&self, key: &[u8]) -> tributary_storage::Result<Option<bytes::Bytes>> {
        let value = self.inner.get(key).await?;
        let counted = |r: usize| r.checked_sub(1);
        if key == self.key && self.reads.fetch_update(SeqCst, SeqCst, counted) == Ok(1) {
            self.inner.delete(key).await?;
        }
        Ok(value)
    }
    async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> tributary_storage::Result<Vec<(Vec<u8>, bytes::Bytes)>> {
        self.inner.scan(start, end, limit).await
    }
    async fn txn(
        &self,
        checks: Vec<tributary_storage::Check>,
        ops: Vec<tributary_storage::Op>,
    ) -> tributary_storage::Result<bool> {
        self.inner.txn(checks, ops).await
    }
}

#[tokio::test]
async fn a_stream_made_as_its_namespace_is_deleted_elsewhere_does_not_outlive_it() {
    let dir = tempfile::tempdir().unwrap();
    let shared: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let catalog: Arc<dyn MetaStore> =
        Arc::new(PrefixedMetaStore::new(shared.clone(), b"catalog/".to_vec()));
    let meta = |s: u32| -> Arc<dyn MetaStore> {
        Arc::new(PrefixedMetaStore::new(
            shared.clone(),
            format!("shards/{s}/").into_bytes(),
        ))
    };
    // A namespace homed on shard 0, and a stream of it placed on shard 1.
    let ns = namespace_at(0);
    let name = (0..)
        .map(|n| format!("topic-{n}"))
        .find(|t| shard_of_unit(Scheme::Stream, &ns, Some(&stream_unit(t)), SHARDS) == 1)
        .unwrap();
    let home = open_placed(
        &dir.path().join("s0"),
        meta(0),
        catalog.clone(),
        0,
        Scheme::Stream,
    )
    .await;
    home.create_namespace(&ns, Default::default(), false)
        .await
        .unwrap();
    let racing = Arc::new(UnlistedAfterReads {
        inner: catalog.clone(),
        key: format!("ns/{:06}/{ns}", 0).into_bytes(),
        reads: AtomicUsize::new(0),
    });
    let away = open_placed(
        &dir.path().join("s1"),
        meta(1),
        racing.clone(),
        1,
        Scheme::Stream,
    )
    .await;

    // The create found the namespace, then its home unlisted it (the first step of a
    // delete): right after the create's lookup, or between the listing's read of the entry
    // and its transaction (which then fails its check). The create fails, and nothing of the
    // stream stays to outlive the namespace.
    for reads in [1, 2] {
        racing.reads.store(reads, SeqCst);
        let refused = create_stream(&away, &ns, &name).await.unwrap_err();
        assert!(
            matches!(refused, CoreError::NamespaceNotFound(_)),
            "unlisted after {reads} reads: {refused:?}"
        );
        assert_eq!(racing.reads.load(SeqCst), 0, "unlisted after {reads} reads");
        assert!(away.list_all_streams().await.unwrap().is_empty());
        assert!(
            catalog
                .scan_prefix(b"stream/", usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        // So the home counts no stream and the delete goes through.
        home.delete_namespace(&ns).await.unwrap();
        home.create_namespace(&ns, Default::default(), false)
            .await
            .unwrap();
    }

    // Without the race, the same create lists the stream at the namespace's home.
    create_stream(&away, &ns, &name).await.unwrap();
    let listed: Vec<String> = home
        .list_streams(&ns)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id.unwrap().name)
        .collect();
    assert_eq!(listed, std::slice::from_ref(&name));

    // A listed stream holds a delete back: the home unlists the namespace, finds the stream
    // and lists the namespace again. A change to the stream made meanwhile is listed, not
    // refused.
    let entry = catalog.get(&racing.key).await.unwrap().unwrap();
    catalog.delete(&racing.key).await.unwrap();
    away.create_partitions(&v1::StreamId::new(&ns, &name), 3, false)
        .await
        .unwrap();
    let partitions: Vec<u32> = home
        .list_streams(&ns)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.partitions)
        .collect();
    catalog.put(&racing.key, &entry).await.unwrap();
    assert_eq!(partitions, [3]);
    home.shutdown().await.unwrap();
    away.shutdown().await.unwrap();
}
