//! A fleet of Kafka gateways seen by clients as one Kafka cluster.
//!
//! Every gateway serves every partition (the data is in the core), so "leadership" here only
//! spreads clients over the gateways. Each gateway started with a broker id registers itself
//! in the core as a member of one group (a member lease, renewed every [`RENEW`]); Metadata,
//! FindCoordinator and DescribeCluster answer with the live members as the brokers, each
//! partition and coordinator key given to one of them by a hash. A gateway that stops is
//! dropped from the answers [`TTL`] after its last renewal, so clients' next metadata refresh
//! moves its partitions to the others; a client still sending to an old leader is served
//! anyway, never answered NOT_LEADER.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use tributary_gateway_common::CoreClient;
use tributary_proto::v1;

/// How long a gateway stays listed after its last renewal.
pub const TTL: Duration = Duration::from_secs(10);
/// How often a gateway renews its registration (a third of the TTL: two may fail).
const RENEW: Duration = Duration::from_secs(3);
const PROTOCOL_TYPE: &str = "kafka-broker";

/// One broker as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub id: i32,
    pub host: String,
    pub port: i32,
}

/// This gateway's place in the fleet.
pub struct Fleet {
    me: Broker,
    /// The core namespace the registrations live in.
    namespace: String,
    /// The group of this listener kind: clients of a TLS listener are given TLS addresses.
    group: String,
    /// Sorted by id; always holds `me`.
    brokers: RwLock<Vec<Broker>>,
}

impl Fleet {
    pub fn new(me: Broker, namespace: String, listener: &str) -> Self {
        Self {
            brokers: RwLock::new(vec![me.clone()]),
            me,
            namespace,
            group: format!("kafka-brokers-{listener}"),
        }
    }

    pub fn me(&self) -> &Broker {
        &self.me
    }

    /// This broker's member id in the core: its id, zero-padded so members sort by id.
    fn member_id(&self) -> String {
        format!("{:010}", self.me.id)
    }

    /// The brokers to list, sorted by id.
    pub fn brokers(&self) -> Vec<Broker> {
        self.brokers.read().clone()
    }

    /// The broker given `key` (a topic and partition, or a coordinator key).
    pub fn owner(&self, key: &[u8]) -> Broker {
        let brokers = self.brokers.read();
        brokers[(fnv1a(key) % brokers.len() as u64) as usize].clone()
    }

    /// The partition's leader: partitions of one topic go round the brokers from a point
    /// the topic's name picks, so several topics do not all start on the first broker.
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        let brokers = self.brokers.read();
        let start = fnv1a(topic.as_bytes()) as usize;
        brokers[start.wrapping_add(partition as usize) % brokers.len()].id
    }

    fn set(&self, members: &[v1::GroupMember]) {
        let mut list: Vec<Broker> = members
            .iter()
            .filter_map(|m| {
                let id: i32 = m.member_id.parse().ok()?;
                let addr = std::str::from_utf8(&m.metadata).ok()?;
                let (host, port) = addr.rsplit_once(':')?;
                Some(Broker {
                    id,
                    host: host.to_string(),
                    port: port.parse().ok()?,
                })
            })
            .filter(|b| b.id != self.me.id)
            .collect();
        list.push(self.me.clone());
        list.sort_by_key(|b| b.id);
        let mut current = self.brokers.write();
        if *current != list {
            info!(brokers = ?list.iter().map(|b| b.id).collect::<Vec<_>>(), "Kafka brokers in the fleet");
            *current = list;
        }
    }

    /// Registers this gateway and keeps the broker list fresh until `stop`, then takes the
    /// registration back so the others stop listing this gateway at once.
    pub fn spawn(
        self: &Arc<Self>,
        core: CoreClient,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let fleet = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                let req = v1::RegisterMemberRequest {
                    namespace: fleet.namespace.clone(),
                    group: fleet.group.clone(),
                    member_id: fleet.member_id(),
                    client_host: fleet.me.host.clone(),
                    metadata: format!("{}:{}", fleet.me.host, fleet.me.port).into(),
                    ttl_ms: TTL.as_millis() as i32,
                    protocol_type: PROTOCOL_TYPE.into(),
                };
                match core.groups.clone().register_member(req).await {
                    Ok(r) => {
                        if failing {
                            info!("Kafka broker registration succeeds again");
                            failing = false;
                        }
                        fleet.set(&r.into_inner().members);
                    }
                    Err(s) => {
                        // Registrations are in the core's memory: after a core restart or
                        // a takeover they come back within one renewal.
                        if !failing {
                            warn!(error = %s.message(), "cannot register this Kafka broker in the core; listing the last brokers known");
                            failing = true;
                        } else {
                            debug!(error = %s.message(), "Kafka broker registration failed");
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(RENEW) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            let mut groups = core.groups.clone();
            let leave = groups.unregister_member(v1::UnregisterMemberRequest {
                namespace: fleet.namespace.clone(),
                group: fleet.group.clone(),
                member_id: fleet.member_id(),
                protocol_type: PROTOCOL_TYPE.into(),
            });
            if let Ok(Err(s)) = tokio::time::timeout(Duration::from_secs(1), leave).await {
                debug!(error = %s.message(), "Kafka broker not unregistered; it expires by itself");
            }
        })
    }
}

/// 64-bit FNV-1a: stable across processes and versions, so every gateway of a fleet hashes
/// a key to the same broker.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: i32, addr: &str) -> v1::GroupMember {
        v1::GroupMember {
            member_id: format!("{id:010}"),
            metadata: addr.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    fn fleet() -> Fleet {
        Fleet::new(
            Broker {
                id: 2,
                host: "10.0.0.2".into(),
                port: 9092,
            },
            "default".into(),
            "plain",
        )
    }

    #[test]
    fn the_list_is_the_members_and_always_this_broker() {
        let f = fleet();
        assert_eq!(f.brokers(), vec![f.me().clone()]);
        f.set(&[
            member(3, "10.0.0.3:9092"),
            member(1, "h1:9093"),
            member(9, "junk"),
        ]);
        let ids: Vec<i32> = f.brokers().iter().map(|b| b.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(f.brokers()[0].host, "h1");
        assert_eq!(f.brokers()[0].port, 9093);
        // This broker missing from the members (a core that just restarted): still listed.
        f.set(&[member(3, "10.0.0.3:9092")]);
        let ids: Vec<i32> = f.brokers().iter().map(|b| b.id).collect();
        assert_eq!(ids, [2, 3]);
    }

    #[test]
    fn partitions_spread_over_every_broker_and_agree_across_gateways() {
        let a = fleet();
        let b = Fleet::new(
            Broker {
                id: 1,
                host: "h1".into(),
                port: 9093,
            },
            "default".into(),
            "plain",
        );
        a.set(&[member(1, "h1:9093"), member(3, "h3:9092")]);
        b.set(&[member(2, "10.0.0.2:9092"), member(3, "h3:9092")]);
        let leaders: std::collections::BTreeSet<i32> =
            (0..6).map(|p| a.leader("orders", p)).collect();
        assert_eq!(leaders.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
        for p in 0..12 {
            assert_eq!(a.leader("orders", p), b.leader("orders", p));
        }
        assert_eq!(a.owner(b"group-x"), b.owner(b"group-x"));
    }
}
