//! The core's gRPC API, package `tributary.core.v1`.
//!
//! Every gateway talks to the core through these clients, over the network or in-process
//! (see `tributary-gateway-common`).

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tributary.core.v1");
}

/// The AMQP gateway's own command and event messages between its transport and its broker
/// (package `tributary.amqp.link.v1`): not part of the core API, never on a network.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod amqp_link {
    tonic::include_proto!("tributary.amqp.link.v1");
}

pub mod placement;

/// Metadata key that carries the stable error code (the `ErrorCode` name) on every failed call.
pub const ERROR_CODE_METADATA: &str = "tributary-error-code";

/// Metadata key naming the namespace a call is about. A core node serving shards of a cluster
/// routes each call by it to the core of that namespace's shard; a single core ignores it.
pub const NAMESPACE_METADATA: &str = "tributary-namespace";

/// Metadata key on an UNAVAILABLE answer from a core node that does not serve the shard a
/// call's namespace belongs to: the shard's number. A gateway takes it as a reason to send
/// that namespace's calls to another node.
pub const SHARD_METADATA: &str = "tributary-shard";

/// Metadata key next to [`SHARD_METADATA`]: the node that owns the shard, as far as the
/// answering node knows (absent when nobody does, during a takeover).
pub const SHARD_OWNER_METADATA: &str = "tributary-shard-owner";

impl v1::StreamId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for v1::StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
