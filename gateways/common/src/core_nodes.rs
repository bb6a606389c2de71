//! The core nodes a gateway reaches: one address, or in cluster mode every node's.
//!
//! In cluster mode one node serves at a time and the others stand by without listening
//! (see `tributary_core::cluster`), so the node to call is the one that answered last: a
//! call that cannot reach its node moves the gateway on to the next address, and the
//! client's retry goes there. No discovery protocol is needed, and a node that lost its
//! lease has exited, so it refuses connections rather than answering stale.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};
use tributary_proto::placement::{
    PLACEMENT_METADATA, Scheme, parse_placement, shard_of_unit, stream_unit,
};

/// With several nodes: how long a connection attempt may take before the next node is
/// tried (a node cut off by the network drops SYNs rather than refusing them).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// With several nodes: how soon a silent connection counts as dead (the node serving may
/// have been cut off; its successor is elsewhere).
const KEEPALIVE: Duration = Duration::from_secs(2);

pub struct CoreNodes {
    nodes: Vec<Node>,
    current: AtomicUsize,
    /// One scope per namespace (and per stream, for calls about one), shared by every client
    /// scoped to it (an AMQP gateway scopes each connection): what one finds out about its
    /// node, the next one starts from.
    scopes: Mutex<HashMap<ScopeKey, Arc<Scope>>>,
    /// How the deployment places units, once a node has said it spreads streams
    /// (`tributary_proto::placement::PLACEMENT_METADATA`).
    placement: Mutex<Option<(Scheme, u32)>>,
}

/// A scope's namespace and unit (`stream/<name>`, or none for the namespace's own calls).
type ScopeKey = (String, Option<String>);

/// The namespace a client's calls are about, for core nodes that serve shards of a cluster
/// (`tributary_core::cluster`): sent on every call, and the node serving it remembered apart
/// from other namespaces', since another namespace's shard may be on another node.
pub struct Scope {
    pub(crate) namespace: http::HeaderValue,
    /// The stream a client's calls are about (`stream/<name>`), sent with the namespace: a
    /// deployment spreading streams over shards routes by both.
    pub(crate) unit: Option<http::HeaderValue>,
    pub(crate) current: AtomicUsize,
}

struct Node {
    address: String,
    channel: Channel,
}

impl CoreNodes {
    /// Lazy channels to every endpoint; nothing is connected until the first call.
    pub fn new(endpoints: Vec<(String, Endpoint)>) -> Self {
        let several = endpoints.len() > 1;
        let nodes = endpoints
            .into_iter()
            .map(|(address, endpoint)| {
                let endpoint = if several {
                    endpoint
                        .connect_timeout(CONNECT_TIMEOUT)
                        .http2_keep_alive_interval(KEEPALIVE)
                        .keep_alive_timeout(KEEPALIVE)
                        .keep_alive_while_idle(true)
                } else {
                    endpoint
                };
                Node {
                    address,
                    channel: endpoint.connect_lazy(),
                }
            })
            .collect();
        Self {
            nodes,
            current: AtomicUsize::new(0),
            scopes: Mutex::new(HashMap::new()),
            placement: Mutex::new(None),
        }
    }

    /// The deployment's placement, if a node has said it spreads streams.
    pub fn placement(&self) -> Option<(Scheme, u32)> {
        *self.placement.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers what a node's answer says of the placement.
    pub(crate) fn saw_placement(&self, headers: &http::HeaderMap) {
        let Some(seen) = headers
            .get(PLACEMENT_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_placement)
        else {
            return;
        };
        let mut placement = self.placement.lock().unwrap_or_else(|e| e.into_inner());
        if *placement != Some(seen) {
            info!(scheme = %seen.0, shards = seen.1, "the core nodes spread streams over shards");
            *placement = Some(seen);
        }
    }

    /// The scope of `namespace`, made on first use starting from the node unscoped calls go
    /// to; `None` for a name that cannot go in a header.
    pub fn scope(&self, namespace: &str) -> Option<Arc<Scope>> {
        self.scope_unit(namespace, None, String::new())
    }

    /// The scope of one stream of `namespace` (`stream` = its name), made on first use
    /// starting from the node its namespace's calls go to. Once the nodes have said how they
    /// place streams, the streams of one shard share a scope (the first one's name routes
    /// them all to that shard), so there are at most as many as shards, not one per topic
    /// name ever asked about.
    pub fn scope_stream(&self, namespace: &str, stream: &str) -> Option<Arc<Scope>> {
        let unit = stream_unit(stream);
        let Some((scheme @ Scheme::Stream, shards)) = self.placement() else {
            return self.scope_unit(namespace, Some(unit.clone()), unit);
        };
        let shard = shard_of_unit(scheme, namespace, Some(&unit), shards);
        self.scope_unit(namespace, Some(format!("shard/{shard}")), unit)
    }

    /// The scope keyed `(namespace, key)`, sending `unit` (when keyed) as its unit header.
    fn scope_unit(&self, namespace: &str, key: Option<String>, unit: String) -> Option<Arc<Scope>> {
        let key = (namespace.to_string(), key);
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        // Every call about a stream asks: the headers are made once, with the scope.
        if let Some(scope) = scopes.get(&key) {
            return Some(scope.clone());
        }
        let header = http::HeaderValue::from_str(namespace).ok()?;
        let unit_header = match &key.1 {
            Some(_) => Some(http::HeaderValue::from_str(&unit).ok()?),
            None => None,
        };
        let start = match key.1 {
            Some(_) => scopes
                .get(&(namespace.to_string(), None))
                .map(|s| s.current.load(Ordering::Acquire)),
            None => None,
        }
        .unwrap_or_else(|| self.current.load(Ordering::Acquire));
        let scope = Arc::new(Scope {
            namespace: header,
            unit: unit_header,
            current: AtomicUsize::new(start),
        });
        scopes.insert(key, scope.clone());
        Some(scope)
    }

    /// The node to call, and its index for [`CoreNodes::unreachable`].
    pub fn pick(&self) -> (usize, Channel) {
        self.pick_in(&self.current)
    }

    /// The node to call for a namespace whose node is remembered in `current` (a core node
    /// serving shards serves some namespaces and not others).
    pub fn pick_in(&self, current: &AtomicUsize) -> (usize, Channel) {
        let i = current.load(Ordering::Acquire) % self.nodes.len();
        (i, self.nodes[i].channel.clone())
    }

    /// How many nodes are listed.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: [`CoreNodes::new`] is given at least one address by its callers.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn address(&self, index: usize) -> &str {
        &self.nodes[index].address
    }

    /// A call to node `index` failed to reach it: the next call goes to the next node.
    /// Calls failing together move the gateway on once, not once each.
    pub fn unreachable(&self, index: usize, error: &dyn std::fmt::Display) {
        self.unreachable_in(&self.current, index, error);
    }

    /// As [`CoreNodes::unreachable`], for the node remembered in `current`.
    pub fn unreachable_in(
        &self,
        current: &AtomicUsize,
        index: usize,
        error: &dyn std::fmt::Display,
    ) {
        if self.nodes.len() == 1 {
            return;
        }
        let next = (index + 1) % self.nodes.len();
        if current
            .compare_exchange(index, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let (from, to) = (&self.nodes[index].address, &self.nodes[next].address);
            if next == 0 {
                warn!(from = %from, to = %to, error = %error, "no core node answered; trying them again from the first");
            } else {
                info!(from = %from, to = %to, error = %error, "core node unreachable; trying the next");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> CoreNodes {
        CoreNodes::new(
            (0..n)
                .map(|i| {
                    let a = format!("http://127.0.0.1:{}", 1 + i);
                    (a.clone(), Endpoint::from_shared(a).unwrap())
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn failures_move_on_once_and_wrap_around() {
        let n = nodes(3);
        assert_eq!(n.pick().0, 0);
        // Two calls that both went to node 0 fail: one move, to node 1.
        n.unreachable(0, &"refused");
        n.unreachable(0, &"refused");
        assert_eq!(n.pick().0, 1);
        n.unreachable(1, &"refused");
        n.unreachable(2, &"refused");
        assert_eq!(n.pick().0, 0);
    }

    #[tokio::test]
    async fn one_node_stays() {
        let n = nodes(1);
        n.unreachable(0, &"refused");
        assert_eq!(n.pick().0, 0);
    }

    #[tokio::test]
    async fn stream_scopes_are_per_shard_once_the_placement_is_known() {
        let n = nodes(2);
        let (a, b) = (
            n.scope_stream("default", "a").unwrap(),
            n.scope_stream("default", "b").unwrap(),
        );
        assert!(
            !Arc::ptr_eq(&a, &b),
            "per stream before the placement is known"
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(PLACEMENT_METADATA, "stream/2".parse().unwrap());
        n.saw_placement(&headers);
        assert_eq!(n.placement(), Some((Scheme::Stream, 2)));
        let before = n.scopes.lock().unwrap().len();
        let scopes: Vec<_> = (0..100)
            .map(|t| {
                let name = format!("topic-{t}");
                let shard = shard_of_unit(Scheme::Stream, "default", Some(&stream_unit(&name)), 2);
                (shard, n.scope_stream("default", &name).unwrap())
            })
            .collect();
        assert_eq!(n.scopes.lock().unwrap().len(), before + 2);
        for (shard, scope) in &scopes {
            // Whichever stream made the scope, its unit routes to the same shard.
            let unit = scope.unit.as_ref().unwrap().to_str().unwrap();
            assert_eq!(
                shard_of_unit(Scheme::Stream, "default", Some(unit), 2),
                *shard
            );
        }
    }
}
