"""``--workers N`` timed on the wall clock: traced requests per second with 1 and N workers.

The issue's target is N workers >= 0.8 x N the throughput of one, each with a core of its own.
Through HAProxy this 2-core VM cannot show it (HAProxy, wrk and the origin need a core), and
with ``spop_load`` as the load the Python driver took a good part of a core itself, so
``worker_scaling.py`` counts instructions instead. Here the load is ``spop_drive.c``: HAProxy's
side of SPOP in C, replaying the traced requests ``spop_load`` encodes (8 sequenced NOTIFYs,
9 spans each, Jaeger export on to a UDP socket nobody reads) for a few microseconds of CPU per
request, and sending ``--spread`` percent of a request's events over another of its
connections, as HAProxy does at saturation (about a fifth on HAProxy 2.6): with several
workers those events are forwarded to the worker that owns their session.

Layout: the driver on core 0; one worker on core 1, alone; N workers on cores 0..N-1, sharing
core 0 with the driver (the driver's CPU is reported, so what that share costs is visible).
Configurations alternate round by round; the table gives medians.

    python -m benchmarks.worker_wallclock [--workers 1 2] [--rounds 3] [--spread 0 20]
        [--duration 10] [--python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
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
    cpu_seconds,
    free_port,
    process_tree,
    stop,
    wait_port,
)
from benchmarks.spop_load import haproxy_hello, traced_request  # noqa: E402

POOL_REQUESTS = 20_000


def write_pool(path: Path, requests: int = POOL_REQUESTS) -> None:
    """The driver's input (spop_drive.c's header comment): the HELLO, then each request's frames."""
    hello = haproxy_hello("spop-drive")
    with open(path, "wb") as out:
        out.write(struct.pack("<I", len(hello)) + hello)
        out.write(struct.pack("<I", requests))
        for i in range(requests):
            frames = traced_request(i)
            out.write(struct.pack("<B", len(frames)))
            for frame in frames:
                out.write(struct.pack("<I", len(frame)) + frame)


def build_driver(workdir: Path) -> Path:
    binary = workdir / "spop_drive"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(REPO_ROOT / "benchmarks" / "spop_drive.c")],
                   check=True)
    return binary


def measure(workers: int, spread: int, args: argparse.Namespace, driver: Path, pool: Path,
            workdir: Path) -> dict[str, float]:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # spans land here, unread
    sink.bind(("127.0.0.1", 0))
    port = free_port()
    env = agent_env(args.python, sink.getsockname())
    agent_cores = {1} if workers == 1 else set(range(workers))
    log = open(workdir / f"agent-{workers}-{spread}.log", "ab")  # noqa: SIM115
    agent = subprocess.Popen(
        [args.python or sys.executable, "-m", "spoe_agent", "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers)],
        cwd=workdir if args.python else REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: os.sched_setaffinity(0, agent_cores),
    )
    try:
        wait_port(port, agent)
        time.sleep(1.0 + workers)  # the workers up and greeting each other
        tree = process_tree(agent.pid)
        drive = subprocess.Popen(
            [str(driver), "--port", str(port), "--pool", str(pool), "--connections",
             str(args.connections), "--window", str(args.window), "--spread", str(spread),
             "--duration", str(args.duration), "--warmup", str(args.warmup)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=lambda: os.sched_setaffinity(0, {0}),
        )
        time.sleep(args.warmup)
        agent_cpu0, t0 = cpu_seconds(tree), time.monotonic()
        pid, status, usage = os.wait4(drive.pid, 0)
        drive.returncode = os.waitstatus_to_exitcode(status)
        agent_cpu1, t1 = cpu_seconds(tree), time.monotonic()
        out, err = drive.communicate()
        if drive.returncode != 0:
            raise RuntimeError(f"spop_drive failed ({drive.returncode}): {err.decode()}")
        result = json.loads(out)
    finally:
        stop(agent)
        log.close()
        sink.close()
    if result["errors"]:
        raise RuntimeError(f"--workers {workers}: {result['errors']} unexpected frames")
    seconds = result["seconds"]
    rate = result["requests"] / seconds
    agent_cpu = (agent_cpu1 - agent_cpu0) / (t1 - t0)
    driver_cpu = (usage.ru_utime + usage.ru_stime) / (seconds + args.warmup)
    return {"workers": workers, "spread": spread, "req_s": rate, "agent_cpu": agent_cpu,
            "agent_us_per_req": agent_cpu * 1e6 / rate if rate else 0.0,
            "driver_cpu": driver_cpu, "driver_us_per_req": driver_cpu * 1e6 / rate if rate else 0.0}


def table(results: list[dict[str, float]], workers: list[int], spreads: list[int]) -> str:
    lines = ["| spread | workers | req/s (median) | rounds | x N the throughput of one | agent CPU "
             "| agent µs/req | driver CPU |",
             "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for spread in spreads:
        one = None
        for n in workers:
            rs = [r for r in results if r["workers"] == n and r["spread"] == spread]
            rate = statistics.median(r["req_s"] for r in rs)
            if n == 1:
                one = rate
            ratio = f"{rate / (n * one):.2f}" if one else "-"
            rounds = ", ".join(f"{r['req_s']:,.0f}" for r in rs)
            lines.append(
                f"| {spread}% | {n} | {rate:,.0f} | {rounds} "
                f"| {ratio} | {statistics.median(r['agent_cpu'] for r in rs):.2f} "
                f"| {statistics.median(r['agent_us_per_req'] for r in rs):.0f} "
                f"| {statistics.median(r['driver_cpu'] for r in rs):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--spread", type=int, nargs="+", default=[20],
                        help="percent of events sent over another connection (HAProxy 2.6: ~20)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--python", help="the interpreter whose installed spoe-agent to run")
    args = parser.parse_args(argv)
    if 1 not in args.workers:
        parser.error("--workers needs 1: the ratios are against one worker")
    if len(os.sched_getaffinity(0)) < max(args.workers):
        parser.error(f"--workers {max(args.workers)} needs as many cores; this process may use "
                     f"{len(os.sched_getaffinity(0))}")
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="worker-wallclock-") as tmp:
        workdir = Path(tmp)
        driver = build_driver(workdir)
        pool = workdir / "pool.bin"
        write_pool(pool)
        for r in range(args.rounds):
            for spread in args.spread:
                for n in args.workers:
                    m = measure(n, spread, args, driver, pool, workdir)
                    results.append(m)
                    print(f"round {r + 1}: spread {spread}%, {n} worker(s): {m['req_s']:,.0f} "
                          f"req/s, agent {m['agent_cpu']:.2f} CPU ({m['agent_us_per_req']:.0f} "
                          f"µs/req), driver {m['driver_cpu']:.2f} CPU", flush=True)
    print()
    print(table(results, args.workers, args.spread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
