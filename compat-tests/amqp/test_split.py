"""Two `tributary gateway amqp` processes in front of one `tributary core`: exchanges, queues,
consumers and unacked messages live in the core, so every gateway routes, shares and locks
the same way (Tributary only: a RabbitMQ cluster is not what these scenarios are about)."""

import pytest

from amqpcompat import RESOURCE_LOCKED, queue_count, wait_count
from amqphelpers import PERSISTENT, Inbox, channel_error, declare, get_all, pump, quiet

pytestmark = pytest.mark.tributary_only(reason="split deployment with two gateways")


@pytest.fixture(scope="module")
def two_gateways(make_module_tributary):
    return make_module_tributary("split-2gw")


def test_publish_through_one_gateway_consume_through_the_other(two_gateways, amqp, uid):
    d = two_gateways
    a, b = amqp(d.broker(0)), amqp(d.broker(1))
    ch_a, ch_b = a.channel(), b.channel()
    ch_a.exchange_declare(f"{uid}-x", "topic")
    q = declare(ch_a, f"{uid}-q")
    ch_a.queue_bind(q, f"{uid}-x", "orders.#")
    inbox = Inbox(ch_b, q)
    ch_a.confirm_delivery()
    for i in range(50):
        ch_a.basic_publish(f"{uid}-x", "orders.eu.%d" % i, b"m%d" % i, properties=PERSISTENT)
    inbox.wait(50)
    assert inbox.texts() == ["m%d" % i for i in range(50)]


def test_competing_consumers_on_two_gateways_share_without_duplicates(two_gateways, amqp, uid):
    d = two_gateways
    a, b = amqp(d.broker(0)), amqp(d.broker(1))
    ch_a, ch_b = a.channel(), b.channel()
    q = declare(ch_a, f"{uid}-q")
    for ch in (ch_a, ch_b):
        ch.basic_qos(prefetch_count=5)
    in_a, in_b = Inbox(ch_a, q, auto_ack=True), Inbox(ch_b, q, auto_ack=True)
    pub = amqp(d.broker(0)).channel()
    pub.confirm_delivery()
    for i in range(200):
        pub.basic_publish("", q, b"%03d" % i)
    pump([a, b], lambda: len(in_a.msgs) + len(in_b.msgs) >= 200, what="200 deliveries")
    quiet([a, b])
    got = sorted(in_a.texts() + in_b.texts())
    assert got == ["%03d" % i for i in range(200)], "each message once"
    assert in_a.msgs and in_b.msgs, "both gateways' consumers got a share"


def test_exclusive_queue_is_locked_across_gateways(two_gateways, amqp, uid):
    d = two_gateways
    a, b = amqp(d.broker(0)), amqp(d.broker(1))
    q = declare(a.channel(), f"{uid}-excl", exclusive=True)
    with channel_error(RESOURCE_LOCKED):
        b.channel().queue_declare(q, passive=True)


def test_unacked_on_one_gateway_requeued_to_the_other_when_it_closes(two_gateways, amqp, uid):
    d = two_gateways
    a = amqp(d.broker(0))
    ch_a = a.channel()
    q = declare(ch_a, f"{uid}-q")
    ch_a.confirm_delivery()
    for i in range(3):
        ch_a.basic_publish("", q, b"u%d" % i)
    ch_a.basic_qos(prefetch_count=3)
    inbox = Inbox(ch_a, q)
    inbox.wait(3)
    a.close()  # never acked
    ch_b = amqp(d.broker(1)).channel()
    got = get_all(ch_b, q)
    assert [m.body for m in got] == [b"u0", b"u1", b"u2"]
    assert all(m.redelivered for m in got)


@pytest.mark.parametrize("ending", ["close", "socket"])
def test_publishes_just_before_the_connection_ends_are_routed(two_gateways, amqp, uid, ending):
    """A publish (no confirms) written just before the client ends its connection through one
    gateway reaches the queue: the gateway ends its stream to the core only once the core has
    taken every command of the connection. With connection.close, close-ok comes once that is
    done, so the message is already in the queue when the client sees it."""
    d = two_gateways
    ch_b = amqp(d.broker(1)).channel()
    q = declare(ch_b, f"{uid}-q")
    rounds = 30
    for i in range(rounds):
        r = d.broker(0).raw()
        try:
            r.handshake()
            r.open_channel(1)
            r.publish(1, "", q, b"%d" % i)
            if ending == "close":
                assert r.close_connection().name == "connection.close-ok"
                assert queue_count(ch_b, q) == i + 1, f"round {i}"
        finally:
            r.close()  # "socket": gone without connection.close
    wait_count(ch_b, q, rounds)
    assert sorted(int(m.body) for m in get_all(ch_b, q)) == list(range(rounds))
