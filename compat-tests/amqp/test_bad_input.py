"""Bad input on a raw socket (amqpraw): broken frames, frames over frame_max, frames out of
order, methods on the wrong channel, unknown classes and methods, garbage, truncation. Each
ends the offending connection (with connection.close and the reply code RabbitMQ sends, or
a plain socket close where RabbitMQ does that), and afterwards another client on the same
broker still publishes and consumes.

Reply codes RabbitMQ 3.10 sends that differ from what the 0-9-1 text suggests are asserted as
RabbitMQ sends them and say so in a comment."""

from __future__ import annotations

import struct

import pytest

import amqpraw
from amqpcompat import (CHANNEL_ERROR, COMMAND_INVALID, FRAME_ERROR, NOT_IMPLEMENTED,
                        UNEXPECTED_FRAME, get_message)


@pytest.fixture
def healthy(broker, amqp, uid):
    """Call after the bad input: a fresh pika connection still publishes and consumes."""

    def check():
        ch = amqp(broker).channel()
        q = ch.queue_declare(f"{uid}-healthy", exclusive=True).method.queue
        ch.basic_publish("", q, b"still fine")
        assert get_message(ch, q)[2] == b"still fine"
        got = []
        ch.basic_publish("", q, b"consumed")
        ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
        deadline = 100
        while not got and deadline:
            ch.connection.process_data_events(time_limit=0.05)
            deadline -= 1
        assert got == [b"consumed"]

    return check


@pytest.fixture
def opened(broker, raw_clients):
    """A raw connection past the handshake with channel 1 open."""

    def make(**kw) -> amqpraw.RawConnection:
        r = broker.raw()
        raw_clients.append(r)
        r.handshake(**kw)
        r.open_channel(1)
        return r

    return make


def closed_with(r: amqpraw.RawConnection, timeout: float = 5.0) -> int | None:
    """The reply code of the server's connection.close (None: socket closed without one)."""
    try:
        m = r.read_until_close(timeout)
    except TimeoutError:
        pytest.fail(f"the server neither closed nor answered within {timeout}s")
    return m.reply_code if m is not None else None


def publish_start(r: amqpraw.RawConnection, channel: int = 1, key: str = "nowhere"):
    r.send_method(channel, "basic.publish", exchange="", routing_key=key)


# -- frame syntax ----------------------------------------------------------------------------


def test_wrong_frame_end_501(opened, healthy):
    r = opened()
    r.send(amqpraw.frame(amqpraw.FRAME_METHOD, 1,
                         amqpraw.method_payload("queue.declare", queue="", exclusive=True),
                         end=0x00))
    assert closed_with(r) == FRAME_ERROR
    healthy()


def test_unknown_frame_type_501(opened, healthy):
    r = opened()
    r.send_frame(9, 1, b"xx")
    assert closed_with(r) == FRAME_ERROR
    healthy()


def test_method_frame_over_frame_max_501(opened, healthy):
    r = opened(frame_max=4096)
    r.send_method(1, "queue.declare", queue="q", arguments={"x-pad": "p" * 5000})
    assert closed_with(r) == FRAME_ERROR
    healthy()


def test_body_frame_over_frame_max_501(opened, healthy):
    r = opened(frame_max=4096)
    publish_start(r)
    r.send_frame(amqpraw.FRAME_HEADER, 1, amqpraw.content_header_payload(5000))
    r.send_frame(amqpraw.FRAME_BODY, 1, b"b" * 5000)
    assert closed_with(r) == FRAME_ERROR
    healthy()


def test_frame_size_field_huge_501(opened, healthy):
    # Only the 7-octet frame header: the server refuses the size without waiting for 2 GiB.
    r = opened()
    r.send(struct.pack(">BHI", amqpraw.FRAME_METHOD, 1, 0x7FFFFFFF))
    assert closed_with(r) == FRAME_ERROR
    healthy()


def test_garbage_after_handshake_501(opened, healthy):
    r = opened()
    r.send(b"\xff" * 64)
    assert closed_with(r) == FRAME_ERROR
    healthy()


def test_truncated_method_arguments_501(opened, healthy):
    # queue.declare whose queue name claims 9 octets and has 2. RabbitMQ: 501 FRAME_ERROR
    # ("cannot decode"), not 502 SYNTAX_ERROR.
    r = opened()
    r.send_frame(amqpraw.FRAME_METHOD, 1, struct.pack(">HH", 50, 10) + b"\x00\x00\x09ab")
    assert closed_with(r) == FRAME_ERROR
    healthy()


def test_short_content_header_501(opened, healthy):
    r = opened()
    publish_start(r)
    r.send_frame(amqpraw.FRAME_HEADER, 1, b"\x00\x3c")  # class id only
    assert closed_with(r) == FRAME_ERROR
    healthy()


# -- frame order -----------------------------------------------------------------------------


def test_content_header_without_publish_505(opened, healthy):
    r = opened()
    r.send_frame(amqpraw.FRAME_HEADER, 1, amqpraw.content_header_payload(3))
    assert closed_with(r) == UNEXPECTED_FRAME
    healthy()


def test_body_without_publish_505(opened, healthy):
    r = opened()
    r.send_frame(amqpraw.FRAME_BODY, 1, b"abc")
    assert closed_with(r) == UNEXPECTED_FRAME
    healthy()


def test_method_instead_of_content_header_505(opened, healthy):
    r = opened()
    publish_start(r)
    r.send_method(1, "queue.declare", queue="", exclusive=True)
    assert closed_with(r) == UNEXPECTED_FRAME
    healthy()


def test_method_instead_of_body_505(opened, healthy):
    r = opened()
    publish_start(r)
    r.send_frame(amqpraw.FRAME_HEADER, 1, amqpraw.content_header_payload(6))
    r.send_method(1, "queue.declare", queue="", exclusive=True)
    assert closed_with(r) == UNEXPECTED_FRAME
    healthy()


def test_content_header_of_other_class_505(opened, healthy):
    r = opened()
    publish_start(r)
    r.send_frame(amqpraw.FRAME_HEADER, 1, amqpraw.content_header_payload(3, class_id=50))
    assert closed_with(r) == UNEXPECTED_FRAME
    healthy()


def test_body_larger_than_declared(opened, healthy, uid):
    # RabbitMQ does not check a body frame against the size left: it keeps waiting for
    # content (the remaining size is negative) and the next method frame on the channel
    # gets 505 UNEXPECTED_FRAME. Refusing the body frame itself (501 FRAME_ERROR) is as good.
    # Either way nothing is delivered.
    r = opened()
    q = f"{uid}-big"
    r.send_method(1, "queue.declare", queue=q, exclusive=False, auto_delete=False)
    r.expect("queue.declare-ok", 1)
    publish_start(r, key=q)
    r.send_frame(amqpraw.FRAME_HEADER, 1, amqpraw.content_header_payload(3))
    r.send_frame(amqpraw.FRAME_BODY, 1, b"abcdef")
    try:
        r.send_method(1, "queue.declare", queue=q, passive=True)
    except OSError:
        pass  # already closed by the server
    assert closed_with(r) in (FRAME_ERROR, UNEXPECTED_FRAME)
    healthy()


def test_empty_body_frames_are_fine(opened):
    # A zero-size body needs no body frame; empty body frames in the middle are allowed.
    r = opened()
    q = "amq.gen-ignored"
    publish_start(r, key=q)
    r.send_frame(amqpraw.FRAME_HEADER, 1, amqpraw.content_header_payload(0))
    publish_start(r, key=q)
    r.send_frame(amqpraw.FRAME_HEADER, 1, amqpraw.content_header_payload(3))
    r.send_frame(amqpraw.FRAME_BODY, 1, b"a")
    r.send_frame(amqpraw.FRAME_BODY, 1, b"")
    r.send_frame(amqpraw.FRAME_BODY, 1, b"bc")
    r.send_method(1, "queue.declare", queue="", exclusive=True)
    assert r.expect("queue.declare-ok", 1).queue.startswith("amq.gen-")


def test_heartbeat_on_channel_other_than_zero_505(opened, healthy):
    # RabbitMQ: 505 UNEXPECTED_FRAME.
    r = opened()
    r.send_frame(amqpraw.FRAME_HEARTBEAT, 1, b"")
    assert closed_with(r) == UNEXPECTED_FRAME
    healthy()


# -- channels and methods --------------------------------------------------------------------


def test_method_on_channel_never_opened_504(opened, healthy):
    r = opened()
    r.send_method(5, "queue.declare", queue="", exclusive=True)
    assert closed_with(r) == CHANNEL_ERROR
    healthy()


def test_channel_method_on_channel_zero_504(opened, healthy):
    r = opened()
    r.send_method(0, "queue.declare", queue="", exclusive=True)
    assert closed_with(r) == CHANNEL_ERROR
    healthy()


def test_connection_method_on_channel_one_503(opened, healthy):
    r = opened()
    r.send_method(1, "connection.tune-ok", channel_max=1, frame_max=4096, heartbeat=0)
    assert closed_with(r) == COMMAND_INVALID
    healthy()


def test_server_only_method_from_client_503(opened, healthy):
    r = opened()
    r.send_method(1, "channel.open-ok")
    assert closed_with(r) == COMMAND_INVALID
    healthy()


@pytest.mark.parametrize("class_id,method_id", [(99, 1), (50, 99), (60, 999)],
                         ids=["class", "method", "basic-method"])
def test_unknown_class_or_method(opened, healthy, class_id, method_id):
    # RabbitMQ 3.10 closes the socket at once without a connection.close here; a close with
    # 540 NOT_IMPLEMENTED or 503 COMMAND_INVALID is as good.
    r = opened()
    r.send_frame(amqpraw.FRAME_METHOD, 1, struct.pack(">HH", class_id, method_id))
    assert closed_with(r) in (None, NOT_IMPLEMENTED, COMMAND_INVALID)
    healthy()


# -- before the connection is open -----------------------------------------------------------


def test_garbage_before_header(broker, raw_clients, healthy):
    # The first 8 octets are taken as the header: refused with the server's own header.
    r = broker.raw()
    raw_clients.append(r)
    r.send(b"GARBAGE!" + amqpraw.PROTOCOL_HEADER)
    assert r.recv_exact(8) == amqpraw.PROTOCOL_HEADER
    assert r.wait_eof(5)
    healthy()


def test_unknown_mechanism(broker, raw_clients, healthy):
    # RabbitMQ closes the socket 3 s later without a connection.close (it tells nothing to
    # a peer that has not logged in); a connection.close (e.g. 403, 503) is as good. It
    # must not go on to connection.tune.
    r = broker.raw()
    raw_clients.append(r)
    r.send(amqpraw.PROTOCOL_HEADER)
    r.expect("connection.start", 0)
    r.send_method(0, "connection.start-ok", client_properties={}, mechanism="NO-SUCH-MECH",
                  response=b"\x00guest\x00guest", locale="en_US")
    try:
        m = r.recv_method(8)
    except amqpraw.ConnectionLost:
        m = None
    assert m is None or m.name == "connection.close", m
    healthy()


def test_open_before_start_ok(broker, raw_clients, healthy):
    r = broker.raw()
    raw_clients.append(r)
    r.send(amqpraw.PROTOCOL_HEADER)
    r.expect("connection.start", 0)
    r.send_method(0, "connection.open", virtual_host="/")
    try:
        m = r.recv_method(8)
    except amqpraw.ConnectionLost:
        m = None
    assert m is None or m.name == "connection.close", m
    healthy()


# -- truncation ------------------------------------------------------------------------------


def test_truncated_frame_then_eof(opened, healthy):
    r = opened()
    whole = amqpraw.frame(amqpraw.FRAME_METHOD, 1,
                          amqpraw.method_payload("queue.declare", queue="", exclusive=True))
    r.send(whole[:9])
    r.sock.shutdown(1)  # EOF from the client in the middle of a frame
    assert r.wait_eof(5), "server kept the half-closed connection"
    healthy()


def test_truncated_header_then_eof(broker, raw_clients, healthy):
    r = broker.raw()
    raw_clients.append(r)
    r.send(b"AMQP\x00")
    r.sock.shutdown(1)
    assert r.wait_eof(5)
    healthy()


def test_truncated_frame_waits_for_the_rest(opened):
    # Half a frame is not an error: the server waits; the rest completes it.
    r = opened()
    whole = amqpraw.frame(amqpraw.FRAME_METHOD, 1,
                          amqpraw.method_payload("queue.declare", queue="", exclusive=True))
    r.send(whole[:9])
    with pytest.raises(TimeoutError):
        r.recv_frame(0.5)
    r.send(whole[9:])
    assert r.expect("queue.declare-ok", 1).queue.startswith("amq.gen-")
