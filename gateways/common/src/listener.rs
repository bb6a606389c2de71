//! Binding listeners with errors a person can act on, and connection accounting.

use std::net::SocketAddr;

use tokio::net::TcpListener;

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

/// Counts a live connection in `tributary_connections{listener=...}` until dropped.
pub struct ConnectionGuard {
    listener: &'static str,
}

impl ConnectionGuard {
    pub fn new(listener: &'static str) -> Self {
        metrics::gauge!("tributary_connections", "listener" => listener).increment(1.0);
        metrics::counter!("tributary_connections_accepted_total", "listener" => listener)
            .increment(1);
        Self { listener }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics::gauge!("tributary_connections", "listener" => self.listener).decrement(1.0);
    }
}
