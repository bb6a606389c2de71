//! `tributary sessions ...`.

use serde_json::json;
use tributary_proto::v1;

use super::table::Table;
use super::{CliError, Ctx, Output, SessionsCommand};

pub async fn run(ctx: &Ctx, command: SessionsCommand) -> Result<Output, CliError> {
    let mut admin = ctx.client.admin.clone();
    match command {
        SessionsCommand::List(common) => {
            let sessions = admin
                .list_sessions(v1::ListSessionsRequest {
                    namespace: common.namespace.clone(),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .sessions;
            let mut table = Table::new(&[
                "CLIENT",
                "CONNECTED",
                "EXPIRY MS",
                "SUBSCRIPTIONS",
                "IN FLIGHT",
                "QUEUED",
            ]);
            for s in &sessions {
                table.row(vec![
                    s.client_id.clone(),
                    s.connected.to_string(),
                    s.expiry_ms.to_string(),
                    s.subscriptions
                        .iter()
                        .map(|f| format!("{} (QoS {})", f.filter, f.qos))
                        .collect::<Vec<_>>()
                        .join(", "),
                    s.inflight.to_string(),
                    s.queued.to_string(),
                ]);
            }
            let json = json!({ "sessions": sessions.iter().map(|s| json!({
                "namespace": s.namespace,
                "client_id": s.client_id,
                "connected": s.connected,
                "expiry_ms": s.expiry_ms,
                "subscriptions": s.subscriptions.iter().map(|f| json!({"filter": f.filter, "qos": f.qos})).collect::<Vec<_>>(),
                "inflight": s.inflight,
                "queued": s.queued,
            })).collect::<Vec<_>>() });
            Ok(Output { table, json })
        }
        SessionsCommand::Kick { client_id, common } => {
            let was_connected = admin
                .kick_session(v1::KickSessionRequest {
                    namespace: common.namespace.clone(),
                    client_id: client_id.clone(),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .was_connected;
            Ok(Output {
                table: Table::line(if was_connected {
                    format!("closed the connection of session {client_id}")
                } else {
                    format!("session {client_id} had no connection")
                }),
                json: json!({ "client_id": client_id, "was_connected": was_connected }),
            })
        }
    }
}
