//! One client connection. Remoting multiplexes requests by `opaque`, and a pull may be held
//! for up to its suspend timeout, so requests are served concurrently (bounded per
//! connection) and responses are written as they are ready. The broker also sends requests
//! of its own on the connection (transaction check-backs, consumer-id notifications).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{Instrument, debug, info_span, warn};
use tributary_gateway_common::{Accepted, ConnectionHandle};

use crate::Gateway;
use crate::codes::{request as rq, response as rs};
use crate::frame::{self, Command};

/// Requests of one connection served at once; a push consumer holds one suspended pull
/// per queue it consumes.
const MAX_IN_FLIGHT: usize = 512;
/// Frames waiting for the writer; a client that stops reading stalls its own responses.
const OUTBOUND_QUEUE: usize = 1024;

/// What handlers know about the connection a request came on.
pub(crate) struct ConnState {
    pub id: u64,
    pub peer: SocketAddr,
    out: mpsc::Sender<Bytes>,
    next_opaque: AtomicI32,
    /// Requests this side sent, waiting for the client's response.
    pending: Mutex<HashMap<i32, oneshot::Sender<Command>>>,
    pub connection: ConnectionHandle,
}

impl ConnState {
    /// Queues a frame for the writer; false once the connection is gone.
    pub async fn send(&self, frame: Bytes) -> bool {
        self.out.send(frame).await.is_ok()
    }

    /// Sends a one-way request to the client (no response expected).
    pub async fn send_oneway(&self, mut cmd: Command) -> bool {
        cmd.opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        cmd.flag |= frame::FLAG_ONEWAY;
        self.send(cmd.encode()).await
    }

    /// Sends a request to the client and waits (bounded) for its response.
    pub async fn call(&self, mut cmd: Command, timeout: Duration) -> Option<Command> {
        let opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        cmd.opaque = opaque;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(opaque, tx);
        if !self.send(cmd.encode()).await {
            self.pending.lock().remove(&opaque);
            return None;
        }
        let r = tokio::time::timeout(timeout, rx).await;
        self.pending.lock().remove(&opaque);
        r.ok().and_then(Result::ok)
    }
}

pub(crate) async fn serve_connection<S>(
    gw: Arc<Gateway>,
    conn: Accepted<S>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        stream,
        peer,
        listener,
        connection,
    } = conn;
    connection.set_namespace(gw.config.namespace.clone());
    let id = connection.id();
    let span = info_span!("rocketmq_conn", %peer, listener, connection = connection.id());
    async move {
        let (mut rd, wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel::<Bytes>(OUTBOUND_QUEUE);
        let state = Arc::new(ConnState {
            id,
            peer,
            out: tx,
            next_opaque: AtomicI32::new(1),
            pending: Mutex::new(HashMap::new()),
            connection,
        });
        let writer = tokio::spawn(async move {
            let mut wr = BufWriter::with_capacity(16 * 1024, wr);
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
                // Flush once the queue is drained: responses ready together go out together.
                if rx.is_empty() && wr.flush().await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut tasks = tokio::task::JoinSet::new();
        let handle = state.connection.clone();
        let close_requested = handle.close_requested();
        tokio::pin!(close_requested);
        loop {
            let cmd = match frame::decode(&mut buf) {
                Ok(Some(cmd)) => cmd,
                Ok(None) => {
                    let read = tokio::select! {
                        r = rd.read_buf(&mut buf) => r,
                        _ = stop.wait_for(|s| *s) => break,
                        _ = &mut close_requested => break,
                        Some(_) = tasks.join_next() => continue,
                    };
                    match read {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e) => {
                            debug!(error = %e, "read failed");
                            break;
                        }
                    }
                }
                Err(e) => {
                    // RocketMQ's broker closes a connection whose frames it cannot decode.
                    metrics::counter!("tributary_rocketmq_bad_frames_total").increment(1);
                    warn!(error = %e, "closing the connection: undecodable frame");
                    break;
                }
            };
            if cmd.is_response() {
                match state.pending.lock().remove(&cmd.opaque) {
                    Some(waiter) => {
                        let _ = waiter.send(cmd);
                    }
                    None => debug!(opaque = cmd.opaque, "response to no pending request"),
                }
                continue;
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let gw = gw.clone();
            let state = state.clone();
            let code = cmd.code;
            tasks.spawn(
                async move {
                    let oneway = cmd.is_oneway();
                    let response = dispatch(&gw, &state, cmd).await;
                    if let Some(r) = response
                        && !oneway
                    {
                        state.send(r.encode()).await;
                    }
                    drop(slot);
                }
                .instrument(info_span!("request", code)),
            );
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        crate::clients::disconnected(&gw, &state).await;
        // The writer ends once the last sender (the state) is gone.
        drop(state);
        let _ = writer.await;
    }
    .instrument(span)
    .await
}

/// A refusal: the response code and the remark the client shows.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub code: i32,
    pub remark: String,
}

impl Refusal {
    pub fn new(code: i32, remark: impl Into<String>) -> Self {
        Self {
            code,
            remark: remark.into(),
        }
    }
    pub fn system(remark: impl Into<String>) -> Self {
        Self::new(rs::SYSTEM_ERROR, remark)
    }
}

pub(crate) type Reply = Result<Command, Refusal>;

/// Serves one request; `None` = nothing to answer.
async fn dispatch(gw: &Arc<Gateway>, conn: &Arc<ConnState>, cmd: Command) -> Option<Command> {
    debug!(code = cmd.code, ext = ?cmd.ext, body = cmd.body.len(), "request");
    let result: Reply = match cmd.code {
        // NameServer
        rq::GET_ROUTEINFO_BY_TOPIC => crate::namesrv::route(gw, &cmd).await,
        rq::GET_BROKER_CLUSTER_INFO => crate::namesrv::cluster_info(gw, &cmd).await,
        rq::GET_ALL_TOPIC_LIST_FROM_NAMESERVER | rq::GET_TOPICS_BY_CLUSTER => {
            crate::namesrv::topic_list(gw, &cmd).await
        }
        rq::GET_KV_CONFIG => Err(Refusal::new(
            rs::QUERY_NOT_FOUND,
            format!(
                "No config item, Namespace: {} Key: {}",
                cmd.ext.get("namespace").map(String::as_str).unwrap_or(""),
                cmd.ext.get("key").map(String::as_str).unwrap_or("")
            ),
        )),
        rq::REGISTER_BROKER | rq::UNREGISTER_BROKER => Err(Refusal::new(
            rs::NO_PERMISSION,
            "this NameServer lists the Tributary gateways of its cluster; brokers do not register with it",
        )),
        // Broker: produce
        rq::SEND_MESSAGE | rq::SEND_MESSAGE_V2 | rq::SEND_BATCH_MESSAGE => {
            crate::send::send(gw, conn, &cmd).await
        }
        rq::SEND_REPLY_MESSAGE | rq::SEND_REPLY_MESSAGE_V2 => {
            crate::reply::send_reply(gw, conn, &cmd).await
        }
        rq::CONSUMER_SEND_MSG_BACK => crate::send::send_back(gw, &cmd).await,
        rq::END_TRANSACTION => crate::txn::end_transaction(gw, &cmd).await,
        // Broker: consume
        rq::PULL_MESSAGE | rq::LITE_PULL_MESSAGE => crate::pull::pull(gw, conn, &cmd).await,
        rq::QUERY_CONSUMER_OFFSET => crate::pull::query_consumer_offset(gw, &cmd).await,
        rq::UPDATE_CONSUMER_OFFSET => crate::pull::update_consumer_offset(gw, &cmd).await,
        rq::GET_MAX_OFFSET => crate::pull::max_offset(gw, &cmd).await,
        rq::GET_MIN_OFFSET => crate::pull::min_offset(gw, &cmd).await,
        rq::SEARCH_OFFSET_BY_TIMESTAMP => crate::pull::search_offset(gw, &cmd).await,
        rq::GET_EARLIEST_MSG_STORETIME => crate::pull::earliest_store_time(gw, &cmd).await,
        rq::VIEW_MESSAGE_BY_ID => crate::pull::view_message(gw, &cmd).await,
        rq::QUERY_MESSAGE => crate::pull::query_message(gw, &cmd).await,
        // Broker: clients and groups
        rq::HEART_BEAT => crate::clients::heartbeat(gw, conn, &cmd).await,
        rq::UNREGISTER_CLIENT => crate::clients::unregister(gw, conn, &cmd).await,
        rq::GET_CONSUMER_LIST_BY_GROUP => crate::clients::consumer_list(gw, &cmd).await,
        rq::LOCK_BATCH_MQ => crate::clients::lock_batch(gw, &cmd).await,
        rq::UNLOCK_BATCH_MQ => crate::clients::unlock_batch(gw, &cmd).await,
        rq::CHECK_CLIENT_CONFIG => crate::clients::check_client_config(&cmd),
        rq::GET_CONSUMER_RUNNING_INFO => crate::clients::consumer_running_info(gw, &cmd).await,
        // Broker: admin
        rq::UPDATE_AND_CREATE_TOPIC => crate::admin::create_topic(gw, &cmd).await,
        rq::DELETE_TOPIC_IN_BROKER | rq::DELETE_TOPIC_IN_NAMESRV => {
            crate::admin::delete_topic(gw, &cmd).await
        }
        rq::GET_ALL_TOPIC_CONFIG => crate::admin::all_topic_config(gw, &cmd).await,
        rq::DELETE_SUBSCRIPTIONGROUP => crate::admin::delete_group(gw, &cmd).await,
        other => {
            metrics::counter!("tributary_rocketmq_unsupported_requests_total").increment(1);
            debug!(code = other, "request code not supported");
            Err(Refusal::new(
                rs::REQUEST_CODE_NOT_SUPPORTED,
                format!(" request type {other} not supported"),
            ))
        }
    };
    let response = match result {
        Ok(r) => r,
        Err(Refusal { code, remark }) => cmd.response(code).with_remark(remark),
    };
    debug!(code = response.code, ext = ?response.ext, remark = ?response.remark, "response");
    Some(response)
}

/// Request header fields, with the errors RocketMQ's broker gives for missing ones.
pub(crate) trait Ext {
    fn str_field(&self, name: &str) -> Result<&str, Refusal>;
    fn opt_str(&self, name: &str) -> Option<&str>;
    fn i64_field(&self, name: &str) -> Result<i64, Refusal>;
    fn opt_i64(&self, name: &str) -> Result<Option<i64>, Refusal>;
}

impl Ext for Command {
    fn str_field(&self, name: &str) -> Result<&str, Refusal> {
        self.opt_str(name).ok_or_else(|| {
            Refusal::system(format!(
                "the custom field <{name}> is null; the request header is incomplete"
            ))
        })
    }
    fn opt_str(&self, name: &str) -> Option<&str> {
        self.ext.get(name).map(String::as_str)
    }
    fn i64_field(&self, name: &str) -> Result<i64, Refusal> {
        self.opt_i64(name)?.ok_or_else(|| {
            Refusal::system(format!(
                "the custom field <{name}> is null; the request header is incomplete"
            ))
        })
    }
    fn opt_i64(&self, name: &str) -> Result<Option<i64>, Refusal> {
        match self.ext.get(name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
                Refusal::system(format!("the custom field <{name}> is not a number: {v:?}"))
            }),
        }
    }
}

/// The core's error as a Remoting refusal.
pub(crate) fn core_refusal(status: &tonic::Status) -> Refusal {
    use tributary_proto::v1::ErrorCode as E;
    let code = tributary_gateway_common::error_code(status);
    let remark = status.message().to_string();
    match code {
        E::StreamNotFound => Refusal::new(rs::TOPIC_NOT_EXIST, remark),
        E::RecordTooLarge | E::InvalidArgument => Refusal::new(rs::MESSAGE_ILLEGAL, remark),
        E::ShuttingDown | E::StorageFailure => Refusal::new(rs::SERVICE_NOT_AVAILABLE, remark),
        E::Unauthenticated => Refusal::new(rs::NO_PERMISSION, remark),
        _ => Refusal::system(remark),
    }
}

pub(crate) fn ok(cmd: &Command) -> Command {
    cmd.response(rs::SUCCESS)
}

pub(crate) fn json_body(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}
