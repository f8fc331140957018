"""A TCP relay between HAProxy and the agent that notes which connection carried each stream's
NOTIFYs, so a test can show that HAProxy really spread one stream's events over connections
(and, with the workers' log lines, over workers) instead of assuming it.

Each HAProxy connection gets its own connection to the agent, so the relay changes nothing
HAProxy or the agent decide; the agent sees the relay's source port as the peer address it logs
at HELLO, which ties a connection to the worker that logged it.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType

_NOTIFY = int(FrameType.NOTIFY)


class SpopTap:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        #: stream key (the ``id`` argument) -> agent-side source ports of the connections
        #: that carried its NOTIFYs
        self.streams: dict[str, set[int]] = defaultdict(set)
        self._socks: list[socket.socket] = []
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            port = upstream.getsockname()[1]
            threading.Thread(target=self._up, args=(client, upstream, port), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, port: int) -> None:
        buf = b""
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
                buf += data
                while len(buf) >= 4:
                    size = int.from_bytes(buf[:4], "big")
                    if len(buf) < 4 + size:
                        break
                    body, buf = buf[4:4 + size], buf[4 + size:]
                    self._note(body, port)
        except OSError:
            pass
        finally:
            _shut(upstream)

    def _note(self, body: bytes, port: int) -> None:
        frame = codec.decode_frame(body)
        if frame.type != _NOTIFY or not frame.fin:
            return
        for message in codec.decode_messages(frame.payload):
            key = message.get("id")
            if isinstance(key, str):
                with self._lock:
                    self.streams[key].add(port)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            _shut(client)

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                _shut(sock)
                sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
