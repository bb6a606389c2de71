"""Kafka's tiered-storage switch chooses a topic's log store backend (docs/storage.md).

The server has the local log as its default and an object store (a filesystem bucket through
OpenDAL) beside it. `remote.storage.enable=true` at CreateTopics puts a topic on the object
store: its records reach the bucket, it is described back as `true`, and it cannot be turned
off (Tributary moves no data between backends). Apache Kafka refuses the same topic unless
the broker runs a remote log manager, so there is no reference run: a documented difference
(docs/compat/kafka.md, Topic configs).
"""

from __future__ import annotations

import pathlib

import pytest

from kafkacompat import (
    ck_admin, ck_create_topic, ck_produce, ck_read_all, make_records, unique,
)


def _files(root: pathlib.Path, part: str) -> list[pathlib.Path]:
    return [p for p in root.rglob("*") if p.is_file() and part in str(p.relative_to(root))]


@pytest.fixture
def tiered(make_deployment, tmp_path):
    bucket = tmp_path / "bucket"
    cfg = tmp_path / "tiered.toml"
    cfg.write_text(
        'storage = "local"\nopendal_ack = "shared"\nopendal_upload_interval_ms = 10\n'
        f'[opendal]\nscheme = "fs"\nroot = "{bucket}"\n'
    )
    return make_deployment("standalone", ["--config", str(cfg)]), bucket


def _describe(admin, topic) -> dict:
    from confluent_kafka.admin import ConfigResource, ResourceType
    res = ConfigResource(ResourceType.TOPIC, topic)
    return admin.describe_configs([res], request_timeout=30)[res].result(timeout=30)


def test_remote_storage_enable_puts_a_topic_on_the_object_store(tiered):
    from confluent_kafka import KafkaException
    from confluent_kafka import Producer
    from confluent_kafka.admin import (
        AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType,
    )

    d, bucket = tiered
    admin = ck_admin(d.bootstrap)
    local_topic, remote_topic = unique("tier-local"), unique("tier-remote")
    ck_create_topic(d.bootstrap, local_topic, 1, admin=admin)
    ck_create_topic(d.bootstrap, remote_topic, 1, {"remote.storage.enable": "true"},
                    admin=admin)

    local_cfg = _describe(admin, local_topic)["remote.storage.enable"]
    remote_cfg = _describe(admin, remote_topic)["remote.storage.enable"]
    assert local_cfg.value == "false" and local_cfg.is_default
    assert remote_cfg.value == "true" and not remote_cfg.is_default

    # The local topic's records stay off the bucket; the remote one's are acknowledged
    # (acks=all) once a WAL object in the bucket holds them.
    recs = make_records(200, value_size=300)
    producer = Producer({"bootstrap.servers": d.bootstrap, "acks": "all"})
    ck_produce(producer, local_topic, recs)
    assert _files(bucket, "wal") == [], "a local topic's records reached the object store"
    ck_produce(producer, remote_topic, recs)
    assert _files(bucket, "wal"), "no WAL object in the bucket after acks=all produce"
    for topic in (local_topic, remote_topic):
        got = ck_read_all(d.bootstrap, topic, 1)
        assert [g.value for g in got] == [r.value for r in recs], topic

    # Turning it off (or on, for the local topic) is refused: no data moves between backends.
    for topic, value in ((remote_topic, "false"), (local_topic, "true")):
        res = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
            ConfigEntry("remote.storage.enable", value,
                        incremental_operation=AlterConfigOpType.SET)])
        fut = admin.incremental_alter_configs([res])[res]
        with pytest.raises(KafkaException) as ei:
            fut.result(timeout=30)
        assert ei.value.args[0].code() == 40, ei.value  # INVALID_CONFIG
        assert "cannot change" in ei.value.args[0].str(), ei.value
    assert _describe(admin, remote_topic)["remote.storage.enable"].value == "true"

    # After a restart the topics are where they were.
    d.restart()
    for topic in (local_topic, remote_topic):
        got = ck_read_all(d.bootstrap, topic, 1)
        assert len(got) == len(recs), topic
