"""Protocol violations from raw sockets: the broker closes that connection (MQTT 5 may send
DISCONNECT with a reason first) and every other client carries on."""

import socket

import pytest

import mqttraw
from mqttcompat import MQTTv311


@pytest.fixture
def bystander(broker, mq, uid):
    """A subscriber connected before the bad input; checked to still work afterwards."""
    s = mq(broker, f"{uid}-by", MQTTv311)
    s.connect()
    s.subscribe(f"{uid}/by", 1)
    yield s
    s.publish(f"{uid}/by", b"still here", qos=1)
    [m] = s.wait_messages(1)
    assert m.payload == b"still here"
    assert s.disconnected is None


def assert_closed(r: mqttraw.RawClient, v5: bool, reasons: set[int] | None = None):
    """The server closes; MQTT 5 allows one DISCONNECT (reason >= 0x80) before it."""
    packets = r.wait_closed()
    if not packets:
        return
    assert v5, f"3.1.1 has no server DISCONNECT, got {packets}"
    [d] = packets
    assert d.type == mqttraw.DISCONNECT, packets
    code = d.body[0] if d.body else 0
    assert code >= 0x80, f"DISCONNECT reason {code:#x}"
    if reasons is not None:
        assert code in reasons, f"DISCONNECT reason {code:#x}, expected one of {reasons}"


def connected(broker, raw_clients, client_id, level):
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(client_id, level=level))
    assert r.connack()[1] == 0
    return r


def test_publish_before_connect(broker, bystander, raw_clients, uid):
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.publish(f"{uid}/by", b"sneaky", qos=0))
    assert r.wait_closed() == []


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
def test_second_connect(broker, bystander, raw_clients, uid, level):
    r = connected(broker, raw_clients, f"{uid}-c", level)
    r.send(mqttraw.connect(f"{uid}-c", level=level))
    assert_closed(r, level == 5, {0x82})


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
@pytest.mark.parametrize("topic", ["{uid}/+", "{uid}/#", "{uid}/a+b"])
def test_publish_to_wildcard_topic(broker, bystander, raw_clients, uid, level, topic):
    r = connected(broker, raw_clients, f"{uid}-c", level)
    r.send(mqttraw.publish(topic.format(uid=uid), b"x", qos=1, v5=level == 5))
    # 0x90 Topic Name invalid; Mosquitto says 0x81 Malformed Packet.
    assert_closed(r, level == 5, {0x90, 0x81, 0x82})


@pytest.mark.parametrize(
    "garbage",
    [
        # A remaining length that never ends (five continuation bytes).
        bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
        # SUBSCRIBE with a packet id and no filter at all.
        bytes([0x82, 0x02, 0x00, 0x01]),
        # SUBSCRIBE with the reserved flags wrong (must be 0b0010).
        mqttraw.packet(mqttraw.SUBSCRIBE, 0, b"\x00\x01" + mqttraw.mqtt_str("a") + b"\x01"),
        # Packet type 0 is reserved.
        bytes([0x00, 0x00]),
        # A PUBLISH whose topic length runs past the packet.
        bytes([0x30, 0x04, 0x00, 0x10, 0x61, 0x62]),
    ],
    ids=["endless-length", "subscribe-empty", "subscribe-flags",
         "reserved-type", "topic-overrun"],
)
def test_malformed_packet_after_connect(broker, bystander, raw_clients, uid, garbage):
    r = connected(broker, raw_clients, f"{uid}-c", 4)
    r.send(garbage)
    assert_closed(r, False)


def test_truncated_packet_then_eof(broker, bystander, raw_clients, uid):
    """Half a PUBLISH and the client's end of the stream: the broker closes too."""
    r = connected(broker, raw_clients, f"{uid}-c", 4)
    r.send(bytes([0x30, 0x64, 0x00, 0x05]) + b"ab")
    r.sock.shutdown(socket.SHUT_WR)
    assert r.wait_closed() == []


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        # A whole CONNECT naming an unknown protocol.
        mqttraw.packet(mqttraw.CONNECT, 0,
                       mqttraw.mqtt_str("ABCD") + b"\x04\x02\x00\x3c" + mqttraw.mqtt_str("x")),
        # A complete CONNECT packet too short to hold its variable header (remaining
        # length 5): malformed as it stands, nothing more belongs to it.
        bytes([0x10, 0x05]) + b"\x00\x03ABC",
    ],
    ids=["http", "unknown-protocol-name", "short-connect"],
)
def test_garbage_instead_of_connect(broker, bystander, raw_clients, first):
    r = broker.raw()
    raw_clients.append(r)
    r.send(first)
    assert r.wait_closed() == []


def test_unsupported_protocol_level(broker, bystander, raw_clients, uid):
    """CONNECT for level 6: CONNACK return code 0x01 (MQTT-3.1.2-2), then close."""
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-c", level=6))
    p = r.read()
    assert p.type == mqttraw.CONNACK, p
    assert p.body == b"\x00\x01", f"CONNACK body {p.body!r}"
    assert r.wait_closed() == []
