//! The admin API's write endpoints: purge a queue, redrive a (dead-letter) queue, close an
//! MQTT session's connection. They run the same `Core` functions as the core's gRPC
//! `PurgeQueue`, `StartRedrive` and `KickSession`, in process.
//! [`super::auth`] lets them through only with the token.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::info;
use tributary_proto::v1;

use super::{AdminState, error};

pub(super) fn redrive_json(t: &v1::RedriveTask) -> Value {
    let source = t.source.clone().unwrap_or_default();
    json!({
        "task_id": t.task_id,
        "namespace": source.namespace,
        "source": source.name,
        "destination": t.destination,
        "destination_address": t.destination_address,
        "destination_key": t.destination_key,
        "status": t.status,
        "moved": t.moved,
        "to_move": t.to_move,
        "failure_reason": t.failure_reason,
        "started_at_ms": t.started_at_ms,
    })
}

/// Drops every ready and delayed message of the queue (leased ones stay with their
/// consumers, as in AMQP's queue.purge); answers how many went.
pub(super) async fn purge(
    State(s): State<AdminState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let id = v1::QueueId { namespace, name };
    match s.core.purge_queue(&id).await {
        Ok(purged) => {
            info!(namespace = %id.namespace, queue = %id.name, purged, "queue purged through the admin API");
            Json(json!({ "purged": purged })).into_response()
        }
        Err(e) => error(e),
    }
}

/// `POST .../redrive` body (all optional; an empty body is accepted).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RedriveBody {
    /// Empty or absent: each message back to the queue it was dead-lettered from.
    #[serde(default)]
    destination: String,
    /// 0 or absent: as fast as possible.
    #[serde(default)]
    max_messages_per_second: u32,
    /// Instead of a queue: an address (an AMQP exchange, a stream's address) each message
    /// is published to, with `destination_key` (absent: the key it was first published
    /// with).
    #[serde(default)]
    destination_address: String,
    #[serde(default)]
    destination_key: String,
}

/// Starts moving the queue's messages back to where they came from (or to `destination`);
/// answers `202` with the task, which `GET /api/v1/redrives` follows.
pub(super) async fn redrive(
    State(s): State<AdminState>,
    Path((namespace, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let body: RedriveBody = if body.iter().all(u8::is_ascii_whitespace) {
        RedriveBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({
                        "error": v1::ErrorCode::InvalidArgument.as_str_name(),
                        "message": format!("the body is not a redrive request ({{\"destination\": \"QUEUE\" or \"destination_address\": \"ADDRESS\" with \"destination_key\": \"KEY\", \"max_messages_per_second\": N}}, all optional): {e}"),
                    })),
                )
                    .into_response();
            }
        }
    };
    let source = v1::QueueId { namespace, name };
    let started = s
        .core
        .start_redrive(v1::StartRedriveRequest {
            source: Some(source.clone()),
            destination: body.destination,
            max_messages_per_second: body.max_messages_per_second,
            destination_address: body.destination_address,
            destination_key: body.destination_key,
        })
        .await;
    match started {
        Ok(task_id) => {
            info!(namespace = %source.namespace, queue = %source.name, task = %task_id, "redrive started through the admin API");
            let task = s
                .core
                .list_redrives(Some(&source))
                .into_iter()
                .find(|t| t.task_id == task_id);
            let body = match task {
                Some(t) => redrive_json(&t),
                None => json!({ "task_id": task_id }),
            };
            (StatusCode::ACCEPTED, Json(body)).into_response()
        }
        Err(e) => error(e),
    }
}

/// Cancels a redrive: what was moved stays moved, the rest stays in the source; answers
/// the task (CANCELLING until the message in hand is done).
pub(super) async fn cancel_redrive(
    State(s): State<AdminState>,
    Path(task_id): Path<String>,
) -> Response {
    match s.core.cancel_redrive(&task_id) {
        Ok(task) => {
            info!(task = %task_id, "redrive cancelled through the admin API");
            Json(redrive_json(&task)).into_response()
        }
        Err(e) => error(e),
    }
}

/// Closes an MQTT session's connection (the session stays as its expiry says); answers
/// whether a connection was attached.
pub(super) async fn kick(
    State(s): State<AdminState>,
    Path((namespace, client_id)): Path<(String, String)>,
) -> Response {
    match s.core.kick_session(&namespace, &client_id) {
        Ok(was_connected) => {
            info!(%namespace, client = %client_id, was_connected, "session kicked through the admin API");
            Json(json!({ "was_connected": was_connected })).into_response()
        }
        Err(e) => error(e),
    }
}
