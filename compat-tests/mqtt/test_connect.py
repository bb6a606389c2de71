"""CONNECT / CONNACK with each protocol level, client ids, session takeover."""

import pytest

import mqttraw
from mqttcompat import MQTTv31, MQTTv311, MQTTv5


@pytest.mark.parametrize("protocol", [MQTTv31, MQTTv311, MQTTv5])
def test_connect_each_protocol_level(broker, mq, uid, protocol):
    c = mq(broker, f"{uid}-a", protocol)
    ack = c.connect()
    assert ack.reason == 0
    assert ack.session_present is False
    # The connection is usable: a round trip through the broker.
    assert c.subscribe(f"{uid}/hello", 1) == [1]
    c.publish(f"{uid}/hello", b"hi", qos=1)
    [m] = c.wait_messages(1)
    assert (m.topic, m.payload, m.qos) == (f"{uid}/hello", b"hi", 1)
    c.disconnect()
    assert c.disconnected.reason == 0


def test_v5_empty_client_id_is_assigned(broker, mq, uid):
    c = mq(broker, "", MQTTv5)
    ack = c.connect()
    assigned = getattr(ack.properties, "AssignedClientIdentifier", None)
    assert assigned, f"CONNACK has no Assigned Client Identifier: {ack.properties}"
    # The session works under the assigned id.
    assert c.subscribe(f"{uid}/x", 1) == [1]
    c.publish(f"{uid}/x", b"1", qos=1)
    c.wait_messages(1)


def test_v311_empty_client_id_with_clean_session_is_accepted(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect("", level=4, clean=True))
    present, rc, _ = r.connack()
    assert (present, rc) == (False, 0)


@pytest.mark.parametrize("level", [3, 4])
def test_v3_empty_client_id_refused(broker, raw_clients, level):
    """3.1.1: empty id with clean_session=0 -> CONNACK 0x02 and close (MQTT-3.1.3-8).
    3.1 has no empty ids at all (identifier rejected)."""
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect("", level=level, clean=level == 3))
    present, rc, _ = r.connack()
    assert (present, rc) == (False, 2)
    r.wait_closed()


def test_v5_empty_client_id_without_clean_start_is_assigned(broker, raw_clients):
    """MQTT 5 ties no Clean Start condition to a server-assigned id (3.1.3-6/7): Mosquitto
    accepts and assigns one; so does Tributary's gateway logic (conn.rs refuses only 3.x)."""
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect("", level=5, clean=False))
    present, rc, props = r.connack()
    assert rc == 0, f"CONNACK reason {rc:#x}"
    assert present is False
    assert props.get(mqttraw.PROP_ASSIGNED_CLIENT_ID)


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_session_takeover_closes_first_connection(broker, mq, uid, protocol):
    first = mq(broker, f"{uid}-same", protocol)
    first.connect()
    second = mq(broker, f"{uid}-same", protocol)
    second.connect()
    first.wait_disconnected()
    # The new connection is the live one.
    assert second.subscribe(f"{uid}/t", 1) == [1]
    second.publish(f"{uid}/t", b"x", qos=1)
    second.wait_messages(1)
    assert second.disconnected is None


@pytest.mark.differs(
    "mosquitto",
    reason="Mosquitto 2.0.11 closes the taken-over MQTT 5 connection without sending "
    "DISCONNECT 0x8E (Session taken over, MQTT 5 3.1.4-3)",
)
def test_v5_takeover_sends_disconnect_0x8e(broker, mq, uid):
    first = mq(broker, f"{uid}-same", MQTTv5)
    first.connect()
    second = mq(broker, f"{uid}-same", MQTTv5)
    second.connect()
    d = first.wait_disconnected()
    assert d.from_server, f"no DISCONNECT packet before the close: {d}"
    assert d.reason == 0x8E, f"DISCONNECT reason {d.reason:#x}, expected 0x8E"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_takeover_publishes_the_old_connections_will(broker, mq, uid, protocol):
    """The taken-over connection ends without DISCONNECT, so its will (no delay) is sent."""
    watcher = mq(broker, f"{uid}-w", protocol)
    watcher.connect()
    watcher.subscribe(f"{uid}/will", 1)
    first = mq(broker, f"{uid}-same", protocol)
    first.connect(will=(f"{uid}/will", b"gone", 1, False))
    second = mq(broker, f"{uid}-same", protocol)
    second.connect()
    first.wait_disconnected()
    [m] = watcher.wait_messages(1)
    assert m.payload == b"gone"
