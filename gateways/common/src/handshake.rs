//! What an accepted TCP connection goes through before its gateway sees it: nothing on a
//! plain listener, the TLS handshake on a TLS one (`impl Handshake for TlsAcceptor`, in
//! [`crate::tls`]).

use std::future::Future;

use tokio::net::TcpStream;

/// Turns an accepted TCP connection into the stream its gateway serves. The accept loop
/// bounds it with the listener's handshake timeout.
pub trait Handshake: Send + Sync + 'static {
    /// What the gateway is handed.
    type Stream: Send + 'static;
    /// Whether the client talks TLS to us, as the connection list shows it.
    const TLS: bool = false;

    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

/// Plain TCP: the accepted stream as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl Handshake for Plain {
    type Stream = TcpStream;

    async fn handshake(&self, tcp: TcpStream) -> std::io::Result<TcpStream> {
        Ok(tcp)
    }
}
