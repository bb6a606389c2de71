//! Idempotent producer state comes back after a crash and after a clean shutdown, from
//! snapshots plus a replay of the log, on the real local storage.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tributary_core::{Core, CoreConfig, CoreError};
use tributary_proto::v1;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

async fn open(dir: &Path) -> Core {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    // Snapshot often so that both the snapshot and the replay paths are exercised.
    let config = CoreConfig {
        producer_snapshot_every: 7,
        ..CoreConfig::default()
    };
    Core::open(log, meta, config).await.unwrap()
}

fn append_req(pid: i64, seq: i32) -> v1::AppendRequest {
    v1::AppendRequest {
        stream: Some(v1::StreamId::new("default", "idem")),
        partition: 0,
        batch: Some(v1::RecordBatch {
            records: vec![v1::Record {
                value: Bytes::from(format!("seq {seq}")),
                ..Default::default()
            }],
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: seq,
            ..Default::default()
        }),
        auto_create: true,
        defer_durable: false,
    }
}

async fn check_state(core: &Core, pid: i64, next_seq: i32) {
    // The last five batches are answered as duplicates with their first offsets.
    for seq in next_seq - 5..next_seq {
        let r = core.append(append_req(pid, seq)).await.unwrap();
        assert_eq!(
            (r.base_offset, r.duplicate),
            (i64::from(seq), true),
            "seq {seq}"
        );
    }
    let older = core
        .append(append_req(pid, next_seq - 6))
        .await
        .unwrap_err();
    assert!(
        matches!(older, CoreError::OutOfOrderSequence { .. }),
        "{older}"
    );
    let gap = core
        .append(append_req(pid, next_seq + 1))
        .await
        .unwrap_err();
    assert!(matches!(gap, CoreError::OutOfOrderSequence { .. }), "{gap}");
}

#[test]
fn producer_state_survives_crash_and_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pid;
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        pid = rt.block_on(async {
            let core = open(dir.path()).await;
            let pid = core
                .init_producer(v1::InitProducerRequest::default())
                .await
                .unwrap()
                .producer_id;
            for seq in 0..30 {
                let r = core.append(append_req(pid, seq)).await.unwrap();
                assert_eq!(r.base_offset, i64::from(seq));
            }
            pid
        });
        // Dropping the runtime without a shutdown is a crash as far as the core can tell:
        // background tasks die mid-flight and no final snapshot is written.
        drop(rt);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let core = open(dir.path()).await;
        check_state(&core, pid, 30).await;
        let r = core.append(append_req(pid, 30)).await.unwrap();
        assert_eq!((r.base_offset, r.duplicate), (30, false));
        core.shutdown().await.unwrap();
    });
    rt.block_on(async {
        let core = open(dir.path()).await;
        check_state(&core, pid, 31).await;
        core.shutdown().await.unwrap();
    });
}

/// Appends made with `defer_durable` take their offsets in call order (idempotent sequences
/// checked as usual, a retry answered as a duplicate without waiting), and `wait_durable`
/// makes them durable: it refuses an end past the last append (a wait that could never
/// end), and a reopened core finds what it confirmed.
#[tokio::test]
async fn deferred_appends_keep_their_order_and_wait_durable_confirms_them() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    let deferred = |seq| v1::AppendRequest {
        defer_durable: true,
        ..append_req(1, seq)
    };
    let mut ends = Vec::new();
    for seq in 0..6 {
        let r = core.append(deferred(seq)).await.unwrap();
        assert!(!r.duplicate);
        assert_eq!(r.base_offset, i64::from(seq), "offsets in call order");
        ends.push(r.base_offset + 1);
    }
    let again = core.append(deferred(2)).await.unwrap();
    assert!(
        again.duplicate,
        "a retry of a deferred append is a duplicate"
    );
    assert_eq!(again.base_offset, 2);
    let gap = core.append(deferred(9)).await.unwrap_err();
    assert!(
        matches!(gap, CoreError::OutOfOrderSequence { .. }),
        "{gap:?}"
    );

    let wait = |end| v1::WaitDurableRequest {
        stream: Some(v1::StreamId::new("default", "idem")),
        partition: 0,
        end_offset: end,
    };
    let past = core.wait_durable(wait(7)).await.unwrap_err();
    assert!(matches!(past, CoreError::InvalidArgument(_)), "{past:?}");
    let missing = core
        .wait_durable(v1::WaitDurableRequest {
            stream: Some(v1::StreamId::new("default", "nope")),
            ..wait(1)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(missing, CoreError::StreamNotFound(_)),
        "{missing:?}"
    );
    let done = core
        .wait_durable(wait(*ends.last().unwrap()))
        .await
        .unwrap();
    assert_eq!(done.log_start_offset, 0);

    core.shutdown().await.unwrap();
    drop(core);
    let core = open(dir.path()).await;
    check_state(&core, 1, 6).await;
}
