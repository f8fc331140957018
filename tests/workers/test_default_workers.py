"""``--workers`` defaults to one worker per core the agent may use (issue 6: "default: number of
cores"), counted as loky counts them: the process's CPU affinity, bounded by a cgroup quota."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spoe_agent.config import AgentConfig, ConfigError, load_config, usable_cores
from tests.support.procs import REPO_ROOT, AgentProcess
from tests.support.spop_client import SpopClient
from tests.workers.test_multiworker import worker_pids


def test_the_default_and_auto_are_the_usable_cores(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert AgentConfig().workers == usable_cores() >= 1
    ini = tmp_path / "agent.ini"
    ini.write_text("[listener]\nworkers = auto\n")
    assert load_config(str(ini), env={}).workers == usable_cores()
    ini.write_text("[listener]\nworkers = 3\n")
    assert load_config(str(ini), env={}).workers == 3
    # What a `taskset -c 0` or a one-CPU cpuset gives: one worker, the single process.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert usable_cores() == 1 and AgentConfig().workers == 1


@pytest.mark.parametrize("text", ["0", "257", "many", "-1"])
def test_a_bad_worker_count_is_refused_with_its_line(tmp_path: Path, text: str) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[listener]\n\nworkers = {text}\n")
    with pytest.raises(ConfigError, match=r"agent\.ini:3: .*workers: .*or auto"):
        load_config(str(ini), env={})
    flag = subprocess.run([sys.executable, "-m", "spoe_agent", "--workers", text, "--check"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert flag.returncode == 2, flag
    assert "argument --workers" in flag.stderr and "or auto" in flag.stderr, flag.stderr


@contextmanager
def _affinity(cpus: set[int]) -> Iterator[None]:
    """Children started meanwhile inherit ``cpus``, as under ``taskset``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def test_without_the_flag_the_agent_runs_one_worker_per_usable_core(tmp_path: Path) -> None:
    """Started as an operator starts it, under an affinity of 1 CPU and of 2 (what this
    machine has, up to 2): a single process, then a supervisor with that many workers."""
    cpus = sorted(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOKY_"))}
    env["OTEL_TRACES_EXPORTER"] = "none"
    for count in sorted({1, min(2, len(cpus))}):
        with _affinity(set(cpus[:count])):
            agent = AgentProcess.launch(tmp_path / f"logs-{count}", app=None, env=env,
                                        workers=None, name=f"agent-{count}")
        try:
            agent.wait_ready()
            deadline = time.monotonic() + 20
            while count > 1 and len(worker_pids(agent.process.pid)) < count:
                assert time.monotonic() < deadline, agent.describe_logs()
                time.sleep(0.05)
            with SpopClient((agent.host, agent.port)) as client:
                assert client.handshake()["version"] == "2.0", agent.describe_logs()
            logs = agent.logs()
            if count == 1:
                assert worker_pids(agent.process.pid) == {}, logs
                assert "supervisor" not in logs and "spoe-agent listening on" in logs, logs
            else:
                assert sorted(worker_pids(agent.process.pid)) == list(range(count)), logs
                assert re.search(rf"supervisor: {count} workers \(auto: one per usable core\)",
                                 logs), logs
        finally:
            assert agent.process.stop() == 0, agent.describe_logs()
