"""Session-owner routing between workers, without I/O: the peer wire format, and the rules that
keep one stream's commands in order when they arrive over several sockets.

Each session (the ``id=`` key) lives in exactly one worker's registry, so its spans form one
trace and TTL/cap eviction never emits a span twice. The worker that receives a session's first
event owns it and tells every peer so (an *owns* announcement) before that event's ACK; a worker
that receives an event of a session a peer owns forwards it there over a unix stream socket.
HAProxy 2.6 keeps most of a stream's events on one connection, so most sessions never leave the
worker that saw them. When the owner drops the session it announces that too (*ended*), so the
peers' tables hold only open sessions. This module holds everything about that exchange that can
be decided without a socket, so the gevent shell (:mod:`spoe_agent.workers.mesh`) only moves
bytes.

Ordering. HAProxy sends event k+1 of a stream only after event k was ACKed, and a worker writes
what event k makes its peers need (the command itself, or the announcement that it owns the
session) to their sockets before it queues that ACK. So when event k+1 exists, that is already
in one of the receiver's socket buffers, but not necessarily in the one the event loop wakes up
for first (libev reports ready watchers in no useful order). A worker therefore drains every
peer socket before it routes or applies anything and applies what it read by the writer's
``CLOCK_MONOTONIC`` stamp (one clock for the whole machine): :class:`Reorderer`.

Wire format: a 4-byte big-endian length, then ``marshal.dumps`` of a plain tuple whose first item
is the frame kind. ``marshal`` is the fastest serializer of plain data in the standard library
and a compiled :class:`~spoe_agent.tracing.language.Command` is plain data by design. It must
only ever read bytes from this user's own workers: the peer sockets live in a directory only
the agent's user can enter (see :mod:`spoe_agent.workers.supervisor`).
"""

from __future__ import annotations

import heapq
import marshal
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from spoe_agent.protocol.types import Scope, SetVar
from spoe_agent.tracing.language import Command

# Frame kinds: the first item of every frame tuple.
HELLO = 0  # (HELLO, sender_index, fresh, urgent): first frame of a link; fresh asks for SYNC
COMMAND = 1  # (COMMAND, stamp_ns, rpc_id, key, ts_ns, service, carrier, ops); rpc_id 0: no reply
REPLY = 2  # (REPLY, rpc_id, ((scope, name, value), ...)): the SetVars of an inject
SYNC = 3  # (SYNC,): everything this peer held back for the receiver has been written before it
NUDGE = 4  # (NUDGE,): wake up and drain (a bulk link the receiver does not watch is full)
# (BATCH, stamp_ns, ((key, ts_ns, service, carrier, ops), ...), owns, ended, drained_ns):
# commands, in order, then the keys of the sessions the sender took (owns) and dropped (ended)
# since its last such frame (a key is in one of the two at most), and when the sender's last
# complete drain began (it has applied everything written to it before then).
BATCH = 5

#: A frame bigger than this is a bug or not one of our peers: the connection is dropped.
MAX_FRAME = 16 << 20
_LEN = 4
_tuple_new = tuple.__new__
_dumps = marshal.dumps
_loads = marshal.loads


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode(frame: tuple[Any, ...]) -> bytes:
    body = _dumps(frame)
    return len(body).to_bytes(_LEN, "big") + body


def encode_command(command: Command, rpc_id: int = 0, stamp_ns: int | None = None) -> bytes:
    """One forwarded command; the stamp is taken here, as late as possible before the write."""
    if stamp_ns is None:
        stamp_ns = time.monotonic_ns()
    # tuple + NamedTuple is a plain tuple, which marshal accepts (it refuses subclasses).
    return encode((COMMAND, stamp_ns, rpc_id) + command)


def encode_batch(commands: Sequence[Command], stamp_ns: int | None = None,
                 owns: tuple[str, ...] = (), ended: tuple[str, ...] = (),
                 drained_ns: int = 0) -> bytes:
    """Fire-and-forget commands for one owner and the sender's announcements, one frame: the
    receiver applies them in this order, at the batch's stamp, taken here, as late as possible
    before the write. One ``marshal.dumps`` also writes a string object the commands share
    only once."""
    if stamp_ns is None:
        stamp_ns = time.monotonic_ns()
    return encode((BATCH, stamp_ns, tuple([_tuple_new(tuple, c) for c in commands]), owns,
                   ended, drained_ns))


# What forwarded commands carry, by value. ``marshal.loads`` makes every string of every command
# anew, where the decoder of a local NOTIFY hands out the same objects again (its argument
# caches): without this, an open session whose events were forwarded kept its own copies of its
# span names, tag keys and constant values (~1.5 KB more per session, measured). Only strings
# and ops made of strings are looked up: True == 1 == 1.0, so an op holding a number could come
# back as another type. Bounded, cleared when full (the unique values, paths and ids, churn it).
_SHARED: dict[Any, Any] = {}
_SHARED_LIMIT = 8192
_SHARED_MAX_CHARS = 256


def _shared_str(value: Any) -> Any:
    if type(value) is not str or len(value) > _SHARED_MAX_CHARS:
        return value
    known = _SHARED.get(value)
    if known is None:
        if len(_SHARED) >= _SHARED_LIMIT:
            _SHARED.clear()
        _SHARED[value] = known = value
    return known


def _shared_ops(ops: tuple[tuple[Any, ...], ...]) -> tuple[tuple[Any, ...], ...]:
    try:
        known = _SHARED.get(ops)
    except TypeError:  # not plain data: leave it as it came
        return ops
    if known is not None:
        return known
    keep = True
    shared = []
    for op in ops:
        known = _SHARED.get(op)
        if known is None:
            known = (op[0], *[_shared_str(x) for x in op[1:]])
            if all(type(x) is str and len(x) <= _SHARED_MAX_CHARS for x in op[1:]):
                if len(_SHARED) >= _SHARED_LIMIT:
                    _SHARED.clear()
                _SHARED[op] = known
            else:
                keep = False
        shared.append(known)
    result = tuple(shared)
    if keep:
        if len(_SHARED) >= _SHARED_LIMIT:
            _SHARED.clear()
        _SHARED[ops] = result
    return result


def commands_of(frame: tuple[Any, ...]) -> list[Command]:
    """The :class:`Command` s of a COMMAND or BATCH frame, in the order they are to be applied
    (built like ``parse_message`` builds them), their strings shared with earlier commands'
    equal ones (see ``_SHARED``)."""
    if frame[0] == BATCH:
        return [_command(item) for item in frame[2]]
    return [_command(frame[3:8])]


def _command(item: tuple[Any, ...]) -> Command:
    key, ts_ns, service, carrier, ops = item
    return _tuple_new(Command, (key, ts_ns, _shared_str(service), carrier, _shared_ops(ops)))


def encode_reply(rpc_id: int, actions: Iterable[SetVar]) -> bytes:
    return encode((REPLY, rpc_id, tuple([(int(a.scope), a.name, a.value) for a in actions])))


def reply_actions(frame: tuple[Any, ...]) -> list[SetVar]:
    return [SetVar(Scope(scope), name, value) for scope, name, value in frame[2]]


class FrameReader:
    """Cuts one connection's byte stream into frames; keeps a partial frame for the next feed."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        """The whole frames ``data`` completes. A frame over ``MAX_FRAME`` or that does not
        decode raises :class:`FrameError` at once: the link is broken, never resynchronised."""
        buf = self._buf + data if self._buf else data
        frames: list[tuple[Any, ...]] = []
        pos = 0
        end = len(buf)
        while end - pos >= _LEN:
            size = int.from_bytes(buf[pos : pos + _LEN], "big")
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes (limit {MAX_FRAME})")
            stop = pos + _LEN + size
            if stop > end:
                break
            try:
                frame = _loads(buf[pos + _LEN : stop])
            except (ValueError, EOFError, TypeError) as exc:
                raise FrameError(f"undecodable frame: {exc}") from None
            if type(frame) is not tuple or not frame or type(frame[0]) is not int:
                raise FrameError(f"not a frame: {type(frame).__name__}")
            frames.append(frame)
            pos = stop
        self._buf = buf[pos:] if pos < end else b""
        return frames


class Reorderer:
    """Forwarded commands from every peer, released in stamp order.

    ``push`` everything a drain read (from all sockets), then ``pop_all``: within one stream the
    stamps increase with the event order, whichever worker forwarded which event. The sequence
    number breaks stamp ties (two forwarders, same nanosecond) deterministically.
    """

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Any, tuple[Any, ...]]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, stamp_ns: int, origin: Any, frame: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (stamp_ns, self._seq, origin, frame))

    def pop_all(self) -> list[tuple[Any, tuple[Any, ...]]]:
        """``(origin, frame)`` pairs, oldest stamp first; the heap is empty afterwards."""
        heap = self._heap
        if len(heap) == 1:
            item = heap.pop()
            return [(item[2], item[3])]
        heap.sort()
        out = [(item[2], item[3]) for item in heap]
        heap.clear()
        return out


class Backlog:
    """Commands for an owner that is down (restarting), held to be written once it is back.

    Bounded in count (of frames) and in age: past either bound the oldest are dropped and
    counted, because an owner that does not come back must not make its peers grow without
    limit. ``commands`` and ``dropped`` count commands, as the ``held`` count does: a frame is
    often a whole read's batch of them (counted in frames, the metrics understated a loss up
    to a batch's size: code review).
    """

    __slots__ = ("_items", "max_items", "max_age_ns", "dropped", "commands")

    def __init__(self, max_items: int = 65536, max_age_s: float = 10.0) -> None:
        self._items: deque[tuple[int, bytes, int]] = deque()
        self.max_items = max_items
        self.max_age_ns = int(max_age_s * 1e9)
        self.dropped = 0
        self.commands = 0  # held now

    def __len__(self) -> int:
        return len(self._items)

    def add(self, data: bytes, now_ns: int | None = None, commands: int = 1) -> None:
        """Hold one frame of ``commands`` commands."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        items = self._items
        if len(items) >= self.max_items:
            lost = items.popleft()[2]
            self.dropped += lost
            self.commands -= lost
        items.append((now, data, commands))
        self.commands += commands

    def expire(self, now_ns: int | None = None) -> int:
        now = time.monotonic_ns() if now_ns is None else now_ns
        cutoff = now - self.max_age_ns
        items = self._items
        n = 0
        while items and items[0][0] < cutoff:
            n += items.popleft()[2]
        self.dropped += n
        self.commands -= n
        return n

    def discard(self) -> int:
        """Drop everything held (its owner died, and its sessions with it); how many commands."""
        n = self.commands
        self._items.clear()
        self.commands = 0
        return n

    def take(self, now_ns: int | None = None) -> bytes:
        """Everything still fresh, as one write; the backlog is empty afterwards."""
        self.expire(now_ns)
        data = b"".join([item[1] for item in self._items])
        self._items.clear()
        self.commands = 0
        return data
