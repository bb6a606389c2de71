//! One AMQP channel's state in the gateway: delivery tags and the leases they stand for,
//! consumers with their credit, prefetch limits, confirm and transaction modes.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tokio::sync::mpsc;
use tributary_proto::amqp_link as link;
use tributary_proto::v1;

use super::refusal::{PRECONDITION_FAILED, Res, refuse};

/// A delivery not yet acknowledged: the lease the core holds for it.
pub struct Unacked {
    pub queue: String,
    pub lease: String,
    /// The consumer that got it (None: basic.get, or a consumer since cancelled).
    pub consumer: Option<String>,
}

/// A consumer: a subscription in the core, fed with credit.
pub struct Consumer {
    pub queue: String,
    pub no_ack: bool,
    /// Bounded by a prefetch count: one credit back per settled delivery. Otherwise the
    /// credit comes back as the transport takes deliveries (`owed`).
    pub limited: bool,
    pub quorum: bool,
    pub credit: mpsc::UnboundedSender<v1::SubscribeRequest>,
    pub owed: u32,
}

impl Consumer {
    pub fn give_credit(&self, n: u32) {
        if n > 0 {
            let _ = self.credit.send(v1::SubscribeRequest {
                item: Some(v1::subscribe_request::Item::Credit(n)),
            });
        }
    }
}

pub enum TxOp {
    Publish(link::BasicPublish),
    Settle(link::BasicSettle),
}

/// What a consumer's subscription stream yields, its end included.
pub enum SubItem {
    Event(Box<v1::SubscribeEvent>),
    Failed(tonic::Status),
    End,
}

pub struct Chan {
    pub next_tag: u64,
    pub unacked: BTreeMap<u64, Unacked>,
    pub consumers: HashMap<String, Consumer>,
    /// basic.qos global=false: for consumers started after it.
    pub prefetch: u32,
    /// basic.qos global=true: RabbitMQ's limit shared by the channel's consumers.
    pub global_prefetch: u32,
    pub confirm: bool,
    pub tx: Option<Vec<TxOp>>,
    /// Delivery tags the open transaction settles (a second settle of one is refused).
    pub tx_settled: std::collections::BTreeSet<u64>,
    /// Deliveries leased for this channel but held back by `global_prefetch`.
    pub held: VecDeque<(String, v1::LeasedMessage)>,
    /// Cancelled consumers' subscriptions (their credit sender and event stream), kept
    /// open while the channel is: the core keeps their unsettled leases until they close,
    /// then returns them (so do a closed channel and a killed gateway).
    pub ended: Vec<Box<dyn std::any::Any + Send>>,
}

impl Chan {
    pub fn new() -> Self {
        Self {
            next_tag: 1,
            unacked: BTreeMap::new(),
            consumers: HashMap::new(),
            prefetch: 0,
            global_prefetch: 0,
            confirm: false,
            tx: None,
            tx_settled: std::collections::BTreeSet::new(),
            held: VecDeque::new(),
            ended: Vec::new(),
        }
    }

    /// A settle names deliveries this channel has (406 otherwise, as RabbitMQ).
    pub fn check_settle(&self, s: &link::BasicSettle) -> Res<()> {
        if s.multiple && s.delivery_tag == 0 {
            return Ok(());
        }
        let open = |t: &u64| !self.tx_settled.contains(t);
        let known = if s.multiple {
            self.unacked.range(..=s.delivery_tag).any(|(t, _)| open(t))
        } else {
            self.unacked.contains_key(&s.delivery_tag) && open(&s.delivery_tag)
        };
        if known {
            Ok(())
        } else {
            Err(refuse(
                PRECONDITION_FAILED,
                format!("unknown delivery tag {}", s.delivery_tag),
            ))
        }
    }

    /// The delivery tags a settle covers.
    pub fn tags_of(&self, s: &link::BasicSettle) -> Vec<u64> {
        if s.multiple {
            let upto = if s.delivery_tag == 0 {
                u64::MAX
            } else {
                s.delivery_tag
            };
            self.unacked.range(..=upto).map(|(t, _)| *t).collect()
        } else {
            vec![s.delivery_tag]
        }
    }

    /// Deliveries held back for consumer `tag`, taken out.
    pub fn take_held(&mut self, tag: &str) -> Vec<v1::LeasedMessage> {
        let mut out = Vec::new();
        self.held.retain_mut(|(t, m)| {
            if t == tag {
                out.push(std::mem::take(m));
                false
            } else {
                true
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(tag: u64, multiple: bool) -> link::BasicSettle {
        link::BasicSettle {
            delivery_tag: tag,
            multiple,
            ..Default::default()
        }
    }

    fn with_tags(tags: &[u64]) -> Chan {
        let mut c = Chan::new();
        for t in tags {
            c.unacked.insert(
                *t,
                Unacked {
                    queue: "q".into(),
                    lease: format!("l{t}"),
                    consumer: None,
                },
            );
        }
        c
    }

    #[test]
    fn settles_name_known_tags() {
        let c = with_tags(&[2, 3, 5]);
        assert!(c.check_settle(&settle(3, false)).is_ok());
        assert_eq!(
            c.check_settle(&settle(4, false)).unwrap_err().code,
            PRECONDITION_FAILED
        );
        assert!(c.check_settle(&settle(4, true)).is_ok());
        assert!(c.check_settle(&settle(1, true)).is_err());
        assert!(c.check_settle(&settle(0, true)).is_ok());
        assert_eq!(c.tags_of(&settle(4, true)), vec![2, 3]);
        assert_eq!(c.tags_of(&settle(0, true)), vec![2, 3, 5]);
    }
}
