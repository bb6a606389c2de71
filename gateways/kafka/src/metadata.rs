//! Metadata, FindCoordinator and DescribeCluster: the gateway presents itself as a one-broker
//! cluster that leads every partition and coordinates every group.

use kafka_protocol::error::ResponseError as K;
use kafka_protocol::messages::describe_cluster_request::DescribeClusterRequest;
use kafka_protocol::messages::describe_cluster_response::{
    DescribeClusterBroker, DescribeClusterResponse,
};
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::{
    MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, TopicName};
use kafka_protocol::protocol::StrBytes;
use tributary_gateway_common::client::error_code;
use tributary_proto::v1;

use crate::Gateway;
use crate::acl::{Authz, Operation, ResourceType};
use crate::errors::{Context, kafka_code};

/// The broker id the gateway answers as.
pub(crate) const NODE_ID: i32 = 0;
use crate::acl::NO_OPERATIONS;

/// Kafka's topic name rule: 1..=249 of [a-zA-Z0-9._-], not "." or "..".
pub(crate) fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(crate) fn topic_uuid(info: &v1::StreamInfo) -> uuid::Uuid {
    uuid::Uuid::parse_str(&info.uuid).unwrap_or_default()
}

impl Gateway {
    pub(crate) fn stream_id(&self, topic: &str) -> v1::StreamId {
        v1::StreamId {
            namespace: self.config.namespace.clone(),
            name: topic.to_string(),
        }
    }

    pub(crate) async fn describe_topic(
        &self,
        topic: &str,
    ) -> Result<v1::StreamInfo, tonic::Status> {
        Ok(self
            .core
            .for_stream(topic)
            .admin
            .describe_stream(v1::DescribeStreamRequest {
                id: Some(self.stream_id(topic)),
            })
            .await?
            .into_inner()
            .stream
            .unwrap_or_default())
    }

    pub(crate) async fn list_topics(&self) -> Result<Vec<v1::StreamInfo>, tonic::Status> {
        Ok(self
            .core
            .admin
            .clone()
            .list_streams(v1::ListStreamsRequest {
                namespace: self.config.namespace.clone(),
            })
            .await?
            .into_inner()
            .streams)
    }

    /// The topic with this id (Fetch v13+, Metadata v10+, DeleteTopics v6).
    pub(crate) async fn topic_name(&self, id: uuid::Uuid) -> Option<String> {
        if let Some(name) = self.topic_ids.read().get(&id) {
            return Some(name.clone());
        }
        let topics = self.list_topics().await.ok()?;
        let mut cache = self.topic_ids.write();
        cache.clear();
        for t in &topics {
            if let Some(sid) = &t.id {
                cache.insert(topic_uuid(t), sid.name.clone());
            }
        }
        cache.get(&id).cloned()
    }

    fn metadata_brokers(&self) -> Vec<MetadataResponseBroker> {
        self.brokers()
            .into_iter()
            .map(|b| {
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(b.id))
                    .with_host(StrBytes::from_string(b.host))
                    .with_port(b.port)
            })
            .collect()
    }
}

fn topic_response(gw: &Gateway, info: &v1::StreamInfo, operations: i32) -> MetadataResponseTopic {
    let name = info.id.as_ref().map(|i| i.name.clone()).unwrap_or_default();
    let leader = |p: i32| BrokerId(gw.leader(&name, p));
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(name.clone()))))
        .with_topic_id(topic_uuid(info))
        .with_topic_authorized_operations(operations)
        .with_partitions(
            (0..info.partitions as i32)
                .map(|p| {
                    MetadataResponsePartition::default()
                        .with_partition_index(p)
                        .with_leader_id(leader(p))
                        // No leader epochs: clients then skip OffsetForLeaderEpoch validation,
                        // which the gateway does not serve.
                        .with_leader_epoch(-1)
                        .with_replica_nodes(vec![leader(p)])
                        .with_isr_nodes(vec![leader(p)])
                })
                .collect(),
        )
}

fn topic_error(name: Option<TopicName>, id: uuid::Uuid, code: i16) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_name(name)
        .with_topic_id(id)
        .with_error_code(code)
        .with_topic_authorized_operations(NO_OPERATIONS)
}

fn stream_name(info: &v1::StreamInfo) -> &str {
    info.id.as_ref().map_or("", |i| i.name.as_str())
}

/// Kafka's rules: listing every topic leaves out those the client may not DESCRIBE; a topic
/// asked for by name answers TOPIC_AUTHORIZATION_FAILED (by id: without its name); creating
/// a missing one needs CREATE on the cluster or on the topic.
pub(crate) async fn metadata(
    gw: &Gateway,
    az: &Authz<'_>,
    req: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let with_ops = version >= 8 && req.include_topic_authorized_operations;
    let ops = |name: &str| {
        if with_ops {
            az.operations(ResourceType::Topic, name)
        } else {
            NO_OPERATIONS
        }
    };
    // v0: an empty list means every topic; v1+: null means every topic.
    let requested = match req.topics {
        Some(t) if !(version == 0 && t.is_empty()) => Some(t),
        _ => None,
    };
    let allow_create =
        gw.config.auto_create_topics && (version < 4 || req.allow_auto_topic_creation);
    let mut topics = Vec::new();
    match requested {
        None => match gw.list_topics().await {
            Ok(all) => topics.extend(
                all.iter()
                    .filter(|t| {
                        az.allowed(Operation::Describe, ResourceType::Topic, stream_name(t))
                    })
                    .map(|t| topic_response(gw, t, ops(stream_name(t)))),
            ),
            Err(status) => {
                tracing::warn!(error = %status.message(), "metadata: cannot list topics");
            }
        },
        Some(wanted) => {
            for t in wanted {
                let by_id = t.name.is_none();
                let name = match t.name {
                    Some(n) => n.to_string(),
                    None => match gw.topic_name(t.topic_id).await {
                        Some(n) => n,
                        None => {
                            topics.push(topic_error(None, t.topic_id, K::UnknownTopicId.code()));
                            continue;
                        }
                    },
                };
                if !az.check(Operation::Describe, ResourceType::Topic, &name) {
                    topics.push(if by_id {
                        topic_error(None, t.topic_id, K::TopicAuthorizationFailed.code())
                    } else {
                        topic_error(
                            Some(TopicName(StrBytes::from_string(name))),
                            uuid::Uuid::nil(),
                            K::TopicAuthorizationFailed.code(),
                        )
                    });
                    continue;
                }
                let tname = Some(TopicName(StrBytes::from_string(name.clone())));
                if !valid_topic_name(&name) {
                    topics.push(topic_error(
                        tname,
                        uuid::Uuid::nil(),
                        K::InvalidTopicException.code(),
                    ));
                    continue;
                }
                match gw.describe_topic(&name).await {
                    Ok(info) => topics.push(topic_response(gw, &info, ops(&name))),
                    Err(s)
                        if error_code(&s) == v1::ErrorCode::StreamNotFound
                            && allow_create
                            && !az.allowed(
                                Operation::Create,
                                ResourceType::Cluster,
                                crate::acl::CLUSTER_NAME,
                            )
                            && !az.check(Operation::Create, ResourceType::Topic, &name) =>
                    {
                        topics.push(topic_error(
                            tname,
                            uuid::Uuid::nil(),
                            K::TopicAuthorizationFailed.code(),
                        ))
                    }
                    Err(s) if error_code(&s) == v1::ErrorCode::StreamNotFound && allow_create => {
                        let created = gw
                            .core
                            .for_stream(&name)
                            .admin
                            .create_stream(v1::CreateStreamRequest {
                                id: Some(gw.stream_id(&name)),
                                partitions: 0,
                                if_not_exists: true,
                                ..Default::default()
                            })
                            .await;
                        match created {
                            Ok(r) => {
                                tracing::info!(topic = %name, "topic auto-created");
                                topics.push(topic_response(
                                    gw,
                                    &r.into_inner().stream.unwrap_or_default(),
                                    ops(&name),
                                ))
                            }
                            Err(s) => topics.push(topic_error(
                                tname,
                                uuid::Uuid::nil(),
                                kafka_code(error_code(&s), Context::Admin),
                            )),
                        }
                    }
                    Err(s) => topics.push(topic_error(
                        tname,
                        uuid::Uuid::nil(),
                        kafka_code(error_code(&s), Context::Admin),
                    )),
                }
            }
        }
    }
    MetadataResponse::default()
        .with_brokers(gw.metadata_brokers())
        .with_cluster_id(Some(StrBytes::from_string(gw.config.cluster_id.clone())))
        .with_controller_id(BrokerId(gw.brokers()[0].id))
        .with_topics(topics)
        .with_cluster_authorized_operations(
            if (8..=10).contains(&version) && req.include_cluster_authorized_operations {
                cluster_operations(az)
            } else {
                NO_OPERATIONS
            },
        )
}

/// The cluster's authorized operations: 0 without DESCRIBE on it, as Kafka answers.
fn cluster_operations(az: &Authz<'_>) -> i32 {
    if !az.enabled() {
        NO_OPERATIONS
    } else if az.allowed(
        Operation::Describe,
        ResourceType::Cluster,
        crate::acl::CLUSTER_NAME,
    ) {
        az.operations(ResourceType::Cluster, crate::acl::CLUSTER_NAME)
    } else {
        0
    }
}

/// DESCRIBE on the group (GROUP_AUTHORIZATION_FAILED) or on the transactional id
/// (TRANSACTIONAL_ID_AUTHORIZATION_FAILED) comes before anything else, as in Kafka.
pub(crate) fn find_coordinator(
    gw: &Gateway,
    az: &Authz<'_>,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let denied = |key: &str| -> Option<i16> {
        match req.key_type {
            0 if !az.check(Operation::Describe, ResourceType::Group, key) => {
                Some(K::GroupAuthorizationFailed.code())
            }
            1 if !az.check(Operation::Describe, ResourceType::TransactionalId, key) => {
                Some(K::TransactionalIdAuthorizationFailed.code())
            }
            _ => None,
        }
    };
    // Key types 0 (group) and 1 (transaction): every gateway can coordinate, the state
    // being in the core; in a fleet each key is given to one gateway by a hash, to spread
    // the load. Share-group keys (2) are not served.
    let refused = !matches!(req.key_type, 0 | 1);
    let (code, message) = if refused {
        (
            K::InvalidRequest.code(),
            Some(StrBytes::from_static_str(
                "only group and transaction coordinators are served",
            )),
        )
    } else {
        (0, None)
    };
    if version >= 4 {
        let coordinators = req
            .coordinator_keys
            .into_iter()
            .map(|key| {
                if let Some(code) = denied(key.as_str()) {
                    return Coordinator::default()
                        .with_key(key)
                        .with_node_id(BrokerId(-1))
                        .with_host(StrBytes::default())
                        .with_port(-1)
                        .with_error_code(code);
                }
                let owner = gw.coordinator(key.as_str());
                Coordinator::default()
                    .with_key(key)
                    .with_node_id(BrokerId(if refused { -1 } else { owner.id }))
                    .with_host(if refused {
                        StrBytes::default()
                    } else {
                        StrBytes::from_string(owner.host)
                    })
                    .with_port(if refused { -1 } else { owner.port })
                    .with_error_code(code)
                    .with_error_message(message.clone())
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    if let Some(code) = denied(req.key.as_str()) {
        return FindCoordinatorResponse::default()
            .with_error_code(code)
            .with_node_id(BrokerId(-1))
            .with_host(StrBytes::default())
            .with_port(-1);
    }
    let owner = gw.coordinator(req.key.as_str());
    FindCoordinatorResponse::default()
        .with_error_code(code)
        .with_error_message(message)
        .with_node_id(BrokerId(if refused { -1 } else { owner.id }))
        .with_host(if refused {
            StrBytes::default()
        } else {
            StrBytes::from_string(owner.host)
        })
        .with_port(if refused { -1 } else { owner.port })
}

pub(crate) fn describe_cluster(
    gw: &Gateway,
    az: &Authz<'_>,
    req: DescribeClusterRequest,
) -> DescribeClusterResponse {
    DescribeClusterResponse::default()
        .with_cluster_id(StrBytes::from_string(gw.config.cluster_id.clone()))
        .with_controller_id(BrokerId(gw.brokers()[0].id))
        .with_endpoint_type(1)
        .with_cluster_authorized_operations(if req.include_cluster_authorized_operations {
            cluster_operations(az)
        } else {
            NO_OPERATIONS
        })
        .with_brokers(
            gw.brokers()
                .into_iter()
                .map(|b| {
                    DescribeClusterBroker::default()
                        .with_broker_id(BrokerId(b.id))
                        .with_host(StrBytes::from_string(b.host))
                        .with_port(b.port)
                })
                .collect(),
        )
}

#[cfg(test)]
mod tests {
    use super::valid_topic_name;

    #[test]
    fn topic_names_follow_kafkas_rule() {
        assert!(valid_topic_name("orders.v1_x-y"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name(".."));
        assert!(!valid_topic_name("a/b"));
        assert!(!valid_topic_name(&"x".repeat(250)));
    }
}
