"""A SPOP load driver that plays HAProxy 2.6 against an agent and measures it.

It opens C connections, does HAProxy's HELLO on each, then keeps W NOTIFYs in flight per
connection (HAProxy's ``max-waiting-frames``), refilling the window as ACKs come back. Every
NOTIFY is encoded before the clock starts, so the driver's own per-ACK work is a header parse,
two dict operations and a ``sendall`` per batch: one selectors loop in one thread, cheap enough to
leave a whole core to the agent. Every ACK must match an outstanding (stream-id, frame-id) on its
connection and carry the actions the workload expects; anything else is counted, never ignored,
because a fast wrong agent is not a result.

With ``--sequenced`` a request is a sequence of NOTIFYs on one stream (frame-id 1, 2, ...) and the
next one is only sent after the previous ACK, as HAProxy does for the events of one HTTP request.

Usable as a module (:func:`run_load`) and as a CLI::

    python -m benchmarks.spop_load --connect 127.0.0.1:12345 --agent-pid PID --duration 10
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import selectors
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import (
    Action,
    DataType,
    FrameType,
    Message,
    Scope,
    SetVar,
    Typed,
)

HAPROXY_MAX_FRAME_SIZE = 16380  # tune.bufsize - 4, what HAProxy 2.6 announces by default
HAPROXY_CAPABILITIES = "pipelining,async"  # 2.6's default HELLO on a normal connection
_ACK = int(FrameType.ACK)
_AGENT_HELLO = int(FrameType.AGENT_HELLO)
_AGENT_DISCONNECT = int(FrameType.AGENT_DISCONNECT)
_FIN_FLAGS = b"\x00\x00\x00\x01"
_RECV_SIZE = 256 * 1024
_MAX_CACHED_VERDICTS = 4096
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# A request is the NOTIFY frames of one stream, in order; each entry is (id-key, wire bytes) where
# the key is the raw sid+fid varint bytes, which an ACK echoes verbatim.
_Request = list[tuple[bytes, bytes]]


class DriverError(Exception):
    """The run could not even start (connect, HELLO): there is nothing to measure."""


# --------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """What to replay: ``build_request(i)`` returns the NOTIFY frames (wire bytes, in stream
    order) of request ``i``; ``check_ack`` judges the actions decoded from one ACK.

    Requests must use distinct (stream-id, frame-id) pairs; the driver builds a pool of them up
    front and cycles through it, which is safe because the pool is far larger than the window.
    """

    name: str
    build_request: Callable[[int], list[bytes]]
    check_ack: Callable[[list[Action]], bool]
    sequenced: bool = False  # always replay sequenced (the events of one HTTP request)


MINIMAL_MESSAGE = "bench"
_SRC = ipaddress.IPv4Address("192.0.2.10")


def minimal_request(i: int) -> list[bytes]:
    """One NOTIFY, one message shaped like a small HAProxy event (a uid, a source, a path)."""
    message = Message(MINIMAL_MESSAGE, [
        ("uid", f"{i:016x}"),
        ("src", _SRC),
        ("path", f"/api/items/{i}"),
    ])
    return [codec.notify(i, 1, [message])]


def minimal_check(actions: list[Action]) -> bool:
    """Exactly ``set-var(txn.score, 1)`` with an integer type: what both benchmark apps return."""
    if len(actions) != 1:
        return False
    action = actions[0]
    return (
        type(action) is SetVar
        and action.scope == Scope.TXN
        and action.name == "score"
        and type(action.value) is int
        and action.value == 1
    )


def noargs_request(i: int) -> list[bytes]:
    """The same NOTIFY without arguments: what is left is pure framing and dispatch cost."""
    return [codec.notify(i, 1, [Message(MINIMAL_MESSAGE, [])])]


def _tag(name: str, value: Any) -> list[tuple[str, Any]]:
    # "tag=str(NAME) sample": the sample is an unnamed argument (an empty name on the wire).
    return [("tag", name), ("", value)]


# Today, as HAProxy's date(0,us) says: the agent takes a ts more than an hour off its clock
# for a unit mistake and uses the arrival time instead.
_TS_BASE_US = time.time_ns() // 1000


def traced_request(i: int) -> list[bytes]:
    """The 8 NOTIFYs (fid 1..8) one HTTP request makes with devenv/conf/spoe.cfg, the reference
    tracing config, with the argument types HAProxy 2.6 sends (INT64 ts, IPV4 src, NULL for an
    absent header); the on-http-response NOTIFY carries its two messages, as HAProxy groups
    them. Replay it ``--sequenced``: HAProxy sends a stream's next event after the last ACK."""
    uid = f"{i:08x}-5f1c-4b6e-9a2d-{i:012x}"
    ts = _TS_BASE_US + i * 1000

    def msg(name: str, step: int, *args: tuple[str, Any]) -> Message:
        return Message(name, [("id", uid), ("ts", ts + step * 50), *args])

    fe_http = [
        ("traceparent", None), ("traceparent", None), ("tracestate", None),
        ("tracestate", None), ("baggage", None), ("baggage", None),
        ("span", "Frontend HTTP request"), ("follows-from", "Frontend TCP request"),
        ("finish", "Frontend TCP request"), ("span", "HAProxy session"),
        *_tag("http.request.method", "GET"), *_tag("url.path", f"/api/items/{i}"),
        *_tag("url.query", None), *_tag("url.scheme", "http"),
        *_tag("server.address", "example.test"), *_tag("network.protocol.version", "1.1"),
        *_tag("user_agent.original", "curl/8.5.0"),
    ]
    events = [
        [msg("trace-client-session", 0, ("service", "haproxy"), ("span", "HAProxy session"),
             ("kind", "server"), *_tag("client.address", _SRC),
             *_tag("network.peer.address", _SRC), *_tag("network.peer.port", 40000 + i % 20000),
             *_tag("haproxy.frontend", "fe_main"), ("span", "Client session"),
             ("child-of", "HAProxy session"))],
        [msg("trace-frontend-tcp-request", 1, ("span", "Frontend TCP request"),
             ("child-of", "Client session"))],
        [msg("trace-frontend-http-request", 2, *fe_http)],
        [msg("trace-backend-tcp-request", 3, ("span", "Backend TCP request"),
             ("follows-from", "Frontend HTTP request"), ("finish", "Frontend HTTP request"))],
        [msg("trace-backend-http-request", 4, ("span", "Backend HTTP request"),
             ("follows-from", "Backend TCP request"), ("kind", "client"),
             ("finish", "Backend TCP request"), ("inject", "Backend HTTP request"))],
        [msg("trace-server-session", 5, ("span", "Server session"),
             ("child-of", "HAProxy session"), *_tag("haproxy.backend", "be_app"),
             *_tag("haproxy.server", "app1"), ("finish", "Backend HTTP request"),
             ("span", "HAProxy session"), *_tag("haproxy.backend", "be_app"))],
        [msg("trace-tcp-response", 6, ("span", "TCP response"), ("child-of", "Server session"))],
        [msg("trace-http-response", 7, ("span", "HTTP response"),
             ("follows-from", "TCP response"), *_tag("http.response.status_code", 200),
             ("finish", "TCP response")),
         msg("trace-session-end", 7, ("span", "HAProxy session"),
             *_tag("http.response.status_code", 200), ("finish", "HTTP response"),
             ("finish", "Server session"), ("finish", "Client session"), ("finish", "*"))],
    ]
    return [codec.notify(i, fid, messages) for fid, messages in enumerate(events, 1)]


def traced_check(actions: list[Action]) -> bool:
    """Any well-formed list of txn-scope variables: the inject ACK sets traceparent and friends,
    the others are empty (a decode failure is already a bad ACK)."""
    return all(action.scope == Scope.TXN for action in actions)


MINIMAL = Workload("minimal", minimal_request, minimal_check)
NOARGS = Workload("noargs", noargs_request, minimal_check)
TRACED = Workload("traced", traced_request, traced_check, sequenced=True)
BUILTIN_WORKLOADS = {w.name: w for w in (MINIMAL, NOARGS, TRACED)}


def load_workload(spec: str) -> Workload:
    """A built-in name, or ``MODULE:ATTR`` naming a :class:`Workload` or a zero-argument factory."""
    if spec in BUILTIN_WORKLOADS:
        return BUILTIN_WORKLOADS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--workload expects {'/'.join(BUILTIN_WORKLOADS)} or MODULE:ATTR, "
                         f"got {spec!r}")
    import importlib

    obj = getattr(importlib.import_module(module_name), attr)
    # Duck-typed: run with ``-m``, this module is ``__main__`` and the plugin's Workload class is
    # another module's, so an isinstance check would refuse a perfectly good workload.
    workload = obj if hasattr(obj, "build_request") else obj()
    if not (hasattr(workload, "build_request") and hasattr(workload, "check_ack")):
        raise TypeError(f"{spec} is not a Workload")
    return workload  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- wire helpers


def _ids_end(buf: bytes, pos: int) -> int:
    """End of the sid and fid varints starting at ``pos`` (only their length matters here)."""
    for _ in range(2):
        b = buf[pos]
        pos += 1
        if b >= 240:
            while buf[pos] >= 128:
                pos += 1
            pos += 1
    return pos


def frame_key(frame: bytes) -> bytes:
    """The raw (stream-id, frame-id) bytes of a whole wire frame, as an ACK carries them."""
    return frame[9:_ids_end(frame, 9)]


def describe_key(key: bytes) -> tuple[int, int]:
    from spoe_agent.protocol.varint import decode_varint

    sid, pos = decode_varint(key, 0)
    fid, _ = decode_varint(key, pos)
    return sid, fid


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = sock.recv(size)
        if not data:
            raise DriverError("agent closed the connection during the handshake")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def haproxy_hello(engine_id: str, max_frame_size: int = HAPROXY_MAX_FRAME_SIZE) -> bytes:
    payload = codec.encode_kv_list([
        ("supported-versions", "2.0"),
        ("max-frame-size", Typed(DataType.UINT32, max_frame_size)),
        ("capabilities", HAPROXY_CAPABILITIES),
        ("engine-id", engine_id),
    ])
    return codec.encode_frame(FrameType.HAPROXY_HELLO, 0, 0, payload)


def handshake(sock: socket.socket, engine_id: str) -> dict[str, Any]:
    """HAPROXY-HELLO, then check the AGENT-HELLO the way HAProxy 2.6 would."""
    sock.sendall(haproxy_hello(engine_id))
    length = int.from_bytes(_recv_exact(sock, 4), "big")
    if length > HAPROXY_MAX_FRAME_SIZE:
        raise DriverError(f"AGENT-HELLO of {length} bytes is over the announced max-frame-size")
    frame = codec.decode_frame(_recv_exact(sock, length))
    items = codec.decode_kv_list(frame.payload)
    if frame.type == _AGENT_DISCONNECT:
        raise DriverError(f"agent refused the HELLO: {items}")
    if frame.type != _AGENT_HELLO or not frame.fin or frame.stream_id or frame.frame_id:
        raise DriverError(f"expected AGENT-HELLO, got frame type {frame.type}")
    if str(items.get("version", "")).strip() != "2.0":
        raise DriverError(f"agent version {items.get('version')!r} is not 2.0 (status 8)")
    size = items.get("max-frame-size")
    if type(size) is not int or not 256 <= size <= HAPROXY_MAX_FRAME_SIZE:
        raise DriverError(f"agent max-frame-size {size!r} out of range (status 9)")
    return items


def connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """Connect, retrying while the agent is still starting (no probe connection needed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(address, timeout=5.0)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise DriverError(f"nothing accepts connections on {address}") from None
            time.sleep(0.05)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


# ------------------------------------------------------------------------------ measuring


def process_cpu_seconds(pid: int) -> float:
    """utime+stime of a whole process (all its threads) from /proc, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds all processes used (user+system, all cores); minus the agent and the driver,
    it shows how noisy the machine was. Interrupt and softirq time are left out: our own
    loopback traffic lands there, and would pass for a noisy neighbour."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    user, nice, system = (int(x) for x in fields[1:4])
    return (user + nice + system) / _CLK_TCK


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))
    return ordered[index]


@dataclass
class LoadResult:
    """One run's numbers; ``errors`` is zero only if every NOTIFY got its right ACK."""

    workload: str
    connections: int
    window: int
    sequenced: bool
    duration_s: float = 0.0  # the measured window, warm-up excluded
    acks: int = 0  # ACKs received inside the measured window
    requests: int = 0  # requests whose last ACK arrived inside the window
    acks_per_s: float = 0.0
    requests_per_s: float = 0.0
    latency_us: dict[str, float] = field(default_factory=dict)
    # first NOTIFY sent to last ACK back, per request (a request's share of HTTP latency)
    request_latency_us: dict[str, float] = field(default_factory=dict)
    agent_cpu_s: float | None = None
    agent_cpu_us_per_ack: float | None = None
    agent_cpu_pct: float | None = None
    driver_cpu_pct: float = 0.0
    other_cpu_pct: float | None = None  # everything else on the machine, in % of one core
    notifies_sent: int = 0  # whole run, warm-up and drain included
    acks_matched: int = 0
    mismatched_acks: int = 0  # ACK ids not outstanding on that connection
    bad_acks: int = 0  # right ids, wrong flags or wrong actions
    unexpected_frames: int = 0
    unanswered: int = 0  # NOTIFYs still without ACK after the drain
    agent_disconnects: list[str] = field(default_factory=list)
    agent_hello: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return (self.mismatched_acks + self.bad_acks + self.unexpected_frames + self.unanswered
                + sum(1 for d in self.agent_disconnects if not d.startswith("0 ")))

    @property
    def driver_saturated(self) -> bool:
        return self.driver_cpu_pct >= 90.0

    def note(self, text: str) -> None:
        """Keep the first few problems verbatim: counts say how many, examples say what."""
        if len(self.examples) < 10:
            self.examples.append(text)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = self.errors
        data["driver_saturated"] = self.driver_saturated
        return data


# -------------------------------------------------------------------------------- the engine


class _Conn:
    __slots__ = ("sock", "buf", "outstanding", "pool", "next_index", "open", "caps")

    def __init__(self, sock: socket.socket, pool: list[_Request]) -> None:
        self.sock = sock
        self.buf = b""
        # key -> (send time, request, index of the frame in it)
        self.outstanding: dict[bytes, tuple[float, _Request, int]] = {}
        self.pool = pool
        self.next_index = 0
        self.open = True
        self.caps = ""


def build_pool(workload: Workload, count: int, *, sequenced: bool) -> list[_Request]:
    """Encode ``count`` requests; without sequencing each NOTIFY is its own one-frame request."""
    pool: list[_Request] = []
    for i in range(count):
        frames = [(frame_key(f), f) for f in workload.build_request(i)]
        if sequenced:
            pool.append(frames)
        else:
            pool.extend([frame] for frame in frames)
    return pool


def run_load(
    address: tuple[str, int],
    *,
    workload: Workload = MINIMAL,
    connections: int = 4,
    window: int = 20,
    duration: float = 10.0,
    warmup: float = 2.0,
    sequenced: bool = False,
    agent_pid: int | None = None,
    pool_requests: int = 0,
    drain_timeout: float = 5.0,
    connect_timeout: float = 10.0,
) -> LoadResult:
    """Drive the agent at ``address`` and measure it (see the module docstring)."""
    if connections < 1 or window < 1:
        raise ValueError("connections and window must be at least 1")
    sequenced = sequenced or getattr(workload, "sequenced", False)
    result = LoadResult(workload.name, connections, window, sequenced)
    # Each connection needs far more requests than it keeps in flight, or ids would repeat
    # while still outstanding.
    per_conn = max(pool_requests // connections, window * 50, 256)
    pool = build_pool(workload, per_conn * connections, sequenced=sequenced)
    per_conn = len(pool) // connections
    engine_id = str(uuid.uuid4())
    conns: list[_Conn] = []
    try:
        for c in range(connections):
            sock = connect(address, connect_timeout)
            conn = _Conn(sock, pool[c * per_conn:(c + 1) * per_conn])
            conns.append(conn)
            hello = handshake(sock, engine_id)
            result.agent_hello = {k: v for k, v in hello.items() if isinstance(v, str | int)}
            conn.caps = str(hello.get("capabilities", ""))
        effective = window
        if not any(c.strip() == "pipelining" for c in conns[0].caps.split(",")):
            effective = 1  # HAProxy falls back to sync mode: one NOTIFY at a time
            result.note("agent did not announce pipelining: window forced to 1")
        checker = _AckChecker(workload.check_ack, result)
        _drive(conns, result, checker, effective, duration, warmup, agent_pid, drain_timeout)
    finally:
        for conn in conns:
            _say_goodbye(conn)
    return result


def _drive(
    conns: list[_Conn],
    result: LoadResult,
    payload_ok: _AckChecker,
    window: int,
    duration: float,
    warmup: float,
    agent_pid: int | None,
    drain_timeout: float,
) -> None:
    perf = time.perf_counter
    sel = selectors.DefaultSelector()
    for conn in conns:
        sel.register(conn.sock, selectors.EVENT_READ, conn)

    latencies: list[float] = []
    record = latencies.append
    request_latencies: list[float] = []
    recording = False
    refill = True
    acks = 0
    requests_done = 0
    sent = 0
    snap: tuple[float, int, int, float, float | None, float] | None = None

    # Prime every window.
    for conn in conns:
        pool = conn.pool
        batch = pool[:window]
        conn.next_index = window % len(pool)
        now = perf()
        conn.sock.sendall(b"".join(req[0][1] for req in batch))
        for req in batch:
            conn.outstanding[req[0][0]] = (now, req, 0, now)
        sent += len(batch)

    start = perf()
    t_record = start + warmup
    t_stop = t_record + duration
    drain_deadline = 0.0
    while True:
        in_flight = sum(len(c.outstanding) for c in conns if c.open)
        if not refill and (in_flight == 0 or perf() > drain_deadline):
            break
        if not any(c.open for c in conns):
            break
        events = sel.select(0.5)
        now = perf()
        for key, _ in events:
            conn = key.data
            try:
                data = conn.sock.recv(_RECV_SIZE)
            except OSError as exc:
                data = b""
                result.agent_disconnects.append(f"1 socket error: {exc}")
            if not data:
                conn.open = False
                sel.unregister(conn.sock)
                continue
            buf = conn.buf + data if conn.buf else data
            outstanding = conn.outstanding
            sends: list[tuple[bytes, bytes, _Request, int, float | None]] = []
            pos = 0
            end = len(buf)
            while end - pos >= 4:
                frame_end = pos + 4 + int.from_bytes(buf[pos:pos + 4], "big")
                if frame_end > end:
                    break
                try:
                    ids_end = _ids_end(buf, pos + 9)
                except IndexError:
                    ids_end = end + 1
                if ids_end > frame_end:  # shorter than 7 bytes, or ids run past its end
                    result.unexpected_frames += 1
                    result.note(f"malformed frame {buf[pos:frame_end].hex()}")
                    pos = frame_end
                    continue
                ftype = buf[pos + 4]
                ident = buf[pos + 9:ids_end]
                if ftype != _ACK:
                    _other_frame(conn, ftype, buf[pos + 4:frame_end], result)
                    pos = frame_end
                    continue
                entry = outstanding.pop(ident, None)
                if entry is None:
                    result.mismatched_acks += 1
                    result.note(f"ACK for unknown ids {describe_key(ident)}")
                    pos = frame_end
                    continue
                acks += 1
                if recording:
                    record(now - entry[0])
                if buf[pos + 5:pos + 9] != _FIN_FLAGS or not payload_ok(buf[ids_end:frame_end]):
                    result.bad_acks += 1
                    result.note(f"bad ACK {describe_key(ident)}: {buf[pos:frame_end].hex()}")
                req = entry[1]
                index = entry[2] + 1
                if index < len(req):
                    sends.append((req[index][0], req[index][1], req, index, entry[3]))
                else:
                    requests_done += 1
                    if recording:
                        request_latencies.append(now - entry[3])
                    if refill:
                        req = conn.pool[conn.next_index]
                        conn.next_index += 1
                        if conn.next_index == len(conn.pool):
                            conn.next_index = 0
                        sends.append((req[0][0], req[0][1], req, 0, None))
                pos = frame_end
            conn.buf = buf[pos:] if pos < end else b""
            if sends:
                t_sent = perf()
                conn.sock.sendall(b"".join([s[1] for s in sends]))
                for ident, _, req, index, started in sends:
                    outstanding[ident] = (t_sent, req, index, t_sent if started is None else started)
                sent += len(sends)

        if refill:
            if not recording and now >= t_record:
                recording = True
                agent_cpu = process_cpu_seconds(agent_pid) if agent_pid else None
                snap = (perf(), acks, requests_done, _self_cpu_seconds(), agent_cpu,
                        system_busy_seconds())
            elif recording and now >= t_stop:
                assert snap is not None
                agent_cpu = process_cpu_seconds(agent_pid) if agent_pid else None
                t_end = perf()
                driver_cpu = _self_cpu_seconds() - snap[3]
                busy = system_busy_seconds() - snap[5]
                recording = False
                refill = False
                drain_deadline = t_end + drain_timeout
                elapsed = t_end - snap[0]
                result.duration_s = elapsed
                result.acks = acks - snap[1]
                result.requests = requests_done - snap[2]
                result.acks_per_s = result.acks / elapsed
                result.requests_per_s = result.requests / elapsed
                result.driver_cpu_pct = 100.0 * driver_cpu / elapsed
                if agent_cpu is not None and snap[4] is not None:
                    result.agent_cpu_s = agent_cpu - snap[4]
                    result.agent_cpu_pct = 100.0 * result.agent_cpu_s / elapsed
                    if result.acks:
                        result.agent_cpu_us_per_ack = 1e6 * result.agent_cpu_s / result.acks
                    other = busy - result.agent_cpu_s - driver_cpu
                    result.other_cpu_pct = max(0.0, 100.0 * other / elapsed)
    sel.close()
    result.notifies_sent = sent
    result.acks_matched = acks
    result.unanswered = sum(len(c.outstanding) for c in conns)
    result.latency_us = _summary(latencies)
    result.request_latency_us = _summary(request_latencies)


def _summary(samples: list[float]) -> dict[str, float]:
    """Percentiles in µs (empty when nothing was recorded)."""
    samples.sort()
    if not samples:
        return {}
    return {
        name: round(1e6 * _percentile(samples, q), 1)
        for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))
    }


class _AckChecker:
    """Decode and judge an ACK payload once per distinct byte string: they repeat, and decoding
    each one would make the driver, not the agent, the thing being measured."""

    def __init__(self, check: Callable[[list[Action]], bool], result: LoadResult) -> None:
        self._check = check
        self._result = result
        self._verdicts: dict[bytes, bool] = {}

    def __call__(self, payload: bytes) -> bool:
        verdict = self._verdicts.get(payload)
        if verdict is None:
            try:
                verdict = bool(self._check(codec.decode_actions(payload)))
            except Exception as exc:  # an undecodable payload is a bad ACK, not a driver crash
                self._result.note(f"undecodable ACK payload {payload.hex()}: {exc}")
                verdict = False
            if len(self._verdicts) < _MAX_CACHED_VERDICTS:  # inject ACKs are all distinct
                self._verdicts[payload] = verdict
        return verdict


def _other_frame(conn: _Conn, ftype: int, body: bytes, result: LoadResult) -> None:
    if ftype == _AGENT_DISCONNECT:
        try:
            items = codec.decode_kv_list(codec.decode_frame(body).payload)
        except Exception:
            items = {}
        result.agent_disconnects.append(
            f"{items.get('status-code', '?')} {items.get('message', '')}")
        conn.open = False
        return
    result.unexpected_frames += 1
    result.note(f"unexpected frame type {ftype}")


def _say_goodbye(conn: _Conn) -> None:
    """HAPROXY-DISCONNECT(0), then wait briefly for the AGENT-DISCONNECT, as HAProxy does."""
    sock = conn.sock
    try:
        if conn.open:
            sock.settimeout(1.0)
            sock.sendall(codec.disconnect(FrameType.HAPROXY_DISCONNECT, 0, "normal"))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                data = sock.recv(_RECV_SIZE)
                if not data:
                    break
                conn.buf += data
                if len(conn.buf) >= 4:
                    length = int.from_bytes(conn.buf[:4], "big")
                    if len(conn.buf) >= 4 + length:
                        break
    except OSError:
        pass
    finally:
        sock.close()


# ------------------------------------------------------------------------------------ CLI


def format_result(result: LoadResult) -> str:
    lat = result.latency_us
    lines = [
        f"workload {result.workload}: {result.connections} connections x window {result.window}"
        f"{' (sequenced)' if result.sequenced else ''}, measured {result.duration_s:.2f}s",
        f"  ACK/s        {result.acks_per_s:,.0f}  ({result.acks:,} ACKs, "
        f"{result.requests_per_s:,.0f} requests/s)",
        f"  latency us   p50 {lat.get('p50')}  p90 {lat.get('p90')}  p99 {lat.get('p99')}  "
        f"p99.9 {lat.get('p99.9')}  max {lat.get('max')}",
    ]
    req = result.request_latency_us
    if req:
        lines.append(
            f"  request us   p50 {req.get('p50')}  p90 {req.get('p90')}  p99 {req.get('p99')}  "
            f"p99.9 {req.get('p99.9')}  max {req.get('max')}  (first NOTIFY to last ACK)"
        )
    if result.agent_cpu_us_per_ack is not None:
        lines.append(f"  agent CPU    {result.agent_cpu_us_per_ack:.1f} us/ACK "
                     f"({result.agent_cpu_pct:.0f}% of a core)")
    saturated = "  (SATURATED: the driver may be the bottleneck)" if result.driver_saturated else ""
    lines.append(f"  driver CPU   {result.driver_cpu_pct:.0f}% of a core{saturated}")
    if result.other_cpu_pct is not None:
        lines.append(f"  other CPU    {result.other_cpu_pct:.0f}% of a core (rest of the machine)")
    lines.append(f"  checks       sent {result.notifies_sent:,}, matched {result.acks_matched:,}, "
                 f"errors {result.errors} (mismatched {result.mismatched_acks}, bad "
                 f"{result.bad_acks}, unexpected {result.unexpected_frames}, unanswered "
                 f"{result.unanswered}, disconnects {result.agent_disconnects})")
    for example in result.examples:
        lines.append(f"  ! {example}")
    return "\n".join(lines)


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connect", type=parse_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--connections", "-c", type=int, default=4)
    parser.add_argument("--window", "-w", type=int, default=20,
                        help="NOTIFYs in flight per connection (HAProxy's max-waiting-frames)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--sequenced", action="store_true",
                        help="send a stream's next NOTIFY only after the previous one's ACK")
    parser.add_argument("--workload", default="minimal",
                        help=f"{', '.join(BUILTIN_WORKLOADS)}, or MODULE:ATTR")
    parser.add_argument("--agent-pid", type=int, help="measure this process's CPU per ACK")
    parser.add_argument("--pool", type=int, default=0,
                        help="requests to pre-encode (default: 50 windows per connection)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_load(
            args.connect, workload=load_workload(args.workload), connections=args.connections,
            window=args.window, duration=args.duration, warmup=args.warmup,
            sequenced=args.sequenced, agent_pid=args.agent_pid, pool_requests=args.pool,
        )
    except DriverError as exc:
        print(f"spop_load: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
