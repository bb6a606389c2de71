"""Kafka partition leaders follow the shard owners (docs/cluster.md, "Spreading one namespace's
topics"; docs/design/intra-namespace-spreading.md, step 4), with the clients users run:

* six shards placed by stream, a Kafka gateway beside each node N, broker id N, the three one
  fleet (`cluster.sh up --shards 6 --scheme stream --kafka-per-node`: `--kafka-broker-node
  coreN`); six topics of the gateways' namespace, one in each shard, so that every node
  serves two of them and whichever shards a node gets back it serves some of them;
* Metadata, asked of each gateway, names as every partition's leader the broker beside the
  node serving the topic's shard (the same answer from all three), and a group's coordinator
  is the broker beside the node serving the namespace's home shard;
* idempotent confluent-kafka producers (acks=all) on the six topics; kill -9 of the node
  serving the most of them: Metadata stops naming its broker as a leader (the takeover plus
  a refresh of the owners, every second) and names the brokers beside the shards' new owners;
  every producer is acknowledged again;
* the node is started again and gets its share of shards back: its broker leads again;
* every acknowledged message of every topic is read back, once each (idempotence).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
import uuid

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from clusterctl import NODES, Cluster, shard_of, shard_of_topic, wait_for
from kafkacompat import ck_consumer, ck_create_topic, ck_read_all
from producers import CkProducer, Runner, acked_each, stop_all
from test_failover import check_read_back, ids_of, progress, report

# Every gateway's namespace.
NAMESPACE = "default"
PARTITIONS = 2
RATE = 20
WARMUP_ACKS = 20
AFTER_ACKS = 20
# Leaders after `up`: each gateway reads the shard owners every second and lists the others once
# their registrations reached the core (fleet.rs, renewed every 3 s).
LEADERS_S = 30.0
# After a kill: the takeover (a lease TTL, the shard's opening) plus a refresh of the owners.
WAIT_S = 60.0
# After the node's return: it starts, then shards move back to it.
RETURN_S = 120.0
POLL_S = 0.2


@dataclasses.dataclass
class View:
    """One gateway's Metadata: the brokers it lists, each partition's leader (-1: none)."""
    brokers: dict[int, str]
    leaders: dict[tuple[str, int], int]

    def by_topic(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for (t, _), leader in sorted(self.leaders.items()):
            out.setdefault(t.rsplit("-", 1)[-1], []).append(leader)
        return out


def ask_metadata(addr: str, broker: int, topics: list[str]) -> View | None:
    """Gateway `addr`'s (broker `broker`'s) Metadata of `topics`, or None when it did not
    answer, or another broker did (librdkafka asks any broker it knows; a fresh client knows
    its bootstrap broker only, so this is rare)."""
    # Quiet: while a node is down a gateway may fail to answer; that is what the polls wait out.
    asker = AdminClient({"bootstrap.servers": addr, "log_level": 0})
    try:
        md = asker.list_topics(timeout=5)
    except KafkaException:
        return None
    if md.orig_broker_id != broker and md.orig_broker_name.rsplit("/", 1)[0] != addr:
        return None
    brokers = {b.id: f"{b.host}:{b.port}" for b in md.brokers.values()}
    leaders = {}
    for t in topics:
        tm = md.topics.get(t)
        parts = tm.partitions if tm is not None and tm.error is None else {}
        for p in range(PARTITIONS):
            leaders[(t, p)] = parts[p].leader if p in parts and parts[p].error is None else -1
    return View(brokers, leaders)


def coordinator_of(addr: str, group: str) -> int | None:
    """The coordinator of `group` as gateway `addr` names it (librdkafka does not expose
    FindCoordinator; DescribeConsumerGroups asks it, then names the broker it asked)."""
    asker = AdminClient({"bootstrap.servers": addr, "log_level": 0})
    try:
        fs = asker.describe_consumer_groups([group], request_timeout=5)
        return fs[group].result(timeout=10).coordinator.id
    except (KafkaException, TimeoutError):
        return None


def one_topic_per_shard(uid: str, shards: int) -> list[str]:
    """A topic name in each shard, in shard order."""
    by_shard: dict[int, str] = {}
    for i in itertools.count():
        assert i < 100 * shards, f"{i} names did not cover the {shards} shards"
        name = f"leaders-{uid}-{i}"
        by_shard.setdefault(shard_of_topic(NAMESPACE, name, shards), name)
        if len(by_shard) == shards:
            return [by_shard[s] for s in range(shards)]


class Leaders:
    """What the gateways say against what the nodes serve. Keeps the last answers for a
    timeout's message."""

    def __init__(self, c: Cluster, topics: list[str]):
        self.c, self.topics = c, topics
        self.owners: dict[str, int] | None = None
        self.last: dict[int, View | None] = {}

    def topic_owners(self, live: tuple[int, ...]) -> dict[str, int] | None:
        """The node serving each topic's shard, among `live` (None while a shard is served by
        none of them or by two, or one does not answer)."""
        servers = self.c.shard_servers(live)
        if servers is None:
            return None
        owners = {}
        for t in self.topics:
            s = servers.get(shard_of_topic(NAMESPACE, t, self.c.shards), [])
            if len(s) != 1:
                return None
            owners[t] = s[0]
        return owners

    def views(self) -> dict[int, View] | None:
        """Every gateway's Metadata (None if one did not answer)."""
        views = {}
        for n, addr in self.c.kafka_nodes.items():
            v = self.last[n] = ask_metadata(addr, n, self.topics)
            if v is None:
                return None
            views[n] = v
        return views

    def follow_owners(self, live: tuple[int, ...]) -> dict[str, int] | None:
        """The topics' owners once every gateway lists the three brokers and names, as every
        partition's leader, the broker beside the node serving its topic's shard (so all
        three agree), the owners unchanged while they were asked."""
        owners = self.owners = self.topic_owners(live)
        if owners is None:
            return None
        views = self.views()
        if views is None:
            return None
        want = {(t, p): owners[t] for t in self.topics for p in range(PARTITIONS)}
        if any(v.leaders != want or v.brokers != self.c.kafka_nodes for v in views.values()):
            return None
        return owners if self.topic_owners(live) == owners else None

    def none_led_by(self, broker: int) -> bool:
        """Every gateway names a leader for every partition, never `broker`."""
        views = self.views()
        return views is not None and all(
            all(leader >= 0 and leader != broker for leader in v.leaders.values())
            for v in views.values())

    def describe(self) -> str:
        lines = [f"nodes serving the topics' shards: {self.owners}"]
        for n, v in sorted(self.last.items()):
            lines.append(f"gateway kafka-{n}: " + ("no answer" if v is None else
                         f"brokers {sorted(v.brokers)}, leaders by topic {v.by_topic()}"))
        return "\n".join(lines) + "\n" + self.c.describe()


def test_kafka_leaders_follow_shard_owners(leaders_cluster: Cluster):
    c = leaders_cluster
    uid = uuid.uuid4().hex[:8]
    gateways = c.kafka_nodes
    bootstrap = ",".join(gateways[n] for n in NODES)
    wait_for(lambda: c.settled(NODES), WAIT_S, "the shards settled", on_timeout=c.describe)
    topics = one_topic_per_shard(uid, c.shards)
    for t in topics:
        ck_create_topic(bootstrap, t, PARTITIONS)
    leaders = Leaders(c, topics)

    # Each topic's partitions are led by the broker beside the node serving its shard.
    created = time.monotonic()
    where = wait_for(lambda: leaders.follow_owners(NODES), LEADERS_S,
                     "every gateway naming the owners' brokers as the leaders",
                     interval=POLL_S, on_timeout=leaders.describe)
    settle_s = time.monotonic() - created
    assert set(where.values()) == set(NODES), f"a node serves none of the topics: {where}"

    # A group's coordinator: the broker beside the node serving the namespace's home shard.
    group = f"leaders-{uid}"
    consumer = ck_consumer(bootstrap, **{"group.id": group})
    try:
        consumer.subscribe([topics[0]])

        def joined():
            consumer.poll(0.2)
            return bool(consumer.assignment())
        wait_for(joined, LEADERS_S, f"group {group} joined", interval=0)
    finally:
        consumer.close()
    home = shard_of(NAMESPACE, c.shards)

    seen: dict = {}

    def coordinators():
        owner = seen["home served by"] = (c.shard_servers(NODES) or {}).get(home, [])
        got = seen["coordinator by gateway"] = {n: coordinator_of(addr, group)
                                                for n, addr in gateways.items()}
        return owner[0] if len(owner) == 1 and set(got.values()) == set(owner) else None
    home_node = wait_for(coordinators, LEADERS_S,
                         f"every gateway naming the broker beside the node serving home shard "
                         f"{home} as group {group}'s coordinator", interval=POLL_S,
                         on_timeout=lambda: f"{seen}\n{c.describe()}")

    runners = [Runner(CkProducer(bootstrap, t), RATE) for t in topics]
    start = time.monotonic()
    for r in runners:
        r.start()
    try:
        wait_for(lambda: acked_each(runners, WARMUP_ACKS), WAIT_S, "acknowledgements before the kill",
                 on_timeout=lambda: progress(runners))

        victim = collections.Counter(where.values()).most_common(1)[0][0]
        survivors = tuple(n for n in NODES if n != victim)
        at = time.monotonic()
        c.kill(victim)
        done = time.monotonic()

        # Its partitions are led by other brokers: those beside the shards' new owners.
        wait_for(lambda: leaders.none_led_by(victim), WAIT_S,
                 f"no partition led by broker {victim} (beside the killed core{victim})",
                 interval=POLL_S, on_timeout=leaders.describe)
        moved_s = time.monotonic() - at
        moved_to = wait_for(lambda: leaders.follow_owners(survivors), WAIT_S,
                            "every gateway naming the new owners' brokers as the leaders",
                            interval=POLL_S, on_timeout=leaders.describe)
        owners_s = time.monotonic() - at

        def acked_after():
            for r in runners:
                r.check()
            firsts = [r.first_ack_of_sent_after(done) for r in runners]
            return firsts if all(f is not None for f in firsts) else None
        firsts = wait_for(acked_after, WAIT_S, "every producer acknowledged after the kill",
                          on_timeout=lambda: progress(runners) + "\n" + c.describe())
        client_s = max(firsts) - at

        # Back: shards move to it again, and its broker leads their partitions.
        def leads_again():
            owners = leaders.follow_owners(NODES)
            return owners is not None and victim in owners.values()
        back_at = time.monotonic()
        c.start(victim)
        wait_for(leads_again, RETURN_S,
                 f"broker {victim} leading partitions again (core{victim} back)",
                 interval=POLL_S, on_timeout=leaders.describe)
        back_s = time.monotonic() - back_at
        wait_for(lambda: c.settled(NODES), RETURN_S, "the shards settled again",
                 on_timeout=c.describe)
        where_back = wait_for(lambda: leaders.follow_owners(NODES), WAIT_S,
                              "every gateway naming the owners' brokers once settled",
                              interval=POLL_S, on_timeout=leaders.describe)
        base = {r.p.name + r.p.topic: len(r.p.acked) for r in runners}
        wait_for(lambda: acked_each(runners, AFTER_ACKS, base), WAIT_S,
                 "acknowledgements after the node came back",
                 on_timeout=lambda: progress(runners))
    finally:
        stop_all(runners)
    run_s = time.monotonic() - start

    def count(owners, n):
        return sum(1 for o in owners.values() if o == n)
    spread_after = {f"core{n}": count(moved_to, n) for n in survivors}
    lines = [f"Kafka leaders follow the shard owners (a gateway beside each node, "
             f"cluster_shard_scheme = stream), meta = {c.meta}, {c.shards} shards, "
             f"{len(topics)} topics (one per shard) x {PARTITIONS} partitions, "
             f"{RATE} msg/s per producer, {run_s:.0f}s of traffic:",
             f"  leaders = the owners' brokers on every gateway {settle_s:.2f}s after the topics "
             f"were made; group coordinator broker {home_node} (home shard {home})",
             f"  kill -9 of core{victim} (serving {count(where, victim)} of the topics): no "
             f"partition led by broker {victim} after {moved_s:.2f}s, all led by the new "
             f"owners' brokers after {owners_s:.2f}s (topics served: {spread_after}); every "
             f"producer acknowledged again after {client_s:.2f}s",
             f"  core{victim} started again: broker {victim} leads again after {back_s:.2f}s "
             f"({count(where_back, victim)} topics once settled)"]
    problems = []
    for r in runners:
        line, p = check_read_back(r, ids_of(g.value for g in ck_read_all(bootstrap, r.p.topic,
                                                                        PARTITIONS)))
        lines.append(f"  {r.p.topic}: " + line)
        problems += p
    report(lines)
    assert not problems, "\n".join(problems)
