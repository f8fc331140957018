"""HAProxy's variable-length integer ("peers" encoding), which is *not* LEB128.

The first byte carries 4 value bits when it is >= 240, every later byte 7 bits with the top
bit meaning "more follows"; the decoder adds whole bytes, which cancels the offsets the
encoder subtracts, so every value has exactly one encoding.
"""

from __future__ import annotations

from typing import Final

from spoe_agent.protocol.errors import InvalidFrame

MAX_UINT64 = (1 << 64) - 1


def encode_varint(value: int) -> bytes:
    """Encode an unsigned 64-bit value; negative ints (down to -2**63) as two's complement."""
    if value > MAX_UINT64 or value < -(1 << 63):
        raise ValueError(f"{value} does not fit in 64 bits")
    value &= MAX_UINT64
    if value < 240:
        return bytes((value,))
    out = bytearray(((value & 0xFF) | 0xF0,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value & 0xFF) | 0x80)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


# The values of the bytes from the fourth on of the 4- to 8-byte varints seen, by those bytes
# (five, the varint's end and whatever follows it): (their part of the value, the varint's
# length). Such varints are timestamps in practice (every traced message's ``ts=date(0,us)`` is
# 8 bytes), whose bytes from the fourth on change every 2**18 us: a quarter of a second of
# messages decodes them with one dict hit. Bounded, and bytes hash with SipHash.
_TAILS: Final[dict[bytes, tuple[int, int]]] = {}
_TAILS_LIMIT: Final = 1024


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Return ``(value, next_pos)``; raises :class:`InvalidFrame` when truncated or > 64 bits.

    Unrolled, which cannot overflow: the loop cost several times these straight lines. From the
    fourth byte on, see ``_TAILS``; varints of 9 bytes and more (values from about 2**53, or
    malformed ones) take the general loop.
    """
    try:
        value = buf[pos]
        if value < 240:
            return value, pos + 1
        b = buf[pos + 1]
        value += b << 4
        if b < 128:
            return value, pos + 2
        b = buf[pos + 2]
        value += b << 11
        if b < 128:
            return value, pos + 3
    except IndexError:
        raise InvalidFrame("truncated varint") from None
    tail = _TAILS.get(buf[pos + 3:pos + 8])
    if tail is not None:
        return value + tail[0], pos + tail[1]
    return _decode_tail(buf, pos, value)


def _decode_tail(buf: bytes, pos: int, head: int) -> tuple[int, int]:
    """``decode_varint`` from the fourth byte on, ``head`` being the value of the first three."""
    tail = 0
    try:
        for i in range(3, 8):
            b = buf[pos + i]
            tail += b << (7 * i - 3)
            if b < 128:
                break
        else:  # 9 bytes or more: the key's five do not decide it
            return _decode_long_varint(buf, pos)
    except IndexError:
        raise InvalidFrame("truncated varint") from None
    if len(_TAILS) >= _TAILS_LIMIT:
        _TAILS.clear()
    _TAILS[buf[pos + 3:pos + 8]] = (tail, i + 1)
    return head + tail, pos + i + 1


def _decode_long_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = buf[pos]
    pos += 1
    shift = 4
    while True:
        try:
            b = buf[pos]
        except IndexError:
            raise InvalidFrame("truncated varint") from None
        pos += 1
        value += b << shift
        shift += 7
        if b < 128:
            break
        if shift > 67:
            raise InvalidFrame("varint longer than 10 bytes")
    if value > MAX_UINT64:
        raise InvalidFrame("varint overflows 64 bits")
    return value, pos
