"""Consume-transform-produce, exactly once, across kill -9.

A confluent-kafka (librdkafka) transactional producer and a read_committed group member copy an
input topic to an output topic in transactions that also commit the consumed offsets
(send_offsets_to_transaction). In the middle of a transaction, with its output records already
written and acknowledged, the core is killed with SIGKILL (standalone: the whole server; split:
the core with its gateway) or, in split mode, only the gateway. New clients with the same
transactional id and group then finish the work. A read_committed reader of the output must see
every input record transformed exactly once: the interrupted transaction is aborted (its
output invisible, its offsets not committed) and redone.

Tributary only: the reference broker is not restarted by these tests.
"""

from __future__ import annotations

import signal
import time

import pytest

from kafkacompat import ck_consumer, ck_create_topic, ck_produce, ck_producer, make_records, unique

PARTITIONS = 3
RECORDS = 1_500
PER_TXN = 40


def _copy(bootstrap, src, dst, group, txn_id, want_total, stop_mid_txn_after=None, timeout=90):
    """Copies src to dst in transactions of up to PER_TXN records until the group's committed
    offsets cover `want_total` records. With `stop_mid_txn_after` (records committed so far),
    returns mid-transaction (output produced and flushed, not committed). Returns the number of
    records this call committed."""
    from confluent_kafka import KafkaException, Producer
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
                  "transaction.timeout.ms": 60_000, "linger.ms": 5})
    p.init_transactions(30)
    c = ck_consumer(bootstrap, **{"group.id": group, "isolation.level": "read_committed",
                                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    c.subscribe([src])
    committed = 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, f"copied {committed} records in {timeout}s"
            msgs = [m for m in c.consume(num_messages=PER_TXN, timeout=0.5)]
            for m in msgs:
                if m.error():
                    raise KafkaException(m.error())
            if not msgs:
                if _group_total(c, src) >= want_total:
                    return committed
                continue
            p.begin_transaction()
            for m in msgs:
                p.produce(dst, key=m.key(), value=b"copy:" + m.value(), partition=m.partition())
            p.flush(30)
            if stop_mid_txn_after is not None and committed >= stop_mid_txn_after:
                return committed  # abandoned with the transaction open
            p.send_offsets_to_transaction(c.position(c.assignment()),
                                          c.consumer_group_metadata(), 30)
            p.commit_transaction(30)
            committed += len(msgs)
    finally:
        c.close()


def _group_total(c, topic) -> int:
    from confluent_kafka import TopicPartition
    got = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    return sum(max(tp.offset, 0) for tp in got)


def _read_committed(bootstrap, topic, want, timeout=60) -> list[bytes]:
    from confluent_kafka import KafkaException, TopicPartition
    c = ck_consumer(bootstrap, **{"isolation.level": "read_committed"})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    out = []
    deadline = time.monotonic() + timeout
    try:
        # Until `want` records, then until a quiet second shows nothing more comes.
        quiet_since = None
        while True:
            assert time.monotonic() < deadline, f"read {len(out)} of {want} records"
            msgs = c.consume(num_messages=500, timeout=0.2)
            for m in msgs:
                if m.error():
                    raise KafkaException(m.error())
                out.append(m.value())
            if len(out) >= want:
                if msgs:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 1.0:
                    return out
    finally:
        c.close()


@pytest.mark.parametrize("kill", ["core", "gateway"])
def test_consume_transform_produce_is_exactly_once_across_kill_9(fresh_cluster, kill):
    d = fresh_cluster
    if kill == "gateway" and d.mode == "standalone":
        pytest.skip("standalone: the gateway is the core's process (the 'core' case kills it)")
    src, dst = unique("ctp-in"), unique("ctp-out")
    group, txn_id = unique("ctp-group"), unique("ctp-txn")
    ck_create_topic(d.bootstrap, src, PARTITIONS)
    ck_create_topic(d.bootstrap, dst, PARTITIONS)
    recs = make_records(RECORDS, n_keys=30, value_size=40)
    ck_produce(ck_producer(d.bootstrap, **{"acks": "all"}), src, recs)

    done = _copy(d.bootstrap, src, dst, group, txn_id, RECORDS, stop_mid_txn_after=RECORDS // 3)
    assert done >= RECORDS // 3
    if kill == "core":
        d.restart(signal.SIGKILL)  # every process (split: the core and its gateway)
    else:
        d.restart_gateways(signal.SIGKILL)

    _copy(d.bootstrap, src, dst, group, txn_id, RECORDS)

    out = _read_committed(d.bootstrap, dst, RECORDS)
    expected = sorted(b"copy:" + r.value for r in recs)
    dupes = len(out) - len(set(out))
    assert dupes == 0, f"{dupes} records copied more than once"
    assert sorted(out) == expected, (
        f"{len(set(expected) - set(out))} input records missing from the output, "
        f"{len(set(out) - set(expected))} unexpected")
