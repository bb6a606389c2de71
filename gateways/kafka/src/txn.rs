//! The transaction coordinator's Kafka face: AddPartitionsToTxn, AddOffsetsToTxn,
//! TxnOffsetCommit, EndTxn, DescribeTransactions and ListTransactions, each a call to the
//! core's Transactions service (the coordinator itself; this module only translates).

use std::collections::BTreeMap;

use kafka_protocol::error::ResponseError as K;
use kafka_protocol::messages::add_offsets_to_txn_request::AddOffsetsToTxnRequest;
use kafka_protocol::messages::add_offsets_to_txn_response::AddOffsetsToTxnResponse;
use kafka_protocol::messages::add_partitions_to_txn_request::{
    AddPartitionsToTxnRequest, AddPartitionsToTxnTopic,
};
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResponse, AddPartitionsToTxnResult,
    AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::describe_transactions_request::DescribeTransactionsRequest;
use kafka_protocol::messages::describe_transactions_response::{
    DescribeTransactionsResponse, TopicData, TransactionState,
};
use kafka_protocol::messages::end_txn_request::EndTxnRequest;
use kafka_protocol::messages::end_txn_response::EndTxnResponse;
use kafka_protocol::messages::list_transactions_request::ListTransactionsRequest;
use kafka_protocol::messages::list_transactions_response::{self, ListTransactionsResponse};
use kafka_protocol::messages::txn_offset_commit_request::TxnOffsetCommitRequest;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponse, TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{ProducerId, TopicName, TransactionalId};
use kafka_protocol::protocol::StrBytes;
use tributary_gateway_common::client::error_code;
use tributary_proto::v1;

use crate::Gateway;
use crate::acl::{Authz, Operation, ResourceType};
use crate::errors::{Context, kafka_code, kafka_error};

/// Kafka's transaction states, which ListTransactions filters may name.
const STATES: &[&str] = &[
    "Empty",
    "Ongoing",
    "PrepareCommit",
    "PrepareAbort",
    "CompleteCommit",
    "CompleteAbort",
    "Dead",
    "PrepareEpochFence",
];

fn producer(gw: &Gateway, id: &TransactionalId, pid: ProducerId, epoch: i16) -> v1::TxnProducer {
    v1::TxnProducer {
        namespace: gw.config.namespace.clone(),
        transactional_id: id.to_string(),
        producer_id: pid.0,
        producer_epoch: i32::from(epoch),
    }
}

/// Every transaction call needs WRITE on its transactional id.
fn may_write(az: &Authz<'_>, id: &TransactionalId) -> bool {
    az.check(Operation::Write, ResourceType::TransactionalId, id.as_str())
}

/// The coordinator errors of a transaction call at this request version.
fn txn_error(status: &tonic::Status, version: i16) -> i16 {
    kafka_error(status, Context::Txn { version })
}

/// WRITE on the transactional id, then WRITE on each topic (TOPIC_AUTHORIZATION_FAILED for
/// its partitions, the others OPERATION_NOT_ATTEMPTED), as Kafka checks them.
pub(crate) async fn add_partitions(
    gw: &Gateway,
    az: &Authz<'_>,
    req: AddPartitionsToTxnRequest,
    version: i16,
) -> AddPartitionsToTxnResponse {
    if version >= 4 {
        // The batched form brokers send (KIP-890); answered per transaction.
        let mut results = Vec::new();
        for t in req.transactions {
            let topics = add_one(
                gw,
                az,
                &t.transactional_id,
                t.producer_id,
                t.producer_epoch,
                t.topics,
                t.verify_only,
                version,
            )
            .await;
            results.push(
                AddPartitionsToTxnResult::default()
                    .with_transactional_id(t.transactional_id)
                    .with_topic_results(topics),
            );
        }
        return AddPartitionsToTxnResponse::default().with_results_by_transaction(results);
    }
    let topics = add_one(
        gw,
        az,
        &req.v3_and_below_transactional_id,
        req.v3_and_below_producer_id,
        req.v3_and_below_producer_epoch,
        req.v3_and_below_topics,
        false,
        version,
    )
    .await;
    AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(topics)
}

fn topic_results(
    topics: &[AddPartitionsToTxnTopic],
    code_of: impl Fn(&TopicName, i32) -> i16,
) -> Vec<AddPartitionsToTxnTopicResult> {
    topics
        .iter()
        .map(|t| {
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(
                    t.partitions
                        .iter()
                        .map(|p| {
                            AddPartitionsToTxnPartitionResult::default()
                                .with_partition_index(*p)
                                .with_partition_error_code(code_of(&t.name, *p))
                        })
                        .collect(),
                )
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn add_one(
    gw: &Gateway,
    az: &Authz<'_>,
    id: &TransactionalId,
    pid: ProducerId,
    epoch: i16,
    topics: Vec<AddPartitionsToTxnTopic>,
    verify_only: bool,
    version: i16,
) -> Vec<AddPartitionsToTxnTopicResult> {
    if !may_write(az, id) {
        return topic_results(&topics, |_, _| K::TransactionalIdAuthorizationFailed.code());
    }
    let denied: Vec<&TopicName> = topics
        .iter()
        .filter(|t| !az.check(Operation::Write, ResourceType::Topic, t.name.as_str()))
        .map(|t| &t.name)
        .collect();
    if !denied.is_empty() {
        return topic_results(&topics, |name, _| {
            if denied.contains(&name) {
                K::TopicAuthorizationFailed.code()
            } else {
                K::OperationNotAttempted.code()
            }
        });
    }
    let partitions: Vec<v1::TxnPartition> = topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| v1::TxnPartition {
                stream: Some(gw.stream_id(t.name.as_str())),
                partition: (*p).max(0) as u32,
            })
        })
        .collect();
    if topics.iter().any(|t| t.partitions.iter().any(|p| *p < 0)) {
        return topic_results(&topics, |_, p| {
            if p < 0 {
                K::UnknownTopicOrPartition.code()
            } else {
                K::OperationNotAttempted.code()
            }
        });
    }
    let r = gw
        .core
        .transactions
        .clone()
        .add_partitions(v1::AddPartitionsRequest {
            producer: Some(producer(gw, id, pid, epoch)),
            partitions,
            verify_only,
        })
        .await;
    match r {
        Ok(r) => {
            let mut codes: BTreeMap<(String, i32), i16> = BTreeMap::new();
            for res in r.into_inner().results {
                let Some(tp) = res.partition else { continue };
                let name = tp.stream.map(|s| s.name).unwrap_or_default();
                let code = v1::ErrorCode::try_from(res.error).unwrap_or(v1::ErrorCode::Internal);
                let k = match code {
                    v1::ErrorCode::Conflict => K::OperationNotAttempted.code(),
                    other => kafka_code(other, Context::Txn { version }),
                };
                codes.insert((name, tp.partition as i32), k);
            }
            topic_results(&topics, |name, p| {
                codes
                    .get(&(name.to_string(), p))
                    .copied()
                    .unwrap_or(K::UnknownServerError.code())
            })
        }
        Err(status) => {
            let code = txn_error(&status, version);
            topic_results(&topics, |_, _| code)
        }
    }
}

/// WRITE on the transactional id, READ on the group.
pub(crate) async fn add_offsets(
    gw: &Gateway,
    az: &Authz<'_>,
    req: AddOffsetsToTxnRequest,
    version: i16,
) -> AddOffsetsToTxnResponse {
    let code = if !may_write(az, &req.transactional_id) {
        K::TransactionalIdAuthorizationFailed.code()
    } else if !az.check(Operation::Read, ResourceType::Group, req.group_id.as_str()) {
        K::GroupAuthorizationFailed.code()
    } else {
        match gw
            .core
            .transactions
            .clone()
            .add_group(v1::AddGroupRequest {
                producer: Some(producer(
                    gw,
                    &req.transactional_id,
                    req.producer_id,
                    req.producer_epoch,
                )),
                group: req.group_id.to_string(),
            })
            .await
        {
            Ok(_) => 0,
            Err(status) => txn_error(&status, version),
        }
    };
    AddOffsetsToTxnResponse::default().with_error_code(code)
}

/// WRITE on the transactional id, READ on the group, READ on each topic.
pub(crate) async fn txn_offset_commit(
    gw: &Gateway,
    az: &Authz<'_>,
    req: TxnOffsetCommitRequest,
    version: i16,
) -> TxnOffsetCommitResponse {
    let whole = if !may_write(az, &req.transactional_id) {
        Some(K::TransactionalIdAuthorizationFailed.code())
    } else if !az.check(Operation::Read, ResourceType::Group, req.group_id.as_str()) {
        Some(K::GroupAuthorizationFailed.code())
    } else {
        None
    };
    let answer = |code_of: &dyn Fn(&TopicName) -> i16| {
        TxnOffsetCommitResponse::default().with_topics(
            req.topics
                .iter()
                .map(|t| {
                    TxnOffsetCommitResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    TxnOffsetCommitResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(code_of(&t.name))
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    };
    if let Some(code) = whole {
        return answer(&|_| code);
    }
    let denied: Vec<TopicName> = req
        .topics
        .iter()
        .filter(|t| !az.check(Operation::Read, ResourceType::Topic, t.name.as_str()))
        .map(|t| t.name.clone())
        .collect();
    if !denied.is_empty() {
        return answer(&|name| {
            if denied.contains(name) {
                K::TopicAuthorizationFailed.code()
            } else {
                K::OperationNotAttempted.code()
            }
        });
    }
    let offsets = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| v1::CommittedOffset {
                stream: Some(gw.stream_id(t.name.as_str())),
                partition: p.partition_index.max(0) as u32,
                offset: p.committed_offset,
                metadata: p
                    .committed_metadata
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
                commit_time_ms: 0,
                leader_epoch: p.committed_leader_epoch,
            })
        })
        .collect();
    // v3+ carries the member's generation: checked like OffsetCommit's (KIP-447).
    let generation = (version >= 3 && req.generation_id >= 0).then_some(req.generation_id);
    let r = gw
        .core
        .transactions
        .clone()
        .commit_txn_offsets(v1::CommitTxnOffsetsRequest {
            producer: Some(producer(
                gw,
                &req.transactional_id,
                req.producer_id,
                req.producer_epoch,
            )),
            group: req.group_id.to_string(),
            offsets,
            generation,
            member_id: req.member_id.to_string(),
        })
        .await;
    let code = match r {
        Ok(_) => 0,
        Err(status) => match error_code(&status) {
            // Kafka's group coordinator answers these for TxnOffsetCommit.
            v1::ErrorCode::UnknownMember => K::UnknownMemberId.code(),
            v1::ErrorCode::IllegalGeneration => K::IllegalGeneration.code(),
            v1::ErrorCode::RebalanceInProgress => K::RebalanceInProgress.code(),
            _ => txn_error(&status, version),
        },
    };
    answer(&|_| code)
}

/// WRITE on the transactional id.
pub(crate) async fn end_txn(
    gw: &Gateway,
    az: &Authz<'_>,
    req: EndTxnRequest,
    version: i16,
) -> EndTxnResponse {
    let code = if !may_write(az, &req.transactional_id) {
        K::TransactionalIdAuthorizationFailed.code()
    } else {
        match gw
            .core
            .transactions
            .clone()
            .end_transaction(v1::EndTransactionRequest {
                namespace: gw.config.namespace.clone(),
                transaction_id: req.transactional_id.to_string(),
                commit: req.committed,
                producer_id: req.producer_id.0,
                producer_epoch: i32::from(req.producer_epoch),
            })
            .await
        {
            Ok(_) => 0,
            Err(status) => txn_error(&status, version),
        }
    };
    EndTxnResponse::default()
        .with_error_code(code)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1)
}

/// DESCRIBE on each transactional id.
pub(crate) async fn describe_transactions(
    gw: &Gateway,
    az: &Authz<'_>,
    req: DescribeTransactionsRequest,
) -> DescribeTransactionsResponse {
    let (allowed, denied): (Vec<_>, Vec<_>) = req.transactional_ids.into_iter().partition(|id| {
        az.check(
            Operation::Describe,
            ResourceType::TransactionalId,
            id.as_str(),
        )
    });
    let mut states: Vec<TransactionState> = denied
        .into_iter()
        .map(|id| empty_state(id).with_error_code(K::TransactionalIdAuthorizationFailed.code()))
        .collect();
    if allowed.is_empty() {
        return DescribeTransactionsResponse::default().with_transaction_states(states);
    }
    let r = gw
        .core
        .transactions
        .clone()
        .describe_transactions(v1::DescribeTransactionsRequest {
            namespace: gw.config.namespace.clone(),
            transactional_ids: allowed.iter().map(|id| id.to_string()).collect(),
        })
        .await;
    match r {
        Ok(r) => {
            let r = r.into_inner();
            for id in allowed {
                if let Some(t) = r
                    .transactions
                    .iter()
                    .find(|t| t.transactional_id == id.as_str())
                {
                    let mut topics: Vec<TopicData> = Vec::new();
                    for p in &t.partitions {
                        let name = p
                            .stream
                            .as_ref()
                            .map(|s| s.name.clone())
                            .unwrap_or_default();
                        match topics.iter_mut().find(|d| d.topic.as_str() == name) {
                            Some(d) => d.partitions.push(p.partition as i32),
                            None => topics.push(
                                TopicData::default()
                                    .with_topic(TopicName(StrBytes::from_string(name)))
                                    .with_partitions(vec![p.partition as i32]),
                            ),
                        }
                    }
                    states.push(
                        TransactionState::default()
                            .with_transactional_id(id)
                            .with_transaction_state(StrBytes::from_string(t.state.clone()))
                            .with_transaction_timeout_ms(t.timeout_ms)
                            .with_transaction_start_time_ms(if t.started_at_ms > 0 {
                                t.started_at_ms
                            } else {
                                -1
                            })
                            .with_producer_id(ProducerId(t.producer_id))
                            .with_producer_epoch(t.producer_epoch as i16)
                            .with_topics(topics),
                    );
                } else {
                    states.push(empty_state(id).with_error_code(K::TransactionalIdNotFound.code()));
                }
            }
        }
        Err(status) => {
            let code = kafka_error(&status, Context::Admin);
            states.extend(
                allowed
                    .into_iter()
                    .map(|id| empty_state(id).with_error_code(code)),
            );
        }
    }
    DescribeTransactionsResponse::default().with_transaction_states(states)
}

fn empty_state(id: TransactionalId) -> TransactionState {
    TransactionState::default()
        .with_transactional_id(id)
        .with_transaction_state(StrBytes::default())
        .with_transaction_start_time_ms(-1)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1)
}

/// The transactional ids the caller may DESCRIBE.
pub(crate) async fn list_transactions(
    gw: &Gateway,
    az: &Authz<'_>,
    req: ListTransactionsRequest,
) -> ListTransactionsResponse {
    let unknown: Vec<StrBytes> = req
        .state_filters
        .iter()
        .filter(|s| !STATES.contains(&s.as_str()))
        .cloned()
        .collect();
    let r = gw
        .core
        .transactions
        .clone()
        .list_transactions(v1::ListTransactionsRequest {
            namespace: gw.config.namespace.clone(),
            states: req.state_filters.iter().map(|s| s.to_string()).collect(),
            producer_ids: req.producer_id_filters.iter().map(|p| p.0).collect(),
            min_duration_ms: req.duration_filter.max(0),
        })
        .await;
    match r {
        Ok(r) => ListTransactionsResponse::default()
            .with_unknown_state_filters(unknown)
            .with_transaction_states(
                r.into_inner()
                    .transactions
                    .into_iter()
                    .filter(|t| {
                        az.check(
                            Operation::Describe,
                            ResourceType::TransactionalId,
                            &t.transactional_id,
                        )
                    })
                    .map(|t| {
                        list_transactions_response::TransactionState::default()
                            .with_transactional_id(TransactionalId(StrBytes::from_string(
                                t.transactional_id,
                            )))
                            .with_producer_id(ProducerId(t.producer_id))
                            .with_transaction_state(StrBytes::from_string(t.state))
                    })
                    .collect(),
            ),
        Err(status) => ListTransactionsResponse::default()
            .with_error_code(kafka_error(&status, Context::Admin)),
    }
}
