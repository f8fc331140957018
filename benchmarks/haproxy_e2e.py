"""End to end through HAProxy: what tracing costs an HTTP request, and what ``--workers`` buys.

One run measures, with ``wrk`` against HAProxy 2.6 (``nbthread 1``, or ``--haproxy-threads``) in
front of a trivial origin (a second HAProxy answering ``http-request return``):

* ``none``: no SPOE filter, the baseline;
* ``traced xN``: the reference tracing config (devenv/conf/spoe.cfg, 10 messages on 8 events per
  request) with spoe-agent ``--workers N``, for each N asked (default 1 and 2);
* ``minimal``: one message on one event answered with one set-var (benchmarks/apps.py), by
  spoe-agent and by spoe-forge 0.0.8 (if /tmp/venv-forge has it), for scale;
* ``reference events, bare ACKs`` (``--ceiling``): the reference tracing config answered by
  benchmarks/bare_agent.py, which ACKs every NOTIFY off its header and does nothing else: the
  most traced throughput HAProxy itself allows with that config, whatever the agent.
* ``reference events, bare ACKs in C`` and ``..., in C, polling`` (``--floor``): the same
  responder in C (benchmarks/bare_agent.c, built with ``cc``), sleeping in epoll_wait or
  polling: the latency the 8 round trips themselves add on this machine, with no interpreter
  in the way, under any agent that serves the reference config;
* ``..., in C, polling, US µs later`` (``--floor-delay US ...``): the polling responder
  spinning US µs after each read before its ACKs, what an agent's work before them costs.

Each configuration gets a saturation run (``--connections`` keep-alive connections: req/s and
CPU) and a latency run (``--latency-connections``, far below saturation: p50/p99, compared with
``none`` at the same concurrency). CPU is read from /proc for HAProxy and for the agent (the
supervisor and its workers), as cores used and microseconds per request.

Placement (``--layout``): ``split`` pins HAProxy, the origin and wrk to the first core and the
agent to the others, so "the agent is given as many cores as HAProxy" on a 2-core box; ``shared``
leaves everything unpinned (the only way N=2 workers can use both cores there).

    python -m benchmarks.haproxy_e2e --duration 10 [--workers 1 2] [--markdown FILE]

Spans go to a UDP socket nobody reads (the exporter's full cost, no collector's); every traced
run checks that the agent exported 9 spans per request it answered, so a fast run that lost
spans cannot pass for a result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_SPOE_CFG = REPO_ROOT / "devenv" / "conf" / "spoe.cfg"
DEFAULT_HAPROXY = "/usr/sbin/haproxy"
DEFAULT_FORGE_PYTHON = "/tmp/venv-forge/bin/python"
SPANS_PER_REQUEST = 9
_CLK_TCK = os.sysconf("SC_CLK_TCK")

MINIMAL_SPOE_NAME = "minimal.spoe.cfg"
MINIMAL_SPOE_CFG = """\
[bench]
spoe-agent bench-agent
    messages bench
    option var-prefix bench
    timeout hello 2s
    timeout idle 2m
    timeout processing 500ms
    use-backend spoe-agents

spoe-message bench
    args uid=unique-id src=src path=path
    event on-frontend-http-request
"""


# ---------------------------------------------------------------------------------- configs


def edge_config(port: int, origin_port: int, agent_addr: str | None, spoe_cfg: str | None,
                threads: int = 1) -> str:
    """The HAProxy under test; with ``spoe_cfg`` None it has no filter at all."""
    spoe = ""
    forward = ""
    if spoe_cfg is not None:
        engine = "bench" if spoe_cfg.endswith(MINIMAL_SPOE_NAME) else "trace"
        spoe = f"    filter spoe engine {engine} config {spoe_cfg}\n"
        forward = "".join(
            f"    http-request set-header {h} %[var(txn.trace.{h})] if "
            f"{{ var(txn.trace.{h}) -m found }}\n"
            for h in ("traceparent", "tracestate", "baggage")
        )
    agents = ""
    if agent_addr is not None:
        agents = f"""
backend spoe-agents
    mode tcp
    timeout connect 5s
    timeout server 3m
    server agent1 {agent_addr}
"""
    return f"""\
global
    nbthread {threads}
    maxconn 4000
    setenv OTEL_SERVICE_NAME haproxy-bench

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend fe
    bind 127.0.0.1:{port}
    unique-id-format %[uuid()]
{spoe}    default_backend be

backend be
{forward}    server origin 127.0.0.1:{origin_port}
{agents}"""


def origin_config(port: int) -> str:
    return f"""\
global
    nbthread 1
    maxconn 4000

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend origin
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string "ok"
"""


# -------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening after {timeout}s")


def interpreter(path: str) -> str:
    """An ``--*python`` argument: a path is made absolute, since the agent it runs starts in
    another directory (a bare name is looked up on PATH as usual)."""
    return os.path.abspath(path) if os.sep in path else path


def installed_build(python: str) -> str:
    """What ``python``'s own spoe-agent is ("pure Python", "hot path compiled with mypyc"), or
    "" if it has none: asked from a temporary directory, so that this tree cannot answer."""
    return subprocess.run(
        [python, "-c", "import spoe_agent; print(spoe_agent.build_description())"],
        cwd=tempfile.gettempdir(), capture_output=True, text=True, check=False,
    ).stdout.strip()


def interpreter_label(python: str) -> str:
    """How a row names another interpreter: its version and the binary a virtualenv's runs
    (``/usr/bin/python3.11``, Debian's, built with PGO and LTO; or a pyenv build, without)."""
    version, binary = subprocess.run(
        [python, "-c", "import os, platform, sys; "
                       "print(platform.python_version(), os.path.realpath(sys.executable))"],
        cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True,
    ).stdout.split()
    return f"python {version} {binary}"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SPOE_AGENT_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def agent_env(python: str | None = None,
              sink: tuple[str, int] | None = None) -> dict[str, str]:
    """A benchmarked agent's environment: this tree's source, unless ``python`` runs its own
    installed spoe_agent (neither PYTHONPATH may put this tree in front of it); exporting
    Jaeger thrift to ``sink`` (a UDP socket nobody reads), if given."""
    env = clean_env()
    if python is not None:
        del env["PYTHONPATH"]
    if sink is not None:
        env.update(OTEL_TRACES_EXPORTER="jaeger", OTEL_EXPORTER_JAEGER_AGENT_HOST=sink[0],
                   OTEL_EXPORTER_JAEGER_AGENT_PORT=str(sink[1]))
    return env


def start(argv: list[str], cores: set[int] | None, log: Path,
          env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.Popen[bytes]:
    def pin() -> None:
        if cores:
            os.sched_setaffinity(0, cores)

    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env or clean_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=pin, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the supervisor's workers), from /proc."""
    out = [pid]
    i = 0
    while i < len(out):
        try:
            with open(f"/proc/{out[i]}/task/{out[i]}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
        i += 1
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# -------------------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(text: str) -> WrkResult:
    def grab(pattern: str, default: str = "0") -> str:
        match = re.search(pattern, text, re.M)
        return match.group(1) if match else default

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    return WrkResult(
        requests=int(grab(r"^\s*(\d+) requests in")),
        rps=float(grab(r"^Requests/sec:\s*([\d.]+)")),
        p50_ms=_ms(grab(r"^\s*50%\s+(\S+)", "0us")),
        p99_ms=_ms(grab(r"^\s*99%\s+(\S+)", "0us")),
        errors=errors,
        non_2xx=int(grab(r"Non-2xx or 3xx responses:\s*(\d+)")),
    )


def run_wrk(port: int, connections: int, duration: float, cores: set[int] | None,
            log: Path) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
            f"http://127.0.0.1:{port}/bench"]
    proc = start(argv, cores, log)
    proc.wait(duration + 60)
    text = log.read_text(errors="replace").split("Running ")[-1]
    return parse_wrk(text)


# -------------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    agent: str | None  # "spoe-agent", "spoe-forge", "bare", "bare-c" or None
    spoe: str | None  # "trace", "minimal" or None
    workers: int = 1
    exporter: str = "jaeger"  # "none": the tracing work without the export, to split costs
    agent_args: tuple[str, ...] = ()  # extra spoe-agent flags (--busy-poll)
    python: str | None = None  # another interpreter's spoe-agent (--compiled-python)


@dataclass
class Measurement:
    name: str
    layout: str
    saturation: WrkResult
    latency: WrkResult
    haproxy_cpu: float  # cores, during the saturation run
    agent_cpu: float
    origin_cpu: float
    haproxy_us_per_req: float
    agent_us_per_req: float
    agent_rss_mib: float
    wrk_cpu: float = 0.0
    other_cpu: float = 0.0  # the rest of the machine (other processes): noise
    round: int = 1
    spans_per_request: float | None = None
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # spans land here, unread
        self.sink.bind(("127.0.0.1", 0))
        cores = sorted(os.sched_getaffinity(0))
        self.cores = cores
        if len(cores) >= 2:
            self.front_cores: set[int] | None = {cores[0]}
            self.agent_cores: set[int] | None = set(cores[1:])
        else:
            self.front_cores = self.agent_cores = None
        self._n = 0

    def _log(self, name: str) -> Path:
        self._n += 1
        return self.workdir / f"{self._n:04d}-{name.replace(os.sep, '_')}.log"

    def bare_c(self) -> Path:
        """benchmarks/bare_agent.c, built once per run."""
        binary = self.workdir / "bare_agent"
        if not binary.exists():
            subprocess.run(["cc", "-O2", "-o", str(binary),
                            str(REPO_ROOT / "benchmarks" / "bare_agent.c")], check=True)
        return binary

    def measure(self, sc: Scenario, layout: str) -> Measurement:
        args = self.args
        split = layout == "split" and self.front_cores is not None
        front = self.front_cores if split else None
        agent_cores = self.agent_cores if split else None
        origin_port, edge_port, agent_port = free_port(), free_port(), free_port()
        procs: list[subprocess.Popen[bytes]] = []
        agent: subprocess.Popen[bytes] | None = None
        agent_log = self._log(f"{sc.name}-agent")
        try:
            ocfg = self.workdir / f"origin-{self._n}.cfg"
            ocfg.write_text(origin_config(origin_port))
            origin = start([args.haproxy, "-db", "-f", str(ocfg)], front, self._log("origin"))
            procs.append(origin)
            wait_port(origin_port, origin)
            if sc.agent == "spoe-agent":
                argv = [sc.python or sys.executable, "-m", "spoe_agent",
                        "--bind", f"127.0.0.1:{agent_port}",
                        "--workers", str(sc.workers), "--log-level", "info", *sc.agent_args]
                # Its own installed spoe_agent (--python): nor may the working directory put
                # this tree's source in front of it.
                cwd = REPO_ROOT if sc.python is None else self.workdir
                sink = None
                if sc.spoe == "minimal":
                    argv += ["--app", "benchmarks.apps:minimal_agent", "--exporter", "none"]
                elif sc.exporter == "none":
                    argv += ["--exporter", "none"]
                else:
                    sink = self.sink.getsockname()
                agent = start(argv, agent_cores, agent_log, agent_env(sc.python, sink), cwd)
            elif sc.agent == "bare":
                agent = start([sys.executable, "-m", "benchmarks.bare_agent", "--port",
                               str(agent_port)], agent_cores, agent_log)
            elif sc.agent == "bare-c":
                agent = start([str(self.bare_c()), "--port", str(agent_port), *sc.agent_args],
                              agent_cores, agent_log)
            elif sc.agent == "spoe-forge":
                agent = start([args.forge_python, str(REPO_ROOT / "benchmarks" / "apps.py"),
                               "forge", "--port", str(agent_port)], agent_cores, agent_log)
            if agent is not None:
                wait_port(agent_port, agent)
                time.sleep(1.0 if sc.workers > 1 else 0.2)  # every worker up and synced
            spoe_cfg = None
            if sc.spoe == "trace":
                spoe_cfg = str(REFERENCE_SPOE_CFG)
            elif sc.spoe == "minimal":
                path = self.workdir / MINIMAL_SPOE_NAME
                path.write_text(MINIMAL_SPOE_CFG)
                spoe_cfg = str(path)
            ecfg = self.workdir / f"edge-{self._n}.cfg"
            ecfg.write_text(edge_config(edge_port, origin_port,
                                        f"127.0.0.1:{agent_port}" if agent else None, spoe_cfg,
                                        args.haproxy_threads))
            edge = start([args.haproxy, "-db", "-f", str(ecfg)], front, self._log("haproxy"))
            procs.append(edge)
            wait_port(edge_port, edge)
            # Warm-up: connections open, imports and caches hot, the JIT-less interpreter steady.
            warm = run_wrk(edge_port, args.connections, args.warmup, front, self._log("warmup"))
            agent_pids = process_tree(agent.pid) if agent else []
            watched = {"haproxy": [edge.pid], "agent": agent_pids, "origin": [origin.pid]}
            before = {k: cpu_seconds(v) for k, v in watched.items()}
            busy0, children0 = system_busy_seconds(), _children_cpu()
            t0 = time.monotonic()
            sat = run_wrk(edge_port, args.connections, args.duration, front,
                          self._log(f"{sc.name}-wrk"))
            elapsed = time.monotonic() - t0
            used = {k: cpu_seconds(v) - before[k] for k, v in watched.items()}
            used["wrk"] = _children_cpu() - children0
            busy = system_busy_seconds() - busy0
            rss = rss_kib(agent_pids) / 1024
            lat = run_wrk(edge_port, args.latency_connections, args.latency_duration, front,
                          self._log(f"{sc.name}-latency"))
        finally:
            for proc in reversed(procs):
                stop(proc)
            if agent is not None:
                stop(agent)
        per_req = max(1, sat.requests)
        m = Measurement(
            name=sc.name, layout=layout, saturation=sat, latency=lat,
            haproxy_cpu=used["haproxy"] / elapsed, agent_cpu=used["agent"] / elapsed,
            origin_cpu=used["origin"] / elapsed, wrk_cpu=used["wrk"] / elapsed,
            other_cpu=max(0.0, busy - sum(used.values())) / elapsed,
            haproxy_us_per_req=1e6 * used["haproxy"] / per_req,
            agent_us_per_req=1e6 * used["agent"] / per_req, agent_rss_mib=rss,
        )
        if sat.errors or sat.non_2xx or lat.errors or lat.non_2xx:
            m.notes.append(f"errors {sat.errors + lat.errors}, non-2xx {sat.non_2xx + lat.non_2xx}")
        if sc.spoe == "trace" and sc.agent == "spoe-agent" and sc.exporter != "none":
            exported = sum(int(n) for n in re.findall(r"tracing: (\d+) spans exported in all",
                                                      agent_log.read_text(errors="replace")))
            total = sat.requests + lat.requests + warm.requests
            m.spans_per_request = exported / max(1, total)
        return m


def system_busy_seconds() -> float:
    """CPU seconds every process on the machine used (user + system)."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    return sum(int(x) for x in fields[1:4]) / _CLK_TCK


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_quiet(limit: float, timeout: float) -> float:
    """Wait until the rest of the machine uses under ``limit`` cores (other people's test runs
    halve a 2-core box's numbers); returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        before = system_busy_seconds()
        time.sleep(1.0)
        busy = system_busy_seconds() - before
        if busy < limit or time.monotonic() > deadline:
            return busy


# ---------------------------------------------------------------------------------- output


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(results: list[Measurement]) -> list[Measurement]:
    """One row per (config, layout): the median of each number over the rounds."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        groups.setdefault((m.name, m.layout), []).append(m)
    rows = []
    for (name, layout), ms in groups.items():
        def med(get: Any, ms: list[Measurement] = ms) -> float:
            return _median([get(m) for m in ms])

        sat = WrkResult(int(med(lambda m: m.saturation.requests)),
                        med(lambda m: m.saturation.rps), med(lambda m: m.saturation.p50_ms),
                        med(lambda m: m.saturation.p99_ms),
                        sum(m.saturation.errors for m in ms),
                        sum(m.saturation.non_2xx for m in ms))
        lat = WrkResult(int(med(lambda m: m.latency.requests)), med(lambda m: m.latency.rps),
                        med(lambda m: m.latency.p50_ms), med(lambda m: m.latency.p99_ms),
                        sum(m.latency.errors for m in ms), sum(m.latency.non_2xx for m in ms))
        spans = [m.spans_per_request for m in ms if m.spans_per_request is not None]
        rows.append(Measurement(
            name=name, layout=layout, saturation=sat, latency=lat,
            haproxy_cpu=med(lambda m: m.haproxy_cpu), agent_cpu=med(lambda m: m.agent_cpu),
            origin_cpu=med(lambda m: m.origin_cpu),
            haproxy_us_per_req=med(lambda m: m.haproxy_us_per_req),
            agent_us_per_req=med(lambda m: m.agent_us_per_req),
            agent_rss_mib=med(lambda m: m.agent_rss_mib), wrk_cpu=med(lambda m: m.wrk_cpu),
            other_cpu=med(lambda m: m.other_cpu), round=len(ms),
            spans_per_request=min(spans) if spans else None,
            notes=sorted({n for m in ms for n in m.notes}),
        ))
    return rows


def markdown(results: list[Measurement], args: argparse.Namespace, env: dict[str, str]) -> str:
    rows = summarize(results)
    base = {m.layout: m for m in rows if m.name == "none"}
    lines = [
        f"wrk: {args.connections} connections for {args.duration:g} s (saturation), "
        f"{args.latency_connections} for {args.latency_duration:g} s (latency: added = this "
        f"config's percentile minus none's); HAProxy nbthread {args.haproxy_threads}; "
        f"medians of {args.rounds} round(s). "
        f"{env['machine']}",
        "",
        "| config | layout | req/s | % of none | added p50 ms | added p99 ms "
        "| HAProxy CPU | agent CPU | agent us/req | HAProxy us/req | wrk+origin CPU "
        "| other CPU | agent RSS MiB | spans/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        b = base.get(m.layout)
        pct = f"{100 * m.saturation.rps / b.saturation.rps:.1f}%" if b else "n/a"
        d50 = f"{m.latency.p50_ms - b.latency.p50_ms:.3f}" if b else "n/a"
        d99 = f"{m.latency.p99_ms - b.latency.p99_ms:.3f}" if b else "n/a"
        spans = f"{m.spans_per_request:.2f}" if m.spans_per_request is not None else ""
        lines.append(
            f"| {m.name} | {m.layout} | {m.saturation.rps:,.0f} | {pct} | {d50} | {d99} "
            f"| {m.haproxy_cpu:.2f} | {m.agent_cpu:.2f} | {m.agent_us_per_req:.0f} "
            f"| {m.haproxy_us_per_req:.0f} | {m.wrk_cpu + m.origin_cpu:.2f} "
            f"| {m.other_cpu:.2f} | {m.agent_rss_mib:.0f} | {spans} |"
        )
    notes = sorted({n for m in rows for n in m.notes})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, str]:
    hap = subprocess.run([args.haproxy, "-v"], capture_output=True, text=True).stdout
    version = re.search(r"version (\S+)", hap)
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    wrk_version = re.search(r"wrk (\S+)", wrk.stdout + wrk.stderr)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return {
        "machine": f"{len(os.sched_getaffinity(0))} cores ({model}), Python "
                   f"{platform.python_version()}, HAProxy {version.group(1) if version else '?'},"
                   f" wrk {wrk_version.group(1) if wrk_version else '?'}",
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--haproxy", default=DEFAULT_HAPROXY)
    p.add_argument("--forge-python", default=DEFAULT_FORGE_PYTHON)
    p.add_argument("--compiled-python", metavar="PYTHON", type=interpreter,
                   help="also run 'traced xN, mypyc': the spoe-agent installed for this "
                        "interpreter, built with SPOE_AGENT_MYPYC=1 (setup.py)")
    p.add_argument("--other-python", nargs="+", metavar="PYTHON", type=interpreter, default=[],
                   help="also run 'traced xN, python X.Y.Z BINARY' (and its busy-poll configs): "
                        "the pure-Python spoe-agent installed for each interpreter, such as "
                        "Debian's python3 (built with PGO and LTO) in a virtualenv")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--latency-connections", type=int, default=1)
    p.add_argument("--latency-duration", type=float, default=5.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--haproxy-threads", type=int, default=1, metavar="N",
                   help="nbthread of the HAProxy under test (default 1)")
    p.add_argument("--layout", choices=("split", "shared", "both"), default="both")
    p.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--json", type=Path, help="raw results")
    p.add_argument("--keep", action="store_true", help="keep the logs directory")
    p.add_argument("--rounds", type=int, default=1, help="alternate all configs this often")
    p.add_argument("--diagnose", action="store_true",
                   help="also the traced configs with --exporter none (export's share)")
    p.add_argument("--busy-poll", nargs="*", metavar="WINDOW",
                   help="also the traced configs with spoe-agent --busy-poll (the latency a "
                        "sleeping event loop costs): forever without a WINDOW, else one config "
                        "per WINDOW (forever, or a duration such as 1ms); with "
                        "--compiled-python, the compiled agent too")
    p.add_argument("--ceiling", action="store_true",
                   help="also the reference config answered by benchmarks/bare_agent.py, which "
                        "only ACKs: what HAProxy itself allows with that config")
    p.add_argument("--floor", action="store_true",
                   help="also the reference config answered by benchmarks/bare_agent.c (built "
                        "with cc), sleeping and polling: what the round trips alone add here")
    p.add_argument("--floor-delay", type=float, nargs="+", default=[], metavar="US",
                   help="also the polling C responder that spins US microseconds after each "
                        "read before its ACKs, once per US: what each microsecond of an "
                        "agent's work before its ACKs costs the request (builds with cc)")
    p.add_argument("--wait-quiet", type=float, default=0.15, metavar="CORES",
                   help="before each run, wait until other processes use under this (0: off)")
    p.add_argument("--quiet-timeout", type=float, default=300.0)
    return p


def _polled(name: str, window: str) -> str:
    return f"{name}, busy-poll" if window == "forever" else f"{name}, busy-poll {window}"


def _poll_args(window: str) -> tuple[str, ...]:
    return ("--busy-poll",) if window == "forever" else ("--busy-poll", window)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    scenarios = [Scenario("none", None, None)]
    scenarios += [Scenario(f"traced x{n}", "spoe-agent", "trace", n) for n in args.workers]
    if args.diagnose:
        scenarios += [Scenario(f"traced x{n}, no export", "spoe-agent", "trace", n, "none")
                      for n in args.workers]
    polls = [] if args.busy_poll is None else args.busy_poll or ["forever"]
    for window in polls:
        scenarios += [Scenario(_polled(f"traced x{n}", window), "spoe-agent", "trace", n,
                               agent_args=_poll_args(window)) for n in args.workers]
    if args.compiled_python:
        build = installed_build(args.compiled_python)
        if build != "hot path compiled with mypyc":
            print(f"{args.compiled_python}'s spoe-agent is {build or 'not installed'}, not the "
                  "compiled build: SPOE_AGENT_MYPYC=1 pip install . there", file=sys.stderr)
            return 2
        scenarios += [Scenario(f"traced x{n}, mypyc", "spoe-agent", "trace", n,
                               python=args.compiled_python) for n in args.workers]
        for window in polls:
            scenarios += [Scenario(_polled(f"traced x{n}, mypyc", window), "spoe-agent",
                                   "trace", n, agent_args=_poll_args(window),
                                   python=args.compiled_python) for n in args.workers]
    for python in args.other_python:
        build = installed_build(python)
        if build != "pure Python":
            print(f"{python}'s spoe-agent is {build or 'not installed'}, not the pure-Python "
                  "build: pip install . there", file=sys.stderr)
            return 2
        label = interpreter_label(python)
        scenarios += [Scenario(f"traced x{n}, {label}", "spoe-agent", "trace", n, python=python)
                      for n in args.workers]
        for window in polls:
            scenarios += [Scenario(_polled(f"traced x{n}, {label}", window), "spoe-agent",
                                   "trace", n, agent_args=_poll_args(window), python=python)
                          for n in args.workers]
    if args.ceiling:
        scenarios.append(Scenario("reference events, bare ACKs", "bare", "trace"))
    if (args.floor or args.floor_delay) and shutil.which("cc") is None:
        print("--floor and --floor-delay need a C compiler (cc): apt-get install gcc",
              file=sys.stderr)
        return 2
    if args.floor:
        scenarios += [Scenario("reference events, bare ACKs in C", "bare-c", "trace"),
                      Scenario("reference events, bare ACKs in C, polling", "bare-c", "trace",
                               agent_args=("--poll",))]
    scenarios += [Scenario(f"reference events, bare ACKs in C, polling, {us:g} µs later",
                           "bare-c", "trace", agent_args=("--poll", "--delay", f"{us:g}"))
                  for us in args.floor_delay]
    scenarios.append(Scenario("minimal spoe-agent", "spoe-agent", "minimal"))
    if os.path.exists(args.forge_python):
        scenarios.append(Scenario("minimal spoe-forge", "spoe-forge", "minimal"))
    else:
        print(f"no {args.forge_python}: the spoe-forge row is skipped", file=sys.stderr)
    if args.only:
        scenarios = [s for s in scenarios if s.name in args.only or s.name == "none"]
    layouts = ["split", "shared"] if args.layout == "both" else [args.layout]
    workdir = Path(tempfile.mkdtemp(prefix="haproxy-e2e-"))
    bench = Bench(args, workdir)
    env = environment(args)
    results: list[Measurement] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for layout in layouts:
                for sc in scenarios:
                    if layout == "split" and sc.workers > len(bench.agent_cores or ()):
                        continue  # not enough cores to give each worker its own
                    if args.wait_quiet:
                        wait_quiet(args.wait_quiet, args.quiet_timeout)
                    m = bench.measure(sc, layout)
                    m.round = rnd
                    if m.other_cpu > args.wait_quiet and args.wait_quiet:
                        m.notes.append(f"noisy round {rnd}: other processes used "
                                       f"{m.other_cpu:.2f} cores")
                    results.append(m)
                    print(f"[{rnd}] {m.name:20s} {layout:6s} {m.saturation.rps:9,.0f} req/s  "
                          f"p50 {m.latency.p50_ms:.3f} p99 {m.latency.p99_ms:.3f} ms  "
                          f"haproxy {m.haproxy_cpu:.2f} agent {m.agent_cpu:.2f} "
                          f"other {m.other_cpu:.2f} cores {m.notes or ''}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs in {workdir}")
    table = markdown(results, args, env)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
