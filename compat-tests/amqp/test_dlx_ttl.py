"""Message TTL (per queue and per message), dead-lettering (expired, rejected, maxlen) with
the x-death header, queue length limits (drop-head, reject-publish, reject-publish-dlx),
queue expiry (x-expires) and a quorum queue's delivery limit.

Expiry scenarios wait past the TTL (that is their point) and otherwise poll with deadlines."""

import time

import pika
import pika.exceptions
import pytest

from amqpcompat import NOT_FOUND, PRECONDITION_FAILED, queue_count, wait_count
from amqphelpers import (
    as_str, channel_error, declare, get_all, get, publish, wait_get, wait_past, x_death,
)

TTL_MS = 300


def dead_letter_setup(ch, uid, key: str | None = "dead", **queue_args):
    """A direct exchange `<uid>-dlx`, a queue `<uid>-dlq` bound to it with `key` (or with
    '#' on a topic exchange when key is None), and the source queue `<uid>-src` dead-
    lettering to it. Returns (source queue, dead-letter queue)."""
    dlx = f"{uid}-dlx"
    ch.exchange_declare(dlx, "direct" if key else "topic")
    dlq = declare(ch, f"{uid}-dlq")
    ch.queue_bind(dlq, dlx, key or "#")
    args = {"x-dead-letter-exchange": dlx, **queue_args}
    if key:
        args["x-dead-letter-routing-key"] = key
    src = declare(ch, f"{uid}-src", arguments=args)
    return src, dlq


def poll(cond, timeout: float, what: str, conn=None):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if conn is not None:
            conn.process_data_events(time_limit=0.02)
        else:
            time.sleep(0.02)


def test_queue_message_ttl_expires(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q", arguments={"x-message-ttl": TTL_MS})
    ch.confirm_delivery()  # the ack says the message is in the queue
    t0 = time.monotonic()
    publish(ch, q, ["short-lived"])
    poll(lambda: queue_count(ch, q) == 0, 10, "the message to expire", ch.connection)
    elapsed = time.monotonic() - t0
    assert elapsed >= TTL_MS / 1000 - 0.05, f"expired after {elapsed:.3f}s, before its TTL"
    assert get(ch, q) is None


def test_message_consumed_before_ttl_is_delivered(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q", arguments={"x-message-ttl": 10_000})
    publish(ch, q, ["in time"])
    m = wait_get(ch, q, timeout=5)
    assert m.body == b"in time"
    assert m.props.expiration is None, "a queue TTL sets no expiration property"


def test_per_message_expiration(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    ch.confirm_delivery()  # the acks say both messages are in the queue
    t0 = time.monotonic()
    ch.basic_publish("", q, b"brief", properties=pika.BasicProperties(expiration=str(TTL_MS)))
    ch.basic_publish("", q, b"forever")
    poll(lambda: queue_count(ch, q) == 1, 10, "the first message to expire", ch.connection)
    elapsed = time.monotonic() - t0
    assert elapsed >= TTL_MS / 1000 - 0.05, f"expired after {elapsed:.3f}s, before its TTL"
    assert [m.body for m in get_all(ch, q)] == [b"forever"]


def test_expiration_zero_without_consumer_expires_at_once(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    ch.basic_publish("", q, b"now or never", properties=pika.BasicProperties(expiration="0"))
    ch.basic_publish("", q, b"stays")
    wait_count(ch, q, 1)
    assert [m.body for m in get_all(ch, q)] == [b"stays"]


def test_invalid_expiration_is_precondition_failed(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    with channel_error(PRECONDITION_FAILED):
        ch.basic_publish("", q, b"x", properties=pika.BasicProperties(expiration="soon"))
        ch.queue_declare(q, passive=True)  # the error arrives asynchronously


def test_expired_message_dead_lettered_with_x_death(broker, amqp, uid):
    ch = amqp(broker).channel()
    src, dlq = dead_letter_setup(ch, uid, "dead", **{"x-message-ttl": TTL_MS})
    t0 = time.monotonic()
    ch.basic_publish("", src, b"late", properties=pika.BasicProperties(
        message_id="m1", headers={"app": "kept"}))
    m = wait_get(ch, dlq, what="the dead-lettered message")
    assert time.monotonic() - t0 >= TTL_MS / 1000 - 0.05, "dead-lettered before its TTL"
    assert m.body == b"late"
    assert (m.method.exchange, m.method.routing_key) == (f"{uid}-dlx", "dead")
    assert m.props.message_id == "m1"
    assert m.props.headers["app"] == "kept"
    [death] = x_death(m.props)
    assert as_str(death["queue"]) == src
    assert as_str(death["reason"]) == "expired"
    assert death["count"] == 1
    assert as_str(death["exchange"]) == ""
    assert [as_str(k) for k in death["routing-keys"]] == [src]
    assert "time" in death
    assert as_str(m.props.headers["x-first-death-reason"]) == "expired"
    assert as_str(m.props.headers["x-first-death-queue"]) == src
    assert as_str(m.props.headers["x-first-death-exchange"]) == ""
    assert queue_count(ch, src) == 0


def test_per_message_expiration_dead_lettered(broker, amqp, uid):
    ch = amqp(broker).channel()
    src, dlq = dead_letter_setup(ch, uid, "dead")
    ch.basic_publish("", src, b"late", properties=pika.BasicProperties(expiration=str(TTL_MS)))
    m = wait_get(ch, dlq, what="the dead-lettered message")
    [death] = x_death(m.props)
    assert as_str(death["reason"]) == "expired"
    assert as_str(death["original-expiration"]) == str(TTL_MS)
    assert m.props.expiration is None, "the expiration is removed when dead-lettered"


@pytest.mark.parametrize("how", ["reject", "nack"])
def test_rejected_message_dead_lettered(broker, amqp, uid, how):
    ch = amqp(broker).channel()
    # No x-dead-letter-routing-key: the message keeps its own routing keys.
    src, dlq = dead_letter_setup(ch, uid, None)
    ch.exchange_declare(f"{uid}-in", "direct")
    ch.queue_bind(src, f"{uid}-in", "orders.new")
    ch.basic_publish(f"{uid}-in", "orders.new", b"bad")
    ch.basic_publish(f"{uid}-in", "orders.new", b"good")
    wait_count(ch, src, 2)
    bad = get(ch, src)
    if how == "reject":
        ch.basic_reject(bad.tag, requeue=False)
    else:
        ch.basic_nack(bad.tag, requeue=False)
    m = wait_get(ch, dlq, what="the dead-lettered message")
    assert m.body == b"bad"
    assert (m.method.exchange, m.method.routing_key) == (f"{uid}-dlx", "orders.new")
    [death] = x_death(m.props)
    assert (as_str(death["queue"]), as_str(death["reason"]), death["count"]) == \
        (src, "rejected", 1)
    assert as_str(death["exchange"]) == f"{uid}-in"
    assert [as_str(k) for k in death["routing-keys"]] == ["orders.new"]
    # Requeued rejects are not dead-lettered.
    good = get(ch, src)
    ch.basic_reject(good.tag, requeue=True)
    assert get(ch, src, auto_ack=True).body == b"good"
    assert get(ch, dlq) is None


def test_x_death_count_grows_on_the_same_cycle(broker, amqp, uid):
    """A message dead-lettered twice from the same queue for the same reason has one x-death
    entry whose count is 2."""
    ch = amqp(broker).channel()
    src, dlq = dead_letter_setup(ch, uid, "dead")
    publish(ch, src, ["twice"])
    wait_count(ch, src, 1)
    ch.basic_reject(get(ch, src).tag, requeue=False)
    once = wait_get(ch, dlq)
    # Back to the source queue with its x-death header, and rejected again.
    ch.basic_publish("", src, once.body, properties=once.props)
    wait_count(ch, src, 1)
    ch.basic_reject(get(ch, src).tag, requeue=False)
    m = wait_get(ch, dlq)
    [death] = x_death(m.props)
    assert (as_str(death["reason"]), death["count"]) == ("rejected", 2)


def test_max_length_drop_head_dead_letters_oldest(broker, amqp, uid):
    ch = amqp(broker).channel()
    src, dlq = dead_letter_setup(ch, uid, "dead", **{"x-max-length": 2})
    publish(ch, src, ["1", "2", "3", "4"])
    wait_count(ch, src, 2)
    assert [m.body for m in get_all(ch, src)] == [b"3", b"4"], "the oldest are dropped"
    dead = [wait_get(ch, dlq), wait_get(ch, dlq)]
    assert [m.body for m in dead] == [b"1", b"2"]
    for m in dead:
        [death] = x_death(m.props)
        assert (as_str(death["queue"]), as_str(death["reason"])) == (src, "maxlen")


def test_max_length_bytes(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q", arguments={"x-max-length-bytes": 10})
    publish(ch, q, ["aaaa", "bbbb", "cccc", "dddd"])
    wait_count(ch, q, 2)
    assert [m.body for m in get_all(ch, q)] == [b"cccc", b"dddd"], "bodies over 10 bytes dropped"


def test_max_length_zero_keeps_nothing(broker, amqp, uid):
    ch = amqp(broker).channel()
    src, dlq = dead_letter_setup(ch, uid, "dead", **{"x-max-length": 0})
    publish(ch, src, ["gone"])
    assert wait_get(ch, dlq).body == b"gone"
    assert queue_count(ch, src) == 0


def test_overflow_reject_publish_nacks(broker, amqp, uid):
    ch = amqp(broker).channel()
    src, dlq = dead_letter_setup(ch, uid, "dead", **{"x-max-length": 2,
                                                      "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", src, b"1")
    ch.basic_publish("", src, b"2")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", src, b"3")
    assert [m.body for m in get_all(ch, src)] == [b"1", b"2"], "the newest is refused"
    # Room again: accepted.
    ch.basic_publish("", src, b"4")
    assert queue_count(ch, src) == 1
    assert get(ch, dlq) is None, "reject-publish does not dead-letter"


def test_overflow_reject_publish_dlx(broker, amqp, uid):
    ch = amqp(broker).channel()
    src, dlq = dead_letter_setup(ch, uid, "dead", **{"x-max-length": 1,
                                                      "x-overflow": "reject-publish-dlx"})
    ch.confirm_delivery()
    ch.basic_publish("", src, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", src, b"2")
    m = wait_get(ch, dlq, what="the refused message, dead-lettered")
    assert m.body == b"2"
    [death] = x_death(m.props)
    assert (as_str(death["queue"]), as_str(death["reason"])) == (src, "maxlen")
    assert [x.body for x in get_all(ch, src)] == [b"1"]


def test_queue_expires_when_unused(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q", arguments={"x-expires": 600})
    kept = declare(ch, f"{uid}-kept")
    publish(ch, q, ["m"])  # publishing does not count as use
    t0 = time.monotonic()

    def exists() -> bool:
        c = conn.channel()
        try:
            c.queue_declare(q, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == NOT_FOUND, e
            return False
        c.close()
        return True

    # Still there well before x-expires.
    assert exists(), "deleted long before x-expires"
    # RabbitMQ counts a (passive) declare as use, renewing the lease: each check waits for
    # a full x-expires after the previous one.
    deadline = t0 + 10
    while True:
        wait_past(time.monotonic() + 0.8, conn)
        if not exists():
            break
        assert time.monotonic() < deadline, "the unused queue was not deleted"
    assert queue_count(conn.channel(), kept) == 0, "other queues stay"


def test_queue_with_consumer_does_not_expire(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q", arguments={"x-expires": 200})
    ch.basic_consume(q, lambda *a: None)
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert queue_count(conn.channel(), q) == 0, "still there while it has a consumer"


QUORUM = {"x-queue-type": "quorum"}


def poison_redeliveries(ch, q, times: int) -> list:
    """Gets the one message in `q` and rejects it with requeue `times` times."""
    deliveries = []
    for _ in range(times):
        m = wait_get(ch, q, auto_ack=False, what="a delivery within the limit")
        deliveries.append(m)
        ch.basic_reject(m.tag, requeue=True)
    return deliveries


def test_quorum_queue_delivery_limit(broker, amqp, uid):
    ch = amqp(broker).channel()
    dlx = f"{uid}-dlx"
    ch.exchange_declare(dlx, "fanout")
    dlq = declare(ch, f"{uid}-dlq")
    ch.queue_bind(dlq, dlx)
    q = declare(ch, f"{uid}-qq", durable=True, arguments={
        **QUORUM, "x-delivery-limit": 2, "x-dead-letter-exchange": dlx})
    try:
        publish(ch, q, ["poison"])
        # Delivered 3 times: the first one and 2 redeliveries; the 3rd requeue is one too many.
        deliveries = poison_redeliveries(ch, q, 3)
        assert [m.redelivered for m in deliveries] == [False, True, True]
        m = wait_get(ch, dlq, what="the message dead-lettered after its delivery limit")
        assert m.body == b"poison"
        [death] = x_death(m.props)
        assert as_str(death["queue"]) == q
        assert as_str(death["reason"]) == "delivery_limit"
        assert queue_count(ch, q) == 0
    finally:
        ch.queue_delete(q)


def test_quorum_queue_delivery_count_header(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-qq", durable=True, arguments={**QUORUM, "x-delivery-limit": 5})
    try:
        publish(ch, q, ["again"])
        deliveries = poison_redeliveries(ch, q, 3)
        # The first delivery has no x-delivery-count or 0 (RabbitMQ 3.10: 0).
        assert [(m.props.headers or {}).get("x-delivery-count", 0) for m in deliveries] == \
            [0, 1, 2]
    finally:
        ch.queue_delete(q)


def test_quorum_queue_delivery_limit_without_dlx_drops(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-qq", durable=True, arguments={**QUORUM, "x-delivery-limit": 1})
    try:
        publish(ch, q, ["poison", "fine"])
        wait_count(ch, q, 2)
        for _ in range(2):
            m = get(ch, q)
            assert m.body == b"poison"
            ch.basic_nack(m.tag, requeue=True)
        assert [m.body for m in get_all(ch, q)] == [b"fine"], "dropped after its limit"
    finally:
        ch.queue_delete(q)


def test_quorum_queue_must_be_durable(broker, amqp, uid):
    ch = amqp(broker).channel()
    with channel_error(PRECONDITION_FAILED):
        ch.queue_declare(f"{uid}-qq", durable=False, arguments=QUORUM)


def test_quorum_queue_cannot_be_exclusive(broker, amqp, uid):
    ch = amqp(broker).channel()
    with channel_error(PRECONDITION_FAILED):
        ch.queue_declare(f"{uid}-qq", durable=True, exclusive=True, arguments=QUORUM)
