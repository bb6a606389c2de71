//! `tributary bench sqs`: SQS producers and consumers through `aws-sdk-sqs`, the Rust SDK
//! users run, against any SQS endpoint (Tributary's SQS gateway, ElasticMQ, ...).
//!
//! The bench creates one queue (standard, or FIFO with `--fifo`), and deletes it at the end
//! whatever happened. Producers loop SendMessage (`--batch 1`) or SendMessageBatch (`--batch`
//! 2..10 entries); consumers loop ReceiveMessage (long polling, `--wait` seconds, up to
//! `--batch` messages) and then DeleteMessage or DeleteMessageBatch of what they received.
//! Every worker has its own client and HTTP connection pool and one request in flight.
//!
//! The stamp (producer, sequence, send time) is the first 40 characters of every body, in hex
//! (SQS bodies are text); the rest is filler up to `--size`. A message counts as sent once
//! the send request succeeded, and as received when a ReceiveMessage returns it (before it is
//! deleted), so the end-to-end latency is send request start to receive answer.
//!
//! FIFO queues: each producer spreads its messages over `--groups` message groups round robin
//! and numbers them per group, so order is checked per (producer, group), which is all FIFO
//! promises; each message has its own deduplication id. Standard queues promise no order and
//! at-least-once delivery: duplicates are reported, not failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::{
    BehaviorVersion, Credentials, Region, SharedHttpClient, StalledStreamProtectionConfig,
};
use aws_sdk_sqs::error::{DisplayErrorContext, SdkError};
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, DeleteMessageBatchRequestEntry, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::tally::Sink;
use crate::traffic::{CLOSE_WAIT, CONNECT_WAIT, Failure, Schedule, conclude, drain, run_suffix};
use crate::{BenchError, BenchOptions, Report, Tally, cpu_ticks, note_cpu, note_rss, now_ns};
use crate::{read_stamp, rss_kib, stamp};

/// Characters of the hex stamp at the start of every body.
pub const BODY_STAMP: usize = 2 * crate::STAMP;
/// SQS's largest message (and SendMessageBatch payload), bytes.
const MAX_PAYLOAD: usize = 262_144;
/// Entries of one SendMessageBatch / DeleteMessageBatch, and messages of one receive, at most.
const MAX_BATCH: usize = 10;
/// The region the bench signs for (Tributary's and ElasticMQ's default).
const REGION: &str = "us-east-1";
/// Keys signed with when AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set: a server
/// without keys configured accepts any signature.
const DEFAULT_KEY: (&str, &str) = ("tributary-bench", "tributary-bench-secret");

/// Checks of the SQS bench's own options.
fn validate(opts: &BenchOptions) -> Result<(), BenchError> {
    opts.validate()?;
    if opts.size < BODY_STAMP {
        return Err(BenchError::Invalid(format!(
            "--size must be at least {BODY_STAMP} bytes for SQS (the stamp, in hex)"
        )));
    }
    if !(1..=MAX_BATCH).contains(&opts.batch) {
        return Err(BenchError::Invalid(format!(
            "--batch must be 1 to {MAX_BATCH} (SQS batches hold at most {MAX_BATCH} entries)"
        )));
    }
    if opts.size * opts.batch > MAX_PAYLOAD {
        return Err(BenchError::Invalid(format!(
            "--size x --batch must be at most {MAX_PAYLOAD} bytes (SQS's payload limit)"
        )));
    }
    if !(1..=20).contains(&opts.wait_seconds) {
        return Err(BenchError::Invalid(
            "--wait must be 1 to 20 seconds (ReceiveMessage's WaitTimeSeconds)".into(),
        ));
    }
    if opts.fifo && opts.groups == 0 {
        return Err(BenchError::Invalid("--groups must be at least 1".into()));
    }
    if opts.topics != 1 {
        return Err(BenchError::Invalid(
            "--topics is not read by the SQS bench (one queue; --queue names it)".into(),
        ));
    }
    endpoint(&opts.target)?;
    Ok(())
}

/// The endpoint URL of `--target`: `HOST:PORT` or `http://HOST:PORT[/]`.
fn endpoint(target: &str) -> Result<String, BenchError> {
    if target.starts_with("https://") {
        return Err(BenchError::Invalid(
            "the SQS bench speaks plain HTTP (its client has no TLS): use http://".into(),
        ));
    }
    let url = if target.contains("://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    if !url.starts_with("http://") || url.len() <= "http://".len() {
        return Err(BenchError::Invalid(format!(
            "--target must be HOST:PORT or http://HOST:PORT, got {target}"
        )));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// The queue a run creates: `--queue`, or a fresh name; FIFO names end in `.fifo`.
fn queue_name(opts: &BenchOptions, suffix: &str) -> String {
    let base = opts
        .queue
        .clone()
        .unwrap_or_else(|| format!("tributary-bench-{suffix}"));
    if opts.fifo && !base.ends_with(".fifo") {
        format!("{base}.fifo")
    } else {
        base
    }
}

/// Ordering lanes per producer: its FIFO message groups, or one.
fn lanes(opts: &BenchOptions) -> usize {
    if opts.fifo { opts.groups } else { 1 }
}

/// One client, with its own connection pool: plain HTTP, static keys, no retries (a failed
/// request fails the run), a timeout above the long poll.
fn client(opts: &BenchOptions, endpoint: &str) -> Client {
    let key = std::env::var("AWS_ACCESS_KEY_ID").ok();
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok();
    let (key, secret) = match (key, secret) {
        (Some(k), Some(s)) => (k, s),
        _ => (DEFAULT_KEY.0.to_string(), DEFAULT_KEY.1.to_string()),
    };
    let http: SharedHttpClient = aws_smithy_http_client::Builder::new().build_http();
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(key, secret, None, None, "tributary-bench"))
        .http_client(http)
        .retry_config(RetryConfig::disabled())
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(u64::from(opts.wait_seconds)) + CONNECT_WAIT)
                .build(),
        )
        .build();
    Client::from_conf(config)
}

/// An SDK error in one line, with its causes.
fn sdk_error<E: std::error::Error + 'static, R: std::fmt::Debug>(
    what: &str,
    e: SdkError<E, R>,
) -> BenchError {
    BenchError::Refused(format!("{what}: {}", DisplayErrorContext(&e)))
}

pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    validate(opts)?;
    let endpoint = endpoint(&opts.target)?;
    let name = queue_name(opts, &run_suffix());
    let admin = client(opts, &endpoint);

    let mut create = admin.create_queue().queue_name(&name);
    if opts.fifo {
        create = create
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "false");
    }
    let url = match tokio::time::timeout(CONNECT_WAIT, create.send()).await {
        Err(_) => return Err(crate::traffic::unreachable(opts, "no CreateQueue answer")),
        // Nothing listening, or nothing answering: the one-line "no broker" error.
        Ok(Err(e @ (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)))) => {
            return Err(crate::traffic::unreachable(opts, DisplayErrorContext(&e)));
        }
        Ok(Err(e)) => return Err(sdk_error(&format!("CreateQueue {name}"), e)),
        Ok(Ok(out)) => match out.queue_url() {
            Some(url) => url.to_string(),
            None => {
                return Err(BenchError::Refused(format!(
                    "CreateQueue {name}: no QueueUrl in the answer"
                )));
            }
        },
    };

    let outcome = traffic(opts, &endpoint, &url).await;
    // Best effort and bounded: the name is unique per run, a leftover only costs memory.
    let _ = tokio::time::timeout(CLOSE_WAIT, admin.delete_queue().queue_url(&url).send()).await;
    outcome
}

async fn traffic(opts: &BenchOptions, endpoint: &str, url: &str) -> Result<Report, BenchError> {
    let lanes = lanes(opts);
    let tally = Arc::new(Tally::new(opts.producers * lanes));
    let failure = Arc::new(Failure::default());
    let (stop_tx, stop) = watch::channel(false);
    let mut report = Report {
        protocol: "sqs".into(),
        qos: 1,
        ..Default::default()
    };
    let before = opts.broker_pid.and_then(rss_kib);
    let cpu_before = opts.broker_pid.and_then(cpu_ticks);

    // Consumers of one queue compete: one sink sees every delivery, so duplicates across
    // consumers count, and (FIFO) order is seen in the order the queue handed messages out.
    let sink = Arc::new(Mutex::new(tally.sink()));
    let mut consumers = JoinSet::new();
    for j in 0..opts.consumers {
        let consumer = Consumer {
            j,
            client: client(opts, endpoint),
            url: url.to_string(),
            batch: opts.batch,
            wait: opts.wait_seconds as i32,
            sink: sink.clone(),
            tally: tally.clone(),
        };
        let (stop, failure) = (stop.clone(), failure.clone());
        consumers.spawn(async move { consumer.run(stop, &failure).await });
    }
    note_rss(&mut report, opts, before);

    let schedule = Arc::new(Schedule::new(opts, &tally, failure.clone()));
    let mut producers = JoinSet::new();
    for p in 0..opts.producers {
        let producer = Producer {
            p,
            client: client(opts, endpoint),
            url: url.to_string(),
            batch: opts.batch,
            size: opts.size,
            groups: opts.fifo.then_some(lanes),
            tally: tally.clone(),
        };
        let (schedule, failure) = (schedule.clone(), failure.clone());
        producers.spawn(async move {
            if let Err(e) = producer.run(&schedule).await {
                failure.set(e);
            }
        });
    }
    let bar = schedule.drive(opts, &tally, &mut producers).await;
    let send_seconds = schedule.start.elapsed().as_secs_f64();
    drain(&tally, &failure, bar.as_ref()).await;
    let elapsed = schedule.start.elapsed();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // A consumer in a long poll drops it: the run is over.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while consumers.join_next().await.is_some() {}
    })
    .await;
    consumers.abort_all();
    tally.absorb(&sink.lock());

    let mut report = conclude(
        report,
        opts,
        &tally,
        &failure,
        elapsed,
        send_seconds,
        opts.fifo,
    )?;
    note_cpu(&mut report, opts, cpu_before);
    Ok(report)
}

/// A body: the hex stamp, then filler up to `size` bytes.
fn body(size: usize, producer: u32, seq: u64, sent_ns: u64) -> String {
    let mut raw = [0u8; crate::STAMP];
    stamp(&mut raw, producer, seq, sent_ns);
    let mut s = String::with_capacity(size);
    for b in raw {
        s.push(char::from_digit(u32::from(b >> 4), 16).expect("nibble"));
        s.push(char::from_digit(u32::from(b & 0xf), 16).expect("nibble"));
    }
    s.extend(std::iter::repeat_n('x', size - BODY_STAMP));
    s
}

/// The stamp of a body, `None` when it is not a bench message.
fn read_body(body: &str) -> Option<[u8; crate::STAMP]> {
    let hex = body.as_bytes().get(..BODY_STAMP)?;
    let mut raw = [0u8; crate::STAMP];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        raw[i] = ((hi << 4) | lo) as u8;
    }
    read_stamp(&raw).map(|_| raw)
}

/// The first failed entry of a batch answer, as an error.
fn batch_failure(what: &str, failed: &[BatchResultErrorEntry]) -> Option<BenchError> {
    failed.first().map(|f| {
        BenchError::Refused(format!(
            "{what}: {} of the batch's entries failed, first {}: {} {}",
            failed.len(),
            f.id(),
            f.code(),
            f.message().unwrap_or("")
        ))
    })
}

/// One producer: one request in flight, `batch` messages per request.
struct Producer {
    p: usize,
    client: Client,
    url: String,
    batch: usize,
    size: usize,
    /// FIFO: message groups each producer spreads its messages over.
    groups: Option<usize>,
    tally: Arc<Tally>,
}

/// One message about to be sent.
struct Outgoing {
    body: String,
    /// FIFO: group and deduplication id.
    fifo: Option<(String, String)>,
}

impl Producer {
    async fn run(&self, schedule: &Schedule) -> Result<(), BenchError> {
        let lanes = self.groups.unwrap_or(1);
        let mut lane_seq = vec![0u64; lanes];
        let mut n = 0u64;
        let mut batch: Vec<Outgoing> = Vec::with_capacity(self.batch);
        let mut more = true;
        while more {
            batch.clear();
            while batch.len() < self.batch {
                if !schedule.next(n).await {
                    more = false;
                    break;
                }
                // Producers start on different groups so that every group is busy.
                let lane = (self.p + n as usize) % lanes;
                let id = (self.p * lanes + lane) as u32;
                let seq = lane_seq[lane];
                lane_seq[lane] += 1;
                n += 1;
                batch.push(Outgoing {
                    body: body(self.size, id, seq, now_ns()),
                    fifo: self
                        .groups
                        .map(|_| (format!("group-{lane}"), format!("{id}-{seq}"))),
                });
            }
            if batch.is_empty() {
                break;
            }
            let at = Instant::now();
            let sent = if self.batch == 1 {
                self.send_one(batch.pop().expect("one message")).await?;
                1
            } else {
                self.send_batch(&mut batch).await?
            };
            for _ in 0..sent {
                self.tally.sent(1);
                self.tally.ack_latency(at);
            }
        }
        Ok(())
    }

    async fn send_one(&self, message: Outgoing) -> Result<(), BenchError> {
        let mut request = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(message.body);
        if let Some((group, dedup)) = message.fifo {
            request = request
                .message_group_id(group)
                .message_deduplication_id(dedup);
        }
        request
            .send()
            .await
            .map_err(|e| sdk_error(&format!("producer {}: SendMessage", self.p), e))?;
        Ok(())
    }

    async fn send_batch(&self, batch: &mut Vec<Outgoing>) -> Result<usize, BenchError> {
        let what = format!("producer {}: SendMessageBatch", self.p);
        let mut entries = Vec::with_capacity(batch.len());
        for (i, message) in batch.drain(..).enumerate() {
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(message.body);
            if let Some((group, dedup)) = message.fifo {
                entry = entry
                    .message_group_id(group)
                    .message_deduplication_id(dedup);
            }
            entries.push(
                entry
                    .build()
                    .map_err(|e| BenchError::Invalid(format!("{what}: {e}")))?,
            );
        }
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error(&what, e))?;
        if let Some(e) = batch_failure(&what, out.failed()) {
            return Err(e);
        }
        Ok(out.successful().len())
    }
}

/// One consumer: receive (long poll), record, delete; one request in flight.
struct Consumer {
    j: usize,
    client: Client,
    url: String,
    batch: usize,
    wait: i32,
    sink: Arc<Mutex<Sink>>,
    tally: Arc<Tally>,
}

impl Consumer {
    async fn run(&self, mut stop: watch::Receiver<bool>, failure: &Failure) {
        let result: Result<(), BenchError> = async {
            loop {
                let received = tokio::select! {
                    biased;
                    _ = stop.changed() => return Ok(()),
                    r = self
                        .client
                        .receive_message()
                        .queue_url(&self.url)
                        .max_number_of_messages(self.batch as i32)
                        .wait_time_seconds(self.wait)
                        .send() => r,
                };
                let out = received
                    .map_err(|e| sdk_error(&format!("consumer {}: ReceiveMessage", self.j), e))?;
                let messages = out.messages();
                if messages.is_empty() {
                    continue;
                }
                {
                    let mut sink = self.sink.lock();
                    for m in messages {
                        if let Some(raw) = m.body().and_then(read_body) {
                            sink.record(&self.tally, &raw);
                        }
                    }
                }
                let handles: Vec<&str> =
                    messages.iter().filter_map(|m| m.receipt_handle()).collect();
                tokio::select! {
                    biased;
                    _ = stop.changed() => return Ok(()),
                    deleted = self.delete(&handles) => deleted?,
                }
            }
        }
        .await;
        if let Err(e) = result
            && !*stop.borrow()
        {
            failure.set(e);
        }
    }

    async fn delete(&self, handles: &[&str]) -> Result<(), BenchError> {
        if let [handle] = handles
            && self.batch == 1
        {
            self.client
                .delete_message()
                .queue_url(&self.url)
                .receipt_handle(*handle)
                .send()
                .await
                .map_err(|e| sdk_error(&format!("consumer {}: DeleteMessage", self.j), e))?;
            return Ok(());
        }
        let what = format!("consumer {}: DeleteMessageBatch", self.j);
        let mut entries = Vec::with_capacity(handles.len());
        for (i, handle) in handles.iter().enumerate() {
            entries.push(
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*handle)
                    .build()
                    .map_err(|e| BenchError::Invalid(format!("{what}: {e}")))?,
            );
        }
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error(&what, e))?;
        match batch_failure(&what, out.failed()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_the_stamp_in_hex() {
        let b = body(64, 7, 99, 123_456);
        assert_eq!(b.len(), 64);
        assert!(b[BODY_STAMP..].bytes().all(|c| c == b'x'));
        let raw = read_body(&b).unwrap();
        assert_eq!(read_stamp(&raw), Some((7, 99, 123_456)));
        assert_eq!(
            read_body("not a bench message at all, but long enough"),
            None
        );
        assert_eq!(read_body("short"), None);
    }

    #[test]
    fn endpoints_and_queue_names() {
        assert_eq!(endpoint("127.0.0.1:9324").unwrap(), "http://127.0.0.1:9324");
        assert_eq!(
            endpoint("http://localhost:9324/").unwrap(),
            "http://localhost:9324"
        );
        assert!(endpoint("https://sqs.us-east-1.amazonaws.com").is_err());
        assert!(endpoint("ftp://x").is_err());
        let fifo = BenchOptions {
            fifo: true,
            queue: Some("q".into()),
            ..Default::default()
        };
        assert_eq!(queue_name(&fifo, "s"), "q.fifo");
        assert_eq!(
            queue_name(&BenchOptions::default(), "s"),
            "tributary-bench-s"
        );
        assert_eq!(lanes(&fifo), 4);
        assert_eq!(lanes(&BenchOptions::default()), 1);
    }

    #[test]
    fn options_sqs_refuses() {
        let ok = BenchOptions {
            target: "127.0.0.1:9324".into(),
            batch: 10,
            ..Default::default()
        };
        validate(&ok).unwrap();
        for bad in [
            BenchOptions {
                batch: 11,
                ..ok.clone()
            },
            BenchOptions {
                batch: 0,
                ..ok.clone()
            },
            BenchOptions {
                size: 30,
                ..ok.clone()
            },
            BenchOptions {
                size: 30_000,
                ..ok.clone()
            },
            BenchOptions {
                wait_seconds: 21,
                ..ok.clone()
            },
            BenchOptions {
                topics: 2,
                ..ok.clone()
            },
        ] {
            assert!(matches!(validate(&bad), Err(BenchError::Invalid(_))));
        }
    }
}
