//! Listeners: binding with errors a person can act on, and what the shared accept loop needs
//! to know about a bound one.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::connections::Connections;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "cannot listen on {addr} for {what} ({flag}): the address is in use; stop the other process or pick another port with {flag}"
    )]
    InUse {
        addr: String,
        what: String,
        flag: String,
    },
    #[error(
        "cannot listen on {addr} for {what} ({flag}): permission denied; use a port above 1023 or run with the needed privilege"
    )]
    Denied {
        addr: String,
        what: String,
        flag: String,
    },
    #[error("cannot listen on {addr} for {what} ({flag}): {source}")]
    Other {
        addr: String,
        what: String,
        flag: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr` for the listener `what`, configured by `flag`; port 0 picks a free port.
pub async fn bind(addr: SocketAddr, what: &str, flag: &str) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr).await.map_err(|source| {
        let (addr, what, flag) = (addr.to_string(), what.to_string(), flag.to_string());
        match source.kind() {
            std::io::ErrorKind::AddrInUse => ListenError::InUse { addr, what, flag },
            std::io::ErrorKind::PermissionDenied => ListenError::Denied { addr, what, flag },
            _ => ListenError::Other {
                addr,
                what,
                flag,
                source,
            },
        }
    })
}

/// How long a connection's handshake (TLS) may take. The same bound the protocols put on
/// their own opening (MQTT's CONNECT, AMQP's connection handshake): a client that opens a
/// TLS connection and says nothing must not hold a socket, and a place under the connection
/// limit, for ever.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping listener waits for its connections to close themselves before it
/// closes them: long enough for a protocol's goodbye (MQTT's DISCONNECT and the session's
/// hand-back to the core), short enough that a connection which does not watch the stop
/// (one still in its opening) does not hold the process up for long.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound listener and how [`crate::serve`] accepts on it.
pub struct Listener<H> {
    pub socket: TcpListener,
    /// The listener's name in metrics (the `listener` label) and logs, e.g. `mqtt-tls`.
    pub name: &'static str,
    /// What each accepted connection goes through before its gateway sees it.
    pub handshake: H,
    /// A handshake unfinished after this is dropped, and counted.
    pub handshake_timeout: Duration,
    /// Connections served at once; one more is closed as soon as it is accepted, and
    /// counted. `None`: no limit.
    pub max_connections: Option<NonZeroUsize>,
    /// On stop, connections still open after this are closed; so is a connection an
    /// operator closed that has not ended this long after.
    pub drain_timeout: Duration,
    /// Where its connections are listed. A process shares one across its listeners, so its
    /// admin API lists and closes them all.
    pub connections: Arc<Connections>,
}

impl<H> Listener<H> {
    /// A listener with the default timeouts, no connection limit and a registry of its own
    /// (set `connections` to share the process's).
    pub fn new(socket: TcpListener, name: &'static str, handshake: H) -> Self {
        Self {
            socket,
            name,
            handshake,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            connections: Connections::new(),
        }
    }
}
