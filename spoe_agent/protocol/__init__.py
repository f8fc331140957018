"""SPOP 2.0, sans-IO: the frame codec and the per-connection state machine."""

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
from spoe_agent.protocol.errors import FrameTooBig, InvalidFrame, ProtocolError
from spoe_agent.protocol.types import (
    Action,
    DataType,
    Frame,
    FrameType,
    Message,
    Scope,
    SetVar,
    Status,
    Typed,
    UnsetVar,
)

__all__ = [
    "Action", "ConnectionClosed", "DataType", "DisconnectReceived", "Frame", "FrameTooBig",
    "FrameType", "HelloReceived", "InvalidFrame", "Message", "NotifyAborted", "NotifyReceived",
    "ProtocolError", "ProtocolViolation", "Scope", "SetVar", "SpopConnection", "State", "Status",
    "Typed", "UnsetVar",
]
