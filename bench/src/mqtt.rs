//! `tributary bench mqtt`: rumqttc publishers and subscribers (MQTT 3.1.1, clean sessions).
//!
//! Every connection runs its own rumqttc event loop in a task. Subscribers each own a [`Sink`];
//! publishers count a message as sent when the broker acknowledges it (PUBACK at QoS 1, PUBCOMP
//! at QoS 2) or, at QoS 0, once the client wrote it to the socket.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream;
use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions,
    Outgoing, Packet, QoS, SubscribeReasonCode,
};
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

const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// QoS 1/2 publishes a publisher keeps unacknowledged; rumqttc stops reading its request queue
/// when they are all out.
/// Default of `--inflight`.
const INFLIGHT: u16 = 100;
/// Publishes queued in a client ahead of its event loop: enough that the loop never waits for
/// its producer (which refills within a millisecond), few enough that the queue does not add
/// much to the measured latency. Also bounded in bytes over all publishers, so 100 publishers
/// of large messages do not hold gigabytes when the broker is slow.
const MAX_QUEUE: usize = 1_000;
const QUEUE_BYTES: usize = 256 << 20;
/// Subscribers and idle connections only queue SUBSCRIBE and DISCONNECT.
const CONTROL_QUEUE: usize = 16;

pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    opts.validate()?;
    let (host, port) = split_target(&opts.target)?;
    let qos = match opts.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let suffix = run_suffix();
    if opts.kafka_consumers.is_some() && opts.topics != 1 {
        return Err(BenchError::Invalid(
            "--kafka-consumers reads one Kafka topic: --topics must be 1".into(),
        ));
    }
    // A Kafka topic name has no '/'.
    let topics: Vec<String> = match &opts.kafka_consumers {
        Some(_) => vec![format!("tributary-bench-{suffix}")],
        None => (0..opts.topics)
            .map(|t| format!("tributary-bench/{suffix}/{t}"))
            .collect(),
    };
    let inflight = u16::try_from(opts.inflight.unwrap_or(INFLIGHT.into())).map_err(|_| {
        BenchError::Invalid("--inflight is at most 65535 for MQTT (packet ids)".into())
    })?;
    let opener = Opener {
        opts,
        host: &host,
        port,
        suffix: &suffix,
        inflight,
    };
    let tally = Arc::new(Tally::new(opts.producers));
    let failure = Arc::new(Failure::default());
    let (stop_tx, stop) = watch::channel(false);
    // Every connection's event loop. Dropping the set (an early `?`) aborts them all, which
    // closes their sockets.
    let mut loops: JoinSet<Option<Sink>> = JoinSet::new();
    let mut report = Report {
        protocol: "mqtt".into(),
        label: String::new(),
        qos: opts.qos,
        ..Default::default()
    };

    let before = opts.broker_pid.and_then(rss_kib);
    let cpu_before = opts.broker_pid.and_then(cpu_ticks);
    let mut idle = stream::iter(0..opts.idle_connections)
        .map(|i| {
            opener.open(
                format!("i{i}"),
                format!("idle connection {i}"),
                CONTROL_QUEUE,
            )
        })
        .buffer_unordered(CONNECT_PARALLEL);
    while let Some(opened) = idle.next().await {
        loops.spawn(opened?.pump(stop.clone(), failure.clone(), |_| Ok(())));
    }
    drop(idle);

    // Or a Kafka consumer group, assigned every partition before the first publish.
    let group = match &opts.kafka_consumers {
        Some(bootstrap) => {
            report.protocol = "mqtt->kafka".into();
            Some(crate::kafka::GroupReaders::start(opts, bootstrap, &topics[0], &tally).await?)
        }
        None => None,
    };
    let mqtt_subscribers = if group.is_some() { 0 } else { opts.consumers };
    // Subscribers are all acknowledged before the first publish, so none misses a message.
    let mut subscribers = stream::iter(0..mqtt_subscribers)
        .map(|j| {
            let (opener, topic) = (&opener, &topics[j % topics.len()]);
            async move {
                let role = format!("subscriber {j}");
                let mut link = opener.open(format!("s{j}"), role, CONTROL_QUEUE).await?;
                link.subscribe(topic, qos).await?;
                Ok::<_, BenchError>(link)
            }
        })
        .buffer_unordered(CONNECT_PARALLEL);
    while let Some(opened) = subscribers.next().await {
        let link = opened?;
        let (stop, failure, tally) = (stop.clone(), failure.clone(), tally.clone());
        let mut sink = tally.sink();
        loops.spawn(async move {
            // rumqttc acknowledges QoS 1/2 deliveries itself.
            link.pump(stop, failure, |event| {
                if let Event::Incoming(Packet::Publish(publish)) = event {
                    sink.record(&tally, &publish.payload);
                }
                Ok(())
            })
            .await;
            Some(sink)
        });
    }
    drop(subscribers);

    let queue = (QUEUE_BYTES / opts.producers / opts.size)
        .clamp(16, MAX_QUEUE.min(inflight.into()).max(16));
    // `buffered` keeps publisher p at index p.
    let opened: Vec<_> = stream::iter(0..opts.producers)
        .map(|p| opener.open(format!("p{p}"), format!("publisher {p}"), queue))
        .buffered(CONNECT_PARALLEL)
        .collect()
        .await;
    let mut producers = Vec::with_capacity(opts.producers);
    for (p, opened) in opened.into_iter().enumerate() {
        let link = opened?;
        let acks = Arc::new(Acks::default());
        producers.push(Producer {
            p,
            client: link.client.clone(),
            acks: acks.clone(),
            topic: topics[p % topics.len()].clone(),
            qos,
            size: opts.size,
        });
        let mut state = Publisher {
            acks,
            tally: tally.clone(),
            copies: opts.copies_for_producer(p),
            qos,
            sent_at: vec![VecDeque::new(); inflight as usize + 1],
        };
        loops.spawn(link.pump(stop.clone(), failure.clone(), move |event| {
            state.on_event(event)
        }));
    }
    note_rss(&mut report, opts, before);

    let schedule = Arc::new(Schedule::new(opts, &tally, failure.clone()));
    let mut sending = JoinSet::new();
    for producer in producers {
        let (schedule, failure) = (schedule.clone(), failure.clone());
        sending.spawn(async move { producer.run(&schedule, &failure).await });
    }
    let bar = schedule.drive(opts, &tally, &mut sending).await;
    let send_seconds = schedule.start.elapsed().as_secs_f64();
    drain(&tally, &failure, bar.as_ref()).await;
    let elapsed = schedule.start.elapsed();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // Every loop disconnects within CLOSE_WAIT; the extra second covers scheduling. Loops still
    // running after that are aborted when `loops` drops; their sinks only held latencies.
    if let Some(group) = group {
        group.finish(&tally);
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(CLOSE_WAIT + Duration::from_secs(1), async {
        while let Some(joined) = loops.join_next().await {
            if let Ok(Some(sink)) = joined {
                tally.absorb(&sink);
            }
        }
    })
    .await;

    // MQTT orders QoS 1 and 2 messages per publisher and topic; QoS 0 promises nothing, but
    // loss still fails the run: a broker that drops messages has not delivered the workload.
    let mut report = conclude(
        report,
        opts,
        &tally,
        &failure,
        elapsed,
        send_seconds,
        opts.qos >= 1,
    )?;
    note_cpu(&mut report, opts, cpu_before);
    Ok(report)
}

/// Opens connections for one run.
struct Opener<'a> {
    opts: &'a BenchOptions,
    host: &'a str,
    port: u16,
    suffix: &'a str,
    /// QoS 1/2 publishes unacknowledged per connection (rumqttc's window and packet ids).
    inflight: u16,
}

impl Opener<'_> {
    /// Connects and waits for CONNACK. `name` makes the client id unique in the run; `role`
    /// names the connection in errors.
    async fn open(&self, name: String, role: String, queue: usize) -> Result<Link, BenchError> {
        // "tb" + 8 hex + role letter + index stays within the 23 characters MQTT 3.1.1
        // servers must accept.
        let id = format!("tb{}{name}", self.suffix);
        let mut options = MqttOptions::new(id, self.host, self.port);
        let max_packet = self.opts.size + 1024;
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(max_packet, max_packet)
            .set_inflight(self.inflight);
        let (client, mut eventloop) = AsyncClient::new(options, queue);
        let mut network = NetworkOptions::new();
        // Latency is measured per message: do not let Nagle hold small publishes back.
        network.set_tcp_nodelay(true);
        // rumqttc bounds both connecting and every flush by this.
        network.set_connection_timeout(CONNECT_WAIT.as_secs());
        eventloop.set_network_options(network);
        let target = &self.opts.target;
        match tokio::time::timeout(CONNECT_WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok(Link {
                client,
                eventloop,
                role,
            }),
            Err(_) => Err(unreachable(self.opts, "no CONNACK")),
            Ok(Err(ConnectionError::Io(e))) => Err(unreachable(self.opts, e)),
            Ok(Err(ConnectionError::NetworkTimeout)) => {
                Err(unreachable(self.opts, "connect timed out"))
            }
            Ok(Err(ConnectionError::ConnectionRefused(code))) => Err(BenchError::Refused(format!(
                "{role}: CONNECT refused with {code:?}"
            ))),
            // Something answered, but not in MQTT (an HTTP proxy's reply reads as a PUBACK).
            Ok(Err(ConnectionError::NotConnAck(packet))) => Err(BenchError::Refused(format!(
                "no MQTT broker at {target}? expected CONNACK, got {packet:?}"
            ))),
            Ok(Ok(other)) => Err(BenchError::Refused(format!(
                "no MQTT broker at {target}? expected CONNACK, got {other:?}"
            ))),
            Ok(Err(e)) => Err(BenchError::Refused(format!("{role}: CONNECT failed: {e}"))),
        }
    }
}

/// One open connection and the event loop that drives it.
struct Link {
    client: AsyncClient,
    eventloop: EventLoop,
    /// Names the connection in errors ("subscriber 3").
    role: String,
}

impl Link {
    /// Subscribes and waits for the SUBACK, which must grant the QoS asked for: a downgraded
    /// subscription would measure a different workload.
    async fn subscribe(&mut self, topic: &str, qos: QoS) -> Result<(), BenchError> {
        let role = &self.role;
        self.client
            .subscribe(topic, qos)
            .await
            .map_err(|e| BenchError::Io(format!("{role}: SUBSCRIBE {topic}: {e}")))?;
        let eventloop = &mut self.eventloop;
        let granted = tokio::time::timeout(CONNECT_WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => return Ok(ack.return_codes),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(BenchError::Refused(format!(
                            "{role}: connection lost before SUBACK: {e}"
                        )));
                    }
                }
            }
        })
        .await
        .map_err(|_| {
            BenchError::Refused(format!(
                "{role}: no SUBACK for {topic} within {} s",
                CONNECT_WAIT.as_secs()
            ))
        })??;
        match granted.first() {
            Some(SubscribeReasonCode::Success(granted)) if *granted == qos => Ok(()),
            Some(SubscribeReasonCode::Success(granted)) => Err(BenchError::Refused(format!(
                "{role}: SUBSCRIBE {topic} at {qos:?} was granted only {granted:?}"
            ))),
            _ => Err(BenchError::Refused(format!(
                "{role}: SUBSCRIBE {topic} failed"
            ))),
        }
    }

    /// Polls the connection until the run stops, handing each event to `handle`; a
    /// connection error or an error from `handle` fails the run. Disconnects politely at the
    /// end. (rumqttc sends PINGREQs from here too, which keeps idle connections open.)
    async fn pump(
        mut self,
        mut stop: watch::Receiver<bool>,
        failure: Arc<Failure>,
        mut handle: impl FnMut(Event) -> Result<(), BenchError>,
    ) -> Option<Sink> {
        loop {
            tokio::select! {
                // Once the run is over, events no longer matter.
                biased;
                _ = stop.changed() => break,
                event = self.eventloop.poll() => match event {
                    Ok(event) => {
                        if let Err(e) = handle(event) {
                            failure.set(e);
                            return None;
                        }
                    }
                    Err(e) => {
                        if !*stop.borrow() {
                            failure.set(BenchError::Refused(format!(
                                "{}: connection lost: {e}",
                                self.role
                            )));
                        }
                        return None;
                    }
                },
            }
        }
        // Best effort: a DISCONNECT spares the broker an error in its log.
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                loop {
                    match self.eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        None
    }
}

/// What a publisher's sending task and its event loop share.
#[derive(Default)]
struct Acks {
    /// Send times of publishes handed to the client but not yet written, oldest first. The
    /// event loop writes them in this order and only then says which packet id each got.
    queued: Mutex<VecDeque<Instant>>,
    /// Publishes counted as sent (acknowledged; written at QoS 0).
    done: AtomicU64,
}

/// A publisher's event-loop side: matches acknowledgements to send times.
struct Publisher {
    acks: Arc<Acks>,
    tally: Arc<Tally>,
    copies: u64,
    qos: QoS,
    /// Send times of the unacknowledged publishes of each packet id (ids run 1..=inflight),
    /// oldest first. At QoS 2 rumqttc frees an id at PUBREC and may reuse it before the
    /// PUBCOMP of its previous use arrives; acks of one id come back in the order it was used.
    sent_at: Vec<VecDeque<Instant>>,
}

impl Publisher {
    fn on_event(&mut self, event: Event) -> Result<(), BenchError> {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let Some(at) = self.acks.queued.lock().pop_front() else {
                    return Err(BenchError::Io(
                        "rumqttc wrote a publish the bench did not queue".into(),
                    ));
                };
                if self.qos == QoS::AtMostOnce {
                    // Nothing acknowledges QoS 0: written is as far as it can be followed.
                    self.settle(None);
                } else if let Some(slot) = self.sent_at.get_mut(pkid as usize) {
                    slot.push_back(at);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) if self.qos == QoS::AtLeastOnce => {
                self.acked(ack.pkid);
            }
            Event::Incoming(Packet::PubComp(comp)) if self.qos == QoS::ExactlyOnce => {
                self.acked(comp.pkid);
            }
            _ => {}
        }
        Ok(())
    }

    fn acked(&mut self, pkid: u16) {
        // rumqttc already fails the connection on an ack for an id it never sent.
        if let Some(at) = self
            .sent_at
            .get_mut(pkid as usize)
            .and_then(VecDeque::pop_front)
        {
            self.settle(Some(at));
        }
    }

    fn settle(&self, acked_after: Option<Instant>) {
        self.tally.sent(self.copies);
        if let Some(at) = acked_after {
            self.tally.ack_latency(at);
        }
        self.acks.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// A publisher's sending side.
struct Producer {
    p: usize,
    client: AsyncClient,
    acks: Arc<Acks>,
    topic: String,
    qos: QoS,
    size: usize,
}

impl Producer {
    /// Stamps and queues messages on the schedule, then waits (bounded) until the broker
    /// acknowledged all of them.
    async fn run(self, schedule: &Schedule, failure: &Failure) {
        let Self {
            p,
            client,
            acks,
            topic,
            qos,
            size,
        } = self;
        let mut payload = vec![0u8; size];
        let mut seq = 0u64;
        'send: while schedule.next(seq).await {
            stamp(&mut payload, p as u32, seq, now_ns());
            // Queued before the request so the event loop always finds it.
            acks.queued.lock().push_back(Instant::now());
            loop {
                match client.try_publish(topic.as_str(), qos, false, payload.clone()) {
                    Ok(()) => break,
                    // The queue is full (the event loop waits for acks) or the loop is gone,
                    // in which case it has failed the run. Retry until the run ends:
                    // `try_publish` rather than `publish`, so a stuck broker cannot hold this
                    // past the end of the run.
                    Err(ClientError::TryRequest(_)) | Err(ClientError::Request(_)) => {
                        if schedule.over() || failure.is_set() {
                            // Never handed over, so the event loop will never take its time.
                            acks.queued.lock().pop_back();
                            break 'send;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            seq += 1;
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        loop {
            let done = acks.done.load(Ordering::Acquire);
            if done >= seq || failure.is_set() {
                return;
            }
            if Instant::now() >= deadline {
                failure.set(BenchError::Refused(format!(
                    "publisher {p}: {} of {seq} publishes unacknowledged {} s after its last send",
                    seq - done,
                    DRAIN_WAIT.as_secs()
                )));
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// HOST:PORT as rumqttc wants it (it resolves "HOST:PORT" itself, so "[::1]" keeps its
/// brackets).
fn split_target(target: &str) -> Result<(String, u16), BenchError> {
    let invalid = || BenchError::Invalid(format!("--target must be HOST:PORT, got {target:?}"));
    let (host, port) = target.rsplit_once(':').ok_or_else(invalid)?;
    let port = port.parse().map_err(|_| invalid())?;
    if host.is_empty() {
        return Err(invalid());
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_into_host_and_port() {
        assert_eq!(
            split_target("127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(split_target("[::1]:1883").unwrap(), ("[::1]".into(), 1883));
        assert!(split_target("localhost").is_err());
        assert!(split_target(":1883").is_err());
        assert!(split_target("host:99999").is_err());
    }

    /// A publisher's event state with `copies` deliveries due per message.
    fn publisher(qos: QoS, copies: u64) -> (Arc<Tally>, Arc<Acks>, Publisher) {
        let tally = Arc::new(Tally::new(1));
        let acks = Arc::new(Acks::default());
        let state = Publisher {
            acks: acks.clone(),
            tally: tally.clone(),
            copies,
            qos,
            sent_at: vec![VecDeque::new(); INFLIGHT as usize + 1],
        };
        (tally, acks, state)
    }

    #[test]
    fn qos0_counts_a_publish_once_written() {
        let (tally, acks, mut state) = publisher(QoS::AtMostOnce, 3);
        acks.queued.lock().push_back(Instant::now());
        state
            .on_event(Event::Outgoing(Outgoing::Publish(0)))
            .unwrap();
        assert_eq!((tally.sent_count(), tally.expected_count()), (1, 3));
        assert_eq!(acks.done.load(Ordering::Acquire), 1);
    }

    #[test]
    fn qos1_counts_a_publish_when_acknowledged() {
        let (tally, acks, mut state) = publisher(QoS::AtLeastOnce, 1);
        acks.queued.lock().extend([Instant::now(), Instant::now()]);
        state
            .on_event(Event::Outgoing(Outgoing::Publish(1)))
            .unwrap();
        state
            .on_event(Event::Outgoing(Outgoing::Publish(2)))
            .unwrap();
        assert_eq!(tally.sent_count(), 0);
        state
            .on_event(Event::Incoming(Packet::PubAck(rumqttc::PubAck::new(2))))
            .unwrap();
        assert_eq!(tally.sent_count(), 1);
        // A second ack for the same id is not a second message.
        state
            .on_event(Event::Incoming(Packet::PubAck(rumqttc::PubAck::new(2))))
            .unwrap();
        assert_eq!(tally.sent_count(), 1);
        assert!(
            state
                .on_event(Event::Outgoing(Outgoing::Publish(3)))
                .is_err()
        );
    }

    #[test]
    fn qos2_settles_a_reused_packet_id_once_per_use() {
        let (tally, acks, mut state) = publisher(QoS::ExactlyOnce, 1);
        acks.queued.lock().extend([Instant::now(), Instant::now()]);
        // Id 5 is reused after its PUBREC, before its PUBCOMP.
        state
            .on_event(Event::Outgoing(Outgoing::Publish(5)))
            .unwrap();
        state
            .on_event(Event::Outgoing(Outgoing::Publish(5)))
            .unwrap();
        let comp = || Event::Incoming(Packet::PubComp(rumqttc::PubComp::new(5)));
        state.on_event(comp()).unwrap();
        state.on_event(comp()).unwrap();
        assert_eq!(tally.sent_count(), 2);
        assert_eq!(acks.done.load(Ordering::Acquire), 2);
    }
}
