//! The AMQP 0-9-1 gateway (RabbitMQ-compatible).
//!
//! The gateway speaks the wire format: the protocol header, the connection handshake with
//! PLAIN / AMQPLAIN authentication and vhost permissions, tuning, heartbeats, frame limits,
//! and the assembly of publishes from method, header and body frames ([`conn`]). What is
//! AMQP but lives only as long as a connection (channels, delivery tags, prefetch, consumer
//! tags, confirms, transactions, reply codes, x-arguments) is in [`broker`]; what outlives
//! a connection is in the core's neutral model (namespaces, addresses, bindings, queues,
//! leases), so every gateway instance routes and redelivers the same way and other
//! protocols reach the same queues.

mod broker;
mod conn;
mod frames;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::debug;
use tributary_gateway_common::auth::Users;
use tributary_gateway_common::users::UserDirectory;
use tributary_gateway_common::{Accepted, CoreClient};

pub use broker::definitions;
pub use frames::decode_stream;

/// Arbitrary bytes as what a client's methods carry to the broker: queue x-arguments,
/// exchange arguments, binding arguments and message properties, parsed and mapped onto
/// the core's model. Never panics, whatever the bytes (fuzz target `amqp_arguments`).
pub fn decode_arguments(data: &[u8]) {
    broker::fuzz_arguments(data);
}

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
    pub users: Arc<UserDirectory>,
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
            users: Arc::new(UserDirectory::fixed(Users::new())),
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
    /// `vhost`; `users` holds the vhosts granted with the users kept in the core.
    pub fn may_open(&self, user: &str, vhost: &str, default_guest: bool, users: &Users) -> bool {
        if !self.vhosts.iter().any(|v| v == vhost) {
            return false;
        }
        (default_guest && vhost == "/")
            || users.granted(user, vhost)
            || self
                .permissions
                .iter()
                .any(|p| p.user == user && p.vhost == vhost)
    }
}

/// The AMQP gateway, one state for its TCP and TLS listeners: served by the shared accept
/// loop (`tributary_gateway_common::serve`).
pub struct Gateway {
    pub(crate) config: AmqpConfig,
    pub(crate) broker: Arc<broker::Broker>,
    /// Refused logins, counted and (rate-limited) logged.
    pub(crate) logins: tributary_gateway_common::auth::LoginRefusals,
}

impl Gateway {
    pub fn new(core: CoreClient, config: AmqpConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            broker: broker::Broker::new(core),
            logins: Default::default(),
        })
    }
}

impl<S> tributary_gateway_common::Gateway<S> for Gateway
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn serve_connection(self: Arc<Self>, conn: Accepted<S>, mut stop: watch::Receiver<bool>) {
        // `conn::run` does not watch the stop, and the accept loop waits for its connections
        // (up to its drain timeout): cut the connection here at once, as the process's exit
        // used to. RabbitMQ sends connection.close 320 first; that belongs in `conn::run`.
        tokio::select! {
            () = conn::run(self, conn.stream, conn.peer, conn.listener, conn.connection) => {}
            _ = stop.wait_for(|s| *s) => debug!("amqp: connection closed, the gateway stops"),
        }
    }
}

/// Whether a peer counts as loopback for the default guest user.
pub(crate) fn is_loopback(peer: &SocketAddr) -> bool {
    peer.ip().is_loopback()
}
