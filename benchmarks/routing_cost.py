"""What forwarding a command to its owner worker costs, apart from HAProxy and the network.

Two processes with a real :class:`~spoe_agent.workers.mesh.PeerMesh` each: the owner receives
the first message of each reference request (devenv/conf/spoe.cfg: 10 messages, one inject), so
it owns the session; the other routes the rest of the request's compiled commands, which the
owner applies to a real registry (spans discarded). Printed:
CPU microseconds per forwarded command on each side, against applying the same command locally.

* ``streaming``: the forwarder sends back to back, so the owner drains many per wake-up;
* ``paced``: a pause after each request, so every command finds the owner idle and pays a
  wake-up (the worst case, and the common one on a lightly loaded agent).

    python -m benchmarks.routing_cost [--requests 20000]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import gevent  # noqa: E402

from spoe_agent.protocol.types import Message  # noqa: E402
from spoe_agent.tracing.language import Command, parse_message  # noqa: E402
from spoe_agent.workers.mesh import PeerMesh  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reference_request(uid: str, ts: int) -> list[Command]:
    """The reference config's ten messages for one request, compiled."""
    def m(name: str, *args: tuple[str, object]) -> Message:
        return Message(name, [("id", uid), ("ts", ts), *args])

    messages = [
        m("client-session", ("span", "HAProxy session"), ("kind", "server"),
          ("tag", "client.address"), ("", "192.0.2.7"), ("tag", "haproxy.frontend"), ("", "fe"),
          ("span", "Client session"), ("child-of", "HAProxy session")),
        m("fe-tcp", ("span", "Frontend TCP request"), ("child-of", "Client session")),
        m("fe-http", ("traceparent", None), ("span", "Frontend HTTP request"),
          ("follows-from", "Frontend TCP request"), ("finish", "Frontend TCP request"),
          ("span", "HAProxy session"), ("tag", "http.request.method"), ("", "GET"),
          ("tag", "url.path"), ("", f"/items/{uid}")),
        m("be-tcp", ("span", "Backend TCP request"), ("follows-from", "Frontend HTTP request"),
          ("finish", "Frontend HTTP request")),
        m("be-http", ("span", "Backend HTTP request"), ("follows-from", "Backend TCP request"),
          ("kind", "client"), ("finish", "Backend TCP request"),
          ("inject", "Backend HTTP request")),
        m("srv", ("span", "Server session"), ("child-of", "HAProxy session"),
          ("finish", "Backend HTTP request")),
        m("tcp-rsp", ("span", "TCP response"), ("child-of", "Server session")),
        m("http-rsp", ("span", "HTTP response"), ("follows-from", "TCP response"),
          ("tag", "http.response.status_code"), ("", 200), ("finish", "TCP response")),
        m("end", ("span", "HAProxy session"), ("finish", "HTTP response"),
          ("finish", "Server session"), ("finish", "Client session"), ("finish", "*")),
    ]
    return [c for c in (parse_message(msg) for msg in messages) if c is not None]


def requests_for(count: int) -> list[list[Command]]:
    ts = time.time_ns() // 1000
    return [reference_request(f"{i:08x}-0000-4000-8000-{i:012x}", ts) for i in range(count)]


def new_registry():  # type: ignore[no-untyped-def]
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    from spoe_agent.tracing.pipeline import Resources
    from spoe_agent.tracing.propagation import build_propagator
    from spoe_agent.tracing.registry import SessionRegistry

    return SessionRegistry(lambda span: None, propagator=build_propagator("tracecontext"),
                           sampler=ALWAYS_ON, resource_for_service=Resources(),
                           default_service="bench")


def run(mode: str, count: int) -> tuple[float, float, float]:
    """(local apply, forwarder, owner) CPU microseconds per command."""
    runtime = tempfile.mkdtemp(prefix="spoe-route-", dir="/tmp")
    work = requests_for(count)
    commands = sum(len(r) - 1 for r in work)  # the first of each is the owner's own
    pause = 0.0005 if mode == "paced" else 0.0
    read, write = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the owner
        os.close(read)
        reg = new_registry()
        mesh = PeerMesh(1, 2, runtime, reg)
        mesh.start()
        reg.apply(reference_request("warm-up", 1)[0])  # builds the cached Resource
        for request in work:  # the first events: the sessions are this worker's
            mesh.route(request[0])
        os.write(ready_write, b"1")
        start = cpu()
        while mesh.counters()["received"] < commands:
            gevent.sleep(0.005)
        used = cpu() - start
        os.write(write, f"{used}".encode())
        mesh.stop()
        os._exit(0)
    os.close(write)
    mesh = PeerMesh(0, 2, runtime, new_registry())
    mesh.start()
    # Baseline: the same commands applied where they arrived.
    reg = new_registry()
    local = requests_for(min(count, 5000))
    start = cpu()
    for request in local:
        for command in request:
            reg.apply(command)
    local_us = (cpu() - start) / sum(len(r) for r in local) * 1e6

    os.set_blocking(ready_read, False)
    while True:  # waits without blocking the hub: this mesh must drain the announcements
        try:
            if os.read(ready_read, 1):
                break
        except BlockingIOError:
            pass
        gevent.sleep(0.01)
    mesh.pump()  # learns which sessions the owner holds
    start = cpu()
    for n, request in enumerate(work):
        for command in request[1:]:
            mesh.route(command)
        if pause:
            gevent.sleep(pause)
        elif n % 32 == 0:
            gevent.sleep(0)
    forwarder = cpu() - start
    owner = float(os.read(read, 64).decode())
    os.waitpid(pid, 0)
    mesh.stop()
    return local_us, forwarder / commands * 1e6, owner / commands * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args(argv)
    print("| mode | apply locally us/cmd | forwarder us/cmd | owner us/cmd |")
    print("|---|---:|---:|---:|")
    for mode in ("streaming", "paced"):
        count = args.requests if mode == "streaming" else max(1000, args.requests // 10)
        local, fwd, own = run(mode, count)
        print(f"| {mode} | {local:.1f} | {fwd:.1f} | {own:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
