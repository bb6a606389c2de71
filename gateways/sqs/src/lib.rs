//! SQS-compatible gateway: AWS JSON 1.0 (`X-Amz-Target: AmazonSQS.<Action>`) and the query
//! protocol (form POST, XML answers) over HTTP/1.1, SigV4-verified, serving SQS queues that
//! are core queues (the core's queue engine gives visibility, delays, dead letters, FIFO
//! groups and deduplication; this crate translates).

pub mod actions;
pub mod attributes;
pub mod error;
mod http_api;
pub mod message;
pub mod names;
pub mod params;
pub mod render;
pub mod sigv4;

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::{Instrument, debug, info_span};
use tributary_gateway_common::{Accepted, CoreClient};

pub use actions::ACTIONS;
pub use names::Identity;

/// An access key SigV4 signatures are checked against.
#[derive(Clone)]
pub struct Credential {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct SqsConfig {
    pub region: String,
    pub account_id: String,
    /// The core namespace the account's queues live in.
    pub namespace: String,
    /// Empty: any signature (or none) is accepted.
    pub credentials: Vec<Credential>,
}

impl Default for SqsConfig {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            account_id: "000000000000".into(),
            namespace: "default".into(),
            credentials: Vec::new(),
        }
    }
}

/// The SQS gateway: serves HTTP/1.1 connections handed over by the shared accept loop.
pub struct Gateway {
    api: Arc<http_api::Api>,
}

impl Gateway {
    pub fn new(client: CoreClient, config: SqsConfig) -> Arc<Self> {
        let identity = Identity {
            region: config.region.clone(),
            account_id: config.account_id.clone(),
            namespace: config.namespace.clone(),
        };
        Arc::new(Self {
            api: Arc::new(http_api::Api::new(
                actions::Service::new(client, identity),
                config.credentials,
            )),
        })
    }
}

impl<S> tributary_gateway_common::Gateway<S> for Gateway
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    async fn serve_connection(self: Arc<Self>, conn: Accepted<S>, mut stop: watch::Receiver<bool>) {
        let peer = conn.peer;
        let span = info_span!("sqs_connection", %peer, id = conn.connection.id());
        let api = self.api.clone();
        let handle = conn.connection.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(conn.stream), service);
            tokio::pin!(served);
            tokio::select! {
                r = served.as_mut() => {
                    if let Err(e) = r {
                        debug!(error = %e, "connection ended");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => {}
                _ = handle.close_requested() => {}
            }
            // The request in progress (a long poll perhaps) finishes; no other is read.
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
        .instrument(span)
        .await
    }
}
