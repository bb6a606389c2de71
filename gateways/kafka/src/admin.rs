//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions, DeleteRecords,
//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs.
//!
//! Topic configs: retention.ms, retention.bytes, max.message.bytes and cleanup.policy are the
//! core's stream configs and take effect. Configs about replicas, segments and flushing have
//! no meaning here (storage is the core's, durable at every ack); they are accepted, stored
//! and described back so that scripts written for Kafka keep working. `remote.storage.enable`
//! chooses the stream's log store backend at creation (see [`REMOTE_STORAGE`]);
//! `tributary.delay.target.topic` makes the topic a delay line (see [`DELAY_TARGET`]). Anything
//! else, and values the gateway cannot honour, get INVALID_CONFIG.

use std::collections::HashMap;

use kafka_protocol::error::ResponseError as K;
use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::alter_configs_request::AlterConfigsRequest;
use kafka_protocol::messages::alter_configs_response::{
    AlterConfigsResourceResponse, AlterConfigsResponse,
};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsRequest;
use kafka_protocol::messages::create_partitions_response::{
    CreatePartitionsResponse, CreatePartitionsTopicResult,
};
use kafka_protocol::messages::create_topics_request::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::delete_records_request::DeleteRecordsRequest;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicsRequest;
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsRequest;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResponse, DescribeConfigsResult,
    DescribeConfigsSynonym,
};
use kafka_protocol::messages::incremental_alter_configs_request::IncrementalAlterConfigsRequest;
use kafka_protocol::messages::incremental_alter_configs_response::{
    AlterConfigsResourceResponse as IncrementalResourceResponse, IncrementalAlterConfigsResponse,
};
use kafka_protocol::protocol::StrBytes;
use tributary_gateway_common::client::error_code;
use tributary_proto::v1;

use crate::Gateway;
use crate::acl::{Authz, CLUSTER_NAME, Operation, ResourceType};
use crate::errors::{Context, kafka_code, kafka_error};
use crate::metadata::{topic_uuid, valid_topic_name};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;

const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

const TYPE_BOOLEAN: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;
const TYPE_LIST: i8 = 7;

/// Kafka topic configs that the core enforces: (Kafka name, core field, type).
const ENFORCED: &[(&str, &str, i8)] = &[
    ("retention.ms", "retention_ms", TYPE_LONG),
    ("retention.bytes", "retention_bytes", TYPE_LONG),
    ("max.message.bytes", "max_message_bytes", TYPE_INT),
    ("cleanup.policy", "cleanup_policy", TYPE_LIST),
];

/// Kafka topic configs with no effect here, accepted and kept: (name, Kafka's default, type).
const KEPT: &[(&str, &str, i8)] = &[
    ("min.insync.replicas", "1", TYPE_INT),
    ("unclean.leader.election.enable", "false", TYPE_BOOLEAN),
    ("segment.bytes", "1073741824", TYPE_INT),
    ("segment.ms", "604800000", TYPE_LONG),
    ("segment.jitter.ms", "0", TYPE_LONG),
    ("segment.index.bytes", "10485760", TYPE_INT),
    ("index.interval.bytes", "4096", TYPE_INT),
    ("flush.messages", "9223372036854775807", TYPE_LONG),
    ("flush.ms", "9223372036854775807", TYPE_LONG),
    ("preallocate", "false", TYPE_BOOLEAN),
    ("file.delete.delay.ms", "60000", TYPE_LONG),
    ("delete.retention.ms", "86400000", TYPE_LONG),
    ("min.cleanable.dirty.ratio", "0.5", 6),
    ("min.compaction.lag.ms", "0", TYPE_LONG),
    ("max.compaction.lag.ms", "9223372036854775807", TYPE_LONG),
    (
        "message.timestamp.before.max.ms",
        "9223372036854775807",
        TYPE_LONG,
    ),
    (
        "message.timestamp.after.max.ms",
        "9223372036854775807",
        TYPE_LONG,
    ),
    (
        "message.timestamp.difference.max.ms",
        "9223372036854775807",
        TYPE_LONG,
    ),
    ("local.retention.ms", "-2", TYPE_LONG),
    ("local.retention.bytes", "-2", TYPE_LONG),
    ("follower.replication.throttled.replicas", "", TYPE_LIST),
    ("leader.replication.throttled.replicas", "", TYPE_LIST),
    // Stored and described back, but batches are kept as the producer compressed them:
    // the gateway never recompresses (docs/compat/kafka.md). Values are checked first.
    ("compression.type", "producer", TYPE_STRING),
];

/// Kafka's tiered-storage switch (KIP-405) chooses the stream's log store backend: `true`
/// puts the topic on the object store (`[opendal]`), `false` on the local log. Chosen at
/// creation only: Tributary moves no data between backends, so changing it is refused.
const REMOTE_STORAGE: &str = "remote.storage.enable";
const OBJECT_BACKEND: &str = "opendal";

/// Makes the topic a delay line for the topic it names: records produced to it are
/// appended to that topic at the time their `tributary.deliver-at-ms` or
/// `tributary.delay-ms` header asks (docs/compat/mapping.md). Tributary's own config; the
/// core refuses a target that is itself a delay line.
const DELAY_TARGET: &str = "tributary.delay.target.topic";
const LOCAL_BACKEND: &str = "local";

/// The values Kafka's topic `compression.type` takes (case-sensitive, as in Kafka).
const COMPRESSION_TYPES: &[&str] = &["uncompressed", "zstd", "lz4", "snappy", "gzip", "producer"];

/// Configs with one possible value here: (name, the value, type).
const FIXED: &[(&str, &str, i8)] = &[
    // Timestamps are the producer's; the core does not rewrite batches.
    ("message.timestamp.type", "CreateTime", TYPE_STRING),
];

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

#[derive(Debug)]
struct ConfigError(String);

/// Folds one Kafka topic config into a stream config exactly as CreateTopics does (for
/// `tributary import kafka`); the error is CreateTopics' INVALID_CONFIG message.
pub fn apply_topic_config(
    cfg: &mut v1::StreamConfig,
    name: &str,
    value: &str,
) -> Result<(), String> {
    apply_config(cfg, name, value).map_err(|ConfigError(e)| e)
}

/// Folds one Kafka config into the core's stream config.
fn apply_config(cfg: &mut v1::StreamConfig, name: &str, value: &str) -> Result<(), ConfigError> {
    let long = |v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|_| ConfigError(format!("{name} must be an integer, got '{v}'")))
    };
    match name {
        "retention.ms" => cfg.retention_ms = Some(long(value)?),
        "retention.bytes" => cfg.retention_bytes = Some(long(value)?),
        "max.message.bytes" => cfg.max_message_bytes = Some(long(value)?),
        "cleanup.policy" => {
            let mut parts: Vec<&str> = value
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect();
            parts.sort_unstable();
            parts.dedup();
            cfg.cleanup_policy = Some(parts.join(","));
        }
        DELAY_TARGET if value.trim().is_empty() => {
            return Err(ConfigError(format!("{name} must name a topic")));
        }
        DELAY_TARGET => cfg.delay_target = Some(value.trim().to_string()),
        REMOTE_STORAGE => {
            let remote = match value.trim().to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(ConfigError(format!(
                        "{name} must be true or false, got '{value}'"
                    )));
                }
            };
            cfg.storage = Some(
                if remote {
                    OBJECT_BACKEND
                } else {
                    LOCAL_BACKEND
                }
                .into(),
            );
        }
        "compression.type" if !COMPRESSION_TYPES.contains(&value) => {
            return Err(ConfigError(format!(
                "invalid value '{value}' for compression.type: expected one of {}",
                COMPRESSION_TYPES.join(", ")
            )));
        }
        _ if FIXED.iter().any(|(n, v, _)| *n == name && *v == value) => {}
        _ if FIXED.iter().any(|(n, _, _)| *n == name) => {
            let (_, v, _) = FIXED
                .iter()
                .find(|(n, _, _)| *n == name)
                .expect("just found");
            return Err(ConfigError(format!(
                "{name} can only be '{v}' on this broker"
            )));
        }
        _ if KEPT.iter().any(|(n, _, _)| *n == name) => {
            cfg.extra.insert(name.to_string(), value.to_string());
        }
        _ => return Err(ConfigError(format!("unknown topic config '{name}'"))),
    }
    Ok(())
}

/// CREATE on the cluster or on each topic (TOPIC_AUTHORIZATION_FAILED); the configs in the
/// answer need DESCRIBE_CONFIGS on the topic.
pub(crate) async fn create_topics(
    gw: &Gateway,
    az: &Authz<'_>,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let cluster_create = az.allowed(Operation::Create, ResourceType::Cluster, CLUSTER_NAME);
    let mut results = Vec::new();
    for t in req.topics {
        let name = t.name.to_string();
        let result = CreatableTopicResult::default()
            .with_name(t.name.clone())
            .with_num_partitions(-1)
            .with_replication_factor(-1);
        let fail = |code: i16, msg: String| {
            result
                .clone()
                .with_error_code(code)
                .with_error_message(Some(s(msg)))
        };
        if !cluster_create && !az.check(Operation::Create, ResourceType::Topic, &name) {
            results.push(fail(
                K::TopicAuthorizationFailed.code(),
                format!("CREATE on topic '{name}' (or on the cluster) is not allowed"),
            ));
            continue;
        }
        if !valid_topic_name(&name) {
            results.push(fail(
                K::InvalidTopicException.code(),
                format!("invalid topic name '{name}'"),
            ));
            continue;
        }
        if results
            .iter()
            .any(|r: &CreatableTopicResult| r.name == t.name)
        {
            results.push(fail(
                K::InvalidRequest.code(),
                format!("topic '{name}' named twice"),
            ));
            continue;
        }
        let partitions = if !t.assignments.is_empty() {
            t.assignments.len() as i32
        } else {
            t.num_partitions
        };
        if partitions == 0 || partitions < -1 {
            results.push(fail(
                K::InvalidPartitions.code(),
                "number of partitions must be larger than 0".into(),
            ));
            continue;
        }
        // One broker stands for the cluster; durability comes from the core, so any
        // replication factor a Kafka deployment asks for is accepted.
        if t.replication_factor == 0 || t.replication_factor < -1 {
            results.push(fail(
                K::InvalidReplicationFactor.code(),
                "replication factor must be larger than 0".into(),
            ));
            continue;
        }
        let mut config = v1::StreamConfig::default();
        let mut bad = None;
        for c in &t.configs {
            let Some(value) = c.value.as_ref() else {
                continue;
            };
            if let Err(ConfigError(e)) = apply_config(&mut config, c.name.as_str(), value.as_str())
            {
                bad = Some(e);
                break;
            }
        }
        if let Some(e) = bad {
            results.push(fail(K::InvalidConfig.code(), e));
            continue;
        }
        let r = gw
            .core
            .for_stream(&name)
            .admin
            .create_stream(v1::CreateStreamRequest {
                id: Some(gw.stream_id(&name)),
                partitions: partitions.max(0) as u32,
                config: Some(config),
                if_not_exists: false,
                validate_only: req.validate_only,
            })
            .await;
        results.push(match r {
            Ok(r) => {
                let info = r.into_inner().stream.unwrap_or_default();
                let mut ok = result
                    .with_topic_id(topic_uuid(&info))
                    .with_num_partitions(info.partitions as i32)
                    .with_replication_factor(1);
                if version >= 5
                    && !az.allowed(Operation::DescribeConfigs, ResourceType::Topic, &name)
                {
                    ok = ok.with_topic_config_error_code(K::TopicAuthorizationFailed.code());
                } else if version >= 5 {
                    ok = ok.with_configs(Some(
                        topic_configs(&info)
                            .into_iter()
                            .map(|c| {
                                CreatableTopicConfigs::default()
                                    .with_name(c.name)
                                    .with_value(c.value)
                                    .with_read_only(c.read_only)
                                    .with_config_source(c.config_source)
                            })
                            .collect(),
                    ));
                }
                ok
            }
            Err(status) => {
                let code = match error_code(&status) {
                    v1::ErrorCode::InvalidArgument if status.message().contains("partition") => {
                        K::InvalidPartitions.code()
                    }
                    v1::ErrorCode::Unsupported => K::InvalidConfig.code(),
                    c => kafka_code(c, Context::Admin),
                };
                fail(code, status.message().to_string())
            }
        });
    }
    CreateTopicsResponse::default().with_topics(results)
}

/// DELETE on each topic (TOPIC_AUTHORIZATION_FAILED).
pub(crate) async fn delete_topics(
    gw: &Gateway,
    az: &Authz<'_>,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let wanted: Vec<(Option<String>, uuid::Uuid)> = if version >= 6 {
        req.topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .iter()
            .map(|n| (Some(n.to_string()), uuid::Uuid::nil()))
            .collect()
    };
    let mut out = Vec::new();
    for (name, id) in wanted {
        let name = match name {
            Some(n) => Some(n),
            None => gw.topic_name(id).await,
        };
        let result = DeletableTopicResult::default()
            .with_name(name.clone().map(|n| TopicName(s(n))))
            .with_topic_id(id);
        let Some(name) = name else {
            out.push(result.with_error_code(K::UnknownTopicId.code()));
            continue;
        };
        if !az.check(Operation::Delete, ResourceType::Topic, &name) {
            out.push(result.with_error_code(K::TopicAuthorizationFailed.code()));
            continue;
        }
        let r = gw
            .core
            .for_stream(&name)
            .admin
            .delete_stream(v1::DeleteStreamRequest {
                id: Some(gw.stream_id(&name)),
            })
            .await;
        out.push(match r {
            Ok(_) => {
                tracing::info!(topic = %name, "topic deleted");
                result
            }
            Err(status) => result
                .with_error_code(kafka_error(&status, Context::Admin))
                .with_error_message(Some(s(status.message()))),
        });
    }
    gw.topic_ids.write().clear();
    DeleteTopicsResponse::default().with_responses(out)
}

/// ALTER on each topic (TOPIC_AUTHORIZATION_FAILED).
pub(crate) async fn create_partitions(
    gw: &Gateway,
    az: &Authz<'_>,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut out = Vec::new();
    for t in req.topics {
        let result = CreatePartitionsTopicResult::default().with_name(t.name.clone());
        if !az.check(Operation::Alter, ResourceType::Topic, t.name.as_str()) {
            out.push(result.with_error_code(K::TopicAuthorizationFailed.code()));
            continue;
        }
        if t.count <= 0 {
            out.push(result.with_error_code(K::InvalidPartitions.code()));
            continue;
        }
        let r = gw
            .core
            .for_stream(t.name.as_str())
            .admin
            .create_partitions(v1::CreatePartitionsRequest {
                id: Some(gw.stream_id(t.name.as_str())),
                total_partitions: t.count as u32,
                validate_only: req.validate_only,
            })
            .await;
        out.push(match r {
            Ok(_) => result,
            Err(status) => {
                let code = match error_code(&status) {
                    v1::ErrorCode::InvalidArgument => K::InvalidPartitions.code(),
                    c => kafka_code(c, Context::Admin),
                };
                result
                    .with_error_code(code)
                    .with_error_message(Some(s(status.message())))
            }
        });
    }
    CreatePartitionsResponse::default().with_results(out)
}

/// DELETE on each topic (TOPIC_AUTHORIZATION_FAILED for its partitions).
pub(crate) async fn delete_records(
    gw: &Gateway,
    az: &Authz<'_>,
    req: DeleteRecordsRequest,
) -> DeleteRecordsResponse {
    let mut topics = Vec::new();
    for t in req.topics {
        let mut partitions = Vec::new();
        let denied = !az.check(Operation::Delete, ResourceType::Topic, t.name.as_str());
        for p in t.partitions {
            let result = DeleteRecordsPartitionResult::default()
                .with_partition_index(p.partition_index)
                .with_low_watermark(-1);
            if denied {
                partitions.push(result.with_error_code(K::TopicAuthorizationFailed.code()));
                continue;
            }
            let before = if p.offset == -1 {
                // -1 = up to the high watermark.
                match gw.describe_topic(t.name.as_str()).await {
                    Ok(info) => info
                        .partition_info
                        .iter()
                        .find(|i| i.partition as i32 == p.partition_index)
                        .map(|i| i.end_offset)
                        .unwrap_or(0),
                    Err(status) => {
                        partitions
                            .push(result.with_error_code(kafka_error(&status, Context::Admin)));
                        continue;
                    }
                }
            } else {
                p.offset
            };
            let r = gw
                .core
                .for_stream(t.name.as_str())
                .admin
                .delete_records(v1::DeleteRecordsRequest {
                    id: Some(gw.stream_id(t.name.as_str())),
                    partition: p.partition_index.max(0) as u32,
                    before_offset: before,
                })
                .await;
            partitions.push(match r {
                Ok(r) => result.with_low_watermark(r.into_inner().start_offset),
                Err(status) => result.with_error_code(kafka_error(&status, Context::Fetch)),
            });
        }
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    DeleteRecordsResponse::default().with_topics(topics)
}

/// Every config of a topic, with its value and where it comes from.
fn topic_configs(info: &v1::StreamInfo) -> Vec<DescribeConfigsResourceResult> {
    let cfg = info.config.clone().unwrap_or_default();
    let entry = |name: &str, value: String, source: i8, ty: i8, read_only: bool| {
        DescribeConfigsResourceResult::default()
            .with_name(s(name))
            .with_value(Some(s(value)))
            .with_config_source(source)
            .with_config_type(ty)
            .with_read_only(read_only)
    };
    let mut out = Vec::new();
    for (name, field, ty) in ENFORCED {
        let value = match *field {
            "retention_ms" => cfg.retention_ms.unwrap_or_default().to_string(),
            "retention_bytes" => cfg.retention_bytes.unwrap_or_default().to_string(),
            "max_message_bytes" => cfg.max_message_bytes.unwrap_or_default().to_string(),
            _ => cfg
                .cleanup_policy
                .clone()
                .unwrap_or_else(|| "delete".into()),
        };
        let source = if info.explicit_configs.iter().any(|e| e == field) {
            SOURCE_DYNAMIC_TOPIC
        } else {
            SOURCE_DEFAULT
        };
        out.push(entry(name, value, source, *ty, false));
    }
    for (name, value, ty) in FIXED {
        out.push(entry(name, value.to_string(), SOURCE_DEFAULT, *ty, false));
    }
    let remote = cfg.storage.as_deref() == Some(OBJECT_BACKEND);
    let source = if info.explicit_configs.iter().any(|e| e == "storage") {
        SOURCE_DYNAMIC_TOPIC
    } else {
        SOURCE_DEFAULT
    };
    out.push(entry(
        REMOTE_STORAGE,
        remote.to_string(),
        source,
        TYPE_BOOLEAN,
        false,
    ));
    let delay_source = if info.explicit_configs.iter().any(|e| e == "delay_target") {
        SOURCE_DYNAMIC_TOPIC
    } else {
        SOURCE_DEFAULT
    };
    out.push(entry(
        DELAY_TARGET,
        cfg.delay_target.clone().unwrap_or_default(),
        delay_source,
        TYPE_STRING,
        false,
    ));
    for (name, default, ty) in KEPT {
        match cfg.extra.get(*name) {
            Some(v) => out.push(entry(name, v.clone(), SOURCE_DYNAMIC_TOPIC, *ty, false)),
            None => out.push(entry(name, default.to_string(), SOURCE_DEFAULT, *ty, false)),
        }
    }
    out
}

fn broker_configs(gw: &Gateway) -> Vec<DescribeConfigsResourceResult> {
    let entry = |name: &str, value: String, ty: i8| {
        DescribeConfigsResourceResult::default()
            .with_name(s(name))
            .with_value(Some(s(value)))
            .with_config_source(SOURCE_STATIC_BROKER)
            .with_config_type(ty)
            .with_read_only(true)
    };
    vec![
        entry("broker.id", gw.broker_id().to_string(), TYPE_INT),
        entry(
            "auto.create.topics.enable",
            gw.config.auto_create_topics.to_string(),
            TYPE_BOOLEAN,
        ),
        entry(
            "socket.request.max.bytes",
            gw.config.max_request_bytes.to_string(),
            TYPE_INT,
        ),
        entry(
            "advertised.listeners",
            format!(
                "PLAINTEXT://{}:{}",
                gw.config.advertised_host, gw.config.advertised_port
            ),
            TYPE_STRING,
        ),
        entry("offset.metadata.max.bytes", "4096".into(), TYPE_INT),
    ]
}

/// DESCRIBE_CONFIGS on the topic (TOPIC_AUTHORIZATION_FAILED) or on the cluster for the
/// broker (CLUSTER_AUTHORIZATION_FAILED); ALTER_CONFIGS likewise to change them.
fn configs_denied(
    az: &Authz<'_>,
    op: Operation,
    resource_type: i8,
    name: &str,
) -> Option<(i16, String)> {
    match resource_type {
        RESOURCE_TOPIC if !az.check(op, ResourceType::Topic, name) => Some((
            K::TopicAuthorizationFailed.code(),
            format!("{} on topic '{name}' is not allowed", op.word()),
        )),
        RESOURCE_BROKER if !az.check(op, ResourceType::Cluster, CLUSTER_NAME) => Some((
            K::ClusterAuthorizationFailed.code(),
            format!("{} on the cluster is not allowed", op.word()),
        )),
        _ => None,
    }
}

pub(crate) async fn describe_configs(
    gw: &Gateway,
    az: &Authz<'_>,
    req: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
    let mut results = Vec::new();
    for r in req.resources {
        let result = DescribeConfigsResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name.clone());
        if let Some((code, msg)) = configs_denied(
            az,
            Operation::DescribeConfigs,
            r.resource_type,
            r.resource_name.as_str(),
        ) {
            results.push(
                result
                    .with_error_code(code)
                    .with_error_message(Some(s(msg))),
            );
            continue;
        }
        let configs = match r.resource_type {
            RESOURCE_TOPIC => match gw.describe_topic(r.resource_name.as_str()).await {
                Ok(info) => topic_configs(&info),
                Err(status) => {
                    results.push(
                        result
                            .with_error_code(kafka_error(&status, Context::Admin))
                            .with_error_message(Some(s(status.message()))),
                    );
                    continue;
                }
            },
            RESOURCE_BROKER => broker_configs(gw),
            other => {
                results.push(
                    result
                        .with_error_code(K::InvalidRequest.code())
                        .with_error_message(Some(s(format!(
                            "resource type {other} has no configs here"
                        )))),
                );
                continue;
            }
        };
        let configs = configs
            .into_iter()
            .filter(|c| {
                r.configuration_keys
                    .as_ref()
                    .is_none_or(|keys| keys.contains(&c.name))
            })
            .map(|c| {
                if req.include_synonyms {
                    let syn = DescribeConfigsSynonym::default()
                        .with_name(c.name.clone())
                        .with_value(c.value.clone())
                        .with_source(c.config_source);
                    c.with_synonyms(vec![syn])
                } else {
                    c
                }
            })
            .collect();
        results.push(result.with_configs(configs));
    }
    DescribeConfigsResponse::default().with_results(results)
}

/// One config change: set a value or go back to the default.
enum Change {
    Set(String, String),
    Reset(String),
}

/// Applies config changes to a topic through the core; Ok or (Kafka code, message).
async fn alter_topic(
    gw: &Gateway,
    topic: &str,
    changes: Vec<Change>,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let mut set = v1::StreamConfig::default();
    let mut reset = Vec::new();
    for c in changes {
        match c {
            Change::Set(name, value) => apply_config(&mut set, &name, &value)
                .map_err(|ConfigError(e)| (K::InvalidConfig.code(), e))?,
            Change::Reset(name) => match ENFORCED.iter().find(|(n, _, _)| *n == name) {
                Some((_, field, _)) => reset.push(field.to_string()),
                None if KEPT.iter().any(|(n, _, _)| *n == name) => {
                    reset.push(format!("extra.{name}"))
                }
                None if FIXED.iter().any(|(n, _, _)| *n == name) => {}
                None if name == REMOTE_STORAGE => reset.push("storage".into()),
                None if name == DELAY_TARGET => reset.push("delay_target".into()),
                None => {
                    return Err((
                        K::InvalidConfig.code(),
                        format!("unknown topic config '{name}'"),
                    ));
                }
            },
        }
    }
    gw.core
        .for_stream(topic)
        .admin
        .update_stream_config(v1::UpdateStreamConfigRequest {
            id: Some(gw.stream_id(topic)),
            set: Some(set),
            reset,
            validate_only,
        })
        .await
        .map(|_| ())
        .map_err(|status| {
            let code = match error_code(&status) {
                v1::ErrorCode::Unsupported | v1::ErrorCode::InvalidArgument => {
                    K::InvalidConfig.code()
                }
                c => kafka_code(c, Context::Admin),
            };
            (code, status.message().to_string())
        })
}

fn refuse_broker() -> (i16, String) {
    (
        K::InvalidRequest.code(),
        "broker configs are static here: set them on the command line or in the config file".into(),
    )
}

pub(crate) async fn alter_configs(
    gw: &Gateway,
    az: &Authz<'_>,
    req: AlterConfigsRequest,
) -> AlterConfigsResponse {
    let mut out = Vec::new();
    for r in req.resources {
        let denied = configs_denied(
            az,
            Operation::AlterConfigs,
            r.resource_type,
            r.resource_name.as_str(),
        );
        let result = match r.resource_type {
            _ if let Some(d) = denied => Err(d),
            RESOURCE_TOPIC => {
                // AlterConfigs replaces the whole set: every config not named goes back to
                // its default.
                let named: Vec<&str> = r.configs.iter().map(|c| c.name.as_str()).collect();
                let mut changes: Vec<Change> = r
                    .configs
                    .iter()
                    .map(|c| match &c.value {
                        Some(v) => Change::Set(c.name.to_string(), v.to_string()),
                        None => Change::Reset(c.name.to_string()),
                    })
                    .collect();
                for (name, _, _) in ENFORCED.iter().chain(KEPT) {
                    if !named.contains(name) {
                        changes.push(Change::Reset(name.to_string()));
                    }
                }
                if !named.contains(&DELAY_TARGET) {
                    changes.push(Change::Reset(DELAY_TARGET.to_string()));
                }
                alter_topic(gw, r.resource_name.as_str(), changes, req.validate_only).await
            }
            RESOURCE_BROKER => Err(refuse_broker()),
            other => Err((
                K::InvalidRequest.code(),
                format!("resource type {other} has no configs here"),
            )),
        };
        let resp = AlterConfigsResourceResponse::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        out.push(match result {
            Ok(()) => resp,
            Err((code, msg)) => resp.with_error_code(code).with_error_message(Some(s(msg))),
        });
    }
    AlterConfigsResponse::default().with_responses(out)
}

pub(crate) async fn incremental_alter_configs(
    gw: &Gateway,
    az: &Authz<'_>,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut out = Vec::new();
    for r in req.resources {
        let denied = configs_denied(
            az,
            Operation::AlterConfigs,
            r.resource_type,
            r.resource_name.as_str(),
        );
        let result = match r.resource_type {
            _ if let Some(d) = denied => Err(d),
            RESOURCE_TOPIC => {
                let mut changes = Vec::new();
                let mut error = None;
                let mut current: Option<HashMap<String, String>> = None;
                for c in &r.configs {
                    let name = c.name.to_string();
                    let value = c.value.as_ref().map(|v| v.to_string()).unwrap_or_default();
                    match c.config_operation {
                        0 => changes.push(Change::Set(name, value)),
                        1 => changes.push(Change::Reset(name)),
                        op @ (2 | 3) => {
                            // APPEND / SUBTRACT apply to list configs only.
                            let is_list = ENFORCED
                                .iter()
                                .chain(KEPT)
                                .any(|(n, _, t)| *n == name && *t == TYPE_LIST);
                            if !is_list {
                                error = Some((
                                    K::InvalidConfig.code(),
                                    format!("{name} is not a list config"),
                                ));
                                break;
                            }
                            if current.is_none() {
                                current = match gw.describe_topic(r.resource_name.as_str()).await {
                                    Ok(info) => Some(
                                        topic_configs(&info)
                                            .into_iter()
                                            .map(|c| {
                                                (
                                                    c.name.to_string(),
                                                    c.value
                                                        .map(|v| v.to_string())
                                                        .unwrap_or_default(),
                                                )
                                            })
                                            .collect(),
                                    ),
                                    Err(status) => {
                                        error = Some((
                                            kafka_error(&status, Context::Admin),
                                            status.message().to_string(),
                                        ));
                                        break;
                                    }
                                };
                            }
                            let now = current
                                .as_ref()
                                .and_then(|m| m.get(&name))
                                .cloned()
                                .unwrap_or_default();
                            let mut items: Vec<String> = now
                                .split(',')
                                .filter(|x| !x.is_empty())
                                .map(String::from)
                                .collect();
                            for v in value.split(',').filter(|x| !x.is_empty()) {
                                if op == 2 {
                                    if !items.iter().any(|i| i == v) {
                                        items.push(v.to_string());
                                    }
                                } else {
                                    items.retain(|i| i != v);
                                }
                            }
                            changes.push(Change::Set(name, items.join(",")));
                        }
                        other => {
                            error = Some((
                                K::InvalidRequest.code(),
                                format!("unknown config operation {other}"),
                            ));
                            break;
                        }
                    }
                }
                match error {
                    Some(e) => Err(e),
                    None => {
                        alter_topic(gw, r.resource_name.as_str(), changes, req.validate_only).await
                    }
                }
            }
            RESOURCE_BROKER => Err(refuse_broker()),
            other => Err((
                K::InvalidRequest.code(),
                format!("resource type {other} has no configs here"),
            )),
        };
        let resp = IncrementalResourceResponse::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        out.push(match result {
            Ok(()) => resp,
            Err((code, msg)) => resp.with_error_code(code).with_error_message(Some(s(msg))),
        });
    }
    IncrementalAlterConfigsResponse::default().with_responses(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_fold_into_the_stream_config() {
        let mut c = v1::StreamConfig::default();
        apply_config(&mut c, "retention.ms", "1000").unwrap();
        apply_config(&mut c, "cleanup.policy", "delete").unwrap();
        apply_config(&mut c, "min.insync.replicas", "2").unwrap();
        apply_config(&mut c, "compression.type", "producer").unwrap();
        assert_eq!(c.retention_ms, Some(1000));
        for codec in ["uncompressed", "gzip", "snappy", "lz4", "zstd", "producer"] {
            apply_config(&mut c, "compression.type", codec).unwrap();
            assert_eq!(
                c.extra.get("compression.type").map(String::as_str),
                Some(codec)
            );
        }
        for bad in ["none", "GZIP", "brotli", ""] {
            let e = apply_config(&mut c, "compression.type", bad).unwrap_err();
            assert!(e.0.contains("compression.type"), "{e:?}");
        }
        assert_eq!(
            c.extra.get("compression.type").map(String::as_str),
            Some("producer")
        );
        assert_eq!(c.cleanup_policy.as_deref(), Some("delete"));
        assert_eq!(
            c.extra.get("min.insync.replicas").map(String::as_str),
            Some("2")
        );
        assert!(apply_config(&mut c, "retention.ms", "soon").is_err());
        assert!(apply_config(&mut c, "no.such.config", "1").is_err());
    }

    #[test]
    fn remote_storage_enable_chooses_the_backend() {
        let mut c = v1::StreamConfig::default();
        apply_config(&mut c, "remote.storage.enable", "true").unwrap();
        assert_eq!(c.storage.as_deref(), Some("opendal"));
        apply_config(&mut c, "remote.storage.enable", "FALSE").unwrap();
        assert_eq!(c.storage.as_deref(), Some("local"));
        let e = apply_config(&mut c, "remote.storage.enable", "yes").unwrap_err();
        assert!(e.0.contains("true or false"), "{e:?}");
    }
}
