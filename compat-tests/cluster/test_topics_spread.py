"""One namespace's Kafka topics spread over the core nodes (`cluster_shard_scheme = "stream"`,
docs/cluster.md "Spreading one namespace's topics"), with the clients users run:

* six topics of the gateway's namespace, each with an idempotent confluent-kafka producer
  (acks=all) at a steady rate; the topics' shards are served by at least two nodes;
* kill -9 of the node serving the most of them; it comes back and gets its share back;
* every acknowledged message of every topic is read back, once each (idempotence);
* a consumer group subscribed to all six topics reads every acknowledged message: its
  Fetches span the shards (the gateway splits them) and its commits go to the namespace's
  home, which knows every topic from the catalog.
"""

from __future__ import annotations

import collections
import time
import uuid

from clusterctl import NODES, Cluster, shard_of_topic, wait_for
from kafkacompat import ck_consumer, ck_create_topic, ck_read_all
from producers import CkProducer, Runner, acked_each, stop_all
from test_failover import check_read_back, ids_of, progress, report

TOPICS = 6
PARTITIONS = 2
RATE = 20
WARMUP_ACKS = 20
AFTER_ACKS = 20
WAIT_S = 60.0


def test_topics_of_one_namespace_spread_over_nodes(spread_cluster: Cluster):
    c = spread_cluster
    uid = uuid.uuid4().hex[:8]
    bootstrap = c.listeners["kafka"]
    topics = [f"spread-{uid}-{t}" for t in range(TOPICS)]
    for t in topics:
        ck_create_topic(bootstrap, t, PARTITIONS)
    wait_for(lambda: c.settled(NODES), WAIT_S, "the shards settled", on_timeout=c.describe)
    where = {t: c.node_serving(shard_of_topic("default", t, c.shards)) for t in topics}
    assert None not in where.values(), where
    assert len(set(where.values())) >= 2, f"every topic is on one node: {where}"

    runners = [Runner(CkProducer(bootstrap, t), RATE) for t in topics]
    start = time.monotonic()
    for r in runners:
        r.start()
    try:
        wait_for(lambda: acked_each(runners, WARMUP_ACKS), WAIT_S, "acknowledgements before the kill",
                 on_timeout=lambda: progress(runners))

        victim = collections.Counter(where.values()).most_common(1)[0][0]
        at = time.monotonic()
        c.kill(victim)
        done = time.monotonic()

        def acked_after():
            for r in runners:
                r.check()
            firsts = [r.first_ack_of_sent_after(done) for r in runners]
            return firsts if all(f is not None for f in firsts) else None
        firsts = wait_for(acked_after, WAIT_S, "every producer acknowledged after the kill",
                          on_timeout=lambda: progress(runners) + "\n" + c.describe())
        client_s = max(firsts) - at

        c.start(victim)
        wait_for(lambda: c.settled(NODES), WAIT_S, "the shards settled again",
                 on_timeout=c.describe)
        base = {r.p.name + r.p.topic: len(r.p.acked) for r in runners}
        wait_for(lambda: acked_each(runners, AFTER_ACKS, base), WAIT_S,
                 "acknowledgements after the node came back",
                 on_timeout=lambda: progress(runners))
    finally:
        stop_all(runners)
    run_s = time.monotonic() - start

    lines = [f"topics spread over nodes (cluster_shard_scheme = stream), meta = {c.meta}, "
             f"{c.shards} shards, {TOPICS} topics on nodes {sorted(set(where.values()))}, "
             f"{RATE} msg/s per producer, {run_s:.0f}s of traffic:",
             f"  kill -9 of core{victim} (serving {sum(1 for n in where.values() if n == victim)} "
             f"of the topics): every producer acknowledged again after {client_s:.2f}s"]
    problems = []
    for r in runners:
        line, p = check_read_back(r, ids_of(g.value for g in ck_read_all(bootstrap, r.p.topic,
                                                                        PARTITIONS)))
        lines.append(f"  {r.p.topic}: " + line)
        problems += p

    # A group over every topic reads every acknowledged message (at least once).
    want = {t: set(r.p.acked) for t, r in zip(topics, runners)}
    got: dict[str, set[int]] = {t: set() for t in topics}
    consumer = ck_consumer(bootstrap, **{"group.id": f"spread-{uid}"})
    try:
        consumer.subscribe(topics)
        deadline = time.monotonic() + 120
        while any(not want[t] <= got[t] for t in topics):
            assert time.monotonic() < deadline, "the group did not read every acknowledged " \
                "message: missing " + str({t: len(want[t] - got[t]) for t in topics})
            for m in consumer.consume(num_messages=1000, timeout=0.5):
                if m.error():
                    continue  # retriable during rebalances; the loop's deadline bounds it
                got[m.topic()].update(ids_of([m.value()]))
        # The group's offsets for all six topics, committed at the namespace's home.
        committed = consumer.commit(asynchronous=False)
        assert committed and all(tp.error is None for tp in committed), committed
        assert {tp.topic for tp in committed} == set(topics), committed
    finally:
        consumer.close()
    lines.append(f"  a group over the {TOPICS} topics read all "
                 f"{sum(len(w) for w in want.values())} acknowledged messages and committed")
    report(lines)
    assert not problems, "\n".join(problems)
