//! Benchmarks of the Kafka gateway's per-request CPU work, without sockets or a core:
//! decoding a whole Produce frame with `decode_frame` (what the connection loop and the
//! fuzzer call), splitting and checking the record batches of one partition with
//! `batch::split_batches`, and building plus encoding a Fetch response of ~1 MiB of stored
//! batches with `batch::append_stored` and `encode_response`.
//!
//! Run with `cargo bench -p tributary-gateway-kafka --bench codec`. Produce and Fetch use the
//! highest versions the gateway advertises (`versions::SUPPORTED`). Batches are uncompressed
//! v2 record batches of 16 records x 1 KiB and of 100 records x 100 B; throughput is bytes
//! of record batches.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput};
use indexmap::IndexMap;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchResponse, ProduceRequest, RequestHeader, RequestKind, ResponseKind,
    TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tributary_gateway_kafka::{batch, decode_frame, encode_response, versions};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// (records per batch, value bytes per record).
const SHAPES: [(usize, usize); 2] = [(16, KIB), (100, 100)];
const FETCH_BYTES: usize = MIB;
/// Fetch v13+ names topics by id only; any non-nil id does.
const TOPIC_ID: uuid::Uuid = uuid::Uuid::from_u128(0x7472_6962_7574_6172_795f_6265_6e63_6801);

fn max_version(api: ApiKey) -> i16 {
    versions::range(api).expect("the gateway serves this API").1
}

fn shape_name((records, value): (usize, usize)) -> String {
    if value >= KIB {
        format!("{records}x{}KiB", value / KIB)
    } else {
        format!("{records}x{value}B")
    }
}

/// One uncompressed v2 batch as a Kafka producer would send it.
fn record_batch((count, value_len): (usize, usize)) -> Bytes {
    let records: Vec<Record> = (0..count)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            // Idempotent, as Kafka clients are by default since 3.0. The encoder also starts
            // a new batch wherever offset - sequence changes, so sequence -1 would give one
            // batch per record.
            producer_id: 1,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: i as i32,
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(Bytes::from(
                (0..value_len)
                    .map(|j| ((i * 131 + j * 31) % 251) as u8)
                    .collect::<Vec<u8>>(),
            )),
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
    .expect("encode record batch");
    buf.freeze()
}

/// A Produce frame after the 4-byte size prefix, i.e. what `decode_frame` is handed.
fn produce_frame(records: Bytes, version: i16) -> Bytes {
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("bench-producer")));
    let request = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str("bench")))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(records)),
                ]),
        ]);
    let mut frame = BytesMut::new();
    header
        .encode(&mut frame, ApiKey::Produce.request_header_version(version))
        .expect("encode request header");
    request
        .encode(&mut frame, version)
        .expect("encode produce request");
    frame.freeze()
}

fn bench_produce(c: &mut Criterion) {
    let version = max_version(ApiKey::Produce);
    let mut decode = c.benchmark_group("produce_decode_frame");
    decode
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for shape in SHAPES {
        let records = record_batch(shape);
        let frame = produce_frame(records.clone(), version);
        // A frame that does not decode would make every number below meaningless.
        match decode_frame(frame.clone()) {
            Ok((_, RequestKind::Produce(r))) => assert_eq!(
                r.topic_data[0].partition_data[0].records.as_ref(),
                Some(&records)
            ),
            other => panic!("produce frame did not decode: {other:?}"),
        }
        decode.throughput(Throughput::Bytes(records.len() as u64));
        decode.bench_function(
            BenchmarkId::new(format!("v{version}"), shape_name(shape)),
            |b| {
                // Cloning `Bytes` is a reference-count bump; the connection loop also hands over
                // an owned frame.
                b.iter(|| decode_frame(std::hint::black_box(frame.clone())))
            },
        );
    }
    decode.finish();

    let mut split = c.benchmark_group("split_batches");
    split
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for shape in SHAPES {
        let records = record_batch(shape);
        let parsed = batch::split_batches(records.clone()).expect("a valid batch");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0.record_count as usize, shape.0);
        split.throughput(Throughput::Bytes(records.len() as u64));
        split.bench_function(shape_name(shape), |b| {
            b.iter(|| batch::split_batches(std::hint::black_box(records.clone())))
        });
    }
    split.finish();
}

/// What the gateway does per Fetch once the core has answered: copy each stored batch into
/// the partition's records with its assigned offset, wrap it in a response, encode it.
fn fetch_response_bytes(stored: &[Bytes], records_per_batch: i64, version: i16) -> Bytes {
    let mut records = BytesMut::with_capacity(stored.iter().map(Bytes::len).sum());
    for (i, b) in stored.iter().enumerate() {
        batch::append_stored(&mut records, b, i as i64 * records_per_batch);
    }
    let end = stored.len() as i64 * records_per_batch;
    let partition = PartitionData::default()
        .with_partition_index(0)
        .with_high_watermark(end)
        .with_last_stable_offset(end)
        .with_log_start_offset(0)
        .with_preferred_read_replica(BrokerId(-1))
        .with_records(Some(records.freeze()));
    let response = FetchResponse::default().with_responses(vec![
        FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str("bench")))
            .with_topic_id(TOPIC_ID)
            .with_partitions(vec![partition]),
    ]);
    encode_response(ApiKey::Fetch, version, 7, &ResponseKind::Fetch(response))
        .expect("encode fetch response")
}

fn bench_fetch(c: &mut Criterion) {
    let version = max_version(ApiKey::Fetch);
    let mut group = c.benchmark_group("fetch_encode_response");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for shape in SHAPES {
        let one = record_batch(shape);
        let count = FETCH_BYTES.div_ceil(one.len());
        // Separate allocations, as batches read from the log are.
        let stored: Vec<Bytes> = (0..count).map(|_| Bytes::copy_from_slice(&one)).collect();
        let payload = (count * one.len()) as u64;
        let encoded = fetch_response_bytes(&stored, shape.0 as i64, version);
        assert!(encoded.len() as u64 > payload);
        group.throughput(Throughput::Bytes(payload));
        let id = BenchmarkId::new(
            format!("v{version}"),
            format!("{count}_batches_of_{}", shape_name(shape)),
        );
        group.bench_function(id, |b| {
            b.iter(|| fetch_response_bytes(std::hint::black_box(&stored), shape.0 as i64, version))
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_produce(&mut c);
    bench_fetch(&mut c);
    c.final_summary();
}
