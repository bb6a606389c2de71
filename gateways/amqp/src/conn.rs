//! One AMQP connection: handshake, then frames in and core events out until either side
//! closes.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::ChannelEvents;
use amq_protocol::protocol::basic::parse_properties;
use amq_protocol::protocol::{
    AMQPClass, access, basic, channel as chan, confirm, connection, exchange, queue, tx,
};
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, debug, info, info_span, warn};
use tributary_gateway_common::auth::Users;
use tributary_gateway_common::{ConnectionHandle, Traffic};
use tributary_proto::amqp_link::{self as link, channel_command::Command, channel_event::Event};

use crate::frames::{self, *};
use crate::{Gateway, is_loopback};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection that ended waits for the core to finish its commands.
const STREAM_END_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames during the handshake, before tune-ok sets the limit (the spec's minimum).
const HANDSHAKE_FRAME_MAX: usize = 4096 * 32;
/// Commands to the core in flight; reading from the socket waits beyond it.
const COMMAND_WINDOW: usize = 4096;
/// Largest message body accepted (RabbitMQ's default max_message_size).
const MAX_MESSAGE_SIZE: u64 = 128 << 20;
const REPLY_TO: &str = "amq.rabbitmq.reply-to";
const ACCESS_REFUSED: u16 = 403;
const NOT_ALLOWED: u16 = 530;
const PRECONDITION_FAILED: u16 = 406;
const CONNECTION_FORCED: u16 = 320;
/// The reply text of an operator's close (RabbitMQ's says "Closed via management plugin").
const OPERATOR_CLOSE: &str = "CONNECTION_FORCED - Closed by an operator";

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out")]
    Timeout,
    #[error("peer closed the connection")]
    Eof,
    #[error("core: {0}")]
    Core(#[from] tonic::Status),
    #[error("{0}")]
    Protocol(String),
}

/// A client's byte stream: plain TCP or TLS.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

pub(crate) async fn run(
    gw: Arc<Gateway>,
    socket: impl Socket,
    peer: SocketAddr,
    listener: &'static str,
    listed: ConnectionHandle,
) {
    let span = info_span!("amqp_conn", %peer, listener, connection = listed.id());
    async move {
        match serve(gw, socket, peer, listener, &listed).await {
            Ok(()) | Err(ConnError::Eof) => debug!("connection ended"),
            Err(e) => debug!(error = %e, "connection ended"),
        }
    }
    .instrument(span)
    .await
}

/// The name a client gave its connection (`connection_name` among its client properties,
/// as RabbitMQ's management shows it).
fn connection_name(properties: &FieldTable) -> Option<String> {
    let (_, value) = properties
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == "connection_name")?;
    match value {
        AMQPValue::LongString(v) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        AMQPValue::ShortString(v) => Some(v.as_str().to_owned()),
        _ => None,
    }
}

fn long(s: &str) -> LongString {
    LongString::from(s.as_bytes().to_vec())
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "per_consumer_qos",
        "authentication_failure_close",
        "direct_reply_to",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut t = FieldTable::default();
    t.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    t.insert("product".into(), AMQPValue::LongString(long("Tributary")));
    t.insert(
        "version".into(),
        AMQPValue::LongString(long(env!("CARGO_PKG_VERSION"))),
    );
    t.insert("platform".into(), AMQPValue::LongString(long("Rust")));
    t.insert(
        "cluster_name".into(),
        AMQPValue::LongString(long("tributary")),
    );
    t
}

use crate::broker::fields::encode_table;

async fn write(sock: &mut impl Socket, out: &mut BytesMut) -> Result<(), ConnError> {
    if !out.is_empty() {
        sock.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Reads frames until a method on channel 0 arrives (handshake only).
async fn read_method(sock: &mut impl Socket, buf: &mut BytesMut) -> Result<AMQPClass, ConnError> {
    loop {
        match take_frame(buf, HANDSHAKE_FRAME_MAX) {
            Ok(Some(f)) if f.kind == FRAME_HEARTBEAT => continue,
            Ok(Some(f)) if f.kind == FRAME_METHOD => {
                return parse_method(&f.payload).ok_or_else(|| {
                    ConnError::Protocol("malformed method in the handshake".into())
                });
            }
            Ok(Some(_)) => {
                return Err(ConnError::Protocol(
                    "content frame during the handshake".into(),
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(ConnError::Protocol(e.to_string())),
        }
        let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, sock.read_buf(buf))
            .await
            .map_err(|_| ConnError::Timeout)??;
        if n == 0 {
            return Err(ConnError::Eof);
        }
    }
}

fn close_method(code: u16, text: &str, class_id: u16, method_id: u16) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: code,
        reply_text: ShortString::from(truncate(text)),
        class_id,
        method_id,
    }))
}

fn truncate(s: &str) -> String {
    if s.len() <= 255 {
        return s.to_owned();
    }
    let mut end = 255;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Sends connection.close and waits briefly for close-ok.
async fn refuse_connection(
    sock: &mut impl Socket,
    buf: &mut BytesMut,
    code: u16,
    text: &str,
    (class_id, method_id): (u16, u16),
) -> Result<(), ConnError> {
    let mut out = BytesMut::new();
    put_method(&mut out, 0, close_method(code, text, class_id, method_id));
    write(sock, &mut out).await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), read_method(sock, buf)).await;
    Ok(())
}

/// A refused login: the reason label for the metric, the user named, what the client is told.
type LoginError = (&'static str, String, String);

fn authenticate(
    gw: &Gateway,
    users: &Users,
    peer: &SocketAddr,
    mechanism: &str,
    response: &[u8],
) -> Result<(String, bool), LoginError> {
    let (user, password) = match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next();
            let user = parts.next().unwrap_or_default();
            let pass = parts.next().unwrap_or_default();
            (
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(pass).into_owned(),
            )
        }
        "AMQPLAIN" => {
            // The response is a field table's entries without the length prefix.
            let mut raw = (response.len() as u32).to_be_bytes().to_vec();
            raw.extend_from_slice(response);
            let t = parse_field_table(&raw[..]).map(|(_, t)| t).map_err(|_| {
                (
                    "malformed",
                    String::new(),
                    "malformed AMQPLAIN response".to_string(),
                )
            })?;
            let get = |k: &str| match t.inner().get(k) {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
                _ => String::new(),
            };
            (get("LOGIN"), get("PASSWORD"))
        }
        other => {
            return Err((
                "mechanism",
                String::new(),
                format!("unsupported mechanism '{other}'"),
            ));
        }
    };
    // RabbitMQ's `loopback_users`: guest logs in from this machine only, whatever its
    // password (an imported or configured guest included).
    if user == "guest" && !is_loopback(peer) {
        return Err((
            "guest_remote",
            user,
            "user 'guest' can only connect via localhost".into(),
        ));
    }
    if users.contains(&user) {
        if users.verify_password(&user, &password) {
            return Ok((user, false));
        }
    } else if gw.config.default_guest && user == "guest" && password == "guest" {
        if is_loopback(peer) {
            return Ok((user, true));
        }
        return Err((
            "guest_remote",
            user,
            "user 'guest' can only connect via localhost".into(),
        ));
    }
    Err((
        "bad_credentials",
        user,
        format!(
            "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
        ),
    ))
}

#[derive(PartialEq, Eq)]
enum ChanState {
    /// channel.open sent to the core, open-ok not back yet.
    Opening,
    Open,
    /// The server sent channel.close; waiting for close-ok.
    Closing,
}

struct Pending {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    /// basic.publish with immediate=true: its content is read (and dropped), then the
    /// connection is closed with 540, as RabbitMQ 3.x does.
    immediate: bool,
    header: Option<Header>,
    body: BytesMut,
    /// Body bytes received so far (kept in `body`, except for an immediate publish).
    received: u64,
}

struct Header {
    body_size: u64,
    properties: Bytes,
    persistent: bool,
    expiration_ms: i64,
    priority: u32,
}

struct Chan {
    state: ChanState,
    /// Per answered command in flight: whether the client asked for no answer.
    nowait: VecDeque<bool>,
    pending: Option<Pending>,
    confirm: bool,
    next_seq: u64,
    /// The lowest publish sequence number not yet confirmed to the client.
    confirm_low: u64,
    /// Confirms sent one by one above `confirm_low`.
    confirm_ahead: BTreeSet<u64>,
    /// Confirms from the core not yet written (seq, ack): coalesced per write.
    confirm_batch: Vec<(u64, bool)>,
    reply_to: Option<String>,
}

struct Session {
    user: String,
    /// Messages in and out of this connection, in the listener's traffic metrics.
    traffic: Traffic,
    /// Channels with confirms waiting in `confirm_batch`.
    confirm_dirty: Vec<u16>,
    frame_max: usize,
    channel_max: u16,
    channels: HashMap<u16, Chan>,
    out: BytesMut,
    commands: Vec<link::ChannelCommand>,
    /// Set once the server sent connection.close.
    closing: bool,
    /// The client sent connection.close: close-ok goes out once the core is done with the
    /// connection.
    close_ok_pending: bool,
    done: bool,
}

/// A connection-level failure: connection.close with this code.
struct Fatal {
    code: u16,
    text: String,
    class_id: u16,
    method_id: u16,
}

fn fatal(code: u16, text: impl Into<String>, (class_id, method_id): (u16, u16)) -> Fatal {
    Fatal {
        code,
        text: text.into(),
        class_id,
        method_id,
    }
}

async fn serve(
    gw: Arc<Gateway>,
    mut sock: impl Socket,
    peer: SocketAddr,
    listener: &'static str,
    listed: &ConnectionHandle,
) -> Result<(), ConnError> {
    let traffic = Traffic::new(listener);
    let mut hdr = [0u8; 8];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, sock.read_exact(&mut hdr))
        .await
        .map_err(|_| ConnError::Timeout)??;
    if &hdr != PROTOCOL_HEADER {
        sock.write_all(PROTOCOL_HEADER).await?;
        return Ok(());
    }
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    put_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: long("PLAIN AMQPLAIN"),
            locales: long("en_US"),
        })),
    );
    write(&mut sock, &mut out).await?;
    let AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)) =
        read_method(&mut sock, &mut buf).await?
    else {
        return Err(ConnError::Protocol("expected connection.start-ok".into()));
    };
    if let Some(name) = connection_name(&start_ok.client_properties) {
        listed.set_client_id(name);
    }
    let users = gw.config.users.current().await;
    let (user, default_guest) = match authenticate(
        &gw,
        &users,
        &peer,
        start_ok.mechanism.as_str(),
        start_ok.response.as_bytes(),
    ) {
        Ok(u) => u,
        Err((reason, user, why)) => {
            gw.logins.refused(listener, peer, &user, reason, &why);
            refuse_connection(
                &mut sock,
                &mut buf,
                ACCESS_REFUSED,
                &format!("ACCESS_REFUSED - {why}"),
                (10, 11),
            )
            .await?;
            return Ok(());
        }
    };
    listed.set_user(user.as_str());
    let cfg = &gw.config;
    put_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: cfg.channel_max,
            frame_max: cfg.frame_max,
            heartbeat: cfg.heartbeat,
        })),
    );
    write(&mut sock, &mut out).await?;
    let AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune)) =
        read_method(&mut sock, &mut buf).await?
    else {
        return Err(ConnError::Protocol("expected connection.tune-ok".into()));
    };
    if tune.frame_max != 0 && tune.frame_max < 4096 {
        // Below the spec's minimum frame size: RabbitMQ drops such a peer too.
        info!(
            frame_max = tune.frame_max,
            "amqp: tune-ok frame_max below 4096, closing"
        );
        return Ok(());
    }
    let frame_max = match tune.frame_max {
        0 => cfg.frame_max,
        n => n.min(cfg.frame_max),
    } as usize;
    let channel_max = match tune.channel_max {
        0 => cfg.channel_max,
        n => n.min(cfg.channel_max),
    };
    let heartbeat = tune.heartbeat;
    let AMQPClass::Connection(connection::AMQPMethod::Open(open)) =
        read_method(&mut sock, &mut buf).await?
    else {
        return Err(ConnError::Protocol("expected connection.open".into()));
    };
    let vhost = open.virtual_host.as_str().to_owned();
    if !cfg.may_open(&user, &vhost, default_guest, &users) {
        let why = format!("NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'");
        gw.logins.refused(listener, peer, &user, "vhost", &why);
        refuse_connection(&mut sock, &mut buf, NOT_ALLOWED, &why, (10, 40)).await?;
        return Ok(());
    }
    listed.set_namespace(vhost.as_str());
    put_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
    );
    write(&mut sock, &mut out).await?;

    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_WINDOW);
    let mut events = gw.broker.attach(ReceiverStream::new(cmd_rx));
    cmd_tx
        .send(link::ChannelCommand {
            channel: 0,
            command: Some(Command::LinkOpen(link::LinkOpen {
                vhost: vhost.clone(),
                user: user.clone(),
                peer: peer.to_string(),
            })),
        })
        .await
        .map_err(|_| ConnError::Protocol("core stream closed".into()))?;
    debug!(%user, %vhost, frame_max, heartbeat, "amqp connection open");

    let mut s = Session {
        user,
        traffic,
        confirm_dirty: Vec::new(),
        frame_max,
        channel_max,
        channels: HashMap::new(),
        out,
        commands: Vec::new(),
        closing: false,
        close_ok_pending: false,
        done: false,
    };
    let result = session_loop(
        &mut s,
        &mut sock,
        &mut buf,
        &cmd_tx,
        &mut events,
        heartbeat,
        listed,
    )
    .await;
    // The command stream ends here; the core then finishes the connection's commands (a
    // publish read just before the end), closes its channels (unacked messages back to their
    // queues) and ends the event stream, which is awaited before it is dropped: dropping it
    // first would cancel the whole stream on the network transport (split deployments) and
    // lose the commands still on their way. A client's connection.close is answered once
    // that is done, as RabbitMQ answers it once the connection's channels are closed.
    drop(cmd_tx);
    if s.close_ok_pending && result.is_ok() {
        end_core_stream(events).await;
        put_method(
            &mut s.out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        );
        let _ = write(&mut sock, &mut s.out).await;
        let _ = sock.shutdown().await;
    } else {
        let _ = sock.shutdown().await;
        drop(sock);
        end_core_stream(events).await;
    }
    result
}

/// Frames in and core events out until either side ends the connection.
async fn session_loop(
    s: &mut Session,
    sock: &mut impl Socket,
    buf: &mut BytesMut,
    cmd_tx: &mpsc::Sender<link::ChannelCommand>,
    events: &mut ChannelEvents,
    heartbeat: u16,
    listed: &ConnectionHandle,
) -> Result<(), ConnError> {
    let hb = (heartbeat > 0).then(|| Duration::from_secs(heartbeat as u64));
    let period = hb.map_or(Duration::from_secs(3600), |h| h / 2);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_read = Instant::now();
    let mut closing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            n = sock.read_buf(buf) => {
                let n = n?;
                if n == 0 {
                    break;
                }
                last_read = Instant::now();
                loop {
                    match take_frame(buf, s.frame_max) {
                        Ok(Some(f)) => {
                            if let Err(f) = s.on_frame(f) {
                                s.close_connection(f);
                            }
                            if s.done {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "amqp: bad frame");
                            let code = FRAME_ERROR;
                            s.close_connection(fatal(code, format!("FRAME_ERROR - {e}"), (0, 0)));
                            // Nothing after a framing error can be trusted.
                            buf.clear();
                            break;
                        }
                    }
                }
                for c in s.commands.drain(..) {
                    if cmd_tx.send(c).await.is_err() {
                        return Err(ConnError::Protocol("core stream closed".into()));
                    }
                }
            }
            ev = events.next() => {
                match ev {
                    Some(Ok(ev)) => {
                        s.on_event(ev);
                        // Everything already waiting goes out in the same write.
                        for _ in 0..512 {
                            match events.next().now_or_never() {
                                Some(Some(Ok(ev))) => s.on_event(ev),
                                _ => break,
                            }
                        }
                    }
                    _ => {
                        s.close_connection(fatal(CONNECTION_FORCED, "CONNECTION_FORCED - the core went away", (0, 0)));
                        s.done = true;
                    }
                }
            }
            // As RabbitMQ's management close: connection.close 320, then the client's
            // close-ok (or the closing timeout) ends it; the core puts back what was
            // delivered and not acknowledged, as for any connection that ends.
            () = listed.close_requested(), if !s.closing => {
                info!(user = %s.user, "connection closed by an operator");
                s.close_connection(fatal(CONNECTION_FORCED, OPERATOR_CLOSE, (0, 0)));
            }
            _ = tick.tick() => {
                if let Some(h) = hb {
                    put_heartbeat(&mut s.out);
                    if last_read.elapsed() > h * 2 {
                        info!("amqp: missed heartbeats from client, closing");
                        write(sock, &mut s.out).await?;
                        return Ok(());
                    }
                }
                if closing_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                    s.done = true;
                }
            }
        }
        s.flush_confirms();
        if s.closing && closing_since.is_none() {
            closing_since = Some(Instant::now());
        }
        write(sock, &mut s.out).await?;
        if s.done {
            break;
        }
    }
    Ok(())
}

/// Waits (bounded) until the core ends a connection's event stream once its commands ended.
async fn end_core_stream(mut events: ChannelEvents) {
    let ended = tokio::time::timeout(STREAM_END_TIMEOUT, async {
        while events.next().await.is_some() {}
    })
    .await;
    if ended.is_err() {
        debug!("the core did not end the connection's stream in time");
    }
}

impl Session {
    fn command(&mut self, channel: u16, command: Command) {
        self.commands.push(link::ChannelCommand {
            channel: channel as u32,
            command: Some(command),
        });
    }

    fn close_connection(&mut self, f: Fatal) {
        if self.closing {
            return;
        }
        warn!(code = f.code, text = %f.text, "amqp: closing the connection");
        self.closing = true;
        put_method(
            &mut self.out,
            0,
            close_method(f.code, &f.text, f.class_id, f.method_id),
        );
    }

    /// Closes one channel from the gateway side (an error found before the core).
    fn close_channel(&mut self, channel: u16, code: u16, text: String, ids: (u16, u16)) {
        if let Some(c) = self.channels.get_mut(&channel) {
            c.state = ChanState::Closing;
            c.pending = None;
            c.nowait.clear();
        }
        put_method(
            &mut self.out,
            channel,
            AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
                reply_code: code,
                reply_text: ShortString::from(truncate(&text)),
                class_id: ids.0,
                method_id: ids.1,
            })),
        );
        self.command(channel, Command::ChannelClose(true));
    }

    fn on_frame(&mut self, f: RawFrame) -> Result<(), Fatal> {
        if self.closing {
            // Only the handshake of the close matters now.
            if f.kind == FRAME_METHOD && f.channel == 0 {
                match parse_method(&f.payload) {
                    Some(AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
                        self.done = true
                    }
                    Some(AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                        put_method(
                            &mut self.out,
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                connection::CloseOk {},
                            )),
                        );
                        self.done = true;
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        match f.kind {
            FRAME_HEARTBEAT => {
                if f.channel != 0 {
                    return Err(fatal(
                        UNEXPECTED_FRAME,
                        "UNEXPECTED_FRAME - heartbeat frame on a non-zero channel",
                        (0, 0),
                    ));
                }
                Ok(())
            }
            FRAME_METHOD => self.on_method(f.channel, &f.payload),
            FRAME_HEADER => self.on_header(f.channel, &f.payload),
            FRAME_BODY => self.on_body(f.channel, &f.payload),
            _ => Ok(()),
        }
    }

    /// The channel a content frame belongs to, checked: open, and with a publish waiting
    /// for a header (`header_seen` false) or for body (`header_seen` true). `None`: the
    /// channel is closing and the frame is dropped.
    fn content_channel<'a>(
        channels: &'a mut HashMap<u16, Chan>,
        channel: u16,
        what: &str,
        header_seen: bool,
    ) -> Result<Option<&'a mut Chan>, Fatal> {
        let Some(c) = channels.get_mut(&channel) else {
            return Err(fatal(
                CHANNEL_ERROR,
                format!("CHANNEL_ERROR - content {what} on channel {channel}, which is not open"),
                (60, 40),
            ));
        };
        if c.state == ChanState::Closing {
            return Ok(None);
        }
        let waiting = c
            .pending
            .as_ref()
            .is_some_and(|p| p.header.is_some() == header_seen);
        if !waiting {
            return Err(fatal(
                UNEXPECTED_FRAME,
                format!(
                    "UNEXPECTED_FRAME - expected method frame, got non method frame instead on channel {channel}"
                ),
                (60, 40),
            ));
        }
        Ok(Some(c))
    }

    fn on_header(&mut self, channel: u16, payload: &Bytes) -> Result<(), Fatal> {
        let Some(c) = Self::content_channel(&mut self.channels, channel, "header", false)? else {
            return Ok(());
        };
        let p = c.pending.as_mut().expect("checked");
        let Some(h) = frames::parse_content_header(payload) else {
            return Err(fatal(
                FRAME_ERROR,
                "FRAME_ERROR - malformed content header",
                (60, 40),
            ));
        };
        if h.class_id != 60 {
            return Err(fatal(
                UNEXPECTED_FRAME,
                format!("UNEXPECTED_FRAME - content header for class {}", h.class_id),
                (60, 40),
            ));
        }
        if p.immediate {
            // Refused whatever the content says, once it is all in (RabbitMQ answers the
            // assembled publish); nothing of it is kept meanwhile.
            p.header = Some(Header {
                body_size: h.body_size,
                properties: Bytes::new(),
                persistent: false,
                expiration_ms: -1,
                priority: 0,
            });
            if h.body_size == 0 {
                return Err(immediate_refused());
            }
            return Ok(());
        }
        let Ok((rest, props)) = parse_properties(&h.properties[..]) else {
            return Err(fatal(
                FRAME_ERROR,
                "FRAME_ERROR - malformed message properties",
                (60, 40),
            ));
        };
        let props_len = h.properties.len() - rest.len();
        let properties = h.properties.slice(..props_len);
        if h.body_size > MAX_MESSAGE_SIZE {
            let text = format!(
                "PRECONDITION_FAILED - message size {} is larger than configured max size {MAX_MESSAGE_SIZE}",
                h.body_size
            );
            self.close_channel(channel, PRECONDITION_FAILED, text, (60, 40));
            return Ok(());
        }
        if let Some(uid) = props.user_id()
            && uid.as_str() != self.user
        {
            let text = format!(
                "PRECONDITION_FAILED - user_id property set to '{}' but authenticated user was '{}'",
                uid.as_str(),
                self.user
            );
            self.close_channel(channel, PRECONDITION_FAILED, text, (60, 40));
            return Ok(());
        }
        let expiration_ms = match props.expiration() {
            None => -1,
            Some(e) => match e.as_str().parse::<i64>() {
                Ok(v) if v >= 0 => v,
                _ => {
                    let text = format!(
                        "PRECONDITION_FAILED - invalid expiration '{}': not a non-negative integer",
                        e.as_str()
                    );
                    self.close_channel(channel, PRECONDITION_FAILED, text, (60, 40));
                    return Ok(());
                }
            },
        };
        let mut properties = properties;
        if props
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == REPLY_TO)
        {
            let Some(name) = c.reply_to.clone() else {
                self.close_channel(
                    channel,
                    PRECONDITION_FAILED,
                    "PRECONDITION_FAILED - fast reply consumer does not exist".into(),
                    (60, 40),
                );
                return Ok(());
            };
            properties = crate::frames::encode_properties(
                &props.clone().with_reply_to(ShortString::from(name)),
            );
        }
        p.header = Some(Header {
            body_size: h.body_size,
            properties,
            persistent: *props.delivery_mode() == Some(2),
            expiration_ms,
            priority: props.priority().map_or(0, |p| p as u32),
        });
        p.body.reserve(h.body_size as usize);
        if h.body_size == 0 {
            self.complete_publish(channel);
        }
        Ok(())
    }

    fn on_body(&mut self, channel: u16, payload: &Bytes) -> Result<(), Fatal> {
        let Some(c) = Self::content_channel(&mut self.channels, channel, "body", true)? else {
            return Ok(());
        };
        let p = c.pending.as_mut().expect("checked");
        let size = p.header.as_ref().map_or(0, |h| h.body_size);
        if p.received + payload.len() as u64 > size {
            return Err(fatal(
                FRAME_ERROR,
                format!("FRAME_ERROR - content body exceeds the declared size {size}"),
                (60, 40),
            ));
        }
        p.received += payload.len() as u64;
        if p.immediate {
            if p.received == size {
                return Err(immediate_refused());
            }
            return Ok(());
        }
        p.body.extend_from_slice(payload);
        if p.received == size {
            self.complete_publish(channel);
        }
        Ok(())
    }

    fn complete_publish(&mut self, channel: u16) {
        let Some(c) = self.channels.get_mut(&channel) else {
            return;
        };
        let Some(p) = c.pending.take() else { return };
        let Some(h) = p.header else { return };
        let confirm_seq = if c.confirm {
            let s = c.next_seq;
            c.next_seq += 1;
            s
        } else {
            0
        };
        self.traffic.received(1, p.body.len());
        self.command(
            channel,
            Command::Publish(link::BasicPublish {
                exchange: p.exchange,
                routing_key: p.routing_key,
                mandatory: p.mandatory,
                properties: h.properties,
                body: p.body.freeze(),
                persistent: h.persistent,
                expiration_ms: h.expiration_ms,
                priority: h.priority,
                confirm_seq,
            }),
        );
    }

    fn expect_answer(&mut self, channel: u16, nowait: bool) {
        if let Some(c) = self.channels.get_mut(&channel) {
            c.nowait.push_back(nowait);
        }
    }

    fn on_method(&mut self, channel: u16, payload: &Bytes) -> Result<(), Fatal> {
        let ids = frames::method_ids(payload);
        let Some(method) = parse_method(payload) else {
            let known = known_method(ids);
            return Err(if known {
                fatal(
                    FRAME_ERROR,
                    format!("FRAME_ERROR - cannot decode method {}.{}", ids.0, ids.1),
                    ids,
                )
            } else {
                fatal(
                    NOT_IMPLEMENTED,
                    format!("NOT_IMPLEMENTED - unknown class {}", ids.0),
                    ids,
                )
            });
        };
        if channel == 0 {
            return match method {
                AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                    // Answered after the loop, once the core has closed the connection.
                    self.close_ok_pending = true;
                    self.done = true;
                    Ok(())
                }
                AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                    self.done = true;
                    Ok(())
                }
                AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
                | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => Ok(()),
                AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(u)) => {
                    // A client refreshing its credential (e.g. an expiring token). As
                    // RabbitMQ's internal backend, which has nothing to refresh: accepted
                    // as given. The password was checked at connection.start-ok, and the
                    // connection's rights do not change with the secret.
                    debug!(user = %self.user, reason = %u.reason.as_str(), "amqp: update-secret");
                    put_method(
                        &mut self.out,
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                            connection::UpdateSecretOk {},
                        )),
                    );
                    Ok(())
                }
                AMQPClass::Connection(_) => Err(fatal(
                    COMMAND_INVALID,
                    "COMMAND_INVALID - connection method out of sequence",
                    ids,
                )),
                _ => Err(fatal(
                    CHANNEL_ERROR,
                    format!("CHANNEL_ERROR - method {}.{} on channel 0", ids.0, ids.1),
                    ids,
                )),
            };
        }
        if let AMQPClass::Connection(_) = method {
            return Err(fatal(
                COMMAND_INVALID,
                format!("COMMAND_INVALID - connection method on channel {channel}"),
                ids,
            ));
        }
        let state = self.channels.get(&channel).map(|c| &c.state);
        match (&method, state) {
            (AMQPClass::Channel(chan::AMQPMethod::Open(_)), None) => {
                if channel > self.channel_max {
                    return Err(fatal(
                        CHANNEL_ERROR,
                        format!(
                            "CHANNEL_ERROR - channel {channel} is above channel_max {}",
                            self.channel_max
                        ),
                        ids,
                    ));
                }
                self.channels.insert(
                    channel,
                    Chan {
                        state: ChanState::Opening,
                        nowait: VecDeque::new(),
                        pending: None,
                        confirm: false,
                        next_seq: 1,
                        confirm_low: 1,
                        confirm_ahead: BTreeSet::new(),
                        confirm_batch: Vec::new(),
                        reply_to: None,
                    },
                );
                self.command(channel, Command::ChannelOpen(true));
                return Ok(());
            }
            (AMQPClass::Channel(chan::AMQPMethod::Open(_)), Some(_)) => {
                return Err(fatal(
                    CHANNEL_ERROR,
                    format!("CHANNEL_ERROR - second 'channel.open' seen on channel {channel}"),
                    ids,
                ));
            }
            (_, None) => {
                return Err(fatal(
                    CHANNEL_ERROR,
                    format!("CHANNEL_ERROR - expected 'channel.open' on channel {channel}"),
                    ids,
                ));
            }
            (AMQPClass::Channel(chan::AMQPMethod::CloseOk(_)), Some(ChanState::Closing)) => {
                self.channels.remove(&channel);
                return Ok(());
            }
            (AMQPClass::Channel(chan::AMQPMethod::Close(_)), Some(ChanState::Closing)) => {
                self.channels.remove(&channel);
                self.put_close_ok(channel);
                return Ok(());
            }
            (_, Some(ChanState::Closing)) => return Ok(()),
            _ => {}
        }
        let c = self.channels.get_mut(&channel).expect("checked");
        if c.pending.is_some() {
            return Err(fatal(
                UNEXPECTED_FRAME,
                format!(
                    "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead on channel {channel}"
                ),
                ids,
            ));
        }
        match method {
            AMQPClass::Channel(m) => match m {
                chan::AMQPMethod::Close(_) => {
                    self.channels.remove(&channel);
                    self.command(channel, Command::ChannelClose(true));
                    self.put_close_ok(channel);
                }
                chan::AMQPMethod::CloseOk(_) => {}
                chan::AMQPMethod::Flow(f) => {
                    if !f.active {
                        // As RabbitMQ: a client may not stop the server's deliveries this way
                        // (basic.qos and basic.cancel do it); refused, not half-honoured.
                        return Err(fatal(
                            NOT_IMPLEMENTED,
                            "NOT_IMPLEMENTED - active=false",
                            ids,
                        ));
                    }
                    self.expect_answer(channel, false);
                    self.command(channel, Command::Flow(f.active));
                }
                chan::AMQPMethod::FlowOk(_) => {}
                _ => {
                    return Err(fatal(
                        COMMAND_INVALID,
                        "COMMAND_INVALID - unexpected channel method",
                        ids,
                    ));
                }
            },
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                put_method(
                    &mut self.out,
                    channel,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
            }
            AMQPClass::Exchange(m) => match m {
                exchange::AMQPMethod::Declare(d) => {
                    self.expect_answer(channel, d.nowait);
                    self.command(
                        channel,
                        Command::ExchangeDeclare(link::ExchangeDeclare {
                            name: d.exchange.as_str().into(),
                            kind: d.kind.as_str().into(),
                            passive: d.passive,
                            durable: d.durable,
                            auto_delete: d.auto_delete,
                            internal: d.internal,
                            arguments: encode_table(&d.arguments),
                        }),
                    );
                }
                exchange::AMQPMethod::Delete(d) => {
                    self.expect_answer(channel, d.nowait);
                    self.command(
                        channel,
                        Command::ExchangeDelete(link::ExchangeDelete {
                            name: d.exchange.as_str().into(),
                            if_unused: d.if_unused,
                        }),
                    );
                }
                exchange::AMQPMethod::Bind(b) => {
                    self.expect_answer(channel, b.nowait);
                    let bind =
                        exchange_bind(&b.destination, &b.source, &b.routing_key, &b.arguments);
                    self.command(
                        channel,
                        Command::ExchangeBind(link::ExchangeBind {
                            unbind: false,
                            ..bind
                        }),
                    );
                }
                exchange::AMQPMethod::Unbind(b) => {
                    self.expect_answer(channel, b.nowait);
                    let bind =
                        exchange_bind(&b.destination, &b.source, &b.routing_key, &b.arguments);
                    self.command(
                        channel,
                        Command::ExchangeBind(link::ExchangeBind {
                            unbind: true,
                            ..bind
                        }),
                    );
                }
                _ => {
                    return Err(fatal(
                        COMMAND_INVALID,
                        "COMMAND_INVALID - unexpected exchange method",
                        ids,
                    ));
                }
            },
            AMQPClass::Queue(m) => match m {
                queue::AMQPMethod::Declare(d) => {
                    self.expect_answer(channel, d.nowait);
                    self.command(
                        channel,
                        Command::QueueDeclare(link::QueueDeclare {
                            name: d.queue.as_str().into(),
                            passive: d.passive,
                            durable: d.durable,
                            exclusive: d.exclusive,
                            auto_delete: d.auto_delete,
                            arguments: encode_table(&d.arguments),
                        }),
                    );
                }
                queue::AMQPMethod::Bind(b) => {
                    self.expect_answer(channel, b.nowait);
                    let bind = queue_bind(&b.queue, &b.exchange, &b.routing_key, &b.arguments);
                    self.command(channel, Command::QueueBind(bind));
                }
                queue::AMQPMethod::Unbind(b) => {
                    self.expect_answer(channel, false);
                    let bind = queue_bind(&b.queue, &b.exchange, &b.routing_key, &b.arguments);
                    self.command(
                        channel,
                        Command::QueueBind(link::QueueBind {
                            unbind: true,
                            ..bind
                        }),
                    );
                }
                queue::AMQPMethod::Purge(p) => {
                    self.expect_answer(channel, p.nowait);
                    self.command(channel, Command::QueuePurge(p.queue.as_str().into()));
                }
                queue::AMQPMethod::Delete(d) => {
                    self.expect_answer(channel, d.nowait);
                    self.command(
                        channel,
                        Command::QueueDelete(link::QueueDelete {
                            queue: d.queue.as_str().into(),
                            if_unused: d.if_unused,
                            if_empty: d.if_empty,
                        }),
                    );
                }
                _ => {
                    return Err(fatal(
                        COMMAND_INVALID,
                        "COMMAND_INVALID - unexpected queue method",
                        ids,
                    ));
                }
            },
            AMQPClass::Basic(m) => match m {
                basic::AMQPMethod::Publish(p) => {
                    let c = self.channels.get_mut(&channel).expect("checked");
                    c.pending = Some(Pending {
                        exchange: p.exchange.as_str().into(),
                        routing_key: p.routing_key.as_str().into(),
                        mandatory: p.mandatory,
                        immediate: p.immediate,
                        header: None,
                        body: BytesMut::new(),
                        received: 0,
                    });
                }
                basic::AMQPMethod::Qos(q) => {
                    self.expect_answer(channel, false);
                    self.command(
                        channel,
                        Command::Qos(link::BasicQos {
                            prefetch_count: q.prefetch_count as u32,
                            global: q.global,
                        }),
                    );
                }
                basic::AMQPMethod::Consume(b) => {
                    let mut queue = b.queue.as_str().to_owned();
                    if queue == REPLY_TO {
                        // The reply name is made here so that publishes on this channel
                        // can carry it in reply_to.
                        let name = format!("{REPLY_TO}.{}", reply_token());
                        self.channels.get_mut(&channel).expect("checked").reply_to =
                            Some(name.clone());
                        queue = name;
                    }
                    self.expect_answer(channel, b.nowait);
                    self.command(
                        channel,
                        Command::Consume(link::BasicConsume {
                            queue,
                            consumer_tag: b.consumer_tag.as_str().into(),
                            no_ack: b.no_ack,
                            exclusive: b.exclusive,
                            arguments: encode_table(&b.arguments),
                        }),
                    );
                }
                basic::AMQPMethod::Cancel(b) => {
                    self.expect_answer(channel, b.nowait);
                    self.command(channel, Command::Cancel(b.consumer_tag.as_str().into()));
                }
                basic::AMQPMethod::Get(g) => {
                    self.command(
                        channel,
                        Command::Get(link::BasicGet {
                            queue: g.queue.as_str().into(),
                            no_ack: g.no_ack,
                        }),
                    );
                }
                basic::AMQPMethod::Ack(a) => self.command(
                    channel,
                    Command::Settle(link::BasicSettle {
                        kind: link::SettleKind::SettleAck as i32,
                        delivery_tag: a.delivery_tag,
                        multiple: a.multiple,
                        requeue: false,
                    }),
                ),
                basic::AMQPMethod::Nack(a) => self.command(
                    channel,
                    Command::Settle(link::BasicSettle {
                        kind: link::SettleKind::SettleNack as i32,
                        delivery_tag: a.delivery_tag,
                        multiple: a.multiple,
                        requeue: a.requeue,
                    }),
                ),
                basic::AMQPMethod::Reject(a) => self.command(
                    channel,
                    Command::Settle(link::BasicSettle {
                        kind: link::SettleKind::SettleReject as i32,
                        delivery_tag: a.delivery_tag,
                        multiple: false,
                        requeue: a.requeue,
                    }),
                ),
                basic::AMQPMethod::Recover(r) => {
                    self.expect_answer(channel, false);
                    self.command(channel, Command::Recover(r.requeue));
                }
                basic::AMQPMethod::RecoverAsync(r) => {
                    // No answer: the ok from the core is dropped.
                    self.expect_answer(channel, true);
                    self.command(channel, Command::Recover(r.requeue));
                }
                _ => {
                    return Err(fatal(
                        COMMAND_INVALID,
                        "COMMAND_INVALID - unexpected basic method",
                        ids,
                    ));
                }
            },
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let c = self.channels.get_mut(&channel).expect("checked");
                c.confirm = true;
                self.expect_answer(channel, s.nowait);
                self.command(channel, Command::ConfirmSelect(true));
            }
            AMQPClass::Tx(m) => {
                self.expect_answer(channel, false);
                self.command(
                    channel,
                    match m {
                        tx::AMQPMethod::Select(_) => Command::TxSelect(true),
                        tx::AMQPMethod::Commit(_) => Command::TxCommit(true),
                        tx::AMQPMethod::Rollback(_) => Command::TxRollback(true),
                        _ => {
                            return Err(fatal(
                                COMMAND_INVALID,
                                "COMMAND_INVALID - unexpected tx method",
                                ids,
                            ));
                        }
                    },
                );
            }
            _ => {
                return Err(fatal(
                    NOT_IMPLEMENTED,
                    format!(
                        "NOT_IMPLEMENTED - method {}.{} is not supported",
                        ids.0, ids.1
                    ),
                    ids,
                ));
            }
        }
        Ok(())
    }

    /// Writes the confirms gathered since the last write: a run that starts at the lowest
    /// unconfirmed number becomes one basic.ack with multiple set (as RabbitMQ sends them),
    /// the rest go one by one.
    fn flush_confirms(&mut self) {
        for channel in std::mem::take(&mut self.confirm_dirty) {
            let Some(c) = self.channels.get_mut(&channel) else {
                continue;
            };
            let mut batch = std::mem::take(&mut c.confirm_batch);
            if c.state != ChanState::Open {
                continue;
            }
            batch.sort_unstable();
            // Written in sequence order, so a multiple ack never covers a nack before it.
            let mut out = Vec::new();
            let mut run_end = None;
            for (seq, ack) in batch {
                let at_low = seq == c.confirm_low;
                if ack && at_low {
                    run_end = Some(seq);
                } else {
                    if let Some(end) = run_end.take() {
                        out.push((end, true, true));
                    }
                    out.push((seq, ack, false));
                    if !at_low && seq > c.confirm_low {
                        c.confirm_ahead.insert(seq);
                    }
                }
                if at_low {
                    c.confirm_low += 1;
                    while c.confirm_ahead.remove(&c.confirm_low) {
                        c.confirm_low += 1;
                    }
                }
            }
            if let Some(end) = run_end {
                out.push((end, true, true));
            }
            for (seq, ack, multiple) in out {
                let m = if ack {
                    basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: seq,
                        multiple,
                    })
                } else {
                    basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: seq,
                        multiple: false,
                        requeue: false,
                    })
                };
                put_method(&mut self.out, channel, AMQPClass::Basic(m));
            }
        }
    }

    fn put_close_ok(&mut self, channel: u16) {
        put_method(
            &mut self.out,
            channel,
            AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
        );
    }

    fn on_event(&mut self, ev: link::ChannelEvent) {
        let channel = ev.channel as u16;
        let Some(event) = ev.event else { return };
        if let Event::ConnectionError(e) = event {
            self.close_connection(fatal(
                e.code as u16,
                e.text,
                (e.class_id as u16, e.method_id as u16),
            ));
            return;
        }
        if self.closing {
            return;
        }
        let Some(c) = self.channels.get_mut(&channel) else {
            return;
        };
        match event {
            Event::Ok(ok) => {
                if (ok.class_id, ok.method_id) == (20, 11) {
                    if c.state == ChanState::Opening {
                        c.state = ChanState::Open;
                        put_method(
                            &mut self.out,
                            channel,
                            AMQPClass::Channel(chan::AMQPMethod::OpenOk(chan::OpenOk {})),
                        );
                    }
                    return;
                }
                if c.state != ChanState::Open {
                    return;
                }
                if c.nowait.pop_front().unwrap_or(false) {
                    return;
                }
                if let Some(m) = ok_method(&ok) {
                    put_method(&mut self.out, channel, m);
                }
            }
            Event::Deliver(d) if c.state == ChanState::Open => {
                self.traffic.sent(1, d.body.len());
                frames::put_deliver(
                    &mut self.out,
                    channel,
                    &d.consumer_tag,
                    d.delivery_tag,
                    d.redelivered,
                    &d.exchange,
                    &d.routing_key,
                );
                put_content(
                    &mut self.out,
                    channel,
                    &d.properties,
                    &d.body,
                    self.frame_max,
                );
            }
            Event::GetOk(d) if c.state == ChanState::Open => {
                self.traffic.sent(1, d.body.len());
                put_method(
                    &mut self.out,
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                        delivery_tag: d.delivery_tag,
                        redelivered: d.redelivered,
                        exchange: truncate(&d.exchange).into(),
                        routing_key: truncate(&d.routing_key).into(),
                        message_count: d.message_count.min(u32::MAX as u64) as u32,
                    })),
                );
                put_content(
                    &mut self.out,
                    channel,
                    &d.properties,
                    &d.body,
                    self.frame_max,
                );
            }
            Event::GetEmpty(_) if c.state == ChanState::Open => put_method(
                &mut self.out,
                channel,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            ),
            Event::Returned(d) if c.state == ChanState::Open => {
                put_method(
                    &mut self.out,
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                        reply_code: d.reply_code as u16,
                        reply_text: truncate(&d.reply_text).into(),
                        exchange: truncate(&d.exchange).into(),
                        routing_key: truncate(&d.routing_key).into(),
                    })),
                );
                put_content(
                    &mut self.out,
                    channel,
                    &d.properties,
                    &d.body,
                    self.frame_max,
                );
            }
            Event::Confirm(cf) if c.state == ChanState::Open => {
                if c.confirm_batch.is_empty() {
                    self.confirm_dirty.push(channel);
                }
                c.confirm_batch.push((cf.seq, cf.ack));
            }
            Event::Cancelled(tag) if c.state == ChanState::Open => put_method(
                &mut self.out,
                channel,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: tag.into(),
                    nowait: true,
                })),
            ),
            // Only for the channel it was raised on: a channel closed and reopened under the
            // same number meanwhile is a new one.
            Event::ChannelError(e) if c.state == ChanState::Open => {
                c.state = ChanState::Closing;
                c.pending = None;
                c.nowait.clear();
                info!(channel, code = e.code, text = %e.text, "amqp: channel error");
                put_method(
                    &mut self.out,
                    channel,
                    AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
                        reply_code: e.code as u16,
                        reply_text: ShortString::from(truncate(&e.text)),
                        class_id: e.class_id as u16,
                        method_id: e.method_id as u16,
                    })),
                );
            }
            _ => {}
        }
    }
}

/// basic.publish with immediate=true, once its content is in: RabbitMQ 3.x does not
/// implement it and closes the connection (540, for class 60 method 40).
fn immediate_refused() -> Fatal {
    fatal(
        NOT_IMPLEMENTED,
        "NOT_IMPLEMENTED - immediate=true",
        (60, 40),
    )
}

/// exchange.bind / exchange.unbind as a core command (the caller sets `unbind`).
fn exchange_bind(
    destination: &ShortString,
    source: &ShortString,
    routing_key: &ShortString,
    arguments: &FieldTable,
) -> link::ExchangeBind {
    link::ExchangeBind {
        destination: destination.as_str().into(),
        source: source.as_str().into(),
        routing_key: routing_key.as_str().into(),
        arguments: encode_table(arguments),
        unbind: false,
    }
}

/// queue.bind / queue.unbind as a core command (the caller sets `unbind`).
fn queue_bind(
    queue: &ShortString,
    exchange: &ShortString,
    routing_key: &ShortString,
    arguments: &FieldTable,
) -> link::QueueBind {
    link::QueueBind {
        queue: queue.as_str().into(),
        exchange: exchange.as_str().into(),
        routing_key: routing_key.as_str().into(),
        arguments: encode_table(arguments),
        unbind: false,
    }
}

/// Whether (class, method) names a method of AMQP 0-9-1 (whose arguments then failed to
/// decode: a frame error) rather than an unknown one (not implemented).
fn known_method((class, method): (u16, u16)) -> bool {
    let methods: &[u16] = match class {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => &[],
    };
    methods.contains(&method)
}

fn reply_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("g1h2AA{:x}{:x}", t, NEXT.fetch_add(1, Ordering::Relaxed))
}

fn ok_method(ok: &link::MethodOk) -> Option<AMQPClass> {
    Some(match (ok.class_id, ok.method_id) {
        (20, 21) => {
            AMQPClass::Channel(chan::AMQPMethod::FlowOk(chan::FlowOk { active: ok.active }))
        }
        (40, 11) => AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
        (40, 21) => AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
        (40, 31) => AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
        (40, 51) => AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
        (50, 11) => AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
            queue: ok.name.clone().into(),
            message_count: ok.message_count.min(u32::MAX as u64) as u32,
            consumer_count: ok.consumer_count,
        })),
        (50, 21) => AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
        (50, 31) => AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
            message_count: ok.message_count.min(u32::MAX as u64) as u32,
        })),
        (50, 41) => AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
            message_count: ok.message_count.min(u32::MAX as u64) as u32,
        })),
        (50, 51) => AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
        (60, 11) => AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
        (60, 21) => AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: ok.name.clone().into(),
        })),
        (60, 31) => AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
            consumer_tag: ok.name.clone().into(),
        })),
        (60, 111) => AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
        (85, 11) => AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
        (90, 11) => AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
        (90, 21) => AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
        (90, 31) => AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
        _ => return None,
    })
}
