//! A [`MetaStore`] on Redis.
//!
//! A namespace is two Redis keys: the hash `namespace/kv` (key → value) and the sorted set
//! `namespace/keys` holding every key with score 0. Members of equal score sort by memcmp, so
//! ZRANGEBYLEX gives scans in unsigned byte order. Every write and every scan is one Lua script,
//! which Redis runs atomically: a [`MetaStore::txn`] checks all its conditions before its first
//! write, and a scan never sees half a txn.
//!
//! Durability is the server's configuration. Only with `appendonly yes` and `appendfsync always`
//! does Redis fsync the append-only file before it answers; with `everysec` (Redis's default) the
//! last second or two of acknowledged txns can be lost in a machine crash, and with the AOF off
//! everything since the last RDB snapshot is lost. Replication to replicas is asynchronous: a
//! failover can lose acknowledged txns. docs/storage.md has the server settings.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisError, Script};

use crate::remote::{
    CONNECT_TIMEOUT, OP_TIMEOUT, Origin, check_namespace, one_line, unknown_outcome,
};
use crate::{Check, MetaStore, Op, Result, StorageError};

// KEYS[1] is the hash of values, KEYS[2] the sorted set of keys. ARGV[1] is the number of checks;
// then three arguments per check (key, "1" if it must hold the value that follows or "0" if it
// must be absent, value) and three per op ("p", key, value or "d", key, ""). All checks run
// before the first write, so a failed check leaves nothing applied. A script without flags
// meets a full `maxmemory` only at its first write (Redis lets a script that has written
// finish), so an out-of-memory refusal also applies nothing.
const TXN_SCRIPT: &str = r"
local kv, idx = KEYS[1], KEYS[2]
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local cur = redis.call('HGET', kv, ARGV[i])
  if ARGV[i + 1] == '1' then
    if cur ~= ARGV[i + 2] then return 0 end
  elseif cur then
    return 0
  end
  i = i + 3
end
while i <= #ARGV do
  if ARGV[i] == 'p' then
    redis.call('HSET', kv, ARGV[i + 1], ARGV[i + 2])
    redis.call('ZADD', idx, 0, ARGV[i + 1])
  else
    redis.call('HDEL', kv, ARGV[i + 1])
    redis.call('ZREM', idx, ARGV[i + 1])
  end
  i = i + 3
end
return 1
";

// KEYS as above; ARGV: start (inclusive), end (exclusive), limit. Answers key, value, key, ...
// The limit is passed on as the string it came as: a Lua number would turn a large one into
// "9.2e+18", which Redis refuses.
// Values are read one by one: unpacking thousands of keys into one HMGET would overflow Lua's
// stack.
const SCAN_SCRIPT: &str = r"
local keys = redis.call('ZRANGEBYLEX', KEYS[2], '[' .. ARGV[1], '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
local out = {}
for _, k in ipairs(keys) do
  local v = redis.call('HGET', KEYS[1], k)
  if v then
    out[#out + 1] = k
    out[#out + 1] = v
  end
end
return out
";

/// The metadata store on a Redis server (one primary, not Redis Cluster; tested with 7.0).
#[derive(Clone)]
pub struct RedisMetaStore {
    conn: ConnectionManager,
    values_key: Vec<u8>,
    index_key: Vec<u8>,
    txn_script: Script,
    scan_script: Script,
    origin: Origin,
}

impl std::fmt::Debug for RedisMetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMetaStore")
            .field("url", &self.origin.url)
            .field("values_key", &String::from_utf8_lossy(&self.values_key))
            .finish()
    }
}

impl RedisMetaStore {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`) and checks that the server
    /// answers, within about 5 s. The store's keys are `namespace/kv` and `namespace/keys`.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        check_namespace("redis", namespace)?;
        let origin = Origin::new("redis", url);
        let client =
            Client::open(url).map_err(|e| origin.error(format_args!("invalid URL: {e}")))?;
        // One plain connection and a PING first: the connection manager retries a refused
        // connection with backoff, which would turn "connection refused" into a slow timeout.
        let probe = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        origin
            .deadline("connect", CONNECT_TIMEOUT, async {
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&probe)
                    .await
                    .map_err(|e| origin.error(format_args!("cannot connect: {}", one_line(e))))?;
                redis::cmd("PING")
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| origin.error(format_args!("PING: {}", one_line(e))))?;
                check_settings(&origin, &mut conn).await
            })
            .await?;
        // After a lost connection the manager reconnects in the background and the next call
        // uses the new connection; the retry schedule stays well inside one call's deadline.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(4)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let conn = origin
            .deadline("connect", CONNECT_TIMEOUT, async {
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(|e| origin.error(format_args!("cannot connect: {}", one_line(e))))
            })
            .await?;
        tracing::info!(url = %origin.url, namespace, "connected to redis");
        Ok(Self {
            conn,
            values_key: format!("{namespace}/kv").into_bytes(),
            index_key: format!("{namespace}/keys").into_bytes(),
            txn_script: Script::new(TXN_SCRIPT),
            scan_script: Script::new(SCAN_SCRIPT),
            origin,
        })
    }

    fn error(&self, what: &str, e: &RedisError) -> StorageError {
        if e.is_timeout() {
            return self.origin.error(format_args!(
                "{what}: no answer within {} s{}",
                OP_TIMEOUT.as_secs(),
                unknown_outcome(what)
            ));
        }
        self.origin.error(format_args!("{what}: {}", one_line(e)))
    }
}

/// A server setting, or `None` where CONFIG is not allowed (managed services often rename or
/// disable it).
async fn config_get(conn: &mut MultiplexedConnection, name: &str) -> Option<String> {
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await
        .ok()?;
    pair.into_iter().nth(1)
}

/// Refuses a server that would evict metadata under memory pressure, and says how durable an
/// acknowledged txn is.
async fn check_settings(origin: &Origin, conn: &mut MultiplexedConnection) -> Result<()> {
    let policy = config_get(conn, "maxmemory-policy").await;
    // volatile-* policies only evict keys with a TTL, and the store sets none.
    if let Some(p) = policy.as_deref().filter(|p| p.starts_with("allkeys-")) {
        return Err(origin.error(format_args!(
            "maxmemory-policy is {p}: the server may evict metadata when full; set it to noeviction"
        )));
    }
    let aof = config_get(conn, "appendonly").await;
    let fsync = config_get(conn, "appendfsync").await;
    match (aof.as_deref(), fsync.as_deref()) {
        (Some("yes"), Some("always")) => {}
        (Some("yes"), Some(f)) => tracing::warn!(
            url = %origin.url,
            "redis runs with appendfsync {f}: it acknowledges before the append-only file is fsynced, so a machine crash can lose the last acknowledged metadata writes (set appendfsync always)"
        ),
        (Some(_), _) => tracing::warn!(
            url = %origin.url,
            "redis runs without the append-only file: a restart loses every metadata write since its last snapshot (set appendonly yes and appendfsync always)"
        ),
        (None, _) => tracing::info!(
            url = %origin.url,
            "redis does not allow CONFIG GET: its durability settings are unknown (metadata needs appendonly yes and appendfsync always)"
        ),
    }
    Ok(())
}

#[async_trait]
impl MetaStore for RedisMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = self
            .origin
            .deadline("get", OP_TIMEOUT, async {
                redis::cmd("HGET")
                    .arg(&self.values_key)
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.error("get", &e))
            })
            .await?;
        Ok(value.map(Bytes::from))
    }

    async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let flat: Vec<Vec<u8>> = self
            .origin
            .deadline("scan", OP_TIMEOUT, async {
                self.scan_script
                    .key(&self.values_key)
                    .key(&self.index_key)
                    .arg(start)
                    .arg(end)
                    .arg(i64::try_from(limit).unwrap_or(i64::MAX))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| self.error("scan", &e))
            })
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, Bytes::from(v)));
        }
        Ok(out)
    }

    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<bool> {
        let mut inv = self.txn_script.prepare_invoke();
        inv.key(&self.values_key)
            .key(&self.index_key)
            .arg(checks.len());
        for c in &checks {
            match &c.value {
                Some(v) => inv.arg(&c.key[..]).arg("1").arg(&v[..]),
                None => inv.arg(&c.key[..]).arg("0").arg(""),
            };
        }
        for op in &ops {
            match op {
                Op::Put { key, value } => inv.arg("p").arg(&key[..]).arg(&value[..]),
                Op::Delete { key } => inv.arg("d").arg(&key[..]).arg(""),
            };
        }
        let mut conn = self.conn.clone();
        let applied: i64 = self
            .origin
            .deadline("txn", OP_TIMEOUT, async {
                inv.invoke_async(&mut conn)
                    .await
                    .map_err(|e| self.error("txn", &e))
            })
            .await?;
        Ok(applied == 1)
    }
}
