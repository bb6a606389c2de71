//! The admin HTTP API the web console uses, through the real binary: JSON shapes, consumer
//! group lag, queue depth and dead letters, browsing a queue without consuming it, purge
//! and redrive (with the token, and refused without it, on loopback too), and the console's
//! embedded files.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Server, free_port_args, http_get_with, http_request};
use serde_json::Value;
use tributary_gateway_common::CoreClient;
use tributary_proto::v1;

const TOKEN: &str = "admin-test-token-0123456789";

fn start(dir: &tempfile::TempDir, token: Option<&str>) -> Server {
    let mut args = free_port_args(&dir.path().join("data"));
    if let Some(t) = token {
        args.extend(["--core-token".to_string(), t.to_string()]);
    }
    Server::start(&args)
}

fn client(server: &Server, token: Option<&str>) -> CoreClient {
    CoreClient::connect_lazy_with_token(&format!("http://{}", server.core), token).unwrap()
}

fn get(admin: SocketAddr, path: &str) -> Value {
    let (status, body) = http_get_with(admin, path, &[]);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

fn post(admin: SocketAddr, path: &str, token: Option<&str>) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    let (status, body) = http_request(admin, "POST", path, &headers, "");
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, json)
}

/// The queue's entry in `GET /api/v1/queues`.
fn queue(admin: SocketAddr, name: &str) -> Value {
    let all = get(admin, "/api/v1/queues?namespace=default");
    all["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == name)
        .unwrap_or_else(|| panic!("no queue {name} in {all}"))
        .clone()
}

/// Polls `GET /api/v1/queues` until `cond` holds for the queue, failing after 20 s.
fn wait_queue(admin: SocketAddr, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q = queue(admin, name);
        if cond(&q) {
            return q;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {q}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn refusals(admin: SocketAddr, reason: &str) -> u64 {
    let bearer = format!("Bearer {TOKEN}");
    let (_, metrics) = http_get_with(admin, "/metrics", &[("Authorization", &bearer)]);
    let series =
        format!("tributary_auth_refusals_total{{listener=\"admin\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn qid(name: &str) -> Option<v1::QueueId> {
    Some(v1::QueueId {
        namespace: "default".into(),
        name: name.into(),
    })
}

fn rec(value: &str) -> v1::Record {
    v1::Record {
        value: Bytes::from(value.to_string()),
        ..Default::default()
    }
}

/// A queue `work` that dead-letters into `work-dlq`, with `ready` messages and one dead
/// letter (rejected without requeue).
async fn work_and_dead_letter(c: &mut CoreClient, ready: usize) {
    for (name, dlq) in [("work-dlq", None), ("work", Some("work-dlq".to_string()))] {
        c.admin
            .declare_queue(v1::DeclareQueueRequest {
                id: qid(name),
                config: Some(v1::QueueConfig {
                    dead_letter_queue: dlq,
                    ..Default::default()
                }),
                durable: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let records = (0..=ready).map(|i| rec(&format!("m{i}"))).collect();
    c.queues
        .enqueue(v1::EnqueueRequest {
            queue: qid("work"),
            records,
        })
        .await
        .unwrap();
    let got = c
        .queues
        .receive(v1::ReceiveRequest {
            queue: qid("work"),
            max_messages: 1,
            visibility_timeout_ms: 60_000,
            wait_time_ms: 5_000,
            consumer: String::new(),
            no_wait_durable: false,
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(got.len(), 1);
    c.queues
        .nack(v1::NackRequest {
            queue: qid("work"),
            lease_ids: vec![got[0].lease_id.clone()],
            requeue: false,
            delay_ms: 0,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn queues_show_depth_and_dead_letters_and_browsing_consumes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, None);
    let admin = server.admin.unwrap();
    work_and_dead_letter(&mut client(&server, None), 2).await;

    let dlq = wait_queue(admin, "work-dlq", "the dead letter", |q| q["ready"] == 1);
    assert_eq!(dlq["is_dead_letter_queue"], true);
    let work = queue(admin, "work");
    assert_eq!(work["ready"], 2);
    assert_eq!(work["leased"], 0);
    assert_eq!(work["dead_letter_queues"], serde_json::json!(["work-dlq"]));
    assert_eq!(work["dead_letters"], 1);
    assert_eq!(work["is_dead_letter_queue"], false);

    for _ in 0..2 {
        let peek = get(admin, "/api/v1/queues/default/work-dlq/messages?max=10");
        let messages = peek["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 1, "{peek}");
        let m = &messages[0];
        assert_eq!(m["value"], "m0");
        assert_eq!(m["value_encoding"], "utf-8");
        assert_eq!(m["state"], "ready");
        assert_eq!(m["properties"]["dead_letter_queue"], "work");
        assert!(
            !m["properties"]["dead_letter_reason"]
                .as_str()
                .unwrap()
                .is_empty()
        );
    }
    // Still there, never delivered.
    let dlq = queue(admin, "work-dlq");
    assert_eq!(
        (dlq["ready"].as_i64(), dlq["leased"].as_i64()),
        (Some(1), Some(0))
    );
    let peek = get(admin, "/api/v1/queues/default/work/messages");
    let values: Vec<&str> = peek["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["m1", "m2"]);

    let (status, body) = http_get_with(admin, "/api/v1/queues/default/nope/messages", &[]);
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn purge_and_redrive_need_the_token_even_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, Some(TOKEN));
    let admin = server.admin.unwrap();
    work_and_dead_letter(&mut client(&server, Some(TOKEN)), 2).await;
    wait_queue(admin, "work-dlq", "the dead letter", |q| q["ready"] == 1);

    let redrive = "/api/v1/queues/default/work-dlq/redrive";
    let purge = "/api/v1/queues/default/work/purge";
    let missing_before = refusals(admin, "missing_token");
    let wrong_before = refusals(admin, "wrong_token");
    for path in [redrive, purge] {
        let (status, body) = post(admin, path, None);
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(body["error"], "UNAUTHENTICATED");
        let (status, _) = post(admin, path, Some("not-the-token-0123456789"));
        assert_eq!(status, 401, "{path}");
    }
    assert_eq!(refusals(admin, "missing_token"), missing_before + 2);
    assert_eq!(refusals(admin, "wrong_token"), wrong_before + 2);
    // Nothing moved.
    assert_eq!(queue(admin, "work-dlq")["ready"], 1);
    assert_eq!(queue(admin, "work")["ready"], 2);

    // Redrive: the dead letter goes back to the queue it came from.
    let (status, task) = post(admin, redrive, Some(TOKEN));
    assert_eq!(status, 202, "{task}");
    assert_eq!(task["source"], "work-dlq");
    assert!(task["task_id"].as_str().unwrap().starts_with("r-"));
    wait_queue(admin, "work", "the redriven message", |q| q["ready"] == 3);
    assert_eq!(queue(admin, "work-dlq")["ready"], 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = get(admin, "/api/v1/redrives");
        let t = &tasks["redrives"][0];
        if t["status"] == "COMPLETED" {
            assert_eq!(t["moved"], 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redrive did not complete: {tasks}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Purge: every ready message goes.
    let (status, body) = post(admin, purge, Some(TOKEN));
    assert_eq!(
        (status, &body["purged"]),
        (200, &serde_json::json!(3)),
        "{body}"
    );
    assert_eq!(queue(admin, "work")["ready"], 0);

    let (status, body) = post(admin, "/api/v1/queues/default/nope/purge", Some(TOKEN));
    assert_eq!(status, 404, "{body}");
    let (status, body) = http_request(
        admin,
        "POST",
        redrive,
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "{\"destinaton\": \"typo\"}",
    );
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn without_a_core_token_writes_are_refused_with_403_and_reads_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, None);
    let admin = server.admin.unwrap();
    work_and_dead_letter(&mut client(&server, None), 1).await;
    let before = refusals(admin, "no_core_token");
    let (status, body) = post(admin, "/api/v1/queues/default/work/purge", Some(TOKEN));
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("set core_token"),
        "{body}"
    );
    assert_eq!(refusals(admin, "no_core_token"), before + 1);
    assert_eq!(queue(admin, "work")["ready"], 1);
}

#[tokio::test]
async fn groups_show_committed_offsets_and_lag() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, None);
    let admin = server.admin.unwrap();
    let mut c = client(&server, None);
    c.admin
        .create_stream(v1::CreateStreamRequest {
            id: Some(v1::StreamId::new("default", "orders")),
            partitions: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    for (partition, n) in [(0u32, 5), (1, 3)] {
        c.streams
            .append(v1::AppendRequest {
                stream: Some(v1::StreamId::new("default", "orders")),
                partition,
                batch: Some(v1::RecordBatch {
                    records: (0..n).map(|i| rec(&format!("o{i}"))).collect(),
                    ..Default::default()
                }),
                auto_create: false,
                defer_durable: false,
            })
            .await
            .unwrap();
    }
    let commit = |partition: u32, offset: i64| v1::CommittedOffset {
        stream: Some(v1::StreamId::new("default", "orders")),
        partition,
        offset,
        ..Default::default()
    };
    c.offsets
        .commit_offsets(v1::CommitOffsetsRequest {
            namespace: "default".into(),
            group: "billing".into(),
            offsets: vec![commit(0, 2), commit(1, 3)],
            ..Default::default()
        })
        .await
        .unwrap();

    let streams = get(admin, "/api/v1/streams");
    let orders = &streams["streams"][0];
    assert_eq!(orders["name"], "orders");
    assert_eq!(orders["partition_info"][0]["end_offset"], 5);
    assert_eq!(orders["partition_info"][1]["end_offset"], 3);

    let groups = get(admin, "/api/v1/groups");
    let g = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "billing")
        .unwrap_or_else(|| panic!("{groups}"));
    assert_eq!(g["lag"], 3, "{g}");
    let offsets = g["offsets"].as_array().unwrap();
    assert_eq!(offsets.len(), 2);
    for (o, (partition, committed, end, lag)) in offsets.iter().zip([(0, 2, 5, 3), (1, 3, 3, 0)]) {
        assert_eq!(o["stream"], "orders");
        assert_eq!(o["partition"], partition);
        assert_eq!(o["committed_offset"], committed);
        assert_eq!(o["end_offset"], end);
        assert_eq!(o["lag"], lag);
    }
    // The same group through ?namespace=.
    let one = get(admin, "/api/v1/groups?namespace=default");
    assert_eq!(one["groups"].as_array().unwrap().len(), 1);

    let overview = get(admin, "/api/v1/overview");
    assert!(overview["totals"]["stream_records_in"].as_u64().unwrap() >= 8);
    assert_eq!(overview["counts"]["streams"], 1);
    // No Kafka client connected: Kafka's row comes from the streams' counters.
    let kafka = overview["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["protocol"] == "kafka")
        .unwrap_or_else(|| panic!("{overview}"));
    assert!(kafka["messages_in"].as_u64().unwrap() >= 8, "{kafka}");
    assert!(overview["storage_bytes"].as_i64().unwrap() > 0);
    for key in [
        "stream_bytes_in",
        "stream_records_out",
        "queue_enqueued",
        "mqtt_messages_in",
        "mqtt_messages_out",
    ] {
        assert!(overview["totals"][key].is_u64(), "{key}: {overview}");
    }
}

#[tokio::test]
async fn addresses_sessions_users_and_the_console_files() {
    use tributary_gateway_common::auth::{ScramCredential, ScramHash};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tributary.toml");
    let mut text = String::new();
    for user in ["bob", "alice"] {
        let c = ScramCredential::derive(ScramHash::Sha256, &format!("{user}-pw"), 4096);
        text.push_str(&format!(
            "[[users]]\nname = \"{user}\"\ncredentials = [\"{}\"]\n",
            c.to_text()
        ));
    }
    std::fs::write(&config, text).unwrap();
    let mut args = vec!["--config".to_string(), config.display().to_string()];
    args.extend(free_port_args(&dir.path().join("data")));
    let server = Server::start(&args);
    let admin = server.admin.unwrap();
    let mut c = client(&server, None);
    c.admin
        .declare_address(v1::DeclareAddressRequest {
            namespace: "default".into(),
            name: "events".into(),
            kind: v1::AddressKind::Topic.into(),
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    c.admin
        .declare_queue(v1::DeclareQueueRequest {
            id: qid("audit"),
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    c.admin
        .bind(v1::BindRequest {
            binding: Some(v1::Binding {
                namespace: "default".into(),
                source_address: "events".into(),
                destination: Some(v1::binding::Destination::Queue("audit".into())),
                pattern: "order.*".into(),
                arguments: Vec::new(),
            }),
        })
        .await
        .unwrap();
    let addresses = get(admin, "/api/v1/addresses");
    let events = addresses["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "events")
        .unwrap_or_else(|| panic!("{addresses}"));
    assert_eq!(events["kind"], "topic");
    assert_eq!(events["durable"], true);
    assert_eq!(events["bindings"][0]["destination_kind"], "queue");
    assert_eq!(events["bindings"][0]["destination"], "audit");
    assert_eq!(events["bindings"][0]["pattern"], "order.*");

    let sessions = get(admin, "/api/v1/sessions");
    assert!(sessions["sessions"].is_array(), "{sessions}");
    let (status, users) = http_get_with(admin, "/api/v1/users", &[]);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&users).unwrap(),
        serde_json::json!({ "users": [
            { "name": "alice", "source": "config" },
            { "name": "bob", "source": "config" }
        ] })
    );
    assert!(!users.contains("SCRAM"), "credentials leaked: {users}");

    for path in ["/", "/console/", "/console/index.html"] {
        let (status, body) = http_get_with(admin, path, &[]);
        assert_eq!(status, 200, "{path}");
        assert!(
            body.contains("<script type=\"module\" src=\"/console/app.js\">"),
            "{path}"
        );
    }
    let (status, js) = http_get_with(admin, "/console/app.js", &[]);
    assert_eq!(status, 200);
    assert!(js.contains("/api/v1/overview"));
    assert_eq!(http_get_with(admin, "/console/nope.js", &[]).0, 404);
}
