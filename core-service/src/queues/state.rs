//! One queue's message states, as a pure state machine: no I/O, no clock of its own. The
//! caller ([`super`]) feeds it records read from the queue's log, the current time, and
//! requests; it answers with what changed and the journal ops that make the change durable.
//! Replaying those ops over the same log rebuilds the same state ([`Replay`]), which the
//! property test in `tests` checks against a model.
//!
//! The log holds every message; this state holds only a window of it: messages from the
//! `floor` (everything before it is settled) to the `cursor` (everything from it on is
//! available and not yet loaded). A backlog larger than memory stays in the log.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use tributary_proto::v1::{self, queue_state_op::Op};

/// Lease deadlines from here on mean "held by a subscription while it lasts": no process
/// holds them after a restart, so a replay makes their messages ready.
pub(crate) const HELD_AT_MS: i64 = 1 << 62;

/// Where one loaded message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Ready,
    Leased {
        seq: u64,
        deadline: i64,
    },
    /// Not available before `until` (a nack with a delay).
    Delayed {
        until: i64,
    },
    /// Being dead-lettered: out of reach until [`QueueState::settle_moved`] or
    /// [`QueueState::unmove`].
    Moving,
}

#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub record: Arc<v1::Record>,
    pub delivery_count: u32,
    pub phase: Phase,
    priority: u8,
    group: Option<Arc<str>>,
    /// 0 = never.
    expires_at: i64,
    /// Value bytes (what max_length_bytes counts).
    size: u64,
}

/// What a queue's configuration means to its state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    pub fifo: bool,
    /// Order ready messages by priority before offset, a priority above this counting as
    /// this (RabbitMQ's `x-max-priority`); 0 = no priorities.
    pub max_priority: u8,
    pub message_ttl_ms: Option<i64>,
    /// Dead-letter (or drop) a message instead of delivering it a (n+1)th time.
    pub max_deliveries: Option<u32>,
}

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub(crate) struct Leased {
    pub offset: i64,
    pub seq: u64,
    pub deadline: i64,
    pub delivery_count: u32,
    pub record: Arc<v1::Record>,
}

/// A message that must go to the dead-letter target before it leaves this queue.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub offset: i64,
    pub reason: &'static str,
    pub delivery_count: u32,
    pub record: Arc<v1::Record>,
}

/// Why a lease id no longer names a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseError {
    /// The message was settled, or the lease expired, or a newer lease replaced it.
    Stale,
}

#[derive(Debug, Default)]
pub(crate) struct QueueState {
    pub policy: Policy,
    floor: i64,
    cursor: i64,
    msgs: BTreeMap<i64, Msg>,
    /// Ready messages in delivery order: (priority, descending) then offset.
    ready: BTreeSet<(Reverse<u8>, i64)>,
    /// Leased and delayed messages by the time they change: (time, offset).
    timed: BTreeSet<(i64, i64)>,
    /// FIFO: messages per group that are live but not ready (leased, delayed, moving); a
    /// group with any is blocked so that its messages go out one batch at a time, in order
    /// (one lease call may take several of a group, as an SQS receive does).
    busy_groups: HashMap<Arc<str>, usize>,
    /// FIFO: the ready messages of each group, in order.
    group_ready: HashMap<Arc<str>, BTreeSet<i64>>,
    /// FIFO: the groups that may go out now (none of theirs out, some ready), by the offset
    /// of their first ready message; a lease starts here instead of walking past the
    /// backlog of busy groups.
    heads: BTreeSet<(i64, Arc<str>)>,
    /// FIFO: each group's entry in `heads`.
    head_of: HashMap<Arc<str>, i64>,
    next_lease_seq: u64,
    leased: usize,
    delayed: usize,
    /// Value bytes of the ready messages loaded.
    ready_bytes: u64,
    /// Time made messages ready since the last [`QueueState::take_woke`]: waiting
    /// consumers are to be woken.
    woke: bool,
    /// Messages that became ready with their delivery limit reached: dead letters to be.
    exhausted: Vec<i64>,
}

fn group_of(policy: &Policy, r: &v1::Record) -> Option<Arc<str>> {
    if !policy.fifo {
        return None;
    }
    let g = r
        .properties
        .as_ref()
        .map_or("", |p| p.message_group.as_str());
    Some(Arc::from(g))
}

/// Whether the record is transient (AMQP delivery mode 1, non-persistent): it does not
/// outlive a restart of the core. 0 (unset, what other protocols send) and 2 are kept.
pub(crate) fn is_transient(r: &v1::Record) -> bool {
    r.properties.as_ref().is_some_and(|p| p.delivery_mode == 1)
}

fn expiry_of(policy: &Policy, r: &v1::Record) -> i64 {
    let explicit = r.properties.as_ref().map_or(0, |p| p.expires_at_ms);
    let by_ttl = policy
        .message_ttl_ms
        .map_or(0, |ttl| r.timestamp_ms.saturating_add(ttl));
    match (explicit, by_ttl) {
        (0, t) | (t, 0) => t,
        (a, b) => a.min(b),
    }
}

impl QueueState {
    pub fn new(policy: Policy, start: i64) -> Self {
        Self {
            policy,
            floor: start,
            cursor: start,
            next_lease_seq: 1,
            ..Self::default()
        }
    }

    /// Offset of the first message that is not settled.
    pub fn floor(&self) -> i64 {
        self.floor
    }
    /// Offset of the first message not loaded yet.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }
    pub fn loaded(&self) -> usize {
        self.msgs.len()
    }
    pub fn ready_loaded(&self) -> usize {
        self.ready.len()
    }
    /// Value bytes of the ready messages loaded.
    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }
    pub fn leased_count(&self) -> usize {
        self.leased
    }
    pub fn delayed_count(&self) -> usize {
        self.delayed
    }
    /// Up to `max` loaded messages from the oldest, in log order, with their phase name:
    /// what an operator browsing the queue sees (nothing changes).
    pub fn peek(&self, max: usize) -> Vec<(i64, &'static str, u32, Arc<v1::Record>)> {
        self.msgs
            .iter()
            .take(max)
            .map(|(o, m)| {
                let phase = match m.phase {
                    Phase::Ready => "ready",
                    Phase::Leased { .. } => "leased",
                    Phase::Delayed { .. } => "delayed",
                    Phase::Moving => "moving",
                };
                (*o, phase, m.delivery_count, m.record.clone())
            })
            .collect()
    }
    /// The next time something changes by itself (a lease expires, a delay ends).
    pub fn next_deadline(&self) -> Option<i64> {
        self.timed.first().map(|(t, _)| *t)
    }

    fn refloor(&mut self) {
        self.floor = self.msgs.keys().next().copied().unwrap_or(self.cursor);
    }

    fn busy(&mut self, group: &Option<Arc<str>>, delta: isize) {
        if let Some(g) = group {
            let n = self.busy_groups.entry(g.clone()).or_insert(0);
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                self.busy_groups.remove(g);
            }
            self.refresh_head(g);
        }
    }

    /// Puts the group in `heads` at its first ready message if it may go out, else out.
    fn refresh_head(&mut self, g: &Arc<str>) {
        if let Some(old) = self.head_of.remove(g) {
            self.heads.remove(&(old, g.clone()));
        }
        if self.busy_groups.contains_key(g) {
            return;
        }
        if let Some(&first) = self.group_ready.get(g).and_then(|r| r.first()) {
            self.heads.insert((first, g.clone()));
            self.head_of.insert(g.clone(), first);
        }
    }

    /// Takes the message out of whichever index its phase puts it in.
    fn unindex(&mut self, offset: i64) {
        let Some(m) = self.msgs.get(&offset) else {
            return;
        };
        let (phase, priority, group, size) = (m.phase, m.priority, m.group.clone(), m.size);
        match phase {
            Phase::Ready => {
                if self.ready.remove(&(Reverse(priority), offset)) {
                    self.ready_bytes -= size;
                }
                if let Some(g) = &group {
                    if let Some(r) = self.group_ready.get_mut(g) {
                        r.remove(&offset);
                        if r.is_empty() {
                            self.group_ready.remove(g);
                        }
                    }
                    self.refresh_head(g);
                }
            }
            Phase::Leased { deadline, .. } => {
                self.timed.remove(&(deadline, offset));
                self.leased -= 1;
                self.busy(&group, -1);
            }
            Phase::Delayed { until } => {
                self.timed.remove(&(until, offset));
                self.delayed -= 1;
                self.busy(&group, -1);
            }
            Phase::Moving => self.busy(&group, -1),
        }
    }

    fn set_phase(&mut self, offset: i64, phase: Phase) {
        self.unindex(offset);
        let Some(m) = self.msgs.get_mut(&offset) else {
            return;
        };
        m.phase = phase;
        let (priority, group, size) = (m.priority, m.group.clone(), m.size);
        match phase {
            Phase::Ready => {
                if self.ready.insert((Reverse(priority), offset)) {
                    self.ready_bytes += size;
                }
                if let Some(g) = &group {
                    self.group_ready
                        .entry(g.clone())
                        .or_default()
                        .insert(offset);
                    self.refresh_head(g);
                }
            }
            Phase::Leased { deadline, .. } => {
                self.timed.insert((deadline, offset));
                self.leased += 1;
                self.busy(&group, 1);
            }
            Phase::Delayed { until } => {
                self.timed.insert((until, offset));
                self.delayed += 1;
                self.busy(&group, 1);
            }
            Phase::Moving => self.busy(&group, 1),
        }
    }

    fn remove(&mut self, offset: i64) -> Option<Msg> {
        self.unindex(offset);
        let m = self.msgs.remove(&offset);
        self.refloor();
        m
    }

    /// Passes over the message at the cursor without loading it, settled at once (a
    /// transient message from before a restart: it is dropped, not delivered).
    pub fn pass(&mut self, offset: i64, ops: &mut Vec<Op>) {
        debug_assert_eq!(offset, self.cursor);
        self.cursor = offset + 1;
        self.refloor();
        push_settle(ops, offset);
    }

    /// Settles every loaded transient message, whatever its phase: what a queue does when
    /// it opens after a restart, for the messages its journal had loaded. Returns how many
    /// went.
    pub fn drop_transient(&mut self, ops: &mut Vec<Op>) -> usize {
        let gone: Vec<i64> = self
            .msgs
            .iter()
            .filter(|(_, m)| is_transient(&m.record))
            .map(|(o, _)| *o)
            .collect();
        for o in &gone {
            self.remove(*o);
            push_settle(ops, *o);
        }
        gone.len()
    }

    /// Adds messages read from the log at `cursor` onwards (in order, no gaps).
    pub fn load(&mut self, offset: i64, record: Arc<v1::Record>) {
        debug_assert_eq!(offset, self.cursor);
        self.insert(offset, record, 0, Phase::Ready);
        self.cursor = offset + 1;
    }

    fn insert(&mut self, offset: i64, record: Arc<v1::Record>, delivery_count: u32, phase: Phase) {
        // Only the order uses the level (clamped to the queue's maximum); the record keeps
        // its own priority.
        let priority = record.properties.as_ref().map_or(0, |p| {
            p.priority.min(u32::from(self.policy.max_priority)) as u8
        });
        let msg = Msg {
            group: group_of(&self.policy, &record),
            expires_at: expiry_of(&self.policy, &record),
            size: record.value.len() as u64,
            record,
            delivery_count,
            phase: Phase::Moving,
            priority,
        };
        self.msgs.insert(offset, msg);
        // Counted as Moving by the insert above; set_phase moves it to its real index.
        let group = self.msgs[&offset].group.clone();
        self.busy(&group, 1);
        self.set_phase(offset, phase);
        self.refloor();
    }

    /// Passes over messages that cannot be loaded (a shared body lost in a crash before its
    /// publish was acknowledged): they were never in the queue.
    pub fn skip_to(&mut self, end: i64) {
        if end > self.cursor {
            self.cursor = end;
            self.refloor();
        }
    }

    /// Lets time pass: expired leases and finished delays make messages ready again.
    pub fn tick(&mut self, now: i64) -> bool {
        let mut changed = false;
        while let Some(&(t, offset)) = self.timed.first() {
            if t > now {
                break;
            }
            self.set_phase(offset, Phase::Ready);
            self.note_if_exhausted(offset);
            changed = true;
        }
        self.woke |= changed;
        changed
    }

    /// Whether time made messages ready since the last call (whoever let time pass).
    pub fn take_woke(&mut self) -> bool {
        std::mem::take(&mut self.woke)
    }

    fn note_if_exhausted(&mut self, offset: i64) {
        if let (Some(limit), Some(m)) = (self.policy.max_deliveries, self.msgs.get(&offset))
            && m.delivery_count >= limit
        {
            self.exhausted.push(offset);
        }
    }

    pub fn has_exhausted(&self) -> bool {
        !self.exhausted.is_empty()
    }

    /// Ready messages past their delivery limit, taken out as dead letters at once (rather
    /// than on the next receive), as a quorum queue does on requeue.
    pub fn take_exhausted(&mut self) -> Vec<DeadLetter> {
        let offsets = std::mem::take(&mut self.exhausted);
        let mut out = Vec::new();
        for o in offsets {
            if matches!(self.msgs.get(&o).map(|m| m.phase), Some(Phase::Ready)) {
                out.push(self.start_move(o, "max-deliveries"));
            }
        }
        out
    }

    /// Leases up to `max` ready messages until `now + visibility_ms`. Messages past their
    /// expiry or their delivery limit are not leased; they come back as dead letters (the
    /// caller moves or drops them, then settles them).
    pub fn lease(
        &mut self,
        now: i64,
        max: usize,
        visibility_ms: i64,
        ops: &mut Vec<Op>,
    ) -> (Vec<Leased>, Vec<DeadLetter>) {
        self.tick(now);
        let mut out = Vec::new();
        let mut dead = Vec::new();
        if self.policy.fifo {
            // Group by group, from the one whose first ready message is oldest: a group's
            // consecutive ready messages in order, as many as fit (an SQS batch); a group
            // with anything out waits and costs nothing here.
            while out.len() < max {
                let Some((_, g)) = self.heads.first().cloned() else {
                    break;
                };
                let mut taken = false;
                while out.len() < max {
                    let Some(&offset) = self.group_ready.get(&g).and_then(|r| r.first()) else {
                        break;
                    };
                    match self.lease_one(now, offset, visibility_ms, ops) {
                        Ok(l) => {
                            out.push(l);
                            taken = true;
                        }
                        Err(d) => {
                            dead.push(d);
                            // A dead head holds the group back (it is being moved); behind
                            // messages already leased in this call the rest may follow.
                            if !taken {
                                break;
                            }
                        }
                    }
                }
                // The group is busy now (or has nothing ready): it left `heads`. Should it
                // still be there (nothing could be done with it), stop rather than spin.
                if self.heads.first().is_some_and(|(_, h)| *h == g) {
                    break;
                }
            }
            return (out, dead);
        }
        // Walked by key rather than copied: the ready set may be large.
        let mut next = self.ready.first().copied();
        while let Some(key) = next {
            if out.len() >= max {
                break;
            }
            next = self
                .ready
                .range((Bound::Excluded(key), Bound::Unbounded))
                .next()
                .copied();
            match self.lease_one(now, key.1, visibility_ms, ops) {
                Ok(l) => out.push(l),
                Err(d) => dead.push(d),
            }
        }
        (out, dead)
    }

    /// Leases one ready message, or starts moving it out when it is past its expiry or its
    /// delivery limit.
    fn lease_one(
        &mut self,
        now: i64,
        offset: i64,
        visibility_ms: i64,
        ops: &mut Vec<Op>,
    ) -> Result<Leased, DeadLetter> {
        let m = &self.msgs[&offset];
        if m.expires_at > 0 && m.expires_at <= now {
            return Err(self.start_move(offset, "expired"));
        }
        if self
            .policy
            .max_deliveries
            .is_some_and(|limit| m.delivery_count >= limit)
        {
            return Err(self.start_move(offset, "max-deliveries"));
        }
        let seq = self.next_lease_seq;
        self.next_lease_seq += 1;
        let deadline = now.saturating_add(visibility_ms);
        let m = self
            .msgs
            .get_mut(&offset)
            .expect("ready messages are loaded");
        m.delivery_count += 1;
        let delivery_count = m.delivery_count;
        let record = m.record.clone();
        self.set_phase(offset, Phase::Leased { seq, deadline });
        ops.push(Op::Lease(v1::QueueLeaseOp {
            offset,
            lease_seq: seq,
            deadline_ms: deadline,
            delivery_count,
        }));
        Ok(Leased {
            offset,
            seq,
            deadline,
            delivery_count,
            record,
        })
    }

    fn start_move(&mut self, offset: i64, reason: &'static str) -> DeadLetter {
        self.set_phase(offset, Phase::Moving);
        let m = &self.msgs[&offset];
        DeadLetter {
            offset,
            reason,
            delivery_count: m.delivery_count,
            record: m.record.clone(),
        }
    }

    fn check_lease(&self, now: i64, offset: i64, seq: u64) -> Result<(), LeaseError> {
        match self.msgs.get(&offset).map(|m| m.phase) {
            Some(Phase::Leased { seq: s, deadline }) if s == seq && deadline > now => Ok(()),
            _ => Err(LeaseError::Stale),
        }
    }

    /// Whether the lease still holds its message.
    pub fn holds(&self, now: i64, offset: i64, seq: u64) -> bool {
        self.check_lease(now, offset, seq).is_ok()
    }

    /// Settles a leased message (an ack).
    pub fn ack(
        &mut self,
        now: i64,
        offset: i64,
        seq: u64,
        ops: &mut Vec<Op>,
    ) -> Result<(), LeaseError> {
        self.tick(now);
        self.check_lease(now, offset, seq)?;
        self.remove(offset);
        push_settle(ops, offset);
        Ok(())
    }

    /// Settles a message whatever its phase (an ack a staged transaction committed, whose
    /// lease may have ended since): false if it is not here to settle (settled already,
    /// being dead-lettered, or not loaded).
    pub fn settle_offset(&mut self, now: i64, offset: i64, ops: &mut Vec<Op>) -> bool {
        self.tick(now);
        match self.msgs.get(&offset).map(|m| m.phase) {
            None | Some(Phase::Moving) => false,
            Some(_) => {
                self.remove(offset);
                push_settle(ops, offset);
                true
            }
        }
    }

    /// Gives a leased message back: ready again after `delay_ms`, or (no requeue) a dead
    /// letter with reason "rejected".
    pub fn nack(
        &mut self,
        now: i64,
        offset: i64,
        seq: u64,
        requeue: bool,
        delay_ms: i64,
        ops: &mut Vec<Op>,
    ) -> Result<Option<DeadLetter>, LeaseError> {
        self.tick(now);
        self.check_lease(now, offset, seq)?;
        if !requeue {
            return Ok(Some(self.start_move(offset, "rejected")));
        }
        let until = now.saturating_add(delay_ms.max(0));
        self.release_at(offset, until, now);
        if until <= now {
            self.note_if_exhausted(offset);
        }
        ops.push(Op::Release(v1::QueueReleaseOp {
            offset,
            available_at_ms: until,
        }));
        Ok(None)
    }

    fn release_at(&mut self, offset: i64, until: i64, now: i64) {
        let phase = if until > now {
            Phase::Delayed { until }
        } else {
            Phase::Ready
        };
        self.set_phase(offset, phase);
    }

    /// Moves a lease's deadline to `now + visibility_ms`; 0 releases it at once.
    pub fn change_lease(
        &mut self,
        now: i64,
        offset: i64,
        seq: u64,
        visibility_ms: i64,
        ops: &mut Vec<Op>,
    ) -> Result<i64, LeaseError> {
        self.tick(now);
        self.check_lease(now, offset, seq)?;
        if visibility_ms <= 0 {
            self.set_phase(offset, Phase::Ready);
            self.note_if_exhausted(offset);
            ops.push(Op::Release(v1::QueueReleaseOp {
                offset,
                available_at_ms: now,
            }));
            return Ok(now);
        }
        let deadline = now.saturating_add(visibility_ms);
        self.set_phase(offset, Phase::Leased { seq, deadline });
        let delivery_count = self.msgs[&offset].delivery_count;
        ops.push(Op::Lease(v1::QueueLeaseOp {
            offset,
            lease_seq: seq,
            deadline_ms: deadline,
            delivery_count,
        }));
        Ok(deadline)
    }

    /// The dead letter reached its target (or was dropped): it leaves the queue.
    pub fn settle_moved(&mut self, offset: i64, ops: &mut Vec<Op>) {
        if matches!(self.msgs.get(&offset).map(|m| m.phase), Some(Phase::Moving)) {
            self.remove(offset);
            push_settle(ops, offset);
        }
    }

    /// The dead letter could not be moved: it stays, ready again.
    pub fn unmove(&mut self, offset: i64) {
        if matches!(self.msgs.get(&offset).map(|m| m.phase), Some(Phase::Moving)) {
            self.set_phase(offset, Phase::Ready);
        }
    }

    /// When the message at the head of the ready messages expires, if it does. As in
    /// RabbitMQ, expiry is checked at the head: a message behind an unexpired one waits.
    pub fn head_expiry(&self) -> Option<i64> {
        let (_, offset) = self.ready.first()?;
        let t = self.msgs[offset].expires_at;
        (t > 0).then_some(t)
    }

    /// Takes expired messages off the head of the ready messages: dead letters ("expired").
    pub fn expire_head(&mut self, now: i64) -> Vec<DeadLetter> {
        let mut out = Vec::new();
        while let Some(&(_, offset)) = self.ready.first() {
            let t = self.msgs[&offset].expires_at;
            if t == 0 || t > now {
                break;
            }
            out.push(self.start_move(offset, "expired"));
        }
        out
    }

    /// Takes the oldest ready messages out (overflow drop-head): they become dead letters
    /// with reason "max-length". Only loaded messages are considered.
    pub fn drop_head(&mut self, n: usize) -> Vec<DeadLetter> {
        let oldest: Vec<i64> = {
            let mut by_offset: Vec<i64> = self.ready.iter().map(|(_, o)| *o).collect();
            by_offset.sort_unstable();
            by_offset.truncate(n);
            by_offset
        };
        oldest
            .into_iter()
            .map(|o| self.start_move(o, "max-length"))
            .collect()
    }

    /// Takes the oldest ready message out (overflow drop-head by bytes): a dead letter with
    /// reason "max-length". Only loaded messages are considered.
    pub fn drop_oldest(&mut self) -> Option<DeadLetter> {
        let oldest = if self.policy.max_priority > 0 {
            self.ready.iter().map(|(_, o)| *o).min()
        } else {
            self.ready.first().map(|(_, o)| *o)
        }?;
        Some(self.start_move(oldest, "max-length"))
    }

    /// Removes every ready or delayed message, loaded or not (up to `end`); leased ones
    /// stay. Returns how many went.
    pub fn purge(&mut self, end: i64, ops: &mut Vec<Op>) -> u64 {
        let gone: Vec<i64> = self
            .msgs
            .iter()
            .filter(|(_, m)| matches!(m.phase, Phase::Ready | Phase::Delayed { .. }))
            .map(|(o, _)| *o)
            .collect();
        let mut count = gone.len() as u64;
        for o in &gone {
            self.remove(*o);
        }
        if !gone.is_empty() {
            ops.push(Op::Settle(v1::QueueSettleOp { offsets: gone }));
        }
        if end > self.cursor {
            count += (end - self.cursor) as u64;
            self.cursor = end;
            ops.push(Op::PurgeBefore(end));
            self.refloor();
        }
        count
    }

    /// The state as one journal entry, from which [`Replay`] starts.
    pub fn snapshot(&self, data_end: i64, dedup: Vec<v1::QueueDedupEntry>) -> v1::QueueSnapshot {
        v1::QueueSnapshot {
            floor: self.floor,
            cursor: self.cursor,
            data_end,
            live: self
                .msgs
                .iter()
                .map(|(offset, m)| {
                    let (lease_seq, lease_deadline_ms, available_at_ms) = match m.phase {
                        Phase::Leased { seq, deadline } => (seq, deadline, 0),
                        Phase::Delayed { until } => (0, 0, until),
                        Phase::Ready | Phase::Moving => (0, 0, 0),
                    };
                    v1::QueueLiveEntry {
                        offset: *offset,
                        delivery_count: m.delivery_count,
                        lease_seq,
                        lease_deadline_ms,
                        available_at_ms,
                    }
                })
                .collect(),
            dedup,
            next_lease_seq: self.next_lease_seq,
        }
    }

    /// Rebuilds the state from a replayed journal; `records` gives each live message's
    /// record (read back from the log).
    pub fn from_replay(
        policy: Policy,
        replay: &Replay,
        mut records: impl FnMut(i64) -> Option<Arc<v1::Record>>,
    ) -> Self {
        let mut st = Self::new(policy, replay.cursor);
        st.next_lease_seq = replay.next_lease_seq.max(1);
        for (offset, e) in &replay.live {
            // A live entry whose record is gone was cut away by retention: nothing to keep.
            let Some(record) = records(*offset) else {
                continue;
            };
            let phase = if e.lease_deadline_ms >= HELD_AT_MS {
                Phase::Ready
            } else if e.lease_deadline_ms > 0 {
                Phase::Leased {
                    seq: e.lease_seq,
                    deadline: e.lease_deadline_ms,
                }
            } else if e.available_at_ms > 0 {
                Phase::Delayed {
                    until: e.available_at_ms,
                }
            } else {
                Phase::Ready
            };
            st.insert(*offset, record, e.delivery_count, phase);
        }
        st.refloor();
        st
    }
}

fn push_settle(ops: &mut Vec<Op>, offset: i64) {
    if let Some(Op::Settle(s)) = ops.last_mut() {
        s.offsets.push(offset);
    } else {
        ops.push(Op::Settle(v1::QueueSettleOp {
            offsets: vec![offset],
        }));
    }
}

/// A queue's journal read back: which loaded messages were live and in which phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Replay {
    /// The messages log's end: no op may name a message at or past it.
    limit: i64,
    pub cursor: i64,
    pub live: BTreeMap<i64, v1::QueueLiveEntry>,
    pub next_lease_seq: u64,
    /// The messages log's end at the last snapshot (dedup ids after it are rescanned).
    pub data_end: i64,
    pub dedup: Vec<v1::QueueDedupEntry>,
}

impl Replay {
    pub fn new(start: i64, end: i64) -> Self {
        Self {
            limit: end,
            cursor: start,
            next_lease_seq: 1,
            data_end: start,
            ..Self::default()
        }
    }

    /// Ops name only loaded messages, and the live loop loads in order: an op beyond the
    /// cursor means everything up to it was loaded (and is live unless settled).
    fn reach(&mut self, offset: i64) -> Result<(), String> {
        if offset < 0 || offset >= self.limit {
            return Err(format!(
                "the journal names message {offset}, outside the log (0..{})",
                self.limit
            ));
        }
        while self.cursor <= offset {
            self.live.insert(
                self.cursor,
                v1::QueueLiveEntry {
                    offset: self.cursor,
                    ..Default::default()
                },
            );
            self.cursor += 1;
        }
        Ok(())
    }

    /// Applies one journal op; an op that cannot have been written (it names a message
    /// outside the log) is corruption.
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Snapshot(s) => {
                if s.cursor > self.limit || s.live.iter().any(|e| e.offset >= self.limit) {
                    return Err("a snapshot names messages past the end of the log".into());
                }
                self.cursor = s.cursor;
                self.live = s.live.iter().map(|e| (e.offset, *e)).collect();
                self.next_lease_seq = s.next_lease_seq;
                self.data_end = s.data_end;
                self.dedup = s.dedup.clone();
            }
            Op::Lease(l) => {
                self.reach(l.offset)?;
                if let Some(e) = self.live.get_mut(&l.offset) {
                    e.lease_seq = l.lease_seq;
                    e.lease_deadline_ms = l.deadline_ms;
                    e.delivery_count = l.delivery_count;
                    e.available_at_ms = 0;
                }
                self.next_lease_seq = self.next_lease_seq.max(l.lease_seq + 1);
            }
            Op::Release(r) => {
                self.reach(r.offset)?;
                if let Some(e) = self.live.get_mut(&r.offset) {
                    e.lease_seq = 0;
                    e.lease_deadline_ms = 0;
                    e.available_at_ms = r.available_at_ms;
                }
            }
            Op::Settle(s) => {
                for o in &s.offsets {
                    self.reach(*o)?;
                    self.live.remove(o);
                }
            }
            Op::Dedup(d) => self.dedup.push(d.clone()),
            Op::PurgeBefore(end) => {
                if *end > self.limit {
                    return Err(format!("a purge past the end of the log ({end})"));
                }
                self.cursor = self.cursor.max(*end);
            }
        }
        Ok(())
    }
}

/// Replays arbitrary bytes as a queue journal, as a restart does, then uses the state: the
/// fuzz target `queue_journal` runs it. Never panics, never hangs, whatever the bytes.
pub fn fuzz_replay(data: &[u8]) {
    use prost::Message;
    let Some((head, mut rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let limit = i64::from(u16::from_le_bytes(*head));
    let mut replay = Replay::new(0, limit);
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        let (frame, next) = tail.split_at(len);
        rest = next;
        let Ok(batch) = v1::QueueStateBatch::decode(frame) else {
            return;
        };
        for op in batch.ops.iter().filter_map(|o| o.op.as_ref()) {
            if replay.apply(op).is_err() {
                return;
            }
        }
    }
    let policy = Policy {
        fifo: limit % 2 == 0,
        max_priority: if limit % 3 == 0 { 9 } else { 0 },
        message_ttl_ms: Some(1_000),
        max_deliveries: Some(3),
    };
    let record = Arc::new(v1::Record::default());
    let mut st = QueueState::from_replay(policy, &replay, |_| Some(record.clone()));
    let mut ops = Vec::new();
    for now in [0, 1_000, i64::MAX / 8] {
        st.tick(now);
        let (leased, _) = st.lease(now, 16, 100, &mut ops);
        for l in leased {
            let _ = st.ack(now, l.offset, l.seq, &mut ops);
        }
        let _ = st.take_exhausted();
        let _ = st.expire_head(now);
    }
}

#[cfg(test)]
mod tests;
