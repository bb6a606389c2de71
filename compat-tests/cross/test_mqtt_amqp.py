"""MQTT and AMQP through the topic exchange (docs/compat/mapping.md, "MQTT and AMQP"), as
RabbitMQ's MQTT plugin joins them: an MQTT publish to `a/b` goes to `amq.topic` with routing key
`a.b`, reaching the AMQP queues bound there (and SQS clients of those queues); an AMQP publish
to `amq.topic` with key `a.b` reaches MQTT subscribers of `a/b`, once.

RabbitMQ with its MQTT plugin is the reference: the same scenarios run against it (MQTT 3.1.1,
which RabbitMQ 3.10 speaks), unless AMQP_REFERENCE=off.
"""

from __future__ import annotations

import importlib.util
import pathlib
import uuid

import pika
import pytest

from mqttcompat import MQTTv311, Broker, Client
from tributary_process import free_port, reference_enabled

_amqp_conftest = importlib.util.spec_from_file_location(
    "amqp_conftest", pathlib.Path(__file__).resolve().parent.parent / "amqp" / "conftest.py")
amqp_conftest = importlib.util.module_from_spec(_amqp_conftest)
_amqp_conftest.loader.exec_module(amqp_conftest)


class RabbitMQWithMQTT(amqp_conftest.RabbitMQProcess):
    """The reference: RabbitMQ with the rabbitmq_mqtt plugin on a second free port."""

    def __init__(self, workdir: pathlib.Path):
        super().__init__(workdir)
        self.mqtt_port = free_port()

    def _write_config(self):
        super()._write_config()
        with open(self.workdir / "rabbitmq.conf", "a") as f:
            f.write(f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.mqtt_port}\n"
                    "mqtt.allow_anonymous = true\nmqtt.exchange = amq.topic\n")
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")


class Endpoints:
    def __init__(self, kind: str, amqp: tuple[str, int], mqtt: tuple[str, int], server):
        self.kind, self.amqp, self.server = kind, amqp, server
        self.mqtt = Broker(kind, mqtt[0], mqtt[1], server)

    def channel(self):
        conn = pika.BlockingConnection(pika.ConnectionParameters(*self.amqp))
        return conn, conn.channel()

    def client(self, name: str) -> Client:
        c = Client(self.mqtt, f"{name}-{uuid.uuid4().hex[:6]}", MQTTv311)
        c.connect()
        return c


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory):
    if not reference_enabled("AMQP_REFERENCE"):
        pytest.skip("AMQP_REFERENCE=off")
    r = RabbitMQWithMQTT(tmp_path_factory.mktemp("rabbitmq-mqtt")).start()
    yield r
    r.stop()


@pytest.fixture(params=["tributary", "rabbitmq"])
def ends(request, tributary):
    if request.param == "tributary":
        return Endpoints("tributary", tributary.host_port("amqp"), tributary.host_port("mqtt"),
                         tributary)
    r = request.getfixturevalue("rabbitmq")
    return Endpoints("rabbitmq", ("127.0.0.1", r.port), ("127.0.0.1", r.mqtt_port), r)


def next_message(ch, queue: str, timeout: float = 20.0):
    for method, props, body in ch.consume(queue, inactivity_timeout=timeout):
        assert method is not None, f"nothing on {queue} within {timeout} s"
        ch.basic_ack(method.delivery_tag)
        return method, props, body
    raise AssertionError("the consumer ended")


def test_mqtt_publishes_reach_amqp_queues_bound_to_amq_topic(ends, uid):
    conn, ch = ends.channel()
    try:
        q = f"london-{uid}"
        ch.queue_declare(q, exclusive=True)
        ch.queue_bind(q, "amq.topic", f"cities-{uid}.*")
        pub = ends.client("pub")
        pub.publish(f"cities-{uid}/london", b"rain", qos=1)
        pub.publish(f"cities-{uid}/london/weather", b"not for this binding", qos=1)
        pub.publish(f"cities-{uid}/london", b"more rain", qos=0)
        method, _, body = next_message(ch, q)
        assert (method.exchange, method.routing_key, body) == (
            "amq.topic", f"cities-{uid}.london", b"rain")
        method, _, body = next_message(ch, q)
        assert body == b"more rain"
        pub.close()
    finally:
        conn.close()


def test_amqp_publishes_to_amq_topic_reach_mqtt_subscribers_once(ends, uid):
    sub = ends.client("sub")
    assert sub.subscribe(f"cities-{uid}/+", 1) == [1]
    conn, ch = ends.channel()
    try:
        ch.confirm_delivery()
        ch.basic_publish("amq.topic", f"cities-{uid}.paris", b"sun",
                         pika.BasicProperties(content_type="text/plain"))
        # An MQTT publish reaches the subscriber once, not again through the exchange: a
        # second copy would come before "end", published after it was acknowledged.
        pub = ends.client("pub")
        pub.publish(f"cities-{uid}/rome", b"clouds", qos=1)
        ch.basic_publish("amq.topic", f"cities-{uid}.end", b"end")
        msgs = sub.wait_messages(3)
        assert [(m.topic, m.payload) for m in msgs] == [
            (f"cities-{uid}/paris", b"sun"), (f"cities-{uid}/rome", b"clouds"),
            (f"cities-{uid}/end", b"end")]
        pub.close()
    finally:
        conn.close()
    sub.close()


def test_mqtt_publishes_reach_an_sqs_queue_bound_to_amq_topic(tributary, uid):
    from sqscompat import Broker as SqsBroker

    sqs = SqsBroker("tributary", f"http://{tributary.addrs['sqs']}", tributary).client()
    name = f"alerts-{uid}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    ends = Endpoints("tributary", tributary.host_port("amqp"), tributary.host_port("mqtt"),
                     tributary)
    conn, ch = ends.channel()
    ch.queue_bind(name, "amq.topic", "alerts.#")
    conn.close()
    pub = ends.client("pub")
    pub.publish("alerts/fire/floor-3", b"evacuate", qos=1)
    got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=10, MaxNumberOfMessages=10)
    assert [m["Body"] for m in got.get("Messages", [])] == ["evacuate"]
    pub.close()
