"""Channels: open and close, many on one connection, channel.flow, and the channel errors
that close one channel (404, 406, 403, 405) while the connection and its other channels
keep working, next to the ones that close the whole connection (504, 503, 540, among them
basic.publish with immediate=true), and unbinds of what is not bound (unbind-ok)."""

from __future__ import annotations

import pika
import pika.exceptions
import pytest

from amqpcompat import (ACCESS_REFUSED, CHANNEL_ERROR, COMMAND_INVALID, NOT_FOUND,
                        NOT_IMPLEMENTED, PRECONDITION_FAILED, QUIET_S, RESOURCE_LOCKED,
                        get_message, queue_count, wait_count)


def _still_works(conn: pika.BlockingConnection, uid: str, other=None):
    """The connection is open and a channel (`other`, or a new one) still round-trips."""
    assert conn.is_open, "the channel error closed the connection"
    ch = other or conn.channel()
    q = ch.queue_declare(f"{uid}-alive", auto_delete=True).method.queue
    ch.basic_publish("", q, b"alive")
    assert get_message(ch, q)[2] == b"alive"


def _channel_error(fn) -> pika.exceptions.ChannelClosedByBroker:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        fn()
    return e.value


# -- open / close ----------------------------------------------------------------------------


def test_open_close_channel(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    assert ch.is_open
    ch.close()
    assert ch.is_closed
    _still_works(conn, uid)


def test_many_channels(broker, amqp, uid):
    conn = amqp(broker)
    chans = [conn.channel() for _ in range(60)]
    assert len({c.channel_number for c in chans}) == 60
    q = conn.channel().queue_declare(f"{uid}-many", auto_delete=False).method.queue
    for i, c in enumerate(chans):
        c.basic_publish("", q, str(i).encode())
    for c in chans[::2]:
        c.close()
    for c in chans[1::2]:
        assert c.is_open
    check = chans[1]
    wait_count(check, q, 60)
    bodies = sorted(int(get_message(check, q)[2]) for _ in range(60))
    assert bodies == list(range(60))
    check.queue_delete(q)


def test_raw_channel_reopen_after_close(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake()
    r.open_channel(1)
    r.open_channel(7)
    r.send_method(1, "channel.close", reply_code=200, reply_text="done")
    assert r.expect("channel.close-ok", 1).channel == 1
    r.open_channel(1)  # the number is free again
    r.send_method(7, "queue.declare", queue="", exclusive=True)
    assert r.expect("queue.declare-ok", 7).queue.startswith("amq.gen-")


def test_double_channel_open_is_connection_error_504(broker, raw_clients, amqp, uid):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake()
    r.open_channel(1)
    r.send_method(1, "channel.open")
    closing = r.read_until_close()
    assert closing is not None and closing.reply_code == CHANNEL_ERROR, closing
    _still_works(amqp(broker), uid)


# -- flow ------------------------------------------------------------------------------------


def test_flow_active_true(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    assert ch.flow(True) is True
    _still_works(conn, uid, ch)


def test_flow_active_false_not_implemented(broker, amqp, uid):
    # RabbitMQ 3.10 does not stop publishers on a client's request: channel.flow
    # active=false closes the *connection* with 540 NOT_IMPLEMENTED.
    conn = amqp(broker)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as e:
        ch.flow(False)
    assert e.value.reply_code == NOT_IMPLEMENTED
    _still_works(amqp(broker), uid)


# -- basic.publish immediate=true ------------------------------------------------------------


@pytest.mark.parametrize("exchange", ["default", "missing"])
def test_publish_immediate_closes_connection_540(broker, raw_clients, amqp, uid, exchange):
    """RabbitMQ 3.x does not implement immediate=true: once the publish's content is in, it
    closes the *connection* with 540 NOT_IMPLEMENTED for basic.publish (60, 40), before
    looking at the exchange (a missing one gives 540 too, not 404). Nothing is routed."""
    ch = amqp(broker).channel()
    q = ch.queue_declare(f"{uid}-q", exclusive=True).method.queue
    r = broker.raw()
    raw_clients.append(r)
    r.handshake()
    r.open_channel(1)
    name = "" if exchange == "default" else f"{uid}-missing"
    r.send_method(1, "basic.publish", exchange=name, routing_key=q, immediate=True)
    with pytest.raises(TimeoutError):  # the method alone: the broker waits for the content
        r.recv_frame(QUIET_S)
    r.send_content(1, b"now", {"delivery_mode": 2})
    closing = r.read_until_close()
    assert closing is not None, "socket closed without connection.close"
    assert (closing.reply_code, closing.args["class_id"], closing.args["method_id"]) == \
        (NOT_IMPLEMENTED, 60, 40)
    assert "immediate=true" in closing.reply_text
    assert r.wait_eof(), "the socket stays open after close-ok"
    assert queue_count(ch, q) == 0
    _still_works(amqp(broker), uid)


# -- channel errors: only the channel closes -------------------------------------------------


def test_passive_declare_missing_queue_404(broker, amqp, uid):
    conn = amqp(broker)
    other = conn.channel()
    ch = conn.channel()
    e = _channel_error(lambda: ch.queue_declare(f"{uid}-missing", passive=True))
    assert e.reply_code == NOT_FOUND
    assert ch.is_closed and other.is_open
    _still_works(conn, uid, other)


def test_passive_declare_missing_exchange_404(broker, amqp, uid):
    conn = amqp(broker)
    other = conn.channel()
    ch = conn.channel()
    e = _channel_error(lambda: ch.exchange_declare(f"{uid}-missing", passive=True))
    assert e.reply_code == NOT_FOUND
    _still_works(conn, uid, other)


def test_publish_to_missing_exchange_404(broker, amqp, uid):
    conn = amqp(broker)
    other = conn.channel()
    ch = conn.channel()

    def publish_then_sync():
        ch.basic_publish(f"{uid}-missing", "rk", b"lost")
        ch.queue_declare("", exclusive=True)  # a round trip that sees the channel.close

    e = _channel_error(publish_then_sync)
    assert e.reply_code == NOT_FOUND
    _still_works(conn, uid, other)


def test_consume_from_missing_queue_404(broker, amqp, uid):
    conn = amqp(broker)
    other = conn.channel()
    ch = conn.channel()
    e = _channel_error(lambda: ch.basic_consume(f"{uid}-missing", lambda *a: None))
    assert e.reply_code == NOT_FOUND
    _still_works(conn, uid, other)


def test_bind_missing_queue_or_exchange_404(broker, amqp, uid):
    conn = amqp(broker)
    other = conn.channel()
    other.queue_declare(f"{uid}-q", auto_delete=True)
    ch = conn.channel()
    e = _channel_error(lambda: ch.queue_bind(f"{uid}-missing", "amq.direct", "k"))
    assert e.reply_code == NOT_FOUND
    ch = conn.channel()
    e = _channel_error(lambda: ch.queue_bind(f"{uid}-q", f"{uid}-missing-x", "k"))
    assert e.reply_code == NOT_FOUND
    _still_works(conn, uid, other)


# -- unbind: nothing to remove is not an error -----------------------------------------------

# What RabbitMQ 3.x answers to an unbind whose binding is not there: unbind-ok, whether the
# queue, the exchange (source or destination) or only the binding is missing, and whether it
# never existed or was deleted. The channel stays open.
UNBIND_NOTHING = {
    "queue.unbind missing queue":
        lambda ch, u: ch.queue_unbind(f"{u}-nq", f"{u}-x", "k"),
    "queue.unbind missing exchange":
        lambda ch, u: ch.queue_unbind(f"{u}-q", f"{u}-nx", "k"),
    "queue.unbind both missing":
        lambda ch, u: ch.queue_unbind(f"{u}-nq", f"{u}-nx", "k"),
    "queue.unbind no such binding":
        lambda ch, u: ch.queue_unbind(f"{u}-q", f"{u}-x", "other-key"),
    "queue.unbind twice":
        lambda ch, u: (ch.queue_unbind(f"{u}-q", f"{u}-x", "k"),
                       ch.queue_unbind(f"{u}-q", f"{u}-x", "k")),
    "queue.unbind after queue.delete":
        lambda ch, u: (ch.queue_delete(f"{u}-q"), ch.queue_unbind(f"{u}-q", f"{u}-x", "k")),
    "queue.unbind after exchange.delete":
        lambda ch, u: (ch.exchange_delete(f"{u}-x"), ch.queue_unbind(f"{u}-q", f"{u}-x", "k")),
    "exchange.unbind missing destination":
        lambda ch, u: ch.exchange_unbind(f"{u}-ny", f"{u}-x", "k"),
    "exchange.unbind missing source":
        lambda ch, u: ch.exchange_unbind(f"{u}-y", f"{u}-nx", "k"),
    "exchange.unbind both missing":
        lambda ch, u: ch.exchange_unbind(f"{u}-ny", f"{u}-nx", "k"),
    "exchange.unbind no such binding":
        lambda ch, u: ch.exchange_unbind(f"{u}-y", f"{u}-x", "other-key"),
    "exchange.unbind after destination deleted":
        lambda ch, u: (ch.exchange_delete(f"{u}-y"), ch.exchange_unbind(f"{u}-y", f"{u}-x", "k")),
    "exchange.unbind after source deleted":
        lambda ch, u: (ch.exchange_delete(f"{u}-x"), ch.exchange_unbind(f"{u}-y", f"{u}-x", "k")),
}


@pytest.mark.parametrize("case", list(UNBIND_NOTHING))
def test_unbind_of_missing_binding_is_ok(broker, amqp, uid, case):
    conn = amqp(broker)
    ch = conn.channel()
    # Queue q and exchange y both bound to exchange x with key "k".
    ch.exchange_declare(f"{uid}-x", "direct")
    ch.exchange_declare(f"{uid}-y", "fanout")
    ch.queue_declare(f"{uid}-q")
    ch.queue_bind(f"{uid}-q", f"{uid}-x", "k")
    ch.exchange_bind(f"{uid}-y", f"{uid}-x", "k")
    try:
        UNBIND_NOTHING[case](ch, uid)  # pika raises ChannelClosedByBroker on an error
        assert ch.is_open
        _still_works(conn, uid, ch)
    finally:
        for x in ("x", "y"):
            ch.exchange_delete(f"{uid}-{x}")
        ch.queue_delete(f"{uid}-q")


def test_unbind_removes_the_binding(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    ch.confirm_delivery()
    x = f"{uid}-x"
    ch.exchange_declare(x, "direct", auto_delete=True)
    q = ch.queue_declare(f"{uid}-q", exclusive=True).method.queue
    ch.queue_bind(q, x, "k")
    ch.queue_bind(q, x, "keep")  # keeps the auto-delete exchange alive
    ch.basic_publish(x, "k", b"bound")
    assert get_message(ch, q)[2] == b"bound"
    ch.queue_unbind(q, x, "k")
    ch.basic_publish(x, "k", b"unbound")  # confirmed: routed to nobody
    ch.basic_publish(x, "keep", b"still")
    assert get_message(ch, q)[2] == b"still"
    assert queue_count(ch, q) == 0


def test_unbind_exclusive_queue_of_another_connection(broker, amqp, uid):
    """Another connection's exclusive queue: an unbind with nothing to remove is still ok, one
    that would remove a binding is refused with 405 RESOURCE_LOCKED."""
    owner = amqp(broker).channel()
    q = f"{uid}-excl"
    owner.queue_declare(q, exclusive=True)
    owner.queue_bind(q, "amq.direct", f"{uid}-k")
    conn = amqp(broker)
    other = conn.channel()
    ch = conn.channel()
    ch.queue_unbind(q, "amq.direct", f"{uid}-other")
    assert ch.is_open
    e = _channel_error(lambda: ch.queue_unbind(q, "amq.direct", f"{uid}-k"))
    assert e.reply_code == RESOURCE_LOCKED
    owner.confirm_delivery()
    owner.basic_publish("amq.direct", f"{uid}-k", b"still bound")
    assert get_message(owner, q)[2] == b"still bound"
    _still_works(conn, uid, other)


def test_unbind_default_exchange_403(broker, amqp, uid):
    conn = amqp(broker)
    other = conn.channel()
    q = other.queue_declare(f"{uid}-q", exclusive=True).method.queue
    for action in (
        lambda ch: ch.queue_unbind(q, "", q),
        lambda ch: ch.queue_unbind(f"{uid}-missing", "", "k"),
        lambda ch: ch.exchange_unbind("amq.direct", "", "k"),
        lambda ch: ch.exchange_unbind("", "amq.direct", "k"),
    ):
        ch = conn.channel()
        e = _channel_error(lambda: action(ch))
        assert e.reply_code == ACCESS_REFUSED
    _still_works(conn, uid, other)


def test_purge_missing_queue_404(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    e = _channel_error(lambda: ch.queue_purge(f"{uid}-missing"))
    assert e.reply_code == NOT_FOUND
    _still_works(conn, uid)


@pytest.mark.parametrize("first,second", [
    ({"durable": False}, {"durable": True}),
    ({"durable": True}, {"durable": False}),
    ({"auto_delete": False}, {"auto_delete": True}),
    ({}, {"arguments": {"x-max-length": 5}}),
    ({"arguments": {"x-message-ttl": 1000}}, {"arguments": {"x-message-ttl": 2000}}),
], ids=["durable", "not-durable", "auto-delete", "args-added", "args-changed"])
def test_redeclare_queue_differently_406(broker, amqp, uid, first, second):
    conn = amqp(broker)
    other = conn.channel()
    q = f"{uid}-redecl"
    other.queue_declare(q, **first)
    ch = conn.channel()
    e = _channel_error(lambda: ch.queue_declare(q, **second))
    assert e.reply_code == PRECONDITION_FAILED
    assert other.queue_declare(q, passive=True).method.queue == q  # unchanged, still there
    other.queue_delete(q)
    _still_works(conn, uid, other)


def test_ack_unknown_delivery_tag_406(broker, amqp, uid):
    conn = amqp(broker)
    other = conn.channel()
    ch = conn.channel()

    def ack_then_sync():
        ch.basic_ack(12345)
        ch.queue_declare("", exclusive=True)

    e = _channel_error(ack_then_sync)
    assert e.reply_code == PRECONDITION_FAILED
    _still_works(conn, uid, other)


def test_redeclare_exchange_with_other_type_406(broker, amqp, uid):
    # The spec's exchange.declare rule names 530 NOT_ALLOWED for a different type; RabbitMQ
    # answers 406 PRECONDITION_FAILED ("inequivalent arg 'type'"), as for every other
    # inequivalent property.
    conn = amqp(broker)
    other = conn.channel()
    x = f"{uid}-x"
    other.exchange_declare(x, "direct", auto_delete=False)
    ch = conn.channel()
    e = _channel_error(lambda: ch.exchange_declare(x, "fanout"))
    assert e.reply_code == PRECONDITION_FAILED
    ch = conn.channel()
    e = _channel_error(lambda: ch.exchange_declare(x, "direct", durable=True))
    assert e.reply_code == PRECONDITION_FAILED
    ch = conn.channel()
    e = _channel_error(lambda: ch.exchange_declare("amq.direct", "topic", durable=True))
    assert e.reply_code == PRECONDITION_FAILED
    other.exchange_delete(x)
    _still_works(conn, uid, other)


def test_unknown_exchange_type_is_connection_error_503(broker, amqp, uid):
    # RabbitMQ closes the connection, not the channel, for an unknown exchange type.
    conn = amqp(broker)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as e:
        ch.exchange_declare(f"{uid}-x", "no-such-type")
    assert e.value.reply_code == COMMAND_INVALID
    _still_works(amqp(broker), uid)


def test_reserved_names_403(broker, amqp, uid):
    conn = amqp(broker)
    other = conn.channel()
    ch = conn.channel()
    e = _channel_error(lambda: ch.exchange_declare(f"amq.{uid}", "direct"))
    assert e.reply_code == ACCESS_REFUSED
    ch = conn.channel()
    e = _channel_error(lambda: ch.queue_declare(f"amq.{uid}"))
    assert e.reply_code == ACCESS_REFUSED
    ch = conn.channel()
    e = _channel_error(lambda: ch.exchange_delete("amq.direct"))
    assert e.reply_code == ACCESS_REFUSED
    ch = conn.channel()
    e = _channel_error(lambda: ch.exchange_delete(""))
    assert e.reply_code == ACCESS_REFUSED
    ch = conn.channel()
    q = other.queue_declare(f"{uid}-q", auto_delete=True).method.queue
    e = _channel_error(lambda: ch.queue_bind(q, "", "k"))  # the default exchange
    assert e.reply_code == ACCESS_REFUSED
    # the predeclared exchanges are still there and passive-declarable
    for x in ("amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"):
        other.exchange_declare(x, passive=True)
    _still_works(conn, uid, other)


@pytest.mark.parametrize("op", ["passive", "declare", "consume", "delete", "purge", "bind"])
def test_exclusive_queue_of_another_connection_405(broker, amqp, uid, op):
    owner = amqp(broker).channel()
    q = f"{uid}-excl"
    owner.queue_declare(q, exclusive=True)
    conn = amqp(broker)
    other = conn.channel()
    ch = conn.channel()
    action = {
        "passive": lambda: ch.queue_declare(q, passive=True),
        "declare": lambda: ch.queue_declare(q),
        "consume": lambda: ch.basic_consume(q, lambda *a: None),
        "delete": lambda: ch.queue_delete(q),
        "purge": lambda: ch.queue_purge(q),
        "bind": lambda: ch.queue_bind(q, "amq.fanout"),
    }[op]
    e = _channel_error(action)
    assert e.reply_code == RESOURCE_LOCKED
    assert owner.queue_declare(q, passive=True).method.queue == q  # still the owner's
    _still_works(conn, uid, other)
