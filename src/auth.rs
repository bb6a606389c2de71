//! Shared-token authentication of the core gRPC API and the admin HTTP API.
//!
//! One secret, `core_token`, is given to the core and to every gateway process in front of
//! it. The core's network listener wants `authorization: Bearer <token>` on every call (the
//! standalone server's in-process transport is trusted and never goes through this), and the
//! admin HTTP API wants the same header when it listens beyond loopback. Every refusal is
//! counted in `tributary_auth_refusals_total{listener,reason}` and logged with the peer, the
//! path and the reason, at most once per peer per [`REFUSAL_LOG_INTERVAL`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{self, HeaderValue};
use tracing::warn;

pub use tributary_gateway_common::auth::{MAX_TRACKED_PEERS, REFUSAL_LOG_INTERVAL, RefusalLimiter};

/// The shared secret. Its `Debug` never shows it, so settings can be printed safely.
#[derive(Clone, PartialEq, Eq)]
pub struct CoreToken(String);

impl std::fmt::Debug for CoreToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreToken(<redacted>)")
    }
}

impl CoreToken {
    /// Shortest token accepted: a guessable secret on a network listener is no secret.
    pub const MIN_LEN: usize = 16;

    /// Checks the token: 16 to 4096 printable ASCII characters without spaces (it travels
    /// in an HTTP header).
    pub fn new(token: &str) -> Result<Self, String> {
        if token.len() < Self::MIN_LEN || token.len() > 4096 {
            return Err(format!(
                "expected {} to 4096 characters, got {} (e.g. `openssl rand -hex 32`)",
                Self::MIN_LEN,
                token.len()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("expected printable ASCII without spaces".into());
        }
        Ok(Self(token.to_string()))
    }

    /// The secret itself, for a client that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Checks an `Authorization` header against the token, in time that does not depend
    /// on how much of the token a guess got right.
    pub fn check(&self, header: Option<&HeaderValue>) -> Result<(), Reason> {
        let header = header.ok_or(Reason::Missing)?;
        let given = header
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .ok_or(Reason::Malformed)?;
        if constant_time_eq(given, self.0.as_bytes()) {
            Ok(())
        } else {
            Err(Reason::Wrong)
        }
    }
}

/// Compares two byte strings in time that depends only on the longer one's length, never on
/// where they first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// Why a request was refused; the `reason` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    Malformed,
    /// A bearer token that is not the configured one.
    Wrong,
    /// A request that always needs credentials (an admin write) to a server that has no
    /// `core_token` to check them against.
    NoTokenConfigured,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "missing_token",
            Reason::Malformed => "malformed_header",
            Reason::Wrong => "wrong_token",
            Reason::NoTokenConfigured => "no_core_token",
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Reason::Missing => {
                "this core requires `authorization: Bearer <core_token>`; give the gateway the core's token (--core-token-file, TRIBUTARY_CORE_TOKEN or core_token)"
            }
            Reason::Malformed => "the authorization header is not `Bearer <core_token>`",
            Reason::Wrong => "the bearer token is not this server's core_token",
            Reason::NoTokenConfigured => {
                "this server has no core_token to check credentials against; set core_token (--core-token-file, TRIBUTARY_CORE_TOKEN or core_token)"
            }
        }
    }
}

/// Counts and logs the refusals of one listener (`core` or `admin`).
pub struct RefusalLog {
    listener: &'static str,
    limiter: RefusalLimiter,
}

impl RefusalLog {
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            limiter: RefusalLimiter::new(REFUSAL_LOG_INTERVAL, MAX_TRACKED_PEERS),
        }
    }

    pub fn refuse(&self, peer: Option<SocketAddr>, path: &str, reason: Reason) {
        metrics::counter!(
            "tributary_auth_refusals_total",
            "listener" => self.listener,
            "reason" => reason.as_str()
        )
        .increment(1);
        if let Some(suppressed) = self.limiter.admit(peer.map(|p| p.ip()), Instant::now()) {
            let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
            warn!(
                listener = self.listener,
                peer = %peer,
                path = %path,
                reason = reason.as_str(),
                suppressed_since_last_line = suppressed,
                "refused an unauthenticated request (at most one line per peer every {} s; every refusal is counted in tributary_auth_refusals_total)",
                REFUSAL_LOG_INTERVAL.as_secs()
            );
        }
    }
}

/// What a guarded listener checks: the token and where refusals go.
pub struct Guard {
    pub token: CoreToken,
    pub log: RefusalLog,
}

impl Guard {
    pub fn new(listener: &'static str, token: CoreToken) -> Arc<Self> {
        Arc::new(Self {
            token,
            log: RefusalLog::new(listener),
        })
    }

    /// Checks a request's headers; a refusal is counted and logged here.
    pub fn check(
        &self,
        headers: &http::HeaderMap,
        peer: Option<SocketAddr>,
        path: &str,
    ) -> Result<(), Reason> {
        let result = self.token.check(headers.get(http::header::AUTHORIZATION));
        if let Err(reason) = result {
            self.log.refuse(peer, path, reason);
        }
        result
    }
}

/// Tower layer for the core's gRPC network listener: with `Some(guard)` every call needs
/// the bearer token; with `None` calls pass unchecked (no token configured).
#[derive(Clone)]
pub struct CoreAuthLayer(pub Option<Arc<Guard>>);

impl<S> tower::Layer<S> for CoreAuthLayer {
    type Service = CoreAuth<S>;

    fn layer(&self, inner: S) -> CoreAuth<S> {
        CoreAuth {
            inner,
            guard: self.0.clone(),
        }
    }
}

/// See [`CoreAuthLayer`].
#[derive(Clone)]
pub struct CoreAuth<S> {
    inner: S,
    guard: Option<Arc<Guard>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CoreAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(guard) = &self.guard {
            let extensions = req.extensions();
            let peer = extensions
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|i| i.remote_addr())
                .or_else(|| {
                    extensions
                        .get::<tonic::transport::server::TlsConnectInfo<
                            tonic::transport::server::TcpConnectInfo,
                        >>()
                        .and_then(|i| i.get_ref().remote_addr())
                });
            if let Err(reason) = guard.check(req.headers(), peer, req.uri().path()) {
                let status = tonic::Status::from(tributary_core::CoreError::Unauthenticated(
                    reason.message().into(),
                ));
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// Whether a listener bound to `addr` is reachable from beyond this machine.
pub fn beyond_loopback(addr: SocketAddr) -> bool {
    !addr.ip().to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use std::time::Duration;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abcdef", b"bbcdef"));
        assert!(!constant_time_eq(b"abc", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        // A prefix padded with the zero bytes the loop reads past the end is still unequal.
        assert!(!constant_time_eq(b"ab\0", b"ab"));
    }

    #[test]
    fn a_token_is_checked_as_a_bearer_header() {
        let t = CoreToken::new("0123456789abcdef").unwrap();
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(t.check(None), Err(Reason::Missing));
        assert_eq!(t.check(Some(&h("Bearer 0123456789abcdef"))), Ok(()));
        assert_eq!(
            t.check(Some(&h("Bearer 0123456789abcdeX"))),
            Err(Reason::Wrong)
        );
        assert_eq!(
            t.check(Some(&h("Basic 0123456789abcdef"))),
            Err(Reason::Malformed)
        );
        assert!(CoreToken::new("short").is_err());
        assert!(CoreToken::new("with a space in it!").is_err());
        assert!(!format!("{t:?}").contains("0123"));
    }

    #[test]
    fn the_limiter_logs_once_per_peer_per_interval_and_counts_the_rest() {
        let l = RefusalLimiter::new(Duration::from_secs(10), 8);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        assert_eq!(l.admit(a, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.admit(a, t0 + Duration::from_secs(i)), None);
        }
        // Another peer is not held back by the first.
        assert_eq!(l.admit(b, t0 + Duration::from_secs(1)), Some(0));
        // After the interval, one line with the five suppressed in between.
        assert_eq!(l.admit(a, t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(l.admit(a, t0 + Duration::from_secs(11)), None);
        assert_eq!(l.admit(a, t0 + Duration::from_secs(20)), Some(1));
    }

    #[test]
    fn a_flood_from_many_peers_logs_a_bounded_number_of_lines() {
        let l = RefusalLimiter::new(Duration::from_secs(10), 4);
        let t0 = Instant::now();
        let lines = (0..1000u32)
            .filter(|i| l.admit(Some(IpAddr::from(i.to_be_bytes())), t0).is_some())
            .count();
        // Four tracked peers plus the shared slot for everyone else.
        assert_eq!(lines, 5);
        assert!(l.tracked() <= 5);
        // Once the interval has passed, old peers make room for new ones.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(l.admit(Some(IpAddr::from([192, 0, 2, 1])), later), Some(0));
    }

    #[test]
    fn beyond_loopback_is_about_the_bind_address() {
        assert!(!beyond_loopback("127.0.0.1:7400".parse().unwrap()));
        assert!(!beyond_loopback("127.0.0.2:7400".parse().unwrap()));
        assert!(!beyond_loopback("[::1]:7400".parse().unwrap()));
        assert!(!beyond_loopback("[::ffff:127.0.0.1]:7400".parse().unwrap()));
        assert!(beyond_loopback("0.0.0.0:7400".parse().unwrap()));
        assert!(beyond_loopback("[::]:7400".parse().unwrap()));
        assert!(beyond_loopback("192.0.2.1:7400".parse().unwrap()));
    }
}
