"""Tributary split deployments: one core, two MQTT gateways. Sessions live in the core, so
a client finds its session, its queued messages and its takeover through either gateway."""

import pytest

from mqttcompat import MQTTv311, MQTTv5, subscribe_then_publish

pytestmark = pytest.mark.tributary_only(
    reason="split deployments (core + gateways) are Tributary's architecture")


@pytest.fixture
def two_gateways(make_tributary):
    d = make_tributary("split-2gw")
    return d.broker(0), d.broker(1)


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_session_resumed_through_the_other_gateway(two_gateways, mq, uid, protocol):
    a, b = two_gateways
    cid = f"{uid}-roam"
    c = mq(a, cid, protocol, clean=False)
    assert c.connect(session_expiry=300).session_present is False
    c.subscribe(f"{uid}/x/#", 2)
    c.disconnect()
    pub = mq(b, f"{uid}-pub", protocol)
    pub.connect()
    for i in range(10):
        for q in (1, 2):
            pub.publish(f"{uid}/x/{q}", f"{q}-{i}".encode(), qos=q)
    c2 = mq(b, cid, protocol, clean=False)
    assert c2.connect(session_expiry=300).session_present is True
    msgs = c2.wait_messages(20)
    for q in (1, 2):
        assert [m.payload.decode() for m in msgs if m.topic == f"{uid}/x/{q}"] == [
            f"{q}-{i}" for i in range(10)
        ]
    # Live routing across gateways too.
    pub.publish(f"{uid}/x/1", b"live", qos=1)
    assert c2.wait_messages(21)[-1].payload == b"live"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_takeover_across_gateways(two_gateways, mq, uid, protocol):
    a, b = two_gateways
    first = mq(a, f"{uid}-same", protocol)
    first.connect()
    second = mq(b, f"{uid}-same", protocol)
    second.connect()
    d = first.wait_disconnected()
    if protocol == MQTTv5:
        assert d.from_server and d.reason == 0x8E, d
    second.subscribe(f"{uid}/t", 1)
    second.publish(f"{uid}/t", b"x", qos=1)
    second.wait_messages(1)


def test_retained_and_will_across_gateways(two_gateways, mq, uid):
    a, b = two_gateways
    w = mq(b, f"{uid}-w", MQTTv311)
    w.connect()
    w.subscribe(f"{uid}/will", 1)
    c = mq(a, f"{uid}-c", MQTTv311)
    c.connect(will=(f"{uid}/will", b"gone", 1, False))
    c.publish(f"{uid}/ret", b"kept", qos=1, retain=True)
    c.drop()
    [m] = w.wait_messages(1)
    assert m.payload == b"gone"
    w.subscribe(f"{uid}/ret", 1)
    [m] = w.wait_messages(1, topic=f"{uid}/ret")
    assert (m.payload, m.retain) == (b"kept", True)


@pytest.mark.parametrize("publisher", ["connected", "disconnects", "drops"])
def test_subscribe_on_one_gateway_publish_through_the_other(two_gateways, mq, uid, publisher):
    """The subscriber's SUBACK comes through gateway A, the message through gateway B, whose
    publisher may go away right after its QoS 0 PUBLISH (DISCONNECT or not): the PUBLISH still
    reaches the core (a gateway ends its core stream only once the core has taken every
    command of the connection)."""
    a, b = two_gateways
    subscribe_then_publish(a, b, mq, uid, publisher)
