//! Request-reply (RocketMQ 4.6+): a responder's SEND_REPLY_MESSAGE is pushed to the
//! requesting client (PUSH_REPLY_MESSAGE_TO_CLIENT) on its connection to this gateway.

use std::sync::Arc;
use std::time::Duration;

use crate::Gateway;
use crate::codes::{request as rq, response as rs};
use crate::conn::{ConnState, Refusal, Reply, ok};
use crate::frame::Command;
use crate::message::{self, property};
use crate::send::{SendHeader, now_ms};

/// `<cluster>_REPLY_TOPIC`: the topic replies are sent to (never stored here).
pub(crate) fn is_reply_topic(gw: &Gateway, topic: &str) -> bool {
    topic == format!("{}_REPLY_TOPIC", gw.config.cluster_name)
}

pub(crate) async fn send_reply(gw: &Gateway, _conn: &Arc<ConnState>, cmd: &Command) -> Reply {
    let h = SendHeader::parse(cmd)?;
    let Some(client) = message::get(&h.properties, property::REPLY_TO_CLIENT) else {
        return Err(Refusal::new(
            rs::MESSAGE_ILLEGAL,
            "a reply message without REPLY_TO_CLIENT",
        ));
    };
    let Some(target) = gw.clients.client_conn(client) else {
        return Err(Refusal::system(format!(
            "push reply message fail, channel of <{client}> not found on this broker"
        )));
    };
    let mut push = Command::request(rq::PUSH_REPLY_MESSAGE_TO_CLIENT, 0);
    push.ext = [
        ("producerGroup", h.producer_group.clone()),
        ("topic", h.topic.clone()),
        ("defaultTopic", "TBW102".to_string()),
        (
            "defaultTopicQueueNums",
            h.default_topic_queue_nums.to_string(),
        ),
        ("queueId", h.queue_id.max(0).to_string()),
        ("sysFlag", h.sys_flag.to_string()),
        ("bornTimestamp", h.born_timestamp.to_string()),
        ("flag", h.flag.to_string()),
        ("properties", message::encode_properties(&h.properties)),
        ("reconsumeTimes", h.reconsume_times.to_string()),
        ("unitMode", "false".to_string()),
        ("bornHost", _conn.peer.to_string()),
        ("storeHost", gw.config.advertised.to_string()),
        ("storeTimestamp", now_ms().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    push.body = cmd.body.clone();
    match target.call(push, Duration::from_secs(3)).await {
        Some(r) if r.code == rs::SUCCESS => Ok(ok(cmd)
            .with_ext("msgId", message::message_id(&gw.config.advertised, 0))
            .with_ext("queueId", h.queue_id.max(0))
            .with_ext("queueOffset", 0)),
        Some(r) => Err(Refusal::system(format!(
            "push reply message to {client} failed: {}",
            r.remark.unwrap_or_default()
        ))),
        None => Err(Refusal::system(format!(
            "push reply message to {client} failed: no answer within 3 s"
        ))),
    }
}
