"""Trace-context carriers: the OpenTelemetry propagators, fed from and into HAProxy variables.

The header formats are parsed and written by the OpenTelemetry propagator packages rather than
by hand, so the agent interoperates exactly as OpenTelemetry SDKs do. Every call starts from an
empty :class:`Context`: under gevent the ambient context belongs to whatever greenlet runs, and
one session's context must never leak into another's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from string import ascii_letters, digits
from typing import Any
from urllib.parse import quote

from opentelemetry import baggage as baggage_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.jaeger import JaegerPropagator
from opentelemetry.propagators.textmap import (
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from spoe_agent.config import PROPAGATORS

# The carrier keys the span language accepts as incoming headers, whatever the configured
# propagators: HAProxy forwards what it was told to, and extraction ignores the keys it does not
# understand. Jaeger baggage comes as one key per item under UBERCTX_PREFIX.
CARRIER_KEYS = frozenset(
    {
        "traceparent",
        "tracestate",
        "baggage",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "uber-trace-id",
    }
)
UBERCTX_PREFIX = "uberctx-"

# W3C Baggage: a key is a token, written as it is; a value's octets are the printable ASCII
# but space, '"', ',', ';' and '\\', and '%' starts an escape: everything else is percent-encoded.
_TOKEN_SAFE = ascii_letters + digits + "!#$&'*+-.^_`|~"
_VALUE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\%')


class W3CBaggage(W3CBaggagePropagator):
    """The OpenTelemetry W3C baggage propagator, with the percent-encoding W3C Baggage has.

    Up to at least 1.39 the API's propagator reads and writes form encoding (``unquote_plus``,
    ``quote_plus``; open-telemetry/opentelemetry-python#5566): a literal ``+`` from a caller
    became a space, and a space went out as ``+``, which a conforming service reads as a plus.
    HAProxy sits on every request's path, so it would rewrite every caller's baggage wrongly.
    Its list-members' properties (``k=v;p=1``) became part of their values (``v;p=1``, sent on
    as ``v%3Bp%3D1``): the API has no place for them, so they are dropped and the value kept.
    Parsing stays the API's (its limits and checks); only the encodings are corrected.
    """

    def extract(self, carrier: Any, context: Context | None = None,
                getter: Any = default_getter) -> Context:
        values = getter.get(carrier, self._BAGGAGE_HEADER_NAME)
        if not values:
            return super().extract(carrier, context, getter)
        # A '+' in a header is a plus: escaped, the API's unquote_plus gives it back as one.
        # A ';' is never part of a value (that one is written %3B): properties start there.
        header = {self._BAGGAGE_HEADER_NAME: [
            ",".join(member.split(";", 1)[0] for member in v.replace("+", "%2B").split(","))
            for v in values]}
        return super().extract(header, context)

    def inject(self, carrier: Any, context: Context | None = None,
               setter: Any = default_setter) -> None:
        entries = baggage_api.get_all(context)
        if entries:
            setter.set(carrier, self._BAGGAGE_HEADER_NAME, ",".join(
                f"{quote(str(key), safe=_TOKEN_SAFE)}={quote(str(value), safe=_VALUE_SAFE)}"
                for key, value in entries.items()))


_FACTORIES = {
    "tracecontext": TraceContextTextMapPropagator,
    "baggage": W3CBaggage,
    "b3": B3SingleFormat,
    "b3multi": B3MultiFormat,
    "jaeger": JaegerPropagator,
}


def build_propagator(names: str | Iterable[str]) -> TextMapPropagator:
    """Build the composite propagator OTEL_PROPAGATORS describes (a list or a comma-separated
    string), so the agent's configuration reads like every other OpenTelemetry component's.

    ``none`` (or an empty list) gives a propagator that neither extracts nor injects anything.
    An unknown name raises :class:`ValueError` naming it and the accepted ones, for the
    configuration layer to report.
    """
    if isinstance(names, str):
        names = names.split(",")
    seen: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name != "none" and name not in _FACTORIES:
            raise ValueError(
                f"unknown propagator {raw.strip()!r}; expected some of: "
                + ", ".join(PROPAGATORS)
            )
        if name not in seen:
            seen.append(name)
    if "none" in seen:
        if len(seen) > 1:
            raise ValueError("propagator 'none' cannot be combined with other propagators")
        return CompositePropagator([])
    return CompositePropagator([_FACTORIES[name]() for name in seen])


def extract_context(
    propagator: TextMapPropagator, carrier: Mapping[str, str]
) -> tuple[SpanContext | None, dict[str, str]]:
    """Read the incoming trace context and baggage of a request from its (lowercased) headers.

    Returns ``(None, baggage)`` when no valid remote span context is present: the session then
    starts a trace of its own, but still keeps whatever baggage arrived.
    """
    ctx = propagator.extract(carrier, context=Context())
    span_context = get_current_span(ctx).get_span_context()
    if not span_context.is_valid:
        span_context = None
    items = baggage_api.get_all(ctx)
    return span_context, {str(k): str(v) for k, v in items.items()} if items else {}


def inject_vars(
    propagator: TextMapPropagator,
    span_context: SpanContext,
    baggage: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Render a span context and baggage as the HAProxy variables that carry them to headers.

    Variable names are the carrier keys lowercased with ``-`` turned into ``_``, because HAProxy
    variable names cannot contain ``-`` (``traceparent``, ``x_b3_traceid``, ``uber_trace_id``).
    """
    ctx = set_span_in_context(NonRecordingSpan(span_context), Context())
    if baggage:
        for key, value in baggage.items():
            ctx = baggage_api.set_baggage(key, value, ctx)
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=ctx)
    return {key.lower().replace("-", "_"): value for key, value in carrier.items()}
