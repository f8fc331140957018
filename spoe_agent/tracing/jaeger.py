"""Jaeger thrift export that is byte-compatible with the official exporter, at a fraction of its cost.

The official ``opentelemetry-exporter-jaeger-thrift`` spends ~100 µs per span: its translation
builds generated thrift objects through keyword constructors and its UDP client writes them with
the pure-Python compact protocol.  This module produces the very same bytes (the tests compare
them byte for byte) while avoiding most of that work:

* the fixed part of a span (ids, times, name, references) goes through thrift's C ``fastbinary``
  encoder; tags are written straight from the attribute mappings, with each key's encoded prefix
  cached (fastbinary walks all seven Tag fields per tag, which costs more than this);
* tags that depend only on the Resource, or on the span kind, instrumentation scope and error
  flag, are the majority of a span's tags: they are encoded once and their bytes spliced into
  every span that shares them;
* each span is encoded on its own, so an oversized UDP batch is packed by exact encoded size and
  nothing is encoded twice;
* on the UDP path the registry's ``SpanRecord`` tuples go straight to bytes
  (``encode_record_compact``), without a translated ``JaegerSpan`` in between, and all the tags
  they share (resource, status, kind and scope) are one cached byte string.

The generated ``thrift_spec`` tuples shipped with the exporter predate fastbinary's current calling
convention (it wants every struct argument as a ``[class, spec]`` list), so they are converted once
here and never modified in place.

Deviations from the official exporter, all where it would crash or silently lose data instead:
spans are grouped into one Batch per ``service.name`` (its Process is per batch; the official one
labels a mixed batch with the first span's service); an integer attribute outside the i64 range
becomes a string tag; a span that cannot be translated or encoded is dropped and counted rather
than failing the whole batch; oversized UDP batches are packed by encoded size rather than split
by span count.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.exporter.jaeger.thrift.gen.agent import Agent as _agent
from opentelemetry.exporter.jaeger.thrift.gen.jaeger import ttypes as jt
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from thrift.protocol import fastbinary
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TMessageType, TType
from thrift.transport.TTransport import TMemoryBuffer

from spoe_agent.tracing.registry import SPAN_KINDS, SpanRecord

log = logging.getLogger(__name__)

UDP_PACKET_MAX_LENGTH = 65000

# --------------------------------------------------------------------------------------------------
# thrift specs in the shape fastbinary wants


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

_encode_compact = fastbinary.encode_compact
_encode_binary = fastbinary.encode_binary

# --------------------------------------------------------------------------------------------------
# the translated span


class _SpanRef:
    __slots__ = ("refType", "traceIdLow", "traceIdHigh", "spanId")

    def __init__(self, ref_type: int, trace_id_low: int, trace_id_high: int, span_id: int) -> None:
        self.refType = ref_type
        self.traceIdLow = trace_id_low
        self.traceIdHigh = trace_id_high
        self.spanId = span_id


class _NoValue:
    """A string tag written without its value, as the official exporter does for a None version."""

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Any = _NoValue()

TagPairs = Iterable[tuple[str, Any]]


class ConstTags:
    """Tags shared by many spans (resource, kind+scope), pre-encoded in both protocols."""

    __slots__ = ("pairs", "count", "compact", "binary")

    def __init__(self, pairs: TagPairs, max_len: int | None) -> None:
        normalised = ((key, _normalise(value, max_len)) for key, value in pairs)
        self.pairs = [(key, value) for key, value in normalised if value is not None]
        parts: list[bytes] = []
        self.count = _tags_compact(self.pairs, None, parts)
        self.compact = b"".join(parts)
        parts = []
        _tags_binary(self.pairs, None, parts)
        self.binary = b"".join(parts)


# The Span fields 1-9 that fastbinary encodes by attribute (_SPAN_HEAD_ARGS), by name.
_SPAN_HEAD_FIELDS = tuple(field[2] for field in _SPAN_FIELDS[1:10])


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


class _RecordHead:
    """The fixed Span fields (1-9) of one record, as fastbinary reads them (by attribute).

    ``encode_record_compact`` refills one instance per span instead of building a ``JaegerSpan``:
    an allocation and a dozen attributes per span that the compact UDP path never reads.
    ``trace_id`` is the trace whose ids ``traceIdLow``/``traceIdHigh`` hold: records come a
    trace at a time, and the next record of the same trace keeps them rather than redo the
    big-integer arithmetic. Not shared between threads: each ``encode`` call uses its own.
    """

    __slots__ = ("trace_id", *_SPAN_HEAD_FIELDS)

    def __init__(self) -> None:
        self.trace_id: int | None = None


class RecordTags:
    """What every record with the same resource, kind, scope and status shares, encoded once.

    The resource, status and suffix (span.kind, scope, error) tags follow a span's own
    attributes in this order with nothing in between, so they are one compact byte string
    (``compact``); ``count`` is how many tags that is. After the head, a record without
    attributes or events is all shared bytes: the tags field with its list header, then the
    Span's STOP (``without_own``); one without events ends with ``compact_end``.
    ``service`` names the span's Process. The objects it was built from are kept so that an
    id reused by a new object is detected.
    """

    __slots__ = (
        "resource",
        "scope",
        "status",
        "service",
        "count",
        "compact",
        "compact_end",
        "without_own",
    )

    def __init__(
        self, resource: Any, scope: Any, status: Any, service: str, parts: Sequence[ConstTags]
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.status = status
        self.service = service
        self.count = sum(part.count for part in parts)
        self.compact = b"".join(part.compact for part in parts)
        self.compact_end = self.compact + _STOP
        self.without_own = b"\x19" + _list_header_compact(self.count) + self.compact_end


class EncodedSpans:
    """Spans translated and encoded for one transport, grouped by service, not yet sent.

    ``spans`` counts every span handed to ``encode``; ``invalid`` those that could not be
    translated or encoded (dropped, and counted in the exporter's stats when found).
    """

    __slots__ = ("groups", "spans", "invalid")

    def __init__(self) -> None:
        self.groups: dict[str, tuple[ThriftProcess, list[bytes]]] = {}
        self.spans = 0
        self.invalid = 0

    def __len__(self) -> int:
        return self.spans


def _pairs(tags: Any) -> TagPairs:
    if not tags:
        return ()
    return tags.items() if hasattr(tags, "items") else tags


# --------------------------------------------------------------------------------------------------
# tag values, as the official ``_translate_attribute`` treats them

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1


def _normalise(value: Any, max_len: int | None) -> Any:
    """Map an attribute value onto str/bool/int/float (or None to skip), slow path included."""
    vtype = type(value)
    if vtype is str:
        return value if max_len is None else value[:max_len]
    if vtype is int:
        if _I64_MIN <= value <= _I64_MAX:
            return value
        text = str(value)  # the official exporter would fail the whole batch on this one
        return text if max_len is None else text[:max_len]
    if vtype is bool or vtype is float or value is NO_VALUE:
        return value
    if vtype is tuple:
        text = str(value)
        return text if max_len is None else text[:max_len]
    # subclasses (IntEnum, str enums, ...) take the official isinstance route, in its order
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return _normalise(str(value), max_len)
    if isinstance(value, int):
        return _normalise(int(value), max_len)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, tuple):
        return _normalise(tuple(value), max_len)
    return None


def _thrift_tags(pairs: TagPairs, max_len: int | None) -> list[jt.Tag]:
    tags = []
    for key, raw in pairs:
        value = _normalise(raw, max_len)
        vtype = type(value)
        if value is NO_VALUE:
            tags.append(jt.Tag(key=key, vType=jt.TagType.STRING))
        elif vtype is str:
            tags.append(jt.Tag(key=key, vType=jt.TagType.STRING, vStr=value))
        elif vtype is bool:
            tags.append(jt.Tag(key=key, vType=jt.TagType.BOOL, vBool=value))
        elif vtype is int:
            tags.append(jt.Tag(key=key, vType=jt.TagType.LONG, vLong=value))
        elif vtype is float:
            tags.append(jt.Tag(key=key, vType=jt.TagType.DOUBLE, vDouble=value))
    return tags


# --------------------------------------------------------------------------------------------------
# tag encoding by hand, with each key's encoded prefix cached
#
# Compact protocol: a field header is one byte (id delta << 4 | type); integers are zigzag
# varints, doubles little-endian, and a bool field's value is its header's type (1 true, 2 false).
# A list header is one byte (size << 4 | element type) below 15 elements, else 0xFC + varint size.
# Tag is {1: key, 2: vType (i32), 3: vStr, 4: vDouble, 5: vBool, 6: vLong}.
# Binary protocol: a field header is type + i16 id; a list header is element type + i32 size.


def _varint(value: int) -> bytes:
    if value < 0x4000:
        return bytes((value,)) if value < 0x80 else bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_VARINTS = [_varint(n) for n in range(128)]
_pack_i32 = struct.Struct(">i").pack
_pack_i64 = struct.Struct(">q").pack
_pack_f64_be = struct.Struct(">d").pack
_pack_f64_le = struct.Struct("<d").pack
_STOP = b"\x00"
_KEY_CACHE_LIMIT = 4096
_compact_keys: dict[str, tuple[bytes, ...]] = {}
_binary_keys: dict[str, tuple[bytes, ...]] = {}


def _compact_key(key: str) -> tuple[bytes, ...]:
    encoded = key.encode("utf-8")
    head = b"\x18" + _varint(len(encoded)) + encoded + b"\x15"  # key, then vType's header
    prefixes = (
        head + b"\x00\x18",  # STRING, vStr header
        head + b"\x06\x46",  # LONG, vLong header
        head + b"\x04\x31\x00",  # BOOL true, STOP
        head + b"\x04\x32\x00",  # BOOL false, STOP
        head + b"\x02\x27",  # DOUBLE, vDouble header
        head + b"\x00\x00",  # STRING without value, STOP
    )
    if len(_compact_keys) >= _KEY_CACHE_LIMIT:
        _compact_keys.clear()
    _compact_keys[key] = prefixes
    return prefixes


def _binary_key(key: str) -> tuple[bytes, ...]:
    encoded = key.encode("utf-8")
    head = b"\x0b\x00\x01" + _pack_i32(len(encoded)) + encoded + b"\x08\x00\x02"
    prefixes = (
        head + b"\x00\x00\x00\x00\x0b\x00\x03",
        head + b"\x00\x00\x00\x03\x0a\x00\x06",
        head + b"\x00\x00\x00\x02\x02\x00\x05\x01\x00",
        head + b"\x00\x00\x00\x02\x02\x00\x05\x00\x00",
        head + b"\x00\x00\x00\x01\x04\x00\x04",
        head + b"\x00\x00\x00\x00\x00",
    )
    if len(_binary_keys) >= _KEY_CACHE_LIMIT:
        _binary_keys.clear()
    _binary_keys[key] = prefixes
    return prefixes


def _tags_compact(pairs: TagPairs, max_len: int | None, parts: list[bytes]) -> int:
    """Append the compact encoding of each tag to ``parts``; return how many were written."""
    count = 0
    keys = _compact_keys
    varints = _VARINTS
    append = parts.append
    for key, value in pairs:
        prefixes = keys.get(key) or _compact_key(key)
        vtype = type(value)
        if vtype is str:
            if max_len is not None:
                value = value[:max_len]
            encoded = value.encode("utf-8")
            size = len(encoded)
            parts += (prefixes[0], varints[size] if size < 128 else _varint(size), encoded, _STOP)
        elif vtype is int and _I64_MIN <= value <= _I64_MAX:
            zigzag = (value << 1) ^ (value >> 63)
            parts += (prefixes[1], varints[zigzag] if zigzag < 128 else _varint(zigzag), _STOP)
        elif vtype is bool:
            append(prefixes[2] if value else prefixes[3])
        elif vtype is float:
            parts += (prefixes[4], _pack_f64_le(value), _STOP)
        elif value is NO_VALUE:
            append(prefixes[5])
        else:
            value = _normalise(value, max_len)
            if value is None:
                continue
            count += _tags_compact(((key, value),), None, parts)
            continue
        count += 1
    return count


def _tags_binary(pairs: TagPairs, max_len: int | None, parts: list[bytes]) -> int:
    """Append the binary encoding of each tag to ``parts``; return how many were written."""
    count = 0
    keys = _binary_keys
    append = parts.append
    for key, value in pairs:
        prefixes = keys.get(key) or _binary_key(key)
        vtype = type(value)
        if vtype is str:
            if max_len is not None:
                value = value[:max_len]
            encoded = value.encode("utf-8")
            parts += (prefixes[0], _pack_i32(len(encoded)), encoded, _STOP)
        elif vtype is int and _I64_MIN <= value <= _I64_MAX:
            parts += (prefixes[1], _pack_i64(value), _STOP)
        elif vtype is bool:
            append(prefixes[2] if value else prefixes[3])
        elif vtype is float:
            parts += (prefixes[4], _pack_f64_be(value), _STOP)
        elif value is NO_VALUE:
            append(prefixes[5])
        else:
            value = _normalise(value, max_len)
            if value is None:
                continue
            count += _tags_binary(((key, value),), None, parts)
            continue
        count += 1
    return count


_CT_STRUCT = 0x0C


def _compact_list_header(count: int) -> bytes:
    if count < 15:
        return bytes([(count << 4) | _CT_STRUCT])
    return bytes([0xF0 | _CT_STRUCT]) + _varint(count)


_COMPACT_LIST_HEADERS = [_compact_list_header(n) for n in range(128)]


def _list_header_compact(count: int) -> bytes:
    return _COMPACT_LIST_HEADERS[count] if count < 128 else _compact_list_header(count)


def _zigzag_varint(value: int) -> bytes:
    return _varint(((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF)


# --------------------------------------------------------------------------------------------------
# translation

_KIND_NAMES = {
    SpanKind.CLIENT: "client",
    SpanKind.SERVER: "server",
    SpanKind.CONSUMER: "consumer",
    SpanKind.PRODUCER: "producer",
    SpanKind.INTERNAL: "internal",
}
_FOLLOWS_FROM = jt.SpanRefType.FOLLOWS_FROM
_UNSET = StatusCode.UNSET
_ERROR = StatusCode.ERROR
_STATUS_OK = [("otel.status_code", "OK")]
_STATUS_ERROR = [("otel.status_code", "ERROR")]
_U64 = 1 << 64
_LOW64 = _U64 - 1
_CACHE_LIMIT = 256


def _i64(value: int) -> int:
    return value - _U64 if value > _I64_MAX else value


def _plain(attributes: Any) -> Any:
    """The dict behind BoundedAttributes: its public iteration locks and copies per access.

    Only used on ended spans, whose attributes no longer change.
    """
    return getattr(attributes, "_dict", attributes)


class JaegerTranslator:
    """Turns SDK spans into Jaeger spans; caches what depends only on Resource/kind/scope."""

    def __init__(
        self, max_tag_value_length: int | None = None, default_service_name: str | None = None
    ) -> None:
        self.max_tag_value_length = max_tag_value_length
        if default_service_name is None:
            default_service_name = Resource.create().attributes.get(SERVICE_NAME)
        self.default_service_name = default_service_name or "unknown_service"
        # keyed by id(obj); entries hold obj so its id cannot be reused while cached
        self._resources: dict[int, tuple[Any, ConstTags, str]] = {}
        self._suffixes: dict[tuple[int, int, bool], tuple[Any, ConstTags]] = {}
        self._record_tags: dict[tuple[int, int, Any], RecordTags] = {}

    def _resource_entry(self, resource: Any) -> tuple[Any, ConstTags, str]:
        entry = self._resources.get(id(resource))
        if entry is None or entry[0] is not resource:
            attrs = resource.attributes if resource is not None else None
            tags = ConstTags(list(_pairs(attrs)), self.max_tag_value_length)
            service = attrs.get(SERVICE_NAME) if attrs else None
            entry = (resource, tags, service or self.default_service_name)
            if len(self._resources) >= _CACHE_LIMIT:
                self._resources.clear()
            self._resources[id(resource)] = entry
        return entry

    def _suffix(self, kind: SpanKind, scope: Any, error: bool) -> ConstTags:
        """span.kind, the instrumentation scope tags and ``error``: what follows the status tags."""
        key = (id(kind), id(scope), error)  # ids: Enum hashing is a Python-level call
        entry = self._suffixes.get(key)
        if entry is None or entry[0] is not scope:
            pairs: list[tuple[str, Any]] = [("span.kind", _KIND_NAMES[kind])]
            if scope:
                version = NO_VALUE if scope.version is None else scope.version
                pairs += [
                    ("otel.library.name", scope.name),
                    ("otel.library.version", version),
                    ("otel.scope.name", scope.name),
                    ("otel.scope.version", version),
                ]
            if error:
                pairs.append(("error", True))
            entry = (scope, ConstTags(pairs, None))
            if len(self._suffixes) >= _CACHE_LIMIT:
                self._suffixes.clear()
            self._suffixes[key] = entry
        return entry[1]

    def service_name(self, span: ReadableSpan) -> str:
        """The Process service name the span belongs to (its Resource's ``service.name``)."""
        return self._resource_entry(span.resource)[2]

    def record_tags(self, record: SpanRecord) -> RecordTags:
        """The pre-encoded tags a record shares with others (see ``RecordTags``).

        The registry reuses a few resource, scope and status objects for all its records, so
        one lookup replaces the resource and suffix lookups and the status tags that
        ``translate_record`` does per span. Keyed by the resource's id (``Resource`` hashes its
        attributes, in Python), the kind and the status (hashed by identity); the scope, always
        the registry's, is checked rather than hashed: another one replaces the entry.
        """
        resource = record[12]
        key = (id(resource), record[5], record[9])
        entry = self._record_tags.get(key)
        if entry is None or entry.resource is not resource or entry.scope is not record[13]:
            entry = self._new_record_tags(key, record)
        return entry

    def _new_record_tags(self, key: tuple[int, int, Any], record: SpanRecord) -> RecordTags:
        resource, kind, scope, status = record[12], record[5], record[13], record[9]
        _, resource_tags, service = self._resource_entry(resource)
        error = False
        parts = [resource_tags]
        if status is not None and status.status_code is not _UNSET:
            error = status.status_code is _ERROR
            status_tags = _STATUS_ERROR if error else _STATUS_OK
            if status.description is not None:
                status_tags = [*status_tags, ("otel.status_description", status.description)]
            parts.append(ConstTags(status_tags, None))
        parts.append(self._suffix(SPAN_KINDS[kind], scope, error))
        entry = RecordTags(resource, scope, status, service, parts)
        if len(self._record_tags) >= _CACHE_LIMIT:
            self._record_tags.clear()
        self._record_tags[key] = entry
        return entry

    def translate(self, span: ReadableSpan) -> JaegerSpan:
        """Translate one ended span into what the official ``ThriftTranslator`` would produce."""
        if type(span) is SpanRecord:
            return self.translate_record(span)
        if isinstance(span, ReadableSpan):
            # the public properties copy these collections on every access
            attributes, events, links = span._attributes, span._events, span._links
        else:
            attributes, events, links = span.attributes, span.events, span.links
        ctx = span.context
        trace_id = ctx.trace_id
        start = span.start_time
        out = JaegerSpan()
        out.traceIdHigh = _i64(trace_id >> 64)
        out.traceIdLow = _i64(trace_id & _LOW64)
        out.spanId = _i64(ctx.span_id)
        parent = span.parent
        out.parentSpanId = _i64(parent.span_id) if parent else 0
        out.operationName = span.name
        out.flags = int(ctx.trace_flags)
        out.startTime = (start + 500) // 1000
        out.duration = (span.end_time - start + 500) // 1000
        out.max_len = self.max_tag_value_length

        out.own_tags = _plain(attributes) if attributes else None
        _, out.resource_tags, out.service = self._resource_entry(span.resource)
        status = span.status
        code = status.status_code
        if code is _UNSET:
            out.status_tags = None
        else:
            status_tags = _STATUS_ERROR if code is _ERROR else _STATUS_OK
            if status.description is not None:
                status_tags = [*status_tags, ("otel.status_description", status.description)]
            out.status_tags = status_tags
        out.suffix_tags = self._suffix(span.kind, span.instrumentation_scope, code is _ERROR)
        dropped_tags = None
        dropped_attributes = getattr(attributes, "dropped", 0)
        dropped_events = getattr(events, "dropped", 0)
        dropped_links = getattr(links, "dropped", 0)
        if dropped_attributes or dropped_events or dropped_links:
            dropped_tags = []
            if dropped_attributes:
                dropped_tags.append(("otel.dropped_attributes_count", dropped_attributes))
            if dropped_events:
                dropped_tags.append(("otel.dropped_events_count", dropped_events))
            if dropped_links:
                dropped_tags.append(("otel.dropped_links_count", dropped_links))
        out.dropped_tags = dropped_tags

        if links:
            refs = []
            for link in links:
                lctx = link.context
                ltrace = lctx.trace_id
                refs.append(
                    _SpanRef(
                        _FOLLOWS_FROM, _i64(ltrace & _LOW64), _i64(ltrace >> 64), _i64(lctx.span_id)
                    )
                )
            out.references = refs
        else:
            out.references = None

        if events:
            logs = []
            for event in events:
                event_attributes = event.attributes
                fields = _pairs(_plain(event_attributes))
                tail = [("message", event.name)]  # the official exporter never truncates these
                dropped = getattr(event_attributes, "dropped", 0)
                if dropped:
                    tail.insert(0, ("otel.dropped_attributes_count", dropped))
                logs.append(((event.timestamp + 500) // 1000, fields, tail))
            out.logs = logs
        else:
            out.logs = None
        return out

    def translate_record(self, record: SpanRecord) -> JaegerSpan:
        """``translate`` for the registry's own span tuples, with the same result as for the
        ``ReadableSpan`` the registry would otherwise have built (the tests compare the bytes).

        What the registry puts in a record is already plain: attributes and event values are
        str/int/bool, nothing was dropped by SDK limits, links share the span's trace.
        """
        (
            name,
            trace_id,
            span_id,
            parent_id,
            flags,
            kind,
            attrs,
            events,
            link_ids,
            status,
            start,
            end,
            resource,
            scope,
        ) = record
        # _i64, inlined: this runs for every span
        high = trace_id >> 64
        if high > _I64_MAX:
            high -= _U64
        low = trace_id & _LOW64
        if low > _I64_MAX:
            low -= _U64
        entry = self._resources.get(id(resource))
        if entry is None or entry[0] is not resource:
            entry = self._resource_entry(resource)
        out = JaegerSpan()
        out.traceIdHigh = high
        out.traceIdLow = low
        out.spanId = span_id - _U64 if span_id > _I64_MAX else span_id
        out.parentSpanId = parent_id - _U64 if parent_id > _I64_MAX else parent_id
        out.operationName = name
        out.flags = int(flags)
        out.startTime = (start + 500) // 1000
        out.duration = (end - start + 500) // 1000
        out.max_len = self.max_tag_value_length
        out.own_tags = attrs or None
        out.resource_tags = entry[1]
        out.service = entry[2]
        error = False
        out.status_tags = None
        if status is not None:
            code = status.status_code
            if code is not _UNSET:
                error = code is _ERROR
                status_tags = _STATUS_ERROR if error else _STATUS_OK
                if status.description is not None:
                    status_tags = [*status_tags, ("otel.status_description", status.description)]
                out.status_tags = status_tags
        out.suffix_tags = self._suffix(SPAN_KINDS[kind], scope, error)
        out.dropped_tags = None
        if link_ids:
            out.references = [
                _SpanRef(_FOLLOWS_FROM, low, high, i - _U64 if i > _I64_MAX else i)
                for i in link_ids
            ]
        else:
            out.references = None
        out.logs = _record_logs(events) if events else None
        return out

    def batches(self, spans: Iterable[ReadableSpan]) -> tuple[list[ThriftBatch], int]:
        """Group spans into one Batch per service; returns (batches, spans that failed to translate).

        Order is kept within each service so a single-service export is byte-identical to the
        official exporter's batch.
        """
        groups: dict[str, list[JaegerSpan]] = {}
        failed = 0
        for span in spans:
            try:
                translated = self.translate(span)
            except Exception:  # a malformed span must not sink its whole batch
                log.debug("cannot translate span %r", getattr(span, "name", span), exc_info=True)
                failed += 1
                continue
            group = groups.get(translated.service)
            if group is None:
                groups[translated.service] = [translated]
            else:
                group.append(translated)
        batches = [ThriftBatch(ThriftProcess(service), group) for service, group in groups.items()]
        return batches, failed


def _record_logs(events: list[tuple[str, Any, int]]) -> list[tuple[int, TagPairs, TagPairs]]:
    """A record's events as ``JaegerSpan.logs``: (time in µs, fields, tail).

    The event's value is its only attribute, under the event's name, which is also the message.
    """
    return [((ts + 500) // 1000, ((key, value),), [("message", key)]) for key, value, ts in events]


# --------------------------------------------------------------------------------------------------
# span, batch and datagram encoding


def encode_span_compact(span: JaegerSpan) -> bytes:
    """One Span struct in TCompactProtocol, as it appears inside a Batch's span list."""
    max_len = span.max_len
    own: list[bytes] = []
    count = span.resource_tags.count + span.suffix_tags.count
    if span.own_tags:
        count += _tags_compact(span.own_tags.items(), max_len, own)
    own.append(span.resource_tags.compact)
    if span.status_tags:
        count += _tags_compact(span.status_tags, None, own)
    own.append(span.suffix_tags.compact)
    if span.dropped_tags:
        count += _tags_compact(span.dropped_tags, None, own)
    head = _encode_compact(span, _SPAN_HEAD_ARGS)
    # duration (field 9) is always the last head field, so tags (10) has delta 1, and logs too
    parts = [head[:-1], b"\x19", _list_header_compact(count), *own]
    if span.logs is not None:
        _logs_compact(span.logs, max_len, parts)
    parts.append(_STOP)
    return b"".join(parts)


def _logs_compact(
    logs: Sequence[tuple[int, TagPairs, TagPairs]], max_len: int | None, parts: list[bytes]
) -> None:
    """Append a Span's logs field (11, right after the tags) to ``parts``.

    Each log is (timestamp in µs, fields truncated to ``max_len``, tail never truncated).
    """
    parts.append(b"\x19")
    parts.append(_list_header_compact(len(logs)))
    for timestamp, fields, tail in logs:
        log_parts: list[bytes] = []
        n = _tags_compact(fields, max_len, log_parts) + _tags_compact(tail, None, log_parts)
        parts.append(b"\x16")  # Log.timestamp: field 1, i64
        parts.append(_zigzag_varint(timestamp))
        parts.append(b"\x19")  # Log.fields: field 2, list
        parts.append(_list_header_compact(n))
        parts.extend(log_parts)
        parts.append(_STOP)


def encode_record_compact(
    record: SpanRecord, tags: RecordTags, max_len: int | None, head: _RecordHead
) -> bytes:
    """A registry record as a compact Span struct: ``encode_span_compact(translate_record(r))``.

    The same bytes without the ``JaegerSpan`` in between, which on the UDP path is most of the
    cost of a span: the head's fields go into the scratch ``head`` for fastbinary, the shared
    tags come pre-encoded from ``tags`` (``JaegerTranslator.record_tags(record)``).
    """
    name, trace_id, span_id, parent_id, flags, _, attrs, events, links, _, start, end, _, _ = record
    if trace_id != head.trace_id:
        _set_trace(head, trace_id)
    head.spanId = span_id - _U64 if span_id > _I64_MAX else span_id
    head.parentSpanId = parent_id - _U64 if parent_id > _I64_MAX else parent_id
    head.operationName = name
    head.references = _record_refs(head, links) if links else None
    head.flags = flags  # a TraceFlags: fastbinary takes it as the int it is
    head.startTime = (start + 500) // 1000
    head.duration = (end - start + 500) // 1000
    # duration (field 9) ends the head: its STOP gives way to the tags (field 10, delta 1)
    encoded_head = _encode_compact(head, _SPAN_HEAD_ARGS)[:-1]
    if not attrs and not events:
        return encoded_head + tags.without_own
    parts = [encoded_head, b"\x19", b""]  # the list header goes in once the tags are counted
    count = tags.count
    if attrs:
        count += _tags_compact(attrs.items(), max_len, parts)
    parts[2] = _list_header_compact(count)
    if events:
        parts.append(tags.compact)
        _logs_compact(_record_logs(events), max_len, parts)
        parts.append(_STOP)
    else:
        parts.append(tags.compact_end)
    return b"".join(parts)


def _set_trace(head: _RecordHead, trace_id: int) -> None:
    """Split a 128-bit trace id into the head's two signed 64-bit halves."""
    high = trace_id >> 64
    low = trace_id & _LOW64
    head.traceIdHigh = high - _U64 if high > _I64_MAX else high
    head.traceIdLow = low - _U64 if low > _I64_MAX else low
    head.trace_id = trace_id


class _FollowsFrom:
    """A SpanRef to a span of the head's trace, as all of a record's links are.

    Filled in attribute by attribute: a constructor call would cost more than the span ids.
    """

    __slots__ = ("traceIdLow", "traceIdHigh", "spanId")
    refType = _FOLLOWS_FROM


def _record_refs(head: _RecordHead, link_ids: Iterable[int]) -> list[_FollowsFrom]:
    """A record's follows-from links, for the span whose trace ``head`` holds.

    A loop rather than a comprehension: that is one more function call (Python 3.11), for what
    is mostly a single link.
    """
    refs = []
    for span_id in link_ids:
        ref = _FollowsFrom()
        ref.traceIdLow = head.traceIdLow
        ref.traceIdHigh = head.traceIdHigh
        ref.spanId = span_id - _U64 if span_id > _I64_MAX else span_id
        refs.append(ref)
    return refs


def encode_span_binary(span: JaegerSpan) -> bytes:
    """One Span struct in TBinaryProtocol."""
    max_len = span.max_len
    own: list[bytes] = []
    count = span.resource_tags.count + span.suffix_tags.count
    if span.own_tags:
        count += _tags_binary(span.own_tags.items(), max_len, own)
    own.append(span.resource_tags.binary)
    if span.status_tags:
        count += _tags_binary(span.status_tags, None, own)
    own.append(span.suffix_tags.binary)
    if span.dropped_tags:
        count += _tags_binary(span.dropped_tags, None, own)
    head = _encode_binary(span, _SPAN_HEAD_ARGS)
    parts = [head[:-1], b"\x0f\x00\x0a\x0c", _pack_i32(count), *own]
    if span.logs is not None:
        parts.append(b"\x0f\x00\x0b\x0c")
        parts.append(_pack_i32(len(span.logs)))
        for timestamp, fields, tail in span.logs:
            log_parts: list[bytes] = []
            n = _tags_binary(fields, max_len, log_parts) + _tags_binary(tail, None, log_parts)
            parts.append(b"\x0a\x00\x01")
            parts.append(_pack_i64(timestamp))
            parts.append(b"\x0f\x00\x02\x0c")
            parts.append(_pack_i32(n))
            parts.extend(log_parts)
            parts.append(_STOP)
    parts.append(_STOP)
    return b"".join(parts)


def encode_process_compact(process: Any) -> bytes:
    return _encode_compact(process, PROCESS_ARGS)


def encode_process_binary(process: Any) -> bytes:
    return _encode_binary(process, PROCESS_ARGS)


def batch_compact_from_parts(process_bytes: bytes, span_bytes: Sequence[bytes]) -> bytes:
    """A compact Batch struct from an encoded Process and encoded Spans."""
    return b"".join(
        (
            b"\x1c",  # field 1, struct: process
            process_bytes,
            b"\x19",  # field 2, list: spans
            _list_header_compact(len(span_bytes)),
            *span_bytes,
            _STOP,
        )
    )


def batch_binary_from_parts(process_bytes: bytes, span_bytes: Sequence[bytes]) -> bytes:
    """A binary Batch struct from an encoded Process and encoded Spans."""
    return b"".join(
        (
            b"\x0c\x00\x01",
            process_bytes,
            b"\x0f\x00\x02\x0c",
            _pack_i32(len(span_bytes)),
            *span_bytes,
            _STOP,
        )
    )


def encode_batch_compact(batch: ThriftBatch) -> bytes:
    """The Batch struct alone in TCompactProtocol."""
    return batch_compact_from_parts(
        encode_process_compact(batch.process), [encode_span_compact(s) for s in batch.spans]
    )


def encode_batch_binary(batch: ThriftBatch) -> bytes:
    """The Batch struct in TBinaryProtocol: the body jaeger-collector's /api/traces takes."""
    return batch_binary_from_parts(
        encode_process_binary(batch.process), [encode_span_binary(s) for s in batch.spans]
    )


# Agent.emitBatch oneway message in TCompactProtocol, exactly as agent.Client writes it with
# seqid 0: protocol id, version|type, varint seqid, name, then the args struct whose only field
# (id 1, struct) is the Batch.
_METHOD = b"emitBatch"
EMIT_BATCH_PREFIX = (
    bytes([0x82, 0x01 | (TMessageType.ONEWAY << 5), 0x00])
    + _varint(len(_METHOD))
    + _METHOD
    + b"\x1c"
)
EMIT_BATCH_SUFFIX = b"\x00"  # STOP of the args struct
# prefix, process field header, spans field header, two STOPs (the list header varies)
_DATAGRAM_OVERHEAD = len(EMIT_BATCH_PREFIX) + 1 + 1 + 1 + len(EMIT_BATCH_SUFFIX)


def _list_header_len(count: int) -> int:
    return 1 if count < 15 else 1 + len(_varint(count))


def datagram_size(process_bytes: bytes, span_sizes: Iterable[int]) -> int:
    """The exact size of ``emit_batch_datagram`` for spans of these encoded sizes."""
    sizes = list(span_sizes)
    return _DATAGRAM_OVERHEAD + len(process_bytes) + _list_header_len(len(sizes)) + sum(sizes)


def emit_batch_datagram(process_bytes: bytes, span_bytes: Sequence[bytes]) -> bytes:
    """A complete jaeger-agent UDP datagram from an encoded Process and encoded Spans."""
    return (
        EMIT_BATCH_PREFIX + batch_compact_from_parts(process_bytes, span_bytes) + EMIT_BATCH_SUFFIX
    )


def encode_emit_batch(batch: ThriftBatch) -> bytes:
    """A complete jaeger-agent UDP datagram (``Agent.emitBatch``, compact protocol)."""
    return EMIT_BATCH_PREFIX + encode_batch_compact(batch) + EMIT_BATCH_SUFFIX


def pack_span_bytes(
    process_bytes: bytes, span_bytes: Sequence[bytes], max_size: int = UDP_PACKET_MAX_LENGTH
) -> tuple[list[tuple[bytes, int]], int]:
    """Pack encoded spans greedily into emitBatch datagrams of at most ``max_size`` bytes.

    Returns ([(datagram, span count)], spans dropped because alone they exceed a datagram).
    """
    budget = max_size - _DATAGRAM_OVERHEAD - len(process_bytes)  # for list header and spans
    datagrams: list[tuple[bytes, int]] = []
    dropped = 0
    current: list[bytes] = []
    used = 0
    for encoded in span_bytes:
        size = len(encoded)
        if 1 + size > budget:
            dropped += 1
            continue
        if used + size + _list_header_len(len(current) + 1) > budget:
            datagrams.append((emit_batch_datagram(process_bytes, current), len(current)))
            current, used = [], 0
        current.append(encoded)
        used += size
    if current:
        datagrams.append((emit_batch_datagram(process_bytes, current), len(current)))
    return datagrams, dropped


def pack_datagrams(
    batch: ThriftBatch, max_size: int = UDP_PACKET_MAX_LENGTH
) -> tuple[list[bytes], int]:
    """Split a batch into emitBatch datagrams of at most ``max_size`` bytes each.

    Returns (datagrams, spans dropped because alone they do not fit in a datagram).
    """
    packed, dropped = pack_span_bytes(
        encode_process_compact(batch.process),
        [encode_span_compact(s) for s in batch.spans],
        max_size,
    )
    return [datagram for datagram, _ in packed], dropped


# --------------------------------------------------------------------------------------------------
# transports


class _UDPSender:
    """Sends datagrams to jaeger-agent; resolves the host now and then rather than per packet."""

    RESOLVE_EVERY_S = 30.0

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._addr: Any = None
        self._resolved_at = 0.0

    def _target(self) -> tuple[socket.socket, Any]:
        now = time.monotonic()
        if self._sock is None or now - self._resolved_at > self.RESOLVE_EVERY_S:
            infos = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_DGRAM)
            family, _, _, _, addr = infos[0]
            if self._sock is None or self._sock.family != family:
                self.close()
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._addr = addr
            self._resolved_at = now
        return self._sock, self._addr

    def send(self, datagram: bytes) -> None:
        sock, addr = self._target()
        try:
            sock.sendto(datagram, addr)
        except OSError:
            self._resolved_at = 0.0  # re-resolve on the next attempt
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _HTTPSender:
    """POSTs binary thrift Batches to jaeger-collector, keeping the connection alive between posts.

    Plain ``http.client`` so gevent's monkeypatching makes it cooperative, and no dependency
    beyond the standard library.
    """

    def __init__(
        self, endpoint: str, username: str | None, password: str | None, timeout: float
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported Jaeger collector endpoint: {endpoint!r}")
        self.endpoint = endpoint
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._headers = {"Content-Type": "application/x-thrift"}
        if username is not None and password is not None:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout)
        return self._conn

    def send(self, body: bytes) -> None:
        """Raise on transport errors and non-2xx answers."""
        reused = self._conn is not None
        try:
            status, reason = self._post(body)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.close()
            if not reused:
                raise
            status, reason = self._post(body)  # the kept-alive connection had gone stale
        except Exception:
            self.close()
            raise
        if not 200 <= status < 300:
            raise OSError(f"Jaeger collector answered HTTP {status} {reason}")

    def _post(self, body: bytes) -> tuple[int, str]:
        conn = self._connection()
        try:
            conn.request("POST", self._path, body=body, headers=self._headers)
            response = conn.getresponse()
            response.read()
        except Exception:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response.reason

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --------------------------------------------------------------------------------------------------
# the exporter


@dataclass
class ExportStats:
    """Plain counters; read them for metrics, never reset by the exporter."""

    spans_sent: int = 0
    datagrams_sent: int = 0
    http_posts: int = 0
    bytes_sent: int = 0
    send_errors: int = 0
    spans_failed: int = 0  # spans in datagrams/posts that could not be sent
    spans_dropped_oversize: int = 0
    spans_dropped_invalid: int = 0  # spans that could not be translated or encoded


class FastJaegerExporter(SpanExporter):
    """A drop-in for the official ``JaegerExporter`` (same arguments, same wire bytes), but fast.

    With ``collector_endpoint`` set, batches go to the collector over HTTP only; otherwise to the
    agent over UDP, as the official exporter does. ``export`` also takes the registry's
    :class:`SpanRecord` tuples (``accepts_span_records``), mixed with SDK spans or not.
    """

    accepts_span_records = True

    def __init__(
        self,
        agent_host_name: str = "localhost",
        agent_port: int = 6831,
        collector_endpoint: str | None = None,
        username: str | None = None,
        password: str | None = None,
        max_tag_value_length: int | None = None,
        timeout: float = 10,
        udp_split_oversized_batches: bool = True,
        *,
        max_packet_size: int = UDP_PACKET_MAX_LENGTH,
        default_service_name: str | None = None,
    ) -> None:
        self.agent_host_name = agent_host_name
        self.agent_port = agent_port
        self.collector_endpoint = collector_endpoint or None
        self.udp_split_oversized_batches = udp_split_oversized_batches
        self.max_packet_size = max_packet_size
        self.stats = ExportStats()
        self.translator = JaegerTranslator(max_tag_value_length, default_service_name)
        self._udp = _UDPSender(agent_host_name, agent_port)
        self._http = (
            _HTTPSender(self.collector_endpoint, username, password, timeout)
            if self.collector_endpoint
            else None
        )
        self._process_bytes: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._shutdown = False

    @classmethod
    def from_env(cls, **overrides: Any) -> FastJaegerExporter:
        """Build from the official ``OTEL_EXPORTER_JAEGER_*`` variables; explicit args win."""
        env = os.environ
        kwargs: dict[str, Any] = {}
        if env.get("OTEL_EXPORTER_JAEGER_AGENT_HOST"):
            kwargs["agent_host_name"] = env["OTEL_EXPORTER_JAEGER_AGENT_HOST"]
        if env.get("OTEL_EXPORTER_JAEGER_AGENT_PORT"):
            kwargs["agent_port"] = int(env["OTEL_EXPORTER_JAEGER_AGENT_PORT"])
        if env.get("OTEL_EXPORTER_JAEGER_ENDPOINT"):
            kwargs["collector_endpoint"] = env["OTEL_EXPORTER_JAEGER_ENDPOINT"]
        if "OTEL_EXPORTER_JAEGER_USER" in env:
            kwargs["username"] = env["OTEL_EXPORTER_JAEGER_USER"]
        if "OTEL_EXPORTER_JAEGER_PASSWORD" in env:
            kwargs["password"] = env["OTEL_EXPORTER_JAEGER_PASSWORD"]
        if env.get("OTEL_EXPORTER_JAEGER_TIMEOUT"):
            kwargs["timeout"] = float(env["OTEL_EXPORTER_JAEGER_TIMEOUT"])
        split = env.get("OTEL_EXPORTER_JAEGER_AGENT_SPLIT_OVERSIZED_BATCHES")
        if split:
            kwargs["udp_split_oversized_batches"] = split.strip().lower() in ("1", "true", "yes")
        kwargs.update(overrides)
        return cls(**kwargs)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Send the spans; FAILURE if any of them could not be sent (the others still are)."""
        if self._shutdown:
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        return self.send_encoded(self.encode(spans))

    def encode(self, spans: Sequence[ReadableSpan], into: EncodedSpans | None = None) -> EncodedSpans:
        """Translate and encode spans for this exporter's transport, adding them to ``into``.

        Split from sending so that a processor can encode a few spans at a time as they end and
        still send them in the large units the transport wants (see ``QueueSpanProcessor``).
        """
        out = EncodedSpans() if into is None else into
        out.spans += len(spans)
        if self._http is None:
            self._encode_compact(spans, out)
        else:
            self._encode_binary(spans, out)
        return out

    def _encode_binary(self, spans: Sequence[ReadableSpan], out: EncodedSpans) -> None:
        """Translate all the spans into batches, then encode each batch's spans."""
        batches, invalid = self.translator.batches(spans)
        self.stats.spans_dropped_invalid += invalid
        out.invalid += invalid
        groups = out.groups
        for batch in batches:
            encoded = self._encode_spans(batch, encode_span_binary)
            out.invalid += len(batch.spans) - len(encoded)
            service = batch.process.serviceName
            group = groups.get(service)
            if group is None:
                groups[service] = (batch.process, encoded)
            else:
                group[1].extend(encoded)

    def _encode_compact(self, spans: Sequence[ReadableSpan], out: EncodedSpans) -> None:
        """Encode spans one by one, the registry's records straight from the tuple.

        Same groups, order and failures as translating everything first (``_encode_binary``):
        a span that cannot be translated joins no group, one that cannot be encoded still
        creates its service's group, just as its translation did there.
        """
        translator = self.translator
        max_len = translator.max_tag_value_length
        head = _RecordHead()
        groups = out.groups
        invalid = 0
        for span in spans:
            is_record = type(span) is SpanRecord
            try:
                if is_record:
                    tags = translator.record_tags(span)  # type: ignore[arg-type]
                    service = tags.service
                else:
                    translated = translator.translate(span)
                    service = translated.service
            except Exception:  # a malformed span must not sink the others
                log.debug("cannot translate span %r", getattr(span, "name", span), exc_info=True)
                invalid += 1
                continue
            group = groups.get(service)
            if group is None:
                group = groups[service] = (ThriftProcess(service), [])
            try:
                if is_record:
                    encoded = encode_record_compact(span, tags, max_len, head)  # type: ignore[arg-type]
                else:
                    encoded = encode_span_compact(translated)
            except Exception:  # e.g. a lone surrogate in a string cannot become UTF-8
                log.debug("cannot encode span %r", getattr(span, "name", span), exc_info=True)
                invalid += 1
                continue
            group[1].append(encoded)
        self.stats.spans_dropped_invalid += invalid
        out.invalid += invalid

    def send_encoded(self, encoded: EncodedSpans) -> SpanExportResult:
        """Send what ``encode`` produced; FAILURE if any span of it was lost."""
        if self._shutdown:
            return SpanExportResult.FAILURE
        ok = encoded.invalid == 0
        with self._lock:
            for process, spans in encoded.groups.values():
                if not spans:
                    continue
                if self._http is not None:
                    ok = self._send_http(process, spans) and ok
                else:
                    ok = self._send_udp(process, spans) and ok
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def _encode_spans(self, batch: ThriftBatch, encode: Any) -> list[bytes]:
        encoded = []
        for span in batch.spans:
            try:
                encoded.append(encode(span))
            except Exception:  # e.g. a lone surrogate in a string cannot become UTF-8
                log.debug("cannot encode span %r", span.operationName, exc_info=True)
                self.stats.spans_dropped_invalid += 1
        return encoded

    def _send_http(self, process: ThriftProcess, spans: list[bytes]) -> bool:
        stats = self.stats
        body = batch_binary_from_parts(encode_process_binary(process), spans)
        try:
            self._http.send(body)  # type: ignore[union-attr]
        except Exception as exc:
            stats.send_errors += 1
            stats.spans_failed += len(spans)
            log.warning("Jaeger collector export failed: %s", exc)
            return False
        stats.http_posts += 1
        stats.bytes_sent += len(body)
        stats.spans_sent += len(spans)
        return True

    def _send_udp(self, process_struct: ThriftProcess, spans: list[bytes]) -> bool:
        stats = self.stats
        ok = True
        service = process_struct.serviceName
        process = self._process_bytes.get(service)
        if process is None:
            process = encode_process_compact(process_struct)
            if len(self._process_bytes) >= _CACHE_LIMIT:
                self._process_bytes.clear()
            self._process_bytes[service] = process
        size = datagram_size(process, map(len, spans))
        if size <= self.max_packet_size:
            datagrams = [(emit_batch_datagram(process, spans), len(spans))]
        elif not self.udp_split_oversized_batches and len(spans) > 1:
            stats.spans_dropped_oversize += len(spans)
            log.warning(
                "Jaeger batch of ~%d bytes exceeds the max UDP packet size %d; dropped",
                size,
                self.max_packet_size,
            )
            return False
        else:
            datagrams, dropped = pack_span_bytes(process, spans, self.max_packet_size)
            if dropped:
                stats.spans_dropped_oversize += dropped
                log.warning("%d span(s) larger than a UDP packet dropped", dropped)
                ok = False
        for data, count in datagrams:
            try:
                self._udp.send(data)
            except Exception as exc:
                stats.send_errors += 1
                stats.spans_failed += count
                log.warning("Jaeger agent export failed: %s", exc)
                ok = False
                continue
            stats.datagrams_sent += 1
            stats.bytes_sent += len(data)
            stats.spans_sent += count
        return ok

    def shutdown(self) -> None:
        """Refuse further exports and close the sockets.

        Not under the export lock: an export stuck on a dead collector must not hold this up.
        """
        self._shutdown = True
        self._udp.close()
        if self._http is not None:
            self._http.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here: every export is sent before it returns."""
        return True


# --------------------------------------------------------------------------------------------------
# decoding (the embedded viewer's receiver)


def decode_emit_batch(datagram: bytes) -> tuple[str, Any]:
    """Decode an agent UDP datagram: (method name, Batch or None for other methods).

    Raises ValueError for anything that is not a compact-protocol thrift message.
    """
    trans = TMemoryBuffer(datagram)
    proto = TCompactProtocol(trans)
    try:
        name, _mtype, _seqid = proto.readMessageBegin()
    except Exception as exc:
        raise ValueError(f"not a thrift compact message: {exc}") from exc
    if name != "emitBatch":
        return name, None
    args = _agent.emitBatch_args()
    try:
        fastbinary.decode_compact(args, proto, EMIT_BATCH_ARGS)
    except Exception as exc:
        raise ValueError(f"malformed emitBatch: {exc}") from exc
    return name, args.batch


def decode_batch_binary(body: bytes) -> Any:
    """Decode a TBinaryProtocol Batch (a collector POST body) into generated ``ttypes`` objects."""
    proto = TBinaryProtocol(TMemoryBuffer(body))
    batch = jt.Batch()
    try:
        fastbinary.decode_binary(batch, proto, BATCH_ARGS)
    except Exception as exc:
        raise ValueError(f"malformed Batch: {exc}") from exc
    return batch
