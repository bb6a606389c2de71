//! The queue engine through the gRPC `Queues` and `Admin` APIs, from a plain tonic client
//! (no gateway): leases with deadlines, stale leases, change-lease, FIFO groups, dedup,
//! delays, dead letters with their reason, redrive, bad input, and all of it across
//! `kill -9` of the core.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::queue_api::{Api, api, qid, text};
use common::{Server, free_port_args};
use tributary_gateway_common::error_code;
use tributary_proto::v1::{self, ErrorCode};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn rec(value: &str) -> v1::Record {
    v1::Record {
        value: Bytes::from(value.to_string()),
        ..Default::default()
    }
}

fn rec_with(value: &str, props: v1::SystemProperties) -> v1::Record {
    v1::Record {
        properties: Some(props),
        ..rec(value)
    }
}

fn start(dir: &std::path::Path) -> Server {
    Server::start(&free_port_args(dir))
}

#[tokio::test]
async fn a_lease_expires_and_another_consumer_gets_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    let mut b = api(&server).await;
    a.declare("work", v1::QueueConfig::default()).await;
    let sent = a.send("work", vec![rec("one")]).await;
    assert_eq!(sent.message_ids, vec![0]);

    let first = a.receive("work", 10, 400, 0).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].delivery_count, 1);
    assert!(!first[0].redelivered);
    // Leased: nobody else sees it.
    assert!(b.receive("work", 10, 400, 0).await.is_empty());
    // Another connection long-polls; the expiry of the lease wakes it.
    let started = now_ms();
    let second = b.receive("work", 10, 30_000, 10_000).await;
    assert_eq!(second.len(), 1);
    assert_eq!(text(&second[0]), "one");
    assert_eq!(second[0].delivery_count, 2);
    assert!(second[0].redelivered);
    assert!(now_ms() >= first[0].lease_expires_at_ms);
    assert!(now_ms() - started < 9_000);
    // The first lease is stale: its ack does not settle the message.
    let expired = a.ack("work", &[&first[0]]).await;
    assert_eq!(expired, vec![first[0].lease_id.clone()]);
    assert_eq!(a.info("work").await.messages_leased, 1);
    // The live one does, from a different connection than the one that received it.
    assert!(a.ack("work", &[&second[0]]).await.is_empty());
    let info = a.info("work").await;
    assert_eq!((info.messages_ready, info.messages_leased), (0, 0));
}

#[tokio::test]
async fn change_lease_extends_and_releases() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("ext", v1::QueueConfig::default()).await;
    a.send("ext", vec![rec("x"), rec("y")]).await;
    let got = a.receive("ext", 2, 500, 0).await;
    assert_eq!(got.len(), 2);
    // Extend x well past its first deadline; release y at once.
    a.queues
        .change_lease(v1::ChangeLeaseRequest {
            queue: qid("ext"),
            lease_ids: vec![got[0].lease_id.clone()],
            visibility_timeout_ms: 60_000,
        })
        .await
        .unwrap();
    a.queues
        .change_lease(v1::ChangeLeaseRequest {
            queue: qid("ext"),
            lease_ids: vec![got[1].lease_id.clone()],
            visibility_timeout_ms: 0,
        })
        .await
        .unwrap();
    let again = a.receive("ext", 10, 500, 0).await;
    assert_eq!(again.iter().map(text).collect::<Vec<_>>(), vec!["y"]);
    // Past x's first deadline (y's new lease of 500 ms expires too; wait for that one).
    let y3 = a.receive_n("ext", 1, 60_000, Duration::from_secs(20)).await;
    assert_eq!(text(&y3[0]), "y");
    assert!(now_ms() > got[0].lease_expires_at_ms);
    assert!(
        a.receive("ext", 10, 500, 0).await.is_empty(),
        "x is still leased"
    );
    assert!(a.ack("ext", &[&got[0]]).await.is_empty());
    // A stale lease cannot be changed: LEASE_EXPIRED.
    let err = a
        .queues
        .change_lease(v1::ChangeLeaseRequest {
            queue: qid("ext"),
            lease_ids: vec![got[1].lease_id.clone()],
            visibility_timeout_ms: 1_000,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&err), ErrorCode::LeaseExpired);
}

fn grouped(value: &str, group: &str) -> v1::Record {
    rec_with(
        value,
        v1::SystemProperties {
            message_group: group.into(),
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn fifo_groups_keep_order_while_other_groups_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "orders.fifo",
        v1::QueueConfig {
            fifo: Some(true),
            ..Default::default()
        },
    )
    .await;
    a.send(
        "orders.fifo",
        vec![
            grouped("a1", "a"),
            grouped("a2", "a"),
            grouped("b1", "b"),
            grouped("a3", "a"),
            grouped("b2", "b"),
            grouped("c1", "c"),
        ],
    )
    .await;
    // A receive takes a group's messages in order, several at once (SQS's batches).
    let first = a.receive("orders.fifo", 2, 30_000, 0).await;
    assert_eq!(first.iter().map(text).collect::<Vec<_>>(), vec!["a1", "a2"]);
    // Group a is held by a1 and a2: a3 waits; b and c go on.
    let got = a.receive("orders.fifo", 10, 30_000, 0).await;
    assert_eq!(
        got.iter().map(text).collect::<Vec<_>>(),
        vec!["b1", "b2", "c1"],
        "the other groups, in order"
    );
    a.ack("orders.fifo", &[&got[0], &got[1], &got[2]]).await;
    // a1 given back while a2 is out: nothing of group a goes.
    a.queues
        .nack(v1::NackRequest {
            queue: qid("orders.fifo"),
            lease_ids: vec![first[0].lease_id.clone()],
            requeue: true,
            delay_ms: 0,
        })
        .await
        .unwrap();
    assert!(a.receive("orders.fifo", 10, 30_000, 0).await.is_empty());
    a.queues
        .nack(v1::NackRequest {
            queue: qid("orders.fifo"),
            lease_ids: vec![first[1].lease_id.clone()],
            requeue: true,
            delay_ms: 0,
        })
        .await
        .unwrap();
    let m = a.receive("orders.fifo", 10, 30_000, 0).await;
    assert_eq!(
        m.iter().map(text).collect::<Vec<_>>(),
        vec!["a1", "a2", "a3"],
        "group a again, from a1, in order"
    );
}

/// FIFO with delay (docs/compat/mapping.md): a delayed message joins its message group when
/// it is due, behind what the group holds then; until then the group's other messages go.
#[tokio::test]
async fn fifo_with_delay_a_delayed_message_joins_its_group_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "steps.fifo",
        v1::QueueConfig {
            fifo: Some(true),
            ..Default::default()
        },
    )
    .await;
    let due = now_ms() + 2_000;
    let mut later = grouped("a1-later", "a");
    later.properties.as_mut().unwrap().deliver_at_ms = due;
    a.send(
        "steps.fifo",
        vec![later, grouped("a2", "a"), grouped("b1", "b")],
    )
    .await;
    // The delayed message holds nothing back: a2 and b1 go at once.
    let first = a.receive("steps.fifo", 10, 60_000, 0).await;
    assert_eq!(first.iter().map(text).collect::<Vec<_>>(), vec!["a2", "b1"]);
    a.ack("steps.fifo", &[&first[1]]).await;
    // Due while a2 is still out: it waits behind a2, as any message of the group would.
    let held = a.receive("steps.fifo", 10, 60_000, 4_000).await;
    assert!(now_ms() >= due, "the long poll ended early");
    assert!(held.is_empty(), "delivered while its group was held");
    a.ack("steps.fifo", &[&first[0]]).await;
    let last = a.receive("steps.fifo", 10, 60_000, 5_000).await;
    assert_eq!(last.iter().map(text).collect::<Vec<_>>(), vec!["a1-later"]);
}

fn dedup(value: &str, id: &str) -> v1::Record {
    rec_with(
        value,
        v1::SystemProperties {
            dedup_id: id.into(),
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn dedup_drops_a_resend_inside_the_window_and_accepts_it_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "dd",
        v1::QueueConfig {
            dedup_window_ms: Some(1_500),
            ..Default::default()
        },
    )
    .await;
    let before_first = now_ms();
    let first = a.send("dd", vec![dedup("v1", "id-1")]).await;
    assert_eq!(first.duplicate, vec![false]);
    let resend = a
        .send("dd", vec![dedup("v1", "id-1"), dedup("v2", "id-2")])
        .await;
    assert_eq!(resend.duplicate, vec![true, false]);
    assert_eq!(resend.message_ids[0], -1);
    assert_eq!(a.info("dd").await.messages_ready, 2);
    // After the window the id is new again. Waiting out a window is the behaviour under
    // test (there is no event to wait for), so poll until the resend is accepted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = a.send("dd", vec![dedup("v1 again", "id-1")]).await;
        if !r.duplicate[0] {
            assert!(
                now_ms() >= before_first + 1_500,
                "accepted inside the window"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the dedup window never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.info("dd").await.messages_ready, 3);
}

#[tokio::test]
async fn a_delayed_message_waits_for_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("later", v1::QueueConfig::default()).await;
    let due = now_ms() + 1_000;
    let r = a
        .send(
            "later",
            vec![
                rec_with(
                    "delayed",
                    v1::SystemProperties {
                        deliver_at_ms: due,
                        ..Default::default()
                    },
                ),
                rec("now"),
            ],
        )
        .await;
    assert_eq!(r.message_ids[0], -1, "waits in the timer service");
    // Counted as delayed while it waits, also after a restart.
    let info = a.info("later").await;
    assert_eq!((info.messages_ready, info.messages_delayed), (1, 1));
    server.kill9();
    let server = start(dir.path());
    let mut a = api(&server).await;
    assert_eq!(a.info("later").await.messages_delayed, 1);
    let first = a.receive("later", 10, 30_000, 0).await;
    assert_eq!(first.iter().map(text).collect::<Vec<_>>(), vec!["now"]);
    let got = a
        .receive_n("later", 1, 30_000, Duration::from_secs(20))
        .await;
    assert_eq!(text(&got[0]), "delayed");
    assert!(now_ms() >= due, "delivered before its time");
    assert_eq!(a.info("later").await.messages_delayed, 0);
}

#[tokio::test]
async fn dead_letters_after_max_deliveries_with_reason_and_redrive_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("jobs-dlq", v1::QueueConfig::default()).await;
    a.declare(
        "jobs",
        v1::QueueConfig {
            max_delivery_count: Some(2),
            dead_letter_queue: Some("jobs-dlq".into()),
            ..Default::default()
        },
    )
    .await;
    a.send("jobs", vec![rec("poison"), rec("fine")]).await;
    // Two deliveries, each lease expiring.
    let one = a.receive("jobs", 1, 200, 0).await;
    assert_eq!(text(&one[0]), "poison");
    let fine = a.receive("jobs", 1, 60_000, 0).await;
    assert_eq!(text(&fine[0]), "fine");
    a.ack("jobs", &[&fine[0]]).await;
    let two = a.receive_n("jobs", 1, 200, Duration::from_secs(20)).await;
    assert_eq!(two[0].delivery_count, 2);
    // The third attempt moves it to the dead-letter queue instead.
    let dead = a
        .receive_n("jobs-dlq", 1, 60_000, Duration::from_secs(20))
        .await;
    assert_eq!(text(&dead[0]), "poison");
    let p = dead[0].record.as_ref().unwrap().properties.clone().unwrap();
    assert_eq!(p.dead_letter_reason, "max-deliveries");
    assert_eq!(p.dead_letter_queue, "jobs");
    assert_eq!(p.dead_letter_delivery_count, 2);
    assert!(a.receive("jobs", 10, 1_000, 0).await.is_empty());
    // Give it back to the DLQ, then redrive it to where it came from.
    a.queues
        .nack(v1::NackRequest {
            queue: qid("jobs-dlq"),
            lease_ids: vec![dead[0].lease_id.clone()],
            requeue: true,
            delay_ms: 0,
        })
        .await
        .unwrap();
    let task = a
        .queues
        .start_redrive(v1::StartRedriveRequest {
            source: qid("jobs-dlq"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let back = a
        .receive_n("jobs", 1, 60_000, Duration::from_secs(20))
        .await;
    assert_eq!(text(&back[0]), "poison");
    assert_eq!(
        back[0].delivery_count, 1,
        "a redriven message starts afresh"
    );
    // The task reports what it did.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = a
            .queues
            .list_redrives(v1::ListRedrivesRequest {
                source: qid("jobs-dlq"),
            })
            .await
            .unwrap()
            .into_inner()
            .tasks;
        let t = tasks.iter().find(|t| t.task_id == task).unwrap();
        if t.status == "COMPLETED" {
            assert_eq!((t.moved, t.to_move), (1, 1));
            break;
        }
        assert_eq!(t.status, "RUNNING");
        assert!(Instant::now() < deadline, "the redrive never completed");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn bad_input_gets_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("q", v1::QueueConfig::default()).await;
    let missing = a
        .queues
        .receive(v1::ReceiveRequest {
            queue: qid("nope"),
            max_messages: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&missing), ErrorCode::QueueNotFound);
    let enqueue_missing = a
        .queues
        .enqueue(v1::EnqueueRequest {
            queue: qid("nope"),
            records: vec![rec("x")],
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&enqueue_missing), ErrorCode::QueueNotFound);
    let bad_lease = a
        .queues
        .ack(v1::AckRequest {
            queue: qid("q"),
            lease_ids: vec!["not-a-lease".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&bad_lease), ErrorCode::InvalidArgument);
    for vis in [-1, 13 * 3600 * 1000] {
        let e = a
            .queues
            .receive(v1::ReceiveRequest {
                queue: qid("q"),
                max_messages: 1,
                visibility_timeout_ms: vis,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            error_code(&e),
            ErrorCode::InvalidArgument,
            "visibility {vis}"
        );
    }
    a.send("q", vec![rec("m")]).await;
    let m = a.receive("q", 1, 10_000, 0).await;
    let huge = a
        .queues
        .change_lease(v1::ChangeLeaseRequest {
            queue: qid("q"),
            lease_ids: vec![m[0].lease_id.clone()],
            visibility_timeout_ms: i64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&huge), ErrorCode::InvalidArgument);
    let long_id = a
        .queues
        .enqueue(v1::EnqueueRequest {
            queue: qid("q"),
            records: vec![dedup("x", &"d".repeat(129))],
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&long_id), ErrorCode::InvalidArgument);
    let conflicting = a
        .admin
        .declare_queue(v1::DeclareQueueRequest {
            id: qid("q"),
            config: Some(v1::QueueConfig {
                fifo: Some(true),
                ..Default::default()
            }),
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&conflicting), ErrorCode::QueueExists);
    // Nothing else was affected: the leased message is still there and acks.
    assert!(a.ack("q", &[&m[0]]).await.is_empty());
}

#[tokio::test]
async fn overflow_purge_list_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "bounded",
        v1::QueueConfig {
            max_length: Some(2),
            overflow: Some("reject-publish".into()),
            ..Default::default()
        },
    )
    .await;
    a.send("bounded", vec![rec("1"), rec("2")]).await;
    let full = a
        .queues
        .enqueue(v1::EnqueueRequest {
            queue: qid("bounded"),
            records: vec![rec("3")],
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&full), ErrorCode::QueueFull);
    a.declare(
        "head",
        v1::QueueConfig {
            max_length: Some(2),
            overflow: Some("drop-head".into()),
            ..Default::default()
        },
    )
    .await;
    a.send("head", vec![rec("1"), rec("2"), rec("3")]).await;
    let got = a.receive("head", 10, 30_000, 0).await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), vec!["2", "3"]);

    let listed = a
        .admin
        .list_queues(v1::ListQueuesRequest {
            namespace: "default".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .queues;
    let names: Vec<_> = listed
        .iter()
        .map(|q| q.id.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, vec!["bounded", "head"]);
    let purged = a
        .admin
        .purge_queue(v1::PurgeQueueRequest { id: qid("bounded") })
        .await
        .unwrap()
        .into_inner()
        .messages_purged;
    assert_eq!(purged, 2);
    assert!(a.receive("bounded", 10, 1_000, 0).await.is_empty());
    a.admin
        .delete_queue(v1::DeleteQueueRequest {
            id: qid("head"),
            ..Default::default()
        })
        .await
        .unwrap();
    let gone = a
        .queues
        .ack(v1::AckRequest {
            queue: qid("head"),
            lease_ids: vec![got[0].lease_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&gone), ErrorCode::QueueNotFound);
}

#[tokio::test]
async fn publish_to_the_default_address_reaches_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("inbox", v1::QueueConfig::default()).await;
    let routed = a
        .streams
        .publish(v1::PublishRequest {
            namespace: "default".into(),
            address: String::new(),
            routing_key: "inbox".into(),
            records: vec![rec("hello")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .routed;
    assert_eq!(routed, vec![1]);
    let got = a.receive("inbox", 1, 30_000, 0).await;
    assert_eq!(text(&got[0]), "hello");
    let unroutable = a
        .streams
        .publish(v1::PublishRequest {
            namespace: "default".into(),
            address: String::new(),
            routing_key: "nowhere".into(),
            records: vec![rec("lost?")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .routed;
    assert_eq!(unroutable, vec![0]);
}

/// Everything above holds across `kill -9` of the core: acked messages stay gone, leases
/// keep their deadlines and delivery counts, dead letters and their reasons stay, delayed
/// messages still come at their time, dedup ids are remembered, FIFO order holds.
#[tokio::test]
async fn the_queue_engine_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("k-dlq", v1::QueueConfig::default()).await;
    a.declare(
        "k",
        v1::QueueConfig {
            max_delivery_count: Some(1),
            dead_letter_queue: Some("k-dlq".into()),
            dedup_window_ms: Some(600_000),
            ..Default::default()
        },
    )
    .await;
    a.declare(
        "k.fifo",
        v1::QueueConfig {
            fifo: Some(true),
            ..Default::default()
        },
    )
    .await;
    let values: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    a.send(
        "k",
        values
            .iter()
            .map(|v| dedup(v, &format!("id-{v}")))
            .collect(),
    )
    .await;
    // m0..m9 acked; m10 leased for a long time; m11 rejected into the DLQ.
    let got = a.receive("k", 12, 600_000, 0).await;
    assert_eq!(got.len(), 12);
    let acked: Vec<&v1::LeasedMessage> = got[..10].iter().collect();
    assert!(a.ack("k", &acked).await.is_empty());
    a.queues
        .nack(v1::NackRequest {
            queue: qid("k"),
            lease_ids: vec![got[11].lease_id.clone()],
            requeue: false,
            delay_ms: 0,
        })
        .await
        .unwrap();
    let due = now_ms() + 1_500;
    a.send(
        "k",
        vec![rec_with(
            "late",
            v1::SystemProperties {
                deliver_at_ms: due,
                ..Default::default()
            },
        )],
    )
    .await;
    a.send(
        "k.fifo",
        vec![grouped("g1", "g"), grouped("g2", "g"), grouped("h1", "h")],
    )
    .await;
    // g1 alone, then (group g held) h1.
    let mut fifo = a.receive("k.fifo", 1, 600_000, 0).await;
    fifo.extend(a.receive("k.fifo", 10, 600_000, 0).await);
    assert_eq!(fifo.iter().map(text).collect::<Vec<_>>(), vec!["g1", "h1"]);
    drop(a);
    server.kill9();

    let server = start(dir.path());
    let mut a = api(&server).await;
    let info = a.info("k").await;
    assert_eq!(info.messages_leased, 1, "m10's lease survived");
    // The dedup ids survived: resending m0 is a duplicate.
    assert_eq!(
        a.send("k", vec![dedup("m0", "id-m0")]).await.duplicate,
        vec![true]
    );
    // m12..m49 and then the delayed one; never m0..m11.
    let rest = a.receive_n("k", 39, 600_000, Duration::from_secs(30)).await;
    let mut texts: Vec<String> = rest.iter().map(text).collect();
    assert_eq!(texts.pop().as_deref(), Some("late"));
    assert_eq!(texts, values[12..].to_vec());
    assert!(now_ms() >= due);
    // The lease of m10 still holds its message; its lease id still acks it.
    assert!(a.ack("k", &[&got[10]]).await.is_empty());
    let dead = a.receive("k-dlq", 10, 60_000, 0).await;
    assert_eq!(dead.iter().map(text).collect::<Vec<_>>(), vec!["m11"]);
    let p = dead[0].record.as_ref().unwrap().properties.clone().unwrap();
    assert_eq!(p.dead_letter_reason, "rejected");
    // FIFO: group g still held by g1's lease, h done with after its ack.
    assert!(a.ack("k.fifo", &[&fifo[1]]).await.is_empty());
    assert!(a.receive("k.fifo", 10, 600_000, 0).await.is_empty());
    assert!(a.ack("k.fifo", &[&fifo[0]]).await.is_empty());
    let g2 = a.receive("k.fifo", 10, 600_000, 0).await;
    assert_eq!(g2.iter().map(text).collect::<Vec<_>>(), vec!["g2"]);
}

/// A lease that was running when the core died still expires by its deadline afterwards,
/// and the message comes back with its delivery count carried over.
#[tokio::test]
async fn a_lease_expires_after_kill_9_with_its_count() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("e", v1::QueueConfig::default()).await;
    a.send("e", vec![rec("x")]).await;
    let first = a.receive("e", 1, 1_500, 0).await;
    assert_eq!(first[0].delivery_count, 1);
    drop(a);
    server.kill9();
    let server = start(dir.path());
    let mut a = api(&server).await;
    let again = a.receive_n("e", 1, 30_000, Duration::from_secs(20)).await;
    assert!(now_ms() >= first[0].lease_expires_at_ms);
    assert_eq!(again[0].delivery_count, 2);
    assert_eq!(
        a.ack("e", &[&first[0]]).await,
        vec![first[0].lease_id.clone()]
    );
}

fn subscribe_start(
    queue: &str,
    credit: u32,
    auto_ack: bool,
    exclusive: bool,
) -> v1::SubscribeRequest {
    v1::SubscribeRequest {
        item: Some(v1::subscribe_request::Item::Start(v1::SubscribeStart {
            source: Some(v1::subscribe_start::Source::Queue(qid(queue).unwrap())),
            consumer: "test".into(),
            initial_credit: credit,
            auto_ack,
            exclusive,
            visibility_timeout_ms: 0,
            release_on_close: true,
            ..Default::default()
        })),
    }
}

async fn next_message(events: &mut tonic::Streaming<v1::SubscribeEvent>) -> v1::LeasedMessage {
    let event = tokio::time::timeout(Duration::from_secs(20), events.message())
        .await
        .expect("a message within 20 s")
        .unwrap()
        .expect("the stream is open");
    match event.event {
        Some(v1::subscribe_event::Event::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn subscriptions_push_within_credit_and_release_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("push", v1::QueueConfig::default()).await;
    a.send("push", (0..5).map(|i| rec(&format!("p{i}"))).collect())
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe_start("push", 2, false, true))
        .await
        .unwrap();
    let mut events = a
        .queues
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let m0 = next_message(&mut events).await;
    let m1 = next_message(&mut events).await;
    assert_eq!((text(&m0), text(&m1)), ("p0".into(), "p1".into()));
    // Out of credit: the rest stay ready (and an exclusive subscription keeps others out).
    let mut other = api(&server).await;
    let refused = other
        .queues
        .receive(v1::ReceiveRequest {
            queue: qid("push"),
            max_messages: 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&refused), ErrorCode::Conflict);
    assert_eq!(a.info("push").await.messages_ready, 3);
    // Settled from another connection; more credit brings the next ones.
    assert!(other.ack("push", &[&m0]).await.is_empty());
    tx.send(v1::SubscribeRequest {
        item: Some(v1::subscribe_request::Item::Credit(2)),
    })
    .await
    .unwrap();
    let m2 = next_message(&mut events).await;
    let m3 = next_message(&mut events).await;
    assert_eq!((text(&m2), text(&m3)), ("p2".into(), "p3".into()));
    // The consumer goes away: its unsettled leases (p1, p2, p3) are released at once.
    drop(tx);
    drop(events);
    // The core notices the end of the stream on its own time: wait for that (bounded).
    a.wait_info("push", "the end of the subscription", |i| {
        i.consumers == 0 && i.messages_leased == 0
    })
    .await;
    let back = a
        .receive_n("push", 4, 30_000, Duration::from_secs(20))
        .await;
    let mut texts: Vec<String> = back.iter().map(text).collect();
    texts.sort();
    assert_eq!(texts, vec!["p1", "p2", "p3", "p4"]);
    assert!(
        back.iter()
            .filter(|m| text(m) != "p4")
            .all(|m| m.delivery_count == 2)
    );
}

#[tokio::test]
async fn a_subscription_ended_by_its_consumer_keeps_its_leases_and_announces_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("keep", v1::QueueConfig::default()).await;
    a.send("keep", (0..3).map(|i| rec(&format!("k{i}"))).collect())
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut start = subscribe_start("keep", 2, false, false);
    if let Some(v1::subscribe_request::Item::Start(s)) = start.item.as_mut() {
        s.announce_start = true;
    }
    tx.send(start).await.unwrap();
    let mut events = a
        .queues
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().expect("an event");
    assert_eq!(first.event, Some(v1::subscribe_event::Event::Started(true)));
    let m0 = next_message(&mut events).await;
    let m1 = next_message(&mut events).await;
    // The consumer ends the subscription itself (AMQP basic.cancel): `ended` comes, no
    // more deliveries, and its two leases stay with it while it keeps the stream open.
    tx.send(v1::SubscribeRequest {
        item: Some(v1::subscribe_request::Item::End(true)),
    })
    .await
    .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), events.message())
        .await
        .expect("the end is answered within 20 s")
        .unwrap()
        .expect("an event");
    assert_eq!(end.event, Some(v1::subscribe_event::Event::Ended(true)));
    a.wait_info("keep", "the end of the subscription", |i| i.consumers == 0)
        .await;
    let info = a.info("keep").await;
    assert_eq!((info.messages_leased, info.messages_ready), (2, 1));
    assert!(
        a.ack("keep", &[&m0]).await.is_empty(),
        "its lease still holds"
    );
    // The consumer goes away without settling the other (a killed gateway looks the same):
    // that lease goes back, and the next consumer gets it as a redelivery.
    drop((tx, events));
    a.wait_info("keep", "the closed subscription's lease back", |i| {
        (i.messages_leased, i.messages_ready) == (0, 2)
    })
    .await;
    let back = a.receive("keep", 10, 30_000, 0).await;
    let mut texts: Vec<String> = back.iter().map(text).collect();
    texts.sort();
    assert_eq!(texts, vec![text(&m1), "k2".to_string()]);
    let again = back.iter().find(|m| text(m) == text(&m1)).unwrap();
    assert_eq!(again.delivery_count, 2);
}

#[tokio::test]
async fn auto_ack_subscriptions_settle_as_they_send() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("noack", v1::QueueConfig::default()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe_start("noack", 100, true, false))
        .await
        .unwrap();
    let mut events = a
        .queues
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Sent after the subscription is waiting: the enqueue wakes it.
    a.send("noack", vec![rec("a"), rec("b")]).await;
    assert_eq!(text(&next_message(&mut events).await), "a");
    assert_eq!(text(&next_message(&mut events).await), "b");
    let info = a.info("noack").await;
    assert_eq!((info.messages_ready, info.messages_leased), (0, 0));
    // Deleting the queue cancels the subscription.
    a.admin
        .delete_queue(v1::DeleteQueueRequest {
            id: qid("noack"),
            ..Default::default()
        })
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        event.event,
        Some(v1::subscribe_event::Event::Cancelled(_))
    ));
    drop(tx);
}

/// A lease held by a subscription (no deadline of its own) ends with the core that held it:
/// after `kill -9` the message is ready again at once.
#[tokio::test]
async fn held_leases_end_with_the_core() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("held", v1::QueueConfig::default()).await;
    a.send("held", vec![rec("h")]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe_start("held", 1, false, false))
        .await
        .unwrap();
    let mut events = a
        .queues
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let m = next_message(&mut events).await;
    assert_eq!(m.delivery_count, 1);
    drop((a, tx, events));
    server.kill9();
    let server = start(dir.path());
    let mut a = api(&server).await;
    let again = a.receive("held", 1, 30_000, 0).await;
    assert_eq!(again.len(), 1, "ready at once after the restart");
    assert_eq!(again[0].delivery_count, 2);
}

/// A queue with a TTL and a dead-letter queue is a delay line: messages expire at the head
/// with no consumer attached and move on with reason "expired".
#[tokio::test]
async fn expired_messages_move_on_without_a_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("ready-later", v1::QueueConfig::default()).await;
    a.declare(
        "waiting",
        v1::QueueConfig {
            message_ttl_ms: Some(500),
            dead_letter_queue: Some("ready-later".into()),
            ..Default::default()
        },
    )
    .await;
    let sent_at = now_ms();
    a.send("waiting", vec![rec("w1"), rec("w2")]).await;
    let got = a
        .receive_n("ready-later", 2, 30_000, Duration::from_secs(20))
        .await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), vec!["w1", "w2"]);
    assert!(now_ms() >= sent_at + 500);
    let p = got[0].record.as_ref().unwrap().properties.clone().unwrap();
    assert_eq!(p.dead_letter_reason, "expired");
    assert_eq!(p.dead_letter_delivery_count, 0);
    assert_eq!(a.info("waiting").await.messages_ready, 0);
}

async fn subscribe(
    a: &mut Api,
    queue: &str,
    credit: u32,
) -> (
    tokio::sync::mpsc::Sender<v1::SubscribeRequest>,
    tonic::Streaming<v1::SubscribeEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe_start(queue, credit, false, false))
        .await
        .unwrap();
    let events = a
        .queues
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, events)
}

#[tokio::test]
async fn single_active_consumer_takes_turns() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "sac",
        v1::QueueConfig {
            single_active_consumer: Some(true),
            ..Default::default()
        },
    )
    .await;
    let (first_tx, mut first) = subscribe(&mut a, "sac", 10).await;
    // The first subscription holds the turn once it is counted.
    a.wait_info("sac", "the first consumer", |i| i.consumers == 1)
        .await;
    let mut b = api(&server).await;
    let (_second_tx, mut second) = subscribe(&mut b, "sac", 10).await;
    a.wait_info("sac", "the second consumer", |i| i.consumers == 2)
        .await;
    a.send("sac", vec![rec("s1"), rec("s2"), rec("s3")]).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(text(&next_message(&mut first).await));
    }
    assert_eq!(got, vec!["s1", "s2", "s3"]);
    // The active one leaves: its leases are released and the other takes over, in order.
    drop((first_tx, first));
    let mut again = Vec::new();
    for _ in 0..3 {
        let m = next_message(&mut second).await;
        assert_eq!(m.delivery_count, 2, "the second never had these before");
        again.push(text(&m));
    }
    assert_eq!(again, vec!["s1", "s2", "s3"]);
}

#[tokio::test]
async fn an_auto_delete_queue_goes_with_its_last_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.admin
        .declare_queue(v1::DeclareQueueRequest {
            id: qid("temp"),
            auto_delete: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let (tx, events) = subscribe(&mut a, "temp", 1).await;
    a.wait_info("temp", "the consumer", |i| i.consumers == 1)
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    drop((tx, events));
    loop {
        let r = a
            .admin
            .declare_queue(v1::DeclareQueueRequest {
                id: qid("temp"),
                passive: true,
                ..Default::default()
            })
            .await;
        match r {
            Err(e) => {
                assert_eq!(error_code(&e), ErrorCode::QueueNotFound);
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "the queue stayed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Messages whose TTL ran out while the core was down are dead-lettered when it comes back,
/// into a queue opened after theirs and through an address (the router is loaded after the
/// queues): the owner tasks start only once everything they may move messages to is there.
#[tokio::test]
async fn messages_expired_during_a_restart_reach_their_dead_letter_targets() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    // Queues recover in name order: the targets come after the sources, and after queues
    // that take the recovery some time.
    for i in 0..40 {
        a.declare(&format!("mm-{i:02}"), v1::QueueConfig::default())
            .await;
    }
    a.declare("zz-dlq", v1::QueueConfig::default()).await;
    a.declare("zz-via-dlx", v1::QueueConfig::default()).await;
    a.admin
        .declare_address(v1::DeclareAddressRequest {
            namespace: "default".into(),
            name: "dlx".into(),
            kind: v1::AddressKind::Fanout as i32,
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    a.admin
        .bind(v1::BindRequest {
            binding: Some(v1::Binding {
                namespace: "default".into(),
                source_address: "dlx".into(),
                destination: Some(v1::binding::Destination::Queue("zz-via-dlx".into())),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let ttl = 1_000;
    a.declare(
        "aa-to-queue",
        v1::QueueConfig {
            message_ttl_ms: Some(ttl),
            dead_letter_queue: Some("zz-dlq".into()),
            ..Default::default()
        },
    )
    .await;
    a.declare(
        "aa-to-address",
        v1::QueueConfig {
            message_ttl_ms: Some(ttl),
            dead_letter_address: Some("dlx".into()),
            ..Default::default()
        },
    )
    .await;
    let sent_at = now_ms();
    a.send("aa-to-queue", vec![rec("q1"), rec("q2")]).await;
    a.send("aa-to-address", vec![rec("x1"), rec("x2")]).await;
    drop(a);
    server.kill9();
    // The messages expire while the core is down (the behaviour under test is time).
    let expired_at = sent_at + ttl + 100;
    while now_ms() < expired_at {
        tokio::time::sleep(Duration::from_millis((expired_at - now_ms()).max(1) as u64)).await;
    }

    let server = start(dir.path());
    let mut a = api(&server).await;
    let got = a
        .receive_n("zz-dlq", 2, 30_000, Duration::from_secs(20))
        .await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), vec!["q1", "q2"]);
    let p = got[0].record.as_ref().unwrap().properties.clone().unwrap();
    assert_eq!(p.dead_letter_reason, "expired");
    let got = a
        .receive_n("zz-via-dlx", 2, 30_000, Duration::from_secs(20))
        .await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), vec!["x1", "x2"]);
    assert_eq!(a.info("aa-to-queue").await.messages_ready, 0);
    assert_eq!(a.info("aa-to-address").await.messages_ready, 0);
}

/// A lease id named twice in one ChangeLease changes its lease once: releasing it (0) is
/// not reported as a failure after it took effect.
#[tokio::test]
async fn change_lease_takes_a_lease_named_twice_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("twice", v1::QueueConfig::default()).await;
    a.send("twice", vec![rec("t")]).await;
    let got = a.receive("twice", 1, 600_000, 0).await;
    assert_eq!(got.len(), 1);
    a.queues
        .change_lease(v1::ChangeLeaseRequest {
            queue: qid("twice"),
            lease_ids: vec![got[0].lease_id.clone(), got[0].lease_id.clone()],
            visibility_timeout_ms: 0,
        })
        .await
        .unwrap();
    let again = a.receive("twice", 1, 600_000, 0).await;
    assert_eq!(again.iter().map(text).collect::<Vec<_>>(), vec!["t"]);
    assert_eq!(again[0].delivery_count, 2);
}

/// The dedup id of a record that waits for its delay is remembered across kill -9 (it is
/// not in the messages log until the delay ends).
#[tokio::test]
async fn dedup_ids_of_delayed_records_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "dd-later",
        v1::QueueConfig {
            dedup_window_ms: Some(600_000),
            delivery_delay_ms: Some(600_000),
            ..Default::default()
        },
    )
    .await;
    let first = a.send("dd-later", vec![dedup("x", "id-x")]).await;
    assert_eq!((first.message_ids[0], first.duplicate[0]), (-1, false));
    drop(a);
    server.kill9();
    let server = start(dir.path());
    let mut a = api(&server).await;
    let again = a.send("dd-later", vec![dedup("x", "id-x")]).await;
    assert_eq!(again.duplicate, vec![true]);
}

/// Another owner's declare of an exclusive queue, passive or not, is RESOURCE_LOCKED
/// (AMQP's 405), not a conflict; its owner still reaches it.
#[tokio::test]
async fn an_exclusive_queue_is_locked_to_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    let declare = |owner: &str, passive: bool| v1::DeclareQueueRequest {
        id: qid("mine"),
        exclusive: true,
        owner: owner.into(),
        passive,
        ..Default::default()
    };
    let created = a
        .admin
        .declare_queue(declare("conn-a", false))
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    for passive in [false, true] {
        let e = a
            .admin
            .declare_queue(declare("conn-b", passive))
            .await
            .unwrap_err();
        assert_eq!(
            error_code(&e),
            ErrorCode::ResourceLocked,
            "passive {passive}"
        );
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    }
    for passive in [false, true] {
        let again = a
            .admin
            .declare_queue(declare("conn-a", passive))
            .await
            .unwrap()
            .into_inner();
        assert!(!again.created);
    }
}

/// A nack with requeue puts the message back where it was, ahead of the later ones, and
/// its next lease says it is redelivered, with its delivery count up by one.
#[tokio::test]
async fn a_requeued_message_keeps_its_place_and_is_marked_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("order", v1::QueueConfig::default()).await;
    a.send("order", vec![rec("m1"), rec("m2"), rec("m3"), rec("m4")])
        .await;
    let first = a.receive("order", 2, 60_000, 0).await;
    assert_eq!(first.iter().map(text).collect::<Vec<_>>(), vec!["m1", "m2"]);
    assert!(
        first
            .iter()
            .all(|m| !m.redelivered && m.delivery_count == 1)
    );
    a.queues
        .nack(v1::NackRequest {
            queue: qid("order"),
            lease_ids: vec![first[0].lease_id.clone()],
            requeue: true,
            delay_ms: 0,
        })
        .await
        .unwrap();
    let next = a.receive("order", 10, 60_000, 0).await;
    assert_eq!(
        next.iter().map(text).collect::<Vec<_>>(),
        vec!["m1", "m3", "m4"],
        "m1 comes back ahead of the messages after it"
    );
    assert!(next[0].redelivered);
    assert_eq!(next[0].delivery_count, 2);
    assert_eq!(next[0].message_id, first[0].message_id);
    assert!(
        next[1..]
            .iter()
            .all(|m| !m.redelivered && m.delivery_count == 1)
    );
    // m2's lease was not touched.
    let leases: Vec<&v1::LeasedMessage> = next.iter().chain(&first[1..]).collect();
    assert!(a.ack("order", &leases).await.is_empty());
}

/// Sends records one request each; per record, QUEUE_FULL or not.
async fn send_each(a: &mut Api, queue: &str, values: &[&str]) -> Vec<bool> {
    let mut full = Vec::new();
    for v in values {
        let r = a
            .queues
            .enqueue(v1::EnqueueRequest {
                queue: qid(queue),
                records: vec![rec(v)],
            })
            .await;
        full.push(match r {
            Ok(_) => false,
            Err(e) => {
                assert_eq!(error_code(&e), ErrorCode::QueueFull, "{v}");
                true
            }
        });
    }
    full
}

fn reason_and_history(m: &v1::LeasedMessage) -> (String, Vec<(String, String, u64)>) {
    let p = m.record.as_ref().unwrap().properties.clone().unwrap();
    let history = p
        .dead_letter_history
        .iter()
        .map(|e| (e.queue.clone(), e.reason.clone(), e.count))
        .collect();
    (p.dead_letter_reason, history)
}

/// max_length_bytes with drop-head, as RabbitMQ's x-max-length-bytes: the value bytes of
/// the ready messages stay under the limit by dropping the oldest (dead letters, reason
/// max-length); a message larger than the limit goes in and out with everything before it;
/// leased messages do not count.
#[tokio::test]
async fn max_length_bytes_drops_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("bytes-dlq", v1::QueueConfig::default()).await;
    a.declare(
        "bytes-head",
        v1::QueueConfig {
            max_length_bytes: Some(10),
            overflow: Some("drop-head".into()),
            dead_letter_queue: Some("bytes-dlq".into()),
            ..Default::default()
        },
    )
    .await;
    let echo = a.info("bytes-head").await.config.unwrap();
    assert_eq!(echo.max_length_bytes, Some(10));
    assert_eq!(
        send_each(&mut a, "bytes-head", &["aaaaaa", "bbbbbb", "cccccc"]).await,
        vec![false; 3]
    );
    assert_eq!(a.info("bytes-head").await.messages_ready, 1);
    // Larger than the limit: in, then out with everything before it.
    send_each(&mut a, "bytes-head", &["xxxxxxxxxxx"]).await;
    assert_eq!(a.info("bytes-head").await.messages_ready, 0);
    let dead = a
        .receive_n("bytes-dlq", 4, 60_000, Duration::from_secs(20))
        .await;
    assert_eq!(
        dead.iter().map(text).collect::<Vec<_>>(),
        vec!["aaaaaa", "bbbbbb", "cccccc", "xxxxxxxxxxx"]
    );
    for m in &dead {
        assert_eq!(
            reason_and_history(m),
            (
                "max-length".to_string(),
                vec![("bytes-head".to_string(), "max-length".to_string(), 1)]
            )
        );
    }
    // A batch over the limit keeps its newest records that fit.
    a.send("bytes-head", vec![rec("1111"), rec("2222"), rec("3333")])
        .await;
    assert_eq!(a.info("bytes-head").await.messages_ready, 2);
    assert_eq!(a.drain("bytes-head").await, vec!["2222", "3333"]);
    // Leased messages do not count.
    send_each(&mut a, "bytes-head", &["ffffff"]).await;
    let leased = a.receive("bytes-head", 1, 60_000, 0).await;
    send_each(&mut a, "bytes-head", &["gggggg"]).await;
    let info = a.info("bytes-head").await;
    assert_eq!((info.messages_ready, info.messages_leased), (1, 1));
    assert!(a.ack("bytes-head", &[&leased[0]]).await.is_empty());
    assert_eq!(a.drain("bytes-head").await, vec!["gggggg"]);
}

/// max_length_bytes with reject-publish refuses a request that would take the ready bytes
/// over the limit (all of it); reject-publish-dlx also dead-letters what it refuses, for
/// max_length and max_length_bytes alike.
#[tokio::test]
async fn max_length_bytes_rejects_and_reject_publish_dlx_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "bytes-reject",
        v1::QueueConfig {
            max_length_bytes: Some(10),
            overflow: Some("reject-publish".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        send_each(&mut a, "bytes-reject", &["666666", "666666", "4444"]).await,
        vec![false, true, false]
    );
    let batch = a
        .queues
        .enqueue(v1::EnqueueRequest {
            queue: qid("bytes-reject"),
            records: vec![rec("")],
        })
        .await;
    assert!(batch.is_ok(), "an empty value takes no bytes");
    let leased = a.receive("bytes-reject", 1, 60_000, 0).await;
    assert_eq!(text(&leased[0]), "666666");
    assert_eq!(
        send_each(&mut a, "bytes-reject", &["7777777", "666666"]).await,
        vec![true, false]
    );
    assert_eq!(a.info("bytes-reject").await.messages_ready, 3);

    a.declare("refused", v1::QueueConfig::default()).await;
    for (name, config) in [
        (
            "count-dlx",
            v1::QueueConfig {
                max_length: Some(1),
                ..Default::default()
            },
        ),
        (
            "bytes-dlx",
            v1::QueueConfig {
                max_length_bytes: Some(3),
                ..Default::default()
            },
        ),
    ] {
        a.declare(
            name,
            v1::QueueConfig {
                overflow: Some("reject-publish-dlx".into()),
                dead_letter_queue: Some("refused".into()),
                ..config
            },
        )
        .await;
        assert_eq!(
            send_each(&mut a, name, &["one", "two"]).await,
            vec![false, true]
        );
        let dead = a
            .receive_n("refused", 1, 60_000, Duration::from_secs(20))
            .await;
        assert_eq!(text(&dead[0]), "two");
        assert_eq!(
            reason_and_history(&dead[0]),
            (
                "max-length".to_string(),
                vec![(name.to_string(), "max-length".to_string(), 1)]
            )
        );
        assert!(a.ack("refused", &[&dead[0]]).await.is_empty());
        assert_eq!(a.drain(name).await, vec!["one"]);
    }
}

/// The ready bytes a max_length_bytes queue counts are exact after kill -9, also when the
/// restart finds its window's edge inside a batch.
#[tokio::test]
async fn max_length_bytes_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "big-batch",
        v1::QueueConfig {
            max_length_bytes: Some(2000),
            overflow: Some("reject-publish".into()),
            ..Default::default()
        },
    )
    .await;
    a.send("big-batch", (0..2000).map(|_| rec("x")).collect())
        .await;
    assert_eq!(send_each(&mut a, "big-batch", &["y"]).await, vec![true]);
    let leased = a.receive("big-batch", 1, 600_000, 0).await;
    assert_eq!(leased.len(), 1);
    a.declare(
        "small-head",
        v1::QueueConfig {
            max_length_bytes: Some(10),
            overflow: Some("drop-head".into()),
            ..Default::default()
        },
    )
    .await;
    send_each(&mut a, "small-head", &["aaaa", "bbbb"]).await;
    drop(a);
    server.kill9();

    let server = start(dir.path());
    let mut a = api(&server).await;
    let info = a.info("big-batch").await;
    assert_eq!((info.messages_ready, info.messages_leased), (1999, 1));
    assert_eq!(
        send_each(&mut a, "big-batch", &["y", "z"]).await,
        vec![false, true]
    );
    // Settling the leased message frees nothing: it was not ready.
    assert!(a.ack("big-batch", &[&leased[0]]).await.is_empty());
    assert_eq!(send_each(&mut a, "big-batch", &["z"]).await, vec![true]);
    let one = a.receive("big-batch", 1, 600_000, 0).await;
    assert_eq!(one.len(), 1);
    assert_eq!(send_each(&mut a, "big-batch", &["z"]).await, vec![false]);

    send_each(&mut a, "small-head", &["cccc"]).await;
    assert_eq!(a.drain("small-head").await, vec!["bbbb", "cccc"]);
}

fn with_mode(value: &str, delivery_mode: u32) -> v1::Record {
    rec_with(
        value,
        v1::SystemProperties {
            delivery_mode,
            ..Default::default()
        },
    )
}

/// Transient records (delivery_mode 1, AMQP's non-persistent) do not outlive a restart of
/// the core, by kill -9 or by a clean stop, whether they were ready, leased or behind a
/// long backlog: never delivered again, out of `messages_ready` once the queue has looked
/// at them. Persistent (2) and unset (0) records stay, in order; a transient record sent
/// after the restart is delivered until the next one.
#[tokio::test]
async fn transient_messages_do_not_outlive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("mixed", v1::QueueConfig::default()).await;
    a.send(
        "mixed",
        vec![
            with_mode("t1", 1),
            with_mode("p1", 2),
            with_mode("u1", 0),
            with_mode("t2", 1),
            with_mode("p2", 2),
        ],
    )
    .await;
    // t1 is leased at the kill (live in the journal, not only in the log).
    let leased = a.receive("mixed", 1, 600_000, 0).await;
    assert_eq!(leased.iter().map(text).collect::<Vec<_>>(), vec!["t1"]);
    // A backlog of transient records longer than what a queue looks at when it opens.
    a.declare("backlog", v1::QueueConfig::default()).await;
    a.send(
        "backlog",
        (0..6000).map(|i| with_mode(&format!("t{i}"), 1)).collect(),
    )
    .await;
    a.send("backlog", vec![with_mode("kept", 2)]).await;
    drop(a);
    server.kill9();

    let server = start(dir.path());
    let mut a = api(&server).await;
    let info = a.info("mixed").await;
    assert_eq!(
        (info.messages_ready, info.messages_leased),
        (3, 0),
        "t1 and t2 are gone, the others counted"
    );
    assert_eq!(
        a.ack("mixed", &[&leased[0]]).await,
        vec![leased[0].lease_id.clone()],
        "t1's lease went with it"
    );
    assert_eq!(a.drain("mixed").await, vec!["p1", "u1", "p2"]);
    let got = a.receive_all("backlog", 1).await;
    assert_eq!(text(&got[0]), "kept");
    let info = a.info("backlog").await;
    assert_eq!(
        info.messages_ready, 0,
        "the window passed every transient one"
    );

    // Sent after the restart: delivered while this process lives, gone after a clean stop.
    a.send("mixed", vec![with_mode("t3", 1), with_mode("p3", 2)])
        .await;
    assert_eq!(a.info("mixed").await.messages_ready, 2);
    let got = a.receive("mixed", 1, 60_000, 0).await;
    assert_eq!(text(&got[0]), "t3");
    a.queues
        .nack(v1::NackRequest {
            queue: qid("mixed"),
            lease_ids: vec![got[0].lease_id.clone()],
            requeue: true,
            delay_ms: 0,
        })
        .await
        .unwrap();
    a.send("mixed", vec![with_mode("t4", 1)]).await;
    drop(a);
    let status = tokio::task::spawn_blocking(move || {
        server.signal_and_wait("TERM", Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert!(status.success());

    let server = start(dir.path());
    let mut a = api(&server).await;
    assert_eq!(a.info("mixed").await.messages_ready, 1);
    assert_eq!(a.drain("mixed").await, vec!["p3"]);
    assert!(a.receive("backlog", 10, 60_000, 0).await.is_empty());
}

fn with_priority(value: &str, priority: u32) -> v1::Record {
    rec_with(
        value,
        v1::SystemProperties {
            priority,
            ..Default::default()
        },
    )
}

/// Priorities 3, 2 and 9, one request each.
async fn publish_3_2_9(a: &mut Api) {
    for (v, p) in [("p3", 3), ("p2", 2), ("p9", 9)] {
        a.send("prio", vec![with_priority(v, p)]).await;
    }
}

/// As in RabbitMQ, a priority above the queue's `max_priority` counts as `max_priority`:
/// with 3, priorities 3, 2, 9 published in that order come out 3, 9 (the same level, in
/// publish order), 2; the record keeps its own priority. The same after kill -9.
#[tokio::test]
async fn a_priority_above_max_priority_counts_as_max_priority() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare(
        "prio",
        v1::QueueConfig {
            max_priority: Some(3),
            ..Default::default()
        },
    )
    .await;
    let check = |got: &[v1::LeasedMessage]| {
        assert_eq!(
            got.iter().map(text).collect::<Vec<_>>(),
            vec!["p3", "p9", "p2"]
        );
        let priorities: Vec<u32> = got
            .iter()
            .map(|m| {
                m.record
                    .as_ref()
                    .unwrap()
                    .properties
                    .as_ref()
                    .unwrap()
                    .priority
            })
            .collect();
        assert_eq!(priorities, vec![3, 9, 2], "records keep their own priority");
    };
    publish_3_2_9(&mut a).await;
    check(&a.receive_all("prio", 3).await);
    publish_3_2_9(&mut a).await;
    drop(a);
    server.kill9();

    let server = start(dir.path());
    let mut a = api(&server).await;
    check(&a.receive_all("prio", 3).await);
}

/// `UpdateQueue` (SQS SetQueueAttributes): the new default visibility and dead-letter limit
/// act on the queue that exists, what its stored state depends on cannot change, and the
/// new configuration outlives `kill -9`.
#[tokio::test]
async fn update_queue_changes_settings_in_place_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("upd-dlq", v1::QueueConfig::default()).await;
    a.declare("upd", v1::QueueConfig::default()).await;
    let config = v1::QueueConfig {
        visibility_timeout_ms: Some(300),
        max_delivery_count: Some(1),
        dead_letter_queue: Some("upd-dlq".into()),
        extra: [("sqs.tag.team".to_string(), "a".to_string())].into(),
        ..Default::default()
    };
    let info = a
        .admin
        .update_queue(v1::UpdateQueueRequest {
            id: qid("upd"),
            config: Some(config.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .queue
        .unwrap();
    // Described back with the backend in use (the server's only one, unchanged by updates).
    let described = v1::QueueConfig {
        storage: Some("local".into()),
        ..config.clone()
    };
    assert_eq!(info.config.as_ref().unwrap(), &described);
    a.send("upd", vec![rec("once")]).await;
    // Received with the queue's (new) default visibility of 300 ms.
    let got = a.receive("upd", 1, 0, 0).await;
    assert_eq!(got.len(), 1);
    let lease_ms = got[0].lease_expires_at_ms - now_ms();
    assert!(lease_ms <= 300, "lease of {lease_ms} ms");
    // Not acked: after its one delivery it goes to the dead-letter queue.
    let dead = a
        .receive_n("upd-dlq", 1, 30_000, Duration::from_secs(20))
        .await;
    assert_eq!(text(&dead[0]), "once");

    for (what, bad) in [
        (
            "fifo",
            v1::QueueConfig {
                fifo: Some(true),
                ..config.clone()
            },
        ),
        (
            "dedup_window_ms",
            v1::QueueConfig {
                dedup_window_ms: Some(60_000),
                ..config.clone()
            },
        ),
    ] {
        let err = a
            .admin
            .update_queue(v1::UpdateQueueRequest {
                id: qid("upd"),
                config: Some(bad),
            })
            .await
            .unwrap_err();
        assert_eq!(error_code(&err), ErrorCode::InvalidArgument, "{what}");
        assert!(err.message().contains(what), "{}", err.message());
    }
    let err = a
        .admin
        .update_queue(v1::UpdateQueueRequest {
            id: qid("no-such-queue"),
            config: Some(config.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&err), ErrorCode::QueueNotFound);

    server.kill9();
    let server = start(dir.path());
    let mut a = api(&server).await;
    assert_eq!(a.info("upd").await.config.unwrap(), described);
}

/// `dead_letter_expired = false` (SQS retention): a message past its TTL is discarded while
/// one past its delivery limit still reaches the dead-letter queue.
#[tokio::test]
async fn expired_messages_are_discarded_when_the_queue_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("ret-dlq", v1::QueueConfig::default()).await;
    a.declare(
        "ret",
        v1::QueueConfig {
            message_ttl_ms: Some(1_000),
            dead_letter_expired: Some(false),
            dead_letter_queue: Some("ret-dlq".into()),
            max_delivery_count: Some(1),
            ..Default::default()
        },
    )
    .await;
    a.send("ret", vec![rec("old")]).await;
    a.wait_info("ret", "the expired message to go", |i| {
        i.messages_ready == 0
    })
    .await;
    // Past its delivery limit: dead-lettered (behind nothing, so the DLQ's only message).
    a.send("ret", vec![rec("tried")]).await;
    assert_eq!(a.receive("ret", 1, 100, 0).await.len(), 1);
    let dead = a
        .receive_n("ret-dlq", 1, 30_000, Duration::from_secs(20))
        .await;
    assert_eq!(
        dead.iter().map(text).collect::<Vec<_>>(),
        vec!["tried"],
        "the expired message was discarded, not dead-lettered"
    );
}

/// A paced redrive cancelled while it runs stops after the message in hand: the rest stay
/// in the source, visible (a paced move takes a second's worth at a time).
#[tokio::test]
async fn a_cancelled_redrive_stops_and_leaves_the_rest_visible() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut a = api(&server).await;
    a.declare("rd-src", v1::QueueConfig::default()).await;
    a.declare("rd-dlq", v1::QueueConfig::default()).await;
    a.send("rd-dlq", (0..10).map(|i| rec(&format!("m{i}"))).collect())
        .await;
    let task = a
        .queues
        .start_redrive(v1::StartRedriveRequest {
            source: qid("rd-dlq"),
            destination: "rd-src".into(),
            max_messages_per_second: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    a.wait_info("rd-src", "the first move", |i| i.messages_ready >= 1)
        .await;
    let cancelled = a
        .queues
        .cancel_redrive(v1::CancelRedriveRequest {
            task_id: task.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert!(
        ["CANCELLING", "CANCELLED"].contains(&cancelled.status.as_str()),
        "{cancelled:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let done = loop {
        let tasks = a
            .queues
            .list_redrives(v1::ListRedrivesRequest {
                source: qid("rd-dlq"),
            })
            .await
            .unwrap()
            .into_inner()
            .tasks;
        let t = tasks.into_iter().find(|t| t.task_id == task).unwrap();
        if t.status == "CANCELLED" {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "still {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(done.moved < 10, "{done:?}");
    let src = a.info("rd-src").await.messages_ready;
    let dlq = a.info("rd-dlq").await;
    assert_eq!(src, done.moved);
    assert_eq!(
        (dlq.messages_ready, dlq.messages_leased),
        (10 - done.moved, 0),
        "the rest back in the source queue, visible"
    );
}
