"""Scenario a: keyed produce over 6 partitions with every codec, consumed back exactly once.

Each client produces with its own producer, creates the topic with its own admin client,
and reads the topic back with its own consumer. Checked: every record exactly once, per-key
order (a per-key sequence number is in the value), keys/values/headers intact, each record
at the partition/offset its ack reported, timestamps (CreateTime) within the produce window.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from kafkacompat import (
    Got, aio_read_all, ck_create_topic, ck_producer, ck_produce, ck_read_all, kp_read_all,
    make_records, unique, verify_exactly_once,
)

PARTITIONS = 6
CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def _check_timestamps(got: list[Got], t0_ms: int, t1_ms: int):
    bad = [g for g in got if not (t0_ms - 1000 <= g.timestamp <= t1_ms + 1000)]
    assert not bad, (f"{len(bad)} records with a timestamp outside the produce window "
                     f"[{t0_ms}, {t1_ms}], first: {bad[0].timestamp} at {bad[0].partition}/{bad[0].offset}")


@pytest.mark.parametrize("codec", CODECS)
def test_confluent_produce_consume(cluster, codec):
    n = 100_000 if codec == "none" else 20_000
    topic = unique(f"ck-{codec}")
    ck_create_topic(cluster.bootstrap, topic, PARTITIONS)
    recs = make_records(n, n_keys=200, value_size=120, null_header=True)
    p = ck_producer(cluster.bootstrap, **{"compression.type": codec, "batch.num.messages": 2000})
    t0 = int(time.time() * 1000)
    delivered = ck_produce(p, topic, recs)
    t1 = int(time.time() * 1000)
    assert {part for part, _ in delivered.values()} == set(range(PARTITIONS)), \
        "200 keys should have landed on all 6 partitions"
    got = ck_read_all(cluster.bootstrap, topic, PARTITIONS)
    verify_exactly_once(recs, got, delivered)
    _check_timestamps(got, t0, t1)


def test_confluent_null_keys_and_values(cluster):
    """Null key (sticky/random partitioning) and null value (tombstone) survive the round trip."""
    from confluent_kafka import KafkaException
    topic = unique("ck-nulls")
    ck_create_topic(cluster.bootstrap, topic, 1)
    p = ck_producer(cluster.bootstrap)
    acks = []
    p.produce(topic, key=None, value=b"no-key", on_delivery=lambda e, m: acks.append(e))
    p.produce(topic, key=b"tomb", value=None, on_delivery=lambda e, m: acks.append(e))
    p.produce(topic, key=b"", value=b"", on_delivery=lambda e, m: acks.append(e))
    assert p.flush(30) == 0
    assert acks == [None, None, None]
    from kafkacompat import ck_consumer
    from confluent_kafka import TopicPartition, OFFSET_BEGINNING
    c = ck_consumer(cluster.bootstrap)
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            for m in c.consume(10, timeout=0.5):
                if m.error():
                    raise KafkaException(m.error())
                got.append((m.offset(), m.key(), m.value()))
        assert got == [(0, None, b"no-key"), (1, b"tomb", None), (2, b"", b"")]
    finally:
        c.close()


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_python_produce_consume(cluster, codec):
    from kafka import KafkaAdminClient, KafkaProducer
    n = 10_000
    topic = unique(f"kp-{codec}")
    admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    try:
        admin.create_topics({topic: {"num_partitions": PARTITIONS, "replication_factor": 1}},
                            wait_for_metadata=True)
    finally:
        admin.close()
    recs = make_records(n, n_keys=100, value_size=120)
    p = KafkaProducer(bootstrap_servers=cluster.bootstrap,
                      compression_type=None if codec == "none" else codec,
                      linger_ms=5, acks="all")
    try:
        t0 = int(time.time() * 1000)
        futs = [(r, p.send(topic, key=r.key, value=r.value, headers=list(r.headers)))
                for r in recs]
        p.flush(timeout=120)
        delivered = {}
        for r, f in futs:
            md = f.get(timeout=60)
            delivered[(r.key, r.seq)] = (md.partition, md.offset)
        t1 = int(time.time() * 1000)
    finally:
        p.close()
    got = kp_read_all(cluster.bootstrap, topic, PARTITIONS)
    verify_exactly_once(recs, got, delivered)
    _check_timestamps(got, t0, t1)


@pytest.mark.parametrize("codec", CODECS)
def test_aiokafka_produce_consume(cluster, codec):
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def run():
        n = 10_000
        topic = unique(f"aio-{codec}")
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        finally:
            await admin.close()
        recs = make_records(n, n_keys=100, value_size=120)
        p = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap,
                             compression_type=None if codec == "none" else codec,
                             linger_ms=5, acks="all")
        await p.start()
        try:
            t0 = int(time.time() * 1000)
            futs = [await p.send(topic, key=r.key, value=r.value, headers=list(r.headers))
                    for r in recs]
            mds = await asyncio.wait_for(asyncio.gather(*futs), 120)
            t1 = int(time.time() * 1000)
        finally:
            await p.stop()
        delivered = {(r.key, r.seq): (md.partition, md.offset) for r, md in zip(recs, mds)}
        got = await aio_read_all(cluster.bootstrap, topic, PARTITIONS)
        verify_exactly_once(recs, got, delivered)
        _check_timestamps(got, t0, t1)

    asyncio.run(run())
