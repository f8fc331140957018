"""Benchmark spoe-agent against spoe-forge 0.0.8 in one run and print a markdown table.

Each agent runs as a subprocess pinned to one core, the driver (:mod:`benchmarks.spop_load`, in
this process) to another, so the agent's CPU per ACK is not blurred by the driver's. Both agents
do the same minimal work (:mod:`benchmarks.apps`); with ``--rounds N`` they alternate, so drift
on the machine hits both, and the ratio uses each agent's median.

    python -m benchmarks.run_spop_bench --duration 10 --warmup 2 [--markdown FILE]
    python -m benchmarks.run_spop_bench --profile [/tmp/spop-bench-logs/spoe-agent.prof]

spoe-forge lives in its own venv (``--forge-python``) so that it cannot change ours; without it
the run covers spoe-agent alone and says how to install it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.spop_load import (  # noqa: E402
    DriverError,
    LoadResult,
    format_result,
    load_workload,
    run_load,
)

DEFAULT_FORGE_PYTHON = "/tmp/venv-forge/bin/python"
FORGE_VERSION = "0.0.8"
FORGE_INSTALL = (
    "python3 -m venv /tmp/venv-forge && "
    f"/tmp/venv-forge/bin/pip install --ignore-requires-python spoe-forge=={FORGE_VERSION}"
)
TARGET_RATIO = 3.0
# Issue 3: agent CPU per fully traced request, export on (8 NOTIFYs, 9 spans).
TRACED_TARGET_US = 250.0
NOTIFYS_PER_TRACED_REQUEST = 8
FORGE_WORKLOADS = ("minimal", "noargs")  # the ones benchmarks/apps.py's forge server answers


@dataclass
class Run:
    agent: str
    round: int
    result: LoadResult
    profiled: bool = False
    noisy: bool = False  # the rest of the machine used over --max-other-cpu during the run


# ------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pick_cores() -> tuple[int | None, int | None]:
    """(driver core, agent core): the last allowed core for the agent, the first for us."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return cores[0], cores[-1]


def clean_env() -> dict[str, str]:
    """No OTEL_* or agent settings leaking in from the caller's shell: runs must be comparable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SPOE_AGENT_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def start(argv: list[str], core: int | None, log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")

    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    try:
        return subprocess.Popen(
            argv, cwd=REPO_ROOT, env=clean_env(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, preexec_fn=pin, start_new_session=True,
        )
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM (spoe-agent shuts down cleanly and a profiler writes its file), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def wait_quiet(limit_pct: float, timeout: float) -> float:
    """Wait until the rest of the machine uses under ``limit_pct`` of a core (other sessions,
    test runs): a busy neighbour halves ACK/s on a 2-core box. Returns the last reading."""
    from benchmarks.spop_load import system_busy_seconds

    deadline = time.monotonic() + timeout
    while True:
        before = system_busy_seconds()
        time.sleep(1.0)
        busy = 100.0 * (system_busy_seconds() - before)
        if busy < limit_pct or time.monotonic() > deadline:
            return busy


def forge_python(path: str | None) -> tuple[str | None, str]:
    """The forge interpreter and spoe-forge's version, or (None, why not)."""
    path = path or (DEFAULT_FORGE_PYTHON if os.path.exists(DEFAULT_FORGE_PYTHON) else None)
    if path is None:
        return None, f"no {DEFAULT_FORGE_PYTHON}"
    if not os.path.exists(path):
        return None, f"no {path}"
    probe = subprocess.run(
        [path, "-c", "import spoe_forge, importlib.metadata as m; print(m.version('spoe-forge'))"],
        cwd="/", capture_output=True, text=True, timeout=60,
    )
    if probe.returncode != 0:
        return None, f"{path} cannot import spoe_forge: {probe.stderr.strip()[-300:]}"
    return path, probe.stdout.strip()


def profiler_argv(python: str, out: Path) -> list[str]:
    """pyinstrument when the agent's Python has it (sampling: less overhead), else cProfile."""
    has = subprocess.run([python, "-c", "import pyinstrument"], capture_output=True).returncode
    if has == 0:
        return [python, "-m", "pyinstrument", "-o", str(out.with_suffix(".txt")), "-r", "text"]
    return [python, "-m", "cProfile", "-o", str(out)]


# ------------------------------------------------------------------------------------ runs


def _spoe_agent_cmd(python: str, app: str, profile: Path | None,
                    extra: str = "") -> tuple[list[str], list[str]]:
    """(interpreter or profiler prefix, arguments); ``--bind 127.0.0.1:PORT`` comes last.

    ``app`` "tracing" means the default (tracing) agent; ``extra`` flags come after the defaults,
    so they win (``--exporter jaeger`` to include span export in a traced run)."""
    base = ["-m", "spoe_agent", "--log-level", "warning", "--exporter", "none"]
    if app != "tracing":
        base += ["--app", app]
    base += shlex.split(extra)
    prefix = profiler_argv(python, profile) if profile else [python]
    return prefix, base


def interpreter(python: str) -> str:
    """What a venv's python really is (the interpreter build matters: Debian's is PGO+LTO)."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys._base_executable, sys.version.split()[0])"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return python
    return f"{os.path.realpath(out[0])} {out[1]}"


# --------------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(runs: list[Run], args: argparse.Namespace, env: dict[str, str]) -> str:
    sequenced = any(run.result.sequenced for run in runs)  # some workloads always are
    mode = "sequenced" if sequenced else "pipelined"
    req_head, req_rule = (" requests/s |", "---:|") if sequenced else ("", "")
    lines = [
        f"Workload `{args.workload}`, {args.connections} connections x window {args.window} "
        f"({mode}), {args.duration:g} s measured after {args.warmup:g} s warm-up, "
        f"{args.rounds} round(s). {env['machine']}",
        "",
        f"| agent | round | ACK/s |{req_head} agent CPU us/ACK | agent CPU % | p50 us | p99 us "
        "| driver CPU % | other CPU % | errors |",
        f"|---|---|---:|{req_rule}---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        r = run.result
        name = run.agent + (" (profiled)" if run.profiled else "") + (" *" if run.noisy else "")
        req_cell = f" {_fmt(r.requests_per_s)} |" if sequenced else ""
        lines.append(
            f"| {name} | {run.round} | {_fmt(r.acks_per_s)} |{req_cell} "
            f"{_fmt(r.agent_cpu_us_per_ack, '.1f')} | {_fmt(r.agent_cpu_pct)} "
            f"| {_fmt(r.latency_us.get('p50'), '.0f')} "
            f"| {_fmt(r.latency_us.get('p99'), '.0f')} | {_fmt(r.driver_cpu_pct)} "
            f"| {_fmt(r.other_cpu_pct)} | {r.errors} |"
        )
    summary = summarize(runs)
    if summary:
        lines += ["", summary]
    if args.workload == "traced":
        lines += ["", *summarize_traced(runs)]
    if any(run.noisy for run in runs):
        lines += ["", f"\\* noisy: the rest of the machine used over {args.max_other_cpu:g}% of a "
                      "core during that run (other processes); its numbers are pessimistic."]
    if any(run.result.driver_saturated for run in runs):
        lines += ["", "**Driver saturated its core in at least one run: those ACK/s are a floor "
                      "set by the driver, not the agent's ceiling.**"]
    return "\n".join(lines)


def summarize_traced(runs: list[Run]) -> list[str]:
    """Agent CPU per traced request for each spoe-agent interpreter: the median, and the
    minimum, which is the best estimate of the code's own cost on a shared VM (noise only ever
    adds time), as ``timeit`` reads repeated timings."""
    lines = []
    for agent in dict.fromkeys(r.agent for r in runs if not r.profiled):
        per_request = [r.result.agent_cpu_us_per_ack * NOTIFYS_PER_TRACED_REQUEST
                       for r in runs if r.agent == agent and not r.profiled
                       and r.result.agent_cpu_us_per_ack is not None]
        if per_request:
            lines.append(
                f"{agent}: agent CPU per traced request median "
                f"**{statistics.median(per_request):.0f} µs**, min {min(per_request):.0f} µs, "
                f"max {max(per_request):.0f} µs over {len(per_request)} run(s) "
                f"(target <= {TRACED_TARGET_US:g} µs)."
            )
    return lines


def summarize(runs: list[Run]) -> str:
    """The ratio of medians, over the quiet runs when both agents have some (the first
    interpreter's spoe-agent runs when several were given)."""
    measured = [r for r in runs if not r.profiled]
    first = next((r.agent for r in measured if r.agent.startswith("spoe-agent")), "spoe-agent")
    measured = [r for r in measured if r.agent in (first, "spoe-forge")]
    quiet = [r for r in measured if not r.noisy]
    use_quiet = {r.agent for r in quiet} >= {first, "spoe-forge"}
    pool = quiet if use_quiet else measured

    def median(agent: str, attr: str) -> float | None:
        values = [getattr(r.result, attr) for r in pool if r.agent == agent]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    ours, theirs = median(first, "acks_per_s"), median("spoe-forge", "acks_per_s")
    if not ours or not theirs:
        return ""
    cpu_ours = median(first, "agent_cpu_us_per_ack")
    cpu_theirs = median("spoe-forge", "agent_cpu_us_per_ack")
    ratio = ours / theirs
    verdict = "meets" if ratio >= TARGET_RATIO else "falls short of"
    which = "quiet runs" if use_quiet and len(quiet) < len(measured) else "runs"
    text = (f"**Ratio spoe-agent / spoe-forge: {ratio:.2f}x ACK/s** (medians over {which}: "
            f"{ours:,.0f} vs {theirs:,.0f}); this {verdict} the {TARGET_RATIO:g}x target.")
    if cpu_ours and cpu_theirs:
        text += (f" CPU per ACK: {cpu_ours:.1f} us vs {cpu_theirs:.1f} us "
                 f"({cpu_theirs / cpu_ours:.2f}x less).")
    return text


def git_revision() -> str:
    """The commit measured, flagged when the work tree differs from it (numbers move with code)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "spoe_agent"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "(unknown revision)"
    return f"{head or '(unknown revision)'}{' + uncommitted spoe_agent/ changes' if dirty else ''}"


def environment(cores: tuple[int | None, int | None], forge_version: str | None) -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pin = (f"agent pinned to CPU {cores[1]}, driver to CPU {cores[0]}" if cores[0] is not None
           else "not pinned (fewer than 2 CPUs allowed)")
    machine = (f"spoe-agent {git_revision()}, Python {platform.python_version()}, "
               f"{os.cpu_count()} CPUs ({model}), {pin}; "
               f"spoe-forge {forge_version or 'not installed'}.")
    return {"machine": machine}


# ----------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", "-c", type=int, default=4)
    parser.add_argument("--window", "-w", type=int, default=20)
    parser.add_argument("--sequenced", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the agents N times")
    parser.add_argument("--workload", default="minimal",
                        help="driver workload: minimal (3 args), noargs, traced (the 8 "
                             "events of a request, reference config), or MODULE:ATTR; "
                             "spoe-forge only runs with the first two")
    parser.add_argument("--app", default=None,
                        help="spoe-agent app: MODULE:ATTR, or 'tracing' for the default agent "
                             "(default: tracing for --workload traced, else "
                             "benchmarks.apps:minimal_agent)")
    parser.add_argument("--agent-args", default="", metavar="FLAGS",
                        help="extra spoe-agent flags, e.g. \"--exporter jaeger\"")
    parser.add_argument("--agent-python", action="append", default=None,
                        help="Python running spoe-agent (default: this one); repeat it to "
                             "alternate interpreters round by round (e.g. a pyenv build and "
                             "Debian's /usr/bin/python3, PGO+LTO), each with spoe-agent installed")
    parser.add_argument("--forge-python", default=None,
                        help=f"Python with spoe-forge {FORGE_VERSION} (default "
                             f"{DEFAULT_FORGE_PYTHON} if it exists)")
    parser.add_argument("--skip-forge", action="store_true")
    parser.add_argument("--profile", type=Path, metavar="FILE", nargs="?",
                        const=Path("/tmp/spop-bench-logs/spoe-agent.prof"),
                        help="profile spoe-agent only (cProfile stats, or pyinstrument text if "
                             "installed); its numbers are then not comparable")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--json", type=Path, help="write every run's full result as JSON")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for the machine to go idle")
    parser.add_argument("--max-other-cpu", type=float, default=15.0, metavar="PCT",
                        help="a run during which the rest of the machine used more than PCT%% "
                             "of a core is noisy: retried (--retries), else marked in the table")
    parser.add_argument("--retries", type=int, default=0,
                        help="re-run a noisy run up to N times")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/spop-bench-logs"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM must unwind through the ``finally`` that stops the agent under test.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    driver_core, agent_core = cores = pick_cores()
    if driver_core is not None:
        os.sched_setaffinity(0, {driver_core})

    forge: str | None = None
    forge_version: str | None = None
    if not args.skip_forge and not args.profile and args.workload in FORGE_WORKLOADS:
        forge, why = forge_python(args.forge_python)
        if forge is None:
            print(f"spoe-forge not available ({why}); running spoe-agent alone.\n"
                  f"To compare, install it in its own venv:\n    {FORGE_INSTALL}\n",
                  file=sys.stderr)
        else:
            forge_version = why
            if forge_version != FORGE_VERSION:
                print(f"warning: spoe-forge {forge_version}, not {FORGE_VERSION}", file=sys.stderr)

    if args.profile:
        args.profile.parent.mkdir(parents=True, exist_ok=True)
    if args.app is None:
        args.app = "tracing" if args.workload == "traced" else "benchmarks.apps:minimal_agent"
    pythons = args.agent_python or [sys.executable]
    agents: list[tuple[str, list[str], list[str] | None]] = []
    for python in pythons:
        prefix, base = _spoe_agent_cmd(python, args.app, args.profile, args.agent_args)
        name = "spoe-agent" if len(pythons) == 1 else f"spoe-agent [{interpreter(python)}]"
        agents.append((name, base + ["--bind"], prefix))
    runs: list[Run] = []
    for round_no in range(1, args.rounds + 1):
        contenders = list(agents)
        if forge:
            contenders.append(("spoe-forge", [forge, "benchmarks/apps.py", "forge", "--port"],
                               None))
        for name, cmd, pre in contenders:
            attempts: list[Run] = []
            for attempt in range(1, args.retries + 2):
                run = _bench(name, cmd, pre, args, cores, round_no)
                attempts.append(run)
                print(f"[{name} round {round_no}, attempt {attempt}]\n"
                      f"{format_result(run.result)}\n", file=sys.stderr)
                if not run.noisy:
                    break
            # All noisy: keep the attempt the rest of the machine disturbed least.
            runs.append(min(attempts, key=lambda r: r.result.other_cpu_pct or 0.0))

    if args.profile or args.skip_forge or args.workload not in FORGE_WORKLOADS:
        forge_version = "not run"
    table = markdown(runs, args, environment(cores, forge_version))
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(
            [{"agent": r.agent, "round": r.round, "profiled": r.profiled,
              **r.result.to_dict()} for r in runs], indent=2) + "\n")
    if args.profile:
        print_profile(args.profile)
    return 1 if any(r.result.errors for r in runs) else 0


def _bench(name: str, cmd: list[str], prefix: list[str] | None, args: argparse.Namespace,
           cores: tuple[int | None, int | None], round_no: int) -> Run:
    """Start one agent on a fresh port, drive it, stop it (``cmd`` ends with the port flag)."""
    if args.wait_quiet:
        busy = wait_quiet(args.max_other_cpu, args.wait_quiet)
        if busy >= args.max_other_cpu:
            print(f"warning: machine still {busy:.0f}% busy before {name}", file=sys.stderr)
    port = free_port()
    if name.startswith("spoe-agent"):
        argv = list(prefix or []) + cmd + [f"127.0.0.1:{port}"]
    else:
        argv = cmd + [str(port)]
    log = args.logs / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', name).strip('_')}-round{round_no}.log"
    proc = start(argv, cores[1], log)
    try:
        result = run_load(
            ("127.0.0.1", port), workload=load_workload(args.workload),
            connections=args.connections, window=args.window, duration=args.duration,
            warmup=args.warmup, sequenced=args.sequenced, agent_pid=proc.pid,
        )
    except DriverError as exc:
        stop(proc)
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name}: {exc}\n--- {log} ---\n{tail}") from None
    finally:
        stop(proc)
    other = result.other_cpu_pct
    return Run(name, round_no, result, profiled=name.startswith("spoe-agent") and bool(args.profile),
               noisy=other is not None and other > args.max_other_cpu)


def print_profile(path: Path, top: int = 30) -> None:
    """The hot spots, both ways: cumulative (where to look) and own time (what to optimise)."""
    text = path.with_suffix(".txt")
    if text.exists() and not path.exists():
        print(text.read_text()[:20000])
        return
    if not path.exists():
        print(f"no profile written at {path}", file=sys.stderr)
        return
    import pstats

    for key in ("cumulative", "tottime"):
        print(f"\n=== {path} by {key} ===")
        pstats.Stats(str(path)).sort_stats(key).print_stats(top)


if __name__ == "__main__":
    raise SystemExit(main())
