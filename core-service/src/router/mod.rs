//! The router: named addresses with bindings to queues, streams and other addresses, and
//! publishing through them.
//!
//! Address kinds: direct (the routing key equals the binding's pattern), fanout (every
//! binding), topic (AMQP patterns: `.`, `*`, `#`), headers (the record's headers against
//! the binding's arguments, `x-match` all/any) and mqtt-topic (MQTT filters: `/`, `+`,
//! `#`). Topic and mqtt-topic bindings share one matching structure ([`pattern`]). An
//! address bound to an address routes on through it, each address at most once per publish.
//!
//! The default address (the empty name) routes by routing key to the queue of that name,
//! as AMQP's default exchange and SQS's queue URLs do.
//!
//! Each address has its own lock; addresses, bindings and their kinds are in the metadata
//! store, written before the call answers.

mod mqtt_rules;
pub(crate) mod pattern;
mod stream_address;

pub use mqtt_rules::MQTT_RULES_ADDRESS;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};
use tributary_proto::v1::{self, AddressKind, binding::Destination};
use tributary_storage::Op;

use crate::error::{CoreError, CoreResult};
use crate::meta::{self, from_json, to_json, validate_name};
use crate::queues::{EnqueueMode, PendingEnqueue, SharedPending};
use crate::{Core, now_ms, streams::namespace_or_default};

use pattern::{AMQP_TOPIC, MQTT_TOPIC, PatternTrie};

const ADDRESS_KEY: &str = "address";
const BINDING_KEY: &str = "binding";
/// Addresses one publish may pass through at most (exchange-to-exchange chains).
const MAX_HOPS: usize = 64;

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) enum Target {
    Queue(String),
    Stream(String),
    Address(String),
}

impl Target {
    fn from_proto(d: &Option<Destination>) -> CoreResult<Self> {
        let t = match d {
            Some(Destination::Queue(q)) => Self::Queue(q.clone()),
            Some(Destination::Stream(s)) => Self::Stream(s.clone()),
            Some(Destination::Address(a)) => Self::Address(a.clone()),
            None => {
                return Err(CoreError::InvalidArgument(
                    "a binding needs a destination".into(),
                ));
            }
        };
        let (Self::Queue(n) | Self::Stream(n) | Self::Address(n)) = &t;
        validate_name("binding destination", n)?;
        Ok(t)
    }
    fn to_proto(&self) -> Destination {
        match self {
            Self::Queue(q) => Destination::Queue(q.clone()),
            Self::Stream(s) => Destination::Stream(s.clone()),
            Self::Address(a) => Destination::Address(a.clone()),
        }
    }
    fn kind_and_name(&self) -> (&'static str, &str) {
        match self {
            Self::Queue(n) => ("queue", n),
            Self::Stream(n) => ("stream", n),
            Self::Address(n) => ("address", n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AddressRecord {
    kind: i32,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: Vec<(String, String)>,
    created_at_ms: i64,
}

impl AddressRecord {
    fn describe(&self, created: bool) -> v1::DeclareAddressResponse {
        v1::DeclareAddressResponse {
            created,
            kind: self.kind,
            durable: self.durable,
            auto_delete: self.auto_delete,
            internal: self.internal,
            arguments: self.arguments.iter().cloned().collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BindingRecord {
    source: String,
    target: Target,
    pattern: String,
    arguments: Vec<(String, Vec<u8>)>,
}

impl BindingRecord {
    fn to_proto(&self, ns: &str) -> v1::Binding {
        v1::Binding {
            namespace: ns.to_string(),
            source_address: self.source.clone(),
            destination: Some(self.target.to_proto()),
            pattern: self.pattern.clone(),
            arguments: self
                .arguments
                .iter()
                .map(|(n, v)| v1::Header {
                    name: n.clone(),
                    value: v.clone().into(),
                })
                .collect(),
        }
    }
    fn key(&self, ns: &str) -> Vec<u8> {
        let (kind, name) = self.target.kind_and_name();
        let args = serde_json::to_string(&self.arguments).unwrap_or_default();
        meta::key(
            BINDING_KEY,
            &[ns, &self.source, kind, name, &self.pattern, &args],
        )
    }
}

/// How a headers binding matches (`x-match`).
fn headers_match(args: &[(String, Vec<u8>)], headers: &[v1::Header]) -> bool {
    let mode = args
        .iter()
        .find(|(n, _)| n == "x-match")
        .map_or("all", |(_, v)| std::str::from_utf8(v).unwrap_or("all"));
    let with_x = mode.ends_with("-with-x");
    let wanted = args
        .iter()
        .filter(|(n, _)| n != "x-match" && (with_x || !n.starts_with("x-")));
    let has = |(n, v): &(String, Vec<u8>)| {
        headers
            .iter()
            .any(|h| &h.name == n && (v.is_empty() || h.value[..] == v[..]))
    };
    if mode.starts_with("any") {
        wanted.clone().any(has)
    } else {
        wanted.clone().all(has)
    }
}

/// One address with its bindings: its own lock, its own matching structure.
struct Address {
    record: AddressRecord,
    bindings: RwLock<Bindings>,
}

struct Bindings {
    all: Vec<BindingRecord>,
    /// Direct: routing key -> targets.
    direct: HashMap<String, Vec<Target>>,
    /// Topic and MQTT-topic: pattern -> targets.
    trie: Option<PatternTrie<Target>>,
}

impl Bindings {
    fn new(kind: AddressKind) -> Self {
        let syntax = match kind {
            AddressKind::Topic => Some(AMQP_TOPIC),
            AddressKind::MqttTopic => Some(MQTT_TOPIC),
            _ => None,
        };
        Self {
            all: Vec::new(),
            direct: HashMap::new(),
            trie: syntax.map(PatternTrie::new),
        }
    }

    fn add(&mut self, b: BindingRecord) {
        let targets = self.direct.entry(b.pattern.clone()).or_default();
        if !targets.contains(&b.target) {
            targets.push(b.target.clone());
        }
        if let Some(t) = &mut self.trie {
            t.insert(&b.pattern, b.target.clone());
        }
        self.all.push(b);
    }

    fn remove(&mut self, b: &BindingRecord) -> bool {
        let before = self.all.len();
        self.all.retain(|r| r != b);
        if self.all.len() == before {
            return false;
        }
        // Another binding (other arguments) may still tie this pattern to this target.
        if self
            .all
            .iter()
            .any(|r| r.pattern == b.pattern && r.target == b.target)
        {
            return true;
        }
        if let Some(targets) = self.direct.get_mut(&b.pattern) {
            targets.retain(|t| t != &b.target);
            if targets.is_empty() {
                self.direct.remove(&b.pattern);
            }
        }
        if let Some(t) = &mut self.trie {
            t.remove(&b.pattern, &b.target);
        }
        true
    }
}

#[derive(Default)]
pub(crate) struct RouterTable {
    addresses: RwLock<HashMap<(String, String), Arc<Address>>>,
}

/// A publish routed and appended, not yet durable ([`Core::publish_staged`]).
pub struct StagedPublish {
    core: Core,
    /// Destinations that took each record so far (streams; queues count when durable).
    routed: Vec<u32>,
    parts: Vec<StagedPart>,
}

enum StagedPart {
    /// Records (by index) stored once for several queues.
    Shared(Vec<usize>, SharedPending),
    Queue(Vec<usize>, PendingEnqueue),
}

impl StagedPublish {
    /// Per record, how many destinations took it; routed counts stand before the fsync.
    pub fn routed(&self) -> &[u32] {
        &self.routed
    }

    /// Waits until every destination has the records on disk.
    pub async fn finish(self) -> CoreResult<v1::PublishResponse> {
        let Self {
            core,
            mut routed,
            parts,
        } = self;
        let mut first_error = None;
        for part in parts {
            match part {
                StagedPart::Shared(idx, pending) => match core.enqueue_shared_finish(pending).await
                {
                    Ok(answers) => {
                        for r in answers {
                            match r {
                                Ok(resp) => {
                                    for (k, i) in idx.iter().enumerate() {
                                        routed[*i] += u32::from(!resp.duplicate[k]);
                                    }
                                }
                                Err(e) => {
                                    first_error.get_or_insert(e);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                },
                StagedPart::Queue(idx, pending) => match core.enqueue_finish(pending).await {
                    Ok(resp) => {
                        for (k, i) in idx.iter().enumerate() {
                            routed[*i] += u32::from(!resp.duplicate[k]);
                        }
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                },
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(v1::PublishResponse { routed }),
        }
    }
}

fn kind_of(raw: i32) -> CoreResult<AddressKind> {
    match AddressKind::try_from(raw) {
        Ok(AddressKind::Unspecified) | Err(_) => Err(CoreError::InvalidArgument(
            "an address needs a kind: direct, fanout, topic, headers, mqtt-topic or stream".into(),
        )),
        Ok(k) => Ok(k),
    }
}

impl Core {
    /// `AddressNotFound` unless the namespace has an address of that name.
    pub(crate) fn require_address(&self, ns: &str, name: &str) -> CoreResult<()> {
        self.address(ns, name).map(|_| ())
    }

    /// Whether the namespace has an address of that name with something bound to it.
    pub(crate) fn address_has_bindings(&self, ns: &str, name: &str) -> bool {
        self.address(ns, name)
            .is_ok_and(|a| !a.bindings.read().all.is_empty())
    }

    fn address(&self, ns: &str, name: &str) -> CoreResult<Arc<Address>> {
        self.inner
            .router
            .addresses
            .read()
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| CoreError::AddressNotFound(name.to_string()))
    }

    /// ADDRESS_NOT_FOUND unless the address exists.
    pub(crate) fn check_address(&self, ns: &str, name: &str) -> CoreResult<()> {
        self.address(ns, name).map(|_| ())
    }

    /// Declares an address (or, passive, looks one up); the answer describes the address,
    /// new or existing, so that a passive declare tells a gateway its kind and arguments.
    pub async fn declare_address(
        &self,
        req: v1::DeclareAddressRequest,
    ) -> CoreResult<v1::DeclareAddressResponse> {
        self.check_running()?;
        let ns = namespace_or_default(&req.namespace).to_string();
        self.require_namespace(&ns)?;
        validate_name("address", &req.name)?;
        let _admin = self.inner.admin.lock().await;
        if let Ok(a) = self.address(&ns, &req.name) {
            if !req.passive && a.record.kind != req.kind {
                return Err(CoreError::Conflict(format!(
                    "address '{}' exists with another kind",
                    req.name
                )));
            }
            return Ok(a.record.describe(false));
        }
        if req.passive {
            return Err(CoreError::AddressNotFound(req.name));
        }
        if kind_of(req.kind)? == AddressKind::Stream {
            return Err(CoreError::InvalidArgument(format!(
                "no stream named '{}': an address of kind stream is a stream's own, made with it",
                req.name
            )));
        }
        let mut arguments: Vec<(String, String)> = req.arguments.into_iter().collect();
        arguments.sort();
        let record = AddressRecord {
            kind: req.kind,
            durable: req.durable,
            auto_delete: req.auto_delete,
            internal: req.internal,
            arguments,
            created_at_ms: now_ms(),
        };
        self.inner
            .meta
            .put(
                &meta::key(ADDRESS_KEY, &[&ns, &req.name]),
                &to_json(&record),
            )
            .await?;
        let described = record.describe(true);
        self.open_address(&ns, &req.name, record, Vec::new())?;
        info!(namespace = %ns, address = %req.name, "address declared");
        Ok(described)
    }

    fn open_address(
        &self,
        ns: &str,
        name: &str,
        record: AddressRecord,
        bindings: Vec<BindingRecord>,
    ) -> CoreResult<()> {
        let mut b = Bindings::new(kind_of(record.kind)?);
        for binding in bindings {
            b.add(binding);
        }
        self.inner.router.addresses.write().insert(
            (ns.to_string(), name.to_string()),
            Arc::new(Address {
                record,
                bindings: RwLock::new(b),
            }),
        );
        Ok(())
    }

    pub async fn delete_address(
        &self,
        namespace: &str,
        name: &str,
        if_unused: bool,
    ) -> CoreResult<()> {
        let ns = namespace_or_default(namespace).to_string();
        let _admin = self.inner.admin.lock().await;
        let a = self.address(&ns, name)?;
        if a.record.kind == AddressKind::Stream as i32 {
            return Err(CoreError::InvalidArgument(format!(
                "address '{name}' is stream '{name}': it goes when the stream is deleted"
            )));
        }
        if if_unused && !a.bindings.read().all.is_empty() {
            return Err(CoreError::Conflict(format!(
                "address '{name}' has bindings"
            )));
        }
        self.drop_address(&ns, name).await?;
        // Bindings that lead to it go too.
        self.forget_target(&ns, &Target::Address(name.to_string()))
            .await
    }

    /// Removes an address and the bindings it is the source of (the caller holds the admin
    /// lock, and then forgets the bindings that lead to it). False if it was gone already.
    async fn drop_address(&self, ns: &str, name: &str) -> CoreResult<bool> {
        let Ok(a) = self.address(ns, name) else {
            return Ok(false);
        };
        let bindings = a.bindings.read().all.clone();
        for b in &bindings {
            self.inner.meta.delete(&b.key(ns)).await?;
        }
        self.inner
            .meta
            .delete(&meta::key(ADDRESS_KEY, &[ns, name]))
            .await?;
        self.inner
            .router
            .addresses
            .write()
            .remove(&(ns.to_string(), name.to_string()));
        Ok(true)
    }

    /// Removes every binding that leads to `target` (a deleted queue, stream or address).
    /// An auto-delete address that loses its last binding that way goes too, and so on
    /// down the chain (as RabbitMQ's auto-delete exchanges do).
    pub(crate) async fn forget_target(&self, ns: &str, target: &Target) -> CoreResult<()> {
        let mut todo = vec![target.clone()];
        while let Some(target) = todo.pop() {
            let addresses: Vec<_> = self
                .inner
                .router
                .addresses
                .read()
                .iter()
                .filter(|((n, _), _)| n == ns)
                .map(|((_, name), a)| (name.clone(), a.clone()))
                .collect();
            for (name, a) in addresses {
                let (gone, emptied) = {
                    let mut b = a.bindings.write();
                    let gone: Vec<_> = b
                        .all
                        .iter()
                        .filter(|r| r.target == target)
                        .cloned()
                        .collect();
                    for g in &gone {
                        b.remove(g);
                    }
                    (gone, b.all.is_empty())
                };
                if gone.is_empty() {
                    continue;
                }
                for g in &gone {
                    self.inner.meta.delete(&g.key(ns)).await?;
                }
                if emptied && a.record.auto_delete && self.drop_address(ns, &name).await? {
                    info!(namespace = %ns, address = %name, "auto-delete address lost its last binding; deleted");
                    todo.push(Target::Address(name));
                }
            }
        }
        Ok(())
    }

    fn binding_from(&self, b: v1::Binding) -> CoreResult<(String, BindingRecord)> {
        let ns = namespace_or_default(&b.namespace).to_string();
        let mut arguments: Vec<(String, Vec<u8>)> = b
            .arguments
            .into_iter()
            .map(|h| (h.name, h.value.to_vec()))
            .collect();
        arguments.sort();
        let record = BindingRecord {
            source: b.source_address,
            target: Target::from_proto(&b.destination)?,
            pattern: b.pattern,
            arguments,
        };
        Ok((ns, record))
    }

    pub async fn bind(&self, binding: v1::Binding) -> CoreResult<()> {
        self.check_running()?;
        let (ns, record) = self.binding_from(binding)?;
        let _admin = self.inner.admin.lock().await;
        let a = self.address(&ns, &record.source)?;
        stream_address::check_binding(a.record.kind, &record.target)?;
        match &record.target {
            Target::Queue(q) => {
                self.queue(&v1::QueueId {
                    namespace: ns.clone(),
                    name: q.clone(),
                })?;
            }
            Target::Stream(s) => {
                self.refuse_when_spread("a binding to a stream")?;
                self.stream(&v1::StreamId::new(ns.clone(), s.clone()))?;
            }
            Target::Address(d) => {
                self.address(&ns, d)?;
            }
        }
        if let Some(t) = &a.bindings.read().trie {
            t.validate(&record.pattern)
                .map_err(|e| CoreError::InvalidArgument(format!("binding pattern: {e}")))?;
        }
        if a.bindings.read().all.contains(&record) {
            return Ok(());
        }
        self.inner
            .meta
            .put(&record.key(&ns), &to_json(&record))
            .await?;
        a.bindings.write().add(record);
        Ok(())
    }

    /// Removes a binding. Unbinding what is not bound (or a source or destination that is
    /// gone) succeeds, as RabbitMQ's unbind does.
    pub async fn unbind(&self, binding: v1::Binding) -> CoreResult<()> {
        let (ns, record) = self.binding_from(binding)?;
        let _admin = self.inner.admin.lock().await;
        let Ok(a) = self.address(&ns, &record.source) else {
            return Ok(());
        };
        let (had, emptied) = {
            let mut b = a.bindings.write();
            (b.remove(&record), b.all.is_empty())
        };
        if had {
            self.inner.meta.delete(&record.key(&ns)).await?;
            // An auto-delete address goes with its last binding (one that never had a
            // binding stays).
            if emptied && a.record.auto_delete && self.drop_address(&ns, &record.source).await? {
                info!(namespace = %ns, address = %record.source, "auto-delete address lost its last binding; deleted");
                self.forget_target(&ns, &Target::Address(record.source.clone()))
                    .await?;
            }
        }
        Ok(())
    }

    /// The addresses of a namespace (every namespace for ""), sorted by namespace and name.
    pub fn list_addresses(&self, namespace: &str) -> Vec<crate::inspect::AddressSummary> {
        let addresses = self.inner.router.addresses.read();
        let mut out: Vec<_> = addresses
            .iter()
            .filter(|((n, _), _)| namespace.is_empty() || n == namespace)
            .map(|((n, name), a)| crate::inspect::AddressSummary {
                namespace: n.clone(),
                name: name.clone(),
                kind: v1::AddressKind::try_from(a.record.kind).unwrap_or_default(),
                durable: a.record.durable,
                auto_delete: a.record.auto_delete,
                internal: a.record.internal,
                arguments: a.record.arguments.clone(),
                bindings: a.bindings.read().all.len(),
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    pub fn list_bindings(&self, namespace: &str, source: &str) -> Vec<v1::Binding> {
        let ns = namespace_or_default(namespace);
        let addresses = self.inner.router.addresses.read();
        let mut out: Vec<v1::Binding> = addresses
            .iter()
            .filter(|((n, name), _)| n == ns && (source.is_empty() || name == source))
            .flat_map(|(_, a)| {
                a.bindings
                    .read()
                    .all
                    .iter()
                    .map(|b| b.to_proto(ns))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| (&a.source_address, &a.pattern).cmp(&(&b.source_address, &b.pattern)));
        out
    }

    /// Loads addresses and bindings at start-up.
    /// Loads the durable addresses and their bindings (after the queues: a binding to a
    /// queue that did not survive the restart goes). A non-durable address, and every
    /// binding from or to one, ends with the process that declared it.
    pub(crate) async fn recover_router(&self) -> CoreResult<()> {
        let mut addresses: Vec<(String, String, AddressRecord)> = Vec::new();
        let mut gone: Vec<Vec<u8>> = Vec::new();
        for (key, raw) in self
            .inner
            .meta
            .scan_prefix(&meta::key(ADDRESS_KEY, &[]), usize::MAX)
            .await?
        {
            let parts = meta::parts(ADDRESS_KEY, &key);
            let record: AddressRecord = from_json("address", &raw)?;
            if record.durable {
                addresses.push((parts[0].clone(), parts[1].clone(), record));
            } else {
                gone.push(key);
            }
        }
        let durable: HashSet<(String, String)> = addresses
            .iter()
            .map(|(ns, name, _)| (ns.clone(), name.clone()))
            .collect();
        let mut bindings: HashMap<(String, String), Vec<BindingRecord>> = HashMap::new();
        for (key, raw) in self
            .inner
            .meta
            .scan_prefix(&meta::key(BINDING_KEY, &[]), usize::MAX)
            .await?
        {
            let parts = meta::parts(BINDING_KEY, &key);
            let b: BindingRecord = from_json("binding", &raw)?;
            let ns = &parts[0];
            let target_lives = match &b.target {
                Target::Queue(q) => self
                    .queue(&v1::QueueId {
                        namespace: ns.clone(),
                        name: q.clone(),
                    })
                    .is_ok(),
                Target::Stream(st) => self
                    .stream(&v1::StreamId::new(ns.clone(), st.clone()))
                    .is_ok(),
                Target::Address(a) => durable.contains(&(ns.clone(), a.clone())),
            };
            if !target_lives || !durable.contains(&(ns.clone(), b.source.clone())) {
                gone.push(key);
                continue;
            }
            bindings
                .entry((ns.clone(), b.source.clone()))
                .or_default()
                .push(b);
        }
        if !gone.is_empty() {
            debug!(
                count = gone.len(),
                "removing non-durable addresses and bindings left by the last run"
            );
            let ops = gone.into_iter().map(|key| Op::Delete { key }).collect();
            self.inner.meta.txn(vec![], ops).await?;
        }
        for (ns, name, record) in addresses {
            let bs = bindings
                .remove(&(ns.clone(), name.clone()))
                .unwrap_or_default();
            self.open_address(&ns, &name, record, bs)?;
        }
        Ok(())
    }

    /// Where a record published to `address` with `key` goes: the queues and streams at the
    /// end of every matching binding, each once.
    fn resolve(
        &self,
        ns: &str,
        address: &str,
        key: &str,
        headers: &[v1::Header],
        out: &mut BTreeSet<Target>,
    ) -> CoreResult<()> {
        let mut todo = vec![address.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(name) = todo.pop() {
            if !seen.insert(name.clone()) || seen.len() > MAX_HOPS {
                continue;
            }
            let Ok(a) = self.address(ns, &name) else {
                continue;
            };
            let b = a.bindings.read();
            let mut hit = |t: &Target| match t {
                Target::Address(next) => todo.push(next.clone()),
                t => {
                    out.insert(t.clone());
                }
            };
            match kind_of(a.record.kind)? {
                AddressKind::Fanout => b.all.iter().for_each(|r| hit(&r.target)),
                AddressKind::Direct => {
                    if let Some(ts) = b.direct.get(key) {
                        ts.iter().for_each(&mut hit);
                    }
                }
                AddressKind::Topic | AddressKind::MqttTopic => {
                    if let Some(t) = &b.trie {
                        t.for_each_match(key, &mut hit);
                    }
                }
                AddressKind::Headers => {
                    for r in &b.all {
                        if headers_match(&r.arguments, headers) {
                            hit(&r.target);
                        }
                    }
                }
                // Publishing appends to the stream; its bindings are served from the
                // stream (stream_address.rs).
                AddressKind::Stream => {
                    out.insert(Target::Stream(name.clone()));
                }
                AddressKind::Unspecified => {}
            }
        }
        Ok(())
    }

    pub async fn publish(&self, req: v1::PublishRequest) -> CoreResult<v1::PublishResponse> {
        self.check_running()?;
        if !req.transaction_id.is_empty() {
            return Err(CoreError::Unsupported("transactional publish".into()));
        }
        if req.records.is_empty() {
            return Err(CoreError::InvalidArgument("a publish needs records".into()));
        }
        self.publish_staged(req).await?.finish().await
    }

    /// The first half of a publish: routed and appended to every destination in the order
    /// of the calls, not yet durable. A gateway that must keep its publishes in order but
    /// not wait for each one's fsync before the next (an AMQP channel with confirms) stages
    /// them one after the other and finishes them concurrently.
    pub async fn publish_staged(&self, req: v1::PublishRequest) -> CoreResult<StagedPublish> {
        self.check_running()?;
        if !req.transaction_id.is_empty() {
            return Err(CoreError::Unsupported("transactional publish".into()));
        }
        if req.records.is_empty() {
            return Err(CoreError::InvalidArgument("a publish needs records".into()));
        }
        let ns = namespace_or_default(&req.namespace).to_string();
        self.require_namespace(&ns)?;
        // The topic exchange bridges to MQTT sessions (topic_exchange.rs).
        let to_mqtt = (self.inner.config.mqtt_exchange.as_deref() == Some(req.address.as_str()))
            .then(|| req.records.clone());
        let staged = self
            .stage_records(
                &ns,
                &req.address,
                &req.routing_key,
                req.records,
                EnqueueMode::Client,
            )
            .await?;
        if let Some(records) = to_mqtt {
            self.deliver_exchange_publish_to_sessions(
                &ns,
                &req.address,
                &req.routing_key,
                &records,
            )
            .await;
        }
        if req.mandatory && staged.routed.contains(&0) {
            debug!(namespace = %ns, address = %req.address, key = %req.routing_key, "unroutable publish");
        }
        Ok(staged)
    }

    /// Where a publish's records go, without writing them: groups of record indexes with
    /// the queues and streams they are routed to (that exist now). Each record is stamped
    /// with the address and key it was published with, as a publish does. An address that
    /// does not exist routes nowhere. (A staged publish, routed when its transaction
    /// commits.)
    pub(crate) fn route_targets(
        &self,
        ns: &str,
        address: &str,
        key: &str,
        records: &mut [v1::Record],
    ) -> Vec<(Vec<usize>, Vec<Target>)> {
        for r in records.iter_mut() {
            let p = r.properties.get_or_insert_default();
            p.publish_address = address.to_string();
            p.address = key.to_string();
        }
        let mut groups: Vec<(BTreeSet<Target>, Vec<usize>)> = Vec::new();
        if address.is_empty() {
            groups.push((
                BTreeSet::from([Target::Queue(key.to_string())]),
                (0..records.len()).collect(),
            ));
        } else if let Ok(a) = self.address(ns, address) {
            let per_record = kind_of(a.record.kind).is_ok_and(|k| k == AddressKind::Headers);
            for (i, r) in records.iter().enumerate() {
                if i > 0 && !per_record {
                    groups[0].1.push(i);
                    continue;
                }
                let mut targets = BTreeSet::new();
                if self
                    .resolve(ns, address, key, &r.headers, &mut targets)
                    .is_err()
                {
                    targets.clear();
                }
                match groups.iter_mut().find(|(t, _)| *t == targets) {
                    Some(g) => g.1.push(i),
                    None => groups.push((targets, vec![i])),
                }
            }
        }
        groups
            .into_iter()
            .map(|(targets, idx)| {
                let live = targets
                    .into_iter()
                    .filter(|t| match t {
                        Target::Queue(q) => self
                            .queue(&v1::QueueId {
                                namespace: ns.to_string(),
                                name: q.clone(),
                            })
                            .is_ok(),
                        Target::Stream(s) => self
                            .stream(&v1::StreamId::new(ns.to_string(), s.clone()))
                            .is_ok(),
                        Target::Address(_) => false,
                    })
                    .collect();
                (idx, live)
            })
            .collect()
    }

    /// Dead letters of a queue, published to its dead-letter address: with `key`, or else
    /// each with the key it was first published with. Unroutable ones are dropped (and
    /// counted), as RabbitMQ drops dead letters its DLX cannot route.
    pub(crate) async fn route_dead_letters(
        &self,
        ns: &str,
        address: &str,
        key: Option<&str>,
        records: Vec<v1::Record>,
    ) -> CoreResult<()> {
        let mut by_key: Vec<(String, Vec<v1::Record>)> = Vec::new();
        for r in records {
            let k = key.map(str::to_string).unwrap_or_else(|| {
                r.properties
                    .as_ref()
                    .map_or(String::new(), |p| p.dead_letter_original_key.clone())
            });
            match by_key.iter_mut().find(|(kk, _)| *kk == k) {
                Some((_, rs)) => rs.push(r),
                None => by_key.push((k, vec![r])),
            }
        }
        for (k, records) in by_key {
            let routed = self
                .route_records(ns, address, &k, records, EnqueueMode::Internal)
                .await?;
            let lost = routed.iter().filter(|n| **n == 0).count();
            if lost > 0 {
                debug!(namespace = %ns, address = %address, key = %k, lost, "dead letters unroutable; dropped");
                metrics::counter!("tributary_queue_discarded_total").increment(lost as u64);
            }
        }
        Ok(())
    }

    /// Routes records published to `address` with `key`; per record, how many destinations
    /// took it. Each record is stamped with the address and key it was published with.
    pub(crate) async fn route_records(
        &self,
        ns: &str,
        address: &str,
        key: &str,
        records: Vec<v1::Record>,
        mode: EnqueueMode,
    ) -> CoreResult<Vec<u32>> {
        let staged = self.stage_records(ns, address, key, records, mode).await?;
        Ok(staged.finish().await?.routed)
    }

    /// [`Core::route_records`] up to the appends (see [`Core::publish_staged`]).
    async fn stage_records(
        &self,
        ns: &str,
        address: &str,
        key: &str,
        mut records: Vec<v1::Record>,
        mode: EnqueueMode,
    ) -> CoreResult<StagedPublish> {
        let into_stream = self.is_stream_address(ns, address);
        for r in &mut records {
            let p = r.properties.get_or_insert_default();
            p.publish_address = address.to_string();
            p.address = key.to_string();
            if into_stream && r.key.is_empty() {
                // The routing key places the record, as a Kafka key does.
                r.key = bytes::Bytes::copy_from_slice(key.as_bytes());
            }
        }
        let mut routed = vec![0u32; records.len()];
        // Records that go to the same destinations travel together.
        let mut groups: Vec<(BTreeSet<Target>, Vec<usize>)> = Vec::new();
        if address.is_empty() {
            let all = (0..records.len()).collect();
            groups.push((BTreeSet::from([Target::Queue(key.to_string())]), all));
        } else {
            let a = self.address(ns, address)?;
            let per_record = kind_of(a.record.kind)? == AddressKind::Headers;
            for (i, r) in records.iter().enumerate() {
                if i > 0 && !per_record {
                    groups[0].1.push(i);
                    continue;
                }
                let mut targets = BTreeSet::new();
                self.resolve(ns, address, key, &r.headers, &mut targets)?;
                match groups.iter_mut().find(|(t, _)| *t == targets) {
                    Some(g) => g.1.push(i),
                    None => groups.push((targets, vec![i])),
                }
            }
        }
        let mut parts = Vec::new();
        // A destination that fails stops the routing; what is staged by then is finished
        // (made durable, its shared body released) before the error goes back.
        let mut failed = None;
        'groups: for (targets, idx) in groups {
            let batch = || -> Vec<v1::Record> { idx.iter().map(|i| records[*i].clone()).collect() };
            // Queues that get the same records share one stored copy of them.
            let queues: Vec<_> = targets
                .iter()
                .filter_map(|t| match t {
                    Target::Queue(q) => self
                        .queue(&v1::QueueId {
                            namespace: ns.to_string(),
                            name: q.clone(),
                        })
                        .ok(),
                    _ => None,
                })
                .collect();
            if queues.len() >= 2 {
                match self.enqueue_shared_append(ns, &queues, batch(), mode).await {
                    Ok(pending) => parts.push(StagedPart::Shared(idx.clone(), pending)),
                    Err(e) => {
                        failed = Some(e);
                        break 'groups;
                    }
                }
            }
            for t in targets {
                match &t {
                    Target::Queue(_) if queues.len() >= 2 => {}
                    Target::Queue(q) => {
                        let Ok(h) = self.queue(&v1::QueueId {
                            namespace: ns.to_string(),
                            name: q.clone(),
                        }) else {
                            continue;
                        };
                        match self.enqueue_append(&h, batch(), mode, None, None).await {
                            Ok(pending) => parts.push(StagedPart::Queue(idx.clone(), pending)),
                            Err(e) => {
                                failed = Some(e);
                                break 'groups;
                            }
                        }
                    }
                    _ => match self.deliver_to(ns, &t, batch(), mode).await {
                        Ok(took) => {
                            for (k, i) in idx.iter().enumerate() {
                                routed[*i] += u32::from(took[k]);
                            }
                        }
                        Err(e) => {
                            failed = Some(e);
                            break 'groups;
                        }
                    },
                }
            }
        }
        let staged = StagedPublish {
            core: self.clone(),
            routed,
            parts,
        };
        if let Some(e) = failed {
            if let Err(also) = staged.finish().await {
                debug!(error = %also, "finishing the destinations staged before a failed one");
            }
            return Err(e);
        }
        Ok(staged)
    }

    /// Hands records to one destination; per record, whether it took it.
    pub(crate) async fn deliver_to(
        &self,
        ns: &str,
        target: &Target,
        records: Vec<v1::Record>,
        mode: EnqueueMode,
    ) -> CoreResult<Vec<bool>> {
        let n = records.len();
        match target {
            Target::Queue(q) => {
                let Ok(h) = self.queue(&v1::QueueId {
                    namespace: ns.to_string(),
                    name: q.clone(),
                }) else {
                    return Ok(vec![false; n]);
                };
                let resp = self.enqueue_records(&h, records, mode, None).await?;
                Ok(resp.duplicate.iter().map(|d| !d).collect())
            }
            Target::Stream(s) => {
                let id = v1::StreamId::new(ns.to_string(), s.clone());
                let Ok(handle) = self.stream(&id) else {
                    return Ok(vec![false; n]);
                };
                let partitions = handle.partitions().len().max(1) as u64;
                // Records with a key go to the partition their key hashes to; records
                // without one to partition 0, in publish order.
                let mut by_partition: HashMap<u32, Vec<v1::Record>> = HashMap::new();
                for r in records {
                    let p = if r.key.is_empty() {
                        0
                    } else {
                        (meta::stable_hash(&r.key) % partitions) as u32
                    };
                    by_partition.entry(p).or_default().push(r);
                }
                for (partition, records) in by_partition {
                    self.append(v1::AppendRequest {
                        stream: Some(id.clone()),
                        partition,
                        batch: Some(v1::RecordBatch {
                            records,
                            ..Default::default()
                        }),
                        auto_create: false,
                        defer_durable: false,
                    })
                    .await?;
                }
                Ok(vec![true; n])
            }
            Target::Address(_) => Ok(vec![false; n]),
        }
    }

    /// How many addresses a namespace has (a namespace is deleted only when it has none).
    pub(crate) fn address_count(&self, ns: &str) -> usize {
        self.inner
            .router
            .addresses
            .read()
            .keys()
            .filter(|(n, _)| n == ns)
            .count()
    }
}
