"""Tributary's users and topic ACL from its config file: password logins, anonymous access
turned off, publish/subscribe rules with %u / %c substitution."""

import subprocess

import pytest

import mqttraw
from mqttcompat import MQTTv311, MQTTv5
from tributary_process import tributary_bin

pytestmark = pytest.mark.tributary_only(
    reason="users and ACL come from Tributary's config file ([[users]], [[mqtt_acl]]); "
    "Mosquitto configures them differently (password_file, acl_file)")

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}

ACL = """
[[mqtt_acl]]
action = "all"
filter = "private/%u/#"
permission = "allow"

[[mqtt_acl]]
action = "all"
filter = "private/#"
permission = "deny"

[[mqtt_acl]]
action = "all"
filter = "clients/%c/#"
permission = "allow"

[[mqtt_acl]]
action = "all"
filter = "clients/#"
permission = "deny"

[[mqtt_acl]]
user = "bob"
action = "publish"
filter = "readonly/#"
permission = "deny"

[[mqtt_acl]]
action = "subscribe"
filter = "secret/#"
permission = "deny"
"""


def credentials_line(password: str) -> str:
    out = subprocess.run([tributary_bin(), "passwd"], input=password + "\n",
                         capture_output=True, text=True, timeout=60, check=True)
    line = out.stdout.strip()
    assert line.startswith("credentials = ["), line
    return line


@pytest.fixture(scope="module")
def secured(make_module_tributary):
    users = "".join(
        f'\n[[users]]\nname = "{name}"\n{credentials_line(pw)}\n'
        for name, pw in PASSWORDS.items()
    )
    d = make_module_tributary("standalone", "mqtt_allow_anonymous = false\n" + users + ACL)
    return d.broker()


def login(secured, mq, client_id, protocol, user="alice"):
    c = mq(secured, client_id, protocol)
    c.connect(username=user, password=PASSWORDS[user])
    return c


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_password_login(secured, mq, uid, protocol):
    c = login(secured, mq, f"{uid}-a", protocol)
    c.subscribe(f"{uid}/t", 1)
    c.publish(f"{uid}/t", b"x", qos=1)
    c.wait_messages(1)


@pytest.mark.parametrize(
    "level,user,password,code",
    [
        (4, "alice", b"wrong", 4),  # bad user name or password
        (4, "mallory", b"alice-pw", 4),
        (4, None, None, 5),  # not authorized: anonymous access is off
        (5, "alice", b"wrong", 0x86),
        (5, "mallory", b"alice-pw", 0x86),
        (5, None, None, 0x87),
        (4, "alice", None, 4),  # a user name without a password
    ],
    ids=["v311-wrong-pw", "v311-unknown-user", "v311-anonymous", "v5-wrong-pw",
         "v5-unknown-user", "v5-anonymous", "v311-no-password"],
)
def test_login_refused(secured, raw_clients, uid, level, user, password, code):
    r = secured.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-x", level=level, username=user, password=password))
    present, rc, _ = r.connack()
    assert (present, rc) == (False, code), f"CONNACK code {rc:#x}"
    r.wait_closed()


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_user_substitution(secured, mq, uid, protocol):
    alice = login(secured, mq, f"{uid}-a", protocol, "alice")
    bob = login(secured, mq, f"{uid}-b", protocol, "bob")
    # Own subtree: allowed.
    assert alice.subscribe(f"private/alice/{uid}/#", 1) == [1]
    # Someone else's subtree, or a filter reaching beyond one's own: denied.
    denied = 0x87 if protocol == MQTTv5 else 0x80
    assert bob.subscribe(f"private/alice/{uid}/#", 1) == [denied]
    assert alice.subscribe("private/+/x", 1) == [denied]
    ok = bob.publish(f"private/alice/{uid}/x", b"from bob", qos=1)
    if protocol == MQTTv5:
        assert ok == 0x87
    alice.publish(f"private/alice/{uid}/x", b"from alice", qos=1)
    [m] = alice.wait_messages(1)
    assert m.payload == b"from alice", "a denied publish was delivered"


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_client_id_substitution(secured, mq, uid, protocol):
    c = login(secured, mq, f"{uid}-me", protocol, "bob")
    assert c.subscribe(f"clients/{uid}-me/#", 1) == [1]
    denied = 0x87 if protocol == MQTTv5 else 0x80
    assert c.subscribe(f"clients/{uid}-other/#", 1) == [denied]


def test_publish_denied_v5_puback_0x87(secured, mq, uid):
    watcher = login(secured, mq, f"{uid}-w", MQTTv5, "alice")
    watcher.subscribe(f"readonly/{uid}", 1)
    bob = login(secured, mq, f"{uid}-b", MQTTv5, "bob")
    assert bob.publish(f"readonly/{uid}", b"no", qos=1) == 0x87
    # The rule is for bob only: alice may publish there.
    assert watcher.publish(f"readonly/{uid}", b"yes", qos=1) == 0
    assert [m.payload for m in watcher.wait_messages(1)] == [b"yes"]


def test_publish_denied_v311_acknowledged_and_dropped(secured, mq, uid):
    """3.1.1 has no negative PUBACK: the publish is acknowledged and dropped."""
    watcher = login(secured, mq, f"{uid}-w", MQTTv311, "alice")
    watcher.subscribe(f"readonly/{uid}", 1)
    bob = login(secured, mq, f"{uid}-b", MQTTv311, "bob")
    for q in (0, 1, 2):
        bob.publish(f"readonly/{uid}", f"no{q}".encode(), qos=q)
    watcher.publish(f"readonly/{uid}", b"yes", qos=1)
    assert [m.payload for m in watcher.wait_messages(1)] == [b"yes"]
    assert bob.disconnected is None


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_subscribe_denied(secured, mq, uid, protocol):
    c = login(secured, mq, f"{uid}-c", protocol, "alice")
    denied = 0x87 if protocol == MQTTv5 else 0x80
    codes = c.subscribe([(f"secret/{uid}", 1), (f"open/{uid}", 1)])
    assert codes == [denied, 1]
    # Publishing there is allowed (the rule is for subscribe); nothing reaches c through
    # the refused filter.
    c.publish(f"secret/{uid}", b"s", qos=1)
    c.publish(f"open/{uid}", b"o", qos=1)
    assert [m.payload for m in c.wait_messages(1)] == [b"o"]


@pytest.mark.parametrize("level,code", [(4, 5), (5, 0x87)], ids=["v311", "v5"])
def test_will_topic_denied_refuses_connect(secured, raw_clients, uid, level, code):
    r = secured.raw()
    raw_clients.append(r)
    r.send(mqttraw.connect(f"{uid}-x", level=level, username="bob", password=b"bob-pw",
                           will=(f"private/alice/{uid}", b"w", 0, False)))
    assert r.connack()[1] == code
