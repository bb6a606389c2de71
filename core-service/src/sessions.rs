//! Client sessions and topic routing (MQTT), owned by the core so that a client finds its
//! session through any gateway instance.
//!
//! A gateway attaches one command/event stream per client connection ([`Core::run_session`]).
//! The core keeps, per session: subscriptions, QoS 1/2 messages queued or in flight with
//! their packet ids, QoS 2 packet ids received and not yet released, and the will of the
//! connected client. Routing walks the namespace's [`SubscriptionTree`] once per message;
//! a message is one `Bytes` payload shared by every session it is queued for.
//!
//! State is owned per unit: each session has its own lock, each namespace its own
//! subscription tree and retained store; the maps that find them are locked only to look
//! one up, add or remove it. A session's lock may be taken before its namespace's tree
//! lock, never the other way round (routing reads the tree, lets it go, then visits the
//! sessions it matched).
//!
//! Durability: sessions that outlive their connection (expiry != 0) have their record,
//! their queued QoS 1/2 messages and their released QoS 2 ids in the metadata store, written
//! before the PUBACK / SUBACK / PUBREL that depends on them. Sessions that end with their
//! connection never touch the disk, so QoS 0 and clean-session traffic do not wait for it.
//! Retained messages are stored too (except `$SYS/`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use tributary_proto::v1::{
    self, ErrorCode, ErrorDetail, session_command::Command, session_event::Event,
};
use tributary_storage::Op;

use crate::error::{CoreError, CoreResult};
use crate::meta::{self, from_json, to_json};
use crate::session_dead_letters::{DeadLetterBuffer, SessionDeadLetter};
use crate::topics::{self, Entry, SubscriptionTree};
use crate::{Core, now_ms};

pub(crate) use crate::session_events::EventSender;

/// QoS 0 deliveries waiting for a slow connection beyond which the publisher waits for it
/// (backpressure, as RabbitMQ's flow control), up to [`SLOW_SUBSCRIBER_WAIT`] per publish;
/// after that the delivery is dropped (QoS 0 may be lost; memory must stay bounded).
const QOS0_BACKLOG: usize = 1_000;

/// A connected session with this many QoS 1/2 messages queued behind its window holds up the
/// acknowledgements (PUBACK, PUBREC) of the publishes that reach it, until it is back under
/// [`PACE_LOW`]: publishers then go at their subscribers' pace (their in-flight window fills)
/// instead of queues growing without bound and latency with them.
const PACE_HIGH: usize = 1_000;
const PACE_LOW: usize = 500;
/// The longest one acknowledgement waits for a lagging subscriber. One that stopped reading
/// slows its publishers by this much and no more: its queue then fills to `max_queued`, and
/// what overflows is dropped, logged and counted as before.
const PACE_MAX_WAIT: Duration = Duration::from_millis(500);
const SLOW_SUBSCRIBER_WAIT: Duration = Duration::from_secs(1);

/// QoS 0 deliveries to connections over their backlog: sent with waiting, outside the lock
/// (with the session they are for, to name it if the delivery is dropped).
type SlowSends = Vec<(EventSender, v1::SessionEvent, SessionId)>;
/// Room for everything else: QoS 1/2 deliveries are bounded by the client's window
/// (at most 65,535), answers by the commands in flight.
const EVENT_CAPACITY: usize = QOS0_BACKLOG + 65_535 + 4_096;

/// Messages per session (queued plus in flight) beyond which new QoS 1/2 messages for it
/// are dropped, counted in `tributary_session_dropped_total{reason="queue_full"}` and logged
/// (at most one WARN per session every [`DROP_LOG_INTERVAL_MS`]).
pub const DEFAULT_MAX_QUEUED: usize = 100_000;

/// Drops are logged at most once per this many milliseconds: per session for a full queue,
/// per broker for slow QoS 0 subscribers; each line carries the count since the last one.
const DROP_LOG_INTERVAL_MS: i64 = 10_000;

const SESSION_KEY: &str = "mqttsession";
/// Kinds of session timers in the durable timer service.
const WILL_TIMER: &str = "will";
const EXPIRY_TIMER: &str = "expiry";

/// The id of a session's timer of one kind: derived from the session's name (client ids
/// may hold anything, timer ids may not), so a reconnect finds and cancels it.
fn session_timer_id(kind: &str, id: &SessionId) -> String {
    let mut name = id.0.as_bytes().to_vec();
    name.push(0);
    name.extend_from_slice(id.1.as_bytes());
    format!(
        "mqtt-{kind}-{:016x}{:016x}",
        meta::stable_hash(&name),
        meta::stable_hash(id.1.as_bytes())
    )
}
const PENDING_KEY: &str = "mqttpending";
/// A message queued for several persistent sessions: stored once, referenced by each copy.
const BODY_KEY: &str = "mqttbody";
const RETAINED_KEY: &str = "mqttretained";
/// How often `$SYS/` topics are refreshed.
const SYS_INTERVAL: Duration = Duration::from_secs(10);

/// (namespace, client id). Shared strings: a session's id is copied into every message
/// routed to it and into its connection's stream, and a copy is then two counts, not two
/// allocations.
type SessionId = (Arc<str>, Arc<str>);
/// A share group and the filter string it subscribed with.
type ShareKey = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Stats {
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

pub(crate) struct Broker {
    /// Sessions by (namespace, client id).
    sessions: RwLock<HashMap<SessionId, Arc<SessionCell>>>,
    namespaces: RwLock<HashMap<String, Arc<Namespace>>>,
    /// Source of fencing epochs; every open gets a new one.
    epoch: AtomicI64,
    /// Source of ids for messages stored once for several sessions (past the highest
    /// recovered one).
    next_body_id: AtomicU64,
    started: Instant,
    stats: Stats,
    max_queued: usize,
    /// When a slow QoS 0 subscriber's drop was last logged (ms), and drops since then.
    slow_drop_logged_ms: AtomicI64,
    slow_drops_unlogged: AtomicU64,
    /// Where dropped QoS 1/2 messages go when a dead-letter address is configured.
    dead_letters: Option<Arc<DeadLetterBuffer>>,
}

type SessionCell = Mutex<Session>;

/// What one namespace shares between its sessions.
struct Namespace {
    /// Its name, shared by the ids of its sessions.
    name: Arc<str>,
    tree: RwLock<SubscriptionTree>,
    retained: Mutex<BTreeMap<String, v1::RoutedMessage>>,
    /// Round-robin position per (share group, filter).
    share_cursor: Mutex<HashMap<ShareKey, usize>>,
}

struct Session {
    /// Taken out of the broker's map (ended): whoever still holds it leaves it alone.
    removed: bool,
    epoch: i64,
    conn: Option<Conn>,
    subs: BTreeMap<String, v1::SessionSubscription>,
    /// 0 = ends with the connection, -1 = never expires.
    expiry_ms: i64,
    inflight: BTreeMap<u16, Pending>,
    queue: VecDeque<Pending>,
    next_packet_id: u16,
    /// A B-tree: half an empty hash set's size, in every session record, and as quick for
    /// the few QoS 2 ids a client has between PUBREC and PUBREL.
    incoming_qos2: BTreeSet<u16>,
    next_seq: u64,
    /// When a full-queue drop was last logged (ms; 0 = never), and drops since then.
    drop_logged_ms: i64,
    drops_unlogged: u64,
    /// Publishers waiting for this session's queue to get back under [`PACE_LOW`].
    pacers: Option<Arc<tokio::sync::Notify>>,
}

impl Session {
    fn new(epoch: i64, expiry_ms: i64) -> Self {
        Self {
            removed: false,
            epoch,
            conn: None,
            subs: BTreeMap::new(),
            expiry_ms,
            inflight: BTreeMap::new(),
            queue: VecDeque::new(),
            next_packet_id: 1,
            incoming_qos2: BTreeSet::new(),
            next_seq: 1,
            drop_logged_ms: 0,
            drops_unlogged: 0,
            pacers: None,
        }
    }

    /// Whether a publisher should wait for this session (connected, queue over the mark).
    fn lagging(&self, mark: usize) -> bool {
        !self.removed && self.conn.is_some() && self.queue.len() >= mark
    }

    /// Wakes the publishers waiting for this session's queue to shrink.
    fn wake_pacers(&mut self) {
        if let Some(n) = self.pacers.take() {
            n.notify_waiters();
        }
    }

    fn persistent(&self) -> bool {
        self.expiry_ms != 0
    }

    fn record(&self) -> SessionRecord {
        SessionRecord {
            expiry_ms: self.expiry_ms,
            subs: self.subs.values().map(|s| s.encode_to_vec()).collect(),
            incoming_qos2: self.incoming_qos2.iter().copied().collect(),
            disconnected_at_ms: self.conn.is_none().then(now_ms),
        }
    }

    fn allocate_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }
}

struct Conn {
    tx: EventSender,
    receive_max: usize,
    /// Boxed: a message is several hundred bytes inline, and most connections have no will.
    will: Option<Box<v1::RoutedMessage>>,
    will_delay_ms: i64,
}

#[derive(Clone)]
struct Pending {
    seq: u64,
    /// Shared by every copy with the same delivery flags (most of a fan-out's): a copy is
    /// then a few words, cheap to queue, move into flight and look up, instead of the whole
    /// message (several hundred bytes inline) moved at each step.
    message: Arc<v1::RoutedMessage>,
    sub_ids: Vec<u32>,
    released: bool,
    /// Sent at least once: a resend carries DUP.
    sent: bool,
    persisted: bool,
    /// The stored message this persisted copy references (None: stored inline).
    body: Option<Arc<StoredBody>>,
    /// The shared subscription it came through, for redelivery to another member.
    share: Option<(Arc<str>, Arc<str>)>,
}

/// A message stored once for the persistent sessions it was queued for; deleted with the
/// last copy that references it.
#[derive(Debug)]
struct StoredBody {
    key: Vec<u8>,
    id: u64,
    refs: AtomicUsize,
}

/// The deletes that forget a persisted copy: its own entry, and the stored message when it
/// was the last copy referencing it.
fn forget_persisted(id: &SessionId, p: &Pending, ops: &mut Vec<Op>) {
    if !p.persisted {
        return;
    }
    ops.push(Op::Delete {
        key: pending_key(id, p.seq),
    });
    if let Some(b) = &p.body
        && b.refs.fetch_sub(1, Ordering::AcqRel) == 1
    {
        ops.push(Op::Delete { key: b.key.clone() });
    }
}

impl Pending {
    /// A copy not yet queued, sent or stored.
    fn new(message: Arc<v1::RoutedMessage>, sub_ids: Vec<u32>, share: Option<ShareKey>) -> Self {
        Self {
            seq: 0,
            message,
            sub_ids,
            released: false,
            sent: false,
            persisted: false,
            body: None,
            share,
        }
    }
}

/// The subscription identifier a delivery through `sub` carries (none for 0).
fn sub_ids(sub: &v1::SessionSubscription) -> Vec<u32> {
    (sub.subscription_id > 0)
        .then_some(sub.subscription_id)
        .into_iter()
        .collect()
}

#[derive(Serialize, Deserialize)]
struct SessionRecord {
    expiry_ms: i64,
    /// Each a protobuf `SessionSubscription`.
    subs: Vec<Vec<u8>>,
    incoming_qos2: Vec<u16>,
    disconnected_at_ms: Option<i64>,
}

fn session_key(id: &SessionId) -> Vec<u8> {
    meta::key(SESSION_KEY, &[&id.0, &id.1])
}

fn pending_key(id: &SessionId, seq: u64) -> Vec<u8> {
    meta::key(PENDING_KEY, &[&id.0, &id.1, &format!("{seq:020}")])
}

fn retained_key(ns: &str, topic: &str) -> Vec<u8> {
    meta::key(RETAINED_KEY, &[ns, topic])
}

fn body_key(ns: &str, body_id: u64) -> Vec<u8> {
    meta::key(BODY_KEY, &[ns, &format!("{body_id:020}")])
}

fn pending_value(p: &Pending, packet_id: u16) -> Vec<u8> {
    let (message, body_id) = match &p.body {
        // The record is in the stored message; the copy keeps its own flags.
        Some(b) => (
            v1::RoutedMessage {
                record: None,
                qos: p.message.qos,
                retain: p.message.retain,
            },
            b.id,
        ),
        None => ((*p.message).clone(), 0),
    };
    v1::PendingDelivery {
        message: Some(message),
        subscription_ids: p.sub_ids.clone(),
        released: p.released,
        packet_id: packet_id.into(),
        body_id,
    }
    .encode_to_vec()
}

fn topic_of(m: &v1::RoutedMessage) -> &str {
    m.record
        .as_ref()
        .and_then(|r| r.properties.as_ref())
        .map_or("", |p| p.address.as_str())
}

fn payload_len(m: &v1::RoutedMessage) -> usize {
    m.record.as_ref().map_or(0, |r| r.value.len())
}

fn can_expire(m: &v1::RoutedMessage) -> bool {
    m.record
        .as_ref()
        .and_then(|r| r.properties.as_ref())
        .is_some_and(|p| p.expires_at_ms > 0)
}

fn expired(m: &v1::RoutedMessage, now: i64) -> bool {
    m.record
        .as_ref()
        .and_then(|r| r.properties.as_ref())
        .is_some_and(|p| p.expires_at_ms > 0 && p.expires_at_ms <= now)
}

/// The message with a copy's delivery flags: the same one when they match.
fn with_delivery_flags(
    m: &Arc<v1::RoutedMessage>,
    qos: u32,
    retain: bool,
) -> Arc<v1::RoutedMessage> {
    if m.qos == qos && m.retain == retain {
        return m.clone();
    }
    flagged_copy(m, qos, retain)
}

fn flagged_copy(m: &v1::RoutedMessage, qos: u32, retain: bool) -> Arc<v1::RoutedMessage> {
    let mut m = m.clone();
    m.qos = qos;
    m.retain = retain;
    Arc::new(m)
}

fn event(request_id: u64, e: Event) -> v1::SessionEvent {
    v1::SessionEvent {
        request_id,
        event: Some(e),
    }
}

fn error_detail(e: &CoreError) -> ErrorDetail {
    ErrorDetail {
        code: e.code() as i32,
        message: e.to_string(),
    }
}

/// The sessions one publish found lagging (over [`PACE_HIGH`]), its publisher excepted.
pub(crate) struct Laggards<'a> {
    publisher: Option<&'a str>,
    cells: Vec<Arc<SessionCell>>,
}

/// A publish's answer, sent once every lagging session it reached is back under
/// [`PACE_LOW`] (or gone), or at `deadline`.
pub(crate) struct HeldReply {
    pub(crate) event: v1::SessionEvent,
    laggards: Vec<Arc<SessionCell>>,
    /// Set when there are laggards (no clock read for the common answer sent at once).
    deadline: Option<tokio::time::Instant>,
}

impl HeldReply {
    fn now(event: v1::SessionEvent) -> Self {
        Self {
            event,
            laggards: Vec::new(),
            deadline: None,
        }
    }

    /// Whether it may be sent right away (no subscriber it reached lags).
    pub(crate) fn free(&self) -> bool {
        self.laggards.is_empty()
    }

    /// Resolves when the reply may be sent; owns what it waits on, so the reply itself
    /// stays free to move.
    pub(crate) fn ready(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let deadline = self.deadline;
        let laggards = self.laggards.clone();
        async move {
            let Some(deadline) = deadline else {
                return;
            };
            for cell in &laggards {
                wait_for_room(cell, deadline).await;
            }
        }
    }
}

/// Waits until `cell`'s session is under [`PACE_LOW`], disconnected or gone, or `deadline`.
async fn wait_for_room(cell: &SessionCell, deadline: tokio::time::Instant) {
    loop {
        let notify = {
            let mut s = cell.lock();
            if !s.lagging(PACE_LOW) {
                return;
            }
            s.pacers
                .get_or_insert_with(|| Arc::new(tokio::sync::Notify::new()))
                .clone()
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before the state is read again, so a wake-up in between is not lost.
        notified.as_mut().enable();
        {
            let s = cell.lock();
            if !s.lagging(PACE_LOW) {
                return;
            }
            if !s.pacers.as_ref().is_some_and(|n| Arc::ptr_eq(n, &notify)) {
                continue; // woken and replaced meanwhile: wait on the current one
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return;
        }
    }
}

/// Where one routed message goes: per session, the copy to queue.
struct Target {
    session: SessionId,
    cell: Arc<SessionCell>,
    pending: Pending,
    persistent: bool,
}

impl Broker {
    pub(crate) fn new(max_queued: usize, dead_letters: Option<Arc<DeadLetterBuffer>>) -> Self {
        Self {
            sessions: RwLock::new(HashMap::new()),
            namespaces: RwLock::new(HashMap::new()),
            epoch: AtomicI64::new(0),
            next_body_id: AtomicU64::new(1),
            started: Instant::now(),
            stats: Stats::default(),
            max_queued: max_queued.max(1),
            slow_drop_logged_ms: AtomicI64::new(0),
            slow_drops_unlogged: AtomicU64::new(0),
            dead_letters,
        }
    }

    /// Hands a dropped QoS 1/2 message to the dead-letter address, if there is one.
    fn dead_letter(&self, id: &SessionId, message: &v1::RoutedMessage, reason: &'static str) {
        if let Some(buffer) = &self.dead_letters {
            buffer.push(SessionDeadLetter {
                namespace: id.0.to_string(),
                client_id: id.1.to_string(),
                message: message.clone(),
                reason,
            });
        }
    }
}

impl Broker {
    fn next_epoch(&self) -> i64 {
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn session(&self, id: &SessionId) -> Option<Arc<SessionCell>> {
        self.sessions.read().get(id).cloned()
    }

    /// The session's cell, made with `make` when there is none; true when it was made.
    fn session_or_insert(
        &self,
        id: &SessionId,
        make: impl FnOnce() -> Session,
    ) -> (Arc<SessionCell>, bool) {
        let mut map = self.sessions.write();
        let mut created = false;
        let cell = map.entry(id.clone()).or_insert_with(|| {
            created = true;
            Arc::new(Mutex::new(make()))
        });
        (cell.clone(), created)
    }

    /// Takes an ended session out of the map (if it is still the one there). Its lock was
    /// held when it was marked `removed`.
    fn forget_session(&self, id: &SessionId, cell: &Arc<SessionCell>) {
        let mut map = self.sessions.write();
        if map.get(id).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            map.remove(id);
        }
    }

    fn namespace(&self, ns: &str) -> Arc<Namespace> {
        if let Some(n) = self.namespaces.read().get(ns) {
            return n.clone();
        }
        self.namespaces
            .write()
            .entry(ns.to_string())
            .or_insert_with(|| {
                Arc::new(Namespace {
                    name: Arc::from(ns),
                    tree: RwLock::default(),
                    retained: Mutex::default(),
                    share_cursor: Mutex::default(),
                })
            })
            .clone()
    }

    fn existing_namespace(&self, ns: &str) -> Option<Arc<Namespace>> {
        self.namespaces.read().get(ns).cloned()
    }

    /// Works out every session a message goes to, with the QoS, retain flag and
    /// subscription ids of its copy.
    fn targets(
        &self,
        ns: &str,
        msg: &Arc<v1::RoutedMessage>,
        publisher: Option<&str>,
    ) -> Vec<Target> {
        let topic = topic_of(msg);
        let Some(space) = self.existing_namespace(ns) else {
            return Vec::new();
        };
        let mut direct: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
        let mut shared: BTreeMap<ShareKey, Vec<Arc<str>>> = BTreeMap::new();
        space
            .tree
            .read()
            .for_each_match(topic, |e: &Entry| match &e.group {
                Some(g) => shared
                    .entry((g.clone(), e.raw_filter.clone()))
                    .or_default()
                    .push(e.client.clone()),
                None => direct
                    .entry(e.client.clone())
                    .or_default()
                    .push(e.raw_filter.clone()),
            });
        let mut out = Vec::with_capacity(direct.len() + shared.len());
        for (client, filters) in direct {
            let id = (space.name.clone(), client.clone());
            let Some(cell) = self.session(&id) else {
                continue;
            };
            let session = cell.lock();
            if session.removed {
                continue;
            }
            let mut slot: Option<(u32, bool, Vec<u32>)> = None;
            for raw in &filters {
                let Some(sub) = session.subs.get(&**raw) else {
                    continue;
                };
                if sub.no_local && publisher == Some(&*client) {
                    continue;
                }
                let slot = slot.get_or_insert((0, false, Vec::new()));
                slot.0 = slot.0.max(sub.qos.min(msg.qos));
                slot.1 |= sub.retain_as_published && msg.retain;
                if sub.subscription_id > 0 {
                    slot.2.push(sub.subscription_id);
                }
            }
            let Some((qos, retain, ids)) = slot else {
                continue;
            };
            let persistent = session.persistent();
            drop(session);
            out.push(Target {
                session: id,
                cell,
                pending: Pending::new(with_delivery_flags(msg, qos, retain), ids, None),
                persistent,
            });
        }
        for ((group, raw), mut members) in shared {
            members.sort();
            members.dedup();
            if let Some(t) = self.pick_member(&space, &group, &raw, &members, msg, None) {
                out.push(t);
            }
        }
        out
    }

    /// One member of a share group for a message: round-robin over the connected members
    /// with room in their window, else over the connected ones, else over all of them.
    #[allow(clippy::too_many_arguments)]
    fn pick_member(
        &self,
        space: &Namespace,
        group: &Arc<str>,
        raw: &Arc<str>,
        members: &[Arc<str>],
        msg: &Arc<v1::RoutedMessage>,
        exclude: Option<&str>,
    ) -> Option<Target> {
        // Each member's cell with (ready, online), looked at one at a time.
        let candidates: Vec<(Arc<str>, Arc<SessionCell>, bool, bool)> = members
            .iter()
            .filter(|m| Some(&***m) != exclude)
            .filter_map(|m| {
                let cell = self.session(&(space.name.clone(), (*m).clone()))?;
                let (ready, online) = {
                    let s = cell.lock();
                    if s.removed {
                        return None;
                    }
                    let ready = s
                        .conn
                        .as_ref()
                        .is_some_and(|c| s.inflight.len() + s.queue.len() < c.receive_max);
                    (ready, s.conn.is_some())
                };
                Some((m.clone(), cell, ready, online))
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let pick = {
            let mut cursors = space.share_cursor.lock();
            let cursor = cursors.entry((group.clone(), raw.clone())).or_insert(0);
            let start = *cursor;
            let n = candidates.len();
            let pick = (0..n)
                .map(|i| (start + i) % n)
                .find(|i| candidates[*i].2)
                .or_else(|| (0..n).map(|i| (start + i) % n).find(|i| candidates[*i].3))
                .unwrap_or(start % n);
            *cursor = pick + 1;
            pick
        };
        let (client, cell, _, _) = &candidates[pick];
        let session = cell.lock();
        let sub = session.subs.get(&**raw)?;
        Some(Target {
            persistent: session.persistent(),
            session: (space.name.clone(), client.clone()),
            cell: cell.clone(),
            pending: Pending::new(
                with_delivery_flags(msg, sub.qos.min(msg.qos), false),
                sub_ids(sub),
                Some((group.clone(), raw.clone())),
            ),
        })
    }

    /// Members of a share group (the sessions of `ns` subscribed with `raw`).
    fn share_members(&self, ns: &str, raw: &str) -> Vec<Arc<str>> {
        let cells: Vec<(Arc<str>, Arc<SessionCell>)> = self
            .sessions
            .read()
            .iter()
            .filter(|((n, _), _)| **n == *ns)
            .map(|((_, c), cell)| (c.clone(), cell.clone()))
            .collect();
        let mut out: Vec<Arc<str>> = cells
            .into_iter()
            .filter(|(_, cell)| {
                let s = cell.lock();
                !s.removed && s.subs.contains_key(raw)
            })
            .map(|(c, _)| c)
            .collect();
        out.sort();
        out
    }

    /// Takes a session's subscriptions out of its namespace's tree.
    fn discard_subscriptions<'a>(&self, id: &SessionId, filters: impl Iterator<Item = &'a String>) {
        let Some(space) = self.existing_namespace(&id.0) else {
            return;
        };
        let mut tree = space.tree.write();
        for raw in filters {
            if let Ok(p) = topics::parse_filter(raw) {
                tree.remove(p.filter, &id.1, raw);
            }
        }
    }

    /// Runs `f` on the session of an attached connection, unless another took it over.
    fn with_attached<R>(&self, a: &Attached, f: impl FnOnce(&mut Session) -> R) -> CoreResult<R> {
        let taken = || CoreError::Conflict("the session was taken over".into());
        let cell = self.session(&a.id).ok_or_else(taken)?;
        let mut s = cell.lock();
        if s.removed || s.epoch != a.epoch || s.conn.is_none() {
            return Err(taken());
        }
        Ok(f(&mut s))
    }
}

impl Broker {
    /// Queues a copy for its session and sends what the window allows. Returns the deletes
    /// of persisted copies that were dropped.
    fn enqueue(
        &self,
        target: Target,
        slow: &mut SlowSends,
        laggards: Option<&mut Laggards<'_>>,
    ) -> Vec<Op> {
        let mut session = target.cell.lock();
        if session.removed {
            return Vec::new();
        }
        // A publisher never waits for itself: its own acknowledgements drain that queue.
        let watch = laggards
            .filter(|l| target.pending.message.qos > 0 && l.publisher != Some(&*target.session.1));
        let ops = self.enqueue_into(target.session, &mut session, target.pending, slow);
        if let Some(l) = watch
            && session.lagging(PACE_HIGH)
        {
            l.cells.push(target.cell.clone());
        }
        ops
    }

    /// [`Self::enqueue`] into a session already locked.
    fn enqueue_into(
        &self,
        id: SessionId,
        session: &mut Session,
        mut pending: Pending,
        slow: &mut SlowSends,
    ) -> Vec<Op> {
        if pending.message.qos == 0 {
            if let Some(conn) = &session.conn {
                let backlog = conn.tx.backlog();
                if backlog < QOS0_BACKLOG {
                    self.send_delivery(conn, 0, &pending, false);
                } else {
                    slow.push((conn.tx.clone(), delivery_event(0, &pending, false), id));
                }
            }
            return Vec::new();
        }
        if session.queue.len() + session.inflight.len() >= self.max_queued {
            metrics::counter!("tributary_session_dropped_total", "reason" => "queue_full")
                .increment(1);
            session.drops_unlogged += 1;
            let now = now_ms();
            if now - session.drop_logged_ms >= DROP_LOG_INTERVAL_MS {
                warn!(
                    namespace = %id.0,
                    client = %id.1,
                    reason = "queue_full",
                    max_queued = self.max_queued,
                    dropped = session.drops_unlogged,
                    "session queue full (mqtt_max_queued); QoS 1/2 messages dropped (at most one line per session every {} s; every drop is counted in tributary_session_dropped_total)",
                    DROP_LOG_INTERVAL_MS / 1000
                );
                session.drop_logged_ms = now;
                session.drops_unlogged = 0;
            }
            self.dead_letter(&id, &pending.message, "max-length");
            let mut ops = Vec::new();
            forget_persisted(&id, &pending, &mut ops);
            return ops;
        }
        if pending.seq == 0 {
            pending.seq = session.next_seq;
            session.next_seq += 1;
        }
        session.queue.push_back(pending);
        self.pump(&id, session)
    }

    /// Applies a client's PUBACK/PUBCOMP (or PUBREC: `received_only`) to its session and
    /// moves the next messages into flight: the writes that make it durable go to `ops`,
    /// the packet ids to answer with PUBREL to `releases`.
    fn apply_ack(
        &self,
        id: &SessionId,
        session: &mut Session,
        ack: &v1::SessionAck,
        ops: &mut Vec<Op>,
        releases: &mut Vec<u16>,
    ) {
        for &packet_id in &ack.packet_ids {
            let packet_id = packet_id as u16;
            if ack.received_only {
                if let Some(p) = session.inflight.get_mut(&packet_id)
                    && p.message.qos == 2
                {
                    p.released = true;
                    if p.persisted {
                        ops.push(Op::Put {
                            key: pending_key(id, p.seq),
                            value: pending_value(p, packet_id),
                        });
                    }
                }
                releases.push(packet_id);
            } else if let Some(p) = session.inflight.remove(&packet_id) {
                forget_persisted(id, &p, ops);
            }
        }
        ops.extend(self.pump(id, session));
    }

    /// Moves queued messages into flight while the client's window has room. Returns the
    /// deletes of the expired persisted messages it dropped on the way.
    fn pump(&self, id: &SessionId, session: &mut Session) -> Vec<Op> {
        let mut dead = Vec::new();
        let Some(window) = session.conn.as_ref().map(|c| c.receive_max) else {
            return dead;
        };
        // The clock is read only for a message that can expire (few do; a read per
        // delivery was 3 % of a fan-out's CPU).
        let mut now = None;
        while session.inflight.len() < window {
            let Some(mut p) = session.queue.pop_front() else {
                break;
            };
            if can_expire(&p.message) && expired(&p.message, *now.get_or_insert_with(now_ms)) {
                self.dead_letter(id, &p.message, "expired");
                forget_persisted(id, &p, &mut dead);
                continue;
            }
            let packet_id = session.allocate_packet_id();
            if let Some(conn) = &session.conn {
                self.send_delivery(conn, packet_id, &p, p.sent);
            }
            p.sent = true;
            session.inflight.insert(packet_id, p);
        }
        if session.queue.len() < PACE_LOW {
            session.wake_pacers();
        }
        dead
    }

    fn send_delivery(&self, conn: &Conn, packet_id: u16, p: &Pending, dup: bool) {
        self.count_out(&p.message);
        let _ = conn.tx.try_send(delivery_event(packet_id, p, dup));
    }

    fn count_out(&self, m: &v1::RoutedMessage) {
        self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_out
            .fetch_add(payload_len(m) as u64, Ordering::Relaxed);
    }

    /// Waits (bounded) for slow connections to take their QoS 0 deliveries: the publisher's
    /// stream is held meanwhile, so a fast publisher slows to its slowest subscriber.
    async fn send_slow(&self, slow: SlowSends) {
        if slow.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + SLOW_SUBSCRIBER_WAIT;
        for (tx, ev, id) in slow {
            match tokio::time::timeout_at(deadline, tx.send(ev)).await {
                Ok(Ok(())) => self.stats.messages_out.fetch_add(1, Ordering::Relaxed),
                _ => {
                    self.slow_dropped(&id);
                    0
                }
            };
        }
    }

    /// Counts a QoS 0 delivery dropped for a slow subscriber; logs at most one line every
    /// [`DROP_LOG_INTERVAL_MS`] (for the whole broker), with the drops since the last.
    fn slow_dropped(&self, id: &SessionId) {
        metrics::counter!("tributary_session_dropped_total", "reason" => "slow_subscriber")
            .increment(1);
        self.slow_drops_unlogged.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let last = self.slow_drop_logged_ms.load(Ordering::Relaxed);
        if now - last >= DROP_LOG_INTERVAL_MS
            && self
                .slow_drop_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let dropped = self.slow_drops_unlogged.swap(0, Ordering::Relaxed);
            warn!(
                namespace = %id.0,
                client = %id.1,
                reason = "slow_subscriber",
                dropped,
                "QoS 0 messages dropped for a subscriber that took nothing for {} s (at most one line every {} s; every drop is counted in tributary_session_dropped_total)",
                SLOW_SUBSCRIBER_WAIT.as_secs(),
                DROP_LOG_INTERVAL_MS / 1000
            );
        }
    }
}

fn delivery_event(packet_id: u16, p: &Pending, dup: bool) -> v1::SessionEvent {
    event(
        0,
        Event::Delivery(v1::SessionDelivery {
            packet_id: packet_id.into(),
            message: Some((*p.message).clone()),
            dup,
            subscription_ids: p.sub_ids.clone(),
            release_only: false,
        }),
    )
}

fn release_event(packet_id: u16) -> v1::SessionEvent {
    event(
        0,
        Event::Delivery(v1::SessionDelivery {
            packet_id: packet_id.into(),
            release_only: true,
            ..Default::default()
        }),
    )
}

/// What a connection's command loop needs to know about its session.
struct Attached {
    id: SessionId,
    epoch: i64,
}

/// What a session stream keeps between commands.
#[derive(Default)]
pub(crate) struct AttachedStream {
    attached: Option<Attached>,
    closed: bool,
}

impl AttachedStream {
    /// Whether the stream ends with its session still attached (it is then detached as
    /// for a connection lost).
    pub(crate) fn needs_detach(&self) -> bool {
        self.still_attached().is_some()
    }

    fn still_attached(&self) -> Option<&Attached> {
        self.attached.as_ref().filter(|_| !self.closed)
    }
}

impl Core {
    fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// Serves one attached connection on a task of its own: reads commands until the
    /// stream ends (the gRPC transport, and tests). A gateway in this process reads
    /// [`Core::drive_session`] instead and saves the task.
    pub fn attach_session<C>(
        &self,
        commands: impl Stream<Item = Result<C, tonic::Status>> + Send + Unpin + 'static,
    ) -> mpsc::Receiver<Box<v1::SessionEvent>>
    where
        C: Into<Box<v1::SessionCommand>> + Send + 'static,
    {
        let (out, rx) = mpsc::channel(EVENT_CAPACITY);
        let mut events = self.drive_session(commands);
        tokio::spawn(async move {
            // Gone readers are not a reason to stop: the commands are served to their end
            // and the session detached, as a gateway expects.
            while let Some(event) = events.next().await {
                let _ = out.send(event).await;
            }
        });
        rx
    }

    /// One attached connection's events; reading them serves its commands, in order, on
    /// the reader's task (crate::session_stream). At the end of the commands the session
    /// is detached (as for a lost connection unless it was closed) and the events end.
    pub fn drive_session<C>(
        &self,
        commands: impl Stream<Item = Result<C, tonic::Status>> + Send + Unpin + 'static,
    ) -> crate::session_stream::SessionStream
    where
        C: Into<Box<v1::SessionCommand>> + Send + 'static,
    {
        self.session_stream(crate::session_stream::Commands::Stream(Box::pin(
            commands.map(|c| c.map(Into::into)),
        )))
    }

    /// [`Core::drive_session`] with the commands pushed by the reader
    /// ([`crate::SessionStream::push`]) instead of read from a stream.
    pub fn open_session(&self) -> crate::session_stream::SessionStream {
        self.session_stream(crate::session_stream::Commands::Queue {
            queue: VecDeque::new(),
            ended: false,
        })
    }

    fn session_stream(
        &self,
        commands: crate::session_stream::Commands,
    ) -> crate::session_stream::SessionStream {
        let (tx, rx) = crate::session_events::event_queue(EVENT_CAPACITY);
        crate::session_stream::SessionStream::new(self.clone(), commands, tx, rx)
    }

    /// Detaches the session of a stream that ended without closing it.
    pub(crate) async fn end_session_stream(&self, state: &AttachedStream) {
        if let Some(a) = state.still_attached() {
            Box::pin(self.session_detach(a, true, None)).await;
        }
    }

    /// Serves one command of an attached stream; errors go back to the gateway as events.
    /// A publish's answer is returned, for the stream to send or hold (see [`PACE_HIGH`]).
    pub(crate) async fn session_command(
        &self,
        cmd: Box<v1::SessionCommand>,
        state: &mut AttachedStream,
        tx: &EventSender,
    ) -> Option<HeldReply> {
        let rid = cmd.request_id;
        let command = cmd.command?;
        let mut held = None;
        let result = match (command, &state.attached) {
            (Command::Open(open), None) => match Box::pin(self.session_open(open, tx, rid)).await {
                Ok(a) => {
                    state.attached = Some(a);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            (Command::Open(_), Some(_)) => Err(CoreError::InvalidArgument(
                "the session is already open on this stream".into(),
            )),
            (_, None) => Err(CoreError::InvalidArgument("open the session first".into())),
            (Command::Close(c), Some(a)) => {
                state.closed = true;
                let expiry = c.set_expiry.then_some(c.expiry_interval_ms);
                Box::pin(self.session_detach(a, c.publish_will, expiry)).await;
                let _ = tx.try_send(event(rid, Event::Closed(true)));
                Ok(())
            }
            (_, Some(_)) if state.closed => {
                Err(CoreError::InvalidArgument("the session is closed".into()))
            }
            (Command::Subscribe(s), Some(a)) => {
                Box::pin(self.session_subscribe(a, s, tx, rid)).await
            }
            (Command::Unsubscribe(u), Some(a)) => {
                Box::pin(self.session_unsubscribe(a, u, tx, rid)).await
            }
            (Command::Publish(p), Some(a)) => match Box::pin(self.session_publish(a, p, rid)).await
            {
                Ok(reply) => {
                    held = reply;
                    Ok(())
                }
                Err(e) => Err(e),
            },
            (Command::Release(r), Some(a)) => {
                let released = Box::pin(self.session_release(a, r.packet_id)).await;
                if released.is_ok() && rid != 0 {
                    let _ = tx.try_send(event(rid, Event::Released(true)));
                }
                released
            }
            (Command::Ack(k), Some(a)) => Box::pin(self.session_ack(a, k, tx)).await,
        };
        if let Err(e) = result {
            let _ = tx.try_send(event(rid, Event::Error(error_detail(&e))));
        }
        held
    }

    async fn persist(&self, ops: Vec<Op>) -> CoreResult<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.inner.meta.txn(Vec::new(), ops).await?;
        Ok(())
    }

    /// Writes a persistent session's record (`None`: the session is not persistent).
    async fn persist_record(
        &self,
        id: &SessionId,
        record: Option<SessionRecord>,
    ) -> CoreResult<()> {
        match record {
            Some(r) => {
                self.persist(vec![Op::Put {
                    key: session_key(id),
                    value: to_json(&r),
                }])
                .await
            }
            None => Ok(()),
        }
    }

    async fn session_open(
        &self,
        open: v1::SessionOpen,
        tx: &EventSender,
        rid: u64,
    ) -> CoreResult<Attached> {
        self.check_running()?;
        if open.client_id.is_empty() {
            return Err(CoreError::InvalidArgument("client id is required".into()));
        }
        let ns = if open.namespace.is_empty() {
            crate::DEFAULT_NAMESPACE.to_string()
        } else {
            open.namespace.clone()
        };
        let broker = self.broker();
        let id: SessionId = (
            broker.namespace(&ns).name.clone(),
            Arc::from(open.client_id.as_str()),
        );
        // A client that sends DISCONNECT and connects again at once reaches the core on two
        // streams; give the old one a moment to finish closing before this counts as a
        // takeover, so the answer does not depend on which stream is served first.
        for _ in 0..10 {
            let attached = broker.session(&id).is_some_and(|c| c.lock().conn.is_some());
            if !attached {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut ops = Vec::new();
        let mut wills = Vec::new();
        let epoch = broker.next_epoch();
        let fresh = || Session::new(epoch, open.expiry_interval_ms);
        let (cell, present, record, had_timers) = loop {
            let (cell, created) = broker.session_or_insert(&id, fresh);
            let mut session = cell.lock();
            if session.removed {
                // Ended by another task between the lookup and the lock: it takes it out
                // of the map right after; a fresh one goes in its place.
                drop(session);
                broker.forget_session(&id, &cell);
                continue;
            }
            if let Some(conn) = session.conn.take() {
                let _ = conn.tx.try_send(event(
                    0,
                    Event::TakenOver(ErrorDetail {
                        code: ErrorCode::Conflict as i32,
                        message: "session taken over by another connection".into(),
                    }),
                ));
                // A new connection cancels a delayed will; an immediate one still goes.
                if let Some(w) = conn.will
                    && conn.will_delay_ms <= 0
                {
                    wills.push(*w);
                }
            }
            // A session with expiry 0 ends when its connection closes, and a takeover closes
            // it (MQTT 5 3.1.2.11.2): the new connection starts afresh. This also makes a
            // quick DISCONNECT-then-CONNECT answer the same whichever reaches the core first.
            // Only a session that outlives its connection can have a will or expiry timer.
            let had_timers = !created && session.persistent();
            let present = if created {
                false
            } else if open.clean_start || !session.persistent() {
                // Started afresh in place (the cell stays, so routing that holds it finds
                // the new, empty subscriptions).
                let old = std::mem::replace(&mut *session, fresh());
                broker.discard_subscriptions(&id, old.subs.keys());
                if old.persistent() {
                    ops.extend(delete_session_ops(&id, &old));
                }
                false
            } else {
                true
            };
            session.epoch = epoch;
            session.expiry_ms = open.expiry_interval_ms;
            session.conn = Some(Conn {
                tx: tx.clone(),
                receive_max: (open.receive_maximum.clamp(1, 65_535)) as usize,
                will: open.will.clone().map(Box::new),
                will_delay_ms: open.will_delay_ms,
            });
            let record = session.persistent().then(|| session.record());
            drop(session);
            break (cell, present, record, had_timers);
        };
        if let Some(r) = record {
            ops.push(Op::Put {
                key: session_key(&id),
                value: to_json(&r),
            });
        }
        self.persist(ops).await?;
        // A reconnect cancels a delayed will and the session's expiry (a fresh client's
        // connect does no metadata reads for it).
        if had_timers {
            for kind in [WILL_TIMER, EXPIRY_TIMER] {
                if let Err(e) = self.cancel_timer(&ns, &session_timer_id(kind, &id)).await {
                    warn!(client = %id.1, error = %e, "could not cancel a session timer");
                }
            }
        }
        for w in wills {
            self.route(&ns, w, None, true).await;
        }
        // Opened first, then whatever was in flight (with DUP) and what the window allows.
        let mut dead = Vec::new();
        {
            let mut guard = cell.lock();
            let session = &mut *guard;
            if !session.removed && session.epoch == epoch {
                let _ = tx.try_send(event(
                    rid,
                    Event::Opened(v1::SessionOpened {
                        session_present: present,
                        fencing_epoch: epoch,
                    }),
                ));
                if let Some(conn) = &session.conn {
                    for (packet_id, p) in &session.inflight {
                        if p.released {
                            let _ = conn.tx.try_send(release_event(*packet_id));
                        } else {
                            broker.send_delivery(conn, *packet_id, p, p.sent);
                        }
                    }
                }
                for p in session.inflight.values_mut() {
                    p.sent = true;
                }
                dead = broker.pump(&id, session);
            }
        }
        if !dead.is_empty() {
            let _ = self.persist(dead).await;
        }
        debug!(client = %id.1, epoch, present, "session opened");
        Ok(Attached { id, epoch })
    }

    /// The connection is gone. Publishes the will if it ended abnormally, and ends the
    /// session now or arms its expiry.
    async fn session_detach(&self, a: &Attached, abnormal: bool, expiry: Option<i64>) {
        let broker = self.broker();
        let mut will = None;
        let mut ops = Vec::new();
        let mut redeliver = Vec::new();
        let expiry_ms;
        let Some(cell) = broker.session(&a.id) else {
            return;
        };
        {
            let mut session = cell.lock();
            if session.removed || session.epoch != a.epoch {
                return; // taken over
            }
            let Some(conn) = session.conn.take() else {
                return;
            };
            // Nobody reads this queue now: its publishers need not wait for it.
            session.wake_pacers();
            let was_persistent = session.persistent();
            if let Some(e) = expiry {
                session.expiry_ms = e;
            }
            expiry_ms = session.expiry_ms;
            if abnormal {
                will = conn.will.map(|w| (*w, conn.will_delay_ms));
            }
            if session.persistent() {
                ops.push(Op::Put {
                    key: session_key(&a.id),
                    value: to_json(&session.record()),
                });
            } else {
                let old = std::mem::replace(&mut *session, Session::new(a.epoch, 0));
                session.removed = true;
                drop(session);
                broker.forget_session(&a.id, &cell);
                broker.discard_subscriptions(&a.id, old.subs.keys());
                // Expiry set to 0 on DISCONNECT: what was stored for it goes too.
                if was_persistent {
                    ops.extend(delete_session_ops(&a.id, &old));
                }
                // QoS 1/2 messages of a shared subscription go to another member.
                for p in old.inflight.into_values().chain(old.queue) {
                    if let Some((group, raw)) = &p.share
                        && p.message.qos > 0
                    {
                        redeliver.push((group.clone(), raw.clone(), p));
                    }
                }
            }
        }
        // The leaver's subscriptions were in its namespace, so the namespace is there.
        if let Some(space) = broker.existing_namespace(&a.id.0) {
            for (group, raw, p) in redeliver {
                let members = broker.share_members(&a.id.0, &raw);
                // Not written for a persistent member: it was not durable for the leaver either.
                if let Some(t) =
                    broker.pick_member(&space, &group, &raw, &members, &p.message, Some(&a.id.1))
                {
                    broker.enqueue(t, &mut Vec::new(), None);
                }
            }
        }
        if let Err(e) = self.persist(ops).await {
            warn!(client = %a.id.1, error = %e, "could not record the session's disconnect");
        }
        if let Some((will, delay)) = will {
            let delay = if expiry_ms > 0 {
                delay.min(expiry_ms)
            } else if expiry_ms == 0 {
                0
            } else {
                delay
            };
            if delay <= 0 {
                self.route(&a.id.0, will, None, true).await;
            } else {
                // In the durable timer service, so that a restart does not lose it; a
                // reconnect cancels it.
                let timer = v1::timer::Action::Route(will);
                self.schedule_session_timer(&a.id, WILL_TIMER, now_ms() + delay, timer)
                    .await;
                info!(client = %a.id.1, delay_ms = delay, "delayed will scheduled");
            }
        }
        if expiry_ms > 0 {
            let action = v1::timer::Action::SessionExpiry(v1::SessionExpiry {
                client_id: a.id.1.to_string(),
            });
            self.schedule_session_timer(&a.id, EXPIRY_TIMER, now_ms() + expiry_ms, action)
                .await;
        }
        // A reconnect that came in meanwhile attached before it cancelled the timers, so
        // either it cancelled the ones just scheduled or it is seen here.
        let back = broker.session(&a.id).is_some_and(|c| {
            let s = c.lock();
            s.epoch != a.epoch || s.conn.is_some()
        });
        if back {
            for kind in [WILL_TIMER, EXPIRY_TIMER] {
                let _ = self
                    .cancel_timer(&a.id.0, &session_timer_id(kind, &a.id))
                    .await;
            }
        }
    }

    /// Schedules (or replaces) one of a session's timers.
    async fn schedule_session_timer(
        &self,
        id: &SessionId,
        kind: &str,
        due_at_ms: i64,
        action: v1::timer::Action,
    ) {
        let timer = v1::Timer {
            id: session_timer_id(kind, id),
            due_at_ms: due_at_ms.max(1),
            namespace: id.0.to_string(),
            action: Some(action),
        };
        let scheduled = match self.schedule_timer(timer.clone()).await {
            Err(CoreError::Conflict(_)) => {
                let _ = self.cancel_timer(&id.0, &timer.id).await;
                self.schedule_timer(timer).await
            }
            other => other,
        };
        if let Err(e) = scheduled {
            warn!(client = %id.1, kind, error = %e, "could not schedule a session timer");
        }
    }

    /// A session's expiry timer fired: the session ends if it is still disconnected.
    pub(crate) async fn expire_disconnected_session(&self, ns: &str, client: &str) {
        let id: SessionId = (Arc::from(ns), Arc::from(client));
        let Some(epoch) = self.broker().session(&id).and_then(|c| {
            let s = c.lock();
            (!s.removed && s.conn.is_none()).then_some(s.epoch)
        }) else {
            return;
        };
        self.expire_session(&id, epoch).await;
    }

    async fn expire_session(&self, id: &SessionId, epoch: i64) {
        let broker = self.broker();
        let Some(cell) = broker.session(id) else {
            return;
        };
        let old = {
            let mut session = cell.lock();
            if session.removed || session.epoch != epoch || session.conn.is_some() {
                return;
            }
            let old = std::mem::replace(&mut *session, Session::new(epoch, 0));
            session.removed = true;
            old
        };
        broker.forget_session(id, &cell);
        broker.discard_subscriptions(id, old.subs.keys());
        let ops = delete_session_ops(id, &old);
        debug!(client = %id.1, "session expired");
        if let Err(e) = self.persist(ops).await {
            warn!(client = %id.1, error = %e, "could not delete an expired session");
        }
    }

    async fn session_subscribe(
        &self,
        a: &Attached,
        req: v1::SessionSubscribe,
        tx: &EventSender,
        rid: u64,
    ) -> CoreResult<()> {
        let broker = self.broker();
        let mut codes = Vec::with_capacity(req.subscriptions.len());
        let mut retained_for = Vec::new();
        let space = broker.namespace(&a.id.0);
        let record = broker.with_attached(a, |session| {
            let mut added = Vec::new();
            for sub in req.subscriptions {
                let parsed = match topics::parse_filter(&sub.filter) {
                    Ok(p) => (p.group.map(Arc::<str>::from), p.filter.to_string()),
                    Err(_) => {
                        codes.push(0x8F);
                        continue;
                    }
                };
                let mut sub = sub;
                sub.qos = sub.qos.min(2);
                codes.push(sub.qos);
                let existed = session
                    .subs
                    .insert(sub.filter.clone(), sub.clone())
                    .is_some();
                if parsed.0.is_none()
                    && (sub.retain_handling == 0 || (sub.retain_handling == 1 && !existed))
                {
                    retained_for.push(sub.clone());
                }
                added.push((parsed, sub.filter));
            }
            // In the tree while the session is still locked, so a concurrent unsubscribe
            // or session end cannot interleave between the two.
            let mut tree = space.tree.write();
            for ((group, filter), raw) in added {
                tree.insert(
                    &filter,
                    Entry {
                        client: a.id.1.clone(),
                        raw_filter: Arc::from(raw.as_str()),
                        group,
                    },
                );
            }
            session.persistent().then(|| session.record())
        })?;
        self.persist_record(&a.id, record).await?;
        let _ = tx.try_send(event(rid, Event::Subscribed(v1::SubscribeResult { codes })));
        if retained_for.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut copies = Vec::new();
        {
            let retained = space.retained.lock();
            for sub in &retained_for {
                for (topic, m) in retained.iter() {
                    if topics::matches(&sub.filter, topic) && !expired(m, now) {
                        copies.push(Pending::new(
                            flagged_copy(m, m.qos.min(sub.qos), true),
                            sub_ids(sub),
                            None,
                        ));
                    }
                }
            }
        }
        let mut slow = Vec::new();
        let _ = broker.with_attached(a, |session| {
            for p in copies {
                broker.enqueue_into(a.id.clone(), session, p, &mut slow);
            }
        });
        broker.send_slow(slow).await;
        Ok(())
    }

    async fn session_unsubscribe(
        &self,
        a: &Attached,
        req: v1::SessionUnsubscribe,
        tx: &EventSender,
        rid: u64,
    ) -> CoreResult<()> {
        let broker = self.broker();
        let mut existed = Vec::new();
        let record = broker.with_attached(a, |session| {
            let mut removed = Vec::new();
            for raw in req.filters {
                let was = session.subs.remove(&raw).is_some();
                existed.push(was);
                if was {
                    removed.push(raw);
                }
            }
            broker.discard_subscriptions(&a.id, removed.iter());
            session.persistent().then(|| session.record())
        })?;
        self.persist_record(&a.id, record).await?;
        let _ = tx.try_send(event(
            rid,
            Event::Unsubscribed(v1::UnsubscribeResult { existed }),
        ));
        Ok(())
    }

    /// Routes a client's publish; its answer (for QoS 1/2) is returned, not sent, so that the
    /// stream can hold it while a subscriber lags (see [`PACE_HIGH`]).
    async fn session_publish(
        &self,
        a: &Attached,
        req: v1::SessionPublish,
        rid: u64,
    ) -> CoreResult<Option<HeldReply>> {
        let message = req
            .message
            .ok_or_else(|| CoreError::InvalidArgument("publish needs a message".into()))?;
        let topic = topic_of(&message).to_string();
        topics::validate_name(&topic).map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        // A QoS 2 packet id is taken before the message is routed (a resend meanwhile is a
        // duplicate) and stored after: a failed route gives it back, so the client's resend
        // is routed, not answered as a duplicate of a message that went nowhere. A stop
        // between the route and the store costs a duplicate on resend, never the message.
        let qos2_id = (req.packet_id > 0).then_some(req.packet_id as u16);
        if let Some(packet_id) = qos2_id {
            let first = self
                .broker()
                .with_attached(a, |session| session.incoming_qos2.insert(packet_id))?;
            if !first {
                return Ok(Some(HeldReply::now(event(
                    rid,
                    Event::Published(v1::PublishResult {
                        matched: 0,
                        duplicate: true,
                    }),
                ))));
            }
        }
        let routed = Box::pin(self.route_publish(a, message, &topic, rid)).await;
        if let Some(packet_id) = qos2_id {
            if routed.is_ok() {
                let record = self
                    .broker()
                    .with_attached(a, |session| session.persistent().then(|| session.record()))?;
                self.persist_record(&a.id, record).await?;
            } else {
                let _ = self.broker().with_attached(a, |session| {
                    session.incoming_qos2.remove(&packet_id);
                });
            }
        }
        routed
    }

    /// The routing of [`Self::session_publish`], and its answer.
    async fn route_publish(
        &self,
        a: &Attached,
        mut message: v1::RoutedMessage,
        topic: &str,
        rid: u64,
    ) -> CoreResult<Option<HeldReply>> {
        let broker = self.broker();
        broker.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        broker
            .stats
            .bytes_in
            .fetch_add(payload_len(&message) as u64, Ordering::Relaxed);
        let mut laggards = Laggards {
            publisher: Some(&a.id.1),
            cells: Vec::new(),
        };
        let matched = if let Some((delay_s, real)) = delayed_topic(topic) {
            if let Some(p) = message.record.as_mut().and_then(|r| r.properties.as_mut()) {
                p.address = real.to_string();
            }
            self.schedule_timer(v1::Timer {
                id: String::new(),
                due_at_ms: now_ms() + (delay_s as i64) * 1000,
                action: Some(v1::timer::Action::Route(message)),
                namespace: a.id.0.to_string(),
            })
            .await?;
            1
        } else {
            // QoS 0 asks for no answer (request id 0), so there is nothing to hold.
            let pace = (rid != 0).then_some(&mut laggards);
            self.route_checked(&a.id.0, message, Some(&a.id.1), true, pace)
                .await?
        };
        if rid == 0 {
            return Ok(None);
        }
        let mut reply = HeldReply::now(event(
            rid,
            Event::Published(v1::PublishResult {
                matched,
                duplicate: false,
            }),
        ));
        if !laggards.cells.is_empty() {
            metrics::counter!("tributary_session_publishes_paced_total").increment(1);
            reply.laggards = laggards.cells;
            reply.deadline = Some(tokio::time::Instant::now() + PACE_MAX_WAIT);
        }
        Ok(Some(reply))
    }

    async fn session_release(&self, a: &Attached, packet_id: u32) -> CoreResult<()> {
        let record = self.broker().with_attached(a, |session| {
            let was = session.incoming_qos2.remove(&(packet_id as u16));
            (was && session.persistent()).then(|| session.record())
        })?;
        self.persist_record(&a.id, record).await?;
        Ok(())
    }

    /// Serves a command at once, without a future, when nothing in it waits: a PUBACK or
    /// PUBCOMP of a session that ends with its connection (most commands of a busy
    /// subscriber). `Err` gives the command back for [`Core::session_command`].
    pub(crate) fn session_command_now(
        &self,
        cmd: Box<v1::SessionCommand>,
        state: &AttachedStream,
        tx: &EventSender,
    ) -> Result<(), Box<v1::SessionCommand>> {
        let Some(a) = state.still_attached() else {
            return Err(cmd);
        };
        let Some(Command::Ack(ack)) = &cmd.command else {
            return Err(cmd);
        };
        // PUBREC answers wait for their release to be durable: those take the long way.
        if ack.received_only {
            return Err(cmd);
        }
        let broker = self.broker();
        let mut ops = Vec::new();
        let served = broker.with_attached(a, |session| {
            if session.persistent() {
                return false;
            }
            broker.apply_ack(&a.id, session, ack, &mut ops, &mut Vec::new());
            true
        });
        match served {
            Ok(true) => {
                // Copies stored before the session's expiry went to 0 (a reconnect that
                // changed it): their deletes answer nobody, so they need not hold the
                // next command.
                if !ops.is_empty() {
                    let core = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = core.persist(ops).await {
                            warn!(error = %e, "could not delete acknowledged session messages");
                        }
                    });
                }
                Ok(())
            }
            Ok(false) => Err(cmd),
            Err(e) => {
                let _ = tx.try_send(event(cmd.request_id, Event::Error(error_detail(&e))));
                Ok(())
            }
        }
    }

    async fn session_ack(
        &self,
        a: &Attached,
        ack: v1::SessionAck,
        tx: &EventSender,
    ) -> CoreResult<()> {
        let broker = self.broker();
        let mut ops = Vec::new();
        let mut releases = Vec::new();
        broker.with_attached(a, |session| {
            broker.apply_ack(&a.id, session, &ack, &mut ops, &mut releases);
        })?;
        // PUBREL only once "released" is durable: after a crash the client must get PUBREL,
        // never the PUBLISH again.
        self.persist(ops).await?;
        for id in releases {
            let _ = tx.try_send(release_event(id));
        }
        Ok(())
    }

    /// Routes a message published outside a session (will, timer, `$SYS`).
    pub(crate) async fn route(
        &self,
        ns: &str,
        message: v1::RoutedMessage,
        publisher: Option<&str>,
        persist_retained: bool,
    ) -> u32 {
        match self
            .route_checked(ns, message, publisher, persist_retained, None)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                warn!(namespace = ns, error = %e, "could not route a message");
                0
            }
        }
    }

    /// Routes a message: updates the retained store, then queues a copy for every matching
    /// session. Copies for persistent sessions are written before they are queued.
    /// With `laggards`, the connected sessions left over [`PACE_HIGH`] are collected there.
    ///
    /// A message to a topic that names a stream is appended to the stream first
    /// (topic_streams.rs): when that fails, nothing is routed and the error goes back.
    async fn route_checked(
        &self,
        ns: &str,
        message: v1::RoutedMessage,
        publisher: Option<&str>,
        persist_retained: bool,
        laggards: Option<&mut Laggards<'_>>,
    ) -> CoreResult<u32> {
        let appended = self.append_to_topic_stream(ns, &message).await?;
        let queued = self.publish_mqtt_to_exchange(ns, &message).await?;
        let matched = self
            .deliver_to_sessions(ns, message, publisher, persist_retained, laggards)
            .await?;
        Ok(matched + u32::from(appended) + queued)
    }

    /// Whether any session of `ns` subscribes to a filter that matches `topic`.
    pub(crate) fn has_subscribers(&self, ns: &str, topic: &str) -> bool {
        let Some(space) = self.broker().existing_namespace(ns) else {
            return false;
        };
        let mut any = false;
        space.tree.read().for_each_match(topic, |_| any = true);
        any
    }

    /// [`Core::route_checked`] without the stream: updates the retained store, then queues
    /// a copy for every matching session.
    pub(crate) async fn deliver_to_sessions(
        &self,
        ns: &str,
        message: v1::RoutedMessage,
        publisher: Option<&str>,
        persist_retained: bool,
        mut laggards: Option<&mut Laggards<'_>>,
    ) -> CoreResult<u32> {
        let broker = self.broker();
        let topic = topic_of(&message).to_string();
        let mut ops = Vec::new();
        let mut slow = Vec::new();
        if message.retain {
            let space = broker.namespace(ns);
            let mut store = space.retained.lock();
            if payload_len(&message) == 0 {
                if store.remove(&topic).is_some() && persist_retained {
                    ops.push(Op::Delete {
                        key: retained_key(ns, &topic),
                    });
                }
            } else {
                store.insert(topic.clone(), message.clone());
                if persist_retained {
                    ops.push(Op::Put {
                        key: retained_key(ns, &topic),
                        value: message.encode_to_vec(),
                    });
                }
            }
        }
        let message = Arc::new(message);
        let targets = broker.targets(ns, &message, publisher);
        let (mut later, now): (Vec<Target>, Vec<Target>) = targets
            .into_iter()
            .partition(|t| t.persistent && t.pending.message.qos > 0);
        let now_count = now.len() as u32;
        for t in now {
            ops.extend(broker.enqueue(t, &mut slow, laggards.as_deref_mut()));
        }
        broker.send_slow(slow).await;
        if later.is_empty() {
            self.persist(ops).await?;
            return Ok(now_count);
        }
        // Queued for several persistent sessions: the record is written once and each
        // copy references it.
        let body = (later.len() > 1).then(|| {
            let id = broker.next_body_id.fetch_add(1, Ordering::Relaxed);
            let key = body_key(ns, id);
            ops.push(Op::Put {
                key: key.clone(),
                value: message.encode_to_vec(),
            });
            Arc::new(StoredBody {
                key,
                id,
                refs: AtomicUsize::new(0),
            })
        });
        for t in &mut later {
            let mut s = t.cell.lock();
            if s.removed {
                continue;
            }
            t.pending.seq = s.next_seq;
            s.next_seq += 1;
            t.pending.persisted = true;
            if let Some(b) = &body {
                b.refs.fetch_add(1, Ordering::AcqRel);
                t.pending.body = Some(b.clone());
            }
            ops.push(Op::Put {
                key: pending_key(&t.session, t.pending.seq),
                value: pending_value(&t.pending, 0),
            });
        }
        self.persist(ops).await?;
        let matched = now_count + later.len() as u32;
        let mut dead = Vec::new();
        for t in later {
            dead.extend(broker.enqueue(t, &mut Vec::new(), laggards.as_deref_mut()));
        }
        self.persist(dead).await?;
        Ok(matched)
    }

    /// Loads retained messages and persistent sessions with their queued messages.
    pub(crate) async fn recover_sessions(&self) -> CoreResult<()> {
        let meta = &self.inner.meta;
        let broker = self.broker();
        let retained = meta
            .scan_prefix(&meta::key(RETAINED_KEY, &[]), usize::MAX)
            .await?;
        let sessions = meta
            .scan_prefix(&meta::key(SESSION_KEY, &[]), usize::MAX)
            .await?;
        let pending = meta
            .scan_prefix(&meta::key(PENDING_KEY, &[]), usize::MAX)
            .await?;
        let mut stale = Vec::new();
        // Messages stored once for several sessions, by (namespace, id).
        let mut bodies: HashMap<(String, u64), (Arc<StoredBody>, v1::RoutedMessage)> =
            HashMap::new();
        for (k, v) in meta
            .scan_prefix(&meta::key(BODY_KEY, &[]), usize::MAX)
            .await?
        {
            let parts = meta::parts(BODY_KEY, &k);
            let (Some(ns), Some(Ok(id)), Ok(m)) = (
                parts.first(),
                parts.get(1).map(|i| i.parse::<u64>()),
                v1::RoutedMessage::decode(&v[..]),
            ) else {
                stale.push(Op::Delete { key: k });
                continue;
            };
            broker.next_body_id.fetch_max(id + 1, Ordering::Relaxed);
            let body = Arc::new(StoredBody {
                key: k,
                id,
                refs: AtomicUsize::new(0),
            });
            bodies.insert((ns.clone(), id), (body, m));
        }
        let now = now_ms();
        let mut expiries = Vec::new();
        let mut recovered: HashMap<SessionId, Session> = HashMap::new();
        {
            for (k, v) in &retained {
                let parts = meta::parts(RETAINED_KEY, k);
                let [ns, topic] = &parts[..] else { continue };
                match v1::RoutedMessage::decode(&v[..]) {
                    Ok(m) => {
                        broker
                            .namespace(ns)
                            .retained
                            .lock()
                            .insert(topic.clone(), m);
                    }
                    Err(e) => {
                        warn!(topic = %topic, error = %e, "skipping an unreadable retained message")
                    }
                }
            }
            for (k, v) in &sessions {
                let parts = meta::parts(SESSION_KEY, k);
                let [ns, client] = &parts[..] else { continue };
                let id: SessionId = (
                    broker.namespace(ns).name.clone(),
                    Arc::from(client.as_str()),
                );
                let record: SessionRecord = from_json("session", v)?;
                let since = record.disconnected_at_ms.unwrap_or(now);
                if record.expiry_ms > 0 && since + record.expiry_ms <= now {
                    stale.push(Op::Delete { key: k.clone() });
                    continue;
                }
                let epoch = broker.next_epoch();
                let mut s = Session::new(epoch, record.expiry_ms);
                s.incoming_qos2 = record.incoming_qos2.into_iter().collect();
                for raw in &record.subs {
                    let Ok(sub) = v1::SessionSubscription::decode(&raw[..]) else {
                        continue;
                    };
                    if let Ok(p) = topics::parse_filter(&sub.filter) {
                        broker.namespace(ns).tree.write().insert(
                            p.filter,
                            Entry {
                                client: Arc::from(client.as_str()),
                                raw_filter: Arc::from(sub.filter.as_str()),
                                group: p.group.map(Arc::from),
                            },
                        );
                    }
                    s.subs.insert(sub.filter.clone(), sub);
                }
                if record.expiry_ms > 0 {
                    expiries.push((id.clone(), epoch, (since + record.expiry_ms - now).max(0)));
                }
                recovered.insert(id, s);
            }
            for (k, v) in &pending {
                let parts = meta::parts(PENDING_KEY, k);
                let [ns, client, seq] = &parts[..] else {
                    continue;
                };
                let id: SessionId = (
                    broker.namespace(ns).name.clone(),
                    Arc::from(client.as_str()),
                );
                let (Some(s), Ok(d), Ok(seq)) = (
                    recovered.get_mut(&id),
                    v1::PendingDelivery::decode(&v[..]),
                    seq.parse::<u64>(),
                ) else {
                    stale.push(Op::Delete { key: k.clone() });
                    continue;
                };
                let mut message = d.message.unwrap_or_default();
                let body = if d.body_id == 0 {
                    None
                } else if let Some((b, stored)) = bodies.get(&(ns.clone(), d.body_id)) {
                    b.refs.fetch_add(1, Ordering::AcqRel);
                    message.record = stored.record.clone();
                    Some(b.clone())
                } else {
                    warn!(client = %client, body_id = d.body_id, "a queued message's stored body is missing; dropping it");
                    stale.push(Op::Delete { key: k.clone() });
                    continue;
                };
                let p = Pending {
                    seq,
                    message: Arc::new(message),
                    sub_ids: d.subscription_ids,
                    released: d.released,
                    sent: d.released,
                    persisted: true,
                    body,
                    share: None,
                };
                s.next_seq = s.next_seq.max(seq + 1);
                if d.released && d.packet_id > 0 {
                    s.inflight.insert(d.packet_id as u16, p);
                } else {
                    s.queue.push_back(p);
                }
            }
        }
        // Stored messages no queued copy references any more (a crash between the last
        // copy's delete and theirs cannot happen: they go in one write; this is for
        // sessions that expired while the process was down).
        for (b, _) in bodies.into_values() {
            if b.refs.load(Ordering::Acquire) == 0 {
                stale.push(Op::Delete { key: b.key.clone() });
            }
        }
        let counts = (recovered.len(), retained.len(), pending.len());
        broker.sessions.write().extend(
            recovered
                .into_iter()
                .map(|(id, s)| (id, Arc::new(Mutex::new(s)))),
        );
        self.persist(stale).await?;
        // Each disconnected session has its expiry in the timer service (a session stored
        // before timers kept expiries gets one now; an existing one is left as it is).
        for (id, _epoch, left) in expiries {
            let timer = v1::Timer {
                id: session_timer_id(EXPIRY_TIMER, &id),
                due_at_ms: (now + left).max(1),
                namespace: id.0.to_string(),
                action: Some(v1::timer::Action::SessionExpiry(v1::SessionExpiry {
                    client_id: id.1.to_string(),
                })),
            };
            match self.schedule_timer(timer).await {
                Ok(_) | Err(CoreError::Conflict(_)) => {}
                Err(e) => {
                    warn!(client = %id.1, error = %e, "could not schedule a session's expiry")
                }
            }
        }
        if counts != (0, 0, 0) {
            info!(
                sessions = counts.0,
                retained = counts.1,
                queued = counts.2,
                "sessions recovered"
            );
        }
        Ok(())
    }

    /// Publishes broker statistics under `$SYS/broker/` in every namespace with sessions,
    /// retained, every 10 s.
    pub(crate) async fn run_sys_topics(self) {
        let mut tick = tokio::time::interval(SYS_INTERVAL);
        loop {
            tick.tick().await;
            let broker = self.broker();
            let (namespaces, connected, total) = {
                let cells: Vec<(Arc<str>, Arc<SessionCell>)> = broker
                    .sessions
                    .read()
                    .iter()
                    .map(|((n, _), c)| (n.clone(), c.clone()))
                    .collect();
                let mut ns: HashSet<String> = cells.iter().map(|(n, _)| n.to_string()).collect();
                ns.extend(broker.namespaces.read().keys().cloned());
                let connected = cells
                    .iter()
                    .filter(|(_, c)| c.lock().conn.is_some())
                    .count();
                (ns, connected, cells.len())
            };
            let s = &broker.stats;
            let values = [
                (
                    "uptime",
                    format!("{} seconds", broker.started.elapsed().as_secs()),
                ),
                (
                    "version",
                    format!("tributary {}", env!("CARGO_PKG_VERSION")),
                ),
                ("clients/connected", connected.to_string()),
                ("clients/total", total.to_string()),
                (
                    "messages/received",
                    s.messages_in.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "messages/sent",
                    s.messages_out.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "bytes/received",
                    s.bytes_in.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "bytes/sent",
                    s.bytes_out.load(Ordering::Relaxed).to_string(),
                ),
            ];
            for ns in namespaces {
                for (name, value) in &values {
                    let msg = v1::RoutedMessage {
                        record: Some(v1::Record {
                            value: value.clone().into(),
                            properties: Some(v1::SystemProperties {
                                address: format!("$SYS/broker/{name}"),
                                origin_protocol: "core".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        qos: 0,
                        retain: true,
                    };
                    self.route(&ns, msg, None, false).await;
                }
            }
        }
    }
}

impl Core {
    /// Every MQTT session, sorted by namespace and client id (for operators: the admin API).
    pub fn list_sessions(&self) -> Vec<crate::inspect::SessionSummary> {
        let cells: Vec<(SessionId, Arc<SessionCell>)> = self
            .broker()
            .sessions
            .read()
            .iter()
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        let mut out: Vec<_> = cells
            .into_iter()
            .map(|((namespace, client_id), cell)| {
                let s = cell.lock();
                crate::inspect::SessionSummary {
                    namespace: namespace.to_string(),
                    client_id: client_id.to_string(),
                    connected: s.conn.is_some(),
                    expiry_ms: s.expiry_ms,
                    subscriptions: s.subs.values().cloned().collect(),
                    inflight: s.inflight.len(),
                    queued: s.queue.len(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.client_id).cmp(&(&b.namespace, &b.client_id)));
        out
    }

    /// Ends every attached session's stream, for a core shutting down: each connection is
    /// told why (MQTT 5: DISCONNECT 0x8B, server shutting down) and its stream ends once it
    /// has taken its events, so its client reconnects to whoever serves the session next.
    pub(crate) fn stop_attached_sessions(&self) {
        let cells: Vec<_> = self.broker().sessions.read().values().cloned().collect();
        for cell in cells {
            let s = cell.lock();
            if let Some(conn) = &s.conn {
                // A connection whose events queue is full learns it from its stream's end.
                let _ = conn.tx.try_send(event(
                    0,
                    Event::Error(error_detail(&CoreError::ShuttingDown)),
                ));
                conn.tx.stop();
            }
        }
    }

    /// Closes a session's connection for an operator (Admin.KickSession): the gateway gets
    /// the same event as a takeover, with ADMINISTRATIVE_ACTION, and closes the connection
    /// (MQTT 5: DISCONNECT 0x98). The session stays; its connection's end is handled as any
    /// connection the server closes (will, expiry). Returns whether a connection was there.
    pub fn kick_session(&self, namespace: &str, client_id: &str) -> CoreResult<bool> {
        let ns = crate::streams::namespace_or_default(namespace).to_string();
        let id: SessionId = (Arc::from(ns.as_str()), Arc::from(client_id));
        let cell = self
            .broker()
            .session(&id)
            .ok_or_else(|| CoreError::SessionNotFound(format!("{ns}/{client_id}")))?;
        let s = cell.lock();
        let Some(conn) = &s.conn else {
            return Ok(false);
        };
        // The close travels in order with the connection's events: a connection that is not
        // reading them (its event channel full) cannot be told, and the kick says so rather
        // than report a close that will not happen.
        if conn
            .tx
            .try_send(event(
                0,
                Event::TakenOver(ErrorDetail {
                    code: ErrorCode::AdministrativeAction as i32,
                    message: "connection closed by an operator".into(),
                }),
            ))
            .is_err()
        {
            return Err(CoreError::Conflict(format!(
                "the connection of {ns}/{client_id} is not reading its events (its queue is full); it could not be told to close"
            )));
        }
        info!(namespace = %ns, client = %client_id, "session's connection closed by an operator");
        Ok(true)
    }

    /// Messages and bytes the session broker took in and sent out since start.
    pub fn session_totals(&self) -> crate::inspect::SessionTotals {
        let s = &self.broker().stats;
        crate::inspect::SessionTotals {
            messages_in: s.messages_in.load(Ordering::Relaxed),
            messages_out: s.messages_out.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// `$delayed/{seconds}/{topic}` (EMQX's delayed publish) -> (seconds, topic).
pub fn delayed_topic(topic: &str) -> Option<(u32, &str)> {
    let rest = topic.strip_prefix("$delayed/")?;
    let (secs, real) = rest.split_once('/')?;
    let secs: u32 = secs.parse().ok()?;
    (!real.is_empty()).then_some((secs, real))
}

fn delete_session_ops(id: &SessionId, session: &Session) -> Vec<Op> {
    let mut ops = vec![Op::Delete {
        key: session_key(id),
    }];
    for p in session.inflight.values().chain(session.queue.iter()) {
        forget_persisted(id, p, &mut ops);
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delayed_topics_parse() {
        assert_eq!(delayed_topic("$delayed/10/a/b"), Some((10, "a/b")));
        assert_eq!(delayed_topic("$delayed/x/a"), None);
        assert_eq!(delayed_topic("$delayed/10/"), None);
        assert_eq!(delayed_topic("a/b"), None);
    }
}
