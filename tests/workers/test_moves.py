"""Connections moving between workers while HAProxy uses them: nothing lost, nothing twice.

Two servers in this process, each fed by a HandoffListener as a worker is, and a relay playing
the supervisor: whatever one gives back goes to the other. Both are asked for a connection
every half millisecond while the client pipelines NOTIFYs over the one connection, some cut in
two across the moves, some answered by concurrent handlers: every NOTIFY must get exactly one
ACK, whichever worker held the connection when it arrived.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket

from spoe_agent.config import AgentConfig
from spoe_agent.handlers import Agent
from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType, Message
from spoe_agent.server import SpoaServer
from spoe_agent.workers.handoff import (
    HandoffListener,
    channel_pair,
    read_move,
    send_connection,
)
from tests.support.spop_client import hello_frame

NOTIFIES = 3000


def _worker() -> tuple[SpoaServer, Any]:
    """A server as a worker runs it, and the supervisor's end of its hand-off channel."""
    ours, theirs = channel_pair()
    listener = HandoffListener(os.dup(theirs.fileno()), socket.AF_INET, "127.0.0.1:0")
    theirs.close()
    agent = Agent("moves")
    agent.on_message("inline", lambda args: [])

    def slow(args: Any) -> list[Any]:
        gevent.sleep(random.random() * 0.002)
        return []

    agent.on_message("concurrent", slow, concurrent=True)
    server = SpoaServer(agent, AgentConfig(exporter="none", max_connections=8),
                        listener=listener)
    server.start()
    return server, ours


def _relay(source: Any, target: Any, moves: list[int]) -> None:
    """The supervisor's part: a connection one worker gives back goes to the other."""
    while True:
        gsocket.wait_read(source.fileno())
        try:
            data, fds, _, _ = socket.recv_fds(source, 4096, 1)
        except BlockingIOError:
            continue
        if fds:
            moved = read_move(data)
            assert moved is not None
            conn = socket.socket(fileno=fds[0])
            send_connection(target, conn, *moved)
            conn.close()
            moves[0] += 1


@pytest.mark.parametrize("concurrent", [False, True], ids=["inline", "concurrent"])
def test_notifies_sent_while_the_connection_moves_get_one_ack_each(concurrent: bool) -> None:
    (first, first_channel), (second, second_channel) = _worker(), _worker()
    moves = [0]
    greenlets = [gevent.spawn(_relay, first_channel, second_channel, moves),
                 gevent.spawn(_relay, second_channel, first_channel, moves)]
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = gsocket.create_connection(listener.getsockname())
    served, address = listener.accept()
    send_connection(first_channel, served, address)  # the supervisor's first hand-off
    served.close()
    client.settimeout(10)
    client.sendall(hello_frame())
    acks: list[int] = []

    def read() -> None:
        buf = b""
        while len(acks) < NOTIFIES:
            chunk = client.recv(65536)
            assert chunk, "the connection closed"
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                size = int.from_bytes(buf[:4], "big")
                frame = codec.decode_frame(buf[4:4 + size])
                buf = buf[4 + size:]
                assert frame.type in (FrameType.ACK, FrameType.AGENT_HELLO), frame
                if frame.type == FrameType.ACK:
                    acks.append(frame.stream_id)

    def ask() -> None:
        while True:  # what SIGUSR1 from the supervisor does, as often as it can
            first.give_connection()
            second.give_connection()
            gevent.sleep(0.0005)

    reader = gevent.spawn(read)
    greenlets.append(gevent.spawn(ask))
    try:
        for i in range(NOTIFIES):
            name = "concurrent" if concurrent and i % 2 else "inline"
            frame = codec.notify(i + 1, 1, [Message(name, [])])
            if i % 7 == 0:  # a frame cut in two: half of it read before a move is asked
                cut = random.randrange(1, len(frame))
                client.sendall(frame[:cut])
                gevent.sleep(0.0003)
                client.sendall(frame[cut:])
            else:
                client.sendall(frame)
            if random.random() < 0.3:
                gevent.sleep(random.random() * 0.001)
        reader.join(30)
        assert sorted(acks) == list(range(1, NOTIFIES + 1))
        greenlets.pop().kill()  # no more asking; the move under way lands
        gevent.sleep(0.1)
        assert moves[0] > 10, moves  # it did move, often
        assert first.stats.moved_out + second.stats.moved_out == moves[0]
        assert first.stats.moved_in + second.stats.moved_in == moves[0]
    finally:
        gevent.killall([reader, *greenlets])
        client.close()
        for server in (first, second):
            server.stop(timeout=1)
