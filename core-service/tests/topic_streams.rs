//! Streams as MQTT topics of the same name, through the core's neutral API: records
//! appended to a stream (envelope or opaque, in or out of transactions) reach the sessions
//! that subscribe to a matching filter; a session's publish to the topic is appended to the
//! stream and reaches subscribers once; the position survives a reopen of the core.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tributary_core::{Core, CoreConfig, RecordDecoders};
use tributary_proto::v1::{self, session_command::Command, session_event::Event};
use tributary_storage::StorageError;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

/// A made-up opaque format: values separated by commas.
const CSV_FORMAT: &str = "test.csv";

async fn open(dir: &Path) -> Core {
    // A reopen may come while the last connection's task of the previous core still holds
    // it (and so the log's lock) for a moment: wait for the lock, with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        match LocalLogStore::open(dir.join("log"), LocalLogConfig::default()) {
            Ok(log) => break log,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(matches!(e, StorageError::Locked { .. }), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let decoders = RecordDecoders::default().with(
        CSV_FORMAT,
        Arc::new(|b: &Bytes| {
            let text = std::str::from_utf8(b).map_err(|e| e.to_string())?;
            Ok(text
                .split(',')
                .map(|v| v1::Record {
                    value: Bytes::from(v.to_string()),
                    ..Default::default()
                })
                .collect())
        }),
    );
    let config = CoreConfig {
        record_decoders: decoders,
        ..CoreConfig::default()
    };
    Core::open(log, meta, config).await.unwrap()
}

fn sid(name: &str) -> v1::StreamId {
    v1::StreamId::new(String::new(), name.to_string())
}

struct Session {
    tx: mpsc::UnboundedSender<Result<v1::SessionCommand, tonic::Status>>,
    rx: mpsc::Receiver<Box<v1::SessionEvent>>,
    rid: u64,
}

impl Session {
    async fn open(core: &Core, client: &str, expiry_ms: i64) -> Session {
        let (tx, cmd_rx) = mpsc::unbounded_channel();
        let rx = core.attach_session(UnboundedReceiverStream::new(cmd_rx));
        let mut s = Session { tx, rx, rid: 0 };
        s.send(Command::Open(v1::SessionOpen {
            client_id: client.into(),
            clean_start: false,
            expiry_interval_ms: expiry_ms,
            receive_maximum: 1000,
            ..Default::default()
        }));
        assert!(matches!(s.next().await, Event::Opened(_)));
        s
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
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("no event within 10 s")
            .expect("stream ended")
            .event
            .unwrap()
    }

    /// A QoS 1 publish from this (MQTT) session, acknowledged.
    async fn publish(&mut self, topic: &str, payload: &str, packet_id: u32) {
        self.send(Command::Publish(v1::SessionPublish {
            message: Some(v1::RoutedMessage {
                record: Some(v1::Record {
                    value: Bytes::from(payload.to_string()),
                    properties: Some(v1::SystemProperties {
                        address: topic.into(),
                        origin_protocol: "mqtt".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                qos: 1,
                retain: false,
            }),
            packet_id,
        }));
        assert!(matches!(self.next().await, Event::Published(_)));
    }

    async fn subscribe(&mut self, filter: &str) {
        self.send(Command::Subscribe(v1::SessionSubscribe {
            subscriptions: vec![v1::SessionSubscription {
                filter: filter.into(),
                qos: 1,
                ..Default::default()
            }],
        }));
        assert!(matches!(self.next().await, Event::Subscribed(_)));
    }

    /// The next delivery, acknowledged: (topic, payload, record).
    async fn delivery(&mut self) -> (String, String, v1::Record) {
        let d = match self.next().await {
            Event::Delivery(d) => d,
            other => panic!("expected a delivery, got {other:?}"),
        };
        let m = d.message.unwrap();
        assert_eq!(m.qos, 1);
        self.send(Command::Ack(v1::SessionAck {
            packet_ids: vec![d.packet_id],
            ..Default::default()
        }));
        let r = m.record.unwrap();
        let p = r.properties.clone().unwrap_or_default();
        (p.address, String::from_utf8_lossy(&r.value).into(), r)
    }
}

async fn append(core: &Core, stream: &str, batch: v1::RecordBatch) {
    core.append(v1::AppendRequest {
        stream: Some(sid(stream)),
        partition: 0,
        batch: Some(batch),
        auto_create: false,
        defer_durable: false,
    })
    .await
    .unwrap();
}

/// The first record of partition 0 of `stream` from `offset`.
async fn first_record(core: &Core, stream: &str, offset: i64) -> v1::Record {
    let fetched = core
        .fetch(v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: Some(sid(stream)),
                partition: 0,
                offset,
                max_bytes: 0,
            }],
            max_bytes: 1 << 20,
            min_bytes: 0,
            max_wait_ms: 0,
            read_committed: false,
        })
        .await
        .unwrap();
    fetched.partitions[0].batches[0].records[0].clone()
}

fn records(values: &[&str]) -> v1::RecordBatch {
    v1::RecordBatch {
        records: values
            .iter()
            .map(|v| v1::Record {
                key: Bytes::from_static(b"k"),
                value: Bytes::from(v.to_string()),
                headers: vec![v1::Header {
                    name: "h".into(),
                    value: Bytes::from_static(b"1"),
                }],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_records_reach_matching_sessions_and_publishes_reach_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    core.create_stream(sid("plant/temps"), 1, Default::default(), false, false)
        .await
        .unwrap();
    let mut sub = Session::open(&core, "sub", 0).await;
    sub.subscribe("plant/+").await;

    // Envelope records, then an opaque batch the decoder reads, then one it cannot.
    append(&core, "plant/temps", records(&["a", "b"])).await;
    append(
        &core,
        "plant/temps",
        v1::RecordBatch {
            opaque: Bytes::from_static(b"c,d"),
            opaque_format: CSV_FORMAT.into(),
            record_count: 2,
            ..Default::default()
        },
    )
    .await;
    append(
        &core,
        "plant/temps",
        v1::RecordBatch {
            opaque: Bytes::from_static(b"?"),
            opaque_format: "nobody.knows".into(),
            record_count: 1,
            ..Default::default()
        },
    )
    .await;
    append(&core, "plant/temps", records(&["e"])).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let (topic, value, record) = sub.delivery().await;
        assert_eq!(topic, "plant/temps");
        if value == "a" {
            assert_eq!(record.headers[0].name, "h");
            assert_eq!(record.key, Bytes::from_static(b"k"));
            assert!(record.timestamp_ms > 0, "the append time stands in");
        }
        got.push(value);
    }
    assert_eq!(got, ["a", "b", "c", "d", "e"]);

    // A publish to the topic is appended (the topic as key) and delivered once.
    let mut publisher = Session::open(&core, "pub", 0).await;
    publisher.publish("plant/temps", "from-mqtt", 1).await;
    let (_, value, _) = sub.delivery().await;
    assert_eq!(value, "from-mqtt");
    let stored = first_record(&core, "plant/temps", 6).await;
    assert_eq!(stored.value, Bytes::from_static(b"from-mqtt"));
    assert_eq!(stored.key, Bytes::from_static(b"plant/temps"));
    // The next append shows the publish was not forwarded a second time.
    append(&core, "plant/temps", records(&["f"])).await;
    assert_eq!(sub.delivery().await.1, "f");

    // Topics with no stream route as before and append nothing.
    publisher.publish("plant/other", "plain", 2).await;
    assert_eq!(sub.delivery().await.0, "plant/other");
    assert!(core.describe_stream(&sid("plant/other")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_are_skipped_and_the_position_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = open(dir.path()).await;
        core.create_stream(sid("orders"), 1, Default::default(), false, false)
            .await
            .unwrap();
        let mut sub = Session::open(&core, "durable", -1).await;
        sub.subscribe("orders").await;
        let p = core
            .init_producer(v1::InitProducerRequest {
                namespace: String::new(),
                transactional_id: "tx".into(),
                producer_id: -1,
                producer_epoch: -1,
                transaction_timeout_ms: 60_000,
            })
            .await
            .unwrap();
        for (seq, (value, commit)) in [("aborted", false), ("committed", true)]
            .into_iter()
            .enumerate()
        {
            core.add_txn_partitions(v1::AddPartitionsRequest {
                producer: Some(v1::TxnProducer {
                    namespace: String::new(),
                    transactional_id: "tx".into(),
                    producer_id: p.producer_id,
                    producer_epoch: p.producer_epoch,
                }),
                partitions: vec![v1::TxnPartition {
                    stream: Some(sid("orders")),
                    partition: 0,
                }],
                verify_only: false,
            })
            .await
            .unwrap();
            let mut batch = records(&[value]);
            batch.producer_id = p.producer_id;
            batch.producer_epoch = p.producer_epoch;
            batch.base_sequence = seq as i32;
            batch.transactional = true;
            append(&core, "orders", batch).await;
            core.end_transaction(v1::EndTransactionRequest {
                namespace: String::new(),
                transaction_id: "tx".into(),
                commit,
                producer_id: p.producer_id,
                producer_epoch: p.producer_epoch,
            })
            .await
            .unwrap();
        }
        append(&core, "orders", records(&["after"])).await;
        assert_eq!(sub.delivery().await.1, "committed");
        assert_eq!(sub.delivery().await.1, "after");
        // Answered after the acks before it: nothing is left to deliver again.
        sub.subscribe("orders").await;
        drop(sub);
        core.shutdown().await.unwrap();
    }
    // Reopened: what was forwarded is not forwarded again (it would come first); what
    // comes next is.
    let core = open(dir.path()).await;
    let mut sub = Session::open(&core, "durable", -1).await;
    append(&core, "orders", records(&["reopened"])).await;
    assert_eq!(sub.delivery().await.1, "reopened");
}

fn qid(name: &str) -> v1::QueueId {
    v1::QueueId {
        namespace: String::new(),
        name: name.into(),
    }
}

/// Receives `n` messages of a queue (long polls), acknowledged.
async fn receive(core: &Core, queue: &str, n: usize) -> Vec<v1::Record> {
    let mut got = Vec::new();
    while got.len() < n {
        let msgs = core
            .receive(v1::ReceiveRequest {
                queue: Some(qid(queue)),
                max_messages: 10,
                visibility_timeout_ms: 30_000,
                wait_time_ms: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!msgs.is_empty(), "{queue}: {} of {n} messages", got.len());
        let leases: Vec<String> = msgs.iter().map(|m| m.lease_id.clone()).collect();
        core.ack(&qid(queue), &leases).await.unwrap();
        got.extend(msgs.into_iter().filter_map(|m| m.record));
    }
    got
}

fn values(records: &[v1::Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_an_address_that_appends_and_feeds_its_bound_queues() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    core.create_stream(sid("events"), 2, Default::default(), false, false)
        .await
        .unwrap();
    // The stream's address exists with it, of kind stream; it cannot be made by hand for a
    // name that is no stream, nor deleted on its own.
    let described = core
        .declare_address(v1::DeclareAddressRequest {
            name: "events".into(),
            passive: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(described.kind, v1::AddressKind::Stream as i32);
    assert!(
        core.declare_address(v1::DeclareAddressRequest {
            name: "no-such-stream".into(),
            kind: v1::AddressKind::Stream as i32,
            durable: true,
            ..Default::default()
        })
        .await
        .is_err()
    );
    assert!(core.delete_address("", "events", false).await.is_err());

    for q in ["audit", "billing"] {
        core.declare_queue(v1::DeclareQueueRequest {
            id: Some(qid(q)),
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();
        core.bind(v1::Binding {
            source_address: "events".into(),
            destination: Some(v1::binding::Destination::Queue(q.into())),
            pattern: "ignored".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // A binding to a stream could loop: refused.
    assert!(
        core.bind(v1::Binding {
            source_address: "events".into(),
            destination: Some(v1::binding::Destination::Stream("events".into())),
            ..Default::default()
        })
        .await
        .is_err()
    );

    // Publishing to the address appends (routing key as key); appends reach both queues.
    let published = core
        .publish(v1::PublishRequest {
            address: "events".into(),
            routing_key: "user-7".into(),
            records: vec![v1::Record {
                value: Bytes::from_static(b"published"),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(published.routed, vec![1]);
    append(
        &core,
        "events",
        v1::RecordBatch {
            opaque: Bytes::from_static(b"x,y"),
            opaque_format: CSV_FORMAT.into(),
            record_count: 2,
            ..Default::default()
        },
    )
    .await;
    for q in ["audit", "billing"] {
        let got = receive(&core, q, 3).await;
        let mut vals = values(&got);
        vals.sort();
        assert_eq!(vals, ["published", "x", "y"], "{q}");
        let p = got
            .iter()
            .find(|r| r.value == Bytes::from_static(b"published"))
            .unwrap();
        assert_eq!(p.key, Bytes::from_static(b"user-7"));
        assert_eq!(p.properties.as_ref().unwrap().publish_address, "events");
        assert_eq!(p.properties.as_ref().unwrap().address, "user-7");
    }
    // The stream holds the published record under its routing key.
    let info = core.describe_stream(&sid("events")).await.unwrap();
    let total: i64 = info.partition_info.iter().map(|p| p.end_offset).sum();
    assert_eq!(total, 3);

    // The address goes with the stream, and its bindings with it.
    core.delete_stream(&sid("events")).await.unwrap();
    assert!(
        core.declare_address(v1::DeclareAddressRequest {
            name: "events".into(),
            passive: true,
            ..Default::default()
        })
        .await
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_map_mqtt_filters_onto_a_stream_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    // The rule makes the stream; it is a binding of the rules' address, listed as one.
    core.declare_mqtt_rule("", "sensors/#", "sensors")
        .await
        .unwrap();
    core.declare_mqtt_rule("", "sensors/#", "sensors")
        .await
        .unwrap();
    let rules = core.list_bindings("", tributary_core::MQTT_RULES_ADDRESS);
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].pattern, "sensors/#");
    assert!(
        core.declare_mqtt_rule("", "bad/#/filter", "x")
            .await
            .is_err()
    );

    let mut sub = Session::open(&core, "sub", 0).await;
    sub.subscribe("sensors/+/temp").await;
    let mut publisher = Session::open(&core, "pub", 0).await;
    publisher.publish("sensors/room1/temp", "21.5", 1).await;
    assert_eq!(
        sub.delivery().await.0,
        "sensors/room1/temp",
        "routed to the subscriber when published"
    );
    // Appended to the stream, the topic as key.
    let stored = first_record(&core, "sensors", 0).await;
    assert_eq!(stored.key, Bytes::from_static(b"sensors/room1/temp"));

    // Records appended by others go to the topic their key names, if a rule matches it.
    let mut batch = records(&["22.0"]);
    batch.records[0].key = Bytes::from_static(b"sensors/room2/temp");
    append(&core, "sensors", batch).await;
    let (topic, value, _) = sub.delivery().await;
    assert_eq!(
        (topic.as_str(), value.as_str()),
        ("sensors/room2/temp", "22.0")
    );

    // The rule survives a reopen.
    drop((sub, publisher));
    core.shutdown().await.unwrap();
    drop(core);
    let core = open(dir.path()).await;
    assert_eq!(
        core.list_bindings("", tributary_core::MQTT_RULES_ADDRESS)
            .len(),
        1
    );
}

fn delayed(values: &[(&str, i64)]) -> v1::RecordBatch {
    v1::RecordBatch {
        records: values
            .iter()
            .map(|(v, at)| v1::Record {
                key: Bytes::from(v.to_string()),
                value: Bytes::from(v.to_string()),
                properties: Some(v1::SystemProperties {
                    deliver_at_ms: *at,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The values of partition `p` of `stream` from `from`, waiting (long polls) until `want`
/// are there or 20 s have passed.
async fn values_of(core: &Core, stream: &str, p: u32, from: i64, want: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    let mut offset = from;
    while out.len() < want && std::time::Instant::now() < deadline {
        let fetched = core
            .fetch(v1::FetchRequest {
                partitions: vec![v1::FetchPartition {
                    stream: Some(sid(stream)),
                    partition: p,
                    offset,
                    max_bytes: 0,
                }],
                max_bytes: 1 << 20,
                min_bytes: 1,
                max_wait_ms: 500,
                read_committed: false,
            })
            .await
            .unwrap();
        for b in &fetched.partitions[0].batches {
            for r in &b.records {
                out.push(String::from_utf8_lossy(&r.value).into_owned());
            }
            offset = b.base_offset + i64::from(b.record_count.max(b.records.len() as u32));
        }
    }
    out
}

fn delay_line_to(target: &str) -> tributary_core::meta::StreamSettings {
    tributary_core::meta::StreamSettings {
        delay_target: Some(target.into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_line_appends_to_its_target_when_due_exactly_once_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let due;
    {
        let core = open(dir.path()).await;
        core.create_stream(sid("orders"), 2, Default::default(), false, false)
            .await
            .unwrap();
        core.create_stream(
            sid("orders.later"),
            2,
            delay_line_to("orders"),
            false,
            false,
        )
        .await
        .unwrap();
        // Loops and chains are refused when declared.
        for (name, settings) in [
            ("self", delay_line_to("self")),
            ("chain", delay_line_to("orders.later")),
        ] {
            let e = core
                .create_stream(sid(name), 1, settings, false, false)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("delay"), "{e}");
        }
        let e = core
            .update_stream_config(&sid("orders"), delay_line_to("x"), &[], false)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("delay target of 'orders.later'"),
            "{e}"
        );

        // Records due later, interleaved with records due at once, in partition 1.
        due = now_ms() + 4_000;
        core.append(v1::AppendRequest {
            stream: Some(sid("orders.later")),
            partition: 1,
            batch: Some(delayed(&[("a", due), ("b", 0), ("c", due), ("d", 0)])),
            auto_create: false,
            defer_durable: false,
        })
        .await
        .unwrap();
        // Those due at once arrive first, in order, in the same partition of the target.
        assert_eq!(values_of(&core, "orders", 1, 0, 2).await, ["b", "d"]);
        assert!(now_ms() < due, "the test machine was too slow to tell");
        let nothing_yet = core
            .fetch(v1::FetchRequest {
                partitions: vec![v1::FetchPartition {
                    stream: Some(sid("orders")),
                    partition: 1,
                    offset: 2,
                    max_bytes: 0,
                }],
                max_bytes: 1 << 20,
                min_bytes: 0,
                max_wait_ms: 0,
                read_committed: false,
            })
            .await
            .unwrap();
        assert!(nothing_yet.partitions[0].batches.is_empty());
        core.shutdown().await.unwrap();
    }
    // The delayed ones survive the restart and arrive once, not before they are due.
    let core = open(dir.path()).await;
    assert_eq!(values_of(&core, "orders", 1, 2, 2).await, ["a", "c"]);
    assert!(now_ms() >= due);
    // A sentinel through the same line: nothing was scheduled twice.
    core.append(v1::AppendRequest {
        stream: Some(sid("orders.later")),
        partition: 1,
        batch: Some(delayed(&[("end", 0)])),
        auto_create: false,
        defer_durable: false,
    })
    .await
    .unwrap();
    assert_eq!(
        values_of(&core, "orders", 1, 0, 5).await,
        ["b", "d", "a", "c", "end"]
    );
    assert!(values_of(&core, "orders", 0, 0, 0).await.is_empty());

    // A stream made a delay line later begins with what is appended from then on.
    core.create_stream(sid("plain"), 1, Default::default(), false, false)
        .await
        .unwrap();
    append(&core, "plain", delayed(&[("before", 0)])).await;
    core.update_stream_config(&sid("plain"), delay_line_to("orders"), &[], false)
        .await
        .unwrap();
    append(&core, "plain", delayed(&[("after", 0)])).await;
    assert_eq!(values_of(&core, "orders", 0, 0, 1).await, ["after"]);
    core.shutdown().await.unwrap();
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
