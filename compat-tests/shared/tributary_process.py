"""Process plumbing every protocol suite's conftest.py uses (each suite's pytest.ini puts this
directory on the import path): the tributary binary from TRIBUTARY_BIN, server processes that
die with pytest, read until they print `ready`, and the bookkeeping that kills whatever is
still running when the session ends.

* ``tributary_bin()``: TRIBUTARY_BIN, checked (a test fails when it is unset or not
  executable).
* ``ServerProcess``: one tributary process; ``start()`` reads its `listening NAME ADDR` lines
  until `ready` and returns {NAME: ADDR}; stdout is drained into the log ever after.
* ``listeners_off(binary, *keep)``: `--X off` for every listener flag the binary knows but
  `keep`, so no test server opens a default port.
* ``die_with_parent``: a ``preexec_fn`` for any server a suite starts (reference brokers too).
* ``live_processes``: every started process not stopped yet (a reference broker's start()
  appends itself too); ``kill_live_processes()`` ends them.
* ``reference_enabled(VAR)``, ``free_port()``, ``split_addr()``, ``log_file_tail()``.
* ``BaseDeployment`` (processes that serve together: stop, stop_clean, dead_processes,
  log_tails) and ``ProtocolDeployment`` (tributary serving one protocol, standalone or split,
  for the MQTT, AMQP and SQS suites); ``ManagedProcess``, the base of ServerProcess and of the
  reference brokers' processes (alive, stop, kill, log_tail, wait_listening).
* For the fixtures: ``deployment_fixtures(cls)`` (tributary_server, make_tributary,
  make_module_tributary), ``shared_server_broker``, ``check_alive``, ``servers_of``,
  ``stop_session_deployment``, ``mark_differences`` (the ``differs`` / ``tributary_only``
  markers).

Each suite's conftest.py also registers this module as a plugin (in pytest_configure): a failed
test's report gets the logs of the servers in its servers_of(), and whatever still runs when
the session ends is killed.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import queue
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 80

_LISTEN_RE = re.compile(r"^listening (\S+) (\S+)\s*$")

# Every server process started and not stopped yet (tributary and reference brokers alike:
# anything with a kill()); kill_live_processes() ends them when the session does.
live_processes: list = []


try:  # resolved in the parent: the child may only make the call (no dlopen after fork)
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_dump(doc: dict, prefix: str = "") -> str:
    """Writes what tomllib read back: scalars first, then tables and arrays of tables."""
    out = []
    for k, v in doc.items():
        if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
            out.append(f"{k} = {_toml_value(v)}")
    for k, v in doc.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.append(f"\n[{name}]")
            out.append(_toml_dump(v, name + "."))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"\n[[{name}]]")
                out.append(_toml_dump(item, name + "."))
    return "\n".join(out)


def with_test_storage(argv: list[str]) -> list[str]:
    """TRIBUTARY_TEST_STORAGE_TOML (scripts/test-stores.sh) names a TOML snippet choosing the
    storage (for example storage = "opendal" on S3 and meta = "etcd"): every process that owns
    a data directory gets it merged into its config, with "{id}" in string values replaced by
    an id of that data directory, so that each deployment keeps its own objects and metadata
    and finds them again when restarted."""
    snippet_path = os.environ.get("TRIBUTARY_TEST_STORAGE_TOML")
    if not snippet_path or "--data-dir" not in argv:
        return argv
    import hashlib
    import tomllib
    data_dir = argv[argv.index("--data-dir") + 1]
    ident = "t" + hashlib.sha1(str(pathlib.Path(data_dir).resolve()).encode()).hexdigest()[:16]

    def substitute(v):
        if isinstance(v, str):
            return v.replace("{id}", ident)
        if isinstance(v, dict):
            return {k: substitute(x) for k, x in v.items()}
        if isinstance(v, list):
            return [substitute(x) for x in v]
        return v

    merged: dict = {}
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        merged = tomllib.loads(pathlib.Path(argv[i + 1]).read_text())
        del argv[i:i + 2]
    for k, v in substitute(tomllib.loads(pathlib.Path(snippet_path).read_text())).items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k].update(v)
        else:
            merged[k] = v
    path = pathlib.Path(data_dir).parent / f"storage-{ident}.toml"
    path.write_text(_toml_dump(merged) + "\n")
    # Options after the subcommand: `tributary core --config F` and `tributary --config F`.
    at = 2 if len(argv) > 1 and argv[1] in ("core", "gateway") else 1
    return argv[:at] + ["--config", str(path)] + argv[at:]


def die_with_parent():  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphaned servers if pytest dies


def kill_live_processes():
    """Kills every process still running (from the suites' pytest_sessionfinish)."""
    for p in list(live_processes):
        p.kill()


def reference_enabled(env_var: str) -> bool:
    """False when `env_var` (e.g. AMQP_REFERENCE) says off/0/false/no: the reference broker
    is not run."""
    return os.environ.get(env_var, "").lower() not in ("off", "0", "false", "no")


def tributary_bin() -> str:
    path = os.environ.get("TRIBUTARY_BIN")
    if not path:
        pytest.fail(
            "TRIBUTARY_BIN is not set: point it at a built tributary binary "
            "(scripts/compat.sh does this)",
            pytrace=False,
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"TRIBUTARY_BIN={path} is not an executable file", pytrace=False)
    return os.path.abspath(path)


def log_file_tail(path: pathlib.Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return f"--- last {min(n, len(lines))} lines of {path}:\n" + "\n".join(lines[-n:])


class ManagedProcess:
    """What the fixtures need of any server process, tributary's or a reference broker's:
    `name`, `proc` (the Popen), `log_path`; alive(), stop(), kill(), log_tail(), and
    `processes` (itself: one process serves as a deployment of one). A subclass starts `proc`
    with `preexec_fn=die_with_parent` and appends itself to `live_processes`."""

    name: str
    log_path: pathlib.Path
    proc: subprocess.Popen | None = None
    # How long stop() waits before SIGKILL; when stop_timeout_fails, a process that needed
    # that SIGKILL fails the stop (AssertionError).
    stop_timeout = STOP_TIMEOUT_S
    stop_timeout_fails = True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Sends `sig` and waits; returns the exit code (None if it was not running)."""
        if timeout is None:
            timeout = self.stop_timeout
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if self.stop_timeout_fails:
                    raise AssertionError(
                        f"{self.name} did not exit within {timeout:.0f}s of "
                        f"{signal.Signals(sig).name}\n{self.log_tail()}"
                    )
        self._forget()
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._forget()

    def _forget(self):
        if self in live_processes:
            live_processes.remove(self)

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return log_file_tail(self.log_path, n)

    @property
    def processes(self) -> list:
        return [self]

    def wait_listening(self, port: int, timeout: float, interval: float = 0.2,
                       connect_timeout: float = 1.0):
        """Waits until 127.0.0.1:`port` accepts a connection (a reference broker's `ready`):
        RuntimeError with the log tail when the process exits first, or when `timeout`
        passes (the process is killed then)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited (code {self.proc.returncode}) before "
                                   f"listening on {port}\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", port), connect_timeout).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"{self.name} did not listen on {port} within "
                                       f"{timeout:.0f}s\n{self.log_tail()}")
                time.sleep(interval)


class ServerProcess(ManagedProcess):
    """One tributary process: started, read until `ready`, stdout drained forever after.

    `env_defaults` are environment variables the process gets unless the environment already
    sets them (e.g. the Kafka suite's TRIBUTARY_GROUP_INITIAL_REBALANCE_DELAY_MS=0);
    TRIBUTARY_LOG defaults to info either way."""

    def __init__(self, name: str, argv: list[str], log_path: pathlib.Path,
                 env_defaults: dict[str, str] | None = None):
        self.name = name
        self.argv = with_test_storage(argv)
        self.log_path = log_path
        self.env_defaults = dict(env_defaults or {})
        self.proc: subprocess.Popen | None = None
        self.listeners: dict[str, str] = {}
        self._lines: queue.Queue = queue.Queue()
        self._ready = threading.Event()

    def start(self, timeout: float = READY_TIMEOUT_S) -> dict[str, str]:
        # Only the server's own settings: TRIBUTARY_BIN / TRIBUTARY_VENV are the scripts'.
        env = {k: v for k, v in os.environ.items() if k not in ("TRIBUTARY_BIN", "TRIBUTARY_VENV")}
        for k, v in self.env_defaults.items():
            env.setdefault(k, v)
        env.setdefault("TRIBUTARY_LOG", "info")
        if os.environ.get("TRIBUTARY_TEST_WIPE_DATA_DIR") and "--data-dir" in self.argv:
            # The machine was lost: only the object store and the metadata store remain
            # (scripts/test-stores.sh, opendal_ack = shared).
            import shutil
            data_dir = pathlib.Path(self.argv[self.argv.index("--data-dir") + 1])
            shutil.rmtree(data_dir, ignore_errors=True)
            data_dir.mkdir(parents=True, exist_ok=True)
        # A fresh queue and event per start: the previous process's stdout pump may still be
        # draining (and then reporting EOF) after a restart, and must not reach this start.
        self._lines = queue.Queue()
        self._ready = threading.Event()
        self.listeners = {}
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,  # the child writes its log (stderr) straight into the file
                env=env,
                preexec_fn=die_with_parent,
            )
        live_processes.append(self)
        threading.Thread(
            target=self._pump, args=(self.proc, self._lines, self._ready), daemon=True
        ).start()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise RuntimeError(
                    f"{self.name} printed no `ready` within {timeout:.0f}s\n{self.log_tail()}"
                )
            try:
                line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process exited
                try:
                    rc = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    rc = "?"
                raise RuntimeError(
                    f"{self.name} exited (code {rc}) before `ready`\n{self.log_tail()}"
                )
            m = _LISTEN_RE.match(line)
            if m:
                self.listeners[m.group(1)] = m.group(2)
            elif line.strip() == "ready":
                self._ready.set()
                return self.listeners

    def _pump(self, proc: subprocess.Popen, lines: queue.Queue, ready: threading.Event):
        # Keeps reading stdout so the server never blocks on a full pipe.
        assert proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in proc.stdout:
                log.write(b"[stdout] " + raw)
                log.flush()
                if not ready.is_set():
                    lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        lines.put(None)


_flags_cache: dict[str, set[str]] = {}

# Every listener flag a build may have; each one not wanted is turned off, so no test server
# ever opens a default port (e.g. MQTT over WebSocket on 0.0.0.0:8083).
LISTENER_FLAGS = [
    "--core-listen", "--admin-listen", "--kafka-listen", "--mqtt-listen", "--mqtt-ws-listen",
    "--mqtt-tls-listen", "--amqp-listen", "--amqp-tls-listen", "--sqs-listen", "--rocketmq-listen",
    "--namesrv-listen",
]


def listeners_off(binary: str, *keep: str) -> list[str]:
    """`--X off` for every listener flag of this binary except `keep`."""
    if binary not in _flags_cache:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
        _flags_cache[binary] = set(re.findall(r"--[a-z0-9-]+", out.stdout))
    known = _flags_cache[binary]
    return [a for f in LISTENER_FLAGS if f in known and f not in keep for a in (f, "off")]


def split_addr(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BaseDeployment:
    """Processes that serve together (a core and its gateways, or one standalone process),
    in `processes`, the one holding the data first: stopped gateways first, checked alive,
    their logs tailed. Subclasses start() them."""

    mode: str
    processes: list[ServerProcess]
    # Added to the error when a process prints `ready` without the listener it must have.
    missing_listener_hint = ""

    def _need(self, listeners: dict[str, str], name: str, p: ServerProcess):
        if name not in listeners:
            p.kill()
            hint = f" {self.missing_listener_hint}" if self.missing_listener_hint else ""
            raise RuntimeError(
                f"{p.name} printed `ready` without a `listening {name} ADDR` line{hint}\n"
                f"{p.log_tail()}"
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
        """SIGTERM; every process must exit 0 (the documented graceful stop)."""
        codes = self.stop(signal.SIGTERM)
        bad = {k: v for k, v in codes.items() if v not in (0, None)}
        assert not bad, f"graceful stop exited non-zero: {bad}\n{self.log_tails()}"

    def kill_core(self):
        """SIGKILL of the process that holds the data (standalone: the only one)."""
        self.core.stop(signal.SIGKILL)

    def dead_processes(self) -> list[ServerProcess]:
        return [p for p in self.processes if not p.alive()]

    def log_tails(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(p.log_tail(n) for p in self.processes)


class ProtocolDeployment(BaseDeployment):
    """Tributary serving one protocol, `protocol` (its gateway `tributary gateway P`, its
    listener `--P-listen`, its `listening P ADDR` line): ``standalone``, ``split`` (core + one
    gateway) or ``split-2gw`` (core + two gateways), optionally with a config file, on one data
    directory. Every other listener is off (but the core's gRPC one in split modes). `addrs`
    holds the protocol's addresses, one per gateway. Subclasses set `protocol` and add
    broker()."""

    protocol = ""

    def __init__(self, mode: str, workdir: pathlib.Path, config: pathlib.Path | None = None):
        assert mode in ("standalone", "split", "split-2gw"), mode
        assert self.protocol, "a ProtocolDeployment subclass sets `protocol`"
        self.mode = mode
        self.bin = tributary_bin()
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.processes: list[ServerProcess] = []
        self.addrs: list[str] = []
        self.core_addr: str | None = None
        self.starts = 0

    @property
    def listen_flag(self) -> str:
        return f"--{self.protocol}-listen"

    def _config_args(self) -> list[str]:
        return ["--config", str(self.config)] if self.config else []

    def start(self) -> "ProtocolDeployment":
        self.starts += 1
        self.processes = []
        self.addrs = []
        if self.mode == "standalone":
            p = ServerProcess(
                "tributary standalone",
                [
                    self.bin, *self._config_args(),
                    "--data-dir", str(self.data_dir),
                    *listeners_off(self.bin, self.listen_flag),
                    self.listen_flag, "127.0.0.1:0",
                ],
                self.workdir / "standalone.log",
            )
            self.processes.append(p)
            listeners = p.start()
            self._need(listeners, self.protocol, p)
            self.addrs = [listeners[self.protocol]]
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
                self.addrs.append(self._start_gateway(gw))
        return self

    def _gateway(self, i: int) -> ServerProcess:
        return ServerProcess(
            f"tributary gateway {self.protocol} #{i}",
            [
                self.bin, "gateway", self.protocol, *self._config_args(),
                "--core", f"http://{self.core_addr}",
                *listeners_off(self.bin, self.listen_flag, "--core-listen"),
                self.listen_flag, "127.0.0.1:0",
            ],
            self.workdir / f"gateway{i}.log",
        )

    def _start_gateway(self, gw: ServerProcess) -> str:
        gl = gw.start()
        self._need(gl, self.protocol, gw)
        return gl[self.protocol]

    def restart(self, sig: int = signal.SIGKILL) -> "ProtocolDeployment":
        """Stops every process with `sig` and starts the deployment again on the same data
        directory (new ports: `addrs` and broker() give the new ones)."""
        self.stop(sig)
        return self.start()

    def restart_core(self, sig: int = signal.SIGKILL) -> "ProtocolDeployment":
        """Stops the process holding the data with `sig` and starts it again on the same
        data directory. Standalone: a new process on a new port (`addrs` and broker() give
        the new one). Split modes: the core comes back on the same gRPC address and the
        gateways keep running (same ports)."""
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

    def __repr__(self):
        return f"{type(self).__name__}({self.mode}, {self.protocol}={self.addrs})"


# -- for the suites' fixtures and hooks ------------------------------------------------------


def servers_of(node) -> list:
    """The servers (deployments, reference brokers) the test `node` uses: append to it, and
    attach_server_logs() adds their logs to the test's report when it fails."""
    if not hasattr(node, "_compat_servers"):
        node._compat_servers = []
    return node._compat_servers


def attach_server_logs(item, report):
    """From a pytest_runtest_makereport hook wrapper: a failed report gets the log tail of
    every process of every server in servers_of(item)."""
    if report.failed:
        for s in getattr(item, "_compat_servers", []):
            for p in s.processes:
                report.sections.append((f"server log {p.name}", p.log_tail()))


def shared_server_broker(request, kind: str):
    """For a suite's ``broker`` fixture (``yield from``): the session's `{kind}_server`
    fixture, checked alive before and after the test (check_alive), one of the test's
    servers_of(); yields its broker()."""
    server = request.getfixturevalue(f"{kind}_server")
    check_alive(server, "before this test")
    servers_of(request.node).append(server)
    yield server.broker()
    check_alive(server, "during this test")


def check_alive(server, when: str):
    """Fails the test (`when`: "before this test", "during this test") if a process of the
    shared `server` has died, after restarting it so that later tests run."""
    dead = [p for p in server.processes if not p.alive()]
    if dead:
        info = ", ".join(f"{p.name} (exit {p.proc.returncode})" for p in dead)
        tails = "\n".join(p.log_tail() for p in server.processes)
        # Restart so later tests run, and fail this one.
        server.stop(signal.SIGKILL)
        server.start()
        pytest.fail(f"server died {when}: {info}\n{tails}", pytrace=False)


def stop_session_deployment(d: BaseDeployment):
    """The end of a session's shared deployment: a clean stop (every process exits 0) if
    all still run, SIGKILL of the rest if some died (the test that saw it failed)."""
    if not d.dead_processes():
        d.stop_clean()
    else:
        d.stop(signal.SIGKILL)


def deployment_factory(cls, workdir, servers: list | None = None):
    """For make_tributary-style fixtures: returns (make, made). make(mode="standalone",
    config=None) starts a `cls` deployment in the directory workdir(n) (n: how many were
    made before; created if missing) with `config`, the text of a tributary.toml, written
    there; `made` lists them (the fixture stops them), and so does `servers` if given."""
    made: list = []

    def make(mode: str = "standalone", config: str | None = None):
        wd = workdir(len(made))
        wd.mkdir(parents=True, exist_ok=True)
        cfg = None
        if config is not None:
            cfg = wd / "tributary.toml"
            cfg.write_text(config)
        d = cls(mode, wd, cfg)
        made.append(d)
        if servers is not None:
            servers.append(d)
        return d.start()

    return make, made


def deployment_fixtures(cls):
    """The fixtures every single-protocol suite (MQTT, AMQP, SQS) has for its `cls`, a
    ProtocolDeployment subclass; a conftest binds them to module names:

    * ``tributary_server`` (session): one standalone deployment shared by the tests,
      stopped with stop_session_deployment().
    * ``make_tributary``: factory make(mode="standalone", config=None) for private
      deployments (the test's servers_of(), for its report), killed after the test.
    * ``make_module_tributary``: the same, shared by the tests of one module (e.g. a
      config), killed after the module.
    """

    @pytest.fixture(scope="session")
    def tributary_server(tmp_path_factory):
        d = cls("standalone", tmp_path_factory.mktemp("tributary-shared"))
        d.start()
        yield d
        stop_session_deployment(d)

    @pytest.fixture
    def make_tributary(tmp_path, request):
        """Factory for private Tributary deployments; killed after the test."""
        make, made = deployment_factory(cls, lambda n: tmp_path / f"tributary{n}",
                                        servers_of(request.node))
        yield make
        for d in made:
            d.stop(signal.SIGKILL)

    @pytest.fixture(scope="module")
    def make_module_tributary(tmp_path_factory):
        """Like make_tributary, for servers shared by the tests of one module (e.g. a config)."""
        make, made = deployment_factory(cls, lambda n: tmp_path_factory.mktemp("tributary-module"))
        yield make
        for d in made:
            d.stop(signal.SIGKILL)

    return tributary_server, make_tributary, make_module_tributary


def mark_differences(items, broker_params: tuple[str, ...] = ("broker",)):
    """From pytest_collection_modifyitems: ``differs(broker, reason, protocol=None)`` becomes
    a strict xfail on the test cases whose broker parameter (the first of `broker_params` the
    case has, e.g. MQTT's ``restartable`` too) is `broker` (and, with `protocol`, whose
    ``protocol`` parameter is that); ``tributary_only`` on a case with a broker parameter is
    a usage error."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        case_broker = next((params[p] for p in broker_params if p in params), None)
        for m in item.iter_markers("differs"):
            broker = m.kwargs.get("broker", m.args[0] if m.args else None)
            reason = m.kwargs.get("reason", m.args[1] if len(m.args) > 1 else "")
            protocol = m.kwargs.get("protocol")
            if case_broker != broker:
                continue
            if protocol is not None and params.get("protocol") != protocol:
                continue
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"{broker} differs: {reason}"))
        for m in item.iter_markers("tributary_only"):
            if any(p in params for p in broker_params):
                raise pytest.UsageError(f"{item.nodeid}: tributary_only with a broker parameter")


# -- hooks: each suite's conftest.py registers this module as a plugin ----------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    attach_server_logs(item, outcome.get_result())


def pytest_sessionfinish(session, exitstatus):
    kill_live_processes()
