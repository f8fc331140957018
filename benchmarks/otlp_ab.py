"""OTLP export A/B: the SDK's exporter (a batch encoded in one go) against the sliced one.

Both agents run in turn against a local collector that answers 200, driven by ``spop_load``'s
traced workload; the table in benchmarks/README.md ("OTLP export") came from::

    python -m benchmarks.otlp_ab --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run before the CLI: the agent then builds the SDK's exporter where it builds its own.
_SDK = ("import spoe_agent.tracing.otlp as o\n"
        "from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter\n"
        "o.SlicedOTLPSpanExporter = OTLPSpanExporter\n")
_MAIN = "import sys\nfrom spoe_agent.cli import main\nsys.exit(main(sys.argv[1:]))\n"


class _Collector(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_one(variant: str, endpoint: str, duration: float) -> dict[str, object]:
    port = _free_port()
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}
    code = (_SDK if variant == "sdk" else "") + _MAIN
    agent = subprocess.Popen([sys.executable, "-c", code, "--bind", f"127.0.0.1:{port}",
                              "--workers", "1"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the agent did not start") from None
                time.sleep(0.1)
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.spop_load", "--connect", f"127.0.0.1:{port}",
             "-c", "2", "-w", "4", "--sequenced", "--workload", "traced",
             "--duration", str(duration), "--warmup", "2", "--json"],
            cwd=REPO, capture_output=True, text=True, check=True)
        result: dict[str, object] = json.loads(out.stdout)
        return result
    finally:
        agent.terminate()
        agent.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    print("| round | exporter | ACK/s | ACK p99 µs | ACK max µs | request p99 µs |")
    print("|---:|---|---:|---:|---:|---:|")
    for round_ in range(1, args.rounds + 1):
        for variant in ("sdk", "sliced"):
            r = run_one(variant, endpoint, args.duration)
            ack, req = r["latency_us"], r["request_latency_us"]
            print(f"| {round_} | {variant} | {r['acks_per_s']:,.0f} | {ack['p99']:,.0f} "  # type: ignore[index]
                  f"| {ack['max']:,.0f} | {req['p99']:,.0f} |", flush=True)  # type: ignore[index]
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
