//! The MQTT gateway: MQTT 3.1 ("MQIsdp"), 3.1.1 and 5.0 over TCP, WebSocket and TLS.
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

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::warn;
use tributary_gateway_common::auth::Users;
use tributary_gateway_common::users::UserDirectory;
use tributary_gateway_common::{Accepted, CoreClient};

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
    pub users: Arc<UserDirectory>,
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
            users: Arc::new(UserDirectory::fixed(Users::new())),
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

impl MqttConfig {
    /// Warns once when anonymous clients are allowed on a listener beyond loopback: anyone
    /// who can reach it may then publish and subscribe.
    pub fn warn_if_anonymous_beyond_loopback(&self, listening: &[SocketAddr]) {
        if self.allow_anonymous && listening.iter().any(|a| !a.ip().is_loopback()) {
            warn!(
                "mqtt: anonymous clients are allowed on a listener beyond loopback; set mqtt_allow_anonymous = false and add [[users]] to require a password"
            );
        }
    }
}

/// The MQTT gateway, one state for all its listeners: served by the shared accept loop
/// (`tributary_gateway_common::serve`) as it is on the TCP and TLS listeners, and through
/// [`Gateway::websocket`] on the WebSocket one.
pub struct Gateway {
    pub(crate) config: MqttConfig,
    pub(crate) core: CoreClient,
    /// Refused logins, counted and (rate-limited) logged.
    pub(crate) logins: tributary_gateway_common::auth::LoginRefusals,
    pub(crate) traffic: tributary_gateway_common::TrafficByListener,
    /// `config.namespace`, shared by every connection's entry in the connection list.
    pub(crate) namespace: Arc<str>,
}

impl Gateway {
    pub fn new(core: CoreClient, config: MqttConfig) -> Arc<Self> {
        let core = core.scoped(&config.namespace);
        Arc::new(Self {
            namespace: Arc::from(config.namespace.as_str()),
            config,
            core,
            logins: Default::default(),
            traffic: Default::default(),
        })
    }

    /// This gateway behind a WebSocket upgrade, for the WebSocket listener.
    pub fn websocket(self: &Arc<Self>) -> Arc<WebSocket> {
        Arc::new(WebSocket(self.clone()))
    }
}

impl<S> tributary_gateway_common::Gateway<S> for Gateway
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Not an `async fn`: the connection's own future is what the task holds, without a
    // wrapper keeping a second copy of its arguments.
    fn serve_connection(
        self: Arc<Self>,
        conn: Accepted<S>,
        stop: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send {
        conn::serve_connection(
            conn.stream,
            conn.peer,
            conn.listener,
            conn.connection,
            self,
            stop,
        )
    }
}

/// The MQTT gateway over WebSocket (subprotocol `mqtt`): the upgrade, then the same
/// connection code as over TCP.
pub struct WebSocket(Arc<Gateway>);

impl<S> tributary_gateway_common::Gateway<S> for WebSocket
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn serve_connection(self: Arc<Self>, conn: Accepted<S>, stop: watch::Receiver<bool>) {
        ws::serve_websocket(conn, self.0.clone(), stop).await
    }
}
