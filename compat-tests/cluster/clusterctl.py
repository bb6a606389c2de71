"""Driving scripts/cluster.sh from the failover scenarios (not a test module).

* ``Cluster``: one cluster (`up` with its metadata store, `down`), its gateways' addresses,
  its nodes' roles (each node's admin `GET /healthz` answers 200 on the serving node only;
  a standby binds no listener; with shards, every node serves and the one serving a
  namespace says so on `GET /api/v1/cluster/shards?namespace=NS`), kill -9, cut, heal,
  SIGTERM and restarts of nodes, the exit code each node's run ended with and the log of its
  current run. With ``kafka_per_node`` (`up --kafka-per-node`) also a Kafka gateway beside
  each node N, broker id N (``kafka_nodes``).
* ``wait_for``: polls a condition with a deadline (never a sleep in place of a condition).
* ``shard_of``, ``shard_of_unit``, ``shard_of_topic``: the placement function of
  tributary_proto::placement, to name the shard of a namespace or of a topic.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "scripts" / "cluster.sh"
NODES = (1, 2, 3)

_STATUS_RE = re.compile(r"^core(\d) (.+?) pid=(\S+) core=(\S+) admin=(\S+)")


def wait_for(cond, timeout: float, what: str, interval: float = 0.05, on_timeout=None):
    """Polls `cond()` until it returns something truthy, which is returned; fails naming
    `what` (and what `on_timeout()` says) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


# -- placement: proto/src/placement.rs --------------------------------------------------------

# The prefix of a stream's unit name (placement::STREAM_UNIT).
STREAM_UNIT = "stream/"


def fnv1a(data: bytes) -> int:
    """FNV-1a, 64 bits (placement::fnv1a)."""
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def shard_of(namespace: str, shards: int) -> int:
    """The shard of a namespace, its home (placement::shard_of)."""
    return fnv1a(namespace.encode()) % max(shards, 1)


def shard_of_unit(scheme: str, namespace: str, unit: str | None, shards: int) -> int:
    """The shard of `unit` (`stream/<name>`; None for the namespace itself) in `namespace`
    under `scheme` ("namespace" or "stream") (placement::shard_of_unit)."""
    if scheme == "stream" and unit is not None and unit.startswith(STREAM_UNIT):
        return fnv1a(namespace.encode() + b"\0" + unit.encode()) % max(shards, 1)
    return shard_of(namespace, shards)


def shard_of_topic(namespace: str, topic: str, shards: int, scheme: str = "stream") -> int:
    """The shard of a Kafka topic (a stream) of `namespace`."""
    return shard_of_unit(scheme, namespace, STREAM_UNIT + topic, shards)


class ClusterError(AssertionError):
    pass


class Cluster:
    """A cluster run by scripts/cluster.sh in a state dir of its own (under /tmp: the postgres
    user must traverse it; pytest's own tmp dirs are closed to other users)."""

    def __init__(self, meta: str, binary: str, shards: int = 0, scheme: str = "namespace",
                 kafka_per_node: bool = False):
        self.meta = meta
        self.binary = binary
        # 0: one node serves, the others stand by; N: every node serves its share of N shards.
        self.shards = shards
        # With shards: "stream" places each topic by namespace and name (cluster_shard_scheme).
        self.scheme = scheme
        # With shards: a Kafka gateway beside each node N too, broker id N (`kafka-N`).
        self.kafka_per_node = kafka_per_node
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix=f"tributary-cluster-{meta}-"))
        self.listeners: dict[str, str] = {}
        self.nodes: dict[int, dict] = {}
        self.cut: set[int] = set()
        self.is_up = False

    # -- the script ------------------------------------------------------------------------

    def sh(self, *args: str, timeout: float = 120) -> str:
        env = dict(os.environ, TRIBUTARY_BIN=self.binary, TRIBUTARY_CLUSTER_DIR=str(self.dir))
        try:
            r = subprocess.run([str(CLUSTER_SH), *args], env=env, capture_output=True,
                               text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"cluster.sh {' '.join(args)} still running after {timeout:.0f}s; "
                               f"stderr so far:\n{e.stderr}") from None
        if r.returncode != 0:
            raise ClusterError(f"cluster.sh {' '.join(args)} exited {r.returncode}:\n"
                               f"{r.stdout}\n{r.stderr}")
        return r.stdout

    def up(self) -> "Cluster":
        args = ["up", "--meta", self.meta, "--shards", str(self.shards), "--scheme", self.scheme]
        if self.kafka_per_node:
            args.append("--kafka-per-node")
        out = self.sh(*args, timeout=300)
        self.is_up = True
        lines = out.strip().splitlines()
        assert lines and lines[-1] == "ready", f"cluster.sh up printed no `ready`:\n{out}"
        for line in lines[:-1]:
            m = re.match(r"^listening (\S+) (\S+)$", line)
            assert m, f"unexpected line from cluster.sh up: {line!r}"
            self.listeners[m.group(1)] = m.group(2)
        for name in self.gateway_names():
            assert name in self.listeners, f"no `listening {name}` from cluster.sh up:\n{out}"
        self.nodes = self.status()
        return self

    def gateway_names(self) -> list[str]:
        """The gateways `up` starts: one of each protocol in front of all three nodes, and with
        kafka_per_node `kafka-N` beside node N."""
        names = ["kafka", "mqtt", "amqp", "sqs", "rocketmq"]
        if self.kafka_per_node:
            names += [f"kafka-{n}" for n in NODES]
        return names

    @property
    def kafka_nodes(self) -> dict[int, str]:
        """With kafka_per_node: node N's Kafka gateway (broker id N, `--kafka-broker-node
        coreN`), N -> its address."""
        assert self.kafka_per_node, "this cluster was not started with kafka_per_node"
        return {n: self.listeners[f"kafka-{n}"] for n in NODES}

    def down(self, keep_dir: bool):
        if self.is_up:
            self.sh("down", timeout=180)
            self.is_up = False
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict[int, dict]:
        out = self.sh("status", timeout=60)
        nodes = {}
        for line in out.splitlines():
            m = _STATUS_RE.match(line)
            if m:
                nodes[int(m.group(1))] = {"role": m.group(2), "pid": m.group(3),
                                          "core": m.group(4), "admin": m.group(5)}
        assert set(nodes) == set(NODES), f"cluster.sh status:\n{out}"
        return nodes

    def kill(self, n: int):
        self.sh("kill-core", str(n))

    def stop(self, n: int):
        self.sh("stop-core", str(n), timeout=90)

    def cut_node(self, n: int):
        self.sh("cut-core", str(n))
        self.cut.add(n)

    def heal(self, n: int):
        self.sh("heal-core", str(n))
        self.cut.discard(n)

    def start(self, n: int) -> str:
        return self.sh("start-core", str(n), timeout=150).strip()

    # -- what the nodes do ------------------------------------------------------------------

    def shard_view(self, n: int, namespace: str = "default", timeout: float = 0.5) -> dict | None:
        """Node n's GET /api/v1/cluster/shards?namespace=NS (None if it does not answer)."""
        if n in self.cut:
            return None
        token = (self.dir / "token").read_text().strip()
        req = urllib.request.Request(
            f"http://{self.nodes[n]['admin']}/api/v1/cluster/shards?namespace={namespace}",
            headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def shard_servers(self, live: tuple[int, ...] = NODES) -> dict[int, list[int]] | None:
        """With shards: which of the `live` nodes serve each shard, as each one's GET
        /api/v1/cluster/shards says (None if one of them does not answer)."""
        servers: dict[int, list[int]] = {}
        for n in live:
            view = self.shard_view(n)
            if view is None:
                return None
            for s in view["served"]:
                servers.setdefault(s["shard"], []).append(n)
        return servers

    def node_serving(self, shard: int) -> int | None:
        """The first node that says it serves `shard` (None: none does, or none answers)."""
        for n in NODES:
            view = self.shard_view(n)
            if view and any(s["shard"] == shard for s in view["served"]):
                return n
        return None

    def settled(self, live: tuple[int, ...]) -> bool:
        """With shards: the `live` nodes serve every shard between them, each its quota
        (the shard count split as evenly as it goes), so no shard is about to move."""
        served = []
        for n in live:
            view = self.shard_view(n)
            if view is None:
                return False
            served.append(sorted(s["shard"] for s in view["served"]))
        every = sorted(x for s in served for x in s)
        low = self.shards // len(live)
        return every == list(range(self.shards)) and all(low <= len(s) <= low + 1 for s in served)

    def serving(self, n: int, timeout: float = 0.5) -> bool:
        """Node n serves the gateways' namespace: its admin listener answers GET /healthz
        with 200 (only the serving node binds it), or with shards, it says it serves the
        shard of `default`."""
        if n in self.cut:
            return False  # silent by construction: no need to wait out a timeout
        if self.shards:
            view = self.shard_view(n, timeout=timeout)
            return bool(view and view["namespace"]["served_here"])
        try:
            with urllib.request.urlopen(f"http://{self.nodes[n]['admin']}/healthz",
                                        timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def serving_nodes(self) -> list[int]:
        return [n for n in NODES if self.serving(n)]

    def wait_serving(self, timeout: float, exclude: tuple[int, ...] = ()) -> int:
        """Waits until exactly one node serves, not one of `exclude`; returns it."""
        def one():
            s = self.serving_nodes()
            return s[0] if len(s) == 1 and s[0] not in exclude else None
        return wait_for(one, timeout, f"one serving node other than {exclude}", interval=0.05,
                        on_timeout=self.describe)

    def exit_code(self, n: int) -> int | None:
        """How node n's current run ended (None while it runs)."""
        try:
            return int((self.dir / f"core{n}" / "rc").read_text().strip())
        except (OSError, ValueError):
            return None

    def log_time(self, n: int, text: str, also: re.Pattern | None = None) -> float | None:
        """When node n's current run last logged a line containing `text` (and matching
        `also`) (time.time())."""
        import datetime
        at = None
        for line in self.run_log(n).splitlines():
            if text in line and (also is None or also.search(line)):
                stamp = line.split(" ", 1)[0].rstrip("Z")
                try:
                    at = datetime.datetime.fromisoformat(stamp).replace(
                        tzinfo=datetime.timezone.utc).timestamp()
                except ValueError:
                    continue
        return at

    def takeover_times(self, n: int) -> tuple[float | None, float | None]:
        """When node n last took the lease and when its core was ready (time.time()); with
        shards, when it took the shard of `default` and when it had opened its core."""
        if not self.shards:
            return self.log_time(n, "this node is active"), self.log_time(n, "core ready")
        view = self.shard_view(n)
        if view is None:
            return None, None
        shard = re.compile(rf"\bshard={view['namespace']['shard']}\b")
        return (self.log_time(n, "took a shard", also=shard),
                self.log_time(n, "serving a shard", also=shard))

    def exit_time(self, n: int) -> float:
        """When node n's current run ended (time.time() of its exit code's file)."""
        return (self.dir / f"core{n}" / "rc").stat().st_mtime

    def net_mode(self) -> str:
        """netns (each node in a network namespace; a cut is a link down) or loopback (a cut
        is SIGSTOP)."""
        env = (self.dir / "cluster.env").read_text()
        m = re.search(r'NET_MODE="(\w+)"', env)
        assert m, f"no NET_MODE in {self.dir}/cluster.env"
        return m.group(1)

    def run_log(self, n: int) -> str:
        """Node n's log since its last start."""
        d = self.dir / f"core{n}"
        try:
            mark = int((d / "log.mark").read_text().strip())
        except (OSError, ValueError):
            mark = 0
        try:
            with open(d / "log", "rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def gateways_alive(self) -> dict[str, bool]:
        out = self.sh("status", timeout=60)
        return {m.group(1): m.group(2) == "running"
                for m in re.finditer(r"^gateway (\S+) (\S+)", out, re.M)}

    def log_files(self) -> list[tuple[str, pathlib.Path]]:
        files = [(f"core{n}", self.dir / f"core{n}" / "log") for n in NODES]
        files += [(f"gateway {p}", self.dir / f"gateway-{p}" / "log")
                  for p in self.gateway_names()]
        return files

    def describe(self) -> str:
        try:
            return self.sh("status", timeout=60)
        except ClusterError as e:
            return str(e)
