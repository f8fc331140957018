"""Self-observability: Prometheus ``/metrics`` and ``/health`` on their own port.

Counters live as plain ints on the server and the tracing objects (incrementing them never
yields or locks); a custom ``prometheus_client`` collector turns them into samples at scrape
time. Only the ACK latency histogram is observed on the request path, and only when the
endpoint is enabled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spoe_agent.config import split_bind
from spoe_agent.handlers import Agent

log = logging.getLogger(__name__)

_STATUS_NAMES = {
    0: "normal", 1: "io_error", 2: "timeout", 3: "frame_too_big", 4: "invalid_frame",
    5: "no_version", 6: "no_max_frame_size", 7: "no_capabilities", 8: "unsupported_version",
    9: "bad_max_frame_size", 10: "fragmentation_not_supported", 11: "interlaced_frames",
    12: "frame_id_not_found", 13: "resource_allocation", 99: "unknown",
}


class AgentCollector(Collector):
    """Reads the server's and the agent's counters when Prometheus scrapes."""

    def __init__(self, server: Any, agent: Agent) -> None:
        self.server = server
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        stats = self.server.stats
        yield _gauge("spoe_agent_connections_open", "HAProxy connections open",
                     stats.connections_open)
        yield _counter("spoe_agent_connections", "HAProxy connections accepted",
                       stats.connections_total)
        frames = CounterMetricFamily("spoe_agent_frames", "SPOP frames handled, by type",
                                     labels=["type"])
        frames.add_metric(["notify"], stats.notifies)
        frames.add_metric(["ack"], stats.acks)
        frames.add_metric(["healthcheck_hello"], stats.healthchecks)
        for kind, value in sorted(stats.frames.items()):
            frames.add_metric([kind], value)
        yield frames
        disconnects = CounterMetricFamily(
            "spoe_agent_haproxy_disconnects", "HAPROXY-DISCONNECT frames received, by status",
            labels=["status", "reason"])
        for status, value in sorted(stats.disconnects.items()):
            disconnects.add_metric([str(status), _STATUS_NAMES.get(status, "other")], value)
        yield disconnects
        errors = CounterMetricFamily(
            "spoe_agent_protocol_errors", "AGENT-DISCONNECT sent for a protocol error, by status",
            labels=["status", "reason"])
        limits = CounterMetricFamily("spoe_agent_limit_hits", "Times a limit was reached",
                                     labels=["limit"])
        for name, value in sorted(stats.limit_hits.items()):
            if name.startswith("protocol_error_"):
                code = int(name.rsplit("_", 1)[1])
                errors.add_metric([str(code), _STATUS_NAMES.get(code, "other")], value)
            else:
                limits.add_metric([name], value)
        yield errors
        yield limits
        yield _counter("spoe_agent_handler_errors", "Handlers that raised",
                       self.agent.handler_errors)
        families: dict[str, Any] = {}
        for source in self.agent.metric_sources:
            try:
                samples = list(source())
            except Exception:
                log.exception("metrics source failed")
                continue
            for name, kind, doc, labels, value in samples:
                family = families.get(name)
                if family is None:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    family = families[name] = cls(name, doc, labels=sorted(labels))
                family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class MetricsServer:
    def __init__(self, bind: str, server: Any, agent: Agent) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(server, agent))
        self.ack_latency = Histogram(
            "spoe_agent_ack_latency_seconds",
            "Time from reading NOTIFYs to their ACKs being written, per read batch",
            buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 0.25),
            registry=self.registry,
        )
        server.set_latency_observer(self.ack_latency.observe)
        self._server = server
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if path == "/health":
                serving = server.serving
                status = "200 OK" if serving else "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/plain")])
                return [b"ok\n" if serving else b"not serving\n"]
            if path in ("/metrics", "/"):
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"try /metrics or /health\n"]

        target = split_bind(bind)
        if isinstance(target, str):
            raise ValueError("the metrics endpoint listens on HOST:PORT, not a unix socket")
        self.wsgi = WSGIServer(target, app, log=None, error_log=log)

    def start(self) -> None:
        self.wsgi.start()
        log.info("metrics on http://%s:%d/metrics", *self.wsgi.address[:2])

    def stop(self) -> None:
        self.wsgi.stop(timeout=1)


def start_metrics_server(bind: str, server: Any, agent: Agent) -> MetricsServer:
    metrics = MetricsServer(bind, server, agent)
    metrics.start()
    return metrics
