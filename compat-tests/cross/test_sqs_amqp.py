"""SQS and AMQP on one queue (docs/compat/mapping.md, "SQS and AMQP"): an SQS queue and the
AMQP queue of the same name on vhost `/` are one core queue of namespace `default`, so a
message sent by either is received by either, and a receive leases it for the other too.
"""

from __future__ import annotations

import time

import pika

from sqscompat import Broker as SqsBroker


def sqs_client(t):
    return SqsBroker("tributary", f"http://{t.addrs['sqs']}", t).client()


def amqp_channel(t):
    host, port = t.host_port("amqp")
    conn = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    return conn, conn.channel()


def get_one(ch, queue: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=False)
        if method is not None:
            return method, props, body
        time.sleep(0.05)
    raise AssertionError(f"nothing on {queue} within {timeout} s")


def test_sqs_messages_reach_amqp_consumers_with_their_attributes(tributary, uid):
    sqs = sqs_client(tributary)
    name = f"jobs-{uid}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="job-1", MessageAttributes={
        "priority": {"DataType": "String", "StringValue": "high"},
    })
    conn, ch = amqp_channel(tributary)
    try:
        # Passive: the queue SQS created is the one AMQP sees.
        ch.queue_declare(name, passive=True)
        method, props, body = get_one(ch, name)
        assert body == b"job-1"
        assert props.headers["priority"] == "high"
        ch.basic_ack(method.delivery_tag)
    finally:
        conn.close()
    # Acknowledged through AMQP: gone for SQS too.
    got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0, MaxNumberOfMessages=10)
    assert got.get("Messages", []) == []


def test_amqp_publishes_reach_sqs_receivers_and_deletes_ack_them(tributary, uid):
    name = f"tasks-{uid}"
    conn, ch = amqp_channel(tributary)
    try:
        ch.queue_declare(name, durable=True)
        ch.confirm_delivery()
        ch.basic_publish("", name, b"task-1", pika.BasicProperties(
            delivery_mode=2, correlation_id="c-1", headers={"origin": "amqp"}))
        sqs = sqs_client(tributary)
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=10,
                                  MessageAttributeNames=["All"], VisibilityTimeout=30)
        msgs = got["Messages"]
        assert [m["Body"] for m in msgs] == ["task-1"]
        assert msgs[0]["MessageAttributes"]["origin"]["StringValue"] == "amqp"
        # Leased by the SQS receive: AMQP does not get it meanwhile.
        method, _, _ = ch.basic_get(name, auto_ack=False)
        assert method is None
        sqs.delete_message(QueueUrl=url, ReceiptHandle=msgs[0]["ReceiptHandle"])
        ch.queue_declare(name, passive=True)
        assert ch.queue_declare(name, passive=True).method.message_count == 0
    finally:
        conn.close()
