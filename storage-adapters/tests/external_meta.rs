//! The `MetaStore` contract, reopening, fail-fast connects and crash safety against real etcd
//! and Redis servers.
//!
//! A store's tests run when `TRIBUTARY_TEST_<STORE>_URL` is set (scripts/test-stores.sh starts
//! the servers and sets it); without it they print that they were skipped, unless
//! `TRIBUTARY_REQUIRE_STORES=1`, which makes them fail. The crash tests also need
//! `TRIBUTARY_TEST_<STORE>_CTL`, the directory where the script left the server's pid and a
//! start.sh that starts it again on the same port and data. Run one store's tests with
//! `--test-threads 1`: the crash test kills the server the others use.

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tributary_storage::{Check, EtcdMetaStore, MetaStore, Op, RedisMetaStore, Result};

#[derive(Clone, Copy, Debug)]
enum Store {
    Etcd,
    Redis,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Etcd => "etcd",
            Store::Redis => "redis",
        }
    }

    fn var(self, what: &str) -> String {
        format!("TRIBUTARY_TEST_{}_{what}", self.name().to_uppercase())
    }

    /// The server's URL, or `None` (after saying so) when the test is to be skipped.
    fn url(self) -> Option<String> {
        let var = self.var("URL");
        match std::env::var(&var) {
            Ok(url) if !url.is_empty() => Some(url),
            _ if std::env::var("TRIBUTARY_REQUIRE_STORES").as_deref() == Ok("1") => panic!(
                "{var} is not set and TRIBUTARY_REQUIRE_STORES=1: the {} server did not start \
                 (scripts/test-stores.sh starts it)",
                self.name()
            ),
            _ => {
                skipped(&format!(
                    "{var} is not set (scripts/test-stores.sh starts a server)"
                ));
                None
            }
        }
    }

    fn ctl(self) -> Option<PathBuf> {
        let var = self.var("CTL");
        match std::env::var(&var) {
            Ok(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
            _ if std::env::var("TRIBUTARY_REQUIRE_STORES").as_deref() == Ok("1") => {
                panic!("{var} is not set and TRIBUTARY_REQUIRE_STORES=1")
            }
            _ => {
                skipped(&format!(
                    "{var} is not set (the crash test restarts the server)"
                ));
                None
            }
        }
    }

    async fn connect(self, url: &str, namespace: &str) -> Result<Arc<dyn MetaStore>> {
        Ok(match self {
            Store::Etcd => Arc::new(EtcdMetaStore::connect(url, namespace).await?),
            Store::Redis => Arc::new(RedisMetaStore::connect(url, namespace).await?),
        })
    }
}

/// Says so on the real stderr: the test harness would swallow an `eprintln!` of a passing test.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

fn fresh_namespace(what: &str) -> String {
    format!("tributary-test-{what}-{:016x}", rand::random::<u64>())
}

fn put(key: &[u8], value: &[u8]) -> Op {
    Op::Put {
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

async fn contract(store: Store) {
    let Some(url) = store.url() else { return };
    let s = store
        .connect(&url, &fresh_namespace("contract"))
        .await
        .unwrap();
    tributary_storage::contract::meta_store(s).await;
}

async fn reopened_store_sees_the_data(store: Store) {
    let Some(url) = store.url() else { return };
    let ns = fresh_namespace("reopen");
    {
        let s = store.connect(&url, &ns).await.unwrap();
        assert!(
            s.txn(
                vec![Check {
                    key: b"a".to_vec(),
                    value: None
                }],
                vec![put(b"a", b"1"), put(b"b\x00\xff", b"2")],
            )
            .await
            .unwrap()
        );
        s.put(b"c", b"").await.unwrap();
    }
    let s = store.connect(&url, &ns).await.unwrap();
    let all = s.scan(b"", &[0xff; 8], 100).await.unwrap();
    let got: Vec<(&[u8], &[u8])> = all.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    assert_eq!(
        got,
        vec![(&b"a"[..], &b"1"[..]), (b"b\x00\xff", b"2"), (b"c", b"")],
        "a new connection on the same namespace sees every key"
    );
    // Another namespace on the same server sees none of them, and its writes do not leak.
    let other = store
        .connect(&url, &fresh_namespace("other"))
        .await
        .unwrap();
    assert!(other.scan(b"", &[0xff; 8], 100).await.unwrap().is_empty());
    assert_eq!(other.get(b"a").await.unwrap(), None);
    other.put(b"a", b"other").await.unwrap();
    assert_eq!(s.get(b"a").await.unwrap().as_deref(), Some(&b"1"[..]));
    for k in [&b"a"[..], b"b\x00\xff", b"c"] {
        s.delete(k).await.unwrap();
    }
    other.delete(b"a").await.unwrap();
}

async fn connect_to_a_closed_port_fails_fast(store: Store) {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = match store {
        Store::Etcd => format!("http://127.0.0.1:{port}"),
        Store::Redis => format!("redis://:secret@127.0.0.1:{port}"),
    };
    let started = Instant::now();
    let err = store
        .connect(&url, "unused")
        .await
        .err()
        .expect("connect to a closed port fails");
    let msg = err.to_string();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "connect gave up after {:?}",
        started.elapsed()
    );
    assert!(
        msg.contains(store.name()),
        "the error names the store: {msg}"
    );
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")),
        "the error names the address: {msg}"
    );
    assert!(
        !msg.contains("secret"),
        "the error hides the password: {msg}"
    );
    eprintln!("{}: {msg}", store.name());
}

/// The cost of one metadata write: sequential compare-and-set calls, each one round trip and
/// (on a durable server) one fsync.
async fn sequential_cas_rate(store: Store) {
    let Some(url) = store.url() else { return };
    let s = store.connect(&url, &fresh_namespace("rate")).await.unwrap();
    const N: u64 = 1000;
    s.put(b"n", &0u64.to_be_bytes()).await.unwrap();
    let started = Instant::now();
    for i in 0..N {
        assert!(
            s.compare_and_set(b"n", Some(&i.to_be_bytes()), Some(&(i + 1).to_be_bytes()))
                .await
                .unwrap()
        );
    }
    let took = started.elapsed();
    println!(
        "{}: {N} sequential compare-and-set calls in {:.2} s: {:.0} ops/s",
        store.name(),
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64()
    );
    s.delete(b"n").await.unwrap();
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("the URL ends with :PORT")
}

fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writers keep committing create-if-absent txns while the server is killed with SIGKILL and
/// started again on the same data: every txn the store acknowledged is there afterwards, and
/// the same store object carries on by itself once the server is back.
async fn acknowledged_writes_survive_kill_9(store: Store) {
    let Some(url) = store.url() else { return };
    let Some(ctl) = store.ctl() else { return };
    let port = port_of(&url);
    let ns = fresh_namespace("crash");
    let s = store.connect(&url, &ns).await.unwrap();
    let acked: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let restarted = Arc::new(AtomicBool::new(false));
    let acked_after_restart = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let (s, acked, stop) = (s.clone(), acked.clone(), stop.clone());
        let (restarted, after) = (restarted.clone(), acked_after_restart.clone());
        writers.push(tokio::spawn(async move {
            let mut errors = 0u64;
            for i in 0u32.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let key = format!("d/{w}/{i:08}").into_bytes();
                let ok = s
                    .txn(
                        vec![Check {
                            key: key.clone(),
                            value: None,
                        }],
                        vec![put(&key, &key), put(format!("last/{w}").as_bytes(), &key)],
                    )
                    .await;
                match ok {
                    Ok(true) => {
                        acked.lock().push(key);
                        if restarted.load(Ordering::SeqCst) {
                            after.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(false) => panic!("writer {w}: create-if-absent of a new key failed"),
                    // The server is down: the outcome is unknown, the key is not counted.
                    Err(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            errors
        }));
    }
    wait_until("200 acknowledged txns", Duration::from_secs(30), || {
        acked.lock().len() >= 200
    })
    .await;
    let pid = std::fs::read_to_string(ctl.join("pid")).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 {pid}");
    let at_kill = acked.lock().len();
    wait_until(
        "the killed server's port to close",
        Duration::from_secs(10),
        || !answers(port),
    )
    .await;
    // Calls while the server is down fail (within the deadline) rather than hang.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    assert!(
        s.get(b"d/0/00000000").await.is_err(),
        "a read with the server down fails"
    );
    assert!(started.elapsed() < Duration::from_secs(11));
    let status = std::process::Command::new("bash")
        .arg(ctl.join("start.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "start.sh");
    wait_until(
        "the restarted server's port",
        Duration::from_secs(30),
        || answers(port),
    )
    .await;
    restarted.store(true, Ordering::SeqCst);
    // The same store object reconnects by itself.
    let after = acked_after_restart.clone();
    wait_until(
        "50 txns acknowledged after the restart",
        Duration::from_secs(60),
        || after.load(Ordering::SeqCst) >= 50,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut errors = 0;
    for w in writers {
        errors += w.await.unwrap();
    }
    let acked = acked.lock().clone();
    eprintln!(
        "{}: {} txns acknowledged ({at_kill} before the kill), {errors} failed while the server was down",
        store.name(),
        acked.len()
    );
    let fresh = store.connect(&url, &ns).await.unwrap();
    let stored = fresh.scan_prefix(b"d/", usize::MAX).await.unwrap();
    let stored: std::collections::HashSet<Vec<u8>> = stored.into_iter().map(|(k, _)| k).collect();
    let lost: Vec<String> = acked
        .iter()
        .filter(|k| !stored.contains(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged txns lost after kill -9: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    for k in &acked {
        assert_eq!(fresh.get(k).await.unwrap().as_deref(), Some(&k[..]));
    }
    // Clean up the namespace.
    let ops: Vec<Op> = fresh
        .scan(b"", &[0xff; 8], usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| Op::Delete { key })
        .collect();
    for chunk in ops.chunks(100) {
        fresh.txn(vec![], chunk.to_vec()).await.unwrap();
    }
}

/// etcd caps one request at --max-txn-ops ops and --max-request-bytes: a txn over either is
/// refused whole, with an error naming the flag, and nothing of it is applied.
async fn etcd_refuses_an_oversized_txn_whole() {
    let Some(url) = Store::Etcd.url() else { return };
    let s = Store::Etcd
        .connect(&url, &fresh_namespace("limits"))
        .await
        .unwrap();
    // scripts/stores/etcd.sh starts etcd with --max-txn-ops 65536.
    let many: Vec<Op> = (0..70_000u32)
        .map(|i| put(format!("m/{i:06}").as_bytes(), b"x"))
        .collect();
    let err = s
        .txn(vec![], many)
        .await
        .expect_err("70,000 ops exceed 65,536");
    assert!(err.to_string().contains("--max-txn-ops"), "{err}");
    assert!(
        s.scan_prefix(b"m/", 10).await.unwrap().is_empty(),
        "nothing applied"
    );
    // ... and with --max-request-bytes 10 MiB.
    let big = vec![7u8; 11 << 20];
    let err = s
        .txn(vec![], vec![put(b"small", b"x"), put(b"big", &big)])
        .await
        .expect_err("an 11 MiB request exceeds 10 MiB");
    assert!(err.to_string().contains("--max-request-bytes"), "{err}");
    assert_eq!(s.get(b"small").await.unwrap(), None, "nothing applied");
}

macro_rules! store_tests {
    ($store:expr, $contract:ident, $reopen:ident, $closed:ident, $rate:ident, $crash:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $contract() {
            contract($store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $reopen() {
            reopened_store_sees_the_data($store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $closed() {
            connect_to_a_closed_port_fails_fast($store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $rate() {
            sequential_cas_rate($store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $crash() {
            acknowledged_writes_survive_kill_9($store).await;
        }
    };
}

store_tests!(
    Store::Etcd,
    etcd_keeps_the_contract,
    etcd_reopened_store_sees_the_data,
    etcd_connect_to_a_closed_port_fails_fast,
    etcd_sequential_cas_rate,
    etcd_acknowledged_writes_survive_kill_9
);

store_tests!(
    Store::Redis,
    redis_keeps_the_contract,
    redis_reopened_store_sees_the_data,
    redis_connect_to_a_closed_port_fails_fast,
    redis_sequential_cas_rate,
    redis_acknowledged_writes_survive_kill_9
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_oversized_txn_is_refused_whole() {
    etcd_refuses_an_oversized_txn_whole().await;
}

/// A Redis that evicts any key when full (allkeys-*) would drop metadata silently: connect
/// refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refuses_a_server_that_evicts_keys() {
    let Some(url) = Store::Redis.url() else {
        return;
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let set = |policy: &'static str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .clone()
    };
    set("allkeys-lru")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let result = Store::Redis.connect(&url, "evicts").await;
    set("noeviction")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let err = result
        .err()
        .expect("connect refuses allkeys-lru")
        .to_string();
    assert!(
        err.contains("noeviction") && err.contains("allkeys-lru"),
        "{err}"
    );
}

/// With several members in the URL, losing the member in use costs a failed call or two; the
/// calls after go to another member. A new connect skips a dead member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_fails_over_to_another_member() {
    let var = "TRIBUTARY_TEST_ETCD_CLUSTER_URLS";
    let urls = match std::env::var(var) {
        Ok(u) if !u.is_empty() => u,
        _ if std::env::var("TRIBUTARY_REQUIRE_STORES").as_deref() == Ok("1") => {
            panic!("{var} is not set and TRIBUTARY_REQUIRE_STORES=1")
        }
        _ => {
            return skipped(&format!(
                "{var} is not set (scripts/test-stores.sh starts a cluster)"
            ));
        }
    };
    let ctl =
        PathBuf::from(std::env::var("TRIBUTARY_TEST_ETCD_CLUSTER_CTL").expect("CTL with URLS"));
    let ns = fresh_namespace("failover");
    let s = EtcdMetaStore::connect(&urls, &ns).await.unwrap();
    let first_port = port_of(urls.split(',').next().unwrap());
    s.put(b"n", &0u64.to_be_bytes()).await.unwrap();
    let (mut acked, mut errors, mut n) = (0u64, 0u64, 0u64);
    let mut killed = false;
    let started = Instant::now();
    // Increments until 200 have been acknowledged after the kill.
    let mut acked_after_kill = 0;
    while acked_after_kill < 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "failover within 60 s"
        );
        if acked == 100 && !killed {
            // The store talks to the first member that answered at connect: the first listed.
            let pid = std::fs::read_to_string(ctl.join("m0.pid")).unwrap();
            assert!(
                std::process::Command::new("kill")
                    .args(["-9", pid.trim()])
                    .status()
                    .unwrap()
                    .success()
            );
            killed = true;
            wait_until(
                "the killed member's port to close",
                Duration::from_secs(10),
                || !answers(first_port),
            )
            .await;
        }
        match s
            .compare_and_set(b"n", Some(&n.to_be_bytes()), Some(&(n + 1).to_be_bytes()))
            .await
        {
            Ok(true) => {
                n += 1;
                acked += 1;
                if killed {
                    acked_after_kill += 1;
                }
            }
            // A txn that failed with an unknown outcome was applied after all.
            Ok(false) => {
                let cur = s.get(b"n").await.unwrap().unwrap();
                n = u64::from_be_bytes(cur[..].try_into().unwrap());
            }
            Err(e) => {
                errors += 1;
                eprintln!("etcd cluster: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!(
        "etcd cluster: {acked} increments acknowledged, {errors} failed calls around the kill"
    );
    assert!(
        errors <= 3,
        "{errors} failed calls: failover should cost one or two"
    );
    let end = u64::from_be_bytes(s.get(b"n").await.unwrap().unwrap()[..].try_into().unwrap());
    assert!(
        end >= acked && end <= acked + errors,
        "the counter ({end}) counts every acknowledged increment ({acked}) and at most the failed ones"
    );
    // A new store on the same list skips the dead first member.
    let again = EtcdMetaStore::connect(&urls, &ns).await.unwrap();
    assert_eq!(
        again.get(b"n").await.unwrap().as_deref(),
        Some(&end.to_be_bytes()[..])
    );
    again.delete(b"n").await.unwrap();
}
