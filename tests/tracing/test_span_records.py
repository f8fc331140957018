"""The direct span path (registry ``SpanRecord`` -> FastJaegerExporter) writes the very bytes of
the SDK path (registry ``ReadableSpan`` -> FastJaegerExporter), which test_jaeger.py proves equal
to the official exporter's.

Two registries, one emitting records and one emitting SDK spans, get the same messages with the
same ids and clock; their spans go through one exporter each and the UDP datagrams and HTTP
bodies are compared byte for byte.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from spoe_agent.config import load_config
from spoe_agent.protocol.types import Message
from spoe_agent.tracing import jaeger as fast
from spoe_agent.tracing.agent import TracingAgent
from spoe_agent.tracing.jaeger import FastJaegerExporter
from spoe_agent.tracing.language import parse_message
from spoe_agent.tracing.propagation import build_propagator
from spoe_agent.tracing.registry import SessionRegistry, SpanRecord
from tests.support.examples import examples

from .test_registry import (
    _MESSAGES,
    T0,
    TRACEPARENT,
    FakeClock,
    SeqIds,
    reference_notifies,
)


class Captured:
    """Stands in for the exporter's UDP sender."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.datagrams.append(bytes(data))

    def close(self) -> None:
        pass


def _resource(service: str) -> Resource:
    return Resource.create({"service.name": service, "deployment.environment": "test"})


class Twin:
    """A registry for each path, driven in lockstep."""

    def __init__(self, **kwargs: Any) -> None:
        self.clock = FakeClock(T0 + 987_654_550)  # not whole microseconds: rounding shows
        self.records: list[Any] = []
        self.sdk: list[Any] = []
        kwargs.setdefault("sampler", ALWAYS_ON)
        self.regs = [
            SessionRegistry(
                out.append,
                propagator=build_propagator("tracecontext,baggage"),
                id_generator=SeqIds(),
                clock_ns=self.clock,
                resource_for_service=_resource,
                default_service="haproxy",
                span_records=records,
                **kwargs,
            )
            for out, records in ((self.records, True), (self.sdk, False))
        ]

    def notify(self, messages: Iterable[Message]) -> None:
        for message in messages:
            outs = []
            for reg in self.regs:
                command = parse_message(message, reg.stats)
                outs.append(reg.apply(command) if command is not None else [])
            assert outs[0] == outs[1]

    def send(self, *args: tuple[str, Any]) -> None:
        self.notify([Message("m", list(args))])

    def each(self, method: str, *args: Any) -> None:
        results = [getattr(reg, method)(*args) for reg in self.regs]
        assert results[0] == results[1]

    def check(self, max_len: int | None = None) -> int:
        """Export both sides; return how many spans were compared."""
        assert len(self.records) == len(self.sdk)
        assert all(type(span) is SpanRecord for span in self.records)
        assert all(isinstance(span, ReadableSpan) for span in self.sdk)
        assert self.regs[0].stats == self.regs[1].stats
        if not self.records:
            return 0
        out = []
        for spans in (self.records, self.sdk):
            udp = FastJaegerExporter(max_tag_value_length=max_len)
            udp._udp = captured = Captured()  # type: ignore[assignment]
            udp.export(spans)
            http = FastJaegerExporter(max_tag_value_length=max_len)
            bodies = [
                fast.encode_batch_binary(batch) for batch in http.translator.batches(spans)[0]
            ]
            translator = fast.JaegerTranslator(max_len)
            thrift = [translator.translate(span).to_thrift() for span in spans]
            out.append((captured.datagrams, bodies, thrift, udp.stats))
        assert out[0][0] == out[1][0], "UDP datagrams differ"
        assert out[0][1] == out[1][1], "HTTP bodies differ"
        assert out[0][2] == out[1][2]
        assert out[0][3] == out[1][3]
        return len(self.records)


def test_reference_tree_without_incoming_context() -> None:
    twin = Twin()
    for notify in reference_notifies("u1"):
        twin.notify(notify)
    assert twin.check() == 9


def two_services_twin() -> Twin:
    """Links, events (one not UTF-8 encodable), error status, baggage, a remote parent, an
    out-of-range tag and a second service, the two sessions interleaved."""
    twin = Twin(sampler=ParentBased(ALWAYS_ON))
    first = reference_notifies("u1", headers=[("traceparent", TRACEPARENT)], status=503, ts=5)
    first[2].append(
        Message(
            "log",
            [
                ("id", "u1"),
                ("span", "Frontend HTTP request"),
                ("log", "event"),
                ("", "x\udcffy"),
                ("log", "count"),
                ("", 7),
                ("log", "flag"),
                ("", True),
                ("tag", "big"),
                ("", 2**64 - 1),
                ("tag", "ok"),
                ("", False),
            ],
        )
    )
    second = reference_notifies("u2", ts=1_700_000_000_000_000)
    second[0][0].args.insert(1, ("service", "edge"))
    for a, b in zip(first, second, strict=True):
        twin.notify(a)
        twin.clock.advance(0.001_234)
        twin.notify(b)
    return twin


def incomplete_twin() -> Twin:
    """Spans ended by the TTL, the session cap and shutdown: ERROR statuses with descriptions."""
    twin = Twin(ttl_s=10, max_sessions=2)
    for notify in reference_notifies("ttl")[:3]:
        twin.notify(notify)
    twin.clock.advance(11)
    twin.each("expire")
    twin.send(("id", "a"), ("span", "x"), ("tag", "k"), ("", "v"))
    twin.send(("id", "b"), ("span", "y"), ("traceparent", TRACEPARENT), ("log", "l"), ("", 1))
    twin.send(("id", "c"), ("span", "z"), ("kind", "producer"))  # evicts "a"
    twin.each("close_all", "shutdown")
    return twin


@pytest.mark.parametrize("max_len", [None, 3])
def test_remote_parent_error_status_events_baggage_and_two_services(max_len: int | None) -> None:
    assert two_services_twin().check(max_len) == 18


def test_incomplete_spans_from_ttl_cap_and_shutdown() -> None:
    assert incomplete_twin().check() == 7


def test_unsampled_sessions_emit_nothing_on_either_path() -> None:
    twin = Twin(sampler=ALWAYS_OFF)
    for notify in reference_notifies("u"):
        twin.notify(notify)
    assert twin.check() == 0


@settings(max_examples=examples(150), deadline=None)
@given(_MESSAGES, st.booleans())
def test_any_message_sequence_encodes_identically(messages, sampled) -> None:
    twin = Twin(sampler=ALWAYS_ON if sampled else ALWAYS_OFF, max_sessions=2)
    for key, args in messages:
        twin.send(("id", key), *args)
        twin.clock.advance(0.1)
    twin.each("close_all")
    twin.check()


# -- the UDP exporter encodes records straight from the tuple ----------------------------------


def translated_datagrams(spans: list[Any], max_len: int | None = None) -> list[bytes]:
    """The datagrams of the general path: every span translated into a ``JaegerSpan``, grouped
    by service, then encoded (each service's spans fit one datagram here)."""
    batches, failed = fast.JaegerTranslator(max_len).batches(spans)
    assert failed == 0
    return [fast.encode_emit_batch(batch) for batch in batches]


def udp_exporter(max_len: int | None = None) -> tuple[FastJaegerExporter, Captured]:
    exporter = FastJaegerExporter(max_tag_value_length=max_len)
    exporter._udp = captured = Captured()  # type: ignore[assignment]
    return exporter, captured


def interleaved(*lists: list[Any]) -> list[Any]:
    return [span for group in itertools.zip_longest(*lists) for span in group if span is not None]


@pytest.mark.parametrize("max_len", [None, 3])
@pytest.mark.parametrize("make_twin", [two_services_twin, incomplete_twin])
@pytest.mark.parametrize("order", ["emitted", "reversed", "traces interleaved"])
def test_records_encode_as_their_translation_does(make_twin: Any, max_len: Any, order: str) -> None:
    """Records in any order (the encoder keeps the previous record's trace ids)."""
    records = make_twin().records
    if order == "reversed":
        records = records[::-1]
    elif order == "traces interleaved":
        by_trace: dict[int, list[Any]] = {}
        for record in records:
            by_trace.setdefault(record.trace_id, []).append(record)
        assert len(by_trace) > 1
        records = interleaved(*by_trace.values())
    exporter, captured = udp_exporter(max_len)
    assert exporter.export(records) is SpanExportResult.SUCCESS
    assert captured.datagrams == translated_datagrams(records, max_len)
    assert exporter.stats.spans_sent == len(records)


def test_records_and_sdk_spans_mixed_in_one_encode_and_in_slices() -> None:
    twin = two_services_twin()
    mixed = interleaved(twin.records, twin.sdk[::-1])
    expected = translated_datagrams(mixed)
    assert len(expected) == 2  # one datagram per service, records and SDK spans together
    exporter, captured = udp_exporter()
    assert exporter.export(mixed) is SpanExportResult.SUCCESS
    assert captured.datagrams == expected
    sliced, captured = udp_exporter()
    encoded = None
    for start in range(0, len(mixed), 5):
        encoded = sliced.encode(mixed[start : start + 5], encoded)
    assert encoded is not None and len(encoded) == len(mixed)
    assert sliced.send_encoded(encoded).complete
    assert captured.datagrams == expected


def test_an_unencodable_record_is_dropped_and_its_service_keeps_its_place() -> None:
    """As when all spans were translated before any was encoded: the failed record's service
    comes first, though its only other record comes after another service's."""
    records = two_services_twin().records
    services = [record.resource.attributes["service.name"] for record in records]
    first = records[services.index("haproxy")]
    bad = first._replace(name="lone surrogate \ud800")
    assert type(bad) is SpanRecord
    good_a = records[len(services) - 1 - services[::-1].index("haproxy")]
    good_b = records[services.index("edge")]
    spans = [bad, good_b, good_a]
    batches, _ = fast.JaegerTranslator().batches(spans)
    for batch in batches:
        batch.spans = [span for span in batch.spans if span.operationName != bad.name]
    exporter, captured = udp_exporter()
    assert exporter.export(spans) is SpanExportResult.FAILURE
    assert exporter.stats.spans_dropped_invalid == 1
    assert exporter.stats.spans_sent == 2
    assert captured.datagrams == [fast.encode_emit_batch(batch) for batch in batches]
    assert [fast.decode_emit_batch(d)[1].process.serviceName for d in captured.datagrams] == [
        "haproxy",
        "edge",
    ]


def test_the_tracing_agent_sends_records_through_its_counted_queue() -> None:
    agent = TracingAgent(load_config(env={"OTEL_EXPORTER_JAEGER_AGENT_PORT": "9"}))
    assert agent.registry._records
    exporter, processor = agent.exporter, agent.processor
    assert isinstance(exporter, FastJaegerExporter) and processor is not None
    exporter._udp = captured = Captured()  # type: ignore[assignment]
    try:
        for notify in reference_notifies("u"):
            agent.dispatch(notify)
        assert processor.stats.queued == 9
        assert all(type(span) is SpanRecord for span in processor._queue)
        assert processor.force_flush(5000)
        assert processor.stats.exported == 9
        assert exporter.stats.spans_sent == 9
        assert len(captured.datagrams) == 1
    finally:
        processor.shutdown(1)


def test_other_exporters_still_get_sdk_spans() -> None:
    agent = TracingAgent(load_config(env={"OTEL_TRACES_EXPORTER": "console"}))
    assert not agent.registry._records


def test_the_stop_summary_counts_the_exporters_own_drops(caplog: pytest.LogCaptureFixture) -> None:
    """Black-box run: spans too big for a datagram were in spans_dropped_total{reason=
    "oversize"} while the stop's line said "0 dropped"; the lines that tell of them each
    carry the running total, since repeated ones are held back."""
    agent = TracingAgent(load_config(env={"OTEL_EXPORTER_JAEGER_AGENT_PORT": "9"}))
    exporter = agent.exporter
    assert isinstance(exporter, FastJaegerExporter)
    exporter._udp = Captured()  # type: ignore[assignment]
    exporter.max_packet_size = 120  # no span of the reference request fits
    with caplog.at_level(logging.INFO):
        for notify in reference_notifies("big"):
            agent.dispatch(notify)
        agent.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.endswith("span(s) larger than a UDP packet dropped (9 so far)")
               for line in lines), lines
    assert ("tracing: 0 spans exported in all, 9 dropped (queue full 0, export failed 0, "
            "refused after they were sent 0, shutdown deadline 0, ended after the stop began 0, "
            "too big for a datagram 9, invalid 0)") in lines, lines
