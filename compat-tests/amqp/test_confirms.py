"""Publisher confirms: confirm.select, one basic.ack per publish with delivery tags counting
from 1 on each channel, basic.return before basic.ack for an unroutable mandatory publish,
persistent messages to a durable queue, and the exclusion of tx and confirm modes."""

import pika
import pika.exceptions
import pika.spec
import pytest

from amqpcompat import NOT_FOUND, NO_ROUTE, PRECONDITION_FAILED, queue_count, wait_count
from amqphelpers import PERSISTENT, Confirms, channel_error, declare, get_all, quiet, raw_rpc


def test_every_publish_is_acked_with_tags_from_one(broker, amqp, uid):
    conn = amqp(broker)
    c = Confirms(conn)
    q = declare(c.bch, f"{uid}-q")
    n = 200
    for i in range(n):
        c.publish("", q, b"%d" % i)
    confirmed = c.wait_all()
    assert confirmed == {t: "ack" for t in range(1, n + 1)}
    quiet(conn, 0.3)
    assert c.confirmed() == confirmed, "no extra confirms"
    assert queue_count(c.bch, q) == n
    # Tags count per channel: a second confirm channel on the same connection starts at 1.
    c2 = Confirms(conn)
    for i in range(3):
        c2.publish("", q, b"again")
    assert c2.wait_all() == {1: "ack", 2: "ack", 3: "ack"}


def test_blocking_confirm_delivery(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    ch.confirm_delivery()
    for i in range(20):
        ch.basic_publish("", q, b"%d" % i)  # waits for the ack; raises on nack or return
    assert [m.body for m in get_all(ch, q)] == [b"%d" % i for i in range(20)]


def test_unroutable_non_mandatory_is_acked(broker, amqp, uid):
    conn = amqp(broker)
    c = Confirms(conn)
    c.publish("amq.direct", f"{uid}-nowhere", b"dropped")
    assert c.wait_all() == {1: "ack"}, "an unroutable message is confirmed (dropped)"
    assert [e[0] for e in c.events] == ["ack"], "no basic.return without mandatory"


def test_mandatory_unroutable_returned_before_ack(broker, amqp, uid):
    conn = amqp(broker)
    c = Confirms(conn)
    q = declare(c.bch, f"{uid}-q")
    c.publish("", q, b"routed", mandatory=True)
    c.publish("amq.direct", f"{uid}-nowhere", b"back", mandatory=True)
    c.publish("", q, b"routed too", mandatory=True)
    assert c.wait_all() == {1: "ack", 2: "ack", 3: "ack"}
    returns = [e for e in c.events if e[0] == "return"]
    assert len(returns) == 1
    _, method, body = returns[0]
    assert (method.reply_code, method.reply_text, method.routing_key, body) == \
        (NO_ROUTE, "NO_ROUTE", f"{uid}-nowhere", b"back")
    # The return comes before the ack that covers tag 2.
    order = []
    seen: set[int] = set()
    for e in c.events:
        if e[0] == "return":
            order.append("return")
        else:
            _, tag, multiple = e
            covered = set(range(1, tag + 1)) if multiple else {tag}
            if 2 in covered - seen:
                order.append("ack-2")
            seen |= covered
    assert order == ["return", "ack-2"]


def test_blocking_mandatory_unroutable_raises(broker, amqp, uid):
    ch = amqp(broker).channel()
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as ei:
        ch.basic_publish("amq.direct", f"{uid}-nowhere", b"back", mandatory=True)
    [returned] = ei.value.messages
    assert (returned.method.reply_code, returned.body) == (NO_ROUTE, b"back")
    # The channel stays usable.
    q = declare(ch, f"{uid}-q")
    ch.basic_publish("", q, b"ok", mandatory=True)
    assert queue_count(ch, q) == 1


def test_persistent_to_durable_queue_acked(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-durable", durable=True)
    try:
        ch.confirm_delivery()
        for i in range(20):
            ch.basic_publish("", q, b"%d" % i, properties=PERSISTENT)
        wait_count(ch, q, 20)
        msgs = get_all(ch, q)
        assert [m.body for m in msgs] == [b"%d" % i for i in range(20)]
        assert {m.props.delivery_mode for m in msgs} == {2}
    finally:
        ch.queue_delete(q)


def test_publish_to_missing_exchange_in_confirm_mode_closes_channel(broker, amqp, uid):
    ch = amqp(broker).channel()
    ch.confirm_delivery()
    with channel_error(NOT_FOUND):
        ch.basic_publish(f"{uid}-missing", "k", b"x")


def test_confirm_select_is_idempotent(broker, amqp, uid):
    ch = amqp(broker).channel()
    for _ in range(2):
        ok = raw_rpc(ch, pika.spec.Confirm.Select(), [pika.spec.Confirm.SelectOk])
        assert isinstance(ok, pika.spec.Confirm.SelectOk)


def test_confirm_select_after_tx_select_fails(broker, amqp, uid):
    ch = amqp(broker).channel()
    ch.tx_select()
    with channel_error(PRECONDITION_FAILED):
        ch.confirm_delivery()


def test_tx_select_after_confirm_select_fails(broker, amqp, uid):
    ch = amqp(broker).channel()
    ch.confirm_delivery()
    with channel_error(PRECONDITION_FAILED):
        ch.tx_select()
