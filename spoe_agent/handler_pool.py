"""The concurrent handlers of one connection, run by greenlets that are reused, not spawned anew.

A fresh greenlet costs more than its creation: on CPython 3.11+ its first frame needs a new
16 KiB data stack, which the interpreter maps from the kernel and unmaps when the greenlet dies
(an ``mmap`` and a ``munmap`` system call, and page faults, per greenlet: measured with strace
on a two-worker agent, where every inject for a session another worker owns runs in one). So a
handler runs in a parked greenlet when one is idle, and a greenlet that finished a handler parks
for the next one (up to :data:`MAX_IDLE` of them, shared by every connection).

:class:`HandlerPool` keeps the part of gevent's ``Pool`` the server uses: ``spawn`` waits for a
free slot (back-pressure on that connection's reads), ``join`` waits for the handlers in flight,
``kill`` ends them when the connection goes away.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import Context
from typing import Any

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

log = logging.getLogger(__name__)

#: Parked greenlets kept for later handlers, all connections together.
MAX_IDLE = 64

_idle: list[_Runner] = []


class _Runner:
    """A greenlet that runs one handler at a time and parks in the hub in between."""

    __slots__ = ("greenlet", "condemned")

    def __init__(self) -> None:
        # Set by HandlerPool.kill: the greenlet is to end, not park. Its kill is delivered by
        # a hub callback, which can come after the one that hands it its work: parked again
        # by then, it died listed as idle, and the next connection's handler given to it
        # never ran, its NOTIFY never ACKed and its pool never empty (code review).
        self.condemned = False
        self.greenlet = gevent.spawn(self._loop)

    def start(self, work: tuple[Callable[..., Any], tuple[Any, ...], HandlerPool]) -> None:
        # Resumed from the hub, as a spawned greenlet would start: the caller runs on first.
        gevent.get_hub().loop.run_callback(self.greenlet.switch, work)

    def _loop(self) -> None:
        hub = gevent.get_hub()
        work = hub.switch()
        while True:
            if self.condemned:
                return  # its connection went away before the handler could start
            function, args, pool = work
            try:
                # In an empty context, as a new greenlet starts: a context variable one handler
                # set must not be seen by the next one this greenlet runs.
                Context().run(function, *args)
            except (Exception, gevent.Timeout):  # a timeout it armed and did not catch, too
                log.exception("concurrent handler %r failed", function)
            finally:
                pool._finished(self)
            # Parked, it must not keep the last handler's connection and messages alive.
            work = function = args = pool = None  # type: ignore[assignment]
            if self.condemned or len(_idle) >= MAX_IDLE:
                return
            _idle.append(self)
            try:
                work = hub.switch()
            except BaseException as exc:
                # Thrown into while parked: a gevent.Timeout a handler started and left armed
                # (harmless in a greenlet that died with its handler). Dead, it must not stay
                # listed as idle: the next handler given to it would never run (code review).
                if self in _idle:
                    _idle.remove(self)
                if not isinstance(exc, gevent.GreenletExit):
                    log.warning("a handler left %r armed after it returned; it fired while its "
                                "greenlet was parked", exc)
                return


class HandlerPool:
    """At most ``size`` handlers of one connection at a time, each in a reused greenlet."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots = Semaphore(size)
        self._running: set[_Runner] = set()
        self._empty = Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._running)

    def full(self) -> bool:
        return len(self._running) >= self.size

    def spawn(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` in a greenlet of its own once a slot is free (may wait)."""
        self._slots.acquire()
        runner = _idle.pop() if _idle else _Runner()
        self._running.add(runner)
        self._empty.clear()
        runner.start((function, args, self))

    def _finished(self, runner: _Runner) -> None:
        self._running.discard(runner)
        self._slots.release()
        if not self._running:
            self._empty.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no handler runs (at most ``timeout`` seconds); whether none does."""
        return self._empty.wait(timeout)

    def kill(self, block: bool = False) -> None:
        """End the handlers in flight (the connection is gone: nobody reads their ACKs). Their
        greenlets end too rather than park: one may not have started its handler yet."""
        running = list(self._running)
        self._running.clear()
        self._empty.set()
        for runner in running:
            runner.condemned = True
            runner.greenlet.kill(block=block)
