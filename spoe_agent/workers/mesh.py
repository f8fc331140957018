"""The gevent shell of session-owner routing: unix sockets between every pair of workers.

Worker ``i`` listens on ``<runtime dir>/peer-<i>.sock``. To send to worker ``j`` it opens two
*outbound* links to ``peer-<j>.sock``:

* the **bulk** link carries the fire-and-forget commands (no inject), and j does not watch it:
  j drains it whenever it is about to apply anything, and at least every :data:`TICK_S`. Waking a
  process costs more CPU than the command it is woken for (measured: 20-40 us per gevent wake-up
  on the benchmark VM against ~6 us to forward and apply a command), and most of them can wait
  in the socket buffer until the owner is awake anyway;
* the **urgent** link carries inject RPCs, which HAProxy waits for, and their replies; j watches
  it. A NUDGE frame on it wakes j when a bulk buffer fills up.

The invariants that make the traces those of one process (see :mod:`spoe_agent.workers.router`):

* a forwarded command is in the owner's socket buffer before its ACK is queued (:meth:`forward`
  waits for the kernel to take it or, in a read the server handles inline, the read's batch is
  written before its ACKs are queued), so it exists before HAProxy can send the stream's next
  event; so is the announcement that this worker took a session (its first event's ACK waits
  for it the same way), so a peer that receives the next event knows where the session is;
* the owner drains every inbound link until a pass finds nothing and applies what it read in
  stamp order before it applies anything else (:meth:`pump`), one pump at a time;
* while an owner is down its peers hold its commands (:class:`~spoe_agent.workers.router.Backlog`);
  a restarted owner says HELLO(fresh) to every live peer, each writes its backlog then SYNC on a
  new bulk link, and the owner applies nothing (and serves no HAProxy connection) before it has
  every SYNC.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import count
from typing import Any

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore
from gevent.monkey import get_original

from spoe_agent.handlers import MetricSample
from spoe_agent.logs import EVERY_TIME
from spoe_agent.protocol.types import SetVar
from spoe_agent.tracing.language import Command, has_inject
from spoe_agent.workers.owners import OwnerTable
from spoe_agent.workers.router import (
    BATCH,
    COMMAND,
    HELLO,
    NUDGE,
    REPLY,
    SYNC,
    Backlog,
    FrameError,
    FrameReader,
    Reorderer,
    commands_of,
    encode,
    encode_batch,
    encode_command,
    encode_reply,
    reply_actions,
)
from spoe_agent.workers.write_counts import WriteCounts

log = logging.getLogger(__name__)

# The real socket class even under monkey-patching: these sockets are non-blocking and waited
# on explicitly, so a recv that finds nothing returns at once instead of switching greenlets.
_socket_class = get_original("socket", "socket")
_AF_UNIX = get_original("socket", "AF_UNIX")
_SOCK_STREAM = get_original("socket", "SOCK_STREAM")
_poll = get_original("select", "poll")
_POLLIN = get_original("select", "POLLIN")

#: The longest a forwarded fire-and-forget command waits in an idle owner's socket buffer.
TICK_S = 0.01
_RECV = 256 * 1024
# One buffer for every read of a peer link, copied out by the size read: a fresh ``recv(_RECV)``
# has malloc map and unmap 256 KiB each time (measured: an mmap, a munmap and often an mremap
# system call per read with two workers). Reads never yield, so one buffer serves them all.
_RECV_BUFFER = bytearray(_RECV)
_RECV_VIEW = memoryview(_RECV_BUFFER)
_MAX_PASSES = 16
_PLAIN_MESSAGES_LIMIT = 1024
_RECENT_FORWARDS_LIMIT = 65536
#: A forward's time until the kernel has it: later than any drain.
_IN_FLIGHT = 1 << 62
#: Keys per frame of the sessions a worker tells a restarted peer about (frames stay far
#: below MAX_FRAME whatever max_sessions is).
_SNAPSHOT_KEYS = 8192
_DIGEST_MASK = (1 << 60) - 1
_DOWN_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOTSOCK}
_NUDGE_FRAME = encode((NUDGE,))
_SYNC_FRAME = encode((SYNC,))
#: Counters always present in :meth:`PeerMesh.counters`, so the metrics exist before they move.
STAT_KEYS = (
    "forwarded",  # commands written to their owner
    "forwarded_inject",  # ... of which inject RPCs
    "received",  # commands applied here for another worker
    "held",  # commands kept for an owner that was down
    "held_dropped",  # ... dropped: the owner stayed down too long or too many piled up
    "inject_timeout",  # inject RPCs not answered in time (HAProxy got no context variables)
    "inject_unavailable",  # inject RPCs for an owner that was down (same consequence)
    "peer_errors",  # peer connections dropped for a protocol error
    "drain_cut_short",  # drains that never got a quiet pass (see pump): order not guaranteed
    "lost_with_owner",  # commands of sessions that died with their worker, dropped (LOST)
)
#: The owner the table gives the sessions a worker had open when it died (worker indexes stay
#: far below it): their later events are dropped, counted, for one session TTL. Applied by
#: another worker they would open sessions there, each a fragment of its trace without its
#: root (the root died with the worker), looking like a whole request.
LOST = 0xFFFF


def _digest(key: str) -> int:
    """What the table of the sessions peers own is keyed by: it holds every session the other
    workers have open, and 2 KiB per open session is the budget (docs/scaling.md), so it keeps
    a fixed-size number (:class:`~spoe_agent.workers.owners.OwnerTable`), not the key (a
    unique-id string costs 85 B). ``hash()`` is cached in the string. Two open keys with one
    digest, a chance of about one in 10^13 per new session at 100,000 open ones, would share an
    owner."""
    return hash(key) & _DIGEST_MASK


def peer_path(runtime_dir: str, index: int) -> str:
    return os.path.join(runtime_dir, f"peer-{index}.sock")


class _Link:
    """One unix stream connection to or from a peer, with a write buffer that never blocks.

    ``queued``/``sent`` count bytes over the link's life, so a writer can tell whether *its*
    frame reached the kernel even when later bytes could not.
    """

    __slots__ = ("sock", "fd", "peer", "urgent", "outbound", "reader", "out", "queued", "sent",
                 "closed", "stale", "watcher", "_waiters", "_writer", "_mesh", "_wrote")

    def __init__(self, mesh: PeerMesh, sock: Any, peer: int | None, *, urgent: bool,
                 outbound: bool) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.urgent = urgent
        self.outbound = outbound
        self.reader = FrameReader()
        self.out = bytearray()
        self.queued = 0
        self.sent = 0
        self.closed = False
        #: An inbound link of a peer's previous incarnation: its commands still apply, its
        #: announcements no longer do.
        self.stale = False
        self.watcher: gevent.Greenlet | None = None  # the greenlet reading this link, if any
        self._waiters: list[tuple[int, Event]] = []
        self._writer: gevent.Greenlet | None = None
        self._mesh = mesh
        #: Counts what reached the kernel, for the peer's drains (:mod:`.write_counts`).
        self._wrote: Callable[[], None] | None = (
            partial(mesh._writes.wrote, peer) if outbound and peer is not None else None)

    def send(self, data: bytes) -> int:
        """Queue ``data``, writing what the kernel takes now; the end offset, or -1 if closed."""
        if self.closed:
            return -1
        self.queued += len(data)
        end = self.queued
        if self.out:
            self.out += data
            return end
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.close()
            return -1
        self.sent += n
        if n and self._wrote is not None:
            self._wrote()
        if n < len(data):
            self.out += data[n:]
            if self._writer is None:
                self._writer = gevent.spawn(self._write_loop)
            if self.outbound and not self.urgent:
                self._mesh._nudge(self.peer)  # the owner is not watching this link: wake it
        return end

    def wait_sent(self, end: int) -> bool:
        """Whether the bytes up to ``end`` reached the kernel (waiting for them if need be)."""
        if self.sent >= end:
            return True
        if self.closed:
            return False
        ready = Event()
        self._waiters.append((end, ready))
        ready.wait()
        return self.sent >= end

    def _write_loop(self) -> None:
        hub = gevent.get_hub()
        watcher = hub.loop.io(self.fd, 2)
        try:
            while self.out and not self.closed:
                hub.wait(watcher)
                try:
                    n = self.sock.send(self.out)
                except BlockingIOError:
                    continue
                except OSError:
                    self.close()
                    break
                del self.out[:n]
                self.sent += n
                if n and self._wrote is not None:
                    self._wrote()
                self._wake()
        finally:
            watcher.close()
            self._writer = None

    def _wake(self) -> None:
        if not self._waiters:
            return
        keep = []
        for end, ready in self._waiters:
            if end <= self.sent or self.closed:
                ready.set()
            else:
                keep.append((end, ready))
        self._waiters = keep

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        self._wake()
        # A greenlet waiting on this fd must drop its libev watcher before the fd is closed;
        # kill() and run_callback() run in order, so the close comes after.
        current = gevent.getcurrent()
        pending = [g for g in (self.watcher, self._writer) if g is not None and g is not current]
        for greenlet in pending:
            greenlet.kill(block=False)
        if pending:
            gevent.get_hub().loop.run_callback(_close_quietly, self.sock)
        else:
            _close_quietly(self.sock)
        self._mesh._on_link_closed(self)


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


class PeerMesh:
    """Routes compiled commands to their owner worker and applies the ones this worker owns.

    The owner of a session is the worker that received its first event (docs/scaling.md says
    why): this worker when ``registry`` holds the key, else the peer that announced it, else
    this worker, which then takes it. ``registry`` is this worker's
    :class:`~spoe_agent.tracing.registry.SessionRegistry`; its ``apply`` must not yield (it
    does not: the registry is pure Python and its span processor only enqueues).
    """

    def __init__(
        self,
        index: int,
        workers: int,
        runtime_dir: str,
        registry: Any,
        *,
        rpc_timeout: float = 0.2,
        sync_timeout: float = 2.0,
        retry_interval: float = 0.05,
        tick: float = TICK_S,
        backlog_items: int = 65536,
        backlog_age: float = 10.0,
        lost_window: float = 30.0,
    ) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} out of range for {workers} workers")
        self.index = index
        self.workers = workers
        self.runtime_dir = runtime_dir
        self._registry = registry
        self._apply: Callable[[Command], list[SetVar]] = registry.apply
        self._remembers: Callable[[str], bool] = registry.remembers
        registry.on_end = self._ended
        #: The open sessions peers own, by a 60-bit hash of their key (:func:`_digest`):
        #: learned from their announcements.
        self._owners = OwnerTable()
        #: What this worker took (True) or dropped (False) since it last told its peers.
        self._announce: dict[str, bool] = {}
        #: Whether ``_announce`` holds a session taken: those must reach the peers before the
        #: ACK of the event that opened them; what was dropped can wait (:meth:`_read_ends`).
        self._took = False
        #: Per peer, the keys of the commands forwarded to it lately, with when the kernel had
        #: them (:data:`_IN_FLIGHT` until then), oldest first: an "ended" that crossed such a
        #: forward leaves the entry (:meth:`_learn`) ...
        self._forwarded: list[dict[str, int]] = [{} for _ in range(workers)]
        #: ... until the peer's word on the forward: per peer, the keys whose "ended" was left
        #: for that reason, with the forward's time.
        self._crossed: list[dict[str, int]] = [{} for _ in range(workers)]
        #: When the last pass of the last pump that applied what it read began: everything
        #: peers wrote to this worker before then has been applied (:meth:`_learn`).
        self._drained_ns = 0
        #: How many writes the peers had counted to this worker when the last pump that
        #: applied all it read began (:meth:`_read_begins`).
        self._writes = WriteCounts(runtime_dir, workers, index)
        self._drained_writes = -1
        self.rpc_timeout = rpc_timeout
        self.sync_timeout = sync_timeout
        self.retry_interval = retry_interval
        self.tick = tick
        #: How long the sessions of a worker that died stay :data:`LOST` (the session TTL:
        #: what a registry remembers evicted keys for), and until when they do.
        self.lost_window = lost_window
        self._lost_until = 0.0
        self.stats: Counter[str] = Counter(dict.fromkeys(STAT_KEYS, 0))
        self.apply_errors = 0
        self._bulk: list[_Link | None] = [None] * workers
        self._urgent: list[_Link | None] = [None] * workers
        self._inbound: list[_Link] = []
        self._backlogs = [Backlog(backlog_items, backlog_age) for _ in range(workers)]
        self._next_try = [0.0] * workers
        self._reorder = Reorderer()
        self._pump_lock = Semaphore()
        self._poller = _poll()
        self._listener_fd = -1
        self._pending: dict[int, tuple[int, AsyncResult]] = {}
        self._rpc_ids = count(1)
        self._syncing = True
        self._awaiting_sync: set[int] = set()
        self._synced = Event()
        self._listener: Any = None
        self._greenlets: list[gevent.Greenlet] = []
        self._stopped = False
        #: Whether the server calls :meth:`pump` after every read that brought NOTIFYs, before
        #: it handles them (:meth:`drain_per_read`); :meth:`route` then applies a local command
        #: without draining again.
        self.drains_per_read = False
        #: The fire-and-forget commands of the reads being handled, by reading greenlet, then
        #: by owner: written once per owner when the read's NOTIFYs are handled (:meth:`forward`).
        self._batches: dict[Any, dict[int, list[Command]]] = {}
        #: Message names seen without an ``inject`` argument, with their argument count
        #: (:meth:`waits_for_owner`).
        self._plain_messages: dict[str, int] = {}

    # ------------------------------------------------------------------------ request path

    def drain_per_read(self, before_notifies: list[Callable[[], None]],
                       after_notifies: list[Callable[[], None]]) -> None:
        """Drain once per read of NOTIFYs (the server's ``Agent.before_notifies`` hooks)
        rather than before each local command (see :meth:`pump` for why that is enough), and
        write the read's forwarded commands once per owner (``after_notifies``, which the
        server runs before it queues the read's ACKs: see :meth:`forward`)."""
        before_notifies.append(self._read_begins)
        after_notifies.append(self._read_ends)
        self.drains_per_read = True

    def _read_begins(self) -> None:
        """Drain before a read's NOTIFYs are handled, unless no peer has written anything
        since the last drain began (:mod:`.write_counts`): every write that the ACK of a
        predecessor of these events waited for was counted before that ACK, so before the
        read. A pump still running in another greenlet is waited for all the same (it may
        hold such a predecessor, read and not yet applied)."""
        self._batches[gevent.getcurrent()] = {}
        if self._pump_lock.locked() or self._writes.written_to_me() != self._drained_writes:
            self.pump()

    def _read_ends(self) -> None:
        """Write the read's forwards and the sessions it opened, before its ACKs are queued.

        Sessions dropped are only written along (or by the next pump, at the latest the tick):
        a peer that routes an event of a dropped session to this worker meanwhile is the
        "end that crosses a forward" case (docs/scaling.md), which the owner handles whatever
        the delay. With one busy connection that is one write per request instead of two.
        """
        batch = self._batches.pop(gevent.getcurrent(), None)
        if batch or self._took:
            self._write_batches(batch or {})
        self._wait_written()

    @property
    def peer_sessions(self) -> int:
        """How many open sessions this worker knows other workers own."""
        return len(self._owners)

    def owner(self, key: str) -> int:
        """Where session ``key`` lives, as far as this worker knows once it has drained: a
        session nobody announced is new, and becomes this worker's."""
        if key in self._registry:
            return self.index
        owner = self._owners.get(_digest(key))
        return self.index if owner is None else owner

    def route(self, command: Command) -> list[SetVar]:
        """Apply ``command`` here if this worker owns its session, else forward it."""
        if not self.drains_per_read:
            self.pump()
        key = command[0]
        if key in self._registry:
            return self._apply(command)
        owner = self._owners.get(_digest(key))
        if owner is None:
            actions = self._apply(command)
            if key in self._registry:
                self._announce[key] = True  # it opened the session: this worker's now
                self._took = True
            if self._announce and not (self._batches and gevent.getcurrent() in self._batches):
                # Not in a read whose end writes it: the announcement goes before the ACK.
                self._write_batches({})
                self._wait_written()
            return actions
        if owner == LOST:
            self.stats["lost_with_owner"] += 1
            return []
        if has_inject(command):
            return self._call(owner, command)
        return self.forward(owner, command)

    def keep_own(self, commands: list[Command]) -> list[Command]:
        """Forward the commands of sessions other workers own, as :meth:`route` does, apply
        those of sessions nobody owns yet (the ones that open one make it this worker's, which
        its peers must know before the ACK), and return this worker's own, for the caller to
        apply once their NOTIFY's ACK is written.

        Only for commands that inject nothing (their ACK carries no variables), and only with
        ``drains_per_read``. A forwarded command must be in its owner's buffer before its ACK
        exists: it joins the read's batch, written before the read's ACKs are queued. An own
        command can wait: its successor is sent only once HAProxy reads this ACK, and reaches
        this worker either in a later read (drained first if a peer wrote) or forwarded,
        which only a pump applies; the server runs the deferred work before the connection can
        yield, so before any pump. HAProxy's stream then no longer waits for this worker's
        spans, as with a single process.
        """
        own = []
        registry = self._registry
        owners = self._owners
        for command in commands:
            key = command[0]
            if key in registry:
                own.append(command)
                continue
            owner = owners.get(_digest(key))
            if owner is not None:
                if owner == LOST:
                    self.stats["lost_with_owner"] += 1
                else:
                    self.forward(owner, command)
                continue
            # Applied now rather than after the ACK, so that what the registry holds is what
            # this worker has announced (a restarted peer is told the registry's keys).
            try:
                self._apply(command)
            except Exception:
                self.apply_errors += 1
                log.exception("applying SPOE message of session %r failed", key)
            if key in registry:
                self._announce[key] = True  # written with the read's batch, before its ACK
                self._took = True
        return own

    def waits_for_owner(self, messages: list[Any]) -> bool:
        """Whether a NOTIFY holds an inject for a session another worker owns.

        Such a NOTIFY waits for the owner's answer; the server then runs it in a greenlet of
        its own (``Agent.needs_greenlet``), so the NOTIFYs HAProxy pipelined behind it on the
        same connection do not wait as well. The others stay inline: cheaper.

        HAProxy sends a message's arguments as its configuration lists them, so a message
        name seen once without ``inject`` (with as many arguments) is not searched again. The
        answer is only a choice of greenlet: an inject handled inline is still right, its
        read just waits for the owner.
        """
        plain = self._plain_messages
        for message in messages:
            args = message.args
            if plain.get(message.name) == len(args):
                continue
            key = None
            inject = False
            for name, value in args:
                if name == "inject":
                    inject = True
                elif name == "id" and key is None and type(value) is str:
                    key = value
            if not inject:
                if len(plain) >= _PLAIN_MESSAGES_LIMIT:
                    plain.clear()
                plain[message.name] = len(args)
            elif key is not None and self.owner(key) not in (self.index, LOST):
                return True
        return False

    def forward(self, owner: int, command: Command) -> list[SetVar]:
        """Hand a fire-and-forget ``command`` to ``owner``; returns once the kernel has it (or
        it is held for a restarting owner), or, in a read the server handles inline, once it
        is in that read's batch.

        A batch is written when the read's NOTIFYs are handled and before their ACKs are
        queued, so the rule that makes order (a command is in its owner's socket buffer before
        its ACK exists) holds for each of its commands, and each stamp still follows its
        stream's order: a batch is stamped when it is written, after every ACK that its
        commands' predecessors waited for. One write per owner and read rather than one per
        command saves, per forwarded command, a ``send`` system call and the Python around
        it (gevent's socket method, the link's bookkeeping, a frame to cut and order).
        """
        if self._batches:
            batch = self._batches.get(gevent.getcurrent())
            if batch is not None:
                pending = batch.get(owner)
                if pending is None:
                    batch[owner] = [command]
                else:
                    pending.append(command)
                return []
        self._write_batches({owner: [command]})
        return []

    def _write_batches(self, batch: dict[int, list[Command]]) -> None:
        """Write each owner's commands as one frame, with what this worker announces (then to
        every peer), and wait until the kernel has them all (an owner that is down, or dies
        with the link, gets its commands from its backlog instead; its announcements it gets
        whole when it restarts, :meth:`_on_hello`)."""
        owns, ended = self._take_announcements()
        peers: Iterable[int] = batch
        if owns or ended:
            peers = [peer for peer in range(self.workers) if peer != self.index]
        written = []
        for owner in peers:
            commands = batch.get(owner, ())
            link = self._bulk[owner]
            if link is None or link.closed:
                link = self._connect(owner, urgent=False)
                if link is None:
                    if commands:
                        self._hold(owner, encode_batch(commands), len(commands))
                    continue
            if commands:
                self._remember_forward(owner, commands, _IN_FLIGHT)
            data = encode_batch(commands, None, owns, ended, self._drained_ns)
            written.append((owner, link, link.send(data), commands))
        for owner, link, end, commands in written:
            if end < 0 or not link.wait_sent(end):
                if commands:
                    self._hold(owner, encode_batch(commands), len(commands))
            elif commands:
                self.stats["forwarded"] += len(commands)
            if commands:
                self._remember_forward(owner, commands, time.monotonic_ns())

    def _take_announcements(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        pending = self._announce
        if not pending:
            return (), ()
        self._announce = {}
        self._took = False
        owns = tuple([key for key, took in pending.items() if took])
        return owns, tuple([key for key, took in pending.items() if not took])

    def _send_announcements(self) -> None:
        """Tell every peer what this worker took and dropped, without waiting: for what no
        ACK waits on (what a pump or an expiry changed). A later :meth:`_wait_written` before an
        ACK covers these bytes too, should a read's own announcements have left with them."""
        owns, ended = self._take_announcements()
        if not (owns or ended):
            return
        data = encode_batch((), None, owns, ended, self._drained_ns)
        for peer in range(self.workers):
            if peer == self.index:
                continue
            link = self._bulk[peer]
            if link is None or link.closed:
                link = self._connect(peer, urgent=False)
            if link is not None:
                link.send(data)

    def _wait_written(self) -> None:
        """Wait until the kernel has everything queued on the bulk links (usually already)."""
        for link in self._bulk:
            if link is not None and link.out:
                link.wait_sent(link.queued)

    def _ended(self, key: str) -> None:
        """The registry dropped session ``key``: the peers are told at the next write."""
        self._announce[key] = False

    def _remember_forward(self, owner: int, commands: Iterable[Command], stamp: int) -> None:
        recent = self._forwarded[owner]
        for command in commands:
            key = command[0]
            if recent.pop(key, None) is None and len(recent) >= _RECENT_FORWARDS_LIMIT:
                del recent[next(iter(recent))]
            recent[key] = stamp

    def _learn(self, peer: int, owns: tuple[str, ...], ended: tuple[str, ...],
               drained_ns: int) -> None:
        """A peer's announcements, in stamp order with everything else it wrote.

        An "ended" may cross a command this worker forwarded to that peer for the same key
        (a key reused, or an event after the end): written before the peer applied the
        forward, which then opens the session anew there (and the peer announces it again),
        while this worker, were it to drop its entry, would take the stream's next event
        itself. The peer's frame says up to when it has applied everything written to it
        (``drained_ns``): a forward the kernel had before then was applied, and the entry
        goes; a later one keeps it until a frame says the forward was applied (the peer
        announced the session again by then if the forward opened it).
        """
        recent = self._forwarded[peer]
        while recent:
            oldest = next(iter(recent))
            if recent[oldest] >= drained_ns:
                break
            del recent[oldest]
        owners = self._owners
        crossed = self._crossed[peer]
        for key in ended:
            digest = _digest(key)
            if owners.get(digest) != peer:
                continue
            when = recent.get(key)
            if when is None:
                owners.remove(digest)
                crossed.pop(key, None)
            else:
                crossed[key] = when
        for key in owns:
            owners.set(_digest(key), peer)
            crossed.pop(key, None)
        if crossed:
            for key, when in list(crossed.items()):
                if when < drained_ns:
                    del crossed[key]
                    owners.remove_if(_digest(key), peer)

    def _call(self, owner: int, command: Command) -> list[SetVar]:
        """An inject: the owner applies it and answers with the variables HAProxy must set."""
        if self._batches:
            # Handled inline after all: what this read forwarded so far goes first, in order.
            current = gevent.getcurrent()
            batch = self._batches.get(current)
            if batch:
                self._batches[current] = {}
                self._write_batches(batch)
        stamp = time.monotonic_ns()
        bulk = self._bulk[owner]
        if bulk is None or bulk.closed:
            # Connecting the bulk link first writes what was held for this owner, in order.
            bulk = self._connect(owner, urgent=False)
        link = self._urgent[owner] if bulk is not None else None
        if bulk is not None and (link is None or link.closed):
            link = self._connect(owner, urgent=True, force=True)  # the owner is up
        if link is None:
            self._hold(owner, encode_command(command, 0, stamp))
            self.stats["inject_unavailable"] += 1
            return []
        rpc_id = next(self._rpc_ids)
        result = AsyncResult()
        self._pending[rpc_id] = (owner, result)
        self._remember_forward(owner, (command,), _IN_FLIGHT)
        end = link.send(encode_command(command, rpc_id, stamp))
        sent = end >= 0 and link.wait_sent(end)
        self._remember_forward(owner, (command,), time.monotonic_ns())
        if not sent:
            self._pending.pop(rpc_id, None)
            self._hold(owner, encode_command(command, 0, stamp))
            self.stats["inject_unavailable"] += 1
            return []
        self.stats["forwarded"] += 1
        self.stats["forwarded_inject"] += 1
        try:
            return result.get(timeout=self.rpc_timeout)
        except gevent.Timeout:
            self._pending.pop(rpc_id, None)
            self.stats["inject_timeout"] += 1
            return []

    def _hold(self, owner: int, data: bytes, commands: int = 1) -> None:
        self._backlogs[owner].add(data, commands=commands)
        self.stats["held"] += commands
        link = self._bulk[owner]
        if link is not None and not link.closed:
            # A newer link exists already (the owner restarted meanwhile): send it on.
            link.send(self._backlogs[owner].take())

    def _nudge(self, peer: int | None) -> None:
        if peer is None:
            return
        link = self._urgent[peer]
        if link is None or link.closed:
            link = self._connect(peer, urgent=True, force=True)
        if link is not None:
            link.send(_NUDGE_FRAME)

    def pump(self) -> None:
        """Read everything every inbound link holds, then apply it in stamp order.

        Reading the links one after the other takes time (the process can even be descheduled
        between two reads), so one pass may miss event k on a link it read early and still get
        event k+1 from a link it read late. Hence passes until one reads nothing: whatever was
        read then was written before that last pass began, and so was everything that came
        before it in its stream, which that pass would have found had it not been read already.
        (Bounded: an owner that never sees a quiet pass applies what it has after
        :data:`_MAX_PASSES`, counted as ``drain_cut_short``.)

        One pump after a read of NOTIFYs is enough for all of them (``drains_per_read``): an
        event's forwarded predecessor was written before its ACK, so before HAProxy sent the
        event and so before the read; and an event's successor cannot exist before the
        event's ACK is written, which is after the event was applied. A pump that another
        greenlet began earlier and has not finished holds the lock, so this one (and the
        read's events) wait for it.

        Reads are non-blocking and replies are queued, not awaited; ``apply`` should not yield
        either (the one yield it had, the OpenTelemetry resource's detection, now happens
        before serving: ``tracing.pipeline.Resources``), but if it ever does, one pump holds
        the others off until it has applied all it read: two interleaved pumps would each
        apply in order, but not in order with each other. Until this worker has every SYNC it only collects, so a
        restarted owner applies its peers' held commands before (in stamp order with)
        anything newer.
        """
        with self._pump_lock:
            self._pump()

    def _pump(self) -> None:
        reorder = self._reorder
        writes = self._writes.written_to_me()  # before any pass reads what they counted
        for _ in range(_MAX_PASSES):
            # A pass reads each link that had data when it began until the link is empty, so
            # whatever was written before the last pass began is read (and applied below).
            began = time.monotonic_ns()
            if not self._read_inbound(reorder):
                break
        else:
            # Peers write faster than this worker reads (it is overloaded): apply what was
            # read rather than starve, at a small risk to order, and say so.
            self.stats["drain_cut_short"] += 1
            writes = -1  # some of it is still unread: the next read drains whatever the counts
        if self._syncing:
            return
        if reorder:
            self._apply_forwarded(reorder)
        self._drained_ns = began
        self._drained_writes = writes
        if self._announce:
            self._send_announcements()

    def _apply_forwarded(self, reorder: Reorderer) -> None:
        received = 0
        apply = self._apply
        registry = self._registry
        announce = self._announce
        for link, frame in reorder.pop_all():
            actions: list[SetVar] = []
            for command in self._commands(frame):
                received += 1
                key = command[0]
                try:
                    known = key in registry
                    actions = apply(command)
                    if not known:
                        if key in registry:
                            announce[key] = True  # opened here: the peers learn it
                        elif not self._remembers(key):
                            # Gone already (and not an eviction this worker answers for): the
                            # forwarder learns it, rather than route the key here for ever.
                            announce[key] = False
                except Exception:
                    self.apply_errors += 1
                    log.exception("applying a forwarded command failed")
                    actions = []
            if frame[0] == COMMAND:
                if frame[2]:
                    link.send(encode_reply(frame[2], actions))
            elif len(frame) == 6 and not link.stale and (frame[3] or frame[4]):
                try:
                    self._learn(link.peer, frame[3], frame[4], frame[5])
                except Exception:  # not what a peer of ours writes
                    self.apply_errors += 1
                    log.exception("a peer's announcements are not keys")
        self.stats["received"] += received

    def _commands(self, frame: tuple[Any, ...]) -> list[Command]:
        try:
            return commands_of(frame)
        except Exception:  # not what a peer of ours writes: counted, and nothing applied
            self.apply_errors += 1
            log.exception("a forwarded frame holds no commands")
            return []

    def _read_inbound(self, reorder: Reorderer) -> bool:
        """One pass over the inbound links that have data; whether it read anything.

        One ``poll`` says which links (and whether the listener: a peer that just connected
        may have a command in a link not accepted yet) have something, so a pass that finds
        nothing, the common case before applying a local command, costs one system call.
        """
        ready = self._poller.poll(0)
        if not ready:
            return False
        fds = {fd for fd, _ in ready}
        new = self._accept_pending() if self._listener_fd in fds else ()
        got = False
        # Closing a link rebinds self._inbound rather than mutating it, so this stays valid.
        for link in self._inbound:
            if link.closed or (link.fd not in fds and link not in new):
                continue
            sock = link.sock
            while True:
                try:
                    data = _RECV_VIEW[:sock.recv_into(_RECV_BUFFER)].tobytes()
                except BlockingIOError:
                    break
                except OSError:
                    link.close()
                    break
                if not data:
                    link.close()
                    break
                got = True
                try:
                    frames = link.reader.feed(data)
                except FrameError as exc:
                    self.stats["peer_errors"] += 1
                    log.warning("dropping a peer connection: %s", exc)
                    link.close()
                    break
                for frame in frames:
                    kind = frame[0]
                    if kind == BATCH or kind == COMMAND:
                        if len(frame) < 3 or type(frame[1]) is not int:
                            self.stats["peer_errors"] += 1
                            log.warning("dropping a peer connection: a frame without a stamp")
                            link.close()
                            break
                        reorder.push(frame[1], link, frame)
                    elif kind == HELLO:
                        self._on_hello(link, frame)
                    elif kind == SYNC:
                        self._on_sync(link)
                if len(data) < _RECV:
                    break  # a short read took all the kernel had
        return got

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Listen, greet every peer, and return once each has sent what it held for us.

        At a cold start the peers start too: their sockets are waited for (within
        ``sync_timeout``), so no worker serves HAProxy before it can reach the others.
        """
        path = peer_path(self.runtime_dir, self.index)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = _socket_class(_AF_UNIX, _SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._listener_fd = listener.fileno()
        self._poller.register(self._listener_fd, _POLLIN)
        self._greenlets.append(gevent.spawn(self._accept_loop))
        deadline = time.monotonic() + self.sync_timeout
        missing = set(range(self.workers)) - {self.index}
        while missing:
            for peer in sorted(missing):
                if self._connect(peer, urgent=False, fresh=True) is not None:
                    missing.discard(peer)
                    self._awaiting_sync.add(peer)
            if not missing or time.monotonic() >= deadline:
                break
            gevent.sleep(self.retry_interval)
        while self._awaiting_sync:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._synced.clear()  # set by any SYNC: the set may have emptied and refilled
            self._synced.wait(remaining)
        late = sorted(missing | self._awaiting_sync)
        if late:
            log.warning("workers %s not ready within %.1fs; going on without them", late,
                        self.sync_timeout)
        self._syncing = False
        self.pump()
        self._greenlets.append(gevent.spawn(self._tick_loop))
        self._greenlets.append(gevent.spawn(self._housekeeping))
        log.info("routing sessions as worker %d of %d, %d peers connected", self.index,
                 self.workers, sum(1 for link in self._bulk if link and not link.closed))

    def stop(self) -> None:
        """Apply what peers already sent, then close every link."""
        if self._stopped:
            return
        self._stopped = True
        self._syncing = False
        self.pump()
        self._registry.on_end = None  # the agent is stopping: no peer needs to know
        gevent.killall(self._greenlets)
        if self._listener is not None:
            self._poller.unregister(self._listener_fd)
            self._listener.close()
            self._listener = None
            try:
                os.unlink(peer_path(self.runtime_dir, self.index))
            except OSError:
                pass
        for link in [*self._inbound, *self._bulk, *self._urgent]:
            if link is not None:
                link.close()
        held = sum(b.commands for b in self._backlogs)
        if held:
            log.info("%d forwarded commands held for stopped workers discarded", held)

    # ----------------------------------------------------------------------- connections

    def _connect(self, peer: int, *, urgent: bool, fresh: bool = False,
                 force: bool = False) -> _Link | None:
        """A new outbound link to ``peer``; a bulk one starts with HELLO and what was held.

        Lazy reconnects are rate-limited, so a dead owner costs its forwarders one failed
        ``connect`` per interval rather than one per command.
        """
        now = time.monotonic()
        if not (fresh or force) and now < self._next_try[peer]:
            return None
        self._next_try[peer] = now + self.retry_interval
        sock = _socket_class(_AF_UNIX, _SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(peer_path(self.runtime_dir, peer))
        except OSError as exc:
            sock.close()
            if exc.errno not in _DOWN_ERRNOS:
                log.warning("cannot connect to worker %d: %s", peer, exc)
            return None
        link = _Link(self, sock, peer, urgent=urgent, outbound=True)
        links = self._urgent if urgent else self._bulk
        old = links[peer]
        links[peer] = link
        if old is not None and not old.closed:
            # Bytes already written stay readable by the peer after this close.
            old.close()
        hello = encode((HELLO, self.index, fresh, urgent))
        if urgent:
            link.send(hello)
            link.watcher = gevent.spawn(self._reply_loop, link)
        else:
            link.send(hello + self._backlogs[peer].take())
        return link

    def _accept_pending(self) -> list[_Link]:
        listener = self._listener
        new: list[_Link] = []
        if listener is None:
            return new
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return new
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    log.warning("accepting a peer connection failed: %s", exc)
                return new
            link = _Link(self, sock, None, urgent=False, outbound=False)
            self._add_inbound(link)
            new.append(link)

    def _add_inbound(self, link: _Link) -> None:
        self._inbound = [*self._inbound, link]
        self._poller.register(link.fd, _POLLIN)
        link.watcher = gevent.spawn(self._inbound_loop, link)

    def _accept_loop(self) -> None:
        hub = gevent.get_hub()
        watcher = hub.loop.io(self._listener.fileno(), 1)
        try:
            while True:
                hub.wait(watcher)
                self.pump()  # accepts, and applies anything the new link already carries
        finally:
            watcher.close()

    def _inbound_loop(self, link: _Link) -> None:
        """Watch an inbound link until its HELLO says it is a bulk one (those are drained by
        :meth:`pump`, not watched), for as long as it lives if it is urgent."""
        hub = gevent.get_hub()
        watcher = hub.loop.io(link.fd, 1)
        try:
            while not link.closed:
                self.pump()
                if link.closed or (link.peer is not None and not link.urgent
                                   and not self._syncing):
                    break
                hub.wait(watcher)
        finally:
            watcher.close()
            if link.watcher is gevent.getcurrent():
                link.watcher = None

    def _reply_loop(self, link: _Link) -> None:
        hub = gevent.get_hub()
        watcher = hub.loop.io(link.fd, 1)
        pending = self._pending
        try:
            while not link.closed:
                hub.wait(watcher)
                try:
                    data = _RECV_VIEW[:link.sock.recv_into(_RECV_BUFFER)].tobytes()
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    link.close()
                    break
                try:
                    frames = link.reader.feed(data)
                except FrameError as exc:
                    self.stats["peer_errors"] += 1
                    log.warning("dropping the link to worker %s: %s", link.peer, exc)
                    link.close()
                    break
                for frame in frames:
                    if frame[0] == REPLY:
                        waiting = pending.pop(frame[1], None)
                        if waiting is not None:
                            waiting[1].set(reply_actions(frame))
        finally:
            watcher.close()

    def _tick_loop(self) -> None:
        """Bound how long forwarded commands wait in an idle owner's bulk buffers."""
        while True:
            gevent.sleep(self.tick)
            self.pump()

    def _on_hello(self, link: _Link, frame: tuple[Any, ...]) -> None:
        peer = frame[1] if len(frame) > 2 else None
        if type(peer) is not int or not 0 <= peer < self.workers or peer == self.index:
            self.stats["peer_errors"] += 1
            link.close()
            return
        link.peer = peer
        link.urgent = bool(frame[3]) if len(frame) > 3 else False
        if frame[2]:
            # A (re)started peer: a new bulk link carries what we held for it, the sessions we
            # own (it knows none), then SYNC. Any older link went to its previous incarnation
            # (or, in a race, already to this one, which still reads what that link delivered).
            # The sessions its previous incarnation owned died with it.
            old = self._urgent[peer]
            if old is not None:
                old.close()
            # What was held for it, and the later events of its sessions, belong to sessions
            # that died with it: dropped rather than applied by anyone (see LOST).
            lost = self._owners.retag(peer, LOST)
            dropped = self._backlogs[peer].discard()
            self.stats["lost_with_owner"] += dropped
            if lost or dropped:
                self._lost_until = time.monotonic() + self.lost_window
                log.info("worker %d restarted: the %d sessions it had open died with it; their "
                         "events are dropped for %.0fs (%d held for it dropped)", peer, lost,
                         self.lost_window, dropped, extra=EVERY_TIME)
            self._forwarded[peer] = {}
            self._crossed[peer] = {}
            for other in self._inbound:
                if other.peer == peer and other is not link:
                    other.stale = True  # what the dead one announced and is still unread
            out = self._connect(peer, urgent=False, force=True)
            if out is not None:
                owned = self._registry.keys()
                for start in range(0, len(owned), _SNAPSHOT_KEYS):
                    out.send(encode_batch((), None, tuple(owned[start:start + _SNAPSHOT_KEYS])))
                out.send(_SYNC_FRAME)

    def _on_sync(self, link: _Link) -> None:
        self._awaiting_sync.discard(link.peer)  # type: ignore[arg-type]
        self._synced.set()

    def _on_link_closed(self, link: _Link) -> None:
        log.debug("%s %s link %s worker %s closed", "outbound" if link.outbound else "inbound",
                  "urgent" if link.urgent else "bulk", "to" if link.outbound else "from",
                  link.peer)
        if not link.outbound:
            self._inbound = [other for other in self._inbound if other is not link]
            try:
                self._poller.unregister(link.fd)
            except KeyError:
                pass
            return
        peer = link.peer
        assert peer is not None
        if self._bulk[peer] is link:
            self._bulk[peer] = None
            self._next_try[peer] = 0.0
        if self._urgent[peer] is link:
            self._urgent[peer] = None
            # RPCs waiting on a dead owner get no answer: unblock them now.
            for rpc_id, (owner, result) in list(self._pending.items()):
                if owner == peer:
                    del self._pending[rpc_id]
                    result.set([])
                    self.stats["inject_unavailable"] += 1

    def _housekeeping(self) -> None:
        """Drop held commands that aged out, forget the sessions lost with a worker once
        their window passed, and retry owners that are still down."""
        while True:
            gevent.sleep(0.5)
            if self._lost_until and time.monotonic() >= self._lost_until:
                self._lost_until = 0.0
                self._owners.forget_owner(LOST)
            for peer, backlog in enumerate(self._backlogs):
                if backlog:
                    backlog.expire()
                    link = self._bulk[peer]
                    if link is None or link.closed:
                        self._connect(peer, urgent=False, force=True)

    # --------------------------------------------------------------------------- metrics

    def counters(self) -> dict[str, int]:
        out = dict(self.stats)
        out["held_dropped"] = sum(b.dropped for b in self._backlogs)
        return out

    def metric_samples(self) -> Iterator[MetricSample]:
        for name, value in sorted(self.counters().items()):
            yield ("spoe_agent_worker_routing", "counter",
                   "Session-owner routing between workers (commands forwarded, received, held)",
                   {"event": name}, value)
        yield ("spoe_agent_worker_held_commands", "gauge",
               "Commands held for workers that are down", {},
               sum(b.commands for b in self._backlogs))
        yield ("spoe_agent_worker_peer_sessions", "gauge",
               "Open sessions other workers own, as this worker knows them", {},
               self.peer_sessions)
