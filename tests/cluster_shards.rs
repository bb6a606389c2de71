//! `tributary core --cluster-shards`: two core nodes on etcd or PostgreSQL and a filesystem
//! bucket spread four shards; a client scoped to each of eight namespaces (as every gateway's
//! is) finds the node serving its namespace's shard by itself. One node is killed with SIGKILL: the other
//! takes its shards over and every acknowledged record is read back. The killed node comes
//! back, shards move back to it, and nothing is lost either.
//!
//! Runs on etcd when `TRIBUTARY_TEST_ETCD_URL` is set and on PostgreSQL when
//! `TRIBUTARY_TEST_POSTGRES_URL` is (scripts/test-stores.sh starts the servers and sets them;
//! with `TRIBUTARY_REQUIRE_STORES=1` a missing URL fails instead of skipping).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Server, free_port_args};
use tributary_gateway_common::CoreClient;
use tributary_proto::v1;

const SHARDS: u32 = 4;
/// The namespace of the nodes' `[[mqtt_stream_rules]]` entry.
const RULE_NAMESPACE: &str = "tenant-3";

/// A metadata server's URL from `var`, or `None` (after saying so) when the test is skipped.
fn store_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("TRIBUTARY_REQUIRE_STORES").as_deref() == Ok("1") => {
            panic!("{var} is not set and TRIBUTARY_REQUIRE_STORES=1")
        }
        _ => {
            println!("skipped: {var} is not set (scripts/test-stores.sh starts the server)");
            None
        }
    }
}

/// The metadata store the nodes share.
struct Meta {
    kind: &'static str,
    url: String,
}

impl Meta {
    fn etcd() -> Option<Self> {
        store_url("TRIBUTARY_TEST_ETCD_URL").map(|url| Self { kind: "etcd", url })
    }

    fn postgres() -> Option<Self> {
        store_url("TRIBUTARY_TEST_POSTGRES_URL").map(|url| Self {
            kind: "postgres",
            url,
        })
    }
}

fn start_node(dir: &Path, name: &str, meta: &Meta, namespace: &str) -> Server {
    let rule = format!(
        "[[mqtt_stream_rules]]\nfilter = \"sensors/#\"\nstream = \"sensors\"\nnamespace = \"{RULE_NAMESPACE}\"\n"
    );
    start_node_with(dir, name, meta, namespace, &rule)
}

/// A node of a deployment placing streams by (namespace, stream).
fn start_spreading_node(dir: &Path, name: &str, meta: &Meta, namespace: &str) -> Server {
    start_node_with(
        dir,
        name,
        meta,
        namespace,
        "cluster_shard_scheme = \"stream\"\n",
    )
}

fn start_node_with(dir: &Path, name: &str, meta: &Meta, namespace: &str, extra: &str) -> Server {
    let data = dir.join(format!("data-{name}"));
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "storage = \"opendal\"\nopendal_ack = \"shared\"\nopendal_upload_interval_ms = 5\n\
             meta = \"{}\"\nmeta_url = \"{}\"\nmeta_namespace = \"{namespace}\"\n\
             cluster_node = \"{name}\"\ncluster_shards = {SHARDS}\ncluster_lease_ttl_ms = 1000\n\
             {extra}[opendal]\nscheme = \"fs\"\nroot = \"{}\"\n",
            meta.kind,
            meta.url,
            dir.join("bucket").display()
        ),
    )
    .unwrap();
    let mut args = vec![
        "core".to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    args.extend(free_port_args(&data));
    Server::start(&args)
}

/// A node's view of the shards (`GET /api/v1/cluster/shards`, asking where `namespace` is).
fn shard_view(node: &Server, namespace: &str) -> serde_json::Value {
    let (status, body) = common::http_get(
        node.admin.expect("the node's admin listener"),
        &format!("/api/v1/cluster/shards?namespace={namespace}"),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The shards a view says its node serves.
fn served_shards(view: &serde_json::Value) -> Vec<u64> {
    view["served"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["shard"].as_u64().unwrap())
        .collect()
}

/// Polls the nodes' admin listeners (up to 30 s) until they serve `want` shards each, every
/// shard by exactly one of them.
fn wait_for_split(nodes: &[&Server], want: &[usize]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let served: Vec<Vec<u64>> = nodes
            .iter()
            .map(|n| served_shards(&shard_view(n, "default")))
            .collect();
        let mut all: Vec<u64> = served.iter().flatten().copied().collect();
        all.sort();
        let counts: Vec<usize> = served.iter().map(Vec::len).collect();
        if counts == want && all == (0..u64::from(SHARDS)).collect::<Vec<_>>() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the shards did not settle as {want:?}: {served:?}"
        );
        std::thread::sleep(Duration::from_millis(50)); // a poll of the leases' next round
    }
}

/// The configured MQTT rule is declared in the core of its namespace's shard, on whichever
/// node serves it: its stream exists and the rules address binds the filter to it.
async fn assert_rule_declared(client: &CoreClient) {
    let scoped = client.scoped(RULE_NAMESPACE);
    let (bindings, _) = retried("list the rule bindings", || {
        let mut admin = scoped.admin.clone();
        let req = v1::ListBindingsRequest {
            namespace: RULE_NAMESPACE.into(),
            source_address: "$mqtt".into(),
        };
        async move { admin.list_bindings(req).await }
    })
    .await;
    let bindings = bindings.into_inner().bindings;
    assert!(
        bindings.iter().any(|b| b.pattern == "sensors/#"
            && b.destination == Some(v1::binding::Destination::Stream("sensors".into()))),
        "{bindings:?}"
    );
}

/// Retries `call` while it is UNAVAILABLE (a shard on another node, or moving), up to 30 s;
/// says whether an attempt failed first.
async fn retried<T, F, Fut>(what: &str, mut call: F) -> (T, bool)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failed = false;
    loop {
        match call().await {
            Ok(v) => return (v, failed),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                failed = true;
                tokio::time::sleep(Duration::from_millis(50)).await; // the client's retry pause
            }
            Err(s) => panic!("{what}: {s:?}"),
        }
    }
}

fn json_get(node: &Server, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = common::http_get(node.admin.expect("the node's admin listener"), path);
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, value)
}

/// The admin API's reads on nodes serving shards: each node answers for what it holds, a
/// call about a namespace or stream held elsewhere is answered 503 naming its node, and the
/// nodes' answers together are the deployment's.
fn check_admin_reads(
    nodes: &[&Server],
    namespaces: &[String],
    acked: &BTreeMap<String, Vec<String>>,
    every_namespace: &[String],
) {
    let names = ["a", "b"];
    let mut streams_listed = Vec::new();
    for node in nodes {
        let (status, listed) = json_get(node, "/api/v1/namespaces");
        assert_eq!(status, 200, "{listed}");
        let mut got: Vec<String> = listed["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect();
        got.sort();
        assert_eq!(got, every_namespace);
        let (status, listed) = json_get(node, "/api/v1/streams");
        assert_eq!(status, 200, "{listed}");
        // The namespaces' `events` streams (a configured rule makes another).
        for s in listed["streams"].as_array().unwrap() {
            if s["name"] == "events" {
                streams_listed.push(s["namespace"].as_str().unwrap().to_string());
            }
        }
    }
    streams_listed.sort();
    assert_eq!(
        streams_listed, namespaces,
        "each node lists the streams it holds, once"
    );
    for ns in namespaces {
        let home = shard_view(nodes[0], ns)["namespace"]["owner"]
            .as_str()
            .unwrap()
            .to_string();
        for (node, name) in nodes.iter().zip(names) {
            let (status, stream) = json_get(node, &format!("/api/v1/streams/{ns}/events"));
            let (queues_status, queues) = json_get(node, &format!("/api/v1/queues?namespace={ns}"));
            if name == home {
                assert_eq!(status, 200, "{ns} on {name}: {stream}");
                assert_eq!(
                    stream["partition_info"][0]["end_offset"],
                    acked[ns].len() as u64,
                    "{ns}: {stream}"
                );
                assert_eq!(queues_status, 200, "{ns} on {name}: {queues}");
            } else {
                assert_eq!(status, 503, "{ns} on {name}: {stream}");
                assert_eq!(stream["owner"], home.as_str(), "{ns}: {stream}");
                assert_eq!(queues_status, 503, "{ns} on {name}: {queues}");
            }
        }
    }
    // Users are kept by the home shard's node; the other names it.
    let answers: Vec<(u16, serde_json::Value)> =
        nodes.iter().map(|n| json_get(n, "/api/v1/users")).collect();
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 200).count(),
        1,
        "{answers:?}"
    );
    let (_, users) = answers.iter().find(|(s, _)| *s == 200).unwrap();
    assert!(users.to_string().contains("alice"), "{users}");
}

fn stream(namespace: &str) -> Option<v1::StreamId> {
    Some(v1::StreamId::new(namespace, "events"))
}

/// Appends `value`; whether an attempt failed first (it may have been stored all the same,
/// as a retried write without idempotence may be: the retry then stores it twice).
async fn append(client: &CoreClient, namespace: &str, value: &str) -> bool {
    retried(&format!("append to {namespace}"), || {
        let mut streams = client.streams.clone();
        let req = v1::AppendRequest {
            stream: stream(namespace),
            partition: 0,
            batch: Some(v1::RecordBatch {
                records: vec![v1::Record {
                    value: Bytes::from(value.to_string()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            auto_create: true,
            defer_durable: false,
        };
        async move { streams.append(req).await }
    })
    .await
    .1
}

async fn read_all(client: &CoreClient, namespace: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    loop {
        let offset = out.len() as i64;
        let fetched = retried(&format!("fetch from {namespace}"), || {
            let mut streams = client.streams.clone();
            let req = v1::FetchRequest {
                partitions: vec![v1::FetchPartition {
                    stream: stream(namespace),
                    partition: 0,
                    offset,
                    max_bytes: 0,
                }],
                max_bytes: 1 << 20,
                min_bytes: 0,
                max_wait_ms: 0,
                read_committed: false,
            };
            async move { streams.fetch(req).await }
        })
        .await
        .0
        .into_inner();
        let before = out.len();
        for batch in &fetched.partitions[0].batches {
            for record in &batch.records {
                out.push(String::from_utf8_lossy(&record.value).into_owned());
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

/// What was read, with the second copy of a retried write dropped (the one duplicate the
/// protocol allows a client without idempotence); the copies dropped are counted.
fn without_retry_copies(
    read: Vec<String>,
    retried: &HashSet<String>,
    dropped: &mut usize,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for value in read {
        if out.last() == Some(&value) && retried.contains(&value) {
            *dropped += 1;
            continue;
        }
        out.push(value);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_spread_over_core_nodes_and_survive_a_kill_on_etcd() {
    if let Some(meta) = Meta::etcd() {
        spread_kill_return(meta).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_spread_over_core_nodes_and_survive_a_kill_on_postgres() {
    if let Some(meta) = Meta::postgres() {
        spread_kill_return(meta).await;
    }
}

async fn spread_kill_return(meta: Meta) {
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let meta_namespace = format!("shards_{}_{}", std::process::id(), nanos % 1_000_000_000);
    let a = start_node(dir.path(), "a", &meta, &meta_namespace);
    let b = start_node(dir.path(), "b", &meta, &meta_namespace);
    let nodes = format!("http://{},http://{}", a.core, b.core);
    let client = CoreClient::connect_lazy_with(&nodes, None, None).unwrap();

    let namespaces: Vec<String> = (0..8).map(|n| format!("tenant-{n}")).collect();
    let mut acked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut retried_values = HashSet::new();
    let mut duplicates = 0;
    for ns in &namespaces {
        let scoped = client.scoped(ns);
        retried(&format!("create {ns}"), || {
            let mut admin = scoped.admin.clone();
            let req = v1::CreateNamespaceRequest {
                name: ns.clone(),
                if_not_exists: true,
                ..Default::default()
            };
            async move { admin.create_namespace(req).await }
        })
        .await;
        for i in 0..10 {
            let value = format!("{ns}/{i}");
            if append(&scoped, ns, &value).await {
                retried_values.insert(value.clone());
            }
            acked.entry(ns.clone()).or_default().push(value);
        }
    }

    // Each node's admin listener says which shards it serves and where each namespace is:
    // once the leases have settled (two shards each), both name the same owner, and it is
    // the node that says it serves the namespace and lists it.
    wait_for_split(&[&a, &b], &[2, 2]);
    for ns in &namespaces {
        let (va, vb) = (shard_view(&a, ns), shard_view(&b, ns));
        let (wa, wb) = (&va["namespace"], &vb["namespace"]);
        assert_eq!(wa["shard"], wb["shard"], "{ns}: {va} {vb}");
        assert_eq!(wa["owner"], wb["owner"], "{ns}: {va} {vb}");
        let (owner, view) = if wa["served_here"] == true {
            ("a", &va)
        } else {
            ("b", &vb)
        };
        assert_ne!(wa["served_here"], wb["served_here"], "{ns}: {va} {vb}");
        assert_eq!(wa["owner"], owner, "{ns}: {va} {vb}");
        let listed = view["served"].as_array().unwrap().iter().any(|s| {
            s["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == ns.as_str())
        });
        assert!(listed, "{ns} is not listed by its node: {view}");
    }
    // The CLI finds the node serving the namespace it is asked about, whichever node is
    // listed first.
    let both = format!("http://{},http://{}", a.core, b.core);
    for ns in &namespaces {
        let out = common::cli(&both, &["streams", "list", "-n", ns, "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{ns}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("\"events\""), "{ns}: {stdout}");
    }
    // Every namespace is listed, though each shard's core holds only its own (the catalog).
    let listed = client
        .admin
        .clone()
        .list_namespaces(v1::ListNamespacesRequest {})
        .await
        .expect("listing the namespaces")
        .into_inner();
    let mut names: Vec<String> = listed.namespaces.into_iter().map(|n| n.name).collect();
    names.sort();
    let mut want = namespaces.clone();
    want.push("default".into());
    want.sort();
    assert_eq!(names, want);
    // Users live in the home shard: the CLI finds its node whichever is listed first.
    let (a_url, b_url) = (format!("http://{}", a.core), format!("http://{}", b.core));
    let added = common::cli_stdin(&both, &["users", "add", "alice"], "alice-secret-1\n");
    assert!(
        added.status.success(),
        "users add: {}",
        String::from_utf8_lossy(&added.stderr)
    );
    for order in [format!("{a_url},{b_url}"), format!("{b_url},{a_url}")] {
        let out = common::cli(&order, &["users", "list", "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("\"alice\""),
            "users list --core {order}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each node exports its shard cores' per-unit gauges, each family once.
    for node in [&a, &b] {
        let admin = node.admin.unwrap();
        assert_eq!(common::http_get(admin, "/healthz").0, 200);
        let (status, text) = common::http_get(admin, "/metrics");
        assert_eq!(status, 200);
        assert_eq!(
            text.matches("# TYPE tributary_queue_messages gauge")
                .count(),
            1,
            "{text}"
        );
    }

    check_admin_reads(&[&a, &b], &namespaces, &acked, &want);

    assert_rule_declared(&client).await;

    // b is killed: a takes its shards over from shared storage.
    let killed = Instant::now();
    b.kill9();
    for ns in &namespaces {
        let scoped = client.scoped(ns);
        let read = read_all(&scoped, ns).await;
        let read = without_retry_copies(read, &retried_values, &mut duplicates);
        assert_eq!(read, acked[ns], "{ns} after the kill");
        let value = format!("{ns}/after-the-kill");
        if append(&scoped, ns, &value).await {
            retried_values.insert(value.clone());
        }
        acked.get_mut(ns).unwrap().push(value);
    }
    println!(
        "every namespace served again {:?} after the kill",
        killed.elapsed()
    );
    wait_for_split(&[&a], &[SHARDS as usize]);
    assert_rule_declared(&client).await;

    // b comes back (the same address is not needed: clients list it anew) and gets its share
    // back; every record is still there.
    let b2 = start_node(dir.path(), "b", &meta, &meta_namespace);
    let nodes = format!("http://{},http://{}", a.core, b2.core);
    let client = CoreClient::connect_lazy_with(&nodes, None, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut served_by_b2 = 0;
    while served_by_b2 == 0 {
        assert!(Instant::now() < deadline, "no shard moved back to b");
        served_by_b2 = 0;
        for ns in &namespaces {
            let only_b2 = CoreClient::connect_lazy(&format!("http://{}", b2.core))
                .unwrap()
                .scoped(ns);
            let mut streams = only_b2.streams.clone();
            let probe = streams
                .fetch(v1::FetchRequest {
                    partitions: vec![v1::FetchPartition {
                        stream: stream(ns),
                        partition: 0,
                        offset: 0,
                        max_bytes: 0,
                    }],
                    max_bytes: 1 << 20,
                    min_bytes: 0,
                    max_wait_ms: 0,
                    read_committed: false,
                })
                .await;
            served_by_b2 += usize::from(probe.is_ok());
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // a poll of b's share
    }
    for ns in &namespaces {
        let scoped = client.scoped(ns);
        let mut again = 0;
        let read = without_retry_copies(read_all(&scoped, ns).await, &retried_values, &mut again);
        assert_eq!(read, acked[ns], "{ns} after b came back");
    }
    println!("{served_by_b2} of 8 namespaces served by b after it came back");
    println!(
        "{} writes retried after UNAVAILABLE, {duplicates} of them stored twice",
        retried_values.len()
    );
    drop(a);
    drop(b2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_of_one_namespace_spread_over_core_nodes_and_survive_a_kill_on_etcd() {
    if let Some(meta) = Meta::etcd() {
        topics_spread_kill(meta).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_of_one_namespace_spread_over_core_nodes_and_survive_a_kill_on_postgres() {
    if let Some(meta) = Meta::postgres() {
        topics_spread_kill(meta).await;
    }
}

/// One stream of the `default` namespace through the gateway client, as the Kafka gateway
/// reaches it: scoped to the namespace and the stream.
fn topic_record(topic: &str, value: &str) -> v1::AppendRequest {
    v1::AppendRequest {
        stream: Some(v1::StreamId::new("default", topic)),
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
    }
}

async fn read_topic(client: &CoreClient, topic: &str) -> Vec<String> {
    let stream = client.for_stream(topic);
    let (fetched, _) = retried(&format!("fetch from {topic}"), || {
        let mut streams = stream.streams.clone();
        let req = v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: Some(v1::StreamId::new("default", topic)),
                partition: 0,
                offset: 0,
                max_bytes: 0,
            }],
            max_bytes: 1 << 20,
            min_bytes: 0,
            max_wait_ms: 0,
            read_committed: false,
        };
        async move { streams.fetch(req).await }
    })
    .await;
    fetched.into_inner().partitions[0]
        .batches
        .iter()
        .flat_map(|b| b.records.iter())
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

async fn listed_topics(client: &CoreClient) -> Vec<String> {
    let (listed, _) = retried("list the streams", || {
        let mut admin = client.admin.clone();
        async move {
            admin
                .list_streams(v1::ListStreamsRequest {
                    namespace: "default".into(),
                })
                .await
        }
    })
    .await;
    let mut names: Vec<String> = listed
        .into_inner()
        .streams
        .into_iter()
        .map(|s| s.id.unwrap().name)
        .collect();
    names.sort();
    names
}

/// `cluster_shard_scheme = "stream"`: the topics of one namespace spread over both nodes; the
/// namespace's home lists them all and takes a group's commits for them; one node is killed
/// and every acknowledged record of every topic is read back from the other.
async fn topics_spread_kill(meta: Meta) {
    use tributary_proto::placement::{Scheme, shard_of_unit, stream_unit};
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let meta_namespace = format!("topics_{}_{}", std::process::id(), nanos % 1_000_000_000);
    let a = start_spreading_node(dir.path(), "a", &meta, &meta_namespace);
    let b = start_spreading_node(dir.path(), "b", &meta, &meta_namespace);
    wait_for_split(&[&a, &b], &[2, 2]);
    let nodes = format!("http://{},http://{}", a.core, b.core);
    let client = CoreClient::connect_lazy_with(&nodes, None, None)
        .unwrap()
        .scoped("default");

    let topics: Vec<String> = (0..8).map(|t| format!("topic-{t}")).collect();
    let mut acked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut retried_values = HashSet::new();
    for topic in &topics {
        let stream = client.for_stream(topic);
        retried(&format!("create {topic}"), || {
            let mut admin = stream.admin.clone();
            let req = v1::CreateStreamRequest {
                id: Some(v1::StreamId::new("default", topic)),
                partitions: 1,
                if_not_exists: true,
                ..Default::default()
            };
            async move { admin.create_stream(req).await }
        })
        .await;
        for i in 0..5 {
            let value = format!("{topic}/{i}");
            let (_, failed) = retried(&format!("append to {topic}"), || {
                let mut streams = stream.streams.clone();
                let req = topic_record(topic, &value);
                async move { streams.append(req).await }
            })
            .await;
            if failed {
                retried_values.insert(value.clone());
            }
            acked.entry(topic.clone()).or_default().push(value);
        }
    }
    // The client learned the placement from the nodes' answers, and the topics' shards are
    // served by both nodes.
    assert_eq!(client.placement(), Some((Scheme::Stream, SHARDS)));
    let topic_shards: HashSet<u64> = topics
        .iter()
        .map(|t| {
            u64::from(shard_of_unit(
                Scheme::Stream,
                "default",
                Some(&stream_unit(t)),
                SHARDS,
            ))
        })
        .collect();
    let on_a = served_shards(&shard_view(&a, "default"));
    let on_b = served_shards(&shard_view(&b, "default"));
    assert!(
        topic_shards.iter().any(|s| on_a.contains(s))
            && topic_shards.iter().any(|s| on_b.contains(s)),
        "the topics' shards {topic_shards:?} are not on both nodes: a {on_a:?}, b {on_b:?}"
    );

    // The namespace's home lists every topic and takes a group's commits for all of them.
    assert_eq!(listed_topics(&client).await, topics);
    // The CLI reaches each topic on its node (and lists them all at the home).
    let both = format!("http://{},http://{}", a.core, b.core);
    for topic in &topics {
        let out = common::cli(
            &both,
            &["streams", "describe", topic, "-n", "default", "--json"],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "streams describe {topic}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let described: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(
            described["partition_info"][0]["end_offset"], 5,
            "{topic}: {stdout}"
        );
    }
    let out = common::cli(&both, &["streams", "list", "-n", "default", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        topics.iter().all(|t| stdout.contains(&format!("\"{t}\""))),
        "streams list: {stdout}"
    );
    let (committed, _) = retried("commit offsets", || {
        let mut offsets = client.offsets.clone();
        let req = v1::CommitOffsetsRequest {
            namespace: "default".into(),
            group: "readers".into(),
            offsets: topics
                .iter()
                .map(|t| v1::CommittedOffset {
                    stream: Some(v1::StreamId::new("default", t)),
                    partition: 0,
                    offset: 5,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        async move { offsets.commit_offsets(req).await }
    })
    .await;
    assert!(
        committed.get_ref().rejected.is_empty(),
        "{:?}",
        committed.get_ref().rejected
    );

    // The node serving the most topics is killed; the other takes its shards over and every
    // acknowledged record of every topic is read back.
    let count = |served: &[u64]| topic_shards.iter().filter(|s| served.contains(s)).count();
    let (survivor, victim) = if count(&on_a) >= count(&on_b) {
        (b, a)
    } else {
        (a, b)
    };
    let killed = Instant::now();
    victim.kill9();
    let mut duplicates = 0;
    for topic in &topics {
        let read = without_retry_copies(
            read_topic(&client, topic).await,
            &retried_values,
            &mut duplicates,
        );
        assert_eq!(read, acked[topic], "{topic} after the kill");
    }
    println!(
        "every topic read back {:?} after the kill",
        killed.elapsed()
    );
    wait_for_split(&[&survivor], &[SHARDS as usize]);
    assert_eq!(listed_topics(&client).await, topics);
    println!(
        "{} writes retried after UNAVAILABLE, {duplicates} of them stored twice",
        retried_values.len()
    );
}
