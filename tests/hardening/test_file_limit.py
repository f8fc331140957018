"""Out of file descriptors: said in the log, in its format, and served again once some free.

With ``ulimit -n`` below what HAProxy opens, gevent printed a traceback to stderr at each failed
accept (54 of 58 lines of a JSON log were not JSON), and nothing said beforehand that the limit
was too low for ``max_connections``.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from tests.hardening.support import clean_env
from tests.support.procs import REPO_ROOT, AgentProcess, ManagedProcess, free_port, wait_until
from tests.support.spop_client import SpopClient

_LIMIT = 48
_WITH_LIMIT = ("import os, resource, sys; "
               f"resource.setrlimit(resource.RLIMIT_NOFILE, ({_LIMIT}, {_LIMIT})); "
               "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_running_out_of_file_descriptors_is_logged_and_accepting_resumes(
    tmp_path: Path, workers: str,
) -> None:
    """With workers, the supervisor accepts and hands each connection over: a worker out of
    descriptors loses it (the kernel closes it, HAProxy reconnects), which it now says."""
    port = free_port()
    env = clean_env(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    proc = ManagedProcess(
        "agent", [sys.executable, "-c", _WITH_LIMIT, "-m", "spoe_agent", "--bind",
                  f"127.0.0.1:{port}", "--workers", workers, "--exporter", "none",
                  "--log-format", "json"], tmp_path, cwd=REPO_ROOT, env=env)
    agent = AgentProcess(proc, f"127.0.0.1:{port}", "127.0.0.1", port, None)
    proc.start()
    held: list[socket.socket] = []
    try:
        agent.wait_ready()
        for _ in range(2 * _LIMIT):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))

        def lines() -> list[dict]:
            parsed = []
            for line in proc.stderr_text().splitlines():
                try:
                    parsed.append(json.loads(line))
                except ValueError:
                    parsed.append({"msg": "", "not json": line})
            return parsed

        refusal = ("cannot accept a connection: Too many open files (open-file limit "
                   f"{_LIMIT})" if workers == "1" else "a connection handed over was lost: no "
                   f"file descriptor left to receive it (open-file limit {_LIMIT})")
        try:
            wait_until(lambda: any(refusal in line["msg"] for line in lines()),
                       timeout=20, what="the agent saying it cannot take a connection")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proc.describe_logs()}") from None
        assert not [line for line in lines() if "not json" in line], proc.stderr_text()
        said = [line["msg"] for line in lines()]
        assert any(f"the open-file limit ({_LIMIT}, ulimit -n) is below max_connections"
                   in msg for msg in said), said
        assert "Traceback" not in proc.stderr_text() + proc.stdout_text(), proc.describe_logs()
        for sock in held:
            sock.close()
        held.clear()

        def served() -> bool:
            # With workers, a connection handed over before its worker has closed the ones
            # above is still lost (reset), as HAProxy's would be; HAProxy reconnects, so do we.
            try:
                with SpopClient(("127.0.0.1", port), timeout=15) as client:
                    client.handshake()
                return True
            except (OSError, AssertionError):
                return False

        wait_until(served, timeout=30, what="a connection served again")
        assert proc.running
    finally:
        for sock in held:
            sock.close()
        proc.stop()
