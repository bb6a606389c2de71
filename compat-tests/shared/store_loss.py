"""Losing a store during operation (issue 17): the log's object store (S3) or the metadata
store (etcd) goes away while a real client produces, and comes back.

Used by compat-tests/{kafka,amqp,mqtt}/test_store_loss.py, run by
`scripts/test-stores.sh store_loss` (which starts etcd and moto and writes the storage
snippet named by TRIBUTARY_TEST_STORAGE_TOML). Without that snippet saying
storage = "opendal" and opendal_ack = "shared" the scenarios are skipped (one line says why).

* ``TcpProxy``: a TCP proxy in front of the S3 endpoint that can refuse (close every
  connection, new ones closed at once) or black-hole (connections accepted or kept, nothing
  ever answered, nothing closed) and be restored.
* ``EtcdControl``: SIGSTOP / SIGCONT, or kill -9 and a restart on the same data directory, of
  the etcd server scripts/stores/etcd.sh started.
* ``StoreLoss`` (the ``store_loss`` fixture factory): the proxy plus a storage snippet naming
  it, installed in the environment for the deployments the test starts afterwards.
* ``run_outage``: the scenario driver, protocol-agnostic: a ``Producer`` (one per protocol)
  sends ids continuously and records which were acknowledged and which errors it saw; the
  driver cuts the store for OUTAGE_S, restores it, waits (polling, with a deadline) for a new
  acknowledgement, settles, and returns an ``Outcome`` the test checks and reports.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import tomllib
import urllib.parse

import pytest

# Longer than the object-store log's 10 s acknowledgement limit and etcd calls' 10 s deadline.
OUTAGE_S = 15.0
# After the store returns, a new message must be acknowledged within this (no restart).
RECOVERY_DEADLINE_S = 90.0
# Everything sent must be settled (acknowledged, refused or timed out) within this.
SETTLE_DEADLINE_S = 120.0
MAX_IN_FLIGHT = 200
OUTAGES = ["s3-refuse", "s3-blackhole", "etcd-stop", "etcd-kill"]


def storage_snippet() -> dict:
    """The storage snippet of TRIBUTARY_TEST_STORAGE_TOML; skips the test unless it puts the
    log on an object store with shared acknowledgement."""
    path = os.environ.get("TRIBUTARY_TEST_STORAGE_TOML")
    if not path:
        pytest.skip("store loss needs TRIBUTARY_TEST_STORAGE_TOML (scripts/test-stores.sh store_loss)")
    doc = tomllib.loads(pathlib.Path(path).read_text())
    if doc.get("storage") != "opendal" or doc.get("opendal_ack") != "shared":
        pytest.skip("store loss needs storage = opendal with opendal_ack = shared")
    return doc


# -- a TCP proxy that can be cut -------------------------------------------------------------


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.black = False
        self.closed = False


class TcpProxy:
    """127.0.0.1:<free port> -> upstream. Modes: "pass"; "refuse" (existing connections are
    closed, new ones closed as soon as accepted); "blackhole" (existing and new connections
    stay open, whatever is sent is swallowed, nothing comes back, nothing is closed: only the
    client's own timeouts end them)."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.port = self.lsock.getsockname()[1]
        self.mode = "pass"
        self.lock = threading.Lock()
        self.pairs: list[_Pair] = []
        self.held: list[socket.socket] = []  # accepted while black-holed
        self.accepted = 0
        self.closing = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self):
        while not self.closing:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            mode = self.mode
            if mode == "refuse":
                _close(c)
                continue
            if mode == "blackhole":
                with self.lock:
                    self.held.append(c)
                threading.Thread(target=self._swallow, args=(c,), daemon=True).start()
                continue
            try:
                u = socket.create_connection(self.upstream, timeout=5)
                u.settimeout(None)
            except OSError:
                _close(c)
                continue
            pair = _Pair(c, u)
            with self.lock:
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, u, c), daemon=True).start()

    @staticmethod
    def _swallow(s: socket.socket):
        while True:
            try:
                if not s.recv(65536):
                    return
            except OSError:
                return

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if pair.black:
                continue  # swallowed
            try:
                dst.sendall(data)
            except OSError:
                break
        if pair.black:
            return  # a black hole never closes anything
        with self.lock:
            if pair.closed:
                return
            pair.closed = True
        _close(pair.client)
        _close(pair.upstream)

    def cut(self, mode: str):
        assert mode in ("refuse", "blackhole"), mode
        self.mode = mode
        with self.lock:
            pairs = [p for p in self.pairs if not p.closed]
        for p in pairs:
            if mode == "refuse":
                with self.lock:
                    p.closed = True
                _close(p.client)
                _close(p.upstream)
            else:
                p.black = True

    def restore(self):
        """New connections pass again; black-holed ones stay dead (never answered, never
        closed), as after a partition whose connections the peers forgot."""
        self.mode = "pass"

    def close(self):
        self.closing = True
        _close(self.lsock)
        with self.lock:
            socks = [s for p in self.pairs for s in (p.client, p.upstream)] + self.held
        for s in socks:
            _close(s)


def _close(s: socket.socket):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# -- etcd --------------------------------------------------------------------------------------


class EtcdControl:
    """The etcd scripts/stores/etcd.sh started (TRIBUTARY_TEST_ETCD_CTL: its pid file and
    start.sh, which starts it again on the same port and data directory)."""

    def __init__(self, url: str):
        ctl = os.environ.get("TRIBUTARY_TEST_ETCD_CTL")
        if not ctl:
            pytest.fail("meta = etcd but TRIBUTARY_TEST_ETCD_CTL is not set "
                        "(scripts/test-stores.sh store_loss sets it)", pytrace=False)
        self.dir = pathlib.Path(ctl)
        u = urllib.parse.urlparse(url.split(",")[0])
        self.host, self.port = u.hostname, u.port
        self.stopped = False
        self.killed = False

    def pid(self) -> int:
        return int((self.dir / "pid").read_text().strip())

    def sigstop(self):
        os.kill(self.pid(), signal.SIGSTOP)
        self.stopped = True

    def sigcont(self):
        os.kill(self.pid(), signal.SIGCONT)
        self.stopped = False

    def kill9(self, timeout: float = 10.0):
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        self.killed = True
        deadline = time.monotonic() + timeout
        while _pid_running(pid):
            assert time.monotonic() < deadline, f"etcd (pid {pid}) still runs {timeout}s after SIGKILL"
            time.sleep(0.05)

    def start(self, timeout: float = 30.0):
        subprocess.run([str(self.dir / "start.sh")], check=True, timeout=30)
        self.killed = False
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.host, self.port), 1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"etcd not listening {timeout}s after its restart"
                time.sleep(0.05)

    def heal(self):
        """Teardown: whatever the test did, etcd runs again."""
        if self.stopped:
            self.sigcont()
        if self.killed or not _pid_running(self.pid()):
            self.start()


def _pid_running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# -- the stores of one test ----------------------------------------------------------------------


class StoreLoss:
    """A proxy in front of the snippet's S3 endpoint, a snippet naming the proxy (put in the
    environment for the servers started afterwards) and control of etcd."""

    def __init__(self, tmp: pathlib.Path, monkeypatch):
        doc = storage_snippet()
        endpoint = doc.get("opendal", {}).get("endpoint")
        if not endpoint:
            pytest.skip("store loss needs an [opendal] endpoint (S3) to cut")
        u = urllib.parse.urlparse(endpoint)
        self.proxy = TcpProxy(u.hostname, u.port or 80)
        doc["opendal"]["endpoint"] = f"{u.scheme}://{self.proxy.address}"
        if doc.get("meta") != "etcd":
            pytest.fail(f"store loss expects meta = etcd, the snippet says {doc.get('meta')!r}",
                        pytrace=False)
        self.etcd = EtcdControl(doc["meta_url"])
        from tributary_process import _toml_dump
        path = tmp / "storage-through-proxy.toml"
        path.write_text(_toml_dump(doc) + "\n")
        monkeypatch.setenv("TRIBUTARY_TEST_STORAGE_TOML", str(path))
        # Each restart would start on an emptied data directory: not wanted here (no restart).
        monkeypatch.delenv("TRIBUTARY_TEST_WIPE_DATA_DIR", raising=False)

    def cut(self, outage: str):
        if outage == "s3-refuse":
            self.proxy.cut("refuse")
        elif outage == "s3-blackhole":
            self.proxy.cut("blackhole")
        elif outage == "etcd-stop":
            self.etcd.sigstop()
        elif outage == "etcd-kill":
            self.etcd.kill9()
        else:
            raise ValueError(outage)

    def restore(self, outage: str):
        if outage.startswith("s3-"):
            self.proxy.restore()
        elif outage == "etcd-stop":
            self.etcd.sigcont()
        else:
            self.etcd.start()

    def close(self):
        try:
            self.etcd.heal()
        finally:
            self.proxy.close()


@pytest.fixture
def store_loss(tmp_path, monkeypatch):
    s = StoreLoss(tmp_path, monkeypatch)
    yield s
    s.close()


# -- the scenario ----------------------------------------------------------------------------------


class Producer:
    """What run_outage needs of a protocol's client. `send(i)` publishes id i without waiting (False: not sent, no connection now);
    `service(secs)` drives the client for up to `secs` (its own event loop), calling
    `self.acked_now(i)` for each acknowledged id, `self.gave_up(i, kind)` for each id the
    client learnt was not acknowledged and `self.error(kind)` for any other error seen;
    `in_flight()` counts ids neither acknowledged nor given up; `settle(deadline)` drives the
    client until nothing is in flight (or the deadline passes)."""

    def __init__(self):
        self.sent: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self.outcome: dict[int, float] = {}  # id -> when the client learnt its fate
        self.errors: collections.Counter = collections.Counter()
        self.error_times: dict[str, list[float]] = collections.defaultdict(list)

    def acked_now(self, i: int):
        self.acked.setdefault(i, time.monotonic())
        self.outcome.setdefault(i, time.monotonic())

    def gave_up(self, i: int, kind: str):
        self.outcome.setdefault(i, time.monotonic())
        self.error(kind)

    def error(self, kind: str):
        self.errors[kind] += 1
        self.error_times[kind].append(time.monotonic())

    def send(self, i: int) -> bool:
        """False when nothing was sent (no connection now)."""
        raise NotImplementedError

    def service(self, secs: float):
        raise NotImplementedError

    def in_flight(self) -> int:
        raise NotImplementedError


@dataclasses.dataclass
class Outcome:
    outage: str
    sent: int
    acked: int
    cut_at: float
    restored_at: float
    # Sent at least a second after the cut and acknowledged before the restore.
    acked_in_cut: list[int]
    # Store back -> the first acknowledgement of anything / of an id sent after the restore.
    first_ack_s: float | None
    first_new_ack_s: float | None
    errors: dict
    errors_in_cut: dict
    unsettled: int
    # The longest a sent id waited for its acknowledgement or its failure.
    longest_wait_s: float = 0.0
    acked_ids: frozenset = frozenset()

    def summary(self) -> str:
        def s(v):
            return "none" if v is None else f"{v:.2f}s"
        return (f"{self.outage}: sent {self.sent}, acknowledged {self.acked}, "
                f"acknowledged while cut {len(self.acked_in_cut)}; store back -> first ack "
                f"{s(self.first_ack_s)}, first ack of a new message {s(self.first_new_ack_s)}; "
                f"errors {dict(self.errors)} (during the cut {dict(self.errors_in_cut)}); "
                f"longest wait for an outcome {self.longest_wait_s:.1f}s; unsettled {self.unsettled}")


def run_outage(p: Producer, stores: StoreLoss, outage: str, alive, warmup: int = 50) -> Outcome:
    """Produces continuously; after `warmup` acknowledgements cuts the store for OUTAGE_S,
    restores it, produces until an id sent after the restore is acknowledged (within
    RECOVERY_DEADLINE_S; `alive()` must stay true: the server is never restarted), then stops
    sending and settles what is in flight."""
    next_id = 0

    def step():
        nonlocal next_id
        if p.in_flight() < MAX_IN_FLIGHT:
            at = time.monotonic()
            if p.send(next_id):
                p.sent[next_id] = at
                next_id += 1
        p.service(0.02)  # the client's event loop; paces the sending too

    deadline = time.monotonic() + 60
    while len(p.acked) < warmup:
        assert time.monotonic() < deadline, f"only {len(p.acked)} acknowledged before the cut"
        step()
    cut_at = time.monotonic()
    stores.cut(outage)
    try:
        while time.monotonic() < cut_at + OUTAGE_S:
            step()
            assert alive(), "the server died while the store was cut"
    finally:
        restored_at = time.monotonic()
        stores.restore(outage)
    errors_in_cut = dict(p.errors)
    deadline = restored_at + RECOVERY_DEADLINE_S
    first_new = None
    while first_new is None:
        assert alive(), "the server died after the store returned"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no message sent after the store returned was acknowledged within "
                f"{RECOVERY_DEADLINE_S:.0f}s (sent {len(p.sent)}, acknowledged {len(p.acked)}, "
                f"errors {dict(p.errors)})")
        step()
        new = [t for i, t in p.acked.items() if p.sent[i] >= restored_at]
        if new:
            first_new = min(new)
    # A little more traffic after the recovery, then settle.
    more_until = len(p.acked) + 50
    deadline = time.monotonic() + 60
    while len(p.acked) < more_until and time.monotonic() < deadline:
        step()
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    while p.in_flight() and time.monotonic() < deadline:
        p.service(0.05)
    after = [t for t in p.acked.values() if t >= restored_at]
    return Outcome(
        outage=outage,
        sent=len(p.sent),
        acked=len(p.acked),
        cut_at=cut_at,
        restored_at=restored_at,
        acked_in_cut=sorted(i for i, t in p.acked.items()
                            if p.sent[i] >= cut_at + 1.0 and t < restored_at),
        first_ack_s=(min(after) - restored_at) if after else None,
        first_new_ack_s=first_new - restored_at,
        errors=dict(p.errors),
        errors_in_cut=errors_in_cut,
        unsettled=p.in_flight(),
        longest_wait_s=max((t - p.sent[i] for i, t in p.outcome.items()), default=0.0),
        acked_ids=frozenset(p.acked),
    )


def check_outcome(client: str, o: Outcome, consumed: list[int], holds_messages: str,
                  report_path: pathlib.Path | None = None):
    """The checks every protocol shares (`client` names the client in the outcome line);
    `consumed` lists every id read back (duplicates
    included); `holds_messages` ("s3" or "etcd") is the store an acknowledged message must
    be in: while it is cut nothing sent may be acknowledged."""
    counts = collections.Counter(consumed)
    missing = sorted(i for i in range(o.sent) if i in o.acked_ids and counts[i] == 0)
    dups = sum(c - 1 for c in counts.values() if c > 1)
    line = f"{client} {o.summary()}; read back {len(counts)} ids, {dups} duplicates"
    print(line)
    if report_path is not None:
        with open(report_path, "a") as f:
            f.write(line + "\n")
    assert not missing, f"{len(missing)} acknowledged ids never read back, e.g. {missing[:10]}: {line}"
    assert not [i for i in counts if i >= o.sent], "read back ids never sent"
    if o.outage.startswith(holds_messages + "-"):
        # Nothing can be acknowledged while the store that holds the messages is gone.
        assert not o.acked_in_cut, (
            f"{len(o.acked_in_cut)} ids sent during the {holds_messages} cut were "
            f"acknowledged before it ended, e.g. {o.acked_in_cut[:10]}: {line}")
        # ... and the client is told: an error, a refusal or a closed connection.
        assert o.errors_in_cut, f"no error reached the client during the cut: {line}"
    assert o.unsettled == 0, f"{o.unsettled} sends neither acknowledged nor failed: {line}"


def report_file() -> pathlib.Path | None:
    """TRIBUTARY_STORE_LOSS_REPORT: a file each scenario appends its one-line outcome to."""
    v = os.environ.get("TRIBUTARY_STORE_LOSS_REPORT")
    return pathlib.Path(v) if v else None
