"""Topic filters: `+`, `#`, the parent level matched by `#`, and `$` topics."""

import pytest

from mqttcompat import MQTTv311, MQTTv5

TOPICS = [
    "sport/tennis",
    "sport/tennis/player1",
    "sport/tennis/player1/ranking",
    "sport/tennis/player2",
    "sport/golf/player1",
    "sport",
    "sport//player1",
    "finance/tennis/player1",
]

FILTERS = {
    "sport/tennis/#": {
        "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
        "sport/tennis/player2",
    },
    "sport/+/player1": {"sport/tennis/player1", "sport/golf/player1", "sport//player1"},
    "+/tennis/+": {"sport/tennis/player1", "sport/tennis/player2", "finance/tennis/player1"},
    "sport/+": {"sport/tennis"},
    "sport/#": {t for t in TOPICS if t.startswith("sport")},
    "+/+/player1/#": {
        "sport/tennis/player1", "sport/tennis/player1/ranking", "sport/golf/player1",
        "sport//player1", "finance/tennis/player1",
    },
    "sport/tennis/player1": {"sport/tennis/player1"},
}


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_wildcard_matching(broker, mq, uid, protocol):
    subs = {}
    for i, f in enumerate(FILTERS):
        s = mq(broker, f"{uid}-s{i}", protocol)
        s.connect()
        # Each filter under the test's own first level, so other tests cannot interfere.
        assert s.subscribe(f"{uid}/{f}", 1) == [1]
        assert s.subscribe(f"{uid}-end", 1) == [1]
        subs[f] = s
    pub = mq(broker, f"{uid}-p", protocol)
    pub.connect()
    for t in TOPICS:
        pub.publish(f"{uid}/{t}", t.encode(), qos=1)
    pub.publish(f"{uid}-end", b"end", qos=1)
    for f, s in subs.items():
        want = FILTERS[f]
        s.wait_messages(1, topic=f"{uid}-end")
        msgs = s.wait_messages(len(want) + 1)
        got = [m.payload.decode() for m in msgs if m.topic != f"{uid}-end"]
        assert sorted(got) == sorted(want), f"filter {f!r}"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_dollar_topics_not_matched_by_leading_wildcards(broker, mq, uid, protocol):
    """MQTT-4.7.2-1: `#` and `+/...` do not match topics beginning with `$`; a filter that
    names the `$` level does."""
    hash_sub = mq(broker, f"{uid}-h", protocol)
    hash_sub.connect()
    hash_sub.subscribe("#", 1)
    plus_sub = mq(broker, f"{uid}-p", protocol)
    plus_sub.connect()
    plus_sub.subscribe("+/a", 1)
    dollar_sub = mq(broker, f"{uid}-d", protocol)
    dollar_sub.connect()
    dollar_sub.subscribe(f"$x{uid}/#", 1)
    pub = mq(broker, f"{uid}-pub", protocol)
    pub.connect()
    pub.publish(f"$x{uid}/a", b"dollar", qos=1)
    # Published after the $ message by the same client: once these are in, it would be too.
    pub.publish(f"{uid}/a", b"barrier", qos=1)
    dollar_sub.wait_messages(1, topic=f"$x{uid}/a")
    hash_sub.wait_messages(1, topic=f"{uid}/a")
    plus_sub.wait_messages(1, topic=f"{uid}/a")
    for s in (hash_sub, plus_sub):
        leaked = [m.topic for m in s.received() if m.topic.startswith("$")]
        assert not leaked, f"{s.client_id}: a leading wildcard matched {leaked}"
