//! Who may call what on the admin listener.
//!
//! - `GET /healthz` and the console's static files (`/`, `/console/...`) are always served:
//!   orchestrators probe the first without a secret, and the second holds no data (the
//!   console asks the API, which checks).
//! - Reads (`GET`, `HEAD`) need `Authorization: Bearer <core_token>` when the listener is
//!   bound beyond loopback, and are open on loopback.
//! - Writes (any other method: purge, redrive) always need the token, on loopback too: a
//!   loopback listener is reachable by every local user and process, and a write destroys
//!   messages. Without a configured `core_token` they are refused with 403 and a message
//!   saying to set one. Browsers never attach a bearer header on their own, so a page from
//!   another site cannot make a visitor's browser write (no CSRF).
//!
//! Every refusal is counted in `tributary_auth_refusals_total{listener="admin"}` and logged
//! (rate-limited) by the shared [`RefusalLog`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tributary_proto::v1;

use crate::auth::{CoreToken, Reason, RefusalLog};

/// The admin listener's rule (see the module documentation).
pub struct AdminAuth {
    token: Option<CoreToken>,
    /// Reads need the token too: the listener is reachable beyond loopback.
    reads_need_token: bool,
    log: RefusalLog,
}

impl AdminAuth {
    pub fn new(token: Option<CoreToken>, reads_need_token: bool) -> Arc<Self> {
        Arc::new(Self {
            token,
            reads_need_token,
            log: RefusalLog::new("admin"),
        })
    }

    /// Whether a request of this method to this path may go on; a refusal is counted and
    /// logged here.
    fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &axum::http::HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<(), Reason> {
        let read = matches!(*method, Method::GET | Method::HEAD);
        // Open reads on a loopback listener are for local tools and this machine's browser,
        // so the Host must name loopback too: a page from another site that rebinds its DNS
        // name to 127.0.0.1 reaches the port with its own name as Host (DNS rebinding) and
        // is asked for the token like a remote caller.
        if read && (is_public(path) || (!self.reads_need_token && loopback_host(headers))) {
            return Ok(());
        }
        let result = match &self.token {
            Some(token) => token.check(headers.get(axum::http::header::AUTHORIZATION)),
            None => Err(Reason::NoTokenConfigured),
        };
        if let Err(reason) = result {
            self.log.refuse(peer, path, reason);
        }
        result
    }
}

/// Whether the request's Host names this machine's loopback (or is absent, as from HTTP/1.0
/// tools: browsers always send one).
fn loopback_host(headers: &axum::http::HeaderMap) -> bool {
    let Some(host) = headers.get(axum::http::header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    matches!(
        name.to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "::1"
    )
}

/// Paths anyone may read: the health check and the console's static files (and icon).
fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/" | "/console" | "/favicon.ico") || path.starts_with("/console/")
}

/// The middleware: `401` for missing or wrong credentials, `403` for a write to a server
/// that has no token to check them against.
pub async fn require(State(auth): State<Arc<AdminAuth>>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let checked = auth.check(req.method(), req.uri().path(), req.headers(), peer);
    match checked {
        Ok(()) => next.run(req).await,
        Err(Reason::NoTokenConfigured) => (
            StatusCode::FORBIDDEN,
            Json(json!({
                "error": "NO_CORE_TOKEN",
                "message": "admin write endpoints always need `Authorization: Bearer <core_token>`, and this server has no core_token: set core_token (--core-token-file FILE, TRIBUTARY_CORE_TOKEN, or core_token / core_token_file in the config file) and restart",
            })),
        )
            .into_response(),
        Err(reason) => (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer")],
            Json(json!({
                "error": v1::ErrorCode::Unauthenticated.as_str_name(),
                "message": format!(
                    "{} needs `Authorization: Bearer <core_token>` ({})",
                    if auth.reads_need_token { "the admin API beyond loopback" } else { "an admin write" },
                    reason.as_str()
                ),
            })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    const TOKEN: &str = "0123456789abcdef";

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    #[test]
    fn loopback_reads_are_open_and_writes_want_the_token() {
        let auth = AdminAuth::new(Some(CoreToken::new(TOKEN).unwrap()), false);
        let none = HeaderMap::new();
        assert_eq!(
            auth.check(&Method::GET, "/api/v1/queues", &none, None),
            Ok(())
        );
        let purge = "/api/v1/queues/default/q/purge";
        assert_eq!(
            auth.check(&Method::POST, purge, &none, None),
            Err(Reason::Missing)
        );
        assert_eq!(
            auth.check(&Method::POST, purge, &bearer("not-it-0123456789"), None),
            Err(Reason::Wrong)
        );
        assert_eq!(
            auth.check(&Method::POST, purge, &bearer(TOKEN), None),
            Ok(())
        );
        // A write to a public path is still a write.
        assert_eq!(
            auth.check(&Method::POST, "/console/", &none, None),
            Err(Reason::Missing)
        );
    }

    #[test]
    fn open_loopback_reads_want_a_loopback_host_against_dns_rebinding() {
        let auth = AdminAuth::new(Some(CoreToken::new(TOKEN).unwrap()), false);
        let host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(axum::http::header::HOST, HeaderValue::from_str(h).unwrap());
            m
        };
        for ok in [
            "localhost:7480",
            "127.0.0.1:7480",
            "[::1]:7480",
            "LOCALHOST",
        ] {
            assert_eq!(
                auth.check(&Method::GET, "/api/v1/queues", &host(ok), None),
                Ok(()),
                "{ok}"
            );
        }
        for rebound in [
            "evil.example:7480",
            "evil.example",
            "127.0.0.1.evil.example",
        ] {
            assert_eq!(
                auth.check(&Method::GET, "/api/v1/queues", &host(rebound), None),
                Err(Reason::Missing),
                "{rebound}"
            );
        }
        let mut with_token = host("evil.example:7480");
        with_token.extend(bearer(TOKEN));
        assert_eq!(
            auth.check(&Method::GET, "/api/v1/queues", &with_token, None),
            Ok(())
        );
        // The console's files stay public whatever the Host (they hold no data).
        assert_eq!(
            auth.check(&Method::GET, "/console/", &host("evil.example"), None),
            Ok(())
        );
    }

    #[test]
    fn without_a_token_writes_are_refused_and_reads_stay_open_on_loopback() {
        let auth = AdminAuth::new(None, false);
        let none = HeaderMap::new();
        assert_eq!(
            auth.check(&Method::GET, "/api/v1/streams", &none, None),
            Ok(())
        );
        assert_eq!(
            auth.check(&Method::DELETE, "/api/v1/anything", &bearer(TOKEN), None),
            Err(Reason::NoTokenConfigured)
        );
    }

    #[test]
    fn beyond_loopback_reads_want_the_token_but_health_and_console_files_do_not() {
        let auth = AdminAuth::new(Some(CoreToken::new(TOKEN).unwrap()), true);
        let none = HeaderMap::new();
        for open in ["/healthz", "/", "/console/app.js"] {
            assert_eq!(
                auth.check(&Method::GET, open, &none, None),
                Ok(()),
                "{open}"
            );
        }
        assert_eq!(
            auth.check(&Method::GET, "/metrics", &none, None),
            Err(Reason::Missing)
        );
        assert_eq!(
            auth.check(&Method::GET, "/metrics", &bearer(TOKEN), None),
            Ok(())
        );
        // "/consolex" is not the console.
        assert_eq!(
            auth.check(&Method::GET, "/consolex", &none, None),
            Err(Reason::Missing)
        );
    }
}
