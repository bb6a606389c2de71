"""The basic class: publish and consume in order, basic.get, consumer tags, exclusive
consumers, no-ack, basic.cancel from either side, prefetch (per consumer and per channel),
ack / nack / reject / recover and redelivery, mandatory returns, message properties and
bodies, one 10,000-message run and competing consumers."""

import time

import pika
import pika.exceptions
import pika.spec
import pytest

from amqpcompat import (
    ACCESS_REFUSED, NOT_ALLOWED, NO_ROUTE, PRECONDITION_FAILED, queue_count, wait_count,
)
from amqphelpers import (
    Inbox, Msg, assert_channel_closed, channel_error, declare, get_all, get, publish, pump,
    quiet, raw_rpc, send_raw_method, wait_connection_closed,
)


def test_publish_consume_keeps_order(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, [f"m{i}" for i in range(50)])
    inbox = Inbox(ch, q)
    msgs = inbox.wait(50)
    assert inbox.texts() == [f"m{i}" for i in range(50)], "lost, duplicated or reordered"
    assert [m.tag for m in msgs] == list(range(1, 51)), "delivery tags count from 1"
    assert {m.redelivered for m in msgs} == {False}
    assert {(m.method.exchange, m.method.routing_key, m.method.consumer_tag) for m in msgs} \
        == {("", q, inbox.tag)}
    ch.basic_ack(50, multiple=True)
    inbox.quiet()
    assert len(inbox.msgs) == 50, "extra deliveries"
    assert queue_count(ch, q) == 0


def test_basic_get_ok_and_empty(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    assert get(ch, q) is None, "get-empty on an empty queue"
    publish(ch, q, ["a", "b", "c"])
    wait_count(ch, q, 3)
    got = []
    for left in (2, 1, 0):
        m = get(ch, q)
        assert isinstance(m.method, pika.spec.Basic.GetOk)
        assert m.method.message_count == left, "get-ok counts the messages left"
        assert (m.method.exchange, m.method.routing_key, m.redelivered) == ("", q, False)
        got.append(m)
    assert [m.body for m in got] == [b"a", b"b", b"c"]
    assert [m.tag for m in got] == [1, 2, 3]
    assert get(ch, q) is None
    ch.basic_ack(3, multiple=True)
    # auto_ack get: nothing left unacked.
    publish(ch, q, ["d"])
    wait_count(ch, q, 1)
    assert get(ch, q, auto_ack=True).body == b"d"
    ch.close()
    ch = amqp(broker).channel()
    assert queue_count(ch, q) == 0


def test_client_given_consumer_tag(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    inbox = Inbox(ch, q, consumer_tag=f"{uid}-mine", auto_ack=True)
    assert inbox.tag == f"{uid}-mine"
    publish(ch, q, ["x"])
    assert [m.method.consumer_tag for m in inbox.wait(1)] == [f"{uid}-mine"]


def test_server_generated_consumer_tag(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    # pika always fills in a tag itself; the raw basic.consume leaves it empty.
    ok1 = raw_rpc(ch, pika.spec.Basic.Consume(queue=q, consumer_tag="", no_ack=True),
                  [pika.spec.Basic.ConsumeOk])
    ok2 = raw_rpc(ch, pika.spec.Basic.Consume(queue=q, consumer_tag="", no_ack=True),
                  [pika.spec.Basic.ConsumeOk])
    assert ok1.consumer_tag and ok2.consumer_tag, "consume-ok carries the generated tag"
    assert ok1.consumer_tag != ok2.consumer_tag
    seen = []
    for tag in (ok1.consumer_tag, ok2.consumer_tag):
        ch._impl._consumers[tag] = lambda _c, method, _p, body: seen.append(
            (method.consumer_tag, body))
    publish(ch, q, ["1", "2"])
    pump(ch.connection, lambda: len(seen) == 2)
    assert {t for t, _ in seen} <= {ok1.consumer_tag, ok2.consumer_tag}
    cancel = raw_rpc(ch, pika.spec.Basic.Cancel(consumer_tag=ok1.consumer_tag),
                     [pika.spec.Basic.CancelOk])
    assert cancel.consumer_tag == ok1.consumer_tag


def test_duplicate_consumer_tag_on_channel_is_not_allowed(broker, amqp, uid):
    """530 NOT_ALLOWED is a connection exception: the whole connection is closed."""
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    ch.basic_consume(q, lambda *a: None, consumer_tag="dup")
    # The same tag on another channel is fine.
    ch2 = conn.channel()
    assert ch2.basic_consume(q, lambda *a: None, consumer_tag="dup") == "dup"
    # pika refuses a tag it knows of, so the second consume goes out raw.
    send_raw_method(ch, pika.spec.Basic.Consume(queue=q, consumer_tag="dup"))
    wait_connection_closed(conn, NOT_ALLOWED)


def test_exclusive_consumer(broker, amqp, uid):
    c1 = amqp(broker)
    ch1 = c1.channel()
    q = declare(ch1, f"{uid}-q")
    inbox = Inbox(ch1, q, exclusive=True, auto_ack=True)
    ch2 = amqp(broker).channel()
    with channel_error(ACCESS_REFUSED):
        ch2.basic_consume(q, lambda *a: None)
    ch3 = c1.channel()  # also from the same connection
    with channel_error(ACCESS_REFUSED):
        ch3.basic_consume(q, lambda *a: None, exclusive=True)
    publish(ch1, q, ["only"])
    assert inbox.wait(1)[0].body == b"only"
    # Once it is cancelled, others may consume.
    inbox.cancel()
    ch4 = amqp(broker).channel()
    assert ch4.basic_consume(q, lambda *a: None, consumer_tag="next") == "next"


def test_exclusive_consume_refused_while_another_consumer_exists(broker, amqp, uid):
    ch1 = amqp(broker).channel()
    q = declare(ch1, f"{uid}-q")
    ch1.basic_consume(q, lambda *a: None)
    ch2 = amqp(broker).channel()
    with channel_error(ACCESS_REFUSED):
        ch2.basic_consume(q, lambda *a: None, exclusive=True)


def test_no_ack_consume(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, [str(i) for i in range(5)])
    inbox = Inbox(ch, q, auto_ack=True)
    assert inbox.wait(5) and inbox.texts() == [str(i) for i in range(5)]
    ch.close()
    # Nothing was left unacked: nothing comes back when the channel closes.
    assert queue_count(amqp(broker).channel(), q) == 0


def test_basic_cancel_stops_deliveries(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    inbox = Inbox(ch, q, auto_ack=True)
    publish(ch, q, ["before"])
    inbox.wait(1)
    # BlockingChannel.basic_cancel waits for cancel-ok.
    ch.basic_cancel(inbox.tag)
    publish(ch, q, ["after1", "after2"])
    wait_count(ch, q, 2)
    assert inbox.quiet() and inbox.texts() == ["before"]
    # Cancelling an unknown tag is not an error (cancel-ok).
    cancel = raw_rpc(ch, pika.spec.Basic.Cancel(consumer_tag=f"{uid}-nope"),
                     [pika.spec.Basic.CancelOk])
    assert cancel.consumer_tag == f"{uid}-nope"


def test_server_cancels_consumer_when_queue_deleted(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    cancels = []
    ch.add_on_cancel_callback(lambda frame: cancels.append(frame.method))
    inbox = Inbox(ch, q, auto_ack=True)
    other = amqp(broker).channel()
    other.queue_delete(q)
    pump(conn, lambda: cancels, what="basic.cancel from the server")
    assert isinstance(cancels[0], pika.spec.Basic.Cancel)
    assert cancels[0].consumer_tag == inbox.tag
    # The channel itself stays open.
    assert ch.is_open
    q2 = declare(ch, f"{uid}-q2")
    assert queue_count(ch, q2) == 0


def test_prefetch_count_per_consumer(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, [str(i) for i in range(10)])
    wait_count(ch, q, 10)
    ch.basic_qos(prefetch_count=3)
    inbox = Inbox(ch, q)
    inbox.wait(3)
    assert len(inbox.quiet()) == 3, "only prefetch_count unacked deliveries"
    ch.basic_ack(inbox.msgs[0].tag)
    inbox.wait(4)
    assert len(inbox.quiet()) == 4, "one ack lets exactly one more through"
    ch.basic_ack(inbox.msgs[3].tag, multiple=True)
    inbox.wait(7)
    assert len(inbox.quiet()) == 7
    assert inbox.texts() == [str(i) for i in range(7)]


def test_prefetch_count_applies_to_each_consumer(broker, amqp, uid):
    ch = amqp(broker).channel()
    qa, qb = declare(ch, f"{uid}-a"), declare(ch, f"{uid}-b")
    for q in (qa, qb):
        publish(ch, q, [str(i) for i in range(10)])
        wait_count(ch, q, 10)
    ch.basic_qos(prefetch_count=3)
    a, b = Inbox(ch, qa), Inbox(ch, qb)
    a.wait(3)
    b.wait(3)
    quiet(ch.connection)
    assert (len(a.msgs), len(b.msgs)) == (3, 3)


def test_prefetch_count_global_is_per_channel(broker, amqp, uid):
    """RabbitMQ reinterprets global=true as a limit shared by all consumers of the channel
    (the specification says per connection)."""
    ch = amqp(broker).channel()
    qa, qb = declare(ch, f"{uid}-a"), declare(ch, f"{uid}-b")
    for q in (qa, qb):
        publish(ch, q, [str(i) for i in range(10)])
        wait_count(ch, q, 10)
    ch.basic_qos(prefetch_count=3, global_qos=True)
    a, b = Inbox(ch, qa), Inbox(ch, qb)
    pump(ch.connection, lambda: len(a.msgs) + len(b.msgs) >= 3)
    quiet(ch.connection)
    assert len(a.msgs) + len(b.msgs) == 3, "the channel-wide limit is shared"
    # Another channel of the same connection has its own (no) limit.
    ch2 = ch.connection.channel()
    qc = declare(ch2, f"{uid}-c")
    publish(ch2, qc, [str(i) for i in range(5)])
    c = Inbox(ch2, qc)
    c.wait(5)
    ch.basic_ack(0, multiple=True)  # all three: three more may come
    pump(ch.connection, lambda: len(a.msgs) + len(b.msgs) >= 6)
    quiet(ch.connection)
    assert len(a.msgs) + len(b.msgs) == 6


def test_ack_removes_messages(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, [str(i) for i in range(6)])
    inbox = Inbox(ch, q)
    msgs = inbox.wait(6)
    ch.basic_ack(msgs[0].tag)  # single
    ch.basic_ack(msgs[3].tag, multiple=True)  # every tag up to the 4th: "1", "2", "3"
    ch.close()  # the last two are unacked and come back
    ch2 = conn.channel()
    left = get_all(ch2, q)
    assert [m.text for m in left] == ["4", "5"]
    assert {m.redelivered for m in left} == {True}


def test_nack_multiple_requeue_redelivers(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, [str(i) for i in range(5)])
    inbox = Inbox(ch, q)
    msgs = inbox.wait(5)
    ch.basic_nack(msgs[2].tag, multiple=True, requeue=True)
    again = inbox.wait(8)[5:]
    assert sorted(m.text for m in again) == ["0", "1", "2"], "the nacked ones come back"
    assert [m.text for m in again] == ["0", "1", "2"], "requeued in their original order"
    assert {m.redelivered for m in again} == {True}
    assert {m.redelivered for m in msgs} == {False}
    assert len({m.tag for m in inbox.msgs}) == 8, "a redelivery gets a new delivery tag"
    ch.basic_ack(0, multiple=True)
    assert len(inbox.quiet()) == 8


def test_reject_without_requeue_drops(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["gone", "kept"])
    wait_count(ch, q, 2)
    m = get(ch, q)
    ch.basic_reject(m.tag, requeue=False)
    ch.close()
    ch = amqp(broker).channel()
    assert [x.text for x in get_all(ch, q)] == ["kept"]


def test_reject_requeue_goes_back_to_head(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["first", "second", "third"])
    wait_count(ch, q, 3)
    m = get(ch, q)
    assert (m.text, m.redelivered) == ("first", False)
    ch.basic_reject(m.tag, requeue=True)
    again = get(ch, q, auto_ack=True)
    assert (again.text, again.redelivered) == ("first", True), "requeued before newer ones"
    rest = get_all(ch, q)
    assert [(x.text, x.redelivered) for x in rest] == [("second", False), ("third", False)]


@pytest.mark.parametrize("how", ["reject", "nack"])
def test_requeued_one_at_a_time_return_to_their_places(broker, amqp, uid, how):
    """Messages requeued one at a time, in any order, go back to where they were in the queue
    (ordered by original position, ahead of the messages published after them), not each in
    front of the previous one (RabbitMQ classic queues)."""
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, [str(i) for i in range(1, 11)])
    wait_count(ch, q, 10)
    got = [get(ch, q) for _ in range(5)]
    assert [m.text for m in got] == ["1", "2", "3", "4", "5"]
    for i in (3, 1, 2):  # one at a time, out of order
        if how == "reject":
            ch.basic_reject(got[i - 1].tag, requeue=True)
        else:
            ch.basic_nack(got[i - 1].tag, multiple=False, requeue=True)
    ch.basic_nack(got[4].tag, multiple=True, requeue=True)  # the rest: 4 and 5
    left = get_all(ch, q)
    assert [(m.text, m.redelivered) for m in left] == \
        [(str(i), True) for i in range(1, 6)] + [(str(i), False) for i in range(6, 11)]


def test_rejected_one_at_a_time_consumed_again_in_order(broker, amqp, uid):
    """Delivered 1..5 to a consumer (prefetch 5) that is then cancelled; 1, 2, 3 rejected one
    at a time with requeue; a new consumer gets 1, 2, 3 in that order (4 and 5 are still
    unacked on the channel)."""
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, [str(i) for i in range(1, 6)])
    ch.basic_qos(prefetch_count=5)
    first = Inbox(ch, q)
    msgs = first.wait(5)
    assert [m.text for m in msgs] == ["1", "2", "3", "4", "5"]
    first.cancel()
    for m in msgs[:3]:
        ch.basic_reject(m.tag, requeue=True)
    second = Inbox(ch, q)
    second.wait(3)
    assert [(m.text, m.redelivered) for m in second.quiet()] == \
        [("1", True), ("2", True), ("3", True)]
    ch.basic_ack(0, multiple=True)


def test_rejected_one_at_a_time_while_consuming(broker, amqp, uid):
    """The consumer stays: 1, 2, 3 rejected one at a time come back to it in that order,
    before 6 and 7, which were waiting behind them in the queue."""
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, [str(i) for i in range(1, 8)])
    wait_count(ch, q, 7)
    ch.basic_qos(prefetch_count=5)
    inbox = Inbox(ch, q)
    msgs = inbox.wait(5)
    for m in msgs[:3]:
        ch.basic_reject(m.tag, requeue=True)
    inbox.wait(8)
    assert [(m.text, m.redelivered) for m in inbox.quiet()[5:]] == \
        [("1", True), ("2", True), ("3", True)]
    ch.basic_ack(0, multiple=True)
    assert [m.text for m in inbox.wait(10)[8:]] == ["6", "7"]


@pytest.mark.parametrize("closing", ["channel", "connection"])
def test_unacked_requeued_on_close(broker, amqp, uid, closing):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["a", "b", "c", "d"])
    inbox = Inbox(ch, q)
    inbox.wait(4)
    ch.basic_ack(inbox.msgs[1].tag)  # "b" is done
    if closing == "channel":
        ch.close()
    else:
        conn.close()
    ch2 = amqp(broker).channel()
    left = get_all(ch2, q)
    assert [(m.text, m.redelivered) for m in left] == [("a", True), ("c", True), ("d", True)]


def test_basic_recover_requeue(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["a", "b", "c"])
    inbox = Inbox(ch, q)
    inbox.wait(3)
    ch.basic_ack(inbox.msgs[0].tag)
    ch.basic_recover(requeue=True)
    again = inbox.wait(5)[3:]
    assert [(m.text, m.redelivered) for m in again] == [("b", True), ("c", True)]
    ch.basic_ack(0, multiple=True)
    assert len(inbox.quiet()) == 5


def test_double_ack_is_precondition_failed(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["x"])
    wait_count(ch, q, 1)
    m = get(ch, q)
    ch.basic_ack(m.tag)
    ch.basic_ack(m.tag)
    assert_channel_closed(ch, PRECONDITION_FAILED)


def test_ack_of_unknown_tag_is_precondition_failed(broker, amqp, uid):
    ch = amqp(broker).channel()
    ch.basic_ack(99)
    assert_channel_closed(ch, PRECONDITION_FAILED)


def test_mandatory_unroutable_is_returned(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    returns = []
    ch.add_on_return_callback(lambda _c, method, props, body: returns.append(
        Msg(method, props, body)))
    ch.basic_publish("amq.direct", f"{uid}-none", b"dropped")  # not mandatory: dropped
    ch.basic_publish("amq.direct", f"{uid}-none", b"back", mandatory=True,
                     properties=pika.BasicProperties(message_id="m1"))
    pump(conn, lambda: returns, what="basic.return")
    quiet(conn)
    assert len(returns) == 1, "only the mandatory publish comes back"
    r = returns[0]
    assert isinstance(r.method, pika.spec.Basic.Return)
    assert (r.method.reply_code, r.method.reply_text) == (NO_ROUTE, "NO_ROUTE")
    assert (r.method.exchange, r.method.routing_key) == ("amq.direct", f"{uid}-none")
    assert (r.body, r.props.message_id) == (b"back", "m1")
    # A routable mandatory publish is not returned.
    q = declare(ch, f"{uid}-q")
    ch.basic_publish("", q, b"ok", mandatory=True)
    wait_count(ch, q, 1)
    quiet(conn)
    assert len(returns) == 1


HEADERS = {
    "str": "text é",
    "int": 42,
    "neg": -7,
    "long": 2**40,
    "true": True,
    "false": False,
    "bytes": b"\x00\xffraw",
    "nested": {"a": 1, "b": "x", "deeper": {"c": [1, 2]}},
    "array": [1, "two", True, {"k": "v"}, [3, 4]],
    "empty-table": {},
    "empty-array": [],
}


def test_message_properties_round_trip(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="gzip",
        headers=HEADERS,
        delivery_mode=2,
        priority=7,
        correlation_id=f"{uid}-corr",
        reply_to=f"{uid}-reply",
        message_id=f"{uid}-id",
        timestamp=1_700_000_000,
        type="order.created",
        user_id="guest",
        app_id="compat-tests",
    )
    ch.basic_publish("", q, b"{}", properties=props)
    inbox = Inbox(ch, q, auto_ack=True)
    got = inbox.wait(1)[0].props
    for name in ("content_type", "content_encoding", "delivery_mode", "priority",
                 "correlation_id", "reply_to", "message_id", "timestamp", "type", "user_id",
                 "app_id"):
        assert getattr(got, name) == getattr(props, name), name
    assert got.expiration is None
    assert got.cluster_id is None
    assert got.headers == HEADERS
    # A message with no properties at all arrives with none.
    ch.basic_publish("", q, b"bare")
    bare = inbox.wait(2)[1].props
    assert (bare.headers, bare.content_type, bare.delivery_mode, bare.message_id) == \
        (None, None, None, None)


def test_user_id_must_match_the_connection_user(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    ch.basic_publish("", q, b"x", properties=pika.BasicProperties(user_id="mallory"))
    assert_channel_closed(ch, PRECONDITION_FAILED)
    assert queue_count(amqp(broker).channel(), q) == 0, "the message was not enqueued"


@pytest.mark.parametrize("size", [0, 1, 131_072, 1 << 20])
def test_body_sizes(broker, amqp, uid, size):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    body = bytes((i * 7 + 3) % 256 for i in range(size))
    ch.basic_publish("", q, body)
    ch.basic_publish("", q, b"next")
    inbox = Inbox(ch, q, auto_ack=True)
    msgs = inbox.wait(2)
    assert len(msgs[0].body) == size
    assert msgs[0].body == body
    assert msgs[1].body == b"next", "the body ends where its header said"


def test_ten_thousand_messages_through_one_queue(broker, amqp, uid):
    n = 10_000
    pub_conn = amqp(broker)
    pch = pub_conn.channel()
    q = declare(pch, f"{uid}-q")
    cch = amqp(broker).channel()
    cch.basic_qos(prefetch_count=500)
    got = []

    def on_msg(ch, method, _props, body):
        got.append(body)
        if method.delivery_tag % 100 == 0:
            ch.basic_ack(method.delivery_tag, multiple=True)

    cch.basic_consume(q, on_msg)
    for i in range(n):
        pch.basic_publish("", q, b"%d" % i)
        if i % 1000 == 999:
            cch.connection.process_data_events(time_limit=0)
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        cch.connection.process_data_events(time_limit=0.05)
    assert len(got) == n, f"{len(got)} of {n} arrived"
    assert got == [b"%d" % i for i in range(n)], "order not kept"
    cch.basic_ack(0, multiple=True)
    quiet(cch.connection, 0.3)
    assert len(got) == n, "duplicates"
    assert queue_count(pch, q) == 0


def test_competing_consumers_share_the_messages(broker, amqp, uid):
    n = 100
    c1, c2 = amqp(broker), amqp(broker)
    ch1, ch2 = c1.channel(), c2.channel()
    q = declare(ch1, f"{uid}-q")
    ch1.basic_qos(prefetch_count=5)
    ch2.basic_qos(prefetch_count=5)
    got = {1: [], 2: []}

    def consumer(k):
        def on_msg(ch, method, _props, body):
            got[k].append(body)
            ch.basic_ack(method.delivery_tag)
        return on_msg

    ch1.basic_consume(q, consumer(1))
    ch2.basic_consume(q, consumer(2))
    pch = amqp(broker).channel()
    publish(pch, q, [b"%d" % i for i in range(n)])
    pump([c1, c2], lambda: len(got[1]) + len(got[2]) >= n, what=f"{n} deliveries")
    quiet([c1, c2])
    assert got[1] and got[2], "each consumer gets some"
    every = got[1] + got[2]
    assert len(every) == n, "no duplicates"
    assert set(every) == {b"%d" % i for i in range(n)}
    for k in (1, 2):  # each consumer sees its share in queue order
        assert got[k] == sorted(got[k], key=int)
