//! RocketMQ scenarios driven by the Rust client `rocketmq-client-rust` (Remoting, like the Java
//! client): synchronous sends with tags, keys and user properties consumed whole by a push
//! consumer, a tag subscription on a lite pull consumer, and a transactional producer whose
//! committed message is delivered and whose rolled-back one is not.
//!
//! Each test starts `$TRIBUTARY_BIN` on free loopback ports (`scripts/compat.sh rocketmq-rust`
//! sets it). With `ROCKETMQ_NAMESRV=HOST:PORT` the tests use that NameServer instead, e.g. Apache
//! RocketMQ started by `scripts/brokers.sh` (`rocketmq_start`), to check a scenario against the
//! reference.

use std::any::Any;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rocketmq_client_rust::{
    ClientResult, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext,
    ConsumeConcurrentlyStatus, DefaultLitePullConsumer, DefaultMQProducer, DefaultMQPushConsumer,
    LocalTransactionState, MQPushConsumer, MessageListenerConcurrently, SendStatus,
    TransactionListener, TransactionMQProducer,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_observability::TelemetryRuntimeGuard;
use rocketmq_runtime::RuntimeOwner;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long a scenario waits for what it expects before it fails.
const WAIT: Duration = Duration::from_secs(60);

/// The broker under test: a `tributary` child process (killed on drop), or the NameServer
/// named by `ROCKETMQ_NAMESRV`.
struct Broker {
    child: Option<Child>,
    namesrv: String,
}

impl Broker {
    fn start() -> Broker {
        if let Ok(namesrv) = std::env::var("ROCKETMQ_NAMESRV") {
            return Broker {
                child: None,
                namesrv,
            };
        }
        let bin = std::env::var("TRIBUTARY_BIN").expect(
            "TRIBUTARY_BIN must name the tributary binary (scripts/compat.sh rocketmq-rust sets it)",
        );
        let data_dir = std::env::temp_dir().join(format!("tributary-rmq-rust-{}", unique()));
        let mut args = vec!["--data-dir".to_string(), data_dir.display().to_string()];
        for flag in [
            "--core-listen",
            "--admin-listen",
            "--kafka-listen",
            "--mqtt-listen",
            "--mqtt-ws-listen",
            "--amqp-listen",
            "--sqs-listen",
        ] {
            args.extend([flag.to_string(), "off".to_string()]);
        }
        for flag in ["--rocketmq-listen", "--namesrv-listen"] {
            args.extend([flag.to_string(), "127.0.0.1:0".to_string()]);
        }
        let mut child = Command::new(&bin)
            .args(&args)
            .env(
                "TRIBUTARY_LOG",
                std::env::var("TRIBUTARY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut namesrv = None;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line == "ready" => break,
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening rocketmq-namesrv ") {
                        namesrv = Some(a.to_string());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "tributary did not print 'ready' (status {:?})",
                        child.wait().ok()
                    );
                }
            }
        }
        Broker {
            child: Some(child),
            namesrv: namesrv.expect("a 'listening rocketmq-namesrv ADDR' line before 'ready'"),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A name no other test (or earlier run against a shared reference broker) uses.
fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `scenario` on a client runtime of its own, then shuts the client runtime down and
/// checks that it stopped cleanly.
fn with_client<F, Fut>(scenario: F) -> TestResult
where
    F: FnOnce(Arc<ClientRuntime>) -> Fut,
    Fut: Future<Output = TestResult>,
{
    let owner = RuntimeOwner::new()?;
    let telemetry = TelemetryRuntimeGuard::noop();
    let runtime = ClientRuntime::try_new(
        owner.root_context().component("compat-test"),
        ClientRuntimeConfig::default(),
        telemetry.handle(),
    )?;
    let (result, report) = owner.block_on(async {
        let result = scenario(runtime.clone()).await;
        (result, runtime.shutdown().await)
    });
    let runtime_report = owner.shutdown_runtime_blocking()?;
    result?;
    assert!(
        report.is_healthy(),
        "client runtime shutdown: {}",
        report.to_json()
    );
    assert!(
        runtime_report.is_healthy(),
        "runtime shutdown: {}",
        runtime_report.to_json()
    );
    Ok(())
}

/// What a test checks of a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    body: String,
    tags: Option<String>,
    keys: Option<String>,
    seq: Option<String>,
    note: Option<String>,
}

impl Received {
    fn of(m: &MessageExt) -> Received {
        let prop = |name: &str| m.user_property(&name.into()).map(|v| v.to_string());
        Received {
            body: String::from_utf8_lossy(&m.body().unwrap_or_default()).into_owned(),
            tags: m.get_tags().map(|t| t.to_string()),
            keys: m.get_keys().map(|k| k.to_string()),
            seq: prop("seq"),
            note: prop("note"),
        }
    }
}

/// A push consumer listener that hands every message to the test.
struct Forward(UnboundedSender<Received>);

impl MessageListenerConcurrently for Forward {
    fn consume_message(
        &self,
        messages: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        for m in messages {
            let _ = self.0.send(Received::of(m));
        }
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

/// Receives until `done` holds for what arrived, or fails after [`WAIT`].
async fn receive_until(
    rx: &mut UnboundedReceiver<Received>,
    what: &str,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while !done(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => panic!("the listener went away; {what}: got {got:?}"),
            Err(_) => panic!("timed out waiting for {what}; got {} {got:?}", got.len()),
        }
    }
    got
}

fn message(topic: &str, tag: &str, key: &str, body: &str, seq: usize) -> ClientResult<Message> {
    Ok(Message::builder()
        .topic(topic)
        .tags(tag)
        .key(key)
        .body_slice(body.as_bytes())
        .raw_property("seq", seq.to_string())?
        .raw_property("note", "ünïcode = ok; a:b")?
        .build()?)
}

fn tag_of(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "TagA" } else { "TagB" }
}

#[test]
fn sync_send_then_push_consumer_gets_every_message_intact() -> TestResult {
    let broker = Broker::start();
    let id = unique();
    let topic = format!("RustSend_{id}");
    const N: usize = 24;
    with_client(|rt| async move {
        let mut producer = DefaultMQProducer::builder(rt.clone())
            .producer_group(format!("rust_pg_{id}"))
            .name_server_addr(broker.namesrv.clone())
            .build();
        producer.start().await?;
        let mut sent = BTreeMap::new();
        for i in 0..N {
            let body = format!("body-{i}");
            let m = message(&topic, tag_of(i), &format!("key-{i}"), &body, i)?;
            let r = producer
                .send_with_timeout(m, 10_000)
                .await?
                .expect("a synchronous send returns its result");
            assert_eq!(r.send_status, SendStatus::SendOk, "send {i}: {r:?}");
            assert!(r.msg_id.is_some(), "send {i} has a message id: {r:?}");
            let mq = r.message_queue.expect("the queue the message went to");
            assert_eq!(mq.topic().as_str(), topic);
            sent.insert(i, body);
        }
        producer.shutdown().await;

        let (tx, mut rx) = unbounded_channel();
        let mut consumer = DefaultMQPushConsumer::builder(rt.clone())
            .consumer_group(format!("rust_cg_{id}"))
            .name_server_addr(broker.namesrv.clone())
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .build();
        consumer.subscribe(topic.as_str(), "*").await?;
        consumer.register_message_listener_concurrently(Forward(tx));
        consumer.start().await?;
        let got = receive_until(&mut rx, "every message sent", |g| g.len() >= N).await;
        consumer.shutdown().await;

        let mut by_seq = BTreeMap::new();
        for m in got {
            let seq: usize = m.seq.as_deref().expect("the user property 'seq'").parse()?;
            let want = Received {
                body: format!("body-{seq}"),
                tags: Some(tag_of(seq).to_string()),
                keys: Some(format!("key-{seq}")),
                seq: Some(seq.to_string()),
                note: Some("ünïcode = ok; a:b".to_string()),
            };
            assert_eq!(m, want);
            assert!(
                by_seq.insert(seq, m.body).is_none(),
                "message {seq} delivered twice"
            );
        }
        assert_eq!(by_seq, sent, "every message sent, each once");
        Ok(())
    })
}

#[test]
fn lite_pull_consumer_with_a_tag_gets_only_that_tag() -> TestResult {
    let broker = Broker::start();
    let id = unique();
    let topic = format!("RustTags_{id}");
    const N: usize = 16;
    with_client(|rt| async move {
        let mut producer = DefaultMQProducer::builder(rt.clone())
            .producer_group(format!("rust_pg_{id}"))
            .name_server_addr(broker.namesrv.clone())
            .build();
        producer.start().await?;
        // The first send creates the topic and picks a queue; the rest go to that queue, so
        // the sentinel last sent is also the last the consumer reads: once it arrives, every
        // message before it has been filtered.
        let first = producer
            .send_with_timeout(message(&topic, tag_of(1), "k-first", "first", 1)?, 10_000)
            .await?
            .expect("a synchronous send returns its result");
        assert_eq!(first.send_status, SendStatus::SendOk);
        let mq = first.message_queue.expect("the queue of the first message");
        let mut want = Vec::new();
        for i in 2..N {
            let body = format!("tagged-{i}");
            let r = producer
                .send_to_queue_with_timeout(
                    message(&topic, tag_of(i), &format!("k-{i}"), &body, i)?,
                    mq.clone(),
                    10_000,
                )
                .await?
                .expect("a synchronous send returns its result");
            assert_eq!(r.send_status, SendStatus::SendOk);
            if tag_of(i) == "TagA" {
                want.push(body);
            }
        }
        let r = producer
            .send_to_queue_with_timeout(message(&topic, "TagA", "k-end", "end", N)?, mq, 10_000)
            .await?
            .expect("a synchronous send returns its result");
        assert_eq!(r.send_status, SendStatus::SendOk);
        want.push("end".to_string());
        producer.shutdown().await;

        let consumer = DefaultLitePullConsumer::builder(rt.clone())
            .consumer_group(format!("rust_lp_{id}"))
            .name_server_addr(broker.namesrv.clone())
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            // Its shutdown waits for the long polls it has parked on the empty queues: keep
            // them short (the defaults, 20 s and 30 s, make the test take 20 s more).
            .broker_suspend_max_time_millis(1000)
            .consumer_timeout_millis_when_suspend(5000)
            .build()?;
        consumer
            .subscribe_with_expression(topic.as_str(), "TagA")
            .await?;
        consumer.start().await?;
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.last().map(String::as_str) != Some("end") {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the TagA messages; got {got:?}"
            );
            for m in consumer.poll_with_timeout(1000).await {
                let m = Received::of(&m);
                assert_eq!(
                    m.tags.as_deref(),
                    Some("TagA"),
                    "a TagB message came: {m:?}"
                );
                got.push(m.body);
            }
        }
        consumer.shutdown().await;
        assert_eq!(got, want, "the TagA messages in queue order, each once");
        Ok(())
    })
}

/// Commits what the test marks "commit", rolls back the rest.
struct ByBody;

impl TransactionListener for ByBody {
    fn execute_local_transaction(
        &self,
        msg: &dyn MessageTrait,
        _arg: Option<&(dyn Any + Send + Sync)>,
    ) -> LocalTransactionState {
        match msg.get_body().map(|b| b.as_ref()) {
            Some(b) if b.starts_with(b"commit") => LocalTransactionState::CommitMessage,
            _ => LocalTransactionState::RollbackMessage,
        }
    }

    fn check_local_transaction(&self, msg: &MessageExt) -> LocalTransactionState {
        // Both transactions are decided locally; a check-back means END_TRANSACTION was lost.
        panic!("unexpected transaction check-back for {msg:?}");
    }
}

#[test]
fn transactional_producer_commit_is_delivered_and_rollback_is_not() -> TestResult {
    let broker = Broker::start();
    let id = unique();
    let topic = format!("RustTxn_{id}");
    with_client(|rt| async move {
        let mut producer = TransactionMQProducer::builder(rt.clone())
            .producer_group(format!("rust_tpg_{id}"))
            .name_server_addr(broker.namesrv.clone())
            .topics(vec![topic.clone()])
            .transaction_listener(ByBody)
            .build();
        producer.start().await?;
        for (body, want) in [
            ("rollback-1", LocalTransactionState::RollbackMessage),
            ("commit-1", LocalTransactionState::CommitMessage),
        ] {
            let m = message(&topic, "T", body, body, 0)?;
            let r = producer
                .send_message_in_transaction::<(), _>(m, None)
                .await?;
            assert_eq!(r.local_transaction_state, Some(want), "{body}: {r:?}");
            let sent = r.send_result.expect("the half message's send result");
            assert_eq!(sent.send_status, SendStatus::SendOk, "{body}");
        }

        let (tx, mut rx) = unbounded_channel();
        let mut consumer = DefaultMQPushConsumer::builder(rt.clone())
            .consumer_group(format!("rust_tcg_{id}"))
            .name_server_addr(broker.namesrv.clone())
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .build();
        consumer.subscribe(topic.as_str(), "*").await?;
        consumer.register_message_listener_concurrently(Forward(tx));
        consumer.start().await?;
        let got = receive_until(&mut rx, "the committed message", |g| !g.is_empty()).await;
        assert_eq!(
            got[0].body, "commit-1",
            "only the committed message: {got:?}"
        );

        // The topic holds the committed message and nothing else: the rolled-back one was
        // never written to it.
        let mut counter = DefaultMQProducer::builder(rt.clone())
            .producer_group(format!("rust_count_{id}"))
            .name_server_addr(broker.namesrv.clone())
            .build();
        counter.start().await?;
        let mut total = 0;
        for mq in counter.fetch_publish_message_queues(&topic).await? {
            total += counter.max_offset(&mq).await?;
        }
        counter.shutdown().await;
        consumer.shutdown().await;
        producer.shutdown().await;
        assert_eq!(total, 1, "messages in {topic}");
        assert!(rx.try_recv().is_err(), "nothing but the committed message");
        Ok(())
    })
}
