"""Soak: real HAProxy traffic at ~70% of the agent's capacity, the exporter cut off twice.

Issue 5 asks for a run long enough to show what a short benchmark cannot: memory that creeps,
requests that fail once in a while, spans that get lost when the collector goes away and comes
back. One run:

1. measures capacity: unpaced ``wrk`` through HAProxy 2.6 with the reference tracing config
   (devenv/conf/spoe.cfg, 9 spans per request) for ``--capacity-duration`` seconds, against a
   fresh stack (skipped with ``--rate``);
2. starts a fresh stack again (so the saturation run does not pre-grow the agent's memory) and
   drives ``--load`` (default 0.7) of that rate for ``--duration`` seconds with ``wrk`` paced by
   its Lua ``delay()`` hook;
3. warm-up for the first 10% (at most 180 s), then cuts the exporter off at 1/3 and at 2/3 of the
   run for 10% of it (at most 180 s) each: the collector really goes away (connection refused)
   and a new one takes the same port;
4. checks RSS, failed requests and, per trace, that every span of every request completed while
   the collector was up reached it.

    python -m benchmarks.soak --duration 1800 [--rate R] [--markdown FILE] [--json FILE]

The collector is a :class:`JaegerReceiver` (HTTP, thrift binary) in this process that keeps only
a bit mask of span names per trace id, so 30 minutes of spans fit in memory. The origin is an
HAProxy answering ``http-request return`` that logs, for every request, the time and the
``traceparent`` the agent injected: the list of requests to look for. The edge HAProxy logs each
request's status, termination state and SPOE error, the list of failures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.haproxy_e2e import (
    DEFAULT_HAPROXY,
    REFERENCE_SPOE_CFG,
    SPANS_PER_REQUEST,
    clean_env,
    cpu_seconds,
    edge_config,
    environment,
    free_port,
    origin_config,
    parse_wrk,
    process_tree,
    rss_kib,
    start,
    stop,
    system_busy_seconds,
    wait_port,
)
from spoe_agent.viewer.receiver import JaegerReceiver

# The reference config's span tree (devenv/conf/spoe.cfg): a trace is complete with all of them.
REFERENCE_SPANS = (
    "HAProxy session",
    "Client session",
    "Frontend TCP request",
    "Frontend HTTP request",
    "Backend TCP request",
    "Backend HTTP request",
    "Server session",
    "TCP response",
    "HTTP response",
)
assert len(REFERENCE_SPANS) == SPANS_PER_REQUEST
_BIT = {name: 1 << i for i, name in enumerate(REFERENCE_SPANS)}
_ALL = (1 << SPANS_PER_REQUEST) - 1
_U64 = (1 << 64) - 1

# wrk has no rate option. Every connection waits delay() ms before each request; once a second
# (os.time() is all the wall clock wrk's Lua has) the delay is scaled by achieved/target rate, so
# the rate holds whatever the latency does. -t1: one Lua state sees every response. The floor
# (half the no-latency delay) keeps a stall from collapsing the delay to 0, after which wrk would
# overshoot far past capacity for seconds while the delay grows back.
PACING_LUA = """\
local target = {rate}
local d = {connections} * 1000.0 / target
local floor = d / 2
local sec = os.time()
local count = 0
local started = false

function response(status, headers, body)
  count = count + 1
end

function delay()
  local now = os.time()
  if now ~= sec then
    if started then
      local rate = count / (now - sec)
      d = d * (1 + 0.5 * (rate / target - 1))
      if d < floor then d = floor elseif d > 60000 then d = 60000 end
    end
    started = true
    sec, count = now, 0
  end
  local whole = math.floor(d)
  if math.random() < d - whole then whole = whole + 1 end
  return whole
end
"""


# ------------------------------------------------------------------------------- collector


class TraceTally:
    """Per trace id, which reference spans arrived: an int mask each, shared by every receiver
    instance of the run (the collector is replaced after each cut, the tally is not)."""

    def __init__(self) -> None:
        self.masks: dict[int, int] = {}
        self.spans = 0
        self.duplicates = 0
        self.unknown = 0  # spans not in the reference tree
        self.posts = 0
        self._lock = threading.Lock()

    def add_batch(self, batch: Any) -> None:
        masks = self.masks
        with self._lock:
            self.posts += 1
            for span in batch.spans or ():
                bit = _BIT.get(span.operationName or "")
                self.spans += 1
                if bit is None:
                    self.unknown += 1
                    continue
                key = ((span.traceIdHigh or 0) & _U64) << 64 | ((span.traceIdLow or 0) & _U64)
                mask = masks.get(key, 0)
                if mask & bit:
                    self.duplicates += 1
                masks[key] = mask | bit


class TallyReceiver(JaegerReceiver):
    """The real collector endpoint, minus keeping spans: 30 min x 1,500 req/s x 9 spans as
    ReceivedSpan objects would not fit in memory; a mask per trace does."""

    def __init__(self, port: int, tally: TraceTally) -> None:
        super().__init__(udp_addr=None, http_addr=("127.0.0.1", port), keep_spans=False)
        self.tally = tally

    def start(self) -> TallyReceiver:
        super().start()
        if self._httpd is not None:
            # a cut closes connections mid-reply; socketserver would print each traceback
            self._httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]
        return self

    def take_batch(self, batch: Any, source: str) -> list[Any]:
        self.tally.add_batch(batch)
        return []


# ---------------------------------------------------------------------------------- stack


def _insert_after(text: str, anchor: str, lines: str) -> str:
    assert anchor in text, anchor
    return text.replace(anchor, anchor + lines, 1)


def logging_config(cfg: str, frontend: str, log_format: str, capture: str = "") -> str:
    """haproxy_e2e's configs with a raw per-request log line on stdout (our log file)."""
    cfg = _insert_after(cfg, "global\n", "    log stdout format raw local0\n")
    # dontlognull: wait_port()'s probes are connections without a request, not failures
    cfg = _insert_after(cfg, "defaults\n", "    log global\n    option dontlognull\n")
    extra = f"    http-request capture {capture} len 64\n" if capture else ""
    return _insert_after(cfg, f"frontend {frontend}\n", f'    log-format "{log_format}"\n{extra}')


# O <ms epoch> <traceparent>: what the origin saw; E <ms> <status> <termination> <spoe error>.
ORIGIN_LOG = "O %[date(0,ms)] %[capture.req.hdr(0)]"  # headers are gone at log time
EDGE_LOG = "E %[date(0,ms)] %ST %ts %[var(txn.trace.error)] %Ta"  # %Ta: request ms in HAProxy


@dataclass
class Stack:
    """Origin, agent and edge HAProxy, each logging to its own file in ``workdir``."""

    args: argparse.Namespace
    workdir: Path
    name: str
    collector_port: int
    front: set[int] | None
    agent_cores: set[int] | None
    edge_port: int = 0
    metrics_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, what: str) -> Path:
        return self.workdir / f"{self.name}-{what}.log"

    def __enter__(self) -> Stack:
        args = self.args
        origin_port, agent_port = free_port(), free_port()
        self.edge_port, self.metrics_port = free_port(), free_port()
        try:
            ocfg = self.workdir / f"{self.name}-origin.cfg"
            ocfg.write_text(
                logging_config(
                    origin_config(origin_port), "origin", ORIGIN_LOG, "req.hdr(traceparent)"
                )
            )
            self.procs["origin"] = start(
                [args.haproxy, "-db", "-f", str(ocfg)], self.front, self.log("origin")
            )
            wait_port(origin_port, self.procs["origin"])
            env = clean_env()
            env.update(
                OTEL_TRACES_EXPORTER="jaeger",
                OTEL_EXPORTER_JAEGER_ENDPOINT=f"http://127.0.0.1:{self.collector_port}/api/traces",
            )
            argv = [
                sys.executable,
                "-m",
                "spoe_agent",
                "--bind",
                f"127.0.0.1:{agent_port}",
                "--workers",
                str(args.workers),
                "--log-level",
                "warning",
                "--metrics",
                f"127.0.0.1:{self.metrics_port}",
            ]
            self.procs["agent"] = start(argv, self.agent_cores, self.log("agent"), env)
            wait_port(agent_port, self.procs["agent"])
            wait_port(self.metrics_port, self.procs["agent"])
            time.sleep(1.0 if args.workers > 1 else 0.2)
            ecfg = self.workdir / f"{self.name}-edge.cfg"
            edge = edge_config(
                self.edge_port, origin_port, f"127.0.0.1:{agent_port}", str(REFERENCE_SPOE_CFG)
            )
            ecfg.write_text(logging_config(edge, "fe", EDGE_LOG))
            self.procs["haproxy"] = start(
                [args.haproxy, "-db", "-f", str(ecfg)], self.front, self.log("haproxy")
            )
            wait_port(self.edge_port, self.procs["haproxy"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for key in ("haproxy", "agent", "origin"):
            proc = self.procs.get(key)
            if proc is not None:
                stop(proc)

    def wrk(
        self, connections: int, duration: float, rate: float | None, log: Path
    ) -> subprocess.Popen[bytes]:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
        if rate is not None:
            script = self.workdir / f"{self.name}-pace.lua"
            script.write_text(PACING_LUA.format(rate=rate, connections=connections))
            argv += ["-s", str(script)]
        return start(argv + [f"http://127.0.0.1:{self.edge_port}/soak"], self.front, log)

    def metrics(self) -> dict[str, float]:
        """The agent's /metrics, summed per sample name and (for drops) reason."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.startswith("spoe_agent_"):
                    continue
                key = s.name
                if "reason" in s.labels and "spans_dropped" in s.name:
                    key += f"{{{s.labels['reason']}}}"
                out[key] = out.get(key, 0.0) + s.value
        return out


# ------------------------------------------------------------------------------- the run


@dataclass
class Window:
    """An exporter outage: cut (collector stopped) and restore (new one listening), epoch s."""

    cut: float
    restore: float
    dropped_spans: float = 0.0
    exporter_errors: float = 0.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SoakResult:
    started: str
    t0: float
    machine: str
    duration_s: float
    warmup_s: float
    outage_s: float
    margin_s: float
    capacity_rps: float | None
    target_rps: float
    achieved_rps: float
    rate_10s_min: float
    rate_10s_max: float
    connections: int
    wrk: dict[str, Any]
    rss_kib_warmup_end: int
    rss_kib_max_after_warmup: int
    rss_kib_min_after_warmup: int
    rss_kib_end: int
    rss_samples: list[tuple[float, int]]
    haproxy_ms: dict[str, int]  # request time in the edge HAProxy (%Ta): p50, p99, p999, max
    slow_windows: list[dict[str, float]]  # 10 s windows under 80% of the target rate
    cpu_series: list[tuple[float, dict[str, float]]]
    cpu_cores: dict[str, float]
    outages: list[Window]
    requests_edge: int
    requests_origin: int
    edge_failures: int
    edge_cut_at_end: int
    spoe_errors: int
    traces_checked: int
    traces_complete: int
    traces_incomplete: int
    excluded_margin: int
    excluded_outage: int
    outage_traces_complete: int
    incomplete_examples: list[str]
    receiver: dict[str, int]
    agent_metrics_end: dict[str, float]
    metric_samples: list[tuple[float, dict[str, float]]]
    checks: list[Check]


def capacity(
    args: argparse.Namespace, workdir: Path, front: set[int] | None, agent_cores: set[int] | None
) -> float:
    """Unpaced traced req/s of this stack on this machine, now (the box may be busy)."""
    tally = TraceTally()
    port = free_port()
    receiver = TallyReceiver(port, tally).start()
    try:
        with Stack(args, workdir, "capacity", port, front, agent_cores) as stack:
            log = stack.log("wrk")
            proc = stack.wrk(args.capacity_connections, args.capacity_duration, None, log)
            proc.wait(args.capacity_duration + 60)
            result = parse_wrk(log.read_text(errors="replace"))
    finally:
        receiver.stop(flush=False)
    print(
        f"capacity: {result.rps:,.0f} traced req/s ({result.requests} requests, "
        f"{result.errors} socket errors, {result.non_2xx} non-2xx)",
        flush=True,
    )
    return result.rps


def read_logs(path: Path, tag: str) -> list[list[str]]:
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(tag + " "):
                out.append(line.split())
    return out


def soak(args: argparse.Namespace, workdir: Path) -> SoakResult:
    cores = sorted(os.sched_getaffinity(0))
    env = environment(args)  # before pinning this process: it counts our cores
    front: set[int] | None = None
    agent_cores: set[int] | None = None
    if args.layout == "split" and len(cores) >= 2:
        front, agent_cores = {cores[0]}, set(cores[1:])
        os.sched_setaffinity(0, front)  # the collector (this process) stays off the agent's core
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    cap = None
    if args.rate is None:
        cap = capacity(args, workdir, front, agent_cores)
        target = args.load * cap
    else:
        target = args.rate
    duration = args.duration
    warmup = min(180.0, 0.1 * duration)
    outage = min(180.0, 0.1 * duration)
    schedule = [
        (duration / 3, "cut"),
        (duration / 3 + outage, "restore"),
        (2 * duration / 3, "cut"),
        (2 * duration / 3 + outage, "restore"),
    ]
    print(
        f"soak: {target:,.0f} req/s for {duration:g} s, warm-up {warmup:g} s, outages of "
        f"{outage:g} s at {duration / 3:g} and {2 * duration / 3:g} s",
        flush=True,
    )

    tally = TraceTally()
    port = free_port()
    receiver: TallyReceiver | None = TallyReceiver(port, tally).start()
    rss: list[tuple[float, int]] = []
    samples: list[tuple[float, dict[str, float]]] = []
    outages: list[Window] = []
    with Stack(args, workdir, "soak", port, front, agent_cores) as stack:
        agent_pids = process_tree(stack.procs["agent"].pid)
        watched = {
            "agent": agent_pids,
            "haproxy": [stack.procs["haproxy"].pid],
            "origin": [stack.procs["origin"].pid],
            "collector": [os.getpid()],
        }
        wrk_log = stack.log("wrk")
        t0 = time.time()
        wrk = stack.wrk(args.connections, duration, target, wrk_log)
        watched["wrk"] = [wrk.pid]
        cpu0 = {k: cpu_seconds(v) for k, v in watched.items()}
        busy0 = busy_now = system_busy_seconds()
        cpu_series: list[tuple[float, dict[str, float]]] = []
        cpu_end: dict[str, float] = {}
        next_sample = t0
        next_metrics = t0
        try:
            while wrk.poll() is None:
                now = time.time()
                if schedule and now - t0 >= schedule[0][0]:
                    _, what = schedule.pop(0)
                    m = stack.metrics()
                    if what == "cut":
                        outages.append(Window(cut=time.time(), restore=0.0))
                        assert receiver is not None
                        receiver.stop(flush=False)  # nothing listens: connection refused
                        receiver = None
                        outages[-1].dropped_spans = -_dropped(m)
                        outages[-1].exporter_errors = -m.get("spoe_agent_exporter_errors_total", 0)
                    else:
                        receiver = TallyReceiver(port, tally).start()
                        w = outages[-1]
                        w.restore = time.time()
                        w.dropped_spans += _dropped(m)
                        w.exporter_errors += m.get("spoe_agent_exporter_errors_total", 0)
                    print(f"{now - t0:7.1f} s  {what}", flush=True)
                if now >= next_sample:
                    rss.append((round(now - t0, 1), rss_kib(agent_pids)))
                    next_sample += args.sample_interval
                if now >= next_metrics:
                    samples.append((round(now - t0, 1), stack.metrics()))
                    next_metrics += 10.0
                    cpu_prev, busy_prev = cpu_end or cpu0, busy_now
                    cpu_end = {k: cpu_seconds(v) for k, v in watched.items()}
                    busy_now = system_busy_seconds()
                    if now > t0 + 1:  # cores used in the last 10 s, to explain slow stretches
                        step = {k: (cpu_end[k] - cpu_prev[k]) / 10 for k in cpu_end}
                        step["other"] = (busy_now - busy_prev) / 10 - sum(step.values())
                        cpu_series.append((round(now - t0, 1), step))
                    print(
                        f"{now - t0:7.1f} s  RSS {rss[-1][1] / 1024:.1f} MiB  "
                        f"spans received {tally.spans:,}",
                        flush=True,
                    )
                time.sleep(0.2)
        finally:
            if wrk.poll() is None:
                stop(wrk)
        t_end = time.time()
        cpu_end.update({k: cpu_seconds(v) for k, v in watched.items() if k != "wrk"})
        # everything else on the machine (other jobs): 2 cores are easily disturbed
        other = system_busy_seconds() - busy0 - sum(cpu_end[k] - cpu0[k] for k in cpu0)
        cpu_end["other"] = max(0.0, other)  # wrk's last reading is up to 10 s old
        cpu0["other"] = 0.0
        # Drain: the last requests' spans are at most one schedule delay (0.5 s) away.
        last, stable_since = -1.0, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = stack.metrics()
            exported = m.get("spoe_agent_spans_exported_total", 0)
            if exported != last or m.get("spoe_agent_export_queue_size", 0) > 0:
                last, stable_since = exported, time.monotonic()
            elif time.monotonic() - stable_since > 3:
                break
            time.sleep(0.5)
        final_metrics = stack.metrics()
        samples.append((round(time.time() - t0, 1), final_metrics))
        if schedule or (outages and not outages[-1].restore):
            print("warning: the run ended before its schedule", file=sys.stderr)
    if receiver is not None:
        receiver.stop(flush=False)
    elapsed = t_end - t0
    wrk_text = wrk_log.read_text(errors="replace")
    wrk_result = parse_wrk(wrk_text)
    return judge(
        args,
        env,
        started,
        cap,
        target,
        warmup,
        outage,
        t0,
        t_end,
        elapsed,
        rss,
        samples,
        outages,
        wrk_result,
        tally,
        stack,
        final_metrics,
        {k: (cpu_end.get(k, cpu0[k]) - cpu0[k]) / elapsed for k in cpu0},
        cpu_series,
    )


def _dropped(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("spoe_agent_spans_dropped_total"))


def judge(
    args: argparse.Namespace,
    env: dict[str, str],
    started: str,
    cap: float | None,
    target: float,
    warmup: float,
    outage: float,
    t0: float,
    t_end: float,
    elapsed: float,
    rss: list[tuple[float, int]],
    samples: list[tuple[float, dict[str, float]]],
    outages: list[Window],
    wrk: Any,
    tally: TraceTally,
    stack: Stack,
    final_metrics: dict[str, float],
    cpu: dict[str, float],
    cpu_series: list[tuple[float, dict[str, float]]],
) -> SoakResult:
    """Turn the logs, samples and the tally into numbers and PASS/FAIL."""
    margin = args.margin
    # -- requests HAProxy saw fail ------------------------------------------------------------
    edge = read_logs(stack.log("haproxy"), "E")
    failures = cut_at_end = spoe_errors = 0
    buckets: dict[int, int] = {}
    slowest: dict[int, int] = {}  # per 10 s window, the longest request (ms in HAProxy)
    times: list[int] = []
    examples: list[str] = []
    for fields in edge:
        t_ms, status, term = int(fields[1]), fields[2], fields[3]
        err = fields[4] if len(fields) > 4 else "-"
        ta = int(fields[5]) if len(fields) > 5 and fields[5].isdigit() else 0
        b = int((t_ms / 1000 - t0) // 10)
        buckets[b] = buckets.get(b, 0) + 1
        slowest[b] = max(slowest.get(b, 0), ta)
        times.append(ta)
        if err != "-":
            spoe_errors += 1
        if not status.startswith("2") or term != "--":
            if t_ms / 1000 >= t_end - 1.0:
                cut_at_end += 1  # in flight when wrk stopped: wrk closed the connection
            else:
                failures += 1
                if len(examples) < 5:
                    examples.append(" ".join(fields))
    whole = sorted(b for b in buckets if 0 <= b and (b + 1) * 10 <= elapsed)
    full = [buckets[b] / 10 for b in whole]
    times.sort()
    latency = {
        "p50": times[len(times) // 2] if times else 0,
        "p99": times[int(len(times) * 0.99)] if times else 0,
        "p999": times[int(len(times) * 0.999)] if times else 0,
        "max": times[-1] if times else 0,
    }
    del times

    def other_cores(t: float) -> float:
        near = [step.get("other", 0.0) for ts, step in cpu_series if t <= ts <= t + 20]
        return near[0] if near else 0.0

    slow = [
        {
            "at_s": b * 10,
            "req_s": buckets[b] / 10,
            "slowest_ms": slowest.get(b, 0),
            "other_cores": round(other_cores(b * 10), 2),
        }
        for b in whole
        if buckets[b] / 10 < 0.8 * target
    ]
    # -- every span of every request the origin served while the collector was up -------------
    origin = read_logs(stack.log("origin"), "O")
    checked = complete = excluded_margin = excluded_outage = outage_complete = 0
    incomplete: list[str] = []
    masks = tally.masks
    for fields in origin:
        t = int(fields[1]) / 1000
        tp = fields[2] if len(fields) > 2 else "-"
        try:
            key = int(tp.split("-")[1], 16)
        except (IndexError, ValueError):
            incomplete.append(f"no traceparent at the origin: {' '.join(fields)}")
            checked += 1
            continue
        have = masks.get(key, 0)
        inside = any(w.cut <= t <= (w.restore or t_end) for w in outages)
        near = any(w.cut - margin <= t <= (w.restore or t_end) + margin for w in outages)
        if inside:
            excluded_outage += 1
            outage_complete += have == _ALL
        elif near or t >= t_end - margin:
            excluded_margin += 1
        else:
            checked += 1
            if have == _ALL:
                complete += 1
            elif len(incomplete) < 10:
                missing = [n for n in REFERENCE_SPANS if not have & _BIT[n]]
                incomplete.append(f"{tp} at +{t - t0:.3f} s: missing {', '.join(missing)}")
    incomplete_n = checked - complete
    # -- RSS ------------------------------------------------------------------------------------
    after = [(t, kib) for t, kib in rss if t >= warmup]
    base = after[0][1] if after else 0
    rss_max = max((kib for _, kib in after), default=0)
    rss_min = min((kib for _, kib in after), default=0)
    checks = [
        Check(
            "RSS within 10% of its warm-up level",
            bool(after) and rss_max <= 1.10 * base,
            f"{base / 1024:.1f} MiB at {warmup:g} s, max {rss_max / 1024:.1f} MiB "
            f"({100 * (rss_max / base - 1) if base else 0:+.1f}%), min "
            f"{rss_min / 1024:.1f} MiB, end {rss[-1][1] / 1024 if rss else 0:.1f} MiB",
        ),
        Check(
            "no request failed",
            wrk.errors == 0 and wrk.non_2xx == 0 and failures == 0,
            f"wrk: {wrk.requests:,} requests, {wrk.errors} socket errors, {wrk.non_2xx} non-2xx;"
            f" HAProxy: {len(edge):,} logged, {failures} failed"
            + (f" (e.g. {examples})" if examples else "")
            + f", {cut_at_end} cut off by wrk stopping",
        ),
        Check(
            "every span of every request completed while the exporter was up",
            checked > 0
            and incomplete_n == 0
            and not any(i.startswith("no trace") for i in incomplete),
            f"{len(origin):,} requests at the origin; {checked:,} traces checked, "
            f"{complete:,} complete, {incomplete_n:,} incomplete; excluded: {excluded_outage:,}"
            f" during outages, {excluded_margin:,} within {margin:g} s of a cut/restore/end",
        ),
    ]
    achieved = wrk.requests / elapsed if elapsed else 0.0
    return SoakResult(
        started=started,
        t0=t0,
        machine=env["machine"],
        duration_s=elapsed,
        warmup_s=warmup,
        outage_s=outage,
        margin_s=margin,
        capacity_rps=cap,
        target_rps=target,
        achieved_rps=achieved,
        rate_10s_min=min(full, default=0.0),
        rate_10s_max=max(full, default=0.0),
        connections=args.connections,
        wrk=asdict(wrk),
        rss_kib_warmup_end=base,
        rss_kib_max_after_warmup=rss_max,
        rss_kib_min_after_warmup=rss_min,
        rss_kib_end=rss[-1][1] if rss else 0,
        rss_samples=rss,
        haproxy_ms=latency,
        slow_windows=slow,
        cpu_series=cpu_series,
        cpu_cores=cpu,
        outages=outages,
        requests_edge=len(edge),
        requests_origin=len(origin),
        edge_failures=failures,
        edge_cut_at_end=cut_at_end,
        spoe_errors=spoe_errors,
        traces_checked=checked,
        traces_complete=complete,
        traces_incomplete=incomplete_n,
        excluded_margin=excluded_margin,
        excluded_outage=excluded_outage,
        outage_traces_complete=outage_complete,
        incomplete_examples=incomplete,
        receiver={
            "spans": tally.spans,
            "traces": len(tally.masks),
            "posts": tally.posts,
            "duplicate_spans": tally.duplicates,
            "unknown_spans": tally.unknown,
        },
        agent_metrics_end=final_metrics,
        metric_samples=samples,
        checks=checks,
    )


# --------------------------------------------------------------------------------- output


def markdown(r: SoakResult) -> str:
    m = r.agent_metrics_end
    cap = f"{r.capacity_rps:,.0f} req/s measured unpaced, " if r.capacity_rps else ""
    lines = [
        f"Soak started {r.started}: {r.duration_s:,.0f} s, {r.machine}.",
        "",
        f"Load: {cap}target {r.target_rps:,.0f} req/s, achieved {r.achieved_rps:,.0f} req/s "
        f"(10 s windows {r.rate_10s_min:,.0f}-{r.rate_10s_max:,.0f}), {r.connections} wrk "
        f"connections; wrk p50 {r.wrk['p50_ms']:.2f} ms, p99 {r.wrk['p99_ms']:.2f} ms; in HAProxy "
        f"(%Ta) p50 {r.haproxy_ms['p50']} ms, p99 {r.haproxy_ms['p99']} ms, p99.9 "
        f"{r.haproxy_ms['p999']} ms, max {r.haproxy_ms['max']} ms.",
        f"Warm-up {r.warmup_s:g} s; exporter outages (collector stopped, connection refused) "
        "at "
        + ", ".join(f"+{w.cut - r.t0:.0f} s for {w.restore - w.cut:.0f} s" for w in r.outages)
        + ".",
        "",
        "| check | result | numbers |",
        "|---|---|---|",
    ]
    for c in r.checks:
        lines.append(f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail} |")
    drops = ", ".join(
        f"{w.dropped_spans:,.0f} spans dropped / {w.exporter_errors:,.0f} failed exports"
        for w in r.outages
    )
    lines += [
        "",
        "| | |",
        "|---|---|",
        f"| agent RSS (MiB): warm-up end / min / max / end | {r.rss_kib_warmup_end / 1024:.1f} / "
        f"{r.rss_kib_min_after_warmup / 1024:.1f} / {r.rss_kib_max_after_warmup / 1024:.1f} / "
        f"{r.rss_kib_end / 1024:.1f} |",
        "| CPU (cores): agent / HAProxy / origin / collector / wrk / other processes | "
        + " / ".join(
            f"{r.cpu_cores.get(k, 0):.2f}"
            for k in ("agent", "haproxy", "origin", "collector", "wrk", "other")
        )
        + " |",
        f"| requests: wrk / HAProxy log / origin log | {r.wrk['requests']:,} / "
        f"{r.requests_edge:,} / {r.requests_origin:,} |",
        f"| SPOE errors logged by HAProxy (txn.trace.error) | {r.spoe_errors:,} |",
        f"| spans exported / dropped (agent /metrics, whole run) | "
        f"{m.get('spoe_agent_spans_exported_total', 0):,.0f} / {_dropped(m):,.0f} |",
        f"| during each outage | {drops} |",
        f"| collector: spans / traces / POSTs / duplicates | {r.receiver['spans']:,} / "
        f"{r.receiver['traces']:,} / {r.receiver['posts']:,} / "
        f"{r.receiver['duplicate_spans']:,} |",
        f"| traces complete among requests served during outages | "
        f"{r.outage_traces_complete:,} of {r.excluded_outage:,} |",
    ]
    if r.slow_windows:
        lines += [
            "",
            "10 s windows under 80% of the target rate: "
            + "; ".join(
                f"+{w['at_s']:.0f} s {w['req_s']:,.0f} req/s, slowest {w['slowest_ms']:.0f} ms, "
                f"other processes {w['other_cores']:.2f} cores"
                for w in r.slow_windows
            ),
        ]
    if r.incomplete_examples:
        lines += ["", "Incomplete: " + "; ".join(r.incomplete_examples[:5])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=1800.0, help="soak seconds")
    p.add_argument("--rate", type=float, help="req/s to drive (default: --load x capacity)")
    p.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    p.add_argument("--capacity-duration", type=float, default=20.0)
    p.add_argument("--capacity-connections", type=int, default=64)
    p.add_argument("--connections", type=int, default=64, help="paced wrk connections")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--layout",
        choices=("split", "shared"),
        default="split",
        help="split: HAProxy, origin, wrk and the collector on core 0, agent on "
        "the rest (as haproxy_e2e's capacity numbers); shared: unpinned",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=3.0,
        help="seconds around each cut/restore (and before the end) not checked",
    )
    p.add_argument("--sample-interval", type=float, default=2.0, help="RSS sampling, seconds")
    p.add_argument("--haproxy", default=DEFAULT_HAPROXY)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the logs directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        result = soak(args, workdir)
    finally:
        if args.keep:
            print(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(result)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0 if all(c.ok for c in result.checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
