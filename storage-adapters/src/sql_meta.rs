//! Metadata on a SQL server: [`PostgresMetaStore`] (PostgreSQL) and [`MysqlMetaStore`]
//! (MariaDB and MySQL), both through `sqlx` (pure Rust, no TLS).
//!
//! # Layout
//! A namespace (one deployment, or one test run) is one table, `tributary_meta_<namespace>`,
//! created on connect if missing: `k` (the key, the primary key) and `v` (the value). Keys
//! are `BYTEA` / `VARBINARY(2048)`: both compare as unsigned bytes, a key before its
//! extensions, which is the order [`MetaStore::scan`] promises. Keys are at most
//! [`MAX_KEY_LEN`] bytes (InnoDB's index entries stop at 3072 bytes, PostgreSQL's B-tree
//! entries at about 2700); values are `BYTEA` / `LONGBLOB`.
//!
//! # Transactions: per-key locks taken in one order, then read, check, write, commit
//! `txn(checks, ops)` locks every key it checks or writes, in ascending order of a lock id
//! derived from the key, then reads the checked keys, and writes and commits only if every
//! check holds. Every write to a key goes through the same lock, so two transactions that
//! share a key run one after the other (two-phase locking over keys) and each one's checks
//! see the other's writes or none of them. This covers what row locks cannot: a check that a
//! key is ABSENT has no row to lock under READ COMMITTED, and a racing create of the same key
//! would otherwise pass too. The locks are transaction-scoped, so a crash, a rollback or a
//! lost connection releases them with the transaction.
//!
//! - PostgreSQL: `pg_advisory_xact_lock(id)` with `id` a 64-bit FNV-1a hash of the namespace
//!   and the key (a collision only makes two transactions wait for each other); a key that
//!   is only checked, not written, takes `pg_advisory_xact_lock_shared(id)` instead, so
//!   transactions checking one common key (a cluster node's fencing epoch) do not queue.
//!   Transactions begin READ COMMITTED whatever the server's default: the check reads run
//!   after the locks are held, and a statement's snapshot includes every transaction that
//!   committed before it started, so they see the last writer's commit (PostgreSQL makes a
//!   commit visible before it releases its locks). Under REPEATABLE READ the snapshot would be the lock statement's,
//!   taken before it waited.
//! - MariaDB/MySQL: a lock table per namespace, `tributary_meta_<namespace>_locks`, holds
//!   [`LOCK_STRIPES`] rows made on connect; a transaction locks the rows of its keys' stripes
//!   with `SELECT ... FOR UPDATE` (InnoDB row locks, released at commit or rollback), then reads
//!   its checked keys with `FOR UPDATE` too (a locking read always reads the latest committed
//!   version). READ COMMITTED, so InnoDB takes no gap locks and unrelated keys never block.
//!
//! Locks are taken in one statement in ascending id order, so two transactions cannot
//! deadlock on them; should the server still report a deadlock or serialization failure, the
//! transaction is retried (it changed nothing). Plain `get` and `scan` take no locks: each is
//! one statement on one snapshot, so it never sees half a transaction.
//!
//! # Failures
//! Every operation gives up after [`OP_TIMEOUT`] with a [`StorageError::Meta`] naming the
//! store and the reason (also enforced by the server: statement and lock timeouts). A `txn`
//! that fails or times out during its commit may or may not have been applied, as with any
//! remote database: callers re-read before retrying. Connections are pooled; a broken one is
//! dropped and replaced, so service resumes by itself once the server is back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Row};

use crate::{Check, MetaStore, Op, Result, StorageError};

/// The longest key either store takes.
pub const MAX_KEY_LEN: usize = 2048;
/// How long one operation may take before it fails.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `connect` waits for the server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The number of lock rows of a MariaDB/MySQL namespace. Part of the stored format: every
/// process using a namespace must use the same number.
pub const LOCK_STRIPES: u32 = 4096;
/// The longest namespace (table names stop at 63/64 bytes).
pub const MAX_NAMESPACE_LEN: usize = 40;

const POOL_SIZE: u32 = 16;
/// How long PostgreSQL keeps a session that sits idle inside a transaction before it ends it
/// (and so releases its locks). A transaction here is a few statements sent back to back, so
/// only a client that went silent mid-transaction (killed, paused, cut off by the network)
/// idles this long; its locks must be gone before a cluster standby, a TTL (5 s by default)
/// after the last heartbeat it saw, tries to take the lease over. At 30 s the takeover's lock
/// wait hit the 10 s `lock_timeout` and the standby that finally won had a lease already run
/// out.
const PG_IDLE_IN_TRANSACTION_TIMEOUT: &str = "2s";
/// Pooled connections idle longer than this are pinged before use, so a server restart
/// while the pool was idle costs no failed operation.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);
/// Rows per INSERT / DELETE statement on MySQL (bound parameters stop at 65535).
const MYSQL_CHUNK: usize = 500;
/// Bytes of keys and values per INSERT on MySQL: a statement and its parameters travel as
/// one packet, which the server bounds by `max_allowed_packet` (16 MiB by default on
/// MariaDB). A single larger value still goes alone.
const MYSQL_CHUNK_BYTES: usize = 4 << 20;
const MAX_ATTEMPTS: u32 = 20;

/// Which server, and where, for messages: the URL without its password.
#[derive(Clone)]
struct Target {
    store: &'static str,
    shown: String,
}

impl Target {
    fn err(&self, what: &str, reason: impl fmt::Display) -> StorageError {
        StorageError::Meta(format!(
            "{} at {}: {what}: {reason}",
            self.store, self.shown
        ))
    }

    /// Runs one operation with the store's time limit.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(OP_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.err(what, reason(&e))),
            Err(_) => Err(self.err(what, format!("no answer within {} s", OP_TIMEOUT.as_secs()))),
        }
    }
}

/// The reason of a client error, in the server's words where it gave some.
fn reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => match d.code() {
            Some(code) => format!("{} (SQLSTATE {code})", d.message()),
            None => d.message().to_string(),
        },
        sqlx::Error::Io(io) => format!("connection failed or lost: {io}"),
        sqlx::Error::PoolTimedOut => format!(
            "no connection to the server within {} s (is it running and reachable?)",
            CONNECT_TIMEOUT.as_secs()
        ),
        other => other.to_string(),
    }
}

/// Deadlocks and serialization failures: the transaction changed nothing and can run again.
fn retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => matches!(d.code().as_deref(), Some("40001" | "40P01")),
        _ => false,
    }
}

/// The table of a namespace, after checking the name: lower-case ASCII letters, digits and
/// `_`, at most [`MAX_NAMESPACE_LEN`].
pub fn namespace_table(namespace: &str) -> Result<String> {
    let ok = !namespace.is_empty()
        && namespace.len() <= MAX_NAMESPACE_LEN
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(StorageError::Meta(format!(
            "metadata namespace {namespace:?} is not 1 to {MAX_NAMESPACE_LEN} lower-case letters, digits or '_'"
        )));
    }
    Ok(format!("tributary_meta_{namespace}"))
}

/// A URL as it may be shown: scheme, user, host, port and database, never the password.
fn shown_url(scheme: &str, user: &str, host: &str, port: u16, db: Option<&str>) -> String {
    let user = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    format!("{scheme}://{user}{host}:{port}/{}", db.unwrap_or(""))
}

/// A URL that did not parse, shown without what may be a password.
fn shown_unparsed(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// 64-bit FNV-1a: stable across processes, versions and platforms (every node must derive
/// the same lock for the same key), unlike std's hasher.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A transaction, reduced to what the server must do.
struct Plan {
    checks: Vec<Check>,
    /// Distinct checked keys.
    check_keys: Vec<Vec<u8>>,
    /// The final effect of the ops on each key: the last op on a key wins.
    puts: Vec<(Vec<u8>, Vec<u8>)>,
    deletes: Vec<Vec<u8>>,
    /// Every key checked or written, distinct.
    lock_keys: Vec<Vec<u8>>,
}

impl Plan {
    fn new(target: &Target, checks: Vec<Check>, ops: Vec<Op>) -> Result<Self> {
        let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Put { key, value } => last.insert(key, Some(value)),
                Op::Delete { key } => last.insert(key, None),
            };
        }
        let check_keys: BTreeSet<Vec<u8>> = checks.iter().map(|c| c.key.clone()).collect();
        let mut lock_keys = check_keys.clone();
        lock_keys.extend(last.keys().cloned());
        if let Some(long) = lock_keys.iter().find(|k| k.len() > MAX_KEY_LEN) {
            return Err(target.err(
                "key too long",
                format!("{} bytes, the limit is {MAX_KEY_LEN} bytes", long.len()),
            ));
        }
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for (k, v) in last {
            match v {
                Some(v) => puts.push((k, v)),
                None => deletes.push(k),
            }
        }
        Ok(Self {
            checks,
            check_keys: check_keys.into_iter().collect(),
            puts,
            deletes,
            lock_keys: lock_keys.into_iter().collect(),
        })
    }

    /// `puts` and `deletes` are in key order (built from a `BTreeMap`).
    fn writes_key(&self, key: &[u8]) -> bool {
        self.puts
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .is_ok()
            || self
                .deletes
                .binary_search_by(|k| k.as_slice().cmp(key))
                .is_ok()
    }

    fn writes(&self) -> bool {
        !self.puts.is_empty() || !self.deletes.is_empty()
    }

    /// Whether every check holds, given the current values of the checked keys.
    fn holds(&self, current: &HashMap<Vec<u8>, Vec<u8>>) -> bool {
        self.checks
            .iter()
            .all(|c| current.get(&c.key).map(Vec::as_slice) == c.value.as_deref())
    }
}

fn check_key_len(target: &Target, key: &[u8]) -> Result<()> {
    if key.len() > MAX_KEY_LEN {
        return Err(target.err(
            "key too long",
            format!("{} bytes, the limit is {MAX_KEY_LEN} bytes", key.len()),
        ));
    }
    Ok(())
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Runs a transaction: `prepare` locks, checks and writes, and returns the transaction to
/// commit (None when a check failed; it rolled back). A deadlock or serialization failure
/// before the commit changed nothing, so `prepare` runs again. Errors say whether the
/// transaction may have been applied: only a failure or timeout during the commit leaves
/// that open.
async fn run_txn<DB, F, Fut>(target: &Target, mut prepare: F) -> Result<bool>
where
    DB: sqlx::Database,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<Option<sqlx::Transaction<'static, DB>>, sqlx::Error>>,
{
    let committing = AtomicBool::new(false);
    let work = async {
        let mut tries = 0;
        let tx = loop {
            tries += 1;
            match prepare().await {
                Ok(Some(tx)) => break tx,
                Ok(None) => return Ok(false),
                Err(e) if retryable(&e) && tries < MAX_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(u64::from(tries))).await;
                }
                Err(e) => return Err(target.err("txn failed, nothing applied", reason(&e))),
            }
        };
        committing.store(true, Ordering::Relaxed);
        tx.commit().await.map_err(|e| {
            target.err(
                "txn commit failed, it may or may not have been applied",
                reason(&e),
            )
        })?;
        Ok(true)
    };
    match tokio::time::timeout(OP_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) if committing.load(Ordering::Relaxed) => Err(target.err(
            "txn commit failed, it may or may not have been applied",
            format!("no answer within {} s", OP_TIMEOUT.as_secs()),
        )),
        Err(_) => Err(target.err(
            "txn failed, nothing applied",
            format!("no answer within {} s", OP_TIMEOUT.as_secs()),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// Metadata in a PostgreSQL table; see the module docs for the locking scheme.
pub struct PostgresMetaStore {
    pool: PgPool,
    target: Target,
    namespace: String,
    sql: PgSql,
}

struct PgSql {
    get: String,
    get_many: String,
    scan: String,
    upsert: String,
    delete: String,
}

impl PostgresMetaStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and creates the
    /// namespace's table if missing. Fails within about [`CONNECT_TIMEOUT`] with one message
    /// naming the store, the URL without its password and the reason.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        let table = namespace_table(namespace)?;
        let opts: PgConnectOptions = url.parse().map_err(|e| {
            StorageError::Meta(format!(
                "postgres at {}: cannot use the URL: {e}",
                shown_unparsed(url)
            ))
        })?;
        let target = Target {
            store: "postgres",
            shown: shown_url(
                "postgres",
                opts.get_username(),
                opts.get_host(),
                opts.get_port(),
                opts.get_database(),
            ),
        };
        // The server enforces limits too, so a lock or statement left behind by a client
        // that went away does not outlive it for long.
        let opts = opts.options([
            ("statement_timeout", "10s"),
            ("lock_timeout", "10s"),
            (
                "idle_in_transaction_session_timeout",
                PG_IDLE_IN_TRANSACTION_TIMEOUT,
            ),
        ]);
        // One connection of our own first: its error names the reason, where the pool
        // would only report a timeout.
        let mut conn =
            match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(target.err("cannot connect", reason(&e))),
                Err(_) => {
                    return Err(target.err(
                        "cannot connect",
                        format!(
                            "no answer within {} s (host unreachable?)",
                            CONNECT_TIMEOUT.as_secs()
                        ),
                    ));
                }
            };
        let create = format!(
            "CREATE TABLE IF NOT EXISTS \"{table}\" (k BYTEA PRIMARY KEY, v BYTEA NOT NULL)"
        );
        // Two processes creating the same table at once can make one fail on PostgreSQL's
        // catalog (a unique violation); the second attempt finds the table.
        let mut created = target
            .timed("cannot create the table", conn.execute(&*create))
            .await;
        if created.is_err() {
            created = target
                .timed("cannot create the table", conn.execute(&*create))
                .await;
        }
        created?;
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .min_connections(0)
            .acquire_timeout(CONNECT_TIMEOUT)
            .idle_timeout(Duration::from_secs(60))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(opts);
        let sql = PgSql {
            get: format!("SELECT v FROM \"{table}\" WHERE k = $1"),
            get_many: format!("SELECT k, v FROM \"{table}\" WHERE k = ANY($1)"),
            scan: format!(
                "SELECT k, v FROM \"{table}\" WHERE k >= $1 AND k < $2 ORDER BY k LIMIT $3"
            ),
            upsert: format!(
                "INSERT INTO \"{table}\" (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
            ),
            delete: format!("DELETE FROM \"{table}\" WHERE k = ANY($1)"),
        };
        Ok(Self {
            pool,
            target,
            namespace: namespace.to_string(),
            sql,
        })
    }

    /// Closes the pool's connections.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Lock ids in ascending order, each with whether it is taken exclusively: a key only
    /// checked takes its lock shared, so transactions that merely check one key (every write
    /// of a cluster node checks its fencing epoch) run side by side, while a write of that
    /// key still waits for them all and they for it.
    fn lock_ids(&self, plan: &Plan) -> (Vec<i64>, Vec<bool>) {
        let id = |k: &[u8]| fnv1a(&[b"tributary-meta", self.namespace.as_bytes(), k]) as i64;
        let mut locks: BTreeMap<i64, bool> = BTreeMap::new();
        for k in &plan.lock_keys {
            let exclusive = plan.writes_key(k);
            *locks.entry(id(k)).or_insert(exclusive) |= exclusive;
        }
        locks.into_iter().unzip()
    }

    async fn read_many(
        &self,
        conn: &mut PgConnection,
        keys: &[Vec<u8>],
    ) -> std::result::Result<HashMap<Vec<u8>, Vec<u8>>, sqlx::Error> {
        let rows = sqlx::query(&self.sql.get_many)
            .bind(keys)
            .fetch_all(conn)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn prepare(
        &self,
        plan: &Plan,
        (lock_ids, exclusive): &(Vec<i64>, Vec<bool>),
    ) -> std::result::Result<Option<sqlx::Transaction<'static, sqlx::Postgres>>, sqlx::Error> {
        // READ COMMITTED whatever the server's default: each statement's snapshot must
        // start after the locks are held (under REPEATABLE READ the snapshot would be the
        // lock statement's, taken before it waited).
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?;
        // In the order of `lock_ids` (ascending): unnest yields the array in order.
        sqlx::query(
            "SELECT CASE WHEN x THEN pg_advisory_xact_lock(id)::text \
             ELSE pg_advisory_xact_lock_shared(id)::text END \
             FROM unnest($1::int8[], $2::bool[]) AS t(id, x)",
        )
        .bind(lock_ids)
        .bind(exclusive)
        .execute(&mut *tx)
        .await?;
        if !plan.checks.is_empty() {
            let current = self.read_many(&mut tx, &plan.check_keys).await?;
            if !plan.holds(&current) {
                tx.rollback().await?;
                return Ok(None);
            }
        }
        if !plan.puts.is_empty() {
            let (keys, values): (Vec<&[u8]>, Vec<&[u8]>) = plan
                .puts
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .unzip();
            sqlx::query(&self.sql.upsert)
                .bind(keys)
                .bind(values)
                .execute(&mut *tx)
                .await?;
        }
        if !plan.deletes.is_empty() {
            sqlx::query(&self.sql.delete)
                .bind(&plan.deletes)
                .execute(&mut *tx)
                .await?;
        }
        Ok(Some(tx))
    }
}

#[async_trait]
impl MetaStore for PostgresMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        check_key_len(&self.target, key)?;
        let row = self
            .target
            .timed(
                "get failed",
                sqlx::query(&self.sql.get)
                    .bind(key)
                    .fetch_optional(&self.pool),
            )
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let v: Vec<u8> = row
                    .try_get(0)
                    .map_err(|e| self.target.err("get failed", e))?;
                Ok(Some(Bytes::from(v)))
            }
        }
    }

    async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .target
            .timed(
                "scan failed",
                sqlx::query(&self.sql.scan)
                    .bind(start)
                    .bind(end)
                    .bind(limit_param(limit))
                    .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                let k: Vec<u8> = r.try_get(0)?;
                let v: Vec<u8> = r.try_get(1)?;
                Ok((k, Bytes::from(v)))
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(|e| self.target.err("scan failed", e))
    }

    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<bool> {
        let plan = Plan::new(&self.target, checks, ops)?;
        if !plan.writes() {
            if plan.checks.is_empty() {
                return Ok(true);
            }
            // Checks alone: one statement reads every checked key from one snapshot.
            let current = self
                .target
                .timed("txn failed", async {
                    let mut conn = self.pool.acquire().await?;
                    self.read_many(&mut conn, &plan.check_keys).await
                })
                .await?;
            return Ok(plan.holds(&current));
        }
        let lock_ids = self.lock_ids(&plan);
        run_txn(&self.target, || self.prepare(&plan, &lock_ids)).await
    }
}

// ---------------------------------------------------------------------------------------
// MariaDB / MySQL

/// Metadata in a MariaDB or MySQL (InnoDB) table; see the module docs for the locking scheme.
pub struct MysqlMetaStore {
    pool: MySqlPool,
    target: Target,
    table: String,
    locks: String,
}

fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

impl MysqlMetaStore {
    /// Connects to `url` (`mysql://user:password@host:port/database`, MariaDB or MySQL) and
    /// creates the namespace's tables if missing. Fails within about [`CONNECT_TIMEOUT`] with
    /// one message naming the store, the URL without its password and the reason.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        let table = namespace_table(namespace)?;
        let locks = format!("{table}_locks");
        let opts: MySqlConnectOptions = url.parse().map_err(|e| {
            StorageError::Meta(format!(
                "mysql at {}: cannot use the URL: {e}",
                shown_unparsed(url)
            ))
        })?;
        let target = Target {
            store: "mysql",
            shown: shown_url(
                "mysql",
                opts.get_username(),
                opts.get_host(),
                opts.get_port(),
                opts.get_database(),
            ),
        };
        let mut conn =
            match tokio::time::timeout(CONNECT_TIMEOUT, MySqlConnection::connect_with(&opts)).await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(target.err("cannot connect", reason(&e))),
                Err(_) => {
                    return Err(target.err(
                        "cannot connect",
                        format!(
                            "no answer within {} s (host unreachable?)",
                            CONNECT_TIMEOUT.as_secs()
                        ),
                    ));
                }
            };
        target
            .timed("cannot create the tables", async {
                conn.execute(&*format!(
                    "CREATE TABLE IF NOT EXISTS `{table}` (k VARBINARY({MAX_KEY_LEN}) NOT NULL PRIMARY KEY, \
                     v LONGBLOB NOT NULL) ENGINE=InnoDB ROW_FORMAT=DYNAMIC"
                ))
                .await?;
                conn.execute(&*format!(
                    "CREATE TABLE IF NOT EXISTS `{locks}` (id INT NOT NULL PRIMARY KEY) ENGINE=InnoDB"
                ))
                .await?;
                Ok(())
            })
            .await?;
        // Transactions need InnoDB: a table made by hand with another engine would make
        // every txn silently non-atomic.
        let engines: Vec<(String, String)> = target
            .timed(
                "cannot inspect the tables",
                sqlx::query_as(
                    "SELECT CAST(TABLE_NAME AS CHAR), CAST(COALESCE(ENGINE, '') AS CHAR) \
                     FROM information_schema.TABLES \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN (?, ?)",
                )
                .bind(&table)
                .bind(&locks)
                .fetch_all(&mut conn),
            )
            .await?;
        if let Some((name, engine)) = engines
            .iter()
            .find(|(_, e)| !e.eq_ignore_ascii_case("InnoDB"))
        {
            return Err(target.err(
                "unusable table",
                format!("{name} uses the {engine} engine; transactions need InnoDB"),
            ));
        }
        let (stripes,): (i64,) = target
            .timed(
                "cannot count the lock rows",
                sqlx::query_as(&format!("SELECT COUNT(*) FROM `{locks}`")).fetch_one(&mut conn),
            )
            .await?;
        if stripes != i64::from(LOCK_STRIPES) {
            let values: Vec<String> = (0..LOCK_STRIPES).map(|i| format!("({i})")).collect();
            target
                .timed(
                    "cannot make the lock rows",
                    conn.execute(&*format!(
                        "INSERT IGNORE INTO `{locks}` (id) VALUES {}",
                        values.join(",")
                    )),
                )
                .await?;
        }
        let _ = conn.close().await;
        let pool = MySqlPoolOptions::new()
            .max_connections(POOL_SIZE)
            .min_connections(0)
            .acquire_timeout(CONNECT_TIMEOUT)
            .idle_timeout(Duration::from_secs(60))
            .test_before_acquire(false)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // READ COMMITTED whatever the server's default: no gap locks (see the
                    // module docs). The lock wait bound matches OP_TIMEOUT.
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    conn.execute("SET SESSION innodb_lock_wait_timeout = 10")
                        .await?;
                    Ok(())
                })
            })
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(opts);
        Ok(Self {
            pool,
            target,
            table,
            locks,
        })
    }

    /// Closes the pool's connections.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn stripes(&self, plan: &Plan) -> Vec<i32> {
        let mut ids: Vec<i32> = plan
            .lock_keys
            .iter()
            .map(|k| (fnv1a(&[k]) % u64::from(LOCK_STRIPES)) as i32)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    async fn read_many(
        &self,
        conn: &mut MySqlConnection,
        keys: &[Vec<u8>],
        for_update: bool,
    ) -> std::result::Result<HashMap<Vec<u8>, Vec<u8>>, sqlx::Error> {
        let sql = format!(
            "SELECT k, v FROM `{}` WHERE k IN ({}){}",
            self.table,
            placeholders(keys.len()),
            if for_update { " FOR UPDATE" } else { "" }
        );
        let mut q = sqlx::query(&sql);
        for k in keys {
            q = q.bind(k);
        }
        let rows = q.fetch_all(conn).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn prepare(
        &self,
        plan: &Plan,
        stripes: &[i32],
    ) -> std::result::Result<Option<sqlx::Transaction<'static, sqlx::MySql>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // One statement, ascending primary key: the rows are locked in that order.
        let sql = format!(
            "SELECT id FROM `{}` WHERE id IN ({}) ORDER BY id FOR UPDATE",
            self.locks,
            placeholders(stripes.len())
        );
        let mut q = sqlx::query(&sql);
        for id in stripes {
            q = q.bind(id);
        }
        let locked = q.fetch_all(&mut *tx).await?;
        if locked.len() != stripes.len() {
            // A missing lock row would lock nothing: refuse rather than run unprotected.
            return Err(sqlx::Error::Protocol(format!(
                "the lock table {} lacks rows (found {} of {}); it must hold ids 0..{LOCK_STRIPES}",
                self.locks,
                locked.len(),
                stripes.len()
            )));
        }
        if !plan.checks.is_empty() {
            let current = self.read_many(&mut tx, &plan.check_keys, true).await?;
            if !plan.holds(&current) {
                tx.rollback().await?;
                return Ok(None);
            }
        }
        for chunk in mysql_put_chunks(&plan.puts) {
            let values = vec!["(?,?)"; chunk.len()].join(",");
            let sql = format!(
                "INSERT INTO `{}` (k, v) VALUES {values} ON DUPLICATE KEY UPDATE v = VALUES(v)",
                self.table
            );
            let mut q = sqlx::query(&sql);
            for (k, v) in chunk {
                q = q.bind(k).bind(v);
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in plan.deletes.chunks(MYSQL_CHUNK) {
            let sql = format!(
                "DELETE FROM `{}` WHERE k IN ({})",
                self.table,
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for k in chunk {
                q = q.bind(k);
            }
            q.execute(&mut *tx).await?;
        }
        Ok(Some(tx))
    }
}

/// `puts` cut into runs of at most [`MYSQL_CHUNK`] rows and, unless one row alone is
/// larger, [`MYSQL_CHUNK_BYTES`] bytes.
fn mysql_put_chunks(puts: &[(Vec<u8>, Vec<u8>)]) -> Vec<&[(Vec<u8>, Vec<u8>)]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (k, v)) in puts.iter().enumerate() {
        let size = k.len() + v.len();
        if i > start && (i - start == MYSQL_CHUNK || bytes + size > MYSQL_CHUNK_BYTES) {
            chunks.push(&puts[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < puts.len() {
        chunks.push(&puts[start..]);
    }
    chunks
}

#[async_trait]
impl MetaStore for MysqlMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        check_key_len(&self.target, key)?;
        let sql = format!("SELECT v FROM `{}` WHERE k = ?", self.table);
        let row = self
            .target
            .timed(
                "get failed",
                sqlx::query(&sql).bind(key).fetch_optional(&self.pool),
            )
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let v: Vec<u8> = row
                    .try_get(0)
                    .map_err(|e| self.target.err("get failed", e))?;
                Ok(Some(Bytes::from(v)))
            }
        }
    }

    async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT k, v FROM `{}` WHERE k >= ? AND k < ? ORDER BY k LIMIT ?",
            self.table
        );
        let rows = self
            .target
            .timed(
                "scan failed",
                sqlx::query(&sql)
                    .bind(start)
                    .bind(end)
                    .bind(limit_param(limit))
                    .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                let k: Vec<u8> = r.try_get(0)?;
                let v: Vec<u8> = r.try_get(1)?;
                Ok((k, Bytes::from(v)))
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(|e| self.target.err("scan failed", e))
    }

    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<bool> {
        let plan = Plan::new(&self.target, checks, ops)?;
        if !plan.writes() {
            if plan.checks.is_empty() {
                return Ok(true);
            }
            // Checks alone: one statement reads every checked key from one snapshot.
            let current = self
                .target
                .timed("txn failed", async {
                    let mut conn = self.pool.acquire().await?;
                    self.read_many(&mut conn, &plan.check_keys, false).await
                })
                .await?;
            return Ok(plan.holds(&current));
        }
        let stripes = self.stripes(&plan);
        run_txn(&self.target, || self.prepare(&plan, &stripes)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_checked() {
        assert_eq!(namespace_table("t_1").unwrap(), "tributary_meta_t_1");
        for bad in ["", "A", "a-b", "a b", "a\"b", "a`b", &"x".repeat(41)] {
            assert!(namespace_table(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_are_never_shown() {
        assert_eq!(
            shown_unparsed("mysql://u:secret@h:1/db"),
            "mysql://u@h:1/db"
        );
        assert_eq!(shown_unparsed("mysql://u:se@cret@h/db"), "mysql://u@h/db");
        assert_eq!(
            shown_url("postgres", "u", "h", 5432, Some("db")),
            "postgres://u@h:5432/db"
        );
    }

    #[test]
    fn the_lock_hash_is_stable() {
        // Fixed values: a change here would break the mutual exclusion between processes of
        // different versions on one namespace.
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0x089b_c907_b544_c769);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn mysql_statements_stay_small() {
        let put = |n: usize| (vec![0u8; 8], vec![0u8; n]);
        let sizes = |puts: &[(Vec<u8>, Vec<u8>)]| -> Vec<usize> {
            mysql_put_chunks(puts).iter().map(|c| c.len()).collect()
        };
        assert!(mysql_put_chunks(&[]).is_empty());
        assert_eq!(sizes(&vec![put(1); 1200]), vec![500, 500, 200]);
        // 256 KiB values: 15 fit in 4 MiB with their keys.
        assert_eq!(sizes(&vec![put(256 << 10); 40]), vec![15, 15, 10]);
        // One value larger than the budget goes alone.
        assert_eq!(
            sizes(&[put(1), put(MYSQL_CHUNK_BYTES * 2), put(1)]),
            vec![1, 1, 1]
        );
    }

    #[test]
    fn the_last_op_on_a_key_wins() {
        let t = Target {
            store: "test",
            shown: "test://".into(),
        };
        let plan = Plan::new(
            &t,
            vec![Check {
                key: b"c".to_vec(),
                value: None,
            }],
            vec![
                Op::Put {
                    key: b"a".to_vec(),
                    value: b"1".to_vec(),
                },
                Op::Delete { key: b"a".to_vec() },
                Op::Delete { key: b"b".to_vec() },
                Op::Put {
                    key: b"b".to_vec(),
                    value: b"2".to_vec(),
                },
            ],
        )
        .unwrap();
        assert_eq!(plan.puts, vec![(b"b".to_vec(), b"2".to_vec())]);
        assert_eq!(plan.deletes, vec![b"a".to_vec()]);
        assert_eq!(
            plan.lock_keys,
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert!(
            Plan::new(
                &t,
                vec![],
                vec![Op::Delete {
                    key: vec![0; MAX_KEY_LEN + 1]
                }]
            )
            .is_err()
        );
    }
}
