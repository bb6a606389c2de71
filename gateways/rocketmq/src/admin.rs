//! The topic and group administration `mqadmin` uses most.

use serde_json::{Value, json};
use tributary_proto::v1;

use crate::Gateway;
use crate::codes::response as rs;
use crate::conn::{Ext, Refusal, Reply, core_refusal, json_body, ok};
use crate::frame::Command;

/// Queues a topic may have here (the core's partition limit is higher; RocketMQ's message
/// ids carry 8 bits of queue id in this gateway).
const MAX_QUEUES: i64 = 256;

/// UPDATE_AND_CREATE_TOPIC: creates the topic, or grows its queues (a core stream cannot
/// lose partitions, so fewer queues than it has is refused).
pub(crate) async fn create_topic(gw: &Gateway, cmd: &Command) -> Reply {
    let topic = cmd.str_field("topic")?.to_string();
    crate::send::validate_topic(&topic)?;
    let read = cmd.opt_i64("readQueueNums")?.unwrap_or(8);
    let write = cmd.opt_i64("writeQueueNums")?.unwrap_or(8);
    let queues = read.max(write);
    if !(1..=MAX_QUEUES).contains(&queues) {
        return Err(Refusal::system(format!(
            "queue nums must be 1 to {MAX_QUEUES}, got {queues}"
        )));
    }
    if read != write {
        return Err(Refusal::system(
            "readQueueNums and writeQueueNums must be equal here: a queue is a partition of the topic's stream",
        ));
    }
    let have = crate::send::ensure_topic(gw, &topic, queues as u32).await?;
    if (have as i64) < queues {
        let req = v1::CreatePartitionsRequest {
            id: Some(gw.stream(&topic)),
            total_partitions: queues as u32,
            validate_only: false,
        };
        gw.core
            .for_stream(&topic)
            .admin
            .create_partitions(req)
            .await
            .map_err(|s| core_refusal(&s))?;
    } else if (have as i64) > queues {
        return Err(Refusal::system(format!(
            "topic {topic} has {have} queues; a topic's queues cannot be reduced here"
        )));
    }
    Ok(ok(cmd))
}

pub(crate) async fn delete_topic(gw: &Gateway, cmd: &Command) -> Reply {
    let topic = cmd.str_field("topic")?;
    let req = v1::DeleteStreamRequest {
        id: Some(gw.stream(topic)),
    };
    match gw.core.for_stream(topic).admin.delete_stream(req).await {
        Ok(_) => Ok(ok(cmd)),
        Err(s) if tributary_gateway_common::error_code(&s) == v1::ErrorCode::StreamNotFound => {
            Ok(ok(cmd))
        }
        Err(s) => Err(core_refusal(&s)),
    }
}

pub(crate) async fn all_topic_config(gw: &Gateway, cmd: &Command) -> Reply {
    let streams = crate::namesrv::topics(gw).await?;
    let mut table = serde_json::Map::new();
    for s in streams {
        let Some(id) = s.id else { continue };
        table.insert(
            id.name.clone(),
            json!({
                "topicName": id.name,
                "readQueueNums": s.partitions,
                "writeQueueNums": s.partitions,
                "perm": 6,
                "topicFilterType": "SINGLE_TAG",
                "topicSysFlag": 0,
                "order": false,
            }),
        );
    }
    let body = json!({
        "topicConfigTable": Value::Object(table),
        "dataVersion": { "timestamp": crate::send::now_ms(), "counter": 0 },
    });
    Ok(ok(cmd).with_body(json_body(&body)))
}

pub(crate) async fn delete_group(gw: &Gateway, cmd: &Command) -> Reply {
    let group = cmd.str_field("groupName")?;
    let req = v1::DeleteGroupRequest {
        namespace: gw.config.namespace.clone(),
        group: group.to_string(),
    };
    match gw.core.admin.clone().delete_group(req).await {
        Ok(_) => Ok(ok(cmd)),
        Err(s) if tributary_gateway_common::error_code(&s) == v1::ErrorCode::GroupNotFound => {
            Ok(ok(cmd))
        }
        Err(s) if tributary_gateway_common::error_code(&s) == v1::ErrorCode::GroupNotEmpty => {
            Err(Refusal::new(rs::SYSTEM_ERROR, s.message().to_string()))
        }
        Err(s) => Err(core_refusal(&s)),
    }
}
