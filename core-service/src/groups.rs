//! Group membership with the semantics of Kafka's classic group protocol: members join,
//! the core elects a leader and a protocol, the leader computes the assignment and hands it
//! back through SyncGroup, heartbeats keep members alive, and any change of membership starts
//! a rebalance. Living in the core means every gateway instance serves the same group.
//!
//! Membership is in memory: after a core restart members find themselves unknown and rejoin,
//! which every client does on UNKNOWN_MEMBER_ID. Committed offsets are durable (streams.rs).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tracing::{debug, info};
use tributary_proto::v1;

use crate::error::{CoreError, CoreResult};

/// How often session timeouts and rebalance deadlines are checked. Kafka's own timers have
/// the same order of granularity; a member is never evicted early, at most this much late.
pub(crate) const GROUP_TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "Empty",
            Self::PreparingRebalance => "PreparingRebalance",
            Self::CompletingRebalance => "CompletingRebalance",
            Self::Stable => "Stable",
        }
    }
}

type JoinReply = oneshot::Sender<CoreResult<v1::JoinGroupResponse>>;
type SyncReply = oneshot::Sender<CoreResult<v1::SyncGroupResponse>>;

struct Member {
    id: String,
    instance_id: String,
    client_id: String,
    client_host: String,
    /// (protocol name, metadata) in the member's order of preference.
    protocols: Vec<(String, Bytes)>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    last_seen: Instant,
    assignment: Bytes,
    /// Set while the member waits in JoinGroup for the rebalance to complete.
    join_reply: Option<JoinReply>,
    /// Set while a follower waits in SyncGroup for the leader's assignment.
    sync_reply: Option<SyncReply>,
}

impl Member {
    /// The member as the API shows it, with its metadata for `protocol`.
    fn to_api(&self, protocol: &str, assignment: Bytes) -> v1::GroupMember {
        v1::GroupMember {
            member_id: self.id.clone(),
            group_instance_id: self.instance_id.clone(),
            client_id: self.client_id.clone(),
            client_host: self.client_host.clone(),
            metadata: self.metadata_for(protocol),
            assignment,
        }
    }

    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

struct Group {
    state: GroupState,
    protocol_type: String,
    protocol: Option<String>,
    generation: i32,
    leader: Option<String>,
    /// In join order: the first member of a new generation leads it.
    members: Vec<Member>,
    /// When PreparingRebalance gives up on members that did not rejoin.
    rebalance_deadline: Option<Instant>,
    /// A rebalance of a group that was empty waits this long for more members (Kafka's
    /// group.initial.rebalance.delay.ms) so that consumers started together share one
    /// generation instead of rebalancing once per arrival.
    initial_wait_until: Option<Instant>,
}

impl Group {
    fn new(protocol_type: &str) -> Self {
        Self {
            state: GroupState::Empty,
            protocol_type: protocol_type.to_string(),
            protocol: None,
            generation: 0,
            leader: None,
            members: Vec::new(),
            rebalance_deadline: None,
            initial_wait_until: None,
        }
    }

    /// Every member with its metadata for `protocol`: what the leader assigns over.
    fn member_list(&self, protocol: &str) -> Vec<v1::GroupMember> {
        self.members
            .iter()
            .map(|m| m.to_api(protocol, Bytes::new()))
            .collect()
    }

    fn member(&mut self, id: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    fn has_member(&self, id: &str) -> bool {
        self.members.iter().any(|m| m.id == id)
    }

    /// Protocols every member supports, in the order of the first member's preference.
    fn common_protocols(&self) -> Vec<String> {
        let Some(first) = self.members.first() else {
            return Vec::new();
        };
        first
            .protocols
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| {
                self.members
                    .iter()
                    .all(|m| m.protocols.iter().any(|(p, _)| p == n))
            })
            .collect()
    }

    /// Each member votes for its most preferred protocol among the common ones.
    fn elect_protocol(&self) -> Option<String> {
        let common = self.common_protocols();
        let mut votes: Vec<(String, usize)> = common.iter().map(|c| (c.clone(), 0)).collect();
        for m in &self.members {
            if let Some((name, _)) = m.protocols.iter().find(|(p, _)| common.contains(p))
                && let Some(v) = votes.iter_mut().find(|(c, _)| c == name)
            {
                v.1 += 1;
            }
        }
        // max_by_key returns the last maximum: iterate reversed so ties go to the first.
        votes
            .into_iter()
            .rev()
            .max_by_key(|(_, n)| *n)
            .map(|(c, _)| c)
    }

    fn start_rebalance(&mut self, now: Instant, initial_delay: Duration) {
        if self.state == GroupState::PreparingRebalance {
            return;
        }
        let was_empty = self.state == GroupState::Empty;
        self.state = GroupState::PreparingRebalance;
        // Followers waiting for an assignment of the old generation must rejoin.
        for m in &mut self.members {
            m.assignment = Bytes::new();
            if let Some(tx) = m.sync_reply.take() {
                let _ = tx.send(Err(CoreError::RebalanceInProgress));
            }
        }
        let timeout = self
            .members
            .iter()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        self.rebalance_deadline = Some(now + timeout);
        self.initial_wait_until = (was_empty && !initial_delay.is_zero())
            .then(|| now + initial_delay.min(timeout.max(Duration::from_millis(1))));
    }

    /// Completes the join phase if every member rejoined (and the initial wait is over).
    fn maybe_complete_join(&mut self, now: Instant) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        if self.initial_wait_until.is_some_and(|t| now < t) {
            return;
        }
        if self.members.iter().all(|m| m.join_reply.is_some()) {
            self.complete_join(now);
        }
    }

    fn complete_join(&mut self, now: Instant) {
        // Members that did not rejoin in time leave the group.
        self.members.retain(|m| m.join_reply.is_some());
        self.generation += 1;
        self.rebalance_deadline = None;
        self.initial_wait_until = None;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol = None;
            self.leader = None;
            return;
        }
        self.protocol = self.elect_protocol();
        let protocol = self.protocol.clone().unwrap_or_default();
        if !self.leader.as_ref().is_some_and(|l| self.has_member(l)) {
            self.leader = Some(self.members[0].id.clone());
        }
        let leader = self.leader.clone().unwrap_or_default();
        self.state = GroupState::CompletingRebalance;
        let all = self.member_list(&protocol);
        let generation = self.generation;
        for m in &mut self.members {
            m.last_seen = now;
            if let Some(tx) = m.join_reply.take() {
                let _ = tx.send(Ok(v1::JoinGroupResponse {
                    generation,
                    protocol_name: protocol.clone(),
                    leader: leader.clone(),
                    member_id: m.id.clone(),
                    members: if m.id == leader {
                        all.clone()
                    } else {
                        Vec::new()
                    },
                }));
            }
        }
    }

    /// Removes members and moves the group on: a rebalance for the rest, or Empty.
    fn remove_members(&mut self, ids: &[String], now: Instant, initial_delay: Duration) {
        for id in ids {
            if let Some(pos) = self.members.iter().position(|m| &m.id == id) {
                let m = self.members.remove(pos);
                if let Some(tx) = m.join_reply {
                    let _ = tx.send(Err(CoreError::UnknownMember(m.id.clone())));
                }
                if let Some(tx) = m.sync_reply {
                    let _ = tx.send(Err(CoreError::UnknownMember(m.id.clone())));
                }
            }
        }
        if self.members.is_empty() {
            if self.state != GroupState::Empty {
                // Like Kafka, the generation moves on so that stale commits are refused.
                self.generation += 1;
            }
            self.state = GroupState::Empty;
            self.protocol = None;
            self.leader = None;
            self.rebalance_deadline = None;
            self.initial_wait_until = None;
            return;
        }
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.start_rebalance(now, initial_delay)
            }
            GroupState::PreparingRebalance => self.maybe_complete_join(now),
            GroupState::Empty => {}
        }
    }
}

/// All groups of all namespaces, keyed by (namespace, group).
pub(crate) struct GroupTable {
    groups: Mutex<HashMap<(String, String), Group>>,
    /// Member leases (client-side rebalancing, RocketMQ): see member_leases.rs.
    pub(crate) leases: crate::member_leases::MemberLeases,
    initial_delay: Duration,
}

/// What the core needs to know to accept an offset commit from a group member.
pub(crate) enum CommitCheck {
    Accept,
    Refuse(CoreError),
}

impl GroupTable {
    pub(crate) fn new(initial_delay: Duration) -> Self {
        Self {
            groups: Mutex::new(HashMap::new()),
            leases: Default::default(),
            initial_delay,
        }
    }

    pub(crate) async fn join(
        &self,
        ns: &str,
        req: v1::JoinGroupRequest,
    ) -> CoreResult<v1::JoinGroupResponse> {
        if req.protocols.is_empty() {
            return Err(CoreError::InconsistentGroupProtocol(
                "a member must offer at least one protocol".into(),
            ));
        }
        if req.session_timeout_ms <= 0 {
            return Err(CoreError::InvalidArgument(format!(
                "session timeout must be positive, got {} ms",
                req.session_timeout_ms
            )));
        }
        let member_id = if req.member_id.is_empty() {
            new_member_id(&req.client_id)
        } else {
            req.member_id.clone()
        };
        let protocols: Vec<(String, Bytes)> = req
            .protocols
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        let session_timeout = Duration::from_millis(req.session_timeout_ms as u64);
        let rebalance_timeout = if req.rebalance_timeout_ms > 0 {
            Duration::from_millis(req.rebalance_timeout_ms as u64)
        } else {
            session_timeout
        };
        let now = Instant::now();
        let rx = {
            let mut groups = self.groups.lock();
            let group = groups
                .entry((ns.to_string(), req.group.clone()))
                .or_insert_with(|| Group::new(&req.protocol_type));
            if group.state == GroupState::Empty {
                group.protocol_type = req.protocol_type.clone();
            } else {
                if group.protocol_type != req.protocol_type {
                    return Err(CoreError::InconsistentGroupProtocol(format!(
                        "group uses protocol type '{}', member offered '{}'",
                        group.protocol_type, req.protocol_type
                    )));
                }
                let others_support = |name: &str| {
                    group
                        .members
                        .iter()
                        .filter(|m| m.id != member_id)
                        .all(|m| m.protocols.iter().any(|(p, _)| p == name))
                };
                if !protocols.iter().any(|(n, _)| others_support(n)) {
                    return Err(CoreError::InconsistentGroupProtocol(
                        "none of the member's protocols is supported by every other member".into(),
                    ));
                }
            }
            let (tx, rx) = oneshot::channel();
            let is_leader = group.leader.as_deref() == Some(member_id.as_str());
            let state = group.state;
            let generation = group.generation;
            let current_protocol = group.protocol.clone();
            let leader = group.leader.clone().unwrap_or_default();
            match group.member(&member_id) {
                Some(m)
                    if (state == GroupState::Stable && !is_leader
                        || state == GroupState::CompletingRebalance)
                        && m.protocols == protocols =>
                {
                    // Same member, same metadata, nothing to rebalance: tell it the current
                    // generation again, the leader with the member list it must assign.
                    m.last_seen = now;
                    let protocol = current_protocol.unwrap_or_default();
                    let members = if is_leader {
                        group.member_list(&protocol)
                    } else {
                        Vec::new()
                    };
                    return Ok(v1::JoinGroupResponse {
                        generation,
                        protocol_name: protocol,
                        leader,
                        member_id,
                        members,
                    });
                }
                Some(m) => {
                    m.protocols = protocols;
                    m.session_timeout = session_timeout;
                    m.rebalance_timeout = rebalance_timeout;
                    m.last_seen = now;
                    if let Some(old) = m.join_reply.replace(tx) {
                        let _ = old.send(Err(CoreError::RebalanceInProgress));
                    }
                }
                None => group.members.push(Member {
                    id: member_id.clone(),
                    instance_id: req.group_instance_id.clone(),
                    client_id: req.client_id.clone(),
                    client_host: req.client_host.clone(),
                    protocols,
                    session_timeout,
                    rebalance_timeout,
                    last_seen: now,
                    assignment: Bytes::new(),
                    join_reply: Some(tx),
                    sync_reply: None,
                }),
            }
            group.start_rebalance(now, self.initial_delay);
            // A member joining late extends the wait to its own rebalance timeout.
            let deadline = now + rebalance_timeout;
            if group.rebalance_deadline.is_none_or(|d| d < deadline) {
                group.rebalance_deadline = Some(deadline);
            }
            group.maybe_complete_join(now);
            debug!(group = %req.group, member = %member_id, "member joining");
            rx
        };
        rx.await
            .unwrap_or_else(|_| Err(CoreError::RebalanceInProgress))
    }

    pub(crate) async fn sync(
        &self,
        ns: &str,
        req: v1::SyncGroupRequest,
    ) -> CoreResult<v1::SyncGroupResponse> {
        let now = Instant::now();
        let rx = {
            let mut groups = self.groups.lock();
            let Some(group) = groups.get_mut(&(ns.to_string(), req.group.clone())) else {
                return Err(CoreError::UnknownMember(req.member_id));
            };
            if !group.has_member(&req.member_id) {
                return Err(CoreError::UnknownMember(req.member_id));
            }
            if req.generation != group.generation {
                return Err(CoreError::IllegalGeneration {
                    got: req.generation,
                    current: group.generation,
                });
            }
            let protocol = group.protocol.clone().unwrap_or_default();
            match group.state {
                GroupState::Empty => return Err(CoreError::UnknownMember(req.member_id)),
                GroupState::PreparingRebalance => return Err(CoreError::RebalanceInProgress),
                GroupState::Stable => {
                    let m = group.member(&req.member_id).expect("checked above");
                    m.last_seen = now;
                    return Ok(v1::SyncGroupResponse {
                        assignment: m.assignment.clone(),
                        protocol_name: protocol,
                    });
                }
                GroupState::CompletingRebalance => {}
            }
            if group.leader.as_deref() == Some(req.member_id.as_str()) {
                for m in &mut group.members {
                    m.assignment = req
                        .assignments
                        .iter()
                        .find(|a| a.member_id == m.id)
                        .map(|a| a.assignment.clone())
                        .unwrap_or_default();
                    if let Some(tx) = m.sync_reply.take() {
                        let _ = tx.send(Ok(v1::SyncGroupResponse {
                            assignment: m.assignment.clone(),
                            protocol_name: protocol.clone(),
                        }));
                    }
                }
                group.state = GroupState::Stable;
                info!(group = %req.group, generation = group.generation, members = group.members.len(), "group stable");
                let m = group.member(&req.member_id).expect("checked above");
                m.last_seen = now;
                return Ok(v1::SyncGroupResponse {
                    assignment: m.assignment.clone(),
                    protocol_name: protocol,
                });
            }
            let (tx, rx) = oneshot::channel();
            let m = group.member(&req.member_id).expect("checked above");
            m.last_seen = now;
            if let Some(old) = m.sync_reply.replace(tx) {
                let _ = old.send(Err(CoreError::RebalanceInProgress));
            }
            rx
        };
        rx.await
            .unwrap_or_else(|_| Err(CoreError::RebalanceInProgress))
    }

    pub(crate) fn heartbeat(
        &self,
        ns: &str,
        req: &v1::HeartbeatRequest,
    ) -> CoreResult<v1::HeartbeatResponse> {
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(&(ns.to_string(), req.group.clone())) else {
            return Err(CoreError::UnknownMember(req.member_id.clone()));
        };
        let state = group.state;
        let generation = group.generation;
        let Some(m) = group.member(&req.member_id) else {
            return Err(CoreError::UnknownMember(req.member_id.clone()));
        };
        m.last_seen = Instant::now();
        if state == GroupState::PreparingRebalance {
            return Ok(v1::HeartbeatResponse {
                rebalance_in_progress: true,
            });
        }
        if req.generation != generation {
            return Err(CoreError::IllegalGeneration {
                got: req.generation,
                current: generation,
            });
        }
        Ok(v1::HeartbeatResponse {
            rebalance_in_progress: false,
        })
    }

    pub(crate) fn leave(&self, ns: &str, group: &str, member_ids: &[String]) -> Vec<String> {
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(&(ns.to_string(), group.to_string())) else {
            return member_ids.to_vec();
        };
        let unknown: Vec<String> = member_ids
            .iter()
            .filter(|id| !g.has_member(id))
            .cloned()
            .collect();
        let known: Vec<String> = member_ids
            .iter()
            .filter(|id| g.has_member(id))
            .cloned()
            .collect();
        if !known.is_empty() {
            info!(group, members = ?known, "members left");
            g.remove_members(&known, Instant::now(), self.initial_delay);
        }
        unknown
    }

    /// Evicts members whose session timed out and ends join phases whose time is up.
    pub(crate) fn tick(&self) {
        self.leases.sweep();
        let now = Instant::now();
        let mut groups = self.groups.lock();
        for ((_, name), g) in groups.iter_mut() {
            let expired: Vec<String> = g
                .members
                .iter()
                .filter(|m| {
                    m.join_reply.is_none() && now.duration_since(m.last_seen) > m.session_timeout
                })
                .map(|m| m.id.clone())
                .collect();
            if !expired.is_empty() {
                info!(group = %name, members = ?expired, "session timeout: members removed");
                g.remove_members(&expired, now, self.initial_delay);
            }
            if g.state == GroupState::PreparingRebalance {
                if g.rebalance_deadline.is_some_and(|d| now >= d) {
                    g.complete_join(now);
                } else {
                    g.maybe_complete_join(now);
                }
            }
        }
    }

    pub(crate) fn describe(&self, ns: &str, group: &str) -> Option<v1::DescribeGroupResponse> {
        let groups = self.groups.lock();
        let g = groups.get(&(ns.to_string(), group.to_string()))?;
        let protocol = g.protocol.clone().unwrap_or_default();
        Some(v1::DescribeGroupResponse {
            state: g.state.name().into(),
            protocol_type: g.protocol_type.clone(),
            protocol_name: protocol.clone(),
            generation: g.generation,
            members: g
                .members
                .iter()
                .map(|m| m.to_api(&protocol, m.assignment.clone()))
                .collect(),
        })
    }

    /// (group, state, protocol type) of every group with live membership in `ns`.
    pub(crate) fn list(&self, ns: &str) -> Vec<(String, GroupState, String)> {
        self.groups
            .lock()
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|((_, g), group)| (g.clone(), group.state, group.protocol_type.clone()))
            .collect()
    }

    /// Forgets an empty group's membership; refuses when it still has members.
    pub(crate) fn remove_if_empty(&self, ns: &str, group: &str) -> CoreResult<bool> {
        let mut groups = self.groups.lock();
        let key = (ns.to_string(), group.to_string());
        match groups.get(&key) {
            Some(g) if !g.members.is_empty() => Err(CoreError::GroupNotEmpty(group.to_string())),
            Some(_) => {
                groups.remove(&key);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Kafka's rules for accepting an offset commit from (member, generation).
    pub(crate) fn check_commit(
        &self,
        ns: &str,
        group: &str,
        member_id: &str,
        generation: i32,
    ) -> CommitCheck {
        let groups = self.groups.lock();
        let Some(g) = groups.get(&(ns.to_string(), group.to_string())) else {
            // No live membership: only a commit outside any generation is accepted.
            return if generation < 0 {
                CommitCheck::Accept
            } else {
                CommitCheck::Refuse(CoreError::IllegalGeneration {
                    got: generation,
                    current: 0,
                })
            };
        };
        if generation < 0 && g.state == GroupState::Empty {
            return CommitCheck::Accept;
        }
        if g.state == GroupState::CompletingRebalance {
            return CommitCheck::Refuse(CoreError::RebalanceInProgress);
        }
        if !g.has_member(member_id) {
            return CommitCheck::Refuse(CoreError::UnknownMember(member_id.to_string()));
        }
        if generation != g.generation {
            return CommitCheck::Refuse(CoreError::IllegalGeneration {
                got: generation,
                current: g.generation,
            });
        }
        CommitCheck::Accept
    }
}

fn new_member_id(client_id: &str) -> String {
    let client = if client_id.is_empty() {
        "member"
    } else {
        client_id
    };
    format!("{client}-{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join_req(group: &str, member: &str, protos: &[&str]) -> v1::JoinGroupRequest {
        v1::JoinGroupRequest {
            group: group.into(),
            member_id: member.into(),
            protocol_type: "consumer".into(),
            protocols: protos
                .iter()
                .map(|p| v1::Header {
                    name: (*p).into(),
                    value: Bytes::from(format!("meta-{member}-{p}")),
                })
                .collect(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 10_000,
            client_id: "c".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn two_members_share_one_generation_and_get_the_leaders_assignment() {
        let t = std::sync::Arc::new(GroupTable::new(Duration::ZERO));
        let a = t.join("ns", join_req("g", "a", &["range"])).await.unwrap();
        assert_eq!(a.generation, 1);
        assert_eq!(a.leader, "a");
        assert_eq!(a.members.len(), 1);
        t.sync(
            "ns",
            v1::SyncGroupRequest {
                group: "g".into(),
                member_id: "a".into(),
                generation: 1,
                assignments: vec![v1::GroupMember {
                    member_id: "a".into(),
                    assignment: Bytes::from_static(b"all"),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // b joins: a learns of the rebalance by heartbeat and rejoins.
        let t2 = t.clone();
        let b =
            tokio::spawn(async move { t2.join("ns", join_req("g", "b", &["range", "rr"])).await });
        let hb = loop {
            let hb = t
                .heartbeat(
                    "ns",
                    &v1::HeartbeatRequest {
                        group: "g".into(),
                        member_id: "a".into(),
                        generation: 1,
                        ..Default::default()
                    },
                )
                .unwrap();
            if hb.rebalance_in_progress {
                break hb;
            }
            tokio::task::yield_now().await;
        };
        assert!(hb.rebalance_in_progress);
        let a2 = t.join("ns", join_req("g", "a", &["range"])).await.unwrap();
        let b = b.await.unwrap().unwrap();
        assert_eq!(a2.generation, 2);
        assert_eq!(b.generation, 2);
        assert_eq!(a2.protocol_name, "range");
        assert_eq!(a2.leader, "a");
        assert_eq!(a2.members.len(), 2);
        assert!(b.members.is_empty());
        // The follower waits for the leader's SyncGroup.
        let t3 = t.clone();
        let bs = tokio::spawn(async move {
            t3.sync(
                "ns",
                v1::SyncGroupRequest {
                    group: "g".into(),
                    member_id: "b".into(),
                    generation: 2,
                    ..Default::default()
                },
            )
            .await
        });
        tokio::task::yield_now().await;
        t.sync(
            "ns",
            v1::SyncGroupRequest {
                group: "g".into(),
                member_id: "a".into(),
                generation: 2,
                assignments: vec![
                    v1::GroupMember {
                        member_id: "a".into(),
                        assignment: Bytes::from_static(b"p0"),
                        ..Default::default()
                    },
                    v1::GroupMember {
                        member_id: "b".into(),
                        assignment: Bytes::from_static(b"p1"),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(&bs.await.unwrap().unwrap().assignment[..], b"p1");
        assert!(matches!(
            t.check_commit("ns", "g", "b", 1),
            CommitCheck::Refuse(CoreError::IllegalGeneration { .. })
        ));
        assert!(matches!(
            t.check_commit("ns", "g", "b", 2),
            CommitCheck::Accept
        ));
        assert!(matches!(
            t.check_commit("ns", "g", "zz", 2),
            CommitCheck::Refuse(CoreError::UnknownMember(_))
        ));
        // b leaves: a is told to rebalance; the group then runs with a alone.
        assert!(t.leave("ns", "g", &["b".into(), "nobody".into()]) == vec!["nobody".to_string()]);
        assert_eq!(t.describe("ns", "g").unwrap().state, "PreparingRebalance");
        assert!(matches!(
            t.remove_if_empty("ns", "g"),
            Err(CoreError::GroupNotEmpty(_))
        ));
    }

    #[tokio::test]
    async fn a_member_without_heartbeats_is_evicted() {
        let t = GroupTable::new(Duration::ZERO);
        let mut req = join_req("g", "a", &["range"]);
        req.session_timeout_ms = 1;
        t.join("ns", req).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        t.tick();
        let d = t.describe("ns", "g").unwrap();
        assert_eq!(d.state, "Empty");
        assert!(d.members.is_empty());
        assert!(matches!(
            t.heartbeat(
                "ns",
                &v1::HeartbeatRequest {
                    group: "g".into(),
                    member_id: "a".into(),
                    generation: 1,
                    ..Default::default()
                }
            ),
            Err(CoreError::UnknownMember(_))
        ));
    }

    #[tokio::test]
    async fn members_without_a_common_protocol_are_refused() {
        let t = GroupTable::new(Duration::ZERO);
        t.join("ns", join_req("g", "a", &["range"])).await.unwrap();
        let err = t
            .join("ns", join_req("g", "b", &["sticky"]))
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::InconsistentGroupProtocol(_)));
    }
}
