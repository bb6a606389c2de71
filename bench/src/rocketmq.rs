//! `tributary bench rocketmq`: a raw RocketMQ Remoting client over tokio, framed with the
//! gateway's own codec (`tributary_gateway_rocketmq::frame` and `message`), pointed at a
//! NameServer like any RocketMQ client.
//!
//! The run asks the NameServer for the route of `TBW102` (the topic producers fall back to;
//! failing that, for the cluster's brokers) to learn a master broker's address, creates a
//! fresh topic there (UPDATE_AND_CREATE_TOPIC, `--partitions` queues, default 8), waits until
//! the NameServer routes it, and deletes it at the end whatever happened
//! (DELETE_TOPIC_IN_BROKER, DELETE_TOPIC_IN_NAMESRV, and the consumer group).
//!
//! Producers (one connection each) send SEND_MESSAGE_V2 round robin over the queues, with up
//! to `--inflight` requests (default 128) unanswered per connection: Remoting multiplexes by
//! `opaque`, so responses are matched to requests whatever order they come in. A message
//! counts as sent when the broker answers SUCCESS; SYSTEM_BUSY (a broker shedding load) is
//! retried after a short pause, as RocketMQ's clients do, for up to 30 s.
//!
//! Consumers (one connection each) share the queues (consumer j reads queues j, j + consumers,
//! ...) and hold one long-polled PULL_MESSAGE per queue (32 messages, 15 s suspend, the
//! subscription `*` in the request), decoding the stored messages of each answer.
//!
//! The stamp's producer number is a lane, (producer, queue): sequence numbers count per lane,
//! so order is checked per queue, which is what RocketMQ promises. With more than one send in
//! flight a broker may store two sends of one connection in either order (both brokers serve
//! a connection's requests concurrently), so order is only enforced with `--inflight 1`;
//! otherwise out-of-order deliveries are counted and reported.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tributary_gateway_rocketmq::codes::{request as rq, response as rs};
use tributary_gateway_rocketmq::frame::{self, Command};
use tributary_gateway_rocketmq::message;

use crate::tally::Sink;
use crate::traffic::{CLOSE_WAIT, CONNECT_WAIT, Failure, Schedule, conclude, drain, run_suffix};
use crate::{BenchError, BenchOptions, Report, Tally, cpu_ticks, note_cpu, note_rss, now_ns};
use crate::{rss_kib, stamp};

/// Sends a producer keeps unanswered (default of `--inflight`).
const INFLIGHT: usize = 128;
/// The topic a RocketMQ producer falls back to; its route names the brokers that auto-create.
const DEFAULT_TOPIC: &str = "TBW102";
/// Messages one pull asks for (the Java push consumer's `pullBatchSize`).
const PULL_BATCH: u32 = 32;
/// How long the broker may hold a pull that found nothing (the push consumer's 15 s).
const SUSPEND_MS: u64 = 15_000;
/// Bound on any one request: a pull's suspension plus slack, a send's answer.
const PULL_WAIT: Duration = Duration::from_millis(SUSPEND_MS + 15_000);
const CALL_WAIT: Duration = Duration::from_secs(30);
/// A send the broker keeps answering SYSTEM_BUSY is given up on after this long.
const BUSY_WAIT: Duration = Duration::from_secs(30);
/// Frames queued for one connection's writer.
const OUTBOUND: usize = 1024;
/// PermName.PERM_READ | PERM_WRITE.
const PERM_READ_WRITE: i32 = 6;
/// Response codes besides `codes::response` that RocketMQ brokers answer.
const FLUSH_DISK_TIMEOUT: i32 = 10;
const SLAVE_NOT_AVAILABLE: i32 = 11;
const FLUSH_SLAVE_TIMEOUT: i32 = 12;

/// Checks of the RocketMQ bench's own options.
fn validate(opts: &BenchOptions) -> Result<(), BenchError> {
    opts.validate()?;
    if opts.partitions < 1 {
        return Err(BenchError::Invalid(
            "--partitions (the topic's queues) must be at least 1".into(),
        ));
    }
    if opts.consumers > opts.partitions as usize {
        return Err(BenchError::Invalid(format!(
            "--consumers ({}) is more than the topic's queues (--partitions {}): each queue is \
             read by one consumer",
            opts.consumers, opts.partitions
        )));
    }
    if opts.topics != 1 {
        return Err(BenchError::Invalid(
            "--topics is not read by the RocketMQ bench (one topic; --partitions sets its queues)"
                .into(),
        ));
    }
    if opts.from_start || opts.transaction_commit.is_some() || opts.idle_connections > 0 {
        return Err(BenchError::Invalid(
            "--from-start, --transactional and --connections are not read by the RocketMQ bench"
                .into(),
        ));
    }
    Ok(())
}

/// A response code with its RocketMQ name, for error messages.
fn code_name(code: i32) -> String {
    let name = match code {
        rs::SUCCESS => "SUCCESS",
        rs::SYSTEM_ERROR => "SYSTEM_ERROR",
        rs::SYSTEM_BUSY => "SYSTEM_BUSY",
        rs::REQUEST_CODE_NOT_SUPPORTED => "REQUEST_CODE_NOT_SUPPORTED",
        FLUSH_DISK_TIMEOUT => "FLUSH_DISK_TIMEOUT",
        SLAVE_NOT_AVAILABLE => "SLAVE_NOT_AVAILABLE",
        FLUSH_SLAVE_TIMEOUT => "FLUSH_SLAVE_TIMEOUT",
        rs::MESSAGE_ILLEGAL => "MESSAGE_ILLEGAL",
        rs::SERVICE_NOT_AVAILABLE => "SERVICE_NOT_AVAILABLE",
        rs::NO_PERMISSION => "NO_PERMISSION",
        rs::TOPIC_NOT_EXIST => "TOPIC_NOT_EXIST",
        rs::TOPIC_EXIST_ALREADY => "TOPIC_EXIST_ALREADY",
        rs::PULL_NOT_FOUND => "PULL_NOT_FOUND",
        rs::PULL_RETRY_IMMEDIATELY => "PULL_RETRY_IMMEDIATELY",
        rs::PULL_OFFSET_MOVED => "PULL_OFFSET_MOVED",
        rs::SUBSCRIPTION_PARSE_FAILED => "SUBSCRIPTION_PARSE_FAILED",
        24 => "SUBSCRIPTION_NOT_EXIST",
        25 => "SUBSCRIPTION_NOT_LATEST",
        26 => "SUBSCRIPTION_GROUP_NOT_EXIST",
        _ => "",
    };
    if name.is_empty() {
        format!("code {code}")
    } else {
        format!("code {code} {name}")
    }
}

/// "code N NAME: remark" of an answer that was not the one hoped for.
fn refusal(r: &Command) -> String {
    match r.remark.as_deref() {
        Some(remark) if !remark.is_empty() => format!("{}: {remark}", code_name(r.code)),
        _ => code_name(r.code),
    }
}

/// What the reader side of a connection shares with its callers.
#[derive(Default)]
struct Pending {
    calls: HashMap<i32, oneshot::Sender<Command>>,
    /// Why the connection ended, once it did.
    closed: Option<String>,
}

/// Ends a connection: every waiting call fails with `why`.
fn close(pending: &Mutex<Pending>, why: String) {
    let mut p = pending.lock();
    if p.closed.is_none() {
        p.closed = Some(why);
    }
    p.calls.clear();
}

/// One Remoting connection: requests go out through a writer task, responses come back
/// through a reader task that hands each to the call waiting on its `opaque`.
struct Remote {
    addr: String,
    out: mpsc::Sender<Bytes>,
    pending: Arc<Mutex<Pending>>,
    next_opaque: AtomicI32,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Remote {
    async fn connect(addr: &str) -> Result<Arc<Remote>, String> {
        let stream = match tokio::time::timeout(CONNECT_WAIT, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(format!(
                    "no TCP connection to {addr} within {} s",
                    CONNECT_WAIT.as_secs()
                ));
            }
            Ok(Err(e)) => return Err(format!("cannot connect to {addr}: {e}")),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let (out, mut rx) = mpsc::channel::<Bytes>(OUTBOUND);
        let pending = Arc::new(Mutex::new(Pending::default()));
        let p = pending.clone();
        tokio::spawn(async move {
            let mut wr = BufWriter::with_capacity(64 * 1024, wr);
            while let Some(frame) = rx.recv().await {
                let mut written = wr.write_all(&frame).await;
                // Requests queued together go out together.
                if written.is_ok() && rx.is_empty() {
                    written = wr.flush().await;
                }
                if let Err(e) = written {
                    close(&p, format!("writing failed: {e}"));
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        // The reader answers the broker's own requests (none expected) on a weak handle, so
        // dropping the Remote still ends the writer and closes the connection.
        let replies = out.downgrade();
        let p = pending.clone();
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(256 * 1024);
            let why = loop {
                match frame::decode(&mut buf) {
                    Ok(Some(cmd)) if cmd.is_response() => {
                        let waiting = p.lock().calls.remove(&cmd.opaque);
                        if let Some(tx) = waiting {
                            let _ = tx.send(cmd);
                        }
                        continue;
                    }
                    Ok(Some(cmd)) => {
                        if !cmd.is_oneway()
                            && let Some(out) = replies.upgrade()
                        {
                            let reply = cmd
                                .response(rs::REQUEST_CODE_NOT_SUPPORTED)
                                .with_remark("the bench client serves no requests");
                            let _ = out.try_send(reply.encode());
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => break format!("an undecodable frame came: {e}"),
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) => break "the peer closed the connection".to_string(),
                    Ok(_) => {}
                    Err(e) => break format!("reading failed: {e}"),
                }
            };
            close(&p, why);
        });
        Ok(Arc::new(Remote {
            addr: addr.to_string(),
            out,
            pending,
            next_opaque: AtomicI32::new(1),
            reader,
        }))
    }

    fn closed_reason(&self) -> String {
        let why = self.pending.lock().closed.clone();
        format!(
            "connection to {} lost: {}",
            self.addr,
            why.unwrap_or_else(|| "closed".into())
        )
    }

    /// Sends a request and waits (at most `wait`) for its response.
    async fn call(&self, mut cmd: Command, wait: Duration) -> Result<Command, String> {
        let opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        cmd.opaque = opaque;
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock();
            if p.closed.is_some() {
                drop(p);
                return Err(self.closed_reason());
            }
            p.calls.insert(opaque, tx);
        }
        if self.out.send(cmd.encode()).await.is_err() {
            return Err(self.closed_reason());
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(self.closed_reason()),
            Err(_) => {
                self.pending.lock().calls.remove(&opaque);
                Err(format!(
                    "no answer from {} within {} s",
                    self.addr,
                    wait.as_secs()
                ))
            }
        }
    }
}

/// A JSON body as RocketMQ's NameServer writes it: fastjson leaves integer map keys unquoted
/// (`"brokerAddrs":{0:"host:port"}`) unless the client asked for standard JSON, so such keys
/// are quoted before parsing.
fn lenient_json(body: &[u8]) -> Result<Value, String> {
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_string())?;
    let mut fixed = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped, mut key_may_start) = (false, false, false);
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if in_string {
            fixed.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        if key_may_start && (c.is_ascii_digit() || c == '-') {
            let rest = &text[i..];
            let len = rest
                .char_indices()
                .find(|(_, d)| !(d.is_ascii_digit() || *d == '-'))
                .map_or(rest.len(), |(n, _)| n);
            if rest[len..].trim_start().starts_with(':') {
                fixed.push('"');
                fixed.push_str(&rest[..len]);
                fixed.push('"');
                for _ in 1..len {
                    chars.next();
                }
                key_may_start = false;
                continue;
            }
        }
        match c {
            '"' => in_string = true,
            '{' | ',' => key_may_start = true,
            c if c.is_whitespace() => {}
            _ => key_may_start = false,
        }
        if c == '"' {
            key_may_start = false;
        }
        fixed.push(c);
    }
    serde_json::from_str(&fixed).map_err(|e| format!("malformed JSON body: {e}"))
}

/// A broker group's name and its master's (broker id 0) address.
#[derive(Debug, Clone, PartialEq)]
struct Broker {
    name: String,
    addr: String,
}

/// The masters of a route's `brokerDatas` (or a cluster's `brokerAddrTable` values).
fn masters<'a>(datas: impl Iterator<Item = &'a Value>) -> Vec<Broker> {
    let mut out: Vec<Broker> = datas
        .filter_map(|d| {
            Some(Broker {
                name: d.get("brokerName")?.as_str()?.to_string(),
                addr: d.get("brokerAddrs")?.get("0")?.as_str()?.to_string(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Masters and write queues per broker name of a GET_ROUTEINFO_BY_TOPIC body.
fn parse_route(body: &[u8]) -> Result<(Vec<Broker>, HashMap<String, i64>), String> {
    let v = lenient_json(body)?;
    let brokers = masters(
        v.get("brokerDatas")
            .and_then(Value::as_array)
            .into_iter()
            .flatten(),
    );
    let queues = v
        .get("queueDatas")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|q| {
            Some((
                q.get("brokerName")?.as_str()?.to_string(),
                q.get("writeQueueNums")?.as_i64()?,
            ))
        })
        .collect();
    Ok((brokers, queues))
}

fn route_request(topic: &str) -> Command {
    Command::request(rq::GET_ROUTEINFO_BY_TOPIC, 0)
        .with_ext("topic", topic)
        // RocketMQ's NameServer then writes standard JSON (quoted integer keys).
        .with_ext("acceptStandardJsonOnly", "true")
}

/// The broker to bench: the first master of `TBW102`'s route, else of the cluster's table.
async fn find_broker(opts: &BenchOptions, namesrv: &Remote) -> Result<Broker, BenchError> {
    let at = &opts.target;
    let r = namesrv
        .call(route_request(DEFAULT_TOPIC), CALL_WAIT)
        .await
        .map_err(|e| BenchError::Refused(format!("NameServer: GET_ROUTEINFO_BY_TOPIC: {e}")))?;
    match r.code {
        rs::SUCCESS => {
            let (brokers, _) = parse_route(&r.body).map_err(|e| {
                BenchError::Refused(format!(
                    "the NameServer at {at}: the route of {DEFAULT_TOPIC}: {e}"
                ))
            })?;
            if let Some(b) = brokers.into_iter().next() {
                return Ok(b);
            }
        }
        rs::TOPIC_NOT_EXIST => {}
        rs::REQUEST_CODE_NOT_SUPPORTED => {
            return Err(BenchError::Refused(format!(
                "{at} does not answer GET_ROUTEINFO_BY_TOPIC ({}): --target must be a \
                 NameServer (default port 9876), not a broker",
                refusal(&r)
            )));
        }
        _ => {
            return Err(BenchError::Refused(format!(
                "the NameServer at {at} refused GET_ROUTEINFO_BY_TOPIC {DEFAULT_TOPIC}: {}",
                refusal(&r)
            )));
        }
    }
    // No auto-create route: the cluster's table lists the brokers.
    let r = namesrv
        .call(Command::request(rq::GET_BROKER_CLUSTER_INFO, 0), CALL_WAIT)
        .await
        .map_err(|e| BenchError::Refused(format!("NameServer: GET_BROKER_CLUSTER_INFO: {e}")))?;
    if r.code != rs::SUCCESS {
        return Err(BenchError::Refused(format!(
            "the NameServer at {at} has no route for {DEFAULT_TOPIC} and refused \
             GET_BROKER_CLUSTER_INFO: {}",
            refusal(&r)
        )));
    }
    let v = lenient_json(&r.body).map_err(|e| {
        BenchError::Refused(format!("the NameServer at {at}: the cluster table: {e}"))
    })?;
    let table = v.get("brokerAddrTable").and_then(Value::as_object);
    masters(table.into_iter().flat_map(|t| t.values()))
        .into_iter()
        .next()
        .ok_or_else(|| {
            BenchError::Refused(format!(
                "the NameServer at {at} knows no broker: no route for {DEFAULT_TOPIC} and no \
                 master (broker id 0) in its cluster table; has a broker registered with it?"
            ))
        })
}

/// Waits until the NameServer routes `topic` to `broker` with `queues` write queues.
async fn await_route(
    opts: &BenchOptions,
    namesrv: &Remote,
    topic: &str,
    broker: &Broker,
    queues: usize,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + CONNECT_WAIT;
    loop {
        let r = namesrv
            .call(route_request(topic), CALL_WAIT)
            .await
            .map_err(|e| BenchError::Refused(format!("NameServer: GET_ROUTEINFO_BY_TOPIC: {e}")))?;
        let last = if r.code == rs::SUCCESS {
            let (brokers, write) = parse_route(&r.body).map_err(|e| {
                BenchError::Refused(format!(
                    "the NameServer at {}: the route of {topic}: {e}",
                    opts.target
                ))
            })?;
            match write.get(&broker.name) {
                Some(&n) if n == queues as i64 && brokers.contains(broker) => return Ok(()),
                Some(&n) if n != queues as i64 => {
                    return Err(BenchError::Refused(format!(
                        "the NameServer routes {topic} to {n} write queues on broker {}, not \
                         the {queues} it was created with",
                        broker.name
                    )));
                }
                _ => format!(
                    "its route does not name broker {} at {}",
                    broker.name, broker.addr
                ),
            }
        } else {
            refusal(&r)
        };
        if Instant::now() >= deadline {
            return Err(BenchError::Refused(format!(
                "the NameServer at {} has no route for topic {topic} {} s after broker {} at {} \
                 created it (last answer: {last})",
                opts.target,
                CONNECT_WAIT.as_secs(),
                broker.name,
                broker.addr
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    validate(opts)?;
    let queues = opts.partitions as usize;
    let suffix = run_suffix();
    let topic = format!("tributary-bench-{suffix}");
    let group = format!("tributary-bench-{suffix}");
    let namesrv = Remote::connect(&opts.target)
        .await
        .map_err(|e| crate::traffic::unreachable(opts, format!("NameServer: {e}")))?;
    let broker = find_broker(opts, &namesrv).await?;
    let admin = Remote::connect(&broker.addr).await.map_err(|e| {
        BenchError::Refused(format!(
            "broker {} (from the NameServer's route): {e}",
            broker.name
        ))
    })?;
    let create = Command::request(rq::UPDATE_AND_CREATE_TOPIC, 0)
        .with_ext("topic", &topic)
        .with_ext("defaultTopic", DEFAULT_TOPIC)
        .with_ext("readQueueNums", queues)
        .with_ext("writeQueueNums", queues)
        .with_ext("perm", PERM_READ_WRITE)
        .with_ext("topicFilterType", "SINGLE_TAG")
        .with_ext("topicSysFlag", 0)
        .with_ext("order", false);
    let r = admin
        .call(create, CALL_WAIT)
        .await
        .map_err(|e| BenchError::Refused(format!("UPDATE_AND_CREATE_TOPIC {topic}: {e}")))?;
    if r.code != rs::SUCCESS {
        return Err(BenchError::Refused(format!(
            "broker {} at {} refused UPDATE_AND_CREATE_TOPIC {topic} with {queues} queues: {}",
            broker.name,
            broker.addr,
            refusal(&r)
        )));
    }

    let outcome = async {
        await_route(opts, &namesrv, &topic, &broker, queues).await?;
        traffic(opts, &broker.addr, &topic, &group, queues).await
    }
    .await;

    // Best effort and bounded: the names are unique per run, a leftover only costs space.
    let mut cleanup = Vec::new();
    let steps = [
        (
            &admin,
            Command::request(rq::DELETE_TOPIC_IN_BROKER, 0).with_ext("topic", &topic),
        ),
        (
            &namesrv,
            Command::request(rq::DELETE_TOPIC_IN_NAMESRV, 0).with_ext("topic", &topic),
        ),
        (
            &admin,
            Command::request(rq::DELETE_SUBSCRIPTIONGROUP, 0)
                .with_ext("groupName", &group)
                .with_ext("cleanOffset", true),
        ),
    ];
    for (remote, cmd) in steps {
        let code = cmd.code;
        match remote.call(cmd, CLOSE_WAIT).await {
            Ok(r) if r.code == rs::SUCCESS => {}
            Ok(r) => cleanup.push(format!("request {code}: {}", refusal(&r))),
            Err(e) => cleanup.push(format!("request {code}: {e}")),
        }
    }
    if outcome.is_ok() && !cleanup.is_empty() {
        eprintln!(
            "bench: warning: cleaning up topic {topic} and group {group}: {}",
            cleanup.join("; ")
        );
    }
    outcome
}

async fn traffic(
    opts: &BenchOptions,
    addr: &str,
    topic: &str,
    group: &str,
    queues: usize,
) -> Result<Report, BenchError> {
    let window = opts.inflight.unwrap_or(INFLIGHT);
    let tally = Arc::new(Tally::new(opts.producers * queues));
    let failure = Arc::new(Failure::default());
    let (stop_tx, stop) = watch::channel(false);
    let mut report = Report {
        protocol: "rocketmq".into(),
        qos: 1,
        ..Default::default()
    };
    let before = opts.broker_pid.and_then(rss_kib);
    let cpu_before = opts.broker_pid.and_then(cpu_ticks);
    let connect = |what: String| {
        let addr = addr.to_string();
        async move {
            Remote::connect(&addr)
                .await
                .map_err(|e| BenchError::Refused(format!("{what}: {e}")))
        }
    };

    // Each queue has one reader, so one sink sees every delivery of every lane.
    let sink = Arc::new(Mutex::new(tally.sink()));
    let mut consumers = JoinSet::new();
    for j in 0..opts.consumers {
        let remote = connect(format!("consumer {j}")).await?;
        for queue in (j..queues).step_by(opts.consumers) {
            let puller = Puller {
                j,
                queue,
                remote: remote.clone(),
                topic: topic.to_string(),
                group: group.to_string(),
                sink: sink.clone(),
                tally: tally.clone(),
            };
            let (stop, failure) = (stop.clone(), failure.clone());
            consumers.spawn(async move { puller.run(stop, &failure).await });
        }
    }
    let mut producers = Vec::new();
    for p in 0..opts.producers {
        producers.push(Producer {
            p,
            remote: connect(format!("producer {p}")).await?,
            topic: topic.to_string(),
            group: group.to_string(),
            queues,
            size: opts.size,
            window,
            tally: tally.clone(),
        });
    }
    note_rss(&mut report, opts, before);

    let schedule = Arc::new(Schedule::new(opts, &tally, failure.clone()));
    let mut sending = JoinSet::new();
    for producer in producers {
        let (schedule, failure) = (schedule.clone(), failure.clone());
        sending.spawn(async move {
            if let Err(e) = producer.run(&schedule).await {
                failure.set(e);
            }
        });
    }
    let bar = schedule.drive(opts, &tally, &mut sending).await;
    let send_seconds = schedule.start.elapsed().as_secs_f64();
    drain(&tally, &failure, bar.as_ref()).await;
    let elapsed = schedule.start.elapsed();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Suspended pulls are dropped: the run is over.
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
        window == 1,
    )?;
    note_cpu(&mut report, opts, cpu_before);
    Ok(report)
}

/// One producer connection: SEND_MESSAGE_V2 round robin over the queues, `window` unanswered.
struct Producer {
    p: usize,
    remote: Arc<Remote>,
    topic: String,
    group: String,
    queues: usize,
    size: usize,
    window: usize,
    tally: Arc<Tally>,
}

impl Producer {
    async fn run(self, schedule: &Schedule) -> Result<(), BenchError> {
        let mut lane_seq = vec![0u64; self.queues];
        let mut payload = vec![0u8; self.size];
        let mut in_flight = FuturesUnordered::new();
        let mut n = 0u64;
        loop {
            while let Some(Some(answered)) = in_flight.next().now_or_never() {
                answered?;
            }
            while in_flight.len() >= self.window {
                if let Some(answered) = in_flight.next().await {
                    answered?;
                }
            }
            // Answers are taken as they come while waiting for the next send, so paced runs
            // time them when they arrive.
            let next = schedule.next(n);
            tokio::pin!(next);
            let more = loop {
                tokio::select! {
                    biased;
                    Some(answered) = in_flight.next(), if !in_flight.is_empty() => answered?,
                    more = &mut next => break more,
                };
            };
            if !more {
                break;
            }
            // Producers start on different queues so that every queue is busy.
            let queue = (self.p + n as usize) % self.queues;
            let lane = self.p * self.queues + queue;
            let seq = lane_seq[queue];
            lane_seq[queue] += 1;
            stamp(&mut payload, lane as u32, seq, now_ns());
            let cmd = self.request(queue, n, Bytes::copy_from_slice(&payload));
            n += 1;
            in_flight.push(send(
                self.remote.clone(),
                cmd,
                self.tally.clone(),
                format!(
                    "producer {}: SEND_MESSAGE_V2 to {} queue {queue}",
                    self.p, self.topic
                ),
            ));
        }
        while let Some(answered) = in_flight.next().await {
            answered?;
        }
        Ok(())
    }

    /// A SEND_MESSAGE_V2 request (one-letter header names) as the Java producer sends it:
    /// a unique key and WAIT=true in the properties.
    fn request(&self, queue: usize, n: u64, body: Bytes) -> Command {
        let key = format!("{:08X}{:08X}{n:016X}", std::process::id(), self.p);
        let properties = message::encode_properties(&[
            ("UNIQ_KEY".to_string(), key),
            ("WAIT".to_string(), "true".to_string()),
        ]);
        Command::request(rq::SEND_MESSAGE_V2, 0)
            .with_ext("a", &self.group)
            .with_ext("b", &self.topic)
            .with_ext("c", DEFAULT_TOPIC)
            .with_ext("d", self.queues)
            .with_ext("e", queue)
            .with_ext("f", 0)
            .with_ext("g", now_ns() / 1_000_000)
            .with_ext("h", 0)
            .with_ext("i", properties)
            .with_ext("j", 0)
            .with_ext("k", false)
            .with_ext("m", false)
            .with_body(body)
    }
}

/// Sends one message until the broker stores it (SYSTEM_BUSY is retried, bounded).
async fn send(
    remote: Arc<Remote>,
    cmd: Command,
    tally: Arc<Tally>,
    what: String,
) -> Result<(), BenchError> {
    let first = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        let r = remote
            .call(cmd.clone(), CALL_WAIT)
            .await
            .map_err(|e| BenchError::Refused(format!("{what}: {e}")))?;
        match r.code {
            // Stored; only a replica or the flush lagged (not with the brokers' defaults).
            rs::SUCCESS | FLUSH_DISK_TIMEOUT | SLAVE_NOT_AVAILABLE | FLUSH_SLAVE_TIMEOUT => {
                tally.sent(1);
                tally.ack_latency(first);
                return Ok(());
            }
            rs::SYSTEM_BUSY if first.elapsed() < BUSY_WAIT => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            rs::SYSTEM_BUSY => {
                return Err(BenchError::Refused(format!(
                    "{what}: still answered {} after {} s of retries",
                    refusal(&r),
                    BUSY_WAIT.as_secs()
                )));
            }
            _ => return Err(BenchError::Refused(format!("{what}: {}", refusal(&r)))),
        }
    }
}

/// One queue of one consumer: long-polled pulls from offset 0.
struct Puller {
    j: usize,
    queue: usize,
    remote: Arc<Remote>,
    topic: String,
    group: String,
    sink: Arc<Mutex<Sink>>,
    tally: Arc<Tally>,
}

impl Puller {
    fn request(&self, offset: i64) -> Command {
        Command::request(rq::PULL_MESSAGE, 0)
            .with_ext("consumerGroup", &self.group)
            .with_ext("topic", &self.topic)
            .with_ext("queueId", self.queue)
            .with_ext("queueOffset", offset)
            .with_ext("maxMsgNums", PULL_BATCH)
            // Suspend (long poll) and subscription (the expression is in the request).
            .with_ext("sysFlag", 2 | 4)
            .with_ext("commitOffset", 0)
            .with_ext("suspendTimeoutMillis", SUSPEND_MS)
            .with_ext("subscription", "*")
            .with_ext("subVersion", 0)
            .with_ext("expressionType", "TAG")
    }

    async fn run(self, mut stop: watch::Receiver<bool>, failure: &Failure) {
        let what = format!(
            "consumer {}: PULL_MESSAGE {} queue {}",
            self.j, self.topic, self.queue
        );
        let mut offset = 0i64;
        let result: Result<(), BenchError> = async {
            loop {
                let answered = tokio::select! {
                    biased;
                    _ = stop.changed() => return Ok(()),
                    r = self.remote.call(self.request(offset), PULL_WAIT) => r,
                };
                let r = answered.map_err(|e| BenchError::Refused(format!("{what}: {e}")))?;
                let next = r
                    .ext
                    .get("nextBeginOffset")
                    .and_then(|v| v.trim().parse::<i64>().ok());
                match r.code {
                    rs::SUCCESS => {
                        let messages = message::decode_stored(r.body.clone()).map_err(|e| {
                            BenchError::Refused(format!(
                                "{what}: offset {offset}: the stored messages do not decode: {e}"
                            ))
                        })?;
                        {
                            let mut sink = self.sink.lock();
                            for m in &messages {
                                sink.record(&self.tally, &m.body);
                            }
                        }
                        let after_last = messages.last().map(|m| m.queue_offset + 1);
                        offset = match next.or(after_last) {
                            Some(o) => o,
                            None => {
                                return Err(BenchError::Refused(format!(
                                    "{what}: offset {offset}: found nothing and no nextBeginOffset"
                                )));
                            }
                        };
                    }
                    rs::PULL_NOT_FOUND | rs::PULL_RETRY_IMMEDIATELY => {
                        if let Some(o) = next {
                            offset = o;
                        }
                    }
                    rs::PULL_OFFSET_MOVED => {
                        return Err(BenchError::Refused(format!(
                            "{what}: offset {offset} moved (next {}): the broker no longer has \
                             messages this run sent",
                            next.map_or_else(|| "unknown".into(), |o| o.to_string())
                        )));
                    }
                    _ => {
                        return Err(BenchError::Refused(format!(
                            "{what}: offset {offset}: {}",
                            refusal(&r)
                        )));
                    }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastjson_integer_keys_are_quoted() {
        let body = br#"{"brokerDatas":[{"brokerAddrs":{0:"127.0.0.1:10911", 1 :"127.0.0.1:10921"},"brokerName":"broker-a","cluster":"c"}],"queueDatas":[{"brokerName":"broker-a","writeQueueNums":8,"readQueueNums":8}],"note":"{0:x}"}"#;
        let v = lenient_json(body).unwrap();
        assert_eq!(v["note"], "{0:x}", "strings are left alone");
        let (brokers, write) = parse_route(body).unwrap();
        assert_eq!(
            brokers,
            vec![Broker {
                name: "broker-a".into(),
                addr: "127.0.0.1:10911".into()
            }]
        );
        assert_eq!(write["broker-a"], 8);
        assert!(lenient_json(b"{nope").is_err());
        // Standard JSON parses as is.
        let std = br#"{"brokerDatas":[{"brokerAddrs":{"0":"h:1"},"brokerName":"b"}]}"#;
        assert_eq!(parse_route(std).unwrap().0[0].addr, "h:1");
    }

    #[test]
    fn options_rocketmq_refuses() {
        let ok = BenchOptions {
            target: "127.0.0.1:9876".into(),
            partitions: 8,
            consumers: 8,
            ..Default::default()
        };
        validate(&ok).unwrap();
        for bad in [
            BenchOptions {
                consumers: 9,
                ..ok.clone()
            },
            BenchOptions {
                partitions: 0,
                ..ok.clone()
            },
            BenchOptions {
                topics: 2,
                ..ok.clone()
            },
            BenchOptions {
                idle_connections: 5,
                ..ok.clone()
            },
        ] {
            assert!(matches!(validate(&bad), Err(BenchError::Invalid(_))));
        }
    }

    #[test]
    fn codes_are_named() {
        assert_eq!(code_name(2), "code 2 SYSTEM_BUSY");
        assert_eq!(code_name(777), "code 777");
        let r = Command::request(1, 0).with_remark("no topic");
        let mut r = r.response(17);
        r.remark = Some("no topic".into());
        assert_eq!(refusal(&r), "code 17 TOPIC_NOT_EXIST: no topic");
    }
}
