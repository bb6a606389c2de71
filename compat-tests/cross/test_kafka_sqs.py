"""Kafka into SQS (docs/compat/mapping.md): a queue bound to a stream's `x-stream` exchange
receives what the stream holds, and an SQS queue of the same name is that queue, so SQS
consumers read a Kafka topic with SQS's leases, deletes and attributes. The binding is made
with AMQP (or the core API's Bind); SQS has no bindings.
"""

from __future__ import annotations

from confluent_kafka import Producer

from test_kafka_amqp import amqp_channel
from test_kafka_mqtt import bootstrap, create_topic
from test_sqs_amqp import sqs_client


def test_kafka_records_reach_sqs_receivers_through_a_bound_queue(tributary, uid):
    topic = f"payments-{uid}"
    queue = f"payments-audit-{uid}"
    create_topic(tributary, topic, partitions=2)
    conn, ch = amqp_channel(tributary)
    try:
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, topic, routing_key="")
    finally:
        conn.close()
    p = Producer({"bootstrap.servers": bootstrap(tributary), "acks": "all",
                  "compression.type": "gzip"})
    for i in range(5):
        p.produce(topic, key=f"card-{i % 2}", value=f"payment-{i}",
                  headers=[("currency", b"EUR")])
    assert p.flush(30) == 0

    sqs = sqs_client(tributary)
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    got = []
    while len(got) < 5:
        r = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=10, MaxNumberOfMessages=10,
                                MessageAttributeNames=["All"])
        msgs = r.get("Messages", [])
        assert msgs, f"{len(got)} of 5 messages received"
        for m in msgs:
            got.append(m)
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    assert sorted(m["Body"] for m in got) == [f"payment-{i}" for i in range(5)]
    assert all(m["MessageAttributes"]["currency"]["StringValue"] == "EUR" for m in got)
    # Deleted through SQS: nothing is left for anyone.
    r = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0, MaxNumberOfMessages=10)
    assert r.get("Messages", []) == []
