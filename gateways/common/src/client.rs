//! One client type for the core, whatever the transport.
//!
//! Over the network it is a tonic `Channel`; in the standalone server it is the core's own
//! `Routes` service called directly, so requests take the same codec and handler path with
//! no socket in between.

use std::convert::Infallible;

use prost::Message;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::service::Routes;

use std::sync::Arc;
use tonic::transport::Endpoint;

use crate::core_nodes::{CoreNodes, Scope};
pub use crate::session_link::{LocalSession, SessionLink};
use tributary_proto::v1::{
    AckRequest, AckResponse, ChangeLeaseRequest, ChangeLeaseResponse, EnqueueRequest,
    EnqueueResponse, ErrorCode, ErrorDetail, NackRequest, NackResponse, PublishRequest,
    PublishResponse, ReceiveRequest, ReceiveResponse, SessionCommand, SubscribeEvent,
    SubscribeRequest, admin_client::AdminClient, cluster_client::ClusterClient,
    groups_client::GroupsClient, offsets_client::OffsetsClient, queues_client::QueuesClient,
    sessions_client::SessionsClient, streams_client::StreamsClient, timers_client::TimersClient,
    transactions_client::TransactionsClient,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The transport under every core client: a network channel or the core's own services.
///
/// A concrete enum rather than a boxed service: with a boxed `dyn Service`, futures of
/// client calls stop being provably `Send` for every lifetime and cannot be spawned.
#[derive(Clone)]
pub enum CoreTransport {
    /// A core across the network; `authorization` (`Bearer <core_token>`) goes on every call.
    Network {
        nodes: Arc<CoreNodes>,
        authorization: Option<http::HeaderValue>,
        /// Set by [`CoreClient::scoped`].
        scope: Option<Arc<Scope>>,
    },
    InProcess(Routes),
}

impl tower::Service<http::Request<Body>> for CoreTransport {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            // The node is picked per call (it may change between calls), so readiness is
            // awaited in the call, on the picked node's channel.
            Self::Network { .. } => Poll::Ready(Ok(())),
            Self::InProcess(r) => tower::Service::<http::Request<Body>>::poll_ready(r, cx)
                .map_err(|e: Infallible| match e {}),
        }
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        match self {
            Self::Network {
                nodes,
                authorization,
                scope,
            } => {
                if let Some(v) = authorization {
                    req.headers_mut()
                        .insert(http::header::AUTHORIZATION, v.clone());
                }
                if let Some(scope) = scope {
                    req.headers_mut()
                        .insert(tributary_proto::NAMESPACE_METADATA, scope.namespace.clone());
                    if let Some(unit) = &scope.unit {
                        req.headers_mut()
                            .insert(tributary_proto::placement::UNIT_METADATA, unit.clone());
                    }
                }
                let nodes = nodes.clone();
                let scope = scope.clone();
                if nodes.len() == 1 || is_streaming(req.uri().path()) {
                    return Box::pin(async move { send_once(&nodes, scope.as_ref(), req).await });
                }
                // A call that a node serving shards answers as not its shard's was not run
                // (its router refuses before it reads the request), so it goes on to the next
                // node, each node once, and the caller meets the answer of the node that
                // serves it rather than a retriable error for each node in the way. That
                // takes the request's bytes kept for a resend: unary calls only (one message
                // each, `Bytes` kept without a copy); a streaming call (a subscription, a
                // session) is sent once and its caller retries as for any unavailable core.
                Box::pin(async move {
                    let (parts, body) = req.into_parts();
                    let bytes = http_body_util::BodyExt::collect(body).await?.to_bytes();
                    let mut left = nodes.len();
                    loop {
                        let req = http::Request::from_parts(
                            parts.clone(),
                            Body::new(http_body_util::Full::new(bytes.clone())),
                        );
                        let response = send_once(&nodes, scope.as_ref(), req).await?;
                        left -= 1;
                        if left == 0
                            || !response
                                .headers()
                                .contains_key(tributary_proto::SHARD_METADATA)
                        {
                            return Ok(response);
                        }
                    }
                })
            }
            Self::InProcess(r) => {
                let fut = tower::Service::call(r, req);
                Box::pin(async move { fut.await.map_err(|e: Infallible| match e {}) })
            }
        }
    }
}

/// The calls whose requests are streams (a queue subscription, a session): they cannot be
/// sent again once started.
fn is_streaming(path: &str) -> bool {
    use tributary_proto::v1::{queues_server, sessions_server};
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    (service == queues_server::SERVICE_NAME && method == "Subscribe")
        || (service == sessions_server::SERVICE_NAME && method == "Attach")
}

/// Sends `req` to the node `scope` (or, unscoped, the gateway) is at. A node that cannot be
/// reached moves every namespace's calls on and the call fails UNAVAILABLE, which every
/// gateway maps to its protocol's retriable error: the client's retry reaches the next
/// node. A node serving shards that does not serve this namespace's answers UNAVAILABLE
/// marked with the shard: that answer goes back as it is, and this scope's next call goes to
/// the next node (unscoped calls are the home shard's: users, the namespace listing).
async fn send_once(
    nodes: &Arc<CoreNodes>,
    scope: Option<&Arc<Scope>>,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    let (index, channel) = match scope {
        Some(scope) => nodes.pick_in(&scope.current),
        None => nodes.pick(),
    };
    let answered = tower::ServiceExt::oneshot(channel, req).await;
    if let Ok(response) = &answered {
        nodes.saw_placement(response.headers());
    }
    match answered {
        Ok(response)
            if response
                .headers()
                .contains_key(tributary_proto::SHARD_METADATA) =>
        {
            let why = &"the node does not serve this namespace's shard";
            match scope {
                Some(scope) => nodes.unreachable_in(&scope.current, index, why),
                None => nodes.unreachable(index, why),
            }
            Ok(response)
        }
        Ok(response) => Ok(response),
        Err(e) => {
            let e: BoxError = e.into();
            if let Some(scope) = scope {
                nodes.unreachable_in(&scope.current, index, &e);
            }
            nodes.unreachable(index, &e);
            Err(Box::new(tonic::Status::unavailable(format!(
                "core {} unreachable: {e}",
                nodes.address(index)
            ))) as BoxError)
        }
    }
}

/// Largest message either way; matches the core's limit.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid core address '{address}': {source}")]
    InvalidAddress {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "invalid core_token: it must be printable ASCII without spaces (it goes in an HTTP header)"
    )]
    InvalidToken,
    #[error("no core address given")]
    NoAddress,
    #[error("TLS to the core at '{address}': {source}")]
    Tls {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// TLS towards a core at an `https://` address.
#[derive(Debug, Clone, Default)]
pub struct CoreTls {
    /// PEM CAs the core's certificate is checked against; without them, the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate chain and key (PEM), for a core that requires one.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

/// `Sessions.Attach` served by a core in this process without the gRPC encoding: one
/// session stream per client connection carries every delivery, and encoding each one into
/// protobuf and an HTTP body only to decode it again in the same process was most of the
/// cost of an MQTT fan-out and of a connection's memory. Same messages, same semantics; the
/// network transport still goes through gRPC.
/// Commands and events travel boxed both ways: each is some 600-700 bytes, moved several
/// times between the connection and the core; boxed, it is allocated once and moved as a
/// pointer.
pub trait LocalSessions: Send + Sync {
    fn attach(&self) -> Box<dyn LocalSession>;
}

/// Boxed future of a local call.
pub type LocalCall<T> = Pin<Box<dyn Future<Output = Result<T, tonic::Status>> + Send>>;
/// A subscription's requests (start, then credit) and its events.
pub type SubscribeRequests = Pin<Box<dyn futures::Stream<Item = SubscribeRequest> + Send>>;
pub type SubscribeEvents =
    Pin<Box<dyn futures::Stream<Item = Result<SubscribeEvent, tonic::Status>> + Send>>;

/// The queue engine's per-message calls served by a core in this process without the
/// gRPC encoding: every publish, delivery and ack of an AMQP connection (and every send,
/// receive and delete of an SQS client) goes through them,
/// and encoding each into protobuf and an HTTP body only to decode it again in the same
/// process cost as much CPU as the work itself. Same messages, same semantics; over the
/// network they are the `Streams.Publish`, `Queues.Ack`/`Nack`/`Subscribe` RPCs.
pub trait LocalQueues: Send + Sync {
    fn publish(&self, req: PublishRequest) -> LocalCall<PublishResponse>;
    /// A publish in two halves: the outer call routes and appends (calls made one after
    /// the other keep their order), the inner one waits until the records are durable.
    fn publish_staged(&self, req: PublishRequest) -> LocalCall<LocalCall<PublishResponse>>;
    fn ack(&self, req: AckRequest) -> LocalCall<AckResponse>;
    fn nack(&self, req: NackRequest) -> LocalCall<NackResponse>;
    fn subscribe(&self, requests: SubscribeRequests) -> SubscribeEvents;
    fn enqueue(&self, req: EnqueueRequest) -> LocalCall<EnqueueResponse>;
    fn receive(&self, req: ReceiveRequest) -> LocalCall<ReceiveResponse>;
    fn change_lease(&self, req: ChangeLeaseRequest) -> LocalCall<ChangeLeaseResponse>;
}

/// Clients for every service of the core API, sharing one transport.
#[derive(Clone)]
pub struct CoreClient {
    pub admin: AdminClient<CoreTransport>,
    pub streams: StreamsClient<CoreTransport>,
    pub offsets: OffsetsClient<CoreTransport>,
    pub groups: GroupsClient<CoreTransport>,
    pub queues: QueuesClient<CoreTransport>,
    pub sessions: SessionsClient<CoreTransport>,
    pub timers: TimersClient<CoreTransport>,
    pub transactions: TransactionsClient<CoreTransport>,
    pub cluster: ClusterClient<CoreTransport>,
    /// Set for a core in this process: session streams skip the gRPC encoding.
    local_sessions: Option<Arc<dyn LocalSessions>>,
    local_queues: Option<Arc<dyn LocalQueues>>,
    transport: CoreTransport,
}

macro_rules! client {
    ($client:ident, $t:expr) => {
        $client::new($t.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
}

impl CoreClient {
    pub fn from_transport(t: CoreTransport) -> Self {
        Self {
            admin: client!(AdminClient, t),
            streams: client!(StreamsClient, t),
            offsets: client!(OffsetsClient, t),
            groups: client!(GroupsClient, t),
            queues: client!(QueuesClient, t),
            sessions: client!(SessionsClient, t),
            timers: client!(TimersClient, t),
            transactions: client!(TransactionsClient, t),
            cluster: client!(ClusterClient, t),
            local_sessions: None,
            local_queues: None,
            transport: t,
        }
    }

    /// This client with every call about `namespace` (see [`Scope`]). A core in this process
    /// serves every namespace, so an in-process client stays as it is; so does one for a
    /// namespace that cannot go in a header (a sharded core then refuses its calls).
    pub fn scoped(&self, namespace: &str) -> Self {
        let CoreTransport::Network {
            nodes,
            authorization,
            ..
        } = &self.transport
        else {
            return self.clone();
        };
        match nodes.scope(namespace) {
            Some(scope) => self.in_scope(nodes, authorization, scope),
            None => self.clone(),
        }
    }

    /// This client with its calls in `scope`.
    fn in_scope(
        &self,
        nodes: &Arc<CoreNodes>,
        authorization: &Option<http::HeaderValue>,
        scope: Arc<Scope>,
    ) -> Self {
        let mut scoped = Self::from_transport(CoreTransport::Network {
            nodes: nodes.clone(),
            authorization: authorization.clone(),
            scope: Some(scope),
        });
        scoped.local_sessions = self.local_sessions.clone();
        scoped.local_queues = self.local_queues.clone();
        scoped
    }

    /// This client for calls about one stream of its namespace: under a deployment spreading
    /// streams over shards, they go to the node serving the stream's shard. The same client
    /// when unscoped or in-process.
    pub fn for_stream(&self, stream: &str) -> Self {
        let CoreTransport::Network {
            nodes,
            authorization,
            scope: Some(scope),
        } = &self.transport
        else {
            return self.clone();
        };
        match scope
            .namespace
            .to_str()
            .ok()
            .and_then(|ns| nodes.scope_stream(ns, stream))
        {
            Some(scope) => self.in_scope(nodes, authorization, scope),
            None => self.clone(),
        }
    }

    /// How the core nodes place units, once one has said it spreads streams over shards
    /// (`None` before, under the namespace scheme, and in-process).
    pub fn placement(&self) -> Option<(tributary_proto::placement::Scheme, u32)> {
        match &self.transport {
            CoreTransport::Network { nodes, .. } => nodes.placement(),
            CoreTransport::InProcess(_) => None,
        }
    }

    /// Session streams go straight to `local` (a core in this process).
    pub fn with_local_sessions(mut self, local: Arc<dyn LocalSessions>) -> Self {
        self.local_sessions = Some(local);
        self
    }

    /// Publishes, acks, nacks and subscriptions go straight to `local` (a core in this
    /// process).
    pub fn with_local_queues(mut self, local: Arc<dyn LocalQueues>) -> Self {
        self.local_queues = Some(local);
        self
    }

    /// `Streams.Publish`.
    pub async fn publish(&self, req: PublishRequest) -> Result<PublishResponse, tonic::Status> {
        match &self.local_queues {
            Some(local) => local.publish(req).await,
            None => Ok(self.streams.clone().publish(req).await?.into_inner()),
        }
    }

    /// `Streams.Publish` in two halves (see [`LocalQueues::publish_staged`]). Across the
    /// network the whole call is the first half: the answer is in when it returns.
    pub async fn publish_staged(
        &self,
        req: PublishRequest,
    ) -> Result<LocalCall<PublishResponse>, tonic::Status> {
        match &self.local_queues {
            Some(local) => local.publish_staged(req).await,
            None => {
                let answer = self.streams.clone().publish(req).await?.into_inner();
                Ok(Box::pin(async move { Ok(answer) }))
            }
        }
    }

    /// `Queues.Ack`.
    pub async fn ack(&self, req: AckRequest) -> Result<AckResponse, tonic::Status> {
        match &self.local_queues {
            Some(local) => local.ack(req).await,
            None => Ok(self.queues.clone().ack(req).await?.into_inner()),
        }
    }

    /// `Queues.Nack`.
    pub async fn nack(&self, req: NackRequest) -> Result<NackResponse, tonic::Status> {
        match &self.local_queues {
            Some(local) => local.nack(req).await,
            None => Ok(self.queues.clone().nack(req).await?.into_inner()),
        }
    }

    /// `Queues.Enqueue`.
    pub async fn enqueue(&self, req: EnqueueRequest) -> Result<EnqueueResponse, tonic::Status> {
        match &self.local_queues {
            Some(local) => local.enqueue(req).await,
            None => Ok(self.queues.clone().enqueue(req).await?.into_inner()),
        }
    }

    /// `Queues.Receive` (a long poll waits in the core).
    pub async fn receive(&self, req: ReceiveRequest) -> Result<ReceiveResponse, tonic::Status> {
        match &self.local_queues {
            Some(local) => local.receive(req).await,
            None => Ok(self.queues.clone().receive(req).await?.into_inner()),
        }
    }

    /// `Queues.ChangeLease`.
    pub async fn change_lease(
        &self,
        req: ChangeLeaseRequest,
    ) -> Result<ChangeLeaseResponse, tonic::Status> {
        match &self.local_queues {
            Some(local) => local.change_lease(req).await,
            None => Ok(self.queues.clone().change_lease(req).await?.into_inner()),
        }
    }

    /// `Queues.Subscribe`: the start, then credit, in; messages out.
    pub async fn subscribe(
        &self,
        requests: impl futures::Stream<Item = SubscribeRequest> + Send + 'static,
    ) -> Result<SubscribeEvents, tonic::Status> {
        if let Some(local) = &self.local_queues {
            return Ok(local.subscribe(Box::pin(requests)));
        }
        let events = self.queues.clone().subscribe(requests).await?.into_inner();
        Ok(Box::pin(events))
    }

    /// Attaches a session stream (`Sessions.Attach`) that starts with `open`: commands in
    /// (at most `window` waiting), events out.
    pub async fn attach_session(
        &self,
        window: usize,
        open: Box<SessionCommand>,
    ) -> Result<SessionLink, tonic::Status> {
        use futures::StreamExt;
        if let Some(local) = &self.local_sessions {
            let mut link = SessionLink::local(local.attach(), window);
            link.send(open)
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            return Ok(link);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(window.max(1));
        let _ = tx.try_send(open);
        let events = self
            .sessions
            .clone()
            .attach(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|command| (*command, rx))
            }))
            .await?
            .into_inner();
        Ok(SessionLink::remote(
            tx,
            Box::pin(events.map(|event| event.map(Box::new))),
            window,
        ))
    }

    /// A client that calls the core's services in this process.
    pub fn in_process(routes: Routes) -> Self {
        Self::from_transport(CoreTransport::InProcess(routes))
    }

    /// A client for a core across the network (`http://host:7400`). Connects lazily and
    /// reconnects on its own, so a gateway may start before its core.
    pub fn connect_lazy(address: &str) -> Result<Self, ConnectError> {
        Self::connect_lazy_with_token(address, None)
    }

    /// [`CoreClient::connect_lazy`], sending `authorization: Bearer <token>` on every call
    /// when a token is given (a core with `core_token` set refuses calls without it).
    pub fn connect_lazy_with_token(
        address: &str,
        token: Option<&str>,
    ) -> Result<Self, ConnectError> {
        Self::connect_lazy_with(address, token, None)
    }

    /// [`CoreClient::connect_lazy_with_token`], over TLS when `tls` is given (the address is
    /// then `https://`). `address` may list several core nodes, comma-separated (cluster
    /// mode): calls go to the node that answered last.
    pub fn connect_lazy_with(
        address: &str,
        token: Option<&str>,
        tls: Option<&CoreTls>,
    ) -> Result<Self, ConnectError> {
        let authorization = token
            .map(|t| {
                let mut v = http::HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| ConnectError::InvalidToken)?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        let endpoints = address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| Ok((a.to_string(), endpoint(a, tls)?)))
            .collect::<Result<Vec<_>, ConnectError>>()?;
        if endpoints.is_empty() {
            return Err(ConnectError::NoAddress);
        }
        Ok(Self::from_transport(CoreTransport::Network {
            nodes: Arc::new(CoreNodes::new(endpoints)),
            authorization,
            scope: None,
        }))
    }
}

/// One core node's endpoint, with TLS when given.
fn endpoint(address: &str, tls: Option<&CoreTls>) -> Result<Endpoint, ConnectError> {
    let endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|source| ConnectError::InvalidAddress {
            address: address.into(),
            source,
        })?
        .tcp_nodelay(true)
        .http2_adaptive_window(true);
    let endpoint = match tls {
        None => endpoint,
        Some(tls) => {
            let mut config = tonic::transport::ClientTlsConfig::new();
            config = match &tls.ca_pem {
                Some(ca) => config.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                None => config.with_native_roots(),
            };
            if let Some((cert, key)) = &tls.identity_pem {
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            endpoint
                .tls_config(config)
                .map_err(|source| ConnectError::Tls {
                    address: address.into(),
                    source,
                })?
        }
    };
    Ok(endpoint)
}

/// The stable error code of a failed core call (`Internal` if the status carries none,
/// e.g. a transport failure).
pub fn error_code(status: &tonic::Status) -> ErrorCode {
    ErrorDetail::decode(status.details())
        .ok()
        .and_then(|d| ErrorCode::try_from(d.code).ok())
        .filter(|c| *c != ErrorCode::Unspecified)
        .unwrap_or(match status.code() {
            tonic::Code::Unimplemented => ErrorCode::Unsupported,
            tonic::Code::InvalidArgument => ErrorCode::InvalidArgument,
            tonic::Code::Unavailable => ErrorCode::ShuttingDown,
            tonic::Code::Unauthenticated => ErrorCode::Unauthenticated,
            _ => ErrorCode::Internal,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio_stream::wrappers::TcpListenerStream;

    /// The namespace header of each call a fake core node answered.
    type Seen = Arc<Mutex<Vec<Option<String>>>>;

    /// A core node that answers every call with `status`; `shard` adds the marker of a node
    /// that does not serve the call's namespace's shard.
    async fn fake_node(status: tonic::Code, shard: bool) -> (String, Seen) {
        let seen: Seen = Default::default();
        let record = seen.clone();
        let answer = tower::service_fn(move |req: http::Request<axum::body::Body>| {
            record.lock().unwrap().push(
                req.headers()
                    .get(tributary_proto::NAMESPACE_METADATA)
                    .map(|v| v.to_str().unwrap().to_string()),
            );
            let mut s = tonic::Status::new(status, "fake");
            if shard {
                s.metadata_mut()
                    .insert(tributary_proto::SHARD_METADATA, 3.into());
            }
            let (parts, ()) = s.into_http::<()>().into_parts();
            async move { Ok::<_, Infallible>(http::Response::from_parts(parts, Body::empty())) }
        });
        let routes = Routes::from(
            Routes::default()
                .into_axum_router()
                .fallback_service(answer),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (url, seen)
    }
    #[tokio::test]
    async fn a_scoped_client_names_its_namespace_and_moves_on_from_a_node_without_its_shard() {
        let (without, seen_without) = fake_node(tonic::Code::Unavailable, true).await;
        let (with, seen_with) = fake_node(tonic::Code::Unimplemented, false).await;
        let client =
            CoreClient::connect_lazy_with(&format!("{without},{with}"), None, None).unwrap();
        let scoped = client.scoped("tenant-a");
        let list = || tributary_proto::v1::ListStreamsRequest {
            namespace: "tenant-a".into(),
        };
        // The first node does not serve the shard: the call goes on to the next node, which
        // answers it, and the scope's next calls go there at once.
        let first = scoped.admin.clone().list_streams(list()).await.unwrap_err();
        assert_eq!(first.code(), tonic::Code::Unimplemented, "{first:?}");
        let second = scoped.admin.clone().list_streams(list()).await.unwrap_err();
        assert_eq!(second.code(), tonic::Code::Unimplemented, "{second:?}");
        assert_eq!(
            *seen_without.lock().unwrap(),
            vec![Some("tenant-a".to_string())]
        );
        assert_eq!(
            *seen_with.lock().unwrap(),
            vec![Some("tenant-a".to_string()); 2]
        );
        // Another client of the same namespace (the next AMQP connection to a virtual host)
        // starts where the first one found its shard.
        let again = client.scoped("tenant-a");
        let third = again.admin.clone().list_streams(list()).await.unwrap_err();
        assert_eq!(third.code(), tonic::Code::Unimplemented, "{third:?}");
        assert_eq!(seen_with.lock().unwrap().len(), 3);
        assert_eq!(seen_without.lock().unwrap().len(), 1);
        // An unscoped call names no namespace and is not moved by the scoped client's move;
        // answered as not served (the home shard is elsewhere), it goes on too.
        let unscoped = client.admin.clone().list_streams(list()).await.unwrap_err();
        assert_eq!(unscoped.code(), tonic::Code::Unimplemented, "{unscoped:?}");
        assert_eq!(seen_without.lock().unwrap().last(), Some(&None));
        assert_eq!(seen_with.lock().unwrap().last(), Some(&None));
        let moved = client.admin.clone().list_streams(list()).await.unwrap_err();
        assert_eq!(moved.code(), tonic::Code::Unimplemented, "{moved:?}");
        assert_eq!(seen_without.lock().unwrap().len(), 2, "went straight on");
    }

    #[tokio::test]
    async fn a_call_no_node_serves_is_tried_once_on_each_and_answered_unavailable() {
        let (a, seen_a) = fake_node(tonic::Code::Unavailable, true).await;
        let (b, seen_b) = fake_node(tonic::Code::Unavailable, true).await;
        let client = CoreClient::connect_lazy_with(&format!("{a},{b}"), None, None).unwrap();
        let scoped = client.scoped("moving");
        let answer = scoped
            .admin
            .clone()
            .list_streams(tributary_proto::v1::ListStreamsRequest {
                namespace: "moving".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(answer.code(), tonic::Code::Unavailable, "{answer:?}");
        assert_eq!(
            (seen_a.lock().unwrap().len(), seen_b.lock().unwrap().len()),
            (1, 1)
        );
    }

    #[test]
    fn only_subscriptions_and_sessions_are_streaming_calls() {
        assert!(is_streaming("/tributary.core.v1.Queues/Subscribe"));
        assert!(is_streaming("/tributary.core.v1.Sessions/Attach"));
        assert!(!is_streaming("/tributary.core.v1.Queues/Publish"));
        assert!(!is_streaming("/tributary.core.v1.Streams/Append"));
        assert!(!is_streaming("garbage"));
    }
}
