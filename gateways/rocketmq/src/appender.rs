//! Coalesced appends. A RocketMQ send carries one message, and producers keep many sends in
//! flight; one core append per message would pay the append's fixed cost (and contend on the
//! partition) once per message. Sends to one queue are therefore queued to a task of that
//! queue, which appends whatever has gathered as one batch and answers each send with its
//! own offset. A batch is one append: all of it is stored, or none of it and every send in it
//! gets the error. Order within a queue is the order the sends arrived in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tributary_proto::v1;

use crate::Gateway;
use crate::conn::Refusal;

/// Records of one coalesced append at most (bytes are bounded by the core's batch limit,
/// checked below). Small enough that a pull (32 messages by default) does not read a batch
/// many times its size: the core serves whole batches.
const MAX_RECORDS: usize = 64;
/// A queue's task ends after this long without a send (the next send starts a new one).
const IDLE: Duration = Duration::from_secs(30);
/// Sends waiting per queue before senders wait too.
const QUEUE_DEPTH: usize = 4096;

struct Pending {
    record: v1::Record,
    bytes: usize,
    create: Option<u32>,
    reply: oneshot::Sender<Result<i64, Refusal>>,
}

type Key = (String, u32);

#[derive(Default)]
pub(crate) struct Appender {
    queues: Mutex<HashMap<Key, mpsc::Sender<Pending>>>,
}

impl Appender {
    /// Appends one record to `topic`/`queue` (with others sent meanwhile); answers its offset.
    pub(crate) async fn append(
        gw: &Arc<Gateway>,
        topic: &str,
        queue: u32,
        record: v1::Record,
        create: Option<u32>,
    ) -> Result<i64, Refusal> {
        let key = (topic.to_string(), queue);
        let (reply, answer) = oneshot::channel();
        let bytes = record.value.len()
            + record.key.len()
            + record
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.len() + 8)
                .sum::<usize>()
            + 64;
        let mut pending = Pending {
            record,
            bytes,
            create,
            reply,
        };
        loop {
            let tx = {
                let mut queues = gw.appender.queues.lock();
                match queues.get(&key) {
                    Some(tx) if !tx.is_closed() => tx.clone(),
                    _ => {
                        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                        queues.insert(key.clone(), tx.clone());
                        tokio::spawn(run(gw.clone(), key.clone(), rx, tx.clone()));
                        tx
                    }
                }
            };
            match tx.send(pending).await {
                Ok(()) => break,
                // The task ended (idle) between the lookup and the send: start another.
                Err(mpsc::error::SendError(p)) => pending = p,
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Refusal::system("the append was abandoned")))
    }
}

async fn run(
    gw: Arc<Gateway>,
    key: Key,
    mut rx: mpsc::Receiver<Pending>,
    me: mpsc::Sender<Pending>,
) {
    let limit = gw.config.max_message_bytes.max(1);
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match tokio::time::timeout(IDLE, rx.recv()).await {
                Ok(Some(p)) => p,
                _ => break,
            },
        };
        let mut bytes = first.bytes;
        let create = first.create;
        let mut batch = vec![first];
        while batch.len() < MAX_RECORDS {
            match rx.try_recv() {
                Ok(p) if bytes + p.bytes <= limit && p.create == create => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Ok(p) => {
                    carry = Some(p);
                    break;
                }
                Err(_) => break,
            }
        }
        let (records, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.record, p.reply)).unzip();
        match crate::send::append(&gw, &key.0, key.1, records, create).await {
            Ok(r) => {
                for (i, reply) in replies.into_iter().enumerate() {
                    let _ = reply.send(Ok(r.base_offset + i as i64));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(Refusal::new(e.code, e.remark.clone())));
                }
            }
        }
    }
    // Idle: leave the map (unless a newer task already took the key), then answer anything
    // that raced in.
    {
        let mut queues = gw.appender.queues.lock();
        if queues.get(&key).is_some_and(|tx| tx.same_channel(&me)) {
            queues.remove(&key);
        }
    }
    drop(me);
    rx.close();
    while let Ok(p) = rx.try_recv() {
        let r = crate::send::append(&gw, &key.0, key.1, vec![p.record], p.create)
            .await
            .map(|r| r.base_offset);
        let _ = p.reply.send(r);
    }
}
