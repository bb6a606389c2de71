//! Plumbing every gateway shares: the core client (over the network or in-process, one
//! type either way), listeners that fail with a clear message, and connection metrics.

pub mod auth;
pub mod client;
pub mod listener;
pub mod tls;

pub use client::{ConnectError, CoreClient, CoreTransport, error_code};
pub use listener::{ConnectionGuard, ListenError, bind};
