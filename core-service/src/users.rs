//! Users kept in the metadata store: the ones `tributary users` and Kafka's
//! AlterUserScramCredentials manage at run time, shared by every gateway process.
//!
//! The core never sees a password and does not interpret credentials: each is the text
//! `tributary passwd` prints (`SCRAM-SHA-256$...`, `RABBITMQ-SHA-256$...`); the text before
//! its first `$` names its mechanism, which is all the core reads of it. Gateways cache the
//! set and check the version on a login (as they do for access rules), so a user added through
//! one process logs in through every other within a second.
//!
//! Layout: `user/<name>` holds the user (JSON), `userversion/all` the version (JSON u64),
//! bumped in the same atomic write as every change.

use serde::{Deserialize, Serialize};
use tributary_proto::v1;
use tributary_storage::{Check, Op};

use crate::Core;
use crate::error::{CoreError, CoreResult};
use crate::meta::{self, from_json, to_json};

pub const USER: &str = "user";
pub const USER_VERSION: &str = "userversion";

/// Longest credential text accepted (a SCRAM-SHA-512 credential is under 300 bytes).
const MAX_CREDENTIAL: usize = 4096;
/// Credentials one user may hold (one per mechanism in practice).
const MAX_CREDENTIALS: usize = 16;
/// Namespaces one user may be granted.
const MAX_NAMESPACES: usize = 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct UserRecord {
    credentials: Vec<String>,
    namespaces: Vec<String>,
}

/// The mechanism a credential text names: what comes before its first `$`.
fn mechanism(credential: &str) -> &str {
    credential.split('$').next().unwrap_or_default()
}

fn check_credentials(credentials: &[String]) -> CoreResult<()> {
    if credentials.len() > MAX_CREDENTIALS {
        return Err(CoreError::InvalidArgument(format!(
            "at most {MAX_CREDENTIALS} credentials per user, got {}",
            credentials.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for c in credentials {
        let m = mechanism(c);
        if m.is_empty() || !c.contains('$') || c.len() > MAX_CREDENTIAL {
            return Err(CoreError::InvalidArgument(
                "a credential is MECHANISM$..., as `tributary passwd` prints it".into(),
            ));
        }
        if c.chars().any(|ch| ch.is_control() || ch.is_whitespace()) {
            return Err(CoreError::InvalidArgument(
                "a credential contains whitespace or control characters".into(),
            ));
        }
        if !seen.insert(m) {
            return Err(CoreError::InvalidArgument(format!(
                "two {m} credentials for one user"
            )));
        }
    }
    Ok(())
}

fn check_namespaces(namespaces: &[String]) -> CoreResult<()> {
    if namespaces.len() > MAX_NAMESPACES {
        return Err(CoreError::InvalidArgument(format!(
            "at most {MAX_NAMESPACES} namespaces per user, got {}",
            namespaces.len()
        )));
    }
    for n in namespaces {
        meta::validate_name("namespace", n)?;
    }
    Ok(())
}

impl UserRecord {
    fn to_proto(&self, name: &str, include_credentials: bool) -> v1::UserRecord {
        v1::UserRecord {
            name: name.to_string(),
            credentials: if include_credentials {
                self.credentials.clone()
            } else {
                Vec::new()
            },
            namespaces: self.namespaces.clone(),
            mechanisms: self
                .credentials
                .iter()
                .map(|c| mechanism(c).to_string())
                .collect(),
        }
    }
}

impl Core {
    async fn user_version(&self) -> CoreResult<(u64, Option<Vec<u8>>)> {
        let raw = self
            .inner
            .meta
            .get(&meta::key(USER_VERSION, &["all"]))
            .await?;
        match raw {
            None => Ok((0, None)),
            Some(raw) => Ok((from_json("user version", &raw)?, Some(raw.to_vec()))),
        }
    }

    async fn stored_user(&self, name: &str) -> CoreResult<Option<UserRecord>> {
        match self.inner.meta.get(&meta::key(USER, &[name])).await? {
            None => Ok(None),
            Some(raw) => Ok(Some(from_json("user", &raw)?)),
        }
    }

    /// Writes `op` and the next version atomically, if nobody changed the version since
    /// `current` was read (another core process on the same store); retried by the caller.
    async fn commit_user_change(
        &self,
        current: (u64, Option<Vec<u8>>),
        op: Op,
    ) -> CoreResult<Option<u64>> {
        let next = current.0 + 1;
        let version_key = meta::key(USER_VERSION, &["all"]);
        let applied = self
            .inner
            .meta
            .txn(
                vec![Check {
                    key: version_key.clone(),
                    value: current.1,
                }],
                vec![
                    op,
                    Op::Put {
                        key: version_key,
                        value: to_json(&next),
                    },
                ],
            )
            .await?;
        Ok(applied.then_some(next))
    }

    /// Creates or changes a user; returns (version, whether it was created).
    pub async fn put_user(&self, r: &v1::PutUserRequest) -> CoreResult<(u64, bool)> {
        self.check_running()?;
        let user = r
            .user
            .as_ref()
            .ok_or_else(|| CoreError::InvalidArgument("user is required".into()))?;
        meta::validate_name("user", &user.name)?;
        check_credentials(&user.credentials)?;
        check_namespaces(&user.namespaces)?;
        if user.credentials.is_empty() {
            return Err(CoreError::InvalidArgument(format!(
                "user '{}' needs at least one credential",
                user.name
            )));
        }
        if let Some(m) =
            user.credentials.iter().map(|c| mechanism(c)).find(|m| {
                !r.only_mechanisms.is_empty() && !r.only_mechanisms.iter().any(|o| o == m)
            })
        {
            return Err(CoreError::InvalidArgument(format!(
                "credential {m} is not among only_mechanisms"
            )));
        }
        let _guard = self.inner.admin.lock().await;
        loop {
            let current = self.user_version().await?;
            let stored = self.stored_user(&user.name).await?;
            match (&stored, r.must_not_exist, r.must_exist) {
                (Some(_), true, _) => return Err(CoreError::UserExists(user.name.clone())),
                (None, _, true) => return Err(CoreError::UserNotFound(user.name.clone())),
                _ => {}
            }
            let mut next = UserRecord {
                credentials: user.credentials.clone(),
                namespaces: user.namespaces.clone(),
            };
            if let Some(old) = &stored {
                if r.keep_namespaces {
                    next.namespaces = old.namespaces.clone();
                }
                if !r.only_mechanisms.is_empty() {
                    // Keep the credentials of the mechanisms this call does not touch.
                    let mut kept: Vec<String> = old
                        .credentials
                        .iter()
                        .filter(|c| !r.only_mechanisms.iter().any(|m| m == mechanism(c)))
                        .cloned()
                        .collect();
                    kept.extend(next.credentials);
                    next.credentials = kept;
                }
            }
            next.namespaces.sort();
            next.namespaces.dedup();
            let op = Op::Put {
                key: meta::key(USER, &[&user.name]),
                value: to_json(&next),
            };
            if let Some(v) = self.commit_user_change(current, op).await? {
                return Ok((v, stored.is_none()));
            }
        }
    }

    /// Deletes a user, or only its credentials of `only_mechanisms` (the user goes when none
    /// is left); returns the version.
    pub async fn delete_user(&self, name: &str, only_mechanisms: &[String]) -> CoreResult<u64> {
        self.check_running()?;
        meta::validate_name("user", name)?;
        let _guard = self.inner.admin.lock().await;
        loop {
            let current = self.user_version().await?;
            let Some(mut stored) = self.stored_user(name).await? else {
                return Err(CoreError::UserNotFound(name.to_string()));
            };
            let key = meta::key(USER, &[name]);
            let op = if only_mechanisms.is_empty() {
                Op::Delete { key }
            } else {
                let before = stored.credentials.len();
                stored
                    .credentials
                    .retain(|c| !only_mechanisms.iter().any(|m| m == mechanism(c)));
                if stored.credentials.len() == before {
                    return Err(CoreError::UserNotFound(format!(
                        "{name} (no {} credential)",
                        only_mechanisms.join(" or ")
                    )));
                }
                if stored.credentials.is_empty() {
                    Op::Delete { key }
                } else {
                    Op::Put {
                        key,
                        value: to_json(&stored),
                    }
                }
            };
            if let Some(v) = self.commit_user_change(current, op).await? {
                return Ok(v);
            }
        }
    }

    /// Every stored user (sorted by name) and the version; `None` for the users when the
    /// version is still `known_version` (and not 0).
    pub async fn list_users(
        &self,
        known_version: u64,
        include_credentials: bool,
    ) -> CoreResult<(u64, Option<Vec<v1::UserRecord>>)> {
        self.check_running()?;
        loop {
            let (version, _) = self.user_version().await?;
            if version != 0 && version == known_version {
                return Ok((version, None));
            }
            let mut users = Vec::new();
            for (key, raw) in self
                .inner
                .meta
                .scan_prefix(&meta::key(USER, &[]), usize::MAX)
                .await?
            {
                let name = meta::parts(USER, &key).concat();
                let r: UserRecord = from_json("user", &raw)?;
                users.push(r.to_proto(&name, include_credentials));
            }
            // A change between the two reads: read again so that users and version agree.
            if self.user_version().await?.0 == version {
                return Ok((version, Some(users)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_checked_for_shape_not_meaning() {
        assert!(check_credentials(&["SCRAM-SHA-256$4096:abc$def:ghi".into()]).is_ok());
        assert!(check_credentials(&["nodollar".into()]).is_err());
        assert!(check_credentials(&["$x".into()]).is_err());
        assert!(check_credentials(&["A$x y".into()]).is_err());
        assert!(check_credentials(&["A$1".into(), "A$2".into()]).is_err());
        assert_eq!(mechanism("RABBITMQ-SHA-256$abc"), "RABBITMQ-SHA-256");
    }
}
