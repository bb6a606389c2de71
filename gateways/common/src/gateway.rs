//! What a protocol gateway gives the shared accept loop ([`crate::serve`]): the code that
//! serves one connection. Listeners, handshakes, limits, metrics and stopping are the loop's.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::connections::ConnectionHandle;

/// One accepted connection, its handshake done.
pub struct Accepted<S> {
    pub stream: S,
    pub peer: SocketAddr,
    /// The listener's name (its metrics label), e.g. `mqtt-ws`.
    pub listener: &'static str,
    /// Its entry in the process's connection list: the gateway fills in what login tells
    /// (user, client id, namespace) and ends the connection when an operator closes it
    /// ([`ConnectionHandle::close_requested`]).
    pub connection: ConnectionHandle,
}

/// A protocol gateway serving connections whose stream is `S`: a `TcpStream` from a plain
/// listener, a TLS stream from a TLS one. A gateway that can serve either implements both
/// (usually with one generic impl); one that cannot is refused at compile time.
pub trait Gateway<S>: Send + Sync + 'static {
    /// Serves one connection to its end, in its own task. `stop` turns true when the
    /// gateway stops: the connection should then close promptly (with the protocol's
    /// goodbye if it has one), because the accept loop waits for every connection to end.
    /// The same holds once `conn.connection` reports a close asked for by an operator; a
    /// connection still open a drain timeout later is cut.
    fn serve_connection(
        self: Arc<Self>,
        conn: Accepted<S>,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send;
}
