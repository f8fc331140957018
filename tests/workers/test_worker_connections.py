"""HAProxy's connections as ``--workers N`` serves them: what one process promises, each
connection still gets, whichever worker holds it."""

from __future__ import annotations

import socket
from collections.abc import Callable

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType, Message
from spoe_agent.workers.router import owner_of
from tests.support.procs import AgentProcess
from tests.support.spop_client import SpopClient
from tests.workers.test_multiworker import wait_workers_ready


def test_an_inject_sent_before_a_half_close_is_still_answered(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """An inject for a session the other worker owns runs in a greenlet of its own (it waits
    for the owner); the peer's EOF arrived meanwhile and its ACK was dropped, where one
    process, which answers it inline, sent it."""
    agent = spoe_agent("--workers", "2", app=None, env={"OTEL_TRACES_EXPORTER": "none"})
    wait_workers_ready(agent, 2)
    keys = [f"half-{i}" for i in range(40)]
    keys = [k for k in keys if owner_of(k, 2) == 0][:4] + [k for k in keys if owner_of(k, 2)][:4]
    for key in keys:
        with SpopClient((agent.host, agent.port), timeout=10) as client:
            client.handshake()
            client.send(codec.notify(7, 1, [Message("trace", [
                ("id", key), ("span", "s"), ("kind", "client"), ("inject", "s")])]))
            client.sock.shutdown(socket.SHUT_WR)
            frames = []
            while (frame := client.read_frame()) is not None:
                frames.append(frame)
        acks = [f for f in frames if f.type == FrameType.ACK]
        assert len(acks) == 1 and (acks[0].stream_id, acks[0].frame_id) == (7, 1), (key, frames)
        assert codec.decode_actions(acks[0].payload), (key, "no traceparent")
