//! Member leases: the live consumers of a group for protocols that rebalance on the client
//! (RocketMQ). Each member renews its lease with RegisterMember; one that stops is forgotten
//! `ttl_ms` after its last renewal. No join/sync barrier: every gateway instance asks the core
//! for the same member list and the clients compute their own assignment from it.
//!
//! In memory, like Kafka group membership: after a core restart the members register again
//! within one heartbeat. Kept per (namespace, protocol type, group), apart from the Kafka
//! groups of groups.rs even under the same name.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tracing::debug;
use tributary_proto::v1;

use crate::Core;
use crate::error::{CoreError, CoreResult};
use crate::meta::validate_name;
use crate::streams::namespace_or_default;

/// RocketMQ's channel expiry (120 s), for a RegisterMember that gives no ttl.
const DEFAULT_TTL: Duration = Duration::from_secs(120);

struct Member {
    client_id: String,
    client_host: String,
    metadata: Bytes,
    expires: Instant,
}

#[derive(Default)]
struct LeaseGroup {
    /// Sorted by member id.
    members: BTreeMap<String, Member>,
    version: u64,
}

impl LeaseGroup {
    /// Drops expired members; whether any went.
    fn expire(&mut self, now: Instant) -> bool {
        let before = self.members.len();
        self.members.retain(|_, m| m.expires > now);
        self.members.len() != before
    }

    fn list(&self) -> Vec<v1::GroupMember> {
        self.members
            .iter()
            .map(|(id, m)| v1::GroupMember {
                member_id: id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                metadata: m.metadata.clone(),
                ..Default::default()
            })
            .collect()
    }
}

/// (namespace, protocol type, group) -> its members.
type Key = (String, String, String);

#[derive(Default)]
pub(crate) struct MemberLeases {
    groups: Mutex<LeaseGroups>,
}

#[derive(Default)]
struct LeaseGroups {
    by_key: HashMap<Key, LeaseGroup>,
    /// Versions come from one counter, so a group that emptied, was forgotten and came back
    /// never shows a version it had before.
    last_version: u64,
}

impl LeaseGroups {
    fn bump(&mut self, key: &Key) -> u64 {
        self.last_version += 1;
        let v = self.last_version;
        if let Some(g) = self.by_key.get_mut(key) {
            g.version = v;
        }
        v
    }
}

/// The answer to one call: members, whether the set changed, version.
pub(crate) struct Members {
    pub members: Vec<v1::GroupMember>,
    pub changed: bool,
    pub version: u64,
}

impl MemberLeases {
    pub(crate) fn register(
        &self,
        key: Key,
        member_id: &str,
        (client_id, client_host): (&str, &str),
        metadata: Bytes,
        ttl: Duration,
    ) -> Members {
        let now = Instant::now();
        let mut all = self.groups.lock();
        let g = all.by_key.entry(key.clone()).or_default();
        let mut changed = g.expire(now);
        let m = Member {
            client_id: client_id.to_string(),
            client_host: client_host.to_string(),
            metadata,
            expires: now + ttl,
        };
        if g.members.insert(member_id.to_string(), m).is_none() {
            changed = true;
            debug!(group = %key.2, member = member_id, "member registered");
        }
        let current = g.version;
        let version = if changed { all.bump(&key) } else { current };
        let members = all.by_key[&key].list();
        Members {
            members,
            changed,
            version,
        }
    }

    pub(crate) fn unregister(&self, key: Key, member_id: &str) -> Members {
        let now = Instant::now();
        let mut all = self.groups.lock();
        let Some(g) = all.by_key.get_mut(&key) else {
            return Members {
                members: Vec::new(),
                changed: false,
                version: 0,
            };
        };
        let mut changed = g.expire(now);
        changed |= g.members.remove(member_id).is_some();
        let members = g.list();
        let current = g.version;
        let version = if changed { all.bump(&key) } else { current };
        if members.is_empty() {
            all.by_key.remove(&key);
        }
        Members {
            members,
            changed,
            version,
        }
    }

    pub(crate) fn list(&self, key: Key) -> Members {
        let now = Instant::now();
        let mut all = self.groups.lock();
        let Some(g) = all.by_key.get_mut(&key) else {
            return Members {
                members: Vec::new(),
                changed: false,
                version: 0,
            };
        };
        let changed = g.expire(now);
        let members = g.list();
        let current = g.version;
        let version = if changed { all.bump(&key) } else { current };
        if members.is_empty() {
            all.by_key.remove(&key);
        }
        Members {
            members,
            changed,
            version,
        }
    }

    /// Drops expired members everywhere, and groups left without any.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut all = self.groups.lock();
        let expired: Vec<Key> = all
            .by_key
            .iter_mut()
            .filter_map(|(k, g)| g.expire(now).then(|| k.clone()))
            .collect();
        for k in &expired {
            all.bump(k);
        }
        all.by_key.retain(|_, g| !g.members.is_empty());
    }

    /// (group, protocol type) of every lease group with members in `ns`.
    pub(crate) fn groups_of(&self, ns: &str) -> Vec<(String, String)> {
        let now = Instant::now();
        self.groups
            .lock()
            .by_key
            .iter()
            .filter(|((n, _, _), g)| n == ns && g.members.values().any(|m| m.expires > now))
            .map(|((_, pt, group), _)| (group.clone(), pt.clone()))
            .collect()
    }
}

fn lease_key(namespace: &str, protocol_type: &str, group: &str) -> CoreResult<Key> {
    validate_name("group", group)?;
    if protocol_type.is_empty() {
        return Err(CoreError::InvalidArgument(
            "protocol_type is required for member leases (e.g. \"rocketmq\")".into(),
        ));
    }
    validate_name("protocol type", protocol_type)?;
    Ok((
        namespace_or_default(namespace).to_string(),
        protocol_type.to_string(),
        group.to_string(),
    ))
}

impl Core {
    pub fn register_member(
        &self,
        req: v1::RegisterMemberRequest,
    ) -> CoreResult<v1::RegisterMemberResponse> {
        self.check_running()?;
        let key = lease_key(&req.namespace, &req.protocol_type, &req.group)?;
        self.require_namespace(&key.0)?;
        validate_name("member id", &req.member_id)?;
        let ttl = match req.ttl_ms {
            0 => DEFAULT_TTL,
            t if t > 0 => Duration::from_millis(t as u64),
            t => {
                return Err(CoreError::InvalidArgument(format!(
                    "ttl_ms must be >= 0, got {t}"
                )));
            }
        };
        let m = self.inner.groups.leases.register(
            key,
            &req.member_id,
            (&req.client_id, &req.client_host),
            req.metadata,
            ttl,
        );
        Ok(v1::RegisterMemberResponse {
            members: m.members,
            changed: m.changed,
            version: m.version,
        })
    }

    pub fn unregister_member(
        &self,
        req: &v1::UnregisterMemberRequest,
    ) -> CoreResult<v1::UnregisterMemberResponse> {
        let key = lease_key(&req.namespace, &req.protocol_type, &req.group)?;
        let m = self.inner.groups.leases.unregister(key, &req.member_id);
        Ok(v1::UnregisterMemberResponse {
            changed: m.changed,
            members: m.members,
            version: m.version,
        })
    }

    pub fn list_members(
        &self,
        req: &v1::ListMembersRequest,
    ) -> CoreResult<v1::ListMembersResponse> {
        let key = lease_key(&req.namespace, &req.protocol_type, &req.group)?;
        let m = self.inner.groups.leases.list(key);
        Ok(v1::ListMembersResponse {
            members: m.members,
            version: m.version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(g: &str) -> Key {
        ("ns".into(), "rocketmq".into(), g.into())
    }

    #[test]
    fn versions_grow_with_changes_only_and_never_repeat() {
        let t = MemberLeases::default();
        let ttl = Duration::from_secs(60);
        let a = t.register(key("g"), "b", ("", "h"), Bytes::new(), ttl);
        assert!(a.changed);
        let again = t.register(key("g"), "b", ("core-2", "h2"), Bytes::new(), ttl);
        assert!(!again.changed);
        assert_eq!(again.version, a.version);
        assert_eq!(again.members[0].client_host, "h2");
        assert_eq!(again.members[0].client_id, "core-2");
        let two = t.register(key("g"), "a", ("", "h"), Bytes::new(), ttl);
        assert!(two.changed && two.version > a.version);
        assert_eq!(
            two.members
                .iter()
                .map(|m| m.member_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        let gone = t.unregister(key("g"), "a");
        let gone2 = t.unregister(key("g"), "b");
        assert!(gone.changed && gone2.changed && gone2.members.is_empty());
        assert_eq!(t.list(key("g")).version, 0);
        let back = t.register(key("g"), "a", ("", "h"), Bytes::new(), ttl);
        assert!(back.version > gone2.version);
    }
}
