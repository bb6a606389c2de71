"""Scenario d: the admin APIs through confluent-kafka's AdminClient and kafka-python's
KafkaAdminClient, and the broker-side max.message.bytes check.

Expected results are Apache Kafka's documented behaviour (error codes from the protocol
guide; AlterConfigs replaces a resource's whole dynamic config, IncrementalAlterConfigs
changes only the named keys; DescribeConfigs reports DYNAMIC_TOPIC_CONFIG for a value set on
the topic and a default source otherwise).
"""

from __future__ import annotations

import time

import pytest

from kafkacompat import (
    ck_admin, ck_consumer, ck_create_topic, ck_producer, ck_produce, ck_read_all, ck_wait_topic,
    make_records, unique, wait_until,
)

DEFAULT_RETENTION_MS = "604800000"   # Kafka's default (7 days) and tributary's
DEFAULT_MAX_MESSAGE_BYTES = "1048588"
DEFAULT_SOURCES = ("DEFAULT_CONFIG", "STATIC_BROKER_CONFIG", "DYNAMIC_DEFAULT_BROKER_CONFIG")


def _ck_error_code(fut):
    from confluent_kafka import KafkaException
    with pytest.raises(KafkaException) as ei:
        fut.result(timeout=30)
    return ei.value.args[0].code()


# -- confluent-kafka -------------------------------------------------------------------------


def _src(entry) -> str:
    from confluent_kafka.admin import ConfigSource
    return ConfigSource(entry.source).name


def _ck_describe(admin, topic) -> dict:
    from confluent_kafka.admin import ConfigResource, ResourceType
    res = ConfigResource(ResourceType.TOPIC, topic)
    return admin.describe_configs([res], request_timeout=30)[res].result(timeout=30)


def test_confluent_create_topics(cluster):
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import NewTopic
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-adm-create")
    fs = admin.create_topics([NewTopic(t, 3, 1, config={"retention.ms": "3600000",
                                                         "cleanup.policy": "delete"})])
    assert fs[t].result(timeout=30) is None
    ck_wait_topic(admin, t, 3)

    # validate_only creates nothing.
    v = unique("ck-adm-validate")
    fs = admin.create_topics([NewTopic(v, 4, 1)], validate_only=True)
    assert fs[v].result(timeout=30) is None
    assert v not in admin.list_topics(timeout=10).topics, "validate_only created the topic"

    # Errors from the protocol guide.
    fs = admin.create_topics([NewTopic(t, 3, 1)])
    assert _ck_error_code(fs[t]) == KafkaError.TOPIC_ALREADY_EXISTS
    bad = unique("ck-adm-badcfg")
    fs = admin.create_topics([NewTopic(bad, 1, 1, config={"retention.ms": "not-a-number"})])
    assert _ck_error_code(fs[bad]) == KafkaError.INVALID_CONFIG
    assert bad not in admin.list_topics(timeout=10).topics


def test_confluent_describe_configs(cluster):
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-adm-desc")
    ck_create_topic(cluster.bootstrap, t, 1, {"retention.ms": "3600000"}, admin=admin)
    cfg = _ck_describe(admin, t)
    for key in ("retention.ms", "retention.bytes", "max.message.bytes", "cleanup.policy"):
        assert key in cfg, f"{key} missing from DescribeConfigs ({sorted(cfg)[:20]} ...)"
    assert cfg["retention.ms"].value == "3600000"
    assert _src(cfg["retention.ms"]) == "DYNAMIC_TOPIC_CONFIG"
    assert not cfg["retention.ms"].is_default
    assert cfg["max.message.bytes"].value == DEFAULT_MAX_MESSAGE_BYTES
    assert _src(cfg["max.message.bytes"]) in DEFAULT_SOURCES
    assert cfg["cleanup.policy"].value == "delete"
    assert cfg["retention.bytes"].value == "-1"

    # An unset topic reports the default.
    u = unique("ck-adm-desc-default")
    ck_create_topic(cluster.bootstrap, u, 1, admin=admin)
    cfg = _ck_describe(admin, u)
    assert cfg["retention.ms"].value == DEFAULT_RETENTION_MS
    assert _src(cfg["retention.ms"]) in DEFAULT_SOURCES


def _described(admin, topic, want: dict[str, str], timeout: float = 15):
    """The topic's configs once every key of `want` shows its value (bounded wait)."""
    return wait_until(
        lambda: (lambda c: c if all(c[k].value == v for k, v in want.items()) else None)(
            _ck_describe(admin, topic)),
        timeout=timeout, what=f"configs of {topic} to show {want}")


def test_confluent_alter_configs(cluster):
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-adm-alter")
    ck_create_topic(cluster.bootstrap, t, 1, {"retention.ms": "3600000"}, admin=admin)

    # Incremental: only the named keys change.
    res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
        ConfigEntry("retention.bytes", "10485760", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("max.message.bytes", "200000", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("cleanup.policy", "delete", incremental_operation=AlterConfigOpType.SET),
    ])
    admin.incremental_alter_configs([res])[res].result(timeout=30)
    # Apache Kafka applies a config change asynchronously (through its metadata log): a
    # describe right after the alter may still show the old value there.
    cfg = _described(admin, t, {"retention.bytes": "10485760"})
    assert _src(cfg["retention.bytes"]) == "DYNAMIC_TOPIC_CONFIG"
    assert cfg["max.message.bytes"].value == "200000"
    assert cfg["cleanup.policy"].value == "delete"
    assert cfg["retention.ms"].value == "3600000", "incremental alter touched another key"

    # Incremental DELETE reverts to the default.
    res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
        ConfigEntry("retention.bytes", None, incremental_operation=AlterConfigOpType.DELETE)])
    admin.incremental_alter_configs([res])[res].result(timeout=30)
    cfg = _described(admin, t, {"retention.bytes": "-1"})
    assert _src(cfg["retention.bytes"]) in DEFAULT_SOURCES

    # validate_only changes nothing.
    res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
        ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([res], validate_only=True)[res].result(timeout=30)
    assert _ck_describe(admin, t)["retention.ms"].value == "3600000"

    # Legacy AlterConfigs replaces the whole set: keys not named go back to their defaults.
    res = ConfigResource(ResourceType.TOPIC, t, set_config={"retention.ms": "7200000"})
    admin.alter_configs([res])[res].result(timeout=30)
    cfg = _described(admin, t, {"retention.ms": "7200000"})
    assert _src(cfg["retention.ms"]) == "DYNAMIC_TOPIC_CONFIG"
    assert cfg["max.message.bytes"].value == DEFAULT_MAX_MESSAGE_BYTES, \
        "AlterConfigs must reset keys it does not name (max.message.bytes was 200000)"


def test_confluent_alter_configs_errors(cluster):
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-adm-alter-err")
    ck_create_topic(cluster.bootstrap, t, 1, admin=admin)
    res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
        ConfigEntry("retention.ms", "soon", incremental_operation=AlterConfigOpType.SET)])
    assert _ck_error_code(admin.incremental_alter_configs([res])[res]) == KafkaError.INVALID_CONFIG
    missing = unique("ck-adm-missing")
    res = ConfigResource(ResourceType.TOPIC, missing, incremental_configs=[
        ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    assert _ck_error_code(admin.incremental_alter_configs([res])[res]) == \
        KafkaError.UNKNOWN_TOPIC_OR_PART


def test_confluent_max_message_bytes(cluster):
    """A record batch larger than the topic's max.message.bytes is refused with
    MESSAGE_TOO_LARGE (librdkafka: MSG_SIZE_TOO_LARGE); raising the limit lets it in."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-maxmsg")
    ck_create_topic(cluster.bootstrap, t, 1, {"max.message.bytes": "10000"}, admin=admin)
    p = ck_producer(cluster.bootstrap, **{"linger.ms": 0, "compression.type": "none"})
    results = []
    p.produce(t, key=b"small", value=b"x" * 5000, on_delivery=lambda e, m: results.append(e))
    assert p.flush(30) == 0
    p.produce(t, key=b"big", value=b"y" * 20000, on_delivery=lambda e, m: results.append(e))
    assert p.flush(30) == 0
    assert results[0] is None, f"5000-byte record refused: {results[0]}"
    assert results[1] is not None and results[1].code() == KafkaError.MSG_SIZE_TOO_LARGE, \
        f"20000-byte record on a 10000-byte topic: got {results[1]!r}"

    res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
        ConfigEntry("max.message.bytes", "100000", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([res])[res].result(timeout=30)
    # Apache Kafka's KRaft broker applies the alter from its metadata image, which may trail
    # the answer: produce once the topic's config says 100000.
    wait_until(lambda: _ck_describe(admin, t)["max.message.bytes"].value == "100000", 15,
               "max.message.bytes raised to 100000")
    results.clear()
    p.produce(t, key=b"big", value=b"y" * 20000, on_delivery=lambda e, m: results.append(e))
    assert p.flush(30) == 0
    assert results == [None], f"20000-byte record refused after raising the limit: {results}"


def test_confluent_create_partitions(cluster):
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import NewPartitions
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-adm-parts")
    ck_create_topic(cluster.bootstrap, t, 2, admin=admin)
    admin.create_partitions([NewPartitions(t, 5)])[t].result(timeout=30)
    ck_wait_topic(admin, t, 5)
    # The new partitions take records.
    p = ck_producer(cluster.bootstrap)
    acks = []
    p.produce(t, value=b"to-4", partition=4, on_delivery=lambda e, m: acks.append((e, m.partition(), m.offset())))
    assert p.flush(30) == 0
    assert acks == [(None, 4, 0)]
    # Shrinking is refused.
    assert _ck_error_code(admin.create_partitions([NewPartitions(t, 3)])[t]) == \
        KafkaError.INVALID_PARTITIONS
    # validate_only adds nothing.
    admin.create_partitions([NewPartitions(t, 8)], validate_only=True)[t].result(timeout=30)
    assert len(admin.list_topics(timeout=10).topics[t].partitions) == 5


def test_confluent_delete_records(cluster):
    from confluent_kafka import KafkaError, TopicPartition, OFFSET_BEGINNING, KafkaException
    from confluent_kafka.admin import OffsetSpec
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-adm-delrec")
    ck_create_topic(cluster.bootstrap, t, 1, admin=admin)
    recs = make_records(100, n_keys=5, value_size=20)
    ck_produce(ck_producer(cluster.bootstrap), t, recs)
    tp = TopicPartition(t, 0, 40)
    fs = admin.delete_records([tp])
    deleted = list(fs.values())[0].result(timeout=30)
    assert deleted.low_watermark == 40
    c = ck_consumer(cluster.bootstrap)
    try:
        assert c.get_watermark_offsets(TopicPartition(t, 0), timeout=10) == (40, 100)
        lo = admin.list_offsets({TopicPartition(t, 0): OffsetSpec.earliest()})
        assert list(lo.values())[0].result(timeout=30).offset == 40
        c.assign([TopicPartition(t, 0, OFFSET_BEGINNING)])
        first = None
        deadline = time.monotonic() + 30
        while first is None and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None:
                if m.error():
                    raise KafkaException(m.error())
                first = m.offset()
        assert first == 40, f"reading from the beginning started at {first}"
    finally:
        c.close()
    # Past the high watermark: OFFSET_OUT_OF_RANGE.
    fs = admin.delete_records([TopicPartition(t, 0, 500)])
    assert _ck_error_code(list(fs.values())[0]) == KafkaError.OFFSET_OUT_OF_RANGE


def test_confluent_describe_cluster_and_list_topics(cluster):
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-adm-list")
    ck_create_topic(cluster.bootstrap, t, 4, admin=admin)
    desc = admin.describe_cluster(request_timeout=30).result(timeout=30)
    assert desc.cluster_id, "empty cluster id"
    assert desc.nodes, "no brokers"
    assert desc.controller is not None
    addrs = {f"{n.host}:{n.port}" for n in desc.nodes}
    assert set(cluster.bootstraps) & addrs, f"brokers {addrs} do not include {cluster.bootstraps}"
    md = admin.list_topics(timeout=10)
    assert t in md.topics and len(md.topics[t].partitions) == 4
    assert md.cluster_id == desc.cluster_id
    ids = {n.id for n in desc.nodes}
    for p in md.topics[t].partitions.values():
        assert p.leader in ids and p.replicas and p.isrs


def test_confluent_consumer_groups_admin(cluster):
    from confluent_kafka import (ConsumerGroupState, ConsumerGroupTopicPartitions, KafkaError,
                                 TopicPartition)
    admin = ck_admin(cluster.bootstrap)
    t, g = unique("ck-adm-grp"), unique("ck-adm-group")
    ck_create_topic(cluster.bootstrap, t, 3, admin=admin)
    ck_produce(ck_producer(cluster.bootstrap), t, make_records(30, n_keys=10, value_size=10))
    c = ck_consumer(cluster.bootstrap, **{"group.id": g, "client.id": "adm-member",
                                          "partition.assignment.strategy": "range"})
    try:
        c.subscribe([t])
        got = 0
        deadline = time.monotonic() + 30
        while got < 30:
            assert time.monotonic() < deadline, f"consumed {got}/30"
            got += len([m for m in c.consume(100, timeout=0.5) if not m.error()])
        c.commit(asynchronous=False)

        def listed_stable():
            res = admin.list_consumer_groups(request_timeout=10).result(timeout=10)
            return any(x.group_id == g and x.state == ConsumerGroupState.STABLE for x in res.valid)
        wait_until(listed_stable, 30, f"group {g} listed as STABLE")

        desc = admin.describe_consumer_groups([g])[g].result(timeout=30)
        assert desc.group_id == g
        assert desc.state == ConsumerGroupState.STABLE
        assert desc.partition_assignor == "range"
        assert len(desc.members) == 1
        assert desc.members[0].client_id == "adm-member"
        assigned = {(tp.topic, tp.partition) for tp in desc.members[0].assignment.topic_partitions}
        assert assigned == {(t, 0), (t, 1), (t, 2)}

        offs = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(g, [TopicPartition(t, p) for p in range(3)])]
        )[g].result(timeout=30)
        highs = {p: c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1] for p in range(3)}
        assert {tp.partition: tp.offset for tp in offs.topic_partitions} == highs

        # A group with members cannot be deleted.
        assert _ck_error_code(admin.delete_consumer_groups([g])[g]) == KafkaError.NON_EMPTY_GROUP
    finally:
        c.close()

    wait_until(lambda: admin.describe_consumer_groups([g])[g].result(timeout=10).state
               == ConsumerGroupState.EMPTY, 30, f"group {g} EMPTY after its member left")
    admin.delete_consumer_groups([g])[g].result(timeout=30)
    res = admin.list_consumer_groups(request_timeout=10).result(timeout=10)
    assert g not in {x.group_id for x in res.valid}, "deleted group still listed"
    offs = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(g, [TopicPartition(t, p) for p in range(3)])]
    )[g].result(timeout=30)
    assert all(tp.offset < 0 for tp in offs.topic_partitions), \
        f"offsets of a deleted group: {offs.topic_partitions}"
    # Deleting it again: GROUP_ID_NOT_FOUND.
    assert _ck_error_code(admin.delete_consumer_groups([g])[g]) == KafkaError.GROUP_ID_NOT_FOUND


def test_confluent_delete_topics(cluster):
    from confluent_kafka import KafkaError
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-adm-del")
    ck_create_topic(cluster.bootstrap, t, 2, admin=admin)
    admin.delete_topics([t], operation_timeout=30)[t].result(timeout=30)
    wait_until(lambda: t not in admin.list_topics(timeout=10).topics, 30,
               f"{t} gone from metadata")
    assert _ck_error_code(admin.delete_topics([t])[t]) == KafkaError.UNKNOWN_TOPIC_OR_PART


# -- kafka-python ----------------------------------------------------------------------------


@pytest.fixture
def kp_admin(cluster):
    from kafka import KafkaAdminClient
    a = KafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    yield a
    a.close()


def _kp_describe(admin, topic) -> dict:
    from kafka.admin import ConfigResource, ConfigResourceType
    out = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)],
                                 config_filter="all")
    return out["topic"][topic]


def _kp_wait_configs(admin, topic, expected: dict) -> dict:
    """Describes until every key has its expected value: Apache Kafka (KRaft) answers
    DescribeConfigs from the broker's metadata image, which may trail an alter's answer."""
    def matches():
        cfg = _kp_describe(admin, topic)
        return cfg if all(cfg[k]["value"] == v for k, v in expected.items()) else None
    return wait_until(matches, 15, f"configs {expected} on {topic}")


def test_kafka_python_topics_and_configs(cluster, kp_admin):
    from kafka.admin import AlterConfigOp, ConfigResource, ConfigResourceType
    from kafka.errors import InvalidConfigurationError, TopicAlreadyExistsError
    admin = kp_admin
    t = unique("kp-adm")
    admin.create_topics({t: {"num_partitions": 3, "replication_factor": 1,
                             "configs": {"retention.ms": "3600000"}}}, wait_for_metadata=True)
    assert t in admin.list_topics()
    [desc] = admin.describe_topics([t])
    assert desc["name"] == t and len(desc["partitions"]) == 3

    v = unique("kp-adm-validate")
    admin.create_topics({v: {"num_partitions": 2, "replication_factor": 1}}, validate_only=True)
    assert v not in admin.list_topics()
    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topics({t: {"num_partitions": 3, "replication_factor": 1}})
    with pytest.raises(InvalidConfigurationError):
        admin.create_topics({unique("kp-bad"): {"num_partitions": 1, "replication_factor": 1,
                                                 "configs": {"retention.ms": "x"}}})

    cfg = _kp_describe(admin, t)
    assert cfg["retention.ms"]["value"] == "3600000"
    assert cfg["retention.ms"]["config_source"] == "DYNAMIC_TOPIC_CONFIG"
    assert cfg["max.message.bytes"]["value"] == DEFAULT_MAX_MESSAGE_BYTES
    assert cfg["max.message.bytes"]["config_source"] in DEFAULT_SOURCES

    # Incremental (kafka-python picks IncrementalAlterConfigs when the broker offers it).
    r = admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t, {
        "retention.bytes": "5000000", "cleanup.policy": "delete",
        "max.message.bytes": (AlterConfigOp.SET, "300000")})], incremental=True)
    assert r == {"topic": {t: "OK"}}, r
    _kp_wait_configs(admin, t, {"retention.bytes": "5000000", "max.message.bytes": "300000",
                                "retention.ms": "3600000"})
    r = admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t, {
        "retention.bytes": (AlterConfigOp.DELETE, None)})], incremental=True)
    assert r == {"topic": {t: "OK"}}, r
    _kp_wait_configs(admin, t, {"retention.bytes": "-1"})

    # Legacy AlterConfigs (kafka-python re-sends the other modified keys itself).
    r = admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t,
                                            {"retention.ms": "7200000"})], incremental=False)
    assert r == {"topic": {t: "OK"}}, r
    _kp_wait_configs(admin, t, {"retention.ms": "7200000", "max.message.bytes": "300000"})

    admin.create_partitions({t: 6})
    wait_until(lambda: len(admin.describe_topics([t])[0]["partitions"]) == 6, 20,
               "6 partitions after create_partitions")

    admin.delete_topics([t])
    wait_until(lambda: t not in admin.list_topics(), 30, f"{t} gone")


def test_kafka_python_records_and_offsets(cluster, kp_admin):
    from kafka import KafkaProducer, TopicPartition
    from kafka.admin import OffsetSpec
    from kafka.errors import MessageSizeTooLargeError
    admin = kp_admin
    t = unique("kp-adm-rec")
    admin.create_topics({t: {"num_partitions": 1, "replication_factor": 1,
                             "configs": {"max.message.bytes": "10000"}}}, wait_for_metadata=True)
    p = KafkaProducer(bootstrap_servers=cluster.bootstrap, linger_ms=0)
    try:
        for i in range(100):
            p.send(t, key=b"k", value=b"v%d" % i)
        p.flush(timeout=30)
        # Over the topic's max.message.bytes: the broker answers MESSAGE_TOO_LARGE.
        with pytest.raises(MessageSizeTooLargeError):
            p.send(t, value=b"z" * 20000).get(timeout=30)
    finally:
        p.close()
    tp = TopicPartition(t, 0)
    res = admin.delete_records({tp: 40})
    assert res[tp]["low_watermark"] == 40
    offs = admin.list_partition_offsets({tp: OffsetSpec.EARLIEST})
    assert offs[tp].offset == 40
    offs = admin.list_partition_offsets({tp: OffsetSpec.LATEST})
    assert offs[tp].offset == 100


def test_kafka_python_cluster_and_groups(cluster, kp_admin):
    from kafka import KafkaConsumer, KafkaProducer
    admin = kp_admin
    info = admin.describe_cluster()
    assert info["cluster_id"] and info["brokers"]
    t, g = unique("kp-adm-grp"), unique("kp-adm-group")
    admin.create_topics({t: {"num_partitions": 2, "replication_factor": 1}}, wait_for_metadata=True)
    p = KafkaProducer(bootstrap_servers=cluster.bootstrap)
    for i in range(20):
        p.send(t, key=b"%d" % i, value=b"x")
    p.flush(timeout=30)
    p.close()
    c = KafkaConsumer(t, bootstrap_servers=cluster.bootstrap, group_id=g,
                      enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        n = 0
        deadline = time.monotonic() + 30
        while n < 20:
            assert time.monotonic() < deadline, f"consumed {n}/20"
            n += sum(len(v) for v in c.poll(timeout_ms=500).values())
        c.commit()
        groups = {x["group_id"]: x for x in admin.list_groups()}
        assert g in groups and groups[g]["protocol_type"] == "consumer"
        d = admin.describe_groups([g])[g]
        assert d["error"] is None and d["group_state"] == "Stable" and len(d["members"]) == 1
        offs = admin.list_group_offsets({g: None})[g]
        assert sum(om.offset for om in offs.values()) == 20
        assert admin.delete_groups([g]) == {g: "NonEmptyGroupError"}
    finally:
        c.close()
    wait_until(lambda: admin.describe_groups([g])[g]["group_state"] == "Empty", 30, "group Empty")
    assert admin.delete_groups([g]) == {g: "OK"}
    assert g not in {x["group_id"] for x in admin.list_groups()}


def test_confluent_topic_compression_type(cluster):
    """Topic compression.type takes Kafka's values (uncompressed, gzip, snappy, lz4, zstd,
    producer), stored and described back; others get INVALID_CONFIG. Records produced with
    another codec read back the same (Kafka recompresses them to the topic's codec; Tributary
    keeps the producer's batch, a documented difference invisible to consumers)."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import (AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic,
                                       ResourceType)
    admin = ck_admin(cluster.bootstrap)
    t = unique("ck-codec")
    ck_create_topic(cluster.bootstrap, t, 1, {"compression.type": "gzip"}, admin=admin)
    cfg = _ck_describe(admin, t)
    assert cfg["compression.type"].value == "gzip"
    assert _src(cfg["compression.type"]) == "DYNAMIC_TOPIC_CONFIG"
    for codec in ("uncompressed", "snappy", "lz4", "zstd", "producer", "gzip"):
        res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
            ConfigEntry("compression.type", codec, incremental_operation=AlterConfigOpType.SET)])
        admin.incremental_alter_configs([res])[res].result(timeout=30)
        _described(admin, t, {"compression.type": codec})
    for bad in ("none", "GZIP", "brotli"):
        res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
            ConfigEntry("compression.type", bad, incremental_operation=AlterConfigOpType.SET)])
        assert _ck_error_code(admin.incremental_alter_configs([res])[res]) == \
            KafkaError.INVALID_CONFIG, bad
        bad_topic = unique("ck-codec-bad")
        fs = admin.create_topics([NewTopic(bad_topic, 1, 1, config={"compression.type": bad})],
                                 request_timeout=30)
        assert _ck_error_code(fs[bad_topic]) == KafkaError.INVALID_CONFIG, bad
    _described(admin, t, {"compression.type": "gzip"})

    # Back to the default: DELETE (incremental), then AlterConfigs without it.
    res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
        ConfigEntry("compression.type", None, incremental_operation=AlterConfigOpType.DELETE)])
    admin.incremental_alter_configs([res])[res].result(timeout=30)
    cfg = _described(admin, t, {"compression.type": "producer"})
    assert _src(cfg["compression.type"]) in DEFAULT_SOURCES

    # lz4 batches on a zstd topic: the consumer gets every record as produced.
    res = ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
        ConfigEntry("compression.type", "zstd", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([res])[res].result(timeout=30)
    recs = make_records(200, value_size=300)
    p = ck_producer(cluster.bootstrap, **{"compression.type": "lz4", "linger.ms": 20})
    ck_produce(p, t, recs)
    got = ck_read_all(cluster.bootstrap, t, 1)
    assert [(g.key, g.value) for g in got] == [(r.key, r.value) for r in recs]
