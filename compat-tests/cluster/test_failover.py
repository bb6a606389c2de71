"""Issue 18: a three-node cluster fails over under load, with the clients users run.

scripts/cluster.sh starts the metadata store (etcd or PostgreSQL), moto's S3, three
`tributary core --cluster-node coreN` nodes (core1 serves, core2 and core3 stand by), each in a
network namespace of its own, and one gateway of each protocol given all three nodes'
addresses. Kafka (confluent-kafka, acks=all, to a topic of 3 partitions), MQTT (paho, QoS 1, to
a topic an offline persistent session collects), AMQP (pika, persistent messages to a
durable queue under publisher confirms) and SQS (boto3 SendMessage to a standard queue)
produce continuously through the gateways while:

1. the serving node is killed (SIGKILL): a standby takes over once the lease expires, a TTL
   after the last heartbeat; the killed node is started again and stands by;
2. the node serving now is cut off from everything (its namespace's link down): a standby
   takes over, and the cut node, unable to renew its lease, exits with code 3 and an
   `error: cluster:` line; the cut is healed and the node started again;
3. the node serving now is stopped with SIGTERM: it hands its lease over, so a standby takes
   over at once, within half a TTL; then a standby is stopped with SIGTERM, and exits 0.

`test_failover_with_shards` runs the same events on a cluster whose three nodes each serve
their share of six shards (`cluster.sh up --shards 6`): each event hits the node serving the
shard of the clients' namespace (`default`, AMQP's `/`) once the shards have settled, and the
takeover is another node serving that shard (it says so on its admin
`GET /api/v1/cluster/shards?namespace=default`; its log's `took a shard` line is when it
took the lease, `serving a shard` when it had opened the shard's core).

Measured for each event: the time until another node takes the lease and has its core ready
(its log), serves (its admin GET /healthz answers 200) and, per client, until the first
acknowledgement of a message sent after the event; the cut node must have exited before the
next one took the lease. The contract's limits (takeover under 10 s, clients served again
within 20 s, the handover on SIGTERM) are checked after the read-back, so that a run reports
every outcome. At
the end every message is read back: every acknowledged one must be there (no loss);
duplicates, which at-least-once allows for MQTT QoS 1, AMQP and SQS, are counted and printed; the
Kafka producer is idempotent, so it must have none. The gateways
run from start to end without a restart. The outcome lines also go to
TRIBUTARY_CLUSTER_REPORT when set (scripts/test-cluster.sh prints that file).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
import uuid

import paho.mqtt.client as paho
import pika
from paho.mqtt.enums import CallbackAPIVersion

from clusterctl import NODES, Cluster, wait_for
from kafkacompat import ck_create_topic, ck_read_all
from producers import CkProducer, PahoProducer, PikaProducer, Runner, new_sqs_producer, stop_all
from sqs_producer import receive_all

# Messages per second per client.
RATE = 40
WARMUP_ACKS = 40
PARTITIONS = 3
# The target: another node serves within 10 s of a failure.
TAKEOVER_LIMIT_S = 10.0
# Clients: the first acknowledgement of a message sent after the failure, within this.
CLIENT_LIMIT_S = 20.0
# A clean stop hands the lease over: the next node must hold it within half a lease TTL
# (a standby looks every TTL/5), not once the lease expired.
LEASE_TTL_S = int(os.environ.get("TRIBUTARY_CLUSTER_LEASE_TTL_MS", "5000")) / 1000
HANDOVER_LIMIT_S = LEASE_TTL_S / 2
# Waits that end in a failure past these (the limits above are what is asserted).
WAIT_S = 60.0
AFTER_LAST_EVENT_ACKS = 40


@dataclasses.dataclass
class Failover:
    what: str
    node: int
    new: int
    at: float  # the command was given
    at_wall: float  # the same, as time.time()
    done: float  # the command returned: the node is dead, cut or stopped
    serving_s: float  # at -> another node answers /healthz
    lease_s: float | None  # at -> the new node logged that it holds the lease
    ready_s: float | None  # at -> the new node logged that its core is ready
    client_s: dict[str, float]  # at -> first ack of a message sent after `done`

    def line(self) -> str:
        clients = ", ".join(f"{k.split()[0]} {v:.2f}s" for k, v in self.client_s.items())
        def s(v):
            return "?" if v is None else f"{v:.2f}s"
        return (f"{self.what} of core{self.node}: core{self.new} takes the lease after "
                f"{s(self.lease_s)}, its core is ready after {s(self.ready_s)}, it serves "
                f"(GET /healthz) after {self.serving_s:.2f}s; first acknowledgement of a "
                f"message sent after it: {clients}")


def fail_over(c: Cluster, runners: list[Runner], what: str, node: int, act) -> Failover:
    at, at_wall = time.monotonic(), time.time()
    act()
    done = time.monotonic()
    new = c.wait_serving(WAIT_S, exclude=(node,))
    serving_s = time.monotonic() - at

    def acked_after():
        for r in runners:
            r.check()
        firsts = {r.p.name: r.first_ack_of_sent_after(done) for r in runners}
        return firsts if all(v is not None for v in firsts.values()) else None

    firsts = wait_for(acked_after, WAIT_S, f"every client acknowledged after the {what}",
                      on_timeout=lambda: progress(runners) + "\n" + c.describe())
    lease, ready = c.takeover_times(new)
    return Failover(what, node, new, at, at_wall, done, serving_s,
                    None if lease is None else lease - at_wall,
                    None if ready is None else ready - at_wall,
                    {k: v - at for k, v in firsts.items()})


def progress(runners: list[Runner]) -> str:
    return "\n".join(f"{r.p.name}: sent {len(r.p.sent)}, acknowledged {len(r.p.acked)}, "
                     f"in flight {r.p.in_flight()}, errors {dict(r.p.errors)}" for r in runners)


# -- MQTT: the persistent session that collects the topic -----------------------------------


class Session:
    """A paho client on a persistent session (clean session 0) subscribed at QoS 1."""

    def __init__(self, addr: str, client_id: str):
        host, port = addr.rsplit(":", 1)
        self.got: list[bytes] = []
        self.state: dict = {}
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=False, protocol=paho.MQTTv311)

        def on_connect(_c, _u, flags, rc, _p):
            self.state["connack"] = (rc, flags.session_present)

        self.c.on_connect = on_connect
        self.c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.state.__setitem__("suback", rcs)
        self.c.on_message = lambda _c, _u, m: self.got.append(m.payload)
        self.c.connect(host, int(port), keepalive=30)
        self.pump(lambda: "connack" in self.state, 20, "CONNACK")
        rc, self.session_present = self.state["connack"]
        assert not rc.is_failure, f"MQTT connect refused: {rc}"

    def pump(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"MQTT: no {what} within {timeout:.0f}s"
            rc = self.c.loop(0.05)
            assert rc == paho.MQTT_ERR_SUCCESS, f"MQTT connection lost waiting for {what} (rc {rc})"

    def subscribe(self, topic: str):
        self.c.subscribe(topic, qos=1)
        self.pump(lambda: "suback" in self.state, 20, "SUBACK")
        assert [int(r.value) for r in self.state["suback"]] == [1], self.state["suback"]

    def close(self):
        self.c.disconnect()
        self.c.loop(0.1)


def read_until_complete(pump, have, want: set[int], what: str, stall_s: float = 20.0,
                        limit_s: float = 180.0):
    """Drives `pump(secs)` until `have()` covers `want`, or nothing new came for `stall_s`
    (the check that follows names what is missing)."""
    start = last_change = time.monotonic()
    seen = -1
    while time.monotonic() - start < limit_s:
        h = have()
        if want <= h:
            return
        if len(h) != seen:
            seen, last_change = len(h), time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            return
        pump(0.1)
    raise AssertionError(f"{what}: still reading after {limit_s:.0f}s")


def ids_of(bodies) -> list[int]:
    return [int(b.decode()[3:]) for b in bodies]


# -- AMQP: reading the queue back -----------------------------------------------------------


def amqp_read_all(addr: str, queue: str, want: set[int]) -> list[int]:
    host, port = addr.rsplit(":", 1)
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host=host, port=int(port), credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1, socket_timeout=10))
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=1000)
        got: list[bytes] = []
        ch.basic_consume(queue, lambda _ch, _m, _p, body: got.append(body), auto_ack=True)
        read_until_complete(lambda s: conn.process_data_events(time_limit=s),
                            lambda: set(ids_of(got)), want, "amqp read-back")
        # What is left beyond the acknowledged ones (unconfirmed publishes that were stored).
        wait_for(lambda: (conn.process_data_events(time_limit=0.1) or True)
                 and ch.queue_declare(queue, passive=True).method.message_count == 0,
                 30, f"queue {queue} drained")
        conn.process_data_events(time_limit=0.5)
        return ids_of(got)
    finally:
        conn.close()


# -- the checks -------------------------------------------------------------------------------


def check_read_back(r: Runner, consumed: list[int]) -> tuple[str, list[str]]:
    p = r.p
    counts = collections.Counter(consumed)
    acked = set(p.acked)
    missing = sorted(acked - set(counts))
    unknown = sorted(i for i in counts if i not in p.sent)
    dups = sum(n - 1 for n in counts.values() if n > 1)
    given_up = len(p.outcome) - len(p.acked)
    line = (f"{p.name}: sent {len(p.sent)}, acknowledged {len(acked)}, given up {given_up}, "
            f"unsettled {r.unsettled}; read back {len(counts)} distinct, {dups} duplicates, "
            f"{len(missing)} acknowledged but missing; client errors {dict(p.errors)}")
    problems = []
    if missing:
        problems.append(f"{p.name}: {len(missing)} acknowledged messages lost, e.g. {missing[:10]}")
    if dups and getattr(p, "no_duplicates", False):
        problems.append(f"{p.name}: {dups} duplicates despite idempotence")
    if unknown:
        problems.append(f"{p.name}: read back ids never sent: {unknown[:10]}")
    if r.unsettled:
        problems.append(f"{p.name}: {r.unsettled} messages neither acknowledged nor failed")
    return line, problems


def report(lines: list[str]):
    path = os.environ.get("TRIBUTARY_CLUSTER_REPORT")
    for line in lines:
        print(line)
    if path:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")


# -- the scenario -------------------------------------------------------------------------------


def test_failover(cluster: Cluster):
    scenario(cluster)


def test_failover_with_shards(shard_cluster: Cluster):
    """The same events with every node serving its share of the shards (`--shards`): the
    clients' namespace (`default`, AMQP's `/`) is one shard, served by one node; each event
    hits the node serving it now, once the shards have settled (each node its quota: a node
    that came back gets its share back, which can move that shard to it)."""
    scenario(shard_cluster)


def target(c: Cluster, exclude: tuple[int, ...] = ()) -> int:
    """The node an event hits: the one serving the clients' namespace, once the live nodes'
    shards have settled (with shards; at once without)."""
    if c.shards:
        live = tuple(n for n in NODES if n not in exclude)
        wait_for(lambda: c.settled(live), WAIT_S, f"the shards settled over {live}",
                 on_timeout=c.describe)
    return c.wait_serving(WAIT_S, exclude=exclude)


def scenario(c: Cluster):
    uid = uuid.uuid4().hex[:10]
    bootstrap = c.listeners["kafka"]
    topic = f"failover-{uid}"
    ck_create_topic(bootstrap, topic, PARTITIONS)
    mqtt_topic = f"failover/{uid}"
    sub_id = f"failover-{uid}-sub"
    s = Session(c.listeners["mqtt"], sub_id)
    s.subscribe(mqtt_topic)
    s.close()
    amqp_host, amqp_port = c.listeners["amqp"].rsplit(":", 1)
    pk = PikaProducer(amqp_host, int(amqp_port), f"failover-{uid}")
    pk.declare()
    mqtt_host, mqtt_port = c.listeners["mqtt"].rsplit(":", 1)
    # Not the AMQP queue's name: that would be the same core queue, which SQS and AMQP share.
    sqs = new_sqs_producer(f"http://{c.listeners['sqs']}", f"failover-{uid}-sqs")
    runners = [
        Runner(CkProducer(bootstrap, topic), RATE),
        Runner(PahoProducer(mqtt_host, int(mqtt_port), f"failover-{uid}", mqtt_topic), RATE),
        Runner(pk, RATE),
        Runner(sqs, RATE),
    ]
    events: list[Failover] = []
    # What the cluster did that its contract forbids; asserted at the end, after the
    # read-back, so that one run reports everything.
    violations: list[str] = []
    cut_exit_s = None
    start = time.monotonic()
    for r in runners:
        r.start()
    try:
        def warm():
            for r in runners:
                r.check()
            return all(len(r.p.acked) >= WARMUP_ACKS for r in runners)
        wait_for(warm, WAIT_S, f"{WARMUP_ACKS} acknowledgements per client before any failure",
                 on_timeout=lambda: progress(runners))
        first = target(c)
        if not c.shards:
            assert first == 1, f"core{first} serves after `up`, not core1 (started first)"
        # What a restarted node says it does: stands by, or serves its share of the shards.
        restarted = "serving shards" if c.shards else "standby"

        # 1. kill -9 of the serving node; it comes back as a standby.
        ev = fail_over(c, runners, "kill -9", first, lambda: c.kill(first))
        events.append(ev)
        assert c.exit_code(first) == 137, f"core{first} ended with {c.exit_code(first)} after kill -9"
        started = c.start(first)
        if not started.endswith(restarted):
            violations.append(f"core{first}, restarted after kill -9, is not {restarted}: {started}")

        # 2. a network cut of the node serving now: it must stop by itself (exit 3).
        second = target(c)
        ev = fail_over(c, runners, "network cut", second, lambda: c.cut_node(second))
        events.append(ev)
        if c.net_mode() != "netns":
            # Without namespaces the cut is SIGSTOP: the node learns it lost its lease (and
            # must exit) only once it runs again.
            c.heal(second)
        wait_for(lambda: c.exit_code(second) is not None, WAIT_S,
                 f"core{second}, cut off, to exit by itself",
                 on_timeout=lambda: c.run_log(second)[-3000:])
        cut_exit_s = c.exit_time(second) - ev.at_wall
        rc = c.exit_code(second)
        log = c.run_log(second)
        if rc != 3 or "error: cluster:" not in log:
            violations.append(f"core{second}, cut off, exited with {rc} (not 3) or without an "
                              f"`error: cluster:` line; its log ends:\n{log[-2000:]}")
        if c.net_mode() == "netns" and ev.lease_s is not None and cut_exit_s > ev.lease_s:
            # Two nodes acknowledging at once: the old one must stop before the next starts.
            violations.append(f"core{second}, cut off, exited {cut_exit_s:.2f}s after the cut, "
                              f"after core{ev.new} took the lease ({ev.lease_s:.2f}s)")
        if second in c.cut:
            c.heal(second)
        started = c.start(second)
        if not started.endswith(restarted):
            violations.append(f"core{second}, restarted after the cut, is not {restarted}: {started}")

        # 3. SIGTERM of the node serving now: it hands the lease over at once.
        third = target(c)
        ev = fail_over(c, runners, "SIGTERM", third, lambda: c.stop(third))
        events.append(ev)
        if c.exit_code(third) != 0:
            violations.append(f"core{third} exited with {c.exit_code(third)} after SIGTERM, not 0")
        if ev.lease_s is None or ev.lease_s > HANDOVER_LIMIT_S:
            violations.append(
                f"SIGTERM of core{third} (serving): core{ev.new} took the lease "
                f"{'?' if ev.lease_s is None else f'{ev.lease_s:.2f}s'} after it, not within "
                f"{HANDOVER_LIMIT_S:.1f}s (half a lease TTL); core{third} logged:\n"
                + "\n".join(line[:200] for line in c.run_log(third).splitlines()
                            if "SIGTERM" in line or "shut down" in line or "lease" in line))

        base = {r.p.name: len(r.p.acked) for r in runners}
        wait_for(lambda: all(len(r.p.acked) >= base[r.p.name] + AFTER_LAST_EVENT_ACKS
                             for r in runners) and all(r.alive() for r in runners),
                 WAIT_S, "acknowledgements after the last failover",
                 on_timeout=lambda: progress(runners))

        # A standby stopped with SIGTERM stops gracefully too (exit 0), as every tributary
        # process does.
        standby = next(n for n in NODES if n not in (third, ev.new))
        c.stop(standby)
        if c.exit_code(standby) != 0:
            violations.append(f"core{standby}, a standby, exited with {c.exit_code(standby)} "
                              f"after SIGTERM, not 0; its log ends:\n"
                              + "\n".join(c.run_log(standby).splitlines()[-3:]))
    finally:
        stop_all(runners)
    run_s = time.monotonic() - start
    gateways = c.gateways_alive()
    assert all(gateways.values()), f"gateways died: {gateways}\n{c.describe()}"

    # Everything back: Kafka from the partitions' start, AMQP from the queue, MQTT from the
    # persistent session.
    kafka, mqtt, amqp, sqs_runner = runners
    kafka_read = ck_read_all(bootstrap, topic, PARTITIONS)
    consumed_kafka = ids_of(g.value for g in kafka_read)
    # Where each copy of a duplicated id sits, for the failure report.
    kafka_places = collections.defaultdict(list)
    for g, i in zip(kafka_read, consumed_kafka):
        kafka_places[i].append(f"{g.partition}@{g.offset}")
    s = Session(c.listeners["mqtt"], sub_id)
    assert s.session_present, "the persistent MQTT session is gone after the failovers"
    read_until_complete(s.c.loop, lambda: set(ids_of(s.got)), set(mqtt.p.acked), "mqtt read-back")
    consumed_mqtt = ids_of(s.got)
    s.close()
    consumed_amqp = amqp_read_all(c.listeners["amqp"], f"failover-{uid}", set(amqp.p.acked))
    consumed_sqs = receive_all(sqs.client, sqs.url, set(sqs_runner.p.acked), stall_s=20,
                               deadline_s=120)
    sqs_attributes = sqs.client.get_queue_attributes(QueueUrl=sqs.url, AttributeNames=["All"])

    mode = f"{c.shards} shards over three nodes" if c.shards else "one active node"
    lines = [f"cluster failover, meta = {c.meta}, {mode}, {RATE} msg/s per client, "
             f"{run_s:.0f}s of traffic:"]
    lines += ["  " + e.line() for e in events]
    lines.append(f"  the cut node exited by itself {cut_exit_s:.2f}s after the cut")
    problems = []
    for r, consumed in ((kafka, consumed_kafka), (mqtt, consumed_mqtt), (amqp, consumed_amqp),
                        (sqs_runner, consumed_sqs)):
        line, p = check_read_back(r, consumed)
        lines.append("  " + line)
        problems += p
    violations += [f"takeover slower than {TAKEOVER_LIMIT_S:.0f}s: {e.line()}"
                   for e in events if e.serving_s > TAKEOVER_LIMIT_S]
    violations += [f"clients served again later than {CLIENT_LIMIT_S:.0f}s: {e.line()}"
                   for e in events if max(e.client_s.values()) > CLIENT_LIMIT_S]
    kafka_dups = {i: at for i, at in kafka_places.items() if len(at) > 1}
    if kafka_dups:
        lines.append(f"  kafka duplicates (id: partition@offset of each copy): "
                     f"{dict(sorted(kafka_dups.items())[:20])}")
        # The idempotence events among librdkafka's eos debug lines (not its drain notes).
        said = [line for line in kafka.p.client_log
                if any(w in line.lower() for w in ("epoch", "pid", "sequence", "bump", "reset",
                                                    "order", "unknown", "fatal", "idemp"))]
        lines += ["  librdkafka: " + line[:300] for line in said[-60:]]
    if set(sqs_runner.p.acked) - set(consumed_sqs):
        lines.append(f"  sqs queue after the read-back: {sqs_attributes['Attributes']}")
    lines += ["  FAILED: " + v.splitlines()[0] for v in problems + violations]
    report(lines)
    assert not problems, "\n".join(problems + lines)
    assert not violations, "\n\n".join(violations + lines)
