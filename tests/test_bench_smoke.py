"""The SPOP benchmark driver against the real agent, at a tiny load: correctness only.

A benchmark that silently counted wrong ACKs would make every number in benchmarks/README.md
meaningless, so this checks that every NOTIFY the driver sent got exactly its ACK back with the
expected set-var decoded, pipelined and sequenced. No speed is asserted: CI machines vary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.spop_load import (
    MINIMAL,
    TRACED,
    LoadResult,
    Workload,
    minimal_request,
    run_load,
    traced_request,
)
from spoe_agent.protocol import codec
from spoe_agent.protocol.types import Message
from tests.conftest import MISSING_REASON
from tests.support.haproxy import haproxy_binaries
from tests.support.procs import ManagedProcess, free_port, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """The minimal benchmark app served by the real CLI, shared by the tests: (port, pid)."""
    port = free_port()
    tmp_path = tmp_path_factory.mktemp("bench-agent")
    proc = ManagedProcess(
        "bench-agent",
        [sys.executable, "-m", "spoe_agent", "--bind", f"127.0.0.1:{port}",
         "--app", "benchmarks.apps:minimal_agent", "--log-level", "warning",
         "--exporter", "none", "--workers", "1"],
        tmp_path, cwd=REPO_ROOT,
    )
    with proc:
        yield port, proc.pid
    assert "Traceback" not in proc.stderr_text(), proc.describe_logs()


def _assert_all_answered(result: LoadResult) -> None:
    assert result.errors == 0, result.examples
    assert result.notifies_sent > 0
    assert result.acks_matched == result.notifies_sent
    assert result.acks > 0 and result.latency_us["p50"] > 0
    assert result.agent_hello["version"] == "2.0"


def test_minimal_load_every_notify_acked(bench_agent: tuple[int, int]) -> None:
    port, pid = bench_agent
    result = run_load(("127.0.0.1", port), connections=2, window=4, duration=1.0, warmup=0.2,
                      agent_pid=pid)
    _assert_all_answered(result)
    assert result.requests == result.acks
    assert result.agent_cpu_s is not None


def _three_events(i: int) -> list[bytes]:
    """Three NOTIFYs on one stream, frame-ids 1..3, like the events of one HTTP request."""
    return [
        minimal_request(i)[0],
        codec.notify(i, 2, [Message("bench", [("step", 2)])]),
        codec.notify(i, 3, [Message("bench", [("step", 3)])]),
    ]


def test_sequenced_streams_every_notify_acked(bench_agent: tuple[int, int]) -> None:
    port, _ = bench_agent
    workload = Workload("three-events", _three_events, MINIMAL.check_ack)
    result = run_load(("127.0.0.1", port), workload=workload, connections=1, window=3,
                      duration=0.8, warmup=0.1, sequenced=True)
    _assert_all_answered(result)
    assert result.requests > 0
    # Only whole requests finish: every third ACK completes one (within the window's edges).
    assert abs(result.acks - 3 * result.requests) <= 3 * 3


def test_wrong_actions_are_counted(bench_agent: tuple[int, int]) -> None:
    """The checker really judges the decoded set-var: expecting something else must fail."""
    port, _ = bench_agent
    workload = Workload("expect-nothing", minimal_request, lambda actions: actions == [])
    result = run_load(("127.0.0.1", port), workload=workload, connections=1, window=2,
                      duration=0.3, warmup=0.0)
    assert result.bad_acks == result.acks_matched > 0


def _tracing_agent(tmp_path: Path) -> tuple[ManagedProcess, int]:
    """The default (tracing) agent, export off, as a managed process: (process, port)."""
    port = free_port()
    proc = ManagedProcess(
        "tracing-agent",
        [sys.executable, "-m", "spoe_agent", "--bind", f"127.0.0.1:{port}",
         "--log-level", "warning", "--exporter", "none", "--workers", "1"],
        tmp_path, cwd=REPO_ROOT,
    )
    return proc, port


def test_traced_replay_against_the_tracing_agent(tmp_path: Path) -> None:
    """The reference config's 8 events per request, sequenced, through the default agent: all
    ACKed, and the on-backend-http-request ACK carries the injected traceparent."""
    proc, port = _tracing_agent(tmp_path)
    seen: list[list[Any]] = []

    def check(actions: list[Any]) -> bool:
        seen.append(actions)
        return TRACED.check_ack(actions)

    workload = Workload("traced", traced_request, check, sequenced=True)
    with proc:
        result = run_load(("127.0.0.1", port), workload=workload, connections=1, window=4,
                          duration=0.5, warmup=0.1)
    _assert_all_answered(result)
    assert result.sequenced and result.requests > 0
    assert any(a.name == "traceparent" for actions in seen for a in actions), seen[:10]


@pytest.fixture(scope="module")
def bare_agent_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """benchmarks/bare_agent.c, built once for the module (warnings are errors)."""
    binary = tmp_path_factory.mktemp("bare-agent-c") / "bare_agent"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", str(binary),
                    str(REPO_ROOT / "benchmarks" / "bare_agent.c")], check=True)
    return binary


@pytest.mark.parametrize("responder", ["python", "c", "c-polling", "c-delayed"])
def test_the_bare_agents_ack_every_event_and_set_nothing(
    tmp_path: Path, responder: str, request: pytest.FixtureRequest
) -> None:
    """The ceiling and floor runs (haproxy_e2e --ceiling, --floor, --floor-delay) measure
    HAProxy and the round trips only if their agents (benchmarks/bare_agent.py and .c, the C
    one sleeping, polling, and polling with a delay before its ACKs) answer every NOTIFY of the
    reference config, pipelined and sequenced, with nothing in the ACK. The C one is built with
    cc, which the mypyc test environment needs anyway."""
    port = free_port()
    if responder == "python":
        argv = [sys.executable, "-m", "benchmarks.bare_agent", "--port", str(port)]
    else:
        binary = request.getfixturevalue("bare_agent_c")  # built only if a C case runs
        argv = [str(binary), "--port", str(port), *{
            "c": [], "c-polling": ["--poll"], "c-delayed": ["--poll", "--delay", "20"]}[responder]]
    proc = ManagedProcess(f"bare-agent-{responder}", argv, tmp_path, cwd=REPO_ROOT)
    seen: list[list[Any]] = []

    def check(actions: list[Any]) -> bool:
        seen.append(actions)
        return actions == []

    with proc:
        wait_for_port("127.0.0.1", port, 20, proc)
        result = run_load(("127.0.0.1", port), workload=Workload("bare", traced_request, check,
                                                                 sequenced=True),
                          connections=2, window=4, duration=0.5, warmup=0.1)
    _assert_all_answered(result)
    assert result.requests > 0
    assert seen == [[]]  # the driver judges each distinct ACK payload once: all were empty


def test_worker_scaling_counts_the_driven_requests(tmp_path: Path) -> None:
    """worker_scaling reads its request count from spop_load's output (the callgrind part
    needs minutes, so not here): a wrong parse would make every ratio it prints wrong."""
    from benchmarks.spop_load import LoadResult, format_result
    from benchmarks.worker_scaling import NOTIFYS_PER_REQUEST, _drive, parse_load_output

    proc, port = _tracing_agent(tmp_path)
    with proc:
        acks, errors = _drive(port, 0.5, connections=1, window=4)
    assert errors == 0
    assert acks >= NOTIFYS_PER_REQUEST
    # Thousands separators and a non-zero error count, as spop_load prints them.
    result = LoadResult("traced", 8, 20, True, duration_s=30.0, acks=1_234_567,
                        unanswered=2, agent_disconnects=["1 io error"])
    assert parse_load_output(format_result(result)) == (1_234_567, 3)


@pytest.mark.slow
@pytest.mark.haproxy
def test_soak_smoke(tmp_path: Path) -> None:
    """The soak harness end to end at a tiny scale: 20 s at 200 req/s through HAProxy 2.6 with
    two 2 s collector outages. Its own checks (RSS, no failed request, every span of every
    request served while the collector was up) must pass, or the 30-minute numbers in
    benchmarks/README.md could come from a harness that cannot see a lost span."""
    haproxy = haproxy_binaries().get("2.6")
    if haproxy is None:
        pytest.skip(MISSING_REASON["2.6"])
    if shutil.which("wrk") is None:
        pytest.skip("wrk not found: apt-get install wrk")
    out = tmp_path / "soak.json"
    # a subprocess: the harness pins its own process to a core
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--duration", "20", "--rate", "200",
         "--margin", "1.5", "--haproxy", haproxy, "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    assert result["traces_checked"] > 500 and result["traces_incomplete"] == 0
    assert len(result["outages"]) == 2 and all(w["dropped_spans"] > 0 for w in result["outages"])


def test_traced_path_replays_whole_requests() -> None:
    """benchmarks/traced_path.py's measured process, without valgrind: every replayed request
    must close its session and export its 9 spans, or its instruction counts measure a broken
    path (the process raises if not)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.traced_path", "--inner", "export", "20", "20"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_run_spop_bench_alternates_interpreters_on_the_traced_replay(tmp_path: Path) -> None:
    """run_spop_bench with two --agent-python (here the same one twice): one round runs the
    traced replay against each, with export on, and the table reports the agent CPU per traced
    request of each, the number issue 3's target is about."""
    out = tmp_path / "runs.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_spop_bench", "--workload", "traced",
         "--duration", "0.5", "--warmup", "0.2", "-c", "1", "-w", "2", "--skip-forge",
         "--agent-python", sys.executable, "--agent-python", sys.executable,
         "--agent-args", "--exporter console", "--logs", str(tmp_path / "logs"),
         "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert len(runs) == 2 and all(r["agent"].startswith("spoe-agent [") for r in runs), runs
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in runs), runs
    assert "agent CPU per traced request median" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_the_c_driver_completes_requests_with_one_and_two_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """worker_wallclock's numbers are requests that spop_drive.c saw ACKed frame by frame, with
    a fifth of their events sent over another connection (forwarded between two workers):
    every ACK must name a frame in flight, and both configurations must complete requests."""
    import os

    from benchmarks.worker_wallclock import main

    workers = ["1", "2"] if len(os.sched_getaffinity(0)) >= 2 else ["1"]
    assert main(["--workers", *workers, "--rounds", "1", "--duration", "1", "--warmup", "0.5",
                 "--connections", "4", "--window", "4", "--spread", "20"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 20% |")]
    assert [row[2].strip() for row in rows] == workers
    assert all(float(row[3].replace(",", "")) > 0 for row in rows), out


def test_the_c_driver_counts_an_ack_it_did_not_ask_for(tmp_path: Path) -> None:
    """An agent that ACKs a frame twice (or a frame never sent) must show as errors, or a
    broken agent would be timed as a fast one: the bare C agent is well-behaved, so its ACKs
    are replayed to a fake agent that answers every NOTIFY with two ACKs."""
    import socket
    import threading

    from benchmarks.worker_wallclock import build_driver, write_pool

    driver = build_driver(tmp_path)
    pool = tmp_path / "pool.bin"
    write_pool(pool, requests=200)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            answer_twice()
        except OSError:  # the driver is done and gone
            pass

    def answer_twice() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)  # the HELLO
        conn.sendall(codec.encode_frame(101, 1, 0, codec.encode_kv_list([
            ("version", "2.0"), ("max-frame-size", 16380), ("capabilities", "pipelining")])))
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                size = int.from_bytes(buf[:4], "big")
                frame, buf = buf[4:4 + size], buf[4 + size:]
                end = 5
                for _ in range(2):  # the stream and frame id varints
                    end += 1
                    if frame[end - 1] >= 240:
                        while frame[end] >= 128:
                            end += 1
                        end += 1
                ack = bytes([103, 0, 0, 0, 1]) + frame[5:end]
                conn.sendall((len(ack)).to_bytes(4, "big") + ack)
                conn.sendall((len(ack)).to_bytes(4, "big") + ack)

    threading.Thread(target=serve, daemon=True).start()
    out = subprocess.run([str(driver), "--port", str(port), "--pool", str(pool),
                          "--connections", "1", "--window", "4", "--duration", "0.5",
                          "--warmup", "0"], capture_output=True, text=True, timeout=30)
    listener.close()
    result = json.loads(out.stdout)
    # Each ACK the driver took was followed by its double, an error; only the last few
    # doubles (one per request in flight) may have been cut off by the end of the run.
    assert result["requests"] > 0
    assert result["errors"] >= result["acks"] - 4, result
