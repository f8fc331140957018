"""The session registry: the span tree HAProxy's events build, trace context, sampling, expiry."""

from __future__ import annotations

import pickle
import time
import timeit
import tracemalloc
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.jaeger.thrift.gen.jaeger import Collector as jaeger
from opentelemetry.exporter.jaeger.thrift.translate import ThriftTranslator, Translate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import SpanKind
from opentelemetry.trace.status import StatusCode
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.transport.TTransport import TMemoryBuffer

from benchmarks.session_memory import measure_marginal
from spoe_agent.protocol.types import Message, Scope, SetVar
from spoe_agent.tracing.language import parse_message
from spoe_agent.tracing.propagation import build_propagator
from spoe_agent.tracing.registry import INCOMPLETE_ATTRIBUTE, SessionRegistry
from tests.support.examples import examples

T0 = 1_700_000_000_000_000_000
REMOTE_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
REMOTE_SPAN = 0xB7AD6B7169203331
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class FakeClock:
    def __init__(self, t: int = T0) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * 1e9)


class SeqIds(IdGenerator):
    """Deterministic ids: span ids 1, 2, 3...; trace ids 0x100..01, 0x100..02..."""

    def __init__(self) -> None:
        self.span = 0
        self.trace = 0

    def generate_span_id(self) -> int:
        self.span += 1
        return self.span

    def generate_trace_id(self) -> int:
        self.trace += 1
        return (1 << 120) + self.trace


class Harness:
    def __init__(
        self,
        propagators: str = "tracecontext,baggage",
        sampler: Sampler = ALWAYS_ON,
        **kwargs: Any,
    ) -> None:
        self.spans: list[ReadableSpan] = []
        self.clock = FakeClock()
        self.ids = SeqIds()
        self.resources: list[str] = []
        self.reg = SessionRegistry(
            self.spans.append,
            propagator=build_propagator(propagators),
            sampler=sampler,
            id_generator=self.ids,
            clock_ns=self.clock,
            resource_for_service=self._resource,
            default_service="haproxy",
            **kwargs,
        )

    def _resource(self, service: str) -> Resource:
        self.resources.append(service)
        return Resource.create({"service.name": service})

    def send(self, *args: tuple[str, Any]) -> list[SetVar]:
        """One message, as HAProxy would send it."""
        return self.notify([Message("m", list(args))])

    def notify(self, messages: Iterable[Message]) -> list[SetVar]:
        out: list[SetVar] = []
        for message in messages:
            command = parse_message(message, self.reg.stats)
            if command is not None:
                out.extend(self.reg.apply(command))
        return out

    def by_name(self) -> dict[str, ReadableSpan]:
        named = {span.name: span for span in self.spans}
        assert len(named) == len(self.spans), "a span name was emitted twice"
        return named


def m(name: str, *args: tuple[str, Any]) -> Message:
    return Message(name, list(args))


def reference_notifies(
    uid: str,
    *,
    headers: Sequence[tuple[str, Any]] = (("traceparent", None), ("tracestate", None)),
    status: int = 200,
    ts: int | None = None,
) -> list[list[Message]]:
    """The 8 NOTIFYs HAProxy sends for one HTTP request with the reference configuration.

    With ``ts`` (microseconds), event i carries ``ts + i``.
    """

    def t(i: int) -> tuple[tuple[str, Any], ...]:
        return () if ts is None else (("ts", ts + i),)

    ident = ("id", uid)
    notifies = [
        [
            m(
                "opentracing:client_session_start",
                ident,
                *t(0),
                ("span", "HAProxy session"),
                ("kind", "server"),
                ("baggage", "haproxy_id"),
                ("", uid),
                ("span", "Client session"),
                ("child-of", "HAProxy session"),
            )
        ],
        [
            m(
                "opentracing:frontend_tcp_request",
                ident,
                *t(1),
                ("span", "Frontend TCP request"),
                ("child-of", "Client session"),
            )
        ],
        [
            m(
                "opentracing:frontend_http_request",
                ident,
                *t(2),
                ("span", "Frontend HTTP request"),
                ("follows-from", "Frontend TCP request"),
                ("tag", "http.method"),
                ("", "GET"),
                ("tag", "http.version"),
                ("", "HTTP/"),
                ("", "1.1"),
                ("finish", "Frontend TCP request"),
                *headers,
            )
        ],
        [
            m(
                "opentracing:backend_tcp_request",
                ident,
                *t(3),
                ("span", "Backend TCP request"),
                ("follows-from", "Frontend HTTP request"),
                ("finish", "Frontend HTTP request"),
            )
        ],
        [
            m(
                "opentracing:backend_http_request",
                ident,
                *t(4),
                ("span", "Backend HTTP request"),
                ("kind", "client"),
                ("follows-from", "Backend TCP request"),
                ("finish", "Backend TCP request"),
                ("inject", "Backend HTTP request"),
            )
        ],
        [
            m(
                "opentracing:server_session_start",
                ident,
                *t(5),
                ("span", "Server session"),
                ("child-of", "HAProxy session"),
                ("finish", "Backend HTTP request"),
            )
        ],
        [
            m(
                "opentracing:tcp_response",
                ident,
                *t(6),
                ("span", "TCP response"),
                ("child-of", "Server session"),
            )
        ],
    ]
    last = [
        m(
            "opentracing:http_response",
            ident,
            *t(7),
            ("span", "HTTP response"),
            ("follows-from", "TCP response"),
            ("tag", "http.status_code"),
            ("", status),
            ("finish", "TCP response"),
        )
    ]
    if status >= 500:  # the ACL on http_response-error
        last.append(
            m(
                "opentracing:http_response-error",
                ident,
                ("span", "HTTP response"),
                ("tag", "error"),
                ("", True),
            )
        )
    last.append(m("opentracing:server_session_end", ident, *t(7), ("finish", "HTTP response")))
    last.append(m("opentracing:client_session_end", ident, *t(7), ("finish", "*")))
    notifies.append(last)
    return notifies


def run_reference(h: Harness, uid: str = "uid-1", **kwargs: Any) -> list[SetVar]:
    out: list[SetVar] = []
    for notify in reference_notifies(uid, **kwargs):
        out.extend(h.notify(notify))
    return out


REFERENCE_PARENTS = {
    "HAProxy session": None,
    "Client session": "HAProxy session",
    "Frontend TCP request": "Client session",
    "Frontend HTTP request": "Frontend TCP request",
    "Backend TCP request": "Frontend HTTP request",
    "Backend HTTP request": "Backend TCP request",
    "Server session": "HAProxy session",
    "TCP response": "Server session",
    "HTTP response": "TCP response",
}
FOLLOWS = {"Frontend HTTP request", "Backend TCP request", "Backend HTTP request", "HTTP response"}


def check_reference_tree(
    h: Harness, *, remote_parent: bool, error: bool
) -> dict[str, ReadableSpan]:
    spans = h.by_name()
    assert set(spans) == set(REFERENCE_PARENTS)
    trace_ids = {span.context.trace_id for span in spans.values()}
    assert len(trace_ids) == 1
    (trace_id,) = trace_ids
    assert len({span.context.span_id for span in spans.values()}) == 9
    for name, parent_name in REFERENCE_PARENTS.items():
        span = spans[name]
        assert span.context.is_valid and span.context.trace_flags.sampled
        if parent_name is None:
            if remote_parent:
                assert span.parent is not None and span.parent.is_remote
                assert span.parent.trace_id == REMOTE_TRACE
                assert span.parent.span_id == REMOTE_SPAN
            else:
                assert span.parent is None
        else:
            assert span.parent == spans[parent_name].context, name
            assert span.parent.trace_id == trace_id
        if name in FOLLOWS:
            assert [link.context for link in span.links] == [spans[parent_name].context]
        else:
            assert span.links == ()
        expected_kind = {
            "HAProxy session": SpanKind.SERVER,
            "Backend HTTP request": SpanKind.CLIENT,
        }.get(name, SpanKind.INTERNAL)
        assert span.kind == expected_kind, name
        expected_status = (
            StatusCode.ERROR if error and name == "HTTP response" else StatusCode.UNSET
        )
        assert span.status.status_code == expected_status, name
        assert INCOMPLETE_ATTRIBUTE not in span.attributes
        assert span.start_time <= span.end_time
        assert span.instrumentation_scope.name == "spoe_agent"
        assert span.resource.attributes["service.name"] == "haproxy"
    assert dict(spans["Frontend HTTP request"].attributes) == {
        "http.method": "GET",
        "http.version": "HTTP/1.1",
    }
    assert spans["HTTP response"].attributes["http.status_code"] == (503 if error else 200)
    return spans


def vars_of(out: list[SetVar]) -> dict[str, Any]:
    assert all(action.scope == Scope.TXN for action in out)
    return {action.name: action.value for action in out}


# -- the reference tree -------------------------------------------------------------------------


def test_reference_tree_without_incoming_context() -> None:
    h = Harness()
    out = run_reference(h)
    spans = check_reference_tree(h, remote_parent=False, error=False)
    assert len(h.reg) == 0
    injected = vars_of(out)
    backend = spans["Backend HTTP request"].context
    assert injected["traceparent"] == f"00-{backend.trace_id:032x}-{backend.span_id:016x}-01"
    assert injected["baggage"] == "haproxy_id=uid-1"
    assert h.reg.stats["spans_emitted"] == 9
    assert h.reg.stats["sessions_finished"] == 1


def test_reference_tree_with_incoming_context_and_5xx() -> None:
    h = Harness()
    run_reference(
        h, headers=[("traceparent", TRACEPARENT), ("tracestate", "congo=t61rcWkgMzE")], status=503
    )
    spans = check_reference_tree(h, remote_parent=True, error=True)
    assert spans["HAProxy session"].context.trace_id == REMOTE_TRACE
    assert "error" not in spans["HTTP response"].attributes  # the status says it
    assert spans["HTTP response"].status.status_code is StatusCode.ERROR
    assert spans["HAProxy session"].context.trace_state.get("congo") == "t61rcWkgMzE"


def test_reference_tree_timestamps_from_ts() -> None:
    h = Harness()
    base = T0 // 1000  # µs, as HAProxy's date(0,us) sends them
    run_reference(h, ts=base)
    spans = h.by_name()
    us = 1000  # ns
    assert spans["HAProxy session"].start_time == base * us
    assert spans["HAProxy session"].end_time == (base + 7) * us
    assert spans["Frontend TCP request"].start_time == (base + 1) * us
    assert spans["Frontend TCP request"].end_time == (base + 2) * us
    assert spans["Backend HTTP request"].start_time == (base + 4) * us
    assert spans["Backend HTTP request"].end_time == (base + 5) * us


@pytest.mark.parametrize("ts", [T0 // 10**9, T0 // 10**6, T0 // 1000 * 1000, T0])
def test_a_ts_far_from_the_clock_is_replaced_by_the_arrival_time(ts: int) -> None:
    """Seconds or milliseconds where microseconds are due put spans in 1970; a date past what
    an exporter encodes (OTLP's uint64 ns) made it fail the whole batch, other traces too."""
    h = Harness()
    h.send(("id", "s"), ("ts", ts), ("span", "a"), ("finish", "*"))
    (span,) = h.spans
    assert span.start_time == span.end_time == T0
    assert h.reg.stats["bad_ts"] == 1


def test_spans_before_the_context_wait_and_later_spans_are_emitted_as_they_end() -> None:
    h = Harness()
    notifies = reference_notifies("u", headers=[("traceparent", TRACEPARENT)])
    h.notify(notifies[0])
    h.notify(notifies[1])
    h.send(("id", "u"), ("span", "early"), ("finish", "early"))
    assert h.spans == []  # the trace id is not known yet
    h.notify(notifies[2])  # headers arrive: "early" and "Frontend TCP request" go out
    assert sorted(s.name for s in h.spans) == ["Frontend TCP request", "early"]
    assert all(s.context.trace_id == REMOTE_TRACE for s in h.spans)
    h.notify(notifies[3])
    assert h.spans[-1].name == "Frontend HTTP request"


def test_emitted_spans_translate_and_encode_for_jaeger() -> None:
    h = Harness()
    notifies = reference_notifies("u", status=503)
    notifies[2].append(
        m("log", ("id", "u"), ("span", "Frontend HTTP request"), ("log", "event"), ("", "x\udcffy"))
    )
    for notify in notifies:
        h.notify(notify)
    translated = Translate(h.spans)._translate(ThriftTranslator(max_tag_value_length=None))
    batch = jaeger.Batch(process=jaeger.Process(serviceName="haproxy"), spans=translated)
    batch.write(TCompactProtocol(TMemoryBuffer()))
    by_name = {span.operationName: span for span in translated}
    refs = by_name["Backend HTTP request"].references
    assert [ref.refType for ref in refs] == [jaeger.SpanRefType.FOLLOWS_FROM]
    (log,) = by_name["Frontend HTTP request"].logs
    assert any(tag.key == "event" and tag.vStr == "x\ufffdy" for tag in log.fields)


# -- keywords -----------------------------------------------------------------------------------


def test_select_existing_span_and_restart_an_ended_name() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("tag", "one"), ("", 1))
    h.send(("id", "s"), ("span", "a"), ("tag", "two"), ("", 2), ("finish", "a"))
    h.send(("id", "s"), ("span", "a"), ("tag", "three"), ("", 3), ("finish", "*"))
    first, second = h.spans
    assert dict(first.attributes) == {"one": 1, "two": 2}
    assert dict(second.attributes) == {"three": 3}
    assert first.context.span_id != second.context.span_id


def test_child_of_unknown_parent_is_a_root_under_the_remote_context() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "orphan"), ("child-of", "nobody"), ("traceparent", TRACEPARENT))
    h.send(("id", "s"), ("finish", "*"))
    (span,) = h.spans
    assert span.parent is not None and span.parent.span_id == REMOTE_SPAN
    assert h.reg.stats["unknown_parent"] == 1


def test_a_span_whose_parent_is_unknown_hangs_under_the_sessions_first_span() -> None:
    """In a listen section HAProxy runs the backend's TCP rules before the frontend's HTTP
    ones: "Backend TCP request" follows from a span not started yet. It used to become a
    second root of the trace (black-box run); now it hangs under the session's first span."""
    h = Harness()
    h.send(("id", "s"), ("span", "HAProxy session"), ("span", "Frontend TCP request"),
           ("child-of", "HAProxy session"))
    h.send(("id", "s"), ("span", "Backend TCP request"), ("follows-from", "Frontend HTTP request"))
    h.send(("id", "s"), ("span", "late"), ("child-of", "Frontend TCP request"),
           ("child-of", "nobody"))  # an unknown parent after a known one changes nothing
    h.send(("id", "s"), ("finish", "*"))
    spans = h.by_name()
    root = spans["HAProxy session"]
    assert root.parent is None
    assert spans["Backend TCP request"].parent == root.context
    assert not spans["Backend TCP request"].links  # no link to a span that does not exist
    assert spans["late"].parent == spans["Frontend TCP request"].context
    assert h.reg.stats["unknown_parent"] == 2


def test_a_parent_line_that_would_close_a_loop_is_ignored_and_counted() -> None:
    """m1: B child-of A; m2: A child-of B. Taken as written, A and B were each other's parent
    and the trace had no root (black-box run, nothing counted or logged); the first line
    stands and the second is counted as ``parent_loop``, as is a span made its own grandparent."""
    h = Harness()
    h.send(("id", "s"), ("span", "A"), ("span", "B"), ("child-of", "A"),
           ("span", "C"), ("follows-from", "B"))
    h.send(("id", "s"), ("span", "A"), ("child-of", "B"), ("span", "A"), ("follows-from", "C"))
    h.send(("id", "s"), ("finish", "*"))
    spans = h.by_name()
    assert spans["A"].parent is None
    assert spans["B"].parent == spans["A"].context
    assert spans["C"].parent == spans["B"].context
    assert not spans["A"].links
    assert h.reg.stats["parent_loop"] == 2
    assert h.reg.stats["unknown_parent"] == 0


def test_root_is_child_of_context_extracted_in_a_later_message() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "root"))
    h.send(("id", "s"), ("span", "child"), ("child-of", "root"))
    h.send(("id", "s"), ("traceparent", TRACEPARENT))
    h.send(("id", "s"), ("finish", "*"))
    spans = h.by_name()
    assert spans["root"].parent.span_id == REMOTE_SPAN
    assert spans["child"].parent == spans["root"].context
    assert spans["child"].context.trace_id == REMOTE_TRACE


def test_finish_star_ends_everything_children_first_and_the_session() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("span", "b"), ("child-of", "a"), ("span", "c"))
    h.send(("id", "s"), ("finish", "*"))
    assert [s.name for s in h.spans] == ["c", "b", "a"]
    assert len(h.reg) == 0
    # A late message for the ended session does not resurrect it.
    h.send(("id", "s"), ("finish", "a"))
    assert len(h.reg) == 0
    assert h.reg.stats["unknown_session"] == 1


def test_what_a_message_says_after_finish_star_is_applied_before_the_session_ends() -> None:
    """A black-box user wrote ``finish=str("*")`` mid-message: the span and tag after it were
    dropped without a word. The whole message now applies, then everything ends."""
    h = Harness()
    h.send(("id", "s"), ("span", "root"))
    h.send(("id", "s"), ("span", "root"), ("finish", "*"), ("span", "after"),
           ("child-of", "root"), ("tag", "k"), ("", 1), ("span", "root"), ("tag", "last"),
           ("", True))
    spans = {s.name: s for s in h.spans}
    assert set(spans) == {"root", "after"}
    assert spans["after"].parent.span_id == spans["root"].context.span_id
    assert dict(spans["after"].attributes) == {"k": 1}
    assert dict(spans["root"].attributes) == {"last": True}
    assert spans["after"].status.status_code is StatusCode.UNSET  # a regular end
    assert len(h.reg) == 0 and h.reg.stats["sessions_finished"] == 1


def test_finish_unknown_or_ended_span_is_counted() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("finish", "a"), ("finish", "a"), ("finish", "zz"))
    assert h.reg.stats["unknown_span"] == 2


def test_ops_without_selected_span_are_counted() -> None:
    h = Harness()
    h.send(("id", "s"), ("tag", "k"), ("", 1), ("span", "a"))
    h.send(("id", "s"), ("finish", "*"))
    (span,) = h.spans
    assert dict(span.attributes) == {}
    assert h.reg.stats["no_span_selected"] == 1


def test_changes_to_a_span_already_emitted_are_counted_not_applied() -> None:
    """Once the trace context is fixed an ended span is emitted at once: a tag or a parent
    given to it afterwards (same message) is counted, never half-applied."""
    h = Harness()
    h.send(("id", "s"), ("traceparent", None), ("span", "a"), ("finish", "a"),
           ("tag", "k"), ("", 1), ("child-of", "b"), ("span", "b"))
    h.send(("id", "s"), ("finish", "*"))
    spans = h.by_name()
    assert dict(spans["a"].attributes or {}) == {} and spans["a"].parent is None
    assert h.reg.stats["span_ended"] == 2


def test_clock_is_used_without_ts() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"))
    h.clock.advance(0.25)
    h.send(("id", "s"), ("finish", "*"))
    (span,) = h.spans
    assert (span.start_time, span.end_time) == (T0, T0 + 250_000_000)


@pytest.mark.parametrize("name", [None, ""])
def test_an_empty_span_name_selects_no_span(name: Any) -> None:
    """What follows it was meant for another span: it must not land on the previous one."""
    h = Harness()
    h.send(("id", "a"), ("span", "A"), ("tag", "a.tag"), ("", "1"),
           ("span", name), ("tag", "meant.for.another"), ("", "2"), ("kind", "client"),
           ("finish", "*"))
    (span,) = h.spans
    assert dict(span.attributes) == {"a.tag": "1"} and span.kind == SpanKind.INTERNAL
    assert h.reg.stats["no_span_selected"] == 2
    assert h.reg.stats["spans_started"] == 1


def test_end_before_start_is_clamped() -> None:
    h = Harness()
    h.send(("id", "s"), ("ts", T0 // 1000 + 2_000_000), ("span", "a"))
    h.send(("id", "s"), ("ts", T0 // 1000 + 1_000_000), ("finish", "*"))
    (span,) = h.spans
    assert span.end_time == span.start_time == T0 + 2_000_000_000


def test_service_per_session_and_default() -> None:
    h = Harness()
    h.send(("id", "s1"), ("service", "edge"), ("span", "a"), ("finish", "*"))
    h.send(("id", "s2"), ("span", "b"), ("finish", "*"))
    h.send(("id", "s3"), ("service", "edge"), ("span", "c"), ("finish", "*"))
    names = {s.name: s.resource.attributes["service.name"] for s in h.spans}
    assert names == {"a": "edge", "b": "haproxy", "c": "edge"}
    assert h.resources == ["edge", "haproxy"]  # cached per service


def test_kind() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("kind", "PRODUCER"), ("span", "b"), ("kind", "consumer"))
    h.send(("id", "s"), ("finish", "*"))
    assert {s.name: s.kind for s in h.spans} == {"a": SpanKind.PRODUCER, "b": SpanKind.CONSUMER}


def test_log_becomes_an_event_at_the_message_time() -> None:
    h = Harness()
    h.send(("id", "s"), ("ts", T0 // 1000 + 5), ("span", "a"), ("log", "retry"), ("", 3))
    h.send(("id", "s"), ("finish", "*"))
    (span,) = h.spans
    (event,) = span.events
    assert event.name == "retry"
    assert dict(event.attributes) == {"retry": 3}
    assert event.timestamp == T0 + 5000


def test_tag_values_are_truncated_and_sanitized() -> None:
    h = Harness(max_attr_len=8)
    h.send(
        ("id", "s"),
        ("span", "a\udcff"),
        ("tag", "long"),
        ("", "x" * 100),
        ("tag", "bad"),
        ("", "\udcc3\udca9t\udcff"),
    )
    h.send(("id", "s"), ("finish", "*"))
    (span,) = h.spans
    assert span.name == "a\ufffd"
    assert span.attributes["long"] == "x" * 8
    assert span.attributes["bad"] == "ét\ufffd"
    assert h.reg.stats["value_truncated"] == 1


def test_repeated_tag_keeps_its_first_position_and_last_value() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("tag", "k"), ("", 1), ("tag", "j"), ("", 2))
    h.send(("id", "s"), ("span", "a"), ("tag", "k"), ("", "three"), ("finish", "*"))
    (span,) = h.spans
    assert list(span.attributes.items()) == [("k", "three"), ("j", 2)]


def test_a_full_span_still_updates_its_existing_tags_and_counts_new_ones() -> None:
    h = Harness()
    tags = [arg for i in range(128) for arg in (("tag", f"k{i}"), ("", i))]
    h.send(("id", "s"), ("span", "a"), *tags)
    h.send(("id", "s"), ("span", "a"), ("tag", "k5"), ("", "new"), ("tag", "extra"), ("", 1))
    h.send(("id", "s"), ("finish", "*"))
    (span,) = h.spans
    assert len(span.attributes) == 128 and span.attributes["k5"] == "new"
    assert "extra" not in span.attributes
    assert h.reg.stats["item_limit"] == 1


def test_error_tag_sets_status() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("tag", "error"), ("", True), ("span", "b"))
    h.send(("id", "s"), ("span", "b"), ("tag", "error"), ("", False), ("finish", "*"))
    spans = h.by_name()
    assert spans["a"].status.status_code == StatusCode.ERROR
    assert spans["b"].status.status_code == StatusCode.UNSET


def test_max_spans_per_session() -> None:
    h = Harness(max_spans_per_session=2)
    h.send(("id", "s"), ("span", "a"), ("span", "b"), ("span", "c"), ("tag", "k"), ("", 1))
    h.send(("id", "s"), ("finish", "*"))
    assert sorted(s.name for s in h.spans) == ["a", "b"]
    assert h.reg.stats["span_limit"] == 1
    assert h.reg.stats["no_span_selected"] == 1


def test_tag_after_emission_is_ignored() -> None:
    h = Harness()
    h.send(("id", "s"), ("traceparent", None), ("span", "a"), ("finish", "a"))
    (span,) = h.spans
    h.send(("id", "s"), ("span", "b"), ("span", "a"), ("tag", "k"), ("", 1))
    # "a" was ended, so span=a started a new record, which takes the tag.
    h.send(("id", "s"), ("finish", "*"))
    assert dict(span.attributes) == {}
    assert sorted(dict(s.attributes).get("k", 0) for s in h.spans) == [0, 0, 1]


def test_emit_failure_is_counted_and_state_stays_consistent() -> None:
    calls: list[str] = []

    def emit(span: ReadableSpan) -> None:
        calls.append(span.name)
        raise RuntimeError("exporter queue broke")

    reg = SessionRegistry(
        emit,
        propagator=build_propagator("tracecontext"),
        sampler=ALWAYS_ON,
        resource_for_service=lambda s: Resource.create({"service.name": s}),
        default_service="haproxy",
    )
    for args in ([("id", "s"), ("span", "a"), ("span", "b")], [("id", "s"), ("finish", "*")]):
        reg.apply(parse_message(Message("m", args)))
    assert calls == ["b", "a"]
    assert reg.stats["emit_error"] == 2
    assert len(reg) == 0


def test_random_ids_by_default() -> None:
    spans: list[ReadableSpan] = []
    reg = SessionRegistry(
        spans.append,
        propagator=build_propagator("tracecontext"),
        sampler=ALWAYS_ON,
        resource_for_service=lambda s: Resource.create({"service.name": s}),
        default_service="haproxy",
    )
    reg.apply(parse_message(Message("m", [("id", "s"), ("span", "a"), ("finish", "*")])))
    reg.apply(parse_message(Message("m", [("id", "t"), ("span", "a"), ("finish", "*")])))
    a, b = spans
    assert a.context.is_valid and b.context.is_valid
    assert a.context.trace_id != b.context.trace_id


def test_span_ids_are_drawn_when_first_needed_and_kept() -> None:
    """An open span holds no id (48 B) until its emission, a child's or follower's emission or
    an inject needs one; whoever needs it first fixes it for all the others."""
    h = Harness()
    notifies = reference_notifies("lazy")
    for notify in notifies[:2]:
        h.notify(notify)
    assert h.ids.span == 0  # three spans open, none needed yet
    h.notify(notifies[2])  # Frontend TCP request ends: its id and its parent's
    assert h.ids.span == 2
    (ftr,) = h.spans
    assert ftr.name == "Frontend TCP request" and ftr.parent is not None
    h.notify(notifies[3])  # Frontend HTTP request ends: its own id only
    assert h.ids.span == 3
    for notify in notifies[4:]:
        h.notify(notify)
    spans = h.by_name()
    assert h.ids.span == len(spans) == 9  # one draw per span, none twice
    ids = {span.context.span_id for span in spans.values()}
    assert len(ids) == 9
    assert spans["Client session"].context.span_id == ftr.parent.span_id
    for span in spans.values():
        assert span.parent is None or span.parent.span_id in ids
        assert all(link.context.span_id in ids for link in span.links)
    assert spans["Frontend HTTP request"].links[0].context.span_id == ftr.context.span_id


def test_a_span_following_several_links_them_all_in_order() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("span", "b"), ("span", "c"))
    h.send(
        ("id", "s"), ("span", "c"), ("follows-from", "a"), ("follows-from", "b"),
        ("follows-from", "a"), ("finish", "*"),
    )
    spans = h.by_name()
    c = spans["c"]
    a, b = spans["a"].context.span_id, spans["b"].context.span_id
    assert [link.context.span_id for link in c.links] == [a, b, a]
    assert c.parent is not None and c.parent.span_id == a


# -- baggage and inject -------------------------------------------------------------------------


def test_incoming_baggage_merges_with_configured_baggage() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("baggage", "haproxy_id"), ("", "mine"))
    out = h.send(
        ("id", "s"),
        ("traceparent", TRACEPARENT),
        ("baggage", "haproxy_id=theirs,user=alice"),
        ("inject", "a"),
    )
    injected = vars_of(out)
    assert sorted(injected["baggage"].split(",")) == ["haproxy_id=mine", "user=alice"]


@pytest.mark.parametrize("configured", [0, 1])
def test_incoming_baggage_past_the_session_cap_is_counted(configured: int) -> None:
    """A session keeps 64 baggage items (2 KiB per session is the budget); what a client sent
    beyond that is dropped as the limit items_per_span, counted, not silently."""
    h = Harness()
    h.send(("id", "s"), ("span", "a"), *([("baggage", "mine"), ("", "v")] if configured else []))
    header = ",".join(f"k{i}=v" for i in range(100))
    out = h.send(("id", "s"), ("traceparent", TRACEPARENT), ("baggage", header), ("inject", "a"))
    assert len(vars_of(out)["baggage"].split(",")) == 64
    assert h.reg.stats["item_limit"] == 100 - 64 + configured


def test_links_past_the_span_cap_are_counted_as_the_other_items_are() -> None:
    """docs/metrics.md says item_limit counts links too: the 129th was dropped uncounted."""
    h = Harness()
    h.send(("id", "s"), ("span", "p"), ("span", "a"),
           *[("follows-from", "p")] * 130, ("finish", "*"))
    assert len({s.name: s for s in h.spans}["a"].links) == 128
    assert h.reg.stats["item_limit"] == 2


def test_inject_of_ended_name_uses_latest_record_and_unknown_name_is_counted() -> None:
    h = Harness()
    h.send(("id", "s"), ("span", "a"), ("finish", "a"))
    out = h.send(("id", "s"), ("inject", "a"), ("inject", "nope"))
    (span,) = h.spans
    assert vars_of(out)["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"
    assert h.reg.stats["inject_unknown"] == 1


def test_inject_fixes_the_context_and_later_carrier_is_late() -> None:
    h = Harness()
    out = h.send(("id", "s"), ("span", "a"), ("inject", "a"))
    trace_id = int(vars_of(out)["traceparent"].split("-")[1], 16)
    h.send(("id", "s"), ("traceparent", TRACEPARENT), ("finish", "*"))
    (span,) = h.spans
    assert span.context.trace_id == trace_id != REMOTE_TRACE
    assert span.parent is None
    assert h.reg.stats["late_carrier"] == 1


# -- sampling -----------------------------------------------------------------------------------


def test_always_off_still_injects_unsampled_and_emits_nothing() -> None:
    h = Harness(propagators="tracecontext,b3multi", sampler=ALWAYS_OFF)
    out = run_reference(h)
    assert h.spans == []
    injected = vars_of(out)
    assert injected["traceparent"].endswith("-00")
    assert injected["x_b3_sampled"] == "0"
    assert len(h.reg) == 0


@pytest.mark.parametrize(("flag", "emitted"), [("01", 9), ("00", 0)])
def test_parent_based_sampler_honours_the_remote_flag(flag: str, emitted: int) -> None:
    h = Harness(sampler=ParentBased(ALWAYS_OFF if flag == "01" else ALWAYS_ON))
    traceparent = TRACEPARENT[:-2] + flag
    out = run_reference(h, headers=[("traceparent", traceparent)])
    assert len(h.spans) == emitted
    assert vars_of(out)["traceparent"].endswith("-" + flag)


def test_sampler_sees_the_root_span() -> None:
    seen: list[tuple[str, SpanKind, int]] = []

    class Recording(Sampler):
        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                          links=None, trace_state=None):  # fmt: skip
            seen.append((name, kind, trace_id))
            return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes)

        def get_description(self) -> str:
            return "recording"

    h = Harness(sampler=Recording())
    run_reference(h, headers=[("traceparent", TRACEPARENT)])
    assert seen == [("HAProxy session", SpanKind.SERVER, REMOTE_TRACE)]


# -- expiry -------------------------------------------------------------------------------------


def test_the_ttl_counts_on_its_own_clock_whatever_the_wall_clock_does() -> None:
    """Code review: on the wall clock, a step back held every session past its TTL (nothing
    expired until the clock caught up), and a step forward past the TTL cut every open one."""
    steady = FakeClock(0)  # as time.monotonic_ns is by default
    h = Harness(ttl_s=30, ttl_clock_ns=steady)
    h.send(("id", "old"), ("span", "x"))
    h.clock.advance(-3600)  # NTP steps the wall clock an hour back
    h.send(("id", "new"), ("span", "y"))
    steady.advance(31)
    assert h.reg.expire() == 2  # both idle 31 s on the steady clock
    h.send(("id", "live"), ("span", "z"))
    h.clock.advance(7200)  # and two hours forward
    steady.advance(1)
    assert h.reg.expire() == 0 and "live" in h.reg
    # An event without ts= is dated by the wall clock as expiry last read it (once a second
    # at most), one clock read per message rather than two.
    h.send(("id", "dated"), ("span", "d"))
    h.reg.close_all()
    assert h.by_name()["d"].start_time == h.clock.t


def test_the_ttl_clock_is_monotonic_unless_the_wall_clock_is_a_test_s() -> None:
    import time

    from spoe_agent.tracing.registry import SessionRegistry

    def registry(**clocks: Any) -> SessionRegistry:
        return SessionRegistry(lambda span: None, propagator=build_propagator("tracecontext"),
                               sampler=ALWAYS_ON, resource_for_service=Resource.create,
                               default_service="haproxy", **clocks)

    assert registry()._ttl_clock_ns is time.monotonic_ns
    fake = FakeClock()
    assert registry(clock_ns=fake)._ttl_clock_ns is fake


def test_ttl_expiry_marks_open_spans_incomplete() -> None:
    h = Harness(ttl_s=30)
    notifies = reference_notifies("u")
    for notify in notifies[:3]:
        h.notify(notify)
    last_event = h.clock.t
    h.clock.advance(29)
    h.send(("id", "other"), ("span", "x"))
    assert h.reg.expire() == 0
    h.clock.advance(2)
    assert h.reg.expire() == 1  # "u" idle 31 s; "other" idle 2 s
    assert "u" not in h.reg and "other" in h.reg
    spans = h.by_name()
    assert set(spans) == {
        "HAProxy session",
        "Client session",
        "Frontend TCP request",
        "Frontend HTTP request",
    }
    assert spans["Frontend TCP request"].status.status_code == StatusCode.UNSET
    assert INCOMPLETE_ATTRIBUTE not in spans["Frontend TCP request"].attributes
    for name in ("HAProxy session", "Client session", "Frontend HTTP request"):
        assert spans[name].status.status_code == StatusCode.ERROR
        assert spans[name].attributes[INCOMPLETE_ATTRIBUTE] is True
        # At the last event: the stream most likely ended then (a deny, a redirect...), not
        # at the expiry, a TTL later.
        assert spans[name].end_time == last_event
        assert "(ttl): no event for 30s" in (spans[name].status.description or "")
    assert h.reg.stats["sessions_evicted_ttl"] == 1
    assert h.reg.stats["spans_incomplete"] == 3
    # The rest of the expired stream does not come back as an orphan trace...
    h.notify(notifies[-1])
    assert len(h.spans) == 4
    assert "u" not in h.reg
    assert h.reg.stats["late_message"] == 3  # http_response, server/client_session_end
    # ...until the key is forgotten, one TTL later.
    h.clock.advance(31)
    h.reg.expire()
    h.send(("id", "u"), ("span", "again"), ("finish", "*"))
    assert h.spans[-1].name == "again"


def test_a_cut_session_ends_at_its_last_events_own_time() -> None:
    """The spans start at HAProxy's ts=, which may differ from the agent's clock (here 2 s
    ahead): a session the TTL cuts ends them at its last event's ts too. Ended at the agent's
    arrival time, they lasted 0 us and children ended after their parents (black-box run)."""
    h = Harness(ttl_s=3)
    ahead = h.clock.t // 1000 + 2_000_000  # microseconds, as ts= sends them
    h.send(("id", "k"), ("ts", ahead), ("span", "root"), ("span", "child"), ("child-of", "root"))
    h.send(("id", "k"), ("ts", ahead + 500), ("span", "other"), ("child-of", "root"))
    h.clock.advance(4)
    assert h.reg.expire() == 1
    spans = h.by_name()
    for name in ("root", "child", "other"):
        assert spans[name].end_time == (ahead + 500) * 1000, name
    assert spans["root"].start_time == ahead * 1000


def test_an_orphans_fallback_parent_never_closes_a_cycle() -> None:
    h = Harness()
    # The first span restarted under another, which then names a parent not started yet:
    # the orphan hangs under the first span that ever started, not under its new record.
    h.send(("id", "r"), ("span", "A"), ("span", "B"))
    h.send(("id", "r"), ("finish", "A"), ("span", "A"), ("child-of", "B"))
    h.send(("id", "r"), ("span", "B"), ("child-of", "not-yet"), ("finish", "*"))
    # The first span, still open, made the child of the span that then names an unknown
    # parent: that span stays a root rather than its own grandparent.
    h.send(("id", "c"), ("span", "A"), ("span", "B"), ("span", "A"), ("child-of", "B"))
    h.send(("id", "c"), ("span", "B"), ("child-of", "not-yet"), ("finish", "*"))
    by_id = {span.context.span_id: span for span in h.spans}
    for span in h.spans:  # every chain of parents ends at a root
        seen = set()
        node = span
        while node.parent is not None and node.parent.span_id in by_id:
            assert node.context.span_id not in seen, f"cycle through {span.name}"
            seen.add(node.context.span_id)
            node = by_id[node.parent.span_id]
    roots = sorted(s.name for s in h.spans if s.parent is None)
    assert roots == ["A", "B"]  # the first A of "r", and B of "c"


def test_a_session_that_begins_mid_stream_is_marked_partial() -> None:
    """A restarted agent sees streams from the middle: their first message names spans the
    session does not have. Those fragments looked like whole traces (black-box run)."""
    h = Harness()
    h.send(("id", "mid"), ("span", "Backend TCP request"),
           ("follows-from", "Frontend HTTP request"), ("finish", "Frontend HTTP request"))
    h.send(("id", "mid"), ("span", "HAProxy session"), ("finish", "*"))
    # A whole stream whose later messages name spans it does not have (a listen section,
    # mode tcp) is no fragment.
    h.send(("id", "whole"), ("span", "HAProxy session"))
    h.send(("id", "whole"), ("span", "Backend TCP request"),
           ("follows-from", "Frontend HTTP request"), ("finish", "*"))
    by_trace: dict[int, set[object]] = {}
    for span in h.spans:
        by_trace.setdefault(span.context.trace_id, set()).add(
            span.attributes.get("haproxy.session.partial"))
    # Every span of the fragment is marked (the one started after the mark too), none of
    # the whole stream's.
    assert sorted(by_trace.values(), key=str) == [{None}, {True}]
    assert sum(s.attributes.get("haproxy.session.partial") is True for s in h.spans) == 2
    assert h.reg.stats["sessions_partial"] == 1


def test_activity_moves_a_session_behind_idle_ones() -> None:
    h = Harness(ttl_s=10)
    h.send(("id", "a"), ("span", "x"))
    h.clock.advance(1)
    h.send(("id", "b"), ("span", "x"))
    h.clock.advance(5)
    h.send(("id", "a"), ("tag", "k"), ("", 1), ("span", "x"))
    h.clock.advance(6)  # b idle 11 s, a idle 6 s
    assert h.reg.expire() == 1
    assert "a" in h.reg and "b" not in h.reg


def test_expire_with_explicit_now() -> None:
    h = Harness(ttl_s=1)
    h.send(("id", "a"), ("span", "x"))
    assert h.reg.expire(T0 + 500_000_000) == 0
    assert h.reg.expire(T0 + 2_000_000_000) == 1
    (span,) = h.spans
    assert span.end_time == span.start_time == T0  # its only event


def test_cap_evicts_the_least_recently_active_session() -> None:
    h = Harness(max_sessions=2)
    h.send(("id", "a"), ("span", "x"))
    h.send(("id", "b"), ("span", "y"))
    b_last = h.clock.t
    h.clock.advance(3)
    h.send(("id", "a"), ("span", "x"), ("tag", "k"), ("", 1))
    h.send(("id", "c"), ("span", "z"))
    assert "b" not in h.reg and "a" in h.reg and "c" in h.reg
    (span,) = h.spans
    assert span.name == "y" and span.end_time == b_last
    assert span.attributes[INCOMPLETE_ATTRIBUTE] is True
    assert span.status.status_code == StatusCode.ERROR
    assert h.reg.stats["sessions_evicted_cap"] == 1


def test_close_all_ends_everything_once() -> None:
    h = Harness()
    for uid in ("a", "b", "c"):
        h.notify(reference_notifies(uid)[0])
    last_event = h.clock.t
    h.clock.advance(5)  # the stop comes later: the spans still end at their last event
    assert h.reg.close_all() == 3
    assert {s.end_time for s in h.spans} == {last_event}
    assert len(h.reg) == 0
    assert len(h.spans) == 6
    assert all(s.attributes[INCOMPLETE_ATTRIBUTE] for s in h.spans)
    assert h.reg.close_all() == 0
    assert len(h.spans) == 6


def test_on_end_names_each_key_once_the_registry_no_longer_answers_for_it() -> None:
    """With --workers, peers route a key's events to the worker that said it owns it until
    it says the key ended: after finish=* or close at once, after TTL or cap eviction only once
    the key is forgotten, because until then its late events are this registry's to count."""
    h = Harness(ttl_s=10, max_sessions=2)
    ended: list[str] = []
    h.reg.on_end = ended.append
    h.send(("id", "done"), ("span", "x"), ("finish", "*"))
    assert ended == ["done"]
    h.send(("id", "idle"), ("span", "x"))
    h.clock.advance(11)
    assert h.reg.expire() == 1
    assert ended == ["done"] and h.reg.remembers("idle") and "idle" in h.reg.keys()
    h.clock.advance(11)
    h.reg.expire()
    assert ended == ["done", "idle"] and not h.reg.remembers("idle")
    for key in ("a", "b", "c"):  # "a" evicted by the cap: remembered, up to max_sessions
        h.send(("id", key), ("span", "x"))
    assert ended == ["done", "idle"] and h.reg.remembers("a")
    for key in ("d", "e", "f"):  # three more evictions forget the oldest remembered ones
        h.send(("id", key), ("span", "x"))
    assert ended == ["done", "idle", "a", "b"]
    assert h.reg.close_all() == 2
    assert ended == ["done", "idle", "a", "b", "e", "f"]


def test_unsampled_eviction_emits_nothing() -> None:
    h = Harness(sampler=ALWAYS_OFF)
    h.send(("id", "a"), ("span", "x"), ("tag", "k"), ("", 1))
    h.clock.advance(60)
    assert h.reg.expire() == 1
    assert h.spans == []


# -- properties ---------------------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "b", "c", "*"])
_ARG = st.one_of(
    st.tuples(st.sampled_from(["span", "finish", "child-of", "follows-from", "inject"]), _NAMES),
    st.tuples(st.sampled_from(["tag", "log", "baggage"]), st.sampled_from(["k", "error"])),
    st.tuples(st.just(""), st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))),
    st.tuples(st.just("kind"), st.sampled_from(["server", "bogus"])),
    st.tuples(st.just("traceparent"), st.sampled_from([None, TRACEPARENT, "garbage"])),
    st.tuples(st.just("ts"), st.integers(min_value=-5, max_value=10**6)),
)
_MESSAGES = st.lists(
    st.tuples(st.sampled_from(["s1", "s2", "s3"]), st.lists(_ARG, max_size=8)), max_size=25
)


@settings(max_examples=examples(200), deadline=None)
@given(_MESSAGES, st.booleans())
def test_any_message_sequence_emits_each_started_span_exactly_once(messages, sampled) -> None:
    h = Harness(sampler=ALWAYS_ON if sampled else ALWAYS_OFF, max_sessions=2)
    for key, args in messages:
        h.send(("id", key), *args)
        h.clock.advance(0.1)
    h.reg.close_all()
    ids = [(s.context.trace_id, s.context.span_id) for s in h.spans]
    assert len(ids) == len(set(ids))
    if sampled:
        assert len(ids) == h.reg.stats["spans_started"]
    else:
        assert ids == []
    for span in h.spans:
        assert span.start_time <= span.end_time
        if span.parent is not None and not span.parent.is_remote:
            assert span.parent.trace_id == span.context.trace_id


# -- cost ---------------------------------------------------------------------------------------


def _fresh_messages(uid: str, count: int = 8) -> list[Message]:
    """One request's messages as the protocol decodes them: fresh string objects each time."""
    headers = [("traceparent", TRACEPARENT), ("tracestate", None), ("baggage", None)]
    notifies = reference_notifies(uid, headers=headers, ts=1_700_000_000_000_000)[:count]
    return [pickle.loads(pickle.dumps(msg)) for notify in notifies for msg in notify]


@pytest.mark.slow  # 100,000 sessions: ~15-21 s, which must not start last
def test_an_open_session_holds_less_than_2_kib() -> None:
    """Issue 6's memory target for a request halfway through (the reference config's first four
    events, decoded from real NOTIFYs, the decoder's and the language's caches warm), counted
    as pymalloc hands memory out: 16-byte blocks, which is what RSS sees (the real agent:
    ``benchmarks/session_memory.py``)."""
    measured = measure_marginal(warm=2000, sessions=4000)
    assert measured["bytes_per_session"] < measured["blocks_bytes_per_session"] < 2048


def test_measure_cost_per_request(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints (does not assert) the CPU cost of compiling and applying one request's messages,
    and the memory an open session holds."""
    reg = SessionRegistry(
        lambda span: None,
        propagator=build_propagator("tracecontext,baggage"),
        sampler=ParentBased(ALWAYS_ON),
        resource_for_service=lambda s: Resource.create({"service.name": s}),
        default_service="haproxy",
    )
    n = 200
    requests = [_fresh_messages(f"req-{i}") for i in range(n)]
    commands = [[parse_message(msg) for msg in request] for request in requests]

    def parse_all() -> None:
        for request in requests:
            for msg in request:
                parse_message(msg, reg.stats)

    def apply_all() -> None:
        for request in commands:
            for command in request:
                reg.apply(command)

    def both() -> None:
        for request in requests:
            for msg in request:
                command = parse_message(msg, reg.stats)
                if command is not None:
                    reg.apply(command)

    def cost(fn: Any) -> float:
        # CPU time of this thread, best of many short runs: other processes share the machine.
        # The keys come again in every run: forget them, or an ended key's events are late.
        timer = timeit.Timer(fn, setup=reg._evicted.clear, timer=time.thread_time)
        return min(timer.repeat(repeat=40, number=1)) / n * 1e6

    both()
    total, parse, apply = cost(both), cost(parse_all), cost(apply_all)
    assert len(reg) == 0

    # Memory of open sessions halfway through their request (after the backend request).
    halfway = [_fresh_messages(f"mem-{i}", count=5) for i in range(1000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for request in halfway:
        for msg in request:
            reg.apply(parse_message(msg))
    per_session = (tracemalloc.get_traced_memory()[0] - before) / len(halfway)
    tracemalloc.stop()
    assert reg.close_all() == len(halfway)
    with capsys.disabled():
        print(
            f"\n[cost] reference request (8 events, 11 messages, 9 spans): parse_message+apply "
            f"{total:.1f} us CPU (parse {parse:.1f} + apply with emission {apply:.1f}); "
            f"open session after 5 events: {per_session:.0f} B"
        )


# -- the open sessions' byte budget ---------------------------------------------------------------


def test_the_open_sessions_hold_no_more_than_max_open_bytes_and_keep_their_spans() -> None:
    """A peer sending long values filled 1 GB in 4 s (black-box run): the counts (sessions,
    spans, items, value length) bound nothing practical. Past max_open_bytes the values are
    dropped and counted; the sessions, their spans and the short values still go on."""
    h = Harness(max_open_bytes=1 << 20)
    whole = h.reg._room  # units of 64 bytes
    big = "x" * 4000
    for i in range(400):  # ~1.6 MB of values asked for
        h.send(("id", f"s{i}"), ("span", "root"), ("tag", "big"), ("", big), ("tag", "n"), ("", i))
    assert h.reg.stats["open_bytes"] > 0
    assert h.reg._room >= -whole // 8  # spans may go an eighth further
    kept = h.reg.stats["open_bytes"]
    for i in range(400):
        h.send(("id", f"s{i}"), ("finish", "*"))
    assert h.reg._room == whole  # all given back as the sessions end
    assert len(h.spans) == 400  # spans have an eighth more room than values
    with_big = [s for s in h.spans if "big" in s.attributes]
    assert 200 < len(with_big) < 400 and len(with_big) + kept >= 400
    # Room again: a new session keeps its long value.
    h.send(("id", "after"), ("span", "root"), ("tag", "big"), ("", big), ("finish", "*"))
    assert h.spans[-1].attributes["big"] == big


@pytest.mark.parametrize("where", ["tag key", "log key", "span name", "baggage"])
def test_a_peers_long_names_count_against_max_open_bytes_as_values_do(where: str) -> None:
    """Keys and names are a peer's bytes too: 4,000-character ones with short values held as
    much as long values, and were not counted."""
    h = Harness(max_open_bytes=1 << 20)
    whole = h.reg._room
    name = "k" * 4000
    for i in range(400):
        args = {"tag key": [("span", "root"), ("tag", f"{i}{name}"), ("", 1)],
                "log key": [("span", "root"), ("log", f"{i}{name}"), ("", 1)],
                "span name": [("span", f"{i}{name}")],
                "baggage": [("span", "root"), ("baggage", f"b{i}"), ("", name)]}[where]
        h.send(("id", f"s{i}"), *args)
    assert h.reg.stats["open_bytes"] > 0
    assert h.reg._room >= -whole // 8 - 64
    h.reg.close_all()
    assert h.reg._room == whole


def test_every_way_a_session_ends_gives_back_what_it_held() -> None:
    """finish=*, the TTL, the cap and a shutdown: the budget returns to nothing, or it would
    fill for good with sessions long gone and drop everything after."""
    h = Harness(ttl_s=10, max_sessions=3)
    whole = h.reg._room
    def session(key: str, *more: tuple[str, Any]) -> None:
        h.send(("id", key), ("span", "root"), ("tag", "k"), ("", "v" * 300), ("log", "e"),
               ("", "w" * 200), ("baggage", "bk"), ("", "bv"), ("span", "child"),
               ("child-of", "root"), *more)
    session("finished", ("finish", "*"))
    assert h.reg._room == whole
    session("expired")
    h.clock.advance(11)
    h.reg.expire()
    assert h.reg._room == whole
    for i in range(5):  # two past the cap
        session(f"capped{i}")
    assert h.reg.stats["sessions_evicted_cap"] == 2
    h.reg.close_all()
    assert h.reg._room == whole
    h.send(("id", "carrier"), ("span", "root"), ("baggage", "a=1,b=" + "2" * 500))
    assert h.reg._room < whole
    h.send(("id", "carrier"), ("finish", "*"))
    assert h.reg._room == whole
    assert h.reg.stats["open_bytes"] == 0


def test_spans_go_out_once_none_is_open_without_a_context_argument() -> None:
    """Black-box run: a configuration with neither traceparent= nor finish=str("*") had every
    span wait for the session TTL (30 s), though each had ended: the trace id was only fixed
    by a context argument, an inject or the session's end."""
    h = Harness()
    h.send(("id", "s"), ("span", "req"), ("span", "inner"), ("child-of", "req"))
    h.send(("id", "s"), ("finish", "inner"))
    assert h.spans == []  # req is open: a later message may still bring the caller's context
    h.send(("id", "s"), ("finish", "req"))
    spans = h.by_name()
    assert sorted(spans) == ["inner", "req"]
    assert spans["inner"].context.trace_id == spans["req"].context.trace_id
    assert spans["inner"].parent.span_id == spans["req"].context.span_id
    assert "s" in h.reg  # the session is held (until finish=* or the TTL), its trace fixed
    h.send(("id", "s"), ("traceparent", TRACEPARENT))
    assert h.reg.stats["late_carrier"] == 1
    h.send(("id", "s"), ("span", "later"), ("finish", "later"))  # the same trace still
    assert h.by_name()["later"].context.trace_id == spans["req"].context.trace_id
