//! The admin listener of a cluster node serving shards (`cluster_shards`): its health, its
//! metrics (the process's recorder and the per-unit gauges of every shard core it holds),
//! and which node serves which shard and namespace. The rest of the admin API reads one
//! core; a node serving shards has one per shard, and what it does not hold another node
//! answers, so those routes are not served here (404) rather than answered from a part.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::{Router, middleware};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use tributary_core::Core;
use tributary_core::cluster::shard_cores::{ShardCores, shard_of};
use tributary_core::cluster::shard_router::ShardOwners;

use super::{AdminAuth, auth, health};

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
}

/// The routes, every request checked by `auth` first (reads beyond loopback need the token,
/// as on every admin listener).
pub fn router(state: ShardAdminState, auth: Arc<AdminAuth>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/cluster/shards", get(cluster_shards))
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
