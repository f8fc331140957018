"""Per-span cost of turning SDK spans into Jaeger UDP datagrams: official exporter vs fast path.

Plain script, no asserts: ``python -m benchmarks.bench_export [--traces N] [--repeat R]`` (or
``python benchmarks/bench_export.py``) from the repository root.  Both paths stop at the datagram
bytes (no socket), so only CPU spent by the exporter is compared.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

if not __package__:  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402

from spoe_agent.tracing.jaeger import JaegerTranslator, encode_emit_batch  # noqa: E402

warnings.simplefilter("ignore", DeprecationWarning)
from opentelemetry.exporter.jaeger.thrift.gen.jaeger import Collector as jaeger  # noqa: E402
from opentelemetry.exporter.jaeger.thrift.send import AgentClientUDP  # noqa: E402
from opentelemetry.exporter.jaeger.thrift.translate import (  # noqa: E402
    ThriftTranslator,
    Translate,
)


def make_spans(traces: int) -> list:
    """Traces shaped like an HTTP request through HAProxy: 1 server span and 8 children."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "haproxy", "host.name": "lb-1"})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("spoe_agent", "0.1.0")
    for i in range(traces):
        with tracer.start_as_current_span(
            "HTTP GET",
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "GET",
                "url.path": f"/api/items/{i}",
                "http.response.status_code": 200,
                "server.address": "example.test",
                "client.address": "192.0.2.10",
                "haproxy.frontend": "fe_main",
                "haproxy.backend": "be_app",
            },
        ) as root:
            for step in (
                "frontend",
                "tcp-request",
                "http-request",
                "backend",
                "connect",
                "server",
                "response",
                "log",
            ):
                with tracer.start_as_current_span(
                    f"haproxy {step}", attributes={"haproxy.step": step, "haproxy.duration_ms": 1}
                ) as child:
                    if step == "server" and i % 10 == 0:
                        child.set_status(Status(StatusCode.ERROR, "503"))
            root.add_event("retry", {"attempt": 1})
    return list(memory.get_finished_spans())


def bench_official(spans: list, batch_size: int) -> float:
    client = AgentClientUDP("127.0.0.1", 6831, split_oversized_batches=True)
    out = []  # stop at the datagram bytes: the socket is not what is compared
    start = time.perf_counter()
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        batch = jaeger.Batch(
            spans=Translate(chunk)._translate(ThriftTranslator(None)),
            process=jaeger.Process(serviceName="haproxy"),
        )
        buffer = client.buffer
        buffer._buffer.truncate(0)
        buffer._buffer.seek(0)
        client.client._seqid = 0
        client.client.emitBatch(batch)
        out.append(buffer.getvalue())
    return time.perf_counter() - start


def bench_fast(spans: list, batch_size: int) -> float:
    translator = JaegerTranslator(None)
    out = []
    start = time.perf_counter()
    for i in range(0, len(spans), batch_size):
        batches, _ = translator.batches(spans[i : i + batch_size])
        for batch in batches:
            out.append(encode_emit_batch(batch))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    spans = make_spans(args.traces)
    print(f"{len(spans)} spans ({args.traces} traces of 9 spans), best of {args.repeat}")
    print(f"{'batch (spans)':>14} {'official µs/span':>17} {'fast µs/span':>13} {'ratio':>7}")
    for batch_size in (9, 90, 512):
        official = min(bench_official(spans, batch_size) for _ in range(args.repeat))
        fast = min(bench_fast(spans, batch_size) for _ in range(args.repeat))
        per_official = official / len(spans) * 1e6
        per_fast = fast / len(spans) * 1e6
        print(
            f"{batch_size:>14} {per_official:>17.2f} {per_fast:>13.2f} "
            f"{per_official / per_fast:>6.1f}x"
        )


if __name__ == "__main__":
    main()
