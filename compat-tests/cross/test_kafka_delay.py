"""Delayed delivery for Kafka clients (docs/compat/mapping.md, "Delayed delivery"): a topic with
``tributary.delay.target.topic`` is a delay line. Records produced to it (librdkafka here,
kafka-clients in compat-tests/java) are appended to the target topic when their
``tributary.delay-ms`` / ``tributary.deliver-at-ms`` header says, at once without one, exactly
once across a kill -9. The produce is answered with the offset in the delay line.

Apache Kafka has no such config (it refuses the topic with INVALID_CONFIG), so these run
against Tributary only.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

DELAY_TARGET = "tributary.delay.target.topic"


def bootstrap(t) -> str:
    return t.addrs["kafka"]


def now_ms() -> int:
    return int(time.time() * 1000)


def create_topics(t, *topics: NewTopic):
    admin = AdminClient({"bootstrap.servers": bootstrap(t)})
    for name, f in admin.create_topics(list(topics)).items():
        f.result(timeout=30)


def delay_line(t, name: str, target: str, partitions: int = 1):
    create_topics(t, NewTopic(target, num_partitions=partitions, replication_factor=1),
                  NewTopic(name, num_partitions=partitions, replication_factor=1,
                           config={DELAY_TARGET: target}))


def produce(t, topic: str, records: list[tuple[str, list]]) -> list[int]:
    """Produces (value, headers) records in order with an idempotent producer; their offsets."""
    p = Producer({"bootstrap.servers": bootstrap(t), "acks": "all", "enable.idempotence": True,
                  "linger.ms": 20})
    offsets: list = [None] * len(records)

    def done(i):
        def cb(err, msg):
            assert err is None, err
            offsets[i] = msg.offset()
        return cb

    for i, (value, headers) in enumerate(records):
        p.produce(topic, key=f"k-{value}", value=value, headers=headers, on_delivery=done(i))
    assert p.flush(30) == 0
    return offsets


class Reader:
    """A consumer of one topic from the start, noting when each record arrived."""

    def __init__(self, t, topic: str):
        self.c = Consumer({"bootstrap.servers": bootstrap(t), "group.id": f"g-{topic}-{now_ms()}",
                           "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.c.subscribe([topic])

    def read(self, n: int, timeout: float = 30.0) -> list[tuple[int, object]]:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            m = self.c.poll(0.2)
            if m is None:
                continue
            if m.error():
                raise KafkaException(m.error())
            got.append((now_ms(), m))
        assert len(got) == n, f"read {len(got)} of {n} records"
        return got

    def nothing_more(self, within: float = 1.0):
        m = self.c.poll(within)
        assert m is None, f"unexpected record {m.value()!r}"

    def close(self):
        self.c.close()


def test_delayed_records_reach_the_target_when_due(tributary, uid):
    line, target = f"orders-{uid}.later", f"orders-{uid}"
    delay_line(tributary, line, target)
    admin = AdminClient({"bootstrap.servers": bootstrap(tributary)})
    described = admin.describe_configs([ConfigResource("topic", line)])
    configs = list(described.values())[0].result(timeout=30)
    assert configs[DELAY_TARGET].value == target

    reader = Reader(tributary, target)
    start = now_ms()
    # "late" is due 4 s after its timestamp (taken after `start`), "late-2" half a second on.
    at = start + 4000
    offsets = produce(tributary, line, [
        ("late", [("tributary.delay-ms", b"4000"), ("trace", b"t1")]),
        ("now-1", []),
        ("late-2", [("tributary.deliver-at-ms", str(at + 500).encode())]),
        ("now-2", [("trace", b"t2")]),
    ])
    # The produce answers with offsets in the delay line.
    assert offsets == [0, 1, 2, 3]

    first = reader.read(2)
    assert [m.value() for _, m in first] == [b"now-1", b"now-2"]
    assert all(arrived < at for arrived, _ in first)
    assert first[1][1].headers() == [("trace", b"t2")]
    assert first[1][1].key() == b"k-now-2"

    later = reader.read(2, timeout=30)
    assert [m.value() for _, m in later] == [b"late", b"late-2"]
    assert all(arrived >= at - 50 for arrived, _ in later), "delivered before it was due"
    # Headers travel, the delay header included; the key too.
    assert later[0][1].headers() == [("tributary.delay-ms", b"4000"), ("trace", b"t1")]
    assert later[0][1].key() == b"k-late"
    assert [m.offset() for _, m in first + later] == [0, 1, 2, 3]
    reader.nothing_more()
    reader.close()


def test_delayed_records_are_delivered_once_across_a_kill9(tributary, uid):
    line, target = f"jobs-{uid}.later", f"jobs-{uid}"
    delay_line(tributary, line, target, partitions=2)
    due = now_ms() + 3000
    records = [(f"job-{i}", [("tributary.deliver-at-ms", str(due).encode())]) for i in range(20)]
    produce(tributary, line, records)
    # Acknowledged, then killed before anything is due.
    assert now_ms() < due, "the test machine was too slow to tell"
    tributary.kill9_and_restart()

    reader = Reader(tributary, target)
    got = reader.read(20, timeout=40)
    assert sorted(m.value() for _, m in got) == sorted(v.encode() for v, _ in records)
    assert all(arrived >= due - 50 for arrived, _ in got)
    # A sentinel through the same line shows nothing was scheduled twice.
    produce(tributary, line, [("end", [])])
    tail = reader.read(1)
    assert tail[0][1].value() == b"end"
    reader.nothing_more()
    reader.close()


@pytest.mark.parametrize("case", ["itself", "chain", "target-becomes-line"])
def test_delay_lines_that_would_loop_are_refused(tributary, uid, case):
    admin = AdminClient({"bootstrap.servers": bootstrap(tributary)})
    a, b = f"a-{uid}", f"b-{uid}"
    if case == "itself":
        bad = NewTopic(a, num_partitions=1, replication_factor=1, config={DELAY_TARGET: a})
    else:
        delay_line(tributary, a, b)
        if case == "chain":
            bad = NewTopic(f"c-{uid}", num_partitions=1, replication_factor=1,
                           config={DELAY_TARGET: a})
        else:
            from confluent_kafka.admin import AlterConfigOpType, ConfigEntry
            resource = ConfigResource("topic", b, incremental_configs=[
                ConfigEntry(DELAY_TARGET, f"d-{uid}",
                            incremental_operation=AlterConfigOpType.SET)])
            f = admin.incremental_alter_configs([resource])[resource]
            with pytest.raises(KafkaException) as e:
                f.result(timeout=30)
            assert "INVALID_CONFIG" in str(e.value) and "delay target" in str(e.value)
            return
    with pytest.raises(KafkaException) as e:
        admin.create_topics([bad])[bad.topic].result(timeout=30)
    assert "INVALID_CONFIG" in str(e.value) and "delay" in str(e.value)


def test_a_transactional_producer_delays_only_what_it_commits(tributary, uid):
    """Transaction with delay: records are scheduled once their transaction commits; an
    aborted transaction's records never reach the target."""
    line, target = f"pay-{uid}.later", f"pay-{uid}"
    delay_line(tributary, line, target)
    p = Producer({"bootstrap.servers": bootstrap(tributary), "transactional.id": f"tx-{uid}"})
    p.init_transactions(30)
    due = now_ms() + 2000
    header = [("tributary.deliver-at-ms", str(due).encode())]
    p.begin_transaction()
    p.produce(line, key="k", value="aborted-1", headers=header)
    p.flush(30)
    p.abort_transaction(30)
    p.begin_transaction()
    p.produce(line, key="k", value="committed-1", headers=header)
    p.produce(line, key="k", value="committed-now")
    p.commit_transaction(30)

    reader = Reader(tributary, target)
    got = reader.read(2)
    assert [m.value() for _, m in got] == [b"committed-now", b"committed-1"]
    assert got[1][0] >= due - 50
    # A sentinel after them: the aborted record was never scheduled.
    produce(tributary, line, [("end", [])])
    assert [m.value() for _, m in reader.read(1)] == [b"end"]
    reader.nothing_more()
    reader.close()
