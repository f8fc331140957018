"""Self-observability: Prometheus ``/metrics`` and ``/health`` on their own port.

Counters live as plain ints on the server and the tracing objects (incrementing them never
yields or locks); a custom ``prometheus_client`` collector turns them into samples at scrape
time. Only the ACK latency histogram is observed on the request path, and only when the
endpoint is enabled.

Families (``_total`` is added to counters by the exposition format):

* ``spoe_agent_connections_open`` / ``spoe_agent_connections``
* ``spoe_agent_frames{direction,type}``: HAPROXY-HELLO, NOTIFY, HAPROXY-DISCONNECT and aborted
  fragments in; AGENT-HELLO, ACK and AGENT-DISCONNECT out
* ``spoe_agent_healthchecks``, ``spoe_agent_tls_handshake_errors``, ``spoe_agent_handler_errors``
* ``spoe_agent_disconnects{direction,status,reason}``: DISCONNECT frames by status code
* ``spoe_agent_limit_hits{limit}``: every configured limit, server and tracing side
* ``spoe_agent_ack_latency_seconds``: per read holding NOTIFYs, the time from the read to the
  end of its work (its ACKs written, then the span work deferred until after them); NOTIFYs
  whose handlers are ``concurrent=True`` are not in it (their own greenlets answer them)
* whatever the agent's ``metric_sources`` add (sessions, spans, exporter, export queue)
* ``process_*``: the process's memory, CPU and file descriptors
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spoe_agent.config import split_bind
from spoe_agent.handlers import Agent, MetricSample
from spoe_agent.logs import Throttle
from spoe_agent.protocol.types import Status
from spoe_agent.server import SpoaServer, Stats

log = logging.getLogger(__name__)

STATUS_NAMES = {int(status): status.name.lower() for status in Status}  # "reason" labels
ACK_LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0,
)


class _Families:
    """Metric families by name, so samples from several sources share one family each."""

    def __init__(self) -> None:
        self._by_name: dict[str, Any] = {}

    def add(self, name: str, kind: str, doc: str, labels: dict[str, str], value: float) -> None:
        keys = sorted(labels)
        family = self._by_name.get(name)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = self._by_name[name] = cls(name, doc, labels=keys)
        family.add_metric([labels[k] for k in keys], value)

    def extend(self, samples: Iterable[MetricSample]) -> None:
        for name, kind, doc, labels, value in samples:
            self.add(name, kind, doc, labels, value)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._by_name.values())


class AgentCollector(Collector):
    """Reads the server's and the agent's counters when Prometheus scrapes."""

    def __init__(self, server: SpoaServer, agent: Agent) -> None:
        self.server = server
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        families = _Families()
        families.extend(server_samples(self.server.stats))
        families.add("spoe_agent_handler_errors", "counter",
                     "Message handlers that raised or returned actions SPOP cannot carry", {},
                     self.agent.handler_errors)
        for source in self.agent.metric_sources:
            try:
                families.extend(list(source()))
            except Exception:
                # Keyed by source: one failing must not hide another's error for good (a
                # scrape every 15 s is always within the 10 s window of the one before).
                name = getattr(source, "__qualname__", repr(source))
                log.exception("metrics source %s failed", name,
                              extra={"rate_key": f"metrics source {name}"})
        yield from families


def server_samples(stats: Stats) -> Iterator[MetricSample]:
    """The SPOP server's counters as (name, kind, help, labels, value) samples."""
    yield ("spoe_agent_connections_open", "gauge", "HAProxy connections open", {},
           stats.connections_open)
    yield ("spoe_agent_connections", "counter", "HAProxy connections accepted", {},
           stats.connections_total)
    for direction, value in (("in", stats.moved_in), ("out", stats.moved_out)):
        yield ("spoe_agent_connections_moved", "counter",
               "HAProxy connections handed between workers, at a frame boundary",
               {"direction": direction}, value)
    frames = "spoe_agent_frames"
    doc = "SPOP frames, by direction and type"
    yield (frames, "counter", doc, {"direction": "in", "type": "haproxy_hello"}, stats.hellos)
    yield (frames, "counter", doc, {"direction": "in", "type": "notify"}, stats.notifies)
    yield (frames, "counter", doc, {"direction": "in", "type": "notify_aborted"}, stats.aborted)
    yield (frames, "counter", doc, {"direction": "in", "type": "haproxy_disconnect"},
           sum(stats.disconnects_received.values()))
    yield (frames, "counter", doc, {"direction": "out", "type": "agent_hello"}, stats.hellos)
    yield (frames, "counter", doc, {"direction": "out", "type": "ack"}, stats.acks)
    yield (frames, "counter", doc, {"direction": "out", "type": "agent_disconnect"},
           sum(stats.disconnects_sent.values()))
    yield ("spoe_agent_healthchecks", "counter", "Health-check HELLOs answered", {},
           stats.healthchecks)
    yield ("spoe_agent_tls_handshake_errors", "counter", "TLS handshakes that failed", {},
           stats.tls_handshake_errors)
    doc = "DISCONNECT frames by direction and SPOP status code"
    for direction, counts in (("received", stats.disconnects_received),
                              ("sent", stats.disconnects_sent)):
        for status, value in sorted(counts.items()):
            labels = {"direction": direction, "status": str(int(status)),
                      "reason": STATUS_NAMES.get(status, "other")}
            yield ("spoe_agent_disconnects", "counter", doc, labels, value)
    for name, value in sorted(stats.limit_hits.items()):
        yield ("spoe_agent_limit_hits", "counter", "Times a configured limit was reached",
               {"limit": name}, value)


class MetricsServer:
    def __init__(self, bind: str, server: SpoaServer, agent: Agent) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(server, agent))
        ProcessCollector(registry=self.registry)
        self.ack_latency = Histogram(
            "spoe_agent_ack_latency_seconds",
            "Per read holding NOTIFYs: from the read to its ACKs written and the work deferred "
            "after them (concurrent handlers excluded)",
            buckets=ACK_LATENCY_BUCKETS,
            registry=self.registry,
        )
        server.set_latency_observer(self.ack_latency.observe)
        self._server = server

        def health() -> tuple[bool, bytes]:
            serving = server.serving
            return serving, b"ok\n" if serving else b"not serving\n"

        self.wsgi = endpoint_server(bind, self.registry, health)

    def start(self) -> None:
        self.wsgi.start()
        log.info("metrics on %s/metrics", url_of(*self.wsgi.address[:2]))

    def stop(self) -> None:
        self.wsgi.stop(timeout=1)


def endpoint_server(
    bind: str, registry: CollectorRegistry, health: Callable[[], tuple[bool, bytes]]
) -> WSGIServer:
    """``/metrics`` (also ``/``) from ``registry`` and ``/health`` (200 or 503 with
    ``health()``'s body) on ``bind``, not started. The supervisor of ``--workers`` serves the same
    shape (spoe_agent.workers.metrics)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            ok, body = health()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [body]
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /metrics or /health\n"]

    target = split_bind(bind)
    if isinstance(target, str):
        raise ValueError("the metrics endpoint listens on HOST:PORT, not a unix socket")
    return _EndpointServer(target, app, log=None, error_log=_HttpErrors(),
                           spawn=Pool(ENDPOINT_CONNECTIONS))


#: Connections the endpoint serves at once; more wait in the listen backlog. Unbounded, 200
#: half-sent requests took the agent's last descriptors and stopped HAProxy's connections
#: being accepted (code review). Prometheus and a health check need two or three.
ENDPOINT_CONNECTIONS = 16
#: How long a request may take to arrive, each read: a client that sends a byte and waits
#: held its connection for ever.
ENDPOINT_READ_TIMEOUT_S = 10.0
#: How long a request may take, from its first byte to the end of its answer: a client that
#: sent a byte every few seconds kept its slot for ever, and 16 of them kept /health from
#: answering (code review).
ENDPOINT_REQUEST_TIMEOUT_S = 10.0


class _Handler(WSGIHandler):
    def handle_one_request(self) -> Any:
        try:
            if self.rfile.closed or not self.rfile.peek(1):
                return None  # the client is gone
        except OSError:  # no request within the read timeout: a kept-alive connection idle
            return None
        timer = gevent.Timeout(ENDPOINT_REQUEST_TIMEOUT_S)
        timer.start()
        try:
            return super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self.server.error_log.write(
                f"a request from {self.client_address[0]} took over "
                f"{ENDPOINT_REQUEST_TIMEOUT_S:g}s; its connection is closed")
            return None
        finally:
            timer.close()


class _EndpointServer(WSGIServer):
    handler_class = _Handler

    def handle(self, sock: Any, address: Any) -> None:
        sock.settimeout(ENDPOINT_READ_TIMEOUT_S)
        super().handle(sock, address)


class _HttpErrors:
    """gevent's error log for the endpoint: one line per 10 s, however many bad requests (each
    line of its own text named a socket and a port, so no rate limit ever held one back)."""

    def __init__(self) -> None:
        self._throttle = Throttle(log)

    def write(self, text: str) -> None:
        first = text.strip().splitlines()[0] if text.strip() else "(empty)"
        self._throttle.warning("metrics_http_error", "metrics endpoint: %s", first[:300])

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


def bind_failure(exc: OSError, bind: str) -> str:
    """Why ``endpoint_server`` could not listen on ``bind``, without the address gevent
    appends to the reason: the message around it names the address already."""
    reason = exc.strerror or str(exc)
    return reason.removesuffix(f": {split_bind(bind)!r}")


def url_of(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets (``parse_bind`` keeps it bare)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_metrics_server(bind: str, server: SpoaServer, agent: Agent) -> MetricsServer:
    metrics = MetricsServer(bind, server, agent)
    metrics.start()
    return metrics
