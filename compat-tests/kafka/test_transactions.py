"""Scenario t: transactions, exactly-once (issue 15).

Transactional producers (confluent-kafka / librdkafka and aiokafka) commit and abort; a
read_committed consumer sees every committed record exactly once, in order, and no aborted
one, a read_uncommitted consumer sees both; records of an open transaction (and everything
after them in the partition) stay invisible to read_committed until the commit (the last
stable offset, also what ListOffsets answers for read_committed); a second producer with the
same transactional.id fences the first and aborts its open transaction; a transaction that
outlives transaction.timeout.ms is aborted by the coordinator and its producer cannot commit
it; consume-transform-produce with send_offsets_to_transaction moves the group's committed
offsets only with the transaction's commit. Bad input at the protocol level (raw requests):
the error codes Apache Kafka 4.1 answers.

Every scenario runs on the shared deployment, so against Apache Kafka too. Every wait polls a
condition with a deadline. Commit and abort markers are written after EndTxn returns, so
"the transaction is over in every partition" is itself polled: the read_committed end offset
(the last stable offset) equals the read_uncommitted one (the high watermark).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from kafkacompat import (
    Got, ck_admin, ck_consumer, ck_create_topic, ck_producer, ck_produce, make_records,
    norm_headers, unique, verify_exactly_once, wait_until,
)

PARTITIONS = 3

# Error codes of the Kafka protocol (org.apache.kafka.common.protocol.Errors).
NONE = 0
UNKNOWN_TOPIC_OR_PARTITION = 3
INVALID_PRODUCER_EPOCH = 47
INVALID_TXN_STATE = 48
INVALID_PRODUCER_ID_MAPPING = 49
INVALID_TRANSACTION_TIMEOUT = 50
CONCURRENT_TRANSACTIONS = 51
OPERATION_NOT_ATTEMPTED = 55
PRODUCER_FENCED = 90


# -- helpers ---------------------------------------------------------------------------------


def _txn_producer(bootstrap: str, tid: str | None = None, **conf):
    """A librdkafka transactional producer, initialised (InitProducerId done)."""
    p = ck_producer(bootstrap, **{"transactional.id": tid or unique("txn"), **conf})
    p.init_transactions(60)
    return p


def _kafka_error(exc: BaseException):
    """The KafkaError inside a KafkaException (also when confluent-kafka wrapped it in a
    SystemError raised from a callback)."""
    from confluent_kafka import KafkaException
    while exc is not None and not isinstance(exc, KafkaException):
        exc = exc.__cause__ or exc.__context__
    assert exc is not None, "no KafkaException"
    return exc.args[0]


def _ends(bootstrap: str, topic: str, partitions: int, isolation: str) -> dict[int, int]:
    """The end offset per partition a consumer with this isolation level is told
    (ListOffsets latest with its isolation level: the last stable offset for read_committed,
    the high watermark for read_uncommitted)."""
    from confluent_kafka import TopicPartition
    c = ck_consumer(bootstrap, **{"isolation.level": isolation})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)}
    finally:
        c.close()


def _wait_stable(bootstrap: str, topic: str, partitions: int, timeout: float = 60) -> dict:
    """Polls until no transaction is open in any partition (last stable offset = high
    watermark, i.e. every commit/abort marker written); returns the high watermarks."""
    def stable():
        hw = _ends(bootstrap, topic, partitions, "read_uncommitted")
        lso = _ends(bootstrap, topic, partitions, "read_committed")
        return hw if hw == lso else None
    return wait_until(stable, timeout, f"last stable offsets of {topic} = high watermarks")


def _consume_to(bootstrap: str, topic: str, ends: dict[int, int], isolation: str,
                timeout: float = 60) -> list[Got]:
    """Reads every partition from offset 0 until the consumer's position reaches `ends`
    (positions move past control records and aborted records the consumer drops)."""
    from confluent_kafka import KafkaException, TopicPartition
    c = ck_consumer(bootstrap, **{"isolation.level": isolation})
    try:
        ends = {p: e for p, e in ends.items() if e > 0}  # nothing to read in the others
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        got: list[Got] = []
        deadline = time.monotonic() + timeout

        def positions():
            return {tp.partition: tp.offset
                    for tp in c.position([TopicPartition(topic, p) for p in ends])}

        while True:
            pos = positions()
            if all(pos[p] >= e for p, e in ends.items()):
                break
            assert time.monotonic() < deadline, (
                f"{isolation}: positions {pos} after {timeout}s, want {ends}; read {len(got)}")
            for m in c.consume(num_messages=1000, timeout=0.5):
                if m.error():
                    raise KafkaException(m.error())
                got.append(Got(m.partition(), m.offset(), m.key(), m.value(),
                               norm_headers(m.headers())))
        for g in got:
            assert g.offset < ends[g.partition], f"read past the end {ends}: {g}"
        return sorted(got, key=lambda g: (g.partition, g.offset))
    finally:
        c.close()


def _produce_acked(p, topic: str, recs) -> dict:
    """Produces `recs` inside the producer's current transaction and waits for every ack;
    returns (key, seq) -> (partition, offset)."""
    return ck_produce(p, topic, recs, timeout=60)


def _partitions_of(delivered: dict) -> set[int]:
    return {part for part, _ in delivered.values()}


# -- abort then commit -------------------------------------------------------------------------


def test_confluent_abort_then_commit(cluster):
    """Four transactions on three partitions: commit, abort, commit, abort. read_committed
    sees the committed records exactly once, in order, at the offsets their acks gave, and no
    aborted one; read_uncommitted sees all of them. Each transaction leaves one marker (one
    offset) in every partition it wrote to."""
    bs = cluster.bootstrap
    topic = unique("txn-ac")
    ck_create_topic(bs, topic, PARTITIONS)
    committed = make_records(600, n_keys=30, value_size=60, tag="c")
    aborted = make_records(400, n_keys=20, value_size=60, tag="x")
    p = _txn_producer(bs)
    txns = [("commit", committed[:300]), ("abort", aborted[:200]),
            ("commit", committed[300:]), ("abort", aborted[200:])]
    delivered: dict = {}
    markers = {part: 0 for part in range(PARTITIONS)}
    for outcome, recs in txns:
        p.begin_transaction()
        acks = _produce_acked(p, topic, recs)
        for part in _partitions_of(acks):
            markers[part] += 1
        if outcome == "commit":
            p.commit_transaction(60)
        else:
            p.abort_transaction(60)
        delivered.update(acks)

    hw = _wait_stable(bs, topic, PARTITIONS)
    per_part = {part: 0 for part in range(PARTITIONS)}
    for part, _ in delivered.values():
        per_part[part] += 1
    assert hw == {part: per_part[part] + markers[part] for part in range(PARTITIONS)}, (
        f"high watermarks {hw}: want records + one marker per transaction per partition "
        f"(records {per_part}, markers {markers})")

    got = _consume_to(bs, topic, hw, "read_committed")
    verify_exactly_once(committed, got, {(r.key, r.seq): delivered[(r.key, r.seq)]
                                         for r in committed})
    every = _consume_to(bs, topic, hw, "read_uncommitted")
    verify_exactly_once(committed + aborted, every, delivered)


# -- the last stable offset ------------------------------------------------------------------


def test_confluent_open_transaction_invisible_until_commit(cluster):
    """An open transaction holds back read_committed at its first offset (the last stable
    offset): its records and the non-transactional records written after them are not
    delivered and the read_committed end offset (ListOffsets, AdminClient and
    get_watermark_offsets) stays there; after the commit all of them arrive in offset order."""
    from confluent_kafka import IsolationLevel, KafkaError, TopicPartition
    from confluent_kafka.admin import OffsetSpec
    bs = cluster.bootstrap
    topic = unique("txn-lso")
    ck_create_topic(bs, topic, 1)
    first = make_records(5, n_keys=1, value_size=20, tag="a")
    opened = make_records(10, n_keys=1, value_size=20, tag="b")
    plain = make_records(3, n_keys=1, value_size=20, tag="p")

    p = _txn_producer(bs)
    p.begin_transaction()
    acks_first = _produce_acked(p, topic, first)
    p.commit_transaction(60)
    assert _wait_stable(bs, topic, 1) == {0: 6}  # 5 records and the commit marker

    p.begin_transaction()
    acks_open = _produce_acked(p, topic, opened)
    assert sorted(o for _, o in acks_open.values()) == list(range(6, 16))
    acks_plain = ck_produce(ck_producer(bs, **{"enable.idempotence": True}), topic, plain)
    assert sorted(o for _, o in acks_plain.values()) == [16, 17, 18]

    assert _ends(bs, topic, 1, "read_committed") == {0: 6}
    assert _ends(bs, topic, 1, "read_uncommitted") == {0: 19}
    admin = ck_admin(bs)
    for level, want in ((IsolationLevel.READ_COMMITTED, 6), (IsolationLevel.READ_UNCOMMITTED, 19)):
        fs = admin.list_offsets({TopicPartition(topic, 0): OffsetSpec.latest()},
                                isolation_level=level, request_timeout=20)
        got = [f.result(timeout=30).offset for f in fs.values()]
        assert got == [want], f"ListOffsets latest {level}: {got}, want {want}"

    # read_committed reads up to the last stable offset and reports the end of the partition
    # there (librdkafka's EOF is at the last stable offset for read_committed).
    c = ck_consumer(bs, **{"isolation.level": "read_committed", "enable.partition.eof": True})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        seen: list = []
        eof_at: list = []

        def reached_lso():
            for m in c.consume(num_messages=100, timeout=0.2):
                if m.error() is None:
                    seen.append((m.offset(), m.key(), m.value()))
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    eof_at.append(m.offset())
                else:
                    raise AssertionError(f"consume error {m.error()}")
            return bool(eof_at)

        wait_until(reached_lso, 30, "read_committed consumer at the end of the partition")
        assert [o for o, _, _ in seen] == [0, 1, 2, 3, 4], f"read_committed saw {seen}"
        assert eof_at[0] == 6, f"read_committed end of partition at {eof_at}, want 6 (the LSO)"

        p.commit_transaction(60)

        def all_delivered():
            reached_lso()
            return len(seen) >= 18
        wait_until(all_delivered, 60, "the committed transaction's and later records")
        assert [o for o, _, _ in seen] == [0, 1, 2, 3, 4] + list(range(6, 16)) + [16, 17, 18]
        want_values = [r.value for r in first + opened + plain]
        assert [v for _, _, v in seen] == want_values
    finally:
        c.close()
    assert _wait_stable(bs, topic, 1) == {0: 20}  # and the commit marker
    assert {o for _, o in acks_first.values()} == {0, 1, 2, 3, 4}


# -- zombie fencing --------------------------------------------------------------------------


@pytest.mark.parametrize("after_fence", ["produce", "commit"])
def test_confluent_zombie_fencing(cluster, after_fence):
    """Producer A has an open transaction with acked records; producer B initialises the same
    transactional.id. A's next produce (or its commit) fails with librdkafka's fatal _FENCED
    error; A's transaction is aborted (read_committed never sees its records, which are in
    the log); B's transaction commits normally."""
    from confluent_kafka import KafkaError, KafkaException
    bs = cluster.bootstrap
    topic = unique("txn-fence")
    ck_create_topic(bs, topic, PARTITIONS)
    tid = unique("zombie")
    zombie = make_records(200, n_keys=12, value_size=40, tag="z")
    fresh = make_records(200, n_keys=12, value_size=40, tag="f")

    a = _txn_producer(bs, tid)
    a.begin_transaction()
    acks_a = _produce_acked(a, topic, zombie[:100])

    b = _txn_producer(bs, tid)  # InitProducerId: bumps the epoch, aborts A's transaction

    errors = []
    if after_fence == "produce":
        a.produce(topic, key=zombie[100].key, value=zombie[100].value)
        try:
            a.flush(30)
        except (KafkaException, SystemError) as e:
            errors.append(_kafka_error(e))
    try:
        a.commit_transaction(30)
    except KafkaException as e:
        errors.append(_kafka_error(e))
    else:
        pytest.fail("the fenced producer committed its transaction")
    fenced_codes = (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                    KafkaError.INVALID_PRODUCER_EPOCH)
    for err in errors:
        assert err.code() in fenced_codes and err.fatal(), (
            f"fenced producer got {err.name()} (fatal={err.fatal()}): {err.str()}")
    with pytest.raises(KafkaException) as again:
        a.begin_transaction()
    assert again.value.args[0].fatal(), f"a fenced producer began again: {again.value}"

    b.begin_transaction()
    acks_b = _produce_acked(b, topic, fresh)
    b.commit_transaction(60)

    hw = _wait_stable(bs, topic, PARTITIONS)
    got = _consume_to(bs, topic, hw, "read_committed")
    verify_exactly_once(fresh, got, acks_b)
    every = _consume_to(bs, topic, hw, "read_uncommitted")
    zombie_seen = {(g.partition, g.offset) for g in every if g.key.startswith(b"key-z")}
    assert set(acks_a.values()) <= zombie_seen, "the zombie's acked records are not in the log"


# -- transaction timeout ---------------------------------------------------------------------


def test_confluent_transaction_timeout_aborts(cluster):
    """transaction.timeout.ms=3000: the transaction is left open; the coordinator aborts it
    on its own (the last stable offset moves past its records, never before the timeout),
    read_committed never sees its records, and the producer cannot commit it."""
    from confluent_kafka import KafkaError, KafkaException
    bs = cluster.bootstrap
    topic = unique("txn-timeout")
    ck_create_topic(bs, topic, 1)
    timeout_ms = 3000
    p = _txn_producer(bs, **{"transaction.timeout.ms": timeout_ms})
    recs = make_records(10, n_keys=1, value_size=20, tag="t")
    began = time.monotonic()
    p.begin_transaction()
    acks = _produce_acked(p, topic, recs)
    assert sorted(o for _, o in acks.values()) == list(range(10))
    assert _ends(bs, topic, 1, "read_committed") == {0: 0}

    def aborted_by_coordinator():
        lso = _ends(bs, topic, 1, "read_committed")
        return lso if lso[0] > 0 else None

    hw = wait_until(aborted_by_coordinator, 60,
                    "the coordinator to abort the timed-out transaction (read_committed end "
                    "offset past its records)")
    elapsed = time.monotonic() - began
    assert elapsed >= timeout_ms / 1000 - 0.05, (
        f"transaction ended after {elapsed:.2f}s, before its {timeout_ms} ms timeout")
    assert hw == {0: 11}, f"end offsets {hw}: want 10 records and the abort marker"
    assert _ends(bs, topic, 1, "read_uncommitted") == {0: 11}

    with pytest.raises(KafkaException) as failed:
        p.commit_transaction(30)
    err = _kafka_error(failed.value)
    # Apache Kafka bumps the epoch when it aborts on timeout: the producer is fenced.
    assert err.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                          KafkaError.INVALID_PRODUCER_EPOCH), (
        f"commit of a timed-out transaction failed with {err.name()}: {err.str()}")
    assert err.fatal() or err.txn_requires_abort(), f"{err.name()} is neither fatal nor abortable"

    assert _consume_to(bs, topic, hw, "read_committed") == []
    assert len(_consume_to(bs, topic, hw, "read_uncommitted")) == 10


def test_confluent_transaction_timeout_above_maximum_refused(cluster):
    """InitProducerId with transaction.timeout.ms above the broker's maximum
    (transaction.max.timeout.ms, 900000 by default) fails with INVALID_TRANSACTION_TIMEOUT."""
    from confluent_kafka import KafkaError, KafkaException
    p = ck_producer(cluster.bootstrap, **{"transactional.id": unique("too-long"),
                                          "transaction.timeout.ms": 900_001})
    with pytest.raises(KafkaException) as failed:
        p.init_transactions(30)
    err = _kafka_error(failed.value)
    assert err.code() == KafkaError.INVALID_TRANSACTION_TIMEOUT, f"{err.name()}: {err.str()}"


# -- consume-transform-produce ---------------------------------------------------------------


def _group_offsets(bs: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets (-1001 where none), as an admin client reads them
    (OffsetFetch without require_stable: pending transactional offsets are not shown)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    admin = ck_admin(bs)
    res = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(PARTITIONS)])],
        require_stable=False, request_timeout=20)
    return {tp.partition: tp.offset for tp in res[group].result(timeout=30).topic_partitions}


def test_confluent_consume_transform_produce(cluster):
    """Input topic -> output topic, each batch one transaction holding the output records and
    the consumed offsets (send_offsets_to_transaction). The first batch is aborted: the group's
    committed offsets do not move and a new member of the group processes those records
    again. While a transaction is open the committed offsets stay where the last commit left
    them; after each commit they are exactly the positions sent. At the end every input
    record is in the output exactly once, in order, and the group is committed at the input's
    end."""
    from confluent_kafka import KafkaException, TopicPartition
    bs = cluster.bootstrap
    src, dst = unique("ctp-in"), unique("ctp-out")
    group = unique("ctp-group")
    ck_create_topic(bs, src, PARTITIONS)
    ck_create_topic(bs, dst, PARTITIONS)
    recs = make_records(900, n_keys=30, value_size=50, tag="i")
    in_acks = ck_produce(ck_producer(bs), src, recs)
    in_end: dict[int, int] = {}
    for part, off in in_acks.values():
        in_end[part] = max(in_end.get(part, 0), off + 1)
    nothing = {p: -1001 for p in range(PARTITIONS)}
    assert _group_offsets(bs, group, src) == nothing

    p = _txn_producer(bs)

    def member():
        c = ck_consumer(bs, **{"group.id": group, "isolation.level": "read_committed"})
        c.subscribe([src])
        return c

    def batch(c, limit: int, timeout: float = 60) -> tuple[list, dict]:
        """Up to `limit` records, at least one (stops early when a consume call returns
        nothing); returns (records, next position per partition)."""
        out, pos = [], {}
        deadline = time.monotonic() + timeout
        while len(out) < limit:
            msgs = c.consume(num_messages=limit - len(out), timeout=0.5)
            for m in msgs:
                if m.error():
                    raise KafkaException(m.error())
                out.append(m)
                pos[m.partition()] = m.offset() + 1
            if not msgs and out:
                break
            assert time.monotonic() < deadline, f"no input records within {timeout}s"
        return out, pos

    def transform(c, msgs, pos):
        for m in msgs:
            p.produce(dst, key=m.key(), value=m.value(), headers=m.headers())
        assert p.flush(60) == 0
        p.send_offsets_to_transaction([TopicPartition(src, part, off) for part, off in pos.items()],
                                      c.consumer_group_metadata(), 60)

    # An aborted batch: offsets and output dropped together.
    c = member()
    p.begin_transaction()
    msgs, pos = batch(c, 150)
    transform(c, msgs, pos)
    assert _group_offsets(bs, group, src) == nothing, "offsets committed before EndTxn"
    p.abort_transaction(60)
    c.close()
    assert _group_offsets(bs, group, src) == nothing, "offsets of an aborted transaction"
    aborted_count = len(msgs)

    # Committed batches, each checked before and after its commit.
    c = member()
    committed = dict(nothing)
    processed = 0
    try:
        while any(committed[part] < end for part, end in in_end.items()):
            p.begin_transaction()
            msgs, pos = batch(c, 200)
            transform(c, msgs, pos)
            assert _group_offsets(bs, group, src) == committed, "offsets moved before the commit"
            p.commit_transaction(60)
            committed.update(pos)
            processed += len(msgs)
            # The offset commit is part of the transaction's completion: poll for it.
            wait_until(lambda: _group_offsets(bs, group, src) == committed, 30,
                       f"committed offsets {committed}")
            assert processed <= len(recs), f"{processed} records processed, {len(recs)} in the input"
    finally:
        c.close()
    assert committed == {**nothing, **in_end}
    assert processed == len(recs), f"{processed} records processed after the abort, want all"

    hw = _wait_stable(bs, dst, PARTITIONS)
    out = _consume_to(bs, dst, hw, "read_committed")
    verify_exactly_once(recs, out)
    every = _consume_to(bs, dst, hw, "read_uncommitted")
    assert len(every) == len(recs) + aborted_count


# -- aiokafka ----------------------------------------------------------------------------------


def test_aiokafka_commit_abort_read_committed(cluster):
    """aiokafka: a transaction committed with `async with producer.transaction()`, one aborted
    with begin_transaction/abort_transaction, one committed with commit_transaction.
    AIOKafkaConsumer(isolation_level="read_committed") sees the committed records exactly
    once, in order, and no aborted one; end_offsets with read_committed stops at an open
    transaction; read_uncommitted sees all."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    bs = cluster.bootstrap
    topic = unique("aio-txn")
    ck_create_topic(bs, topic, PARTITIONS)
    committed = make_records(300, n_keys=15, value_size=40, tag="c")
    aborted = make_records(150, n_keys=15, value_size=40, tag="x")
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    async def send_all(p, recs) -> dict:
        futs = [await p.send(topic, key=r.key, value=r.value, headers=list(r.headers))
                for r in recs]
        mds = await asyncio.wait_for(asyncio.gather(*futs), 60)
        return {(r.key, r.seq): (md.partition, md.offset) for r, md in zip(recs, mds)}

    async def read(isolation: str, ends: dict) -> list[Got]:
        c = AIOKafkaConsumer(bootstrap_servers=bs, enable_auto_commit=False,
                             isolation_level=isolation, auto_offset_reset="earliest")
        await c.start()
        try:
            c.assign(tps)
            await c.seek_to_beginning(*tps)
            got: list[Got] = []
            deadline = time.monotonic() + 60
            while True:
                pos = {tp.partition: await c.position(tp) for tp in tps}
                if all(pos[p] >= e for p, e in ends.items()):
                    break
                assert time.monotonic() < deadline, f"{isolation}: positions {pos}, want {ends}"
                for tp, msgs in (await c.getmany(timeout_ms=500, max_records=1000)).items():
                    got += [Got(m.partition, m.offset, m.key, m.value, norm_headers(m.headers))
                            for m in msgs]
            return sorted(got, key=lambda g: (g.partition, g.offset))
        finally:
            await c.stop()

    async def end_offsets(isolation: str) -> dict:
        c = AIOKafkaConsumer(bootstrap_servers=bs, isolation_level=isolation)
        await c.start()
        try:
            return {tp.partition: o for tp, o in (await c.end_offsets(tps)).items()}
        finally:
            await c.stop()

    async def run():
        p = AIOKafkaProducer(bootstrap_servers=bs, transactional_id=unique("aio-tid"))
        try:
            await p.start()
            delivered = {}
            async with p.transaction():
                delivered.update(await send_all(p, committed[:150]))
            await p.begin_transaction()
            delivered.update(await send_all(p, aborted))
            # Open: read_committed's end offsets stop at the transaction's first offsets.
            firsts = {}
            for r in aborted:
                part, off = delivered[(r.key, r.seq)]
                firsts[part] = min(firsts.get(part, off), off)
            lso = await end_offsets("read_committed")
            for part, first in firsts.items():
                assert lso[part] == first, f"read_committed end offsets {lso}, open txn at {firsts}"
            await p.abort_transaction()
            await p.begin_transaction()
            delivered.update(await send_all(p, committed[150:]))
            await p.commit_transaction()
        finally:
            await p.stop()
        hw = await asyncio.to_thread(_wait_stable, bs, topic, PARTITIONS)
        assert await end_offsets("read_committed") == hw
        got = await read("read_committed", hw)
        verify_exactly_once(committed, got, {(r.key, r.seq): delivered[(r.key, r.seq)]
                                             for r in committed})
        verify_exactly_once(committed + aborted, await read("read_uncommitted", hw), delivered)

    asyncio.run(run())


def test_aiokafka_zombie_fencing(cluster):
    """aiokafka: a second producer with the same transactional_id starts; the first one's
    send and commit raise ProducerFenced; its open transaction is aborted."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import ProducerFenced

    bs = cluster.bootstrap
    topic = unique("aio-fence")
    ck_create_topic(bs, topic, 1)
    tid = unique("aio-zombie")

    async def run():
        a = AIOKafkaProducer(bootstrap_servers=bs, transactional_id=tid)
        b = AIOKafkaProducer(bootstrap_servers=bs, transactional_id=tid)
        try:
            await a.start()
            await a.begin_transaction()
            md = await a.send_and_wait(topic, key=b"k", value=b"zombie-0")
            assert md.offset == 0
            await b.start()
            with pytest.raises(ProducerFenced):
                await asyncio.wait_for(a.send_and_wait(topic, key=b"k", value=b"zombie-1"), 30)
            with pytest.raises(ProducerFenced):
                await asyncio.wait_for(a.commit_transaction(), 30)
            async with b.transaction():
                await b.send_and_wait(topic, key=b"k", value=b"fresh-0")
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(run())
    hw = _wait_stable(bs, topic, 1)
    got = _consume_to(bs, topic, hw, "read_committed")
    assert [g.value for g in got] == [b"fresh-0"], f"read_committed saw {got}"


# -- bad input at the protocol level ---------------------------------------------------------


class RawKafka:
    """Non-flexible request versions written by hand (request header v1), for the requests
    and field values the clients will not send."""

    def __init__(self, addr: str):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=15)
        self.corr = 0

    def close(self):
        self.sock.close()

    @staticmethod
    def string(s: str | None) -> bytes:
        if s is None:
            return struct.pack(">h", -1)
        b = s.encode()
        return struct.pack(">h", len(b)) + b

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "the broker closed the connection"
            buf += chunk
        return buf

    def request(self, api_key: int, version: int, body: bytes) -> bytes:
        self.corr += 1
        msg = struct.pack(">hhi", api_key, version, self.corr) + self.string("compat-raw") + body
        self.sock.sendall(struct.pack(">i", len(msg)) + msg)
        size = struct.unpack(">i", self._recv(4))[0]
        resp = self._recv(size)
        assert struct.unpack(">i", resp[:4])[0] == self.corr, "correlation id mismatch"
        return resp[4:]

    def find_coordinator(self, key: str, key_type: int = 1) -> tuple[int, str]:
        """FindCoordinator v1: (error, HOST:PORT)."""
        r = self.request(10, 1, self.string(key) + struct.pack(">b", key_type))
        _, err = struct.unpack(">ih", r[:6])
        off = 6
        (mlen,) = struct.unpack(">h", r[off:off + 2])
        off += 2 + max(mlen, 0)
        _node, hlen = struct.unpack(">ih", r[off:off + 6])
        off += 6
        host = r[off:off + hlen].decode()
        (port,) = struct.unpack(">i", r[off + hlen:off + hlen + 4])
        return err, f"{host}:{port}"

    def init_producer_id(self, tid: str | None, timeout_ms: int) -> tuple[int, int, int]:
        """InitProducerId v1: (error, producer id, epoch)."""
        r = self.request(22, 1, self.string(tid) + struct.pack(">i", timeout_ms))
        _, err, pid, epoch = struct.unpack(">ihqh", r[:16])
        return err, pid, epoch

    def add_partitions(self, tid, pid, epoch, topic, partitions, version=1) -> dict:
        """AddPartitionsToTxn v0-v2: {(topic, partition): error}."""
        body = (self.string(tid) + struct.pack(">qh", pid, epoch) + struct.pack(">i", 1)
                + self.string(topic) + struct.pack(">i", len(partitions))
                + b"".join(struct.pack(">i", p) for p in partitions))
        r = self.request(24, version, body)
        off = 4
        (n,) = struct.unpack(">i", r[off:off + 4])
        off += 4
        out = {}
        for _ in range(n):
            (ln,) = struct.unpack(">h", r[off:off + 2])
            name = r[off + 2:off + 2 + ln].decode()
            off += 2 + ln
            (m,) = struct.unpack(">i", r[off:off + 4])
            off += 4
            for _ in range(m):
                part, err = struct.unpack(">ih", r[off:off + 6])
                off += 6
                out[(name, part)] = err
        return out

    def add_offsets(self, tid, pid, epoch, group, version=1) -> int:
        """AddOffsetsToTxn v0-v2: error."""
        r = self.request(25, version, self.string(tid) + struct.pack(">qh", pid, epoch)
                         + self.string(group))
        return struct.unpack(">ih", r[:6])[1]

    def end_txn(self, tid, pid, epoch, commit: bool, version=1) -> int:
        """EndTxn v0-v2: error."""
        r = self.request(26, version, self.string(tid) + struct.pack(">qh?", pid, epoch, commit))
        return struct.unpack(">ih", r[:6])[1]


def _settled(call, timeout: float = 30):
    """Repeats a transaction request while the coordinator answers CONCURRENT_TRANSACTIONS
    (a previous commit/abort still writing its markers), as clients do; returns the answer."""
    deadline = time.monotonic() + timeout
    while True:
        r = call()
        err = r if isinstance(r, int) else (r[0] if isinstance(r, tuple) else None)
        if isinstance(r, dict):
            err = CONCURRENT_TRANSACTIONS if CONCURRENT_TRANSACTIONS in r.values() else None
        if err != CONCURRENT_TRANSACTIONS:
            return r
        assert time.monotonic() < deadline, f"CONCURRENT_TRANSACTIONS for {timeout}s"
        time.sleep(0.05)  # retry backoff, not synchronisation: the loop polls the answer


@pytest.fixture
def raw_txn(cluster):
    """(RawKafka connected to the transaction coordinator of a new transactional id, the id,
    a new topic with PARTITIONS partitions)."""
    topic = unique("raw-txn")
    ck_create_topic(cluster.bootstrap, topic, PARTITIONS)
    tid = unique("raw-tid")
    def no_error(what, err):
        if err != NONE:
            raise AssertionError(f"{what}: error code {err}")
        return True

    boot = RawKafka(cluster.bootstrap)
    try:
        found = []
        wait_until(lambda: no_error("FindCoordinator", (found.append(boot.find_coordinator(tid))
                                                        or found[-1][0])),
                   30, f"FindCoordinator(transaction, {tid}) without error")
        coordinator = found[-1][1]
    finally:
        boot.close()
    raw = RawKafka(coordinator)
    try:
        # The coordinator may still be loading its state (a new broker's first transaction).
        wait_until(lambda: no_error("InitProducerId",
                                    raw.init_producer_id(unique("raw-warmup"), 60_000)[0]),
                   60, "InitProducerId for a new transactional id without error")
        yield raw, tid, topic
    finally:
        raw.close()


def test_raw_init_producer_id(raw_txn):
    """InitProducerId: a transaction timeout <= 0 or above transaction.max.timeout.ms (900000)
    is INVALID_TRANSACTION_TIMEOUT; a second InitProducerId for the same id keeps the producer
    id and bumps the epoch; one while a transaction is open aborts it and gives a newer epoch
    (Apache Kafka first answers CONCURRENT_TRANSACTIONS while it writes the abort markers, and
    the retry gets the epoch: a coordinator that finishes the abort before answering may
    answer at once); the old epoch is then fenced."""
    raw, tid, topic = raw_txn
    for bad in (900_001, 0, -1):
        err, pid, epoch = raw.init_producer_id(unique("raw-bad"), bad)
        assert (err, pid, epoch) == (INVALID_TRANSACTION_TIMEOUT, -1, -1), (
            f"transaction timeout {bad}: error {err}, producer {pid}/{epoch}")
    err, pid, epoch = raw.init_producer_id(tid, 60_000)
    assert err == NONE and pid >= 0 and epoch >= 0, (err, pid, epoch)
    err, pid2, epoch2 = raw.init_producer_id(tid, 60_000)
    assert (err, pid2) == (NONE, pid) and epoch2 > epoch, (err, pid, epoch, pid2, epoch2)
    assert raw.add_partitions(tid, pid, epoch2, topic, [0]) == {(topic, 0): NONE}
    err, pid3, epoch3 = raw.init_producer_id(tid, 60_000)
    assert err in (NONE, CONCURRENT_TRANSACTIONS), f"InitProducerId with a transaction open: {err}"
    if err == CONCURRENT_TRANSACTIONS:
        err, pid3, epoch3 = _settled(lambda: raw.init_producer_id(tid, 60_000))
    assert (err, pid3) == (NONE, pid) and epoch3 > epoch2, (err, pid3, epoch3)
    assert raw.end_txn(tid, pid, epoch2, False, version=1) == INVALID_PRODUCER_EPOCH
    assert raw.end_txn(tid, pid, epoch2, False, version=2) == PRODUCER_FENCED


def test_raw_end_txn_out_of_order(raw_txn):
    """EndTxn without a transaction is INVALID_TXN_STATE (commit and abort, v0-v2); a commit
    retried after it completed succeeds, an abort after a completed commit is
    INVALID_TXN_STATE (and the reverse); an unknown producer id or transactional id is
    INVALID_PRODUCER_ID_MAPPING."""
    raw, tid, topic = raw_txn
    err, pid, epoch = raw.init_producer_id(tid, 60_000)
    assert err == NONE
    for version in (0, 1, 2):
        for commit in (True, False):
            assert raw.end_txn(tid, pid, epoch, commit, version) == INVALID_TXN_STATE, (
                f"EndTxn v{version} commit={commit} without a transaction")
    assert raw.end_txn(tid, pid + 1000, epoch, True) == INVALID_PRODUCER_ID_MAPPING
    assert raw.end_txn(unique("raw-unknown"), pid, epoch, True) == INVALID_PRODUCER_ID_MAPPING

    assert raw.add_partitions(tid, pid, epoch, topic, [0, 1]) == {
        (topic, 0): NONE, (topic, 1): NONE}
    assert raw.add_partitions(tid, pid, epoch, topic, [1]) == {(topic, 1): NONE}  # again: fine
    assert raw.end_txn(tid, pid, epoch, True) == NONE
    assert _settled(lambda: raw.end_txn(tid, pid, epoch, True)) == NONE  # a retried commit
    assert _settled(lambda: raw.end_txn(tid, pid, epoch, False)) == INVALID_TXN_STATE

    assert _settled(lambda: raw.add_partitions(tid, pid, epoch, topic, [2])) == {(topic, 2): NONE}
    assert raw.end_txn(tid, pid, epoch, False) == NONE
    assert _settled(lambda: raw.end_txn(tid, pid, epoch, False)) == NONE  # a retried abort
    assert _settled(lambda: raw.end_txn(tid, pid, epoch, True)) == INVALID_TXN_STATE


def test_raw_wrong_epoch_and_bad_partitions(raw_txn):
    """A producer epoch other than the current one (older or newer) is INVALID_PRODUCER_EPOCH
    up to v1 of AddPartitionsToTxn / AddOffsetsToTxn / EndTxn and PRODUCER_FENCED from v2; an
    unknown transactional id is INVALID_PRODUCER_ID_MAPPING; an unknown topic or partition is
    UNKNOWN_TOPIC_OR_PARTITION, and the valid partitions of that request are
    OPERATION_NOT_ATTEMPTED (not added)."""
    raw, tid, topic = raw_txn
    raw.init_producer_id(tid, 60_000)
    err, pid, epoch = raw.init_producer_id(tid, 60_000)  # epoch >= 1: epoch - 1 is valid
    assert err == NONE and epoch >= 1
    for version, want in ((0, INVALID_PRODUCER_EPOCH), (1, INVALID_PRODUCER_EPOCH),
                          (2, PRODUCER_FENCED)):
        for wrong in (epoch - 1, epoch + 1):
            assert raw.add_partitions(tid, pid, wrong, topic, [0], version) == {(topic, 0): want}, (
                f"AddPartitionsToTxn v{version} epoch {wrong} (current {epoch})")
            assert raw.add_offsets(tid, pid, wrong, unique("g"), version) == want, (
                f"AddOffsetsToTxn v{version} epoch {wrong} (current {epoch})")
            assert raw.end_txn(tid, pid, wrong, True, version) == want, (
                f"EndTxn v{version} epoch {wrong} (current {epoch})")
    assert raw.add_partitions(unique("raw-unknown"), pid, epoch, topic, [0]) == {
        (topic, 0): INVALID_PRODUCER_ID_MAPPING}

    missing = unique("raw-missing")
    assert raw.add_partitions(tid, pid, epoch, missing, [0]) == {
        (missing, 0): UNKNOWN_TOPIC_OR_PARTITION}
    assert raw.add_partitions(tid, pid, epoch, topic, [0, PARTITIONS + 4]) == {
        (topic, 0): OPERATION_NOT_ATTEMPTED, (topic, PARTITIONS + 4): UNKNOWN_TOPIC_OR_PARTITION}
    # Nothing was added, so there is still no transaction to end.
    assert raw.end_txn(tid, pid, epoch, True) == INVALID_TXN_STATE


# -- one coordinator behind two gateways ------------------------------------------------------


@pytest.mark.parametrize("shared_cluster", ["split-2gw"], indirect=True)
def test_two_gateways_share_one_transactional_id(cluster):
    """Producer A reaches the core through gateway 0, producer B with the same transactional.id
    through gateway 1: B's InitProducerId fences A and aborts A's open transaction (the
    coordinator is the core's, not a gateway's); B's commit is what a read_committed reader on
    either gateway sees."""
    from confluent_kafka import KafkaException
    topic = unique("txn-2gw")
    ck_create_topic(cluster.bootstrap_for(0), topic, PARTITIONS)
    tid = unique("two-gateways")
    zombie = make_records(60, n_keys=6, value_size=30, tag="z")
    fresh = make_records(60, n_keys=6, value_size=30, tag="f")

    a = _txn_producer(cluster.bootstrap_for(0), tid)
    a.begin_transaction()
    _produce_acked(a, topic, zombie)
    b = _txn_producer(cluster.bootstrap_for(1), tid)
    with pytest.raises(KafkaException) as fenced:
        a.commit_transaction(30)
    assert fenced.value.args[0].fatal(), f"A was not fenced: {fenced.value}"
    b.begin_transaction()
    acks_b = _produce_acked(b, topic, fresh)
    b.commit_transaction(60)

    for i in (0, 1):
        hw = _wait_stable(cluster.bootstrap_for(i), topic, PARTITIONS)
        got = _consume_to(cluster.bootstrap_for(i), topic, hw, "read_committed")
        verify_exactly_once(fresh, got, acks_b)
