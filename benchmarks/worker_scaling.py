"""What ``--workers N`` costs per traced request, counted in instructions rather than timed.

The issue's target is N workers >= 0.8 x N the throughput of one, each worker with a core of its
own. This 2-core VM cannot give N workers N cores next to the load generator, and its CPU time
per request swings with whatever shares the cores (two busy workers on two vCPUs cost each
other). Instructions do not: under callgrind, the agent's processes (supervisor and workers,
``--trace-children=yes``) are saturated by ``spop_load``'s traced replay (8 sequenced NOTIFYs
and 9 spans per request, Jaeger export to a UDP socket nobody reads), and the instructions they
execute per request are compared with one worker's. Since the work is the same, a worker with a
core of its own would serve ``instructions(1) / instructions(N)`` x N the throughput of one.

It counts user-space instructions only: the system calls forwarding adds (a ``send`` per
owner and read of NOTIFYs, a ``poll`` per drain) are not in it, so the real ratio is lower.
Counters are zeroed after a warm-up and dumped after the measured load with
``callgrind_control``, which acts on every callgrind process of this user: run nothing else
under callgrind meanwhile.

What the agent does per second whatever its load (timers: the workers' 10 ms drain tick, the
session expiry, the load reports; the event loop waking for them) is counted too, and under
callgrind, which runs the agent ~50 times slower while those timers keep wall-clock time, it
weighs ~50 times more per request than at full speed, differently from one run to the next
(as many fewer requests as the machine is slower). So the same agent is also counted idle for
as long, and the per-request figure the ratio is taken from is net of that rate.

    python -m benchmarks.worker_scaling [--workers 1 2] [--seconds 30] [--python PY]
        [--spread P ...]

``--spread P`` drives the agent with ``spop_drive.c`` instead (the same traced requests), which
sends P% of a request's events over another of its connections, as HAProxy does: with several
workers those are forwarded to their session's owner, and the count shows what that costs in
instructions, apart from the system calls and scheduling the wall clock also pays.

``--python`` counts the spoe-agent installed for another interpreter, such as the build compiled
with mypyc (``SPOE_AGENT_MYPYC=1 pip install .``, setup.py), instead of this tree.

Needs valgrind (Debian's package). Each configuration takes about two minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.haproxy_e2e import (  # noqa: E402
    agent_env,
    free_port,
    installed_build,
    interpreter,
    wait_port,
)
from benchmarks.worker_wallclock import build_driver, write_pool  # noqa: E402

NOTIFYS_PER_REQUEST = 8
_ACKS = re.compile(r"\(([\d,]+) ACKs, ")
_ERRORS = re.compile(r"errors (\d+)")


def _drive(port: int, seconds: float, connections: int, window: int) -> tuple[int, int]:
    """``spop_load``'s traced replay for ``seconds``: (ACKs, errors)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.spop_load", "--connect", f"127.0.0.1:{port}",
         "--workload", "traced", "--sequenced", "-c", str(connections), "-w", str(window),
         "--duration", str(seconds), "--warmup", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    return parse_load_output(proc.stdout + proc.stderr)


def _drive_c(port: int, seconds: float, connections: int, window: int,
             spread: int, driver: tuple[Path, Path]) -> tuple[int, int]:
    """``spop_drive.c``'s replay of the same requests, ``spread`` % of events moved: (ACKs, errors)."""
    binary, pool = driver
    proc = subprocess.run(
        [str(binary), "--port", str(port), "--pool", str(pool), "--connections", str(connections),
         "--window", str(window), "--spread", str(spread), "--duration", str(seconds),
         "--warmup", "0"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        return 0, 1
    result = json.loads(proc.stdout)
    return int(result["acks"]), int(result["errors"])


def parse_load_output(out: str) -> tuple[int, int]:
    """(ACKs in the measured window, errors) from ``spop_load``'s printed result."""
    acks, errors = _ACKS.search(out), _ERRORS.search(out)
    if acks is None or errors is None:
        raise RuntimeError(f"unexpected spop_load output:\n{out}")
    return int(acks.group(1).replace(",", "")), int(errors.group(1))


def _callgrind_control(flag: str) -> None:
    subprocess.run(["callgrind_control", flag], capture_output=True, check=False)


def measure(workers: int, seconds: float, warmup: float, connections: int,
            window: int, python: str | None = None, spread: int | None = None,
            driver: tuple[Path, Path] | None = None) -> dict[str, float]:
    """Instructions per traced request of an agent with ``workers`` workers, saturated."""
    def drive(duration: float) -> tuple[int, int]:
        if spread is None or driver is None:
            return _drive(port, duration, connections, window)
        return _drive_c(port, duration, connections, window, spread, driver)

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = free_port()
    env = agent_env(python, sink.getsockname())
    with tempfile.TemporaryDirectory() as tmp:
        agent = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes",
             f"--callgrind-out-file={tmp}/cg.%p", python or sys.executable, "-m", "spoe_agent",
             "--bind", f"127.0.0.1:{port}", "--workers", str(workers)],
            cwd=tmp if python is not None else REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port, agent, timeout=300)
            # Under valgrind, workers take tens of seconds to start and greet their peers; the
            # warm-up load runs until every one of them serves (and their caches are warm).
            time.sleep(20 * workers if workers > 1 else 0)
            drive(warmup)  # its errors (a worker not up yet) aside
            _callgrind_control("-z")
            started = time.monotonic()
            time.sleep(seconds)
            _callgrind_control("-d")
            idle_s = time.monotonic() - started
            _callgrind_control("-z")
            started = time.monotonic()
            acks, errors = drive(seconds)
            _callgrind_control("-d")
            load_s = time.monotonic() - started
        finally:
            agent.send_signal(signal.SIGINT)
            try:
                agent.wait(120)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        # Each callgrind_control -d makes every process write its next ``.N`` file: what it ran
        # since the zeroing before. ``.1``: idle; ``.2``: the measured load.
        idle, _ = _summed(Path(tmp), 1)
        total, processes = _summed(Path(tmp), 2)
    if errors:
        raise RuntimeError(f"--workers {workers}: {errors} errors in the driver's checks")
    if processes < workers:
        raise RuntimeError(f"--workers {workers}: only {processes} processes were counted")
    requests = acks / NOTIFYS_PER_REQUEST
    idle_rate = idle / idle_s
    return {"workers": workers, "spread": spread, "requests": requests, "instructions": total,
            "per_request": total / requests, "idle_per_s": idle_rate,
            "net_per_request": (total - idle_rate * load_s) / requests}


def _summed(folder: Path, dump: int) -> tuple[int, int]:
    """Instructions in every process's dump number ``dump``, and how many processes wrote one."""
    total = processes = 0
    for path in folder.glob(f"cg.*.{dump}"):
        match = re.search(r"^summary: (\d+)", path.read_text(errors="replace"), re.M)
        if match:
            total += int(match.group(1))
            processes += 1
    return total, processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--python", type=interpreter,
                        help="the interpreter whose spoe-agent is counted")
    parser.add_argument("--spread", type=int, nargs="+",
                        help="drive with spop_drive.c, moving this percent of events (each value "
                             "a configuration)")
    args = parser.parse_args(argv)
    if subprocess.run(["which", "valgrind"], capture_output=True).returncode != 0:
        print("valgrind is needed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    python = args.python or sys.executable
    print(f"spoe-agent for {python}: {installed_build(python) or 'none installed'}")
    with tempfile.TemporaryDirectory(prefix="worker-scaling-") as tmp:
        driver = None
        if args.spread is not None:
            driver = (build_driver(Path(tmp)), Path(tmp) / "pool.bin")
            write_pool(driver[1])
        results = [measure(n, args.seconds, args.warmup, args.connections, args.window,
                           args.python, spread, driver)
                   for spread in (args.spread or [None]) for n in args.workers]
    print("| spread | workers | requests counted | instructions per request "
          "| idle instructions per s | per request, net of idle "
          "| x N the throughput of one (net; raw) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = next((b for b in results if b["workers"] == 1 and b["spread"] == r["spread"]),
                    None)
        ratio = "-"
        if base:
            ratio = (f"{base['net_per_request'] / r['net_per_request']:.2f}; "
                     f"{base['per_request'] / r['per_request']:.2f}")
        spread = "-" if r["spread"] is None else f"{r['spread']}%"
        print(f"| {spread} | {r['workers']} | {r['requests']:,.0f} | {r['per_request']:,.0f} "
              f"| {r['idle_per_s']:,.0f} | {r['net_per_request']:,.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
