//! What the adapters backed by a metadata server (etcd, Redis) share: deadlines and error
//! wording. Every failure names the store and the URL (never a password), so one log line says
//! which server is at fault.

use std::future::Future;
use std::time::Duration;

use crate::{Result, StorageError};

/// The longest a single operation waits for its server. The core treats a timeout as a
/// retriable failure; a hung connection must not freeze the metadata path.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest `connect` waits, so a wrong URL fails a server start within seconds.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The URL as it may appear in logs and errors: a password in the user-info part is masked.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') || user.is_empty() {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// Where a store lives, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub store: &'static str,
    pub url: String,
}

impl Origin {
    pub fn new(store: &'static str, url: &str) -> Self {
        Self {
            store,
            url: redact_url(url),
        }
    }

    pub fn error(&self, reason: impl std::fmt::Display) -> StorageError {
        StorageError::Meta(format!("{} at {}: {reason}", self.store, self.url))
    }

    /// Runs `fut` with a deadline; `what` names the operation in the error.
    pub async fn deadline<T>(
        &self,
        what: &str,
        limit: Duration,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(self.error(format_args!(
                "{what}: no answer within {} s{}",
                limit.as_secs(),
                unknown_outcome(what)
            ))),
        }
    }
}

/// What a failed write leaves behind: a txn whose answer never came may have been applied.
pub(crate) fn unknown_outcome(what: &str) -> &'static str {
    if what == "txn" {
        " (it may or may not have been applied)"
    } else {
        ""
    }
}

/// One line, whatever a client library put in its message.
pub(crate) fn one_line(text: impl std::fmt::Display) -> String {
    text.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn check_namespace(store: &str, namespace: &str) -> Result<()> {
    if namespace.is_empty() {
        return Err(StorageError::Meta(format!(
            "{store}: the namespace must not be empty (it keeps deployments sharing a server apart)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://:secret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact_url("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("http://user@host:2379"), "http://user@host:2379");
        assert_eq!(
            redact_url("redis://u:p@ss@host/x@y"),
            "redis://u:***@host/x@y"
        );
    }
}
