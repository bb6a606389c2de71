//! `tributary bench kafka`: librdkafka producers and a consumer group on a fresh topic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tally::Sink;
use crate::{
    BenchError, BenchOptions, DRAIN_IDLE, Report, Tally, cpu_ticks, drain_deliveries, note_cpu,
    note_rss, now_ns, progress_bar, rss_kib, stamp,
};

/// How long to wait for the broker at start.
const CONNECT_WAIT: Duration = Duration::from_secs(20);
/// Sends in flight per producer before it waits for acks (default of `--inflight`).
const MAX_IN_FLIGHT: usize = 1_000;

pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    opts.validate()?;
    let suffix: u32 = rand::random();
    let topic = format!("tributary-bench-{suffix:08x}");
    let group = format!("tributary-bench-{suffix:08x}");
    create_topic(opts, &topic).await?;
    // With a delay the producers write the topic's delay line (docs/compat/mapping.md).
    let produce_to = match opts.delay_ms {
        Some(_) => {
            let line = format!("{topic}.later");
            create_delay_line(opts, &line, &topic).await?;
            line
        }
        None => topic.clone(),
    };
    let delay_header = opts.delay_ms.map(|d| d.to_string());
    let rss_before = opts.broker_pid.and_then(rss_kib);
    let cpu_before = opts.broker_pid.and_then(cpu_ticks);
    let idle = open_idle(opts).await?;
    let tally = Arc::new(Tally::new(opts.producers));
    // One consumer group: every message is due once, whichever member gets it.
    let sink = Arc::new(Mutex::new(tally.sink()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut report = Report {
        protocol: "kafka".into(),
        qos: u8::from(opts.acks != "0"),
        ..Default::default()
    };

    let mut consumers = Vec::new();
    if !opts.from_start {
        // Consumers first, so they are assigned before the first message is sent.
        consumers = start_consumers(opts, &topic, &group, &tally, &sink, &stop)?;
        wait_assigned(opts, &consumers, &stop).await?;
    }
    note_rss(&mut report, opts, rss_before);
    report.idle_connections = idle.len();

    let progress = progress_bar(opts);
    if opts.warmup.is_zero() {
        tally.start_measuring();
    }
    let start = Instant::now();
    let end_at = start + opts.warmup + opts.duration;
    let remaining = Arc::new(AtomicU64::new(opts.count.unwrap_or(u64::MAX)));
    let per_producer_rate = opts
        .rate
        .map(|r| (r as f64 / opts.producers as f64).max(1.0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..opts.producers {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &opts.target)
            .set("acks", &opts.acks)
            .set("compression.type", &opts.compression)
            .set("linger.ms", "2")
            .set(
                "enable.idempotence",
                if opts.acks == "all" { "true" } else { "false" },
            )
            .set("queue.buffering.max.messages", "1000000");
        if opts.transaction_commit.is_some() {
            config.set("transactional.id", format!("{topic}-producer-{p}"));
        }
        let producer: FutureProducer = config
            .create()
            .map_err(|e| BenchError::Refused(e.to_string()))?;
        let commit_every = opts.transaction_commit;
        if commit_every.is_some() {
            let p = producer.clone();
            tokio::task::spawn_blocking(move || {
                p.init_transactions(CONNECT_WAIT)?;
                p.begin_transaction()
            })
            .await
            .map_err(|e| BenchError::Refused(e.to_string()))?
            .map_err(|e| BenchError::Refused(format!("starting a transaction: {e}")))?;
        }
        let delay_header = delay_header.clone();
        let (topic, tally, errors, remaining) = (
            produce_to.clone(),
            tally.clone(),
            errors.clone(),
            remaining.clone(),
        );
        let size = opts.size;
        let max_in_flight = opts.inflight.unwrap_or(MAX_IN_FLIGHT);
        tasks.push(tokio::spawn(async move {
            let key = format!("producer-{p}");
            let mut payload = vec![0u8; size];
            let mut in_flight = FuturesUnordered::new();
            let mut seq = 0u64;
            let begun = Instant::now();
            let mut last_commit = Instant::now();
            while Instant::now() < end_at && take_one(&remaining) {
                if let Some(every) = commit_every
                    && last_commit.elapsed() >= every
                {
                    // Every send of the transaction acked first, as a client must.
                    while let Some((r, t)) = in_flight.next().await {
                        note_ack(r, t, &tally, &errors);
                    }
                    if let Err(e) = end_transaction(&producer, true).await {
                        eprintln!("bench: a transaction commit failed: {e}");
                        errors.fetch_add(1, Ordering::AcqRel);
                        break;
                    }
                    last_commit = Instant::now();
                }
                // Acks are taken as they come while waiting for the next send, so paced runs
                // time them when they arrive, not when the window fills.
                if let Some(rate) = per_producer_rate {
                    let due = begun + Duration::from_secs_f64(seq as f64 / rate);
                    let sleep = tokio::time::sleep_until(due.into());
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            biased;
                            Some((r, t)) = in_flight.next(), if !in_flight.is_empty() => {
                                note_ack(r, t, &tally, &errors);
                            }
                            _ = &mut sleep => break,
                        }
                    }
                }
                while let Some(Some((r, t))) = in_flight.next().now_or_never() {
                    note_ack(r, t, &tally, &errors);
                }
                stamp(&mut payload, p as u32, seq, now_ns());
                loop {
                    let mut record = FutureRecord::to(&topic).key(&key).payload(&payload);
                    if let Some(delay) = &delay_header {
                        record = record.headers(OwnedHeaders::new().insert(Header {
                            key: "tributary.delay-ms",
                            value: Some(delay.as_bytes()),
                        }));
                    }
                    match producer.send_result(record) {
                        Ok(fut) => {
                            let t = Instant::now();
                            in_flight.push(async move { (fut.await, t) });
                            seq += 1;
                            break;
                        }
                        Err(_) => {
                            // librdkafka's queue is full: wait for an ack, then try again.
                            match in_flight.next().await {
                                Some((r, t)) => note_ack(r, t, &tally, &errors),
                                None => tokio::time::sleep(Duration::from_millis(1)).await,
                            }
                        }
                    }
                }
                while in_flight.len() >= max_in_flight {
                    if let Some((r, t)) = in_flight.next().await {
                        note_ack(r, t, &tally, &errors);
                    }
                }
            }
            while let Some((r, t)) = in_flight.next().await {
                note_ack(r, t, &tally, &errors);
            }
            if commit_every.is_some()
                && let Err(e) = end_transaction(&producer, false).await
            {
                eprintln!("bench: the last transaction commit failed: {e}");
                errors.fetch_add(1, Ordering::AcqRel);
            }
        }));
    }
    let mut warm = opts.warmup.is_zero();
    let mut all_done = futures::future::join_all(tasks);
    loop {
        tokio::select! {
            _ = &mut all_done => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if !warm && start.elapsed() >= opts.warmup {
            tally.start_measuring();
            warm = true;
        }
        if let Some(bar) = &progress {
            bar.set_position(start.elapsed().as_secs().min(bar.length().unwrap_or(0)));
            bar.set_message(format!(
                "{} sent, {} received",
                tally.sent_count(),
                tally.received_count()
            ));
        }
    }
    let send_seconds = start.elapsed().as_secs_f64();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let failed = errors.load(Ordering::Acquire);
    if failed > 0 {
        stop.store(true, Ordering::Release);
        return Err(BenchError::Refused(format!(
            "{failed} sends were not acknowledged"
        )));
    }

    if opts.from_start {
        consumers = start_consumers(opts, &topic, &group, &tally, &sink, &stop)?;
    }
    drain_deliveries(&tally, || false, |_| {}).await;
    stop.store(true, Ordering::Release);
    for c in consumers {
        let _ = c.join();
    }
    tally.absorb(&sink.lock());
    let totals = tally.totals();
    totals.check(DRAIN_IDLE, true)?;
    // Reading from the start is timed from the first delivery to the last, so the group's
    // join (and its initial rebalance delay) is not counted as reading time.
    let seconds = if opts.from_start {
        tally.delivery_span()
    } else {
        match tally.measured() {
            (n, secs) if n > 0 && secs > 0.0 => secs,
            _ => start.elapsed().as_secs_f64(),
        }
    };
    report.finish(opts, &tally, seconds, send_seconds);
    if opts.from_start {
        // Every message was produced before the consumers started: all of them count.
        report.msgs_per_sec = totals.received as f64 / seconds.max(1e-9);
        report.mb_per_sec = report.msgs_per_sec * opts.size as f64 / 1e6;
        // Send-to-receive time here is the messages' age when read, not a latency.
        (
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report.p999_ms,
            report.max_ms,
        ) = (0.0, 0.0, 0.0, 0.0, 0.0);
    }
    note_cpu(&mut report, opts, cpu_before);
    drop(idle);
    Ok(report)
}

/// Opens `--connections` plain Kafka connections that each negotiate ApiVersions and then
/// stay idle until the run ends (librdkafka clients would bring threads of their own).
async fn open_idle(opts: &BenchOptions) -> Result<Vec<TcpStream>, BenchError> {
    // ApiVersions v0: size, api key 18, version 0, correlation id, null client id.
    const API_VERSIONS_V0: [u8; 14] = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xff, 0xff];
    let target = opts.target.clone();
    let opened: Vec<Result<TcpStream, String>> = futures::stream::iter(0..opts.idle_connections)
        .map(|_| {
            let target = target.clone();
            async move {
                let handshake = async {
                    let mut s = TcpStream::connect(&target).await?;
                    s.write_all(&API_VERSIONS_V0).await?;
                    let len = s.read_i32().await?;
                    let mut body = vec![0u8; usize::try_from(len).unwrap_or(0).min(1 << 20)];
                    s.read_exact(&mut body).await?;
                    Ok::<_, std::io::Error>(s)
                };
                match tokio::time::timeout(CONNECT_WAIT, handshake).await {
                    Ok(Ok(s)) => Ok(s),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "no ApiVersions answer within {} s",
                        CONNECT_WAIT.as_secs()
                    )),
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    opened
        .into_iter()
        .map(|r| {
            r.map_err(|detail| BenchError::Unreachable {
                target: opts.target.clone(),
                secs: CONNECT_WAIT.as_secs(),
                detail: format!("idle connection: {detail}"),
            })
        })
        .collect()
}

/// Commits the open transaction, then (unless it is the last) begins the next. librdkafka's
/// calls block, so they run on the blocking pool.
async fn end_transaction(producer: &FutureProducer, begin_next: bool) -> Result<(), String> {
    let p = producer.clone();
    tokio::task::spawn_blocking(move || {
        p.commit_transaction(CONNECT_WAIT)?;
        if begin_next {
            p.begin_transaction()?;
        }
        Ok::<_, rdkafka::error::KafkaError>(())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Claims one message from the `--count` budget.
fn take_one(remaining: &AtomicU64) -> bool {
    remaining
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// A consumer thread and how many partitions it holds.
struct Member {
    thread: std::thread::JoinHandle<()>,
    assigned: Arc<AtomicU64>,
}

impl Member {
    fn join(self) -> std::thread::Result<()> {
        self.thread.join()
    }
}

fn start_consumers(
    opts: &BenchOptions,
    topic: &str,
    group: &str,
    tally: &Arc<Tally>,
    sink: &Arc<Mutex<Sink>>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<Member>, BenchError> {
    let mut members = Vec::new();
    for _ in 0..opts.consumers {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &opts.target)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            // Committed offsets keep a rebalance from re-reading the topic from the start.
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("fetch.wait.max.ms", "100")
            .set(
                "isolation.level",
                if opts.transaction_commit.is_some() {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .create()
            .map_err(|e| BenchError::Refused(e.to_string()))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| BenchError::Refused(e.to_string()))?;
        let (stop, tally, sink) = (stop.clone(), tally.clone(), sink.clone());
        let assigned = Arc::new(AtomicU64::new(0));
        let held = assigned.clone();
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                    let now = consumer.assignment().map(|a| a.count() as u64).unwrap_or(0);
                    held.store(now, Ordering::Release);
                    continue;
                };
                let Ok(msg) = msg else { continue };
                if let Some(payload) = msg.payload() {
                    sink.lock().record(&tally, payload);
                }
            }
            consumer.unsubscribe();
        });
        members.push(Member { thread, assigned });
    }
    Ok(members)
}

/// Waits (bounded) until the group holds every partition.
async fn wait_assigned(
    opts: &BenchOptions,
    members: &[Member],
    stop: &AtomicBool,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + CONNECT_WAIT;
    loop {
        let held: u64 = members
            .iter()
            .map(|m| m.assigned.load(Ordering::Acquire))
            .sum();
        if held >= opts.partitions as u64 {
            return Ok(());
        }
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
}

fn note_ack<T, E>(
    r: Result<Result<T, E>, futures::channel::oneshot::Canceled>,
    t: Instant,
    tally: &Tally,
    errors: &AtomicU64,
) {
    match r {
        Ok(Ok(_)) => {
            tally.ack_latency(t);
            // A consumer group receives each message once.
            tally.sent(1);
        }
        _ => {
            errors.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// The delay line `line` of `target` (Tributary's `tributary.delay.target.topic`).
async fn create_delay_line(
    opts: &BenchOptions,
    line: &str,
    target: &str,
) -> Result<(), BenchError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &opts.target)
        .create()
        .map_err(|e| BenchError::Refused(e.to_string()))?;
    let new = NewTopic::new(line, opts.partitions, TopicReplication::Fixed(1))
        .set("tributary.delay.target.topic", target);
    let options = AdminOptions::new().request_timeout(Some(CONNECT_WAIT));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(|e| BenchError::Refused(format!("create delay line {line}: {e}")))?;
    for r in results {
        if let Err((t, code)) = r {
            return Err(BenchError::Refused(format!(
                "create delay line {t}: {code} (a delay line is Tributary's)"
            )));
        }
    }
    Ok(())
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

/// A Kafka consumer group reading a topic that another protocol's bench publishes to (MQTT
/// publishers into a Kafka topic): the topic made, the group assigned every partition.
pub(crate) struct GroupReaders {
    members: Vec<Member>,
    stop: Arc<AtomicBool>,
    sink: Arc<Mutex<Sink>>,
}

impl GroupReaders {
    /// `opts.consumers` members on `bootstrap`, in a fresh group.
    pub(crate) async fn start(
        opts: &BenchOptions,
        bootstrap: &str,
        topic: &str,
        tally: &Arc<Tally>,
    ) -> Result<Self, BenchError> {
        let kafka = BenchOptions {
            target: bootstrap.to_string(),
            ..opts.clone()
        };
        create_topic(&kafka, topic).await?;
        let sink = Arc::new(Mutex::new(tally.sink()));
        let stop = Arc::new(AtomicBool::new(false));
        let members = start_consumers(
            &kafka,
            topic,
            &format!("{topic}-group"),
            tally,
            &sink,
            &stop,
        )?;
        wait_assigned(&kafka, &members, &stop).await?;
        Ok(Self {
            members,
            stop,
            sink,
        })
    }

    /// Stops the members and adds their latencies to the tally.
    pub(crate) fn finish(self, tally: &Tally) {
        self.stop.store(true, Ordering::Release);
        for m in self.members {
            let _ = m.join();
        }
        tally.absorb(&self.sink.lock());
    }
}
