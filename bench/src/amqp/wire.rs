//! The AMQP 0-9-1 connection the bench drives: one TCP socket, one channel, frames read and
//! written by the task that uses them.
//!
//! Why not lapin (which the bench used first): lapin runs an I/O thread per connection and
//! hands every frame between it and the calling task over channels, so each message costs
//! thread wake-ups on both sides. On the 2-core machines the comparisons run on, that
//! hand-off made the load generator use about as much CPU as the broker under test, and the
//! generator, not the broker, set the throughput. Here the task that publishes (or consumes)
//! owns the socket: no extra thread, no hand-off. Method payloads are encoded and decoded by
//! `amq-protocol` (the codec lapin itself is built on); only the 7-byte frame header, the
//! content header and the body are handled here, so a delivery's body is read without a copy.
//! Compatibility with real client libraries is what the compat suites test, not the bench.

use amq_protocol::frame::{AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, exchange, queue};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::BenchError;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const HEADER_LEN: usize = 7;
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// The frame size the bench asks for; the broker's `connection.tune` may lower it.
const FRAME_MAX: u32 = 128 * 1024;
/// The one channel every bench connection uses.
pub(crate) const CHANNEL: u16 = 1;
const CLASS_BASIC: u16 = 60;

/// Where to connect and as whom, from an `amqp://user:password@host:port/vhost` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub address: String,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl Target {
    /// `--target` HOST:PORT means RabbitMQ's default guest/guest user on vhost `/`; a full
    /// `amqp://` URI is taken as given (other users, vhosts).
    pub(crate) fn parse(target: &str) -> Result<Self, BenchError> {
        let Some(rest) = target.strip_prefix("amqp://") else {
            if target.contains("://") {
                return Err(BenchError::Invalid(format!(
                    "--target {target}: only amqp:// URIs (or HOST:PORT) are supported"
                )));
            }
            return Ok(Self {
                address: target.to_string(),
                user: "guest".into(),
                password: "guest".into(),
                vhost: "/".into(),
            });
        };
        let (authority, vhost) = match rest.split_once('/') {
            Some((a, v)) => (a, percent_decode(v)?),
            None => (rest, "/".to_string()),
        };
        let (credentials, host) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (user, password) = match credentials {
            Some(c) => {
                let (u, p) = c.split_once(':').unwrap_or((c, ""));
                (percent_decode(u)?, percent_decode(p)?)
            }
            None => ("guest".into(), "guest".into()),
        };
        let address = if host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']')) {
            host.to_string()
        } else {
            format!("{host}:5672")
        };
        Ok(Self {
            address,
            user,
            password,
            vhost: if vhost.is_empty() { "/".into() } else { vhost },
        })
    }
}

fn percent_decode(s: &str) -> Result<String, BenchError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| BenchError::Invalid(format!("bad percent escape in `{s}`")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| BenchError::Invalid(format!("`{s}` is not UTF-8")))
}

/// One frame off the wire; `payload` shares the read buffer.
#[derive(Debug)]
pub(crate) struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Bytes,
}

/// What a frame means to the bench.
#[derive(Debug)]
pub(crate) enum Event {
    Method(Box<AMQPClass>),
    /// A content header: the body size that follows.
    Header(u64),
    Body(Bytes),
    Heartbeat,
}

impl Frame {
    pub(crate) fn event(self) -> Result<Event, BenchError> {
        match self.kind {
            FRAME_METHOD => match amq_protocol::protocol::parse_class(&self.payload[..]) {
                Ok((_, method)) => Ok(Event::Method(Box::new(method))),
                Err(_) => Err(BenchError::Refused(format!(
                    "undecodable method frame ({} bytes)",
                    self.payload.len()
                ))),
            },
            FRAME_HEADER if self.payload.len() >= 12 => Ok(Event::Header(u64::from_be_bytes(
                self.payload[4..12].try_into().expect("8 bytes"),
            ))),
            FRAME_HEADER => Err(BenchError::Refused("short content header".into())),
            FRAME_BODY => Ok(Event::Body(self.payload)),
            _ => Ok(Event::Heartbeat),
        }
    }
}

/// The reading half. [`FrameReader::next`] is cancel-safe: it only awaits the socket read,
/// and whatever was read stays in the buffer.
pub(crate) struct FrameReader {
    half: OwnedReadHalf,
    buf: BytesMut,
    frame_max: usize,
}

impl FrameReader {
    pub(crate) async fn next(&mut self) -> Result<Frame, BenchError> {
        loop {
            if let Some(frame) = self.take()? {
                return Ok(frame);
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            let n = self
                .half
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| BenchError::Refused(format!("read: {e}")))?;
            if n == 0 {
                return Err(BenchError::Refused(
                    "the broker closed the connection".into(),
                ));
            }
        }
    }

    fn take(&mut self) -> Result<Option<Frame>, BenchError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = self.buf[0];
        if !matches!(
            kind,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ) {
            return Err(BenchError::Refused(format!("unknown frame type {kind}")));
        }
        let size = u32::from_be_bytes(self.buf[3..7].try_into().expect("4 bytes")) as usize;
        if size + HEADER_LEN + 1 > self.frame_max {
            return Err(BenchError::Refused(format!(
                "a frame of {size} bytes exceeds frame_max {}",
                self.frame_max
            )));
        }
        if self.buf.len() < HEADER_LEN + size + 1 {
            return Ok(None);
        }
        if self.buf[HEADER_LEN + size] != FRAME_END {
            return Err(BenchError::Refused("frame without its end octet".into()));
        }
        let channel = u16::from_be_bytes([self.buf[1], self.buf[2]]);
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(size).freeze();
        self.buf.advance(1);
        Ok(Some(Frame {
            kind,
            channel,
            payload,
        }))
    }
}

/// The writing half: frames are collected in a buffer and written by [`FrameWriter::flush`].
pub(crate) struct FrameWriter {
    half: OwnedWriteHalf,
    out: BytesMut,
    frame_max: usize,
}

impl FrameWriter {
    pub(crate) fn method(&mut self, method: AMQPClass) {
        let frame = AMQPFrame::Method(CHANNEL, method);
        // Encoding into a Vec cannot fail.
        if let Ok((bytes, _)) = cookie_factory::r#gen(gen_frame(&frame), Vec::new()) {
            self.out.extend_from_slice(&bytes);
        }
    }

    /// basic.publish with its content header and body, `prelude` being the method and content
    /// header frames from [`publish_prelude`].
    pub(crate) fn publish(&mut self, prelude: &[u8], body: &[u8]) {
        self.out.extend_from_slice(prelude);
        let chunk = self.frame_max - HEADER_LEN - 1;
        for part in body.chunks(chunk.max(1)) {
            self.out.put_u8(FRAME_BODY);
            self.out.put_u16(CHANNEL);
            self.out.put_u32(part.len() as u32);
            self.out.extend_from_slice(part);
            self.out.put_u8(FRAME_END);
        }
    }

    /// basic.ack of every delivery up to `tag`.
    pub(crate) fn ack_up_to(&mut self, tag: u64) {
        self.method(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple: true,
        })));
    }

    pub(crate) async fn flush(&mut self) -> Result<(), BenchError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.half.write_all(&self.out).await;
        self.out.clear();
        result.map_err(|e| BenchError::Refused(format!("write: {e}")))
    }
}

/// The basic.publish method frame and the content header frame of a `size`-byte body, built
/// once per publisher: they are the same for every message it sends.
pub(crate) fn publish_prelude(
    exchange: &str,
    routing_key: &str,
    size: usize,
    persistent: bool,
) -> Vec<u8> {
    let method = AMQPFrame::Method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(routing_key),
            mandatory: false,
            immediate: false,
        })),
    );
    let mut out = cookie_factory::r#gen(gen_frame(&method), Vec::new())
        .map(|(v, _)| v)
        .unwrap_or_default();
    // Content header: class, weight, body size, property flags (delivery-mode only, bit 12),
    // delivery-mode 2 = persistent.
    let mut header = Vec::with_capacity(15);
    header.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(size as u64).to_be_bytes());
    if persistent {
        header.extend_from_slice(&(1u16 << 12).to_be_bytes());
        header.push(2);
    } else {
        header.extend_from_slice(&0u16.to_be_bytes());
    }
    out.push(FRAME_HEADER);
    out.extend_from_slice(&CHANNEL.to_be_bytes());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.push(FRAME_END);
    out
}

/// An open connection with channel [`CHANNEL`] open on it.
pub(crate) struct Connection {
    pub reader: FrameReader,
    pub writer: FrameWriter,
}

impl Connection {
    /// Connects, authenticates (PLAIN), opens the vhost and channel 1. Heartbeats are off
    /// (the client's tune-ok may choose 0): a connection the bench holds idle must not need a
    /// task to keep it alive.
    pub(crate) async fn open(target: &Target) -> Result<Self, BenchError> {
        let stream = TcpStream::connect(&target.address)
            .await
            .map_err(|e| BenchError::Io(format!("connect {}: {e}", target.address)))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut conn = Self {
            reader: FrameReader {
                half: read,
                buf: BytesMut::with_capacity(64 * 1024),
                frame_max: FRAME_MAX as usize,
            },
            writer: FrameWriter {
                half: write,
                out: BytesMut::with_capacity(64 * 1024),
                frame_max: FRAME_MAX as usize,
            },
        };
        conn.writer.out.extend_from_slice(PROTOCOL_HEADER);
        conn.writer.flush().await?;
        match conn.next_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(start)) => {
                let offered = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
                if !offered.split(' ').any(|m| m == "PLAIN") {
                    return Err(BenchError::Refused(format!(
                        "the broker offers no PLAIN authentication (offers: {offered})"
                    )));
                }
            }
            other => return Err(unexpected("connection.start", &other)),
        }
        let mut properties = FieldTable::default();
        properties.insert(
            "product".into(),
            AMQPValue::LongString(LongString::from("tributary bench")),
        );
        let mut capabilities = FieldTable::default();
        for capability in ["publisher_confirms", "basic.nack", "consumer_cancel_notify"] {
            capabilities.insert(capability.into(), AMQPValue::Boolean(true));
        }
        properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
        let response = format!("\0{}\0{}", target.user, target.password);
        conn.send0(AMQPClass::Connection(connection::AMQPMethod::StartOk(
            connection::StartOk {
                client_properties: properties,
                mechanism: ShortString::from("PLAIN"),
                response: LongString::from(response),
                locale: ShortString::from("en_US"),
            },
        )))
        .await?;
        let tune = match conn.next_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) => tune,
            other => return Err(unexpected("connection.tune", &other)),
        };
        let frame_max = match tune.frame_max {
            0 => FRAME_MAX,
            n => n.min(FRAME_MAX),
        };
        conn.reader.frame_max = frame_max as usize;
        conn.writer.frame_max = frame_max as usize;
        conn.send0(AMQPClass::Connection(connection::AMQPMethod::TuneOk(
            connection::TuneOk {
                channel_max: 1,
                frame_max,
                heartbeat: 0,
            },
        )))
        .await?;
        conn.send0(AMQPClass::Connection(connection::AMQPMethod::Open(
            connection::Open {
                virtual_host: ShortString::from(target.vhost.as_str()),
            },
        )))
        .await?;
        match conn.next_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
            other => return Err(unexpected("connection.open-ok", &other)),
        }
        match conn
            .call(AMQPClass::Channel(channel::AMQPMethod::Open(
                channel::Open {},
            )))
            .await?
        {
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => Ok(conn),
            other => Err(unexpected("channel.open-ok", &other)),
        }
    }

    async fn send0(&mut self, method: AMQPClass) -> Result<(), BenchError> {
        let frame = AMQPFrame::Method(0, method);
        if let Ok((bytes, _)) = cookie_factory::r#gen(gen_frame(&frame), Vec::new()) {
            self.writer.out.extend_from_slice(&bytes);
        }
        self.writer.flush().await
    }

    /// The next method on `channel`, skipping heartbeats. A connection.close (or, on the
    /// bench's channel, a channel.close) is answered and returned as the error it reports.
    async fn next_method(&mut self, channel: u16) -> Result<AMQPClass, BenchError> {
        loop {
            let frame = self.reader.next().await?;
            let on = frame.channel;
            let Event::Method(method) = frame.event()? else {
                continue;
            };
            if let Some(error) = self.closed_by_broker(&method).await {
                return Err(error);
            }
            if on == channel {
                return Ok(*method);
            }
        }
    }

    /// When `method` closes the connection or the channel: answers it and returns the error.
    pub(crate) async fn closed_by_broker(&mut self, method: &AMQPClass) -> Option<BenchError> {
        let error = close_error(method)?;
        match method {
            AMQPClass::Connection(_) => {
                let _ = self
                    .send0(AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                        connection::CloseOk {},
                    )))
                    .await;
            }
            _ => {
                self.writer
                    .method(AMQPClass::Channel(channel::AMQPMethod::CloseOk(
                        channel::CloseOk {},
                    )));
                let _ = self.writer.flush().await;
            }
        }
        Some(error)
    }

    /// Sends a synchronous method on the bench's channel and returns the broker's answer.
    pub(crate) async fn call(&mut self, method: AMQPClass) -> Result<AMQPClass, BenchError> {
        self.writer.method(method);
        self.writer.flush().await?;
        self.next_method(CHANNEL).await
    }

    /// connection.close, and its close-ok read (frames still in flight are skipped).
    pub(crate) async fn close(mut self) {
        let _ = self
            .send0(AMQPClass::Connection(connection::AMQPMethod::Close(
                connection::Close {
                    reply_code: 200,
                    reply_text: ShortString::from("OK"),
                    class_id: 0,
                    method_id: 0,
                },
            )))
            .await;
        while let Ok(frame) = self.reader.next().await {
            if frame.channel == 0
                && let Ok(Event::Method(method)) = frame.event()
                && matches!(
                    *method,
                    AMQPClass::Connection(
                        connection::AMQPMethod::CloseOk(_) | connection::AMQPMethod::Close(_)
                    )
                )
            {
                return;
            }
        }
    }

    pub(crate) async fn confirm_select(&mut self) -> Result<(), BenchError> {
        match self
            .call(AMQPClass::Confirm(confirm::AMQPMethod::Select(
                confirm::Select { nowait: false },
            )))
            .await?
        {
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => Ok(()),
            other => Err(unexpected("confirm.select-ok", &other)),
        }
    }

    pub(crate) async fn qos(&mut self, prefetch: u16) -> Result<(), BenchError> {
        match self
            .call(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: prefetch,
                global: false,
            })))
            .await?
        {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => Ok(()),
            other => Err(unexpected("basic.qos-ok", &other)),
        }
    }

    pub(crate) async fn consume(
        &mut self,
        queue: &str,
        tag: &str,
        no_ack: bool,
    ) -> Result<(), BenchError> {
        match self
            .call(AMQPClass::Basic(basic::AMQPMethod::Consume(
                basic::Consume {
                    queue: ShortString::from(queue),
                    consumer_tag: ShortString::from(tag),
                    no_local: false,
                    no_ack,
                    exclusive: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                },
            )))
            .await?
        {
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)) => Ok(()),
            other => Err(unexpected("basic.consume-ok", &other)),
        }
    }

    pub(crate) async fn declare_queue(
        &mut self,
        name: &str,
        durable: bool,
    ) -> Result<(), BenchError> {
        match self
            .call(AMQPClass::Queue(queue::AMQPMethod::Declare(
                queue::Declare {
                    queue: ShortString::from(name),
                    passive: false,
                    durable,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                },
            )))
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)) => Ok(()),
            other => Err(unexpected("queue.declare-ok", &other)),
        }
    }

    pub(crate) async fn declare_fanout(
        &mut self,
        name: &str,
        durable: bool,
    ) -> Result<(), BenchError> {
        match self
            .call(AMQPClass::Exchange(exchange::AMQPMethod::Declare(
                exchange::Declare {
                    exchange: ShortString::from(name),
                    kind: ShortString::from("fanout"),
                    passive: false,
                    durable,
                    auto_delete: false,
                    internal: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                },
            )))
            .await?
        {
            AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)) => Ok(()),
            other => Err(unexpected("exchange.declare-ok", &other)),
        }
    }

    pub(crate) async fn bind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
    ) -> Result<(), BenchError> {
        match self
            .call(AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: ShortString::from(queue),
                exchange: ShortString::from(exchange),
                routing_key: ShortString::from(""),
                nowait: false,
                arguments: FieldTable::default(),
            })))
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::BindOk(_)) => Ok(()),
            other => Err(unexpected("queue.bind-ok", &other)),
        }
    }

    pub(crate) async fn delete_queue(&mut self, name: &str) -> Result<(), BenchError> {
        match self
            .call(AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: ShortString::from(name),
                if_unused: false,
                if_empty: false,
                nowait: false,
            })))
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_)) => Ok(()),
            other => Err(unexpected("queue.delete-ok", &other)),
        }
    }

    pub(crate) async fn delete_exchange(&mut self, name: &str) -> Result<(), BenchError> {
        match self
            .call(AMQPClass::Exchange(exchange::AMQPMethod::Delete(
                exchange::Delete {
                    exchange: ShortString::from(name),
                    if_unused: false,
                    nowait: false,
                },
            )))
            .await?
        {
            AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(_)) => Ok(()),
            other => Err(unexpected("exchange.delete-ok", &other)),
        }
    }
}

/// The error a connection.close or channel.close from the broker reports, if `method` is one.
pub(crate) fn close_error(method: &AMQPClass) -> Option<BenchError> {
    let (what, code, text) = match method {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
            ("connection", c.reply_code, c.reply_text.as_str())
        }
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
            ("channel", c.reply_code, c.reply_text.as_str())
        }
        _ => return None,
    };
    Some(BenchError::Refused(format!(
        "the broker closed the {what}: {code} {text}"
    )))
}

fn unexpected(wanted: &str, got: &AMQPClass) -> BenchError {
    BenchError::Refused(format!(
        "expected {wanted}, got {}",
        method_name(got).unwrap_or("an unexpected method")
    ))
}

fn method_name(method: &AMQPClass) -> Option<&'static str> {
    Some(match method {
        AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) => "basic.cancel",
        AMQPClass::Basic(basic::AMQPMethod::Return(_)) => "basic.return",
        AMQPClass::Basic(basic::AMQPMethod::Nack(_)) => "basic.nack",
        AMQPClass::Connection(connection::AMQPMethod::Secure(_)) => "connection.secure",
        AMQPClass::Connection(connection::AMQPMethod::Blocked(_)) => "connection.blocked",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("127.0.0.1:5672").unwrap(),
            Target {
                address: "127.0.0.1:5672".into(),
                user: "guest".into(),
                password: "guest".into(),
                vhost: "/".into(),
            }
        );
        assert_eq!(
            Target::parse("amqp://u:p%40ss@h:1/v%2fx").unwrap(),
            Target {
                address: "h:1".into(),
                user: "u".into(),
                password: "p@ss".into(),
                vhost: "v/x".into(),
            }
        );
        assert_eq!(Target::parse("amqp://h/%2f").unwrap().address, "h:5672");
        assert_eq!(Target::parse("amqp://h/%2f").unwrap().vhost, "/");
        assert!(Target::parse("amqps://h").is_err());
        assert!(Target::parse("amqp://h/%zz").is_err());
    }

    #[test]
    fn the_publish_prelude_is_a_method_and_a_content_header() {
        let prelude = publish_prelude("", "q", 1024, true);
        assert_eq!(prelude[0], FRAME_METHOD);
        let method_size = u32::from_be_bytes(prelude[3..7].try_into().unwrap()) as usize;
        let header = &prelude[HEADER_LEN + method_size + 1..];
        assert_eq!(header[0], FRAME_HEADER);
        assert_eq!(*header.last().unwrap(), FRAME_END);
        let payload = &header[HEADER_LEN..header.len() - 1];
        assert_eq!(u64::from_be_bytes(payload[4..12].try_into().unwrap()), 1024);
        // delivery-mode 2 parses back with amq-protocol's property parser.
        let (_, props) = amq_protocol::protocol::basic::parse_properties(&payload[12..]).unwrap();
        assert_eq!(props.delivery_mode(), &Some(2));
    }
}
