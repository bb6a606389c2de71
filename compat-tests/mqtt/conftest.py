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
import socket
import subprocess
import time
import uuid

import pytest

from mqttcompat import BROKERS, PROTOCOL_NAMES, Broker, Client, MQTTv311
from tributary_process import (
    LOG_TAIL_LINES,
    STOP_TIMEOUT_S,
    ServerProcess,
    die_with_parent,
    free_port,
    kill_live_processes,
    listeners_off,
    live_processes,
    log_file_tail,
    split_addr,
    tributary_bin,
)

MOSQUITTO_BIN = os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto")

class TributaryDeployment:
    """Tributary serving MQTT: standalone, split (core + 1 gateway) or split-2gw."""

    def __init__(self, mode: str, workdir: pathlib.Path, config: pathlib.Path | None = None):
        assert mode in ("standalone", "split", "split-2gw"), mode
        self.mode = mode
        self.bin = tributary_bin()
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.processes: list[ServerProcess] = []
        self.mqtt: list[str] = []
        self.core_addr: str | None = None
        self.starts = 0

    def _config_args(self) -> list[str]:
        return ["--config", str(self.config)] if self.config else []

    def start(self) -> "TributaryDeployment":
        self.starts += 1
        self.processes = []
        self.mqtt = []
        if self.mode == "standalone":
            p = ServerProcess(
                "tributary standalone",
                [
                    self.bin, *self._config_args(),
                    "--data-dir", str(self.data_dir),
                    *listeners_off(self.bin, "--mqtt-listen"),
                    "--mqtt-listen", "127.0.0.1:0",
                ],
                self.workdir / "standalone.log",
            )
            self.processes.append(p)
            listeners = p.start()
            self._need(listeners, "mqtt", p)
            self.mqtt = [listeners["mqtt"]]
        else:
            core = ServerProcess(
                "tributary core",
                [
                    self.bin, "core", *self._config_args(),
                    "--data-dir", str(self.data_dir),
                    *listeners_off(self.bin, "--core-listen"),
                    "--core-listen", "127.0.0.1:0",
                ],
                self.workdir / "core.log",
            )
            self.processes.append(core)
            listeners = core.start()
            self._need(listeners, "core", core)
            self.core_addr = listeners["core"]
            for i in range(2 if self.mode == "split-2gw" else 1):
                gw = self._gateway(i)
                self.processes.append(gw)
                self.mqtt.append(self._start_gateway(gw))
        return self

    def _gateway(self, i: int) -> ServerProcess:
        return ServerProcess(
            f"tributary gateway mqtt #{i}",
            [
                self.bin, "gateway", "mqtt", *self._config_args(),
                "--core", f"http://{self.core_addr}",
                *listeners_off(self.bin, "--mqtt-listen", "--core-listen"),
                "--mqtt-listen", "127.0.0.1:0",
            ],
            self.workdir / f"gateway{i}.log",
        )

    def _start_gateway(self, gw: ServerProcess) -> str:
        gl = gw.start()
        self._need(gl, "mqtt", gw)
        return gl["mqtt"]

    @staticmethod
    def _need(listeners: dict[str, str], name: str, p: ServerProcess):
        if name not in listeners:
            p.kill()
            raise RuntimeError(
                f"{p.name} printed `ready` without a `listening {name} ADDR` line\n{p.log_tail()}"
            )

    @property
    def core(self) -> ServerProcess:
        return self.processes[0]

    @property
    def gateways(self) -> list[ServerProcess]:
        return self.processes if self.mode == "standalone" else self.processes[1:]

    def stop(self, sig: int = signal.SIGTERM) -> dict[str, int | None]:
        """Stops gateways first, then the core. Returns each process's exit code."""
        codes = {}
        for p in reversed(self.processes):
            codes[p.name] = p.stop(sig)
        return codes

    def stop_clean(self):
        codes = self.stop(signal.SIGTERM)
        bad = {k: v for k, v in codes.items() if v not in (0, None)}
        assert not bad, f"graceful stop exited non-zero: {bad}\n{self.log_tails()}"

    def kill_core(self):
        """SIGKILL of the process that holds the data (standalone: the only one)."""
        self.core.stop(signal.SIGKILL)

    def restart_core(self, sig: int = signal.SIGKILL):
        """Stops the process holding the data with `sig` and starts it again on the same
        data directory. Standalone: a new process on a new MQTT port. Split modes: the
        core comes back on the same gRPC address and the gateways keep running."""
        if self.mode == "standalone":
            self.stop(sig)
            return self.start()
        core = self.core
        core.stop(sig)
        argv = list(core.argv)
        argv[argv.index("--core-listen") + 1] = self.core_addr  # same address for gateways
        core.argv = argv
        listeners = core.start()
        self._need(listeners, "core", core)
        assert listeners["core"] == self.core_addr, listeners
        return self

    def broker(self, i: int = 0) -> Broker:
        host, port = split_addr(self.mqtt[i])
        return Broker("tributary", host, port, self)

    def dead_processes(self) -> list[ServerProcess]:
        return [p for p in self.processes if not p.alive()]

    def log_tails(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(p.log_tail(n) for p in self.processes)

    def __repr__(self):
        return f"TributaryDeployment({self.mode}, mqtt={self.mqtt})"


class MosquittoProcess:
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
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited (code {self.proc.returncode}) before listening\n"
                    f"{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"mosquitto did not listen on {self.port} within {timeout}s\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.05)  # polling interval for the port, bounded by the deadline

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"mosquitto did not exit within {timeout}s")
        if self in live_processes:
            live_processes.remove(self)
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self in live_processes:
            live_processes.remove(self)

    def restart(self) -> "MosquittoProcess":
        self.stop(signal.SIGTERM)
        return self.start()

    def broker(self) -> Broker:
        return Broker("mosquitto", "127.0.0.1", self.port, self)

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return log_file_tail(self.log_path, n)

    @property
    def processes(self):
        return [self]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tributary_server(tmp_path_factory):
    d = TributaryDeployment("standalone", tmp_path_factory.mktemp("tributary-shared"))
    d.start()
    yield d
    if not d.dead_processes():
        d.stop_clean()
    else:
        d.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def mosquitto_server(tmp_path_factory):
    m = MosquittoProcess(tmp_path_factory.mktemp("mosquitto-shared"))
    m.start()
    yield m
    m.stop()


def _servers(request) -> list:
    """The servers a test uses; their logs are attached to its report when it fails."""
    node = request.node
    if not hasattr(node, "_mqtt_servers"):
        node._mqtt_servers = []
    return node._mqtt_servers


def _check_alive(server, when: str):
    dead = [p for p in server.processes if not p.alive()]
    if dead:
        info = ", ".join(f"{p.name} (exit {p.proc.returncode})" for p in dead)
        tails = "\n".join(p.log_tail() for p in server.processes)
        # Restart so later tests run, and fail this one.
        server.stop(signal.SIGKILL)
        server.start()
        pytest.fail(f"server died {when}: {info}\n{tails}", pytrace=False)


@pytest.fixture(params=BROKERS)
def broker(request) -> Broker:
    """The shared server of this test's broker kind, checked alive before and after."""
    server = request.getfixturevalue(f"{request.param}_server")
    _check_alive(server, "before this test")
    _servers(request).append(server)
    yield server.broker()
    _check_alive(server, "during this test")


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
def make_tributary(tmp_path, request):
    """Factory for private Tributary deployments; stopped after the test."""
    made: list[TributaryDeployment] = []
    servers = _servers(request)

    def make(mode: str = "standalone", config: str | None = None) -> TributaryDeployment:
        wd = tmp_path / f"tributary{len(made)}"
        wd.mkdir()
        cfg = None
        if config is not None:
            cfg = wd / "tributary.toml"
            cfg.write_text(config)
        d = TributaryDeployment(mode, wd, cfg)
        made.append(d)
        servers.append(d)
        return d.start()

    yield make
    for d in made:
        d.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def make_module_tributary(tmp_path_factory):
    """Like make_tributary, for servers shared by the tests of one module (e.g. a config)."""
    made: list[TributaryDeployment] = []

    def make(mode: str = "standalone", config: str | None = None) -> TributaryDeployment:
        wd = tmp_path_factory.mktemp("tributary-module")
        cfg = None
        if config is not None:
            cfg = wd / "tributary.toml"
            cfg.write_text(config)
        d = TributaryDeployment(mode, wd, cfg)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.stop(signal.SIGKILL)


@pytest.fixture
def make_mosquitto(tmp_path, request):
    made: list[MosquittoProcess] = []
    servers = _servers(request)

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
    config.addinivalue_line(
        "markers",
        "differs(broker, reason, protocol=None): documented difference; strict xfail on that "
        "broker (and protocol) only",
    )
    config.addinivalue_line(
        "markers", "tributary_only(reason): a Tributary feature Mosquitto has no equivalent for"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for m in item.iter_markers("differs"):
            broker = m.kwargs.get("broker", m.args[0] if m.args else None)
            reason = m.kwargs.get("reason", m.args[1] if len(m.args) > 1 else "")
            protocol = m.kwargs.get("protocol")
            if params.get("broker", params.get("restartable")) != broker:
                continue
            if protocol is not None and params.get("protocol") != protocol:
                continue
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"{broker} differs: {reason}"))
        for m in item.iter_markers("tributary_only"):
            if "broker" in params or "restartable" in params:
                raise pytest.UsageError(f"{item.nodeid}: tributary_only with a broker parameter")


def pytest_make_parametrize_id(config, val, argname):
    if argname == "protocol":
        return PROTOCOL_NAMES.get(val)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for s in getattr(item, "_mqtt_servers", []):
            for p in s.processes:
                report.sections.append((f"server log {p.name}", p.log_tail()))


def pytest_sessionfinish(session, exitstatus):
    kill_live_processes()
