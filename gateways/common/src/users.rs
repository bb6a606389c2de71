//! The users a gateway checks logins against: the config file's `[[users]]` and the users
//! kept in the core (`tributary users`, Kafka's AlterUserScramCredentials), merged.
//!
//! The core's set is cached and checked for a change on a login once the cache is older than
//! [`DEFAULT_REFRESH`] (`ListUsers { known_version }`, a few bytes when nothing changed), so a
//! user added or deleted through any process is seen by every gateway within that time plus
//! one login. A config-file user wins over a core user of the same name: the file is the
//! operator's, and `tributary users` refuses names it defines.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tracing::warn;
use tributary_proto::v1;

use crate::CoreClient;
use crate::auth::{REFUSAL_LOG_INTERVAL, Users};

/// How stale the cached core users may get before a login checks the core's version.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(1);

struct Cached {
    merged: Arc<Users>,
    version: u64,
    checked_at: Option<Instant>,
}

/// Config-file users, plus the core's when a core client is given.
pub struct UserDirectory {
    configured: Users,
    core: Option<CoreClient>,
    refresh: Duration,
    cache: RwLock<Cached>,
    /// One refresh at a time; the others wait for it and use its result.
    refreshing: tokio::sync::Mutex<()>,
    unavailable_logged: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for UserDirectory {
    // Names only: never the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserDirectory")
            .field("configured", &self.configured.names())
            .field("core", &self.core.is_some())
            .finish()
    }
}

impl UserDirectory {
    /// The config file's users only (tests, and gateways without a core user store).
    pub fn fixed(configured: Users) -> Self {
        Self::build(configured, None, DEFAULT_REFRESH)
    }

    /// The config file's users and the core's.
    pub fn with_core(configured: Users, core: CoreClient, refresh: Duration) -> Self {
        Self::build(configured, Some(core), refresh)
    }

    fn build(configured: Users, core: Option<CoreClient>, refresh: Duration) -> Self {
        Self {
            cache: RwLock::new(Cached {
                merged: Arc::new(configured.clone()),
                version: 0,
                checked_at: None,
            }),
            configured,
            core,
            refresh,
            refreshing: tokio::sync::Mutex::new(()),
            unavailable_logged: Mutex::new(None),
        }
    }

    /// The config file's users (what does not depend on the core).
    pub fn configured(&self) -> &Users {
        &self.configured
    }

    /// Every user a login may name now.
    pub async fn current(&self) -> Arc<Users> {
        let Some(core) = &self.core else {
            return self.read().merged.clone();
        };
        if let Some(fresh) = self.fresh() {
            return fresh;
        }
        let _one = self.refreshing.lock().await;
        // Someone else may have refreshed while this login waited.
        if let Some(fresh) = self.fresh() {
            return fresh;
        }
        self.load(core).await
    }

    /// Makes the next login ask the core (after a change made through this process).
    pub fn invalidate(&self) {
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .checked_at = None;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self) -> Option<Arc<Users>> {
        let c = self.read();
        c.checked_at
            .is_some_and(|t| t.elapsed() < self.refresh)
            .then(|| c.merged.clone())
    }

    async fn load(&self, core: &CoreClient) -> Arc<Users> {
        let known = self.read().version;
        let r = core
            .admin
            .clone()
            .list_users(v1::ListUsersRequest {
                known_version: known,
                include_credentials: true,
            })
            .await;
        let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(r) => {
                let r = r.into_inner();
                if !r.unchanged {
                    c.merged = Arc::new(self.merge(&r.users));
                }
                c.version = r.version;
                c.checked_at = Some(Instant::now());
            }
            Err(status) => {
                // Keep what was loaded; try again on the next login.
                let mut logged = self
                    .unavailable_logged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if logged.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    *logged = Some(Instant::now());
                    warn!(error = %status.message(), "cannot load the users kept in the core; using the config file's and the last ones loaded");
                }
            }
        }
        c.merged.clone()
    }

    fn merge(&self, stored: &[v1::UserRecord]) -> Users {
        let mut merged = self.configured.clone();
        for u in stored {
            if self.configured.contains(&u.name) {
                continue;
            }
            // A credential this build cannot read (a newer kind) leaves the user out rather
            // than letting it in with fewer checks.
            match merged.add_credential_texts(&u.name, &u.credentials) {
                Ok(()) => merged.grant_namespaces(&u.name, u.namespaces.clone()),
                Err(e) => {
                    warn!(user = %u.name.escape_debug(), error = %e, "a user kept in the core has a credential this gateway cannot read; it cannot log in here");
                }
            }
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ScramCredential, ScramHash};

    fn stored(name: &str, password: &str, namespaces: &[&str]) -> v1::UserRecord {
        v1::UserRecord {
            name: name.into(),
            credentials: vec![ScramCredential::derive(ScramHash::Sha256, password, 4096).to_text()],
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            mechanisms: Vec::new(),
        }
    }

    #[test]
    fn the_config_files_user_wins_and_an_unreadable_credential_keeps_a_user_out() {
        let mut configured = Users::new();
        configured.add(
            "admin",
            vec![ScramCredential::derive(ScramHash::Sha256, "file-pw", 4096)],
        );
        let dir = UserDirectory::fixed(configured);
        let mut odd = stored("odd", "x", &[]);
        odd.credentials = vec!["FUTURE-HASH$abc".into()];
        let merged = dir.merge(&[
            stored("admin", "core-pw", &["/"]),
            stored("alice", "alice-pw", &["/", "prod"]),
            odd,
        ]);
        assert!(merged.verify_password("admin", "file-pw"));
        assert!(!merged.verify_password("admin", "core-pw"));
        assert!(
            !merged.granted("admin", "/"),
            "the file's admin gets no core grants"
        );
        assert!(merged.verify_password("alice", "alice-pw"));
        assert!(merged.granted("alice", "prod") && !merged.granted("alice", "dev"));
        assert!(!merged.contains("odd"));
    }
}
