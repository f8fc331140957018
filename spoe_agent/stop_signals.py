"""The signals that stop the agent, and those that come before it can act on them.

Kept apart from the runner, whose imports (gevent, the server) ``cli.main`` must not make
before it patches the standard library: the first thing it does is :func:`catch_early_stop`.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("spoe_agent.runner")

#: SIGHUP too: its default action kills the process on the spot (a terminal closed under a
#: foreground agent), losing the spans a clean stop flushes. The agent has no reload.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Signals whose default action would kill the agent on the spot, losing what a clean stop
#: flushes, for what an operator meant otherwise: logrotate's "reopen your logs" (the agent
#: logs to stderr: there is nothing to reopen) or HAProxy's soft-stop and reload. Logged and
#: ignored, from the start (:func:`catch_early_stop`). (A worker keeps SIGUSR1 for the
#: supervisor: workers.handoff.GIVE_SIGNAL.)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

_EARLY_STOP: list[int] = []


def catch_early_stop() -> None:
    """Until the runner (or the supervisor) installs its handlers, a stop signal is remembered
    and acted on then, not fatal: one during start-up (the configuration loading, an --app's
    on_startup hook) exited 143 or 129, or with a KeyboardInterrupt traceback (code review)."""
    def remember(signum: int, frame: object) -> None:
        _EARLY_STOP.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, remember)
    # Ignored for good later (by the runner; a worker's GIVE_SIGNAL, one of them, the supervisor
    # sends only once it serves): until then their default action killed the agent (code
    # review).
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stopped_early() -> bool:
    """Whether a stop signal came before the handlers; said once, in the log."""
    if _EARLY_STOP:
        log.info("%s during start-up: stopping", signal.Signals(_EARLY_STOP[0]).name)
    return bool(_EARLY_STOP)
