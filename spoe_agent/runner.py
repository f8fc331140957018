"""Run one agent process: serve, then on SIGTERM/SIGINT shut down cleanly and exit 0.

Shutdown order matters for "no span of a completed request is lost": stop accepting, let the
NOTIFYs in flight finish, AGENT-DISCONNECT every connection, then run the agent's shutdown hooks
(tracing ends open spans as incomplete and flushes its exporter within a deadline).
"""

from __future__ import annotations

import logging
import signal

import gevent
from gevent.event import Event

from spoe_agent.config import AgentConfig
from spoe_agent.handlers import Agent
from spoe_agent.server import SpoaServer

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0


def run(agent: Agent, config: AgentConfig, *, listener: object = None) -> int:
    ssl_args = tls_arguments(config)
    server = SpoaServer(agent, config, listener=listener, ssl_args=ssl_args)
    for hook in agent.on_startup:
        hook()
    metrics = None
    if config.metrics:
        from spoe_agent.metrics import start_metrics_server

        metrics = start_metrics_server(config.metrics, server, agent)
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    server.start()
    stop.wait()
    log.info("shutting down")
    server.stop(timeout=SHUTDOWN_TIMEOUT)
    for hook in agent.on_shutdown:
        try:
            hook()
        except Exception:
            log.exception("shutdown hook failed")
    if metrics is not None:
        metrics.stop()
    log.info("stopped")
    return 0


def tls_arguments(config: AgentConfig) -> dict[str, object] | None:
    """gevent StreamServer's ``ssl_context`` for the optional TLS listener."""
    if not config.tls_cert:
        return None
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca:
        context.load_verify_locations(config.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return {"ssl_context": context}
