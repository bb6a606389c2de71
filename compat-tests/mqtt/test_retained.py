"""Retained messages: set, replace, clear, the RETAIN flag on delivery, and MQTT 5's
Retain Handling and Retain As Published subscription options."""

import pytest

from mqttcompat import MQTTv311, MQTTv5


def new_subscriber(broker, mq, client_id, protocol, filter_, qos=1, **opts):
    s = mq(broker, client_id, protocol)
    s.connect()
    assert s.subscribe(filter_, qos, **opts) == [qos]
    return s


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_retained_set_replace_clear(broker, mq, uid, protocol):
    topic = f"{uid}/r"
    pub = mq(broker, f"{uid}-p", protocol)
    pub.connect()
    live = new_subscriber(broker, mq, f"{uid}-live", protocol, topic)

    pub.publish(topic, b"v1", qos=1, retain=True)
    s1 = new_subscriber(broker, mq, f"{uid}-s1", protocol, topic)
    [m] = s1.wait_messages(1)
    assert (m.payload, m.retain, m.qos) == (b"v1", True, 1)

    pub.publish(topic, b"v2", qos=1, retain=True)
    s2 = new_subscriber(broker, mq, f"{uid}-s2", protocol, topic)
    [m] = s2.wait_messages(1)
    assert (m.payload, m.retain) == (b"v2", True), "the retained message was not replaced"

    # An empty retained payload clears it, and is still delivered to current subscribers.
    pub.publish(topic, b"", qos=1, retain=True)
    msgs = live.wait_messages(3)
    assert [m.payload for m in msgs] == [b"v1", b"v2", b""]
    # Live deliveries carry RETAIN 0 (MQTT-3.3.1-9; MQTT 5 without Retain As Published).
    assert [m.retain for m in msgs] == [False, False, False]
    s3 = mq(broker, f"{uid}-s3", protocol)
    s3.connect()
    s3.subscribe(f"{uid}/barrier", 1)
    s3.subscribe(topic, 1)
    # A retained copy would be queued right after SUBACK, before this later message.
    pub.publish(f"{uid}/barrier", b"b", qos=1)
    s3.wait_messages(1, topic=f"{uid}/barrier")
    assert s3.received(topic) == [], "a cleared retained message was delivered"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_retained_qos_and_wildcards(broker, mq, uid, protocol):
    """Retained messages of every topic a new filter matches; QoS = min(message, sub)."""
    pub = mq(broker, f"{uid}-p", protocol)
    pub.connect()
    for i, q in enumerate((0, 1, 2)):
        pub.publish(f"{uid}/w/{i}", f"m{i}".encode(), qos=q, retain=True)
    pub.publish(f"{uid}/other/x", b"no", qos=1, retain=True)
    s = new_subscriber(broker, mq, f"{uid}-s", protocol, f"{uid}/w/+", qos=1)
    msgs = s.wait_messages(3)
    got = sorted((m.topic, m.payload, m.qos, m.retain) for m in msgs)
    assert got == [
        (f"{uid}/w/0", b"m0", 0, True),
        (f"{uid}/w/1", b"m1", 1, True),
        (f"{uid}/w/2", b"m2", 1, True),
    ]
    for t in (f"{uid}/w/0", f"{uid}/w/1", f"{uid}/w/2", f"{uid}/other/x"):
        pub.publish(t, b"", qos=1, retain=True)  # leave the shared broker clean


@pytest.mark.parametrize(
    "handling,deliveries",
    [(0, [True, True]), (1, [True, False]), (2, [False, False])],
    ids=["rh0-always", "rh1-new-only", "rh2-never"],
)
def test_v5_retain_handling(broker, mq, uid, handling, deliveries):
    """Retain Handling 0: retained message on every SUBSCRIBE; 1: only when the
    subscription is new; 2: never. Checked on a first SUBSCRIBE and a repeated one."""
    topic = f"{uid}/rh"
    pub = mq(broker, f"{uid}-p", MQTTv5)
    pub.connect()
    pub.publish(topic, b"kept", qos=1, retain=True)
    s = mq(broker, f"{uid}-s", MQTTv5)
    s.connect()
    s.subscribe(f"{uid}/barrier", 1)
    for n, expect in enumerate(deliveries):
        assert s.subscribe(topic, 1, retain_handling=handling) == [1]
        # The retained copy is sent right after SUBACK; a later message on another
        # subscription of the same session is queued after it.
        pub.publish(f"{uid}/barrier", str(n).encode(), qos=1)
        s.wait_messages(n + 1, topic=f"{uid}/barrier")
        got = s.received(topic)
        assert len(got) == sum(deliveries[: n + 1]), (
            f"Retain Handling {handling}, SUBSCRIBE #{n + 1}: {len(got)} retained deliveries"
        )
        assert all(m.retain for m in got)
    pub.publish(topic, b"", qos=1, retain=True)


@pytest.mark.parametrize("rap", [False, True], ids=["rap0", "rap1"])
def test_v5_retain_as_published(broker, mq, uid, rap):
    topic = f"{uid}/rap"
    s = mq(broker, f"{uid}-s", MQTTv5)
    s.connect()
    s.subscribe(topic, 1, retain_as_published=rap)
    pub = mq(broker, f"{uid}-p", MQTTv5)
    pub.connect()
    pub.publish(topic, b"r", qos=1, retain=True)
    pub.publish(topic, b"n", qos=1, retain=False)
    msgs = s.wait_messages(2)
    assert [(m.payload, m.retain) for m in msgs] == [(b"r", rap), (b"n", False)]
    pub.publish(topic, b"", qos=1, retain=True)
