"""Known-answer tests from the protocol notes, run against both the codec and the grammar.

The vectors are the captured (or hand-counted) byte strings of the notes' sections 3, 4, 7,
10 and 12; where the notes only describe a layout, the bytes are assembled here from that
description with :func:`wire`, never with either encoder under test.
"""

from __future__ import annotations

import ipaddress

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.errors import InvalidFrame
from spoe_agent.protocol.types import (
    FLAG_ABORT,
    FLAG_FIN,
    DataType,
    FrameType,
    Message,
    Scope,
    SetVar,
    Typed,
    UnsetVar,
)

from .strategies import CODEC, GRAMMAR, IMPLS, MAX_UINT64, Impl, canon, expected

IP = ipaddress.ip_address


def wire(*parts: str | bytes) -> bytes:
    """Assemble bytes the way the notes print them: hex runs and quoted ASCII strings."""
    return b"".join(bytes.fromhex(p) if isinstance(p, str) else p for p in parts)


@pytest.fixture(params=IMPLS, ids=lambda impl: impl.name)
def impl(request: pytest.FixtureRequest) -> Impl:
    return request.param


def same(a: object, b: object) -> bool:
    return canon(a) == canon(b)


# --------------------------------------------------------------------- §3 varint table

VARINT_TABLE = [
    (0, "00"),
    (239, "EF"),
    (240, "F0 00"),
    (255, "FF 00"),
    (256, "F0 01"),
    (2287, "FF 7F"),
    (2288, "F0 80 00"),
    (8080, "F0 EA 02"),
    (16380, "FC F0 06"),
    (54321, "F1 B4 19"),
    (264432, "F0 80 80 00"),
    (4294967295, "FF F0 FE FE 7E"),
    (2**64 - 1, "FF F0 FE FE FE FE FE FE FE 0E"),
]


@pytest.mark.parametrize(("value", "hexstr"), VARINT_TABLE)
def test_varint_table_encodes(impl: Impl, value: int, hexstr: str) -> None:
    assert impl.build_varint(value) == bytes.fromhex(hexstr)


@pytest.mark.parametrize(("value", "hexstr"), VARINT_TABLE)
def test_varint_table_decodes(impl: Impl, value: int, hexstr: str) -> None:
    assert impl.parse_varint(bytes.fromhex(hexstr)) == value


# bytes -> (smallest, largest) value of that encoded length, from the notes' range table
VARINT_RANGES = {
    1: (0, 239),
    2: (240, 2287),
    3: (2288, 264431),
    4: (264432, 33818863),
    5: (33818864, 4328786159),
    6: (4328786160, 554084600047),
    7: (554084600048, 70922828777711),
    8: (70922828777712, 9078122083518703),
    9: (9078122083518704, 1161999626690365679),
    10: (1161999626690365680, 2**64 - 1),
}


@pytest.mark.parametrize("size", sorted(VARINT_RANGES))
def test_varint_length_ranges(impl: Impl, size: int) -> None:
    low, high = VARINT_RANGES[size]
    for value in (low, high):
        encoded = impl.build_varint(value)
        assert len(encoded) == size
        assert impl.parse_varint(encoded) == value
    if size > 1:
        assert len(impl.build_varint(low - 1)) == size - 1


TRUNCATED_VARINTS = sorted(
    {bytes.fromhex(h)[:cut] for _, h in VARINT_TABLE for cut in range(len(bytes.fromhex(h)))}
)


@pytest.mark.parametrize("data", TRUNCATED_VARINTS, ids=lambda b: b.hex() or "empty")
def test_truncated_varint_is_invalid(impl: Impl, data: bytes) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_varint(data)


@pytest.mark.parametrize(
    "hexstr",
    [
        "FF F0 FE FE FE FE FE FE FE 0F",  # 2**64 - 1 plus 2**60: overflows
        "FF F0 FE FE FE FE FE FE FE 7F",  # largest 10-byte tail: overflows
        "FF FE FE FE FE FE FE FE FE FE 00",  # 11 bytes
        "FF FE FE FE FE FE FE FE FE FE",  # 10 bytes, still "more follows"
    ],
)
def test_oversized_varint_is_invalid(impl: Impl, hexstr: str) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_varint(bytes.fromhex(hexstr))


def test_varint_trailing_byte_is_invalid(impl: Impl) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_varint(b"\x05\x00")


def test_negative_varint_is_twos_complement(impl: Impl) -> None:
    assert impl.build_varint(-1) == impl.build_varint(MAX_UINT64)
    assert impl.build_varint(-5) == bytes.fromhex("FB F0 FE FE FE FE FE FE FE 0E")


# ------------------------------------------------------------------------ §4 typed data

TYPED_VECTORS = [
    (None, "00"),
    (False, "01"),
    (True, "11"),
    (200, "04 C8"),  # status 200
    (8080, "04 F0 EA 02"),  # dst_port
    (-5, "04 FB F0 FE FE FE FE FE FE FE 0E"),
    (IP("127.0.0.1"), "06 7F 00 00 01"),
    ("GET", "08 03 47 45 54"),
    ("", "08 00"),
    (b"", "09 00"),
    (b"\x00\xff", "09 02 00 FF"),
    (Typed(DataType.UINT32, 16380), "03 FC F0 06"),
    (Typed(DataType.INT32, 80), "02 50"),
    (Typed(DataType.UINT64, 2**64 - 1), "05 FF F0 FE FE FE FE FE FE FE 0E"),
    (IP("2001:db8::1"), "07 20 01 0D B8" + " 00" * 11 + " 01"),
]


@pytest.mark.parametrize(("value", "hexstr"), TYPED_VECTORS, ids=repr)
def test_typed_vectors(impl: Impl, value: object, hexstr: str) -> None:
    raw = bytes.fromhex(hexstr)
    assert impl.build_typed(value) == raw
    assert same(impl.parse_typed(raw), expected(value))


@pytest.mark.parametrize(
    ("hexstr", "value"),
    [
        ("02 FB F0 FE FE FE FE FE FE FE 0E", -5),  # INT32 with the 64-bit pattern of -5
        ("02 FB F0 FE FE 7E", 4294967291),  # INT32 with the 32-bit pattern: no sign extension
        ("03 FB F0 FE FE FE FE FE FE FE 0E", 2**64 - 5),  # UINT32 is read unsigned
        ("05 FB F0 FE FE FE FE FE FE FE 0E", 2**64 - 5),
        ("04 FF F0 FE FE FE FE FE FE FE 0E", -1),
    ],
)
def test_integer_signedness(impl: Impl, hexstr: str, value: int) -> None:
    assert impl.build_varint(value & MAX_UINT64) == bytes.fromhex(hexstr)[1:]
    assert impl.parse_typed(bytes.fromhex(hexstr)) == value


@pytest.mark.parametrize(
    ("hexstr", "value"),
    [
        ("21", False),
        ("E1", False),
        ("31", True),
        ("F1", True),
        ("80", None),
        ("F4 C8", 200),
        ("98 03 47 45 54", "GET"),
        ("59 01 00", b"\x00"),
    ],
)
def test_unused_flag_bits_are_ignored(impl: Impl, hexstr: str, value: object) -> None:
    assert same(impl.parse_typed(bytes.fromhex(hexstr)), value)


@pytest.mark.parametrize("tag", [*range(10, 16), *range(0x1A, 0x100, 0x10)])
def test_reserved_type_is_invalid(impl: Impl, tag: int) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_typed(bytes((tag, 0, 0, 0)))
    with pytest.raises(InvalidFrame):
        impl.parse_kv_list(b"\x01k" + bytes((tag,)))


@pytest.mark.parametrize(
    "hexstr",
    ["", "02", "04 F0", "06 7F 00 00", "07" + " 00" * 15, "08 05 61 62", "09 01", "08 F0"],
)
def test_truncated_typed_data_is_invalid(impl: Impl, hexstr: str) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_typed(bytes.fromhex(hexstr))


def test_non_utf8_string_round_trips_via_surrogateescape(impl: Impl) -> None:
    raw = bytes.fromhex("08 04 61 FF FE 62")
    value = impl.parse_typed(raw)
    assert value == "a\udcff\udcfeb"
    assert impl.build_typed(value) == raw


ROUND_TRIP_VALUES = [
    None,
    True,
    False,
    0,
    1,
    239,
    240,
    2287,
    2288,
    2**63 - 1,
    -(2**63),
    -1,
    "",
    "pipelining,async",
    "h\u00e9llo \u2603 \U0001f600",
    "\udcff\udc80",  # non-UTF-8 bytes, as surrogateescape decodes them
    b"",
    bytes(range(256)),
    IP("0.0.0.0"),
    IP("255.255.255.255"),
    IP("::"),
    IP("::ffff:192.0.2.1"),
    IP("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    Typed(DataType.NULL, None),
    Typed(DataType.BOOL, True),
    Typed(DataType.BOOL, False),
    Typed(DataType.INT32, -5),
    Typed(DataType.INT32, 2**31 - 1),
    Typed(DataType.UINT32, 0),
    Typed(DataType.UINT32, 2**32 - 1),
    Typed(DataType.INT64, -(2**63)),
    Typed(DataType.INT64, 2**63 - 1),
    Typed(DataType.UINT64, 0),
    Typed(DataType.UINT64, 239),
    Typed(DataType.UINT64, 240),
    Typed(DataType.UINT64, 2**63),
    Typed(DataType.UINT64, 2**64 - 1),
    Typed(DataType.IPV4, "10.0.0.1"),
    Typed(DataType.IPV6, "fe80::1"),
    Typed(DataType.STRING, ""),
    Typed(DataType.STRING, b"\xff\xfe"),
    Typed(DataType.BINARY, b""),
    Typed(DataType.BINARY, b"\x00" * 300),
]


def _wire_type(value: object) -> int:
    if isinstance(value, Typed):
        return int(value.type)
    return {
        type(None): 0,
        bool: 1,
        int: 4,
        ipaddress.IPv4Address: 6,
        ipaddress.IPv6Address: 7,
        str: 8,
        bytes: 9,
    }[type(value)]


@pytest.mark.parametrize("value", ROUND_TRIP_VALUES, ids=repr)
def test_typed_round_trip(impl: Impl, value: object) -> None:
    encoded = impl.build_typed(value)
    assert encoded[0] & 0x0F == _wire_type(value)
    assert same(impl.parse_typed(encoded), expected(value))
    assert encoded == (GRAMMAR if impl is CODEC else CODEC).build_typed(value)


def test_plain_int_goes_out_as_int64(impl: Impl) -> None:
    # 2**64-1 is not an int64: the wire grammar would send it as INT64 and it would come back
    # as -1. The codec, which encodes the agent's actions, refuses it instead: HAProxy got -1
    # for a handler's 2**64-1 and -9223372036854775808 for its 2**63 (black-box run).
    wrapped = bytes.fromhex("04 FF F0 FE FE FE FE FE FE FE 0E")
    if impl is CODEC:
        for value in (2**64 - 1, 2**63, -(2**63) - 1):
            with pytest.raises(OverflowError, match="does not fit in a signed 64-bit integer"):
                impl.build_typed(value)
        assert impl.build_typed(-1) == wrapped
    else:
        assert impl.build_typed(2**64 - 1) == wrapped
    assert impl.parse_typed(wrapped) == -1


def test_typed_values_the_codec_refuses_rather_than_send_altered() -> None:
    """Black-box run: Typed(STRING, 5) arrived as five NUL bytes (bytes(5)), Typed(BOOL,
    "false") as true, and a UINT64 of -1 as 18446744073709551615."""
    for value, error in [
        (Typed(DataType.STRING, 5), "STRING takes str or bytes, not int"),
        (Typed(DataType.BINARY, 3), "BINARY takes bytes, not int"),
        (Typed(DataType.BOOL, "false"), "BOOL takes True or False, not str"),
        (Typed(DataType.UINT64, -1), "-1 does not fit in UINT64"),
        (Typed(DataType.INT64, 1 << 63), "does not fit in INT64"),
        (Typed(DataType.INT32, "7"), "INT32 takes an int, not str"),
    ]:
        with pytest.raises((TypeError, OverflowError), match=error):
            CODEC.build_typed(value)
    assert CODEC.build_typed(Typed(DataType.STRING, b"ok")) == b"\x08\x02ok"
    assert CODEC.build_typed(Typed(DataType.UINT32, 1 << 40)) == GRAMMAR.build_typed(
        Typed(DataType.UINT32, 1 << 40))


# ------------------------------------------------------------------ §12 captured frames

HAPROXY_HELLO = bytes.fromhex(
    "00 00 00 81 01 00 00 00 01 00 00 12 73 75 70 70 6f 72 74 65 64 2d 76 65 72 73 69 6f 6e 73"
    " 08 03 32 2e 30 0e 6d 61 78 2d 66 72 61 6d 65 2d 73 69 7a 65 03 fc f0 06 0c 63 61 70 61 62"
    " 69 6c 69 74 69 65 73 08 10 70 69 70 65 6c 69 6e 69 6e 67 2c 61 73 79 6e 63 09 65 6e 67 69"
    " 6e 65 2d 69 64 08 24 37 61 65 61 38 66 38 38 2d 39 35 39 62 2d 34 31 38 34 2d 61 62 31 62"
    " 2d 38 37 33 37 66 33 38 62 61 32 61 30"
)
ENGINE_ID = "7aea8f88-959b-4184-ab1b-8737f38ba2a0"


def test_haproxy_hello_capture(impl: Impl) -> None:
    assert len(HAPROXY_HELLO) == 133
    assert int.from_bytes(HAPROXY_HELLO[:4], "big") == 129 == len(HAPROXY_HELLO) - 4
    frame = impl.parse_frame(HAPROXY_HELLO[4:])
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (1, FLAG_FIN, 0, 0)
    assert frame.fin and not frame.abort
    items = impl.parse_kv_list(frame.payload)
    assert list(items) == ["supported-versions", "max-frame-size", "capabilities", "engine-id"]
    assert items == {
        "supported-versions": "2.0",
        "max-frame-size": 16380,
        "capabilities": "pipelining,async",
        "engine-id": ENGINE_ID,
    }
    payload = impl.build_kv_list(
        [
            ("supported-versions", "2.0"),
            ("max-frame-size", Typed(DataType.UINT32, 16380)),
            ("capabilities", "pipelining,async"),
            ("engine-id", ENGINE_ID),
        ]
    )
    assert impl.build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload) == HAPROXY_HELLO


def test_haproxy_32_hello_length(impl: Impl) -> None:
    payload = impl.build_kv_list(
        [
            ("supported-versions", "2.0"),
            ("max-frame-size", Typed(DataType.UINT32, 16380)),
            ("capabilities", "pipelining"),
            ("engine-id", ENGINE_ID),
        ]
    )
    raw = impl.build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload)
    assert raw[:4] == bytes.fromhex("00 00 00 7B")
    assert wire("08 0A", b"pipelining") in raw


HEALTHCHECK_HELLO = wire(
    "00 00 00 4e 01 00 00 00 01 00 00 12",
    b"supported-versions",
    "08 03",
    b"2.0",
    "0e",
    b"max-frame-size",
    "03 fc f0 06 0c",
    b"capabilities",
    "08 00 0b",
    b"healthcheck",
    "11",
)


def test_healthcheck_hello(impl: Impl) -> None:
    assert len(HEALTHCHECK_HELLO) == 82
    assert int.from_bytes(HEALTHCHECK_HELLO[:4], "big") == 0x4E == len(HEALTHCHECK_HELLO) - 4
    frame = impl.parse_frame(HEALTHCHECK_HELLO[4:])
    assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.HAPROXY_HELLO, 0, 0)
    items = impl.parse_kv_list(frame.payload)
    assert same(
        items,
        {
            "supported-versions": "2.0",
            "max-frame-size": 16380,
            "capabilities": "",
            "healthcheck": True,
        },
    )
    assert "engine-id" not in items
    payload = impl.build_kv_list(
        [
            ("supported-versions", "2.0"),
            ("max-frame-size", Typed(DataType.UINT32, 16380)),
            ("capabilities", ""),
            ("healthcheck", True),
        ]
    )
    assert impl.build_frame(1, 0, 0, payload) == HEALTHCHECK_HELLO


AGENT_HELLO = bytes.fromhex(
    "00 00 00 46 65 00 00 00 01 00 00 07 76 65 72 73 69 6f 6e 08 03 32 2e 30 0e 6d 61 78 2d 66"
    " 72 61 6d 65 2d 73 69 7a 65 03 fc f0 06 0c 63 61 70 61 62 69 6c 69 74 69 65 73 08 10 70 69"
    " 70 65 6c 69 6e 69 6e 67 2c 61 73 79 6e 63"
)


def test_agent_hello(impl: Impl) -> None:
    payload = impl.build_kv_list(
        [
            ("version", "2.0"),
            ("max-frame-size", Typed(DataType.UINT32, 16380)),
            ("capabilities", "pipelining,async"),
        ]
    )
    raw = impl.build_frame(FrameType.AGENT_HELLO, 0, 0, payload)
    assert raw == AGENT_HELLO
    assert len(raw) == 74
    frame = impl.parse_frame(raw[4:])
    assert frame.type == 0x65
    assert impl.parse_kv_list(frame.payload) == {
        "version": "2.0",
        "max-frame-size": 16380,
        "capabilities": "pipelining,async",
    }


def test_agent_hello_from_dict(impl: Impl) -> None:
    items = {
        "version": "2.0",
        "max-frame-size": Typed(DataType.UINT32, 16380),
        "capabilities": "pipelining,async",
    }
    assert impl.build_frame(FrameType.AGENT_HELLO, 0, 0, impl.build_kv_list(items)) == AGENT_HELLO


NOTIFY_D = bytes.fromhex(
    "00 00 00 2F 03 00 00 00 01 05 01"
    " 08 63 68 65 63 6B 2D 69 70 03"
    " 02 69 70 06 C0 A8 01 0A"
    " 04 70 6F 72 74 04 F1 B4 19"
    " 04 70 61 74 68 08 06 2F 6C 6F 67 69 6E"
)


def test_notify_hand_built(impl: Impl) -> None:
    assert len(NOTIFY_D) == 51
    frame = impl.parse_frame(NOTIFY_D[4:])
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (3, 1, 5, 1)
    messages = impl.parse_messages(frame.payload)
    want = [Message("check-ip", [("ip", IP("192.168.1.10")), ("port", 54321), ("path", "/login")])]
    assert same(messages, want)
    assert messages[0].get("port") == 54321
    assert impl.build_frame(FrameType.NOTIFY, 5, 1, impl.build_messages(want)) == NOTIFY_D


NOTIFY_REAL = wire(
    "00 00 00 52 03 00 00 00 01 00 01 12",
    b"msg-client-session",
    "05 03",
    b"src",
    "06 7f 00 00 01 08",
    b"src_port",
    "04 fc d7 1a 03",
    b"dst",
    "06 7f 00 00 01 08",
    b"dst_port",
    "04 f0 ea 02 02",
    b"fe",
    "08 06",
    b"fe_web",
)


def test_notify_captured_on_2_6(impl: Impl) -> None:
    assert len(NOTIFY_REAL) == 86
    assert int.from_bytes(NOTIFY_REAL[:4], "big") == 0x52 == len(NOTIFY_REAL) - 4
    frame = impl.parse_frame(NOTIFY_REAL[4:])
    assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.NOTIFY, 0, 1)
    want = [
        Message(
            "msg-client-session",
            [
                ("src", IP("127.0.0.1")),
                ("src_port", 56940),
                ("dst", IP("127.0.0.1")),
                ("dst_port", 8080),
                ("fe", "fe_web"),
            ],
        )
    ]
    messages = impl.parse_messages(frame.payload)
    assert same(messages, want)
    assert impl.build_frame(3, 0, 1, impl.build_messages(want)) == NOTIFY_REAL


ACK_E = bytes.fromhex(
    "00 00 00 1C 67 00 00 00 01 05 01"
    " 01 03 02 08 69 70 5F 73 63 6F 72 65 02 50"
    " 02 02 01 03 74 6D 70"
)


def test_ack_hand_built(impl: Impl) -> None:
    assert len(ACK_E) == 32
    frame = impl.parse_frame(ACK_E[4:])
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (103, 1, 5, 1)
    actions = impl.parse_actions(frame.payload)
    assert same(actions, [SetVar(Scope.TXN, "ip_score", 80), UnsetVar(Scope.SESS, "tmp")])
    payload = impl.build_actions(
        [SetVar(Scope.TXN, "ip_score", Typed(DataType.INT32, 80)), UnsetVar(Scope.SESS, "tmp")]
    )
    assert impl.build_frame(FrameType.ACK, 5, 1, payload) == ACK_E
    # a plain int would have gone out as INT64, one byte different
    plain = impl.build_actions([SetVar(Scope.TXN, "ip_score", 80)])
    assert plain[-2:] == b"\x04\x50"


MINIMAL_ACK = bytes.fromhex("00 00 00 07 67 00 00 00 01 05 01")


def test_minimal_ack(impl: Impl) -> None:
    assert impl.build_frame(FrameType.ACK, 5, 1, b"") == MINIMAL_ACK
    frame = impl.parse_frame(MINIMAL_ACK[4:])
    assert frame == (103, 1, 5, 1, b"")
    assert impl.parse_actions(frame.payload) == []
    assert codec.ack(5, 1) == MINIMAL_ACK


HAPROXY_DISCONNECTS = [
    ("00 00 00 31 02 00 00 00 01 00 00 0b", "03 02", 2, "a timeout occurred"),
    ("00 00 00 32 02 00 00 00 01 00 00 0b", "03 08", 8, "unsupported version"),
    ("00 00 00 25 02 00 00 00 01 00 00 0b", "03 00", 0, "normal"),
]


@pytest.mark.parametrize(("head", "status_hex", "status", "message"), HAPROXY_DISCONNECTS)
def test_haproxy_disconnect(
    impl: Impl, head: str, status_hex: str, status: int, message: str
) -> None:
    text = message.encode()
    raw = wire(head, b"status-code", status_hex, "07", b"message", "08", bytes((len(text),)), text)
    assert int.from_bytes(raw[:4], "big") == len(raw) - 4
    frame = impl.parse_frame(raw[4:])
    assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.HAPROXY_DISCONNECT, 0, 0)
    assert impl.parse_kv_list(frame.payload) == {"status-code": status, "message": message}
    payload = impl.build_kv_list(
        [("status-code", Typed(DataType.UINT32, status)), ("message", message)]
    )
    assert impl.build_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, payload) == raw


AGENT_DISCONNECT_BYE = bytes.fromhex(
    "00 00 00 22 66 00 00 00 01 00 00 0b 73 74 61 74 75 73 2d 63 6f 64 65 03 00 07 6d 65 73"
    " 73 61 67 65 08 03 62 79 65"
)


def test_agent_disconnect_bye(impl: Impl) -> None:
    payload = impl.build_kv_list([("status-code", Typed(DataType.UINT32, 0)), ("message", "bye")])
    assert impl.build_frame(FrameType.AGENT_DISCONNECT, 0, 0, payload) == AGENT_DISCONNECT_BYE
    frame = impl.parse_frame(AGENT_DISCONNECT_BYE[4:])
    assert impl.parse_kv_list(frame.payload) == {"status-code": 0, "message": "bye"}
    assert codec.disconnect(FrameType.AGENT_DISCONNECT, 0, "bye") == AGENT_DISCONNECT_BYE


# ------------------------------------------------------------------- §10 fragmentation

FRAGMENT_HEADERS = [
    ("00 00 00 E7 03 00 00 00 00 00 03", 3, False),
    ("00 00 00 E7 00 00 00 00 00 00 03", 0, False),
    ("00 00 00 E7 00 00 00 00 00 00 03", 0, False),
    ("00 00 00 5B 00 00 00 00 01 00 03", 0, True),
]


@pytest.mark.parametrize(("head", "ftype", "fin"), FRAGMENT_HEADERS)
def test_fragment_headers(impl: Impl, head: str, ftype: int, fin: bool) -> None:
    header = bytes.fromhex(head)
    length = int.from_bytes(header[:4], "big")
    filler = bytes(i % 251 for i in range(length - 7))  # arbitrary continuation bytes
    raw = header + filler
    frame = impl.parse_frame(raw[4:])
    assert (frame.type, frame.stream_id, frame.frame_id) == (ftype, 0, 3)
    assert frame.fin is fin
    assert not frame.abort
    assert frame.payload == filler
    flags = FLAG_FIN if fin else 0
    assert impl.build_frame(ftype, 0, 3, filler, flags) == raw


def test_fragment_abort(impl: Impl) -> None:
    raw = bytes.fromhex("00 00 00 07 00 00 00 00 03 00 03")
    frame = impl.parse_frame(raw[4:])
    assert frame == (0, FLAG_FIN | FLAG_ABORT, 0, 3, b"")
    assert frame.fin and frame.abort
    assert impl.build_frame(FrameType.UNSET, 0, 3, b"", FLAG_FIN | FLAG_ABORT) == raw


def test_fragmented_payload_decodes_once_reassembled(impl: Impl) -> None:
    messages = [Message("msg-fe-http-req", [("query", "y=" + "x" * 600), ("ver", "1.1")])]
    payload = impl.build_messages(messages)
    pieces = [payload[i : i + 220] for i in range(0, len(payload), 220)]
    assert len(pieces) > 2
    with pytest.raises(InvalidFrame):
        impl.parse_messages(pieces[0])
    assert same(impl.parse_messages(b"".join(pieces)), messages)


# ------------------------------------------------------------------------ frame header


@pytest.mark.parametrize("size", range(7))
def test_frame_shorter_than_7_bytes_is_invalid(impl: Impl, size: int) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_frame(MINIMAL_ACK[4 : 4 + size])


@pytest.mark.parametrize(
    "hexstr",
    [
        "03 00 00 00 01 F0 00",  # two-byte stream-id, no frame-id
        "03 00 00 00 01 00 F0",  # frame-id cut short
        "03 00 00 00 01 FF FE FE FE FE FE FE FE FE FE 00 01",  # 11-byte stream-id
    ],
)
def test_bad_frame_ids_are_invalid(impl: Impl, hexstr: str) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_frame(bytes.fromhex(hexstr))


def test_frame_with_extreme_ids_and_flags(impl: Impl) -> None:
    raw = impl.build_frame(255, 2**64 - 1, 2**63, b"\x00payload", 0xFFFFFFFF)
    assert int.from_bytes(raw[:4], "big") == len(raw) - 4 == 5 + 10 + 10 + 8
    assert impl.parse_frame(raw[4:]) == (255, 0xFFFFFFFF, 2**64 - 1, 2**63, b"\x00payload")


# --------------------------------------------------------------------- payload grammars


def test_empty_payloads(impl: Impl) -> None:
    assert impl.parse_kv_list(b"") == {}
    assert impl.parse_messages(b"") == []
    assert impl.parse_actions(b"") == []
    assert impl.build_kv_list([]) == impl.build_messages([]) == impl.build_actions([]) == b""


def test_repeated_kv_key_keeps_first_value(impl: Impl) -> None:
    payload = wire("01", b"k", "04 01", "01", b"j", "00", "01", b"k", "04 02")
    assert same(impl.parse_kv_list(payload), {"k": 1, "j": None})
    assert list(impl.parse_kv_list(payload)) == ["k", "j"]


@pytest.mark.parametrize(
    "tail",
    [
        "05 61 62",  # name longer than the rest
        "01 6B",  # name without a value
        "01 6B 04",  # value without its varint
        "00 08 02 61",  # string cut short
    ],
)
def test_kv_list_trailing_garbage_is_invalid(impl: Impl, tail: str) -> None:
    good = impl.build_kv_list([("version", "2.0")])
    with pytest.raises(InvalidFrame):
        impl.parse_kv_list(good + bytes.fromhex(tail))


def test_messages_keep_order_unnamed_and_repeated_args(impl: Impl) -> None:
    messages = [
        Message(
            "msg-auth",
            [("uid", "abc"), ("auth", "Bearer abc"), ("", IP("127.0.0.1")), ("uid", None)],
        ),
        Message("msg-be-tcp-req", []),
        Message("", [("", "")]),
        Message("msg-auth", [("x", 1)]),
    ]
    payload = impl.build_messages(messages)
    # "" = 127.0.0.1 goes out as a lone 00 name byte followed by its IPV4 value
    assert wire("00 06 7f 00 00 01") in payload
    decoded = impl.parse_messages(payload)
    assert same(decoded, messages)
    assert decoded[0].get("uid") == "abc"
    assert decoded[0].get("") == IP("127.0.0.1")


@pytest.mark.parametrize(
    "hexstr",
    [
        "03 61 62 63",  # name, then no NB-ARGS
        "03 61 62 63 01",  # one argument announced, none present
        "03 61 62 63 02 01 61 00",  # two announced, one present
        "03 61 62 63 01 01 61",  # argument name without value
        "03 61 62",  # name cut short
    ],
)
def test_truncated_messages_are_invalid(impl: Impl, hexstr: str) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_messages(bytes.fromhex(hexstr))


def test_message_with_255_args_and_no_more(impl: Impl) -> None:
    args = [(f"a{i}", i) for i in range(255)]
    payload = impl.build_messages([Message("m", args)])
    assert payload[2] == 255
    assert impl.parse_messages(payload) == [Message("m", args)]
    with pytest.raises(ValueError):
        impl.build_messages([Message("m", [*args, ("one-too-many", 0)])])


@pytest.mark.parametrize("scope", list(Scope))
def test_actions_in_every_scope(impl: Impl, scope: Scope) -> None:
    actions = [SetVar(scope, "score", 42), UnsetVar(scope, "tmp"), SetVar(scope, "gone", None)]
    payload = impl.build_actions(actions)
    assert payload[:3] == bytes((1, 3, scope))
    decoded = impl.parse_actions(payload)
    assert same(decoded, actions)
    assert all(type(a.scope) is Scope for a in decoded)


@pytest.mark.parametrize(
    "hexstr",
    [
        "01 03 05 01 61 00",  # scope 5
        "01 03 FF 01 61 00",  # scope 255
        "02 02 05 01 61",
        "01 02 02 01 61 00",  # set-var with 2 args
        "02 03 02 01 61 00",  # unset-var with 3 args
        "03 03 02 01 61 00",  # unknown action type
        "00 00 00",
        "01",  # truncated header
        "01 03",
        "01 03 02",  # no name
        "01 03 02 01 61",  # no value
        "02 02 02 05 61",  # name cut short
        "01 03 02 01 61 0C",  # reserved value type
    ],
)
def test_bad_actions_are_invalid(impl: Impl, hexstr: str) -> None:
    with pytest.raises(InvalidFrame):
        impl.parse_actions(bytes.fromhex(hexstr))
    # ...and a good action in front does not make them acceptable
    with pytest.raises(InvalidFrame):
        impl.parse_actions(bytes.fromhex("02 02 02 01 61") + bytes.fromhex(hexstr))
