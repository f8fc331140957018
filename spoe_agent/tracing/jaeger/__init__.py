"""Jaeger thrift export that is byte-compatible with the official exporter, at a fraction of its cost.

The official ``opentelemetry-exporter-jaeger-thrift`` spends ~100 µs per span: its translation
builds generated thrift objects through keyword constructors and its UDP client writes them with
the pure-Python compact protocol.  This package produces the very same bytes (the tests compare
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

Deviations from the official exporter, all where it would crash or silently lose data instead:
spans are grouped into one Batch per ``service.name`` (its Process is per batch; the official one
labels a mixed batch with the first span's service); an integer attribute outside the i64 range
becomes a string tag; a span that cannot be translated or encoded is dropped and counted rather
than failing the whole batch; oversized UDP batches are packed by encoded size rather than split
by span count.

The package, one concern a module (each imports only the ones above it):

* ``codec``: thrift's C ``fastbinary``, or the same calls on its pure-Python protocols where
  thrift was installed without its C extension (the same bytes, ~8 times the CPU);
* ``specs``: the generated thrift specs converted to the shape fastbinary wants;
* ``wire``: the compact/binary protocol primitives the hand-written encoders share;
* ``tags``: tag values normalised as the official exporter does, their encoding, shared tag sets;
* ``spans``: the translated span, process and batch structures;
* ``translate``: ``JaegerTranslator``, SDK spans and registry records to Jaeger spans;
* ``encode``: spans, batches and jaeger-agent datagrams to bytes, and datagram packing;
* ``transport``: the UDP (jaeger-agent) and HTTP (jaeger-collector) senders;
* ``exporter``: ``FastJaegerExporter``, the ``SpanExporter`` that ties them together;
* ``decode``: agent datagrams and collector posts back to ``ttypes`` (the viewer's receiver).

The names below are re-exported so that ``from spoe_agent.tracing.jaeger import ...`` keeps working.
"""

from spoe_agent.tracing.jaeger.decode import decode_batch_binary, decode_emit_batch
from spoe_agent.tracing.jaeger.encode import (
    EMIT_BATCH_PREFIX,
    EMIT_BATCH_SUFFIX,
    UDP_PACKET_MAX_LENGTH,
    batch_binary_from_parts,
    batch_compact_from_parts,
    datagram_size,
    emit_batch_datagram,
    encode_batch_binary,
    encode_batch_compact,
    encode_emit_batch,
    encode_process_binary,
    encode_process_compact,
    encode_record_compact,
    encode_span_binary,
    encode_span_compact,
    pack_datagrams,
    pack_span_bytes,
)
from spoe_agent.tracing.jaeger.exporter import EncodedSpans, ExportStats, FastJaegerExporter
from spoe_agent.tracing.jaeger.spans import JaegerSpan, ThriftBatch, ThriftProcess
from spoe_agent.tracing.jaeger.specs import (
    BATCH_ARGS,
    EMIT_BATCH_ARGS,
    PROCESS_ARGS,
    SPAN_ARGS,
    convert_spec,
    thrift_args,
)
from spoe_agent.tracing.jaeger.tags import NO_VALUE, ConstTags, RecordTags, TagPairs
from spoe_agent.tracing.jaeger.translate import JaegerTranslator

__all__ = [
    "BATCH_ARGS",
    "EMIT_BATCH_ARGS",
    "EMIT_BATCH_PREFIX",
    "EMIT_BATCH_SUFFIX",
    "NO_VALUE",
    "PROCESS_ARGS",
    "SPAN_ARGS",
    "UDP_PACKET_MAX_LENGTH",
    "ConstTags",
    "EncodedSpans",
    "ExportStats",
    "FastJaegerExporter",
    "JaegerSpan",
    "JaegerTranslator",
    "RecordTags",
    "TagPairs",
    "ThriftBatch",
    "ThriftProcess",
    "batch_binary_from_parts",
    "batch_compact_from_parts",
    "convert_spec",
    "datagram_size",
    "decode_batch_binary",
    "decode_emit_batch",
    "emit_batch_datagram",
    "encode_batch_binary",
    "encode_batch_compact",
    "encode_emit_batch",
    "encode_process_binary",
    "encode_process_compact",
    "encode_record_compact",
    "encode_span_binary",
    "encode_span_compact",
    "pack_datagrams",
    "pack_span_bytes",
    "thrift_args",
]
