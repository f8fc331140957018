"""``--workers N``: N processes on one address, producing the traces of one process.

:mod:`.supervisor` owns the listening socket and keeps N worker interpreters running;
:mod:`.handoff` carries each accepted connection to the least loaded worker; :mod:`.router`
(no I/O) frames what workers exchange and orders it; :mod:`.mesh` moves those frames between
workers over unix sockets and knows which worker owns each open session. docs/scaling.md
explains the design and the measurements behind it.

The CLI calls :func:`worker_config` before it builds the agent (a worker's share of the session
cap and its metrics port) and :func:`serve` instead of :func:`spoe_agent.runner.run`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
from collections import deque
from typing import Any

from spoe_agent.config import AgentConfig
from spoe_agent.handlers import Agent

log = logging.getLogger(__name__)

_PARENT_CHECK_S = 1.0
_REPORT_S = 1.0
_SAMPLES_PER_REPORT = 10


def inherited_config_bytes() -> bytes | None:
    """The ``-c`` file's bytes as the supervisor read them (``supervisor.ENV_CONFIG_FD``), or
    None when it passed none (no ``-c``, or this process is not one of its workers)."""
    from spoe_agent.workers.supervisor import ENV_CONFIG_FD

    text = os.environ.pop(ENV_CONFIG_FD, None)
    if text is None:
        return None
    fd = int(text)
    chunks = []
    offset = 0
    try:
        while True:
            chunk = os.pread(fd, 1 << 16, offset)  # pread: the offset is shared with our peers
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def worker_config(config: AgentConfig, index: int) -> AgentConfig:
    """Worker ``index``'s configuration: its share of ``max_sessions`` and ``max_connections``,
    its metrics port.

    ``max_sessions`` bounds the whole agent's memory, so each of N workers holds at most
    ``ceil(max_sessions / N)``; a session lives in the worker that received its first event,
    and the supervisor spreads HAProxy's connections evenly, so the cap evicts the least
    recently active sessions of the agent as evenly as the connections are spread.
    The export queue (``OTEL_BSP_MAX_QUEUE_SIZE``) is the agent's too, shared the same way, so
    the summed ``spoe_agent_export_queue_limit`` the supervisor serves is the configured one
    (up to N - 1 more, where N does not divide it: each share is rounded up).
    Worker i serves ``/metrics`` on the configured port + 1 + i: the configured port is the
    supervisor's, which serves the agent's totals, summed over the workers
    (:mod:`spoe_agent.workers.metrics`).
    """
    workers = config.workers

    def share(total: int) -> int:
        return max(1, -(-total // workers))  # ceil(total / workers)

    changes: dict[str, Any] = {
        "max_sessions": share(config.max_sessions),
        # The agent's too: the supervisor hands each connection to the least loaded worker.
        "max_connections": share(config.max_connections),
        "export_queue_size": share(config.export_queue_size),
    }
    if config.metrics:
        host, _, port = config.metrics.rpartition(":")
        changes["metrics"] = f"{host}:{int(port) + 1 + index}"
    return dataclasses.replace(config, **changes)


def serve(agent: Agent, config: AgentConfig, argv: list[str], index: int | None) -> int:
    """Supervise (``index is None``) or run worker ``index`` until SIGTERM."""
    if index is None:
        from spoe_agent.tracing.agent import TracingAgent
        from spoe_agent.workers.supervisor import Supervisor

        # The supervisor built the agent only to validate the configuration; it serves nothing.
        # The tracing agent's exporter is let go (quietly: its summary, "0 spans exported in
        # all", would only mislead). An --app's own hooks are not run: they pair with an
        # on_startup this process never ran (black-box run: a hook that closes a pool or
        # removes a file ran here, before any worker started).
        if isinstance(agent, TracingAgent):
            quiet = logging.getLogger("spoe_agent.tracing")
            level = quiet.level
            quiet.setLevel(max(logging.WARNING, quiet.getEffectiveLevel()))
            try:
                agent.stop()
            finally:
                quiet.setLevel(level)
        return Supervisor(config, argv).run()
    return _run_worker(agent, config, index)


def _run_worker(agent: Agent, config: AgentConfig, index: int) -> int:
    import gevent

    from spoe_agent.runner import run
    from spoe_agent.stop_signals import IGNORED_SIGNALS
    from spoe_agent.workers.handoff import GIVE_SIGNAL, HandoffListener
    from spoe_agent.workers.supervisor import ENV_HANDOFF_FD, ENV_LISTEN_FAMILY, ENV_RUNTIME_DIR

    try:
        fd = int(os.environ[ENV_HANDOFF_FD])
        family = int(os.environ[ENV_LISTEN_FAMILY])
        runtime_dir = os.environ[ENV_RUNTIME_DIR]
    except (KeyError, ValueError):
        raise SystemExit(
            "spoe-agent: --worker-index is for the processes the supervisor starts; "
            "run with --workers N instead"
        ) from None
    listener = HandoffListener(fd, family, config.bind)
    # Before the first report: the supervisor asks only workers that reported for connections.
    gevent.signal_handler(GIVE_SIGNAL, listener.give)
    registry = getattr(agent, "registry", None)
    if registry is not None and hasattr(agent, "router") and config.workers > 1:
        from spoe_agent.workers.mesh import PeerMesh

        mesh = PeerMesh(index, config.workers, runtime_dir, registry,
                        lost_window=config.session_ttl)
        agent.router = mesh
        agent.needs_greenlet = mesh.waits_for_owner  # type: ignore[method-assign]  # per instance
        mesh.drain_per_read(agent.before_notifies, agent.after_notifies)
        agent.on_startup.append(mesh.start)
        # Before the tracing agent's own hook: what peers already sent must reach the registry
        # before it ends the open sessions.
        agent.on_shutdown.insert(0, mesh.stop)
        agent.metric_sources.append(mesh.metric_samples)
    # Last, so the first report (0 connections: "send me some") goes out once the worker is
    # ready to serve them.
    processor = getattr(agent, "processor", None)  # the tracing agent's export queue, if any
    agent.on_startup.append(lambda: gevent.spawn(_report_loop, listener, processor))
    parent = os.getppid()
    gevent.spawn(_exit_with_parent, parent)
    log.info("starting, %d workers in all (pid %d)", config.workers, os.getpid())
    try:
        return run(agent, config, listener=listener, second_signal_exits=False,
                   ignored_signals=tuple(s for s in IGNORED_SIGNALS if s != GIVE_SIGNAL))
    finally:
        # The supervisor, which removes the runtime directory when it stops, was killed: the
        # last workers out remove it (a peer still stopping only finds its socket gone). A
        # worker can see the channel close before the kernel reparents it: either tells.
        if listener.orphaned or os.getppid() != parent:
            shutil.rmtree(runtime_dir, ignore_errors=True)


def prefix_log_records(prefix: str) -> None:
    """Every line a worker logs says which worker it is: they share one stderr."""
    make_record = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.msg = prefix + str(record.msg)
        return record

    logging.setLogRecordFactory(factory)


def _report_loop(listener: Any, processor: Any = None) -> None:
    """Report once per ``_REPORT_S``; the spans pending export as their mean over the last
    one, sampled ten times: the queue is a saw (it fills, then a batch goes), and one sample
    read 0 just after a batch as often as not (a chaos run: a SIGKILL lost 306 spans, and the
    supervisor, told 0, said nothing)."""
    import gevent

    samples: deque[int] = deque(maxlen=_SAMPLES_PER_REPORT)
    turn = 0
    while not listener.closed:
        if processor is not None:
            samples.append(processor.pending)
        if turn % _SAMPLES_PER_REPORT == 0:
            listener.report(None if processor is None else round(sum(samples) / len(samples)))
        turn += 1
        gevent.sleep(_REPORT_S / _SAMPLES_PER_REPORT)


def _exit_with_parent(parent: int) -> None:
    """A worker whose supervisor was killed stops cleanly instead of serving on, unsupervised."""
    import gevent

    while os.getppid() == parent:
        gevent.sleep(_PARENT_CHECK_S)
    log.warning("supervisor (pid %d) is gone; stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)
