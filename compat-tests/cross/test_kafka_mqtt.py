"""Kafka and MQTT on one stream (docs/compat/mapping.md, "Kafka and MQTT"): a Kafka topic is
also the MQTT topic of the same name. Records produced by Kafka clients (librdkafka, any
compression, in and out of transactions) reach MQTT subscribers whose filter matches; MQTT
publishes to the topic are appended to it and read by Kafka consumers, the topic as key.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from paho.mqtt.packettypes import PacketTypes

from mqttcompat import MQTTv5, MQTTv311, Broker, Client, props


def bootstrap(t) -> str:
    return t.addrs["kafka"]


def create_topic(t, name: str, partitions: int = 1):
    admin = AdminClient({"bootstrap.servers": bootstrap(t)})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    futures[name].result(timeout=30)


def mqtt_client(t, client_id: str, protocol=MQTTv5) -> Client:
    host, port = t.host_port("mqtt")
    c = Client(Broker("tributary", host, port, t), client_id, protocol)
    c.connect()
    return c


def consume(t, topic: str, n: int, timeout: float = 30.0) -> list:
    """Reads n records of `topic` from the start with a fresh group."""
    c = Consumer({
        "bootstrap.servers": bootstrap(t),
        "group.id": f"g-{topic}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    c.subscribe([topic])
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                raise KafkaException(m.error())
            got.append(m)
    finally:
        c.close()
    assert len(got) == n, f"read {len(got)} of {n} records of {topic}"
    return got


def test_kafka_records_reach_mqtt_subscribers_in_partition_order(tributary, uid):
    topic = f"plant-{uid}"
    create_topic(tributary, topic, partitions=3)
    exact = mqtt_client(tributary, f"exact-{uid}")
    assert exact.subscribe(topic, 1) == [1]
    wildcard = mqtt_client(tributary, f"wild-{uid}", MQTTv311)
    assert wildcard.subscribe("#", 1) == [1]

    p = Producer({"bootstrap.servers": bootstrap(tributary), "acks": "all",
                  "compression.type": "lz4", "linger.ms": 5})
    sent = []
    for i in range(30):
        key, value = f"k{i % 3}", f"v{i}"
        p.produce(topic, key=key, value=value, headers=[("trace", f"t{i}".encode())])
        sent.append((key, value))
    assert p.flush(30) == 0

    for client in (exact, wildcard):
        msgs = client.wait_messages(30, timeout=30)
        assert len(msgs) == 30, f"{client.client_id}: {len(msgs)} messages"
        assert {m.topic for m in msgs} == {topic}
        assert all(m.qos == 1 for m in msgs)
        assert sorted(m.payload.decode() for m in msgs) == sorted(v for _, v in sent)
        # A key stays in one partition: its records arrive in the order produced.
        for key in ("k0", "k1", "k2"):
            want = [v for k, v in sent if k == key]
            got = [m.payload.decode() for m in msgs if m.payload.decode() in want]
            assert got == want, key
    # MQTT 5 carries the Kafka headers as user properties.
    by_value = {m.payload.decode(): m for m in exact.received()}
    assert by_value["v7"].properties.UserProperty == [("trace", "t7")]


def test_mqtt_publishes_are_appended_and_read_by_kafka_consumers(tributary, uid):
    topic = f"meters-{uid}"
    create_topic(tributary, topic, partitions=2)
    listener = mqtt_client(tributary, f"listen-{uid}")
    listener.subscribe(topic, 1)
    pub5 = mqtt_client(tributary, f"pub5-{uid}")
    pub3 = mqtt_client(tributary, f"pub3-{uid}", MQTTv311)
    p = props(PacketTypes.PUBLISH, ContentType="application/json",
              CorrelationData=b"corr-1", ResponseTopic=f"replies-{uid}")
    p.UserProperty = [("site", "north"), ("unit", "kWh")]
    assert pub5.publish(topic, b'{"kwh": 1}', 1, properties=p) == 0
    assert pub3.publish(topic, b"second", 1) == 0

    records = consume(tributary, topic, 2)
    by_value = {r.value(): r for r in records}
    assert set(by_value) == {b'{"kwh": 1}', b"second"}
    for r in records:
        # The MQTT topic is the key: one topic's messages stay in one partition, in order.
        assert r.key() == topic.encode()
    headers = dict(by_value[b'{"kwh": 1}'].headers())
    assert headers["site"] == b"north"
    assert headers["unit"] == b"kWh"
    # MQTT properties Kafka has no field for travel as named headers.
    assert headers["tributary.content-type"] == b"application/json"
    assert headers["tributary.correlation-id"] == b"corr-1"
    assert headers["tributary.reply-to"] == f"replies-{uid}".encode()
    assert by_value[b"second"].headers() in (None, [])
    # MQTT subscribers got each publish once (routed when published, not again from the
    # stream): the next record Kafka appends comes right after them.
    producer = Producer({"bootstrap.servers": bootstrap(tributary)})
    producer.produce(topic, key="k", value="from-kafka")
    assert producer.flush(30) == 0
    msgs = listener.wait_messages(3, timeout=30)
    assert [m.payload for m in msgs] == [b'{"kwh": 1}', b"second", b"from-kafka"]


def test_only_committed_kafka_transactions_reach_mqtt(tributary, uid):
    topic = f"orders-{uid}"
    create_topic(tributary, topic)
    sub = mqtt_client(tributary, f"sub-{uid}")
    sub.subscribe(topic, 1)
    p = Producer({"bootstrap.servers": bootstrap(tributary), "transactional.id": f"tx-{uid}"})
    p.init_transactions(30)
    p.begin_transaction()
    p.produce(topic, value="aborted")
    p.flush(30)
    p.abort_transaction(30)
    p.begin_transaction()
    p.produce(topic, value="committed")
    p.commit_transaction(30)
    plain = Producer({"bootstrap.servers": bootstrap(tributary)})
    plain.produce(topic, value="after")
    assert plain.flush(30) == 0
    msgs = sub.wait_messages(2, timeout=30)
    assert [m.payload for m in msgs] == [b"committed", b"after"]


def test_a_persistent_mqtt_session_gets_kafka_records_across_kill_9(tributary, uid):
    """A persistent MQTT session subscribed to a Kafka topic gets what Kafka appended while
    it was offline, though the server was killed (-9) and restarted in between."""
    topic = f"alerts-{uid}"
    create_topic(tributary, topic)

    def session() -> Client:
        host, port = tributary.host_port("mqtt")
        c = Client(Broker("tributary", host, port, tributary), f"durable-{uid}", MQTTv311,
                   clean=False)
        c.connect()
        return c

    sub = session()
    sub.subscribe(topic, 1)
    sub.disconnect()
    p = Producer({"bootstrap.servers": bootstrap(tributary), "acks": "all"})
    for v in ("offline-1", "offline-2"):
        p.produce(topic, value=v)
    assert p.flush(30) == 0
    tributary.kill9_and_restart()
    sub = session()
    assert [m.payload for m in sub.wait_messages(2, timeout=30)] == [b"offline-1", b"offline-2"]


def test_rules_map_mqtt_topic_levels_onto_one_kafka_topic(make_tributary, uid):
    """[[mqtt_stream_rules]] sensors-UID/# -> stream sensors-UID: MQTT publishes under the
    filter land in the one Kafka topic with their MQTT topic as key, and Kafka records whose
    key is such a topic reach MQTT subscribers on it (IoT ingestion and commands back)."""
    stream = f"sensors-{uid}"
    t = make_tributary(f'[[mqtt_stream_rules]]\nfilter = "{stream}/#"\nstream = "{stream}"\n')
    sub = mqtt_client(t, f"sub-{uid}")
    sub.subscribe(f"{stream}/+/cmd", 1)
    pub = mqtt_client(t, f"pub-{uid}", MQTTv311)
    for room in ("r1", "r2"):
        assert pub.publish(f"{stream}/{room}/temp", f"{room}-21.5".encode(), 1) == 0
    records = consume(t, stream, 2)
    assert sorted((r.key(), r.value()) for r in records) == [
        (f"{stream}/r1/temp".encode(), b"r1-21.5"),
        (f"{stream}/r2/temp".encode(), b"r2-21.5"),
    ]
    p = Producer({"bootstrap.servers": bootstrap(t)})
    p.produce(stream, key=f"{stream}/r1/cmd", value="heat-on")
    p.produce(stream, key="not-a-rule-topic", value="to-the-stream-name")
    assert p.flush(30) == 0
    msgs = sub.wait_messages(1, timeout=30)
    assert [(m.topic, m.payload) for m in msgs] == [(f"{stream}/r1/cmd", b"heat-on")]
