"""Clean shutdown: SIGTERM/SIGINT finish the work in flight, say goodbye, flush, exit 0.

The agent under test is always the real CLI in a subprocess, signalled the way an init system
does it; the HAProxy test checks the promise that matters to users: no span of a request that
completed before the signal is lost, even when the export queue had not been flushed yet.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType, Message, Scope, SetVar
from spoe_agent.viewer.receiver import JaegerReceiver
from tests.hardening.support import (
    SLOW_APP,
    clean_env,
    disconnect_status,
    notify_ok,
    read_until_eof,
    trace,
)
from tests.integration.backend import Backend
from tests.integration.tracing_support import agent_env, describe, get, hop_config
from tests.support.haproxy import HAProxy
from tests.support.procs import AgentProcess, free_port
from tests.support.spop_client import SpopClient


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_finishes_notifies_in_flight_then_disconnects_and_exits_zero(
    spoe_agent: Callable[..., AgentProcess], sig: signal.Signals
) -> None:
    agent = spoe_agent(app=SLOW_APP)
    address = (agent.host, agent.port)
    with SpopClient(address, timeout=15) as busy, SpopClient(address, timeout=15) as idle:
        busy.handshake()
        idle.handshake()
        # A handler that stays in flight, then an inline one whose ACK proves the first was
        # read and is running (NOTIFYs of one read are handled in order).
        busy.send(codec.notify(1, 1, [Message("nap", [("ms", 700), ("id", 1)])]))
        notify_ok(busy, 3, [Message("inline", [("v", 3)])])
        # Sent just before the signal and not waited for: whether the agent has read it yet or
        # it is still in the socket buffer, it must be answered before the goodbye.
        busy.send(codec.notify(5, 1, [Message("inline", [("v", 5)])]))
        agent.process.send_signal(sig)

        frames = read_until_eof(busy)
        acks = {f.stream_id: codec.decode_actions(f.payload)
                for f in frames if f.type == FrameType.ACK}
        assert acks == {1: [SetVar(Scope.TXN, "done", 1)], 5: [SetVar(Scope.TXN, "n", 5)]}, frames
        assert frames[-1].type == FrameType.AGENT_DISCONNECT, frames
        assert disconnect_status(frames[-1]) == 0

        idle_frames = read_until_eof(idle)
        assert len(idle_frames) == 1 and disconnect_status(idle_frames[0]) == 0, idle_frames
    assert agent.process.wait(15) == 0, agent.describe_logs()
    with pytest.raises(OSError):  # and it no longer listens
        socket.create_connection(address, timeout=2).close()
    assert "Traceback" not in agent.logs(), agent.describe_logs()


def test_connection_mid_hello_gets_a_goodbye_too(spoe_agent: Callable[..., AgentProcess]) -> None:
    """A connection that has not finished its HELLO is not left hanging either."""
    agent = spoe_agent(app=SLOW_APP)
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.send(b"\x00\x00")  # two bytes of a HELLO's length
        # The agent must have accepted the connection before the signal for it to be "open".
        with SpopClient((agent.host, agent.port), timeout=15) as probe:
            probe.handshake()
        agent.process.send_signal(signal.SIGTERM)
        frames = read_until_eof(client)
        assert [disconnect_status(f) for f in frames] == [0], frames
    assert agent.process.wait(15) == 0


def test_a_peer_that_reads_slowly_while_it_sends_gets_every_ack_and_the_goodbye(
    spoe_agent: Callable[..., AgentProcess]
) -> None:
    """After its goodbye the agent discards what the peer still sends until the peer closes:
    a peer pipelining NOTIFYs while it reads slowly sends megabytes before it reads the
    goodbye, and closing on unread input resets the connection, which destroys the ACKs and
    the goodbye still waiting in the peer's socket buffer."""
    agent = spoe_agent(app=SLOW_APP)
    client = SpopClient((agent.host, agent.port), timeout=15)
    client.handshake()
    stop = threading.Event()
    sender = threading.Thread(target=_pipeline, args=(client.sock, stop), daemon=True)
    sender.start()
    time.sleep(1.0)  # a slow reader: ACKs pile up in the socket buffers, unread
    agent.process.send_signal(signal.SIGTERM)
    frames = []
    try:
        while (frame := client.read_frame()) is not None:
            frames.append(frame)
    finally:
        stop.set()
        client.close()
        sender.join(15)
    assert frames and frames[-1].type == FrameType.AGENT_DISCONNECT, frames[-3:]
    assert disconnect_status(frames[-1]) == 0
    acked = [f.stream_id for f in frames if f.type == FrameType.ACK]
    assert len(acked) > 1000 and acked == list(range(1, len(acked) + 1))
    assert agent.process.wait(15) == 0


def _pipeline(sock: socket.socket, stop: threading.Event) -> None:
    """NOTIFYs of hundreds of bytes, as HAProxy's, stream ids 1, 2, ... until ``stop``."""
    pad = "x" * 400
    next_id = 1
    try:
        while not stop.is_set():
            sock.sendall(b"".join(
                codec.notify(i, 1, [Message("inline", [("v", i), ("pad", pad)])])
                for i in range(next_id, next_id + 2000)))
            next_id += 2000
    except OSError:  # the agent stopped reading and closed: expected
        pass


# ------------------------------------------------------------------------- with HAProxy


@pytest.fixture
def receiver() -> Iterator[JaegerReceiver]:
    with JaegerReceiver(udp_addr=("127.0.0.1", 0), http_addr=None, quiet_s=0.5) as rec:
        yield rec


def test_the_stop_says_how_many_spans_of_the_sessions_it_ends_were_unfinished(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """A session whose spans all finished by name (spoa-opentracing's style, without
    finish=str("*")) is held until the TTL or a stop; the stop said it ended it "as
    incomplete", though every span of it had been exported (black-box run)."""
    agent = spoe_agent(app=None, env=clean_env(OTEL_TRACES_EXPORTER="none"))
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        notify_ok(client, 1, [trace("done", ("span", "a"), ("finish", "a"))])
        notify_ok(client, 2, [trace("open", ("span", "b"), ("span", "c"), ("finish", "c"))])
    assert agent.stop() == 0, agent.describe_logs()
    assert ("tracing: ended 2 open sessions at shutdown, 1 unfinished spans of them marked "
            "incomplete") in agent.logs(), agent.describe_logs()


@pytest.mark.haproxy
def test_no_span_of_a_completed_request_is_lost_across_sigterm(
    haproxy: Callable[..., HAProxy],
    spoe_agent: Callable[..., AgentProcess],
    backend: Backend,
    receiver: JaegerReceiver,
    tmp_path: Path,
) -> None:
    # A minute of schedule delay: nothing is exported before the signal, so every span that
    # arrives was flushed by the shutdown itself.
    env = agent_env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000")
    agent = spoe_agent(app=None, env=env)
    port = free_port()
    hap = haproxy(hop_config(port=port, service="edge", server=backend.address, agent=agent))
    hap.wait_server_status("spoe-agents", "agent1", "UP", timeout=15)

    with SpopClient((agent.host, agent.port), timeout=15) as raw:
        raw.handshake()
        # A session that will still be open at shutdown: it must be emitted, as incomplete.
        notify_ok(raw, 1, [trace("left-open", ("span", "Unfinished"), ("kind", "server"))])

        requests = 30
        trace_ids = set()
        for i in range(requests):
            reply = get(port, f"/before-shutdown/{i}")
            assert reply.status == 200 and "x-trace-error" not in reply.headers, reply.headers
            trace_ids.add(reply.headers["x-trace-id"])
        assert len(trace_ids) == requests
        assert receiver.spans == [], "spans were exported before the signal: test is moot"

        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(30) == 0, agent.describe_logs()
        assert disconnect_status(raw.read_frame()) == 0
        assert raw.read_frame() is None

    def complete(spans: list) -> bool:
        done = sum(1 for s in spans if s.trace_id in trace_ids)
        return done >= requests * 9 and any(s.operation_name == "Unfinished" for s in spans)

    assert receiver.wait_for(complete, timeout=15), describe(receiver.spans)
    traced = [s for s in receiver.spans if s.trace_id in trace_ids]
    per_trace = {t: sum(1 for s in traced if s.trace_id == t) for t in trace_ids}
    assert set(per_trace.values()) == {9}, per_trace  # every span, none twice
    assert not any(s.tags.get("haproxy.span.incomplete") for s in traced), describe(traced)
    (unfinished,) = [s for s in receiver.spans if s.operation_name == "Unfinished"]
    assert unfinished.tags.get("haproxy.span.incomplete") is True, describe([unfinished])
    assert unfinished.error


def test_a_second_signal_during_shutdown_exits_at_once_with_status_1(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """The operator who would rather lose the flush than wait: one process (the supervisor's
    counterpart is in tests/workers/test_worker_signals.py)."""
    agent = spoe_agent(app=SLOW_APP)
    with SpopClient((agent.host, agent.port), timeout=15) as busy:
        busy.handshake()
        busy.send(codec.notify(1, 1, [Message("nap", [("ms", 60_000), ("id", 1)])]))
        notify_ok(busy, 3, [Message("inline", [("v", 3)])])  # the nap is running
        agent.process.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):  # the graceful stop waits for the nap
            agent.process.wait(0.5)
        agent.process.send_signal(signal.SIGINT)
        assert agent.process.wait(10) == 1, agent.describe_logs()
    assert "second signal during shutdown: exiting now" in agent.logs(), agent.describe_logs()
