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

/// Metadata key that carries the stable error code (the `ErrorCode` name) on every failed call.
pub const ERROR_CODE_METADATA: &str = "tributary-error-code";

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
