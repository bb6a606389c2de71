"""MQTT 5 features: subscription identifiers, No Local, message properties, message expiry,
topic aliases from the client, reason codes in PUBACK / UNSUBACK / SUBACK."""

import time

import pytest

import mqttraw
from mqttcompat import MQTTv311, MQTTv5, PacketTypes, props


def client(broker, mq, client_id, **kw):
    c = mq(broker, client_id, MQTTv5, **kw)
    c.connect()
    return c


def test_subscription_identifier_in_delivery(broker, mq, uid):
    s = client(broker, mq, f"{uid}-s")
    assert s.subscribe(f"{uid}/a/#", 1, sub_id=7) == [1]
    assert s.subscribe(f"{uid}/b", 1) == [1]  # no identifier
    p = client(broker, mq, f"{uid}-p")
    p.publish(f"{uid}/a/x", b"1", qos=1)
    p.publish(f"{uid}/b", b"2", qos=1)
    a, b = s.wait_messages(2)
    assert getattr(a.properties, "SubscriptionIdentifier", None) == [7]
    assert getattr(b.properties, "SubscriptionIdentifier", None) is None


def test_overlapping_subscriptions_carry_each_identifier(broker, mq, uid):
    """Two matching subscriptions: one copy with both identifiers or one copy per
    subscription (MQTT 5 3.3.4), either way each identifier is reported."""
    s = client(broker, mq, f"{uid}-s")
    s.subscribe(f"{uid}/o/#", 1, sub_id=7)
    s.subscribe(f"{uid}/o/+", 1, sub_id=9)
    s.subscribe(f"{uid}/end", 1)
    p = client(broker, mq, f"{uid}-p")
    p.publish(f"{uid}/o/x", b"x", qos=1)
    p.publish(f"{uid}/end", b"end", qos=1)
    s.wait_messages(1, topic=f"{uid}/end")
    copies = s.received(f"{uid}/o/x")
    ids = sorted(i for m in copies for i in m.properties.SubscriptionIdentifier)
    assert ids == [7, 9], f"{len(copies)} copies with identifiers {ids}"


def test_no_local(broker, mq, uid):
    topic = f"{uid}/nl"
    me = client(broker, mq, f"{uid}-me")
    assert me.subscribe(topic, 1, no_local=True) == [1]
    other = client(broker, mq, f"{uid}-other")
    other.subscribe(topic, 1)
    me.publish(topic, b"mine", qos=1)
    other.publish(topic, b"theirs", qos=1)
    # Both reach `other`; `me` gets the second one only, so the first is not on its way.
    assert [m.payload for m in other.wait_messages(2)] == [b"mine", b"theirs"]
    me.wait_messages(1)
    assert [m.payload for m in me.received()] == [b"theirs"]


def test_message_properties_round_trip(broker, mq, uid):
    """Request/response properties and user properties reach the subscriber unchanged."""
    s = client(broker, mq, f"{uid}-s")
    s.subscribe(f"{uid}/req", 2)
    p = client(broker, mq, f"{uid}-p")
    sent = props(
        PacketTypes.PUBLISH,
        ContentType="application/json",
        ResponseTopic=f"{uid}/resp",
        CorrelationData=b"\x00\x01corr",
        PayloadFormatIndicator=1,
        UserProperty=[("k1", "v1"), ("k2", "v2"), ("k1", "again")],
    )
    for q in (0, 1, 2):
        p.publish(f"{uid}/req", b'{"q": %d}' % q, qos=q, properties=sent)
    msgs = s.wait_messages(3)
    for m in msgs:
        pr = m.properties
        assert pr.ContentType == "application/json"
        assert pr.ResponseTopic == f"{uid}/resp"
        assert pr.CorrelationData == b"\x00\x01corr"
        assert pr.PayloadFormatIndicator == 1
        # Order of user properties, duplicates included, is kept (MQTT-3.3.2-18).
        assert pr.UserProperty == [("k1", "v1"), ("k2", "v2"), ("k1", "again")]
    # The responder answers on the response topic with the correlation data.
    r = client(broker, mq, f"{uid}-r")
    r.subscribe(f"{uid}/resp", 1)
    req = msgs[0]
    s.publish(req.properties.ResponseTopic, b"answer", qos=1,
              properties=props(CorrelationData=req.properties.CorrelationData))
    [answer] = r.wait_messages(1)
    assert answer.properties.CorrelationData == b"\x00\x01corr"


def test_message_expiry(broker, mq, uid):
    """Queued for an offline session: a message with expiry 1 s is gone after ~2 s; one
    with 60 s is delivered with the remaining interval."""
    cid = f"{uid}-off"
    s = mq(broker, cid, MQTTv5)
    s.connect(session_expiry=300)
    s.subscribe(f"{uid}/e/#", 1)
    s.disconnect()
    p = client(broker, mq, f"{uid}-p")
    p.publish(f"{uid}/e/short", b"short", qos=1, properties=props(MessageExpiryInterval=1))
    p.publish(f"{uid}/e/long", b"long", qos=1, properties=props(MessageExpiryInterval=60))
    time.sleep(2.2)  # letting the 1 s expiry pass (a time condition, not synchronisation)
    s2 = mq(broker, cid, MQTTv5, clean=False)
    assert s2.connect(session_expiry=300).session_present
    # "long" was published after "short": once it is here, "short" would have been too.
    [m] = s2.wait_messages(1, topic=f"{uid}/e/long")
    assert s2.received(f"{uid}/e/short") == [], "an expired message was delivered"
    left = m.properties.MessageExpiryInterval
    assert 55 <= left <= 58, f"expiry not decremented by the time queued: {left}"
    s2.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))


def test_topic_alias_from_client(broker, mq, uid):
    s = client(broker, mq, f"{uid}-s")
    s.subscribe(f"{uid}/alias", 1)
    p = client(broker, mq, f"{uid}-p")
    max_alias = getattr(p.connack.properties, "TopicAliasMaximum", 0)
    assert max_alias >= 1, "the broker accepts no topic alias"
    p.publish(f"{uid}/alias", b"1", qos=1, properties=props(TopicAlias=1))
    p.publish("", b"2", qos=1, properties=props(TopicAlias=1))
    p.publish("", b"3", qos=0, properties=props(TopicAlias=1))
    msgs = s.wait_messages(3)
    assert [(m.topic, m.payload) for m in msgs] == [(f"{uid}/alias", b"%d" % i)
                                                   for i in (1, 2, 3)]


def test_puback_no_matching_subscribers(broker, mq, uid):
    p = client(broker, mq, f"{uid}-p")
    assert p.publish(f"{uid}/nobody", b"x", qos=1) == 0x10
    s = client(broker, mq, f"{uid}-s")
    s.subscribe(f"{uid}/nobody", 1)
    assert p.publish(f"{uid}/nobody", b"x", qos=1) == 0x00


def test_unsuback_reason_codes(broker, mq, uid):
    c = client(broker, mq, f"{uid}-c")
    c.subscribe(f"{uid}/known", 1)
    assert c.unsubscribe([f"{uid}/known", f"{uid}/unknown"]) == [0x00, 0x11]


def suback_codes(p: mqttraw.Packet, v5: bool) -> list[int]:
    assert p.type == mqttraw.SUBACK, p
    pos = 2
    if v5:
        _, pos = mqttraw.parse_props(p.body, pos)
    return list(p.body[pos:])


BAD_FILTERS = ["{uid}/#/bad", "{uid}/a+"]


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
@pytest.mark.differs(
    "mosquitto",
    reason="Mosquitto closes the connection on an invalid topic filter (5.0: after DISCONNECT "
    "0x81; a protocol error, "
    "MQTT 5 4.13 / 3.1.1 4.8) instead of refusing it in SUBACK (0x8F / 0x80) as Tributary does",
)
def test_invalid_filter_refused_in_suback(broker, raw_clients, uid, level):
    """(paho checks filters itself, so raw packets.)"""
    v5 = level == 5
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-c", level=level))
    assert r.connack()[1] == 0
    filters = [f"{uid}/ok"] + [f.format(uid=uid) for f in BAD_FILTERS]
    r.send(mqttraw.subscribe(1, [(f, 1) for f in filters], v5=v5))
    codes = suback_codes(r.read(), v5)
    assert codes == ([1, 0x8F, 0x8F] if v5 else [1, 0x80, 0x80])
    # The connection stays usable and the valid filter works.
    r.send(mqttraw.publish(f"{uid}/ok", b"x", v5=v5))
    p = r.read()
    assert p.type == mqttraw.PUBLISH and p.body.endswith(b"x")


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
@pytest.mark.parametrize("bad", BAD_FILTERS)
def test_invalid_filter_refused_either_way(broker, raw_clients, uid, level, bad):
    """What both brokers share: an invalid filter never becomes a subscription; it is
    refused in SUBACK or the connection is closed."""
    v5 = level == 5
    r = broker.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-c", level=level))
    assert r.connack()[1] == 0
    r.send(mqttraw.subscribe(1, [(bad.format(uid=uid), 1)], v5=v5))
    try:
        p = r.read()
    except mqttraw.Closed:
        return
    if p.type == mqttraw.DISCONNECT:  # MQTT 5 may say why before closing
        assert v5 and p.body[0] >= 0x80
        r.wait_closed()
        return
    assert suback_codes(p, v5)[0] >= 0x80
