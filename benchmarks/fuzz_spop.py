"""A mutation fuzzer for the SPOP side of the agent, built to run for hours.

Inputs start from frames captured from HAProxy 2.6/3.2 (HELLOs, a health check, a real NOTIFY,
a fragmented NOTIFY, DISCONNECTs) and generated ones (NOTIFYs of random typed data, span-language
messages), then get damaged at two levels: frames (reordered, dropped, duplicated, retyped, given
huge or tiny lengths, fragments out of order) and bytes (flipped, overwritten, cut, inserted,
oversized varints, bad data types). Each input is fed in a random chunking.

Every input is judged by one oracle, :func:`replay`, which feeds it to a fresh
:class:`~spoe_agent.protocol.connection.SpopConnection` and checks the promises the issue makes:
only ACK-able NOTIFYs or a protocol violation with a status from the spec table (never 99, the
"internal error" catch-all), an ACK for every NOTIFY, an AGENT-DISCONNECT carrying that status as
the last frame, nothing accepted after CLOSED, bounded buffering, and well-formed output frames.

Two modes:

* in-process (default): the oracle plus the tracing agent as the handler, so the span language
  and the session registry see every decoded message; RSS is this process's.
* ``--live HOST:PORT``: each input goes over its own connection to a running agent, which must
  answer exactly what the oracle predicts (frame types, ids, DISCONNECT status), close cleanly
  (no reset, no hang) and stay up; ``--agent-pid`` samples the agent's RSS. Against
  ``--workers N`` add ``--acks-any-order``: the oracle is one process, whose ACKs keep the
  NOTIFYs' order, where a worker answers an inject for another worker's session when that
  worker does (SPOP allows any order).

It reports inputs/s, outcomes by status code and RSS over time, stops after ``--seconds`` (or
``--inputs``), and exits 1 on any broken promise, printing how to replay the input::

    python -m benchmarks.fuzz_spop --seconds 600
    python -m benchmarks.fuzz_spop --live 127.0.0.1:12345 --agent-pid PID --seconds 3600
    python -m benchmarks.fuzz_spop --seed 7 --replay 1234   # one input, verbosely
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from spoe_agent.protocol import codec
from spoe_agent.protocol.connection import (
    DEFAULT_MAX_FRAME_SIZE,
    ConnectionClosed,
    DisconnectReceived,
    HelloReceived,
    NotifyAborted,
    NotifyReceived,
    ProtocolViolation,
    SpopConnection,
    State,
)
from spoe_agent.protocol.types import (
    FLAG_ABORT,
    FLAG_FIN,
    DataType,
    Frame,
    FrameType,
    Message,
    Status,
    Typed,
)

SPEC_STATUSES = frozenset(int(s) for s in Status)
INTERNAL_ERROR = int(Status.UNKNOWN)
AGENT_FRAMES = frozenset({FrameType.AGENT_HELLO, FrameType.ACK, FrameType.AGENT_DISCONNECT})
EVENTS = (HelloReceived, NotifyReceived, NotifyAborted, DisconnectReceived, ProtocolViolation,
          ConnectionClosed)
_MAX_DISCONNECT_MESSAGE = 255


class BrokenPromise(AssertionError):
    """An input made the agent do something the issue says it never does."""


# ------------------------------------------------------------------------------- corpus

#: HAPROXY-HELLO captured from 2.6.12 (spop-notes §12a), byte for byte.
HELLO_26 = bytes.fromhex("""
    00 00 00 81 01 00 00 00 01 00 00 12 73 75 70 70 6f 72 74 65 64 2d 76 65 72 73 69 6f 6e 73 08 03
    32 2e 30 0e 6d 61 78 2d 66 72 61 6d 65 2d 73 69 7a 65 03 fc f0 06 0c 63 61 70 61 62 69 6c 69 74
    69 65 73 08 10 70 69 70 65 6c 69 6e 69 6e 67 2c 61 73 79 6e 63 09 65 6e 67 69 6e 65 2d 69 64 08
    24 37 61 65 61 38 66 38 38 2d 39 35 39 62 2d 34 31 38 34 2d 61 62 31 62 2d 38 37 33 37 66 33 38
    62 61 32 61 30
""")


def _hello(capabilities: str, healthcheck: bool = False, size: int = 16380,
           version: str = "2.0") -> bytes:
    items: list[tuple[str, Any]] = [
        ("supported-versions", version),
        ("max-frame-size", Typed(DataType.UINT32, size)),
        ("capabilities", capabilities),
    ]
    items.append(("healthcheck", True) if healthcheck
                 else ("engine-id", "7aea8f88-959b-4184-ab1b-8737f38ba2a0"))
    return codec.encode_frame(FrameType.HAPROXY_HELLO, 0, 0, codec.encode_kv_list(items))


HELLOS = (
    _hello("pipelining,async"),  # 2.6 (the capture's content)
    _hello("pipelining"),  # 3.2's mux
    _hello("", healthcheck=True),  # option spop-check, both versions
    _hello("pipelining,async", size=256),  # a small negotiated size
)
#: The real on-client-session NOTIFY of spop-notes §12d (sid 0, fid 1).
CAPTURED_NOTIFY = codec.notify(0, 1, [Message("msg-client-session", [
    ("src", ipaddress.IPv4Address("127.0.0.1")), ("src_port", 56940),
    ("dst", ipaddress.IPv4Address("127.0.0.1")), ("dst_port", 8080), ("fe", "fe_web"),
])])
#: HAPROXY-DISCONNECTs seen from 2.6.12 (§12f): idle timeout, bad version, soft-stop.
DISCONNECTS = (
    codec.disconnect(FrameType.HAPROXY_DISCONNECT, 2, "a timeout occurred"),
    codec.disconnect(FrameType.HAPROXY_DISCONNECT, 8, "unsupported version"),
    codec.disconnect(FrameType.HAPROXY_DISCONNECT, 0, "normal"),
)
SPAN_KEYWORDS = (
    "id", "ts", "service", "span", "child-of", "follows-from", "kind", "tag", "log", "baggage",
    "finish", "inject", "traceparent", "tracestate", "b3", "x-b3-traceid", "uber-trace-id",
    "uberctx-user", "", "", "",
)
HOSTILE_TEXT = ("%s%n%x{0}{}", "../../etc/passwd", "\x00\r\n\x1b[31m", "*", "root", "child",
                "\udcff\udcfe", "é" * 40)


def random_value(rng: random.Random) -> Any:
    kind = rng.randrange(12)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(1 << 63), (1 << 63) - 1)
    if kind == 3:
        return rng.randint(-300, 300)
    if kind == 4:
        return Typed(rng.choice((DataType.UINT32, DataType.UINT64)), rng.randint(0, (1 << 32) - 1))
    if kind == 5:
        return ipaddress.IPv4Address(rng.getrandbits(32))
    if kind == 6:
        return ipaddress.IPv6Address(rng.getrandbits(128))
    if kind == 7:
        return rng.randbytes(rng.randint(0, 40))
    if kind == 8:
        return rng.randbytes(rng.randint(0, 40)).decode("utf-8", "surrogateescape")
    if kind == 9:
        return rng.choice(HOSTILE_TEXT)
    if kind == 10:
        return "x" * rng.choice((0, 1, 255, 256, 4097, 20000))
    return "".join(rng.choice("abcdef-*.") for _ in range(rng.randint(0, 12)))


def random_message(rng: random.Random) -> Message:
    """A message in the span language (the tracing agent parses every message it gets)."""
    args = [("id", rng.choice(("s1", "s2", "s3", rng.randbytes(4).hex())))]
    for _ in range(rng.randint(0, 12)):
        name = rng.choice(SPAN_KEYWORDS)
        value = rng.choice(("root", "child", "*", "server")) if rng.random() < 0.4 \
            else random_value(rng)
        args.append((name, value))
    name = rng.choice(("trace", "", "msg-client-session", "x" * rng.randint(1, 300)))
    return Message(name, args)


def random_notify(rng: random.Random) -> list[bytes]:
    messages = [random_message(rng) for _ in range(rng.randint(0, 3))]
    sid, fid = rng.choice(((0, 1), (1, 1), (rng.getrandbits(64), rng.getrandbits(64))))
    try:
        return [codec.notify(sid, fid, messages)]
    except ValueError:  # more than 255 arguments
        return [codec.notify(sid, fid, [])]


def fragmented_notify(rng: random.Random) -> list[bytes]:
    """2.6's fragmentation (§10): NOTIFY without FIN, UNSETs, the last with FIN; maybe abort."""
    blob = "q=" + "x" * rng.randint(200, 3000) + "END"
    payload = codec.encode_messages([Message("measure", [("blob", blob), ("n", 7)])])
    size = rng.choice((7, 100, 231, 1000))
    parts = [payload[i:i + size] for i in range(0, len(payload), size)]
    sid, fid = rng.randint(0, 9), rng.randint(1, 9)
    frames = [codec.encode_frame(FrameType.NOTIFY, sid, fid, parts[0], 0)]
    for i, part in enumerate(parts[1:], 1):
        last = i == len(parts) - 1
        frames.append(codec.encode_frame(FrameType.UNSET, sid, fid, part, FLAG_FIN if last else 0))
    if rng.random() < 0.2:
        cut = rng.randint(1, len(frames))
        frames[cut:] = [codec.encode_frame(FrameType.UNSET, sid, fid, b"", FLAG_FIN | FLAG_ABORT)]
    return frames


FRAME_MAKERS: tuple[Callable[[random.Random], list[bytes]], ...] = (
    lambda rng: [CAPTURED_NOTIFY],
    random_notify,
    random_notify,
    random_notify,
    fragmented_notify,
    lambda rng: [rng.choice(DISCONNECTS)],
    lambda rng: [rng.choice(HELLOS)],  # a second HELLO
    lambda rng: [codec.ack(1, 1)],  # an agent frame from "HAProxy"
    lambda rng: [codec.encode_frame(rng.choice((42, 200, 255)), 0, 0, rng.randbytes(8))],
)


# ----------------------------------------------------------------------------- mutation


def _frame_mutation(rng: random.Random, frames: list[bytes]) -> None:
    if not frames:
        return
    i = rng.randrange(len(frames))
    op = rng.randrange(7)
    if op == 0:  # out of order (fragments too)
        j = rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    elif op == 1:
        frames.insert(i, frames[i])
    elif op == 2:
        del frames[i]
    elif op == 3 and len(frames[i]) > 4:  # wrong frame type
        frame = bytearray(frames[i])
        frame[4] = rng.choice((0, 1, 2, 3, 101, 102, 103, rng.randrange(256)))
        frames[i] = bytes(frame)
    elif op == 4:  # a huge, or tiny, declared length
        frame = bytearray(frames[i])
        length = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, DEFAULT_MAX_FRAME_SIZE + 1, 16381, 0, 3, 6,
                             rng.getrandbits(32)))
        frame[0:4] = length.to_bytes(4, "big")
        frames[i] = bytes(frame)
    elif op == 5 and len(frames[i]) > 8:  # flags: clear FIN, set ABORT, garbage
        frame = bytearray(frames[i])
        frame[5:9] = rng.choice((0, FLAG_ABORT, FLAG_FIN | FLAG_ABORT,
                                 rng.getrandbits(32))).to_bytes(4, "big")
        frames[i] = bytes(frame)
    else:  # stream/frame ids changed: fragments from another stream
        frames[i] = frames[i][:9] + bytes((rng.randrange(256),)) + frames[i][10:]


def _byte_mutation(rng: random.Random, data: bytearray) -> None:
    op = rng.randrange(8)
    if not data or op == 0:
        at = rng.randint(0, len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 8))
        return
    at = rng.randrange(len(data))
    if op == 1:
        data[at] ^= 1 << rng.randrange(8)
    elif op == 2:
        data[at] = rng.randrange(256)
    elif op == 3:
        del data[at:]
    elif op == 4:
        del data[at:at + rng.randint(1, 16)]
    elif op == 5:  # an oversized or never-ending varint
        data[at:at] = b"\xf0" + b"\xff" * rng.randint(1, 12)
    elif op == 6:  # a bad data type byte (10..15 are undefined)
        data[at] = rng.randrange(10, 16) | (rng.randrange(16) << 4)
    else:  # a huge varint length for a string
        data[at:at] = b"\x08\xf0\xff\xff\xff\x7f"


def generate(rng: random.Random) -> bytes:
    """One fuzz input: mostly a HELLO then frames, damaged at frame then byte level."""
    frames: list[bytes] = []
    if rng.random() < 0.9:
        frames.append(rng.choice(HELLOS) if rng.random() < 0.7 else HELLO_26)
    for _ in range(rng.randint(0, 8)):
        frames.extend(rng.choice(FRAME_MAKERS)(rng))
    for _ in range(rng.choice((0, 0, 1, 2, 3))):
        _frame_mutation(rng, frames)
    data = bytearray(b"".join(frames))
    for _ in range(rng.choice((0, 0, 1, 1, 2, 4))):
        _byte_mutation(rng, data)
    if rng.random() < 0.03:
        data += rng.randbytes(rng.randint(1, 2000))
    return bytes(data)


def chunked(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random points: one piece, many, or byte by byte."""
    if not data:
        return []
    style = rng.randrange(4)
    if style == 0:
        return [data]
    if style == 1 and len(data) <= 400:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -------------------------------------------------------------------------------- oracle

Handler = Callable[[list[Message]], list[Any]]
#: What the agent sent, as the oracle compares it: (frame type, stream-id, frame-id, status).
Sent = tuple[int, int, int, int | None]


@dataclass
class Outcome:
    # Every NOTIFY decoded is owed an ACK, those read with HAProxy's DISCONNECT or before a
    # protocol error too: the agent's goodbye waits for their ACKs.
    notifies: int = 0
    status: int | None = None  # the AGENT-DISCONNECT status, if the agent sent one
    sent: list[Sent] = field(default_factory=list)
    max_buffered: int = 0

    @property
    def label(self) -> str:
        if self.status is not None:
            return f"disconnect-{self.status}"
        if self.notifies:
            return "acks"
        if self.sent:
            return "hello-only"
        return "no-reply"


def split_frames(data: bytes, what: str) -> list[Frame]:
    """The frames of an agent's output; anything but whole frames breaks a promise."""
    frames = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise BrokenPromise(f"{what}: {len(data) - pos} stray bytes after the last frame")
        length = int.from_bytes(data[pos:pos + 4], "big")
        body = data[pos + 4:pos + 4 + length]
        if len(body) < length:
            raise BrokenPromise(f"{what}: a frame of {length} bytes was cut short")
        try:
            frames.append(codec.decode_frame(body))
        except Exception as exc:
            raise BrokenPromise(f"{what}: undecodable frame {body[:32].hex()}: {exc}") from exc
        pos += 4 + length
    return frames


def describe_sent(frames: Sequence[Frame]) -> list[Sent]:
    out: list[Sent] = []
    for frame in frames:
        if frame.type not in AGENT_FRAMES:
            raise BrokenPromise(f"the agent sent a frame of type {frame.type}")
        if not frame.flags & FLAG_FIN:
            raise BrokenPromise(f"the agent sent a frame without FIN: {frame}")
        status = None
        if frame.type == FrameType.AGENT_DISCONNECT:
            items = codec.decode_kv_list(frame.payload)
            status = items.get("status-code")
            message = items.get("message")
            if type(status) is not int or status not in SPEC_STATUSES:
                raise BrokenPromise(f"AGENT-DISCONNECT with status {status!r}")
            if not isinstance(message, str) or len(message.encode("utf-8", "surrogateescape")) \
                    > _MAX_DISCONNECT_MESSAGE:
                raise BrokenPromise(f"AGENT-DISCONNECT message {message!r}")
        elif frame.type == FrameType.ACK:
            codec.decode_actions(frame.payload)  # must decode
        out.append((int(frame.type), frame.stream_id, frame.frame_id, status))
    return out


def replay(
    chunks: Sequence[bytes],
    *,
    handler: Handler | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    eof: bool = True,
) -> Outcome:
    """Feed ``chunks`` (then EOF) to a fresh connection; check every promise on the way."""
    conn = SpopConnection(max_frame_size=max_frame_size)
    outcome = Outcome()
    out = bytearray()
    violation: int | None = None
    disconnected = False
    for chunk in chunks:
        was_closed = conn.state is State.CLOSED
        try:
            events = conn.receive_data(chunk)
        except Exception as exc:
            raise BrokenPromise(f"receive_data raised {type(exc).__name__}: {exc}") from exc
        if was_closed and events:
            raise BrokenPromise(f"events after CLOSED: {events}")
        for event in events:
            if not isinstance(event, EVENTS):
                raise BrokenPromise(f"unexpected event {event!r}")
            if isinstance(event, NotifyReceived):
                outcome.notifies += 1
                actions = handler(event.messages) if handler is not None else []
                conn.send_ack(event.stream_id, event.frame_id, actions)
            elif isinstance(event, ProtocolViolation):
                status = int(event.status)
                if status not in SPEC_STATUSES:
                    raise BrokenPromise(f"violation with status {status} outside the spec")
                if status == INTERNAL_ERROR:
                    raise BrokenPromise(f"internal error (status 99): {event.message}")
                violation = status
            elif isinstance(event, DisconnectReceived):
                disconnected = True
        buffered = conn.buffered
        outcome.max_buffered = max(outcome.max_buffered, buffered)
        if buffered > conn.frame_size + 3:
            raise BrokenPromise(f"{buffered} bytes buffered for a frame size of {conn.frame_size}")
        out += conn.data_to_send()
    if eof:
        conn.receive_eof()
        out += conn.data_to_send()
    sent = describe_sent(split_frames(bytes(out), "in-process output"))
    outcome.sent = sent
    acks = sum(1 for s in sent if s[0] == FrameType.ACK)
    if acks != outcome.notifies:
        raise BrokenPromise(f"{outcome.notifies} NOTIFYs owed an ACK but {acks} ACKs")
    disconnects = [s for s in sent if s[0] == FrameType.AGENT_DISCONNECT]
    if violation is not None or disconnected:
        expected = violation if violation is not None else 0
        if disconnects != [sent[-1]] or sent[-1][3] != expected:
            raise BrokenPromise(f"expected one final AGENT-DISCONNECT({expected}), sent {sent}")
        outcome.status = expected
    elif disconnects:
        raise BrokenPromise(f"AGENT-DISCONNECT without a reason: {sent}")
    for s in sent:
        if s[0] == FrameType.AGENT_HELLO and (s[1], s[2]) != (0, 0):
            raise BrokenPromise(f"AGENT-HELLO with ids {s[1:3]}")
    return outcome


# -------------------------------------------------------------------------------- live


def live_exchange(address: tuple[str, int], chunks: Sequence[bytes], timeout: float = 10.0
                  ) -> list[Frame]:
    """Send ``chunks`` on a new connection, half-close, read until the agent closes."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the agent closed on a violation already: read what it said
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        received = bytearray()
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise BrokenPromise(f"no end of the exchange after {timeout}s (hang?)") from None
            except ConnectionResetError:
                raise BrokenPromise("the agent reset the connection instead of closing it") \
                    from None
            if not data:
                break
            received += data
    return split_frames(bytes(received), "live agent output")


def frame_chunks(data: bytes) -> list[bytes]:
    """``data`` cut at its frame boundaries: each frame is read alone, as byte-by-byte reads
    would have it, at a fraction of the cost."""
    chunks = []
    pos = 0
    while len(data) - pos >= 4:
        end = pos + 4 + int.from_bytes(data[pos:pos + 4], "big")
        if end > len(data):
            break
        chunks.append(data[pos:end])
        pos = end
    if pos < len(data):
        chunks.append(data[pos:])
    return chunks


def _is_subsequence(small: Sequence[Sent], big: Sequence[Sent]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def check_live(address: tuple[str, int], chunks: Sequence[bytes], max_frame_size: int,
               timeout: float = 10.0, acks_any_order: bool = False) -> Outcome:
    """The live agent must send what the oracle predicts: same types, ids and status.

    How the agent's reads cut the stream is up to TCP, and must not matter: the oracle replays
    it both ways, every frame read alone and all in one read, and the live ACKs are checked
    between the two (they agree, now that a NOTIFY read with HAProxy's DISCONNECT gets its ACK
    too).
    With ``acks_any_order`` only which ACKs came is checked, not their order: SPOP lets an agent
    answer pipelined NOTIFYs in any order, and one whose handlers run concurrently does (with
    ``--workers N``, an inject for a session another worker owns waits for that worker).
    """
    data = b"".join(chunks)
    most = replay(frame_chunks(data), max_frame_size=max_frame_size)
    least = replay([data], max_frame_size=max_frame_size)
    got = describe_sent(live_exchange(address, chunks, timeout))

    def others(sent: Sequence[Sent]) -> list[Sent]:
        return [s for s in sent if s[0] != FrameType.ACK]

    def acks(sent: Sequence[Sent]) -> list[Sent]:
        return [s for s in sent if s[0] == FrameType.ACK]

    if others(most.sent) != others(least.sent):  # the oracle's own consistency
        raise BrokenPromise(f"chunking changed the outcome: {others(most.sent)} vs "
                            f"{others(least.sent)}")
    if others(got) != others(most.sent):
        raise BrokenPromise(f"live agent sent {others(got)[:8]}, the oracle predicts "
                            f"{others(most.sent)[:8]}")
    if acks_any_order:
        within = not (Counter(acks(got)) - Counter(acks(most.sent)))
    else:
        within = _is_subsequence(acks(got), acks(most.sent))
    if not (len(acks(least.sent)) <= len(acks(got)) and within):
        raise BrokenPromise(f"live ACKs {acks(got)[:8]} are not between {acks(least.sent)[:8]} "
                            f"and {acks(most.sent)[:8]}")
    if got and others(got) and got[-1] != others(got)[-1] \
            and others(got)[-1][0] == FrameType.AGENT_DISCONNECT:
        raise BrokenPromise(f"frames after the AGENT-DISCONNECT: {got}")
    return most


# ---------------------------------------------------------------------------------- run


def rss_kb(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def tracing_handler() -> tuple[Handler, Callable[[], None], Callable[[], int]]:
    """The tracing agent as the in-process handler: (dispatch, periodic upkeep, errors)."""
    from spoe_agent.config import AgentConfig
    from spoe_agent.tracing.agent import TracingAgent

    agent = TracingAgent(AgentConfig(exporter="none", max_sessions=2000, session_ttl=5.0))
    return agent.dispatch, agent.registry.expire, lambda: agent.handler_errors


@dataclass
class Report:
    seed: int
    mode: str
    inputs: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    rss_kb: list[tuple[float, int]] = field(default_factory=list)
    handler_errors: int = 0

    @property
    def rss_growth_kb(self) -> int:
        """Growth after the first quarter of the run (warm-up: caches, registry at its cap)."""
        if len(self.rss_kb) < 2:
            return 0
        warm = self.rss_kb[len(self.rss_kb) // 4][1]
        return max(0, max(v for _, v in self.rss_kb) - warm)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "mode": self.mode, "inputs": self.inputs,
            "seconds": round(self.seconds, 2),
            "inputs_per_s": round(self.inputs / self.seconds, 1) if self.seconds else 0.0,
            "outcomes": dict(self.outcomes.most_common()), "failures": self.failures,
            "handler_errors": self.handler_errors,
            "rss_kb": self.rss_kb,
            "rss_growth_kb": self.rss_growth_kb,
        }


def input_for(seed: int, index: int) -> tuple[bytes, list[bytes]]:
    """Input number ``index`` of a run, reproducibly: (bytes, chunking)."""
    rng = random.Random(f"{seed}:{index}")
    data = generate(rng)
    return data, chunked(rng, data)


def fuzz(
    *,
    seconds: float,
    max_inputs: int | None = None,
    seed: int = 0,
    live: tuple[str, int] | None = None,
    agent_pid: int | None = None,
    acks_any_order: bool = False,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    sample_every: float = 5.0,
    progress: Callable[[Report], None] | None = None,
    max_failures: int = 10,
) -> Report:
    report = Report(seed=seed, mode="live" if live else "in-process")
    handler: Handler | None = None
    upkeep: Callable[[], None] = lambda: None  # noqa: E731
    errors: Callable[[], int] = lambda: 0  # noqa: E731
    if live is None:
        handler, upkeep, errors = tracing_handler()
    rss_pid: int | str | None = agent_pid if live else "self"
    start = time.monotonic()
    next_sample = start
    index = 0
    while True:
        now = time.monotonic()
        if now >= next_sample:
            if rss_pid is not None:
                rss = rss_kb(rss_pid)
                if rss is None and live:
                    report.failures.append({"index": index, "error": "the agent process is gone"})
                    break
                if rss is not None:
                    report.rss_kb.append((round(now - start, 1), rss))
            upkeep()
            if progress is not None and index:
                report.seconds = now - start
                progress(report)
            next_sample = now + sample_every
        if now - start >= seconds or (max_inputs is not None and index >= max_inputs):
            break
        data, chunks = input_for(seed, index)
        try:
            if live is None:
                outcome = replay(chunks, handler=handler, max_frame_size=max_frame_size)
            else:
                outcome = check_live(live, chunks, max_frame_size,
                                     acks_any_order=acks_any_order)
            report.outcomes[outcome.label] += 1
        except Exception as exc:  # BrokenPromise, or a crash of the oracle: a finding either way
            report.outcomes["BROKEN"] += 1
            report.failures.append({"index": index, "error": f"{type(exc).__name__}: {exc}",
                                    "input": data[:512].hex()})
            if live is not None:
                try:
                    socket.create_connection(live, timeout=5).close()
                except OSError:
                    report.failures.append({"index": index, "error": "the agent stopped "
                                            "accepting connections"})
                    break
            if len(report.failures) >= max_failures:
                break
        index += 1
    report.inputs = index
    report.seconds = time.monotonic() - start
    report.handler_errors = errors()
    if report.handler_errors:
        report.failures.append({"error": f"{report.handler_errors} handler errors"})
    if rss_pid is not None:
        rss = rss_kb(rss_pid)
        if rss is not None:
            report.rss_kb.append((round(report.seconds, 1), rss))
    return report


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    parser.add_argument("--inputs", type=int, help="or after this many inputs")
    parser.add_argument("--seed", type=int, default=int(time.time()) & 0xFFFF)
    parser.add_argument("--live", metavar="HOST:PORT", help="fuzz a running agent")
    parser.add_argument("--agent-pid", type=int, help="sample this process's RSS (live mode)")
    parser.add_argument("--acks-any-order", action="store_true",
                        help="live mode: accept ACKs in any order (an agent whose handlers run "
                             "concurrently, such as spoe-agent --workers N)")
    parser.add_argument("--max-frame-size", type=int, default=DEFAULT_MAX_FRAME_SIZE,
                        help="the agent's max_frame_size (live mode: as configured)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                        help="fail if RSS grows more than this after warm-up")
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS/progress period")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--replay", type=int, metavar="INDEX",
                        help="run input INDEX of --seed once and show what happened")
    args = parser.parse_args(argv)
    live = _address(args.live) if args.live else None
    # The inputs are garbage on purpose: the libraries' per-input warnings (OpenTelemetry's
    # baggage parser...) would drown the report. The agent itself rate-limits them.
    logging.basicConfig(level=logging.ERROR)

    if args.replay is not None:
        data, chunks = input_for(args.seed, args.replay)
        print(f"input {args.replay} of seed {args.seed}: {len(data)} bytes in {len(chunks)} "
              f"chunks\n{data.hex()}")
        outcome = (check_live(live, chunks, args.max_frame_size,
                              acks_any_order=args.acks_any_order) if live
                   else replay(chunks, handler=tracing_handler()[0],
                               max_frame_size=args.max_frame_size))
        print(f"outcome: {outcome.label}; sent {outcome.sent}")
        return 0

    def progress(report: Report) -> None:
        rss = f", rss {report.rss_kb[-1][1] // 1024} MB" if report.rss_kb else ""
        print(f"[{report.seconds:7.1f}s] {sum(report.outcomes.values())} inputs "
              f"({sum(report.outcomes.values()) / report.seconds:.0f}/s){rss}; "
              f"{dict(report.outcomes.most_common(6))}", file=sys.stderr, flush=True)

    report = fuzz(seconds=args.seconds, max_inputs=args.inputs, seed=args.seed, live=live,
                  agent_pid=args.agent_pid, max_frame_size=args.max_frame_size,
                  acks_any_order=args.acks_any_order,
                  sample_every=args.sample_every, progress=progress)
    result = report.as_dict()
    growth_mb = report.rss_growth_kb / 1024
    ok = not report.failures and growth_mb <= args.max_rss_growth_mb
    print(f"\n{report.mode} fuzz, seed {report.seed}: {report.inputs} inputs in "
          f"{report.seconds:.1f}s ({result['inputs_per_s']}/s)")
    for label, count in report.outcomes.most_common():
        print(f"  {label:24s} {count}")
    if report.rss_kb:
        first, last = report.rss_kb[0][1], report.rss_kb[-1][1]
        print(f"  RSS {first // 1024} MB -> {last // 1024} MB "
              f"(growth after warm-up {growth_mb:.1f} MB, limit {args.max_rss_growth_mb} MB)")
    for failure in report.failures:
        print(f"  BROKEN: {failure}")
        if "index" in failure:
            print(f"    replay: python -m benchmarks.fuzz_spop --seed {report.seed} "
                  f"--replay {failure['index']}" + (f" --live {args.live}" if live else ""))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
