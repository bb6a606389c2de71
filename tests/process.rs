//! The process as an operator sees it: clean shutdown on signals, and start-up failures that
//! print one clear line, exit non-zero and leave the data alone.

mod common;

use std::time::Duration;

use common::{Server, free_port_args, run_expect_failure};
use tributary_proto::v1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_shut_down_cleanly_and_keep_data() {
    let dir = tempfile::tempdir().unwrap();
    let args = free_port_args(dir.path());
    for signal in ["TERM", "INT"] {
        let server = Server::start(&args);
        let mut c = server.client();
        let id = Some(v1::StreamId::new("default", signal));
        c.admin
            .create_stream(v1::CreateStreamRequest {
                id: id.clone(),
                partitions: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        let batch = v1::RecordBatch {
            records: vec![v1::Record {
                value: "v".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        c.streams
            .append(v1::AppendRequest {
                stream: id,
                partition: 0,
                batch: Some(batch),
                auto_create: false,
                defer_durable: false,
            })
            .await
            .unwrap();
        // A long-poll in flight must not hold the shutdown up.
        let mut reader = c.clone();
        let parked = tokio::spawn(async move {
            let _ = reader
                .streams
                .fetch(v1::FetchRequest {
                    partitions: vec![v1::FetchPartition {
                        stream: Some(v1::StreamId::new("default", signal)),
                        partition: 0,
                        offset: 1,
                        max_bytes: 0,
                    }],
                    max_bytes: 1024,
                    min_bytes: 1,
                    max_wait_ms: 600_000,
                    read_committed: false,
                })
                .await;
        });
        let status = tokio::task::spawn_blocking(move || {
            server.signal_and_wait(signal, Duration::from_secs(10))
        })
        .await
        .unwrap();
        assert!(status.success(), "SIG{signal}: exit {status:?}");
        assert!(
            dir.path().join("log/.clean-shutdown").exists(),
            "clean marker after SIG{signal}"
        );
        parked.await.unwrap();
    }
    let server = Server::start(&args);
    let mut c = server.client();
    let streams = c
        .admin
        .list_streams(v1::ListStreamsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .streams;
    let ends: Vec<_> = streams
        .iter()
        .map(|s| s.partition_info[0].end_offset)
        .collect();
    assert_eq!(ends, vec![1, 1]);
}

#[test]
fn a_port_in_use_fails_before_touching_data() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = free_port_args(&data);
    let i = args.iter().position(|a| a == "--core-listen").unwrap();
    args[i + 1] = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_expect_failure(&args);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("in use") && stderr.contains("--core-listen"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!data.exists(), "the data directory was created");
}

#[test]
fn bad_config_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "data_dir = \"x\"\nfsink = \"always\"\n").unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    args.extend(["--config".into(), config.display().to_string()]);
    let (code, stderr) = run_expect_failure(&args);
    assert_eq!(code, 2);
    assert!(stderr.contains("fsink"), "{stderr}");

    let mut args = free_port_args(&dir.path().join("data"));
    args.extend(["--fsync".into(), "sometimes".into()]);
    let (code, stderr) = run_expect_failure(&args);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--fsync") && stderr.contains("sometimes"),
        "{stderr}"
    );

    let (code, stderr) = run_expect_failure(&["gateway".into(), "nats".into()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("unknown protocol 'nats'") && stderr.contains("rocketmq"),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists());
}

#[test]
fn an_unusable_data_dir_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let (code, stderr) = run_expect_failure(&free_port_args(&file));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("not-a-dir") && stderr.contains("--data-dir"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_segment_stops_start_up_without_changing_it() {
    let dir = tempfile::tempdir().unwrap();
    let args = free_port_args(dir.path());
    let server = Server::start(&args);
    let mut c = server.client();
    let id = Some(v1::StreamId::new("default", "precious"));
    c.admin
        .create_stream(v1::CreateStreamRequest {
            id: id.clone(),
            partitions: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..10 {
        let batch = v1::RecordBatch {
            records: vec![v1::Record {
                value: format!("value {i}").into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        c.streams
            .append(v1::AppendRequest {
                stream: id.clone(),
                partition: 0,
                batch: Some(batch),
                auto_create: false,
                defer_durable: false,
            })
            .await
            .unwrap();
    }
    let status = tokio::task::spawn_blocking(move || {
        server.signal_and_wait("TERM", Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert!(status.success());
    let segment = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .map(|d| d.join(format!("{:020}.log", 0)))
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&segment, &bytes).unwrap();
    let (code, stderr) = run_expect_failure(&args);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("corrupt") && stderr.contains("00000000000000000000.log"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "the damaged segment was modified"
    );
}

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs the server with `config` (a TOML file's text) on `data`, expecting it to fail
/// because a store is unreachable: non-zero exit, one `error:` line (returned) naming
/// `store`, no panic, and `data` exactly as it was before (absent, or an empty directory).
fn refused_at_start(
    dir: &std::path::Path,
    config: &str,
    data_existed: bool,
    store: &str,
) -> String {
    let data = dir.join("data");
    let file = dir.join("store.toml");
    std::fs::write(&file, config).unwrap();
    let mut args = free_port_args(&data);
    args.extend(["--config".into(), file.display().to_string()]);
    let (code, stderr) = run_expect_failure(&args);
    assert_ne!(code, 0, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(store), "{store} not named: {stderr}");
    if data_existed {
        let left: Vec<_> = std::fs::read_dir(&data).unwrap().collect();
        assert!(left.is_empty(), "written into the data directory: {left:?}");
    } else {
        assert!(!data.exists(), "the data directory was created");
    }
    errors[0].to_string()
}

#[test]
fn an_unreachable_object_store_fails_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let config = format!(
        "storage = \"opendal\"\nopendal_ack = \"shared\"\n[opendal]\nscheme = \"s3\"\n\
         bucket = \"tributary\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n\
         access_key_id = \"test\"\nsecret_access_key = \"test\"\ndisable_config_load = \"true\"\n"
    );
    let line = refused_at_start(
        dir.path(),
        &config,
        false,
        &format!("object store s3 (bucket=tributary endpoint={endpoint})"),
    );
    // The cause is on the line too, not only OpenDAL's "error sending request".
    assert!(
        line.contains("is unavailable: cannot list the bucket or root")
            && line.to_lowercase().contains("connection refused"),
        "{line}"
    );
    // The object store is also reached first when it is not the default backend.
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let config = config.replace("storage = \"opendal\"", "storage = \"local\"");
    refused_at_start(dir.path(), &config, true, "object store s3");
}

#[test]
fn an_unreachable_meta_store_fails_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    // The password must not be printed; the store and its address must.
    let secret = "pw-not-for-logs";
    for (kind, url, named) in [
        (
            "etcd",
            format!("http://127.0.0.1:{port}"),
            format!("metadata store: etcd at http://127.0.0.1:{port}"),
        ),
        (
            "postgres",
            format!("postgres://tributary:{secret}@127.0.0.1:{port}/tributary"),
            format!("metadata store: postgres at postgres://tributary@127.0.0.1:{port}/tributary"),
        ),
        (
            "mysql",
            format!("mysql://tributary:{secret}@127.0.0.1:{port}/tributary"),
            format!("metadata store: mysql at mysql://tributary@127.0.0.1:{port}/tributary"),
        ),
        (
            "redis",
            format!("redis://:{secret}@127.0.0.1:{port}"),
            format!("metadata store: redis at redis://:***@127.0.0.1:{port}"),
        ),
    ] {
        let config = format!("meta = \"{kind}\"\nmeta_url = \"{url}\"\n");
        // Absent, and an existing empty directory: both left as they were.
        for existed in [false, true] {
            let data = dir.path().join("data");
            let _ = std::fs::remove_dir_all(&data);
            if existed {
                std::fs::create_dir(&data).unwrap();
            }
            let line = refused_at_start(dir.path(), &config, existed, &named);
            assert!(
                line.to_lowercase().contains("connection refused"),
                "{kind}: no reason given: {line}"
            );
            assert!(
                !line.contains(secret),
                "{kind}: the password was printed: {line}"
            );
        }
    }
}
