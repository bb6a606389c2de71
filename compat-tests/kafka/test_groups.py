"""Scenario b: consumer groups with members joining late and leaving mid-way.

A producer keeps writing keyed records while the group changes shape. Each member commits
what it processed (synchronously, after processing). Checked: every record consumed at least
once overall, per-key order within each member's view, the late joiner is given partitions,
after a member leaves the others own every partition, and the group's final committed offsets
equal the high watermarks (nothing lost, nothing left uncommitted).

In split-2gw mode the members are spread over two gateways fronting one core.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kafkacompat import (
    ALL_MODES_WITH_TWO_GATEWAYS, GroupLog, Got, async_wait_until, ck_admin, ck_create_topic,
    ck_high_watermarks,
    ck_producer, group_order_violations, make_records, norm_headers, unique, wait_until,
)

PARTITIONS = 6


class Producing:
    """Produces `recs` in the background at a steady pace, so records keep flowing while the
    group rebalances."""

    def __init__(self, produce_chunk, recs, chunk: int, pause_s: float):
        self.recs, self.chunk, self.pause_s = recs, chunk, pause_s
        self.produce_chunk = produce_chunk
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for i in range(0, len(self.recs), self.chunk):
                self.produce_chunk(self.recs[i:i + self.chunk])
                time.sleep(self.pause_s)  # pacing only, not synchronisation
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.done.set()

    def join(self, timeout):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "producer thread did not finish"
        if self.error:
            raise self.error


# -- confluent-kafka -------------------------------------------------------------------------


class CkMember:
    """One confluent-kafka group member in its own thread."""

    def __init__(self, name, bootstrap, group, topic, strategy, log: GroupLog):
        from confluent_kafka import Consumer
        self.name = name
        self.log = log
        self.assigned: set[int] = set()
        self.ever_assigned: set[int] = set()
        self.errors: list = []
        self.stop = threading.Event()
        self.closed = threading.Event()
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": name,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": strategy,
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 500,
        })
        self.consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_assign(self, c, parts):
        for tp in parts:
            self.assigned.add(tp.partition)
            self.ever_assigned.add(tp.partition)

    def _on_revoke(self, c, parts):
        for tp in parts:
            self.assigned.discard(tp.partition)

    def _run(self):
        from confluent_kafka import KafkaError, KafkaException, TopicPartition
        c = self.consumer
        # Positions processed but not yet committed. A refused commit (racing a rebalance)
        # is retried on the next round: with cooperative-sticky the partition usually stays
        # with this member, which keeps its position, so nothing would redeliver and commit it.
        positions = {}
        try:
            while not self.stop.is_set():
                msgs = c.consume(num_messages=500, timeout=0.2)
                for m in msgs:
                    if m.error():
                        if m.error().code() == KafkaError._PARTITION_EOF:
                            continue
                        self.errors.append(m.error())
                        continue
                    self.log.views[self.name].append(
                        Got(m.partition(), m.offset(), m.key(), m.value(),
                            norm_headers(m.headers())))
                    positions[(m.topic(), m.partition())] = m.offset() + 1
                # Only partitions still ours: another member may have committed further since.
                positions = {k: o for k, o in positions.items() if k[1] in self.assigned}
                if positions:
                    try:
                        c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()],
                                 asynchronous=False)
                        positions = {}
                    except KafkaException as e:
                        # A commit racing a rebalance may be refused (the records are then
                        # redelivered): allowed by at-least-once, so only remember it.
                        code = e.args[0].code()
                        if code not in (KafkaError.REBALANCE_IN_PROGRESS,
                                        KafkaError.ILLEGAL_GENERATION,
                                        KafkaError.UNKNOWN_MEMBER_ID,
                                        KafkaError._NO_OFFSET):
                            self.errors.append(e.args[0])
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)
        finally:
            c.close()  # leaves the group (LeaveGroup)
            self.closed.set()

    def leave(self, timeout=30):
        self.stop.set()
        assert self.closed.wait(timeout), f"{self.name} did not close within {timeout}s"


@ALL_MODES_WITH_TWO_GATEWAYS
@pytest.mark.parametrize("strategy", ["cooperative-sticky", "range"])
def test_confluent_group_join_leave(cluster, strategy):
    n = 30_000
    topic, group = unique("ck-grp"), unique("ck-group")
    ck_create_topic(cluster.bootstrap, topic, PARTITIONS)
    recs = make_records(n, n_keys=120, value_size=60)
    producer = ck_producer(cluster.bootstrap_for(0))
    log = GroupLog()

    def produce_chunk(chunk):
        for r in chunk:
            producer.produce(topic, key=r.key, value=r.value, headers=list(r.headers))
        assert producer.flush(60) == 0

    members = []
    try:
        members = [CkMember(f"m{i}", cluster.bootstrap_for(i), group, topic, strategy, log)
                   for i in range(2)]
        wait_until(lambda: all(m.assigned for m in members), 30,
                   "both first members to get partitions")
        prod = Producing(produce_chunk, recs, chunk=1000, pause_s=0.05)
        wait_until(lambda: log.total() >= n // 5, 60, f"{n // 5} records consumed")
        late = CkMember("m2", cluster.bootstrap_for(2), group, topic, strategy, log)
        members.append(late)
        wait_until(lambda: late.assigned, 30, "the late member to get partitions")
        wait_until(lambda: log.total() >= n // 2, 60, f"{n // 2} records consumed")
        leaver = members[0]
        leaver.leave()
        rest = members[1:]
        wait_until(lambda: set().union(*(m.assigned for m in rest)) == set(range(PARTITIONS)),
                   30, "the remaining members to own all partitions after one left")
        prod.join(120)
        want = {(r.key, r.seq) for r in recs}
        wait_until(lambda: log.union() >= want, 60, "every record to be consumed",
                   interval=0.2)
        for m in members:
            assert not m.errors, f"{m.name} errors: {m.errors[:3]}"
        assert log.union() == want
        bad = group_order_violations(log.views)
        assert not bad, f"{len(bad)} per-key order violations: {bad[:5]}"
        assert len(log.views["m2"]) > 0 or late.ever_assigned, "late member got nothing"

        # Committed offsets = high watermarks: every member committed what it processed.
        from confluent_kafka import TopicPartition

        def committed_at_end():
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            committed = {tp.partition: tp.offset for tp in
                         ck_admin_committed(cluster.bootstrap, group, tps)}
            highs = ck_high_watermarks(cluster.bootstrap, topic, PARTITIONS)
            return committed == highs and (committed, highs)
        wait_until(committed_at_end, 30, "committed offsets to reach the high watermarks",
                   interval=0.2)
    finally:
        for m in members:
            m.leave()


def ck_admin_committed(bootstrap, group, tps):
    from confluent_kafka import ConsumerGroupTopicPartitions
    admin = ck_admin(bootstrap)
    res = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)])
    return res[group].result(timeout=10).topic_partitions


# -- kafka-python ----------------------------------------------------------------------------


class KpMember:
    def __init__(self, name, bootstrap, group, topic, log: GroupLog):
        from kafka import ConsumerRebalanceListener, KafkaConsumer
        self.name, self.log = name, log
        self.assigned: set[int] = set()
        self.errors: list = []
        self.stop = threading.Event()
        self.closed = threading.Event()
        member = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                for tp in revoked:
                    member.assigned.discard(tp.partition)

            def on_partitions_assigned(self, assigned):
                for tp in assigned:
                    member.assigned.add(tp.partition)

        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, client_id=name,
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=10000, heartbeat_interval_ms=500)
        self.consumer.subscribe([topic], listener=Listener())
        # Load the topic's metadata after subscribing and before the first poll() joins.
        # kafka-python 3.0.12 loses a join that it started only because the leader's metadata
        # snapshot changed (its first assignment ran before the topic's metadata arrived) when
        # poll()'s timeout expires while that JoinGroup/SyncGroup is in flight: on the next poll
        # need_rejoin() is already False, so the assignment is never applied and heartbeats stay
        # off until the session times out. Seen with the client's debug log; it happens against
        # any broker. topics() fetches metadata synchronously and updates the snapshot.
        assert topic in self.consumer.topics(), f"no metadata for {topic}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        from kafka import OffsetAndMetadata
        from kafka.errors import CommitFailedError, RebalanceInProgressError
        c = self.consumer
        try:
            while not self.stop.is_set():
                batches = c.poll(timeout_ms=200, max_records=500)
                offsets = {}
                for tp, msgs in batches.items():
                    for m in msgs:
                        self.log.views[self.name].append(
                            Got(m.partition, m.offset, m.key, m.value, norm_headers(m.headers)))
                    offsets[tp] = OffsetAndMetadata(msgs[-1].offset + 1, "", -1)
                if offsets:
                    try:
                        c.commit(offsets)
                    except (CommitFailedError, RebalanceInProgressError):
                        pass  # redelivered later: allowed by at-least-once
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)
        finally:
            c.close()
            self.closed.set()

    def leave(self, timeout=30):
        self.stop.set()
        assert self.closed.wait(timeout), f"{self.name} did not close within {timeout}s"


@ALL_MODES_WITH_TWO_GATEWAYS
def test_kafka_python_group_join_leave(cluster):
    from kafka import KafkaAdminClient, KafkaProducer
    n = 6_000
    topic, group = unique("kp-grp"), unique("kp-group")
    admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    admin.create_topics({topic: {"num_partitions": PARTITIONS, "replication_factor": 1}},
                        wait_for_metadata=True)
    recs = make_records(n, n_keys=60, value_size=60)
    producer = KafkaProducer(bootstrap_servers=cluster.bootstrap_for(1), linger_ms=5)
    log = GroupLog()

    def produce_chunk(chunk):
        for r in chunk:
            producer.send(topic, key=r.key, value=r.value, headers=list(r.headers))
        producer.flush(timeout=60)

    members = []
    try:
        members = [KpMember(f"m{i}", cluster.bootstrap_for(i), group, topic, log)
                   for i in range(2)]
        wait_until(lambda: all(m.assigned for m in members), 60,
                   "both first members to get partitions")
        prod = Producing(produce_chunk, recs, chunk=300, pause_s=0.05)
        wait_until(lambda: log.total() >= n // 5, 60, f"{n // 5} records consumed")
        late = KpMember("m2", cluster.bootstrap_for(2), group, topic, log)
        members.append(late)
        wait_until(lambda: late.assigned, 60, "the late member to get partitions")
        wait_until(lambda: log.total() >= n // 2, 60, f"{n // 2} records consumed")
        members[0].leave()
        wait_until(lambda: members[1].assigned | members[2].assigned == set(range(PARTITIONS)),
                   60, "the remaining members to own all partitions after one left")
        prod.join(120)
        want = {(r.key, r.seq) for r in recs}
        wait_until(lambda: log.union() >= want, 60, "every record to be consumed", interval=0.2)
        for m in members:
            assert not m.errors, f"{m.name} errors: {m.errors[:3]}"
        assert log.union() == want
        bad = group_order_violations(log.views)
        assert not bad, f"{len(bad)} per-key order violations: {bad[:5]}"

        def committed_at_end():
            offs = admin.list_group_offsets({group: None})[group]
            committed = {tp.partition: om.offset for tp, om in offs.items() if tp.topic == topic}
            highs = {tp.partition: o.offset for tp, o in admin.list_partition_offsets(
                {tp: -1 for tp in offs}).items()} if offs else {}
            return len(committed) == PARTITIONS and committed == highs and committed
        wait_until(committed_at_end, 30, "committed offsets to reach the high watermarks",
                   interval=0.2)
    finally:
        for m in members:
            m.leave()
        producer.close()
        admin.close()


# -- aiokafka --------------------------------------------------------------------------------


@ALL_MODES_WITH_TWO_GATEWAYS
def test_aiokafka_group_join_leave(cluster):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import CommitFailedError, RebalanceInProgressError
    from aiokafka.structs import OffsetAndMetadata

    n = 6_000
    topic, group = unique("aio-grp"), unique("aio-group")
    recs = make_records(n, n_keys=60, value_size=60)
    log = GroupLog()

    async def member(name, bootstrap, assigned: set, stop: asyncio.Event, errors: list):
        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                for tp in revoked:
                    assigned.discard(tp.partition)

            async def on_partitions_assigned(self, new):
                for tp in new:
                    assigned.add(tp.partition)

        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, client_id=name,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             session_timeout_ms=10000, heartbeat_interval_ms=500)
        await c.start()
        try:
            c.subscribe([topic], listener=Listener())
            while not stop.is_set():
                batches = await c.getmany(timeout_ms=200, max_records=500)
                offsets = {}
                for tp, msgs in batches.items():
                    for m in msgs:
                        log.views[name].append(
                            Got(m.partition, m.offset, m.key, m.value, norm_headers(m.headers)))
                    offsets[tp] = OffsetAndMetadata(msgs[-1].offset + 1, "")
                if offsets:
                    try:
                        await c.commit(offsets)
                    except (CommitFailedError, RebalanceInProgressError):
                        pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            await c.stop()

    async def run():
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap_for(1), linger_ms=5)
        await producer.start()
        state = [(set(), asyncio.Event(), []) for _ in range(3)]
        tasks = []
        try:
            for i in range(2):
                tasks.append(asyncio.create_task(
                    member(f"m{i}", cluster.bootstrap_for(i), *state[i])))
            await async_wait_until(lambda: state[0][0] and state[1][0], 60,
                                   "both first members to get partitions")

            async def produce():
                for i in range(0, n, 300):
                    futs = [await producer.send(topic, key=r.key, value=r.value,
                                                headers=list(r.headers))
                            for r in recs[i:i + 300]]
                    await asyncio.gather(*futs)
                    await asyncio.sleep(0.05)  # pacing only
            prod = asyncio.create_task(produce())
            await async_wait_until(lambda: log.total() >= n // 5, 60, "n/5 consumed")
            tasks.append(asyncio.create_task(member("m2", cluster.bootstrap_for(2), *state[2])))
            await async_wait_until(lambda: state[2][0], 60, "the late member to get partitions")
            await async_wait_until(lambda: log.total() >= n // 2, 60, "n/2 consumed")
            state[0][1].set()
            await asyncio.wait_for(tasks[0], 30)
            await async_wait_until(
                lambda: state[1][0] | state[2][0] == set(range(PARTITIONS)), 60,
                "the remaining members to own all partitions after one left")
            await asyncio.wait_for(prod, 120)
            want = {(r.key, r.seq) for r in recs}
            await async_wait_until(lambda: log.union() >= want, 60, "every record consumed",
                                   interval=0.2)
            for i, (_, _, errors) in enumerate(state):
                assert not errors, f"m{i} errors: {errors[:3]}"
            assert log.union() == want
            bad = group_order_violations(log.views)
            assert not bad, f"{len(bad)} per-key order violations: {bad[:5]}"
        finally:
            for _, stop, _ in state:
                stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            await producer.stop()
            await admin.close()

    asyncio.run(run())


def _ck_join(bootstrap: str, topic: str, session_timeout_ms: int, timeout: float = 60):
    """A confluent-kafka consumer with this session.timeout.ms subscribes to `topic`: None once
    it is assigned partitions, or the code of the consumer error its JoinGroup got."""
    from confluent_kafka import Consumer
    assigned = []
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": unique("sto-group"),
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": 300,
        "max.poll.interval.ms": max(300_000, session_timeout_ms),
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    try:
        c.subscribe([topic], on_assign=lambda _c, ps: assigned.extend(ps))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is not None and m.error():
                return m.error().code()
            if assigned:
                return None
        raise AssertionError(f"session.timeout.ms={session_timeout_ms}: neither assigned nor "
                             f"refused in {timeout}s")
    finally:
        c.close()


def test_session_timeout_outside_the_bounds_is_refused(cluster):
    """Kafka's default group.min/max.session.timeout.ms (6 s, 30 min): a consumer asking for
    less or more gets INVALID_SESSION_TIMEOUT from JoinGroup; one inside joins."""
    from confluent_kafka import KafkaError
    topic = unique("sto")
    ck_create_topic(cluster.bootstrap, topic, 1)
    assert _ck_join(cluster.bootstrap, topic, 5_000) == KafkaError.INVALID_SESSION_TIMEOUT
    assert _ck_join(cluster.bootstrap, topic, 1_800_001) == KafkaError.INVALID_SESSION_TIMEOUT
    assert _ck_join(cluster.bootstrap, topic, 6_000) is None


@pytest.mark.parametrize("mode", ["standalone", "split"])
def test_session_timeout_bounds_are_settings(make_deployment, mode):
    """group_min_session_timeout_ms / group_max_session_timeout_ms (here as flags; in split
    mode given to the gateway process, which checks them)."""
    from confluent_kafka import KafkaError
    d = make_deployment(mode, ["--group-min-session-timeout-ms", "1000",
                               "--group-max-session-timeout-ms", "20000"])
    topic = unique("sto-set")
    ck_create_topic(d.bootstrap, topic, 1)
    assert _ck_join(d.bootstrap, topic, 2_000) is None
    assert _ck_join(d.bootstrap, topic, 20_000) is None
    assert _ck_join(d.bootstrap, topic, 30_000) == KafkaError.INVALID_SESSION_TIMEOUT
    assert _ck_join(d.bootstrap, topic, 999) == KafkaError.INVALID_SESSION_TIMEOUT
