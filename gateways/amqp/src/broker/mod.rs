//! AMQP 0-9-1 channels over the core's neutral queue engine and router.
//!
//! The gateway keeps what is AMQP: channels, delivery tags, prefetch, consumer tags,
//! publisher confirms, transactions, reply codes and x-arguments. The core keeps what
//! outlives a connection, in its own terms: a vhost is a namespace, an exchange an address,
//! a queue a queue of the engine, a consumer a credit-based subscription, an unacked
//! delivery a lease (its delivery tag maps to the lease id), a publish a router publish.
//!
//! One [`Driver`] task per connection applies the connection's commands in order and
//! merges its consumers' subscription streams; the transport (`conn.rs`) turns frames into
//! commands and events into frames.

mod args;
mod channel;
pub mod definitions;
pub(crate) mod fields;
mod message;
mod refusal;

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamMap;
use tracing::{Instrument, debug, info_span, warn};
use tributary_gateway_common::CoreClient;
use tributary_gateway_common::client::error_code;
use tributary_proto::amqp_link::{self as link, channel_command::Command, channel_event::Event};
use tributary_proto::v1;

pub use args::{DELAYED_ARG, ExchangeType};
use channel::{Chan, Consumer, SubItem, TxOp, Unacked};
use refusal::*;

/// The events of one connection, as the transport reads them.
pub type ChannelEvents =
    Pin<Box<dyn Stream<Item = Result<link::ChannelEvent, tonic::Status>> + Send>>;

/// Deliveries handed to the transport and not yet written, beyond which consumers without
/// a prefetch limit get no more credit (as RabbitMQ's credit flow towards a slow socket).
const OUTSTANDING_LIMIT: usize = 4096;
/// Credit a consumer without a prefetch limit starts with; it is given back as the
/// transport takes deliveries.
const UNLIMITED_WINDOW: u32 = 1024;
/// Credit given back to such a consumer at least this many at a time.
const CREDIT_CHUNK: u32 = 128;
/// Subscription events handled in one turn of the connection's loop at most.
const SUBSCRIPTION_BATCH: usize = 256;
/// Publishes and acks applied together at most (what is already waiting, not more).
const FAST_BATCH: usize = 256;
/// Body bytes of one publish call at most (the network transport takes 256 MiB a message).
const PUBLISH_CALL_BYTES: usize = 64 << 20;
/// Publish calls one connection has waiting for their fsync at most.
const PUBLISHES_IN_FLIGHT: usize = 32;
/// A tx.commit's staged transaction not resolved this long after staging (its gateway gone
/// in between) is rolled back by the core: RabbitMQ drops uncommitted work of a channel
/// that closes.
const STAGED_TIMEOUT_MS: i64 = 60_000;
/// Writes (publishes, and acks per queue by 10 000) of one tx.commit: the core's limit of
/// one staged transaction.
const TX_MAX_WRITES: usize = 10_000;
/// Message bytes of one tx.commit: under the core's 64 MiB per staged transaction, which
/// also holds the messages' properties (counted here roughly) and bookkeeping.
const TX_MAX_BYTES: usize = 60 << 20;
/// Ack and reject calls one connection has on their way to the core at most.
const SETTLES_IN_FLIGHT: usize = 64;
/// How long a cancel waits for the core to end the consumer's subscription.
const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a basic.get lease lasts unsettled: RabbitMQ's default consumer_timeout.
const GET_LEASE_MS: i64 = 30 * 60 * 1000;
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Exchanges every vhost has.
const PREDECLARED: &[(&str, v1::AddressKind)] = &[
    ("amq.direct", v1::AddressKind::Direct),
    ("amq.fanout", v1::AddressKind::Fanout),
    ("amq.topic", v1::AddressKind::Topic),
    ("amq.headers", v1::AddressKind::Headers),
    ("amq.match", v1::AddressKind::Headers),
];

/// See [`crate::decode_arguments`].
pub fn fuzz_arguments(data: &[u8]) {
    let _ = args::QueueArgs::parse(data);
    let _ = ExchangeType::parse("x-delayed-message", data);
    if let Ok(table) = fields::decode_table(data) {
        for v in table.inner().values() {
            let _ = fields::header_bytes(v);
        }
    }
    let properties = bytes::Bytes::copy_from_slice(data);
    let record = message::to_record(&properties, bytes::Bytes::new(), 1_000, true, 0);
    let leased = v1::LeasedMessage {
        record: Some(record),
        delivery_count: 3,
        ..Default::default()
    };
    let _ = message::delivered(&leased, true);
}

/// The namespace of a vhost: "/" is the core's default namespace (shared with Kafka and
/// MQTT); another vhost is the namespace of its name.
pub fn namespace_of(vhost: &str) -> String {
    if vhost == "/" || vhost.is_empty() {
        "default".into()
    } else {
        vhost.to_string()
    }
}

/// The AMQP side of a gateway: one per process, shared by its connections.
pub struct Broker {
    core: CoreClient,
    /// Namespaces whose predeclared exchanges this process has made sure of.
    prepared: tokio::sync::Mutex<HashSet<String>>,
}

impl Broker {
    pub fn new(core: CoreClient) -> Arc<Self> {
        Arc::new(Self {
            core,
            prepared: tokio::sync::Mutex::new(HashSet::new()),
        })
    }

    /// Serves one connection: its commands in, its events out. The stream ends once the
    /// commands ended and the connection's channels are closed (unacked deliveries back
    /// in their queues, exclusive queues deleted).
    pub fn attach(
        self: &Arc<Self>,
        commands: impl Stream<Item = link::ChannelCommand> + Send + Unpin + 'static,
    ) -> ChannelEvents {
        let (tx, rx) = mpsc::unbounded_channel();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let room = Arc::new(Notify::new());
        let events = EventStream {
            rx,
            outstanding: outstanding.clone(),
            room: room.clone(),
        };
        let broker = self.clone();
        tokio::spawn(async move {
            let driver = Driver {
                core: broker.core.clone(),
                broker,
                vhost: String::new(),
                ns: String::new(),
                owner: owner_id(),
                tx,
                outstanding,
                room,
                channels: HashMap::new(),
                subs: StreamMap::new(),
                exchanges: HashMap::new(),
                queues: HashMap::new(),
                exclusive: Vec::new(),
                settling: Arc::new(tokio::sync::Semaphore::new(SETTLES_IN_FLIGHT)),
                publishing: futures::stream::FuturesOrdered::new(),
            };
            driver.run(commands).await;
        });
        Box::pin(events)
    }
}

fn owner_id() -> String {
    format!("amqp-{}", random_tail())
}

fn random_tail() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut r = rand::rng();
    (0..22)
        .map(|_| ALPHABET[r.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Events of one connection; the transport taking a delivery makes room for more.
struct EventStream {
    rx: mpsc::UnboundedReceiver<link::ChannelEvent>,
    outstanding: Arc<AtomicUsize>,
    room: Arc<Notify>,
}

impl Stream for EventStream {
    type Item = Result<link::ChannelEvent, tonic::Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(ev)) = &polled
            && matches!(ev.event, Some(Event::Deliver(_)))
        {
            let left = self.outstanding.fetch_sub(1, Ordering::AcqRel) - 1;
            if left == OUTSTANDING_LIMIT / 2 {
                self.room.notify_one();
            }
        }
        polled.map(|p| p.map(Ok))
    }
}

/// What a connection knows about an exchange (from the core's description of it).
#[derive(Debug, Clone, Copy)]
struct ExchangeInfo {
    kind: v1::AddressKind,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    delayed: bool,
}

impl ExchangeInfo {
    fn from_response(r: &v1::DeclareAddressResponse) -> Self {
        Self {
            kind: r.kind(),
            durable: r.durable,
            auto_delete: r.auto_delete,
            internal: r.internal,
            delayed: r.arguments.contains_key(DELAYED_ARG),
        }
    }
}

/// What a connection knows about a queue it may use.
#[derive(Debug, Clone, Copy)]
struct QueueMeta {
    quorum: bool,
}

fn queue_meta(info: &v1::QueueInfo) -> QueueMeta {
    QueueMeta {
        quorum: info
            .config
            .as_ref()
            .and_then(|c| c.extra.get("x-queue-type"))
            .is_some_and(|t| t == "quorum"),
    }
}

fn ok(class_id: u32, method_id: u32) -> link::MethodOk {
    link::MethodOk {
        class_id,
        method_id,
        ..Default::default()
    }
}

fn method_ids(c: &Command) -> (u32, u32) {
    match c {
        Command::LinkOpen(_) => (10, 40),
        Command::ChannelOpen(_) => (20, 10),
        Command::ChannelClose(_) => (20, 40),
        Command::Flow(_) => (20, 20),
        Command::ExchangeDeclare(_) => (40, 10),
        Command::ExchangeDelete(_) => (40, 20),
        Command::ExchangeBind(b) => (40, if b.unbind { 40 } else { 30 }),
        Command::QueueDeclare(_) => (50, 10),
        Command::QueueBind(b) => (50, if b.unbind { 50 } else { 20 }),
        Command::QueuePurge(_) => (50, 30),
        Command::QueueDelete(_) => (50, 40),
        Command::Qos(_) => (60, 10),
        Command::Consume(_) => (60, 20),
        Command::Cancel(_) => (60, 30),
        Command::Publish(_) => (60, 40),
        Command::Get(_) => (60, 70),
        Command::Settle(s) => match s.kind() {
            link::SettleKind::SettleAck => (60, 80),
            link::SettleKind::SettleReject => (60, 90),
            link::SettleKind::SettleNack => (60, 120),
        },
        Command::Recover(_) => (60, 110),
        Command::ConfirmSelect(_) => (85, 10),
        Command::TxSelect(_) => (90, 10),
        Command::TxCommit(_) => (90, 20),
        Command::TxRollback(_) => (90, 30),
    }
}

fn is_fast(c: &Command) -> bool {
    matches!(c, Command::Publish(_) | Command::Settle(_))
}

/// What a publish needs once it is durable: its confirm, and for a mandatory one what to
/// return if nothing took it.
/// What a basic.return of a mandatory publish carries: routing key, properties, body.
type Returnable = (String, bytes::Bytes, bytes::Bytes);

struct Published {
    confirm_seq: u64,
    mandatory: Option<Returnable>,
}

struct PublishDone {
    channel: u32,
    exchange: String,
    items: Vec<Published>,
    answer: Result<v1::PublishResponse, tonic::Status>,
}

type PublishFuture = Pin<Box<dyn std::future::Future<Output = PublishDone> + Send>>;

type SubKey = (u32, String);
type SubStream = Pin<Box<dyn Stream<Item = SubItem> + Send>>;

/// One connection's channels over the core.
struct Driver {
    broker: Arc<Broker>,
    core: CoreClient,
    vhost: String,
    ns: String,
    /// Owner of the exclusive queues this connection declares.
    owner: String,
    tx: mpsc::UnboundedSender<link::ChannelEvent>,
    outstanding: Arc<AtomicUsize>,
    room: Arc<Notify>,
    channels: HashMap<u32, Chan>,
    subs: StreamMap<SubKey, SubStream>,
    exchanges: HashMap<String, ExchangeInfo>,
    queues: HashMap<String, QueueMeta>,
    exclusive: Vec<String>,
    /// Acks and rejects on their way to the core (they have no answer to wait for).
    settling: Arc<tokio::sync::Semaphore>,
    /// Publishes appended and waiting to be durable, in publish order.
    publishing: futures::stream::FuturesOrdered<PublishFuture>,
}

impl Driver {
    async fn run(mut self, mut commands: impl Stream<Item = link::ChannelCommand> + Unpin) {
        // The transport sends the link first.
        let open = loop {
            match commands.next().await {
                Some(link::ChannelCommand {
                    command: Some(Command::LinkOpen(open)),
                    ..
                }) => break open,
                Some(_) => continue,
                None => return,
            }
        };
        self.vhost = open.vhost.clone();
        self.ns = namespace_of(&open.vhost);
        // A cluster's core nodes serve shards by namespace: this connection's calls go to
        // the node serving its virtual host's.
        self.core = self.core.scoped(&self.ns);
        let span =
            info_span!("amqp_link", vhost = %open.vhost, user = %open.user, peer = %open.peer);
        async move {
            if let Err(r) = self.prepare_namespace().await {
                self.emit(0, Event::ConnectionError(channel_error(r, (10, 40))));
                return;
            }
            loop {
                tokio::select! {
                    cmd = commands.next() => {
                        let Some(cmd) = cmd else { break };
                        self.on_command(cmd, &mut commands).await;
                    }
                    Some((key, item)) = self.subs.next(), if !self.subs.is_empty() => {
                        self.on_subscription(key, item).await;
                        // What the consumers already have waiting goes out in the same turn.
                        for _ in 0..SUBSCRIPTION_BATCH {
                            match self.subs.next().now_or_never() {
                                Some(Some((key, item))) => self.on_subscription(key, item).await,
                                _ => break,
                            }
                        }
                    }
                    Some(done) = self.publishing.next(), if !self.publishing.is_empty() => {
                        self.on_published(done).await;
                    }
                    _ = self.room.notified() => self.give_owed_credit(),
                }
            }
            self.published_all().await;
            self.close_connection().await;
        }
        .instrument(span)
        .await
    }

    fn emit(&self, channel: u32, event: Event) {
        let _ = self.tx.send(link::ChannelEvent {
            channel,
            event: Some(event),
        });
    }

    /// The vhost's namespace and its predeclared exchanges, once per process.
    async fn prepare_namespace(&mut self) -> Res<()> {
        let mut prepared = self.broker.prepared.lock().await;
        if prepared.contains(&self.ns) {
            return Ok(());
        }
        if self.ns != "default" {
            let r = self
                .core
                .admin
                .clone()
                .create_namespace(v1::CreateNamespaceRequest {
                    name: self.ns.clone(),
                    ..Default::default()
                })
                .await;
            if let Err(s) = r
                && error_code(&s) != v1::ErrorCode::NamespaceExists
            {
                return Err(from_status(&s));
            }
        }
        for (name, kind) in PREDECLARED {
            self.core
                .admin
                .clone()
                .declare_address(v1::DeclareAddressRequest {
                    namespace: self.ns.clone(),
                    name: (*name).into(),
                    kind: *kind as i32,
                    durable: true,
                    ..Default::default()
                })
                .await
                .map_err(|s| from_status(&s))?;
        }
        prepared.insert(self.ns.clone());
        Ok(())
    }

    async fn on_command(
        &mut self,
        first: link::ChannelCommand,
        commands: &mut (impl Stream<Item = link::ChannelCommand> + Unpin),
    ) {
        let Some(command) = first.command else { return };
        if !is_fast(&command) {
            self.command(first.channel, command).await;
            return;
        }
        // Publishes and acks already waiting are applied together (one core call per run
        // of publishes to the same exchange and key, one per queue for acks).
        let mut batch = vec![(first.channel, command)];
        let mut next = None;
        while batch.len() < FAST_BATCH {
            match commands.next().now_or_never() {
                Some(Some(link::ChannelCommand {
                    channel,
                    command: Some(c),
                })) => {
                    if is_fast(&c) {
                        batch.push((channel, c));
                    } else {
                        next = Some((channel, c));
                        break;
                    }
                }
                _ => break,
            }
        }
        let mut run: Vec<(u32, Command)> = Vec::new();
        for (channel, c) in batch {
            if let Some((_, last)) = run.last()
                && std::mem::discriminant(last) != std::mem::discriminant(&c)
            {
                self.fast_run(std::mem::take(&mut run)).await;
            }
            run.push((channel, c));
        }
        self.fast_run(run).await;
        if let Some((channel, c)) = next {
            self.command(channel, c).await;
        }
    }

    async fn fast_run(&mut self, run: Vec<(u32, Command)>) {
        let mut publishes = Vec::new();
        let mut settles = Vec::new();
        for (channel, c) in run {
            match c {
                Command::Publish(p) => publishes.push((channel, p)),
                Command::Settle(s) => settles.push((channel, s)),
                _ => {}
            }
        }
        if !publishes.is_empty() {
            self.publishes(publishes).await;
        }
        if !settles.is_empty() {
            self.settles(settles).await;
        }
    }

    /// Closes a channel on a refusal (the connection, for connection-level codes).
    async fn fail(&mut self, channel: u32, r: Refusal, ids: (u32, u32)) {
        debug!(channel, code = r.code, text = %r.text, "amqp command refused");
        let connection = r.connection || channel == 0;
        let err = channel_error(r, ids);
        self.emit(
            channel,
            if connection {
                Event::ConnectionError(err)
            } else {
                Event::ChannelError(err)
            },
        );
        self.close_channel(channel).await;
    }

    async fn command(&mut self, channel: u32, command: Command) {
        // Anything but a publish or an ack sees the publishes before it in their queues
        // (RabbitMQ's order within a channel), and their confirms go out first.
        self.published_all().await;
        let ids = method_ids(&command);
        if let Err(r) = self.apply(channel, command).await {
            self.fail(channel, r, ids).await;
        }
    }

    async fn apply(&mut self, channel: u32, command: Command) -> Res<()> {
        match command {
            Command::ChannelOpen(_) => {
                if self.channels.contains_key(&channel) {
                    return Err(refuse(
                        CHANNEL_ERROR,
                        format!("second 'channel.open' seen on channel {channel}"),
                    ));
                }
                self.channels.insert(channel, Chan::new());
                self.emit(channel, Event::Ok(ok(20, 11)));
                return Ok(());
            }
            Command::ChannelClose(_) => {
                self.close_channel(channel).await;
                return Ok(());
            }
            Command::LinkOpen(_) => return Ok(()),
            _ if !self.channels.contains_key(&channel) => {
                // The channel closed on an error; commands in flight are dropped.
                return Ok(());
            }
            _ => {}
        }
        match command {
            Command::Flow(active) => {
                self.emit(
                    channel,
                    Event::Ok(link::MethodOk {
                        active,
                        ..ok(20, 21)
                    }),
                );
            }
            Command::Qos(q) => {
                let ch = self.chan(channel);
                if q.global {
                    ch.global_prefetch = q.prefetch_count;
                } else {
                    ch.prefetch = q.prefetch_count;
                }
                self.emit(channel, Event::Ok(ok(60, 11)));
                self.release_held(channel);
            }
            Command::ConfirmSelect(_) => {
                let ch = self.chan(channel);
                if ch.tx.is_some() {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                ch.confirm = true;
                self.emit(channel, Event::Ok(ok(85, 11)));
            }
            Command::TxSelect(_) => {
                let ch = self.chan(channel);
                if ch.confirm {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                ch.tx.get_or_insert_with(Vec::new);
                self.emit(channel, Event::Ok(ok(90, 11)));
            }
            Command::TxRollback(_) => {
                let ch = self.chan(channel);
                let Some(t) = ch.tx.as_mut() else {
                    return Err(refuse(PRECONDITION_FAILED, "channel is not transactional"));
                };
                t.clear();
                ch.tx_settled.clear();
                self.emit(channel, Event::Ok(ok(90, 31)));
            }
            Command::TxCommit(_) => self.tx_commit(channel).await?,
            Command::Publish(p) => self.publishes(vec![(channel, p)]).await,
            Command::Settle(s) => self.settles(vec![(channel, s)]).await,
            Command::Recover(requeue) => {
                if !requeue {
                    return Err(refuse(
                        NOT_IMPLEMENTED,
                        "basic.recover with requeue=false is not supported",
                    ));
                }
                let tags: Vec<u64> = self.chan(channel).unacked.keys().copied().collect();
                self.requeue(channel, &tags).await;
                self.emit(channel, Event::Ok(ok(60, 111)));
            }
            Command::Consume(b) => self.consume(channel, b).await?,
            Command::Cancel(tag) => {
                self.cancel(channel, &tag).await;
                self.emit(
                    channel,
                    Event::Ok(link::MethodOk {
                        name: tag,
                        ..ok(60, 31)
                    }),
                );
            }
            Command::Get(g) => self.get(channel, g).await?,
            Command::ExchangeDeclare(d) => self.exchange_declare(channel, d).await?,
            Command::ExchangeDelete(d) => self.exchange_delete(channel, d).await?,
            Command::ExchangeBind(b) => {
                let destination = v1::binding::Destination::Address(b.destination.clone());
                let class = 40;
                self.bind_command(
                    channel,
                    class,
                    &b.source,
                    destination,
                    &b.routing_key,
                    &b.arguments,
                    b.unbind,
                )
                .await?;
            }
            Command::QueueBind(b) => {
                let destination = v1::binding::Destination::Queue(b.queue.clone());
                let class = 50;
                self.bind_command(
                    channel,
                    class,
                    &b.exchange,
                    destination,
                    &b.routing_key,
                    &b.arguments,
                    b.unbind,
                )
                .await?;
            }
            Command::QueueDeclare(d) => self.queue_declare(channel, d).await?,
            Command::QueuePurge(name) => {
                self.queue_access(&name).await?;
                let r = self
                    .core
                    .admin
                    .clone()
                    .purge_queue(v1::PurgeQueueRequest {
                        id: Some(self.queue_id(&name)),
                    })
                    .await
                    .map_err(|s| self.queue_status(&name, &s))?
                    .into_inner();
                self.emit(
                    channel,
                    Event::Ok(link::MethodOk {
                        message_count: r.messages_purged.max(0) as u64,
                        ..ok(50, 31)
                    }),
                );
            }
            Command::QueueDelete(d) => self.queue_delete(channel, d).await?,
            Command::LinkOpen(_) | Command::ChannelOpen(_) | Command::ChannelClose(_) => {}
        }
        Ok(())
    }

    fn chan(&mut self, channel: u32) -> &mut Chan {
        self.channels.entry(channel).or_insert_with(Chan::new)
    }

    fn queue_id(&self, name: &str) -> v1::QueueId {
        v1::QueueId {
            namespace: self.ns.clone(),
            name: name.to_string(),
        }
    }

    /// A core refusal about queue `name`, in RabbitMQ's words where it has them.
    fn queue_status(&mut self, name: &str, s: &tonic::Status) -> Refusal {
        match error_code(s) {
            v1::ErrorCode::QueueNotFound => {
                self.queues.remove(name);
                no_queue(name, &self.vhost)
            }
            v1::ErrorCode::ResourceLocked => locked(name, &self.vhost),
            _ => {
                let r = from_status(s);
                if r.code == RESOURCE_LOCKED {
                    locked(name, &self.vhost)
                } else {
                    r
                }
            }
        }
    }

    /// Checks that this connection may use queue `name` (it exists and is not another
    /// connection's exclusive queue); remembered for the connection's life.
    async fn queue_access(&mut self, name: &str) -> Res<QueueMeta> {
        if let Some(m) = self.queues.get(name) {
            return Ok(*m);
        }
        let info = self.describe_queue(name).await?;
        let meta = queue_meta(&info);
        self.queues.insert(name.to_string(), meta);
        Ok(meta)
    }

    async fn describe_queue(&mut self, name: &str) -> Res<v1::QueueInfo> {
        let r = self
            .core
            .admin
            .clone()
            .declare_queue(v1::DeclareQueueRequest {
                id: Some(self.queue_id(name)),
                passive: true,
                owner: self.owner.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| self.queue_status(name, &s))?;
        Ok(r.into_inner().queue.unwrap_or_default())
    }

    /// An exchange as the core describes it (cached for the connection's life; an
    /// exchange deleted meanwhile shows up as the core's refusal of the publish).
    async fn exchange(&mut self, name: &str) -> Res<ExchangeInfo> {
        if let Some(x) = self.exchanges.get(name) {
            return Ok(*x);
        }
        let r = self
            .core
            .admin
            .clone()
            .declare_address(v1::DeclareAddressRequest {
                namespace: self.ns.clone(),
                name: name.to_string(),
                passive: true,
                ..Default::default()
            })
            .await
            .map_err(|s| match error_code(&s) {
                v1::ErrorCode::AddressNotFound => no_exchange(name, &self.vhost),
                _ => from_status(&s),
            })?
            .into_inner();
        let info = ExchangeInfo::from_response(&r);
        self.exchanges.insert(name.to_string(), info);
        Ok(info)
    }

    /// The exchange a publish names, checked: "" (or amq.default) is the default exchange.
    async fn publish_exchange(&mut self, name: &str) -> Res<(String, Option<ExchangeInfo>)> {
        let name = if name == "amq.default" { "" } else { name };
        if name.is_empty() {
            return Ok((String::new(), None));
        }
        let x = self.exchange(name).await?;
        if x.internal {
            return Err(refuse(
                ACCESS_REFUSED,
                format!(
                    "cannot publish to internal exchange '{name}' in vhost '{}'",
                    self.vhost
                ),
            ));
        }
        Ok((name.to_string(), Some(x)))
    }

    // -----------------------------------------------------------------------------------
    // Publishing
    // -----------------------------------------------------------------------------------

    async fn publishes(&mut self, items: Vec<(u32, link::BasicPublish)>) {
        // Checked in order; a channel that fails drops the rest of its publishes.
        let mut ready: Vec<(u32, String, bool, link::BasicPublish)> = Vec::new();
        for (channel, p) in items {
            if !self.channels.contains_key(&channel) {
                continue;
            }
            match self.publish_exchange(&p.exchange).await {
                Err(r) => {
                    // Publishes checked before this one go first.
                    self.send_publishes(std::mem::take(&mut ready)).await;
                    self.fail(channel, r, (60, 40)).await;
                }
                Ok((exchange, info)) => {
                    let delayed = info.is_some_and(|x| x.delayed);
                    if let Some(t) = self.chan(channel).tx.as_mut() {
                        t.push(TxOp::Publish(p));
                        continue;
                    }
                    ready.push((channel, exchange, delayed, p));
                }
            }
        }
        self.send_publishes(ready).await;
    }

    /// Publishes through the router, one call per run of publishes of one channel to the
    /// same exchange and routing key. Each call's first half (routing and appends) is
    /// awaited here, so the runs reach their queues in publish order; its second half (the
    /// fsync) is awaited in the background, several at a time, and its returns and confirms
    /// go out when it is done ([`Driver::on_published`]).
    async fn send_publishes(&mut self, ready: Vec<(u32, String, bool, link::BasicPublish)>) {
        let now = now_ms();
        let mut i = 0;
        while i < ready.len() {
            let (channel, exchange, _, first) = &ready[i];
            let mut j = i + 1;
            let mut bytes = first.body.len();
            while j < ready.len()
                && ready[j].0 == *channel
                && ready[j].1 == *exchange
                && ready[j].3.routing_key == first.routing_key
                && bytes + ready[j].3.body.len() <= PUBLISH_CALL_BYTES
            {
                bytes += ready[j].3.body.len();
                j += 1;
            }
            let run = &ready[i..j];
            if !self.channels.contains_key(channel) {
                // The channel closed on an error meanwhile: the rest of its publishes go
                // nowhere, as RabbitMQ drops what follows a channel error.
                i = j;
                continue;
            }
            let records = run
                .iter()
                .map(|(_, _, d, p)| {
                    message::to_record(&p.properties, p.body.clone(), p.expiration_ms, *d, now)
                })
                .collect();
            let staged = self
                .core
                .publish_staged(v1::PublishRequest {
                    namespace: self.ns.clone(),
                    address: exchange.clone(),
                    routing_key: first.routing_key.clone(),
                    records,
                    ..Default::default()
                })
                .await;
            if let Err(s) = &staged
                && run.len() > 1
                && error_code(s) == v1::ErrorCode::QueueFull
            {
                // x-overflow reject-publish refused the run as a whole: one at a time, the
                // ones that fit go in and only the others are nacked (as RabbitMQ decides
                // per message).
                for one in run.iter().cloned() {
                    Box::pin(self.send_publishes(vec![one])).await;
                }
                i = j;
                continue;
            }
            let channel = *channel;
            let items: Vec<Published> = run
                .iter()
                .map(|(_, _, _, p)| Published {
                    confirm_seq: p.confirm_seq,
                    mandatory: p
                        .mandatory
                        .then(|| (p.routing_key.clone(), p.properties.clone(), p.body.clone())),
                })
                .collect();
            match staged {
                Ok(finish) => {
                    if self.publishing.len() >= PUBLISHES_IN_FLIGHT
                        && let Some(done) = self.publishing.next().await
                    {
                        self.on_published(done).await;
                    }
                    let exchange = exchange.clone();
                    self.publishing.push_back(Box::pin(async move {
                        PublishDone {
                            channel,
                            exchange,
                            items,
                            answer: finish.await,
                        }
                    }));
                }
                Err(s) if error_code(&s) == v1::ErrorCode::AddressNotFound => {
                    self.on_published(PublishDone {
                        channel,
                        exchange: exchange.clone(),
                        items,
                        answer: Err(s),
                    })
                    .await;
                }
                Err(s) => {
                    // Nacked after the confirms of the publishes before it.
                    let done = PublishDone {
                        channel,
                        exchange: exchange.clone(),
                        items,
                        answer: Err(s),
                    };
                    self.publishing
                        .push_back(Box::pin(futures::future::ready(done)));
                }
            }
            i = j;
        }
    }

    /// A publish call is done: returns for mandatory publishes nothing took, then confirms.
    async fn on_published(&mut self, done: PublishDone) {
        let PublishDone {
            channel,
            exchange,
            items,
            answer,
        } = done;
        match answer {
            Ok(a) => {
                for (k, p) in items.into_iter().enumerate() {
                    if let Some((routing_key, properties, body)) = p.mandatory
                        && a.routed.get(k).copied().unwrap_or(0) == 0
                    {
                        self.emit(
                            channel,
                            Event::Returned(link::ChannelDelivery {
                                exchange: exchange.clone(),
                                routing_key,
                                properties,
                                body,
                                reply_code: NO_ROUTE,
                                reply_text: "NO_ROUTE".into(),
                                ..Default::default()
                            }),
                        );
                    }
                    self.confirm(channel, p.confirm_seq, true);
                }
            }
            Err(s) => {
                let code = error_code(&s);
                if code == v1::ErrorCode::AddressNotFound {
                    self.exchanges.remove(&exchange);
                    let r = no_exchange(&exchange, &self.vhost);
                    self.fail(channel, r, (60, 40)).await;
                } else {
                    // A queue refused (x-overflow reject-publish) or the core failed: the
                    // publisher learns it by a nack.
                    if code != v1::ErrorCode::QueueFull {
                        warn!(error = %s, "amqp: a publish failed in the core");
                    }
                    for p in items {
                        self.confirm(channel, p.confirm_seq, false);
                    }
                }
            }
        }
    }

    /// Waits for every publish on its way: what follows sees them in their queues.
    async fn published_all(&mut self) {
        while let Some(done) = self.publishing.next().await {
            self.on_published(done).await;
        }
    }

    fn confirm(&self, channel: u32, seq: u64, ack: bool) {
        if seq != 0 {
            self.emit(channel, Event::Confirm(link::PublishConfirm { seq, ack }));
        }
    }

    /// tx.commit: the transaction's publishes and acks are one staged transaction of the
    /// core (one StageMessages, then ResolveStaged commit); commit-ok goes out once the
    /// core has committed it durably and made its writes. Rejects and nacks, which the
    /// staged model does not carry, are applied after it (see docs/compat/amqp.md).
    async fn tx_commit(&mut self, channel: u32) -> Res<()> {
        let Some(t) = self.chan(channel).tx.as_mut() else {
            return Err(refuse(PRECONDITION_FAILED, "channel is not transactional"));
        };
        let ops = std::mem::take(t);
        self.chan(channel).tx_settled.clear();
        // Acks are checked before anything applies: a bad one fails the commit whole.
        for op in &ops {
            if let TxOp::Settle(s) = op {
                self.chan(channel).check_settle(s)?;
            }
        }
        let now = now_ms();
        let mut writes = Vec::new();
        // Per publish write: what a return needs if it is mandatory and routed nowhere.
        let mut returns: Vec<(String, Option<Returnable>)> = Vec::new();
        let mut acked: Vec<u64> = Vec::new();
        let mut others: Vec<link::BasicSettle> = Vec::new();
        let mut covered = std::collections::BTreeSet::new();
        for op in ops {
            match op {
                TxOp::Publish(p) => {
                    let (exchange, info) = self.publish_exchange(&p.exchange).await?;
                    let delayed = info.is_some_and(|x| x.delayed);
                    let record = message::to_record(
                        &p.properties,
                        p.body.clone(),
                        p.expiration_ms,
                        delayed,
                        now,
                    );
                    writes.push(v1::StagedWrite {
                        write: Some(v1::staged_write::Write::Publish(v1::PublishRequest {
                            namespace: self.ns.clone(),
                            address: exchange.clone(),
                            routing_key: p.routing_key.clone(),
                            records: vec![record],
                            ..Default::default()
                        })),
                        deliver_at_ms: 0,
                    });
                    returns.push((
                        exchange,
                        p.mandatory
                            .then(|| (p.routing_key.clone(), p.properties.clone(), p.body.clone())),
                    ));
                }
                TxOp::Settle(s) => {
                    let tags: Vec<u64> = self
                        .chan(channel)
                        .tags_of(&s)
                        .into_iter()
                        .filter(|t| covered.insert(*t))
                        .collect();
                    if s.kind() == link::SettleKind::SettleAck {
                        acked.extend(tags);
                    } else {
                        others.extend(tags.into_iter().map(|t| link::BasicSettle {
                            delivery_tag: t,
                            multiple: false,
                            ..s
                        }));
                    }
                }
            }
        }
        let mut leases: Vec<(String, Vec<String>)> = Vec::new();
        {
            let ch = self.chan(channel);
            for t in &acked {
                if let Some(u) = ch.unacked.get(t) {
                    match leases.iter_mut().find(|(q, _)| *q == u.queue) {
                        Some((_, ids)) => ids.push(u.lease.clone()),
                        None => leases.push((u.queue.clone(), vec![u.lease.clone()])),
                    }
                }
            }
        }
        for (queue, lease_ids) in leases {
            for chunk in lease_ids.chunks(TX_MAX_WRITES) {
                writes.push(v1::StagedWrite {
                    write: Some(v1::staged_write::Write::Ack(v1::AckRequest {
                        queue: Some(self.queue_id(&queue)),
                        lease_ids: chunk.to_vec(),
                        no_wait_durable: false,
                    })),
                    deliver_at_ms: 0,
                });
            }
        }
        // The core's limits of one staged transaction, told in the client's terms before
        // anything is sent (and nothing of the transaction applies).
        let bytes: usize = writes
            .iter()
            .map(|w| match &w.write {
                Some(v1::staged_write::Write::Publish(p)) => p
                    .records
                    .iter()
                    .map(|r| {
                        let headers: usize = r
                            .headers
                            .iter()
                            .map(|h| h.name.len() + h.value.len() + 8)
                            .sum();
                        // Properties: the headers twice at most (raw and decoded), the rest
                        // small.
                        r.value.len() + r.key.len() + 2 * headers + 256
                    })
                    .sum::<usize>()
                    .saturating_add(p.address.len() + p.routing_key.len()),
                Some(v1::staged_write::Write::Ack(a)) => {
                    a.lease_ids.iter().map(|l| l.len() + 8).sum::<usize>()
                }
                _ => 0,
            })
            .sum();
        if writes.len() > TX_MAX_WRITES || bytes > TX_MAX_BYTES {
            return Err(refuse(
                PRECONDITION_FAILED,
                format!(
                    "transaction too large: {} publishes and acks, {bytes} bytes (at most {TX_MAX_WRITES} and {TX_MAX_BYTES} bytes per tx.commit)",
                    writes.len()
                ),
            ));
        }
        if !writes.is_empty() {
            let published = self.commit_staged(writes).await?;
            for (k, (exchange, mandatory)) in returns.into_iter().enumerate() {
                if let Some((routing_key, properties, body)) = mandatory
                    && published
                        .get(k)
                        .and_then(|p| p.routed.first())
                        .copied()
                        .unwrap_or(0)
                        == 0
                {
                    self.emit(
                        channel,
                        Event::Returned(link::ChannelDelivery {
                            exchange,
                            routing_key,
                            properties,
                            body,
                            reply_code: NO_ROUTE,
                            reply_text: "NO_ROUTE".into(),
                            ..Default::default()
                        }),
                    );
                }
            }
            // Settled in the core: off the channel, their consumers' credit back.
            let (_, credit) = self.take_unacked(channel, &acked);
            self.give_back(channel, credit);
            self.release_held(channel);
        }
        for s in others {
            self.settle(channel, s).await;
        }
        self.emit(channel, Event::Ok(ok(90, 21)));
        Ok(())
    }

    /// Stages a transaction's writes in the core and commits them: per publish write, how
    /// many destinations each record reached. A transaction left open (this gateway gone
    /// before the resolve) is rolled back by the core after `STAGED_TIMEOUT_MS`.
    async fn commit_staged(
        &mut self,
        writes: Vec<v1::StagedWrite>,
    ) -> Res<Vec<v1::PublishResponse>> {
        let mut txn = self.core.transactions.clone();
        let staged = txn
            .stage_messages(v1::StageMessagesRequest {
                namespace: self.ns.clone(),
                writes,
                timeout_ms: STAGED_TIMEOUT_MS,
                ..Default::default()
            })
            .await
            .map_err(|s| from_status(&s))?
            .into_inner();
        let req = v1::ResolveStagedRequest {
            namespace: self.ns.clone(),
            transaction_id: staged.transaction_id,
            commit: true,
        };
        let mut tries = 0;
        loop {
            match txn.resolve_staged(req.clone()).await {
                Ok(r) => return Ok(r.into_inner().published),
                // The answer may be lost with the commit made: asking again is safe (a
                // second commit answers resolved = false).
                Err(s) if s.code() == tonic::Code::Unavailable && tries < 3 => tries += 1,
                Err(s) => {
                    warn!(error = %s, "amqp: tx.commit failed in the core");
                    return Err(from_status(&s));
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Acknowledgements
    // -----------------------------------------------------------------------------------

    async fn settles(&mut self, items: Vec<(u32, link::BasicSettle)>) {
        for (channel, s) in items {
            let Some(ch) = self.channels.get_mut(&channel) else {
                continue;
            };
            let ids = method_ids(&Command::Settle(s));
            if let Err(r) = ch.check_settle(&s) {
                self.fail(channel, r, ids).await;
                continue;
            }
            if ch.tx.is_some() {
                let tags = ch.tags_of(&s);
                ch.tx_settled.extend(tags);
                if let Some(t) = ch.tx.as_mut() {
                    t.push(TxOp::Settle(s));
                }
                continue;
            }
            self.settle(channel, s).await;
        }
    }

    /// Acks, rejects or requeues the deliveries a settle names.
    async fn settle(&mut self, channel: u32, s: link::BasicSettle) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let tags = ch.tags_of(&s);
        let ack = s.kind() == link::SettleKind::SettleAck;
        if !ack && s.requeue {
            self.requeue(channel, &tags).await;
            return;
        }
        let (taken, credit) = self.take_unacked(channel, &tags);
        // An AMQP ack has no answer: the driver goes on (deliveries keep flowing) while the
        // core journals it; the credit comes back at once, the deliveries being settled as
        // far as the client is concerned. Bounded per connection.
        for (queue, leases) in by_queue(taken) {
            let id = self.queue_id(&queue);
            let Ok(permit) = self.settling.clone().acquire_owned().await else {
                return;
            };
            let core = self.core.clone();
            tokio::spawn(async move {
                let r = if ack {
                    core.ack(v1::AckRequest {
                        queue: Some(id),
                        lease_ids: leases,
                        // An AMQP ack has no answer: not waited on for the disk.
                        no_wait_durable: true,
                    })
                    .await
                    .map(|a| {
                        let expired = a.expired;
                            if !expired.is_empty() {
                                debug!(queue = %queue, count = expired.len(), "acks of leases the core no longer held");
                            }
                        })
                } else {
                    // Rejected: dead-lettered by the queue's policy, or dropped.
                    core.nack(v1::NackRequest {
                        queue: Some(id),
                        lease_ids: leases,
                        requeue: false,
                        delay_ms: 0,
                    })
                    .await
                    .map(|_| ())
                };
                if let Err(e) = r {
                    debug!(queue = %queue, error = %e, "amqp: settle failed in the core");
                }
                drop(permit);
            });
        }
        self.give_back(channel, credit);
        self.release_held(channel);
    }

    /// Puts deliveries back in their queues, each at its place, redelivered.
    async fn requeue(&mut self, channel: u32, tags: &[u64]) {
        let (taken, credit) = self.take_unacked(channel, tags);
        for (queue, leases) in by_queue(taken) {
            let r = self
                .core
                .nack(v1::NackRequest {
                    queue: Some(self.queue_id(&queue)),
                    lease_ids: leases,
                    requeue: true,
                    delay_ms: 0,
                })
                .await;
            if let Err(e) = r {
                debug!(queue = %queue, error = %e, "amqp: requeue failed in the core");
            }
        }
        self.give_back(channel, credit);
        self.release_held(channel);
    }

    /// Removes deliveries from the channel's unacked set; with the credit each consumer
    /// gets back once they are settled in the core (given after the core settled them:
    /// a requeued message must be back before its consumer may take the next one).
    fn take_unacked(&mut self, channel: u32, tags: &[u64]) -> (Vec<Unacked>, Vec<(String, u32)>) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return (Vec::new(), Vec::new());
        };
        let mut taken = Vec::with_capacity(tags.len());
        let mut credit: Vec<(String, u32)> = Vec::new();
        for t in tags {
            if let Some(u) = ch.unacked.remove(t) {
                if let Some(c) = &u.consumer {
                    match credit.iter_mut().find(|(tag, _)| tag == c) {
                        Some((_, n)) => *n += 1,
                        None => credit.push((c.clone(), 1)),
                    }
                }
                taken.push(u);
            }
        }
        (taken, credit)
    }

    fn give_back(&mut self, channel: u32, credit: Vec<(String, u32)>) {
        let Some(ch) = self.channels.get(&channel) else {
            return;
        };
        for (tag, n) in credit {
            if let Some(c) = ch.consumers.get(&tag)
                && c.limited
            {
                c.give_credit(n);
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Consumers and deliveries
    // -----------------------------------------------------------------------------------

    async fn consume(&mut self, channel: u32, b: link::BasicConsume) -> Res<()> {
        let reply_to = b.queue.starts_with(REPLY_TO);
        let tag = if !b.consumer_tag.is_empty() {
            b.consumer_tag.clone()
        } else if reply_to {
            REPLY_TO.to_string()
        } else {
            format!("amq.ctag-{}", random_tail())
        };
        if self.chan(channel).consumers.contains_key(&tag) {
            return Err(refuse(
                NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let meta = if reply_to {
            // Direct reply-to: the transport named the pseudo-queue; here it is a real,
            // exclusive one, so replies reach it through the default exchange.
            if !b.no_ack {
                return Err(refuse(
                    PRECONDITION_FAILED,
                    "reply consumer cannot acknowledge",
                ));
            }
            self.core
                .admin
                .clone()
                .declare_queue(v1::DeclareQueueRequest {
                    id: Some(self.queue_id(&b.queue)),
                    exclusive: true,
                    auto_delete: true,
                    owner: self.owner.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| from_status(&s))?;
            self.exclusive.push(b.queue.clone());
            QueueMeta { quorum: false }
        } else {
            self.queue_access(&b.queue).await?
        };
        let ch = self.chan(channel);
        let limit = if ch.prefetch > 0 {
            if ch.global_prefetch > 0 {
                ch.prefetch.min(ch.global_prefetch)
            } else {
                ch.prefetch
            }
        } else {
            ch.global_prefetch
        };
        let limited = !b.no_ack && limit > 0;
        let initial = if limited { limit } else { UNLIMITED_WINDOW };
        let (credit_tx, credit_rx) = mpsc::unbounded_channel();
        let _ = credit_tx.send(v1::SubscribeRequest {
            item: Some(v1::subscribe_request::Item::Start(v1::SubscribeStart {
                source: Some(v1::subscribe_start::Source::Queue(self.queue_id(&b.queue))),
                consumer: tag.clone(),
                initial_credit: initial,
                auto_ack: b.no_ack,
                exclusive: b.exclusive,
                visibility_timeout_ms: 0,
                // A consumer that vanishes (the gateway killed) returns its deliveries; a
                // cancel keeps them with the channel (`end`).
                release_on_close: true,
                announce_start: true,
            })),
        });
        let mut stream = self
            .core
            .subscribe(tokio_stream::wrappers::UnboundedReceiverStream::new(
                credit_rx,
            ))
            .await
            .map_err(|s| self.queue_status(&b.queue, &s))?;
        match stream.next().await {
            Some(Ok(v1::SubscribeEvent {
                event: Some(v1::subscribe_event::Event::Started(_)),
            })) => {}
            Some(Err(s)) => {
                return Err(match error_code(&s) {
                    v1::ErrorCode::Conflict => refuse(
                        ACCESS_REFUSED,
                        format!(
                            "queue '{}' in vhost '{}' in exclusive use",
                            b.queue, self.vhost
                        ),
                    ),
                    _ => self.queue_status(&b.queue, &s),
                });
            }
            _ => {
                return Err(refuse(
                    INTERNAL_ERROR,
                    format!("the core ended the subscription to '{}'", b.queue),
                ));
            }
        }
        let stream: SubStream = Box::pin(
            stream
                .map(|r| match r {
                    Ok(ev) => SubItem::Event(Box::new(ev)),
                    Err(s) => SubItem::Failed(s),
                })
                .chain(futures::stream::once(async { SubItem::End })),
        );
        self.subs.insert((channel, tag.clone()), stream);
        self.chan(channel).consumers.insert(
            tag.clone(),
            Consumer {
                queue: b.queue.clone(),
                no_ack: b.no_ack,
                limited,
                quorum: meta.quorum,
                credit: credit_tx,
                owed: 0,
            },
        );
        self.emit(
            channel,
            Event::Ok(link::MethodOk {
                name: tag,
                ..ok(60, 21)
            }),
        );
        Ok(())
    }

    /// Stops a consumer. What the core had already sent it is delivered first (as RabbitMQ
    /// delivers what is on its way before cancel-ok); its unacked deliveries stay with the
    /// channel (they may still be acked); deliveries held back for it go back to the queue.
    /// Answered once the core has ended the subscription (an auto-delete queue is gone by
    /// then, the next single active consumer has its turn).
    async fn cancel(&mut self, channel: u32, tag: &str) {
        let key = (channel, tag.to_string());
        let stream = self.subs.remove(&key);
        let Some(c) = self
            .channels
            .get(&channel)
            .and_then(|ch| ch.consumers.get(tag))
        else {
            return;
        };
        let _ = c.credit.send(v1::SubscribeRequest {
            item: Some(v1::subscribe_request::Item::End(true)),
        });
        let (queue, no_ack) = (c.queue.clone(), c.no_ack);
        // Kept open until the channel closes (see `Chan::ended`).
        let mut keep: Option<Box<dyn std::any::Any + Send>> = None;
        if let Some(mut stream) = stream {
            let drained = tokio::time::timeout(CANCEL_TIMEOUT, async {
                while let Some(item) = stream.next().await {
                    match item {
                        SubItem::Event(ev) => match ev.event {
                            Some(v1::subscribe_event::Event::Message(m)) => {
                                self.send_delivery(channel, tag, m);
                            }
                            Some(v1::subscribe_event::Event::Ended(_)) => return true,
                            _ => {}
                        },
                        SubItem::End => return true,
                        SubItem::Failed(_) => {}
                    }
                }
                true
            })
            .await;
            if drained.is_err() {
                // The core is slow to end it: the rest goes back to the queue from a task of
                // its own (no-ack ones were settled by the core when it sent them), which
                // keeps the stream open until the channel closes.
                debug!(consumer = %tag, "the core did not end a cancelled subscription in time");
                let core = self.core.clone();
                let id = self.queue_id(&queue);
                let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
                keep = Some(Box::new(closed_tx));
                tokio::spawn(async move {
                    while let Some(item) = stream.next().await {
                        let SubItem::Event(ev) = item else { continue };
                        match ev.event {
                            Some(v1::subscribe_event::Event::Message(m)) if !no_ack => {
                                let _ = core
                                    .nack(v1::NackRequest {
                                        queue: Some(id.clone()),
                                        lease_ids: vec![m.lease_id],
                                        requeue: true,
                                        delay_ms: 0,
                                    })
                                    .await;
                            }
                            Some(v1::subscribe_event::Event::Ended(_)) => break,
                            _ => {}
                        }
                    }
                    let _ = closed_rx.await;
                    drop(stream);
                });
            } else {
                keep = Some(Box::new(stream));
            }
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        if let Some(c) = ch.consumers.remove(tag) {
            ch.ended.push(Box::new(c.credit));
            ch.ended.extend(keep);
        }
        for u in ch.unacked.values_mut() {
            if u.consumer.as_deref() == Some(tag) {
                u.consumer = None;
            }
        }
        let back: Vec<String> = ch.take_held(tag).into_iter().map(|m| m.lease_id).collect();
        if !no_ack {
            self.release_leases(&queue, back).await;
        }
    }

    async fn release_leases(&mut self, queue: &str, leases: Vec<String>) {
        if leases.is_empty() {
            return;
        }
        let r = self
            .core
            .nack(v1::NackRequest {
                queue: Some(self.queue_id(queue)),
                lease_ids: leases,
                requeue: true,
                delay_ms: 0,
            })
            .await;
        if let Err(e) = r {
            debug!(queue = %queue, error = %e, "amqp: could not release leases");
        }
    }

    async fn on_subscription(&mut self, (channel, tag): SubKey, item: SubItem) {
        match item {
            SubItem::Event(ev) => {
                if let Some(v1::subscribe_event::Event::Message(m)) = ev.event {
                    self.deliver(channel, &tag, m).await;
                }
            }
            SubItem::Failed(s) => {
                debug!(channel, consumer = %tag, error = %s, "subscription failed");
            }
            SubItem::End => {
                // The core ended it (its queue was deleted): consumer_cancel_notify.
                self.subs.remove(&(channel, tag.clone()));
                let gone = self
                    .channels
                    .get(&channel)
                    .is_some_and(|c| c.consumers.contains_key(&tag));
                if gone {
                    self.cancel(channel, &tag).await;
                    self.emit(channel, Event::Cancelled(tag));
                }
            }
        }
    }

    async fn deliver(&mut self, channel: u32, tag: &str, m: v1::LeasedMessage) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let Some(c) = ch.consumers.get(tag) else {
            return;
        };
        if !c.no_ack && ch.global_prefetch > 0 && ch.unacked.len() as u32 >= ch.global_prefetch {
            ch.held.push_back((tag.to_string(), m));
            return;
        }
        self.send_delivery(channel, tag, m);
    }

    fn send_delivery(&mut self, channel: u32, tag: &str, m: v1::LeasedMessage) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let Some(c) = ch.consumers.get_mut(tag) else {
            return;
        };
        let dtag = ch.next_tag;
        ch.next_tag += 1;
        let d = message::delivered(&m, c.quorum);
        if !c.no_ack {
            ch.unacked.insert(
                dtag,
                Unacked {
                    queue: c.queue.clone(),
                    lease: m.lease_id.clone(),
                    consumer: Some(tag.to_string()),
                },
            );
        }
        let outstanding = self.outstanding.fetch_add(1, Ordering::AcqRel) + 1;
        if !c.limited {
            c.owed += 1;
            if c.owed >= CREDIT_CHUNK && outstanding < OUTSTANDING_LIMIT {
                let n = std::mem::take(&mut c.owed);
                c.give_credit(n);
            }
        }
        self.emit(
            channel,
            Event::Deliver(link::ChannelDelivery {
                consumer_tag: tag.to_string(),
                delivery_tag: dtag,
                redelivered: m.redelivered,
                exchange: d.exchange,
                routing_key: d.routing_key,
                properties: d.properties,
                body: d.body,
                ..Default::default()
            }),
        );
    }

    /// Deliveries held back by a channel-wide prefetch limit, as far as it now allows.
    fn release_held(&mut self, channel: u32) {
        loop {
            let Some(ch) = self.channels.get_mut(&channel) else {
                return;
            };
            if ch.held.is_empty()
                || (ch.global_prefetch > 0 && ch.unacked.len() as u32 >= ch.global_prefetch)
            {
                return;
            }
            let (tag, m) = ch.held.pop_front().expect("not empty");
            self.send_delivery(channel, &tag, m);
        }
    }

    /// The transport made room: consumers without a limit get the credit they are owed.
    fn give_owed_credit(&mut self) {
        for ch in self.channels.values_mut() {
            for c in ch.consumers.values_mut() {
                if !c.limited && c.owed > 0 {
                    let n = std::mem::take(&mut c.owed);
                    c.give_credit(n);
                }
            }
        }
    }

    async fn get(&mut self, channel: u32, g: link::BasicGet) -> Res<()> {
        let meta = self.queue_access(&g.queue).await?;
        let got = self
            .core
            .queues
            .clone()
            .receive(v1::ReceiveRequest {
                queue: Some(self.queue_id(&g.queue)),
                max_messages: 1,
                visibility_timeout_ms: GET_LEASE_MS,
                wait_time_ms: 0,
                consumer: self.owner.clone(),
                no_wait_durable: false,
            })
            .await
            .map_err(|s| self.queue_status(&g.queue, &s))?
            .into_inner()
            .messages
            .pop();
        let Some(m) = got else {
            self.emit(channel, Event::GetEmpty(true));
            return Ok(());
        };
        if g.no_ack {
            self.core
                .queues
                .clone()
                .ack(v1::AckRequest {
                    queue: Some(self.queue_id(&g.queue)),
                    lease_ids: vec![m.lease_id.clone()],
                    ..Default::default()
                })
                .await
                .map_err(|s| self.queue_status(&g.queue, &s))?;
        }
        let left = self
            .describe_queue(&g.queue)
            .await
            .map(|i| i.messages_ready.max(0) as u64)
            .unwrap_or(0);
        let ch = self.chan(channel);
        let dtag = ch.next_tag;
        ch.next_tag += 1;
        if !g.no_ack {
            ch.unacked.insert(
                dtag,
                Unacked {
                    queue: g.queue.clone(),
                    lease: m.lease_id.clone(),
                    consumer: None,
                },
            );
        }
        let d = message::delivered(&m, meta.quorum);
        self.emit(
            channel,
            Event::GetOk(link::ChannelDelivery {
                delivery_tag: dtag,
                redelivered: m.redelivered,
                exchange: d.exchange,
                routing_key: d.routing_key,
                properties: d.properties,
                body: d.body,
                message_count: left,
                ..Default::default()
            }),
        );
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Closing
    // -----------------------------------------------------------------------------------

    /// Closes a channel: its consumers go, its unacked deliveries return to their queues.
    async fn close_channel(&mut self, channel: u32) {
        let Some(mut ch) = self.channels.remove(&channel) else {
            return;
        };
        // Acks and rejects on their way land first: dropping a subscription releases the
        // leases it still holds, and an acked message must not come back.
        if !ch.consumers.is_empty() {
            let all = SETTLES_IN_FLIGHT as u32;
            drop(self.settling.clone().acquire_many_owned(all).await);
        }
        let tags: Vec<String> = ch.consumers.keys().cloned().collect();
        for tag in &tags {
            self.subs.remove(&(channel, tag.clone()));
        }
        let mut leases: Vec<Unacked> = std::mem::take(&mut ch.unacked).into_values().collect();
        for (tag, m) in std::mem::take(&mut ch.held) {
            if let Some(c) = ch.consumers.get(&tag)
                && !c.no_ack
            {
                leases.push(Unacked {
                    queue: c.queue.clone(),
                    lease: m.lease_id,
                    consumer: None,
                });
            }
        }
        for (queue, ids) in by_queue(leases) {
            self.release_leases(&queue, ids).await;
        }
    }

    async fn close_connection(&mut self) {
        let channels: Vec<u32> = self.channels.keys().copied().collect();
        for ch in channels {
            self.close_channel(ch).await;
        }
        for name in std::mem::take(&mut self.exclusive) {
            let r = self
                .core
                .admin
                .clone()
                .delete_queue(v1::DeleteQueueRequest {
                    id: Some(self.queue_id(&name)),
                    ..Default::default()
                })
                .await;
            if let Err(s) = r
                && error_code(&s) != v1::ErrorCode::QueueNotFound
            {
                warn!(queue = %name, error = %s, "amqp: could not delete an exclusive queue");
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Exchanges, queues, bindings
    // -----------------------------------------------------------------------------------

    async fn exchange_declare(&mut self, channel: u32, d: link::ExchangeDeclare) -> Res<()> {
        if d.passive {
            self.exchanges.remove(&d.name);
            if d.name.is_empty() {
                self.emit(channel, Event::Ok(ok(40, 11)));
                return Ok(());
            }
            self.exchange(&d.name).await?;
            self.emit(channel, Event::Ok(ok(40, 11)));
            return Ok(());
        }
        let t = ExchangeType::parse(&d.kind, &d.arguments)?;
        let existing = if d.name.is_empty() {
            None
        } else {
            self.exchanges.remove(&d.name);
            match self.exchange(&d.name).await {
                Ok(x) => Some(x),
                Err(r) if r.code == NOT_FOUND => None,
                Err(r) => return Err(r),
            }
        };
        if let Some(x) = existing {
            let same = x.kind == t.kind
                && x.delayed == t.delayed
                && x.durable == d.durable
                && x.auto_delete == d.auto_delete
                && x.internal == d.internal;
            if !same {
                let have = if x.delayed {
                    "x-delayed-message"
                } else {
                    args::kind_name(x.kind)
                };
                return Err(refuse(
                    PRECONDITION_FAILED,
                    format!(
                        "inequivalent arg 'type' for exchange '{}' in vhost '{}': received '{}' but current is '{have}'",
                        d.name, self.vhost, d.kind
                    ),
                ));
            }
            self.emit(channel, Event::Ok(ok(40, 11)));
            return Ok(());
        }
        if d.name.starts_with("amq.") {
            return Err(refuse(
                ACCESS_REFUSED,
                format!(
                    "exchange name '{}' contains reserved prefix 'amq.*'",
                    d.name
                ),
            ));
        }
        if d.name.is_empty() || d.name.len() > 255 {
            return Err(refuse(
                ACCESS_REFUSED,
                "operation not permitted on the default exchange",
            ));
        }
        let mut arguments = HashMap::new();
        if t.delayed {
            arguments.insert(DELAYED_ARG.to_string(), args::kind_name(t.kind).to_string());
        }
        let r = self
            .core
            .admin
            .clone()
            .declare_address(v1::DeclareAddressRequest {
                namespace: self.ns.clone(),
                name: d.name.clone(),
                kind: t.kind as i32,
                durable: d.durable,
                auto_delete: d.auto_delete,
                internal: d.internal,
                passive: false,
                arguments,
            })
            .await
            .map_err(|s| from_status(&s))?
            .into_inner();
        self.exchanges
            .insert(d.name.clone(), ExchangeInfo::from_response(&r));
        self.emit(channel, Event::Ok(ok(40, 11)));
        Ok(())
    }

    async fn exchange_delete(&mut self, channel: u32, d: link::ExchangeDelete) -> Res<()> {
        if d.name.is_empty() || d.name.starts_with("amq.") {
            return Err(refuse(
                ACCESS_REFUSED,
                format!("operation not permitted on exchange '{}'", d.name),
            ));
        }
        self.exchanges.remove(&d.name);
        let r = self
            .core
            .admin
            .clone()
            .delete_address(v1::DeleteAddressRequest {
                namespace: self.ns.clone(),
                name: d.name.clone(),
                if_unused: d.if_unused,
            })
            .await;
        match r {
            Ok(_) => {}
            Err(s) => match error_code(&s) {
                v1::ErrorCode::AddressNotFound => {}
                v1::ErrorCode::Conflict => {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        format!("exchange '{}' in vhost '{}' in use", d.name, self.vhost),
                    ));
                }
                _ => return Err(from_status(&s)),
            },
        }
        self.emit(channel, Event::Ok(ok(40, 21)));
        Ok(())
    }

    /// Binds or unbinds, then answers with the class's bind-ok (x.31 / queue 50.21) or
    /// unbind-ok (x.51).
    #[allow(clippy::too_many_arguments)]
    async fn bind_command(
        &mut self,
        channel: u32,
        class: u32,
        source: &str,
        destination: v1::binding::Destination,
        key: &str,
        arguments: &[u8],
        unbind: bool,
    ) -> Res<()> {
        self.bind(source, destination, key, arguments, unbind)
            .await?;
        let method = match (class, unbind) {
            (_, true) => 51,
            (40, false) => 31,
            _ => 21,
        };
        self.emit(channel, Event::Ok(ok(class, method)));
        Ok(())
    }

    /// queue.bind / exchange.bind and their unbinds. As RabbitMQ 3.x: removing a binding
    /// whose source or destination is gone is answered unbind-ok.
    async fn bind(
        &mut self,
        source: &str,
        destination: v1::binding::Destination,
        key: &str,
        arguments: &[u8],
        unbind: bool,
    ) -> Res<()> {
        let dest_name = match &destination {
            v1::binding::Destination::Queue(q) | v1::binding::Destination::Address(q) => q.clone(),
            v1::binding::Destination::Stream(s) => s.clone(),
        };
        let to_default =
            matches!(destination, v1::binding::Destination::Address(_)) && dest_name.is_empty();
        if source.is_empty() || to_default {
            return Err(refuse(
                ACCESS_REFUSED,
                "operation not permitted on the default exchange",
            ));
        }
        let table = fields::decode_table(arguments).map_err(|e| refuse(PRECONDITION_FAILED, e))?;
        let mut args: Vec<(String, Vec<u8>)> = table
            .inner()
            .iter()
            .filter_map(|(k, v)| fields::header_bytes(v).map(|b| (k.as_str().to_string(), b)))
            .collect();
        args.sort();
        let binding = v1::Binding {
            namespace: self.ns.clone(),
            source_address: source.to_string(),
            destination: Some(destination.clone()),
            pattern: key.to_string(),
            arguments: args
                .into_iter()
                .map(|(name, value)| v1::Header {
                    name,
                    value: value.into(),
                })
                .collect(),
        };
        if let v1::binding::Destination::Queue(q) = &destination {
            match self.queue_access(q).await {
                Ok(_) => {}
                Err(r) if unbind && r.code == NOT_FOUND => return Ok(()),
                // Another connection's exclusive queue: refused only when there is a
                // binding to remove (RabbitMQ).
                Err(r) if unbind && r.code == RESOURCE_LOCKED => {
                    return if self.binding_exists(&binding).await {
                        Err(r)
                    } else {
                        Ok(())
                    };
                }
                Err(r) => return Err(r),
            }
        } else if !unbind {
            self.exchange(&dest_name).await?;
        }
        if unbind {
            let r = self
                .core
                .admin
                .clone()
                .unbind(v1::UnbindRequest {
                    binding: Some(binding),
                })
                .await;
            return match r {
                Ok(_) => Ok(()),
                Err(s) => match error_code(&s) {
                    v1::ErrorCode::AddressNotFound
                    | v1::ErrorCode::QueueNotFound
                    | v1::ErrorCode::BindingNotFound => Ok(()),
                    _ => Err(from_status(&s)),
                },
            };
        }
        self.exchange(source).await?;
        self.core
            .admin
            .clone()
            .bind(v1::BindRequest {
                binding: Some(binding),
            })
            .await
            .map_err(|s| match error_code(&s) {
                v1::ErrorCode::AddressNotFound => {
                    self.exchanges.remove(source);
                    no_exchange(source, &self.vhost)
                }
                v1::ErrorCode::QueueNotFound => {
                    self.queues.remove(&dest_name);
                    no_queue(&dest_name, &self.vhost)
                }
                _ => from_status(&s),
            })?;
        Ok(())
    }

    async fn binding_exists(&mut self, b: &v1::Binding) -> bool {
        let r = self
            .core
            .admin
            .clone()
            .list_bindings(v1::ListBindingsRequest {
                namespace: self.ns.clone(),
                source_address: b.source_address.clone(),
            })
            .await;
        r.is_ok_and(|r| {
            r.into_inner().bindings.iter().any(|x| {
                x.destination == b.destination
                    && x.pattern == b.pattern
                    && x.arguments == b.arguments
            })
        })
    }

    async fn queue_declare(&mut self, channel: u32, d: link::QueueDeclare) -> Res<()> {
        let name = if d.name.is_empty() {
            format!("amq.gen-{}", random_tail())
        } else {
            d.name.clone()
        };
        if d.passive {
            self.queues.remove(&name);
            let info = self.describe_queue(&name).await?;
            self.queues.insert(name.clone(), queue_meta(&info));
            self.declare_ok(channel, &name, &info);
            return Ok(());
        }
        let a = args::QueueArgs::parse(&d.arguments)?;
        if a.quorum && (!d.durable || d.exclusive || d.auto_delete) {
            return Err(refuse(
                PRECONDITION_FAILED,
                format!(
                    "invalid property '{}' for queue '{name}' in vhost '{}'",
                    if !d.durable {
                        "non-durable"
                    } else if d.exclusive {
                        "exclusive"
                    } else {
                        "auto-delete"
                    },
                    self.vhost
                ),
            ));
        }
        let mut config = a.config;
        // An exclusive queue goes with its connection: the core keeps it non-durable, and
        // the durability asked for only in the arguments a redeclare must match.
        let durable = d.durable && !d.exclusive;
        if d.exclusive {
            config
                .extra
                .insert(args::EXTRA_DURABLE.into(), d.durable.to_string());
        }
        let req = v1::DeclareQueueRequest {
            id: Some(self.queue_id(&name)),
            config: Some(config.clone()),
            durable,
            exclusive: d.exclusive,
            auto_delete: d.auto_delete,
            passive: false,
            owner: self.owner.clone(),
        };
        if name.starts_with("amq.") && !d.name.is_empty() {
            // Reserved: only an existing queue of that name may be declared again.
            if self.describe_queue(&name).await.is_err() {
                return Err(refuse(
                    ACCESS_REFUSED,
                    format!("queue name '{name}' contains reserved prefix 'amq.*'"),
                ));
            }
        }
        let r = self.core.admin.clone().declare_queue(req).await;
        let resp = match r {
            Ok(r) => r.into_inner(),
            Err(s) if error_code(&s) == v1::ErrorCode::QueueExists => {
                let have = self.describe_queue(&name).await?;
                // A queue imported with a RabbitMQ policy holds the policy's settings too;
                // as on RabbitMQ, declaring it with its own arguments is equivalent.
                if have.durable == durable
                    && have.exclusive == d.exclusive
                    && have.auto_delete == d.auto_delete
                    && have
                        .config
                        .as_ref()
                        .is_some_and(|c| args::declared_equivalent(&config, c))
                {
                    self.queues.insert(name.clone(), queue_meta(&have));
                    self.declare_ok(channel, &name, &have);
                    return Ok(());
                }
                let what = inequivalent(&d, durable, &config, &have);
                return Err(refuse(
                    PRECONDITION_FAILED,
                    format!(
                        "inequivalent arg '{what}' for queue '{name}' in vhost '{}'",
                        self.vhost
                    ),
                ));
            }
            Err(s) => return Err(self.queue_status(&name, &s)),
        };
        let info = resp.queue.unwrap_or_default();
        if resp.created && d.exclusive {
            self.exclusive.push(name.clone());
        }
        self.queues.insert(name.clone(), queue_meta(&info));
        self.declare_ok(channel, &name, &info);
        Ok(())
    }

    fn declare_ok(&self, channel: u32, name: &str, info: &v1::QueueInfo) {
        self.emit(
            channel,
            Event::Ok(link::MethodOk {
                name: name.to_string(),
                message_count: info.messages_ready.max(0) as u64,
                consumer_count: info.consumers,
                ..ok(50, 11)
            }),
        );
    }

    async fn queue_delete(&mut self, channel: u32, d: link::QueueDelete) -> Res<()> {
        match self.queue_access(&d.queue).await {
            Ok(_) => {}
            Err(r) if r.code == NOT_FOUND => {
                self.emit(channel, Event::Ok(ok(50, 41)));
                return Ok(());
            }
            Err(r) => return Err(r),
        }
        let r = self
            .core
            .admin
            .clone()
            .delete_queue(v1::DeleteQueueRequest {
                id: Some(self.queue_id(&d.queue)),
                if_unused: d.if_unused,
                if_empty: d.if_empty,
            })
            .await;
        self.queues.remove(&d.queue);
        let count = match r {
            Ok(r) => r.into_inner().messages_deleted.max(0) as u64,
            Err(s) => match error_code(&s) {
                v1::ErrorCode::QueueNotFound => 0,
                v1::ErrorCode::Conflict => {
                    let why = if d.if_unused { "in use" } else { "not empty" };
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        format!("queue '{}' in vhost '{}' {why}", d.queue, self.vhost),
                    ));
                }
                _ => return Err(self.queue_status(&d.queue, &s)),
            },
        };
        self.exclusive.retain(|q| *q != d.queue);
        self.emit(
            channel,
            Event::Ok(link::MethodOk {
                message_count: count,
                ..ok(50, 41)
            }),
        );
        Ok(())
    }
}

/// Which property a redeclare changed (for the 406 text).
fn inequivalent(
    d: &link::QueueDeclare,
    durable: bool,
    config: &v1::QueueConfig,
    have: &v1::QueueInfo,
) -> String {
    if have.durable != durable {
        return "durable".into();
    }
    if have.exclusive != d.exclusive {
        return "exclusive".into();
    }
    if have.auto_delete != d.auto_delete {
        return "auto_delete".into();
    }
    have.config
        .as_ref()
        .and_then(|c| args::first_difference(config, c))
        .unwrap_or_else(|| "arguments".into())
}

fn by_queue(taken: Vec<Unacked>) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for u in taken {
        match out.iter_mut().find(|(q, _)| *q == u.queue) {
            Some((_, ids)) => ids.push(u.lease),
            None => out.push((u.queue, vec![u.lease])),
        }
    }
    out
}

fn channel_error(r: Refusal, (class_id, method_id): (u32, u32)) -> link::ChannelError {
    link::ChannelError {
        code: r.code,
        text: r.text,
        class_id,
        method_id,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
