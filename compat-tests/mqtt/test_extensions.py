"""Broker extensions: `$delayed/` publishes and the `$SYS/` statistics topics."""

import time

import pytest

from mqttcompat import MQTTv311, MQTTv5


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
@pytest.mark.differs(
    "mosquitto",
    reason="`$delayed/{seconds}/{topic}` is EMQX's delayed publish, which Tributary "
    "implements; Mosquitto has no such extension and routes the message to the literal topic",
)
def test_delayed_publish(broker, mq, uid, protocol):
    s = mq(broker, f"{uid}-s", protocol)
    s.connect()
    s.subscribe(f"{uid}/later", 1)
    p = mq(broker, f"{uid}-p", protocol)
    p.connect()
    p.publish(f"$delayed/2/{uid}/later", b"tick", qos=1)
    t0 = time.monotonic()
    [m] = s.wait_messages(1, timeout=4.5)
    elapsed = time.monotonic() - t0
    assert (m.topic, m.payload) == (f"{uid}/later", b"tick")
    assert 1.5 <= elapsed <= 4.0, f"delivered {elapsed:.2f}s after the publish"


@pytest.mark.parametrize("topic", ["$SYS/broker/uptime", "$SYS/broker/version"])
def test_sys_topics_retained(broker, mq, uid, topic):
    """Both brokers publish these retained (values differ: Mosquitto says "mosquitto version
    2.0.11", Tributary "tributary X.Y.Z"; uptime is "N seconds" on both). They refresh every
    10 s, so a first value may take that long on a broker that just started."""
    s = mq(broker, f"{uid}-s", MQTTv311)
    s.connect()
    s.subscribe(topic, 0)
    # Nothing may arrive for up to one refresh period: no early give-up before the timeout.
    [m, *_] = s.wait_messages(1, timeout=15, stall=15)
    assert m.topic == topic and m.payload
    if topic.endswith("uptime"):
        assert m.payload.decode().endswith(" seconds"), m.payload
        assert int(m.payload.split()[0]) >= 0
    else:
        assert m.payload.decode().startswith(broker.kind), m.payload


def test_sys_topics_listed_by_wildcard(broker, mq, uid):
    """`$SYS/#` is an explicit subscription to them (unlike `#`): it lists the statistics
    both brokers share."""
    s = mq(broker, f"{uid}-s", MQTTv311)
    s.connect()
    s.subscribe("$SYS/broker/#", 0)
    wanted = {"$SYS/broker/uptime", "$SYS/broker/version", "$SYS/broker/clients/connected",
              "$SYS/broker/messages/received"}
    s.wait(lambda: wanted <= {m.topic for m in s.messages}, timeout=15,
           what=f"retained {sorted(wanted)}")
