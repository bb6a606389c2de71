//! MQTT topics and streams of the same name, and the forwarder that carries a stream's
//! records to its other readers (docs/compat/mapping.md).
//!
//! A stream is also an MQTT topic: a message routed to topic `T` of a namespace with a
//! stream named `T` (or with a rule leading a filter that matches `T` to a stream,
//! router/mqtt_rules.rs) is appended to the stream (key = the topic, so one topic keeps its
//! order in one partition) before it reaches the sessions, and records appended to the
//! stream by anything else (Kafka, AMQP, the core API, ...) reach the sessions whose
//! filters match `T`, as QoS 1 messages on topic `T`.
//!
//! The second direction is a forwarder per partition: it waits for the partition's end to
//! move, and when some session subscribes to a matching filter, or some queue is bound to
//! the stream's address (router/stream_address.rs), it reads what was appended (committed
//! records only: open and aborted transactions are held back or skipped) and routes each
//! record to the sessions and the bound queues. Records that MQTT itself published were
//! routed to the sessions when they were published and are not routed to them again. With
//! no reader it only moves its position, reading nothing, so streams nobody reads this way
//! pay one wake-up per append.
//!
//! Delivery is at least once across a crash: the position is stored in the metadata
//! store after the records it passes were queued for their sessions and queues (and at most
//! every [`SKIP_COMMIT_EVERY`] while it only skips), so a crash re-routes at most what was
//! routed since the last store.
//!
//! Opaque batches (Kafka's, kept byte for byte) are turned into records by the decoder the
//! server hands the core for their format ([`RecordDecoders`]); the core itself links no
//! protocol codec. A batch with no decoder, or one that does not decode, is skipped, logged
//! and counted (`tributary_mapping_undeliverable_total`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, warn};
use tributary_proto::v1;
use tributary_storage::PartitionKey;

use crate::delay_lines::DelayedRecord;
use crate::error::{CoreError, CoreResult};
use crate::meta;
use crate::streams::{PartitionState, StreamHandle};
use crate::{Core, topics};

/// Metadata key of a forwarder's position: `streamfwd/<stream id>\0<partition>`.
const FORWARD_KEY: &str = "streamfwd";
/// Metadata key of a delay line's position (delay_lines.rs): `streamdelay/<id>\0<partition>`.
const DELAY_KEY: &str = "streamdelay";
/// How often a forwarder that only skips (no subscriber) stores its position at most.
const SKIP_COMMIT_EVERY: Duration = Duration::from_secs(1);
/// How often a forwarder logs records it could not deliver at most.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Bytes a forwarder reads at once.
const READ_BYTES: usize = 1 << 20;

/// Turns an opaque batch of one format into envelope records.
pub type RecordDecoder =
    Arc<dyn Fn(&Bytes) -> Result<Vec<v1::Record>, String> + Send + Sync + 'static>;

/// The decoders of opaque batch formats, by format name (`kafka.record-batch.v2`).
#[derive(Clone, Default)]
pub struct RecordDecoders(HashMap<String, RecordDecoder>);

impl RecordDecoders {
    pub fn with(mut self, format: &str, decoder: RecordDecoder) -> Self {
        self.0.insert(format.to_string(), decoder);
        self
    }

    fn decode(&self, batch: &v1::RecordBatch) -> Result<Vec<v1::Record>, String> {
        match self.0.get(&batch.opaque_format) {
            Some(decode) => decode(&batch.opaque),
            None => Err(format!(
                "no decoder for batches of format '{}'",
                batch.opaque_format
            )),
        }
    }
}

impl fmt::Debug for RecordDecoders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What a partition's forwarder does with the records it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Routes them to MQTT sessions and to the queues bound to the stream's address.
    Readers,
    /// Schedules them for the stream's delay target (delay_lines.rs).
    DelayLine,
}

fn position_key(role: Role, key: PartitionKey) -> Vec<u8> {
    let prefix = match role {
        Role::Readers => FORWARD_KEY,
        Role::DelayLine => DELAY_KEY,
    };
    meta::key(
        prefix,
        &[&key.stream_id.to_string(), &key.partition.to_string()],
    )
}

impl Core {
    /// Appends a message routed to an MQTT topic to the stream of that name, if there is
    /// one (and the mapping is on); whether it did.
    pub(crate) async fn append_to_topic_stream(
        &self,
        ns: &str,
        message: &v1::RoutedMessage,
    ) -> CoreResult<bool> {
        if !self.inner.config.mqtt_streams {
            return Ok(false);
        }
        let Some(record) = &message.record else {
            return Ok(false);
        };
        let topic = record
            .properties
            .as_ref()
            .map_or("", |p| p.address.as_str());
        if topic.is_empty() {
            return Ok(false);
        }
        let mut streams = self.rule_streams(ns, topic);
        if self
            .stream(&v1::StreamId::new(ns.to_string(), topic.to_string()))
            .is_ok()
        {
            streams.insert(topic.to_string());
        }
        if streams.is_empty() {
            return Ok(false);
        }
        let mut record = record.clone();
        record.key = Bytes::copy_from_slice(topic.as_bytes());
        for stream in streams {
            self.deliver_to(
                ns,
                &crate::router::Target::Stream(stream),
                vec![record.clone()],
                crate::queues::EnqueueMode::Internal,
            )
            .await?;
        }
        Ok(true)
    }

    /// Starts the forwarders of every stream (after the sessions are recovered).
    pub(crate) fn start_topic_forwarders(&self) {
        let handles: Vec<_> = self.inner.streams.read().values().cloned().collect();
        for h in handles {
            self.start_stream_forwarders(&h, 0, false);
        }
    }

    /// Starts the forwarders of a stream's partitions from `first` on. Those of `new`
    /// partitions begin at the start; the others, when they have no stored position (a
    /// stream of an earlier version), at the end.
    pub(crate) fn start_stream_forwarders(
        &self,
        handle: &Arc<StreamHandle>,
        first: u32,
        new: bool,
    ) {
        let config = &self.inner.config;
        let mut roles = Vec::new();
        if config.mqtt_streams || config.stream_exchanges {
            roles.push(Role::Readers);
        }
        let (ns, name, delay_line) = {
            let r = handle.record.read();
            (
                r.namespace.clone(),
                r.name.clone(),
                r.settings.delay_target.is_some(),
            )
        };
        if delay_line {
            roles.push(Role::DelayLine);
        }
        self.spawn_forwarders(handle, &ns, &name, first, new, &roles);
    }

    /// Starts a stream's delay-line forwarders when its config has just made it one: they
    /// begin at the end as it is now (what was appended before was not promised a delay),
    /// stored before this returns so that an append right after is not passed over.
    pub(crate) async fn start_delay_line(&self, handle: &Arc<StreamHandle>) -> CoreResult<()> {
        let (ns, name) = {
            let r = handle.record.read();
            (r.namespace.clone(), r.name.clone())
        };
        for part in handle.partitions() {
            let key = position_key(Role::DelayLine, part.key);
            if self.inner.meta.get(&key).await?.is_none() {
                let end = self.inner.log.bounds(part.key).await?.end_offset;
                self.inner
                    .meta
                    .put(&key, end.to_string().as_bytes())
                    .await?;
            }
        }
        self.spawn_forwarders(handle, &ns, &name, 0, false, &[Role::DelayLine]);
        Ok(())
    }

    fn spawn_forwarders(
        &self,
        handle: &Arc<StreamHandle>,
        ns: &str,
        name: &str,
        first: u32,
        new: bool,
        roles: &[Role],
    ) {
        let mut tasks = self.inner.forwarders.lock();
        tasks.retain(|t| !t.is_finished());
        for part in handle.partitions().into_iter().skip(first as usize) {
            for role in roles {
                tasks.push(tokio::spawn(self.clone().forward_partition(
                    ns.to_string(),
                    name.to_string(),
                    part.clone(),
                    new,
                    *role,
                )));
            }
        }
    }

    /// Whether `key` is still a partition of the stream `ns/name` (not deleted, not
    /// deleted and created again).
    fn forwards_live_partition(&self, ns: &str, name: &str, key: PartitionKey) -> bool {
        self.stream(&v1::StreamId::new(ns.to_string(), name.to_string()))
            .is_ok_and(|h| h.record.read().id == key.stream_id)
    }

    async fn forward_partition(
        self,
        ns: String,
        name: String,
        part: Arc<PartitionState>,
        new: bool,
        role: Role,
    ) {
        let key = part.key;
        let Ok(mut end) = self.inner.log.watch_end(key) else {
            return;
        };
        let mut shutdown = self.inner.shutdown.subscribe();
        let pos_key = position_key(role, key);
        let stored = match self.inner.meta.get(&pos_key).await {
            Ok(v) => v.and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok()),
            Err(e) => {
                warn!(stream = %name, partition = key.partition, error = %e, "stream forwarder: cannot read its position; this partition is not forwarded");
                return;
            }
        };
        let pos = match stored {
            Some(p) => p,
            None => match self.inner.log.bounds(key).await {
                Ok(b) if new => b.start_offset,
                Ok(b) => b.end_offset,
                Err(_) => return,
            },
        };
        let mut f = Forwarder {
            role,
            mqtt: self.inner.config.mqtt_streams,
            name_is_topic: topics::validate_name(&name).is_ok(),
            retry: false,
            core: self,
            ns,
            name,
            part,
            pos_key,
            pos,
            saved: stored.unwrap_or(-1),
            saved_at: Instant::now(),
            warned_at: None,
            unlogged: 0,
        };
        if stored.is_none() {
            // Stored at once: a crash before the first records are routed must not make the
            // next start begin past them.
            f.save_position().await;
        }
        debug!(stream = %f.name, partition = key.partition, from = f.pos, role = ?role, "stream forwarder started");
        loop {
            // The durable end offset: what a reader may be given, what the skip passes over.
            let end_offset = *end.borrow_and_update();
            if *f.core.inner.shutdown.borrow() {
                break;
            }
            if !f.core.forwards_live_partition(&f.ns, &f.name, key) {
                let _ = f.core.inner.meta.delete(&f.pos_key).await;
                return;
            }
            let routed = match role {
                Role::Readers => {
                    let (sessions, queues) = f.readers();
                    if sessions || queues {
                        f.forward_available().await
                    } else {
                        f.skip_to_stable(end_offset);
                        false
                    }
                }
                Role::DelayLine => match f.core.delay_target_of(&f.ns, &f.name) {
                    Some(target) => f.schedule_available(&target).await,
                    None => {
                        // No longer a delay line: what it held is scheduled already.
                        let _ = f.core.inner.meta.delete(&f.pos_key).await;
                        return;
                    }
                },
            };
            if f.pos != f.saved && (routed || f.saved_at.elapsed() >= SKIP_COMMIT_EVERY) {
                f.save_position().await;
            }
            // A position to store, or records to route again after a failure: come back
            // without waiting for an append.
            let again = f.pos != f.saved || f.retry;
            tokio::select! {
                changed = end.changed() => {
                    // The partition's log is gone (its stream deleted): the check above ends
                    // the forwarder on the next turn; anything else stops it here.
                    if changed.is_err() && f.core.forwards_live_partition(&f.ns, &f.name, key) {
                        warn!(stream = %f.name, partition = key.partition, "stream forwarder: the partition's end can no longer be watched; stopping");
                        break;
                    }
                }
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep(SKIP_COMMIT_EVERY), if again => {}
            }
        }
        if f.pos != f.saved {
            f.save_position().await;
        }
    }
}

/// One partition's forwarder: where it is and what it has stored.
struct Forwarder {
    role: Role,
    /// Whether streams are MQTT topics (`mqtt_streams`).
    mqtt: bool,
    /// Whether the stream's name is an MQTT topic name (records go to it by default).
    name_is_topic: bool,
    /// Routing to the bound queues failed: the position stayed, try again.
    retry: bool,
    core: Core,
    ns: String,
    name: String,
    part: Arc<PartitionState>,
    pos_key: Vec<u8>,
    /// The next offset to forward.
    pos: i64,
    /// The position last stored (-1: none yet).
    saved: i64,
    saved_at: Instant,
    warned_at: Option<Instant>,
    /// Undeliverable records not yet named in a log line.
    unlogged: u64,
}

impl Forwarder {
    /// Who reads the stream now: (MQTT sessions, queues bound to its address).
    fn readers(&self) -> (bool, bool) {
        let sessions = self.mqtt
            && ((self.name_is_topic && self.core.has_subscribers(&self.ns, &self.name))
                || self.core.has_rules_for(&self.ns, &self.name));
        (
            sessions,
            self.core.stream_address_bound(&self.ns, &self.name),
        )
    }

    /// The MQTT topic a record of the stream goes to: its key, when a rule leading to the
    /// stream matches it; otherwise the stream's name, if that is a topic name.
    fn topic_of(&self, record: &v1::Record, rule_filters: &[String]) -> Option<String> {
        if !rule_filters.is_empty()
            && let Ok(key) = std::str::from_utf8(&record.key)
            && topics::validate_name(key).is_ok()
            && rule_filters.iter().any(|f| topics::matches(f, key))
        {
            return Some(key.to_string());
        }
        self.name_is_topic.then(|| self.name.clone())
    }

    async fn save_position(&mut self) {
        let value = self.pos.to_string();
        match self
            .core
            .inner
            .meta
            .put(&self.pos_key, value.as_bytes())
            .await
        {
            Ok(()) => {
                self.saved = self.pos;
                self.saved_at = Instant::now();
            }
            Err(e) => {
                warn!(stream = %self.name, error = %e, "stream forwarder: cannot store its position")
            }
        }
    }

    /// No reader: passes over what is committed below the durable `end` without reading it.
    fn skip_to_stable(&mut self, end: i64) {
        let stable = self.part.txns.lock().last_stable_offset(end);
        self.pos = self.pos.max(stable);
    }

    /// Counts undeliverable records and logs them, one line per [`WARN_EVERY`] at most.
    fn undeliverable(&mut self, records: u64, why: &str) {
        metrics::counter!("tributary_mapping_undeliverable_total").increment(records);
        self.unlogged += records;
        if self.warned_at.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            warn!(
                stream = %self.name,
                partition = self.part.key.partition,
                records = self.unlogged,
                reason = why,
                "stream forwarder: records not delivered {} (at most one line every {} s; all counted in tributary_mapping_undeliverable_total)",
                match self.role {
                    Role::Readers => "to MQTT subscribers or bound queues",
                    Role::DelayLine => "to the delay target",
                },
                WARN_EVERY.as_secs()
            );
            self.warned_at = Some(Instant::now());
            self.unlogged = 0;
        }
    }

    /// The committed batches past the position, below the partition's last stable offset,
    /// each with the offset after it, and that stable offset; `None` when the read failed
    /// (logged; tried again).
    async fn read_committed(&mut self) -> Option<(i64, Vec<(v1::RecordBatch, i64)>)> {
        loop {
            let read = self
                .core
                .read_partition(&self.part, self.pos, READ_BYTES, true)
                .await;
            let (bounds, batches) = match read {
                Ok(r) => r,
                Err(CoreError::OffsetOutOfRange { start, .. }) if self.pos < start => {
                    self.pos = start;
                    continue;
                }
                Err(e) => {
                    self.undeliverable(0, &format!("read failed ({e}); retried"));
                    self.retry = true;
                    return None;
                }
            };
            let stable = self.part.txns.lock().last_stable_offset(bounds.end_offset);
            let batches = batches
                .into_iter()
                .take_while(|b| b.base_offset < stable)
                .map(|b| {
                    let next = b.base_offset + i64::from(b.record_count.max(1));
                    (b, next)
                })
                .filter(|(_, next)| *next > self.pos)
                .collect();
            return Some((stable, batches));
        }
    }

    /// Routes the committed records from the position to the partition's last stable
    /// offset to the MQTT sessions and the bound queues; whether it routed any.
    async fn forward_available(&mut self) -> bool {
        self.retry = false;
        let mut routed = false;
        loop {
            let Some((stable, batches)) = self.read_committed().await else {
                return routed;
            };
            let mut progressed = false;
            for (batch, next) in batches {
                let records = self.records_at(&batch);
                let (sessions, queues) = self.readers();
                if queues && !records.is_empty() {
                    if let Err(e) = self
                        .core
                        .route_to_stream_bindings(&self.ns, &self.name, records.clone())
                        .await
                    {
                        // The position stays before this batch: routed again, later.
                        self.undeliverable(
                            0,
                            &format!("bound queues refused records ({e}); retried"),
                        );
                        self.retry = true;
                        return routed;
                    }
                    routed = true;
                }
                progressed = true;
                self.pos = next;
                if sessions {
                    routed |= self.route_to_sessions(records).await;
                }
            }
            if !progressed || self.pos >= stable {
                return routed;
            }
        }
    }

    /// Schedules the committed records from the position to the last stable offset for
    /// the delay target, storing the position with them; whether it scheduled any.
    async fn schedule_available(&mut self, target: &str) -> bool {
        self.retry = false;
        let mut scheduled = false;
        loop {
            let Some((stable, batches)) = self.read_committed().await else {
                return scheduled;
            };
            let mut progressed = false;
            for (batch, next) in batches {
                let records: Vec<DelayedRecord> = self
                    .records_at(&batch)
                    .into_iter()
                    .enumerate()
                    .map(|(i, record)| DelayedRecord {
                        offset: batch.base_offset + i as i64,
                        record,
                    })
                    // A crash between two of a batch's transactions stored a position
                    // inside it: what is below was scheduled.
                    .filter(|d| d.offset >= self.pos)
                    .collect();
                let result = self
                    .core
                    .schedule_delayed(
                        &self.ns,
                        self.part.key,
                        target,
                        records,
                        next,
                        &self.pos_key,
                    )
                    .await;
                match result {
                    Ok(()) => {
                        self.pos = next;
                        self.saved = next;
                        self.saved_at = Instant::now();
                        progressed = true;
                        scheduled = true;
                    }
                    Err(CoreError::Conflict(_)) => {
                        // Another forwarder of this partition (a config set again) got
                        // there first: go on from the position it stored.
                        if let Ok(Some(v)) = self.core.inner.meta.get(&self.pos_key).await
                            && let Some(p) =
                                std::str::from_utf8(&v).ok().and_then(|v| v.parse().ok())
                        {
                            self.pos = p;
                            self.saved = p;
                        }
                        self.retry = true;
                        return scheduled;
                    }
                    Err(e) => {
                        self.undeliverable(0, &format!("delayed records held: {e}; retried"));
                        self.retry = true;
                        return scheduled;
                    }
                }
            }
            if !progressed || self.pos >= stable {
                return scheduled;
            }
        }
    }

    /// Queues records for the MQTT sessions that subscribe to the stream's topic (those
    /// MQTT published were routed when published); whether it routed any.
    async fn route_to_sessions(&mut self, records: Vec<v1::Record>) -> bool {
        let mut routed = false;
        let rule_filters = self.core.rule_filters_of(&self.ns, &self.name);
        for mut record in records {
            if record
                .properties
                .as_ref()
                .is_some_and(|p| p.origin_protocol == "mqtt")
            {
                continue;
            }
            let Some(topic) = self.topic_of(&record, &rule_filters) else {
                continue;
            };
            let p = record.properties.get_or_insert_default();
            p.address = topic;
            p.publish_address.clear();
            let message = v1::RoutedMessage {
                record: Some(record),
                qos: 1,
                retain: false,
            };
            if let Err(e) = self
                .core
                .deliver_to_sessions(&self.ns, message, None, false, None)
                .await
            {
                self.undeliverable(1, &e.to_string());
            }
            routed = true;
        }
        routed
    }

    /// [`Self::records_of`], timed by the batch's append time when they carry none.
    fn records_at(&mut self, batch: &v1::RecordBatch) -> Vec<v1::Record> {
        let mut records = self.records_of(batch);
        for r in &mut records {
            if r.timestamp_ms <= 0 {
                r.timestamp_ms = batch.append_time_ms;
            }
        }
        records
    }

    /// The records of a stored batch that go on: none for transaction markers and
    /// aborted transactions, decoded ones for opaque batches.
    fn records_of(&mut self, batch: &v1::RecordBatch) -> Vec<v1::Record> {
        if batch.control.is_some()
            || (batch.transactional
                && self
                    .part
                    .txns
                    .lock()
                    .aborted_at(batch.producer_id, batch.base_offset))
        {
            return Vec::new();
        }
        if batch.opaque_format.is_empty() {
            return batch.records.clone();
        }
        match self.core.inner.config.record_decoders.decode(batch) {
            Ok(records) => records,
            Err(e) => {
                self.undeliverable(u64::from(batch.record_count), &e);
                Vec::new()
            }
        }
    }
}
