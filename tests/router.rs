//! The router through the gRPC `Admin` and `Streams.Publish` APIs, from a plain tonic
//! client: fanout, direct, topic (AMQP), MQTT-topic and headers addresses, address-to-address
//! bindings (cycles included), bindings to streams, bad input, and bindings across `kill -9`.

mod common;

use bytes::Bytes;
use common::queue_api::{Api, api, qid};
use common::{Server, free_port_args};
use tributary_gateway_common::error_code;
use tributary_proto::v1::{self, AddressKind, ErrorCode, binding::Destination};

impl Api {
    async fn queue(&mut self, name: &str) {
        self.admin
            .declare_queue(v1::DeclareQueueRequest {
                id: qid(name),
                durable: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn address(&mut self, name: &str, kind: AddressKind) {
        let created = self
            .admin
            .declare_address(v1::DeclareAddressRequest {
                namespace: "default".into(),
                name: name.into(),
                kind: kind as i32,
                durable: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .created;
        assert!(created);
    }

    async fn bind(&mut self, source: &str, dest: Destination, pattern: &str) {
        self.bind_args(source, dest, pattern, &[]).await;
    }

    async fn bind_args(
        &mut self,
        source: &str,
        dest: Destination,
        pattern: &str,
        args: &[(&str, &str)],
    ) {
        self.admin
            .bind(v1::BindRequest {
                binding: Some(binding(source, dest, pattern, args)),
            })
            .await
            .unwrap();
    }

    async fn publish(&mut self, address: &str, key: &str, headers: &[(&str, &str)]) -> u32 {
        let routed = self
            .streams
            .publish(v1::PublishRequest {
                namespace: "default".into(),
                address: address.into(),
                routing_key: key.into(),
                records: vec![v1::Record {
                    value: Bytes::from(format!("{address}:{key}")),
                    headers: headers
                        .iter()
                        .map(|(n, v)| v1::Header {
                            name: n.to_string(),
                            value: Bytes::from(v.to_string()),
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .routed;
        routed[0]
    }
}

fn binding(source: &str, dest: Destination, pattern: &str, args: &[(&str, &str)]) -> v1::Binding {
    v1::Binding {
        namespace: "default".into(),
        source_address: source.into(),
        destination: Some(dest),
        pattern: pattern.into(),
        arguments: args
            .iter()
            .map(|(n, v)| v1::Header {
                name: n.to_string(),
                value: Bytes::from(v.to_string()),
            })
            .collect(),
    }
}

fn q(name: &str) -> Destination {
    Destination::Queue(name.into())
}

#[tokio::test]
async fn fanout_reaches_every_queue_and_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    for name in ["f1", "f2", "f3"] {
        a.queue(name).await;
    }
    a.admin
        .create_stream(v1::CreateStreamRequest {
            id: Some(v1::StreamId::new("default", "audit")),
            partitions: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    a.address("events", AddressKind::Fanout).await;
    for name in ["f1", "f2", "f3"] {
        a.bind("events", q(name), "").await;
    }
    a.bind("events", Destination::Stream("audit".into()), "")
        .await;
    assert_eq!(a.publish("events", "any", &[]).await, 4);
    for name in ["f1", "f2", "f3"] {
        assert_eq!(a.drain(name).await, vec!["events:any"]);
    }
    let fetched = a
        .streams
        .fetch(v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: Some(v1::StreamId::new("default", "audit")),
                partition: 0,
                offset: 0,
                max_bytes: 0,
            }],
            max_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let records: Vec<_> = fetched.partitions[0]
        .batches
        .iter()
        .flat_map(|b| b.records.iter())
        .collect();
    assert_eq!(records.len(), 1);
    assert_eq!(&records[0].value[..], b"events:any");
}

#[tokio::test]
async fn direct_topic_mqtt_and_headers_addresses_match_their_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    for name in ["d", "t1", "t2", "m1", "m2", "hall", "hany"] {
        a.queue(name).await;
    }
    a.address("dx", AddressKind::Direct).await;
    a.bind("dx", q("d"), "red").await;
    assert_eq!(a.publish("dx", "red", &[]).await, 1);
    assert_eq!(a.publish("dx", "blue", &[]).await, 0);
    assert_eq!(a.drain("d").await, vec!["dx:red"]);

    a.address("tx", AddressKind::Topic).await;
    a.bind("tx", q("t1"), "stock.*.nyse").await;
    a.bind("tx", q("t2"), "stock.#").await;
    assert_eq!(a.publish("tx", "stock.ibm.nyse", &[]).await, 2);
    assert_eq!(a.publish("tx", "stock", &[]).await, 1);
    assert_eq!(a.publish("tx", "bond.x", &[]).await, 0);
    assert_eq!(a.drain("t1").await, vec!["tx:stock.ibm.nyse"]);
    assert_eq!(a.drain("t2").await, vec!["tx:stock.ibm.nyse", "tx:stock"]);

    a.address("mx", AddressKind::MqttTopic).await;
    a.bind("mx", q("m1"), "sensors/+/temp").await;
    a.bind("mx", q("m2"), "#").await;
    assert_eq!(a.publish("mx", "sensors/k1/temp", &[]).await, 2);
    assert_eq!(a.publish("mx", "$SYS/uptime", &[]).await, 0);
    assert_eq!(a.drain("m1").await, vec!["mx:sensors/k1/temp"]);
    assert_eq!(a.drain("m2").await, vec!["mx:sensors/k1/temp"]);
    // MQTT filters are checked: '#' only last.
    let bad = a
        .admin
        .bind(v1::BindRequest {
            binding: Some(binding("mx", q("m1"), "a/#/b", &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&bad), ErrorCode::InvalidArgument);

    a.address("hx", AddressKind::Headers).await;
    a.bind_args(
        "hx",
        q("hall"),
        "",
        &[("x-match", "all"), ("format", "pdf"), ("type", "report")],
    )
    .await;
    a.bind_args(
        "hx",
        q("hany"),
        "",
        &[("x-match", "any"), ("format", "pdf"), ("type", "report")],
    )
    .await;
    assert_eq!(
        a.publish("hx", "", &[("format", "pdf"), ("type", "report")])
            .await,
        2
    );
    assert_eq!(a.publish("hx", "", &[("format", "pdf")]).await, 1);
    assert_eq!(a.publish("hx", "", &[("format", "zip")]).await, 0);
    assert_eq!(a.drain("hall").await.len(), 1);
    assert_eq!(a.drain("hany").await.len(), 2);
}

#[tokio::test]
async fn addresses_bound_to_addresses_route_once_even_in_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    a.queue("end").await;
    a.address("a", AddressKind::Fanout).await;
    a.address("b", AddressKind::Fanout).await;
    a.bind("a", Destination::Address("b".into()), "").await;
    a.bind("b", Destination::Address("a".into()), "").await;
    a.bind("a", q("end"), "").await;
    a.bind("b", q("end"), "").await;
    assert_eq!(a.publish("b", "k", &[]).await, 1);
    assert_eq!(a.drain("end").await, vec!["b:k"]);
}

#[tokio::test]
async fn bad_bindings_and_unbinds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    a.address("x", AddressKind::Direct).await;
    let missing_queue = a
        .admin
        .bind(v1::BindRequest {
            binding: Some(binding("x", q("nope"), "k", &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&missing_queue), ErrorCode::QueueNotFound);
    let missing_source = a
        .admin
        .bind(v1::BindRequest {
            binding: Some(binding("nope", q("nope"), "k", &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&missing_source), ErrorCode::AddressNotFound);
    let publish_missing = a
        .streams
        .publish(v1::PublishRequest {
            namespace: "default".into(),
            address: "nope".into(),
            routing_key: "k".into(),
            records: vec![v1::Record::default()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&publish_missing), ErrorCode::AddressNotFound);
    // Unbinding what is not there (even from a missing address) succeeds, as in RabbitMQ.
    for source in ["x", "nope"] {
        a.admin
            .unbind(v1::UnbindRequest {
                binding: Some(binding(source, q("nope"), "k", &[])),
            })
            .await
            .unwrap();
    }
    let no_kind = a
        .admin
        .declare_address(v1::DeclareAddressRequest {
            namespace: "default".into(),
            name: "y".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&no_kind), ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn bindings_survive_kill_9_and_go_with_their_queue() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    a.queue("keep").await;
    a.queue("drop").await;
    a.address("t", AddressKind::Topic).await;
    a.bind("t", q("keep"), "a.*").await;
    a.bind("t", q("drop"), "a.#").await;
    drop(a);
    server.kill9();

    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    assert_eq!(a.publish("t", "a.b", &[]).await, 2);
    a.admin
        .delete_queue(v1::DeleteQueueRequest {
            id: qid("drop"),
            ..Default::default()
        })
        .await
        .unwrap();
    let bindings = a
        .admin
        .list_bindings(v1::ListBindingsRequest {
            namespace: "default".into(),
            source_address: "t".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .bindings;
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0].pattern, "a.*");
    assert_eq!(a.publish("t", "a.b", &[]).await, 1);
    assert_eq!(a.drain("keep").await, vec!["t:a.b", "t:a.b"]);
}

#[tokio::test]
async fn dead_letters_route_through_an_address_with_their_original_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    a.queue("dead-orders").await;
    a.address("dlx", AddressKind::Topic).await;
    a.bind("dlx", q("dead-orders"), "orders.#").await;
    a.address("in", AddressKind::Direct).await;
    a.admin
        .declare_queue(v1::DeclareQueueRequest {
            id: qid("work"),
            durable: true,
            config: Some(v1::QueueConfig {
                dead_letter_address: Some("dlx".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    a.bind("in", q("work"), "orders.eu").await;
    assert_eq!(a.publish("in", "orders.eu", &[]).await, 1);
    let got = a
        .queues
        .receive(v1::ReceiveRequest {
            queue: qid("work"),
            max_messages: 1,
            visibility_timeout_ms: 30_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    let p = got[0].record.as_ref().unwrap().properties.clone().unwrap();
    assert_eq!(
        (p.publish_address.as_str(), p.address.as_str()),
        ("in", "orders.eu")
    );
    a.queues
        .nack(v1::NackRequest {
            queue: qid("work"),
            lease_ids: vec![got[0].lease_id.clone()],
            requeue: false,
            delay_ms: 0,
        })
        .await
        .unwrap();
    let dead = a
        .queues
        .receive(v1::ReceiveRequest {
            queue: qid("dead-orders"),
            max_messages: 1,
            visibility_timeout_ms: 30_000,
            wait_time_ms: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(dead.len(), 1);
    let p = dead[0].record.as_ref().unwrap().properties.clone().unwrap();
    assert_eq!(p.dead_letter_reason, "rejected");
    assert_eq!(p.dead_letter_queue, "work");
    assert_eq!(p.publish_address, "dlx");
    assert_eq!(p.address, "orders.eu");
    assert_eq!(p.dead_letter_original_address, "in");
    assert_eq!(p.dead_letter_original_key, "orders.eu");
}

/// Total bytes of the log files under a data directory.
fn log_bytes(dir: &std::path::Path) -> u64 {
    common::file_sizes_with_extension(&dir.join("log"), "log")
        .iter()
        .sum()
}

/// A publish routed to several queues is stored once: the bytes on disk grow by about one
/// copy, every queue reads it, it survives kill -9, and the shared copy is cut once every
/// queue has settled it.
#[tokio::test]
async fn fan_out_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    args.extend(["--segment-bytes".into(), "1048576".into()]);
    let server = Server::start(&args);
    let mut a = api(&server).await;
    for name in ["s1", "s2", "s3"] {
        a.queue(name).await;
    }
    a.address("fan", AddressKind::Fanout).await;
    for name in ["s1", "s2", "s3"] {
        a.bind("fan", q(name), "").await;
    }
    let before = log_bytes(dir.path());
    const N: usize = 40;
    const SIZE: usize = 100 * 1024;
    for i in 0..N {
        let mut v = format!("m{i:02}:").into_bytes();
        v.resize(SIZE, b'.');
        let routed = a
            .streams
            .publish(v1::PublishRequest {
                namespace: "default".into(),
                address: "fan".into(),
                records: vec![v1::Record {
                    value: Bytes::from(v),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .routed;
        assert_eq!(routed, vec![3]);
    }
    let grown = log_bytes(dir.path()) - before;
    let one_copy = (N * SIZE) as u64;
    assert!(
        grown >= one_copy && grown < one_copy * 3 / 2,
        "{grown} bytes written for {one_copy} bytes of records sent to 3 queues"
    );
    let prefix = |m: &v1::LeasedMessage| {
        String::from_utf8_lossy(&m.record.as_ref().unwrap().value[..4]).into_owned()
    };
    // s1 reads everything now; s2 half; s3 nothing yet.
    let all: Vec<String> = a.receive_all("s1", N).await.iter().map(prefix).collect();
    assert_eq!(all, (0..N).map(|i| format!("m{i:02}:")).collect::<Vec<_>>());
    let half: Vec<String> = a
        .receive_all("s2", N / 2)
        .await
        .iter()
        .map(prefix)
        .collect();
    assert_eq!(half.len(), N / 2);
    drop(a);
    server.kill9();

    let server = Server::start(&args);
    let mut a = api(&server).await;
    let rest2 = a.receive_all("s2", N / 2).await;
    assert_eq!(prefix(&rest2[0]), format!("m{:02}:", N / 2));
    let all3 = a.receive_all("s3", N).await;
    assert_eq!(all3.len(), N);
    assert_eq!(prefix(&all3[N - 1]), format!("m{:02}:", N - 1));
    // Everything is settled: the shared copy goes (the collector runs every few seconds).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while log_bytes(dir.path()) > before + one_copy / 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the shared bodies stayed: {} bytes",
            log_bytes(dir.path())
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A declare describes the address, new or existing: a passive declare (no kind given) is
/// how a gateway learns an address's kind, flags and arguments.
#[tokio::test]
async fn a_declare_describes_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    let arguments: std::collections::HashMap<String, String> =
        [("alternate-exchange".to_string(), "ae".to_string())].into();
    let declare = |passive: bool, kind: AddressKind| v1::DeclareAddressRequest {
        namespace: "default".into(),
        name: "described".into(),
        kind: kind as i32,
        durable: true,
        auto_delete: false,
        internal: true,
        passive,
        arguments: arguments.clone(),
    };
    let created = a
        .admin
        .declare_address(declare(false, AddressKind::Headers))
        .await
        .unwrap()
        .into_inner();
    let expected = v1::DeclareAddressResponse {
        created: true,
        kind: AddressKind::Headers as i32,
        durable: true,
        auto_delete: false,
        internal: true,
        arguments: arguments.clone(),
    };
    assert_eq!(created, expected);
    let existing = v1::DeclareAddressResponse {
        created: false,
        ..expected
    };
    for (passive, kind) in [
        (true, AddressKind::Unspecified),
        (false, AddressKind::Headers),
    ] {
        let again = a
            .admin
            .declare_address(declare(passive, kind))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again, existing, "passive {passive}");
    }
    // The description survives a restart.
    drop(a);
    server.kill9();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    let after = a
        .admin
        .declare_address(declare(true, AddressKind::Unspecified))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, existing);
}

impl Api {
    async fn auto_delete_address(&mut self, name: &str, kind: AddressKind) {
        self.admin
            .declare_address(v1::DeclareAddressRequest {
                namespace: "default".into(),
                name: name.into(),
                kind: kind as i32,
                durable: true,
                auto_delete: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Whether a passive declare finds the address.
    async fn address_exists(&mut self, name: &str) -> bool {
        let r = self
            .admin
            .declare_address(v1::DeclareAddressRequest {
                namespace: "default".into(),
                name: name.into(),
                passive: true,
                ..Default::default()
            })
            .await;
        match r {
            Ok(d) => {
                assert!(d.into_inner().auto_delete);
                true
            }
            Err(e) => {
                assert_eq!(error_code(&e), ErrorCode::AddressNotFound);
                false
            }
        }
    }
}

/// RabbitMQ's auto-delete exchanges: an auto-delete address goes (with its stored record)
/// when its last binding as source goes, by an unbind or because the binding's destination
/// was deleted, down a chain of addresses; one that never had a binding stays.
#[tokio::test]
async fn auto_delete_addresses_go_with_their_last_binding() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    a.auto_delete_address("fresh", AddressKind::Fanout).await;
    // By unbind: not before the last binding goes.
    for q in ["q1", "q2", "q3", "q4"] {
        a.queue(q).await;
    }
    a.auto_delete_address("ad", AddressKind::Direct).await;
    a.bind("ad", q("q1"), "k").await;
    a.bind("ad", q("q2"), "k").await;
    let unbind = |dest: &str| v1::UnbindRequest {
        binding: Some(binding("ad", q(dest), "k", &[])),
    };
    a.admin.unbind(unbind("q1")).await.unwrap();
    assert!(a.address_exists("ad").await);
    assert_eq!(a.publish("ad", "k", &[]).await, 1);
    a.admin.unbind(unbind("q2")).await.unwrap();
    assert!(!a.address_exists("ad").await);
    // By the deletion of the destination, down a chain: up -> mid -> q3.
    a.auto_delete_address("up", AddressKind::Fanout).await;
    a.auto_delete_address("mid", AddressKind::Fanout).await;
    a.bind("up", Destination::Address("mid".into()), "").await;
    a.bind("mid", q("q3"), "").await;
    // An address with another binding left stays.
    a.auto_delete_address("side", AddressKind::Fanout).await;
    a.bind("side", q("q3"), "").await;
    a.bind("side", q("q4"), "").await;
    assert_eq!(a.publish("up", "", &[]).await, 1);
    a.admin
        .delete_queue(v1::DeleteQueueRequest {
            id: qid("q3"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!a.address_exists("mid").await);
    assert!(!a.address_exists("up").await);
    assert!(a.address_exists("side").await);
    assert!(a.address_exists("fresh").await);
    // Gone from the metadata store too.
    drop(a);
    server.kill9();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    for (name, exists) in [
        ("ad", false),
        ("mid", false),
        ("up", false),
        ("side", true),
        ("fresh", true),
    ] {
        assert_eq!(a.address_exists(name).await, exists, "{name}");
    }
    assert_eq!(a.publish("side", "", &[]).await, 1);
}

/// Receives one message from `queue` (long poll) and nacks it without requeue.
async fn reject_one(a: &mut Api, queue: &str) -> v1::LeasedMessage {
    let got = a
        .receive_n(queue, 1, 60_000, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), 1, "nothing came to {queue}");
    a.queues
        .nack(v1::NackRequest {
            queue: qid(queue),
            lease_ids: vec![got[0].lease_id.clone()],
            requeue: false,
            delay_ms: 0,
        })
        .await
        .unwrap();
    got.into_iter().next().unwrap()
}

fn history(m: &v1::LeasedMessage) -> Vec<(String, String, u64, String, String)> {
    let p = m.record.as_ref().unwrap().properties.clone().unwrap();
    for e in &p.dead_letter_history {
        assert!(0 < e.first_at_ms && e.first_at_ms <= e.last_at_ms, "{e:?}");
    }
    p.dead_letter_history
        .into_iter()
        .map(|e| {
            (
                e.queue,
                e.reason,
                e.count,
                e.original_address,
                e.original_key,
            )
        })
        .collect()
}

fn h(
    q: &str,
    reason: &str,
    count: u64,
    address: &str,
    key: &str,
) -> (String, String, u64, String, String) {
    (q.into(), reason.into(), count, address.into(), key.into())
}

/// Every dead-lettering counts in the record's history (AMQP's x-death): one entry per
/// (queue, reason), most recent first, keeping where the record had been published before
/// its first death there; through a dead-letter address and a dead-letter queue, by
/// rejection and by expiry.
#[tokio::test]
async fn dead_letter_history_counts_each_queue_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    a.address("in", AddressKind::Direct).await;
    a.address("dlx", AddressKind::Fanout).await;
    let declare = |name: &str, config: v1::QueueConfig| v1::DeclareQueueRequest {
        id: qid(name),
        durable: true,
        config: Some(config),
        ..Default::default()
    };
    a.admin
        .declare_queue(declare(
            "work",
            v1::QueueConfig {
                dead_letter_address: Some("dlx".into()),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    // parking sends its dead letters back to work: a retry loop.
    a.admin
        .declare_queue(declare(
            "parking",
            v1::QueueConfig {
                dead_letter_queue: Some("work".into()),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    a.bind("in", q("work"), "job").await;
    a.bind("dlx", q("parking"), "").await;
    assert_eq!(a.publish("in", "job", &[]).await, 1);

    let m = reject_one(&mut a, "work").await;
    assert!(history(&m).is_empty());
    let m = reject_one(&mut a, "parking").await;
    assert_eq!(history(&m), vec![h("work", "rejected", 1, "in", "job")]);
    let m = reject_one(&mut a, "work").await;
    assert_eq!(
        history(&m),
        vec![
            h("parking", "rejected", 1, "dlx", "job"),
            h("work", "rejected", 1, "in", "job"),
        ]
    );
    let m = a
        .receive_n("parking", 1, 60_000, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(
        history(&m[0]),
        vec![
            h("work", "rejected", 2, "in", "job"),
            h("parking", "rejected", 1, "dlx", "job"),
        ],
        "the work entry counts twice, comes first again and keeps its first origin"
    );
    let p = m[0].record.as_ref().unwrap().properties.clone().unwrap();
    assert_eq!(
        (p.dead_letter_reason.as_str(), p.dead_letter_queue.as_str()),
        ("rejected", "work")
    );
    assert!(a.ack("parking", &[&m[0]]).await.is_empty());

    // Expiry, through a dead-letter queue, of a record enqueued directly.
    a.admin
        .declare_queue(declare("expired", v1::QueueConfig::default()))
        .await
        .unwrap();
    a.admin
        .declare_queue(declare(
            "short",
            v1::QueueConfig {
                message_ttl_ms: Some(50),
                dead_letter_queue: Some("expired".into()),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    a.send(
        "short",
        vec![v1::Record {
            value: Bytes::from_static(b"brief"),
            ..Default::default()
        }],
    )
    .await;
    let m = a
        .receive_n("expired", 1, 60_000, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(history(&m[0]), vec![h("short", "expired", 1, "", "")]);
}

/// A fan-out that reaches a full reject-publish-dlx queue: that queue refuses (the publish
/// fails with QUEUE_FULL, as a publisher confirm would be a nack), the others take the
/// record, and the refused copy is dead-lettered through an address to several queues.
#[tokio::test]
async fn a_fan_out_to_a_full_reject_publish_dlx_queue_dead_letters_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let mut a = api(&server).await;
    for name in ["open", "dl-a", "dl-b"] {
        a.queue(name).await;
    }
    a.address("dlx", AddressKind::Fanout).await;
    a.bind("dlx", q("dl-a"), "").await;
    a.bind("dlx", q("dl-b"), "").await;
    a.admin
        .declare_queue(v1::DeclareQueueRequest {
            id: qid("full"),
            durable: true,
            config: Some(v1::QueueConfig {
                max_length: Some(0),
                overflow: Some("reject-publish-dlx".into()),
                dead_letter_address: Some("dlx".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    a.address("fan", AddressKind::Fanout).await;
    a.bind("fan", q("full"), "").await;
    a.bind("fan", q("open"), "").await;
    let publish = a.streams.publish(v1::PublishRequest {
        namespace: "default".into(),
        address: "fan".into(),
        routing_key: "k".into(),
        records: vec![v1::Record {
            value: Bytes::from_static(b"m"),
            ..Default::default()
        }],
        ..Default::default()
    });
    let e = tokio::time::timeout(std::time::Duration::from_secs(20), publish)
        .await
        .expect("the publish never answered")
        .unwrap_err();
    assert_eq!(error_code(&e), ErrorCode::QueueFull);
    assert_eq!(a.drain("open").await, vec!["m"]);
    for dl in ["dl-a", "dl-b"] {
        let got = a
            .receive_n(dl, 1, 60_000, std::time::Duration::from_secs(20))
            .await;
        assert_eq!(got.len(), 1, "{dl}");
        let p = got[0].record.as_ref().unwrap().properties.clone().unwrap();
        assert_eq!(
            (p.dead_letter_reason.as_str(), p.dead_letter_queue.as_str()),
            ("max-length", "full")
        );
        assert_eq!(p.dead_letter_original_address, "fan");
    }
    assert_eq!(a.drain("full").await, Vec::<String>::new());
}
