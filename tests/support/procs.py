"""Child processes for integration tests: ports, readiness, and leaving nothing behind.

Every process runs in its own session (process group) so that stopping it also stops whatever it
spawned (HAProxy workers, a gevent server's helpers), and its output goes to files so a failing
test can show what the process said rather than a bare timeout.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Ports for test servers come from below the kernel's ephemeral range, one slice per xdist
# worker. A port that bind(0) picked and the test then closed stays in that range, where the
# kernel hands it again to the next bind(0) or as the source port of any outgoing connection
# (HAProxy's to an agent, wrk's, a client's): ci54 lost an e2e test to HAProxy failing to bind
# such a port ("Address already in use"). Below the range only explicit binds land, and each
# worker's counter never hands out a port twice before its slice wraps. The slices start above
# the demo stack's fixed ports (the highest, Jaeger's UI, 16686), which its tests need free.
_PORTS_FIRST = 17000
_PORTS_SLICES = 8


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = max((_ephemeral_low() - _PORTS_FIRST) // _PORTS_SLICES, 64)
    start = _PORTS_FIRST + (index % _PORTS_SLICES) * size
    return range(start, start + size)


_SLICE = _port_slice()
# A random start, so two test sessions run side by side outside xdist rarely walk in step.
_next_port = _SLICE.start + random.randrange(len(_SLICE))


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(family, kind) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return False
    return True


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports on which nothing listens, TCP or UDP, and that
    this process has not handed out before (see above for where they come from)."""
    global _next_port
    for _ in range(len(_SLICE)):
        base = _next_port
        if base + count > _SLICE.stop:
            base = _SLICE.start
        _next_port = base + count
        if all(_bindable(host, port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} free consecutive ports in {_SLICE.start}-{_SLICE.stop - 1}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, TCP or UDP, that no other test of this run is handed."""
    return free_port_range(1, host)


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unix_socket_accepts(path: str | os.PathLike[str]) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(os.fspath(path))
            return True
        except OSError:
            return False


def wait_until(
    predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition"
) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value or fails saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, process: ManagedProcess | None = None
) -> None:
    """Block until ``host:port`` accepts a connection.

    When the process meant to listen is given, its early death is reported at once with its
    logs, instead of after the whole timeout with no clue why.
    """
    _wait(lambda: port_accepts(host, port), f"{host}:{port}", timeout, process)


def wait_for_unix_socket(
    path: str | os.PathLike[str], timeout: float = 10.0, process: ManagedProcess | None = None
) -> None:
    _wait(lambda: unix_socket_accepts(path), f"unix:{os.fspath(path)}", timeout, process)


def _wait(ready, what: str, timeout: float, process: ManagedProcess | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if process is not None and not process.running:
            raise RuntimeError(
                f"{process.name} exited with status {process.returncode} before {what} "
                f"accepted connections\n{process.describe_logs()}"
            )
        if time.monotonic() > deadline:
            logs = process.describe_logs() if process is not None else ""
            raise TimeoutError(f"{what} did not accept connections within {timeout}s\n{logs}")
        time.sleep(0.05)


class ManagedProcess:
    """A ``Popen`` that logs to files, lives in its own process group, and always gets reaped."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: str | os.PathLike[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.stdout.log"
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    def start(self) -> ManagedProcess:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        # Append, so a restarted process (reload) keeps the earlier output for the post-mortem.
        out = open(self.stdout_path, "ab")
        err = open(self.stderr_path, "ab")
        self._files = [out, err]
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send_signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the whole group, then SIGKILL it; returns the main process's exit status."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(timeout)
            # Children that outlived the leader (workers) die with the group either way.
            self._signal_group(signal.SIGKILL)
        finally:
            for f in self._files:
                f.close()
            self._files = []
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stdout_text(self) -> str:
        return _read(self.stdout_path)

    def stderr_text(self) -> str:
        return _read(self.stderr_path)

    def describe_logs(self, tail: int = 60) -> str:
        """The last lines of both logs, for assertion and exception messages."""
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            lines = _read(path).splitlines()[-tail:]
            body = "\n".join(lines) if lines else "(empty)"
            parts.append(f"--- {self.name} {label} ({path}) ---\n{body}")
        return "\n".join(parts)

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<ManagedProcess {self.name} pid={self.proc.pid if self.proc else None} {state}>"


REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_APP = "tests.apps.echo:agent"


@dataclass
class AgentProcess:
    """``python -m spoe_agent`` as deployed; ``server_address`` is what HAProxy's config needs."""

    process: ManagedProcess
    bind: str
    host: str | None
    port: int | None
    socket_path: Path | None

    @classmethod
    def launch(
        cls,
        log_dir: str | os.PathLike[str],
        *extra: str,
        app: str | None = DEFAULT_APP,
        unix: bool = False,
        name: str = "agent",
        env: Mapping[str, str] | None = None,
        workers: str | None = "1",
    ) -> AgentProcess:
        """Start the agent CLI on a free port (or a fresh unix socket); call :meth:`wait_ready`.

        ``app=None`` serves the CLI's default (tracing) agent. One process unless ``workers``
        (or a ``--workers`` in ``extra``) says otherwise; ``workers=None``: the CLI's default,
        one worker per usable core.
        """
        socket_path: Path | None = None
        host: str | None = None
        port: int | None = None
        if unix:
            # sun_path is ~107 bytes; pytest's tmp_path can be longer, so use the temp root.
            socket_path = Path(os.environ.get("TMPDIR", "/tmp")) / (
                f"spoe-agent-{os.getpid()}-{time.monotonic_ns()}.sock"
            )
            bind = f"unix:{socket_path}"
        else:
            host, port = "127.0.0.1", free_port()
            bind = f"{host}:{port}"
        argv = [sys.executable, "-m", "spoe_agent", "--bind", bind]
        if workers is not None:
            argv += ["--workers", workers]
        if app is not None:
            argv += ["--app", app]
        argv += list(extra)
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
        )
        child_env["PYTHONUNBUFFERED"] = "1"
        proc = ManagedProcess(name, argv, log_dir, cwd=REPO_ROOT, env=child_env)
        agent = cls(proc, bind, host, port, socket_path)
        proc.start()
        return agent

    def wait_ready(self, timeout: float = 20.0) -> None:
        if self.socket_path is not None:
            wait_for_unix_socket(self.socket_path, timeout, self.process)
        else:
            assert self.host is not None and self.port is not None
            wait_for_port(self.host, self.port, timeout, self.process)

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def server_address(self) -> str:
        """The address for an HAProxy ``server`` line: ``127.0.0.1:PORT`` or ``unix@/path``."""
        if self.socket_path is not None:
            return f"unix@{self.socket_path}"
        return f"{self.host}:{self.port}"

    def logs(self) -> str:
        """Everything the agent printed (its log goes to stderr)."""
        return self.process.stdout_text() + self.process.stderr_text()

    def describe_logs(self) -> str:
        return self.process.describe_logs()

    def stop(self) -> int | None:
        try:
            return self.process.stop()
        finally:
            if self.socket_path is not None:
                self.socket_path.unlink(missing_ok=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
