"""HAProxy connections accepted by the supervisor and handed to the least loaded worker.

Why not let every worker accept from the shared listening socket: the kernel then wakes all of
them for each connection and the first to run wins, which on a busy box is the same worker
almost every time (measured: 63 of HAProxy's 68 connections on one of two workers). HAProxy
keeps its SPOP connections open, so that imbalance lasts, and the loaded worker caps the whole
agent. Here the supervisor accepts and sends each connection (its file descriptor, over a
``SOCK_SEQPACKET`` socket pair, ``SCM_RIGHTS``) to the worker with the fewest open connections
by the workers' own reports, counting what it handed them since. A restarted worker reports 0,
so the connections HAProxy reopens after losing a worker go to its replacement.

In the worker, :class:`HandoffListener` looks like a listening socket to gevent's StreamServer:
its "accept" receives the next handed-over descriptor, so the server code is the same whether
a process accepts itself or is handed its connections.

Connections also move between workers. A session belongs to the worker that received its first
event (:mod:`.mesh`), so a worker's share of the work is its share of HAProxy's connections, and
HAProxy keeps its connections: after a worker restarts, the connections HAProxy reopened at once
all went to the survivors. When one worker holds two connections more than another, the
supervisor asks it for one (:data:`GIVE_SIGNAL`: a signal, not a message on this channel,
which a worker at its ``max_connections`` does not read); the worker hands over an idle
connection at a frame boundary, with the little protocol state it needs
(``SpopConnection.export_state``), and the supervisor hands it on to the least loaded worker,
which goes on serving it. HAProxy sees nothing: what it sends meanwhile waits in the kernel.
"""

from __future__ import annotations

import logging
import marshal
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

from gevent.monkey import get_original

from spoe_agent.acceptor import open_file_limit

if TYPE_CHECKING:  # the server imports nothing from here; the worker wires them up
    from spoe_agent.server import SpoaServer

log = logging.getLogger(__name__)

_socket_class = get_original("socket", "socket")
_socketpair = get_original("socket", "socketpair")
_MSG = 4096
REPORT_PREFIX = b"L"
#: Worker to supervisor, just before each report: how many of its open connections would give
#: their slot to one that waits (server.SpoaServer.evictable). A message of its own, so that a
#: supervisor of the version before, which reads reports as digits alone, ignores it.
FREEABLE_PREFIX = b"F"
#: Worker to supervisor, just before it hands back a connection that waited for a slot there
#: rather than one it served: its open count did not hold it, and it answers no ask. A message
#: of its own, which a supervisor of the version before ignores.
WAITING_PREFIX = b"W"
#: Worker to supervisor, with each report: the spans its export queue holds. Should it die, the
#: supervisor says (and counts) about how many died with it. A message of its own, which a
#: supervisor of the version before ignores.
PENDING_PREFIX = b"P"
#: Supervisor to worker: hand one idle connection back, to be served by another worker.
GIVE_SIGNAL = signal.SIGUSR1
#: Worker to supervisor, with the descriptor: ``marshal`` of (address, connection state).
MOVE_PREFIX = b"M"


def channel_pair() -> tuple[Any, Any]:
    """(supervisor end, worker end): non-blocking, message-preserving, fds can cross it."""
    ours, theirs = _socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


def send_connection(channel: Any, conn: Any, address: Any, state: Any = None) -> None:
    """Hand a connection to a worker (with ``state``: one another worker served until now);
    raises OSError if its channel cannot take it."""
    socket.send_fds(channel, [_payload(address, state)], [conn.fileno()])


def _payload(address: Any, state: Any) -> bytes:
    """(address, state) as marshal writes them: an address that is neither a tuple nor a
    string (what accept returns on some families) travels as its text."""
    if not isinstance(address, (tuple, str)):
        address = str(address)
    return marshal.dumps((address, state))


def _address_and_state(payload: Any) -> tuple[Any, Any]:
    """(address, state) from what :func:`send_connection` sent, or from a supervisor of the
    version before, which sent the address alone (a worker restarted after an upgrade in
    place runs the new code under the old supervisor): an IPv4 address is also a pair, but
    its second item is a port, never a state (a dict) or None."""
    if type(payload) is tuple and len(payload) == 2 and (
            payload[1] is None or type(payload[1]) is dict):
        return payload[0], payload[1]
    return payload, None


def read_move(data: bytes) -> tuple[Any, Any] | None:
    """(address, state) of a connection a worker handed back, or None if ``data`` is not one."""
    if not data.startswith(MOVE_PREFIX):
        return None
    try:
        address, state = marshal.loads(data[len(MOVE_PREFIX):])
    except (ValueError, EOFError, TypeError):
        return None
    return address, state


def read_report(data: bytes, prefix: bytes = REPORT_PREFIX) -> int | None:
    """The count in a worker's report (``REPORT_PREFIX``: its open connections;
    ``FREEABLE_PREFIX``: those that would give up their slot; ``PENDING_PREFIX``: spans
    waiting for export), or None if ``data`` is not one."""
    if data.startswith(prefix) and data[1:].isdigit():
        return int(data[1:])
    return None


class HandoffListener:
    """The worker's side: a stand-in for a listening socket whose connections come from the
    supervisor. It also counts the connections it handed out that are still open (a socket's
    inode identifies it while its descriptor number may be reused)."""

    timeout = 0.0
    proto = 0

    def __init__(self, fd: int, family: int, address: Any) -> None:
        self._chan = _socket_class(fileno=fd)
        self._chan.setblocking(False)
        self.family = family
        self.type = socket.SOCK_STREAM
        self._address = address
        self._handed: dict[int, int] = {}
        self._states: dict[int, Any] = {}  # descriptors handed over with a connection state
        self._server: SpoaServer | None = None
        self._orphaned = False
        self.closed = False

    def fileno(self) -> int:
        return self._chan.fileno()

    def getsockname(self) -> Any:
        return self._address

    @property
    def orphaned(self) -> bool:
        """Whether the supervisor closed the channel: it is gone (killed, most likely)."""
        return self._orphaned

    def listen(self, backlog: int = 0) -> None:
        """The supervisor listens; nothing to do here."""

    def setblocking(self, flag: bool) -> None:
        """Always non-blocking: StreamServer only accepts when the channel is readable."""

    def _accept(self) -> tuple[int, Any]:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self._chan, _MSG, 4)
            except InterruptedError:
                continue
            if not data and not fds:
                # The supervisor is gone: nothing more will come, and an unsupervised worker
                # stops (cleanly: SIGTERM runs the usual shutdown).
                if not self._orphaned:
                    self._orphaned = True
                    log.warning("the supervisor closed its channel; stopping")
                    os.kill(os.getpid(), signal.SIGTERM)
                raise BlockingIOError("supervisor channel closed")
            for extra in fds[1:]:
                os.close(extra)
            if not fds:
                if flags & socket.MSG_CTRUNC:
                    # The kernel closed it for us: HAProxy sees the connection reset.
                    log.warning("a connection handed over was lost: no file descriptor left to "
                                "receive it (open-file limit %s)", open_file_limit())
                continue
            fd = fds[0]
            try:
                address, state = _address_and_state(marshal.loads(data))
            except (ValueError, EOFError, TypeError):
                address, state = "", None
            try:
                self._handed[fd] = os.fstat(fd).st_ino
            except OSError:
                continue
            if state is not None:
                self._states[fd] = state
            return fd, address

    def accept(self) -> tuple[Any, Any]:
        fd, address = self._accept()
        return socket.socket(self.family, socket.SOCK_STREAM, 0, fileno=fd), address

    def attach(self, server: SpoaServer) -> None:
        """The server this listener feeds: asked for a connection when the supervisor wants one
        (:meth:`give`)."""
        self._server = server

    def give(self) -> None:
        """The supervisor asked for a connection (:data:`GIVE_SIGNAL`)."""
        if self._server is not None and not self.closed:
            self._server.give_connection()

    def resumed_state(self, fd: int) -> Any:
        """The protocol state of connection ``fd`` if another worker served it until now."""
        return self._states.pop(fd, None)

    def give_back(self, sock: Any, address: Any, state: Any, waiting: bool = False) -> bool:
        """Hand a connection this worker served (or, ``waiting``, one that waited here for a
        slot) to the supervisor, for another worker."""
        try:
            if waiting:
                self._chan.send(WAITING_PREFIX)
            socket.send_fds(self._chan, [MOVE_PREFIX + _payload(address, state)],
                            [sock.fileno()])
        except OSError:
            return False
        return True

    def open_connections(self) -> int:
        alive = 0
        for fd, inode in list(self._handed.items()):
            try:
                same = os.fstat(fd).st_ino == inode
            except OSError:
                same = False
            if same:
                alive += 1
            else:
                del self._handed[fd]
        return alive

    def report(self, pending_spans: int | None = None) -> None:
        """Tell the supervisor how many connections this worker has open, and how many of them
        would give their slot to a connection that waits here (silent, or idle, past their
        grace), so that it routes new connections here rather than to a worker full of busy
        ones. Two counts, not one less the other: the open count is the worker's load, which
        the supervisor keeps even (``_rebalance``), and HAProxy's connections all fall idle
        whenever traffic pauses."""
        freeable = 0 if self._server is None else self._server.evictable()
        try:
            if pending_spans is not None:
                self._chan.send(PENDING_PREFIX + str(pending_spans).encode())
            self._chan.send(FREEABLE_PREFIX + str(freeable).encode())
            self._chan.send(REPORT_PREFIX + str(self.open_connections()).encode())
        except OSError:
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._chan.close()
