//! The Kafka gateway: speaks the Kafka wire protocol to unmodified Kafka clients and turns
//! each request into calls on the core. It keeps no state of its own beyond a connection's
//! SASL progress: topics are streams, consumer groups and committed offsets live in the core,
//! so any number of gateway instances can front one core.
//!
//! To clients the gateway is a one-broker cluster (node 0 at the advertised address) that
//! leads every partition and coordinates every group.

pub mod acl;
mod acl_api;
mod admin;
pub use admin::apply_topic_config;
pub mod batch;
mod conn;
mod data;
pub mod errors;
mod fetch_spread;
pub mod fleet;
mod groups;
mod metadata;
pub mod principal;
mod produce_order;
pub mod sasl;
mod scram_api;
mod txn;
pub mod versions;

use std::net::SocketAddr;
use std::sync::Arc;

use kafka_protocol::messages::{RequestHeader, RequestKind, ResponseKind};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tributary_gateway_common::identity::PeerIdentity;
use tributary_gateway_common::{Accepted, CoreClient};

pub use conn::{decode_frame, decode_request, encode_response};
pub use sasl::{SaslUsers, ScramCredential};

/// Kafka's socket.request.max.bytes default.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 100 * 1024 * 1024;

/// Everything the gateway is told at start-up.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Host and port given to clients as the broker's address.
    pub advertised_host: String,
    pub advertised_port: u16,
    /// Namespace in the core that holds the Kafka topics.
    pub namespace: String,
    /// Create unknown topics on Metadata requests that allow it (auto.create.topics.enable).
    pub auto_create_topics: bool,
    /// Frames above this close the connection (socket.request.max.bytes).
    pub max_request_bytes: usize,
    /// Reported as the cluster id.
    pub cluster_id: String,
    /// SASL users; `None` = SASL off, every connection is served unauthenticated.
    pub sasl: Option<Arc<tributary_gateway_common::users::UserDirectory>>,
    /// The ACL authorizer; `None` = off: every authenticated client may do everything, and
    /// the ACL APIs answer SECURITY_DISABLED. Needs SASL.
    pub authorizer: Option<acl::AuthorizerConfig>,
    /// Kafka's `ssl.principal.mapping.rules`: the principal of a connection that gave a
    /// client certificate and no SASL login.
    pub ssl_principal_rules: principal::PrincipalRules,
    /// Session timeouts JoinGroup accepts, in ms (group.min/max.session.timeout.ms);
    /// others get INVALID_SESSION_TIMEOUT.
    pub session_timeout_ms: std::ops::RangeInclusive<i32>,
    /// A fleet of gateways (`kafka_broker_id`). `None`: the only broker.
    pub fleet: Option<fleet::FleetConfig>,
}

impl KafkaConfig {
    /// Defaults for a gateway listening on `listen`, advertising that same address.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            advertised_host: listen.ip().to_string(),
            advertised_port: listen.port(),
            namespace: "default".into(),
            auto_create_topics: true,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            cluster_id: "tributary-kafka-cluster".into(),
            sasl: None,
            authorizer: None,
            ssl_principal_rules: principal::PrincipalRules::default(),
            session_timeout_ms: 6_000..=1_800_000,
            fleet: None,
        }
    }
}

/// The Kafka gateway: served by the shared accept loop (`tributary_gateway_common::serve`),
/// on plain TCP only (no TLS listener for Kafka yet).
pub struct Gateway {
    pub(crate) config: KafkaConfig,
    pub(crate) core: CoreClient,
    /// Topic id -> name, for requests that name topics by id; refreshed on a miss.
    pub(crate) topic_ids: parking_lot::RwLock<std::collections::HashMap<uuid::Uuid, String>>,
    /// ACLs and their cache, when the authorizer is on.
    pub(crate) authorizer: Option<acl::Authorizer>,
    /// Refused SASL logins, counted and (rate-limited) logged.
    pub(crate) logins: tributary_gateway_common::auth::LoginRefusals,
    /// The other gateways listed as brokers, when this one is part of a fleet.
    pub(crate) fleet: Option<Arc<fleet::Fleet>>,
}

impl Gateway {
    pub fn new(core: CoreClient, config: KafkaConfig) -> Arc<Self> {
        let core = core.scoped(&config.namespace);
        let authorizer = config
            .authorizer
            .as_ref()
            .map(|a| acl::Authorizer::new(a, &config.namespace));
        let fleet = config.fleet.as_ref().map(|f| {
            Arc::new(fleet::Fleet::new(
                fleet::Broker {
                    id: f.broker_id,
                    host: config.advertised_host.clone(),
                    port: i32::from(config.advertised_port),
                    node: f.node.clone(),
                },
                config.namespace.clone(),
                f.listener,
            ))
        });
        Arc::new(Self {
            config,
            core,
            topic_ids: Default::default(),
            authorizer,
            logins: Default::default(),
            fleet,
        })
    }

    /// In a fleet: registers this gateway in the core and keeps the list of brokers fresh
    /// until `stop`. `None` for a gateway alone.
    pub fn spawn_fleet(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.fleet
            .as_ref()
            .map(|f| f.spawn(self.core.clone(), stop))
    }

    /// The brokers clients are given (this gateway alone, or the fleet).
    pub(crate) fn brokers(&self) -> Vec<fleet::Broker> {
        match &self.fleet {
            Some(f) => f.brokers(),
            None => vec![fleet::Broker {
                id: metadata::NODE_ID,
                host: self.config.advertised_host.clone(),
                port: i32::from(self.config.advertised_port),
                node: None,
            }],
        }
    }

    /// This gateway's broker id.
    pub(crate) fn broker_id(&self) -> i32 {
        self.fleet.as_ref().map_or(metadata::NODE_ID, |f| f.me().id)
    }

    /// The leader given to clients for a partition.
    pub(crate) fn leader(&self, topic: &str, partition: i32) -> i32 {
        self.fleet
            .as_ref()
            .map_or(metadata::NODE_ID, |f| f.leader(topic, partition))
    }

    /// The coordinator given to clients for a group or transactional id.
    pub(crate) fn coordinator(&self, key: &str) -> fleet::Broker {
        match &self.fleet {
            Some(f) => f.owner(key.as_bytes()),
            None => self.brokers().remove(0),
        }
    }

    /// The authorizer as this request sees it (checks the ACL cache's freshness first).
    pub(crate) async fn authz(&self, session: &conn::Session) -> acl::Authz<'_> {
        match &self.authorizer {
            None => acl::Authz::open(session.peer),
            Some(a) => {
                let set = a.snapshot(&self.core).await;
                // SASL is required with the authorizer, so every served request has a user;
                // Kafka's name for none is ANONYMOUS.
                let user = session.principal.as_deref().unwrap_or("ANONYMOUS");
                acl::Authz::new(a, set, user, session.peer)
            }
        }
    }
}

/// Over plain TCP or inside a TLS session (`kafka_tls_listen`: the clients' SSL and
/// SASL_SSL security protocols).
impl<S> tributary_gateway_common::Gateway<S> for Gateway
where
    S: AsyncRead + AsyncWrite + Unpin + Send + PeerIdentity + 'static,
{
    /// One connection: requests served in order until the client leaves or `stop` turns
    /// true.
    async fn serve_connection(self: Arc<Self>, conn: Accepted<S>, stop: watch::Receiver<bool>) {
        let subject = conn.stream.client_certificate_subject();
        conn::serve_connection(conn, subject, self, stop).await
    }
}

/// Serves one decoded request. `None` = no response (Produce with acks=0).
pub(crate) async fn dispatch(
    gw: &Gateway,
    session: &conn::Session,
    _header: &RequestHeader,
    request: RequestKind,
    version: i16,
) -> Option<ResponseKind> {
    let needs_authz = !matches!(
        request,
        RequestKind::ApiVersions(_)
            | RequestKind::SaslHandshake(_)
            | RequestKind::SaslAuthenticate(_)
    );
    let authz = if needs_authz {
        gw.authz(session).await
    } else {
        acl::Authz::open(session.peer)
    };
    let az = &authz;
    Some(match request {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(versions::api_versions(0)),
        RequestKind::Metadata(r) => {
            ResponseKind::Metadata(metadata::metadata(gw, az, r, version).await)
        }
        RequestKind::Produce(r) => {
            ResponseKind::Produce(data::produce(gw, az, &session.traffic, r).await?)
        }
        RequestKind::Fetch(r) => {
            ResponseKind::Fetch(data::fetch(gw, az, &session.traffic, r, version).await)
        }
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(data::list_offsets(gw, az, r).await)
        }
        RequestKind::InitProducerId(r) => {
            ResponseKind::InitProducerId(data::init_producer_id(gw, az, r, version).await)
        }
        RequestKind::AddPartitionsToTxn(r) => {
            ResponseKind::AddPartitionsToTxn(txn::add_partitions(gw, az, r, version).await)
        }
        RequestKind::AddOffsetsToTxn(r) => {
            ResponseKind::AddOffsetsToTxn(txn::add_offsets(gw, az, r, version).await)
        }
        RequestKind::TxnOffsetCommit(r) => {
            ResponseKind::TxnOffsetCommit(txn::txn_offset_commit(gw, az, r, version).await)
        }
        RequestKind::EndTxn(r) => ResponseKind::EndTxn(txn::end_txn(gw, az, r, version).await),
        RequestKind::DescribeTransactions(r) => {
            ResponseKind::DescribeTransactions(txn::describe_transactions(gw, az, r).await)
        }
        RequestKind::ListTransactions(r) => {
            ResponseKind::ListTransactions(txn::list_transactions(gw, az, r).await)
        }
        RequestKind::FindCoordinator(r) => {
            ResponseKind::FindCoordinator(metadata::find_coordinator(gw, az, r, version))
        }
        RequestKind::DescribeCluster(r) => {
            ResponseKind::DescribeCluster(metadata::describe_cluster(gw, az, r))
        }
        RequestKind::JoinGroup(r) => {
            ResponseKind::JoinGroup(groups::join(gw, az, session, r, version).await)
        }
        RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(groups::sync(gw, az, r).await),
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(groups::heartbeat(gw, az, r).await),
        RequestKind::LeaveGroup(r) => {
            ResponseKind::LeaveGroup(groups::leave(gw, az, r, version).await)
        }
        RequestKind::OffsetCommit(r) => {
            ResponseKind::OffsetCommit(groups::offset_commit(gw, az, r).await)
        }
        RequestKind::OffsetFetch(r) => {
            ResponseKind::OffsetFetch(groups::offset_fetch(gw, az, r, version).await)
        }
        RequestKind::DescribeGroups(r) => {
            ResponseKind::DescribeGroups(groups::describe_groups(gw, az, r).await)
        }
        RequestKind::ListGroups(r) => {
            ResponseKind::ListGroups(groups::list_groups(gw, az, r).await)
        }
        RequestKind::DeleteGroups(r) => {
            ResponseKind::DeleteGroups(groups::delete_groups(gw, az, r).await)
        }
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(admin::create_topics(gw, az, r, version).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(admin::delete_topics(gw, az, r, version).await)
        }
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(admin::create_partitions(gw, az, r).await)
        }
        RequestKind::DeleteRecords(r) => {
            ResponseKind::DeleteRecords(admin::delete_records(gw, az, r).await)
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(admin::describe_configs(gw, az, r).await)
        }
        RequestKind::AlterConfigs(r) => {
            ResponseKind::AlterConfigs(admin::alter_configs(gw, az, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => {
            ResponseKind::IncrementalAlterConfigs(admin::incremental_alter_configs(gw, az, r).await)
        }
        RequestKind::CreateAcls(r) => {
            ResponseKind::CreateAcls(acl_api::create_acls(gw, az, r).await)
        }
        RequestKind::DescribeAcls(r) => {
            ResponseKind::DescribeAcls(acl_api::describe_acls(gw, az, r).await)
        }
        RequestKind::DeleteAcls(r) => {
            ResponseKind::DeleteAcls(acl_api::delete_acls(gw, az, r).await)
        }
        RequestKind::DescribeUserScramCredentials(r) => {
            ResponseKind::DescribeUserScramCredentials(scram_api::describe(gw, az, r).await)
        }
        RequestKind::AlterUserScramCredentials(r) => {
            ResponseKind::AlterUserScramCredentials(scram_api::alter(gw, az, r).await)
        }
        // SASL is off (the gate in conn.rs serves it when on): refuse like Kafka does.
        RequestKind::SaslHandshake(_) => ResponseKind::SaslHandshake(
            kafka_protocol::messages::SaslHandshakeResponse::default().with_error_code(
                kafka_protocol::error::ResponseError::UnsupportedSaslMechanism.code(),
            ),
        ),
        RequestKind::SaslAuthenticate(_) => ResponseKind::SaslAuthenticate(
            kafka_protocol::messages::SaslAuthenticateResponse::default()
                .with_error_code(kafka_protocol::error::ResponseError::IllegalSaslState.code())
                .with_error_message(Some(kafka_protocol::protocol::StrBytes::from_static_str(
                    "SASL is not enabled on this listener",
                ))),
        ),
        // Not advertised, so a client that sends it anyway is out of protocol; versions::supports
        // already closed the connection before decoding reaches here.
        other => {
            tracing::warn!(request = ?std::mem::discriminant(&other), "unserved request");
            return None;
        }
    })
}
