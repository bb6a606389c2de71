//! The live client connections of a process, for operators: what each is (listener, peer,
//! TLS, since when) and what its gateway learned at login (user, client id, namespace), and
//! a way to close one.
//!
//! One [`Connections`] is shared by every listener of a process (it is an `Arc` handed to
//! the listeners and to the admin API, never a global, so two servers in one test process do
//! not see each other's clients). The accept loop registers each accepted connection and
//! keeps the [`Registration`] for as long as the connection's task lives, so an entry cannot
//! outlive its connection whatever the gateway does. The gateway gets a [`ConnectionHandle`]
//! to fill in what it learns and to watch for a close.
//!
//! A close is a request: the gateway ends the connection the way its protocol's brokers do
//! (AMQP connection.close 320, MQTT 5 DISCONNECT 0x98, Kafka closes the socket) at a point
//! where nothing acknowledged is lost; the accept loop cuts a connection that has not ended
//! within its drain timeout (one still in its handshake, or a request that does not return).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::task::AtomicWaker;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tracing::info;

use crate::accounting::{count_accepted, count_ended, protocol_of};

/// The registry of one process's connections.
#[derive(Default)]
pub struct Connections {
    /// Ids start at 1 and are never reused within the process, so an id an operator read in
    /// a list cannot name another connection by the time the close arrives.
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Entry>>>,
    /// Woken on every connection's end; each waiter checks its own entry's flag. One for
    /// the registry rather than one per entry: an end is waited for only by an operator's
    /// close, and most of the time by nobody.
    ends: Notify,
}

/// One connection as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    pub id: u64,
    /// The listener's name, e.g. `mqtt-ws`.
    pub listener: &'static str,
    /// `kafka`, `mqtt` or `amqp`: the listener's name up to its first `-`.
    pub protocol: &'static str,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    /// Milliseconds since the Unix epoch, when the connection was accepted.
    pub connected_at_ms: u64,
    /// The authenticated user, once logged in (AMQP always, MQTT and Kafka when the client
    /// gives one).
    pub user: Option<String>,
    /// MQTT client id, Kafka `client.id`, AMQP `connection_name` client property.
    pub client_id: Option<String>,
    /// The namespace the connection works in (an AMQP vhost is its own).
    pub namespace: Option<String>,
    /// An operator asked to close it and it has not ended yet.
    pub closing: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CloseError {
    #[error("no open connection has id {0}")]
    NotFound(u64),
}

/// One registered connection. Kept lean, as there is one per open connection: what is
/// known at accept is plain fields, what login tells is behind the lock, the flags are bits
/// of one byte.
struct Entry {
    id: u64,
    registry: Arc<Connections>,
    listener: &'static str,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    connected_at_ms: u64,
    learned: Mutex<Learned>,
    /// [`CLOSE`], [`ENDED`] and [`STOPPING`].
    flags: AtomicU8,
    /// Wakes the waits for a close ([`ConnectionHandle::close_requested`]). Its own, not the
    /// registry's: gateways wait for it afresh between requests, and one shared by every
    /// connection would be a lock they all take per request.
    closes: Notify,
    /// The connection's own task, woken by a close or a stop: a gateway that polls its
    /// connection by hand ([`ConnectionHandle::poll_ending`]) waits without a future of
    /// its own. One waker: only the connection's task polls it.
    task: AtomicWaker,
}

/// Set when an operator closes the connection.
const CLOSE: u8 = 1;
/// Set when the connection's task ends (its registration is dropped).
const ENDED: u8 = 2;
/// Set when its listener stops ([`Connections::stop_listener`]).
const STOPPING: u8 = 4;

/// What the gateway learns at login. The client id and the namespace are shared strings:
/// the gateway keeps the same client id, and a namespace is the same for most connections.
#[derive(Default)]
struct Learned {
    user: Option<String>,
    client_id: Option<Arc<str>>,
    namespace: Option<Arc<str>>,
    /// The connection's task, for [`Connections::abort_listener`].
    abort: Option<AbortHandle>,
}

impl Entry {
    fn set(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
    }

    fn is_set(&self, flag: u8) -> bool {
        self.flags.load(Ordering::Acquire) & flag != 0
    }

    fn info(&self) -> ConnectionInfo {
        let learned = lock(&self.learned);
        ConnectionInfo {
            id: self.id,
            listener: self.listener,
            protocol: protocol_of(self.listener),
            peer: self.peer,
            local: self.local,
            tls: self.tls,
            connected_at_ms: self.connected_at_ms,
            user: learned.user.clone(),
            client_id: learned.client_id.as_deref().map(str::to_string),
            namespace: learned.namespace.as_deref().map(str::to_string),
            closing: self.is_set(CLOSE),
        }
    }

    /// Waits until `flag` is set, woken through `notify`. Cancel-safe.
    async fn wait(&self, flag: u8, notify: &Notify) {
        wait_until(notify, || self.is_set(flag)).await
    }
}

/// Why a connection is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Its listener stops (the server shuts down).
    Stop,
    /// An operator closed it.
    Close,
}

/// Waits until `done` holds, checked again each time `notify` wakes its waiters. Cancel-safe.
pub(crate) async fn wait_until(notify: &Notify, done: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before `done` is read, so a change in between is not missed.
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}

/// A mutex poisoned by a panic elsewhere still guards plain data that is whole: go on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Connections {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers an accepted connection; it is listed until the registration is dropped.
    pub fn register(
        self: &Arc<Self>,
        listener: &'static str,
        peer: SocketAddr,
        local: SocketAddr,
        tls: bool,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let connected_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let entry = Arc::new(Entry {
            id,
            registry: self.clone(),
            listener,
            peer,
            local,
            tls,
            connected_at_ms,
            learned: Mutex::default(),
            flags: AtomicU8::new(0),
            closes: Notify::new(),
            task: AtomicWaker::new(),
        });
        lock(&self.open).insert(id, entry.clone());
        count_accepted(listener);
        Registration {
            handle: ConnectionHandle { entry },
        }
    }

    /// Every open connection, by id (the order they were accepted in).
    pub fn list(&self) -> Vec<ConnectionInfo> {
        lock(&self.open).values().map(|e| e.info()).collect()
    }

    pub fn get(&self, id: u64) -> Option<ConnectionInfo> {
        lock(&self.open).get(&id).map(|e| e.info())
    }

    /// Tells every connection of `listener` that it stops, for gateways that watch
    /// [`ConnectionHandle::poll_ending`] rather than the `stop` they are given.
    pub fn stop_listener(&self, listener: &str) {
        let entries: Vec<Arc<Entry>> = lock(&self.open)
            .values()
            .filter(|e| e.listener == listener)
            .cloned()
            .collect();
        for entry in entries {
            entry.set(STOPPING);
            entry.task.wake();
        }
    }

    /// Aborts the task of every connection of `listener`: what is left of them once their
    /// drain timeout has passed, or when the listener is dropped.
    pub(crate) fn abort_listener(&self, listener: &str) {
        for entry in lock(&self.open).values() {
            if entry.listener == listener
                && let Some(task) = &lock(&entry.learned).abort
            {
                task.abort();
            }
        }
    }

    /// Asks the connection's gateway to close it; `by` says who asked, for the log. Closing
    /// a connection already closing asks again, harmlessly.
    pub fn close(&self, id: u64, by: &str) -> Result<Closing, CloseError> {
        let entry = lock(&self.open)
            .get(&id)
            .cloned()
            .ok_or(CloseError::NotFound(id))?;
        entry.set(CLOSE);
        let info = entry.info();
        info!(
            connection = id,
            listener = info.listener,
            peer = %info.peer,
            user = info.user.as_deref().unwrap_or(""),
            client_id = info.client_id.as_deref().unwrap_or(""),
            by,
            "closing a client connection at an operator's request"
        );
        entry.closes.notify_waiters();
        entry.task.wake();
        Ok(Closing { info, entry })
    }
}

/// A close under way.
pub struct Closing {
    /// The connection as it was when the close was asked for.
    pub info: ConnectionInfo,
    entry: Arc<Entry>,
}

impl Closing {
    /// Waits up to `within` for the connection to end; whether it did.
    pub async fn ended(&self, within: Duration) -> bool {
        let entry = &self.entry;
        tokio::time::timeout(within, entry.wait(ENDED, &entry.registry.ends))
            .await
            .is_ok()
    }
}

/// Keeps a connection listed and counted; dropping it removes the entry. Held by the accept loop's
/// task for the connection, so the entry goes when the connection's task does (a panic
/// included).
pub struct Registration {
    handle: ConnectionHandle,
}

impl Registration {
    /// What the gateway serving the connection is given.
    pub fn handle(&self) -> ConnectionHandle {
        self.handle.clone()
    }

    /// The handle, not a copy of it, for the task holding the registration.
    pub(crate) fn handle_ref(&self) -> &ConnectionHandle {
        &self.handle
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let entry = &self.handle.entry;
        lock(&entry.registry.open).remove(&entry.id);
        entry.set(ENDED);
        count_ended(entry.listener);
        entry.registry.ends.notify_waiters();
    }
}

/// A gateway's view of its connection's entry: fill in what login tells, watch for a close.
#[derive(Clone)]
pub struct ConnectionHandle {
    entry: Arc<Entry>,
}

impl ConnectionHandle {
    pub fn id(&self) -> u64 {
        self.entry.id
    }

    pub(crate) fn listener(&self) -> &'static str {
        self.entry.listener
    }

    /// The task serving the connection, for [`Connections::abort_listener`].
    pub(crate) fn set_abort(&self, task: AbortHandle) {
        lock(&self.entry.learned).abort = Some(task);
    }

    pub fn set_user(&self, user: impl Into<String>) {
        lock(&self.entry.learned).user = Some(user.into());
    }

    pub fn set_client_id(&self, client_id: impl Into<Arc<str>>) {
        lock(&self.entry.learned).client_id = Some(client_id.into());
    }

    pub fn set_namespace(&self, namespace: impl Into<Arc<str>>) {
        lock(&self.entry.learned).namespace = Some(namespace.into());
    }

    /// Resolves once an operator has asked to close the connection (at once if one has).
    /// Cancel-safe: fit for a `select!` loop.
    pub async fn close_requested(&self) {
        let entry = &self.entry;
        entry.wait(CLOSE, &entry.closes).await
    }

    pub fn is_close_requested(&self) -> bool {
        self.entry.is_set(CLOSE)
    }

    /// [`ConnectionHandle::close_requested`] without a future; the same one-waker rule as
    /// [`ConnectionHandle::poll_ending`] (the accept loop polls it on the connection's task).
    pub fn poll_close_requested(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.entry.task.register(cx.waker());
        if self.entry.is_set(CLOSE) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Ready once the connection is asked to end: its listener stops, or an operator
    /// closed it. Holds no future, so a connection waiting for it costs nothing more;
    /// only the connection's own task may poll it (one waker is kept).
    pub fn poll_ending(&self, cx: &mut Context<'_>) -> Poll<Ending> {
        // Registered before the flags are read, so a set in between wakes this task.
        self.entry.task.register(cx.waker());
        let flags = self.entry.flags.load(Ordering::Acquire);
        if flags & STOPPING != 0 {
            Poll::Ready(Ending::Stop)
        } else if flags & CLOSE != 0 {
            Poll::Ready(Ending::Close)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn an_entry_is_listed_while_registered_with_what_its_gateway_learned() {
        let registry = Connections::new();
        let a = registry.register("mqtt-ws", addr(1000), addr(8083), false);
        let b = registry.register("amqp-tls", addr(1001), addr(5671), true);
        let handle = a.handle();
        handle.set_user("alice");
        handle.set_client_id("sensor-1");
        handle.set_namespace("default");
        let list = registry.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].id, handle.id());
        assert_eq!(list[0].protocol, "mqtt");
        assert_eq!(list[0].listener, "mqtt-ws");
        assert_eq!(list[0].user.as_deref(), Some("alice"));
        assert_eq!(list[0].client_id.as_deref(), Some("sensor-1"));
        assert_eq!(list[0].namespace.as_deref(), Some("default"));
        assert!(!list[0].tls);
        assert_eq!(list[1].protocol, "amqp");
        assert!(list[1].tls);
        assert!(list[1].id > list[0].id, "ids grow");
        drop(a);
        assert_eq!(registry.list().len(), 1);
        assert!(registry.get(handle.id()).is_none());
        drop(b);
        assert!(registry.list().is_empty());
    }

    #[test]
    fn ids_are_not_reused() {
        let registry = Connections::new();
        let first = registry
            .register("kafka", addr(1), addr(9092), false)
            .handle();
        let second = registry
            .register("kafka", addr(2), addr(9092), false)
            .handle();
        assert_ne!(first.id(), second.id());
    }

    #[tokio::test]
    async fn close_signals_the_gateway_and_reports_the_end() {
        let registry = Connections::new();
        let registration = registry.register("kafka", addr(1), addr(9092), false);
        let handle = registration.handle();
        assert!(!handle.is_close_requested());
        assert_eq!(
            registry.close(handle.id() + 1, "test").err(),
            Some(CloseError::NotFound(handle.id() + 1))
        );
        let closing = registry.close(handle.id(), "test").unwrap();
        assert!(closing.info.closing);
        assert!(registry.get(handle.id()).unwrap().closing);
        // Resolves at once: the close was asked for before anyone waited.
        tokio::time::timeout(Duration::from_secs(5), handle.close_requested())
            .await
            .expect("the close is seen");
        assert!(!closing.ended(Duration::from_millis(1)).await);
        drop(registration);
        assert!(closing.ended(Duration::from_secs(5)).await);
        assert_eq!(
            registry.close(handle.id(), "test").err(),
            Some(CloseError::NotFound(handle.id()))
        );
    }

    #[tokio::test]
    async fn a_polling_connection_is_woken_by_its_listener_stopping_or_a_close() {
        let registry = Connections::new();
        let stopped = registry.register("mqtt", addr(1), addr(1883), false);
        let closed = registry.register("mqtt", addr(2), addr(1883), false);
        let other = registry.register("kafka", addr(3), addr(9092), false);
        let (stopped, closed, other) = (stopped.handle(), closed.handle(), other.handle());
        let waits = [&stopped, &closed, &other].map(|h| {
            let h = h.clone();
            tokio::spawn(async move { std::future::poll_fn(|cx| h.poll_ending(cx)).await })
        });
        // Every task is waiting before anything is set.
        tokio::task::yield_now().await;
        assert!(waits.iter().all(|w| !w.is_finished()));
        registry.stop_listener("mqtt");
        registry.close(closed.id(), "test").unwrap();
        let [s, c, o] = waits;
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), s)
                .await
                .unwrap()
                .unwrap(),
            Ending::Stop
        );
        // A stop wins over a close: the listener's stop covers every connection of it.
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), c)
                .await
                .unwrap()
                .unwrap(),
            Ending::Stop
        );
        assert!(!o.is_finished(), "another listener's connection goes on");
        registry.close(other.id(), "test").unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), o)
                .await
                .unwrap()
                .unwrap(),
            Ending::Close
        );
    }
}
