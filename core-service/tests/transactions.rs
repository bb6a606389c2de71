//! The transaction coordinator through the core's neutral API (no Kafka): commit and abort
//! with markers, last stable offsets and aborted ranges under read_committed, staged group
//! offsets, fencing, timeouts, bad calls, and a restart in every phase that matters.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tributary_core::{Core, CoreConfig, CoreError};
use tributary_proto::v1;
use tributary_storage::MetaStore;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

fn config() -> CoreConfig {
    CoreConfig {
        transaction_max_timeout: Duration::from_secs(60),
        transaction_check_interval: Duration::from_millis(50),
        ..CoreConfig::default()
    }
}

async fn open(dir: &Path) -> Core {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    Core::open(log, meta, config()).await.unwrap()
}

fn sid(name: &str) -> v1::StreamId {
    v1::StreamId {
        namespace: String::new(),
        name: name.into(),
    }
}

async fn create(core: &Core, name: &str, partitions: u32) {
    core.create_stream(sid(name), partitions, Default::default(), false, false)
        .await
        .unwrap();
}

struct Producer {
    id: String,
    pid: i64,
    epoch: i32,
    seq: std::collections::HashMap<(String, u32), i32>,
}

impl Producer {
    async fn init(core: &Core, id: &str, timeout_ms: i32) -> Producer {
        let r = core
            .init_producer(v1::InitProducerRequest {
                namespace: String::new(),
                transactional_id: id.into(),
                producer_id: -1,
                producer_epoch: -1,
                transaction_timeout_ms: timeout_ms,
            })
            .await
            .unwrap();
        Producer {
            id: id.into(),
            pid: r.producer_id,
            epoch: r.producer_epoch,
            seq: Default::default(),
        }
    }

    fn me(&self) -> v1::TxnProducer {
        v1::TxnProducer {
            namespace: String::new(),
            transactional_id: self.id.clone(),
            producer_id: self.pid,
            producer_epoch: self.epoch,
        }
    }

    async fn add(&self, core: &Core, stream: &str, partition: u32) -> Result<(), CoreError> {
        let r = core
            .add_txn_partitions(v1::AddPartitionsRequest {
                producer: Some(self.me()),
                partitions: vec![v1::TxnPartition {
                    stream: Some(sid(stream)),
                    partition,
                }],
                verify_only: false,
            })
            .await?;
        assert!(r.results.iter().all(|p| p.error == 0), "{r:?}");
        Ok(())
    }

    async fn send(
        &mut self,
        core: &Core,
        stream: &str,
        partition: u32,
        values: &[&str],
    ) -> Result<i64, CoreError> {
        let seq = self.seq.entry((stream.into(), partition)).or_insert(0);
        let r = core
            .append(v1::AppendRequest {
                stream: Some(sid(stream)),
                partition,
                batch: Some(v1::RecordBatch {
                    records: values
                        .iter()
                        .map(|v| v1::Record {
                            value: Bytes::from(v.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                    producer_id: self.pid,
                    producer_epoch: self.epoch,
                    base_sequence: *seq,
                    transactional: true,
                    ..Default::default()
                }),
                auto_create: false,
                defer_durable: false,
            })
            .await?;
        *seq += values.len() as i32;
        Ok(r.base_offset)
    }

    async fn end(&self, core: &Core, commit: bool) -> Result<(), CoreError> {
        core.end_transaction(v1::EndTransactionRequest {
            namespace: String::new(),
            transaction_id: self.id.clone(),
            commit,
            producer_id: self.pid,
            producer_epoch: self.epoch,
        })
        .await
    }
}

async fn fetch(core: &Core, stream: &str, partition: u32, committed: bool) -> v1::FetchedPartition {
    core.fetch(v1::FetchRequest {
        partitions: vec![v1::FetchPartition {
            stream: Some(sid(stream)),
            partition,
            offset: 0,
            max_bytes: 0,
        }],
        max_bytes: 0,
        min_bytes: 0,
        max_wait_ms: 0,
        read_committed: committed,
    })
    .await
    .unwrap()
    .partitions
    .remove(0)
}

/// What a read_committed reader keeps: data batches not in an aborted range (the rule Kafka
/// clients apply with the aborted list and the markers).
fn committed_values(p: &v1::FetchedPartition) -> Vec<String> {
    let mut aborted: Vec<(i64, i64)> = p
        .aborted_transactions
        .iter()
        .map(|a| (a.producer_id, a.first_offset))
        .collect();
    let mut skipping = std::collections::HashSet::new();
    let mut out = Vec::new();
    for b in &p.batches {
        aborted.retain(|(pid, first)| {
            if *first <= b.base_offset {
                skipping.insert(*pid);
                false
            } else {
                true
            }
        });
        if b.control.is_some() {
            skipping.remove(&b.producer_id);
            continue;
        }
        if b.transactional && skipping.contains(&b.producer_id) {
            continue;
        }
        out.extend(
            b.records
                .iter()
                .map(|r| String::from_utf8_lossy(&r.value).into_owned()),
        );
    }
    out
}

fn all_values(p: &v1::FetchedPartition) -> Vec<String> {
    p.batches
        .iter()
        .filter(|b| b.control.is_none())
        .flat_map(|b| b.records.iter())
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

#[tokio::test]
async fn commit_and_abort_with_markers_stable_offsets_and_aborted_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    create(&core, "t", 2).await;
    let mut p = Producer::init(&core, "tx-1", 10_000).await;

    p.add(&core, "t", 0).await.unwrap();
    p.send(&core, "t", 0, &["a1", "a2"]).await.unwrap();
    // Open: a read_committed reader sees nothing and the stable offset holds at 0.
    let open = fetch(&core, "t", 0, true).await;
    assert_eq!(open.last_stable_offset, 0);
    assert_eq!(open.end_offset, 2);
    assert!(open.batches.is_empty());
    assert_eq!(all_values(&fetch(&core, "t", 0, false).await), ["a1", "a2"]);
    p.end(&core, false).await.unwrap();

    p.add(&core, "t", 0).await.unwrap();
    p.add(&core, "t", 1).await.unwrap();
    p.send(&core, "t", 0, &["c1"]).await.unwrap();
    p.send(&core, "t", 1, &["c2"]).await.unwrap();
    p.end(&core, true).await.unwrap();

    let p0 = fetch(&core, "t", 0, true).await;
    // a1 a2 | abort marker | c1 | commit marker
    assert_eq!(p0.end_offset, 5);
    assert_eq!(p0.last_stable_offset, 5);
    assert_eq!(p0.aborted_transactions.len(), 1);
    assert_eq!(p0.aborted_transactions[0].producer_id, p.pid);
    assert_eq!(p0.aborted_transactions[0].first_offset, 0);
    let markers: Vec<bool> = p0
        .batches
        .iter()
        .filter_map(|b| b.control.as_ref().map(|c| c.commit))
        .collect();
    assert_eq!(markers, [false, true]);
    assert_eq!(committed_values(&p0), ["c1"]);
    assert_eq!(
        all_values(&fetch(&core, "t", 0, false).await),
        ["a1", "a2", "c1"]
    );
    assert_eq!(committed_values(&fetch(&core, "t", 1, true).await), ["c2"]);

    // ListOffsets "latest" under read_committed is the stable offset.
    p.add(&core, "t", 1).await.unwrap();
    p.send(&core, "t", 1, &["open"]).await.unwrap();
    let latest = |committed| v1::ListOffsetsRequest {
        stream: Some(sid("t")),
        partition: 1,
        spec: Some(v1::list_offsets_request::Spec::Latest(true)),
        read_committed: committed,
    };
    assert_eq!(core.list_offsets(latest(true)).await.unwrap().offset, 2);
    assert_eq!(core.list_offsets(latest(false)).await.unwrap().offset, 3);
    p.end(&core, true).await.unwrap();
    assert_eq!(core.list_offsets(latest(true)).await.unwrap().offset, 4);
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn staged_offsets_are_committed_with_the_transaction_only() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    create(&core, "in", 1).await;
    create(&core, "out", 1).await;
    let mut p = Producer::init(&core, "ctp", 10_000).await;
    let offsets = |offset, me| v1::CommitTxnOffsetsRequest {
        producer: Some(me),
        group: "g".into(),
        offsets: vec![v1::CommittedOffset {
            stream: Some(sid("in")),
            partition: 0,
            offset,
            metadata: "m".into(),
            commit_time_ms: 0,
            leader_epoch: 3,
        }],
        generation: None,
        member_id: String::new(),
    };
    // Offsets for a group the transaction has not enrolled: refused.
    assert!(matches!(
        core.commit_txn_offsets(offsets(5, p.me())).await,
        Err(CoreError::InvalidTxnState(_))
    ));
    let committed = |core: Core| async move {
        core.fetch_offsets(v1::FetchOffsetsRequest {
            namespace: String::new(),
            group: "g".into(),
            partitions: vec![],
            require_stable: false,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.offset, c.leader_epoch))
        .collect::<Vec<_>>()
    };
    let add_group = |p: v1::TxnProducer| v1::AddGroupRequest {
        producer: Some(p),
        group: "g".into(),
    };
    p.add(&core, "out", 0).await.unwrap();
    p.send(&core, "out", 0, &["x"]).await.unwrap();
    core.add_txn_group(add_group(p.me())).await.unwrap();
    core.commit_txn_offsets(offsets(5, p.me())).await.unwrap();
    assert!(committed(core.clone()).await.is_empty());
    // Staged offsets are unstable for readers that ask (Kafka's require_stable).
    let stable_req = |partition| v1::FetchOffsetsRequest {
        namespace: String::new(),
        group: "g".into(),
        partitions: vec![v1::FetchPartition {
            stream: Some(sid("in")),
            partition,
            ..Default::default()
        }],
        require_stable: true,
    };
    assert_eq!(core.unstable_offsets(&stable_req(0)).len(), 1);
    assert!(core.unstable_offsets(&stable_req(1)).is_empty());
    p.end(&core, false).await.unwrap();
    assert!(
        committed(core.clone()).await.is_empty(),
        "abort applied offsets"
    );
    assert!(core.unstable_offsets(&stable_req(0)).is_empty());

    core.add_txn_group(add_group(p.me())).await.unwrap();
    p.add(&core, "out", 0).await.unwrap();
    p.send(&core, "out", 0, &["y"]).await.unwrap();
    core.commit_txn_offsets(offsets(7, p.me())).await.unwrap();
    p.end(&core, true).await.unwrap();
    assert_eq!(committed(core.clone()).await, [(7, 3)]);
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_new_producer_fences_the_old_one_and_aborts_its_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    create(&core, "t", 1).await;
    let mut old = Producer::init(&core, "zombie", 10_000).await;
    old.add(&core, "t", 0).await.unwrap();
    old.send(&core, "t", 0, &["lost"]).await.unwrap();

    let mut new = Producer::init(&core, "zombie", 10_000).await;
    assert_eq!(new.pid, old.pid);
    assert!(new.epoch > old.epoch);
    // The old producer's transaction was aborted: the stable offset moved past it.
    let p = fetch(&core, "t", 0, true).await;
    assert_eq!(p.last_stable_offset, p.end_offset);
    assert!(committed_values(&p).is_empty());
    assert_eq!(p.aborted_transactions.len(), 1);

    // Every call of the old epoch is refused as fenced, appends included.
    assert!(matches!(
        old.add(&core, "t", 0).await,
        Err(CoreError::ProducerFenced { .. })
    ));
    assert!(matches!(
        old.end(&core, true).await,
        Err(CoreError::ProducerFenced { .. })
    ));
    assert!(matches!(
        old.send(&core, "t", 0, &["late"]).await,
        Err(CoreError::ProducerFenced { .. })
    ));

    new.add(&core, "t", 0).await.unwrap();
    new.send(&core, "t", 0, &["kept"]).await.unwrap();
    new.end(&core, true).await.unwrap();
    assert_eq!(
        committed_values(&fetch(&core, "t", 0, true).await),
        ["kept"]
    );
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_calls_get_the_transaction_errors() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    create(&core, "t", 1).await;
    let too_long = core
        .init_producer(v1::InitProducerRequest {
            namespace: String::new(),
            transactional_id: "x".into(),
            producer_id: -1,
            producer_epoch: -1,
            transaction_timeout_ms: 61_000,
        })
        .await;
    assert!(matches!(
        too_long,
        Err(CoreError::InvalidTransactionTimeout { .. })
    ));
    let mut p = Producer::init(&core, "x", 10_000).await;
    // Ending with nothing open, producing to a partition not added.
    assert!(matches!(
        p.end(&core, true).await,
        Err(CoreError::InvalidTxnState(_))
    ));
    assert!(matches!(
        p.send(&core, "t", 0, &["v"]).await,
        Err(CoreError::InvalidTxnState(_))
    ));
    // An unknown partition fails the whole request: nothing enrolled.
    let r = core
        .add_txn_partitions(v1::AddPartitionsRequest {
            producer: Some(p.me()),
            partitions: vec![
                v1::TxnPartition {
                    stream: Some(sid("t")),
                    partition: 0,
                },
                v1::TxnPartition {
                    stream: Some(sid("t")),
                    partition: 9,
                },
            ],
            verify_only: false,
        })
        .await
        .unwrap();
    assert_eq!(
        r.results.iter().map(|r| r.error).collect::<Vec<_>>(),
        [
            v1::ErrorCode::Conflict as i32,
            v1::ErrorCode::PartitionNotFound as i32
        ]
    );
    assert!(p.send(&core, "t", 0, &["v"]).await.is_err());
    // A producer id that is not the transactional id's.
    let mut wrong = p.me();
    wrong.producer_id += 1000;
    assert!(matches!(
        core.add_txn_group(v1::AddGroupRequest {
            producer: Some(wrong),
            group: "g".into()
        })
        .await,
        Err(CoreError::InvalidProducerIdMapping(_))
    ));
    // Commit, then a retried commit succeeds and an abort of it is refused.
    p.add(&core, "t", 0).await.unwrap();
    p.send(&core, "t", 0, &["v"]).await.unwrap();
    p.end(&core, true).await.unwrap();
    p.end(&core, true).await.unwrap();
    assert!(matches!(
        p.end(&core, false).await,
        Err(CoreError::InvalidTxnState(_))
    ));
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_transaction_past_its_timeout_is_aborted_and_its_producer_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    create(&core, "t", 1).await;
    let mut p = Producer::init(&core, "slow", 200).await;
    p.add(&core, "t", 0).await.unwrap();
    p.send(&core, "t", 0, &["late"]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let info = core
            .describe_transactions("", &["slow".to_string()])
            .await
            .unwrap();
        if info.transactions[0].state == "CompleteAbort" {
            assert!(info.transactions[0].producer_epoch > p.epoch);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not aborted: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let f = fetch(&core, "t", 0, true).await;
    assert_eq!(f.last_stable_offset, f.end_offset);
    assert!(committed_values(&f).is_empty());
    assert!(matches!(
        p.end(&core, true).await,
        Err(CoreError::ProducerFenced { .. })
    ));
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn open_and_half_finished_transactions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    create(&core, "t", 2).await;
    let mut open_txn = Producer::init(&core, "open", 30_000).await;
    open_txn.add(&core, "t", 0).await.unwrap();
    open_txn.send(&core, "t", 0, &["o1"]).await.unwrap();
    let mut half = Producer::init(&core, "half", 30_000).await;
    half.add(&core, "t", 1).await.unwrap();
    half.send(&core, "t", 1, &["h1"]).await.unwrap();
    core.shutdown().await.unwrap();
    drop(core);

    // As if the core was killed right after recording PrepareCommit for "half".
    {
        let meta = RedbMetaStore::open(dir.path().join("meta.redb")).unwrap();
        let key =
            tributary_core::meta::key(tributary_core::meta::TRANSACTIONAL_ID, &["default", "half"]);
        let raw = meta.get(&key).await.unwrap().unwrap();
        let mut record: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(record["state"], "Ongoing");
        record["state"] = "PrepareCommit".into();
        meta.put(&key, &serde_json::to_vec(&record).unwrap())
            .await
            .unwrap();
    }

    let core = open(dir.path()).await;
    // "half" was finished by the restart: committed, readable.
    assert_eq!(committed_values(&fetch(&core, "t", 1, true).await), ["h1"]);
    let info = core
        .describe_transactions("", &["half".to_string(), "open".to_string()])
        .await
        .unwrap();
    let state = |id: &str| {
        info.transactions
            .iter()
            .find(|t| t.transactional_id == id)
            .unwrap()
            .state
            .clone()
    };
    assert_eq!(state("half"), "CompleteCommit");
    assert_eq!(state("open"), "Ongoing");
    // "open" still holds the stable offset back, and its producer can still commit it.
    let p0 = fetch(&core, "t", 0, true).await;
    assert_eq!(p0.last_stable_offset, 0);
    assert!(p0.batches.is_empty());
    open_txn.send(&core, "t", 0, &["o2"]).await.unwrap();
    open_txn.end(&core, true).await.unwrap();
    assert_eq!(
        committed_values(&fetch(&core, "t", 0, true).await),
        ["o1", "o2"]
    );
    let listed = core
        .list_transactions(&v1::ListTransactionsRequest {
            namespace: String::new(),
            states: vec!["CompleteCommit".into()],
            producer_ids: vec![],
            min_duration_ms: 0,
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    core.shutdown().await.unwrap();
    drop(core);

    // An abort recorded before the restart keeps its aborted range after it.
    let core = open(dir.path()).await;
    let mut p = Producer::init(&core, "open", 30_000).await;
    p.add(&core, "t", 0).await.unwrap();
    p.send(&core, "t", 0, &["gone"]).await.unwrap();
    p.end(&core, false).await.unwrap();
    core.shutdown().await.unwrap();
    drop(core);
    let core = open(dir.path()).await;
    let f = fetch(&core, "t", 0, true).await;
    assert_eq!(f.aborted_transactions.len(), 1);
    assert_eq!(committed_values(&f), ["o1", "o2"]);
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_transactional_id_expires_and_an_open_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let log = LocalLogStore::open(dir.path().join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.path().join("meta.redb")).unwrap());
    let core = Core::open(
        log,
        meta,
        CoreConfig {
            transactional_id_expiration: Duration::from_millis(300),
            ..config()
        },
    )
    .await
    .unwrap();
    create(&core, "t", 1).await;
    let mut idle = Producer::init(&core, "idle", 30_000).await;
    idle.add(&core, "t", 0).await.unwrap();
    idle.send(&core, "t", 0, &["done"]).await.unwrap();
    idle.end(&core, true).await.unwrap();
    let open = Producer::init(&core, "busy", 30_000).await;
    open.add(&core, "t", 0).await.unwrap();

    let ids = ["idle".to_string(), "busy".to_string()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = core.describe_transactions("", &ids).await.unwrap();
        if d.not_found == ["idle"] {
            // The open transaction is kept whatever its age (its timeout is what ends it).
            assert_eq!(d.transactions.len(), 1);
            assert_eq!(d.transactions[0].state, "Ongoing");
            break;
        }
        assert!(d.not_found.is_empty(), "{d:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never expired: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The expired id's old producer is unknown to it now; a new init starts afresh.
    assert!(matches!(
        idle.end(&core, true).await,
        Err(CoreError::InvalidProducerIdMapping(_))
    ));
    let again = Producer::init(&core, "idle", 30_000).await;
    assert_eq!(again.epoch, 0);
    assert_ne!(again.pid, idle.pid);
    core.shutdown().await.unwrap();
}
