//! One client connection: size-prefixed frames in, responses out, in request order.
//!
//! Responses keep the order clients rely on. Requests are served one at a time per
//! connection, as Kafka's broker does, except that up to five Produce requests wait for
//! durability together: each is appended (its offsets taken, in request order) before the
//! next is read, and answered once durable. Any other request waits until the produces
//! before it are answered.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
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
        } else if pending.len() >= PIPELINED_PRODUCES
            && let Some(answer) = pending.next().await
        {
            write_answer(&mut output, io, answer?).await?;
        }
        // Boxed: inline, every request handler's state machine would size the connection's
        // task, which an idle connection holds while it waits for its next request.
        let served = Box::pin(begin_frame(frame, gateway, session)).await;
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
        // Flush only when no further request is already read: pipelined requests are
        // answered with one write.
        if input.is_empty() || session.close_after.is_some() {
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
    while let Some(answer) = pending.next().await {
        write_answer(output, io, answer?).await?;
    }
    Ok(())
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
            let in_flight =
                crate::data::produce_begin(gateway, &authz, &session.traffic, request).await;
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
}
