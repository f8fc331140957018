"""Every worker runs the supervisor's code and configuration, whatever is on disk later.

The supervisor starts (and restarts) workers as new interpreters. Started with ``python -m``,
they imported ``spoe_agent`` from the working directory first: a checkout there (the
README's ``pip install .`` leaves one) ran uncompiled, or another version, in the workers. And
a restarted worker read ``-c`` again: an edit not yet meant to apply ran beside the old
configuration, and a file moved or broken meanwhile left the worker in a restart loop.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.procs import AgentProcess, ManagedProcess, free_port, wait_until
from tests.support.spop_client import SpopClient
from tests.workers.test_multiworker import wait_workers_serving, worker_pids

# The supervisor itself must not import from its working directory either: -c with the
# directory dropped from sys.path, as the console script does.
_SUPERVISOR = ("import sys; del sys.path[0]; from spoe_agent.cli import main; "
               "raise SystemExit(main())")


def test_workers_do_not_import_a_spoe_agent_directory_in_the_working_directory(
    tmp_path: Path,
) -> None:
    impostor = tmp_path / "cwd" / "spoe_agent"
    impostor.mkdir(parents=True)
    marker = tmp_path / "impostor-ran"
    (impostor / "__init__.py").write_text("")
    (impostor / "__main__.py").write_text(f"open({str(marker)!r}, 'a').write('ran\\n')\n")
    (impostor / "cli.py").write_text(
        f"def main():\n    open({str(marker)!r}, 'a').write('ran\\n')\n    return 0\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = ManagedProcess(
        "agent", [sys.executable, "-c", _SUPERVISOR, "--bind", f"127.0.0.1:{port}",
                  "--workers", "2", "--exporter", "none"],
        tmp_path / "logs", cwd=impostor.parent, env=env).start()
    try:
        wait_until(lambda: len(set(re.findall(r"worker (\d+): routing sessions as worker",
                                              proc.stdout_text() + proc.stderr_text()))) == 2
                   or not proc.running, timeout=30, what="both workers routing")
        logs = proc.stdout_text() + proc.stderr_text()
        assert proc.running, logs
        assert not marker.exists(), logs
        with SpopClient(("127.0.0.1", port), timeout=10) as client:
            client.handshake()
    finally:
        proc.stop()


def test_a_restarted_worker_runs_the_configuration_the_agent_started_with(
    spoe_agent: Callable[..., AgentProcess], tmp_path: Path,
) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[logging]\nformat = text\n")
    agent = spoe_agent("-c", str(ini), "--workers", "2", app=None)
    wait_workers_serving(agent, 2)
    # Edited for the next start (JSON logs), then gone altogether: neither is this run's.
    ini.write_text("[logging]\nformat = json\n")
    old = worker_pids(agent.process.pid)[1]
    os.kill(old, signal.SIGKILL)
    ini.unlink()
    wait_until(lambda: worker_pids(agent.process.pid).get(1) not in (None, old), timeout=20,
               what="worker 1 replaced")
    deadline = time.monotonic() + 20
    while agent.logs().count("worker 1: routing sessions as worker") < 2:
        assert time.monotonic() < deadline and "configuration error" not in agent.logs(), \
            agent.describe_logs()
        time.sleep(0.05)
    logs = agent.logs()
    assert "configuration error" not in logs, logs
    assert not any(line.startswith("{") for line in logs.splitlines()), logs  # still text
    assert agent.process.running, logs
