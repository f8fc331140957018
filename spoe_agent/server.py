"""The gevent shell around :class:`~spoe_agent.protocol.connection.SpopConnection`.

One greenlet per HAProxy connection reads, feeds the state machine, runs the handlers and writes
the queued frames back with one ``sendall`` per batch. Pipelined NOTIFYs whose handlers are
registered ``concurrent=True`` run in a per-connection pool bounded by ``max_in_flight``; every
write goes through one lock per connection so frames are never interleaved.

Every way a connection can hurt the process is bounded here, and every bound that is hit is
counted (:class:`Stats`, read by the metrics endpoint) and logged at most once per interval:

* ``max_connections``: beyond it the agent stops accepting and new connections wait in the
  kernel's listen backlog (see :class:`_ConnectionPool` for why not refuse them); one that
  waits there takes the slot of a connection that has not said HELLO in ``HELLO_GRACE_S``
  (HAProxy says it at once), so silent peers cannot keep HAProxy out for a whole deadline,
  or else of one on which nothing came for ``IDLE_GRACE_S``, so a burst's surplus
  connections cannot keep out HAProxy's health check for its whole ``timeout idle``;
* the HELLO deadline: a connection must complete its HELLO within ``read_timeout`` of being
  accepted (of its TLS handshake, with TLS, which has the same bound), or it gets
  AGENT-DISCONNECT status 2;
* the frame deadline: once the first byte of a frame is in, the whole frame must arrive within
  ``read_timeout`` (a deadline, not an inactivity timer, so dribbling bytes does not extend it);
* ``idle_timeout``: a ready connection on which nothing arrives for that long gets
  AGENT-DISCONNECT status 2, which is what HAProxy itself sends on its own ``timeout idle``;
* ``max_in_flight``: concurrent handlers per connection; a full pool stops reading that
  connection until a handler finishes (back-pressure, never an error).

Shutdown (:meth:`SpoaServer.stop`) stops accepting, then each connection greenlet serves what
HAProxy had already sent, waits for its handlers in flight, and ends with AGENT-DISCONNECT
status 0.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import math
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import gevent
from gevent.lock import Semaphore
from gevent.monkey import get_original
from gevent.pool import Pool
from gevent.socket import socket as _GeventSocket

from spoe_agent import build_description
from spoe_agent.acceptor import AcceptingServer, warn_if_too_few_files
from spoe_agent.busy_poll import BusyPoll
from spoe_agent.config import SMALL_FRAME_SIZE, AgentConfig, bind_text
from spoe_agent.handler_pool import HandlerPool
from spoe_agent.handlers import Agent, Work
from spoe_agent.listeners import BACKLOG, make_listener
from spoe_agent.logs import Throttle
from spoe_agent.protocol.connection import (
    ConnectionClosed,
    DisconnectReceived,
    HelloReceived,
    NotifyAborted,
    NotifyReceived,
    ProtocolViolation,
    SpopConnection,
    State,
)
from spoe_agent.protocol.types import Action, Status

log = logging.getLogger(__name__)

_READY = State.READY  # module globals: an Enum member read off its class costs ~100 ns
_CLOSED = State.CLOSED
_RECV_SIZE = 256 * 1024
_TLS_RECORD = 16 * 1024  # what one TLS write takes whole (SSL_write of one record)
_YIELD_AFTER_BYTES = 4096  # ~20 NOTIFYs of the reference config, ~0.7 ms of work
# How a connection's greenlet gives way: any positive sleep resumes it only at the event loop's
# next iteration, after it has polled for I/O and run its due timers; sleep(0) may resume it
# before the loop cycles (gevent.sleep's own documentation), and the timers starved.
_YIELD_S = 1e-6
# One receive buffer for every connection: a greenlet copies what it read (exactly that many
# bytes) before it can yield, so no other greenlet can write over it meanwhile. recv(256 KiB)
# instead allocates 256 KiB per read and shrinks it, which fragments glibc's heap: the live
# fuzzer measured RSS creeping up by ~10 MB over minutes that way, and flat with this.
_RECV_BUFFER = bytearray(_RECV_SIZE)
_RECV_VIEW = memoryview(_RECV_BUFFER)
# The real select: the pool's full() runs in a hub callback, where gevent's may not switch.
_select = get_original("select", "select")
_NORMAL_CLOSE_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN}
SHUTDOWN_MESSAGE = "agent shutting down"
LINGER_S = 2.0  # how long a closing connection may wait for the peer to close too
HELLO_GRACE_S = 1.0  # at max_connections, a connection still without HELLO after this yields
#: ... and then one on which nothing arrived for this long: a surplus connection (HAProxy 2.6
#: opens one per stream queued in a burst, and keeps it for its ``timeout idle``, 2m in the
#: reference spoe.cfg; black-box run: 12,000 opened in a second, the health check kept out
#: and the agent DOWN for two minutes). Closed as HAProxy's own ``timeout idle`` closes it.
IDLE_GRACE_S = 5.0


class Stats:
    """Plain counters the metrics endpoint reads: ints, and dicts of ints by status or limit,
    so that updates never yield."""

    def __init__(self) -> None:
        self.connections_open = 0
        self.connections_total = 0
        self.hellos = 0  # HAPROXY-HELLO answered with AGENT-HELLO (health checks included)
        self.healthchecks = 0
        self.notifies = 0
        self.acks = 0
        self.aborted = 0  # fragmented NOTIFYs HAProxy aborted (UNSET with FIN|ABORT)
        self.disconnects_received: dict[int, int] = {}  # HAPROXY-DISCONNECT, by status
        self.disconnects_sent: dict[int, int] = {}  # AGENT-DISCONNECT, by status
        self.limit_hits: dict[str, int] = {}
        self.tls_handshake_errors = 0
        # Connections moved between workers at a frame boundary (--workers: see give_connection)
        self.moved_in = 0
        self.moved_out = 0

    def hit_limit(self, name: str) -> None:
        self.limit_hits[name] = self.limit_hits.get(name, 0) + 1

    def sent_disconnect(self, status: int) -> None:
        self.disconnects_sent[status] = self.disconnects_sent.get(status, 0) + 1


class _Drain(Exception):
    """Thrown into a connection greenlet parked in ``recv`` when the agent shuts down."""


class _Idle(Exception):
    """Thrown into a connection greenlet parked in ``recv`` for longer than ``idle_timeout``."""


class _Evict(Exception):
    """Thrown into a connection greenlet still waiting for its HELLO when its slot is wanted."""


class _Move(Exception):
    """Thrown into a connection greenlet parked in ``recv`` to hand its connection to another
    worker (:meth:`SpoaServer.give_connection`)."""


class WriteStalled(TimeoutError):
    """The peer took none of the agent's bytes for ``seconds``: the connection is shut."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no room to write for {seconds:.1f}s")
        self.seconds = seconds


class _Handshaking:
    """A connection still in its TLS handshake, as eviction sees one: silent since accepted
    (:meth:`SpoaServer._evict_silent` takes it as it takes a client without HELLO)."""

    __slots__ = ("greenlet", "accepted", "done")
    parked_at = 0.0

    def __init__(self) -> None:
        self.greenlet = gevent.getcurrent()
        self.accepted = time.monotonic()
        self.done = False  # its greenlet may serve the connection by the time an eviction runs

    def silent(self) -> bool:
        return not self.done

    def idle(self) -> bool:
        return False


class _Client:
    """One accepted connection: its state machine, socket, write lock and shutdown flags."""

    __slots__ = (
        "conn", "sock", "raw", "lock", "pool", "address", "greenlet", "in_recv", "draining",
        "peer_closed", "idle_since", "parked", "parked_at", "moved", "unsent", "accepted",
        "evicted", "write_timeout", "failed",
    )

    def __init__(self, conn: SpopConnection, sock: socket.socket, address: Any,
                 write_timeout: float | None = None) -> None:
        self.conn = conn
        self.sock = sock
        # How long a write may wait for room: its own deadline, not the socket's timeout,
        # which is the reader's (a frame's remaining time, or none while parked: a concurrent
        # handler's write begun then waited for ever, holding the write lock: code review).
        self.write_timeout = write_timeout
        # The error of a write that failed or stalled part-way: nothing may follow a frame
        # cut short, so every later write raises it again.
        self.failed: OSError | None = None
        # The OS socket under gevent's (non-blocking: a send on it never waits, never yields);
        # None for TLS, whose bytes must go through the SSL object.
        self.raw = sock._sock if type(sock) is _GeventSocket else None  # type: ignore[attr-defined]
        self.lock = Semaphore()
        self.pool: HandlerPool | None = None
        self.address = address
        self.greenlet = gevent.getcurrent()
        self.in_recv = False  # parked in sock.recv: the only place a _Drain may be thrown
        self.draining = False
        self.peer_closed = False
        # When it started waiting for a frame with nothing buffered; None while not. The idle
        # sweep, not a socket timeout, ends that wait (see SpoaServer._sweep_idle).
        self.idle_since: float | None = None
        # Parked in recv at a frame boundary (nothing buffered): whatever the idle timeout.
        self.parked = False
        self.parked_at = 0.0  # since when, the last time it parked
        self.moved = False  # handed to another worker: its socket is closed here, not ended
        self.unsent = b""  # what send_early() could not write: first out of the next flush
        self.accepted = time.monotonic()
        self.evicted = False  # its slot went to a new connection: closed at once, no linger

    def flush(self, later: list[Work] | None = None) -> None:
        """Write what the connection queued, then run ``later``: work whose ACKs are in it.

        ``later`` runs as soon as the ACKs are handed to the kernel and before anything that
        could yield: HAProxy may send a stream's next event, on any connection, once it reads
        an ACK, and that event must find the work of this one done. If the kernel takes only
        part of the bytes (or the socket is TLS), ``later`` runs before the rest is written.
        While a concurrent handler holds the write lock, ``later`` runs before waiting for it:
        meanwhile another waiting greenlet could send these ACKs.
        """
        if later and self.lock.locked():
            _run_all(later)  # no yield between the check and the work
            later = None
        with self.lock:
            data = self.conn.data_to_send()
            if self.unsent:
                data = self.unsent + data
                self.unsent = b""
            if later:
                self._send_then(data, later)
            elif data:
                self._send_then(data, None)

    def _send_then(self, data: bytes, later: list[Work] | None) -> None:
        """One non-blocking send is almost always all of it (gevent's sendall() adds a
        getsockopt and its chunking machinery to every call); ``later`` runs once the kernel
        has what it took, and the rest waits for room."""
        if self.failed is not None:
            if later:
                _run_all(later)
            raise self.failed
        sent = 0
        if data and self.raw is not None:
            try:
                sent = self.raw.send(data)  # the non-blocking socket under gevent's: no yield
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                if later:
                    _run_all(later)
                raise
        if later:
            _run_all(later)
        if sent < len(data):
            self._send_rest(memoryview(data)[sent:])

    def _send_rest(self, data: memoryview) -> None:
        """Wait for room, ``write_timeout`` at most each time: the deadline is on progress,
        not on the whole (a peer reading 30 MB of ACKs at 256 KB/s was cut as if it read
        nothing: black-box run). TLS goes a record at a time, as its writes are whole."""
        sock = self.sock
        sock.settimeout(None)  # the reader's; it sets its own again before each recv
        seconds = self.write_timeout
        chunk = len(data) if self.raw is not None else _TLS_RECORD
        timer: gevent.Timeout | None = None
        try:
            while data:
                # The kernel says "room" only once a third of a full buffer is free, which a
                # slow reader of a multi-megabyte buffer takes long to free: progress is also
                # the queue shrinking.
                queued = _unsent(sock) if seconds else None
                timer = gevent.Timeout.start_new(seconds) if seconds else None
                try:
                    sent = sock.send(data[:chunk])
                except gevent.Timeout as exc:
                    if exc is not timer:
                        raise
                    now = _unsent(sock)
                    if queued is not None and now is not None and now < queued:
                        continue  # the peer took some: wait again
                    raise
                finally:
                    if timer is not None:
                        timer.close()
                data = data[sent:]
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self.failed = WriteStalled(seconds or 0.0)
            # Both ways: the reader's recv returns, and the other writers fail at once.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise self.failed from None
        except OSError as exc:
            self.failed = exc
            raise

    def send_early(self) -> None:
        """Write the ACKs the connection queued as it decoded (``SpopConnection.empty_ack``),
        without yielding: the NOTIFYs they answer are not applied yet, and HAProxy may send
        their streams' next events, on any connection, as soon as it reads them. What the
        kernel does not take now leaves first with the next flush."""
        raw = self.raw
        if raw is None or self.lock.locked() or self.failed is not None:
            return  # TLS, or a concurrent handler is writing: the next flush sends them
        data = self.conn.data_to_send()
        try:
            sent = raw.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the connection is gone: the read loop sees it
        if sent < len(data):
            self.unsent = data[sent:]

    def silent(self) -> bool:
        """Waiting in ``recv`` for a HELLO that has not come (evictable past the grace)."""
        return self.in_recv and self.conn.state is State.AWAIT_HELLO

    def idle(self) -> bool:
        """Ready and parked in ``recv`` with nothing owed: HAProxy awaits nothing on it."""
        return (self.in_recv and self.parked and self.conn.state is State.READY
                and not self.busy() and not self.lock.locked())

    def busy(self) -> bool:
        """Handlers still running for this connection (it is not idle, HAProxy awaits ACKs)."""
        return self.pool is not None and len(self.pool) > 0


class _ConnectionPool(Pool):
    """The connection greenlets, capped at ``max_connections``; reports when the cap blocks one.

    gevent's StreamServer asks ``full()`` before each accept and, while it is true, stops
    accepting: new connections then wait in the kernel's listen backlog until a slot frees.
    That is deliberate. Refusing them instead (accept, then AGENT-DISCONNECT status 13) is worse
    for HAProxy: 2.6 answers a disconnect at HELLO by reconnecting in a tight loop while streams
    are queued (about 1 500 connections per 500 ms in the lab), whereas a connection waiting in
    the backlog costs HAProxy one ``timeout hello`` (the event fails with a timeout) and makes
    ``option spop-check`` mark a saturated agent DOWN, after which events fail fast.
    """

    def __init__(self, size: int, listener: Callable[[], Any], on_block: Callable[[], None]):
        super().__init__(size)
        self._listener = listener
        self._on_block = on_block
        self._watcher: Any = None

    def full(self) -> bool:
        if not super().full():
            return False
        # StreamServer asks when it accepts, and then stops accepting until a slot frees: a
        # connection may be waiting already, or come later, when nothing asks any more.
        if self.waiting():
            self._on_block()
        else:
            self.watch()
        return True

    def watch(self) -> None:
        """Call ``on_block`` when a connection comes while the pool is still full."""
        sock = self._listener()
        if self._watcher is not None or sock is None:
            return
        self._watcher = gevent.get_hub().loop.io(sock.fileno(), 1, ref=False)
        self._watcher.start(self._arrived)

    def _arrived(self) -> None:
        self.unwatch()
        if super().full():
            self._on_block()

    def unwatch(self) -> None:
        """Stop watching the listening socket (before it closes)."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def waiting(self) -> bool:
        """A connection waits to be accepted (a zero-timeout, non-blocking poll of the
        listening socket)."""
        sock = self._listener()
        if sock is None:
            return False
        try:
            readable, _, _ = _select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)


class SpoaServer:
    """Serve an :class:`~spoe_agent.handlers.Agent` to HAProxy over SPOP (optionally TLS)."""

    def __init__(
        self,
        agent: Agent,
        config: AgentConfig,
        *,
        listener: Any = None,
        tls_context: Any = None,
    ) -> None:
        self.agent = agent
        self.config = config
        self.stats = Stats()
        self._clients: set[_Client] = set()
        #: Connections still in their TLS handshake: silent as much as those without HELLO,
        #: so evictable too (code review: a waiting HAProxy connection waited out their whole
        #: read_timeout).
        self._handshaking: set[_Handshaking] = set()
        self._latency_observer: Callable[[float], None] | None = None  # metrics sets it
        self._tls = tls_context
        self._stopping = False
        self._stop_deadline = float("inf")
        self._throttle = Throttle(log)
        self._busy_poll: BusyPoll | None = None  # --busy-poll, while serving
        # A write that finds no room waits this long at most (read_timeout: a frame must
        # complete within it, either way), then the connection is shut (WriteStalled).
        self._write_timeout = config.read_timeout or config.idle_timeout or None
        self._eviction_due = False  # a silent connection's slot is about to be given away
        self._passed_on_at = -math.inf  # when a waiting connection last went back (--workers)
        if listener is None:
            listener = make_listener(config.bind, mode=config.unix_mode, group=config.unix_group)
        self._pool = _ConnectionPool(
            config.max_connections, lambda: getattr(self._server, "socket", None),
            self._connections_blocked,
        )
        self._server = AcceptingServer(listener, self._handle, spawn=self._pool)
        # A listener that hands out connections (--workers: workers.handoff) may also hand out
        # connections that other workers served, with their protocol state, and take some back.
        self._resumed_state: Callable[[int], dict[str, Any] | None] | None = getattr(
            listener, "resumed_state", None)
        self._give_back: Callable[[Any, Any, dict[str, Any] | None, bool], bool] | None = (
            getattr(listener, "give_back", None))
        attach = getattr(listener, "attach", None)
        if attach is not None:
            attach(self)

    @property
    def address(self) -> Any:
        return self._server.address

    @property
    def serving(self) -> bool:
        return self._server.started and not self._stopping

    def set_latency_observer(self, observer: Callable[[float], None] | None) -> None:
        self._latency_observer = observer

    def start(self) -> None:
        # Listening starts here, not when the socket was bound: a connection accepted by the
        # kernel means the whole agent (metrics, exporter) is up, which readiness checks rely on.
        self._server.socket.listen(BACKLOG)
        warn_if_too_few_files(self.config.max_connections)
        self._server.start()
        if self.config.idle_timeout:
            gevent.spawn(self._sweep_idle, self.config.idle_timeout)
        window = self.config.busy_poll
        if window is True:  # AgentConfig(busy_poll=True), from before windows: forever
            window = math.inf
        if window > 0:
            self._busy_poll = BusyPoll(window)
        log.info("spoe-agent listening on %s%s%s (%s)", bind_text(self.config.bind),
                 " (TLS)" if self._tls is not None else "",
                 "" if window <= 0 else ", busy polling" if window == math.inf
                 else f", busy polling {window * 1e3:g}ms after each read",
                 build_description())

    def serve_forever(self) -> None:
        if not self._server.started:
            self.start()
        self._server.serve_forever()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting; every connection then serves what already arrived, waits for its
        handlers in flight and sends AGENT-DISCONNECT status 0, all within ``timeout``."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_deadline = time.monotonic() + timeout
        self._pool.unwatch()
        self._server.close()
        if self._busy_poll is not None:
            self._busy_poll.stop()
            self._busy_poll = None
        loop = gevent.get_hub().loop
        for client in list(self._clients):
            client.draining = True
            if client.in_recv:
                loop.run_callback(_wake_for_drain, client)
        # Waits for the connection greenlets, then kills whatever is left at the deadline.
        self._server.stop(timeout=max(0.0, self._stop_deadline - time.monotonic()))
        self._throttle.flush()

    # ------------------------------------------------------------------------------ limits

    def _limit(self, name: str, template: str, *args: object,
               level: int = logging.WARNING) -> None:
        """Count a limit hit and log it, at most once per interval per limit."""
        self.stats.hit_limit(name)
        self._throttle.log(level, name, template, *args)

    def _trimmed_ack(self, why: str) -> None:
        """An ACK went out without some of its actions (the connection logged which): over the
        negotiated frame size, a limit; or not encodable, the application handler's error."""
        if why == "too_big":
            self.stats.hit_limit("ack_frame_size")
        else:
            self.agent.handler_errors += 1

    def _sweep_idle(self, idle: float) -> None:
        """End the connections idle for ``idle`` seconds, checking a few times per ``idle``.

        A socket timeout would do it too, but gevent then builds a Timeout object and a timer
        for every wait of every connection, which is every NOTIFY when HAProxy is not busy
        (with sendall's getsockopt, 4% of the instructions per NOTIFY then). One sweep costs
        O(connections) a few times a second.
        """
        period = min(1.0, max(0.05, idle / 4))
        loop = gevent.get_hub().loop
        while not self._stopping:
            gevent.sleep(period)
            now = time.monotonic()
            for client in list(self._clients):
                since = client.idle_since
                if since is None or now - since < idle:
                    continue
                if client.busy():  # HAProxy is waiting for our ACKs: not idle
                    client.idle_since = now
                else:
                    loop.run_callback(_wake_for_idle, client)

    def give_connection(self) -> bool:
        """Hand one idle connection to another worker (the supervisor asks, to even out the
        workers' connections: HAProxy keeps its connections, so a restarted worker would
        otherwise serve only the ones HAProxy opens later). Only a plain (not TLS) connection
        parked in ``recv`` at a frame boundary, with no handler running and nothing to write,
        moves: HAProxy sees nothing happen, and what it sends meanwhile waits in the kernel for
        the next worker. Returns whether one was asked to move."""
        if self._give_back is None or self._stopping:
            return False
        for client in self._clients:
            if (client.in_recv and client.parked and client.raw is not None
                    and not client.draining and not client.busy()
                    and client.conn.export_state() is not None):
                gevent.get_hub().loop.run_callback(_wake_for_move, client)
                return True
        return False

    def _move(self, client: _Client) -> bool:
        """Hand ``client``'s connection over (in its own greenlet, out of ``recv``)."""
        state = client.conn.export_state()
        if (state is None or client.busy() or client.lock.locked() or self._give_back is None
                or not self._give_back(client.sock, client.address, state, False)):
            return False
        client.moved = True
        self.stats.moved_out += 1
        log.debug("connection from %s handed to another worker", _peer(client.address))
        return True

    def evictable(self) -> int:
        """Connections still without HELLO after ``HELLO_GRACE_S``, or idle for
        ``IDLE_GRACE_S``: slots a waiting connection would get (with ``--workers``, the
        supervisor counts them as free)."""
        now = time.monotonic()
        return sum(1 for client in self._evictable_candidates()
                   if (client.silent() and client.accepted <= now - HELLO_GRACE_S)
                   or (client.idle() and client.parked_at <= now - IDLE_GRACE_S))

    def _evictable_candidates(self) -> Iterable[_Client | _Handshaking]:
        return itertools.chain(self._clients, self._handshaking)

    def _connections_blocked(self) -> None:
        """A connection waits in the backlog while every slot is taken: count it, and free the
        slot of the oldest connection still without HELLO, once it is ``HELLO_GRACE_S`` old,
        or else of the one idle longest, once idle ``IDLE_GRACE_S``.

        HAProxy says HELLO as soon as it connects, so such a connection is not HAProxy's, or
        no longer works; left alone, a thousand of them would keep HAProxy's connections out
        for a whole HELLO deadline (``read_timeout``), far longer than its ``timeout hello``.
        An idle one is a burst's surplus, which HAProxy 2.6 keeps for its ``timeout idle``.
        """
        self._limit("connections", "max_connections (%d) reached: new HAProxy connections wait "
                    "in the %s until one closes", self.config.max_connections,
                    "listen backlog" if self._give_back is None else "supervisor's hand-off")
        if not self._eviction_due:
            self._evict_silent()

    def _evict_silent(self) -> None:
        """Give the slot of the oldest connection without HELLO to the one waiting, once that
        connection is ``HELLO_GRACE_S`` old (later, if it is younger: gevent asks ``full()``
        once per wait, not again); with none, the slot of the one idle longest, once idle
        ``IDLE_GRACE_S`` (with ``--workers``, the waiting one is passed on meanwhile)."""
        self._eviction_due = False
        if self._stopping or self._pool.free_count() > 0 or not self._pool.waiting():
            return
        oldest: _Client | _Handshaking | None = None
        for client in self._evictable_candidates():
            if client.silent() and (oldest is None or client.accepted < oldest.accepted):
                oldest = client
        if oldest is None:
            # Every connection said HELLO: the one idle longest, once idle IDLE_GRACE_S.
            for client in self._clients:
                if client.idle() and (oldest is None or client.parked_at < oldest.parked_at):
                    oldest = client
            delay = (HELLO_GRACE_S if oldest is None
                     else oldest.parked_at + IDLE_GRACE_S - time.monotonic())
            if oldest is not None and delay <= 0:
                self._eviction_due = True
                gevent.get_hub().loop.run_callback(self._evict, oldest)
            elif self._give_back is None:
                # Look again once it is old enough, or, every connection busy, a second later:
                # nothing else will (the listener is readable already; black-box run: DOWN for
                # 2 minutes after a burst).
                self._eviction_due = True
                gevent.spawn_later(delay, self._evict_silent)
            else:  # --workers: another worker may have room meanwhile
                wait = self._passed_on_at + HELLO_GRACE_S - time.monotonic()
                if wait > 0:
                    self._eviction_due = True
                    gevent.spawn_later(wait, self._evict_silent)
                else:
                    self._pass_on_waiting()
            return
        self._eviction_due = True
        delay = oldest.accepted + HELLO_GRACE_S - time.monotonic()
        if delay > 0:
            gevent.spawn_later(delay, self._evict_silent)
        else:
            gevent.get_hub().loop.run_callback(self._evict, oldest)

    def _pass_on_waiting(self) -> None:
        """--workers: every slot here holds a connection that said HELLO, and one waits in the
        hand-off channel: back it goes, for a worker with room or a silent connection to
        evict (the supervisor's counts were stale or tied when it chose this one). At most
        once per ``HELLO_GRACE_S``: if none has room, it comes back here, and waits or goes
        back again a second later."""
        assert self._give_back is not None
        self._passed_on_at = time.monotonic()
        listener = self._server.socket
        try:
            sock, address = listener.accept()
        except OSError:  # nothing waits after all
            return
        try:
            state = self._resumed_state(sock.fileno()) if self._resumed_state else None
            if self._give_back(sock, address, state, True):
                log.debug("max_connections reached here: a waiting connection went back to "
                          "the supervisor for another worker")
                self._pool.watch()  # if it comes back, it is looked at again
            else:
                log.warning("max_connections reached and the supervisor is unreachable: "
                            "closing a waiting connection from %s", _peer(address))
        finally:
            _close_socket(sock)

    def _evict(self, client: _Client | _Handshaking) -> None:
        """Hub callback: end ``client`` if it still waits for its HELLO, or is still idle
        since ``IDLE_GRACE_S`` ago, else look again."""
        if not client.greenlet.dead and (client.silent() or (
                client.idle() and client.parked_at <= time.monotonic() - IDLE_GRACE_S)):
            client.greenlet.throw(_Evict)  # _eviction_due stays set until its slot is free
        else:
            self._evict_silent()

    # ------------------------------------------------------------------ connection greenlet

    def _handle(self, sock: socket.socket, address: Any) -> None:
        stats = self.stats
        stats.connections_open += 1
        state = self._resumed_state(sock.fileno()) if self._resumed_state is not None else None
        try:
            if state is not None:
                # Served by another worker until now (give_connection): not a new connection.
                try:
                    conn = SpopConnection.resumed(state, max_frame_size=self.config.max_frame_size,
                                                   on_trimmed_ack=self._trimmed_ack,
                                                   empty_ack=self.agent.empty_ack_check())
                except ValueError as exc:
                    log.warning("a connection handed over from another worker is not one: %s",
                                exc)
                    return
                stats.moved_in += 1
                log.debug("connection from %s taken over from another worker", _peer(address))
            else:
                stats.connections_total += 1
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._tls is not None:
                    tls_sock = self._tls_handshake(sock, address)
                    if tls_sock is None:
                        return
                    sock = tls_sock
                conn = SpopConnection(max_frame_size=self.config.max_frame_size,
                                      on_trimmed_ack=self._trimmed_ack,
                                      empty_ack=self.agent.empty_ack_check())
            client = _Client(conn, sock, address, self._write_timeout)
            self._clients.add(client)
            try:
                if self._stopping:
                    client.draining = True
                self._serve(client)
                if client.conn.disconnect_status is not None:  # written: flush() returned
                    stats.sent_disconnect(client.conn.disconnect_status)
                if not (client.peer_closed or client.moved or client.evicted):
                    _linger(sock)
            except WriteStalled as exc:
                # The peer stopped reading; a frame cut short here is not its doing.
                self._throttle.warning(
                    "write_timeout", "connection from %s closed: it read none of the agent's "
                    "frames for %.1fs (the socket's buffers stayed full)", _peer(address),
                    exc.seconds)
            except OSError as exc:
                if exc.errno not in _NORMAL_CLOSE_ERRNOS:
                    log.info("connection from %s ended: %s", _peer(address), exc)
                for event in client.conn.receive_eof():  # a reset: what did it cut off?
                    self._on_event(client, event)
            finally:
                if client.pool is not None:
                    client.pool.kill(block=False)
                self._clients.discard(client)
                if client.evicted:
                    self._eviction_due = False  # its slot is free: the next wait may evict
        finally:
            stats.connections_open -= 1
            _close_socket(sock)

    def _tls_handshake(self, sock: socket.socket, address: Any) -> Any:
        """The TLS socket, or None (counted, logged once per interval) if the handshake failed.

        Done here rather than by StreamServer so it runs under the HELLO deadline (a peer that
        connects and never sends a ClientHello would otherwise hold a slot for ever) and so a
        refused client certificate is one log line, not a traceback.
        """
        seconds = self.config.read_timeout or None
        sock.settimeout(seconds)
        # The socket's timeout bounds each wait of the handshake, not the whole: a byte of it
        # every read_timeout - 1 s kept a slot for hours, out of eviction's reach (code review).
        deadline = gevent.Timeout(seconds) if seconds else None
        if deadline is not None:
            deadline.start()
        me = _Handshaking()
        self._handshaking.add(me)
        try:
            if not sock.recv(1, socket.MSG_PEEK):
                return None  # connected and closed without a byte: a TCP probe, not an error
            # The TLS socket takes the descriptor over: closed here if the handshake fails
            # (an SSLError closed it, a deadline would have leaked it).
            tls_sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            try:
                tls_sock.do_handshake()
            except BaseException:
                tls_sock.close()
                raise
            return tls_sock
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            self.stats.tls_handshake_errors += 1
            self._throttle.warning("tls_handshake", "TLS handshake with %s failed: %s",
                                   _peer(address), f"not done within read_timeout ({seconds:g}s)")
            return None
        except OSError as exc:  # ssl.SSLError, timeouts and resets are all OSErrors
            self.stats.tls_handshake_errors += 1
            self._throttle.warning("tls_handshake", "TLS handshake with %s failed: %s",
                                   _peer(address), exc)
            return None
        except _Evict:
            self._eviction_due = False  # its slot is free once this returns
            self._limit("hello_evicted", "closing %s: its TLS handshake was not done %.1fs "
                        "after connecting, and a new connection needs its slot "
                        "(max_connections)", _peer(address), time.monotonic() - me.accepted)
            return None
        finally:
            me.done = True
            self._handshaking.discard(me)
            if deadline is not None:
                deadline.close()

    def _serve(self, client: _Client) -> None:
        conn = client.conn
        sock = client.sock
        idle = self.config.idle_timeout or None
        read_timeout = self.config.read_timeout or None
        monotonic = time.monotonic
        # The HELLO deadline runs from the accept; then frame deadlines, set when a frame starts.
        deadline = monotonic() + read_timeout if read_timeout else None
        unyielded = 0  # bytes read since this greenlet last gave way
        while conn.state is not _CLOSED:
            if client.draining:
                self._drain(client)
                return
            parked = conn.at_frame_boundary
            if parked:
                kind, timeout = "idle_timeout", None  # _sweep_idle ends an idle wait
            else:
                kind = "read_timeout" if conn.state is State.READY else "hello_timeout"
                timeout = None
                if deadline is not None:
                    timeout = deadline - monotonic()
                    if timeout <= 0:  # (a zero timeout would make recv non-blocking instead)
                        self._timed_out(client, kind)
                        return
            sock.settimeout(timeout)
            if parked:
                client.parked_at = monotonic()
                if idle is not None:
                    client.idle_since = client.parked_at
            elif timeout is None and idle is not None:
                client.idle_since = monotonic()
            client.in_recv = True
            client.parked = parked
            try:
                data = _RECV_VIEW[:sock.recv_into(_RECV_BUFFER)].tobytes()
            except TimeoutError:
                self._timed_out(client, kind)
                return
            except (_Idle, _Drain, _Move, _Evict) as interrupt:
                client.in_recv = False  # now, not in finally: both write a DISCONNECT
                client.idle_since = None
                sock.settimeout(idle)
                if type(interrupt) is _Move:
                    if self._move(client):
                        return
                    continue  # it cannot move after all: serve on
                if type(interrupt) is _Drain:
                    self._drain(client)
                elif type(interrupt) is _Evict:
                    client.evicted = True
                    self._timed_out(client, "hello_evicted" if conn.state is State.AWAIT_HELLO
                                    else "idle_evicted")
                else:  # _Idle: the idle sweep, whatever the wait was (mid-frame too, with
                    # read_timeout off: it read "a frame did not complete within
                    # read_timeout (0.0s)": code review)
                    self._timed_out(client, "idle_timeout")
                return
            finally:
                client.in_recv = client.parked = False
            if client.idle_since is not None:
                client.idle_since = None
            if self._busy_poll is not None:
                self._busy_poll.touch()
            self._feed(client, data)
            if read_timeout and conn.began_frame:
                deadline = monotonic() + read_timeout
            unyielded += len(data)
            if unyielded >= _YIELD_AFTER_BYTES:
                # Once per 4 KiB of input, whether or not the reads had to wait: a recv that
                # finds data does not yield at all, and through HAProxy with two threads and two
                # workers the loop's timers fired up to seconds late (the span export starved
                # and dropped spans, /metrics did not answer: benchmarks/README.md).
                unyielded = 0
                gevent.sleep(_YIELD_S)
        if client.pool is not None:
            if conn.goodbye_pending:  # bounded: a hung handler must not hold the goodbye
                client.pool.join(timeout=_GOODBYE_WAIT_S)
                conn.release_goodbye()
                client.flush()
            if conn.disconnect_status is not None and len(client.pool):
                # Our AGENT-DISCONNECT is written and nothing may follow it, so HAProxy gets
                # its end of stream now (SPOE.txt 3.2.9: the agent "must close the socket just
                # after sending this frame"), while the handlers still running finish.
                _shut_write(sock)
            client.pool.join(timeout=self.config.read_timeout or None)
        conn.release_goodbye()  # a protocol error's, held for ACKs no handler will now send
        client.flush()

    def _feed(self, client: _Client, data: bytes) -> None:
        """Run the state machine on ``data`` (b"" is EOF), the handlers, and write the replies."""
        conn = client.conn
        agent = self.agent
        stats = self.stats
        observe = self._latency_observer
        started = time.perf_counter() if observe is not None else 0.0
        if data:
            events = conn.receive_data(data)
            if events and type(events[-1]) is NotifyReceived and events[-1].acked:
                # Every frame of the read was ACKed as it decoded (those lead the read): out
                # they go. With other frames too, the one write at the end carries them all, as
                # it always did: a write more per read costs the CPU that saturation lacks.
                client.send_early()
        else:
            if client.failed is not None:
                raise client.failed  # our shutdown after a stalled write, not the peer's EOF
            client.peer_closed = True
            events = conn.receive_eof()
        deferred: list[Work] = []  # run in order, after the ACKs are written (Agent.prepare)
        announced = False
        after = agent.after_notifies
        # With after_notifies hooks, the read's inline ACKs are queued once the hooks ran: a
        # concurrent handler's flush (the hooks may yield) must not send them earlier.
        held: list[tuple[int, int, list[Action] | None]] | None = [] if after else None
        try:
            for event in events:
                if type(event) is NotifyReceived:
                    if not announced:
                        announced = True
                        if agent.before_notifies:
                            self._run_hooks(agent.before_notifies)
                    stats.notifies += 1
                    if agent.needs_greenlet(event.messages):
                        if deferred:  # spawning may wait for a free slot: no yield, work due
                            _run_all(deferred)
                            deferred = []
                        self._spawn_concurrent(client, event)
                        continue
                    now, later = agent.prepare(event.messages)
                    actions = None
                    if now is not None:
                        if deferred:
                            _run_all(deferred)
                            deferred = []
                        actions = now()
                    if event.acked:
                        # Its empty ACK is out already (Agent.empty_ack_check): its work ran
                        # or runs after it, in order and before anything that yields.
                        if actions:
                            _variables_lost(event)
                    elif held is None:
                        conn.send_ack(event.stream_id, event.frame_id, actions)
                    else:
                        held.append((event.stream_id, event.frame_id, actions))
                    stats.acks += 1
                    if later is not None:
                        deferred.append(later)
                else:
                    self._on_event(client, event)
        finally:
            if announced and after:
                self._run_hooks(after)
        if held:
            for stream_id, frame_id, actions in held:
                conn.send_ack(stream_id, frame_id, actions)
        if conn.state is _CLOSED and (client.pool is None or not len(client.pool)):
            # A protocol error ended the read: its goodbye follows the ACKs just queued (with
            # handlers still running, _serve gives them _GOODBYE_WAIT_S first).
            conn.release_goodbye()
        client.flush(deferred)
        if observe is not None and announced:
            # NOTIFYs only: a HELLO or a health check answered in microseconds is no ACK.
            observe(time.perf_counter() - started)

    def _run_hooks(self, hooks: list[Callable[[], None]]) -> None:
        """``Agent.before_notifies`` or ``after_notifies``: a hook that fails costs itself."""
        for hook in hooks:
            try:
                hook()
            except Exception:
                self.agent.handler_errors += 1
                log.exception("read hook %r failed", hook)

    def _timed_out(self, client: _Client, kind: str) -> None:
        what = {
            "hello_timeout": "no complete HELLO within read_timeout (%.1fs) of connecting",
            "read_timeout": "a frame did not complete within read_timeout (%.1fs)",
            "idle_timeout": "nothing received for idle_timeout (%.1fs)",
            "hello_evicted": "no HELLO %.1fs after connecting, and a new connection needs its "
                             "slot (max_connections)",
            "idle_evicted": "nothing received for %.1fs, and a new connection needs its slot "
                            "(max_connections)",
        }[kind]
        if kind == "hello_evicted":
            seconds = time.monotonic() - client.accepted
        elif kind == "idle_evicted":
            seconds = time.monotonic() - client.parked_at
        else:
            seconds = (self.config.idle_timeout if kind == "idle_timeout"
                       else self.config.read_timeout)
        # The configured close of an idle connection, as HAProxy's own "timeout idle" does, is
        # normal operation: INFO. The others say a peer misbehaves.
        self._limit(kind, "closing %s with status 2: " + what, _peer(client.address), seconds,
                    level=logging.INFO if kind == "idle_timeout" else logging.WARNING)
        client.conn.close(Status.TIMEOUT)
        client.flush()

    def _drain(self, client: _Client) -> None:
        """Shutdown: serve the frames HAProxy already sent, finish the handlers in flight, then
        AGENT-DISCONNECT status 0. Only data already received is read (non-blocking)."""
        conn = client.conn
        sock = client.sock
        chunks: list[bytes] = []
        eof = False
        sock.settimeout(0.0)
        try:
            while True:
                data = _RECV_VIEW[:sock.recv_into(_RECV_BUFFER)].tobytes()
                if not data:
                    eof = True
                    break
                chunks.append(data)
        except OSError:  # would block (nothing more has arrived), or the peer is gone
            pass
        remaining = max(0.0, self._stop_deadline - time.monotonic()) or 0.001
        sock.settimeout(remaining)
        # The stop's deadline bounds the final writes too.
        client.write_timeout = min(client.write_timeout or remaining, remaining)
        for data in chunks:
            self._feed(client, data)
        if client.pool is not None:
            client.pool.join(timeout=max(0.0, self._stop_deadline - time.monotonic()))
        if eof:
            self._feed(client, b"")
        # A protocol error's AGENT-DISCONNECT, held for ACKs of handlers still running: it
        # was lost, though counted as sent (code review).
        conn.release_goodbye()
        if conn.state is not State.CLOSED:
            conn.close(Status.NORMAL, SHUTDOWN_MESSAGE)
        client.flush()

    def _spawn_concurrent(self, client: _Client, event: NotifyReceived) -> None:
        if client.pool is None:
            client.pool = HandlerPool(self.config.max_in_flight)
        elif client.pool.full():
            self._limit("in_flight", "max_in_flight (%d) handlers running on one connection: "
                        "reading it pauses until one finishes", self.config.max_in_flight)
        # spawn waits for a free slot: back-pressure on this connection's reads only.
        client.pool.spawn(self._run_concurrent, client, event)

    def _run_concurrent(self, client: _Client, event: NotifyReceived) -> None:
        actions = self.agent.dispatch(event.messages)
        self.stats.acks += 1
        if event.acked:
            if actions:
                _variables_lost(event)
            return
        client.conn.send_ack(event.stream_id, event.frame_id, actions)
        try:
            client.flush()
        except OSError:
            pass  # the reading greenlet sees the closed socket and ends the connection

    def _on_event(self, client: _Client, event: Any) -> None:
        stats = self.stats
        kind = type(event)
        if kind is HelloReceived:
            stats.hellos += 1
            if event.healthcheck:
                stats.healthchecks += 1
            log.debug("HELLO from %s: frame size %d, capabilities %s", _peer(client.address),
                      event.negotiated_frame_size, ",".join(sorted(event.capabilities)))
            if event.negotiated_frame_size < SMALL_FRAME_SIZE and not event.healthcheck:
                self._small_frames(client, event)
        elif kind is DisconnectReceived:
            status = event.status
            stats.disconnects_received[status] = stats.disconnects_received.get(status, 0) + 1
            if status in (0, 2):
                log.debug("HAProxy disconnected %s: status %d (%s)", _peer(client.address),
                          status, event.message)
            elif status == -1:
                self._throttle.warning("haproxy_disconnect_no_status",
                                       "HAProxy disconnected %s without a status code (%s)",
                                       _peer(client.address), event.message)
            else:
                self._throttle.warning(_HAPROXY_DISCONNECT_KEYS.get(status, "haproxy_disconnect"),
                                       "HAProxy disconnected %s: status %d (%s)",
                                       _peer(client.address), status, event.message)
        elif kind is ProtocolViolation:
            # One report per status per interval: a storm of one kind of error must not hide
            # the first of another.
            self._throttle.warning(
                _PROTOCOL_ERROR_KEYS.get(int(event.status), "protocol_error"),
                "protocol error from %s, sent AGENT-DISCONNECT status %d: %s",
                _peer(client.address), event.status, event.message)
        elif kind is NotifyAborted:
            stats.aborted += 1
        elif kind is ConnectionClosed and event.unfinished:
            self._throttle.warning(
                "closed_mid_frame", "connection from %s closed in the middle of a frame: %d "
                "bytes of it lost (HAProxy stopped or restarted, or the network failed)",
                _peer(client.address), event.unfinished)

    def _small_frames(self, client: _Client, event: HelloReceived) -> None:
        """HAProxy drops a message that does not fit the negotiated frame, logging nothing but
        its set-on-error variable, and the only trace of it here would be sessions that begin
        mid-stream: say which setting is to blame while the connection is being set up."""
        if event.max_frame_size <= self.config.max_frame_size:
            setting = "HAProxy's max-frame-size (spoe.cfg)"
        else:
            setting = f"the agent's max_frame_size ({self.config.set_by('max_frame_size')})"
        size = event.negotiated_frame_size
        self._throttle.warning(
            "small_frame", "HELLO from %s negotiated frames of %d bytes, set by %s: HAProxy drops "
            "every SPOE message larger than %d bytes, logging nothing (its set-on-error variable "
            "gets 3 or 259; only 2.6 fragments them instead, and only under its own "
            "max-frame-size), so they never reach the agent (with the tracing agent, their "
            "spans are missing: the reference spoe.cfg's messages reach ~750 bytes for an "
            "ordinary request, more with long URLs or trace context): leave max-frame-size "
            "and max_frame_size at their defaults (HAProxy's is 16380)",
            _peer(client.address), size, setting, size)


# How long a protocol error's AGENT-DISCONNECT waits for the ACKs of the concurrent handlers
# still running on NOTIFYs decoded before the bad frame (SpopConnection.release_goodbye).
_GOODBYE_WAIT_S: Final = 1.0
_PROTOCOL_ERROR_KEYS: Final = {int(status): f"protocol_error_{int(status)}" for status in Status}
_HAPROXY_DISCONNECT_KEYS: Final = {int(s): f"haproxy_disconnect_{int(s)}" for s in Status}


def _variables_lost(event: NotifyReceived) -> None:
    """The agent's ``empty_ack_check`` let an ACK out that its handlers then had variables for:
    a bug of the agent's, which HAProxy cannot be told of any more."""
    log.error("stream %d frame %d was ACKed before its messages were handled, but they set "
              "variables: those are lost", event.stream_id, event.frame_id)


def _run_all(work: list[Work]) -> None:
    for item in work:
        try:
            item()
        except Exception:  # the agents' own work catches its errors: this is a bug of theirs
            log.exception("deferred handler work failed")


def _wake_for_idle(client: _Client) -> None:
    """Hub callback: end a connection still parked in ``recv`` with nothing buffered."""
    if client.in_recv and client.idle_since is not None and not client.greenlet.dead:
        client.greenlet.throw(_Idle)


def _wake_for_move(client: _Client) -> None:
    """Hub callback: interrupt a connection still parked in ``recv`` with nothing buffered, so
    it hands itself over (never thrown into a write: no frame is cut)."""
    if client.in_recv and client.parked and not client.greenlet.dead:
        client.greenlet.throw(_Move)


def _wake_for_drain(client: _Client) -> None:
    """Hub callback: interrupt a connection parked in ``recv`` so it drains and says goodbye.

    Checked again here, in the hub, because the greenlet may have woken up meanwhile; a _Drain
    is only ever thrown into ``recv``, never into a write, so no frame can be cut in half.
    """
    if client.in_recv and not client.greenlet.dead:
        client.greenlet.throw(_Drain)


def _unsent(sock: Any) -> int | None:
    """Bytes the kernel still holds in the socket's send queue (SIOCOUTQ), None if unknown."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                  b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return None


def _linger(sock: socket.socket) -> None:
    """Close after our last frame without losing it: half-close, then discard what the peer
    still sends until it closes too, for at most ``LINGER_S``.

    Closing a socket with unread input makes the kernel send a reset, and a reset can destroy
    the AGENT-DISCONNECT just written before HAProxy reads it (HAProxy would then report an
    I/O error instead of our status code). Bounded by time only: a peer that still pipelines
    NOTIFYs while it reads our last ACKs slowly sends megabytes before it reads the goodbye,
    and a byte bound reset it with those ACKs unread.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            if not sock.recv(65536):
                return
    except OSError:  # reset, timeout, already shut: nothing more to save
        pass


def _shut_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # reset or already shut: the peer has its end of stream either way
        pass


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) or "unix socket"
