"""The gevent shell around :class:`~spoe_agent.protocol.connection.SpopConnection`.

One greenlet per HAProxy connection reads, feeds the state machine, runs the handlers and writes
the queued frames back with one ``sendall`` per batch. Pipelined NOTIFYs whose handlers are
registered ``concurrent=True`` run in a per-connection pool bounded by ``max_in_flight``; every
write goes through one lock per connection so frames are never interleaved.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.lock import Semaphore
from gevent.pool import Pool
from gevent.server import StreamServer

from spoe_agent.config import AgentConfig, split_bind
from spoe_agent.handlers import Agent
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
from spoe_agent.protocol.types import Status

log = logging.getLogger(__name__)

_RECV_SIZE = 256 * 1024
_NORMAL_CLOSE_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN}


class Stats:
    """Plain counters the metrics endpoint reads; ints only, so updates never yield."""

    def __init__(self) -> None:
        self.connections_open = 0
        self.connections_total = 0
        self.frames: dict[str, int] = {}
        self.disconnects: dict[int, int] = {}
        self.notifies = 0
        self.acks = 0
        self.healthchecks = 0
        self.limit_hits: dict[str, int] = {}

    def count_frame(self, kind: str, n: int = 1) -> None:
        self.frames[kind] = self.frames.get(kind, 0) + n

    def hit_limit(self, name: str) -> None:
        self.limit_hits[name] = self.limit_hits.get(name, 0) + 1


class _Client:
    """One accepted connection: its state machine, socket and write lock."""

    __slots__ = ("conn", "sock", "lock", "pool", "address")

    def __init__(self, conn: SpopConnection, sock: socket.socket, address: Any) -> None:
        self.conn = conn
        self.sock = sock
        self.lock = Semaphore()
        self.pool: Pool | None = None
        self.address = address

    def flush(self) -> None:
        with self.lock:
            data = self.conn.data_to_send()
            if data:
                self.sock.sendall(data)


class SpoaServer:
    """Serve an :class:`~spoe_agent.handlers.Agent` to HAProxy over SPOP."""

    def __init__(
        self,
        agent: Agent,
        config: AgentConfig,
        *,
        listener: Any = None,
        ssl_args: dict[str, Any] | None = None,
        latency_observer: Callable[[float], None] | None = None,
    ) -> None:
        self.agent = agent
        self.config = config
        self.stats = Stats()
        self._clients: set[_Client] = set()
        self._latency_observer = latency_observer
        self._stopping = False
        if listener is None:
            listener = make_listener(config.bind)
        self._server = StreamServer(
            listener, self._handle, spawn=Pool(config.max_connections), **(ssl_args or {}),
        )

    @property
    def address(self) -> Any:
        return self._server.address

    @property
    def serving(self) -> bool:
        return self._server.started and not self._stopping

    def set_latency_observer(self, observer: Callable[[float], None] | None) -> None:
        self._latency_observer = observer

    def start(self) -> None:
        self._server.start()
        log.info("spoe-agent listening on %s", self.config.bind)

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let NOTIFYs in flight finish, then AGENT-DISCONNECT every connection."""
        if self._stopping:
            return
        self._stopping = True
        self._server.close()
        deadline = time.monotonic() + timeout
        for client in list(self._clients):
            if client.pool is not None:
                client.pool.join(timeout=max(0.0, deadline - time.monotonic()))
            client.conn.close(Status.NORMAL, "agent shutting down")
            try:
                client.flush()
                # The reading greenlet sees EOF and closes the socket itself; closing it from
                # here would make that greenlet's recv fail with EBADF.
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.stop(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ connection greenlet

    def _handle(self, sock: socket.socket, address: Any) -> None:
        config = self.config
        conn = SpopConnection(max_frame_size=config.max_frame_size)
        client = _Client(conn, sock, address)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stats = self.stats
        stats.connections_open += 1
        stats.connections_total += 1
        self._clients.add(client)
        if self._stopping:
            conn.close(Status.NORMAL, "agent shutting down")
        try:
            self._serve(client)
        except OSError as exc:
            if exc.errno not in _NORMAL_CLOSE_ERRNOS:
                log.info("connection from %s ended: %s", _peer(address), exc)
        finally:
            if client.pool is not None:
                client.pool.kill(block=False)
            self._clients.discard(client)
            stats.connections_open -= 1
            _close_socket(sock)

    def _serve(self, client: _Client) -> None:
        conn = client.conn
        sock = client.sock
        agent = self.agent
        stats = self.stats
        idle = self.config.idle_timeout or None
        read_deadline = self.config.read_timeout or None
        while conn.state is not State.CLOSED:
            observe = self._latency_observer
            sock.settimeout(read_deadline if conn.buffered else idle)
            try:
                data = sock.recv(_RECV_SIZE)
            except TimeoutError:
                kind = "read_timeout" if conn.buffered else "idle_timeout"
                stats.hit_limit(kind)
                log.info("closing %s: %s", _peer(client.address), kind.replace("_", " "))
                conn.close(Status.TIMEOUT, "a timeout occurred")
                client.flush()
                return
            started = time.perf_counter() if observe is not None else 0.0
            events = conn.receive_data(data) if data else conn.receive_eof()
            for event in events:
                if type(event) is NotifyReceived:
                    stats.notifies += 1
                    if agent.needs_greenlet(event.messages):
                        self._spawn_concurrent(client, event)
                    else:
                        conn.send_ack(event.stream_id, event.frame_id,
                                      agent.dispatch(event.messages))
                        stats.acks += 1
                else:
                    self._on_event(client, event)
            client.flush()
            if observe is not None and events:
                observe(time.perf_counter() - started)
        if client.pool is not None:
            client.pool.join(timeout=self.config.read_timeout or None)
            client.flush()

    def _spawn_concurrent(self, client: _Client, event: NotifyReceived) -> None:
        if client.pool is None:
            client.pool = Pool(self.config.max_in_flight)
        elif client.pool.full():
            self.stats.hit_limit("in_flight")
        # Pool.spawn waits for a free slot: back-pressure on this connection's reads only.
        client.pool.spawn(self._run_concurrent, client, event)

    def _run_concurrent(self, client: _Client, event: NotifyReceived) -> None:
        actions = self.agent.dispatch(event.messages)
        client.conn.send_ack(event.stream_id, event.frame_id, actions)
        self.stats.acks += 1
        try:
            client.flush()
        except OSError:
            pass  # the reading greenlet sees the closed socket and ends the connection

    def _on_event(self, client: _Client, event: Any) -> None:
        stats = self.stats
        kind = type(event)
        if kind is HelloReceived:
            if event.healthcheck:
                stats.healthchecks += 1
            log.debug("HELLO from %s: frame size %d, capabilities %s", _peer(client.address),
                      event.negotiated_frame_size, ",".join(sorted(event.capabilities)))
        elif kind is DisconnectReceived:
            stats.disconnects[event.status] = stats.disconnects.get(event.status, 0) + 1
            level = logging.DEBUG if event.status in (0, 2) else logging.WARNING
            log.log(level, "HAProxy disconnected %s: status %d (%s)", _peer(client.address),
                    event.status, event.message)
        elif kind is ProtocolViolation:
            stats.hit_limit(f"protocol_error_{int(event.status)}")
            log.warning("protocol error from %s, sent AGENT-DISCONNECT status %d: %s",
                        _peer(client.address), event.status, event.message)
        elif kind is NotifyAborted:
            stats.count_frame("aborted")
        elif kind is ConnectionClosed:
            pass


def make_listener(bind: str, backlog: int = 1024) -> socket.socket:
    """A bound, listening socket for ``HOST:PORT`` or ``unix:/path`` (stale socket replaced)."""
    target = split_bind(bind)
    if isinstance(target, str):
        if os.path.exists(target):
            os.unlink(target)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(target)
    else:
        host, port = target
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) or "unix socket"


def spawn_later(delay: float, func: Callable[..., Any], *args: Any) -> Any:
    return gevent.spawn_later(delay, func, *args)
