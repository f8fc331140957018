"""HAProxy's variable-length integer ("peers" encoding), which is *not* LEB128.

The first byte carries 4 value bits when it is >= 240, every later byte 7 bits with the top
bit meaning "more follows"; the decoder adds whole bytes, which cancels the offsets the
encoder subtracts, so every value has exactly one encoding.
"""

from __future__ import annotations

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


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Return ``(value, next_pos)``; raises :class:`InvalidFrame` when truncated or > 64 bits.

    Unrolled up to 9 bytes, which cannot overflow: every traced message carries an 8-byte
    ``ts=date(0,us)``, and the loop cost several times these straight lines. Longer varints
    (values of 2**57 and more, or malformed ones) take the general loop.
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
        b = buf[pos + 3]
        value += b << 18
        if b < 128:
            return value, pos + 4
        b = buf[pos + 4]
        value += b << 25
        if b < 128:
            return value, pos + 5
        b = buf[pos + 5]
        value += b << 32
        if b < 128:
            return value, pos + 6
        b = buf[pos + 6]
        value += b << 39
        if b < 128:
            return value, pos + 7
        b = buf[pos + 7]
        value += b << 46
        if b < 128:
            return value, pos + 8
        b = buf[pos + 8]
        value += b << 53
        if b < 128:
            return value, pos + 9
    except IndexError:
        raise InvalidFrame("truncated varint") from None
    return _decode_long_varint(buf, pos)


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
