"""Memory per open session: 100,000 requests stopped halfway, as a slow backend would leave them.

Each session gets the first four events of the reference configuration (devenv/conf/spoe.cfg:
client session, frontend TCP request, frontend HTTP request with its tags and an incoming
traceparent, backend TCP request), so it holds what a real in-flight request holds: five span
records, two of them already emitted, its trace context, the root span's tags.

Two measurements:

* ``registry``: in this process, commands decoded from real NOTIFY frames and applied to a
  SessionRegistry: tracemalloc's count of the bytes the sessions keep, the same with each
  block rounded up to 16 bytes as pymalloc hands it out (what RSS sees), and the RSS growth;
* ``agent``: the real agent (``--workers N``) fed the same NOTIFYs over SPOP; each worker's RSS
  and its open sessions, from /proc and /metrics.

    python -m benchmarks.session_memory --sessions 100000 [--workers 1 2]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import re
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.spop_load import handshake  # noqa: E402
from spoe_agent.protocol import codec  # noqa: E402
from spoe_agent.protocol.types import Message  # noqa: E402
from spoe_agent.tracing.language import parse_message  # noqa: E402

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# Every session from its own client address (the worst case for the agent's address-text
# cache), within 10.0.0.0/8.
_SRC_BASE = int(ipaddress.IPv4Address("10.0.0.1"))


def first_events(uid: str, i: int, ts_us: int) -> list[list[Message]]:
    """The NOTIFYs (message lists) of the first four events, as spoe.cfg defines them."""
    src = ipaddress.IPv4Address(_SRC_BASE + i)
    return [
        [Message("trace-client-session", [
            ("id", uid), ("ts", ts_us), ("service", "haproxy-edge"),
            ("span", "HAProxy session"), ("kind", "server"),
            ("tag", "client.address"), ("", src),
            ("tag", "network.peer.address"), ("", src),
            ("tag", "network.peer.port"), ("", 40000 + i % 20000),
            ("tag", "haproxy.frontend"), ("", "traced"),
            ("span", "Client session"), ("child-of", "HAProxy session"),
        ])],
        [Message("trace-frontend-tcp-request", [
            ("id", uid), ("ts", ts_us + 40),
            ("span", "Frontend TCP request"), ("child-of", "Client session"),
        ])],
        [Message("trace-frontend-http-request", [
            ("id", uid), ("ts", ts_us + 120),
            ("traceparent", TRACEPARENT), ("tracestate", None), ("baggage", None),
            ("span", "Frontend HTTP request"), ("follows-from", "Frontend TCP request"),
            ("finish", "Frontend TCP request"),
            ("span", "HAProxy session"),
            ("tag", "http.request.method"), ("", "GET"),
            ("tag", "url.path"), ("", f"/api/v1/items/{i}"),
            ("tag", "url.query"), ("", "page=2&sort=desc"),
            ("tag", "url.scheme"), ("", "http"),
            ("tag", "server.address"), ("", "shop.example.com"),
            ("tag", "network.protocol.version"), ("", "1.1"),
            ("tag", "user_agent.original"), ("", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
        ])],
        [Message("trace-backend-tcp-request", [
            ("id", uid), ("ts", ts_us + 200),
            ("span", "Backend TCP request"), ("follows-from", "Frontend HTTP request"),
            ("finish", "Frontend HTTP request"),
        ])],
    ]


def notify_frames(sessions: int) -> list[bytes]:
    """Wire NOTIFYs, events in order per session; stream ids distinct so ACKs can be matched."""
    ts = time.time_ns() // 1000
    frames = []
    for i in range(sessions):
        uid = str(uuid.UUID(int=i + 1))
        for n, messages in enumerate(first_events(uid, i, ts)):
            frames.append(codec.notify(i + 1, n + 1, messages))
    return frames


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -------------------------------------------------------------------------------- registry


def _registry(sessions: int) -> Any:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    from spoe_agent.tracing.pipeline import Resources
    from spoe_agent.tracing.propagation import build_propagator
    from spoe_agent.tracing.registry import SessionRegistry

    return SessionRegistry(
        lambda span: None,
        propagator=build_propagator("tracecontext,baggage"),
        sampler=ParentBased(ALWAYS_ON),
        resource_for_service=Resources(),
        default_service="haproxy",
        max_sessions=sessions + 1,
        ttl_s=3600,
    )


def _open(registry: Any, frames: list[bytes]) -> None:
    """Decode the NOTIFYs and apply what they compile to, as the agent does."""
    for frame in frames:
        for message in codec.decode_messages(codec.decode_frame(frame[4:]).payload):
            command = parse_message(message)
            if command is not None:
                registry.apply(command)


def _in_blocks() -> int:
    """What tracemalloc holds, each block rounded up to 16 bytes as pymalloc hands it out."""
    return sum(-(-trace.size // 16) * 16 for trace in tracemalloc.take_snapshot().traces)


def measure_registry(sessions: int) -> dict[str, float]:
    reg = _registry(sessions)
    frames = notify_frames(sessions)
    gc.collect()
    rss0 = rss_kib()
    tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0]
    _open(reg, frames)
    del frames  # what stays is what the sessions hold
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced0
    rounded = _in_blocks()
    tracemalloc.stop()
    rss = rss_kib() - rss0
    assert len(reg) == sessions, len(reg)
    return {"sessions": sessions, "traced_bytes_per_session": traced / sessions,
            "rounded_bytes_per_session": rounded / sessions,
            "rss_kib": rss, "rss_bytes_per_session": rss * 1024 / sessions}


def measure_marginal(warm: int, sessions: int) -> dict[str, float]:
    """What each of ``sessions`` more open sessions adds, after ``warm`` opened first (the
    decoder's and the language's caches full, as in a running agent): bytes asked for, and
    in 16-byte blocks as pymalloc hands them out. Cheap enough for a test."""
    registry = _registry(warm + sessions)
    frames = notify_frames(warm + sessions)
    split = 4 * warm  # first_events: four NOTIFYs per session
    tracemalloc.start()
    try:
        _open(registry, frames[:split])
        gc.collect()
        asked0, blocks0 = tracemalloc.get_traced_memory()[0], _in_blocks()
        _open(registry, frames[split:])
        del frames
        gc.collect()
        asked, blocks = tracemalloc.get_traced_memory()[0], _in_blocks()
    finally:
        tracemalloc.stop()
    assert len(registry) == warm + sessions, len(registry)
    return {"bytes_per_session": (asked - asked0) / sessions,
            "blocks_bytes_per_session": (blocks - blocks0) / sessions}


# ----------------------------------------------------------------------------------- agent


def measure_agent(sessions: int, workers: int, connections: int = 8,
                  window: int = 64, warm: float = 0.1) -> dict[str, object]:
    """Feed the running agent every session's first events and read each worker's RSS: its
    growth from start-up, and what each session after the first ``warm`` fraction added.

    The two differ by what a worker allocates once, on its first requests (its caches, and
    pymalloc's arenas of 1 MiB): spread over 12,500 sessions, as in each of eight workers
    sharing 100,000, a few hundred bytes a session that no further session costs. The
    per-session budget is about the second number, the per-worker RSS one about both."""
    from benchmarks.haproxy_e2e import clean_env, free_port, process_tree, wait_port

    # With several workers the supervisor serves PORT and worker i serves PORT + 1 + i.
    port, metrics = free_port(), _free_range(workers + (workers > 1))
    worker_metrics = [metrics + i + (workers > 1) for i in range(workers)]
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "agent.ini"
        # The cap is the agent's total (each of N workers holds cap/N): room for all of them.
        ini.write_text(f"[tracing]\nmax_sessions = {sessions}\nsession_ttl = 1h\n"
                       "exporter = none\n[logging]\nlevel = warning\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "spoe_agent", "-c", str(ini), "--bind", f"127.0.0.1:{port}",
             "--workers", str(workers), "--metrics", f"127.0.0.1:{metrics}"],
            cwd=REPO_ROOT, env=clean_env(), stdin=subprocess.DEVNULL)
        try:
            wait_port(port, proc)
            for worker_port in worker_metrics:
                wait_port(worker_port, proc)
            pids = [p for p in process_tree(proc.pid) if p != proc.pid] or [proc.pid]
            index = {0: pids[0]} if workers == 1 else {_worker_index(p): p for p in pids}
            before = _settled(pids)
            frames = notify_frames(sessions)
            split = 4 * int(sessions * warm)  # first_events: four NOTIFYs per session
            _feed(port, frames[:split], connections, window)
            time.sleep(1.0)
            warmed = {pid: rss_kib(pid) for pid in pids}
            opened_warm = [_open_sessions(worker_port) for worker_port in worker_metrics]
            _feed(port, frames[split:], connections, window)
            del frames
            time.sleep(1.0)
            after = {pid: rss_kib(pid) for pid in pids}
            opened = [_open_sessions(worker_port) for worker_port in worker_metrics]
        finally:
            proc.terminate()
            proc.wait(60)
    return {
        "workers": workers,
        "sessions": sum(opened),
        "per_worker": [
            {"sessions": opened[i], "rss_mib": after[index[i]] / 1024,
             "bytes_per_session": (after[index[i]] - before[index[i]]) * 1024
             / max(1, opened[i]),
             "marginal_bytes_per_session": (after[index[i]] - warmed[index[i]]) * 1024
             / max(1, opened[i] - opened_warm[i])}
            for i in range(workers)
        ],
    }


def _settled(pids: list[int], timeout: float = 30.0) -> dict[int, int]:
    """Each process's RSS once it stopped moving: a worker's port opens before it has finished
    starting (on 2 cores, eight workers still import and allocate for a second or more), and
    what it allocates then is no session's."""
    deadline = time.monotonic() + timeout
    rss = {pid: rss_kib(pid) for pid in pids}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = {pid: rss_kib(pid) for pid in pids}
        if now == rss:
            break
        rss = now
    return rss


def _worker_index(pid: int) -> int:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    positions = [i for i, arg in enumerate(argv) if arg == b"--worker-index"]
    return int(argv[positions[-1] + 1])


def _feed(port: int, frames: list[bytes], connections: int, window: int) -> None:
    """Send every frame, ``window`` outstanding per connection, each session's events on one
    connection (session i on connection i % C), each event only after the previous one of its
    session was ACKed."""
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        handshake(sock, str(uuid.uuid4()))
        socks.append(sock)
    # Event n of every session is sent only once every event n-1 has been ACKed: simple, and
    # it keeps each session's order whatever connection carries what.
    per_event = [frames[n::4] for n in range(4)]
    for batch in per_event:
        for c, sock in enumerate(socks):
            mine = batch[c::connections]
            for start in range(0, len(mine), window):
                chunk = mine[start:start + window]
                sock.sendall(b"".join(chunk))
                _read_acks(sock, len(chunk))
    for sock in socks:
        sock.close()


def _read_acks(sock: socket.socket, count: int) -> None:
    buf = b""
    while count:
        data = sock.recv(1 << 20)
        if not data:
            raise RuntimeError("agent closed the connection")
        buf += data
        while len(buf) >= 4:
            size = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + size:
                break
            buf = buf[4 + size:]
            count -= 1


def _open_sessions(port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    match = re.search(rb"^spoe_agent_sessions_open (\S+)", text, re.M)
    return int(float(match.group(1))) if match else -1


def _free_range(count: int) -> int:
    import random

    for _ in range(100):
        base = random.randrange(20000, 32000 - count)
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args(argv)
    reg = measure_registry(args.sessions)
    print(f"registry: {reg['sessions']:,} open sessions, "
          f"{reg['traced_bytes_per_session']:,.0f} B/session allocated (tracemalloc), "
          f"{reg['rounded_bytes_per_session']:,.0f} B in 16-byte blocks, "
          f"{reg['rss_bytes_per_session']:,.0f} B/session RSS growth")
    for workers in args.workers:
        result = measure_agent(args.sessions, workers)
        for i, w in enumerate(result["per_worker"]):  # type: ignore[union-attr]
            print(f"agent --workers {workers}, worker {i}: {w['sessions']:,} open sessions, "
                  f"RSS {w['rss_mib']:.0f} MiB, {w['bytes_per_session']:,.0f} B/session "
                  f"from start-up, {w['marginal_bytes_per_session']:,.0f} B/session after "
                  f"the first 10%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
