"""Kafka over TLS (`--kafka-tls-listen` with `--tls-cert` / `--tls-key`): the clients'
`security.protocol` SSL, and SASL_SSL when `--kafka-sasl` is on. The TLS listener has its own
advertised address, so a client that bootstrapped over TLS is sent to the TLS port and stays
encrypted. Checked with librdkafka (confluent-kafka) and kafka-python.
"""

from __future__ import annotations

import socket
import struct

import pytest

from tlscert import write_self_signed
from kafkacompat import (ck_create_topic, ck_producer, ck_produce, ck_read_all, make_records,
                         unique)
from test_sasl import USERS, write_sasl_config


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1: (cert.pem, key.pem)."""
    cert, key = write_self_signed(tmp_path_factory.mktemp("kafka-tls"))
    return str(cert), str(key)


def _tls_args(certificate) -> list[str]:
    cert, key = certificate
    return ["--kafka-tls-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key]


def _tls_bootstrap(deployment) -> str:
    listeners = deployment.processes[0].listeners
    assert "kafka-tls" in listeners, f"no `listening kafka-tls` line: {listeners}"
    return listeners["kafka-tls"]


@pytest.fixture
def tls_cluster(make_deployment, certificate):
    return make_deployment("standalone", _tls_args(certificate))


@pytest.fixture
def sasl_tls_cluster(make_deployment, certificate, tmp_path):
    cfg = write_sasl_config(tmp_path / "sasl.toml", USERS)
    return make_deployment("standalone",
                           ["--kafka-sasl", "--config", str(cfg), *_tls_args(certificate)])


def test_confluent_ssl_round_trip_stays_on_the_tls_port(tls_cluster, certificate):
    from confluent_kafka.admin import AdminClient
    b = _tls_bootstrap(tls_cluster)
    conf = {"security.protocol": "SSL", "ssl.ca.location": certificate[0]}
    admin = AdminClient({"bootstrap.servers": b, **conf})
    # The broker the client is sent to is the TLS listener, not the plain one.
    brokers = admin.list_topics(timeout=30).brokers
    assert [f"{m.host}:{m.port}" for m in brokers.values()] == [b]
    assert b != tls_cluster.bootstrap
    t = unique("tls")
    ck_create_topic(b, t, 2, admin=admin)
    recs = make_records(300, n_keys=10, value_size=100)
    delivered = ck_produce(ck_producer(b, **conf), t, recs)
    got = ck_read_all(b, t, 2, **conf)
    assert len(delivered) == len(recs)
    assert sorted((g.key, g.value) for g in got) == sorted((r.key, r.value) for r in recs)
    # The same topic through the plain listener: one broker, two ways in.
    assert len(ck_read_all(tls_cluster.bootstrap, t, 2)) == len(recs)


def test_kafka_python_ssl_round_trip(tls_cluster, certificate):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    b = _tls_bootstrap(tls_cluster)
    ssl = {"security_protocol": "SSL", "ssl_cafile": certificate[0]}
    t = unique("tls-kp")
    producer = KafkaProducer(bootstrap_servers=b, **ssl)
    for i in range(50):
        producer.send(t, key=b"k", value=f"v{i}".encode()).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=b, enable_auto_commit=False,
                             consumer_timeout_ms=10_000, **ssl)
    tp = TopicPartition(t, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    values = [m.value for m in consumer]
    consumer.close()
    assert values == [f"v{i}".encode() for i in range(50)]


def test_unverified_certificate_is_refused_by_the_client(tls_cluster):
    """Without the CA the client must not talk to the broker (a real handshake happens)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": _tls_bootstrap(tls_cluster),
                         "security.protocol": "SSL", "error_cb": lambda e: None})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)


def test_plaintext_request_on_the_tls_port_gets_no_kafka_answer(tls_cluster):
    """A Kafka request sent in clear to the TLS port is not served: the connection closes
    (the bytes are not a TLS ClientHello), and the listener keeps serving TLS clients."""
    host, port = _tls_bootstrap(tls_cluster).rsplit(":", 1)
    body = struct.pack(">hhih", 18, 0, 1, 4) + b"test"  # ApiVersions v0, client id "test"
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        s.settimeout(10)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    # A Kafka answer is a size, then the request's correlation id (1); a TLS alert starts 0x15.
    assert data[4:8] != struct.pack(">i", 1), f"answered a plaintext Kafka request: {data[:16]!r}"
    assert data == b"" or data[0] == 0x15, data[:16]


@pytest.mark.parametrize("mech", ["PLAIN", "SCRAM-SHA-512"])
def test_confluent_sasl_ssl(sasl_tls_cluster, certificate, mech):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    b = _tls_bootstrap(sasl_tls_cluster)
    conf = {"security.protocol": "SASL_SSL", "ssl.ca.location": certificate[0],
            "sasl.mechanism": mech, "sasl.username": "alice", "sasl.password": USERS["alice"]}
    t = unique(f"sasl-ssl-{mech.lower()}")
    admin = AdminClient({"bootstrap.servers": b, **conf})
    ck_create_topic(b, t, 1, admin=admin)
    recs = make_records(100, n_keys=5, value_size=50)
    ck_produce(ck_producer(b, **conf), t, recs)
    assert len(ck_read_all(b, t, 1, **conf)) == len(recs)
    wrong = AdminClient({"bootstrap.servers": b, **conf, "sasl.password": "wrong",
                         "error_cb": lambda e: None})
    with pytest.raises(KafkaException):
        wrong.list_topics(timeout=5)


@pytest.fixture
def mtls_cluster(make_deployment, certificate):
    """Client certificates required on the TLS listener, signed by the test CA (the server's
    own self-signed certificate)."""
    return make_deployment("standalone", [*_tls_args(certificate), "--tls-client-auth",
                                          "required", "--tls-client-ca", certificate[0]])


def test_confluent_with_a_client_certificate_when_the_listener_requires_one(
        mtls_cluster, certificate, tmp_path):
    """`ssl.client.auth=required`'s equivalent: librdkafka with `ssl.certificate.location`
    and `ssl.key.location` signed by the CA produces and consumes; without a certificate,
    or with one from another CA, it never gets metadata."""
    import pathlib

    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    from tlscert import write_signed_client
    b = _tls_bootstrap(mtls_cluster)
    cert, key = write_signed_client(tmp_path, pathlib.Path(certificate[0]),
                                    pathlib.Path(certificate[1]))
    conf = {"security.protocol": "SSL", "ssl.ca.location": certificate[0],
            "ssl.certificate.location": str(cert), "ssl.key.location": str(key)}
    t = unique("mtls")
    ck_create_topic(b, t, 1, admin=AdminClient({"bootstrap.servers": b, **conf}))
    recs = make_records(20, n_keys=2, value_size=50)
    assert len(ck_produce(ck_producer(b, **conf), t, recs)) == len(recs)
    assert len(ck_read_all(b, t, 1, **conf)) == len(recs)

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_ca, other_ca_key = write_self_signed(other_dir)
    stranger = write_signed_client(other_dir, other_ca, other_ca_key, "stranger")
    for what, extra in [
        ("no client certificate", {}),
        ("a certificate from another CA",
         {"ssl.certificate.location": str(stranger[0]), "ssl.key.location": str(stranger[1])}),
    ]:
        admin = AdminClient({"bootstrap.servers": b, "security.protocol": "SSL",
                             "ssl.ca.location": certificate[0], **extra})
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=5)


@pytest.fixture
def mtls_acl_cluster(make_deployment, certificate):
    """Client certificates required, the authorizer on without SASL: each connection's
    principal is its certificate subject through ssl.principal.mapping.rules (here: the CN,
    lower-cased, of certificates with OU=eng; nothing else is let in)."""
    return make_deployment("standalone", [
        *_tls_args(certificate), "--tls-client-auth", "required",
        "--tls-client-ca", certificate[0], "--kafka-authorizer", "--kafka-super-users", "admin",
        "--kafka-ssl-principal-mapping-rules", "RULE:^CN=([^,]*),OU=eng$/$1/L"])


def test_certificate_principals_are_mapped_by_the_rules_and_authorized_by_acls(
        mtls_acl_cluster, certificate, tmp_path):
    """Kafka's SSL principal: `CN=Admin,OU=eng` maps to the super user `admin`, `CN=alice,OU=eng`
    to `alice`, who may write only once an ACL names `User:alice`; `CN=bob,OU=ops` matches no
    rule and gets no Kafka answer at all."""
    import pathlib

    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import (AclBinding, AclOperation, AclPermissionType,
                                       AdminClient, ResourcePatternType, ResourceType)
    from tlscert import write_signed_client
    b = _tls_bootstrap(mtls_acl_cluster)
    ca = (pathlib.Path(certificate[0]), pathlib.Path(certificate[1]))

    def conf(name, ou):
        cert, key = write_signed_client(tmp_path, *ca, name, ou)
        return {"security.protocol": "SSL", "ssl.ca.location": certificate[0],
                "ssl.certificate.location": str(cert), "ssl.key.location": str(key)}

    admin_conf, alice_conf, bob_conf = conf("Admin", "eng"), conf("alice", "eng"), conf("bob", "ops")
    admin = AdminClient({"bootstrap.servers": b, **admin_conf})
    t = unique("cert-principal")
    ck_create_topic(b, t, 1, admin=admin)

    def produce_error(c):
        p = ck_producer(b, **c, **{"message.timeout.ms": 10000})
        result = []
        p.produce(t, b"v", on_delivery=lambda err, msg: result.append(err))
        p.flush(20)
        assert result, "no delivery report"
        return result[0]

    err = produce_error(alice_conf)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    grant = AclBinding(ResourceType.TOPIC, t, ResourcePatternType.LITERAL, "User:alice", "*",
                       AclOperation.WRITE, AclPermissionType.ALLOW)
    for f in admin.create_acls([grant]).values():
        f.result(timeout=15)
    assert produce_error(alice_conf) is None

    with pytest.raises(KafkaException):
        AdminClient({"bootstrap.servers": b, **bob_conf}).list_topics(timeout=5)
