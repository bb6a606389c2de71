//! AMQP 0-9-1 channels over the core's queues and exchanges (the Queue and Router of the
//! design), owned by the core so that every gateway instance routes, delivers and
//! redelivers the same way.
//!
//! A gateway attaches one command/event stream per client connection
//! ([`Core::attach_channels`]). The core keeps, per vhost, exchanges with their bindings and
//! queues with their ready messages, and per connection the channels with their consumers,
//! prefetch limits, delivery tags and unacknowledged messages. A message is one shared
//! [`MsgData`] for every queue it is routed to.
//!
//! Durability: durable exchanges, queues and bindings are records in the metadata store,
//! written before the *-ok. Persistent messages (delivery-mode 2) in durable queues go to
//! the journal all durable queues share ([`journal`]); a publisher confirm or a tx.commit-ok
//! waits until they are durable. Acknowledgements are journaled without waiting, so a crash
//! may redeliver a message acknowledged just before it (flagged redelivered), never lose one.

mod fields;
mod journal;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use amq_protocol::types::FieldTable;
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};
use tributary_proto::v1::{self, channel_command::Command, channel_event::Event};
use tributary_storage::{Op, PartitionKey};

use crate::error::CoreResult;
use crate::meta::{self, from_json, to_json};
use crate::{Core, now_ms};

pub(crate) use fields::DeathReason;
use journal::{Completion, Journal};

const JOURNAL_KEY: &str = "amqpjournal";

pub(crate) type EventTx = mpsc::UnboundedSender<v1::ChannelEvent>;

/// Deliveries handed to a connection's event stream and not yet taken by its transport,
/// beyond which the core stops delivering to that connection (credit-based flow control,
/// as RabbitMQ's): no-ack consumers have no other limit.
const OUTSTANDING_LIMIT: usize = 4096;
/// How often message TTLs and queue expiry are checked.
const TICK: Duration = Duration::from_millis(25);
/// Publishes and acks of one connection applied under one lock at most.
const FAST_BATCH: usize = 256;

const EXCHANGE_KEY: &str = "amqpexchange";
const QUEUE_KEY: &str = "amqpqueue";
const BINDING_KEY: &str = "amqpbinding";
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

// AMQP reply codes.
pub const NO_ROUTE: u32 = 312;
pub const ACCESS_REFUSED: u32 = 403;
pub const NOT_FOUND: u32 = 404;
pub const RESOURCE_LOCKED: u32 = 405;
pub const PRECONDITION_FAILED: u32 = 406;
pub const COMMAND_INVALID: u32 = 503;
pub const CHANNEL_ERROR: u32 = 504;
pub const NOT_ALLOWED: u32 = 530;
pub const NOT_IMPLEMENTED: u32 = 540;
pub const INTERNAL_ERROR: u32 = 541;

/// A failed command: closes the channel, or the connection for connection-level codes.
#[derive(Debug)]
struct Refusal {
    code: u32,
    text: String,
    connection: bool,
}

fn refuse(code: u32, text: impl Into<String>) -> Refusal {
    let name = match code {
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    };
    Refusal {
        code,
        text: format!("{name} - {}", text.into()),
        connection: matches!(code, COMMAND_INVALID | CHANNEL_ERROR | NOT_ALLOWED),
    }
}

type Res<T> = Result<T, Refusal>;

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            _ => return None,
        })
    }
    fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum Dest {
    Queue(String),
    Exchange(String),
}

#[derive(Debug, Clone)]
struct Binding {
    dest: Dest,
    key: String,
    args: Vec<u8>,
    table: FieldTable,
}

struct Exchange {
    kind: Kind,
    /// `x-delayed-message`: messages wait for their `x-delay` header, then route as `kind`.
    delayed: bool,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    bindings: Vec<Binding>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

#[derive(Debug, Clone, Default)]
struct QueueArgs {
    message_ttl: Option<i64>,
    expires: Option<i64>,
    max_length: Option<u64>,
    max_length_bytes: Option<u64>,
    overflow: Option<Overflow>,
    dlx: Option<String>,
    dlrk: Option<String>,
    max_priority: Option<u8>,
    single_active: bool,
    quorum: bool,
    delivery_limit: Option<u32>,
}

impl QueueArgs {
    fn parse(raw: &[u8]) -> Res<Self> {
        let t = fields::decode_table(raw).map_err(|e| refuse(PRECONDITION_FAILED, e))?;
        let mut a = Self::default();
        let int = |k: &str, min: i64| -> Res<Option<i64>> {
            match t.inner().get(k) {
                None => Ok(None),
                Some(v) => match fields::as_i64(v) {
                    Some(n) if n >= min => Ok(Some(n)),
                    _ => Err(refuse(
                        PRECONDITION_FAILED,
                        format!("invalid arg '{k}': expected an integer >= {min}"),
                    )),
                },
            }
        };
        a.message_ttl = int("x-message-ttl", 0)?;
        a.expires = int("x-expires", 1)?;
        a.max_length = int("x-max-length", 0)?.map(|n| n as u64);
        a.max_length_bytes = int("x-max-length-bytes", 0)?.map(|n| n as u64);
        a.max_priority = int("x-max-priority", 0)?.map(|n| n.min(255) as u8);
        a.delivery_limit = int("x-delivery-limit", 0)?.map(|n| n.min(u32::MAX as i64) as u32);
        if let Some(v) = t.inner().get("x-overflow") {
            a.overflow = Some(match fields::as_str(v).as_deref() {
                Some("drop-head") => Overflow::DropHead,
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                _ => {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        "invalid arg 'x-overflow': expected drop-head, reject-publish or reject-publish-dlx",
                    ));
                }
            });
        }
        a.dlx = t
            .inner()
            .get("x-dead-letter-exchange")
            .and_then(fields::as_str);
        a.dlrk = t
            .inner()
            .get("x-dead-letter-routing-key")
            .and_then(fields::as_str);
        if a.dlrk.is_some() && a.dlx.is_none() {
            return Err(refuse(
                PRECONDITION_FAILED,
                "invalid arg 'x-dead-letter-routing-key': it needs x-dead-letter-exchange",
            ));
        }
        a.single_active = t
            .inner()
            .get("x-single-active-consumer")
            .and_then(fields::as_bool)
            .unwrap_or(false);
        match t
            .inner()
            .get("x-queue-type")
            .and_then(fields::as_str)
            .as_deref()
        {
            None | Some("classic") => {}
            Some("quorum") => a.quorum = true,
            Some("stream") => {
                return Err(refuse(
                    PRECONDITION_FAILED,
                    "x-queue-type 'stream' is not supported by this AMQP gateway; Kafka clients read the same core's streams",
                ));
            }
            Some(other) => {
                return Err(refuse(
                    PRECONDITION_FAILED,
                    format!("invalid arg 'x-queue-type': unknown type '{other}'"),
                ));
            }
        }
        Ok(a)
    }
}

struct MsgData {
    exchange: String,
    routing_key: String,
    properties: Bytes,
    body: Bytes,
    persistent: bool,
    priority: u8,
}

#[derive(Clone)]
struct Msg {
    seq: u64,
    data: Arc<MsgData>,
    /// ms since the epoch; i64::MAX when it never expires.
    expires_at: i64,
    redelivered: bool,
    deliveries: u32,
    persisted: bool,
}

impl Msg {
    fn size(&self) -> u64 {
        self.data.body.len() as u64
    }
}

/// Ready messages, one FIFO per priority level (one level without x-max-priority).
struct Ready {
    levels: Vec<VecDeque<Msg>>,
    len: usize,
    bytes: u64,
}

impl Ready {
    fn new(max_priority: Option<u8>) -> Self {
        Self {
            levels: (0..=max_priority.unwrap_or(0))
                .map(|_| VecDeque::new())
                .collect(),
            len: 0,
            bytes: 0,
        }
    }
    fn level(&self, m: &Msg) -> usize {
        (m.data.priority as usize).min(self.levels.len() - 1)
    }
    fn push_back(&mut self, m: Msg) {
        let l = self.level(&m);
        self.len += 1;
        self.bytes += m.size();
        self.levels[l].push_back(m);
    }
    /// Puts a message that was delivered back at its place among the ready ones: each level
    /// is in queue order (`seq`), so a message requeued alone, or several requeued one at a
    /// time in any order, line up as they were published (as RabbitMQ's classic queues).
    fn requeue(&mut self, m: Msg) {
        let l = self.level(&m);
        self.len += 1;
        self.bytes += m.size();
        let level = &mut self.levels[l];
        let at = level.partition_point(|x| x.seq < m.seq);
        level.insert(at, m);
    }
    fn front(&self) -> Option<&Msg> {
        self.levels.iter().rev().find_map(|l| l.front())
    }
    fn pop(&mut self) -> Option<Msg> {
        let m = self.levels.iter_mut().rev().find_map(|l| l.pop_front())?;
        self.len -= 1;
        self.bytes -= m.size();
        Some(m)
    }
    fn drain(&mut self) -> Vec<Msg> {
        self.len = 0;
        self.bytes = 0;
        self.levels.iter_mut().flat_map(|l| l.drain(..)).collect()
    }
}

struct ConsumerRef {
    conn: u64,
    channel: u32,
    tag: String,
}

struct Queue {
    durable: bool,
    exclusive: Option<u64>,
    auto_delete: bool,
    raw_args: Vec<u8>,
    args: QueueArgs,
    ready: Ready,
    unacked: u64,
    consumers: Vec<ConsumerRef>,
    exclusive_consumer: bool,
    next_consumer: usize,
    next_seq: u64,
    journal: Option<Journal>,
    last_used_ms: i64,
    had_consumer: bool,
}

impl Queue {
    fn new(
        durable: bool,
        exclusive: Option<u64>,
        auto_delete: bool,
        raw_args: Vec<u8>,
        args: QueueArgs,
    ) -> Self {
        Self {
            durable,
            exclusive,
            auto_delete,
            raw_args,
            ready: Ready::new(args.max_priority),
            args,
            unacked: 0,
            consumers: Vec::new(),
            exclusive_consumer: false,
            next_consumer: 0,
            next_seq: 1,
            journal: None,
            last_used_ms: now_ms(),
            had_consumer: false,
        }
    }

    /// The message left the queue for good: its journal entry can go.
    fn forget(&mut self, m: &Msg, removed: &mut Vec<u64>) {
        if m.persisted {
            removed.push(m.seq);
        }
    }

    fn flush_removed(&mut self, removed: Vec<u64>) {
        if let Some(j) = &self.journal {
            j.removed(removed);
        }
    }
}

struct Vhost {
    exchanges: HashMap<String, Exchange>,
    queues: HashMap<String, Queue>,
}

impl Vhost {
    fn new() -> Self {
        let mut exchanges = HashMap::new();
        for (name, kind) in [
            ("", Kind::Direct),
            ("amq.direct", Kind::Direct),
            ("amq.fanout", Kind::Fanout),
            ("amq.topic", Kind::Topic),
            ("amq.headers", Kind::Headers),
            ("amq.match", Kind::Headers),
        ] {
            exchanges.insert(
                name.to_owned(),
                Exchange {
                    kind,
                    delayed: false,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    bindings: Vec::new(),
                },
            );
        }
        Self {
            exchanges,
            queues: HashMap::new(),
        }
    }
}

struct Consumer {
    queue: String,
    no_ack: bool,
    prefetch: u32,
    in_flight: u32,
}

struct Unacked {
    queue: String,
    consumer: Option<String>,
    msg: Msg,
}

enum TxOp {
    Publish(v1::BasicPublish),
    Settle(v1::BasicSettle),
}

struct Chan {
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    consumers: HashMap<String, Consumer>,
    prefetch: u32,
    global_prefetch: u32,
    flow: bool,
    confirm: bool,
    tx: Option<Vec<TxOp>>,
}

impl Chan {
    fn new() -> Self {
        Self {
            next_tag: 1,
            unacked: BTreeMap::new(),
            consumers: HashMap::new(),
            prefetch: 0,
            global_prefetch: 0,
            flow: true,
            confirm: false,
            tx: None,
        }
    }
}

struct Conn {
    vhost: String,
    tx: EventTx,
    outstanding: Arc<AtomicUsize>,
    blocked: Arc<AtomicBool>,
    channels: HashMap<u32, Chan>,
    /// The direct reply-to name of each channel that consumes from it.
    reply_to: HashMap<u32, String>,
}

impl Conn {
    fn send(&self, channel: u32, event: Event) {
        let _ = self.tx.send(v1::ChannelEvent {
            channel,
            event: Some(event),
        });
    }
    fn has_room(&self) -> bool {
        if self.outstanding.load(Ordering::Acquire) < OUTSTANDING_LIMIT {
            return true;
        }
        self.blocked.store(true, Ordering::Release);
        false
    }
}

#[derive(Default)]
struct State {
    vhosts: HashMap<String, Vhost>,
    conns: HashMap<u64, Conn>,
    /// Direct reply-to names -> (connection, channel, consumer tag).
    reply_to: HashMap<String, (u64, u32, String)>,
    /// The journal of every durable queue (set by recovery at start-up).
    journal: Option<journal::SharedJournal>,
}

/// Work that follows a change: queues that may deliver, messages to dead-letter.
#[derive(Default)]
struct Effects {
    dispatch: Vec<(String, String)>,
    dead: Vec<(String, String, Msg, DeathReason)>,
}

pub(crate) struct ChannelBroker {
    state: Mutex<State>,
    next_conn: AtomicU64,
}

impl ChannelBroker {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            next_conn: AtomicU64::new(1),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ExchangeRecord {
    kind: String,
    delayed: bool,
    auto_delete: bool,
    internal: bool,
    args: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct QueueRecord {
    auto_delete: bool,
    args: Vec<u8>,
    log_id: u64,
}

#[derive(Serialize, Deserialize)]
struct BindingRecord {
    source: String,
    dest: Dest,
    key: String,
    args: Vec<u8>,
}

fn binding_key(vhost: &str, source: &str, b: &Binding) -> Vec<u8> {
    let (kind, name) = match &b.dest {
        Dest::Queue(q) => ("q", q.as_str()),
        Dest::Exchange(e) => ("e", e.as_str()),
    };
    let args: String = b.args.iter().map(|x| format!("{x:02x}")).collect();
    meta::key(BINDING_KEY, &[vhost, source, kind, name, &b.key, &args])
}

// ---------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------

/// AMQP topic matching: words split by '.', `*` one word, `#` zero or more.
pub(crate) fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                None => false,
            },
        }
    }
    // An empty key or pattern has no words (RabbitMQ), not one empty word.
    fn words(s: &str) -> Vec<&str> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split('.').collect()
        }
    }
    go(&words(pattern), &words(key))
}

/// The queues a message published to `exchange` with `key` reaches (through exchange
/// bindings too, each exchange visited once).
fn route(vh: &Vhost, exchange: &str, key: &str, props: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen_q = HashSet::new();
    let mut seen_x = HashSet::new();
    let mut headers: Option<Option<FieldTable>> = None;
    let mut todo = vec![exchange.to_owned()];
    while let Some(x) = todo.pop() {
        if !seen_x.insert(x.clone()) {
            continue;
        }
        let Some(ex) = vh.exchanges.get(&x) else {
            continue;
        };
        if x.is_empty() {
            if vh.queues.contains_key(key) && seen_q.insert(key.to_owned()) {
                out.push(key.to_owned());
            }
            continue;
        }
        for b in &ex.bindings {
            let hit = match ex.kind {
                Kind::Direct => b.key == key,
                Kind::Fanout => true,
                Kind::Topic => topic_matches(&b.key, key),
                Kind::Headers => {
                    let h = headers.get_or_insert_with(|| {
                        fields::decode_properties(props).and_then(|p| p.headers().clone())
                    });
                    fields::headers_match(&b.table, h.as_ref())
                }
            };
            if !hit {
                continue;
            }
            match &b.dest {
                Dest::Queue(q) => {
                    if seen_q.insert(q.clone()) {
                        out.push(q.clone());
                    }
                }
                Dest::Exchange(e) => todo.push(e.clone()),
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------

fn delivery(tag: &str, dtag: u64, m: &Msg) -> v1::ChannelDelivery {
    v1::ChannelDelivery {
        consumer_tag: tag.to_owned(),
        delivery_tag: dtag,
        redelivered: m.redelivered,
        exchange: m.data.exchange.clone(),
        routing_key: m.data.routing_key.clone(),
        properties: m.data.properties.clone(),
        body: m.data.body.clone(),
        ..Default::default()
    }
}

/// Quorum queues tell a consumer how often a message was delivered before
/// (`x-delivery-count`, from the first redelivery on).
fn count_redelivery(quorum: bool, m: &Msg, ev: &mut v1::ChannelDelivery) {
    if quorum && m.deliveries > 1 {
        ev.properties = fields::with_header(
            &ev.properties,
            "x-delivery-count",
            amq_protocol::types::AMQPValue::LongLongInt(m.deliveries as i64 - 1),
        );
    }
}

/// Delivers ready messages of one queue to its consumers with credit, round-robin; drops
/// expired messages met at the head.
fn dispatch(
    q: &mut Queue,
    vhost: &str,
    qname: &str,
    conns: &mut HashMap<u64, Conn>,
    now: i64,
    fx: &mut Effects,
) {
    let mut removed = Vec::new();
    while let Some(front) = q.ready.front() {
        if front.expires_at <= now {
            let m = q.ready.pop().expect("front exists");
            q.forget(&m, &mut removed);
            fx.dead
                .push((vhost.to_owned(), qname.to_owned(), m, DeathReason::Expired));
            continue;
        }
        let n = q.consumers.len();
        if n == 0 {
            break;
        }
        let candidates = if q.args.single_active { 1 } else { n };
        let mut chosen = None;
        for i in 0..candidates {
            let idx = if q.args.single_active {
                0
            } else {
                (q.next_consumer + i) % n
            };
            let c = &q.consumers[idx];
            let Some(conn) = conns.get(&c.conn) else {
                continue;
            };
            let Some(ch) = conn.channels.get(&c.channel) else {
                continue;
            };
            let Some(cons) = ch.consumers.get(&c.tag) else {
                continue;
            };
            let credit = ch.flow
                && (cons.no_ack || cons.prefetch == 0 || cons.in_flight < cons.prefetch)
                && (cons.no_ack
                    || ch.global_prefetch == 0
                    || (ch.unacked.len() as u32) < ch.global_prefetch);
            if credit && conn.has_room() {
                chosen = Some(idx);
                break;
            }
        }
        let Some(idx) = chosen else { break };
        q.next_consumer = idx + 1;
        let mut m = q.ready.pop().expect("front exists");
        m.deliveries += 1;
        let c = &q.consumers[idx];
        let (cconn, cchannel) = (c.conn, c.channel);
        let ctag = c.tag.clone();
        let conn = conns.get_mut(&cconn).expect("checked");
        let ch = conn.channels.get_mut(&cchannel).expect("checked");
        let tag = ch.next_tag;
        ch.next_tag += 1;
        let cons = ch.consumers.get_mut(&ctag).expect("checked");
        let mut ev = delivery(&ctag, tag, &m);
        count_redelivery(q.args.quorum, &m, &mut ev);
        if cons.no_ack {
            q.forget(&m, &mut removed);
        } else {
            cons.in_flight += 1;
            q.unacked += 1;
            ch.unacked.insert(
                tag,
                Unacked {
                    queue: qname.to_owned(),
                    consumer: Some(ctag),
                    msg: m,
                },
            );
        }
        conn.outstanding.fetch_add(1, Ordering::AcqRel);
        conn.send(cchannel, Event::Deliver(ev));
    }
    q.flush_removed(removed);
}

/// Runs deliveries and dead-lettering until nothing more follows.
fn settle_effects(st: &mut State, mut fx: Effects, now: i64) {
    for _ in 0..64 {
        if fx.dispatch.is_empty() && fx.dead.is_empty() {
            return;
        }
        let queues = std::mem::take(&mut fx.dispatch);
        let dead = std::mem::take(&mut fx.dead);
        let mut seen = HashSet::new();
        for (vh, q) in queues {
            if !seen.insert((vh.clone(), q.clone())) {
                continue;
            }
            let State { vhosts, conns, .. } = st;
            if let Some(queue) = vhosts.get_mut(&vh).and_then(|v| v.queues.get_mut(&q)) {
                dispatch(queue, &vh, &q, conns, now, &mut fx);
            }
        }
        for (vh, q, m, reason) in dead {
            dead_letter(st, &vh, &q, m, reason, now, &mut fx);
        }
    }
}

/// Republishes a message that left `queue` through the queue's dead-letter exchange.
fn dead_letter(
    st: &mut State,
    vhost: &str,
    queue: &str,
    m: Msg,
    reason: DeathReason,
    now: i64,
    fx: &mut Effects,
) {
    let Some(vh) = st.vhosts.get_mut(vhost) else {
        return;
    };
    let Some(q) = vh.queues.get(queue) else {
        return;
    };
    let Some(dlx) = q.args.dlx.clone() else {
        return;
    };
    let key = q
        .args
        .dlrk
        .clone()
        .unwrap_or_else(|| m.data.routing_key.clone());
    let props = fields::dead_letter_properties(
        &m.data.properties,
        queue,
        reason,
        &m.data.exchange,
        &m.data.routing_key,
        now,
    );
    let data = Arc::new(MsgData {
        exchange: dlx.clone(),
        routing_key: key.clone(),
        properties: props,
        body: m.data.body.clone(),
        persistent: m.data.persistent,
        priority: m.data.priority,
    });
    let targets = route(vh, &dlx, &key, &data.properties);
    for t in targets {
        // A message expiring again in the queue it came from would loop: RabbitMQ drops
        // a dead-letter cycle without a rejection; so does this.
        if t == queue && reason != DeathReason::Rejected {
            continue;
        }
        enqueue(vh, vhost, &t, data.clone(), -1, None, fx, now);
    }
}

/// Puts a message into a queue (journaling it when both are durable). Returns false when
/// the queue refuses it (x-overflow reject-publish).
#[allow(clippy::too_many_arguments)]
fn enqueue(
    vh: &mut Vhost,
    vhost: &str,
    qname: &str,
    data: Arc<MsgData>,
    expiration_ms: i64,
    completion: Option<&Arc<Completion>>,
    fx: &mut Effects,
    now: i64,
) -> bool {
    let Some(q) = vh.queues.get_mut(qname) else {
        return false;
    };
    let full = q
        .args
        .max_length
        .is_some_and(|max| q.ready.len as u64 >= max)
        || q.args
            .max_length_bytes
            .is_some_and(|max| q.ready.bytes + data.body.len() as u64 > max);
    let mut removed = Vec::new();
    if full {
        match q.args.overflow.unwrap_or(Overflow::DropHead) {
            Overflow::RejectPublish | Overflow::RejectPublishDlx => {
                if q.args.overflow == Some(Overflow::RejectPublishDlx) {
                    let m = Msg {
                        seq: 0,
                        data,
                        expires_at: i64::MAX,
                        redelivered: false,
                        deliveries: 0,
                        persisted: false,
                    };
                    fx.dead
                        .push((vhost.to_owned(), qname.to_owned(), m, DeathReason::Maxlen));
                }
                return false;
            }
            Overflow::DropHead => {}
        }
    }
    let ttl = match (q.args.message_ttl, expiration_ms) {
        (Some(a), b) if b >= 0 => Some(a.min(b)),
        (Some(a), _) => Some(a),
        (None, b) if b >= 0 => Some(b),
        _ => None,
    };
    let seq = q.next_seq;
    q.next_seq += 1;
    let mut m = Msg {
        seq,
        data,
        expires_at: ttl.map_or(i64::MAX, |t| now.saturating_add(t)),
        redelivered: false,
        deliveries: 0,
        persisted: false,
    };
    if let (Some(j), true) = (&q.journal, m.data.persistent) {
        m.persisted = true;
        j.message(
            v1::JournaledMessage {
                seq,
                exchange: m.data.exchange.clone(),
                routing_key: m.data.routing_key.clone(),
                properties: m.data.properties.clone(),
                body: m.data.body.clone(),
                expires_at_ms: m.expires_at,
                priority: m.data.priority as u32,
                delivery_count: 0,
                // Set by the queue's journal handle.
                queue: 0,
            },
            completion,
        );
    }
    q.ready.push_back(m);
    // drop-head: the oldest ready messages make room (dead-lettered as maxlen).
    loop {
        let over_len = q
            .args
            .max_length
            .is_some_and(|max| q.ready.len as u64 > max);
        let over_bytes = q
            .args
            .max_length_bytes
            .is_some_and(|max| q.ready.bytes > max);
        if !(over_len || over_bytes) {
            break;
        }
        let Some(old) = q.ready.pop() else { break };
        q.forget(&old, &mut removed);
        fx.dead
            .push((vhost.to_owned(), qname.to_owned(), old, DeathReason::Maxlen));
    }
    q.flush_removed(removed);
    fx.dispatch.push((vhost.to_owned(), qname.to_owned()));
    true
}

// ---------------------------------------------------------------------------------------
// The attach stream
// ---------------------------------------------------------------------------------------

/// Events of one attached connection; taking a delivery gives the core credit back.
pub struct ChannelEvents {
    rx: mpsc::UnboundedReceiver<v1::ChannelEvent>,
    outstanding: Arc<AtomicUsize>,
    blocked: Arc<AtomicBool>,
    room: Arc<Notify>,
}

impl Stream for ChannelEvents {
    type Item = v1::ChannelEvent;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(Some(ev)) = &polled
            && matches!(ev.event, Some(Event::Deliver(_)))
        {
            let left = self.outstanding.fetch_sub(1, Ordering::AcqRel) - 1;
            if left <= OUTSTANDING_LIMIT / 2 && self.blocked.swap(false, Ordering::AcqRel) {
                self.room.notify_one();
            }
        }
        polled
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
            v1::SettleKind::SettleAck => (60, 80),
            v1::SettleKind::SettleReject => (60, 90),
            v1::SettleKind::SettleNack => (60, 120),
        },
        Command::Recover(_) => (60, 110),
        Command::ConfirmSelect(_) => (85, 10),
        Command::TxSelect(_) => (90, 10),
        Command::TxCommit(_) => (90, 20),
        Command::TxRollback(_) => (90, 30),
    }
}

fn ok(class_id: u32, method_id: u32) -> v1::MethodOk {
    v1::MethodOk {
        class_id,
        method_id,
        ..Default::default()
    }
}

fn random_name(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut r = rand::rng();
    let tail: String = (0..22)
        .map(|_| ALPHABET[r.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{tail}")
}

/// Durable definitions a command changed, to write before its answer.
#[derive(Default)]
struct Writes {
    ops: Vec<Op>,
    /// Publishes to x-delayed-message exchanges, to hand to the durable timers (vhost,
    /// publish, due time, the confirm waiting for it).
    delayed: Vec<(String, v1::BasicPublish, i64, Option<Arc<Completion>>)>,
}

impl Core {
    /// Serves one attached AMQP connection: reads commands until the gateway closes the
    /// stream, then closes its channels (unacked messages go back to their queues) and
    /// deletes its exclusive queues.
    pub fn attach_channels(
        &self,
        mut commands: impl Stream<Item = Result<v1::ChannelCommand, tonic::Status>>
        + Send
        + Unpin
        + 'static,
    ) -> ChannelEvents {
        let (tx, rx) = mpsc::unbounded_channel();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let blocked = Arc::new(AtomicBool::new(false));
        let room = Arc::new(Notify::new());
        let events = ChannelEvents {
            rx,
            outstanding: outstanding.clone(),
            blocked: blocked.clone(),
            room: room.clone(),
        };
        let core = self.clone();
        let id = self
            .inner
            .channels
            .next_conn
            .fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut opened = false;
            loop {
                let cmd = tokio::select! {
                    cmd = commands.next() => match cmd {
                        Some(Ok(c)) => c,
                        _ => break,
                    },
                    _ = room.notified() => {
                        core.redispatch_conn(id);
                        continue;
                    }
                };
                let Some(command) = cmd.command else { continue };
                if let Command::LinkOpen(open) = &command {
                    if opened {
                        continue;
                    }
                    opened = true;
                    debug!(conn = id, vhost = %open.vhost, user = %open.user, peer = %open.peer, "amqp connection attached");
                    let mut st = core.inner.channels.state.lock();
                    st.vhosts
                        .entry(open.vhost.clone())
                        .or_insert_with(Vhost::new);
                    st.conns.insert(
                        id,
                        Conn {
                            vhost: open.vhost.clone(),
                            tx: tx.clone(),
                            outstanding: outstanding.clone(),
                            blocked: blocked.clone(),
                            channels: HashMap::new(),
                            reply_to: HashMap::new(),
                        },
                    );
                    continue;
                }
                if !opened {
                    continue;
                }
                let channel = cmd.channel;
                if is_fast(&command) {
                    // Publishes and acks need no await: the ones already waiting are applied
                    // under one lock, with one round of deliveries after them.
                    let mut batch = vec![(channel, command)];
                    let mut next = None;
                    while batch.len() < FAST_BATCH {
                        match commands.next().now_or_never() {
                            Some(Some(Ok(c))) => match c.command {
                                Some(cmd) if is_fast(&cmd) => batch.push((c.channel, cmd)),
                                Some(cmd) => {
                                    next = Some((c.channel, cmd));
                                    break;
                                }
                                None => {}
                            },
                            _ => break,
                        }
                    }
                    core.fast_commands(id, batch);
                    let Some((channel, command)) = next else {
                        continue;
                    };
                    let ids = method_ids(&command);
                    if let Err(r) = core.channel_command(id, channel, command).await {
                        core.fail_channel(id, channel, r, ids);
                    }
                    continue;
                }
                let ids = method_ids(&command);
                if let Err(r) = core.channel_command(id, channel, command).await {
                    core.fail_channel(id, channel, r, ids);
                }
            }
            if opened {
                core.close_conn(id).await;
            }
        });
        events
    }

    /// Publishes and acks of one connection, applied under one lock.
    fn fast_commands(&self, conn: u64, batch: Vec<(u32, Command)>) {
        let now = now_ms();
        let mut writes = Writes::default();
        {
            let mut st = self.inner.channels.state.lock();
            let mut fx = Effects::default();
            for (channel, command) in batch {
                let ids = method_ids(&command);
                if let Err(r) = self.apply(
                    &mut st,
                    conn,
                    channel,
                    command,
                    None,
                    &mut writes,
                    &mut fx,
                    now,
                ) {
                    fail_locked(&mut st, conn, channel, r, ids, &mut fx, &mut writes);
                }
            }
            settle_effects(&mut st, fx, now);
        }
        self.spawn_writes(writes);
    }

    fn fail_channel(&self, conn: u64, channel: u32, r: Refusal, ids: (u32, u32)) {
        let now = now_ms();
        let mut st = self.inner.channels.state.lock();
        let mut fx = Effects::default();
        let mut writes = Writes::default();
        fail_locked(&mut st, conn, channel, r, ids, &mut fx, &mut writes);
        settle_effects(&mut st, fx, now);
        drop(st);
        self.spawn_writes(writes);
    }

    fn spawn_writes(&self, writes: Writes) {
        if writes.ops.is_empty() && writes.delayed.is_empty() {
            return;
        }
        let core = self.clone();
        tokio::spawn(async move {
            if let Err(e) = core.apply_writes(writes).await {
                warn!(error = %e, "could not write AMQP definitions");
            }
        });
    }

    async fn apply_writes(&self, writes: Writes) -> CoreResult<()> {
        for (vhost, publish, due, confirm) in writes.delayed {
            let timer = v1::Timer {
                id: String::new(),
                due_at_ms: due,
                namespace: vhost,
                action: Some(v1::timer::Action::AmqpPublish(publish)),
            };
            let ok = match self.schedule_timer(timer).await {
                Ok(_) => true,
                Err(e) => {
                    warn!(error = %e, "could not schedule a delayed AMQP message");
                    false
                }
            };
            if let Some(c) = confirm {
                c.done(ok);
            }
        }
        if !writes.ops.is_empty() {
            self.inner.meta.txn(vec![], writes.ops).await?;
        }
        Ok(())
    }

    fn redispatch_conn(&self, conn: u64) {
        let now = now_ms();
        let mut st = self.inner.channels.state.lock();
        let mut fx = Effects::default();
        if let Some(c) = st.conns.get(&conn) {
            for ch in c.channels.values() {
                for cons in ch.consumers.values() {
                    fx.dispatch.push((c.vhost.clone(), cons.queue.clone()));
                }
            }
        }
        settle_effects(&mut st, fx, now);
    }

    async fn close_conn(&self, conn: u64) {
        let now = now_ms();
        let writes = {
            let mut st = self.inner.channels.state.lock();
            let mut fx = Effects::default();
            let mut writes = Writes::default();
            let chans: Vec<u32> = st
                .conns
                .get(&conn)
                .map(|c| c.channels.keys().copied().collect())
                .unwrap_or_default();
            for ch in chans {
                close_channel(&mut st, conn, ch, &mut fx, &mut writes);
            }
            if let Some(c) = st.conns.remove(&conn) {
                for name in c.reply_to.values() {
                    st.reply_to.remove(name);
                }
                let vhost = c.vhost.clone();
                if let Some(vh) = st.vhosts.get_mut(&vhost) {
                    let exclusive: Vec<String> = vh
                        .queues
                        .iter()
                        .filter(|(_, q)| q.exclusive == Some(conn))
                        .map(|(n, _)| n.clone())
                        .collect();
                    for q in exclusive {
                        delete_queue(&mut st, &vhost, &q, &mut writes);
                    }
                }
            }
            settle_effects(&mut st, fx, now);
            writes
        };
        if let Err(e) = self.apply_writes(writes).await {
            warn!(error = %e, "could not write AMQP definitions after a connection closed");
        }
    }

    async fn channel_command(&self, conn: u64, channel: u32, command: Command) -> Res<()> {
        let now = now_ms();
        // Commands that need an id or a partition before the state changes.
        let mut log_id = None;
        if let Command::QueueDeclare(d) = &command
            && d.durable
            && !d.passive
            && !d.exclusive
        {
            let exists = {
                let st = self.inner.channels.state.lock();
                let vhost = st.conns.get(&conn).map(|c| c.vhost.clone());
                vhost
                    .and_then(|v| st.vhosts.get(&v))
                    .is_some_and(|vh| vh.queues.contains_key(&d.name))
            };
            if !exists {
                self.ensure_journal()
                    .await
                    .map_err(|e| refuse(INTERNAL_ERROR, e.to_string()))?;
                // The queue's id in the shared journal (unused when another declare wins).
                let id = self
                    .next_counter("stream_id")
                    .await
                    .map_err(|e| refuse(INTERNAL_ERROR, e.to_string()))?;
                log_id = Some(id);
            }
        }
        let mut writes = Writes::default();
        let reply = {
            let mut st = self.inner.channels.state.lock();
            let mut fx = Effects::default();
            let r = self.apply(
                &mut st,
                conn,
                channel,
                command,
                log_id,
                &mut writes,
                &mut fx,
                now,
            );
            settle_effects(&mut st, fx, now);
            r?
        };
        let (event, after_writes) = match reply {
            Some((ev, wait)) => (Some(ev), wait),
            None => (None, false),
        };
        if after_writes {
            self.apply_writes(writes)
                .await
                .map_err(|e| refuse(INTERNAL_ERROR, e.to_string()))?;
        } else {
            self.spawn_writes(writes);
        }
        if let Some(ev) = event
            && let Some(c) = self.inner.channels.state.lock().conns.get(&conn)
        {
            c.send(channel, ev);
        }
        Ok(())
    }

    /// Applies one command under the lock. Returns an answer to send once the definitions
    /// it changed are written (`true`), or `None` when it already answered.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        st: &mut State,
        conn: u64,
        channel: u32,
        command: Command,
        log_id: Option<u64>,
        writes: &mut Writes,
        fx: &mut Effects,
        now: i64,
    ) -> Res<Option<(Event, bool)>> {
        let Some(c) = st.conns.get(&conn) else {
            return Ok(None);
        };
        let vhost = c.vhost.clone();
        let open = c.channels.contains_key(&channel);
        match &command {
            Command::ChannelOpen(_) => {
                if open {
                    return Err(refuse(
                        CHANNEL_ERROR,
                        format!("second 'channel.open' seen on channel {channel}"),
                    ));
                }
                let c = st.conns.get_mut(&conn).expect("checked");
                c.channels.insert(channel, Chan::new());
                c.send(channel, Event::Ok(ok(20, 11)));
                return Ok(None);
            }
            Command::ChannelClose(_) => {
                close_channel(st, conn, channel, fx, writes);
                return Ok(None);
            }
            _ if !open => {
                // The channel closed on an error; commands in flight are dropped.
                return Ok(None);
            }
            _ => {}
        }
        let c = st.conns.get_mut(&conn).expect("checked");
        let tx = c.tx.clone();
        let ch = c.channels.get_mut(&channel).expect("checked");
        match command {
            Command::LinkOpen(_) | Command::ChannelOpen(_) | Command::ChannelClose(_) => Ok(None),
            Command::Flow(active) => {
                ch.flow = active;
                emit(
                    &tx,
                    channel,
                    Event::Ok(v1::MethodOk {
                        active,
                        ..ok(20, 21)
                    }),
                );
                if active {
                    let queues: Vec<_> = ch.consumers.values().map(|x| x.queue.clone()).collect();
                    fx.dispatch
                        .extend(queues.into_iter().map(|q| (vhost.clone(), q)));
                }
                Ok(None)
            }
            Command::Qos(q) => {
                if q.global {
                    ch.global_prefetch = q.prefetch_count;
                } else {
                    ch.prefetch = q.prefetch_count;
                }
                emit(&tx, channel, Event::Ok(ok(60, 11)));
                let queues: Vec<_> = ch.consumers.values().map(|x| x.queue.clone()).collect();
                fx.dispatch
                    .extend(queues.into_iter().map(|q| (vhost.clone(), q)));
                Ok(None)
            }
            Command::ConfirmSelect(_) => {
                if ch.tx.is_some() {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                ch.confirm = true;
                emit(&tx, channel, Event::Ok(ok(85, 11)));
                Ok(None)
            }
            Command::TxSelect(_) => {
                if ch.confirm {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if ch.tx.is_none() {
                    ch.tx = Some(Vec::new());
                }
                emit(&tx, channel, Event::Ok(ok(90, 11)));
                Ok(None)
            }
            Command::TxRollback(_) => {
                let Some(t) = ch.tx.as_mut() else {
                    return Err(refuse(PRECONDITION_FAILED, "channel is not transactional"));
                };
                t.clear();
                emit(&tx, channel, Event::Ok(ok(90, 31)));
                Ok(None)
            }
            Command::TxCommit(_) => {
                let Some(t) = ch.tx.as_mut() else {
                    return Err(refuse(PRECONDITION_FAILED, "channel is not transactional"));
                };
                let ops = std::mem::take(t);
                let tx = tx.clone();
                let done = Completion::new(
                    tx,
                    v1::ChannelEvent {
                        channel,
                        event: Some(Event::Ok(ok(90, 21))),
                    },
                );
                // Checks first, so that a bad ack fails the commit before anything applies.
                for op in &ops {
                    if let TxOp::Settle(s) = op {
                        check_settle(st, conn, channel, s)?;
                    }
                }
                for op in ops {
                    match op {
                        TxOp::Publish(p) => {
                            publish(st, conn, channel, &vhost, p, Some(&done), fx, writes, now)?
                        }
                        TxOp::Settle(s) => settle(st, conn, channel, &vhost, s, fx)?,
                    }
                }
                done.done(true);
                Ok(None)
            }
            Command::Publish(p) => {
                if let Some(t) = ch.tx.as_mut() {
                    // Checked now (as RabbitMQ does), applied at commit.
                    let vh = st.vhosts.get(&vhost).expect("vhost of a connection");
                    check_exchange_for_publish(vh, &vhost, &p.exchange)?;
                    t.push(TxOp::Publish(p));
                    return Ok(None);
                }
                let confirm = ch.confirm.then(|| {
                    Completion::new(
                        tx.clone(),
                        v1::ChannelEvent {
                            channel,
                            event: Some(Event::Confirm(v1::PublishConfirm {
                                seq: p.confirm_seq,
                                ack: true,
                            })),
                        },
                    )
                });
                let r = publish(
                    st,
                    conn,
                    channel,
                    &vhost,
                    p,
                    confirm.as_ref(),
                    fx,
                    writes,
                    now,
                );
                if let Some(done) = confirm {
                    done.done(true);
                }
                r.map(|_| None)
            }
            Command::Settle(s) => {
                if let Some(t) = ch.tx.as_mut() {
                    if !s.multiple && !ch.unacked.contains_key(&s.delivery_tag) {
                        return Err(refuse(
                            PRECONDITION_FAILED,
                            format!("unknown delivery tag {}", s.delivery_tag),
                        ));
                    }
                    t.push(TxOp::Settle(s));
                    return Ok(None);
                }
                check_settle(st, conn, channel, &s)?;
                settle(st, conn, channel, &vhost, s, fx)?;
                Ok(None)
            }
            Command::Recover(requeue) => {
                if !requeue {
                    return Err(refuse(
                        NOT_IMPLEMENTED,
                        "basic.recover with requeue=false is not supported",
                    ));
                }
                let tags: Vec<u64> = ch.unacked.keys().copied().collect();
                requeue_tags(st, conn, channel, &vhost, &tags, fx);
                if st.conns.contains_key(&conn) {
                    emit(&tx, channel, Event::Ok(ok(60, 111)));
                }
                Ok(None)
            }
            Command::Consume(b) => consume(st, conn, channel, &vhost, b, fx).map(|_| None),
            Command::Cancel(tag) => {
                cancel_consumer(st, conn, channel, &vhost, &tag, fx, writes);
                if st.conns.contains_key(&conn) {
                    emit(
                        &tx,
                        channel,
                        Event::Ok(v1::MethodOk {
                            name: tag,
                            ..ok(60, 31)
                        }),
                    );
                }
                Ok(None)
            }
            Command::Get(g) => basic_get(st, conn, channel, &vhost, g, fx, now).map(|_| None),
            Command::ExchangeDeclare(d) => exchange_declare(st, &vhost, d, writes),
            Command::ExchangeDelete(d) => exchange_delete(st, &vhost, d, writes),
            Command::ExchangeBind(b) => {
                let binding = make_binding(
                    Dest::Exchange(b.destination.clone()),
                    &b.routing_key,
                    &b.arguments,
                )?;
                if b.unbind {
                    unbind(st, conn, &vhost, &b.source, binding, writes)?;
                } else {
                    bind(st, conn, &vhost, &b.source, binding, writes)?;
                }
                Ok(Some((
                    Event::Ok(ok(40, if b.unbind { 51 } else { 31 })),
                    true,
                )))
            }
            Command::QueueBind(b) => {
                let binding =
                    make_binding(Dest::Queue(b.queue.clone()), &b.routing_key, &b.arguments)?;
                if b.unbind {
                    unbind(st, conn, &vhost, &b.exchange, binding, writes)?;
                } else {
                    bind(st, conn, &vhost, &b.exchange, binding, writes)?;
                }
                Ok(Some((
                    Event::Ok(ok(50, if b.unbind { 51 } else { 21 })),
                    true,
                )))
            }
            Command::QueueDeclare(d) => queue_declare(st, conn, &vhost, d, log_id, writes, now),
            Command::QueuePurge(name) => {
                let q = queue_for(st, conn, &vhost, &name)?;
                let msgs = q.ready.drain();
                let mut removed = Vec::new();
                for m in &msgs {
                    q.forget(m, &mut removed);
                }
                q.flush_removed(removed);
                Ok(Some((
                    Event::Ok(v1::MethodOk {
                        message_count: msgs.len() as u64,
                        ..ok(50, 31)
                    }),
                    false,
                )))
            }
            Command::QueueDelete(d) => {
                let Some(vh) = st.vhosts.get(&vhost) else {
                    return Ok(None);
                };
                let Some(q) = vh.queues.get(&d.queue) else {
                    return Ok(Some((Event::Ok(ok(50, 41)), false)));
                };
                if let Some(owner) = q.exclusive
                    && owner != conn
                {
                    return Err(locked(&d.queue, &vhost));
                }
                if d.if_unused && !q.consumers.is_empty() {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        format!("queue '{}' in vhost '{vhost}' in use", d.queue),
                    ));
                }
                if d.if_empty && q.ready.len > 0 {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        format!("queue '{}' in vhost '{vhost}' is not empty", d.queue),
                    ));
                }
                let count = q.ready.len as u64;
                delete_queue(st, &vhost, &d.queue, writes);
                Ok(Some((
                    Event::Ok(v1::MethodOk {
                        message_count: count,
                        ..ok(50, 41)
                    }),
                    true,
                )))
            }
        }
    }

    /// A delayed message is due: routed by its exchange's x-delayed-type.
    pub(crate) fn publish_delayed(&self, vhost: &str, p: v1::BasicPublish) {
        let now = now_ms();
        let mut st = self.inner.channels.state.lock();
        if !st.vhosts.contains_key(vhost) {
            return;
        }
        let mut fx = Effects::default();
        let mut writes = Writes::default();
        if let Err(r) = publish(&mut st, 0, 0, vhost, p, None, &mut fx, &mut writes, now) {
            warn!(text = %r.text, "a delayed AMQP message could not be routed; dropped");
        }
        settle_effects(&mut st, fx, now);
    }

    /// The log partition that durable queues journal into, if one was made.
    pub(crate) async fn queue_journal_partitions(&self) -> CoreResult<Vec<PartitionKey>> {
        Ok(self
            .inner
            .meta
            .get(&meta::key(JOURNAL_KEY, &[]))
            .await?
            .and_then(|raw| raw[..].try_into().ok().map(u64::from_le_bytes))
            .map(|id| PartitionKey::new(id, 0))
            .into_iter()
            .collect())
    }

    /// The journal's partition: the recorded one, or a new one (first start).
    async fn journal_partition(&self) -> CoreResult<PartitionKey> {
        if let Some(key) = self.queue_journal_partitions().await?.into_iter().next() {
            if self.inner.log.bounds(key).await.is_err() {
                self.inner.log.create_partition(key).await?;
            }
            return Ok(key);
        }
        let id = self.next_counter("stream_id").await?;
        let key = PartitionKey::new(id, 0);
        self.inner.log.create_partition(key).await?;
        self.inner
            .meta
            .put(&meta::key(JOURNAL_KEY, &[]), &id.to_le_bytes())
            .await?;
        Ok(key)
    }

    /// Stops the durable queues' journal writer (at shutdown, before the log closes).
    pub(crate) async fn close_channels(&self) {
        let journal = self.inner.channels.state.lock().journal.clone();
        if let Some(j) = journal {
            j.close().await;
        }
    }

    /// Opens the durable queues' journal on the first durable queue.
    async fn ensure_journal(&self) -> CoreResult<()> {
        if self.inner.channels.state.lock().journal.is_some() {
            return Ok(());
        }
        let _admin = self.inner.admin.lock().await;
        if self.inner.channels.state.lock().journal.is_some() {
            return Ok(());
        }
        let key = self.journal_partition().await?;
        let mut replayed = journal::Replayed::empty();
        let shared = journal::start(
            self.inner.log.clone(),
            key,
            &mut replayed,
            self.inner.config.queue_journal_compact_after,
        );
        self.inner.channels.state.lock().journal = Some(shared);
        Ok(())
    }

    /// Loads durable exchanges, queues (replaying the journal) and bindings.
    pub(crate) async fn recover_channels(&self) -> CoreResult<()> {
        let exchanges = self
            .inner
            .meta
            .scan_prefix(&meta::prefix(EXCHANGE_KEY, &[]), usize::MAX)
            .await?;
        let queues = self
            .inner
            .meta
            .scan_prefix(&meta::prefix(QUEUE_KEY, &[]), usize::MAX)
            .await?;
        let bindings = self
            .inner
            .meta
            .scan_prefix(&meta::prefix(BINDING_KEY, &[]), usize::MAX)
            .await?;
        let mut recovered_queues = Vec::new();
        for (k, v) in &queues {
            let parts = meta::parts(QUEUE_KEY, k);
            let [vhost, name] = &parts[..] else { continue };
            let rec: QueueRecord = from_json("amqp queue", v)?;
            recovered_queues.push((vhost.clone(), name.clone(), rec));
        }
        // The journal exists once a durable queue was declared; a server that never had
        // one has no partition for it.
        let recorded = !self.queue_journal_partitions().await?.is_empty();
        let (shared, mut replayed) = if recorded || !recovered_queues.is_empty() {
            let key = self.journal_partition().await?;
            let known: HashSet<u64> = recovered_queues.iter().map(|q| q.2.log_id).collect();
            let mut replayed = journal::replay(&self.inner.log, key, &known)
                .await
                .map_err(|e| crate::CoreError::Corrupt(format!("the AMQP queue journal: {e}")))?;
            let shared = journal::start(
                self.inner.log.clone(),
                key,
                &mut replayed,
                self.inner.config.queue_journal_compact_after,
            );
            (Some(shared), replayed)
        } else {
            (None, journal::Replayed::empty())
        };
        let mut st = self.inner.channels.state.lock();
        st.journal = shared.clone();
        let now = now_ms();
        for (k, v) in &exchanges {
            let parts = meta::parts(EXCHANGE_KEY, k);
            let [vhost, name] = &parts[..] else { continue };
            let rec: ExchangeRecord = from_json("amqp exchange", v)?;
            let Some(kind) = Kind::parse(&rec.kind) else {
                continue;
            };
            st.vhosts
                .entry(vhost.clone())
                .or_insert_with(Vhost::new)
                .exchanges
                .insert(
                    name.clone(),
                    Exchange {
                        kind,
                        delayed: rec.delayed,
                        durable: true,
                        auto_delete: rec.auto_delete,
                        internal: rec.internal,
                        bindings: Vec::new(),
                    },
                );
        }
        let mut messages = 0usize;
        for (vhost, name, rec) in recovered_queues {
            let args = QueueArgs::parse(&rec.args).unwrap_or_default();
            let mut q = Queue::new(true, None, rec.auto_delete, rec.args.clone(), args);
            let msgs = replayed.queues.remove(&rec.log_id).unwrap_or_default();
            q.next_seq = msgs.keys().next_back().map_or(1, |s| s + 1);
            for (seq, m) in msgs {
                let data = Arc::new(MsgData {
                    exchange: m.exchange,
                    routing_key: m.routing_key,
                    properties: m.properties,
                    body: m.body,
                    persistent: true,
                    priority: m.priority.min(255) as u8,
                });
                q.ready.push_back(Msg {
                    seq,
                    data,
                    expires_at: m.expires_at_ms,
                    // Whether it was delivered before the restart is not journaled.
                    redelivered: true,
                    deliveries: m.delivery_count,
                    persisted: true,
                });
                messages += 1;
            }
            q.journal = shared.as_ref().map(|j| j.for_queue(rec.log_id));
            q.last_used_ms = now;
            st.vhosts
                .entry(vhost)
                .or_insert_with(Vhost::new)
                .queues
                .insert(name, q);
        }
        for (k, v) in &bindings {
            let rec: BindingRecord = from_json("amqp binding", v)?;
            let Some(vhost) = meta::parts(BINDING_KEY, k).into_iter().next() else {
                continue;
            };
            let table = fields::decode_table(&rec.args).unwrap_or_default();
            if let Some(ex) = st
                .vhosts
                .get_mut(&vhost)
                .and_then(|vh| vh.exchanges.get_mut(&rec.source))
            {
                ex.bindings.push(Binding {
                    dest: rec.dest,
                    key: rec.key,
                    args: rec.args,
                    table,
                });
            }
        }
        let queues = st.vhosts.values().map(|v| v.queues.len()).sum::<usize>();
        if queues > 0 {
            info!(queues, messages, "recovered durable AMQP queues");
        }
        Ok(())
    }

    /// Expires messages (x-message-ttl, per-message expiration) and unused queues
    /// (x-expires).
    pub(crate) async fn run_channel_timers(self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = now_ms();
            let writes = {
                let mut st = self.inner.channels.state.lock();
                let mut fx = Effects::default();
                let mut writes = Writes::default();
                let mut expired_queues = Vec::new();
                for (vname, vh) in st.vhosts.iter_mut() {
                    for (qname, q) in vh.queues.iter_mut() {
                        if q.ready.front().is_some_and(|m| m.expires_at <= now) {
                            let mut removed = Vec::new();
                            while q.ready.front().is_some_and(|m| m.expires_at <= now) {
                                let m = q.ready.pop().expect("front exists");
                                q.forget(&m, &mut removed);
                                fx.dead.push((
                                    vname.clone(),
                                    qname.clone(),
                                    m,
                                    DeathReason::Expired,
                                ));
                            }
                            q.flush_removed(removed);
                        }
                        if let Some(exp) = q.args.expires
                            && q.consumers.is_empty()
                            && now - q.last_used_ms >= exp
                        {
                            expired_queues.push((vname.clone(), qname.clone()));
                        }
                    }
                }
                settle_effects(&mut st, fx, now);
                for (v, q) in expired_queues {
                    delete_queue(&mut st, &v, &q, &mut writes);
                }
                writes
            };
            if let Err(e) = self.apply_writes(writes).await {
                warn!(error = %e, "could not delete expired AMQP queues");
            }
        }
    }
}

/// Commands with no durable write before their effect: batched by the attach loop.
fn is_fast(c: &Command) -> bool {
    matches!(c, Command::Publish(_) | Command::Settle(_))
}

/// Sends the error and closes the channel (the connection, for connection-level codes, is
/// closed by the gateway when it sees the error).
fn fail_locked(
    st: &mut State,
    conn: u64,
    channel: u32,
    r: Refusal,
    (class_id, method_id): (u32, u32),
    fx: &mut Effects,
    writes: &mut Writes,
) {
    let err = v1::ChannelError {
        code: r.code,
        text: r.text,
        class_id,
        method_id,
    };
    if let Some(c) = st.conns.get(&conn) {
        c.send(
            channel,
            if r.connection || channel == 0 {
                Event::ConnectionError(err)
            } else {
                Event::ChannelError(err)
            },
        );
    }
    close_channel(st, conn, channel, fx, writes);
}

fn emit(tx: &EventTx, channel: u32, event: Event) {
    let _ = tx.send(v1::ChannelEvent {
        channel,
        event: Some(event),
    });
}

fn locked(queue: &str, vhost: &str) -> Refusal {
    refuse(
        RESOURCE_LOCKED,
        format!(
            "cannot obtain exclusive access to locked queue '{queue}' in vhost '{vhost}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
        ),
    )
}

fn no_queue(queue: &str, vhost: &str) -> Refusal {
    refuse(NOT_FOUND, format!("no queue '{queue}' in vhost '{vhost}'"))
}

fn no_exchange(exchange: &str, vhost: &str) -> Refusal {
    refuse(
        NOT_FOUND,
        format!("no exchange '{exchange}' in vhost '{vhost}'"),
    )
}

/// A queue this connection may use (exists, not another connection's exclusive queue).
fn queue_for<'a>(st: &'a mut State, conn: u64, vhost: &str, name: &str) -> Res<&'a mut Queue> {
    let q = st
        .vhosts
        .get_mut(vhost)
        .and_then(|vh| vh.queues.get_mut(name))
        .ok_or_else(|| no_queue(name, vhost))?;
    if let Some(owner) = q.exclusive
        && owner != conn
    {
        return Err(locked(name, vhost));
    }
    Ok(q)
}

fn check_exchange_for_publish(vh: &Vhost, vhost: &str, exchange: &str) -> Res<()> {
    let exchange = if exchange == "amq.default" {
        ""
    } else {
        exchange
    };
    let Some(ex) = vh.exchanges.get(exchange) else {
        return Err(no_exchange(exchange, vhost));
    };
    if ex.internal {
        return Err(refuse(
            ACCESS_REFUSED,
            format!("cannot publish to internal exchange '{exchange}' in vhost '{vhost}'"),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn publish(
    st: &mut State,
    conn: u64,
    channel: u32,
    vhost: &str,
    mut p: v1::BasicPublish,
    confirm: Option<&Arc<Completion>>,
    fx: &mut Effects,
    writes: &mut Writes,
    now: i64,
) -> Res<()> {
    let exchange = if p.exchange == "amq.default" {
        String::new()
    } else {
        std::mem::take(&mut p.exchange)
    };
    // Direct reply-to: straight to the requester's channel, no queue.
    if exchange.is_empty() && p.routing_key.starts_with(REPLY_TO) {
        let target = st.reply_to.get(&p.routing_key).cloned();
        let Some((rc, rch, rtag)) = target else {
            return_unroutable(st, conn, channel, &exchange, &p);
            return Ok(());
        };
        if let Some(c) = st.conns.get_mut(&rc)
            && let Some(ch) = c.channels.get_mut(&rch)
        {
            let tag = ch.next_tag;
            ch.next_tag += 1;
            c.outstanding.fetch_add(1, Ordering::AcqRel);
            c.send(
                rch,
                Event::Deliver(v1::ChannelDelivery {
                    consumer_tag: rtag,
                    delivery_tag: tag,
                    exchange: String::new(),
                    routing_key: p.routing_key.clone(),
                    properties: p.properties,
                    body: p.body,
                    ..Default::default()
                }),
            );
        }
        return Ok(());
    }
    let vh = st
        .vhosts
        .get_mut(vhost)
        .expect("the vhost of a connection exists");
    check_exchange_for_publish(vh, vhost, &exchange)?;
    let ex = &vh.exchanges[&exchange];
    // conn 0 is the timer service handing a due message back.
    if ex.delayed && conn != 0 {
        let delay = fields::decode_properties(&p.properties)
            .and_then(|pr| pr.headers().clone())
            .and_then(|h| h.inner().get("x-delay").and_then(fields::as_i64))
            .unwrap_or(0);
        if delay > 0 {
            if let Some(c) = confirm {
                c.hold();
            }
            p.exchange = exchange;
            writes.delayed.push((
                vhost.to_owned(),
                p,
                now.saturating_add(delay),
                confirm.cloned(),
            ));
            return Ok(());
        }
    }
    let targets = route(vh, &exchange, &p.routing_key, &p.properties);
    if targets.is_empty() {
        return_unroutable(st, conn, channel, &exchange, &p);
        return Ok(());
    }
    let data = Arc::new(MsgData {
        exchange,
        routing_key: p.routing_key,
        properties: p.properties,
        body: p.body,
        persistent: p.persistent,
        priority: p.priority.min(255) as u8,
    });
    let mut refused = false;
    for t in targets {
        if !enqueue(
            vh,
            vhost,
            &t,
            data.clone(),
            p.expiration_ms,
            confirm,
            fx,
            now,
        ) {
            refused = true;
        }
    }
    if refused && let Some(c) = confirm {
        // x-overflow reject-publish: the publisher learns by a nack.
        c.hold();
        c.done(false);
    }
    Ok(())
}

/// A message that reached no queue goes back to a mandatory publisher (basic.return).
fn return_unroutable(st: &State, conn: u64, channel: u32, exchange: &str, p: &v1::BasicPublish) {
    if !p.mandatory {
        return;
    }
    if let Some(c) = st.conns.get(&conn) {
        c.send(
            channel,
            Event::Returned(v1::ChannelDelivery {
                exchange: exchange.to_owned(),
                routing_key: p.routing_key.clone(),
                properties: p.properties.clone(),
                body: p.body.clone(),
                reply_code: NO_ROUTE,
                reply_text: "NO_ROUTE".into(),
                ..Default::default()
            }),
        );
    }
}

fn check_settle(st: &State, conn: u64, channel: u32, s: &v1::BasicSettle) -> Res<()> {
    let Some(ch) = st.conns.get(&conn).and_then(|c| c.channels.get(&channel)) else {
        return Ok(());
    };
    if s.multiple && s.delivery_tag == 0 {
        return Ok(());
    }
    if !s.multiple && !ch.unacked.contains_key(&s.delivery_tag) {
        return Err(refuse(
            PRECONDITION_FAILED,
            format!("unknown delivery tag {}", s.delivery_tag),
        ));
    }
    if s.multiple && !ch.unacked.keys().any(|t| *t <= s.delivery_tag) {
        return Err(refuse(
            PRECONDITION_FAILED,
            format!("unknown delivery tag {}", s.delivery_tag),
        ));
    }
    Ok(())
}

fn settle(
    st: &mut State,
    conn: u64,
    channel: u32,
    vhost: &str,
    s: v1::BasicSettle,
    fx: &mut Effects,
) -> Res<()> {
    let Some(ch) = st
        .conns
        .get_mut(&conn)
        .and_then(|c| c.channels.get_mut(&channel))
    else {
        return Ok(());
    };
    let tags: Vec<u64> = if s.multiple {
        let upto = if s.delivery_tag == 0 {
            u64::MAX
        } else {
            s.delivery_tag
        };
        ch.unacked.range(..=upto).map(|(t, _)| *t).collect()
    } else {
        vec![s.delivery_tag]
    };
    let ack = s.kind() == v1::SettleKind::SettleAck;
    if !ack && s.requeue {
        requeue_tags(st, conn, channel, vhost, &tags, fx);
        return Ok(());
    }
    let ch = st
        .conns
        .get_mut(&conn)
        .and_then(|c| c.channels.get_mut(&channel))
        .expect("checked");
    let mut taken = Vec::with_capacity(tags.len());
    for t in tags {
        if let Some(u) = ch.unacked.remove(&t) {
            if let Some(cons) = u.consumer.as_ref().and_then(|c| ch.consumers.get_mut(c)) {
                cons.in_flight = cons.in_flight.saturating_sub(1);
            }
            taken.push(u);
        }
    }
    let mut by_queue: HashMap<String, Vec<Msg>> = HashMap::new();
    for u in taken {
        by_queue.entry(u.queue).or_default().push(u.msg);
    }
    let Some(vh) = st.vhosts.get_mut(vhost) else {
        return Ok(());
    };
    for (qname, msgs) in by_queue {
        let Some(q) = vh.queues.get_mut(&qname) else {
            continue;
        };
        let mut removed = Vec::with_capacity(msgs.len());
        for m in msgs {
            q.unacked = q.unacked.saturating_sub(1);
            q.forget(&m, &mut removed);
            if !ack {
                fx.dead
                    .push((vhost.to_owned(), qname.clone(), m, DeathReason::Rejected));
            }
        }
        q.flush_removed(removed);
        fx.dispatch.push((vhost.to_owned(), qname));
    }
    Ok(())
}

/// Puts unacked messages of a channel back in their queues, each at its place by original
/// position (ahead of everything published after it), redelivered.
fn requeue_tags(
    st: &mut State,
    conn: u64,
    channel: u32,
    vhost: &str,
    tags: &[u64],
    fx: &mut Effects,
) {
    let Some(ch) = st
        .conns
        .get_mut(&conn)
        .and_then(|c| c.channels.get_mut(&channel))
    else {
        return;
    };
    let mut by_queue: HashMap<String, Vec<Msg>> = HashMap::new();
    for t in tags {
        if let Some(u) = ch.unacked.remove(t) {
            if let Some(cons) = u.consumer.as_ref().and_then(|c| ch.consumers.get_mut(c)) {
                cons.in_flight = cons.in_flight.saturating_sub(1);
            }
            by_queue.entry(u.queue).or_default().push(u.msg);
        }
    }
    requeue_msgs(st, vhost, by_queue, fx);
}

fn requeue_msgs(
    st: &mut State,
    vhost: &str,
    by_queue: HashMap<String, Vec<Msg>>,
    fx: &mut Effects,
) {
    let Some(vh) = st.vhosts.get_mut(vhost) else {
        return;
    };
    for (qname, msgs) in by_queue {
        let Some(q) = vh.queues.get_mut(&qname) else {
            continue;
        };
        let mut removed = Vec::new();
        for mut m in msgs {
            q.unacked = q.unacked.saturating_sub(1);
            if let Some(limit) = q.args.delivery_limit
                && m.deliveries > limit
            {
                q.forget(&m, &mut removed);
                fx.dead.push((
                    vhost.to_owned(),
                    qname.clone(),
                    m,
                    DeathReason::DeliveryLimit,
                ));
                continue;
            }
            m.redelivered = true;
            q.ready.requeue(m);
        }
        q.flush_removed(removed);
        fx.dispatch.push((vhost.to_owned(), qname));
    }
}

/// Closes a channel: its consumers go, its unacked messages return to their queues.
fn close_channel(st: &mut State, conn: u64, channel: u32, fx: &mut Effects, writes: &mut Writes) {
    let Some(c) = st.conns.get_mut(&conn) else {
        return;
    };
    let vhost = c.vhost.clone();
    if let Some(name) = c.reply_to.remove(&channel) {
        st.reply_to.remove(&name);
    }
    let Some(c) = st.conns.get_mut(&conn) else {
        return;
    };
    let Some(mut ch) = c.channels.remove(&channel) else {
        return;
    };
    let mut by_queue: HashMap<String, Vec<Msg>> = HashMap::new();
    for (_, u) in std::mem::take(&mut ch.unacked) {
        by_queue.entry(u.queue).or_default().push(u.msg);
    }
    requeue_msgs(st, &vhost, by_queue, fx);
    for (tag, cons) in ch.consumers {
        detach_consumer(st, conn, channel, &vhost, &cons.queue, &tag, fx, writes);
    }
}

#[allow(clippy::too_many_arguments)]
fn detach_consumer(
    st: &mut State,
    conn: u64,
    channel: u32,
    vhost: &str,
    queue: &str,
    tag: &str,
    fx: &mut Effects,
    writes: &mut Writes,
) {
    let Some(q) = st
        .vhosts
        .get_mut(vhost)
        .and_then(|v| v.queues.get_mut(queue))
    else {
        return;
    };
    q.consumers
        .retain(|c| !(c.conn == conn && c.channel == channel && c.tag == tag));
    if q.consumers.is_empty() {
        q.exclusive_consumer = false;
        q.last_used_ms = now_ms();
    }
    if q.consumers.is_empty() && q.auto_delete && q.had_consumer {
        delete_queue(st, vhost, queue, writes);
    } else {
        fx.dispatch.push((vhost.to_owned(), queue.to_owned()));
    }
}

#[allow(clippy::too_many_arguments)]
fn cancel_consumer(
    st: &mut State,
    conn: u64,
    channel: u32,
    vhost: &str,
    tag: &str,
    fx: &mut Effects,
    writes: &mut Writes,
) {
    let Some(c) = st.conns.get_mut(&conn) else {
        return;
    };
    if c.reply_to.contains_key(&channel) && tag == REPLY_TO {
        if let Some(name) = c.reply_to.remove(&channel) {
            st.reply_to.remove(&name);
        }
        return;
    }
    let Some(ch) = c.channels.get_mut(&channel) else {
        return;
    };
    let Some(cons) = ch.consumers.remove(tag) else {
        return;
    };
    // Its unacked messages stay with the channel until acked or the channel closes.
    for u in ch.unacked.values_mut() {
        if u.consumer.as_deref() == Some(tag) {
            u.consumer = None;
        }
    }
    detach_consumer(st, conn, channel, vhost, &cons.queue, tag, fx, writes);
}

/// Deletes a queue: its consumers are cancelled (consumer_cancel_notify), its bindings
/// and definition removed, its journal dropped.
fn delete_queue(st: &mut State, vhost: &str, name: &str, writes: &mut Writes) {
    let Some(vh) = st.vhosts.get_mut(vhost) else {
        return;
    };
    let Some(q) = vh.queues.remove(name) else {
        return;
    };
    let mut auto_deleted = Vec::new();
    for (xname, ex) in vh.exchanges.iter_mut() {
        let before = ex.bindings.len();
        ex.bindings.retain(|b| {
            let gone = b.dest == Dest::Queue(name.to_owned());
            if gone && q.durable && ex.durable {
                writes.ops.push(Op::Delete {
                    key: binding_key(vhost, xname, b),
                });
            }
            !gone
        });
        if ex.auto_delete && before > 0 && ex.bindings.is_empty() {
            auto_deleted.push(xname.clone());
        }
    }
    for x in auto_deleted {
        remove_exchange(vh, vhost, &x, writes);
    }
    if q.durable {
        writes.ops.push(Op::Delete {
            key: meta::key(QUEUE_KEY, &[vhost, name]),
        });
    }
    if let Some(j) = &q.journal {
        j.drop_queue();
    }
    for c in &q.consumers {
        if let Some(conn) = st.conns.get_mut(&c.conn)
            && let Some(ch) = conn.channels.get_mut(&c.channel)
        {
            ch.consumers.remove(&c.tag);
            conn.send(c.channel, Event::Cancelled(c.tag.clone()));
        }
    }
}

fn remove_exchange(vh: &mut Vhost, vhost: &str, name: &str, writes: &mut Writes) {
    let Some(ex) = vh.exchanges.remove(name) else {
        return;
    };
    if ex.durable {
        writes.ops.push(Op::Delete {
            key: meta::key(EXCHANGE_KEY, &[vhost, name]),
        });
        for b in &ex.bindings {
            writes.ops.push(Op::Delete {
                key: binding_key(vhost, name, b),
            });
        }
    }
    // Bindings to it from other exchanges go too.
    for (xname, other) in vh.exchanges.iter_mut() {
        other.bindings.retain(|b| {
            let gone = b.dest == Dest::Exchange(name.to_owned());
            if gone && other.durable && ex.durable {
                writes.ops.push(Op::Delete {
                    key: binding_key(vhost, xname, b),
                });
            }
            !gone
        });
    }
}

fn make_binding(dest: Dest, key: &str, args: &[u8]) -> Res<Binding> {
    let table = fields::decode_table(args).map_err(|e| refuse(PRECONDITION_FAILED, e))?;
    Ok(Binding {
        dest,
        key: key.to_owned(),
        args: args.to_vec(),
        table,
    })
}

/// Neither end of a binding may be the default exchange.
fn check_not_default(source: &str, dest: &Dest) -> Res<()> {
    if source.is_empty() || *dest == Dest::Exchange(String::new()) {
        return Err(refuse(
            ACCESS_REFUSED,
            "operation not permitted on the default exchange",
        ));
    }
    Ok(())
}

fn bind(
    st: &mut State,
    conn: u64,
    vhost: &str,
    source: &str,
    b: Binding,
    writes: &mut Writes,
) -> Res<()> {
    check_not_default(source, &b.dest)?;
    let dest_durable = match &b.dest {
        Dest::Queue(q) => {
            let q = queue_for(st, conn, vhost, q)?;
            q.durable
        }
        Dest::Exchange(x) => {
            let vh = st.vhosts.get(vhost).expect("vhost exists");
            vh.exchanges
                .get(x)
                .ok_or_else(|| no_exchange(x, vhost))?
                .durable
        }
    };
    let vh = st.vhosts.get_mut(vhost).expect("vhost exists");
    let Some(ex) = vh.exchanges.get_mut(source) else {
        return Err(no_exchange(source, vhost));
    };
    let exists = ex
        .bindings
        .iter()
        .any(|x| x.dest == b.dest && x.key == b.key && x.args == b.args);
    if !exists {
        if ex.durable && dest_durable {
            writes.ops.push(Op::Put {
                key: binding_key(vhost, source, &b),
                value: to_json(&BindingRecord {
                    source: source.to_owned(),
                    dest: b.dest.clone(),
                    key: b.key.clone(),
                    args: b.args.clone(),
                }),
            });
        }
        ex.bindings.push(b);
    }
    Ok(())
}

/// queue.unbind / exchange.unbind. As RabbitMQ 3.x: removing a binding that is not there,
/// because it never was or because its source or destination is gone (deleted or never
/// declared), is answered unbind-ok; another connection's exclusive queue is refused (405)
/// only when there is a binding of it to remove.
fn unbind(
    st: &mut State,
    conn: u64,
    vhost: &str,
    source: &str,
    b: Binding,
    writes: &mut Writes,
) -> Res<()> {
    check_not_default(source, &b.dest)?;
    let vh = st.vhosts.get_mut(vhost).expect("vhost exists");
    let (dest_durable, owner) = match &b.dest {
        Dest::Queue(q) => match vh.queues.get(q) {
            Some(q) => (q.durable, q.exclusive),
            None => return Ok(()),
        },
        Dest::Exchange(x) => match vh.exchanges.get(x) {
            Some(x) => (x.durable, None),
            None => return Ok(()),
        },
    };
    let Some(ex) = vh.exchanges.get_mut(source) else {
        return Ok(());
    };
    let Some(i) = ex
        .bindings
        .iter()
        .position(|x| x.dest == b.dest && x.key == b.key && x.args == b.args)
    else {
        return Ok(());
    };
    if let (Dest::Queue(q), Some(owner)) = (&b.dest, owner)
        && owner != conn
    {
        return Err(locked(q, vhost));
    }
    let old = ex.bindings.remove(i);
    if ex.durable && dest_durable {
        writes.ops.push(Op::Delete {
            key: binding_key(vhost, source, &old),
        });
    }
    if ex.auto_delete && ex.bindings.is_empty() {
        remove_exchange(vh, vhost, source, writes);
    }
    Ok(())
}

fn exchange_declare(
    st: &mut State,
    vhost: &str,
    d: v1::ExchangeDeclare,
    writes: &mut Writes,
) -> Res<Option<(Event, bool)>> {
    let vh = st.vhosts.get_mut(vhost).expect("vhost exists");
    let done = Some((Event::Ok(ok(40, 11)), true));
    if d.passive {
        return if vh.exchanges.contains_key(&d.name) {
            Ok(done)
        } else {
            Err(no_exchange(&d.name, vhost))
        };
    }
    let (kind, delayed) = if d.kind == "x-delayed-message" {
        let t = fields::decode_table(&d.arguments).map_err(|e| refuse(PRECONDITION_FAILED, e))?;
        let inner = t
            .inner()
            .get("x-delayed-type")
            .and_then(fields::as_str)
            .and_then(|s| Kind::parse(&s))
            .ok_or_else(|| {
                refuse(
                    PRECONDITION_FAILED,
                    "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                )
            })?;
        (inner, true)
    } else {
        match Kind::parse(&d.kind) {
            Some(k) => (k, false),
            None => {
                return Err(refuse(
                    COMMAND_INVALID,
                    format!("invalid exchange type '{}'", d.kind),
                ));
            }
        }
    };
    if let Some(ex) = vh.exchanges.get(&d.name) {
        let same = ex.kind == kind
            && ex.delayed == delayed
            && ex.durable == d.durable
            && ex.auto_delete == d.auto_delete
            && ex.internal == d.internal;
        if !same {
            return Err(refuse(
                PRECONDITION_FAILED,
                format!(
                    "inequivalent arg 'type' for exchange '{}' in vhost '{vhost}': received '{}' but current is '{}'",
                    d.name,
                    d.kind,
                    ex.kind.as_str()
                ),
            ));
        }
        return Ok(done);
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
    if d.durable {
        writes.ops.push(Op::Put {
            key: meta::key(EXCHANGE_KEY, &[vhost, &d.name]),
            value: to_json(&ExchangeRecord {
                kind: kind.as_str().into(),
                delayed,
                auto_delete: d.auto_delete,
                internal: d.internal,
                args: d.arguments.to_vec(),
            }),
        });
    }
    vh.exchanges.insert(
        d.name,
        Exchange {
            kind,
            delayed,
            durable: d.durable,
            auto_delete: d.auto_delete,
            internal: d.internal,
            bindings: Vec::new(),
        },
    );
    Ok(done)
}

fn exchange_delete(
    st: &mut State,
    vhost: &str,
    d: v1::ExchangeDelete,
    writes: &mut Writes,
) -> Res<Option<(Event, bool)>> {
    let vh = st.vhosts.get_mut(vhost).expect("vhost exists");
    if d.name.is_empty() || d.name.starts_with("amq.") {
        return Err(refuse(
            ACCESS_REFUSED,
            format!("operation not permitted on exchange '{}'", d.name),
        ));
    }
    if let Some(ex) = vh.exchanges.get(&d.name) {
        let used_as_dest = vh.exchanges.values().any(|x| {
            x.bindings
                .iter()
                .any(|b| b.dest == Dest::Exchange(d.name.clone()))
        });
        if d.if_unused && (!ex.bindings.is_empty() || used_as_dest) {
            return Err(refuse(
                PRECONDITION_FAILED,
                format!("exchange '{}' in vhost '{vhost}' in use", d.name),
            ));
        }
        remove_exchange(vh, vhost, &d.name, writes);
    }
    Ok(Some((Event::Ok(ok(40, 21)), true)))
}

#[allow(clippy::too_many_arguments)]
fn queue_declare(
    st: &mut State,
    conn: u64,
    vhost: &str,
    d: v1::QueueDeclare,
    log_id: Option<u64>,
    writes: &mut Writes,
    now: i64,
) -> Res<Option<(Event, bool)>> {
    let name = if d.name.is_empty() {
        random_name("amq.gen-")
    } else {
        d.name.clone()
    };
    let declared = |q: &Queue| {
        Some((
            Event::Ok(v1::MethodOk {
                name: name.clone(),
                message_count: q.ready.len as u64,
                consumer_count: q.consumers.len() as u32,
                ..ok(50, 11)
            }),
            false,
        ))
    };
    let st_journal = st.journal.clone();
    let vh = st.vhosts.get_mut(vhost).expect("vhost exists");
    if let Some(q) = vh.queues.get_mut(&name) {
        if let Some(owner) = q.exclusive
            && owner != conn
        {
            return Err(locked(&name, vhost));
        }
        if !d.passive {
            let check = |what: &str, got: bool, have: bool| -> Res<()> {
                if got != have {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        format!(
                            "inequivalent arg '{what}' for queue '{name}' in vhost '{vhost}': received '{got}' but current is '{have}'"
                        ),
                    ));
                }
                Ok(())
            };
            check("durable", d.durable, q.durable)?;
            check("exclusive", d.exclusive, q.exclusive.is_some())?;
            check("auto_delete", d.auto_delete, q.auto_delete)?;
            let new = fields::decode_table(&d.arguments).unwrap_or_default();
            let old = fields::decode_table(&q.raw_args).unwrap_or_default();
            for key in [
                "x-message-ttl",
                "x-expires",
                "x-max-length",
                "x-max-length-bytes",
                "x-overflow",
                "x-dead-letter-exchange",
                "x-dead-letter-routing-key",
                "x-max-priority",
                "x-queue-type",
                "x-single-active-consumer",
                "x-delivery-limit",
            ] {
                let (a, b) = (new.inner().get(key), old.inner().get(key));
                let same = match (a, b) {
                    (None, None) => true,
                    (Some(a), Some(b)) => fields::value_eq(a, b),
                    (None, Some(v)) | (Some(v), None) => {
                        key == "x-queue-type" && fields::as_str(v).as_deref() == Some("classic")
                    }
                };
                if !same {
                    return Err(refuse(
                        PRECONDITION_FAILED,
                        format!("inequivalent arg '{key}' for queue '{name}' in vhost '{vhost}'"),
                    ));
                }
            }
        }
        q.last_used_ms = now;
        return Ok(declared(q));
    }
    if d.passive {
        return Err(no_queue(&name, vhost));
    }
    if name.starts_with("amq.") && !d.name.is_empty() {
        return Err(refuse(
            ACCESS_REFUSED,
            format!("queue name '{name}' contains reserved prefix 'amq.*'"),
        ));
    }
    let args = QueueArgs::parse(&d.arguments)?;
    if args.quorum && (!d.durable || d.exclusive || d.auto_delete) {
        return Err(refuse(
            PRECONDITION_FAILED,
            format!(
                "invalid property '{}' for queue '{name}' in vhost '{vhost}'",
                if !d.durable {
                    "non-durable"
                } else if d.exclusive {
                    "exclusive"
                } else {
                    "auto-delete"
                }
            ),
        ));
    }
    let mut q = Queue::new(
        d.durable,
        d.exclusive.then_some(conn),
        d.auto_delete,
        d.arguments.to_vec(),
        args,
    );
    q.last_used_ms = now;
    let mut after_writes = false;
    if d.durable && !d.exclusive {
        let id = match log_id {
            Some(id) => id,
            None => return Err(refuse(INTERNAL_ERROR, "no journal id for a durable queue")),
        };
        let Some(shared) = &st_journal else {
            return Err(refuse(INTERNAL_ERROR, "the queue journal is not open"));
        };
        q.journal = Some(shared.for_queue(id));
        writes.ops.push(Op::Put {
            key: meta::key(QUEUE_KEY, &[vhost, &name]),
            value: to_json(&QueueRecord {
                auto_delete: d.auto_delete,
                args: d.arguments.to_vec(),
                log_id: id,
            }),
        });
        after_writes = true;
    }
    let reply = declared(&q).map(|(e, _)| (e, after_writes));
    vh.queues.insert(name, q);
    Ok(reply)
}

fn consume(
    st: &mut State,
    conn: u64,
    channel: u32,
    vhost: &str,
    b: v1::BasicConsume,
    fx: &mut Effects,
) -> Res<()> {
    // Direct reply-to: the gateway names the pseudo-queue (it rewrites reply_to).
    if b.queue.starts_with(REPLY_TO) {
        if !b.no_ack {
            return Err(refuse(
                PRECONDITION_FAILED,
                "reply consumer cannot acknowledge",
            ));
        }
        let name = b.queue.clone();
        let tag = if b.consumer_tag.is_empty() {
            REPLY_TO.to_owned()
        } else {
            b.consumer_tag
        };
        let c = st.conns.get_mut(&conn).expect("checked");
        c.reply_to.insert(channel, name.clone());
        st.reply_to.insert(name, (conn, channel, tag.clone()));
        let c = st.conns.get(&conn).expect("checked");
        c.send(
            channel,
            Event::Ok(v1::MethodOk {
                name: tag,
                ..ok(60, 21)
            }),
        );
        return Ok(());
    }
    let tag = if b.consumer_tag.is_empty() {
        random_name("amq.ctag-")
    } else {
        b.consumer_tag
    };
    {
        let ch = st
            .conns
            .get(&conn)
            .and_then(|c| c.channels.get(&channel))
            .expect("checked");
        if ch.consumers.contains_key(&tag) {
            return Err(refuse(
                NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
    }
    let prefetch = st
        .conns
        .get(&conn)
        .and_then(|c| c.channels.get(&channel))
        .map_or(0, |c| c.prefetch);
    let q = queue_for(st, conn, vhost, &b.queue)?;
    if q.exclusive_consumer || (b.exclusive && !q.consumers.is_empty()) {
        return Err(refuse(
            ACCESS_REFUSED,
            format!("queue '{}' in vhost '{vhost}' in exclusive use", b.queue),
        ));
    }
    q.consumers.push(ConsumerRef {
        conn,
        channel,
        tag: tag.clone(),
    });
    q.exclusive_consumer = b.exclusive;
    q.had_consumer = true;
    let c = st.conns.get_mut(&conn).expect("checked");
    let ch = c.channels.get_mut(&channel).expect("checked");
    ch.consumers.insert(
        tag.clone(),
        Consumer {
            queue: b.queue.clone(),
            no_ack: b.no_ack,
            prefetch,
            in_flight: 0,
        },
    );
    c.send(
        channel,
        Event::Ok(v1::MethodOk {
            name: tag,
            ..ok(60, 21)
        }),
    );
    fx.dispatch.push((vhost.to_owned(), b.queue));
    Ok(())
}

fn basic_get(
    st: &mut State,
    conn: u64,
    channel: u32,
    vhost: &str,
    g: v1::BasicGet,
    fx: &mut Effects,
    now: i64,
) -> Res<()> {
    let q = queue_for(st, conn, vhost, &g.queue)?;
    q.last_used_ms = now;
    let mut removed = Vec::new();
    let mut got = None;
    while let Some(mut m) = q.ready.pop() {
        if m.expires_at <= now {
            q.forget(&m, &mut removed);
            fx.dead
                .push((vhost.to_owned(), g.queue.clone(), m, DeathReason::Expired));
            continue;
        }
        m.deliveries += 1;
        if g.no_ack {
            q.forget(&m, &mut removed);
        } else {
            q.unacked += 1;
        }
        got = Some(m);
        break;
    }
    let left = q.ready.len as u64;
    let quorum = q.args.quorum;
    q.flush_removed(removed);
    let c = st.conns.get_mut(&conn).expect("checked");
    let Some(m) = got else {
        c.send(channel, Event::GetEmpty(true));
        return Ok(());
    };
    let ch = c.channels.get_mut(&channel).expect("checked");
    let tag = ch.next_tag;
    ch.next_tag += 1;
    let mut ev = delivery("", tag, &m);
    count_redelivery(quorum, &m, &mut ev);
    ev.message_count = left;
    if !g.no_ack {
        ch.unacked.insert(
            tag,
            Unacked {
                queue: g.queue,
                consumer: None,
                msg: m,
            },
        );
    }
    c.send(channel, Event::GetOk(ev));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, priority: u8) -> Msg {
        Msg {
            seq,
            data: Arc::new(MsgData {
                exchange: String::new(),
                routing_key: String::new(),
                properties: Bytes::new(),
                body: Bytes::from_static(b"x"),
                persistent: false,
                priority,
            }),
            expires_at: i64::MAX,
            redelivered: false,
            deliveries: 0,
            persisted: false,
        }
    }

    fn drain_seqs(r: &mut Ready) -> Vec<u64> {
        std::iter::from_fn(|| r.pop()).map(|m| m.seq).collect()
    }

    #[test]
    fn requeued_messages_go_back_to_their_places() {
        let mut r = Ready::new(None);
        for seq in 6..=8 {
            r.push_back(msg(seq, 0));
        }
        // One at a time, in any order: each lands at its original position.
        for seq in [3, 1, 2, 5, 4] {
            r.requeue(msg(seq, 0));
        }
        assert_eq!((r.len, r.bytes), (8, 8));
        assert_eq!(drain_seqs(&mut r), (1..=8).collect::<Vec<_>>());
        assert_eq!((r.len, r.bytes), (0, 0));
    }

    #[test]
    fn requeue_keeps_to_the_message_priority_level() {
        let mut r = Ready::new(Some(2));
        r.push_back(msg(4, 0));
        r.push_back(msg(5, 2));
        for (seq, priority) in [(3, 0), (1, 2), (2, 0)] {
            r.requeue(msg(seq, priority));
        }
        assert_eq!(drain_seqs(&mut r), vec![1, 5, 2, 3, 4]);
    }
}
