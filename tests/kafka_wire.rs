//! The Kafka gateway at the wire level, through the real binary: what no client library lets
//! a test do on purpose (retrying a batch verbatim, garbage frames, unknown versions), and two
//! gateway processes in front of one core sharing a consumer group.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::{Server, free_port_args};
use indexmap::IndexMap;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bounds every wait so a broken gateway fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);

struct Conn {
    stream: TcpStream,
    correlation: i32,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the gateway");
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            correlation: 0,
        }
    }

    async fn send<R: Request>(&mut self, req: &R, version: i16) -> i32 {
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("wire-test")));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .unwrap();
        req.encode(&mut body, version).unwrap();
        self.send_raw(&body).await;
        self.correlation
    }

    async fn send_raw(&mut self, body: &[u8]) {
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(body.len() as i32);
        frame.extend_from_slice(body);
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Reads one response frame; `None` when the gateway closed the connection.
    async fn read_frame(&mut self) -> Option<Bytes> {
        let read = async {
            let size = self.stream.read_i32().await.ok()?;
            let mut buf = vec![0u8; size as usize];
            self.stream.read_exact(&mut buf).await.ok()?;
            Some(Bytes::from(buf))
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("response within the bound")
    }

    async fn recv<R: Request>(&mut self, version: i16, correlation: i32) -> R::Response {
        let mut frame = self
            .read_frame()
            .await
            .expect("a response, not a closed connection");
        let header =
            ResponseHeader::decode(&mut frame, R::Response::header_version(version)).unwrap();
        assert_eq!(
            header.correlation_id, correlation,
            "responses come in request order"
        );
        R::Response::decode(&mut frame, version).unwrap()
    }

    async fn call<R: Request>(&mut self, req: &R, version: i16) -> R::Response {
        let c = self.send(req, version).await;
        self.recv::<R>(version, c).await
    }

    async fn closed_by_peer(&mut self) -> bool {
        self.read_frame().await.is_none()
    }
}

fn batch(producer: (i64, i16), base_sequence: i32, values: &[&str]) -> Bytes {
    batch_of(producer, base_sequence, values, false)
}

fn batch_of(producer: (i64, i16), base_sequence: i32, values: &[&str], txn: bool) -> Bytes {
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            transactional: txn,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: producer.0,
            producer_epoch: producer.1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: if producer.0 >= 0 {
                base_sequence + i as i32
            } else {
                -1
            },
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::from(v.to_string())),
            headers: IndexMap::new(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    buf.freeze()
}

fn produce_request(topic: &str, records: Bytes, acks: i16) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![
            produce_request::TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.into())))
                .with_partition_data(vec![
                    produce_request::PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(records)),
                ]),
        ])
}

fn partition_result(r: &ProduceResponse) -> &produce_response::PartitionProduceResponse {
    &r.responses[0].partition_responses[0]
}

async fn create_topic(c: &mut Conn, name: &str, configs: &[(&str, &str)]) {
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![
            create_topics_request::CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_string(name.into())))
                .with_num_partitions(1)
                .with_replication_factor(1)
                .with_configs(
                    configs
                        .iter()
                        .map(|(k, v)| {
                            create_topics_request::CreatableTopicConfig::default()
                                .with_name(StrBytes::from_string(k.to_string()))
                                .with_value(Some(StrBytes::from_string(v.to_string())))
                        })
                        .collect(),
                ),
        ]);
    let r = c.call(&req, 7).await;
    assert_eq!(r.topics[0].error_code, 0, "{:?}", r.topics[0].error_message);
}

fn standalone() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--kafka-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    args.extend(["--group-initial-rebalance-delay-ms".into(), "0".into()]);
    let server = Server::start(&args);
    (dir, server)
}

#[tokio::test]
async fn api_versions_answers_unknown_versions_per_kip_511() {
    let (_dir, server) = standalone();
    let addr = server.kafka.unwrap();
    let mut c = Conn::open(addr).await;
    let r = c.call(&ApiVersionsRequest::default(), 3).await;
    assert_eq!(r.error_code, 0);
    let produce = r.api_keys.iter().find(|k| k.api_key == 0).unwrap();
    assert_eq!((produce.min_version, produce.max_version), (3, 11));
    // Transactions v1 are served; v2 (KIP-890 part 2: EndTxn v5) is not advertised.
    let end_txn = r.api_keys.iter().find(|k| k.api_key == 26).unwrap();
    assert_eq!((end_txn.min_version, end_txn.max_version), (0, 4));
    assert!(r.api_keys.iter().any(|k| k.api_key == 24));

    // A version from the future: the answer is v0 with UNSUPPORTED_VERSION and our ranges.
    let cid = c.send(&ApiVersionsRequest::default(), 3).await;
    let _ = c.recv::<ApiVersionsRequest>(3, cid).await;
    let mut body = BytesMut::new();
    body.put_i16(18);
    body.put_i16(99);
    body.put_i32(77);
    body.put_i16(-1); // null client id
    c.send_raw(&body).await;
    let mut frame = c.read_frame().await.unwrap();
    assert_eq!(frame.get_i32(), 77);
    let r = ApiVersionsResponse::decode(&mut frame, 0).unwrap();
    assert_eq!(r.error_code, 35);
    assert!(!r.api_keys.is_empty());
}

#[tokio::test]
async fn out_of_order_transaction_calls_get_kafkas_errors() {
    let (_dir, server) = standalone();
    let mut c = Conn::open(server.kafka.unwrap()).await;
    create_topic(&mut c, "txw", &[]).await;
    let tid = || TransactionalId(StrBytes::from_static_str("wire-txn"));
    let init = |timeout| {
        InitProducerIdRequest::default()
            .with_transactional_id(Some(tid()))
            .with_transaction_timeout_ms(timeout)
    };
    // Above transaction_max_timeout_ms (15 minutes by default).
    let r = c.call(&init(3_600_000), 4).await;
    assert_eq!(r.error_code, 50, "INVALID_TRANSACTION_TIMEOUT");
    let r = c.call(&init(60_000), 4).await;
    assert_eq!(r.error_code, 0);
    let pid = (r.producer_id.0, r.producer_epoch);
    let end = |p: (i64, i16), commit| {
        EndTxnRequest::default()
            .with_transactional_id(tid())
            .with_producer_id(ProducerId(p.0))
            .with_producer_epoch(p.1)
            .with_committed(commit)
    };
    let add = |p: (i64, i16)| {
        AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(tid())
            .with_v3_and_below_producer_id(ProducerId(p.0))
            .with_v3_and_below_producer_epoch(p.1)
            .with_v3_and_below_topics(vec![
                add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                    .with_name(TopicName(StrBytes::from_static_str("txw")))
                    .with_partitions(vec![0]),
            ])
    };
    let add_code = |r: &AddPartitionsToTxnResponse| {
        r.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code
    };
    let txn_produce = |p: (i64, i16), seq, v: &str| {
        produce_request("txw", batch_of(p, seq, &[v], true), -1).with_transactional_id(Some(tid()))
    };
    // Nothing open: EndTxn is INVALID_TXN_STATE, and so is a transactional produce to a
    // partition not added to the transaction.
    assert_eq!(c.call(&end(pid, true), 3).await.error_code, 48);
    let r = c.call(&txn_produce(pid, 0, "early"), 9).await;
    assert_eq!(partition_result(&r).error_code, 48, "INVALID_TXN_STATE");
    // A producer id that is not the transactional id's, then an older epoch.
    let r = c.call(&add((pid.0 + 77, pid.1)), 3).await;
    assert_eq!(add_code(&r), 49, "INVALID_PRODUCER_ID_MAPPING");
    let r = c.call(&add((pid.0, pid.1 - 1)), 3).await;
    assert_eq!(add_code(&r), 90, "PRODUCER_FENCED");
    let r = c.call(&add((pid.0, pid.1 - 1)), 1).await;
    assert_eq!(add_code(&r), 47, "INVALID_PRODUCER_EPOCH before v2");

    // In order: add, produce, commit; a read_committed fetch then sees the record and the
    // marker, with the stable offset at the end.
    assert_eq!(add_code(&c.call(&add(pid), 3).await), 0);
    let r = c.call(&txn_produce(pid, 0, "kept"), 9).await;
    assert_eq!(partition_result(&r).error_code, 0);
    let fetch = |isolation| {
        FetchRequest::default()
            .with_max_wait_ms(0)
            .with_max_bytes(1 << 20)
            .with_isolation_level(isolation)
            .with_topics(vec![
                fetch_request::FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_static_str("txw")))
                    .with_partitions(vec![
                        fetch_request::FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(0)
                            .with_partition_max_bytes(1 << 20),
                    ]),
            ])
    };
    let open = c.call(&fetch(1), 11).await;
    let p = &open.responses[0].partitions[0];
    assert_eq!((p.high_watermark, p.last_stable_offset), (1, 0));
    assert!(p.records.as_ref().is_none_or(|r| r.is_empty()));
    assert_eq!(c.call(&end(pid, true), 3).await.error_code, 0);
    // A retried commit succeeds; an abort of a committed transaction does not.
    assert_eq!(c.call(&end(pid, true), 3).await.error_code, 0);
    assert_eq!(c.call(&end(pid, false), 3).await.error_code, 48);
    let done = c.call(&fetch(1), 11).await;
    let p = &done.responses[0].partitions[0];
    assert_eq!((p.high_watermark, p.last_stable_offset), (2, 2));
    assert_eq!(p.aborted_transactions.as_deref(), Some(&[][..]));
    let mut records = p.records.clone().unwrap();
    let mut batches = Vec::new();
    while records.has_remaining() {
        batches.push(RecordBatchDecoder::decode(&mut records).unwrap());
    }
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].records[0].value.as_deref(), Some(&b"kept"[..]));
    assert!(batches[1].records[0].control, "the commit marker");
    // A transactional batch outside a transactional request is refused.
    let r = c
        .call(
            &produce_request("txw", batch_of(pid, 1, &["x"], true), -1),
            9,
        )
        .await;
    assert_eq!(partition_result(&r).error_code, 87, "INVALID_RECORD");
}

#[tokio::test]
async fn an_idempotent_retry_gets_the_original_offset_and_gaps_and_old_epochs_are_refused() {
    let (_dir, server) = standalone();
    let mut c = Conn::open(server.kafka.unwrap()).await;
    create_topic(&mut c, "idem", &[]).await;
    let init = c
        .call(
            &InitProducerIdRequest::default().with_transaction_timeout_ms(60_000),
            4,
        )
        .await;
    assert_eq!(init.error_code, 0);
    let pid = (init.producer_id.0, init.producer_epoch);
    assert!(pid.0 > 0);

    let first = batch(pid, 0, &["a", "b"]);
    let r = c.call(&produce_request("idem", first.clone(), -1), 9).await;
    assert_eq!(partition_result(&r).error_code, 0);
    assert_eq!(partition_result(&r).base_offset, 0);
    // The client did not see the ack and sends the very same bytes again.
    let r = c.call(&produce_request("idem", first, -1), 9).await;
    assert_eq!(partition_result(&r).error_code, 0);
    assert_eq!(
        partition_result(&r).base_offset,
        0,
        "a duplicate gets the original offset"
    );
    let r = c
        .call(&produce_request("idem", batch(pid, 2, &["c"]), -1), 9)
        .await;
    assert_eq!(partition_result(&r).base_offset, 2);
    // A sequence gap.
    let r = c
        .call(&produce_request("idem", batch(pid, 9, &["x"]), -1), 9)
        .await;
    assert_eq!(
        partition_result(&r).error_code,
        45,
        "OUT_OF_ORDER_SEQUENCE_NUMBER"
    );
    // A newer epoch for the same id fences the old one.
    let bumped = c
        .call(
            &InitProducerIdRequest::default()
                .with_transaction_timeout_ms(60_000)
                .with_producer_id(ProducerId(pid.0))
                .with_producer_epoch(pid.1),
            4,
        )
        .await;
    assert_eq!(bumped.error_code, 0);
    assert_eq!(bumped.producer_epoch, pid.1 + 1);
    // Once the partition has seen the new epoch (sequences restart at 0), the old is fenced.
    let new = (pid.0, bumped.producer_epoch);
    let r = c
        .call(&produce_request("idem", batch(new, 0, &["d"]), -1), 9)
        .await;
    assert_eq!(partition_result(&r).base_offset, 3);
    let r = c
        .call(&produce_request("idem", batch(pid, 3, &["old"]), -1), 9)
        .await;
    assert_eq!(
        partition_result(&r).error_code,
        47,
        "INVALID_PRODUCER_EPOCH"
    );

    // Exactly a, b, c are in the log, at 0, 1, 2.
    let fetch = FetchRequest::default()
        .with_max_wait_ms(100)
        .with_max_bytes(1 << 20)
        .with_topics(vec![
            fetch_request::FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("idem")))
                .with_partitions(vec![
                    fetch_request::FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(1 << 20),
                ]),
        ]);
    let r = c.call(&fetch, 12).await;
    let p = &r.responses[0].partitions[0];
    assert_eq!(p.error_code, 0);
    assert_eq!(p.high_watermark, 4);
    let mut records = p.records.clone().unwrap();
    let mut seen = Vec::new();
    for set in RecordBatchDecoder::decode_all(&mut records).unwrap() {
        for r in set.records {
            seen.push((
                r.offset,
                String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
            ));
        }
    }
    assert_eq!(
        seen,
        vec![
            (0, "a".into()),
            (1, "b".into()),
            (2, "c".into()),
            (3, "d".into())
        ]
    );
}

#[tokio::test]
async fn bad_frames_close_only_their_own_connection() {
    let (_dir, server) = standalone();
    let addr = server.kafka.unwrap();
    let mut healthy = Conn::open(addr).await;
    create_topic(&mut healthy, "bad", &[("max.message.bytes", "2000")]).await;

    // Unknown API key.
    let mut c = Conn::open(addr).await;
    let mut body = BytesMut::new();
    body.put_i16(999);
    body.put_i16(0);
    body.put_i32(1);
    body.put_i16(-1);
    c.send_raw(&body).await;
    assert!(c.closed_by_peer().await);

    // Negative and oversized sizes (the body is never sent).
    for size in [-1i32, 200 * 1024 * 1024] {
        let mut c = Conn::open(addr).await;
        c.stream.write_all(&size.to_be_bytes()).await.unwrap();
        assert!(c.closed_by_peer().await, "size {size}");
    }

    // A frame too short for a header, and one whose body is garbage.
    let mut c = Conn::open(addr).await;
    c.send_raw(&[0, 3]).await;
    assert!(c.closed_by_peer().await);
    let mut c = Conn::open(addr).await;
    let mut body = BytesMut::new();
    body.put_i16(3); // Metadata v12: flexible, so the garbage must parse as compact fields
    body.put_i16(12);
    body.put_i32(5);
    body.put_i16(-1);
    body.extend_from_slice(&[0xff; 13]);
    c.send_raw(&body).await;
    assert!(c.closed_by_peer().await);

    // A version we do not serve of a known API (Produce v2, before Kafka 4.0's floor).
    let mut c = Conn::open(addr).await;
    let mut body = BytesMut::new();
    body.put_i16(0);
    body.put_i16(2);
    body.put_i32(9);
    body.put_i16(-1);
    body.extend_from_slice(&[0; 16]);
    c.send_raw(&body).await;
    assert!(c.closed_by_peer().await);

    // A bad CRC is an error code, and the connection stays usable.
    let mut c = Conn::open(addr).await;
    let mut corrupt = BytesMut::from(&batch((-1, -1), 0, &["payload"])[..]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x55;
    let r = c
        .call(&produce_request("bad", corrupt.freeze(), -1), 9)
        .await;
    assert_eq!(partition_result(&r).error_code, 2, "CORRUPT_MESSAGE");
    // Too large for the topic's max.message.bytes.
    let big = "x".repeat(4000);
    let r = c
        .call(&produce_request("bad", batch((-1, -1), 0, &[&big]), -1), 9)
        .await;
    assert_eq!(partition_result(&r).error_code, 10, "MESSAGE_TOO_LARGE");
    // acks=0 gets no response: the next response is the next request's.
    c.send(
        &produce_request("bad", batch((-1, -1), 0, &["quiet"]), 0),
        9,
    )
    .await;
    let r = c.call(&ApiVersionsRequest::default(), 3).await;
    assert_eq!(r.error_code, 0);

    // Everyone else was served throughout.
    let r = healthy
        .call(&produce_request("bad", batch((-1, -1), 0, &["ok"]), -1), 9)
        .await;
    assert_eq!(partition_result(&r).error_code, 0);
    assert_eq!(
        partition_result(&r).base_offset,
        1,
        "the acks=0 record came first"
    );
}

fn gateway_process(core: SocketAddr) -> Server {
    Server::start(&[
        "gateway".into(),
        "kafka".into(),
        "--core".into(),
        format!("http://{core}"),
        "--kafka-listen".into(),
        "127.0.0.1:0".into(),
    ])
}

fn join_request(member: &str) -> JoinGroupRequest {
    JoinGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_static_str("shared")))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(10_000)
        .with_member_id(StrBytes::from_string(member.into()))
        .with_protocol_type(StrBytes::from_static_str("consumer"))
        .with_protocols(vec![
            join_group_request::JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str("range"))
                .with_metadata(Bytes::from(member.to_string())),
        ])
}

#[tokio::test]
async fn two_gateway_processes_serve_one_group_through_one_core() {
    let dir = tempfile::tempdir().unwrap();
    let core = Server::start(&[
        "core".into(),
        "--data-dir".into(),
        dir.path().join("data").display().to_string(),
        "--core-listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "off".into(),
        "--group-initial-rebalance-delay-ms".into(),
        "0".into(),
    ]);
    let g1 = gateway_process(core.core);
    let g2 = gateway_process(core.core);
    let mut c1 = Conn::open(g1.kafka.unwrap()).await;
    let mut c2 = Conn::open(g2.kafka.unwrap()).await;

    // KIP-394: the first JoinGroup hands out a member id.
    let r = c1.call(&join_request(""), 9).await;
    assert_eq!(r.error_code, 79, "MEMBER_ID_REQUIRED");
    let m1 = r.member_id.to_string();
    let r = c1.call(&join_request(&m1), 9).await;
    assert_eq!((r.error_code, r.generation_id), (0, 1));
    let sync = |member: &str, generation: i32, assign: Vec<(&str, &str)>| {
        SyncGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("shared")))
            .with_member_id(StrBytes::from_string(member.into()))
            .with_generation_id(generation)
            .with_assignments(
                assign
                    .into_iter()
                    .map(|(m, a)| {
                        sync_group_request::SyncGroupRequestAssignment::default()
                            .with_member_id(StrBytes::from_string(m.into()))
                            .with_assignment(Bytes::from(a.to_string()))
                    })
                    .collect(),
            )
    };
    let r = c1.call(&sync(&m1, 1, vec![(&m1, "all")]), 5).await;
    assert_eq!(&r.assignment[..], b"all");

    // A second member through the other gateway starts a rebalance that the first learns of
    // by heartbeat, through its own gateway.
    let m2 = "second-member";
    let c2_join = c2.send(&join_request(m2), 9).await;
    let heartbeat = HeartbeatRequest::default()
        .with_group_id(GroupId(StrBytes::from_static_str("shared")))
        .with_member_id(StrBytes::from_string(m1.clone()))
        .with_generation_id(1);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = c1.call(&heartbeat, 4).await;
        if r.error_code == 27 {
            break; // REBALANCE_IN_PROGRESS
        }
        assert_eq!(r.error_code, 0);
        assert!(tokio::time::Instant::now() < deadline, "no rebalance seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = c1.call(&join_request(&m1), 9).await;
    let follower = c2.recv::<JoinGroupRequest>(9, c2_join).await;
    assert_eq!((leader.generation_id, follower.generation_id), (2, 2));
    assert_eq!(leader.leader.as_str(), m1);
    assert_eq!(leader.members.len(), 2, "the leader sees both members");
    assert!(follower.members.is_empty());
    let c2_sync = c2.send(&sync(m2, 2, vec![]), 5).await;
    c1.call(&sync(&m1, 2, vec![(&m1, "p0"), (m2, "p1")]), 5)
        .await;
    let r = c2.recv::<SyncGroupRequest>(5, c2_sync).await;
    assert_eq!(&r.assignment[..], b"p1");

    // Either gateway describes the same group.
    let d = c2
        .call(
            &DescribeGroupsRequest::default()
                .with_groups(vec![GroupId(StrBytes::from_static_str("shared"))]),
            5,
        )
        .await;
    assert_eq!(d.groups[0].group_state.as_str(), "Stable");
    assert_eq!(d.groups[0].members.len(), 2);
}

#[tokio::test]
async fn produced_records_are_counted_in_the_listener_traffic_metrics() {
    let (_dir, server) = standalone();
    let admin = server.admin.unwrap();
    let mut c = Conn::open(server.kafka.unwrap()).await;
    create_topic(&mut c, "counted", &[]).await;
    let init = c
        .call(
            &InitProducerIdRequest::default().with_transaction_timeout_ms(60_000),
            4,
        )
        .await;
    let pid = (init.producer_id.0, init.producer_epoch);
    let r = c
        .call(
            &produce_request("counted", batch(pid, 0, &["a", "b", "c"]), -1),
            9,
        )
        .await;
    assert_eq!(partition_result(&r).error_code, 0);
    let series = "tributary_messages_in_total{listener=\"kafka\",protocol=\"kafka\"}";
    tokio::task::spawn_blocking(move || common::wait_metric(admin, series, 3.0))
        .await
        .unwrap();
}

/// Logs in with SASL/PLAIN (handshake v1, authenticate v2).
async fn sasl_plain(c: &mut Conn, user: &str, password: &str) {
    let r = c
        .call(
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
            1,
        )
        .await;
    assert_eq!(r.error_code, 0);
    let token = format!("\0{user}\0{password}");
    let r = c
        .call(
            &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token.into_bytes())),
            2,
        )
        .await;
    assert_eq!(r.error_code, 0, "{user} logs in: {:?}", r.error_message);
}

#[tokio::test]
async fn scram_credential_apis_are_refused_without_alter_or_describe_on_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let credential = |p: &str| {
        use tributary_gateway_common::auth::{ScramCredential, ScramHash};
        ScramCredential::derive(ScramHash::Sha256, p, 4096).to_text()
    };
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "kafka_super_users = [\"admin\"]\n[[users]]\nname = \"admin\"\ncredentials = [\"{}\"]\n[[users]]\nname = \"alice\"\ncredentials = [\"{}\"]\n",
            credential("admin-pw"),
            credential("alice-pw")
        ),
    )
    .unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--kafka-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    args.extend([
        "--kafka-sasl".into(),
        "--kafka-authorizer".into(),
        "--config".into(),
        config.display().to_string(),
    ]);
    let server = Server::start(&args);
    let addr = server.kafka.unwrap();

    let mut alice = Conn::open(addr).await;
    sasl_plain(&mut alice, "alice", "alice-pw").await;
    let r = alice
        .call(&DescribeUserScramCredentialsRequest::default(), 0)
        .await;
    assert_eq!(r.error_code, 31, "CLUSTER_AUTHORIZATION_FAILED at the top");
    assert!(r.results.is_empty());
    let upsert = alter_user_scram_credentials_request::ScramCredentialUpsertion::default()
        .with_name(StrBytes::from_static_str("mallory"))
        .with_mechanism(1)
        .with_iterations(4096)
        .with_salt(Bytes::from_static(b"salt"))
        .with_salted_password(Bytes::from_static(&[7u8; 32]));
    let r = alice
        .call(
            &AlterUserScramCredentialsRequest::default().with_upsertions(vec![upsert.clone()]),
            0,
        )
        .await;
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].error_code, 31);

    // The super user may; an unknown mechanism is refused per user.
    let mut admin = Conn::open(addr).await;
    sasl_plain(&mut admin, "admin", "admin-pw").await;
    let r = admin
        .call(
            &AlterUserScramCredentialsRequest::default().with_upsertions(vec![
                upsert.clone(),
                upsert
                    .clone()
                    .with_name(StrBytes::from_static_str("bad-mech"))
                    .with_mechanism(9),
            ]),
            0,
        )
        .await;
    let codes: Vec<(String, i16)> = r
        .results
        .iter()
        .map(|r| (r.user.to_string(), r.error_code))
        .collect();
    assert_eq!(
        codes,
        [("mallory".to_string(), 0), ("bad-mech".to_string(), 33)],
        "UNSUPPORTED_SASL_MECHANISM for mechanism 9"
    );
    let r = admin
        .call(
            &DescribeUserScramCredentialsRequest::default().with_users(Some(vec![
                describe_user_scram_credentials_request::UserName::default()
                    .with_name(StrBytes::from_static_str("mallory")),
            ])),
            0,
        )
        .await;
    assert_eq!(r.error_code, 0);
    assert_eq!(r.results[0].credential_infos.len(), 1);
    assert_eq!(r.results[0].credential_infos[0].iterations, 4096);
}

/// (partition, offset, leader epoch) to commit.
type Commit = (i32, i64, i32);

fn offset_commit(group: &str, topics: &[(&str, &[Commit])]) -> OffsetCommitRequest {
    OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(
            topics
                .iter()
                .map(|(name, parts)| {
                    offset_commit_request::OffsetCommitRequestTopic::default()
                        .with_name(TopicName(StrBytes::from_string(name.to_string())))
                        .with_partitions(
                            parts
                                .iter()
                                .map(|(p, offset, epoch)| {
                                    offset_commit_request::OffsetCommitRequestPartition::default()
                                        .with_partition_index(*p)
                                        .with_committed_offset(*offset)
                                        .with_committed_leader_epoch(*epoch)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
}

/// (topic, partition) -> error code of an OffsetCommit answer.
fn commit_codes(r: &OffsetCommitResponse) -> Vec<(String, i32, i16)> {
    r.topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (t.name.to_string(), p.partition_index, p.error_code))
        })
        .collect()
}

#[tokio::test]
async fn offset_commit_refuses_unknown_topics_and_partitions_and_fetch_returns_the_epoch() {
    let (_dir, server) = standalone();
    let mut c = Conn::open(server.kafka.unwrap()).await;
    create_topic(&mut c, "orders", &[]).await;

    // One request: a known partition (committed), a partition beyond the topic's one, and a
    // topic that does not exist, each UNKNOWN_TOPIC_OR_PARTITION (3) as in Kafka.
    let req = offset_commit(
        "billing",
        &[
            ("orders", &[(0, 5, 7), (1, 1, -1)]),
            ("no-such-topic", &[(0, 2, -1)]),
        ],
    );
    let r = c.call(&req, 8).await;
    assert_eq!(
        commit_codes(&r),
        vec![
            ("orders".into(), 0, 0),
            ("orders".into(), 1, 3),
            ("no-such-topic".into(), 0, 3),
        ]
    );

    // The committed leader epoch comes back (v5+), -1 where nothing was committed.
    let fetch = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_static_str("billing")))
        .with_topics(Some(vec![
            offset_fetch_request::OffsetFetchRequestTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("orders")))
                .with_partition_indexes(vec![0, 1]),
        ]));
    let r = c.call(&fetch, 7).await;
    assert_eq!(r.error_code, 0);
    let got: Vec<(i32, i64, i32, i16)> = r.topics[0]
        .partitions
        .iter()
        .map(|p| {
            (
                p.partition_index,
                p.committed_offset,
                p.committed_leader_epoch,
                p.error_code,
            )
        })
        .collect();
    assert_eq!(got, vec![(0, 5, 7, 0), (1, -1, -1, 0)]);
    // The same through the v8+ shape (several groups per request).
    let fetch = OffsetFetchRequest::default().with_groups(vec![
        offset_fetch_request::OffsetFetchRequestGroup::default()
            .with_group_id(GroupId(StrBytes::from_static_str("billing")))
            .with_topics(None),
    ]);
    let r = c.call(&fetch, 8).await;
    let p = &r.groups[0].topics[0].partitions[0];
    assert_eq!(
        (
            p.partition_index,
            p.committed_offset,
            p.committed_leader_epoch
        ),
        (0, 5, 7)
    );
    // A commit without an epoch (OffsetCommit before v6 has none) replaces it: -1.
    let r = c
        .call(&offset_commit("billing", &[("orders", &[(0, 6, -1)])]), 5)
        .await;
    assert_eq!(commit_codes(&r), vec![("orders".into(), 0, 0)]);
    let r = c.call(&fetch, 8).await;
    let p = &r.groups[0].topics[0].partitions[0];
    assert_eq!((p.committed_offset, p.committed_leader_epoch), (6, -1));

    // A commit that names only unknown topics changes nothing: no group appears.
    let r = c
        .call(
            &offset_commit("ghosts", &[("no-such-topic", &[(0, 1, -1)])]),
            8,
        )
        .await;
    assert_eq!(commit_codes(&r), vec![("no-such-topic".into(), 0, 3)]);
    let groups = c.call(&ListGroupsRequest::default(), 4).await;
    let names: Vec<&str> = groups.groups.iter().map(|g| g.group_id.as_str()).collect();
    assert_eq!(names, vec!["billing"]);
}

#[tokio::test]
async fn join_group_takes_the_configured_session_timeout_bounds() {
    let join = |timeout: i32| join_request("").with_session_timeout_ms(timeout);
    // Kafka's defaults: 6 s to 30 min.
    let (_dir, server) = standalone();
    let mut c = Conn::open(server.kafka.unwrap()).await;
    for (timeout, code) in [(5_999, 26), (6_000, 79), (1_800_000, 79), (1_800_001, 26)] {
        let r = c.call(&join(timeout), 9).await;
        assert_eq!(r.error_code, code, "session timeout {timeout}");
    }
    drop(c);
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--kafka-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    args.extend([
        "--group-min-session-timeout-ms".into(),
        "1000".into(),
        "--group-max-session-timeout-ms".into(),
        "20000".into(),
    ]);
    let server = Server::start(&args);
    let mut c = Conn::open(server.kafka.unwrap()).await;
    // INVALID_SESSION_TIMEOUT (26) outside the bounds; inside, KIP-394's MEMBER_ID_REQUIRED
    // (79) shows the session timeout passed.
    for (timeout, code) in [(999, 26), (1_000, 79), (20_000, 79), (20_001, 26)] {
        let r = c.call(&join(timeout), 9).await;
        assert_eq!(r.error_code, code, "session timeout {timeout}");
    }
}

/// Produce requests a client pipelines on one connection wait for durability together. With
/// the log acknowledged in the object store (one WAL object per upload window), five
/// idempotent produces sent back to back are made durable by one upload, not one window
/// each; they are answered in request order with consecutive offsets, and a request sent
/// after them is answered after them and sees what they wrote.
#[tokio::test]
async fn pipelined_produces_share_one_upload_and_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    let file = dir.path().join("shared.toml");
    std::fs::write(
        &file,
        format!(
            "storage = \"opendal\"\nopendal_ack = \"shared\"\nopendal_upload_interval_ms = 2000\n\
             [opendal]\nscheme = \"fs\"\nroot = \"{}\"\n",
            bucket.display()
        ),
    )
    .unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--kafka-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    args.extend(["--config".into(), file.display().to_string()]);
    let server = Server::start(&args);
    let mut c = Conn::open(server.kafka.unwrap()).await;
    create_topic(&mut c, "piped", &[]).await;
    let init = c
        .call(
            &InitProducerIdRequest::default().with_transaction_timeout_ms(60_000),
            4,
        )
        .await;
    assert_eq!(init.error_code, 0);
    let pid = (init.producer_id.0, init.producer_epoch);

    let wal_objects = || common::file_sizes_with_extension(&bucket, "wal").len();
    let before = wal_objects();
    let mut sent = Vec::new();
    for i in 0..5 {
        let records = batch(pid, i * 2, &["a", "b"]);
        sent.push(c.send(&produce_request("piped", records, -1), 9).await);
    }
    let list = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![
            list_offsets_request::ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("piped")))
                .with_partitions(vec![
                    list_offsets_request::ListOffsetsPartition::default()
                        .with_partition_index(0)
                        .with_timestamp(-1),
                ]),
        ]);
    let listed = c.send(&list, 6).await;
    for (i, correlation) in sent.into_iter().enumerate() {
        let r = c.recv::<ProduceRequest>(9, correlation).await;
        assert_eq!(partition_result(&r).error_code, 0, "produce {i}");
        assert_eq!(
            partition_result(&r).base_offset,
            i as i64 * 2,
            "produce {i}"
        );
    }
    let r = c.recv::<ListOffsetsRequest>(6, listed).await;
    assert_eq!(
        r.topics[0].partitions[0].offset, 10,
        "the end after all five"
    );
    assert_eq!(
        wal_objects() - before,
        1,
        "the five produces were made durable by one WAL upload"
    );
}

/// The streams of `namespace`, by name, as the core lists them.
async fn stream_names(server: &Server, namespace: &str) -> Vec<String> {
    let mut admin = server.client().admin;
    let mut names: Vec<String> = admin
        .list_streams(tributary_proto::v1::ListStreamsRequest {
            namespace: namespace.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .streams
        .into_iter()
        .filter_map(|s| s.id.map(|id| id.name))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_gateway_serves_the_namespace_it_is_given() {
    // In the server: the namespace is made before the gateway listens.
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--kafka-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    args.extend(["--gateway-namespace".into(), "tenant_a".into()]);
    let server = Server::start(&args);
    let mut c = Conn::open(server.kafka.unwrap()).await;
    create_topic(&mut c, "orders", &[]).await;
    assert_eq!(stream_names(&server, "tenant_a").await, ["orders"]);
    assert!(stream_names(&server, "default").await.is_empty());

    // A gateway process makes its namespace in the core it is pointed at.
    let g = Server::start(&[
        "gateway".into(),
        "kafka".into(),
        "--core".into(),
        format!("http://{}", server.core),
        "--kafka-listen".into(),
        "127.0.0.1:0".into(),
        "--gateway-namespace".into(),
        "tenant_b".into(),
    ]);
    let mut admin = server.client().admin;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = admin
            .list_namespaces(tributary_proto::v1::ListNamespacesRequest {})
            .await
            .unwrap()
            .into_inner()
            .namespaces;
        if listed.iter().any(|n| n.name == "tenant_b") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not make its namespace: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = Conn::open(g.kafka.unwrap()).await;
    create_topic(&mut c, "payments", &[]).await;
    assert_eq!(stream_names(&server, "tenant_b").await, ["payments"]);
    assert_eq!(stream_names(&server, "tenant_a").await, ["orders"]);

    // A name the core would refuse stops the start with one line naming the setting.
    let (code, stderr) = common::run_expect_failure(&[
        "--data-dir".into(),
        dir.path().join("other").display().to_string(),
        "--gateway-namespace".into(),
        String::new(),
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("gateway_namespace"), "{stderr}");
}
