//! Single active consumer through the core's subscription API (what the AMQP gateway drives):
//! the turn goes by start order, whatever order the subscriptions' tasks run in afterwards,
//! and passes on in that order.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tributary_core::{Core, CoreConfig};
use tributary_proto::v1::{self, subscribe_event::Event, subscribe_request::Item};
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

const DEADLINE: Duration = Duration::from_secs(10);
const QUEUE: &str = "sac";

type Events = mpsc::Receiver<Result<v1::SubscribeEvent, tonic::Status>>;

async fn open(dir: &Path) -> Core {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let core = Core::open(log, meta, CoreConfig::default()).await.unwrap();
    core.declare_queue(v1::DeclareQueueRequest {
        id: Some(qid()),
        config: Some(v1::QueueConfig {
            single_active_consumer: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    core
}

fn qid() -> v1::QueueId {
    v1::QueueId {
        namespace: "default".into(),
        name: QUEUE.into(),
    }
}

struct Sub {
    name: String,
    requests: mpsc::UnboundedSender<Result<v1::SubscribeRequest, tonic::Status>>,
    events: Events,
}

impl Sub {
    /// Starts an auto-ack subscription as the AMQP gateway does (announced start); its
    /// events go through `events`, which the caller may have filled up.
    fn start(
        core: &Core,
        name: &str,
        events_tx: mpsc::Sender<Result<v1::SubscribeEvent, tonic::Status>>,
        events: Events,
    ) -> Sub {
        let (requests, rx) = mpsc::unbounded_channel();
        requests
            .send(Ok(v1::SubscribeRequest {
                item: Some(Item::Start(v1::SubscribeStart {
                    source: Some(v1::subscribe_start::Source::Queue(qid())),
                    consumer: "test".into(),
                    initial_credit: 100,
                    auto_ack: true,
                    release_on_close: true,
                    announce_start: true,
                    ..Default::default()
                })),
            }))
            .unwrap();
        let core = core.clone();
        tokio::spawn(async move {
            core.run_subscription(UnboundedReceiverStream::new(rx), events_tx)
                .await
        });
        Sub {
            name: name.into(),
            requests,
            events,
        }
    }

    async fn event(&mut self) -> Event {
        tokio::time::timeout(DEADLINE, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: no event within {DEADLINE:?}", self.name))
            .expect("the subscription is open")
            .unwrap()
            .event
            .expect("an event")
    }

    async fn started(&mut self) {
        assert_eq!(self.event().await, Event::Started(true));
    }

    async fn texts(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.event().await {
                Event::Message(m) => {
                    out.push(String::from_utf8(m.record.unwrap().value.to_vec()).unwrap())
                }
                other => panic!("expected a message, got {other:?}"),
            }
        }
        out
    }

    /// Nothing is waiting on its stream (what has been sent so far went elsewhere).
    fn empty(&mut self) -> bool {
        self.events.try_recv().is_err()
    }

    async fn end(&mut self) {
        self.requests
            .send(Ok(v1::SubscribeRequest {
                item: Some(Item::End(true)),
            }))
            .unwrap();
        assert_eq!(self.event().await, Event::Ended(true));
    }
}

fn open_sub(core: &Core, name: &str) -> Sub {
    let (tx, rx) = mpsc::channel(64);
    Sub::start(core, name, tx, rx)
}

async fn consumers(core: &Core) -> u32 {
    let queues = core.list_queues("default").await.unwrap();
    queues
        .iter()
        .find(|q| q.id.as_ref().is_some_and(|id| id.name == QUEUE))
        .map_or(0, |q| q.consumers)
}

async fn send(core: &Core, prefix: &str, n: usize) -> Vec<String> {
    let texts: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    core.enqueue(v1::EnqueueRequest {
        queue: Some(qid()),
        records: texts
            .iter()
            .map(|t| v1::Record {
                value: Bytes::from(t.clone()),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap();
    texts
}

/// The first subscription is held up right after it started (here: its events stream is
/// full, so its task waits before it announces the start) while a second one starts and
/// runs. The first still has the turn: the subscriptions were started in that order (an
/// AMQP gateway confirms the first consumer before the client can even ask for the second).
/// The core used to give the turn to whichever task reached its loop first, so a first
/// consumer whose task was delayed by a busy machine lost it to the second.
#[tokio::test]
async fn the_turn_goes_by_start_order_not_by_scheduling() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;

    let (tx, rx) = mpsc::channel(1);
    tx.try_send(Ok(v1::SubscribeEvent::default())).unwrap();
    let mut first = Sub::start(&core, "first", tx, rx);
    // This runtime has one thread: once the first is counted, its task is parked on its
    // full events stream, not yet past its start.
    tokio::time::timeout(DEADLINE, async {
        while consumers(&core).await < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first subscription is counted");

    let mut second = open_sub(&core, "second");
    second.started().await;
    assert_eq!(consumers(&core).await, 2);
    // The first one's task goes on.
    let filler = first.events.recv().await.unwrap().unwrap();
    assert_eq!(filler, v1::SubscribeEvent::default());
    first.started().await;

    let sent = send(&core, "a", 10).await;
    assert_eq!(
        first.texts(10).await,
        sent,
        "the first started has the turn"
    );
    assert!(second.empty(), "only the active consumer receives");

    // It ends: the second one takes over.
    first.end().await;
    let sent = send(&core, "b", 5).await;
    assert_eq!(second.texts(5).await, sent);
}

/// The turn passes in start order, and one that leaves while waiting gives up its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_passes_in_start_order() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    let mut subs = Vec::new();
    for n in 1..=4 {
        let mut s = open_sub(&core, &format!("subscription {}", n - 1));
        s.started().await;
        assert_eq!(consumers(&core).await, n);
        subs.push(s);
    }
    expect_active(&core, &mut subs, 0, "a").await;
    // The third leaves while it waits: the active one keeps the turn.
    subs[2].end().await;
    expect_active(&core, &mut subs, 0, "b").await;
    subs[0].end().await;
    expect_active(&core, &mut subs, 1, "c").await;
    subs[1].end().await;
    expect_active(&core, &mut subs, 3, "d").await;
}

async fn expect_active(core: &Core, subs: &mut [Sub], i: usize, prefix: &str) {
    let sent = send(core, prefix, 3).await;
    assert_eq!(
        subs[i].texts(3).await,
        sent,
        "subscription {i} has the turn"
    );
    for (j, s) in subs.iter_mut().enumerate() {
        assert!(j == i || s.empty(), "subscription {j} got a message");
    }
}
