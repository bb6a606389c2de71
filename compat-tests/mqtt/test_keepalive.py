"""Keep-alive: a client silent for 1.5 x its keep-alive is disconnected and its will sent."""

import time

import pytest

import mqttraw
from mqttcompat import MQTTv311, MQTTv5


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_silent_client_disconnected_after_one_and_a_half_keep_alives(
    broker, mq, uid, raw_clients, protocol
):
    topic = f"{uid}/will"
    w = mq(broker, f"{uid}-w", protocol)
    w.connect()
    w.subscribe(topic, 1)
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-silent", level=5 if protocol == MQTTv5 else 4,
                           keep_alive=1, will=(topic, b"timeout", 1, False)))
    assert r.connack()[1] == 0
    t0 = time.monotonic()
    packets = r.wait_closed(timeout=6)
    elapsed = time.monotonic() - t0
    # MQTT-3.1.2-24: disconnect after 1.5 x keep-alive without a packet. Mosquitto checks
    # keep-alives on a 1 s tick, hence the upper bound.
    assert 1.4 <= elapsed <= 2.6, f"closed after {elapsed:.2f}s with keep-alive 1 s"
    if protocol == MQTTv5 and packets:
        assert packets[-1].type == mqttraw.DISCONNECT
        assert packets[-1].body[:1] == b"\x8d", f"DISCONNECT reason {packets[-1].body[:1]!r}"
    [m] = w.wait_messages(1)
    assert m.payload == b"timeout"


def test_pinging_client_stays_connected(broker, raw_clients, uid):
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-ping", keep_alive=1))
    assert r.connack()[1] == 0
    start = time.monotonic()
    # Three seconds of PINGREQ every 0.5 s (twice the keep-alive without a disconnect).
    while time.monotonic() - start < 3.0:
        r.send(mqttraw.pingreq())
        assert r.read(timeout=2).type == mqttraw.PINGRESP
        time.sleep(0.5)  # the client's ping interval, not a synchronisation
    r.send(mqttraw.disconnect())
