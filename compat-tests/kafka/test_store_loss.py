"""Issue 17: a store lost during operation, with confluent-kafka (librdkafka) producing
continuously with acks=all and a message timeout.

The log is on S3 (through a proxy the test cuts: connections refused, or a black hole) with
opendal_ack = shared, the metadata on etcd (stopped with SIGSTOP, or killed with SIGKILL and
restarted on its data directory). Each outage lasts 15 s, longer than the 10 s limit on an
append and on an etcd call. Checked: nothing sent during an S3 cut is acknowledged before S3
returns; every delivery error is one librdkafka retries or a local timeout (never a fatal
broker error); after the store returns, new messages are acknowledged with the same server
process; every acknowledged id is read back (duplicates allowed and counted).

Run by `scripts/test-stores.sh store_loss`; skipped without its storage snippet.
"""

from __future__ import annotations

import logging
import re

import pytest

from kafkacompat import ck_create_topic, ck_producer, ck_read_all, unique
from store_loss import OUTAGES, Producer, check_outcome, report_file, run_outage, store_loss  # noqa: F401

PARTITIONS = 3
MESSAGE_TIMEOUT_MS = 20_000

# What a producer may see as the final outcome of a message it was not acknowledged for:
# its own timeout, or a broker error librdkafka retries until that timeout.
RETRIABLE_DELIVERY = {
    "_MSG_TIMED_OUT", "_TIMED_OUT", "_TRANSPORT",
    "REQUEST_TIMED_OUT", "NOT_LEADER_OR_FOLLOWER", "KAFKA_STORAGE_ERROR", "LEADER_NOT_AVAILABLE",
}
# librdkafka's texts for broker errors (its debug log names the ProduceResponse error).
_BROKER_ERR = re.compile(r"Broker: ([A-Za-z ,/()-]+?)(?:\s*[:;(]|$)")

pytestmark = pytest.mark.tributary_only(reason="the stores under Tributary are cut")


class _LogLines(logging.Handler):
    def __init__(self, producer: "CkProducer"):
        super().__init__(logging.DEBUG)
        self.producer = producer

    def emit(self, record):
        msg = record.getMessage()
        if "Produce" in msg or "MSGSET" in msg or "PRODUCE" in msg:
            for m in _BROKER_ERR.finditer(msg):
                self.producer.error("broker: " + m.group(1).strip())


class CkProducer(Producer):
    def __init__(self, bootstrap: str, topic: str):
        super().__init__()
        self.topic = topic
        self.pending: set[int] = set()
        log = logging.getLogger(f"rdkafka.{topic}")
        log.propagate = False
        log.setLevel(logging.DEBUG)
        log.addHandler(_LogLines(self))
        self.p = ck_producer(bootstrap, **{
            "acks": "all",
            "message.timeout.ms": MESSAGE_TIMEOUT_MS,
            "linger.ms": 5,
            "debug": "msg",
            "logger": log,
            "error_cb": lambda e: self.error(f"client: {e.name()}"),
        })

    def send(self, i: int):
        self.pending.add(i)

        def done(err, msg, i=i):
            self.pending.discard(i)
            if err is None:
                self.acked_now(i)
            else:
                self.gave_up(i, f"delivery: {err.name()}")

        self.p.produce(self.topic, key=str(i % 30).encode(), value=f"id-{i}".encode(),
                       on_delivery=done)
        return True

    def service(self, secs: float):
        self.p.poll(secs)

    def in_flight(self) -> int:
        return len(self.pending)


@pytest.mark.parametrize("outage", OUTAGES)
def test_store_loss(store_loss, make_deployment, outage):  # noqa: F811
    d = make_deployment("standalone")
    server = d.processes[0]
    pid = server.proc.pid
    topic = unique("storeloss")
    ck_create_topic(d.bootstrap, topic, PARTITIONS)
    p = CkProducer(d.bootstrap, topic)
    o = run_outage(p, store_loss, outage, alive=lambda: server.alive())
    assert server.alive() and server.proc.pid == pid, "the server was restarted"
    consumed = [int(g.value.decode()[3:]) for g in ck_read_all(d.bootstrap, topic, PARTITIONS)]
    check_outcome("kafka (confluent-kafka)", o, consumed, "s3", report_file())
    fatal = {k for k in o.errors if k.startswith("delivery: ")
             and k.removeprefix("delivery: ") not in RETRIABLE_DELIVERY}
    assert not fatal, f"delivery errors a producer does not retry: {fatal}: {o.summary()}"
    if outage.startswith("s3-"):
        # The broker answers, with an error the producer retries (not only its own timeouts).
        told = {k for k in o.errors_in_cut if k.startswith("broker: ")}
        assert told, f"no produce error from the broker during the cut: {o.summary()}"
