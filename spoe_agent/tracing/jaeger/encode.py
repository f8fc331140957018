"""Encoding of translated spans and registry records into Jaeger thrift bytes.

The fixed part of a span (ids, times, name, references) goes through fastbinary; its tags and logs
are written by hand after it. Each span is encoded on its own, so that batches and agent
datagrams (also here) are assembled from span bytes, and an oversized UDP batch is packed by exact
encoded size without encoding anything twice.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import Any, Final

from thrift.Thrift import TMessageType

from spoe_agent.tracing.jaeger import codec
from spoe_agent.tracing.jaeger.spans import JaegerSpan, ThriftBatch
from spoe_agent.tracing.jaeger.specs import _SPAN_HEAD_ARGS, _SPAN_HEAD_FIELDS, PROCESS_ARGS
from spoe_agent.tracing.jaeger.tags import RecordTags, TagPairs, _tags_binary, _tags_compact
from spoe_agent.tracing.jaeger.translate import _FOLLOWS_FROM, _record_logs
from spoe_agent.tracing.jaeger.wire import (
    _I64_MAX,
    _LOW64,
    _STOP,
    _U64,
    _list_header_compact,
    _pack_i32,
    _pack_i64,
    _varint,
    _zigzag_varint,
)
from spoe_agent.tracing.registry import SpanRecord

_encode_compact: Final = codec.encode_compact
_encode_binary: Final = codec.encode_binary


class _RecordHead:
    """The fixed Span fields (1-9) of one record, as fastbinary reads them (by attribute).

    ``encode_record_compact`` refills one instance per span instead of building a ``JaegerSpan``:
    an allocation and a dozen attributes per span that the compact UDP path never reads.
    ``trace_id`` is the trace whose ids ``traceIdLow``/``traceIdHigh`` hold: records come a
    trace at a time, and the next record of the same trace keeps them rather than redo the
    big-integer arithmetic. Not shared between threads: each ``encode`` call uses its own.
    """

    __slots__ = ("trace_id", *_SPAN_HEAD_FIELDS)
    # Declared for type checkers and mypyc (setup.py), which cannot read the __slots__ above.
    traceIdLow: int
    traceIdHigh: int
    spanId: int
    parentSpanId: int
    operationName: str
    references: list[_FollowsFrom] | None
    flags: Any
    startTime: int
    duration: int

    def __init__(self) -> None:
        self.trace_id: int | None = None


# --------------------------------------------------------------------------------------------------
# spans and batches


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
    traceIdLow: int
    traceIdHigh: int
    spanId: int
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


# --------------------------------------------------------------------------------------------------
# jaeger-agent datagrams

UDP_PACKET_MAX_LENGTH = 65000

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

    The export path runs this between two NOTIFYs, whatever the load: a loop in Python over a
    batch's 512 spans held the next NOTIFY up for ~0.5 ms. So the cut points come from the
    running sum of the sizes by bisection, and Python only loops once per datagram; the result
    is the greedy one (``_pack_one_by_one``, which the tests hold it to).
    """
    budget = max_size - _DATAGRAM_OVERHEAD - len(process_bytes)  # for list header and spans
    sizes = list(map(len, span_bytes))
    if not sizes:
        return [], 0
    if max(sizes) + 1 > budget:  # some span is dropped: the slow way, which says which
        return _pack_one_by_one(process_bytes, span_bytes, budget)
    ends = list(accumulate(sizes))  # ends[j]: bytes of spans 0..j
    longest_header = _list_header_len(total := len(sizes))
    datagrams: list[tuple[bytes, int]] = []
    first = 0
    before = 0  # bytes of the spans before ``first``
    while first < total:
        # The most spans from ``first`` whose bytes fit with the longest list header they could
        # need, then one more while one more fits with its exact header. Whether spans
        # first..j fit only gets worse as j grows, so this is where the greedy loop stops.
        last = bisect_right(ends, before + budget - longest_header, first) - 1
        while (last + 1 < total
               and ends[last + 1] - before + _list_header_len(last + 2 - first) <= budget):
            last += 1
        datagrams.append(
            (emit_batch_datagram(process_bytes, span_bytes[first:last + 1]), last + 1 - first)
        )
        before = ends[last]
        first = last + 1
    return datagrams, 0


def _pack_one_by_one(
    process_bytes: bytes, span_bytes: Sequence[bytes], budget: int
) -> tuple[list[tuple[bytes, int]], int]:
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
