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
"""

from __future__ import annotations

import logging
import marshal
import os
import signal
import socket
from typing import Any

from gevent.monkey import get_original

log = logging.getLogger(__name__)

_socket_class = get_original("socket", "socket")
_socketpair = get_original("socket", "socketpair")
_MSG = 4096
REPORT_PREFIX = b"L"


def channel_pair() -> tuple[Any, Any]:
    """(supervisor end, worker end): non-blocking, message-preserving, fds can cross it."""
    ours, theirs = _socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


def send_connection(channel: Any, conn: Any, address: Any) -> None:
    """Hand an accepted connection to a worker; raises OSError if its channel cannot take it."""
    payload = marshal.dumps(address if isinstance(address, (tuple, str)) else str(address))
    socket.send_fds(channel, [payload], [conn.fileno()])


def read_report(data: bytes) -> int | None:
    """The open-connection count in a worker's report, or None if ``data`` is not one."""
    if data.startswith(REPORT_PREFIX) and data[1:].isdigit():
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
        self._orphaned = False
        self.closed = False

    def fileno(self) -> int:
        return self._chan.fileno()

    def getsockname(self) -> Any:
        return self._address

    def listen(self, backlog: int = 0) -> None:
        """The supervisor listens; nothing to do here."""

    def setblocking(self, flag: bool) -> None:
        """Always non-blocking: StreamServer only accepts when the channel is readable."""

    def _accept(self) -> tuple[int, Any]:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._chan, _MSG, 4)
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
                continue
            fd = fds[0]
            try:
                address = marshal.loads(data)
            except (ValueError, EOFError, TypeError):
                address = ""
            try:
                self._handed[fd] = os.fstat(fd).st_ino
            except OSError:
                continue
            return fd, address

    def accept(self) -> tuple[Any, Any]:
        fd, address = self._accept()
        return socket.socket(self.family, socket.SOCK_STREAM, 0, fileno=fd), address

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

    def report(self) -> None:
        """Tell the supervisor how many connections this worker has open."""
        try:
            self._chan.send(REPORT_PREFIX + str(self.open_connections()).encode())
        except OSError:
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._chan.close()
