"""The exporter and sampler choices of the configuration, each exercised for real."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from spoe_agent.config import PROPAGATORS, SAMPLERS, load_config
from spoe_agent.protocol.types import Message
from spoe_agent.tracing.agent import TracingAgent
from spoe_agent.tracing.jaeger import FastJaegerExporter
from spoe_agent.tracing.pipeline import Resources, build_exporter, build_sampler
from spoe_agent.tracing.propagation import build_propagator
from spoe_agent.viewer.receiver import JaegerReceiver


def test_samplers_follow_the_otel_vocabulary() -> None:
    assert build_sampler("always_on") is ALWAYS_ON
    assert build_sampler("always_off") is ALWAYS_OFF
    ratio = build_sampler("traceidratio", "0.25")
    assert isinstance(ratio, TraceIdRatioBased) and ratio.rate == 0.25
    assert isinstance(build_sampler("parentbased_traceidratio", "0.5"), ParentBased)
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("sometimes")


def test_every_name_the_configuration_accepts_builds() -> None:
    """The configuration keeps the vocabulary (it refuses anything else, with the line); the
    pipeline must build each word of it, or an accepted setting would fail at start."""
    for name in SAMPLERS:
        assert isinstance(build_sampler(name, "0.5"), Sampler), name
    for name in PROPAGATORS:
        assert isinstance(build_propagator(name), TextMapPropagator), name


def test_a_collector_post_is_bounded_by_the_jaeger_timeout_within_the_export_timeout() -> None:
    endpoint = {"OTEL_EXPORTER_JAEGER_ENDPOINT": "http://127.0.0.1:14268/api/traces"}

    def post_bound(env: dict[str, str]) -> float:
        exporter = build_exporter(load_config(env={**endpoint, **env}))
        assert isinstance(exporter, FastJaegerExporter) and exporter._http is not None
        return exporter._http._timeout

    assert post_bound({}) == 10.0  # the official exporter's default
    assert post_bound({"OTEL_EXPORTER_JAEGER_TIMEOUT": "3"}) == 3.0  # seconds, as there
    assert post_bound({"OTEL_EXPORTER_JAEGER_TIMEOUT": "60", "OTEL_BSP_EXPORT_TIMEOUT": "20000"}) \
        == 20.0  # never past the whole export's bound


def test_jaeger_console_and_none_exporters() -> None:
    udp = build_exporter(load_config(env={}))
    assert isinstance(udp, FastJaegerExporter) and udp.collector_endpoint is None
    http = build_exporter(load_config(env={
        "OTEL_EXPORTER_JAEGER_ENDPOINT": "http://127.0.0.1:14268/api/traces"}))
    assert isinstance(http, FastJaegerExporter)
    assert http.collector_endpoint == "http://127.0.0.1:14268/api/traces"
    assert isinstance(build_exporter(load_config(env={"OTEL_TRACES_EXPORTER": "console"})),
                      ConsoleSpanExporter)
    assert build_exporter(load_config(env={"OTEL_TRACES_EXPORTER": "none"})) is None


@pytest.mark.parametrize("disabled", ["false", "true"])
def test_a_disabled_sdk_exports_nothing_and_hands_on_the_incoming_context(disabled: str) -> None:
    """OTEL_SDK_DISABLED=true: the collector gets no span, and HAProxy gets the client's
    context back unchanged (the services behind it join the client's span, as behind
    OpenTelemetry's API with no SDK, not a HAProxy span nobody receives), baggage included;
    with no incoming context, no trace context at all. ``false`` is the control: the same
    spans reach the receiver and the inject names HAProxy's own span."""
    client = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with JaegerReceiver(udp_addr=("127.0.0.1", 0), http_addr=None, quiet_s=0.2) as receiver:
        host, port = receiver.udp_address
        agent = TracingAgent(load_config(env={
            "OTEL_EXPORTER_JAEGER_AGENT_HOST": str(host),
            "OTEL_EXPORTER_JAEGER_AGENT_PORT": str(port), "OTEL_SDK_DISABLED": disabled}))
        try:
            joined = agent.handle(Message("m", [
                ("id", "s1"), ("service", "edge"), ("span", "HAProxy session"),
                ("traceparent", client), ("tracestate", "k=v"), ("baggage", "user=7"),
                ("inject", "HAProxy session")]))
            agent.handle(Message("m", [("id", "s1"), ("finish", "*")]))
            alone = agent.handle(Message("m", [
                ("id", "s2"), ("span", "HAProxy session"), ("inject", "HAProxy session")]))
            agent.handle(Message("m", [("id", "s2"), ("finish", "*")]))
        finally:
            agent.stop()  # flushes the queue to the receiver
        joined_vars = {a.name: a.value for a in joined}
        alone_vars = {a.name: a.value for a in alone}
        assert joined_vars["baggage"] == "user=7", joined_vars
        if disabled == "true":
            assert joined_vars["traceparent"] == client, joined_vars
            assert joined_vars["tracestate"] == "k=v", joined_vars
            assert "traceparent" not in alone_vars, alone_vars
            assert not receiver.wait_for(lambda spans: bool(spans), timeout=1.0)
            assert receiver.spans == []
        else:
            trace, parent = client.split("-")[1:3]
            assert joined_vars["traceparent"].split("-")[1] == trace
            assert joined_vars["traceparent"].split("-")[2] != parent, joined_vars
            assert alone_vars["traceparent"].startswith("00-"), alone_vars
            assert receiver.wait_for(
                lambda spans: sorted(s.operation_name for s in spans) == ["HAProxy session"] * 2,
                timeout=10)


def test_otlp_request_timeout_follows_the_otel_variables() -> None:
    otlp = {"OTEL_TRACES_EXPORTER": "otlp"}
    assert build_exporter(load_config(env=otlp))._timeout == 10  # the exporter's default
    assert build_exporter(load_config(env={**otlp, "OTEL_EXPORTER_OTLP_TIMEOUT": "3"}))._timeout == 3
    traces = {**otlp, "OTEL_EXPORTER_OTLP_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "4s"}
    assert build_exporter(load_config(env=traces))._timeout == 4
    # The agent's own export timeout bounds the request too.
    explicit = load_config(env={**otlp, "OTEL_BSP_EXPORT_TIMEOUT": "1500"})
    assert build_exporter(explicit)._timeout == 1.5


def test_the_otlp_exporter_reads_nothing_from_the_environment_that_config_did_not_check(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set in the process's environment, as the agent sees them: an empty variable is unset
    (the SDK took an empty certificate as "do not verify", an empty endpoint as the URL '')."""
    for name in ("OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_TIMEOUT",
                 "OTEL_EXPORTER_OTLP_HEADERS"):
        monkeypatch.setenv(name, "")
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp"}
    exporter = build_exporter(load_config(env=env))
    assert exporter._certificate_file is True  # verified against the system's CAs
    assert exporter._endpoint == "http://localhost:4318/v1/traces"
    assert exporter._timeout == 10 and exporter._compression.value == "none"
    import certifi  # a real CA bundle, which the configuration now loads to check it

    ca = certifi.where()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", ca)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=s%20t,x-tenant=a")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", "   ")  # blank: unset for the SDK too
    exporter = build_exporter(load_config(env={**os.environ, "OTEL_TRACES_EXPORTER": "otlp"}))
    assert exporter._client_key_file is None and exporter._client_cert is None
    assert os.environ["OTEL_EXPORTER_OTLP_CLIENT_KEY"] == "   "  # put back
    assert exporter._certificate_file == ca
    assert exporter._session.headers["api-key"] == "s t"
    assert exporter._session.headers["x-tenant"] == "a"
    assert exporter._compression.value == "gzip"


class _Collector(BaseHTTPRequestHandler):
    bodies: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.bodies.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("where", ["traces variable", "agent.ini base URL"])
def test_otlp_exporter_sends_protobuf_spans_to_a_collector(where: str, tmp_path: Path) -> None:
    """Also through agent.ini's otlp_endpoint given as a base URL (the README's form), which
    must post to /v1/traces as OTEL_EXPORTER_OTLP_ENDPOINT does, not to /."""
    # The otlp extra is installed by every tox environment and by ./dev: a missing one must fail.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    _Collector.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        if where == "traces variable":
            config = load_config(env={"OTEL_TRACES_EXPORTER": "otlp",
                                      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": base + "/v1/traces"})
        else:
            ini = tmp_path / "agent.ini"
            ini.write_text(f"[tracing]\nexporter = otlp\notlp_endpoint = {base}\n")
            config = load_config(str(ini), env={})
        agent = TracingAgent(config)
        agent.handle(Message("m", [("id", "s1"), ("service", "edge"), ("span", "HAProxy session"),
                                   ("tag", "url.path"), ("", "/x"), ("finish", "*")]))
        agent.stop()  # flushes the queue through the OTLP exporter
    finally:
        server.shutdown()
    assert _Collector.bodies, "the collector received nothing"
    path, content_type, body = _Collector.bodies[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    resource_spans = request.resource_spans[0]
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert service["service.name"] == "edge"
    span = resource_spans.scope_spans[0].spans[0]
    assert span.name == "HAProxy session"
    assert {a.key: a.value.string_value for a in span.attributes}["url.path"] == "/x"


def test_a_services_resource_is_what_the_sdk_makes_without_detecting_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Detection (a thread pool: under gevent, a yield) runs once, when the agent is built;
    a new service= while serving only merges its name in, with the SDK's attributes."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab,team=edge")
    resources = Resources()

    def no_detection(*args: object, **kwargs: object) -> Resource:
        raise AssertionError("Resource.create while serving")

    monkeypatch.setattr(Resource, "create", no_detection)
    made = resources("hop-2")
    monkeypatch.undo()
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab,team=edge")
    assert made.attributes == Resource.create({"service.name": "hop-2"}).attributes
    assert made.attributes["service.name"] == "hop-2" and made.attributes["team"] == "edge"
    assert resources("hop-2") is made
