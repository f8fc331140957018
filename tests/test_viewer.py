"""The embedded viewer: real Jaeger thrift in (UDP and HTTP), decoded spans, trees and JSON out."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    format_span_id,
    format_trace_id,
)

from spoe_agent.tracing.jaeger import FastJaegerExporter
from spoe_agent.tracing.processor import QueueSpanProcessor
from spoe_agent.viewer import JaegerReceiver, ReceivedSpan, TraceAssembler, render_trace, to_json
from spoe_agent.viewer.render import tree_order
from tests.support.procs import free_port, wait_until

WAIT = 10.0
REPO = Path(__file__).resolve().parents[1]
T0_US = 1_700_000_000_000_000
TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
HAPROXY = Resource({"service.name": "haproxy", "host.name": "lb-1"})
APP = Resource({"service.name": "backend-app"})
SCOPE = InstrumentationScope("spoe_agent", "0.1.0")
IDS = {
    "HTTP GET": 0xA1,
    "frontend": 0xA2,
    "backend": 0xA3,
    "connect": 0xA4,
    "app handler": 0xF000000000000005,  # above 2**63: negative on the wire
    "log": 0xA6,
    "orphan": 0xA7,
}


def ctx(name: str, trace: int = TRACE) -> SpanContext:
    return SpanContext(trace, IDS[name], is_remote=False, trace_flags=TraceFlags(1))


def make(
    name: str,
    parent: str | int | None,
    start_us: int,
    duration_us: int,
    *,
    resource: Resource = HAPROXY,
    **kwargs: object,
) -> ReadableSpan:
    if isinstance(parent, str):
        parent_ctx = ctx(parent)
    elif isinstance(parent, int):
        parent_ctx = SpanContext(TRACE, parent, is_remote=True, trace_flags=TraceFlags(1))
    else:
        parent_ctx = None
    return ReadableSpan(
        name=name,
        context=ctx(name),
        parent=parent_ctx,
        resource=resource,
        start_time=(T0_US + start_us) * 1000,
        end_time=(T0_US + start_us + duration_us) * 1000,
        instrumentation_scope=SCOPE,
        **kwargs,  # type: ignore[arg-type]
    )


def request_trace() -> list[ReadableSpan]:
    """What an HTTP request through HAProxy could look like, with every rendering feature."""
    return [
        make("frontend", "HTTP GET", 100, 200),
        make("connect", "backend", 1_500, 500),
        make("app handler", "connect", 1_600, 300, resource=APP, kind=SpanKind.SERVER),
        make(
            "backend",
            "HTTP GET",
            1_000,
            10_000,
            status=Status(StatusCode.ERROR, "503 from server"),
            attributes={"haproxy.server": "app1", "retries": 1},
        ),
        make(
            "log",
            None,  # attached only through its link
            12_000,
            50,
            links=(Link(ctx("HTTP GET")),),
        ),
        make("orphan", 0xDEAD, 5_000, 1),  # its parent never arrived
        make(
            "HTTP GET",
            None,
            0,
            12_345,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "GET",
                "http.response.status_code": 200,
                "ratio": 0.5,
                "keepalive": True,
            },
            events=(Event("retry", {"attempt": 1}, timestamp=(T0_US + 700) * 1000),),
        ),
    ]


EXPECTED_TREE = f"""\
trace {format_trace_id(TRACE)} (7 spans, 12.345ms)
HTTP GET [haproxy] 12.345ms
  frontend [haproxy] 200us
  backend [haproxy] 10.000ms !ERROR: 503 from server
    connect [haproxy] 500us
      app handler [backend-app] 300us
  log [haproxy] 50us (follows from)
orphan [haproxy] 1us (parent not received)"""


@pytest.fixture
def receiver() -> Iterator[JaegerReceiver]:
    with JaegerReceiver(("127.0.0.1", 0), ("127.0.0.1", 0), quiet_s=60) as r:
        yield r


def udp_exporter(receiver: JaegerReceiver) -> FastJaegerExporter:
    host, port = receiver.udp_address
    return FastJaegerExporter(agent_host_name=host, agent_port=port)


def http_exporter(receiver: JaegerReceiver, **kwargs: object) -> FastJaegerExporter:
    host, port = receiver.http_address
    return FastJaegerExporter(
        collector_endpoint=f"http://{host}:{port}/api/traces", timeout=5, **kwargs
    )


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.operation_name: s for s in spans}


def test_udp_spans_decode_to_what_was_sent(receiver: JaegerReceiver) -> None:
    assert udp_exporter(receiver).export(request_trace()) is SpanExportResult.SUCCESS
    assert receiver.wait_for(lambda got: len(got) == 7, WAIT)
    spans = by_name(receiver.spans)
    root = spans["HTTP GET"]
    assert root.trace_id == format_trace_id(TRACE)
    assert root.span_id == format_span_id(IDS["HTTP GET"])
    assert root.parent_span_id is None
    assert (root.start_us, root.duration_us) == (T0_US, 12_345)
    assert root.service_name == "haproxy"
    assert root.tags["http.request.method"] == "GET"
    assert root.tags["http.response.status_code"] == 200
    assert root.tags["ratio"] == 0.5 and root.tags["keepalive"] is True
    assert root.tags["span.kind"] == "server"
    assert root.tags["host.name"] == "lb-1"  # resource attributes travel as span tags
    assert root.tags["otel.library.name"] == "spoe_agent"
    assert root.logs == [(T0_US + 700, {"attempt": 1, "message": "retry"})]
    assert root.process_tags == {}
    assert root.transport == "udp" and not root.error and root.flags == 1

    app = spans["app handler"]
    assert app.span_id == "f000000000000005"
    assert app.parent_span_id == format_span_id(IDS["connect"])
    assert app.service_name == "backend-app"
    backend = spans["backend"]
    assert backend.error
    assert backend.tags["otel.status_description"] == "503 from server"
    assert backend.tags["retries"] == 1
    assert spans["log"].references == [
        ("FOLLOWS_FROM", format_trace_id(TRACE), format_span_id(IDS["HTTP GET"]))
    ]
    assert spans["log"].parent_span_id is None
    assert spans["orphan"].parent_span_id == format_span_id(0xDEAD)
    assert receiver.datagrams == 2  # one batch per service


def test_http_spans_decode_like_udp_ones(receiver: JaegerReceiver) -> None:
    exporter = http_exporter(receiver, username="jaeger", password="s3cret")
    assert exporter.export(request_trace()) is SpanExportResult.SUCCESS
    assert receiver.wait_for(lambda got: len(got) == 7, WAIT)
    over_http = sorted(receiver.spans, key=lambda s: s.span_id)
    assert receiver.last_http_headers["Authorization"] == "Basic amFlZ2VyOnMzY3JldA=="
    assert receiver.last_http_headers["Content-Type"] == "application/x-thrift"
    assert receiver.http_posts == 2
    receiver.clear()
    udp_exporter(receiver).export(request_trace())
    assert receiver.wait_for(lambda got: len(got) == 7, WAIT)
    over_udp = sorted(receiver.spans, key=lambda s: s.span_id)
    assert [replace(s, transport="") for s in over_http] == [
        replace(s, transport="") for s in over_udp
    ]


def test_rendered_tree(receiver: JaegerReceiver) -> None:
    udp_exporter(receiver).export(request_trace())
    assert receiver.wait_for(lambda got: len(got) == 7, WAIT)
    assert render_trace(receiver.spans) == EXPECTED_TREE
    [trace] = receiver.traces().values()
    assert render_trace(list(reversed(trace))) == EXPECTED_TREE  # arrival order is irrelevant


def test_a_trace_whose_late_spans_print_apart_says_it_continues(
    receiver: JaegerReceiver,
) -> None:
    """Spans a session TTL ends arrive ~30 s after the rest of their trace: printed as a second
    trace, they must not read as another request's."""
    import io

    from spoe_agent.viewer.__main__ import _Printer

    udp_exporter(receiver).export(request_trace())
    assert receiver.wait_for(lambda got: len(got) == 7, WAIT)
    spans = receiver.spans
    out = io.StringIO()
    printer = _Printer(out, None)
    printer(spans[:4])
    printer(spans[4:])
    first, second = out.getvalue().split("\n\n")[:2]
    assert "more of a trace printed above" not in first.splitlines()[0]
    assert second.splitlines()[0].endswith("(more of a trace printed above)")
    assert spans[0].trace_id in second.splitlines()[0]


def test_json(receiver: JaegerReceiver) -> None:
    udp_exporter(receiver).export(request_trace())
    assert receiver.wait_for(lambda got: len(got) == 7, WAIT)
    doc = json.loads(json.dumps(to_json(receiver.spans)))
    assert doc["trace_id"] == format_trace_id(TRACE)
    assert doc["span_count"] == 7
    assert doc["services"] == ["backend-app", "haproxy"]
    assert doc["duration_us"] == 12_345 and doc["error"] is True
    outline = [(s["depth"], s["operation_name"], s["attached_by"]) for s in doc["spans"]]
    assert outline == [
        (0, "HTTP GET", None),
        (1, "frontend", "CHILD_OF"),
        (1, "backend", "CHILD_OF"),
        (2, "connect", "CHILD_OF"),
        (3, "app handler", "CHILD_OF"),
        (1, "log", "FOLLOWS_FROM"),
        (0, "orphan", None),
    ]
    root = doc["spans"][0]
    assert root["tags"]["http.response.status_code"] == 200
    assert root["logs"] == [
        {"timestamp_us": T0_US + 700, "fields": {"attempt": 1, "message": "retry"}}
    ]
    assert doc["spans"][5]["references"] == [
        {
            "type": "FOLLOWS_FROM",
            "trace_id": format_trace_id(TRACE),
            "span_id": format_span_id(IDS["HTTP GET"]),
        }
    ]


def test_sdk_spans_through_the_queue_processor_reach_the_receiver(
    receiver: JaegerReceiver,
) -> None:
    provider = TracerProvider(resource=HAPROXY)
    processor = QueueSpanProcessor(udp_exporter(receiver), schedule_delay_s=3600)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("spoe_agent", "0.1.0")
    with tracer.start_as_current_span("request", kind=SpanKind.SERVER):
        for step in ("frontend", "backend"):
            with tracer.start_as_current_span(step):
                pass
    provider.shutdown()  # flushes the queue through the exporter
    assert receiver.wait_for(lambda got: len(got) == 3, WAIT)
    [trace] = receiver.traces().values()
    names = [line.split(" [")[0] for line in render_trace(trace).splitlines()[1:]]
    assert names[0] == "request" and sorted(names[1:]) == ["  backend", "  frontend"]
    assert processor.stats.exported == 3


def test_finished_traces_are_reported_once_quiet() -> None:
    finished: queue.Queue[list[ReceivedSpan]] = queue.Queue()
    with JaegerReceiver(("127.0.0.1", 0), None, quiet_s=0.05, on_trace=finished.put) as receiver:
        exporter = udp_exporter(receiver)
        exporter.export(request_trace())
        first = finished.get(timeout=WAIT)
        other = [
            ReadableSpan(
                name="second trace",
                context=ctx("HTTP GET", trace=TRACE + 1),
                resource=HAPROXY,
                start_time=1000,
                end_time=2000,
            )
        ]
        exporter.export(other)
        second = finished.get(timeout=WAIT)
    assert len(first) == 7 and {s.trace_id for s in first} == {format_trace_id(TRACE)}
    assert [s.operation_name for s in second] == ["second trace"]
    assert len(receiver.finished_traces) == 2


def received(name: str, span_id: str, parent: str | None = None, start: int = 0) -> ReceivedSpan:
    return ReceivedSpan(
        trace_id="t" * 32,
        span_id=span_id,
        parent_span_id=parent,
        operation_name=name,
        service_name="s",
        start_us=start,
        duration_us=1,
    )


def test_assembler_waits_for_quiet_per_trace() -> None:
    assembler = TraceAssembler(quiet_s=1.0)
    assembler.add([received("a", "1")], now=0.0)
    assert assembler.flush(now=0.5) == []
    assembler.add([received("b", "2", parent="1")], now=0.8)  # late span: the clock restarts
    assert assembler.flush(now=1.5) == []
    [trace] = assembler.flush(now=1.8)
    assert [s.operation_name for s in trace] == ["a", "b"]
    assert assembler.pending() == 0


def test_assembler_flush_everything_and_callback_errors_are_contained() -> None:
    calls: list[int] = []

    def callback(trace: list[ReceivedSpan]) -> None:
        calls.append(len(trace))
        raise RuntimeError("printer broke")

    assembler = TraceAssembler(quiet_s=60, on_trace=callback)
    assembler.add([received("a", "1"), received("b", "2")], now=0.0)
    assert len(assembler.flush(now=1.0, everything=True)) == 1
    assert calls == [2]


def test_render_survives_parent_cycles_and_duplicates() -> None:
    spans = [
        received("x", "1", parent="2", start=1),
        received("y", "2", parent="1", start=2),
        received("y again", "2", parent="1", start=3),
        received("self", "3", parent="3", start=0),
    ]
    order = [(depth, s.operation_name) for depth, s, _ in tree_order(spans)]
    assert order == [(0, "self"), (0, "x"), (1, "y")]
    assert render_trace([]) == "(empty trace)"


def test_garbage_is_counted_and_does_not_stop_the_receiver(receiver: JaegerReceiver) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x82\x81\x00\x09emitBatch\x1c\xff\xff", receiver.udp_address)
        sock.sendto(b"not thrift at all", receiver.udp_address)
    host, port = receiver.http_address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("POST", "/api/traces", body=b"\xff\xff\xff")
    assert conn.getresponse().status == 400
    conn.close()
    udp_exporter(receiver).export(request_trace())
    assert receiver.wait_for(lambda got: len(got) == 7, WAIT)
    assert receiver.decode_errors == 3


@pytest.mark.parametrize("length, status", [("-1", 400), ("abc", 400),
                                            ("100000000000", 413)])
def test_a_post_length_it_cannot_trust_is_refused_before_reading(
        receiver: JaegerReceiver, length: str, status: int) -> None:
    """Code review: -1 read to EOF and kept the body (200 MB), a huge length raised
    MemoryError, "abc" a traceback; the client got no answer."""
    host, port = receiver.http_address
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(f"POST /api/traces HTTP/1.1\r\nHost: x\r\nContent-Length: {length}"
                     "\r\n\r\n".encode())
        answer = sock.recv(4096).decode()
    assert answer.startswith(f"HTTP/1.1 {status} "), answer
    assert receiver.last_http_body == b""


def test_the_standalone_viewer_keeps_no_trace_it_printed() -> None:
    """Code review: keep_spans=False (the command line's) still kept every finished trace."""
    printed: list[int] = []
    assembler = TraceAssembler(0.0, lambda trace: printed.append(len(trace)),
                               keep_finished=False)
    for n in range(100):
        assembler.add([replace(received(f"s{n}", "1"), trace_id=f"{n:032x}")])
    assembler.flush(everything=True)
    assert len(printed) == 100 and assembler.finished == []


def test_command_line_viewer_prints_trees_and_json_lines(tmp_path: Path) -> None:
    port = free_port()
    jsonl = tmp_path / "traces.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spoe_agent.viewer",
            "--udp",
            f"127.0.0.1:{port}",
            "--no-http",
            "--quiet-s",
            "0.05",
            "--jsonl",
            str(jsonl),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        assert "listening on udp 127.0.0.1:" in proc.stderr.readline()
        FastJaegerExporter(agent_host_name="127.0.0.1", agent_port=port).export(request_trace())
        printed = []
        while len(printed) < len(EXPECTED_TREE.splitlines()):
            printed.append(lines.get(timeout=WAIT).rstrip("\n"))
        assert "\n".join(printed) == EXPECTED_TREE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [line] = jsonl.read_text().splitlines()
    assert json.loads(line)["span_count"] == 7


def test_the_viewer_says_when_the_kernel_dropped_datagrams_it_read_too_slowly(
        tmp_path: Path) -> None:
    """Black-box run: at 3,300 traced requests/s the viewer lost ~600k datagrams in the
    kernel and printed broken traces without a word, which read as the agent's fault. Here a
    stopped viewer cannot read at all, so its receive buffer overflows for certain."""
    port = free_port()
    log = tmp_path / "viewer.stderr"
    with log.open("w") as stderr:  # a file: each undecodable datagram logs its traceback
        proc = subprocess.Popen(
            [sys.executable, "-m", "spoe_agent.viewer", "--udp", f"127.0.0.1:{port}",
             "--no-http"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_until(lambda: "listening on udp 127.0.0.1:" in log.read_text(),
                   what="the viewer to listen")
        proc.send_signal(signal.SIGSTOP)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(300):  # 18 MB: past any receive buffer the kernel grants
                sender.sendto(b"\0" * 60_000, ("127.0.0.1", port))
            proc.send_signal(signal.SIGCONT)
            for _ in range(20):  # these carry the count, after the viewer drained the rest
                threading.Event().wait(0.1)
                sender.sendto(b"\0", ("127.0.0.1", port))
        threading.Event().wait(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
        said = log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "viewer: the kernel dropped " in said and "that this viewer read too slowly" in said, (
        said)


@pytest.mark.parametrize("argv, said", [
    (["--no-udp", "--no-http"], "leave nothing to listen on"),
    (["--no-udp", "--http", "127.0.0.1:0", "--jsonl", "/nonexistent/dir/x.jsonl"],
     "cannot open --jsonl /nonexistent/dir/x.jsonl: No such file or directory"),
    (["--no-http", "--udp", "127.0.0.1:0", "--quiet-s", "-1"], "0 or more, got '-1'"),
    (["--no-http", "--udp", "127.0.0.1:0", "--quiet-s", "nan"], "0 or more, got 'nan'"),
    (["--no-http", "--udp", "127.0.0.1:99999"], "a number from 0 to 65535"),  # a traceback
])
def test_command_line_viewer_refuses_what_cannot_work(argv: list[str], said: str) -> None:
    """A usage error and exit 2, not a traceback, nor a viewer that listens on nothing."""
    done = subprocess.run([sys.executable, "-m", "spoe_agent.viewer", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("kind", ["udp", "http"])
def test_command_line_viewer_names_an_address_it_cannot_listen_on(kind: str) -> None:
    """A taken HTTP port crashed the viewer with an AttributeError from its own cleanup."""
    sock_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, sock_type) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == "http":
            taken.listen()
        port = taken.getsockname()[1]
        other = "--no-http" if kind == "udp" else "--no-udp"
        done = subprocess.run([sys.executable, "-m", "spoe_agent.viewer", other,
                               f"--{kind}", f"127.0.0.1:{port}"], cwd=REPO,
                              capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == \
        f"cannot listen: {kind} 127.0.0.1:{port}: Address already in use", done.stderr


def test_receiver_and_exporter_work_under_gevent_monkeypatching() -> None:
    script = textwrap.dedent(
        """
        from gevent import monkey
        monkey.patch_all()
        import sys
        sys.path.insert(0, "tests")
        from test_viewer import request_trace, udp_exporter, http_exporter
        from spoe_agent.viewer import JaegerReceiver, render_trace
        traces = []
        with JaegerReceiver(("127.0.0.1", 0), ("127.0.0.1", 0), quiet_s=0.05,
                            on_trace=traces.append) as receiver:
            udp_exporter(receiver).export(request_trace())
            assert http_exporter(receiver).export(request_trace()).name == "SUCCESS"
            assert receiver.wait_for(lambda got: len(got) == 14, 10)
            assert receiver.wait_for(lambda got: len(traces) >= 1, 10)
        print(render_trace(receiver.spans[:7]).splitlines()[1])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "HTTP GET [haproxy] 12.345ms"
