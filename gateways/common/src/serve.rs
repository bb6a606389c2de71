//! The accept loop every gateway listener runs: accept, refuse beyond the connection limit,
//! run the handshake (bounded), then hand the connection to the gateway in a task of its
//! own. On stop it accepts no more, and waits (bounded) for the open connections to end.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, ready};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::accounting::count_dropped;
use crate::connections::{Registration, wait_until};
use crate::gateway::{Accepted, Gateway};
use crate::handshake::Handshake;
use crate::listener::Listener;

/// Pause after a failed accept (out of file descriptors and the like), so that the loop
/// does not spin while the open connections go on being served and some may close.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Why the accept loop closed a connection before its gateway saw it.
#[derive(Debug, thiserror::Error)]
enum Dropped {
    #[error("the listener already serves its limit of {0} connections")]
    Limit(NonZeroUsize),
    #[error("the handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the handshake failed: {0}")]
    HandshakeFailed(#[source] std::io::Error),
}

impl Dropped {
    /// The `reason` label of `tributary_connections_dropped_total`.
    fn reason(&self) -> &'static str {
        match self {
            Dropped::Limit(_) => "limit",
            Dropped::HandshakeTimeout(_) => "handshake_timeout",
            Dropped::HandshakeFailed(_) => "handshake_failed",
        }
    }

    /// Counts and logs it, inside the connection's span. A refusal at the limit is the
    /// operator's business (info); handshakes that fail or stall are what port scanners and
    /// load-balancer probes do all day (debug).
    fn record(self, listener: &'static str) {
        count_dropped(listener, self.reason());
        match self {
            Dropped::Limit(_) => info!(reason = %self, "connection refused"),
            _ => debug!(reason = %self, "connection dropped"),
        }
    }
}

/// Serves `listener` with `gateway` until `stop` turns true (or its sender is dropped), then
/// closes the listening socket and returns once every connection has ended: connections are
/// told through the `stop` they are given, and those still open after the listener's drain
/// timeout are closed. Dropping this future closes them all at once.
pub async fn serve<H, G>(listener: Listener<H>, gateway: Arc<G>, mut stop: watch::Receiver<bool>)
where
    H: Handshake,
    G: Gateway<H::Stream>,
{
    let Listener {
        socket,
        name,
        handshake,
        handshake_timeout,
        max_connections,
        drain_timeout,
        connections: registry,
    } = listener;
    let local = socket.local_addr().ok();
    let handshake = Arc::new(handshake);
    let slots = max_connections.map(|max| (max, Arc::new(Semaphore::new(max.get()))));
    // The listener's tasks are counted, not kept in a `JoinSet` (an entry of some 60 bytes per
    // connection); each one's abort handle is in its registry entry.
    let open = Arc::new(OpenConnections {
        count: AtomicUsize::new(0),
        none_left: Notify::new(),
        close_grace: drain_timeout,
    });
    let _abort_on_drop = AbortOnDrop {
        registry: registry.clone(),
        listener: name,
    };
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let span = info_span!("conn", listener = name, %peer);
        // The slot is taken before the handshake: a handshake holds a socket and memory too.
        let slot = match &slots {
            None => None,
            Some((max, slots)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    // Closed at once rather than left in the kernel's backlog: the client
                    // learns now, and the refusal is counted.
                    span.in_scope(|| Dropped::Limit(*max).record(name));
                    drop(tcp);
                    continue;
                }
            },
        };
        // Every protocol here is request/response: small writes must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let registration = registry.register(
            name,
            peer,
            tcp.local_addr().ok().or(local).unwrap_or(peer),
            H::TLS,
        );
        let listed = registration.handle();
        let connection = Connection {
            tcp,
            peer,
            listener: name,
            handshake_timeout,
            registration,
            _slot: slot,
            span,
            open: OpenConnection::new(&open),
        };
        let task = tokio::spawn(connection.run(handshake.clone(), gateway.clone(), stop.clone()));
        listed.set_abort(task.abort_handle());
    }
    // Refuse new clients from here instead of letting them queue unanswered.
    drop(socket);
    // Gateways that poll their connections by hand watch the registry, not `stop`.
    registry.stop_listener(name);
    info!(
        listener = name,
        open = open.count(),
        "stopped accepting; waiting for the open connections"
    );
    if tokio::time::timeout(drain_timeout, open.none())
        .await
        .is_err()
    {
        info!(
            listener = name,
            open = open.count(),
            "closing the connections still open after {drain_timeout:?}"
        );
        registry.abort_listener(name);
        open.none().await;
    }
    debug!(listener = name, "every connection ended");
}

/// How many of a listener's connection tasks are alive, and a wake-up when none is.
struct OpenConnections {
    count: AtomicUsize,
    none_left: Notify,
    /// How long after an operator's close the gateway has to end a connection its
    /// protocol's way before the connection is cut (the listener's drain timeout): here,
    /// once per listener, rather than in every connection's task.
    close_grace: Duration,
}

impl OpenConnections {
    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no connection task is alive.
    async fn none(&self) {
        wait_until(&self.none_left, || self.count() == 0).await
    }
}

/// One connection task's place in [`OpenConnections`], given back when the task's future
/// is dropped (it ended, or it was aborted).
struct OpenConnection(Arc<OpenConnections>);

impl OpenConnection {
    fn new(open: &Arc<OpenConnections>) -> Self {
        open.count.fetch_add(1, Ordering::AcqRel);
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

/// Aborts the listener's connection tasks when `serve` is dropped: dropping it closes them
/// all at once, as its `JoinSet` did.
struct AbortOnDrop {
    registry: Arc<crate::connections::Connections>,
    listener: &'static str,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.registry.abort_listener(self.listener);
    }
}

/// An accepted connection on its way to its gateway.
struct Connection {
    tcp: TcpStream,
    peer: SocketAddr,
    listener: &'static str,
    handshake_timeout: Duration,
    /// Its entry in the connection list, removed when this task ends (panic included).
    registration: Registration,
    /// Its place under the connection limit, given back when the connection ends.
    _slot: Option<OwnedSemaphorePermit>,
    /// `conn` (listener, peer): the handshake runs in it, and the gateway's own span (which
    /// says the same and more) is made in it, so it is the parent of all the connection logs.
    /// The task does not hold it: 40 bytes for every connection's life.
    span: tracing::Span,
    open: OpenConnection,
}

impl Connection {
    /// The connection's task: the handshake, then the gateway's future, then the entry's
    /// removal. Polled by hand ([`ConnectionTask`]) rather than written as an `async` block:
    /// such a block keeps what it captured (the socket it handed on, the peer, the
    /// timeouts, the handshake and gateway handles) beside its own locals for the
    /// connection's whole life.
    fn run<H, G>(
        self,
        handshake: Arc<H>,
        gateway: Arc<G>,
        mut stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send
    where
        H: Handshake,
        G: Gateway<H::Stream>,
    {
        let Connection {
            tcp,
            peer,
            listener,
            handshake_timeout,
            registration,
            _slot,
            span,
            open,
        } = self;
        let connection = registration.handle();
        // Boxed: a task rests at the size of its largest state, and this one lasts as long
        // as the connection (a TLS handshake's state is kilobytes). It ends with the
        // gateway's future made, not yet polled.
        let opening = Box::pin(async move {
            let stream = tokio::select! {
                done = tokio::time::timeout(handshake_timeout, handshake.handshake(tcp)) => match done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        Dropped::HandshakeFailed(e).record(listener);
                        return None;
                    }
                    Err(_) => {
                        Dropped::HandshakeTimeout(handshake_timeout).record(listener);
                        return None;
                    }
                },
                // A half-done handshake is not worth holding the stop up for.
                _ = stop.wait_for(|s| *s) => return None,
                () = connection.close_requested() => {
                    debug!("closed by an operator during the handshake");
                    return None;
                }
            };
            let accepted = Accepted {
                stream,
                peer,
                listener,
                connection,
            };
            Some(gateway.serve_connection(accepted, stop))
        }
        .instrument(span));
        ConnectionTask {
            stage: Stage::Opening { opening },
            registration: Some(registration),
            _slot,
            open,
        }
    }
}

pin_project_lite::pin_project! {
    /// One connection's task, polled by hand: an idle connection's task holds the
    /// gateway's future (inline: a box of its own was one more allocation per connection),
    /// its registration and its place under the limit, and nothing else.
    struct ConnectionTask<O, F> {
        #[pin]
        stage: Stage<O, F>,
        // Its entry in the connection list, removed when the gateway's future is done
        // (or when this task is dropped, a panic included).
        registration: Option<Registration>,
        // Its place under the connection limit, given back when the connection ends.
        _slot: Option<OwnedSemaphorePermit>,
        // Counted among its listener's open connections while it lives; its listener's
        // close grace with it.
        open: OpenConnection,
    }
}

pin_project_lite::pin_project! {
    #[project = StageProj]
    enum Stage<O, F> {
        Opening { opening: Pin<Box<O>> },
        Serving {
            #[pin]
            served: F,
            // Armed by an operator's close: when it fires, the connection is cut.
            cut: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        Done,
    }
}

impl<O, F> Future for ConnectionTask<O, F>
where
    O: Future<Output = Option<F>>,
    F: Future<Output = ()>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        // A panic ends this connection only, as it would end the task; caught here to say
        // which listener's connection it was (the panic message went to stderr).
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.as_mut().poll_stages(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                let listener = self
                    .registration
                    .as_ref()
                    .map_or("", |r| r.handle_ref().listener());
                error!(listener, "a connection task panicked");
                Poll::Ready(())
            }
        }
    }
}

impl<O, F> ConnectionTask<O, F>
where
    O: Future<Output = Option<F>>,
    F: Future<Output = ()>,
{
    fn poll_stages(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            match this.stage.as_mut().project() {
                StageProj::Opening { opening } => {
                    let next = match ready!(opening.as_mut().poll(cx)) {
                        Some(served) => Stage::Serving { served, cut: None },
                        None => Stage::Done,
                    };
                    this.stage.set(next);
                }
                StageProj::Serving { served, cut } => {
                    // Done: its future is dropped (its socket closed) before the entry goes
                    // (`Done` below), as a client no longer listed must not still be
                    // connected.
                    if served.poll(cx).is_ready() {
                        this.stage.set(Stage::Done);
                        continue;
                    }
                    let Some(connection) = this.registration.as_ref().map(|r| r.handle_ref())
                    else {
                        // Not reached: the registration goes only in `Done`.
                        this.stage.set(Stage::Done);
                        continue;
                    };
                    if cut.is_none() && connection.poll_close_requested(cx).is_ready() {
                        *cut = Some(Box::pin(tokio::time::sleep(this.open.0.close_grace)));
                    }
                    let Some(timer) = cut.as_mut() else {
                        return Poll::Pending;
                    };
                    ready!(timer.as_mut().poll(cx));
                    // The gateway's goodbye did not end it (a request that does not
                    // return, an opening that does not watch the close): dropping it closes
                    // the socket.
                    info!(
                        connection = connection.id(),
                        "cut a connection that did not close within {:?} of an operator's close",
                        this.open.0.close_grace
                    );
                    this.stage.set(Stage::Done);
                }
                StageProj::Done => {
                    *this.registration = None;
                    return Poll::Ready(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
