//! The connections endpoints: the live client connections of this process's gateway
//! listeners, and closing one. Served by the core's admin listener in standalone mode and
//! by a gateway process's own admin listener in split mode (the connections are where the
//! gateway runs, not in the core).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;
use tributary_gateway_common::Connections;
use tributary_gateway_common::connections::CloseError;

/// How long a close waits for the connection to end before it answers: the protocols'
/// goodbyes take a round trip, and the accept loop cuts a connection its drain timeout
/// (2 s) after the close; past this the answer says `"ended": false`.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// `GET /api/v1/connections`: every open client connection, oldest first.
pub(super) async fn list(State(connections): State<Arc<Connections>>) -> Response {
    Json(json!({ "connections": connections.list() })).into_response()
}

/// `POST /api/v1/connections/{id}/close`: asks the connection's gateway to close it the
/// way its protocol's brokers do, and answers once it has ended (or `CLOSE_WAIT` passed).
pub(super) async fn close(
    State(connections): State<Arc<Connections>>,
    Path(id): Path<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "error": "INVALID_ARGUMENT",
                "message": format!("a connection id is a number, as GET /api/v1/connections lists it, not {id:?}"),
            })),
        )
            .into_response();
    };
    let by = match peer {
        Some(Extension(ConnectInfo(peer))) => format!("admin API from {peer}"),
        None => "admin API".to_string(),
    };
    match connections.close(id, &by) {
        Ok(closing) => {
            let ended = closing.ended(CLOSE_WAIT).await;
            Json(json!({ "id": id, "ended": ended, "connection": closing.info })).into_response()
        }
        Err(e @ CloseError::NotFound(_)) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "CONNECTION_NOT_FOUND", "message": e.to_string() })),
        )
            .into_response(),
    }
}
