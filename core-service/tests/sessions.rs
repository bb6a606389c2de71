//! Client sessions in the core, driven through the same command/event stream a gateway
//! uses: routing with QoS downgrade, QoS 2 duplicate suppression, and a persistent session
//! with queued messages and a retained message surviving a reopen of the core on the same
//! (real, local) storage.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tributary_core::{Core, CoreConfig};
use tributary_proto::v1::{self, session_command::Command, session_event::Event};
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

async fn open(dir: &Path) -> Core {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    Core::open(log, meta, CoreConfig::default()).await.unwrap()
}

struct Conn {
    tx: mpsc::UnboundedSender<Result<v1::SessionCommand, tonic::Status>>,
    rx: mpsc::Receiver<Box<v1::SessionEvent>>,
    rid: u64,
}

impl Conn {
    async fn open(core: &Core, client: &str, clean: bool, expiry_ms: i64) -> (Conn, bool) {
        let (tx, cmd_rx) = mpsc::unbounded_channel();
        let rx = core.attach_session(UnboundedReceiverStream::new(cmd_rx));
        let mut c = Conn { tx, rx, rid: 0 };
        c.send(Command::Open(v1::SessionOpen {
            client_id: client.into(),
            clean_start: clean,
            expiry_interval_ms: expiry_ms,
            receive_maximum: 100,
            ..Default::default()
        }));
        match c.next().await {
            Event::Opened(o) => (c, o.session_present),
            other => panic!("expected Opened, got {other:?}"),
        }
    }

    fn send(&mut self, command: Command) {
        self.rid += 1;
        self.tx
            .send(Ok(v1::SessionCommand {
                request_id: self.rid,
                command: Some(command),
            }))
            .unwrap();
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
            .await
            .expect("no event within 5 s")
            .expect("stream ended")
            .event
            .unwrap()
    }

    async fn subscribe(&mut self, filter: &str, qos: u32) {
        self.send(Command::Subscribe(v1::SessionSubscribe {
            subscriptions: vec![v1::SessionSubscription {
                filter: filter.into(),
                qos,
                ..Default::default()
            }],
        }));
        loop {
            match self.next().await {
                Event::Subscribed(r) => break assert_eq!(r.codes, vec![qos]),
                // Messages published meanwhile may come first: MQTT lets a server start
                // sending what a subscription matches before its SUBACK (3.1.1, 3.8.4).
                Event::Delivery(_) => {}
                other => panic!("expected Subscribed, got {other:?}"),
            }
        }
    }

    async fn publish(
        &mut self,
        topic: &str,
        payload: &str,
        qos: u32,
        retain: bool,
        packet_id: u32,
    ) -> v1::PublishResult {
        self.send(Command::Publish(v1::SessionPublish {
            message: Some(message(topic, payload, qos, retain)),
            packet_id,
        }));
        match self.next().await {
            Event::Published(r) => r,
            other => panic!("expected Published, got {other:?}"),
        }
    }

    async fn delivery(&mut self) -> v1::SessionDelivery {
        match self.next().await {
            Event::Delivery(d) => d,
            other => panic!("expected Delivery, got {other:?}"),
        }
    }
}

fn message(topic: &str, payload: &str, qos: u32, retain: bool) -> v1::RoutedMessage {
    v1::RoutedMessage {
        record: Some(v1::Record {
            value: Bytes::from(payload.to_string()),
            properties: Some(v1::SystemProperties {
                address: topic.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        qos,
        retain,
    }
}

fn payload(d: &v1::SessionDelivery) -> String {
    let m = d.message.as_ref().unwrap();
    String::from_utf8(m.record.as_ref().unwrap().value.to_vec()).unwrap()
}

#[tokio::test]
async fn routing_downgrades_qos_and_suppresses_qos2_resends() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    let (mut sub, _) = Conn::open(&core, "sub", true, 0).await;
    sub.subscribe("a/+", 1).await;
    let (mut publisher, _) = Conn::open(&core, "pub", true, 0).await;

    let r = publisher.publish("a/x", "two", 2, false, 7).await;
    assert_eq!((r.matched, r.duplicate), (1, false));
    // The same QoS 2 packet id again before PUBREL: not routed a second time.
    let r = publisher.publish("a/x", "two", 2, false, 7).await;
    assert!(r.duplicate);
    // The release is answered once stored (the gateway's PUBCOMP waits for it).
    publisher.send(Command::Release(v1::SessionRelease { packet_id: 7 }));
    match publisher.next().await {
        Event::Released(true) => {}
        other => panic!("expected Released, got {other:?}"),
    }
    let r = publisher.publish("b", "nobody", 1, false, 0).await;
    assert_eq!(r.matched, 0);

    let d = sub.delivery().await;
    assert_eq!(
        (payload(&d), d.message.as_ref().unwrap().qos),
        ("two".into(), 1)
    );
    assert!(d.packet_id > 0);
    // Nothing else arrived: the next event is the answer to a fresh request.
    sub.send(Command::Unsubscribe(v1::SessionUnsubscribe {
        filters: vec!["a/+".into(), "zzz".into()],
    }));
    match sub.next().await {
        Event::Unsubscribed(u) => assert_eq!(u.existed, vec![true, false]),
        other => panic!("a second delivery or something else: {other:?}"),
    }
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_persistent_session_and_retained_messages_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = open(dir.path()).await;
        let (mut c, present) = Conn::open(&core, "keeper", true, -1).await;
        assert!(!present);
        c.subscribe("q/#", 2).await;
        c.send(Command::Close(v1::SessionClose::default()));
        assert!(matches!(c.next().await, Event::Closed(true)));

        let (mut p, _) = Conn::open(&core, "producer", true, 0).await;
        for i in 0..5 {
            let r = p
                .publish("q/1", &format!("m{i}"), 1 + i % 2, false, 0)
                .await;
            assert_eq!(r.matched, 1);
        }
        p.publish("r/1", "kept", 0, true, 0).await;
        // The shutdown closes the log only; sessions and retained messages were written to
        // the metadata store before the answers above, which is what a kill -9 leaves too
        // (compat-tests/mqtt kills the process for real).
        drop((c, p));
        core.shutdown().await.unwrap();
        drop(core);
    }
    let core = open(dir.path()).await;
    let (mut c, present) = Conn::open(&core, "keeper", false, -1).await;
    assert!(present, "session lost");
    let mut got = Vec::new();
    for _ in 0..5 {
        let d = c.delivery().await;
        got.push(payload(&d));
        c.send(Command::Ack(v1::SessionAck {
            packet_ids: vec![d.packet_id],
            received_only: false,
        }));
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    // The subscription came back too, and the retained message is there for a new one.
    let (mut p, _) = Conn::open(&core, "producer2", true, 0).await;
    assert_eq!(p.publish("q/2", "after", 1, false, 0).await.matched, 1);
    assert_eq!(payload(&c.delivery().await), "after");
    let (mut s, _) = Conn::open(&core, "late", true, 0).await;
    s.subscribe("r/#", 1).await;
    let d = s.delivery().await;
    assert_eq!(payload(&d), "kept");
    assert!(d.message.unwrap().retain);
    core.shutdown().await.unwrap();
}

/// Sessions have their own locks: publishers, subscribers and sessions that come and go
/// run on several threads at once, and every subscriber still gets each publisher's QoS 1
/// messages once each, in the order they were published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sessions_keep_every_publishers_order() {
    const PUBLISHERS: usize = 4;
    const PER_PUBLISHER: usize = 100;
    const SUBSCRIBERS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;

    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        // Two of them outlive their connection, so their copies are written first.
        let expiry = if i < 2 { -1 } else { 0 };
        let (mut c, _) = Conn::open(&core, &format!("sub{i}"), true, expiry).await;
        c.subscribe("load/#", 1).await;
        subscribers.push(tokio::spawn(async move {
            let mut got: Vec<Vec<usize>> = vec![Vec::new(); PUBLISHERS];
            for _ in 0..PUBLISHERS * PER_PUBLISHER {
                let d = c.delivery().await;
                let text = payload(&d);
                let (p, n) = text.split_once(':').unwrap();
                got[p.parse::<usize>().unwrap()].push(n.parse().unwrap());
                c.send(Command::Ack(v1::SessionAck {
                    packet_ids: vec![d.packet_id],
                    received_only: false,
                }));
            }
            got
        }));
    }
    // Sessions subscribing, unsubscribing and ending meanwhile, on other threads.
    let churn = {
        let core = core.clone();
        tokio::spawn(async move {
            for round in 0..20 {
                let (mut c, _) = Conn::open(&core, &format!("churn{}", round % 3), true, 0).await;
                c.subscribe("load/+", 1).await;
                c.send(Command::Unsubscribe(v1::SessionUnsubscribe {
                    filters: vec!["load/+".into()],
                }));
                loop {
                    if let Event::Unsubscribed(_) = c.next().await {
                        break;
                    }
                }
                c.send(Command::Close(v1::SessionClose::default()));
            }
        })
    };
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let core = core.clone();
        publishers.push(tokio::spawn(async move {
            let (mut c, _) = Conn::open(&core, &format!("pub{p}"), true, 0).await;
            for n in 0..PER_PUBLISHER {
                let r = c
                    .publish(&format!("load/{p}"), &format!("{p}:{n}"), 1, false, 0)
                    .await;
                assert!(r.matched >= SUBSCRIBERS as u32, "matched {}", r.matched);
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    churn.await.unwrap();
    let want: Vec<usize> = (0..PER_PUBLISHER).collect();
    for (i, s) in subscribers.into_iter().enumerate() {
        let got = s.await.unwrap();
        for (p, seq) in got.iter().enumerate() {
            assert_eq!(seq, &want, "subscriber {i}, publisher {p}");
        }
    }
    core.shutdown().await.unwrap();
}

/// A core and its metadata store, to look at what the core wrote.
async fn open_with_meta(dir: &Path) -> (Core, Arc<RedbMetaStore>) {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let core = Core::open(log, meta.clone(), CoreConfig::default())
        .await
        .unwrap();
    (core, meta)
}

/// Keys of one kind in a metadata store.
async fn stored(meta: &RedbMetaStore, kind: &str) -> usize {
    use tributary_storage::MetaStore;
    let mut prefix = kind.as_bytes().to_vec();
    prefix.push(b'/');
    meta.scan_prefix(&prefix, usize::MAX).await.unwrap().len()
}

/// A QoS 1 message queued for several persistent sessions is written once (each session
/// keeps a reference), comes back whole after a restart, and is deleted with its last copy.
#[tokio::test]
async fn a_message_for_several_persistent_sessions_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let clients = ["keep0", "keep1", "keep2"];
    let body = |i: usize| format!("m{i}-{}", "x".repeat(1024));
    {
        let (core, meta) = open_with_meta(dir.path()).await;
        for client in clients {
            let (mut c, _) = Conn::open(&core, client, true, -1).await;
            c.subscribe("once/#", 1).await;
            c.send(Command::Close(v1::SessionClose::default()));
            assert!(matches!(c.next().await, Event::Closed(true)));
        }
        let (mut p, _) = Conn::open(&core, "producer", true, 0).await;
        for i in 0..3 {
            assert_eq!(p.publish("once/a", &body(i), 1, false, 0).await.matched, 3);
        }
        // Written before the publishes were answered.
        assert_eq!(stored(&meta, "mqttbody").await, 3, "one body per message");
        assert_eq!(
            stored(&meta, "mqttpending").await,
            9,
            "one reference per copy"
        );
        drop((p, meta));
        core.shutdown().await.unwrap();
        drop(core);
    }
    let (core, meta) = open_with_meta(dir.path()).await;
    for (n, client) in clients.iter().enumerate() {
        let (mut c, present) = Conn::open(&core, client, false, -1).await;
        assert!(present);
        for i in 0..3 {
            let d = c.delivery().await;
            assert_eq!(payload(&d), body(i), "{client} after the restart");
            assert_eq!(d.message.as_ref().unwrap().qos, 1);
            c.send(Command::Ack(v1::SessionAck {
                packet_ids: vec![d.packet_id],
                received_only: false,
            }));
        }
        // Commands are served in order: this answer comes after the acks were written.
        c.send(Command::Unsubscribe(v1::SessionUnsubscribe {
            filters: vec!["none".into()],
        }));
        assert!(matches!(c.next().await, Event::Unsubscribed(_)));
        assert_eq!(stored(&meta, "mqttpending").await, 6 - 3 * n.min(2));
        let bodies = if n < 2 { 3 } else { 0 };
        assert_eq!(
            stored(&meta, "mqttbody").await,
            bodies,
            "after {client}'s acks"
        );
    }
    core.shutdown().await.unwrap();
}

/// A core that shuts down (a shard moving to another node, its node still running) ends its
/// attached sessions' streams, so that gateways drop the connections and their clients
/// reconnect to whoever serves the sessions next, rather than go on being served by a core
/// that no longer owns them.
#[tokio::test]
async fn a_core_shutting_down_ends_its_attached_session_streams() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    let (mut sub, _) = Conn::open(&core, "sub", false, 60_000).await;
    sub.subscribe("t/#", 1).await;
    let (mut idle, _) = Conn::open(&core, "idle", true, 0).await;
    core.shutdown().await.unwrap();
    for conn in [&mut sub, &mut idle] {
        // Told why first (a gateway answers MQTT 5 clients DISCONNECT 0x8B), then the end.
        match conn.next().await {
            Event::Error(e) => assert_eq!(e.code, v1::ErrorCode::ShuttingDown as i32, "{e:?}"),
            other => panic!("expected the shutdown, got {other:?}"),
        }
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while conn.rx.recv().await.is_some() {}
        })
        .await;
        assert!(end.is_ok(), "a session stream outlived its core's shutdown");
    }
}

/// A QoS 2 publish that could not be routed leaves its packet id free: the client's resend
/// (same id) is routed, not answered as a duplicate of a message that went nowhere.
#[tokio::test]
async fn a_qos2_publish_that_failed_is_routed_when_resent() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    // The topic is a stream too (mqtt_streams), one that refuses big records.
    let id = v1::StreamId::new("default", "small");
    let settings = tributary_core::meta::StreamSettings {
        max_message_bytes: Some(8),
        ..Default::default()
    };
    core.create_stream(id.clone(), 1, settings, false, false)
        .await
        .unwrap();
    let (mut sub, _) = Conn::open(&core, "sub", true, 0).await;
    sub.subscribe("small", 2).await;
    let (mut publisher, _) = Conn::open(&core, "pub", false, 60_000).await;
    publisher.send(Command::Publish(v1::SessionPublish {
        message: Some(message("small", "more than eight bytes", 2, false)),
        packet_id: 7,
    }));
    match publisher.next().await {
        Event::Error(e) => assert!(e.message.contains("byte"), "{e:?}"),
        other => panic!("expected the publish refused, got {other:?}"),
    }
    // The stream goes; the resend is routed to the subscriber.
    core.delete_stream(&id).await.unwrap();
    let resent = publisher
        .publish("small", "more than eight bytes", 2, false, 7)
        .await;
    assert!(!resent.duplicate, "{resent:?}");
    assert_eq!(payload(&sub.delivery().await), "more than eight bytes");
    // A resend of a routed one is a duplicate, as before.
    let again = publisher
        .publish("small", "more than eight bytes", 2, false, 7)
        .await;
    assert!(again.duplicate, "{again:?}");
    core.shutdown().await.unwrap();
}
