"""The values SPOP frames carry, as plain Python objects shared by both codecs.

Typed data decodes to ``None``, ``bool``, ``int``, :class:`ipaddress.IPv4Address`,
:class:`ipaddress.IPv6Address`, ``str`` or ``bytes``. Plain values encode with the type HAProxy
itself uses (INT64 for ints); :class:`Typed` pins an explicit wire type when that matters
(UINT32 for ``max-frame-size``, or to round-trip a frame exactly).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple


class FrameType(IntEnum):
    UNSET = 0
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


FLAG_FIN = 0x00000001
FLAG_ABORT = 0x00000002


class DataType(IntEnum):
    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


class Scope(IntEnum):
    PROC = 0
    SESS = 1
    TXN = 2
    REQ = 3
    RES = 4


class ActionType(IntEnum):
    SET_VAR = 1
    UNSET_VAR = 2


class Status(IntEnum):
    """SPOP status codes (SPOE.txt section 3.4, as HAProxy's code emits them)."""

    NORMAL = 0
    IO_ERROR = 1
    TIMEOUT = 2
    FRAME_TOO_BIG = 3
    INVALID_FRAME = 4
    NO_VERSION = 5
    NO_MAX_FRAME_SIZE = 6
    NO_CAPABILITIES = 7
    UNSUPPORTED_VERSION = 8
    BAD_MAX_FRAME_SIZE = 9
    FRAGMENTATION_NOT_SUPPORTED = 10
    INTERLACED_FRAMES = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE_ALLOCATION = 13
    UNKNOWN = 99


STATUS_MESSAGES = {
    Status.NORMAL: "normal",
    Status.IO_ERROR: "I/O error",
    Status.TIMEOUT: "a timeout occurred",
    Status.FRAME_TOO_BIG: "frame is too big",
    Status.INVALID_FRAME: "invalid frame received",
    Status.NO_VERSION: "version value not found",
    Status.NO_MAX_FRAME_SIZE: "max-frame-size value not found",
    Status.NO_CAPABILITIES: "capabilities value not found",
    Status.UNSUPPORTED_VERSION: "unsupported version",
    Status.BAD_MAX_FRAME_SIZE: "max-frame-size too big or too small",
    Status.FRAGMENTATION_NOT_SUPPORTED: "fragmentation not supported",
    Status.INTERLACED_FRAMES: "invalid interlaced frames",
    Status.FRAME_ID_NOT_FOUND: "frame-id not found",
    Status.RESOURCE_ALLOCATION: "resource allocation error",
    Status.UNKNOWN: "an unknown error occurred",
}


class Typed(NamedTuple):
    """A value with an explicit wire type (``Typed(DataType.UINT32, 16380)``)."""

    type: DataType
    value: Any


Value = None | bool | int | str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address | Typed


class Frame(NamedTuple):
    """One frame without its length prefix; ``payload`` is left undecoded (fragments need that)."""

    type: int
    flags: int
    stream_id: int
    frame_id: int
    payload: bytes

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)

    @property
    def abort(self) -> bool:
        return bool(self.flags & FLAG_ABORT)


@dataclass(slots=True)
class Message:
    """A SPOE message: its name and its arguments, in order; names may repeat or be empty."""

    name: str
    args: list[tuple[str, Any]] = field(default_factory=list)

    def get(self, name: str, default: Any = None) -> Any:
        for key, value in self.args:
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class SetVar:
    scope: Scope
    name: str
    value: Value

    type = ActionType.SET_VAR


@dataclass(frozen=True, slots=True)
class UnsetVar:
    scope: Scope
    name: str

    type = ActionType.UNSET_VAR


Action = SetVar | UnsetVar
