"""Jaeger tags: attribute values normalised as the official exporter does, and encoded by hand.

Tags are most of a span's bytes. Writing them straight from the attribute mappings, with each
key's encoded prefix cached, costs less than building ``Tag`` structs for fastbinary; and the tags
many spans share (``ConstTags``, ``RecordTags``) are encoded once and their bytes spliced in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from opentelemetry.exporter.jaeger.thrift.gen.jaeger import ttypes as jt

from spoe_agent.tracing.jaeger.wire import (
    _I64_MAX,
    _I64_MIN,
    _STOP,
    _VARINTS,
    _list_header_compact,
    _pack_f64_be,
    _pack_f64_le,
    _pack_i32,
    _pack_i64,
    _varint,
)


class _NoValue:
    """A string tag written without its value, as the official exporter does for a None version."""

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Any = _NoValue()

TagPairs = Iterable[tuple[str, Any]]


def _pairs(tags: Any) -> TagPairs:
    if not tags:
        return ()
    return tags.items() if hasattr(tags, "items") else tags


# --------------------------------------------------------------------------------------------------
# tag values, as the official ``_translate_attribute`` treats them


def _normalise(value: Any, max_len: int | None) -> Any:
    """Map an attribute value onto str/bool/int/float (or None to skip), slow path included."""
    vtype = type(value)
    if vtype is str:
        return value if max_len is None else value[:max_len]
    if vtype is int:
        if _I64_MIN <= value <= _I64_MAX:
            return value
        text = str(value)  # the official exporter would fail the whole batch on this one
        return text if max_len is None else text[:max_len]
    if vtype is bool or vtype is float or value is NO_VALUE:
        return value
    if vtype is tuple:
        text = str(value)
        return text if max_len is None else text[:max_len]
    # subclasses (IntEnum, str enums, ...) take the official isinstance route, in its order
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return _normalise(str(value), max_len)
    if isinstance(value, int):
        return _normalise(int(value), max_len)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, tuple):
        return _normalise(tuple(value), max_len)
    return None


def _thrift_tags(pairs: TagPairs, max_len: int | None) -> list[jt.Tag]:
    tags = []
    for key, raw in pairs:
        value = _normalise(raw, max_len)
        vtype = type(value)
        if value is NO_VALUE:
            tags.append(jt.Tag(key=key, vType=jt.TagType.STRING))
        elif vtype is str:
            tags.append(jt.Tag(key=key, vType=jt.TagType.STRING, vStr=value))
        elif vtype is bool:
            tags.append(jt.Tag(key=key, vType=jt.TagType.BOOL, vBool=value))
        elif vtype is int:
            tags.append(jt.Tag(key=key, vType=jt.TagType.LONG, vLong=value))
        elif vtype is float:
            tags.append(jt.Tag(key=key, vType=jt.TagType.DOUBLE, vDouble=value))
    return tags


# --------------------------------------------------------------------------------------------------
# tag encoding by hand, with each key's encoded prefix cached
#
# Compact protocol: a field header is one byte (id delta << 4 | type); integers are zigzag
# varints, doubles little-endian, and a bool field's value is its header's type (1 true, 2 false).
# A list header is one byte (size << 4 | element type) below 15 elements, else 0xFC + varint size.
# Tag is {1: key, 2: vType (i32), 3: vStr, 4: vDouble, 5: vBool, 6: vLong}.
# Binary protocol: a field header is type + i16 id; a list header is element type + i32 size.


_KEY_CACHE_LIMIT: Final = 4096
_compact_keys: Final[dict[str, tuple[bytes, ...]]] = {}
_binary_keys: Final[dict[str, tuple[bytes, ...]]] = {}


def _compact_key(key: str) -> tuple[bytes, ...]:
    encoded = key.encode("utf-8")
    head = b"\x18" + _varint(len(encoded)) + encoded + b"\x15"  # key, then vType's header
    prefixes = (
        head + b"\x00\x18",  # STRING, vStr header
        head + b"\x06\x46",  # LONG, vLong header
        head + b"\x04\x31\x00",  # BOOL true, STOP
        head + b"\x04\x32\x00",  # BOOL false, STOP
        head + b"\x02\x27",  # DOUBLE, vDouble header
        head + b"\x00\x00",  # STRING without value, STOP
    )
    if len(_compact_keys) >= _KEY_CACHE_LIMIT:
        _compact_keys.clear()
    _compact_keys[key] = prefixes
    return prefixes


def _binary_key(key: str) -> tuple[bytes, ...]:
    encoded = key.encode("utf-8")
    head = b"\x0b\x00\x01" + _pack_i32(len(encoded)) + encoded + b"\x08\x00\x02"
    prefixes = (
        head + b"\x00\x00\x00\x00\x0b\x00\x03",
        head + b"\x00\x00\x00\x03\x0a\x00\x06",
        head + b"\x00\x00\x00\x02\x02\x00\x05\x01\x00",
        head + b"\x00\x00\x00\x02\x02\x00\x05\x00\x00",
        head + b"\x00\x00\x00\x01\x04\x00\x04",
        head + b"\x00\x00\x00\x00\x00",
    )
    if len(_binary_keys) >= _KEY_CACHE_LIMIT:
        _binary_keys.clear()
    _binary_keys[key] = prefixes
    return prefixes


def _tags_compact(pairs: TagPairs, max_len: int | None, parts: list[bytes]) -> int:
    """Append the compact encoding of each tag to ``parts``; return how many were written."""
    count = 0
    keys = _compact_keys
    varints = _VARINTS
    append = parts.append
    for key, value in pairs:
        prefixes = keys.get(key) or _compact_key(key)
        vtype = type(value)
        if vtype is str:
            if max_len is not None:
                value = value[:max_len]
            encoded = value.encode("utf-8")
            size = len(encoded)
            parts += (prefixes[0], varints[size] if size < 128 else _varint(size), encoded, _STOP)
        elif vtype is int and _I64_MIN <= value <= _I64_MAX:
            zigzag = (value << 1) ^ (value >> 63)
            parts += (prefixes[1], varints[zigzag] if zigzag < 128 else _varint(zigzag), _STOP)
        elif vtype is bool:
            append(prefixes[2] if value else prefixes[3])
        elif vtype is float:
            parts += (prefixes[4], _pack_f64_le(value), _STOP)
        elif value is NO_VALUE:
            append(prefixes[5])
        else:
            value = _normalise(value, max_len)
            if value is None:
                continue
            count += _tags_compact(((key, value),), None, parts)
            continue
        count += 1
    return count


def _tags_binary(pairs: TagPairs, max_len: int | None, parts: list[bytes]) -> int:
    """Append the binary encoding of each tag to ``parts``; return how many were written."""
    count = 0
    keys = _binary_keys
    append = parts.append
    for key, value in pairs:
        prefixes = keys.get(key) or _binary_key(key)
        vtype = type(value)
        if vtype is str:
            if max_len is not None:
                value = value[:max_len]
            encoded = value.encode("utf-8")
            parts += (prefixes[0], _pack_i32(len(encoded)), encoded, _STOP)
        elif vtype is int and _I64_MIN <= value <= _I64_MAX:
            parts += (prefixes[1], _pack_i64(value), _STOP)
        elif vtype is bool:
            append(prefixes[2] if value else prefixes[3])
        elif vtype is float:
            parts += (prefixes[4], _pack_f64_be(value), _STOP)
        elif value is NO_VALUE:
            append(prefixes[5])
        else:
            value = _normalise(value, max_len)
            if value is None:
                continue
            count += _tags_binary(((key, value),), None, parts)
            continue
        count += 1
    return count


# --------------------------------------------------------------------------------------------------
# tags shared by many spans, encoded once


class ConstTags:
    """Tags shared by many spans (resource, kind+scope), pre-encoded in both protocols."""

    __slots__ = ("pairs", "count", "compact", "binary")

    def __init__(self, pairs: TagPairs, max_len: int | None) -> None:
        normalised = ((key, _normalise(value, max_len)) for key, value in pairs)
        self.pairs = [(key, value) for key, value in normalised if value is not None]
        parts: list[bytes] = []
        self.count = _tags_compact(self.pairs, None, parts)
        self.compact = b"".join(parts)
        parts = []
        _tags_binary(self.pairs, None, parts)
        self.binary = b"".join(parts)


class RecordTags:
    """What every record with the same resource, kind, scope and status shares, encoded once.

    The resource, status and suffix (span.kind, scope, error) tags follow a span's own
    attributes in this order with nothing in between, so they are one compact byte string
    (``compact``); ``count`` is how many tags that is. After the head, a record without
    attributes or events is all shared bytes: the tags field with its list header, then the
    Span's STOP (``without_own``); one without events ends with ``compact_end``.
    ``service`` names the span's Process. The objects it was built from are kept so that an
    id reused by a new object is detected.
    """

    __slots__ = (
        "resource",
        "scope",
        "status",
        "service",
        "count",
        "compact",
        "compact_end",
        "without_own",
    )

    def __init__(
        self, resource: Any, scope: Any, status: Any, service: str, parts: Sequence[ConstTags]
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.status = status
        self.service = service
        self.count = sum(part.count for part in parts)
        self.compact = b"".join(part.compact for part in parts)
        self.compact_end = self.compact + _STOP
        self.without_own = b"\x19" + _list_header_compact(self.count) + self.compact_end
