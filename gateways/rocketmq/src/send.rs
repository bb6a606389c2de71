//! Producing: SEND_MESSAGE (V1 and V2 headers), SEND_BATCH_MESSAGE, delayed messages (delay
//! levels and RocketMQ 5's delivery times, on the core's durable timers), the retry and
//! dead-letter topics, and CONSUMER_SEND_MSG_BACK.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use tributary_proto::v1;

use crate::codes::response as rs;
use crate::conn::{ConnState, Ext, Refusal, Reply, core_refusal, ok};
use crate::envelope::{self, Outgoing};
use crate::frame::Command;
use crate::message::{self, property, sys_flag};
use crate::{DELAY_LEVELS, Gateway};

pub const RETRY_PREFIX: &str = "%RETRY%";
pub const DLQ_PREFIX: &str = "%DLQ%";
/// `maxReconsumeTimes` when the consumer does not say (16).
const DEFAULT_MAX_RECONSUME_TIMES: i64 = 16;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The send header, whichever of its two spellings (V2 uses one-letter names) it came in.
pub(crate) struct SendHeader {
    pub producer_group: String,
    pub topic: String,
    pub default_topic_queue_nums: u32,
    pub queue_id: i32,
    pub sys_flag: i32,
    pub born_timestamp: i64,
    pub flag: i32,
    pub properties: Vec<(String, String)>,
    pub reconsume_times: i32,
    pub max_reconsume_times: Option<i64>,
}

impl SendHeader {
    pub fn parse(cmd: &Command) -> Result<Self, Refusal> {
        let v2 = cmd.code == crate::codes::request::SEND_MESSAGE_V2
            || cmd.code == crate::codes::request::SEND_REPLY_MESSAGE_V2
            || (cmd.code == crate::codes::request::SEND_BATCH_MESSAGE && cmd.ext.contains_key("b"));
        let name = |long: &'static str, short: &'static str| if v2 { short } else { long };
        let int = |long, short| -> Result<Option<i64>, Refusal> { cmd.opt_i64(name(long, short)) };
        Ok(Self {
            producer_group: cmd.str_field(name("producerGroup", "a"))?.to_string(),
            topic: cmd.str_field(name("topic", "b"))?.to_string(),
            default_topic_queue_nums: int("defaultTopicQueueNums", "d")?
                .unwrap_or(4)
                .clamp(1, 1024) as u32,
            queue_id: int("queueId", "e")?.unwrap_or(-1) as i32,
            sys_flag: int("sysFlag", "f")?.unwrap_or(0) as i32,
            born_timestamp: int("bornTimestamp", "g")?.unwrap_or_else(now_ms),
            flag: int("flag", "h")?.unwrap_or(0) as i32,
            properties: message::decode_properties(
                cmd.opt_str(name("properties", "i")).unwrap_or(""),
            ),
            reconsume_times: int("reconsumeTimes", "j")?.unwrap_or(0) as i32,
            max_reconsume_times: int("maxReconsumeTimes", "l")?,
        })
    }
}

/// RocketMQ's topic rule (`TopicValidator`): 1 to 127 characters of `[%|a-zA-Z0-9_-]`.
pub(crate) fn validate_topic(topic: &str) -> Result<(), Refusal> {
    if topic.is_empty() || topic.len() > 127 {
        return Err(Refusal::system(format!(
            "the specified topic [{topic}] is longer than 127 characters or empty"
        )));
    }
    if !topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '%' | '|' | '_' | '-'))
    {
        return Err(Refusal::system(format!(
            "the specified topic [{topic}] contains illegal characters, allowing only ^[%|a-zA-Z0-9_-]+$"
        )));
    }
    Ok(())
}

/// Creates the stream of `topic` with `queues` partitions unless it exists.
pub(crate) async fn ensure_topic(gw: &Gateway, topic: &str, queues: u32) -> Result<u32, Refusal> {
    let req = v1::CreateStreamRequest {
        id: Some(gw.stream(topic)),
        partitions: queues,
        config: None,
        if_not_exists: true,
        validate_only: false,
    };
    let r = gw
        .core
        .for_stream(topic)
        .admin
        .create_stream(req)
        .await
        .map_err(|s| core_refusal(&s))?
        .into_inner();
    Ok(r.stream.map(|s| s.partitions).unwrap_or(queues))
}

/// Appends `records` to one queue; creates the topic first when `create` says how many
/// queues it gets.
pub(crate) async fn append(
    gw: &Gateway,
    topic: &str,
    queue_id: u32,
    records: Vec<v1::Record>,
    create: Option<u32>,
) -> Result<v1::AppendResponse, Refusal> {
    let req = v1::AppendRequest {
        stream: Some(gw.stream(topic)),
        partition: queue_id,
        batch: Some(v1::RecordBatch {
            records,
            ..Default::default()
        }),
        auto_create: false,
        defer_durable: false,
    };
    match gw.core.for_stream(topic).streams.append(req.clone()).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => {
            let code = tributary_gateway_common::error_code(&s);
            match (code, create) {
                (v1::ErrorCode::StreamNotFound, Some(queues)) => {
                    ensure_topic(gw, topic, queues).await?;
                    gw.core
                        .for_stream(topic)
                        .streams
                        .append(req)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| append_refusal(topic, queue_id, &s))
                }
                _ => Err(append_refusal(topic, queue_id, &s)),
            }
        }
    }
}

fn append_refusal(topic: &str, queue_id: u32, s: &tonic::Status) -> Refusal {
    match tributary_gateway_common::error_code(s) {
        v1::ErrorCode::PartitionNotFound => Refusal::system(format!(
            "request queueId[{queue_id}] is illegal, topic {topic}"
        )),
        v1::ErrorCode::StreamNotFound => Refusal::new(
            rs::TOPIC_NOT_EXIST,
            format!("topic[{topic}] not exist, apply first please!"),
        ),
        _ => core_refusal(s),
    }
}

/// Schedules `record` to be appended to `topic`/`queue_id` at `due_ms` (a core timer:
/// durable, fired once).
pub(crate) async fn schedule(
    gw: &Gateway,
    topic: &str,
    queue_id: u32,
    record: v1::Record,
    due_ms: i64,
) -> Result<String, Refusal> {
    let req = v1::ScheduleTimerRequest {
        timer: Some(v1::Timer {
            id: String::new(),
            due_at_ms: due_ms,
            namespace: gw.config.namespace.clone(),
            action: Some(v1::timer::Action::Append(v1::AppendRequest {
                stream: Some(gw.stream(topic)),
                partition: queue_id,
                batch: Some(v1::RecordBatch {
                    records: vec![record],
                    ..Default::default()
                }),
                auto_create: false,
                defer_durable: false,
            })),
        }),
    };
    Ok(gw
        .core
        .timers
        .clone()
        .schedule_timer(req)
        .await
        .map_err(|s| core_refusal(&s))?
        .into_inner()
        .id)
}

/// When a delayed message is due (ms since the epoch), `None` for a message sent now.
pub(crate) fn delivery_time(props: &[(String, String)], now: i64) -> Result<Option<i64>, Refusal> {
    let num = |name: &str| -> Result<Option<i64>, Refusal> {
        match message::get(props, name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
                Refusal::new(
                    rs::MESSAGE_ILLEGAL,
                    format!("property {name} is not a number: {v:?}"),
                )
            }),
        }
    };
    if let Some(level) = num(property::DELAY)?
        && level > 0
    {
        // The broker clamps a level above the highest to the highest.
        let level = (level as usize).min(DELAY_LEVELS.len());
        return Ok(Some(now + DELAY_LEVELS[level - 1].as_millis() as i64));
    }
    for name in [property::TIMER_DELIVER_MS, property::START_DELIVER_TIME] {
        if let Some(at) = num(name)? {
            return Ok((at > now).then_some(at));
        }
    }
    if let Some(s) = num(property::TIMER_DELAY_SEC)? {
        return Ok((s > 0).then(|| now + s.saturating_mul(1000)));
    }
    if let Some(ms) = num(property::TIMER_DELAY_MS)? {
        return Ok((ms > 0).then(|| now + ms));
    }
    Ok(None)
}

/// Checks that `topic` has queue `queue_id` before a write the core makes later (a timer, a
/// staged transaction), creating the topic first when `create` says how many queues it gets.
pub(crate) async fn check_queue(
    gw: &Gateway,
    topic: &str,
    queue_id: u32,
    create: Option<u32>,
) -> Result<(), Refusal> {
    let queues = match (crate::namesrv::queue_count(gw, topic).await?, create) {
        (Some(n), _) => n,
        (None, Some(n)) => ensure_topic(gw, topic, n).await?,
        (None, None) => {
            return Err(Refusal::new(
                rs::TOPIC_NOT_EXIST,
                format!("topic[{topic}] not exist, apply first please!"),
            ));
        }
    };
    if queue_id >= queues {
        return Err(Refusal::system(format!(
            "request queueId[{queue_id}] is illegal, topic {topic}"
        )));
    }
    Ok(())
}

/// Removes the properties that ask for a delay: the core's timer or transaction holds it.
pub(crate) fn strip_delay(props: &mut Vec<(String, String)>) {
    for name in [
        property::DELAY,
        property::TIMER_DELIVER_MS,
        property::START_DELIVER_TIME,
        property::TIMER_DELAY_SEC,
        property::TIMER_DELAY_MS,
    ] {
        message::remove(props, name);
    }
}

pub(crate) async fn send(gw: &Arc<Gateway>, conn: &Arc<ConnState>, cmd: &Command) -> Reply {
    let mut h = SendHeader::parse(cmd)?;
    validate_topic(&h.topic)?;
    let batch = cmd.code == crate::codes::request::SEND_BATCH_MESSAGE;
    let limit = gw.config.max_message_bytes;
    if cmd.body.len() > limit {
        return Err(Refusal::new(
            rs::MESSAGE_ILLEGAL,
            format!("the message body size over max value, MAX: {limit}"),
        ));
    }
    // A message to a retry topic that has used up its retries goes to the dead letters.
    if let Some(group) = h.topic.strip_prefix(RETRY_PREFIX) {
        let max = h.max_reconsume_times.unwrap_or(DEFAULT_MAX_RECONSUME_TIMES);
        if h.reconsume_times as i64 >= max {
            h.topic = format!("{DLQ_PREFIX}{group}");
            h.queue_id = 0;
        }
    }
    let create = gw.config.auto_create_topics.then(|| {
        if h.topic.starts_with(RETRY_PREFIX) || h.topic.starts_with(DLQ_PREFIX) {
            1
        } else {
            h.default_topic_queue_nums.min(gw.config.default_queues)
        }
    });
    let queue_id = match h.queue_id {
        q if q >= 0 => q as u32,
        _ => {
            let n = crate::namesrv::queue_count(gw, &h.topic)
                .await?
                .or(create)
                .unwrap_or(1);
            rand::rng().random_range(0..n.max(1))
        }
    };
    let outgoing = |flag: i32, body: Bytes, properties: Vec<(String, String)>| Outgoing {
        flag,
        body,
        properties,
        born_timestamp: h.born_timestamp,
        born_host: conn.peer,
        reconsume_times: h.reconsume_times,
    };
    let records = if batch {
        let entries = message::decode_batch(cmd.body.clone())
            .map_err(|e| Refusal::new(rs::MESSAGE_ILLEGAL, e.to_string()))?;
        if entries.is_empty() {
            return Err(Refusal::new(
                rs::MESSAGE_ILLEGAL,
                "the batch holds no message",
            ));
        }
        entries
            .into_iter()
            .map(|e| envelope::to_record(&outgoing(e.flag, e.body, e.properties)))
            .collect::<Vec<_>>()
    } else {
        let body = message::uncompressed_body(h.sys_flag, cmd.body.clone(), limit)
            .map_err(|e| Refusal::new(rs::MESSAGE_ILLEGAL, e.to_string()))?;
        let prepared = h.sys_flag & sys_flag::TRANSACTION_MASK == sys_flag::TRANSACTION_PREPARED
            || message::get(&h.properties, property::TRANSACTION_PREPARED) == Some("true");
        let now = now_ms();
        let due = delivery_time(&h.properties, now)?;
        if prepared {
            return crate::txn::stage_half_message(gw, conn, cmd, &h, queue_id, body, due, create)
                .await;
        }
        if let Some(due) = due {
            let mut props = h.properties.clone();
            strip_delay(&mut props);
            let record = envelope::to_record(&outgoing(h.flag, body, props));
            check_queue(gw, &h.topic, queue_id, create).await?;
            schedule(gw, &h.topic, queue_id, record, due).await?;
            metrics::counter!("tributary_rocketmq_delayed_messages_total").increment(1);
            return Ok(ok(cmd)
                .with_ext("msgId", message::message_id(&gw.config.advertised, 0))
                .with_ext("queueId", queue_id)
                .with_ext("queueOffset", -1));
        }
        vec![envelope::to_record(&outgoing(
            h.flag,
            body,
            h.properties.clone(),
        ))]
    };
    let count = records.len();
    let base_offset = if count == 1 {
        let record = records.into_iter().next().unwrap_or_default();
        crate::appender::Appender::append(gw, &h.topic, queue_id, record, create).await?
    } else {
        append(gw, &h.topic, queue_id, records, create)
            .await?
            .base_offset
    };
    let ids: Vec<String> = (0..count as i64)
        .map(|i| {
            message::message_id(
                &gw.config.advertised,
                crate::ids::encode(&h.topic, queue_id, base_offset + i),
            )
        })
        .collect();
    Ok(ok(cmd)
        .with_ext("msgId", ids.join(","))
        .with_ext("queueId", queue_id)
        .with_ext("queueOffset", base_offset))
}

/// One record of the core as RocketMQ addresses it (topic, queue, offset).
pub(crate) struct Found {
    pub message: message::StoredMessage,
}

/// The record a commit-log offset names; `hints` are the topics to try before all of them.
pub(crate) async fn find_by_position(
    gw: &Gateway,
    position: i64,
    hints: &[&str],
) -> Result<Option<Found>, Refusal> {
    let (hash, partition, offset) = crate::ids::decode(position);
    let mut candidates: Vec<String> = hints
        .iter()
        .filter(|t| crate::ids::stream_hash(t) == hash)
        .map(|t| t.to_string())
        .collect();
    if candidates.is_empty() {
        let streams = crate::namesrv::topics(gw).await?;
        candidates = streams
            .into_iter()
            .filter_map(|s| s.id.map(|i| i.name))
            .filter(|n| crate::ids::stream_hash(n) == hash)
            .collect();
    }
    for topic in candidates {
        if let Some(found) = crate::pull::read_one(gw, &topic, partition, offset).await? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// CONSUMER_SEND_MSG_BACK: a message the consumer could not process goes to the group's
/// retry topic with the next delay level, or to its dead-letter topic once out of retries.
pub(crate) async fn send_back(gw: &Gateway, cmd: &Command) -> Reply {
    let position = cmd.i64_field("offset")?;
    let group = cmd.str_field("group")?.to_string();
    let delay_level = cmd.opt_i64("delayLevel")?.unwrap_or(0);
    let max = cmd
        .opt_i64("maxReconsumeTimes")?
        .unwrap_or(DEFAULT_MAX_RECONSUME_TIMES);
    let origin_topic = cmd.opt_str("originTopic").unwrap_or("").to_string();
    let origin_id = cmd.opt_str("originMsgId").unwrap_or("").to_string();
    let retry_topic = format!("{RETRY_PREFIX}{group}");
    let Some(found) = find_by_position(gw, position, &[&origin_topic, &retry_topic]).await? else {
        return Err(Refusal::system(format!(
            "look message by offset failed, {position}"
        )));
    };
    let mut m = found.message;
    let mut props = m.properties.clone();
    if message::get(&props, property::RETRY_TOPIC).is_none() {
        message::set(&mut props, property::RETRY_TOPIC, m.topic.clone());
    }
    if !origin_id.is_empty() && message::get(&props, property::ORIGIN_MESSAGE_ID).is_none() {
        message::set(&mut props, property::ORIGIN_MESSAGE_ID, origin_id);
    }
    strip_delay(&mut props);
    m.reconsume_times += 1;
    let record = envelope::to_record(&Outgoing {
        flag: m.flag,
        body: m.body.clone(),
        properties: props,
        born_timestamp: m.born_timestamp,
        born_host: m.born_host,
        reconsume_times: m.reconsume_times,
    });
    if delay_level < 0 || (m.reconsume_times - 1) as i64 >= max {
        let dlq = format!("{DLQ_PREFIX}{group}");
        append(gw, &dlq, 0, vec![record], Some(1)).await?;
        metrics::counter!("tributary_rocketmq_dead_lettered_total").increment(1);
        return Ok(ok(cmd));
    }
    let level = if delay_level == 0 {
        3 + (m.reconsume_times - 1) as i64
    } else {
        delay_level
    };
    let level = (level.max(1) as usize).min(DELAY_LEVELS.len());
    ensure_topic(gw, &retry_topic, 1).await?;
    let due = now_ms() + DELAY_LEVELS[level - 1].as_millis() as i64;
    schedule(gw, &retry_topic, 0, record, due).await?;
    metrics::counter!("tributary_rocketmq_retries_scheduled_total").increment(1);
    Ok(ok(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_times() {
        let p = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert_eq!(delivery_time(&[], 1000).unwrap(), None);
        assert_eq!(delivery_time(&p("DELAY", "2"), 1000).unwrap(), Some(6000));
        assert_eq!(
            delivery_time(&p("DELAY", "99"), 0).unwrap(),
            Some(7_200_000)
        );
        assert_eq!(delivery_time(&p("DELAY", "0"), 0).unwrap(), None);
        assert_eq!(
            delivery_time(&p("TIMER_DELIVER_MS", "5000"), 1000).unwrap(),
            Some(5000)
        );
        assert_eq!(
            delivery_time(&p("TIMER_DELIVER_MS", "500"), 1000).unwrap(),
            None
        );
        assert_eq!(
            delivery_time(&p("TIMER_DELAY_SEC", "3"), 1000).unwrap(),
            Some(4000)
        );
        assert!(delivery_time(&p("DELAY", "x"), 0).is_err());
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic("TopicTest").is_ok());
        assert!(validate_topic("%RETRY%group-1").is_ok());
        assert!(validate_topic("").is_err());
        assert!(validate_topic("a/b").is_err());
        assert!(validate_topic(&"x".repeat(128)).is_err());
    }
}
