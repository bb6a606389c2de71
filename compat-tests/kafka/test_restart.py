"""Scenario c: commit, restart (SIGTERM or SIGKILL) on the same data dir, resume.

A group member processes a prefix of the topic (a precise count, not a batch boundary) and
commits exactly what it processed; the server is stopped and started again (the Kafka port
changes: clients reconnect to the new bootstrap). A new member of the same group must start
at the committed offsets: no committed record again, none skipped. Acked records and committed
offsets must survive SIGKILL as well, and offsets continue after the old end.
"""

from __future__ import annotations

import signal
import time

import pytest

from kafkacompat import (
    Got, ck_admin, ck_create_topic, ck_high_watermarks, ck_consumer, ck_producer, ck_produce, ck_read_all,
    make_records, norm_headers, unique, verify_exactly_once,
)

PARTITIONS = 3


def _consume_group(bootstrap, group, topic, limit: int | None, timeout=60) -> tuple[list[Got], dict]:
    """Subscribes as a member of `group` and processes `limit` records (when None: every record
    from the committed offsets up to the high watermarks), then commits exactly the processed
    positions synchronously and closes. Returns (records, committed offsets after the commit)."""
    from confluent_kafka import KafkaException, TopicPartition
    c = ck_consumer(bootstrap, **{"group.id": group})
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    got: list[Got] = []
    pos: dict[int, int] = {}
    try:
        highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                 for p in range(PARTITIONS)}
        start = {tp.partition: max(tp.offset, 0) for tp in c.committed(tps, timeout=10)}
        c.subscribe([topic])
        deadline = time.monotonic() + timeout

        def done():
            if limit is not None:
                return len(got) >= limit
            return all(pos.get(p, start[p]) >= highs[p] for p in range(PARTITIONS))

        while not done():
            assert time.monotonic() < deadline, (
                f"consumed {len(got)} records in {timeout}s (positions {pos}, start {start}, "
                f"highs {highs})")
            for m in c.consume(num_messages=200, timeout=0.5):
                if m.error():
                    raise KafkaException(m.error())
                if limit is not None and len(got) >= limit:
                    break  # fetched but not processed: must be delivered again later
                got.append(Got(m.partition(), m.offset(), m.key(), m.value(),
                               norm_headers(m.headers())))
                pos[m.partition()] = m.offset() + 1
        if pos:
            c.commit(offsets=[TopicPartition(topic, p, o) for p, o in pos.items()],
                     asynchronous=False)
        committed = {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
        return got, committed
    finally:
        c.close()


def _highs(bootstrap, topic):
    return ck_high_watermarks(bootstrap, topic, PARTITIONS)


def _restart_and_resume(d, sig, restart):
    n, m = 3_000, 1_234
    topic, group = unique("restart"), unique("restart-group")
    ck_create_topic(d.bootstrap, topic, PARTITIONS)
    recs = make_records(n, n_keys=30, value_size=80)
    delivered = ck_produce(ck_producer(d.bootstrap, **{"acks": "all"}), topic, recs)
    highs_before = _highs(d.bootstrap, topic)
    assert sum(highs_before.values()) == n

    first, committed = _consume_group(d.bootstrap, group, topic, limit=m)
    assert len(first) == m
    expect_committed = {}
    for g in first:
        expect_committed[g.partition] = g.offset + 1
    for p, o in expect_committed.items():
        assert committed.get(p) == o, f"committed {committed} but processed up to {expect_committed}"

    restart(sig)

    # Acked records survived, at the same offsets.
    assert _highs(d.bootstrap, topic) == highs_before
    all_after = ck_read_all(d.bootstrap, topic, PARTITIONS)
    verify_exactly_once(recs, all_after, delivered)

    # Committed offsets survived.
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    admin = ck_admin(d.bootstrap)  # kept alive until the future resolves
    res = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(PARTITIONS)])])
    after = {tp.partition: tp.offset for tp in res[group].result(timeout=20).topic_partitions}
    for p, o in expect_committed.items():
        assert after[p] == o, f"partition {p}: committed {o} before restart, {after[p]} after"

    # The group resumes at the committed offsets: nothing committed again, nothing skipped.
    second, _ = _consume_group(d.bootstrap, group, topic, limit=None)
    firsts = {}
    for g in second:
        firsts.setdefault(g.partition, g.offset)
    for p, o in firsts.items():
        assert o == expect_committed.get(p, 0), (
            f"partition {p}: resumed at offset {o}, committed was {expect_committed.get(p, 0)}")
    again = {(g.partition, g.offset) for g in first} & {(g.partition, g.offset) for g in second}
    assert not again, f"{len(again)} committed records delivered again, e.g. {sorted(again)[:5]}"
    assert len(second) == n - m
    combined = sorted(first + second, key=lambda g: (g.partition, g.offset))
    verify_exactly_once(recs, combined, delivered)

    # Offsets continue after the old end (no reuse of offsets after recovery).
    more = make_records(30, n_keys=30, value_size=10, tag="more-")
    more_acks = ck_produce(ck_producer(d.bootstrap), topic, more)
    for (part, off) in more_acks.values():
        assert off >= highs_before[part], f"new record at {part}/{off} below old end {highs_before}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_commit_restart_resume(fresh_cluster, sig):
    _restart_and_resume(fresh_cluster, sig, fresh_cluster.restart)


@pytest.mark.parametrize("fresh_cluster", ["split"], indirect=True)
def test_gateway_restart_keeps_offsets(fresh_cluster):
    """Split mode: only the gateway is killed; the core (and its state) keeps running."""
    _restart_and_resume(fresh_cluster, signal.SIGKILL, fresh_cluster.restart_gateways)


def test_sigkill_during_produce_keeps_acked(fresh_cluster):
    """Records acked before a SIGKILL are all there after restart; nothing half-written
    shows up (every record read back is one that was produced, intact)."""
    d = fresh_cluster
    topic = unique("crash")
    ck_create_topic(d.bootstrap, topic, PARTITIONS)
    recs = make_records(20_000, n_keys=30, value_size=80)
    acked: dict = {}
    p = ck_producer(d.bootstrap, **{"acks": "all", "message.timeout.ms": 5000,
                                    "batch.num.messages": 200})

    def cb_for(rid):
        def cb(err, msg):
            if err is None:
                acked[rid] = (msg.partition(), msg.offset())
        return cb

    killed = False
    for i, r in enumerate(recs):
        p.produce(topic, key=r.key, value=r.value, headers=list(r.headers),
                  on_delivery=cb_for((r.key, r.seq)))
        p.poll(0)
        if not killed and len(acked) >= 3_000:
            d.stop(signal.SIGKILL)
            killed = True
            break
        if i % 500 == 499:
            p.flush(30)
    assert killed, f"only {len(acked)} acks before the end"
    p.flush(10)  # remaining records fail (server gone) or were acked just before the kill
    d.start()
    got = ck_read_all(d.bootstrap, topic, PARTITIONS)
    by_id = {(r.key, r.seq): r for r in recs}
    found = {}
    for g in got:
        rid = (g.key, int(g.value.split(b"|")[1]))
        assert rid in by_id and by_id[rid].value == g.value, f"corrupt record at {g.partition}/{g.offset}"
        found.setdefault(rid, (g.partition, g.offset))
    lost = [rid for rid in acked if rid not in found]
    assert not lost, f"{len(lost)} acked records lost after SIGKILL, e.g. {lost[:3]}"
    moved = [rid for rid in acked if found[rid] != acked[rid]]
    assert not moved, f"{len(moved)} acked records at another offset after restart: {moved[:3]}"
