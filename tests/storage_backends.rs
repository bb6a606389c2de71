//! Streams and queues choose their log store backend: with an `[opendal]` table the local
//! log and the object store are both available, `storage` names the default, and a stream or
//! queue created with `storage = "opendal"` (or `"local"`) lives there for good: its data
//! goes only to that backend, survives kill -9 there, and a server started without that
//! backend refuses to start rather than recreate it empty elsewhere.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::queue_api::{self, text};
use common::{Server, free_port_args, run_expect_failure};
use tributary_gateway_common::error_code;
use tributary_proto::v1;

fn sid(name: &str) -> Option<v1::StreamId> {
    Some(v1::StreamId::new("default", name))
}

/// Every file under `dir` whose path contains `part` (the object store's keys on a
/// filesystem bucket).
fn objects(dir: &Path, part: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().contains(part) {
                out.push(path);
            }
        }
    }
    out
}

fn config(dir: &Path, default: &str) -> Vec<String> {
    let file = dir.join(format!("{default}.toml"));
    std::fs::write(
        &file,
        format!(
            "storage = \"{default}\"\nopendal_ack = \"shared\"\nopendal_upload_interval_ms = 10\n\
             [opendal]\nscheme = \"fs\"\nroot = \"{}\"\n",
            dir.join("bucket").display()
        ),
    )
    .unwrap();
    let mut args = free_port_args(&dir.join("data"));
    args.extend(["--config".into(), file.display().to_string()]);
    args
}

async fn append(api: &mut common::queue_api::Api, stream: &str, value: &str) {
    api.streams
        .append(v1::AppendRequest {
            stream: sid(stream),
            partition: 0,
            batch: Some(v1::RecordBatch {
                records: vec![v1::Record {
                    value: Bytes::from(value.to_string()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            auto_create: false,
            defer_durable: false,
        })
        .await
        .unwrap();
}

async fn read_all(api: &mut common::queue_api::Api, stream: &str) -> Vec<String> {
    let resp = api
        .streams
        .fetch(v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: sid(stream),
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
    let p = &resp.partitions[0];
    assert_eq!(p.error, 0, "{}", p.error_message);
    p.batches
        .iter()
        .flat_map(|b| b.records.iter())
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

async fn describe(api: &mut common::queue_api::Api, stream: &str) -> v1::StreamInfo {
    api.admin
        .describe_stream(v1::DescribeStreamRequest { id: sid(stream) })
        .await
        .unwrap()
        .into_inner()
        .stream
        .unwrap()
}

async fn create(
    api: &mut common::queue_api::Api,
    stream: &str,
    storage: Option<&str>,
) -> Result<v1::StreamInfo, tonic::Status> {
    api.admin
        .create_stream(v1::CreateStreamRequest {
            id: sid(stream),
            partitions: 1,
            config: Some(v1::StreamConfig {
                storage: storage.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().stream.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_queues_live_on_the_backend_they_chose() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    let local_default = config(dir.path(), "local");
    let server = Server::start(&local_default);
    let mut api = queue_api::api(&server).await;

    // The default backend is recorded and described back; the other one is chosen by name.
    let hot = create(&mut api, "hot", None).await.unwrap();
    assert_eq!(hot.config.unwrap().storage.as_deref(), Some("local"));
    assert!(!hot.explicit_configs.contains(&"storage".to_string()));
    let cold = create(&mut api, "cold", Some("opendal")).await.unwrap();
    assert_eq!(cold.config.unwrap().storage.as_deref(), Some("opendal"));
    assert!(cold.explicit_configs.contains(&"storage".to_string()));

    // A backend this server does not have is refused, naming the ones it has.
    let err = create(&mut api, "elsewhere", Some("hdfs"))
        .await
        .unwrap_err();
    assert_eq!(error_code(&err), v1::ErrorCode::InvalidConfig, "{err:?}");
    assert!(
        err.message().contains("available: local, opendal"),
        "{}",
        err.message()
    );

    // Appends to the local stream leave the object store alone; the object-store stream's
    // appends are acknowledged once a WAL object holds them.
    for i in 0..20 {
        append(&mut api, "hot", &format!("hot-{i}")).await;
    }
    assert!(
        objects(&bucket, "wal").is_empty(),
        "a local stream's appends reached the object store: {:?}",
        objects(&bucket, "wal")
    );
    for i in 0..20 {
        append(&mut api, "cold", &format!("cold-{i}")).await;
    }
    assert!(!objects(&bucket, "wal").is_empty(), "no WAL object written");

    // The backend is the stream's for life.
    let err = api
        .admin
        .update_stream_config(v1::UpdateStreamConfigRequest {
            id: sid("cold"),
            set: Some(v1::StreamConfig {
                storage: Some("local".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&err), v1::ErrorCode::InvalidConfig, "{err:?}");
    assert!(err.message().contains("cannot change"), "{}", err.message());

    // Queues choose the same way.
    let q = api
        .declare(
            "q-cold",
            v1::QueueConfig {
                storage: Some("opendal".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(q.config.unwrap().storage.as_deref(), Some("opendal"));
    let q = api.declare("q-hot", v1::QueueConfig::default()).await;
    assert_eq!(q.config.unwrap().storage.as_deref(), Some("local"));
    for queue in ["q-cold", "q-hot"] {
        let msgs = (0..5)
            .map(|i| v1::Record {
                value: Bytes::from(format!("{queue}-{i}")),
                ..Default::default()
            })
            .collect();
        api.send(queue, msgs).await;
    }
    drop(api);
    server.kill9();

    // After kill -9 everything is where it was, with the object store now the default.
    let opendal_default = config(dir.path(), "opendal");
    let server = Server::start(&opendal_default);
    let mut api = queue_api::api(&server).await;
    let want = |p: &str| (0..20).map(|i| format!("{p}-{i}")).collect::<Vec<_>>();
    assert_eq!(read_all(&mut api, "hot").await, want("hot"));
    assert_eq!(read_all(&mut api, "cold").await, want("cold"));
    let hot = describe(&mut api, "hot").await;
    assert_eq!(hot.config.unwrap().storage.as_deref(), Some("local"));
    for queue in ["q-cold", "q-hot"] {
        let mut got: Vec<String> = api.receive_all(queue, 5).await.iter().map(text).collect();
        got.sort();
        let want: Vec<String> = (0..5).map(|i| format!("{queue}-{i}")).collect();
        assert_eq!(got, want, "queue {queue}");
    }
    // A stream created now without a choice goes to the new default.
    let fresh = create(&mut api, "fresh", None).await.unwrap();
    assert_eq!(fresh.config.unwrap().storage.as_deref(), Some("opendal"));
    drop(api);
    drop(server);

    // Without the object store configured, a server holding streams on it does not start
    // (it would otherwise create them empty on the local log).
    let (_, stderr) = run_expect_failure(&free_port_args(&dir.path().join("data")));
    assert!(
        stderr.contains("storage backend 'opendal' is not configured"),
        "{stderr}"
    );
}
