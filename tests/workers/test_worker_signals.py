"""Stopping ``--workers N`` the way process managers do: no span lost to a duplicate signal.

systemd's default ``KillMode=control-group`` (and ``pkill``/``killall``) sends SIGTERM to every
process of the agent at once: each worker gets one from the init system and, a moment later,
one from the supervisor stopping it. A worker must take the second as the same request, not
as an impatient operator's "exit now", or it drops the spans it was flushing. The operator's
"exit now" is still there, on the supervisor: a second signal to it stops the workers at once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import Message
from spoe_agent.viewer.receiver import JaegerReceiver
from tests.hardening.support import SLOW_APP, notify_ok, trace
from tests.integration.tracing_support import agent_env
from tests.support.procs import AgentProcess, wait_until
from tests.support.spop_client import SpopClient
from tests.workers.test_multiworker import _is_zombie, wait_workers_ready, worker_pids


@pytest.fixture
def receiver() -> Iterator[JaegerReceiver]:
    with JaegerReceiver(udp_addr=("127.0.0.1", 0), http_addr=None, quiet_s=0.5) as rec:
        yield rec


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_every_process_at_once_flushes_every_workers_spans(
    spoe_agent: Callable[..., AgentProcess], receiver: JaegerReceiver, sig: signal.Signals
) -> None:
    # Nothing is exported before the signal: every span that arrives was flushed by the stop.
    env = agent_env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000")
    agent = spoe_agent("--workers", "2", app=None, env=env)
    wait_workers_ready(agent, 2)
    pids = worker_pids(agent.process.pid)
    assert len(pids) == 2, agent.describe_logs()
    sessions = [f"open-{i}" for i in range(40)]
    # Two connections at once: the supervisor hands them to both workers, and the worker that
    # receives a session's first event owns it, so both workers hold open sessions.
    with SpopClient((agent.host, agent.port), timeout=15) as client, \
            SpopClient((agent.host, agent.port), timeout=15) as other:
        client.handshake()
        other.handshake()
        for i, session in enumerate(sessions):
            notify_ok((client, other)[i % 2], i + 1,
                      [trace(session, ("span", "Unfinished"), ("kind", "server"))])
        assert receiver.spans == [], "spans were exported before the signal: test is moot"
        for pid in (agent.process.pid, *pids.values()):  # as systemd does
            os.kill(pid, sig)
        assert agent.process.wait(30) == 0, agent.describe_logs()

    def all_arrived(spans: list) -> bool:
        return sum(1 for s in spans if s.operation_name == "Unfinished") >= len(sessions)

    assert receiver.wait_for(all_arrived, timeout=15), agent.describe_logs()
    logs = agent.logs()
    assert "exiting now" not in logs, logs
    assert len(re.findall(r"worker \d: stopped", logs)) == 2, logs
    flushed = re.findall(r"worker \d: tracing: (\d+) spans exported in all", logs)
    assert len(flushed) == 2 and all(int(n) > 0 for n in flushed), logs  # by both workers
    assert len(receiver.spans) == len(sessions), [s.operation_name for s in receiver.spans]


def test_a_second_signal_to_the_supervisor_stops_the_workers_at_once(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    agent = spoe_agent("--workers", "2", app=SLOW_APP)
    wait_workers_ready(agent, 2, line="spoe-agent listening")
    pids = list(worker_pids(agent.process.pid).values())
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        # A handler that keeps its worker's graceful stop waiting for a minute.
        client.send(codec.notify(1, 1, [Message("nap", [("ms", 60_000), ("id", 1)])]))
        notify_ok(client, 3, [Message("inline", [("v", 3)])])
        agent.process.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):  # the graceful stop waits for the nap
            agent.process.wait(0.5)
        agent.process.send_signal(signal.SIGTERM)
        # Within 10 s of a 60 s nap: the workers were killed, not waited for.
        assert agent.process.wait(10) == 1, agent.describe_logs()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), pid
    assert "second signal during shutdown" in agent.logs(), agent.describe_logs()


def test_workers_whose_supervisor_was_killed_stop_and_remove_the_runtime_directory(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """The supervisor removes the peer sockets' directory when it stops; killed, it cannot,
    and a /tmp/spoe-agent-* directory was left behind per crash."""
    agent = spoe_agent("--workers", "2", app=None)
    wait_workers_ready(agent, 2)
    match = re.search(r"peer sockets in (\S+)\)", agent.logs())
    assert match, agent.describe_logs()
    runtime_dir = match.group(1)
    assert os.path.isdir(runtime_dir)
    pids = list(worker_pids(agent.process.pid).values())
    agent.process.send_signal(signal.SIGKILL)  # the supervisor only
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{pid}") and not _is_zombie(pid) for pid in pids):
        assert time.monotonic() < deadline, agent.describe_logs()
        time.sleep(0.05)
    logs = agent.logs()
    assert "is gone; stopping" in logs or "closed its channel; stopping" in logs, logs
    assert not os.path.exists(runtime_dir), os.listdir(runtime_dir)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigusr1_and_sigusr2_are_ignored_not_fatal(
    spoe_agent: Callable[..., AgentProcess], receiver: JaegerReceiver, workers: str
) -> None:
    """Black-box run: SIGUSR1 (logrotate's "reopen", HAProxy's soft-stop) or SIGUSR2 killed the
    agent on the spot, exit 138, without the clean stop's flush or AGENT-DISCONNECTs. Sent to
    every process at once, as ``systemctl kill`` does: a worker keeps SIGUSR1 for the
    supervisor's connection hand-offs, and must survive SIGUSR2 like the others."""
    agent = spoe_agent("--workers", workers, app=None, env=agent_env(receiver))
    pids: dict[int, int] = {}
    if workers == "2":
        wait_workers_ready(agent, 2)
        pids = worker_pids(agent.process.pid)
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            for pid in (agent.process.pid, *pids.values()):
                os.kill(pid, sig)
        # Still serving, on the same connection, and no process was replaced.
        notify_ok(client, 1, [trace("after-usr", ("span", "Root"), ("finish", "*"))])
        wait_until(lambda: "SIGUSR2 ignored: the agent logs to stderr (nothing to reopen) "
                   "and has no reload; SIGTERM stops it" in agent.logs(),
                   what="the SIGUSR2 to be logged")
        assert agent.process.running, agent.describe_logs()
        if pids:
            assert worker_pids(agent.process.pid) == pids, agent.describe_logs()
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(30) == 0, agent.describe_logs()
    assert "SIGUSR1 ignored" in agent.logs(), agent.describe_logs()
