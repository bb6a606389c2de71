"""MQTT over WebSocket (subprotocol "mqtt"), over TLS and over secure WebSocket (wss), against
Tributary and Mosquitto: a subscriber on each transport gets what a TCP publisher sends, large
payloads included,
and a plaintext client on the TLS port gets nowhere."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from conftest import MOSQUITTO_BIN
from tlscert import write_self_signed
from tributary_process import (
    ServerProcess,
    die_with_parent,
    free_port,
    listeners_off,
    tributary_bin,
)

WAIT_S = 15.0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1: (cert.pem, key.pem)."""
    return write_self_signed(tmp_path_factory.mktemp("tls"))


def _wait_port(port: int, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited early:\n{log.read_text()[-3000:]}", pytrace=False)
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"mosquitto not listening on {port}", pytrace=False)


@pytest.fixture(scope="module", params=["tributary", "mosquitto"])
def endpoints(request, tmp_path_factory, certificate):
    """{"tcp": port, "ws": port, "tls": port, "wss": port} of a broker serving all four."""
    cert, key = certificate
    wd = tmp_path_factory.mktemp(f"transports-{request.param}")
    if request.param == "tributary":
        binary = tributary_bin()
        keep = ("--mqtt-listen", "--mqtt-ws-listen", "--mqtt-tls-listen", "--mqtt-wss-listen")
        p = ServerProcess(
            "tributary transports",
            [
                binary, "--data-dir", str(wd / "data"),
                *listeners_off(binary, *keep),
                "--mqtt-listen", "127.0.0.1:0",
                "--mqtt-ws-listen", "127.0.0.1:0",
                "--mqtt-tls-listen", "127.0.0.1:0",
                "--mqtt-wss-listen", "127.0.0.1:0",
                "--tls-cert", str(cert), "--tls-key", str(key),
            ],
            wd / "tributary.log",
        )
        listeners = p.start()
        port = lambda name: int(listeners[name].rsplit(":", 1)[1])  # noqa: E731
        yield {"tcp": port("mqtt"), "ws": port("mqtt-ws"), "tls": port("mqtt-tls"),
               "wss": port("mqtt-wss")}
        p.kill()
        return
    tcp, ws, tls, wss = free_port(), free_port(), free_port(), free_port()
    conf = wd / "mosquitto.conf"
    lines = [
        f"listener {tcp} 127.0.0.1",
        f"listener {ws} 127.0.0.1", "protocol websockets",
        f"listener {tls} 127.0.0.1", f"certfile {cert}", f"keyfile {key}",
        f"listener {wss} 127.0.0.1", "protocol websockets",
        f"certfile {cert}", f"keyfile {key}",
        "allow_anonymous true", "persistence false", "log_dest stderr",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    log = wd / "mosquitto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(conf)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    for port in (tcp, ws, tls, wss):
        _wait_port(port, proc, log)
    yield {"tcp": tcp, "ws": ws, "tls": tls, "wss": wss}
    proc.kill()
    proc.wait()


def _client(cid: str, protocol, transport: str = "tcp", ca: str | None = None) -> mqtt.Client:
    web = transport in ("ws", "wss")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=protocol,
                    transport="websockets" if web else "tcp")
    if web:
        c.ws_set_options(path="/mqtt")
    if ca:
        c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
    return c


def _connect(c: mqtt.Client, port: int) -> None:
    done = threading.Event()
    result = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    assert done.wait(WAIT_S), "no CONNACK"
    assert not result["rc"].is_failure, result["rc"]


@pytest.mark.parametrize("transport", ["ws", "tls", "wss"])
@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_subscriber_on_transport_gets_everything(endpoints, certificate, transport, protocol):
    tag = f"tr-{transport}-{protocol}-{time.monotonic_ns()}"
    ca = str(certificate[0]) if transport in ("tls", "wss") else None
    got: list[bytes] = []
    all_in = threading.Event()
    payloads = [f"m{i}".encode() for i in range(99)] + [os.urandom(200_000)]

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        if len(got) == len(payloads):
            all_in.set()

    sub = _client(f"{tag}-sub", protocol, transport, ca)
    sub.on_message = on_message
    _connect(sub, endpoints[transport])
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(f"{tag}/t", qos=1)
    assert subscribed.wait(WAIT_S), "no SUBACK"
    pub = _client(f"{tag}-pub", protocol)
    _connect(pub, endpoints["tcp"])
    try:
        for p in payloads:
            pub.publish(f"{tag}/t", p, qos=1).wait_for_publish(WAIT_S)
        assert all_in.wait(WAIT_S), f"{len(got)} of {len(payloads)} arrived over {transport}"
        assert got == payloads
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


def test_plain_mqtt_on_the_tls_port_gets_no_connack(endpoints):
    s = socket.create_connection(("127.0.0.1", endpoints["tls"]), 5)
    s.settimeout(10)
    connect = bytes([0x10, 14, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 2]) + b"pl"
    s.sendall(connect)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    # Whatever a TLS server answers (an alert, or nothing), it is not a CONNACK.
    assert not data.startswith(b"\x20\x02"), data
