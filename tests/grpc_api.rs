//! The core's gRPC API through the real server: the binary as a child process, a network
//! client, and the same calls through the in-process transport.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Server, free_port_args, http_get};
use tributary_gateway_common::{CoreClient, error_code};
use tributary_proto::v1::{self, ErrorCode};

fn sid(name: &str) -> Option<v1::StreamId> {
    Some(v1::StreamId::new("default", name))
}

fn record(value: &str) -> v1::Record {
    v1::Record {
        key: Bytes::from(format!("k-{value}")),
        value: Bytes::from(value.to_string()),
        ..Default::default()
    }
}

fn batch(values: &[&str]) -> v1::RecordBatch {
    v1::RecordBatch {
        records: values.iter().map(|v| record(v)).collect(),
        ..Default::default()
    }
}

async fn create(client: &mut CoreClient, name: &str, partitions: u32) -> v1::StreamInfo {
    client
        .admin
        .create_stream(v1::CreateStreamRequest {
            id: sid(name),
            partitions,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .stream
        .unwrap()
}

async fn append(
    client: &mut CoreClient,
    name: &str,
    partition: u32,
    b: v1::RecordBatch,
) -> Result<v1::AppendResponse, tonic::Status> {
    client
        .streams
        .append(v1::AppendRequest {
            stream: sid(name),
            partition,
            batch: Some(b),
            auto_create: false,
            defer_durable: false,
        })
        .await
        .map(|r| r.into_inner())
}

async fn fetch_all(
    client: &mut CoreClient,
    name: &str,
    partition: u32,
    from: i64,
) -> Vec<v1::RecordBatch> {
    let resp = client
        .streams
        .fetch(v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: sid(name),
                partition,
                offset: from,
                max_bytes: 0,
            }],
            max_bytes: 64 << 20,
            min_bytes: 0,
            max_wait_ms: 0,
            read_committed: false,
        })
        .await
        .unwrap()
        .into_inner();
    let p = &resp.partitions[0];
    assert_eq!(p.error, 0, "{}", p.error_message);
    p.batches.clone()
}

fn values(batches: &[v1::RecordBatch]) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| &b.records)
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_append_fetch_and_admin_over_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut c = server.client();

    let info = create(&mut c, "orders", 3).await;
    assert_eq!(info.partitions, 3);
    assert_eq!(info.partition_info.len(), 3);
    assert_eq!(info.uuid.len(), 36);
    let dup = c
        .admin
        .create_stream(v1::CreateStreamRequest {
            id: sid("orders"),
            partitions: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&dup), ErrorCode::StreamExists);
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);

    // Dense offsets: a batch of n records takes n offsets.
    let a = append(&mut c, "orders", 1, batch(&["a", "b", "c"]))
        .await
        .unwrap();
    let b = append(&mut c, "orders", 1, batch(&["d"])).await.unwrap();
    assert_eq!((a.base_offset, b.base_offset), (0, 3));
    // Opaque batches are kept byte for byte.
    let opaque = v1::RecordBatch {
        opaque: Bytes::from_static(b"\x00native-batch\xff"),
        opaque_format: "test.v1".into(),
        record_count: 2,
        ..Default::default()
    };
    let o = append(&mut c, "orders", 1, opaque).await.unwrap();
    assert_eq!(o.base_offset, 4);

    let got = fetch_all(&mut c, "orders", 1, 0).await;
    assert_eq!(values(&got), vec!["a", "b", "c", "d"]);
    assert_eq!(
        got.iter().map(|b| b.base_offset).collect::<Vec<_>>(),
        vec![0, 3, 4]
    );
    assert_eq!(&got[2].opaque[..], b"\x00native-batch\xff");
    assert_eq!(got[2].record_count, 2);
    assert!(
        got[0].records[0].timestamp_ms > 0,
        "the core stamps missing timestamps"
    );

    // Fetching mid-batch returns the whole batch that holds the offset.
    assert_eq!(fetch_all(&mut c, "orders", 1, 1).await[0].base_offset, 0);
    // Beyond the end: OFFSET_OUT_OF_RANGE in the partition's result, with the bounds.
    let resp = c
        .streams
        .fetch(v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: sid("orders"),
                partition: 1,
                offset: 99,
                max_bytes: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.partitions[0].error, ErrorCode::OffsetOutOfRange as i32);
    assert_eq!(resp.partitions[0].end_offset, 6);

    // ListOffsets: earliest, latest, by timestamp.
    let lo = |spec| v1::ListOffsetsRequest {
        stream: sid("orders"),
        partition: 1,
        spec: Some(spec),
        read_committed: false,
    };
    use v1::list_offsets_request::Spec;
    assert_eq!(
        c.streams
            .list_offsets(lo(Spec::Earliest(true)))
            .await
            .unwrap()
            .into_inner()
            .offset,
        0
    );
    assert_eq!(
        c.streams
            .list_offsets(lo(Spec::Latest(true)))
            .await
            .unwrap()
            .into_inner()
            .offset,
        6
    );
    assert_eq!(
        c.streams
            .list_offsets(lo(Spec::TimestampMs(now_ms() + 3_600_000)))
            .await
            .unwrap()
            .into_inner()
            .offset,
        -1
    );
    assert_eq!(
        c.streams
            .list_offsets(lo(Spec::TimestampMs(0)))
            .await
            .unwrap()
            .into_inner()
            .offset,
        0
    );

    // Partitions grow, configs change and are validated, records are deleted.
    let grown = c
        .admin
        .create_partitions(v1::CreatePartitionsRequest {
            id: sid("orders"),
            total_partitions: 5,
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.stream.unwrap().partitions, 5);
    let shrink = c
        .admin
        .create_partitions(v1::CreatePartitionsRequest {
            id: sid("orders"),
            total_partitions: 2,
            validate_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&shrink), ErrorCode::InvalidArgument);
    let set = v1::StreamConfig {
        retention_ms: Some(1000),
        max_message_bytes: Some(100),
        ..Default::default()
    };
    let updated = c
        .admin
        .update_stream_config(v1::UpdateStreamConfigRequest {
            id: sid("orders"),
            set: Some(set),
            reset: vec![],
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        updated.stream.unwrap().config.unwrap().retention_ms,
        Some(1000)
    );
    let too_big = append(&mut c, "orders", 0, batch(&[&"x".repeat(500)]))
        .await
        .unwrap_err();
    assert_eq!(error_code(&too_big), ErrorCode::RecordTooLarge);
    let compact = v1::StreamConfig {
        cleanup_policy: Some("compact".into()),
        ..Default::default()
    };
    let refused = c
        .admin
        .update_stream_config(v1::UpdateStreamConfigRequest {
            id: sid("orders"),
            set: Some(compact),
            reset: vec![],
            validate_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&refused), ErrorCode::Unsupported);
    let reset = c
        .admin
        .update_stream_config(v1::UpdateStreamConfigRequest {
            id: sid("orders"),
            set: None,
            reset: vec!["max_message_bytes".into()],
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reset.stream.unwrap().config.unwrap().max_message_bytes,
        Some(1_048_588)
    );
    let start = c
        .admin
        .delete_records(v1::DeleteRecordsRequest {
            id: sid("orders"),
            partition: 1,
            before_offset: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(start.start_offset, 3);
    assert_eq!(values(&fetch_all(&mut c, "orders", 1, 3).await), vec!["d"]);

    // The admin HTTP API sees the same.
    let admin = server.admin.unwrap();
    assert_eq!(http_get(admin, "/healthz").0, 200);
    let (status, body) = http_get(admin, "/api/v1/streams/default/orders");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["partitions"], 5);
    assert_eq!(json["partition_info"][1]["start_offset"], 3);
    assert_eq!(http_get(admin, "/api/v1/streams/default/nope").0, 404);
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(metrics.contains("tributary_records_in_total"), "{metrics}");
    assert!(
        metrics.contains("tributary_storage_fsync_seconds_bucket"),
        "{metrics}"
    );

    c.admin
        .delete_stream(v1::DeleteStreamRequest { id: sid("orders") })
        .await
        .unwrap();
    let gone = append(&mut c, "orders", 0, batch(&["z"]))
        .await
        .unwrap_err();
    assert_eq!(error_code(&gone), ErrorCode::StreamNotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_get_invalid_argument_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut c = server.client();
    let cases: Vec<tonic::Status> = vec![
        c.admin
            .create_stream(v1::CreateStreamRequest {
                id: None,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.admin
            .create_stream(v1::CreateStreamRequest {
                id: sid(""),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.admin
            .create_stream(v1::CreateStreamRequest {
                id: sid("bad\0name"),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.admin
            .create_stream(v1::CreateStreamRequest {
                id: sid("x"),
                partitions: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.streams
            .append(v1::AppendRequest {
                stream: sid("x"),
                batch: Some(v1::RecordBatch::default()),
                auto_create: true,
                defer_durable: false,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.streams
            .append(v1::AppendRequest {
                stream: sid("x"),
                batch: None,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.streams
            .fetch(v1::FetchRequest {
                max_wait_ms: -1,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.offsets
            .commit_offsets(v1::CommitOffsetsRequest {
                group: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.timers
            .schedule_timer(v1::ScheduleTimerRequest {
                timer: Some(v1::Timer::default()),
            })
            .await
            .unwrap_err(),
    ];
    for (i, status) in cases.iter().enumerate() {
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "case {i}: {status:?}"
        );
        assert_eq!(error_code(status), ErrorCode::InvalidArgument, "case {i}");
        assert!(!status.message().is_empty(), "case {i} has no reason");
        assert_eq!(
            status.metadata().get("tributary-error-code").unwrap(),
            "INVALID_ARGUMENT"
        );
    }
    // What this build does not implement says so, with a stable code.
    let t = c
        .transactions
        .begin_transaction(v1::BeginTransactionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(t.code(), tonic::Code::Unimplemented);
    assert_eq!(error_code(&t), ErrorCode::Unsupported);
    // The server is still fine.
    create(&mut c, "still-fine", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_long_polls_until_data_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut c = server.client();
    create(&mut c, "events", 2).await;
    let mut reader = c.clone();
    let waiting = tokio::spawn(async move {
        reader
            .streams
            .fetch(v1::FetchRequest {
                partitions: vec![
                    v1::FetchPartition {
                        stream: sid("events"),
                        partition: 0,
                        offset: 0,
                        max_bytes: 0,
                    },
                    v1::FetchPartition {
                        stream: sid("events"),
                        partition: 1,
                        offset: 0,
                        max_bytes: 0,
                    },
                ],
                max_bytes: 1 << 20,
                min_bytes: 1,
                // Far longer than the test's deadline: only a wake-up can make it return in time.
                max_wait_ms: 600_000,
                read_committed: false,
            })
            .await
            .unwrap()
            .into_inner()
    });
    // The fetch is parked; it returns only once the append below wakes it.
    append(&mut c, "events", 1, batch(&["wake"])).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("fetch was not woken")
        .unwrap();
    assert_eq!(values(&resp.partitions[1].batches), vec!["wake"]);
    assert_eq!(resp.partitions[1].end_offset, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_offsets_and_timers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = free_port_args(dir.path());
    let server = Server::start(&args);
    let mut c = server.client();
    create(&mut c, "payments", 1).await;

    let p = c
        .streams
        .init_producer(v1::InitProducerRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(p.producer_id > 0);
    let idem = |seq: i32, vals: &[&str], epoch: i32| v1::RecordBatch {
        producer_id: p.producer_id,
        producer_epoch: epoch,
        base_sequence: seq,
        ..batch(vals)
    };
    let first = append(&mut c, "payments", 0, idem(0, &["p0", "p1"], 0))
        .await
        .unwrap();
    let retry = append(&mut c, "payments", 0, idem(0, &["p0", "p1"], 0))
        .await
        .unwrap();
    assert_eq!(
        (first.base_offset, retry.base_offset, retry.duplicate),
        (0, 0, true)
    );
    let gap = append(&mut c, "payments", 0, idem(5, &["p5"], 0))
        .await
        .unwrap_err();
    assert_eq!(error_code(&gap), ErrorCode::OutOfOrderSequence);
    append(&mut c, "payments", 0, idem(2, &["p2"], 0))
        .await
        .unwrap();

    // Committed offsets with metadata.
    let commit = v1::CommitOffsetsRequest {
        group: "billing".into(),
        offsets: vec![v1::CommittedOffset {
            stream: sid("payments"),
            partition: 0,
            offset: 2,
            metadata: "cursor=α".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    c.offsets.commit_offsets(commit).await.unwrap();

    // A timer due well after the restart below.
    let due = now_ms() + 1500;
    let timer = v1::Timer {
        due_at_ms: due,
        action: Some(v1::timer::Action::Append(v1::AppendRequest {
            stream: sid("delayed"),
            partition: 0,
            batch: Some(batch(&["late"])),
            auto_create: true,
            defer_durable: false,
        })),
        ..Default::default()
    };
    let timer_id = c
        .timers
        .schedule_timer(v1::ScheduleTimerRequest { timer: Some(timer) })
        .await
        .unwrap()
        .into_inner()
        .id;
    let listed = c
        .timers
        .list_timers(v1::ListTimersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .timers
            .iter()
            .map(|t| t.id.clone())
            .collect::<Vec<_>>(),
        vec![timer_id.clone()]
    );

    // kill -9: no clean shutdown, no snapshot written at exit.
    server.kill9();
    let server = Server::start(&args);
    let mut c = server.client();

    // The producer state came back from the log: the old batch is still a duplicate.
    let again = append(&mut c, "payments", 0, idem(2, &["p2"], 0))
        .await
        .unwrap();
    assert_eq!((again.base_offset, again.duplicate), (2, true));
    let next = append(&mut c, "payments", 0, idem(3, &["p3"], 0))
        .await
        .unwrap();
    assert_eq!((next.base_offset, next.duplicate), (3, false));
    // A new epoch fences the old one.
    let bumped = c
        .streams
        .init_producer(v1::InitProducerRequest {
            producer_id: p.producer_id,
            producer_epoch: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (bumped.producer_id, bumped.producer_epoch),
        (p.producer_id, 1)
    );
    append(&mut c, "payments", 0, idem(0, &["e1"], 1))
        .await
        .unwrap();
    let fenced = append(&mut c, "payments", 0, idem(4, &["old"], 0))
        .await
        .unwrap_err();
    assert_eq!(error_code(&fenced), ErrorCode::ProducerFenced);
    assert_eq!(
        values(&fetch_all(&mut c, "payments", 0, 0).await),
        vec!["p0", "p1", "p2", "p3", "e1"]
    );

    let fetched = c
        .offsets
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "billing".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.offsets.len(), 1);
    assert_eq!(
        (
            fetched.offsets[0].offset,
            fetched.offsets[0].metadata.as_str()
        ),
        (2, "cursor=α")
    );
    let groups = c
        .admin
        .list_groups(v1::ListGroupsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        groups
            .groups
            .iter()
            .map(|g| g.group.as_str())
            .collect::<Vec<_>>(),
        vec!["billing"]
    );

    // The timer fires once, after its due time, into the auto-created stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let delivered = loop {
        if let Ok(r) = c
            .admin
            .describe_stream(v1::DescribeStreamRequest { id: sid("delayed") })
            .await
            && r.into_inner().stream.unwrap().partition_info[0].end_offset > 0
        {
            break fetch_all(&mut c, "delayed", 0, 0).await;
        }
        assert!(tokio::time::Instant::now() < deadline, "timer never fired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(values(&delivered), vec!["late"]);
    assert!(
        delivered[0].append_time_ms >= due,
        "fired early: {} < {due}",
        delivered[0].append_time_ms
    );
    assert_eq!(delivered[0].timer_id, timer_id);
    assert!(
        c.timers
            .list_timers(v1::ListTimersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .timers
            .is_empty()
    );
    assert!(
        !c.timers
            .cancel_timer(v1::CancelTimerRequest {
                namespace: String::new(),
                id: timer_id
            })
            .await
            .unwrap()
            .into_inner()
            .cancelled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_client_uses_the_same_api() {
    use std::sync::Arc;
    use tributary_core::{Core, CoreConfig};
    use tributary_storage::memory::{MemoryLogStore, MemoryMetaStore};

    let core = Core::open(
        Arc::new(MemoryLogStore::new()),
        Arc::new(MemoryMetaStore::new()),
        CoreConfig::default(),
    )
    .await
    .unwrap();
    let mut c = CoreClient::in_process(tributary_core::grpc::routes(core.clone()));
    create(&mut c, "local", 1).await;
    append(&mut c, "local", 0, batch(&["one", "two"]))
        .await
        .unwrap();
    assert_eq!(
        values(&fetch_all(&mut c, "local", 0, 0).await),
        vec!["one", "two"]
    );
    let missing = append(&mut c, "nope", 0, batch(&["x"])).await.unwrap_err();
    assert_eq!(error_code(&missing), ErrorCode::StreamNotFound);
    // A cancelled timer never fires.
    let timer = v1::Timer {
        id: "cancel-me".into(),
        due_at_ms: now_ms() + 60_000,
        action: Some(v1::timer::Action::Append(v1::AppendRequest {
            stream: sid("local"),
            partition: 0,
            batch: Some(batch(&["never"])),
            auto_create: false,
            defer_durable: false,
        })),
        ..Default::default()
    };
    c.timers
        .schedule_timer(v1::ScheduleTimerRequest {
            timer: Some(timer.clone()),
        })
        .await
        .unwrap();
    let again = c
        .timers
        .schedule_timer(v1::ScheduleTimerRequest { timer: Some(timer) })
        .await
        .unwrap_err();
    assert_eq!(error_code(&again), ErrorCode::Conflict);
    assert!(
        c.timers
            .cancel_timer(v1::CancelTimerRequest {
                namespace: String::new(),
                id: "cancel-me".into()
            })
            .await
            .unwrap()
            .into_inner()
            .cancelled
    );
    core.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_removes_whole_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    args.extend([
        "--segment-bytes".into(),
        "1048576".into(),
        "--retention-check-interval-ms".into(),
        "50".into(),
    ]);
    let server = Server::start(&args);
    let mut c = server.client();
    c.admin
        .create_stream(v1::CreateStreamRequest {
            id: sid("logs"),
            partitions: 1,
            config: Some(v1::StreamConfig {
                retention_bytes: Some(2 << 20),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let chunk = "x".repeat(64 * 1024);
    for _ in 0..80 {
        append(&mut c, "logs", 0, batch(&[&chunk])).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = c
            .admin
            .describe_stream(v1::DescribeStreamRequest { id: sid("logs") })
            .await
            .unwrap()
            .into_inner()
            .stream
            .unwrap();
        let p = &info.partition_info[0];
        assert_eq!(p.end_offset, 80);
        // Never below the bound, at any pass (a pass may run while the appends still go on,
        // so one seen dropping a segment is not yet the last: wait for the size to come down).
        assert!(
            p.size_bytes >= 2 << 20,
            "kept at least retention_bytes: {}",
            p.size_bytes
        );
        if p.size_bytes < 4 << 20 {
            assert!(p.start_offset > 0, "dropped old segments: {p:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not bring the partition under 4 MiB: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A commit leaves out the partitions whose stream or partition does not exist, naming each
/// with its code, and commits the rest; one that names only missing ones writes nothing.
#[tokio::test]
async fn commits_to_missing_streams_or_partitions_are_left_out_and_named() {
    use std::sync::Arc;
    use tributary_core::{Core, CoreConfig};
    use tributary_storage::memory::{MemoryLogStore, MemoryMetaStore};

    let core = Core::open(
        Arc::new(MemoryLogStore::new()),
        Arc::new(MemoryMetaStore::new()),
        CoreConfig::default(),
    )
    .await
    .unwrap();
    let mut c = CoreClient::in_process(tributary_core::grpc::routes(core.clone()));
    create(&mut c, "orders", 2).await;
    let offset = |stream: &str, partition: u32, offset: i64| v1::CommittedOffset {
        stream: sid(stream),
        partition,
        offset,
        leader_epoch: 4,
        ..Default::default()
    };
    let r = c
        .offsets
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "billing".into(),
            offsets: vec![
                offset("orders", 0, 3),
                offset("orders", 1, 1),
                offset("orders", 2, 1),
                offset("missing", 0, 1),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rejected: Vec<(String, u32, ErrorCode)> = r
        .rejected
        .iter()
        .map(|x| (x.stream.clone().unwrap().name, x.partition, x.error()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            ("orders".into(), 2, ErrorCode::PartitionNotFound),
            ("missing".into(), 0, ErrorCode::StreamNotFound),
        ]
    );
    assert!(r.rejected.iter().all(|x| !x.error_message.is_empty()));
    let committed = c
        .offsets
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "billing".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .offsets;
    let got: Vec<(String, u32, i64, i32)> = committed
        .iter()
        .map(|o| {
            (
                o.stream.clone().unwrap().name,
                o.partition,
                o.offset,
                o.leader_epoch,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("orders".into(), 0, 3, 4), ("orders".into(), 1, 1, 4)]
    );

    // Only missing partitions: nothing is written, so the group does not appear.
    let r = c
        .offsets
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "ghosts".into(),
            offsets: vec![offset("missing", 0, 1)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rejected.len(), 1);
    let groups = c
        .admin
        .list_groups(v1::ListGroupsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        groups.groups.iter().all(|g| g.group != "ghosts"),
        "{groups:?}"
    );
    core.shutdown().await.unwrap();
}
