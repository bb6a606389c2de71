//! One client connection: CONNECT, then packets in and core events out until either side
//! ends it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::error::{DecodeError, EncodeError};
use rmqtt_codec::types::QoS;
use rmqtt_codec::{MqttCodec, MqttPacket, v3, v5};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};
use tracing::{debug, info, info_span};
use tributary_gateway_common::connections::Ending;
use tributary_gateway_common::idle_buffers::ReadBuffer;
use tributary_gateway_common::session_link::{LinkEvent, SessionLink};
use tributary_gateway_common::{ConnectionHandle, Traffic};
use tributary_proto::v1::{self, SessionCommand, session_command::Command, session_event::Event};

use crate::Gateway;
use crate::topic;

/// Whatever carries the bytes (TCP, TLS, or a WebSocket bridged to a pipe), whole: one task
/// reads and writes it, so it is not split into halves (an `Arc`, a lock and two boxes per
/// connection).
trait Io: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Io for T {}
type Socket = Pin<Box<dyn Io>>;

/// Commands on their way to the core per connection. The socket is read only while at
/// least [`READ_ROOM`] are free, so a core that falls behind (a slow subscriber holding a
/// QoS 0 publisher back) slows the client through TCP instead of growing a queue here.
const COMMAND_WINDOW: usize = 4096;
/// One read batch (64 packets) plus one event batch (256) can each add a command.
const READ_ROOM: usize = 512;

/// Starting size of a connection's read and write buffers; they grow with the packets.
/// Small, because most of 1,000s of connections are idle most of the time, and held only
/// while they have bytes in them (idle_buffers.rs).
const IDLE_BUFFER: usize = 2 * 1024;

/// The largest write buffer a connection keeps between batches (see `Client::flush`).
const MAX_KEPT_WRITE_BUFFER: usize = 256 * 1024;

/// How long a client has to send CONNECT after the TCP connection opens.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection that ended waits for the core to finish its commands.
const STREAM_END_TIMEOUT: Duration = Duration::from_secs(10);
/// Session expiry meaning "never" (MQTT 5: 0xFFFFFFFF).
const NEVER: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("{0}")]
    Refused(&'static str, u8),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("core: {0}")]
    Core(String),
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("session taken over")]
    TakenOver,
    #[error("connection closed by an operator")]
    Kicked,
    #[error("client went away")]
    Eof,
}

impl ConnError {
    /// The MQTT 5 DISCONNECT reason for closing with this error, if one is sent.
    fn reason(&self) -> Option<u8> {
        match self {
            Self::Malformed(_) => Some(0x81),
            Self::Protocol(_) => Some(0x82),
            Self::Refused(_, code) => Some(*code),
            Self::Core(_) => Some(0x83),
            Self::KeepAlive => Some(0x8D),
            Self::TakenOver => Some(0x8E),
            Self::Kicked => Some(0x98),
            Self::Io(_) | Self::Eof => None,
        }
    }
}

fn decode_error(e: DecodeError) -> ConnError {
    match e {
        DecodeError::MaxSizeExceeded { .. } => ConnError::Refused("packet too large", 0x95),
        DecodeError::Io(_) => ConnError::Eof,
        e => ConnError::Malformed(e.to_string()),
    }
}

/// Decodes a byte stream as a client would send it (CONNECT first) along the gateway's own
/// path, for fuzzing: returns how many packets decoded before the end or the first error.
/// Never panics.
pub fn decode_stream(data: &[u8]) -> usize {
    // Frame the first packet as `read_packet` does.
    if data.is_empty() {
        return 0;
    }
    let Some((header, len)) = fixed_header(data) else {
        return 0;
    };
    let Some(connect) = data.get(..header + len) else {
        return 0;
    };
    let mut packet = BytesMut::from(connect);
    let mut codec = match inspect_connect(&mut packet) {
        Hello::V3 => MqttCodec::V3(v3::Codec::new(1 << 20)),
        Hello::V5 { .. } => MqttCodec::V5(v5::Codec::new(1 << 20, 1 << 20)),
        _ => return 0,
    };
    let mut n = 0;
    if !matches!(codec.decode(&mut packet), Ok(Some(_))) {
        return 0;
    }
    n += 1;
    let mut rest = BytesMut::from(&data[header + len..]);
    while let Ok(Some(_)) = codec.decode(&mut rest) {
        n += 1;
    }
    n
}

/// Properties of a message that only MQTT 5 carries on the wire.
fn record_from_publish(
    topic: &str,
    payload: Bytes,
    props: Option<&v5::PublishProperties>,
    now_ms: i64,
) -> v1::Record {
    let mut p = v1::SystemProperties {
        address: topic.to_string(),
        origin_protocol: "mqtt".into(),
        ..Default::default()
    };
    let mut headers = Vec::new();
    if let Some(props) = props {
        if let Some(ct) = &props.content_type {
            p.content_type = ct.to_string();
        }
        if let Some(c) = &props.correlation_data {
            p.correlation_id = c.clone();
        }
        if let Some(r) = &props.response_topic {
            p.reply_to = r.to_string();
        }
        if let Some(e) = props.message_expiry_interval {
            p.expires_at_ms = now_ms + i64::from(e.get()) * 1000;
        }
        p.payload_format = u32::from(props.is_utf8_payload);
        headers = props
            .user_properties
            .iter()
            .map(|(k, v)| v1::Header {
                name: k.to_string(),
                value: Bytes::copy_from_slice(v.as_bytes()),
            })
            .collect();
    }
    v1::Record {
        key: Bytes::new(),
        value: payload,
        headers,
        timestamp_ms: now_ms,
        properties: Some(p),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn qos_of(q: u32) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn nz(id: u16) -> NonZeroU16 {
    NonZeroU16::new(id).unwrap_or(NonZeroU16::MIN)
}

/// What a core answer with a request id turns into.
enum Reply {
    /// Packet id, and per filter whether the ACL denied it (not sent to the core).
    SubAck(u16, Vec<bool>),
    UnsubAck(u16),
    PubAck(u16),
    PubRec(u16),
    /// Packet id and reason code: sent once the core stored the release.
    PubComp(u16, u8),
    Close,
}

/// The state of one connected client.
struct Client {
    gw: Arc<Gateway>,
    /// Messages in and out of this connection, in the listener's traffic metrics.
    traffic: Arc<Traffic>,
    v5: bool,
    /// Shared with the connection's entry in the connection list.
    client_id: Arc<str>,
    user: Option<String>,
    codec: MqttCodec,
    out: BytesMut,
    /// How much of `out` is written, while a write waits for the socket.
    out_pos: usize,
    socket: Socket,
    /// The session in the core: commands in, events out.
    link: SessionLink,
    next_rid: u64,
    /// By request id; a B-tree is a third of an empty hash map's size, inline in every
    /// connection, and as quick for the few answers awaited at a time.
    replies: BTreeMap<u64, Reply>,
    /// Inbound QoS 1/2 publishes not yet acknowledged to the client (Receive Maximum).
    inbound_unacked: usize,
    /// QoS 2 ids and topic aliases, made on first use.
    rare: Option<Box<RareState>>,
    client_alias_max: u16,
    session_expiry: u32,
}

/// What only some clients use (QoS 2, MQTT 5 topic aliases): one allocation made when first
/// needed, rather than three empty maps inline in every connection's state.
#[derive(Default)]
struct RareState {
    /// Inbound QoS 2 ids between PUBREC and PUBREL.
    awaiting_rel: HashSet<u16>,
    aliases_in: HashMap<u16, String>,
    aliases_out: HashMap<String, u16>,
}

impl Client {
    fn rare(&mut self) -> &mut RareState {
        self.rare.get_or_insert_default()
    }

    /// The session's link; everything else goes now, the socket with it, so
    /// the client sees its connection close before the core has finished with the session
    /// (which waits for the metadata store when the session outlives the connection).
    fn into_link(self) -> SessionLink {
        self.link
    }

    fn request(&mut self, command: Command, reply: Option<Reply>) -> Result<(), ConnError> {
        let request_id = match reply {
            Some(r) => {
                self.next_rid += 1;
                self.replies.insert(self.next_rid, r);
                self.next_rid
            }
            None => 0,
        };
        // Room is made before packets are read (see `session_loop`), so a full window here
        // means the core stopped taking commands.
        self.link
            .send(Box::new(SessionCommand {
                request_id,
                command: Some(command),
            }))
            .map_err(|e| ConnError::Core(e.to_string()))
    }

    /// The write buffer is given up after each flush (idle_buffers.rs); a burst of
    /// packets starts it at its usual size instead of growing it packet by packet.
    fn out(&mut self) -> &mut BytesMut {
        if self.out.capacity() == 0 {
            self.out.reserve(IDLE_BUFFER);
        }
        &mut self.out
    }

    fn encode3(&mut self, p: v3::Packet) -> Result<(), ConnError> {
        self.out();
        let MqttCodec::V3(c) = &mut self.codec else {
            return Err(ConnError::Protocol("codec mismatch"));
        };
        c.encode(p, &mut self.out)
            .map_err(|e| ConnError::Core(format!("encode: {e}")))
    }

    /// Encodes a 5.0 packet; `Ok(false)` when it exceeds the client's Maximum Packet Size.
    fn encode5(&mut self, p: v5::Packet) -> Result<bool, ConnError> {
        self.out();
        let MqttCodec::V5(c) = &mut self.codec else {
            return Err(ConnError::Protocol("codec mismatch"));
        };
        match c.encode(p, &mut self.out) {
            Ok(()) => Ok(true),
            Err(EncodeError::OverMaxPacketSize { .. }) => Ok(false),
            Err(e) => Err(ConnError::Core(format!("encode: {e}"))),
        }
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Writes out what is encoded; a write cut short by a full socket goes on from where
    /// it stopped at the next poll.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        let written = self.out.len();
        if written == 0 {
            return Poll::Ready(Ok(()));
        }
        while self.out_pos < written {
            let n = ready!(
                self.socket
                    .as_mut()
                    .poll_write(cx, &self.out[self.out_pos..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(
                    std::io::Error::from(std::io::ErrorKind::WriteZero).into()
                ));
            }
            self.out_pos += n;
        }
        self.out_pos = 0;
        // An idle connection keeps no write buffer; one that writes large batches keeps its
        // own (up to a bound) instead of growing a new one, copy by copy, for every batch.
        if written <= IDLE_BUFFER || self.out.capacity() > MAX_KEPT_WRITE_BUFFER {
            self.out = BytesMut::new();
        } else {
            self.out.clear();
        }
        Poll::Ready(Ok(()))
    }

    fn ack(&mut self, kind: u8, id: u16, reason: u8) -> Result<(), ConnError> {
        if self.v5 {
            let pa = v5::PublishAck {
                packet_id: nz(id),
                reason_code: v5::PublishAckReason::try_from(reason)
                    .unwrap_or(v5::PublishAckReason::Success),
                properties: Vec::new(),
                reason_string: None,
            };
            let pa2 = v5::PublishAck2 {
                packet_id: nz(id),
                reason_code: v5::PublishAck2Reason::try_from(reason)
                    .unwrap_or(v5::PublishAck2Reason::Success),
                properties: Vec::new(),
                reason_string: None,
            };
            let p = match kind {
                4 => v5::Packet::PublishAck(pa),
                5 => v5::Packet::PublishReceived(pa),
                6 => v5::Packet::PublishRelease(pa2),
                _ => v5::Packet::PublishComplete(pa2),
            };
            self.encode5(p).map(|_| ())
        } else {
            let packet_id = nz(id);
            self.encode3(match kind {
                4 => v3::Packet::PublishAck { packet_id },
                5 => v3::Packet::PublishReceived { packet_id },
                6 => v3::Packet::PublishRelease { packet_id },
                _ => v3::Packet::PublishComplete { packet_id },
            })
        }
    }

    fn disconnect5(&mut self, reason: u8) {
        if self.v5 {
            let code = v5::DisconnectReasonCode::try_from(reason)
                .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError);
            let _ = self.encode5(v5::Packet::Disconnect(v5::Disconnect::new(code)));
        }
    }

    /// Turns a core delivery into PUBLISH (or PUBREL).
    fn deliver(&mut self, d: v1::SessionDelivery) -> Result<(), ConnError> {
        let id = d.packet_id as u16;
        if d.release_only {
            return self.ack(6, id, 0);
        }
        let m = d.message.unwrap_or_default();
        let record = m.record.unwrap_or_default();
        self.traffic.sent(1, record.value.len());
        let props = record.properties.unwrap_or_default();
        let qos = qos_of(m.qos);
        let packet_id = (m.qos > 0).then(|| nz(id));
        if !self.v5 {
            return self.encode3(v3::Packet::Publish(Box::new(v3_publish(
                d.dup,
                m.retain,
                qos,
                props.address.into(),
                packet_id,
                record.value,
            ))));
        }
        let now = now_ms();
        let expiry = (props.expires_at_ms > 0)
            .then(|| ((props.expires_at_ms - now).max(1) + 999) / 1000)
            .and_then(|s| NonZeroU32::new(s as u32));
        let mut topic_name: ByteString = props.address.clone().into();
        let mut alias = None;
        if self.client_alias_max > 0 {
            let max = self.client_alias_max as usize;
            let aliases_out = &mut self.rare().aliases_out;
            if let Some(a) = aliases_out.get(&props.address) {
                alias = NonZeroU16::new(*a);
                topic_name = ByteString::new();
            } else if aliases_out.len() < max {
                let a = aliases_out.len() as u16 + 1;
                aliases_out.insert(props.address.clone(), a);
                alias = NonZeroU16::new(a);
            }
        }
        let publish = rmqtt_codec::types::Publish {
            dup: d.dup,
            retain: m.retain,
            qos,
            topic: topic_name,
            packet_id,
            payload: record.value,
            properties: Some(v5::PublishProperties {
                topic_alias: alias,
                correlation_data: (!props.correlation_id.is_empty())
                    .then_some(props.correlation_id),
                message_expiry_interval: expiry,
                content_type: (!props.content_type.is_empty()).then(|| props.content_type.into()),
                user_properties: record
                    .headers
                    .into_iter()
                    .map(|h| {
                        (
                            h.name.into(),
                            String::from_utf8_lossy(&h.value).into_owned().into(),
                        )
                    })
                    .collect(),
                is_utf8_payload: props.payload_format == 1,
                response_topic: (!props.reply_to.is_empty()).then(|| props.reply_to.into()),
                subscription_ids: d
                    .subscription_ids
                    .iter()
                    .filter_map(|i| NonZeroU32::new(*i))
                    .collect(),
            }),
        };
        if !self.encode5(v5::Packet::Publish(Box::new(publish)))? {
            // Larger than the client accepts: discarded as if delivered (MQTT-3.1.2-25).
            debug!(client = %self.client_id, "delivery over the client's maximum packet size dropped");
            if m.qos > 0 {
                self.request(
                    Command::Ack(v1::SessionAck {
                        packet_ids: vec![id.into()],
                        received_only: false,
                    }),
                    None,
                )?;
            }
        }
        Ok(())
    }

    /// Answers a core event. `Ok(false)` = the session was closed normally.
    fn on_event(&mut self, e: Box<v1::SessionEvent>) -> Result<bool, ConnError> {
        let reply = self.replies.remove(&e.request_id);
        match (e.event, reply) {
            (Some(Event::Delivery(d)), _) => self.deliver(d)?,
            (Some(Event::Subscribed(r)), Some(Reply::SubAck(id, denied))) => {
                self.suback(id, &denied, &r.codes)?;
            }
            (Some(Event::Unsubscribed(r)), Some(Reply::UnsubAck(id))) => {
                if self.v5 {
                    let status = r
                        .existed
                        .iter()
                        .map(|e| {
                            if *e {
                                v5::UnsubscribeAckReason::Success
                            } else {
                                v5::UnsubscribeAckReason::NoSubscriptionExisted
                            }
                        })
                        .collect();
                    self.encode5(v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                        packet_id: nz(id),
                        properties: Vec::new(),
                        reason_string: None,
                        status,
                    }))?;
                } else {
                    self.encode3(v3::Packet::UnsubscribeAck { packet_id: nz(id) })?;
                }
            }
            (Some(Event::Published(r)), Some(Reply::PubAck(id))) => {
                self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
                self.ack(4, id, if r.matched == 0 { 0x10 } else { 0 })?;
            }
            (Some(Event::Published(r)), Some(Reply::PubRec(id))) => {
                self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
                self.rare().awaiting_rel.insert(id);
                self.ack(
                    5,
                    id,
                    if r.matched == 0 && !r.duplicate {
                        0x10
                    } else {
                        0
                    },
                )?;
            }
            (Some(Event::Released(_)), Some(Reply::PubComp(id, code))) => {
                self.ack(7, id, code)?;
            }
            (Some(Event::Closed(_)), _) => return Ok(false),
            (Some(Event::TakenOver(why)), _) => {
                return Err(if why.code == v1::ErrorCode::AdministrativeAction as i32 {
                    ConnError::Kicked
                } else {
                    ConnError::TakenOver
                });
            }
            // The core serving the session shuts down (a restart, or its shard moving to
            // another node): the client reconnects to whoever serves it next.
            (Some(Event::Error(err)), None) if err.code == v1::ErrorCode::ShuttingDown as i32 => {
                return Err(ConnError::Refused("server shutting down", 0x8B));
            }
            (Some(Event::Error(err)), reply) => {
                let what = match reply {
                    Some(Reply::PubAck(_) | Reply::PubRec(_)) => "publish",
                    Some(Reply::SubAck(..)) => "subscribe",
                    Some(Reply::UnsubAck(_)) => "unsubscribe",
                    Some(Reply::PubComp(..)) => "release",
                    Some(Reply::Close) => "close",
                    None => "request",
                };
                return Err(ConnError::Core(format!("{what}: {}", err.message)));
            }
            (Some(Event::Opened(_)), _) | (None, _) => {}
            (Some(_), _) => {}
        }
        Ok(true)
    }

    /// Handles one packet from the client. `Ok(false)` = DISCONNECT.
    fn on_packet(&mut self, p: MqttPacket) -> Result<bool, ConnError> {
        match p {
            MqttPacket::V3(p) => self.on_v3(p),
            MqttPacket::V5(p) => self.on_v5(p),
            MqttPacket::Version(_) => Err(ConnError::Protocol("a second CONNECT")),
        }
    }

    fn on_v3(&mut self, p: v3::Packet) -> Result<bool, ConnError> {
        use v3::Packet as P;
        match p {
            P::Publish(p) => {
                let p = *p;
                let id = p.packet_id.map_or(0, NonZeroU16::get);
                self.publish(p.topic.to_string(), p.qos, p.retain, id, p.payload, None)?;
            }
            P::PublishAck { packet_id } | P::PublishComplete { packet_id } => {
                self.complete(packet_id.get(), false)?
            }
            P::PublishReceived { packet_id } => self.complete(packet_id.get(), true)?,
            P::PublishRelease { packet_id } => self.release(packet_id.get())?,
            P::Subscribe {
                packet_id,
                topic_filters,
            } => {
                let subs = topic_filters
                    .into_iter()
                    .map(|(f, q)| (f.to_string(), q, false, false, 0))
                    .collect();
                self.subscribe(packet_id.get(), subs, 0)?;
            }
            P::Unsubscribe {
                packet_id,
                topic_filters,
            } => self.unsubscribe(
                packet_id.get(),
                topic_filters.into_iter().map(|f| f.to_string()).collect(),
            )?,
            P::PingRequest => self.encode3(P::PingResponse)?,
            P::Disconnect => {
                self.request(
                    Command::Close(v1::SessionClose {
                        publish_will: false,
                        ..Default::default()
                    }),
                    Some(Reply::Close),
                )?;
                return Ok(false);
            }
            P::Connect(_) => return Err(ConnError::Protocol("a second CONNECT")),
            _ => return Err(ConnError::Protocol("a packet only a server sends")),
        }
        Ok(true)
    }

    fn on_v5(&mut self, p: v5::Packet) -> Result<bool, ConnError> {
        use v5::Packet as P;
        match p {
            P::Publish(p) => {
                let p = *p;
                let id = p.packet_id.map_or(0, NonZeroU16::get);
                let props = p.properties.unwrap_or_default();
                let mut topic = p.topic.to_string();
                if let Some(alias) = props.topic_alias {
                    if alias.get() > self.gw.config.topic_alias_maximum {
                        return Err(ConnError::Refused("topic alias out of range", 0x94));
                    }
                    if topic.is_empty() {
                        topic = self
                            .rare()
                            .aliases_in
                            .get(&alias.get())
                            .cloned()
                            .ok_or(ConnError::Protocol("unknown topic alias"))?;
                    } else {
                        self.rare().aliases_in.insert(alias.get(), topic.clone());
                    }
                } else if topic.is_empty() {
                    return Err(ConnError::Protocol("empty topic without an alias"));
                }
                if !props.subscription_ids.is_empty() {
                    return Err(ConnError::Protocol(
                        "subscription identifier in a client PUBLISH",
                    ));
                }
                if props.is_utf8_payload && std::str::from_utf8(&p.payload).is_err() {
                    if p.qos == QoS::AtMostOnce {
                        return Ok(true);
                    }
                    let kind = if p.qos == QoS::AtLeastOnce { 4 } else { 5 };
                    self.ack(kind, id, 0x99)?;
                    return Ok(true);
                }
                self.publish(topic, p.qos, p.retain, id, p.payload, Some(props))?;
            }
            P::PublishAck(a) => self.complete(a.packet_id.get(), false)?,
            P::PublishComplete(a) => self.complete(a.packet_id.get(), false)?,
            P::PublishReceived(a) => {
                // A PUBREC with an error code ends the exchange (no PUBREL).
                let failed = u8::from(a.reason_code) >= 0x80;
                self.complete(a.packet_id.get(), !failed)?
            }
            P::PublishRelease(a) => self.release(a.packet_id.get())?,
            P::Subscribe(s) => {
                let sub_id = s.id.map_or(0, NonZeroU32::get);
                let mut subs = Vec::with_capacity(s.topic_filters.len());
                for (f, o) in s.topic_filters {
                    let f = f.to_string();
                    if o.no_local && topic::is_shared(&f) {
                        return Err(ConnError::Protocol("No Local on a shared subscription"));
                    }
                    subs.push((
                        f,
                        o.qos,
                        o.no_local,
                        o.retain_as_published,
                        u8::from(o.retain_handling) as u32,
                    ));
                }
                self.subscribe(s.packet_id.get(), subs, sub_id)?;
            }
            P::Unsubscribe(u) => self.unsubscribe(
                u.packet_id.get(),
                u.topic_filters.into_iter().map(|f| f.to_string()).collect(),
            )?,
            P::PingRequest => {
                self.encode5(P::PingResponse)?;
            }
            P::Disconnect(d) => {
                let mut close = v1::SessionClose {
                    publish_will: u8::from(d.reason_code) == 0x04,
                    ..Default::default()
                };
                if let Some(e) = d.session_expiry_interval_secs {
                    if self.session_expiry == 0 && e != 0 {
                        return Err(ConnError::Protocol(
                            "session expiry set on DISCONNECT after 0 on CONNECT",
                        ));
                    }
                    close.set_expiry = true;
                    close.expiry_interval_ms = expiry_ms(e);
                }
                self.request(Command::Close(close), Some(Reply::Close))?;
                return Ok(false);
            }
            P::Auth(_) => return Err(ConnError::Protocol("AUTH without an authentication method")),
            P::Connect(_) => return Err(ConnError::Protocol("a second CONNECT")),
            _ => return Err(ConnError::Protocol("a packet only a server sends")),
        }
        Ok(true)
    }

    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        retain: bool,
        packet_id: u16,
        payload: Bytes,
        props: Option<v5::PublishProperties>,
    ) -> Result<(), ConnError> {
        if !topic::valid_name(&topic) {
            return Err(ConnError::Refused("invalid topic name in PUBLISH", 0x90));
        }
        if qos != QoS::AtMostOnce {
            if self.inbound_unacked >= self.gw.config.receive_maximum as usize {
                return Err(ConnError::Refused("receive maximum exceeded", 0x93));
            }
            if qos == QoS::ExactlyOnce
                && self.rare.as_ref().map_or(0, |r| r.awaiting_rel.len()) >= 65_535
            {
                return Err(ConnError::Refused("receive maximum exceeded", 0x93));
            }
        }
        if !self
            .gw
            .config
            .acl
            .may_publish(self.user.as_deref(), &self.client_id, &topic)
        {
            info!(client = %self.client_id, topic = %topic, "publish denied by the ACL");
            // 3.1.1 has no way to say no: acknowledge and drop, as Mosquitto does.
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.ack(4, packet_id, 0x87)?,
                QoS::ExactlyOnce => {
                    if !self.v5 {
                        self.rare().awaiting_rel.insert(packet_id);
                    }
                    self.ack(5, packet_id, 0x87)?
                }
            }
            return Ok(());
        }
        self.traffic.received(1, payload.len());
        let record = record_from_publish(&topic, payload, props.as_ref(), now_ms());
        let message = v1::RoutedMessage {
            record: Some(record),
            qos: u32::from(qos.value()),
            retain,
        };
        let (reply, qos2_id) = match qos {
            QoS::AtMostOnce => (None, 0),
            QoS::AtLeastOnce => (Some(Reply::PubAck(packet_id)), 0),
            QoS::ExactlyOnce => (Some(Reply::PubRec(packet_id)), u32::from(packet_id)),
        };
        if reply.is_some() {
            self.inbound_unacked += 1;
        }
        self.request(
            Command::Publish(v1::SessionPublish {
                message: Some(message),
                packet_id: qos2_id,
            }),
            reply,
        )
    }

    /// PUBACK / PUBCOMP (`received_only` false) or PUBREC (true) from the client.
    fn complete(&mut self, id: u16, received_only: bool) -> Result<(), ConnError> {
        self.request(
            Command::Ack(v1::SessionAck {
                packet_ids: vec![id.into()],
                received_only,
            }),
            None,
        )
    }

    fn release(&mut self, id: u16) -> Result<(), ConnError> {
        let known = self
            .rare
            .as_mut()
            .is_some_and(|r| r.awaiting_rel.remove(&id));
        // PUBCOMP frees the packet id for the client's next publish, so it waits for the
        // core to have stored the release: answered earlier, a release that failed left the
        // id taken, and the next publish reusing it was taken for a duplicate.
        let code = if known || !self.v5 { 0 } else { 0x92 };
        self.request(
            Command::Release(v1::SessionRelease {
                packet_id: id.into(),
            }),
            Some(Reply::PubComp(id, code)),
        )
    }

    fn subscribe(
        &mut self,
        packet_id: u16,
        subs: Vec<(String, QoS, bool, bool, u32)>,
        sub_id: u32,
    ) -> Result<(), ConnError> {
        let mut allowed = Vec::with_capacity(subs.len());
        let mut denied = Vec::with_capacity(subs.len());
        for (filter, qos, no_local, rap, rh) in subs {
            // Invalid filters go to the core, which answers 0x8F for them in place.
            let plain = filter
                .strip_prefix("$share/")
                .and_then(|r| r.split_once('/').map(|x| x.1))
                .unwrap_or(&filter);
            let no = topic::valid_filter(&filter)
                && !self
                    .gw
                    .config
                    .acl
                    .may_subscribe(self.user.as_deref(), &self.client_id, plain);
            if no {
                info!(client = %self.client_id, filter = %filter, "subscription denied by the ACL");
            } else {
                allowed.push(v1::SessionSubscription {
                    filter,
                    qos: u32::from(qos.value()),
                    no_local,
                    retain_as_published: rap,
                    retain_handling: rh,
                    subscription_id: sub_id,
                });
            }
            denied.push(no);
        }
        if allowed.is_empty() {
            return self.suback(packet_id, &denied, &[]);
        }
        self.request(
            Command::Subscribe(v1::SessionSubscribe {
                subscriptions: allowed,
            }),
            Some(Reply::SubAck(packet_id, denied)),
        )
    }

    /// SUBACK with one code per filter: 0x87 where the ACL said no, the core's code elsewhere.
    fn suback(&mut self, id: u16, denied: &[bool], core_codes: &[u32]) -> Result<(), ConnError> {
        let mut next = core_codes.iter();
        let codes: Vec<u32> = denied
            .iter()
            .map(|d| {
                if *d {
                    0x87
                } else {
                    next.next().copied().unwrap_or(0x80)
                }
            })
            .collect();
        if self.v5 {
            let status = codes
                .iter()
                .map(|c| {
                    v5::SubscribeAckReason::try_from(*c as u8)
                        .unwrap_or(v5::SubscribeAckReason::UnspecifiedError)
                })
                .collect();
            self.encode5(v5::Packet::SubscribeAck(v5::SubscribeAck {
                packet_id: nz(id),
                properties: Vec::new(),
                reason_string: None,
                status,
            }))?;
        } else {
            let status = codes
                .iter()
                .map(|c| {
                    if *c >= 0x80 {
                        v3::SubscribeReturnCode::Failure
                    } else {
                        v3::SubscribeReturnCode::Success(qos_of(*c))
                    }
                })
                .collect();
            self.encode3(v3::Packet::SubscribeAck {
                packet_id: nz(id),
                status,
            })?;
        }
        Ok(())
    }

    fn unsubscribe(&mut self, packet_id: u16, filters: Vec<String>) -> Result<(), ConnError> {
        self.request(
            Command::Unsubscribe(v1::SessionUnsubscribe { filters }),
            Some(Reply::UnsubAck(packet_id)),
        )
    }
}

fn v3_publish(
    dup: bool,
    retain: bool,
    qos: QoS,
    topic: ByteString,
    packet_id: Option<NonZeroU16>,
    payload: Bytes,
) -> rmqtt_codec::types::Publish {
    rmqtt_codec::types::Publish {
        dup,
        retain,
        qos,
        topic,
        packet_id,
        payload,
        properties: None,
    }
}

fn expiry_ms(secs: u32) -> i64 {
    if secs == NEVER {
        -1
    } else {
        i64::from(secs) * 1000
    }
}

/// Serves one connection to its end; one log line when it ends with an error.
///
/// `stop` is not watched: the accept loop tells its connections through the registry
/// ([`ConnectionHandle::poll_ending`]), which a waiting connection polls without a future
/// of its own.
pub(crate) fn serve_connection<S>(
    socket: S,
    peer: SocketAddr,
    listener: &'static str,
    connection: ConnectionHandle,
    gw: Arc<Gateway>,
    stop: watch::Receiver<bool>,
) -> Connection
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    drop(stop);
    let span = info_span!(
        "mqtt_conn",
        %peer,
        listener,
        connection = connection.id(),
        client = tracing::field::Empty
    );
    let handle = connection.clone();
    let opening =
        Box::pin(async move { open_session(Box::pin(socket), gw, peer, listener, &handle).await });
    Connection {
        span,
        connection,
        state: State::Opening(opening),
    }
}

/// One connection, polled by hand rather than written as an `async fn`: an idle
/// connection's task then holds its client state and nothing else. An `async fn` with a
/// `select!` kept every branch's future, every caller's copy of its arguments and the
/// padding between its states, over 2 KiB per idle connection. The CONNECT phase and the
/// end are `async` and boxed: each is a state a connection is in once.
pub(crate) struct Connection {
    span: tracing::Span,
    connection: ConnectionHandle,
    state: State,
}

type Phase<T> = Pin<Box<dyn Future<Output = T> + Send>>;

// Serving is the state a connection lives in; the others are a pointer each, and boxing
// Serving would only add an allocation per connection.
#[allow(clippy::large_enum_variant)]
enum State {
    Opening(Phase<Result<Connected, ConnError>>),
    Serving(Serving),
    Ending(Phase<()>),
    Done,
}

impl Future for Connection {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        loop {
            match &mut this.state {
                State::Opening(opening) => match ready!(opening.as_mut().poll(cx)) {
                    Ok(connected) => this.state = State::Serving(Serving::new(connected)),
                    Err(e) => {
                        log_end(&Err(e));
                        this.state = State::Done;
                    }
                },
                State::Serving(serving) => {
                    let result = ready!(serving.poll_serve(cx, &this.connection));
                    let State::Serving(serving) = std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above")
                    };
                    this.state = State::Ending(Box::pin(serving.finish(result)));
                }
                State::Ending(ending) => {
                    ready!(ending.as_mut().poll(cx));
                    this.state = State::Done;
                }
                State::Done => return Poll::Ready(()),
            }
        }
    }
}

/// The one log line of a connection's end.
fn log_end(result: &Result<(), ConnError>) {
    match result {
        Ok(()) | Err(ConnError::Eof) => debug!("connection closed"),
        Err(e @ (ConnError::TakenOver | ConnError::Kicked | ConnError::Io(_))) => {
            debug!(reason = %e, "connection closed")
        }
        Err(e) => info!(reason = %e, "connection closed by the gateway"),
    }
}

/// The first packet, read whole by the gateway before any codec sees it: the codec's own
/// version detection waits for more bytes on a CONNECT shorter than its header instead of
/// refusing it, and refuses a 5.0 CONNECT with an empty client id and Clean Start 0, which
/// MQTT 5 allows (the server assigns an id).
async fn read_packet(rd: &mut Socket, max: u32) -> Result<BytesMut, ConnError> {
    use tokio::io::AsyncReadExt;
    let mut head = vec![rd.read_u8().await.map_err(|_| ConnError::Eof)?];
    // Anything but CONNECT is refused at once, before waiting for a body it may not have.
    if head[0] != 0x10 {
        return Err(ConnError::Protocol("the first packet must be CONNECT"));
    }
    let mut len: u32 = 0;
    for i in 0..4 {
        let b = rd.read_u8().await.map_err(|_| ConnError::Eof)?;
        head.push(b);
        len |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err(ConnError::Malformed("remaining length over 4 bytes".into()));
        }
    }
    if len > max {
        return Err(ConnError::Refused("packet too large", 0x95));
    }
    let mut packet = BytesMut::with_capacity(head.len() + len as usize);
    packet.extend_from_slice(&head);
    packet.resize(head.len() + len as usize, 0);
    rd.read_exact(&mut packet[head.len()..])
        .await
        .map_err(|_| ConnError::Eof)?;
    Ok(packet)
}

enum Hello {
    NotConnect,
    NotMqtt,
    UnknownLevel,
    V3,
    V5 { clean_start: bool },
}

/// Which protocol a whole first packet speaks. For 5.0 it reports Clean Start and sets the
/// bit in the packet, so that the codec accepts an empty client id whatever Clean Start says.
fn inspect_connect(packet: &mut BytesMut) -> Hello {
    if packet.first() != Some(&0x10) {
        return Hello::NotConnect;
    }
    let header = 1
        + packet[1..]
            .iter()
            .take(4)
            .take_while(|b| *b & 0x80 != 0)
            .count()
        + 1;
    let body = &packet[header.min(packet.len())..];
    if body.len() < 2 {
        return Hello::NotMqtt;
    }
    let name_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    // Name, level, flags and keep-alive must be there, and a client id length after them.
    if body.len() < 2 + name_len + 1 + 1 + 2 + 2 {
        return Hello::NotMqtt;
    }
    let level = body[2 + name_len];
    match (&body[2..2 + name_len], level) {
        (b"MQTT", 4) | (b"MQIsdp", 3) => Hello::V3,
        (b"MQTT", 5) => {
            let flags = header + 2 + name_len + 1;
            let clean_start = packet[flags] & 0x02 != 0;
            packet[flags] |= 0x02;
            Hello::V5 { clean_start }
        }
        (b"MQTT" | b"MQIsdp", _) => Hello::UnknownLevel,
        _ => Hello::NotMqtt,
    }
}

/// What CONNECT asked for, in one shape for every protocol level.
struct ConnectInfo {
    v5: bool,
    level: u8,
    clean_start: bool,
    keep_alive: u16,
    session_expiry: u32,
    client_id: String,
    user: Option<String>,
    password: Option<Bytes>,
    will: Option<(v1::RoutedMessage, u32)>,
    receive_max: u16,
    max_packet: Option<u32>,
    alias_max: u16,
    auth_method: bool,
}

fn connect_info(p: MqttPacket) -> Result<ConnectInfo, ConnError> {
    let now = now_ms();
    match p {
        MqttPacket::V3(v3::Packet::Connect(c)) => {
            let c = *c;
            let will = c.last_will.map(|w| {
                let record = record_from_publish(&w.topic, w.message, None, now);
                (
                    v1::RoutedMessage {
                        record: Some(record),
                        qos: u32::from(w.qos.value()),
                        retain: w.retain,
                    },
                    0,
                )
            });
            Ok(ConnectInfo {
                v5: false,
                level: c.protocol.level(),
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                session_expiry: if c.clean_session { 0 } else { NEVER },
                client_id: c.client_id.to_string(),
                user: c.username.map(|u| u.to_string()),
                password: c.password,
                will,
                receive_max: 0,
                max_packet: None,
                alias_max: 0,
                auth_method: false,
            })
        }
        MqttPacket::V5(v5::Packet::Connect(c)) => {
            let c = *c;
            let will = c.last_will.map(|w| {
                let props = v5::PublishProperties {
                    correlation_data: w.correlation_data,
                    message_expiry_interval: w.message_expiry_interval,
                    content_type: w.content_type,
                    user_properties: w.user_properties,
                    is_utf8_payload: w.is_utf8_payload.unwrap_or(false),
                    response_topic: w.response_topic,
                    ..Default::default()
                };
                let record = record_from_publish(&w.topic, w.message, Some(&props), now);
                (
                    v1::RoutedMessage {
                        record: Some(record),
                        qos: u32::from(w.qos.value()),
                        retain: w.retain,
                    },
                    w.will_delay_interval_sec.unwrap_or(0),
                )
            });
            Ok(ConnectInfo {
                v5: true,
                level: 5,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry: c.session_expiry_interval_secs,
                client_id: c.client_id.to_string(),
                user: c.username.map(|u| u.to_string()),
                password: c.password,
                will,
                receive_max: c.receive_max.map_or(65_535, NonZeroU16::get),
                max_packet: c.max_packet_size.map(NonZeroU32::get),
                alias_max: c.topic_alias_max,
                auth_method: c.auth_method.is_some(),
            })
        }
        _ => Err(ConnError::Protocol("the first packet must be CONNECT")),
    }
}

/// Writes a refusing CONNACK (v3 return code, v5 reason code) and gives the error back.
async fn refuse(
    socket: &mut Socket,
    v5: bool,
    v3_code: u8,
    v5_code: u8,
    why: &'static str,
) -> ConnError {
    let mut out = BytesMut::new();
    if v5 {
        let ack = v5::ConnectAck {
            reason_code: v5::ConnectAckReason::try_from(v5_code)
                .unwrap_or(v5::ConnectAckReason::UnspecifiedError),
            ..Default::default()
        };
        let _ = v5::Codec::new(0, 0).encode(v5::Packet::ConnectAck(Box::new(ack)), &mut out);
    } else {
        out.extend_from_slice(&[0x20, 0x02, 0x00, v3_code]);
    }
    let _ = socket.write_all(&out).await;
    ConnError::Refused(why, v5_code)
}

/// A connection whose CONNECT was accepted and whose core session is open.
struct Connected {
    client: Client,
    reader: PacketReader,
    keep_alive: u16,
}

/// CONNECT to CONNACK: checks, authentication, the core session's open.
async fn open_session(
    mut socket: Socket,
    gw: Arc<Gateway>,
    peer: SocketAddr,
    listener: &'static str,
    connection: &ConnectionHandle,
) -> Result<Connected, ConnError> {
    let traffic = gw.traffic.get(listener);
    let max_in = gw.config.max_packet_size;
    let mut packet =
        match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut socket, max_in)).await {
            Err(_) => return Err(ConnError::Protocol("no CONNECT within 10 s")),
            Ok(r) => r?,
        };
    let (mut codec, v5_clean_start) = match inspect_connect(&mut packet) {
        Hello::NotConnect => return Err(ConnError::Protocol("the first packet must be CONNECT")),
        Hello::NotMqtt => return Err(ConnError::Malformed("not an MQTT CONNECT".into())),
        Hello::UnknownLevel => {
            // A known protocol name with an unknown level gets CONNACK 0x01 (MQTT-3.1.2-2).
            return Err(refuse(&mut socket, false, 0x01, 0x84, "unsupported protocol level").await);
        }
        Hello::V3 => (MqttCodec::V3(v3::Codec::new(max_in)), None),
        Hello::V5 { clean_start } => (MqttCodec::V5(v5::Codec::new(max_in, 0)), Some(clean_start)),
    };
    let is_v5 = v5_clean_start.is_some();
    let first = match codec.decode(&mut packet) {
        Ok(Some((p, _))) => p,
        Ok(None) => {
            // The codec wants more than the packet's remaining length: it is too short.
            if is_v5 {
                return Err(refuse(&mut socket, true, 0, 0x81, "malformed CONNECT").await);
            }
            return Err(ConnError::Malformed(
                "CONNECT shorter than its contents".into(),
            ));
        }
        Err(DecodeError::InvalidClientId) => {
            return Err(refuse(&mut socket, is_v5, 0x02, 0x85, "client id not valid").await);
        }
        Err(e) => {
            if is_v5 {
                return Err(refuse(&mut socket, true, 0, 0x81, "malformed CONNECT").await);
            }
            return Err(decode_error(e));
        }
    };
    let reader = PacketReader::new(max_in);
    let mut c = connect_info(first)?;
    if let Some(clean_start) = v5_clean_start {
        c.clean_start = clean_start;
    }
    let cfg = &gw.config;
    if c.auth_method {
        return Err(refuse(
            &mut socket,
            true,
            0,
            0x8C,
            "no enhanced authentication method is configured",
        )
        .await);
    }
    let mut assigned = None;
    if c.client_id.is_empty() {
        if !c.clean_start && !c.v5 || c.level == 3 {
            return Err(refuse(
                &mut socket,
                c.v5,
                0x02,
                0x85,
                "empty client id needs a clean session",
            )
            .await);
        }
        let id = format!("auto-{:016x}", rand::random::<u64>());
        c.client_id = id.clone();
        if c.v5 {
            assigned = Some(id);
        }
    }
    // Authentication: a named user must be known and give its password, unless no users
    // are configured and anonymous access is on (then names are taken as given).
    match &c.user {
        None if !cfg.allow_anonymous => {
            gw.logins.refused(
                listener,
                peer,
                "",
                "anonymous",
                "anonymous clients are not allowed",
            );
            return Err(refuse(
                &mut socket,
                c.v5,
                0x05,
                0x87,
                "anonymous clients are not allowed",
            )
            .await);
        }
        Some(u) if !(cfg.users.current().await.is_empty() && cfg.allow_anonymous) => {
            let password = c
                .password
                .as_ref()
                .and_then(|p| std::str::from_utf8(p).ok())
                .unwrap_or("");
            if !cfg.users.current().await.verify_password(u, password) {
                gw.logins.refused(
                    listener,
                    peer,
                    u,
                    "bad_credentials",
                    "bad user name or password",
                );
                return Err(
                    refuse(&mut socket, c.v5, 0x04, 0x86, "bad user name or password").await,
                );
            }
        }
        _ => {}
    }
    if let Some((w, _)) = &c.will {
        let t = w
            .record
            .as_ref()
            .and_then(|r| r.properties.as_ref())
            .map_or("", |p| p.address.as_str());
        if !topic::valid_name(t) {
            return Err(refuse(&mut socket, c.v5, 0x02, 0x90, "invalid will topic").await);
        }
        if !cfg.acl.may_publish(c.user.as_deref(), &c.client_id, t) {
            return Err(refuse(
                &mut socket,
                c.v5,
                0x05,
                0x87,
                "will topic denied by the ACL",
            )
            .await);
        }
    }
    tracing::Span::current().record("client", c.client_id.as_str());
    let client_id: Arc<str> = Arc::from(c.client_id.as_str());
    connection.set_client_id(client_id.clone());
    connection.set_namespace(gw.namespace.clone());
    if let Some(user) = &c.user {
        connection.set_user(user.as_str());
    }
    let mut keep_alive = c.keep_alive;
    let mut server_keep_alive = None;
    if cfg.max_keep_alive > 0 && (keep_alive == 0 || keep_alive > cfg.max_keep_alive) {
        keep_alive = cfg.max_keep_alive;
        if c.v5 {
            server_keep_alive = Some(keep_alive);
        }
    }

    let (will, will_delay) = match c.will.take() {
        Some((w, d)) => (Some(w), i64::from(d) * 1000),
        None => (None, 0),
    };
    let receive_max = if c.v5 {
        c.receive_max
    } else {
        cfg.max_inflight_v3
    };
    let open = SessionCommand {
        request_id: 1,
        command: Some(Command::Open(v1::SessionOpen {
            namespace: cfg.namespace.clone(),
            client_id: c.client_id.clone(),
            clean_start: c.clean_start,
            expiry_interval_ms: expiry_ms(c.session_expiry),
            will,
            will_delay_ms: will_delay,
            receive_maximum: receive_max.into(),
            gateway_instance: cfg.instance.clone(),
        })),
    };
    let mut link = match gw.core.attach_session(COMMAND_WINDOW, Box::new(open)).await {
        Ok(link) => link,
        Err(status) => {
            let _ = refuse(&mut socket, c.v5, 0x03, 0x88, "core unavailable").await;
            return Err(ConnError::Core(status.message().to_string()));
        }
    };
    let opened = loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, link.next(None)).await {
            Ok(LinkEvent::Event(e)) => match e.event {
                Some(Event::Opened(o)) => break o,
                Some(Event::Error(e)) => {
                    let _ = refuse(&mut socket, c.v5, 0x03, 0x88, "core refused the session").await;
                    return Err(ConnError::Core(e.message));
                }
                _ => continue,
            },
            Ok(LinkEvent::Room) => continue,
            _ => {
                let _ = refuse(&mut socket, c.v5, 0x03, 0x88, "core unavailable").await;
                return Err(ConnError::Core("no answer to the session open".into()));
            }
        }
    };

    let codec = if c.v5 {
        MqttCodec::V5(v5::Codec::new(max_in, c.max_packet.unwrap_or(0)))
    } else {
        MqttCodec::V3(v3::Codec::new(max_in))
    };
    let mut client = Client {
        gw: gw.clone(),
        traffic,
        v5: c.v5,
        client_id,
        user: c.user.clone(),
        codec,
        out: BytesMut::new(),
        out_pos: 0,
        socket,
        link,
        next_rid: 1,
        replies: BTreeMap::new(),
        inbound_unacked: 0,
        rare: None,
        client_alias_max: c.alias_max,
        session_expiry: c.session_expiry,
    };
    if c.v5 {
        client.encode5(v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
            session_present: opened.session_present,
            reason_code: v5::ConnectAckReason::Success,
            receive_max: NonZeroU16::new(cfg.receive_maximum).unwrap_or(NonZeroU16::MAX),
            max_packet_size: Some(max_in),
            assigned_client_id: assigned.map(Into::into),
            topic_alias_max: cfg.topic_alias_maximum,
            server_keepalive_sec: server_keep_alive,
            ..Default::default()
        })))?;
    } else {
        client.encode3(v3::Packet::ConnectAck(v3::ConnectAck {
            return_code: v3::ConnectAckReason::ConnectionAccepted,
            session_present: opened.session_present,
        }))?;
    }
    client.flush().await?;
    debug!(
        v5 = c.v5,
        present = opened.session_present,
        keep_alive,
        "connected"
    );
    Ok(Connected {
        client,
        reader,
        keep_alive,
    })
}

/// The client's packets, decoded from a read buffer that an idle connection does not hold.
struct PacketReader {
    input: ReadBuffer,
    /// The largest packet taken: room is never made for more on a header's word.
    max_packet: usize,
}

impl PacketReader {
    fn new(max_packet: u32) -> Self {
        Self {
            input: ReadBuffer::new(IDLE_BUFFER),
            max_packet: max_packet as usize,
        }
    }

    /// The next packet, `None` at the end of the stream (a packet cut short by it too).
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        socket: &mut Socket,
        codec: &mut MqttCodec,
    ) -> Poll<Option<Result<(MqttPacket, u32), DecodeError>>> {
        loop {
            match codec.decode(self.input.bytes()) {
                Ok(Some(p)) => return Poll::Ready(Some(Ok(p))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            let want = missing_bytes(self.input.bytes()).min(self.max_packet);
            match ready!(self.input.poll_fill(cx, socket, want)) {
                Ok(0) => return Poll::Ready(None),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }
}

/// How many more bytes the packet at the front of `buf` needs, from its fixed header (0
/// when the header itself is not all there); the read makes room for all of it at once.
fn missing_bytes(buf: &[u8]) -> usize {
    fixed_header(buf).map_or(0, |(header, len)| (header + len).saturating_sub(buf.len()))
}

/// The fixed header at the start of `buf`: its own length and the remaining length it
/// announces. `None` while it is incomplete, or when it runs past 4 length bytes.
fn fixed_header(buf: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Some((2 + i, len));
        }
    }
    None
}

fn core_ended(status: Option<tonic::Status>) -> ConnError {
    ConnError::Core(status.map_or_else(
        || "the core ended the session stream".into(),
        |s| s.message().to_string(),
    ))
}

/// Waits (bounded) until the core ends a session stream whose commands have ended.
async fn end_core_stream(mut link: SessionLink) {
    link.end();
    let ended = tokio::time::timeout(STREAM_END_TIMEOUT, async {
        while !matches!(link.next(None).await, LinkEvent::End(_)) {}
    })
    .await;
    if ended.is_err() {
        debug!("the core did not end the session stream in time");
    }
}

/// Polls per wake-up at most this many rounds of events and packets before letting the
/// other tasks run (the session's events come from a queue that has no tokio budget).
const ROUNDS_PER_POLL: usize = 32;

pin_project_lite::pin_project! {
/// The keep-alive of a client that asked for one.
struct KeepAlive {
    period: Duration,
    deadline: Instant,
    // One timer for the connection's life, moved on only when it fires before the
    // deadline: traffic just moves `deadline` (a timer made and dropped per read showed in
    // profiles).
    #[pin]
    timer: tokio::time::Sleep,
}
}

impl KeepAlive {
    /// Boxed, the timer with it: one allocation for a client that asked for a keep-alive,
    /// and a pointer in every connection's state.
    fn new(keep_alive: u16) -> Option<Pin<Box<Self>>> {
        let period = Duration::from_millis(u64::from(keep_alive) * 1500);
        let deadline = Instant::now() + period;
        (keep_alive > 0).then(|| {
            Box::pin(Self {
                period,
                deadline,
                timer: tokio::time::sleep_until(deadline),
            })
        })
    }

    fn restart(keep: &mut Option<Pin<Box<Self>>>) {
        if let Some(k) = keep {
            let k = k.as_mut().project();
            *k.deadline = Instant::now() + *k.period;
        }
    }

    /// Ready once the deadline has passed with nothing read.
    fn poll_expired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut k = self.project();
        while k.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= *k.deadline {
                return Poll::Ready(());
            }
            k.timer.as_mut().reset(*k.deadline);
        }
        Poll::Pending
    }
}

/// A connection between CONNACK and its end: packets in, events out.
struct Serving {
    client: Client,
    reader: PacketReader,
    keep: Option<Pin<Box<KeepAlive>>>,
}

impl Serving {
    fn new(c: Connected) -> Self {
        Self {
            client: c.client,
            reader: c.reader,
            keep: KeepAlive::new(c.keep_alive),
        }
    }

    /// Serves until the connection ends: `Ok` after a DISCONNECT (its answers possibly
    /// not written yet), the error otherwise.
    fn poll_serve(
        &mut self,
        cx: &mut Context<'_>,
        connection: &ConnectionHandle,
    ) -> Poll<Result<(), ConnError>> {
        if let Poll::Ready(ending) = connection.poll_ending(cx) {
            return Poll::Ready(Err(match ending {
                Ending::Stop => ConnError::Refused("server shutting down", 0x8B),
                // The kick's path: DISCONNECT 0x98 to a 5.0 client, the socket closed, the
                // will sent and the session kept as for any connection the server closes.
                Ending::Close => {
                    info!(client = %self.client.client_id, "connection closed by an operator");
                    ConnError::Kicked
                }
            }));
        }
        if let Some(keep) = &mut self.keep
            && keep.as_mut().poll_expired(cx).is_ready()
        {
            return Poll::Ready(Err(ConnError::KeepAlive));
        }
        for _ in 0..ROUNDS_PER_POLL {
            // Answers are written before anything more is read or taken: a client that
            // does not read is not sent more than its socket takes.
            ready!(self.client.poll_flush(cx))?;
            // Reading the link serves the session's commands (in process) and makes room.
            let want_room = (self.client.link.room() < READ_ROOM).then_some(READ_ROOM);
            match self.client.link.poll_next(cx, want_room) {
                Poll::Ready(LinkEvent::Event(e)) => {
                    self.client.on_event(e)?;
                    // Batch whatever else is ready into the same write.
                    for _ in 0..256 {
                        match self.client.link.next_ready() {
                            Some(LinkEvent::Event(e)) => {
                                self.client.on_event(e)?;
                            }
                            Some(LinkEvent::End(status)) => {
                                return Poll::Ready(Err(core_ended(status)));
                            }
                            _ => break,
                        }
                    }
                    continue;
                }
                Poll::Ready(LinkEvent::Room) => {
                    // The client's packets waited unread meanwhile, so its keep-alive
                    // restarts now.
                    KeepAlive::restart(&mut self.keep);
                    continue;
                }
                Poll::Ready(LinkEvent::End(status)) => return Poll::Ready(Err(core_ended(status))),
                Poll::Pending if want_room.is_some() => return Poll::Pending,
                Poll::Pending => {}
            }
            // Handle what is already decoded before writing the answers in one go.
            let mut handled = 0;
            while handled < 64 {
                let Poll::Ready(next) =
                    self.reader
                        .poll_next(cx, &mut self.client.socket, &mut self.client.codec)
                else {
                    break;
                };
                match next {
                    Some(Ok((p, _))) => {
                        if !self.client.on_packet(p)? {
                            // DISCONNECT: the end writes what is pending and waits for the
                            // core to close the session.
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Some(Err(e)) => return Poll::Ready(Err(decode_error(e))),
                    None => return Poll::Ready(Err(ConnError::Eof)),
                }
                handled += 1;
            }
            if handled == 0 {
                return Poll::Pending;
            }
            // Once per batch: a clock read per packet showed in profiles.
            KeepAlive::restart(&mut self.keep);
        }
        // More is ready: let the other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The end of a served connection: its goodbye, then the session's stream to its end.
    async fn finish(self, result: Result<(), ConnError>) {
        let Serving {
            mut client,
            reader,
            keep,
        } = self;
        drop(keep);
        match &result {
            Ok(()) => {
                // DISCONNECT: the answers read before it go out, then the core closes the
                // session.
                if client.flush().await.is_ok() {
                    let _ = tokio::time::timeout(CONNECT_TIMEOUT, async {
                        loop {
                            match client.link.next(None).await {
                                LinkEvent::Event(e)
                                    if matches!(e.event, Some(Event::Closed(_))) =>
                                {
                                    break;
                                }
                                // A PUBREL read just before the DISCONNECT: its PUBCOMP
                                // goes out once the core stored the release.
                                LinkEvent::Event(e)
                                    if matches!(e.event, Some(Event::Released(_))) =>
                                {
                                    let _ = client.on_event(e);
                                    let _ = client.flush().await;
                                }
                                LinkEvent::End(_) => break,
                                _ => {}
                            }
                        }
                    })
                    .await;
                }
            }
            Err(e) => {
                if let Some(reason) = e.reason()
                    && !matches!(e, ConnError::Eof | ConnError::Io(_))
                {
                    client.out.clear();
                    client.disconnect5(reason);
                    let _ = client.flush().await;
                }
            }
        }
        // The client is done: its socket closes now (dropped with it). Then the
        // command stream ends, and the core's event stream is awaited to its end before it
        // is dropped: the core takes every command sent so far (a QoS 0 PUBLISH read just
        // before the client went away) and then ends the session's stream. Dropping the
        // event stream first would cancel the whole stream on the network transport (split
        // deployments), losing the commands still on their way to the core.
        let link = client.into_link();
        drop(reader);
        end_core_stream(link).await;
        log_end(&result);
    }
}
