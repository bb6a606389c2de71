//! CreateAcls, DescribeAcls and DeleteAcls (KIP-140, with KIP-290's pattern types).
//!
//! Without the authorizer every one answers SECURITY_DISABLED, as a Kafka broker without an
//! authorizer does. With it, CreateAcls and DeleteAcls need ALTER on the cluster and
//! DescribeAcls DESCRIBE on the cluster (CLUSTER_AUTHORIZATION_FAILED otherwise). The ACLs
//! are the core's access rules; filters (ANY, MATCH) are applied here.

use std::collections::BTreeMap;

use kafka_protocol::error::ResponseError as K;
use kafka_protocol::messages::create_acls_request::{AclCreation, CreateAclsRequest};
use kafka_protocol::messages::create_acls_response::{AclCreationResult, CreateAclsResponse};
use kafka_protocol::messages::delete_acls_request::{DeleteAclsFilter, DeleteAclsRequest};
use kafka_protocol::messages::delete_acls_response::{
    DeleteAclsFilterResult, DeleteAclsMatchingAcl, DeleteAclsResponse,
};
use kafka_protocol::messages::describe_acls_request::DescribeAclsRequest;
use kafka_protocol::messages::describe_acls_response::{
    AclDescription, DescribeAclsResource, DescribeAclsResponse,
};
use kafka_protocol::protocol::StrBytes;
use tributary_proto::v1;

use crate::Gateway;
use crate::acl::{Acl, Authz, CLUSTER_NAME, Operation, PatternType, ResourceType};
use crate::errors::{Context, kafka_error};

const NO_AUTHORIZER: &str = "No Authorizer is configured on the broker";

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// An invalid request: (Kafka code, message).
type Invalid = (i16, String);

fn invalid(msg: String) -> Invalid {
    (K::InvalidRequest.code(), msg)
}

/// A resource type a new ACL may name.
fn resource_type(code: i8) -> Result<ResourceType, Invalid> {
    match code {
        6 | 7 => Err(invalid(format!(
            "resource type {} is not supported by this broker (topics, groups, transactional ids and the cluster are)",
            if code == 6 {
                "DELEGATION_TOKEN"
            } else {
                "USER"
            }
        ))),
        c => {
            ResourceType::from_code(c).ok_or_else(|| invalid(format!("invalid resource type {c}")))
        }
    }
}

fn operation(code: i8) -> Result<Operation, Invalid> {
    match code {
        13..=15 => Err(invalid(format!(
            "operation {} is not supported by this broker",
            match code {
                13 => "CREATE_TOKENS",
                14 => "DESCRIBE_TOKENS",
                _ => "TWO_PHASE_COMMIT",
            }
        ))),
        c => Operation::from_code(c).ok_or_else(|| invalid(format!("invalid operation {c}"))),
    }
}

fn check_principal(p: &str) -> Result<(), Invalid> {
    match p.split_once(':') {
        Some((kind, name)) if !kind.is_empty() && !name.is_empty() => Ok(()),
        _ => Err(invalid(format!(
            "could not parse principal '{p}': expected TYPE:NAME such as User:alice"
        ))),
    }
}

/// Checks one creation the way Kafka does and turns it into an ACL.
fn new_acl(c: &AclCreation) -> Result<Acl, Invalid> {
    let rt = resource_type(c.resource_type)?;
    let pattern = match c.resource_pattern_type {
        3 => PatternType::Literal,
        4 => PatternType::Prefixed,
        other => {
            return Err(invalid(format!(
                "invalid pattern type {other}: an ACL is LITERAL (3) or PREFIXED (4)"
            )));
        }
    };
    let op = operation(c.operation)?;
    let deny = match c.permission_type {
        2 => true,
        3 => false,
        other => {
            return Err(invalid(format!(
                "invalid permission type {other}: an ACL is DENY (2) or ALLOW (3)"
            )));
        }
    };
    if c.resource_name.is_empty() {
        return Err(invalid("resource name must not be empty".into()));
    }
    if rt == ResourceType::Cluster && c.resource_name.as_str() != CLUSTER_NAME {
        return Err(invalid(format!(
            "the only valid name for the CLUSTER resource is {CLUSTER_NAME}"
        )));
    }
    check_principal(&c.principal)?;
    if c.host.is_empty() {
        return Err(invalid(
            "host must be '*' or an IP address, not empty".into(),
        ));
    }
    if [
        c.resource_name.as_str(),
        c.principal.as_str(),
        c.host.as_str(),
    ]
    .iter()
    .any(|v| v.len() > 1024 || v.chars().any(char::is_control))
    {
        return Err(invalid(
            "resource name, principal and host must be at most 1024 bytes without control characters"
                .into(),
        ));
    }
    Ok(Acl {
        principal: c.principal.to_string(),
        resource_type: rt,
        name: c.resource_name.to_string(),
        pattern,
        operation: op,
        deny,
        host: c.host.to_string(),
    })
}

/// A DescribeAcls / DeleteAcls filter.
#[derive(Debug)]
struct Filter {
    resource_type: Option<ResourceType>,
    name: Option<String>,
    /// None = ANY, Some(None) = MATCH, Some(Some(p)) = that pattern type.
    pattern: Option<Option<PatternType>>,
    principal: Option<String>,
    host: Option<String>,
    operation: Option<Operation>,
    deny: Option<bool>,
}

#[allow(clippy::too_many_arguments)]
fn filter(
    rt: i8,
    name: Option<&StrBytes>,
    pattern: i8,
    principal: Option<&StrBytes>,
    host: Option<&StrBytes>,
    op: i8,
    permission: i8,
) -> Result<Filter, Invalid> {
    Ok(Filter {
        resource_type: match rt {
            1 => None,
            c => Some(resource_type(c)?),
        },
        name: name.map(|n| n.to_string()),
        pattern: match pattern {
            1 => None,
            2 => Some(None),
            3 => Some(Some(PatternType::Literal)),
            4 => Some(Some(PatternType::Prefixed)),
            other => return Err(invalid(format!("invalid pattern type filter {other}"))),
        },
        principal: principal.map(|p| p.to_string()),
        host: host.map(|h| h.to_string()),
        operation: match op {
            1 => None,
            c => Some(operation(c)?),
        },
        deny: match permission {
            1 => None,
            2 => Some(true),
            3 => Some(false),
            other => return Err(invalid(format!("invalid permission type filter {other}"))),
        },
    })
}

impl Filter {
    /// Kafka's filter semantics: ANY matches every pattern type with exactly this name;
    /// MATCH every ACL that applies to a resource of this name (literal, the wildcard `*`,
    /// prefixes of it); a null name matches every name.
    fn matches(&self, a: &Acl) -> bool {
        if self.resource_type.is_some_and(|t| t != a.resource_type)
            || self.principal.as_ref().is_some_and(|p| *p != a.principal)
            || self.host.as_ref().is_some_and(|h| *h != a.host)
            || self.operation.is_some_and(|o| o != a.operation)
            || self.deny.is_some_and(|d| d != a.deny)
        {
            return false;
        }
        match (&self.pattern, &self.name) {
            (Some(Some(p)), _) if *p != a.pattern => false,
            (_, None) => true,
            (None, Some(n)) | (Some(Some(_)), Some(n)) => *n == a.name,
            (Some(None), Some(n)) => match a.pattern {
                PatternType::Literal => a.name == *n || a.name == "*",
                PatternType::Prefixed => n.starts_with(a.name.as_str()),
            },
        }
    }
}

/// Every ACL of the gateway's namespace, straight from the core (not the cache).
async fn load_all(gw: &Gateway) -> Result<Vec<Acl>, tonic::Status> {
    let r = gw
        .core
        .admin
        .clone()
        .list_access_rules(v1::ListAccessRulesRequest {
            namespace: gw.config.namespace.clone(),
            known_version: 0,
        })
        .await?;
    Ok(r.into_inner()
        .rules
        .iter()
        .filter_map(Acl::from_rule)
        .collect())
}

pub(crate) async fn create_acls(
    gw: &Gateway,
    authz: &Authz<'_>,
    req: CreateAclsRequest,
) -> CreateAclsResponse {
    let all = |code: i16, msg: &str| {
        CreateAclsResponse::default().with_results(
            req.creations
                .iter()
                .map(|_| {
                    AclCreationResult::default()
                        .with_error_code(code)
                        .with_error_message(Some(s(msg)))
                })
                .collect(),
        )
    };
    let Some(authorizer) = gw.authorizer.as_ref() else {
        return all(K::SecurityDisabled.code(), NO_AUTHORIZER);
    };
    if !authz.check_cluster(Operation::Alter) {
        return all(
            K::ClusterAuthorizationFailed.code(),
            "ALTER on the cluster is needed to create ACLs",
        );
    }
    let checked: Vec<Result<Acl, Invalid>> = req.creations.iter().map(new_acl).collect();
    let rules: Vec<v1::AccessRule> = checked
        .iter()
        .filter_map(|c| c.as_ref().ok().map(Acl::to_rule))
        .collect();
    let stored = if rules.is_empty() {
        Ok(())
    } else {
        gw.core
            .admin
            .clone()
            .create_access_rules(v1::CreateAccessRulesRequest {
                namespace: gw.config.namespace.clone(),
                rules,
            })
            .await
            .map(|_| ())
    };
    if stored.is_ok() {
        authorizer.reload(&gw.core).await;
    }
    let results = checked
        .into_iter()
        .map(|c| match (c, &stored) {
            (Err((code, msg)), _) => AclCreationResult::default()
                .with_error_code(code)
                .with_error_message(Some(s(msg))),
            (Ok(acl), Ok(())) => {
                tracing::info!(acl = ?acl, "kafka: ACL created");
                AclCreationResult::default()
            }
            (Ok(_), Err(status)) => AclCreationResult::default()
                .with_error_code(kafka_error(status, Context::Admin))
                .with_error_message(Some(s(status.message()))),
        })
        .collect();
    CreateAclsResponse::default().with_results(results)
}

pub(crate) async fn describe_acls(
    gw: &Gateway,
    authz: &Authz<'_>,
    req: DescribeAclsRequest,
) -> DescribeAclsResponse {
    let fail = |code: i16, msg: String| {
        DescribeAclsResponse::default()
            .with_error_code(code)
            .with_error_message(Some(s(msg)))
    };
    if gw.authorizer.is_none() {
        return fail(K::SecurityDisabled.code(), NO_AUTHORIZER.into());
    }
    if !authz.check_cluster(Operation::Describe) {
        return fail(
            K::ClusterAuthorizationFailed.code(),
            "DESCRIBE on the cluster is needed to describe ACLs".into(),
        );
    }
    let f = match filter(
        req.resource_type_filter,
        req.resource_name_filter.as_ref(),
        req.pattern_type_filter,
        req.principal_filter.as_ref(),
        req.host_filter.as_ref(),
        req.operation,
        req.permission_type,
    ) {
        Ok(f) => f,
        Err((code, msg)) => return fail(code, msg),
    };
    let acls = match load_all(gw).await {
        Ok(a) => a,
        Err(status) => {
            return fail(
                kafka_error(&status, Context::Admin),
                status.message().to_string(),
            );
        }
    };
    let mut resources: BTreeMap<(i8, String, i8), Vec<AclDescription>> = BTreeMap::new();
    for a in acls.iter().filter(|a| f.matches(a)) {
        resources
            .entry((a.resource_type.code(), a.name.clone(), a.pattern.code()))
            .or_default()
            .push(
                AclDescription::default()
                    .with_principal(s(a.principal.clone()))
                    .with_host(s(a.host.clone()))
                    .with_operation(a.operation.code())
                    .with_permission_type(a.permission_code()),
            );
    }
    DescribeAclsResponse::default().with_resources(
        resources
            .into_iter()
            .map(|((rt, name, pattern), acls)| {
                DescribeAclsResource::default()
                    .with_resource_type(rt)
                    .with_resource_name(s(name))
                    .with_pattern_type(pattern)
                    .with_acls(acls)
            })
            .collect(),
    )
}

fn delete_filter(f: &DeleteAclsFilter) -> Result<Filter, Invalid> {
    filter(
        f.resource_type_filter,
        f.resource_name_filter.as_ref(),
        f.pattern_type_filter,
        f.principal_filter.as_ref(),
        f.host_filter.as_ref(),
        f.operation,
        f.permission_type,
    )
}

pub(crate) async fn delete_acls(
    gw: &Gateway,
    authz: &Authz<'_>,
    req: DeleteAclsRequest,
) -> DeleteAclsResponse {
    let all = |code: i16, msg: &str| {
        DeleteAclsResponse::default().with_filter_results(
            req.filters
                .iter()
                .map(|_| {
                    DeleteAclsFilterResult::default()
                        .with_error_code(code)
                        .with_error_message(Some(s(msg)))
                })
                .collect(),
        )
    };
    let Some(authorizer) = gw.authorizer.as_ref() else {
        return all(K::SecurityDisabled.code(), NO_AUTHORIZER);
    };
    if !authz.check_cluster(Operation::Alter) {
        return all(
            K::ClusterAuthorizationFailed.code(),
            "ALTER on the cluster is needed to delete ACLs",
        );
    }
    let filters: Vec<Result<Filter, Invalid>> = req.filters.iter().map(delete_filter).collect();
    let acls = match load_all(gw).await {
        Ok(a) => a,
        Err(status) => {
            return all(kafka_error(&status, Context::Admin), status.message());
        }
    };
    let mut doomed: Vec<&Acl> = Vec::new();
    for f in filters.iter().flatten() {
        for a in acls.iter().filter(|a| f.matches(a)) {
            if !doomed.contains(&a) {
                doomed.push(a);
            }
        }
    }
    let deleted: Result<Vec<Acl>, tonic::Status> = if doomed.is_empty() {
        Ok(Vec::new())
    } else {
        gw.core
            .admin
            .clone()
            .delete_access_rules(v1::DeleteAccessRulesRequest {
                namespace: gw.config.namespace.clone(),
                rules: doomed.iter().map(|a| a.to_rule()).collect(),
            })
            .await
            .map(|r| {
                r.into_inner()
                    .deleted
                    .iter()
                    .filter_map(Acl::from_rule)
                    .collect()
            })
    };
    if deleted.is_ok() {
        authorizer.reload(&gw.core).await;
    }
    let results = filters
        .iter()
        .map(|f| match (f, &deleted) {
            (Err((code, msg)), _) => DeleteAclsFilterResult::default()
                .with_error_code(*code)
                .with_error_message(Some(s(msg.clone()))),
            (Ok(_), Err(status)) => DeleteAclsFilterResult::default()
                .with_error_code(kafka_error(status, Context::Admin))
                .with_error_message(Some(s(status.message()))),
            (Ok(f), Ok(gone)) => DeleteAclsFilterResult::default().with_matching_acls(
                gone.iter()
                    .filter(|a| f.matches(a))
                    .map(|a| {
                        tracing::info!(acl = ?a, "kafka: ACL deleted");
                        DeleteAclsMatchingAcl::default()
                            .with_resource_type(a.resource_type.code())
                            .with_resource_name(s(a.name.clone()))
                            .with_pattern_type(a.pattern.code())
                            .with_principal(s(a.principal.clone()))
                            .with_host(s(a.host.clone()))
                            .with_operation(a.operation.code())
                            .with_permission_type(a.permission_code())
                    })
                    .collect(),
            ),
        })
        .collect();
    DeleteAclsResponse::default().with_filter_results(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(name: &str, pattern: PatternType) -> Acl {
        Acl {
            principal: "User:alice".into(),
            resource_type: ResourceType::Topic,
            name: name.into(),
            pattern,
            operation: Operation::Read,
            deny: false,
            host: "*".into(),
        }
    }

    fn f(name: Option<&str>, pattern: i8) -> Filter {
        let name = name.map(|n| StrBytes::from_string(n.into()));
        filter(2, name.as_ref(), pattern, None, None, 1, 1).unwrap()
    }

    #[test]
    fn filters_any_match_and_exact() {
        let lit = acl("orders", PatternType::Literal);
        let wild = acl("*", PatternType::Literal);
        let pre = acl("ord", PatternType::Prefixed);
        let other = acl("logs", PatternType::Literal);
        // ANY: every pattern type, the exact name.
        let any = f(Some("orders"), 1);
        assert!(any.matches(&lit) && !any.matches(&wild) && !any.matches(&pre));
        // MATCH: whatever applies to a topic named "orders".
        let m = f(Some("orders"), 2);
        assert!(m.matches(&lit) && m.matches(&wild) && m.matches(&pre) && !m.matches(&other));
        // A pattern type: exact.
        let p = f(Some("ord"), 4);
        assert!(p.matches(&pre) && !p.matches(&lit));
        // No name: everything of the type (and pattern, if given).
        assert!(f(None, 1).matches(&other));
        assert!(f(None, 2).matches(&pre));
        assert!(!f(None, 3).matches(&pre));
    }

    #[test]
    fn bad_creations_get_invalid_request() {
        let good = AclCreation::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_static_str("t"))
            .with_resource_pattern_type(3)
            .with_principal(StrBytes::from_static_str("User:alice"))
            .with_host(StrBytes::from_static_str("*"))
            .with_operation(3)
            .with_permission_type(3);
        assert!(new_acl(&good).is_ok());
        let bad = [
            good.clone().with_resource_type(0),
            good.clone().with_resource_type(1),
            good.clone().with_resource_type(99),
            good.clone().with_resource_type(6),
            good.clone().with_resource_pattern_type(1),
            good.clone().with_resource_pattern_type(2),
            good.clone().with_resource_pattern_type(-5),
            good.clone().with_operation(1),
            good.clone().with_operation(0),
            good.clone().with_operation(13),
            good.clone().with_permission_type(1),
            good.clone()
                .with_principal(StrBytes::from_static_str("alice")),
            good.clone().with_resource_name(StrBytes::default()),
            good.clone()
                .with_resource_type(4)
                .with_resource_name(StrBytes::from_static_str("other")),
        ];
        for b in bad {
            let (code, _) = new_acl(&b).unwrap_err();
            assert_eq!(code, K::InvalidRequest.code(), "{b:?}");
        }
        assert!(filter(0, None, 1, None, None, 1, 1).is_err());
        assert!(filter(1, None, 0, None, None, 1, 1).is_err());
        assert!(filter(1, None, 1, None, None, 0, 1).is_err());
        assert!(filter(1, None, 1, None, None, 1, 0).is_err());
    }
}
