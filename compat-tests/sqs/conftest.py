"""Fixtures that run the SQS servers under test: Tributary's SQS gateway and the reference,
ElasticMQ.

Tributary's binary comes from TRIBUTARY_BIN (scripts/compat.sh sets it); ElasticMQ's jars from
ELASTICMQ_HOME (scripts/compat.sh fetches org.elasticmq:elasticmq-server_2.13 from Maven
Central into ~/.cache/tributary/elasticmq-VERSION and exports it; default that directory).
Every server listens on a free loopback port in its own directory. SQS_REFERENCE=off skips
every ElasticMQ case (a quick run against Tributary alone).

* ``broker``: parametrised over ``tributary`` (standalone, `--sqs-listen 127.0.0.1:0`, no
  keys configured: any signature is accepted) and ``elasticmq`` (in memory, region
  us-east-1, account 000000000000); one server of each per test session, shared by the
  tests (queues get unique names from ``uid``), checked alive before and after each test.
* ``make_tributary``: a private Tributary deployment (``standalone``, ``split`` = core + one
  SQS gateway, ``split-2gw`` = core + two SQS gateways), optionally with a config file, for
  restarts, kills and SigV4 keys.

Markers:

* ``differs(broker, reason)``: the scenario documents behaviour (AWS's) that the named server
  does not share; it is expected to fail there, strictly (xfail strict), and only there.
* ``tributary_only(reason)``: the scenario exercises something ElasticMQ has no equivalent for
  (restarts after kill -9, split deployments, SigV4 verification); it runs on Tributary.
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

from sqscompat import BROKERS, Broker
from tributary_process import (
    LOG_TAIL_LINES,
    ServerProcess,
    die_with_parent,
    free_port,
    kill_live_processes,
    listeners_off,
    live_processes,
    log_file_tail,
    tributary_bin,
)
from tributary_process import reference_enabled as _reference_enabled

ELASTICMQ_BOOT_TIMEOUT_S = 90.0
ELASTICMQ_VERSION = "1.7.1"  # as scripts/brokers.sh fetches it
ELASTICMQ_HOME = os.environ.get(
    "ELASTICMQ_HOME",
    os.path.expanduser(f"~/.cache/tributary/elasticmq-{ELASTICMQ_VERSION}"))


def reference_enabled() -> bool:
    return _reference_enabled("SQS_REFERENCE")


class TributaryDeployment:
    """Tributary serving SQS: standalone, split (core + 1 SQS gateway) or split-2gw (core +
    2 SQS gateways)."""

    def __init__(self, mode: str, workdir: pathlib.Path, config: pathlib.Path | None = None):
        assert mode in ("standalone", "split", "split-2gw"), mode
        self.mode = mode
        self.bin = tributary_bin()
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.processes: list[ServerProcess] = []
        self.sqs: list[str] = []
        self.core_addr: str | None = None
        self.starts = 0

    def _config_args(self) -> list[str]:
        return ["--config", str(self.config)] if self.config else []

    def start(self) -> "TributaryDeployment":
        self.starts += 1
        self.processes = []
        self.sqs = []
        if self.mode == "standalone":
            p = ServerProcess(
                "tributary standalone",
                [
                    self.bin, *self._config_args(),
                    "--data-dir", str(self.data_dir),
                    *listeners_off(self.bin, "--sqs-listen"),
                    "--sqs-listen", "127.0.0.1:0",
                ],
                self.workdir / "standalone.log",
            )
            self.processes.append(p)
            listeners = p.start()
            self._need(listeners, "sqs", p)
            self.sqs = [listeners["sqs"]]
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
                gw = ServerProcess(
                    f"tributary gateway sqs #{i}",
                    [
                        self.bin, "gateway", "sqs", *self._config_args(),
                        "--core", f"http://{self.core_addr}",
                        *listeners_off(self.bin, "--sqs-listen", "--core-listen"),
                        "--sqs-listen", "127.0.0.1:0",
                    ],
                    self.workdir / f"gateway{i}.log",
                )
                self.processes.append(gw)
                gl = gw.start()
                self._need(gl, "sqs", gw)
                self.sqs.append(gl["sqs"])
        return self

    @staticmethod
    def _need(listeners: dict[str, str], name: str, p: ServerProcess):
        if name not in listeners:
            p.kill()
            raise RuntimeError(
                f"{p.name} printed `ready` without a `listening {name} ADDR` line "
                f"(a binary without the SQS gateway?)\n{p.log_tail()}"
            )

    @property
    def core(self) -> ServerProcess:
        return self.processes[0]

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

    def restart(self, sig: int = signal.SIGKILL) -> "TributaryDeployment":
        """Stops every process with `sig` and starts the deployment again on the same data
        directory (new ports: `.broker()` gives the new endpoint)."""
        self.stop(sig)
        return self.start()

    def restart_core(self, sig: int = signal.SIGKILL) -> "TributaryDeployment":
        """Stops the process holding the data with `sig` and starts it again on the same
        data directory. Standalone: a new process on a new SQS port (`.broker()` gives the
        new one). Split: the core comes back on the same gRPC address and the gateways keep
        running (same SQS ports)."""
        if self.mode == "standalone":
            return self.restart(sig)
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
        return Broker("tributary", f"http://{self.sqs[i]}", self)

    def dead_processes(self) -> list[ServerProcess]:
        return [p for p in self.processes if not p.alive()]

    def log_tails(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(p.log_tail(n) for p in self.processes)

    def __repr__(self):
        return f"TributaryDeployment({self.mode}, sqs={self.sqs})"


def elasticmq_config(port: int) -> str:
    """ElasticMQ's config (HOCON) for `port`: what scripts/brokers.sh's elasticmq_config
    writes. Queue URLs are http://127.0.0.1:PORT/000000000000/NAME, ARNs in us-east-1."""
    return f"""include classpath("application.conf")
node-address {{
  protocol = http
  host = 127.0.0.1
  port = {port}
  context-path = ""
}}
rest-sqs {{
  enabled = true
  bind-port = {port}
  bind-hostname = "127.0.0.1"
  sqs-limits = strict
}}
generate-node-address = false
aws {{
  region = us-east-1
  accountId = 000000000000
}}
"""


class ElasticMQProcess:
    """ElasticMQ on a free loopback port, in memory, started from ELASTICMQ_HOME/libs."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = "elasticmq"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "stdout.log"

    def start(self, timeout: float = ELASTICMQ_BOOT_TIMEOUT_S) -> "ElasticMQProcess":
        libs = pathlib.Path(ELASTICMQ_HOME) / "libs"
        if not any(libs.glob("elasticmq-server_*.jar")):
            raise RuntimeError(
                f"ElasticMQ, the reference SQS server, is not in {libs}: run "
                "scripts/compat.sh sqs (it fetches it from Maven Central; needs java and mvn), "
                "set ELASTICMQ_HOME, or run with SQS_REFERENCE=off")
        self.port = free_port()
        conf = self.workdir / "elasticmq.conf"
        conf.write_text(elasticmq_config(self.port))
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start on port {self.port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                ["java", "-Xms128m", "-Xmx512m", f"-Dconfig.file={conf}",
                 "-cp", f"{libs}/*", "org.elasticmq.server.Main"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir,
                preexec_fn=die_with_parent,
            )
        live_processes.append(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ElasticMQ exited ({self.proc.returncode})\n"
                                   f"{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"ElasticMQ did not listen within {timeout:.0f}s\n"
                                       f"{self.log_tail()}")
                time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self in live_processes:
            live_processes.remove(self)
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self in live_processes:
            live_processes.remove(self)

    def broker(self) -> Broker:
        return Broker("elasticmq", f"http://127.0.0.1:{self.port}", self)

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
def elasticmq_server(tmp_path_factory):
    if not reference_enabled():
        pytest.skip("SQS_REFERENCE=off: ElasticMQ is not run")
    server = ElasticMQProcess(tmp_path_factory.mktemp("elasticmq-shared"))
    server.start()
    yield server
    server.stop(signal.SIGTERM)


def _servers(request) -> list:
    """The servers a test uses; their logs are attached to its report when it fails."""
    node = request.node
    if not hasattr(node, "_sqs_servers"):
        node._sqs_servers = []
    return node._sqs_servers


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
    """The shared server of this test's kind, checked alive before and after."""
    if request.param == "elasticmq" and not reference_enabled():
        pytest.skip("SQS_REFERENCE=off: ElasticMQ is not run")
    server = request.getfixturevalue(f"{request.param}_server")
    _check_alive(server, "before this test")
    _servers(request).append(server)
    yield server.broker()
    _check_alive(server, "during this test")


@pytest.fixture
def uid() -> str:
    """A short unique prefix for queue names."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def sqs(broker):
    """A boto3 SQS client (AWS JSON 1.0) for this test's broker."""
    return broker.client()


@pytest.fixture
def make_tributary(tmp_path, request):
    """Factory for private Tributary deployments; killed after the test."""
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


# -- markers -------------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "differs(broker, reason): documented difference; strict xfail on that broker only",
    )
    config.addinivalue_line(
        "markers", "tributary_only(reason): a Tributary feature ElasticMQ has no equivalent for"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for m in item.iter_markers("differs"):
            broker = m.kwargs.get("broker", m.args[0] if m.args else None)
            reason = m.kwargs.get("reason", m.args[1] if len(m.args) > 1 else "")
            if params.get("broker") != broker:
                continue
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"{broker} differs: {reason}"))
        for m in item.iter_markers("tributary_only"):
            if "broker" in params:
                raise pytest.UsageError(f"{item.nodeid}: tributary_only with a broker parameter")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for s in getattr(item, "_sqs_servers", []):
            for p in s.processes:
                report.sections.append((f"server log {p.name}", p.log_tail()))


def pytest_sessionfinish(session, exitstatus):
    kill_live_processes()
