"""AMQP over TLS (AMQPS, `--amqp-tls-listen`): the same protocol inside a TLS session, with the
certificate from `--tls-cert` / `--tls-key`. Tributary only: the shared reference RabbitMQ
runs without TLS listeners (its TLS is Erlang's, not what these scenarios are about)."""

from __future__ import annotations

import socket
import ssl

import pika
import pytest

from tlscert import write_self_signed
from tributary_process import ServerProcess, listeners_off, tributary_bin

pytestmark = pytest.mark.tributary_only(reason="TLS listener of Tributary's own gateway")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1: (cert.pem, key.pem)."""
    return write_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def ports(tmp_path_factory, certificate):
    """{"amqp": port, "amqp-tls": port} of a Tributary serving both."""
    cert, key = certificate
    wd = tmp_path_factory.mktemp("amqps")
    binary = tributary_bin()
    p = ServerProcess(
        "tributary amqps",
        [
            binary, "--data-dir", str(wd / "data"),
            *listeners_off(binary, "--amqp-listen", "--amqp-tls-listen"),
            "--amqp-listen", "127.0.0.1:0",
            "--amqp-tls-listen", "127.0.0.1:0",
            "--tls-cert", str(cert), "--tls-key", str(key),
        ],
        wd / "tributary.log",
    )
    listeners = p.start()
    yield {name: int(listeners[name].rsplit(":", 1)[1]) for name in ("amqp", "amqp-tls")}
    p.stop()


def test_amqps_round_trip_and_plain_listener_sees_it(certificate, ports):
    ctx = ssl.create_default_context(cafile=str(certificate[0]))
    params = pika.ConnectionParameters(
        "127.0.0.1", ports["amqp-tls"], ssl_options=pika.SSLOptions(ctx, "localhost"))
    tls_conn = pika.BlockingConnection(params)
    plain_conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", ports["amqp"]))
    try:
        ch = tls_conn.channel()
        q = ch.queue_declare("", exclusive=False, auto_delete=False).method.queue
        ch.confirm_delivery()
        ch.basic_publish("", q, b"over tls")
        # One core behind both listeners: the plain listener reads what TLS wrote.
        method, _props, body = plain_conn.channel().basic_get(q, auto_ack=True)
        assert method is not None and body == b"over tls"
        ch.queue_delete(q)
    finally:
        tls_conn.close()
        plain_conn.close()


def test_plain_amqp_on_the_tls_port_gets_no_connection_start(ports):
    s = socket.create_connection(("127.0.0.1", ports["amqp-tls"]), 5)
    try:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        s.settimeout(3)
        try:
            data = s.recv(64)
        except (socket.timeout, ConnectionResetError):
            data = b""
        # A TLS server answers a non-TLS hello with an alert or a close, never AMQP.
        assert not data.startswith(b"\x01\x00\x00"), data
    finally:
        s.close()


def test_untrusted_client_cannot_complete_the_handshake(ports):
    ctx = ssl.create_default_context()  # the system CAs do not know the self-signed one
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", ports["amqp-tls"]), 5) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")
