"""A blocking SPOP client that plays HAProxy, for tests that talk to a real agent process."""

from __future__ import annotations

import socket
from typing import Any

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import DataType, Frame, FrameType, Typed


def hello_frame(capabilities: str = "pipelining,async", max_frame_size: int = 16380,
                healthcheck: bool = False) -> bytes:
    items: list[tuple[str, Any]] = [
        ("supported-versions", "2.0"),
        ("max-frame-size", Typed(DataType.UINT32, max_frame_size)),
        ("capabilities", capabilities),
    ]
    if healthcheck:
        items.append(("healthcheck", True))
    else:
        items.append(("engine-id", "00000000-0000-4000-8000-000000000000"))
    return codec.encode_frame(FrameType.HAPROXY_HELLO, 0, 0, codec.encode_kv_list(items))


class SpopClient:
    def __init__(self, address: tuple[str, int] | str, timeout: float = 5.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SpopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> Frame | None:
        """The next frame, or None on EOF."""
        while True:
            if len(self._buf) >= 4:
                length = int.from_bytes(self._buf[:4], "big")
                if len(self._buf) >= 4 + length:
                    body, self._buf = self._buf[4:4 + length], self._buf[4 + length:]
                    return codec.decode_frame(body)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk

    def handshake(self, **kwargs: Any) -> dict[str, Any]:
        self.send(hello_frame(**kwargs))
        frame = self.read_frame()
        assert frame is not None and frame.type == FrameType.AGENT_HELLO, frame
        return codec.decode_kv_list(frame.payload)

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False
