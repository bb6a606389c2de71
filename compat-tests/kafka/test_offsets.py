"""Scenario e: ListOffsets: earliest, latest, by timestamp (and KIP-734 max timestamp).

Ten records with explicit CreateTime timestamps T0 + i*1000 ms on one partition: the first
five each in its own batch, the last five in one batch, so the timestamp lookup must be
record-granular inside a batch. Kafka's rule: the earliest offset whose timestamp is >= the
target; no such record -> offset -1 (end), timestamp -1.
"""

from __future__ import annotations

import asyncio

import pytest

from kafkacompat import ck_admin, ck_consumer, ck_create_topic, ck_producer, ck_watermarks, unique

T0 = 1_700_000_000_000  # fixed CreateTime base (2023-11-14); the topic has retention.ms=-1
N = 10


def _produce_timed(bootstrap, topic):
    p = ck_producer(bootstrap, **{"linger.ms": 0})
    acks = []
    for i in range(5):
        p.produce(topic, key=b"k", value=b"v%d" % i, timestamp=T0 + i * 1000,
                  on_delivery=lambda e, m: acks.append((e, m.offset())))
        assert p.flush(30) == 0
    p2 = ck_producer(bootstrap, **{"linger.ms": 200, "batch.num.messages": 100})
    for i in range(5, N):
        p2.produce(topic, key=b"k", value=b"v%d" % i, timestamp=T0 + i * 1000,
                   on_delivery=lambda e, m: acks.append((e, m.offset())))
    assert p2.flush(30) == 0
    assert acks == [(None, i) for i in range(N)], acks


@pytest.fixture
def timed_topic(cluster):
    t = unique("timed")
    ck_create_topic(cluster.bootstrap, t, 1, {"retention.ms": "-1"})
    _produce_timed(cluster.bootstrap, t)
    return t


CASES = [  # (target timestamp, expected offset)
    (T0 - 60_000, 0),
    (T0, 0),
    (T0 + 3500, 4),
    (T0 + 4000, 4),
    (T0 + 7500, 8),   # inside the multi-record batch
    (T0 + 9000, 9),
    (T0 + 9001, -1),  # later than every record
]


def test_confluent_list_offsets(cluster, timed_topic):
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec
    admin = ck_admin(cluster.bootstrap)
    tp = TopicPartition(timed_topic, 0)

    def lookup(spec):
        return list(admin.list_offsets({tp: spec}, request_timeout=30).values())[0].result(30)

    assert lookup(OffsetSpec.earliest()).offset == 0
    assert lookup(OffsetSpec.latest()).offset == N
    for ts, want in CASES:
        r = lookup(OffsetSpec.for_timestamp(ts))
        assert r.offset == want, f"for_timestamp({ts - T0:+d}): offset {r.offset}, want {want}"
        if want >= 0:
            assert r.timestamp == T0 + want * 1000, f"timestamp {r.timestamp} for offset {want}"

    c = ck_consumer(cluster.bootstrap)
    try:
        assert c.get_watermark_offsets(tp, timeout=10) == (0, N)
        for ts, want in CASES:
            [r] = c.offsets_for_times([TopicPartition(timed_topic, 0, ts)], timeout=10)
            assert r.error is None and r.offset == want, \
                f"offsets_for_times({ts - T0:+d}): {r.offset} ({r.error}), want {want}"
    finally:
        c.close()


@pytest.mark.tributary_only(reason="Kafka serves ListOffsets v7 (max_timestamp); the gateway does not (documented)")
def test_confluent_list_offsets_max_timestamp_is_refused(cluster, timed_topic):
    """OffsetSpec.max_timestamp needs ListOffsets v7 (KIP-734), which the gateway does not
    advertise (documented in docs/compat/kafka.md): the client gets UNSUPPORTED_VERSION,
    not a wrong answer."""
    from confluent_kafka import KafkaException, TopicPartition
    from confluent_kafka.admin import OffsetSpec
    admin = ck_admin(cluster.bootstrap)
    tp = TopicPartition(timed_topic, 0)
    with pytest.raises(KafkaException) as e:
        list(admin.list_offsets({tp: OffsetSpec.max_timestamp()}).values())[0].result(30)
    assert "UNSUPPORTED_VERSION" in str(e.value) or "Unsupported" in str(e.value), str(e.value)


def test_kafka_python_offsets(cluster, timed_topic):
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=cluster.bootstrap, group_id=None)
    try:
        tp = TopicPartition(timed_topic, 0)
        assert c.beginning_offsets([tp]) == {tp: 0}
        assert c.end_offsets([tp]) == {tp: N}
        for ts, want in CASES:
            r = c.offsets_for_times({tp: ts})[tp]
            if want < 0:
                assert r is None, f"offsets_for_times({ts - T0:+d}) = {r}, want None"
            else:
                assert (r.offset, r.timestamp) == (want, T0 + want * 1000), \
                    f"offsets_for_times({ts - T0:+d}) = {r}, want {want}"
    finally:
        c.close()


def test_aiokafka_offsets(cluster, timed_topic):
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run():
        c = AIOKafkaConsumer(bootstrap_servers=cluster.bootstrap)
        await c.start()
        try:
            tp = TopicPartition(timed_topic, 0)
            assert await c.beginning_offsets([tp]) == {tp: 0}
            assert await c.end_offsets([tp]) == {tp: N}
            for ts, want in CASES:
                r = (await c.offsets_for_times({tp: ts}))[tp]
                if want < 0:
                    assert r is None, f"offsets_for_times({ts - T0:+d}) = {r}, want None"
                else:
                    assert (r.offset, r.timestamp) == (want, T0 + want * 1000), \
                        f"offsets_for_times({ts - T0:+d}) = {r}, want {want}"
        finally:
            await c.stop()

    asyncio.run(run())


def test_offsets_move_with_appends(cluster):
    """latest follows appends; earliest stays 0; both for a fresh empty partition are 0."""
    from confluent_kafka import TopicPartition
    t = unique("offs-move")
    ck_create_topic(cluster.bootstrap, t, 2)
    c = ck_consumer(cluster.bootstrap)
    try:
        assert ck_watermarks(c, TopicPartition(t, 1)) == (0, 0)
        p = ck_producer(cluster.bootstrap)
        for i in range(7):
            p.produce(t, value=b"x", partition=1)
        assert p.flush(30) == 0
        assert ck_watermarks(c, TopicPartition(t, 1)) == (0, 7)
        assert ck_watermarks(c, TopicPartition(t, 0)) == (0, 0)
    finally:
        c.close()


def test_commit_to_unknown_topic_or_partition_is_refused(cluster):
    """OffsetCommit (kafka-python's admin alter_group_offsets, one request) naming a topic
    that does not exist, or a partition beyond the topic's count: those partitions get
    UNKNOWN_TOPIC_OR_PARTITION and are not committed; the known partition is committed."""
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient
    from kafka.errors import NoError, UnknownTopicOrPartitionError
    from kafka.structs import OffsetAndMetadata
    t = unique("commit-known")
    missing = unique("commit-missing")
    ck_create_topic(cluster.bootstrap, t, 2)
    group = unique("commit-g")
    admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    try:
        r = admin.alter_group_offsets(group, {
            TopicPartition(t, 0): OffsetAndMetadata(3, "", -1),
            TopicPartition(t, 5): OffsetAndMetadata(1, "", -1),
            TopicPartition(missing, 0): OffsetAndMetadata(1, "", -1),
        })
        assert r == {
            TopicPartition(t, 0): NoError,
            TopicPartition(t, 5): UnknownTopicOrPartitionError,
            TopicPartition(missing, 0): UnknownTopicOrPartitionError,
        }, r
        committed = admin.list_group_offsets({group: None})[group]
        assert {tp: o.offset for tp, o in committed.items()} == {TopicPartition(t, 0): 3}, \
            committed
    finally:
        admin.close()


def test_committed_leader_epoch_reads_back(cluster):
    """The leader epoch committed with an offset comes back from OffsetFetch (confluent-kafka
    committed(), kafka-python list_group_offsets); a commit without one reads back as none."""
    from confluent_kafka import TopicPartition
    from kafka import TopicPartition as KpTopicPartition
    from kafka.admin import KafkaAdminClient
    t = unique("commit-epoch")
    ck_create_topic(cluster.bootstrap, t, 1)
    group = unique("epoch-g")
    c = ck_consumer(cluster.bootstrap, **{"group.id": group})
    admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    try:
        c.commit(offsets=[TopicPartition(t, 0, 5, leader_epoch=3)], asynchronous=False)
        [tp] = c.committed([TopicPartition(t, 0)], timeout=30)
        assert (tp.offset, tp.leader_epoch) == (5, 3), tp
        o = admin.list_group_offsets({group: None})[group][KpTopicPartition(t, 0)]
        assert (o.offset, o.leader_epoch) == (5, 3), o

        c.commit(offsets=[TopicPartition(t, 0, 6)], asynchronous=False)
        [tp] = c.committed([TopicPartition(t, 0)], timeout=30)
        assert (tp.offset, tp.leader_epoch) == (6, None), tp
        o = admin.list_group_offsets({group: None})[group][KpTopicPartition(t, 0)]
        assert (o.offset, o.leader_epoch) == (6, -1), o
    finally:
        c.close()
        admin.close()
