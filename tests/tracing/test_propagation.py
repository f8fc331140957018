"""Propagation: building the propagator, and trace context in and out for each format."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.jaeger import JaegerPropagator
from opentelemetry.trace import SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from spoe_agent.tracing.propagation import build_propagator, extract_context, inject_vars
from tests.tracing.test_registry import (
    REMOTE_SPAN,
    REMOTE_TRACE,
    TRACEPARENT,
    Harness,
    check_reference_tree,
    run_reference,
    vars_of,
)

TRACE_HEX = f"{REMOTE_TRACE:032x}"
SPAN_HEX = f"{REMOTE_SPAN:016x}"


def as_headers(variables: dict[str, str]) -> dict[str, str]:
    """The headers an HAProxy configuration sets from the variables (baggage keys verbatim)."""
    headers = {}
    for name, value in variables.items():
        if name.startswith("uberctx_"):
            headers["uberctx-" + name[len("uberctx_") :]] = value
        else:
            headers[name.replace("_", "-")] = value
    return headers


def local(trace_id: int = REMOTE_TRACE, span_id: int = 0x1122334455667788, sampled: bool = True):
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(trace_id, span_id, False, flags)


# -- building -----------------------------------------------------------------------------------


def test_build_from_list_or_comma_separated_string() -> None:
    composite = build_propagator(" tracecontext , baggage,b3multi,tracecontext")
    assert sorted(composite.fields) == sorted(
        ["traceparent", "tracestate", "baggage", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"]
    )
    assert build_propagator(["jaeger", "B3"]).fields == {"uber-trace-id", "b3"}


@pytest.mark.parametrize("names", ["none", [], ""])
def test_none_propagates_nothing(names: Any) -> None:
    propagator = build_propagator(names)
    assert inject_vars(propagator, local(), {"k": "v"}) == {}
    assert extract_context(propagator, {"traceparent": TRACEPARENT}) == (None, {})


@pytest.mark.parametrize("bad", ["xray", "tracecontext,zipkin", ["ottrace"]])
def test_unknown_name_is_a_clear_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="unknown propagator") as info:
        build_propagator(bad)
    assert "tracecontext, baggage, b3, b3multi, jaeger, none" in str(info.value)


def test_none_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match="none"):
        build_propagator("none,tracecontext")


# -- extract and inject, API level --------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "carrier", "sampled"),
    [
        ("tracecontext", {"traceparent": TRACEPARENT}, True),
        ("tracecontext", {"traceparent": TRACEPARENT[:-2] + "00"}, False),
        ("b3", {"b3": f"{TRACE_HEX}-{SPAN_HEX}-1"}, True),
        ("b3", {"b3": f"{TRACE_HEX}-{SPAN_HEX}-0"}, False),
        (
            "b3multi",
            {"x-b3-traceid": TRACE_HEX, "x-b3-spanid": SPAN_HEX, "x-b3-sampled": "1"},
            True,
        ),
        ("jaeger", {"uber-trace-id": f"{TRACE_HEX}:{SPAN_HEX}:0:1"}, True),
        ("jaeger", {"uber-trace-id": f"{TRACE_HEX}:{SPAN_HEX}:0:0"}, False),
    ],
)
def test_extract_each_format(names: str, carrier: dict[str, str], sampled: bool) -> None:
    ctx, baggage = extract_context(build_propagator(names), carrier)
    assert ctx is not None and ctx.is_remote
    assert (ctx.trace_id, ctx.span_id) == (REMOTE_TRACE, REMOTE_SPAN)
    assert ctx.trace_flags.sampled is sampled
    assert baggage == {}


@pytest.mark.parametrize(
    "carrier",
    [{}, {"traceparent": "garbage"}, {"b3": "0"}, {"uber-trace-id": "1:2"}, {"x-b3-spanid": "1"}],
)
def test_extract_without_a_valid_context(carrier: dict[str, str]) -> None:
    assert extract_context(build_propagator("tracecontext,b3,b3multi,jaeger"), carrier)[0] is None


@pytest.mark.parametrize(
    ("header", "items", "sent_on"),
    [
        # '+' is a literal plus and a space is %20 (W3C Baggage); the API's form encoding
        # read "a+b" as "a b" and wrote "a b" as "a+b" (opentelemetry-python#5566)
        ("k1=a%20b,k2=x+y", {"k1": "a b", "k2": "x+y"}, "k1=a%20b,k2=x+y"),
        # properties are not part of the value (the API has no place for them: dropped)
        ("k=v;prop=1;flag,j=w", {"k": "v", "j": "w"}, "k=v,j=w"),
        # what a value cannot hold as it is goes out percent-encoded, and comes back the same
        ("k=%2C%3B%22%5C%25%E2%82%AC", {"k": ",;\"\\%\u20ac"}, "k=%2C%3B%22%5C%25%E2%82%AC"),
        # a key is a token, never percent-decoded ('%' is a token character)
        ("k%41=5,100%=3", {"k%41": "5", "100%": "3"}, "k%41=5,100%=3"),
        # optional whitespace goes, spaces the value carries encoded stay
        (" k = %20lead%20 ,j=w", {"k": " lead ", "j": "w"}, "k=%20lead%20,j=w"),
        # malformed members are skipped, the others kept
        ('bad key=1,q="x",k=v,=w,x', {"k": "v"}, "k=v"),
        # the limits count the header's own bytes: a 4,002-byte member with '+' in it is kept
        ("big=" + "c" * 3948 + "+" * 50, {"big": "c" * 3948 + "+" * 50},
         "big=" + "c" * 3948 + "+" * 50),
    ],
    ids=["plus-and-space", "properties", "escapes", "token-keys", "whitespace", "malformed",
         "long-member"],
)
def test_baggage_is_read_and_written_as_w3c_baggage_encodes_it(
    header: str, items: dict[str, str], sent_on: str
) -> None:
    propagator = build_propagator("tracecontext,baggage")
    ctx, baggage = extract_context(propagator, {"traceparent": TRACEPARENT, "baggage": header})
    assert baggage == items
    assert ctx is not None
    assert inject_vars(propagator, ctx, baggage)["baggage"] == sent_on


def test_extract_baggage_w3c_and_jaeger() -> None:
    propagator = build_propagator("tracecontext,baggage,jaeger")
    ctx, baggage = extract_context(
        propagator, {"baggage": "user=alice,team=core%20infra", "uberctx-region": "eu"}
    )
    assert ctx is None
    assert baggage == {"user": "alice", "team": "core infra"}
    _, jaeger_baggage = extract_context(
        propagator,
        {"uber-trace-id": f"{TRACE_HEX}:{SPAN_HEX}:0:1", "uberctx-region": "eu"},
    )
    assert jaeger_baggage == {"region": "eu"}


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (
            "tracecontext,baggage",
            {
                "traceparent": f"00-{TRACE_HEX}-1122334455667788-01",
                "baggage": "haproxy_id=abc",
            },
        ),
        ("b3", {"b3": f"{TRACE_HEX}-1122334455667788-1"}),
        (
            "b3multi",
            {
                "x_b3_traceid": TRACE_HEX,
                "x_b3_spanid": "1122334455667788",
                "x_b3_sampled": "1",
            },
        ),
        (
            "jaeger",
            {
                "uber_trace_id": f"{TRACE_HEX}:1122334455667788:{0:016x}:03",
                "uberctx_haproxy_id": "abc",
            },
        ),
    ],
)
def test_inject_each_format_as_variables(names: str, expected: dict[str, str]) -> None:
    assert inject_vars(build_propagator(names), local(), {"haproxy_id": "abc"}) == expected


def test_inject_carries_tracestate_and_the_unsampled_flag() -> None:
    ctx = SpanContext(
        REMOTE_TRACE, 0x42, False, TraceFlags(TraceFlags.DEFAULT), TraceState([("congo", "t61")])
    )
    injected = inject_vars(build_propagator("tracecontext,b3"), ctx)
    assert injected == {
        "traceparent": f"00-{TRACE_HEX}-0000000000000042-00",
        "tracestate": "congo=t61",
        "b3": f"{TRACE_HEX}-0000000000000042-0",
    }


def test_injected_variables_round_trip_through_the_propagators() -> None:
    ctx = local(span_id=0xABC)
    for propagator in (
        TraceContextTextMapPropagator(),
        B3SingleFormat(),
        B3MultiFormat(),
        JaegerPropagator(),
    ):
        variables = inject_vars(propagator, ctx)
        extracted, _ = extract_context(propagator, as_headers(variables))
        assert extracted is not None
        assert (extracted.trace_id, extracted.span_id) == (ctx.trace_id, ctx.span_id)


# -- through the registry: in at the frontend, out at the backend -------------------------------

FORMATS = [
    (
        "tracecontext,baggage",
        [("traceparent", TRACEPARENT), ("tracestate", None), ("baggage", "user=alice")],
    ),
    ("b3", [("b3", f"{TRACE_HEX}-{SPAN_HEX}-1")]),
    (
        "b3multi",
        [
            ("x-b3-traceid", TRACE_HEX),
            ("x-b3-spanid", SPAN_HEX),
            ("x-b3-parentspanid", None),
            ("x-b3-sampled", "1"),
            ("x-b3-flags", None),
        ],
    ),
    ("jaeger", [("uber-trace-id", f"{TRACE_HEX}:{SPAN_HEX}:0:1"), ("uberctx-user", "alice")]),
]


@pytest.mark.parametrize(("names", "headers"), FORMATS, ids=[f[0] for f in FORMATS])
def test_reference_request_continues_the_incoming_trace(
    names: str, headers: list[tuple[str, Any]]
) -> None:
    h = Harness(propagators=names)
    out = run_reference(h, headers=headers)
    spans = check_reference_tree(h, remote_parent=True, error=False)
    backend = spans["Backend HTTP request"].context
    # What HAProxy would put in the backend request's headers names the backend span.
    extracted, baggage = extract_context(build_propagator(names), as_headers(vars_of(out)))
    assert extracted is not None
    assert (extracted.trace_id, extracted.span_id) == (REMOTE_TRACE, backend.span_id)
    assert extracted.trace_flags.sampled
    if names != "b3" and names != "b3multi":  # B3 carries no baggage
        assert baggage == {"haproxy_id": "uid-1", "user": "alice"}


@pytest.mark.parametrize(("names", "headers"), FORMATS, ids=[f[0] for f in FORMATS])
def test_reference_request_without_incoming_headers_starts_a_trace(
    names: str, headers: list[tuple[str, Any]]
) -> None:
    h = Harness(propagators=names)
    absent = [(name, None) for name, _ in headers]
    out = run_reference(h, headers=absent)
    spans = check_reference_tree(h, remote_parent=False, error=False)
    backend = spans["Backend HTTP request"].context
    extracted, _ = extract_context(build_propagator(names), as_headers(vars_of(out)))
    assert extracted is not None
    assert (extracted.trace_id, extracted.span_id) == (backend.trace_id, backend.span_id)
    assert backend.trace_id != REMOTE_TRACE
