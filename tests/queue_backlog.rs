//! A backlog larger than memory: N 1 KiB messages (default 10 million) enqueued with no
//! consumer keep the server's resident memory under 512 MiB; after a restart they drain
//! in order. Ignored by default (it writes N KiB to disk); run it with
//!
//! ```sh
//! TRIBUTARY_BACKLOG_MESSAGES=10000000 cargo test --release --test queue_backlog -- --ignored --nocapture
//! ```
//!
//! It prints the enqueue and drain rates and the largest RSS seen, for the notes.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Server, free_port_args};
use tonic::transport::Channel;
use tributary_proto::v1::{self, admin_client::AdminClient, queues_client::QueuesClient};

const RSS_LIMIT_KIB: u64 = 512 * 1024;
const BATCH: usize = 1000;
const SENDERS: u64 = 4;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn qid() -> Option<v1::QueueId> {
    Some(v1::QueueId {
        namespace: "default".into(),
        name: "backlog".into(),
    })
}

async fn queues(server: &Server) -> QueuesClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", server.core))
        .unwrap()
        .connect()
        .await
        .unwrap();
    QueuesClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes N KiB to disk; run by hand with --ignored (see the module docs)"]
async fn a_backlog_larger_than_memory_stays_on_disk_and_drains_in_order() {
    let total: u64 = std::env::var("TRIBUTARY_BACKLOG_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let per_sender = total / SENDERS;
    let dir = tempfile::tempdir().unwrap();
    let args = free_port_args(dir.path());
    let server = Server::start(&args);
    let pid = server.child.id();
    let channel = Channel::from_shared(format!("http://{}", server.core))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AdminClient::new(channel)
        .declare_queue(v1::DeclareQueueRequest {
            id: qid(),
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();

    let started = Instant::now();
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut q = queues(&server).await;
        senders.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while seq < per_sender {
                let n = (per_sender - seq).min(BATCH as u64);
                let records = (seq..seq + n)
                    .map(|i| {
                        let mut v = format!("{s}:{i}:").into_bytes();
                        v.resize(1024, b'.');
                        v1::Record {
                            value: Bytes::from(v),
                            ..Default::default()
                        }
                    })
                    .collect();
                q.enqueue(v1::EnqueueRequest {
                    queue: qid(),
                    records,
                })
                .await
                .unwrap();
                seq += n;
            }
        }));
    }
    let mut max_rss = 0;
    let watch = async {
        loop {
            max_rss = max_rss.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let all_sent = async {
        for s in senders {
            s.await.unwrap();
        }
    };
    tokio::select! {
        _ = all_sent => {}
        _ = watch => unreachable!(),
    }
    max_rss = max_rss.max(rss_kib(pid));
    let enqueue_secs = started.elapsed().as_secs_f64();
    println!(
        "enqueued {} x 1 KiB in {enqueue_secs:.1} s ({:.0} msg/s); largest RSS {} MiB",
        per_sender * SENDERS,
        (per_sender * SENDERS) as f64 / enqueue_secs,
        max_rss / 1024
    );
    assert!(
        max_rss < RSS_LIMIT_KIB,
        "RSS {max_rss} KiB while enqueueing"
    );

    // Restart (kill -9: nothing is owed to the next process but the log) and drain.
    server.kill9();
    let server = Server::start(&args);
    let pid = server.child.id();
    let mut q = queues(&server).await;
    let mut next = vec![0u64; SENDERS as usize];
    let mut drained = 0u64;
    let mut max_rss_drain = 0;
    let started = Instant::now();
    while drained < per_sender * SENDERS {
        let got = q
            .receive(v1::ReceiveRequest {
                queue: qid(),
                max_messages: BATCH as u32,
                visibility_timeout_ms: 60_000,
                wait_time_ms: 5_000,
                consumer: String::new(),
                no_wait_durable: false,
            })
            .await
            .unwrap()
            .into_inner()
            .messages;
        assert!(!got.is_empty(), "the backlog ran dry at {drained}");
        for m in &got {
            let v = &m.record.as_ref().unwrap().value;
            let text =
                std::str::from_utf8(&v[..v.iter().position(|b| *b == b'.').unwrap()]).unwrap();
            let mut parts = text.split(':');
            let s: usize = parts.next().unwrap().parse().unwrap();
            let i: u64 = parts.next().unwrap().parse().unwrap();
            assert_eq!(i, next[s], "sender {s}'s messages out of order");
            next[s] += 1;
        }
        drained += got.len() as u64;
        let expired = q
            .ack(v1::AckRequest {
                queue: qid(),
                lease_ids: got.iter().map(|m| m.lease_id.clone()).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .expired;
        assert!(expired.is_empty());
        if drained % 100_000 < BATCH as u64 {
            max_rss_drain = max_rss_drain.max(rss_kib(pid));
        }
    }
    let drain_secs = started.elapsed().as_secs_f64();
    println!(
        "drained {drained} in order in {drain_secs:.1} s ({:.0} msg/s); largest RSS while draining {} MiB",
        drained as f64 / drain_secs,
        max_rss_drain / 1024
    );
    assert!(max_rss_drain < RSS_LIMIT_KIB);
}
