//! Shards spread over cluster nodes (`tributary_core::cluster::shards`), through the public
//! API: three nodes share six shards evenly; a node cut off from the metadata store loses its
//! shards to the others, which fence it; it comes back and shards move back to it; a node
//! leaving cleanly hands its shards over at once. Throughout, a node never starts serving a
//! shard while another node's lease on it still holds, and every takeover raises the shard's
//! epoch.
//!
//! Runs on the in-memory store, and on etcd and PostgreSQL when `TRIBUTARY_TEST_ETCD_URL` and
//! `TRIBUTARY_TEST_POSTGRES_URL` are set (scripts/test-stores.sh starts the servers and sets
//! them; with `TRIBUTARY_REQUIRE_STORES=1` a missing URL fails instead of skipping).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use tributary_core::cluster::OnLost;
use tributary_core::cluster::shards::{
    Scheme, ShardConfig, ShardError, ShardHost, ShardLease, ShardNode,
};
use tributary_storage::memory::MemoryMetaStore;
use tributary_storage::{EtcdMetaStore, MetaStore, PostgresMetaStore};

mod cluster_common;
use cluster_common::Cuttable;

const SHARDS: u32 = 6;
const TTL: Duration = Duration::from_millis(1_000);

/// Every node's served shards, and what went wrong.
#[derive(Default)]
struct Registry {
    serving: Mutex<Vec<(String, ShardLease)>>,
    epochs: Mutex<HashMap<u32, u64>>,
    violations: Mutex<Vec<String>>,
}

struct Host {
    /// The node's name and run.
    id: String,
    registry: Arc<Registry>,
}

#[async_trait]
impl ShardHost for Host {
    async fn serve(&self, lease: ShardLease) -> Result<(), String> {
        let r = &self.registry;
        let shard = lease.shard();
        let mut serving = r.serving.lock();
        for (other, held) in serving.iter() {
            if held.shard() == shard && (held.holds())() {
                r.violations.lock().push(format!(
                    "{} started shard {shard} (epoch {}) while {other}'s lease (epoch {}) held",
                    self.id,
                    lease.epoch(),
                    held.epoch()
                ));
            }
        }
        let mut epochs = r.epochs.lock();
        let last = epochs.entry(shard).or_insert(0);
        if lease.epoch() <= *last {
            r.violations.lock().push(format!(
                "shard {shard} taken at epoch {} after epoch {last}",
                lease.epoch()
            ));
        }
        *last = lease.epoch();
        serving.push((self.id.clone(), lease));
        Ok(())
    }

    async fn stop(&self, shard: u32) {
        self.registry
            .serving
            .lock()
            .retain(|(id, l)| !(*id == self.id && l.shard() == shard));
    }
}

struct Node {
    node: ShardNode,
    store: Arc<Cuttable>,
    lost: Arc<Mutex<Vec<String>>>,
}

async fn join(name: &str, store: Arc<dyn MetaStore>, registry: &Arc<Registry>) -> Node {
    join_with(name, store, registry, SHARDS).await
}

async fn join_with(
    name: &str,
    store: Arc<dyn MetaStore>,
    registry: &Arc<Registry>,
    shards: u32,
) -> Node {
    let store = Arc::new(Cuttable::new(store));
    let lost = Arc::new(Mutex::new(Vec::new()));
    let on_lost: OnLost = {
        let lost = lost.clone();
        Arc::new(move |why: &str| lost.lock().push(why.to_string()))
    };
    let config = ShardConfig {
        node: name.into(),
        shards,
        scheme: Scheme::Namespace,
        ttl: TTL,
    };
    // The host's id needs the run, which joining decides: the host reads it from a cell.
    let id = Arc::new(Mutex::new(String::new()));
    let host = Arc::new(LateHost {
        id: id.clone(),
        registry: registry.clone(),
    });
    let node = ShardNode::join(store.clone(), config, host, on_lost)
        .await
        .expect("joining");
    *id.lock() = format!("{name}#{}", node.run());
    node.start();
    Node { node, store, lost }
}

/// A [`Host`] whose id is known once the node has joined.
struct LateHost {
    id: Arc<Mutex<String>>,
    registry: Arc<Registry>,
}

#[async_trait]
impl ShardHost for LateHost {
    async fn serve(&self, lease: ShardLease) -> Result<(), String> {
        self.host().serve(lease).await
    }
    async fn stop(&self, shard: u32) {
        self.host().stop(shard).await
    }
}

impl LateHost {
    fn host(&self) -> Host {
        Host {
            id: self.id.lock().clone(),
            registry: self.registry.clone(),
        }
    }
}

async fn counts(nodes: &[&Node]) -> Vec<usize> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(n.node.served().await.len());
    }
    out
}

/// Waits (polling, with a deadline) until the nodes serve `want` shards each.
async fn until_spread(nodes: &[&Node], want: &[usize], what: &str) -> Duration {
    let began = Instant::now();
    let deadline = began + Duration::from_secs(20);
    loop {
        let now = counts(nodes).await;
        if now == want {
            return began.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the nodes serve {now:?} shards, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // a poll of the shard counts
    }
}

async fn key(store: &Arc<dyn MetaStore>, key: &str) -> String {
    let raw = store.get(key.as_bytes()).await.unwrap().unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

/// The whole life of a three-node deployment on one store. `connect` opens a node's own
/// connection to it.
async fn spread_fail_return_leave<F, Fut>(connect: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn MetaStore>>,
{
    let registry = Arc::new(Registry::default());
    let observer = connect().await;
    let a = join("a", connect().await, &registry).await;
    let b = join("b", connect().await, &registry).await;
    let c = join("c", connect().await, &registry).await;
    let spread = until_spread(&[&a, &b, &c], &[2, 2, 2], "three nodes joined").await;
    println!("six shards spread 2/2/2 over three nodes in {spread:?}");
    assert_eq!(key(&observer, "cluster/shard-count").await, "6");

    // c is cut off from the metadata store: it stops (on_lost) once its heartbeat is past
    // valid, and a and b take its shards, fencing its heartbeat.
    let c_leases: Vec<ShardLease> = registry
        .serving
        .lock()
        .iter()
        .filter(|(id, _)| id.starts_with("c#"))
        .map(|(_, l)| l.clone())
        .collect();
    assert_eq!(c_leases.len(), 2);
    c.store.cut.store(true, Ordering::SeqCst);
    let takeover = until_spread(&[&a, &b], &[3, 3], "c cut off").await;
    println!("c's two shards taken over {takeover:?} after the cut (TTL {TTL:?})");
    let c_lost = c.lost.lock().clone();
    assert_eq!(c_lost.len(), 1, "c did not stop: {c_lost:?}");
    for lease in &c_leases {
        assert!(
            !(lease.holds())(),
            "c still counts on shard {}",
            lease.shard()
        );
    }
    assert_eq!(key(&observer, "cluster/nodes/c").await, "1 fenced");
    // c paused, not dead, and its writes reach the store after all: the fence refuses them.
    let stale = c_leases[0].fenced(observer.clone());
    let refused = stale.put(b"written-by-c", b"1").await;
    assert!(refused.is_err(), "a stale owner's write was accepted");
    assert_eq!(observer.get(b"written-by-c").await.unwrap(), None);
    // While the current owner's fenced writes go through.
    let owner_lease = registry
        .serving
        .lock()
        .iter()
        .find(|(id, l)| !id.starts_with("c#") && l.shard() == c_leases[0].shard())
        .map(|(_, l)| l.clone())
        .expect("an owner of c's old shard");
    assert!(owner_lease.epoch() > c_leases[0].epoch());
    owner_lease
        .fenced(observer.clone())
        .put(b"written-by-owner", b"1")
        .await
        .unwrap();

    // c comes back as a new run: shards move back to it by release, not after a TTL.
    let c2 = join("c", connect().await, &registry).await;
    assert_eq!(c2.node.run(), 2);
    let back = until_spread(&[&a, &b, &c2], &[2, 2, 2], "c back").await;
    println!("shards moved back to c in {back:?}");

    // b leaves cleanly: a and c take its shards without waiting a TTL.
    b.node.leave().await;
    let handed = until_spread(&[&a, &c2], &[3, 3], "b left").await;
    println!("b's shards handed over {handed:?} after it left");
    assert_eq!(key(&observer, "cluster/nodes/b").await, "1 released");

    let violations = registry.violations.lock().clone();
    assert!(violations.is_empty(), "{violations:?}");
    assert!(a.lost.lock().is_empty() && c2.lost.lock().is_empty());
    a.node.leave().await;
    c2.node.leave().await;
    for shard in 0..SHARDS {
        let owner = key(&observer, &format!("cluster/shards/{shard:06}")).await;
        assert!(owner.ends_with(" released"), "shard {shard}: {owner}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_spread_fail_over_and_move_back_in_memory() {
    let store: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    spread_fail_return_leave(|| {
        let store = store.clone();
        async move { store }
    })
    .await;
}

/// A node joining with `shards` and `scheme`, for the refusals: never started.
async fn join_as(
    name: &str,
    store: Arc<dyn MetaStore>,
    registry: Arc<Registry>,
    shards: u32,
    scheme: Scheme,
) -> Result<ShardNode, ShardError> {
    let host = Arc::new(Host {
        id: name.into(),
        registry,
    });
    let config = ShardConfig {
        node: name.into(),
        shards,
        scheme,
        ttl: TTL,
    };
    ShardNode::join(store, config, host, Arc::new(|_: &str| {})).await
}

#[tokio::test]
async fn a_node_with_another_shard_count_is_refused() {
    let store: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let registry = Arc::new(Registry::default());
    let a = join("a", store.clone(), &registry).await;
    let refused = join_as("b", store, registry, SHARDS + 1, Scheme::Namespace).await;
    assert!(
        matches!(
            refused,
            Err(ShardError::ShardCount {
                stored: 6,
                asked: 7
            })
        ),
        "{:?}",
        refused.err()
    );
    a.node.leave().await;
}

#[tokio::test]
async fn a_node_with_another_placement_scheme_is_refused() {
    let store: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let registry = Arc::new(Registry::default());
    let a = join("a", store.clone(), &registry).await;
    assert_eq!(
        store.get(b"cluster/shard-scheme").await.unwrap().as_deref(),
        Some(&b"namespace"[..])
    );
    let refused = join_as("b", store.clone(), registry, SHARDS, Scheme::Stream).await;
    assert!(
        matches!(
            refused,
            Err(ShardError::Scheme {
                stored: Scheme::Namespace,
                asked: Scheme::Stream
            })
        ),
        "{:?}",
        refused.err()
    );
    a.node.leave().await;
}

#[tokio::test]
async fn a_deployment_made_before_schemes_places_by_namespace() {
    let store: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    // What an earlier version left: the shard count, no scheme.
    store
        .put(b"cluster/shard-count", SHARDS.to_string().as_bytes())
        .await
        .unwrap();
    let refused = join_as(
        "a",
        store.clone(),
        Arc::new(Registry::default()),
        SHARDS,
        Scheme::Stream,
    )
    .await;
    assert!(
        matches!(refused, Err(ShardError::Scheme { .. })),
        "{:?}",
        refused.err()
    );
    assert_eq!(
        store.get(b"cluster/shard-scheme").await.unwrap().as_deref(),
        Some(&b"namespace"[..])
    );
}

/// A metadata server's URL, or `None` (after saying so) when its test is skipped.
fn store_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("TRIBUTARY_REQUIRE_STORES").as_deref() == Ok("1") => {
            panic!("{var} is not set and TRIBUTARY_REQUIRE_STORES=1")
        }
        _ => {
            println!("skipped: {var} is not set (scripts/test-stores.sh starts a server)");
            None
        }
    }
}

/// A namespace no earlier run used (1 to 40 lower-case letters, digits or '_').
fn fresh_namespace() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "shards_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_spread_fail_over_and_move_back_on_etcd() {
    let Some(url) = store_url("TRIBUTARY_TEST_ETCD_URL") else {
        return;
    };
    let ns = fresh_namespace();
    spread_fail_return_leave(|| {
        let (url, ns) = (url.clone(), ns.clone());
        async move {
            let store: Arc<dyn MetaStore> =
                Arc::new(EtcdMetaStore::connect(&url, &ns).await.unwrap());
            store
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_spread_fail_over_and_move_back_on_postgres() {
    let Some(url) = store_url("TRIBUTARY_TEST_POSTGRES_URL") else {
        return;
    };
    let ns = fresh_namespace();
    spread_fail_return_leave(|| {
        let (url, ns) = (url.clone(), ns.clone());
        async move {
            let store: Arc<dyn MetaStore> =
                Arc::new(PostgresMetaStore::connect(&url, &ns).await.unwrap());
            store
        }
    })
    .await;
}

/// What the shard leases cost the metadata store, and how long spreading and a takeover take,
/// with many shards. By hand, on the store `TRIBUTARY_SHARD_SCALE_STORE` names (memory, etcd or
/// postgres, with its URL variable set), `TRIBUTARY_SHARD_SCALE_SHARDS` shards (default 1,024):
///
/// ```sh
/// TRIBUTARY_SHARD_SCALE_STORE=etcd TRIBUTARY_TEST_ETCD_URL=http://127.0.0.1:2379 \
///     cargo test --release -p tributary-core --test shard_leases -- --ignored --nocapture scale
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn scale_of_shard_leases() {
    let shards: u32 = std::env::var("TRIBUTARY_SHARD_SCALE_SHARDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_024);
    let store = std::env::var("TRIBUTARY_SHARD_SCALE_STORE").unwrap_or("memory".into());
    let ns = fresh_namespace();
    let memory: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let connect = || async {
        let s: Arc<dyn MetaStore> = match store.as_str() {
            "etcd" => Arc::new(
                EtcdMetaStore::connect(&std::env::var("TRIBUTARY_TEST_ETCD_URL").unwrap(), &ns)
                    .await
                    .unwrap(),
            ),
            "postgres" => Arc::new(
                PostgresMetaStore::connect(
                    &std::env::var("TRIBUTARY_TEST_POSTGRES_URL").unwrap(),
                    &ns,
                )
                .await
                .unwrap(),
            ),
            _ => memory.clone(),
        };
        s
    };
    let registry = Arc::new(Registry::default());
    let a = join_with("a", connect().await, &registry, shards).await;
    let first = until_count(&a, shards as usize).await;
    let b = join_with("b", connect().await, &registry, shards).await;
    let c = join_with("c", connect().await, &registry, shards).await;
    let third = shards as usize / 3;
    let quotas = [
        third + usize::from(!shards.is_multiple_of(3)),
        third + usize::from(shards % 3 > 1),
        third,
    ];
    let spread = until_spread(&[&a, &b, &c], &quotas, "spreading").await;
    // Steady state: what three nodes cost the store per second.
    let before: Vec<(u64, u64)> = [&a, &b, &c]
        .iter()
        .map(|n| {
            (
                n.store.reads.load(Ordering::Relaxed),
                n.store.txns.load(Ordering::Relaxed),
            )
        })
        .collect();
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await; // the measured window, not a synchronisation
    let mut reads = 0;
    let mut txns = 0;
    for (n, (r, t)) in [&a, &b, &c].iter().zip(before) {
        reads += n.store.reads.load(Ordering::Relaxed) - r;
        txns += n.store.txns.load(Ordering::Relaxed) - t;
    }
    c.store.cut.store(true, Ordering::SeqCst);
    let takeover = until_spread(
        &[&a, &b],
        &[
            shards as usize / 2 + usize::from(!shards.is_multiple_of(2)),
            shards as usize / 2,
        ],
        "takeover",
    )
    .await;
    println!(
        "{store}, {shards} shards, TTL {TTL:?}: one node took them all in {first:?}, spread over three in {spread:?}; \
         steady state {:.1} reads/s and {:.1} transactions/s for three nodes; a cut node's {} shards taken over in {takeover:?}",
        reads as f64 / window.as_secs_f64(),
        txns as f64 / window.as_secs_f64(),
        quotas[2],
    );
    let violations = registry.violations.lock().clone();
    assert!(violations.is_empty(), "{violations:?}");
    a.node.leave().await;
    b.node.leave().await;
}

async fn until_count(node: &Node, want: usize) -> Duration {
    let began = Instant::now();
    while node.node.served().await.len() != want {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "never took {want} shards"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // a poll of the shard count
    }
    began.elapsed()
}
