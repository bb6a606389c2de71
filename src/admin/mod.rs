//! The admin HTTP listener: health, Prometheus metrics, a JSON API (read: streams, groups
//! with lag, queues and their messages, addresses and bindings, MQTT sessions, client
//! connections, users; write: purge and redrive a queue, kick a session, close a
//! connection) and the web console that uses it, over plain HTTP or,
//! with `admin_tls`, HTTPS.
//!
//! A cluster node serving shards serves a part of it ([`shards`]).
//!
//! Who may call what is [`auth`]'s: reads are open on loopback and need `Authorization:
//! Bearer <core_token>` beyond it; writes always need it.

mod api;
pub mod auth;
mod connections;
mod console;
mod overview;
pub mod shards;
mod write;

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{ConnectInfo, FromRef, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tributary_core::{Core, CoreError};
use tributary_proto::v1;

use tributary_gateway_common::{Connections, tls};

pub use auth::AdminAuth;

#[derive(Clone)]
pub struct AdminState {
    pub core: Core,
    pub ready: Arc<AtomicBool>,
    pub prometheus: PrometheusHandle,
    /// The configured users' names (the console lists them; credentials stay out).
    pub users: Arc<Vec<String>>,
    /// The client connections of this process's gateway listeners.
    pub connections: Arc<Connections>,
}

impl FromRef<AdminState> for Arc<Connections> {
    fn from_ref(s: &AdminState) -> Self {
        s.connections.clone()
    }
}

/// What a gateway process's admin listener serves from (split mode: no core in process).
#[derive(Clone)]
pub struct GatewayAdminState {
    pub ready: Arc<AtomicBool>,
    pub prometheus: PrometheusHandle,
    pub connections: Arc<Connections>,
}

impl FromRef<GatewayAdminState> for Arc<Connections> {
    fn from_ref(s: &GatewayAdminState) -> Self {
        s.connections.clone()
    }
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
                .set_buckets_for_metric(
                    Matcher::Suffix("_upload_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ],
                )
                .expect("bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full("tributary_storage_cold_read_seconds".into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
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

/// The admin routes, every request checked by `auth` first.
pub fn router(state: AdminState, auth: Arc<AdminAuth>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/overview", get(overview::overview))
        .route("/api/v1/namespaces", get(api::namespaces))
        .route("/api/v1/streams", get(api::streams))
        .route("/api/v1/streams/{namespace}/{name}", get(api::stream))
        .route("/api/v1/groups", get(api::groups))
        .route("/api/v1/queues", get(api::queues))
        .route("/api/v1/queues/{namespace}/{name}/messages", get(api::peek))
        .route(
            "/api/v1/queues/{namespace}/{name}/purge",
            post(write::purge),
        )
        .route(
            "/api/v1/queues/{namespace}/{name}/redrive",
            post(write::redrive),
        )
        .route("/api/v1/redrives", get(api::redrives))
        .route(
            "/api/v1/redrives/{task_id}/cancel",
            post(write::cancel_redrive),
        )
        .route("/api/v1/dead-letters", get(api::dead_letters))
        .route("/api/v1/addresses", get(api::addresses))
        .route("/api/v1/sessions", get(api::sessions))
        .route(
            "/api/v1/sessions/{namespace}/{client_id}/kick",
            post(write::kick),
        )
        .route("/api/v1/connections", get(connections::list))
        .route("/api/v1/connections/{id}/close", post(connections::close))
        .route("/api/v1/users", get(api::users))
        .merge(console::routes())
        .with_state(state)
        .layer(middleware::from_fn_with_state(auth, auth::require))
}

/// A gateway process's admin routes: health, its metrics, its connections; the same rule
/// as the core's (`auth`: writes always need the token).
pub fn gateway_router(state: GatewayAdminState, auth: Arc<AdminAuth>) -> Router {
    Router::new()
        .route("/healthz", get(gateway_healthz))
        .route("/metrics", get(gateway_metrics))
        .route("/api/v1/connections", get(connections::list))
        .route("/api/v1/connections/{id}/close", post(connections::close))
        .with_state(state)
        .layer(middleware::from_fn_with_state(auth, auth::require))
}

async fn gateway_healthz(State(s): State<GatewayAdminState>) -> Response {
    health(&s.ready)
}

/// The recorder's series only: the stream and queue gauges are the core's to serve.
async fn gateway_metrics(State(s): State<GatewayAdminState>) -> Response {
    s.prometheus.run_upkeep();
    let text = s.prometheus.render();
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

async fn healthz(State(s): State<AdminState>) -> Response {
    health(&s.ready)
}

fn health(ready: &AtomicBool) -> Response {
    if ready.load(Ordering::Acquire) {
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
        | v1::ErrorCode::GroupNotFound
        | v1::ErrorCode::QueueNotFound
        | v1::ErrorCode::AddressNotFound
        | v1::ErrorCode::SessionNotFound => StatusCode::NOT_FOUND,
        v1::ErrorCode::InvalidArgument | v1::ErrorCode::InvalidConfig => StatusCode::BAD_REQUEST,
        v1::ErrorCode::Conflict | v1::ErrorCode::ResourceLocked => StatusCode::CONFLICT,
        v1::ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        Json(json!({ "error": e.code().as_str_name(), "message": e.to_string() })),
    )
        .into_response()
}

/// Serves the admin routes over TLS until `stop`. axum's `serve` speaks plain TCP only, so
/// the TLS connections come from [`tls::incoming`] and hyper serves each (HTTP/1.1 or h2, as
/// ALPN chose), with the peer address where the token check looks for it.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tls::Acceptor,
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
