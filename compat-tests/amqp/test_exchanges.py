"""Exchanges: the default exchange, the predeclared amq.* ones, user exchanges of each type,
topic patterns, headers matching, passive/durable/auto-delete declares, internal exchanges,
delete if-unused, exchange-to-exchange bindings, and unroutable messages.

Publishing channels use publisher confirms: once basic_publish returns, the broker has routed
the message to every queue it goes to, so reading the queues dry (basic.get until get-empty)
shows exactly what was routed, with no waiting for what must not arrive."""

from __future__ import annotations

import pika
import pika.exceptions
import pytest

from amqpcompat import ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED, get_message


@pytest.fixture
def ch(broker, amqp):
    """A channel in confirm mode."""
    c = amqp(broker).channel()
    c.confirm_delivery()
    return c


def bound_queue(ch, exchange: str, key: str = "", arguments: dict | None = None) -> str:
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, exchange, key, arguments=arguments)
    return q


def publish(ch, exchange: str, key: str, body: bytes | str, headers: dict | None = None):
    body = body.encode() if isinstance(body, str) else body
    props = pika.BasicProperties(headers=headers) if headers is not None else None
    ch.basic_publish(exchange, key, body, props)


def take_all(ch, q: str) -> list[str]:
    """Every message in `q` now (the publishes were confirmed), in queue order."""
    out = []
    while True:
        method, _props, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            return out
        out.append(body.decode())


# -- default and predeclared exchanges -------------------------------------------------------


def test_default_exchange_routes_by_queue_name(ch, uid):
    q1 = ch.queue_declare(f"{uid}-a", exclusive=True).method.queue
    q2 = ch.queue_declare(f"{uid}-b", exclusive=True).method.queue
    publish(ch, "", q1, "to a")
    publish(ch, "", q2, "to b")
    publish(ch, "", f"{uid}-nobody", "dropped")
    assert take_all(ch, q1) == ["to a"]
    assert take_all(ch, q2) == ["to b"]


@pytest.mark.parametrize("name,xtype", [
    ("amq.direct", "direct"), ("amq.fanout", "fanout"), ("amq.topic", "topic"),
    ("amq.headers", "headers"), ("amq.match", "headers"),
])
def test_predeclared_exchanges(ch, name, xtype):
    ch.exchange_declare(name, passive=True)
    # an equivalent active declare (durable, same type) of a predeclared exchange is allowed
    ch.exchange_declare(name, xtype, durable=True)


def test_amq_direct(ch, uid):
    q1 = bound_queue(ch, "amq.direct", f"{uid}.k1")
    q2 = bound_queue(ch, "amq.direct", f"{uid}.k2")
    ch.queue_bind(q2, "amq.direct", f"{uid}.k1")  # a queue may have several keys
    publish(ch, "amq.direct", f"{uid}.k1", "one")
    publish(ch, "amq.direct", f"{uid}.k2", "two")
    publish(ch, "amq.direct", f"{uid}.k3", "three")
    assert take_all(ch, q1) == ["one"]
    assert take_all(ch, q2) == ["one", "two"]


def test_amq_fanout(broker, amqp, uid):
    # amq.fanout is shared by the whole session: only this test's bodies are counted.
    c = amqp(broker).channel()
    c.confirm_delivery()
    q1 = bound_queue(c, "amq.fanout", "ignored")
    q2 = bound_queue(c, "amq.fanout")
    publish(c, "amq.fanout", "any-key", f"{uid}-1")
    publish(c, "amq.fanout", "", f"{uid}-2")
    for q in (q1, q2):
        mine = [b for b in take_all(c, q) if b.startswith(uid)]
        assert mine == [f"{uid}-1", f"{uid}-2"]


def test_amq_topic(ch, uid):
    q = bound_queue(ch, "amq.topic", f"{uid}.*.red")
    publish(ch, "amq.topic", f"{uid}.car.red", "yes")
    publish(ch, "amq.topic", f"{uid}.car.blue", "no")
    publish(ch, "amq.topic", f"{uid}.big.car.red", "no2")
    assert take_all(ch, q) == ["yes"]


ALL_KEYS = ["", "a", "a.b", "a.b.c", "a.x.y.b", "x.a.b", "a.", "a..c", "ab", "b"]
TOPIC_CASES = {
    # pattern: the routing keys out of ALL_KEYS it matches
    "a.b": ["a.b"],
    "*": ["a", "ab", "b"],  # one word; "" is zero words
    "a.*": ["a.b", "a."],
    "*.b": ["a.b"],
    "#": ALL_KEYS,
    "a.#": ["a", "a.b", "a.b.c", "a.x.y.b", "a.", "a..c"],  # '#' matches zero words too
    "#.b": ["a.b", "a.x.y.b", "x.a.b", "b"],
    "a.#.b": ["a.b", "a.x.y.b"],
    "a.*.c": ["a.b.c", "a..c"],  # an empty word is a word
    "*.*": ["a.b", "a."],
    "#.#": ALL_KEYS,
    "*.#": ALL_KEYS[1:],
}


def test_topic_patterns(ch, uid):
    x = f"{uid}-topic"
    ch.exchange_declare(x, "topic", auto_delete=True)
    queues = {p: bound_queue(ch, x, p) for p in TOPIC_CASES}
    for k in ALL_KEYS:
        publish(ch, x, k, k or "<empty>")
    wrong = {}
    for p, q in queues.items():
        want = [k or "<empty>" for k in TOPIC_CASES[p]]
        got = take_all(ch, q)
        if sorted(got) != sorted(want):
            wrong[p] = {"want": want, "got": got}
    assert not wrong, wrong


HEADER_BINDINGS = {
    "all": {"x-match": "all", "color": "red", "size": "big"},
    "any": {"x-match": "any", "color": "red", "size": "big"},
    "default-all": {"color": "red", "size": "big"},  # no x-match: all
    "int": {"x-match": "all", "n": 1},
    "bool": {"x-match": "all", "flag": True},
    "str-1": {"x-match": "all", "n": "1"},
    "x-ignored": {"x-match": "all", "x-custom": "zzz"},  # x- arguments are not matched
}
HEADER_MESSAGES = {
    "both": {"color": "red", "size": "big"},
    "both+extra": {"color": "red", "size": "big", "other": "v"},
    "color": {"color": "red"},
    "wrong-color": {"color": "blue", "size": "big"},
    "none": None,
    "n=1": {"n": 1},
    "n='1'": {"n": "1"},
    "flag": {"flag": True},
    "flag=false": {"flag": False},
}
HEADER_EXPECT = {
    "all": ["both", "both+extra"],
    "any": ["both", "both+extra", "color", "wrong-color"],
    "default-all": ["both", "both+extra"],
    "int": ["n=1"],
    "bool": ["flag"],
    "str-1": ["n='1'"],  # a string never equals an integer
    "x-ignored": list(HEADER_MESSAGES),
}


@pytest.mark.parametrize("exchange", ["amq.headers", "amq.match", "own"])
def test_headers_matching(ch, uid, exchange):
    if exchange == "own":
        exchange = f"{uid}-headers"
        ch.exchange_declare(exchange, "headers", auto_delete=True)
    queues = {name: bound_queue(ch, exchange, "", args)
              for name, args in HEADER_BINDINGS.items()}
    for name, headers in HEADER_MESSAGES.items():
        publish(ch, exchange, "ignored", name, headers)
    wrong = {}
    for name, q in queues.items():
        got = take_all(ch, q)
        if exchange.startswith("amq."):
            got = [b for b in got if b in HEADER_MESSAGES]  # shared exchange: ours only
        if sorted(got) != sorted(HEADER_EXPECT[name]):
            wrong[name] = {"want": HEADER_EXPECT[name], "got": got}
    assert not wrong, wrong


# -- user exchanges --------------------------------------------------------------------------


@pytest.mark.parametrize("xtype,key,args,matching,other", [
    ("direct", "k", None, ("k", None), ("j", None)),
    ("fanout", "k", None, ("anything", None), None),
    ("topic", "k.*", None, ("k.x", None), ("k.x.y", None)),
    ("headers", "", {"h": "v"}, ("", {"h": "v"}), ("", {"h": "w"})),
])
def test_user_exchange_types(ch, uid, xtype, key, args, matching, other):
    x = f"{uid}-{xtype}"
    ok = ch.exchange_declare(x, xtype, durable=False, auto_delete=False)
    assert isinstance(ok.method, pika.spec.Exchange.DeclareOk)
    ch.exchange_declare(x, xtype)  # same again: fine
    ch.exchange_declare(x, passive=True)
    q = bound_queue(ch, x, key, args)
    publish(ch, x, matching[0], "match", matching[1])
    if other is not None:
        publish(ch, x, other[0], "other", other[1])
    assert take_all(ch, q) == ["match"]
    ch.exchange_delete(x)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_declare(x, passive=True)
    assert e.value.reply_code == NOT_FOUND


def test_durable_exchange_declare(ch, uid):
    x = f"{uid}-durable"
    ch.exchange_declare(x, "direct", durable=True)
    ch.exchange_declare(x, "direct", durable=True)
    ch.exchange_declare(x, passive=True)
    ch.exchange_delete(x)


def test_passive_declare_ignores_type(ch, uid):
    x = f"{uid}-px"
    ch.exchange_declare(x, "topic")
    ch.exchange_declare(x, "fanout", passive=True)  # passive: only existence is checked
    ch.exchange_delete(x)


def test_auto_delete_exchange_goes_with_last_binding(ch, uid):
    x = f"{uid}-ad"
    ch.exchange_declare(x, "direct", auto_delete=True)
    ch.exchange_declare(x, passive=True)  # not deleted before it ever had a binding
    q1 = bound_queue(ch, x, "k1")
    q2 = bound_queue(ch, x, "k2")
    ch.queue_unbind(q1, x, "k1")
    ch.exchange_declare(x, passive=True)  # one binding left
    ch.queue_unbind(q2, x, "k2")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_declare(x, passive=True)
    assert e.value.reply_code == NOT_FOUND


def test_auto_delete_exchange_goes_when_its_queue_does(ch, uid):
    x = f"{uid}-ad2"
    ch.exchange_declare(x, "fanout", auto_delete=True)
    q = bound_queue(ch, x)
    ch.queue_delete(q)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_declare(x, passive=True)
    assert e.value.reply_code == NOT_FOUND


def test_internal_exchange_refuses_publish_403(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    ch.confirm_delivery()
    src = f"{uid}-src"
    internal = f"{uid}-int"
    ch.exchange_declare(src, "fanout", auto_delete=True)
    ch.exchange_declare(internal, "fanout", internal=True, auto_delete=True)
    ch.exchange_bind(internal, src)
    q = bound_queue(ch, internal)
    publish(ch, src, "", "via source")  # routed through the internal exchange: fine
    assert take_all(ch, q) == ["via source"]
    bad = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bad.basic_publish(internal, "", b"direct")
        bad.queue_declare("", exclusive=True)
    assert e.value.reply_code == ACCESS_REFUSED
    assert take_all(ch, q) == []


def test_delete_if_unused(ch, uid):
    x = f"{uid}-iu"
    ch.exchange_declare(x, "direct")
    ch.exchange_delete(x, if_unused=True)  # no bindings: deleted
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_declare(x, passive=True)
    assert e.value.reply_code == NOT_FOUND


def test_delete_if_unused_bound_406(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    x = f"{uid}-iu"
    ch.exchange_declare(x, "direct")
    q = bound_queue(ch, x, "k")
    bad = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bad.exchange_delete(x, if_unused=True)
    assert e.value.reply_code == PRECONDITION_FAILED
    ch.exchange_declare(x, passive=True)  # still there
    ch.queue_unbind(q, x, "k")
    ch.exchange_delete(x, if_unused=True)


def test_delete_if_unused_source_of_exchange_binding_406(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    src, dst = f"{uid}-s", f"{uid}-d"
    ch.exchange_declare(src, "fanout")
    ch.exchange_declare(dst, "fanout")
    ch.exchange_bind(dst, src)
    bad = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bad.exchange_delete(src, if_unused=True)
    assert e.value.reply_code == PRECONDITION_FAILED
    ch.exchange_delete(src)  # without if-unused: deleted with its bindings
    ch.exchange_delete(dst, if_unused=True)  # being a destination does not count as use


def test_delete_removes_bindings(ch, uid):
    x = f"{uid}-del"
    ch.exchange_declare(x, "direct")
    q = bound_queue(ch, x, "k")
    ch.exchange_delete(x)
    ch.exchange_declare(x, "direct")  # a new exchange of that name has no bindings
    publish(ch, x, "k", "lost")
    assert take_all(ch, q) == []
    ch.exchange_delete(x)


# -- exchange-to-exchange bindings ----------------------------------------------------------


def test_exchange_to_exchange_bind_and_unbind(ch, uid):
    src, dst = f"{uid}-src", f"{uid}-dst"
    ch.exchange_declare(src, "direct")
    ch.exchange_declare(dst, "fanout")
    ch.exchange_bind(dst, src, "route")
    q = bound_queue(ch, dst)
    publish(ch, src, "route", "through")
    publish(ch, src, "other", "not bound")
    assert take_all(ch, q) == ["through"]
    ch.exchange_unbind(dst, src, "route")
    publish(ch, src, "route", "after unbind")
    assert take_all(ch, q) == []
    publish(ch, dst, "", "to dst itself")
    assert take_all(ch, q) == ["to dst itself"]
    ch.exchange_delete(src)
    ch.exchange_delete(dst)


def test_auto_delete_exchange_goes_with_last_exchange_binding(ch, uid):
    # An exchange-to-exchange binding counts as a binding of its source.
    src, dst = f"{uid}-src", f"{uid}-dst"
    ch.exchange_declare(src, "fanout", auto_delete=True)
    ch.exchange_declare(dst, "fanout")
    ch.exchange_bind(dst, src)
    ch.exchange_unbind(dst, src)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_declare(src, passive=True)
    assert e.value.reply_code == NOT_FOUND


def test_exchange_chain(ch, uid):
    # topic -> direct -> headers -> queue, each hop filtering.
    a, b, c = f"{uid}-a", f"{uid}-b", f"{uid}-c"
    ch.exchange_declare(a, "topic", auto_delete=True)
    ch.exchange_declare(b, "direct", auto_delete=True)
    ch.exchange_declare(c, "headers", auto_delete=True)
    ch.exchange_bind(b, a, "sensor.#")
    ch.exchange_bind(c, b, "sensor.temp")
    q = bound_queue(ch, c, "", {"x-match": "any", "unit": "C"})
    publish(ch, a, "sensor.temp", "ok", {"unit": "C"})
    publish(ch, a, "sensor.temp", "wrong unit", {"unit": "F"})
    publish(ch, a, "sensor.hum", "wrong key at b", {"unit": "C"})
    publish(ch, a, "other.temp", "wrong key at a", {"unit": "C"})
    assert take_all(ch, q) == ["ok"]


def test_queue_reached_twice_gets_one_copy(ch, uid):
    # Two paths (direct binding and through another exchange) and a cycle between exchanges:
    # the queue still gets the message once.
    a, b = f"{uid}-a", f"{uid}-b"
    ch.exchange_declare(a, "fanout", auto_delete=True)
    ch.exchange_declare(b, "fanout", auto_delete=True)
    ch.exchange_bind(b, a)
    ch.exchange_bind(a, b)  # cycle
    q = bound_queue(ch, a)
    ch.queue_bind(q, b)
    publish(ch, a, "", "once")
    assert take_all(ch, q) == ["once"]


def test_exchange_bind_missing_404(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_bind(f"{uid}-missing", "amq.fanout")
    assert e.value.reply_code == NOT_FOUND
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_bind("amq.fanout", f"{uid}-missing")
    assert e.value.reply_code == NOT_FOUND


# -- unroutable -----------------------------------------------------------------------------


def test_unroutable_publish_dropped_silently(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()  # no confirms: a drop shows no sign at all
    x = f"{uid}-empty"
    ch.exchange_declare(x, "direct", auto_delete=False)
    ch.basic_publish(x, "nobody", b"dropped")
    ch.basic_publish("amq.direct", f"{uid}-nobody", b"dropped")
    q = ch.queue_declare(f"{uid}-q", exclusive=True).method.queue
    ch.queue_bind(q, x, "somebody")
    ch.basic_publish(x, "somebody", b"kept")
    assert get_message(ch, q)[2] == b"kept"
    assert ch.is_open and conn.is_open
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    ch.exchange_delete(x)
