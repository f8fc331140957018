"""The tracing agent end to end: real HAProxy 2.6 and 3.2, the reference spoe.cfg, real Jaeger.

The agent runs as deployed (the CLI's default tracing app in a subprocess) and exports Jaeger
thrift over UDP to a receiver in this process; the origin behind HAProxy records the headers it
was sent. What these tests assert is what an operator would see in Jaeger and what the next
service would receive, so a regression anywhere between HAProxy's SPOE engine, the span
language, the registry and the exporter shows up here.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spoe_agent.viewer.receiver import JaegerReceiver, ReceivedSpan
from tests.integration.backend import Backend
from tests.integration.tracing_support import (
    PARENT,
    REFERENCE_SPOE_CFG,
    ROOT,
    SPAN_NAMES,
    USER_AGENT,
    Hop,
    Reply,
    agent_env,
    agents_backend,
    assert_agent_log_clean,
    assert_reference_tree,
    by_name,
    describe,
    get,
    hop_config,
    own_tags,
    parse_traceparent,
    wait_spans,
    wait_trace,
)
from tests.support.haproxy import HAProxy, HAProxyConfigError
from tests.support.procs import AgentProcess, free_port

pytestmark = pytest.mark.haproxy


@dataclass
class Tracing:
    """Receiver, agent, one or more chained hops and the origin behind the last one."""

    receiver: JaegerReceiver
    agent: AgentProcess
    origin: Backend
    hops: list[Hop] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The edge: the first hop's frontend."""
        return self.hops[0].port

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return get(self.port, path, headers)

    def traced(self, path: str, headers: dict[str, str] | None = None) -> tuple[Reply, str]:
        """A request that must succeed and say which trace it went to (X-Trace-Id)."""
        reply = self.get(path, headers)
        assert "x-trace-error" not in reply.headers, reply.headers
        assert "x-trace-id" in reply.headers, (reply.status, reply.headers)
        return reply, reply.headers["x-trace-id"]


TracingFactory = Callable[..., Tracing]


@pytest.fixture
def receiver() -> Iterator[JaegerReceiver]:
    with JaegerReceiver(udp_addr=("127.0.0.1", 0), http_addr=None, quiet_s=0.5) as rec:
        yield rec


@pytest.fixture
def tracing(
    haproxy: Callable[..., HAProxy],
    spoe_agent: Callable[..., AgentProcess],
    backend: Backend,
    receiver: JaegerReceiver,
    tmp_path: Path,
) -> TracingFactory:
    """Factory: ``tracing(hops=1, agent_ini=None, spoe_text=None, frontend_lines=(), ...)``.

    Hops are started last to first (each forwards to the next, the last to the origin) and
    each waits for the agent to be UP through spop-check, so no request meets a DOWN agent.
    """

    def build(
        hops: int = 1,
        *,
        agent_ini: str | None = None,
        otel: dict[str, str] | None = None,
        spoe_text: str | None = None,
        frontend_lines: Sequence[str] = (),
        forward_headers: Sequence[tuple[str, str]] = (),
        backend_lines: Sequence[str] = (),
    ) -> Tracing:
        args: list[str] = []
        if agent_ini is not None:
            ini = tmp_path / "agent.ini"
            ini.write_text(agent_ini)
            args += ["-c", str(ini)]
        agent = spoe_agent(*args, app=None, env=agent_env(receiver, **(otel or {})))
        ports = [free_port() for _ in range(hops)]
        started: list[Hop] = []
        for i in reversed(range(hops)):
            service = f"hop-{i + 1}"
            server = backend.address if i == hops - 1 else f"127.0.0.1:{ports[i + 1]}"
            config = hop_config(
                port=ports[i],
                service=service,
                server=server,
                agent=agent,
                spoe_path="{tmp}/spoe.cfg" if spoe_text is not None else REFERENCE_SPOE_CFG,
                frontend_lines=frontend_lines,
                forward_headers=forward_headers,
                backend_lines=backend_lines,
            )
            hap = haproxy(config, spoe_text, name=service)
            hap.wait_server_status("spoe-agents", "agent1", "UP", timeout=15)
            started.insert(0, Hop(hap, ports[i], service))
        return Tracing(receiver, agent, backend, started)

    return build


# ----------------------------------------------------------------------------------- tests


def test_one_request_gives_the_reference_span_tree(tracing: TracingFactory) -> None:
    t = tracing()
    reply, trace_id = t.traced("/shop/cart?item=42&qty=1")
    assert reply.status == 200

    spans = wait_trace(t.receiver, trace_id)
    named = assert_reference_tree(spans, "hop-1")
    # Nothing else arrived: a barrier request's spans come after anything left of the first.
    _, barrier = t.traced("/barrier")
    wait_trace(t.receiver, barrier)
    assert len([s for s in t.receiver.spans if s.trace_id == trace_id]) == 9
    assert len(t.receiver.spans) == 18, describe(t.receiver.spans)

    assert own_tags(named[ROOT]) == {
        "client.address": "127.0.0.1",
        "network.peer.address": "127.0.0.1",
        "network.peer.port": reply.local_port,
        "haproxy.frontend": "traced",
        "http.request.method": "GET",
        "url.path": "/shop/cart",
        "url.query": "item=42&qty=1",
        "url.scheme": "http",
        "server.address": "127.0.0.1",  # the Host header without its port, as semconv says
        "network.protocol.version": "1.1",
        "user_agent.original": USER_AGENT,
        "haproxy.backend": "next",
        "http.response.status_code": 200,
    }
    assert own_tags(named["Server session"]) == {
        "haproxy.backend": "next",
        "haproxy.server": "next",
    }
    assert own_tags(named["HTTP response"]) == {"http.response.status_code": 200}
    for name in SPAN_NAMES - {ROOT, "Server session", "HTTP response"}:
        assert own_tags(named[name]) == {}, f"{name}: {named[name].tags}"
    for span in spans:
        assert not span.error, describe([span])

    # The origin got the context of "Backend HTTP request", the span that made the call.
    (seen,) = [r for r in t.origin.requests if r.path.startswith("/shop/cart")]
    assert parse_traceparent(seen.headers["traceparent"]) == (
        trace_id,
        named["Backend HTTP request"].span_id,
        "01",
    )
    assert_agent_log_clean(t.agent)


def test_http2_request_is_tagged_as_semconv_says(tracing: TracingFactory) -> None:
    """HAProxy says "2.0" for HTTP/2 and keeps the port in Host; semconv wants "2" and the
    host alone (the reference config converts both). curl speaks HTTP/2 without TLS."""
    h2_port = free_port()
    t = tracing(frontend_lines=[f"bind 127.0.0.1:{h2_port} proto h2"])
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-",
         "-H", "Host: Shop.Example:8443", f"http://127.0.0.1:{h2_port}/h2"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert out.startswith("HTTP/2 200"), out
    trace_id = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.lower().startswith("x-trace-id:"))
    named = assert_reference_tree(wait_trace(t.receiver, trace_id), "hop-1")
    tags = own_tags(named[ROOT])
    assert tags["server.address"] == "shop.example", tags
    assert tags["network.protocol.version"] == "2", tags


def test_chained_hops_form_one_trace(tracing: TracingFactory) -> None:
    t = tracing(hops=2)
    reply, trace_id = t.traced("/chain")
    assert reply.status == 200

    spans = wait_trace(t.receiver, trace_id, 18)
    hop1 = assert_reference_tree([s for s in spans if s.service_name == "hop-1"], "hop-1")
    hop2 = assert_reference_tree([s for s in spans if s.service_name == "hop-2"], "hop-2")
    assert hop1[ROOT].parent_span_id is None, describe(spans)
    assert hop2[ROOT].parent_span_id == hop1["Backend HTTP request"].span_id, describe(spans)
    # The second hop's session is a server span inside the first hop's client span.
    assert hop1["Backend HTTP request"].start_us <= hop2[ROOT].start_us
    assert hop2[ROOT].end_us <= hop1[ROOT].end_us

    (seen,) = t.origin.requests
    assert parse_traceparent(seen.headers["traceparent"]) == (
        trace_id,
        hop2["Backend HTTP request"].span_id,
        "01",
    )


def test_incoming_context_is_continued(tracing: TracingFactory) -> None:
    t = tracing()
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    reply, trace_id = t.traced(
        "/continued",
        {
            "traceparent": f"00-{caller_trace}-{caller_span}-01",
            "tracestate": "vendor=opaque-value",
            "baggage": "tenant=acme,user.id=42,note=a%20b+c",
        },
    )
    assert trace_id == caller_trace

    named = assert_reference_tree(wait_trace(t.receiver, caller_trace), "hop-1")
    assert named[ROOT].parent_span_id == caller_span
    assert named[ROOT].references == []

    (seen,) = t.origin.requests
    assert parse_traceparent(seen.headers["traceparent"]) == (
        caller_trace,
        named["Backend HTTP request"].span_id,
        "01",
    )
    assert seen.headers.get("tracestate") == "vendor=opaque-value"
    baggage = dict(item.strip().split("=", 1) for item in seen.headers["baggage"].split(","))
    # sent on as W3C Baggage encodes it: %20 a space, '+' a plus (not form encoding)
    assert baggage == {"tenant": "acme", "user.id": "42", "note": "a%20b+c"}


def get_with_lines(port: int, path: str, lines: list[tuple[str, str]]) -> str:
    """GET with these header lines, repeated names kept apart (a dict would merge them);
    returns the trace id HAProxy answered with, after checking the 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path)
        for name, value in lines:
            conn.putheader(name, value)
        conn.endheaders()
        reply = conn.getresponse()
        reply.read()
        trace_id = reply.getheader("x-trace-id")
    finally:
        conn.close()
    assert reply.status == 200 and trace_id
    return trace_id


@pytest.mark.parametrize(
    ("lines", "continued", "forwarded"),
    [
        # an all-zero parent id is invalid: a new trace, and the caller's tracestate is not its
        ([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
          ("tracestate", "vendor=old")], False, []),
        # no traceparent at all: a new trace, the tracestate goes too
        ([("tracestate", "vendor=old")], False, []),
        # the trace goes on with the caller's tracestate, even when its last line is empty
        # (W3C trace-context test_tracestate_empty_header; a del-header keyed on the agent's
        # having no tracestate deleted it), sent on as one line
        ([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
          ("tracestate", "foo=1"), ("tracestate", "")], True, ["foo=1"]),
        # split over two lines (W3C test_tracestate_multiple_headers_different_keys): both
        # reach the agent and go on, where req.fhdr alone gave the last line only
        ([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
          ("tracestate", "a=1"), ("tracestate", "b=2")], True, ["a=1,b=2"]),
        # a tracestate the agent cannot parse is not passed on with its trace (black-box run:
        # it was, as the trace went on; W3C lets a vendor discard it)
        ([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
          ("tracestate", "BAD KEY=@@@")], True, []),
        # two traceparents: a new trace (W3C test_traceparent_duplicated), without the tracestate
        ([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
          ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
          ("tracestate", "vendor=old")], False, []),
    ],
    ids=["invalid-traceparent", "no-traceparent", "continued-empty-last-line",
         "continued-two-lines", "invalid-tracestate", "two-traceparents"],
)
def test_a_tracestate_goes_with_the_trace_it_belongs_to(
    tracing: TracingFactory, lines: list[tuple[str, str]], continued: bool, forwarded: list[str]
) -> None:
    """W3C Trace Context: a tracestate belongs to its trace. The reference forwarding lines
    only set what the agent injected, so without their del-header the caller's tracestate
    travelled next to the new traceparent the agent started. The del-header is keyed on the
    agent's having injected no tracestate: that once also deleted a continued trace's when
    the last tracestate line (then the only one the agent saw) was empty; the agent now gets
    the first two lines, and it drops a tracestate it cannot parse, as the earlier rule (the
    trace ids compared) did not."""
    t = tracing()
    trace_id = get_with_lines(t.port, "/tracestate", lines)
    assert (trace_id == "4bf92f3577b34da6a3ce929d0e0e4736") is continued
    assert_reference_tree(wait_trace(t.receiver, trace_id), "hop-1")
    (seen,) = t.origin.requests
    assert parse_traceparent(seen.headers["traceparent"])[0] == trace_id
    assert [v for k, v in seen.lines if k == "tracestate"] == forwarded, seen.lines


def test_baggage_split_over_two_lines_goes_on_whole(tracing: TracingFactory) -> None:
    """W3C Baggage may come over several lines: the agent read the last only (req.fhdr), and
    the backend's set-header then replaced both with it, so the service lost the first line's
    members (black-box run)."""
    t = tracing()
    trace_id = get_with_lines(t.port, "/baggage", [("baggage", "k1=v1"),
                                                   ("baggage", "k2=v2,k3=v3")])
    assert_reference_tree(wait_trace(t.receiver, trace_id), "hop-1")
    (seen,) = t.origin.requests
    lines = [v for k, v in seen.lines if k == "baggage"]
    assert len(lines) == 1, seen.lines
    assert dict(item.strip().split("=", 1) for item in lines[0].split(",")) == {
        "k1": "v1", "k2": "v2", "k3": "v3"}


def test_server_errors_mark_the_response_and_session(tracing: TracingFactory) -> None:
    t = tracing()
    bad, bad_trace = t.traced("/status/503")
    good, good_trace = t.traced("/status/200")
    assert (bad.status, good.status) == (503, 200)

    failed = assert_reference_tree(wait_trace(t.receiver, bad_trace), "hop-1")
    for name in (ROOT, "HTTP response"):
        span = failed[name]
        assert span.tags.get("error") is True, describe([span])
        assert span.tags.get("otel.status_code") == "ERROR", describe([span])
        assert span.tags.get("http.response.status_code") == 503
    for name in SPAN_NAMES - {ROOT, "HTTP response"}:
        assert not failed[name].error, describe([failed[name]])

    fine = assert_reference_tree(wait_trace(t.receiver, good_trace), "hop-1")
    for span in fine.values():
        assert not span.error and "otel.status_code" not in span.tags, describe([span])
    assert fine["HTTP response"].tags["http.response.status_code"] == 200


def test_denied_request_spans_end_by_ttl(tracing: TracingFactory) -> None:
    t = tracing(
        agent_ini="[tracing]\nsession_ttl = 1s\n",
        frontend_lines=["http-request deny if { path_beg /denied }"],
    )
    _, complete_trace = t.traced("/allowed")
    denied = t.get("/denied/area")
    assert denied.status == 403
    # No backend, so no inject: the only way to find this trace is its session's spans.
    assert "x-trace-id" not in denied.headers

    def is_denied(span: ReceivedSpan) -> bool:
        return span.trace_id != complete_trace

    started = ("HAProxy session", "Client session", "Frontend TCP request", "Frontend HTTP request")
    spans = wait_spans(t.receiver, is_denied, len(started), timeout=10, what="denied spans")
    # One more TTL period (and a few expiry ticks) must not bring any of them again.
    time.sleep(1.5)
    spans = [s for s in t.receiver.spans if is_denied(s)]
    dump = describe(spans)
    named = by_name(spans)
    assert sorted(named) == sorted(started), dump
    assert len({s.trace_id for s in spans}) == 1, dump
    assert named[ROOT].tags.get("url.path") == "/denied/area", dump
    for name in started:
        span = named[name]
        assert span.service_name == "hop-1"
        parent = PARENT.get(name)
        assert span.parent_span_id == (named[parent].span_id if parent else None), dump
        if name == "Frontend TCP request":
            # Finished by the on-frontend-http-request message, before the deny.
            assert not span.error and "haproxy.span.incomplete" not in span.tags, dump
        else:
            assert span.tags.get("haproxy.span.incomplete") is True, dump
            assert span.tags.get("otel.status_code") == "ERROR", dump
            assert "(ttl)" in span.tags.get("otel.status_description", ""), dump
            assert span.error, dump
    # Ended at the session's last event (the deny came microseconds after it), not at the
    # expiry a TTL later: a deny must not show as a request that lasted the whole TTL.
    assert named[ROOT].duration_us < 1_000_000, dump

    # The finished request next to it was not touched by the expiry.
    complete = assert_reference_tree(
        [s for s in t.receiver.spans if s.trace_id == complete_trace], "hop-1"
    )
    assert not any("haproxy.span.incomplete" in s.tags for s in complete.values())


def test_the_answered_group_ends_a_denied_request_at_once(tracing: TracingFactory) -> None:
    """The reference config's ``answered`` group, sent right before a deny: the trace is
    complete at once, rather than cut by the TTL (an hour here) holding a session slot."""
    t = tracing(
        agent_ini="[tracing]\nsession_ttl = 1h\n",
        frontend_lines=[
            "acl blocked path_beg /denied",
            "http-request send-spoe-group trace answered if blocked",
            "http-request deny if blocked",
        ],
    )
    assert t.get("/denied/area").status == 403
    started = ("HAProxy session", "Client session", "Frontend TCP request", "Frontend HTTP request")
    spans = wait_spans(t.receiver, lambda s: True, len(started), timeout=10, what="denied spans")
    dump = describe(spans)
    named = by_name(spans)
    assert sorted(named) == sorted(started) and len({s.trace_id for s in spans}) == 1, dump
    for span in spans:
        assert not span.error and "haproxy.span.incomplete" not in span.tags, dump
    assert [fields.get("event") for _, fields in named[ROOT].logs] == ["answered by HAProxy"], dump
    assert_agent_log_clean(t.agent)


def test_a_listen_section_gives_one_tree(
    haproxy: Callable[..., HAProxy],
    spoe_agent: Callable[..., AgentProcess],
    backend: Backend,
    receiver: JaegerReceiver,
) -> None:
    """A listen section runs the backend's TCP rules before the frontend's HTTP ones, so
    "Backend TCP request" follows from a span not started yet: it was a second root of the
    trace (black-box run). It now hangs under HAProxy session, and the trace is one tree."""
    agent = spoe_agent(app=None, env=agent_env(receiver))
    port = free_port()
    hap = haproxy(f"""\
global
    setenv OTEL_SERVICE_NAME listen-hop

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

listen traced
    bind 127.0.0.1:{port}
    unique-id-format %[uuid()]
    filter spoe engine trace config {REFERENCE_SPOE_CFG}
    server origin {backend.address}

{agents_backend(agent)}""", name="listen")
    hap.wait_server_status("spoe-agents", "agent1", "UP", timeout=15)
    assert get(port, "/listen").status == 200
    spans = wait_spans(receiver, lambda s: True, len(SPAN_NAMES), timeout=10, what="9 spans")
    dump = describe(spans)
    named = by_name(spans)
    assert set(named) == SPAN_NAMES and len({s.trace_id for s in spans}) == 1, dump
    ids = {s.span_id for s in spans}
    roots = [s.operation_name for s in spans if s.parent_span_id is None]
    assert roots == [ROOT], dump
    assert all(s.parent_span_id in ids for s in spans if s.operation_name != ROOT), dump
    assert named["Backend TCP request"].parent_span_id == named[ROOT].span_id, dump


def test_cache_hits_are_answered_and_traced(
    haproxy: Callable[..., HAProxy],
    spoe_agent: Callable[..., AgentProcess],
    receiver: JaegerReceiver,
) -> None:
    """HAProxy 3.2 answers a cache hit with a 502 when an SPOE message is bound to
    on-server-session or on-tcp-response (a hit has no server: found by a black-box run,
    HAProxy's own doing, even with no agent up); the reference config sends those two only
    when a server was chosen. 2.6 was not affected. The hit's trace is still complete."""
    agent = spoe_agent(app=None, env=agent_env(receiver))
    port, origin = free_port(), free_port()
    hap = haproxy(f"""\
global
    setenv OTEL_SERVICE_NAME cache-hop

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

cache responses
    total-max-size 4
    max-age 60

frontend traced
    bind 127.0.0.1:{port}
    unique-id-format %[uuid()]
    filter spoe engine trace config {REFERENCE_SPOE_CFG}
    default_backend cached

backend cached
    http-request cache-use responses
    http-response cache-store responses
    server origin 127.0.0.1:{origin}

frontend origin
    bind 127.0.0.1:{origin}
    http-request return status 200 content-type text/plain string ok hdr Cache-Control max-age=60

{agents_backend(agent)}""", name="cache")
    hap.wait_server_status("spoe-agents", "agent1", "UP", timeout=15)
    assert [get(port, "/cached").status for _ in range(3)] == [200, 200, 200]
    roots = wait_spans(receiver, lambda s: s.operation_name == ROOT, 3, timeout=10,
                       what="three complete sessions")
    spans = receiver.spans
    dump = describe(spans)
    assert len(roots) == 3 and len({s.trace_id for s in roots}) == 3, dump
    for root in roots:
        assert not root.error and "haproxy.span.incomplete" not in root.tags, dump
    traces = [{s.operation_name for s in spans if s.trace_id == r.trace_id} for r in roots]
    assert SPAN_NAMES in traces, dump  # the miss went to the origin: all nine spans
    assert_agent_log_clean(agent)


def test_a_thousand_concurrent_requests_lose_no_span(tracing: TracingFactory) -> None:
    t = tracing()
    total, concurrency = 1000, 32
    replies: list[Reply] = []
    lock = threading.Lock()

    def worker(share: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=30)
        try:
            for i in range(share):
                reply = get(t.port, f"/load/{share}/{i}", conn=conn)
                with lock:
                    replies.append(reply)
        finally:
            conn.close()

    shares = [
        total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)
    ]
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, share) for share in shares]:
            future.result()

    assert len(replies) == total
    assert Counter(r.status for r in replies) == {200: total}
    errors = Counter(r.headers["x-trace-error"] for r in replies if "x-trace-error" in r.headers)
    assert not errors, f"HAProxy's SPOE error variable was set: {errors}"
    trace_ids = {r.headers["x-trace-id"] for r in replies}
    assert len(trace_ids) == total

    wait_spans(t.receiver, lambda s: True, 9 * total, timeout=60, what="spans in all")
    # Anything still coming (a duplicate) would arrive before a later request's spans.
    _, barrier = t.traced("/barrier")
    wait_trace(t.receiver, barrier)
    spans = [s for s in t.receiver.spans if s.trace_id != barrier]
    assert len(spans) == 9 * total, f"{len(spans)} spans"
    assert len({s.span_id for s in spans}) == len(spans), "duplicate span ids"
    traces = t.receiver.traces()
    traces.pop(barrier)
    assert set(traces) == trace_ids
    sizes = Counter(len(v) for v in traces.values())
    assert sizes == {9: total}, sizes
    for trace in traces.values():
        named = assert_reference_tree(trace, "hop-1")
        assert named[ROOT].parent_span_id is None, describe(trace)
    # Each trace is the one HAProxy's response announced and the origin was given.
    injected = {parse_traceparent(r.headers["traceparent"])[0] for r in t.origin.requests}
    assert injected == trace_ids | {barrier}
    assert_agent_log_clean(t.agent)


B3_HEADERS = [
    ("X-B3-TraceId", "x_b3_traceid"),
    ("X-B3-SpanId", "x_b3_spanid"),
    ("X-B3-Sampled", "x_b3_sampled"),
]


def b3_spoe_config() -> str:
    """The reference config with the frontend-http-request message also reading B3 headers."""
    text = REFERENCE_SPOE_CFG.read_text()
    anchor = "    args baggage=req.fhdr(baggage,1) baggage=req.fhdr(baggage,2)\n"
    assert anchor in text, "the reference spoe.cfg changed: update this test's variant"
    b3 = (
        "    args x-b3-traceid=req.fhdr(x-b3-traceid) x-b3-spanid=req.fhdr(x-b3-spanid)\n"
        "    args x-b3-sampled=req.fhdr(x-b3-sampled)\n"
    )
    return text.replace(anchor, anchor + b3)


#: The README's lines for B3 ("Other propagation formats"): the spoe.cfg arguments every
#: B3 form needs (OpenTelemetry's B3 propagators read the single header first, whichever they
#: write) and, in the backend, the forms a client sent dropped before HAProxy's are set.
B3_ARGS = (
    "    args b3=req.fhdr(b3) x-b3-traceid=req.fhdr(x-b3-traceid) x-b3-spanid=req.fhdr(x-b3-spanid)\n"
    "    args x-b3-sampled=req.fhdr(x-b3-sampled) x-b3-flags=req.fhdr(x-b3-flags)\n"
)
B3_MULTI_BACKEND = [
    f"http-request del-header {header} if {{ var(txn.trace.x_b3_traceid) -m found }}"
    for header in ("b3", "x-b3-parentspanid", "x-b3-flags")
]


def test_b3_multi_header_propagation(tracing: TracingFactory) -> None:
    t = tracing(
        otel={"OTEL_PROPAGATORS": "b3multi"}, spoe_text=b3_spoe_config(), forward_headers=B3_HEADERS
    )
    caller_trace, caller_span = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
    reply = t.get(
        "/b3",
        {"X-B3-TraceId": caller_trace, "X-B3-SpanId": caller_span, "X-B3-Sampled": "1"},
    )
    assert reply.status == 200
    assert "x-trace-error" not in reply.headers
    # No W3C propagator configured: nothing injected as traceparent.
    assert "x-trace-id" not in reply.headers

    named = assert_reference_tree(wait_trace(t.receiver, caller_trace), "hop-1")
    assert named[ROOT].parent_span_id == caller_span

    (seen,) = t.origin.requests
    assert "traceparent" not in seen.headers
    assert seen.headers.get("x-b3-traceid") == caller_trace
    assert seen.headers.get("x-b3-spanid") == named["Backend HTTP request"].span_id
    assert seen.headers.get("x-b3-sampled") == "1"
    assert_agent_log_clean(t.agent)


def test_a_client_b3_header_joins_and_is_replaced_at_every_hop(tracing: TracingFactory) -> None:
    """A client's single ``b3`` header with ``b3multi`` on two hops: the first hop joins it,
    and neither the second hop nor the service reads it again (they read HAProxy's
    ``x-b3-*``): one trace, each hop under the previous hop's CLIENT span. Without the
    README's ``del-header`` lines the stale ``b3``, which B3 readers prefer, made the second
    hop and the service join the client's span."""
    text = REFERENCE_SPOE_CFG.read_text()
    anchor = "    args baggage=req.fhdr(baggage,1) baggage=req.fhdr(baggage,2)\n"
    assert anchor in text, "the reference spoe.cfg changed: update this test's variant"
    t = tracing(
        hops=2, otel={"OTEL_PROPAGATORS": "b3multi"}, spoe_text=text.replace(anchor, anchor + B3_ARGS),
        forward_headers=B3_HEADERS, backend_lines=B3_MULTI_BACKEND,
    )
    caller_trace, caller_span = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
    reply = t.get("/b3-single", {"b3": f"{caller_trace}-{caller_span}-1"})
    assert reply.status == 200
    assert "x-trace-error" not in reply.headers

    spans = wait_trace(t.receiver, caller_trace, 18)
    hop1 = assert_reference_tree([s for s in spans if s.service_name == "hop-1"], "hop-1")
    hop2 = assert_reference_tree([s for s in spans if s.service_name == "hop-2"], "hop-2")
    assert hop1[ROOT].parent_span_id == caller_span, describe(spans)
    assert hop2[ROOT].parent_span_id == hop1["Backend HTTP request"].span_id, describe(spans)

    (seen,) = t.origin.requests
    assert "b3" not in seen.headers, seen.headers
    assert seen.headers.get("x-b3-traceid") == caller_trace
    assert seen.headers.get("x-b3-spanid") == hop2["Backend HTTP request"].span_id
    assert seen.headers.get("x-b3-sampled") == "1"
    assert_agent_log_clean(t.agent)


def _readme_block(first_line: str) -> str:
    """The README's code block that starts with ``first_line``, as a user copies it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return first_line + readme.split(first_line, 1)[1].split("```", 1)[0]


def test_the_readmes_timer_tags_show_the_time_no_span_holds(
    tracing: TracingFactory, haproxy_version: str
) -> None:
    """Time HAProxy spent before its first event (receiving the request headers) is in no
    span (black-box run: a slow client's 254 ms did not show). The README's message puts
    HAProxy 3.2's timers on the root span; 2.6 has no such fetches and refuses it, as the
    README says."""
    text = REFERENCE_SPOE_CFG.read_text()
    anchor = "    groups   answered\n"
    assert anchor in text, "the reference spoe.cfg changed: update this test's variant"
    spoe_text = (text.replace(anchor, "    messages trace-request-timers trace-server-timers\n"
                              + anchor)
                 + "\n" + _readme_block("spoe-message trace-request-timers\n"))
    if haproxy_version == "2.6":
        with pytest.raises(HAProxyConfigError, match="unknown fetch method"):
            tracing(spoe_text=spoe_text)
        return
    t = tracing(spoe_text=spoe_text)
    with socket.create_connection(("127.0.0.1", t.port), timeout=15) as sock:
        sock.sendall(b"GET /slow-client HTTP/1.1\r\nHost: shop\r\n")
        time.sleep(0.3)  # the rest of the headers comes late, as from a slow client
        sock.sendall(b"Connection: close\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
    assert response.status == 200
    trace_id = response.getheader("x-trace-id")
    assert trace_id, response.getheaders()
    named = assert_reference_tree(wait_trace(t.receiver, trace_id), "hop-1")
    tags = own_tags(named[ROOT])
    assert tags["haproxy.timer.request_headers_ms"] >= 300, tags
    assert named[ROOT].duration_us < 300_000, describe(named.values())  # the span missed it
    assert tags["haproxy.timer.queue_ms"] == 0 and tags["haproxy.timer.connect_ms"] >= 0, tags
    assert tags["haproxy.retries"] == 0 and tags["haproxy.redispatched"] is False, tags
    assert_agent_log_clean(t.agent)
