//! Clients of this gateway: heartbeats (producer and consumer groups, subscriptions),
//! consumer lists for client-side rebalancing, orderly consumers' queue locks, and the
//! connections the broker calls back on (transaction checks, consumer-id changes).
//!
//! Like RocketMQ's broker, this is connection state kept in memory: a client heart-beats
//! every broker it uses every 30 s and is forgotten 120 s after its last heartbeat or when
//! its connection closes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::Gateway;
use crate::codes::{request as rq, response as rs};
use crate::conn::{ConnState, Ext, Refusal, Reply, json_body, ok};
use crate::frame::Command;

/// A client silent this long is forgotten (`channelExpiredTimeout`).
const CLIENT_EXPIRY: Duration = Duration::from_secs(120);
/// A queue lock lasts this long unless renewed (`REBALANCE_LOCK_MAX_LIVE_TIME`).
const LOCK_EXPIRY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Clients {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    clients: HashMap<String, Client>,
    /// (group, topic, broker name, queue id) -> (client id, expiry).
    locks: HashMap<(String, String, String, i64), (String, Instant)>,
    /// Groups whose retry topic exists already.
    retry_topics: HashSet<String>,
    /// The core's member-set version of each consumer group with a member here, as last
    /// seen: a change made through another gateway is noticed by comparing it.
    versions: HashMap<String, u64>,
}

struct Client {
    conn: Arc<ConnState>,
    last_seen: Instant,
    producer_groups: HashSet<String>,
    /// Consumer group -> topic -> subscription expression.
    consumer_groups: HashMap<String, HashMap<String, String>>,
}

impl Clients {
    /// The subscription expression a consumer of `group` registered for `topic`.
    pub fn subscription(&self, group: &str, topic: &str) -> Option<String> {
        let inner = self.inner.lock();
        inner
            .clients
            .values()
            .find_map(|c| c.consumer_groups.get(group)?.get(topic).cloned())
    }

    /// Connections of the producers of `group`.
    pub(crate) fn producers(&self, group: &str) -> Vec<Arc<ConnState>> {
        let inner = self.inner.lock();
        inner
            .clients
            .values()
            .filter(|c| c.producer_groups.contains(group))
            .map(|c| c.conn.clone())
            .collect()
    }

    /// Every producer group with a client here.
    pub(crate) fn producer_groups(&self) -> Vec<String> {
        let inner = self.inner.lock();
        let set: HashSet<&String> = inner
            .clients
            .values()
            .flat_map(|c| c.producer_groups.iter())
            .collect();
        set.into_iter().cloned().collect()
    }

    fn consumers(&self, group: &str) -> Vec<(String, Arc<ConnState>)> {
        let inner = self.inner.lock();
        let mut v: Vec<(String, Arc<ConnState>)> = inner
            .clients
            .iter()
            .filter(|(_, c)| c.consumer_groups.contains_key(group))
            .map(|(id, c)| (id.clone(), c.conn.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub(crate) fn client_conn(&self, client_id: &str) -> Option<Arc<ConnState>> {
        self.inner
            .lock()
            .clients
            .get(client_id)
            .map(|c| c.conn.clone())
    }
}

/// Member leases of consumers and brokers, kept apart from Kafka groups of the same name.
const CONSUMER_LEASES: &str = "rocketmq";
const BROKER_LEASES: &str = "rocketmq-broker";
/// The lease group every gateway's broker renews.
const BROKERS_GROUP: &str = "brokers";
/// A gateway whose broker stops renewing is dropped from routes after this long.
pub(crate) const BROKER_TTL: Duration = Duration::from_secs(30);

/// The brokers of this gateway's cluster, master first: every gateway whose broker renewed
/// its lease in the core, in address order (so every NameServer names the same master).
pub(crate) async fn brokers(gw: &Gateway) -> Vec<String> {
    let req = tributary_proto::v1::ListMembersRequest {
        namespace: gw.config.namespace.clone(),
        group: BROKERS_GROUP.into(),
        protocol_type: BROKER_LEASES.into(),
    };
    let listed = match gw.core.groups.clone().list_members(req).await {
        Ok(r) => r
            .into_inner()
            .members
            .into_iter()
            .map(|m| m.member_id)
            .collect::<Vec<_>>(),
        Err(s) => {
            tracing::warn!(error = %s.message(), "listing the cluster's brokers failed");
            Vec::new()
        }
    };
    if listed.is_empty() {
        vec![gw.config.advertised.to_string()]
    } else {
        listed
    }
}

/// Renews this gateway's broker lease (when it has a broker listener).
pub(crate) async fn register_broker(gw: &Gateway) {
    if !gw.config.serves_broker {
        return;
    }
    let req = tributary_proto::v1::RegisterMemberRequest {
        namespace: gw.config.namespace.clone(),
        group: BROKERS_GROUP.into(),
        member_id: gw.config.advertised.to_string(),
        client_host: gw.config.advertised.ip().to_string(),
        metadata: Default::default(),
        ttl_ms: BROKER_TTL.as_millis() as i32,
        protocol_type: BROKER_LEASES.into(),
        ..Default::default()
    };
    if let Err(s) = gw.core.groups.clone().register_member(req).await {
        tracing::warn!(error = %s.message(), "renewing the broker's lease failed");
    }
}

/// Renews `client`'s lease in each consumer group; answers the groups whose members changed.
async fn register_consumer(
    gw: &Gateway,
    client: &str,
    host: &str,
    groups: impl Iterator<Item = &String>,
) -> Result<HashSet<String>, Refusal> {
    let mut changed = HashSet::new();
    for group in groups {
        let req = tributary_proto::v1::RegisterMemberRequest {
            namespace: gw.config.namespace.clone(),
            group: group.clone(),
            member_id: client.to_string(),
            client_host: host.to_string(),
            metadata: Default::default(),
            ttl_ms: CLIENT_EXPIRY.as_millis() as i32,
            protocol_type: CONSUMER_LEASES.into(),
            ..Default::default()
        };
        let r = gw
            .core
            .groups
            .clone()
            .register_member(req)
            .await
            .map_err(|s| crate::conn::core_refusal(&s))?
            .into_inner();
        gw.clients
            .inner
            .lock()
            .versions
            .insert(group.clone(), r.version);
        if r.changed {
            changed.insert(group.clone());
        }
    }
    Ok(changed)
}

async fn unregister_consumer(gw: &Gateway, client: &str, group: &str) {
    let req = tributary_proto::v1::UnregisterMemberRequest {
        namespace: gw.config.namespace.clone(),
        group: group.to_string(),
        member_id: client.to_string(),
        protocol_type: CONSUMER_LEASES.into(),
    };
    match gw.core.groups.clone().unregister_member(req).await {
        Ok(r) => {
            gw.clients
                .inner
                .lock()
                .versions
                .insert(group.to_string(), r.into_inner().version);
        }
        Err(s) => tracing::warn!(error = %s.message(), group, "ending a consumer's lease failed"),
    }
}

/// Consumer groups with a member here whose member set changed in the core since last seen
/// (through another gateway, or a lease that expired).
async fn changed_elsewhere(gw: &Gateway) -> HashSet<String> {
    let groups: Vec<(String, u64)> = {
        let inner = gw.clients.inner.lock();
        let local: HashSet<&String> = inner
            .clients
            .values()
            .flat_map(|c| c.consumer_groups.keys())
            .collect();
        local
            .into_iter()
            .map(|g| (g.clone(), inner.versions.get(g).copied().unwrap_or(0)))
            .collect()
    };
    let mut changed = HashSet::new();
    for (group, seen) in groups {
        let req = tributary_proto::v1::ListMembersRequest {
            namespace: gw.config.namespace.clone(),
            group: group.clone(),
            protocol_type: CONSUMER_LEASES.into(),
        };
        if let Ok(r) = gw.core.groups.clone().list_members(req).await {
            let version = r.into_inner().version;
            if version != seen {
                gw.clients
                    .inner
                    .lock()
                    .versions
                    .insert(group.clone(), version);
                changed.insert(group);
            }
        }
    }
    changed
}

/// Tells the consumers of `groups` on this gateway that the group's members changed, so
/// they rebalance now rather than at their next 20-second round.
async fn notify(gw: &Gateway, groups: HashSet<String>) {
    for group in groups {
        for (_, conn) in gw.clients.consumers(&group) {
            let cmd = Command::request(rq::NOTIFY_CONSUMER_IDS_CHANGED, 0)
                .with_ext("consumerGroup", &group);
            conn.send_oneway(cmd).await;
        }
    }
}

fn strings<'a>(v: &'a Value, field: &str) -> impl Iterator<Item = &'a Value> {
    v.get(field)
        .and_then(Value::as_array)
        .map(|a| a.iter())
        .into_iter()
        .flatten()
}

pub(crate) async fn heartbeat(gw: &Gateway, conn: &Arc<ConnState>, cmd: &Command) -> Reply {
    let body: Value = serde_json::from_slice(&cmd.body)
        .map_err(|e| Refusal::system(format!("malformed heartbeat body: {e}")))?;
    let client_id = body
        .get("clientID")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::system("heartbeat without clientID"))?
        .to_string();
    let mut producer_groups = HashSet::new();
    for p in strings(&body, "producerDataSet") {
        if let Some(g) = p.get("groupName").and_then(Value::as_str) {
            producer_groups.insert(g.to_string());
        }
    }
    let mut consumer_groups: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut clustering = Vec::new();
    for c in strings(&body, "consumerDataSet") {
        let Some(group) = c.get("groupName").and_then(Value::as_str) else {
            continue;
        };
        let subs = consumer_groups.entry(group.to_string()).or_default();
        for s in strings(c, "subscriptionDataSet") {
            if let Some(topic) = s.get("topic").and_then(Value::as_str) {
                let expr = s.get("subString").and_then(Value::as_str).unwrap_or("*");
                subs.insert(topic.to_string(), expr.to_string());
            }
        }
        if c.get("messageModel").and_then(Value::as_str) != Some("BROADCASTING") {
            clustering.push(group.to_string());
        }
    }
    conn.connection.set_client_id(client_id.clone());
    let registered: Vec<String>;
    let changed_groups: HashSet<String> = {
        let mut inner = gw.clients.inner.lock();
        let old: HashSet<String> = inner
            .clients
            .get(&client_id)
            .map(|c| c.consumer_groups.keys().cloned().collect())
            .unwrap_or_default();
        let new: HashSet<String> = consumer_groups.keys().cloned().collect();
        registered = new.iter().cloned().collect();
        inner.clients.insert(
            client_id.clone(),
            Client {
                conn: conn.clone(),
                last_seen: Instant::now(),
                producer_groups,
                consumer_groups,
            },
        );
        old.difference(&new).cloned().collect()
    };
    for group in &changed_groups {
        unregister_consumer(gw, &client_id, group).await;
    }
    let host = conn.peer.to_string();
    let mut changed_groups = changed_groups;
    changed_groups.extend(register_consumer(gw, &client_id, &host, registered.iter()).await?);
    for group in clustering {
        let known = gw.clients.inner.lock().retry_topics.contains(&group);
        if !known {
            // The push consumer subscribes its group's retry topic: the broker creates it
            // (one queue) when the group first heart-beats.
            let topic = format!("{}{group}", crate::send::RETRY_PREFIX);
            crate::send::ensure_topic(gw, &topic, 1).await?;
            gw.clients.inner.lock().retry_topics.insert(group);
        }
    }
    notify(gw, changed_groups).await;
    Ok(ok(cmd))
}

pub(crate) async fn unregister(gw: &Gateway, _conn: &Arc<ConnState>, cmd: &Command) -> Reply {
    let client_id = cmd.str_field("clientID")?.to_string();
    let producer = cmd.opt_str("producerGroup").map(str::to_string);
    let consumer = cmd.opt_str("consumerGroup").map(str::to_string);
    let mut changed = HashSet::new();
    {
        let mut inner = gw.clients.inner.lock();
        if let Some(c) = inner.clients.get_mut(&client_id) {
            if let Some(p) = &producer {
                c.producer_groups.remove(p);
            }
            if let Some(g) = &consumer
                && c.consumer_groups.remove(g).is_some()
            {
                changed.insert(g.clone());
            }
            if c.producer_groups.is_empty() && c.consumer_groups.is_empty() {
                inner.clients.remove(&client_id);
            }
        }
        if let Some(g) = &consumer {
            inner.locks.retain(|k, v| !(k.0 == *g && v.0 == client_id));
        }
    }
    for group in &changed {
        unregister_consumer(gw, &client_id, group).await;
    }
    notify(gw, changed).await;
    Ok(ok(cmd))
}

/// The connection closed: its clients are gone.
pub(crate) async fn disconnected(gw: &Gateway, conn: &Arc<ConnState>) {
    let changed: Vec<(String, String)> = {
        let mut inner = gw.clients.inner.lock();
        let gone: Vec<String> = inner
            .clients
            .iter()
            .filter(|(_, c)| c.conn.id == conn.id)
            .map(|(id, _)| id.clone())
            .collect();
        let mut changed = Vec::new();
        for id in gone {
            if let Some(c) = inner.clients.remove(&id) {
                changed.extend(c.consumer_groups.into_keys().map(|g| (id.clone(), g)));
            }
        }
        changed
    };
    for (client, group) in &changed {
        unregister_consumer(gw, client, group).await;
    }
    notify(gw, changed.into_iter().map(|(_, g)| g).collect()).await;
}

/// Forgets clients that stopped heart-beating, and expired locks.
pub(crate) async fn expire(gw: &Gateway) {
    let changed: HashSet<String> = {
        let mut inner = gw.clients.inner.lock();
        let now = Instant::now();
        let gone: Vec<String> = inner
            .clients
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_seen) > CLIENT_EXPIRY)
            .map(|(id, _)| id.clone())
            .collect();
        let mut changed = HashSet::new();
        for id in gone {
            if let Some(c) = inner.clients.remove(&id) {
                tracing::info!(client = id, "client expired: no heartbeat for 120 s");
                changed.extend(c.consumer_groups.into_keys());
            }
        }
        inner.locks.retain(|_, (_, until)| *until > now);
        changed
    };
    let mut changed = changed;
    changed.extend(changed_elsewhere(gw).await);
    notify(gw, changed).await;
}

pub(crate) async fn consumer_list(gw: &Gateway, cmd: &Command) -> Reply {
    let group = cmd.str_field("consumerGroup")?;
    let req = tributary_proto::v1::ListMembersRequest {
        namespace: gw.config.namespace.clone(),
        group: group.to_string(),
        protocol_type: CONSUMER_LEASES.into(),
    };
    let ids: Vec<String> = gw
        .core
        .groups
        .clone()
        .list_members(req)
        .await
        .map_err(|s| crate::conn::core_refusal(&s))?
        .into_inner()
        .members
        .into_iter()
        .map(|m| m.member_id)
        .collect();
    if ids.is_empty() {
        return Err(Refusal::system(format!(
            "no consumer for this group, {group}"
        )));
    }
    Ok(ok(cmd).with_body(json_body(&json!({ "consumerIdList": ids }))))
}

fn mq_key(group: &str, mq: &Value) -> Option<(String, String, String, i64)> {
    Some((
        group.to_string(),
        mq.get("topic")?.as_str()?.to_string(),
        mq.get("brokerName")?.as_str()?.to_string(),
        mq.get("queueId")?.as_i64()?,
    ))
}

pub(crate) async fn lock_batch(gw: &Gateway, cmd: &Command) -> Reply {
    let body: Value = serde_json::from_slice(&cmd.body)
        .map_err(|e| Refusal::system(format!("malformed lock request body: {e}")))?;
    let group = body
        .get("consumerGroup")
        .and_then(Value::as_str)
        .unwrap_or("");
    let client = body.get("clientId").and_then(Value::as_str).unwrap_or("");
    if group.is_empty() || client.is_empty() {
        return Err(Refusal::system(
            "lock request without consumerGroup or clientId",
        ));
    }
    let now = Instant::now();
    let mut locked = Vec::new();
    {
        let mut inner = gw.clients.inner.lock();
        for mq in strings(&body, "mqSet") {
            let Some(key) = mq_key(group, mq) else {
                continue;
            };
            let free = match inner.locks.get(&key) {
                None => true,
                Some((holder, until)) => holder == client || *until <= now,
            };
            if free {
                inner
                    .locks
                    .insert(key, (client.to_string(), now + LOCK_EXPIRY));
                locked.push(mq.clone());
            }
        }
    }
    Ok(ok(cmd).with_body(json_body(&json!({ "lockOKMQSet": locked }))))
}

pub(crate) async fn unlock_batch(gw: &Gateway, cmd: &Command) -> Reply {
    let body: Value = serde_json::from_slice(&cmd.body)
        .map_err(|e| Refusal::system(format!("malformed unlock request body: {e}")))?;
    let group = body
        .get("consumerGroup")
        .and_then(Value::as_str)
        .unwrap_or("");
    let client = body.get("clientId").and_then(Value::as_str).unwrap_or("");
    let mut inner = gw.clients.inner.lock();
    for mq in strings(&body, "mqSet") {
        if let Some(key) = mq_key(group, mq)
            && inner
                .locks
                .get(&key)
                .is_some_and(|(holder, _)| holder == client)
        {
            inner.locks.remove(&key);
        }
    }
    Ok(ok(cmd))
}

/// CHECK_CLIENT_CONFIG: what a consumer asks before subscribing with a filter.
pub(crate) fn check_client_config(cmd: &Command) -> Reply {
    let body: Value = serde_json::from_slice(&cmd.body).unwrap_or(Value::Null);
    let kind = body
        .pointer("/subscriptionData/expressionType")
        .and_then(Value::as_str)
        .unwrap_or("TAG");
    if !kind.eq_ignore_ascii_case("TAG") {
        return Err(Refusal::system(format!(
            "The broker does not support consumer to filter message by {kind}"
        )));
    }
    Ok(ok(cmd))
}

/// GET_CONSUMER_RUNNING_INFO (from an admin tool): asked of the consumer itself, as
/// RocketMQ's broker does, when it is connected to this gateway.
pub(crate) async fn consumer_running_info(gw: &Gateway, cmd: &Command) -> Reply {
    let client = cmd.str_field("clientId")?;
    let Some(conn) = gw.clients.client_conn(client) else {
        return Err(Refusal::system(format!(
            "The Consumer <{client}> Not Online"
        )));
    };
    let mut ask = Command::request(rq::GET_CONSUMER_RUNNING_INFO, 0);
    ask.ext = cmd.ext.clone();
    match conn.call(ask, Duration::from_secs(5)).await {
        Some(r) if r.code == rs::SUCCESS => Ok(ok(cmd).with_body(r.body)),
        Some(r) => Err(Refusal::new(
            r.code,
            r.remark.unwrap_or_else(|| "the consumer refused".into()),
        )),
        None => Err(Refusal::system(format!(
            "The Consumer <{client}> did not answer within 5 s"
        ))),
    }
}
