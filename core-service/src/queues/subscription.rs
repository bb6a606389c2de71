//! Push consumption: a subscription leases messages as they become ready, within the
//! credit its consumer grants (AMQP's prefetch, a push consumer's window), and sends them
//! down one stream. Settling goes through the ordinary Ack / Nack / ChangeLease calls, from
//! any connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::debug;
use tributary_proto::v1::{self, subscribe_event::Event, subscribe_request::Item};

use super::QueueHandle;
use super::delivery::lease_id;
use super::settings::MAX_VISIBILITY_MS;
use super::state::HELD_AT_MS;
use crate::error::{CoreError, CoreResult};
use crate::{Core, now_ms};

/// Messages leased per round at most, however much credit there is.
const ROUND: usize = 256;
/// Leases remembered for release-on-close before the settled ones are pruned.
const PRUNE_AT: usize = 4096;

impl Core {
    /// Serves one subscription until its consumer goes away, the queue is deleted or the
    /// core stops. The first request must be a start.
    pub async fn run_subscription(
        &self,
        mut requests: impl Stream<Item = Result<v1::SubscribeRequest, tonic::Status>> + Unpin,
        events: mpsc::Sender<Result<v1::SubscribeEvent, tonic::Status>>,
    ) {
        let start = match requests.next().await {
            Some(Ok(v1::SubscribeRequest {
                item: Some(Item::Start(s)),
            })) => s,
            Some(Err(_)) | None => return,
            Some(Ok(_)) => {
                let e = CoreError::InvalidArgument("a subscription begins with a start".into());
                let _ = events.send(Err(e.into())).await;
                return;
            }
        };
        if let Err(e) = self.subscribe_loop(start, requests, &events).await {
            let _ = events.send(Err(e.into())).await;
        }
    }

    async fn subscribe_loop(
        &self,
        start: v1::SubscribeStart,
        mut requests: impl Stream<Item = Result<v1::SubscribeRequest, tonic::Status>> + Unpin,
        events: &mpsc::Sender<Result<v1::SubscribeEvent, tonic::Status>>,
    ) -> CoreResult<()> {
        self.check_running()?;
        let queue = match start.source {
            Some(v1::subscribe_start::Source::Queue(q)) => q,
            Some(v1::subscribe_start::Source::SessionId(_)) => {
                return Err(CoreError::Unsupported(
                    "subscribing to a session (MQTT sessions are reached through Sessions.Attach)"
                        .into(),
                ));
            }
            None => {
                return Err(CoreError::InvalidArgument(
                    "a subscription needs a queue".into(),
                ));
            }
        };
        let h = self.queue(&queue)?;
        if !(0..=MAX_VISIBILITY_MS).contains(&start.visibility_timeout_ms) {
            return Err(CoreError::InvalidArgument(format!(
                "visibility_timeout_ms must be 0..={MAX_VISIBILITY_MS}"
            )));
        }
        if start.exclusive {
            if h.consumers.load(Ordering::Acquire) > 0 {
                return Err(CoreError::Conflict(format!(
                    "queue '{}' has consumers; an exclusive subscription needs it to itself",
                    queue.name
                )));
            }
            h.exclusive.store(true, Ordering::Release);
        } else if h.exclusive.load(Ordering::Acquire) {
            return Err(CoreError::Conflict(format!(
                "queue '{}' has an exclusive consumer",
                queue.name
            )));
        }
        let single_active = h.settings().single_active_consumer == Some(true);
        let me = h.next_subscriber.fetch_add(1, Ordering::Relaxed) + 1;
        // Single active consumer: the turn goes by start order, and the place in line is
        // taken here, before the subscription is counted or its start announced: a gateway
        // confirms its consumer once it sees the start, so the one confirmed first is the
        // active one (RabbitMQ's rule) however this task is scheduled from here on.
        let active = single_active.then(|| ActiveGuard::join(h.clone(), me));
        let consumer = Self::consumer_guard(&h);
        let exclusive = start.exclusive.then(|| ExclusiveGuard(h.clone()));
        h.touch();
        if start.announce_start {
            let started = v1::SubscribeEvent {
                event: Some(Event::Started(true)),
            };
            if events.send(Ok(started)).await.is_err() {
                return Ok(());
            }
        }
        let mut credit = u64::from(start.initial_credit);
        let mut held: VecDeque<(i64, u64)> = VecDeque::new();
        let mut shutdown = self.inner.shutdown.subscribe();
        // Ended by the consumer's `end`: its leases stay with it.
        let mut ended_by_consumer = false;
        let outcome = loop {
            let notified = h.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if h.check_live().is_err() {
                let cancelled = v1::SubscribeEvent {
                    event: Some(Event::Cancelled(v1::ErrorDetail {
                        code: v1::ErrorCode::QueueNotFound as i32,
                        message: format!("queue '{}' was deleted", queue.name),
                    })),
                };
                let _ = events.send(Ok(cancelled)).await;
                break Ok(());
            }
            // Single active consumer: only the subscription that holds the queue's turn
            // leases; the others wait for those before them to end.
            let my_turn = !single_active || h.active_subscriber.load(Ordering::Acquire) == me;
            if credit > 0 && my_turn {
                let vis = match start.visibility_timeout_ms {
                    0 => HELD_AT_MS - now_ms(),
                    v => v,
                };
                let max = credit.min(ROUND as u64) as usize;
                let (leased, dead) = self.lease_some(&h, max, vis, true).await?;
                // Remembered before anything below can fail: a subscription that ends on an
                // error still releases what it leased.
                if start.release_on_close || start.auto_ack {
                    held.extend(leased.iter().map(|l| (l.offset, l.seq)));
                }
                let had_dead = !dead.is_empty();
                self.move_dead_letters(&h, dead).await?;
                if !leased.is_empty() {
                    credit -= leased.len() as u64;
                    h.wake.notify_one();
                    let ids: Vec<String> = leased
                        .iter()
                        .map(|l| lease_id(h.record.id, l.offset, l.seq))
                        .collect();
                    if start.auto_ack {
                        self.settle_leases(&queue, &ids, false).await?;
                    }
                    if held.len() > PRUNE_AT {
                        prune(&h, &mut held).await;
                    }
                    let mut gone = false;
                    for l in leased {
                        let event = v1::SubscribeEvent {
                            event: Some(Event::Message(super::delivery::to_leased_message(
                                h.record.id,
                                l,
                            ))),
                        };
                        if events.send(Ok(event)).await.is_err() {
                            gone = true;
                            break;
                        }
                    }
                    if gone {
                        break Ok(());
                    }
                    continue;
                }
                if had_dead {
                    continue;
                }
            }
            tokio::select! {
                _ = notified => {}
                r = requests.next() => match r {
                    Some(Ok(v1::SubscribeRequest { item: Some(Item::Credit(n)) })) => {
                        credit = credit.saturating_add(u64::from(n));
                    }
                    Some(Ok(v1::SubscribeRequest { item: Some(Item::End(_)) })) => {
                        ended_by_consumer = true;
                        break Ok(());
                    }
                    Some(Ok(_)) => break Err(CoreError::InvalidArgument(
                        "a subscription takes one start, then credit".into(),
                    )),
                    Some(Err(_)) | None => break Ok(()),
                },
                _ = events.closed() => break Ok(()),
                _ = shutdown.changed() => break Ok(()),
            }
        };
        // Auto-ack leases are settled as they go out: held only until then, so one left
        // here failed before it was settled and goes back.
        if (start.release_on_close || start.auto_ack) && !ended_by_consumer {
            self.release_held(&h, &queue, &held).await;
        }
        drop((active, exclusive, consumer));
        // An auto-delete queue goes when its last consumer does (one that never had a
        // consumer stays, as in AMQP).
        if h.record.auto_delete && h.consumers.load(Ordering::Acquire) == 0 {
            let _admin = self.inner.admin.lock().await;
            if h.consumers.load(Ordering::Acquire) == 0 && h.check_live().is_ok() {
                debug!(queue = %h.label(), "auto-delete queue lost its last consumer; deleting it");
                self.remove_queue(&h).await?;
            }
        }
        if ended_by_consumer && outcome.is_ok() {
            // No longer a consumer (the next single active one has its turn, an auto-delete
            // queue went above), but its leases stay with it while it keeps the stream open;
            // what it has not settled when the stream closes, or drops with a killed
            // gateway, goes back.
            let ended = v1::SubscribeEvent {
                event: Some(Event::Ended(true)),
            };
            if events.send(Ok(ended)).await.is_ok() {
                loop {
                    tokio::select! {
                        r = requests.next() => match r {
                            // Credit after the end means nothing.
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        },
                        _ = events.closed() => break,
                        _ = shutdown.changed() => break,
                    }
                }
            }
            if start.release_on_close {
                self.release_held(&h, &queue, &held).await;
            }
        }
        outcome
    }

    /// Puts back the leases a subscription took and did not see settled (nack skips the
    /// ones settled meanwhile).
    async fn release_held(
        &self,
        h: &QueueHandle,
        queue: &v1::QueueId,
        held: &VecDeque<(i64, u64)>,
    ) {
        if held.is_empty() {
            return;
        }
        let ids: Vec<String> = held
            .iter()
            .map(|(o, s)| lease_id(h.record.id, *o, *s))
            .collect();
        debug!(queue = %h.label(), count = ids.len(), "subscription closed; releasing its leases");
        if let Err(e) = self.nack(queue, &ids, true, 0).await {
            debug!(queue = %h.label(), error = %e, "could not release a closed subscription's leases");
        }
    }
}

/// A single-active-consumer subscription's place in line: the first one has the turn; when
/// it goes, the turn passes to the next one in start order and the waiting ones are woken.
struct ActiveGuard(Arc<QueueHandle>, u64);

impl ActiveGuard {
    fn join(h: Arc<QueueHandle>, me: u64) -> Self {
        let mut turns = h.turns.lock();
        turns.push_back(me);
        if turns.len() == 1 {
            h.active_subscriber.store(me, Ordering::Release);
        }
        drop(turns);
        Self(h, me)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let h = &self.0;
        let mut turns = h.turns.lock();
        if turns.front() == Some(&self.1) {
            turns.pop_front();
            let next = turns.front().copied().unwrap_or(0);
            h.active_subscriber.store(next, Ordering::Release);
            drop(turns);
            h.ready.notify_waiters();
        } else {
            turns.retain(|t| *t != self.1);
        }
    }
}

/// Forgets remembered leases that no longer hold their message (settled or expired).
async fn prune(h: &QueueHandle, held: &mut VecDeque<(i64, u64)>) {
    let g = h.guarded.lock().await;
    let now = now_ms();
    held.retain(|(o, s)| g.st.holds(now, *o, *s));
}

struct ExclusiveGuard(Arc<QueueHandle>);

impl Drop for ExclusiveGuard {
    fn drop(&mut self) {
        self.0.exclusive.store(false, Ordering::Release);
    }
}
