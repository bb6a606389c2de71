//! The admin HTTP listener: health, Prometheus metrics and a small read-only JSON API, over
//! plain HTTP or, with `admin_tls`, HTTPS.
//!
//! Bound beyond loopback, every request but `GET /healthz` needs `Authorization: Bearer
//! <core_token>` (see [`crate::auth`]); on loopback it is open.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_core::{Core, CoreError};
use tributary_proto::v1;

use tributary_gateway_common::tls;

use crate::auth::Guard;

#[derive(Clone)]
pub struct AdminState {
    pub core: Core,
    pub ready: Arc<AtomicBool>,
    pub prometheus: PrometheusHandle,
}

/// The process-wide Prometheus recorder. The `metrics` facade has exactly one recorder per
/// process, so it is installed once and shared by every server started in it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("tributary_storage_fsync_seconds".into()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 1.0,
                    ],
                )
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, in which case ours sees nothing;
            // nothing in this binary installs one.
            if metrics::set_global_recorder(recorder).is_ok() {
                crate::metrics_catalog::register();
            }
            handle
        })
        .clone()
}

/// The admin routes; with a `guard`, every request but the health check needs its token.
pub fn router(state: AdminState, guard: Option<Arc<Guard>>) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/namespaces", get(namespaces))
        .route("/api/v1/streams", get(streams))
        .route("/api/v1/streams/{namespace}/{name}", get(stream))
        .route("/api/v1/groups", get(groups))
        .with_state(state);
    match guard {
        Some(guard) => router.layer(middleware::from_fn_with_state(guard, require_token)),
        None => router,
    }
}

/// `401` unless the request carries the token; the health check is always answered, so
/// load balancers and orchestrators need no secret.
async fn require_token(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let health = req.uri().path() == "/healthz"
        && matches!(
            *req.method(),
            axum::http::Method::GET | axum::http::Method::HEAD
        );
    if health {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    match guard.check(req.headers(), peer, req.uri().path()) {
        Ok(()) => next.run(req).await,
        Err(reason) => (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer")],
            Json(json!({
                "error": v1::ErrorCode::Unauthenticated.as_str_name(),
                "message": format!(
                    "the admin API beyond loopback requires `Authorization: Bearer <core_token>` ({})",
                    reason.as_str()
                ),
            })),
        )
            .into_response(),
    }
}

async fn healthz(State(s): State<AdminState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    s.prometheus.run_upkeep();
    let mut text = s.prometheus.render();
    text.push_str(&crate::metrics_units::render(&s.core).await);
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

fn error(e: CoreError) -> Response {
    let status = match e.code() {
        v1::ErrorCode::StreamNotFound
        | v1::ErrorCode::NamespaceNotFound
        | v1::ErrorCode::GroupNotFound => StatusCode::NOT_FOUND,
        v1::ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        Json(json!({ "error": e.code().as_str_name(), "message": e.to_string() })),
    )
        .into_response()
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

async fn namespaces(State(s): State<AdminState>) -> Response {
    let list: Vec<_> = s
        .core
        .list_namespaces()
        .into_iter()
        .map(|n| json!({ "name": n.name, "labels": n.labels, "created_at_ms": n.created_at_ms }))
        .collect();
    Json(json!({ "namespaces": list })).into_response()
}

async fn streams(State(s): State<AdminState>) -> Response {
    match s.core.list_all_streams().await {
        Ok(list) => Json(json!({ "streams": list.iter().map(stream_json).collect::<Vec<_>>() }))
            .into_response(),
        Err(e) => error(e),
    }
}

async fn stream(
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

#[derive(Deserialize)]
struct GroupQuery {
    namespace: Option<String>,
}

async fn groups(State(s): State<AdminState>, Query(q): Query<GroupQuery>) -> Response {
    match s
        .core
        .list_groups(q.namespace.as_deref().unwrap_or_default())
        .await
    {
        Ok(list) => Json(json!({
            "groups": list.iter().map(|g| json!({
                "namespace": g.namespace,
                "group": g.group,
                "state": g.state,
                "committed_partitions": g.committed_partitions,
            })).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

/// Serves the admin routes over TLS until `stop`. axum's `serve` speaks plain TCP only, so
/// the TLS connections come from [`tls::incoming`] and hyper serves each (HTTP/1.1 or h2, as
/// ALPN chose), with the peer address where the token check looks for it.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tls::TlsAcceptor,
    router: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use futures::StreamExt;
    let incoming = tls::incoming(listener, acceptor, TLS_HANDSHAKE, "admin-tls");
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let stream = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            next = incoming.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let peer = stream.get_ref().0.peer_addr().ok();
        let router = router.clone();
        let service = tower::ServiceExt::map_request(
            router,
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                if let Some(peer) = peer {
                    req.extensions_mut().insert(ConnectInfo(peer));
                }
                req
            },
        );
        tokio::spawn(async move {
            let served =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(service),
                    )
                    .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "admin HTTPS connection ended with an error");
            }
        });
    }
}

/// How long an admin HTTPS client has for its TLS handshake.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);
