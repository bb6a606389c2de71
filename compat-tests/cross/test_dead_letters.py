"""Dead letters across protocols (docs/compat/mapping.md, "Dead letters and redrive"): what one
protocol dead-letters is listed by the admin API with its reason, origin and delivery count,
and redriven to any queue (an SQS queue here) or through any address (a Kafka topic's stream
address), paced and cancellable, never dropped when it routes nowhere.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pika
import pytest
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from sqscompat import Broker as SqsBroker

TOKEN = "cross-dead-letter-token-0123456789abcdef"


@pytest.fixture
def t(make_tributary):
    return make_tributary(f'core_token = "{TOKEN}"\n')


def api(t, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(
        f"http://{t.addrs['admin']}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def amqp_channel(t):
    host, port = t.host_port("amqp")
    conn = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    return conn, conn.channel()


def dead_letter_via_amqp(t, queue: str, bodies: list[str]):
    """Publishes to `queue` (dead letters to `queue`.dlq) and rejects each: reason "rejected"."""
    conn, ch = amqp_channel(t)
    try:
        ch.confirm_delivery()
        ch.queue_declare(f"{queue}.dlq", durable=True)
        ch.queue_declare(queue, durable=True, arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dlq"})
        for b in bodies:
            ch.basic_publish("", queue, b.encode(),
                             pika.BasicProperties(delivery_mode=2, content_type="text/plain"))
        for _ in bodies:
            method, _, _ = ch.basic_get(queue, auto_ack=False)
            assert method is not None
            ch.basic_reject(method.delivery_tag, requeue=False)
        ch.queue_declare(f"{queue}.dlq", durable=True, passive=True)
    finally:
        conn.close()
    wait_for(lambda: len(dead_letters_of(t, f"{queue}.dlq")) == len(bodies),
             f"{len(bodies)} dead letters in {queue}.dlq")


def dead_letters_of(t, queue: str) -> list[dict]:
    status, body = api(t, "GET", "/api/v1/dead-letters?namespace=default&max=100")
    assert status == 200, body
    return [m for q in body["dead_letters"] if q["queue"] == queue for m in q["messages"]]


def wait_for(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def session_connected(t, client_id: str) -> bool:
    status, body = api(t, "GET", "/api/v1/sessions?namespace=default")
    assert status == 200, body
    return next(x for x in body["sessions"] if x["client_id"] == client_id)["connected"]


def redrive_ends(t, task_id: str) -> dict:
    found = {}

    def ended():
        status, body = api(t, "GET", "/api/v1/redrives")
        assert status == 200, body
        found.update(next(x for x in body["redrives"] if x["task_id"] == task_id))
        return found["status"] not in ("RUNNING", "CANCELLING")

    wait_for(ended, f"end of redrive {task_id}")
    return found


def test_an_amqp_dead_letter_is_listed_and_redriven_into_an_sqs_queue(t, uid):
    queue = f"work-{uid}"
    dead_letter_via_amqp(t, queue, ["job-1", "job-2"])
    listed = dead_letters_of(t, f"{queue}.dlq")
    assert [m["value"] for m in listed] == ["job-1", "job-2"]
    p = listed[0]["properties"]
    assert p["dead_letter_reason"] == "rejected"
    assert p["dead_letter_queue"] == queue
    assert p["dead_letter_delivery_count"] == 1
    assert p["dead_letter_original_key"] == queue
    assert p["origin_protocol"] == "amqp"

    sqs = SqsBroker("tributary", f"http://{t.addrs['sqs']}", t).client()
    url = sqs.create_queue(QueueName=f"redo-{uid}")["QueueUrl"]
    status, task = api(t, "POST", f"/api/v1/queues/default/{queue}.dlq/redrive",
                       {"destination": f"redo-{uid}"})
    assert status == 202, task
    assert redrive_ends(t, task["task_id"])["status"] == "COMPLETED"
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 2 and time.monotonic() < deadline:
        r = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1, MaxNumberOfMessages=10,
                                AttributeNames=["All"])
        got += r.get("Messages", [])
    assert sorted(m["Body"] for m in got) == ["job-1", "job-2"]
    assert dead_letters_of(t, f"{queue}.dlq") == []


def test_a_dead_letter_is_redriven_through_a_kafka_topics_address(t, uid):
    queue, topic = f"pay-{uid}", f"audit-{uid}"
    admin = AdminClient({"bootstrap.servers": t.addrs["kafka"]})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(
        timeout=30)
    dead_letter_via_amqp(t, queue, ["p-1"])

    # An address that routes nowhere: the task fails, the message stays.
    conn, ch = amqp_channel(t)
    ch.exchange_declare(f"void-{uid}", "direct")
    conn.close()
    status, task = api(t, "POST", f"/api/v1/queues/default/{queue}.dlq/redrive",
                       {"destination_address": f"void-{uid}"})
    assert status == 202, task
    ended = redrive_ends(t, task["task_id"])
    assert ended["status"] == "FAILED" and "routes nowhere" in ended["failure_reason"], ended
    assert [m["value"] for m in dead_letters_of(t, f"{queue}.dlq")] == ["p-1"]

    status, task = api(t, "POST", f"/api/v1/queues/default/{queue}.dlq/redrive",
                       {"destination_address": topic, "destination_key": "acct-7"})
    assert status == 202, task
    assert redrive_ends(t, task["task_id"])["status"] == "COMPLETED"
    c = Consumer({"bootstrap.servers": t.addrs["kafka"], "group.id": f"g-{uid}",
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        m = None
        while m is None and time.monotonic() < deadline:
            m = c.poll(0.5)
        assert m is not None, "the redriven message never reached the topic"
        if m.error():
            raise KafkaException(m.error())
        assert (m.key(), m.value()) == (b"acct-7", b"p-1")
        assert ("tributary.content-type", b"text/plain") in (m.headers() or [])
    finally:
        c.close()


def test_a_paced_redrive_is_cancelled_without_losing_a_message(t, uid):
    queue = f"bulk-{uid}"
    n = 12
    dead_letter_via_amqp(t, queue, [f"b-{i}" for i in range(n)])
    status, task = api(t, "POST", f"/api/v1/queues/default/{queue}.dlq/redrive",
                       {"max_messages_per_second": 2})
    assert status == 202, task

    def moved_some():
        _, body = api(t, "GET", "/api/v1/redrives")
        return next(x for x in body["redrives"] if x["task_id"] == task["task_id"])["moved"] >= 1

    wait_for(moved_some, "a first moved message")
    status, cancelled = api(t, "POST", f"/api/v1/redrives/{task['task_id']}/cancel")
    assert status == 200, cancelled
    ended = redrive_ends(t, task["task_id"])
    assert ended["status"] == "CANCELLED"
    assert 1 <= ended["moved"] < n
    # Nothing lost: what moved is back in the source queue, the rest still dead letters.
    left = len(dead_letters_of(t, f"{queue}.dlq"))
    _, queues = api(t, "GET", "/api/v1/queues?namespace=default")
    back = next(q for q in queues["queues"] if q["name"] == queue)["ready"]
    assert (back, left) == (ended["moved"], n - ended["moved"])
    # A write without the token is refused.
    req = urllib.request.Request(f"http://{t.addrs['admin']}/api/v1/redrives/x/cancel",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code in (401, 403)


def test_mqtt_messages_a_session_drops_are_dead_lettered_to_an_amqp_queue(make_tributary, uid):
    from mqttcompat import MQTTv5, Broker, Client, props

    t = make_tributary(f'core_token = "{TOKEN}"\nmqtt_max_queued = 3\n'
                       'mqtt_dead_letter_address = "mqtt.dlx"\n')
    conn, ch = amqp_channel(t)
    ch.exchange_declare("mqtt.dlx", "topic", durable=True)
    ch.queue_declare(f"mqtt-dead-{uid}", durable=True)
    # AMQP topic patterns split on ".": "#" takes every MQTT topic.
    ch.queue_bind(f"mqtt-dead-{uid}", "mqtt.dlx", "#")
    conn.close()
    host, port = t.host_port("mqtt")
    broker = Broker("tributary", host, port, t)

    # A persistent session, offline: it holds 3 messages, the rest overflow.
    sub = Client(broker, f"slow-{uid}", MQTTv5, clean=False)
    sub.connect(session_expiry=600)
    assert sub.subscribe("plant/#", 1) == [1]
    sub.disconnect()
    pub = Client(broker, f"pub-{uid}", MQTTv5)
    pub.connect()
    for i in range(5):
        pub.publish("plant/line-1", f"m{i}", qos=1)
    wait_for(lambda: len(dead_letters_of(t, f"mqtt-dead-{uid}")) == 2, "2 overflow dead letters")
    dead = dead_letters_of(t, f"mqtt-dead-{uid}")
    assert [m["value"] for m in dead] == ["m3", "m4"]
    assert dead[0]["properties"]["dead_letter_reason"] == "max-length"
    # The topic in AMQP form, as the amq.topic bridge has it.
    assert dead[0]["properties"]["dead_letter_original_key"] == "plant.line-1"
    assert dead[0]["properties"]["dead_letter_original_address"] == "amq.topic"
    assert dead[0]["properties"]["origin_protocol"] == "mqtt"
    assert {"name": "tributary.mqtt-client-id", "value": f"slow-{uid}",
            "encoding": "utf-8"} in dead[0]["headers"]

    # The session takes its 3 and leaves; a message with a 1 s expiry waits for it and
    # expires: dead-lettered when the session comes back.
    sub = Client(broker, f"slow-{uid}", MQTTv5, clean=False)
    sub.connect(session_expiry=600)
    sub.wait_messages(3)
    sub.disconnect()
    # Gone for the server too, or the next message would be sent to the closing connection.
    wait_for(lambda: not session_connected(t, f"slow-{uid}"), "the session's disconnect")
    pub.publish("plant/line-2", "short-lived", qos=1,
                properties=props(MessageExpiryInterval=1))
    time.sleep(1.5)  # the message's lifetime passing, not synchronisation
    sub = Client(broker, f"slow-{uid}", MQTTv5, clean=False)
    sub.connect(session_expiry=600)
    wait_for(lambda: len(dead_letters_of(t, f"mqtt-dead-{uid}")) == 3, "the expired dead letter")
    expired = dead_letters_of(t, f"mqtt-dead-{uid}")[2]
    assert expired["value"] == "short-lived"
    assert expired["properties"]["dead_letter_reason"] == "expired"
    assert sub.received() == [], "the expired message was delivered"

    # Redriven through amq.topic, the bridge's exchange: back to the topics' subscribers.
    watcher = Client(broker, f"watch-{uid}", MQTTv5)
    watcher.connect()
    assert watcher.subscribe("plant/#", 1) == [1]
    status, task = api(t, "POST", f"/api/v1/queues/default/mqtt-dead-{uid}/redrive",
                       {"destination_address": "amq.topic"})
    assert status == 202, task
    assert redrive_ends(t, task["task_id"])["status"] == "COMPLETED"
    back = watcher.wait_messages(3)
    assert [(m.topic, m.payload) for m in back] == [
        ("plant/line-1", b"m3"), ("plant/line-1", b"m4"), ("plant/line-2", b"short-lived")]
    for c in (watcher, sub, pub):
        c.close()


def test_an_sqs_dead_letter_is_redriven_into_an_amqp_queue(t, uid):
    sqs_broker = SqsBroker("tributary", f"http://{t.addrs['sqs']}", t)
    sqs = sqs_broker.client()
    dlq = sqs.create_queue(QueueName=f"orders-{uid}-dlq")["QueueUrl"]
    policy = json.dumps({"deadLetterTargetArn": sqs_broker.queue_arn(f"orders-{uid}-dlq"),
                         "maxReceiveCount": "1"})
    src = sqs.create_queue(QueueName=f"orders-{uid}",
                           Attributes={"RedrivePolicy": policy})["QueueUrl"]
    sqs.send_message(QueueUrl=src, MessageBody="order-1")
    got = sqs.receive_message(QueueUrl=src, WaitTimeSeconds=5, VisibilityTimeout=1)
    assert [m["Body"] for m in got["Messages"]] == ["order-1"]
    # Its one receive used up: when its visibility timeout ends it is dead-lettered.
    wait_for(lambda: len(dead_letters_of(t, f"orders-{uid}-dlq")) == 1, "the SQS dead letter")
    dead = dead_letters_of(t, f"orders-{uid}-dlq")[0]
    assert dead["properties"]["dead_letter_reason"] == "max-deliveries"
    assert dead["properties"]["dead_letter_queue"] == f"orders-{uid}"
    assert dead["properties"]["origin_protocol"] == "sqs"

    conn, ch = amqp_channel(t)
    try:
        ch.queue_declare(f"manual-{uid}", durable=True)
        status, task = api(t, "POST", f"/api/v1/queues/default/orders-{uid}-dlq/redrive",
                           {"destination": f"manual-{uid}"})
        assert status == 202, task
        assert redrive_ends(t, task["task_id"])["status"] == "COMPLETED"
        for method, _, body in ch.consume(f"manual-{uid}", inactivity_timeout=20):
            assert method is not None, "the redriven message never reached the AMQP queue"
            assert body == b"order-1"
            ch.basic_ack(method.delivery_tag)
            break
    finally:
        conn.close()
