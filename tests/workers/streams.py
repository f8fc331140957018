"""Streams of compiled commands whose result depends on their order, and a way to compare the
span trees registries make of them.

A stream here is four events, as HAProxy would send them for one request::

    span=root                                   (creates the session)
    span=child child-of=root
    span=next follows-from=child finish=child   (needs "child" to exist and be open)
    finish=* ... inject=next on the third event when asked

Applied out of order, the tree changes: "next" loses its parent, "child" is never finished by
its event, or the session ends early and the rest becomes an orphan session. So comparing the
shapes of the spans a registry emitted says whether it saw every stream in order.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from spoe_agent.protocol.types import Message
from spoe_agent.tracing.language import Command, parse_message
from spoe_agent.tracing.propagation import build_propagator
from spoe_agent.tracing.registry import SessionRegistry

T0_US = time.time_ns() // 1000  # near the agent's clock, or it takes the arrival time


def stream(key: str, *, inject: bool = False, t0_us: int = T0_US) -> list[Command]:
    """The four commands of one request, in HAProxy's order."""
    third: list[tuple[str, Any]] = [
        ("id", key), ("ts", t0_us + 30), ("span", "next"), ("follows-from", "child"),
        ("finish", "child"),
    ]
    if inject:
        third.append(("inject", "next"))
    messages = [
        Message("a", [("id", key), ("ts", t0_us), ("span", "root"), ("kind", "server"),
                      ("tag", "http.path"), ("", f"/{key}")]),
        Message("b", [("id", key), ("ts", t0_us + 10), ("span", "child"),
                      ("child-of", "root")]),
        Message("c", third),
        Message("d", [("id", key), ("ts", t0_us + 50), ("finish", "*")]),
    ]
    commands = [parse_message(m) for m in messages]
    assert all(c is not None for c in commands)
    return commands  # type: ignore[return-value]


def registry(spans: list[ReadableSpan]) -> SessionRegistry:
    return SessionRegistry(
        spans.append,
        propagator=build_propagator("tracecontext"),
        sampler=ALWAYS_ON,
        resource_for_service=lambda name: Resource.create({"service.name": name}),
        default_service="test",
    )


def shapes(spans: list[ReadableSpan]) -> Counter[tuple[Any, ...]]:
    """Each trace as (key tag, sorted (name, parent name, links, incomplete)), counted: what
    order-dependence would change, without the ids and times that differ between runs."""
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    out: Counter[tuple[Any, ...]] = Counter()
    for members in by_trace.values():
        names = {s.context.span_id: s.name for s in members}
        key = next((s.attributes.get("http.path") for s in members if s.attributes
                    and "http.path" in s.attributes), None)
        tree = sorted(
            (
                s.name,
                names.get(s.parent.span_id) if s.parent is not None else None,
                tuple(sorted(names.get(link.context.span_id, "?") for link in s.links)),
                bool(s.attributes and s.attributes.get("haproxy.span.incomplete")),
            )
            for s in members
        )
        out[(key, tuple(tree))] += 1
    return out


def expected_shape(key: str) -> tuple[Any, ...]:
    spans: list[ReadableSpan] = []
    reg = registry(spans)
    for command in stream(key):
        reg.apply(command)
    ((shape, _),) = shapes(spans).items()
    return shape
