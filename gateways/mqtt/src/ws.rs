//! MQTT over WebSocket (subprotocol `mqtt`): the WebSocket's binary messages are bridged to
//! an in-memory pipe, so the same connection code serves TCP and WebSocket clients. MQTT
//! packets may span or share WebSocket messages; the pipe makes that invisible.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tracing::debug;
use tributary_gateway_common::Accepted;

use crate::Gateway;
use crate::conn;

/// Subprotocol names MQTT clients offer ("mqttv3.1" is what 3.1 clients sent).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

#[allow(clippy::result_large_err)] // the signature is tungstenite's callback type
fn choose_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .find(|p| SUBPROTOCOLS.contains(p))
        .map(str::to_string);
    match offered {
        Some(p) => {
            if let Ok(v) = HeaderValue::from_str(&p) {
                resp.headers_mut().insert("sec-websocket-protocol", v);
            }
            Ok(resp)
        }
        None => {
            let mut refusal = ErrorResponse::new(Some(
                "MQTT over WebSocket needs the subprotocol \"mqtt\"".into(),
            ));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            Err(refusal)
        }
    }
}

/// Upgrades `socket` (plain TCP today; a TLS stream would do as well) and serves MQTT over
/// it as `listener`.
pub(crate) async fn serve_websocket<S>(
    conn: Accepted<S>,
    gw: Arc<Gateway>,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        stream: socket,
        peer,
        listener,
        connection,
    } = conn;
    let ws = match tokio_tungstenite::accept_hdr_async(socket, choose_subprotocol).await {
        Ok(ws) => ws,
        Err(e) => {
            debug!(%peer, error = %e, "mqtt websocket handshake failed");
            return;
        }
    };
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut pipe_rd, mut pipe_wr) = tokio::io::split(ours);
    // WebSocket -> pipe: payloads of binary messages, in order.
    let inbound = tokio::spawn(async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(data) => data,
                // Text frames are not MQTT (MQTT-6.0.0-1): close.
                Message::Close(_) | Message::Text(_) => break,
                _ => continue,
            };
            if pipe_wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = pipe_wr.shutdown().await;
    });
    // Pipe -> WebSocket: whatever the connection writes, as binary messages.
    let outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    });
    conn::serve_connection(theirs, peer, listener, connection, gw, stop).await;
    inbound.abort();
    let _ = outbound.await;
}
