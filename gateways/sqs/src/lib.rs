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
use tributary_gateway_common::{Accepted, CoreClient, Traffic};

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
        let client = client.scoped(&config.namespace);
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
        let traffic = Traffic::new(conn.listener);
        async move {
            let service = hyper::service::service_fn(move |req| {
                let (api, traffic) = (api.clone(), traffic.clone());
                async move { Ok::<_, std::convert::Infallible>(api.handle(req, &traffic).await) }
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

/// Both request parsers and the checks that need no core, on arbitrary bytes: the cargo-fuzz
/// target `sqs_request` and a test run this. Never panics.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) {
    let (first, rest) = data.split_first().unwrap_or((&0, &[]));
    let params = if first % 2 == 0 {
        params::Params::from_json(rest)
    } else {
        let fields: Vec<(String, String)> = form_urlencoded::parse(rest).into_owned().collect();
        params::Params::from_form(&fields)
    };
    let Ok(p) = params else { return };
    let identity = Identity {
        region: "us-east-1".into(),
        account_id: "000000000000".into(),
        namespace: "default".into(),
    };
    for name in ["MessageAttributes", "MessageSystemAttributes"] {
        if let Ok(m) = p.object(name)
            && let Ok(attrs) = message::parse_attributes("message attribute", &m)
        {
            let encoded = message::encode(&attrs);
            assert_eq!(message::decode(&encoded).as_ref(), Some(&attrs));
            let _ = message::attributes_md5(&attrs);
        }
    }
    if let Ok(attrs) = p.string_map("Attributes") {
        let mut c = attributes::defaults(first % 4 == 1);
        let _ = attributes::apply(&identity, &mut c, &attrs, true);
    }
    for e in p.entries("Entries").unwrap_or_default() {
        let _ = e.int_in("DelaySeconds", 0, 900);
        let _ = e
            .str("MessageBody")
            .map(|b| b.map(|b| message::check_text("body", b)));
    }
    let _ = p.strings("AttributeNames");
    let _ = p.int("MaxNumberOfMessages");
    if let Ok(Some(url)) = p.str("QueueUrl") {
        let _ = identity.name_of_url(url);
    }
    let _ = render::xml_response("Fuzz", &serde_json::Value::Object(p.0.clone()), "id");
    let _ = message::decode(rest);
}

#[cfg(test)]
mod fuzz_smoke {
    /// A few thousand mutations of real requests through [`super::fuzz_request`]: the
    /// cargo-fuzz target's property (no panic) on every test run.
    #[test]
    fn mutated_requests_never_panic() {
        let seeds: [&[u8]; 3] = [
            br#"{"QueueUrl":"http://h/000000000000/q","MessageBody":"x","MessageAttributes":{"a":{"DataType":"Binary","BinaryValue":"AAE="}},"Entries":[{"Id":"1","DelaySeconds":5}],"Attributes":{"RedrivePolicy":"{\"deadLetterTargetArn\":\"arn:aws:sqs:us-east-1:000000000000:d\",\"maxReceiveCount\":2}"}}"#,
            b"Action=SendMessageBatch&SendMessageBatchRequestEntry.1.Id=a&SendMessageBatchRequestEntry.1.MessageAttribute.1.Name=n&SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.DataType=Number&SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.StringValue=1e3&Attribute.1.Name=FifoQueue&Attribute.1.Value=true",
            b"",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (i, seed) in seeds.iter().enumerate() {
            for round in 0..2000 {
                let mut data = vec![(i + round) as u8];
                data.extend_from_slice(seed);
                for _ in 0..(next() % 8) {
                    if data.is_empty() {
                        break;
                    }
                    let at = (next() as usize) % data.len();
                    match next() % 3 {
                        0 => data[at] = next() as u8,
                        1 => {
                            data.remove(at);
                        }
                        _ => data.insert(at, next() as u8),
                    }
                }
                super::fuzz_request(&data);
            }
        }
    }
}
