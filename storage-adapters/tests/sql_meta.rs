//! The PostgreSQL and MariaDB/MySQL metadata stores against real servers.
//!
//! Each store's tests run when its URL is set (`TRIBUTARY_TEST_POSTGRES_URL`,
//! `TRIBUTARY_TEST_MYSQL_URL`; scripts/test-stores.sh starts the servers and sets them). Without
//! it they print that they were skipped, or fail if `TRIBUTARY_REQUIRE_STORES=1`.
//!
//! The crash check is two phases driven by scripts/test-stores.sh: with
//! `TRIBUTARY_TEST_PHASE=write`, `*_crash_phase` writes keys with create-if-absent txns from
//! several tasks and appends each acknowledged key to `TRIBUTARY_TEST_ACK_FILE` until the
//! server dies (the script kills it with SIGKILL meanwhile); with `TRIBUTARY_TEST_PHASE=verify`
//! (server restarted on the same data directory) every acknowledged key must be there. The
//! write phase also waits for the restarted server through the same store object, which must
//! work again by itself.
//! `TRIBUTARY_TEST_BENCH=1` runs `*_txn_cost`, which prints transaction rates.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tributary_storage::{MetaStore, MysqlMetaStore, PostgresMetaStore, contract};

#[derive(Clone, Copy)]
enum Kind {
    Postgres,
    Mysql,
}

impl Kind {
    fn env(self) -> &'static str {
        match self {
            Kind::Postgres => "TRIBUTARY_TEST_POSTGRES_URL",
            Kind::Mysql => "TRIBUTARY_TEST_MYSQL_URL",
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            Kind::Postgres => "postgres",
            Kind::Mysql => "mysql",
        }
    }

    async fn connect(
        self,
        url: &str,
        namespace: &str,
    ) -> tributary_storage::Result<Arc<dyn MetaStore>> {
        Ok(match self {
            Kind::Postgres => Arc::new(PostgresMetaStore::connect(url, namespace).await?),
            Kind::Mysql => Arc::new(MysqlMetaStore::connect(url, namespace).await?),
        })
    }

    /// The server's URL, or None (after saying so) when the test is to be skipped.
    fn url(self, test: &str) -> Option<String> {
        match std::env::var(self.env()) {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                assert!(
                    std::env::var("TRIBUTARY_REQUIRE_STORES").as_deref() != Ok("1"),
                    "{test}: {} is not set and TRIBUTARY_REQUIRE_STORES=1 (scripts/test-stores.sh starts the server and sets it)",
                    self.env()
                );
                eprintln!(
                    "{test}: skipped, {} is not set (scripts/test-stores.sh starts the server and sets it)",
                    self.env()
                );
                None
            }
        }
    }
}

fn fresh_namespace() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

/// `url` with its password (the part between `user:` and `@`) replaced.
fn with_password(url: &str, password: &str) -> String {
    let scheme_end = url.find("://").unwrap() + 3;
    let at = url.rfind('@').expect("the test URL has a user");
    let user = url[scheme_end..at].split(':').next().unwrap();
    format!("{}{user}:{password}{}", &url[..scheme_end], &url[at..])
}

/// `url` with another database name.
fn with_database(url: &str, db: &str) -> String {
    let at = url.rfind('@').expect("the test URL has a user");
    let slash = at + url[at..].find('/').expect("the test URL names a database");
    format!("{}/{db}", &url[..slash])
}

async fn keeps_the_contract(kind: Kind) {
    let Some(url) = kind.url("keeps_the_contract") else {
        return;
    };
    let store = kind.connect(&url, &fresh_namespace()).await.unwrap();
    contract::meta_store(store).await;
}

/// PostgreSQL whose sessions default to a stricter isolation level (a server or role
/// setting): the store sets its own level, and the contract still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_keeps_the_contract_whatever_the_default_isolation() {
    let Some(url) =
        Kind::Postgres.url("postgres_keeps_the_contract_whatever_the_default_isolation")
    else {
        return;
    };
    use sqlx::Connection;
    for (level, shown) in [
        ("serializable", "serializable"),
        ("repeatable%5C%20read", "repeatable read"),
    ] {
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}options[default_transaction_isolation]={level}");
        let mut probe = sqlx::PgConnection::connect(&url).await.unwrap();
        let (default,): (String,) = sqlx::query_as("SHOW default_transaction_isolation")
            .fetch_one(&mut probe)
            .await
            .unwrap();
        assert_eq!(default, shown, "the URL's option reaches the server");
        let store = Kind::Postgres
            .connect(&url, &fresh_namespace())
            .await
            .unwrap();
        contract::meta_store(store).await;
    }
}

/// A txn that waited for another's locks sees that one's commit in its checks. T2 bumps an
/// epoch key; T1, started while T2 holds the key, checks the old epoch and writes another
/// key. Once T2 has answered and the other key reads absent, T1 must fail: succeeding later
/// would be a write by an old epoch that T2's caller was entitled to think fenced off.
/// Another session stops T2 midway while it holds its locks: on PostgreSQL a table lock that
/// blocks writes (not reads, not advisory locks), on MariaDB a row lock on the epoch key
/// (T2's check reads it FOR UPDATE after taking its stripe locks).
async fn checks_see_the_commit_they_waited_for(kind: Kind, url: &str, label: &str) {
    use sqlx::Connection;
    use tributary_storage::{Check, Op};
    let ns = fresh_namespace();
    let store = kind.connect(url, &ns).await.unwrap();
    store.put(b"epoch", b"1").await.unwrap();
    let table = format!("tributary_meta_{ns}");
    enum Blocker {
        Pg(sqlx::PgConnection),
        My(sqlx::MySqlConnection),
    }
    let mut blocker = match kind {
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut c).await.unwrap();
            sqlx::query(&format!("LOCK TABLE \"{table}\" IN SHARE MODE"))
                .execute(&mut c)
                .await
                .unwrap();
            Blocker::Pg(c)
        }
        Kind::Mysql => {
            let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut c).await.unwrap();
            sqlx::query(&format!(
                "SELECT v FROM `{table}` WHERE k = 'epoch' FOR UPDATE"
            ))
            .execute(&mut c)
            .await
            .unwrap();
            Blocker::My(c)
        }
    };
    let txn = |checked: &'static [u8], key: &'static [u8], value: &'static [u8]| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .txn(
                    vec![Check {
                        key: b"epoch".to_vec(),
                        value: Some(checked.to_vec()),
                    }],
                    vec![Op::Put {
                        key: key.to_vec(),
                        value: value.to_vec(),
                    }],
                )
                .await
                .unwrap()
        })
    };
    let t2 = txn(b"1", b"epoch", b"2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t1 = txn(b"1", b"fenced", b"old epoch");
    tokio::time::sleep(Duration::from_millis(300)).await;
    match &mut blocker {
        Blocker::Pg(c) => {
            sqlx::query("ROLLBACK").execute(c).await.unwrap();
        }
        Blocker::My(c) => {
            sqlx::query("ROLLBACK").execute(c).await.unwrap();
        }
    }
    assert!(t2.await.unwrap(), "{label}: T2 holds");
    let seen = store.get(b"fenced").await.unwrap();
    let t1_applied = t1.await.unwrap();
    assert!(
        seen.is_some() || !t1_applied,
        "{label}: T1 committed after T2 had answered and its key read absent: its check \
         read a snapshot older than T2's commit"
    );
    assert!(
        !t1_applied,
        "{label}: T1 waited for T2 and must see epoch 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_checks_see_the_commit_they_waited_for() {
    let Some(url) = Kind::Postgres.url("postgres_checks_see_the_commit_they_waited_for") else {
        return;
    };
    // Also with REPEATABLE READ as the session default, whose snapshot would predate the
    // wait if the store did not begin its transactions READ COMMITTED.
    for level in ["read%5C%20committed", "repeatable%5C%20read"] {
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}options[default_transaction_isolation]={level}");
        checks_see_the_commit_they_waited_for(Kind::Postgres, &url, level).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_checks_see_the_commit_they_waited_for() {
    let Some(url) = Kind::Mysql.url("mysql_checks_see_the_commit_they_waited_for") else {
        return;
    };
    checks_see_the_commit_they_waited_for(Kind::Mysql, &url, "mysql").await;
}

async fn reopen_finds_the_data(kind: Kind) {
    let Some(url) = kind.url("reopen_finds_the_data") else {
        return;
    };
    let ns = fresh_namespace();
    let first = kind.connect(&url, &ns).await.unwrap();
    assert!(first.compare_and_set(b"a", None, Some(b"1")).await.unwrap());
    first.put(b"b\x00\xff", &[7; 1000]).await.unwrap();
    drop(first);
    let second = kind.connect(&url, &ns).await.unwrap();
    assert_eq!(second.get(b"a").await.unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(
        second.get(b"b\x00\xff").await.unwrap().as_deref(),
        Some(&[7u8; 1000][..])
    );
    assert!(
        !second
            .compare_and_set(b"a", None, Some(b"2"))
            .await
            .unwrap(),
        "the key written before the reconnect is present"
    );
    // Another namespace on the same server sees none of it.
    let other = kind.connect(&url, &fresh_namespace()).await.unwrap();
    assert_eq!(other.get(b"a").await.unwrap(), None);
}

async fn assert_fails_fast(kind: Kind, url: &str, secret: &str, expect: &[&str]) {
    let started = Instant::now();
    let err = match kind.connect(url, &fresh_namespace()).await {
        Ok(_) => panic!("connect to {} succeeded", url.replace(secret, "***")),
        Err(e) => e.to_string(),
    };
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(7),
        "connect took {took:?}: {err}"
    );
    assert!(
        err.contains(kind.scheme()),
        "the message names the store: {err}"
    );
    assert!(
        !err.contains(secret),
        "the message shows the password: {err}"
    );
    assert!(
        expect.iter().any(|e| err.contains(e)),
        "the message gives the reason (one of {expect:?}): {err}"
    );
    eprintln!("{err}");
}

async fn fails_fast_on_a_closed_port(kind: Kind) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let secret = "s3cret-closed";
    let url = format!(
        "{}://tributary:{secret}@127.0.0.1:{port}/tributary",
        kind.scheme()
    );
    assert_fails_fast(kind, &url, secret, &["refused"]).await;
    let err = kind.connect(&url, "t").await.err().unwrap().to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{port}")),
        "names the address: {err}"
    );
}

async fn fails_fast_on_a_wrong_password(kind: Kind) {
    let Some(url) = kind.url("fails_fast_on_a_wrong_password") else {
        return;
    };
    let secret = "wrong-Pa55word";
    assert_fails_fast(
        kind,
        &with_password(&url, secret),
        secret,
        &["password authentication failed", "Access denied"],
    )
    .await;
    let missing = with_database(&url, "no_such_database");
    let real_password = url[url.find("://").unwrap() + 3..url.rfind('@').unwrap()]
        .split_once(':')
        .map(|(_, p)| p.to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "(no password)".to_string());
    assert_fails_fast(
        kind,
        &missing,
        &real_password,
        &["does not exist", "Unknown database", "Access denied"],
    )
    .await;
}

/// The longest key, a key one byte longer (refused, naming the limit), large values and a
/// transaction larger than one statement's packet.
async fn limits(kind: Kind) {
    use tributary_storage::sql_meta::MAX_KEY_LEN;
    use tributary_storage::{Check, Op};
    let Some(url) = kind.url("limits") else {
        return;
    };
    let store = kind.connect(&url, &fresh_namespace()).await.unwrap();
    let longest = vec![0xffu8; MAX_KEY_LEN];
    let mut shorter = longest.clone();
    *shorter.last_mut().unwrap() = 0xfe;
    store.put(&longest, b"l").await.unwrap();
    store.put(&shorter, b"s").await.unwrap();
    assert_eq!(
        store.get(&longest).await.unwrap().as_deref(),
        Some(&b"l"[..])
    );
    let both = store
        .scan(&shorter, &[0xff; MAX_KEY_LEN + 1], 10)
        .await
        .unwrap();
    assert_eq!(both.len(), 2, "keys of the maximal length scan in order");
    assert_eq!(both[0].0, shorter);
    let too_long = vec![1u8; MAX_KEY_LEN + 1];
    let err = store.put(&too_long, b"x").await.unwrap_err().to_string();
    assert!(
        err.contains(&MAX_KEY_LEN.to_string()),
        "names the limit: {err}"
    );
    // 4 MiB in one value, and 24 MiB in one transaction (over MariaDB's default 16 MiB
    // packet).
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    store.put(b"big", &big).await.unwrap();
    assert_eq!(store.get(b"big").await.unwrap().as_deref(), Some(&big[..]));
    let ops: Vec<Op> = (0..96u32)
        .map(|i| Op::Put {
            key: format!("many/{i:03}").into_bytes(),
            value: vec![i as u8; 256 << 10],
        })
        .collect();
    assert!(
        store
            .txn(
                vec![Check {
                    key: b"many/000".to_vec(),
                    value: None
                }],
                ops
            )
            .await
            .unwrap()
    );
    let many = store.scan_prefix(b"many/", 1000).await.unwrap();
    assert_eq!(many.len(), 96);
    assert!(
        many.iter()
            .enumerate()
            .all(|(i, (_, v))| v.len() == 256 << 10 && v[0] == i as u8)
    );
}

/// A server that accepts connections and never answers: connect gives up in time.
async fn fails_fast_on_a_silent_server(kind: Kind) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let secret = "s3cret-silent";
    let url = format!(
        "{}://tributary:{secret}@127.0.0.1:{port}/tributary",
        kind.scheme()
    );
    assert_fails_fast(kind, &url, secret, &["no answer within"]).await;
    held.abort();
}

/// Another session holds what an operation needs: the operation fails within about 10 s,
/// naming the store, and works again once the session lets go.
async fn times_out_instead_of_hanging(kind: Kind) {
    use sqlx::Connection;
    let Some(url) = kind.url("times_out_instead_of_hanging") else {
        return;
    };
    let ns = fresh_namespace();
    let store = kind.connect(&url, &ns).await.unwrap();
    store.put(b"k", b"v").await.unwrap();
    let table = format!("tributary_meta_{ns}");
    let started = Instant::now();
    let err = match kind {
        Kind::Postgres => {
            let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut tx = other.begin().await.unwrap();
            sqlx::query(&format!("LOCK TABLE \"{table}\" IN ACCESS EXCLUSIVE MODE"))
                .execute(&mut *tx)
                .await
                .unwrap();
            let err = store.get(b"k").await.unwrap_err().to_string();
            tx.rollback().await.unwrap();
            err
        }
        Kind::Mysql => {
            let mut other = sqlx::MySqlConnection::connect(&url).await.unwrap();
            let mut tx = other.begin().await.unwrap();
            sqlx::query(&format!("SELECT id FROM `{table}_locks` FOR UPDATE"))
                .execute(&mut *tx)
                .await
                .unwrap();
            let err = store.put(b"k", b"w").await.unwrap_err().to_string();
            tx.rollback().await.unwrap();
            err
        }
    };
    let took = started.elapsed();
    eprintln!("after {took:?}: {err}");
    assert!(took < Duration::from_secs(13), "took {took:?}: {err}");
    assert!(err.contains(kind.scheme()), "names the store: {err}");
    store.put(b"k", b"after").await.unwrap();
    assert_eq!(
        store.get(b"k").await.unwrap().as_deref(),
        Some(&b"after"[..])
    );
}

/// `url` with another `host:port`.
fn with_address(url: &str, addr: std::net::SocketAddr) -> String {
    let at = url.rfind('@').expect("the test URL has a user");
    let slash = at + url[at..].find('/').expect("the test URL names a database");
    format!("{}@{addr}{}", &url[..at], &url[slash..])
}

/// A TCP relay to `server` that goes silent, as a network cut does, once its client sends
/// a chunk containing `trigger`: that chunk and everything after it from the client is
/// dropped, and the connection to the server stays open (nothing tells the server the client
/// is gone). `silenced` is notified when that happens.
async fn relay_that_goes_silent(
    server: std::net::SocketAddr,
    trigger: &'static [u8],
    silenced: Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = upstream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
            });
            let silenced = silenced.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut silent = false;
                while let Ok(n) = client_rx.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if !silent && buf[..n].windows(trigger.len()).any(|w| w == trigger) {
                        silent = true;
                        silenced.notify_one();
                    }
                    if !silent && server_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // The server's end stays open for as long as the test runs.
                let _open = server_tx;
                std::future::pending::<()>().await;
            });
        }
    });
    addr
}

/// A client that goes silent in the middle of a transaction (killed, paused or cut off from
/// the server; the server sees an open connection and no more statements) holds its locks
/// only for PostgreSQL's idle-in-transaction timeout: another client's write of the same key
/// succeeds within the store's own 10 s lock timeout. (With the server's lock held for 30 s,
/// a cluster standby's takeover hit that timeout and won only after its lease had run out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_locks_of_a_client_gone_silent_mid_transaction_are_released() {
    use tributary_storage::Op;
    let Some(url) =
        Kind::Postgres.url("postgres_locks_of_a_client_gone_silent_mid_transaction_are_released")
    else {
        return;
    };
    let ns = fresh_namespace();
    let direct = Kind::Postgres.connect(&url, &ns).await.unwrap();
    direct.put(b"k", b"before").await.unwrap();
    let opts: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let server = tokio::net::lookup_host((opts.get_host(), opts.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    // The relay falls silent when the write statement comes: by then the transaction holds
    // its lock on `k` (taken first, in a statement of its own that was answered).
    let silenced = Arc::new(tokio::sync::Notify::new());
    let relay = relay_that_goes_silent(server, b"INSERT INTO", silenced.clone()).await;
    let cut_off = Kind::Postgres
        .connect(&with_address(&url, relay), &ns)
        .await
        .unwrap();
    let stuck = tokio::spawn(async move {
        cut_off
            .txn(
                Vec::new(),
                vec![Op::Put {
                    key: b"k".to_vec(),
                    value: b"lost".to_vec(),
                }],
            )
            .await
    });
    silenced.notified().await;
    let started = Instant::now();
    let written = direct
        .txn(
            Vec::new(),
            vec![Op::Put {
                key: b"k".to_vec(),
                value: b"after".to_vec(),
            }],
        )
        .await;
    eprintln!(
        "the write behind the silent client's lock: {written:?} after {:?}",
        started.elapsed()
    );
    assert!(
        matches!(written, Ok(true)),
        "a write of the key the silent client had locked: {written:?}"
    );
    assert!(
        stuck.await.unwrap().is_err(),
        "the silent client's transaction cannot have succeeded"
    );
    assert_eq!(
        direct.get(b"k").await.unwrap().as_deref(),
        Some(&b"after"[..])
    );
}

const CRASH_NAMESPACE: &str = "crash_check";
const CRASH_WRITERS: u64 = 4;

fn crash_value(i: u64) -> Vec<u8> {
    format!("value-{i}-").repeat(20).into_bytes()
}

async fn crash_phase(kind: Kind) {
    let phase = std::env::var("TRIBUTARY_TEST_PHASE").unwrap_or_default();
    if phase.is_empty() {
        eprintln!(
            "crash_phase: skipped, TRIBUTARY_TEST_PHASE is not set (scripts/test-stores.sh runs it)"
        );
        return;
    }
    let Some(url) = kind.url("crash_phase") else {
        return;
    };
    let ack_file = std::env::var("TRIBUTARY_TEST_ACK_FILE").expect("TRIBUTARY_TEST_ACK_FILE");
    match phase.as_str() {
        "write" => {
            let store = kind.connect(&url, CRASH_NAMESPACE).await.unwrap();
            let acks = Arc::new(std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&ack_file)
                    .unwrap(),
            ));
            let mut tasks = Vec::new();
            for w in 0..CRASH_WRITERS {
                let store = store.clone();
                let acks = acks.clone();
                tasks.push(tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut i = w;
                    while Instant::now() < deadline {
                        let key = format!("crash/{i:08}");
                        match store
                            .compare_and_set(key.as_bytes(), None, Some(&crash_value(i)))
                            .await
                        {
                            Ok(true) => {
                                let mut f = acks.lock().unwrap();
                                writeln!(f, "{i}").unwrap();
                            }
                            Ok(false) => panic!("{key} existed before it was written"),
                            // The server was killed: what was acknowledged is in the file.
                            Err(e) => {
                                eprintln!("writer {w} stops: {e}");
                                return;
                            }
                        }
                        i += CRASH_WRITERS;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            acks.lock().unwrap().sync_all().unwrap();
            // The script restarts the server meanwhile: the same store object must work
            // again by itself (its pool drops the dead connections and makes new ones).
            let started = Instant::now();
            loop {
                match store.put(b"crash/recovered", b"yes").await {
                    Ok(()) => break,
                    Err(e) if started.elapsed() < Duration::from_secs(120) => {
                        eprintln!("waiting for the server: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => panic!("the store did not recover within 120 s: {e}"),
                }
            }
            eprintln!("the store recovered after {:?}", started.elapsed());
        }
        "verify" => {
            let store = kind.connect(&url, CRASH_NAMESPACE).await.unwrap();
            let acked: Vec<u64> = std::fs::read_to_string(&ack_file)
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            assert!(
                acked.len() >= 100,
                "only {} writes were acknowledged",
                acked.len()
            );
            for i in &acked {
                let key = format!("crash/{i:08}");
                assert_eq!(
                    store.get(key.as_bytes()).await.unwrap().as_deref(),
                    Some(&crash_value(*i)[..]),
                    "{key} was acknowledged before the crash"
                );
            }
            assert_eq!(
                store.get(b"crash/recovered").await.unwrap().as_deref(),
                Some(&b"yes"[..]),
                "the write made after the restart through the old connection pool"
            );
            let present = store.scan_prefix(b"crash/", usize::MAX).await.unwrap();
            eprintln!(
                "crash_phase verify: {} acknowledged writes all present ({} keys stored)",
                acked.len(),
                present.len()
            );
        }
        other => panic!("unknown TRIBUTARY_TEST_PHASE {other}"),
    }
}

async fn txn_cost(kind: Kind) {
    if std::env::var("TRIBUTARY_TEST_BENCH").as_deref() != Ok("1") {
        eprintln!("txn_cost: skipped, TRIBUTARY_TEST_BENCH=1 is not set");
        return;
    }
    let Some(url) = kind.url("txn_cost") else {
        return;
    };
    let store = kind.connect(&url, &fresh_namespace()).await.unwrap();
    const N: u64 = 1000;
    // Sequential compare-and-set on one key.
    store.put(b"seq", &0u64.to_be_bytes()).await.unwrap();
    let started = Instant::now();
    for n in 0..N {
        assert!(
            store
                .compare_and_set(b"seq", Some(&n.to_be_bytes()), Some(&(n + 1).to_be_bytes()))
                .await
                .unwrap()
        );
    }
    let seq = N as f64 / started.elapsed().as_secs_f64();
    // Eight writers, create-if-absent on distinct keys.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..N / 8 {
                let key = format!("par/{w}/{i}");
                assert!(
                    store
                        .compare_and_set(key.as_bytes(), None, Some(b"v"))
                        .await
                        .unwrap()
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let par = N as f64 / started.elapsed().as_secs_f64();
    // Reads.
    let started = Instant::now();
    for _ in 0..N {
        store.get(b"seq").await.unwrap();
    }
    let gets = N as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "{}: {seq:.0} sequential CAS/s, {par:.0} CAS/s from 8 writers on distinct keys, {gets:.0} sequential gets/s",
        kind.scheme()
    );
}

macro_rules! store_tests {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn keeps_the_contract() {
                super::keeps_the_contract($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn reopen_finds_the_data() {
                super::reopen_finds_the_data($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fails_fast_on_a_closed_port() {
                super::fails_fast_on_a_closed_port($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fails_fast_on_a_wrong_password() {
                super::fails_fast_on_a_wrong_password($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn limits() {
                super::limits($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fails_fast_on_a_silent_server() {
                super::fails_fast_on_a_silent_server($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn times_out_instead_of_hanging() {
                super::times_out_instead_of_hanging($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn crash_phase() {
                super::crash_phase($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn txn_cost() {
                super::txn_cost($kind).await;
            }
        }
    };
}

store_tests!(postgres, Kind::Postgres);
store_tests!(mysql, Kind::Mysql);
