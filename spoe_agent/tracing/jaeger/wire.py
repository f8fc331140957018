"""Thrift wire primitives that the hand-written encoders share: varints, list headers, packers.

Tags, spans, batches and agent datagrams are partly written byte by byte rather than through
fastbinary (see ``tags`` and ``encode``); these are the pieces of the compact and binary protocols
they are built from, with the i64 range the ids and integer tags must fit.
"""

from __future__ import annotations

import struct
from typing import Final

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_U64 = 1 << 64
_LOW64 = _U64 - 1


def _varint(value: int) -> bytes:
    if value < 0x4000:
        return bytes((value,)) if value < 0x80 else bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_VARINTS: Final = [_varint(n) for n in range(128)]
_pack_i32 = struct.Struct(">i").pack
_pack_i64 = struct.Struct(">q").pack
_pack_f64_be = struct.Struct(">d").pack
_pack_f64_le = struct.Struct("<d").pack
_STOP: Final = b"\x00"
_CT_STRUCT: Final = 0x0C


def _compact_list_header(count: int) -> bytes:
    if count < 15:
        return bytes([(count << 4) | _CT_STRUCT])
    return bytes([0xF0 | _CT_STRUCT]) + _varint(count)


_COMPACT_LIST_HEADERS: Final = [_compact_list_header(n) for n in range(128)]


def _list_header_compact(count: int) -> bytes:
    return _COMPACT_LIST_HEADERS[count] if count < 128 else _compact_list_header(count)


def _zigzag_varint(value: int) -> bytes:
    return _varint(((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF)
