//! A [`MetaStore`] on etcd's v3 KV API.
//!
//! Every key lives under `namespace/`, so deployments and test runs sharing a cluster never see
//! each other's keys. A [`MetaStore::txn`] is exactly one etcd Txn: a check on a value compares
//! the value, a check on absence compares `version == 0` (etcd fails a value comparison on a
//! missing key, and an empty value is a present key with version >= 1), and the ops are the
//! success branch. etcd acknowledges a Txn once a quorum has it in its fsynced WAL.
//!
//! etcd's limits apply to one txn: at most `--max-txn-ops` ops (128 by default) and at most
//! `--max-request-bytes` (1.5 MiB by default) in one request. A txn over them is refused with an
//! error naming the flag; it is never split, since a split txn is no longer atomic.
//!
//! The URL may list several members (`http://a:2379,http://b:2379,http://c:2379`). Calls go to
//! one member; after a failure that points at it (unreachable, no leader, no answer in time),
//! the next call goes to the next member. Nothing is retried: a txn whose answer was lost may
//! have been applied, and the caller decides.
//!
//! The client is tonic over a minimal `.proto` of our own (proto/etcd/kv.proto), compiled
//! without a system protoc.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::remote::{
    CONNECT_TIMEOUT, OP_TIMEOUT, Origin, check_namespace, one_line, unknown_outcome,
};
use crate::{Check, MetaStore, Op, Result};

#[allow(clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::request_op::Request;

/// Large enough for any range answer etcd sends (its own cap on a response is 2 GiB).
const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// The metadata store on an etcd cluster (3.4 or later).
#[derive(Clone)]
pub struct EtcdMetaStore {
    /// One client per member, in the order the URL lists them.
    members: Arc<[Member]>,
    /// The member calls go to.
    current: Arc<AtomicUsize>,
    prefix: Vec<u8>,
    origin: Origin,
}

struct Member {
    url: String,
    client: KvClient<Channel>,
}

impl std::fmt::Debug for EtcdMetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMetaStore")
            .field("url", &self.origin.url)
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish()
    }
}

impl EtcdMetaStore {
    /// Connects to etcd at `url` (`http://host:2379`, or `https://` with the system's root
    /// certificates; several members separated by commas) and checks that a member answers a
    /// read, within about 5 s. Keys go under `namespace/`.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        check_namespace("etcd", namespace)?;
        let origin = Origin::new("etcd", url);
        let mut members = Vec::new();
        for member_url in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            members.push(Member {
                url: crate::remote::redact_url(member_url),
                client: KvClient::new(channel(&origin, member_url)?)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES),
            });
        }
        if members.is_empty() {
            return Err(origin.error("no member URL given"));
        }
        let mut prefix = namespace.as_bytes().to_vec();
        prefix.push(b'/');
        let mut store = Self {
            members: members.into(),
            current: Arc::default(),
            prefix,
            origin,
        };
        // A TCP listener is not yet an etcd: a linearizable read proves the member speaks the
        // KV API and the cluster has a leader. Every member is asked at once; the first in the
        // URL's order that answers takes the calls.
        let probes: Vec<_> = store
            .members
            .iter()
            .map(|m| {
                let mut client = m.client.clone();
                let req = pb::RangeRequest {
                    key: store.key(b"").into(),
                    ..Default::default()
                };
                tokio::spawn(async move {
                    match tokio::time::timeout(CONNECT_TIMEOUT, client.range(req)).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(status)) => Err(Some(status)),
                        Err(_) => Err(None),
                    }
                })
            })
            .collect();
        let mut failures = Vec::new();
        let mut chosen = None;
        for (i, probe) in probes.into_iter().enumerate() {
            let outcome = probe
                .await
                .unwrap_or_else(|e| Err(Some(Status::internal(e.to_string()))));
            match outcome {
                Ok(()) => {
                    chosen = chosen.or(Some(i));
                }
                Err(status) => {
                    let reason = match status {
                        Some(s) if s.code() == Code::Unavailable => Self::status_reason(&s),
                        Some(s) => format!(
                            "does not answer as an etcd v3 server: {}",
                            Self::status_reason(&s)
                        ),
                        None => format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                    };
                    failures.push((i, reason));
                }
            }
        }
        let Some(chosen) = chosen else {
            let reasons: Vec<String> = if store.members.len() == 1 {
                failures.into_iter().map(|(_, r)| r).collect()
            } else {
                failures
                    .into_iter()
                    .map(|(i, r)| format!("{}: {r}", store.members[i].url))
                    .collect()
            };
            return Err(store
                .origin
                .error(format_args!("connect: {}", reasons.join("; "))));
        };
        for (i, reason) in &failures {
            tracing::warn!(member = %store.members[*i].url, %reason, "etcd member does not answer");
        }
        store.current = Arc::new(AtomicUsize::new(chosen));
        tracing::info!(url = %store.origin.url, member = %store.members[chosen].url, namespace, "connected to etcd");
        Ok(store)
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        [&self.prefix[..], key].concat()
    }

    /// Runs one call on the current member within the deadline. A failure that points at the
    /// member sends the next call to the next one.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let i = self.current.load(Ordering::Relaxed) % self.members.len();
        match tokio::time::timeout(OP_TIMEOUT, f(self.members[i].client.clone())).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => {
                if member_fault(&status) {
                    self.next_member(i, &status.to_string());
                }
                // A txn that met a broken connection or a member without a leader may have
                // been applied all the same.
                let unknown = if member_fault(&status) {
                    unknown_outcome(what)
                } else {
                    ""
                };
                Err(self.origin.error(format_args!(
                    "{what}: {}{}{unknown}",
                    Self::status_reason(&status),
                    self.member_suffix(i)
                )))
            }
            Err(_) => {
                self.next_member(i, "no answer");
                Err(self.origin.error(format_args!(
                    "{what}: no answer within {} s{}{}",
                    OP_TIMEOUT.as_secs(),
                    self.member_suffix(i),
                    unknown_outcome(what)
                )))
            }
        }
    }

    fn next_member(&self, failed: usize, why: &str) {
        let n = self.members.len();
        if n > 1
            && self
                .current
                .compare_exchange(
                    failed,
                    (failed + 1) % n,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                failed = %self.members[failed].url,
                next = %self.members[(failed + 1) % n].url,
                why = %one_line(why),
                "etcd member failed; the next call goes to the next member"
            );
        }
    }

    fn member_suffix(&self, i: usize) -> String {
        if self.members.len() > 1 {
            format!(" (member {})", self.members[i].url)
        } else {
            String::new()
        }
    }

    fn status_reason(status: &Status) -> String {
        let msg = status.message();
        let reason = if msg.contains("too many operations in txn request") {
            "etcd refused the transaction: more ops than the server's --max-txn-ops (128 by default; see docs/storage.md)".to_string()
        } else if msg.contains("database space exceeded") {
            "etcd's database reached --quota-backend-bytes and refuses writes: compact, defragment and disarm the NOSPACE alarm (see docs/storage.md)".to_string()
        } else if msg.contains("request is too large") || msg.contains("larger than max") {
            format!(
                "etcd refused the request as too large ({msg}); raise the server's --max-request-bytes (1.5 MiB by default; see docs/storage.md)"
            )
        } else if status.code() == Code::Unavailable {
            // tonic's message for a failed connection is a summary of its source.
            use std::error::Error;
            let detail = status
                .source()
                .map_or_else(|| msg.to_string(), source_chain);
            format!("unavailable: {detail}")
        } else if status.code() == Code::DeadlineExceeded
            // tonic's own deadline (Endpoint::timeout) surfaces as Cancelled.
            || (status.code() == Code::Cancelled && msg.contains("Timeout expired"))
        {
            format!("no answer within {} s ({msg})", OP_TIMEOUT.as_secs())
        } else {
            format!("{:?}: {msg}{}", status.code(), source_suffix(status))
        };
        one_line(reason)
    }
}

/// A lazily connected channel to one member: it connects on its first call and reconnects after
/// a lost connection on the next one.
fn channel(origin: &Origin, url: &str) -> Result<Channel> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(origin.error("the URL must start with http:// or https://"));
    }
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| origin.error(format_args!("invalid URL: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        // The server is told the deadline too, so it drops work nobody waits for.
        .timeout(OP_TIMEOUT)
        // Pings while a call waits notice a dead peer (a partitioned server) before the
        // call's deadline, and the next call reconnects. Not while idle: etcd's gRPC server
        // permits no pings without a call in flight and closes the connection of a client
        // that keeps sending them; nor more often than its --grpc-keepalive-min-time (5 s).
        .http2_keep_alive_interval(Duration::from_secs(6))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(false);
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_native_roots())
            .map_err(|e| origin.error(format_args!("TLS setup: {e}")))?;
    }
    Ok(endpoint.connect_lazy())
}

/// Whether a failed call says more about the member than about the request: then another
/// member may do better.
fn member_fault(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

fn source_suffix(status: &Status) -> String {
    use std::error::Error;
    status
        .source()
        .map(|e| format!(" ({})", source_chain(e)))
        .unwrap_or_default()
}

fn compare(key: Vec<u8>, expected: Option<Vec<u8>>) -> pb::Compare {
    match expected {
        Some(value) => pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: key.into(),
            target_union: Some(TargetUnion::Value(value.into())),
        },
        None => pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Version as i32,
            key: key.into(),
            target_union: Some(TargetUnion::Version(0)),
        },
    }
}

#[async_trait]
impl MetaStore for EtcdMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        let req = pb::RangeRequest {
            key: self.key(key).into(),
            ..Default::default()
        };
        let resp = self
            .call("get", |mut c| async move { c.range(req).await })
            .await?;
        Ok(resp.kvs.into_iter().next().map(|kv| kv.value))
    }

    async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>> {
        // etcd reads an empty range_end as "this one key" and limit 0 as "no limit".
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let req = pb::RangeRequest {
            key: self.key(start).into(),
            range_end: self.key(end).into(),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let resp = self
            .call("scan", |mut c| async move { c.range(req).await })
            .await?;
        let n = self.prefix.len();
        Ok(resp
            .kvs
            .into_iter()
            .map(|kv| (kv.key[n..].to_vec(), kv.value))
            .collect())
    }

    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<bool> {
        let compare: Vec<pb::Compare> = checks
            .into_iter()
            .map(|c| compare(self.key(&c.key), c.value))
            .collect();
        // etcd refuses a txn that writes one key twice; applying the ops in order leaves each
        // key as its last op says, so only the last op per key is sent.
        let mut last: HashMap<Vec<u8>, usize> = HashMap::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let key = match op {
                Op::Put { key, .. } | Op::Delete { key } => key.clone(),
            };
            last.insert(key, i);
        }
        let success: Vec<pb::RequestOp> = ops
            .into_iter()
            .enumerate()
            .filter(|(i, op)| {
                let key = match op {
                    Op::Put { key, .. } | Op::Delete { key } => key,
                };
                last.get(key) == Some(i)
            })
            .map(|(_, op)| pb::RequestOp {
                request: Some(match op {
                    Op::Put { key, value } => Request::RequestPut(pb::PutRequest {
                        key: self.key(&key).into(),
                        value: value.into(),
                    }),
                    Op::Delete { key } => Request::RequestDeleteRange(pb::DeleteRangeRequest {
                        key: self.key(&key).into(),
                        range_end: Bytes::new(),
                    }),
                }),
            })
            .collect();
        let req = pb::TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        let resp = self
            .call("txn", |mut c| async move { c.txn(req).await })
            .await?;
        Ok(resp.succeeded)
    }
}
