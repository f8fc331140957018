"""Trace-context carriers: the OpenTelemetry propagators, fed from and into HAProxy variables.

The header formats are parsed and written by the OpenTelemetry propagator packages rather than
by hand, so the agent interoperates exactly as OpenTelemetry SDKs do. Every call starts from an
empty :class:`Context`: under gevent the ambient context belongs to whatever greenlet runs, and
one session's context must never leak into another's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from string import ascii_letters, digits
from typing import Any
from urllib.parse import quote, unquote

from opentelemetry import baggage as baggage_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context, get_current
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

from spoe_agent.config import HTTP_TOKEN, PROPAGATORS

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

log = logging.getLogger(__name__)

# W3C Baggage: a key is a token (RFC 7230), written as it is; a value's octets are the
# printable ASCII but space, '"', ',', ';' and '\\', and '%' starts an escape.
_TOKEN_SAFE = ascii_letters + digits + "!#$%&'*+-.^_`|~"
_VALUE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\%')
_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
_OWS = " \t"


class W3CBaggage(W3CBaggagePropagator):
    """W3C baggage, read and written as W3C Baggage defines it.

    Up to at least 1.39 the OpenTelemetry API's propagator reads and writes form encoding
    (``unquote_plus``, ``quote_plus``; open-telemetry/opentelemetry-python#5566): a literal
    ``+`` from a caller became a space, and a space went out as ``+``, which a conforming
    service reads as a plus; it also percent-decoded keys (tokens, never encoded) and stripped
    spaces that a value carried encoded. HAProxy sits on every request's path, so it would
    rewrite every caller's baggage wrongly. Here: members split on ``,``, their optional
    whitespace trimmed, properties (``k=v;p=1``: the API has no place for them) dropped, the
    key kept as it is and the value percent-decoded; a malformed member is skipped. The API's
    limits are kept (8,192 bytes a header, 4,096 a member, 180 members).
    """

    def extract(self, carrier: Any, context: Context | None = None,
                getter: Any = default_getter) -> Context:
        if context is None:
            context = get_current()
        values = getter.get(carrier, self._BAGGAGE_HEADER_NAME)
        header = next(iter(values), None) if values else None
        if not header:
            return context
        if len(header) > self._MAX_HEADER_LENGTH:
            log.warning("baggage header of %d bytes ignored (at most %d)", len(header),
                        self._MAX_HEADER_LENGTH)
            return context
        taken = skipped = 0
        for member in header.split(","):
            if not member.strip(_OWS):
                continue
            key, sep, value = member.split(";", 1)[0].partition("=")
            key, value = key.strip(_OWS), value.strip(_OWS)
            if (len(member) > self._MAX_PAIR_LENGTH or not sep or not HTTP_TOKEN.fullmatch(key)
                    or not _VALUE.fullmatch(value)):
                skipped += 1
                continue
            context = baggage_api.set_baggage(key, unquote(value, errors="replace"), context)
            taken += 1
            if taken == self._MAX_PAIRS:
                break
        if skipped:
            log.warning("baggage: %d malformed list-member(s) ignored (W3C Baggage: "
                        "key=value, a token and baggage octets)", skipped)
        return context

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
