//! Transactional messages on the core's staged transactions: a half message is staged
//! (durable, invisible to consumers), END_TRANSACTION commits it (the core then appends it,
//! exactly once, or schedules it when it carries a delay) or rolls it back, and a half
//! message nobody resolved is checked back with a producer of its group
//! (CHECK_TRANSACTION_STATE), every `transaction_check_interval` once older than
//! `transaction_timeout`, until `transaction_check_max` checks roll it back. The check
//! schedule lives in the core, so it survives restarts and two gateways never check the same
//! half message at once.

use std::sync::Arc;

use bytes::Bytes;
use rand::seq::IndexedRandom;
use tributary_proto::v1;

use crate::Gateway;
use crate::codes::request as rq;
use crate::conn::{ConnState, Ext, Refusal, Reply, core_refusal, ok};
use crate::envelope::{self, Outgoing};
use crate::frame::Command;
use crate::message::{self, StoredMessage, property, sys_flag};
use crate::send::{SendHeader, now_ms};

/// `MessageSysFlag.TRANSACTION_COMMIT_TYPE` / `TRANSACTION_ROLLBACK_TYPE` in END_TRANSACTION.
const COMMIT: i64 = sys_flag::TRANSACTION_COMMIT as i64;
const ROLLBACK: i64 = sys_flag::TRANSACTION_ROLLBACK as i64;
/// Half messages claimed for checking per round.
const CHECKS_PER_ROUND: u32 = 1000;

/// SEND_MESSAGE of a half message: staged in the core, answered with its transaction id.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn stage_half_message(
    gw: &Gateway,
    conn: &Arc<ConnState>,
    cmd: &Command,
    h: &SendHeader,
    queue_id: u32,
    body: Bytes,
    due: Option<i64>,
    create: Option<u32>,
) -> Reply {
    crate::send::check_queue(gw, &h.topic, queue_id, create).await?;
    let mut props = h.properties.clone();
    if message::get(&props, property::PRODUCER_GROUP).is_none() {
        message::set(
            &mut props,
            property::PRODUCER_GROUP,
            h.producer_group.clone(),
        );
    }
    // What the producer's checker is shown: the half message as the broker holds it.
    let half = StoredMessage {
        topic: h.topic.clone(),
        queue_id: queue_id as i32,
        flag: h.flag,
        queue_offset: 0,
        commit_log_offset: 0,
        sys_flag: sys_flag::TRANSACTION_PREPARED,
        born_timestamp: h.born_timestamp,
        born_host: conn.peer,
        store_timestamp: now_ms(),
        store_host: gw.config.advertised,
        reconsume_times: h.reconsume_times,
        prepared_transaction_offset: 0,
        body: body.clone(),
        properties: props.clone(),
    };
    // The committed message no longer says it is prepared, as RocketMQ's broker clears it.
    let mut committed = props;
    message::remove(&mut committed, property::TRANSACTION_PREPARED);
    crate::send::strip_delay(&mut committed);
    let record = envelope::to_record(&Outgoing {
        flag: h.flag,
        body,
        properties: committed,
        born_timestamp: h.born_timestamp,
        born_host: conn.peer,
        reconsume_times: h.reconsume_times,
    });
    let req = v1::StageMessagesRequest {
        namespace: gw.config.namespace.clone(),
        transaction_id: String::new(),
        writes: vec![v1::StagedWrite {
            write: Some(v1::staged_write::Write::Append(v1::AppendRequest {
                stream: Some(gw.stream(&h.topic)),
                partition: queue_id,
                batch: Some(v1::RecordBatch {
                    records: vec![record],
                    ..Default::default()
                }),
                auto_create: false,
                defer_durable: false,
            })),
            deliver_at_ms: due.unwrap_or(0),
        }],
        owner: h.producer_group.clone(),
        context: Bytes::from(half.encode()),
        check_after_ms: gw.config.transaction_timeout.as_millis() as i64,
        // Checked back instead (and rolled back after transactionCheckMax checks).
        timeout_ms: 0,
    };
    let r = gw
        .core
        .transactions
        .clone()
        .stage_messages(req)
        .await
        .map_err(|s| core_refusal(&s))?
        .into_inner();
    metrics::counter!("tributary_rocketmq_half_messages_total").increment(1);
    Ok(ok(cmd)
        .with_ext("msgId", message::message_id(&gw.config.advertised, 0))
        .with_ext("queueId", queue_id)
        .with_ext("queueOffset", 0)
        .with_ext("transactionId", r.transaction_id))
}

/// END_TRANSACTION: commit or roll back a half message (usually one-way, from the producer
/// after its local transaction or from its checker).
pub(crate) async fn end_transaction(gw: &Gateway, cmd: &Command) -> Reply {
    let how = cmd.i64_field("commitOrRollback")?;
    let commit = match how {
        COMMIT => true,
        ROLLBACK => false,
        // TRANSACTION_NOT_TYPE: the producer does not know yet; a check-back will ask.
        _ => return Ok(ok(cmd)),
    };
    let id = cmd.str_field("transactionId")?;
    let req = v1::ResolveStagedRequest {
        namespace: gw.config.namespace.clone(),
        transaction_id: id.to_string(),
        commit,
    };
    match gw.core.transactions.clone().resolve_staged(req).await {
        Ok(_) => {
            metrics::counter!(
                "tributary_rocketmq_transactions_ended_total",
                "outcome" => if commit { "commit" } else { "rollback" }
            )
            .increment(1);
            Ok(ok(cmd))
        }
        Err(s) => {
            let from_check = cmd.opt_str("fromTransactionCheck") == Some("true");
            tracing::info!(
                transaction = id,
                commit,
                from_check,
                error = %s.message(),
                "END_TRANSACTION refused"
            );
            Err(Refusal::system(format!(
                "the half message of transaction {id} cannot be ended: {}",
                s.message()
            )))
        }
    }
}

/// One round of check-backs: half messages due for a check are claimed from the core and
/// each is sent to a producer of its group connected here.
pub(crate) async fn check_back(gw: &Gateway) {
    if gw.clients.producer_groups().is_empty() {
        // Nobody here could answer: leave the checks to a gateway whose producers are on.
        return;
    }
    let req = v1::ClaimStagedChecksRequest {
        namespace: gw.config.namespace.clone(),
        limit: CHECKS_PER_ROUND,
        recheck_after_ms: gw.config.transaction_check_interval.as_millis() as i64,
        max_checks: gw.config.transaction_check_max,
    };
    let claimed = match gw.core.transactions.clone().claim_staged_checks(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tracing::warn!(error = %s.message(), "claiming half-message checks failed");
            return;
        }
    };
    if !claimed.discarded.is_empty() {
        metrics::counter!("tributary_rocketmq_transactions_discarded_total")
            .increment(claimed.discarded.len() as u64);
        tracing::info!(
            count = claimed.discarded.len(),
            max_checks = gw.config.transaction_check_max,
            "half messages rolled back after their last unanswered check"
        );
    }
    for check in claimed.checks {
        let producers = gw.clients.producers(&check.owner);
        let Some(conn) = producers.choose(&mut rand::rng()).cloned() else {
            tracing::debug!(
                group = check.owner,
                transaction = check.transaction_id,
                "no producer of the group is connected here for a check-back"
            );
            continue;
        };
        let unique = message::decode_stored(check.context.clone())
            .ok()
            .and_then(|m| m.into_iter().next())
            .and_then(|m| message::get(&m.properties, property::UNIQ_KEY).map(str::to_string))
            .unwrap_or_default();
        let ask = Command::request(rq::CHECK_TRANSACTION_STATE, 0)
            .with_ext("tranStateTableOffset", 0)
            .with_ext("commitLogOffset", 0)
            .with_ext("msgId", &unique)
            .with_ext("transactionId", &check.transaction_id)
            .with_ext("offsetMsgId", message::message_id(&gw.config.advertised, 0))
            .with_body(check.context);
        metrics::counter!("tributary_rocketmq_transaction_checks_total").increment(1);
        conn.send_oneway(ask).await;
    }
}
