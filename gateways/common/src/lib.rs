//! Plumbing every gateway shares: the core client (over the network or in-process, one
//! type either way), listeners that fail with a clear message, the accept loop every
//! listener runs ([`serve`]: handshake, limit, metrics, stop) and the [`Gateway`] trait a
//! protocol implements to be served by it, and the registry of the connections it serves
//! ([`Connections`]).

mod accounting;
pub mod auth;
pub mod client;
pub mod connections;
pub mod core_nodes;
pub mod gateway;
pub mod handshake;
pub mod identity;
pub mod idle_buffers;
pub mod listener;
pub mod serve;
pub mod session_link;
pub mod tls;
pub mod users;

pub use accounting::{Traffic, TrafficByListener};
pub use client::{ConnectError, CoreClient, CoreTransport, error_code};
pub use connections::{ConnectionHandle, ConnectionInfo, Connections};
pub use gateway::{Accepted, Gateway};
pub use handshake::{Handshake, Plain};
pub use listener::{ListenError, Listener, bind};
pub use serve::serve;
