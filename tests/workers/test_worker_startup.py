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
