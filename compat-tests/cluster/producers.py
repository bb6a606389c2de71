"""Clients that produce continuously through a cluster's gateways while its nodes fail, each in
a thread of its own, recording what was acknowledged and when (not a test module).

* ``CkProducer``: confluent-kafka (librdkafka), acks=all; librdkafka retries what fails.
* ``PahoProducer``: paho-mqtt, QoS 1, clean session, reconnecting when the gateway closes the
  connection (publishes without PUBACK then are given up: a client would send them again).
* ``PikaProducer``: pika, persistent messages to a durable queue under publisher confirms,
  reopening the channel or connection the gateway closes.
* ``new_sqs_producer(endpoint, queue)``: the shared ``Boto3Producer`` (compat-tests/shared) on a
  new standard queue, a few requests in flight, no SDK retries (a send answered 5xx during a
  takeover is given up).
* ``Runner``: drives one producer in a thread at a steady rate until stopped, then settles
  what is in flight (each id ends acknowledged or given up, or is counted unsettled).

Each id is sent once: a given-up id is not sent again (the read-back may still find it, as
at-least-once allows), so "acknowledged" is the set the scenario must find again.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import boto3
import botocore.config
import paho.mqtt.client as paho
import pika
import pika.exceptions
from paho.mqtt.enums import CallbackAPIVersion

from amqphelpers import PERSISTENT, Confirms
from sqs_producer import Boto3Producer
from store_loss import Producer

# At most this many ids without an outcome per client; sends pause beyond it. Large enough
# that sends go on through a takeover (at the scenario's rate), so the first id sent after a
# failure is sent at once, not when earlier ones are settled.
MAX_IN_FLIGHT = 2000
# A publish without an outcome for this long: the client gives its connection up and
# reconnects (MQTT and AMQP; librdkafka times messages out by itself, message.timeout.ms).
STUCK_S = 30.0
RECONNECT_DELAY_S = 0.2
# SendMessage requests in flight at once.
SQS_WORKERS = 4


class CkProducer(Producer):
    name = "kafka (confluent-kafka, acks=all, idempotent)"
    # Idempotence: the producer state (id, epoch, sequences) is in shared storage, so the
    # node taking over refuses a retried batch it already holds.
    no_duplicates = True

    def __init__(self, bootstrap: str, topic: str):
        super().__init__()
        from confluent_kafka import Producer as CkP
        self.topic = topic
        self.pending: set[int] = set()
        log = logging.getLogger(f"rdkafka.{topic}")
        log.propagate = False
        # librdkafka's own log lines, its eos debug lines included (an idempotent producer's
        # epoch bump after an unexpected sequence error shows there), the last 400 kept for
        # the report.
        self.client_log: collections.deque[str] = collections.deque(maxlen=400)
        keep = self.client_log

        class Keep(logging.Handler):
            def emit(self, record):
                keep.append(f"{time.strftime('%H:%M:%S')} {record.getMessage()}")
        log.addHandler(Keep())
        log.setLevel(logging.DEBUG)
        self.p = CkP({
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            # librdkafka's default of 5 requests in flight per connection: the gateway appends
            # pipelined produces in order and they wait for the object store together (with
            # opendal_ack = shared, one upload window for all of them, not one each).
            # Longer than any takeover: a message fails only if the cluster never comes back.
            "message.timeout.ms": 120_000,
            "request.timeout.ms": 10_000,
            "retry.backoff.ms": 100,
            "retry.backoff.max.ms": 1000,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
            "logger": log,
            # Idempotence state changes (producer id, epoch bumps, sequence errors).
            "debug": "eos",
            "error_cb": lambda e: self.error(f"client: {e.name()}"),
        })

    def send(self, i: int) -> bool:
        def done(err, msg, i=i):
            self.pending.discard(i)
            if err is None:
                self.acked_now(i)
            else:
                self.gave_up(i, f"delivery: {err.name()}")
        try:
            self.p.produce(self.topic, key=str(i % 30).encode(), value=f"id-{i}".encode(),
                           on_delivery=done)
        except BufferError:
            return False
        self.pending.add(i)
        return True

    def service(self, secs: float):
        self.p.poll(secs)

    def in_flight(self) -> int:
        return len(self.pending)

    def close(self):
        self.p.flush(10)


class PahoProducer(Producer):
    name = "mqtt (paho, QoS 1)"

    def __init__(self, host: str, port: int, uid: str, topic: str):
        super().__init__()
        self.host, self.port, self.uid, self.topic = host, port, uid, topic
        self.client: paho.Client | None = None
        self.connected = False
        self.gone = False
        self.mids: dict[int, tuple[int, float]] = {}  # mid -> (id, when published)
        self.n = 0
        self.not_before = 0.0

    def _open(self) -> bool:
        if time.monotonic() < self.not_before:
            return False
        self.not_before = time.monotonic() + RECONNECT_DELAY_S
        self.n += 1
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{self.uid}-p{self.n}",
                        clean_session=True, protocol=paho.MQTTv311)
        c.max_inflight_messages_set(MAX_IN_FLIGHT)
        self.connected = False
        self.gone = False

        def on_connect(_c, _u, _flags, rc, _props):
            if rc == 0:
                self.connected = True
            else:
                self.error(f"connect refused: {rc}")
                self.gone = True

        def on_disconnect(_c, _u, _flags, rc, _props):
            self.gone = True

        def on_publish(_c, _u, mid, rc, _props):
            entry = self.mids.pop(mid, None)
            if entry is None:
                return
            if not rc.is_failure:
                self.acked_now(entry[0])
            else:
                self.gave_up(entry[0], f"puback {rc}")

        c.on_connect, c.on_disconnect, c.on_publish = on_connect, on_disconnect, on_publish
        try:
            c.connect(self.host, self.port, keepalive=10)
        except OSError as e:
            self.error(f"connect: {type(e).__name__}")
            return False
        deadline = time.monotonic() + 10
        while not self.connected and not self.gone and time.monotonic() < deadline:
            c.loop(0.05)
        if not self.connected:
            self.error("connect: no CONNACK")
            self._drop(c)
            return False
        self.client = c
        self.mids = {}
        return True

    def _drop(self, c):
        try:
            c.disconnect()
        except Exception:  # noqa: BLE001 - whatever state it is in, it goes
            pass
        try:
            c.socket() and c.socket().close()
        except Exception:  # noqa: BLE001
            pass

    def _lost(self, why: str):
        self.error(why)
        for i, _ in self.mids.values():
            self.gave_up(i, "publish without PUBACK when the connection ended")
        self.mids = {}
        if self.client is not None:
            self._drop(self.client)
        self.client = None

    def send(self, i: int) -> bool:
        if self.client is None and not self._open():
            return False
        info = self.client.publish(self.topic, f"id-{i}".encode(), qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self._lost(f"publish rc {info.rc}")
            return False
        self.mids[info.mid] = (i, time.monotonic())
        return True

    def service(self, secs: float):
        if self.client is None:
            if not self._open():
                time.sleep(secs)  # the reconnect back-off: no connection to drive
            return
        rc = self.client.loop(secs)
        if self.gone or rc not in (paho.MQTT_ERR_SUCCESS,):
            self._lost(f"connection closed (loop rc {rc})")
            return
        oldest = min((t for _, t in self.mids.values()), default=None)
        if oldest is not None and time.monotonic() - oldest > STUCK_S:
            self._lost(f"no PUBACK for {STUCK_S:.0f}s")

    def in_flight(self) -> int:
        return len(self.mids)

    def close(self):
        if self.client is not None:
            self._drop(self.client)


class PikaProducer(Producer):
    name = "amqp (pika, publisher confirms)"

    def __init__(self, host: str, port: int, queue: str):
        super().__init__()
        self.params = pika.ConnectionParameters(
            host=host, port=port, credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1, socket_timeout=5, stack_timeout=10,
            blocked_connection_timeout=30, heartbeat=10)
        self.queue = queue
        self.conn = None
        self.c: Confirms | None = None
        self.tags: dict[int, tuple[int, float]] = {}  # delivery tag -> (id, when published)
        self.seen = 0
        self.not_before = 0.0

    def declare(self):
        conn = pika.BlockingConnection(self.params)
        try:
            conn.channel().queue_declare(self.queue, durable=True)
        finally:
            conn.close()

    def _open(self) -> bool:
        if time.monotonic() < self.not_before:
            return False
        self.not_before = time.monotonic() + RECONNECT_DELAY_S
        try:
            if self.conn is None or not self.conn.is_open:
                self.conn = pika.BlockingConnection(self.params)
            self.c = Confirms(self.conn)
        except (pika.exceptions.AMQPError, AssertionError, OSError) as e:
            self.error(f"open: {type(e).__name__}")
            self._close_conn()
            return False
        self.tags = {}
        self.seen = 0
        return True

    def _close_conn(self):
        if self.conn is not None:
            try:
                if self.conn.is_open:
                    self.conn.close()
            except Exception:  # noqa: BLE001 - a broken connection goes anyway
                pass
        self.conn = None
        self.c = None

    def _lost(self, why: str, close_connection: bool = False):
        self.error(why)
        for i, _ in self.tags.values():
            self.gave_up(i, "unconfirmed when the channel ended")
        self.tags = {}
        self.c = None
        if close_connection or (self.conn is not None and not self.conn.is_open):
            self._close_conn()

    def send(self, i: int) -> bool:
        if self.c is None and not self._open():
            return False
        try:
            self.c.publish("", self.queue, f"id-{i}".encode(), properties=PERSISTENT)
        except pika.exceptions.AMQPError as e:
            self._lost(f"publish: {type(e).__name__}")
            return False
        self.tags[self.c.published] = (i, time.monotonic())
        return True

    def service(self, secs: float):
        if self.conn is None or self.c is None:
            if not self._open():
                time.sleep(secs)
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
            return
        oldest = min((t for _, t in self.tags.values()), default=None)
        if oldest is not None and time.monotonic() - oldest > STUCK_S:
            self._lost(f"no confirm for {STUCK_S:.0f}s", close_connection=True)

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
                entry = self.tags.pop(t, None)
                if entry is None:
                    self.error(f"{kind} for delivery tag {t}, not outstanding")
                    continue
                if kind == "ack":
                    self.acked_now(entry[0])
                else:
                    self.gave_up(entry[0], "basic.nack")

    def in_flight(self) -> int:
        return len(self.tags)

    def close(self):
        self._close_conn()


def new_sqs_producer(endpoint: str, queue: str) -> Boto3Producer:
    client = boto3.client(
        "sqs", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="cluster-test-secret",
        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                      connect_timeout=5, read_timeout=30,
                                      max_pool_connections=SQS_WORKERS))
    url = client.create_queue(QueueName=queue)["QueueUrl"]
    return Boto3Producer(client, url, SQS_WORKERS)


class Runner:
    """One producer in a thread of its own: sends ids 0, 1, 2, ... at `rate` per second (at
    most MAX_IN_FLIGHT without an outcome) until stop(), then drives the client until nothing
    is in flight (or `settle_s` passes). An exception in the thread is kept and re-raised
    by join()."""

    def __init__(self, producer: Producer, rate: float, settle_s: float = 150.0):
        self.p = producer
        self.rate = rate
        self.settle_s = settle_s
        self.stopping = threading.Event()
        self.exc: BaseException | None = None
        self.next_id = 0
        self.unsettled = 0
        self.thread = threading.Thread(target=self._run, name=producer.name, daemon=True)

    def start(self) -> "Runner":
        self.thread.start()
        return self

    def _run(self):
        try:
            interval = 1.0 / self.rate
            next_at = time.monotonic()
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_at and self.p.in_flight() < MAX_IN_FLIGHT:
                    if self.p.send(self.next_id):
                        self.p.sent[self.next_id] = now
                        self.next_id += 1
                    next_at = max(next_at + interval, now - 1.0)
                if self.p.in_flight() >= MAX_IN_FLIGHT:
                    wait = 0.01
                else:
                    wait = min(0.01, max(0.001, next_at - time.monotonic()))
                self.p.service(wait)
            deadline = time.monotonic() + self.settle_s
            while self.p.in_flight() and time.monotonic() < deadline:
                self.p.service(0.05)
            self.unsettled = self.p.in_flight()
            self.p.close()
        except BaseException as e:  # noqa: BLE001 - reported by join()
            self.exc = e

    def alive(self) -> bool:
        return self.thread.is_alive()

    def check(self):
        if self.exc is not None:
            raise AssertionError(f"{self.p.name}: the producer thread failed: {self.exc!r}") from self.exc

    def stop(self):
        self.stopping.set()

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.p.name}: still settling after {timeout:.0f}s"
        self.check()

    # -- what the scenario reads (copies: the thread keeps writing) ---------------------------

    def acked(self) -> dict[int, float]:
        return self.p.acked.copy()

    def first_ack_of_sent_after(self, t: float) -> float | None:
        """When the first id sent at or after `t` was acknowledged (None: none yet)."""
        sent = self.p.sent.copy()
        times = [at for i, at in self.acked().items() if sent.get(i, -1.0) >= t]
        return min(times) if times else None


def acked_each(runners: list[Runner], n: int, base: dict[str, int] | None = None) -> bool:
    """Whether every runner has `n` acknowledgements more than `base` counted (by name and
    topic); re-raises a producer thread's failure."""
    for r in runners:
        r.check()
    return all(len(r.p.acked) >= (base or {}).get(r.p.name + r.p.topic, 0) + n
               for r in runners)


def stop_all(runners: list[Runner], timeout: float = 200):
    """Stops every runner, then waits for each to settle (see Runner.join)."""
    for r in runners:
        r.stop()
    for r in runners:
        r.join(timeout)
