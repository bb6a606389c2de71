//! The AMQP 0-9-1 gateway (RabbitMQ-compatible).
//!
//! The gateway speaks the wire format: the protocol header, the connection handshake with
//! PLAIN / AMQPLAIN authentication and vhost permissions, tuning, heartbeats, frame limits,
//! and the assembly of publishes from method, header and body frames. Everything with state
//! that outlives a frame (exchanges, bindings, queues, consumers, delivery tags, unacked
//! messages, confirms, transactions) is in the core, reached over one command/event stream
//! per connection, so every gateway instance routes and redelivers the same way.

mod conn;
mod frames;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};
use tributary_gateway_common::CoreClient;
use tributary_gateway_common::auth::Users;
pub use tributary_gateway_common::tls::TlsAcceptor;

pub use frames::decode_stream;

/// A vhost a user may use (full configure, write and read rights inside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub user: String,
    pub vhost: String,
}

/// Everything the gateway is told at start-up.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Users with salted credentials.
    pub users: Arc<Users>,
    /// Vhosts clients may open.
    pub vhosts: Vec<String>,
    /// Which user may open which vhost (the default guest user may open "/").
    pub permissions: Vec<Permission>,
    /// guest/guest, from loopback only (RabbitMQ's default), unless `[[users]]` names guest.
    pub default_guest: bool,
    pub channel_max: u16,
    pub frame_max: u32,
    /// Heartbeat interval the server proposes, seconds.
    pub heartbeat: u16,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            users: Arc::new(Users::new()),
            vhosts: vec!["/".into()],
            permissions: Vec::new(),
            default_guest: true,
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
        }
    }
}

impl AmqpConfig {
    /// Whether `user` (authenticated; `default_guest` for the built-in guest) may open
    /// `vhost`.
    pub fn may_open(&self, user: &str, vhost: &str, default_guest: bool) -> bool {
        if !self.vhosts.iter().any(|v| v == vhost) {
            return false;
        }
        (default_guest && vhost == "/")
            || self
                .permissions
                .iter()
                .any(|p| p.user == user && p.vhost == vhost)
    }
}

pub(crate) struct Gateway {
    pub(crate) config: AmqpConfig,
    pub(crate) core: CoreClient,
}

/// The TCP and TLS listeners of one gateway (either may be absent), sharing its state.
pub async fn serve_listeners(
    tcp: Option<TcpListener>,
    tls: Option<(TcpListener, TlsAcceptor)>,
    core: CoreClient,
    config: AmqpConfig,
    stop: watch::Receiver<bool>,
) {
    let gateway = Arc::new(Gateway { config, core });
    let mut tasks = Vec::new();
    if let Some(l) = tcp {
        tasks.push(tokio::spawn(serve_shared(
            l,
            None,
            gateway.clone(),
            stop.clone(),
        )));
    }
    if let Some((l, a)) = tls {
        tasks.push(tokio::spawn(serve_shared(
            l,
            Some(a),
            gateway.clone(),
            stop.clone(),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Accepts on one listener until `stop` turns true, each connection in its own task; with
/// an acceptor, every connection starts with a TLS handshake (AMQPS).
async fn serve_shared(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    let gw = gateway.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => conn::run(gw, socket, peer).await,
                            Some(acceptor) => {
                                let handshake = tokio::time::timeout(
                                    std::time::Duration::from_secs(10),
                                    acceptor.accept(socket),
                                )
                                .await;
                                match handshake {
                                    Ok(Ok(stream)) => conn::run(gw, stream, peer).await,
                                    Ok(Err(e)) => debug!(%peer, error = %e, "amqps: TLS handshake failed"),
                                    Err(_) => debug!(%peer, "amqps: TLS handshake timed out"),
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "amqp: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => {
                if *stop.borrow() {
                    debug!("amqp: listener stopping");
                    return;
                }
            }
        }
    }
}

/// Whether a peer counts as loopback for the default guest user.
pub(crate) fn is_loopback(peer: &SocketAddr) -> bool {
    peer.ip().is_loopback()
}
