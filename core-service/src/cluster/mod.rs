//! Cluster mode: core nodes sharing one metadata store and one object store, one of them
//! serving at a time under a lease with a fencing epoch.
//!
//! Two keys in the metadata store (inside the deployment's namespace):
//!
//! ```text
//! cluster/leader     "<epoch> <node>"              changes only when a node takes over
//! cluster/heartbeat  "<epoch> <node> <beat>"       rewritten by the holder every TTL/5
//!                    "<epoch> <node> released"     written by a holder stopping cleanly
//! ```
//!
//! **Taking over.** A standby reads both keys every TTL/5. Once it has seen the same pair for
//! a whole TTL by its own monotonic clock (or sees `released`, or nothing), it writes
//! `epoch + 1` and its name with a transaction checking that both keys are still what it saw,
//! so of several standbys one wins. Only clock *rates* matter, never clock readings across
//! machines.
//!
//! **Keeping it.** The holder rewrites its heartbeat with a transaction checking the leader
//! key and the heartbeat it last wrote (so a renewal applied late cannot undo a release). The
//! lease is valid until the moment the last successful renewal was *sent* plus
//! TTL × 4/5: a standby that saw that heartbeat saw it after it was sent and waits a full TTL
//! from then, so the holder stops before a standby starts even if the two clocks run 20 %
//! apart. A thread of its own (not a tokio task, which a busy runtime could starve) ends the
//! process once the lease is past valid: a node cut off from the metadata store stops
//! acknowledging by exiting, and its successor reads everything from shared storage.
//!
//! **Fencing.** Every metadata transaction of the active node carries a check that the leader
//! key still names its epoch ([`FencedMetaStore`]), so the store itself refuses a node that
//! was paused past its lease and resumes believing it still serves.

pub mod shard_cores;
pub mod shard_router;
pub mod shards;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use tributary_proto::placement::fnv1a;
use tributary_storage::{Check, MetaStore, Op, Result as StorageResult, StorageError};

/// Time since boot, counting time suspended (CLOCK_BOOTTIME). The holder measures its lease
/// on it: `Instant` (CLOCK_MONOTONIC) stops while the machine sleeps, so a holder resumed
/// after a suspend would count on a lease its standbys, awake meanwhile, saw run out.
fn boot_time() -> Duration {
    match rustix::time::clock_gettime_dynamic(rustix::time::DynamicClockId::Boottime) {
        Ok(ts) => Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
        // Kernels without it (before 2.6.39) are not supported by Rust's std either.
        Err(_) => Duration::ZERO,
    }
}

const LEADER_KEY: &[u8] = b"cluster/leader";
const HEARTBEAT_KEY: &[u8] = b"cluster/heartbeat";
const RELEASED: &str = "released";

/// What a node needs to know to stand by and serve.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub node: String,
    pub ttl: Duration,
}

impl LeaseConfig {
    fn poll_interval(&self) -> Duration {
        self.ttl / 5
    }

    /// How long after a renewal was sent the holder still counts on it.
    fn validity(&self) -> Duration {
        self.ttl * 4 / 5
    }
}

/// The leader key's value: who serves, under which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub epoch: u64,
    pub node: String,
}

impl Leader {
    fn encode(&self) -> Vec<u8> {
        format!("{} {}", self.epoch, self.node).into_bytes()
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(raw).ok()?;
        let (epoch, node) = text.split_once(' ')?;
        Some(Self {
            epoch: epoch.parse().ok()?,
            node: node.to_string(),
        })
    }
}

impl fmt::Display for Leader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (epoch {})", self.node, self.epoch)
    }
}

fn heartbeat(leader: &Leader, beat: u64) -> Vec<u8> {
    format!("{} {} {beat}", leader.epoch, leader.node).into_bytes()
}

fn released(leader: &Leader) -> Vec<u8> {
    format!("{} {} {RELEASED}", leader.epoch, leader.node).into_bytes()
}

/// Why waiting for the lease stopped without it.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "cluster: the leader key holds {0:?}, which is not '<epoch> <node>'; another program writes this metadata namespace"
    )]
    Unreadable(String),
}

/// How the lease ends for the process: it must stop acknowledging at once.
pub type OnLost = Arc<dyn Fn(&str) + Send + Sync>;

/// The lease this node holds while it serves.
pub struct NodeLease {
    meta: Arc<dyn MetaStore>,
    config: LeaseConfig,
    leader: Leader,
    state: Arc<LeaseState>,
    keeper: Mutex<Option<JoinHandle<()>>>,
}

/// Shared by the keeper task, the watchdog thread and the fenced store.
struct LeaseState {
    /// Past this time since boot ([`boot_time`]) the lease may be another node's.
    valid_until: Mutex<Duration>,
    /// Set once the lease is given up or lost: the watchdog and keeper stop.
    over: AtomicBool,
    on_lost: OnLost,
}

impl LeaseState {
    /// The lease is gone: say why once and stop the process (through `on_lost`).
    fn lose(&self, why: &str) {
        if !self.over.swap(true, Ordering::AcqRel) {
            (self.on_lost)(why);
        }
    }
}

impl NodeLease {
    /// Waits until this node holds the lease. `standby` is told who serves while it waits
    /// (each time that changes).
    pub async fn acquire(
        meta: Arc<dyn MetaStore>,
        config: LeaseConfig,
        on_lost: OnLost,
        standby: impl Fn(Option<&Leader>),
    ) -> Result<Self, LeaseError> {
        let mut seen: Option<(Option<Bytes>, Option<Bytes>, Instant)> = None;
        let mut told: Option<Option<Leader>> = None;
        let mut failing = false;
        loop {
            // A standby rides out a store that stops answering: it only needs to see the
            // heartbeat again (an unchanged one still counts from when it was first seen).
            let read = async {
                Ok::<_, StorageError>((meta.get(LEADER_KEY).await?, meta.get(HEARTBEAT_KEY).await?))
            };
            let (leader_raw, beat_raw) = match read.await {
                Ok(r) => {
                    if std::mem::take(&mut failing) {
                        info!(node = %config.node, "cluster: the metadata store answers again");
                    }
                    r
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(node = %config.node, error = %e, "cluster: cannot read the lease; still standing by");
                    }
                    tokio::time::sleep(config.poll_interval()).await;
                    continue;
                }
            };
            let current = match &leader_raw {
                None => None,
                Some(raw) => Some(Leader::decode(raw).ok_or_else(|| {
                    LeaseError::Unreadable(String::from_utf8_lossy(raw).into_owned())
                })?),
            };
            let now = Instant::now();
            let unchanged_since = match &seen {
                Some((l, b, since)) if *l == leader_raw && *b == beat_raw => *since,
                _ => now,
            };
            seen = Some((leader_raw.clone(), beat_raw.clone(), unchanged_since));
            let is_released = beat_raw
                .as_deref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .is_some_and(|b| b.ends_with(RELEASED));
            let free = current.is_none()
                || is_released
                || now.duration_since(unchanged_since) >= config.ttl;
            if free {
                let next = Leader {
                    epoch: current.as_ref().map_or(1, |l| l.epoch + 1),
                    node: config.node.clone(),
                };
                let sent = boot_time();
                let won = match meta
                    .txn(
                        vec![
                            Check {
                                key: LEADER_KEY.to_vec(),
                                value: leader_raw.map(|b| b.to_vec()),
                            },
                            Check {
                                key: HEARTBEAT_KEY.to_vec(),
                                value: beat_raw.map(|b| b.to_vec()),
                            },
                        ],
                        vec![
                            Op::Put {
                                key: LEADER_KEY.to_vec(),
                                value: next.encode(),
                            },
                            Op::Put {
                                key: HEARTBEAT_KEY.to_vec(),
                                value: heartbeat(&next, 0),
                            },
                        ],
                    )
                    .await
                {
                    Ok(won) => won,
                    // Maybe applied, maybe not: the next read tells. If it was, this node is
                    // named leader without serving and takes the lease again after a TTL.
                    Err(e) => {
                        warn!(node = %config.node, error = %e, "cluster: taking the lease over failed; trying again");
                        seen = None;
                        tokio::time::sleep(config.poll_interval()).await;
                        continue;
                    }
                };
                if won {
                    let lease = Self {
                        meta,
                        leader: next,
                        state: Arc::new(LeaseState {
                            valid_until: Mutex::new(sent + config.validity()),
                            over: AtomicBool::new(false),
                            on_lost,
                        }),
                        config,
                        keeper: Mutex::new(None),
                    };
                    return Ok(lease);
                }
                // Another standby won: start watching its lease from now.
                seen = None;
                continue;
            }
            if told.as_ref() != Some(&current) {
                standby(current.as_ref());
                told = Some(current);
            }
            tokio::time::sleep(config.poll_interval()).await;
        }
    }

    /// Who this node serves as.
    pub fn leader(&self) -> &Leader {
        &self.leader
    }

    /// Starts renewing the lease and watching its validity. From here on, losing the lease
    /// calls `on_lost`.
    pub fn keep(&self) {
        let state = self.state.clone();
        std::thread::Builder::new()
            .name("lease-watchdog".into())
            .spawn(move || watchdog(&state))
            .expect("spawning the lease watchdog thread");
        let meta = self.meta.clone();
        let config = self.config.clone();
        let leader = self.leader.clone();
        let state = self.state.clone();
        let task = tokio::spawn(async move { renew(meta, config, leader, state).await });
        *self.keeper.lock() = Some(task);
    }

    /// Whether this node may still write: the lease is neither lost nor past valid. Cheap
    /// enough to ask before every object write.
    pub fn holds(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let state = self.state.clone();
        move || !state.over.load(Ordering::Acquire) && boot_time() < *state.valid_until.lock()
    }

    /// The metadata store as this node must write it: every transaction fenced by its epoch.
    pub fn fenced(&self, inner: Arc<dyn MetaStore>) -> Arc<dyn MetaStore> {
        Arc::new(FencedMetaStore {
            inner,
            leader: self.leader.clone(),
            leader_raw: self.leader.encode(),
            state: self.state.clone(),
        })
    }

    /// Gives the lease up so a standby takes over at once (a clean stop). Best effort: a
    /// lease not released ends by itself after its TTL.
    pub async fn release(&self) {
        if self.state.over.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(task) = self.keeper.lock().take() {
            task.abort();
        }
        let done = self
            .meta
            .txn(
                vec![Check {
                    key: LEADER_KEY.to_vec(),
                    value: Some(self.leader.encode()),
                }],
                vec![Op::Put {
                    key: HEARTBEAT_KEY.to_vec(),
                    value: released(&self.leader),
                }],
            )
            .await;
        match done {
            Ok(true) => info!(leader = %self.leader, "cluster: lease released"),
            Ok(false) => warn!(leader = %self.leader, "cluster: lease already taken over"),
            Err(e) => {
                warn!(leader = %self.leader, error = %e, "cluster: could not release the lease; it ends by itself after its TTL")
            }
        }
    }
}

/// Renews every TTL/5 while the lease is ours.
///
/// Each renewal also checks that the heartbeat still holds what this node last knows it
/// wrote. A renewal the store applies late (its answer given up on, or still on the wire when
/// the node released the lease) then changes nothing: it cannot overwrite a release, which
/// would make a standby wait out a whole TTL.
async fn renew(
    meta: Arc<dyn MetaStore>,
    config: LeaseConfig,
    leader: Leader,
    state: Arc<LeaseState>,
) {
    let mut beat = 0u64;
    let mut expected = heartbeat(&leader, 0);
    let mut failing_since: Option<Duration> = None;
    let mut retry_now = false;
    loop {
        if !std::mem::take(&mut retry_now) {
            tokio::time::sleep(config.poll_interval()).await;
        }
        if state.over.load(Ordering::Acquire) {
            return;
        }
        beat += 1;
        let sent = boot_time();
        let value = heartbeat(&leader, beat);
        let renewal = meta.txn(
            vec![
                Check {
                    key: LEADER_KEY.to_vec(),
                    value: Some(leader.encode()),
                },
                Check {
                    key: HEARTBEAT_KEY.to_vec(),
                    value: Some(expected.clone()),
                },
            ],
            vec![Op::Put {
                key: HEARTBEAT_KEY.to_vec(),
                value: value.clone(),
            }],
        );
        // A renewal answered after the lease ran out is no use: give up waiting then.
        let left = state.valid_until.lock().saturating_sub(boot_time());
        match tokio::time::timeout(left.max(Duration::from_millis(1)), renewal).await {
            Ok(Ok(true)) => {
                expected = value;
                let mut until = state.valid_until.lock();
                *until = (*until).max(sent + config.validity());
                if let Some(since) = failing_since.take() {
                    info!(leader = %leader, after = ?boot_time().saturating_sub(since), "cluster: lease renewals succeed again");
                }
            }
            Ok(Ok(false)) => {
                // Taken over, or the heartbeat is a renewal of ours applied after this node
                // stopped waiting for it: the keys tell which.
                let read = async {
                    Ok::<_, StorageError>((
                        meta.get(LEADER_KEY).await?,
                        meta.get(HEARTBEAT_KEY).await?,
                    ))
                };
                match read.await {
                    Ok((Some(l), Some(b)))
                        if l.as_ref() == leader.encode().as_slice()
                            && !b.ends_with(RELEASED.as_bytes()) =>
                    {
                        expected = b.to_vec();
                        retry_now = true;
                    }
                    Ok(_) => {
                        state.lose(&format!(
                            "the lease of {leader} was taken over by another node"
                        ));
                        return;
                    }
                    Err(_) => {
                        failing_since.get_or_insert(sent);
                    }
                }
            }
            Ok(Err(e)) => {
                if failing_since.is_none() {
                    failing_since = Some(sent);
                    warn!(leader = %leader, error = %e, "cluster: lease renewal failed; the node stops serving if the metadata store stays unreachable");
                }
            }
            Err(_) => {
                failing_since.get_or_insert(sent);
            }
        }
    }
}

/// Ends the process once the lease is past valid. A thread, so a starved runtime cannot
/// keep a node acknowledging on a lease that has gone to another node.
fn watchdog(state: &LeaseState) {
    loop {
        if state.over.load(Ordering::Acquire) {
            return;
        }
        let until = *state.valid_until.lock();
        let now = boot_time();
        if now >= until {
            state.lose(
                "the lease was not renewed in time: the metadata store is unreachable or too slow",
            );
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// What a fenced transaction came to.
enum Fenced {
    /// Whether the caller's checks held.
    Applied(bool),
    /// The fence key no longer holds this holder's value: what it holds now.
    Refused(Option<Bytes>),
}

/// Runs a transaction with one more check: `fence` still holds `expected`. A transaction
/// that did not apply failed on the caller's checks or on the fence, and only a re-read tells
/// which; epochs only grow, so a fence holding this holder's value now held it when the
/// transaction ran.
async fn fenced_txn(
    inner: &dyn MetaStore,
    mut checks: Vec<Check>,
    ops: Vec<Op>,
    fence: &[u8],
    expected: &[u8],
) -> StorageResult<Fenced> {
    checks.push(Check {
        key: fence.to_vec(),
        value: Some(expected.to_vec()),
    });
    if inner.txn(checks, ops).await? {
        return Ok(Fenced::Applied(true));
    }
    let now = inner.get(fence).await?;
    if now.as_deref() == Some(expected) {
        return Ok(Fenced::Applied(false));
    }
    Ok(Fenced::Refused(now))
}

/// The active node's view of the metadata store: every transaction also checks that the
/// leader key still names this node's epoch, so a node that lost its lease writes nothing.
struct FencedMetaStore {
    inner: Arc<dyn MetaStore>,
    leader: Leader,
    leader_raw: Vec<u8>,
    state: Arc<LeaseState>,
}

#[async_trait]
impl MetaStore for FencedMetaStore {
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
        let now = match fenced_txn(&*self.inner, checks, ops, LEADER_KEY, &self.leader_raw).await? {
            Fenced::Applied(applied) => return Ok(applied),
            Fenced::Refused(now) => now,
        };
        let by = now
            .as_deref()
            .and_then(Leader::decode)
            .map_or("nobody".to_string(), |l| l.to_string());
        let why = format!("{} lost its lease to {by}", self.leader);
        self.state.lose(&why);
        Err(StorageError::Meta(format!("cluster: write refused: {why}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tributary_storage::memory::MemoryMetaStore;

    fn config(node: &str) -> LeaseConfig {
        LeaseConfig {
            node: node.into(),
            ttl: Duration::from_millis(1_000),
        }
    }

    fn counting() -> (OnLost, Arc<Mutex<Vec<String>>>) {
        let lost = Arc::new(Mutex::new(Vec::new()));
        let l = lost.clone();
        (
            Arc::new(move |why: &str| l.lock().push(why.to_string())),
            lost,
        )
    }

    #[tokio::test]
    async fn the_first_node_takes_an_empty_store_at_once_with_epoch_one() {
        let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
        let (on_lost, _) = counting();
        let lease = NodeLease::acquire(meta.clone(), config("a"), on_lost, |_| {})
            .await
            .unwrap();
        assert_eq!(
            lease.leader(),
            &Leader {
                epoch: 1,
                node: "a".into()
            }
        );
        assert_eq!(meta.get(LEADER_KEY).await.unwrap().unwrap(), &b"1 a"[..]);
    }

    #[tokio::test]
    async fn a_standby_waits_while_heartbeats_go_on_and_takes_over_when_they_stop() {
        let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
        let (lost_a, lost) = counting();
        let a = NodeLease::acquire(meta.clone(), config("a"), lost_a, |_| {})
            .await
            .unwrap();
        a.keep();
        let (lost_b, _) = counting();
        let told = Arc::new(AtomicUsize::new(0));
        let t = told.clone();
        let standby = tokio::spawn({
            let meta = meta.clone();
            async move {
                NodeLease::acquire(meta, config("b"), lost_b, move |l| {
                    assert_eq!(l.unwrap().node, "a");
                    t.fetch_add(1, Ordering::SeqCst);
                })
                .await
            }
        });
        // Three TTLs of renewals: b must still be waiting.
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        assert!(!standby.is_finished(), "b took a lease a renews");
        assert_eq!(told.load(Ordering::SeqCst), 1);
        // a stops renewing (as if killed): b takes over after a TTL, with the next epoch.
        a.state.over.store(true, Ordering::Release);
        let stopped = Instant::now();
        let b = standby.await.unwrap().unwrap();
        assert!(
            stopped.elapsed() >= Duration::from_millis(700),
            "{:?}",
            stopped.elapsed()
        );
        assert_eq!(
            b.leader(),
            &Leader {
                epoch: 2,
                node: "b".into()
            }
        );
        // a's writes are refused by the fence, and a learns it lost.
        let fenced = FencedMetaStore {
            inner: meta.clone(),
            leader: a.leader.clone(),
            leader_raw: a.leader.encode(),
            state: Arc::new(LeaseState {
                valid_until: Mutex::new(boot_time()),
                over: AtomicBool::new(false),
                on_lost: {
                    let lost = lost.clone();
                    Arc::new(move |why: &str| lost.lock().push(why.to_string()))
                },
            }),
        };
        let err = fenced.put(b"x", b"1").await.unwrap_err();
        assert!(
            err.to_string().contains("lost its lease to b (epoch 2)"),
            "{err}"
        );
        assert_eq!(meta.get(b"x").await.unwrap(), None);
        assert_eq!(lost.lock().len(), 1);
        // b's own writes and failed checks behave as without the fence.
        let b_meta = b.fenced(meta.clone());
        b_meta.put(b"x", b"2").await.unwrap();
        assert!(
            !b_meta
                .compare_and_set(b"x", Some(b"1"), Some(b"3"))
                .await
                .unwrap()
        );
        assert_eq!(meta.get(b"x").await.unwrap().unwrap(), &b"2"[..]);
    }

    /// A store that fails (and counts) every call while `down` is set.
    struct Flaky {
        inner: MemoryMetaStore,
        down: AtomicBool,
        failed: AtomicUsize,
    }

    impl Flaky {
        fn check(&self) -> StorageResult<()> {
            if self.down.load(Ordering::SeqCst) {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Err(StorageError::Meta("down".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl MetaStore for Flaky {
        async fn get(&self, key: &[u8]) -> StorageResult<Option<Bytes>> {
            self.check()?;
            self.inner.get(key).await
        }
        async fn scan(
            &self,
            start: &[u8],
            end: &[u8],
            limit: usize,
        ) -> StorageResult<Vec<(Vec<u8>, Bytes)>> {
            self.check()?;
            self.inner.scan(start, end, limit).await
        }
        async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> StorageResult<bool> {
            self.check()?;
            self.inner.txn(checks, ops).await
        }
    }

    #[tokio::test]
    async fn a_standby_rides_out_a_store_outage() {
        let flaky = Arc::new(Flaky {
            inner: MemoryMetaStore::new(),
            down: AtomicBool::new(true),
            failed: AtomicUsize::new(0),
        });
        let meta: Arc<dyn MetaStore> = flaky.clone();
        let (on_lost, _) = counting();
        let standby =
            tokio::spawn(
                async move { NodeLease::acquire(meta, config("a"), on_lost, |_| {}).await },
            );
        // Three failed polls: the standby must still be waiting, not ended with an error.
        let deadline = Instant::now() + Duration::from_secs(10);
        while flaky.failed.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "the standby stopped polling");
            assert!(
                !standby.is_finished(),
                "the standby gave up on a store outage"
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
        }
        assert!(
            !standby.is_finished(),
            "the standby gave up on a store outage"
        );
        flaky.down.store(false, Ordering::SeqCst);
        let lease = standby.await.unwrap().unwrap();
        assert_eq!(lease.leader().epoch, 1);
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_at_once() {
        let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
        let (on_lost, lost) = counting();
        let a = NodeLease::acquire(meta.clone(), config("a"), on_lost, |_| {})
            .await
            .unwrap();
        a.keep();
        a.release().await;
        let started = Instant::now();
        let (on_lost_b, _) = counting();
        let b = NodeLease::acquire(meta.clone(), config("b"), on_lost_b, |_| {})
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(b.leader().epoch, 2);
        assert!(lost.lock().is_empty(), "a release is not a loss");
    }

    /// A store that holds every renewal (a heartbeat put that is not a release) until
    /// `gate` opens, and then applies it whether or not its caller still waits: a request
    /// already on the wire when the node gives up on it.
    struct LateRenewals {
        inner: Arc<MemoryMetaStore>,
        held: tokio::sync::Notify,
        gate: Arc<tokio::sync::Semaphore>,
        applied: Arc<Mutex<Vec<bool>>>,
    }

    #[async_trait]
    impl MetaStore for LateRenewals {
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
            let renewal = matches!(
                ops.as_slice(),
                [Op::Put { key, value }] if key == HEARTBEAT_KEY && !value.ends_with(RELEASED.as_bytes())
            );
            if !renewal {
                return self.inner.txn(checks, ops).await;
            }
            let (inner, gate, applied) =
                (self.inner.clone(), self.gate.clone(), self.applied.clone());
            let on_the_wire = tokio::spawn(async move {
                let _open = gate.acquire().await;
                let done = inner.txn(checks, ops).await;
                applied.lock().push(*done.as_ref().unwrap_or(&false));
                done
            });
            self.held.notify_one();
            on_the_wire.await.unwrap()
        }
    }

    #[tokio::test]
    async fn a_renewal_applied_after_the_release_leaves_the_lease_released() {
        let store = Arc::new(LateRenewals {
            inner: Arc::new(MemoryMetaStore::new()),
            held: tokio::sync::Notify::new(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            applied: Arc::new(Mutex::new(Vec::new())),
        });
        let meta: Arc<dyn MetaStore> = store.clone();
        let (on_lost, lost) = counting();
        let a = NodeLease::acquire(meta.clone(), config("a"), on_lost, |_| {})
            .await
            .unwrap();
        a.keep();
        // A renewal is on its way to the store when the node releases the lease.
        store.held.notified().await;
        a.release().await;
        assert_eq!(
            meta.get(HEARTBEAT_KEY).await.unwrap().unwrap(),
            &b"1 a released"[..]
        );
        // Then the store applies it.
        store.gate.add_permits(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.applied.lock().is_empty() {
            assert!(Instant::now() < deadline, "the held renewal never ran");
            tokio::task::yield_now().await;
        }
        assert_eq!(
            *store.applied.lock(),
            vec![false],
            "the late renewal changed nothing"
        );
        assert_eq!(
            meta.get(HEARTBEAT_KEY).await.unwrap().unwrap(),
            &b"1 a released"[..],
            "a standby still sees the release"
        );
        assert!(lost.lock().is_empty());
    }

    #[tokio::test]
    async fn a_renewal_the_node_gave_up_on_but_the_store_applied_does_not_end_the_lease() {
        let meta = Arc::new(MemoryMetaStore::new());
        let (on_lost, lost) = counting();
        let a = NodeLease::acquire(meta.clone(), config("a"), on_lost, |_| {})
            .await
            .unwrap();
        // Beat 7 was applied although its answer never came: the next renewal's check
        // (the heartbeat this node last knew) fails, and the keys show it is still ours.
        meta.put(HEARTBEAT_KEY, &heartbeat(a.leader(), 7))
            .await
            .unwrap();
        a.keep();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let beat = meta.get(HEARTBEAT_KEY).await.unwrap().unwrap();
            if beat.as_ref() != heartbeat(a.leader(), 7).as_slice() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no renewal after the unknown one"
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // a renewal interval
        }
        assert!(lost.lock().is_empty(), "{:?}", lost.lock());
        a.release().await;
    }

    #[tokio::test]
    async fn a_holder_that_cannot_renew_stops_before_a_standby_starts() {
        let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
        let (on_lost, lost) = counting();
        let a = NodeLease::acquire(meta.clone(), config("a"), on_lost, |_| {})
            .await
            .unwrap();
        // No keeper renews: the watchdog must call on_lost within the validity (4/5 TTL).
        let began = Instant::now();
        std::thread::spawn({
            let state = a.state.clone();
            move || watchdog(&state)
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while lost.lock().is_empty() {
            assert!(Instant::now() < deadline, "the watchdog never fired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            began.elapsed() <= Duration::from_millis(900),
            "{:?}",
            began.elapsed()
        );
        assert!(lost.lock()[0].contains("not renewed in time"));
    }
}
