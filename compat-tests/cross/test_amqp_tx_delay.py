"""Transaction with delay (docs/compat/mapping.md, "Delayed delivery"): an AMQP publish with
`x-delay` inside `tx.select` is released only if the transaction commits, at its time; a rolled
back one never arrives. (The Kafka form, a transactional producer on a delay line, is in
test_kafka_delay.py.) RabbitMQ's delayed-message exchange is a plugin its reference install
lacks, so this runs against Tributary only.
"""

from __future__ import annotations

import time

import pika


def test_a_delayed_publish_in_a_transaction_is_released_only_on_commit(tributary, uid):
    host, port = tributary.host_port("amqp")
    conn = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    try:
        ch = conn.channel()
        ex, q = f"later-{uid}", f"jobs-{uid}"
        ch.exchange_declare(ex, "x-delayed-message", arguments={"x-delayed-type": "direct"})
        ch.queue_declare(q, durable=True)
        ch.queue_bind(q, ex, "k")
        ch.tx_select()
        delayed = pika.BasicProperties(delivery_mode=2, headers={"x-delay": 1500})
        ch.basic_publish(ex, "k", b"rolled-back", delayed)
        ch.tx_rollback()
        published_at = time.monotonic()
        ch.basic_publish(ex, "k", b"committed", delayed)
        ch.tx_commit()
        ch.basic_publish(ex, "k", b"end", pika.BasicProperties(headers={"x-delay": 2500}))
        ch.tx_commit()

        got = []
        for method, _, body in ch.consume(q, inactivity_timeout=20):
            assert method is not None, f"only {got} arrived"
            got.append((time.monotonic() - published_at, body))
            ch.basic_ack(method.delivery_tag)
            if body == b"end":
                break
        # The rolled-back publish never comes; the committed one comes at its time.
        assert [b for _, b in got] == [b"committed", b"end"]
        assert got[0][0] >= 1.45, f"released after {got[0][0]:.2f} s"
    finally:
        conn.close()
