//! The `tributary` binary's library: configuration, the admin HTTP API and process wiring.
//! Integration tests drive the real binary; this library keeps `main.rs` small.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod metrics_catalog;
pub mod metrics_units;
pub mod server;
