"""Kafka gateways as a fleet (`--kafka-broker-id`): clients see every live gateway as a
broker, partitions and coordinators spread over them, and leadership moves to the others
when a gateway dies. Tributary only: Apache Kafka's brokers own their partitions' data; here
every gateway serves every partition from the core, so the test checks what clients see and
that nothing acknowledged is lost while leadership moves."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kafkacompat import unique, wait_until

# A gateway is listed until 10 s after its last registration (fleet.rs TTL), plus a renewal.
MOVE_TIMEOUT_S = 30.0
PARTITIONS = 6


@pytest.fixture
def fleet(make_deployment):
    return make_deployment("fleet")


def brokers_and_leaders(bootstrap: str, topic: str):
    # Quiet: the killed gateway refuses connections until the survivor stops listing it.
    asker = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    md = asker.list_topics(topic, timeout=10)
    brokers = {b.id: f"{b.host}:{b.port}" for b in md.brokers.values()}
    leaders = {p.id: p.leader for p in md.topics[topic].partitions.values()}
    return brokers, leaders


def test_every_gateway_is_a_broker_and_leads_partitions(fleet):
    topic = unique("fleet")
    admin = AdminClient({"bootstrap.servers": fleet.bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    # Each gateway lists the other once their registrations reached the core.
    for bootstrap in fleet.bootstraps:
        brokers = wait_until(
            lambda b=bootstrap: (lambda r: r if len(r[0]) == 2 else None)(
                brokers_and_leaders(b, topic)),
            MOVE_TIMEOUT_S, "both gateways listed")[0]
        assert sorted(brokers.values()) == sorted(fleet.bootstraps)
    b1, l1 = brokers_and_leaders(fleet.bootstraps[0], topic)
    b2, l2 = brokers_and_leaders(fleet.bootstraps[1], topic)
    assert l1 == l2, "the gateways disagree on the leaders"
    assert set(l1.values()) == {1, 2}, l1
    # The coordinator of a group is one of them, the same whichever gateway is asked.
    group = unique("g")
    coordinators = []
    for bootstrap in fleet.bootstraps:
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                      "auto.offset.reset": "earliest"})
        c.subscribe([topic])
        deadline = time.monotonic() + 30
        while not c.assignment() and time.monotonic() < deadline:
            c.poll(0.2)
        c.close()
    # librdkafka does not expose FindCoordinator; DescribeConsumerGroups names it.
    for bootstrap in fleet.bootstraps:
        asker = AdminClient({"bootstrap.servers": bootstrap})  # kept: its futures need it
        d = asker.describe_consumer_groups([group])
        coordinators.append(d[group].result(timeout=30).coordinator.id)
    assert coordinators[0] == coordinators[1] and coordinators[0] in (1, 2), coordinators


def test_leadership_moves_when_a_gateway_dies_and_nothing_acked_is_lost(fleet):
    topic = unique("fleet-move")
    admin = AdminClient({"bootstrap.servers": fleet.bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    wait_until(lambda: set(brokers_and_leaders(fleet.bootstraps[0], topic)[1].values()) == {1, 2},
               MOVE_TIMEOUT_S, "partitions led by both gateways")

    acked: list[bytes] = []
    failed: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def produce():
        p = Producer({"bootstrap.servers": ",".join(fleet.bootstraps), "acks": "all",
                      "enable.idempotence": True, "linger.ms": 5,
                      "message.timeout.ms": 60000})

        def cb(err, msg):
            with lock:
                if err is None:
                    acked.append(msg.value())
                else:
                    failed.append(str(err))

        i = 0
        while not stop.is_set():
            p.produce(topic, f"m{i}".encode(), partition=i % PARTITIONS, on_delivery=cb)
            p.poll(0)
            i += 1
            if i % 50 == 0:
                p.flush(10)
        assert p.flush(60) == 0

    t = threading.Thread(target=produce)
    t.start()
    try:
        wait_until(lambda: len(acked) >= 200, 30, "acknowledged writes before the kill")
        gateway2 = fleet.processes[2]
        gateway2.stop(signal.SIGKILL)
        killed = time.monotonic()
        before = len(acked)
        # The survivor stops listing gateway 2 and leads every partition.
        wait_until(lambda: brokers_and_leaders(fleet.bootstraps[0], topic)
                   == ({1: fleet.bootstraps[0]}, {p: 1 for p in range(PARTITIONS)}),
                   MOVE_TIMEOUT_S, "leadership moved to gateway 1")
        moved_s = time.monotonic() - killed
        # Writes to every partition are acknowledged again through gateway 1.
        wait_until(lambda: len(acked) >= before + 500, MOVE_TIMEOUT_S,
                   "acknowledged writes after the move")
    finally:
        stop.set()
        t.join(120)
    print(f"leadership moved {moved_s:.1f} s after the kill; {len(acked)} acked, "
          f"{len(failed)} failed")
    assert not failed, failed[:5]

    c = Consumer({"bootstrap.servers": fleet.bootstraps[0], "group.id": unique("check"),
                  "enable.auto.commit": False})
    ends = {}
    for p in range(PARTITIONS):
        ends[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    seen: list[bytes] = []
    done = {p for p, end in ends.items() if end == 0}
    deadline = time.monotonic() + 60
    while len(done) < PARTITIONS and time.monotonic() < deadline:
        m = c.poll(1)
        if m is None:
            continue
        if m.error():
            raise KafkaException(m.error())
        seen.append(m.value())
        if m.offset() + 1 >= ends[m.partition()]:
            done.add(m.partition())
    c.close()
    missing = set(acked) - set(seen)
    assert not missing, f"{len(missing)} acknowledged messages missing, e.g. {sorted(missing)[:5]}"
    assert len(seen) == len(set(seen)), "duplicates despite idempotence"
