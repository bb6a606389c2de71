//! One client connection: size-prefixed frames in, responses out, in request order.
//!
//! Responses keep the order clients rely on. Requests are served one at a time per
//! connection, as Kafka's broker does, except that up to five Produce requests wait for
//! durability together: each is appended (its offsets taken, in request order) before the
//! next is read, and answered once durable. Any other request waits until the produces
//! before it are answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use kafka_protocol::messages::{
    ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind, SaslAuthenticateResponse,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Gateway;
use crate::errors::ConnectionError;
use crate::produce_order::ProduceOrder;
use crate::sasl::{Conversation, Step};
use crate::versions;

use tributary_gateway_common::idle_buffers::{ReadBuffer, WriteBuffer};
use tributary_gateway_common::{Accepted, ConnectionHandle, Traffic};

/// How much room each read of a connection asks for, and the largest answer gathered
/// with others into one write (larger ones go to the socket directly).
const CONNECTION_BUFFER: usize = 4 * 1024;

/// What the gateway knows about the connection's client.
pub(crate) struct Session {
    pub peer: SocketAddr,
    /// The listener's name (its metrics label).
    pub listener: &'static str,
    /// Records in and out of this connection, in the listener's traffic metrics.
    pub traffic: Traffic,
    pub client_id: String,
    /// SASL progress; `None` once authenticated (or when SASL is off).
    sasl: Option<SaslProgress>,
    pub principal: Option<String>,
    /// Set when the connection must close once the current response is written (failed
    /// authentication, as Kafka's broker does).
    close_after: Option<String>,
    /// Its entry in the process's connection list.
    connection: ConnectionHandle,
    /// The order its pipelined produces settle their answers in.
    produce_order: ProduceOrder,
}

enum SaslProgress {
    AwaitingHandshake,
    Mechanism(Conversation),
}

pub(crate) async fn serve_connection<S>(
    conn: Accepted<S>,
    certificate_subject: Option<String>,
    gateway: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        // A plain TCP stream or a TLS session (the accept loop set TCP_NODELAY already),
        // read and written in turn: a connection serves one request at a time.
        stream: mut io,
        peer,
        listener,
        connection,
    } = conn;
    connection.set_namespace(gateway.config.namespace.clone());
    let span = info_span!("kafka_conn", %peer, listener, connection = connection.id());
    async move {
        // The SSL security protocol: without SASL, a verified client certificate names the
        // principal (through ssl.principal.mapping.rules); with SASL, the login does.
        let principal = match (&gateway.config.sasl, certificate_subject) {
            (None, Some(subject)) => match gateway.config.ssl_principal_rules.map(&subject) {
                Some(p) => Some(p),
                None => {
                    // Kafka fails the authentication (NoMatchingRule) and closes.
                    gateway.logins.refused(
                        listener,
                        peer,
                        &subject,
                        "no_principal_rule",
                        "no ssl.principal.mapping.rules rule applies to the certificate subject",
                    );
                    return;
                }
            },
            _ => None,
        };
        if let Some(p) = &principal {
            connection.set_user(p.as_str());
        }
        let mut session = Session {
            peer,
            listener,
            traffic: Traffic::new(listener),
            client_id: String::new(),
            sasl: gateway
                .config
                .sasl
                .as_ref()
                .map(|_| SaslProgress::AwaitingHandshake),
            principal,
            close_after: None,
            connection,
            produce_order: ProduceOrder::default(),
        };
        let result = tokio::select! {
            r = serve(&mut io, &gateway, &mut session) => r,
            _ = stop.wait_for(|s| *s) => Ok(()),
        };
        match result {
            Ok(()) => debug!("connection closed"),
            Err(ConnectionError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                debug!("connection reset by the client")
            }
            // One line per bad connection; everyone else keeps being served.
            Err(e) => warn!(client_id = %session.client_id, "closing kafka connection: {e}"),
        }
    }
    .instrument(span)
    .await
}

/// How many Produce requests of one connection may wait for durability at once (the
/// Java client's and librdkafka's default `max.in.flight.requests.per.connection`).
const PIPELINED_PRODUCES: usize = 5;

/// A response still being served: a Produce waiting for durability.
type PendingAnswer = BoxFuture<'static, Result<Option<Bytes>, ConnectionError>>;

async fn serve<S>(
    io: &mut S,
    gateway: &Gateway,
    session: &mut Session,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Held only while they have bytes in them (idle_buffers.rs): an idle connection keeps
    // neither.
    let mut input = ReadBuffer::new(CONNECTION_BUFFER);
    let mut output = WriteBuffer::default();
    // Produces whose appends are in the log, answered in request order once durable.
    let mut pending: FuturesOrdered<PendingAnswer> = FuturesOrdered::new();
    loop {
        let frame = loop {
            let want = match next_frame(input.bytes(), gateway.config.max_request_bytes)? {
                Frame::Whole(frame) => break frame,
                Frame::Missing(n) => n,
            };
            // An operator's close is taken between requests: the ones being served get their
            // answers (a produce its acknowledgement) first, and Kafka has no goodbye to send.
            let read = tokio::select! {
                biased;
                Some(answer) = pending.next(), if !pending.is_empty() => {
                    write_answer(&mut output, io, answer?).await?;
                    output.flush(io).await?;
                    continue;
                }
                n = input.fill(io, want) => n?,
                () = session.connection.close_requested() => {
                    info!(client_id = %session.client_id, "connection closed by an operator");
                    drain(&mut pending, &mut output, io).await?;
                    output.flush(io).await?;
                    return Ok(());
                }
            };
            if read == 0 {
                if input.is_empty() {
                    return Ok(());
                }
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        };
        let produce = frame.get(..2) == Some(&(ApiKey::Produce as i16).to_be_bytes()[..]);
        if !produce {
            // Anything else is served once every earlier produce is answered: it may read
            // what they wrote, and its answer comes after theirs.
            drain(&mut pending, &mut output, io).await?;
        } else if pending.len() >= PIPELINED_PRODUCES {
            write_next_answer(&mut pending, &mut output, io).await?;
        }
        // Boxed: inline, every request handler's state machine would size the connection's
        // task, which an idle connection holds while it waits for its next request.
        let served = {
            let mut serving = Box::pin(begin_frame(frame, gateway, session));
            match futures::poll!(serving.as_mut()) {
                // Answered at once (ApiVersions, a refusal) or appended at once.
                Poll::Ready(r) => r,
                Poll::Pending if output.is_empty() => serving.await,
                // This request waits (for the core, for the log): the answers already made
                // are written meanwhile, not held until it is served.
                Poll::Pending => {
                    let (r, written) = tokio::join!(serving, output.flush(io));
                    written?;
                    r
                }
            }
        };
        if served.is_err() {
            // The connection closes over this request: what earlier ones were answered
            // still reaches the client.
            output.flush(io).await?;
        }
        match served? {
            Served::Later(answer) => pending.push_back(answer),
            Served::Now(answer) if produce => {
                pending.push_back(Box::pin(std::future::ready(Ok(answer))));
            }
            Served::Now(answer) => write_answer(&mut output, io, answer).await?,
        }
        // Pipelined requests already read whole are answered with one write; the answers
        // are written before the connection waits for more bytes. (Waiting for the rest of a
        // request read in part while holding them kept every answer back for as long as a
        // pipelining client kept sending: seconds.)
        if !whole_frame_buffered(input.bytes()) || session.close_after.is_some() {
            output.flush(io).await?;
        }
        if let Some(why) = session.close_after.take() {
            return Err(ConnectionError::AuthenticationFailed(why));
        }
    }
}

/// Writes every pending answer, in order.
async fn drain<S>(
    pending: &mut FuturesOrdered<PendingAnswer>,
    output: &mut WriteBuffer,
    io: &mut S,
) -> Result<(), ConnectionError>
where
    S: AsyncWrite + Unpin,
{
    while write_next_answer(pending, output, io).await? {}
    Ok(())
}

/// Writes the oldest pending answer once it is ready (`false`: none was pending). The
/// answers already written go to the socket while it waits.
async fn write_next_answer<S>(
    pending: &mut FuturesOrdered<PendingAnswer>,
    output: &mut WriteBuffer,
    io: &mut S,
) -> Result<bool, ConnectionError>
where
    S: AsyncWrite + Unpin,
{
    let answer = match pending.next().now_or_never() {
        Some(answer) => answer,
        None => {
            output.flush(io).await?;
            pending.next().await
        }
    };
    let Some(answer) = answer else {
        return Ok(false);
    };
    write_answer(output, io, answer?).await?;
    Ok(true)
}

/// Frames one encoded answer (`None`: the request wants none).
async fn write_answer<S>(
    output: &mut WriteBuffer,
    io: &mut S,
    answer: Option<Bytes>,
) -> Result<(), ConnectionError>
where
    S: AsyncWrite + Unpin,
{
    let Some(response) = answer else {
        return Ok(());
    };
    output.extend_from_slice(&(response.len() as i32).to_be_bytes());
    if response.len() <= CONNECTION_BUFFER {
        output.extend_from_slice(&response);
    } else {
        // A large body (a Fetch) goes straight to the socket instead of being copied once
        // more.
        output.flush(io).await?;
        io.write_all(&response).await?;
    }
    Ok(())
}

/// Whether the next frame is in `buf` whole, so that serving it needs no read.
fn whole_frame_buffered(buf: &[u8]) -> bool {
    match buf.get(..4) {
        Some(&[a, b, c, d]) => {
            let size = i32::from_be_bytes([a, b, c, d]);
            size >= 0 && buf.len() - 4 >= size as usize
        }
        _ => false,
    }
}

enum Frame {
    Whole(Bytes),
    /// How many more bytes the next frame needs (0 while its size is not read yet).
    Missing(usize),
}

/// Takes the next whole size-prefixed frame off the front of `buf`.
fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Frame, ConnectionError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(Frame::Missing(0));
    };
    let size = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if size < 0 || size as usize > max {
        return Err(ConnectionError::TooLarge {
            size: i64::from(size),
            limit: max,
        });
    }
    let total = 4 + size as usize;
    if buf.len() < total {
        return Ok(Frame::Missing(total - buf.len()));
    }
    let mut frame = buf.split_to(total);
    frame.advance(4);
    Ok(Frame::Whole(frame.freeze()))
}

/// A request served as far as it can be without waiting for durability.
enum Served {
    /// The encoded answer (`None`: the protocol wants none).
    Now(Option<Bytes>),
    /// A Produce whose batches are appended, answering once they are durable.
    Later(PendingAnswer),
}

/// Decodes one request frame and serves it, a Produce up to its appends.
async fn begin_frame(
    frame: Bytes,
    gateway: &Gateway,
    session: &mut Session,
) -> Result<Served, ConnectionError> {
    let (api, version, mut body, header) = decode_request(frame)?;
    if let Some(id) = header.client_id.as_ref()
        && session.client_id != id.as_str()
    {
        session.client_id = id.to_string();
        session.connection.set_client_id(id.as_str());
    }
    let correlation_id = header.correlation_id;
    let span = tracing::debug_span!("kafka_request", api = ?api, version, correlation_id);
    let begun = async {
        if !versions::supports(api, version) {
            if api == ApiKey::ApiVersions {
                // KIP-511: answer in v0 with UNSUPPORTED_VERSION and our ranges.
                return Ok(Begun::Answer(Some((
                    ResponseKind::ApiVersions(versions::api_versions(35)),
                    0,
                ))));
            }
            return Err(ConnectionError::UnsupportedVersion { api, version });
        }
        let request =
            RequestKind::decode(api, &mut body, version).map_err(|e| ConnectionError::Decode {
                api,
                version,
                reason: e.to_string(),
            })?;
        if session.sasl.is_some() {
            return sasl_gate(gateway, session, request)
                .await
                .map(|r| Begun::Answer(r.map(|r| (r, version))));
        }
        if let RequestKind::Produce(request) = request {
            let authz = gateway.authz(session).await;
            let turn = session.produce_order.next();
            let in_flight = crate::data::produce_begin(gateway, &authz, &session.traffic, request)
                .await
                .in_turn(turn);
            return Ok(Begun::Produce(in_flight));
        }
        Ok(Begun::Answer(
            crate::dispatch(gateway, session, &header, request, version)
                .await
                .map(|r| (r, version)),
        ))
    }
    .instrument(span.clone())
    .await?;
    match begun {
        Begun::Answer(None) => Ok(Served::Now(None)),
        Begun::Answer(Some((response, version))) => {
            encode_response(api, version, correlation_id, &response).map(|r| Served::Now(Some(r)))
        }
        Begun::Produce(in_flight) => Ok(Served::Later(Box::pin(
            async move {
                let Some(response) = in_flight.finish().await else {
                    return Ok(None);
                };
                encode_response(
                    api,
                    version,
                    correlation_id,
                    &ResponseKind::Produce(response),
                )
                .map(Some)
            }
            .instrument(span),
        ))),
    }
}

/// How far `begin_frame` got with a request.
enum Begun {
    /// Served: its answer and the version to encode it in (`None`: no answer).
    Answer(Option<(ResponseKind, i16)>),
    /// A Produce appended and waiting for durability.
    Produce(crate::data::ProduceInFlight),
}

/// Decodes a whole request frame as the connection loop does: header, version check, body.
/// The fuzz target drives this with arbitrary bytes.
pub fn decode_frame(frame: Bytes) -> Result<(RequestHeader, RequestKind), ConnectionError> {
    let (api, version, mut body, header) = decode_request(frame)?;
    if !versions::supports(api, version) {
        return Err(ConnectionError::UnsupportedVersion { api, version });
    }
    let request =
        RequestKind::decode(api, &mut body, version).map_err(|e| ConnectionError::Decode {
            api,
            version,
            reason: e.to_string(),
        })?;
    Ok((header, request))
}

/// Splits a frame into (api, version, body, header); checks lengths before reading.
pub fn decode_request(
    mut frame: Bytes,
) -> Result<(ApiKey, i16, Bytes, RequestHeader), ConnectionError> {
    if frame.len() < 8 {
        return Err(ConnectionError::ShortFrame(frame.len()));
    }
    let raw_key = (&frame[0..2]).get_i16();
    let version = (&frame[2..4]).get_i16();
    let api = ApiKey::try_from(raw_key).map_err(|_| ConnectionError::UnknownApiKey(raw_key))?;
    // An ApiVersions request of a version we do not know still has a v2-style header (KIP-511).
    let header_version = if api == ApiKey::ApiVersions && !versions::supports(api, version) {
        1
    } else if (api.valid_versions().min..=api.valid_versions().max).contains(&version) {
        api.request_header_version(version)
    } else {
        return Err(ConnectionError::UnsupportedVersion { api, version });
    };
    let header =
        RequestHeader::decode(&mut frame, header_version).map_err(|e| ConnectionError::Decode {
            api,
            version,
            reason: format!("request header: {e}"),
        })?;
    Ok((api, version, frame, header))
}

pub fn encode_response(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    response: &ResponseKind,
) -> Result<Bytes, ConnectionError> {
    // A Fetch response is mostly its record batches: size the buffer for them up front instead
    // of growing (and copying) it several times on the way to a megabyte.
    let records: usize = match response {
        ResponseKind::Fetch(f) => f
            .responses
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
            .sum(),
        _ => 0,
    };
    let mut buf = BytesMut::with_capacity(records + 512);
    let encode_err = |e: anyhow_like::Error| ConnectionError::Encode {
        api,
        version,
        reason: e.0,
    };
    // ApiVersions responses always use header v0 so any client can read them.
    let header_version = if api == ApiKey::ApiVersions {
        0
    } else {
        response.header_version(version)
    };
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, header_version)
        .map_err(|e| encode_err(anyhow_like::Error(e.to_string())))?;
    response
        .encode(&mut buf, version)
        .map_err(|e| encode_err(anyhow_like::Error(e.to_string())))?;
    Ok(buf.freeze())
}

/// Keeps `anyhow` out of our error types: its errors are carried as text.
mod anyhow_like {
    pub struct Error(pub String);
}

/// Before authentication only ApiVersions, SaslHandshake and SaslAuthenticate are served;
/// anything else closes the connection, as Kafka's broker does.
async fn sasl_gate(
    gateway: &Gateway,
    session: &mut Session,
    request: RequestKind,
) -> Result<Option<ResponseKind>, ConnectionError> {
    let users = gateway
        .config
        .sasl
        .as_ref()
        .expect("SASL progress implies SASL is configured");
    match request {
        RequestKind::ApiVersions(_) => {
            Ok(Some(ResponseKind::ApiVersions(versions::api_versions(0))))
        }
        RequestKind::SaslHandshake(req) => {
            let mechanism = req.mechanism.as_str();
            let enabled: Vec<StrBytes> = crate::sasl::MECHANISMS
                .iter()
                .map(|m| StrBytes::from_static_str(m))
                .collect();
            match Conversation::start(mechanism, users.current().await) {
                Some(c) => {
                    session.sasl = Some(SaslProgress::Mechanism(c));
                    Ok(Some(ResponseKind::SaslHandshake(
                        SaslHandshakeResponse::default().with_mechanisms(enabled),
                    )))
                }
                None => Ok(Some(ResponseKind::SaslHandshake(
                    SaslHandshakeResponse::default()
                        .with_error_code(33) // UNSUPPORTED_SASL_MECHANISM
                        .with_mechanisms(enabled),
                ))),
            }
        }
        RequestKind::SaslAuthenticate(req) => {
            let Some(SaslProgress::Mechanism(conversation)) = session.sasl.as_mut() else {
                return Ok(Some(ResponseKind::SaslAuthenticate(
                    SaslAuthenticateResponse::default()
                        .with_error_code(34) // ILLEGAL_SASL_STATE
                        .with_error_message(Some(StrBytes::from_static_str(
                            "SaslHandshake must come first",
                        ))),
                )));
            };
            match conversation.step(&req.auth_bytes) {
                Step::Continue(reply) => Ok(Some(ResponseKind::SaslAuthenticate(
                    SaslAuthenticateResponse::default().with_auth_bytes(reply),
                ))),
                Step::Done { reply, user } => {
                    info!(user = %user, "SASL authentication succeeded");
                    session.connection.set_user(user.as_str());
                    session.principal = Some(user);
                    session.sasl = None;
                    Ok(Some(ResponseKind::SaslAuthenticate(
                        SaslAuthenticateResponse::default().with_auth_bytes(reply),
                    )))
                }
                Step::Failed(why) => {
                    gateway.logins.refused(
                        session.listener,
                        session.peer,
                        "",
                        "bad_credentials",
                        &why,
                    );
                    // The client gets the error, then the connection closes.
                    session.sasl = Some(SaslProgress::AwaitingHandshake);
                    session.close_after = Some(why);
                    Ok(Some(ResponseKind::SaslAuthenticate(
                        SaslAuthenticateResponse::default()
                            .with_error_code(58) // SASL_AUTHENTICATION_FAILED
                            .with_error_message(Some(StrBytes::from_static_str(
                                "Authentication failed: invalid credentials",
                            ))),
                    )))
                }
            }
        }
        other => Err(ConnectionError::Unauthenticated(api_of(&other))),
    }
}

fn api_of(r: &RequestKind) -> ApiKey {
    macro_rules! keys {
        ($($v:ident),*) => {
            match r {
                $(RequestKind::$v(_) => ApiKey::$v,)*
                _ => ApiKey::ApiVersions,
            }
        };
    }
    keys!(
        Produce,
        Fetch,
        ListOffsets,
        Metadata,
        OffsetCommit,
        OffsetFetch,
        FindCoordinator,
        JoinGroup,
        Heartbeat,
        LeaveGroup,
        SyncGroup,
        DescribeGroups,
        ListGroups,
        CreateTopics,
        DeleteTopics,
        DeleteRecords,
        InitProducerId,
        DescribeConfigs,
        AlterConfigs,
        CreatePartitions,
        DeleteGroups,
        IncrementalAlterConfigs,
        DescribeCluster,
        CreateAcls,
        DescribeAcls,
        DeleteAcls,
        DescribeUserScramCredentials,
        AlterUserScramCredentials
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_array_count_in_a_tiny_frame_is_an_error_not_an_allocation() {
        // Found by fuzz/fuzz_targets/kafka_request.rs: DescribeGroups v0 claiming 2^31-ish
        // groups in 14 bytes made the codec ask for tens of GiB and abort the process.
        let frame = Bytes::from_static(&[
            0x00, 0x0f, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x75, 0x74, 0x00, 0x74,
        ]);
        assert!(decode_frame(frame).is_err());
        // Metadata v0 with 54 million topics in 5 bytes (upstream PR #152's reproducer).
        let frame =
            Bytes::from_static(&[0, 3, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 3, 0x3c, 0x0c, 0, 0xb6]);
        assert!(decode_frame(frame).is_err());
    }

    // -- answers are not held back ----------------------------------------------------------

    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::Context;

    use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};
    use tokio::io::ReadBuf;
    use tokio::sync::Notify;
    use tonic::codegen::http;
    use tributary_gateway_common::{Connections, CoreClient};

    /// A client connection whose bytes are given at the start: reads take them, then wait
    /// for ever (saying so on `starved`); writes are kept.
    struct Scripted {
        input: VecDeque<u8>,
        written: Arc<std::sync::Mutex<Vec<u8>>>,
        starved: Arc<Notify>,
    }

    impl AsyncRead for Scripted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.input.is_empty() {
                self.starved.notify_one();
                return Poll::Pending;
            }
            let n = buf.remaining().min(self.input.len());
            let bytes: Vec<u8> = self.input.drain(..n).collect();
            buf.put_slice(&bytes);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.written.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The core's Admin service, never answering (an unreachable metadata store behind it);
    /// says on `called` that a call came.
    #[derive(Clone)]
    struct StuckAdmin {
        called: Arc<Notify>,
    }

    impl tonic::server::NamedService for StuckAdmin {
        const NAME: &'static str = tributary_proto::v1::admin_server::SERVICE_NAME;
    }

    impl tonic::codegen::Service<http::Request<tonic::body::Body>> for StuckAdmin {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Pending<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            self.called.notify_one();
            std::future::pending()
        }
    }

    fn request_frame(
        api: ApiKey,
        version: i16,
        correlation_id: i32,
        body: &RequestKind,
    ) -> Vec<u8> {
        let mut buf = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("test")))
            .encode(&mut buf, api.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        let mut frame = (buf.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&buf);
        frame
    }

    fn api_versions(correlation_id: i32) -> Vec<u8> {
        let body = RequestKind::ApiVersions(
            ApiVersionsRequest::default()
                .with_client_software_name(StrBytes::from_static_str("test"))
                .with_client_software_version(StrBytes::from_static_str("1")),
        );
        request_frame(ApiKey::ApiVersions, 3, correlation_id, &body)
    }

    /// The correlation ids of the whole responses in `out`.
    fn answered(out: &[u8]) -> Vec<i32> {
        let mut ids = Vec::new();
        let mut rest = out;
        while rest.len() >= 8 {
            let size = i32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            if rest.len() < 4 + size {
                break;
            }
            ids.push(i32::from_be_bytes(rest[4..8].try_into().unwrap()));
            rest = &rest[4 + size..];
        }
        ids
    }

    /// Serves `input` on a gateway whose core's Admin service never answers; returns what
    /// was written, once the connection waits for bytes (`starved`) or for the core.
    struct Served {
        written: Arc<std::sync::Mutex<Vec<u8>>>,
        starved: Arc<Notify>,
        core_called: Arc<Notify>,
        task: tokio::task::JoinHandle<()>,
    }

    fn serve_scripted(input: Vec<u8>) -> Served {
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let starved = Arc::new(Notify::new());
        let core_called = Arc::new(Notify::new());
        let mut io = Scripted {
            input: input.into(),
            written: written.clone(),
            starved: starved.clone(),
        };
        let routes = tonic::service::Routes::new(StuckAdmin {
            called: core_called.clone(),
        });
        let addr: SocketAddr = "127.0.0.1:9092".parse().unwrap();
        let gateway = Gateway::new(
            CoreClient::in_process(routes),
            crate::KafkaConfig::new(addr),
        );
        let task = tokio::spawn(async move {
            let registration = Connections::new().register("kafka", addr, addr, false);
            let mut session = Session {
                peer: addr,
                listener: "kafka",
                traffic: Traffic::new("kafka"),
                client_id: String::new(),
                sasl: None,
                principal: None,
                close_after: None,
                connection: registration.handle(),
                produce_order: ProduceOrder::default(),
            };
            let _ = serve(&mut io, &gateway, &mut session).await;
        });
        Served {
            written,
            starved,
            core_called,
            task,
        }
    }

    #[tokio::test]
    async fn an_answer_is_written_before_waiting_for_the_rest_of_the_next_request() {
        // A pipelining client (librdkafka) keeps sending: the bytes read end inside the next
        // request. The answer to the first must not wait for that request's rest (it used
        // to wait until the client paused: seconds of acknowledgements held back).
        let mut input = api_versions(1);
        input.extend_from_slice(&api_versions(2)[..10]);
        let s = serve_scripted(input);
        s.starved.notified().await;
        assert_eq!(answered(&s.written.lock().unwrap()), vec![1]);
        s.task.abort();
    }

    #[tokio::test]
    async fn answers_made_are_written_while_a_later_request_waits_for_the_core() {
        // Two requests read together: the second waits for the core (for ever here); the
        // first one's answer is written meanwhile, not held behind it.
        let mut input = api_versions(1);
        input.extend(request_frame(
            ApiKey::Metadata,
            12,
            2,
            &RequestKind::Metadata(MetadataRequest::default().with_topics(None)),
        ));
        let s = serve_scripted(input);
        s.core_called.notified().await;
        // The serving task's poll that called the core also wrote what it could.
        tokio::task::yield_now().await;
        assert_eq!(answered(&s.written.lock().unwrap()), vec![1]);
        s.task.abort();
    }

    #[tokio::test]
    async fn pipelined_requests_read_whole_are_answered_with_one_write() {
        let mut input = Vec::new();
        for id in 1..=3 {
            input.extend(api_versions(id));
        }
        let s = serve_scripted(input);
        s.starved.notified().await;
        assert_eq!(answered(&s.written.lock().unwrap()), vec![1, 2, 3]);
        s.task.abort();
    }

    #[test]
    fn a_frame_is_whole_once_its_size_and_every_byte_are_read() {
        let frame = api_versions(7);
        assert!(whole_frame_buffered(&frame));
        assert!(!whole_frame_buffered(&frame[..frame.len() - 1]));
        assert!(!whole_frame_buffered(&frame[..3]));
        assert!(!whole_frame_buffered(&[]));
        assert!(!whole_frame_buffered(&[0xff, 0xff, 0xff, 0xff, 0]));
    }
}
