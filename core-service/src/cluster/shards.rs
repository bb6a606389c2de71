//! Units spread over nodes. The deployment's state is split into a fixed number of shards;
//! each shard is owned by one node at a time under a lease with a fencing epoch of its own,
//! and the shards spread evenly over the live nodes, moving back when a node returns.
//!
//! Keys, inside the deployment's metadata namespace:
//!
//! ```text
//! cluster/shard-count       "<shards>"                     written by the first node, checked by the rest
//! cluster/shard-scheme      "namespace" | "stream"         the same (placement::Scheme); absent
//!                                                          in deployments made before it: namespace
//! cluster/nodes/<node>      "<run> <beat>"                 rewritten by the node every TTL/5
//!                           "<run> released"               written by a node leaving cleanly
//!                           "<run> fenced"                 written by a node taking a shard of it
//!                                                          after its heartbeat stood still a TTL
//! cluster/shards/<shard>    "<epoch> <run> <node>"         the shard's owner
//!                           "<epoch> released"             given up by its owner once it stopped
//! ```
//!
//! `<run>` counts the node's starts: a node restarted under the same name is a new run, and
//! what the earlier run owned is not its own.
//!
//! **One heartbeat per node.** Leases are renewed per node, not per shard, so the metadata
//! store's load grows with nodes, not units. A node's shard leases are valid exactly as long
//! as its heartbeat, by the rule of [`super::NodeLease`]: until the last successful renewal
//! was *sent* plus TTL × 4/5, while a taker waits a whole TTL from when it *saw* the
//! heartbeat stand still.
//!
//! **Spreading.** Every TTL/5 each node reads both prefixes and computes the same assignment
//! from what it read ([`assignment`]): the live nodes sorted by name get ⌊S/N⌋ shards each and
//! the first S mod N one more; a shard stays with its owner while the owner is within its
//! quota (in shard order), and the rest go to the nodes under quota that rank highest by a
//! rendezvous hash of (shard, node). A node over its quota gives up one shard per round: it
//! stops serving it, then writes `released`, and the node it is meant for takes it at its next
//! round. A node that comes back after a crash or a clean stop is under its quota, so shards
//! move back to it this way.
//!
//! **Taking over.** A shard is taken with a transaction that checks its key is still what the
//! taker read and writes `epoch + 1` with the taker's run. A shard whose owner's heartbeat the
//! taker has seen stand still for a whole TTL is taken with one more check and one more write:
//! the heartbeat is still that value, and becomes `fenced`. The owner's next renewal then
//! fails and it stops (through `on_lost`); a renewal of it still on the wire changes nothing.
//!
//! **Fencing.** Every metadata transaction of a shard's owner checks that the shard key still
//! names its epoch ([`ShardLease::fenced`]), and its object writes ask [`ShardLease::holds`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use tributary_storage::{Check, MetaStore, Op, Result as StorageResult, StorageError};

use super::{Fenced, LeaseState, OnLost, boot_time, fenced_txn, fnv1a, watchdog};
pub use tributary_proto::placement::Scheme;

const SHARD_COUNT_KEY: &[u8] = b"cluster/shard-count";
const SHARD_SCHEME_KEY: &[u8] = b"cluster/shard-scheme";
const NODES_PREFIX: &str = "cluster/nodes/";
const SHARDS_PREFIX: &str = "cluster/shards/";
/// More keys than any deployment has nodes or shards.
const SCAN_LIMIT: usize = 1 << 20;

fn node_key(node: &str) -> Vec<u8> {
    format!("{NODES_PREFIX}{node}").into_bytes()
}

/// Zero-padded so that the keys sort in shard order.
fn shard_key(shard: u32) -> Vec<u8> {
    format!("{SHARDS_PREFIX}{shard:06}").into_bytes()
}

/// A node's heartbeat key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heartbeat {
    Live { run: u64, beat: u64 },
    Released { run: u64 },
    Fenced { run: u64 },
}

impl Heartbeat {
    fn run(self) -> u64 {
        match self {
            Self::Live { run, .. } | Self::Released { run } | Self::Fenced { run } => run,
        }
    }

    fn encode(self) -> Vec<u8> {
        match self {
            Self::Live { run, beat } => format!("{run} {beat}"),
            Self::Released { run } => format!("{run} released"),
            Self::Fenced { run } => format!("{run} fenced"),
        }
        .into_bytes()
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let (run, rest) = std::str::from_utf8(raw).ok()?.split_once(' ')?;
        let run = run.parse().ok()?;
        Some(match rest {
            "released" => Self::Released { run },
            "fenced" => Self::Fenced { run },
            beat => Self::Live {
                run,
                beat: beat.parse().ok()?,
            },
        })
    }
}

/// A shard key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ShardOwner {
    Held { epoch: u64, run: u64, node: String },
    Released { epoch: u64 },
}

impl ShardOwner {
    fn epoch(&self) -> u64 {
        match self {
            Self::Held { epoch, .. } | Self::Released { epoch } => *epoch,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Self::Held { epoch, run, node } => format!("{epoch} {run} {node}"),
            Self::Released { epoch } => format!("{epoch} released"),
        }
        .into_bytes()
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let (epoch, rest) = std::str::from_utf8(raw).ok()?.split_once(' ')?;
        let epoch = epoch.parse().ok()?;
        if rest == "released" {
            return Some(Self::Released { epoch });
        }
        // The node's name is the rest, spaces and all.
        let (run, node) = rest.split_once(' ')?;
        Some(Self::Held {
            epoch,
            run: run.parse().ok()?,
            node: node.to_string(),
        })
    }
}

/// What a node needs to know to join the deployment's shards.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub node: String,
    /// The deployment's number of shards: fixed when its first node joins.
    pub shards: u32,
    /// How the deployment places units over its shards: fixed likewise.
    pub scheme: Scheme,
    pub ttl: Duration,
}

impl ShardConfig {
    fn poll_interval(&self) -> Duration {
        self.ttl / 5
    }

    /// How long after a renewal was sent the node still counts on it.
    fn validity(&self) -> Duration {
        self.ttl * 4 / 5
    }

    /// How many shards a node gives up in one round: one in 32 of the deployment's (at least
    /// one). 1,024 shards held by one node spread over three in about 22 rounds, 22 s with the
    /// default TTL of 5 s (a round every TTL/5).
    fn moves_per_round(&self) -> usize {
        (self.shards as usize / 32).max(1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(
        "cluster: {key} holds {value:?}, which this version cannot read; another program writes this metadata namespace"
    )]
    Unreadable { key: String, value: String },
    #[error(
        "cluster: the deployment has {stored} shards and this node was started with {asked}; a deployment's shard count is fixed when its first node joins"
    )]
    ShardCount { stored: u32, asked: u32 },
    #[error(
        "cluster: the deployment places units by {stored} and this node was started to place them by {asked}; a deployment's placement scheme is fixed when its first node joins"
    )]
    Scheme { stored: Scheme, asked: Scheme },
    #[error("cluster: {0}")]
    Config(String),
}

fn unreadable(key: &[u8], value: &[u8]) -> ShardError {
    ShardError::Unreadable {
        key: String::from_utf8_lossy(key).into_owned(),
        value: String::from_utf8_lossy(value).into_owned(),
    }
}

/// What serves the shards a node owns: told when to start and stop.
#[async_trait]
pub trait ShardHost: Send + Sync + 'static {
    /// Starts serving `lease`'s shard. An error gives the shard back for another node.
    async fn serve(&self, lease: ShardLease) -> Result<(), String>;
    /// Stops serving `shard`: once this returns, this node writes nothing more of it.
    async fn stop(&self, shard: u32);
}

/// One shard, owned by this node under an epoch.
#[derive(Clone)]
pub struct ShardLease(Arc<LeaseInner>);

struct LeaseInner {
    shard: u32,
    epoch: u64,
    owner_raw: Vec<u8>,
    /// Set once this node gave the shard up (it writes nothing of it from then on).
    given_up: AtomicBool,
    node: Arc<LeaseState>,
}

impl LeaseInner {
    fn holds(&self) -> bool {
        !self.given_up.load(Ordering::Acquire)
            && !self.node.over.load(Ordering::Acquire)
            && boot_time() < *self.node.valid_until.lock()
    }
}

impl ShardLease {
    pub fn shard(&self) -> u32 {
        self.0.shard
    }

    pub fn epoch(&self) -> u64 {
        self.0.epoch
    }

    /// Whether this node may still write the shard: neither given up nor past the node's
    /// lease. Cheap enough to ask before every object write.
    pub fn holds(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let inner = self.0.clone();
        move || inner.holds()
    }

    /// The metadata store as the shard's owner must write it: every transaction also checks
    /// that the shard key still names this epoch.
    pub fn fenced(&self, inner: Arc<dyn MetaStore>) -> Arc<dyn MetaStore> {
        Arc::new(ShardFencedMetaStore {
            inner,
            lease: self.0.clone(),
        })
    }
}

struct ShardFencedMetaStore {
    inner: Arc<dyn MetaStore>,
    lease: Arc<LeaseInner>,
}

#[async_trait]
impl MetaStore for ShardFencedMetaStore {
    async fn get(&self, key: &[u8]) -> StorageResult<Option<Bytes>> {
        self.inner.get(key).await
    }

    async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> StorageResult<Vec<(Vec<u8>, Bytes)>> {
        self.inner.scan(start, end, limit).await
    }

    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> StorageResult<bool> {
        let key = shard_key(self.lease.shard);
        let fence = &self.lease.owner_raw;
        let now = match fenced_txn(&*self.inner, checks, ops, &key, fence).await? {
            Fenced::Applied(applied) => return Ok(applied),
            Fenced::Refused(now) => now,
        };
        let why = format!(
            "shard {} (epoch {}) is no longer this node's: its key holds {:?}",
            self.lease.shard,
            self.lease.epoch,
            now.as_deref().map(String::from_utf8_lossy)
        );
        // A shard given up is written by nobody here; one taken while this node counted on
        // it means the node's own lease is gone.
        if !self.lease.given_up.load(Ordering::Acquire) {
            self.lease.node.lose(&why);
        }
        Err(StorageError::Meta(format!("cluster: write refused: {why}")))
    }
}

/// Which live node each shard is meant for. `live` is sorted by name; `owners[s]` is the live
/// node that owns shard `s` now, if one does. Every node computes this from the same keys, so
/// they agree whenever they agree on who is live.
pub fn assignment(live: &[&str], owners: &[Option<&str>]) -> Vec<Option<usize>> {
    let shards = owners.len();
    if live.is_empty() {
        return vec![None; shards];
    }
    let base = shards / live.len();
    let extra = shards % live.len();
    let quota: Vec<usize> = (0..live.len())
        .map(|n| base + usize::from(n < extra))
        .collect();
    let mut count = vec![0usize; live.len()];
    let mut meant = vec![None; shards];
    // An owner keeps its shards up to its quota, the lowest-numbered first: nothing moves
    // that need not.
    for (shard, owner) in owners.iter().enumerate() {
        let Some(n) = owner.and_then(|o| live.iter().position(|l| *l == o)) else {
            continue;
        };
        if count[n] < quota[n] {
            meant[shard] = Some(n);
            count[n] += 1;
        }
    }
    for (shard, slot) in meant.iter_mut().enumerate() {
        if slot.is_some() {
            continue;
        }
        let chosen = (0..live.len())
            .filter(|&n| count[n] < quota[n])
            .max_by_key(|&n| rendezvous(shard as u32, live[n]));
        if let Some(n) = chosen {
            *slot = Some(n);
            count[n] += 1;
        }
    }
    meant
}

/// A node's rank for a shard: the same on every node ([`fnv1a`]).
fn rendezvous(shard: u32, node: &str) -> u64 {
    let mut hash = fnv1a(shard.to_be_bytes().iter().chain(node.as_bytes()));
    // FNV's low bits mix poorly for short inputs; one more round of multiply-xorshift.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// A node holding its share of the deployment's shards.
pub struct ShardNode {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    meta: Arc<dyn MetaStore>,
    config: ShardConfig,
    run: u64,
    key: Vec<u8>,
    state: Arc<LeaseState>,
    /// The heartbeat this node last knows it wrote.
    written: Mutex<Vec<u8>>,
    host: Arc<dyn ShardHost>,
    /// The shards this node serves. Held through a whole round of the assigner, so that
    /// leaving waits for a round under way.
    served: tokio::sync::Mutex<BTreeMap<u32, ShardLease>>,
    /// Each shard's owner as the last round read it.
    owners: Arc<Mutex<Vec<Option<String>>>>,
    leaving: AtomicBool,
}

impl ShardNode {
    /// Registers this node's heartbeat, waiting first for an earlier run under the same name
    /// to end (its heartbeat released, fenced, or standing still for a whole TTL).
    pub async fn join(
        meta: Arc<dyn MetaStore>,
        config: ShardConfig,
        host: Arc<dyn ShardHost>,
        on_lost: OnLost,
    ) -> Result<Self, ShardError> {
        if config.shards == 0 {
            return Err(ShardError::Config(
                "the shard count must be at least 1".into(),
            ));
        }
        if config.node.is_empty() {
            return Err(ShardError::Config("the node name is empty".into()));
        }
        let key = node_key(&config.node);
        let mut seen: Option<(Option<Bytes>, Instant)> = None;
        let mut failing = false;
        let mut told = false;
        loop {
            let read = async {
                let scheme = Self::shard_scheme(&meta, config.scheme).await?;
                let count = Self::shard_count(&meta, config.shards).await?;
                Ok::<_, StorageError>((scheme, count, meta.get(&key).await?))
            };
            let (scheme, count, raw) = match read.await {
                Ok(r) => {
                    if std::mem::take(&mut failing) {
                        info!(node = %config.node, "cluster: the metadata store answers again");
                    }
                    r
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(node = %config.node, error = %e, "cluster: cannot read the shard keys; still waiting to join");
                    }
                    tokio::time::sleep(config.poll_interval()).await;
                    continue;
                }
            };
            match scheme {
                Ok(stored) if stored != config.scheme => {
                    return Err(ShardError::Scheme {
                        stored,
                        asked: config.scheme,
                    });
                }
                Err(raw) => return Err(unreadable(SHARD_SCHEME_KEY, &raw)),
                Ok(_) => {}
            }
            match count {
                Some(stored) if stored != config.shards => {
                    return Err(ShardError::ShardCount {
                        stored,
                        asked: config.shards,
                    });
                }
                None => {
                    let raw = meta.get(SHARD_COUNT_KEY).await.ok().flatten();
                    return Err(unreadable(
                        SHARD_COUNT_KEY,
                        raw.as_deref().unwrap_or_default(),
                    ));
                }
                Some(_) => {}
            }
            let current = match &raw {
                None => None,
                Some(r) => Some(Heartbeat::decode(r).ok_or_else(|| unreadable(&key, r))?),
            };
            let now = Instant::now();
            let since = match &seen {
                Some((s, t)) if *s == raw => *t,
                _ => now,
            };
            seen = Some((raw.clone(), since));
            let ended = match current {
                None | Some(Heartbeat::Released { .. } | Heartbeat::Fenced { .. }) => true,
                Some(Heartbeat::Live { .. }) => now.duration_since(since) >= config.ttl,
            };
            if ended {
                let run = current.map_or(1, |h| h.run() + 1);
                let first = Heartbeat::Live { run, beat: 0 }.encode();
                let sent = boot_time();
                let registered = meta
                    .txn(
                        vec![Check {
                            key: key.clone(),
                            value: raw.map(|b| b.to_vec()),
                        }],
                        vec![Op::Put {
                            key: key.clone(),
                            value: first.clone(),
                        }],
                    )
                    .await;
                match registered {
                    Ok(true) => {
                        info!(node = %config.node, run, "cluster: joined the shards");
                        let state = Arc::new(LeaseState {
                            valid_until: Mutex::new(sent + config.validity()),
                            over: AtomicBool::new(false),
                            on_lost,
                        });
                        return Ok(Self {
                            shared: Arc::new(Shared {
                                meta,
                                config,
                                run,
                                key,
                                state,
                                written: Mutex::new(first),
                                host,
                                served: tokio::sync::Mutex::new(BTreeMap::new()),
                                owners: Arc::new(Mutex::new(Vec::new())),
                                leaving: AtomicBool::new(false),
                            }),
                            tasks: Mutex::new(Vec::new()),
                        });
                    }
                    Ok(false) => seen = None,
                    Err(e) => {
                        warn!(node = %config.node, error = %e, "cluster: registering the heartbeat failed; trying again");
                        seen = None;
                        tokio::time::sleep(config.poll_interval()).await;
                    }
                }
                continue;
            }
            if !std::mem::replace(&mut told, true) {
                info!(node = %config.node, "cluster: an earlier run of this node still beats; waiting for it to end");
            }
            tokio::time::sleep(config.poll_interval()).await;
        }
    }

    /// The deployment's placement scheme (or the unreadable value stored), written as `asked`
    /// if no node has written it yet. A deployment whose shard count was written without it
    /// was made before schemes were: every unit at its namespace's shard.
    async fn shard_scheme(
        meta: &Arc<dyn MetaStore>,
        asked: Scheme,
    ) -> StorageResult<Result<Scheme, Vec<u8>>> {
        let parse = |raw: &[u8]| {
            std::str::from_utf8(raw)
                .ok()
                .and_then(Scheme::parse)
                .ok_or_else(|| raw.to_vec())
        };
        if let Some(raw) = meta.get(SHARD_SCHEME_KEY).await? {
            return Ok(parse(&raw));
        }
        let first = if meta.get(SHARD_COUNT_KEY).await?.is_some() {
            Scheme::Namespace
        } else {
            asked
        };
        meta.compare_and_set(SHARD_SCHEME_KEY, None, Some(first.as_str().as_bytes()))
            .await?;
        // Whoever won, the next read says what the deployment has.
        match meta.get(SHARD_SCHEME_KEY).await? {
            Some(raw) => Ok(parse(&raw)),
            None => Ok(Err(Vec::new())),
        }
    }

    /// The deployment's shard count, written as `asked` if no node has written it yet.
    async fn shard_count(meta: &Arc<dyn MetaStore>, asked: u32) -> StorageResult<Option<u32>> {
        if let Some(raw) = meta.get(SHARD_COUNT_KEY).await? {
            return Ok(std::str::from_utf8(&raw).ok().and_then(|s| s.parse().ok()));
        }
        let value = asked.to_string().into_bytes();
        meta.compare_and_set(SHARD_COUNT_KEY, None, Some(&value))
            .await?;
        // Whoever won, the next read says what the deployment has.
        let raw = meta.get(SHARD_COUNT_KEY).await?;
        Ok(raw.and_then(|r| std::str::from_utf8(&r).ok().and_then(|s| s.parse().ok())))
    }

    /// Which run of its name this node is.
    pub fn run(&self) -> u64 {
        self.shared.run
    }

    /// Starts renewing the heartbeat, watching its validity and taking and giving up shards.
    /// From here on, losing the heartbeat calls `on_lost`.
    pub fn start(&self) {
        let state = self.shared.state.clone();
        std::thread::Builder::new()
            .name("shard-lease-watchdog".into())
            .spawn(move || watchdog(&state))
            .expect("spawning the lease watchdog thread");
        let renewer = tokio::spawn(renew(self.shared.clone()));
        let assigner = tokio::spawn(assign(self.shared.clone()));
        self.tasks.lock().extend([renewer, assigner]);
    }

    /// Who owns each shard, as this node last read the shard keys (`None`: nobody, or a
    /// value this version cannot read).
    pub fn owners(&self) -> impl Fn(u32) -> Option<String> + Send + Sync + 'static {
        let owners = self.shared.owners.clone();
        move |shard| owners.lock().get(shard as usize).cloned().flatten()
    }

    /// The shards this node serves and their epochs.
    pub async fn served(&self) -> Vec<(u32, u64)> {
        self.shared
            .served
            .lock()
            .await
            .values()
            .map(|l| (l.shard(), l.epoch()))
            .collect()
    }

    /// Stops serving every shard and gives each up, then the heartbeat, so that the other
    /// nodes take them at once (a clean stop). Best effort: what is not released ends by
    /// itself after a TTL.
    pub async fn leave(&self) {
        let shared = &self.shared;
        shared.leaving.store(true, Ordering::Release);
        let mut served = shared.served.lock().await;
        for (shard, lease) in std::mem::take(&mut *served) {
            shared.host.stop(shard).await;
            if let Err(e) = shared.give_up(&lease).await {
                warn!(shard, error = %e, "cluster: could not release a shard; it ends by itself after its TTL");
            }
        }
        drop(served);
        if shared.state.over.swap(true, Ordering::AcqRel) {
            return;
        }
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
        let written = shared.written.lock().clone();
        let released = Heartbeat::Released { run: shared.run }.encode();
        match shared
            .meta
            .compare_and_set(&shared.key, Some(&written), Some(&released))
            .await
        {
            Ok(true) => info!(node = %shared.config.node, "cluster: left the shards"),
            Ok(false) => {
                warn!(node = %shared.config.node, "cluster: the heartbeat changed under this node as it left")
            }
            Err(e) => {
                warn!(node = %shared.config.node, error = %e, "cluster: could not release the heartbeat; it ends by itself after its TTL")
            }
        }
    }
}

/// Renews the heartbeat every TTL/5 while the node runs. Each renewal checks the heartbeat
/// is what this node last knows it wrote, so a late one changes nothing after a release or a
/// fence.
async fn renew(shared: Arc<Shared>) {
    let config = &shared.config;
    let mut beat = 0u64;
    let mut failing_since: Option<Duration> = None;
    let mut retry_now = false;
    loop {
        if !std::mem::take(&mut retry_now) {
            tokio::time::sleep(config.poll_interval()).await;
        }
        if shared.state.over.load(Ordering::Acquire) {
            return;
        }
        beat += 1;
        let sent = boot_time();
        let value = Heartbeat::Live {
            run: shared.run,
            beat,
        }
        .encode();
        let expected = shared.written.lock().clone();
        let renewal =
            shared
                .meta
                .compare_and_set(&shared.key, Some(&expected), Some(value.as_slice()));
        // A renewal answered after the lease ran out is no use: give up waiting then.
        let left = shared.state.valid_until.lock().saturating_sub(boot_time());
        match tokio::time::timeout(left.max(Duration::from_millis(1)), renewal).await {
            Ok(Ok(true)) => {
                *shared.written.lock() = value;
                let mut until = shared.state.valid_until.lock();
                *until = (*until).max(sent + config.validity());
                if let Some(since) = failing_since.take() {
                    info!(node = %config.node, after = ?boot_time().saturating_sub(since), "cluster: heartbeats succeed again");
                }
            }
            Ok(Ok(false)) => match shared.meta.get(&shared.key).await {
                // A renewal of ours the store applied after this node stopped waiting for it.
                Ok(Some(b)) if matches!(Heartbeat::decode(&b), Some(Heartbeat::Live { run, .. }) if run == shared.run) =>
                {
                    *shared.written.lock() = b.to_vec();
                    retry_now = true;
                }
                Ok(other) => {
                    shared.state.lose(&format!(
                        "node {} (run {}) was fenced by another node: its heartbeat holds {:?}",
                        config.node,
                        shared.run,
                        other.as_deref().map(String::from_utf8_lossy)
                    ));
                    return;
                }
                Err(_) => {
                    failing_since.get_or_insert(sent);
                }
            },
            Ok(Err(e)) => {
                if failing_since.is_none() {
                    failing_since = Some(sent);
                    warn!(node = %config.node, error = %e, "cluster: heartbeat failed; the node stops serving if the metadata store stays unreachable");
                }
            }
            Err(_) => {
                failing_since.get_or_insert(sent);
            }
        }
    }
}

/// What one node has seen of the others, by its own clock.
#[derive(Default)]
struct View {
    /// Each node's heartbeat as last read, and since when it has read that value.
    beats: HashMap<String, (Bytes, Instant)>,
    /// Since when each shard has been free (unowned, released, or its owner's run ended).
    free_since: HashMap<u32, Instant>,
    /// Whether the last round failed, so a store outage is logged once.
    failing: bool,
}

async fn assign(shared: Arc<Shared>) {
    let mut view = View::default();
    loop {
        if shared.state.over.load(Ordering::Acquire) || shared.leaving.load(Ordering::Acquire) {
            return;
        }
        match shared.round(&mut view).await {
            Ok(()) => {
                if std::mem::take(&mut view.failing) {
                    info!(node = %shared.config.node, "cluster: shard rounds succeed again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut view.failing, true) {
                    warn!(node = %shared.config.node, error = %e, "cluster: a shard round failed; trying again");
                }
            }
        }
        tokio::time::sleep(shared.config.poll_interval()).await;
    }
}

/// A node's heartbeat as one round read it.
struct NodeSeen {
    beat: Heartbeat,
    raw: Bytes,
    /// Changed within the last TTL (or this node itself).
    fresh: bool,
}

/// A shard as one round read it.
enum ShardSeen {
    /// Unowned, released, or owned by a run of a node that has ended.
    Free,
    Ours,
    Alive(String),
    /// Its owner's heartbeat has stood still for a whole TTL.
    Stale {
        node: String,
        beat_raw: Bytes,
        run: u64,
    },
    /// A value this version cannot read: left alone.
    Unknown,
}

/// The keys as one round read them, and what they mean.
struct Snapshot {
    now: Instant,
    /// Each shard's key as read, and decoded.
    keys: Vec<(Option<Bytes>, Option<ShardOwner>)>,
    seen: Vec<ShardSeen>,
    /// The live node each shard is meant for ([`assignment`]).
    meant: Vec<Option<String>>,
}

impl Snapshot {
    fn meant_for(&self, shard: usize, node: &str) -> bool {
        self.meant[shard].as_deref() == Some(node)
    }
}

impl Shared {
    fn holds(&self) -> bool {
        !self.state.over.load(Ordering::Acquire) && boot_time() < *self.state.valid_until.lock()
    }

    async fn round(&self, view: &mut View) -> StorageResult<()> {
        let mut served = self.served.lock().await;
        if self.leaving.load(Ordering::Acquire) || !self.holds() {
            return Ok(());
        }
        let snapshot = self.snapshot(view).await?;
        *self.owners.lock() = snapshot
            .keys
            .iter()
            .map(|(_, owner)| match owner {
                Some(ShardOwner::Held { node, .. }) => Some(node.clone()),
                _ => None,
            })
            .collect();
        // A shard this node serves that its key no longer gives it was taken, so this node's
        // lease is gone: a shard is only taken from a node whose heartbeat stood still.
        for (shard, lease) in served.iter() {
            let (raw, _) = &snapshot.keys[*shard as usize];
            if raw.as_deref() != Some(lease.0.owner_raw.as_slice()) {
                self.state.lose(&format!(
                    "shard {shard} (epoch {}) was taken over: its key holds {:?}",
                    lease.epoch(),
                    raw.as_deref().map(String::from_utf8_lossy)
                ));
                return Ok(());
            }
        }
        for (shard, s) in snapshot.seen.iter().enumerate() {
            if matches!(s, ShardSeen::Free | ShardSeen::Stale { .. }) {
                view.free_since.entry(shard as u32).or_insert(snapshot.now);
            } else {
                view.free_since.remove(&(shard as u32));
            }
        }
        self.give_up_some(&mut served, &snapshot).await?;
        self.take_free(&mut served, &snapshot, view).await
    }

    /// Reads both prefixes and judges, by this node's clock, which nodes are live.
    async fn snapshot(&self, view: &mut View) -> StorageResult<Snapshot> {
        let me = self.config.node.as_str();
        let nodes_raw = self
            .meta
            .scan_prefix(NODES_PREFIX.as_bytes(), SCAN_LIMIT)
            .await?;
        let shards_raw = self
            .meta
            .scan_prefix(SHARDS_PREFIX.as_bytes(), SCAN_LIMIT)
            .await?;
        let now = Instant::now();

        let mut nodes: BTreeMap<String, NodeSeen> = BTreeMap::new();
        let mut beats = HashMap::new();
        for (key, raw) in nodes_raw {
            let name = String::from_utf8_lossy(&key[NODES_PREFIX.len()..]).into_owned();
            let Some(beat) = Heartbeat::decode(&raw) else {
                warn!(key = %String::from_utf8_lossy(&key), "cluster: unreadable heartbeat left alone");
                continue;
            };
            let since = match view.beats.get(&name) {
                Some((b, t)) if *b == raw => *t,
                _ => now,
            };
            beats.insert(name.clone(), (raw.clone(), since));
            let fresh = name == me || now.duration_since(since) < self.config.ttl;
            nodes.insert(name, NodeSeen { beat, raw, fresh });
        }
        view.beats = beats;

        let shards = self.config.shards as usize;
        let mut keys: Vec<(Option<Bytes>, Option<ShardOwner>)> = vec![(None, None); shards];
        for (key, raw) in shards_raw {
            let index = std::str::from_utf8(&key[SHARDS_PREFIX.len()..])
                .ok()
                .and_then(|s| s.parse::<usize>().ok());
            if let Some(i) = index.filter(|&i| i < shards) {
                keys[i] = (Some(raw.clone()), ShardOwner::decode(&raw));
            }
        }
        let seen: Vec<ShardSeen> = keys
            .iter()
            .map(|(raw, owner)| self.shard_seen(&nodes, raw.is_some(), owner.as_ref()))
            .collect();

        let live: Vec<&str> = nodes
            .iter()
            .filter(|(_, n)| n.fresh && matches!(n.beat, Heartbeat::Live { .. }))
            .map(|(name, _)| name.as_str())
            .collect();
        let owners: Vec<Option<&str>> = seen
            .iter()
            .map(|s| match s {
                ShardSeen::Ours => Some(me),
                ShardSeen::Alive(node) => Some(node.as_str()),
                _ => None,
            })
            .collect();
        let meant = assignment(&live, &owners)
            .into_iter()
            .map(|n| n.map(|n| live[n].to_string()))
            .collect();
        Ok(Snapshot {
            now,
            keys,
            seen,
            meant,
        })
    }

    fn shard_seen(
        &self,
        nodes: &BTreeMap<String, NodeSeen>,
        present: bool,
        owner: Option<&ShardOwner>,
    ) -> ShardSeen {
        let (run, node) = match owner {
            None if present => return ShardSeen::Unknown,
            None | Some(ShardOwner::Released { .. }) => return ShardSeen::Free,
            Some(ShardOwner::Held { run, node, .. }) => (*run, node),
        };
        if *node == self.config.node && run == self.run {
            return ShardSeen::Ours;
        }
        match nodes.get(node) {
            Some(n) if matches!(n.beat, Heartbeat::Live { run: r, .. } if r == run) => {
                if n.fresh {
                    ShardSeen::Alive(node.clone())
                } else {
                    ShardSeen::Stale {
                        node: node.clone(),
                        beat_raw: n.raw.clone(),
                        run,
                    }
                }
            }
            // That run of the node released or was fenced, or a later run of it has
            // registered: the earlier one has ended.
            _ => ShardSeen::Free,
        }
    }

    /// Gives up shards meant for other nodes, a few a round ([`ShardConfig::moves_per_round`])
    /// so that a node joining does not stop a whole node's shards at once, and every shard
    /// the store says is ours but nothing here serves (a take whose answer was lost, a start
    /// that failed).
    async fn give_up_some(
        &self,
        served: &mut BTreeMap<u32, ShardLease>,
        snapshot: &Snapshot,
    ) -> StorageResult<()> {
        let me = self.config.node.as_str();
        let mut moving = Vec::new();
        for (shard, s) in snapshot.seen.iter().enumerate() {
            let shard_u = shard as u32;
            if !matches!(s, ShardSeen::Ours) {
                continue;
            }
            let Some(lease) = served.get(&shard_u).cloned() else {
                let (raw, owner) = &snapshot.keys[shard];
                let epoch = owner.as_ref().map_or(0, ShardOwner::epoch);
                self.meta
                    .compare_and_set(
                        &shard_key(shard_u),
                        raw.as_deref(),
                        Some(&ShardOwner::Released { epoch }.encode()),
                    )
                    .await?;
                continue;
            };
            match snapshot.meant[shard].as_deref() {
                Some(to) if to != me && moving.len() < self.config.moves_per_round() => {
                    info!(node = %me, shard, to, "cluster: giving a shard up to spread the load");
                    moving.push(lease);
                }
                _ => {}
            }
        }
        // Stopped together: each stop flushes what its shard holds.
        futures::future::join_all(moving.iter().map(|l| self.host.stop(l.shard()))).await;
        for lease in &moving {
            served.remove(&lease.shard());
        }
        for lease in &moving {
            self.give_up(lease).await?;
        }
        Ok(())
    }

    /// Takes every shard that is free and meant for this node, or free for so long that the
    /// node it is meant for is not taking it.
    async fn take_free(
        &self,
        served: &mut BTreeMap<u32, ShardLease>,
        snapshot: &Snapshot,
        view: &mut View,
    ) -> StorageResult<()> {
        let me = self.config.node.as_str();
        for (shard, s) in snapshot.seen.iter().enumerate() {
            let shard_u = shard as u32;
            let stale = match s {
                ShardSeen::Free => None,
                ShardSeen::Stale {
                    node,
                    beat_raw,
                    run,
                } => Some((node.as_str(), beat_raw, *run)),
                _ => continue,
            };
            let free_long = view
                .free_since
                .get(&shard_u)
                .is_some_and(|t| snapshot.now.duration_since(*t) >= self.config.ttl * 2);
            if !(snapshot.meant_for(shard, me) || free_long) || !self.holds() {
                continue;
            }
            let (raw, owner) = &snapshot.keys[shard];
            let epoch = owner.as_ref().map_or(0, ShardOwner::epoch) + 1;
            let value = ShardOwner::Held {
                epoch,
                run: self.run,
                node: me.to_string(),
            }
            .encode();
            let mut checks = vec![Check {
                key: shard_key(shard_u),
                value: raw.as_ref().map(|b| b.to_vec()),
            }];
            let mut ops = vec![Op::Put {
                key: shard_key(shard_u),
                value: value.clone(),
            }];
            // The owner's heartbeat stood still: it is fenced in the same transaction, so a
            // renewal of it still on the wire fails instead of reviving the lease.
            if let Some((node, beat_raw, run)) = stale {
                checks.push(Check {
                    key: node_key(node),
                    value: Some(beat_raw.to_vec()),
                });
                ops.push(Op::Put {
                    key: node_key(node),
                    value: Heartbeat::Fenced { run }.encode(),
                });
            }
            if !self.meta.txn(checks, ops).await? {
                continue;
            }
            match stale {
                Some((node, _, run)) => {
                    info!(node = %me, shard, epoch, from = %node, from_run = run, "cluster: took a shard over from a node whose heartbeat stopped")
                }
                None => info!(node = %me, shard, epoch, "cluster: took a shard"),
            }
            view.free_since.remove(&shard_u);
            let lease = ShardLease(Arc::new(LeaseInner {
                shard: shard_u,
                epoch,
                owner_raw: value,
                given_up: AtomicBool::new(false),
                node: self.state.clone(),
            }));
            served.insert(shard_u, lease.clone());
            if let Err(e) = self.host.serve(lease.clone()).await {
                warn!(node = %me, shard, error = %e, "cluster: could not serve a shard; giving it back");
                served.remove(&shard_u);
                self.give_up(&lease).await?;
            }
        }
        Ok(())
    }

    /// Marks the lease given up (nothing here writes the shard from now on) and writes
    /// `released`, so the node it is meant for takes it without waiting.
    async fn give_up(&self, lease: &ShardLease) -> StorageResult<bool> {
        lease.0.given_up.store(true, Ordering::Release);
        self.meta
            .compare_and_set(
                &shard_key(lease.shard()),
                Some(&lease.0.owner_raw),
                Some(
                    &ShardOwner::Released {
                        epoch: lease.epoch(),
                    }
                    .encode(),
                ),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(meant: &[Option<usize>], nodes: usize) -> Vec<usize> {
        let mut c = vec![0; nodes];
        for n in meant.iter().flatten() {
            c[*n] += 1;
        }
        c
    }

    #[test]
    fn shards_spread_evenly_and_the_first_nodes_by_name_take_the_remainder() {
        let meant = assignment(&["a", "b", "c"], &[None; 8]);
        assert_eq!(counts(&meant, 3), vec![3, 3, 2]);
        assert!(meant.iter().all(Option::is_some));
        // Every node computes the same.
        assert_eq!(meant, assignment(&["a", "b", "c"], &[None; 8]));
    }

    #[test]
    fn owners_keep_their_shards_within_quota_and_only_the_excess_moves_to_a_returning_node() {
        // a and b own three each after c went away; c is back.
        let owners = [
            Some("a"),
            Some("b"),
            Some("a"),
            Some("b"),
            Some("a"),
            Some("b"),
        ];
        let meant = assignment(&["a", "b", "c"], &owners);
        assert_eq!(counts(&meant, 3), vec![2, 2, 2]);
        // The lowest-numbered two of each stay put.
        assert_eq!(&meant[..4], &[Some(0), Some(1), Some(0), Some(1)]);
        assert_eq!(&meant[4..], &[Some(2), Some(2)]);
    }

    #[test]
    fn a_gone_nodes_shards_go_to_the_rest_and_nothing_else_moves() {
        let owners = [Some("a"), Some("b"), Some("c"), Some("a"), Some("b"), None];
        // c is gone: its shard 2 and the unowned 5 go to a and b; 0, 1, 3, 4 stay.
        let meant = assignment(&["a", "b"], &owners);
        assert_eq!(counts(&meant, 2), vec![3, 3]);
        assert_eq!(
            [meant[0], meant[1], meant[3], meant[4]],
            [Some(0), Some(1), Some(0), Some(1)]
        );
    }

    #[test]
    fn with_no_live_node_nothing_is_meant_for_anyone() {
        assert_eq!(assignment(&[], &[None, Some("a")]), vec![None, None]);
    }

    #[test]
    fn keys_read_back_what_they_write() {
        for h in [
            Heartbeat::Live { run: 3, beat: 9 },
            Heartbeat::Released { run: 2 },
            Heartbeat::Fenced { run: 1 },
        ] {
            assert_eq!(Heartbeat::decode(&h.encode()), Some(h));
        }
        for o in [
            ShardOwner::Held {
                epoch: 7,
                run: 2,
                node: "core 1".into(),
            },
            ShardOwner::Released { epoch: 4 },
        ] {
            assert_eq!(ShardOwner::decode(&o.encode()), Some(o));
        }
        assert_eq!(Heartbeat::decode(b"x 1"), None);
        assert_eq!(ShardOwner::decode(b"1 x node"), None);
        assert!(shard_key(2) < shard_key(10));
    }
}
