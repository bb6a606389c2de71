"""Keep-alive: a client silent for 1.5 x its keep-alive is disconnected and its will sent."""

import threading
import time

import mqttraw
from mqttcompat import MQTTv311


def test_silent_clients_disconnected_after_one_and_a_half_keep_alives(broker, mq, uid,
                                                                      raw_clients):
    """A 3.1.1 and a 5.0 client (side by side, to save time) with keep-alive 1 s send
    nothing after CONNECT."""
    w = mq(broker, f"{uid}-w", MQTTv311)
    w.connect()
    w.subscribe(f"{uid}/will/+", 1)
    results = {}

    def silent(level: int):
        r = broker.raw()
        raw_clients.append(r)
        r.send(mqttraw.connect(f"{uid}-silent{level}", level=level, keep_alive=1,
                               will=(f"{uid}/will/{level}", b"timeout", 1, False)))
        assert r.connack()[1] == 0
        t0 = time.monotonic()
        try:
            packets = r.wait_closed(timeout=10)
        except AssertionError as e:
            results[level] = e
            return
        results[level] = (time.monotonic() - t0, packets)

    threads = [threading.Thread(target=silent, args=(level,)) for level in (4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    for level in (4, 5):
        assert isinstance(results.get(level), tuple), f"level {level}: {results.get(level)}"
        elapsed, packets = results[level]
        # MQTT-3.1.2-24: disconnect once 1.5 x keep-alive passed without a packet. Mosquitto
        # keeps last-activity times in whole seconds, so it was once seen closing after 1.31 s
        # of our clock; it gets a lower bound of one keep-alive.
        lower = 1.4 if broker.is_tributary else 1.0
        assert elapsed >= lower, f"level {level}: closed after {elapsed:.2f}s, before 1.5 x 1 s"
        # Documented difference, not an xfail because it is not deterministic: Mosquitto
        # 2.0.11 checks keep-alives on a coarse timer and closed such connections after 1.9
        # to 6.0 s (measured), so it only gets a loose bound. Tributary has a timer per
        # connection.
        upper = 2.6 if broker.is_tributary else 8.0
        assert elapsed <= upper, f"level {level}: closed after {elapsed:.2f}s, keep-alive 1 s"
        if level == 5 and packets:  # MQTT 5 allows DISCONNECT 0x8D first
            assert packets[-1].type == mqttraw.DISCONNECT
            assert packets[-1].body[:1] == b"\x8d", f"DISCONNECT reason {packets[-1].body!r}"
    msgs = w.wait_messages(2)
    assert sorted(m.topic for m in msgs) == [f"{uid}/will/4", f"{uid}/will/5"]


def test_pinging_client_stays_connected(broker, raw_clients, uid):
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-ping", keep_alive=1))
    assert r.connack()[1] == 0
    start = time.monotonic()
    # 2.5 s of PINGREQ every 0.5 s: well past 1.5 x keep-alive, still connected.
    while time.monotonic() - start < 2.5:
        r.send(mqttraw.pingreq())
        assert r.read(timeout=2).type == mqttraw.PINGRESP
        time.sleep(0.5)  # the client's ping interval, not a synchronisation
    r.send(mqttraw.disconnect())
