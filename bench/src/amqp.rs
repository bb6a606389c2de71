//! `tributary bench amqp`: lapin publishers and consumers (AMQP 0-9-1).
//!
//! The bench declares one queue per topic, publishes to the default exchange with the queue
//! name as routing key, and deletes the queues at the end. With `--fanout N` it declares a
//! fanout exchange and N queues bound to it instead, every publisher publishes to the exchange,
//! and each publish is due once in every queue: the report's `sent` counts publishes and
//! `received` deliveries (N per publish). At `--qos 1` publishers use publisher confirms and
//! consumers acknowledge manually (batched with `multiple`); at `--qos 0` neither confirms nor
//! acks exist, so a message counts as sent once lapin wrote it. lapin runs one I/O thread per
//! connection.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ErrorKind,
    ExchangeKind,
};
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
    let uri = amqp_uri(&opts.target);
    let suffix = run_suffix();
    let plan = Plan::new(opts, &suffix);

    // The queues are declared before the broker's memory is first read, and by a connection
    // opened before then too, so the per-connection figure covers connections only.
    let admin = connect(opts, &uri).await?;
    let outcome = async {
        let channel = step("channel.open", admin.create_channel()).await?;
        let declared = declare(opts, &channel, &plan).await;
        let outcome = match declared {
            Ok(()) => bench(opts, &uri, &plan, &suffix).await,
            Err(e) => Err(e),
        };
        delete(opts, &uri, &channel, &plan).await;
        outcome
    }
    .await;
    let _ = tokio::time::timeout(CLOSE_WAIT, admin.close(200, "OK".into())).await;
    outcome
}

/// Deletes the run's queues and exchange, best effort and bounded: the names are unique, so a
/// leftover only costs the broker memory (and disk, when durable). When the run's failure (or
/// a failed deletion, which closes the channel) took the admin channel down, a fresh
/// connection does the rest.
async fn delete(opts: &BenchOptions, uri: &str, channel: &Channel, plan: &Plan) {
    // Queues first: their bindings go with them, and the exchange is then unused.
    let mut all: Vec<(bool, &str)> = plan.queues.iter().map(|q| (true, q.as_str())).collect();
    if let Some(exchange) = &plan.exchange {
        all.push((false, exchange.as_str()));
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        let left = delete_on(channel, &all).await;
        if left.is_empty() {
            return;
        }
        let Ok(connection) = connect(opts, uri).await else {
            return;
        };
        if let Ok(channel) = connection.create_channel().await {
            delete_on(&channel, left).await;
        }
        let _ = connection.close(200, "OK".into()).await;
    })
    .await;
}

/// Deletes (is a queue, name) in order until one fails; returns what is left, that one first.
async fn delete_on<'a>(
    channel: &Channel,
    mut left: &'a [(bool, &'a str)],
) -> &'a [(bool, &'a str)] {
    while let Some(((queue, name), rest)) = left.split_first() {
        let deleted = if *queue {
            channel
                .queue_delete((*name).into(), QueueDeleteOptions::default())
                .await
                .map(|_| ())
        } else {
            channel
                .exchange_delete((*name).into(), ExchangeDeleteOptions::default())
                .await
        };
        if deleted.is_err() {
            break;
        }
        left = rest;
    }
    left
}

async fn declare(opts: &BenchOptions, channel: &Channel, plan: &Plan) -> Result<(), BenchError> {
    if let Some(exchange) = &plan.exchange {
        let options = ExchangeDeclareOptions {
            durable: opts.durable,
            ..Default::default()
        };
        step(
            "exchange.declare",
            channel.exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                options,
                FieldTable::default(),
            ),
        )
        .await?;
    }
    let options = QueueDeclareOptions {
        durable: opts.durable,
        ..Default::default()
    };
    for queue in &plan.queues {
        step(
            "queue.declare",
            channel.queue_declare(queue.as_str().into(), options, FieldTable::default()),
        )
        .await?;
        if let Some(exchange) = &plan.exchange {
            step(
                "queue.bind",
                channel.queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }
    }
    Ok(())
}

/// Everything between declaring and deleting the queues. Whatever happens, every connection
/// it opened is closed before it returns.
async fn bench(
    opts: &BenchOptions,
    uri: &str,
    plan: &Plan,
    suffix: &str,
) -> Result<Report, BenchError> {
    let mut connections: Vec<Connection> = Vec::new();
    let outcome = traffic(opts, uri, plan, suffix, &mut connections).await;
    let _ = tokio::time::timeout(
        CLOSE_WAIT,
        futures::future::join_all(connections.iter().map(|c| c.close(200, "OK".into()))),
    )
    .await;
    outcome
}

async fn traffic(
    opts: &BenchOptions,
    uri: &str,
    plan: &Plan,
    suffix: &str,
    connections: &mut Vec<Connection>,
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
    let mut idle = stream::iter(0..opts.idle_connections)
        .map(|_| connect(opts, uri))
        .buffer_unordered(CONNECT_PARALLEL);
    while let Some(opened) = idle.next().await {
        connections.push(opened?);
    }
    drop(idle);

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
                let connection = connect(opts, uri).await?;
                let consumer = async {
                    let channel = step("channel.open", connection.create_channel()).await?;
                    if confirms {
                        step(
                            "basic.qos",
                            channel.basic_qos(opts.prefetch, BasicQosOptions::default()),
                        )
                        .await?;
                    }
                    let options = BasicConsumeOptions {
                        no_ack: !confirms,
                        ..Default::default()
                    };
                    let tag = format!("tributary-bench-{suffix}-c{j}");
                    let consumer = step(
                        "basic.consume",
                        channel.basic_consume(
                            queue.as_str().into(),
                            tag.into(),
                            options,
                            FieldTable::default(),
                        ),
                    )
                    .await?;
                    Ok((channel, consumer))
                }
                .await;
                // The connection comes back even when the consumer failed, to be closed.
                Ok::<_, BenchError>((j, connection, consumer))
            }
        })
        .buffer_unordered(CONNECT_PARALLEL);
    while let Some(next) = opened.next().await {
        let (j, connection, consumer) = next?;
        connections.push(connection);
        let (channel, consumer) = consumer?;
        consumers.spawn(consume(
            j,
            consumer,
            channel,
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
            let connection = connect(opts, uri).await?;
            let channel = async {
                let channel = step("channel.open", connection.create_channel()).await?;
                if confirms {
                    step(
                        "confirm.select",
                        channel.confirm_select(ConfirmSelectOptions::default()),
                    )
                    .await?;
                }
                Ok(channel)
            }
            .await;
            Ok::<_, BenchError>((connection, channel))
        })
        .buffered(CONNECT_PARALLEL)
        .collect()
        .await;
    let mut channels = Vec::with_capacity(opts.producers);
    for next in opened {
        let (connection, channel) = next?;
        connections.push(connection);
        channels.push(channel?);
    }
    note_rss(&mut report, opts, before);

    let schedule = Arc::new(Schedule::new(opts, &tally, failure.clone()));
    let mut producers = JoinSet::new();
    for (p, channel) in channels.into_iter().enumerate() {
        let (exchange, routing_key) = plan.target(p);
        let publisher = Publisher {
            p,
            channel,
            exchange,
            routing_key,
            confirms,
            persistent: opts.durable,
            size: opts.size,
            copies: plan.copies(opts, p),
            window: opts.inflight.unwrap_or(CONFIRM_WINDOW),
            tally: tally.clone(),
        };
        let (schedule, failure) = (schedule.clone(), failure.clone());
        producers.spawn(async move {
            if let Err(e) = publisher.run(&schedule).await {
                failure.set(e);
            }
        });
    }
    let bar = schedule.drive(opts, &tally, &mut producers).await;
    let send_seconds = schedule.start.elapsed().as_secs_f64();
    drain(&tally, &failure, bar.as_ref()).await;
    let elapsed = schedule.start.elapsed();
    // lapin reports a lost connection only to whoever uses it next; idle ones nobody uses.
    let lost = connections
        .iter()
        .filter(|c| !c.status().connected())
        .count();
    if lost > 0 {
        failure.set(BenchError::Refused(format!(
            "{lost} of {} connections closed during the run",
            connections.len()
        )));
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // Consumers return at once when told to stop; the bound only guards against surprises.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
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

/// Records deliveries into its queue's sink until the run stops. With `ack_batch`, acks
/// manually: one `multiple` ack per batch or every [`ACK_EVERY`], whichever comes first.
#[allow(clippy::too_many_arguments)]
async fn consume(
    j: usize,
    mut consumer: Consumer,
    channel: Channel,
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
    let result: Result<(), BenchError> = async {
        loop {
            tokio::select! {
                // Once the run is over, deliveries no longer matter.
                biased;
                _ = stop.changed() => return Ok(()),
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        sink.lock().record(&tally, &delivery.data);
                        if let Some(batch) = ack_batch {
                            last_tag = delivery.delivery_tag;
                            unacked += 1;
                            if unacked >= batch {
                                ack(&channel, last_tag).await?;
                                unacked = 0;
                            }
                        }
                    }
                    Some(Err(e)) => return Err(BenchError::Refused(format!("consumer {j}: {e}"))),
                    None => {
                        return Err(BenchError::Refused(format!(
                            "consumer {j}: the broker cancelled the consumer"
                        )));
                    }
                },
                _ = tick.tick(), if unacked > 0 => {
                    ack(&channel, last_tag).await?;
                    unacked = 0;
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

/// Acknowledges every delivery up to `tag` on the channel.
async fn ack(channel: &Channel, tag: u64) -> Result<(), BenchError> {
    step(
        "basic.ack",
        channel.basic_ack(tag, BasicAckOptions { multiple: true }),
    )
    .await
}

/// One publisher's sending side.
struct Publisher {
    p: usize,
    channel: Channel,
    /// Where it publishes: "" and a queue name (the default exchange), or the fanout exchange
    /// and "".
    exchange: String,
    routing_key: String,
    confirms: bool,
    persistent: bool,
    size: usize,
    /// Deliveries each message must make: 1, or 0 when no consumer reads its queue; with
    /// `--fanout`, one per queue.
    copies: u64,
    /// Unconfirmed publishes allowed before waiting for confirms.
    window: usize,
    tally: Arc<Tally>,
}

impl Publisher {
    /// Publishes on the schedule; with confirms, keeps up to `window` unconfirmed
    /// and then waits (bounded) for the rest.
    async fn run(&self, schedule: &Schedule) -> Result<(), BenchError> {
        let p = self.p;
        let properties = if self.persistent {
            BasicProperties::default().with_delivery_mode(2)
        } else {
            BasicProperties::default()
        };
        let mut payload = vec![0u8; self.size];
        let mut unconfirmed = FuturesUnordered::new();
        let mut seq = 0u64;
        while schedule.next(seq).await {
            stamp(&mut payload, p as u32, seq, now_ns());
            let at = Instant::now();
            // lapin returns once the frames are written; a broker that stops reading (RabbitMQ
            // blocks publishers on a memory alarm) must not hold the run forever.
            let confirm = tokio::time::timeout(
                CONNECT_WAIT,
                self.channel.basic_publish(
                    self.exchange.as_str().into(),
                    self.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties.clone(),
                ),
            )
            .await
            .map_err(|_| {
                BenchError::Refused(format!(
                    "publisher {p}: a publish was not written within {} s (is the broker \
                     blocking publishers?)",
                    CONNECT_WAIT.as_secs()
                ))
            })?
            .map_err(|e| BenchError::Refused(format!("publisher {p}: basic.publish: {e}")))?;
            seq += 1;
            if !self.confirms {
                self.tally.sent(self.copies);
                continue;
            }
            unconfirmed.push(confirm.map(move |c| (c, at)));
            // Settle what is already confirmed without waiting...
            while let Some(Some((confirmation, at))) = unconfirmed.next().now_or_never() {
                self.settle(confirmation, at)?;
            }
            // ...and wait only when the window is full.
            while unconfirmed.len() >= self.window {
                match tokio::time::timeout(DRAIN_WAIT, unconfirmed.next()).await {
                    Ok(Some((confirmation, at))) => self.settle(confirmation, at)?,
                    Ok(None) => break,
                    Err(_) => {
                        return Err(BenchError::Refused(format!(
                            "publisher {p}: no confirm for {} s",
                            DRAIN_WAIT.as_secs()
                        )));
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
        while !unconfirmed.is_empty() {
            match tokio::time::timeout_at(deadline, unconfirmed.next()).await {
                Ok(Some((confirmation, at))) => self.settle(confirmation, at)?,
                Ok(None) => break,
                Err(_) => {
                    return Err(BenchError::Refused(format!(
                        "publisher {p}: {} of {seq} publishes unconfirmed {} s after its last \
                         send",
                        unconfirmed.len(),
                        DRAIN_WAIT.as_secs()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Counts a confirmed message; anything but a plain ack fails the run.
    fn settle(
        &self,
        confirmation: lapin::Result<Confirmation>,
        at: Instant,
    ) -> Result<(), BenchError> {
        let p = self.p;
        match confirmation {
            Ok(Confirmation::Ack(None)) => {
                self.tally.sent(self.copies);
                self.tally.ack_latency(at);
                Ok(())
            }
            Ok(Confirmation::Ack(Some(returned))) => Err(BenchError::Refused(format!(
                "publisher {p}: message returned: {} {}",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Confirmation::Nack(_)) => Err(BenchError::Refused(format!(
                "publisher {p}: the broker nacked a message"
            ))),
            Ok(Confirmation::NotRequested) => Err(BenchError::Refused(format!(
                "publisher {p}: publisher confirms are not on"
            ))),
            Err(e) => Err(BenchError::Refused(format!("publisher {p}: confirm: {e}"))),
        }
    }
}

/// Opens a connection (connection.open-ok), bounded by [`CONNECT_WAIT`].
async fn connect(opts: &BenchOptions, uri: &str) -> Result<Connection, BenchError> {
    match tokio::time::timeout(
        CONNECT_WAIT,
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    {
        Err(_) => Err(unreachable(opts, "no connection.open-ok")),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(match e.kind() {
            ErrorKind::IOError(io) => unreachable(opts, io),
            _ => BenchError::Refused(format!("connection: {e}")),
        }),
    }
}

/// One AMQP request, bounded by [`CONNECT_WAIT`]; an error or no answer fails the run.
async fn step<T>(
    what: &str,
    request: impl Future<Output = lapin::Result<T>>,
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

/// `--target` HOST:PORT as an AMQP URI on the default vhost with RabbitMQ's default
/// guest/guest user; a full `amqp://` URI is taken as given (other users, vhosts).
fn amqp_uri(target: &str) -> String {
    if target.contains("://") {
        target.to_string()
    } else {
        format!("amqp://guest:guest@{target}/%2f")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_become_uris() {
        assert_eq!(
            amqp_uri("127.0.0.1:5672"),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(amqp_uri("amqp://u:p@h:1/v"), "amqp://u:p@h:1/v");
    }

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
