"""``--workers N`` end to end: real HAProxy 2.6 and 3.2, the reference spoe.cfg, a real receiver.

HAProxy runs one thread and many streams at once, so it opens many SPOP connections and sends a
stream's successive events over whichever is free: the events of one request reach different
workers. A relay between HAProxy and the agent (tests/workers/spop_tap.py) records which
connection carried which stream, and the workers' log lines say which worker got which
connection, so the tests show that this happened rather than assume it. What they assert is what
Jaeger would show: every trace complete and shaped exactly as a single process makes it, no
span twice, and after a worker is killed, nothing lost beyond the sessions it held.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spoe_agent.viewer.receiver import JaegerReceiver, ReceivedSpan
from tests.integration.backend import Backend
from tests.integration.tracing_support import (
    ROOT,
    agent_env,
    assert_agent_log_clean,
    assert_reference_tree,
    describe,
    get,
    hop_config,
    parse_traceparent,
    wait_spans,
)
from tests.support.haproxy import HAProxy
from tests.support.procs import AgentProcess, free_port, free_port_range
from tests.support.spop_client import SpopClient
from tests.workers.spop_tap import SpopTap

pytestmark = pytest.mark.haproxy

WORKERS = 2
_HELLO = re.compile(r"worker (\d+): HELLO from 127\.0\.0\.1:(\d+)")


@dataclass
class Request:
    path: str
    status: int
    trace_id: str | None
    started: float
    ended: float
    #: HAProxy's SPOE error variable for this request (a timeout, a refused connection...)
    spoe_error: str | None = None


@dataclass
class Node:
    """One HAProxy with its own agent (and optionally the relay between them)."""

    hap: HAProxy
    agent: AgentProcess
    port: int
    metrics_port: int
    workers: int
    service: str
    tap: SpopTap | None = None
    taps: list[SpopTap] = field(default_factory=list)

    def counters(self) -> list[dict[str, float]]:
        """Each worker's routing counters and connection count, from its own /metrics (port +
        1 + index), and whether it is up and how often it restarted, from the supervisor's."""

        def families(port: int) -> Iterator[Any]:
            url = f"http://127.0.0.1:{port}/metrics"
            yield from text_string_to_metric_families(
                urllib.request.urlopen(url, timeout=10).read().decode())

        out: list[dict[str, float]] = [{} for _ in range(self.workers)]
        for family in families(self.metrics_port):
            for sample in family.samples:
                worker = sample.labels.get("worker")
                if sample.name == "spoe_agent_worker_up" and worker is not None:
                    out[int(worker)]["up"] = sample.value
                elif sample.name == "spoe_agent_worker_restarts_total" and worker is not None:
                    out[int(worker)]["restarts"] = sample.value
        for index, own in enumerate(out):
            for family in families(self.metrics_port + 1 + index):
                for sample in family.samples:
                    if sample.name == "spoe_agent_worker_routing_total":
                        own[sample.labels["event"]] = sample.value
                    elif sample.name == "spoe_agent_connections_open":
                        own["connections_open"] = sample.value
        return out

    def worker_pids(self) -> dict[int, int]:
        return worker_pids(self.agent.process.pid)


@pytest.fixture
def receiver() -> Iterator[JaegerReceiver]:
    with JaegerReceiver(udp_addr=("127.0.0.1", 0), http_addr=None, quiet_s=0.5) as rec:
        yield rec


NodeFactory = Callable[..., Node]


@pytest.fixture
def node(
    haproxy: Callable[..., HAProxy],
    spoe_agent: Callable[..., AgentProcess],
    backend: Backend,
    receiver: JaegerReceiver,
) -> Iterator[NodeFactory]:
    """Factory: ``node(workers, service="hop-1", server=None, tap=False)``: an agent with
    ``--workers``, then a one-thread HAProxy using it (through the relay if ``tap``)."""
    taps: list[SpopTap] = []

    def build(workers: int, *, service: str = "hop-1", server: str | None = None,
              tap: bool = False) -> Node:
        metrics_port = free_port_range(workers + 1)
        agent = spoe_agent("--workers", str(workers), "--metrics", f"127.0.0.1:{metrics_port}",
                           "--log-level", "debug", app=None, env=agent_env(receiver),
                           name=f"agent-{service}")
        wait_workers_ready(agent, workers)
        relay = None
        if tap:
            assert agent.host is not None and agent.port is not None
            relay = SpopTap((agent.host, agent.port))
            taps.append(relay)
        port = free_port()
        config = hop_config(port=port, service=service, server=server or backend.address,
                            agent=agent)
        config = config.replace("global\n", "global\n    nbthread 1\n", 1)
        # Timers and termination flags per request, for the post-mortem of a failure.
        config = config.replace("    log global\n", "    log global\n    option httplog\n", 1)
        if relay is not None:
            config = config.replace(f"server agent1 {agent.server_address} ",
                                    f"server agent1 {relay.address} ")
        hap = haproxy(config, name=service)
        hap.wait_server_status("spoe-agents", "agent1", "UP", timeout=15)
        return Node(hap, agent, port, metrics_port, workers, service, relay)

    yield build
    for relay in taps:
        relay.close()


def worker_pids(supervisor: int) -> dict[int, int]:
    """Worker index -> pid of the supervisor's live children, from /proc (their command line
    says which index each one is)."""
    out = {}
    try:
        with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return out
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--worker-index" in argv:
            out[int(argv[len(argv) - 1 - argv[::-1].index(b"--worker-index") + 1])] = pid
    return out


def wait_workers_ready(agent: AgentProcess, workers: int, timeout: float = 20.0,
                       line: str = "routing sessions as worker") -> None:
    """Until each worker logged ``line``: the tracing agent's routing is set up (an app
    without routing: wait for ``spoe-agent listening``)."""
    if workers == 1:
        return  # a single process: ready when it listens, which the fixture waited for
    deadline = time.monotonic() + timeout
    while True:
        ready = set(re.findall(rf"worker (\d+): {line}", agent.logs()))
        if len(ready) == workers:
            return
        assert agent.process.running, agent.describe_logs()
        assert time.monotonic() < deadline, f"workers ready: {ready}\n{agent.describe_logs()}"
        time.sleep(0.05)


def wait_workers_serving(agent: AgentProcess, workers: int) -> None:
    """Until the supervisor counts every worker as serving (each sent its first report), which
    a worker's own log lines come before: until then the supervisor accepts nothing (for up
    to 10 s), so a HELLO answered sooner says it; and a worker killed before it counts stops
    the agent's start instead of being replaced."""
    wait_workers_ready(agent, workers, line="spoe-agent listening")
    with SpopClient((agent.host, agent.port), timeout=8) as client:
        client.handshake()


# ------------------------------------------------------------------------------------ load


def run_load(port: int, prefix: str, *, total: int | None = None, concurrency: int = 16,
             stop: threading.Event | None = None) -> list[Request]:
    """Keep-alive clients sending unique paths: ``total`` requests, or until ``stop``."""
    done: list[Request] = []
    lock = threading.Lock()
    counter = iter(range(10**9))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while True:
                with lock:
                    n = next(counter)
                if (total is not None and n >= total) or (stop is not None and stop.is_set()):
                    return
                path = f"/{prefix}/{n}"
                started = time.monotonic()
                try:
                    reply = get(port, path, conn=conn)
                except (OSError, http.client.HTTPException) as exc:
                    # Counted as a failed request (status -1), never lost with the thread.
                    with lock:
                        done.append(Request(path, -1, None, started, time.monotonic(),
                                            repr(exc)))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    continue
                ended = time.monotonic()
                with lock:
                    done.append(Request(path, reply.status, reply.headers.get("x-trace-id"),
                                        started, ended, reply.headers.get("x-trace-error")))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done


# ---------------------------------------------------------------------------------- traces


def complete_traces(spans: list[ReceivedSpan], service: str) -> dict[str, list[ReceivedSpan]]:
    """url.path -> the spans of its trace, for the traces that are the full reference tree."""
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        if span.service_name == service:
            by_trace.setdefault(span.trace_id, []).append(span)
    out = {}
    for trace in by_trace.values():
        try:
            named = assert_reference_tree(trace, service)
        except AssertionError:
            continue
        path = named[ROOT].tags.get("url.path")
        assert path not in out, f"two complete traces for {path}"
        out[str(path)] = trace
    return out


def shape(trace: list[ReceivedSpan]) -> tuple[object, ...]:
    """Everything about a trace but ids, times and values: names, parents, links, kinds, tag
    names, error flags. Two runs of the same requests must give the same shapes."""
    names = {s.span_id: s.operation_name for s in trace}
    return tuple(sorted(
        (
            s.operation_name,
            names.get(s.parent_span_id) if s.parent_span_id else None,
            tuple(sorted((kind, names.get(ref)) for kind, _, ref in s.references)),
            s.tags.get("span.kind"),
            tuple(sorted(k for k in s.tags if not k.startswith(("otel.", "telemetry.")))),
            s.error,
        )
        for s in trace
    ))


def spans_settled(receiver: JaegerReceiver, node: Node, count: int) -> list[ReceivedSpan]:
    """Wait for ``count`` spans of ``node``, then for a barrier request's trace: whatever was
    still on its way (a duplicate) arrives before it."""
    wait_spans(receiver, lambda s: s.service_name == node.service, count, timeout=60)
    barrier = get(node.port, "/barrier")
    trace_id = barrier.headers["x-trace-id"]
    wait_spans(receiver, lambda s: s.trace_id == trace_id, 9, timeout=30)
    return [s for s in receiver.spans if s.trace_id != trace_id]


# ----------------------------------------------------------------------------------- tests


def test_traces_across_workers_are_those_of_one_process(
    node: NodeFactory, receiver: JaegerReceiver, backend: Backend,
) -> None:
    total = 600
    multi = node(WORKERS, tap=True)
    replies = run_load(multi.port, "multi", total=total, concurrency=24)

    assert Counter(r.status for r in replies) == {200: total}
    errors = Counter(r.spoe_error for r in replies if r.spoe_error)
    assert not errors, f"HAProxy's SPOE gave up on some events: {errors}"
    assert all(r.trace_id for r in replies), "an inject was not answered (no X-Trace-Id)"
    spans = spans_settled(receiver, multi, 9 * total)
    dump = describe(spans[:40])
    assert len(spans) == 9 * total, f"{len(spans)} spans for {total} requests\n{dump}"
    assert len({s.span_id for s in spans}) == len(spans), "a span was emitted twice"
    complete = complete_traces(spans, "hop-1")
    missing = [r for r in replies if r.path not in complete]
    assert not missing, "\n".join(
        f"{r.path}:\n" + describe([s for s in spans if s.trace_id == r.trace_id])
        for r in missing[:3])
    # Each request's trace is the one HAProxy announced and the origin was given.
    traced = {str(assert_reference_tree(t, "hop-1")[ROOT].tags["url.path"]): t[0].trace_id
              for t in complete.values()}
    assert {r.path: r.trace_id for r in replies} == traced
    sent = {parse_traceparent(r.headers["traceparent"])[0] for r in backend.requests}
    assert set(traced.values()) <= sent

    # The events of one stream did reach different workers: the relay saw which connections
    # carried each stream, the workers logged which connections they were given.
    worker_of = {int(port): int(w) for w, port in _HELLO.findall(multi.agent.logs())}
    assert multi.tap is not None
    split = [key for key, ports in multi.tap.streams.items()
             if len({worker_of[p] for p in ports if p in worker_of}) > 1]
    assert len(multi.tap.streams) >= total
    assert split, "no stream had its events handled by more than one worker"
    print(f"\n{len(split)} of {len(multi.tap.streams)} streams had events on several workers")
    # The worker that received a stream's first event owns it: the events of the streams
    # split over both were forwarded to it.
    counters = multi.counters()
    assert sum(w["forwarded"] for w in counters) > 0, counters
    assert sum(w["received"] for w in counters) > 0, counters
    for worker in counters:
        assert worker["connections_open"] > 0, counters
        assert worker["held"] == worker["inject_timeout"] == worker["inject_unavailable"] == 0
        assert worker["drain_cut_short"] == worker["peer_errors"] == 0
    assert sum(w["forwarded_inject"] for w in counters) > 0

    # The single-process agent, same requests: the same trace shapes, exactly.
    receiver.clear()
    single = node(1, service="hop-1", tap=False)
    replies = run_load(single.port, "single", total=100, concurrency=24)
    assert Counter(r.status for r in replies) == {200: 100}
    assert not [r for r in replies if r.spoe_error]
    single_complete = complete_traces(spans_settled(receiver, single, 9 * 100), "hop-1")
    assert set(single_complete) == {r.path for r in replies}
    assert {shape(t) for t in single_complete.values()} == {shape(t) for t in complete.values()}
    assert len({shape(t) for t in complete.values()}) == 1
    assert_agent_log_clean(multi.agent)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_loses_only_the_sessions_it_held(
    node: NodeFactory, receiver: JaegerReceiver,
) -> None:
    concurrency = 16
    multi = node(WORKERS)
    victim_index = WORKERS - 1
    stop = threading.Event()
    results: list[Request] = []
    loader = threading.Thread(
        target=lambda: results.extend(run_load(multi.port, "load", concurrency=concurrency,
                                               stop=stop)))
    loader.start()
    try:
        time.sleep(1.5)
        victim = multi.worker_pids()[victim_index]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while multi.worker_pids().get(victim_index) in (victim, None):
            assert time.monotonic() < deadline, multi.agent.describe_logs()
            time.sleep(0.05)
        replacement = multi.worker_pids()[victim_index]
        log_lines = multi.agent.logs()
        assert re.search(rf"worker {victim_index} \(pid {victim}\) exited with signal SIGKILL",
                         log_lines), log_lines[-2000:]
        while log_lines.count(f"worker {victim_index}: routing sessions as worker") < 2:
            assert time.monotonic() < deadline, multi.agent.describe_logs()
            time.sleep(0.05)
            log_lines = multi.agent.logs()
        time.sleep(2.0)  # traffic goes on, through the replacement too
    finally:
        stop.set()
        loader.join()
    assert multi.agent.process.running
    assert replacement != victim

    # After the replacement, traffic is what it was: every request fully traced, injected.
    after = run_load(multi.port, "after", total=200, concurrency=concurrency)
    assert all(r.status == 200 and r.trace_id and not r.spoe_error for r in after)

    after_ids = {r.trace_id for r in after}
    wait_spans(receiver, lambda s: s.trace_id in after_ids, 9 * len(after), timeout=60,
               what="spans of the requests after the restart")
    everything = spans_settled(receiver, multi, 0)
    assert len({s.span_id for s in everything}) == len(everything), "a span was emitted twice"
    complete = complete_traces(everything, "hop-1")
    assert {r.path for r in after} <= set(complete)
    lost = [r for r in results if r.path not in complete]
    # A request in flight on a connection of the killed worker may end badly (HAProxy gave
    # up on its event, or in rare runs its client timed out); one started after the kill
    # reached HAProxy may not.
    failed = [r for r in results if r.status != 200]
    assert all(r.started <= killed_at + 0.5 for r in failed), failed[:5]
    # What was lost was in flight when the worker died, or had just ended (its spans waited
    # in the dead worker's export queue: OTEL_BSP_SCHEDULE_DELAY is 50 ms here), and none
    # started once the kill had reached HAProxy.
    in_flight = [r for r in results if r.started <= killed_at <= r.ended]
    around = {r.path for r in results if r.ended >= killed_at - 0.1}
    assert {r.path for r in lost} <= around, (len(lost), len(in_flight), failed[:5])
    late = [r for r in lost if r.started > killed_at + 0.5]
    assert not late, "\n".join(
        f"{r}, {r.started - killed_at:.3f}s after the kill:\n"
        + describe([s for s in everything if s.trace_id == r.trace_id
                    or s.tags.get("url.path") == r.path])
        for r in late[:3])
    # HAProxy reopens its connections before the replacement is up; the supervisor then moves
    # some to it (a session's work goes with the connection its first event came on), one a
    # second, until no worker holds two more than another. (HAProxy may hold only one.)
    deadline = time.monotonic() + 20
    while True:
        counters = multi.counters()
        held = [c["connections_open"] for c in counters]
        if max(held) - min(held) <= 1:
            break
        assert time.monotonic() < deadline, counters
        time.sleep(0.2)
    restarts = [c["restarts"] for c in counters]
    assert restarts == [int(i == victim_index) for i in range(WORKERS)], counters
    assert all(c["up"] == 1 for c in counters), counters
    print(f"\n{len(results)} requests during the kill, {len(lost)} traces lost "
          f"({len(failed)} requests failed), {len(in_flight)} requests in flight at the kill; "
          f"held by peers meanwhile: {[c['held'] for c in counters]}")


def test_one_agent_per_haproxy_node_joins_the_hops_into_one_trace(
    node: NodeFactory, receiver: JaegerReceiver,
) -> None:
    """Two HAProxy nodes, each with its own (multi-worker) agent on loopback, no state shared
    between the agents: the trace context HAProxy forwards is all that joins the hops."""
    second = node(WORKERS, service="hop-2")
    first = node(WORKERS, service="hop-1", server=f"127.0.0.1:{second.port}")
    assert first.agent.port != second.agent.port
    total = 200
    replies = run_load(first.port, "chain", total=total, concurrency=16)
    assert Counter(r.status for r in replies) == {200: total}
    assert not [r for r in replies if r.spoe_error]

    wait_spans(receiver, lambda s: True, 18 * total, timeout=60)
    spans = list(receiver.spans)
    assert len(spans) == 18 * total
    assert len({s.span_id for s in spans}) == len(spans)
    hop1 = complete_traces(spans, "hop-1")
    hop2 = complete_traces(spans, "hop-2")
    assert set(hop1) == set(hop2) == {r.path for r in replies}
    for path, trace in hop1.items():
        outer = assert_reference_tree(trace, "hop-1")
        inner = assert_reference_tree(hop2[path], "hop-2")
        assert inner[ROOT].trace_id == outer[ROOT].trace_id
        assert inner[ROOT].parent_span_id == outer["Backend HTTP request"].span_id
    for agent_node in (first, second):  # each hop's traces came from a two-worker agent
        assert [w["up"] for w in agent_node.counters()] == [1, 1]


def test_supervisor_stops_cleanly_with_its_workers(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    agent = spoe_agent("--workers", "3", app=None, env={**os.environ, "OTEL_TRACES_EXPORTER":
                                                        "none"})
    # Listening, not only routing: a worker stopped in between (its start-up hooks) exits by
    # the signal, before its handler is set, and logs no "stopped" (CI, once).
    wait_workers_ready(agent, 3, line="spoe-agent listening")
    pids = list(worker_pids(agent.process.pid).values())
    assert len(pids) == 3
    assert agent.process.stop() == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid
    logs = agent.logs()
    assert len(re.findall(r"worker \d: stopped", logs)) == 3, logs
    assert "supervisor: stopped" in logs


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
