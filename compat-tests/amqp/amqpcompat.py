"""Helpers shared by the AMQP 0-9-1 scenarios: the broker under test (a pika endpoint) and
small waiting helpers. Every wait is for a condition, with a deadline; fixed sleeps are only
used to prove that something does NOT happen (QUIET_S)."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import pika

BROKERS = ["tributary", "rabbitmq"]

# AMQP 0-9-1 reply codes (spec section 1.2 "Constants").
REPLY_SUCCESS = 200
CONTENT_TOO_LARGE = 311
NO_ROUTE = 312
NO_CONSUMERS = 313
CONNECTION_FORCED = 320
INVALID_PATH = 402
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
FRAME_ERROR = 501
SYNTAX_ERROR = 502
COMMAND_INVALID = 503
CHANNEL_ERROR = 504
UNEXPECTED_FRAME = 505
RESOURCE_ERROR = 506
NOT_ALLOWED = 530
NOT_IMPLEMENTED = 540
INTERNAL_ERROR = 541

WAIT_S = 10.0
# How long a scenario listens to prove that something does NOT arrive. Only used for that:
# positive outcomes are always waited for as conditions.
QUIET_S = 0.5
# Socket/connect timeout of the pika connections the scenarios open.
CONNECT_TIMEOUT_S = 10.0


@dataclasses.dataclass
class Broker:
    """An AMQP 0-9-1 endpoint under test."""

    kind: str  # "tributary" or "rabbitmq"
    host: str
    port: int
    server: object = None  # the process/deployment behind it

    @property
    def is_tributary(self) -> bool:
        return self.kind == "tributary"

    def params(self, **kw) -> pika.ConnectionParameters:
        """Connection parameters: guest/guest on vhost "/" unless given. `user`/`password`
        are shorthands for `credentials`; every other keyword goes to pika as is
        (heartbeat, frame_max, channel_max, virtual_host, client_properties, ...)."""
        user = kw.pop("user", None)
        password = kw.pop("password", None)
        if user is not None or password is not None:
            kw.setdefault(
                "credentials",
                pika.PlainCredentials(user or "guest", password or "",
                                      erase_on_connect=False),
            )
        kw.setdefault("credentials", pika.PlainCredentials("guest", "guest"))
        kw.setdefault("virtual_host", "/")
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", CONNECT_TIMEOUT_S)
        kw.setdefault("stack_timeout", CONNECT_TIMEOUT_S)
        kw.setdefault("blocked_connection_timeout", WAIT_S)
        return pika.ConnectionParameters(host=self.host, port=self.port, **kw)

    def connect(self, **kw) -> pika.BlockingConnection:
        """A new pika BlockingConnection (the caller closes it; prefer the `amqp` fixture)."""
        return pika.BlockingConnection(self.params(**kw))

    def raw(self, timeout: float = 5.0):
        """A raw socket speaking hand-made frames (amqpraw.RawConnection), not yet opened:
        call .handshake() or send a protocol header yourself."""
        import amqpraw

        return amqpraw.RawConnection(self.host, self.port, timeout)

    def __str__(self):
        return f"{self.kind}@{self.host}:{self.port}"


def wait_until(cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition",
               conn: pika.BlockingConnection | None = None):
    """Polls `cond` until true or fails after `timeout`. With `conn`, pika's I/O loop runs
    between polls (callbacks, consumer deliveries)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if conn is not None:
            conn.process_data_events(time_limit=0.01)
        else:
            time.sleep(0.01)


def get_message(ch, queue: str, timeout: float = WAIT_S, auto_ack: bool = True):
    """basic.get polled until a message arrives: (method, properties, body)."""
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is not None:
            return method, props, body
        if time.monotonic() > deadline:
            raise AssertionError(f"no message on {queue!r} within {timeout}s")
        ch.connection.process_data_events(time_limit=0.01)


def drain(ch, queue: str, quiet: float = QUIET_S) -> list[bytes]:
    """Every message basic.get returns until the queue stays empty for `quiet` seconds."""
    out: list[bytes] = []
    deadline = time.monotonic() + quiet
    while time.monotonic() < deadline:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is not None:
            out.append(body)
            deadline = time.monotonic() + quiet
        else:
            ch.connection.process_data_events(time_limit=0.02)
    return out


def queue_count(ch, queue: str) -> int:
    """Messages ready in `queue` (passive declare)."""
    return ch.queue_declare(queue, passive=True).method.message_count


def wait_count(ch, queue: str, n: int, timeout: float = WAIT_S):
    """Waits until passive declare reports exactly n ready messages in `queue`."""
    last = [None]

    def ok():
        last[0] = queue_count(ch, queue)
        return last[0] == n

    try:
        wait_until(ok, timeout, f"{n} messages in {queue!r}", conn=ch.connection)
    except AssertionError as e:
        raise AssertionError(f"{e} (last count {last[0]})") from None
