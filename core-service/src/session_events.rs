//! The events of one attached session: a bounded queue with many senders (the tasks of
//! the publishes routed to the session, and its own commands) and one reader (the
//! connection).
//!
//! Written here rather than taken from tokio: a tokio bounded channel costs about 700 bytes
//! per idle connection (cache-padded counters and a first block of 32 slots allocated when
//! it is made), a third of what an idle MQTT connection may cost in all. This one is a
//! mutex around a `VecDeque` that allocates only while events wait, the reader's waker, and
//! a `Notify` for senders that wait for room.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tributary_proto::v1;

/// An emptied queue with more room than this gives it back, so a burst does not leave an
/// idle connection holding it.
const KEPT_ROOM: usize = 64;

struct Queue {
    state: Mutex<State>,
    /// Senders waiting for room in [`EventSender::send`].
    room: Notify,
    capacity: usize,
}

#[derive(Default)]
struct State {
    events: VecDeque<Box<v1::SessionEvent>>,
    reader: Option<Waker>,
    /// The reader is gone: nothing is taken any more.
    closed: bool,
    /// The core is shutting down: once the events queued are taken, the reader is told.
    stopping: bool,
    /// A sender waits for room: the reader wakes it when it takes an event.
    room_wanted: bool,
}

/// Why an event was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    Full,
    Closed,
}

/// Queues events for one session's connection.
#[derive(Clone)]
pub(crate) struct EventSender(Arc<Queue>);

/// The connection's end of the queue.
pub(crate) struct EventReceiver(Arc<Queue>);

/// A queue that holds at most `capacity` events.
pub(crate) fn event_queue(capacity: usize) -> (EventSender, EventReceiver) {
    let queue = Arc::new(Queue {
        state: Mutex::new(State::default()),
        room: Notify::new(),
        capacity,
    });
    (EventSender(queue.clone()), EventReceiver(queue))
}

impl EventSender {
    pub(crate) fn try_send(&self, event: v1::SessionEvent) -> Result<(), SendError> {
        self.push(Box::new(event)).map_err(|(e, _)| e)
    }

    /// Queues `event`, waiting for room while the queue is full; fails only once the
    /// reader is gone.
    pub(crate) async fn send(&self, event: v1::SessionEvent) -> Result<(), SendError> {
        let mut event = Box::new(event);
        loop {
            let notified = self.0.room.notified();
            tokio::pin!(notified);
            // Registered before the queue is looked at, so room made in between is seen.
            notified.as_mut().enable();
            match self.push(event) {
                Ok(()) => return Ok(()),
                Err((SendError::Closed, _)) => return Err(SendError::Closed),
                Err((SendError::Full, back)) => {
                    event = back;
                    self.0.state.lock().room_wanted = true;
                    // The reader may have taken events between the push and the flag.
                    if self.backlog() < self.0.capacity {
                        continue;
                    }
                }
            }
            notified.await;
        }
    }

    fn push(&self, event: Box<v1::SessionEvent>) -> Result<(), (SendError, Box<v1::SessionEvent>)> {
        let reader = {
            let mut s = self.0.state.lock();
            if s.closed {
                return Err((SendError::Closed, event));
            }
            if s.events.len() >= self.0.capacity {
                return Err((SendError::Full, event));
            }
            s.events.push_back(event);
            s.reader.take()
        };
        if let Some(w) = reader {
            w.wake();
        }
        Ok(())
    }

    /// Tells the reader, once it has taken the events queued, that the core is shutting
    /// down (its [`EventReceiver::poll_recv`] then answers `None`).
    pub(crate) fn stop(&self) {
        let reader = {
            let mut s = self.0.state.lock();
            s.stopping = true;
            s.reader.take()
        };
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Events queued and not yet taken.
    pub(crate) fn backlog(&self) -> usize {
        self.0.state.lock().events.len()
    }
}

impl EventReceiver {
    /// The next event; `None` once every event is taken after [`EventSender::stop`].
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Box<v1::SessionEvent>>> {
        let mut s = self.0.state.lock();
        let Some(event) = s.events.pop_front() else {
            if s.stopping {
                return Poll::Ready(None);
            }
            // The reader goes to wait: an idle connection holds no queue (a busy one keeps
            // it while events come faster than it takes them).
            if s.events.capacity() > 0 {
                s.events = VecDeque::new();
            }
            if !s.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.reader = Some(cx.waker().clone());
            }
            return Poll::Pending;
        };
        if s.events.is_empty() && s.events.capacity() > KEPT_ROOM {
            s.events = VecDeque::new();
        }
        let wake_senders = std::mem::take(&mut s.room_wanted);
        drop(s);
        if wake_senders {
            self.0.room.notify_waiters();
        }
        Poll::Ready(Some(event))
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        {
            let mut s = self.0.state.lock();
            s.closed = true;
            s.events = VecDeque::new();
        }
        self.0.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ev(id: u64) -> v1::SessionEvent {
        v1::SessionEvent {
            request_id: id,
            event: None,
        }
    }

    fn recv_now(rx: &mut EventReceiver) -> Option<u64> {
        let waker = futures::task::noop_waker();
        match rx.poll_recv(&mut Context::from_waker(&waker)) {
            Poll::Ready(e) => e.map(|e| e.request_id),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_stop_is_seen_once_the_events_queued_are_taken() {
        let (tx, mut rx) = event_queue(4);
        tx.try_send(ev(1)).unwrap();
        tx.stop();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(e)) if e.request_id == 1));
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn events_come_out_in_order_up_to_the_capacity() {
        let (tx, mut rx) = event_queue(2);
        assert_eq!(tx.try_send(ev(1)), Ok(()));
        assert_eq!(tx.try_send(ev(2)), Ok(()));
        assert_eq!(tx.try_send(ev(3)), Err(SendError::Full));
        assert_eq!(tx.backlog(), 2);
        assert_eq!(recv_now(&mut rx), Some(1));
        assert_eq!(recv_now(&mut rx), Some(2));
        assert_eq!(recv_now(&mut rx), None);
        drop(rx);
        assert_eq!(tx.try_send(ev(4)), Err(SendError::Closed));
    }

    #[tokio::test]
    async fn a_reader_waiting_is_woken_by_a_send() {
        let (tx, mut rx) = event_queue(4);
        let reader = tokio::spawn(async move {
            std::future::poll_fn(|cx| rx.poll_recv(cx))
                .await
                .map(|e| e.request_id)
        });
        tokio::task::yield_now().await;
        tx.try_send(ev(7)).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the reader was not woken")
            .unwrap();
        assert_eq!(got, Some(7));
    }

    #[tokio::test]
    async fn a_sender_waits_for_room_and_learns_when_the_reader_is_gone() {
        let (tx, mut rx) = event_queue(1);
        tx.try_send(ev(1)).unwrap();
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(ev(2)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(recv_now(&mut rx), Some(1));
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the sender was not woken by the room")
            .unwrap();
        assert_eq!(sent, Ok(()));
        assert_eq!(recv_now(&mut rx), Some(2));

        tx.try_send(ev(3)).unwrap();
        let stuck = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(ev(4)).await })
        };
        tokio::task::yield_now().await;
        drop(rx);
        let sent = tokio::time::timeout(Duration::from_secs(5), stuck)
            .await
            .expect("the sender was not woken by the close")
            .unwrap();
        assert_eq!(sent, Err(SendError::Closed));
    }
}
