"""Fixtures that run the MQTT brokers under test: Tributary and the reference, Mosquitto.

Tributary's binary comes from TRIBUTARY_BIN (scripts/compat.sh sets it); Mosquitto from
MOSQUITTO_BIN (default /usr/sbin/mosquitto). Every server listens on a free loopback port in
its own directory.

* ``broker``: parametrised over ``tributary`` (standalone) and ``mosquitto``; one server of
  each per test session, shared by the tests (topics and client ids get unique prefixes).
* ``make_tributary``: a private Tributary deployment (``standalone``, ``split`` = core + one
  MQTT gateway, ``split-2gw`` = core + two gateways), for restarts, kills and configs.
* ``make_module_tributary``: the same, shared by the tests of one module (a config file).
* ``make_mosquitto``: a private Mosquitto, for restarts.
* ``mq``: paho clients (mqttcompat.Client) closed after the test; ``raw_clients``: sockets
  speaking hand-made packets (mqttraw), for what a client library refuses to send.

Markers:

* ``differs(broker, reason, protocol=None)``: the scenario documents behaviour that the named
  broker does not share (allowed by the specification); it is expected to fail there, strictly
  (xfail strict), and only there.
* ``tributary_only(reason)``: the scenario exercises something Mosquitto has no equivalent for
  (restarts after kill -9, split deployments, Tributary's config file); it runs on Tributary.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
import uuid

import pytest

import tributary_process
from mqttcompat import BROKERS, PROTOCOL_NAMES, Broker, Client, MQTTv311
from tributary_process import (ManagedProcess, ProtocolDeployment, deployment_fixtures,
                               die_with_parent, free_port, live_processes, mark_differences,
                               servers_of, shared_server_broker, split_addr)

MOSQUITTO_BIN = os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto")


class TributaryDeployment(ProtocolDeployment):
    """Tributary serving MQTT: standalone, split (core + 1 gateway) or split-2gw."""

    protocol = "mqtt"

    def broker(self, i: int = 0) -> Broker:
        host, port = split_addr(self.addrs[i])
        return Broker("tributary", host, port, self)


class MosquittoProcess(ManagedProcess):
    """Mosquitto on a free loopback port with a generated configuration."""

    def __init__(self, workdir: pathlib.Path, persistence: bool = False):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "mosquitto.log"
        self.name = "mosquitto"

    def _write_config(self) -> pathlib.Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # 0 = no limit on queued QoS 1/2 messages per client (Mosquitto's default is 1000).
            "max_queued_messages 0",
            "max_inflight_messages 1000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "persistence_file mosquitto.db",
            ]
        else:
            lines.append("persistence false")
        if os.geteuid() == 0:
            lines.append("user root")  # else Mosquitto switches to user `mosquitto`
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 20.0) -> "MosquittoProcess":
        if not (os.path.isfile(MOSQUITTO_BIN) and os.access(MOSQUITTO_BIN, os.X_OK)):
            pytest.fail(
                f"Mosquitto, the reference broker, is not at {MOSQUITTO_BIN}: install it "
                "(apt-get install mosquitto) or set MOSQUITTO_BIN",
                pytrace=False,
            )
        if self.port is None:
            self.port = free_port()  # kept across restarts (clients reconnect to it)
        conf = self._write_config()
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start on port {self.port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [MOSQUITTO_BIN, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        live_processes.append(self)
        # Polls the port every 0.05 s, until the deadline.
        self.wait_listening(self.port, timeout, interval=0.05, connect_timeout=0.5)
        return self

    def restart(self) -> "MosquittoProcess":
        self.stop(signal.SIGTERM)
        return self.start()

    def broker(self) -> Broker:
        return Broker("mosquitto", "127.0.0.1", self.port, self)


# -- fixtures ------------------------------------------------------------------------------


# tributary_server, make_tributary, make_module_tributary: tributary_process.deployment_fixtures.
tributary_server, make_tributary, make_module_tributary = deployment_fixtures(TributaryDeployment)


@pytest.fixture(scope="session")
def mosquitto_server(tmp_path_factory):
    m = MosquittoProcess(tmp_path_factory.mktemp("mosquitto-shared"))
    m.start()
    yield m
    m.stop()


@pytest.fixture(params=BROKERS)
def broker(request) -> Broker:
    """The shared server of this test's broker kind, checked alive before and after."""
    yield from shared_server_broker(request, request.param)


@pytest.fixture
def uid(request) -> str:
    """A short unique prefix for topics and client ids (MQTT 3.1 allows 23-byte ids)."""
    return "c" + uuid.uuid4().hex[:9]


@pytest.fixture
def mq(request):
    """Factory for paho clients; every client is closed after the test."""
    made: list[Client] = []

    def make(broker: Broker, client_id: str, protocol: int = MQTTv311, clean: bool = True,
             **kw) -> Client:
        c = Client(broker, client_id, protocol, clean, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def raw_clients():
    """Raw sockets opened by a test, closed after it."""
    made = []
    yield made
    for r in made:
        r.close()


@pytest.fixture
def make_mosquitto(tmp_path, request):
    made: list[MosquittoProcess] = []
    servers = servers_of(request.node)

    def make(persistence: bool = False) -> MosquittoProcess:
        m = MosquittoProcess(tmp_path / f"mosquitto{len(made)}", persistence)
        made.append(m)
        servers.append(m)
        return m.start()

    yield make
    for m in made:
        m.stop(signal.SIGKILL)


# -- markers -------------------------------------------------------------------------------


def pytest_configure(config):
    # tributary_process's hooks: server logs on a failed test's report, no process left at
    # the end (registered here, not by pytest_plugins: this conftest imported it already).
    config.pluginmanager.register(tributary_process, "tributary_process")
    config.addinivalue_line(
        "markers",
        "differs(broker, reason, protocol=None): documented difference; strict xfail on that "
        "broker (and protocol) only",
    )
    config.addinivalue_line(
        "markers", "tributary_only(reason): a Tributary feature Mosquitto has no equivalent for"
    )


def pytest_collection_modifyitems(config, items):
    # test_restart's `restartable` is a broker parameter too.
    mark_differences(items, broker_params=("broker", "restartable"))


def pytest_make_parametrize_id(config, val, argname):
    if argname == "protocol":
        return PROTOCOL_NAMES.get(val)
    return None
