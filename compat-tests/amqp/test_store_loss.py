"""Issue 17: a store lost during operation, with pika publishing persistent messages to a
durable queue under publisher confirms, continuously.

The log is on S3 (through a proxy the test cuts: connections refused, or a black hole) with
opendal_ack = shared, the metadata on etcd (SIGSTOP, or kill -9 and a restart). Each outage
lasts 15 s. Checked: nothing published during an S3 cut is confirmed (basic.ack) before S3
returns; a publish that could not be stored is nacked or its channel closed, never left
hanging; after the store returns, new publishes are confirmed by the same server process
(the client reopens a channel or connection the broker closed); every confirmed message is
in the queue (duplicates allowed and counted).

Run by `scripts/test-stores.sh store_loss`; skipped without its storage snippet.
"""

from __future__ import annotations

import pika
import pika.exceptions
import pytest

from amqphelpers import PERSISTENT, Confirms, declare, get_all
from store_loss import OUTAGES, Producer, check_outcome, report_file, run_outage, store_loss  # noqa: F401

pytestmark = pytest.mark.tributary_only(reason="the stores under Tributary are cut")


class PikaProducer(Producer):
    """One connection and confirm-mode channel at a time; one the broker closes is reported
    (its unconfirmed publishes given up) and a new one opened for the next publish."""

    def __init__(self, broker, amqp, queue: str):
        super().__init__()
        self.broker = broker
        self.amqp = amqp
        self.queue = queue
        self.conn = None
        self.c: Confirms | None = None
        self.tags: dict[int, int] = {}  # delivery tag -> id, unconfirmed
        self.seen = 0

    def _open(self) -> bool:
        try:
            if self.conn is None or not self.conn.is_open:
                self.conn = self.amqp(self.broker)
            self.c = Confirms(self.conn)
        except (pika.exceptions.AMQPError, AssertionError, OSError) as e:
            self.error(f"open: {type(e).__name__}")
            self.conn = self.c = None
            return False
        self.tags = {}
        self.seen = 0
        return True

    def _lost(self, why: str):
        self.error(why)
        for i in self.tags.values():
            self.gave_up(i, f"unconfirmed when closed: {why}")
        self.tags = {}
        self.c = None
        if self.conn is not None and not self.conn.is_open:
            self.conn = None

    def send(self, i: int) -> bool:
        if self.c is None and not self._open():
            return False
        try:
            self.c.publish("", self.queue, f"id-{i}".encode(), properties=PERSISTENT)
        except pika.exceptions.AMQPError as e:
            self._lost(f"publish: {type(e).__name__}")
            return False
        self.tags[self.c.published] = i
        return True

    def service(self, secs: float):
        if self.conn is None or self.c is None:
            if not self._open():
                return
        try:
            self.conn.process_data_events(time_limit=secs)
        except pika.exceptions.AMQPError as e:
            self._drain()
            self._lost(f"closed: {type(e).__name__} {getattr(e, 'reply_code', '')}".strip())
            return
        self._drain()
        if self.c.ch.is_closed:
            self._lost("channel closed")

    def _drain(self):
        if self.c is None:
            return
        events = self.c.events
        while self.seen < len(events):
            ev = events[self.seen]
            self.seen += 1
            if ev[0] == "return":
                self.error("basic.return")
                continue
            kind, tag, multiple = ev
            tags = [t for t in self.tags if t <= tag] if multiple else [tag]
            for t in tags:
                i = self.tags.pop(t, None)
                assert i is not None, f"{kind} for delivery tag {t}, not outstanding"
                if kind == "ack":
                    self.acked_now(i)
                else:
                    self.gave_up(i, "basic.nack")

    def in_flight(self) -> int:
        return len(self.tags)


@pytest.mark.parametrize("outage", OUTAGES)
def test_store_loss(store_loss, make_tributary, amqp, uid, outage):  # noqa: F811
    d = make_tributary("standalone")
    server = d.processes[0]
    pid = server.proc.pid
    ch = amqp(d.broker()).channel()
    q = declare(ch, f"{uid}-q", durable=True)
    p = PikaProducer(d.broker(), amqp, q)
    o = run_outage(p, store_loss, outage, alive=lambda: server.alive())
    assert server.alive() and server.proc.pid == pid, "the server was restarted"
    reader = amqp(d.broker()).channel()
    consumed = [int(m.body.decode()[3:]) for m in get_all(reader, q)]
    check_outcome("amqp (pika)", o, consumed, "s3", report_file())
