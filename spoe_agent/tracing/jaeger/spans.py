"""The translated span and batch: the Jaeger structures that translation produces.

They mirror the generated ``ttypes`` (``Span``, ``Process``, ``Batch``) with ``__slots__``
classes that fastbinary reads by attribute, and keep a span's tags as segments that the encoders
write by hand (see ``tags``), rather than as ``Tag`` structs.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.jaeger.thrift.gen.jaeger import ttypes as jt

from spoe_agent.tracing.jaeger.specs import _SPAN_HEAD_FIELDS
from spoe_agent.tracing.jaeger.tags import ConstTags, TagPairs, _pairs, _thrift_tags


class _SpanRef:
    __slots__ = ("refType", "traceIdLow", "traceIdHigh", "spanId")

    def __init__(self, ref_type: int, trace_id_low: int, trace_id_high: int, span_id: int) -> None:
        self.refType = ref_type
        self.traceIdLow = trace_id_low
        self.traceIdHigh = trace_id_high
        self.spanId = span_id


class JaegerSpan:
    """A translated span: the thrift ``Span`` fields, with its tags kept as (key, value) segments.

    Segments are attribute mappings or pair lists whose values are normalised at encoding time
    exactly as the official ``_translate_attribute`` does; the shared ones are ``ConstTags``.
    ``service`` names the Process (batch) it belongs to.  ``to_thrift()`` rebuilds the generated
    ``ttypes.Span`` (for tests and debugging).
    """

    __slots__ = (
        *_SPAN_HEAD_FIELDS,
        "max_len",
        "service",
        "own_tags",
        "resource_tags",
        "status_tags",
        "suffix_tags",
        "dropped_tags",
        "logs",
    )
    # Declared for type checkers and mypyc (setup.py), which cannot read __slots__ built above.
    traceIdLow: int
    traceIdHigh: int
    spanId: int
    parentSpanId: int
    operationName: str
    references: list[_SpanRef] | None
    flags: int
    startTime: int
    duration: int
    max_len: int | None
    service: str
    own_tags: Any
    resource_tags: ConstTags
    status_tags: TagPairs | None
    suffix_tags: ConstTags
    dropped_tags: TagPairs | None
    logs: list[tuple[int, TagPairs, TagPairs]] | None

    def to_thrift(self) -> jt.Span:
        refs = None
        if self.references is not None:
            refs = [
                jt.SpanRef(r.refType, r.traceIdLow, r.traceIdHigh, r.spanId)
                for r in self.references
            ]
        logs = None
        if self.logs is not None:
            logs = [
                jt.Log(ts, _thrift_tags(fields, self.max_len) + _thrift_tags(tail, None))
                for ts, fields, tail in self.logs
            ]
        return jt.Span(
            traceIdLow=self.traceIdLow,
            traceIdHigh=self.traceIdHigh,
            spanId=self.spanId,
            parentSpanId=self.parentSpanId,
            operationName=self.operationName,
            references=refs,
            flags=self.flags,
            startTime=self.startTime,
            duration=self.duration,
            tags=[
                *_thrift_tags(_pairs(self.own_tags), self.max_len),
                *_thrift_tags(self.resource_tags.pairs, None),
                *_thrift_tags(self.status_tags or (), None),
                *_thrift_tags(self.suffix_tags.pairs, None),
                *_thrift_tags(self.dropped_tags or (), None),
            ],
            logs=logs,
        )


class ThriftProcess:
    """A Jaeger ``Process`` (the official exporter never sets process tags)."""

    __slots__ = ("serviceName", "tags")

    def __init__(self, service_name: str, tags: list | None = None) -> None:
        self.serviceName = service_name
        self.tags = tags


class ThriftBatch:
    """A Jaeger ``Batch``: one Process and the translated spans it emitted."""

    __slots__ = ("process", "spans")

    def __init__(self, process: ThriftProcess, spans: list[JaegerSpan]) -> None:
        self.process = process
        self.spans = spans
