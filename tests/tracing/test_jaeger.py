"""The fast Jaeger exporter writes exactly the bytes the official exporter writes, only faster.

Every comparison here runs the official ``opentelemetry-exporter-jaeger-thrift`` code path (its
translator, its pure-Python thrift protocols, its UDP client and exporter) on the same spans.
"""

from __future__ import annotations

import base64
import socket
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.jaeger.thrift.gen.agent import Agent
from opentelemetry.exporter.jaeger.thrift.gen.jaeger import Collector as jaeger
from opentelemetry.exporter.jaeger.thrift.send import AgentClientUDP
from opentelemetry.exporter.jaeger.thrift.translate import ThriftTranslator, Translate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    format_trace_id,
)
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.transport.TTransport import TMemoryBuffer

from spoe_agent.tracing import jaeger as fast
from spoe_agent.tracing.jaeger import FastJaegerExporter, JaegerTranslator, transport
from spoe_agent.tracing.jaeger import encode as encode_module
from spoe_agent.tracing.jaeger.exporter import Delivery
from spoe_agent.viewer.receiver import JaegerReceiver
from tests.support.examples import examples
from tests.support.procs import free_port

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from opentelemetry.exporter.jaeger.thrift import JaegerExporter

T0 = 1_700_000_000_123_456_789
TRACE_ID = 0xF0E1D2C3B4A5968778695A4B3C2D1E0F  # high bit set: exercises the signed i64 mapping
MAX_I64 = (1 << 63) - 1
MIN_I64 = -(1 << 63)


# -- building spans ---------------------------------------------------------------------------


def _provider(resource: Resource, **kwargs: Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource, **kwargs)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


ALL_TYPES = {
    "str": "héllo wörld ✓",
    "empty": "",
    "int": 42,
    "negative": -7,
    "zero": 0,
    "big": MAX_I64,
    "small": MIN_I64,
    "float": 3.25,
    "negative_float": -0.5,
    "true": True,
    "false": False,
    "strs": ("a", "b"),
    "ints": (1, -2, 300),
    "floats": (1.5, 2.0),
    "bools": (True, False),
    "long_string": "x" * 300,
}


def sdk_spans(service: str = "haproxy", extra_resource: dict | None = None) -> list[ReadableSpan]:
    """A trace built through the SDK: every attribute type, events, links, statuses, kinds."""
    resource = Resource.create(
        {"service.name": service, "host.name": "lb-1", **(extra_resource or {})}
    )
    provider, memory = _provider(resource)
    tracer = provider.get_tracer("spoe_agent.tests", "1.2.3")
    root = tracer.start_span("HTTP GET", kind=SpanKind.SERVER, attributes=ALL_TYPES, start_time=T0)
    root.add_event("request.headers", {"count": 12, "big": "y" * 100}, timestamp=T0 + 1_499)
    root.add_event("bare", timestamp=T0 + 1_500)
    from opentelemetry import trace as trace_api

    ctx = trace_api.set_span_in_context(root)
    for i, kind in enumerate(SpanKind):
        child = tracer.start_span(f"child {kind.name}", context=ctx, kind=kind, start_time=T0 + i)
        child.set_attribute("index", i)
        child.end(end_time=T0 + 1000 * i + 499)
    linked = tracer.start_span(
        "async work",
        context=ctx,
        links=[Link(root.get_span_context(), {"why": "fan-out"})],
        start_time=T0 + 10,
    )
    linked.set_status(Status(StatusCode.ERROR, "upstream went away"))
    linked.end(end_time=T0 + 20_000)
    failed = tracer.start_span("no description", context=ctx, start_time=T0 + 11)
    failed.set_status(Status(StatusCode.ERROR))
    failed.end(end_time=T0 + 12)
    ok = tracer.start_span("fine", context=ctx, start_time=T0 + 12)
    ok.set_status(Status(StatusCode.OK))
    ok.end(end_time=T0 + 13)
    root.end(end_time=T0 + 5_000_500)
    return list(memory.get_finished_spans())


def limited_spans() -> list[ReadableSpan]:
    """Spans whose attributes, events and links overflowed the SDK limits (dropped counters)."""
    provider, memory = _provider(
        Resource.create({"service.name": "limited"}),
        span_limits=SpanLimits(
            max_span_attributes=2,
            max_events=1,
            max_links=1,
            max_event_attributes=1,
        ),
    )
    tracer = provider.get_tracer("limits")  # no version: the scope version tag has no value
    other = SpanContext(TRACE_ID, 0x1234, is_remote=True, trace_flags=TraceFlags(1))
    span = tracer.start_span(
        "overflowing",
        attributes={"a": 1, "b": 2, "c": 3},
        links=[Link(other), Link(other)],
        start_time=T0,
    )
    span.add_event("first", {"x": 1, "y": 2})
    span.add_event("second")
    span.end(end_time=T0 + 1)
    return list(memory.get_finished_spans())


def handmade_spans() -> list[ReadableSpan]:
    """ReadableSpans built directly: plain-dict attributes, remote parents, odd values."""
    ctx = SpanContext(TRACE_ID, 0xFEDCBA9876543210, is_remote=False, trace_flags=TraceFlags(1))
    parent = SpanContext(TRACE_ID, 0x8000000000000001, is_remote=True, trace_flags=TraceFlags(1))
    resource = Resource({"service.name": "handmade", "deployment": ("a", "b"), "n": 1.0})
    scope = InstrumentationScope("hand", "0.0.1")
    return [
        ReadableSpan(
            name="plain dict",
            context=ctx,
            parent=parent,
            resource=resource,
            attributes={"list": [1, 2], "tuple": (1,), "none_is_skipped": None, "s": "v"},
            events=(Event("e", BoundedAttributes(attributes={"k": "v"}), timestamp=T0 + 999),),
            links=(Link(parent),),
            kind=SpanKind.CLIENT,
            status=Status(StatusCode.ERROR, "boom"),
            start_time=T0,
            end_time=T0 + 1,
            instrumentation_scope=scope,
        ),
        ReadableSpan(
            name="no attributes, unsampled",
            context=SpanContext(TRACE_ID, 1, is_remote=False, trace_flags=TraceFlags(0)),
            resource=resource,
            start_time=T0,
            end_time=T0,
            instrumentation_scope=None,
        ),
    ]


SCENARIOS = {
    "sdk": (lambda: sdk_spans(), None),
    "sdk-truncated": (lambda: sdk_spans(), 5),
    "limits": (limited_spans, None),
    "handmade": (handmade_spans, None),
    "handmade-truncated": (handmade_spans, 1),
}


# -- the official path ------------------------------------------------------------------------


def official_batch(spans: Sequence[ReadableSpan], max_len: int | None) -> Any:
    service = spans[0].resource.attributes.get("service.name")
    return jaeger.Batch(
        spans=Translate(spans)._translate(ThriftTranslator(max_len)),
        process=jaeger.Process(serviceName=service),
    )


def write(obj: Any, protocol: type) -> bytes:
    buffer = TMemoryBuffer()
    obj.write(protocol(buffer))
    return buffer.getvalue()


@pytest.fixture
def udp_sink() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def official_datagrams(batch: Any, sink: socket.socket, split: bool = False) -> list[bytes]:
    client = AgentClientUDP("127.0.0.1", sink.getsockname()[1], split_oversized_batches=split)
    sent: list[bytes] = []
    real_socket = socket.socket

    class Capture(real_socket):  # the official client opens a socket per datagram
        def sendto(self, data: bytes, *args: Any) -> int:
            sent.append(bytes(data))
            return len(data)

    import opentelemetry.exporter.jaeger.thrift.send as send_module

    original = send_module.socket.socket
    send_module.socket.socket = Capture
    try:
        client.emit(batch)
    finally:
        send_module.socket.socket = original
    return sent


class Captured:
    """Stands in for the UDP sender: records datagrams instead of sending them."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.datagrams.append(data)

    def close(self) -> None:
        pass


def agent_decode(datagram: bytes) -> Any:
    """Decode with the generated Agent processor and the pure-Python compact protocol.

    Its classes are a second copy of the generated ones (imported as top-level ``jaeger``), so
    compare what it returns with ``repr``.
    """
    received: list[Any] = []

    class Handler:
        def emitBatch(self, batch: Any) -> None:  # noqa: N802 (thrift's name)
            received.append(batch)

    Agent.Processor(Handler()).process(TCompactProtocol(TMemoryBuffer(datagram)), None)
    assert len(received) == 1
    return received[0]


# -- byte-identical translation and encoding --------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_compact_batch_is_byte_identical(scenario: str) -> None:
    make, max_len = SCENARIOS[scenario]
    spans = make()
    batches, failed = JaegerTranslator(max_len).batches(spans)
    assert failed == 0 and len(batches) == 1
    expected = write(official_batch(spans, max_len), TCompactProtocol)
    assert fast.encode_batch_compact(batches[0]) == expected


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_binary_batch_is_byte_identical(scenario: str) -> None:
    make, max_len = SCENARIOS[scenario]
    spans = make()
    batches, _ = JaegerTranslator(max_len).batches(spans)
    expected = write(official_batch(spans, max_len), TBinaryProtocol)
    assert fast.encode_batch_binary(batches[0]) == expected


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_translated_objects_equal_the_official_ones(scenario: str) -> None:
    make, max_len = SCENARIOS[scenario]
    spans = make()
    ours = [JaegerTranslator(max_len).translate(span).to_thrift() for span in spans]
    assert ours == Translate(spans)._translate(ThriftTranslator(max_len))


def test_span_details_match_the_official_translation() -> None:
    """Spot-check what the byte comparison covers, so a failure there is easier to read."""
    spans = sdk_spans()
    by_name = {s.name: JaegerTranslator().translate(s).to_thrift() for s in spans}
    root = by_name["HTTP GET"]
    tags = {t.key: t for t in root.tags}
    assert tags["span.kind"].vStr == "server"
    assert (
        tags["int"].vLong == 42 and tags["float"].vDouble == 3.25 and tags["false"].vBool is False
    )
    assert tags["strs"].vStr == "('a', 'b')"
    assert tags["otel.library.name"].vStr == "spoe_agent.tests"
    assert tags["otel.scope.version"].vStr == "1.2.3"
    assert tags["service.name"].vStr == "haproxy"  # resource attributes are span tags
    assert root.parentSpanId == 0 and root.references is None
    assert [f.vStr for f in root.logs[1].fields] == ["bare"]
    assert root.logs[0].timestamp == (T0 + 1_499 + 500) // 1000
    assert root.duration == 5_001
    linked = by_name["async work"]
    assert linked.parentSpanId == root.spanId
    assert [(r.refType, r.spanId) for r in linked.references] == [
        (jaeger.SpanRefType.FOLLOWS_FROM, root.spanId)
    ]
    linked_tags = {t.key: t for t in linked.tags}
    assert linked_tags["otel.status_code"].vStr == "ERROR"
    assert linked_tags["otel.status_description"].vStr == "upstream went away"
    assert linked_tags["error"].vBool is True
    u64 = (1 << 64) - 1
    trace_id = (root.traceIdHigh & u64) << 64 | (root.traceIdLow & u64)
    assert format_trace_id(trace_id) == format_trace_id(spans[-1].context.trace_id)


def test_udp_datagram_equals_the_official_agent_client(udp_sink: socket.socket) -> None:
    spans = sdk_spans()
    batches, _ = JaegerTranslator().batches(spans)
    ours = fast.encode_emit_batch(batches[0])
    [theirs] = official_datagrams(official_batch(spans, None), udp_sink)
    assert ours == theirs
    assert repr(fast.decode_emit_batch(ours)[1]) == repr(agent_decode(theirs))


def test_udp_goes_to_the_ipv4_address_of_a_name_with_both(
    udp_sink: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's /etc/hosts names ``localhost`` ``::1`` too, often resolved first: a datagram
    there reaches no agent bound to IPv4 and fails nowhere. The official client sends to the
    IPv4 address (its socket is AF_INET), and so do we; an IPv6-only name still works."""
    port = udp_sink.getsockname()[1]
    real = socket.getaddrinfo

    def ipv6_first(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        if host == "dual.test":
            return [(socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("::1", port, 0, 0)),
                    *real("127.0.0.1", *args, **kwargs)]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(transport.socket, "getaddrinfo", ipv6_first)
    sender = transport._UDPSender("dual.test", port)
    sender.send(b"to the IPv4 agent")
    assert udp_sink.recv(100) == b"to the IPv4 agent"
    sender.close()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sink6:
        sink6.bind(("::1", 0))
        sink6.settimeout(5)
        only6 = transport._UDPSender("::1", sink6.getsockname()[1])
        only6.send(b"to the IPv6 agent")
        assert sink6.recv(100) == b"to the IPv6 agent"
        only6.close()


def test_whole_exporter_sends_what_the_official_exporter_sends(udp_sink: socket.socket) -> None:
    """End to end through both exporters' export(), over real loopback UDP."""
    spans = sdk_spans()
    port = udp_sink.getsockname()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        official = JaegerExporter(agent_host_name="127.0.0.1", agent_port=port)
    assert official.export(spans) is SpanExportResult.SUCCESS
    theirs = udp_sink.recv(65535)
    ours_exporter = FastJaegerExporter(agent_host_name="127.0.0.1", agent_port=port)
    assert ours_exporter.export(spans) is SpanExportResult.SUCCESS
    ours = udp_sink.recv(65535)
    assert ours == theirs
    assert ours_exporter.stats.spans_sent == len(spans)
    assert ours_exporter.stats.datagrams_sent == 1
    assert ours_exporter.stats.bytes_sent == len(ours)
    ours_exporter.shutdown()
    assert ours_exporter.export(spans) is SpanExportResult.FAILURE


def two_services() -> tuple[list[ReadableSpan], list[ReadableSpan], list[ReadableSpan]]:
    """Spans of two services, and both interleaved."""
    a = sdk_spans("svc-a")
    b = sdk_spans("svc-b", {"region": "eu"})
    return a, b, [span for pair in zip(a, b, strict=True) for span in pair]


def capturing_exporter() -> tuple[FastJaegerExporter, Captured]:
    exporter = FastJaegerExporter()
    exporter._udp = captured = Captured()
    return exporter, captured


def test_one_batch_per_service() -> None:
    """The official exporter labels a mixed batch with the first service; we split by service."""
    a, b, mixed = two_services()
    exporter, captured = capturing_exporter()
    assert exporter.export(mixed) is SpanExportResult.SUCCESS
    assert len(captured.datagrams) == 2
    for datagram, group in zip(captured.datagrams, (a, b), strict=True):
        batch = agent_decode(datagram)
        assert repr(batch) == repr(official_batch(group, None))
        assert datagram == fast.encode_emit_batch(JaegerTranslator().batches(group)[0][0])


def test_encoding_in_slices_then_sending_equals_one_export() -> None:
    """The processor encodes spans a few at a time as they end and sends them later: the
    datagrams (one per service) must be exactly those of a single export of all of them."""
    _, _, mixed = two_services()
    whole, expected = capturing_exporter()
    assert whole.export(mixed) is SpanExportResult.SUCCESS
    sliced, captured = capturing_exporter()
    encoded = None
    for start in range(0, len(mixed), 3):
        encoded = sliced.encode(mixed[start : start + 3], encoded)
    assert encoded is not None and len(encoded) == len(mixed)
    assert captured.datagrams == []  # encoding sends nothing
    assert sliced.send_encoded(encoded) == Delivery(sent=len(mixed), failed=0, dropped=0)
    assert captured.datagrams == expected.datagrams and len(captured.datagrams) == 2
    assert sliced.stats.spans_sent == len(mixed)


def test_a_slice_with_an_unencodable_span_fails_its_send_not_the_others() -> None:
    good, bad = handmade_spans()[0], handmade_spans()[0]
    bad._name = "lone surrogate \ud800"
    exporter = FastJaegerExporter()
    exporter._udp = captured = Captured()
    encoded = exporter.encode([good])
    encoded = exporter.encode([bad], encoded)
    assert exporter.stats.spans_dropped_invalid == 1  # counted when found
    # The one span lost is the one that could not be encoded: the other was sent.
    assert exporter.send_encoded(encoded) == Delivery(sent=1, failed=0, dropped=1)
    assert exporter.stats.spans_sent == 1
    [datagram] = captured.datagrams
    assert [s.operationName for s in agent_decode(datagram).spans] == ["plain dict"]


def test_default_service_name_when_the_resource_has_none() -> None:
    span = handmade_spans()[0]
    bare = ReadableSpan(
        name="x",
        context=span.context,
        resource=Resource({}),
        start_time=T0,
        end_time=T0,
    )
    translator = JaegerTranslator(default_service_name="fallback")
    [batch], _ = translator.batches([bare])
    assert batch.process.serviceName == "fallback"
    assert JaegerTranslator().service_name(bare) == Resource.create().attributes["service.name"]


def test_out_of_range_int_becomes_a_string_instead_of_failing_the_batch() -> None:
    ctx = SpanContext(TRACE_ID, 5, is_remote=False, trace_flags=TraceFlags(1))
    span = ReadableSpan(
        name="huge",
        context=ctx,
        resource=Resource({"service.name": "s"}),
        attributes={"huge": 1 << 70, "ok": 1},
        start_time=T0,
        end_time=T0,
    )
    [batch], _ = JaegerTranslator().batches([span])
    decoded = fast.decode_emit_batch(fast.encode_emit_batch(batch))[1]
    tags = {t.key: t for t in decoded.spans[0].tags}
    assert tags["huge"].vStr == str(1 << 70)
    assert tags["ok"].vLong == 1


def test_unencodable_span_is_dropped_and_counted_not_the_batch() -> None:
    good, bad = handmade_spans()[0], handmade_spans()[0]
    bad._name = "lone surrogate \ud800"
    exporter = FastJaegerExporter()
    exporter._udp = captured = Captured()
    assert exporter.export([good, bad]) is SpanExportResult.FAILURE
    assert exporter.stats.spans_dropped_invalid == 1
    assert exporter.stats.spans_sent == 1
    [datagram] = captured.datagrams
    assert [s.operationName for s in agent_decode(datagram).spans] == ["plain dict"]


# -- oversized batches ------------------------------------------------------------------------


def big_spans(count: int, payload: int) -> list[ReadableSpan]:
    provider, memory = _provider(Resource.create({"service.name": "big"}))
    tracer = provider.get_tracer("big", "1")
    for i in range(count):
        span = tracer.start_span(f"span {i}", attributes={"payload": "p" * payload, "i": i})
        span.end()
    return list(memory.get_finished_spans())


def test_oversized_batch_is_split_into_datagrams_that_hold_every_span() -> None:
    spans = big_spans(200, 1500)
    exporter = FastJaegerExporter()
    exporter._udp = captured = Captured()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert len(captured.datagrams) > 1
    assert all(len(d) <= fast.UDP_PACKET_MAX_LENGTH for d in captured.datagrams)
    decoded = [span for d in captured.datagrams for span in agent_decode(d).spans]
    assert [s.operationName for s in decoded] == [f"span {i}" for i in range(200)]
    assert repr(decoded) == repr(official_batch(spans, None).spans)
    assert exporter.stats.spans_sent == 200
    assert exporter.stats.datagrams_sent == len(captured.datagrams)
    assert exporter.stats.spans_dropped_oversize == 0


def test_other_work_runs_between_the_datagrams_of_a_batch() -> None:
    """A 512-span batch is several 65 KB datagrams; the processor's ``between`` lets the ready
    connections run between two sends instead of after all of them."""
    spans = big_spans(200, 1500)
    exporter = FastJaegerExporter()
    exporter._udp = captured = Captured()
    order: list[str] = []
    captured_send = captured.send

    def send(data: bytes) -> None:
        order.append("send")
        captured_send(data)

    captured.send = send  # type: ignore[method-assign]
    encoded = exporter.encode(spans)
    result = exporter.send_encoded(encoded, between=lambda: order.append("between"))
    assert result.complete and result.sent == 200
    sends = len(captured.datagrams)
    assert sends > 2
    assert order == ["send"] + ["between", "send"] * (sends - 1)
    decoded = [span for d in captured.datagrams for span in agent_decode(d).spans]
    assert [s.operationName for s in decoded] == [f"span {i}" for i in range(200)]


def test_packing_respects_any_limit_exactly() -> None:
    spans = big_spans(40, 100)
    [batch], _ = JaegerTranslator().batches(spans)
    whole = fast.encode_emit_batch(batch)
    for limit in (len(whole) - 1, 2000, 700):
        datagrams, dropped = fast.pack_datagrams(batch, limit)
        assert dropped == 0
        assert all(len(d) <= limit for d in datagrams)
        assert sum(len(agent_decode(d).spans) for d in datagrams) == 40
    assert fast.pack_datagrams(batch, len(whole)) == ([whole], 0)


@settings(max_examples=examples(300), deadline=None)
@given(
    sizes=st.lists(st.integers(1, 700), max_size=600),
    limit=st.integers(60, 4000),
    process=st.binary(max_size=40),
)
def test_packing_cuts_where_the_greedy_loop_does(sizes: list[int], limit: int,
                                                 process: bytes) -> None:
    """The bisecting packer against the span-by-span greedy loop: the same datagrams, byte for
    byte, for any sizes (through the 15- and 128-span list headers) and limits (some spans
    too big to send at all)."""
    spans = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    budget = limit - encode_module._DATAGRAM_OVERHEAD - len(process)
    expected = encode_module._pack_one_by_one(process, spans, budget)
    assert fast.pack_span_bytes(process, spans, limit) == expected
    datagrams, dropped = expected
    assert all(len(d) <= limit for d, _ in datagrams)
    assert sum(n for _, n in datagrams) + dropped == len(spans)


def test_many_spans_use_the_long_list_header() -> None:
    spans = big_spans(300, 1)  # > 127 spans: multi-byte varint list size
    [batch], _ = JaegerTranslator().batches(spans)
    assert fast.encode_batch_compact(batch) == write(official_batch(spans, None), TCompactProtocol)


def test_a_span_larger_than_a_datagram_is_dropped_and_counted() -> None:
    spans = big_spans(3, 10) + big_spans(1, 70_000) + big_spans(2, 10)
    exporter = FastJaegerExporter()
    exporter._udp = captured = Captured()
    assert exporter.export(spans) is SpanExportResult.FAILURE
    assert exporter.stats.spans_dropped_oversize == 1
    assert exporter.stats.spans_sent == 5
    assert sum(len(agent_decode(d).spans) for d in captured.datagrams) == 5


def test_oversized_batch_without_splitting_is_dropped_and_counted() -> None:
    spans = big_spans(100, 1000)
    exporter = FastJaegerExporter(udp_split_oversized_batches=False)
    exporter._udp = captured = Captured()
    assert exporter.export(spans) is SpanExportResult.FAILURE
    assert captured.datagrams == []
    assert exporter.stats.spans_dropped_oversize == 100


def test_split_datagrams_carry_the_same_spans_as_the_official_split(
    udp_sink: socket.socket,
) -> None:
    spans = big_spans(120, 1500)
    theirs = official_datagrams(official_batch(spans, None), udp_sink, split=True)
    exporter = FastJaegerExporter()
    exporter._udp = captured = Captured()
    exporter.export(spans)
    ours_spans = [s for d in captured.datagrams for s in agent_decode(d).spans]
    their_spans = [s for d in theirs for s in agent_decode(d).spans]
    assert ours_spans == their_spans
    assert len(captured.datagrams) <= len(theirs)  # packed by size, never more datagrams


# -- HTTP collector ---------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[JaegerReceiver]:
    with JaegerReceiver(None, ("127.0.0.1", 0), quiet_s=60) as r:
        yield r


def endpoint(receiver: JaegerReceiver, path: str = "/api/traces") -> str:
    host, port = receiver.http_address
    return f"http://{host}:{port}{path}"


def test_http_body_is_byte_identical_to_the_official_collector_client(
    receiver: JaegerReceiver,
) -> None:
    spans = sdk_spans()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        official = JaegerExporter(collector_endpoint=endpoint(receiver), username="u", password="p")
    official.export(spans)
    assert receiver.wait_for(lambda got: len(got) == len(spans))
    theirs, their_headers = receiver.last_http_body, receiver.last_http_headers
    ours = FastJaegerExporter(
        collector_endpoint=endpoint(receiver) + "?format=jaeger.thrift",
        username="u",
        password="p",
        timeout=5,
    )
    assert ours.export(spans) is SpanExportResult.SUCCESS
    assert receiver.wait_for(lambda got: len(got) == 2 * len(spans))
    assert receiver.last_http_body == theirs
    assert receiver.last_http_headers["Content-Type"] == "application/x-thrift"
    assert receiver.last_http_headers["Authorization"] == their_headers["Authorization"]
    assert ours.stats.http_posts == 1 and ours.stats.spans_sent == len(spans)
    received = receiver.spans
    assert received[: len(spans)] == received[len(spans) :]


def test_credentials_in_the_endpoint_url_are_sent(receiver: JaegerReceiver) -> None:
    """As the official (requests-based) exporter sends them; they were silently dropped."""
    host, port = receiver.http_address
    exporter = FastJaegerExporter(
        collector_endpoint=f"http://bob:s3cr%40t@{host}:{port}/api/traces", timeout=5)
    assert exporter.export(sdk_spans()) is SpanExportResult.SUCCESS
    token = base64.b64encode(b"bob:s3cr@t").decode()
    assert receiver.last_http_headers["Authorization"] == f"Basic {token}"


def test_http_connection_is_reused_and_survives_a_collector_restart() -> None:
    spans = big_spans(3, 5)
    first = JaegerReceiver(None, ("127.0.0.1", 0)).start()
    port = first.http_address[1]
    exporter = FastJaegerExporter(collector_endpoint=endpoint(first), timeout=5)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert first.wait_for(lambda got: len(got) == 6)
    finally:
        first.stop()
    second = JaegerReceiver(None, ("127.0.0.1", port)).start()
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS  # stale keep-alive retried
        assert second.wait_for(lambda got: len(got) == 3)
    finally:
        second.stop()
    assert exporter.stats.http_posts == 3 and exporter.stats.send_errors == 0


def test_http_errors_are_counted(receiver: JaegerReceiver) -> None:
    spans = big_spans(2, 5)
    wrong_path = FastJaegerExporter(collector_endpoint=endpoint(receiver, "/nope"), timeout=5)
    assert wrong_path.export(spans) is SpanExportResult.FAILURE
    assert wrong_path.stats.send_errors == 1 and wrong_path.stats.spans_failed == 2

    closed_port = free_port()
    refused = FastJaegerExporter(
        collector_endpoint=f"http://127.0.0.1:{closed_port}/api/traces", timeout=5
    )
    assert refused.export(spans) is SpanExportResult.FAILURE
    assert refused.stats.send_errors == 1 and refused.stats.spans_sent == 0


def test_bad_endpoint_is_rejected_up_front() -> None:
    with pytest.raises(ValueError):
        FastJaegerExporter(collector_endpoint="ftp://example/api/traces")


def test_specs_are_converted_without_touching_the_generated_ones() -> None:
    original = jaeger.Batch.thrift_spec
    converted = fast.convert_spec(original)
    assert isinstance(original[1][3], tuple)  # still the generated tuple form
    assert isinstance(converted[1][3], list) and converted[1][3][0] is jaeger.Process
    assert fast.convert_spec(original) is converted
