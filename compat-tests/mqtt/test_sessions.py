"""Persistent sessions: messages queued while the client is away, session present, clean
sessions, MQTT 5 session expiry."""

import time

import pytest

import mqttraw
from mqttcompat import MQTTv311, MQTTv5, PacketTypes, props

PER_QOS = 10


def persistent(broker, mq, client_id, protocol, clean=False):
    """3.1.1: clean_session=False; 5.0: Clean Start False with a 5-minute session expiry."""
    c = mq(broker, client_id, protocol, clean=clean)
    ack = c.connect(session_expiry=300 if protocol == MQTTv5 else None)
    return c, ack


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_offline_messages_delivered_on_reconnect(broker, mq, uid, protocol):
    cid = f"{uid}-per"
    # A new session that outlives the connection (5.0: Clean Start with an expiry).
    c, ack = persistent(broker, mq, cid, protocol, clean=protocol == MQTTv5)
    assert ack.session_present is False
    assert c.subscribe(f"{uid}/p/#", 2) == [2]
    c.disconnect()

    pub = mq(broker, f"{uid}-pub", protocol)
    pub.connect()
    for i in range(PER_QOS):
        for q in (1, 2):
            assert pub.publish(f"{uid}/p/{q}", f"{q}-{i}".encode(), qos=q) in (0, 0x10)

    c, ack = persistent(broker, mq, cid, protocol)
    assert ack.session_present is True
    msgs = c.wait_messages(2 * PER_QOS)
    for q in (1, 2):
        got = [m for m in msgs if m.topic == f"{uid}/p/{q}"]
        assert [m.payload.decode() for m in got] == [f"{q}-{i}" for i in range(PER_QOS)]
        assert {m.qos for m in got} == {q}
    # The subscription lives on in the session: no new SUBSCRIBE needed.
    pub.publish(f"{uid}/p/1", b"live", qos=1)
    msgs = c.wait_messages(2 * PER_QOS + 1)
    assert len(msgs) == 2 * PER_QOS + 1, "duplicates after the reconnect"
    c.disconnect()


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_clean_session_discards_the_old_one(broker, mq, uid, protocol):
    cid = f"{uid}-per"
    c, _ = persistent(broker, mq, cid, protocol)
    c.subscribe(f"{uid}/d", 1)
    c.disconnect()
    pub = mq(broker, f"{uid}-pub", protocol)
    pub.connect()
    pub.publish(f"{uid}/d", b"queued", qos=1)
    # Reconnecting clean: no session, no queued message, no subscription.
    c2 = mq(broker, cid, protocol, clean=True)
    ack = c2.connect()
    assert ack.session_present is False
    c2.subscribe(f"{uid}/barrier", 1)
    pub.publish(f"{uid}/d", b"after", qos=1)
    pub.publish(f"{uid}/barrier", b"b", qos=1)
    c2.wait_messages(1, topic=f"{uid}/barrier")
    assert c2.received(f"{uid}/d") == [], "the discarded session still delivered"
    c2.disconnect()
    # The clean session did not outlive its connection either.
    c3, ack = persistent(broker, mq, cid, protocol)
    assert ack.session_present is False
    c3.disconnect()


def test_v5_session_expiry_zero_ends_with_connection(broker, mq, uid):
    cid = f"{uid}-c"
    c = mq(broker, cid, MQTTv5, clean=True)
    c.connect()  # no Session Expiry Interval: 0
    c.subscribe(f"{uid}/x", 1)
    c.disconnect()
    c2 = mq(broker, cid, MQTTv5, clean=False)
    assert c2.connect(session_expiry=60).session_present is False


def test_v5_session_expires(broker, mq, uid):
    cid = f"{uid}-c"
    c = mq(broker, cid, MQTTv5, clean=True)
    c.connect(session_expiry=1)
    c.subscribe(f"{uid}/x", 1)
    c.disconnect()
    time.sleep(2.2)  # letting the 1 s session expiry pass (Mosquitto checks once a second)
    c2 = mq(broker, cid, MQTTv5, clean=False)
    assert c2.connect(session_expiry=60).session_present is False


def test_v5_session_expiry_set_to_zero_on_disconnect(broker, mq, uid):
    """DISCONNECT may lower the expiry: 300 on CONNECT, 0 on DISCONNECT ends the session."""
    cid = f"{uid}-c"
    c = mq(broker, cid, MQTTv5, clean=True)
    c.connect(session_expiry=300)
    c.subscribe(f"{uid}/x", 1)
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    c2 = mq(broker, cid, MQTTv5, clean=False)
    assert c2.connect(session_expiry=60).session_present is False


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_unacknowledged_delivery_resent_after_reconnect(broker, mq, uid, protocol, raw_clients):
    """A QoS 1 delivery the client never acknowledged comes again (DUP set) when the
    persistent session resumes."""
    cid = f"{uid}-raw"
    level = 5 if protocol == MQTTv5 else 4
    session = mqttraw.props((mqttraw.PROP_SESSION_EXPIRY, mqttraw.u32(300))) if level == 5 else None
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(cid, level=level, clean=level == 5, connect_props=session))
    assert r.connack()[1] == 0
    r.send(mqttraw.subscribe(1, [(f"{uid}/dup", 1)], v5=level == 5))
    assert r.read().type == mqttraw.SUBACK
    pub = mq(broker, f"{uid}-pub", protocol)
    pub.connect()
    pub.publish(f"{uid}/dup", b"once", qos=1)
    p = r.read()
    assert p.type == mqttraw.PUBLISH and not p.flags & 0x08
    r.abort()  # no PUBACK
    r2 = broker.raw()
    raw_clients.append(r2)
    r2.send(mqttraw.connect(cid, level=level, clean=False, connect_props=session))
    present, rc, _ = r2.connack()
    assert (present, rc) == (True, 0)
    p = r2.read()
    assert p.type == mqttraw.PUBLISH, p
    assert p.flags & 0x08, "redelivery without DUP"
    assert b"once" in p.body


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_takeover_resends_unacknowledged_deliveries(broker, mq, uid, protocol, raw_clients):
    """A second connection takes over a persistent session while the first holds an
    unacknowledged QoS 1 delivery: the new connection gets it (DUP) and later messages."""
    cid = f"{uid}-raw"
    level = 5 if protocol == MQTTv5 else 4
    session = mqttraw.props((mqttraw.PROP_SESSION_EXPIRY, mqttraw.u32(300))) if level == 5 else None
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(cid, level=level, clean=level == 5, connect_props=session))
    assert r.connack()[1] == 0
    r.send(mqttraw.subscribe(1, [(f"{uid}/t", 1)], v5=level == 5))
    assert r.read().type == mqttraw.SUBACK
    pub = mq(broker, f"{uid}-pub", protocol)
    pub.connect()
    pub.publish(f"{uid}/t", b"first", qos=1)
    assert r.read().type == mqttraw.PUBLISH  # never acknowledged
    c = mq(broker, cid, protocol, clean=False)
    assert c.connect(session_expiry=300 if level == 5 else None).session_present is True
    r.wait_closed()
    pub.publish(f"{uid}/t", b"second", qos=1)
    msgs = c.wait_messages(2)
    assert [(m.payload, m.dup) for m in msgs] == [(b"first", True), (b"second", False)]


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_unsubscribe_persists_in_session(broker, mq, uid, protocol):
    cid = f"{uid}-per"
    c, _ = persistent(broker, mq, cid, protocol, clean=protocol == MQTTv5)
    c.subscribe(f"{uid}/gone", 1)
    c.subscribe(f"{uid}/kept", 1)
    c.unsubscribe(f"{uid}/gone")
    c.disconnect()
    pub = mq(broker, f"{uid}-pub", protocol)
    pub.connect()
    pub.publish(f"{uid}/gone", b"no", qos=1)
    pub.publish(f"{uid}/kept", b"yes", qos=1)
    c, ack = persistent(broker, mq, cid, protocol)
    assert ack.session_present
    c.wait_messages(1, topic=f"{uid}/kept")
    assert c.received(f"{uid}/gone") == []
