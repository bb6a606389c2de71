"""Durability across kill -9 of the process holding the data (Tributary only: the reference
node is shared by the whole session and RabbitMQ's own crash recovery is not what these
scenarios are about). Standalone restarts the one process on its data directory; split kills
only the core while the AMQP gateway keeps running.

Durable queues keep their persistent (delivery_mode 2) messages, in order; transient
messages and non-durable queues and exchanges are gone; durable exchanges and bindings stay;
deliveries unacknowledged at the kill come back with redelivered set; every publish
confirmed before the kill is there after it."""

import signal
import time

import pika
import pika.exceptions
import pytest

from amqpcompat import NOT_FOUND
from amqphelpers import (
    PERSISTENT, TRANSIENT, Confirms, Inbox, channel_error, declare, get_all, pump, quiet,
)

RECONNECT_S = 30.0

MODES = ["standalone", "split"]
pytestmark = pytest.mark.tributary_only(
    reason="kill -9 of the process holding the data, split deployments")


def reconnect(d, amqp, queue: str | None = None):
    """A connection to the deployment after a restart: retried (with the queue's passive
    declare, when given, as the proof that the core answers) until RECONNECT_S."""
    deadline = time.monotonic() + RECONNECT_S
    while True:
        try:
            conn = amqp(d.broker())
            if queue is not None:
                conn.channel().queue_declare(queue, passive=True)
            return conn
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelClosedByBroker,
                pika.exceptions.ChannelWrongStateError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no working connection {RECONNECT_S}s after the restart: {e!r}\n"
                    f"{d.log_tails()}") from e
            time.sleep(0.1)  # retry interval, bounded by the deadline


def restart(d, mode):
    d.restart_core(signal.SIGKILL)
    if mode == "split":
        assert all(gw.alive() for gw in d.gateways), "the gateway outlives the core"


def confirmed_publish(ch, queue, bodies, props=PERSISTENT):
    ch.confirm_delivery()
    for b in bodies:
        ch.basic_publish("", queue, b, properties=props)


@pytest.mark.parametrize("mode", MODES)
def test_persistent_messages_survive_kill_9(make_tributary, amqp, uid, mode):
    d = make_tributary(mode)
    ch = amqp(d.broker()).channel()
    q = declare(ch, f"{uid}-q", durable=True)
    want = [b"p%d" % i for i in range(200)]
    confirmed_publish(ch, q, want)
    restart(d, mode)
    ch = reconnect(d, amqp, q).channel()
    got = get_all(ch, q)
    assert [m.body for m in got] == want, "lost, duplicated or reordered"
    assert {m.props.delivery_mode for m in got} == {2}


@pytest.mark.parametrize("mode", MODES)
def test_transient_state_gone_durable_state_kept(make_tributary, amqp, uid, mode):
    d = make_tributary(mode)
    ch = amqp(d.broker()).channel()
    dq = declare(ch, f"{uid}-durable", durable=True)
    tq = declare(ch, f"{uid}-transient", durable=False)
    ch.exchange_declare(f"{uid}-dx", "topic", durable=True)
    ch.exchange_declare(f"{uid}-tx", "fanout", durable=False)
    ch.queue_bind(dq, f"{uid}-dx", "orders.*")
    ch.confirm_delivery()
    ch.basic_publish("", dq, b"transient", properties=TRANSIENT)
    ch.basic_publish("", dq, b"persistent", properties=PERSISTENT)
    ch.basic_publish("", dq, b"no mode")  # no delivery_mode: transient
    ch.basic_publish("", tq, b"in a transient queue", properties=PERSISTENT)
    restart(d, mode)
    conn = reconnect(d, amqp, dq)
    ch = conn.channel()
    assert [m.body for m in get_all(ch, dq)] == [b"persistent"], "only persistent messages"
    with channel_error(NOT_FOUND):
        ch.queue_declare(tq, passive=True)
    ch = conn.channel()
    with channel_error(NOT_FOUND):
        ch.exchange_declare(f"{uid}-tx", passive=True)
    ch = conn.channel()
    ch.exchange_declare(f"{uid}-dx", passive=True)
    # The binding survived with the exchange: routed by its pattern.
    ch.confirm_delivery()
    ch.basic_publish(f"{uid}-dx", "orders.new", b"routed", mandatory=True)
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(f"{uid}-dx", "refunds.new", b"unrouted", mandatory=True)
    assert [m.body for m in get_all(ch, dq)] == [b"routed"]


@pytest.mark.parametrize("mode", MODES)
def test_bindings_survive_and_can_be_removed_after_restart(make_tributary, amqp, uid, mode):
    d = make_tributary(mode)
    ch = amqp(d.broker()).channel()
    ex = f"{uid}-dx"
    ch.exchange_declare(ex, "direct", durable=True)
    qa, qb = declare(ch, f"{uid}-a", durable=True), declare(ch, f"{uid}-b", durable=True)
    ch.queue_bind(qa, ex, "k")
    ch.queue_bind(qb, ex, "k")
    ch.queue_bind(qb, ex, "only-b")
    restart(d, mode)
    ch = reconnect(d, amqp, qa).channel()
    ch.queue_unbind(qb, ex, "k")
    ch.confirm_delivery()
    ch.basic_publish(ex, "k", b"k", properties=PERSISTENT)
    ch.basic_publish(ex, "only-b", b"only-b", properties=PERSISTENT)
    assert [m.body for m in get_all(ch, qa)] == [b"k"]
    assert [m.body for m in get_all(ch, qb)] == [b"only-b"]


@pytest.mark.parametrize("mode", MODES)
def test_unacked_deliveries_redelivered_after_kill_9(make_tributary, amqp, uid, mode):
    d = make_tributary(mode)
    conn = amqp(d.broker())
    ch = conn.channel()
    q = declare(ch, f"{uid}-q", durable=True)
    confirmed_publish(ch, q, [b"m%d" % i for i in range(6)])
    ch.basic_qos(prefetch_count=3)
    inbox = Inbox(ch, q)
    inbox.wait(3)
    quiet(conn, 0.2)
    assert inbox.texts() == ["m0", "m1", "m2"]
    restart(d, mode)
    ch = reconnect(d, amqp, q).channel()
    got = get_all(ch, q)
    assert [m.body for m in got] == [b"m%d" % i for i in range(6)], "all six, in order"
    assert [m.redelivered for m in got[:3]] == [True, True, True], \
        "the ones delivered before the kill come back as redelivered"


@pytest.mark.parametrize("mode", MODES)
def test_every_confirmed_publish_survives_kill_during_stream(make_tributary, amqp, uid, mode):
    d = make_tributary(mode)
    conn = amqp(d.broker())
    c = Confirms(conn)
    q = declare(c.bch, f"{uid}-q", durable=True)
    sent = 0

    def send(n):
        nonlocal sent
        for _ in range(n):
            c.publish("", q, b"%06d" % sent, properties=PERSISTENT)
            sent += 1

    # Keep ~200 publishes in flight until at least 500 are confirmed, then kill with more
    # still unconfirmed.
    while True:
        send(50)
        pump(conn, lambda: len(c.confirmed()) >= sent - 200, what="confirms to keep up")
        if len(c.confirmed()) >= 500:
            break
    send(200)
    conn.process_data_events(time_limit=0)
    confirmed = c.confirmed()
    acked = sorted(t for t, kind in confirmed.items() if kind == "ack")
    assert len(acked) >= 500
    restart(d, mode)
    ch = reconnect(d, amqp, q).channel()
    bodies = [m.body for m in get_all(ch, q)]
    present = [int(b) for b in bodies]
    assert len(set(present)) == len(present), "duplicates after restart"
    assert present == sorted(present), "order not kept"
    missing = sorted({t - 1 for t in acked} - set(present))  # tag n is message n - 1
    assert not missing, f"{len(missing)} confirmed messages lost, first {missing[:10]}"
    assert len(present) <= sent


@pytest.mark.parametrize("mode", MODES)
def test_confirmed_delayed_message_survives_kill_9(make_tributary, amqp, uid, mode):
    # x-delayed-message: a confirmed delayed publish is a durable timer, so it is delivered
    # after a kill -9 that happens before it is due.
    d = make_tributary(mode)
    ch = amqp(d.broker()).channel()
    ex = f"{uid}-delayed"
    ch.exchange_declare(ex, "x-delayed-message", durable=True,
                        arguments={"x-delayed-type": "direct"})
    q = declare(ch, f"{uid}-q", durable=True)
    ch.queue_bind(q, ex, "k")
    ch.confirm_delivery()
    ch.basic_publish(ex, "k", b"later", properties=pika.BasicProperties(
        delivery_mode=2, headers={"x-delay": 1500}))
    restart(d, mode)
    ch = reconnect(d, amqp, q).channel()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        method, _props, body = ch.basic_get(q, auto_ack=True)
        if method is not None:
            assert body == b"later"
            return
        time.sleep(0.05)  # polling interval, bounded by the deadline
    raise AssertionError(f"the delayed message never arrived\n{d.log_tails()}")
