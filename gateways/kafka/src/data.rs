//! Produce, Fetch, ListOffsets and InitProducerId: the data path.

use bytes::BytesMut;
use futures::future::join_all;
use kafka_protocol::error::ResponseError as K;
use kafka_protocol::messages::fetch_request::FetchRequest;
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchResponse, FetchableTopicResponse, PartitionData,
};
use kafka_protocol::messages::init_producer_id_request::InitProducerIdRequest;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::list_offsets_request::ListOffsetsRequest;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, ProduceRequest};
use kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, ProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ProducerId, TopicName};
use kafka_protocol::protocol::StrBytes;
use tracing::debug;
use tributary_proto::v1;

use crate::Gateway;
use crate::acl::{Authz, Operation, ResourceType};
use crate::batch::{self, BatchError, OPAQUE_FORMAT};
use crate::errors::{Context, kafka_code, kafka_error};
use crate::produce_order::ProduceTurn;
use tributary_gateway_common::{CoreClient, Traffic};

/// WRITE on the transactional id (TRANSACTIONAL_ID_AUTHORIZATION_FAILED for every
/// partition) and on each topic (TOPIC_AUTHORIZATION_FAILED for its partitions).
pub(crate) async fn produce(
    gw: &Gateway,
    az: &Authz<'_>,
    traffic: &Traffic,
    req: ProduceRequest,
) -> Option<ProduceResponse> {
    produce_begin(gw, az, traffic, req).await.finish().await
}

/// A Produce whose batches have their offsets in the log and are not yet acknowledged:
/// [`ProduceInFlight::finish`] waits until they are durable. The connection starts the
/// next pipelined Produce between the two (order kept: its appends come after these), so
/// the requests of one connection share a group commit or an object-store upload instead
/// of each waiting out its own.
pub(crate) struct ProduceInFlight {
    acks: i16,
    /// Boxed: the connection keeps this in an enum with small variants.
    core: Box<CoreClient>,
    traffic: Traffic,
    partitions: Vec<(TopicName, PartitionOutcome)>,
    /// Its place among the connection's produces (see [`crate::produce_order`]).
    turn: Option<ProduceTurn>,
}

enum PartitionOutcome {
    Answered(PartitionProduceResponse),
    Appended {
        index: i32,
        request: v1::WaitDurableRequest,
        base_offset: i64,
        record_count: u32,
        size: usize,
    },
}

/// Checks and appends every partition of the request, in parallel, without waiting for
/// durability.
pub(crate) async fn produce_begin(
    gw: &Gateway,
    az: &Authz<'_>,
    traffic: &Traffic,
    req: ProduceRequest,
) -> ProduceInFlight {
    let acks = req.acks;
    let transactional = req.transactional_id.is_some();
    let txn_denied = req
        .transactional_id
        .as_ref()
        .is_some_and(|id| !az.check(Operation::Write, ResourceType::TransactionalId, id.as_str()));
    let mut work = Vec::new();
    for topic in req.topic_data {
        let denied =
            !txn_denied && !az.check(Operation::Write, ResourceType::Topic, topic.name.as_str());
        for p in topic.partition_data {
            work.push((topic.name.clone(), p, denied));
        }
    }
    let partitions = join_all(work.into_iter().map(|(name, p, denied)| async move {
        let r = if txn_denied {
            PartitionOutcome::Answered(error_partition(
                p.index,
                K::TransactionalIdAuthorizationFailed.code(),
                "WRITE on the transactional id is not allowed",
            ))
        } else if denied {
            PartitionOutcome::Answered(error_partition(
                p.index,
                K::TopicAuthorizationFailed.code(),
                "WRITE on the topic is not allowed",
            ))
        } else if !matches!(acks, -1..=1) {
            PartitionOutcome::Answered(error_partition(
                p.index,
                K::InvalidRequiredAcks.code(),
                "acks must be -1, 0 or 1",
            ))
        } else {
            append_partition(gw, &name, p, transactional).await
        };
        (name, r)
    }))
    .await;
    ProduceInFlight {
        acks,
        core: Box::new(gw.core.clone()),
        traffic: traffic.clone(),
        partitions,
        turn: None,
    }
}

impl ProduceInFlight {
    /// Settles its answers after those of the connection's earlier produces.
    pub(crate) fn in_turn(mut self, turn: ProduceTurn) -> Self {
        self.turn = Some(turn);
        self
    }

    /// Waits for every appended batch to be durable and builds the answer (`None` for
    /// acks=0, which is answered by nothing, but still waited for: the connection reads on
    /// only as fast as the log takes its batches).
    pub(crate) async fn finish(self) -> Option<ProduceResponse> {
        let ProduceInFlight {
            acks,
            core,
            traffic,
            partitions,
            turn,
        } = self;
        let mut results = join_all(partitions.into_iter().map(|(name, outcome)| {
            let mut streams = core.for_stream(name.as_str()).streams;
            let traffic = &traffic;
            async move {
                let r = match outcome {
                    PartitionOutcome::Answered(r) => r,
                    PartitionOutcome::Appended {
                        index,
                        request,
                        base_offset,
                        record_count,
                        size,
                    } => match streams.wait_durable(request).await {
                        Ok(done) => {
                            metrics::counter!("tributary_kafka_produced_bytes_total")
                                .increment(size as u64);
                            traffic.received(u64::from(record_count), size);
                            PartitionProduceResponse::default()
                                .with_index(index)
                                .with_base_offset(base_offset)
                                .with_log_append_time_ms(-1)
                                .with_log_start_offset(done.into_inner().log_start_offset)
                        }
                        Err(status) => refused(&name, index, &status),
                    },
                };
                (name, r)
            }
        }))
        .await;
        if let Some(turn) = turn {
            turn.settle(&mut results).await;
        }
        if acks == 0 {
            return None;
        }
        let mut topics: Vec<TopicProduceResponse> = Vec::new();
        for (name, r) in results {
            match topics.iter_mut().find(|t| t.name == name) {
                Some(t) => t.partition_responses.push(r),
                None => topics.push(
                    TopicProduceResponse::default()
                        .with_name(name)
                        .with_partition_responses(vec![r]),
                ),
            }
        }
        Some(ProduceResponse::default().with_responses(topics))
    }
}

fn refused(topic: &TopicName, index: i32, status: &tonic::Status) -> PartitionProduceResponse {
    debug!(topic = %topic.as_str(), partition = index, error = %status.message(), "produce refused");
    error_partition(
        index,
        kafka_error(status, Context::Produce),
        status.message(),
    )
}

fn error_partition(index: i32, code: i16, message: &str) -> PartitionProduceResponse {
    PartitionProduceResponse::default()
        .with_index(index)
        .with_error_code(code)
        .with_base_offset(-1)
        .with_log_append_time_ms(-1)
        .with_log_start_offset(-1)
        .with_error_message(Some(StrBytes::from_string(message.to_string())))
}

async fn append_partition(
    gw: &Gateway,
    topic: &TopicName,
    p: PartitionProduceData,
    transactional_request: bool,
) -> PartitionOutcome {
    let answered = |code: i16, message: &str| {
        PartitionOutcome::Answered(error_partition(p.index, code, message))
    };
    let Some(records) = p.records else {
        return answered(K::InvalidRecord.code(), "no records");
    };
    let batches = match batch::split_batches(records) {
        Ok(b) => b,
        Err(e @ BatchError::UnsupportedMagic(_)) => {
            return answered(K::UnsupportedForMessageFormat.code(), &e.to_string());
        }
        Err(e) => return answered(K::CorruptMessage.code(), &e.to_string()),
    };
    // Kafka (produce v3+) takes exactly one batch per partition and so does the gateway.
    if batches.len() != 1 {
        return answered(
            K::InvalidRecord.code(),
            "a produce request must hold exactly one record batch per partition",
        );
    }
    let Some((header, bytes)) = batches.into_iter().next() else {
        unreachable!("length checked above")
    };
    if header.control {
        return answered(
            K::InvalidRecord.code(),
            "control batches cannot be produced",
        );
    }
    // Kafka refuses a transactional batch outside a request naming its transactional id.
    if header.transactional != transactional_request {
        return answered(
            K::InvalidRecord.code(),
            "a transactional batch needs the request's transactional id, and only it",
        );
    }
    let Ok(partition) = u32::try_from(p.index) else {
        return answered(K::UnknownTopicOrPartition.code(), "negative partition");
    };
    let size = bytes.len();
    let record_count = header.record_count;
    let stream = v1::StreamId {
        namespace: gw.config.namespace.clone(),
        name: topic.to_string(),
    };
    let request = v1::AppendRequest {
        stream: Some(stream.clone()),
        partition,
        batch: Some(v1::RecordBatch {
            opaque: bytes,
            opaque_format: OPAQUE_FORMAT.into(),
            record_count,
            max_timestamp_ms: header.max_timestamp_ms.max(0),
            producer_id: header.producer_id.max(0),
            producer_epoch: i32::from(header.producer_epoch),
            base_sequence: header.base_sequence,
            transactional: header.transactional,
            ..Default::default()
        }),
        auto_create: false,
        defer_durable: true,
    };
    match gw.core.for_stream(topic).streams.append(request).await {
        Ok(r) => {
            let base_offset = r.into_inner().base_offset;
            PartitionOutcome::Appended {
                index: p.index,
                request: v1::WaitDurableRequest {
                    stream: Some(stream),
                    partition,
                    end_offset: base_offset + i64::from(record_count),
                },
                base_offset,
                record_count,
                size,
            }
        }
        Err(status) => PartitionOutcome::Answered(refused(topic, p.index, &status)),
    }
}

/// READ on each topic; the others' partitions answer TOPIC_AUTHORIZATION_FAILED.
pub(crate) async fn fetch(
    gw: &Gateway,
    az: &Authz<'_>,
    traffic: &Traffic,
    req: FetchRequest,
    version: i16,
) -> FetchResponse {
    let mut wanted = Vec::new(); // (topic name, topic id, partition, offset, max bytes)
    let mut unknown_ids = Vec::new();
    let mut denied = Vec::new();
    for t in &req.topics {
        let name = if version >= 13 {
            match gw.topic_name(t.topic_id).await {
                Some(n) => n,
                None => {
                    unknown_ids.push(t);
                    continue;
                }
            }
        } else {
            t.topic.to_string()
        };
        if !az.check(Operation::Read, ResourceType::Topic, &name) {
            denied.push((name, t));
            continue;
        }
        for p in &t.partitions {
            wanted.push((
                name.clone(),
                t.topic_id,
                p.partition,
                p.fetch_offset,
                p.partition_max_bytes,
            ));
        }
    }
    let core_req = v1::FetchRequest {
        partitions: wanted
            .iter()
            .map(|(name, _, partition, offset, max)| v1::FetchPartition {
                stream: Some(v1::StreamId {
                    namespace: gw.config.namespace.clone(),
                    name: name.clone(),
                }),
                partition: (*partition).max(0) as u32,
                offset: *offset,
                max_bytes: *max,
            })
            .collect(),
        max_bytes: req.max_bytes.max(0),
        min_bytes: req.min_bytes.max(0),
        max_wait_ms: req.max_wait_ms.max(0),
        read_committed: req.isolation_level == 1,
    };
    let mut topics: Vec<FetchableTopicResponse> = Vec::new();
    let mut push = |name: &str, id, pd: PartitionData| match topics.iter_mut().find(|t| {
        if version >= 13 {
            t.topic_id == id
        } else {
            t.topic.as_str() == name
        }
    }) {
        Some(t) => t.partitions.push(pd),
        None => topics.push(
            FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_string(name.to_string())))
                .with_topic_id(id)
                .with_partitions(vec![pd]),
        ),
    };
    for t in unknown_ids {
        for p in &t.partitions {
            push(
                "",
                t.topic_id,
                empty_partition(p.partition, K::UnknownTopicId.code()),
            );
        }
    }
    for (name, t) in denied {
        for p in &t.partitions {
            push(
                &name,
                t.topic_id,
                empty_partition(p.partition, K::TopicAuthorizationFailed.code()),
            );
        }
    }
    if wanted.is_empty() {
        return FetchResponse::default().with_responses(topics);
    }
    let results = crate::fetch_spread::fetch(gw, core_req).await;
    for (result, (name, id, partition, _, _)) in results.into_iter().zip(&wanted) {
        let fp = match result {
            Ok(fp) => fp,
            Err(status) => {
                let code = kafka_error(&status, Context::Fetch);
                push(name, *id, empty_partition(*partition, code));
                continue;
            }
        };
        let code = v1::ErrorCode::try_from(fp.error).unwrap_or(v1::ErrorCode::Internal);
        let mut pd = empty_partition(*partition, kafka_code(code, Context::Fetch))
            .with_high_watermark(fp.end_offset)
            .with_last_stable_offset(fp.last_stable_offset)
            .with_log_start_offset(fp.start_offset);
        if req.isolation_level == 1 {
            pd = pd.with_aborted_transactions(Some(
                fp.aborted_transactions
                    .iter()
                    .map(|a| {
                        AbortedTransaction::default()
                            .with_producer_id(ProducerId(a.producer_id))
                            .with_first_offset(a.first_offset)
                    })
                    .collect(),
            ));
        }
        if code == v1::ErrorCode::Unspecified {
            let mut records = BytesMut::new();
            for b in &fp.batches {
                let count = if b.opaque.is_empty() {
                    b.records.len() as u64
                } else {
                    u64::from(b.record_count)
                };
                let before = records.len();
                if b.opaque_format == OPAQUE_FORMAT {
                    batch::append_stored(&mut records, &b.opaque, b.base_offset);
                } else if b.opaque.is_empty()
                    && let Err(e) = batch::encode_envelope(&mut records, b)
                {
                    tracing::warn!(error = %e, "cannot serve a batch to a Kafka consumer");
                }
                // Batches in other opaque formats are not readable by Kafka clients.
                if records.len() > before {
                    traffic.sent(count, records.len() - before);
                }
            }
            pd = pd.with_records(Some(records.freeze()));
        } else if version < 13 && code == v1::ErrorCode::StreamNotFound {
            pd = pd.with_error_code(K::UnknownTopicOrPartition.code());
        }
        push(name, *id, pd);
    }
    FetchResponse::default().with_responses(topics)
}

fn empty_partition(partition: i32, code: i16) -> PartitionData {
    PartitionData::default()
        .with_partition_index(partition)
        .with_error_code(code)
        .with_high_watermark(-1)
        .with_last_stable_offset(-1)
        .with_log_start_offset(-1)
        .with_preferred_read_replica(kafka_protocol::messages::BrokerId(-1))
        .with_records(Some(bytes::Bytes::new()))
}

/// DESCRIBE on each topic (TOPIC_AUTHORIZATION_FAILED for its partitions).
pub(crate) async fn list_offsets(
    gw: &Gateway,
    az: &Authz<'_>,
    req: ListOffsetsRequest,
) -> ListOffsetsResponse {
    let mut topics = Vec::new();
    for t in req.topics {
        let mut partitions = Vec::new();
        let denied = !az.check(Operation::Describe, ResourceType::Topic, t.name.as_str());
        for p in t.partitions {
            let spec = match p.timestamp {
                -1 => Some(v1::list_offsets_request::Spec::Latest(true)),
                -2 => Some(v1::list_offsets_request::Spec::Earliest(true)),
                ts if ts >= 0 => Some(v1::list_offsets_request::Spec::TimestampMs(ts)),
                _ => None,
            };
            let base = ListOffsetsPartitionResponse::default()
                .with_partition_index(p.partition_index)
                .with_timestamp(-1)
                .with_offset(-1)
                .with_leader_epoch(-1);
            if denied {
                partitions.push(base.with_error_code(K::TopicAuthorizationFailed.code()));
                continue;
            }
            let Some(spec) = spec else {
                // -3 (max timestamp, KIP-734) and later specs need versions not advertised.
                partitions.push(base.with_error_code(K::UnsupportedVersion.code()));
                continue;
            };
            let r = gw
                .core
                .for_stream(t.name.as_str())
                .streams
                .list_offsets(v1::ListOffsetsRequest {
                    stream: Some(v1::StreamId {
                        namespace: gw.config.namespace.clone(),
                        name: t.name.to_string(),
                    }),
                    partition: p.partition_index.max(0) as u32,
                    spec: Some(spec),
                    read_committed: req.isolation_level == 1,
                })
                .await;
            partitions.push(match r {
                Ok(r) if p.timestamp >= 0 && r.get_ref().offset >= 0 => {
                    // The core finds the batch; the record inside it is Kafka-specific.
                    let r = r.into_inner();
                    match first_record_at_or_after(
                        gw,
                        &t.name,
                        p.partition_index,
                        r.offset,
                        p.timestamp,
                    )
                    .await
                    {
                        Some((offset, ts)) => base.with_offset(offset).with_timestamp(ts),
                        None => base.with_offset(r.offset).with_timestamp(r.timestamp_ms),
                    }
                }
                Ok(r) => {
                    let r = r.into_inner();
                    base.with_offset(r.offset).with_timestamp(r.timestamp_ms)
                }
                Err(status) => base.with_error_code(kafka_error(&status, Context::Fetch)),
            });
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

/// Within the batch stored at `offset`, the first record whose timestamp is >= `target`
/// (Kafka's rule for ListOffsets by time). `None` when the batch cannot be read here.
async fn first_record_at_or_after(
    gw: &Gateway,
    topic: &TopicName,
    partition: i32,
    offset: i64,
    target: i64,
) -> Option<(i64, i64)> {
    let r = gw
        .core
        .for_stream(topic.as_str())
        .streams
        .fetch(v1::FetchRequest {
            partitions: vec![v1::FetchPartition {
                stream: Some(gw.stream_id(topic.as_str())),
                partition: partition.max(0) as u32,
                offset,
                max_bytes: 1,
            }],
            max_bytes: 1,
            min_bytes: 0,
            max_wait_ms: 0,
            read_committed: false,
        })
        .await
        .ok()?
        .into_inner();
    let batch = r
        .partitions
        .into_iter()
        .next()?
        .batches
        .into_iter()
        .next()?;
    let mut bytes = BytesMut::new();
    if batch.opaque_format == OPAQUE_FORMAT {
        batch::append_stored(&mut bytes, &batch.opaque, batch.base_offset);
    } else if batch.opaque.is_empty() {
        batch::encode_envelope(&mut bytes, &batch).ok()?;
    } else {
        return None;
    }
    let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes.freeze()).ok()?;
    set.records
        .iter()
        .find(|rec| rec.offset >= offset && rec.timestamp >= target)
        .map(|rec| (rec.offset, rec.timestamp))
}

/// A transactional producer needs WRITE on its transactional id
/// (TRANSACTIONAL_ID_AUTHORIZATION_FAILED); an idempotent one IDEMPOTENT_WRITE on the
/// cluster or WRITE on some topic (KIP-679; CLUSTER_AUTHORIZATION_FAILED).
pub(crate) async fn init_producer_id(
    gw: &Gateway,
    az: &Authz<'_>,
    req: InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let refused = match req.transactional_id.as_ref().filter(|t| !t.is_empty()) {
        Some(id) if !az.check(Operation::Write, ResourceType::TransactionalId, id.as_str()) => {
            Some(K::TransactionalIdAuthorizationFailed.code())
        }
        Some(_) => None,
        None if !az.allowed(
            Operation::IdempotentWrite,
            ResourceType::Cluster,
            crate::acl::CLUSTER_NAME,
        ) && !az.check_any(Operation::Write, ResourceType::Topic) =>
        {
            Some(K::ClusterAuthorizationFailed.code())
        }
        None => None,
    };
    if let Some(code) = refused {
        return InitProducerIdResponse::default()
            .with_error_code(code)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
    }
    let r = gw
        .core
        .streams
        .clone()
        .init_producer(v1::InitProducerRequest {
            namespace: gw.config.namespace.clone(),
            transactional_id: req
                .transactional_id
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_default(),
            producer_id: req.producer_id.0,
            producer_epoch: i32::from(req.producer_epoch),
            transaction_timeout_ms: req.transaction_timeout_ms,
        })
        .await;
    match r {
        Ok(r) => {
            let r = r.into_inner();
            InitProducerIdResponse::default()
                .with_producer_id(ProducerId(r.producer_id))
                .with_producer_epoch(r.producer_epoch as i16)
        }
        Err(status) => InitProducerIdResponse::default()
            .with_error_code(kafka_error(&status, Context::InitProducer { version }))
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
    }
}
