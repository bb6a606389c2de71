//! One gRPC endpoint in front of the cores of the shards a node serves
//! ([`super::shard_cores`]). A call names its namespace in the `tributary-namespace` header
//! (the core API's requests carry it in their body, which a router cannot read without
//! decoding every message type); the router hands the call to the core of that namespace's
//! shard, or answers UNAVAILABLE naming the node that owns it, which a gateway takes as a
//! reason to try another node.
//!
//! Under the stream scheme ([`Scheme::Stream`]), a call about one stream also names it in the
//! `tributary-unit` header, and goes to that stream's shard.
//!
//! Calls whose state belongs to no namespace (users, the list of namespaces) go to the home
//! shard, the shard of the empty namespace, whatever header they carry: one core holds them,
//! so every gateway sees the same users.
//!
//! The `Cluster` service (which node serves which shard) is the node's, not a shard's: the
//! router answers it from its own view of the shard keys.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::service::Routes;
use tributary_proto::v1::{
    DescribeShardsRequest, DescribeShardsResponse, cluster_server::Cluster,
    cluster_server::ClusterServer,
};

use super::shard_cores::ShardCores;
use tributary_proto::placement::{
    PLACEMENT_METADATA, Scheme, UNIT_METADATA as UNIT_HEADER, placement_value, shard_of_unit,
};

pub use tributary_proto::{
    NAMESPACE_METADATA as NAMESPACE_HEADER, SHARD_METADATA as SHARD_HEADER,
    SHARD_OWNER_METADATA as OWNER_HEADER,
};

/// Methods served by the home shard: their state belongs to no namespace.
const HOME_METHODS: &[&str] = &[
    "/tributary.core.v1.Admin/PutUser",
    "/tributary.core.v1.Admin/DeleteUser",
    "/tributary.core.v1.Admin/ListUsers",
    "/tributary.core.v1.Admin/ListNamespaces",
];

/// Who owns a shard, by this node's last look at the shard keys.
pub type ShardOwners = Arc<dyn Fn(u32) -> Option<String> + Send + Sync>;

/// The path prefix of the `Cluster` service, answered by the node.
const CLUSTER_SERVICE: &str = "/tributary.core.v1.Cluster/";

/// The node's answer to `Cluster.DescribeShards`.
#[derive(Clone)]
struct ShardMap {
    node: String,
    shards: u32,
    scheme: Scheme,
    owners: ShardOwners,
}

#[tonic::async_trait]
impl Cluster for ShardMap {
    async fn describe_shards(
        &self,
        _: tonic::Request<DescribeShardsRequest>,
    ) -> Result<tonic::Response<DescribeShardsResponse>, tonic::Status> {
        Ok(tonic::Response::new(DescribeShardsResponse {
            shards: self.shards,
            scheme: self.scheme.as_str().into(),
            owners: (0..self.shards)
                .map(|s| (self.owners)(s).unwrap_or_default())
                .collect(),
            node: self.node.clone(),
        }))
    }
}

#[derive(Clone)]
pub struct ShardRouter {
    cores: Arc<ShardCores>,
    shards: u32,
    scheme: Scheme,
    owners: ShardOwners,
    /// Under the stream scheme, the value every answer carries in `tributary-placement`, for
    /// gateways to split calls by shard; made once, not per call.
    placement: Option<http::HeaderValue>,
    /// The `Cluster` service, answered by this node.
    cluster: Routes,
}

impl ShardRouter {
    /// The router of node `node`, serving its share of `shards` through `cores`.
    pub fn new(
        node: &str,
        cores: Arc<ShardCores>,
        shards: u32,
        scheme: Scheme,
        owners: ShardOwners,
    ) -> Self {
        let placement = (scheme == Scheme::Stream)
            .then(|| placement_value(scheme, shards).parse().ok())
            .flatten();
        let cluster = Routes::new(ClusterServer::new(ShardMap {
            node: node.to_string(),
            shards,
            scheme,
            owners: owners.clone(),
        }));
        Self {
            cores,
            shards,
            scheme,
            owners,
            placement,
            cluster,
        }
    }

    /// As tonic routes, to serve with `tonic::transport::Server::add_routes`.
    pub fn into_routes(self) -> Routes {
        Routes::from(Routes::default().into_axum_router().fallback_service(self))
    }

    /// The namespace a call is for (the home shard's for [`HOME_METHODS`]) and the unit it
    /// names, if any.
    fn namespace<B>(
        &self,
        req: &http::Request<B>,
    ) -> Result<(String, Option<String>), tonic::Status> {
        if HOME_METHODS.contains(&req.uri().path()) {
            return Ok((String::new(), None));
        }
        // Names are UTF-8 (a header carries their bytes as they are), not only ASCII.
        let utf8 = |name: &str, v: &http::HeaderValue| {
            std::str::from_utf8(v.as_bytes())
                .map(str::to_string)
                .map_err(|_| {
                    tonic::Status::invalid_argument(format!("the {name} header is not UTF-8"))
                })
        };
        // The unit matters only where streams are placed apart from their namespace.
        let unit = match req.headers().get(UNIT_HEADER) {
            Some(v) if self.scheme == Scheme::Stream => Some(utf8(UNIT_HEADER, v)?),
            _ => None,
        };
        match req.headers().get(NAMESPACE_HEADER) {
            Some(v) => utf8(NAMESPACE_HEADER, v).map(|ns| (ns, unit)),
            None => Err(tonic::Status::failed_precondition(format!(
                "this core node serves shards of a cluster: a call must name its namespace in the {NAMESPACE_HEADER} header"
            ))),
        }
    }
}

fn status_response(status: tonic::Status) -> http::Response<Body> {
    let (parts, ()) = status.into_http::<()>().into_parts();
    http::Response::from_parts(parts, Body::empty())
}

type RouteFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<B> tower::Service<http::Request<B>> for ShardRouter
where
    Routes: tower::Service<
            http::Request<B>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        >,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is the chosen core's, awaited in the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> RouteFuture {
        let placement = self.placement.clone();
        let routed = self.route(req);
        match placement {
            None => routed,
            Some(value) => Box::pin(async move {
                let mut response = routed.await?;
                response.headers_mut().insert(PLACEMENT_METADATA, value);
                Ok(response)
            }),
        }
    }
}

impl ShardRouter {
    fn route<B>(&mut self, req: http::Request<B>) -> RouteFuture
    where
        Routes: tower::Service<
                http::Request<B>,
                Response = http::Response<Body>,
                Error = Infallible,
                Future: Send + 'static,
            >,
    {
        if req.uri().path().starts_with(CLUSTER_SERVICE) {
            return Box::pin(tower::Service::call(&mut self.cluster, req));
        }
        let (namespace, unit) = match self.namespace(&req) {
            Ok(named) => named,
            Err(status) => return Box::pin(async move { Ok(status_response(status)) }),
        };
        let shard = shard_of_unit(self.scheme, &namespace, unit.as_deref(), self.shards);
        match self.cores.routes(shard) {
            // Routes (an axum router) is always ready, as its `poll_ready` says.
            Some(mut routes) => Box::pin(tower::Service::call(&mut routes, req)),
            None => {
                let owner = (self.owners)(shard);
                let mut status = tonic::Status::unavailable(format!(
                    "shard {shard} (namespace '{namespace}'{}) is not served by this node; {}",
                    unit.as_deref().map_or(String::new(), |u| format!(", {u}")),
                    owner
                        .as_deref()
                        .map_or("nobody serves it right now".to_string(), |o| format!(
                            "node {o} does"
                        ))
                ));
                status.metadata_mut().insert(SHARD_HEADER, shard.into());
                if let Some(o) = owner.and_then(|o| o.parse().ok()) {
                    status.metadata_mut().insert(OWNER_HEADER, o);
                }
                Box::pin(async move { Ok(status_response(status)) })
            }
        }
    }
}
