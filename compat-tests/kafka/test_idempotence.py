"""Scenario f: idempotent producers (InitProducerId + sequence numbers).

Every record delivered exactly once, in order, at dense offsets 0..n-1 of its partition.
"""

from __future__ import annotations

import asyncio

from kafkacompat import (
    aio_read_all, ck_create_topic, ck_producer, ck_produce, ck_read_all, kp_read_all,
    make_records, unique, verify_exactly_once,
)

PARTITIONS = 3


def _dense(delivered: dict):
    per_part: dict[int, list[int]] = {}
    for part, off in delivered.values():
        per_part.setdefault(part, []).append(off)
    for part, offs in per_part.items():
        assert sorted(offs) == list(range(len(offs))), \
            f"partition {part}: acked offsets not dense from 0 ({len(offs)} records)"


def test_confluent_idempotent_producer(cluster):
    n = 10_000
    topic = unique("ck-idem")
    ck_create_topic(cluster.bootstrap, topic, PARTITIONS)
    recs = make_records(n, n_keys=50, value_size=80)
    p = ck_producer(cluster.bootstrap, **{
        "enable.idempotence": True,
        "max.in.flight.requests.per.connection": 5,
        "batch.num.messages": 500,
        "compression.type": "lz4",
    })
    delivered = ck_produce(p, topic, recs)
    _dense(delivered)
    got = ck_read_all(cluster.bootstrap, topic, PARTITIONS)
    verify_exactly_once(recs, got, delivered)


def test_kafka_python_idempotent_producer(cluster):
    from kafka import KafkaProducer
    n = 3_000
    topic = unique("kp-idem")
    ck_create_topic(cluster.bootstrap, topic, PARTITIONS)
    recs = make_records(n, n_keys=30, value_size=60)
    p = KafkaProducer(bootstrap_servers=cluster.bootstrap, enable_idempotence=True, acks="all",
                      linger_ms=5)
    try:
        futs = [(r, p.send(topic, key=r.key, value=r.value, headers=list(r.headers)))
                for r in recs]
        p.flush(timeout=60)
        delivered = {}
        for r, f in futs:
            md = f.get(timeout=30)
            delivered[(r.key, r.seq)] = (md.partition, md.offset)
    finally:
        p.close()
    _dense(delivered)
    verify_exactly_once(recs, kp_read_all(cluster.bootstrap, topic, PARTITIONS), delivered)


def test_aiokafka_idempotent_producer(cluster):
    from aiokafka import AIOKafkaProducer

    async def run():
        n = 3_000
        topic = unique("aio-idem")
        ck_create_topic(cluster.bootstrap, topic, PARTITIONS)
        recs = make_records(n, n_keys=30, value_size=60)
        p = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, enable_idempotence=True,
                             linger_ms=5)
        await p.start()
        try:
            futs = [await p.send(topic, key=r.key, value=r.value, headers=list(r.headers))
                    for r in recs]
            mds = await asyncio.wait_for(asyncio.gather(*futs), 60)
        finally:
            await p.stop()
        delivered = {(r.key, r.seq): (md.partition, md.offset) for r, md in zip(recs, mds)}
        _dense(delivered)
        verify_exactly_once(recs, await aio_read_all(cluster.bootstrap, topic, PARTITIONS),
                            delivered)

    asyncio.run(run())


def test_confluent_idempotent_producers_across_restart(fresh_cluster):
    """A new idempotent producer after a restart gets a producer id whose sequence state does
    not clash with the one before (no OUT_OF_ORDER_SEQUENCE / duplicate drop); records acked
    before and after are each there exactly once, at dense offsets."""
    import signal
    d = fresh_cluster
    topic = unique("ck-idem-restart")
    ck_create_topic(d.bootstrap, topic, PARTITIONS)
    recs = make_records(2_000, n_keys=20, value_size=40)
    before = ck_produce(ck_producer(d.bootstrap, **{"enable.idempotence": True}), topic,
                        recs[:1000])
    d.restart(signal.SIGTERM)
    after = ck_produce(ck_producer(d.bootstrap, **{"enable.idempotence": True}), topic,
                       recs[1000:])
    delivered = {**before, **after}
    _dense(delivered)
    verify_exactly_once(recs, ck_read_all(d.bootstrap, topic, PARTITIONS), delivered)
