"""Hand-made AMQP 0-9-1 frames over a raw socket, for what a client library will not send
(bad frames, odd protocol headers, AMQPLAIN, a client that stops sending heartbeats).

Frames (spec 4.2.3): type octet, channel short, size long, payload, frame-end octet 0xCE.
Method payloads are class id, method id and the arguments in the order of METHODS below,
encoded with the spec's domains (octet, short, long, longlong, shortstr, longstr, table,
bits packed into octets). Field tables use RabbitMQ's field types (the 0-9-1 errata set).
"""

from __future__ import annotations

import dataclasses
import decimal
import socket
import struct
import time

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
FRAME_MIN_SIZE = 4096

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class ConnectionLost(Exception):
    """The server closed the socket (EOF) or reset it."""


# -- methods: (class id, method id) -> (name, [(argument, domain)]) ------------------------

METHODS: dict[tuple[int, int], tuple[str, list[tuple[str, str]]]] = {
    (10, 10): ("connection.start", [
        ("version_major", "octet"), ("version_minor", "octet"),
        ("server_properties", "table"), ("mechanisms", "longstr"), ("locales", "longstr")]),
    (10, 11): ("connection.start-ok", [
        ("client_properties", "table"), ("mechanism", "shortstr"), ("response", "longstr"),
        ("locale", "shortstr")]),
    (10, 20): ("connection.secure", [("challenge", "longstr")]),
    (10, 21): ("connection.secure-ok", [("response", "longstr")]),
    (10, 30): ("connection.tune", [
        ("channel_max", "short"), ("frame_max", "long"), ("heartbeat", "short")]),
    (10, 31): ("connection.tune-ok", [
        ("channel_max", "short"), ("frame_max", "long"), ("heartbeat", "short")]),
    (10, 40): ("connection.open", [
        ("virtual_host", "shortstr"), ("reserved_1", "shortstr"), ("reserved_2", "bit")]),
    (10, 41): ("connection.open-ok", [("reserved_1", "shortstr")]),
    (10, 50): ("connection.close", [
        ("reply_code", "short"), ("reply_text", "shortstr"), ("class_id", "short"),
        ("method_id", "short")]),
    (10, 51): ("connection.close-ok", []),
    (10, 60): ("connection.blocked", [("reason", "shortstr")]),
    (10, 61): ("connection.unblocked", []),
    (10, 70): ("connection.update-secret", [("new_secret", "longstr"), ("reason", "shortstr")]),
    (10, 71): ("connection.update-secret-ok", []),
    (20, 10): ("channel.open", [("reserved_1", "shortstr")]),
    (20, 11): ("channel.open-ok", [("reserved_1", "longstr")]),
    (20, 20): ("channel.flow", [("active", "bit")]),
    (20, 21): ("channel.flow-ok", [("active", "bit")]),
    (20, 40): ("channel.close", [
        ("reply_code", "short"), ("reply_text", "shortstr"), ("class_id", "short"),
        ("method_id", "short")]),
    (20, 41): ("channel.close-ok", []),
    (40, 10): ("exchange.declare", [
        ("reserved_1", "short"), ("exchange", "shortstr"), ("type", "shortstr"),
        ("passive", "bit"), ("durable", "bit"), ("auto_delete", "bit"), ("internal", "bit"),
        ("no_wait", "bit"), ("arguments", "table")]),
    (40, 11): ("exchange.declare-ok", []),
    (40, 20): ("exchange.delete", [
        ("reserved_1", "short"), ("exchange", "shortstr"), ("if_unused", "bit"),
        ("no_wait", "bit")]),
    (40, 21): ("exchange.delete-ok", []),
    (50, 10): ("queue.declare", [
        ("reserved_1", "short"), ("queue", "shortstr"), ("passive", "bit"),
        ("durable", "bit"), ("exclusive", "bit"), ("auto_delete", "bit"), ("no_wait", "bit"),
        ("arguments", "table")]),
    (50, 11): ("queue.declare-ok", [
        ("queue", "shortstr"), ("message_count", "long"), ("consumer_count", "long")]),
    (50, 20): ("queue.bind", [
        ("reserved_1", "short"), ("queue", "shortstr"), ("exchange", "shortstr"),
        ("routing_key", "shortstr"), ("no_wait", "bit"), ("arguments", "table")]),
    (50, 21): ("queue.bind-ok", []),
    (50, 30): ("queue.purge", [
        ("reserved_1", "short"), ("queue", "shortstr"), ("no_wait", "bit")]),
    (50, 31): ("queue.purge-ok", [("message_count", "long")]),
    (50, 40): ("queue.delete", [
        ("reserved_1", "short"), ("queue", "shortstr"), ("if_unused", "bit"),
        ("if_empty", "bit"), ("no_wait", "bit")]),
    (50, 41): ("queue.delete-ok", [("message_count", "long")]),
    (60, 10): ("basic.qos", [
        ("prefetch_size", "long"), ("prefetch_count", "short"), ("global", "bit")]),
    (60, 11): ("basic.qos-ok", []),
    (60, 20): ("basic.consume", [
        ("reserved_1", "short"), ("queue", "shortstr"), ("consumer_tag", "shortstr"),
        ("no_local", "bit"), ("no_ack", "bit"), ("exclusive", "bit"), ("no_wait", "bit"),
        ("arguments", "table")]),
    (60, 21): ("basic.consume-ok", [("consumer_tag", "shortstr")]),
    (60, 30): ("basic.cancel", [("consumer_tag", "shortstr"), ("no_wait", "bit")]),
    (60, 31): ("basic.cancel-ok", [("consumer_tag", "shortstr")]),
    (60, 40): ("basic.publish", [
        ("reserved_1", "short"), ("exchange", "shortstr"), ("routing_key", "shortstr"),
        ("mandatory", "bit"), ("immediate", "bit")]),
    (60, 50): ("basic.return", [
        ("reply_code", "short"), ("reply_text", "shortstr"), ("exchange", "shortstr"),
        ("routing_key", "shortstr")]),
    (60, 60): ("basic.deliver", [
        ("consumer_tag", "shortstr"), ("delivery_tag", "longlong"), ("redelivered", "bit"),
        ("exchange", "shortstr"), ("routing_key", "shortstr")]),
    (60, 70): ("basic.get", [
        ("reserved_1", "short"), ("queue", "shortstr"), ("no_ack", "bit")]),
    (60, 71): ("basic.get-ok", [
        ("delivery_tag", "longlong"), ("redelivered", "bit"), ("exchange", "shortstr"),
        ("routing_key", "shortstr"), ("message_count", "long")]),
    (60, 72): ("basic.get-empty", [("reserved_1", "shortstr")]),
    (60, 80): ("basic.ack", [("delivery_tag", "longlong"), ("multiple", "bit")]),
    (60, 90): ("basic.reject", [("delivery_tag", "longlong"), ("requeue", "bit")]),
    (60, 110): ("basic.recover", [("requeue", "bit")]),
    (60, 111): ("basic.recover-ok", []),
    (60, 120): ("basic.nack", [
        ("delivery_tag", "longlong"), ("multiple", "bit"), ("requeue", "bit")]),
    (85, 10): ("confirm.select", [("no_wait", "bit")]),
    (85, 11): ("confirm.select-ok", []),
}
METHOD_IDS = {name: ids for ids, (name, _args) in METHODS.items()}

# basic class content properties, in flag order (bit 15 first).
BASIC_PROPERTIES = [
    ("content_type", "shortstr"), ("content_encoding", "shortstr"), ("headers", "table"),
    ("delivery_mode", "octet"), ("priority", "octet"), ("correlation_id", "shortstr"),
    ("reply_to", "shortstr"), ("expiration", "shortstr"), ("message_id", "shortstr"),
    ("timestamp", "longlong"), ("type", "shortstr"), ("user_id", "shortstr"),
    ("app_id", "shortstr"), ("cluster_id", "shortstr"),
]


# -- encoding -------------------------------------------------------------------------------


def _b(s) -> bytes:
    return s if isinstance(s, bytes) else str(s).encode()


def shortstr(s) -> bytes:
    b = _b(s)
    if len(b) > 255:
        raise ValueError("shortstr longer than 255 bytes")
    return bytes([len(b)]) + b


def longstr(s) -> bytes:
    b = _b(s)
    return struct.pack(">I", len(b)) + b


def field_value(v) -> bytes:
    if isinstance(v, bool):
        return b"t" + bytes([1 if v else 0])
    if isinstance(v, int):
        if -(2 ** 31) <= v < 2 ** 31:
            return b"I" + struct.pack(">i", v)
        return b"l" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"d" + struct.pack(">d", v)
    if isinstance(v, (str, bytes)):
        return b"S" + longstr(v)
    if isinstance(v, dict):
        return b"F" + table(v)
    if isinstance(v, (list, tuple)):
        items = b"".join(field_value(x) for x in v)
        return b"A" + struct.pack(">I", len(items)) + items
    if v is None:
        return b"V"
    raise TypeError(f"no AMQP field type for {v!r}")


def table_entries(t: dict) -> bytes:
    """A field table's entries without the size prefix (AMQPLAIN's response is this)."""
    return b"".join(shortstr(k) + field_value(v) for k, v in (t or {}).items())


def table(t: dict) -> bytes:
    body = table_entries(t)
    return struct.pack(">I", len(body)) + body


def encode_args(spec: list[tuple[str, str]], values: dict) -> bytes:
    out = bytearray()
    bits: list[bool] = []

    def flush_bits():
        while bits:
            octet = 0
            for i, bit in enumerate(bits[:8]):
                if bit:
                    octet |= 1 << i
            out.append(octet)
            del bits[:8]

    for name, domain in spec:
        v = values.get(name)
        if domain == "bit":
            bits.append(bool(v))
            continue
        flush_bits()
        if domain == "octet":
            out += struct.pack(">B", v or 0)
        elif domain == "short":
            out += struct.pack(">H", v or 0)
        elif domain == "long":
            out += struct.pack(">I", v or 0)
        elif domain == "longlong":
            out += struct.pack(">Q", v or 0)
        elif domain == "shortstr":
            out += shortstr(v or b"")
        elif domain == "longstr":
            out += longstr(v or b"")
        elif domain == "table":
            out += table(v or {})
        else:
            raise ValueError(domain)
    flush_bits()
    return bytes(out)


def method_payload(name: str, *args, **kwargs) -> bytes:
    """Class id, method id and arguments of method `name` ("queue.declare"); arguments
    positionally in spec order or by name, missing ones zero/empty."""
    cls, mth = METHOD_IDS[name]
    spec = METHODS[(cls, mth)][1]
    values = dict(zip([a for a, _d in spec], args))
    for k in kwargs:
        if k not in [a for a, _d in spec]:
            raise TypeError(f"{name} has no argument {k!r}")
    values.update(kwargs)
    return struct.pack(">HH", cls, mth) + encode_args(spec, values)


def frame(ftype: int, channel: int, payload: bytes, end: int = FRAME_END) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + bytes([end])


def content_header_payload(body_size: int, properties: dict | None = None,
                           class_id: int = 60) -> bytes:
    props = properties or {}
    flags = 0
    plist = bytearray()
    for i, (name, domain) in enumerate(BASIC_PROPERTIES):
        if name in props:
            flags |= 1 << (15 - i)
            plist += encode_args([(name, domain)], {name: props[name]})
    return struct.pack(">HHQH", class_id, 0, body_size, flags) + bytes(plist)


# -- decoding -------------------------------------------------------------------------------


class Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def shortstr(self) -> str:
        return self.take(self.unpack(">B")).decode("utf-8", "replace")

    def longstr(self) -> bytes:
        return self.take(self.unpack(">I"))

    def table(self) -> dict:
        sub = Reader(self.longstr())
        out = {}
        while sub.pos < len(sub.data):
            k = sub.shortstr()
            out[k] = sub.field_value()
        return out

    def field_value(self):
        t = self.take(1)
        if t == b"t":
            return self.unpack(">B") != 0
        if t == b"b":
            return self.unpack(">b")
        if t == b"B":
            return self.unpack(">B")
        if t in (b"s", b"U"):
            return self.unpack(">h")
        if t == b"u":
            return self.unpack(">H")
        if t == b"I":
            return self.unpack(">i")
        if t == b"i":
            return self.unpack(">I")
        if t in (b"l", b"L"):
            return self.unpack(">q")
        if t == b"f":
            return self.unpack(">f")
        if t == b"d":
            return self.unpack(">d")
        if t == b"D":
            scale = self.unpack(">B")
            return decimal.Decimal(self.unpack(">i")).scaleb(-scale)
        if t == b"S":
            return self.longstr().decode("utf-8", "replace")
        if t == b"x":
            return self.longstr()
        if t == b"T":
            return self.unpack(">Q")
        if t == b"F":
            return self.table()
        if t == b"A":
            sub = Reader(self.longstr())
            items = []
            while sub.pos < len(sub.data):
                items.append(sub.field_value())
            return items
        if t == b"V":
            return None
        raise ValueError(f"unknown field type {t!r}")


def decode_args(spec: list[tuple[str, str]], data: bytes) -> dict:
    r = Reader(data)
    out: dict = {}
    bit_octet = 0
    bit_index = 8
    for name, domain in spec:
        if domain == "bit":
            if bit_index == 8:
                bit_octet = r.unpack(">B")
                bit_index = 0
            out[name] = bool(bit_octet & (1 << bit_index))
            bit_index += 1
            continue
        bit_index = 8
        if domain == "octet":
            out[name] = r.unpack(">B")
        elif domain == "short":
            out[name] = r.unpack(">H")
        elif domain == "long":
            out[name] = r.unpack(">I")
        elif domain == "longlong":
            out[name] = r.unpack(">Q")
        elif domain == "shortstr":
            out[name] = r.shortstr()
        elif domain == "longstr":
            out[name] = r.longstr()
        elif domain == "table":
            out[name] = r.table()
    return out


@dataclasses.dataclass
class Frame:
    type: int
    channel: int
    payload: bytes


@dataclasses.dataclass
class Method:
    channel: int
    class_id: int
    method_id: int
    name: str
    args: dict

    def __getattr__(self, item):
        try:
            return self.__dict__["args"][item]
        except KeyError:
            raise AttributeError(item) from None

    @property
    def reply_code(self) -> int | None:
        return self.args.get("reply_code")


class ServerClosed(Exception):
    """The server answered with connection.close (method) or closed the socket (None)."""

    def __init__(self, method: Method | None, during: str):
        self.method = method
        self.reply_code = method.reply_code if method else None
        super().__init__(f"{during}: server closed the connection: "
                         f"{method.args if method else 'socket EOF'}")


# -- the connection -------------------------------------------------------------------------


class RawConnection:
    """A TCP connection to a broker with frame-level send and receive. Not thread-safe."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.start: Method | None = None
        self.tune: Method | None = None
        self.frame_max = 0  # negotiated, after handshake()
        self.closed = False

    # sending

    def send(self, data: bytes):
        self.sock.sendall(data)

    def send_frame(self, ftype: int, channel: int, payload: bytes, end: int = FRAME_END):
        self.send(frame(ftype, channel, payload, end))

    def send_method(self, channel: int, name: str, *args, **kwargs):
        self.send_frame(FRAME_METHOD, channel, method_payload(name, *args, **kwargs))

    def send_heartbeat(self):
        self.send_frame(FRAME_HEARTBEAT, 0, b"")

    def send_content(self, channel: int, body: bytes, properties: dict | None = None):
        """Content header and body frames (split to the negotiated frame_max)."""
        self.send_frame(FRAME_HEADER, channel, content_header_payload(len(body), properties))
        chunk = (self.frame_max or 131072) - 8
        for i in range(0, len(body), chunk):
            self.send_frame(FRAME_BODY, channel, body[i:i + chunk])

    def publish(self, channel: int, exchange: str, routing_key: str, body: bytes,
                properties: dict | None = None, mandatory: bool = False):
        self.send_method(channel, "basic.publish", exchange=exchange, routing_key=routing_key,
                         mandatory=mandatory)
        self.send_content(channel, body, properties)

    # receiving

    def _fill(self, deadline: float):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the server in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no frame from the server in time") from None
        except (ConnectionResetError, BrokenPipeError) as e:
            self.closed = True
            raise ConnectionLost(str(e)) from None
        if not chunk:
            self.closed = True
            raise ConnectionLost("EOF")
        self.buf += chunk

    def recv_exact(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < n:
            self._fill(deadline)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self, timeout: float | None = None) -> Frame:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < 7:
            self._fill(deadline)
        ftype, channel, size = struct.unpack(">BHI", self.buf[:7])
        while len(self.buf) < 8 + size:
            self._fill(deadline)
        payload = self.buf[7:7 + size]
        end = self.buf[7 + size]
        self.buf = self.buf[8 + size:]
        if end != FRAME_END:
            raise ValueError(f"server sent a frame ending in {end:#x}")
        return Frame(ftype, channel, payload)

    def recv_method(self, timeout: float | None = None, skip_content: bool = True) -> Method:
        """The next method frame (heartbeats and, by default, content frames skipped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            f = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if f.type == FRAME_METHOD:
                return decode_method(f)
            if f.type == FRAME_HEARTBEAT or skip_content:
                continue
            raise AssertionError(f"expected a method frame, got {f}")

    def expect(self, name: str, channel: int | None = None,
               timeout: float | None = None) -> Method:
        """The next method, which must be `name`; a connection.close instead raises
        ServerClosed (answered with close-ok)."""
        m = self.recv_method(timeout)
        if m.name == "connection.close" and name != "connection.close":
            self._close_ok()
            raise ServerClosed(m, f"waiting for {name}")
        if m.name != name or (channel is not None and m.channel != channel):
            raise AssertionError(f"expected {name} on channel {channel}, got {m}")
        return m

    def _close_ok(self):
        try:
            self.send_method(0, "connection.close-ok")
        except OSError:
            pass

    def read_until_close(self, timeout: float | None = None) -> Method | None:
        """Reads (and drops) frames until the server's connection.close, which is answered
        with close-ok and returned; None if the socket closed without one. TimeoutError if
        neither happens in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                f = self.recv_frame(max(0.0, deadline - time.monotonic()))
            except ConnectionLost:
                return None
            if f.type == FRAME_METHOD:
                m = decode_method(f)
                if m.name == "connection.close":
                    self._close_ok()
                    return m

    def wait_eof(self, timeout: float | None = None) -> bool:
        """True once the server closed the socket; False on timeout. Drops what arrives."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                self._fill(deadline)
            except ConnectionLost:
                return True
            except TimeoutError:
                return False
            self.buf = b""

    # the handshake

    def handshake(self, user: str = "guest", password: str = "guest", vhost: str = "/",
                  mechanism: str = "PLAIN", channel_max: int | None = None,
                  frame_max: int | None = None, heartbeat: int | None = None,
                  client_properties: dict | None = None, header: bytes = PROTOCOL_HEADER
                  ) -> Method:
        """Header, start/start-ok, tune/tune-ok, open/open-ok. tune-ok carries the given
        values or, when None, the server's. Returns open-ok; ServerClosed on refusal."""
        self.send(header)
        self.start = self.expect("connection.start", 0)
        if mechanism == "PLAIN":
            response = b"\x00" + _b(user) + b"\x00" + _b(password)
        elif mechanism == "AMQPLAIN":
            response = table_entries({"LOGIN": user, "PASSWORD": password})
        else:
            raise ValueError(mechanism)
        props = {"product": "tributary-compat-amqpraw",
                 "capabilities": {"authentication_failure_close": True}}
        props.update(client_properties or {})
        self.send_method(0, "connection.start-ok", client_properties=props,
                         mechanism=mechanism, response=response, locale="en_US")
        self.tune = self.expect("connection.tune", 0)
        cm = self.tune.channel_max if channel_max is None else channel_max
        fm = self.tune.frame_max if frame_max is None else frame_max
        hb = self.tune.heartbeat if heartbeat is None else heartbeat
        self.frame_max = fm
        self.send_method(0, "connection.tune-ok", channel_max=cm, frame_max=fm, heartbeat=hb)
        self.send_method(0, "connection.open", virtual_host=vhost)
        return self.expect("connection.open-ok", 0)

    def open_channel(self, channel: int = 1) -> Method:
        self.send_method(channel, "channel.open")
        return self.expect("channel.open-ok", channel)

    def close_connection(self, timeout: float | None = None) -> Method:
        """connection.close from the client; returns the server's close-ok."""
        self.send_method(0, "connection.close", reply_code=200, reply_text="bye")
        while True:
            m = self.recv_method(timeout)
            if m.name == "connection.close-ok":
                return m

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True


def decode_method(f: Frame) -> Method:
    cls, mth = struct.unpack(">HH", f.payload[:4])
    if (cls, mth) not in METHODS:
        return Method(f.channel, cls, mth, f"unknown.{cls}.{mth}", {"raw": f.payload[4:]})
    name, spec = METHODS[(cls, mth)]
    return Method(f.channel, cls, mth, name, decode_args(spec, f.payload[4:]))
