//! Consumer groups (classic protocol) and committed offsets. Membership, generations and
//! assignments live in the core; the gateway translates. The assignment itself is computed by
//! the group leader (a client), so every client-side assignor works.

use bytes::Bytes;
use kafka_protocol::error::ResponseError as K;
use kafka_protocol::messages::delete_groups_request::DeleteGroupsRequest;
use kafka_protocol::messages::delete_groups_response::{
    DeletableGroupResult, DeleteGroupsResponse,
};
use kafka_protocol::messages::describe_groups_request::DescribeGroupsRequest;
use kafka_protocol::messages::describe_groups_response::{
    DescribeGroupsResponse, DescribedGroup, DescribedGroupMember,
};
use kafka_protocol::messages::heartbeat_request::HeartbeatRequest;
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::join_group_request::JoinGroupRequest;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};
use kafka_protocol::messages::leave_group_request::LeaveGroupRequest;
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};
use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
use kafka_protocol::messages::list_groups_response::{ListGroupsResponse, ListedGroup};
use kafka_protocol::messages::offset_commit_request::OffsetCommitRequest;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::sync_group_request::SyncGroupRequest;
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;
use kafka_protocol::messages::{GroupId, TopicName};
use kafka_protocol::protocol::StrBytes;
use tributary_proto::v1;

use crate::Gateway;
use crate::acl::{Authz, CLUSTER_NAME, Operation, ResourceType};
use crate::conn::Session;
use crate::errors::{Context, kafka_code, kafka_error};

/// Kafka's offset.metadata.max.bytes default.
const MAX_OFFSET_METADATA: usize = 4096;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// Joining, syncing, heartbeating and leaving need READ on the group.
fn group_read(az: &Authz<'_>, group: &str) -> bool {
    az.check(Operation::Read, ResourceType::Group, group)
}

pub(crate) async fn join(
    gw: &Gateway,
    az: &Authz<'_>,
    session: &Session,
    req: JoinGroupRequest,
    version: i16,
) -> JoinGroupResponse {
    let fail = |code: i16, member: &str| {
        JoinGroupResponse::default()
            .with_error_code(code)
            .with_generation_id(-1)
            .with_member_id(s(member))
            .with_protocol_name(if version >= 7 {
                None
            } else {
                Some(StrBytes::default())
            })
    };
    if !group_read(az, req.group_id.as_str()) {
        return fail(K::GroupAuthorizationFailed.code(), req.member_id.as_str());
    }
    if req.group_id.is_empty() {
        return fail(K::InvalidGroupId.code(), "");
    }
    // group.min/max.session.timeout.ms (settings; Kafka's defaults 6 s and 30 min).
    if !gw
        .config
        .session_timeout_ms
        .contains(&req.session_timeout_ms)
    {
        return fail(K::InvalidSessionTimeout.code(), req.member_id.as_str());
    }
    // KIP-394: a new member first gets an id and must rejoin with it.
    if req.member_id.is_empty() && version >= 4 {
        let id = format!(
            "{}-{:032x}",
            if session.client_id.is_empty() {
                "consumer"
            } else {
                &session.client_id
            },
            rand::random::<u128>()
        );
        return fail(K::MemberIdRequired.code(), &id);
    }
    let rebalance_timeout = if version >= 1 {
        req.rebalance_timeout_ms
    } else {
        req.session_timeout_ms
    };
    let r = gw
        .core
        .groups
        .clone()
        .join_group(v1::JoinGroupRequest {
            namespace: gw.config.namespace.clone(),
            group: req.group_id.to_string(),
            member_id: req.member_id.to_string(),
            group_instance_id: req
                .group_instance_id
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default(),
            protocol_type: req.protocol_type.to_string(),
            protocols: req
                .protocols
                .iter()
                .map(|p| v1::Header {
                    name: p.name.to_string(),
                    value: p.metadata.clone(),
                })
                .collect(),
            session_timeout_ms: req.session_timeout_ms,
            rebalance_timeout_ms: rebalance_timeout,
            client_id: session.client_id.clone(),
            client_host: format!("/{}", session.peer.ip()),
        })
        .await;
    match r {
        Ok(r) => {
            let r = r.into_inner();
            JoinGroupResponse::default()
                .with_generation_id(r.generation)
                .with_protocol_type(Some(req.protocol_type.clone()))
                .with_protocol_name(Some(s(r.protocol_name)))
                .with_leader(s(r.leader))
                .with_member_id(s(r.member_id))
                .with_members(
                    r.members
                        .into_iter()
                        .map(|m| {
                            JoinGroupResponseMember::default()
                                .with_member_id(s(m.member_id))
                                .with_group_instance_id(
                                    (!m.group_instance_id.is_empty())
                                        .then(|| s(m.group_instance_id)),
                                )
                                .with_metadata(m.metadata)
                        })
                        .collect(),
                )
        }
        Err(status) => fail(kafka_error(&status, Context::Group), req.member_id.as_str()),
    }
}

pub(crate) async fn sync(gw: &Gateway, az: &Authz<'_>, req: SyncGroupRequest) -> SyncGroupResponse {
    if !group_read(az, req.group_id.as_str()) {
        return SyncGroupResponse::default()
            .with_error_code(K::GroupAuthorizationFailed.code())
            .with_assignment(Bytes::new());
    }
    let r = gw
        .core
        .groups
        .clone()
        .sync_group(v1::SyncGroupRequest {
            namespace: gw.config.namespace.clone(),
            group: req.group_id.to_string(),
            member_id: req.member_id.to_string(),
            generation: req.generation_id,
            assignments: req
                .assignments
                .iter()
                .map(|a| v1::GroupMember {
                    member_id: a.member_id.to_string(),
                    assignment: a.assignment.clone(),
                    ..Default::default()
                })
                .collect(),
        })
        .await;
    match r {
        Ok(r) => {
            let r = r.into_inner();
            SyncGroupResponse::default()
                .with_assignment(r.assignment)
                .with_protocol_type(req.protocol_type.clone())
                .with_protocol_name(Some(s(r.protocol_name)))
        }
        Err(status) => SyncGroupResponse::default()
            .with_error_code(kafka_error(&status, Context::Group))
            .with_assignment(Bytes::new()),
    }
}

pub(crate) async fn heartbeat(
    gw: &Gateway,
    az: &Authz<'_>,
    req: HeartbeatRequest,
) -> HeartbeatResponse {
    if !group_read(az, req.group_id.as_str()) {
        return HeartbeatResponse::default().with_error_code(K::GroupAuthorizationFailed.code());
    }
    let r = gw
        .core
        .groups
        .clone()
        .heartbeat(v1::HeartbeatRequest {
            namespace: gw.config.namespace.clone(),
            group: req.group_id.to_string(),
            member_id: req.member_id.to_string(),
            generation: req.generation_id,
        })
        .await;
    let code = match r {
        Ok(r) if r.get_ref().rebalance_in_progress => K::RebalanceInProgress.code(),
        Ok(_) => 0,
        Err(status) => kafka_error(&status, Context::Group),
    };
    HeartbeatResponse::default().with_error_code(code)
}

pub(crate) async fn leave(
    gw: &Gateway,
    az: &Authz<'_>,
    req: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    if !group_read(az, req.group_id.as_str()) {
        return LeaveGroupResponse::default().with_error_code(K::GroupAuthorizationFailed.code());
    }
    let members: Vec<(String, Option<StrBytes>)> = if version >= 3 {
        req.members
            .iter()
            .map(|m| (m.member_id.to_string(), m.group_instance_id.clone()))
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    let r = gw
        .core
        .groups
        .clone()
        .leave_group(v1::LeaveGroupRequest {
            namespace: gw.config.namespace.clone(),
            group: req.group_id.to_string(),
            member_ids: members.iter().map(|(m, _)| m.clone()).collect(),
        })
        .await;
    match r {
        Ok(r) => {
            let unknown = r.into_inner().unknown_member_ids;
            let code_of = |m: &String| {
                if unknown.contains(m) {
                    K::UnknownMemberId.code()
                } else {
                    0
                }
            };
            if version >= 3 {
                LeaveGroupResponse::default().with_members(
                    members
                        .iter()
                        .map(|(m, inst)| {
                            MemberResponse::default()
                                .with_member_id(s(m.clone()))
                                .with_group_instance_id(inst.clone())
                                .with_error_code(code_of(m))
                        })
                        .collect(),
                )
            } else {
                LeaveGroupResponse::default().with_error_code(code_of(&members[0].0))
            }
        }
        Err(status) => {
            LeaveGroupResponse::default().with_error_code(kafka_error(&status, Context::Group))
        }
    }
}

/// READ on the group (GROUP_AUTHORIZATION_FAILED everywhere) and on each topic
/// (TOPIC_AUTHORIZATION_FAILED for its partitions, which are not committed).
pub(crate) async fn offset_commit(
    gw: &Gateway,
    az: &Authz<'_>,
    req: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let partition_codes = |code_for: &dyn Fn(&str, i32, Option<&StrBytes>) -> i16| {
        req.topics
            .iter()
            .map(|t| {
                OffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_topic_id(t.topic_id)
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                OffsetCommitResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(code_for(
                                        t.name.as_str(),
                                        p.partition_index,
                                        p.committed_metadata.as_ref(),
                                    ))
                            })
                            .collect(),
                    )
            })
            .collect::<Vec<_>>()
    };
    if !group_read(az, req.group_id.as_str()) {
        return OffsetCommitResponse::default().with_topics(partition_codes(&|_, _, _| {
            K::GroupAuthorizationFailed.code()
        }));
    }
    if req.group_id.is_empty() {
        return OffsetCommitResponse::default()
            .with_topics(partition_codes(&|_, _, _| K::InvalidGroupId.code()));
    }
    let denied_topics: Vec<&str> = req
        .topics
        .iter()
        .map(|t| t.name.as_str())
        .filter(|t| !az.check(Operation::Read, ResourceType::Topic, t))
        .collect();
    let too_large = |m: Option<&StrBytes>| m.is_some_and(|m| m.len() > MAX_OFFSET_METADATA);
    let mut offsets = Vec::new();
    for t in &req.topics {
        if denied_topics.contains(&t.name.as_str()) {
            continue;
        }
        for p in &t.partitions {
            if too_large(p.committed_metadata.as_ref()) || p.partition_index < 0 {
                continue;
            }
            offsets.push(v1::CommittedOffset {
                stream: Some(gw.stream_id(t.name.as_str())),
                partition: p.partition_index as u32,
                offset: p.committed_offset,
                metadata: p
                    .committed_metadata
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
                commit_time_ms: 0,
                leader_epoch: p.committed_leader_epoch,
            });
        }
    }
    let r = gw
        .core
        .offsets
        .clone()
        .commit_offsets(v1::CommitOffsetsRequest {
            namespace: gw.config.namespace.clone(),
            group: req.group_id.to_string(),
            offsets,
            generation: Some(req.generation_id_or_member_epoch),
            member_id: req.member_id.to_string(),
        })
        .await;
    // Partitions the core left out (unknown topic or partition) get their own code.
    let (code, rejected) = match r {
        Ok(r) => (0, r.into_inner().rejected),
        Err(status) => (kafka_error(&status, Context::Group), Vec::new()),
    };
    let rejected_code = |topic: &str, index: i32| {
        rejected
            .iter()
            .find(|x| {
                x.partition as i32 == index && x.stream.as_ref().is_some_and(|s| s.name == topic)
            })
            .map(|x| kafka_code(x.error(), Context::Group))
    };
    OffsetCommitResponse::default().with_topics(partition_codes(&|topic, index, metadata| {
        if denied_topics.contains(&topic) {
            K::TopicAuthorizationFailed.code()
        } else if too_large(metadata) {
            K::OffsetMetadataTooLarge.code()
        } else if index < 0 {
            K::UnknownTopicOrPartition.code()
        } else {
            rejected_code(topic, index).unwrap_or(code)
        }
    }))
}

/// (topic, partitions) asked for; `None` = every committed partition of the group.
type WantedTopics = Option<Vec<(TopicName, Vec<i32>)>>;

/// Committed offsets by topic, each with the error code of all its partitions (0, or
/// TOPIC_AUTHORIZATION_FAILED for a topic asked for without DESCRIBE on it; topics listed
/// without being asked for are left out when not described-authorized, as in Kafka).
type TopicOffsets = Vec<(TopicName, Vec<v1::CommittedOffset>, i16)>;

async fn fetch_group_offsets(
    gw: &Gateway,
    az: &Authz<'_>,
    group: &str,
    wanted: WantedTopics,
    require_stable: bool,
) -> Result<TopicOffsets, i16> {
    if !az.check(Operation::Describe, ResourceType::Group, group) {
        return Err(K::GroupAuthorizationFailed.code());
    }
    let mut denied: Vec<(TopicName, Vec<i32>)> = Vec::new();
    let wanted = wanted.map(|topics| {
        let (ok, no): (Vec<_>, Vec<_>) = topics
            .into_iter()
            .partition(|(t, _)| az.check(Operation::Describe, ResourceType::Topic, t.as_str()));
        denied = no;
        ok
    });
    let denied_out = || {
        denied
            .iter()
            .map(|(t, ps)| {
                (
                    t.clone(),
                    ps.iter()
                        .map(|p| v1::CommittedOffset {
                            partition: (*p).max(0) as u32,
                            offset: -1,
                            ..Default::default()
                        })
                        .collect(),
                    K::TopicAuthorizationFailed.code(),
                )
            })
            .collect::<TopicOffsets>()
    };
    let partitions = match &wanted {
        None => Vec::new(),
        Some(topics) => topics
            .iter()
            .flat_map(|(t, ps)| {
                ps.iter().map(move |p| v1::FetchPartition {
                    stream: Some(gw.stream_id(t.as_str())),
                    partition: (*p).max(0) as u32,
                    ..Default::default()
                })
            })
            .collect(),
    };
    if wanted.as_ref().is_some_and(|w| w.is_empty()) {
        return Ok(denied_out());
    }
    let r = gw
        .core
        .offsets
        .clone()
        .fetch_offsets(v1::FetchOffsetsRequest {
            namespace: gw.config.namespace.clone(),
            group: group.to_string(),
            partitions,
            require_stable,
        })
        .await
        .map_err(|status| kafka_error(&status, Context::Group))?
        .into_inner();
    let mut out: TopicOffsets = Vec::new();
    // Partitions an open transaction has staged offsets for answer UNSTABLE_OFFSET_COMMIT
    // (retriable) in entries of their own, so the client retries until it ends (KIP-447).
    let unstable = |c: &v1::CommittedOffset| {
        r.unstable.iter().any(|u| {
            u.partition == c.partition
                && u.stream.as_ref().map(|s| &s.name) == c.stream.as_ref().map(|s| &s.name)
        })
    };
    for u in &r.unstable {
        let name = u
            .stream
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let asked = match &wanted {
            None => az.allowed(Operation::Describe, ResourceType::Topic, &name),
            Some(topics) => topics
                .iter()
                .any(|(t, ps)| t.as_str() == name && ps.contains(&(u.partition as i32))),
        };
        if asked {
            out.push((
                TopicName(s(name)),
                vec![v1::CommittedOffset {
                    partition: u.partition,
                    offset: -1,
                    ..Default::default()
                }],
                K::UnstableOffsetCommit.code(),
            ));
        }
    }
    for c in r.offsets.iter().filter(|c| !unstable(c)).cloned() {
        let name = c
            .stream
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        if wanted.is_none() && !az.allowed(Operation::Describe, ResourceType::Topic, &name) {
            continue;
        }
        match out.iter_mut().find(|(t, _, _)| t.as_str() == name) {
            Some((_, v, _)) => v.push(c),
            None => out.push((TopicName(s(name)), vec![c], 0)),
        }
    }
    out.extend(denied_out());
    Ok(out)
}

fn metadata_of(c: &v1::CommittedOffset) -> Option<StrBytes> {
    Some(s(c.metadata.clone()))
}

/// The leader epoch committed with the offset; -1 when none was (or nothing is committed).
/// OffsetFetch carries it from v5; older versions do not encode the field.
fn leader_epoch_of(c: &v1::CommittedOffset) -> i32 {
    if c.offset < 0 || c.leader_epoch < 0 {
        -1
    } else {
        c.leader_epoch
    }
}

pub(crate) async fn offset_fetch(
    gw: &Gateway,
    az: &Authz<'_>,
    req: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    if version >= 8 {
        let mut groups = Vec::new();
        for g in &req.groups {
            let wanted = g.topics.as_ref().map(|ts| {
                ts.iter()
                    .map(|t| (t.name.clone(), t.partition_indexes.clone()))
                    .collect()
            });
            let group = OffsetFetchResponseGroup::default().with_group_id(g.group_id.clone());
            groups.push(
                match fetch_group_offsets(gw, az, g.group_id.as_str(), wanted, req.require_stable)
                    .await
                {
                    Ok(topics) => group.with_topics(
                        topics
                            .into_iter()
                            .map(|(name, offsets, code)| {
                                OffsetFetchResponseTopics::default()
                                    .with_name(name)
                                    .with_partitions(
                                        offsets
                                            .iter()
                                            .map(|c| {
                                                OffsetFetchResponsePartitions::default()
                                                    .with_error_code(code)
                                                    .with_partition_index(c.partition as i32)
                                                    .with_committed_offset(c.offset)
                                                    .with_committed_leader_epoch(leader_epoch_of(c))
                                                    .with_metadata(metadata_of(c))
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    ),
                    Err(code) => group.with_error_code(code),
                },
            );
        }
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let wanted = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.clone(), t.partition_indexes.clone()))
            .collect()
    });
    match fetch_group_offsets(gw, az, req.group_id.as_str(), wanted, req.require_stable).await {
        Ok(topics) => OffsetFetchResponse::default().with_topics(
            topics
                .into_iter()
                .map(|(name, offsets, code)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(name)
                        .with_partitions(
                            offsets
                                .iter()
                                .map(|c| {
                                    OffsetFetchResponsePartition::default()
                                        .with_error_code(code)
                                        .with_partition_index(c.partition as i32)
                                        .with_committed_offset(c.offset)
                                        .with_committed_leader_epoch(leader_epoch_of(c))
                                        .with_metadata(metadata_of(c))
                                })
                                .collect(),
                        )
                })
                .collect(),
        ),
        Err(code) => OffsetFetchResponse::default().with_error_code(code),
    }
}

/// DESCRIBE on each group (GROUP_AUTHORIZATION_FAILED).
pub(crate) async fn describe_groups(
    gw: &Gateway,
    az: &Authz<'_>,
    req: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let mut out = Vec::new();
    for g in req.groups {
        if !az.check(Operation::Describe, ResourceType::Group, g.as_str()) {
            out.push(
                DescribedGroup::default()
                    .with_group_id(g)
                    .with_error_code(K::GroupAuthorizationFailed.code())
                    .with_authorized_operations(i32::MIN),
            );
            continue;
        }
        let ops = if req.include_authorized_operations {
            az.operations(ResourceType::Group, g.as_str())
        } else {
            i32::MIN
        };
        let r = gw
            .core
            .groups
            .clone()
            .describe_group(v1::DescribeGroupRequest {
                namespace: gw.config.namespace.clone(),
                group: g.to_string(),
            })
            .await;
        let base = DescribedGroup::default()
            .with_group_id(g)
            .with_authorized_operations(ops);
        out.push(match r {
            Ok(r) => {
                let r = r.into_inner();
                base.with_group_state(s(r.state))
                    .with_protocol_type(s(r.protocol_type))
                    .with_protocol_data(s(r.protocol_name))
                    .with_members(
                        r.members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(s(m.member_id))
                                    .with_group_instance_id(
                                        (!m.group_instance_id.is_empty())
                                            .then(|| s(m.group_instance_id)),
                                    )
                                    .with_client_id(s(m.client_id))
                                    .with_client_host(s(m.client_host))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    )
            }
            Err(status) => base.with_error_code(kafka_error(&status, Context::Group)),
        });
    }
    DescribeGroupsResponse::default().with_groups(out)
}

/// Every group with DESCRIBE on the cluster; otherwise the groups the client may DESCRIBE.
pub(crate) async fn list_groups(
    gw: &Gateway,
    az: &Authz<'_>,
    req: ListGroupsRequest,
) -> ListGroupsResponse {
    let all = az.allowed(Operation::Describe, ResourceType::Cluster, CLUSTER_NAME);
    let r = gw
        .core
        .admin
        .clone()
        .list_groups(v1::ListGroupsRequest {
            namespace: gw.config.namespace.clone(),
        })
        .await;
    match r {
        Ok(r) => ListGroupsResponse::default().with_groups(
            r.into_inner()
                .groups
                .into_iter()
                .filter(|g| all || az.allowed(Operation::Describe, ResourceType::Group, &g.group))
                .filter(|g| {
                    req.states_filter.is_empty()
                        || req
                            .states_filter
                            .iter()
                            .any(|f| f.as_str().eq_ignore_ascii_case(&g.state))
                })
                .map(|g| {
                    ListedGroup::default()
                        .with_group_id(GroupId(s(g.group)))
                        .with_protocol_type(s(g.protocol_type))
                        .with_group_state(s(g.state))
                        .with_group_type(s("classic"))
                })
                .collect(),
        ),
        Err(status) => {
            ListGroupsResponse::default().with_error_code(kafka_error(&status, Context::Group))
        }
    }
}

/// DELETE on each group (GROUP_AUTHORIZATION_FAILED).
pub(crate) async fn delete_groups(
    gw: &Gateway,
    az: &Authz<'_>,
    req: DeleteGroupsRequest,
) -> DeleteGroupsResponse {
    let mut results = Vec::new();
    for g in req.groups_names {
        if !az.check(Operation::Delete, ResourceType::Group, g.as_str()) {
            results.push(
                DeletableGroupResult::default()
                    .with_group_id(g)
                    .with_error_code(K::GroupAuthorizationFailed.code()),
            );
            continue;
        }
        let r = gw
            .core
            .admin
            .clone()
            .delete_group(v1::DeleteGroupRequest {
                namespace: gw.config.namespace.clone(),
                group: g.to_string(),
            })
            .await;
        let code = match r {
            Ok(_) => 0,
            Err(status) => kafka_error(&status, Context::Group),
        };
        results.push(
            DeletableGroupResult::default()
                .with_group_id(g)
                .with_error_code(code),
        );
    }
    DeleteGroupsResponse::default().with_results(results)
}
