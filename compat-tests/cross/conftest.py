"""Fixtures for the cross-protocol scenarios: one Tributary serving Kafka, MQTT, AMQP and SQS (and
its admin HTTP API) on free loopback ports, from TRIBUTARY_BIN (scripts/compat.sh cross sets it).

* ``tributary``: a private standalone server per test (a test may subscribe to ``#``, so no
  other test's topics may reach it); its ``addrs`` maps listener names to addresses.
* ``make_tributary(config)``: the same with a config file of that TOML text.
* ``uid``: a unique suffix for names.

No reference broker exists for most of these scenarios: no other broker serves one store to
several protocols (the mapping they check is docs/compat/mapping.md). The exception is MQTT and
AMQP through amq.topic, which test_mqtt_amqp.py also runs against RabbitMQ's MQTT plugin.
"""

from __future__ import annotations

import pathlib
import signal
import uuid

import pytest

import tributary_process
from tributary_process import ServerProcess, listeners_off, servers_of, tributary_bin


def pytest_configure(config):
    config.pluginmanager.register(tributary_process, "tributary_process")


class Tributary:
    def __init__(self, workdir: pathlib.Path, config: str | None = None):
        binary = tributary_bin()
        flags = ("--kafka-listen", "--mqtt-listen", "--amqp-listen", "--sqs-listen",
                 "--admin-listen")
        workdir.mkdir(parents=True, exist_ok=True)
        config_args = []
        if config is not None:
            path = workdir / "tributary.toml"
            path.write_text(config)
            config_args = ["--config", str(path)]
        self.process = ServerProcess(
            "tributary standalone",
            [
                binary, *config_args, "--data-dir", str(workdir / "data"),
                *listeners_off(binary, *flags),
                *[a for f in flags for a in (f, "127.0.0.1:0")],
            ],
            workdir / "standalone.log",
            env_defaults={"TRIBUTARY_GROUP_INITIAL_REBALANCE_DELAY_MS": "0"},
        )
        self.addrs = self.process.start()

    def host_port(self, name: str) -> tuple[str, int]:
        host, port = self.addrs[name].rsplit(":", 1)
        return host, int(port)

    def kill9_and_restart(self):
        """kill -9, then a new process on the same data directory (new ports)."""
        self.process.stop(signal.SIGKILL)
        self.addrs = self.process.start()

    def log_tail(self) -> str:
        return self.process.log_tail()

    def stop(self):
        self.process.stop()


@pytest.fixture
def tributary(request, tmp_path):
    t = Tributary(tmp_path)
    servers_of(request.node).append(t.process)
    yield t
    t.stop()


@pytest.fixture
def make_tributary(request, tmp_path):
    """A private server with a config file: make_tributary(TOML TEXT)."""
    made = []

    def make(config: str) -> Tributary:
        t = Tributary(tmp_path / f"t{len(made)}", config)
        made.append(t)
        servers_of(request.node).append(t.process)
        return t

    yield make
    for t in made:
        t.stop()


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]
