"""The SPOP wire grammar of record, declared with ``construct``.

:mod:`spoe_agent.protocol.codec` is the fast hand-written decoder used on the hot path; this
module states the same grammar declaratively so that it can be read against
``doc/SPOE.txt`` (and the corrections in the project's protocol notes) line by line, and so
that a property test can prove the two agree on arbitrary input. It is not meant to be fast.

Every public ``parse_*`` function returns exactly the Python objects the codec returns
(:class:`~spoe_agent.protocol.types.Frame`, ``dict``, :class:`~spoe_agent.protocol.types.Message`,
:class:`~spoe_agent.protocol.types.SetVar` / :class:`~spoe_agent.protocol.types.UnsetVar`,
plain values) and turns *any* failure into :class:`~spoe_agent.protocol.errors.InvalidFrame`,
so results and failures of the two implementations are directly comparable.

Where SPOE.txt and HAProxy disagree, the grammar follows HAProxy: names are untyped (varint
length + bytes), the action scope is a raw byte, and integers are 64-bit two's complement
whatever their type byte says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from construct import (
    Adapter,
    BitsInteger,
    BitStruct,
    Bytes,
    Construct,
    ConstructError,
    Container,
    ExplicitError,
    ExprAdapter,
    Flag,
    FocusedSeq,
    GreedyBytes,
    GreedyRange,
    If,
    Int8ub,
    Int32ub,
    Nibble,
    Pass,
    Prefixed,
    PrefixedArray,
    RepeatUntil,
    SizeofError,
    Struct,
    Switch,
    this,
)
from construct.core import stream_size, stream_tell

from spoe_agent.protocol.errors import InvalidFrame
from spoe_agent.protocol.types import (
    FLAG_FIN,
    Action,
    ActionType,
    DataType,
    Frame,
    Message,
    Scope,
    SetVar,
    Typed,
    UnsetVar,
)

__all__ = [
    "GrammarViolation",
    "VarInt",
    "SignedVarInt",
    "Name",
    "TypedData",
    "KVItem",
    "KVItems",
    "KVList",
    "MessageItem",
    "ListOfMessages",
    "ScopeByte",
    "ActionItem",
    "ListOfActions",
    "FrameBody",
    "WireFrame",
    "parse_varint",
    "build_varint",
    "parse_typed",
    "build_typed",
    "parse_kv_list",
    "build_kv_list",
    "parse_messages",
    "build_messages",
    "parse_actions",
    "build_actions",
    "parse_frame",
    "build_frame",
]

MAX_UINT64 = (1 << 64) - 1
MIN_INT64 = -(1 << 63)
MIN_FRAME_SIZE = 7  # type + flags + two one-byte varints


class GrammarViolation(ExplicitError):
    """A structurally complete item that the grammar still forbids.

    It derives from :class:`construct.ExplicitError` on purpose: ``GreedyRange`` re-raises
    those instead of backtracking, so the precise reason (bad scope, unknown type, varint
    overflow...) reaches the caller rather than a generic "trailing bytes" complaint.
    """


class _Reject(Construct):
    """A grammar branch that exists only to refuse the input with a precise reason."""

    def __init__(self, reason: Callable[[Any], str]) -> None:
        super().__init__()
        self.reason = reason

    def _parse(self, stream, context, path):
        raise GrammarViolation(self.reason(context))

    def _build(self, obj, stream, context, path):
        raise GrammarViolation(self.reason(context))

    def _sizeof(self, context, path):
        raise SizeofError(path=path)


class _End(Construct):
    """End of a list payload: any leftover byte is an item that did not parse completely.

    Lists run "until end of frame" (notes section 5), so ``GreedyRange`` has to stop by
    backtracking over the failing item; this terminator turns that silent stop into an error,
    exactly like the codec, which never ignores trailing bytes.
    """

    def __init__(self, complaint: str) -> None:
        super().__init__()
        self.complaint = complaint  # formatted with {count} and {offset}
        self.flagbuildnone = True

    def _parse(self, stream, context, path):
        offset = stream_tell(stream, path)
        count = stream_size(stream) - offset
        if count:
            raise GrammarViolation(self.complaint.format(count=count, offset=offset))
        return None

    def _build(self, obj, stream, context, path):
        return None

    def _sizeof(self, context, path):
        return 0


# ------------------------------------------------------------------------------ varint
#
# HAProxy's "peers" varint (SPOE notes section 3), not LEB128: a head byte that is the whole
# value below 240, otherwise its low 4 bits plus a tail of 7-bit groups whose top bit means
# "more follows". At most 10 bytes in all, i.e. at most 9 tail bytes.

_VarIntBytes = Struct(
    "head" / Int8ub,
    "tail"
    / If(
        this.head >= 240,
        RepeatUntil(lambda byte, seen, _ctx: byte < 128 or len(seen) == 9, Int8ub),
    ),
)


class _VarIntAdapter(Adapter):
    """Arithmetic of the varint; the decoder adds whole bytes, which cancels the offsets."""

    def _decode(self, obj, context, path):
        if obj.tail is None:
            return obj.head
        if obj.tail[-1] >= 128:
            raise GrammarViolation("varint longer than 10 bytes")
        value = obj.head
        shift = 4
        for byte in obj.tail:
            value += byte << shift
            shift += 7
        if value > MAX_UINT64:
            raise GrammarViolation("varint overflows 64 bits")
        return value

    def _encode(self, obj, context, path):
        value = int(obj)
        if not MIN_INT64 <= value <= MAX_UINT64:
            raise ValueError(f"{value} does not fit a 64-bit varint")
        value &= MAX_UINT64  # negatives go out as two's complement
        if value < 240:
            return Container(head=value, tail=None)
        head = (value & 0xFF) | 0xF0
        tail = []
        value = (value - 240) >> 4
        while value >= 128:
            tail.append((value & 0xFF) | 0x80)
            value = (value - 128) >> 7
        tail.append(value)
        return Container(head=head, tail=tail)


VarInt = _VarIntAdapter(_VarIntBytes)
"""Unsigned 64-bit varint; building also accepts negative int64 (as two's complement)."""

SignedVarInt = ExprAdapter(
    VarInt,
    lambda value, _ctx: value - (1 << 64) if value >> 63 else value,
    lambda value, _ctx: value,
)
"""INT32/INT64 payload: one uint64 read back as int64, with no 32-bit sign extension."""


# ------------------------------------------------------------------------- names, data


def _text_decode(raw: bytes, _ctx: Any) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _text_encode(text: str | bytes, _ctx: Any) -> bytes:
    return text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)


_Blob = Prefixed(VarInt, GreedyBytes)

Name = ExprAdapter(_Blob, _text_decode, _text_encode)
"""NAME: untyped, varint length + bytes (SPOE.txt's ``<STRING>`` here is wrong)."""

_Text = Name  # a STRING value has exactly the layout of a NAME after its type byte

_IPv4 = ExprAdapter(
    Bytes(4),
    lambda raw, _ctx: ipaddress.IPv4Address(raw),
    lambda addr, _ctx: ipaddress.IPv4Address(addr).packed,
)
_IPv6 = ExprAdapter(
    Bytes(16),
    lambda raw, _ctx: ipaddress.IPv6Address(raw),
    lambda addr, _ctx: ipaddress.IPv6Address(addr).packed,
)

# Type in the low nibble, flags in the high one; flag bit 0 (0x10) is the BOOL value and the
# other flag bits are ignored on receipt, as HAProxy does.
_Tag = BitStruct(
    "flags" / BitsInteger(3),
    "bool" / Flag,
    "type" / Nibble,
)

_TypedStruct = Struct(
    "tag" / _Tag,
    "data"
    / Switch(
        this.tag.type,
        {
            DataType.NULL: Pass,
            DataType.BOOL: Pass,
            DataType.INT32: SignedVarInt,
            DataType.UINT32: VarInt,
            DataType.INT64: SignedVarInt,
            DataType.UINT64: VarInt,
            DataType.IPV4: _IPv4,
            DataType.IPV6: _IPv6,
            DataType.STRING: _Text,
            DataType.BINARY: _Blob,
        },
        default=_Reject(lambda ctx: f"unknown data type {ctx.tag.type}"),
    ),
)

_INT_TYPES = (DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64)


def _explicit(kind: Any, value: Any) -> tuple[DataType, Any]:
    try:
        kind = DataType(kind)
    except ValueError:
        raise TypeError(f"unknown data type {kind!r}") from None
    if kind == DataType.NULL:
        return kind, None
    if kind == DataType.BOOL:
        return kind, bool(value)
    if kind in _INT_TYPES:
        return kind, int(value)
    if kind == DataType.IPV4:
        return kind, ipaddress.IPv4Address(value)
    if kind == DataType.IPV6:
        return kind, ipaddress.IPv6Address(value)
    if kind == DataType.STRING:
        return kind, value if isinstance(value, str) else bytes(value)
    return kind, bytes(value)  # BINARY


def _wire_form(value: Any) -> tuple[DataType, Any]:
    """Pick the wire type the way the codec does: ints are INT64, like HAProxy's samples."""
    if value is None:
        return DataType.NULL, None
    if isinstance(value, bool):
        return DataType.BOOL, value
    if isinstance(value, Typed):
        return _explicit(value.type, value.value)
    if isinstance(value, int):
        return DataType.INT64, int(value)
    if isinstance(value, str):
        return DataType.STRING, value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return DataType.BINARY, bytes(value)
    if isinstance(value, ipaddress.IPv4Address):
        return DataType.IPV4, value
    if isinstance(value, ipaddress.IPv6Address):
        return DataType.IPV6, value
    raise TypeError(f"cannot encode {type(value).__name__} as SPOP typed data")


class _TypedAdapter(Adapter):
    """Collapse (tag, data) into the plain value; BOOL lives in the tag, not in the data."""

    def _decode(self, obj, context, path):
        if obj.tag.type == DataType.BOOL:
            return obj.tag.bool
        return obj.data

    def _encode(self, obj, context, path):
        kind, data = _wire_form(obj)
        is_true = kind == DataType.BOOL and data
        return Container(
            tag=Container(flags=0, bool=bool(is_true), type=int(kind)),
            data=None if kind in (DataType.NULL, DataType.BOOL) else data,
        )


TypedData = _TypedAdapter(_TypedStruct)
"""TYPED-DATA: decodes to None/bool/int/IPv4Address/IPv6Address/str/bytes."""


# ---------------------------------------------------------------------------- payloads


def _until_end(item: Construct, what: str) -> Construct:
    """``{ item }*`` up to the end of the payload, with nothing left over."""
    leftover = f"{{count}} byte(s) at offset {{offset}} do not form a complete {what}"
    return FocusedSeq("items", "items" / GreedyRange(item), _End(leftover))


KVItem = ExprAdapter(
    Struct("name" / Name, "value" / TypedData),
    lambda obj, _ctx: (obj.name, obj.value),
    lambda pair, _ctx: Container(name=pair[0], value=pair[1]),
)
"""``<NAME> <TYPED-DATA>`` as a ``(name, value)`` pair."""

KVItems = _until_end(KVItem, "key/value item")
"""KV-LIST as the ordered pairs on the wire, duplicates included."""


def _first_wins(pairs: Iterable[tuple[str, Any]], _ctx: Any) -> dict[str, Any]:
    items: dict[str, Any] = {}
    for name, value in pairs:
        items.setdefault(name, value)
    return items


def _as_pairs(items: Any, _ctx: Any) -> list[tuple[str, Any]]:
    return list(items.items()) if isinstance(items, dict) else list(items)


KVList = ExprAdapter(KVItems, _first_wins, _as_pairs)
"""KV-LIST as a dict; a repeated key keeps its first value, as HAProxy's lookups do."""

MessageItem = ExprAdapter(
    Struct("name" / Name, "args" / PrefixedArray(Int8ub, KVItem)),
    lambda obj, _ctx: Message(obj.name, list(obj.args)),
    lambda msg, _ctx: Container(name=msg.name, args=list(msg.args)),
)
"""``<NAME> <NB-ARGS:1 byte> { <NAME> <TYPED-DATA> } x NB-ARGS``; empty arg names allowed."""

ListOfMessages = _until_end(MessageItem, "message")


class _ScopeAdapter(Adapter):
    """The variable scope is a raw byte (not TYPED-DATA) limited to proc..res."""

    def _decode(self, obj, context, path):
        if obj > Scope.RES:
            raise GrammarViolation(f"unknown variable scope {obj}")
        return Scope(obj)

    def _encode(self, obj, context, path):
        value = int(obj)
        if not Scope.PROC <= value <= Scope.RES:
            raise ValueError(f"unknown variable scope {value}")
        return value


ScopeByte = _ScopeAdapter(Int8ub)

_ActionStruct = Struct(
    "type" / Int8ub,
    "nb_args" / Int8ub,
    "scope" / ScopeByte,
    "args"
    / Switch(
        lambda ctx: (ctx.type, ctx.nb_args),
        {
            # SET-VAR   : 01 03 <SCOPE> <NAME> <TYPED-DATA>
            (ActionType.SET_VAR, 3): Struct("name" / Name, "value" / TypedData),
            # UNSET-VAR : 02 02 <SCOPE> <NAME>
            (ActionType.UNSET_VAR, 2): Struct("name" / Name),
        },
        default=_Reject(lambda ctx: f"unknown action type {ctx.type} with {ctx.nb_args} arguments"),
    ),
)


def _action_decode(obj: Any, _ctx: Any) -> Action:
    if obj.type == ActionType.SET_VAR:
        return SetVar(obj.scope, obj.args.name, obj.args.value)
    return UnsetVar(obj.scope, obj.args.name)


def _action_encode(action: Any, _ctx: Any) -> Container:
    if type(action) is SetVar:
        args = Container(name=action.name, value=action.value)
        return Container(type=ActionType.SET_VAR, nb_args=3, scope=action.scope, args=args)
    if type(action) is UnsetVar:
        args = Container(name=action.name)
        return Container(type=ActionType.UNSET_VAR, nb_args=2, scope=action.scope, args=args)
    raise TypeError(f"not an action: {action!r}")


ActionItem = ExprAdapter(_ActionStruct, _action_decode, _action_encode)
"""One action. Strict where HAProxy silently stops: a bad one is an error, not the end."""

ListOfActions = _until_end(ActionItem, "action")


# ------------------------------------------------------------------------------ frames

FrameBody = ExprAdapter(
    Struct(
        "type" / Int8ub,
        "flags" / Int32ub,
        "stream_id" / VarInt,
        "frame_id" / VarInt,
        "payload" / GreedyBytes,
    ),
    lambda obj, _ctx: Frame(obj.type, obj.flags, obj.stream_id, obj.frame_id, obj.payload),
    lambda frame, _ctx: Container(
        type=frame.type,
        flags=frame.flags,
        stream_id=frame.stream_id,
        frame_id=frame.frame_id,
        payload=bytes(frame.payload),
    ),
)
"""FRAME: the 7-byte minimum (1 + 4 + 1 + 1) is implied by the layout itself."""

WireFrame = Prefixed(Int32ub, FrameBody)
"""``<FRAME-LENGTH: uint32 BE> <FRAME>``; the length counts the bytes after itself."""


# ------------------------------------------------------------------------ public API


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConstructError) and exc.path:
        _header, _, text = text.partition("\n")
        return f"{text} (at {exc.path})"
    return text


def _parse(con: Construct, data: bytes, what: str) -> Any:
    try:
        return con.parse(bytes(data))
    except Exception as exc:  # construct, ipaddress and codecs errors alike
        raise InvalidFrame(f"invalid {what}: {_reason(exc)}") from exc


def _build(con: Construct, obj: Any) -> bytes:
    try:
        return con.build(obj)
    except ConstructError as exc:
        raise ValueError(_reason(exc)) from exc


_WholeVarInt = FocusedSeq("value", "value" / VarInt, _End("{count} byte(s) after the varint"))
_WholeTyped = FocusedSeq("value", "value" / TypedData, _End("{count} byte(s) after the value"))


def parse_varint(buf: bytes) -> int:
    """Decode a buffer holding exactly one varint."""
    return _parse(_WholeVarInt, buf, "varint")


def build_varint(value: int) -> bytes:
    return _build(VarInt, value)


def parse_typed(buf: bytes) -> Any:
    """Decode a buffer holding exactly one TYPED-DATA item."""
    return _parse(_WholeTyped, buf, "typed data")


def build_typed(value: Any) -> bytes:
    """Encode like ``codec.encode_typed``: ints as INT64, :class:`Typed` for any other type."""
    return _build(TypedData, value)


def parse_kv_list(payload: bytes) -> dict[str, Any]:
    return _parse(KVList, payload, "kv-list")


def build_kv_list(items: dict[str, Any] | Iterable[tuple[str, Any]]) -> bytes:
    return _build(KVList, items)


def parse_messages(payload: bytes) -> list[Message]:
    return list(_parse(ListOfMessages, payload, "list of messages"))


def build_messages(messages: Iterable[Message]) -> bytes:
    return _build(ListOfMessages, list(messages))


def parse_actions(payload: bytes) -> list[Action]:
    return list(_parse(ListOfActions, payload, "list of actions"))


def build_actions(actions: Iterable[Action]) -> bytes:
    return _build(ListOfActions, list(actions))


def parse_frame(body: bytes) -> Frame:
    """Decode a frame body (after the length prefix); the payload stays raw for reassembly."""
    if len(body) < MIN_FRAME_SIZE:
        raise InvalidFrame(
            f"frame of {len(body)} bytes is shorter than the {MIN_FRAME_SIZE}-byte minimum"
        )
    return _parse(FrameBody, body, "frame")


def build_frame(
    ftype: int,
    stream_id: int,
    frame_id: int,
    payload: bytes = b"",
    flags: int = FLAG_FIN,
) -> bytes:
    """A whole frame on the wire, length prefix included, like ``codec.encode_frame``."""
    return _build(WireFrame, Frame(int(ftype), flags, stream_id, frame_id, bytes(payload)))
