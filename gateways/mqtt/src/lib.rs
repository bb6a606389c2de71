//! The MQTT gateway: MQTT 3.1 ("MQIsdp"), 3.1.1 and 5.0 over TCP.
//!
//! The gateway runs each connection's protocol state machine: CONNECT checks, authentication,
//! the topic ACL, keep-alive, topic aliases, packet sizes and the packet-id handshakes. It
//! keeps nothing that must outlive the connection: the session (subscriptions, queued and
//! in-flight QoS 1/2 messages with their packet ids, QoS 2 ids awaiting PUBREL, the will) and
//! the retained messages live in the core, reached over one command/event stream per
//! connection, so a client that reconnects through another gateway finds its session.

pub mod acl;
mod conn;
pub mod topic;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use tributary_gateway_common::CoreClient;
use tributary_gateway_common::auth::Users;
pub use tributary_gateway_common::tls::TlsAcceptor;

pub use acl::{Acl, AclRule, Action};
pub use conn::decode_stream;

/// Everything the gateway is told at start-up.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// Namespace in the core that holds sessions and topics.
    pub namespace: String,
    /// Accept clients that give no user name.
    pub allow_anonymous: bool,
    /// Users with salted credentials; a client naming a user must give its password.
    pub users: Arc<Users>,
    pub acl: Arc<Acl>,
    /// Largest packet accepted from a client (and announced as Maximum Packet Size).
    pub max_packet_size: u32,
    /// QoS 1/2 publishes a client may have unacknowledged (announced as Receive Maximum).
    pub receive_maximum: u16,
    /// Unacknowledged QoS 1/2 deliveries to a 3.1/3.1.1 client (5.0 clients say their own).
    pub max_inflight_v3: u16,
    /// Topic aliases a 5.0 client may use towards the gateway.
    pub topic_alias_maximum: u16,
    /// Keep-alive above this (or 0) is replaced by it and announced (5.0); 0 = no cap.
    pub max_keep_alive: u16,
    /// Names this gateway instance in the core's session records.
    pub instance: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            allow_anonymous: true,
            users: Arc::new(Users::new()),
            acl: Arc::new(Acl::default()),
            max_packet_size: 16 << 20,
            receive_maximum: 1024,
            max_inflight_v3: 1000,
            topic_alias_maximum: 64,
            max_keep_alive: 0,
            instance: "mqtt".into(),
        }
    }
}

pub(crate) struct Gateway {
    pub(crate) config: MqttConfig,
    pub(crate) core: CoreClient,
}

/// Accepts MQTT-over-TCP connections until `stop` turns true; each runs in its own task.
pub async fn serve(
    listener: TcpListener,
    core: CoreClient,
    config: MqttConfig,
    stop: watch::Receiver<bool>,
) {
    serve_listeners(
        Listeners {
            tcp: Some(listener),
            ..Listeners::default()
        },
        core,
        config,
        stop,
    )
    .await
}

/// The listeners one MQTT gateway serves; any may be absent.
#[derive(Default)]
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub ws: Option<TcpListener>,
    /// MQTT over TLS, with the acceptor holding the certificate.
    pub tls: Option<(TcpListener, TlsAcceptor)>,
}

#[derive(Clone, Copy)]
enum Transport {
    Tcp,
    WebSocket,
    Tls,
}

/// Accepts on the TCP listener and the WebSocket listener (either may be absent), with one
/// gateway state shared by both.
pub async fn serve_listeners(
    listeners: Listeners,
    core: CoreClient,
    config: MqttConfig,
    stop: watch::Receiver<bool>,
) {
    let beyond_loopback = |l: &Option<TcpListener>| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .is_some_and(|a: SocketAddr| !a.ip().is_loopback())
    };
    let Listeners { tcp, ws, tls } = listeners;
    let (tls, acceptor) = match tls {
        Some((l, a)) => (Some(l), Some(a)),
        None => (None, None),
    };
    if config.allow_anonymous
        && (beyond_loopback(&tcp) || beyond_loopback(&ws) || beyond_loopback(&tls))
    {
        warn!(
            "mqtt: anonymous clients are allowed on a listener beyond loopback; set mqtt_allow_anonymous = false and add [[users]] to require a password"
        );
    }
    let gateway = Arc::new(Gateway { config, core });
    let mut tasks = Vec::new();
    for (listener, transport) in [
        (tcp, Transport::Tcp),
        (ws, Transport::WebSocket),
        (tls, Transport::Tls),
    ] {
        if let Some(l) = listener {
            tasks.push(tokio::spawn(accept_loop(
                l,
                transport,
                acceptor.clone(),
                gateway.clone(),
                stop.clone(),
            )));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    info!("mqtt gateway stopped accepting");
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    acceptor: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let gateway = gateway.clone();
                let stop = stop.clone();
                match (transport, &acceptor) {
                    (Transport::WebSocket, _) => {
                        tokio::spawn(ws::serve_websocket(socket, peer, gateway, stop));
                    }
                    (Transport::Tls, Some(acceptor)) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            // The handshake runs in the connection's task, bounded like CONNECT.
                            let handshake = tokio::time::timeout(
                                std::time::Duration::from_secs(10),
                                acceptor.accept(socket),
                            );
                            match handshake.await {
                                Ok(Ok(tls)) => {
                                    conn::serve_connection(tls, peer, "mqtt-tls", gateway, stop)
                                        .await
                                }
                                Ok(Err(e)) => {
                                    debug!(%peer, error = %e, "mqtt: TLS handshake failed")
                                }
                                Err(_) => debug!(%peer, "mqtt: TLS handshake timed out"),
                            }
                        });
                    }
                    _ => {
                        tokio::spawn(conn::serve_connection(socket, peer, "mqtt", gateway, stop));
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "mqtt: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
