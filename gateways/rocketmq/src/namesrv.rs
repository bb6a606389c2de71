//! The NameServer: topic routes, the cluster's brokers and the topic list, answered from the
//! core (topics are streams) rather than from broker registrations.
//!
//! Every gateway serves every queue (their state is in the core), so the cluster is one
//! broker group: one broker name whose master (broker id 0) is the first live gateway and
//! whose other gateways are listed as its replicas. Clients keep one queue identity
//! (broker name, queue id) whichever gateway they reach, so offsets stay consistent.

use serde_json::{Value, json};

use crate::Gateway;
use crate::codes::response as rs;
use crate::conn::{Ext, Refusal, Reply, core_refusal, json_body, ok};
use crate::frame::Command;

/// The topic producers fall back to for a topic with no route (`TopicValidator
/// .AUTO_CREATE_TOPIC_KEY_TOPIC`): its route says the broker auto-creates topics.
pub const AUTO_CREATE_TOPIC: &str = "TBW102";

/// Read and write permission (`PermName.PERM_READ | PERM_WRITE`).
const PERM_READ_WRITE: i32 = 6;

fn broker_data(gw: &Gateway, brokers: &[String]) -> Value {
    let addrs: serde_json::Map<String, Value> = brokers
        .iter()
        .enumerate()
        .map(|(i, a)| (i.to_string(), Value::String(a.clone())))
        .collect();
    json!({
        "cluster": gw.config.cluster_name,
        "brokerName": gw.config.broker_name,
        "brokerAddrs": addrs,
        // RocketMQ 5's field; rocketmq-client-rust refuses a route without it.
        "enableActingMaster": false,
    })
}

fn route_body(gw: &Gateway, brokers: &[String], queues: u32) -> Value {
    json!({
        "orderTopicConf": null,
        "brokerDatas": [broker_data(gw, brokers)],
        "queueDatas": [{
            "brokerName": gw.config.broker_name,
            "readQueueNums": queues,
            "writeQueueNums": queues,
            "perm": PERM_READ_WRITE,
            "topicSysFlag": 0,
        }],
        "filterServerTable": {},
    })
}

/// The queue count of a topic, `None` when the core has no such stream.
pub(crate) async fn queue_count(gw: &Gateway, topic: &str) -> Result<Option<u32>, Refusal> {
    let req = tributary_proto::v1::DescribeStreamRequest {
        id: Some(gw.stream(topic)),
    };
    match gw.core.for_stream(topic).admin.describe_stream(req).await {
        Ok(r) => Ok(r.into_inner().stream.map(|s| s.partitions)),
        Err(s)
            if tributary_gateway_common::error_code(&s)
                == tributary_proto::v1::ErrorCode::StreamNotFound =>
        {
            Ok(None)
        }
        Err(s) => Err(core_refusal(&s)),
    }
}

pub(crate) async fn route(gw: &Gateway, cmd: &Command) -> Reply {
    let topic = cmd.str_field("topic")?;
    let brokers = crate::clients::brokers(gw).await;
    let queues = match queue_count(gw, topic).await? {
        Some(n) => n,
        None if topic == AUTO_CREATE_TOPIC && gw.config.auto_create_topics => {
            gw.config.default_queues
        }
        None if crate::reply::is_reply_topic(gw, topic) => 1,
        None => {
            return Err(Refusal::new(
                rs::TOPIC_NOT_EXIST,
                format!("No topic route info in name server for the topic: {topic}"),
            ));
        }
    };
    Ok(ok(cmd).with_body(json_body(&route_body(gw, &brokers, queues))))
}

pub(crate) async fn cluster_info(gw: &Gateway, cmd: &Command) -> Reply {
    let brokers = crate::clients::brokers(gw).await;
    let body = json!({
        "brokerAddrTable": { gw.config.broker_name.clone(): broker_data(gw, &brokers) },
        "clusterAddrTable": { gw.config.cluster_name.clone(): [gw.config.broker_name] },
    });
    Ok(ok(cmd).with_body(json_body(&body)))
}

/// Every stream of the gateway's namespace (RocketMQ's topics).
pub(crate) async fn topics(gw: &Gateway) -> Result<Vec<tributary_proto::v1::StreamInfo>, Refusal> {
    let req = tributary_proto::v1::ListStreamsRequest {
        namespace: gw.config.namespace.clone(),
    };
    Ok(gw
        .core
        .admin
        .clone()
        .list_streams(req)
        .await
        .map_err(|s| core_refusal(&s))?
        .into_inner()
        .streams)
}

pub(crate) async fn topic_list(gw: &Gateway, cmd: &Command) -> Reply {
    let streams = topics(gw).await?;
    let names: Vec<String> = streams
        .into_iter()
        .filter_map(|s| s.id.map(|i| i.name))
        .collect();
    Ok(ok(cmd).with_body(json_body(&json!({ "topicList": names }))))
}
