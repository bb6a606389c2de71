//! `tributary bench amqp`: AMQP 0-9-1 publishers and consumers, one connection each.
//!
//! The bench declares one queue per topic, publishes to the default exchange with the queue
//! name as routing key, and deletes the queues at the end. With `--fanout N` it declares a
//! fanout exchange and N queues bound to it instead, every publisher publishes to the exchange,
//! and each publish is due once in every queue: the report's `sent` counts publishes and
//! `received` deliveries (N per publish). At `--qos 1` publishers use publisher confirms and
//! consumers acknowledge manually (batched with `multiple`); at `--qos 0` neither confirms nor
//! acks exist, so a message counts as sent once it is written to the socket. Each connection
//! is driven by the task that uses it ([`wire`] says why this is not lapin).

mod wire;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic};
use futures::StreamExt;
use futures::stream;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::tally::Sink;
use crate::traffic::{
    CLOSE_WAIT, CONNECT_PARALLEL, CONNECT_WAIT, DRAIN_WAIT, Failure, Schedule, conclude, drain,
    run_suffix, unreachable,
};
use crate::{
    BenchError, BenchOptions, Report, Tally, cpu_ticks, note_cpu, note_rss, now_ns, rss_kib, stamp,
};
use wire::{Connection, Event, Target};

/// Publishes a publisher keeps unconfirmed before it waits for confirms.
/// Default of `--inflight`.
const CONFIRM_WINDOW: usize = 100;
/// A consumer acknowledges at least this often when messages are pending (and otherwise every
/// half prefetch), so the broker's window never closes.
const ACK_EVERY: Duration = Duration::from_millis(5);
/// Acknowledgement batch when the prefetch is unlimited (0).
const UNLIMITED_PREFETCH_BATCH: u64 = 256;

type Sinks = Vec<Arc<Mutex<Sink>>>;

/// What a run declares, and where publishers publish.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    queues: Vec<String>,
    /// The fanout exchange the queues are bound to (`--fanout`); `None` = the default exchange,
    /// publisher p publishing to queue p % queues with the queue name as routing key.
    exchange: Option<String>,
}

impl Plan {
    fn new(opts: &BenchOptions, suffix: &str) -> Self {
        let queues = if opts.fanout > 0 {
            opts.fanout
        } else {
            opts.topics
        };
        Self {
            queues: (0..queues)
                .map(|q| format!("tributary-bench-{suffix}-{q}"))
                .collect(),
            exchange: (opts.fanout > 0).then(|| format!("tributary-bench-{suffix}-fanout")),
        }
    }

    /// Exchange and routing key of publisher `p`.
    fn target(&self, p: usize) -> (String, String) {
        match &self.exchange {
            Some(exchange) => (exchange.clone(), String::new()),
            None => (String::new(), self.queues[p % self.queues.len()].clone()),
        }
    }

    /// Queue consumer `j` reads (and whose sink it records into).
    fn queue_of_consumer(&self, j: usize) -> usize {
        j % self.queues.len()
    }

    /// Consumers reading queue `q`.
    fn consumers_of_queue(&self, opts: &BenchOptions, q: usize) -> usize {
        (0..opts.consumers)
            .filter(|&j| self.queue_of_consumer(j) == q)
            .count()
    }

    /// Deliveries each of publisher `p`'s messages must make. Consumers of one queue compete:
    /// each message reaches one of them, once; a fanout exchange puts it in every queue.
    fn copies(&self, opts: &BenchOptions, p: usize) -> u64 {
        match &self.exchange {
            Some(_) => (0..self.queues.len())
                .filter(|&q| self.consumers_of_queue(opts, q) > 0)
                .count() as u64,
            None => opts.copies_for_producer(p).min(1),
        }
    }
}

/// Checks of the AMQP bench's own options.
fn validate(opts: &BenchOptions) -> Result<(), BenchError> {
    opts.validate()?;
    if opts.qos > 1 {
        return Err(BenchError::Invalid(
            "AMQP has no QoS 2: --qos 0 (no confirms, automatic acks) or 1 (publisher \
             confirms, manual acks)"
                .into(),
        ));
    }
    if opts.fanout > 0 {
        if opts.topics != 1 {
            return Err(BenchError::Invalid(
                "--fanout N declares N queues on one fanout exchange: leave --topics at 1".into(),
            ));
        }
        // A queue nobody reads would only grow: every queue gets a consumer.
        if opts.consumers < opts.fanout {
            return Err(BenchError::Invalid(format!(
                "--fanout {} needs at least one consumer per queue: --consumers {} or more",
                opts.fanout, opts.fanout
            )));
        }
    }
    Ok(())
}

pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    validate(opts)?;
    let target = Target::parse(&opts.target)?;
    let suffix = run_suffix();
    let plan = Plan::new(opts, &suffix);

    // The queues are declared before the broker's memory is first read, and by a connection
    // opened before then too, so the per-connection figure covers connections only.
    let mut admin = connect(opts, &target).await?;
    let declared = declare(&mut admin, opts, &plan).await;
    let outcome = match declared {
        Ok(()) => bench(opts, &target, &plan, &suffix).await,
        Err(e) => Err(e),
    };
    delete(opts, &target, admin, &plan).await;
    outcome
}

/// Deletes the run's queues and exchange, best effort and bounded: the names are unique, so a
/// leftover only costs the broker memory (and disk, when durable). When the run's failure (or
/// a failed deletion, which closes the channel) took the admin connection down, a fresh
/// connection does the rest.
async fn delete(opts: &BenchOptions, target: &Target, mut admin: Connection, plan: &Plan) {
    // Queues first: their bindings go with them, and the exchange is then unused.
    let mut all: Vec<(bool, &str)> = plan.queues.iter().map(|q| (true, q.as_str())).collect();
    if let Some(exchange) = &plan.exchange {
        all.push((false, exchange.as_str()));
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        let left = delete_on(&mut admin, &all).await;
        admin.close().await;
        if left.is_empty() {
            return;
        }
        let Ok(mut connection) = connect(opts, target).await else {
            return;
        };
        delete_on(&mut connection, left).await;
        connection.close().await;
    })
    .await;
}

/// Deletes (is a queue, name) in order until one fails; returns what is left, that one first.
async fn delete_on<'a>(
    connection: &mut Connection,
    mut left: &'a [(bool, &'a str)],
) -> &'a [(bool, &'a str)] {
    while let Some(((queue, name), rest)) = left.split_first() {
        let deleted = if *queue {
            connection.delete_queue(name).await
        } else {
            connection.delete_exchange(name).await
        };
        if deleted.is_err() {
            break;
        }
        left = rest;
    }
    left
}

async fn declare(
    admin: &mut Connection,
    opts: &BenchOptions,
    plan: &Plan,
) -> Result<(), BenchError> {
    if let Some(exchange) = &plan.exchange {
        step(
            "exchange.declare",
            admin.declare_fanout(exchange, opts.durable),
        )
        .await?;
    }
    for queue in &plan.queues {
        step("queue.declare", admin.declare_queue(queue, opts.durable)).await?;
        if let Some(exchange) = &plan.exchange {
            step("queue.bind", admin.bind_queue(queue, exchange)).await?;
        }
    }
    Ok(())
}

/// Everything between declaring and deleting the queues. Whatever happens, every connection
/// it opened is closed before it returns.
async fn bench(
    opts: &BenchOptions,
    target: &Target,
    plan: &Plan,
    suffix: &str,
) -> Result<Report, BenchError> {
    let mut idle: Vec<Connection> = Vec::new();
    let outcome = traffic(opts, target, plan, suffix, &mut idle).await;
    let _ = tokio::time::timeout(
        CLOSE_WAIT,
        futures::future::join_all(idle.into_iter().map(Connection::close)),
    )
    .await;
    outcome
}

async fn traffic(
    opts: &BenchOptions,
    target: &Target,
    plan: &Plan,
    suffix: &str,
    idle: &mut Vec<Connection>,
) -> Result<Report, BenchError> {
    let confirms = opts.qos >= 1;
    let tally = Arc::new(Tally::new(opts.producers));
    let failure = Arc::new(Failure::default());
    let (stop_tx, stop) = watch::channel(false);
    let mut report = Report {
        protocol: "amqp".into(),
        label: String::new(),
        qos: opts.qos,
        ..Default::default()
    };

    let before = opts.broker_pid.and_then(rss_kib);
    let cpu_before = opts.broker_pid.and_then(cpu_ticks);
    let mut opening = stream::iter(0..opts.idle_connections)
        .map(|_| connect(opts, target))
        .buffer_unordered(CONNECT_PARALLEL);
    while let Some(opened) = opening.next().await {
        idle.push(opened?);
    }
    drop(opening);

    // Consumers are all registered (basic.consume-ok) before the first publish. Queues hold
    // messages anyway, but this keeps the measured latency free of a start-up backlog.
    let queues = &plan.queues;
    let sinks: Sinks = (0..queues.len())
        .map(|_| Arc::new(Mutex::new(tally.sink())))
        .collect();
    let batch = match opts.prefetch {
        0 => UNLIMITED_PREFETCH_BATCH,
        n => u64::from(n / 2).max(1),
    };
    let mut consumers: JoinSet<()> = JoinSet::new();
    let mut opened = stream::iter(0..opts.consumers)
        .map(|j| {
            let queue = &queues[plan.queue_of_consumer(j)];
            async move {
                let mut connection = connect(opts, target).await?;
                let registered = async {
                    if confirms {
                        step("basic.qos", connection.qos(opts.prefetch)).await?;
                    }
                    let tag = format!("tributary-bench-{suffix}-c{j}");
                    step("basic.consume", connection.consume(queue, &tag, !confirms)).await
                }
                .await;
                match registered {
                    Ok(()) => Ok((j, connection)),
                    Err(e) => {
                        let _ = tokio::time::timeout(CLOSE_WAIT, connection.close()).await;
                        Err(e)
                    }
                }
            }
        })
        .buffer_unordered(CONNECT_PARALLEL);
    while let Some(next) = opened.next().await {
        let (j, connection) = next?;
        consumers.spawn(consume(
            j,
            connection,
            sinks[plan.queue_of_consumer(j)].clone(),
            tally.clone(),
            confirms.then_some(batch),
            stop.clone(),
            failure.clone(),
        ));
    }
    drop(opened);

    // `buffered` keeps publisher p at index p.
    let opened: Vec<_> = stream::iter(0..opts.producers)
        .map(|_| async {
            let mut connection = connect(opts, target).await?;
            if confirms && let Err(e) = step("confirm.select", connection.confirm_select()).await {
                let _ = tokio::time::timeout(CLOSE_WAIT, connection.close()).await;
                return Err(e);
            }
            Ok::<_, BenchError>(connection)
        })
        .buffered(CONNECT_PARALLEL)
        .collect()
        .await;
    let mut connections = Vec::with_capacity(opts.producers);
    let mut opening_failed = None;
    for next in opened {
        match next {
            Ok(connection) => connections.push(connection),
            Err(e) => opening_failed = opening_failed.or(Some(e)),
        }
    }
    if let Some(e) = opening_failed {
        let _ = stop_tx.send(true);
        for connection in connections {
            let _ = tokio::time::timeout(CLOSE_WAIT, connection.close()).await;
        }
        while consumers.join_next().await.is_some() {}
        return Err(e);
    }
    note_rss(&mut report, opts, before);

    let schedule = Arc::new(Schedule::new(opts, &tally, failure.clone()));
    let mut producers = JoinSet::new();
    for (p, connection) in connections.into_iter().enumerate() {
        let (exchange, routing_key) = plan.target(p);
        let publisher = Publisher {
            p,
            prelude: wire::publish_prelude(&exchange, &routing_key, opts.size, opts.durable),
            confirms,
            size: opts.size,
            copies: plan.copies(opts, p),
            window: opts.inflight.unwrap_or(CONFIRM_WINDOW),
            tally: tally.clone(),
        };
        let (schedule, failure) = (schedule.clone(), failure.clone());
        producers.spawn(async move {
            let mut connection = connection;
            if let Err(e) = publisher.run(&mut connection, &schedule).await {
                failure.set(e);
            }
            let _ = tokio::time::timeout(CLOSE_WAIT, connection.close()).await;
        });
    }
    let bar = schedule.drive(opts, &tally, &mut producers).await;
    let send_seconds = schedule.start.elapsed().as_secs_f64();
    drain(&tally, &failure, bar.as_ref()).await;
    let elapsed = schedule.start.elapsed();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // Consumers stop at once when told to, and close their connections.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(CLOSE_WAIT * 2, async {
        while consumers.join_next().await.is_some() {}
    })
    .await;
    for sink in &sinks {
        tally.absorb(&sink.lock());
    }

    // A queue with a single consumer delivers in publish order (per publisher); competing
    // consumers interleave, so order cannot be checked across them.
    let ordered = (0..queues.len()).all(|q| plan.consumers_of_queue(opts, q) <= 1);
    let mut report = conclude(
        report,
        opts,
        &tally,
        &failure,
        elapsed,
        send_seconds,
        ordered,
    )?;
    note_cpu(&mut report, opts, cpu_before);
    Ok(report)
}

/// Records deliveries into its queue's sink until the run stops, then closes the connection.
/// With `ack_batch`, acks manually: one `multiple` ack per batch or every [`ACK_EVERY`],
/// whichever comes first.
async fn consume(
    j: usize,
    mut connection: Connection,
    sink: Arc<Mutex<Sink>>,
    tally: Arc<Tally>,
    ack_batch: Option<u64>,
    mut stop: watch::Receiver<bool>,
    failure: Arc<Failure>,
) {
    let mut unacked = 0u64;
    let mut last_tag = 0;
    let mut tick = tokio::time::interval(ACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The delivery being assembled: its tag, the body size announced, the body so far.
    let mut tag = None;
    let mut expected = 0u64;
    let mut body: Vec<u8> = Vec::new();
    let result: Result<(), BenchError> = async {
        loop {
            tokio::select! {
                // Once the run is over, deliveries no longer matter.
                biased;
                _ = stop.changed() => return Ok(()),
                frame = connection.reader.next() => {
                    let complete = match frame?.event()? {
                        Event::Method(method) => {
                            if let Some(error) = connection.closed_by_broker(&method).await {
                                return Err(error);
                            }
                            match *method {
                                AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => {
                                    tag = Some(d.delivery_tag);
                                    body.clear();
                                    None
                                }
                                AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) => {
                                    return Err(BenchError::Refused(format!(
                                        "consumer {j}: the broker cancelled the consumer"
                                    )));
                                }
                                _ => None,
                            }
                        }
                        Event::Header(size) => {
                            expected = size;
                            // An empty body has no body frame: the header completes it.
                            (size == 0).then(bytes::Bytes::new)
                        }
                        Event::Body(part) if body.is_empty() && part.len() as u64 == expected => {
                            Some(part)
                        }
                        Event::Body(part) => {
                            body.extend_from_slice(&part);
                            (body.len() as u64 >= expected)
                                .then(|| bytes::Bytes::from(std::mem::take(&mut body)))
                        }
                        Event::Heartbeat => None,
                    };
                    let (Some(payload), Some(delivery_tag)) = (complete, tag) else {
                        continue;
                    };
                    tag = None;
                    sink.lock().record(&tally, &payload);
                    if let Some(batch) = ack_batch {
                        last_tag = delivery_tag;
                        unacked += 1;
                        if unacked >= batch {
                            connection.writer.ack_up_to(last_tag);
                            connection.writer.flush().await?;
                            unacked = 0;
                        }
                    }
                }
                _ = tick.tick(), if unacked > 0 => {
                    connection.writer.ack_up_to(last_tag);
                    connection.writer.flush().await?;
                    unacked = 0;
                }
            }
        }
    }
    .await;
    if let Err(e) = result
        && !*stop.borrow()
    {
        failure.set(BenchError::Refused(format!("consumer {j}: {e}")));
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, connection.close()).await;
}

/// One publisher's sending side.
struct Publisher {
    p: usize,
    /// basic.publish and the content header, the same for every message.
    prelude: Vec<u8>,
    confirms: bool,
    size: usize,
    /// Deliveries each message must make: 1, or 0 when no consumer reads its queue; with
    /// `--fanout`, one per queue.
    copies: u64,
    /// Unconfirmed publishes allowed before waiting for confirms.
    window: usize,
    tally: Arc<Tally>,
}

impl Publisher {
    /// Publishes on the schedule; with confirms, keeps up to `window` unconfirmed, reads the
    /// broker's acks between publishes, and at the end waits (bounded) for the rest.
    async fn run(
        &self,
        connection: &mut Connection,
        schedule: &Schedule,
    ) -> Result<(), BenchError> {
        let p = self.p;
        let mut payload = vec![0u8; self.size];
        // Send times of the publishes from delivery tag `first_tag` on (confirm mode numbers
        // publishes from 1), `None` once confirmed.
        let mut unconfirmed: VecDeque<Option<Instant>> = VecDeque::with_capacity(self.window);
        let mut first_tag = 1u64;
        // Slots of `unconfirmed` still waiting for their confirm.
        let mut outstanding = 0usize;
        let mut seq = 0u64;
        let mut sending = true;
        // Bounds the wait for the last confirms, from the last send.
        let mut deadline = tokio::time::Instant::now() + DRAIN_WAIT;
        let mut stalled = tokio::time::Instant::now() + DRAIN_WAIT;
        while sending || outstanding > 0 {
            let room = outstanding < self.window;
            tokio::select! {
                biased;
                // Read without confirms too: a broker that closes the channel or the
                // connection must fail the run, not leave it counting writes nobody takes.
                frame = connection.reader.next() => {
                    let Event::Method(method) = frame?.event()? else { continue };
                    if let Some(error) = connection.closed_by_broker(&method).await {
                        return Err(BenchError::Refused(format!("publisher {p}: {error}")));
                    }
                    let (tag, multiple) = match *method {
                        AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => (a.delivery_tag, a.multiple),
                        AMQPClass::Basic(basic::AMQPMethod::Nack(_)) => {
                            return Err(BenchError::Refused(format!(
                                "publisher {p}: the broker nacked a message"
                            )));
                        }
                        AMQPClass::Basic(basic::AMQPMethod::Return(r)) => {
                            return Err(BenchError::Refused(format!(
                                "publisher {p}: message returned: {} {}",
                                r.reply_code, r.reply_text
                            )));
                        }
                        _ => continue,
                    };
                    let end = first_tag + unconfirmed.len() as u64;
                    if tag < first_tag || tag >= end {
                        return Err(BenchError::Refused(format!(
                            "publisher {p}: confirm of unknown delivery tag {tag}"
                        )));
                    }
                    // Confirms may come out of order: a single one settles its slot, a
                    // `multiple` one every slot up to its tag.
                    let from = if multiple { first_tag } else { tag };
                    for t in from..=tag {
                        if let Some(at) = unconfirmed[(t - first_tag) as usize].take() {
                            outstanding -= 1;
                            self.tally.sent(self.copies);
                            self.tally.ack_latency(at);
                        }
                    }
                    while unconfirmed.front().is_some_and(Option::is_none) {
                        unconfirmed.pop_front();
                        first_tag += 1;
                    }
                    stalled = tokio::time::Instant::now() + DRAIN_WAIT;
                }
                go = schedule.next(seq), if sending && room => {
                    if !go {
                        sending = false;
                        deadline = tokio::time::Instant::now() + DRAIN_WAIT;
                        continue;
                    }
                    stamp(&mut payload, p as u32, seq, now_ns());
                    connection.writer.publish(&self.prelude, &payload);
                    // A broker that stops reading (RabbitMQ blocks publishers on a memory
                    // alarm) must not hold the run forever.
                    tokio::time::timeout(CONNECT_WAIT, connection.writer.flush())
                        .await
                        .map_err(|_| {
                            BenchError::Refused(format!(
                                "publisher {p}: a publish was not written within {} s (is the \
                                 broker blocking publishers?)",
                                CONNECT_WAIT.as_secs()
                            ))
                        })??;
                    seq += 1;
                    if self.confirms {
                        if outstanding == 0 {
                            stalled = tokio::time::Instant::now() + DRAIN_WAIT;
                        }
                        unconfirmed.push_back(Some(Instant::now()));
                        outstanding += 1;
                    } else {
                        self.tally.sent(self.copies);
                    }
                }
                _ = tokio::time::sleep_until(stalled), if outstanding > 0 => {
                    return Err(BenchError::Refused(format!(
                        "publisher {p}: no confirm for {} s",
                        DRAIN_WAIT.as_secs()
                    )));
                }
                _ = tokio::time::sleep_until(deadline), if !sending => {
                    return Err(BenchError::Refused(format!(
                        "publisher {p}: {} of {seq} publishes unconfirmed {} s after its last \
                         send",
                        outstanding,
                        DRAIN_WAIT.as_secs()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Opens a connection and its channel, bounded by [`CONNECT_WAIT`].
async fn connect(opts: &BenchOptions, target: &Target) -> Result<Connection, BenchError> {
    match tokio::time::timeout(CONNECT_WAIT, Connection::open(target)).await {
        Err(_) => Err(unreachable(opts, "no connection.open-ok")),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(BenchError::Io(io))) => Err(unreachable(opts, io)),
        Ok(Err(BenchError::Refused(why))) => Err(BenchError::Refused(format!("connection: {why}"))),
        Ok(Err(e)) => Err(e),
    }
}

/// One AMQP request, bounded by [`CONNECT_WAIT`]; an error or no answer fails the run.
async fn step<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    match tokio::time::timeout(CONNECT_WAIT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(BenchError::Refused(format!("{what}: {e}"))),
        Err(_) => Err(BenchError::Refused(format!(
            "{what}: no answer within {} s",
            CONNECT_WAIT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn qos_2_is_refused() {
        let opts = BenchOptions {
            qos: 2,
            ..Default::default()
        };
        assert!(matches!(run(&opts).await, Err(BenchError::Invalid(_))));
    }

    #[test]
    fn queues_on_the_default_exchange() {
        let opts = BenchOptions {
            producers: 4,
            consumers: 4,
            topics: 4,
            ..Default::default()
        };
        let plan = Plan::new(&opts, "s");
        assert_eq!(plan.queues.len(), 4);
        assert_eq!(plan.exchange, None);
        assert_eq!(
            plan.target(5),
            (String::new(), "tributary-bench-s-1".into())
        );
        assert_eq!(plan.copies(&opts, 0), 1);
        assert_eq!(plan.consumers_of_queue(&opts, 3), 1);
    }

    #[test]
    fn fanout_publishes_to_the_exchange_and_counts_a_delivery_per_queue() {
        let opts = BenchOptions {
            producers: 2,
            consumers: 20,
            fanout: 10,
            ..Default::default()
        };
        validate(&opts).unwrap();
        let plan = Plan::new(&opts, "s");
        assert_eq!(plan.queues.len(), 10);
        assert_eq!(plan.exchange.as_deref(), Some("tributary-bench-s-fanout"));
        assert!(
            !plan
                .queues
                .contains(&"tributary-bench-s-fanout".to_string())
        );
        assert_eq!(
            plan.target(1),
            ("tributary-bench-s-fanout".into(), String::new())
        );
        // Two competing consumers per queue still make one delivery per queue.
        assert_eq!(plan.consumers_of_queue(&opts, 9), 2);
        assert_eq!(plan.copies(&opts, 1), 10);
    }

    #[test]
    fn fanout_needs_a_consumer_per_queue_and_no_topics() {
        let base = BenchOptions {
            consumers: 10,
            fanout: 10,
            ..Default::default()
        };
        validate(&base).unwrap();
        let few = BenchOptions {
            consumers: 9,
            ..base.clone()
        };
        assert!(matches!(validate(&few), Err(BenchError::Invalid(_))));
        let topics = BenchOptions { topics: 2, ..base };
        assert!(matches!(validate(&topics), Err(BenchError::Invalid(_))));
    }
}
