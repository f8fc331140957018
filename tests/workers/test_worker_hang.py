"""A worker that hangs (alive, silent) is routed around, then killed and replaced.

A dead worker was replaced at once, but a stopped or stuck one was not noticed at all: HAProxy
went on sending over its connections and waited for each event until ``timeout processing``
(a request ~4 s with the reference config, for as long as the worker hung), while its health
check, which the supervisor hands to the live workers, stayed green. With one process HAProxy
marks the agent DOWN and serves untraced; with workers it stalled.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import Message
from spoe_agent.workers.supervisor import HUNG_AFTER_S, SILENT_AFTER_S, STOPPING_AT_MOST_S
from tests.hardening.support import SLOW_APP, notify_ok
from tests.support.procs import AgentProcess, wait_until
from tests.support.spop_client import SpopClient
from tests.workers.test_multiworker import wait_workers_serving, worker_pids


def _listening(agent: AgentProcess, index: int) -> int:
    return agent.logs().count(f"worker {index}: spoe-agent listening")


def test_a_stopped_worker_gets_no_new_connection_and_is_replaced(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    agent = spoe_agent("--workers", "2", app=SLOW_APP)
    wait_workers_serving(agent, 2)
    hung = worker_pids(agent.process.pid)[0]
    os.kill(hung, signal.SIGSTOP)
    try:
        time.sleep(SILENT_AFTER_S + 0.5)
        # Worker 0 holds no connection, so it was the least loaded: each of these went to it.
        for i in range(4):
            with SpopClient((agent.host, agent.port), timeout=2) as client:
                client.handshake()
                notify_ok(client, 1, [Message("inline", [("v", i)])])
        wait_until(lambda: worker_pids(agent.process.pid).get(0) not in (None, hung),
                   timeout=HUNG_AFTER_S + 10, what="worker 0 replaced")
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    logs = agent.logs()
    assert f"worker 0 (pid {hung}) has not reported for" in logs, logs
    assert f"worker 0 (pid {hung}) exited with signal SIGKILL" in logs, logs
    wait_until(lambda: _listening(agent, 0) == 2, timeout=20, what="the new worker 0 serving")
    assert agent.process.running


def test_a_worker_stopping_slowly_is_not_taken_for_a_hung_one(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """A worker told to stop closes its channel at once and reports no more, while it waits
    for its handlers (up to the shutdown timeout): that is not a hang."""
    agent = spoe_agent("--workers", "2", app=SLOW_APP)
    wait_workers_serving(agent, 2)
    pids = worker_pids(agent.process.pid)
    clients = [SpopClient((agent.host, agent.port), timeout=30) for _ in range(2)]
    try:
        for i, client in enumerate(clients):  # one connection each: each worker holds a nap
            client.handshake()
            client.send(codec.notify(1, 1, [Message("nap", [("ms", int(1000 * (HUNG_AFTER_S + 3))),
                                                             ("id", i)])]))
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        time.sleep(HUNG_AFTER_S + 1.5)
        assert "has not reported" not in agent.logs(), agent.describe_logs()
        for client in clients:
            frame = client.read_frame()  # the nap's ACK: the stop waited for it
            assert frame is not None and frame.stream_id == 1, frame
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: "exited with status 0" in agent.logs(), timeout=20,
               what="the workers' clean exit")
    assert "has not reported" not in agent.logs(), agent.describe_logs()


def test_workers_are_not_taken_for_hung_when_the_supervisor_was_not_running(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """The supervisor stopped (or the whole agent frozen, as `docker pause` does): its
    workers' reports waited unread, and it killed both as hung the moment it ran again."""
    agent = spoe_agent("--workers", "2", app=SLOW_APP)
    wait_workers_serving(agent, 2)
    pids = worker_pids(agent.process.pid)
    os.kill(agent.process.pid, signal.SIGSTOP)
    try:
        time.sleep(HUNG_AFTER_S + 2)
    finally:
        os.kill(agent.process.pid, signal.SIGCONT)
    time.sleep(2)
    assert worker_pids(agent.process.pid) == pids, agent.describe_logs()
    assert "has not reported" not in agent.logs(), agent.describe_logs()
    with SpopClient((agent.host, agent.port), timeout=5) as client:
        client.handshake()
        notify_ok(client, 1, [Message("inline", [("v", 1)])])


@pytest.mark.slow
def test_a_worker_that_never_finishes_stopping_is_killed_and_replaced(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """Told to stop, then stopped itself (SIGSTOP): it closed its channel, so it is not taken
    for hung, but it must not hold its slot, and HAProxy's connections, for good."""
    agent = spoe_agent("--workers", "2", app=SLOW_APP)
    wait_workers_serving(agent, 2)
    stuck = worker_pids(agent.process.pid)[1]
    clients = [SpopClient((agent.host, agent.port), timeout=60) for _ in range(2)]
    try:
        for i, client in enumerate(clients):  # one connection each: its stop waits for a nap
            client.handshake()
            client.send(codec.notify(1, 1, [Message("nap", [("ms", 60_000), ("id", i)])]))
        time.sleep(0.5)
        os.kill(stuck, signal.SIGTERM)
        wait_until(lambda: "worker 1: shutting down" in agent.logs(), timeout=5,
                   what="worker 1 stopping")
        os.kill(stuck, signal.SIGSTOP)
        wait_until(lambda: worker_pids(agent.process.pid).get(1) not in (None, stuck),
                   timeout=STOPPING_AT_MOST_S + 10, what="worker 1 replaced")
    finally:
        for client in clients:
            client.close()
        try:
            os.kill(stuck, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert f"worker 1 (pid {stuck}) has been stopping for" in agent.logs(), agent.describe_logs()
    assert "has not reported" not in agent.logs(), agent.describe_logs()
