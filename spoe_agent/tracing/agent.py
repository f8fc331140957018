"""The tracing agent: the default app of ``spoe-agent``.

Every SPOE message goes through :func:`~spoe_agent.tracing.language.parse_message` into the shared
:class:`~spoe_agent.tracing.registry.SessionRegistry`; finished spans go to a queue processor
that exports them off the request path, so an ACK never waits for Jaeger.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import gevent

from spoe_agent.config import AgentConfig
from spoe_agent.handlers import Agent, MetricSample
from spoe_agent.protocol.types import Message, SetVar
from spoe_agent.tracing.language import parse_message
from spoe_agent.tracing.pipeline import Resources, build_exporter, build_sampler
from spoe_agent.tracing.processor import QueueSpanProcessor
from spoe_agent.tracing.propagation import build_propagator
from spoe_agent.tracing.registry import SessionRegistry

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 5.0


class TracingAgent(Agent):
    """An :class:`Agent` whose fallback handler turns span arguments into spans."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__("tracing")
        self.config = config
        self.language_stats: Counter[str] = Counter()
        exporter = build_exporter(config)
        self.exporter = exporter
        self.processor: QueueSpanProcessor | None = None
        if exporter is not None:
            self.processor = QueueSpanProcessor(
                exporter,
                max_queue_size=config.export_queue_size,
                max_export_batch_size=config.export_batch_size,
                schedule_delay_s=config.export_delay,
                export_timeout_s=config.export_timeout,
            )
            emit = self.processor.on_end
        else:
            emit = _discard
        self.registry = SessionRegistry(
            emit,
            propagator=build_propagator(config.propagators),
            sampler=build_sampler(config.sampler, config.sampler_arg),
            ttl_s=config.session_ttl,
            max_sessions=config.max_sessions,
            resource_for_service=Resources(),
            default_service=config.service_name,
            max_spans_per_session=config.max_spans_per_session,
            max_attr_len=config.max_attribute_length,
        )
        self._expiry: gevent.Greenlet | None = None
        self.fallback(self.handle)
        self.on_startup.append(self.start)
        self.on_shutdown.append(self.stop)
        self.metric_sources.append(self.metric_samples)

    def handle(self, message: Message) -> list[SetVar] | None:
        command = parse_message(message, self.language_stats)
        if command is None:
            return None
        return self.registry.apply(command)

    def start(self) -> None:
        interval = max(0.05, min(1.0, self.config.session_ttl / 4))
        self._expiry = gevent.spawn(self._expire_loop, interval)
        log.info("tracing: exporter %s, propagators %s, sampler %s, session ttl %.1fs",
                 self.config.exporter, ",".join(self.config.propagators) or "none",
                 self.config.sampler, self.config.session_ttl)

    def _expire_loop(self, interval: float) -> None:
        while True:
            gevent.sleep(interval)
            try:
                self.registry.expire()
            except Exception:  # pragma: no cover - a bug here must not stop expiry for good
                log.exception("session expiry failed")

    def stop(self) -> None:
        """End what is still open as incomplete and flush the exporter within a deadline."""
        if self._expiry is not None:
            self._expiry.kill(block=False)
        ended = self.registry.close_all("shutdown")
        if ended:
            log.info("tracing: ended %d open sessions as incomplete at shutdown", ended)
        if self.processor is not None:
            self.processor.shutdown(FLUSH_TIMEOUT_S)

    def metric_samples(self) -> Iterator[MetricSample]:
        reg = self.registry.stats
        yield ("spoe_agent_sessions_open", "gauge", "Sessions (HAProxy streams) being traced",
               {}, len(self.registry))
        for name, value in sorted(reg.items()):
            yield ("spoe_agent_tracing_events", "counter",
                   "Session registry events (sessions started/evicted, spans ended, anomalies)",
                   {"event": name}, value)
        for name, value in sorted(self.language_stats.items()):
            yield ("spoe_agent_language_events", "counter",
                   "Span-language anomalies in SPOE message arguments", {"event": name}, value)
        processor = self.processor
        if processor is not None:
            pstats = processor.stats
            yield ("spoe_agent_spans_queued", "counter", "Spans handed to the exporter queue",
                   {}, pstats.queued)
            yield ("spoe_agent_spans_exported", "counter", "Spans exported", {}, pstats.exported)
            yield ("spoe_agent_spans_dropped", "counter", "Spans dropped",
                   {"reason": "queue_full"}, pstats.dropped_queue_full)
            yield ("spoe_agent_spans_dropped", "counter", "Spans dropped",
                   {"reason": "export_failed"}, pstats.export_failed_spans)
            yield ("spoe_agent_exporter_errors", "counter", "Failed export calls", {},
                   pstats.export_errors)
            yield ("spoe_agent_export_queue_size", "gauge", "Spans waiting for export", {},
                   processor.queue_size)
        estats = getattr(self.exporter, "stats", None)
        if estats is not None:
            for name in ("send_errors", "spans_dropped_oversize", "spans_dropped_invalid"):
                if hasattr(estats, name):
                    yield ("spoe_agent_jaeger_exporter", "counter", "Jaeger exporter counters",
                           {"counter": name}, getattr(estats, name))


def _discard(span: Any) -> None:
    return None


def build_tracing_agent(config: AgentConfig) -> TracingAgent:
    return TracingAgent(config)
