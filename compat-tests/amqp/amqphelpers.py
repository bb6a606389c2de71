"""Helpers for the AMQP message-flow scenarios (basic, confirms, tx, dead-lettering and TTL,
queue features, restarts): collecting deliveries from a pika BlockingConnection with
deadlines, draining queues, and checking the channel-level errors a broker answers with.

pika's BlockingConnection only dispatches callbacks inside its own calls, so every wait here
drives `process_data_events` of the connections involved until a condition holds or a
deadline passes; nothing sleeps for a fixed time except `quiet`, which proves that something
does NOT arrive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterable

import pika
import pika.exceptions
import pika.spec
import pytest

from amqpcompat import QUIET_S, WAIT_S

# Bulk waits fail when nothing moved for this long (a lost message never comes).
STALL_S = 5.0

PERSISTENT = pika.BasicProperties(delivery_mode=2)
TRANSIENT = pika.BasicProperties(delivery_mode=1)


@dataclasses.dataclass
class Msg:
    method: object  # pika.spec.Basic.Deliver or Basic.GetOk
    props: pika.BasicProperties
    body: bytes

    @property
    def tag(self) -> int:
        return self.method.delivery_tag

    @property
    def redelivered(self) -> bool:
        return self.method.redelivered

    @property
    def text(self) -> str:
        return self.body.decode()


def _conns(conns) -> list:
    if isinstance(conns, (list, tuple)):
        return list(conns)
    return [conns]


def pump(conns, cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition"):
    """Drives the given connection(s) until `cond()` holds; fails after `timeout`."""
    conns = _conns(conns)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        for c in conns:
            if c.is_open:
                c.process_data_events(time_limit=0.01 if len(conns) > 1 else 0.05)


def quiet(conns, secs: float = QUIET_S):
    """Drives the connection(s) for `secs` (to let something that must not come arrive)."""
    conns = _conns(conns)
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        for c in conns:
            if c.is_open:
                c.process_data_events(time_limit=0.02)


def wait_past(deadline: float, conns=()):
    """Waits until time.monotonic() >= deadline, driving the connections meanwhile (used
    only to get past a TTL or a delay, whose expiry is the point of the scenario)."""
    conns = _conns(conns)
    while time.monotonic() < deadline:
        left = deadline - time.monotonic()
        if conns:
            for c in conns:
                if c.is_open:
                    c.process_data_events(time_limit=max(0.0, min(0.05, left)))
        else:
            time.sleep(max(0.0, min(0.05, left)))


class Inbox:
    """A consumer on a BlockingChannel that collects its deliveries (and a server-sent
    basic.cancel) in order."""

    def __init__(self, ch, queue: str, auto_ack: bool = False, consumer_tag: str | None = None,
                 exclusive: bool = False, arguments: dict | None = None):
        self.ch = ch
        self.conn = ch.connection
        self.msgs: list[Msg] = []
        self.cancelled_by_server: list = []
        self.tag = ch.basic_consume(
            queue, self._on_message, auto_ack=auto_ack, exclusive=exclusive,
            consumer_tag=consumer_tag, arguments=arguments,
        )

    def _on_message(self, _ch, method, props, body):
        self.msgs.append(Msg(method, props, body))

    def wait(self, n: int, timeout: float = STALL_S, conns=()) -> list[Msg]:
        """Waits until at least `n` deliveries arrived, failing when none arrived for
        `timeout` seconds; returns all so far. `conns`: more connections to drive."""
        conns = [self.conn, *_conns(conns)] if conns else [self.conn]
        last, last_t = len(self.msgs), time.monotonic()
        while len(self.msgs) < n:
            now = time.monotonic()
            if len(self.msgs) != last:
                last, last_t = len(self.msgs), now
            elif now - last_t > timeout:
                raise AssertionError(
                    f"consumer {self.tag}: {len(self.msgs)} of {n} deliveries arrived"
                )
            for c in conns:
                if c.is_open:
                    c.process_data_events(time_limit=0.01 if len(conns) > 1 else 0.05)
        return list(self.msgs)

    def quiet(self, secs: float = QUIET_S) -> list[Msg]:
        quiet(self.conn, secs)
        return list(self.msgs)

    def bodies(self) -> list[bytes]:
        return [m.body for m in self.msgs]

    def texts(self) -> list[str]:
        return [m.text for m in self.msgs]

    def cancel(self):
        self.ch.basic_cancel(self.tag)


class Confirms:
    """A channel in confirm mode driven through pika's asynchronous channel underneath a
    BlockingChannel: publishes do not wait, and every basic.ack / basic.nack / basic.return
    is recorded in arrival order."""

    def __init__(self, conn):
        self.conn = conn
        self.bch = conn.channel()
        self.ch = self.bch._impl
        self.events: list[tuple] = []
        self.selected = []
        self.published = 0
        self.ch.add_on_return_callback(
            lambda _c, method, _p, body: self.events.append(("return", method, body)))
        self.ch.confirm_delivery(self._on_confirm, callback=self.selected.append)
        pump(conn, lambda: self.selected, what="confirm.select-ok")
        assert isinstance(self.selected[0].method, pika.spec.Confirm.SelectOk)

    def _on_confirm(self, frame):
        m = frame.method
        kind = "ack" if isinstance(m, pika.spec.Basic.Ack) else "nack"
        self.events.append((kind, m.delivery_tag, m.multiple))

    def publish(self, exchange, key, body, **kw):
        self.ch.basic_publish(exchange, key, body, **kw)
        self.published += 1

    def confirmed(self) -> dict[int, str]:
        """delivery tag -> 'ack'/'nack' (a multiple confirm covers every earlier tag not yet
        confirmed). Fails on a tag confirmed twice or one never published."""
        out: dict[int, str] = {}
        for ev in self.events:
            if ev[0] == "return":
                continue
            kind, tag, multiple = ev
            tags = [t for t in range(1, tag + 1) if t not in out] if multiple else [tag]
            assert tags, f"{kind} {tag} multiple={multiple} confirms nothing new"
            for t in tags:
                assert t not in out, f"delivery tag {t} confirmed twice"
                assert 1 <= t <= self.published, f"confirm for tag {t} never published"
                out[t] = kind
        return out

    def wait_all(self):
        pump(self.conn, lambda: len(self.confirmed()) >= self.published,
             what=f"confirms for {self.published} publishes")
        return self.confirmed()


def declare(ch, queue: str = "", **kw) -> str:
    """queue.declare; returns the queue's name (a server-named one when `queue` is '')."""
    return ch.queue_declare(queue, **kw).method.queue


def publish(ch, queue: str, bodies: Iterable, exchange: str = "", props=None, **kw):
    """Publishes each body (str or bytes) to `queue` through the default exchange (or to
    `exchange` with routing key `queue`)."""
    for b in bodies:
        ch.basic_publish(exchange, queue, b.encode() if isinstance(b, str) else b,
                         properties=props, **kw)


def get(ch, queue: str, auto_ack: bool = False) -> Msg | None:
    method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
    if method is None:
        return None
    return Msg(method, props, body)


def wait_get(ch, queue: str, timeout: float = WAIT_S, auto_ack: bool = True,
             what: str = "a message") -> Msg:
    """basic.get until one arrives (e.g. dead-lettered asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        m = get(ch, queue, auto_ack=auto_ack)
        if m is not None:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {queue} within {timeout}s")
        ch.connection.process_data_events(time_limit=0.02)


def get_all(ch, queue: str, auto_ack: bool = True, limit: int = 100_000) -> list[Msg]:
    """basic.get until the first get-empty; returns what was there (messages already
    known to be in the queue: wait for them with amqpcompat.wait_count first)."""
    out = []
    while len(out) < limit:
        m = get(ch, queue, auto_ack=auto_ack)
        if m is None:
            return out
        out.append(m)
    return out


@contextlib.contextmanager
def channel_error(code: int, text_has: str | None = None):
    """Expects the block to raise ChannelClosedByBroker with `code`."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        yield ei
    assert ei.value.reply_code == code, (
        f"channel closed with {ei.value.reply_code} {ei.value.reply_text!r}, want {code}"
    )
    if text_has is not None:
        assert text_has in ei.value.reply_text, ei.value.reply_text


@contextlib.contextmanager
def connection_error(code: int):
    """Expects the block to raise ConnectionClosedByBroker with `code`."""
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as ei:
        yield ei
    assert ei.value.reply_code == code, (
        f"connection closed with {ei.value.reply_code} {ei.value.reply_text!r}, want {code}"
    )


def wait_channel_closed(ch, timeout: float = WAIT_S) -> Exception:
    """For asynchronous errors (a bad ack, a raw method): drives the connection until the
    channel is closed and returns pika's reason (ChannelClosedByBroker with reply_code)."""
    pump(ch.connection, lambda: ch.is_closed, timeout, "the broker to close the channel")
    return ch._closing_reason  # pika keeps why the channel closed here


def assert_channel_closed(ch, code: int, timeout: float = WAIT_S):
    reason = wait_channel_closed(ch, timeout)
    assert isinstance(reason, pika.exceptions.ChannelClosedByBroker), repr(reason)
    assert reason.reply_code == code, (
        f"channel closed with {reason.reply_code} {reason.reply_text!r}, want {code}"
    )
    return reason


def wait_connection_closed(conn, code: int, timeout: float = WAIT_S):
    """Drives the connection until the broker closes it; checks the reply code."""
    with connection_error(code) as ei:
        pump(conn, lambda: False, timeout, "the broker to close the connection")
    return ei.value


def send_raw_method(ch, method):
    """Sends one method frame on the channel through pika's framing without pika's own
    client-side checks (e.g. a consumer tag pika already knows of)."""
    ch._impl._send_method(method)


def x_death(props) -> list[dict]:
    """The x-death header of a dead-lettered message (list of tables), decoded strings."""
    headers = props.headers or {}
    assert "x-death" in headers, f"no x-death header: {headers}"
    return headers["x-death"]


def raw_rpc(ch, method, reply_classes: list, timeout: float = WAIT_S):
    """Sends a synchronous method through pika's channel without pika's client-side
    checks or defaults (e.g. basic.consume with an empty consumer tag, which pika would
    fill in itself) and returns the broker's reply method."""
    box = []
    ch._impl._rpc(method, lambda frame: box.append(frame.method), reply_classes)
    pump(ch.connection, lambda: box or ch.is_closed, timeout, f"a reply to {method.NAME}")
    if not box:
        raise ch._closing_reason
    if isinstance(box[0], pika.spec.Basic.ConsumeOk):
        # BlockingChannel also records every consume-ok for its own basic_consume.
        ch._basic_consume_ok_result.reset()
    return box[0]


def as_str(v):
    return v.decode() if isinstance(v, bytes) else v
