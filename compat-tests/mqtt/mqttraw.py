"""A minimal MQTT packet writer/reader over a plain socket, for the scenarios a well-behaved
client library cannot produce: malformed or out-of-order packets, a client that never pings,
exact CONNACK return codes.

Only what the scenarios need is implemented; every packet is built by hand from the
MQTT 3.1.1 / 5.0 specifications.
"""

from __future__ import annotations

import socket
import struct
import time

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# MQTT 5 property identifiers used here.
PROP_SESSION_EXPIRY = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_WILL_DELAY = 0x18
PROP_TOPIC_ALIAS_MAX = 0x22


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


def props(*items: tuple[int, bytes]) -> bytes:
    """MQTT 5 property block: (identifier, encoded value) pairs, prefixed by their length."""
    body = b"".join(bytes([pid]) + value for pid, value in items)
    return varint(len(body)) + body


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def connect(
    client_id: str,
    *,
    level: int = 4,
    clean: bool = True,
    keep_alive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
    will_props: bytes | None = None,
    connect_props: bytes | None = None,
    username: str | None = None,
    password: bytes | None = None,
) -> bytes:
    """CONNECT for protocol level 3 ("MQIsdp"), 4 (3.1.1), 5 or any other level."""
    name = "MQIsdp" if level == 3 else "MQTT"
    v5 = level == 5
    flags = 0x02 if clean else 0
    payload = mqtt_str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if v5:
            payload += will_props if will_props is not None else props()
        payload += mqtt_str(topic) + mqtt_str(message)
    if username is not None:
        flags |= 0x80
        payload += mqtt_str(username)
    if password is not None:
        flags |= 0x40
        payload += mqtt_str(password)
    variable = mqtt_str(name) + bytes([level, flags]) + u16(keep_alive)
    if v5:
        variable += connect_props if connect_props is not None else props()
    return packet(CONNECT, 0, variable + payload)


def publish(
    topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1, retain: bool = False,
    v5: bool = False,
) -> bytes:
    body = mqtt_str(topic)
    if qos:
        body += u16(packet_id)
    if v5:
        body += props()
    return packet(PUBLISH, (qos << 1) | (1 if retain else 0), body + payload)


def subscribe(packet_id: int, filters: list[tuple[str, int]], *, v5: bool = False) -> bytes:
    body = u16(packet_id) + (props() if v5 else b"")
    for f, opts in filters:
        body += mqtt_str(f) + bytes([opts])
    return packet(SUBSCRIBE, 0x02, body)


def pingreq() -> bytes:
    return packet(PINGREQ, 0, b"")


def disconnect(*, v5: bool = False, reason: int = 0) -> bytes:
    return packet(DISCONNECT, 0, bytes([reason]) + props() if v5 else b"")


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n, mult = 0, 1
    while True:
        b = data[pos]
        pos += 1
        n += (b & 0x7F) * mult
        if not b & 0x80:
            return n, pos
        mult *= 128


def parse_props(body: bytes, pos: int) -> tuple[dict[int, object], int]:
    """The few MQTT 5 properties the scenarios read; other ones are skipped by type."""
    length, pos = read_varint(body, pos)
    end = pos + length
    out: dict[int, object] = {}
    byte_ids = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
    u16_ids = {0x13, 0x21, 0x22, 0x23}
    u32_ids = {0x02, 0x11, 0x18, 0x27}
    str_ids = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
    while pos < end:
        pid = body[pos]
        pos += 1
        if pid in byte_ids:
            out[pid] = body[pos]
            pos += 1
        elif pid in u16_ids:
            out[pid] = struct.unpack_from("!H", body, pos)[0]
            pos += 2
        elif pid in u32_ids:
            out[pid] = struct.unpack_from("!I", body, pos)[0]
            pos += 4
        elif pid in str_ids or pid == 0x09 or pid == 0x16:
            n = struct.unpack_from("!H", body, pos)[0]
            out[pid] = body[pos + 2:pos + 2 + n]
            pos += 2 + n
        elif pid == 0x26:  # user property: two strings
            n = struct.unpack_from("!H", body, pos)[0]
            pos += 2 + n
            n = struct.unpack_from("!H", body, pos)[0]
            pos += 2 + n
        elif pid == 0x0B:  # subscription identifier
            out[pid], pos = read_varint(body, pos)
        else:
            raise ValueError(f"unknown MQTT 5 property 0x{pid:02x}")
    return out, end


class Packet:
    def __init__(self, first: int, body: bytes):
        self.type = first >> 4
        self.flags = first & 0x0F
        self.body = body

    def __repr__(self):
        return f"Packet(type={self.type}, flags={self.flags:#x}, body={self.body[:40]!r})"


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    """One TCP connection speaking bytes; reads whole packets with deadlines."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Reads more bytes; False on EOF/reset. Raises TimeoutError past the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the server before the deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data from the server before the deadline") from None
        except (ConnectionResetError, BrokenPipeError):
            return False
        if not chunk:
            return False
        self.buf += chunk
        return True

    def _take(self) -> Packet | None:
        if len(self.buf) < 2:
            return None
        try:
            length, pos = read_varint(self.buf, 1)
        except IndexError:
            return None
        if len(self.buf) < pos + length:
            return None
        p = Packet(self.buf[0], self.buf[pos:pos + length])
        self.buf = self.buf[pos + length:]
        return p

    def read(self, timeout: float = 5.0) -> Packet:
        """The next packet; raises Closed on EOF and TimeoutError past the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            p = self._take()
            if p is not None:
                return p
            if not self._fill(deadline):
                raise Closed(f"connection closed (unparsed bytes: {self.buf!r})")

    def connack(self, timeout: float = 5.0) -> tuple[bool, int, dict[int, object]]:
        """Reads CONNACK: (session present, return/reason code, v5 properties if any)."""
        p = self.read(timeout)
        assert p.type == CONNACK, f"expected CONNACK, got {p!r}"
        props_out: dict[int, object] = {}
        if len(p.body) > 2:
            props_out, _ = parse_props(p.body, 2)
        return bool(p.body[0] & 1), p.body[1], props_out

    def wait_closed(self, timeout: float = 5.0) -> list[Packet]:
        """Waits until the server closes the connection; returns the packets sent before.

        Raises AssertionError if it is still open at the deadline."""
        got: list[Packet] = []
        deadline = time.monotonic() + timeout
        while True:
            p = self._take()
            if p is not None:
                got.append(p)
                continue
            try:
                if not self._fill(deadline):
                    return got
            except TimeoutError:
                raise AssertionError(
                    f"the server kept the connection open for {timeout}s (got {got!r})"
                ) from None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self):
        """Closes with RST (SO_LINGER 0): the most abrupt way a client can vanish."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()
