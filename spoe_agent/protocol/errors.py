"""Protocol errors carry the SPOP status code the agent must send in AGENT-DISCONNECT."""

from __future__ import annotations

from spoe_agent.protocol.types import Status


class ProtocolError(Exception):
    """A peer broke the protocol; ``status`` is the code for the AGENT-DISCONNECT reply."""

    status: Status = Status.UNKNOWN

    def __init__(self, message: str, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message


class InvalidFrame(ProtocolError):
    status = Status.INVALID_FRAME


class FrameTooBig(ProtocolError):
    status = Status.FRAME_TOO_BIG
