"""A worker that cannot start stops the agent's start, as one process that cannot start does.

Each worker serves its own metrics endpoint (PORT + 1 + i): one taken port, and that worker
exits at once; its replacements would too. Running on without it would hide a configuration
error behind a restart loop, with a share of the sessions routed to a worker that never comes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

from spoe_agent.workers.mesh import peer_path
from spoe_agent.workers.supervisor import runtime_dir
from tests.support.procs import AgentProcess, free_port_range


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_worker_that_cannot_start_stops_the_start_with_its_reason(tmp_path: Path,
                                                                    fmt: str) -> None:
    # The supervisor's metrics port and worker 0's free, worker 1's taken.
    port = free_port_range(3)
    taken = socket.socket()
    taken.bind(("127.0.0.1", port + 2))
    with taken:
        taken.listen()
        agent = AgentProcess.launch(tmp_path, "--workers", "2", "--log-format", fmt,
                                    "--metrics", f"127.0.0.1:{port}", app=None)
        try:
            status = agent.process.wait(30)
            logs = agent.logs()
        finally:
            agent.process.stop()
    assert status == 1, logs  # the worker's own status: cannot start
    assert "restarting" not in logs, logs  # refused at once, no restart loop first
    # Which worker, in the log's own format, as every line a worker logs (it was a bare print).
    said = f"worker 1: cannot start: cannot serve metrics on 127.0.0.1:{port + 2}"
    if fmt == "json":
        lines = [json.loads(line) for line in agent.process.stderr_text().splitlines() if line]
        assert any(line["msg"].startswith(said) for line in lines), logs
    else:
        assert said in logs, logs
    assert "worker 1 (pid" in logs and "could not start (status 1); stopping" in logs, logs
    assert "supervisor: stopped" in logs, logs


def test_a_temporary_directory_too_deep_for_unix_sockets_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker failed to bind its peer socket (a traceback each) in a deep ``TMPDIR``."""
    deep = tmp_path / ("y" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    path = runtime_dir(4)
    try:
        assert os.path.dirname(path) == "/tmp"
        assert oct(os.stat(path).st_mode & 0o777) == "0o700"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(peer_path(path, 3))
    finally:
        shutil.rmtree(path)
    shallow = tmp_path / "s"
    shallow.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shallow))
    assert os.path.dirname(runtime_dir(4)) == str(shallow)


def _patched_supervisor(tmp_path: Path, script: str) -> tuple[Any, Path, int]:
    """The agent with two workers, run by ``script`` (a supervisor patched for the test), once
    both serve: its process, its log and its port."""
    import subprocess
    import sys

    from tests.support.procs import free_port, wait_for_port, wait_until

    repo = Path(__file__).resolve().parents[2]
    port = free_port()
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([sys.executable, "-c", script.format(repo=str(repo), port=port)],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=repo)
    try:
        wait_for_port("127.0.0.1", port, 30)
        wait_until(lambda: log.read_text().count("spoe-agent listening on") == 2,
                   what="two workers serving")
    except BaseException:
        agent.kill()
        agent.wait()
        raise
    return agent, log, port


FORK_FAILS_SCRIPT = """
import errno, sys
sys.path.insert(0, {repo!r})
from gevent import monkey
monkey.patch_all()
import spoe_agent.workers.supervisor as supervisor

real = supervisor.subprocess.Popen
started = [0]

def popen(*args, **kwargs):
    started[0] += 1
    if 2 < started[0] < 5:  # the first two replacements: fork's EAGAIN (a pids limit)
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
    return real(*args, **kwargs)

supervisor.subprocess.Popen = popen
from spoe_agent.cli import main
sys.exit(main(["--bind", "127.0.0.1:{port}", "--workers", "2", "--exporter", "none"]))
"""


def test_a_worker_that_cannot_be_forked_is_tried_again_while_the_other_serves(
        tmp_path: Path) -> None:
    """Code review: an OSError from starting a replacement (fork's EAGAIN, no memory, no
    descriptor) escaped the supervisor's loop, which stopped the healthy worker too and
    exited with a traceback."""
    import signal

    from tests.support.procs import wait_until
    from tests.support.spop_client import SpopClient
    from tests.workers.test_multiworker import worker_pids

    agent, log, port = _patched_supervisor(tmp_path, FORK_FAILS_SCRIPT)
    try:
        os.kill(worker_pids(agent.pid)[0], signal.SIGKILL)
        wait_until(lambda: log.read_text().count("worker 0 could not be started: [Errno 11] "
                                                 "Resource temporarily unavailable; trying "
                                                 "again in") == 2, what="two failed restarts")
        wait_until(lambda: 0 in worker_pids(agent.pid), what="worker 0 started at last")
        for _ in range(4):  # both workers serve (connections go to each in turn)
            with SpopClient(("127.0.0.1", port)) as client:
                assert client.handshake()["version"] == "2.0"
    finally:
        agent.send_signal(signal.SIGTERM)
        status = agent.wait(30)
    text = log.read_text()
    assert status == 0, text
    assert "Traceback" not in text, text


def test_a_stopping_supervisor_refuses_new_connections_while_its_workers_drain(
        tmp_path: Path) -> None:
    """Code review: the supervisor listened on while its workers drained (up to 20 s), so the
    kernel took connections nobody would serve, reset at the end without a word. One process
    that stops refuses them at once."""
    import signal

    from tests.support.procs import wait_until
    from tests.support.spop_client import SpopClient

    agent = AgentProcess.launch(tmp_path, "--workers", "2", app=None)
    try:
        agent.wait_ready()
        wait_until(lambda: agent.logs().count("spoe-agent listening on") == 2,
                   what="two workers serving")
        held = SpopClient((agent.host, agent.port), timeout=30)
        held.handshake()  # open, and never closed by us: its worker lingers on it
        agent.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "supervisor: stopping 2 workers" in agent.logs(), what="the stop")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((agent.host, agent.port), timeout=5).close()
        held.close()
        assert agent.process.wait(30) == 0, agent.logs()
    finally:
        agent.process.stop()


STARTING_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from gevent import monkey
monkey.patch_all()
import spoe_agent.workers.supervisor as supervisor

supervisor.STARTING_AT_MOST_S = 3.0
from spoe_agent.cli import main
sys.exit(main(["--bind", "127.0.0.1:{port}", "--workers", "2", "--exporter", "none"]))
"""


def test_a_replacement_stopped_in_its_start_up_is_killed_and_gets_no_connection(
        tmp_path: Path) -> None:
    """Code review: hang detection waited for a worker's first report, so a replacement that
    stopped in its start-up was never killed; and being the least loaded, it was handed the
    new connections, which waited on it."""
    import signal

    from tests.support.procs import wait_until
    from tests.support.spop_client import SpopClient
    from tests.workers.test_multiworker import worker_pids

    agent, log, port = _patched_supervisor(tmp_path, STARTING_SCRIPT)
    try:
        first = worker_pids(agent.pid)[0]
        os.kill(first, signal.SIGKILL)
        replacement = wait_until(lambda: [pid for i, pid in worker_pids(agent.pid).items()
                                          if i == 0 and pid != first], what="a replacement")[0]
        os.kill(replacement, signal.SIGSTOP)  # stuck in its start-up
        for _ in range(4):  # each new connection goes to the worker that serves
            with SpopClient(("127.0.0.1", port), timeout=10) as client:
                assert client.handshake()["version"] == "2.0"
        wait_until(lambda: f"worker 0 (pid {replacement}) has not begun serving" in
                   log.read_text(), what="the stuck replacement killed")
        wait_until(lambda: log.read_text().count("spoe-agent listening on") == 3,
                   what="its own replacement serving")
    finally:
        agent.send_signal(signal.SIGTERM)
        status = agent.wait(30)
    assert status == 0, log.read_text()


EARLY_STOP_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from gevent import monkey
monkey.patch_all()
import spoe_agent.workers.supervisor as supervisor

supervisor.stopped_early = lambda: True  # a SIGTERM came before the supervisor's handlers
started = []

def popen(*args, **kwargs):
    started.append(args)
    raise OSError("no worker may start here")

supervisor.subprocess.Popen = popen
from spoe_agent.cli import main
status = main(["--bind", "127.0.0.1:{port}", "--workers", "2", "--exporter", "none"])
print("started", len(started), "status", status)
"""


def test_a_stop_signal_before_the_workers_start_starts_none() -> None:
    """Black-box run: a stop signal during the supervisor's start-up stopped it, but only
    after it had started every worker, each of which then began and ended its start-up."""
    import subprocess
    import sys

    from tests.support.procs import free_port

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", EARLY_STOP_SCRIPT.format(repo=str(repo), port=free_port())],
        capture_output=True, text=True, timeout=60, cwd=repo)
    assert done.stdout.strip() == "started 0 status 0", done.stdout + done.stderr
    assert "supervisor: stopped" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_first_signal_after_a_failed_start_is_not_taken_for_a_second() -> None:
    """Black-box run: a worker that could not start stops the supervisor, and the operator's
    SIGTERM meanwhile, their first, was taken as the second: "killing the workers now,
    unflushed spans are lost", and exit status 1 became the forced one."""
    import subprocess
    import sys

    from spoe_agent.config import AgentConfig
    from spoe_agent.workers.supervisor import Supervisor

    supervisor = Supervisor(AgentConfig(workers=2, exporter="none"), [])
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    failed.wait(30)
    supervisor.slots[0].proc = failed  # started, never served, and gone: a failed start
    supervisor._check()
    assert supervisor._stop.is_set() and supervisor._failed == 1
    supervisor._on_signal()  # the operator's first
    assert not supervisor._forced
    supervisor._on_signal()  # and a second one does force it
    assert supervisor._forced
