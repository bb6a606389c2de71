//! A subscription served on its reader's task (what an AMQP consumer in the same process
//! drives): it delivers within its credit only while it is read, and a reader that goes away
//! mid-subscription still gets its leases released.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tributary_core::{Core, CoreConfig, ReaderServedSubscription};
use tributary_proto::v1::{self, subscribe_event::Event, subscribe_request::Item};
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

const DEADLINE: Duration = Duration::from_secs(10);
const QUEUE: &str = "served";

type Requests = mpsc::UnboundedSender<Result<v1::SubscribeRequest, tonic::Status>>;

async fn open(dir: &Path) -> Core {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let core = Core::open(log, meta, CoreConfig::default()).await.unwrap();
    core.declare_queue(v1::DeclareQueueRequest {
        id: Some(qid()),
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

fn subscribe(core: &Core, credit: u32) -> (Requests, ReaderServedSubscription) {
    let (requests, rx) = mpsc::unbounded_channel();
    requests
        .send(Ok(v1::SubscribeRequest {
            item: Some(Item::Start(v1::SubscribeStart {
                source: Some(v1::subscribe_start::Source::Queue(qid())),
                consumer: "test".into(),
                initial_credit: credit,
                release_on_close: true,
                announce_start: true,
                ..Default::default()
            })),
        }))
        .unwrap();
    let events = core.subscription_served_by_reader(UnboundedReceiverStream::new(rx));
    (requests, events)
}

async fn next_event(events: &mut ReaderServedSubscription) -> Event {
    tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("an event within the deadline")
        .expect("the subscription is open")
        .unwrap()
        .event
        .expect("an event")
}

async fn texts(events: &mut ReaderServedSubscription, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        match next_event(events).await {
            Event::Message(m) => {
                out.push(String::from_utf8(m.record.unwrap().value.to_vec()).unwrap())
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }
    out
}

async fn send(core: &Core, texts: &[&str]) {
    core.enqueue(v1::EnqueueRequest {
        queue: Some(qid()),
        records: texts
            .iter()
            .map(|t| v1::Record {
                value: Bytes::from(t.to_string()),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn delivers_within_credit_as_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    let (requests, mut events) = subscribe(&core, 2);
    assert_eq!(next_event(&mut events).await, Event::Started(true));
    send(&core, &["a", "b", "c", "d", "e"]).await;

    assert_eq!(texts(&mut events, 2).await, ["a", "b"]);
    // Out of credit: reading finds nothing, however often it is polled.
    for _ in 0..10 {
        assert!(
            events.next().now_or_never().is_none(),
            "nothing past the credit"
        );
        tokio::task::yield_now().await;
    }

    requests
        .send(Ok(v1::SubscribeRequest {
            item: Some(Item::Credit(2)),
        }))
        .unwrap();
    assert_eq!(texts(&mut events, 2).await, ["c", "d"]);
}

#[tokio::test]
async fn a_reader_that_goes_away_releases_its_leases() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    let (_requests, mut events) = subscribe(&core, 2);
    assert_eq!(next_event(&mut events).await, Event::Started(true));
    send(&core, &["a", "b", "c"]).await;
    assert_eq!(texts(&mut events, 2).await, ["a", "b"]);

    // Dropped with two messages leased and unsettled: they go back to the queue for
    // whoever comes next, in their places.
    drop(events);
    let (_requests, mut next) = subscribe(&core, 10);
    assert_eq!(next_event(&mut next).await, Event::Started(true));
    let mut got = texts(&mut next, 3).await;
    got.sort();
    assert_eq!(got, ["a", "b", "c"]);
}
