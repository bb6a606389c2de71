//! The queue state against a model: random enqueue (with priorities, some above the
//! queue's maximum, and transient records), lease, ack, nack, change-lease, time passing,
//! snapshots and restarts (a replay of every journal op written so far, after which the
//! transient messages are gone).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelPhase {
    Ready,
    Leased { seq: u64, deadline: i64 },
    Delayed { until: i64 },
    Done,
}

#[derive(Debug, Default)]
struct Model {
    msgs: BTreeMap<i64, (ModelPhase, u32)>,
    /// Each message's level: its priority clamped to the queue's maximum (0 without
    /// priorities).
    level: BTreeMap<i64, u8>,
    transient: BTreeSet<i64>,
    next_seq: u64,
}

impl Model {
    fn tick(&mut self, now: i64) {
        for (phase, _) in self.msgs.values_mut() {
            match *phase {
                ModelPhase::Leased { deadline, .. } if deadline <= now => {
                    *phase = ModelPhase::Ready
                }
                ModelPhase::Delayed { until } if until <= now => *phase = ModelPhase::Ready,
                _ => {}
            }
        }
    }
    /// Ready messages go out by level (highest first), then by offset.
    fn lease(&mut self, now: i64, max: usize, vis: i64) -> Vec<(i64, u64, u32)> {
        self.tick(now);
        let mut ready: Vec<(Reverse<u8>, i64)> = self
            .msgs
            .iter()
            .filter(|(_, (p, _))| *p == ModelPhase::Ready)
            .map(|(o, _)| (Reverse(self.level[o]), *o))
            .collect();
        ready.sort_unstable();
        let mut out = Vec::new();
        for (_, offset) in ready.into_iter().take(max) {
            let (phase, count) = self.msgs.get_mut(&offset).unwrap();
            self.next_seq += 1;
            *count += 1;
            *phase = ModelPhase::Leased {
                seq: self.next_seq,
                deadline: now + vis,
            };
            out.push((offset, self.next_seq, *count));
        }
        out
    }
    /// A restart: every transient message not yet settled is gone.
    fn restart(&mut self) {
        for o in &self.transient {
            if let Some((p, _)) = self.msgs.get_mut(o) {
                *p = ModelPhase::Done;
            }
        }
    }
    fn holds(&self, now: i64, offset: i64, seq: u64) -> bool {
        matches!(self.msgs.get(&offset), Some((ModelPhase::Leased { seq: s, deadline }, _)) if *s == seq && *deadline > now)
    }
    fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for (p, _) in self.msgs.values() {
            match p {
                ModelPhase::Ready => c.0 += 1,
                ModelPhase::Leased { .. } => c.1 += 1,
                ModelPhase::Delayed { .. } => c.2 += 1,
                ModelPhase::Done => {}
            }
        }
        c
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// Records as (priority, delivery mode).
    Enqueue(Vec<(u32, u32)>),
    Lease(u8, u16),
    Ack(u8),
    Nack(u8, bool, u16),
    Change(u8, u16),
    Advance(u16),
    Purge,
    Snapshot,
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => proptest::collection::vec((0u32..6, 0u32..3), 1..6).prop_map(Step::Enqueue),
        3 => (1u8..5, 1u16..400).prop_map(|(n, v)| Step::Lease(n, v)),
        3 => any::<u8>().prop_map(Step::Ack),
        2 => (any::<u8>(), any::<bool>(), 0u16..300).prop_map(|(i, r, d)| Step::Nack(i, r, d)),
        1 => (any::<u8>(), 0u16..400).prop_map(|(i, v)| Step::Change(i, v)),
        2 => (1u16..500).prop_map(Step::Advance),
        1 => Just(Step::Purge),
        1 => Just(Step::Snapshot),
        1 => Just(Step::Restart),
    ]
}

struct Harness {
    policy: Policy,
    state: QueueState,
    model: Model,
    /// The messages log.
    data: Vec<Arc<v1::Record>>,
    /// The journal.
    journal: Vec<Op>,
    now: i64,
    /// Leases handed out, to pick from (some stale on purpose).
    leases: Vec<(i64, u64)>,
    /// The log's end at the last restart: transient messages before it are dropped.
    open_end: i64,
}

impl Harness {
    fn new(max_priority: u8) -> Self {
        let policy = Policy {
            max_priority,
            ..Policy::default()
        };
        Self {
            state: QueueState::new(policy.clone(), 0),
            policy,
            model: Model::default(),
            data: Vec::new(),
            journal: Vec::new(),
            now: 1_000,
            leases: Vec::new(),
            open_end: 0,
        }
    }

    /// Loads the window as the core does: until `want` are ready, passing over transient
    /// messages from before the last restart. With priorities the whole log is loaded, so
    /// that the window's order is the model's.
    fn fill(&mut self, want: usize, ops: &mut Vec<Op>) {
        let want = if self.policy.max_priority > 0 {
            usize::MAX
        } else {
            want
        };
        while self.state.ready_loaded() < want && (self.state.cursor() as usize) < self.data.len() {
            let o = self.state.cursor();
            let r = self.data[o as usize].clone();
            if o < self.open_end && is_transient(&r) {
                self.state.pass(o, ops);
            } else {
                self.state.load(o, r);
            }
        }
    }

    /// Messages not loaded yet that are still to be delivered (the transient ones from
    /// before the restart are not, though the state counts them until it reaches them).
    fn unseen_dropped(&self) -> i64 {
        (self.state.cursor()..self.open_end)
            .filter(|o| is_transient(&self.data[*o as usize]))
            .count() as i64
    }

    fn pick(&self, i: u8) -> Option<(i64, u64)> {
        if self.leases.is_empty() {
            None
        } else {
            Some(self.leases[i as usize % self.leases.len()])
        }
    }

    fn check_counts(&mut self) {
        self.state.tick(self.now);
        self.model.tick(self.now);
        let (ready, leased, delayed) = self.model.counts();
        assert_eq!(self.state.leased_count(), leased, "leased");
        assert_eq!(self.state.delayed_count(), delayed, "delayed");
        let unloaded = self.data.len() as i64 - self.state.cursor() - self.unseen_dropped();
        assert_eq!(
            self.state.ready_loaded() as i64 + unloaded,
            ready as i64,
            "ready"
        );
        // Every record's value is 8 bytes.
        assert_eq!(
            self.state.ready_bytes(),
            8 * self.state.ready_loaded() as u64,
            "ready bytes"
        );
        let model_floor = self
            .model
            .msgs
            .iter()
            .find(|(_, (p, _))| *p != ModelPhase::Done)
            .map_or(self.data.len() as i64, |(o, _)| *o);
        assert_eq!(self.state.floor(), model_floor.min(self.state.cursor()));
    }

    fn run(&mut self, s: Step) {
        let mut ops = Vec::new();
        match s {
            Step::Enqueue(records) => {
                for (priority, delivery_mode) in records {
                    let o = self.data.len() as i64;
                    self.data.push(Arc::new(v1::Record {
                        value: o.to_le_bytes().to_vec().into(),
                        properties: Some(v1::SystemProperties {
                            priority,
                            delivery_mode,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }));
                    self.model.msgs.insert(o, (ModelPhase::Ready, 0));
                    let level = priority.min(u32::from(self.policy.max_priority)) as u8;
                    self.model.level.insert(o, level);
                    if delivery_mode == 1 {
                        self.model.transient.insert(o);
                    }
                }
            }
            Step::Lease(n, vis) => {
                self.state.tick(self.now);
                self.fill(n as usize, &mut ops);
                let (got, dead) = self
                    .state
                    .lease(self.now, n as usize, i64::from(vis), &mut ops);
                assert!(dead.is_empty());
                let want = self.model.lease(self.now, n as usize, i64::from(vis));
                let got: Vec<_> = got
                    .iter()
                    .map(|l| (l.offset, l.seq, l.delivery_count))
                    .collect();
                assert_eq!(got, want);
                self.leases.extend(got.iter().map(|(o, s, _)| (*o, *s)));
            }
            Step::Ack(i) => {
                if let Some((o, seq)) = self.pick(i) {
                    let ok = self.model.holds(self.now, o, seq);
                    assert_eq!(self.state.ack(self.now, o, seq, &mut ops).is_ok(), ok);
                    if ok {
                        self.model.msgs.get_mut(&o).unwrap().0 = ModelPhase::Done;
                    }
                }
            }
            Step::Nack(i, requeue, delay) => {
                if let Some((o, seq)) = self.pick(i) {
                    let ok = self.model.holds(self.now, o, seq);
                    let r = self
                        .state
                        .nack(self.now, o, seq, requeue, i64::from(delay), &mut ops);
                    assert_eq!(r.is_ok(), ok);
                    if ok {
                        let m = self.model.msgs.get_mut(&o).unwrap();
                        if requeue {
                            m.0 = if delay > 0 {
                                ModelPhase::Delayed {
                                    until: self.now + i64::from(delay),
                                }
                            } else {
                                ModelPhase::Ready
                            };
                        } else {
                            // A dead letter that reached its target.
                            let dl = r.unwrap().expect("a dead letter");
                            self.state.settle_moved(dl.offset, &mut ops);
                            m.0 = ModelPhase::Done;
                        }
                    }
                }
            }
            Step::Change(i, vis) => {
                if let Some((o, seq)) = self.pick(i) {
                    let ok = self.model.holds(self.now, o, seq);
                    let r = self
                        .state
                        .change_lease(self.now, o, seq, i64::from(vis), &mut ops);
                    assert_eq!(r.is_ok(), ok);
                    if ok {
                        self.model.msgs.get_mut(&o).unwrap().0 = if vis == 0 {
                            ModelPhase::Ready
                        } else {
                            ModelPhase::Leased {
                                seq,
                                deadline: self.now + i64::from(vis),
                            }
                        };
                    }
                }
            }
            Step::Advance(ms) => self.now += i64::from(ms),
            Step::Purge => {
                self.state.tick(self.now);
                self.model.tick(self.now);
                // The count includes transient messages not reached yet.
                let mut expected = self.unseen_dropped() as u64;
                let n = self.state.purge(self.data.len() as i64, &mut ops);
                for (p, _) in self.model.msgs.values_mut() {
                    if matches!(p, ModelPhase::Ready | ModelPhase::Delayed { .. }) {
                        *p = ModelPhase::Done;
                        expected += 1;
                    }
                }
                assert_eq!(n, expected);
            }
            Step::Snapshot => {
                let snap = self.state.snapshot(self.data.len() as i64, Vec::new());
                // The journal is truncated before a snapshot.
                self.journal = vec![Op::Snapshot(snap)];
            }
            Step::Restart => {
                let mut replay = Replay::new(0, self.data.len() as i64);
                for op in &self.journal {
                    replay.apply(op).unwrap();
                }
                let data = self.data.clone();
                self.state = QueueState::from_replay(self.policy.clone(), &replay, |o| {
                    data.get(o as usize).cloned()
                });
                self.state.drop_transient(&mut ops);
                self.open_end = self.data.len() as i64;
                self.model.restart();
            }
        }
        self.journal.extend(ops);
        self.check_counts();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn queue_state_matches_the_model(
        max_priority in prop_oneof![Just(0u8), Just(3u8)],
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let mut h = Harness::new(max_priority);
        for s in steps {
            h.run(s);
        }
    }
}

fn rec(group: &str, priority: u32) -> Arc<v1::Record> {
    Arc::new(v1::Record {
        properties: Some(v1::SystemProperties {
            message_group: group.into(),
            priority,
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[test]
fn fifo_groups_lease_one_batch_at_a_time_in_order() {
    let mut st = QueueState::new(
        Policy {
            fifo: true,
            ..Policy::default()
        },
        0,
    );
    for (i, g) in ["a", "a", "b", "a", "b"].iter().enumerate() {
        st.load(i as i64, rec(g, 0));
    }
    let mut ops = Vec::new();
    let offsets = |got: &[Leased]| got.iter().map(|l| l.offset).collect::<Vec<_>>();
    // One call may take several messages of a group, in order (SQS's batches).
    let (got, _) = st.lease(0, 2, 100, &mut ops);
    assert_eq!(offsets(&got), vec![0, 1]);
    // Group a is out (a3 waits behind a1 and a2); group b goes on.
    let (got, _) = st.lease(0, 10, 100, &mut ops);
    assert_eq!(offsets(&got), vec![2, 4]);
    let (got, _) = st.lease(0, 10, 100, &mut ops);
    assert!(got.is_empty(), "both groups busy");
    st.ack(0, 0, 1, &mut ops).unwrap();
    let (got, _) = st.lease(0, 10, 100, &mut ops);
    assert!(got.is_empty(), "a2 still holds group a");
    st.ack(0, 1, 2, &mut ops).unwrap();
    let (got, _) = st.lease(0, 10, 100, &mut ops);
    assert_eq!(offsets(&got), vec![3]);
    // Group b's leases expire: its first message comes back before its second.
    st.ack(0, 3, 5, &mut ops).unwrap();
    let (got, _) = st.lease(150, 10, 100, &mut ops);
    assert_eq!(offsets(&got), vec![2, 4]);
    assert_eq!(got[0].delivery_count, 2);
}

#[test]
fn priorities_order_the_window_and_limits_dead_letter() {
    let mut st = QueueState::new(
        Policy {
            max_priority: 255,
            max_deliveries: Some(1),
            ..Policy::default()
        },
        0,
    );
    st.load(0, rec("", 1));
    st.load(1, rec("", 9));
    st.load(2, rec("", 5));
    let mut ops = Vec::new();
    let (got, _) = st.lease(0, 3, 10, &mut ops);
    assert_eq!(
        got.iter().map(|l| l.offset).collect::<Vec<_>>(),
        vec![1, 2, 0]
    );
    // All three leases expire; the limit of one delivery sends them to the dead letters.
    let (got, dead) = st.lease(20, 3, 10, &mut ops);
    assert!(got.is_empty());
    assert_eq!(dead.len(), 3);
    assert!(dead.iter().all(|d| d.reason == "max-deliveries"));
    for d in dead {
        st.settle_moved(d.offset, &mut ops);
    }
    assert_eq!(st.loaded(), 0);
    assert_eq!(st.floor(), 3);
}

/// RabbitMQ: a priority above the queue's maximum counts as the maximum; the record keeps
/// its own.
#[test]
fn a_priority_above_the_maximum_counts_as_the_maximum() {
    let mut st = QueueState::new(
        Policy {
            max_priority: 3,
            ..Policy::default()
        },
        0,
    );
    st.load(0, rec("", 3));
    st.load(1, rec("", 2));
    st.load(2, rec("", 9));
    let mut ops = Vec::new();
    let (got, _) = st.lease(0, 3, 10, &mut ops);
    assert_eq!(
        got.iter().map(|l| l.offset).collect::<Vec<_>>(),
        vec![0, 2, 1]
    );
    assert_eq!(got[1].record.properties.as_ref().unwrap().priority, 9);
}

#[test]
fn expired_messages_are_dead_letters() {
    let mut st = QueueState::new(
        Policy {
            message_ttl_ms: Some(100),
            ..Policy::default()
        },
        0,
    );
    st.load(
        0,
        Arc::new(v1::Record {
            timestamp_ms: 1000,
            ..Default::default()
        }),
    );
    st.load(
        1,
        Arc::new(v1::Record {
            timestamp_ms: 1050,
            ..Default::default()
        }),
    );
    let mut ops = Vec::new();
    let (got, dead) = st.lease(1120, 5, 10, &mut ops);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].offset, 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "expired");
}

#[test]
fn a_journal_naming_messages_past_the_log_is_corruption_not_a_hang() {
    let mut replay = Replay::new(0, 10);
    assert!(
        replay
            .apply(&Op::Lease(v1::QueueLeaseOp {
                offset: i64::MAX - 1,
                lease_seq: 1,
                deadline_ms: 1,
                delivery_count: 1,
            }))
            .is_err()
    );
    assert!(replay.apply(&Op::PurgeBefore(11)).is_err());
    assert!(
        replay
            .apply(&Op::Settle(v1::QueueSettleOp { offsets: vec![-1] }))
            .is_err()
    );
    assert!(
        replay
            .apply(&Op::Settle(v1::QueueSettleOp { offsets: vec![9] }))
            .is_ok()
    );
    assert_eq!(replay.cursor, 10);
}

fn any_op(limit: i64) -> impl Strategy<Value = Op> {
    let offset = -2..limit + 3;
    prop_oneof![
        (offset.clone(), 0u64..50, any::<i64>(), 0u32..6).prop_map(|(offset, seq, d, c)| {
            Op::Lease(v1::QueueLeaseOp {
                offset,
                lease_seq: seq,
                deadline_ms: d,
                delivery_count: c,
            })
        }),
        (offset.clone(), any::<i64>()).prop_map(|(offset, t)| Op::Release(v1::QueueReleaseOp {
            offset,
            available_at_ms: t,
        })),
        proptest::collection::vec(offset.clone(), 0..5)
            .prop_map(|offsets| Op::Settle(v1::QueueSettleOp { offsets })),
        offset.clone().prop_map(Op::PurgeBefore),
        (offset.clone(), proptest::collection::vec(offset, 0..5)).prop_map(|(cursor, live)| {
            Op::Snapshot(v1::QueueSnapshot {
                floor: 0,
                cursor,
                data_end: cursor,
                live: live
                    .into_iter()
                    .map(|offset| v1::QueueLiveEntry {
                        offset,
                        lease_deadline_ms: offset * 7,
                        ..Default::default()
                    })
                    .collect(),
                dedup: Vec::new(),
                next_lease_seq: 3,
            })
        }),
    ]
}

proptest! {
    /// What the fuzz target `queue_journal` does, on journals made of plausible ops and on
    /// raw bytes: replay ends, never panics.
    #[test]
    fn journal_replay_survives_any_journal(
        limit in 0u16..40,
        ops in proptest::collection::vec(any_op(40), 0..40),
        raw in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        use prost::Message;
        let batch = v1::QueueStateBatch {
            ops: ops.into_iter().map(|op| v1::QueueStateOp { op: Some(op) }).collect(),
        }
        .encode_to_vec();
        let mut data = limit.to_le_bytes().to_vec();
        data.extend((batch.len() as u16).to_le_bytes());
        data.extend(batch);
        super::fuzz_replay(&data);
        super::fuzz_replay(&raw);
    }
}

#[test]
fn time_passing_under_any_call_is_reported_for_wake_ups() {
    let mut st = QueueState::new(Policy::default(), 0);
    st.load(0, rec("", 0));
    st.load(1, rec("", 0));
    let mut ops = Vec::new();
    let (got, _) = st.lease(0, 1, 10, &mut ops);
    assert!(!st.take_woke());
    // An ack of another message lets time pass: message 0's lease ended under it.
    assert!(st.ack(20, 1, 99, &mut ops).is_err());
    assert!(
        st.take_woke(),
        "the expiry seen by an unrelated call must wake consumers"
    );
    assert!(!st.take_woke());
    assert_eq!(got[0].offset, 0);
}

#[test]
fn peek_shows_the_window_in_log_order_and_changes_nothing() {
    let mut st = QueueState::new(Policy::default(), 0);
    for i in 0..4 {
        st.load(i, rec("", 0));
    }
    let mut ops = Vec::new();
    let (got, _) = st.lease(0, 1, 100, &mut ops);
    assert_eq!(got[0].offset, 0);
    let peeked = st.peek(3);
    let seen: Vec<(i64, &str, u32)> = peeked.iter().map(|(o, s, d, _)| (*o, *s, *d)).collect();
    assert_eq!(
        seen,
        vec![(0, "leased", 1), (1, "ready", 0), (2, "ready", 0)]
    );
    // Nothing leased, no journal op, the same counts.
    assert_eq!((st.ready_loaded(), st.leased_count()), (3, 1));
    let before = ops.len();
    assert_eq!(st.peek(10).len(), 4);
    assert_eq!(ops.len(), before);
    assert_eq!((st.ready_loaded(), st.leased_count()), (3, 1));
}

/// One step of the FIFO model test.
#[derive(Debug, Clone)]
enum FifoStep {
    Enqueue(u8),
    Lease(usize),
    /// Settles the n-th of the current leases (modulo their number).
    Ack(usize),
    /// Gives the n-th of the current leases back, ready at once.
    Nack(usize),
    /// Time passes: leases older than this run out.
    Advance(i64),
}

fn fifo_step() -> impl Strategy<Value = FifoStep> {
    prop_oneof![
        3 => (0u8..4).prop_map(FifoStep::Enqueue),
        3 => (1usize..6).prop_map(FifoStep::Lease),
        2 => any::<usize>().prop_map(FifoStep::Ack),
        1 => any::<usize>().prop_map(FifoStep::Nack),
        1 => (1i64..30).prop_map(FifoStep::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// FIFO leases against a model: a group goes out only when nothing of it is out, then
    /// its ready messages in order, groups by their oldest ready message; an expired or
    /// given-back message comes again before the rest of its group.
    #[test]
    fn fifo_leases_match_the_model(steps in proptest::collection::vec(fifo_step(), 1..150)) {
        let mut st = QueueState::new(Policy { fifo: true, ..Policy::default() }, 0);
        let mut ops = Vec::new();
        // Model: offset -> (group, out until (None = ready)), and the live leases.
        let mut model: BTreeMap<i64, (u8, Option<i64>)> = BTreeMap::new();
        let mut leases: Vec<(i64, u64)> = Vec::new();
        let (mut now, mut next) = (0i64, 0i64);
        const VIS: i64 = 20;
        for step in steps {
            match step {
                FifoStep::Enqueue(g) => {
                    st.load(next, rec(&g.to_string(), 0));
                    model.insert(next, (g, None));
                    next += 1;
                }
                FifoStep::Advance(d) => now += d,
                FifoStep::Lease(max) => {
                    for (_, until) in model.values_mut() {
                        if until.is_some_and(|u| u <= now) {
                            *until = None;
                        }
                    }
                    leases.retain(|(o, _)| model.get(o).is_some_and(|(_, u)| u.is_some()));
                    let busy: BTreeSet<u8> =
                        model.values().filter(|(_, u)| u.is_some()).map(|(g, _)| *g).collect();
                    let mut heads: Vec<(i64, u8)> = Vec::new();
                    for (o, (g, u)) in &model {
                        if u.is_none() && !busy.contains(g) && !heads.iter().any(|(_, h)| h == g) {
                            heads.push((*o, *g));
                        }
                    }
                    let mut want = Vec::new();
                    for (_, g) in heads {
                        for (o, (mg, u)) in &model {
                            if want.len() < max && *mg == g && u.is_none() {
                                want.push(*o);
                            }
                        }
                    }
                    let (got, dead) = st.lease(now, max, VIS, &mut ops);
                    prop_assert!(dead.is_empty());
                    let offsets: Vec<i64> = got.iter().map(|l| l.offset).collect();
                    prop_assert_eq!(&offsets, &want);
                    for l in got {
                        model.get_mut(&l.offset).unwrap().1 = Some(now + VIS);
                        leases.push((l.offset, l.seq));
                    }
                }
                FifoStep::Ack(n) | FifoStep::Nack(n) => {
                    leases.retain(|(o, _)| model.get(o).is_some_and(|(_, u)| u.is_some_and(|u| u > now)));
                    if leases.is_empty() {
                        continue;
                    }
                    let (o, seq) = leases.remove(n % leases.len());
                    if matches!(step, FifoStep::Ack(_)) {
                        prop_assert!(st.ack(now, o, seq, &mut ops).is_ok());
                        model.remove(&o);
                    } else {
                        prop_assert!(st.nack(now, o, seq, true, 0, &mut ops).unwrap().is_none());
                        model.get_mut(&o).unwrap().1 = None;
                    }
                }
            }
        }
    }
}
