//! The connection list and an operator's close, against the real binary: real AMQP (lapin),
//! MQTT 5 and 3.1.1 (raw packets) and Kafka (a raw ApiVersions) clients are listed by the
//! admin API and the CLI with what their gateway learned at login; a close ends each the way
//! its protocol's brokers do (AMQP connection.close 320, MQTT 5 DISCONNECT 0x98, the socket
//! closed for MQTT 3.1.1 and Kafka), after which the list no longer shows it; a close
//! without the token is refused; what a publisher had confirmed is still there afterwards.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ErrorKind, Event};
use serde_json::Value;

use common::mqtt_raw::{packet, read_exact, string};
use common::{BIN, Server, free_port_args, http_get, http_request};

const TOKEN: &str = "connections-test-token-0123456789";
const WAIT: Duration = Duration::from_secs(10);

fn start() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    for flag in ["--kafka-listen", "--mqtt-listen", "--amqp-listen"] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = "127.0.0.1:0".into();
    }
    args.extend(["--core-token".to_string(), TOKEN.to_string()]);
    let server = Server::start(&args);
    (dir, server)
}

/// `tributary connections ARGS --admin http://ADMIN`, with the token when `token`.
fn cli(admin: SocketAddr, args: &[&str], token: bool) -> Output {
    let mut command = Command::new(BIN);
    command
        .arg("connections")
        .args(args)
        .args(["--admin", &format!("http://{admin}")])
        .env("TRIBUTARY_LOG", "warn");
    if token {
        command.args(["--core-token", TOKEN]);
    }
    command.output().unwrap()
}

fn cli_json(admin: SocketAddr, args: &[&str], token: bool) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = cli(admin, &all, token);
    assert!(
        out.status.success(),
        "connections {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn listed(admin: SocketAddr) -> Vec<Value> {
    let (status, body) = http_get(admin, "/api/v1/connections");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["connections"].as_array().unwrap().clone()
}

/// The listed connection whose client id is `client_id`, polled (bounded) until it shows.
fn find(admin: SocketAddr, client_id: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(c) = listed(admin)
            .into_iter()
            .find(|c| c["client_id"] == client_id)
        {
            return c;
        }
        assert!(Instant::now() < deadline, "{client_id} is not listed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn close(admin: SocketAddr, id: u64, token: Option<&str>) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    let (status, body) = http_request(
        admin,
        "POST",
        &format!("/api/v1/connections/{id}/close"),
        &headers,
        "",
    );
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// An MQTT CONNECT (clean start, keep-alive 60 s) at `level` 4 or 5, read up to its CONNACK.
fn mqtt_connect(addr: SocketAddr, level: u8, client_id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut body = string("MQTT");
    body.extend([level, 0x02, 0, 60]);
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend(string(client_id));
    s.write_all(&packet(0x10, &body)).unwrap();
    let head = read_exact(&mut s, 2);
    assert_eq!(head[0], 0x20, "CONNACK");
    let connack = read_exact(&mut s, head[1] as usize);
    assert_eq!(connack[1], 0, "accepted");
    s
}

/// A Kafka ApiVersions v0 request from `client_id`, read up to its response.
fn kafka_connect(addr: SocketAddr, client_id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut header = Vec::new();
    header.extend(18i16.to_be_bytes()); // ApiVersions
    header.extend(0i16.to_be_bytes());
    header.extend(7i32.to_be_bytes()); // correlation id
    header.extend((client_id.len() as i16).to_be_bytes());
    header.extend(client_id.as_bytes());
    let mut frame = (header.len() as i32).to_be_bytes().to_vec();
    frame.extend(header);
    s.write_all(&frame).unwrap();
    let size = i32::from_be_bytes(read_exact(&mut s, 4).try_into().unwrap());
    let response = read_exact(&mut s, size as usize);
    assert_eq!(
        &response[..4],
        &7i32.to_be_bytes(),
        "the answer to our request"
    );
    s
}

/// Reads until the server closes `s` (bounded by its read timeout); returns what came.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

fn id_of(c: &Value) -> u64 {
    c["id"].as_u64().unwrap()
}

/// Waits (bounded) for lapin to report the server's connection.close; its reply code.
async fn amqp_close_code(events: &mut (impl futures::Stream<Item = Event> + Unpin)) -> u16 {
    let reported = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            if let Event::Error(e) = event {
                return Some(e);
            }
        }
        None
    })
    .await
    .expect("lapin reports the close")
    .expect("lapin's events go on until the close");
    match reported.kind() {
        ErrorKind::ProtocolError(e) => e.get_id(),
        other => panic!("not a close from the server: {other:?}"),
    }
}

#[test]
fn connections_are_listed_and_closed_the_way_each_protocol_closes() {
    // The test's own blocking calls (raw sockets, HTTP, the CLI) run on this thread while
    // the runtime's workers drive lapin, which must answer the server's close meanwhile.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_dir, server) = start();
    let admin = server.admin.unwrap();
    let amqp_addr = server.listening["amqp"];

    // AMQP: a named connection, and a confirmed publish that must survive the close.
    let amqp = rt
        .block_on(Connection::connect(
            &format!("amqp://guest:guest@{amqp_addr}/%2f"),
            ConnectionProperties::default().with_connection_name("conn-amqp".into()),
        ))
        .unwrap();
    let mut amqp_events = Box::pin(amqp.events_listener());
    rt.block_on(async {
        let channel = amqp.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare("conn-q".into(), durable, FieldTable::default())
            .await
            .unwrap();
        let confirm = channel
            .basic_publish(
                "".into(),
                "conn-q".into(),
                BasicPublishOptions::default(),
                b"kept",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(matches!(confirm, Confirmation::Ack(_)), "{confirm:?}");
    });
    let mut mqtt5 = mqtt_connect(server.mqtt.unwrap(), 5, "conn-mqtt5");
    let mut mqtt3 = mqtt_connect(server.mqtt.unwrap(), 4, "conn-mqtt3");
    let mut kafka = kafka_connect(server.kafka.unwrap(), "conn-kafka");

    // What each gateway learned at login.
    let a = find(admin, "conn-amqp");
    assert_eq!(a["protocol"], "amqp");
    assert_eq!(a["listener"], "amqp");
    assert_eq!(a["user"], "guest");
    assert_eq!(a["namespace"], "/");
    assert_eq!(a["tls"], false);
    assert_eq!(a["local"], amqp_addr.to_string());
    let m5 = find(admin, "conn-mqtt5");
    assert_eq!(m5["protocol"], "mqtt");
    assert_eq!(m5["namespace"], "default");
    assert_eq!(m5["peer"], mqtt5.local_addr().unwrap().to_string());
    let m3 = find(admin, "conn-mqtt3");
    assert_eq!(m3["peer"], mqtt3.local_addr().unwrap().to_string());
    let k = find(admin, "conn-kafka");
    assert_eq!(k["protocol"], "kafka");
    assert_eq!(k["listener"], "kafka");
    assert_eq!(k["namespace"], "default");
    assert_eq!(k["peer"], kafka.local_addr().unwrap().to_string());
    assert!(k["connected_at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let ids = [id_of(&a), id_of(&m5), id_of(&m3), id_of(&k)];
    let mut unique = ids.to_vec();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 4, "one id each: {ids:?}");

    // The CLI lists the same, as JSON and as a table.
    let from_cli = cli_json(admin, &["list"], false);
    let cli_ids: Vec<u64> = from_cli["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    for id in ids {
        assert!(cli_ids.contains(&id), "{id} not in {from_cli}");
    }
    let table = cli(admin, &["list"], false);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("conn-mqtt5") && table.contains("guest"),
        "{table}"
    );

    // A close needs the token, on loopback too; an unknown id is a 404.
    let (status, _) = close(admin, id_of(&k), None);
    assert_eq!(status, 401);
    let (status, _) = close(admin, id_of(&k), Some("not-the-token-0123456789"));
    assert_eq!(status, 401);
    let refused = cli(admin, &["close", &id_of(&k).to_string()], false);
    assert_eq!(refused.status.code(), Some(4), "unauthenticated");
    assert!(
        listed(admin).iter().any(|c| c["id"] == k["id"]),
        "a refused close closes nothing"
    );
    let (status, body) = close(admin, 999_999, Some(TOKEN));
    assert_eq!(status, 404);
    assert_eq!(body["error"], "CONNECTION_NOT_FOUND");
    let unknown = cli(admin, &["close", "999999"], true);
    assert_eq!(unknown.status.code(), Some(1));

    // AMQP: connection.close 320 CONNECTION_FORCED.
    let (status, body) = close(admin, id_of(&a), Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ended"], true, "{body}");
    assert_eq!(rt.block_on(amqp_close_code(&mut amqp_events)), 320);
    assert!(!listed(admin).iter().any(|c| c["id"] == a["id"]));

    // MQTT 5: DISCONNECT with reason 0x98 (administrative action), then the socket closes.
    let closed = cli_json(admin, &["close", &id_of(&m5).to_string()], true);
    assert_eq!(closed["ended"], true, "{closed}");
    assert_eq!(closed["connection"]["client_id"], "conn-mqtt5");
    let rest = read_to_close(&mut mqtt5);
    assert_eq!(rest.first(), Some(&0xE0), "DISCONNECT: {rest:?}");
    assert_eq!(rest.get(2), Some(&0x98), "administrative action: {rest:?}");
    assert!(!listed(admin).iter().any(|c| c["id"] == m5["id"]));

    // MQTT 3.1.1 has no DISCONNECT from the server: the socket just closes.
    let (status, _) = close(admin, id_of(&m3), Some(TOKEN));
    assert_eq!(status, 200);
    assert_eq!(read_to_close(&mut mqtt3), Vec::<u8>::new());

    // Kafka: the socket closes.
    let (status, body) = close(admin, id_of(&k), Some(TOKEN));
    assert_eq!(status, 200);
    assert_eq!(body["ended"], true);
    assert_eq!(read_to_close(&mut kafka), Vec::<u8>::new());
    let left: Vec<_> = listed(admin)
        .into_iter()
        .filter(|c| ids.contains(&id_of(c)))
        .collect();
    assert!(left.is_empty(), "still listed: {left:?}");

    // What the AMQP publisher had confirmed is still in its queue.
    drop(amqp_events);
    drop(amqp);
    rt.block_on(async {
        let again = Connection::connect(
            &format!("amqp://guest:guest@{amqp_addr}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let channel = again.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                "conn-q".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(declared.message_count(), 1);
    });
}

/// Split mode: the connections are in the gateway process, which serves them (with its
/// health and metrics) on an admin listener of its own, under the same token rule.
#[test]
fn a_gateway_process_lists_and_closes_its_connections_on_its_own_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    let mut core_args = vec!["core".to_string()];
    core_args.extend(free_port_args(&dir.path().join("data")));
    core_args.extend(["--core-token".to_string(), TOKEN.to_string()]);
    let core = Server::start(&core_args);
    let gateway = Server::start(&[
        "gateway".into(),
        "mqtt".into(),
        "--core".into(),
        format!("http://{}", core.core),
        "--core-token".into(),
        TOKEN.into(),
        "--mqtt-listen".into(),
        "127.0.0.1:0".into(),
        "--mqtt-ws-listen".into(),
        "off".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
    ]);
    let admin = gateway
        .admin
        .expect("the gateway prints its admin listener");
    assert_ne!(Some(admin), core.admin);
    let (status, body) = http_get(admin, "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));

    let mut client = mqtt_connect(gateway.mqtt.unwrap(), 5, "split-mqtt5");
    let c = find(admin, "split-mqtt5");
    assert_eq!(c["listener"], "mqtt");
    // The core's own admin API knows nothing of the gateway's clients.
    let (_, on_core) = http_get(core.admin.unwrap(), "/api/v1/connections");
    assert!(!on_core.contains("split-mqtt5"), "{on_core}");
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tributary_connections{listener=\"mqtt\"} 1"),
        "{metrics}"
    );

    let (status, _) = close(admin, id_of(&c), None);
    assert_eq!(status, 401);
    let closed = cli_json(admin, &["close", &id_of(&c).to_string()], true);
    assert_eq!(closed["ended"], true, "{closed}");
    let rest = read_to_close(&mut client);
    assert_eq!(rest.first(), Some(&0xE0), "DISCONNECT: {rest:?}");
    assert_eq!(rest.get(2), Some(&0x98), "administrative action: {rest:?}");
    assert!(listed(admin).is_empty());
}
