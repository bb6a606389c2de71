"""Kafka and AMQP on one stream (docs/compat/mapping.md, "Streams as AMQP exchanges"): every
stream is an exchange of the same name (type `x-stream`) on vhost `/`. A publish to it
appends (the routing key as the record key); queues bound to it receive what the stream
holds, whoever appended it, with AMQP's competing consumers and acks.
"""

from __future__ import annotations

import time

import pika
import pytest
from confluent_kafka import Producer

from test_kafka_mqtt import bootstrap, consume, create_topic


def amqp_channel(t):
    host, port = t.host_port("amqp")
    conn = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    return conn, conn.channel()


def get_n(ch, queue: str, n: int, timeout: float = 30.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        got.append((props, body))
    assert len(got) == n, f"{queue}: {len(got)} of {n} messages"
    return got


def test_kafka_records_reach_queues_bound_to_the_stream_exchange(tributary, uid):
    topic = f"ledger-{uid}"
    create_topic(tributary, topic, partitions=2)
    conn, ch = amqp_channel(tributary)
    try:
        ch.exchange_declare(topic, passive=True)
        for q in (f"audit-{uid}", f"billing-{uid}"):
            ch.queue_declare(q, durable=True)
            ch.queue_bind(q, topic, routing_key="")
        p = Producer({"bootstrap.servers": bootstrap(tributary), "acks": "all",
                      "compression.type": "zstd"})
        for i in range(10):
            p.produce(topic, key=f"acct-{i % 2}", value=f"entry-{i}",
                      headers=[("currency", b"EUR")])
        assert p.flush(30) == 0
        for q in (f"audit-{uid}", f"billing-{uid}"):
            got = get_n(ch, q, 10)
            assert sorted(body for _, body in got) == sorted(f"entry-{i}".encode() for i in range(10))
            assert all(props.headers["currency"] == "EUR" for props, _ in got)
            # One key's records keep their order (one partition).
            acct0 = [body for _, body in got if body in {f"entry-{i}".encode() for i in range(0, 10, 2)}]
            assert acct0 == [f"entry-{i}".encode() for i in range(0, 10, 2)]
    finally:
        conn.close()


def test_amqp_publishes_to_the_stream_exchange_are_read_by_kafka(tributary, uid):
    topic = f"trades-{uid}"
    create_topic(tributary, topic)
    conn, ch = amqp_channel(tributary)
    try:
        ch.confirm_delivery()
        ch.basic_publish(topic, "desk-1", b"trade-1", pika.BasicProperties(
            delivery_mode=2, headers={"venue": "XPAR"}), mandatory=True)
        ch.basic_publish(topic, "desk-2", b"trade-2", mandatory=True)
    finally:
        conn.close()
    records = consume(tributary, topic, 2)
    by_value = {r.value(): r for r in records}
    assert by_value[b"trade-1"].key() == b"desk-1"
    assert by_value[b"trade-2"].key() == b"desk-2"
    assert dict(by_value[b"trade-1"].headers())["venue"] == b"XPAR"


def test_stream_exchanges_are_the_streams_own(tributary, uid):
    conn, ch = amqp_channel(tributary)
    try:
        # No stream of that name: an x-stream exchange cannot be made by hand.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            ch.exchange_declare(f"nothing-{uid}", exchange_type="x-stream", durable=True)
    finally:
        conn.close()
    topic = f"kept-{uid}"
    create_topic(tributary, topic)
    conn, ch = amqp_channel(tributary)
    try:
        ch.exchange_declare(topic, exchange_type="x-stream", durable=True)  # equivalent
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            ch.exchange_delete(topic)
    finally:
        conn.close()
