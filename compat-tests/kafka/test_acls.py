"""Kafka ACLs: CreateAcls / DescribeAcls / DeleteAcls and the authorizer on every request.

The server runs with SASL and `--kafka-authorizer`; `admin` is a super user (Kafka's
super.users), `alice` and `bob` start without any ACL. ACLs are managed with kafka-python's
KafkaAdminClient and confluent-kafka's AdminClient; refusals are observed with confluent-kafka
(librdkafka) and kafka-python producers and consumers, each with the error code Kafka gives.
"""

from __future__ import annotations

import pathlib
import urllib.request

import pytest

from kafkacompat import ck_consumer, ck_create_topic, ck_producer, unique, wait_until
from test_sasl import write_sasl_config

USERS = {"admin": "admin-secret", "alice": "alice-secret", "bob": "bob-secret"}


def _config(tmp_path: pathlib.Path, extra: str = "") -> str:
    path = write_sasl_config(tmp_path / "acl.toml", USERS)
    path.write_text(f'kafka_super_users = ["admin"]\n{extra}\n' + path.read_text())
    return str(path)


def _args(tmp_path, extra: str = "") -> list[str]:
    return ["--kafka-sasl", "--kafka-authorizer", "--config", _config(tmp_path, extra)]


@pytest.fixture
def acl_cluster(make_deployment, tmp_path):
    return make_deployment("standalone", _args(tmp_path))


def sasl(user: str) -> dict:
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": user, "sasl.password": USERS[user]}


def kp_admin(bootstrap: str, user: str = "admin"):
    from kafka.admin import KafkaAdminClient
    return KafkaAdminClient(bootstrap_servers=bootstrap, security_protocol="SASL_PLAINTEXT",
                            sasl_mechanism="PLAIN", sasl_plain_username=user,
                            sasl_plain_password=USERS[user], request_timeout_ms=15000)


def acl(principal, rt, name, op, allow=True, pattern="LITERAL", host="*"):
    from kafka.admin import (ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType,
                             ResourcePattern, ResourceType)
    return ACL(principal=principal, host=host, operation=getattr(ACLOperation, op),
               permission_type=ACLPermissionType.ALLOW if allow else ACLPermissionType.DENY,
               resource_pattern=ResourcePattern(getattr(ResourceType, rt), name,
                                                getattr(ACLResourcePatternType, pattern)))


def grant(bootstrap, *acls):
    a = kp_admin(bootstrap)
    try:
        r = a.create_acls(list(acls))
        assert not r["failed"], r
        assert len(r["succeeded"]) == len(acls)
    finally:
        a.close()


def produce_one(bootstrap: str, user: str, topic: str, timeout: float = 15):
    """One record through librdkafka; returns the delivery error (None = delivered)."""
    p = ck_producer(bootstrap, **sasl(user), **{"message.timeout.ms": int(timeout * 1000)})
    result = []
    p.produce(topic, b"v", on_delivery=lambda err, msg: result.append(err))
    p.flush(timeout + 5)
    assert result, "no delivery report"
    return result[0]


def consume_error_or_records(bootstrap, user, topic, group, want: int, timeout=30):
    """Subscribes in `group`; returns ('error', code) on the first error, else the values read
    (after committing them synchronously)."""
    from confluent_kafka import TopicPartition
    c = ck_consumer(bootstrap, **sasl(user), **{"group.id": group})
    got = []
    try:
        c.subscribe([topic])

        def step():
            for m in c.consume(num_messages=50, timeout=0.5):
                if m.error():
                    return ("error", m.error().code())
                got.append(m)
            return ("done", None) if len(got) >= want else None

        outcome = wait_until(step, timeout, f"{want} records or an error for {user}")
        if outcome[0] == "error":
            return outcome
        c.commit(offsets=[TopicPartition(topic, m.partition(), m.offset() + 1) for m in got],
                 asynchronous=False)
        return [m.value() for m in got]
    finally:
        c.close()


def test_acl_apis_answer_security_disabled_without_the_authorizer(make_deployment, tmp_path):
    from kafka.errors import SecurityDisabledError
    d = make_deployment("standalone", ["--kafka-sasl", "--config", _config(tmp_path)])
    a = kp_admin(d.bootstrap)
    try:
        r = a.create_acls([acl("User:alice", "TOPIC", "t", "READ")])
        assert r["failed"] and r["failed"][0] is SecurityDisabledError, r
        from kafka.admin import ACLFilter, ResourcePatternFilter, ResourceType, ACLOperation, \
            ACLPermissionType, ACLResourcePatternType
        f = ACLFilter(principal=None, host=None, operation=ACLOperation.ANY,
                      permission_type=ACLPermissionType.ANY,
                      resource_pattern=ResourcePatternFilter(ResourceType.ANY, None,
                                                             ACLResourcePatternType.ANY))
        with pytest.raises(SecurityDisabledError):
            a.describe_acls(f)
        (_, matched, err), = a.delete_acls([f])
        assert err is SecurityDisabledError and matched == []
    finally:
        a.close()
    # Without the authorizer every authenticated user may do everything, as before.
    t = unique("open")
    ck_create_topic(d.bootstrap, t, 1, admin=_ck_admin(d.bootstrap, "alice"))
    assert produce_one(d.bootstrap, "alice", t) is None


def _ck_admin(bootstrap, user):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap, **sasl(user)})


def test_a_user_without_acls_is_refused_with_kafkas_codes(acl_cluster):
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic
    b = acl_cluster.bootstrap
    t = unique("guarded")
    ck_create_topic(b, t, 1, admin=_ck_admin(b, "admin"))
    # Produce: the topic is not even described to alice.
    err = produce_one(b, "alice", t, timeout=5)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    # Create a topic: CREATE on the cluster or the topic is needed.
    alice_admin = _ck_admin(b, "alice")
    fs = alice_admin.create_topics([NewTopic(unique("alice-new"), 1, 1)])
    with pytest.raises(KafkaException) as e:
        list(fs.values())[0].result(timeout=15)
    assert e.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # Consume in a group: DESCRIBE/READ on the group comes first.
    out = consume_error_or_records(b, "alice", t, unique("g"), 1)
    assert out == ("error", KafkaError.GROUP_AUTHORIZATION_FAILED), out
    # Metadata for every topic hides the ones alice may not describe.
    md = alice_admin.list_topics(timeout=10)
    assert t not in md.topics
    assert t in _ck_admin(b, "admin").list_topics(timeout=10).topics
    # ACL administration needs ALTER / DESCRIBE on the cluster.
    from kafka.errors import ClusterAuthorizationFailedError
    a = kp_admin(b, "alice")
    try:
        r = a.create_acls([acl("User:alice", "TOPIC", t, "ALL")])
        assert r["failed"] == [ClusterAuthorizationFailedError], r
    finally:
        a.close()


def test_kafka_python_producer_refused_then_allowed_by_a_prefixed_write(acl_cluster):
    from kafka import KafkaProducer
    from kafka.errors import (ClusterAuthorizationFailedError, KafkaError,
                              TopicAuthorizationFailedError)
    b = acl_cluster.bootstrap
    mine, other = unique("alice-orders"), unique("bob-orders")
    admin = _ck_admin(b, "admin")
    ck_create_topic(b, mine, 1, admin=admin)
    ck_create_topic(b, other, 1, admin=admin)

    def kp_producer():
        return KafkaProducer(bootstrap_servers=b, security_protocol="SASL_PLAINTEXT",
                             sasl_mechanism="SCRAM-SHA-512", sasl_plain_username="alice",
                             sasl_plain_password=USERS["alice"], max_block_ms=5000,
                             enable_idempotence=False, retries=0)

    p = kp_producer()
    try:
        with pytest.raises((TopicAuthorizationFailedError,)):
            p.send(mine, b"x").get(timeout=15)
    finally:
        p.close()

    grant(b, acl("User:alice", "TOPIC", "alice-", "WRITE", pattern="PREFIXED"))
    p = kp_producer()
    try:
        assert p.send(mine, b"x").get(timeout=15).offset == 0
        with pytest.raises(TopicAuthorizationFailedError):
            p.send(other, b"x").get(timeout=15)
    finally:
        p.close()
    # WRITE on a topic is enough for an idempotent producer (KIP-679); without any WRITE
    # (bob may only DESCRIBE the topic), InitProducerId is refused with
    # CLUSTER_AUTHORIZATION_FAILED.
    grant(b, acl("User:bob", "TOPIC", other, "DESCRIBE"))
    p = KafkaProducer(bootstrap_servers=b, security_protocol="SASL_PLAINTEXT",
                      sasl_mechanism="PLAIN", sasl_plain_username="alice",
                      sasl_plain_password=USERS["alice"], enable_idempotence=True,
                      max_block_ms=10000)
    try:
        assert p.send(mine, b"y").get(timeout=15).offset == 1
    finally:
        p.close()
    # (kafka-python reports it wrapped: "Unexpected error in InitProducerIdResponse: [Error 31]
    # ClusterAuthorizationFailedError".)
    with pytest.raises(KafkaError, match=ClusterAuthorizationFailedError.__name__):
        q = KafkaProducer(bootstrap_servers=b, security_protocol="SASL_PLAINTEXT",
                          sasl_mechanism="PLAIN", sasl_plain_username="bob",
                          sasl_plain_password=USERS["bob"], enable_idempotence=True,
                          max_block_ms=5000)
        try:
            q.send(other, b"z").get(timeout=15)
        finally:
            q.close()


def test_deny_overrides_allow(acl_cluster):
    from confluent_kafka import KafkaError
    b = acl_cluster.bootstrap
    open_t, closed_t = unique("open"), unique("closed")
    admin = _ck_admin(b, "admin")
    ck_create_topic(b, open_t, 1, admin=admin)
    ck_create_topic(b, closed_t, 1, admin=admin)
    grant(b,
          acl("User:*", "TOPIC", "*", "ALL"),
          acl("User:alice", "TOPIC", closed_t, "WRITE", allow=False))
    assert produce_one(b, "alice", open_t) is None
    err = produce_one(b, "alice", closed_t, timeout=5)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    # The DENY names alice only: bob still writes there.
    assert produce_one(b, "bob", closed_t) is None


def test_group_read_is_needed_to_join_and_commit(acl_cluster):
    from confluent_kafka import KafkaError
    b = acl_cluster.bootstrap
    t, group = unique("events"), unique("readers")
    ck_create_topic(b, t, 1, admin=_ck_admin(b, "admin"))
    grant(b, acl("User:alice", "TOPIC", t, "ALL"))
    assert produce_one(b, "alice", t) is None
    out = consume_error_or_records(b, "alice", t, group, 1)
    assert out == ("error", KafkaError.GROUP_AUTHORIZATION_FAILED), out
    grant(b, acl("User:alice", "GROUP", group, "READ"))
    assert consume_error_or_records(b, "alice", t, group, 1) == [b"v"]
    # The commit landed: the group's offset is 1 (read back by the super user).
    from confluent_kafka import TopicPartition
    c = ck_consumer(b, **sasl("admin"), **{"group.id": group})
    try:
        committed = c.committed([TopicPartition(t, 0)], timeout=10)
        assert [tp.offset for tp in committed] == [1], committed
    finally:
        c.close()
    # READ on the group but not on a topic: that topic is refused, not the group.
    t2 = unique("other")
    ck_create_topic(b, t2, 1, admin=_ck_admin(b, "admin"))
    out = consume_error_or_records(b, "alice", t2, group, 1)
    assert out == ("error", KafkaError.TOPIC_AUTHORIZATION_FAILED), out


def test_describe_and_delete_acls_with_filters_then_the_refusal_returns(acl_cluster):
    from confluent_kafka import KafkaError
    from kafka.admin import (ACLFilter, ACLOperation, ACLPermissionType,
                             ACLResourcePatternType, ResourcePatternFilter, ResourceType)
    b = acl_cluster.bootstrap
    t = unique("pay-orders")
    ck_create_topic(b, t, 1, admin=_ck_admin(b, "admin"))
    grant(b,
          acl("User:alice", "TOPIC", "pay-", "WRITE", pattern="PREFIXED"),
          acl("User:alice", "TOPIC", "*", "DESCRIBE"),
          acl("User:bob", "GROUP", "g1", "READ"))
    assert produce_one(b, "alice", t) is None

    def filt(rt="ANY", name=None, pattern="ANY", principal=None, op="ANY"):
        return ACLFilter(principal=principal, host=None, operation=getattr(ACLOperation, op),
                         permission_type=ACLPermissionType.ANY,
                         resource_pattern=ResourcePatternFilter(
                             getattr(ResourceType, rt), name,
                             getattr(ACLResourcePatternType, pattern)))

    a = kp_admin(b)
    try:
        every, _ = a.describe_acls(filt())
        assert len(every) == 3
        # MATCH: every ACL that applies to this topic (prefixed and the wildcard).
        applying, _ = a.describe_acls(filt("TOPIC", t, "MATCH"))
        assert sorted(x.resource_pattern.resource_name for x in applying) == ["*", "pay-"]
        # ANY with a name: that exact name, any pattern type.
        exact, _ = a.describe_acls(filt("TOPIC", "pay-", "ANY"))
        assert [x.operation for x in exact] == [ACLOperation.WRITE]
        bobs, _ = a.describe_acls(filt(principal="User:bob"))
        assert [x.resource_pattern.resource_type for x in bobs] == [ResourceType.GROUP]

        (_, deleted, err), = a.delete_acls([filt("TOPIC", t, "MATCH", op="WRITE")])
        assert err.__name__ == "NoError"
        assert [x.resource_pattern.resource_name for x in deleted] == ["pay-"]
        left, _ = a.describe_acls(filt())
        assert len(left) == 2
    finally:
        a.close()
    err = produce_one(b, "alice", t, timeout=5)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


def test_confluent_admin_client_acls(acl_cluster):
    from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation,
                                       AclPermissionType, ResourcePatternType, ResourceType)
    b = acl_cluster.bootstrap
    admin = _ck_admin(b, "admin")
    t = unique("ck")
    binding = AclBinding(ResourceType.TOPIC, t, ResourcePatternType.LITERAL, "User:bob", "*",
                         AclOperation.READ, AclPermissionType.ALLOW)
    for f in admin.create_acls([binding], request_timeout=15).values():
        assert f.result(timeout=15) is None
    flt = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, "User:bob", None,
                           AclOperation.ANY, AclPermissionType.ANY)
    assert admin.describe_acls(flt, request_timeout=15).result(timeout=15) == [binding]
    deleted = [f.result(timeout=15) for f in admin.delete_acls([flt], request_timeout=15).values()]
    assert deleted == [[binding]]
    assert admin.describe_acls(flt, request_timeout=15).result(timeout=15) == []


def test_bad_acl_input_gets_invalid_request(acl_cluster):
    """Unknown resource types, filter-only pattern types and bad principals in CreateAcls get
    INVALID_REQUEST per creation, never a dropped connection."""
    from kafka.errors import InvalidRequestError
    from kafka.protocol.admin import CreateAclsRequest, DescribeAclsRequest
    a = kp_admin(acl_cluster.bootstrap)
    try:
        good = dict(resource_type=2, resource_name="t", resource_pattern_type=3,
                    principal="User:alice", host="*", operation=3, permission_type=3)
        bad = [dict(good, resource_type=99), dict(good, resource_type=1),
               dict(good, resource_pattern_type=2), dict(good, resource_pattern_type=1),
               dict(good, operation=1), dict(good, permission_type=1),
               dict(good, principal="alice"), dict(good, resource_name=""),
               dict(good, resource_type=4, resource_name="not-the-cluster")]
        creations = [CreateAclsRequest.AclCreation(**c) for c in [good, *bad]]
        r = a._manager.run(a._manager.send, CreateAclsRequest(creations=creations))
        codes = [x.error_code for x in r.results]
        assert codes == [0] + [InvalidRequestError.errno] * len(bad), codes
        r = a._manager.run(a._manager.send, DescribeAclsRequest(
            resource_type_filter=0, resource_name_filter=None, pattern_type_filter=1,
            principal_filter=None, host_filter=None, operation=1, permission_type=1))
        assert r.error_code == InvalidRequestError.errno
        # The connection still serves: the good ACL is there.
        r = a._manager.run(a._manager.send, DescribeAclsRequest(
            resource_type_filter=1, resource_name_filter=None, pattern_type_filter=1,
            principal_filter=None, host_filter=None, operation=1, permission_type=1))
        assert r.error_code == 0 and len(r.resources) == 1
    finally:
        a.close()


def test_acls_survive_a_restart(make_deployment, tmp_path):
    from confluent_kafka import KafkaError
    d = make_deployment("standalone", _args(tmp_path))
    t = unique("durable")
    ck_create_topic(d.bootstrap, t, 1, admin=_ck_admin(d.bootstrap, "admin"))
    grant(d.bootstrap, acl("User:alice", "TOPIC", t, "WRITE"))
    assert produce_one(d.bootstrap, "alice", t) is None
    d.restart()
    assert produce_one(d.bootstrap, "alice", t) is None
    err = produce_one(d.bootstrap, "bob", t, timeout=5)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


def test_a_change_through_one_gateway_reaches_another(make_deployment, tmp_path):
    """One core, two gateway processes: an ACL created through gateway 0 is enforced by
    gateway 1 within its refresh bound (1 s), and a deletion likewise."""
    from confluent_kafka import KafkaError
    d = make_deployment("split-2gw", _args(tmp_path))
    g0, g1 = d.bootstraps
    t = unique("shared")
    ck_create_topic(g0, t, 1, admin=_ck_admin(g0, "admin"))
    err = produce_one(g1, "alice", t, timeout=5)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    grant(g0, acl("User:alice", "TOPIC", t, "WRITE"))
    wait_until(lambda: produce_one(g1, "alice", t, timeout=5) is None, 20,
               "gateway 1 to allow alice after the grant through gateway 0")
    a = kp_admin(g0)
    try:
        from kafka.admin import ACLFilter
        f = acl("User:alice", "TOPIC", t, "WRITE")
        a.delete_acls([ACLFilter(f.principal, f.host, f.operation, f.permission_type,
                                 f.resource_pattern)])
    finally:
        a.close()

    def refused():
        e = produce_one(g1, "alice", t, timeout=3)
        return e is not None and e.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    wait_until(refused, 20, "gateway 1 to refuse alice again after the deletion")


def test_refusals_are_counted_and_logged(acl_cluster):
    b = acl_cluster.bootstrap
    t = unique("counted")
    ck_create_topic(b, t, 1, admin=_ck_admin(b, "admin"))
    produce_one(b, "alice", t, timeout=3)
    admin_addr = acl_cluster.processes[0].listeners["admin"]
    body = urllib.request.urlopen(f"http://{admin_addr}/metrics", timeout=10).read().decode()
    denied = [ln for ln in body.splitlines()
              if ln.startswith("tributary_kafka_authorization_denied_total{")
              and 'resource_type="topic"' in ln]
    assert denied and sum(float(ln.rsplit(" ", 1)[1]) for ln in denied) >= 1, body
    log = acl_cluster.processes[0].log_path.read_text(errors="replace")
    lines = [ln for ln in log.splitlines() if "refused by the ACLs" in ln]
    assert lines and "User:alice" in lines[0] and f"topic:{t}" in lines[0], lines
    assert "peer=" in lines[0] and "operation=" in lines[0] and "reason=" in lines[0]


def test_authorized_operations_are_reported(acl_cluster):
    """Metadata (describe_topics) and DescribeCluster report the operations the user may do
    when asked, with the implied DESCRIBE."""
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AclOperation
    b = acl_cluster.bootstrap
    t = unique("ops")
    ck_create_topic(b, t, 1, admin=_ck_admin(b, "admin"))
    grant(b, acl("User:alice", "TOPIC", t, "READ"),
          acl("User:alice", "CLUSTER", "kafka-cluster", "DESCRIBE"))
    alice = _ck_admin(b, "alice")
    desc = alice.describe_topics(TopicCollection([t]), include_authorized_operations=True)
    ops = set(desc[t].result(timeout=15).authorized_operations)
    assert ops == {AclOperation.READ, AclOperation.DESCRIBE}, ops
    cluster = alice.describe_cluster(include_authorized_operations=True).result(timeout=15)
    assert set(cluster.authorized_operations) == {AclOperation.DESCRIBE}, cluster
