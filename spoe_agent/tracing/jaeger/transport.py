"""The transports to Jaeger: UDP datagrams to jaeger-agent, HTTP posts to jaeger-collector.

They send bytes that are already encoded and know nothing of thrift; the exporter counts what
they fail to send.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import os
import socket
import ssl
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import gevent
from gevent import monkey

from spoe_agent.config import shown_url


class _UDPSender:
    """Sends datagrams to jaeger-agent; resolves the host now and then rather than per packet.

    An IPv4 address of the host comes first, as the official exporter sends (its socket is
    AF_INET): Debian's /etc/hosts gives ``localhost`` ``::1`` too, often first, and a datagram
    to ``::1`` reaches no agent bound to 127.0.0.1 or 0.0.0.0 and fails nowhere, so spans
    would vanish without a trace. A host with IPv6 addresses only still gets them.

    The socket is connected to the address: the kernel then keeps the ICMP "port unreachable"
    (or "host unreachable") a datagram to a closed port brings back, as the socket's pending
    error. Unconnected, a jaeger-agent that was down or a wrong port lost every span while the
    counters said them all exported (black-box run: 42,795 spans). That error is an earlier
    datagram's, and a send that finds it fails without sending its own: about one datagram in
    two was sent and lost uncounted, the other counted but never sent, and the first one after
    jaeger-agent came back was discarded for a refusal of the outage (black-box run: half of
    the loss unaccounted, 155 deliverable spans discarded). So :meth:`send` reads the error
    first (SO_ERROR clears it), sends anyway, and returns the error for the exporter to charge
    to the datagram before.
    """

    RESOLVE_EVERY_S = 30.0
    #: After a failed lookup, how long the datagrams that follow fail at once rather than each
    #: asking the resolver again: with a resolver that times out, a batch of datagrams took one
    #: timeout each, unbounded by any export timeout (code review: 10 datagrams, 5.2 s).
    RETRY_LOOKUP_S = 1.0

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._addr: Any = None
        self._resolved_at = 0.0
        self._lookup_failed: tuple[float, OSError] | None = None
        self._shut = False
        self._held_error = 0

    def _target(self) -> tuple[socket.socket, Any]:
        if self._shut:
            # A send still in progress when the exporter shut down (code review: it opened a
            # new socket, sent on, and never closed it).
            raise OSError(errno.EBADF, "the exporter is shut down")
        now = time.monotonic()
        if self._sock is None or now - self._resolved_at > self.RESOLVE_EVERY_S:
            infos = self._lookup(now)
            family, _, _, _, addr = min(infos, key=lambda info: info[0] != socket.AF_INET)
            if self._sock is None or self._sock.family != family:
                self.close()
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            if addr != self._addr:
                self._sock.connect(addr)  # a UDP connect only sets the peer: nothing is sent
            self._addr = addr
            self._resolved_at = now
        return self._sock, self._addr

    def _lookup(self, now: float) -> list[Any]:
        failed = self._lookup_failed
        if failed is not None and now - failed[0] < self.RETRY_LOOKUP_S:
            raise type(failed[1])(*failed[1].args)
        try:
            infos = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_DGRAM)
        except OSError as exc:
            self._lookup_failed = (time.monotonic(), exc)
            raise
        self._lookup_failed = None
        return infos

    def send(self, datagram: bytes) -> OSError | None:
        """Send ``datagram``; return the error an earlier one met, if the kernel holds one.

        Raises if this one cannot be sent. Whether the last datagram sent arrived only the next
        send can tell, if the destination's host answers at all (hosts rate-limit their ICMP).
        """
        earlier = 0
        try:
            sock, _ = self._target()
            earlier = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # and clears it
            try:
                sock.send(datagram)
            except ConnectionRefusedError as exc:
                # A refusal that arrived since the look above: an earlier datagram's too (a
                # send to a closed UDP port fails no other way), and cleared by this raise.
                earlier = exc.errno or errno.ECONNREFUSED
                sock.send(datagram)
        except OSError:
            self._resolved_at = 0.0  # re-resolve on the next attempt
            # Read and cleared, it is still the last datagram sent's: said by the next send
            # that goes out, whose own datagram comes after it (code review: it went uncounted).
            self._held_error = earlier or self._held_error
            raise
        earlier, self._held_error = earlier or self._held_error, 0
        return OSError(earlier, os.strerror(earlier)) if earlier else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._addr = None

    def shut(self) -> None:
        """Close for good: a later send fails instead of opening a new socket."""
        self._shut = True
        self.close()


class CollectorAnswered(OSError):
    """A post the collector answered with a status other than 2xx; ``status`` says which, for
    the hints that depend on it (the message is for people)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"Jaeger collector answered HTTP {status} {reason}")
        self.status = status


class _HTTPSender:
    """POSTs binary thrift Batches to jaeger-collector, keeping the connection alive between posts.

    Plain ``http.client`` so gevent's monkeypatching makes it cooperative, and no dependency
    beyond the standard library.

    ``timeout`` bounds a whole post, not each socket operation: a collector (or a proxy before
    it) that trickles its answer a byte at a time never lets a per-read timeout expire, and the
    export stalled for good while the queue filled and dropped everything.
    """

    def __init__(
        self, endpoint: str, username: str | None, password: str | None, timeout: float,
        certificate: str | None = None,
    ) -> None:
        """``certificate``: the CA bundle an ``https://`` collector's certificate is checked
        against (OTEL_EXPORTER_JAEGER_CERTIFICATE), else the system's."""
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported Jaeger collector endpoint: {endpoint!r}")
        self.endpoint = endpoint
        #: The endpoint as logs may show it: without the user and password it may carry.
        self.shown = shown_url(endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._headers = {"Content-Type": "application/x-thrift"}
        if username is None and password is None and parts.username is not None:
            # http://user:secret@collector/...: sent, as the official (requests) exporter does.
            username, password = unquote(parts.username), unquote(parts.password or "")
        if username is not None and password is not None:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._conn: http.client.HTTPConnection | None = None
        self._context: ssl.SSLContext | None = None
        if self._https:
            try:
                self._context = ssl.create_default_context(cafile=certificate)
            except ssl.SSLError as exc:
                raise ValueError(f"the Jaeger collector's CA certificate {certificate!r} is not "
                                 f"a PEM certificate bundle ({exc})") from None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._context is not None:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._context)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port,
                                                        timeout=self._timeout)
        return self._conn

    def send(self, body: bytes, deadline: float | None = None) -> None:
        """Raise on transport errors, non-2xx answers, and a post not done within ``timeout``
        or by ``deadline`` (``time.monotonic()``), whichever comes first: an export of several
        services' batches shares one (code review: each took the whole timeout)."""
        now = time.monotonic()
        deadline = now + self._timeout if deadline is None else min(deadline, now + self._timeout)
        if deadline <= now:
            raise _too_slow(self._timeout)
        reused = self._conn is not None
        try:
            with _bounded(deadline - now, self._timeout):
                try:
                    status, reason = self._post(body, deadline)
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    self.close()
                    if not reused:
                        raise
                    # The kept-alive connection had gone stale.
                    status, reason = self._post(body, deadline)
        except Exception:
            self.close()
            raise
        if not 200 <= status < 300:
            raise CollectorAnswered(status, reason)

    def _post(self, body: bytes, deadline: float) -> tuple[int, str]:
        conn = self._connection()
        # Before the request too: a kept-alive socket still has the time its last post left it
        # (code review: a 32 MB post failed after 0.3 s of a 2 s timeout), and a new one
        # connects within what is left.
        _time_left(conn, deadline, self._timeout)
        conn.request("POST", self._path, body=body, headers=self._headers)
        _time_left(conn, deadline, self._timeout)
        response = conn.getresponse()
        # One read at a time, each bounded by what is left: read() would wait for the whole
        # body, with the per-operation timeout only.
        while not response.isclosed():
            _time_left(conn, deadline, self._timeout)
            if not response.read1(65536):
                break
        response.read()  # nothing left: marks the response done, so the connection is reusable
        if response.will_close:
            self.close()
        return response.status, response.reason

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def abort(self) -> None:
        """Cut a post in progress short (shutdown, from another greenlet or thread): the
        socket is shut, so the post fails where it waits and closes the connection itself.
        Closing the connection from here instead broke the reader under its feet (an ERROR
        traceback, "reentrant call inside BufferedReader")."""
        sock = getattr(self._conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _too_slow(seconds: float) -> TimeoutError:
    # The bound is the lower of the two settings (pipeline.py): name both, as a user who set
    # jaeger_timeout = 2s read "the export timeout" as export_timeout, 30 s (black-box run).
    return TimeoutError(f"no complete answer within {seconds:g}s (jaeger_timeout, or "
                        "export_timeout if shorter)")


def _time_left(conn: http.client.HTTPConnection, deadline: float, seconds: float) -> None:
    """Give the connection's next socket operation what is left of the post's time."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow(seconds)
    conn.timeout = left  # what connect() uses
    if conn.sock is not None:
        conn.sock.settimeout(left)


def _bounded(seconds: float, timeout: float) -> Any:
    """Under gevent (the agent), a bound of ``seconds`` over everything a post does, headers
    included; in a plain thread, only the per-read bounds of ``_post`` apply. ``timeout`` is
    the setting the error names."""
    if monkey.is_module_patched("socket"):
        return gevent.Timeout(seconds, _too_slow(timeout))
    return contextlib.nullcontext()
