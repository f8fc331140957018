"""A connection's greenlet gives the event loop a turn, timers included, per 4 KiB of input.

A recv that finds data returns without yielding to gevent, and ``gevent.sleep(0)`` may resume
the greenlet before the loop has polled or run its timers (gevent.sleep's own documentation).
Through HAProxy with two threads and two workers the workers' timers fired up to seconds late:
the span export starved and dropped spans (up to 95% of one worker's in a run), and /metrics
did not answer (benchmarks/README.md, "Spans at saturation"). This test pins what can be pinned
deterministically: with reads that never wait, a timer that falls due is served after about
4 KiB of NOTIFYs. It fails with ``sleep(0)`` as the way to give way, and without giving way.
"""

from __future__ import annotations

import socket
from typing import Any

import gevent
import gevent.socket

from spoe_agent.config import AgentConfig
from spoe_agent.handlers import Agent
from spoe_agent.protocol import codec
from spoe_agent.protocol.types import Message
from spoe_agent.server import _YIELD_AFTER_BYTES, SpoaServer
from tests.support.spop_client import hello_frame

NOTIFIES = 1000
CHUNK = 512  # bytes per read: every read finds data, none is big


class _Trickle:
    """A socket that hands the server at most ``CHUNK`` bytes per read from data already
    waiting in the kernel: the small reads of a peer that keeps the connection readable."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def recv_into(self, buffer: Any) -> int:
        return int(self._sock.recv_into(memoryview(buffer)[:CHUNK]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_connection_that_is_always_readable_still_lets_the_event_loop_turn() -> None:
    agent = Agent("fairness")
    handled: list[int] = []
    agent.on_message("m", lambda args: handled.append(args[0][1]))
    ours, haproxy = gevent.socket.socketpair()
    frames = [codec.notify(2 * i + 1, 1, [Message("m", [("i", i)])]) for i in range(NOTIFIES)]
    haproxy.sendall(hello_frame() + b"".join(frames))
    haproxy.shutdown(socket.SHUT_WR)  # the server's last read is the end of the stream
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = SpoaServer(agent, AgentConfig(exporter="none"), listener=listener)
    seen: list[int] = []
    try:
        serving = gevent.spawn(server._handle, _Trickle(ours), ("haproxy", 0))

        def timer_waiter() -> None:
            gevent.sleep(0.0001)  # a timer, as the span export's pause and /metrics wait on
            seen.append(len(handled))

        gevent.spawn(timer_waiter)
        serving.join(10)
        assert serving.successful()
        assert len(handled) == NOTIFIES  # everything was served in the end
        # The timer fired after about _YIELD_AFTER_BYTES of NOTIFYs (its 0.1 ms were up long
        # before: each NOTIFY costs more), not after all of them.
        assert seen and seen[0] * len(frames[0]) <= 2 * _YIELD_AFTER_BYTES + CHUNK, seen
    finally:
        listener.close()
        haproxy.close()
        ours.close()
