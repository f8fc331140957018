"""A tiny HTTP origin for HAProxy to forward to, recording what reached it.

It runs in a thread of the test process so tests can inspect the requests it saw (e.g. the
trace-context headers HAProxy injected) without another IPC channel. It speaks HTTP/1.1 with
keep-alive, since that is how HAProxy talks to servers and a close-per-request origin would hide
connection-reuse effects.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    lines: list[tuple[str, str]] = field(default_factory=list)  # every header line, in order


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _respond(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.record(
            SeenRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                        [(k.lower(), v) for k, v in self.headers.items()])
        )
        status = 200
        # /status/<code> lets a test ask for an error response without another server.
        parts = self.path.split("?", 1)[0].split("/")
        if len(parts) >= 3 and parts[1] == "status" and parts[2].isdigit():
            status = int(parts[2])
        body = f"ok {self.command} {self.path}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _respond

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: hundreds of load-test requests would bury the useful output."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self._lock = threading.Lock()
        self.seen: list[SeenRequest] = []

    def handle_error(self, request: object, client_address: object) -> None:
        """HAProxy resets idle server connections on stop; that is not an origin failure."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return
        super().handle_error(request, client_address)

    def record(self, request: SeenRequest) -> None:
        with self._lock:
            self.seen.append(request)


class Backend:
    """``with Backend() as b:`` serves on ``b.port`` (127.0.0.1) until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port))
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"backend:{self.port}", daemon=True
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def requests(self) -> list[SeenRequest]:
        with self._server._lock:
            return list(self._server.seen)

    def clear(self) -> None:
        with self._server._lock:
            self._server.seen.clear()

    def start(self) -> Backend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
