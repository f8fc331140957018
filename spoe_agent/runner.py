"""Run one agent process: serve, then on SIGTERM/SIGINT/SIGHUP shut down cleanly and exit 0.

Shutdown order matters for "no span of a completed request is lost": stop accepting, let each
connection serve the NOTIFYs HAProxy already sent and its handlers in flight, AGENT-DISCONNECT
every connection (status 0), then run the agent's shutdown hooks (tracing ends open spans as
incomplete and flushes its exporter within a deadline). The metrics endpoint stays up until the
end, with ``/health`` answering 503 from the first signal on. A second signal during shutdown
exits at once (status 1), for an operator who would rather lose the flush than wait for it.
A worker of ``--workers N`` is not that operator's to hurry: a process manager signals every
process of the agent at once (systemd's default ``KillMode=control-group``, ``pkill``), and the
supervisor's own SIGTERM follows, so a worker takes repeated signals as one; the supervisor
keeps the "second signal exits now" for the whole agent.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from spoe_agent.config import AgentConfig, bind_text
from spoe_agent.handlers import Agent
from spoe_agent.listeners import make_listener, remove_listener_socket
from spoe_agent.logs import EVERY_TIME, flush_held_lines
from spoe_agent.server import SpoaServer
from spoe_agent.stop_signals import IGNORED_SIGNALS, STOP_SIGNALS, stopped_early

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0
EXIT_FORCED = 1


def ignore_signals(signums: tuple[int, ...]) -> None:
    """Log and ignore ``signums`` (see :data:`IGNORED_SIGNALS`)."""
    def ignored(signum: int) -> None:
        log.info("%s ignored: the agent logs to stderr (nothing to reopen) and has no reload; "
                 "SIGTERM stops it", signal.Signals(signum).name, extra=EVERY_TIME)

    for signum in signums:
        gevent.signal_handler(signum, ignored, signum)


class StartupError(Exception):
    """The agent cannot start serving (port taken, unreadable certificate): no traceback."""


def run(
    agent: Agent, config: AgentConfig, *, listener: object = None, second_signal_exits: bool = True,
    ignored_signals: tuple[int, ...] = IGNORED_SIGNALS,
) -> int:
    tls = tls_context(config)
    own_listener = listener is None
    if listener is None:
        try:
            listener = make_listener(config.bind, listen=False, mode=config.unix_mode,
                                     group=config.unix_group)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {bind_text(config.bind)} ({config.set_by('bind')}): "
                f"{exc.strerror or exc}") from None
    server = SpoaServer(agent, config, listener=listener, tls_context=tls)
    metrics = None
    if config.metrics:
        from spoe_agent.metrics import bind_failure, start_metrics_server

        try:
            metrics = start_metrics_server(config.metrics, server, agent)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {bind_text(config.metrics)}: "
                f"{bind_failure(exc, config.metrics)}"
            ) from None
    for hook in agent.on_startup:
        try:
            hook()
        except Exception as exc:  # an --app's hook: its failure is a start-up failure
            name = getattr(hook, "__qualname__", repr(hook))
            raise StartupError(f"the on_startup hook {name} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    stop = Event()

    def on_signal() -> None:
        if stop.is_set():
            if not second_signal_exits:
                log.info("already shutting down")
                return
            log.warning("second signal during shutdown: exiting now, unflushed spans are lost")
            logging.shutdown()
            os._exit(EXIT_FORCED)
        stop.set()

    for signum in STOP_SIGNALS:
        gevent.signal_handler(signum, on_signal)
    ignore_signals(ignored_signals)
    if stopped_early():
        stop.set()
    # What start-up built (modules, the configuration, the exporter) lives as long as the
    # process: frozen, it is out of the cyclic collector's sight, whose full collections had to
    # walk it (~15 ms of stall each, about one every few thousand traced requests).
    gc.collect()
    gc.freeze()
    try:
        server.start()
    except OSError as exc:
        # Bound, not listening yet: with SO_REUSEADDR another process could bind the same port
        # meanwhile and listen first (code review: a traceback, after the hooks had run).
        raise StartupError(f"cannot listen on {bind_text(config.bind)} "
                           f"({config.set_by('bind')}): {exc.strerror or exc}") from None
    stop.wait()
    log.info("shutting down: draining %d connections", server.stats.connections_open)
    server.stop(timeout=SHUTDOWN_TIMEOUT)
    if own_listener:
        remove_listener_socket(config.bind)
    for hook in agent.on_shutdown:
        try:
            hook()
        except Exception:
            # Each is said: the process ends before a held-back line could be summed up.
            log.exception("shutdown hook %s failed", getattr(hook, "__qualname__", repr(hook)),
                          extra=EVERY_TIME)
    if metrics is not None:
        metrics.stop()
    flush_held_lines()
    log.info("stopped")
    return 0


def tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The server-side TLS context for the SPOP listener, or None when TLS is off.

    With ``tls_ca`` set, a client certificate signed by that CA is required: HAProxy presents
    one with ``server ... ssl crt client.pem``. gevent's ``SSLContext`` so that handshakes and
    reads cooperate with the other connections whether or not the process is monkey-patched.
    """
    if not config.tls_cert:
        return None
    from gevent import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Each file is opened first, so that an error names the one at fault (and where it was
    # set); OpenSSL's own errors say neither.
    for attr in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(config, attr)
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise StartupError(f"{_set_at(config, attr)}: cannot read {attr} {path}: "
                                   f"{exc.strerror or exc}") from None
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"{_set_at(config, 'tls_cert')}: cannot load the TLS certificate "
                           f"{config.tls_cert} with the key {config.tls_key}: {exc}") from None
    if config.tls_ca:
        try:
            context.load_verify_locations(config.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"{_set_at(config, 'tls_ca')}: cannot load the CA certificates "
                               f"{config.tls_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _set_at(config: AgentConfig, attr: str) -> str:
    return config.sources.get(attr, attr)
