"""Polling instead of sleeping between reads (``--busy-poll``), for the latency a sleeping
process pays on every wake-up."""

from __future__ import annotations

import math
import time

import gevent


class BusyPoll:
    """``--busy-poll``: while gevent's loop has an active idle watcher it polls with a null
    timeout instead of sleeping, so an event that arrives finds the process running rather
    than paying a CPU's (on VMs a vCPU's) wake-up, as HAProxy's ``busy-polling`` does.

    Forever costs a core even idle. A window (``--busy-poll 1ms``) keeps polling that long after
    the last read only: HAProxy sends a stream's next event within about a hundred microseconds
    of reading the ACK of the previous one, so the events of one request find the loop awake,
    and an idle agent still sleeps.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self.last_read = 0.0
        self.watcher = gevent.get_hub().loop.idle()
        self.watcher.start(_busy_poll_tick if window == math.inf else self._tick)

    def touch(self) -> None:
        """A read: poll again, for the window from now."""
        if self.window != math.inf:
            self.last_read = time.monotonic()
            if not self.watcher.active:
                self.watcher.start(self._tick)

    def _tick(self) -> None:
        if time.monotonic() - self.last_read > self.window:
            self.watcher.stop()  # until the next read: the loop may sleep again

    def stop(self) -> None:
        self.watcher.stop()


def _busy_poll_tick() -> None:
    """The idle watcher's callback when polling forever: being active is the point."""
