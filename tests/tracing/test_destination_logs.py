"""Where spans go, as the start-up log, ``--check`` and export failures say it: an operator must
be able to see that an endpoint variable was picked up (or is wrong), and never a credential."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from spoe_agent.config import load_config
from spoe_agent.tracing.agent import TracingAgent
from spoe_agent.tracing.jaeger import FastJaegerExporter
from spoe_agent.tracing.processor import QueueSpanProcessor
from tests.support.procs import free_port

SECRET = "s3cret"


def spans(n: int) -> list[ReadableSpan]:
    resource = Resource.create({"service.name": "edge"})
    return [ReadableSpan(name=f"span {i}", context=SpanContext(i + 1, i + 1, False, TraceFlags(1)),
                         start_time=1, end_time=2, resource=resource) for i in range(n)]


@pytest.mark.parametrize(("env", "shown"), [
    ({}, "jaeger to agent localhost:6831 (UDP)"),
    ({"OTEL_EXPORTER_JAEGER_AGENT_HOST": "::1", "OTEL_EXPORTER_JAEGER_AGENT_PORT": "51831"},
     "jaeger to agent [::1]:51831 (UDP)"),
    ({"OTEL_EXPORTER_JAEGER_ENDPOINT": f"http://bob:{SECRET}@collector:14268/api/traces"},
     "jaeger to collector http://collector:14268/api/traces"),
    ({"OTEL_EXPORTER_JAEGER_ENDPOINT": "https://collector/api/traces?format=jaeger.thrift",
      "OTEL_EXPORTER_JAEGER_USER": "bob", "OTEL_EXPORTER_JAEGER_PASSWORD": SECRET},
     "jaeger to collector https://collector/api/traces?format=jaeger.thrift"),
    ({"OTEL_EXPORTER_JAEGER_ENDPOINT":
      f"https://collector/api/traces?format=jaeger.thrift&access_token={SECRET}&apiKey={SECRET}"},
     "jaeger to collector https://collector/api/traces?format=jaeger.thrift"
     "&access_token=REDACTED&apiKey=REDACTED"),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp to http://localhost:4318/v1/traces"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
      f"https://otel/v1/traces?X-Goog-Signature={SECRET}&AWSAccessKeyId={SECRET}&sig={SECRET}"
      f"&x-auth={SECRET}&tenant=a&key="},
     "otlp to https://otel/v1/traces?X-Goog-Signature=REDACTED&AWSAccessKeyId=REDACTED"
     "&sig=REDACTED&x-auth=REDACTED&tenant=a&key="),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://k:{SECRET}@otel:4318",
      "OTEL_EXPORTER_OTLP_HEADERS": f"api-key={SECRET}"},
     "otlp to https://otel:4318/v1/traces"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4318",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://otel:4318/custom"},
     "otlp to http://otel:4318/custom"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "none"}, "none"),
])
def test_the_exporter_is_named_with_its_destination_and_no_credential(
    env: dict[str, str], shown: str,
) -> None:
    assert load_config(env=env).exporter_text() == shown


def test_the_ini_otlp_base_url_is_shown_with_the_path_appended(tmp_path: Path) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[tracing]\nexporter = otlp\notlp_endpoint = http://otel:4318\n")
    config = load_config(str(ini), env={})
    assert config.exporter_text() == "otlp to http://otel:4318/v1/traces"


@pytest.mark.parametrize("env", [
    {},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://k:{SECRET}@otel:4318/base/?x=1"},
    {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://otel:4318/custom"},
])
def test_the_otlp_url_shown_is_the_one_the_exporter_posts_to(env: dict[str, str]) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from spoe_agent.tracing.pipeline import build_exporter

    config = load_config(env={"OTEL_TRACES_EXPORTER": "otlp", **env})
    exporter = build_exporter(config)
    try:
        posted_to = exporter._endpoint.replace(f"k:{SECRET}@", "")  # type: ignore[union-attr]
        assert config.exporter_text() == f"otlp to {posted_to}"
        assert exporter.shown == posted_to  # type: ignore[union-attr]
    finally:
        exporter.shutdown()  # type: ignore[union-attr]


def test_the_start_up_log_names_the_destination_and_warns_of_an_endpoint_without_a_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    for path, warned in (("", True), ("/", True), ("/api/traces", False)):
        caplog.clear()
        url = f"http://bob:{SECRET}@127.0.0.1:{port}{path}"
        agent = TracingAgent(load_config(env={"OTEL_EXPORTER_JAEGER_ENDPOINT": url}))
        with caplog.at_level(logging.INFO):
            agent.start()
            agent.stop()
        assert (f"tracing: exporter jaeger to collector http://127.0.0.1:{port}{path}, "
                "propagators ") in caplog.text
        warning = (f"jaeger_endpoint http://127.0.0.1:{port}{path} (environment variable "
                   f"OTEL_EXPORTER_JAEGER_ENDPOINT) has no path: Jaeger's collector takes "
                   f"spans at /api/traces (http://127.0.0.1:{port}/api/traces)")
        assert (warning in caplog.messages) is warned, caplog.messages
        assert SECRET not in caplog.text


class NotFound(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_found() -> Iterator[int]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def test_a_404_from_another_path_than_the_collectors_says_where_it_takes_spans(
    not_found: int, caplog: pytest.LogCaptureFixture,
) -> None:
    base = f"http://127.0.0.1:{not_found}"
    hint = f": Jaeger's collector takes spans at /api/traces ({base}/api/traces)"
    for path, hinted in (("", True), ("/jaeger", True), ("/api/traces", False)):
        caplog.clear()
        exporter = FastJaegerExporter(collector_endpoint=base + path, timeout=5)
        with caplog.at_level(logging.WARNING):
            assert exporter.export(spans(2)) is SpanExportResult.FAILURE
        (line,) = caplog.messages
        assert line.startswith(f"Jaeger collector export to {base}{path} failed: Jaeger "
                               "collector answered HTTP 404 Not Found"), line
        assert line.endswith(hint) is hinted, line
        exporter.shutdown()


def test_an_otlp_export_failure_names_the_url_without_its_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from spoe_agent.tracing.otlp import SlicedOTLPSpanExporter

    port = free_port()  # nothing listens: refused
    exporter = SlicedOTLPSpanExporter(
        endpoint=f"http://bob:{SECRET}@127.0.0.1:{port}/v1/traces", timeout=5)
    processor = QueueSpanProcessor(exporter, max_export_batch_size=8, schedule_delay_s=3600)
    with caplog.at_level(logging.WARNING):
        for span in spans(3):
            processor.on_end(span)
        processor.shutdown()
    assert processor.stats.export_failed_spans == 3
    (line,) = caplog.messages
    assert line == (f"exporting 3 spans failed (1 failed exports so far): OSError: OTLP export "
                    f"to http://127.0.0.1:{port}/v1/traces failed: ConnectionError caused by "
                    "ConnectionRefusedError: [Errno 111] Connection refused")
    assert SECRET not in caplog.text


def test_at_debug_the_otlp_clients_own_exception_chain_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The processor's DEBUG traceback holds only the OSError naming the URL."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from requests.exceptions import ConnectionError as RequestsConnectionError

    from spoe_agent.tracing.otlp import SlicedOTLPSpanExporter

    port = free_port()
    exporter = SlicedOTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=5)
    with caplog.at_level(logging.DEBUG, logger="spoe_agent.tracing.otlp"), \
            pytest.raises(OSError, match=f"OTLP export to http://127.0.0.1:{port}/v1/traces"):
        exporter.send_encoded(exporter.encode(spans(1)))
    (record,) = [r for r in caplog.records if r.name == "spoe_agent.tracing.otlp"]
    assert record.getMessage() == f"OTLP export to http://127.0.0.1:{port}/v1/traces failed"
    assert record.exc_info is not None and isinstance(record.exc_info[1], RequestsConnectionError)
    exporter.shutdown()
