"""Connection set-up and life: protocol header negotiation, PLAIN and AMQPLAIN logins,
refusals (403 on a bad password, 530 on a vhost), the capabilities in connection.start,
tune negotiation (a lower client frame_max), heartbeats, clean close, update-secret, and users,
vhosts and permissions (Tributary's config file; rabbitmqctl on RabbitMQ)."""

from __future__ import annotations

import time

import pika
import pika.exceptions
import pytest

import amqpraw
from amqpcompat import ACCESS_REFUSED, NOT_ALLOWED, Broker, get_message, queue_count, wait_count
from conftest import tributary_credentials

CAPABILITIES = [
    "publisher_confirms", "exchange_exchange_bindings", "basic.nack",
    "consumer_cancel_notify", "per_consumer_qos", "authentication_failure_close",
]


def _roundtrip(conn: pika.BlockingConnection, uid: str, body: bytes = b"ping") -> bytes:
    ch = conn.channel()
    q = ch.queue_declare(f"{uid}-rt", auto_delete=True).method.queue
    ch.basic_publish("", q, body)
    got = get_message(ch, q)[2]
    ch.queue_delete(q)
    ch.close()
    return got


# -- protocol header -------------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    b"AMQP\x00\x00\x09\x00",  # 0-9-0
    b"AMQP\x00\x00\x0a\x00",  # a future 0-10
    b"AMQP\x00\x01\x00\x00",  # AMQP 1.0 (protocol id 0)
    b"HTTP/1.1",              # not AMQP at all
], ids=["0-9-0", "0-10", "1.0", "http"])
def test_unsupported_header_answered_with_0_9_1_header(broker, raw_clients, header):
    r = broker.raw()
    raw_clients.append(r)
    r.send(header)
    assert r.recv_exact(8) == amqpraw.PROTOCOL_HEADER
    assert r.wait_eof(5), "server kept the connection open after refusing the header"


@pytest.mark.differs("rabbitmq", "RabbitMQ still speaks AMQP 0-9 and 0-8 and answers their "
                     "headers (AMQP 1 1 0 9, AMQP 1 1 8 0) with a connection.start of that "
                     "version")
@pytest.mark.parametrize("header", [b"AMQP\x01\x01\x00\x09", b"AMQP\x01\x01\x08\x00"],
                         ids=["0-9", "0-8"])
def test_old_protocol_header_answered_with_0_9_1_header(broker, raw_clients, header):
    r = broker.raw()
    raw_clients.append(r)
    r.send(header)
    assert r.recv_exact(8) == amqpraw.PROTOCOL_HEADER
    assert r.wait_eof(5)


def test_connection_start_fields(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    r.send(amqpraw.PROTOCOL_HEADER)
    start = r.expect("connection.start", 0)
    assert (start.version_major, start.version_minor) == (0, 9)
    assert set(start.mechanisms.split()) >= {b"PLAIN", b"AMQPLAIN"}
    assert b"en_US" in start.locales.split()
    caps = start.server_properties.get("capabilities")
    assert isinstance(caps, dict), start.server_properties
    for cap in CAPABILITIES:
        assert caps.get(cap) is True, f"capability {cap} missing or false: {caps}"
    assert isinstance(start.server_properties.get("product"), str)


# -- logins ----------------------------------------------------------------------------------


def test_plain_login(broker, amqp, uid):
    conn = amqp(broker)
    assert conn.is_open
    assert _roundtrip(conn, uid) == b"ping"


def test_amqplain_login(broker, raw_clients, uid):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake(mechanism="AMQPLAIN")
    r.open_channel(1)
    r.send_method(1, "queue.declare", queue=f"{uid}-amqplain", auto_delete=True)
    ok = r.expect("queue.declare-ok", 1)
    assert ok.queue == f"{uid}-amqplain"
    r.publish(1, "", ok.queue, b"via amqplain")
    r.send_method(1, "basic.get", queue=ok.queue, no_ack=True)
    deadline = time.monotonic() + 10
    while True:
        m = r.recv_method()
        if m.name == "basic.get-ok":
            break
        assert m.name == "basic.get-empty", m
        assert time.monotonic() < deadline, "published message never came back"
        r.send_method(1, "basic.get", queue=ok.queue, no_ack=True)
    header = r.recv_frame()
    body = r.recv_frame()
    assert header.type == amqpraw.FRAME_HEADER and body.type == amqpraw.FRAME_BODY
    assert body.payload == b"via amqplain"
    assert r.close_connection().name == "connection.close-ok"


@pytest.mark.parametrize("mechanism", ["PLAIN", "AMQPLAIN"])
def test_bad_password_refused_403(broker, raw_clients, mechanism):
    r = broker.raw()
    raw_clients.append(r)
    with pytest.raises(amqpraw.ServerClosed) as e:
        r.handshake(password="not-the-password", mechanism=mechanism)
    # authentication_failure_close (announced by the client too): a connection.close with
    # ACCESS_REFUSED before tune instead of a bare socket close.
    assert e.value.reply_code == ACCESS_REFUSED
    assert r.tune is None


def test_bad_password_pika(broker):
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        broker.connect(password="wrong")


def test_unknown_user_refused_403(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    with pytest.raises(amqpraw.ServerClosed) as e:
        r.handshake(user="nobody-here", password="x")
    assert e.value.reply_code == ACCESS_REFUSED


def test_unknown_vhost_refused_530(broker, raw_clients, amqp, uid):
    r = broker.raw()
    raw_clients.append(r)
    with pytest.raises(amqpraw.ServerClosed) as e:
        r.handshake(vhost=f"/{uid}-no-such-vhost")
    assert e.value.reply_code == NOT_ALLOWED
    m = e.value.method.args
    assert (m["class_id"], m["method_id"]) == (10, 40)  # failed method: connection.open
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        broker.connect(virtual_host=f"{uid}-nope")
    assert _roundtrip(amqp(broker), uid) == b"ping"


# -- tune ------------------------------------------------------------------------------------


def test_tune_proposal(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake()
    assert (r.tune.channel_max, r.tune.frame_max, r.tune.heartbeat) == (2047, 131072, 60)


def test_lower_client_frame_max_pika(broker, amqp, uid):
    conn = amqp(broker, frame_max=8192)
    assert conn._impl.params.frame_max == 8192  # what pika negotiated
    body = bytes(range(256)) * 80  # 20 KiB: three body frames each way
    assert _roundtrip(conn, uid, body) == body


def test_lower_client_frame_max_server_splits(broker, raw_clients, uid):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake(frame_max=8192)
    r.open_channel(1)
    q = f"{uid}-fm"
    r.send_method(1, "queue.declare", queue=q, auto_delete=True)
    r.expect("queue.declare-ok", 1)
    body = b"0123456789abcdef" * 1280  # 20 KiB
    r.publish(1, "", q, body)  # sent in frames of at most 8192 octets
    deadline = time.monotonic() + 10
    while True:
        r.send_method(1, "basic.get", queue=q, no_ack=True)
        m = r.recv_method()
        if m.name == "basic.get-ok":
            break
        assert time.monotonic() < deadline, "published message never came back"
    header = r.recv_frame()
    assert header.type == amqpraw.FRAME_HEADER
    got = b""
    sizes = []
    while len(got) < len(body):
        f = r.recv_frame()
        assert f.type == amqpraw.FRAME_BODY, f
        sizes.append(len(f.payload) + 8)
        got += f.payload
    assert got == body
    assert max(sizes) <= 8192, f"server sent frames larger than the client's frame_max: {sizes}"
    assert len(sizes) >= 3


def test_frame_max_below_minimum_refused(broker, raw_clients, amqp, uid):
    # tune-ok with frame_max 1000 (< 4096, the spec's minimum): the server does not open.
    # RabbitMQ closes the socket without a connection.close (it stays silent to peers that
    # are not yet open, after a 3 s delay); a connection.close would do as well.
    r = broker.raw()
    raw_clients.append(r)
    r.send(amqpraw.PROTOCOL_HEADER)
    r.expect("connection.start", 0)
    r.send_method(0, "connection.start-ok", client_properties={}, mechanism="PLAIN",
                  response=b"\x00guest\x00guest", locale="en_US")
    r.expect("connection.tune", 0)
    r.send_method(0, "connection.tune-ok", channel_max=2047, frame_max=1000, heartbeat=0)
    closing = r.read_until_close(8)
    assert closing is None or closing.reply_code in (501, 530), closing
    assert _roundtrip(amqp(broker), uid) == b"ping"


# -- heartbeats ------------------------------------------------------------------------------


def test_silent_client_disconnected_after_two_heartbeats(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake(heartbeat=1)
    t0 = time.monotonic()
    heartbeats = 0
    closed = None
    while time.monotonic() - t0 < 8:
        try:
            f = r.recv_frame(8)
        except amqpraw.ConnectionLost:
            closed = time.monotonic() - t0
            break
        if f.type == amqpraw.FRAME_HEARTBEAT:
            heartbeats += 1
        elif f.type == amqpraw.FRAME_METHOD:
            m = amqpraw.decode_method(f)
            assert m.name == "connection.close", m
            closed = time.monotonic() - t0
            break
    assert closed is not None, "server kept a silent client with heartbeat 1 s for 8 s"
    assert 1.5 <= closed <= 5.0, f"closed after {closed:.1f}s (heartbeat 1 s)"
    assert heartbeats >= 1, "server sent no heartbeat with a 1 s interval"


def test_heartbeating_client_kept(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake(heartbeat=1)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.5:
        r.send_heartbeat()
        try:
            r.recv_frame(0.4)
        except TimeoutError:
            pass
    r.open_channel(1)  # still open and answering
    assert r.close_connection().name == "connection.close-ok"


def test_pika_heartbeat_connection_stays_alive(broker, amqp, uid):
    conn = amqp(broker, heartbeat=1)
    assert conn._impl.params.heartbeat == 1
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.5:  # pika answers heartbeats while it processes events
        conn.process_data_events(time_limit=0.2)
    assert conn.is_open
    assert _roundtrip(conn, uid) == b"ping"


def test_no_heartbeat_when_client_disables(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake(heartbeat=0)
    with pytest.raises(TimeoutError):
        r.recv_frame(1.5)  # neither heartbeats nor a close
    r.open_channel(1)


# -- close -----------------------------------------------------------------------------------


def test_clean_close(broker, raw_clients):
    r = broker.raw()
    raw_clients.append(r)
    r.handshake()
    r.open_channel(1)
    r.open_channel(2)
    assert r.close_connection().name == "connection.close-ok"
    # The client closes the socket after close-ok (RabbitMQ waits for it); the server sends
    # nothing more.
    try:
        extra = r.recv_frame(0.5)
    except (TimeoutError, amqpraw.ConnectionLost):
        extra = None
    assert extra is None, f"frame after close-ok: {extra}"


def test_pika_close_then_reconnect(broker, uid):
    conn = broker.connect()
    conn.channel().queue_declare(f"{uid}-q", auto_delete=True)
    conn.close()
    assert conn.is_closed
    conn2 = broker.connect()
    try:
        assert _roundtrip(conn2, uid) == b"ping"
    finally:
        conn2.close()


# -- update-secret ---------------------------------------------------------------------------


def test_update_secret_pika(broker, uid):
    """connection.update-secret (a client refreshing an expiring credential) is answered with
    update-secret-ok; the connection and its channels keep working."""
    conn = broker.connect()
    try:
        ch = conn.channel()
        q = ch.queue_declare(f"{uid}-q", auto_delete=True).method.queue
        conn.update_secret("guest", "rotated")  # blocks until update-secret-ok
        assert conn.is_open and ch.is_open
        ch.basic_publish("", q, b"after")
        assert get_message(ch, q)[2] == b"after"
        assert _roundtrip(conn, uid) == b"ping"
    finally:
        if conn.is_open:
            conn.close()


def test_update_secret_raw(broker, raw_clients):
    """The exact answer on channel 0 is update-secret-ok (10, 71). RabbitMQ's internal user
    backend keeps nothing to refresh and takes any new secret (the password was checked
    when the connection opened): so does Tributary. Then a second one, and the channel
    opened before still works."""
    r = broker.raw()
    raw_clients.append(r)
    r.handshake()
    r.open_channel(1)
    r.send_method(0, "connection.update-secret", new_secret=b"guest", reason="token refresh")
    ok = r.expect("connection.update-secret-ok", 0)
    assert (ok.class_id, ok.method_id) == (10, 71)
    r.send_method(0, "connection.update-secret", new_secret=b"another-token", reason="again")
    r.expect("connection.update-secret-ok", 0)
    r.send_method(1, "queue.declare", exclusive=True)
    assert r.expect("queue.declare-ok", 1).queue
    assert r.close_connection().name == "connection.close-ok"


# -- users, vhosts, permissions --------------------------------------------------------------

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


@pytest.fixture(scope="module", params=["tributary", "rabbitmq"])
def users_broker(request) -> Broker:
    """A broker with users alice (vhost "other" only) and bob (no vhost), vhosts "/" and
    "other": Tributary from its config file, RabbitMQ through rabbitmqctl."""
    if request.param == "tributary":
        make = request.getfixturevalue("make_module_tributary")
        config = "\n".join([
            'amqp_vhosts = ["/", "other"]',
            *(f'[[users]]\nname = "{u}"\n{tributary_credentials(p)}'
              for u, p in PASSWORDS.items()),
            '[[amqp_permissions]]\nuser = "alice"\nvhost = "other"',
        ]) + "\n"
        return make(config=config).broker()
    rabbit = request.getfixturevalue("rabbitmq_server")
    rabbit.ctl("add_vhost", "other", check=False)  # exists when the module runs twice
    for user, password in PASSWORDS.items():
        rabbit.ctl("add_user", user, password, check=False)
    rabbit.ctl("set_permissions", "-p", "other", "alice", ".*", ".*", ".*")
    return rabbit.broker()


def test_user_on_permitted_vhost(users_broker, amqp, uid):
    conn = amqp(users_broker, user="alice", password="alice-pw", virtual_host="other")
    assert _roundtrip(conn, uid) == b"ping"


def test_user_amqplain_on_permitted_vhost(users_broker, raw_clients):
    r = users_broker.raw()
    raw_clients.append(r)
    r.handshake(user="alice", password="alice-pw", vhost="other", mechanism="AMQPLAIN")
    r.open_channel(1)


def test_user_wrong_password(users_broker, raw_clients):
    r = users_broker.raw()
    raw_clients.append(r)
    with pytest.raises(amqpraw.ServerClosed) as e:
        r.handshake(user="alice", password="bob-pw", vhost="other")
    assert e.value.reply_code == ACCESS_REFUSED


@pytest.mark.parametrize("user,vhost", [("alice", "/"), ("bob", "other"), ("bob", "/"),
                                        ("guest", "other")])
def test_vhost_not_permitted_530(users_broker, raw_clients, user, vhost):
    r = users_broker.raw()
    raw_clients.append(r)
    password = PASSWORDS.get(user, "guest")
    with pytest.raises(amqpraw.ServerClosed) as e:
        r.handshake(user=user, password=password, vhost=vhost)
    assert e.value.reply_code == NOT_ALLOWED, e.value.method


def test_vhosts_are_separate(users_broker, amqp, uid):
    # The same queue name in two vhosts: two queues.
    guest = amqp(users_broker).channel()
    alice = amqp(users_broker, user="alice", password="alice-pw",
                 virtual_host="other").channel()
    q = f"{uid}-vh"
    guest.queue_declare(q, auto_delete=False)
    alice.queue_declare(q, auto_delete=False)
    guest.basic_publish("", q, b"for /")
    wait_count(guest, q, 1)
    assert queue_count(alice, q) == 0, "a message published in / arrived in vhost other"
    assert get_message(guest, q)[2] == b"for /"
    guest.queue_delete(q)
    alice.queue_delete(q)
