"""``python -m spoe_agent.viewer``: print every finished trace as a tree, optionally as JSON lines.

Listens like jaeger-agent (UDP compact thrift) and jaeger-collector (HTTP binary thrift); a trace
is printed once no span has arrived for it for ``--quiet-s``.  SIGINT/SIGTERM print what is still
pending and exit 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import IO

from spoe_agent.viewer.receiver import JaegerReceiver, ReceivedSpan
from spoe_agent.viewer.render import render_trace, to_json


def _address(text: str) -> tuple[str, int]:
    """HOST:PORT (``[v6]:PORT`` for IPv6); an empty host means all IPv4 interfaces."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:  # 99999 ended in a traceback
        raise argparse.ArgumentTypeError(f"bad port in {text!r}: a number from 0 to 65535")
    return host, int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, such as 1 or 0.5, got {text!r}") \
            from None
    if not 0 <= value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected seconds, 0 or more, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spoe_agent.viewer",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    parser.add_argument(
        "--udp",
        type=_address,
        default=("127.0.0.1", 6831),
        metavar="HOST:PORT",
        help="jaeger-agent compact thrift listener (default 127.0.0.1:6831)",
    )
    parser.add_argument(
        "--http",
        type=_address,
        default=("127.0.0.1", 14268),
        metavar="HOST:PORT",
        help="jaeger-collector /api/traces listener (default 127.0.0.1:14268)",
    )
    parser.add_argument("--no-udp", action="store_true", help="do not listen on UDP")
    parser.add_argument("--no-http", action="store_true", help="do not listen on HTTP")
    parser.add_argument("--jsonl", metavar="FILE", help="also append each trace as a JSON line")
    parser.add_argument(
        "--quiet-s",
        type=_seconds,
        default=1.0,
        help="a trace is complete after this long without new spans (default 1); spans an "
             "agent's session_ttl ended arrive that long later and print as more of a trace "
             "printed above, unless this is longer",
    )
    return parser


_PRINTED_LIMIT = 100_000


class _Printer:
    """Writes finished traces; called from the receiver's thread, one trace at a time."""

    def __init__(self, out: IO[str], jsonl: IO[str] | None) -> None:
        self.out = out
        self.jsonl = jsonl
        self._lock = threading.Lock()
        # Spans a session TTL ended arrive long after the rest of their trace (30 s by
        # default), and print as a trace of their own: say it is the same one, continued.
        self._printed: dict[str, None] = {}

    def __call__(self, trace: list[ReceivedSpan]) -> None:
        with self._lock:
            text = render_trace(trace)
            trace_id = trace[0].trace_id if trace else ""
            if trace_id in self._printed:
                head, _, rest = text.partition("\n")
                text = f"{head} (more of a trace printed above)\n{rest}"
            elif trace_id:
                if len(self._printed) >= _PRINTED_LIMIT:
                    del self._printed[next(iter(self._printed))]
                self._printed[trace_id] = None
            self.out.write(text + "\n\n")
            self.out.flush()
            if self.jsonl is not None:
                entry = to_json(trace)
                try:
                    line = json.dumps(entry, sort_keys=True)
                except TypeError:  # keys that do not sort (a tag without a key beside others)
                    line = json.dumps(entry)
                self.jsonl.write(line + "\n")
                self.jsonl.flush()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.no_udp and args.no_http:
        parser.error("--no-udp and --no-http together leave nothing to listen on")
    from spoe_agent.logs import setup_logging

    setup_logging("INFO")  # and its rate limit: a storm of bad datagrams is a line per 10 s
    try:
        jsonl = open(args.jsonl, "a", encoding="utf-8") if args.jsonl else None  # noqa: SIM115
    except OSError as exc:
        parser.error(f"cannot open --jsonl {args.jsonl}: {exc.strerror or exc}")
    receiver = JaegerReceiver(
        None if args.no_udp else args.udp,
        None if args.no_http else args.http,
        quiet_s=args.quiet_s,
        on_trace=_Printer(sys.stdout, jsonl),
        keep_spans=False,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        receiver.start()
    except OSError as exc:
        print(f"cannot listen: {exc.strerror or exc}", file=sys.stderr)
        if jsonl is not None:
            jsonl.close()
        return 1
    listening = []
    if receiver.udp_address:
        host, port = receiver.udp_address
        listening.append(f"udp {host}:{port}")
    if receiver.http_address:
        host, port = receiver.http_address
        listening.append(f"http {host}:{port}/api/traces")
    print("trace viewer listening on " + ", ".join(listening), file=sys.stderr, flush=True)
    reported = 0
    try:
        while not stop.wait(0.5):
            reported = _report_drops(receiver, reported)
    finally:
        receiver.stop(flush=True)
        _report_drops(receiver, reported)
        if jsonl is not None:
            jsonl.close()
    return 0


def _report_drops(receiver: JaegerReceiver, reported: int) -> int:
    """Say when the kernel dropped datagrams this viewer read too slowly: the traces printed
    then lack spans the agent did send, which would otherwise read as the agent's fault (a
    black-box run: ~600k datagrams dropped at 3,300 traced requests/s, nothing said)."""
    drops = receiver.kernel_drops
    if drops > reported:
        print(f"viewer: the kernel dropped {drops - reported} datagrams ({drops} in all) that "
              "this viewer read too slowly: traces printed around now lack spans the agent "
              "sent (its spoe_agent_spans_exported_total counts them)", file=sys.stderr,
              flush=True)
    return drops


if __name__ == "__main__":
    raise SystemExit(main())
