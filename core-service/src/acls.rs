//! Access rules: protocol-neutral access-control entries (principal, resource type, name,
//! pattern type, operation, permission, host), kept durably per namespace in the metadata
//! store and versioned so that every gateway process can keep a cache and notice a change.
//!
//! The core does not interpret resource types or operations: they are each gateway's
//! vocabulary (the Kafka gateway's ACLs). It checks that a rule is well formed, stores it once,
//! and bumps the namespace's version in the same atomic write as every change.
//!
//! Layout: `acl/<ns>\0<type>\0<pattern>\0<name>\0<principal>\0<host>\0<operation>\0<permission>`
//! holds the rule (JSON), `aclversion/<ns>` the version (JSON u64).

use serde::{Deserialize, Serialize};
use tributary_proto::v1;
use tributary_storage::{Check, Op};

use crate::Core;
use crate::error::{CoreError, CoreResult};
use crate::meta::{self, from_json, to_json};
use crate::streams::namespace_or_default;

pub const ACL: &str = "acl";
pub const ACL_VERSION: &str = "aclversion";

/// Longest principal, resource name, type, operation or host accepted.
const MAX_FIELD: usize = 1024;
/// Rules one call may add or remove.
const MAX_RULES_PER_CALL: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RuleRecord {
    principal: String,
    resource_type: String,
    resource_name: String,
    prefixed: bool,
    operation: String,
    deny: bool,
    host: String,
}

impl RuleRecord {
    fn from_proto(r: &v1::AccessRule) -> CoreResult<Self> {
        let field = |what: &str, v: &str, may_be_empty: bool| -> CoreResult<()> {
            if (!may_be_empty && v.is_empty()) || v.len() > MAX_FIELD {
                return Err(CoreError::InvalidArgument(format!(
                    "access rule {what} must be 1 to {MAX_FIELD} bytes, got {}",
                    v.len()
                )));
            }
            if v.chars().any(char::is_control) {
                return Err(CoreError::InvalidArgument(format!(
                    "access rule {what} '{}' contains control characters",
                    v.escape_debug()
                )));
            }
            Ok(())
        };
        field("principal", &r.principal, false)?;
        field("resource_type", &r.resource_type, false)?;
        field("resource_name", &r.resource_name, false)?;
        field("operation", &r.operation, false)?;
        field("host", &r.host, false)?;
        let prefixed = match v1::AccessPatternType::try_from(r.pattern_type) {
            Ok(v1::AccessPatternType::AccessPatternLiteral) => false,
            Ok(v1::AccessPatternType::AccessPatternPrefixed) => true,
            _ => {
                return Err(CoreError::InvalidArgument(format!(
                    "access rule pattern_type must be LITERAL or PREFIXED, got {}",
                    r.pattern_type
                )));
            }
        };
        let deny = match v1::AccessPermission::try_from(r.permission) {
            Ok(v1::AccessPermission::AccessAllow) => false,
            Ok(v1::AccessPermission::AccessDeny) => true,
            _ => {
                return Err(CoreError::InvalidArgument(format!(
                    "access rule permission must be ALLOW or DENY, got {}",
                    r.permission
                )));
            }
        };
        Ok(Self {
            principal: r.principal.clone(),
            resource_type: r.resource_type.clone(),
            resource_name: r.resource_name.clone(),
            prefixed,
            operation: r.operation.clone(),
            deny,
            host: r.host.clone(),
        })
    }

    fn to_proto(&self) -> v1::AccessRule {
        v1::AccessRule {
            principal: self.principal.clone(),
            resource_type: self.resource_type.clone(),
            resource_name: self.resource_name.clone(),
            pattern_type: if self.prefixed {
                v1::AccessPatternType::AccessPatternPrefixed
            } else {
                v1::AccessPatternType::AccessPatternLiteral
            } as i32,
            operation: self.operation.clone(),
            permission: if self.deny {
                v1::AccessPermission::AccessDeny
            } else {
                v1::AccessPermission::AccessAllow
            } as i32,
            host: self.host.clone(),
        }
    }

    fn key(&self, ns: &str) -> Vec<u8> {
        meta::key(
            ACL,
            &[
                ns,
                &self.resource_type,
                if self.prefixed { "prefixed" } else { "literal" },
                &self.resource_name,
                &self.principal,
                &self.host,
                &self.operation,
                if self.deny { "deny" } else { "allow" },
            ],
        )
    }
}

fn check_count(n: usize) -> CoreResult<()> {
    if n > MAX_RULES_PER_CALL {
        return Err(CoreError::InvalidArgument(format!(
            "at most {MAX_RULES_PER_CALL} access rules per call, got {n}"
        )));
    }
    Ok(())
}

impl Core {
    async fn access_version(&self, ns: &str) -> CoreResult<(u64, Option<Vec<u8>>)> {
        let raw = self.inner.meta.get(&meta::key(ACL_VERSION, &[ns])).await?;
        match raw {
            None => Ok((0, None)),
            Some(raw) => Ok((from_json("access rule version", &raw)?, Some(raw.to_vec()))),
        }
    }

    /// Writes `ops` and the next version atomically, if nobody changed the version since
    /// `current` was read (another core process on the same store); retried by the caller.
    async fn commit_access_change(
        &self,
        ns: &str,
        current: (u64, Option<Vec<u8>>),
        mut ops: Vec<Op>,
    ) -> CoreResult<Option<u64>> {
        let next = current.0 + 1;
        let version_key = meta::key(ACL_VERSION, &[ns]);
        ops.push(Op::Put {
            key: version_key.clone(),
            value: to_json(&next),
        });
        let applied = self
            .inner
            .meta
            .txn(
                vec![Check {
                    key: version_key,
                    value: current.1,
                }],
                ops,
            )
            .await?;
        Ok(applied.then_some(next))
    }

    /// Adds access rules to a namespace; returns (version, how many were new).
    pub async fn create_access_rules(
        &self,
        namespace: &str,
        rules: &[v1::AccessRule],
    ) -> CoreResult<(u64, u32)> {
        self.check_running()?;
        let ns = namespace_or_default(namespace).to_string();
        meta::validate_name("namespace", &ns)?;
        check_count(rules.len())?;
        let records = rules
            .iter()
            .map(RuleRecord::from_proto)
            .collect::<CoreResult<Vec<_>>>()?;
        let _guard = self.inner.admin.lock().await;
        loop {
            let current = self.access_version(&ns).await?;
            let mut ops = Vec::new();
            let mut keys = std::collections::BTreeSet::new();
            for r in &records {
                let key = r.key(&ns);
                if keys.contains(&key) || self.inner.meta.get(&key).await?.is_some() {
                    continue;
                }
                keys.insert(key.clone());
                ops.push(Op::Put {
                    key,
                    value: to_json(r),
                });
            }
            if ops.is_empty() {
                return Ok((current.0, 0));
            }
            let created = ops.len() as u32;
            if let Some(v) = self.commit_access_change(&ns, current, ops).await? {
                return Ok((v, created));
            }
        }
    }

    /// Removes exactly these rules; returns the ones that existed, and the version.
    pub async fn delete_access_rules(
        &self,
        namespace: &str,
        rules: &[v1::AccessRule],
    ) -> CoreResult<(Vec<v1::AccessRule>, u64)> {
        self.check_running()?;
        let ns = namespace_or_default(namespace).to_string();
        check_count(rules.len())?;
        let records = rules
            .iter()
            .map(RuleRecord::from_proto)
            .collect::<CoreResult<Vec<_>>>()?;
        let _guard = self.inner.admin.lock().await;
        loop {
            let current = self.access_version(&ns).await?;
            let mut ops = Vec::new();
            let mut deleted = Vec::new();
            let mut keys = std::collections::BTreeSet::new();
            for r in &records {
                let key = r.key(&ns);
                if keys.contains(&key) || self.inner.meta.get(&key).await?.is_none() {
                    continue;
                }
                keys.insert(key.clone());
                ops.push(Op::Delete { key });
                deleted.push(r.to_proto());
            }
            if ops.is_empty() {
                return Ok((Vec::new(), current.0));
            }
            if let Some(v) = self.commit_access_change(&ns, current, ops).await? {
                return Ok((deleted, v));
            }
        }
    }

    /// The namespace's rules and version; `None` for the rules when the version is still
    /// `known_version` (and not 0).
    pub async fn list_access_rules(
        &self,
        namespace: &str,
        known_version: u64,
    ) -> CoreResult<(u64, Option<Vec<v1::AccessRule>>)> {
        self.check_running()?;
        let ns = namespace_or_default(namespace).to_string();
        loop {
            let (version, _) = self.access_version(&ns).await?;
            if version != 0 && version == known_version {
                return Ok((version, None));
            }
            let mut rules = Vec::new();
            for (_, raw) in self
                .inner
                .meta
                .scan_prefix(&meta::prefix(ACL, &[&ns]), usize::MAX)
                .await?
            {
                let r: RuleRecord = from_json("access rule", &raw)?;
                rules.push(r.to_proto());
            }
            // A change between the two reads: read again so that rules and version agree.
            if self.access_version(&ns).await?.0 == version {
                return Ok((version, Some(rules)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> v1::AccessRule {
        v1::AccessRule {
            principal: "User:alice".into(),
            resource_type: "topic".into(),
            resource_name: name.into(),
            pattern_type: v1::AccessPatternType::AccessPatternPrefixed as i32,
            operation: "write".into(),
            permission: v1::AccessPermission::AccessAllow as i32,
            host: "*".into(),
        }
    }

    #[test]
    fn rules_round_trip_and_bad_ones_are_refused() {
        let r = rule("orders.");
        assert_eq!(RuleRecord::from_proto(&r).unwrap().to_proto(), r);
        let mut bad = rule("x");
        bad.pattern_type = 7;
        assert!(RuleRecord::from_proto(&bad).is_err());
        let mut bad = rule("x");
        bad.permission = 0;
        assert!(RuleRecord::from_proto(&bad).is_err());
        assert!(RuleRecord::from_proto(&rule("")).is_err());
        assert!(RuleRecord::from_proto(&rule("a\0b")).is_err());
    }
}
