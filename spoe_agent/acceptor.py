"""Accepting HAProxy's connections within the process's open-file limit.

Out of file descriptors (``ulimit -n`` below what HAProxy opens), gevent's StreamServer printed
a traceback to stderr at each failed accept, past the log's format (JSON lines) and its rate
limit, and nothing said beforehand that the limit was too low for ``max_connections``.
"""

from __future__ import annotations

import errno
import logging
import resource
from typing import Any

import gevent
from gevent.server import StreamServer

log = logging.getLogger(__name__)

#: accept() failing for want of resources: the connection stays in the listen backlog.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() passing on an error of the connection it was to return, gone before it was taken
#: (accept(2): "treat them like EAGAIN by retrying"; EPERM: a firewall rule refused it). gevent
#: printed a traceback for each, past the log's format.
_CONNECTION_GONE = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
})
#: Files the agent holds besides HAProxy's connections: its listener, the exporter's and the
#: metrics endpoint's sockets, the peer links of --workers, the event loop's, the logs.
OWN_FILES = 64


def open_file_limit() -> int | None:
    """This process's soft ``RLIMIT_NOFILE`` (None: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def warn_if_too_few_files(max_connections: int) -> None:
    """Say at start that connections past the limit will wait, rather than at the first one."""
    limit = open_file_limit()
    if limit is not None and limit < max_connections + OWN_FILES:
        log.warning("the open-file limit (%d, ulimit -n) is below max_connections (%d) plus "
                    "the ~%d files the agent holds itself: connections past it cannot be served "
                    "(they wait in the listen backlog, or, with --workers, are reset when handed "
                    "over); raise it (systemd: LimitNOFILE=) or lower max_connections",
                    limit, max_connections, OWN_FILES)


class AcceptingServer(StreamServer):
    """gevent's StreamServer, but an accept that fails for want of file descriptors or memory is
    logged (one line per interval, in the log's format) and accepting pauses, 0.1 s doubling up
    to 1 s while it lasts, as gevent's own backoff after an error does. Meanwhile the
    connections wait in the listen backlog, as they do when ``max_connections`` is reached."""

    first_pause_s = 0.1
    max_pause_s = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pause_s = self.first_pause_s

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno in _CONNECTION_GONE:
                log.debug("a connection was gone before it was accepted: %s", exc)
                return None
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            self._pause(exc)
            return None
        self._pause_s = self.first_pause_s
        return accepted

    def _pause(self, exc: OSError) -> None:
        limit = open_file_limit()
        log.warning("cannot accept a connection: %s (open-file limit %s); it waits in the "
                    "listen backlog, accepting again in %.1fs", exc.strerror or exc,
                    "none" if limit is None else limit, self._pause_s)
        self.stop_accepting()
        gevent.spawn_later(self._pause_s, self._resume)
        self._pause_s = min(self.max_pause_s, self._pause_s * 2)

    def _resume(self) -> None:
        if self.started and not self.closed:
            self.start_accepting()
