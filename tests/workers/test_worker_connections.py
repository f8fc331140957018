"""HAProxy's connections as ``--workers N`` serves them: what one process promises, each
connection still gets, whichever worker holds it."""

from __future__ import annotations

import os
import re
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import Frame, FrameType, Message
from tests.hardening.support import notify_ok, trace
from tests.support.procs import AgentProcess
from tests.support.spop_client import SpopClient, hello_frame
from tests.workers.test_multiworker import _HELLO, wait_workers_ready

# Evictions wait for a connection silent for a second: beside other tests, starved past it.
pytestmark = pytest.mark.alone


def open_session(opener: SpopClient, stream_id: int, key: str) -> str:
    """Session ``key`` opened, with span "s", on the connection of its first event."""
    opener.send(codec.notify(stream_id, 1, [Message("open", [("id", key), ("span", "s")])]))
    ack = opener.read_frame()
    assert ack is not None and ack.type == FrameType.ACK, ack
    return key


def inject(key: str) -> Message:
    return Message("trace", [("id", key), ("kind", "client"), ("inject", "s")])


def exchange(agent: AgentProcess, data: bytes, half_close: bool = False) -> list[Frame]:
    """``data`` sent on a new connection after its HELLO: every frame until the agent closes."""
    with SpopClient((agent.host, agent.port), timeout=10) as client:
        client.handshake()
        client.send(data)
        if half_close:
            client.sock.shutdown(socket.SHUT_WR)
        frames = []
        while (frame := client.read_frame()) is not None:
            frames.append(frame)
    return frames


def test_an_inject_sent_before_a_half_close_is_still_answered(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """An inject for a session the other worker owns runs in a greenlet of its own (it waits
    for the owner); the peer's EOF arrived meanwhile and its ACK was dropped, where one
    process, which answers it inline, sent it."""
    agent = spoe_agent("--workers", "2", app=None, env={"OTEL_TRACES_EXPORTER": "none"})
    wait_workers_ready(agent, 2)
    # Each session starts on this connection; each inject comes on a new one, which the
    # supervisor hands to the other worker (the one with fewer connections).
    with SpopClient((agent.host, agent.port), timeout=10) as opener:
        opener.handshake()
        for n in range(8):
            key = open_session(opener, n + 1, f"half-{n}")
            frames = exchange(agent, codec.notify(7, 1, [inject(key)]), half_close=True)
            acks = [f for f in frames if f.type == FrameType.ACK]
            assert len(acks) == 1 and (acks[0].stream_id, acks[0].frame_id) == (7, 1), (
                key, frames)
            assert codec.decode_actions(acks[0].payload), (key, "no traceparent")


@pytest.mark.parametrize("workers", [1, 2])
def test_notifies_in_the_read_of_haproxys_disconnect_are_acked_before_the_goodbye(
    spoe_agent: Callable[..., AgentProcess], workers: int,
) -> None:
    """Black-box run: a NOTIFY and HAProxy's DISCONNECT in one segment got the
    AGENT-DISCONNECT only with --workers 2 (one process wrote the empty ACK as the NOTIFY
    decoded, and lost the inject's). With two, the inject waits for the other worker, the
    session's owner."""
    agent = spoe_agent("--workers", str(workers), app=None,
                       env={"OTEL_TRACES_EXPORTER": "none"})
    if workers > 1:
        wait_workers_ready(agent, workers)
    goodbye = codec.disconnect(FrameType.HAPROXY_DISCONNECT, 0, "normal")
    with SpopClient((agent.host, agent.port), timeout=10) as opener:
        opener.handshake()
        for n in range(4):
            key = open_session(opener, n + 1, f"bye-{n}")
            frames = exchange(agent, codec.notify(5, 1, [Message("m", [])])
                              + codec.notify(7, 1, [inject(key)]) + goodbye)
            assert [(f.type, f.stream_id) for f in frames] == [
                (FrameType.ACK, 5), (FrameType.ACK, 7), (FrameType.AGENT_DISCONNECT, 0)], (
                key, frames)
            assert codec.decode_actions(frames[1].payload), (key, "no traceparent")


def test_connections_past_every_workers_cap_wait_rather_than_reset(
    spoe_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """One process leaves connections past max_connections in the listen backlog; with
    workers the supervisor used to accept them anyway and, once every worker's hand-off
    queue was full (~280 each), close them with their HELLO unread: resets, no goodbye."""
    ini = tmp_path / "agent.ini"
    ini.write_text("[listener]\nmax_connections = 2\n")  # the agent's: one per worker
    agent = spoe_agent("--workers", "2", "-c", str(ini), app=None,
                       env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
    wait_workers_ready(agent, 2)
    hello = hello_frame()
    socks = []
    selector = selectors.DefaultSelector()
    try:
        for _ in range(700):
            sock = socket.create_connection((agent.host, agent.port), timeout=10)
            sock.sendall(hello)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        answered, broken = _answers(selector, seconds=3.0)
        assert broken == [] and len(answered) == 2, (len(answered), broken[:3])
        assert "every worker is at max_connections" in agent.logs()
        # A worker has no listen backlog: its connections wait in the supervisor's hand-off.
        assert re.search(r"max_connections \(\d+\) reached: new HAProxy connections wait in "
                         r"the supervisor's hand-off", agent.logs()), agent.describe_logs()
        for sock in answered:  # two slots free: two waiting connections get theirs
            selector.unregister(sock)
            sock.close()
        more, broken = _answers(selector, seconds=5.0, want=2)
        assert broken == [] and len(more) == 2, (len(more), broken[:3])
    finally:
        selector.close()
        for sock in socks:
            sock.close()


def test_a_waiting_connection_gets_a_silent_ones_slot_whichever_worker_holds_it(
    spoe_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """One process gives a waiting connection the slot of one silent for a second; with
    workers that slot may be in another worker than the one the connection was handed to.
    Opened in this order, HAProxy's two on one worker and the silent two on the other: every
    new connection waited on the full worker for read_timeout (black-box run)."""
    ini = tmp_path / "agent.ini"
    ini.write_text("[listener]\nmax_connections = 4\nread_timeout = 60s\n")
    agent = spoe_agent("--workers", "2", "-c", str(ini), app=None,
                       env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
    wait_workers_ready(agent, 2)
    address = (agent.host, agent.port)
    held: list[socket.socket] = []
    greeted: list[SpopClient] = []

    def said_hello(timeout: float) -> bool:
        client = SpopClient(address, timeout=timeout)
        greeted.append(client)
        client.send(hello_frame())
        try:
            frame = client.read_frame()
        except TimeoutError:
            return False
        return frame is not None and frame.type == FrameType.AGENT_HELLO

    try:
        for kind in "RSRS":
            if kind == "R":
                assert said_hello(10)
            else:
                held.append(socket.create_connection(address, timeout=10))
            time.sleep(0.3)
        assert said_hello(10), agent.describe_logs()  # well under read_timeout: evicted
        assert said_hello(10), agent.describe_logs()
        # Four connections that said HELLO: this one waits until one of them is idle for
        # IDLE_GRACE_S (a burst's surplus connections kept HAProxy's health check out for its
        # whole timeout idle, black-box run), and takes its slot, whichever worker holds it.
        assert said_hello(15), agent.describe_logs()
        # Each of the five is served, or was closed with a goodbye; none waits unserved in a
        # worker. (A full worker's passing on of a waiting connection read as one it served:
        # the other worker, looking two ahead, moved one of its connections into the full
        # one, and the new connection took a silent one's slot, with no idle one evicted.)
        outcomes = []
        for stream_id, client in enumerate(greeted, 1):
            client.sock.settimeout(5)
            try:
                client.send(codec.notify(stream_id, 1, [Message("ping", [])]))
                frame = client.read_frame()
            except TimeoutError:
                outcomes.append("unanswered")
            except OSError:
                outcomes.append("closed")
            else:
                outcomes.append("closed" if frame is None else FrameType(frame.type).name)
        assert sorted(outcomes) == ["ACK"] * 4 + ["AGENT_DISCONNECT"], (
            outcomes, agent.describe_logs())
    finally:
        for sock in held:
            sock.close()
        for client in greeted:
            client.close()
    assert re.search(r"no HELLO \d+\.\ds after connecting", agent.logs())  # (throttled)
    assert re.search(r"nothing received for \d+\.\ds, and a new connection needs its slot",
                     agent.logs())


def _answers(selector: selectors.BaseSelector, seconds: float,
             want: int | None = None) -> tuple[list[socket.socket], list[str]]:
    """The sockets that got an AGENT-HELLO within ``seconds``, and what went wrong on others."""
    answered: list[socket.socket] = []
    broken: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and (want is None or len(answered) < want):
        for key, _ in selector.select(left):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                broken.append("reset")
                selector.unregister(sock)
                continue
            if not data:
                broken.append("closed")
            elif data[4] == FrameType.AGENT_HELLO:
                answered.append(sock)
            else:
                broken.append(f"frame type {data[4]}")
            selector.unregister(sock)
    for sock in answered:
        selector.register(sock, selectors.EVENT_READ)  # the caller closes them
    return answered, broken


@pytest.mark.parametrize("listener", ["", "idle_timeout = 0", "max_connections = 4"],
                         ids=["default", "no-idle-timeout", "giver-at-its-cap"])
def test_a_worker_with_two_connections_more_hands_one_over_and_it_goes_on_working(
    spoe_agent: Callable[..., AgentProcess], tmp_path: Path, listener: str,
) -> None:
    """The work follows the connections (a session is the worker's that received its first
    event) and HAProxy keeps its connections, so the supervisor evens them out: a worker two
    connections ahead hands an idle one to the other, at a frame boundary, and HAProxy's side
    sees nothing. A session opened before the move goes on after it from the other worker."""
    ini = tmp_path / "agent.ini"
    # At its cap (2 of 4), a worker's server stops reading its hand-off channel: the request
    # must reach it all the same.
    ini.write_text(f"[listener]\n{listener}\n")
    agent = spoe_agent("--workers", "2", "--log-level", "debug", "-c", str(ini), app=None,
                       env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
    wait_workers_ready(agent, 2)
    clients = [SpopClient((agent.host, agent.port), timeout=10) for _ in range(3)]
    try:
        for client in clients:
            client.handshake()
        port_of = {client: client.sock.getsockname()[1] for client in clients}

        def worker_of() -> dict[int, int]:
            return {int(port): int(w) for w, port in _HELLO.findall(agent.logs())}

        deadline = time.monotonic() + 10
        while len(set(port_of.values()) & set(worker_of())) < 3:
            assert time.monotonic() < deadline, agent.describe_logs()
            time.sleep(0.05)
        on = worker_of()
        by_worker = {w: [c for c in clients if on[port_of[c]] == w] for w in (0, 1)}
        assert sorted(len(v) for v in by_worker.values()) == [1, 2], by_worker
        crowded = 0 if len(by_worker[0]) == 2 else 1
        for n, client in enumerate(by_worker[crowded]):  # sessions this worker owns
            notify_ok(client, 1, [trace(f"moved-{n}", ("span", "s"), ("kind", "client"))])
        (alone,) = by_worker[1 - crowded]
        alone.close()  # now two against none
        clients.remove(alone)

        deadline = time.monotonic() + 15
        while not ("taken over from another worker" in (logs := agent.logs())
                   and "handed to another worker" in logs):
            assert time.monotonic() < deadline, agent.describe_logs()
            time.sleep(0.05)
        assert re.search(rf"worker {crowded}: connection from 127\.0\.0\.1:\d+ handed to "
                         "another worker", logs), logs
        taken = re.findall(r"worker (\d): connection from 127\.0\.0\.1:(\d+) taken over", logs)
        assert len(taken) == 1 and int(taken[0][0]) == 1 - crowded, taken
        moved = next(c for c in clients if port_of[c] == int(taken[0][1]))
        # Both connections answer as before: the moved one from the other worker now, which
        # forwards the inject to the session's owner and returns its context.
        for n, client in enumerate(clients):
            ack = notify_ok(client, 2, [trace(f"moved-{n}", ("inject", "s"))])
            assert codec.decode_actions(ack.payload), (client is moved, "no traceparent")
        assert "Traceback" not in agent.logs()
    finally:
        for client in clients:
            client.close()
