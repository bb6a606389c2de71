"""Will messages: sent when a connection ends without DISCONNECT, not after a normal one,
MQTT 5's Will Delay Interval and DISCONNECT with reason 0x04."""

import time

import pytest

import mqttraw
from mqttcompat import QUIET_S, MQTTv311, MQTTv5, PacketTypes, props


def watcher(broker, mq, uid, protocol, topic):
    w = mq(broker, f"{uid}-w", protocol)
    w.connect()
    w.subscribe(topic, 1)
    return w


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_will_sent_on_abrupt_close(broker, mq, uid, protocol):
    topic = f"{uid}/will"
    w = watcher(broker, mq, uid, protocol, topic)
    c = mq(broker, f"{uid}-c", protocol)
    c.connect(will=(topic, b"bye", 1, True))
    c.drop()
    [m] = w.wait_messages(1)
    assert (m.topic, m.payload, m.qos) == (topic, b"bye", 1)
    # A retained will stays for later subscribers.
    late = mq(broker, f"{uid}-late", protocol)
    late.connect()
    late.subscribe(topic, 1)
    [m] = late.wait_messages(1)
    assert (m.payload, m.retain) == (b"bye", True)
    late.publish(topic, b"", qos=1, retain=True)


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_will_sent_when_socket_reset(broker, uid, mq, raw_clients, protocol):
    """A client that vanishes with a TCP reset right after CONNACK."""
    topic = f"{uid}/will"
    w = watcher(broker, mq, uid, protocol, topic)
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-raw", level=5 if protocol == MQTTv5 else 4,
                           will=(topic, b"reset", 0, False)))
    assert r.connack()[1] == 0
    r.abort()
    [m] = w.wait_messages(1)
    assert m.payload == b"reset"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_no_will_after_disconnect(broker, mq, uid, protocol):
    topic = f"{uid}/will"
    w = watcher(broker, mq, uid, protocol, topic)
    c = mq(broker, f"{uid}-c", protocol)
    c.connect(will=(topic, b"bye", 1, False))
    c.disconnect()
    time.sleep(QUIET_S)  # only to show that no will arrives
    assert w.received() == []


def test_v5_disconnect_with_will_message_reason(broker, mq, uid):
    """DISCONNECT with reason 0x04 (Disconnect with Will Message) publishes the will."""
    topic = f"{uid}/will"
    w = watcher(broker, mq, uid, MQTTv5, topic)
    c = mq(broker, f"{uid}-c", MQTTv5)
    c.connect(will=(topic, b"asked", 1, False))
    c.disconnect(reason=0x04)
    [m] = w.wait_messages(1)
    assert m.payload == b"asked"


def test_v5_will_delay(broker, mq, uid):
    """Will Delay Interval 2 s (session expiry longer): the will comes ~2 s after the drop."""
    topic = f"{uid}/will"
    w = watcher(broker, mq, uid, MQTTv5, topic)
    c = mq(broker, f"{uid}-c", MQTTv5, clean=True)
    c.connect(session_expiry=30, will=(topic, b"late", 1, False),
              will_properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=2))
    c.drop()
    t0 = time.monotonic()
    [m] = w.wait_messages(1, timeout=10)
    elapsed = time.monotonic() - t0
    assert m.payload == b"late"
    assert 1.5 <= elapsed <= 4.5, f"delayed will arrived after {elapsed:.2f}s"


def test_v5_will_delay_cancelled_by_reconnect(broker, mq, uid):
    topic = f"{uid}/will"
    w = watcher(broker, mq, uid, MQTTv5, topic)
    c = mq(broker, f"{uid}-c", MQTTv5, clean=True)
    c.connect(session_expiry=30, will=(topic, b"late", 1, False),
              will_properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=2))
    c.drop()
    t0 = time.monotonic()
    again = mq(broker, f"{uid}-c", MQTTv5, clean=False)
    assert again.connect(session_expiry=30).session_present is True
    # Waiting past the will delay, only to show that the will does not come.
    time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
    assert w.received() == [], "the will was sent although the client came back in time"
    again.disconnect()


def test_v5_will_sent_when_session_expires_before_delay(broker, mq, uid):
    """The will goes at the end of the session when that comes before the will delay."""
    topic = f"{uid}/will"
    w = watcher(broker, mq, uid, MQTTv5, topic)
    c = mq(broker, f"{uid}-c", MQTTv5)
    c.connect(session_expiry=1, will=(topic, b"expired", 1, False),
              will_properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=30))
    c.drop()
    t0 = time.monotonic()
    [m] = w.wait_messages(1, timeout=10)
    elapsed = time.monotonic() - t0
    assert m.payload == b"expired"
    assert elapsed <= 4.0, f"will after {elapsed:.2f}s, the session expired after 1s"
