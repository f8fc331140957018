"""The demo stack's origin server: the last hop, so a trace shows what the application saw.

It continues the W3C ``traceparent`` HAProxy 2 forwards (its SERVER span becomes a child of
HAProxy 2's "Backend HTTP request"), and starts a trace of its own when there is none, which is
what the untraced 8001/8002 path looks like. Its spans go to the same Jaeger as the agent's, over
the same exporter, so one trace holds every hop.

Routes:
  ``/``              200, JSON echoing the trace context it received
  ``/slow?ms=N``     the same after N milliseconds (capped at 60 s)
  ``/status/<code>`` answers with that status code (200-599)
Every answer carries ``X-Server-Trace-Id``, the trace its spans joined: for the untraced path
that is the only way to find them.

Run as ``python -m devenv.fake_server`` (``--help`` for the options; each one also reads an
environment variable so Docker Compose can set it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

SERVICE_NAME = "fake-server"
MAX_SLOW_MS = 60_000
#: Statuses whose response must not carry a body (RFC 9110).
_NO_BODY = {204, 304}

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _EnvironGetter:
    """Reads HTTP headers out of a WSGI environ for the propagator's ``extract``.

    The WSGI server folds ``traceparent`` into ``HTTP_TRACEPARENT``; the propagator asks by the
    header's real name, so the name is mapped here rather than copying every header.
    """

    @staticmethod
    def _key(name: str) -> str:
        return "HTTP_" + name.upper().replace("-", "_")

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(self._key(key))
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


ENVIRON_GETTER = _EnvironGetter()


def default_propagator() -> TextMapPropagator:
    """W3C trace context and baggage: exactly what HAProxy's backends forward."""
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def _route(path: str, query: str) -> tuple[str, int, float]:
    """(http.route, status, delay in seconds) for a request; 404/400 for what it cannot serve."""
    if path == "/":
        return "/", 200, 0.0
    if path == "/slow":
        values = parse_qs(query).get("ms", ["100"])
        try:
            ms = int(values[0])
        except ValueError:
            return "/slow", 400, 0.0
        if not 0 <= ms <= MAX_SLOW_MS:
            return "/slow", 400, 0.0
        return "/slow", 200, ms / 1000.0
    if path.startswith("/status/"):
        code = path[len("/status/"):]
        if code.isdigit() and 200 <= int(code) <= 599:
            return "/status/{code}", int(code), 0.0
        return "/status/{code}", 400, 0.0
    return "", 404, 0.0


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _server_attributes(environ: Mapping[str, Any], route: str) -> dict[str, Any]:
    """The HTTP server semantic-convention attributes of the request."""
    attributes: dict[str, Any] = {
        "http.request.method": environ.get("REQUEST_METHOD", "GET"),
        "url.path": environ.get("PATH_INFO", "/") or "/",
        "url.scheme": environ.get("wsgi.url_scheme", "http"),
        "network.protocol.version": environ.get("SERVER_PROTOCOL", "HTTP/1.1").split("/")[-1],
    }
    if environ.get("QUERY_STRING"):
        attributes["url.query"] = environ["QUERY_STRING"]
    if route:
        attributes["http.route"] = route
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    if host:
        name, sep, port = host.rpartition(":")
        if sep and port.isdigit() and not name.endswith(":"):
            attributes["server.address"] = name.strip("[]")
            attributes["server.port"] = int(port)
        else:
            attributes["server.address"] = host
    if environ.get("REMOTE_ADDR"):
        attributes["network.peer.address"] = environ["REMOTE_ADDR"]
        # HAProxy's "option forwardfor" names the real client; without it the peer is the client.
        forwarded = environ.get("HTTP_X_FORWARDED_FOR", "").split(",")[0].strip()
        attributes["client.address"] = forwarded or environ["REMOTE_ADDR"]
    if str(environ.get("REMOTE_PORT", "")).isdigit():
        attributes["network.peer.port"] = int(environ["REMOTE_PORT"])
    if environ.get("HTTP_USER_AGENT"):
        attributes["user_agent.original"] = environ["HTTP_USER_AGENT"]
    return attributes


def make_app(
    tracer: Tracer,
    propagator: TextMapPropagator | None = None,
    sleep: Callable[[float], Any] | None = None,
) -> WSGIApp:
    """The WSGI application; ``sleep`` is gevent's by default so /slow never blocks other requests."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    if propagator is None:
        propagator = default_propagator()
    if sleep is None:
        import gevent

        sleep = gevent.sleep

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        route, status, delay = _route(path, environ.get("QUERY_STRING", ""))
        parent = propagator.extract(environ, getter=ENVIRON_GETTER)
        name = f"{method} {route}" if route else method
        with tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_server_attributes(environ, route),
        ) as span:
            with tracer.start_as_current_span("handle request", kind=SpanKind.INTERNAL) as inner:
                if delay:
                    inner.set_attribute("fake_server.delay_ms", int(delay * 1000))
                    sleep(delay)
                ctx = span.get_span_context()
                body = {
                    "service": SERVICE_NAME,
                    "method": method,
                    "path": path,
                    "status": status,
                    "received": {
                        header: environ.get(ENVIRON_GETTER._key(header))
                        for header in ("traceparent", "tracestate", "baggage")
                    },
                    "trace_id": trace.format_trace_id(ctx.trace_id),
                    "span_id": trace.format_span_id(ctx.span_id),
                }
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                # Semantic conventions: only 5xx is a server-side error; 4xx is the client's.
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("error.type", str(status))
        payload = b"" if status in _NO_BODY else json.dumps(body, indent=2).encode() + b"\n"
        headers = [("X-Server-Trace-Id", body["trace_id"])]
        if status not in _NO_BODY:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        start_response(f"{status} {_reason(status)}", headers)
        return [payload]

    return app


def build_exporter(
    kind: str, agent_host: str, agent_port: int, endpoint: str | None
) -> SpanExporter | None:
    """The exporter the agent uses too, so both ship the same way; the official one as fallback."""
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from spoe_agent.tracing.jaeger import FastJaegerExporter as Exporter
    except ImportError:  # the agent's own exporter is optional here
        from opentelemetry.exporter.jaeger.thrift import JaegerExporter as Exporter
    return Exporter(
        agent_host_name=agent_host, agent_port=agent_port, collector_endpoint=endpoint or None
    )


def build_provider(
    exporter: SpanExporter | None, service_name: str = SERVICE_NAME, delay_ms: int | None = None
) -> TracerProvider:
    """A provider whose batches leave quickly (200 ms): the demo shows traces to someone watching.

    ``OTEL_BSP_SCHEDULE_DELAY`` (milliseconds) still overrides the default delay.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if delay_ms is None:
        delay_ms = int(os.environ.get("OTEL_BSP_SCHEDULE_DELAY") or 200)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms))
    return provider


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m devenv.fake_server",
        description="Traced demo origin server (continues the incoming traceparent).",
    )
    parser.add_argument("--host", default=env.get("FAKE_SERVER_HOST", "127.0.0.1"),
                        help="listen address (FAKE_SERVER_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(env.get("FAKE_SERVER_PORT", "8080")),
                        help="listen port (FAKE_SERVER_PORT, default 8080)")
    parser.add_argument("--service-name",
                        default=env.get("FAKE_SERVER_SERVICE_NAME", SERVICE_NAME),
                        help="service.name of its spans (FAKE_SERVER_SERVICE_NAME)")
    parser.add_argument("--exporter", choices=("jaeger", "console", "none"),
                        default=env.get("FAKE_SERVER_EXPORTER", "jaeger"),
                        help="where spans go (FAKE_SERVER_EXPORTER, default jaeger)")
    parser.add_argument("--jaeger-agent-host",
                        default=env.get("OTEL_EXPORTER_JAEGER_AGENT_HOST", "127.0.0.1"),
                        help="Jaeger agent host (OTEL_EXPORTER_JAEGER_AGENT_HOST)")
    parser.add_argument("--jaeger-agent-port", type=int,
                        default=int(env.get("OTEL_EXPORTER_JAEGER_AGENT_PORT", "6831")),
                        help="Jaeger agent UDP port (OTEL_EXPORTER_JAEGER_AGENT_PORT)")
    parser.add_argument("--jaeger-endpoint", default=env.get("OTEL_EXPORTER_JAEGER_ENDPOINT"),
                        help="Jaeger collector URL; when set, spans go there over HTTP instead "
                             "(OTEL_EXPORTER_JAEGER_ENDPOINT)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # First, before the SDK creates its export thread: that thread and /slow's sleeps must be
    # greenlets, or one slow request would stall the others.
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
    import signal

    import gevent
    from gevent.pywsgi import WSGIServer

    args = build_parser().parse_args(argv)
    exporter = build_exporter(
        args.exporter, args.jaeger_agent_host, args.jaeger_agent_port, args.jaeger_endpoint
    )
    provider = build_provider(exporter, args.service_name)
    tracer = provider.get_tracer("devenv.fake_server")
    server = WSGIServer((args.host, args.port), make_app(tracer), log=sys.stderr)
    try:
        server.init_socket()
    except OSError as exc:
        print(f"fake-server: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    where = (args.jaeger_endpoint or f"{args.jaeger_agent_host}:{args.jaeger_agent_port}/udp"
             if args.exporter == "jaeger" else args.exporter)
    print(f"fake-server: listening on http://{args.host}:{args.port}/ "
          f"(service {args.service_name}, spans to {where})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        # Flushes the spans still queued: the last requests of a demo must not vanish.
        provider.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
