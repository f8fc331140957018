"""The demo stack without Docker: ``./dev demo`` (or ``python -m devenv.local``).

It runs the same topology as ``devenv/docker-compose.yml``, from the same configuration files,
as child processes of this one::

    curl -> HAProxy 1 :7001 traced / :8001 untraced (stats :7004)
         -> HAProxy 2 :7002 traced / :8002 untraced
         -> fake server :8080
    both HAProxies -> spoe-agent :7000 -> Jaeger thrift over UDP 6831 <- fake server

and, when no Jaeger runs on this machine, the embedded trace viewer on UDP 6831, which prints
every finished trace as a tree in this terminal. It sends a few demo requests, shows their
traces, says where to look next, and runs until Ctrl-C or SIGTERM.

Every child runs in its own process group, so stopping one stops whatever it started, and the
terminal's Ctrl-C reaches only this process, which then stops them in order (HAProxies first,
so nothing new comes in; the viewer last, so it still receives the final flush) and checks that
no process is left. Their logs are in ``<workdir>/logs/``.
"""

from __future__ import annotations

import argparse
import csv
import errno
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "devenv" / "conf"
DEFAULT_WORKDIR = REPO_ROOT / ".cache" / "demo"
LOCALHOST = "127.0.0.1"

EXIT_FAILURE = 1
EXIT_ENVIRONMENT = 2  # a port taken, HAProxy missing, a configuration refused


@dataclass(frozen=True)
class Port:
    """A port of the stack and what must be behind it, for readiness and conflict messages."""

    number: int
    owner: str
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"{self.number}/{self.proto}" if self.proto != "tcp" else str(self.number)


AGENT = Port(7000, "the spoe-agent (SPOP; both HAProxies connect to it)")
HAPROXY1_TRACED = Port(7001, "HAProxy 1's traced frontend")
HAPROXY1_UNTRACED = Port(8001, "HAProxy 1's untraced frontend")
HAPROXY1_STATS = Port(7004, "HAProxy 1's stats page")
HAPROXY2_TRACED = Port(7002, "HAProxy 2's traced frontend")
HAPROXY2_UNTRACED = Port(8002, "HAProxy 2's untraced frontend")
FAKE_SERVER = Port(8080, "the fake server (HAProxy 2's backend)")
VIEWER_UDP = Port(6831, "the trace viewer (Jaeger thrift over UDP, where spans are sent)", "udp")
JAEGER_UI = 16686
JAEGER_COLLECTOR = 14268

#: The environment the HAProxy configurations read (see the header of conf/haproxy-1.conf).
HAPROXY_ENV = {
    "BIND_ADDR": LOCALHOST,
    "SPOE_AGENT_ADDR": f"{LOCALHOST}:{AGENT.number}",
    "NEXT_HOP_HOST": LOCALHOST,
    "APP_ADDR": f"{LOCALHOST}:{FAKE_SERVER.number}",
    "SPOE_CFG": str(CONF_DIR / "spoe.cfg"),
}


@dataclass(frozen=True)
class DemoRequest:
    port: int
    path: str
    what: str
    #: True when HAProxy 2 never finishes the session, so its spans only leave the agent when
    #: session_ttl expires.
    incomplete: bool = False

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}{self.path}"


DEMO_REQUESTS: tuple[DemoRequest, ...] = (
    DemoRequest(7001, "/", "traced through both HAProxies to the fake server"),
    DemoRequest(7001, "/slow?ms=50", "the same, with a 50 ms server"),
    DemoRequest(7001, "/status/503", "the server answers 503: error spans"),
    DemoRequest(7001, "/denied", "HAProxy 2 refuses it (403): its hop ends after the frontend, "
                "at once (spoe.cfg's 'answered' group)"),
    DemoRequest(7001, "/noserver", "HAProxy 2's backend has no server (503)", incomplete=True),
    DemoRequest(8001, "/", "untraced path: only the fake server's spans"),
)


@dataclass
class DemoResult:
    request: DemoRequest
    status: int
    trace_id: str | None  # what HAProxy 1 (X-Trace-Id) or else the fake server reported
    server_trace_id: str | None
    sent_at: float
    error: str | None = None


class StackError(RuntimeError):
    """A failure to report in one sentence (plus logs), with the exit status to use."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the stack was starting or running the demo."""


def say(message: str) -> None:
    """Status lines go to stderr: stdout is the viewer's, trace trees only."""
    prefix = "\033[1m[demo]\033[0m " if sys.stderr.isatty() else "[demo] "
    print(prefix + message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- ports


def tcp_port_free(port: int, host: str = LOCALHOST) -> bool:
    """Whether a listener could bind there now.

    SO_REUSEADDR as the real servers use it, so a previous run's TIME_WAIT connections do not
    count as "taken" while any listening socket (also a 0.0.0.0 one) still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def udp_port_free(port: int, host: str = LOCALHOST) -> bool:
    """UDP cannot be probed by connecting; whether it can be bound is the only question."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def port_free(port: Port) -> bool:
    return udp_port_free(port.number) if port.proto == "udp" else tcp_port_free(port.number)


def tcp_accepts(port: int, host: str = LOCALHOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def jaeger_running() -> bool:
    """A Jaeger on this machine: its UI or collector answers (its UDP port cannot be probed)."""
    return tcp_accepts(JAEGER_UI) or tcp_accepts(JAEGER_COLLECTOR)


def find_haproxy() -> str | None:
    for candidate in (os.environ.get("HAPROXY"), shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# ------------------------------------------------------------------------------ children


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up now: after fork, in the child, there must be no dlopen."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """If this process is killed outright (SIGKILL), its children still get SIGTERM."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Child:
    """One process of the stack, in its own process group, its output in a log file.

    ``stdout`` may be given instead (the viewer's trees are for the terminal, or for a test's
    file); stderr always goes to the log.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: Mapping[str, str],
        ports: Sequence[Port] = (),
        stop_timeout: float = 5.0,
        stdout: IO[str] | IO[bytes] | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.env = dict(env)
        self.ports = tuple(ports)
        self.stop_timeout = stop_timeout
        self.log_path = log_dir / f"{name}.log"
        self._stdout = stdout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Child:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout if self._stdout is not None else self._log,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        tail = text.splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in tail) if tail else "    (empty log)"

    def died_message(self) -> str:
        status = None if self.proc is None else self.proc.poll()
        return (f"{self.name} exited with status {status}; the end of {self.log_path}:\n"
                f"{self.log_tail()}")

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        """SIGTERM the group (HAProxy stops, the Python parts flush their spans), then SIGKILL."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    say(f"{self.name} did not stop within {self.stop_timeout:g}s: killing it")
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(5)
            # Anything the leader left in its group goes with it.
            self._signal_group(signal.SIGKILL)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def group_alive(self) -> bool:
        """Whether any process of this child's group still exists."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


# ------------------------------------------------------------------------------- the stack


@dataclass
class StackOptions:
    workdir: Path = DEFAULT_WORKDIR
    #: None: start the viewer unless a Jaeger is running here.
    viewer: bool | None = None
    #: None: look for a Jaeger on 16686/14268; True/False: assume it is there or not.
    jaeger: bool | None = None
    jsonl: Path | None = None
    #: Where the viewer prints its trees; None: this process's stdout (the terminal).
    viewer_stdout: IO[str] | IO[bytes] | None = None
    haproxy: str | None = None
    python: str = sys.executable
    ready_timeout: float = 30.0
    #: Extra command-line arguments for the agent (e.g. ``--log-level=debug``).
    agent_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)


class LocalStack:
    """The demo stack's processes; usable from tests as a context manager.

    ``stopping`` is checked by every wait, so a signal handler that sets it interrupts a start
    or a demo at the next poll (raising :class:`Interrupted`) instead of mid-``Popen``.
    """

    def __init__(self, options: StackOptions, stopping: threading.Event | None = None) -> None:
        self.options = options
        self.stopping = stopping or threading.Event()
        self.workdir = Path(options.workdir).resolve()
        self.log_dir = self.workdir / "logs"
        self.jsonl = Path(options.jsonl or self.workdir / "traces.jsonl").resolve()
        self.children: list[Child] = []
        self.jaeger = jaeger_running() if options.jaeger is None else options.jaeger
        self.viewer = (not self.jaeger) if options.viewer is None else options.viewer
        self.haproxy = options.haproxy or find_haproxy()
        self.session_ttl = _agent_session_ttl()

    # ------------------------------------------------------------------------- preparation

    def child_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment minus the caller's OTEL_* settings, which would redirect the spans."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        env.update(self.options.extra_env)
        env.update(extra or {})
        return env

    def ports(self) -> list[Port]:
        ports = [AGENT, FAKE_SERVER, HAPROXY2_TRACED, HAPROXY2_UNTRACED, HAPROXY1_TRACED,
                 HAPROXY1_UNTRACED, HAPROXY1_STATS]
        if self.viewer:
            ports.insert(0, VIEWER_UDP)
        return ports

    def check_ports(self) -> None:
        taken = [port for port in self.ports() if not port_free(port)]
        if taken:
            lines = "\n".join(f"  port {port} is in use; it should be free for {port.owner}"
                              for port in taken)
            hint = ("Another demo (or docker-compose up) may still be running: stop it first "
                    "(docker-compose -f devenv/docker-compose.yml down), or find the owner with "
                    "'ss -ltnup'.")
            if VIEWER_UDP in taken:
                hint += (" UDP 6831 taken usually means a Jaeger agent: run with --jaeger to "
                         "send the spans there instead of the viewer.")
            raise StackError(f"cannot start the demo stack:\n{lines}\n{hint}", EXIT_ENVIRONMENT)

    def check_haproxy_configs(self) -> None:
        if self.haproxy is None:
            raise StackError(
                "haproxy is not installed (looked in $HAPROXY, PATH and /usr/sbin/haproxy): "
                "run ./dev demo, which installs it with apt-get, or apt-get install haproxy",
                EXIT_ENVIRONMENT,
            )
        for n in (1, 2):
            conf = CONF_DIR / f"haproxy-{n}.conf"
            result = subprocess.run(
                [self.haproxy, "-c", "-f", str(conf)],
                env=self.child_env(HAPROXY_ENV), capture_output=True, text=True, timeout=60,
            )
            if result.returncode != 0:
                raise StackError(f"{self.haproxy} -c refused {conf}:\n"
                                 f"{(result.stdout + result.stderr).strip()}", EXIT_ENVIRONMENT)

    # ------------------------------------------------------------------------------ start

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise Interrupted()

    def _wait(self, ready: Callable[[], bool], what: str, child: Child | None) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        while not ready():
            self._check_stopping()
            if child is not None and not child.running:
                raise StackError(f"{child.name} stopped before {what}.\n{child.died_message()}")
            if time.monotonic() > deadline:
                tail = f"\n{child.died_message()}" if child is not None else ""
                raise StackError(f"{what}: not within {self.options.ready_timeout:g}s{tail}")
            self.stopping.wait(0.05)

    def _launch(self, child: Child) -> Child:
        self._check_stopping()
        self.children.append(child)  # before Popen, so a failed start is still cleaned up
        child.start()
        for port in child.ports:
            if port.proto == "udp":
                self._wait(lambda p=port: not udp_port_free(p.number),
                           f"{child.name} listening on UDP {port.number}", child)
            else:
                self._wait(lambda p=port: tcp_accepts(p.number),
                           f"{child.name} accepting on port {port.number}", child)
        say(f"{child.name} is up (pid {child.pid}"
            + (f", port {', '.join(str(p) for p in child.ports)}" if child.ports else "") + ")")
        return child

    def start(self) -> LocalStack:
        py = self.options.python
        if self.viewer and not _viewer_available(py):
            say("the trace viewer (spoe_agent.viewer) is not available in this checkout: "
                "spans go to UDP 6831 and nobody shows them; start Jaeger (see "
                "devenv/README.md) to see them")
            self.viewer = False
        self.check_haproxy_configs()
        self.check_ports()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.viewer:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl.write_text("")
            self._launch(Child(
                "viewer",
                # UDP only: the stack sends nothing over HTTP, and the viewer's default HTTP
                # port (14268) is Jaeger's collector, which a running Jaeger would hold.
                [py, "-m", "spoe_agent.viewer", "--udp", f"{LOCALHOST}:{VIEWER_UDP.number}",
                 "--no-http", "--jsonl", str(self.jsonl)],
                self.log_dir, env=self.child_env(), ports=[VIEWER_UDP], stop_timeout=10.0,
                stdout=self.options.viewer_stdout or sys.stdout,
            ))
        self._launch(Child(
            "spoe-agent",
            [py, "-m", "spoe_agent", "-c", str(CONF_DIR / "agent.ini"),
             "--bind", f"{LOCALHOST}:{AGENT.number}", *self.options.agent_args],
            self.log_dir, env=self.child_env(), ports=[AGENT], stop_timeout=15.0,
        ))
        self._launch(Child(
            "fake-server",
            [py, "-m", "devenv.fake_server", "--host", LOCALHOST,
             "--port", str(FAKE_SERVER.number)],
            self.log_dir, env=self.child_env(), ports=[FAKE_SERVER], stop_timeout=10.0,
        ))
        assert self.haproxy is not None
        for n, ports in ((2, [HAPROXY2_TRACED, HAPROXY2_UNTRACED]),
                         (1, [HAPROXY1_TRACED, HAPROXY1_UNTRACED, HAPROXY1_STATS])):
            self._launch(Child(
                f"haproxy-{n}",
                [self.haproxy, "-db", "-f", str(CONF_DIR / f"haproxy-{n}.conf")],
                self.log_dir, env=self.child_env(HAPROXY_ENV), ports=ports,
            ))
        # HAProxy 1's stats say whether its health check reached the agent: requests sent
        # before that could find the SPOE backend down and leave no trace.
        self._wait(self._agent_up_in_haproxy1, "HAProxy 1 seeing spoe-agents/agent1 UP",
                   self.children[-1])
        return self

    def _agent_up_in_haproxy1(self) -> bool:
        try:
            status, body = _get("/;csv;norefresh", HAPROXY1_STATS.number)
        except OSError:
            return False
        if status != 200:
            return False
        rows = csv.DictReader(io.StringIO(body.lstrip("# ")))
        return any(r.get("pxname") == "spoe-agents" and r.get("svname") == "agent1"
                   and r.get("status", "").startswith("UP") for r in rows)

    # ------------------------------------------------------------------------------- demo

    def send(self, request: DemoRequest) -> DemoResult:
        sent_at = time.monotonic()
        try:
            conn = http.client.HTTPConnection(LOCALHOST, request.port, timeout=15)
            try:
                conn.request("GET", request.path, headers={"User-Agent": "spoe-agent-demo"})
                response = conn.getresponse()
                response.read()
            finally:
                conn.close()
        except OSError as exc:
            return DemoResult(request, 0, None, None, sent_at, error=str(exc))
        edge = response.getheader("X-Trace-Id")
        server = response.getheader("X-Server-Trace-Id")
        return DemoResult(request, response.status, edge or server, server, sent_at)

    def demo(self, count: int) -> list[DemoResult]:
        """Send ``count`` requests, cycling through :data:`DEMO_REQUESTS`."""
        results = []
        for i in range(count):
            self._check_stopping()
            request = DEMO_REQUESTS[i % len(DEMO_REQUESTS)]
            result = self.send(request)
            results.append(result)
            outcome = (f"-> {result.status}" if result.error is None
                       else f"-> failed: {result.error}")
            trace = f"  trace {result.trace_id}" if result.trace_id else ""
            say(f"GET {request.url} {outcome}{trace}\n       ({request.what})")
        return results

    def recorded_spans(self) -> dict[str, set[tuple[str, str]]]:
        """Trace id -> the (service, span name) pairs the viewer recorded for it so far."""
        found: dict[str, set[tuple[str, str]]] = {}
        try:
            text = self.jsonl.read_text(errors="replace")
        except FileNotFoundError:
            return found
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line being written
                continue
            if not isinstance(record, dict) or not record.get("trace_id"):
                continue
            found.setdefault(record["trace_id"], set()).update(
                (span.get("service_name", ""), span.get("operation_name", ""))
                for span in record.get("spans", ()) if isinstance(span, dict)
            )
        return found

    def wait_for_traces(self, results: Iterable[DemoResult], *, incomplete: bool) -> list[str]:
        """Wait until the viewer recorded each demo trace; returns what is still missing.

        With ``incomplete``, also wait for HAProxy 2's session span of the requests it never
        finishes: the agent ends and exports it only when session_ttl expires (the spans that
        did end, like its "Frontend TCP request", arrive with the rest of the trace).
        """
        results = [r for r in results if r.trace_id]
        if not self.viewer or not results:
            return []
        late = [r for r in results if incomplete and r.request.incomplete]
        deadline = time.monotonic() + 20.0
        if late:
            deadline = max(deadline, max(r.sent_at for r in late) + self.session_ttl + 20.0)
            say(f"HAProxy 2 never finishes /noserver: the agent ends its session when "
                f"session_ttl ({self.session_ttl:g}s) expires; waiting for it")
        while True:
            self._check_stopping()
            self.check_children()
            recorded = self.recorded_spans()
            missing = [f"{r.trace_id} ({r.request.url})" for r in results
                       if r.trace_id not in recorded]
            missing += [f"HAProxy 2's session in {r.trace_id} ({r.request.url})" for r in late
                        if ("haproxy-2", "HAProxy session") not in recorded.get(r.trace_id or "",
                                                                                ())]
            if not missing or time.monotonic() > deadline:
                return missing
            self.stopping.wait(0.2)

    def where_next(self) -> str:
        lines = ["the stack is running. Next:"]
        if self.jaeger:
            lines.append(f"  Jaeger UI           http://localhost:{JAEGER_UI}/search?service=haproxy-1")
        lines += [
            f"  HAProxy 1 stats     http://localhost:{HAPROXY1_STATS.number}/",
            f"  curl -i http://localhost:{HAPROXY1_TRACED.number}/               "
            "traced, both hops (X-Trace-Id: the trace)",
            f"  curl -i 'http://localhost:{HAPROXY1_TRACED.number}/slow?ms=300'",
            f"  curl -i http://localhost:{HAPROXY1_TRACED.number}/status/500",
            f"  curl -i http://localhost:{HAPROXY1_TRACED.number}/denied         "
            "refused by the second hop, traced at once",
            f"  curl -i http://localhost:{HAPROXY1_TRACED.number}/noserver       "
            "incomplete second hop (after session_ttl)",
            f"  curl -i http://localhost:{HAPROXY1_UNTRACED.number}/               "
            "untraced: only the fake server's spans",
        ]
        if self.viewer:
            lines.append(f"  traces (JSON lines)  {self.jsonl}")
        lines += [f"  logs                {self.log_dir}/", "Ctrl-C stops everything."]
        return "\n".join(lines)

    def check_children(self) -> None:
        for child in self.children:
            if not child.running:
                raise StackError(child.died_message())

    # ------------------------------------------------------------------------------- stop

    def stop(self) -> list[str]:
        """Stop every child, newest first; returns the names of those that left a process."""
        for child in reversed(self.children):
            child.stop()
        deadline = time.monotonic() + 5.0
        while True:
            left = [c for c in self.children if c.group_alive()]
            if not left or time.monotonic() > deadline:
                return [f"{c.name} (process group {c.pid})" for c in left]
            time.sleep(0.05)

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _get(path: str, port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def _viewer_available(python: str) -> bool:
    result = subprocess.run(
        [python, "-c", "import importlib.util as u, sys; "
                       "sys.exit(u.find_spec('spoe_agent.viewer') is None)"],
        cwd=REPO_ROOT, capture_output=True, timeout=60,
    )
    return result.returncode == 0


def _agent_session_ttl() -> float:
    """The agent's session_ttl from agent.ini, to know how long unfinished sessions linger."""
    try:
        from spoe_agent.config import load_config

        return load_config(str(CONF_DIR / "agent.ini"), env={}).session_ttl
    except Exception:  # the demo can still run; the wait is only a courtesy
        return 10.0


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devenv.local",
        description="Run the two-HAProxy demo stack (spoe-agent, fake server, HAProxy 2, "
                    "HAProxy 1, trace viewer) without Docker, send demo requests, show their "
                    "traces, and run until Ctrl-C.",
    )
    parser.add_argument("--requests", type=int, default=len(DEMO_REQUESTS), metavar="N",
                        help=f"demo requests to send, cycling through the {len(DEMO_REQUESTS)} "
                             "kinds (default: each once; 0: none)")
    parser.add_argument("--exit-after-demo", action="store_true",
                        help="stop everything once the demo traces are shown (for tests)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="logs and traces go here (default: .cache/demo)")
    parser.add_argument("--jsonl", type=Path, metavar="PATH",
                        help="where the viewer records the traces (default: WORKDIR/traces.jsonl)")
    parser.add_argument("--jaeger", action=argparse.BooleanOptionalAction, default=None,
                        help="a Jaeger runs here, send the spans to it (default: detected on "
                             "ports 16686/14268)")
    parser.add_argument("--viewer", action=argparse.BooleanOptionalAction, default=None,
                        help="start the terminal trace viewer on UDP 6831 (default: when no "
                             "Jaeger runs)")
    parser.add_argument("--haproxy", metavar="PATH", help="the haproxy binary to run")
    parser.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the spoe-agent, repeatable "
                             "(e.g. --agent-arg=--log-level=debug)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 0:
        print("--requests must be 0 or more", file=sys.stderr)
        return EXIT_ENVIRONMENT
    stopping = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = LocalStack(
        StackOptions(workdir=args.workdir, viewer=args.viewer, jaeger=args.jaeger,
                     jsonl=args.jsonl, haproxy=args.haproxy, agent_args=args.agent_arg),
        stopping,
    )
    status = 0
    try:
        if stack.jaeger:
            say(f"Jaeger found on this machine (port {JAEGER_UI} or {JAEGER_COLLECTOR}): "
                "the spans go there")
        elif stack.viewer:
            say("no Jaeger on this machine: the viewer prints the traces here")
        else:
            say(f"no viewer: the spans go to UDP {VIEWER_UDP.number}, whoever listens there")
        stack.start()
        results = stack.demo(args.requests)
        failed = [r for r in results if r.error is not None]
        if failed:
            raise StackError(f"{len(failed)} demo request(s) failed: "
                             + "; ".join(f"{r.request.url}: {r.error}" for r in failed))
        missing = stack.wait_for_traces(results, incomplete=args.exit_after_demo)
        if missing:
            say("the viewer has not shown these traces yet: " + "; ".join(missing)
                + f". See {stack.log_dir}/spoe-agent.log")
            if args.exit_after_demo:
                status = EXIT_FAILURE
        if stack.jaeger:
            for result in results:
                if result.trace_id:
                    say(f"http://localhost:{JAEGER_UI}/trace/{result.trace_id}  "
                        f"{result.request.url}")
        if not args.exit_after_demo:
            say(stack.where_next())
            while not stopping.wait(0.5):
                stack.check_children()
    except Interrupted:
        pass
    except StackError as exc:
        say(f"error: {exc}")
        status = exc.status
    finally:
        if received:
            say(f"{received[0]} received: stopping")
        else:
            say("stopping")
        left = stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        say(f"error: processes left behind: {', '.join(left)}")
        return EXIT_FAILURE
    say("stopped; nothing left running")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
