//! Staged transactions through the gRPC API (the core's own routes as the transport, as the
//! standalone server's gateways use them): writes invisible until commit, commit exactly
//! once and retried, rollback, the other-way resolve refused, a restart between stage and
//! commit, deliver_at, and check-backs (due, not due, max_checks, two claimers).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tonic::service::Routes;
use tributary_core::{Core, CoreConfig};
use tributary_proto::v1::admin_client::AdminClient;
use tributary_proto::v1::queues_client::QueuesClient;
use tributary_proto::v1::streams_client::StreamsClient;
use tributary_proto::v1::timers_client::TimersClient;
use tributary_proto::v1::transactions_client::TransactionsClient;
use tributary_proto::v1::{self, ErrorCode};
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

const DEADLINE: Duration = Duration::from_secs(10);

struct Api {
    core: Core,
    txn: TransactionsClient<Routes>,
    streams: StreamsClient<Routes>,
    admin: AdminClient<Routes>,
    queues: QueuesClient<Routes>,
    timers: TimersClient<Routes>,
}

async fn open_with(dir: &Path, config: CoreConfig) -> Api {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let core = Core::open(log, meta, config).await.unwrap();
    let routes = tributary_core::grpc::routes(core.clone());
    Api {
        txn: TransactionsClient::new(routes.clone()),
        streams: StreamsClient::new(routes.clone()),
        admin: AdminClient::new(routes.clone()),
        queues: QueuesClient::new(routes.clone()),
        timers: TimersClient::new(routes),
        core,
    }
}

async fn open(dir: &Path) -> Api {
    open_with(dir, CoreConfig::default()).await
}

fn sid(name: &str) -> v1::StreamId {
    v1::StreamId {
        namespace: String::new(),
        name: name.into(),
    }
}

fn code(s: &tonic::Status) -> ErrorCode {
    let d = v1::ErrorDetail::decode(s.details()).unwrap_or_default();
    ErrorCode::try_from(d.code).unwrap_or(ErrorCode::Unspecified)
}

fn append(stream: &str, partition: u32, values: &[&str]) -> v1::StagedWrite {
    v1::StagedWrite {
        write: Some(v1::staged_write::Write::Append(v1::AppendRequest {
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
                ..Default::default()
            }),
            auto_create: false,
            defer_durable: false,
        })),
        deliver_at_ms: 0,
    }
}

fn stage_req(writes: Vec<v1::StagedWrite>) -> v1::StageMessagesRequest {
    v1::StageMessagesRequest {
        writes,
        ..Default::default()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

impl Api {
    async fn create_stream(&mut self, name: &str, partitions: u32) {
        self.admin
            .create_stream(v1::CreateStreamRequest {
                id: Some(sid(name)),
                partitions,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn stage(&mut self, req: v1::StageMessagesRequest) -> Result<String, tonic::Status> {
        Ok(self
            .txn
            .stage_messages(req)
            .await?
            .into_inner()
            .transaction_id)
    }

    async fn resolve(&mut self, id: &str, commit: bool) -> Result<bool, tonic::Status> {
        Ok(self
            .txn
            .resolve_staged(v1::ResolveStagedRequest {
                namespace: String::new(),
                transaction_id: id.into(),
                commit,
            })
            .await?
            .into_inner()
            .resolved)
    }

    async fn claim(
        &mut self,
        recheck_after_ms: i64,
        max_checks: u32,
    ) -> v1::ClaimStagedChecksResponse {
        self.txn
            .claim_staged_checks(v1::ClaimStagedChecksRequest {
                namespace: String::new(),
                limit: 0,
                recheck_after_ms,
                max_checks,
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Every record value of a partition, in offset order, with each batch's append time.
    async fn values(&mut self, stream: &str, partition: u32) -> Vec<(String, i64)> {
        let r = self
            .streams
            .fetch(v1::FetchRequest {
                partitions: vec![v1::FetchPartition {
                    stream: Some(sid(stream)),
                    partition,
                    offset: 0,
                    max_bytes: 0,
                }],
                max_bytes: 1 << 20,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let p = &r.partitions[0];
        if p.error == ErrorCode::StreamNotFound as i32 {
            return Vec::new(); // not made yet (an auto_create write)
        }
        assert_eq!(p.error, 0, "{p:?}");
        p.batches
            .iter()
            .flat_map(|b| {
                b.records.iter().map(|rec| {
                    (
                        String::from_utf8_lossy(&rec.value).into_owned(),
                        b.append_time_ms,
                    )
                })
            })
            .collect()
    }

    /// Polls until the partition holds `n` records (or the deadline passes).
    async fn wait_values(&mut self, stream: &str, partition: u32, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let v = self.values(stream, partition).await;
            if v.len() >= n {
                return v.into_iter().map(|(s, _)| s).collect();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {v:?} after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn pending_timers(&mut self) -> Vec<v1::Timer> {
        self.timers
            .list_timers(v1::ListTimersRequest {
                namespace: String::new(),
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .timers
    }

    /// Polls until no timer is pending: every committed write has been made.
    async fn wait_timers_done(&mut self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !self.pending_timers().await.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "timers never fired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn commit_makes_the_writes_visible_once_and_rollback_never() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.create_stream("t", 2).await;
    let a = api
        .stage(stage_req(vec![
            append("t", 0, &["a1", "a2"]),
            append("t", 1, &["a3"]),
        ]))
        .await
        .unwrap();
    let b = api
        .stage(stage_req(vec![append("t", 0, &["b1"])]))
        .await
        .unwrap();
    assert_ne!(a, b);
    // Invisible to every reader, and not even a timer yet.
    assert!(api.values("t", 0).await.is_empty());
    assert!(api.values("t", 1).await.is_empty());
    assert!(api.pending_timers().await.is_empty());

    assert!(api.resolve(&a, true).await.unwrap());
    assert!(api.resolve(&b, false).await.unwrap());
    assert_eq!(api.wait_values("t", 0, 2).await, ["a1", "a2"]);
    assert_eq!(api.wait_values("t", 1, 1).await, ["a3"]);
    api.wait_timers_done().await;

    // Retries answer resolved = false and write nothing again.
    assert!(!api.resolve(&a, true).await.unwrap());
    assert!(!api.resolve(&b, false).await.unwrap());
    // The other way is refused.
    let e = api.resolve(&a, false).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::TransactionAlreadyResolved, "{e:?}");
    let e = api.resolve(&b, true).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::TransactionAlreadyResolved, "{e:?}");
    // An ended transaction takes no more writes.
    let e = api
        .stage(v1::StageMessagesRequest {
            transaction_id: a.clone(),
            ..stage_req(vec![append("t", 0, &["late"])])
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::TransactionAlreadyResolved, "{e:?}");
    // Unknown ids.
    let e = api.resolve("st-nope", true).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::TransactionNotFound, "{e:?}");
    let e = api
        .stage(v1::StageMessagesRequest {
            transaction_id: "st-nope".into(),
            ..stage_req(vec![append("t", 0, &["x"])])
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::TransactionNotFound, "{e:?}");

    api.wait_timers_done().await;
    let v0: Vec<String> = api.values("t", 0).await.into_iter().map(|v| v.0).collect();
    assert_eq!(
        v0,
        ["a1", "a2"],
        "b's rolled-back write or a second copy of a's"
    );
    assert_eq!(api.values("t", 1).await.len(), 1);
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn writes_added_later_fire_in_order_and_an_enqueue_reaches_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.create_stream("t", 1).await;
    api.admin
        .declare_queue(v1::DeclareQueueRequest {
            id: Some(v1::QueueId {
                namespace: String::new(),
                name: "q".into(),
            }),
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let id = api
        .stage(stage_req(vec![append("t", 0, &["1"])]))
        .await
        .unwrap();
    let mut more: Vec<_> = (2..=12)
        .map(|i| append("t", 0, &[&i.to_string()]))
        .collect();
    more.push(v1::StagedWrite {
        write: Some(v1::staged_write::Write::Enqueue(v1::EnqueueRequest {
            queue: Some(v1::QueueId {
                namespace: String::new(),
                name: "q".into(),
            }),
            records: vec![v1::Record {
                value: Bytes::from_static(b"queued"),
                ..Default::default()
            }],
        })),
        deliver_at_ms: 0,
    });
    let again = api
        .txn
        .stage_messages(v1::StageMessagesRequest {
            transaction_id: id.clone(),
            ..stage_req(more)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.transaction_id, id);
    let receive = v1::ReceiveRequest {
        queue: Some(v1::QueueId {
            namespace: String::new(),
            name: "q".into(),
        }),
        max_messages: 10,
        visibility_timeout_ms: 30_000,
        wait_time_ms: 0,
        ..Default::default()
    };
    let none = api.queues.receive(receive.clone()).await.unwrap();
    assert!(none.into_inner().messages.is_empty());

    assert!(api.resolve(&id, true).await.unwrap());
    let want: Vec<String> = (1..=12).map(|i| i.to_string()).collect();
    assert_eq!(api.wait_values("t", 0, 12).await, want);
    let got = api
        .queues
        .receive(v1::ReceiveRequest {
            wait_time_ms: 10_000,
            ..receive
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.messages.len(), 1);
    assert_eq!(
        &got.messages[0].record.as_ref().unwrap().value[..],
        b"queued"
    );
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_stagings_are_refused_with_a_clear_code() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.create_stream("t", 1).await;
    let cases: Vec<(v1::StageMessagesRequest, ErrorCode)> = vec![
        (stage_req(vec![]), ErrorCode::InvalidArgument),
        (
            stage_req(vec![v1::StagedWrite::default()]),
            ErrorCode::InvalidArgument,
        ),
        (
            stage_req(vec![append("missing", 0, &["x"])]),
            ErrorCode::StreamNotFound,
        ),
        (
            stage_req(vec![append("t", 3, &["x"])]),
            ErrorCode::PartitionNotFound,
        ),
        (
            stage_req(vec![append("t", 0, &[])]),
            ErrorCode::InvalidArgument,
        ),
        (
            v1::StageMessagesRequest {
                namespace: "nowhere".into(),
                ..stage_req(vec![append("t", 0, &["x"])])
            },
            ErrorCode::NamespaceNotFound,
        ),
        (
            v1::StageMessagesRequest {
                check_after_ms: -1,
                ..stage_req(vec![append("t", 0, &["x"])])
            },
            ErrorCode::InvalidArgument,
        ),
        (
            stage_req(vec![v1::StagedWrite {
                write: Some(v1::staged_write::Write::Enqueue(v1::EnqueueRequest {
                    queue: Some(v1::QueueId {
                        namespace: String::new(),
                        name: "noqueue".into(),
                    }),
                    records: vec![v1::Record::default()],
                })),
                deliver_at_ms: 0,
            }]),
            ErrorCode::QueueNotFound,
        ),
    ];
    for (req, want) in cases {
        let e = api.stage(req.clone()).await.unwrap_err();
        assert_eq!(code(&e), want, "{req:?}: {e:?}");
    }
    // An idempotent or transactional batch is not a staged write.
    let mut w = append("t", 0, &["x"]);
    if let Some(v1::staged_write::Write::Append(a)) = &mut w.write {
        a.batch.as_mut().unwrap().producer_id = 5;
    }
    let e = api.stage(stage_req(vec![w])).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidArgument);
    // Another namespace's stream.
    let mut w = append("t", 0, &["x"]);
    if let Some(v1::staged_write::Write::Append(a)) = &mut w.write {
        a.stream.as_mut().unwrap().namespace = "other".into();
    }
    let e = api.stage(stage_req(vec![w])).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidArgument);

    // auto_create: accepted for a missing stream, which the commit creates.
    let mut w = append("auto", 0, &["made"]);
    if let Some(v1::staged_write::Write::Append(a)) = &mut w.write {
        a.auto_create = true;
    }
    let id = api.stage(stage_req(vec![w])).await.unwrap();
    let e = api
        .streams
        .fetch(v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: Some(sid("auto")),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.partitions[0].error, ErrorCode::StreamNotFound as i32);
    assert!(api.resolve(&id, true).await.unwrap());
    assert_eq!(api.wait_values("auto", 0, 1).await, ["made"]);
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn staged_writes_survive_a_restart_and_commit_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.create_stream("t", 1).await;
    let id = api
        .stage(v1::StageMessagesRequest {
            owner: "pg".into(),
            context: Bytes::from_static(b"ctx"),
            check_after_ms: 60_000,
            ..stage_req(vec![append("t", 0, &["r1", "r2"])])
        })
        .await
        .unwrap();
    api.core.shutdown().await.unwrap();
    drop(api);

    let mut api = open(dir.path()).await;
    assert!(api.values("t", 0).await.is_empty());
    assert!(api.resolve(&id, true).await.unwrap());
    assert_eq!(api.wait_values("t", 0, 2).await, ["r1", "r2"]);
    api.wait_timers_done().await;
    api.core.shutdown().await.unwrap();
    drop(api);

    // The outcome survives too, and the writes are not made twice.
    let mut api = open(dir.path()).await;
    assert!(!api.resolve(&id, true).await.unwrap());
    let e = api.resolve(&id, false).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::TransactionAlreadyResolved);
    api.wait_timers_done().await;
    assert_eq!(api.values("t", 0).await.len(), 2);

    // Committed but not made yet (a delivery time) when the core stops: made after it.
    let mut w = append("t", 0, &["r3"]);
    w.deliver_at_ms = now_ms() + 300;
    let id = api.stage(stage_req(vec![w])).await.unwrap();
    assert!(api.resolve(&id, true).await.unwrap());
    api.core.shutdown().await.unwrap();
    drop(api);
    let mut api = open(dir.path()).await;
    assert_eq!(api.wait_values("t", 0, 3).await, ["r1", "r2", "r3"]);
    api.wait_timers_done().await;
    assert_eq!(api.values("t", 0).await.len(), 3);
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn deliver_at_holds_a_committed_write_until_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.create_stream("t", 1).await;
    let at = now_ms() + 700;
    let mut later = append("t", 0, &["later"]);
    later.deliver_at_ms = at;
    let id = api
        .stage(stage_req(vec![append("t", 0, &["now"]), later]))
        .await
        .unwrap();
    assert!(api.resolve(&id, true).await.unwrap());
    assert_eq!(api.wait_values("t", 0, 1).await, ["now"]);
    // The delayed write waits in a timer due at its time.
    let timers = api.pending_timers().await;
    if now_ms() < at {
        assert_eq!(timers.len(), 1, "{timers:?}");
        assert_eq!(timers[0].due_at_ms, at);
    }
    assert_eq!(api.wait_values("t", 0, 2).await, ["now", "later"]);
    let v = api.values("t", 0).await;
    assert!(v[1].1 >= at, "made at {} before its time {at}", v[1].1);
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn outcomes_are_forgotten_after_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open_with(
        dir.path(),
        CoreConfig {
            staged_outcome_retention: Duration::from_millis(100),
            transaction_check_interval: Duration::from_millis(20),
            ..CoreConfig::default()
        },
    )
    .await;
    api.create_stream("t", 1).await;
    let id = api
        .stage(stage_req(vec![append("t", 0, &["x"])]))
        .await
        .unwrap();
    assert!(api.resolve(&id, false).await.unwrap());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match api.resolve(&id, false).await {
            Ok(resolved) => assert!(!resolved),
            Err(e) => {
                assert_eq!(code(&e), ErrorCode::TransactionNotFound, "{e:?}");
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never forgotten");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn check_backs_are_due_claimed_once_and_discarded_after_max_checks() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.create_stream("t", 1).await;
    // Never checked: no owner, or no delay.
    api.stage(v1::StageMessagesRequest {
        check_after_ms: 1,
        ..stage_req(vec![append("t", 0, &["x"])])
    })
    .await
    .unwrap();
    api.stage(v1::StageMessagesRequest {
        owner: "pg".into(),
        ..stage_req(vec![append("t", 0, &["x"])])
    })
    .await
    .unwrap();
    // Not due for a minute.
    let later = api
        .stage(v1::StageMessagesRequest {
            owner: "pg".into(),
            check_after_ms: 60_000,
            ..stage_req(vec![append("t", 0, &["x"])])
        })
        .await
        .unwrap();
    // Due at once.
    let staged_at = now_ms();
    let due = api
        .txn
        .stage_messages(v1::StageMessagesRequest {
            owner: "pg".into(),
            context: Bytes::from_static(b"half message"),
            check_after_ms: 1,
            ..stage_req(vec![append("t", 0, &["x"])])
        })
        .await
        .unwrap()
        .into_inner();
    assert!(due.staged_at_ms >= staged_at);

    let deadline = tokio::time::Instant::now() + DEADLINE;
    let first = loop {
        let c = api.claim(60_000, 0).await;
        assert!(c.discarded.is_empty());
        if !c.checks.is_empty() {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline, "never due");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(first.checks.len(), 1, "{first:?}");
    let c = &first.checks[0];
    assert_eq!(c.transaction_id, due.transaction_id);
    assert_eq!(c.owner, "pg");
    assert_eq!(&c.context[..], b"half message");
    assert_eq!(c.checks, 1);
    assert_eq!(c.staged_at_ms, due.staged_at_ms);
    // Claimed: not handed out again within the recheck interval.
    let again = api.claim(60_000, 0).await;
    assert!(
        again.checks.is_empty() && again.discarded.is_empty(),
        "{again:?}"
    );

    // Checked twice without an answer, then rolled back.
    let quick = api
        .stage(v1::StageMessagesRequest {
            owner: "pg".into(),
            check_after_ms: 1,
            ..stage_req(vec![append("t", 0, &["x"])])
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let c = api.claim(1, 2).await;
        for chk in &c.checks {
            assert_eq!(chk.transaction_id, quick);
            seen.push(chk.checks);
        }
        if c.discarded.contains(&quick) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never discarded");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(seen, [1, 2]);
    let e = api.resolve(&quick, true).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::TransactionAlreadyResolved);
    assert!(!api.resolve(&quick, false).await.unwrap());

    // An answered transaction is not checked any more.
    assert!(api.resolve(&later, false).await.unwrap());
    assert!(api.resolve(&due.transaction_id, true).await.unwrap());
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_claimers_never_get_the_same_check_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.create_stream("t", 1).await;
    let mut ids = HashSet::new();
    for _ in 0..40 {
        ids.insert(
            api.stage(v1::StageMessagesRequest {
                owner: "pg".into(),
                check_after_ms: 1,
                ..stage_req(vec![append("t", 0, &["x"])])
            })
            .await
            .unwrap(),
        );
    }
    let claimer = |mut c: TransactionsClient<Routes>| async move {
        let mut got = Vec::new();
        for _ in 0..200 {
            let r = c
                .claim_staged_checks(v1::ClaimStagedChecksRequest {
                    namespace: String::new(),
                    limit: 3,
                    recheck_after_ms: 60_000,
                    max_checks: 0,
                })
                .await
                .unwrap()
                .into_inner();
            got.extend(r.checks.into_iter().map(|c| c.transaction_id));
            tokio::task::yield_now().await;
        }
        got
    };
    let (a, b) = tokio::join!(
        tokio::spawn(claimer(api.txn.clone())),
        tokio::spawn(claimer(api.txn.clone()))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut all: Vec<String> = a.iter().chain(b.iter()).cloned().collect();
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        total,
        "a check was handed out twice: {a:?} {b:?}"
    );
    assert_eq!(all.into_iter().collect::<HashSet<_>>(), ids);
    api.core.shutdown().await.unwrap();
}
