//! `tributary bench kafka`: librdkafka producers and a consumer group on a fresh topic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{BenchError, BenchOptions, Report, histogram, ms, now_ns, read_stamp, stamp};

/// How long to wait for the broker at start and for stragglers at the end.
const CONNECT_WAIT: Duration = Duration::from_secs(20);
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// Sends in flight per producer before it waits for acks.
const MAX_IN_FLIGHT: usize = 20_000;

/// Per-producer receive state: next expected sequence, counts of anomalies.
#[derive(Default)]
struct Seen {
    next: Vec<u64>,
    duplicates: u64,
    out_of_order: u64,
}

pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    if opts.size < crate::STAMP {
        return Err(BenchError::Invalid(format!(
            "--size must be at least {} bytes (the stamp)",
            crate::STAMP
        )));
    }
    if opts.producers == 0 || opts.consumers == 0 {
        return Err(BenchError::Invalid(
            "--producers and --consumers must be at least 1".into(),
        ));
    }
    let suffix: u32 = rand::random();
    let topic = format!("tributary-bench-{suffix:08x}");
    let group = format!("tributary-bench-{suffix:08x}");
    create_topic(opts, &topic).await?;

    // Consumers first, so they are assigned before the first message is sent.
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Seen {
        next: vec![0; opts.producers],
        ..Default::default()
    }));
    let latency = Arc::new(Mutex::new(histogram()));
    let assigned = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..opts.consumers {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &opts.target)
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .map_err(|e| BenchError::Refused(e.to_string()))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| BenchError::Refused(e.to_string()))?;
        let (stop, received, seen, latency, assigned) = (
            stop.clone(),
            received.clone(),
            seen.clone(),
            latency.clone(),
            assigned.clone(),
        );
        consumers.push(std::thread::spawn(move || {
            let mut counted_assignment = 0u64;
            while !stop.load(Ordering::Acquire) {
                let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                    let now = consumer.assignment().map(|a| a.count() as u64).unwrap_or(0);
                    if now != counted_assignment {
                        assigned.fetch_add(now.wrapping_sub(counted_assignment), Ordering::AcqRel);
                        counted_assignment = now;
                    }
                    continue;
                };
                let Ok(msg) = msg else { continue };
                let Some((producer, seq, sent_ns)) = msg.payload().and_then(read_stamp) else {
                    continue;
                };
                let lat_us = now_ns().saturating_sub(sent_ns) / 1000;
                let _ = latency.lock().record(lat_us.max(1));
                let mut guard = seen.lock();
                let s = &mut *guard;
                if let Some(next) = s.next.get_mut(producer as usize) {
                    if seq == *next {
                        *next += 1;
                        received.fetch_add(1, Ordering::AcqRel);
                    } else if seq < *next {
                        s.duplicates += 1;
                    } else {
                        s.out_of_order += 1;
                        *next = seq + 1;
                        received.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
            consumer.unsubscribe();
        }));
    }
    let deadline = Instant::now() + CONNECT_WAIT;
    while assigned.load(Ordering::Acquire) < opts.partitions as u64 {
        if Instant::now() > deadline {
            stop.store(true, Ordering::Release);
            return Err(BenchError::Refused(format!(
                "the consumer group was not assigned all {} partitions within {} s",
                opts.partitions,
                CONNECT_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let progress = opts.progress.then(|| {
        let bar = indicatif::ProgressBar::new(opts.duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} s  {msg}")
                .expect("valid template"),
        );
        bar
    });

    // Producers: each key is its producer, so its messages keep one partition and one order.
    let acks_hist = Arc::new(Mutex::new(histogram()));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end_at = start + opts.warmup + opts.duration;
    let per_producer_rate = opts
        .rate
        .map(|r| (r as f64 / opts.producers as f64).max(1.0));
    let mut tasks = Vec::new();
    for p in 0..opts.producers {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &opts.target)
            .set("acks", &opts.acks)
            .set("compression.type", &opts.compression)
            .set("linger.ms", "2")
            .set(
                "enable.idempotence",
                if opts.acks == "all" { "true" } else { "false" },
            )
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .map_err(|e| BenchError::Refused(e.to_string()))?;
        let (topic, acks_hist, sent, errors) = (
            topic.clone(),
            acks_hist.clone(),
            sent.clone(),
            errors.clone(),
        );
        let size = opts.size;
        tasks.push(tokio::spawn(async move {
            let key = format!("producer-{p}");
            let mut payload = vec![0u8; size];
            let mut in_flight = FuturesUnordered::new();
            let mut seq = 0u64;
            let begun = Instant::now();
            while Instant::now() < end_at {
                if let Some(rate) = per_producer_rate {
                    let due = begun + Duration::from_secs_f64(seq as f64 / rate);
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                stamp(&mut payload, p as u32, seq, now_ns());
                let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                match producer.send_result(record) {
                    Ok(fut) => {
                        let t = Instant::now();
                        in_flight.push(async move { (fut.await, t) });
                        seq += 1;
                    }
                    Err(_) => {
                        // Queue full: wait for some acks.
                        if let Some((r, t)) = in_flight.next().await {
                            note_ack(r, t, &acks_hist, &sent, &errors);
                        }
                        continue;
                    }
                }
                while in_flight.len() >= MAX_IN_FLIGHT {
                    if let Some((r, t)) = in_flight.next().await {
                        note_ack(r, t, &acks_hist, &sent, &errors);
                    }
                }
            }
            while let Some((r, t)) = in_flight.next().await {
                note_ack(r, t, &acks_hist, &sent, &errors);
            }
        }));
    }
    if let Some(bar) = &progress {
        while Instant::now() < end_at {
            tokio::time::sleep(Duration::from_millis(250)).await;
            bar.set_position(start.elapsed().as_secs().min(bar.length().unwrap_or(0)));
            bar.set_message(format!(
                "{} sent, {} received",
                sent.load(Ordering::Relaxed),
                received.load(Ordering::Relaxed)
            ));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let total_sent = sent.load(Ordering::Acquire);
    let drain_deadline = Instant::now() + DRAIN_WAIT;
    while received.load(Ordering::Acquire) < total_sent && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total_secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    for c in consumers {
        let _ = c.join();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let got = received.load(Ordering::Acquire);
    let failed = errors.load(Ordering::Acquire);
    if failed > 0 {
        return Err(BenchError::Refused(format!(
            "{failed} sends were not acknowledged"
        )));
    }
    if got < total_sent {
        return Err(BenchError::Lost {
            sent: total_sent,
            lost: total_sent - got,
            secs: DRAIN_WAIT.as_secs(),
        });
    }
    let seen = seen.lock();
    if seen.out_of_order > 0 {
        return Err(BenchError::Disorder(seen.out_of_order));
    }
    let lat = latency.lock();
    let acks = acks_hist.lock();
    Ok(Report {
        protocol: "kafka".into(),
        target: opts.target.clone(),
        sent: total_sent,
        received: got,
        duplicates: seen.duplicates,
        out_of_order: seen.out_of_order,
        size: opts.size,
        seconds: total_secs,
        msgs_per_sec: got as f64 / total_secs,
        mb_per_sec: (got as f64 * opts.size as f64) / total_secs / 1e6,
        p50_ms: ms(&lat, 0.5),
        p90_ms: ms(&lat, 0.9),
        p99_ms: ms(&lat, 0.99),
        p999_ms: ms(&lat, 0.999),
        max_ms: lat.max() as f64 / 1000.0,
        ack_p50_ms: ms(&acks, 0.5),
        ack_p99_ms: ms(&acks, 0.99),
    })
}

fn note_ack<T, E>(
    r: Result<Result<T, E>, futures::channel::oneshot::Canceled>,
    t: Instant,
    hist: &Mutex<Histogram<u64>>,
    sent: &AtomicU64,
    errors: &AtomicU64,
) {
    match r {
        Ok(Ok(_)) => {
            let _ = hist.lock().record((t.elapsed().as_micros() as u64).max(1));
            sent.fetch_add(1, Ordering::AcqRel);
        }
        _ => {
            errors.fetch_add(1, Ordering::AcqRel);
        }
    }
}

async fn create_topic(opts: &BenchOptions, topic: &str) -> Result<(), BenchError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &opts.target)
        .set("socket.connection.setup.timeout.ms", "5000")
        .create()
        .map_err(|e| BenchError::Refused(e.to_string()))?;
    let new = NewTopic::new(topic, opts.partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().request_timeout(Some(CONNECT_WAIT));
    let results =
        admin
            .create_topics([&new], &options)
            .await
            .map_err(|e| BenchError::Unreachable {
                target: opts.target.clone(),
                secs: CONNECT_WAIT.as_secs(),
                detail: e.to_string(),
            })?;
    for r in results {
        if let Err((t, code)) = r {
            return Err(BenchError::Refused(format!("create topic {t}: {code}")));
        }
    }
    Ok(())
}
