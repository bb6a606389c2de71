//! A core per shard on shared storage (`tributary_core::cluster::shard_cores`): two nodes
//! serve four shards, each shard's core on its own metadata prefix and object-store prefix
//! under its lease. Records are appended to streams of eight namespaces through the core of
//! each namespace's shard; one node is cut off from the metadata store; the other takes its
//! shards over, opens their cores from shared storage and reads back every acknowledged
//! record, while the cut node's cores can no longer write. The cut node comes back as a new
//! run, shards move back to it, and it reads what the other node wrote meanwhile.
//!
//! Over gRPC, each node's shard cores sit behind a `ShardRouter`: a call naming its namespace
//! reaches the core of that namespace's shard on the node that owns it, another node answers
//! UNAVAILABLE naming the owner, and after a takeover the new owner answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio_stream::wrappers::TcpListenerStream;
use tributary_core::cluster::shard_cores::{ShardCores, shard_of};
use tributary_core::cluster::shard_router::{
    NAMESPACE_HEADER, OWNER_HEADER, SHARD_HEADER, ShardRouter,
};
use tributary_core::cluster::shards::{Scheme, ShardConfig, ShardNode};
use tributary_core::{Core, CoreConfig};
use tributary_proto::placement::{UNIT_METADATA, shard_of_unit, stream_unit};
use tributary_proto::v1;
use tributary_proto::v1::admin_client::AdminClient;
use tributary_proto::v1::cluster_client::ClusterClient;
use tributary_proto::v1::offsets_client::OffsetsClient;
use tributary_proto::v1::streams_client::StreamsClient;
use tributary_storage::MetaStore;
use tributary_storage::memory::MemoryMetaStore;

mod cluster_common;
use cluster_common::{Cuttable, FsShards};

const SHARDS: u32 = 4;
const TTL: Duration = Duration::from_millis(1_000);

struct Node {
    node: ShardNode,
    cores: Arc<ShardCores>,
    store: Arc<Cuttable>,
    lost: Arc<Mutex<Vec<String>>>,
    /// The node's core gRPC endpoint: its shards' cores behind a `ShardRouter`.
    url: String,
}

async fn join(name: &str, meta: Arc<dyn MetaStore>, dir: &std::path::Path) -> Node {
    join_placing(name, meta, dir, Scheme::Namespace).await
}

async fn join_placing(
    name: &str,
    meta: Arc<dyn MetaStore>,
    dir: &std::path::Path,
    scheme: Scheme,
) -> Node {
    let store = Arc::new(Cuttable::new(meta));
    let storage = FsShards {
        bucket: dir.join("bucket"),
        cache: dir.join(format!("cache-{name}")),
        meta: store.clone(),
    };
    // A stream of the namespace's home as an MQTT topic or an address is not built across
    // shards: the stream scheme needs both off.
    let spread = scheme == Scheme::Stream;
    let config = CoreConfig {
        mqtt_streams: !spread,
        stream_exchanges: !spread,
        ..CoreConfig::default()
    };
    let cores = Arc::new(ShardCores::new(Arc::new(storage), config, SHARDS, scheme));
    let lost = Arc::new(Mutex::new(Vec::new()));
    let on_lost = {
        let lost = lost.clone();
        Arc::new(move |why: &str| lost.lock().push(why.to_string()))
    };
    let node = ShardNode::join(
        store.clone(),
        ShardConfig {
            node: name.into(),
            shards: SHARDS,
            scheme,
            ttl: TTL,
        },
        cores.clone(),
        on_lost,
    )
    .await
    .expect("joining");
    node.start();
    let router = ShardRouter::new(name, cores.clone(), SHARDS, scheme, Arc::new(node.owners()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(router.into_routes())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Node {
        node,
        cores,
        store,
        lost,
        url,
    }
}

async fn until_serving(nodes: &[&Node], want: &[usize], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: Vec<usize> = nodes.iter().map(|n| n.cores.shards().len()).collect();
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the nodes serve {now:?} shards, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // a poll of the served shards
    }
}

/// Waits until every node names an owner for every shard (the owners' view is a round
/// behind the takes), then connects a client to each.
async fn owners_known(nodes: &[&Node]) -> Vec<StreamsClient<tonic::transport::Channel>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while (0..SHARDS).any(|s| nodes.iter().any(|n| (n.node.owners())(s).is_none())) {
        assert!(Instant::now() < deadline, "the nodes never saw every owner");
        tokio::time::sleep(Duration::from_millis(20)).await; // a poll of the owners' view
    }
    let mut clients = Vec::new();
    for n in nodes {
        clients.push(StreamsClient::connect(n.url.clone()).await.unwrap());
    }
    clients
}

/// The core serving `namespace` on any of `nodes`.
fn owner(nodes: &[&Node], namespace: &str) -> (usize, Core) {
    let shard = shard_of(namespace, SHARDS);
    nodes
        .iter()
        .enumerate()
        .find_map(|(i, n)| n.cores.core(shard).map(|c| (i, c)))
        .unwrap_or_else(|| panic!("nobody serves shard {shard} of {namespace}"))
}

fn stream(namespace: &str) -> Option<v1::StreamId> {
    Some(v1::StreamId::new(namespace, "events"))
}

/// A one-record append to `namespace`'s stream.
fn append_record(namespace: &str, value: &str) -> v1::AppendRequest {
    v1::AppendRequest {
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
    }
}

async fn append(core: &Core, namespace: &str, value: &str) -> Result<(), String> {
    core.append(append_record(namespace, value))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn read_all(core: &Core, namespace: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let fetched = core
            .fetch(v1::FetchRequest {
                partitions: vec![v1::FetchPartition {
                    stream: stream(namespace),
                    partition: 0,
                    offset: out.len() as i64,
                    max_bytes: 0,
                }],
                max_bytes: 1 << 20,
                min_bytes: 0,
                max_wait_ms: 0,
                read_committed: false,
            })
            .await
            .unwrap();
        let part = &fetched.partitions[0];
        let before = out.len();
        for batch in &part.batches {
            for record in &batch.records {
                out.push(String::from_utf8_lossy(&record.value).into_owned());
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shards_core_moves_with_its_lease_and_keeps_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let a = join("a", meta.clone(), dir.path()).await;
    let b = join("b", meta.clone(), dir.path()).await;
    until_serving(&[&a, &b], &[2, 2], "two nodes joined").await;

    let namespaces: Vec<String> = (0..8).map(|n| format!("tenant-{n}")).collect();
    let mut acked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut on_b = Vec::new();
    for ns in &namespaces {
        let (node, core) = owner(&[&a, &b], ns);
        core.create_namespace(ns, BTreeMap::new(), true)
            .await
            .unwrap();
        for i in 0..20 {
            let value = format!("{ns}/{i}");
            append(&core, ns, &value).await.unwrap();
            acked.entry(ns.clone()).or_default().push(value);
        }
        if node == 1 {
            on_b.push((ns.clone(), core));
        }
    }
    assert!(!on_b.is_empty(), "no namespace landed on b's shards");

    // b is cut off: a takes its shards and opens their cores from shared storage.
    b.store.cut.store(true, Ordering::SeqCst);
    until_serving(&[&a], &[4], "b cut off").await;
    for ns in &namespaces {
        let (_, core) = owner(&[&a], ns);
        assert_eq!(
            read_all(&core, ns).await,
            acked[ns],
            "{ns} after the takeover"
        );
    }
    // b's cores, still open, can write nothing: their lease no longer holds.
    assert_eq!(b.lost.lock().len(), 1);
    for (ns, stale) in &on_b {
        let refused = append(stale, ns, "written by a stale owner").await;
        assert!(refused.is_err(), "{ns}: a stale core acknowledged a write");
        let (_, current) = owner(&[&a], ns);
        assert_eq!(read_all(&current, ns).await, acked[ns], "{ns}");
    }

    // a writes more; b comes back as a new run and gets two shards back, opened from
    // storage with what a wrote.
    for ns in &namespaces {
        let (_, core) = owner(&[&a], ns);
        let value = format!("{ns}/while-b-was-away");
        append(&core, ns, &value).await.unwrap();
        acked.get_mut(ns).unwrap().push(value);
    }
    let b2 = join("b", meta.clone(), dir.path()).await;
    until_serving(&[&a, &b2], &[2, 2], "b back").await;
    let mut read_on_b2 = 0;
    for ns in &namespaces {
        let (node, core) = owner(&[&a, &b2], ns);
        read_on_b2 += usize::from(node == 1);
        assert_eq!(
            read_all(&core, ns).await,
            acked[ns],
            "{ns} after moving back"
        );
    }
    assert!(read_on_b2 > 0, "no namespace moved back to b");
    assert!(a.lost.lock().is_empty() && b2.lost.lock().is_empty());
    a.node.leave().await;
    b2.node.leave().await;
}

/// [`append_record`] over gRPC, naming its namespace for the router.
fn append_request(namespace: &str, value: &str) -> tonic::Request<v1::AppendRequest> {
    let mut req = tonic::Request::new(append_record(namespace, value));
    req.metadata_mut()
        .insert(NAMESPACE_HEADER, namespace.parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_the_core_of_their_namespaces_shard_on_the_node_that_owns_it() {
    let dir = tempfile::tempdir().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let a = join("a", meta.clone(), dir.path()).await;
    let b = join("b", meta.clone(), dir.path()).await;
    until_serving(&[&a, &b], &[2, 2], "two nodes joined").await;
    let mut clients = owners_known(&[&a, &b]).await;
    let names = ["a", "b"];
    let mut acked: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..8 {
        let ns = format!("tenant-{n}");
        let (owner, core) = owner(&[&a, &b], &ns);
        core.create_namespace(&ns, BTreeMap::new(), true)
            .await
            .unwrap();
        // The owner takes it; the other node refuses it as UNAVAILABLE, naming the owner.
        clients[owner]
            .append(append_request(&ns, "through the owner"))
            .await
            .unwrap();
        *acked.entry(ns.clone()).or_default() += 1;
        let other = 1 - owner;
        let refused = clients[other]
            .append(append_request(&ns, "through the other node"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert_eq!(
            refused
                .metadata()
                .get(OWNER_HEADER)
                .map(|v| v.to_str().unwrap()),
            Some(names[owner]),
            "{refused:?}"
        );
    }
    // Each node answers which node serves which shard, with no namespace named, the same map
    // as its own view of the shard keys.
    for (n, node) in [&a, &b].iter().enumerate() {
        let map = describe_shards(&node.url).await;
        assert_eq!(map.node, names[n]);
        assert_eq!((map.shards, map.scheme.as_str()), (SHARDS, "namespace"));
        let seen: Vec<String> = (0..SHARDS).map(|s| (a.node.owners())(s).unwrap()).collect();
        assert_eq!(map.owners, seen);
        assert_eq!(map.owners.iter().filter(|o| *o == "a").count(), 2);
    }
    // A call that names no namespace is refused, not sent to some shard.
    let mut nameless = append_request("tenant-0", "nameless");
    nameless.metadata_mut().remove(NAMESPACE_HEADER);
    let refused = clients[0].append(nameless).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );

    // b is cut off: a takes its shards, and a's endpoint answers for every namespace with
    // what b had acknowledged.
    b.store.cut.store(true, Ordering::SeqCst);
    until_serving(&[&a], &[4], "b cut off").await;
    for (ns, count) in &acked {
        clients[0]
            .append(append_request(ns, "after the takeover"))
            .await
            .unwrap();
        let (_, core) = owner(&[&a], ns);
        let read = read_all(&core, ns).await;
        assert_eq!(read.len(), count + 1, "{ns}: {read:?}");
        assert_eq!(read[0], "through the owner");
    }
    assert_eq!(b.lost.lock().len(), 1);
    // The survivor's map names it for every shard once its view caught up with its takes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while describe_shards(&a.url).await.owners != vec!["a".to_string(); SHARDS as usize] {
        assert!(
            Instant::now() < deadline,
            "a's map never named it everywhere"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // a poll of the owners' view
    }
    a.node.leave().await;
}

async fn describe_shards(url: &str) -> v1::DescribeShardsResponse {
    ClusterClient::connect(url.to_string())
        .await
        .unwrap()
        .describe_shards(v1::DescribeShardsRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_stream_scheme_a_call_naming_a_stream_goes_to_the_streams_shard() {
    let dir = tempfile::tempdir().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let a = join_placing("a", meta.clone(), dir.path(), Scheme::Stream).await;
    let b = join_placing("b", meta.clone(), dir.path(), Scheme::Stream).await;
    until_serving(&[&a, &b], &[2, 2], "two nodes joined").await;
    let mut clients = owners_known(&[&a, &b]).await;
    let home = shard_of("default", SHARDS);
    let mut away_from_home = 0;
    for t in 0..8 {
        let unit = stream_unit(&format!("topic-{t}"));
        let shard = shard_of_unit(Scheme::Stream, "default", Some(&unit), SHARDS);
        away_from_home += usize::from(shard != home);
        let serving = [&a, &b]
            .iter()
            .position(|n| n.cores.core(shard).is_some())
            .expect("every shard is served");
        // The node not serving the stream's shard refuses the call, naming that shard (not
        // the namespace's); the one serving it hands it to the shard's core.
        let mut req = append_request("default", "x");
        req.metadata_mut()
            .insert(UNIT_METADATA, unit.parse().unwrap());
        let refused = clients[1 - serving].append(req).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert_eq!(
            refused
                .metadata()
                .get(SHARD_HEADER)
                .map(|v| v.to_str().unwrap().to_string()),
            Some(shard.to_string()),
            "{refused:?}"
        );
        let mut req = append_request("default", "x");
        req.metadata_mut()
            .insert(UNIT_METADATA, unit.parse().unwrap());
        if let Err(reached) = clients[serving].append(req).await {
            assert!(
                reached.metadata().get(SHARD_HEADER).is_none(),
                "{reached:?}"
            );
        }
    }
    assert!(away_from_home > 0, "every topic landed at home");
    a.node.leave().await;
    b.node.leave().await;
}

/// `message` for the node router: its namespace and, if given, its stream.
fn routed<T>(message: T, namespace: &str, stream: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert(NAMESPACE_HEADER, namespace.parse().unwrap());
    if let Some(s) = stream {
        req.metadata_mut()
            .insert(UNIT_METADATA, stream_unit(s).parse().unwrap());
    }
    req
}

/// Which of `nodes` serves `shard`.
fn serving(nodes: &[&Node], shard: u32) -> usize {
    nodes
        .iter()
        .position(|n| n.cores.core(shard).is_some())
        .unwrap_or_else(|| panic!("nobody serves shard {shard}"))
}

/// Every record of partition 0 of `ns/name`, read from `core`.
async fn read_stream(core: &Core, ns: &str, name: &str) -> Vec<String> {
    let fetched = core
        .fetch(v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: Some(v1::StreamId::new(ns, name)),
                partition: 0,
                offset: 0,
                max_bytes: 0,
            }],
            max_bytes: 1 << 20,
            min_bytes: 0,
            max_wait_ms: 0,
            read_committed: false,
        })
        .await
        .unwrap();
    fetched.partitions[0]
        .batches
        .iter()
        .flat_map(|b| b.records.iter())
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_stream_scheme_one_namespaces_streams_spread_over_nodes_and_survive_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let a = join_placing("a", meta.clone(), dir.path(), Scheme::Stream).await;
    let b = join_placing("b", meta.clone(), dir.path(), Scheme::Stream).await;
    until_serving(&[&a, &b], &[2, 2], "two nodes joined").await;
    let urls = [a.url.clone(), b.url.clone()];

    // Eight topics of one namespace, each created and written through the node serving its
    // stream's shard.
    let topics: Vec<String> = (0..8).map(|t| format!("topic-{t}")).collect();
    let mut acked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut nodes_used = std::collections::BTreeSet::new();
    for topic in &topics {
        let shard = shard_of_unit(Scheme::Stream, "default", Some(&stream_unit(topic)), SHARDS);
        let node = serving(&[&a, &b], shard);
        nodes_used.insert(node);
        let mut admin = AdminClient::connect(urls[node].clone()).await.unwrap();
        admin
            .create_stream(routed(
                v1::CreateStreamRequest {
                    id: Some(v1::StreamId::new("default", topic)),
                    partitions: 1,
                    ..Default::default()
                },
                "default",
                Some(topic),
            ))
            .await
            .unwrap();
        let mut streams = StreamsClient::connect(urls[node].clone()).await.unwrap();
        for i in 0..5 {
            let value = format!("{topic}/{i}");
            let mut append = append_record("default", &value);
            append.stream = Some(v1::StreamId::new("default", topic));
            append.auto_create = false;
            streams
                .append(routed(append, "default", Some(topic)))
                .await
                .unwrap();
            acked.entry(topic.clone()).or_default().push(value);
        }
    }
    assert_eq!(nodes_used.len(), 2, "every topic landed on one node");

    // The namespace's home lists every topic, validates a group's commits for all of them
    // (refusing an unknown one) and refuses what is not built across shards yet.
    let home = serving(&[&a, &b], shard_of("default", SHARDS));
    let mut admin = AdminClient::connect(urls[home].clone()).await.unwrap();
    let list = |admin: &mut AdminClient<tonic::transport::Channel>| {
        let mut admin = admin.clone();
        async move {
            let listed = admin
                .list_streams(routed(
                    v1::ListStreamsRequest {
                        namespace: "default".into(),
                    },
                    "default",
                    None,
                ))
                .await
                .unwrap()
                .into_inner();
            let mut names: Vec<(String, u32)> = listed
                .streams
                .into_iter()
                .map(|s| (s.id.unwrap().name, s.partitions))
                .collect();
            names.sort();
            names
        }
    };
    let want: Vec<(String, u32)> = topics.iter().map(|t| (t.clone(), 1)).collect();
    assert_eq!(list(&mut admin).await, want);
    let mut offsets = OffsetsClient::connect(urls[home].clone()).await.unwrap();
    let mut commits: Vec<v1::CommittedOffset> = topics
        .iter()
        .map(|t| v1::CommittedOffset {
            stream: Some(v1::StreamId::new("default", t)),
            partition: 0,
            offset: 5,
            ..Default::default()
        })
        .collect();
    commits.push(v1::CommittedOffset {
        stream: Some(v1::StreamId::new("default", "no-such-topic")),
        partition: 0,
        offset: 1,
        ..Default::default()
    });
    let committed = offsets
        .commit_offsets(routed(
            v1::CommitOffsetsRequest {
                namespace: "default".into(),
                group: "readers".into(),
                offsets: commits,
                ..Default::default()
            },
            "default",
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    let rejected: Vec<(String, i32)> = committed
        .rejected
        .iter()
        .map(|r| (r.stream.clone().unwrap().name, r.error))
        .collect();
    assert_eq!(
        rejected,
        vec![(
            "no-such-topic".to_string(),
            v1::ErrorCode::StreamNotFound as i32
        )]
    );
    let mut streams = StreamsClient::connect(urls[home].clone()).await.unwrap();
    let refused = streams
        .init_producer(routed(
            v1::InitProducerRequest {
                namespace: "default".into(),
                transactional_id: "tx-1".into(),
                transaction_timeout_ms: 10_000,
                ..Default::default()
            },
            "default",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    assert!(
        refused.message().contains("placement scheme"),
        "{refused:?}"
    );

    // b is cut off: a takes its shards and reads back every acknowledged record of every
    // topic, and the home (wherever it is now) still lists them all.
    b.store.cut.store(true, Ordering::SeqCst);
    until_serving(&[&a], &[4], "b cut off").await;
    for topic in &topics {
        let shard = shard_of_unit(Scheme::Stream, "default", Some(&stream_unit(topic)), SHARDS);
        let core = a.cores.core(shard).unwrap();
        assert_eq!(
            read_stream(&core, "default", topic).await,
            acked[topic],
            "{topic}"
        );
    }
    let mut admin = AdminClient::connect(urls[0].clone()).await.unwrap();
    assert_eq!(list(&mut admin).await, want);
    a.node.leave().await;
}
