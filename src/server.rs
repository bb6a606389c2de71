//! Starting and stopping the processes: standalone (core + gateways), core alone, one gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{debug, error, info, warn};
use tributary_core::cluster::shard_cores::{
    OnOpen, ShardCores, ShardStorage, shard_catalog, shard_meta_prefix, shard_of,
};
use tributary_core::cluster::shard_router::{ShardOwners, ShardRouter};
use tributary_core::cluster::shards::{ShardConfig, ShardLease, ShardNode};
use tributary_core::cluster::{LeaseConfig, NodeLease};
use tributary_core::{Core, CoreConfig, CoreError, StreamDefaults};
use tributary_gateway_amqp::AmqpConfig;
use tributary_gateway_common::client::LocalCall;
use tributary_gateway_common::tls::{self, Acceptor, CertSource, ClientCerts};
use tributary_gateway_common::{
    ConnectError, Connections, CoreClient, Gateway, Handshake, ListenError, Listener, Plain, bind,
};
use tributary_gateway_kafka::KafkaConfig;
use tributary_gateway_mqtt::MqttConfig;
use tributary_proto::v1;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::memory::{MemoryLogStore, MemoryMetaStore};
use tributary_storage::object_log::{
    AckPoint as ObjectAck, ObjectLogConfig, ObjectLogStore, WriteGuard,
};
use tributary_storage::redb_meta::RedbMetaStore;
use tributary_storage::routed::{Backend, RoutedLogStore};
use tributary_storage::{EtcdMetaStore, MysqlMetaStore, PostgresMetaStore, RedisMetaStore};
use tributary_storage::{LogStore, MetaStore, PrefixedMetaStore, StorageError};

use crate::admin::{self, AdminState};
use crate::auth::{CoreAuthLayer, Guard, beyond_loopback};
use crate::config::{Listen, MetaKind, Settings, StorageKind};
use tributary_gateway_common::users::UserDirectory;

/// Protocols whose gateway ships in this build.
pub const AVAILABLE_GATEWAYS: &[&str] = &[
    "kafka",
    "kafka-tls",
    "mqtt",
    "mqtt-ws",
    "mqtt-tls",
    "mqtt-wss",
    "amqp",
    "amqp-tls",
    "sqs",
    "rocketmq",
    "rocketmq-namesrv",
];
/// Protocols a gateway is planned for.
pub const KNOWN_GATEWAYS: &[&str] = &["kafka", "mqtt", "amqp", "sqs", "rocketmq"];

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot use data directory {path}: {source}; fix its permissions or choose another --data-dir"
    )]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Lease(#[from] tributary_core::cluster::LeaseError),
    #[error("{0}")]
    Shards(#[from] tributary_core::cluster::shards::ShardError),
    #[error("{0}")]
    Listen(#[from] ListenError),
    #[error("{0}")]
    Core(#[from] CoreError),
    #[error("{0}")]
    Unavailable(String),
    #[error("mqtt_stream_rules: {0}")]
    MqttStreamRule(String),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Tls(#[from] tributary_gateway_common::tls::TlsError),
    /// A listener beyond loopback without authentication, or a core that refused us.
    #[error("{0}")]
    Unauthenticated(String),
}

/// Where a running server's listeners ended up (port 0 resolved).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub core: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub kafka: Option<SocketAddr>,
    pub kafka_tls: Option<SocketAddr>,
    pub mqtt: Option<SocketAddr>,
    pub mqtt_ws: Option<SocketAddr>,
    pub mqtt_tls: Option<SocketAddr>,
    pub mqtt_wss: Option<SocketAddr>,
    pub amqp: Option<SocketAddr>,
    pub amqp_tls: Option<SocketAddr>,
    pub sqs: Option<SocketAddr>,
    pub rocketmq: Option<SocketAddr>,
    pub rocketmq_namesrv: Option<SocketAddr>,
}

/// What the process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Standalone,
    CoreOnly,
    /// One gateway in front of the core at `--core`.
    Gateway(String),
}

/// A started server; [`Server::shutdown`] stops it cleanly.
pub struct Server {
    pub bound: Bound,
    /// `None` for a gateway process: its core is elsewhere.
    core: Option<Core>,
    /// Cluster mode: the lease this node serves under, released on a clean stop.
    lease: Option<Arc<NodeLease>>,
    /// Cluster mode with shards: this node's share, given up on a clean stop.
    shards: Option<ShardNode>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The two stores the core runs on.
type Stores = (Arc<dyn LogStore>, Arc<dyn MetaStore>);

/// What a cluster node's storage is opened with: the metadata store as its lease fences it,
/// and the lease itself, asked before every object write.
struct ClusterStorage {
    meta: Arc<dyn MetaStore>,
    guard: WriteGuard,
    /// The lease's fencing epoch, stamped on the object-store log's WAL objects.
    epoch: u64,
}

async fn open_storage(
    settings: &Settings,
    cluster: Option<ClusterStorage>,
) -> Result<Stores, StartError> {
    let (cluster_meta, write_guard, epoch) = match cluster {
        Some(c) => (Some(c.meta), Some(c.guard), c.epoch),
        None => (None, None, 0),
    };
    if settings.storage == StorageKind::Memory {
        let log = RoutedLogStore::open(vec![Backend {
            name: "memory".into(),
            store: Arc::new(MemoryLogStore::new()),
        }])
        .await?;
        return Ok((log, Arc::new(MemoryMetaStore::new())));
    }
    // Remote stores are reached before anything is written locally: a server that cannot
    // reach one exits with nothing changed.
    let object_store = match &settings.opendal {
        None => None,
        Some(o) => Some((
            o,
            ObjectLogStore::operator(&o.scheme, o.options.clone(), &o.describe()).await?,
        )),
    };
    let remote_meta = match (cluster_meta, settings.meta.kind) {
        (Some(fenced), _) => Some(fenced),
        (None, MetaKind::Redb) => None,
        (None, _) => Some(open_meta(settings).await?),
    };
    let dir = &settings.data_dir;
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::read_dir(dir).map(|_| ()))
        .map_err(|source| StartError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    let meta = match remote_meta {
        Some(meta) => meta,
        None => open_meta(settings).await?,
    };
    let local = LocalLogConfig {
        segment_bytes: settings.segment_bytes,
        fsync: settings.fsync,
        ..Default::default()
    };
    // The local log is always a backend; with an [opendal] table the object store is one
    // too, and `storage` says which is the default (streams and queues may name the other).
    // A cluster node has no local backend: what it holds, a successor could not read.
    let mut backends = Vec::new();
    if settings.cluster.is_none() {
        backends.push(Backend {
            name: "local".into(),
            store: LocalLogStore::open(dir.join("log"), local.clone())?,
        });
    }
    if let Some((o, op)) = object_store {
        if settings.cluster.is_some() {
            clear_cache(&o.cache_dir)?;
        }
        if o.ack == ObjectAck::Shared && settings.meta.kind == MetaKind::Redb {
            warn!(
                "opendal_ack = shared keeps every acknowledged record in the object store, but meta = redb keeps the streams' metadata in {}: a server started on an empty data directory finds no streams (use meta = etcd, postgres, mysql or redis)",
                dir.display()
            );
        }
        let config = ObjectLogConfig {
            ack: o.ack,
            upload_interval: o.upload_interval,
            seal_interval: o.seal_interval,
            cache: local,
            write_guard,
            epoch,
            ..Default::default()
        };
        let object = Backend {
            name: "opendal".into(),
            store: ObjectLogStore::open(op, o.describe(), &o.cache_dir, config).await?,
        };
        if settings.storage == StorageKind::Opendal {
            backends.insert(0, object);
        } else {
            backends.push(object);
        }
    }
    let log: Arc<dyn LogStore> = RoutedLogStore::open(backends).await?;
    Ok((log, meta))
}

/// The core's settings, for the one core of a server or each shard's core of a cluster node.
fn core_config(settings: &Settings) -> CoreConfig {
    CoreConfig {
        default_partitions: settings.default_partitions,
        auto_create_streams: settings.auto_create_streams,
        stream_defaults: StreamDefaults {
            retention_ms: settings.retention_ms,
            retention_bytes: settings.retention_bytes,
            max_message_bytes: settings.max_message_bytes,
        },
        retention_check_interval: settings.retention_check_interval,
        group_initial_rebalance_delay: settings.group_initial_rebalance_delay,
        transaction_max_timeout: settings.transaction_max_timeout,
        session_max_queued: settings.mqtt_max_queued,
        mqtt_dead_letter_address: settings.mqtt_dead_letter_address.clone(),
        mqtt_exchange: settings.mqtt_exchange.clone(),
        mqtt_streams: settings.mqtt_streams,
        stream_exchanges: settings.stream_exchanges,
        record_decoders: record_decoders(),
        ..CoreConfig::default()
    }
}

/// Serves `routes` on the core gRPC listener until `stop`. Only this network listener checks
/// the token: the in-process clients of the standalone gateways are the server itself.
fn spawn_core_grpc(
    settings: &Settings,
    listener: TcpListener,
    routes: tonic::service::Routes,
    certs: &Option<Arc<CertSource>>,
    stop: &watch::Sender<bool>,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    let auth = CoreAuthLayer(
        settings
            .core_token
            .clone()
            .map(|token| Guard::new("core", token)),
    );
    let core_tls = match (certs, settings.core_tls) {
        (Some(certs), true) => {
            let clients = match &settings.core_tls_client_ca {
                Some(ca) => ClientCerts::Required(ca.clone()),
                None => ClientCerts::None,
            };
            Some(tls::acceptor_for(certs, &clients, &[b"h2"])?)
        }
        _ => None,
    };
    // With client certificates required the TLS handshake authenticates every caller; a
    // token, when one is configured too, is still required on top (both must hold), so adding
    // mTLS never weakens a token deployment.
    let mut stop_rx = stop.subscribe();
    Ok(tokio::spawn(async move {
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_adaptive_window(Some(true))
            .layer(auth)
            .add_routes(routes);
        let shutdown = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        let served = match core_tls {
            Some(acceptor) => {
                let incoming = tls::incoming(listener, acceptor, CORE_TLS_HANDSHAKE, "core-tls");
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            None => {
                let incoming = TcpListenerStream::new(listener);
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        };
        if let Err(e) = served {
            error!(error = %e, "core gRPC server failed");
        }
    }))
}

/// Each shard's storage on a cluster node serving shards: its objects under
/// `<root>/shards/<shard>` of the object store, its cache under the cache directory's
/// `shards/<shard>` (emptied when the shard is taken: what an earlier term cached is stale),
/// its metadata under the shard's prefix, fenced by its epoch.
struct ObjectShards {
    opendal: crate::config::OpendalSettings,
    meta: Arc<dyn MetaStore>,
    cache: LocalLogConfig,
}

#[async_trait::async_trait]
impl ShardStorage for ObjectShards {
    async fn open(
        &self,
        lease: &ShardLease,
    ) -> Result<(Arc<dyn LogStore>, Arc<dyn MetaStore>), String> {
        let shard = lease.shard();
        let o = &self.opendal;
        let mut options = o.options.clone();
        let root = options
            .iter()
            .find(|(k, _)| k == "root")
            .map_or("", |(_, v)| v.as_str())
            .trim_end_matches('/')
            .to_string();
        let shard_root = format!("{root}/shards/{shard:06}");
        if o.scheme == "fs" {
            std::fs::create_dir_all(&shard_root).map_err(|e| format!("{shard_root}: {e}"))?;
        }
        options.retain(|(k, _)| k != "root");
        options.push(("root".into(), shard_root));
        let name = format!("{} shard {shard}", o.describe());
        let op = ObjectLogStore::operator(&o.scheme, options, &name)
            .await
            .map_err(|e| e.to_string())?;
        let cache_dir = o.cache_dir.join(format!("shards/{shard:06}"));
        clear_cache(&cache_dir).map_err(|e| e.to_string())?;
        let config = ObjectLogConfig {
            ack: o.ack,
            upload_interval: o.upload_interval,
            seal_interval: o.seal_interval,
            cache: self.cache.clone(),
            write_guard: Some(WriteGuard(Arc::new(lease.holds()))),
            epoch: lease.epoch(),
            ..Default::default()
        };
        let store = ObjectLogStore::open(op, name, &cache_dir, config)
            .await
            .map_err(|e| e.to_string())?;
        let log: Arc<dyn LogStore> = RoutedLogStore::open(vec![Backend {
            name: "opendal".into(),
            store,
        }])
        .await
        .map_err(|e| e.to_string())?;
        let meta: Arc<dyn MetaStore> = Arc::new(PrefixedMetaStore::new(
            lease.fenced(self.meta.clone()),
            shard_meta_prefix(shard),
        ));
        Ok((log, meta))
    }

    fn catalog(&self, lease: &ShardLease) -> Arc<dyn MetaStore> {
        shard_catalog(self.meta.clone(), lease)
    }
}

/// A cluster node's cache may hold what it wrote in an earlier term as active node; others
/// have written since, and the object store has every acknowledged record, so the cache
/// starts empty each term.
fn clear_cache(dir: &std::path::Path) -> Result<(), StartError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StartError::DataDir {
            path: dir.display().to_string(),
            source,
        }),
    }
}

/// The cluster lease of a node whose start is under way (see [`Server::start`]).
#[derive(Clone, Default)]
pub struct LeaseSlot(Arc<std::sync::Mutex<Option<Arc<NodeLease>>>>);

impl LeaseSlot {
    /// Gives up the lease taken by a start that is abandoned (a stop while the core opens),
    /// so that a standby takes over at once instead of after a whole TTL. Anything the
    /// abandoned start still writes is fenced from then on.
    pub async fn release(&self) {
        let lease = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(lease) = lease {
            lease.release().await;
        }
    }
}

/// Cluster mode: waits, standing by, until this node holds the cluster lease, then keeps it.
/// Losing it ends the process (exit code 3): a node that may no longer own the data must stop
/// acknowledging at once, and a fresh start stands by again.
async fn acquire_lease(
    settings: &Settings,
    cluster: &crate::config::ClusterSettings,
) -> Result<(Arc<NodeLease>, ClusterStorage), StartError> {
    let meta = open_meta(settings).await?;
    let on_lost: tributary_core::cluster::OnLost = Arc::new(|why: &str| {
        error!("cluster: {why}; exiting so that another node serves");
        eprintln!("error: cluster: {why}; exiting so that another node serves");
        std::process::exit(3);
    });
    let node = cluster.node.clone();
    let lease = NodeLease::acquire(
        meta.clone(),
        LeaseConfig {
            node: cluster.node.clone(),
            ttl: cluster.lease_ttl,
        },
        on_lost,
        move |leader| match leader {
            Some(l) => info!(node = %node, active = %l, "cluster: standing by"),
            None => info!(node = %node, "cluster: standing by"),
        },
    )
    .await?;
    lease.keep();
    info!(node = %cluster.node, epoch = lease.leader().epoch, "cluster: this node is active");
    let storage = ClusterStorage {
        meta: lease.fenced(meta),
        guard: WriteGuard(Arc::new(lease.holds())),
        epoch: lease.leader().epoch,
    };
    Ok((Arc::new(lease), storage))
}

async fn open_meta(settings: &Settings) -> Result<Arc<dyn MetaStore>, StartError> {
    let m = &settings.meta;
    let url = m.url.as_deref().unwrap_or_default();
    let ns = &m.namespace;
    Ok(match m.kind {
        MetaKind::Redb => Arc::new(RedbMetaStore::open(settings.data_dir.join("meta.redb"))?),
        MetaKind::Etcd => Arc::new(EtcdMetaStore::connect(url, ns).await?),
        MetaKind::Postgres => Arc::new(PostgresMetaStore::connect(url, ns).await?),
        MetaKind::Mysql => Arc::new(MysqlMetaStore::connect(url, ns).await?),
        MetaKind::Redis => Arc::new(RedisMetaStore::connect(url, ns).await?),
    })
}

async fn bind_listen(
    listen: Listen,
    what: &str,
    flag: &str,
) -> Result<Option<TcpListener>, StartError> {
    match listen.addr() {
        None => Ok(None),
        Some(addr) => Ok(Some(bind(addr, what, flag).await?)),
    }
}

impl Server {
    /// Binds every listener first (so a port in use fails before any data is touched), then
    /// opens storage and the core, then starts serving.
    /// Starts every part `mode` runs. A cluster node puts its lease in `lease_slot` as soon as
    /// it holds it, so that a stop arriving while the core is still opening can give it up.
    pub async fn start(
        settings: &Settings,
        mode: Mode,
        lease_slot: &LeaseSlot,
    ) -> Result<Self, StartError> {
        match &mode {
            Mode::Standalone => warn_open_kafka(settings),
            Mode::Gateway(protocol) if protocol == "kafka" => warn_open_kafka(settings),
            Mode::Gateway(_) | Mode::CoreOnly => {}
        }
        if let Mode::Gateway(protocol) = &mode {
            return Self::start_gateway(settings, protocol).await;
        }
        check_exposure(settings, true)?;
        let certs = load_certs(settings)?;
        if let Some(cluster) = &settings.cluster
            && let Some(shards) = cluster.shards
            && mode == Mode::CoreOnly
        {
            return Self::start_shards(settings, certs, cluster, shards).await;
        }
        // A standby binds nothing: gateways find the active node as the one that answers.
        let (lease, cluster_storage) = match &settings.cluster {
            Some(cluster) if mode == Mode::CoreOnly => {
                let (lease, storage) = acquire_lease(settings, cluster).await?;
                *lease_slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease.clone());
                (Some(lease), Some(storage))
            }
            _ => (None, None),
        };
        let started = Self::start_core(settings, mode, certs, cluster_storage, lease.clone()).await;
        if started.is_err()
            && let Some(lease) = &lease
        {
            lease.release().await;
        }
        started
    }

    async fn start_core(
        settings: &Settings,
        mode: Mode,
        certs: Option<Arc<CertSource>>,
        cluster_storage: Option<ClusterStorage>,
        lease: Option<Arc<NodeLease>>,
    ) -> Result<Self, StartError> {
        let core_listener =
            bind_listen(settings.core_listen, "the core gRPC API", "--core-listen").await?;
        let admin_listener = bind_listen(
            settings.admin_listen,
            "the admin HTTP API",
            "--admin-listen",
        )
        .await?;
        if mode == Mode::Standalone {
            let missing: Vec<_> = settings
                .gateway_listeners()
                .into_iter()
                .filter(|(protocol, _, listen)| {
                    *listen != Listen::Off && !AVAILABLE_GATEWAYS.contains(protocol)
                })
                .map(|(_, flag, _)| flag)
                .collect();
            if !missing.is_empty() {
                info!(
                    "gateways not in this build yet, so these listeners are not opened: {}",
                    missing.join(" ")
                );
            }
        }

        let kafka_listeners = match mode {
            Mode::Standalone => Some(bind_kafka(settings, certs.as_ref()).await?),
            _ => None,
        };
        let mqtt_listeners = match mode {
            Mode::Standalone => Some(bind_mqtt(settings, certs.as_ref()).await?),
            _ => None,
        };
        let amqp_listeners = match mode {
            Mode::Standalone => Some(bind_amqp(settings, certs.as_ref()).await?),
            _ => None,
        };
        let sqs_listener = match mode {
            Mode::Standalone => bind_sqs(settings).await?,
            _ => None,
        };
        let rocketmq_listeners = match mode {
            Mode::Standalone => Some(bind_rocketmq(settings).await?),
            _ => None,
        };
        let (log, meta) = open_storage(settings, cluster_storage).await?;
        let config = core_config(settings);
        let core = Core::open(log, meta, config).await?;
        if mode == Mode::Standalone {
            // The gateways in this process serve it: made before they listen.
            core.create_namespace(&settings.gateway_namespace, Default::default(), true)
                .await?;
        }
        declare_mqtt_rules(&core, &settings.mqtt_stream_rules)
            .await
            .map_err(StartError::MqttStreamRule)?;
        let (stop, _) = watch::channel(false);
        let connections = Connections::new();
        let ready = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut bound = Bound::default();
        if let Some(certs) = &certs {
            tasks.push(spawn_cert_reload(settings, certs.clone(), &stop));
        }

        if let Some(listener) = core_listener {
            let addr = listener.local_addr().ok();
            bound.core = addr;
            let routes = tributary_core::grpc::routes(core.clone());
            tasks.push(spawn_core_grpc(settings, listener, routes, &certs, &stop)?);
        }
        if let Some(listener) = admin_listener {
            bound.admin = listener.local_addr().ok();
            let state = AdminState {
                core: core.clone(),
                ready: ready.clone(),
                prometheus: admin::prometheus(),
                users: Arc::new(settings.users.names()),
                connections: connections.clone(),
            };
            let router = admin::router(state, admin_auth(settings));
            spawn_admin(
                settings,
                listener,
                router,
                certs.as_ref(),
                &stop,
                &mut tasks,
            )?;
        }
        if let Some(listeners) = kafka_listeners
            && (listeners.tcp.is_some() || listeners.tls.is_some())
        {
            let client = CoreClient::in_process(tributary_core::grpc::routes(core.clone()));
            spawn_kafka(
                settings,
                listeners,
                client,
                &mut spawn(&stop, &mut tasks, &connections),
                &mut bound,
            )?;
        }
        if let Some(listeners) = mqtt_listeners
            && (listeners.tcp.is_some()
                || listeners.ws.is_some()
                || listeners.tls.is_some()
                || listeners.wss.is_some())
        {
            let client = CoreClient::in_process(tributary_core::grpc::routes(core.clone()))
                .with_local_sessions(Arc::new(CoreSessions(core.clone())));
            spawn_mqtt(
                settings,
                listeners,
                client,
                &mut spawn(&stop, &mut tasks, &connections),
                &mut bound,
            );
        }
        if let Some(listeners) = amqp_listeners
            && (listeners.tcp.is_some() || listeners.tls.is_some())
        {
            let client = CoreClient::in_process(tributary_core::grpc::routes(core.clone()))
                .with_local_queues(Arc::new(CoreQueues(core.clone())));
            spawn_amqp(
                settings,
                listeners,
                client,
                &mut spawn(&stop, &mut tasks, &connections),
                &mut bound,
            );
        }
        if let Some(listener) = sqs_listener {
            let client = CoreClient::in_process(tributary_core::grpc::routes(core.clone()))
                .with_local_queues(Arc::new(CoreQueues(core.clone())));
            spawn_sqs(
                settings,
                listener,
                client,
                &mut spawn(&stop, &mut tasks, &connections),
                &mut bound,
            );
        }
        if let Some(listeners) = rocketmq_listeners
            && (listeners.broker.is_some() || listeners.namesrv.is_some())
        {
            let client = CoreClient::in_process(tributary_core::grpc::routes(core.clone()));
            spawn_rocketmq(
                settings,
                listeners,
                client,
                &mut spawn(&stop, &mut tasks, &connections),
                &mut bound,
            );
        }
        // Every listener is bound and its accept loop is spawned: connections are queued by
        // the kernel from bind on and served as soon as the loops run.
        ready.store(true, Ordering::Release);
        Ok(Self {
            bound,
            core: Some(core),
            lease,
            shards: None,
            stop,
            tasks,
        })
    }

    /// A cluster node serving shards: its core gRPC listener is bound at once and answers for
    /// the shards this node holds (each by a core of its own, on its own storage), UNAVAILABLE
    /// for the others; gateways find each namespace's node by that answer.
    async fn start_shards(
        settings: &Settings,
        certs: Option<Arc<CertSource>>,
        cluster: &crate::config::ClusterSettings,
        shards: u32,
    ) -> Result<Self, StartError> {
        let scheme = cluster.scheme;
        let Some(core_listener) =
            bind_listen(settings.core_listen, "the core gRPC API", "--core-listen").await?
        else {
            return Err(StartError::Unavailable(
                "a cluster node serving shards is reached only through its core gRPC API: give --core-listen HOST:PORT".into(),
            ));
        };
        let admin_listener = bind_listen(
            settings.admin_listen,
            "the admin HTTP API",
            "--admin-listen",
        )
        .await?;
        let Some(opendal) = settings.opendal.clone() else {
            return Err(StartError::Unavailable(
                "cluster mode needs an [opendal] table".into(),
            ));
        };
        let meta = open_meta(settings).await?;
        let storage = ObjectShards {
            opendal,
            meta: meta.clone(),
            cache: LocalLogConfig {
                segment_bytes: settings.segment_bytes,
                fsync: settings.fsync,
                ..Default::default()
            },
        };
        // Each shard's core declares the configured rules of its namespaces when it opens.
        let rules = Arc::new(settings.mqtt_stream_rules.clone());
        let on_open: OnOpen = Arc::new(move |core, shard| {
            let ours: Vec<_> = rules
                .iter()
                .filter(|(ns, _, _)| shard_of(ns, shards) == shard)
                .cloned()
                .collect();
            Box::pin(async move { declare_mqtt_rules(&core, &ours).await })
        });
        let cores = Arc::new(
            ShardCores::new(Arc::new(storage), core_config(settings), shards, scheme)
                .with_on_open(on_open),
        );
        let on_lost: tributary_core::cluster::OnLost = Arc::new(|why: &str| {
            error!("cluster: {why}; exiting so that other nodes serve its shards");
            eprintln!("error: cluster: {why}; exiting so that other nodes serve its shards");
            std::process::exit(3);
        });
        let node = ShardNode::join(
            meta,
            ShardConfig {
                node: cluster.node.clone(),
                shards,
                scheme,
                ttl: cluster.lease_ttl,
            },
            cores.clone(),
            on_lost,
        )
        .await?;
        node.start();
        info!(node = %cluster.node, run = node.run(), shards, "cluster: serving a share of the shards");
        let owners: ShardOwners = Arc::new(node.owners());
        let router = ShardRouter::new(&cluster.node, cores.clone(), shards, scheme, owners.clone());
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut bound = Bound {
            core: core_listener.local_addr().ok(),
            ..Bound::default()
        };
        if let Some(certs) = &certs {
            tasks.push(spawn_cert_reload(settings, certs.clone(), &stop));
        }
        tasks.push(spawn_core_grpc(
            settings,
            core_listener,
            router.into_routes(),
            &certs,
            &stop,
        )?);
        if let Some(listener) = admin_listener {
            bound.admin = listener.local_addr().ok();
            let state = admin::shards::ShardAdminState {
                node: cluster.node.clone(),
                shards,
                cores,
                owners,
                // Joined: the node serves (its share grows as the leases spread).
                ready: Arc::new(AtomicBool::new(true)),
                prometheus: admin::prometheus(),
                users: Arc::new(settings.users.names()),
            };
            let router = admin::shards::router(state, admin_auth(settings));
            spawn_admin(
                settings,
                listener,
                router,
                certs.as_ref(),
                &stop,
                &mut tasks,
            )?;
        }
        Ok(Self {
            bound,
            core: None,
            lease: None,
            shards: Some(node),
            stop,
            tasks,
        })
    }

    /// `tributary gateway <protocol>`: the gateway alone, its core reached over gRPC.
    async fn start_gateway(settings: &Settings, protocol: &str) -> Result<Self, StartError> {
        let client = CoreClient::connect_lazy_with(
            &settings.core,
            settings.core_token.as_ref().map(|t| t.expose()),
            core_client_tls(settings)?.as_ref(),
        )?;
        // A gateway process has no core listener: only its admin listener is checked.
        check_exposure(settings, false)?;
        // Bound first, like every listener: a port in use stops the start before anything
        // is served.
        let admin_listener = bind_listen(
            settings.admin_listen,
            "the gateway's admin HTTP API",
            "--admin-listen",
        )
        .await?;
        probe_core(settings, &client).await?;
        let certs = load_certs(settings)?;
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        // AMQP clients name their namespace (the virtual host); the others serve this one.
        if protocol != "amqp" {
            tasks.push(spawn_ensure_namespace(settings, &client, &stop));
        }
        let connections = Connections::new();
        let ready = Arc::new(AtomicBool::new(false));
        let mut bound = Bound::default();
        if let Some(certs) = &certs {
            tasks.push(spawn_cert_reload(settings, certs.clone(), &stop));
        }
        match protocol {
            "kafka" => {
                let listeners = bind_kafka(settings, certs.as_ref()).await?;
                if listeners.tcp.is_none() && listeners.tls.is_none() {
                    return Err(StartError::Unavailable(
                        "every Kafka listener is off: give --kafka-listen or --kafka-tls-listen HOST:PORT".into(),
                    ));
                }
                spawn_kafka(
                    settings,
                    listeners,
                    client,
                    &mut spawn(&stop, &mut tasks, &connections),
                    &mut bound,
                )?;
            }
            "mqtt" => {
                let listeners = bind_mqtt(settings, certs.as_ref()).await?;
                if listeners.tcp.is_none()
                    && listeners.ws.is_none()
                    && listeners.tls.is_none()
                    && listeners.wss.is_none()
                {
                    return Err(StartError::Unavailable(
                        "every MQTT listener is off: give --mqtt-listen, --mqtt-ws-listen, --mqtt-tls-listen or --mqtt-wss-listen HOST:PORT".into(),
                    ));
                }
                spawn_mqtt(
                    settings,
                    listeners,
                    client,
                    &mut spawn(&stop, &mut tasks, &connections),
                    &mut bound,
                );
            }
            "amqp" => {
                let listeners = bind_amqp(settings, certs.as_ref()).await?;
                if listeners.tcp.is_none() && listeners.tls.is_none() {
                    return Err(StartError::Unavailable(
                        "every AMQP listener is off: give --amqp-listen or --amqp-tls-listen HOST:PORT".into(),
                    ));
                }
                spawn_amqp(
                    settings,
                    listeners,
                    client,
                    &mut spawn(&stop, &mut tasks, &connections),
                    &mut bound,
                );
            }
            "sqs" => {
                let Some(listener) = bind_sqs(settings).await? else {
                    return Err(StartError::Unavailable(
                        "the SQS listener is off: give --sqs-listen HOST:PORT".into(),
                    ));
                };
                spawn_sqs(
                    settings,
                    listener,
                    client,
                    &mut spawn(&stop, &mut tasks, &connections),
                    &mut bound,
                );
            }
            "rocketmq" => {
                let listeners = bind_rocketmq(settings).await?;
                if listeners.broker.is_none() && listeners.namesrv.is_none() {
                    return Err(StartError::Unavailable(
                        "every RocketMQ listener is off: give --rocketmq-listen or --namesrv-listen HOST:PORT".into(),
                    ));
                }
                spawn_rocketmq(
                    settings,
                    listeners,
                    client,
                    &mut spawn(&stop, &mut tasks, &connections),
                    &mut bound,
                );
            }
            _ => return Err(gateway_unavailable(protocol)),
        }
        // The connections are here, not in the core, and so are this process's metrics: a
        // gateway process serves them on an admin listener of its own.
        if let Some(listener) = admin_listener {
            bound.admin = listener.local_addr().ok();
            let state = admin::GatewayAdminState {
                ready: ready.clone(),
                prometheus: admin::prometheus(),
                connections: connections.clone(),
            };
            let router = admin::gateway_router(state, admin_auth(settings));
            spawn_admin(
                settings,
                listener,
                router,
                certs.as_ref(),
                &stop,
                &mut tasks,
            )?;
        }
        ready.store(true, Ordering::Release);
        info!(core = %settings.core, "{protocol} gateway started");
        Ok(Self {
            bound,
            core: None,
            lease: None,
            shards: None,
            stop,
            tasks,
        })
    }

    pub fn core(&self) -> Option<&Core> {
        self.core.as_ref()
    }

    /// Stops accepting, lets in-flight requests finish (bounded), then flushes and fsyncs
    /// storage. Returns once the data directory is closed cleanly.
    pub async fn shutdown(self) -> Result<(), StartError> {
        self.stop.send_replace(true);
        // Each shard's core flushes and its shard is released, for the other nodes to take.
        if let Some(node) = &self.shards {
            node.leave().await;
        }
        // Shutting the core down first wakes long-polling fetches so the servers can drain.
        let closed = match &self.core {
            Some(core) => core.shutdown().await,
            None => Ok(()),
        };
        // Released once the core has flushed and takes no more writes, not after the
        // connections drain (up to 5 s more): a successor reads what this node acknowledged,
        // and clients wait on the takeover no longer than needed.
        if let Some(lease) = &self.lease {
            lease.release().await;
        }
        let aborts: Vec<_> = self.tasks.iter().map(|t| t.abort_handle()).collect();
        let drain = futures_join_all(self.tasks);
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            warn!("some connections were still open after 5 s; closing them");
            // An aborted accept loop aborts the connection tasks it holds, closing them.
            for t in aborts {
                t.abort();
            }
        }
        closed?;
        Ok(())
    }
}

/// The admin listener's rule: writes always need the token; beyond loopback reads too
/// (without a token, `check_exposure` let it start only with core_insecure, and then reads
/// stay open).
fn admin_auth(settings: &Settings) -> Arc<admin::AdminAuth> {
    let reads_need_token =
        settings.core_token.is_some() && settings.admin_listen.addr().is_some_and(beyond_loopback);
    admin::AdminAuth::new(settings.core_token.clone(), reads_need_token)
}

/// Serves the admin routes on their bound listener until `stop`: HTTPS with `admin_tls`,
/// else plain HTTP.
fn spawn_admin(
    settings: &Settings,
    listener: TcpListener,
    router: axum::Router,
    certs: Option<&Arc<CertSource>>,
    stop: &watch::Sender<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), StartError> {
    if let (Some(certs), true) = (certs, settings.admin_tls) {
        let acceptor = tls::acceptor_for(certs, &ClientCerts::None, &[b"h2", b"http/1.1"])?;
        tasks.push(tokio::spawn(admin::serve_tls(
            listener,
            acceptor,
            router,
            stop.subscribe(),
        )));
    } else {
        let app = router.into_make_service_with_connect_info::<SocketAddr>();
        let mut stop_rx = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                error!(error = %e, "admin HTTP server failed");
            }
        }));
    }
    Ok(())
}

/// A Kafka listener that lets clients in without SASL and was asked to listen beyond
/// loopback (its default is loopback then): one WARN naming the way out. MQTT warns for
/// its anonymous listeners itself ([`MqttConfig::warn_if_anonymous_beyond_loopback`]); AMQP
/// always authenticates (its guest user only from loopback, as RabbitMQ).
fn warn_open_kafka(settings: &Settings) {
    if settings.kafka_sasl {
        return;
    }
    for (key, listen) in [
        ("kafka_listen", settings.kafka_listen),
        ("kafka_tls_listen", settings.kafka_tls_listen),
    ] {
        if let Some(addr) = listen.addr().filter(|a| beyond_loopback(*a)) {
            warn!(
                listener = key,
                %addr,
                "{key} = {addr} lets anyone who reaches it in without credentials: set kafka_sasl = true with [[users]], or listen on loopback"
            );
        }
    }
}

/// How long a client of the core's TLS listener has for its handshake.
const CORE_TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// The certificate every TLS listener of the process serves, if one is configured.
fn load_certs(settings: &Settings) -> Result<Option<Arc<CertSource>>, StartError> {
    match &settings.tls {
        Some((cert, key)) => Ok(Some(CertSource::load(cert, key)?)),
        None => Ok(None),
    }
}

/// Reloads the certificate on SIGHUP, and when its files change (checked every
/// `tls_reload_interval`): new handshakes on every TLS listener get the new one, open
/// connections keep theirs. A certificate that fails to load is logged and counted, and the
/// one in use stays.
fn spawn_cert_reload(
    settings: &Settings,
    certs: Arc<CertSource>,
    stop: &watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    let interval = settings.tls_reload_interval;
    let mut stop_rx = stop.subscribe();
    // Registered before the server reports ready, not in the task: a SIGHUP that came before
    // the handler would end the process (the signal's default action).
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; the TLS certificate reloads only when its files change");
            None
        }
    };
    tokio::spawn(async move {
        let mut tick = interval.map(|every| {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        loop {
            let reloaded = tokio::select! {
                _ = stop_rx.wait_for(|s| *s) => return,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => certs.reload().map(|()| Some("SIGHUP")),
                _ = async {
                    match tick.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => certs.reload_if_changed().map(|changed| changed.then_some("file change")),
            };
            let (cert, _) = certs.paths();
            match reloaded {
                Ok(None) => {}
                Ok(Some(why)) => {
                    metrics::counter!("tributary_tls_reloads_total", "result" => "ok").increment(1);
                    info!(cert = %cert.display(), "TLS certificate reloaded ({why})");
                }
                Err(e) => {
                    metrics::counter!("tributary_tls_reloads_total", "result" => "error")
                        .increment(1);
                    error!(error = %e, "TLS certificate not reloaded; the one in use stays");
                }
            }
        }
    })
}

/// The TLS a gateway process uses to reach a core at an `https://` address.
pub fn core_client_tls(
    settings: &Settings,
) -> Result<Option<tributary_gateway_common::client::CoreTls>, StartError> {
    if !settings.core.starts_with("https://") {
        let tls = &settings.core_client_tls;
        if tls.ca.is_some() || tls.identity.is_some() {
            warn!(core = %settings.core, "core_ca / core_client_cert are set but the core address is http://: they are not used and the core token travels in clear text; use https://");
        }
        return Ok(None);
    }
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            StartError::Unavailable(format!("cannot read {what} {}: {e}", path.display()))
        })
    };
    let tls = &settings.core_client_tls;
    Ok(Some(tributary_gateway_common::client::CoreTls {
        ca_pem: tls.ca.as_deref().map(|p| read("core_ca", p)).transpose()?,
        identity_pem: match &tls.identity {
            Some((cert, key)) => Some((
                read("core_client_cert", cert)?,
                read("core_client_key", key)?,
            )),
            None => None,
        },
    }))
}

/// Refuses a core (when `with_core`) or admin listener beyond loopback without a token,
/// unless `core_insecure` accepts the risk (then warns).
fn check_exposure(settings: &Settings, with_core: bool) -> Result<(), StartError> {
    let exposed: Vec<String> = [
        ("the core gRPC API", "core_listen", settings.core_listen),
        ("the admin HTTP API", "admin_listen", settings.admin_listen),
    ]
    .into_iter()
    .filter(|(_, key, _)| with_core || *key != "core_listen")
    // The core authenticates by client certificate as well as by token.
    .filter(|(_, key, _)| !(*key == "core_listen" && settings.core_tls_client_ca.is_some()))
    .filter_map(|(what, key, listen)| {
        listen
            .addr()
            .filter(|a| beyond_loopback(*a))
            .map(|a| format!("{what} ({key} = {a})"))
    })
    .collect();
    if exposed.is_empty() || settings.core_token.is_some() {
        return Ok(());
    }
    let list = exposed.join(" and ");
    if settings.core_insecure {
        warn!(
            "core_insecure is set: {list} accepts anyone who reaches it, without authentication (they can read, write and delete every stream, queue and session); set core_token instead"
        );
        return Ok(());
    }
    Err(StartError::Unauthenticated(format!(
        "{list} would listen beyond loopback without authentication: set core_token (--core-token-file FILE, TRIBUTARY_CORE_TOKEN, or core_token / core_token_file in the config file), listen on loopback (e.g. --core-listen 127.0.0.1:7400 --admin-listen 127.0.0.1:7480), or accept the risk with --core-insecure (core_insecure = true)"
    )))
}

/// A gateway asks its core one cheap question before it starts: a core that refuses its
/// token (or its lack of one) stops the gateway with one clear line. A core that does not
/// answer yet is fine: the client connects lazily and keeps trying.
async fn probe_core(settings: &Settings, client: &CoreClient) -> Result<(), StartError> {
    let mut admin = client.admin.clone();
    let call = admin.list_namespaces(tributary_proto::v1::ListNamespacesRequest {});
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Err(status)) if status.code() == tonic::Code::Unauthenticated => {
            let given = if settings.core_token.is_some() {
                "the token this gateway sent is not the core's"
            } else {
                "this gateway sent no token"
            };
            Err(StartError::Unauthenticated(format!(
                "the core at {} refused this gateway (UNAUTHENTICATED, {given}): {}",
                settings.core,
                status.message()
            )))
        }
        Ok(Err(status)) => {
            warn!(core = %settings.core, error = %status.message(), "the core did not answer yet; the gateway keeps trying");
            Ok(())
        }
        Ok(Ok(_)) => Ok(()),
        Err(_) => {
            warn!(core = %settings.core, "the core did not answer within 3 s; the gateway keeps trying");
            Ok(())
        }
    }
}

/// Declares the `[[mqtt_stream_rules]]` entries in `core`, each namespace made if missing
/// (rules are durable bindings: declaring one again changes nothing).
async fn declare_mqtt_rules(core: &Core, rules: &[(String, String, String)]) -> Result<(), String> {
    for (ns, filter, stream) in rules {
        core.create_namespace(ns, Default::default(), true)
            .await
            .map_err(|e| format!("{filter} -> {stream}: namespace {ns}: {e}"))?;
        core.declare_mqtt_rule(ns, filter, stream)
            .await
            .map_err(|e| format!("{filter} -> {stream}: {e}"))?;
    }
    Ok(())
}

/// Makes the namespace a gateway process serves (`gateway_namespace`) if it is missing,
/// trying again until the core answers: a core that is down or taking over when the
/// gateway starts is no reason to stop it, and its clients meet retriable errors (or an
/// unknown namespace) until then. Asking again once made is harmless (`if_not_exists`).
fn spawn_ensure_namespace(
    settings: &Settings,
    client: &CoreClient,
    stop: &watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    let namespace = settings.gateway_namespace.clone();
    let mut admin = client.scoped(&namespace).admin;
    let mut stop = stop.subscribe();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let call = admin.create_namespace(tributary_proto::v1::CreateNamespaceRequest {
                name: namespace.clone(),
                if_not_exists: true,
                ..Default::default()
            });
            match call.await {
                Ok(made) => {
                    if made.into_inner().created {
                        info!(%namespace, "gateway namespace made");
                    }
                    return;
                }
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                    ) =>
                {
                    error!(%namespace, error = %status.message(), "the core refused to make the gateway's namespace");
                    return;
                }
                Err(status) => {
                    debug!(%namespace, error = %status.message(), "gateway namespace not made yet; trying again");
                }
            }
            // A retry's backoff, not a wait for something to happen.
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// What starting a gateway listener adds to: the tasks the server stops, and the process's
/// connection list.
struct Spawn<'a> {
    stop: &'a watch::Sender<bool>,
    tasks: &'a mut Vec<tokio::task::JoinHandle<()>>,
    connections: &'a Arc<Connections>,
}

fn spawn<'a>(
    stop: &'a watch::Sender<bool>,
    tasks: &'a mut Vec<tokio::task::JoinHandle<()>>,
    connections: &'a Arc<Connections>,
) -> Spawn<'a> {
    Spawn {
        stop,
        tasks,
        connections,
    }
}

/// Serves one bound gateway listener with the shared accept loop, as `name` (its metrics
/// label), until `stop`.
fn spawn_listener<H, G>(
    settings: &Settings,
    socket: TcpListener,
    name: &'static str,
    handshake: H,
    gateway: Arc<G>,
    run: &mut Spawn<'_>,
) where
    H: Handshake,
    G: Gateway<H::Stream>,
{
    let listener = Listener {
        max_connections: settings.max_connections,
        connections: run.connections.clone(),
        ..Listener::new(socket, name, handshake)
    };
    run.tasks.push(tokio::spawn(tributary_gateway_common::serve(
        listener,
        gateway,
        run.stop.subscribe(),
    )));
}

/// Starts the Kafka gateway on a bound listener; returns the address it serves.
/// The Kafka listeners that are on.
struct KafkaListeners {
    tcp: Option<TcpListener>,
    tls: Option<TlsListener>,
}

/// Binds the Kafka listeners that are on and loads the TLS certificate if one is needed.
async fn bind_kafka(
    settings: &Settings,
    certs: Option<&Arc<CertSource>>,
) -> Result<KafkaListeners, StartError> {
    let tcp = bind_listen(settings.kafka_listen, "the Kafka gateway", "--kafka-listen").await?;
    let tls = bind_tls_listen(
        settings,
        certs,
        settings.kafka_tls_listen,
        "the Kafka TLS gateway",
        "--kafka-tls-listen",
    )
    .await?;
    Ok(KafkaListeners { tcp, tls })
}

/// Starts the Kafka gateway on its bound listeners and records their addresses. Each
/// listener has its own gateway, so its clients are given its own address as the broker's
/// (a client that bootstrapped over TLS stays on TLS); groups and offsets are the core's.
/// The users a gateway checks logins against: the config file's and the core's.
fn user_directory(settings: &Settings, client: &CoreClient) -> Arc<UserDirectory> {
    Arc::new(UserDirectory::with_core(
        settings.users.clone(),
        client.clone(),
        tributary_gateway_common::users::DEFAULT_REFRESH,
    ))
}

fn spawn_kafka(
    settings: &Settings,
    KafkaListeners { tcp, tls }: KafkaListeners,
    client: CoreClient,
    run: &mut Spawn<'_>,
    bound: &mut Bound,
) -> Result<(), StartError> {
    let local = |l: &TcpListener, flag: &str| {
        l.local_addr().map_err(|source| {
            StartError::Listen(ListenError::Other {
                addr: "kafka".into(),
                what: "the Kafka gateway".into(),
                flag: flag.into(),
                source,
            })
        })
    };
    // One cache of the core's users for the plain and the TLS listener.
    let users = user_directory(settings, &client);
    let config = |addr: SocketAddr,
                  advertised: &Option<(String, u16)>,
                  flag: &str,
                  listener: &'static str| {
        let mut config = KafkaConfig::new(addr);
        config.namespace = settings.gateway_namespace.clone();
        config.fleet =
            settings
                .kafka_broker_id
                .map(|broker_id| tributary_gateway_kafka::fleet::FleetConfig {
                    broker_id,
                    listener,
                    node: settings.kafka_broker_node.clone(),
                });
        match advertised {
            Some((host, port)) => {
                config.advertised_host = host.clone();
                config.advertised_port = *port;
            }
            None if addr.ip().is_unspecified() => {
                config.advertised_host = "127.0.0.1".into();
                warn!(
                    "kafka: listening on {addr} but advertising 127.0.0.1:{}; set {flag} for clients on other machines",
                    addr.port()
                );
            }
            None => {}
        }
        config.auto_create_topics = settings.kafka_auto_create_topics;
        if settings.kafka_sasl {
            config.sasl = Some(users.clone());
        }
        config.authorizer = settings.kafka_authorizer.clone();
        config.ssl_principal_rules = settings.kafka_ssl_principal_rules.clone();
        config.session_timeout_ms = settings.group_session_timeout_ms.clone();
        config
    };
    if let Some(listener) = tcp {
        let addr = local(&listener, "--kafka-listen")?;
        let gateway = tributary_gateway_kafka::Gateway::new(
            client.clone(),
            config(
                addr,
                &settings.kafka_advertised,
                "--kafka-advertised",
                "plain",
            ),
        );
        run.tasks.extend(gateway.spawn_fleet(run.stop.subscribe()));
        spawn_listener(settings, listener, "kafka", Plain, gateway, run);
        bound.kafka = Some(addr);
    }
    if let Some((listener, acceptor)) = tls {
        let addr = local(&listener, "--kafka-tls-listen")?;
        let gateway = tributary_gateway_kafka::Gateway::new(
            client,
            config(
                addr,
                &settings.kafka_tls_advertised,
                "--kafka-tls-advertised",
                "tls",
            ),
        );
        run.tasks.extend(gateway.spawn_fleet(run.stop.subscribe()));
        spawn_listener(settings, listener, "kafka-tls", acceptor, gateway, run);
        bound.kafka_tls = Some(addr);
    }
    Ok(())
}

/// A bound TLS listener and the acceptor holding its certificate.
type TlsListener = (TcpListener, Acceptor);

/// Binds a TLS listener if it is on; the configuration checked that a certificate is given
/// for every TLS listener that is on.
async fn bind_tls_listen(
    settings: &Settings,
    certs: Option<&Arc<CertSource>>,
    listen: Listen,
    what: &str,
    flag: &str,
) -> Result<Option<TlsListener>, StartError> {
    match (bind_listen(listen, what, flag).await?, certs) {
        (Some(listener), Some(certs)) => Ok(Some((
            listener,
            tls::acceptor_for(certs, &settings.tls_clients, &[])?,
        ))),
        _ => Ok(None),
    }
}

/// The MQTT listeners that are on.
struct MqttListeners {
    tcp: Option<TcpListener>,
    ws: Option<TcpListener>,
    tls: Option<TlsListener>,
    wss: Option<TlsListener>,
}

/// Binds the MQTT listeners that are on and loads the TLS certificate if one is needed.
async fn bind_mqtt(
    settings: &Settings,
    certs: Option<&Arc<CertSource>>,
) -> Result<MqttListeners, StartError> {
    let tcp = bind_listen(settings.mqtt_listen, "the MQTT gateway", "--mqtt-listen").await?;
    let ws = bind_listen(
        settings.mqtt_ws_listen,
        "the MQTT WebSocket gateway",
        "--mqtt-ws-listen",
    )
    .await?;
    let tls = bind_tls_listen(
        settings,
        certs,
        settings.mqtt_tls_listen,
        "the MQTT TLS gateway",
        "--mqtt-tls-listen",
    )
    .await?;
    let wss = bind_tls_listen(
        settings,
        certs,
        settings.mqtt_wss_listen,
        "the MQTT secure WebSocket gateway",
        "--mqtt-wss-listen",
    )
    .await?;
    Ok(MqttListeners { tcp, ws, tls, wss })
}

/// Starts the MQTT gateway on its bound listeners and records their addresses.
fn spawn_mqtt(
    settings: &Settings,
    listeners: MqttListeners,
    client: CoreClient,
    run: &mut Spawn<'_>,
    bound: &mut Bound,
) {
    let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    bound.mqtt = addr(&listeners.tcp);
    bound.mqtt_ws = addr(&listeners.ws);
    let tls_addr = |l: &Option<TlsListener>| l.as_ref().and_then(|(l, _)| l.local_addr().ok());
    bound.mqtt_tls = tls_addr(&listeners.tls);
    bound.mqtt_wss = tls_addr(&listeners.wss);
    let first = bound
        .mqtt
        .or(bound.mqtt_ws)
        .or(bound.mqtt_tls)
        .or(bound.mqtt_wss);
    let config = MqttConfig {
        namespace: settings.gateway_namespace.clone(),
        allow_anonymous: settings.mqtt_allow_anonymous,
        max_keep_alive: settings.mqtt_max_keep_alive,
        users: user_directory(settings, &client),
        acl: Arc::new(settings.mqtt_acl.clone()),
        instance: format!("mqtt@{}", first.map(|a| a.to_string()).unwrap_or_default()),
        ..MqttConfig::default()
    };
    let listening: Vec<_> = [bound.mqtt, bound.mqtt_ws, bound.mqtt_tls, bound.mqtt_wss]
        .into_iter()
        .flatten()
        .collect();
    config.warn_if_anonymous_beyond_loopback(&listening);
    let gateway = tributary_gateway_mqtt::Gateway::new(client, config);
    let MqttListeners { tcp, ws, tls, wss } = listeners;
    if let Some(l) = tcp {
        spawn_listener(settings, l, "mqtt", Plain, gateway.clone(), run);
    }
    if let Some(l) = ws {
        spawn_listener(settings, l, "mqtt-ws", Plain, gateway.websocket(), run);
    }
    if let Some((l, acceptor)) = wss {
        spawn_listener(settings, l, "mqtt-wss", acceptor, gateway.websocket(), run);
    }
    if let Some((l, acceptor)) = tls {
        spawn_listener(settings, l, "mqtt-tls", acceptor, gateway, run);
    }
}

/// The AMQP listeners that are on.
struct AmqpListeners {
    tcp: Option<TcpListener>,
    tls: Option<TlsListener>,
}

/// Binds the AMQP listeners that are on and loads the TLS certificate if one is needed.
async fn bind_amqp(
    settings: &Settings,
    certs: Option<&Arc<CertSource>>,
) -> Result<AmqpListeners, StartError> {
    let tcp = bind_listen(settings.amqp_listen, "the AMQP gateway", "--amqp-listen").await?;
    let tls = bind_tls_listen(
        settings,
        certs,
        settings.amqp_tls_listen,
        "the AMQP TLS gateway",
        "--amqp-tls-listen",
    )
    .await?;
    Ok(AmqpListeners { tcp, tls })
}

/// Starts the AMQP gateway on its bound listeners and records their addresses.
fn spawn_amqp(
    settings: &Settings,
    AmqpListeners { tcp, tls }: AmqpListeners,
    client: CoreClient,
    run: &mut Spawn<'_>,
    bound: &mut Bound,
) {
    bound.amqp = tcp.as_ref().and_then(|l| l.local_addr().ok());
    bound.amqp_tls = tls.as_ref().and_then(|(l, _)| l.local_addr().ok());
    let config = AmqpConfig {
        users: user_directory(settings, &client),
        vhosts: settings.amqp_vhosts.clone(),
        permissions: settings.amqp_permissions.clone(),
        ..AmqpConfig::default()
    };
    let gateway = tributary_gateway_amqp::Gateway::new(client, config);
    if let Some(l) = tcp {
        spawn_listener(settings, l, "amqp", Plain, gateway.clone(), run);
    }
    if let Some((l, acceptor)) = tls {
        spawn_listener(settings, l, "amqp-tls", acceptor, gateway, run);
    }
}

async fn bind_sqs(settings: &Settings) -> Result<Option<TcpListener>, StartError> {
    let listener = bind_listen(settings.sqs_listen, "the SQS gateway", "--sqs-listen").await?;
    if let Some(addr) = settings.sqs_listen.addr()
        && beyond_loopback(addr)
        && settings.sqs.credentials.is_empty()
    {
        warn!(
            "the SQS gateway listens on {addr} without access keys: anyone who reaches it can read, send and delete messages; list keys in [[sqs_credentials]] to require SigV4 signatures"
        );
    }
    Ok(listener)
}

/// Starts the SQS gateway on its bound listener and records its address.
fn spawn_sqs(
    settings: &Settings,
    listener: TcpListener,
    client: CoreClient,
    run: &mut Spawn<'_>,
    bound: &mut Bound,
) {
    bound.sqs = listener.local_addr().ok();
    let config = tributary_gateway_sqs::SqsConfig {
        namespace: settings.gateway_namespace.clone(),
        ..settings.sqs.clone()
    };
    let gateway = tributary_gateway_sqs::Gateway::new(client, config);
    spawn_listener(settings, listener, "sqs", Plain, gateway, run);
}

/// The RocketMQ listeners that are on.
struct RocketMqListeners {
    broker: Option<TcpListener>,
    namesrv: Option<TcpListener>,
}

async fn bind_rocketmq(settings: &Settings) -> Result<RocketMqListeners, StartError> {
    let broker = bind_listen(
        settings.rocketmq_listen,
        "the RocketMQ broker",
        "--rocketmq-listen",
    )
    .await?;
    let namesrv = bind_listen(
        settings.namesrv_listen,
        "the RocketMQ NameServer",
        "--namesrv-listen",
    )
    .await?;
    for (listen, what) in [
        (settings.rocketmq_listen, "broker"),
        (settings.namesrv_listen, "NameServer"),
    ] {
        if let Some(addr) = listen.addr()
            && beyond_loopback(addr)
        {
            warn!(
                "the RocketMQ {what} listens on {addr} without authentication (RocketMQ ACL is not supported): anyone who reaches it can send and consume"
            );
        }
    }
    Ok(RocketMqListeners { broker, namesrv })
}

/// Starts the RocketMQ gateway (broker and NameServer) and its background work.
fn spawn_rocketmq(
    settings: &Settings,
    RocketMqListeners { broker, namesrv }: RocketMqListeners,
    client: CoreClient,
    run: &mut Spawn<'_>,
    bound: &mut Bound,
) {
    bound.rocketmq = broker.as_ref().and_then(|l| l.local_addr().ok());
    bound.rocketmq_namesrv = namesrv.as_ref().and_then(|l| l.local_addr().ok());
    // Clients dial the broker address the NameServer gives; without a broker listener here
    // that is the one advertised (another gateway process's).
    let listen = bound
        .rocketmq
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 10911)));
    let advertised = settings.rocketmq_advertised.unwrap_or_else(|| {
        if listen.ip().is_unspecified() {
            warn!(
                "rocketmq: listening on {listen} but advertising 127.0.0.1:{}; set --rocketmq-advertised for clients on other machines",
                listen.port()
            );
            SocketAddr::from(([127, 0, 0, 1], listen.port()))
        } else {
            listen
        }
    });
    let mut config = tributary_gateway_rocketmq::RocketMqConfig::new(advertised);
    config.namespace = settings.gateway_namespace.clone();
    config.auto_create_topics = settings.rocketmq_auto_create_topics;
    config.transaction_check_interval = settings.rocketmq_transaction_check_interval;
    config.transaction_timeout = settings.rocketmq_transaction_timeout;
    config.transaction_check_max = settings.rocketmq_transaction_check_max;
    config.max_message_bytes = settings.max_message_bytes.max(1) as usize;
    config.serves_broker = broker.is_some();
    let gateway = tributary_gateway_rocketmq::Gateway::new(client, config);
    run.tasks.push(tokio::spawn(
        gateway.clone().run_background(run.stop.subscribe()),
    ));
    if let Some(l) = broker {
        spawn_listener(settings, l, "rocketmq", Plain, gateway.clone(), run);
    }
    if let Some(l) = namesrv {
        spawn_listener(settings, l, "rocketmq-namesrv", Plain, gateway, run);
    }
}

/// `Sessions.Attach` on the core in this process, without the gRPC encoding.
struct CoreSessions(Core);

impl tributary_gateway_common::client::LocalSessions for CoreSessions {
    fn attach(&self) -> Box<dyn tributary_gateway_common::client::LocalSession> {
        Box::new(CoreSession(self.0.open_session()))
    }
}

/// One session of the core in this process, served on the reading connection's task.
struct CoreSession(tributary_core::SessionStream);

impl tributary_gateway_common::client::LocalSession for CoreSession {
    fn send(&mut self, command: Box<v1::SessionCommand>) {
        self.0.push(command);
    }
    fn queued(&self) -> usize {
        self.0.queued()
    }
    fn end(&mut self) {
        self.0.end_commands();
    }
    fn poll_event(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Box<v1::SessionEvent>>> {
        use futures::Stream;
        std::pin::Pin::new(&mut self.0).poll_next(cx)
    }
}

/// The queue engine's per-message calls on the core in this process, without the gRPC
/// encoding.
struct CoreQueues(Core);

impl tributary_gateway_common::client::LocalQueues for CoreQueues {
    fn publish(&self, req: v1::PublishRequest) -> LocalCall<v1::PublishResponse> {
        let core = self.0.clone();
        Box::pin(async move { core.publish(req).await.map_err(Into::into) })
    }
    fn publish_staged(&self, req: v1::PublishRequest) -> LocalCall<LocalCall<v1::PublishResponse>> {
        let core = self.0.clone();
        Box::pin(async move {
            let staged = core.publish_staged(req).await?;
            let finish: LocalCall<v1::PublishResponse> =
                Box::pin(async move { staged.finish().await.map_err(Into::into) });
            Ok(finish)
        })
    }
    fn ack(&self, req: v1::AckRequest) -> LocalCall<v1::AckResponse> {
        let core = self.0.clone();
        Box::pin(async move {
            let queue = req.queue.unwrap_or_default();
            let expired = core
                .settle_leases(&queue, &req.lease_ids, !req.no_wait_durable)
                .await?;
            Ok(v1::AckResponse { expired })
        })
    }
    fn nack(&self, req: v1::NackRequest) -> LocalCall<v1::NackResponse> {
        let core = self.0.clone();
        Box::pin(async move {
            let queue = req.queue.unwrap_or_default();
            core.nack(&queue, &req.lease_ids, req.requeue, req.delay_ms)
                .await?;
            Ok(v1::NackResponse {})
        })
    }
    fn enqueue(&self, req: v1::EnqueueRequest) -> LocalCall<v1::EnqueueResponse> {
        let core = self.0.clone();
        Box::pin(async move { core.enqueue(req).await.map_err(Into::into) })
    }
    fn receive(&self, req: v1::ReceiveRequest) -> LocalCall<v1::ReceiveResponse> {
        let core = self.0.clone();
        Box::pin(async move {
            let messages = core.receive(req).await?;
            Ok(v1::ReceiveResponse { messages })
        })
    }
    fn change_lease(&self, req: v1::ChangeLeaseRequest) -> LocalCall<v1::ChangeLeaseResponse> {
        let core = self.0.clone();
        Box::pin(async move {
            let queue = req.queue.unwrap_or_default();
            core.change_lease(&queue, &req.lease_ids, req.visibility_timeout_ms)
                .await?;
            Ok(v1::ChangeLeaseResponse {})
        })
    }
    fn subscribe(
        &self,
        requests: tributary_gateway_common::client::SubscribeRequests,
    ) -> tributary_gateway_common::client::SubscribeEvents {
        use tokio_stream::StreamExt;
        // On a task of its own, not served by its reader (`subscription_served_by_reader`):
        // the reader, an AMQP connection's broker, also awaits core calls that take locks
        // the subscription's work may hold while suspended (a queue's state, the admin lock
        // of an auto-delete), and the work resumes only when that reader polls it again. A
        // Java client's passive declare after a prefetch consume hung the whole core that way
        // in CI (every later declare waited on it).
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let core = self.0.clone();
        tokio::spawn(async move { core.run_subscription(requests.map(Ok), tx).await });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

async fn futures_join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// SIGINT and SIGTERM handlers, installed before the process says `ready` so that a signal
/// sent right after it still shuts down cleanly.
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for SIGINT or SIGTERM.
    pub async fn wait(mut self) {
        self.recv().await;
    }

    /// Waits for SIGINT or SIGTERM, the handlers staying installed.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received; shutting down"),
            _ = self.int.recv() => info!("SIGINT received; shutting down"),
        }
    }
}

/// `tributary gateway <protocol>`: refused honestly until that gateway exists.
pub fn gateway_unavailable(protocol: &str) -> StartError {
    if KNOWN_GATEWAYS.contains(&protocol) {
        StartError::Unavailable(format!(
            "the {protocol} gateway is not part of this build yet; run `tributary standalone` or `tributary core` instead"
        ))
    } else {
        StartError::Unavailable(format!(
            "unknown protocol '{protocol}'; expected one of: {}",
            KNOWN_GATEWAYS.join(", ")
        ))
    }
}

/// The opaque batch formats the core can read as records: Kafka's (the mapping crate's
/// decoder, handed over as a function so that the core links no Kafka codec).
fn record_decoders() -> tributary_core::RecordDecoders {
    tributary_core::RecordDecoders::default().with(
        tributary_mapping::kafka::OPAQUE_FORMAT,
        std::sync::Arc::new(|opaque: &bytes::Bytes| {
            tributary_mapping::kafka::decode_batch(opaque).map_err(|e| e.to_string())
        }),
    )
}
