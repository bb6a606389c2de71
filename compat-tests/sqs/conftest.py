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
import subprocess
import time
import uuid

import pytest

import tributary_process
from sqscompat import BROKERS, Broker
from tributary_process import (ManagedProcess, ProtocolDeployment, deployment_fixtures,
                               die_with_parent, free_port, live_processes, mark_differences,
                               shared_server_broker)
from tributary_process import reference_enabled as _reference_enabled

ELASTICMQ_BOOT_TIMEOUT_S = 90.0
ELASTICMQ_VERSION = "1.7.1"  # as scripts/brokers.sh fetches it
ELASTICMQ_HOME = os.environ.get(
    "ELASTICMQ_HOME",
    os.path.expanduser(f"~/.cache/tributary/elasticmq-{ELASTICMQ_VERSION}"))


def reference_enabled() -> bool:
    return _reference_enabled("SQS_REFERENCE")


class TributaryDeployment(ProtocolDeployment):
    """Tributary serving SQS: standalone, split (core + 1 SQS gateway) or split-2gw (core +
    2 SQS gateways)."""

    protocol = "sqs"
    missing_listener_hint = "(a binary without the SQS gateway?)"

    def broker(self, i: int = 0) -> Broker:
        return Broker("tributary", f"http://{self.addrs[i]}", self)


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


class ElasticMQProcess(ManagedProcess):
    """ElasticMQ on a free loopback port, in memory, started from ELASTICMQ_HOME/libs."""

    stop_timeout = 30.0
    stop_timeout_fails = False  # a JVM that needs the SIGKILL is stopped all the same

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
        self.wait_listening(self.port, timeout)
        return self

    def broker(self) -> Broker:
        return Broker("elasticmq", f"http://127.0.0.1:{self.port}", self)


# -- fixtures ------------------------------------------------------------------------------


# tributary_server, make_tributary, make_module_tributary: tributary_process.deployment_fixtures.
tributary_server, make_tributary, make_module_tributary = deployment_fixtures(TributaryDeployment)


@pytest.fixture(scope="session")
def elasticmq_server(tmp_path_factory):
    if not reference_enabled():
        pytest.skip("SQS_REFERENCE=off: ElasticMQ is not run")
    server = ElasticMQProcess(tmp_path_factory.mktemp("elasticmq-shared"))
    server.start()
    yield server
    server.stop(signal.SIGTERM)


@pytest.fixture(params=BROKERS)
def broker(request) -> Broker:
    """The shared server of this test's kind, checked alive before and after."""
    if request.param == "elasticmq" and not reference_enabled():
        pytest.skip("SQS_REFERENCE=off: ElasticMQ is not run")
    yield from shared_server_broker(request, request.param)


@pytest.fixture
def uid() -> str:
    """A short unique prefix for queue names."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def sqs(broker):
    """A boto3 SQS client (AWS JSON 1.0) for this test's broker."""
    return broker.client()


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
        "markers", "tributary_only(reason): a Tributary feature ElasticMQ has no equivalent for"
    )


def pytest_collection_modifyitems(config, items):
    mark_differences(items)
