"""SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) on the Kafka listener.

`--kafka-sasl` turns SASL on; users come from `[[users]]` entries of the TOML file given with
`--config FILE`, each with the salted credentials `tributary passwd` prints for a password
read on stdin. `write_sasl_config` is the one place that knows that format.
"""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from kafkacompat import (ck_create_topic, ck_producer, ck_produce, ck_read_all, make_records,
                         unique, wait_until)
from tributary_process import tributary_bin

USERS = {"alice": "alice-secret", "bob": "bob-secret"}
MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def write_sasl_config(path: pathlib.Path, users: dict[str, str]) -> pathlib.Path:
    """Writes a tributary config with one `[[users]]` entry per user:

        [[users]]
        name = "alice"
        credentials = ["SCRAM-SHA-256$4096:...", "SCRAM-SHA-512$4096:..."]

    the credentials line as printed by `tributary passwd` (password on stdin).
    """
    lines = []
    for name, password in users.items():
        out = subprocess.run([tributary_bin(), "passwd"], input=password.encode(),
                             capture_output=True, timeout=60, check=True).stdout.decode()
        cred = [ln for ln in out.splitlines() if ln.startswith("credentials")]
        assert len(cred) == 1, f"`tributary passwd` printed no credentials line: {out!r}"
        lines += ["[[users]]", f'name = "{name}"', cred[0], ""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def sasl_cluster(make_deployment, tmp_path):
    cfg = write_sasl_config(tmp_path / "sasl.toml", USERS)
    return make_deployment("standalone", ["--kafka-sasl", "--config", str(cfg)])


def _sasl(mech, user="alice", password=None):
    return {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": mech,
        "sasl.username": user,
        "sasl.password": USERS.get(user) if password is None else password,
    }


@pytest.mark.parametrize("mech", MECHANISMS)
def test_confluent_sasl_round_trip(sasl_cluster, mech):
    from confluent_kafka.admin import AdminClient
    b = sasl_cluster.bootstrap
    conf = _sasl(mech)
    admin = AdminClient({"bootstrap.servers": b, **conf})
    t = unique(f"sasl-{mech.lower()}")
    ck_create_topic(b, t, 2, admin=admin)
    recs = make_records(500, n_keys=10, value_size=40)
    delivered = ck_produce(ck_producer(b, **conf), t, recs)
    got = ck_read_all(b, t, 2, **conf)
    assert len(got) == len(recs) == len(delivered)


@pytest.mark.parametrize("mech", MECHANISMS)
def test_confluent_sasl_wrong_password(sasl_cluster, mech):
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    errors = []
    admin = AdminClient({"bootstrap.servers": sasl_cluster.bootstrap,
                         **_sasl(mech, password="wrong"),
                         "error_cb": lambda e: errors.append(e)})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=2)
    # librdkafka reports the broker's SASL_AUTHENTICATION_FAILED as _AUTHENTICATION through
    # error_cb, which is served by poll().
    auth = (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED)
    wait_until(lambda: admin.poll(0.1) is not None and any(e.code() in auth for e in errors),
               10, f"an authentication error (got {errors})")


def test_confluent_sasl_unknown_user(sasl_cluster):
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    errors = []
    admin = AdminClient({"bootstrap.servers": sasl_cluster.bootstrap,
                         **_sasl("SCRAM-SHA-256", user="mallory", password="x"),
                         "error_cb": lambda e: errors.append(e)})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=2)
    auth = (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED)
    wait_until(lambda: admin.poll(0.1) is not None and any(e.code() in auth for e in errors),
               10, f"an authentication error (got {errors})")


def test_plaintext_client_rejected(sasl_cluster):
    """A client without SASL must not get metadata from a SASL listener."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": sasl_cluster.bootstrap})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=2)


@pytest.mark.parametrize("mech", MECHANISMS)
def test_kafka_python_sasl(sasl_cluster, mech):
    from kafka import KafkaProducer
    from kafka.errors import KafkaError as KpError
    b = sasl_cluster.bootstrap
    t = unique("kp-sasl")
    p = KafkaProducer(bootstrap_servers=b, security_protocol="SASL_PLAINTEXT",
                      sasl_mechanism=mech, sasl_plain_username="bob",
                      sasl_plain_password=USERS["bob"])
    try:
        md = p.send(t, b"hello").get(timeout=30)
        assert md.offset == 0
    finally:
        p.close()
    with pytest.raises(KpError):
        bad = KafkaProducer(bootstrap_servers=b, security_protocol="SASL_PLAINTEXT",
                            sasl_mechanism=mech, sasl_plain_username="bob",
                            sasl_plain_password="wrong", max_block_ms=5000,
                            bootstrap_timeout_ms=3000)  # kafka-python retries a failed login
        bad.send(t, b"nope").get(timeout=10)


@pytest.mark.parametrize("mech", MECHANISMS)
def test_aiokafka_sasl(sasl_cluster, mech):
    import asyncio
    from aiokafka import AIOKafkaProducer

    async def run():
        p = AIOKafkaProducer(bootstrap_servers=sasl_cluster.bootstrap,
                             security_protocol="SASL_PLAINTEXT", sasl_mechanism=mech,
                             sasl_plain_username="alice", sasl_plain_password=USERS["alice"])
        await p.start()
        try:
            md = await p.send_and_wait(unique("aio-sasl"), b"hello")
            assert md.offset == 0
        finally:
            await p.stop()

    asyncio.run(run())
