//! Which log partitions a start may delete: those of a create or delete a crash interrupted,
//! never data that the metadata store in use merely does not know (a wrong store).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tributary_core::meta::{self, StreamSettings};
use tributary_core::{Core, CoreConfig, CoreError};
use tributary_proto::v1;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;
use tributary_storage::{LogStore, MetaStore, PartitionKey};

fn stores(dir: &Path, meta_file: &str) -> (Arc<dyn LogStore>, Arc<RedbMetaStore>) {
    let log: Arc<dyn LogStore> =
        LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join(meta_file)).unwrap());
    (log, meta)
}

async fn open(dir: &Path, meta_file: &str) -> Result<Core, CoreError> {
    let (log, meta) = stores(dir, meta_file);
    Core::open(log, meta, CoreConfig::default()).await
}

fn append(stream: &str, value: &str) -> v1::AppendRequest {
    v1::AppendRequest {
        stream: Some(v1::StreamId::new("default", stream)),
        partition: 0,
        batch: Some(v1::RecordBatch {
            records: vec![v1::Record {
                value: Bytes::from(value.to_string()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        auto_create: false,
        defer_durable: false,
    }
}

async fn create(core: &Core, name: &str) {
    core.create_stream(
        v1::StreamId::new("default", name),
        1,
        StreamSettings::default(),
        false,
        false,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_start_on_a_metadata_store_that_knows_nothing_refuses_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path(), "meta.redb").await.unwrap();
    create(&core, "kept").await;
    assert_eq!(
        core.append(append("kept", "first"))
            .await
            .unwrap()
            .base_offset,
        0
    );
    core.shutdown().await.unwrap();
    drop(core);

    // The same log with another (empty) metadata store: a wrong meta_url or namespace.
    let err = match open(dir.path(), "other-meta.redb").await {
        Ok(_) => panic!("a start with an empty metadata store over a full log was accepted"),
        Err(e) => e,
    };
    assert!(
        matches!(err, CoreError::LogWithoutMetadata { partitions: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("meta_url"), "{err}");
    // Nothing was written to that store either (not even the default namespace).
    let other = RedbMetaStore::open(dir.path().join("other-meta.redb")).unwrap();
    assert!(other.scan_prefix(b"", 10).await.unwrap().is_empty());
    drop(other);

    // With the right store the record is still there: the next append lands after it.
    let core = open(dir.path(), "meta.redb").await.unwrap();
    assert_eq!(
        core.append(append("kept", "second"))
            .await
            .unwrap()
            .base_offset,
        1
    );
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn interrupted_creates_are_removed_and_unknown_partitions_are_kept_out_of_the_way() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path(), "meta.redb").await.unwrap();
    create(&core, "s").await;
    core.shutdown().await.unwrap();
    drop(core);

    // What a crash leaves: partitions of id 900 with the create's intent, and partitions of
    // ids 500 and 1000 that nothing names (another deployment's, say).
    {
        let (log, meta) = stores(dir.path(), "meta.redb");
        for key in [
            PartitionKey::new(900, 0),
            PartitionKey::new(500, 0),
            PartitionKey::new(1000, 0),
        ] {
            log.create_partition(key).await.unwrap();
        }
        meta.put(
            &meta::key("logintent", &["00000000000000000900"]),
            b"create",
        )
        .await
        .unwrap();
    }

    let core = open(dir.path(), "meta.redb").await.unwrap();
    create(&core, "after").await;
    assert_eq!(
        core.append(append("after", "x")).await.unwrap().base_offset,
        0
    );
    core.shutdown().await.unwrap();
    drop(core);

    let (log, meta) = stores(dir.path(), "meta.redb");
    let parts = log.list_partitions().await.unwrap();
    assert!(!parts.contains(&PartitionKey::new(900, 0)), "{parts:?}");
    assert!(parts.contains(&PartitionKey::new(500, 0)), "{parts:?}");
    assert!(parts.contains(&PartitionKey::new(1000, 0)), "{parts:?}");
    // The stream made after the start took an id past every partition in the log.
    let newest = parts.iter().map(|k| k.stream_id).max().unwrap();
    assert!(newest > 1000, "{parts:?}");
    // The intent is gone once its partitions are.
    assert!(
        meta.scan_prefix(&meta::key("logintent", &[]), 10)
            .await
            .unwrap()
            .is_empty()
    );
}
