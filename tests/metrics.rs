//! `/metrics` through the real binary: every metric the code records is described (HELP and
//! TYPE) from the first scrape, and a dropped MQTT message is counted.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::mqtt_raw::{packet, read_exact, string};
use common::{Server, free_port_args, http_get, wait_metric};
use tributary::metrics_catalog::{Kind, METRICS};

/// Every metric name recorded with a `metrics::counter!` / `gauge!` / `histogram!` macro in
/// the workspace's sources, and the file of each name that is not a string literal.
fn names_in_source() -> (BTreeSet<String>, Vec<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names = BTreeSet::new();
    let mut not_literal = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(
                    file_name.as_str(),
                    "target" | "third_party" | "fuzz" | "tests" | "node_modules"
                ) && !file_name.starts_with('.')
                {
                    dirs.push(path);
                }
                continue;
            }
            if !file_name.ends_with(".rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for mac in [
                "metrics::counter!(",
                "metrics::gauge!(",
                "metrics::histogram!(",
            ] {
                for (at, _) in text.match_indices(mac) {
                    let rest = text[at + mac.len()..].trim_start();
                    match rest.strip_prefix('"') {
                        Some(lit) => {
                            names.insert(lit[..lit.find('"').unwrap()].to_string());
                        }
                        None => not_literal.push(path.display().to_string()),
                    }
                }
            }
        }
    }
    (names, not_literal)
}

#[test]
fn every_metric_in_the_code_is_described_from_the_first_scrape() {
    let (names, not_literal) = names_in_source();
    // The catalogue itself records its names from variables; nothing else may.
    assert!(
        not_literal
            .iter()
            .all(|p| p.ends_with("src/metrics_catalog.rs")),
        "metric names that are not string literals (the check cannot see them): {not_literal:?}"
    );
    assert!(
        names.len() >= 15,
        "the source grep found too little: {names:?}"
    );
    let catalogued: BTreeSet<String> = METRICS.iter().map(|m| m.name.to_string()).collect();
    let missing: Vec<_> = names.difference(&catalogued).collect();
    assert!(
        missing.is_empty(),
        "recorded in the code but not in src/metrics_catalog.rs: {missing:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&free_port_args(dir.path()));
    let (status, body) = http_get(server.admin.unwrap(), "/metrics");
    assert_eq!(status, 200);
    for m in METRICS {
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = format!("# HELP {} {}\n", m.name, m.help);
        let ty = format!("# TYPE {} {kind}\n", m.name);
        assert!(body.contains(&help), "no `{}` in:\n{body}", help.trim());
        assert!(body.contains(&ty), "no `{}` in:\n{body}", ty.trim());
    }
    assert!(
        body.contains("tributary_session_dropped_total{reason=\"queue_full\"} 0\n"),
        "{body}"
    );
}

fn connect(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = string("MQTT");
    body.extend([4, if clean { 0x02 } else { 0x00 }, 0, 60]);
    body.extend(string(client_id));
    packet(0x10, &body)
}

fn connected(addr: SocketAddr, id: &str, clean: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&connect(id, clean)).unwrap();
    let ack = read_exact(&mut s, 4);
    assert_eq!(ack[0], 0x20, "CONNACK expected, got {ack:02x?}");
    assert_eq!(ack[3], 0, "CONNACK refused: {ack:02x?}");
    s
}

fn dropped(admin: SocketAddr) -> Option<u64> {
    let (_, body) = http_get(admin, "/metrics");
    let prefix = "tributary_session_dropped_total{reason=\"queue_full\"} ";
    body.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn messages_beyond_a_full_session_queue_are_counted_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    let i = args.iter().position(|a| a == "--mqtt-listen").unwrap();
    args[i + 1] = "127.0.0.1:0".into();
    args.extend(["--mqtt-max-queued".into(), "2".into()]);
    let server = Server::start(&args);
    let (mqtt, admin) = (server.mqtt.unwrap(), server.admin.unwrap());
    assert_eq!(dropped(admin), Some(0));

    // A persistent session subscribed at QoS 1, then gone: its messages queue.
    let mut sub = connected(mqtt, "slow", false);
    let mut body = vec![0, 1];
    body.extend(string("q/#"));
    body.push(1);
    sub.write_all(&packet(0x82, &body)).unwrap();
    assert_eq!(read_exact(&mut sub, 5), [0x90, 3, 0, 1, 1]);
    sub.write_all(&[0xe0, 0]).unwrap();
    drop(sub);
    std::thread::sleep(Duration::from_millis(200));

    let mut publisher = connected(mqtt, "pub", true);
    for id in 1..=5u8 {
        let mut body = string("q/x");
        body.extend([0, id]);
        body.extend_from_slice(b"m");
        publisher.write_all(&packet(0x32, &body)).unwrap();
        assert_eq!(read_exact(&mut publisher, 4), [0x40, 2, 0, id]);
    }

    // Two fit; the other three are dropped and counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = dropped(admin);
        if n == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "dropped count {n:?}, expected 3");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_per_listener_queue_depths_and_group_lag_are_exported() {
    use tributary_proto::v1;
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    let i = args.iter().position(|a| a == "--mqtt-listen").unwrap();
    args[i + 1] = "127.0.0.1:0".into();
    let server = Server::start(&args);
    let (mqtt, admin) = (server.mqtt.unwrap(), server.admin.unwrap());

    // MQTT: one PUBLISH in (5 payload bytes), delivered once to a subscriber.
    tokio::task::spawn_blocking(move || {
        let mut sub = connected(mqtt, "m-sub", true);
        let mut body = vec![0, 1];
        body.extend(string("m/#"));
        body.push(1);
        sub.write_all(&packet(0x82, &body)).unwrap();
        assert_eq!(read_exact(&mut sub, 5), [0x90, 3, 0, 1, 1]);
        let mut publisher = connected(mqtt, "m-pub", true);
        let mut body = string("m/x");
        body.extend([0, 1]);
        body.extend_from_slice(b"hello");
        publisher.write_all(&packet(0x32, &body)).unwrap();
        assert_eq!(read_exact(&mut publisher, 4), [0x40, 2, 0, 1]);
        // The delivery: PUBLISH QoS 1 with topic m/x, packet id, payload.
        let delivery = read_exact(&mut sub, 2 + 2 + 3 + 2 + 5);
        assert_eq!(&delivery[delivery.len() - 5..], b"hello");
    })
    .await
    .unwrap();
    let labels = "{listener=\"mqtt\",protocol=\"mqtt\"}";
    wait_metric(admin, &format!("tributary_messages_in_total{labels}"), 1.0);
    wait_metric(
        admin,
        &format!("tributary_message_bytes_in_total{labels}"),
        5.0,
    );
    wait_metric(admin, &format!("tributary_messages_out_total{labels}"), 1.0);

    // A queue with two ready messages, and a group one record behind on a stream of three.
    let client = server.client();
    client
        .admin
        .clone()
        .declare_queue(v1::DeclareQueueRequest {
            id: Some(v1::QueueId {
                namespace: "default".into(),
                name: "jobs".into(),
            }),
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let rec = |v: &str| v1::Record {
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    };
    client
        .queues
        .clone()
        .enqueue(v1::EnqueueRequest {
            queue: Some(v1::QueueId {
                namespace: "default".into(),
                name: "jobs".into(),
            }),
            records: vec![rec("a"), rec("b")],
        })
        .await
        .unwrap();
    let stream = v1::StreamId {
        namespace: "default".into(),
        name: "events".into(),
    };
    client
        .streams
        .clone()
        .append(v1::AppendRequest {
            stream: Some(stream.clone()),
            partition: 0,
            batch: Some(v1::RecordBatch {
                records: vec![rec("1"), rec("2"), rec("3")],
                record_count: 3,
                ..Default::default()
            }),
            auto_create: true,
            defer_durable: false,
        })
        .await
        .unwrap();
    client
        .offsets
        .clone()
        .commit_offsets(v1::CommitOffsetsRequest {
            namespace: "default".into(),
            group: "readers".into(),
            offsets: vec![v1::CommittedOffset {
                stream: Some(stream),
                partition: 0,
                offset: 2,
                ..Default::default()
            }],
            generation: None,
            member_id: String::new(),
        })
        .await
        .unwrap();
    let (admin2, ready, lag) = (
        admin,
        "tributary_queue_messages{namespace=\"default\",queue=\"jobs\",state=\"ready\"}",
        "tributary_group_lag{namespace=\"default\",group=\"readers\",stream=\"events\",partition=\"0\"}",
    );
    tokio::task::spawn_blocking(move || {
        wait_metric(admin2, ready, 2.0);
        wait_metric(admin2, lag, 1.0);
    })
    .await
    .unwrap();
}

/// Every metric the Grafana dashboard in the repository queries is one the process exports.
#[test]
fn the_grafana_dashboard_names_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docs/grafana/tributary.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 8,
        "the dashboard has {} queries",
        exprs.len()
    );
    let known: BTreeSet<&str> = METRICS
        .iter()
        .map(|m| m.name)
        .chain(tributary::metrics_units::FAMILIES.iter().map(|(n, _)| *n))
        .collect();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("tributary_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                known.contains(base),
                "the dashboard queries {name}, which the process does not export (in: {expr})"
            );
        }
    }
}
