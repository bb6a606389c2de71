//! One attached connection's session stream, served by whoever reads its events.
//!
//! A connection used to cost two tasks: the gateway's and a core task that read the
//! connection's commands from a channel and served them. Every PUBLISH and every PUBACK then
//! crossed tasks twice (command in, answer out), and an idle connection kept the core task's
//! future and its channel. Here the commands are served inside `poll_next` of the event
//! stream, on the reader's task: the gateway's own task runs its session's work, in command
//! order, one command at a time, while it keeps taking the events (deliveries from other
//! sessions, answers) that arrive meanwhile. The gRPC transport puts a task in front
//! ([`Core::attach_session`]), so a remote gateway sees no difference.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tributary_proto::v1;

use crate::Core;
use crate::session_events::EventReceiver;
use crate::sessions::{AttachedStream, EventSender, HeldReply};

type CommandStream =
    Pin<Box<dyn Stream<Item = Result<Box<v1::SessionCommand>, tonic::Status>> + Send>>;

/// Where the commands come from.
pub(crate) enum Commands {
    /// A stream (gRPC, tests), read when the events are.
    Stream(CommandStream),
    /// Queued by the reader itself ([`SessionStream::push`]): no channel in between.
    Queue {
        queue: VecDeque<Box<v1::SessionCommand>>,
        ended: bool,
    },
}

/// A queue emptied with more room than this gives it back: a burst does not leave an idle
/// connection holding it.
const KEPT_QUEUE: usize = 64;

impl Commands {
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Box<v1::SessionCommand>, tonic::Status>>> {
        match self {
            Commands::Stream(s) => s.as_mut().poll_next(cx),
            Commands::Queue { queue, ended } => match queue.pop_front() {
                Some(cmd) => {
                    if queue.is_empty() && queue.capacity() > KEPT_QUEUE {
                        *queue = VecDeque::new();
                    }
                    Poll::Ready(Some(Ok(cmd)))
                }
                None if *ended => Poll::Ready(None),
                // The reader pushes and reads on one task: nothing to wake. It goes to
                // wait: an idle connection holds no queue.
                None => {
                    if queue.capacity() > 0 {
                        *queue = VecDeque::new();
                    }
                    Poll::Pending
                }
            },
        }
    }
}
type Running = Pin<Box<dyn Future<Output = (Driver, Option<HeldReply>)> + Send>>;
type Waiting = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Commands served per read of the events before the stream lets its task go on (and asks
/// to be polled again): a connection sending a long burst does not starve its own writes.
const COMMANDS_PER_POLL: usize = 64;

/// What a command runs with. Moved into the running command's future and back out of it,
/// so that the future owns what it borrows and the stream stays free to take events.
struct Driver {
    core: Core,
    state: AttachedStream,
    tx: EventSender,
}

impl Driver {
    async fn run(mut self, cmd: Box<v1::SessionCommand>) -> (Self, Option<HeldReply>) {
        let held = self
            .core
            .session_command(cmd, &mut self.state, &self.tx)
            .await;
        (self, held)
    }

    async fn end(self) -> (Self, Option<HeldReply>) {
        self.core.end_session_stream(&self.state).await;
        (self, None)
    }
}

/// The events of one attached session; reading them serves its commands.
pub struct SessionStream {
    /// `None` once they ended (the end's detach is then running or done).
    commands: Option<Commands>,
    /// Here between commands; inside `running` during one.
    driver: Option<Driver>,
    running: Option<Running>,
    /// Publish answers held back for lagging subscribers, in publish order (MQTT
    /// acknowledges in order); the commands behind them go on.
    held: VecDeque<HeldReply>,
    /// The wait of the first held answer.
    waiting: Option<Waiting>,
    tx: EventSender,
    events: EventReceiver,
    ended: bool,
}

impl SessionStream {
    pub(crate) fn new(
        core: Core,
        commands: Commands,
        tx: EventSender,
        events: EventReceiver,
    ) -> Self {
        Self {
            commands: Some(commands),
            driver: Some(Driver {
                core,
                state: AttachedStream::default(),
                tx: tx.clone(),
            }),
            running: None,
            held: VecDeque::new(),
            waiting: None,
            tx,
            events,
            ended: false,
        }
    }

    /// Sends the held answers whose subscribers caught up, in order.
    fn poll_held(&mut self, cx: &mut Context<'_>) {
        while let Some(front) = self.held.front() {
            let wait = self.waiting.get_or_insert_with(|| Box::pin(front.ready()));
            if wait.as_mut().poll(cx).is_pending() {
                return;
            }
            self.waiting = None;
            if let Some(h) = self.held.pop_front() {
                let _ = self.tx.try_send(h.event);
            }
        }
    }

    fn finished(&mut self, driver: Driver, held: Option<HeldReply>) {
        self.driver = Some(driver);
        match held {
            Some(reply) if self.held.is_empty() && reply.free() => {
                let _ = self.tx.try_send(reply.event);
            }
            Some(reply) => self.held.push_back(reply),
            None => {}
        }
    }

    /// Serves commands until one waits or there are none ready; `true` when the budget ran
    /// out with more to do.
    fn poll_commands(&mut self, cx: &mut Context<'_>) -> bool {
        for _ in 0..COMMANDS_PER_POLL {
            self.poll_held(cx);
            if let Some(running) = &mut self.running {
                match running.as_mut().poll(cx) {
                    Poll::Ready((driver, held)) => {
                        self.running = None;
                        self.finished(driver, held);
                        continue;
                    }
                    Poll::Pending => return false,
                }
            }
            let Some(commands) = &mut self.commands else {
                return false;
            };
            let next = match commands.poll_next(cx) {
                Poll::Pending => return false,
                Poll::Ready(next) => next,
            };
            let Some(driver) = self.driver.take() else {
                return false;
            };
            self.running = Some(match next {
                Some(Ok(cmd)) => {
                    match driver
                        .core
                        .session_command_now(cmd, &driver.state, &driver.tx)
                    {
                        Ok(()) => {
                            self.driver = Some(driver);
                            continue;
                        }
                        Err(cmd) => Box::pin(driver.run(cmd)),
                    }
                }
                // The end of the commands, or a transport error: the connection is gone.
                _ => {
                    self.commands = None;
                    Box::pin(driver.end())
                }
            });
        }
        true
    }
}

impl SessionStream {
    /// Queues a command (a stream made by [`Core::open_session`] only); it is served when
    /// the events are next read.
    pub fn push(&mut self, command: Box<v1::SessionCommand>) {
        if let Some(Commands::Queue {
            queue,
            ended: false,
        }) = &mut self.commands
        {
            queue.push_back(command);
        }
    }

    /// Commands queued and not yet served.
    pub fn queued(&self) -> usize {
        match &self.commands {
            Some(Commands::Queue { queue, .. }) => queue.len(),
            _ => 0,
        }
    }

    /// The core is shutting down: no more commands are read. The one running finishes,
    /// then the session is detached (as for a lost connection) and the events end. Whether
    /// this stopped them now.
    fn stop_commands(&mut self) -> bool {
        match &self.commands {
            None | Some(Commands::Queue { ended: true, .. }) => false,
            Some(_) => {
                self.commands = Some(Commands::Queue {
                    queue: VecDeque::new(),
                    ended: true,
                });
                true
            }
        }
    }

    /// No more commands: those queued are served, then the session is detached and the
    /// events end.
    pub fn end_commands(&mut self) {
        if let Some(Commands::Queue { ended, .. }) = &mut self.commands {
            *ended = true;
        }
    }
}

impl Stream for SessionStream {
    type Item = Box<v1::SessionEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.poll_commands(cx) {
            cx.waker().wake_by_ref();
        }
        match this.events.poll_recv(cx) {
            Poll::Ready(Some(event)) => return Poll::Ready(Some(event)),
            // The core is shutting down (a shard's core does when the shard moves to another
            // node, its node still running): the stream ends, so that the gateway drops the
            // connection and its client reconnects to whoever serves the session next.
            Poll::Ready(None) => {
                if this.stop_commands() && this.poll_commands(cx) {
                    cx.waker().wake_by_ref();
                }
            }
            Poll::Pending => {}
        }
        if this.commands.is_none() && this.running.is_none() {
            // Detached, and every event sent before is taken.
            this.ended = true;
            this.driver = None;
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl Drop for SessionStream {
    /// A reader that stops early (a gateway task cancelled) still gets its session
    /// detached: the command in progress and the end are finished on a task of their own.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let running = self.running.take();
        let driver = self.driver.take();
        if running.is_none() && !driver.as_ref().is_some_and(|d| d.state.needs_detach()) {
            return;
        }
        let ending = self.commands.is_none();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let driver = match running {
                Some(running) => running.await.0,
                None => match driver {
                    Some(d) => d,
                    None => return,
                },
            };
            if !ending {
                driver.end().await;
            }
        });
    }
}
