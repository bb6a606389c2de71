//! The admin API's read endpoints: streams, consumer groups with lag, queues and a peek at
//! their messages, router addresses and bindings, MQTT sessions and users. JSON in the
//! shapes the README's table gives; the console is their first client.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_core::inspect::PeekedMessage;
use tributary_proto::v1;

use super::{AdminState, error};

/// `?namespace=NS`: one namespace; absent, every namespace.
#[derive(Deserialize)]
pub(super) struct NamespaceQuery {
    namespace: Option<String>,
}

impl NamespaceQuery {
    /// Namespace `ns` only.
    pub(super) fn one(ns: String) -> Self {
        Self {
            namespace: Some(ns),
        }
    }

    fn namespaces(&self, s: &AdminState) -> Vec<String> {
        match &self.namespace {
            Some(ns) => vec![ns.clone()],
            None => s
                .core
                .list_namespaces()
                .into_iter()
                .map(|n| n.name)
                .collect(),
        }
    }
}

/// Every namespace of the deployment (a shard's core reads them from the catalog).
pub(super) async fn namespaces(State(s): State<AdminState>) -> Response {
    let list = match s.core.list_all_namespaces().await {
        Ok(list) => list,
        Err(e) => return error(e),
    };
    let list: Vec<_> = list
        .into_iter()
        .map(|n| json!({ "name": n.name, "labels": n.labels, "created_at_ms": n.created_at_ms }))
        .collect();
    Json(json!({ "namespaces": list })).into_response()
}

fn stream_json(s: &v1::StreamInfo) -> Value {
    let id = s.id.clone().unwrap_or_default();
    let c = s.config.clone().unwrap_or_default();
    json!({
        "namespace": id.namespace,
        "name": id.name,
        "uuid": s.uuid,
        "partitions": s.partitions,
        "created_at_ms": s.created_at_ms,
        "config": {
            "retention_ms": c.retention_ms,
            "retention_bytes": c.retention_bytes,
            "max_message_bytes": c.max_message_bytes,
            "cleanup_policy": c.cleanup_policy,
            "extra": c.extra,
        },
        "partition_info": s.partition_info.iter().map(|p| json!({
            "partition": p.partition,
            "start_offset": p.start_offset,
            "end_offset": p.end_offset,
            "size_bytes": p.size_bytes,
        })).collect::<Vec<_>>(),
    })
}

pub(super) async fn streams(State(s): State<AdminState>) -> Response {
    match s.core.list_all_streams().await {
        Ok(list) => Json(json!({ "streams": list.iter().map(stream_json).collect::<Vec<_>>() }))
            .into_response(),
        Err(e) => error(e),
    }
}

pub(super) async fn stream(
    State(s): State<AdminState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    match s
        .core
        .describe_stream(&v1::StreamId::new(namespace, name))
        .await
    {
        Ok(info) => Json(stream_json(&info)).into_response(),
        Err(e) => error(e),
    }
}

/// Groups with their committed offsets and lag: per partition, the stream's end offset
/// minus the committed offset (Kafka commits the next offset to read; nothing committed:
/// the log start), never below 0 (`Core::group_lags`). A partition whose stream is gone has
/// no lag (`null`).
pub(super) async fn groups(
    State(s): State<AdminState>,
    Query(q): Query<NamespaceQuery>,
) -> Response {
    let mut out = Vec::new();
    for ns in q.namespaces(&s) {
        let groups = match s.core.group_lags(&ns).await {
            Ok(groups) => groups,
            Err(e) => return error(e),
        };
        for (g, lags) in groups {
            let total_lag: i64 = lags.iter().filter_map(|l| l.lag).sum();
            let offsets: Vec<Value> = lags
                .iter()
                .map(|l| {
                    json!({
                        "stream": l.stream,
                        "partition": l.partition,
                        "committed_offset": l.committed,
                        "end_offset": l.end,
                        "lag": l.lag,
                        "commit_time_ms": l.commit_time_ms,
                    })
                })
                .collect();
            out.push(json!({
                "namespace": g.namespace,
                "group": g.group,
                "state": g.state,
                "protocol_type": g.protocol_type,
                "committed_partitions": g.committed_partitions,
                "lag": total_lag,
                "offsets": offsets,
            }));
        }
    }
    Json(json!({ "groups": out })).into_response()
}

/// Queues with their depth (ready), in flight (leased), delayed, consumers, their
/// dead-letter target and how many dead letters wait there.
pub(super) async fn queues(
    State(s): State<AdminState>,
    Query(q): Query<NamespaceQuery>,
) -> Response {
    let mut out = Vec::new();
    for ns in q.namespaces(&s) {
        let list = match s.core.list_queues(&ns).await {
            Ok(list) => list,
            Err(e) => return error(e),
        };
        let depth: BTreeMap<&str, i64> = list
            .iter()
            .filter_map(|q| Some((q.id.as_ref()?.name.as_str(), q.messages_ready)))
            .collect();
        // The queues each queue's dead letters land in: a named queue, or the queues bound
        // to its dead-letter address (an AMQP dead-letter exchange; every queue bound to it,
        // as which of them a dead letter reaches depends on its routing key).
        let dlqs_of = |c: &v1::QueueConfig| -> Vec<String> {
            if let Some(q) = c.dead_letter_queue.as_ref().filter(|q| !q.is_empty()) {
                return vec![q.clone()];
            }
            let Some(address) = c.dead_letter_address.as_ref() else {
                return Vec::new();
            };
            let mut names: Vec<String> = s
                .core
                .list_bindings(&ns, address)
                .into_iter()
                .filter_map(|b| match b.destination {
                    Some(v1::binding::Destination::Queue(q)) => Some(q),
                    _ => None,
                })
                .collect();
            names.sort();
            names.dedup();
            names
        };
        let targets: Vec<Vec<String>> = list
            .iter()
            .map(|q| dlqs_of(&q.config.clone().unwrap_or_default()))
            .collect();
        for (info, dlqs) in list.iter().zip(&targets) {
            let id = info.id.clone().unwrap_or_default();
            let c = info.config.clone().unwrap_or_default();
            let is_dlq = targets
                .iter()
                .zip(&list)
                .any(|(t, other)| other.id != info.id && t.contains(&id.name));
            let dead_letters: i64 = dlqs.iter().filter_map(|q| depth.get(q.as_str())).sum();
            out.push(json!({
                "namespace": id.namespace,
                "name": id.name,
                "durable": info.durable,
                "exclusive": info.exclusive,
                "auto_delete": info.auto_delete,
                "ready": info.messages_ready,
                "leased": info.messages_leased,
                "delayed": info.messages_delayed,
                "consumers": info.consumers,
                "created_at_ms": info.created_at_ms,
                "dead_letter_queues": dlqs,
                "dead_letters": dead_letters,
                "is_dead_letter_queue": is_dlq,
                "config": {
                    "dead_letter_queue": c.dead_letter_queue,
                    "dead_letter_address": c.dead_letter_address,
                    "dead_letter_routing_key": c.dead_letter_routing_key,
                    "max_length": c.max_length,
                    "message_ttl_ms": c.message_ttl_ms,
                    "max_delivery_count": c.max_delivery_count,
                    "fifo": c.fifo,
                },
            }));
        }
    }
    Json(json!({ "queues": out })).into_response()
}

#[derive(Deserialize)]
pub(super) struct PeekQuery {
    pub(super) max: Option<usize>,
}

/// Most messages one peek returns.
const MAX_PEEK: usize = 100;

/// Up to `?max=` (default 20, at most 100) messages of a queue from its head, leased by
/// nobody: browsing never changes a message's state or delivery count.
pub(super) async fn peek(
    State(s): State<AdminState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<PeekQuery>,
) -> Response {
    let id = v1::QueueId { namespace, name };
    let max = q.max.unwrap_or(20).clamp(1, MAX_PEEK);
    match s.core.peek_queue(&id, max).await {
        Ok(list) => Json(json!({ "messages": list.iter().map(peeked_json).collect::<Vec<_>>() }))
            .into_response(),
        Err(e) => error(e),
    }
}

#[derive(Deserialize)]
pub(super) struct DeadLetterQuery {
    pub(super) namespace: Option<String>,
    pub(super) max: Option<usize>,
}

/// The dead letters of every queue (of `?namespace=`), whatever protocol sent them and
/// whichever dead-lettered them: up to `?max=` (default 20, at most 100) messages from each
/// queue's head that carry a dead-letter reason, with where they came from and how often
/// they were delivered there. Browsing leases nothing. Redrive with
/// `POST /api/v1/queues/{namespace}/{name}/redrive`.
pub(super) async fn dead_letters(
    State(s): State<AdminState>,
    Query(q): Query<DeadLetterQuery>,
) -> Response {
    let max = q.max.unwrap_or(20).clamp(1, MAX_PEEK);
    let namespaces = NamespaceQuery {
        namespace: q.namespace,
    }
    .namespaces(&s);
    let mut out = Vec::new();
    for ns in namespaces {
        let list = match s.core.list_queues(&ns).await {
            Ok(list) => list,
            Err(e) => return error(e),
        };
        for info in list {
            let Some(id) = info.id else { continue };
            let peeked = match s.core.peek_queue(&id, max).await {
                Ok(p) => p,
                // Deleted meanwhile.
                Err(_) => continue,
            };
            let dead: Vec<Value> = peeked
                .iter()
                .filter(|m| {
                    m.record
                        .properties
                        .as_ref()
                        .is_some_and(|p| !p.dead_letter_reason.is_empty())
                })
                .map(peeked_json)
                .collect();
            if dead.is_empty() {
                continue;
            }
            out.push(json!({
                "namespace": id.namespace,
                "queue": id.name,
                "ready": info.messages_ready,
                "messages": dead,
            }));
        }
    }
    Json(json!({ "dead_letters": out })).into_response()
}

/// Bytes as text when they are UTF-8, else base64 (with `"encoding": "base64"` beside).
fn bytes_json(b: &[u8]) -> (Value, &'static str) {
    match std::str::from_utf8(b) {
        Ok(t) => (json!(t), "utf-8"),
        Err(_) => (
            json!(base64::engine::general_purpose::STANDARD.encode(b)),
            "base64",
        ),
    }
}

fn peeked_json(m: &PeekedMessage) -> Value {
    let r = &m.record;
    let p = r.properties.clone().unwrap_or_default();
    let (value, encoding) = bytes_json(&r.value);
    let (key, key_encoding) = bytes_json(&r.key);
    json!({
        "offset": m.offset,
        "state": m.state,
        "delivery_count": m.delivery_count,
        "timestamp_ms": r.timestamp_ms,
        "key": key,
        "key_encoding": key_encoding,
        "value": value,
        "value_encoding": encoding,
        "size_bytes": r.value.len(),
        "headers": r.headers.iter().map(|h| {
            let (v, enc) = bytes_json(&h.value);
            json!({ "name": h.name, "value": v, "encoding": enc })
        }).collect::<Vec<_>>(),
        "properties": {
            "message_id": p.message_id,
            "content_type": p.content_type,
            "routing_key": p.address,
            "publish_address": p.publish_address,
            "origin_protocol": p.origin_protocol,
            "priority": p.priority,
            "dead_letter_reason": p.dead_letter_reason,
            "dead_letter_queue": p.dead_letter_queue,
            "dead_lettered_at_ms": p.dead_lettered_at_ms,
            "dead_letter_delivery_count": p.dead_letter_delivery_count,
            "dead_letter_original_address": p.dead_letter_original_address,
            "dead_letter_original_key": p.dead_letter_original_key,
        },
    })
}

/// Router addresses (AMQP exchanges, MQTT topic trees) with their bindings.
pub(super) async fn addresses(
    State(s): State<AdminState>,
    Query(q): Query<NamespaceQuery>,
) -> Response {
    let mut out = Vec::new();
    for ns in q.namespaces(&s) {
        let bindings = s.core.list_bindings(&ns, "");
        for a in s.core.list_addresses(&ns) {
            let own: Vec<Value> = bindings
                .iter()
                .filter(|b| b.source_address == a.name)
                .map(|b| {
                    let (kind, target) = match &b.destination {
                        Some(v1::binding::Destination::Queue(q)) => ("queue", q.as_str()),
                        Some(v1::binding::Destination::Stream(s)) => ("stream", s.as_str()),
                        Some(v1::binding::Destination::Address(a)) => ("address", a.as_str()),
                        None => ("none", ""),
                    };
                    json!({
                        "destination_kind": kind,
                        "destination": target,
                        "pattern": b.pattern,
                        "arguments": b.arguments.iter().map(|h| {
                            (h.name.clone(), bytes_json(&h.value).0)
                        }).collect::<serde_json::Map<_, _>>(),
                    })
                })
                .collect();
            out.push(json!({
                "namespace": a.namespace,
                "name": a.name,
                "kind": a.kind.as_str_name().to_ascii_lowercase(),
                "durable": a.durable,
                "auto_delete": a.auto_delete,
                "internal": a.internal,
                "arguments": a.arguments.into_iter().collect::<BTreeMap<_, _>>(),
                "bindings": own,
            }));
        }
    }
    Json(json!({ "addresses": out })).into_response()
}

/// MQTT sessions with their subscriptions and queued messages.
pub(super) async fn sessions(State(s): State<AdminState>) -> Response {
    let list: Vec<Value> = s
        .core
        .list_sessions()
        .into_iter()
        .map(|x| {
            json!({
                "namespace": x.namespace,
                "client_id": x.client_id,
                "connected": x.connected,
                "expiry_ms": x.expiry_ms,
                "inflight": x.inflight,
                "queued": x.queued,
                "subscriptions": x.subscriptions.iter().map(|s| json!({
                    "filter": s.filter,
                    "qos": s.qos,
                    "no_local": s.no_local,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "sessions": list })).into_response()
}

/// The users of the configuration, by name only: credentials never leave the server.
/// The config file's users and the core's (names, credential kinds and namespaces: never
/// the credentials).
pub(super) async fn users(State(s): State<AdminState>) -> Response {
    let stored = match s.core.list_users(0, false).await {
        Ok((_, users)) => users.unwrap_or_default(),
        Err(e) => return error(e),
    };
    let mut list: Vec<Value> = s
        .users
        .iter()
        .map(|u| json!({ "name": u, "source": "config" }))
        .collect();
    list.extend(
        stored
            .iter()
            .filter(|u| !s.users.contains(&u.name))
            .map(|u| {
                json!({
                    "name": u.name,
                    "source": "core",
                    "mechanisms": u.mechanisms,
                    "namespaces": u.namespaces,
                })
            }),
    );
    Json(json!({ "users": list })).into_response()
}

pub(super) async fn redrives(State(s): State<AdminState>) -> Response {
    let list: Vec<Value> = s
        .core
        .list_redrives(None)
        .iter()
        .map(super::write::redrive_json)
        .collect();
    Json(json!({ "redrives": list })).into_response()
}
