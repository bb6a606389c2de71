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
//! The client is tonic over a minimal `.proto` of our own (proto/etcd/kv.proto), compiled
//! without a system protoc.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::remote::{
    CONNECT_TIMEOUT, OP_TIMEOUT, Origin, check_namespace, one_line, unknown_outcome,
};
use crate::{Check, MetaStore, Op, Result, StorageError};

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
    client: KvClient<Channel>,
    prefix: Vec<u8>,
    origin: Origin,
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
    /// Connects to the etcd endpoint at `url` (`http://host:2379`, or `https://` with the
    /// system's root certificates) and checks that it answers a read, within about 5 s.
    /// Keys go under `namespace/`.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        check_namespace("etcd", namespace)?;
        let origin = Origin::new("etcd", url);
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
        let channel = origin
            .deadline("connect", CONNECT_TIMEOUT, async {
                endpoint
                    .connect()
                    .await
                    .map_err(|e| origin.error(format_args!("cannot connect: {}", source_chain(&e))))
            })
            .await?;
        let client = KvClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut prefix = namespace.as_bytes().to_vec();
        prefix.push(b'/');
        let store = Self {
            client,
            prefix,
            origin,
        };
        // A TCP listener is not yet an etcd: one linearizable read proves the server speaks the
        // KV API and has a leader.
        store
            .origin
            .deadline("connect", CONNECT_TIMEOUT, async {
                store
                    .get_one(b"")
                    .await
                    .map_err(|s| store.status_error("does not answer as an etcd v3 server", &s))
            })
            .await?;
        tracing::info!(url = %store.origin.url, namespace, "connected to etcd");
        Ok(store)
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        [&self.prefix[..], key].concat()
    }

    /// One key (relative to the namespace), by a linearizable Range.
    async fn get_one(&self, key: &[u8]) -> Result<Option<Bytes>, Status> {
        let req = pb::RangeRequest {
            key: self.key(key).into(),
            ..Default::default()
        };
        let kvs = self.client.clone().range(req).await?.into_inner().kvs;
        Ok(kvs.into_iter().next().map(|kv| kv.value))
    }

    fn status_error(&self, what: &str, status: &Status) -> StorageError {
        let msg = status.message();
        let reason = if msg.contains("too many operations in txn request") {
            "etcd refused the transaction: more ops than the server's --max-txn-ops (128 by default; see docs/storage.md)".to_string()
        } else if msg.contains("request is too large") || status.code() == Code::ResourceExhausted {
            format!(
                "etcd refused the request as too large ({msg}); raise the server's --max-request-bytes (1.5 MiB by default; see docs/storage.md)"
            )
        } else if status.code() == Code::Unavailable {
            format!("unavailable: {msg}{}", source_suffix(status))
        } else if status.code() == Code::DeadlineExceeded
            // tonic's own deadline (Endpoint::timeout) surfaces as Cancelled.
            || (status.code() == Code::Cancelled && msg.contains("Timeout expired"))
        {
            format!(
                "no answer within {} s ({msg}){}",
                OP_TIMEOUT.as_secs(),
                unknown_outcome(what)
            )
        } else {
            format!("{:?}: {msg}{}", status.code(), source_suffix(status))
        };
        self.origin
            .error(format_args!("{what}: {}", one_line(reason)))
    }
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
        self.origin
            .deadline("get", OP_TIMEOUT, async {
                self.get_one(key)
                    .await
                    .map_err(|s| self.status_error("get", &s))
            })
            .await
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
        let mut client = self.client.clone();
        let resp = self
            .origin
            .deadline("scan", OP_TIMEOUT, async {
                client
                    .range(req)
                    .await
                    .map_err(|s| self.status_error("scan", &s))
            })
            .await?
            .into_inner();
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
        let mut client = self.client.clone();
        let resp = self
            .origin
            .deadline("txn", OP_TIMEOUT, async {
                client
                    .txn(req)
                    .await
                    .map_err(|s| self.status_error("txn", &s))
            })
            .await?;
        Ok(resp.into_inner().succeeded)
    }
}
