"""The generated Jaeger thrift specs, in the shape thrift's C ``fastbinary`` codec wants.

The generated ``thrift_spec`` tuples shipped with the exporter predate fastbinary's current calling
convention (it wants every struct argument as a ``[class, spec]`` list), so they are converted once
here and never modified in place. Both the encoders and the decoders take their arguments from
here, so they agree on the classes (see ``EMIT_BATCH_ARGS``).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.jaeger.thrift.gen.agent import Agent as _agent
from opentelemetry.exporter.jaeger.thrift.gen.jaeger import ttypes as jt
from thrift.Thrift import TType


def _convert_type_args(ttype: int, args: Any) -> Any:
    if ttype == TType.STRUCT:
        cls = args[0]
        return [cls, convert_spec(cls.thrift_spec)]
    if ttype in (TType.LIST, TType.SET):
        elem_type, elem_args, frozen = args
        return (elem_type, _convert_type_args(elem_type, elem_args), frozen)
    if ttype == TType.MAP:
        k_type, k_args, v_type, v_args, frozen = args
        return (
            k_type,
            _convert_type_args(k_type, k_args),
            v_type,
            _convert_type_args(v_type, v_args),
            frozen,
        )
    return args


_SPEC_CACHE: dict[int, tuple] = {}


def convert_spec(spec: tuple) -> tuple:
    """Return a copy of a generated ``thrift_spec`` usable by fastbinary (struct args as lists)."""
    cached = _SPEC_CACHE.get(id(spec))
    if cached is not None:
        return cached[1]
    fields = []
    for field in spec:
        if field is None:
            fields.append(None)
            continue
        fid, ttype, name, args, default = field
        fields.append((fid, ttype, name, _convert_type_args(ttype, args), default))
    converted = tuple(fields)
    _SPEC_CACHE[id(spec)] = (spec, converted)  # keep ``spec`` alive so its id stays unique
    return converted


def thrift_args(cls: type) -> list:
    """The ``[class, spec]`` argument fastbinary's encode/decode functions take for ``cls``."""
    return [cls, convert_spec(cls.thrift_spec)]


BATCH_ARGS = thrift_args(jt.Batch)
PROCESS_ARGS = thrift_args(jt.Process)
SPAN_ARGS = thrift_args(jt.Span)
# The generated agent code imports its Batch from a top-level ``jaeger`` package (a second copy of
# the classes); decode into the same classes as everything else instead.
EMIT_BATCH_ARGS = [
    _agent.emitBatch_args,
    (None, (1, TType.STRUCT, "batch", BATCH_ARGS, None)),
]

_SPAN_FIELDS = convert_spec(jt.Span.thrift_spec)
assert [f[2] for f in _SPAN_FIELDS[9:]] == ["duration", "tags", "logs"]
# Span fields 1-9 only: tags (10) and logs (11) are written after them by hand.
_SPAN_HEAD_ARGS = [jt.Span, _SPAN_FIELDS[:10]]
# The Span fields 1-9 that fastbinary encodes by attribute (_SPAN_HEAD_ARGS), by name.
_SPAN_HEAD_FIELDS = tuple(field[2] for field in _SPAN_FIELDS[1:10])
