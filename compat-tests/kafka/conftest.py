"""Fixtures that run the tributary binary for the Kafka compatibility scenarios.

The binary comes from the environment variable TRIBUTARY_BIN (scripts/compat.sh sets it).
Each deployment runs on free loopback ports in its own data directory:

* ``standalone``: one process, core + Kafka gateway.
* ``split``: ``tributary core`` plus one ``tributary gateway kafka --core http://ADDR``.
* ``split-2gw``: one core fronted by two Kafka gateways (only where a test asks for it).
* ``fleet``: like ``split-2gw`` with `--kafka-broker-id 1` and `2`: clients see both gateways
  as brokers (test_fleet.py).
* ``apache-kafka``: the reference, Apache Kafka itself (one KRaft node, from the jars
  scripts/compat.sh fetched into KAFKA_REFERENCE_HOME). Every test on ``cluster`` runs against
  it too, so a scenario Kafka fails is a wrong test or a documented difference (those are
  marked ``tributary_only`` with the reason). KAFKA_REFERENCE=off leaves it out.

``cluster`` is shared by the tests of one mode (topics and groups get unique names);
``fresh_cluster`` is a private deployment for tests that restart or kill the server.
"""

from __future__ import annotations

import base64
import os
import pathlib
import signal
import subprocess
import uuid

import pytest

import tributary_process
from kafkacompat import MODES
from tributary_process import (READY_TIMEOUT_S, BaseDeployment, ServerProcess,
                               die_with_parent, free_port, live_processes, servers_of,
                               stop_session_deployment, tributary_bin)

# The environment of every tributary process: Kafka's group.initial.rebalance.delay.ms (3 s by
# default) only slows tests down. Standalone also gets the flag; the environment spelling
# reaches `core` in split mode.
TRIBUTARY_ENV = {"TRIBUTARY_GROUP_INITIAL_REBALANCE_DELAY_MS": "0"}


class ReferenceKafkaProcess(ServerProcess):
    """Apache Kafka as one KRaft node (broker and controller in one JVM), fresh in its work
    directory, ready once its Kafka port answers."""

    def __init__(self, workdir: pathlib.Path):
        home = os.environ.get("KAFKA_REFERENCE_HOME", "")
        if not home or not (pathlib.Path(home) / ".complete").exists():
            pytest.skip("Apache Kafka reference not installed (scripts/compat.sh kafka fetches "
                        "it; KAFKA_REFERENCE=off skips it)")
        self.workdir = workdir
        self.port = free_port()
        self.controller = free_port()
        props = workdir / "server.properties"
        props.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={workdir / 'data'}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            # As Tributary's auto_create_topics default.
            "auto.create.topics.enable=true",
            "",
        ]))
        log4j = workdir / "log4j2.properties"
        log4j.write_text("\n".join([
            "rootLogger.level=WARN",
            "rootLogger.appenderRef.stderr.ref=stderr",
            "appender.stderr.type=Console",
            "appender.stderr.name=stderr",
            "appender.stderr.target=SYSTEM_ERR",
            "appender.stderr.layout.type=PatternLayout",
            "appender.stderr.layout.pattern=[%d] %p %m (%c)%n",
            "",
        ]))
        self.java = ["java", "-Xms512m", "-Xmx512m", f"-Dlog4j2.configurationFile={log4j}",
                     "-cp", f"{home}/libs/*"]
        super().__init__("apache-kafka", [*self.java, "kafka.Kafka", str(props)],
                         workdir / "kafka.log")
        self.props = props

    def start(self, timeout: float = READY_TIMEOUT_S) -> dict[str, str]:
        if not (self.workdir / "data" / "meta.properties").exists():
            # Not starting with "-": kafka-storage would take it for an option (1 run in 32).
            cluster_id = "-"
            while cluster_id.startswith("-"):
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            r = subprocess.run([*self.java, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                                "-c", str(self.props)], capture_output=True, text=True,
                               timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"kafka-storage format failed:\n{r.stdout}{r.stderr}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, preexec_fn=die_with_parent)
        live_processes.append(self)
        self.wait_listening(self.port, max(timeout, 120))
        self.listeners = {"kafka": f"127.0.0.1:{self.port}"}
        return self.listeners

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        rc = super().stop(sig, timeout)
        # The JVM ends with 128 + SIGTERM once its shutdown hooks ran: Kafka's clean stop.
        return 0 if rc == 128 + signal.SIGTERM else rc


class Deployment(BaseDeployment):
    """A tributary deployment in one of MODES, on one data directory."""

    def __init__(self, mode: str, workdir: pathlib.Path, extra_args: list[str] | None = None):
        assert mode in ("standalone", "split", "split-2gw", "fleet", "apache-kafka"), mode
        self.mode = mode
        self.bin = tributary_bin()
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args or [])
        self.processes: list[ServerProcess] = []
        self.bootstraps: list[str] = []
        self.core_addr: str | None = None
        self.starts = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "Deployment":
        self.starts += 1
        n = self.starts
        self.processes = []
        self.bootstraps = []
        if self.mode == "apache-kafka":
            p = ReferenceKafkaProcess(self.workdir)
            self.processes.append(p)
            self.bootstraps = [p.start()["kafka"]]
        elif self.mode == "standalone":
            p = ServerProcess(
                "tributary standalone",
                [
                    self.bin,
                    "--data-dir", str(self.data_dir),
                    "--core-listen", "127.0.0.1:0",
                    "--admin-listen", "127.0.0.1:0",
                    "--kafka-listen", "127.0.0.1:0",
                    "--mqtt-listen", "off",
                    "--mqtt-ws-listen", "off",
                    "--amqp-listen", "off",
                    "--sqs-listen", "off",
                    "--rocketmq-listen", "off",
                    "--namesrv-listen", "off",
                    "--group-initial-rebalance-delay-ms", "0",
                    *self.extra_args,
                ],
                self.workdir / "standalone.log",
                env_defaults=TRIBUTARY_ENV,
            )
            self.processes.append(p)
            listeners = p.start()
            self._need(listeners, "kafka", p)
            self.core_addr = listeners.get("core")
            self.bootstraps = [listeners["kafka"]]
        else:
            core = ServerProcess(
                "tributary core",
                [
                    self.bin, "core",
                    "--data-dir", str(self.data_dir),
                    "--core-listen", "127.0.0.1:0",
                    "--admin-listen", "127.0.0.1:0",
                ],
                self.workdir / "core.log",
                env_defaults=TRIBUTARY_ENV,
            )
            self.processes.append(core)
            listeners = core.start()
            self._need(listeners, "core", core)
            self.core_addr = listeners["core"]
            for i in range(2 if self.mode in ("split-2gw", "fleet") else 1):
                fleet = ["--kafka-broker-id", str(i + 1)] if self.mode == "fleet" else []
                gw = ServerProcess(
                    f"tributary gateway kafka #{i}",
                    [
                        self.bin, "gateway", "kafka",
                        "--core", f"http://{self.core_addr}",
                        "--kafka-listen", "127.0.0.1:0",
                        *fleet,
                        *self.extra_args,
                    ],
                    self.workdir / f"gateway{i}.log",
                    env_defaults=TRIBUTARY_ENV,
                )
                self.processes.append(gw)
                gl = gw.start()
                self._need(gl, "kafka", gw)
                self.bootstraps.append(gl["kafka"])
        for p in self.processes:
            with open(p.log_path, "ab") as log:
                log.write(f"=== start #{n} ready: kafka {self.bootstraps}\n".encode())
        return self

    def restart(self, sig: int = signal.SIGTERM) -> "Deployment":
        if sig == signal.SIGTERM:
            self.stop_clean()
        else:
            self.stop(sig)
        return self.start()

    def restart_gateways(self, sig: int = signal.SIGKILL) -> "Deployment":
        """Split modes only: restart the gateway processes, the core keeps running."""
        assert self.mode != "standalone"
        gateways = self.processes[1:]
        for gw in gateways:
            gw.stop(sig)
        self.bootstraps = []
        for gw in gateways:
            self.bootstraps.append(gw.start()["kafka"])
        return self

    # -- addresses -----------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """The first gateway's Kafka address."""
        return self.bootstraps[0]

    def bootstrap_for(self, i: int) -> str:
        """Client number i's bootstrap: clients are spread over the gateways."""
        return self.bootstraps[i % len(self.bootstraps)]

    def __repr__(self):
        return f"Deployment({self.mode}, kafka={self.bootstraps})"


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session", params=MODES)
def shared_cluster(request, tmp_path_factory):
    """One deployment per mode, shared by the tests of that mode."""
    d = Deployment(request.param, tmp_path_factory.mktemp(f"shared-{request.param}"))
    d.start()
    yield d
    stop_session_deployment(d)


def pytest_configure(config):
    # tributary_process's hooks: server logs on a failed test's report, no process left at
    # the end (registered here, not by pytest_plugins: this conftest imported it already).
    config.pluginmanager.register(tributary_process, "tributary_process")
    config.addinivalue_line(
        "markers", "tributary_only(reason): not run against Apache Kafka, for the reason given "
        "(a documented difference, or something only Tributary has)")


@pytest.fixture
def cluster(shared_cluster: Deployment, request):
    """The shared deployment of this test's mode, checked alive before and after the test."""
    marker = request.node.get_closest_marker("tributary_only")
    if shared_cluster.mode == "apache-kafka" and marker is not None:
        pytest.skip(f"Tributary only: {marker.kwargs.get('reason') or marker.args[0]}")
    dead = shared_cluster.dead_processes()
    if dead:
        # A previous test crashed the server: restart so later tests run, and fail this one.
        info = ", ".join(f"{p.name} (exit {p.proc.returncode})" for p in dead)
        tails = shared_cluster.log_tails()
        shared_cluster.stop(signal.SIGKILL)
        shared_cluster.start()
        pytest.fail(f"server died before this test: {info}\n{tails}", pytrace=False)
    servers_of(request.node).append(shared_cluster)
    yield shared_cluster
    dead = shared_cluster.dead_processes()
    if dead:
        info = ", ".join(f"{p.name} (exit {p.proc.returncode})" for p in dead)
        pytest.fail(f"server process died during the test: {info}\n{shared_cluster.log_tails()}",
                    pytrace=False)


@pytest.fixture(params=["standalone", "split"])
def fresh_cluster(request, tmp_path):
    """A private deployment (own data dir) for tests that restart or kill it."""
    d = Deployment(request.param, tmp_path)
    servers_of(request.node).append(d)
    d.start()
    yield d
    if d.dead_processes() and any(p.proc.returncode not in (0, -9) for p in d.dead_processes()):
        codes = {p.name: p.proc.returncode for p in d.dead_processes()}
        d.stop(signal.SIGKILL)
        pytest.fail(f"server process died during the test: {codes}\n{d.log_tails()}",
                    pytrace=False)
    d.stop_clean()


@pytest.fixture
def make_deployment(tmp_path, request):
    """Factory for deployments with extra arguments (e.g. SASL); stopped after the test."""
    made: list[Deployment] = []
    servers = servers_of(request.node)

    def make(mode: str = "standalone", extra_args: list[str] | None = None) -> Deployment:
        d = Deployment(mode, tmp_path / f"d{len(made)}", extra_args)
        made.append(d)
        servers.append(d)
        return d.start()

    yield make
    for d in made:
        d.stop(signal.SIGTERM)
