"""Issue 17: a store lost during operation, with paho publishing at QoS 1 continuously to a
topic an offline persistent session (clean session 0, subscribed at QoS 1) collects.

The log is on S3 (through a proxy the test cuts: connections refused, or a black hole) with
opendal_ack = shared, the metadata on etcd (SIGSTOP, or kill -9 and a restart). Each outage
lasts 15 s. A message queued for a session is kept in the metadata store (etcd), not in the
log. Checked: nothing published during an etcd cut gets its PUBACK before etcd returns; a
publish that could not be stored gets no PUBACK and its connection is closed (MQTT 3.1.1 has
no negative PUBACK; a connection left open with the publish unanswered would hold the
client's in-flight window forever), never left hanging; after the store returns, new
publishes are acknowledged by the same server process (the client reconnects when the
broker closed it); the session, reconnected at the end, receives every acknowledged message
(duplicates allowed and counted).

Run by `scripts/test-stores.sh store_loss`; skipped without its storage snippet.
"""

from __future__ import annotations

import time

import paho.mqtt.client as paho
import pytest

from mqttcompat import MQTTv311
from store_loss import OUTAGES, Producer, check_outcome, report_file, run_outage, store_loss  # noqa: F401

pytestmark = pytest.mark.tributary_only(reason="the stores under Tributary are cut")


RECONNECT_DELAY_S = 0.2


class PahoProducer(Producer):
    """One clean-session connection at a time; when the broker closes it, its publishes
    without PUBACK are given up and a new connection is opened for the next publish, no
    sooner than RECONNECT_DELAY_S later (as a client's reconnect back-off would). Each closed
    client is released at once (paho keeps two descriptors per client until then)."""

    def __init__(self, broker, mq, uid: str, topic: str):
        super().__init__()
        self.broker = broker
        self.mq = mq
        self.uid = uid
        self.topic = topic
        self.client = None
        self.mids: dict[int, int] = {}  # mid -> id, without PUBACK
        self.n = 0
        self.not_before = 0.0

    def _open(self) -> bool:
        if time.monotonic() < self.not_before:
            return False
        self.not_before = time.monotonic() + RECONNECT_DELAY_S
        self.n += 1
        c = self.mq(self.broker, f"{self.uid}-p{self.n}", MQTTv311)
        try:
            ack = c.connect(check=False, timeout=15)
        except (AssertionError, OSError) as e:
            self.error(f"connect: {type(e).__name__}")
            c.close()
            return False
        if ack is None or ack.reason != 0:
            self.error(f"connect refused: {ack}")
            c.close()
            return False
        self.client = c
        self.mids = {}
        return True

    def send(self, i: int) -> bool:
        if self.client is None and not self._open():
            return False
        info = self.client.c.publish(self.topic, f"id-{i}".encode(), qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.error(f"publish rc {info.rc}")
            return False
        self.mids[info.mid] = i
        return True

    def service(self, secs: float):
        c = self.client
        if c is None:
            if not self._open():
                time.sleep(secs)  # reconnect back-off: no connection to drive meanwhile
            return
        with c.cond:
            c.cond.wait(secs)
            acks = dict(c._pubacks)
            c._pubacks.clear()
            gone = c.disconnected
        for mid, rc in acks.items():
            i = self.mids.pop(mid, None)
            if i is None:
                continue
            if rc == 0:
                self.acked_now(i)
            else:
                self.gave_up(i, f"puback rc {rc}")
        if gone is not None:
            self.error(f"connection closed (rc {gone.reason})")
            for i in self.mids.values():
                self.gave_up(i, "publish without PUBACK when closed")
            self.mids = {}
            c.close()
            self.client = None

    def in_flight(self) -> int:
        return len(self.mids)


@pytest.mark.parametrize("outage", OUTAGES)
def test_store_loss(store_loss, make_tributary, mq, uid, outage):  # noqa: F811
    d = make_tributary("standalone")
    server = d.processes[0]
    pid = server.proc.pid
    topic = f"{uid}/loss"
    sub = mq(d.broker(), f"{uid}-sub", MQTTv311, clean=False)
    sub.connect()
    assert sub.subscribe(topic, 1) == [1]
    sub.disconnect()
    p = PahoProducer(d.broker(), mq, uid, topic)
    o = run_outage(p, store_loss, outage, alive=lambda: server.alive())
    assert server.alive() and server.proc.pid == pid, "the server was restarted"
    sub = mq(d.broker(), f"{uid}-sub", MQTTv311, clean=False)
    assert sub.connect().session_present
    want = set(p.acked)

    def have() -> set[int]:
        return {int(m.payload.decode()[3:]) for m in sub.received()}

    try:
        sub.wait(lambda: want <= have(), timeout=60,
                 what=f"{len(want)} acknowledged messages in the session",
                 progress=lambda: len(sub.received()), stall=20)
    except AssertionError:
        pass  # check_outcome names what is missing
    consumed = [int(m.payload.decode()[3:]) for m in sub.received()]
    check_outcome("mqtt (paho)", o, consumed, "etcd", report_file())
