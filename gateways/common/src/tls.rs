//! TLS for every listener: a certificate chain and key from PEM files, served by rustls (ring
//! provider: no cmake or system OpenSSL needed to build), as the handshake of a TLS listener.
//!
//! The certificate is held by one [`CertSource`] that every TLS listener of the process
//! resolves through on each handshake, so [`CertSource::reload`] (on SIGHUP, or when the
//! files change) puts a renewed certificate in front of every new connection without a
//! restart, while connections already open keep theirs. A listener may also verify client
//! certificates against a CA file ([`ClientCerts`]): optional (a client without one is let in
//! and authenticates otherwise, e.g. SASL) or required (mutual TLS).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
pub use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
pub use tokio_rustls::server::TlsStream;

use crate::handshake::Handshake;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate chain {path}: {message}")]
    Certificate { path: String, message: String },
    #[error("cannot read the TLS private key {path}: {message}")]
    Key { path: String, message: String },
    #[error("cannot read the client CA certificates {path}: {message}")]
    ClientCa { path: String, message: String },
    #[error("the TLS certificate and key do not make a server configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    if chain.is_empty() {
        return Err("no CERTIFICATE block in the file".into());
    }
    Ok(chain)
}

/// When the files were last seen to change: modification time and length of each.
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| (m.modified().ok(), m.len()))
            .unwrap_or((None, 0))
    };
    [one(cert), one(key)]
}

/// The server certificate and key of every TLS listener in the process, reloadable.
pub struct CertSource {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The acceptors that verify client certificates: their CA files reload with the
    /// certificate (weak: a listener that is gone needs no reload).
    verifying: Mutex<Vec<std::sync::Weak<AcceptorInner>>>,
    seen: Mutex<Stamp>,
}

impl fmt::Debug for CertSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSource")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CertSource {
    /// Reads the chain and key; fails if they cannot be read or do not belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let seen = stamp(cert, key);
        let certified = Self::read(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(certified)),
            seen: Mutex::new(seen),
            verifying: Mutex::new(Vec::new()),
        }))
    }

    fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = read_chain(cert).map_err(|message| TlsError::Certificate {
            path: cert.display().to_string(),
            message,
        })?;
        let der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.display().to_string(),
            message: e.to_string(),
        })?;
        CertifiedKey::from_der(chain, der, &provider()).map_err(|e| TlsError::Key {
            path: key.display().to_string(),
            message: format!("{e} (is it the key of {}?)", cert.display()),
        })
    }

    /// Reads the files again and serves what they hold from the next handshake on. On an
    /// error (a half-written file, a key that does not match) the certificate in use stays.
    /// The client CA files of the listeners that verify client certificates are read again
    /// too (a CA that fails to load leaves that listener's CAs as they were).
    pub fn reload(&self) -> Result<(), TlsError> {
        let seen = stamp(&self.cert, &self.key);
        let cert = self.serve_files();
        if cert.is_ok() {
            *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        }
        let cas = self.reload_client_cas(true);
        cert.and(cas.map(drop))
    }

    /// Reads the certificate and key and serves them from the next handshake on.
    fn serve_files(&self) -> Result<(), TlsError> {
        let certified = Self::read(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
        Ok(())
    }

    /// Rebuilds the acceptors whose client CA file changed (or every one, `all`); `Ok(true)`
    /// when one was rebuilt, else the first error.
    fn reload_client_cas(&self, all: bool) -> Result<bool, TlsError> {
        let live: Vec<Arc<AcceptorInner>> = {
            let mut list = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        let (mut rebuilt, mut first_error) = (false, None);
        for acceptor in live {
            match acceptor.reload_ca(all) {
                Ok(r) => rebuilt |= r,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(rebuilt), Err)
    }

    /// [`CertSource::reload`] if either file's modification time or length changed since the
    /// last load; `Ok(true)` when it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let cas = self.reload_client_cas(false);
        let now = stamp(&self.cert, &self.key);
        if *self.seen.lock().unwrap_or_else(|e| e.into_inner()) == now {
            return cas;
        }
        // Recorded whatever the outcome: files that fail to load are not tried again until
        // they change again (one error per change).
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = now;
        self.serve_files()?;
        cas.map(|_| true)
    }

    pub fn paths(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }
}

impl ResolvesServerCert for CertSource {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Whether a listener asks its clients for a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ClientCerts {
    /// No client certificate is asked for.
    #[default]
    None,
    /// Asked for and verified against the CAs in this PEM file when given; a client without
    /// one is let in (and authenticates some other way).
    Optional(PathBuf),
    /// Required, and verified against the CAs in this PEM file (mutual TLS).
    Required(PathBuf),
}

/// A TLS acceptor serving `source`'s certificate, asking for client certificates as
/// `clients` says, and offering these ALPN protocols (`h2` for gRPC, none for the binary
/// protocols, whose clients send none). Its client CA file reloads with `source`.
pub fn acceptor_for(
    source: &Arc<CertSource>,
    clients: &ClientCerts,
    alpn: &[&[u8]],
) -> Result<Acceptor, TlsError> {
    let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
    let ca = match clients {
        ClientCerts::None => None,
        ClientCerts::Optional(ca) | ClientCerts::Required(ca) => Some(ca.clone()),
    };
    let ca_seen = ca.as_deref().map(file_stamp);
    let inner = Arc::new(AcceptorInner {
        current: RwLock::new(build_acceptor(source, clients, &alpn)?),
        source: source.clone(),
        clients: clients.clone(),
        alpn,
        ca,
        ca_seen: Mutex::new(ca_seen),
    });
    if inner.ca.is_some() {
        source
            .verifying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&inner));
    }
    Ok(Acceptor(inner))
}

fn file_stamp(p: &Path) -> (Option<SystemTime>, u64) {
    std::fs::metadata(p)
        .map(|m| (m.modified().ok(), m.len()))
        .unwrap_or((None, 0))
}

/// A listener's TLS acceptor. Cloning shares it; a reload of the client CA file swaps what
/// the next handshakes use (connections already up keep theirs).
#[derive(Clone)]
pub struct Acceptor(Arc<AcceptorInner>);

pub struct AcceptorInner {
    current: RwLock<TlsAcceptor>,
    source: Arc<CertSource>,
    clients: ClientCerts,
    alpn: Vec<Vec<u8>>,
    ca: Option<PathBuf>,
    ca_seen: Mutex<Option<(Option<SystemTime>, u64)>>,
}

impl Acceptor {
    /// What the next handshake uses.
    pub fn current(&self) -> TlsAcceptor {
        self.0
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl AcceptorInner {
    /// Reads the client CA file again when it changed (or `always`); `Ok(true)` when the
    /// acceptor was rebuilt. On an error the CAs in use stay, until the file changes again.
    fn reload_ca(&self, always: bool) -> Result<bool, TlsError> {
        let Some(ca) = &self.ca else {
            return Ok(false);
        };
        let now = file_stamp(ca);
        {
            let mut seen = self.ca_seen.lock().unwrap_or_else(|e| e.into_inner());
            if !always && *seen == Some(now) {
                return Ok(false);
            }
            *seen = Some(now);
        }
        let rebuilt = build_acceptor(&self.source, &self.clients, &self.alpn)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = rebuilt;
        Ok(true)
    }
}

fn build_acceptor(
    source: &Arc<CertSource>,
    clients: &ClientCerts,
    alpn: &[Vec<u8>],
) -> Result<TlsAcceptor, TlsError> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match clients {
        ClientCerts::None => builder.with_no_client_auth(),
        ClientCerts::Optional(ca) | ClientCerts::Required(ca) => {
            let roots = client_roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = if matches!(clients, ClientCerts::Optional(_)) {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                path: ca.display().to_string(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(source.clone());
    config.alpn_protocols = alpn.to_vec();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn client_roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let error = |message: String| TlsError::ClientCa {
        path: ca.display().to_string(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_chain(ca).map_err(error)? {
        roots.add(cert).map_err(|e| error(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// A TLS listener's connections start with the TLS handshake; its gateway gets the stream
/// of plaintext on top of it, boxed: rustls' connection state is over a kilobyte, and a
/// gateway's connection future holds its stream for the connection's life (in every state
/// of its `async` chain that keeps it), where a box costs a pointer.
impl Handshake for TlsAcceptor {
    type Stream = Box<TlsStream<TcpStream>>;
    const TLS: bool = true;

    async fn handshake(&self, tcp: TcpStream) -> std::io::Result<Self::Stream> {
        self.accept(tcp).await.map(Box::new)
    }
}

impl Handshake for Acceptor {
    type Stream = Box<TlsStream<TcpStream>>;
    const TLS: bool = true;

    async fn handshake(&self, tcp: TcpStream) -> std::io::Result<Self::Stream> {
        // The certificate in use when the connection arrived, for its whole handshake.
        let current = self.current();
        current.handshake(tcp).await
    }
}

/// The TLS connections of `listener` (named `name` in metrics), for a server that takes a stream of connections
/// (tonic's `serve_with_incoming`). Each handshake runs in its own task, bounded by
/// `handshake_timeout`, so a slow or silent client holds up nobody; a failed one is logged
/// at debug level and counted in `tributary_connections_dropped_total` like the gateways'.
pub fn incoming(
    listener: tokio::net::TcpListener,
    acceptor: Acceptor,
    handshake_timeout: std::time::Duration,
    name: &'static str,
) -> impl futures::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let listener_addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tokio::spawn(async move {
        loop {
            // The server gone (its stream dropped): stop accepting and free the port.
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, listener = %listener_addr, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, handed) = (acceptor.current(), tx.clone());
            tokio::spawn(async move {
                let reason =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = handed.send(Ok(stream)).await;
                            return;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            "handshake_failed"
                        }
                        Err(_) => "handshake_timeout",
                    };
                metrics::counter!("tributary_connections_dropped_total", "listener" => name, "reason" => reason)
                    .increment(1);
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
