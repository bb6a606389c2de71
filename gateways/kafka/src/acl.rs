//! Kafka ACLs: the authorizer (Kafka's semantics: literal, prefixed and wildcard resource
//! patterns, principal and host wildcards, DENY over ALLOW, implied operations, super users,
//! `allow.everyone.if.no.acl.found`) and its cache of the core's access rules.
//!
//! ACLs are the core's neutral access rules (`Admin.CreateAccessRules` and friends) in the
//! gateway's namespace, so they survive restarts and every gateway process in front of one
//! core enforces the same set. Each gateway caches them: the first request after
//! [`AuthorizerConfig::refresh`] (1 s by default) has passed asks the core whether the rules'
//! version moved (`ListAccessRules { known_version }`, a few bytes when nothing changed) and
//! reloads them if it did; a change made through this gateway reloads at once. A change
//! made through another gateway is therefore enforced here within `refresh` plus one core
//! round trip. While the rules cannot be loaded (core unreachable before the first load)
//! everything but super users is refused.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tracing::warn;
use tributary_gateway_common::CoreClient;
use tributary_gateway_common::auth::{MAX_TRACKED_PEERS, REFUSAL_LOG_INTERVAL, RefusalLimiter};
use tributary_proto::v1;

/// The name of the one cluster resource (Kafka's `kafka-cluster`).
pub const CLUSTER_NAME: &str = "kafka-cluster";
/// "Not provided" in authorized-operations fields.
pub const NO_OPERATIONS: i32 = i32::MIN;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    Topic,
    Group,
    Cluster,
    TransactionalId,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Topic,
        ResourceType::Group,
        ResourceType::Cluster,
        ResourceType::TransactionalId,
    ];

    pub fn code(self) -> i8 {
        match self {
            ResourceType::Topic => 2,
            ResourceType::Group => 3,
            ResourceType::Cluster => 4,
            ResourceType::TransactionalId => 5,
        }
    }

    pub fn from_code(code: i8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The word stored in the core's access rules.
    pub fn word(self) -> &'static str {
        match self {
            ResourceType::Topic => "topic",
            ResourceType::Group => "group",
            ResourceType::Cluster => "cluster",
            ResourceType::TransactionalId => "transactional_id",
        }
    }

    fn from_word(w: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.word() == w)
    }

    /// The operations Kafka defines for this resource type (authorized-operations fields).
    fn operations(self) -> &'static [Operation] {
        use Operation::*;
        match self {
            ResourceType::Topic => &[
                Read,
                Write,
                Create,
                Delete,
                Alter,
                Describe,
                DescribeConfigs,
                AlterConfigs,
            ],
            ResourceType::Group => &[Read, Describe, Delete],
            ResourceType::Cluster => &[
                Create,
                ClusterAction,
                DescribeConfigs,
                AlterConfigs,
                IdempotentWrite,
                Alter,
                Describe,
            ],
            ResourceType::TransactionalId => &[Describe, Write],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    All,
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
    ClusterAction,
    DescribeConfigs,
    AlterConfigs,
    IdempotentWrite,
}

impl Operation {
    pub const ALL_OPS: [Operation; 11] = [
        Operation::All,
        Operation::Read,
        Operation::Write,
        Operation::Create,
        Operation::Delete,
        Operation::Alter,
        Operation::Describe,
        Operation::ClusterAction,
        Operation::DescribeConfigs,
        Operation::AlterConfigs,
        Operation::IdempotentWrite,
    ];

    pub fn code(self) -> i8 {
        match self {
            Operation::All => 2,
            Operation::Read => 3,
            Operation::Write => 4,
            Operation::Create => 5,
            Operation::Delete => 6,
            Operation::Alter => 7,
            Operation::Describe => 8,
            Operation::ClusterAction => 9,
            Operation::DescribeConfigs => 10,
            Operation::AlterConfigs => 11,
            Operation::IdempotentWrite => 12,
        }
    }

    pub fn from_code(code: i8) -> Option<Self> {
        Self::ALL_OPS.into_iter().find(|o| o.code() == code)
    }

    /// The word stored in the core's access rules (and used in logs and metrics).
    pub fn word(self) -> &'static str {
        match self {
            Operation::All => "all",
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Alter => "alter",
            Operation::Describe => "describe",
            Operation::ClusterAction => "cluster_action",
            Operation::DescribeConfigs => "describe_configs",
            Operation::AlterConfigs => "alter_configs",
            Operation::IdempotentWrite => "idempotent_write",
        }
    }

    fn from_word(w: &str) -> Option<Self> {
        Self::ALL_OPS.into_iter().find(|o| o.word() == w)
    }

    /// Whether an ALLOW ACL for `self` allows `wanted`: ALL allows everything; READ, WRITE,
    /// DELETE and ALTER imply DESCRIBE; ALTER_CONFIGS implies DESCRIBE_CONFIGS.
    fn allows(self, wanted: Operation) -> bool {
        use Operation::*;
        self == All
            || self == wanted
            || (wanted == Describe && matches!(self, Read | Write | Delete | Alter))
            || (wanted == DescribeConfigs && self == AlterConfigs)
    }

    /// Whether a DENY ACL for `self` denies `wanted` (no implication but ALL).
    fn denies(self, wanted: Operation) -> bool {
        self == Operation::All || self == wanted
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatternType {
    Literal,
    Prefixed,
}

impl PatternType {
    pub fn code(self) -> i8 {
        match self {
            PatternType::Literal => 3,
            PatternType::Prefixed => 4,
        }
    }
}

/// One ACL: ALLOW or DENY `principal` from `host` to do `operation` on the resources the
/// pattern covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Acl {
    pub principal: String,
    pub resource_type: ResourceType,
    pub name: String,
    pub pattern: PatternType,
    pub operation: Operation,
    pub deny: bool,
    pub host: String,
}

impl Acl {
    /// Kafka's permission code (2 DENY, 3 ALLOW).
    pub fn permission_code(&self) -> i8 {
        if self.deny { 2 } else { 3 }
    }

    fn covers(&self, rt: ResourceType, name: &str) -> bool {
        self.resource_type == rt
            && match self.pattern {
                PatternType::Literal => self.name == name || self.name == "*",
                PatternType::Prefixed => name.starts_with(self.name.as_str()),
            }
    }

    fn applies_to(&self, principal: &str, host: &str) -> bool {
        (self.principal == principal || self.principal == "User:*")
            && (self.host == "*" || self.host == host)
    }

    pub fn to_rule(&self) -> v1::AccessRule {
        v1::AccessRule {
            principal: self.principal.clone(),
            resource_type: self.resource_type.word().into(),
            resource_name: self.name.clone(),
            pattern_type: match self.pattern {
                PatternType::Literal => v1::AccessPatternType::AccessPatternLiteral,
                PatternType::Prefixed => v1::AccessPatternType::AccessPatternPrefixed,
            } as i32,
            operation: self.operation.word().into(),
            permission: if self.deny {
                v1::AccessPermission::AccessDeny
            } else {
                v1::AccessPermission::AccessAllow
            } as i32,
            host: self.host.clone(),
        }
    }

    /// `None` for a rule in a vocabulary this gateway does not know (written by another
    /// gateway or a newer version): it is ignored, never matched.
    pub fn from_rule(r: &v1::AccessRule) -> Option<Self> {
        Some(Self {
            principal: r.principal.clone(),
            resource_type: ResourceType::from_word(&r.resource_type)?,
            name: r.resource_name.clone(),
            pattern: match v1::AccessPatternType::try_from(r.pattern_type).ok()? {
                v1::AccessPatternType::AccessPatternLiteral => PatternType::Literal,
                v1::AccessPatternType::AccessPatternPrefixed => PatternType::Prefixed,
                v1::AccessPatternType::Unspecified => return None,
            },
            operation: Operation::from_word(&r.operation)?,
            deny: match v1::AccessPermission::try_from(r.permission).ok()? {
                v1::AccessPermission::AccessAllow => false,
                v1::AccessPermission::AccessDeny => true,
                v1::AccessPermission::Unspecified => return None,
            },
            host: r.host.clone(),
        })
    }
}

/// Who is asking: `User:<name>` and the client's address.
#[derive(Debug, Clone)]
pub struct Requester {
    pub principal: String,
    pub host: String,
}

impl Requester {
    pub fn new(user: &str, peer: IpAddr) -> Self {
        Self {
            principal: format!("User:{user}"),
            host: peer.to_canonical().to_string(),
        }
    }
}

/// The policy around the ACLs.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Principals (`User:<name>`) allowed everything.
    pub super_users: HashSet<String>,
    /// Kafka's allow.everyone.if.no.acl.found: a resource no ACL covers is open to all.
    pub allow_if_no_acl: bool,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// A DENY ACL matched.
    DenyAcl,
    /// No ALLOW ACL matched.
    NoAllowAcl,
    /// The ACLs could not be loaded from the core.
    AclsUnavailable,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::DenyAcl => "deny_acl",
            Denial::NoAllowAcl => "no_allow_acl",
            Denial::AclsUnavailable => "acls_unavailable",
        }
    }
}

/// A snapshot of the ACLs with the policy: the authorizer's decisions, without I/O.
#[derive(Debug, Clone, Default)]
pub struct AclSet {
    pub acls: Vec<Acl>,
    /// False until the rules were loaded from the core once.
    pub loaded: bool,
}

impl AclSet {
    pub fn new(acls: Vec<Acl>) -> Self {
        Self { acls, loaded: true }
    }

    /// Kafka's decision for `who` doing `op` on the resource `(rt, name)`.
    pub fn authorize(
        &self,
        policy: &Policy,
        who: &Requester,
        op: Operation,
        rt: ResourceType,
        name: &str,
    ) -> Result<(), Denial> {
        if policy.super_users.contains(&who.principal) {
            return Ok(());
        }
        if !self.loaded {
            return Err(Denial::AclsUnavailable);
        }
        let mut covering = self.acls.iter().filter(|a| a.covers(rt, name)).peekable();
        if covering.peek().is_none() {
            return if policy.allow_if_no_acl {
                Ok(())
            } else {
                Err(Denial::NoAllowAcl)
            };
        }
        let mut allowed = false;
        for a in covering.filter(|a| a.applies_to(&who.principal, &who.host)) {
            if a.deny && a.operation.denies(op) {
                return Err(Denial::DenyAcl);
            }
            allowed |= !a.deny && a.operation.allows(op);
        }
        if allowed {
            Ok(())
        } else {
            Err(Denial::NoAllowAcl)
        }
    }

    /// Whether `who` may do `op` on some resource of type `rt` (Kafka's
    /// authorizeByResourceType, used for idempotent producers: WRITE on any topic). An
    /// ALLOW counts unless a DENY for the same operation covers everything it allows.
    pub fn authorize_any(
        &self,
        policy: &Policy,
        who: &Requester,
        op: Operation,
        rt: ResourceType,
    ) -> bool {
        if policy.super_users.contains(&who.principal) {
            return true;
        }
        if !self.loaded {
            return false;
        }
        let of_type: Vec<&Acl> = self.acls.iter().filter(|a| a.resource_type == rt).collect();
        if of_type.is_empty() {
            return policy.allow_if_no_acl;
        }
        let mine: Vec<&&Acl> = of_type
            .iter()
            .filter(|a| a.applies_to(&who.principal, &who.host))
            .collect();
        let denies: Vec<&&&Acl> = mine
            .iter()
            .filter(|a| a.deny && a.operation.denies(op))
            .collect();
        let denied_all = |name: &str, prefixed: bool| {
            denies.iter().any(|d| match d.pattern {
                PatternType::Literal => d.name == "*" || (!prefixed && d.name == name),
                PatternType::Prefixed => name.starts_with(d.name.as_str()),
            })
        };
        mine.iter()
            .filter(|a| !a.deny && a.operation.allows(op))
            .any(|a| !denied_all(&a.name, a.pattern == PatternType::Prefixed))
    }

    /// Kafka's authorized-operations bit field for a resource.
    pub fn authorized_operations(
        &self,
        policy: &Policy,
        who: &Requester,
        rt: ResourceType,
        name: &str,
    ) -> i32 {
        rt.operations()
            .iter()
            .filter(|op| self.authorize(policy, who, **op, rt, name).is_ok())
            .fold(0, |bits, op| bits | (1 << op.code()))
    }
}

/// How the authorizer runs.
#[derive(Debug, Clone)]
pub struct AuthorizerConfig {
    /// SASL user names allowed everything.
    pub super_users: Vec<String>,
    pub allow_if_no_acl: bool,
    /// How stale the cached ACLs may get before a request checks the core's version.
    pub refresh: Duration,
}

impl AuthorizerConfig {
    pub fn new(super_users: Vec<String>, allow_if_no_acl: bool) -> Self {
        Self {
            super_users,
            allow_if_no_acl,
            refresh: Duration::from_secs(1),
        }
    }
}

struct Cached {
    set: Arc<AclSet>,
    version: u64,
    checked_at: Option<Instant>,
}

/// The gateway's authorizer: policy, cached ACLs and the refusal log.
pub struct Authorizer {
    pub policy: Policy,
    namespace: String,
    refresh: Duration,
    cache: RwLock<Cached>,
    /// One refresh at a time; the others wait for it and use its result.
    refreshing: tokio::sync::Mutex<()>,
    refusals: RefusalLimiter,
    unavailable_logged: parking_lot::Mutex<Option<Instant>>,
}

impl Authorizer {
    pub fn new(config: &AuthorizerConfig, namespace: &str) -> Self {
        Self {
            policy: Policy {
                super_users: config
                    .super_users
                    .iter()
                    .map(|u| format!("User:{u}"))
                    .collect(),
                allow_if_no_acl: config.allow_if_no_acl,
            },
            namespace: namespace.to_string(),
            refresh: config.refresh,
            cache: RwLock::new(Cached {
                set: Arc::new(AclSet::default()),
                version: 0,
                checked_at: None,
            }),
            refreshing: tokio::sync::Mutex::new(()),
            refusals: RefusalLimiter::new(REFUSAL_LOG_INTERVAL, MAX_TRACKED_PEERS),
            unavailable_logged: parking_lot::Mutex::new(None),
        }
    }

    /// The current ACLs, checked against the core's version when older than `refresh`.
    pub async fn snapshot(&self, core: &CoreClient) -> Arc<AclSet> {
        {
            let c = self.cache.read();
            if c.checked_at.is_some_and(|t| t.elapsed() < self.refresh) {
                return c.set.clone();
            }
        }
        let _one = self.refreshing.lock().await;
        // Someone else may have refreshed while this request waited.
        {
            let c = self.cache.read();
            if c.checked_at.is_some_and(|t| t.elapsed() < self.refresh) {
                return c.set.clone();
            }
        }
        self.load(core, false).await
    }

    /// Loads the rules now (after a change through this gateway, and for DescribeAcls).
    pub async fn reload(&self, core: &CoreClient) -> Arc<AclSet> {
        let _one = self.refreshing.lock().await;
        self.load(core, true).await
    }

    async fn load(&self, core: &CoreClient, full: bool) -> Arc<AclSet> {
        let known = if full { 0 } else { self.cache.read().version };
        let r = core
            .admin
            .clone()
            .list_access_rules(v1::ListAccessRulesRequest {
                namespace: self.namespace.clone(),
                known_version: known,
            })
            .await;
        let mut c = self.cache.write();
        match r {
            Ok(r) => {
                let r = r.into_inner();
                if !r.unchanged {
                    c.set = Arc::new(AclSet::new(
                        r.rules.iter().filter_map(Acl::from_rule).collect(),
                    ));
                }
                c.version = r.version;
                c.checked_at = Some(Instant::now());
            }
            Err(status) => {
                // Keep what was loaded; try again on the next request.
                let mut logged = self.unavailable_logged.lock();
                if logged.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    *logged = Some(Instant::now());
                    warn!(error = %status.message(), loaded = c.set.loaded, "kafka: cannot load the ACLs from the core; using the last ones loaded (none: only super users are let in)");
                }
            }
        }
        c.set.clone()
    }

    /// Counts a refusal and logs it (at most one line per peer every 10 s, with the count of
    /// the refusals it stands for).
    pub fn log_refusal(
        &self,
        peer: SocketAddr,
        who: &Requester,
        op: Operation,
        rt: ResourceType,
        name: &str,
        why: Denial,
    ) {
        metrics::counter!(
            "tributary_kafka_authorization_denied_total",
            "resource_type" => rt.word(),
            "operation" => op.word(),
        )
        .increment(1);
        if let Some(suppressed) = self.refusals.admit(Some(peer.ip()), Instant::now()) {
            warn!(
                peer = %peer,
                principal = %who.principal,
                resource = %format_args!("{}:{}", rt.word(), name),
                operation = op.word(),
                reason = why.as_str(),
                suppressed_since_last_line = suppressed,
                "kafka: request refused by the ACLs (at most one line per peer every {} s; every refusal is counted in tributary_kafka_authorization_denied_total)",
                REFUSAL_LOG_INTERVAL.as_secs()
            );
        }
    }
}

/// The authorizer as one request sees it: who asks, and a snapshot of the ACLs.
pub(crate) struct Authz<'a> {
    /// `None` = authorizer off (nothing to allocate per request then).
    authorizer: Option<(&'a Authorizer, Arc<AclSet>, Requester)>,
    peer: SocketAddr,
}

impl<'a> Authz<'a> {
    /// Everything allowed (authorizer off).
    pub fn open(peer: SocketAddr) -> Self {
        Self {
            authorizer: None,
            peer,
        }
    }

    pub fn new(authorizer: &'a Authorizer, set: Arc<AclSet>, user: &str, peer: SocketAddr) -> Self {
        Self {
            authorizer: Some((authorizer, set, Requester::new(user, peer.ip()))),
            peer,
        }
    }

    pub fn enabled(&self) -> bool {
        self.authorizer.is_some()
    }

    /// Whether the request may do `op` on the resource, without logging a refusal (for
    /// filtering lists, as Kafka does).
    pub fn allowed(&self, op: Operation, rt: ResourceType, name: &str) -> bool {
        match &self.authorizer {
            None => true,
            Some((a, set, who)) => set.authorize(&a.policy, who, op, rt, name).is_ok(),
        }
    }

    /// Whether the request may do `op` on the resource; a refusal is counted and logged.
    pub fn check(&self, op: Operation, rt: ResourceType, name: &str) -> bool {
        match &self.authorizer {
            None => true,
            Some((a, set, who)) => match set.authorize(&a.policy, who, op, rt, name) {
                Ok(()) => true,
                Err(why) => {
                    a.log_refusal(self.peer, who, op, rt, name, why);
                    false
                }
            },
        }
    }

    pub fn check_cluster(&self, op: Operation) -> bool {
        self.check(op, ResourceType::Cluster, CLUSTER_NAME)
    }

    /// `op` on some resource of the type (logged when refused).
    pub fn check_any(&self, op: Operation, rt: ResourceType) -> bool {
        match &self.authorizer {
            None => true,
            Some((a, set, who)) => {
                let ok = set.authorize_any(&a.policy, who, op, rt);
                if !ok {
                    a.log_refusal(self.peer, who, op, rt, "*", Denial::NoAllowAcl);
                }
                ok
            }
        }
    }

    /// The authorized-operations field for a resource (`NO_OPERATIONS` when off).
    pub fn operations(&self, rt: ResourceType, name: &str) -> i32 {
        match &self.authorizer {
            None => NO_OPERATIONS,
            Some((a, set, who)) => set.authorized_operations(&a.policy, who, rt, name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Operation::*;
    use ResourceType::*;

    fn acl(
        principal: &str,
        rt: ResourceType,
        name: &str,
        pattern: PatternType,
        op: Operation,
        deny: bool,
    ) -> Acl {
        Acl {
            principal: principal.into(),
            resource_type: rt,
            name: name.into(),
            pattern,
            operation: op,
            deny,
            host: "*".into(),
        }
    }

    fn alice() -> Requester {
        Requester::new("alice", "10.0.0.1".parse().unwrap())
    }

    fn set(acls: Vec<Acl>) -> AclSet {
        AclSet::new(acls)
    }

    fn ok(
        s: &AclSet,
        p: &Policy,
        who: &Requester,
        op: Operation,
        rt: ResourceType,
        name: &str,
    ) -> bool {
        s.authorize(p, who, op, rt, name).is_ok()
    }

    #[test]
    fn literal_prefixed_and_wildcard_patterns() {
        let p = Policy::default();
        let s = set(vec![
            acl(
                "User:alice",
                Topic,
                "orders",
                PatternType::Literal,
                Write,
                false,
            ),
            acl(
                "User:alice",
                Topic,
                "logs.",
                PatternType::Prefixed,
                Read,
                false,
            ),
            acl("User:alice", Group, "*", PatternType::Literal, Read, false),
        ]);
        let a = alice();
        assert!(ok(&s, &p, &a, Write, Topic, "orders"));
        assert!(!ok(&s, &p, &a, Write, Topic, "orders2"));
        assert!(!ok(&s, &p, &a, Write, Topic, "order"));
        assert!(ok(&s, &p, &a, Read, Topic, "logs.app"));
        assert!(ok(&s, &p, &a, Read, Topic, "logs."));
        assert!(!ok(&s, &p, &a, Read, Topic, "logs"));
        assert!(ok(&s, &p, &a, Read, Group, "any-group"));
        // WRITE implies DESCRIBE, not READ.
        assert!(ok(&s, &p, &a, Describe, Topic, "orders"));
        assert!(!ok(&s, &p, &a, Read, Topic, "orders"));
        // Another resource type is not covered.
        assert!(!ok(&s, &p, &a, Read, TransactionalId, "any-group"));
    }

    #[test]
    fn deny_beats_allow_and_all() {
        let p = Policy::default();
        let s = set(vec![
            acl("User:*", Topic, "*", PatternType::Literal, All, false),
            acl(
                "User:alice",
                Topic,
                "secret",
                PatternType::Prefixed,
                Read,
                true,
            ),
        ]);
        let a = alice();
        assert!(ok(&s, &p, &a, Read, Topic, "public"));
        assert_eq!(
            s.authorize(&p, &a, Read, Topic, "secret.x"),
            Err(Denial::DenyAcl)
        );
        // DENY READ does not deny WRITE or DESCRIBE (denials imply nothing but ALL).
        assert!(ok(&s, &p, &a, Write, Topic, "secret.x"));
        assert!(ok(&s, &p, &a, Describe, Topic, "secret.x"));
        let bob = Requester::new("bob", "10.0.0.2".parse().unwrap());
        assert!(ok(&s, &p, &bob, Read, Topic, "secret.x"));
        let s = set(vec![
            acl("User:alice", Topic, "t", PatternType::Literal, Read, false),
            acl("User:*", Topic, "t", PatternType::Literal, All, true),
        ]);
        assert_eq!(s.authorize(&p, &a, Read, Topic, "t"), Err(Denial::DenyAcl));
    }

    #[test]
    fn implied_operations() {
        let p = Policy::default();
        let a = alice();
        for op in [Read, Write, Delete, Alter] {
            let s = set(vec![acl(
                "User:alice",
                Topic,
                "t",
                PatternType::Literal,
                op,
                false,
            )]);
            assert!(
                ok(&s, &p, &a, Describe, Topic, "t"),
                "{op:?} implies DESCRIBE"
            );
            assert!(!ok(&s, &p, &a, DescribeConfigs, Topic, "t"));
        }
        let s = set(vec![acl(
            "User:alice",
            Topic,
            "t",
            PatternType::Literal,
            AlterConfigs,
            false,
        )]);
        assert!(ok(&s, &p, &a, DescribeConfigs, Topic, "t"));
        assert!(!ok(&s, &p, &a, Describe, Topic, "t"));
        let s = set(vec![acl(
            "User:alice",
            Topic,
            "t",
            PatternType::Literal,
            Describe,
            false,
        )]);
        assert!(!ok(&s, &p, &a, Read, Topic, "t"));
        let s = set(vec![acl(
            "User:alice",
            Cluster,
            CLUSTER_NAME,
            PatternType::Literal,
            All,
            false,
        )]);
        for op in Operation::ALL_OPS {
            assert!(ok(&s, &p, &a, op, Cluster, CLUSTER_NAME));
        }
    }

    #[test]
    fn hosts_must_match() {
        let p = Policy::default();
        let mut rule = acl("User:alice", Topic, "t", PatternType::Literal, Read, false);
        rule.host = "10.0.0.9".into();
        let s = set(vec![rule.clone()]);
        assert!(!ok(&s, &p, &alice(), Read, Topic, "t"));
        rule.host = "10.0.0.1".into();
        let s = set(vec![rule]);
        assert!(ok(&s, &p, &alice(), Read, Topic, "t"));
        // An IPv4 client seen through an IPv6 socket is matched by its IPv4 address.
        let mapped = Requester::new("alice", "::ffff:10.0.0.1".parse().unwrap());
        assert!(ok(&s, &p, &mapped, Read, Topic, "t"));
    }

    #[test]
    fn super_users_and_allow_if_no_acl() {
        let a = alice();
        let s = set(vec![acl(
            "User:bob",
            Topic,
            "guarded",
            PatternType::Literal,
            Read,
            false,
        )]);
        let mut p = Policy::default();
        assert!(!ok(&s, &p, &a, Read, Topic, "open"));
        p.allow_if_no_acl = true;
        // No ACL covers "open": everyone may; "guarded" has one, so only bob.
        assert!(ok(&s, &p, &a, Read, Topic, "open"));
        assert!(!ok(&s, &p, &a, Read, Topic, "guarded"));
        p.super_users.insert("User:alice".into());
        assert!(ok(&s, &p, &a, Read, Topic, "guarded"));
        // Super users pass even before the ACLs could be loaded; nobody else does.
        let unloaded = AclSet::default();
        assert!(ok(&unloaded, &p, &a, Alter, Cluster, CLUSTER_NAME));
        let bob = Requester::new("bob", "10.0.0.2".parse().unwrap());
        assert_eq!(
            unloaded.authorize(&p, &bob, Read, Topic, "open"),
            Err(Denial::AclsUnavailable)
        );
    }

    #[test]
    fn write_on_any_topic_for_idempotent_producers() {
        let p = Policy::default();
        let a = alice();
        assert!(!set(vec![]).authorize_any(&p, &a, Write, Topic));
        let s = set(vec![acl(
            "User:alice",
            Topic,
            "x.",
            PatternType::Prefixed,
            Write,
            false,
        )]);
        assert!(s.authorize_any(&p, &a, Write, Topic));
        assert!(!s.authorize_any(&p, &a, Read, Topic));
        let s = set(vec![
            acl(
                "User:alice",
                Topic,
                "x.",
                PatternType::Prefixed,
                Write,
                false,
            ),
            acl("User:alice", Topic, "x", PatternType::Prefixed, Write, true),
        ]);
        assert!(!s.authorize_any(&p, &a, Write, Topic));
        let s = set(vec![
            acl(
                "User:alice",
                Topic,
                "x.",
                PatternType::Prefixed,
                Write,
                false,
            ),
            acl(
                "User:alice",
                Topic,
                "x.one",
                PatternType::Literal,
                Write,
                true,
            ),
        ]);
        assert!(s.authorize_any(&p, &a, Write, Topic));
    }

    #[test]
    fn authorized_operations_bits() {
        let p = Policy::default();
        let s = set(vec![acl(
            "User:alice",
            Group,
            "g",
            PatternType::Literal,
            Read,
            false,
        )]);
        let bits = s.authorized_operations(&p, &alice(), Group, "g");
        assert_eq!(bits, (1 << Read.code()) | (1 << Describe.code()));
    }

    #[test]
    fn rules_round_trip_through_the_core_vocabulary() {
        let a = acl(
            "User:alice",
            TransactionalId,
            "tx-",
            PatternType::Prefixed,
            IdempotentWrite,
            true,
        );
        assert_eq!(Acl::from_rule(&a.to_rule()), Some(a));
        let mut foreign = acl("User:a", Topic, "t", PatternType::Literal, Read, false).to_rule();
        foreign.resource_type = "queue".into();
        assert_eq!(Acl::from_rule(&foreign), None);
    }
}
