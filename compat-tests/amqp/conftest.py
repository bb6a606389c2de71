"""Fixtures that run the AMQP 0-9-1 brokers under test: Tributary and the reference, RabbitMQ.

Tributary's binary comes from TRIBUTARY_BIN (scripts/compat.sh sets it); RabbitMQ from
RABBITMQ_SERVER_BIN (default /usr/lib/rabbitmq/bin/rabbitmq-server, rabbitmqctl next to it).
Every server listens on a free loopback port in its own directory. RabbitMQ takes up to a
minute to boot: one node serves the whole session, booted in the background as soon as the
collection shows a scenario that needs it. AMQP_REFERENCE=off skips every RabbitMQ case (a
quick run against Tributary alone).

* ``broker``: parametrised over ``tributary`` (standalone) and ``rabbitmq``; one server of
  each per test session, shared by the tests (queues and exchanges get unique names from
  ``uid``), checked alive before and after each test.
* ``amqp``: factory ``amqp(broker, **kw)`` for pika BlockingConnections (keywords go to
  ``Broker.params``), all closed after the test.
* ``raw_clients``: amqpraw connections (hand-made frames) opened by a test, closed after it.
* ``make_tributary``: a private Tributary deployment (``standalone``, or ``split`` = core +
  one AMQP gateway), for restarts, kills and configs.
* ``make_module_tributary``: the same, shared by the tests of one module (a config file).
* ``rabbitmq_server``: the session's RabbitMQ node; ``.ctl(*args)`` runs rabbitmqctl
  against it (users, vhosts, permissions).

Markers:

* ``differs(broker, reason)``: the scenario documents behaviour that the named broker does
  not share (allowed by the specification); it is expected to fail there, strictly (xfail
  strict), and only there.
* ``tributary_only(reason)``: the scenario exercises something RabbitMQ has no equivalent for
  (restarts after kill -9, split deployments, Tributary's config file); it runs on Tributary.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import pytest

import tributary_process
from amqpcompat import BROKERS, Broker
from tributary_process import (LOG_TAIL_LINES, STOP_TIMEOUT_S, ManagedProcess,
                               ProtocolDeployment, deployment_fixtures, die_with_parent,
                               free_port, kill_live_processes, live_processes, log_file_tail,
                               mark_differences, shared_server_broker, split_addr, tributary_bin)
from tributary_process import reference_enabled as _reference_enabled

RABBITMQ_BOOT_TIMEOUT_S = 150.0
RABBITMQ_SERVER_BIN = os.environ.get(
    "RABBITMQ_SERVER_BIN", "/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL_BIN = os.path.join(os.path.dirname(RABBITMQ_SERVER_BIN), "rabbitmqctl")


def reference_enabled() -> bool:
    return _reference_enabled("AMQP_REFERENCE")


def tributary_credentials(password: str) -> str:
    """The `credentials = [...]` line `tributary passwd` prints for `password`."""
    out = subprocess.run([tributary_bin(), "passwd"], input=password + "\n",
                         capture_output=True, text=True, timeout=60, check=True)
    line = out.stdout.strip()
    assert line.startswith("credentials = ["), line
    return line


class TributaryDeployment(ProtocolDeployment):
    """Tributary serving AMQP 0-9-1: standalone or split (core + 1 AMQP gateway)."""

    protocol = "amqp"

    def broker(self, i: int = 0) -> Broker:
        host, port = split_addr(self.addrs[i])
        return Broker("tributary", host, port, self)


class RabbitMQProcess(ManagedProcess):
    """A RabbitMQ node on a free loopback port, with its own node name, epmd port, Erlang
    distribution port, Mnesia/log directories and config (as scripts/brokers.sh starts it)."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("mnesia", "log", "home"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.port: int | None = None
        self.node = f"tributary-compat-{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost"
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "stdout.log"
        self.pid_file = workdir / "rabbit.pid"
        self.name = "rabbitmq"
        self.env: dict[str, str] = {}

    def _write_config(self):
        # A nearly full disk on the test host (a build linking next to the run) must not
        # raise RabbitMQ's disk alarm, which blocks every publisher: the limit is 1 MB, not
        # the default 50 MB.
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
            "disk_free_limit.absolute = 1MB\n")
        (self.workdir / "enabled_plugins").write_text("[].\n")

    def start(self, timeout: float = RABBITMQ_BOOT_TIMEOUT_S) -> "RabbitMQProcess":
        self.launch()
        return self.wait_ready(timeout)

    def launch(self):
        """Starts the node (call from the main thread: PR_SET_PDEATHSIG follows the thread
        that forks); wait_ready() waits for it to boot."""
        if not (os.path.isfile(RABBITMQ_SERVER_BIN) and os.access(RABBITMQ_SERVER_BIN, os.X_OK)):
            raise RuntimeError(
                f"RabbitMQ, the reference broker, is not at {RABBITMQ_SERVER_BIN}: install it "
                "(apt-get install rabbitmq-server), set RABBITMQ_SERVER_BIN, or run with "
                "AMQP_REFERENCE=off")
        if self.port is None:  # kept across restarts, like the node name
            self.port = free_port()
            d = self.workdir
            self.env = dict(
                os.environ,
                HOME=str(d / "home"),
                RABBITMQ_NODENAME=self.node,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(self.port),
                RABBITMQ_DIST_PORT=str(free_port()),
                ERL_EPMD_PORT=str(free_port()),
                RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
                RABBITMQ_LOG_BASE=str(d / "log"),
                RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
                RABBITMQ_PID_FILE=str(self.pid_file),
                # The script then execs the Erlang VM itself (no wrapper shell): the VM is our
                # child, with PDEATHSIG, and it reads stdin, a pipe only this process holds:
                # the VM halts on its EOF, so no node outlives pytest however pytest ends.
                RABBITMQ_ALLOW_INPUT="1",
            )
        self._write_config()
        try:
            self.pid_file.unlink()
        except FileNotFoundError:
            pass
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start on port {self.port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [RABBITMQ_SERVER_BIN],
                stdin=subprocess.PIPE,  # never written; closing it stops the node
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=self.workdir,
                preexec_fn=die_with_parent,
            )
        live_processes.append(self)

    def wait_ready(self, timeout: float = RABBITMQ_BOOT_TIMEOUT_S) -> "RabbitMQProcess":
        # `wait` returns once the pid file exists and the rabbit application has started.
        try:
            r = self.ctl("wait", str(self.pid_file), "--timeout", str(int(timeout)),
                         timeout=timeout + 30, check=False)
        except subprocess.TimeoutExpired:
            r = None
        if r is None or r.returncode != 0 or not self.alive():
            out = "" if r is None else (r.stdout + r.stderr)
            self.kill()
            raise RuntimeError(f"RabbitMQ did not start within {timeout:.0f}s\n{out}\n"
                               f"{self.log_tail()}")
        return self

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True
            ) -> subprocess.CompletedProcess:
        """Runs `rabbitmqctl -n NODE ARGS...` against this node (add_user, add_vhost,
        set_permissions, list_queues ...)."""
        r = subprocess.run([RABBITMQCTL_BIN, "-n", self.node, *args], env=self.env,
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def _epmd_kill(self):
        # epmd is started by the node on demand (on its own port here) and outlives it.
        try:
            subprocess.run(["epmd", "-kill"], env=self.env, capture_output=True, timeout=10,
                           stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def _kill_vm(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.stdin is not None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """SIGTERM (default): `rabbitmqctl stop`, a clean shutdown. Any other signal: SIGKILL
        of the VM. Returns the VM's exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig == signal.SIGTERM:
                try:
                    self.ctl("stop", timeout=timeout, check=False)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_vm()
        self._epmd_kill()
        self._forget()
        return self.proc.returncode

    def kill(self):
        self._kill_vm()
        self._epmd_kill()
        self._forget()

    def restart(self) -> "RabbitMQProcess":
        self.stop(signal.SIGTERM)
        return self.start()

    def broker(self) -> Broker:
        return Broker("rabbitmq", "127.0.0.1", self.port, self)

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        parts = [log_file_tail(self.log_path, n)]
        logs = sorted((self.workdir / "log").glob("*.log"))
        parts += [log_file_tail(p, n) for p in logs[:1]]
        return "\n".join(parts)


# -- the session's RabbitMQ, booted in the background ---------------------------------------


class _RabbitBoot:
    """Boots the session's RabbitMQ node in a thread so that Tributary's scenarios run
    meanwhile; `get()` waits for it (or raises the boot's error)."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.server: RabbitMQProcess | None = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def begin(self, workdir: pathlib.Path):
        with self.lock:
            if self.thread is not None:
                return
            self.server = RabbitMQProcess(workdir)
            try:
                self.server.launch()  # in the calling (main) thread, see launch()
            except BaseException as e:
                self.error = e
            self.thread = threading.Thread(target=self._run, daemon=True,
                                           name="rabbitmq-boot")
            self.thread.start()

    def _run(self):
        if self.error is not None:
            return
        try:
            self.server.wait_ready()
        except BaseException as e:  # reported to the first scenario that needs the node
            self.error = e

    def get(self) -> RabbitMQProcess:
        assert self.thread is not None
        self.thread.join(RABBITMQ_BOOT_TIMEOUT_S + 60)
        if self.error is not None:
            raise RuntimeError(f"the reference RabbitMQ failed to boot: {self.error}")
        if self.thread.is_alive():
            raise RuntimeError("the reference RabbitMQ is still booting")
        return self.server


_rabbit_boot = _RabbitBoot()


def _rabbit_workdir(config) -> pathlib.Path:
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None:
        return factory.mktemp("rabbitmq-shared")
    return pathlib.Path(tempfile.mkdtemp(prefix="rabbitmq-shared-"))


# -- fixtures ------------------------------------------------------------------------------


# tributary_server, make_tributary, make_module_tributary: tributary_process.deployment_fixtures.
tributary_server, make_tributary, make_module_tributary = deployment_fixtures(TributaryDeployment)


@pytest.fixture(scope="session")
def rabbitmq_server(request) -> RabbitMQProcess:
    if not reference_enabled():
        pytest.skip("AMQP_REFERENCE=off: RabbitMQ is not run")
    _rabbit_boot.begin(_rabbit_workdir(request.config))  # no-op when already booting
    server = _rabbit_boot.get()
    yield server
    server.stop(signal.SIGTERM)


@pytest.fixture(params=BROKERS)
def broker(request) -> Broker:
    """The shared server of this test's broker kind, checked alive before and after."""
    if request.param == "rabbitmq" and not reference_enabled():
        pytest.skip("AMQP_REFERENCE=off: RabbitMQ is not run")
    yield from shared_server_broker(request, request.param)


@pytest.fixture
def uid(request) -> str:
    """A short unique prefix for queue and exchange names."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def amqp(request):
    """Factory for pika BlockingConnections; every connection is closed after the test."""
    made: list = []

    def make(broker: Broker, **kw):
        c = broker.connect(**kw)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            if c.is_open:
                c.close()
        except Exception:  # already closed by the broker, socket gone, ...
            pass


@pytest.fixture
def raw_clients():
    """amqpraw connections opened by a test (append them), closed after it."""
    made: list = []
    yield made
    for r in made:
        try:
            r.close()
        except Exception:
            pass


# -- markers -------------------------------------------------------------------------------


def pytest_configure(config):
    # tributary_process's hooks: server logs on a failed test's report, no process left at
    # the end (registered here, not by pytest_plugins: this conftest imported it already).
    config.pluginmanager.register(tributary_process, "tributary_process")
    config.addinivalue_line(
        "markers",
        "differs(broker, reason): documented difference; strict xfail on that broker only",
    )
    config.addinivalue_line(
        "markers", "tributary_only(reason): a Tributary feature RabbitMQ has no equivalent for"
    )


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: boot RabbitMQ only when needed
def pytest_collection_modifyitems(config, items):
    mark_differences(items)
    needs_rabbit = False
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "rabbitmq" in params.values() or "rabbitmq_server" in getattr(
                item, "fixturenames", ()):
            needs_rabbit = True
    if needs_rabbit and reference_enabled() and not config.option.collectonly:
        _rabbit_boot.begin(_rabbit_workdir(config))  # boots while Tributary's cases run


@pytest.hookimpl(tryfirst=True)  # before tributary_process's, which kills every process
def pytest_sessionfinish(session, exitstatus):
    if _rabbit_boot.thread is not None and _rabbit_boot.thread.is_alive():
        _rabbit_boot.thread.join(RABBITMQ_BOOT_TIMEOUT_S + 60)  # then killed below
    kill_live_processes()
