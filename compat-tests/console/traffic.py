"""Real client traffic for the console's end-to-end tests (scripts/console-test.sh).

Through the protocol clients users run (confluent-kafka, paho-mqtt, pika from the compat
venv), against a running Tributary:

* Kafka: a topic with one partition and PRODUCED records; a consumer group that commits
  COMMITTED of them, so its lag is PRODUCED - COMMITTED.
* MQTT: a persistent session (clean_session=False) subscribed to a filter, disconnected,
  then QUEUED QoS 1 messages published to it, which wait in its queue.
* AMQP: a queue with a dead-letter exchange (fanout) bound to a dead-letter queue; READY+1
  messages published, one rejected with requeue=False, so READY wait in the queue and one
  in the dead-letter queue.

Writes what it did (names and counts) as JSON to --out, for the browser test to check.

With --burst HOST:PORT instead, it publishes MQTT QoS 0 messages to a topic nobody
subscribes for a few seconds (BURST_S), steadily, so that a page polling every second sees
a rate above zero.

With --hold-amqp HOST:PORT instead, it opens one AMQP connection named HELD_NAME (client
property connection_name) and keeps it until the server closes it, which the console's
Close button does: it prints the reply code and text and exits 0, or exits non-zero if the
connection is still open after HOLD_S.
"""

from __future__ import annotations

import argparse
import json
import time

import paho.mqtt.client as mqtt
import pika
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

PRODUCED = 7
COMMITTED = 3
QUEUED = 3
READY = 2
TIMEOUT_S = 30.0


def kafka(bootstrap: str) -> dict:
    topic, group = "console-orders", "console-readers"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=1)]).values():
        f.result(timeout=TIMEOUT_S)
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(PRODUCED):
        p.produce(topic, key=f"k{i}".encode(), value=f"order {i}".encode())
    assert p.flush(TIMEOUT_S) == 0, "records left unsent"
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        got = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(got) < COMMITTED and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append(m)
        assert len(got) == COMMITTED, f"consumed {len(got)} of {COMMITTED}"
        c.commit(offsets=[TopicPartition(topic, 0, COMMITTED)], asynchronous=False)
    finally:
        c.close()
    return {"topic": topic, "group": group, "end_offset": PRODUCED,
            "committed": COMMITTED, "lag": PRODUCED - COMMITTED}


def mqtt_session(host: str, port: int) -> dict:
    client_id, flt = "console-subscriber", "console/#"

    def connected(host: str, port: int, cid: str, clean: bool) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean)
        c.connect(host, port)
        c.loop_start()
        deadline = time.monotonic() + TIMEOUT_S
        while not c.is_connected():
            assert time.monotonic() < deadline, f"{cid} did not connect"
            time.sleep(0.02)
        return c

    sub = connected(host, port, client_id, False)
    subscribed = []
    sub.on_subscribe = lambda _c, _u, mid, _codes, _props: subscribed.append(mid)
    _, mid = sub.subscribe(flt, qos=1)
    deadline = time.monotonic() + TIMEOUT_S
    while mid not in subscribed:
        assert time.monotonic() < deadline, "no SUBACK"
        time.sleep(0.02)
    sub.disconnect()
    sub.loop_stop()
    pub = connected(host, port, "console-publisher", True)
    for i in range(QUEUED):
        pub.publish("console/events", f"event {i}".encode(), qos=1).wait_for_publish(TIMEOUT_S)
    pub.disconnect()
    pub.loop_stop()
    return {"client_id": client_id, "filter": flt, "queued": QUEUED}


def amqp(host: str, port: int) -> dict:
    work, dlq, dlx = "console-work", "console-dlq", "console-dlx"
    conn = pika.BlockingConnection(pika.ConnectionParameters(host=host, port=port))
    ch = conn.channel()
    ch.exchange_declare(dlx, exchange_type="fanout", durable=True)
    ch.queue_declare(dlq, durable=True)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(work, durable=True, arguments={"x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    for i in range(READY + 1):
        ch.basic_publish("", work, f"job {i}".encode(),
                         pika.BasicProperties(delivery_mode=2))
    method, _props, body = ch.basic_get(work)
    assert method is not None, "no message to reject"
    ch.basic_reject(method.delivery_tag, requeue=False)
    conn.close()
    return {"queue": work, "dead_letter_queue": dlq, "exchange": dlx,
            "ready": READY, "dead_letter_body": body.decode()}


BURST_S = 4.0
BURST_PER_S = 200


def burst(host: str, port: int) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="console-burst")
    c.connect(host, port)
    c.loop_start()
    started = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - started) < BURST_S:
        # Pacing, not synchronisation: hold the rate at BURST_PER_S.
        while sent < elapsed * BURST_PER_S:
            c.publish("burst/load", b"x" * 64, qos=0)
            sent += 1
        time.sleep(0.01)
    c.disconnect()
    c.loop_stop()


HELD_NAME = "console-held"
HOLD_S = 60.0


def hold_amqp(host: str, port: int) -> None:
    params = pika.ConnectionParameters(
        host=host, port=port, client_properties={"connection_name": HELD_NAME})
    conn = pika.BlockingConnection(params)
    print("connected", flush=True)
    deadline = time.monotonic() + HOLD_S
    try:
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
    except pika.exceptions.ConnectionClosedByBroker as e:
        print(f"closed by the broker: {e.reply_code} {e.reply_text}", flush=True)
        return
    raise SystemExit(f"the server did not close the connection within {HOLD_S} s")


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__)
    a.add_argument("--burst", help="HOST:PORT of MQTT: only publish steadily for a while")
    a.add_argument("--hold-amqp", help="HOST:PORT of AMQP: only hold a connection until closed")
    a.add_argument("--kafka", help="HOST:PORT")
    a.add_argument("--mqtt", help="HOST:PORT")
    a.add_argument("--amqp", help="HOST:PORT")
    a.add_argument("--out")
    args = a.parse_args()
    split = lambda hp: (hp.rsplit(":", 1)[0], int(hp.rsplit(":", 1)[1]))  # noqa: E731
    if args.burst:
        burst(*split(args.burst))
        return
    if args.hold_amqp:
        hold_amqp(*split(args.hold_amqp))
        return
    if not (args.kafka and args.mqtt and args.amqp and args.out):
        a.error("--kafka, --mqtt, --amqp and --out are required without --burst")
    done = {
        "kafka": kafka(args.kafka),
        "mqtt": mqtt_session(*split(args.mqtt)),
        "amqp": amqp(*split(args.amqp)),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(done, f, indent=2)
    print(json.dumps(done))


if __name__ == "__main__":
    main()
