//! `tributary bench`: real runs against our own Kafka, SQS and RocketMQ gateways, the
//! one-line failure for a broker that is not there (never a hang), refused options, and
//! `bench report`.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Server, free_port_args};

/// Runs `tributary ARGS`, failing the test if it is still running after `limit`.
fn run_bounded(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("TRIBUTARY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tributary");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`tributary {}` still running after {limit:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// A loopback port with nothing listening on it.
fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

/// A server whose Kafka gateway listens on a free port, groups without the initial delay.
fn kafka_server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    let kafka_at = args.iter().position(|a| a == "--kafka-listen").unwrap();
    args[kafka_at + 1] = "127.0.0.1:0".into();
    args.extend(["--group-initial-rebalance-delay-ms".into(), "0".into()]);
    let server = Server::start(&args);
    (dir, server)
}

#[test]
fn kafka_bench_against_our_gateway_receives_every_message() {
    let (_dir, server) = kafka_server();
    let target = server.kafka.unwrap().to_string();
    let pid = server.child.id().to_string();
    let out = run_bounded(
        &[
            "bench",
            "kafka",
            "--target",
            &target,
            "--producers",
            "2",
            "--consumers",
            "2",
            "--duration",
            "2",
            "--size",
            "256",
            "--broker",
            "tributary",
            "--label",
            "smoke",
            "--broker-pid",
            &pid,
            "--json",
        ],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let n = |k: &str| {
        report[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
    assert!(n("sent") > 0.0, "{report}");
    assert_eq!(n("received"), n("expected"), "{report}");
    assert_eq!(n("sent"), n("expected"), "one group: one copy per message");
    assert_eq!(n("out_of_order"), 0.0);
    assert!(
        n("msgs_per_sec") > 0.0 && n("p99_ms") >= n("p50_ms"),
        "{report}"
    );
    assert_eq!(report["broker"], "tributary");
    assert_eq!(report["label"], "smoke");
    assert!(report["rss_kib_before"].as_u64().unwrap() > 0, "{report}");
}

/// `bench kafka --transactional`: transactional producers committing every 100 ms and
/// read_committed consumers; every message arrives once.
#[test]
fn kafka_transactional_bench_delivers_every_committed_message() {
    let (_dir, server) = kafka_server();
    let target = server.kafka.unwrap().to_string();
    let out = run_bounded(
        &[
            "bench",
            "kafka",
            "--target",
            &target,
            "--producers",
            "2",
            "--consumers",
            "1",
            "--duration",
            "2",
            "--size",
            "256",
            "--transactional",
            "--commit-ms",
            "100",
            "--json",
        ],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let n = |k: &str| {
        report[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
    assert!(n("sent") > 0.0, "{report}");
    assert_eq!(n("received"), n("expected"), "{report}");
    assert_eq!(n("out_of_order"), 0.0);
    // Without --acks all a transactional run is refused.
    let refused = run_bounded(
        &[
            "bench",
            "kafka",
            "--target",
            &target,
            "--transactional",
            "--acks",
            "1",
        ],
        Duration::from_secs(60),
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--acks all"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// `bench sqs` (aws-sdk-sqs) against our SQS gateway: standard and FIFO queues, single and
/// batch requests, every message received (FIFO: in order per group, once), the queue deleted.
#[test]
fn sqs_bench_against_our_gateway_receives_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    let sqs_at = args.iter().position(|a| a == "--sqs-listen").unwrap();
    args[sqs_at + 1] = "127.0.0.1:0".into();
    let server = Server::start(&args);
    let url = format!("http://{}", server.listening["sqs"]);
    for (flags, fifo) in [
        (&["--batch", "1"][..], false),
        (&["--batch", "10"][..], false),
        (&["--batch", "10", "--fifo", "--groups", "3"][..], true),
    ] {
        let mut run = vec![
            "bench",
            "sqs",
            "--url",
            &url,
            "--producers",
            "2",
            "--consumers",
            "3",
            "--duration",
            "2",
            "--size",
            "200",
            "--wait",
            "1",
            "--queue",
            "bench-cli",
            "--json",
        ];
        run.extend_from_slice(flags);
        let out = run_bounded(&run, Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flags:?}: bench failed: {stderr}");
        let report: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        assert_eq!(report["protocol"], "sqs");
        let sent = report["sent"].as_u64().unwrap();
        assert!(sent > 0, "{flags:?}: {report}");
        assert!(report["received"].as_u64().unwrap() >= sent, "{report}");
        if fifo {
            assert_eq!(report["out_of_order"], 0, "{report}");
            assert_eq!(report["duplicates"], 0, "{report}");
        }
    }
    // Every run deleted its queue.
    let (status, queues) = common::http_get(server.admin.unwrap(), "/api/v1/queues");
    assert_eq!(status, 200, "{queues}");
    assert!(!queues.contains("bench-cli"), "{queues}");
}

/// `bench rocketmq` (a raw Remoting client) against our NameServer and broker: the route
/// look-up, the topic created and deleted, pipelined sends and long-polled pulls, every message
/// received once; with one send in flight, in order per queue.
#[test]
fn rocketmq_bench_against_our_gateway_receives_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    for flag in ["--rocketmq-listen", "--namesrv-listen"] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = "127.0.0.1:0".into();
    }
    let server = Server::start(&args);
    let namesrv = server.listening["rocketmq-namesrv"].to_string();
    let pid = server.child.id().to_string();
    for (flags, ordered) in [
        (&["--inflight", "64"][..], false),
        (&["--inflight", "1", "--partitions", "3"][..], true),
    ] {
        let mut run = vec![
            "bench",
            "rocketmq",
            "--target",
            &namesrv,
            "--producers",
            "2",
            "--consumers",
            "2",
            "--duration",
            "2",
            "--size",
            "256",
            "--broker-pid",
            &pid,
            "--json",
        ];
        run.extend_from_slice(flags);
        let out = run_bounded(&run, Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flags:?}: bench failed: {stderr}");
        assert!(!stderr.contains("warning"), "{flags:?}: {stderr}");
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
        let n = |k: &str| {
            report[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{k} in {report}"))
        };
        assert_eq!(report["protocol"], "rocketmq");
        assert!(n("sent") > 0.0, "{flags:?}: {report}");
        assert_eq!(n("received"), n("expected"), "{report}");
        assert_eq!(n("sent"), n("expected"), "one group: one copy per message");
        assert_eq!(n("duplicates"), 0.0, "{report}");
        if ordered {
            assert_eq!(n("out_of_order"), 0.0, "{report}");
        }
        assert!(
            n("msgs_per_sec") > 0.0 && n("p99_ms") >= n("p50_ms"),
            "{report}"
        );
        assert!(
            report["broker_cpu_us_per_msg"].as_f64().is_some(),
            "{report}"
        );
    }
    // Every run deleted its topic.
    let (status, streams) = common::http_get(server.admin.unwrap(), "/api/v1/streams");
    assert_eq!(status, 200, "{streams}");
    assert!(!streams.contains("tributary-bench-"), "{streams}");
}

#[test]
fn every_protocol_reports_a_missing_broker_in_one_line() {
    for protocol in ["kafka", "mqtt", "amqp", "sqs", "rocketmq"] {
        let target = closed_port();
        let out = run_bounded(
            &["bench", protocol, "--target", &target, "--duration", "1"],
            Duration::from_secs(90),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{protocol}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{protocol}: no report for a failed run"
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{protocol}: one line, got: {stderr}");
        assert!(
            lines[0].starts_with(&format!("error: {protocol} bench against {target}")),
            "{protocol}: {stderr}"
        );
    }
}

#[test]
fn bad_options_are_refused() {
    for (args, needle) in [
        (
            vec!["bench", "mqtt", "--qos", "3", "--target", "127.0.0.1:1"],
            "--qos must be 0, 1 or 2",
        ),
        (
            vec!["bench", "kafka", "--size", "8", "--target", "127.0.0.1:1"],
            "--size must be at least 20",
        ),
        (
            vec![
                "bench",
                "amqp",
                "--consumers",
                "0",
                "--target",
                "127.0.0.1:1",
            ],
            "--producers and --consumers must be at least 1",
        ),
        (
            vec!["bench", "sqs", "--batch", "11", "--target", "127.0.0.1:1"],
            "--batch must be 1 to 10",
        ),
        (
            vec!["bench", "sqs", "--url", "https://127.0.0.1:1"],
            "plain HTTP",
        ),
        (
            vec![
                "bench",
                "rocketmq",
                "--consumers",
                "9",
                "--target",
                "127.0.0.1:1",
            ],
            "more than the topic's queues",
        ),
    ] {
        let out = run_bounded(&args, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn report_prints_medians_and_ratios_and_refuses_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let line = |broker: &str, mb: f64, p99: f64| {
        format!(
            r#"{{"protocol":"mqtt","broker":"{broker}","label":"qos1","msgs_per_sec":{},"mb_per_sec":{mb},"p50_ms":1.0,"p99_ms":{p99}}}"#,
            mb * 1000.0
        )
    };
    let text = [
        line("tributary", 40.0, 2.0),
        line("mosquitto", 20.0, 4.0),
        line("tributary", 60.0, 1.0),
        line("mosquitto", 30.0, 2.0),
        line("tributary", 50.0, 3.0),
        line("mosquitto", 25.0, 3.0),
    ]
    .join("\n");
    std::fs::write(&results, text).unwrap();
    let svg = dir.path().join("chart.svg");
    let out = run_bounded(
        &[
            "bench",
            "report",
            results.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mosquitto = table
        .lines()
        .find(|l| l.contains("mosquitto"))
        .unwrap_or_else(|| panic!("{table}"));
    // Medians: tributary 50 MB/s and p99 2 ms, mosquitto 25 MB/s and 3 ms.
    assert!(
        mosquitto.contains(" 2.00") && mosquitto.contains(" 0.67"),
        "{table}"
    );
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));

    std::fs::write(&results, "{\"protocol\":\"mqtt\"}\nnot json\n").unwrap();
    let out = run_bounded(
        &["bench", "report", results.to_str().unwrap()],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("line 2"),
        "{stderr}"
    );
}
