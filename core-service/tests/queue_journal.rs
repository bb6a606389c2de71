//! The durable queues' journal, driven through the AMQP channel stream a gateway uses: a
//! message pinned in a slow queue while a busy queue runs past it is copied forward, the
//! prefix behind it is truncated, and the message is still there after a reopen.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tributary_core::{ChannelEvents, Core, CoreConfig};
use tributary_proto::v1::{self, channel_command::Command, channel_event::Event};
use tributary_storage::LogStore;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

async fn open(dir: &Path) -> (Core, Arc<LocalLogStore>) {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let config = CoreConfig {
        queue_journal_compact_after: 8,
        ..CoreConfig::default()
    };
    (Core::open(log.clone(), meta, config).await.unwrap(), log)
}

struct Conn {
    tx: mpsc::UnboundedSender<Result<v1::ChannelCommand, tonic::Status>>,
    events: ChannelEvents,
    seq: u64,
}

impl Conn {
    async fn open(core: &Core) -> Conn {
        let (tx, rx) = mpsc::unbounded_channel();
        let events = core.attach_channels(UnboundedReceiverStream::new(rx));
        let mut c = Conn { tx, events, seq: 0 };
        c.send(Command::LinkOpen(v1::LinkOpen {
            vhost: "/".into(),
            user: "guest".into(),
            peer: "test".into(),
        }));
        c.send(Command::ChannelOpen(true));
        c.expect_ok(20, 11).await;
        c
    }

    fn send(&mut self, command: Command) {
        self.tx
            .send(Ok(v1::ChannelCommand {
                channel: 1,
                command: Some(command),
            }))
            .unwrap();
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(10), self.events.next())
            .await
            .expect("an event within 10 s")
            .expect("the stream is open")
            .event
            .expect("an event")
    }

    async fn expect_ok(&mut self, class_id: u32, method_id: u32) -> v1::MethodOk {
        match self.next().await {
            Event::Ok(ok) if (ok.class_id, ok.method_id) == (class_id, method_id) => ok,
            other => panic!("expected {class_id}.{method_id}-ok, got {other:?}"),
        }
    }

    async fn declare_durable(&mut self, name: &str) {
        self.send(Command::QueueDeclare(v1::QueueDeclare {
            name: name.into(),
            durable: true,
            ..Default::default()
        }));
        self.expect_ok(50, 11).await;
    }

    /// Publishes a persistent message and waits for its confirm.
    async fn publish_confirmed(&mut self, queue: &str, body: &str) {
        self.seq += 1;
        self.send(Command::Publish(v1::BasicPublish {
            exchange: String::new(),
            routing_key: queue.into(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            persistent: true,
            expiration_ms: -1,
            confirm_seq: self.seq,
            ..Default::default()
        }));
        match self.next().await {
            Event::Confirm(c) => assert!(c.ack && c.seq == self.seq, "{c:?}"),
            other => panic!("expected a confirm, got {other:?}"),
        }
    }

    async fn get(&mut self, queue: &str) -> Option<Bytes> {
        self.send(Command::Get(v1::BasicGet {
            queue: queue.into(),
            no_ack: true,
        }));
        match self.next().await {
            Event::GetOk(d) => Some(d.body),
            Event::GetEmpty(_) => None,
            other => panic!("expected get-ok or get-empty, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_message_is_copied_forward_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (core, log) = open(dir.path()).await;
    let mut c = Conn::open(&core).await;
    c.send(Command::ConfirmSelect(true));
    c.expect_ok(85, 11).await;
    c.declare_durable("slow").await;
    c.declare_durable("busy").await;
    c.publish_confirmed("slow", "pinned").await;
    // Each confirmed publish is its own journal batch; purging drops them again.
    for i in 0..40 {
        c.publish_confirmed("busy", &format!("m{i}")).await;
    }
    c.send(Command::QueuePurge("busy".into()));
    assert_eq!(c.expect_ok(50, 31).await.message_count, 40);
    // Maintenance runs at most once a second, on the next write after it is due.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.publish_confirmed("busy", "wake").await;
    let partitions = log.list_partitions().await.unwrap();
    assert_eq!(partitions.len(), 1, "one journal for every durable queue");
    let key = partitions[0];
    let mut truncated = false;
    for _ in 0..50 {
        if log.bounds(key).await.unwrap().start_offset > 0 {
            truncated = true;
            break;
        }
        // The truncation follows the compaction's fsync in the writer task; poll for it.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(truncated, "the prefix pinned by 'pinned' was not truncated");
    drop(c);
    core.shutdown().await.unwrap();
    drop(core);
    drop(log);

    let (core, _log) = open(dir.path()).await;
    let mut c = Conn::open(&core).await;
    assert_eq!(c.get("slow").await.as_deref(), Some(&b"pinned"[..]));
    assert_eq!(c.get("slow").await, None);
    assert_eq!(c.get("busy").await.as_deref(), Some(&b"wake"[..]));
    assert_eq!(c.get("busy").await, None, "purged messages stay gone");
    core.shutdown().await.unwrap();
}
