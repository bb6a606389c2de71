//! Staged routed publishes and acks (AMQP `tx`) through the gRPC API: a publish to a fanout
//! address and an ack of a queue delivery commit as one unit and are there when the commit
//! answers; rollback makes none of them; an unroutable publish is counted; the unit
//! survives restarts of the core between stage and resolve and after resolve; a staged
//! transaction nobody resolves is rolled back after its timeout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tonic::service::Routes;
use tributary_core::{Core, CoreConfig};
use tributary_proto::v1::admin_client::AdminClient;
use tributary_proto::v1::queues_client::QueuesClient;
use tributary_proto::v1::transactions_client::TransactionsClient;
use tributary_proto::v1::{self, ErrorCode};
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

const DEADLINE: Duration = Duration::from_secs(10);

struct Api {
    core: Core,
    txn: TransactionsClient<Routes>,
    admin: AdminClient<Routes>,
    queues: QueuesClient<Routes>,
}

async fn open_with(dir: &Path, config: CoreConfig) -> Api {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let core = Core::open(log, meta, config).await.unwrap();
    let routes = tributary_core::grpc::routes(core.clone());
    Api {
        txn: TransactionsClient::new(routes.clone()),
        admin: AdminClient::new(routes.clone()),
        queues: QueuesClient::new(routes),
        core,
    }
}

async fn open(dir: &Path) -> Api {
    open_with(dir, CoreConfig::default()).await
}

fn qid(name: &str) -> v1::QueueId {
    v1::QueueId {
        namespace: String::new(),
        name: name.into(),
    }
}

fn code(s: &tonic::Status) -> ErrorCode {
    let d = v1::ErrorDetail::decode(s.details()).unwrap_or_default();
    ErrorCode::try_from(d.code).unwrap_or(ErrorCode::Unspecified)
}

fn publish(address: &str, key: &str, value: &str) -> v1::StagedWrite {
    v1::StagedWrite {
        write: Some(v1::staged_write::Write::Publish(v1::PublishRequest {
            address: address.into(),
            routing_key: key.into(),
            records: vec![v1::Record {
                value: Bytes::from(value.to_string()),
                ..Default::default()
            }],
            ..Default::default()
        })),
        deliver_at_ms: 0,
    }
}

fn ack(queue: &str, lease: &str) -> v1::StagedWrite {
    v1::StagedWrite {
        write: Some(v1::staged_write::Write::Ack(v1::AckRequest {
            queue: Some(qid(queue)),
            lease_ids: vec![lease.into()],
            no_wait_durable: false,
        })),
        deliver_at_ms: 0,
    }
}

impl Api {
    /// Queues `a` and `b` bound to fanout address `fx`, `src` with one message `m0`, and
    /// a direct address `dx` with no binding.
    async fn setup(&mut self) {
        for q in ["a", "b", "src"] {
            self.admin
                .declare_queue(v1::DeclareQueueRequest {
                    id: Some(qid(q)),
                    durable: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        for (name, kind) in [
            ("fx", v1::AddressKind::Fanout),
            ("dx", v1::AddressKind::Direct),
        ] {
            self.admin
                .declare_address(v1::DeclareAddressRequest {
                    name: name.into(),
                    kind: kind as i32,
                    durable: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        for q in ["a", "b"] {
            self.admin
                .bind(v1::BindRequest {
                    binding: Some(v1::Binding {
                        source_address: "fx".into(),
                        destination: Some(v1::binding::Destination::Queue(q.into())),
                        ..Default::default()
                    }),
                })
                .await
                .unwrap();
        }
        self.enqueue("src", "m0").await;
    }

    async fn enqueue(&mut self, queue: &str, value: &str) {
        self.queues
            .enqueue(v1::EnqueueRequest {
                queue: Some(qid(queue)),
                records: vec![v1::Record {
                    value: Bytes::from(value.to_string()),
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
    }

    /// Leases what is ready now (no waiting): values and lease ids.
    async fn take(&mut self, queue: &str) -> Vec<(String, String)> {
        self.queues
            .receive(v1::ReceiveRequest {
                queue: Some(qid(queue)),
                max_messages: 100,
                visibility_timeout_ms: 600_000,
                wait_time_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .messages
            .into_iter()
            .map(|m| {
                let v = m.record.unwrap_or_default().value;
                (String::from_utf8_lossy(&v).into_owned(), m.lease_id)
            })
            .collect()
    }

    async fn values(&mut self, queue: &str) -> Vec<String> {
        self.take(queue).await.into_iter().map(|(v, _)| v).collect()
    }

    /// (ready, leased) of a queue.
    async fn counts(&mut self, queue: &str) -> (i64, i64) {
        let r = self
            .admin
            .list_queues(v1::ListQueuesRequest::default())
            .await
            .unwrap()
            .into_inner();
        let q = r
            .queues
            .iter()
            .find(|q| q.id.as_ref().is_some_and(|i| i.name == queue))
            .unwrap();
        (q.messages_ready, q.messages_leased)
    }

    async fn stage(&mut self, writes: Vec<v1::StagedWrite>) -> String {
        self.txn
            .stage_messages(v1::StageMessagesRequest {
                writes,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .transaction_id
    }

    async fn resolve(
        &mut self,
        id: &str,
        commit: bool,
    ) -> Result<v1::ResolveStagedResponse, tonic::Status> {
        Ok(self
            .txn
            .resolve_staged(v1::ResolveStagedRequest {
                namespace: String::new(),
                transaction_id: id.into(),
                commit,
            })
            .await?
            .into_inner())
    }
}

#[tokio::test]
async fn a_routed_publish_and_an_ack_commit_as_one_and_roll_back_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.setup().await;
    let leased = api.take("src").await;
    assert_eq!(leased.len(), 1);
    let lease = leased[0].1.clone();

    // Rolled back: nothing published, the delivery still leased (and its lease good).
    let id = api
        .stage(vec![publish("fx", "", "rolled"), ack("src", &lease)])
        .await;
    let r = api.resolve(&id, false).await.unwrap();
    assert!(r.resolved);
    assert!(r.published.is_empty());
    assert!(api.values("a").await.is_empty());
    assert!(api.values("b").await.is_empty());
    assert_eq!(api.counts("src").await, (0, 1));

    // Staged: invisible to every reader until the commit.
    let id = api
        .stage(vec![
            publish("fx", "", "p1"),
            publish("dx", "nowhere", "lost"),
            publish("", "a", "direct-to-a"),
            ack("src", &lease),
        ])
        .await;
    assert!(api.values("a").await.is_empty());
    assert!(api.values("b").await.is_empty());
    assert_eq!(api.counts("src").await, (0, 1));

    let r = api.resolve(&id, true).await.unwrap();
    assert!(r.resolved);
    let routed: Vec<Vec<u32>> = r.published.iter().map(|p| p.routed.clone()).collect();
    assert_eq!(routed, [vec![2], vec![0], vec![1]]);
    // All of it there as the commit answers, no polling: both fanout copies, the default
    // exchange's one, and the ack.
    assert_eq!(api.values("a").await, ["p1", "direct-to-a"]);
    assert_eq!(api.values("b").await, ["p1"]);
    assert_eq!(api.counts("src").await, (0, 0));
    // The lease the transaction acked no longer holds anything.
    let expired = api
        .queues
        .ack(v1::AckRequest {
            queue: Some(qid("src")),
            lease_ids: vec![lease.clone()],
            no_wait_durable: false,
        })
        .await
        .unwrap()
        .into_inner()
        .expired;
    assert_eq!(expired, std::slice::from_ref(&lease));

    // A retried commit makes nothing twice; the other way is refused.
    let again = api.resolve(&id, true).await.unwrap();
    assert!(!again.resolved);
    let e = api.resolve(&id, false).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::TransactionAlreadyResolved, "{e:?}");
    assert_eq!(api.counts("a").await.0, 0);
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_staged_publishes_and_acks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.setup().await;
    let stage = |writes: Vec<v1::StagedWrite>| v1::StageMessagesRequest {
        writes,
        ..Default::default()
    };
    let e = api
        .txn
        .stage_messages(stage(vec![publish("no-such-exchange", "", "x")]))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::AddressNotFound, "{e:?}");
    let e = api
        .txn
        .stage_messages(stage(vec![ack("src", "not-a-lease")]))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidArgument, "{e:?}");
    // A queue gone (deleted while its deliveries were out): its acks settle nothing, and
    // do not fail the transaction (RabbitMQ takes such an ack).
    let id = api
        .stage(vec![
            ack("no-such-queue", "1-0-0"),
            publish("fx", "", "with-it"),
        ])
        .await;
    assert!(api.resolve(&id, true).await.unwrap().resolved);
    assert_eq!(api.values("a").await, ["with-it"]);
    // A lease of another queue.
    let lease = api.take("src").await[0].1.clone();
    let e = api
        .txn
        .stage_messages(stage(vec![ack("a", &lease)]))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidArgument, "{e:?}");
    // A publish with no records.
    let mut empty = publish("fx", "", "x");
    if let Some(v1::staged_write::Write::Publish(p)) = empty.write.as_mut() {
        p.records.clear();
    }
    let e = api
        .txn
        .stage_messages(stage(vec![empty]))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidArgument, "{e:?}");
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_unit_survives_restarts_before_and_after_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.setup().await;
    let lease = api.take("src").await[0].1.clone();
    let id = api
        .stage(vec![publish("fx", "", "p1"), ack("src", &lease)])
        .await;
    api.core.shutdown().await.unwrap();
    drop(api);

    // Restarted between stage and resolve: still staged, still invisible.
    let mut api = open(dir.path()).await;
    assert_eq!(api.counts("a").await, (0, 0));
    assert_eq!(api.counts("b").await, (0, 0));
    assert_eq!(api.counts("src").await.0 + api.counts("src").await.1, 1);
    let r = api.resolve(&id, true).await.unwrap();
    assert!(r.resolved);
    assert_eq!(r.published[0].routed, [2]);
    assert_eq!(api.counts("a").await, (1, 0));
    assert_eq!(api.counts("b").await, (1, 0));
    assert_eq!(api.counts("src").await, (0, 0));
    api.core.shutdown().await.unwrap();
    drop(api);

    // Restarted after the commit: exactly once each, and the ack holds.
    let mut api = open(dir.path()).await;
    assert!(!api.resolve(&id, true).await.unwrap().resolved);
    assert_eq!(api.values("a").await, ["p1"]);
    assert_eq!(api.values("b").await, ["p1"]);
    assert!(api.values("src").await.is_empty());

    // An ack whose lease ended with the process (a subscription's lease does not outlive
    // a restart): the commit after the restart still settles the message.
    api.enqueue("src", "m1").await;
    let mut sub = api.take("src").await;
    assert_eq!(sub.len(), 1);
    let lease = sub.remove(0).1;
    let id = api
        .stage(vec![publish("fx", "", "p2"), ack("src", &lease)])
        .await;
    api.core.shutdown().await.unwrap();
    drop(api);
    let mut api = open(dir.path()).await;
    // The lease (with its deadline) may or may not hold now; either way the commit takes
    // the message off the queue.
    assert!(api.resolve(&id, true).await.unwrap().resolved);
    assert_eq!(api.counts("src").await, (0, 0));
    assert_eq!(api.values("a").await, ["p2"]);
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_delayed_staged_publish_is_released_after_its_time_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.setup().await;
    let mut w = publish("fx", "", "later");
    w.deliver_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 400;
    let id = api.stage(vec![w]).await;
    let r = api.resolve(&id, true).await.unwrap();
    assert_eq!(r.published[0].routed, [2]);
    // Committed, not released yet.
    assert!(api.values("a").await.is_empty());
    api.core.shutdown().await.unwrap();
    drop(api);
    let mut api = open(dir.path()).await;
    for q in ["a", "b"] {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let got = loop {
            let got = api
                .queues
                .receive(v1::ReceiveRequest {
                    queue: Some(qid(q)),
                    max_messages: 10,
                    visibility_timeout_ms: 600_000,
                    wait_time_ms: 1_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .messages;
            if !got.is_empty() || tokio::time::Instant::now() > deadline {
                break got;
            }
        };
        assert_eq!(got.len(), 1, "queue {q}");
        assert_eq!(&got[0].record.as_ref().unwrap().value[..], b"later");
    }
    assert!(api.values("a").await.is_empty());
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_staged_transaction_nobody_resolves_is_rolled_back_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoreConfig {
        transaction_check_interval: Duration::from_millis(20),
        ..CoreConfig::default()
    };
    let mut api = open_with(dir.path(), config).await;
    api.setup().await;
    let id = api
        .txn
        .stage_messages(v1::StageMessagesRequest {
            writes: vec![publish("fx", "", "orphan")],
            timeout_ms: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .transaction_id;
    // The sweep rolls it back. Adding a write to it is the probe that does not end it:
    // refused once it ended. Each probe rewrites the transaction's record, which the sweep's
    // rollback (a compare-and-set on that record) then loses to: the probes back off, so
    // that the sweep (every 20 ms) gets quiet stretches however slow the machine is.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut pause = Duration::from_millis(10);
    loop {
        let r = api
            .txn
            .stage_messages(v1::StageMessagesRequest {
                transaction_id: id.clone(),
                writes: vec![publish("fx", "", "probe")],
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => {}
            Err(e) if code(&e) == ErrorCode::TransactionAlreadyResolved => break,
            Err(e) => panic!("{e:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never rolled back by its timeout"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    // Rolled back (not committed): a commit is refused, a rollback is a retry.
    let e = api.resolve(&id, true).await.unwrap_err();
    assert!(!api.resolve(&id, false).await.unwrap().resolved);
    assert_eq!(code(&e), ErrorCode::TransactionAlreadyResolved, "{e:?}");
    assert!(api.values("a").await.is_empty());
    api.core.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_committed_publish_into_a_full_drop_head_queue_pushes_the_oldest_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = open(dir.path()).await;
    api.admin
        .declare_queue(v1::DeclareQueueRequest {
            id: Some(qid("capped")),
            durable: true,
            config: Some(v1::QueueConfig {
                max_length: Some(2),
                overflow: Some("drop-head".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    api.enqueue("capped", "old1").await;
    api.enqueue("capped", "old2").await;
    let id = api
        .stage(vec![
            publish("", "capped", "new1"),
            publish("", "capped", "new2"),
        ])
        .await;
    assert_eq!(api.resolve(&id, true).await.unwrap().published.len(), 2);
    assert_eq!(api.values("capped").await, ["new1", "new2"]);
}
