//! The admin listener of a cluster node serving shards (`cluster_shards`): its health, its
//! metrics (the process's recorder and the per-unit gauges of every shard core it holds),
//! which node serves which shard and namespace, and the admin API's reads over what this
//! node holds.
//!
//! The read routes run the one-core handlers of [`super::api`] over this node's shard cores.
//! A call about one namespace (`?namespace=NS`, or a path naming it) goes to the core of the
//! namespace's home shard, or is answered 503 naming the node serving it; one about every
//! namespace joins the answers for the namespaces homed here (and, for streams and
//! sessions, everything each core holds). So each node answers for its share, and the
//! deployment's whole view is the nodes' answers together. Writes, the console, the overview
//! and client connections (a core node has none) are not served here (404).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::{Router, middleware};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use tributary_core::Core;
use tributary_core::cluster::shard_cores::{ShardCores, shard_of};
use tributary_core::cluster::shard_router::ShardOwners;

use super::api::{self, DeadLetterQuery, NamespaceQuery, PeekQuery};
use super::{AdminAuth, AdminState, auth, health};

#[derive(Clone)]
pub struct ShardAdminState {
    /// This node's name (`cluster_node`).
    pub node: String,
    /// The deployment's shard count.
    pub shards: u32,
    pub cores: Arc<ShardCores>,
    pub owners: ShardOwners,
    pub ready: Arc<AtomicBool>,
    pub prometheus: PrometheusHandle,
    /// The configured users' names.
    pub users: Arc<Vec<String>>,
}

impl ShardAdminState {
    /// Each shard core this node holds, with the namespaces that belong to its shard (a
    /// shard's core also keeps the `default` record every core makes; only the core of
    /// `default`'s shard speaks for it).
    fn held(&self) -> Vec<(u32, Core, Vec<String>)> {
        self.cores
            .shards()
            .into_iter()
            .filter_map(|shard| {
                let core = self.cores.core(shard)?;
                let namespaces = core
                    .list_namespaces()
                    .into_iter()
                    .map(|n| n.name)
                    .filter(|ns| shard_of(ns, self.shards) == shard)
                    .collect();
                Some((shard, core, namespaces))
            })
            .collect()
    }

    /// The one-core handlers' state over one of this node's shard cores.
    fn over(&self, core: Core) -> AdminState {
        AdminState {
            core,
            ready: self.ready.clone(),
            prometheus: self.prometheus.clone(),
            users: self.users.clone(),
            connections: Arc::default(),
        }
    }

    /// The core holding shard `shard` here, or where it is.
    fn serving(&self, shard: u32, what: &str) -> Result<Core, NotServedHere> {
        self.cores.core(shard).ok_or_else(|| {
            let owner = (self.owners)(shard);
            NotServedHere {
                message: format!(
                    "{what} is in shard {shard}, which node {} serves, not this one ({})",
                    owner.as_deref().unwrap_or("(none right now)"),
                    self.node
                ),
                shard,
                owner,
            }
        })
    }

    /// Namespace `ns`'s home core (its own queues, groups, addresses, sessions).
    fn home(&self, ns: &str) -> Result<Core, NotServedHere> {
        self.serving(shard_of(ns, self.shards), &format!("namespace '{ns}'"))
    }

    /// A one-core read asked of `ns`'s home, or of every namespace homed here with the
    /// answers' `key` lists joined.
    async fn per_namespace<F, Fut>(&self, ns: Option<String>, key: &str, read: F) -> Response
    where
        F: Fn(AdminState, String) -> Fut,
        Fut: std::future::Future<Output = Response>,
    {
        if let Some(ns) = ns {
            // As the core reads it: no name is the default namespace.
            let ns = if ns.is_empty() { "default".into() } else { ns };
            return match self.home(&ns) {
                Ok(core) => read(self.over(core), ns).await,
                Err(refused) => refused.into_response(),
            };
        }
        let mut reads = Vec::new();
        for (_, core, namespaces) in self.held() {
            for ns in namespaces {
                reads.push(read(self.over(core.clone()), ns));
            }
        }
        joined(key, reads).await
    }

    /// A one-core read asked of every core here, the answers' `key` lists joined.
    async fn per_core<F, Fut>(&self, key: &str, read: F) -> Response
    where
        F: Fn(AdminState) -> Fut,
        Fut: std::future::Future<Output = Response>,
    {
        let reads = self
            .held()
            .into_iter()
            .map(|(_, core, _)| read(self.over(core)))
            .collect();
        joined(key, reads).await
    }
}

/// A call about something another node holds: answered 503 naming that node.
struct NotServedHere {
    message: String,
    shard: u32,
    owner: Option<String>,
}

impl IntoResponse for NotServedHere {
    fn into_response(self) -> Response {
        let body = json!({
            "error": "NOT_SERVED_HERE",
            "message": self.message,
            "shard": self.shard,
            "owner": self.owner,
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Runs `reads` one after the other and joins their answers' `key` lists; the first answer
/// that is not a success is the answer.
async fn joined<Fut>(key: &str, reads: Vec<Fut>) -> Response
where
    Fut: std::future::Future<Output = Response>,
{
    let mut all = Vec::new();
    for read in reads {
        let answer = read.await;
        if !answer.status().is_success() {
            return answer;
        }
        // The handlers answer small JSON documents; 64 MiB bounds a pathological one.
        let body = match axum::body::to_bytes(answer.into_body(), 64 << 20).await {
            Ok(body) => body,
            Err(e) => return internal(format!("reading a shard's answer: {e}")),
        };
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(mut v) => {
                if let Some(list) = v.get_mut(key).and_then(|l| l.as_array_mut()) {
                    all.append(list);
                }
            }
            Err(e) => return internal(format!("a shard's answer is not JSON: {e}")),
        }
    }
    Json(json!({ key: all })).into_response()
}

fn internal(message: String) -> Response {
    let body = json!({ "error": "INTERNAL", "message": message });
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}

/// The routes, every request checked by `auth` first (reads beyond loopback need the token,
/// as on every admin listener).
pub fn router(state: ShardAdminState, auth: Arc<AdminAuth>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/cluster/shards", get(cluster_shards))
        .route("/api/v1/namespaces", get(namespaces))
        .route("/api/v1/streams", get(streams))
        .route("/api/v1/streams/{namespace}/{name}", get(stream))
        .route("/api/v1/groups", get(groups))
        .route("/api/v1/queues", get(queues))
        .route("/api/v1/queues/{namespace}/{name}/messages", get(peek))
        .route("/api/v1/dead-letters", get(dead_letters))
        .route("/api/v1/addresses", get(addresses))
        .route("/api/v1/sessions", get(sessions))
        .route("/api/v1/redrives", get(redrives))
        .route("/api/v1/users", get(users))
        .with_state(state)
        .layer(middleware::from_fn_with_state(auth, auth::require))
}

async fn healthz(State(s): State<ShardAdminState>) -> Response {
    health(&s.ready)
}

async fn metrics_text(State(s): State<ShardAdminState>) -> Response {
    s.prometheus.run_upkeep();
    let mut text = s.prometheus.render();
    let units: Vec<(Core, Vec<String>)> = s
        .held()
        .into_iter()
        .map(|(_, core, namespaces)| (core, namespaces))
        .collect();
    text.push_str(&crate::metrics_units::render_units(&units).await);
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

#[derive(Debug, Deserialize)]
struct ShardsQuery {
    /// Also say which shard this namespace is in and who serves it.
    namespace: Option<String>,
}

/// This node's view of the cluster: the shards it serves with their namespaces, the owner of
/// every shard as it last read the shard keys, and (asked with `?namespace=NS`) where one
/// namespace is served: how a script finds the node to stop or cut without computing the
/// shard function itself.
async fn cluster_shards(
    State(s): State<ShardAdminState>,
    Query(q): Query<ShardsQuery>,
) -> Response {
    let served: Vec<_> = s
        .held()
        .into_iter()
        .map(|(shard, _, namespaces)| json!({ "shard": shard, "namespaces": namespaces }))
        .collect();
    let owners: Vec<_> = (0..s.shards)
        .map(|shard| json!({ "shard": shard, "owner": (s.owners)(shard) }))
        .collect();
    let mut body = json!({
        "node": s.node,
        "shards": s.shards,
        "served": served,
        "owners": owners,
    });
    if let Some(ns) = q.namespace {
        let shard = shard_of(&ns, s.shards);
        body["namespace"] = json!({
            "name": ns,
            "shard": shard,
            "owner": (s.owners)(shard),
            "served_here": s.cores.core(shard).is_some(),
        });
    }
    Json(body).into_response()
}

/// Every namespace of the deployment (the catalog), whichever node is asked.
async fn namespaces(State(s): State<ShardAdminState>) -> Response {
    let Some((_, core, _)) = s.held().into_iter().next() else {
        let body =
            json!({ "error": "NOT_SERVED_HERE", "message": "this node serves no shard yet" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    };
    api::namespaces(State(s.over(core))).await
}

/// The streams this node holds.
async fn streams(State(s): State<ShardAdminState>) -> Response {
    s.per_core("streams", |st| api::streams(State(st))).await
}

/// One stream, from the node holding it.
async fn stream(
    State(s): State<ShardAdminState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let scheme = s.cores.scheme();
    let unit = tributary_proto::placement::stream_unit(&name);
    let shard =
        tributary_proto::placement::shard_of_unit(scheme, &namespace, Some(&unit), s.shards);
    match s.serving(shard, &format!("stream '{namespace}/{name}'")) {
        Ok(core) => api::stream(State(s.over(core)), Path((namespace, name))).await,
        Err(refused) => refused.into_response(),
    }
}

/// Groups with their lag, at their namespaces' homes. Under the stream scheme a topic held by
/// another shard has no lag here (`null`).
async fn groups(State(s): State<ShardAdminState>, Query(q): Query<NsQuery>) -> Response {
    s.per_namespace(q.namespace, "groups", |st, ns| {
        api::groups(State(st), Query(NamespaceQuery::one(ns)))
    })
    .await
}

async fn queues(State(s): State<ShardAdminState>, Query(q): Query<NsQuery>) -> Response {
    s.per_namespace(q.namespace, "queues", |st, ns| {
        api::queues(State(st), Query(NamespaceQuery::one(ns)))
    })
    .await
}

async fn addresses(State(s): State<ShardAdminState>, Query(q): Query<NsQuery>) -> Response {
    s.per_namespace(q.namespace, "addresses", |st, ns| {
        api::addresses(State(st), Query(NamespaceQuery::one(ns)))
    })
    .await
}

async fn dead_letters(
    State(s): State<ShardAdminState>,
    Query(q): Query<DeadLetterQuery>,
) -> Response {
    let max = q.max;
    s.per_namespace(q.namespace, "dead_letters", |st, ns| {
        api::dead_letters(
            State(st),
            Query(DeadLetterQuery {
                namespace: Some(ns),
                max,
            }),
        )
    })
    .await
}

async fn peek(
    State(s): State<ShardAdminState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<PeekQuery>,
) -> Response {
    match s.home(&namespace) {
        Ok(core) => api::peek(State(s.over(core)), Path((namespace, name)), Query(q)).await,
        Err(refused) => refused.into_response(),
    }
}

/// The MQTT sessions this node holds.
async fn sessions(State(s): State<ShardAdminState>) -> Response {
    s.per_core("sessions", |st| api::sessions(State(st))).await
}

/// The redrives running on this node's cores.
async fn redrives(State(s): State<ShardAdminState>) -> Response {
    s.per_core("redrives", |st| api::redrives(State(st))).await
}

/// The core's users, kept by the home shard (the empty namespace's).
async fn users(State(s): State<ShardAdminState>) -> Response {
    match s.serving(shard_of("", s.shards), "the users") {
        Ok(core) => api::users(State(s.over(core))).await,
        Err(refused) => refused.into_response(),
    }
}

/// `?namespace=NS`.
#[derive(Debug, Deserialize)]
struct NsQuery {
    namespace: Option<String>,
}
