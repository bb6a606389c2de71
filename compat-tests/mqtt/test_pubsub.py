"""Publish/subscribe at QoS 0, 1 and 2: exactly-once delivery, per-publisher order, the
granted QoS, a subscription in place once its SUBACK is out (and before a PUBLISH read after
it), unsubscribe, payloads and topic names, pipelined bursts and one larger QoS 1 count."""

import pytest

import mqttraw
from mqttcompat import ROUNDS, MQTTv31, MQTTv311, MQTTv5, subscribe_then_publish

N = 20


@pytest.mark.parametrize("protocol", [MQTTv31, MQTTv311, MQTTv5])
def test_qos_matrix(broker, mq, uid, protocol):
    """Subscribers at QoS 0/1/2 each get every message of publishes at QoS 0/1/2 once, in
    order, at min(publish QoS, subscription QoS)."""
    subs = {}
    for sq in (0, 1, 2):
        s = mq(broker, f"{uid}-s{sq}", protocol)
        s.connect()
        assert s.subscribe(f"{uid}/q/+", sq) == [sq], "SUBACK must grant the requested QoS"
        subs[sq] = s
    pub = mq(broker, f"{uid}-p", protocol)
    pub.connect()
    for pq in (0, 1, 2):
        for i in range(N):
            pub.publish(f"{uid}/q/{pq}", f"{pq}-{i}".encode(), qos=pq, wait=False)
    # QoS 1/2 publishes are acknowledged; QoS 0 ones were written in order before them.
    pub.publish(f"{uid}/q/end", b"end", qos=1)
    for sq, s in subs.items():
        s.wait_messages(1, topic=f"{uid}/q/end")
        msgs = s.wait_messages(3 * N + 1)
        for pq in (0, 1, 2):
            got = [m for m in msgs if m.topic == f"{uid}/q/{pq}"]
            assert [m.payload.decode() for m in got] == [f"{pq}-{i}" for i in range(N)], (
                f"sub QoS {sq}, pub QoS {pq}: lost, duplicated or reordered"
            )
            assert {m.qos for m in got} == {min(pq, sq)}
            assert not any(m.retain for m in got)
        assert len(msgs) == 3 * N + 1, f"extra deliveries: {[m.topic for m in msgs]}"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_order_kept_per_publisher(broker, mq, uid, protocol):
    sub = mq(broker, f"{uid}-s", protocol)
    sub.connect()
    sub.subscribe(f"{uid}/o", 2)
    pubs = [mq(broker, f"{uid}-p{i}", protocol) for i in range(2)]
    for p in pubs:
        p.connect()
    # One QoS per publisher: MQTT orders messages per topic and QoS level (4.6).
    infos = []
    for i in range(100):
        for n, p in enumerate(pubs):
            infos.append((p, p.publish(f"{uid}/o", f"{n}:{i}".encode(), qos=1 + n, wait=False)))
    for p in pubs:
        p.wait_published([info for q, info in infos if q is p])
    msgs = sub.wait_messages(200)
    assert len(msgs) == 200
    for n in range(2):
        seq = [int(m.payload.split(b":")[1]) for m in msgs if m.payload.startswith(f"{n}:".encode())]
        assert seq == list(range(100)), f"publisher {n}: order not kept"


@pytest.mark.parametrize("publisher", ["connected", "disconnects", "drops"])
@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_subscribe_then_publish_from_another_client(broker, mq, uid, publisher, protocol):
    """A SUBACK means the subscription is in the router: a message another client publishes
    right after it is delivered, every round, however the publisher's connection ends (a
    PUBLISH read just before the connection ended is routed, as Mosquitto does)."""
    subscribe_then_publish(broker, broker, mq, uid, publisher, protocol)


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
def test_subscribe_and_publish_pipelined_on_one_connection(broker, raw_clients, uid, level):
    """SUBSCRIBE and a PUBLISH to the same topic written in one go, without waiting for the
    SUBACK: the subscription is in place before the PUBLISH is routed, so the client gets
    SUBACK and then its own message, every round."""
    r = broker.raw()
    raw_clients.append(r)
    v5 = level == 5
    r.send(mqttraw.connect(f"{uid}-pipe", level=level))
    assert r.connack()[1] == 0
    for i in range(ROUNDS):
        topic = f"{uid}/pipe/{i}"
        r.send(mqttraw.subscribe(i + 1, [(topic, 0)], v5=v5)
               + mqttraw.publish(topic, b"%d" % i, v5=v5))
        suback, msg = r.read(), r.read()
        assert suback.type == mqttraw.SUBACK, f"round {i}: {suback!r}"
        assert suback.body[:2] == (i + 1).to_bytes(2, "big")
        assert msg.type == mqttraw.PUBLISH, f"round {i}: {msg!r}"
        assert msg.body.endswith(b"%d" % i) and topic.encode() in msg.body, f"round {i}"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_unsubscribe_stops_delivery(broker, mq, uid, protocol):
    c = mq(broker, f"{uid}-c", protocol)
    c.connect()
    c.subscribe(f"{uid}/u", 1)
    c.subscribe(f"{uid}/keep", 1)
    c.publish(f"{uid}/u", b"before", qos=1)
    c.wait_messages(1, topic=f"{uid}/u")
    c.unsubscribe(f"{uid}/u")
    c.publish(f"{uid}/u", b"after", qos=1)
    # A later message on a topic still subscribed: once it is here, "after" would be too.
    c.publish(f"{uid}/keep", b"barrier", qos=1)
    c.wait_messages(1, topic=f"{uid}/keep")
    assert [m.payload for m in c.received(f"{uid}/u")] == [b"before"]


def test_10k_qos1_messages_counted(broker, mq, uid):
    total = 10_000
    sub = mq(broker, f"{uid}-s", MQTTv311)
    sub.connect()
    sub.subscribe(f"{uid}/bulk", 1)
    pub = mq(broker, f"{uid}-p", MQTTv311, max_inflight=200)
    pub.connect()
    infos = [pub.publish(f"{uid}/bulk", str(i).encode(), qos=1, wait=False) for i in range(total)]
    codes = pub.wait_published(infos, timeout=90)
    assert set(codes) == {0}
    msgs = sub.wait_messages(total, timeout=90)
    got = [int(m.payload) for m in msgs]
    assert len(got) == total and len(set(got)) == total, "lost or duplicated messages"
    assert got == sorted(got), "order not kept"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_payloads_and_topic_names(broker, mq, uid, protocol):
    """Empty and 1 MiB payloads, binary bytes, UTF-8 topic names, empty topic levels."""
    c = mq(broker, f"{uid}-c", protocol)
    c.connect()
    c.subscribe(f"{uid}/#", 1)
    c.subscribe(f"+/{uid}/+", 1)
    cases = [
        (f"{uid}/empty", b""),
        (f"{uid}/big", bytes(range(256)) * 4096),
        (f"{uid}/ünïcødé/✓", b"\x00\xff\x00"),
        (f"{uid}//double", b"a"),
        (f"{uid}/trailing/", b"b"),
        (f"/{uid}/leading", b"c"),
    ]
    for topic, payload in cases:
        c.publish(topic, payload, qos=1)
    msgs = c.wait_messages(len(cases))
    assert [(m.topic, m.payload) for m in msgs] == cases


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_resubscribe_replaces_subscription(broker, mq, uid, protocol):
    """SUBSCRIBE to a filter already subscribed replaces it (MQTT-3.8.4-3): one copy per
    message, at the new QoS."""
    c = mq(broker, f"{uid}-c", protocol)
    c.connect()
    assert c.subscribe(f"{uid}/r", 0) == [0]
    assert c.subscribe(f"{uid}/r", 2) == [2]
    c.subscribe(f"{uid}/end", 1)
    c.publish(f"{uid}/r", b"1", qos=2)
    c.publish(f"{uid}/end", b"end", qos=1)
    c.wait_messages(1, topic=f"{uid}/end")
    c.wait_messages(1, topic=f"{uid}/r")
    assert [(m.payload, m.qos) for m in c.received(f"{uid}/r")] == [(b"1", 2)]


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
def test_pipelined_burst_of_publishes(broker, mq, raw_clients, uid, level):
    """300 QoS 1 PUBLISH packets written in one go (many packets per TCP read): every one is
    acknowledged and routed once, in order."""
    n = 300
    s = mq(broker, f"{uid}-s", MQTTv311)
    s.connect()
    s.subscribe(f"{uid}/burst", 1)
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-raw", level=level))
    assert r.connack()[1] == 0
    r.send(b"".join(mqttraw.publish(f"{uid}/burst", b"%d" % i, qos=1, packet_id=i + 1,
                                    v5=level == 5) for i in range(n)))
    acked = [int.from_bytes(r.read().body[:2], "big") for _ in range(n)]
    assert sorted(acked) == list(range(1, n + 1))
    msgs = s.wait_messages(n)
    assert [int(m.payload) for m in msgs] == list(range(n))
