//! One attached session as a gateway connection holds it: commands in, events out, with a
//! bounded backlog of commands, whatever the transport.
//!
//! In process, the commands go straight into the core's session (no channel: a channel is
//! some 800 bytes per idle connection, and a hop per command) and are served when the
//! connection reads its events. Over the network they go into the `Sessions.Attach` gRPC
//! stream through a bounded channel.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::StreamExt;
use tokio::sync::mpsc;
use tributary_proto::v1::{SessionCommand, SessionEvent};

/// A session attached to a core in this process.
pub trait LocalSession: Send {
    /// Queues a command; commands are served in order while events are read.
    fn send(&mut self, command: Box<SessionCommand>);
    /// Commands queued and not served yet.
    fn queued(&self) -> usize;
    /// No more commands: once those queued are served, the session is detached (as for a
    /// lost connection unless a Close came first) and the events end.
    fn end(&mut self);
    /// The next event; serves queued commands on the way.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Box<SessionEvent>>>;
}

/// The events of a session attached over gRPC.
pub type RemoteEvents =
    Pin<Box<dyn futures::Stream<Item = Result<Box<SessionEvent>, tonic::Status>> + Send>>;

/// What a read of the link gives.
pub enum LinkEvent {
    Event(Box<SessionEvent>),
    /// Room for commands again (only when asked for).
    Room,
    /// The core ended the stream (with the transport's error, if any).
    End(Option<tonic::Status>),
}

/// Why a command was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the core is not taking commands")]
    Full,
    #[error("the core stream closed")]
    Closed,
}

pub struct SessionLink {
    window: usize,
    inner: Inner,
}

// The remote side is boxed: the link is inline in every connection's state, and the
// local side (one pointer) is what most deployments run.
enum Inner {
    Local(Box<dyn LocalSession>),
    Remote(Box<Remote>),
}

struct Remote {
    commands: Option<mpsc::Sender<Box<SessionCommand>>>,
    events: RemoteEvents,
    /// A wait for room in the channel, while one is asked for.
    room: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl SessionLink {
    pub(crate) fn local(session: Box<dyn LocalSession>, window: usize) -> Self {
        Self {
            window,
            inner: Inner::Local(session),
        }
    }

    pub(crate) fn remote(
        commands: mpsc::Sender<Box<SessionCommand>>,
        events: RemoteEvents,
        window: usize,
    ) -> Self {
        Self {
            window,
            inner: Inner::Remote(Box::new(Remote {
                commands: Some(commands),
                events,
                room: None,
            })),
        }
    }

    /// Queues a command; refused beyond the window (the caller reads only while there is
    /// [`SessionLink::room`]) or after the end.
    pub fn send(&mut self, command: Box<SessionCommand>) -> Result<(), SendError> {
        match &mut self.inner {
            Inner::Local(s) => {
                if s.queued() >= self.window {
                    return Err(SendError::Full);
                }
                s.send(command);
                Ok(())
            }
            Inner::Remote(remote) => {
                let Some(tx) = &remote.commands else {
                    return Err(SendError::Closed);
                };
                tx.try_send(command).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => SendError::Full,
                    mpsc::error::TrySendError::Closed(_) => SendError::Closed,
                })
            }
        }
    }

    /// How many more commands may be queued now.
    pub fn room(&self) -> usize {
        match &self.inner {
            Inner::Local(s) => self.window.saturating_sub(s.queued()),
            Inner::Remote(remote) => remote.commands.as_ref().map_or(0, |tx| tx.capacity()),
        }
    }

    /// No more commands (see [`LocalSession::end`]); the events go on to their end.
    pub fn end(&mut self) {
        match &mut self.inner {
            Inner::Local(s) => s.end(),
            Inner::Remote(remote) => {
                remote.commands = None;
                remote.room = None;
            }
        }
    }

    /// The next event; with `want_room`, also [`LinkEvent::Room`] once at least that many
    /// commands fit again. Cancel-safe.
    pub async fn next(&mut self, want_room: Option<usize>) -> LinkEvent {
        std::future::poll_fn(|cx| self.poll_next(cx, want_room)).await
    }

    /// An event ready now, without waiting.
    pub fn next_ready(&mut self) -> Option<LinkEvent> {
        let waker = futures::task::noop_waker();
        match self.poll_next(&mut Context::from_waker(&waker), None) {
            Poll::Ready(e) => Some(e),
            Poll::Pending => None,
        }
    }

    /// [`SessionLink::next`] for a connection polled by hand.
    pub fn poll_next(&mut self, cx: &mut Context<'_>, want_room: Option<usize>) -> Poll<LinkEvent> {
        let window = self.window;
        match &mut self.inner {
            Inner::Local(s) => {
                if let Poll::Ready(e) = s.poll_event(cx) {
                    return Poll::Ready(e.map_or(LinkEvent::End(None), LinkEvent::Event));
                }
                // Serving commands (above) is what makes room, on this very task.
                match want_room {
                    Some(n) if window.saturating_sub(s.queued()) >= n => {
                        Poll::Ready(LinkEvent::Room)
                    }
                    _ => Poll::Pending,
                }
            }
            Inner::Remote(remote) => {
                let Remote {
                    commands,
                    events,
                    room,
                } = &mut **remote;
                if let Poll::Ready(e) = events.poll_next_unpin(cx) {
                    return Poll::Ready(match e {
                        Some(Ok(e)) => LinkEvent::Event(e),
                        Some(Err(status)) => LinkEvent::End(Some(status)),
                        None => LinkEvent::End(None),
                    });
                }
                let (Some(n), Some(tx)) = (want_room, commands.as_ref()) else {
                    *room = None;
                    return Poll::Pending;
                };
                if tx.capacity() >= n {
                    *room = None;
                    return Poll::Ready(LinkEvent::Room);
                }
                let wait = room.get_or_insert_with(|| {
                    let tx = tx.clone();
                    Box::pin(async move {
                        // The permits go straight back: this only waits for the room.
                        let _ = tx.reserve_many(n).await;
                    })
                });
                if wait.as_mut().poll(cx).is_ready() {
                    *room = None;
                    return Poll::Ready(LinkEvent::Room);
                }
                Poll::Pending
            }
        }
    }
}
