//! DescribeUserScramCredentials and AlterUserScramCredentials (KIP-554): Kafka's way to manage
//! SCRAM users (`kafka-configs.sh --entity-type users`, `Admin.alterUserScramCredentials`).
//!
//! The credentials are the core's users (shared with `tributary users` and every gateway
//! process), one credential per mechanism. The client sends the salted password, never the
//! password; the gateway keeps only StoredKey and ServerKey derived from it. Users of the
//! config file are listed but cannot be altered here (the file is the operator's).
//! With the authorizer on, altering needs ALTER and describing DESCRIBE on the cluster.

use std::collections::{BTreeMap, HashSet};

use kafka_protocol::error::ResponseError as K;
use kafka_protocol::messages::alter_user_scram_credentials_request::AlterUserScramCredentialsRequest;
use kafka_protocol::messages::alter_user_scram_credentials_response::{
    AlterUserScramCredentialsResponse, AlterUserScramCredentialsResult,
};
use kafka_protocol::messages::describe_user_scram_credentials_request::DescribeUserScramCredentialsRequest;
use kafka_protocol::messages::describe_user_scram_credentials_response::{
    CredentialInfo, DescribeUserScramCredentialsResponse, DescribeUserScramCredentialsResult,
};
use kafka_protocol::protocol::StrBytes;
use tributary_gateway_common::auth::{ScramCredential, ScramHash};
use tributary_proto::v1;

use crate::Gateway;
use crate::acl::{Authz, Operation};
use crate::errors::{Context, kafka_error};

/// Kafka's bounds on SCRAM iterations (ScramMechanism's minimum, the controller's maximum).
const MIN_ITERATIONS: i32 = 4096;
const MAX_ITERATIONS: i32 = 16384;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// Kafka's mechanism numbers (ScramMechanism.type()).
fn mechanism(m: i8) -> Option<ScramHash> {
    match m {
        1 => Some(ScramHash::Sha256),
        2 => Some(ScramHash::Sha512),
        _ => None,
    }
}

fn mechanism_number(h: ScramHash) -> i8 {
    match h {
        ScramHash::Sha256 => 1,
        ScramHash::Sha512 => 2,
    }
}

/// (mechanism, iterations) of each SCRAM credential text; other kinds are not Kafka's.
fn infos(credentials: &[String]) -> Vec<CredentialInfo> {
    credentials
        .iter()
        .filter_map(|c| ScramCredential::parse(c).ok())
        .map(|c| {
            CredentialInfo::default()
                .with_mechanism(mechanism_number(c.hash))
                .with_iterations(c.iterations as i32)
        })
        .collect()
}

/// Names of the config file's users (what this gateway knows of them).
fn config_users(gw: &Gateway) -> Option<&tributary_gateway_common::auth::Users> {
    gw.config.sasl.as_ref().map(|d| d.configured())
}

pub(crate) async fn describe(
    gw: &Gateway,
    authz: &Authz<'_>,
    req: DescribeUserScramCredentialsRequest,
) -> DescribeUserScramCredentialsResponse {
    if !authz.check_cluster(Operation::Describe) {
        return DescribeUserScramCredentialsResponse::default()
            .with_error_code(K::ClusterAuthorizationFailed.code())
            .with_error_message(Some(s("DESCRIBE on the cluster is needed")));
    }
    let stored = match gw
        .core
        .admin
        .clone()
        .list_users(v1::ListUsersRequest {
            known_version: 0,
            include_credentials: true,
        })
        .await
    {
        Ok(r) => r.into_inner().users,
        Err(status) => {
            return DescribeUserScramCredentialsResponse::default()
                .with_error_code(kafka_error(&status, Context::Admin))
                .with_error_message(Some(s(status.message())));
        }
    };
    // Every user that logs in with SCRAM: the file's first (they win over the core's).
    let mut all: BTreeMap<String, Vec<CredentialInfo>> = BTreeMap::new();
    for u in stored {
        let i = infos(&u.credentials);
        if !i.is_empty() {
            all.insert(u.name, i);
        }
    }
    if let Some(users) = config_users(gw) {
        for name in users.names() {
            let i: Vec<CredentialInfo> = [ScramHash::Sha256, ScramHash::Sha512]
                .into_iter()
                .filter_map(|h| users.credential(&name, h))
                .map(|c| {
                    CredentialInfo::default()
                        .with_mechanism(mechanism_number(c.hash))
                        .with_iterations(c.iterations as i32)
                })
                .collect();
            if i.is_empty() {
                all.remove(&name);
            } else {
                all.insert(name, i);
            }
        }
    }
    let wanted: Option<Vec<String>> = req
        .users
        .filter(|u| !u.is_empty())
        .map(|u| u.iter().map(|n| n.name.to_string()).collect());
    let results = match wanted {
        None => all
            .into_iter()
            .map(|(name, infos)| {
                DescribeUserScramCredentialsResult::default()
                    .with_user(s(name))
                    .with_credential_infos(infos)
            })
            .collect(),
        Some(names) => {
            let mut seen = HashSet::new();
            let duplicated: HashSet<&String> =
                names.iter().filter(|n| !seen.insert(n.as_str())).collect();
            let mut out = Vec::new();
            let mut answered = HashSet::new();
            for name in &names {
                if !answered.insert(name.as_str()) {
                    continue;
                }
                let r = DescribeUserScramCredentialsResult::default().with_user(s(name.clone()));
                out.push(if duplicated.contains(name) {
                    r.with_error_code(K::DuplicateResource.code())
                        .with_error_message(Some(s(format!(
                            "Cannot describe SCRAM credentials for the same user twice in a single request: {name}"
                        ))))
                } else {
                    match all.get(name) {
                        Some(infos) => r.with_credential_infos(infos.clone()),
                        None => r
                            .with_error_code(K::ResourceNotFound.code())
                            .with_error_message(Some(s(format!(
                                "Attempt to describe a user credential that does not exist: {name}"
                            )))),
                    }
                });
            }
            out
        }
    };
    DescribeUserScramCredentialsResponse::default().with_results(results)
}

/// One change a request asks for.
enum Change {
    Upsert(ScramCredential),
    Delete(ScramHash),
}

pub(crate) async fn alter(
    gw: &Gateway,
    authz: &Authz<'_>,
    req: AlterUserScramCredentialsRequest,
) -> AlterUserScramCredentialsResponse {
    // Per user, in the order first named: its changes, or the error that refuses them all.
    let mut order: Vec<String> = Vec::new();
    let mut changes: BTreeMap<String, Result<Vec<Change>, (K, String)>> = BTreeMap::new();
    let mut touched: HashSet<(String, i8)> = HashSet::new();
    let mut note = |name: &str, mech: i8, change: Result<Change, (K, String)>| {
        if !changes.contains_key(name) {
            order.push(name.to_string());
            changes.insert(name.to_string(), Ok(Vec::new()));
        }
        let entry = changes.get_mut(name).expect("inserted above");
        let change = if !touched.insert((name.to_string(), mech)) {
            Err((
                K::DuplicateResource,
                "A user credential cannot be altered twice in the same request".to_string(),
            ))
        } else {
            change
        };
        match (entry.as_mut(), change) {
            (Ok(list), Ok(c)) => list.push(c),
            (Ok(_), Err(e)) => *entry = Err(e),
            (Err(_), _) => {}
        }
    };
    for d in &req.deletions {
        let change = match mechanism(d.mechanism) {
            None => Err((
                K::UnsupportedSaslMechanism,
                format!("Unknown SCRAM mechanism {}", d.mechanism),
            )),
            Some(h) => Ok(Change::Delete(h)),
        };
        note(&d.name, d.mechanism, change);
    }
    for u in &req.upsertions {
        let change = match mechanism(u.mechanism) {
            None => Err((
                K::UnsupportedSaslMechanism,
                format!("Unknown SCRAM mechanism {}", u.mechanism),
            )),
            Some(_) if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&u.iterations) => Err((
                K::UnacceptableCredential,
                format!(
                    "Iterations must be {MIN_ITERATIONS} to {MAX_ITERATIONS}, got {}",
                    u.iterations
                ),
            )),
            Some(_) if u.salt.is_empty() || u.salted_password.is_empty() => Err((
                K::UnacceptableCredential,
                "Salt and salted password must not be empty".to_string(),
            )),
            Some(h) => Ok(Change::Upsert(ScramCredential::from_salted_password(
                h,
                &u.salted_password,
                &u.salt,
                u.iterations as u32,
            ))),
        };
        note(&u.name, u.mechanism, change);
    }
    let allowed = authz.check_cluster(Operation::Alter);
    let mut results = Vec::new();
    for name in order {
        let r = AlterUserScramCredentialsResult::default().with_user(s(name.clone()));
        let outcome = match changes.remove(&name).expect("noted") {
            _ if !allowed => Err((
                K::ClusterAuthorizationFailed.code(),
                "ALTER on the cluster is needed".to_string(),
            )),
            _ if name.is_empty() => Err((
                K::UnacceptableCredential.code(),
                "Username must not be empty".to_string(),
            )),
            _ if config_users(gw).is_some_and(|u| u.contains(&name)) => Err((
                K::UnacceptableCredential.code(),
                format!("user {name} is defined in the gateway's config file; change it there"),
            )),
            Err((code, msg)) => Err((code.code(), msg)),
            Ok(list) => apply(gw, &name, list).await,
        };
        results.push(match outcome {
            Ok(()) => {
                tracing::info!(user = %name.escape_debug(), "kafka: SCRAM credentials altered");
                r
            }
            Err((code, msg)) => r.with_error_code(code).with_error_message(Some(s(msg))),
        });
    }
    if let Some(users) = &gw.config.sasl {
        users.invalidate();
    }
    AlterUserScramCredentialsResponse::default().with_results(results)
}

/// Applies one user's changes in the core: deletions first, then upserts.
async fn apply(gw: &Gateway, name: &str, list: Vec<Change>) -> Result<(), (i16, String)> {
    let mut admin = gw.core.admin.clone();
    let failed = |status: tonic::Status| {
        let code = kafka_error(&status, Context::Admin);
        if code == K::ResourceNotFound.code() {
            (
                code,
                format!("Attempt to delete a user credential that does not exist: {name}"),
            )
        } else {
            (code, status.message().to_string())
        }
    };
    let deletions: Vec<String> = list
        .iter()
        .filter_map(|c| match c {
            Change::Delete(h) => Some(h.mechanism().to_string()),
            Change::Upsert(_) => None,
        })
        .collect();
    if !deletions.is_empty() {
        admin
            .delete_user(v1::DeleteUserRequest {
                name: name.to_string(),
                only_mechanisms: deletions,
            })
            .await
            .map_err(failed)?;
    }
    let upserts: Vec<&ScramCredential> = list
        .iter()
        .filter_map(|c| match c {
            Change::Upsert(c) => Some(c),
            Change::Delete(_) => None,
        })
        .collect();
    if !upserts.is_empty() {
        admin
            .put_user(v1::PutUserRequest {
                user: Some(v1::UserRecord {
                    name: name.to_string(),
                    credentials: upserts.iter().map(|c| c.to_text()).collect(),
                    ..Default::default()
                }),
                keep_namespaces: true,
                only_mechanisms: upserts
                    .iter()
                    .map(|c| c.hash.mechanism().to_string())
                    .collect(),
                ..Default::default()
            })
            .await
            .map_err(failed)?;
    }
    Ok(())
}
