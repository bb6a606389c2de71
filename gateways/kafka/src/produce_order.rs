//! The order of one connection's pipelined produces, and what a takeover does to it.
//!
//! A client pipelines its produces (librdkafka and the Java client keep five in flight per
//! connection). Kafka's leader answers them all from one log. In cluster mode an earlier one
//! may fail retriably (the node serving went away with it) while a later one reaches the node
//! that took over, which does not hold the earlier batch and refuses the later one as a
//! sequence gap. Kafka clients read OUT_OF_ORDER_SEQUENCE_NUMBER after a failed request as
//! lost sequence state: they bump the producer epoch and send everything still unacknowledged
//! again under new sequences, so a batch that had been stored (its answer lost in the
//! takeover) is stored twice. Seen in the cluster test: librdkafka logged "skipped sequence
//! numbers ... caused by previous failed request (NOT_LEADER_FOR_PARTITION)", bumped its epoch,
//! and one record was read back twice.
//!
//! So the answers are settled in request order, and a sequence refusal for a partition whose
//! produce failed retriably earlier on the connection (with no success since) is answered
//! NOT_LEADER_OR_FOLLOWER instead: the client retries both in order, as after a Kafka leader
//! change, and the node serving now takes the earlier batch first.

use std::collections::HashSet;
use std::sync::Arc;

use kafka_protocol::error::ResponseError as K;
use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::protocol::StrBytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

type Failed = Arc<Mutex<HashSet<(TopicName, i32)>>>;

/// One connection's chain of produces.
#[derive(Default)]
pub(crate) struct ProduceOrder {
    /// Settled when the last produce handed a turn has settled its answers.
    last: Option<oneshot::Receiver<()>>,
    /// Partitions whose last settled produce on this connection failed retriably. Made on
    /// the first produce: most connections never produce.
    failed: Option<Failed>,
}

impl ProduceOrder {
    /// The next produce's place in the chain.
    pub(crate) fn next(&mut self) -> ProduceTurn {
        let (done, settled) = oneshot::channel();
        ProduceTurn {
            before: self.last.replace(settled),
            done,
            failed: self.failed.get_or_insert_with(Failed::default).clone(),
        }
    }
}

/// One produce's place in its connection's chain.
pub(crate) struct ProduceTurn {
    before: Option<oneshot::Receiver<()>>,
    done: oneshot::Sender<()>,
    failed: Failed,
}

impl ProduceTurn {
    /// Waits until the produces before this one have settled their answers (they are written
    /// before it anyway), then settles this one's: see the module docs.
    pub(crate) async fn settle(self, answers: &mut [(TopicName, PartitionProduceResponse)]) {
        if let Some(before) = self.before {
            // An error: the earlier produce was dropped with its connection.
            let _ = before.await;
        }
        let mut failed = self.failed.lock();
        for (topic, r) in answers.iter_mut() {
            let key = (topic.clone(), r.index);
            if r.error_code == 0 {
                failed.remove(&key);
            } else if r.error_code == K::OutOfOrderSequenceNumber.code() {
                if failed.contains(&key) {
                    r.error_code = K::NotLeaderOrFollower.code();
                    r.error_message = Some(StrBytes::from_static_str(
                        "an earlier produce to this partition failed on this connection and \
                         the node serving now does not hold it: retry them in order",
                    ));
                }
            } else if K::try_from_code(r.error_code).is_some_and(|e| e.is_retriable()) {
                failed.insert(key);
            }
        }
        drop(failed);
        let _ = self.done.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(topic: &str, partition: i32, code: i16) -> (TopicName, PartitionProduceResponse) {
        (
            TopicName(StrBytes::from_string(topic.to_string())),
            PartitionProduceResponse::default()
                .with_index(partition)
                .with_error_code(code),
        )
    }

    const OOO: i16 = 45;
    const NOT_LEADER: i16 = 6;

    #[tokio::test]
    async fn a_gap_after_a_retriable_failure_is_retried_not_a_lost_sequence() {
        let mut order = ProduceOrder::default();
        let (a, b, c, d) = (order.next(), order.next(), order.next(), order.next());
        // The later produces finish first (the core answered them at once); their answers
        // are settled after the earlier ones' all the same.
        let later = tokio::spawn(async move {
            let mut gap = vec![answer("t", 0, OOO), answer("t", 1, OOO)];
            b.settle(&mut gap).await;
            let mut ok = vec![answer("t", 0, 0)];
            c.settle(&mut ok).await;
            let mut gap_again = vec![answer("t", 0, OOO)];
            d.settle(&mut gap_again).await;
            (gap, gap_again)
        });
        tokio::task::yield_now().await;
        assert!(
            !later.is_finished(),
            "settled before the produce ahead of it"
        );
        let mut failed = vec![answer("t", 0, NOT_LEADER), answer("u", 0, 0)];
        a.settle(&mut failed).await;
        let (gap, gap_again) = later.await.unwrap();
        assert_eq!(
            failed[0].1.error_code, NOT_LEADER,
            "a failure is kept as it is"
        );
        assert_eq!(
            gap[0].1.error_code, NOT_LEADER,
            "the gap behind the failed produce is retried"
        );
        assert_eq!(
            gap[1].1.error_code, OOO,
            "another partition's gap stays a sequence error"
        );
        assert_eq!(
            gap_again[0].1.error_code, OOO,
            "once the partition took a produce again, a gap is the client's"
        );
    }

    #[tokio::test]
    async fn a_dropped_produce_does_not_hold_the_next_one() {
        let mut order = ProduceOrder::default();
        let first = order.next();
        let second = order.next();
        drop(first);
        let mut answers = vec![answer("t", 0, OOO)];
        second.settle(&mut answers).await;
        assert_eq!(answers[0].1.error_code, OOO);
    }
}
