"""The OTLP exporter that encodes a batch a slice at a time, against a collector over HTTP."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, TraceFlags

from spoe_agent.tracing.otlp import SlicedOTLPSpanExporter
from spoe_agent.tracing.processor import QueueSpanProcessor


class Collector(BaseHTTPRequestHandler):
    """Answers each post with the next status of ``statuses`` (200 once they run out)."""

    statuses: list[int] = []
    bodies: list[bytes] = []
    answered: list[int] = []
    replies: list[bytes] = []  # the body of each answer, in turn (empty once they run out)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = self.statuses.pop(0) if self.statuses else 200
        self.bodies.append(body)
        self.answered.append(status)
        reply = self.replies.pop(0) if self.replies else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    Collector.statuses, Collector.bodies, Collector.answered = [], [], []
    Collector.replies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()


def spans(n: int, service: str = "edge") -> list[ReadableSpan]:
    resource = Resource.create({"service.name": service})
    return [ReadableSpan(name=f"span {i}", context=SpanContext(i + 1, i + 1, False, TraceFlags(1)),
                         start_time=1, end_time=2, resource=resource) for i in range(n)]


def names(body: bytes) -> list[str]:
    request = ExportTraceServiceRequest.FromString(body)
    return [span.name for rs in request.resource_spans for ss in rs.scope_spans
            for span in ss.spans]


def test_slices_encoded_apart_make_one_request_holding_them_all(endpoint: str) -> None:
    """The encodings of requests end to end are one request with all their resource_spans:
    what the collector decodes is every span of every slice, each with its resource."""
    exporter = SlicedOTLPSpanExporter(endpoint=endpoint, timeout=5)
    encoded = exporter.encode(spans(3))
    encoded = exporter.encode(spans(2, service="other"), encoded)
    assert len(encoded) == 5
    exporter.send_encoded(encoded)
    (body,) = Collector.bodies
    assert names(body) == [f"span {i}" for i in (0, 1, 2, 0, 1)]
    request = ExportTraceServiceRequest.FromString(body)
    services = [next(a.value.string_value for a in rs.resource.attributes
                     if a.key == "service.name") for rs in request.resource_spans]
    assert services == ["edge", "other"]
    exporter.shutdown()


def test_the_processor_posts_batches_encoded_a_slice_at_a_time(endpoint: str) -> None:
    """What keeps the event loop free (the SDK's exporter encoded a 512-span batch in one go,
    ~15 ms): the processor encodes small slices as spans end and posts whole batches."""
    exporter = SlicedOTLPSpanExporter(endpoint=endpoint, timeout=5)
    slices: list[int] = []
    encode = exporter.encode

    def counted(batch, into=None):  # type: ignore[no-untyped-def]
        slices.append(len(batch))
        return encode(batch, into)

    exporter.encode = counted  # type: ignore[method-assign]
    processor = QueueSpanProcessor(exporter, max_export_batch_size=8, schedule_delay_s=3600,
                                   encode_slice=2)
    for span in spans(20):
        processor.on_end(span)
    processor.shutdown()
    posted = [names(body) for body in Collector.bodies]
    assert [n for post in posted for n in post] == [f"span {i}" for i in range(20)]
    assert all(len(post) <= 8 for post in posted), posted
    assert all(size <= 8 for size in slices) and sum(slices) == 20
    assert processor.stats.exported == 20


def test_a_retryable_refusal_is_tried_again_and_a_final_one_is_named(
    endpoint: str, caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = SlicedOTLPSpanExporter(endpoint=endpoint, timeout=5)
    Collector.statuses = [503]
    exporter.send_encoded(exporter.encode(spans(2)))
    assert Collector.answered == [503, 200]
    assert names(Collector.bodies[1]) == ["span 0", "span 1"]

    Collector.statuses = [400]  # not retryable: once, and the status says why
    processor = QueueSpanProcessor(exporter, max_export_batch_size=4, schedule_delay_s=3600)
    with caplog.at_level(logging.WARNING):
        for span in spans(3):
            processor.on_end(span)
        processor.shutdown()
    assert Collector.answered == [503, 200, 400]
    assert processor.stats.export_failed_spans == 3 and processor.stats.exported == 0
    assert (f"OTLP export to {endpoint} failed: the collector answered HTTP 400 "
            "Bad Request") in caplog.text


def test_a_partial_success_counts_the_rejected_spans_as_refused(
    endpoint: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Black-box run: a 200 whose partial_success rejected 50 of 180 spans counted 180
    exported, 0 dropped, and said nothing (the SDK's exporter ignores the field)."""
    exporter = SlicedOTLPSpanExporter(endpoint=endpoint, timeout=5)
    partial = ExportTraceServiceResponse()
    partial.partial_success.rejected_spans = 2
    partial.partial_success.error_message = "span too old"
    whole = ExportTraceServiceResponse()  # a protobuf answer with nothing rejected
    Collector.replies = [partial.SerializeToString(), whole.SerializeToString()]
    processor = QueueSpanProcessor(exporter, max_export_batch_size=5, schedule_delay_s=3600)
    with caplog.at_level(logging.WARNING):
        for span in spans(10):
            processor.on_end(span)
        processor.shutdown()
    assert Collector.answered == [200, 200]
    stats = processor.stats
    assert (stats.exported, stats.export_refused_spans, stats.export_failed_spans) == (10, 2, 0)
    assert f"OTLP collector at {endpoint} rejected 2 of 5 spans: span too old" in caplog.text
    assert "2 spans sent before were refused by the destination" in caplog.text


def test_the_agent_builds_the_sliced_exporter_for_otlp() -> None:
    from spoe_agent.config import load_config
    from spoe_agent.tracing.pipeline import build_exporter

    exporter = build_exporter(load_config(env={"OTEL_TRACES_EXPORTER": "otlp"}))
    assert isinstance(exporter, SlicedOTLPSpanExporter)
    exporter.shutdown()


OTLP_TRICKLE_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import sys
import gevent
sys.path.insert(0, {repo!r})
from tests.tracing.test_collector_failures import Trickle
from tests.tracing.test_otlp import spans
from spoe_agent.tracing.otlp import SlicedOTLPSpanExporter

collector = Trickle(headers_too=True)  # a byte every 0.1 s: no read ever waits 1 s
exporter = SlicedOTLPSpanExporter(endpoint=collector.endpoint.replace("/api/traces", "/v1/traces"),
                                  timeout=1)
post = gevent.spawn(exporter.send_encoded, exporter.encode(spans(2)))
post.join(20)  # liveness only: unbounded, the answer takes 100 s
assert post.dead, "the post is still reading its answer"
print(type(post.exception).__name__, post.exception)
collector.close()
"""


def test_under_gevent_an_otlp_post_is_bounded_as_a_whole() -> None:
    """Code review: ``requests`` bounds each socket operation, so a collector trickling its
    answer held one export 26 s with a 1 s timeout (and the SDK posts again after a
    connection error, with the full timeout again)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", OTLP_TRICKLE_SCRIPT.format(repo=str(repo))],
                          capture_output=True, text=True, timeout=120, cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(
        "failed: TimeoutError: no complete answer within 1s (otlp_timeout, or export_timeout "
        "if shorter)"), done.stdout + done.stderr
    assert done.stdout.startswith("OSError OTLP export to http://127.0.0.1:"), done.stdout
