"""Hand-written SPOP codec for the hot path.

The grammar of record is :mod:`spoe_agent.protocol.grammar` (declared with ``construct``); this
module decodes the same bytes about 25x faster and a property test
(``tests/protocol/test_differential.py``) proves the two agree on arbitrary input, valid or not.
Every decode error is an :class:`~spoe_agent.protocol.errors.InvalidFrame`, never an
``IndexError`` or ``UnicodeDecodeError``, so a hostile peer can only ever earn a disconnect.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Final, TypeAlias

from spoe_agent.protocol.errors import InvalidFrame
from spoe_agent.protocol.types import (
    FLAG_FIN,
    Action,
    DataType,
    Frame,
    FrameType,
    Message,
    Scope,
    SetVar,
    Typed,
    UnsetVar,
)
from spoe_agent.protocol.varint import decode_varint, encode_varint

_U32: Final = struct.Struct(">I")
_HEADER: Final = struct.Struct(">BI")  # type, flags
_SIGN: Final = 1 << 63
_WRAP: Final = 1 << 64
# Single-byte varints are by far the common case: precompute them.
_VARINT1: Final = [bytes((i,)) for i in range(240)]
_tuple_new: Final = tuple.__new__

# ---------------------------------------------------------------------------------- varints


def _varint(value: int) -> bytes:
    if 0 <= value < 240:
        return _VARINT1[value]
    if 240 <= value < 2288:  # two bytes: stream ids mostly, which HAProxy counts up
        return bytes(((value & 0x0F) | 0xF0, (value - 240) >> 4))
    return encode_varint(value)


# ----------------------------------------------------------------------------- typed data


def decode_string(buf: bytes, pos: int) -> tuple[str, int]:
    """A NAME or STRING body: varint length then bytes, kept lossless with surrogateescape."""
    length, pos = decode_varint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise InvalidFrame("string runs past the end of the frame")
    return buf[pos:end].decode("utf-8", "surrogateescape"), end


def decode_typed(buf: bytes, pos: int) -> tuple[Any, int]:
    """Decode one TYPED-DATA item at ``pos``; return ``(value, next_pos)``."""
    try:
        tag = buf[pos]
    except IndexError:
        raise InvalidFrame("truncated typed data") from None
    pos += 1
    kind = tag & 0x0F
    if kind == 8:  # STRING
        return decode_string(buf, pos)
    if kind == 4 or kind == 2:  # INT64 / INT32: 64-bit two's complement on the wire
        value, pos = decode_varint(buf, pos)
        return (value - _WRAP if value & _SIGN else value), pos
    if kind == 0:
        return None, pos
    if kind == 1:
        return bool(tag & 0x10), pos
    if kind == 3 or kind == 5:
        return decode_varint(buf, pos)
    if kind == 6:
        end = pos + 4
        if end > len(buf):
            raise InvalidFrame("truncated IPv4 address")
        return ipaddress.IPv4Address(buf[pos:end]), end
    if kind == 7:
        end = pos + 16
        if end > len(buf):
            raise InvalidFrame("truncated IPv6 address")
        return ipaddress.IPv6Address(buf[pos:end]), end
    if kind == 9:
        length, pos = decode_varint(buf, pos)
        end = pos + length
        if end > len(buf):
            raise InvalidFrame("binary runs past the end of the frame")
        return bytes(buf[pos:end]), end
    raise InvalidFrame(f"unknown data type {kind}")


def _encode_bytes(tag: int, raw: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(raw)) + raw


# What a varint of each signedness carries (HAProxy reads the 32-bit types as 64-bit ones, as
# it writes them). An int outside went out wrapped (2**63 arrived as -9223372036854775808, a
# UINT64 of -1 as 18446744073709551615; black-box run): refused instead.
_INT64_LOW: Final = -(1 << 63)
_INT64_END: Final = 1 << 63
_SIGNED: Final = (_INT64_LOW, _INT64_END)
_UNSIGNED: Final = (0, 1 << 64)
_INT_RANGES: Final = {DataType.INT32: _SIGNED, DataType.UINT32: _UNSIGNED,
                      DataType.INT64: _SIGNED, DataType.UINT64: _UNSIGNED}
_BYTES_TYPES: Final = (bytes, bytearray, memoryview)


def _int64(value: int) -> bytes:
    if not _INT64_LOW <= value < _INT64_END:
        raise OverflowError(f"{value} does not fit in a signed 64-bit integer, HAProxy's")
    return b"\x04" + _varint(value)


def encode_typed(value: Any) -> bytes:
    """Encode a value as TYPED-DATA; ints go out as INT64 (what HAProxy sends for samples)."""
    if value is None:
        return b"\x00"
    if value is True:
        return b"\x11"
    if value is False:
        return b"\x01"
    cls = type(value)
    if cls is str:
        return _encode_bytes(8, value.encode("utf-8", "surrogateescape"))
    if cls is int:
        return _int64(value)
    if cls is Typed:
        return _encode_explicit(value.type, value.value)
    if cls is bytes or cls is bytearray or cls is memoryview:
        return _encode_bytes(9, bytes(value))
    if cls is ipaddress.IPv4Address:
        return b"\x06" + value.packed
    if cls is ipaddress.IPv6Address:
        return b"\x07" + value.packed
    if isinstance(value, int):  # IntEnum and friends
        return _int64(int(value))
    if isinstance(value, str):
        return _encode_bytes(8, str(value).encode("utf-8", "surrogateescape"))
    raise TypeError(f"cannot encode {cls.__name__} as SPOP typed data")


def _encode_explicit(kind: DataType, value: Any) -> bytes:
    if kind == DataType.NULL:
        return b"\x00"
    if kind == DataType.BOOL:
        # Not truthiness: Typed(BOOL, "false") went out as true (black-box run).
        if value is not True and value is not False:
            raise TypeError(f"BOOL takes True or False, not {type(value).__name__}")
        return b"\x11" if value else b"\x01"
    if kind in _INT_RANGES:
        if not isinstance(value, int):
            raise TypeError(f"{kind.name} takes an int, not {type(value).__name__}")
        low, end = _INT_RANGES[kind]
        if not low <= value < end:
            raise OverflowError(f"{value} does not fit in {kind.name}")
        return bytes((int(kind),)) + _varint(int(value))
    if kind == DataType.IPV4:
        return b"\x06" + ipaddress.IPv4Address(value).packed
    if kind == DataType.IPV6:
        return b"\x07" + ipaddress.IPv6Address(value).packed
    # bytes(5) is five NUL bytes: an int (or anything but text and bytes) is refused, not
    # sent as that (black-box run: Typed(STRING, 5) arrived as "\0\0\0\0\0").
    if kind == DataType.STRING:
        if isinstance(value, str):
            return _encode_bytes(8, value.encode("utf-8", "surrogateescape"))
        if not isinstance(value, _BYTES_TYPES):
            raise TypeError(f"STRING takes str or bytes, not {type(value).__name__}")
        return _encode_bytes(8, bytes(value))
    if kind == DataType.BINARY:
        if not isinstance(value, _BYTES_TYPES):
            raise TypeError(f"BINARY takes bytes, not {type(value).__name__}")
        return _encode_bytes(9, bytes(value))
    raise TypeError(f"unknown data type {kind!r}")


def encode_name(name: str) -> bytes:
    """NAME is untyped on the wire (varint length + bytes), whatever SPOE.txt's grammar says."""
    raw = name.encode("utf-8", "surrogateescape")
    return _varint(len(raw)) + raw


# --------------------------------------------------------------------------------- frames


def encode_frame(
    ftype: int, stream_id: int, frame_id: int, payload: bytes = b"", flags: int = FLAG_FIN
) -> bytes:
    """A whole frame on the wire: the 4-byte length prefix, header and payload."""
    body_len = 5 + len(payload)
    sid = _varint(stream_id)
    fid = _varint(frame_id)
    body_len += len(sid) + len(fid)
    return b"".join((_U32.pack(body_len), _HEADER.pack(ftype, flags), sid, fid, payload))


def decode_frame(body: bytes) -> Frame:
    """Decode a frame body (the bytes after the length prefix) into its header and raw payload."""
    if len(body) < 7:
        raise InvalidFrame(f"frame of {len(body)} bytes is shorter than the 7-byte minimum")
    ftype, flags = _HEADER.unpack_from(body, 0)
    stream_id = body[5]
    if stream_id < 240:
        pos = 6
    else:
        stream_id, pos = decode_varint(body, 5)
    frame_id = body[pos] if pos < len(body) else 240  # 240+: let decode_varint complain
    if frame_id < 240:
        pos += 1
    else:
        frame_id, pos = decode_varint(body, pos)
    # tuple.__new__ skips the NamedTuple's Python-level __new__: same object, half the cost.
    return _tuple_new(Frame, (ftype, flags, stream_id, frame_id, bytes(body[pos:])))


# ------------------------------------------------------------------------------ payloads


def decode_kv_list(payload: bytes) -> dict[str, Any]:
    """HELLO/DISCONNECT items. A repeated key keeps its first value, like HAProxy."""
    items: dict[str, Any] = {}
    pos = 0
    end = len(payload)
    while pos < end:
        name, pos = decode_string(payload, pos)
        value, pos = decode_typed(payload, pos)
        items.setdefault(name, value)
    return items


def encode_kv_list(items: dict[str, Any] | list[tuple[str, Any]]) -> bytes:
    pairs = items.items() if isinstance(items, dict) else items
    return b"".join(encode_name(k) + encode_typed(v) for k, v in pairs)


# Decoded arguments by their wire bytes. The arguments of a tracing configuration are mostly
# constants (``span=str("HAProxy session")``, ``tag=str("url.path")``, a NULL header), so most
# of a NOTIFY decodes as dict hits on byte slices instead of two slices, two UTF-8 decodes and a
# tuple each. Bounded, since the other arguments (ids, paths) are new every request; bytes hash
# with SipHash, so a peer cannot aim collisions at it.
_PAIRS: Final[dict[bytes, tuple[str, Any]]] = {}
_PAIRS_LIMIT: Final = 4096
_PAIR_MAX_BYTES: Final = 96
_NAMES: Final[dict[bytes, str]] = {}
_NAMES_LIMIT: Final = 1024
# The last few runs of known arguments that followed an unknown one, by message name and the
# run's first index, latest first: (their bytes, the arguments). A few, since some of them vary
# among a few values (a method, a status code, a host).
_Run: TypeAlias = tuple[bytes, tuple[tuple[str, Any], ...]]
_RUNS: Final[dict[tuple[str, int], tuple[_Run, ...]]] = {}
_RUNS_LIMIT: Final = 1024
_RUN_VARIANTS: Final = 4
_RUN_MAX_BYTES: Final = 1024


def _new_pair(raw: bytes, key_len: int) -> tuple[str, Any]:
    """Decode and remember an argument the fast path of ``decode_messages`` delimited in ``raw``:
    its name, then a STRING, small INT64, IPV4, IPV6 or NULL whose extent is already checked."""
    key = raw[1:1 + key_len].decode("utf-8", "surrogateescape") if key_len else ""
    tag = raw[1 + key_len]
    if tag == 8:
        value: Any = raw[3 + key_len:].decode("utf-8", "surrogateescape")
    elif tag == 4:
        value = raw[2 + key_len]
    elif tag == 6:
        value = ipaddress.IPv4Address(raw[2 + key_len:])
    elif tag == 7:
        value = ipaddress.IPv6Address(raw[2 + key_len:])
    else:
        value = None
    pair = (key, value)
    if len(raw) <= _PAIR_MAX_BYTES:
        if len(_PAIRS) >= _PAIRS_LIMIT:
            _PAIRS.clear()
        _PAIRS[raw] = pair
    return pair


def _new_name(raw: bytes) -> str:
    name = raw.decode("utf-8", "surrogateescape")
    if len(_NAMES) >= _NAMES_LIMIT:
        _NAMES.clear()
    _NAMES[raw] = name
    return name


def decode_messages(payload: bytes) -> list[Message]:
    """LIST-OF-MESSAGES, in order, with repeated and unnamed (empty-name) arguments kept.

    This is the hottest loop of the agent (a traced request is 8 NOTIFYs of ~20 arguments), so
    the common cases are inlined: names shorter than 240 bytes (one-byte varint length), and
    arguments whose value is such a string, a small INT64, an address or NULL are delimited and
    looked up whole in ``_PAIRS``; anything else goes through the general decoders.

    After an argument ``_PAIRS`` did not know (a request's id, its ``ts``, a URL path), the
    arguments that follow are looked up as one run in ``_RUNS``: a message's arguments up to
    the next unknown one (span names, tag keys and values) are mostly the same bytes as in the
    previous requests' messages of that name, and decoding is deterministic, so bytes once
    decoded into N known arguments decode into the same N arguments again.
    """
    messages: list[Message] = []
    pos = 0
    end = len(payload)
    value: Any  # a byte of the payload, then any decoded value (typed for mypyc, see setup.py)
    pairs = _PAIRS
    names = _NAMES
    runs = _RUNS
    try:
        while pos < end:
            n = payload[pos]
            if n < 240:
                stop = pos + 1 + n
                if stop > end:
                    raise InvalidFrame("string runs past the end of the frame")
                raw = payload[pos + 1:stop]
                name = names.get(raw) or _new_name(raw)
                pos = stop
            else:
                name, pos = decode_string(payload, pos)
            nb_args = payload[pos]
            pos += 1
            args: list[tuple[str, Any]] = []
            i = 0
            # The known arguments after the last unknown one: where they start, the index of
            # the first, and up to which index _RUNS has them (256, more than any: none yet).
            start = pos
            first = 0
            known = 256
            while i < nb_args:
                n = payload[pos]
                if n < 240:
                    vpos = pos + 1 + n
                    tag = payload[vpos]  # an IndexError if the name runs past the end
                    if tag == 8:  # STRING, flags clear
                        m = payload[vpos + 1]
                        stop = vpos + 2 + m if m < 240 else 0
                    elif tag == 4:  # INT64
                        value = payload[vpos + 1]
                        stop = vpos + 2 if value < 240 else -1
                    elif tag == 6:  # IPV4: client and server addresses repeat
                        stop = vpos + 5
                    elif tag == 7:  # IPV6
                        stop = vpos + 17
                    else:
                        stop = vpos + 1 if tag == 0 else 0  # NULL
                    if stop > 0:
                        if stop > end:
                            raise InvalidFrame("string runs past the end of the frame")
                        raw = payload[pos:stop]
                        pair = pairs.get(raw)
                        if pair is not None:
                            args.append(pair)
                            pos = stop
                            i += 1
                            continue
                # An argument the pair cache does not know: it ends a run of known ones.
                if i > known and pos - start <= _RUN_MAX_BYTES:
                    _new_run(name, first, payload[start:pos], args[first:])
                if n >= 240:
                    key, pos = decode_string(payload, pos)
                    value, pos = decode_typed(payload, pos)
                    args.append((key, value))
                elif stop > 0:
                    args.append(_new_pair(raw, n))
                    pos = stop
                elif stop < 0:
                    # A long INT64 (``ts=date(0,us)`` in every tracing message): straight to
                    # the varint, the name from the name cache.
                    value, vpos = decode_varint(payload, vpos + 1)
                    if n:
                        raw = payload[pos + 1:pos + 1 + n]
                        key = names.get(raw) or _new_name(raw)
                    else:
                        key = ""
                    args.append((key, value - _WRAP if value & _SIGN else value))
                    pos = vpos
                else:
                    key = payload[pos + 1:vpos].decode("utf-8", "surrogateescape") if n else ""
                    value, pos = decode_typed(payload, vpos)
                    args.append((key, value))
                i += 1
                # The known arguments after it may be a run that followed it before.
                start = pos
                first = known = i
                for seen, run in runs.get((name, i), ()):
                    stop = pos + len(seen)
                    if payload[pos:stop] == seen and len(run) <= nb_args - i:
                        args += run
                        pos = stop
                        i += len(run)
                        known = i
                        break
            if i > known and pos - start <= _RUN_MAX_BYTES:
                _new_run(name, first, payload[start:pos], args[first:])
            messages.append(Message(name, args))
    except IndexError:
        raise InvalidFrame(f"truncated list of messages{_NARGS_HINT}") from None
    except InvalidFrame as exc:
        raise InvalidFrame(f"{exc} in a NOTIFY's messages{_NARGS_HINT}") from None
    return messages


#: What an operator meets this error for: HAProxy writes a message's argument count in one byte
#: and sends a message of 256 or more arguments with the count wrapped, so the arguments past
#: the count read as the next messages (HAProxy 2.6 and 3.2 accept such a configuration).
_NARGS_HINT = (" (from HAProxy, the likely cause is a spoe-message with more than 255 arguments:"
               " HAProxy counts them in one byte, and each tag= with its value is two)")


def _new_run(name: str, first: int, raw: bytes, args: list[tuple[str, Any]]) -> None:
    key = (name, first)
    variants = _RUNS.get(key, ())
    if not variants and len(_RUNS) >= _RUNS_LIMIT:
        _RUNS.clear()
    _RUNS[key] = ((raw, tuple(args)), *variants[:_RUN_VARIANTS - 1])


def encode_messages(messages: list[Message]) -> bytes:
    out = []
    for message in messages:
        if len(message.args) > 255:
            raise ValueError("a SPOE message carries at most 255 arguments")
        out.append(encode_name(message.name))
        out.append(bytes((len(message.args),)))
        for key, value in message.args:
            out.append(encode_name(key))
            out.append(encode_typed(value))
    return b"".join(out)


def encode_actions(actions: list[Action]) -> bytes:
    out = []
    for action in actions:
        scope = int(action.scope)
        if not 0 <= scope <= 4:
            raise ValueError(f"variable scope must be 0-4 (proc..res), got {scope}")
        if type(action) is SetVar:
            out.append(bytes((1, 3, scope)))
            out.append(encode_name(action.name))
            out.append(encode_typed(action.value))
        elif type(action) is UnsetVar:
            out.append(bytes((2, 2, scope)))
            out.append(encode_name(action.name))
        else:
            raise TypeError(f"not an action: {action!r}")
    return b"".join(out)


def decode_actions(payload: bytes) -> list[Action]:
    """LIST-OF-ACTIONS; strict where HAProxy would silently stop (wrong NB-ARGS, bad scope)."""
    actions: list[Action] = []
    pos = 0
    end = len(payload)
    while pos < end:
        if pos + 3 > end:
            raise InvalidFrame("truncated action")
        atype, nb_args, scope = payload[pos], payload[pos + 1], payload[pos + 2]
        pos += 3
        if scope > 4:
            raise InvalidFrame(f"unknown variable scope {scope}")
        if atype == 1 and nb_args == 3:
            name, pos = decode_string(payload, pos)
            value, pos = decode_typed(payload, pos)
            actions.append(SetVar(Scope(scope), name, value))
        elif atype == 2 and nb_args == 2:
            name, pos = decode_string(payload, pos)
            actions.append(UnsetVar(Scope(scope), name))
        else:
            raise InvalidFrame(f"unknown action type {atype} with {nb_args} arguments")
    return actions


# ------------------------------------------------------------------- convenience builders


def ack(stream_id: int, frame_id: int, actions: list[Action] | None = None) -> bytes:
    if actions:
        return encode_frame(FrameType.ACK, stream_id, frame_id, encode_actions(actions))
    # Most ACKs carry no action: only the ids vary, after a prefix that depends on their size.
    # A stream's ~8 events are ACKed with the same stream id, which HAProxy counts up into
    # multi-byte varints: its encoding is looked up rather than recomputed.
    sid = _STREAM_IDS.get(stream_id)
    if sid is None:
        sid = _stream_id_bytes(stream_id)
    ids = sid + (_VARINT1[frame_id] if 0 <= frame_id < 240 else _varint(frame_id))
    return _EMPTY_ACK_PREFIXES[len(ids)] + ids


_STREAM_IDS: Final[dict[int, bytes]] = {}
_STREAM_IDS_LIMIT: Final = 4096


def _stream_id_bytes(stream_id: int) -> bytes:
    encoded = _varint(stream_id)
    if len(_STREAM_IDS) >= _STREAM_IDS_LIMIT:
        _STREAM_IDS.clear()
    _STREAM_IDS[stream_id] = encoded
    return encoded


# The length prefix and header of an empty ACK, by the size of its two varints (2 to 20 bytes).
_EMPTY_ACK_PREFIXES: Final = [_U32.pack(5 + n) + _HEADER.pack(FrameType.ACK, FLAG_FIN) for n in range(21)]


def notify(stream_id: int, frame_id: int, messages: list[Message], flags: int = FLAG_FIN) -> bytes:
    return encode_frame(FrameType.NOTIFY, stream_id, frame_id, encode_messages(messages), flags)


def disconnect(ftype: int, status: int, message: str) -> bytes:
    payload = encode_kv_list(
        [("status-code", Typed(DataType.UINT32, int(status))), ("message", message)]
    )
    return encode_frame(ftype, 0, 0, payload)
