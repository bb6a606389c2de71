//! Member leases through the gRPC API (the core's own routes as the transport): register,
//! renew, expire (lazily and by the sweep), unregister, the version, sorting, protocol types
//! kept apart from Kafka groups of the same name, and ListGroups.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tonic::service::Routes;
use tributary_core::{Core, CoreConfig};
use tributary_proto::v1::admin_client::AdminClient;
use tributary_proto::v1::groups_client::GroupsClient;
use tributary_proto::v1::{self, ErrorCode};
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

const DEADLINE: Duration = Duration::from_secs(10);

async fn open(dir: &std::path::Path) -> (Core, GroupsClient<Routes>, AdminClient<Routes>) {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    let core = Core::open(
        log,
        meta,
        CoreConfig {
            group_initial_rebalance_delay: Duration::ZERO,
            ..CoreConfig::default()
        },
    )
    .await
    .unwrap();
    let routes = tributary_core::grpc::routes(core.clone());
    (
        core,
        GroupsClient::new(routes.clone()),
        AdminClient::new(routes),
    )
}

fn reg(group: &str, member: &str, ttl_ms: i32) -> v1::RegisterMemberRequest {
    v1::RegisterMemberRequest {
        namespace: String::new(),
        group: group.into(),
        member_id: member.into(),
        client_host: format!("10.0.0.1@{member}"),
        client_id: format!("client-{member}"),
        metadata: Bytes::from(format!("meta-{member}")),
        ttl_ms,
        protocol_type: "rocketmq".into(),
    }
}

fn ids(members: &[v1::GroupMember]) -> Vec<&str> {
    members.iter().map(|m| m.member_id.as_str()).collect()
}

fn code(s: &tonic::Status) -> ErrorCode {
    let d = v1::ErrorDetail::decode(s.details()).unwrap_or_default();
    ErrorCode::try_from(d.code).unwrap_or(ErrorCode::Unspecified)
}

async fn list(g: &mut GroupsClient<Routes>, group: &str, pt: &str) -> v1::ListMembersResponse {
    g.list_members(v1::ListMembersRequest {
        namespace: String::new(),
        group: group.into(),
        protocol_type: pt.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn members_register_renew_and_leave_with_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let (core, mut g, _) = open(dir.path()).await;
    let b = g
        .register_member(reg("cg", "b", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(b.changed);
    assert_eq!(ids(&b.members), ["b"]);
    assert_eq!(b.members[0].client_host, "10.0.0.1@b");
    assert_eq!(b.members[0].client_id, "client-b");
    assert_eq!(&b.members[0].metadata[..], b"meta-b");
    let a = g
        .register_member(reg("cg", "a", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(a.changed);
    assert!(a.version > b.version);
    assert_eq!(ids(&a.members), ["a", "b"], "sorted by member id");
    // A renewal changes nothing (new metadata is kept, but the set is the same).
    let mut renew = reg("cg", "b", 60_000);
    renew.metadata = Bytes::from_static(b"new");
    let r = g.register_member(renew).await.unwrap().into_inner();
    assert!(!r.changed);
    assert_eq!(r.version, a.version);
    assert_eq!(&r.members[1].metadata[..], b"new");
    let l = list(&mut g, "cg", "rocketmq").await;
    assert_eq!(l.version, a.version);
    assert_eq!(ids(&l.members), ["a", "b"]);

    // Leaving.
    let u = g
        .unregister_member(v1::UnregisterMemberRequest {
            namespace: String::new(),
            group: "cg".into(),
            member_id: "a".into(),
            protocol_type: "rocketmq".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.changed);
    assert!(u.version > a.version);
    assert_eq!(ids(&u.members), ["b"]);
    let u2 = g
        .unregister_member(v1::UnregisterMemberRequest {
            namespace: String::new(),
            group: "cg".into(),
            member_id: "a".into(),
            protocol_type: "rocketmq".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!u2.changed);
    assert_eq!(u2.version, u.version);

    // Bad calls.
    let mut no_pt = reg("cg", "x", 1000);
    no_pt.protocol_type.clear();
    let e = g.register_member(no_pt).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidArgument);
    let e = g.register_member(reg("cg", "", 1000)).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidArgument);
    let e = g.register_member(reg("cg", "x", -1)).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidArgument);
    let mut other_ns = reg("cg", "x", 1000);
    other_ns.namespace = "nowhere".into();
    let e = g.register_member(other_ns).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::NamespaceNotFound);
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn members_expire_after_their_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let (core, mut g, _) = open(dir.path()).await;
    let long = g
        .register_member(reg("cg", "long", 60_000))
        .await
        .unwrap()
        .into_inner();
    let short = g
        .register_member(reg("cg", "short", 150))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&short.members), ["long", "short"]);
    // Lazily on a call, or by the sweep: either way the set shrinks and the version grows.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let after = loop {
        let l = list(&mut g, "cg", "rocketmq").await;
        if l.members.len() == 1 {
            break l;
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(ids(&after.members), ["long"]);
    assert!(after.version > short.version && short.version > long.version);
    // A renewal keeps a member: "short" with a fresh lease comes back as a change.
    let back = g
        .register_member(reg("cg", "short", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(back.changed && back.version > after.version);

    // Expiry found by a RegisterMember call reports the change too.
    let lone = g
        .register_member(reg("solo", "gone", 50))
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let l = list(&mut g, "solo", "rocketmq").await;
        if l.members.is_empty() {
            // The group is gone; it comes back with a version it never had.
            let r = g
                .register_member(reg("solo", "new", 60_000))
                .await
                .unwrap()
                .into_inner();
            assert!(r.changed);
            assert!(r.version > lone.version);
            assert_eq!(ids(&r.members), ["new"]);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn lease_groups_are_apart_from_kafka_groups_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (core, mut g, mut admin) = open(dir.path()).await;
    g.register_member(reg("shared", "r1", 60_000))
        .await
        .unwrap();
    // A Kafka group of the same name.
    let j = g
        .join_group(v1::JoinGroupRequest {
            namespace: String::new(),
            group: "shared".into(),
            member_id: String::new(),
            group_instance_id: String::new(),
            protocol_type: "consumer".into(),
            protocols: vec![v1::Header {
                name: "range".into(),
                value: Bytes::new(),
            }],
            session_timeout_ms: 30_000,
            rebalance_timeout_ms: 30_000,
            client_id: "k".into(),
            client_host: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.generation, 1);
    let d = g
        .describe_group(v1::DescribeGroupRequest {
            namespace: String::new(),
            group: "shared".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.members.len(), 1);
    assert_ne!(d.members[0].member_id, "r1");
    assert_eq!(
        ids(&list(&mut g, "shared", "rocketmq").await.members),
        ["r1"]
    );
    // Another protocol type is another group.
    assert!(list(&mut g, "shared", "other").await.members.is_empty());

    let groups = admin
        .list_groups(v1::ListGroupsRequest {
            namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .groups;
    let shared: Vec<(&str, &str)> = groups
        .iter()
        .filter(|s| s.group == "shared")
        .map(|s| (s.protocol_type.as_str(), s.state.as_str()))
        .collect();
    assert_eq!(
        shared,
        [("consumer", "CompletingRebalance"), ("rocketmq", "Stable")]
    );
    core.shutdown().await.unwrap();
}
