//! The core service: every semantic that must be the same for all protocols and all gateway
//! instances. It knows no wire format; gateways reach it through the gRPC API in
//! `tributary-proto`, over the network or in-process (see [`grpc::routes`]).
//!
//! Implemented here: namespaces, streams (partitions, configs, retention), dense offsets,
//! batch append and long-polling fetch, committed group offsets, idempotent producers and
//! the durable timer service, group membership (Kafka's classic protocol), client sessions
//! with topic routing and retained messages (MQTT), the router (`router`: addresses with
//! direct, fanout, topic, headers and MQTT-topic bindings to queues, streams and addresses)
//! and the protocol-neutral queue engine (`queues`: leases with deadlines, FIFO groups,
//! dedup, delays, dead letters and redrive), on which the AMQP gateway keeps its channels.
//! and the transaction coordinator (`transactions`: Kafka's transactional producers, with
//! markers, last stable offsets and aborted-transaction indexes per partition), staged
//! transactions (`staged`: writes held durably until commit, RocketMQ half messages with
//! check-backs, AMQP tx) and member leases (`member_leases`: the live consumers of a group
//! for client-side rebalancing, RocketMQ).

mod acls;
mod catalog;
pub mod cluster;
mod delay_lines;
pub mod error;
mod groups;
pub mod grpc;
pub mod inspect;
mod log_intents;
mod member_leases;
pub mod meta;
pub mod producers;
mod queues;
mod router;
mod session_dead_letters;
mod session_events;
mod session_stream;
mod sessions;
mod staged;
mod streams;
mod timers;
mod topic_exchange;
mod topic_streams;
pub mod topics;
mod transactions;
mod users;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use tributary_storage::{LogStore, MetaStore};

pub use error::{CoreError, CoreResult};
pub use meta::StreamDefaults;
pub use queues::ReaderServedSubscription;
pub use router::{MQTT_RULES_ADDRESS, StagedPublish};
pub use session_stream::SessionStream;
pub use topic_streams::{RecordDecoder, RecordDecoders};
pub use tributary_proto::placement::{Placement, Scheme};

use meta::NamespaceRecord;
use streams::StreamHandle;

/// Entry points for the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::queues::state::fuzz_replay as queue_journal;
}

/// The namespace that exists from the start (Kafka topics, MQTT topics without a tenant).
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Partitions of an auto-created stream, and of a created one that asks for 0.
    pub default_partitions: u32,
    /// Whether `Append { auto_create: true }` may create a missing stream.
    pub auto_create_streams: bool,
    pub stream_defaults: StreamDefaults,
    /// How often retention runs over every partition.
    pub retention_check_interval: Duration,
    /// Idle producers are forgotten after this (Kafka's producer.id.expiration.ms).
    pub producer_expiration: Duration,
    /// Write a producer-state snapshot once a partition has grown this many offsets past
    /// the last one, bounding the replay after a crash.
    pub producer_snapshot_every: i64,
    /// A rebalance of an empty group waits this long for more members before the first
    /// generation (Kafka's group.initial.rebalance.delay.ms).
    pub group_initial_rebalance_delay: Duration,
    /// QoS 1/2 messages a session may hold (queued plus in flight); beyond it new ones
    /// are dropped.
    pub session_max_queued: usize,
    /// A live message this many batches behind the end of the durable queues' journal is
    /// copied forward, so that the prefix it pinned can be truncated.
    pub queue_journal_compact_after: i64,
    /// The longest transaction timeout a producer may ask for (Kafka's
    /// transaction.max.timeout.ms).
    pub transaction_max_timeout: Duration,
    /// How often open transactions are checked against their timeout.
    pub transaction_check_interval: Duration,
    /// A transactional id with no transaction open and no call for this long is forgotten
    /// (Kafka's transactional.id.expiration.ms).
    pub transactional_id_expiration: Duration,
    /// How long the outcome of an ended staged transaction is remembered, so that a retried
    /// ResolveStaged is answered `resolved = false` rather than TRANSACTION_NOT_FOUND.
    pub staged_outcome_retention: Duration,
    /// The address (in each session's namespace) that QoS 1/2 messages a session drops go
    /// to, with the topic as routing key (session_dead_letters.rs); `None`: they are dropped.
    pub mqtt_dead_letter_address: Option<String>,
    /// The exchange MQTT topics are bridged to and from, RabbitMQ's `mqtt.exchange`
    /// (topic_exchange.rs); `None`: no bridge.
    pub mqtt_exchange: Option<String>,
    /// Whether streams double as MQTT topics of the same name (topic_streams.rs).
    pub mqtt_streams: bool,
    /// Whether every stream has an address of its name (AMQP's x-stream exchange).
    pub stream_exchanges: bool,
    /// Decoders of opaque batch formats, for readers that need records (MQTT forwarding).
    pub record_decoders: RecordDecoders,
    /// The shard this core serves in a cluster serving shards, and how the deployment places
    /// units (set by `cluster::shard_cores`); `None`: a single core holding every unit.
    pub placement: Option<Placement>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            default_partitions: 1,
            auto_create_streams: true,
            stream_defaults: StreamDefaults::default(),
            retention_check_interval: Duration::from_secs(300),
            producer_expiration: Duration::from_secs(7 * 24 * 3600),
            producer_snapshot_every: 50_000,
            group_initial_rebalance_delay: Duration::from_secs(3),
            session_max_queued: sessions::DEFAULT_MAX_QUEUED,
            queue_journal_compact_after: 16_384,
            transaction_max_timeout: transactions::DEFAULT_MAX_TIMEOUT,
            transaction_check_interval: Duration::from_secs(1),
            transactional_id_expiration: Duration::from_secs(7 * 24 * 3600),
            staged_outcome_retention: Duration::from_secs(3600),
            mqtt_dead_letter_address: None,
            mqtt_exchange: None,
            mqtt_streams: true,
            stream_exchanges: true,
            record_decoders: RecordDecoders::default(),
            placement: None,
        }
    }
}

/// A handle on the running core. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

struct Inner {
    log: Arc<dyn LogStore>,
    meta: Arc<dyn MetaStore>,
    /// The deployment's catalog (catalog.rs), for a core serving one shard of a cluster.
    catalog: Option<Arc<dyn MetaStore>>,
    config: CoreConfig,
    namespaces: RwLock<BTreeMap<String, NamespaceRecord>>,
    streams: RwLock<BTreeMap<(String, String), Arc<StreamHandle>>>,
    /// Serialises metadata changes (create/delete/alter) inside this process.
    admin: tokio::sync::Mutex<()>,
    groups: groups::GroupTable,
    broker: sessions::Broker,
    queues: queues::QueueTable,
    router: router::RouterTable,
    txns: transactions::TxnTable,
    timers_changed: Notify,
    /// One timer fires under its shard's lock: the timer loop and a staged commit that
    /// makes its writes at once never both do one.
    timer_locks: Vec<tokio::sync::Mutex<()>>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The forwarders of stream partitions (topic_streams.rs): awaited at shutdown so that
    /// each stores its last position.
    forwarders: Mutex<Vec<JoinHandle<()>>>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Core {
    /// Loads the metadata, recovers producer state and pending timers, and starts the
    /// background tasks (timers, retention).
    pub async fn open(
        log: Arc<dyn LogStore>,
        meta: Arc<dyn MetaStore>,
        config: CoreConfig,
    ) -> CoreResult<Self> {
        Self::open_with_catalog(log, meta, None, config).await
    }

    /// As [`Core::open`], for the core of one shard of a cluster: `catalog` is where it
    /// lists the namespaces it is the home of and finds the others' (catalog.rs).
    pub async fn open_in_shard(
        log: Arc<dyn LogStore>,
        meta: Arc<dyn MetaStore>,
        catalog: Arc<dyn MetaStore>,
        config: CoreConfig,
    ) -> CoreResult<Self> {
        Self::open_with_catalog(log, meta, Some(catalog), config).await
    }

    async fn open_with_catalog(
        log: Arc<dyn LogStore>,
        meta: Arc<dyn MetaStore>,
        catalog: Option<Arc<dyn MetaStore>>,
        config: CoreConfig,
    ) -> CoreResult<Self> {
        if config.default_partitions == 0 {
            return Err(CoreError::InvalidConfig(
                "default_partitions must be at least 1".into(),
            ));
        }
        // Both make every stream a unit of its namespace's home (an MQTT topic, an address
        // routing to it): not built across shards yet.
        if config.placement.is_some_and(|p| p.scheme == Scheme::Stream)
            && (config.mqtt_streams || config.stream_exchanges)
        {
            return Err(CoreError::InvalidConfig(
                "with streams spread over shards (placement scheme 'stream'), mqtt_streams and stream_exchanges must be off".into(),
            ));
        }
        let session_dead_letters = config
            .mqtt_dead_letter_address
            .as_ref()
            .map(|_| session_dead_letters::DeadLetterBuffer::new());
        let core = Self {
            inner: Arc::new(Inner {
                log,
                meta,
                catalog,
                groups: groups::GroupTable::new(config.group_initial_rebalance_delay),
                broker: sessions::Broker::new(
                    config.session_max_queued,
                    session_dead_letters.clone(),
                ),
                queues: queues::QueueTable::default(),
                router: router::RouterTable::default(),
                txns: transactions::TxnTable::default(),
                config,
                namespaces: RwLock::new(BTreeMap::new()),
                streams: RwLock::new(BTreeMap::new()),
                admin: tokio::sync::Mutex::new(()),
                timers_changed: Notify::new(),
                timer_locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
                shutdown: watch::channel(false).0,
                tasks: Mutex::new(Vec::new()),
                forwarders: Mutex::new(Vec::new()),
            }),
        };
        core.load_metadata().await?;
        core.recover_transactions().await?;
        core.recover_queues().await?;
        core.recover_router().await?;
        core.ensure_stream_addresses().await?;
        // Only now: an owner task may dead-letter into any queue or address.
        core.start_queue_tasks();
        core.recover_timers().await?;
        core.recover_sessions().await?;
        core.start_topic_forwarders();
        let timers = tokio::spawn(core.clone().run_timers());
        let sys = tokio::spawn(core.clone().run_sys_topics());
        let retention = tokio::spawn(core.clone().run_retention());
        let groups = tokio::spawn(core.clone().run_group_timeouts());
        let txns = tokio::spawn(core.clone().run_transaction_timeouts());
        core.inner
            .tasks
            .lock()
            .extend([timers, retention, groups, sys, txns]);
        if let (Some(buffer), Some(address)) = (
            session_dead_letters,
            core.inner.config.mqtt_dead_letter_address.clone(),
        ) {
            let task = tokio::spawn(core.clone().run_session_dead_letters(buffer, address));
            core.inner.tasks.lock().push(task);
        }
        info!(
            namespaces = core.inner.namespaces.read().len(),
            streams = core.inner.streams.read().len(),
            "core ready"
        );
        Ok(core)
    }

    pub fn config(&self) -> &CoreConfig {
        &self.inner.config
    }

    /// Stops background work, snapshots producer state and closes storage durably.
    pub async fn shutdown(&self) -> CoreResult<()> {
        if self.inner.shutdown.send_replace(true) {
            return Ok(());
        }
        self.stop_attached_sessions();
        let tasks: Vec<_> = self.inner.tasks.lock().drain(..).collect();
        for task in tasks {
            task.abort();
            // Returns once the task is gone, with the handle on the core it held.
            let _ = task.await;
        }
        // Together, within one deadline: each may be storing its position in a metadata
        // store that is gone.
        let forwarders: Vec<_> = self.inner.forwarders.lock().drain(..).collect();
        let count = forwarders.len();
        if tokio::time::timeout(
            Duration::from_secs(5),
            futures::future::join_all(forwarders),
        )
        .await
        .is_err()
        {
            warn!(
                forwarders = count,
                "the stream forwarders did not all stop within 5 s; a restart forwards again what they had not stored"
            );
        }
        let handles: Vec<_> = self.inner.streams.read().values().cloned().collect();
        for stream in handles {
            for part in stream.partitions() {
                if let Err(e) = self.write_producer_snapshot(&part).await {
                    warn!(partition = %part.key, error = %e, "could not snapshot producer state at shutdown");
                }
            }
        }
        self.inner.log.close().await?;
        info!("core shut down");
        Ok(())
    }

    fn check_running(&self) -> CoreResult<()> {
        if *self.inner.shutdown.borrow() {
            return Err(CoreError::ShuttingDown);
        }
        Ok(())
    }
}
