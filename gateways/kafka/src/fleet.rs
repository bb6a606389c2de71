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
//!
//! In a cluster serving shards, a gateway started beside a core node (`kafka_broker_node`)
//! gives that node as its registration's client id, and every gateway reads which node
//! serves which shard every [`SHARDS_REFRESH`] (`Cluster.DescribeShards`). A partition's
//! leader is then one of the gateways beside the node serving the partition's shard, and a
//! coordinator one beside the node serving the namespace's home shard, so clients' requests
//! reach the node holding the data without crossing to another machine, and leadership moves
//! when a shard does. Where no gateway runs beside that node, the hash over all of them
//! stands.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use tributary_gateway_common::CoreClient;
use tributary_proto::placement::{Scheme, fnv1a, shard_of_unit, stream_unit};
use tributary_proto::v1;

/// How long a gateway stays listed after its last renewal.
pub const TTL: Duration = Duration::from_secs(10);
/// How often a gateway renews its registration (a third of the TTL: two may fail).
const RENEW: Duration = Duration::from_secs(3);
const PROTOCOL_TYPE: &str = "kafka-broker";
/// How often a gateway reads which node serves which shard (a node's view of it changes
/// once per lease round, at least every second).
const SHARDS_REFRESH: Duration = Duration::from_secs(1);
/// How long one reading of the shards' owners may take.
const SHARDS_ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// A gateway's place in a fleet, as configured.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `kafka_broker_id`.
    pub broker_id: i32,
    /// The listener kind its registration is grouped under (`plain` or `tls`).
    pub listener: &'static str,
    /// `kafka_broker_node`: the core node it runs beside.
    pub node: Option<String>,
}

/// One broker as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub id: i32,
    pub host: String,
    pub port: i32,
    /// The core node it runs beside, if it said (never shown to clients).
    pub node: Option<String>,
}

impl Broker {
    /// Reads a member of the fleet's group: `host:port` in its metadata, its node (if any)
    /// as its client id.
    fn from_member(m: &v1::GroupMember) -> Option<Self> {
        let id = m.member_id.parse().ok()?;
        let (host, port) = std::str::from_utf8(&m.metadata).ok()?.rsplit_once(':')?;
        Some(Broker {
            id,
            host: host.to_string(),
            port: port.parse().ok()?,
            node: Some(m.client_id.clone()).filter(|n| !n.is_empty()),
        })
    }
}

/// Which node serves which shard, as a core node last said.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShardMap {
    scheme: Scheme,
    /// `owners[s]`: the node serving shard `s`, empty while nobody does.
    owners: Vec<String>,
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
    /// `None` unless the core is a cluster serving shards.
    shards: RwLock<Option<ShardMap>>,
}

impl Fleet {
    pub fn new(me: Broker, namespace: String, listener: &str) -> Self {
        Self {
            brokers: RwLock::new(vec![me.clone()]),
            shards: RwLock::new(None),
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

    /// The broker given a coordinator `key` (a group or transactional id): groups and
    /// transactions live in the namespace's home shard.
    pub fn owner(&self, key: &[u8]) -> Broker {
        let brokers = self.brokers.read();
        let pool = self.beside_owner(None, &brokers);
        pool[(fnv1a(key) % pool.len() as u64) as usize].clone()
    }

    /// The partition's leader: partitions of one topic go round the brokers from a point
    /// the topic's name picks, so several topics do not all start on the first broker.
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        let brokers = self.brokers.read();
        let pool = self.beside_owner(Some(&stream_unit(topic)), &brokers);
        let start = fnv1a(topic.as_bytes()) as usize;
        pool[start.wrapping_add(partition as usize) % pool.len()].id
    }

    /// The brokers beside the node serving `unit`'s shard (the namespace's home for `None`),
    /// or all of them when none is, or the shards are unknown. Never empty.
    fn beside_owner<'a>(&self, unit: Option<&str>, brokers: &'a [Broker]) -> Vec<&'a Broker> {
        if let Some(map) = &*self.shards.read() {
            let shards = map.owners.len() as u32;
            let shard = shard_of_unit(map.scheme, &self.namespace, unit, shards);
            let owner = &map.owners[shard as usize];
            let beside: Vec<&Broker> = brokers
                .iter()
                .filter(|b| !owner.is_empty() && b.node.as_deref() == Some(owner.as_str()))
                .collect();
            if !beside.is_empty() {
                return beside;
            }
        }
        brokers.iter().collect()
    }

    /// Takes a core node's answer to `DescribeShards`.
    fn set_shards(&self, answer: Option<v1::DescribeShardsResponse>) {
        let map = answer.and_then(|a| {
            let scheme = Scheme::parse(&a.scheme)?;
            (a.shards > 0 && a.owners.len() == a.shards as usize).then_some(ShardMap {
                scheme,
                owners: a.owners,
            })
        });
        let mut current = self.shards.write();
        if *current != map {
            match (&map, &self.me.node) {
                (Some(m), Some(node)) if !m.owners.contains(node) => {
                    // A node that is down or still joining, or a misspelt name.
                    warn!(owners = ?m.owners, node = %node, "Kafka leaders follow the shards' owners; this gateway's kafka_broker_node serves no shard, so it leads nothing")
                }
                (Some(m), _) => {
                    info!(owners = ?m.owners, "Kafka leaders follow the shards' owners")
                }
                (None, _) => info!("Kafka leaders spread by a hash: the core serves no shards"),
            }
            *current = map;
        }
    }

    fn set(&self, members: &[v1::GroupMember]) {
        let mut list: Vec<Broker> = members
            .iter()
            .filter_map(Broker::from_member)
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

    /// Reads which node serves which shard; keeps the last map when the core cannot say.
    async fn refresh_shards(&self, core: &CoreClient) {
        let mut cluster = core.cluster.clone();
        let ask = cluster.describe_shards(v1::DescribeShardsRequest {});
        // Longer than the client takes to give up on a node (2 s to connect, 2 s of silence),
        // so that a dead node's error moves the client to the next one rather than this
        // timeout cutting the call short each time.
        match tokio::time::timeout(SHARDS_ASK_TIMEOUT, ask).await {
            Ok(Ok(r)) => self.set_shards(Some(r.into_inner())),
            // A node older than the call (during an upgrade, say) or one that does not
            // answer: the last map stands rather than leaders flapping to the hash and back.
            Ok(Err(s)) => {
                debug!(error = %s.message(), "cannot read the shards' owners; keeping the last")
            }
            Err(_) => debug!("no answer about the shards' owners; keeping the last"),
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
        // The owners are read apart from the registration, and more often: a node's view of
        // them changes once per lease round, and a registration stuck on a dead node must not
        // hold the leaders back.
        let shards = {
            let (fleet, core, mut stop) = (fleet.clone(), core.clone(), stop.clone());
            async move {
                loop {
                    // Without a gateway beside a node the owners choose nothing: no call.
                    let beside_nodes = fleet.brokers.read().iter().any(|b| b.node.is_some());
                    if beside_nodes {
                        fleet.refresh_shards(&core).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(SHARDS_REFRESH) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
            }
        };
        let shards = tokio::spawn(shards);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                let req = v1::RegisterMemberRequest {
                    namespace: fleet.namespace.clone(),
                    group: fleet.group.clone(),
                    member_id: fleet.member_id(),
                    client_host: fleet.me.host.clone(),
                    metadata: format!("{}:{}", fleet.me.host, fleet.me.port).into(),
                    client_id: fleet.me.node.clone().unwrap_or_default(),
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
            shards.abort();
        })
    }
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
                node: None,
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
                node: None,
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

    fn shard_map(scheme: &str, owners: &[&str]) -> Option<v1::DescribeShardsResponse> {
        Some(v1::DescribeShardsResponse {
            shards: owners.len() as u32,
            scheme: scheme.into(),
            owners: owners.iter().map(|o| o.to_string()).collect(),
            node: "n1".into(),
        })
    }

    fn member_beside(id: i32, addr: &str, node: &str) -> v1::GroupMember {
        v1::GroupMember {
            client_id: node.into(),
            ..member(id, addr)
        }
    }

    #[test]
    fn leaders_and_coordinators_follow_the_node_serving_the_shard() {
        let f = fleet();
        f.set(&[
            member_beside(1, "h1:9092", "n1"),
            member_beside(3, "h3:9092", "n3"),
            member_beside(5, "h5:9092", "n3"),
        ]);
        assert_eq!(f.brokers()[0].node.as_deref(), Some("n1"));
        let ns = "default";
        let shard =
            |topic: &str| shard_of_unit(Scheme::Stream, ns, Some(&stream_unit(topic)), 4) as usize;
        // Under the stream scheme each topic's partitions go to the gateways beside its
        // shard's node: n1 serves shards 0 and 1, n3 shards 2 and 3.
        f.set_shards(shard_map("stream", &["n1", "n1", "n3", "n3"]));
        let topics: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        let mut on_n3 = std::collections::BTreeSet::new();
        for t in &topics {
            for p in 0..4 {
                let leader = f.leader(t, p);
                if shard(t) < 2 {
                    assert_eq!(leader, 1, "{t}/{p}");
                } else {
                    assert!([3, 5].contains(&leader), "{t}/{p}: {leader}");
                    on_n3.insert(leader);
                }
            }
        }
        assert_eq!(
            on_n3.into_iter().collect::<Vec<_>>(),
            [3, 5],
            "both gateways on n3 lead"
        );
        // Coordinators live at the namespace's home shard.
        let home = shard_of_unit(Scheme::Stream, ns, None, 4);
        let expected: &[i32] = if home < 2 { &[1] } else { &[3, 5] };
        assert!(expected.contains(&f.owner(b"group-x").id));

        // The shard moves (its node died): its partitions follow the new owner.
        let t = topics.iter().find(|t| shard(t) >= 2).unwrap();
        f.set_shards(shard_map("stream", &["n1", "n1", "n1", "n1"]));
        assert_eq!(f.leader(t, 0), 1);
        // Nobody beside the owner (a node without a gateway), or no owner: the hash over all.
        f.set_shards(shard_map("stream", &["n9", "", "n9", ""]));
        let all: std::collections::BTreeSet<i32> = topics.iter().map(|t| f.leader(t, 0)).collect();
        assert_eq!(all.into_iter().collect::<Vec<_>>(), [1, 2, 3, 5]);
        // The namespace scheme: every topic of the namespace at its home.
        f.set_shards(shard_map("namespace", &["n1", "n3", "n1", "n3"]));
        let home_node = if shard_of_unit(Scheme::Namespace, ns, None, 4).is_multiple_of(2) {
            vec![1]
        } else {
            vec![3, 5]
        };
        for t in &topics {
            assert!(home_node.contains(&f.leader(t, 1)), "{t}");
        }
        // A core that serves no shards: the hash again.
        f.set_shards(Some(v1::DescribeShardsResponse::default()));
        assert!(f.shards.read().is_none());
    }
}
