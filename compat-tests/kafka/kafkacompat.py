"""Shared helpers for the Kafka compatibility scenarios (not a test module).

Named so that it never shadows the kafka-python package (`import kafka`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

# The deployments every scenario on `cluster` runs against; Apache Kafka (the reference) too
# unless KAFKA_REFERENCE=off.
MODES = ["standalone", "split"] + (
    [] if os.environ.get("KAFKA_REFERENCE", "").lower() in ("off", "0", "false", "no")
    else ["apache-kafka"])

# Parametrize a test over every mode, including one core behind two gateways.
ALL_MODES_WITH_TWO_GATEWAYS = pytest.mark.parametrize(
    "shared_cluster", ["standalone", "split", "split-2gw"], indirect=True
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(cond, timeout: float, what: str, interval: float = 0.05):
    """Polls `cond()` until it returns a truthy value; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = cond()
            if v:
                return v
            last_exc = None
        except Exception as e:  # noqa: BLE001 - report the last error at the deadline
            last_exc = e
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:.0f}s waiting for {what}"
            if last_exc is not None:
                msg += f" (last error: {last_exc!r})"
            raise AssertionError(msg)
        time.sleep(interval)


async def async_wait_until(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    key: bytes
    seq: int  # per-key sequence number, 0, 1, 2, ...
    value: bytes
    headers: tuple  # ((name: str, value: bytes | None), ...)


def make_records(n: int, n_keys: int = 64, value_size: int = 100, tag: str = "",
                 null_header: bool = False) -> list[Rec]:
    """n keyed records, keys round-robin, value = "key|seq|" + filler of varying length.

    The filler is partly compressible (repeated words) and partly not (hash bytes), so every
    codec has real work to do.
    """
    seqs: dict[bytes, int] = defaultdict(int)
    out = []
    for i in range(n):
        key = f"key-{tag}{i % n_keys:04d}".encode()
        seq = seqs[key]
        seqs[key] += 1
        head = key + b"|" + str(seq).encode() + b"|"
        size = value_size // 2 + (i * 7919) % max(1, value_size)
        noise = hashlib.sha256(head).digest()
        filler = (b"tributary " * (size // 10 + 1))[: size // 2] + (noise * (size // 64 + 1))[: size - size // 2]
        headers = [("seq", str(seq).encode()), ("origin", b"compat-test")]
        if i % 10 == 0:
            headers.append(("empty", b""))
        if null_header and i % 10 == 5:
            headers.append(("null", None))
        out.append(Rec(key, seq, head + filler, tuple(headers)))
    return out


@dataclass
class Got:
    """One consumed record."""
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple
    timestamp: int | None = None


def norm_headers(headers) -> tuple:
    if not headers:
        return ()
    out = []
    for k, v in headers:
        if isinstance(k, bytes):
            k = k.decode()
        if v is not None and not isinstance(v, bytes):
            v = bytes(v)
        out.append((k, v))
    return tuple(out)


def verify_exactly_once(expected: list[Rec], got: list[Got],
                        delivered: dict | None = None) -> None:
    """Every expected record consumed exactly once, intact, in per-key order.

    `got` must list each partition's records in the order they were consumed. `delivered`
    maps (key, seq) -> (partition, offset) as reported by the producer's acks; when given,
    each record must be found exactly where its ack said.
    """
    by_id = {(r.key, r.seq): r for r in expected}
    assert len(by_id) == len(expected)
    seen: dict[tuple, Got] = {}
    dups = []
    unknown = []
    mismatched = []
    for g in got:
        seq = _seq_of(g)
        rid = (g.key, seq)
        r = by_id.get(rid)
        if r is None:
            unknown.append(g)
            continue
        if rid in seen:
            dups.append((rid, seen[rid], g))
            continue
        seen[rid] = g
        if g.value != r.value or norm_headers(g.headers) != r.headers:
            mismatched.append((rid, g, r))
    missing = [k for k in by_id if k not in seen]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unexpected records, first: {unknown[:3]}")
    if dups:
        problems.append(f"{len(dups)} duplicates, first: {dups[:3]}")
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} records missing, first: {missing[:5]}")
    if mismatched:
        rid, g, r = mismatched[0]
        problems.append(
            f"{len(mismatched)} records altered, first {rid}: got value[:60]={g.value[:60]!r} "
            f"headers={norm_headers(g.headers)!r}; want value[:60]={r.value[:60]!r} headers={r.headers!r}"
        )
    assert not problems, "; ".join(problems)

    # Offsets within a partition strictly increase in consumption order, and a key stays in
    # one partition, so per-key order = per-partition offset order.
    last_off: dict[int, int] = {}
    key_part: dict[bytes, int] = {}
    last_seq: dict[bytes, int] = {}
    for g in got:
        assert g.offset > last_off.get(g.partition, -1), (
            f"partition {g.partition}: offset {g.offset} after {last_off[g.partition]}"
        )
        last_off[g.partition] = g.offset
        assert key_part.setdefault(g.key, g.partition) == g.partition, (
            f"key {g.key!r} found in partitions {key_part[g.key]} and {g.partition}"
        )
        seq = _seq_of(g)
        assert seq == last_seq.get(g.key, -1) + 1, (
            f"key {g.key!r}: seq {seq} follows {last_seq.get(g.key, -1)} "
            f"(partition {g.partition} offset {g.offset})"
        )
        last_seq[g.key] = seq

    if delivered is not None:
        wrong = [(rid, delivered[rid], (seen[rid].partition, seen[rid].offset))
                 for rid in by_id if delivered.get(rid) != (seen[rid].partition, seen[rid].offset)]
        assert not wrong, (
            f"{len(wrong)} records not at the (partition, offset) their ack reported; "
            f"first (id, acked, found): {wrong[:3]}"
        )


def _seq_of(g: Got) -> int:
    assert g.value is not None, f"record without value at {g.partition}/{g.offset}"
    parts = g.value.split(b"|", 2)
    assert len(parts) == 3 and parts[0] == g.key, f"value not ours: {g.value[:40]!r} key={g.key!r}"
    return int(parts[1])


def group_order_violations(views: dict[str, list[Got]]) -> list[str]:
    """Per-key order within each consumer's view, allowing re-delivery of records it saw.

    A consumer may see a record again (at-least-once), but every record it sees for the first
    time must come after every earlier record of that key it has seen.
    """
    bad = []
    for name, view in views.items():
        seen: set = set()
        high: dict[bytes, int] = {}
        for g in view:
            seq = _seq_of(g)
            if (g.key, seq) in seen:
                continue
            seen.add((g.key, seq))
            if seq < high.get(g.key, -1):
                bad.append(f"{name}: key {g.key!r} seq {seq} after {high[g.key]} "
                           f"(partition {g.partition} offset {g.offset})")
            high[g.key] = max(high.get(g.key, -1), seq)
    return bad


# -- confluent-kafka ---------------------------------------------------------------------------


def ck_admin(bootstrap: str, **conf):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap, **conf})


def ck_create_topic(bootstrap: str, topic: str, partitions: int, config: dict | None = None,
                    admin=None):
    from confluent_kafka.admin import NewTopic
    if admin is None:  # not `admin or ...`: an AdminClient with an empty queue is falsy
        admin = ck_admin(bootstrap)
    fs = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1, config=config or {})],
        request_timeout=30,
    )
    fs[topic].result(timeout=30)
    ck_wait_topic(admin, topic, partitions)
    return admin


def ck_wait_topic(admin, topic: str, partitions: int, timeout: float = 20):
    def ready():
        md = admin.list_topics(timeout=5)
        t = md.topics.get(topic)
        return (t is not None and t.error is None and len(t.partitions) == partitions
                and all(p.leader >= 0 for p in t.partitions.values()))
    wait_until(ready, timeout, f"topic {topic} with {partitions} partitions in metadata")


def ck_watermarks(consumer, tp, timeout: float = 20) -> tuple[int, int]:
    """(low, high) of one partition, retrying the errors a client retries. Apache Kafka
    (KRaft) lists a new partition's leader in Metadata before that broker has become its
    leader, and answers ListOffsets with NOT_LEADER_FOR_PARTITION meanwhile."""
    from confluent_kafka import KafkaError, KafkaException
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=10)
        except KafkaException as e:
            err = e.args[0]
            retriable = err.retriable() or err.code() in (
                KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                KafkaError.UNKNOWN_TOPIC_OR_PART)
            if not retriable or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def ck_high_watermarks(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """Latest offsets through a fresh AdminClient (ListOffsets, own connection)."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec
    admin = ck_admin(bootstrap)  # must outlive the futures: a destroyed client never answers
    fs = admin.list_offsets(
        {TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)},
        request_timeout=20)
    return {tp.partition: f.result(timeout=30).offset for tp, f in fs.items()}


def ck_producer(bootstrap: str, **conf):
    from confluent_kafka import Producer
    base = {
        "bootstrap.servers": bootstrap,
        "linger.ms": 5,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    }
    base.update(conf)
    return Producer(base)


def ck_produce(producer, topic: str, recs: list[Rec], timeout: float = 120,
               timestamps: list[int] | None = None) -> dict:
    """Produces `recs` and waits for every ack; returns (key, seq) -> (partition, offset)."""
    delivered: dict = {}
    errors: list = []

    def make_cb(rid):
        def cb(err, msg):
            if err is not None:
                errors.append((rid, err))
            else:
                delivered[rid] = (msg.partition(), msg.offset())
        return cb

    for i, r in enumerate(recs):
        kw = {}
        if timestamps is not None:
            kw["timestamp"] = timestamps[i]
        while True:
            try:
                producer.produce(topic, key=r.key, value=r.value, headers=list(r.headers),
                                 on_delivery=make_cb((r.key, r.seq)), **kw)
                break
            except BufferError:
                producer.poll(0.1)
        if i % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(timeout)
    assert remaining == 0, f"{remaining} records still unacknowledged after {timeout}s"
    assert not errors, f"{len(errors)} produce errors, first: {errors[:3]}"
    assert len(delivered) == len(recs)
    return delivered


def ck_consumer(bootstrap: str, **conf):
    from confluent_kafka import Consumer
    base = {
        "bootstrap.servers": bootstrap,
        "group.id": unique("reader"),
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    }
    base.update(conf)
    return Consumer(base)


def ck_read_all(bootstrap: str, topic: str, partitions: int, timeout: float = 120,
                **conf) -> list[Got]:
    """Reads every partition from its start to the high watermark seen before reading."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition
    c = ck_consumer(bootstrap, **conf)
    try:
        high = {}
        for p in range(partitions):
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            high[p] = hi
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        got: list[Got] = []
        nxt = {p: 0 for p in range(partitions)}
        deadline = time.monotonic() + timeout
        while any(nxt[p] < high[p] for p in range(partitions)):
            assert time.monotonic() < deadline, (
                f"read {len(got)} records in {timeout}s; positions {nxt}, high watermarks {high}"
            )
            for m in c.consume(num_messages=5000, timeout=0.5):
                if m.error():
                    raise KafkaException(m.error())
                got.append(Got(m.partition(), m.offset(), m.key(), m.value(),
                               norm_headers(m.headers()), m.timestamp()[1]))
                nxt[m.partition()] = m.offset() + 1
        return got
    finally:
        c.close()


# -- kafka-python ------------------------------------------------------------------------------


def kp_read_all(bootstrap: str, topic: str, partitions: int, timeout: float = 120) -> list[Got]:
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        high = {tp.partition: off for tp, off in c.end_offsets(tps).items()}
        c.seek_to_beginning(*tps)
        got: list[Got] = []
        nxt = {p: 0 for p in range(partitions)}
        deadline = time.monotonic() + timeout
        while any(nxt[p] < high[p] for p in range(partitions)):
            assert time.monotonic() < deadline, (
                f"read {len(got)} records in {timeout}s; positions {nxt}, high watermarks {high}"
            )
            for tp, msgs in c.poll(timeout_ms=500, max_records=5000).items():
                for m in msgs:
                    got.append(Got(m.partition, m.offset, m.key, m.value,
                                   norm_headers(m.headers), m.timestamp))
                    nxt[m.partition] = m.offset + 1
        return got
    finally:
        c.close()


# -- aiokafka ----------------------------------------------------------------------------------


async def aio_read_all(bootstrap: str, topic: str, partitions: int,
                       timeout: float = 120) -> list[Got]:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                         auto_offset_reset="earliest")
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        high = {tp.partition: off for tp, off in (await c.end_offsets(tps)).items()}
        await c.seek_to_beginning(*tps)
        got: list[Got] = []
        nxt = {p: 0 for p in range(partitions)}
        deadline = time.monotonic() + timeout
        while any(nxt[p] < high[p] for p in range(partitions)):
            assert time.monotonic() < deadline, (
                f"read {len(got)} records in {timeout}s; positions {nxt}, high watermarks {high}"
            )
            batches = await c.getmany(timeout_ms=500, max_records=5000)
            for tp, msgs in batches.items():
                for m in msgs:
                    got.append(Got(m.partition, m.offset, m.key, m.value,
                                   norm_headers(m.headers), m.timestamp))
                    nxt[m.partition] = m.offset + 1
        return got
    finally:
        await c.stop()


@dataclass
class GroupLog:
    """What each member of a consumer group saw, for the group scenarios."""
    views: dict = field(default_factory=lambda: defaultdict(list))

    # list(...) copies under the GIL: members add their first record from other threads.
    def union(self) -> set:
        return {(g.key, _seq_of(g)) for v in list(self.views.values()) for g in list(v)}

    def total(self) -> int:
        return sum(len(v) for v in list(self.views.values()))
