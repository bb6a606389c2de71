//! Consuming: PULL_MESSAGE with long polling (the core's fetch waits for an append, no
//! polling loop here), tag filtering, committed offsets, offset look-ups, and the two
//! message queries (by id, by key).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use tributary_proto::v1;

use crate::Gateway;
use crate::codes::response as rs;
use crate::conn::{ConnState, Ext, Refusal, Reply, core_refusal, ok};
use crate::envelope::{self, Position};
use crate::message::{self, StoredMessage, property};
use crate::send::{Found, now_ms};

/// `PullSysFlag` bits.
const FLAG_COMMIT_OFFSET: i64 = 1;
const FLAG_SUSPEND: i64 = 1 << 1;
const FLAG_SUBSCRIPTION: i64 = 1 << 2;
/// Longest a pull is held (the client's socket timeout for a suspended pull is 30 s).
const MAX_SUSPEND_MS: i64 = 25_000;
const FETCH_BYTES: i32 = 1024 * 1024;
/// Records a QUERY_MESSAGE reads per queue at most: the core keeps no key index, so a
/// query by key scans the time range it names.
const QUERY_SCAN_LIMIT: usize = 100_000;

fn queue_of(cmd: &crate::frame::Command) -> Result<(String, u32), Refusal> {
    let topic = cmd.str_field("topic")?.to_string();
    let queue = cmd.i64_field("queueId")?;
    let queue = u32::try_from(queue)
        .map_err(|_| Refusal::system(format!("queueId[{queue}] is illegal, topic {topic}")))?;
    Ok((topic, queue))
}

/// One partition's fetch result.
pub(crate) async fn fetch(
    gw: &Gateway,
    topic: &str,
    queue: u32,
    offset: i64,
    max_bytes: i32,
    wait_ms: i32,
) -> Result<v1::FetchedPartition, tonic::Status> {
    let req = v1::FetchRequest {
        partitions: vec![v1::FetchPartition {
            stream: Some(gw.stream(topic)),
            partition: queue,
            offset,
            max_bytes,
        }],
        max_bytes,
        min_bytes: 1,
        max_wait_ms: wait_ms,
        read_committed: true,
    };
    let mut r = gw
        .core
        .for_stream(topic)
        .streams
        .fetch(req)
        .await?
        .into_inner();
    r.partitions
        .pop()
        .ok_or_else(|| tonic::Status::internal("the core answered no partition"))
}

/// The messages of a fetch result, in offset order (see [`readable`]).
pub(crate) fn messages(
    gw: &Gateway,
    topic: &str,
    queue: u32,
    part: &v1::FetchedPartition,
) -> Vec<(v1::Record, StoredMessage)> {
    readable(gw, topic, queue, part)
        .into_iter()
        .map(|r| {
            (
                r.record.clone().into_owned(),
                r.to_message(gw, topic, queue),
            )
        })
        .collect()
}

/// A record of a fetch result a RocketMQ consumer can read, not yet converted (a pull
/// converts only what it returns: a coalesced batch holds hundreds of records).
pub(crate) struct Readable<'a> {
    pub offset: i64,
    /// Borrowed from an envelope batch; owned when decoded from a Kafka batch.
    pub record: Cow<'a, v1::Record>,
    append_time_ms: i64,
}

impl Readable<'_> {
    pub(crate) fn to_message(&self, gw: &Gateway, topic: &str, queue: u32) -> StoredMessage {
        let at = Position {
            topic,
            queue_id: queue,
            offset: self.offset,
            append_time_ms: self.append_time_ms,
            store_host: gw.config.advertised,
        };
        envelope::from_record(&self.record, &at)
    }

    /// The record's `TAGS` property.
    fn tags(&self) -> Option<&[u8]> {
        self.record
            .headers
            .iter()
            .find(|h| h.name == property::TAGS)
            .map(|h| &h.value[..])
    }
}

/// The records of a fetch result, in offset order: control batches and aborted
/// transactions skipped (the core's transactions, e.g. Kafka's), Kafka batches decoded
/// (tributary-mapping), batches of formats nobody decodes counted and logged.
pub(crate) fn readable<'a>(
    gw: &Gateway,
    topic: &str,
    queue: u32,
    part: &'a v1::FetchedPartition,
) -> Vec<Readable<'a>> {
    let mut out = Vec::new();
    let mut aborted: Vec<&v1::AbortedTransaction> = part.aborted_transactions.iter().collect();
    aborted.sort_by_key(|a| a.first_offset);
    let mut aborting: HashSet<i64> = HashSet::new();
    for batch in &part.batches {
        aborted.retain(|a| {
            if a.first_offset <= batch.base_offset {
                aborting.insert(a.producer_id);
                false
            } else {
                true
            }
        });
        if batch.control.is_some() {
            aborting.remove(&batch.producer_id);
            continue;
        }
        if batch.transactional && aborting.contains(&batch.producer_id) {
            continue;
        }
        if batch.opaque_format == tributary_mapping::kafka::OPAQUE_FORMAT
            && let Ok(records) = tributary_mapping::kafka::decode_batch(&batch.opaque)
        {
            for (i, record) in records.into_iter().enumerate() {
                out.push(Readable {
                    offset: batch.base_offset + i as i64,
                    record: Cow::Owned(record),
                    append_time_ms: batch.append_time_ms,
                });
            }
            continue;
        }
        if !batch.opaque.is_empty() {
            metrics::counter!("tributary_rocketmq_unreadable_batches_total").increment(1);
            if let Some(skipped) = gw.unreadable_log.due() {
                tracing::warn!(
                    topic,
                    queue,
                    offset = batch.base_offset,
                    format = batch.opaque_format,
                    skipped,
                    "skipping batches RocketMQ consumers cannot read (written by another protocol in its own format); one line per 10 s, all counted in tributary_rocketmq_unreadable_batches_total"
                );
            }
            continue;
        }
        for (i, record) in batch.records.iter().enumerate() {
            out.push(Readable {
                offset: batch.base_offset + i as i64,
                record: Cow::Borrowed(record),
                append_time_ms: batch.append_time_ms,
            });
        }
    }
    out
}

/// The offset just past a fetch result's batches.
fn end_of(part: &v1::FetchedPartition) -> Option<i64> {
    part.batches.last().map(|b| {
        let n = if b.records.is_empty() {
            b.record_count.max(1) as i64
        } else {
            b.records.len() as i64
        };
        b.base_offset + n
    })
}

pub(crate) async fn read_one(
    gw: &Gateway,
    topic: &str,
    queue: u32,
    offset: i64,
) -> Result<Option<Found>, Refusal> {
    let part = match fetch(gw, topic, queue, offset, 64 * 1024, 0).await {
        Ok(p) => p,
        Err(s) => {
            return match tributary_gateway_common::error_code(&s) {
                v1::ErrorCode::StreamNotFound
                | v1::ErrorCode::PartitionNotFound
                | v1::ErrorCode::OffsetOutOfRange => Ok(None),
                _ => Err(core_refusal(&s)),
            };
        }
    };
    Ok(readable(gw, topic, queue, &part)
        .into_iter()
        .find(|r| r.offset == offset)
        .map(|r| Found {
            message: r.to_message(gw, topic, queue),
        }))
}

pub(crate) async fn pull(
    gw: &Gateway,
    _conn: &Arc<ConnState>,
    cmd: &crate::frame::Command,
) -> Reply {
    let group = cmd.str_field("consumerGroup")?.to_string();
    let (topic, queue) = queue_of(cmd)?;
    let offset = cmd.i64_field("queueOffset")?;
    let max_msgs = cmd.opt_i64("maxMsgNums")?.unwrap_or(32).clamp(1, 1024) as usize;
    let sys_flag = cmd.opt_i64("sysFlag")?.unwrap_or(0);
    let commit_offset = cmd.opt_i64("commitOffset")?.unwrap_or(-1);
    let suspend = cmd.opt_i64("suspendTimeoutMillis")?.unwrap_or(0);
    let expression_type = cmd.opt_str("expressionType").unwrap_or("TAG");
    if !expression_type.eq_ignore_ascii_case("TAG") {
        return Err(Refusal::system(format!(
            "The broker does not support consumer to filter message by {expression_type}"
        )));
    }
    let expression = if sys_flag & FLAG_SUBSCRIPTION != 0 {
        cmd.opt_str("subscription").unwrap_or("*").to_string()
    } else {
        gw.clients
            .subscription(&group, &topic)
            .unwrap_or_else(|| "*".into())
    };
    let tags = message::parse_tag_expression(&expression);
    if sys_flag & FLAG_COMMIT_OFFSET != 0 && commit_offset >= 0 {
        commit(gw, &group, &topic, queue, commit_offset).await?;
    }
    let wait = if sys_flag & FLAG_SUSPEND != 0 {
        suspend.clamp(0, MAX_SUSPEND_MS) as i32
    } else {
        0
    };
    // About what the pull returns: the core returns whole batches, and a pull converts and
    // sends at most max_msgs records of them.
    let want_bytes = (max_msgs * 4096).clamp(64 * 1024, FETCH_BYTES as usize) as i32;
    let part = match fetch(gw, &topic, queue, offset, want_bytes, wait).await {
        Ok(p) => p,
        Err(s) => {
            return match tributary_gateway_common::error_code(&s) {
                v1::ErrorCode::OffsetOutOfRange => {
                    offset_moved(gw, cmd, &topic, queue, offset).await
                }
                v1::ErrorCode::StreamNotFound => Err(Refusal::new(
                    rs::TOPIC_NOT_EXIST,
                    format!("topic[{topic}] not exist, apply first please!"),
                )),
                v1::ErrorCode::PartitionNotFound => Err(Refusal::system(format!(
                    "queueId[{queue}] is illegal, topic:[{topic}] consumer:[{}]",
                    cmd.opt_str("consumerGroup").unwrap_or("")
                ))),
                _ => Err(core_refusal(&s)),
            };
        }
    };
    match v1::ErrorCode::try_from(part.error).unwrap_or(v1::ErrorCode::Internal) {
        v1::ErrorCode::Unspecified => {}
        v1::ErrorCode::OffsetOutOfRange => {
            return offset_moved(gw, cmd, &topic, queue, offset).await;
        }
        v1::ErrorCode::StreamNotFound => {
            return Err(Refusal::new(
                rs::TOPIC_NOT_EXIST,
                format!("topic[{topic}] not exist, apply first please!"),
            ));
        }
        v1::ErrorCode::PartitionNotFound => {
            return Err(Refusal::system(format!(
                "queueId[{queue}] is illegal, topic:[{topic}] consumer:[{group}]"
            )));
        }
        e => return Err(Refusal::system(format!("{e:?}: {}", part.error_message))),
    }
    let mut body = Vec::new();
    let mut taken = 0usize;
    let mut next = end_of(&part).unwrap_or(offset).max(offset);
    for r in readable(gw, &topic, queue, &part)
        .iter()
        .filter(|r| r.offset >= offset)
    {
        if taken == max_msgs {
            next = r.offset;
            break;
        }
        let wanted = match &tags {
            None => true,
            Some(list) => r
                .tags()
                .is_some_and(|t| list.iter().any(|w| w.as_bytes() == t)),
        };
        if wanted {
            r.to_message(gw, &topic, queue).encode_into(&mut body);
            taken += 1;
        }
    }
    let code = if taken > 0 {
        rs::SUCCESS
    } else if next > offset {
        // Everything read was filtered out: the consumer asks again at once from `next`.
        rs::PULL_RETRY_IMMEDIATELY
    } else {
        rs::PULL_NOT_FOUND
    };
    metrics::counter!("tributary_rocketmq_messages_pulled_total").increment(taken as u64);
    Ok(cmd
        .response(code)
        .with_ext("suggestWhichBrokerId", 0)
        .with_ext("nextBeginOffset", next)
        .with_ext("minOffset", part.start_offset)
        .with_ext("maxOffset", part.end_offset)
        .with_body(Bytes::from(body)))
}

/// The broker's answer to an offset outside the queue: PULL_OFFSET_MOVED with where to go.
async fn offset_moved(
    gw: &Gateway,
    cmd: &crate::frame::Command,
    topic: &str,
    queue: u32,
    offset: i64,
) -> Reply {
    let min = list_offset(gw, topic, queue, Spec::Earliest).await?;
    let max = list_offset(gw, topic, queue, Spec::Latest).await?;
    let next = if offset < min || min == 0 { min } else { max };
    Ok(cmd
        .response(rs::PULL_OFFSET_MOVED)
        .with_ext("suggestWhichBrokerId", 0)
        .with_ext("nextBeginOffset", next)
        .with_ext("minOffset", min)
        .with_ext("maxOffset", max))
}

pub(crate) async fn commit(
    gw: &Gateway,
    group: &str,
    topic: &str,
    queue: u32,
    offset: i64,
) -> Result<(), Refusal> {
    let req = v1::CommitOffsetsRequest {
        namespace: gw.config.namespace.clone(),
        group: group.to_string(),
        offsets: vec![v1::CommittedOffset {
            stream: Some(gw.stream(topic)),
            partition: queue,
            offset,
            metadata: String::new(),
            commit_time_ms: now_ms(),
            leader_epoch: -1,
        }],
        generation: None,
        member_id: String::new(),
    };
    let r = gw
        .core
        .offsets
        .clone()
        .commit_offsets(req)
        .await
        .map_err(|s| core_refusal(&s))?
        .into_inner();
    if let Some(rej) = r.rejected.first() {
        return Err(Refusal::new(
            rs::TOPIC_NOT_EXIST,
            format!("cannot commit the offset: {}", rej.error_message),
        ));
    }
    Ok(())
}

pub(crate) enum Spec {
    Earliest,
    Latest,
    Time(i64),
}

/// An offset look-up; -1 for a time with no record at or after it.
pub(crate) async fn list_offset(
    gw: &Gateway,
    topic: &str,
    queue: u32,
    spec: Spec,
) -> Result<i64, Refusal> {
    use v1::list_offsets_request::Spec as S;
    let req = v1::ListOffsetsRequest {
        stream: Some(gw.stream(topic)),
        partition: queue,
        spec: Some(match spec {
            Spec::Earliest => S::Earliest(true),
            Spec::Latest => S::Latest(true),
            Spec::Time(t) => S::TimestampMs(t),
        }),
        read_committed: false,
    };
    match gw.core.for_stream(topic).streams.list_offsets(req).await {
        Ok(r) => Ok(r.into_inner().offset),
        Err(s) => Err(match tributary_gateway_common::error_code(&s) {
            v1::ErrorCode::StreamNotFound => Refusal::new(
                rs::TOPIC_NOT_EXIST,
                format!("topic[{topic}] not exist, apply first please!"),
            ),
            v1::ErrorCode::PartitionNotFound => {
                Refusal::system(format!("queueId[{queue}] is illegal, topic {topic}"))
            }
            _ => core_refusal(&s),
        }),
    }
}

pub(crate) async fn query_consumer_offset(gw: &Gateway, cmd: &crate::frame::Command) -> Reply {
    let group = cmd.str_field("consumerGroup")?;
    let (topic, queue) = queue_of(cmd)?;
    let req = v1::FetchOffsetsRequest {
        namespace: gw.config.namespace.clone(),
        group: group.to_string(),
        partitions: vec![v1::FetchPartition {
            stream: Some(gw.stream(&topic)),
            partition: queue,
            offset: 0,
            max_bytes: 0,
        }],
        require_stable: false,
    };
    let offsets = gw
        .core
        .offsets
        .clone()
        .fetch_offsets(req)
        .await
        .map_err(|s| core_refusal(&s))?
        .into_inner()
        .offsets;
    let committed = offsets
        .iter()
        .find(|o| o.partition == queue && o.offset >= 0)
        .map(|o| o.offset);
    match committed {
        Some(o) => Ok(ok(cmd).with_ext("offset", o)),
        None => {
            // As RocketMQ's broker does: a group new to a queue whose first message is
            // still there starts at 0, whatever its consume-from setting says.
            if list_offset(gw, &topic, queue, Spec::Earliest).await? == 0 {
                Ok(ok(cmd).with_ext("offset", 0))
            } else {
                Err(Refusal::new(
                    rs::QUERY_NOT_FOUND,
                    "Not found, V3_0_6_SNAPSHOT maybe this group consumer boot first",
                ))
            }
        }
    }
}

pub(crate) async fn update_consumer_offset(gw: &Gateway, cmd: &crate::frame::Command) -> Reply {
    let group = cmd.str_field("consumerGroup")?.to_string();
    let (topic, queue) = queue_of(cmd)?;
    let offset = cmd.i64_field("commitOffset")?;
    commit(gw, &group, &topic, queue, offset).await?;
    Ok(ok(cmd))
}

pub(crate) async fn max_offset(gw: &Gateway, cmd: &crate::frame::Command) -> Reply {
    let (topic, queue) = queue_of(cmd)?;
    let o = list_offset(gw, &topic, queue, Spec::Latest).await?;
    Ok(ok(cmd).with_ext("offset", o))
}

pub(crate) async fn min_offset(gw: &Gateway, cmd: &crate::frame::Command) -> Reply {
    let (topic, queue) = queue_of(cmd)?;
    let o = list_offset(gw, &topic, queue, Spec::Earliest).await?;
    Ok(ok(cmd).with_ext("offset", o))
}

pub(crate) async fn search_offset(gw: &Gateway, cmd: &crate::frame::Command) -> Reply {
    let (topic, queue) = queue_of(cmd)?;
    let ts = cmd.i64_field("timestamp")?;
    let o = match list_offset(gw, &topic, queue, Spec::Time(ts)).await? {
        -1 => list_offset(gw, &topic, queue, Spec::Latest).await?,
        o => o,
    };
    Ok(ok(cmd).with_ext("offset", o))
}

pub(crate) async fn earliest_store_time(gw: &Gateway, cmd: &crate::frame::Command) -> Reply {
    let (topic, queue) = queue_of(cmd)?;
    let first = list_offset(gw, &topic, queue, Spec::Earliest).await?;
    let t = match read_one(gw, &topic, queue, first).await? {
        Some(f) => f.message.store_timestamp,
        None => -1,
    };
    Ok(ok(cmd).with_ext("timestamp", t))
}

pub(crate) async fn view_message(gw: &Gateway, cmd: &crate::frame::Command) -> Reply {
    let position = cmd.i64_field("offset")?;
    match crate::send::find_by_position(gw, position, &[]).await? {
        Some(f) => Ok(ok(cmd).with_body(Bytes::from(f.message.encode()))),
        None => Err(Refusal::system(format!(
            "can not find message by the offset, {position}"
        ))),
    }
}

pub(crate) async fn query_message(gw: &Gateway, cmd: &crate::frame::Command) -> Reply {
    let topic = cmd.str_field("topic")?.to_string();
    let key = cmd.str_field("key")?.to_string();
    let max = cmd.opt_i64("maxNum")?.unwrap_or(32).clamp(1, 64 * 1024) as usize;
    let begin = cmd.opt_i64("beginTimestamp")?.unwrap_or(0);
    let end = cmd.opt_i64("endTimestamp")?.unwrap_or(i64::MAX);
    let unique = cmd.opt_str("_UNIQUE_KEY_QUERY") == Some("true");
    let queues = crate::namesrv::queue_count(gw, &topic)
        .await?
        .ok_or_else(|| Refusal::new(rs::TOPIC_NOT_EXIST, format!("topic[{topic}] not exist")))?;
    let mut body = Vec::new();
    let mut hits = 0usize;
    'queues: for queue in 0..queues {
        let mut offset = match list_offset(gw, &topic, queue, Spec::Time(begin)).await? {
            -1 => continue,
            o => o,
        };
        let mut scanned = 0usize;
        while scanned < QUERY_SCAN_LIMIT {
            let part = match fetch(gw, &topic, queue, offset, FETCH_BYTES, 0).await {
                Ok(p) => p,
                Err(_) => break,
            };
            let Some(next) = end_of(&part) else { break };
            for (_, m) in messages(gw, &topic, queue, &part) {
                scanned += 1;
                if m.store_timestamp > end {
                    continue 'queues;
                }
                let matched = if unique {
                    message::get(&m.properties, property::UNIQ_KEY) == Some(key.as_str())
                } else {
                    message::get(&m.properties, property::KEYS)
                        .is_some_and(|ks| ks.split(' ').any(|k| k == key))
                };
                if matched {
                    m.encode_into(&mut body);
                    hits += 1;
                    if hits == max {
                        break 'queues;
                    }
                }
            }
            if next <= offset {
                break;
            }
            offset = next;
        }
    }
    if hits == 0 {
        return Err(Refusal::new(
            rs::QUERY_NOT_FOUND,
            "can not find message, maybe time range not correct",
        ));
    }
    Ok(ok(cmd)
        .with_ext("indexLastUpdateTimestamp", now_ms())
        .with_ext("indexLastUpdatePhyoffset", 0)
        .with_body(Bytes::from(body)))
}
