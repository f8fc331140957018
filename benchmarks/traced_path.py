"""Where a traced request's CPU goes, counted in instructions rather than timed.

Timings on a shared 2-core VM swing by tens of percent with whatever else runs; callgrind's
instruction counts do not (the same count twice, whatever the other core does). This replays the
reference config's 8 NOTIFYs per request (benchmarks.spop_load.traced_request) through the
sans-IO connection, the tracing agent and the Jaeger exporter, in one process with no sockets
but the exporter's UDP one, and reports instructions per request for four cumulative stages:

* ``decode``: frames parsed, messages decoded, an empty ACK encoded for each NOTIFY;
* ``language``: + the span language compiling each message;
* ``registry``: + the session registry applying them (spans built and queued, not exported);
* ``export``: + the Jaeger export of the queued spans (translation, compact thrift, sendto).

Each stage is the difference between a run of ``--requests`` requests and a run that only sets
up (imports, the agent, the pre-encoded frames and a warm-up), so start-up cost cancels out.

    python -m benchmarks.traced_path [--requests 300] [--stages decode language registry export]
        [--python /tmp/venv-mypyc/bin/python]

``--python`` measures the spoe-agent installed for another interpreter, such as the build
compiled with mypyc (``SPOE_AGENT_MYPYC=1 pip install .``, see setup.py), instead of this tree.

Needs valgrind (Debian's package). ``--inner STAGE N`` is the process callgrind runs.
"""

from __future__ import annotations

import argparse
import gc
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("decode", "language", "registry", "export")
WARMUP_REQUESTS = 50


def _inner(stage: str, requests: int, built: int) -> None:
    """The measured process: set up (encoding ``built`` requests' frames, whatever is
    replayed, so that encoding them cancels out), warm up, then replay ``requests``."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    # Appended: spoe_agent is the one installed for this interpreter (the tree's own when it
    # runs from the dev venv's editable install, a compiled build in another venv).
    sys.path.append(str(REPO_ROOT))
    from benchmarks.spop_load import haproxy_hello, traced_request
    from spoe_agent.config import AgentConfig
    from spoe_agent.protocol.connection import NotifyReceived, SpopConnection
    from spoe_agent.tracing.agent import TracingAgent
    from spoe_agent.tracing.language import parse_message

    # The sink, in the configuration itself: AgentConfig() reads no environment, and its
    # default, localhost:6831, had no one there (the exports "worked" only until a closed
    # port's refusals counted as failures).
    # The background loop must not export on its own: the stage decides what is exported. Its
    # first wake-up is set from the configuration when it starts: a delay set on the processor
    # afterwards came too late, and a replay slower than 0.5 s (a loaded machine) had the loop
    # take spans while the stage exported the rest ("exported 34 spans" once).
    agent = TracingAgent(AgentConfig(jaeger_agent_host="127.0.0.1",
                                     jaeger_agent_port=sink.getsockname()[1],
                                     export_delay=1e9))
    processor = agent.processor
    assert processor is not None
    processor.max_export_batch_size = 1 << 30
    processor._wake_at = 1 << 30  # nor encode as spans end
    conn = SpopConnection()
    conn.receive_data(haproxy_hello("traced-path"))
    conn.data_to_send()
    level = STAGES.index(stage)

    deferred: list[Any] = []

    def replay(batch: list[list[bytes]]) -> None:
        for frames in batch:
            for frame in frames:
                for event in conn.receive_data(frame):
                    if type(event) is not NotifyReceived:
                        raise RuntimeError(f"unexpected event {event!r}")
                    if level == 0:
                        conn.send_ack(event.stream_id, event.frame_id, None)
                    elif level == 1:
                        for message in event.messages:
                            parse_message(message)
                        conn.send_ack(event.stream_id, event.frame_id, None)
                    else:  # as the server does it: ACK first, deferred work after
                        now, later = agent.prepare(event.messages)
                        if now is not None:
                            for work in deferred:
                                work()
                            deferred.clear()
                        conn.send_ack(event.stream_id, event.frame_id, now and now())
                        if later is not None:
                            deferred.append(later)
                conn.data_to_send()
                for work in deferred:
                    work()
                deferred.clear()
        queue = processor._queue
        spans = [queue.popleft() for _ in range(len(queue))]
        if level == 3:
            for start in range(0, len(spans), 512):
                processor._export_batch(spans[start:start + 512])

    pool = [traced_request(i) for i in range(WARMUP_REQUESTS + built)]
    gc.collect()
    replay(pool[:WARMUP_REQUESTS])
    replay(pool[WARMUP_REQUESTS:WARMUP_REQUESTS + requests])
    if level >= 2 and len(agent.registry) != 0:
        raise RuntimeError(f"{len(agent.registry)} sessions left open: the replay is broken")
    if level == 3:
        exported = processor.stats.exported
        if exported != 9 * (WARMUP_REQUESTS + requests):
            raise RuntimeError(f"exported {exported} spans, expected 9 per request")


def _instructions(stage: str, requests: int, built: int, python: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        # Run as a script from elsewhere, so that the tree does not shadow what is installed.
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python,
             str(Path(__file__).resolve()), "--inner", stage, str(requests), str(built)],
            cwd=tmp, capture_output=True, text=True, check=False,
        )
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"callgrind run failed ({stage}, {requests}):\n{proc.stderr[-2000:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES))
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose spoe-agent is measured (default: this one)")
    parser.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        _inner(args.inner[0], int(args.inner[1]), int(args.inner[2]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is needed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    from benchmarks.haproxy_e2e import installed_build, interpreter

    args.python = interpreter(args.python)
    previous = 0
    build = installed_build(args.python) or "no spoe-agent installed"
    print(f"instructions per traced request ({args.requests} requests, 8 NOTIFYs, 9 spans each; "
          f"spoe-agent for {args.python}: {build})")
    for stage in args.stages:
        base = _instructions(stage, 0, args.requests, args.python)
        total = _instructions(stage, args.requests, args.requests, args.python)
        per_request = (total - base) // args.requests
        added = f"  (+{per_request - previous:,} for {stage})" if previous else ""
        print(f"  up to {stage:<9} {per_request:>11,}{added}")
        previous = per_request
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
