"""Queues: server-named queues, declare-ok counts, durable/exclusive/auto-delete lifetimes,
bind and unbind, purge, delete (if-unused, if-empty, message count), idempotent declares.

Publishing channels use publisher confirms, so counts are settled when basic_publish returns;
what happens asynchronously (a queue going away with its connection) is polled for."""

from __future__ import annotations

import time

import pika
import pika.exceptions
import pytest

from amqpcompat import NOT_FOUND, PRECONDITION_FAILED, WAIT_S, get_message


@pytest.fixture
def ch(broker, amqp):
    """A channel in confirm mode."""
    c = amqp(broker).channel()
    c.confirm_delivery()
    return c


def counts(ch, q: str) -> tuple[int, int]:
    ok = ch.queue_declare(q, passive=True).method
    return ok.message_count, ok.consumer_count


def publish_n(ch, q: str, n: int, exchange: str = ""):
    for i in range(n):
        ch.basic_publish(exchange, q, f"m{i}".encode())


def missing(conn: pika.BlockingConnection, q: str) -> bool:
    """True when a passive declare of `q` answers 404 (on a throwaway channel)."""
    probe = conn.channel()
    try:
        probe.queue_declare(q, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == NOT_FOUND, e
        return True
    probe.close()
    return False


def wait_missing(conn: pika.BlockingConnection, q: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not missing(conn, q):
        assert time.monotonic() < deadline, f"queue {q} still exists after {timeout}s"
        conn.process_data_events(time_limit=0.02)


def test_server_named_queue(ch):
    q1 = ch.queue_declare("", exclusive=True).method
    q2 = ch.queue_declare("", exclusive=True).method
    assert q1.queue.startswith("amq.gen-"), q1.queue
    assert q2.queue.startswith("amq.gen-") and q2.queue != q1.queue
    assert (q1.message_count, q1.consumer_count) == (0, 0)
    ch.basic_publish("", q1.queue, b"to the generated name")
    assert get_message(ch, q1.queue)[2] == b"to the generated name"


def test_declare_ok_counts(broker, amqp, ch, uid):
    q = f"{uid}-counts"
    ok = ch.queue_declare(q, auto_delete=False).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == (q, 0, 0)
    publish_n(ch, q, 3)
    assert counts(ch, q) == (3, 0)
    again = ch.queue_declare(q, auto_delete=False).method  # an active redeclare counts too
    assert (again.message_count, again.consumer_count) == (3, 0)
    cq = f"{uid}-consumers"
    ch.queue_declare(cq)
    conn2 = amqp(broker)
    c1, c2 = conn2.channel(), conn2.channel()
    t1 = c1.basic_consume(cq, lambda *a: None)
    c2.basic_consume(cq, lambda *a: None)
    assert counts(ch, cq) == (0, 2)
    c1.basic_cancel(t1)
    assert counts(ch, cq) == (0, 1)
    c2.close()
    deadline = time.monotonic() + WAIT_S
    while counts(ch, cq) != (0, 0):  # the channel's consumer goes with it
        assert time.monotonic() < deadline, counts(ch, cq)
    ch.queue_delete(q)
    ch.queue_delete(cq)


def test_ready_count_excludes_unacked(broker, amqp, ch, uid):
    q = f"{uid}-unacked"
    ch.queue_declare(q)
    publish_n(ch, q, 3)
    conn2 = amqp(broker)
    getter = conn2.channel()
    method, _p, _b = get_message(getter, q, auto_ack=False)
    assert counts(ch, q) == (2, 0)
    getter.close()  # the unacked message goes back
    deadline = time.monotonic() + WAIT_S
    while counts(ch, q) != (3, 0):
        assert time.monotonic() < deadline, counts(ch, q)
    ch.queue_delete(q)


def test_durable_queue_declare(ch, uid):
    q = f"{uid}-durable"
    ok = ch.queue_declare(q, durable=True).method
    assert ok.queue == q
    ch.queue_declare(q, durable=True)  # same again: fine
    ch.queue_declare(q, passive=True)
    ch.basic_publish("", q, b"persistent", pika.BasicProperties(delivery_mode=2))
    assert get_message(ch, q)[2] == b"persistent"
    assert ch.queue_delete(q).method.message_count == 0


def test_passive_declare_ignores_properties(ch, uid):
    q = f"{uid}-pp"
    ch.queue_declare(q, durable=True)
    ch.queue_declare(q, passive=True, durable=False, auto_delete=True)  # only existence counts
    ch.queue_delete(q)


def test_exclusive_queue_usable_from_other_channel_of_same_connection(broker, amqp, uid):
    conn = amqp(broker)
    a, b = conn.channel(), conn.channel()
    q = a.queue_declare(f"{uid}-excl", exclusive=True).method.queue
    b.queue_declare(q, exclusive=True)  # same connection: an idempotent redeclare
    b.basic_publish("", q, b"same connection")
    assert get_message(a, q)[2] == b"same connection"


def test_exclusive_queue_goes_with_its_connection(broker, amqp, uid):
    owner = amqp(broker)
    q = owner.channel().queue_declare(f"{uid}-excl", exclusive=True).method.queue
    watcher = amqp(broker)
    owner.close()
    wait_missing(watcher, q)
    # the name is free for another connection now
    ch = watcher.channel()
    ch.queue_declare(q, exclusive=True)


def test_auto_delete_queue_goes_with_last_consumer(broker, amqp, ch, uid):
    q = f"{uid}-ad"
    ch.queue_declare(q, auto_delete=True)
    publish_n(ch, q, 1)
    assert counts(ch, q) == (1, 0)  # no consumer yet: not deleted
    conn = amqp(broker)
    c1, c2 = conn.channel(), conn.channel()
    t1 = c1.basic_consume(q, lambda *a: None, auto_ack=True)
    t2 = c2.basic_consume(q, lambda *a: None, auto_ack=True)
    c1.basic_cancel(t1)
    assert not missing(ch.connection, q), "deleted while a consumer was left"
    c2.basic_cancel(t2)
    wait_missing(ch.connection, q)


def test_auto_delete_queue_goes_when_consumer_channel_closes(broker, amqp, ch, uid):
    q = f"{uid}-ad2"
    ch.queue_declare(q, auto_delete=True)
    consumer = amqp(broker).channel()
    consumer.basic_consume(q, lambda *a: None)
    consumer.close()
    wait_missing(ch.connection, q)


def test_auto_delete_queue_kept_without_consumers_ever(ch, uid):
    q = f"{uid}-ad3"
    ch.queue_declare(q, auto_delete=True)
    ch.basic_publish("", q, b"x")
    assert get_message(ch, q)[2] == b"x"  # basic.get is not a consumer
    assert not missing(ch.connection, q)
    ch.queue_delete(q)


def test_bind_unbind_routing_keys(ch, uid):
    q = ch.queue_declare(f"{uid}-b", exclusive=True).method.queue
    k1, k2 = f"{uid}.k1", f"{uid}.k2"
    ch.queue_bind(q, "amq.direct", k1)
    ch.queue_bind(q, "amq.direct", k2)
    ch.queue_bind(q, "amq.direct", k2)  # the same binding twice is one binding
    ch.basic_publish("amq.direct", k1, b"1")
    ch.basic_publish("amq.direct", k2, b"2")
    assert counts(ch, q) == (2, 0)
    ch.queue_unbind(q, "amq.direct", k1)
    ch.basic_publish("amq.direct", k1, b"3")
    ch.basic_publish("amq.direct", k2, b"4")
    assert counts(ch, q) == (3, 0)
    got = [get_message(ch, q)[2] for _ in range(3)]
    assert got == [b"1", b"2", b"4"]


def test_unbind_missing_binding_is_ok(ch, uid):
    # RabbitMQ answers unbind-ok for a binding that does not exist.
    q = ch.queue_declare(f"{uid}-ub", exclusive=True).method.queue
    ch.queue_unbind(q, "amq.direct", f"{uid}.never-bound")
    assert ch.is_open


def test_bind_with_arguments_distinguishes_bindings(ch, uid):
    # Two headers bindings differing only in arguments are two bindings; unbinding one
    # (with its arguments) leaves the other.
    x = f"{uid}-h"
    ch.exchange_declare(x, "headers", auto_delete=True)
    q = ch.queue_declare(f"{uid}-hq", exclusive=True).method.queue
    ch.queue_bind(q, x, "", arguments={"a": "1"})
    ch.queue_bind(q, x, "", arguments={"b": "2"})
    ch.queue_unbind(q, x, "", arguments={"a": "1"})
    ch.basic_publish(x, "", b"a", pika.BasicProperties(headers={"a": "1"}))
    ch.basic_publish(x, "", b"b", pika.BasicProperties(headers={"b": "2"}))
    assert counts(ch, q) == (1, 0)
    assert get_message(ch, q)[2] == b"b"


def test_purge_returns_count(ch, uid):
    q = ch.queue_declare(f"{uid}-purge", exclusive=True).method.queue
    publish_n(ch, q, 5)
    assert ch.queue_purge(q).method.message_count == 5
    assert counts(ch, q) == (0, 0)
    assert ch.queue_purge(q).method.message_count == 0
    ch.basic_publish("", q, b"after purge")
    assert get_message(ch, q)[2] == b"after purge"


def test_purge_leaves_unacked(broker, amqp, ch, uid):
    q = f"{uid}-purge2"
    ch.queue_declare(q)
    publish_n(ch, q, 3)
    getter = amqp(broker).channel()
    get_message(getter, q, auto_ack=False)
    assert ch.queue_purge(q).method.message_count == 2
    getter.close()  # requeues the one it held
    deadline = time.monotonic() + WAIT_S
    while counts(ch, q) != (1, 0):
        assert time.monotonic() < deadline, counts(ch, q)
    ch.queue_delete(q)


def test_delete_returns_message_count(ch, uid):
    q = f"{uid}-del"
    ch.queue_declare(q)
    publish_n(ch, q, 4)
    assert ch.queue_delete(q).method.message_count == 4
    assert missing(ch.connection, q)


def test_delete_missing_queue_is_ok(ch, uid):
    # RabbitMQ 3.10 answers delete-ok (message count 0) for a queue that does not exist.
    assert ch.queue_delete(f"{uid}-never").method.message_count == 0


def test_delete_if_unused_with_consumer_406(broker, amqp, ch, uid):
    q = f"{uid}-iu"
    ch.queue_declare(q)
    consumer = amqp(broker).channel()
    tag = consumer.basic_consume(q, lambda *a: None)
    bad = ch.connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bad.queue_delete(q, if_unused=True)
    assert e.value.reply_code == PRECONDITION_FAILED
    assert not missing(ch.connection, q)
    consumer.basic_cancel(tag)
    ch.queue_delete(q, if_unused=True)
    assert missing(ch.connection, q)


def test_delete_if_empty_with_messages_406(ch, uid):
    q = f"{uid}-ie"
    ch.queue_declare(q)
    publish_n(ch, q, 2)
    bad = ch.connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bad.queue_delete(q, if_empty=True)
    assert e.value.reply_code == PRECONDITION_FAILED
    assert counts(ch, q) == (2, 0)
    ch.queue_purge(q)
    assert ch.queue_delete(q, if_empty=True).method.message_count == 0
    assert missing(ch.connection, q)


def test_delete_queue_with_consumer_cancels_it(broker, amqp, ch, uid):
    # The consumer learns through basic.cancel (consumer_cancel_notify).
    q = f"{uid}-dc"
    ch.queue_declare(q)
    conn = amqp(broker)
    consumer = conn.channel()
    cancelled = []
    consumer.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = consumer.basic_consume(q, lambda *a: None)
    ch.queue_delete(q)
    deadline = time.monotonic() + WAIT_S
    while not cancelled:
        assert time.monotonic() < deadline, "no basic.cancel after the queue was deleted"
        conn.process_data_events(time_limit=0.02)
    assert cancelled == [tag]
    assert consumer.is_open


def test_redeclare_same_name_same_connection_idempotent(ch, uid):
    q = f"{uid}-idem"
    first = ch.queue_declare(q, durable=False, auto_delete=False, arguments={"x-max-length": 10})
    publish_n(ch, q, 2)
    for _ in range(3):
        again = ch.queue_declare(q, durable=False, auto_delete=False,
                                 arguments={"x-max-length": 10}).method
        assert (again.queue, again.message_count) == (first.method.queue, 2)
    ch.queue_delete(q)
