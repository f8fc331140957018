"""Helpers for the end-to-end tracing tests: HAProxy hops running the reference SPOE config.

The tests judge the agent only by what a real Jaeger would see (thrift datagrams decoded by
:class:`~spoe_agent.viewer.receiver.JaegerReceiver`) and by what the next hop receives (the
origin's recorded headers), so these helpers build exactly the deployment the README describes
and hold the expectations about the reference span tree in one place.
"""

from __future__ import annotations

import http.client
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spoe_agent.viewer.receiver import JaegerReceiver, ReceivedSpan
from tests.support.haproxy import HAProxy
from tests.support.procs import AgentProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
#: THE reference tracing configuration, used as is unless a test needs another header format.
REFERENCE_SPOE_CFG = REPO_ROOT / "devenv" / "conf" / "spoe.cfg"

ROOT = "HAProxy session"
#: The reference tree (see the top of spoe.cfg): span -> its parent, by relation.
CHILD_OF = {
    "Client session": ROOT,
    "Frontend TCP request": "Client session",
    "Server session": ROOT,
    "TCP response": "Server session",
}
FOLLOWS_FROM = {
    "Frontend HTTP request": "Frontend TCP request",
    "Backend TCP request": "Frontend HTTP request",
    "Backend HTTP request": "Backend TCP request",
    "HTTP response": "TCP response",
}
PARENT = {**CHILD_OF, **FOLLOWS_FROM}
SPAN_NAMES = frozenset({ROOT, *PARENT})
KINDS = {ROOT: "server", "Backend HTTP request": "client"}

#: Jaeger tags the exporter derives (kind, status, scope, and the resource, which the official
#: translator repeats on every span), as opposed to the attributes the SPOE config sets.
DERIVED_TAGS = frozenset({"span.kind", "error", "service.name"})
DERIVED_PREFIXES = ("otel.", "telemetry.")

#: Rounding slack: start and duration are each rounded to the microsecond by the exporter.
SLACK_US = 2

USER_AGENT = "spoe-agent-tracing-test/1.0"


# ------------------------------------------------------------------------------ processes


def agent_env(receiver: JaegerReceiver, **otel: str) -> dict[str, str]:
    """The agent's environment: ours minus any OTEL_* of the shell, plus the receiver's address.

    A developer's exported OTEL_PROPAGATORS or OTEL_SERVICE_NAME would otherwise silently change
    what these tests check. The short schedule delay makes spans arrive within a poll or two.
    """
    assert receiver.udp_address is not None, "start the receiver first"
    host, port = receiver.udp_address
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        OTEL_TRACES_EXPORTER="jaeger",
        OTEL_EXPORTER_JAEGER_AGENT_HOST=str(host),
        OTEL_EXPORTER_JAEGER_AGENT_PORT=str(port),
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    env.update(otel)
    return env


def hop_config(
    *,
    port: int,
    service: str,
    server: str,
    agent: AgentProcess,
    spoe_path: str | os.PathLike[str] = REFERENCE_SPOE_CFG,
    frontend_lines: Sequence[str] = (),
    forward_headers: Sequence[tuple[str, str]] = (),
    backend_lines: Sequence[str] = (),
) -> str:
    """One traced HAProxy hop, as devenv/conf/haproxy-1.conf wires the reference config.

    ``forward_headers`` are extra ``(header, variable)`` pairs copied from ``txn.trace.*`` to the
    forwarded request, for propagation formats other than W3C; ``backend_lines`` go before
    them (the README's ``del-header`` lines for those formats). The response exposes the trace
    id the agent injected and HAProxy's SPOE error variable, so a test sees both per request.
    """
    forwards = [
        ("traceparent", "traceparent"),
        ("tracestate", "tracestate"),
        ("baggage", "baggage"),
        *forward_headers,
    ]
    forward_lines = "\n".join(
        f"    http-request set-header {header} %[var(txn.trace.{var})]"
        f" if {{ var(txn.trace.{var}) -m found }}"
        for header, var in forwards
    )
    # Before the traceparent is set: the incoming one is what the agent's trace is compared to.
    forward_lines = (
        "    http-request del-header tracestate if { var(txn.trace.traceparent) -m found }"
        " !{ var(txn.trace.tracestate) -m found }\n"
    ) + "".join(f"    {line}\n" for line in backend_lines) + forward_lines
    extra = "".join(f"    {line}\n" for line in frontend_lines)
    return f"""\
global
    log stdout format raw local0 info
    setenv OTEL_SERVICE_NAME {service}

defaults
    mode http
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend traced
    bind 127.0.0.1:{port}
    unique-id-format %[uuid()]
    filter spoe engine trace config {os.fspath(spoe_path)}
{extra}\
    http-response set-header X-Trace-Id %[var(txn.trace.traceparent),field(2,-)] if {{ var(txn.trace.traceparent) -m found }}
    http-response set-header X-Trace-Error %[var(txn.trace.error)] if {{ var(txn.trace.error) -m found }}
    default_backend next

backend next
{forward_lines}
    server next {server}

{agents_backend(agent)}"""


def agents_backend(agent: AgentProcess) -> str:
    """The ``spoe-agents`` backend the reference spoe.cfg uses, checked every second."""
    return f"""\
backend spoe-agents
    mode tcp
    option spop-check
    timeout connect 5s
    timeout server 3m
    server agent1 {agent.server_address} check inter 1s
"""


#: Anything the agent logs at these levels while tracing healthy traffic is a bug.
BAD_LOG = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def assert_agent_log_clean(agent: AgentProcess) -> None:
    bad = [line for line in agent.logs().splitlines() if BAD_LOG.search(line)]
    assert not bad, "agent logged problems:\n" + "\n".join(bad[:20])


@dataclass
class Hop:
    hap: HAProxy
    port: int
    service: str


# ------------------------------------------------------------------------------- requests


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    #: The client's source port, which the root span must report as network.peer.port.
    local_port: int


def get(
    port: int,
    path: str,
    headers: Mapping[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    """One GET through a hop; on ``conn`` if given (kept alive), else on a fresh connection."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path, headers={"User-Agent": USER_AGENT, **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        assert conn.sock is not None
        local_port = conn.sock.getsockname()[1]
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, local_port)
    finally:
        if own:
            conn.close()


# --------------------------------------------------------------------------------- spans


def describe(spans: Iterable[ReceivedSpan]) -> str:
    """A readable dump of spans for assertion messages: what arrived, not just a count."""
    lines = []
    for s in sorted(spans, key=lambda s: (s.trace_id, s.start_us, s.operation_name)):
        own = {k: v for k, v in s.tags.items() if not k.startswith("otel.library")}
        lines.append(
            f"  {s.service_name}/{s.operation_name} trace={s.trace_id} span={s.span_id} "
            f"parent={s.parent_span_id} refs={s.references} start={s.start_us} "
            f"dur={s.duration_us} tags={own}"
        )
    return "\n".join(lines) or "  (none)"


def wait_spans(
    receiver: JaegerReceiver,
    select: Callable[[ReceivedSpan], bool],
    count: int,
    timeout: float = 15.0,
    what: str = "spans",
) -> list[ReceivedSpan]:
    """The selected spans once at least ``count`` have arrived; fails listing what did arrive."""
    ok = receiver.wait_for(lambda spans: sum(1 for s in spans if select(s)) >= count, timeout)
    got = [s for s in receiver.spans if select(s)]
    assert ok, f"expected {count} {what} within {timeout}s, got {len(got)}:\n{describe(got)}"
    return got


def wait_trace(
    receiver: JaegerReceiver, trace_id: str, count: int = 9, timeout: float = 15.0
) -> list[ReceivedSpan]:
    return wait_spans(
        receiver, lambda s: s.trace_id == trace_id, count, timeout, f"spans of trace {trace_id}"
    )


def by_name(spans: Iterable[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """Spans by operation name; a name seen twice is a duplicate and fails here."""
    out: dict[str, ReceivedSpan] = {}
    for span in spans:
        assert span.operation_name not in out, (
            f"{span.operation_name!r} arrived twice:\n{describe([out[span.operation_name], span])}"
        )
        out[span.operation_name] = span
    return out


def own_tags(span: ReceivedSpan) -> dict[str, object]:
    """The attributes the SPOE config set, without what the exporter derives."""
    return {
        k: v
        for k, v in span.tags.items()
        if k not in DERIVED_TAGS and not k.startswith(DERIVED_PREFIXES)
    }


def assert_reference_tree(spans: Sequence[ReceivedSpan], service: str) -> dict[str, ReceivedSpan]:
    """One request's spans form the tree documented in spoe.cfg; returns them by name.

    Checks one trace id, one span per name, parents, FOLLOWS_FROM references (and no other),
    kinds, the service name and that every span lies in its parent's (or, after a
    follows-from, starts where its predecessor ended) time range.
    """
    dump = describe(spans)
    named = by_name(spans)
    assert set(named) == SPAN_NAMES, f"span names {sorted(named)}:\n{dump}"
    assert len({s.trace_id for s in spans}) == 1, f"more than one trace:\n{dump}"
    assert len({s.span_id for s in spans}) == len(spans), f"repeated span ids:\n{dump}"
    trace_id = spans[0].trace_id
    for name, span in named.items():
        assert span.service_name == service, f"{name}: service {span.service_name!r}\n{dump}"
        assert span.tags.get("span.kind") == KINDS.get(name, "internal"), f"{name} kind\n{dump}"
        assert span.flags & 1, f"{name} not sampled (flags {span.flags})"
        parent_name = PARENT.get(name)
        if parent_name is None:
            continue
        parent = named[parent_name]
        assert span.parent_span_id == parent.span_id, (
            f"{name}'s parent is not {parent_name}\n{dump}"
        )
        if name in FOLLOWS_FROM:
            assert span.references == [("FOLLOWS_FROM", trace_id, parent.span_id)], (
                f"{name} should follow from {parent_name}\n{dump}"
            )
            assert abs(span.start_us - parent.end_us) <= SLACK_US, (
                f"{name} starts at {span.start_us}, {parent_name} ends at {parent.end_us}"
            )
        else:
            assert span.references == [], f"{name} has references\n{dump}"
            assert parent.start_us - SLACK_US <= span.start_us, f"{name} starts before parent"
            assert span.end_us <= parent.end_us + SLACK_US, f"{name} ends after {parent_name}"
    root = named[ROOT]
    for name, span in named.items():
        assert root.start_us - SLACK_US <= span.start_us <= span.end_us <= root.end_us + SLACK_US, (
            f"{name} [{span.start_us}, {span.end_us}] outside the session "
            f"[{root.start_us}, {root.end_us}]\n{dump}"
        )
    return named


def parse_traceparent(value: str) -> tuple[str, str, str]:
    """``(trace_id, parent_id, flags)`` of a W3C traceparent, validating its shape."""
    version, trace_id, parent_id, flags = value.split("-")
    assert (version, len(trace_id), len(parent_id), len(flags)) == ("00", 32, 16, 2), value
    return trace_id, parent_id, flags
