"""Hypothesis strategies and helpers for SPOP structures, shared by the protocol test files.

Besides the strategies this module holds the two things every codec-vs-grammar test needs:
:class:`Impl`, one interface over both implementations (the codec's position-returning
decoders are wrapped to demand the whole buffer, as the grammar does), and :func:`canon`, an
equality that also compares types, because ``True == 1`` would otherwise hide a decoder
returning the wrong kind of value.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from spoe_agent.protocol import codec, grammar
from spoe_agent.protocol.errors import InvalidFrame
from spoe_agent.protocol.types import DataType, Message, Scope, SetVar, Typed, UnsetVar
from spoe_agent.protocol.varint import decode_varint, encode_varint

MAX_UINT64 = (1 << 64) - 1
MIN_INT64 = -(1 << 63)
MAX_INT64 = (1 << 63) - 1
MAX_UINT32 = (1 << 32) - 1

# ------------------------------------------------------------------------ implementations


def _codec_whole(decode: Callable[[bytes, int], tuple[Any, int]], what: str) -> Callable:
    def parse(buf: bytes) -> Any:
        value, pos = decode(buf, 0)
        if pos != len(buf):
            raise InvalidFrame(f"{len(buf) - pos} byte(s) after the {what}")
        return value

    return parse


@dataclass(frozen=True)
class Impl:
    """The same operations under the same names, for parametrising tests over both codecs."""

    name: str
    parse_varint: Callable[[bytes], int]
    build_varint: Callable[[int], bytes]
    parse_typed: Callable[[bytes], Any]
    build_typed: Callable[[Any], bytes]
    parse_kv_list: Callable[[bytes], dict[str, Any]]
    build_kv_list: Callable[..., bytes]
    parse_messages: Callable[[bytes], list[Message]]
    build_messages: Callable[..., bytes]
    parse_actions: Callable[[bytes], list]
    build_actions: Callable[..., bytes]
    parse_frame: Callable[[bytes], Any]
    build_frame: Callable[..., bytes]

    def __repr__(self) -> str:
        return self.name


CODEC = Impl(
    name="codec",
    parse_varint=_codec_whole(decode_varint, "varint"),
    build_varint=encode_varint,
    parse_typed=_codec_whole(codec.decode_typed, "value"),
    build_typed=codec.encode_typed,
    parse_kv_list=codec.decode_kv_list,
    build_kv_list=codec.encode_kv_list,
    parse_messages=codec.decode_messages,
    build_messages=codec.encode_messages,
    parse_actions=codec.decode_actions,
    build_actions=codec.encode_actions,
    parse_frame=codec.decode_frame,
    build_frame=codec.encode_frame,
)

GRAMMAR = Impl(
    name="grammar",
    parse_varint=grammar.parse_varint,
    build_varint=grammar.build_varint,
    parse_typed=grammar.parse_typed,
    build_typed=grammar.build_typed,
    parse_kv_list=grammar.parse_kv_list,
    build_kv_list=grammar.build_kv_list,
    parse_messages=grammar.parse_messages,
    build_messages=grammar.build_messages,
    parse_actions=grammar.parse_actions,
    build_actions=grammar.build_actions,
    parse_frame=grammar.parse_frame,
    build_frame=grammar.build_frame,
)

IMPLS = (CODEC, GRAMMAR)

# ----------------------------------------------------------------------------- equality


def canon(obj: Any) -> Any:
    """A hashable, type-tagged image of a decoded structure; equal images mean equal results."""
    if isinstance(obj, Message):
        return ("Message", canon(obj.name), tuple(canon(arg) for arg in obj.args))
    if isinstance(obj, (SetVar, UnsetVar)):
        value = canon(obj.value) if isinstance(obj, SetVar) else None
        return (type(obj).__name__, type(obj.scope).__name__, int(obj.scope), obj.name, value)
    if isinstance(obj, dict):
        return ("dict", tuple((canon(k), canon(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)) and not isinstance(obj, Typed):
        return (type(obj).__name__, tuple(canon(item) for item in obj))
    return (type(obj).__name__, obj)


def expected(value: Any) -> Any:
    """What decoding the encoding of ``value`` must give back."""
    if isinstance(value, Typed):
        kind, inner = DataType(value.type), value.value
        if kind in (DataType.INT32, DataType.INT64):
            inner &= MAX_UINT64
            return inner - (1 << 64) if inner > MAX_INT64 else inner
        if kind in (DataType.UINT32, DataType.UINT64):
            return inner & MAX_UINT64
        if kind == DataType.NULL:
            return None
        if kind == DataType.BOOL:
            return bool(inner)
        if kind == DataType.IPV4:
            return ipaddress.IPv4Address(inner)
        if kind == DataType.IPV6:
            return ipaddress.IPv6Address(inner)
        if kind == DataType.STRING:
            return (
                inner if isinstance(inner, str) else bytes(inner).decode("utf-8", "surrogateescape")
            )
        return bytes(inner)
    if isinstance(value, Message):
        return Message(value.name, [(k, expected(v)) for k, v in value.args])
    if isinstance(value, SetVar):
        return SetVar(value.scope, value.name, expected(value.value))
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


# ---------------------------------------------------------------------------- strategies

uint64s = st.one_of(
    st.integers(0, 300),
    st.sampled_from([239, 240, 2287, 2288, 264431, 264432, MAX_UINT32, MAX_INT64, MAX_UINT64]),
    st.integers(0, MAX_UINT64),
)
int64s = st.one_of(
    st.integers(-300, 300),
    st.sampled_from([MIN_INT64, -1, 0, MAX_INT64]),
    st.integers(MIN_INT64, MAX_INT64),
)

# Text that survives a surrogateescape round trip: proper text, plus whatever arbitrary bytes
# decode to (lone low surrogates U+DC80..U+DCFF stand for the undecodable bytes).
texts = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.binary(max_size=40).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)
names = st.one_of(st.just(""), st.sampled_from(["ip", "src", "uid", "status"]), texts)
blobs = st.binary(max_size=64)
ipv4s = st.builds(ipaddress.IPv4Address, st.integers(0, MAX_UINT32))
ipv6s = st.builds(ipaddress.IPv6Address, st.integers(0, (1 << 128) - 1))

plain_values = st.one_of(
    st.none(),
    st.booleans(),
    int64s,
    texts,
    blobs,
    ipv4s,
    ipv6s,
)
"""Values that encode with their natural type and decode back equal to themselves."""

typed_values = st.one_of(
    st.builds(Typed, st.just(DataType.NULL), st.none()),
    st.builds(Typed, st.just(DataType.BOOL), st.booleans()),
    st.builds(Typed, st.sampled_from([DataType.INT32, DataType.INT64]), int64s),
    st.builds(Typed, st.sampled_from([DataType.UINT32, DataType.UINT64]), uint64s),
    st.builds(Typed, st.just(DataType.UINT32), st.integers(0, MAX_UINT32)),
    st.builds(Typed, st.just(DataType.IPV4), ipv4s),
    st.builds(Typed, st.just(DataType.IPV6), ipv6s),
    st.builds(Typed, st.just(DataType.STRING), st.one_of(texts, blobs)),
    st.builds(Typed, st.just(DataType.BINARY), blobs),
)
"""Values pinned to a wire type; decode them with :func:`expected` in mind."""

values = st.one_of(plain_values, typed_values)

kv_items = st.lists(st.tuples(names, values), max_size=8)

messages = st.builds(
    Message,
    name=names,
    args=st.lists(st.tuples(names, values), max_size=20),
)
message_lists = st.lists(messages, max_size=4)

scopes = st.sampled_from(list(Scope))
actions = st.one_of(
    st.builds(SetVar, scope=scopes, name=names, value=values),
    st.builds(UnsetVar, scope=scopes, name=names),
)
action_lists = st.lists(actions, max_size=8)

frame_types = st.one_of(st.sampled_from([0, 1, 2, 3, 101, 102, 103]), st.integers(0, 255))
flags = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, MAX_UINT32))


@st.composite
def frames(draw: st.DrawFn, payloads: st.SearchStrategy[bytes] = blobs) -> tuple:
    """Arguments for ``build_frame``: (type, stream-id, frame-id, payload, flags)."""
    return (draw(frame_types), draw(uint64s), draw(uint64s), draw(payloads), draw(flags))


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding damaged a few times: flipped bits, cuts, insertions, deletions."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if op == "insert" or not data:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
            continue
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        else:
            del data[at : at + draw(st.integers(1, 3))]
    return bytes(data)
