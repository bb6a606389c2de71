//! A subscription served on its consumer's task.
//!
//! Served by a task of its own, a subscription costs two task switches per credit round:
//! the consumer's credit wakes the subscription's task, which leases and sends the messages
//! back through a channel that wakes the consumer's task. An AMQP consumer at its prefetch
//! limit waits for exactly that round trip after every ack, so on a busy core it is what
//! held consumers behind publishers. In the same process the consumer's task can do the
//! subscription's work itself: reading the stream first takes what is ready, then polls
//! the work, then takes what the work produced. The gRPC transport keeps the task
//! ([`crate::grpc`]), so a remote gateway sees no difference.
//!
//! **Not used by the server.** The work can be suspended holding a lock (a queue's state,
//! the admin lock of an auto-delete) and resumes only when its reader polls it; a reader
//! that meanwhile awaits a core call taking that lock never polls it again. An AMQP
//! connection's broker does both, and a Java client's passive declare after a prefetch
//! consume hung the whole core that way. Safe only for a reader that never awaits the core
//! while the subscription is open, or once the work holds no lock across an await.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;
use tributary_proto::v1;

use crate::Core;

/// Events the work may make ahead of the reader (a lease round is cut into sends of this
/// many; the rest waits for the reader, as with a task).
const AHEAD: usize = 64;

type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The events of a subscription whose work runs when they are read.
pub struct ReaderServedSubscription {
    work: Option<Work>,
    events: mpsc::Receiver<Result<v1::SubscribeEvent, tonic::Status>>,
}

impl Core {
    /// A subscription (`Queues.Subscribe`) served by whoever reads its events: the first
    /// request must be a start, then credit.
    pub fn subscription_served_by_reader(
        &self,
        requests: impl Stream<Item = Result<v1::SubscribeRequest, tonic::Status>>
        + Send
        + Unpin
        + 'static,
    ) -> ReaderServedSubscription {
        let (tx, events) = mpsc::channel(AHEAD);
        let core = self.clone();
        ReaderServedSubscription {
            work: Some(Box::pin(async move {
                core.run_subscription(requests, tx).await
            })),
            events,
        }
    }
}

impl Stream for ReaderServedSubscription {
    type Item = Result<v1::SubscribeEvent, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Poll::Ready(Some(event)) = this.events.poll_recv(cx) {
            return Poll::Ready(Some(event));
        }
        if let Some(work) = this.work.as_mut()
            && work.as_mut().poll(cx).is_ready()
        {
            this.work = None;
        }
        // Once the work is done its sender is gone: what it sent is read, then the end.
        this.events.poll_recv(cx)
    }
}

impl Drop for ReaderServedSubscription {
    /// A reader that goes away mid-subscription (a cancelled consumer, a closed connection)
    /// leaves work to finish: the leases it took go back to the queue, an auto-delete queue
    /// may go. The work sees its reader gone once the events are closed, and finishes on a
    /// task of its own.
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        self.events.close();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(work);
            }
            // No runtime: the process, and the core in it, are ending.
            Err(_) => drop(work),
        }
    }
}
