"""Shared subscriptions ($share/<group>/<filter>) with MQTT 5 and 3.1.1 clients."""

import pytest

from mqttcompat import MQTTv311, MQTTv5

N = 100


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_shared_subscription_splits_messages(broker, mq, uid, protocol):
    members = []
    for i in range(2):
        m = mq(broker, f"{uid}-m{i}", protocol)
        m.connect()
        assert m.subscribe(f"$share/g{uid}/{uid}/sh/#", 1) == [1]
        members.append(m)
    plain = mq(broker, f"{uid}-plain", protocol)
    plain.connect()
    plain.subscribe(f"{uid}/sh/#", 1)
    pub = mq(broker, f"{uid}-p", protocol)
    pub.connect()
    infos = [pub.publish(f"{uid}/sh/x", str(i).encode(), qos=1, wait=False) for i in range(N)]
    pub.wait_published(infos)
    # The ordinary subscriber gets everything; the group gets everything once between them.
    assert len(plain.wait_messages(N)) == N
    members[0].wait(lambda: sum(len(m.messages) for m in members) >= N,
                    what=f"{N} messages across the group")
    got = [int(msg.payload) for m in members for msg in m.received()]
    assert sorted(got) == list(range(N)), "lost or duplicated within the share group"
    for m in members:
        assert m.received(), f"{m.client_id} got no share of the messages"
        assert all(msg.topic == f"{uid}/sh/x" for msg in m.received())


def test_shared_subscription_member_leaving(broker, mq, uid):
    """Once a member unsubscribes, the remaining one gets every message."""
    members = []
    for i in range(2):
        m = mq(broker, f"{uid}-m{i}", MQTTv5)
        m.connect()
        m.subscribe(f"$share/g{uid}/{uid}/sh", 1)
        members.append(m)
    members[1].unsubscribe(f"$share/g{uid}/{uid}/sh")
    pub = mq(broker, f"{uid}-p", MQTTv5)
    pub.connect()
    for i in range(10):
        pub.publish(f"{uid}/sh", str(i).encode(), qos=1)
    assert [int(m.payload) for m in members[0].wait_messages(10)] == list(range(10))
    assert members[1].received() == []
