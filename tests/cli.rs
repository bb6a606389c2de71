//! The admin CLI (`tributary streams|groups|queues`) against a running server through the
//! core gRPC API: tables and `--json`, and its exit codes (1 refused, 2 usage, 3 unreachable,
//! 4 unauthenticated).

mod common;

use std::process::Command;

use common::queue_api::api;
use common::{BIN, Server, cli, cli_stdin, free_port_args};
use serde_json::Value;
use tributary_proto::v1;

/// Runs a command that must succeed with `--json`, and returns its document.
fn json(core: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = cli(core, &all);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn start() -> (tempfile::TempDir, Server, String) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(&dir.path().join("data")));
    let core = format!("http://{}", server.core);
    (dir, server, core)
}

#[test]
fn streams_produce_consume_and_describe() {
    let (_dir, _server, core) = start();
    let created = json(
        &core,
        &[
            "streams",
            "create",
            "orders",
            "-p",
            "2",
            "-c",
            "retention.ms=60000",
        ],
    );
    assert_eq!(created["partitions"], 2);
    assert_eq!(created["config"]["retention.ms"], 60000);
    let produced = json(
        &core,
        &["streams", "produce", "orders", "a", "b", "c", "-k", "key"],
    );
    assert_eq!(produced["records"], 3);
    assert_eq!(produced["base_offset"], 0);
    let read = json(&core, &["streams", "consume", "orders", "--count", "10"]);
    let records = read["records"].as_array().unwrap();
    let values: Vec<_> = records
        .iter()
        .map(|r| r["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["a", "b", "c"]);
    assert_eq!(records[2]["offset"], 2);
    assert_eq!(records[0]["key"], "key");
    // From an offset, and no more than asked.
    let one = json(
        &core,
        &["streams", "consume", "orders", "-o", "1", "--count", "1"],
    );
    assert_eq!(one["records"].as_array().unwrap().len(), 1);
    assert_eq!(one["records"][0]["value"], "b");

    let listed = json(&core, &["streams", "list"]);
    let orders = listed["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "orders")
        .expect("orders listed");
    assert_eq!(orders["partition_info"][0]["end_offset"], 3);
    // The table has a header and the stream.
    let table = cli(&core, &["streams", "list"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("orders ")), "{text}");

    let missing = cli(&core, &["streams", "describe", "nosuch"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nosuch"));
    let bad = cli(
        &core,
        &["streams", "create", "x", "-c", "retention.ms=soon"],
    );
    assert_eq!(bad.status.code(), Some(2));
    json(&core, &["streams", "delete", "orders"]);
    assert_eq!(
        cli(&core, &["streams", "describe", "orders"]).status.code(),
        Some(1)
    );
}

#[test]
fn groups_reset_offsets_with_a_dry_run_and_show_lag() {
    let (_dir, _server, core) = start();
    json(&core, &["streams", "create", "events", "-p", "2"]);
    json(&core, &["streams", "produce", "events", "1", "2", "3"]);
    let dry = json(
        &core,
        &[
            "groups",
            "reset-offsets",
            "g",
            "--stream",
            "events",
            "--to",
            "latest",
            "--dry-run",
        ],
    );
    assert_eq!(dry["offsets"][0]["offset"], 3);
    assert_eq!(dry["offsets"][1]["offset"], 0);
    // A dry run commits nothing.
    let before = json(&core, &["groups", "describe", "g"]);
    assert!(
        before["partitions"].as_array().unwrap().is_empty(),
        "{before}"
    );
    json(
        &core,
        &[
            "groups",
            "reset-offsets",
            "g",
            "--stream",
            "events",
            "--to",
            "offset:1",
        ],
    );
    let after = json(&core, &["groups", "describe", "g"]);
    let p0 = after["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["partition"] == 0)
        .unwrap()
        .clone();
    assert_eq!(p0["committed"], 1);
    assert_eq!(p0["end"], 3);
    assert_eq!(p0["lag"], 2);
    let listed = json(&core, &["groups", "list"]);
    assert!(
        listed["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["group"] == "g")
    );
    let bad = cli(
        &core,
        &[
            "groups",
            "reset-offsets",
            "g",
            "--stream",
            "events",
            "--to",
            "yesterday",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test]
async fn queues_declare_list_purge_and_redrive() {
    let (_dir, server, core) = start();
    let core2 = core.clone();
    let run = move |args: Vec<&'static str>| {
        let core = core2.clone();
        async move {
            tokio::task::spawn_blocking(move || json(&core, &args))
                .await
                .unwrap()
        }
    };
    run(vec!["queues", "declare", "parked"]).await;
    run(vec!["queues", "declare", "work"]).await;
    let mut a = api(&server).await;
    let rec = |v: &str| v1::Record {
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    };
    a.send("parked", vec![rec("1"), rec("2"), rec("3")]).await;
    let listed = run(vec!["queues", "list"]).await;
    let parked = listed["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "parked")
        .unwrap()
        .clone();
    assert_eq!(parked["ready"], 3);
    let moved = run(vec!["queues", "redrive", "parked", "--to", "work"]).await;
    assert_eq!(moved["status"], "COMPLETED", "{moved}");
    assert_eq!(moved["moved"], 3);
    assert_eq!(a.info("work").await.messages_ready, 3);
    let purged = run(vec!["queues", "purge", "work"]).await;
    assert_eq!(purged["purged"], 3);
    assert_eq!(a.info("work").await.messages_ready, 0);
}

#[test]
fn exit_codes_for_an_unreachable_core_and_refused_credentials() {
    let unreachable = cli("http://127.0.0.1:1", &["streams", "list"]);
    assert_eq!(
        unreachable.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&unreachable.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["core".to_string()];
    args.extend(free_port_args(&dir.path().join("data")));
    args.extend(["--core-token".into(), "cli-test-token-0123456789".into()]);
    let server = Server::start(&args);
    let core = format!("http://{}", server.core);
    let refused = cli(&core, &["streams", "list"]);
    assert_eq!(
        refused.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let with_token = Command::new(BIN)
        .args([
            "streams",
            "list",
            "--json",
            "--core",
            &core,
            "--core-token",
            "cli-test-token-0123456789",
        ])
        .output()
        .unwrap();
    assert!(with_token.status.success());
    let version = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("tributary "));
}

/// What `kafka-topics.sh --describe` prints (Apache Kafka 3.x), with a config Tributary
/// does not know.
const DESCRIBE: &str = "Topic: orders\tTopicId: 3Hx1\tPartitionCount: 3\tReplicationFactor: 1\tConfigs: cleanup.policy=delete,retention.ms=86400000,some.unknown.config=1\n\tTopic: orders\tPartition: 0\tLeader: 1\tReplicas: 1\tIsr: 1\n\tTopic: orders\tPartition: 1\tLeader: 1\tReplicas: 1\tIsr: 1\n\tTopic: orders\tPartition: 2\tLeader: 1\tReplicas: 1\tIsr: 1\nTopic: logs\tTopicId: 9aZ\tPartitionCount: 1\tReplicationFactor: 3\tConfigs: \n\tTopic: logs\tPartition: 0\tLeader: 2\tReplicas: 2,3,1\tIsr: 2,3,1\n";

#[test]
fn kafka_topics_import_from_describe_output_and_export_round_trips() {
    let (dir, _server, core) = start();
    let file = dir.path().join("topics.txt");
    std::fs::write(&file, DESCRIBE).unwrap();
    let path = file.to_str().unwrap();
    let dry = json(&core, &["import", "kafka", path, "--dry-run"]);
    assert_eq!(dry["topics"][0]["outcome"], "would create");
    assert!(
        json(&core, &["streams", "list"])["streams"]
            .as_array()
            .unwrap()
            .is_empty(),
        "a dry run created something"
    );
    let done = json(&core, &["import", "kafka", path]);
    assert_eq!(done["topics"][0]["outcome"], "created");
    assert!(
        done["topics"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("some.unknown.config"),
        "{done}"
    );
    let orders = json(&core, &["streams", "describe", "orders"]);
    assert_eq!(orders["partitions"], 3);
    assert_eq!(orders["config"]["retention.ms"], 86_400_000);
    assert_eq!(
        json(&core, &["streams", "describe", "logs"])["partitions"],
        1
    );
    // Again: left as it is.
    let again = json(&core, &["import", "kafka", path]);
    assert_eq!(again["topics"][0]["outcome"], "exists");

    // Exported and imported into another server: the same topics.
    let exported = cli(&core, &["export", "kafka"]);
    assert!(exported.status.success());
    let text = String::from_utf8(exported.stdout).unwrap();
    assert!(text.contains("Topic: orders\t"), "{text}");
    let copy = dir.path().join("export.txt");
    std::fs::write(&copy, &text).unwrap();
    let (_dir2, _server2, core2) = start();
    json(&core2, &["import", "kafka", copy.to_str().unwrap()]);
    let other = json(&core2, &["streams", "describe", "orders"]);
    assert_eq!(other["partitions"], 3);
    assert_eq!(other["config"]["retention.ms"], 86_400_000);
    assert_eq!(other["config"]["cleanup.policy"], "delete");
}

#[test]
fn sessions_are_listed_and_a_kick_closes_the_connection_with_0x98() {
    use common::mqtt_raw::{packet, read_exact, string};
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--mqtt-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    let server = Server::start(&args);
    let core = format!("http://{}", server.core);
    // An MQTT 5 client with a session that outlives its connection (expiry 300 s).
    let mut s = std::net::TcpStream::connect(server.mqtt.unwrap()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut body = string("MQTT");
    body.extend([5, 0x00, 0, 60]);
    body.extend([5, 0x11, 0, 0, 1, 0x2c]); // properties: Session Expiry Interval 300
    body.extend(string("kick-me"));
    s.write_all(&packet(0x10, &body)).unwrap();
    let head = read_exact(&mut s, 2);
    assert_eq!(head[0], 0x20, "CONNACK");
    let connack = read_exact(&mut s, head[1] as usize);
    assert_eq!(connack[1], 0, "accepted");

    let listed = json(&core, &["sessions", "list"]);
    let me = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["client_id"] == "kick-me")
        .expect("the session is listed")
        .clone();
    assert_eq!(me["connected"], true);
    assert_eq!(me["expiry_ms"], 300_000);

    let kicked = json(&core, &["sessions", "kick", "kick-me"]);
    assert_eq!(kicked["was_connected"], true);
    let disconnect = read_exact(&mut s, 3);
    assert_eq!(disconnect[0], 0xE0, "DISCONNECT from the server");
    assert_eq!(disconnect[2], 0x98, "reason: administrative action");
    // The session stays (expiry 300 s), now without a connection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed = json(&core, &["sessions", "list"]);
        let me = listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["client_id"] == "kick-me")
            .cloned();
        if me.as_ref().is_some_and(|m| m["connected"] == false) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still connected: {me:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let again = json(&core, &["sessions", "kick", "kick-me"]);
    assert_eq!(again["was_connected"], false);
    let unknown = cli(&core, &["sessions", "kick", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
}

/// An MQTT 3.1.1 CONNECT with a user name and password; the CONNACK return code (0 accepted,
/// 4 bad user name or password).
fn mqtt_login(addr: std::net::SocketAddr, user: &str, password: &str) -> u8 {
    use common::mqtt_raw::{packet, read_exact, string};
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut body = string("MQTT");
    body.extend([4, 0xC2, 0, 60]); // user name, password, clean session
    body.extend(string("login-probe"));
    body.extend(string(user));
    body.extend(string(password));
    s.write_all(&packet(0x10, &body)).unwrap();
    let connack = read_exact(&mut s, 4);
    assert_eq!(connack[0], 0x20, "CONNACK");
    connack[3]
}

/// Logs in until the answer is `want`: a change made through the core reaches a gateway's
/// cache of users within a second (bounded here by 10 s).
fn mqtt_login_until(addr: std::net::SocketAddr, user: &str, password: &str, want: u8) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = mqtt_login(addr, user, password);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{user}: CONNACK {got}, want {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_added_through_the_core_log_in_to_mqtt_and_amqp_until_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    for flag in ["--mqtt-listen", "--amqp-listen"] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = "127.0.0.1:0".into();
    }
    // No [[users]] at all: without anonymous access nobody logs in until a user is added.
    args.extend(["--mqtt-allow-anonymous".into(), "false".into()]);
    let server = Server::start(&args);
    let core = format!("http://{}", server.core);
    let mqtt = server.mqtt.unwrap();
    let amqp = server.listening["amqp"];
    assert_eq!(mqtt_login(mqtt, "alice", "s3cret"), 4, "unknown user");

    let added = cli_stdin(
        &core,
        &["users", "add", "alice", "-n", "/", "--json"],
        "s3cret\n",
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    mqtt_login_until(mqtt, "alice", "s3cret", 0);
    assert_eq!(mqtt_login(mqtt, "alice", "wrong"), 4, "bad password");
    // The same user opens vhost "/" over AMQP (granted with `-n /`), with the same password.
    let conn = lapin::Connection::connect(
        &format!("amqp://alice:s3cret@{amqp}/%2f"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("alice logs in to AMQP");
    conn.close(200, "bye".into()).await.unwrap();

    let listed = json(&core, &["users", "list"]);
    let alice = listed["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice")
        .expect("alice is listed")
        .clone();
    assert_eq!(alice["source"], "core");
    assert_eq!(alice["namespaces"], serde_json::json!(["/"]));
    assert_eq!(
        alice["mechanisms"],
        serde_json::json!(["SCRAM-SHA-256", "SCRAM-SHA-512"])
    );
    assert!(
        !listed.to_string().contains("s3cret") && !listed.to_string().contains("4096:"),
        "no secret or credential is printed: {listed}"
    );
    // The admin API lists it too (names and kinds only).
    let (status, body) = common::http_get(server.admin.unwrap(), "/api/v1/users");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"alice\"") && !body.contains("4096:"),
        "{body}"
    );

    // Adding it again is refused (exit 1); so is a password change for nobody.
    let again = cli_stdin(&core, &["users", "add", "alice"], "other\n");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("USER_EXISTS"));
    let nobody = cli_stdin(&core, &["users", "passwd", "nobody"], "x\n");
    assert_eq!(nobody.status.code(), Some(1));
    let empty = cli_stdin(&core, &["users", "add", "carol"], "\n");
    assert_eq!(
        empty.status.code(),
        Some(2),
        "an empty password is a usage error"
    );

    // A new password replaces the old one, and the namespaces stay.
    let changed = cli_stdin(&core, &["users", "passwd", "alice"], "n3w\n");
    assert!(changed.status.success());
    mqtt_login_until(mqtt, "alice", "n3w", 0);
    assert_eq!(mqtt_login(mqtt, "alice", "s3cret"), 4);
    let listed = json(&core, &["users", "list"]);
    assert!(listed.to_string().contains("\"/\""), "{listed}");

    let deleted = json(&core, &["users", "delete", "alice"]);
    assert_eq!(deleted["name"], "alice");
    mqtt_login_until(mqtt, "alice", "n3w", 4);
    let gone = cli(&core, &["users", "delete", "alice"]);
    assert_eq!(gone.status.code(), Some(1));
}

/// RabbitMQ definitions with policies: the one with the highest priority that matches a
/// queue applies, limits take the smallest of policy and argument, keys with no meaning are
/// reported; the queue then behaves as on RabbitMQ (max-length dead-letters to the policy's
/// DLX), clients redeclare it with their own arguments, and `export rabbitmq` writes it
/// back so that another server imports the same queue.
const POLICY_DEFS: &str = r#"{
  "vhosts": [{"name": "/"}],
  "exchanges": [{"name": "pol.dlx", "vhost": "/", "type": "fanout", "durable": true,
                 "auto_delete": false, "internal": false, "arguments": {}}],
  "queues": [
    {"name": "pol.q", "vhost": "/", "durable": true, "auto_delete": false,
     "arguments": {"x-max-length": 50}},
    {"name": "pol.other", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
    {"name": "pol.dead", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}}
  ],
  "bindings": [{"source": "pol.dlx", "vhost": "/", "destination": "pol.dead",
                "destination_type": "queue", "routing_key": "", "arguments": {}}],
  "policies": [
    {"vhost": "/", "name": "limits", "pattern": "^pol\\.q$", "apply-to": "queues", "priority": 1,
     "definition": {"dead-letter-exchange": "pol.dlx", "message-ttl": 60000, "max-length": 2,
                    "ha-mode": "all"}},
    {"vhost": "/", "name": "low", "pattern": "^pol\\.(q|other)$", "apply-to": "queues", "priority": 0,
     "definition": {"max-length": 7}},
    {"vhost": "/", "name": "nothing", "pattern": "^zzz", "apply-to": "queues", "priority": 0,
     "definition": {"expires": 1000}}
  ]
}"#;

#[tokio::test]
async fn rabbitmq_policies_apply_at_import_and_export_rabbitmq_round_trips() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};

    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--amqp-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    let server = Server::start(&args);
    let core = format!("http://{}", server.core);
    let file = dir.path().join("definitions.json");
    std::fs::write(&file, POLICY_DEFS).unwrap();
    let path = file.to_str().unwrap().to_string();
    let run = |args: Vec<String>| {
        let core = core.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            json(&core, &args)
        })
    };
    let dry = run(vec![
        "import".into(),
        "rabbitmq".into(),
        path.clone(),
        "--dry-run".into(),
    ])
    .await
    .unwrap();
    let limits = dry["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "policy" && r["name"] == "limits")
        .unwrap()
        .clone();
    assert_eq!(limits["outcome"], "would apply", "{limits}");
    let listed = run(vec!["queues".into(), "list".into()]).await.unwrap();
    assert!(
        listed["queues"].as_array().unwrap().is_empty(),
        "a dry run created {listed}"
    );
    let report = run(vec!["import".into(), "rabbitmq".into(), path.clone()])
        .await
        .unwrap();
    let row = |kind: &str, name: &str| {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {report}"))
            .clone()
    };
    let limits = row("policy", "limits");
    assert_eq!(limits["outcome"], "applied", "{limits}");
    let on_q = &limits["policy"]["queues"]["pol.q"];
    assert_eq!(on_q["max-length"]["carried"], 2);
    assert_eq!(on_q["message-ttl"]["carried"], 60000);
    assert_eq!(on_q["dead-letter-exchange"]["carried"], "pol.dlx");
    assert!(on_q["ha-mode"]["not_carried"].is_string(), "{on_q}");
    let detail = limits["detail"].as_str().unwrap();
    assert!(
        detail.contains("ha-mode") && detail.contains("at import"),
        "{detail}"
    );
    // Lower priority: only the queue the other policy does not take.
    let low = row("policy", "low");
    assert!(low["policy"]["queues"].get("pol.q").is_none(), "{low}");
    assert_eq!(
        low["policy"]["queues"]["pol.other"]["max-length"]["carried"],
        7
    );
    assert_eq!(row("policy", "nothing")["outcome"], "not carried");

    let mut a = api(&server).await;
    let q = a.info("pol.q").await.config.unwrap();
    assert_eq!(
        q.max_length,
        Some(2),
        "the smaller of argument 50 and policy 2"
    );
    assert_eq!(q.message_ttl_ms, Some(60_000));
    assert_eq!(q.dead_letter_address.as_deref(), Some("pol.dlx"));
    assert_eq!(
        a.info("pol.other").await.config.unwrap().max_length,
        Some(7)
    );
    // Three messages into a queue of two: the oldest is dead-lettered to the policy's DLX.
    let rec = |v: &str| v1::Record {
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    };
    a.send("pol.q", vec![rec("1"), rec("2"), rec("3")]).await;
    a.wait_info("pol.dead", "a dead letter", |i| i.messages_ready == 1)
        .await;
    assert_eq!(a.drain("pol.dead").await, ["1"]);
    assert_eq!(a.info("pol.q").await.messages_ready, 2);

    // A client declares the queue with its own arguments, as on RabbitMQ: equivalent.
    let uri = format!("amqp://guest:guest@{}/%2f", server.listening["amqp"]);
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let declare = |max: i64| {
        let mut t = FieldTable::default();
        t.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
        (
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            t,
        )
    };
    let (o, t) = declare(50);
    let ok = ch.queue_declare("pol.q".into(), o, t).await.unwrap();
    assert_eq!(ok.message_count(), 2);
    let (o, t) = declare(3);
    let refused = ch.queue_declare("pol.q".into(), o, t).await.unwrap_err();
    assert!(
        refused.to_string().contains("406") || refused.to_string().contains("PRECONDITION"),
        "{refused}"
    );

    // Exported, the policy comes back as a policy matching exactly the queues it was
    // applied to; another server importing it gets the same queues.
    let exported = run(vec!["export".into(), "rabbitmq".into()]).await.unwrap();
    let defs = &exported["document"];
    let queue = defs["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "pol.q")
        .unwrap();
    assert_eq!(queue["arguments"], serde_json::json!({"x-max-length": 50}));
    let policy = defs["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limits")
        .unwrap_or_else(|| panic!("{defs}"));
    assert_eq!(policy["pattern"], "^(?:pol\\.q)$");
    assert_eq!(policy["definition"]["max-length"], 2);
    assert!(
        defs["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["source"] == "pol.dlx" && b["destination"] == "pol.dead")
    );
    assert!(
        defs["exchanges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "pol.dlx" && x["type"] == "fanout")
    );
    let copy = dir.path().join("exported.json");
    std::fs::write(&copy, defs.to_string()).unwrap();
    let (_dir2, server2, core2) = start();
    let copy = copy.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || json(&core2, &["import", "rabbitmq", &copy]))
        .await
        .unwrap();
    let mut b = api(&server2).await;
    for name in ["pol.q", "pol.other", "pol.dead"] {
        assert_eq!(
            b.info(name).await.config,
            a.info(name).await.config,
            "{name} differs after export and import"
        );
    }
}

/// SQS queues as the aws CLI prints them (get-queue-attributes per queue, with tags): a dry
/// run creates nothing; the import declares the dead-letter queue first, carries what the
/// core has, stores what only an SQS gateway reads, reports the rest; the redrive policy
/// works; `export sqs` writes what `import sqs` reads, and another server gets the same.
const SQS_QUEUES: &str = r#"[
  {"QueueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/jobs",
   "Attributes": {"QueueArn": "arn:aws:sqs:eu-west-1:123456789012:jobs",
     "VisibilityTimeout": "45", "DelaySeconds": "0", "MessageRetentionPeriod": "345600",
     "MaximumMessageSize": "262144", "ReceiveMessageWaitTimeSeconds": "20",
     "RedrivePolicy": "{\"deadLetterTargetArn\":\"arn:aws:sqs:eu-west-1:123456789012:jobs-dead\",\"maxReceiveCount\":1}",
     "SqsManagedSseEnabled": "true", "ApproximateNumberOfMessages": "12"},
   "Tags": {"team": "billing"}},
  {"QueueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/jobs-dead",
   "Attributes": {"MessageRetentionPeriod": "1209600",
     "RedriveAllowPolicy": "{\"redrivePermission\":\"allowAll\"}"}},
  {"QueueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
   "Attributes": {"FifoQueue": "true", "ContentBasedDeduplication": "true",
     "DeduplicationScope": "messageGroup", "FifoThroughputLimit": "perMessageGroupId",
     "Policy": "{\"Version\":\"2012-10-17\"}", "KmsMasterKeyId": "alias/aws/sqs"}}
]"#;

#[tokio::test]
async fn sqs_import_with_a_dry_run_and_export_round_trips() {
    let (dir, server, core) = start();
    let file = dir.path().join("queues.json");
    std::fs::write(&file, SQS_QUEUES).unwrap();
    let path = file.to_str().unwrap().to_string();
    let run = |core: String, args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            json(&core, &args)
        })
    };
    let sqs = |args: &[&str]| {
        let mut v: Vec<String> = vec!["import".into(), "sqs".into()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let dry = run(core.clone(), sqs(&[&path, "--dry-run"])).await.unwrap();
    assert_eq!(dry["queues"][0]["outcome"], "would create");
    let listed = run(core.clone(), vec!["queues".into(), "list".into()])
        .await
        .unwrap();
    assert!(
        listed["queues"].as_array().unwrap().is_empty(),
        "a dry run created {listed}"
    );

    let done = run(core.clone(), sqs(&[&path])).await.unwrap();
    let queues = done["queues"].as_array().unwrap();
    let order: Vec<&str> = queues
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        ["jobs-dead", "jobs", "orders.fifo"],
        "dead-letter queue first"
    );
    assert!(queues.iter().all(|q| q["outcome"] == "created"), "{done}");
    let attr = |queue: &str, attribute: &str| {
        queues.iter().find(|q| q["queue"] == queue).unwrap()["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["attribute"] == attribute)
            .unwrap_or_else(|| panic!("{queue} {attribute}"))["outcome"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(attr("jobs", "VisibilityTimeout"), "carried");
    assert_eq!(attr("jobs", "RedrivePolicy"), "carried");
    assert_eq!(attr("jobs", "ReceiveMessageWaitTimeSeconds"), "stored");
    assert_eq!(attr("jobs", "SqsManagedSseEnabled"), "not carried");
    assert_eq!(attr("jobs", "ApproximateNumberOfMessages"), "ignored");
    assert_eq!(attr("jobs", "tag:team"), "stored");
    assert_eq!(attr("orders.fifo", "Policy"), "not carried");
    assert_eq!(attr("orders.fifo", "KmsMasterKeyId"), "not carried");
    assert_eq!(attr("orders.fifo", "ContentBasedDeduplication"), "stored");

    let mut a = api(&server).await;
    let jobs = a.info("jobs").await.config.unwrap();
    assert_eq!(jobs.visibility_timeout_ms, Some(45_000));
    assert_eq!(jobs.dead_letter_queue.as_deref(), Some("jobs-dead"));
    assert_eq!(jobs.max_delivery_count, Some(1));
    assert_eq!(jobs.extra["sqs.tag.team"], "billing");
    assert_eq!(
        a.info("jobs-dead").await.config.unwrap().message_ttl_ms,
        Some(1_209_600_000)
    );
    let fifo = a.info("orders.fifo").await.config.unwrap();
    assert_eq!(fifo.fifo, Some(true));
    // maxReceiveCount 1: received once and not deleted, the message moves to jobs-dead.
    a.send(
        "jobs",
        vec![v1::Record {
            value: b"job-1".to_vec().into(),
            ..Default::default()
        }],
    )
    .await;
    let got = a
        .receive_n("jobs", 1, 50, std::time::Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 1);
    a.wait_info("jobs-dead", "the redrive policy", |i| i.messages_ready == 1)
        .await;
    assert_eq!(a.drain("jobs-dead").await, ["job-1"]);

    // Again: the same settings, left as they are.
    let again = run(core.clone(), sqs(&[&path])).await.unwrap();
    assert!(
        again["queues"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["outcome"] == "exists"),
        "{again}"
    );

    // Exported and imported into another server: the same queues, the same export.
    let exported = run(core.clone(), vec!["export".into(), "sqs".into()])
        .await
        .unwrap();
    let copy = dir.path().join("exported.json");
    std::fs::write(&copy, exported["document"].to_string()).unwrap();
    let (_dir2, server2, core2) = start();
    run(core2.clone(), sqs(&[copy.to_str().unwrap()]))
        .await
        .unwrap();
    let mut b = api(&server2).await;
    for name in ["jobs", "jobs-dead", "orders.fifo"] {
        assert_eq!(
            b.info(name).await.config,
            a.info(name).await.config,
            "{name}"
        );
    }
    // Into a namespace of its own, made by the import.
    let other = run(core2.clone(), sqs(&[copy.to_str().unwrap(), "-n", "acct"]))
        .await
        .unwrap();
    assert_eq!(other["namespace_created"], true);
    let listed = run(
        core2.clone(),
        vec!["queues".into(), "list".into(), "-n".into(), "acct".into()],
    )
    .await
    .unwrap();
    assert_eq!(listed["queues"].as_array().unwrap().len(), 3, "{listed}");
    let again = run(core2.clone(), vec!["export".into(), "sqs".into()])
        .await
        .unwrap();
    assert_eq!(again["document"], exported["document"]);

    // Queues of two accounts in one file: refused (one namespace per account), exit 2.
    let mixed = dir.path().join("mixed.json");
    std::fs::write(
        &mixed,
        r#"{"QueueUrls": ["https://sqs.us-east-1.amazonaws.com/111111111111/a",
                          "https://sqs.us-east-1.amazonaws.com/222222222222/b"]}"#,
    )
    .unwrap();
    let out = cli(&core, &["import", "sqs", mixed.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // list-queues output: names only, and the report says the attributes are missing.
    let names = dir.path().join("names.json");
    std::fs::write(
        &names,
        r#"{"QueueUrls": ["https://sqs.us-east-1.amazonaws.com/111111111111/plain"]}"#,
    )
    .unwrap();
    let report = run(core.clone(), sqs(&[names.to_str().unwrap(), "--dry-run"]))
        .await
        .unwrap();
    assert_eq!(
        report["queues"][0]["attributes"][0]["attribute"],
        "Attributes"
    );
    assert_eq!(
        report["queues"][0]["attributes"][0]["outcome"],
        "not carried"
    );
}
