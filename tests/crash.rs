//! Acknowledged appends survive `kill -9`: a child server takes concurrent appends, is
//! killed with SIGKILL at a random moment, restarts on the same data directory, and every
//! acknowledged record is there, at its acknowledged offset, in order, exactly once.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Server, free_port_args};
use rand::Rng;
use tributary_proto::v1;

const ROUNDS: usize = 20;
const WRITERS: usize = 6;

/// (writer, sequence, offset) of every acknowledged append.
#[derive(Default)]
struct Acked(std::sync::Mutex<Vec<(usize, u64, i64)>>);

fn sid() -> Option<v1::StreamId> {
    Some(v1::StreamId::new("default", "crash"))
}

fn value(round: usize, writer: usize, seq: u64) -> String {
    format!("r{round}-w{writer}-s{seq}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    sigkill_rounds(free_port_args(dir.path()), ROUNDS).await;
}

/// The same on the object-store log (a filesystem bucket through OpenDAL), acknowledging
/// once the object store holds each append, with segments sealed and uploaded every 300 ms
/// so that kills land around uploads, evictions and WAL collection too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill_on_the_object_store_log() {
    let dir = tempfile::tempdir().unwrap();
    sigkill_rounds(object_log_args(dir.path(), "shared"), ROUNDS).await;
    assert_segments_shipped(dir.path());
}

/// The object-store log acknowledging once the local cache has fsynced (`opendal_ack =
/// local`): a restart on the same data directory joins the cache (ahead of the bucket) with
/// the segments shipped before the kill. Fewer rounds, to keep it short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill_on_the_object_store_log_with_local_ack() {
    let dir = tempfile::tempdir().unwrap();
    sigkill_rounds(object_log_args(dir.path(), "local"), 8).await;
    assert_segments_shipped(dir.path());
}

/// The rounds went through the object store, not only the cache: segments were shipped.
fn assert_segments_shipped(dir: &std::path::Path) {
    fn logs(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .map(|e| e.unwrap().path())
                .map(|p| {
                    if p.is_dir() {
                        logs(&p)
                    } else {
                        usize::from(p.extension().is_some_and(|x| x == "log"))
                    }
                })
                .sum()
        })
    }
    let shipped = logs(&dir.join("bucket").join("segments"));
    assert!(shipped > 0, "no segment object in the bucket");
}

/// Server arguments for the object-store log on a filesystem bucket under `dir`.
fn object_log_args(dir: &std::path::Path, ack: &str) -> Vec<String> {
    let config = dir.join("opendal.toml");
    std::fs::write(
        &config,
        format!(
            "storage = \"opendal\"\nopendal_ack = \"{ack}\"\nopendal_seal_interval_ms = 300\n\
             opendal_upload_interval_ms = 20\n[opendal]\nscheme = \"fs\"\nroot = \"{}\"\n",
            dir.join("bucket").display()
        ),
    )
    .unwrap();
    let mut args = free_port_args(dir);
    args.extend(["--config".into(), config.display().to_string()]);
    args
}

async fn sigkill_rounds(mut args: Vec<String>, rounds: usize) {
    // Small segments so that kills also land around segment rolls.
    args.extend(["--segment-bytes".into(), "1048576".into()]);
    let mut acked_total: Vec<(String, i64)> = Vec::new();
    let mut rng = rand::rng();

    for round in 0..rounds {
        let server = Server::start(&args);
        let client = server.client();
        if round == 0 {
            client
                .admin
                .clone()
                .create_stream(v1::CreateStreamRequest {
                    id: sid(),
                    partitions: 1,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        // Everything acknowledged in earlier rounds is still there, exactly once.
        verify(&client, &acked_total).await;

        let acked = Arc::new(Acked::default());
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut streams = client.streams.clone();
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                for seq in 0u64.. {
                    let size = 100 + (seq as usize * 7919 + w * 104729) % 20_000;
                    let mut v = value(round, w, seq).into_bytes();
                    v.resize(size, b'.');
                    let batch = v1::RecordBatch {
                        records: vec![v1::Record {
                            value: Bytes::from(v),
                            ..Default::default()
                        }],
                        ..Default::default()
                    };
                    let req = v1::AppendRequest {
                        stream: sid(),
                        partition: 0,
                        batch: Some(batch),
                        auto_create: false,
                        defer_durable: false,
                    };
                    match streams.append(req).await {
                        Ok(r) => acked
                            .0
                            .lock()
                            .unwrap()
                            .push((w, seq, r.into_inner().base_offset)),
                        Err(_) => return, // the server died under us
                    }
                }
            }));
        }
        // Let some appends be acknowledged, then kill at a random moment.
        let wanted = rng.random_range(1..200);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while acked.0.lock().unwrap().len() < wanted {
            assert!(tokio::time::Instant::now() < deadline, "appends stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..20_000))).await;
        server.kill9();
        for w in writers {
            w.await.unwrap();
        }
        let acked = std::mem::take(&mut *acked.0.lock().unwrap());
        // Per writer, acknowledgements come in sequence order with rising offsets.
        let mut per_writer: HashMap<usize, Vec<(u64, i64)>> = HashMap::new();
        for (w, seq, off) in &acked {
            per_writer.entry(*w).or_default().push((*seq, *off));
        }
        for list in per_writer.values() {
            assert!(
                list.windows(2)
                    .all(|p| p[0].0 + 1 == p[1].0 && p[0].1 < p[1].1),
                "{list:?}"
            );
        }
        acked_total.extend(
            acked
                .into_iter()
                .map(|(w, seq, off)| (value(round, w, seq), off)),
        );
    }
    let server = Server::start(&args);
    verify(&server.client(), &acked_total).await;
    assert!(
        acked_total.len() >= rounds,
        "each round acknowledged something"
    );
}

/// Reads the whole partition and checks every acknowledged record is at its offset, and no
/// record appears twice.
async fn verify(client: &tributary_gateway_common::CoreClient, acked: &[(String, i64)]) {
    let mut streams = client.streams.clone();
    let mut by_offset: HashMap<i64, String> = HashMap::new();
    let mut seen: HashMap<String, i64> = HashMap::new();
    let mut at = 0;
    let mut next_expected = 0;
    loop {
        let resp = streams
            .fetch(v1::FetchRequest {
                partitions: vec![v1::FetchPartition {
                    stream: sid(),
                    partition: 0,
                    offset: at,
                    max_bytes: 0,
                }],
                max_bytes: 8 << 20,
                min_bytes: 0,
                max_wait_ms: 0,
                read_committed: false,
            })
            .await
            .unwrap()
            .into_inner();
        let p = &resp.partitions[0];
        assert_eq!(p.error, 0, "{}", p.error_message);
        if p.batches.is_empty() {
            assert_eq!(at, p.end_offset);
            break;
        }
        for b in &p.batches {
            assert_eq!(b.base_offset, next_expected, "offsets are dense");
            next_expected = b.base_offset + i64::from(b.record_count);
            for (i, r) in b.records.iter().enumerate() {
                let v = String::from_utf8_lossy(&r.value);
                let v = v.trim_end_matches('.').to_string();
                let offset = b.base_offset + i as i64;
                assert!(seen.insert(v.clone(), offset).is_none(), "{v} stored twice");
                by_offset.insert(offset, v);
            }
            at = next_expected;
        }
    }
    for (v, off) in acked {
        assert_eq!(
            by_offset.get(off),
            Some(v),
            "acknowledged {v} missing at offset {off}"
        );
    }
}
