"""A worker that cannot start stops the agent's start, as one process that cannot start does.

Each worker serves its own metrics endpoint (PORT + 1 + i): one taken port, and that worker
exits at once; its replacements would too. Running on without it would hide a configuration
error behind a restart loop, with a share of the sessions routed to a worker that never comes.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.procs import AgentProcess, free_port


def test_a_worker_that_cannot_start_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    while True:
        port = free_port()
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", port + 2))  # worker 1's metrics port
        except OSError:
            taken.close()
            continue
        break
    with taken:
        taken.listen()
        agent = AgentProcess.launch(tmp_path, "--workers", "2",
                                    "--metrics", f"127.0.0.1:{port}", app=None)
        try:
            status = agent.process.wait(30)
            logs = agent.logs()
        finally:
            agent.process.stop()
    assert status == 1, logs  # the worker's own status: cannot start
    assert "restarting" not in logs, logs  # refused at once, no restart loop first
    assert f"cannot serve metrics on 127.0.0.1:{port + 2}" in logs, logs
    assert "worker 1 (pid" in logs and "could not start (status 1); stopping" in logs, logs
    assert "supervisor: stopped" in logs, logs
