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
* ``live_processes`` / ``kill_live_processes()``: every started process not stopped yet, for
  the suites' ``pytest_sessionfinish``.
* ``reference_enabled(VAR)``, ``free_port()``, ``split_addr()``, ``log_file_tail()``.
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


class ServerProcess:
    """One tributary process: started, read until `ready`, stdout drained forever after.

    `env_defaults` are environment variables the process gets unless the environment already
    sets them (e.g. the Kafka suite's TRIBUTARY_GROUP_INITIAL_REBALANCE_DELAY_MS=0);
    TRIBUTARY_LOG defaults to info either way."""

    def __init__(self, name: str, argv: list[str], log_path: pathlib.Path,
                 env_defaults: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
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

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Sends `sig` and waits; returns the exit code (None if it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"{self.name} did not exit within {timeout:.0f}s of "
                    f"{signal.Signals(sig).name}\n{self.log_tail()}"
                )
        if self in live_processes:
            live_processes.remove(self)
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self in live_processes:
            live_processes.remove(self)

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return log_file_tail(self.log_path, n)


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
