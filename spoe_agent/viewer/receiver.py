"""A stand-in for jaeger-agent and jaeger-collector that decodes the real wire format.

The dev stack uses it when no Jaeger runs, and the end-to-end tests use it as *the* receiver: it
accepts what an agent sends over UDP (``Agent.emitBatch`` in the compact protocol, port 6831)
and what a collector takes over HTTP (a binary-protocol ``Batch`` POSTed to ``/api/traces``,
port 14268), and turns every span into a plain ``ReceivedSpan``.  Traces are assembled by trace
id and reported once no new span has arrived for them for ``quiet_s``.

Everything runs on plain ``threading`` so it works in a normal process and, as greenlets, in one
that gevent has monkeypatched.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from spoe_agent.listeners import address_family
from spoe_agent.tracing.jaeger.decode import decode_batch_binary, decode_emit_batch

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
_REF_TYPES = {0: "CHILD_OF", 1: "FOLLOWS_FROM"}
MAX_DATAGRAM = 65535


@dataclass
class ReceivedSpan:
    """One decoded Jaeger span; ids are lowercase hex (trace 32 digits, span 16)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    operation_name: str
    service_name: str
    start_us: int
    duration_us: int
    references: list[tuple[str, str, str]] = field(default_factory=list)  # (type, trace, span)
    tags: dict[str, Any] = field(default_factory=dict)
    logs: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    process_tags: dict[str, Any] = field(default_factory=dict)
    flags: int = 0
    transport: str = ""  # "udp" or "http"

    @property
    def error(self) -> bool:
        return self.tags.get("error") is True or self.tags.get("otel.status_code") == "ERROR"

    @property
    def end_us(self) -> int:
        return self.start_us + self.duration_us


def _hex_id(value: int | None, digits: int = 16) -> str:
    return format((value or 0) & _U64, f"0{digits}x")


def _trace_hex(high: int | None, low: int | None) -> str:
    return _hex_id(high) + _hex_id(low)


def _tag_value(tag: Any) -> Any:
    """The value a thrift Tag carries, by its declared type (STRING, DOUBLE, BOOL, LONG, BINARY)."""
    return {0: tag.vStr, 1: tag.vDouble, 2: tag.vBool, 3: tag.vLong, 4: tag.vBinary}.get(
        tag.vType, tag.vStr
    )


def _tags(tags: Iterable[Any] | None) -> dict[str, Any]:
    return {tag.key: _tag_value(tag) for tag in tags or ()}


def spans_from_batch(batch: Any, transport: str = "") -> list[ReceivedSpan]:
    """Flatten a decoded thrift ``Batch`` into ``ReceivedSpan`` objects."""
    process = batch.process
    service = (process.serviceName if process else None) or ""
    process_tags = _tags(process.tags if process else None)
    out = []
    for span in batch.spans or ():
        parent = span.parentSpanId or 0
        out.append(
            ReceivedSpan(
                trace_id=_trace_hex(span.traceIdHigh, span.traceIdLow),
                span_id=_hex_id(span.spanId),
                parent_span_id=_hex_id(parent) if parent else None,
                operation_name=span.operationName or "",
                service_name=service,
                start_us=span.startTime or 0,
                duration_us=span.duration or 0,
                references=[
                    (
                        _REF_TYPES.get(ref.refType, str(ref.refType)),
                        _trace_hex(ref.traceIdHigh, ref.traceIdLow),
                        _hex_id(ref.spanId),
                    )
                    for ref in span.references or ()
                ],
                tags=_tags(span.tags),
                logs=[(entry.timestamp or 0, _tags(entry.fields)) for entry in span.logs or ()],
                process_tags=dict(process_tags),
                flags=span.flags or 0,
                transport=transport,
            )
        )
    return out


class TraceAssembler:
    """Groups spans by trace id; a trace is finished once it has been quiet for ``quiet_s``."""

    def __init__(
        self, quiet_s: float = 1.0, on_trace: Callable[[list[ReceivedSpan]], None] | None = None,
        keep_finished: bool = True,
    ) -> None:
        self.quiet_s = quiet_s
        self.on_trace = on_trace
        # The standalone viewer prints each trace and keeps none: kept, every trace it ever
        # printed stayed in memory (code review).
        self.keep_finished = keep_finished
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[float, list[ReceivedSpan]]] = {}
        self.finished: list[list[ReceivedSpan]] = []

    def add(self, spans: Iterable[ReceivedSpan], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for span in spans:
                entry = self._pending.get(span.trace_id)
                if entry is None:
                    self._pending[span.trace_id] = (now, [span])
                else:
                    entry[1].append(span)
                    self._pending[span.trace_id] = (now, entry[1])

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, now: float | None = None, everything: bool = False) -> list[list[ReceivedSpan]]:
        """Report (and return) every trace quiet for ``quiet_s`` — or all of them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            done = [
                trace_id
                for trace_id, (last, _) in self._pending.items()
                if everything or now - last >= self.quiet_s
            ]
            traces = [self._pending.pop(trace_id)[1] for trace_id in done]
            if self.keep_finished:
                self.finished.extend(traces)
        for trace in traces:
            if self.on_trace is not None:
                try:
                    self.on_trace(trace)
                except Exception:
                    log.exception("trace callback failed")
        return traces


class JaegerReceiver:
    """Listen like jaeger-agent (UDP) and/or jaeger-collector (HTTP) and keep what arrives.

    Pass port 0 to get a free port; the bound addresses are in ``udp_address``/``http_address``
    after ``start()``.
    """

    def __init__(
        self,
        udp_addr: tuple[str, int] | None = ("127.0.0.1", 6831),
        http_addr: tuple[str, int] | None = ("127.0.0.1", 14268),
        *,
        quiet_s: float = 1.0,
        on_trace: Callable[[list[ReceivedSpan]], None] | None = None,
        keep_spans: bool = True,
    ) -> None:
        self.udp_addr = udp_addr
        self.http_addr = http_addr
        self.assembler = TraceAssembler(quiet_s, on_trace, keep_finished=keep_spans)
        self.keep_spans = keep_spans
        self.udp_address: tuple[str, int] | None = None
        self.http_address: tuple[str, int] | None = None
        self.datagrams = 0
        self.http_posts = 0
        self.decode_errors = 0
        #: Datagrams the kernel dropped because this receiver read too slowly (Linux's
        #: SO_RXQ_OVFL count; stays 0 where it is not available): spans the agent did send.
        self.kernel_drops = 0
        self.last_http_headers: dict[str, str] = {}
        self.last_http_body = b""
        self._spans: list[ReceivedSpan] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp_sock: socket.socket | None = None
        self._httpd: http.server.ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> JaegerReceiver:
        """Listen; an address that cannot be bound raises OSError naming it, and what was
        already started is stopped."""
        try:
            self._start()
        except BaseException:
            self.stop(flush=False)
            raise
        return self

    def _start(self) -> None:
        if self.udp_addr is not None:
            sock = socket.socket(address_family(self.udp_addr[0]), socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
            try:
                sock.bind(self.udp_addr)
            except OSError as exc:
                sock.close()
                raise _naming(exc, "udp", self.udp_addr) from None
            sock.settimeout(0.2)
            self._udp_sock = sock
            self.udp_address = sock.getsockname()[:2]
            self._spawn(self._udp_loop, "jaeger-receiver-udp")
        if self.http_addr is not None:
            try:
                httpd = _HTTPServer(self.http_addr, _Handler)
            except OSError as exc:
                raise _naming(exc, "http", self.http_addr) from None
            httpd.receiver = self
            self._httpd = httpd
            self.http_address = httpd.server_address[:2]
            self._spawn(lambda: httpd.serve_forever(poll_interval=0.2), "jaeger-receiver-http")
        self._spawn(self._assembler_loop, "jaeger-receiver-traces")

    def stop(self, flush: bool = True) -> None:
        """Stop listening; with ``flush`` report the traces still waiting to go quiet."""
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()
        if self._udp_sock is not None:
            self._udp_sock.close()
            self._udp_sock = None
        if flush:
            self.assembler.flush(everything=True)

    def __enter__(self) -> JaegerReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- results ---------------------------------------------------------------------------------

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A snapshot of every span received so far."""
        with self._cond:
            return list(self._spans)

    @property
    def finished_traces(self) -> list[list[ReceivedSpan]]:
        return list(self.assembler.finished)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """All received spans grouped by trace id, whether or not the trace has gone quiet."""
        grouped: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans:
            grouped.setdefault(span.trace_id, []).append(span)
        return grouped

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> bool:
        """Wait until ``predicate(spans)`` holds; False on timeout (tests assert on it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(list(self._spans)):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.2))

    # -- ingest ----------------------------------------------------------------------------------

    def _add(self, spans: list[ReceivedSpan]) -> None:
        if self.keep_spans:
            with self._cond:
                self._spans.extend(spans)
                self._cond.notify_all()
        self.assembler.add(spans)

    def ingest_datagram(self, data: bytes) -> list[ReceivedSpan]:
        """Decode one agent datagram (also usable without sockets)."""
        try:
            name, batch = decode_emit_batch(data)
        except ValueError as exc:
            self.decode_errors += 1
            # One line, not a traceback each (a fuzzer's 327 datagrams printed 384 of them):
            # the rate limit of the log holds back the rest, and decode_errors counts them.
            log.warning("undecodable datagram of %d bytes: %s", len(data), exc,
                        extra={"rate_key": "undecodable datagram"})
            return []
        self.datagrams += 1
        if batch is None:
            log.info("ignoring agent method %r", name)
            return []
        return self.take_batch(batch, "udp")

    def ingest_http(self, body: bytes) -> list[ReceivedSpan]:
        """Decode one collector POST body; raises ValueError when it is not a thrift Batch."""
        try:
            batch = decode_batch_binary(body)
        except ValueError:
            self.decode_errors += 1
            raise
        self.http_posts += 1
        return self.take_batch(batch, "http")

    def take_batch(self, batch: Any, source: str) -> list[ReceivedSpan]:
        """What becomes of a decoded Batch; a subclass that only counts spans overrides this."""
        spans = spans_from_batch(batch, source)
        self._add(spans)
        return spans

    def _udp_loop(self) -> None:
        sock = self._udp_sock
        assert sock is not None
        ancillary = socket.CMSG_SPACE(4)
        while not self._stop.is_set():
            try:
                data, extra, _, _ = sock.recvmsg(MAX_DATAGRAM, ancillary)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            for level, kind, value in extra:
                if level == socket.SOL_SOCKET and kind == _SO_RXQ_OVFL and len(value) >= 4:
                    # The socket's drops so far, sent with each datagram once there were some.
                    self.kernel_drops = int.from_bytes(value[:4], sys.byteorder)
            self.ingest_datagram(data)

    def _assembler_loop(self) -> None:
        tick = min(0.1, self.assembler.quiet_s / 4)
        while not self._stop.wait(tick):
            self.assembler.flush()


# Linux's socket option for the count of datagrams dropped for want of buffer room (not in
# every Python's socket module; its value is fixed in the kernel's ABI).
_SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)


def _naming(exc: OSError, kind: str, addr: tuple[str, int]) -> OSError:
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return OSError(exc.errno, f"{kind} {host}:{addr[1]}: {exc.strerror or exc}")


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    receiver: JaegerReceiver

    def __init__(self, addr: tuple[str, int], handler: type) -> None:
        self.address_family = address_family(addr[0])
        # Before the base class binds: a bind that fails calls server_close(), which uses them.
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Also end kept-alive connections, or their threads would go on serving after stop()."""
        super().server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


#: The largest POST body taken: an exporter's batches are far smaller (the Jaeger one posts a
#: few MB at most).
MAX_POST_BYTES = 64 * 1024 * 1024


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter reuses its connection
    timeout = 60  # an idle kept-alive connection is closed after this
    server: _HTTPServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        # A length it cannot trust is refused before reading: -1 read to EOF (200 MB held),
        # a huge one raised MemoryError, "abc" a traceback (code review).
        text = self.headers.get("Content-Length") or "0"
        length = int(text) if text.isdigit() else -1
        if not 0 <= length <= MAX_POST_BYTES:
            self.close_connection = True
            self._reply(413 if length > MAX_POST_BYTES else 400,
                        f"Content-Length must be 0 to {MAX_POST_BYTES}\n".encode())
            return
        body = self.rfile.read(length)
        receiver = self.server.receiver
        receiver.last_http_headers = dict(self.headers.items())
        receiver.last_http_body = body
        if self.path.split("?", 1)[0].rstrip("/") != "/api/traces":
            self._reply(404, b"not found\n")
            return
        try:
            receiver.ingest_http(body)
        except ValueError as exc:
            self._reply(400, f"cannot decode thrift Batch: {exc}\n".encode())
            return
        self._reply(202, b"")

    def do_GET(self) -> None:  # noqa: N802
        receiver = self.server.receiver
        text = f"spans={len(receiver.spans)} traces_pending={receiver.assembler.pending()}\n"
        self._reply(200, text.encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)
