"""The sans-IO state machine, byte for byte, against the frames captured from HAProxy."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoe_agent.protocol import codec
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
from spoe_agent.protocol.errors import ProtocolError
from spoe_agent.protocol.types import (
    FLAG_ABORT,
    FLAG_FIN,
    DataType,
    FrameType,
    Message,
    Scope,
    SetVar,
    Status,
    Typed,
)
from tests.support.examples import examples

# Captured from HAProxy 2.6.12 (spop-notes §12a and §12b).
HAPROXY_HELLO = bytes.fromhex(
    "00000081010000000100001273757070 6f727465642d76657273696f6e730803"
    "322e300e6d61782d6672616d652d7369 7a6503fcf0060c6361706162696c6974"
    "6965730810706970656c696e696e672c 6173796e630965 6e67696e652d696408"
    "2437616561386638382d393539622d34 3138342d616231622d38373337663338"
    "62613261 30".replace(" ", "")
)
HEALTHCHECK_HELLO = (
    bytes.fromhex("0000004e010000000100001273757070 6f727465642d76657273696f6e73".replace(" ", ""))
    + b"\x08\x032.0\x0emax-frame-size\x03\xfc\xf0\x06\x0ccapabilities\x08\x00"
    + b"\x0bhealthcheck\x11"
)
SOFT_STOP = bytes.fromhex("0000002502000000010000") + b"\x0bstatus-code\x03\x00\x07message\x08\x06normal"


def hello(**items: object) -> bytes:
    base: dict[str, object] = {
        "supported-versions": "2.0",
        "max-frame-size": Typed(DataType.UINT32, 16380),
        "capabilities": "pipelining,async",
    }
    base.update(items)
    return codec.encode_frame(
        FrameType.HAPROXY_HELLO, 0, 0, codec.encode_kv_list({k: v for k, v in base.items() if v is not None})
    )


def agent_hello(frame_size: int, caps: str = "pipelining,async,fragmentation") -> bytes:
    return codec.encode_frame(
        FrameType.AGENT_HELLO, 0, 0,
        codec.encode_kv_list([
            ("version", "2.0"),
            ("max-frame-size", Typed(DataType.UINT32, frame_size)),
            ("capabilities", caps),
        ]),
    )


def ready(**kwargs: object) -> SpopConnection:
    conn = SpopConnection(**kwargs)  # type: ignore[arg-type]
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    assert conn.state is State.READY
    return conn


def disconnect_status(data: bytes) -> tuple[int, str]:
    frame = codec.decode_frame(data[4:])
    assert frame.type == FrameType.AGENT_DISCONNECT
    assert frame.flags == FLAG_FIN and frame.stream_id == 0 and frame.frame_id == 0
    items = codec.decode_kv_list(frame.payload)
    return items["status-code"], items["message"]


def test_captured_hello_gets_agent_hello_with_negotiated_size() -> None:
    conn = SpopConnection(max_frame_size=65532)
    events = conn.receive_data(HAPROXY_HELLO)
    assert events == [HelloReceived(16380, frozenset({"pipelining", "async"}),
                                    "7aea8f88-959b-4184-ab1b-8737f38ba2a0", False, 16380)]
    assert conn.data_to_send() == agent_hello(16380)
    assert conn.state is State.READY


def test_agent_hello_bytes_match_the_capture_accepted_by_haproxy() -> None:
    conn = SpopConnection(capabilities=("pipelining", "async"))
    conn.receive_data(HAPROXY_HELLO)
    # spop-notes §12(c): accepted by 2.6.12 and 3.2.0.
    assert conn.data_to_send().hex() == (
        "00000046650000000100000776657273696f6e0803322e300e6d61782d6672616d652d73697a6503fcf006"
        "0c6361706162696c69746965730810706970656c696e696e672c6173796e63"
    )


def test_smaller_agent_limit_wins_but_never_below_256() -> None:
    conn = SpopConnection(max_frame_size=1024)
    conn.receive_data(HAPROXY_HELLO)
    assert conn.data_to_send() == agent_hello(1024)
    with pytest.raises(ValueError):
        SpopConnection(max_frame_size=255)


def test_healthcheck_hello_is_answered_then_closed() -> None:
    assert len(HEALTHCHECK_HELLO) == 82
    conn = SpopConnection()
    events = conn.receive_data(HEALTHCHECK_HELLO)
    assert isinstance(events[0], HelloReceived) and events[0].healthcheck
    assert events[0].capabilities == frozenset() and events[0].engine_id is None
    assert isinstance(events[1], ConnectionClosed)
    assert conn.data_to_send() == agent_hello(16380)
    assert conn.state is State.CLOSED


def test_bytes_fed_one_at_a_time_give_the_same_events() -> None:
    stream = HAPROXY_HELLO + codec.notify(0, 1, [Message("m", [("a", 1), ("", "x")])]) + SOFT_STOP
    whole = SpopConnection().receive_data(stream)
    conn = SpopConnection()
    piecewise = []
    for i in range(len(stream)):
        piecewise.extend(conn.receive_data(stream[i:i + 1]))
    assert piecewise == whole
    assert [type(e) for e in whole] == [HelloReceived, NotifyReceived, DisconnectReceived,
                                       ConnectionClosed]


def test_notify_with_stream_id_zero_and_minimal_ack_bytes() -> None:
    conn = ready()
    events = conn.receive_data(codec.notify(0, 1, [Message("m", [])]))
    assert events == [NotifyReceived(0, 1, [Message("m", [])])]
    conn.send_ack(5, 1)
    assert conn.data_to_send() == bytes.fromhex("00000007670000000105 01".replace(" ", ""))


def test_ack_with_actions_matches_the_notes_vector() -> None:
    conn = ready()
    conn.send_ack(5, 1, [SetVar(Scope.TXN, "ip_score", Typed(DataType.INT32, 80))])
    data = conn.data_to_send()
    assert data[4] == FrameType.ACK and data[5:9] == b"\x00\x00\x00\x01"
    assert data.endswith(bytes.fromhex("0103020869705f73636f72650250"))


def test_pipelined_notifies_in_one_read_keep_their_order() -> None:
    conn = ready()
    data = b"".join(codec.notify(sid, 1, [Message("m", [("i", sid)])]) for sid in range(1, 40, 2))
    events = conn.receive_data(data)
    assert [(e.stream_id, e.messages[0].args[0][1]) for e in events] == [
        (sid, sid) for sid in range(1, 40, 2)
    ]


def test_haproxy_disconnect_gets_agent_disconnect_then_close() -> None:
    conn = ready()
    events = conn.receive_data(SOFT_STOP)
    assert events[0] == DisconnectReceived(0, "normal")
    assert isinstance(events[1], ConnectionClosed)
    assert disconnect_status(conn.data_to_send()) == (0, "normal")
    assert conn.disconnect_status == 0  # what the shell counts as sent
    assert conn.state is State.CLOSED
    assert conn.receive_data(codec.notify(1, 1, [])) == []  # nothing after close


@pytest.mark.parametrize(("payload", "expected"), [
    (b"", DisconnectReceived(-1, "")),
    (codec.encode_kv_list([("status-code", "x"), ("message", "m")]), DisconnectReceived(-1, "m")),
    (b"\x0bstatus-code\x03", DisconnectReceived(-1, "")),  # truncated: the items are dropped
    (codec.encode_kv_list([("status-code", 2), ("message", "y" * 1000)]),
     DisconnectReceived(2, "y" * 255)),  # to the log it goes: SPOE.txt's 255 at most
])
def test_a_malformed_haproxy_disconnect_is_still_a_goodbye(payload: bytes, expected: Any) -> None:
    conn = ready()
    events = conn.receive_data(codec.encode_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, payload))
    assert events[0] == expected and isinstance(events[1], ConnectionClosed)
    assert disconnect_status(conn.data_to_send()) == (0, "normal")


def test_disconnect_before_hello_is_answered_too() -> None:
    conn = SpopConnection()
    events = conn.receive_data(SOFT_STOP)
    assert isinstance(events[0], DisconnectReceived)
    assert disconnect_status(conn.data_to_send())[0] == 0


def test_a_frame_before_hello_is_named_as_what_it_is() -> None:
    """The reason sent with status 4 says which frame came first (a black-box run read
    "NOTIFY received before HAPROXY-HELLO" for a fragment)."""
    for ftype, said in ((FrameType.NOTIFY, "NOTIFY received"),
                        (FrameType.UNSET, "fragment (frame type 0) received")):
        conn = SpopConnection()
        (event, _closed) = conn.receive_data(codec.encode_frame(ftype, 1, 1, b""))
        assert isinstance(event, ProtocolViolation) and said in event.message, event
        assert disconnect_status(conn.data_to_send())[0] == Status.INVALID_FRAME


def test_eof_is_a_normal_close() -> None:
    conn = ready()
    assert conn.receive_eof() == [ConnectionClosed("peer closed the connection")]
    assert conn.data_to_send() == b""
    assert conn.disconnect_status is None  # no goodbye either way


def test_eof_says_how_much_of_a_frame_it_cut_off() -> None:
    """What a close cuts off is lost for good (HAProxy does not send an event twice): the
    event says how much, so that the shell can say it."""
    frame = codec.notify(7, 1, [Message("m", [("q", "x" * 40)])])
    mid_frame = ready()
    assert mid_frame.receive_data(frame[:-5]) == []
    assert mid_frame.receive_eof() == [ConnectionClosed(
        "peer closed the connection in the middle of a frame", len(frame) - 5)]
    mid_hello = SpopConnection()
    mid_hello.receive_data(HAPROXY_HELLO[:9])
    assert [e.unfinished for e in mid_hello.receive_eof()] == [9]  # type: ignore[union-attr]
    fragmented = ready()
    payload = codec.encode_messages([Message("m", [("q", "x" * 600)])])
    fragmented.receive_data(codec.encode_frame(FrameType.NOTIFY, 0, 3, payload[:300], 0))
    assert [e.unfinished for e in fragmented.receive_eof()] == [300]  # type: ignore[union-attr]
    assert ready().receive_eof()[0] == ConnectionClosed("peer closed the connection", 0)


def test_a_notify_read_before_eof_still_gets_its_ack() -> None:
    """A handler still running at the peer's EOF (a half-close) answers what it was sent;
    after a DISCONNECT, either way, nothing more is written."""
    conn = ready()
    (event,) = conn.receive_data(codec.notify(7, 1, []))
    assert conn.receive_eof() == [ConnectionClosed("peer closed the connection")]
    conn.send_ack(event.stream_id, event.frame_id)
    assert conn.data_to_send() == codec.ack(7, 1)
    after_disconnect = ready()
    after_disconnect.receive_data(SOFT_STOP)
    after_disconnect.data_to_send()
    after_disconnect.receive_eof()
    after_disconnect.send_ack(7, 1)
    assert after_disconnect.data_to_send() == b""


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(hello(**{"supported-versions": None}), Status.NO_VERSION, id="no-version"),
        pytest.param(hello(**{"max-frame-size": None}), Status.NO_MAX_FRAME_SIZE, id="no-size"),
        pytest.param(hello(capabilities=None), Status.NO_CAPABILITIES, id="no-capabilities"),
        pytest.param(hello(**{"supported-versions": "1.0"}), Status.UNSUPPORTED_VERSION,
                     id="version-1.0"),
        # str.isdigit() is true of these, which int() rejects or reads as another number
        pytest.param(hello(**{"supported-versions": "\u00b2.0"}), Status.UNSUPPORTED_VERSION,
                     id="version-superscript"),
        pytest.param(hello(**{"supported-versions": "1.0,\u0662.0"}),
                     Status.UNSUPPORTED_VERSION, id="version-arabic-indic"),
        pytest.param(hello(**{"supported-versions": "9" * 4301 + ".0"}),
                     Status.UNSUPPORTED_VERSION, id="version-4301-digits"),
        pytest.param(hello(**{"max-frame-size": Typed(DataType.UINT32, 255)}),
                     Status.BAD_MAX_FRAME_SIZE, id="size-255"),
        pytest.param(codec.notify(1, 1, []), Status.INVALID_FRAME, id="notify-before-hello"),
        pytest.param(b"\x00\x00\x00\x03\x01\x00\x00", Status.INVALID_FRAME, id="short-frame"),
        pytest.param(b"\x00\x01\x00\x00", Status.FRAME_TOO_BIG, id="too-big-before-hello"),
        pytest.param(codec.encode_frame(FrameType.HAPROXY_HELLO, 0, 0, b"\x05abc", 0),
                     Status.FRAGMENTATION_NOT_SUPPORTED, id="hello-without-fin"),
        pytest.param(codec.encode_frame(FrameType.HAPROXY_HELLO, 1, 0, b""), Status.INVALID_FRAME,
                     id="hello-nonzero-ids"),
        pytest.param(codec.encode_frame(FrameType.HAPROXY_HELLO, 0, 0, b"\x03ab"),
                     Status.INVALID_FRAME, id="hello-truncated-kv"),
        # A value of the wrong type is there, not missing: an invalid frame, as HAProxy judges
        # an AGENT-HELLO (black-box run: 5 and 6 were sent, against 4 for capabilities).
        pytest.param(hello(**{"max-frame-size": "big"}), Status.INVALID_FRAME, id="size-not-int"),
        pytest.param(hello(**{"supported-versions": 2}), Status.INVALID_FRAME,
                     id="version-not-str"),
        pytest.param(hello(capabilities=1), Status.INVALID_FRAME, id="capabilities-not-str"),
        # "Major.Minor", as the specification writes versions
        pytest.param(hello(**{"supported-versions": "2"}), Status.UNSUPPORTED_VERSION,
                     id="version-no-minor"),
        pytest.param(hello(**{"supported-versions": "2.x"}), Status.UNSUPPORTED_VERSION,
                     id="version-minor-not-a-number"),
    ],
)
def test_hello_errors_get_the_spec_status_code(data: bytes, status: Status) -> None:
    conn = SpopConnection()
    events = conn.receive_data(data)
    assert isinstance(events[0], ProtocolViolation) and events[0].status == status
    assert isinstance(events[-1], ConnectionClosed)
    code, message = disconnect_status(conn.data_to_send())
    assert code == status and message
    assert conn.disconnect_status == status
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(codec.encode_frame(FrameType.NOTIFY, 1, 1, b"\x05ab"), Status.INVALID_FRAME,
                     id="truncated-message-name"),
        pytest.param(codec.encode_frame(FrameType.NOTIFY, 1, 1, b"\x01m\x01\x01a\x0f"),
                     Status.INVALID_FRAME, id="unknown-data-type"),
        pytest.param(HAPROXY_HELLO, Status.INVALID_FRAME, id="second-hello"),
        pytest.param(codec.ack(1, 1), Status.INVALID_FRAME, id="agent-frame-from-haproxy"),
        pytest.param(codec.encode_frame(FrameType.UNSET, 1, 1, b"x"), Status.INVALID_FRAME,
                     id="fragment-without-notify"),
        pytest.param((16381).to_bytes(4, "big"), Status.FRAME_TOO_BIG, id="over-negotiated-size"),
    ],
)
def test_errors_after_hello(data: bytes, status: Status) -> None:
    conn = ready()
    events = conn.receive_data(data)
    assert isinstance(events[0], ProtocolViolation) and events[0].status == status
    assert disconnect_status(conn.data_to_send())[0] == status


def test_a_message_of_256_arguments_as_haproxy_sends_it_says_what_to_fix() -> None:
    """HAProxy writes a message's argument count in one byte: 256 arguments (``id``, ``ts``,
    ``span`` and 253 more, as a user reaching for many tags writes) go out with a count of 0,
    and the rest reads as the next messages. The frame is refused as any malformed one is
    (status 4), and the reason, logged and sent, names the likely cause (black-box run)."""
    args = [("id", "0f8a6c1e-1"), ("ts", 1_764_000_000_000_000), ("span", "HAProxy session")]
    args += [("tag", f"k{i}") if i % 2 == 0 else ("", i) for i in range(253)]
    payload = (codec.encode_name("m") + bytes((len(args) % 256,)) + b"".join(
        codec.encode_name(k) + codec.encode_typed(v) for k, v in args))
    conn = ready()
    event = conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 1, 1, payload))[0]
    assert isinstance(event, ProtocolViolation) and event.status == Status.INVALID_FRAME
    assert "more than 255 arguments" in event.message
    status, message = disconnect_status(conn.data_to_send())
    assert status == Status.INVALID_FRAME and "more than 255 arguments" in message
    # 255 arguments are encoded and decoded whole.
    whole = codec.encode_frame(FrameType.NOTIFY, 1, 2, codec.encode_messages(
        [Message("m", args[:255])]))
    (notify,) = ready().receive_data(whole)
    assert notify.messages[0].args == args[:255]


def test_fragmented_notify_is_reassembled_even_mid_string() -> None:
    conn = ready()
    payload = codec.encode_messages([Message("m", [("q", "x" * 600), ("n", 7)])])
    first, middle, last = payload[:231], payload[231:462], payload[462:]
    assert conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 0, 3, first, 0)) == []
    assert conn.receive_data(codec.encode_frame(FrameType.UNSET, 0, 3, middle, 0)) == []
    events = conn.receive_data(codec.encode_frame(FrameType.UNSET, 0, 3, last, FLAG_FIN))
    assert events == [NotifyReceived(0, 3, [Message("m", [("q", "x" * 600), ("n", 7)])])]


def test_the_frame_deadline_restarts_only_when_a_new_frame_or_fragment_is_due() -> None:
    """``began_frame`` is what restarts the shell's read_timeout: a dribbled frame must not
    extend its own deadline, and the HELLO's runs from the accept."""
    conn = SpopConnection()
    conn.receive_data(HAPROXY_HELLO[:9])
    assert not conn.began_frame  # before the HELLO: never
    conn.receive_data(HAPROXY_HELLO[9:])
    assert not conn.began_frame  # READY, nothing pending
    first, second = codec.notify(1, 1, []), codec.notify(3, 1, [])
    began = []
    for chunk in (first[:3], first[3:6], first[6:] + second[:4], second[4:]):
        conn.receive_data(chunk)
        began.append(conn.began_frame)
    assert began == [True, False, True, False]
    payload = codec.encode_messages([Message("m", [("q", "x" * 600)])])
    conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 0, 3, payload[:300], 0))
    assert conn.began_frame  # a complete fragment: the next one is due
    conn.receive_data(codec.encode_frame(FrameType.UNSET, 0, 3, payload[300:], FLAG_FIN))
    assert not conn.began_frame
    conn.receive_data(first[:5])
    conn.receive_eof()
    assert not conn.began_frame


def test_fragment_abort_discards_and_owes_no_ack() -> None:
    conn = ready()
    conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 4, 2, b"\x01m\x01\x01q\x08\x7f", 0))
    events = conn.receive_data(codec.encode_frame(FrameType.UNSET, 4, 2, b"", FLAG_FIN | FLAG_ABORT))
    assert events == [NotifyAborted(4, 2)]
    assert conn.data_to_send() == b""
    events = conn.receive_data(codec.notify(6, 1, [Message("next", [])]))
    assert events == [NotifyReceived(6, 1, [Message("next", [])])]


def test_interlaced_fragments_are_refused_with_status_11() -> None:
    conn = ready()
    conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 4, 2, b"\x01m", 0))
    events = conn.receive_data(codec.encode_frame(FrameType.UNSET, 6, 1, b"\x00", FLAG_FIN))
    assert events[0].status == Status.INTERLACED_FRAMES


def test_fragments_refused_when_not_announced() -> None:
    conn = ready(capabilities=("pipelining",))
    events = conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 4, 2, b"\x01m", 0))
    assert events[0].status == Status.FRAGMENTATION_NOT_SUPPORTED


def test_reassembly_is_bounded() -> None:
    conn = ready(max_reassembled_size=1000)
    conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 4, 2, b"\x01m\x01\x01q\x08" + b"a" * 600, 0))
    events = conn.receive_data(codec.encode_frame(FrameType.UNSET, 4, 2, b"a" * 600, 0))
    assert events[0].status == Status.FRAME_TOO_BIG


@pytest.mark.parametrize("size", [0, 2])
def test_reassembly_counts_what_each_fragment_costs_beyond_its_bytes(size: int) -> None:
    """Empty or 2-byte fragments with no FIN: counted by payload alone they never reached the
    bound, and a peer held 140 MB (17 million empty ones) or 28 MB per connection against a
    1 MiB bound (black-box run). Each now counts 64 more: the bound holds to a few times."""
    conn = ready(max_reassembled_size=1 << 20)
    conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 4, 2, b"\x01m", 0))
    fragment = codec.encode_frame(FrameType.UNSET, 4, 2, b"a" * size, 0)
    sent = 0
    events: list[Any] = []
    while not events and sent < 100_000:
        events = conn.receive_data(fragment * 100)
        sent += 100
    assert sent <= (1 << 20) // 64 + 100
    assert isinstance(events[0], ProtocolViolation) and events[0].status == Status.FRAME_TOO_BIG
    assert "each fragment counting 64 more" in events[0].message


def test_a_legitimate_fragmented_notify_still_fits_the_bound() -> None:
    """HAProxy's fragments are frame-sized: 1 MB in fragments of 16,000 bytes reassembles
    under a 1 MiB bound."""
    conn = ready(max_reassembled_size=1 << 20)
    message = codec.encode_messages([Message("m", [("k", "a" * 1_000_000)])])
    chunks = [message[i:i + 16000] for i in range(0, len(message), 16000)]
    data = b"".join(
        codec.encode_frame(FrameType.NOTIFY if i == 0 else FrameType.UNSET, 4, 2, chunk,
                           FLAG_FIN if i == len(chunks) - 1 else 0)
        for i, chunk in enumerate(chunks))
    (event,) = conn.receive_data(data)
    assert event.messages == [Message("m", [("k", "a" * 1_000_000)])]


def test_ack_over_the_negotiated_size_is_sent_empty() -> None:
    conn = SpopConnection(max_frame_size=256)
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    conn.send_ack(9, 2, [SetVar(Scope.TXN, "big", "x" * 400)])
    assert conn.data_to_send() == codec.ack(9, 2)
    assert conn.acks_too_big == 1


def test_an_ack_stays_a_byte_under_the_negotiated_size() -> None:
    """HAProxy 3.2 takes an ACK of exactly the negotiated size and never hands it on; every
    later ACK on the connection waits behind it (black-box run: each request then failed after
    "timeout processing", until HAProxy restarted). One byte under, it is served."""
    conn = SpopConnection(max_frame_size=16380)
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    overhead = len(codec.ack(9, 2, [SetVar(Scope.TXN, "v", "")])) - 4
    for size in (16379, 16380):
        value = "x" * (size - overhead - 2)  # the varint length of the value takes 2 bytes
        exact = codec.ack(9, 2, [SetVar(Scope.TXN, "v", value)])
        assert len(exact) - 4 == size
        conn.send_ack(9, 2, [SetVar(Scope.TXN, "v", value)])
        assert conn.data_to_send() == (exact if size == 16379 else codec.ack(9, 2)), size
    assert conn.acks_too_big == 1


def test_an_ack_too_big_keeps_the_leading_actions_that_fit() -> None:
    """An inject's traceparent comes first; a client's huge baggage must not take it along."""
    conn = SpopConnection(max_frame_size=256)
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    traceparent = SetVar(Scope.TXN, "traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    state = SetVar(Scope.TXN, "tracestate", "k=v")
    conn.send_ack(9, 2, [traceparent, state, SetVar(Scope.TXN, "baggage", "x" * 400)])
    assert conn.data_to_send() == codec.ack(9, 2, [traceparent, state])
    assert conn.acks_too_big == 1


def test_trimming_an_ack_of_thousands_of_actions_encodes_it_a_bounded_number_of_times(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's NOTIFY of 6,000 injects made an ACK of 18,000 actions, trimmed by dropping one
    and encoding the rest again, each time: quadratic, the agent frozen 14 s (black-box run).
    Now the ACK is cut from each action's size and encoded once more, whatever its length."""
    conn = SpopConnection(max_frame_size=16380)
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    actions = [SetVar(Scope.TXN, f"v{i}", "x" * 20) for i in range(6000)]
    calls = []
    real_ack = codec.ack
    monkeypatch.setattr(codec, "ack", lambda *a: calls.append(a) or real_ack(*a))
    conn.send_ack(9, 2, actions)
    sent = conn.data_to_send()
    assert len(calls) <= 3
    kept = len(codec.decode_actions(codec.decode_frame(sent[4:]).payload))
    assert sent == real_ack(9, 2, actions[:kept])  # the leading actions ...
    assert len(sent) - 4 <= 16379 < len(real_ack(9, 2, actions[:kept + 1])) - 4  # ... that fit
    assert conn.acks_too_big == 1


def test_an_unencodable_action_is_dropped_and_the_ack_still_sent() -> None:
    """An application handler returning a float (SPOP has no such type) or a scope out of range
    must not cost the connection: HAProxy gets its ACK, with the actions that encode."""
    told: list[str] = []
    conn = SpopConnection(on_trimmed_ack=told.append)
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    good = SetVar(Scope.TXN, "ok", 1)
    conn.send_ack(3, 1, [good, SetVar(Scope.TXN, "fl", 1.5)])  # type: ignore[arg-type]
    conn.send_ack(3, 2, [SetVar(7, "scope", 1), good])  # type: ignore[arg-type]
    conn.send_ack(3, 3, ["not an action"])  # type: ignore[list-item]
    assert conn.data_to_send() == codec.ack(3, 1, [good]) + codec.ack(3, 2, [good]) + codec.ack(3, 3)
    assert conn.state is State.READY
    assert conn.actions_unencodable == 3
    assert told == ["unencodable"] * 3


def test_an_unencodable_action_is_named_in_the_log(caplog) -> None:
    """The handler is not known to the connection, its variable is: the log names the action
    and keys its rate limit on it, so a second handler's bug is not hidden by the first's."""
    conn = SpopConnection()
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    with caplog.at_level(logging.ERROR, logger="spoe_agent.protocol.connection"):
        conn.send_ack(3, 1, [SetVar(Scope.TXN, "ok", 1), SetVar(Scope.REQ, "fl", 1.5)])  # type: ignore[arg-type]
        conn.send_ack(3, 2, [SetVar(7, "scope", 1)])  # type: ignore[arg-type]
        conn.send_ack(3, 3, ["not an action"])  # type: ignore[list-item]
    messages = [record.getMessage() for record in caplog.records]
    assert "set-var(req.fl) of float cannot be encoded (cannot encode float" in messages[0]
    assert "sent with the 1 action(s) that can" in messages[0]
    assert "set-var(scope 7, 'scope') of int cannot be encoded" in messages[1]
    assert "the action str cannot be encoded" in messages[2]
    keys = {getattr(record, "rate_key", None) for record in caplog.records}
    assert len(keys) == 3


def test_an_ack_too_big_is_told() -> None:
    told: list[str] = []
    conn = SpopConnection(max_frame_size=256, on_trimmed_ack=told.append)
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    conn.send_ack(9, 2, [SetVar(Scope.TXN, "big", "x" * 400)])
    conn.send_ack(9, 3, [SetVar(Scope.TXN, "small", "x")])
    assert told == ["too_big"]


def test_unknown_frame_types_are_skipped() -> None:
    conn = ready()
    assert conn.receive_data(codec.encode_frame(42, 0, 0, b"whatever")) == []
    assert conn.state is State.READY


def test_agent_close_sends_status_and_truncates_long_messages() -> None:
    conn = ready()
    assert conn.disconnect_status is None
    conn.close(Status.RESOURCE_ALLOCATION, "é" * 300)
    code, message = disconnect_status(conn.data_to_send())
    assert code == 13 and len(message.encode()) <= 255
    assert conn.disconnect_status == 13
    assert conn.state is State.CLOSED


def test_internal_errors_never_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = ready()

    def boom(*args: Any) -> Message:
        raise RuntimeError("bug")

    # Deep inside the decoder, where a bug of ours would be: the codec builds each Message by
    # looking the class up (compiled with mypyc too; a call from one compiled module to another
    # could not be patched).
    monkeypatch.setattr(codec, "Message", boom)
    events = conn.receive_data(codec.notify(1, 1, [Message("m", [])]))
    assert events[0].status == Status.UNKNOWN
    assert disconnect_status(conn.data_to_send())[0] == 99


# ---------------------------------------------- the inlined NOTIFY path equals the general one

_ids = st.one_of(st.integers(0, 239), st.integers(240, 1 << 40))
_notify_frames = st.builds(
    lambda sid, fid, flags, n: codec.notify(
        sid, fid, [Message("m", [("i", n), ("", "x" * (n % 300))])], flags=flags
    ),
    _ids,
    _ids,
    st.sampled_from([FLAG_FIN, FLAG_FIN | FLAG_ABORT]),
    st.integers(0, 1000),
)


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(_notify_frames, min_size=1, max_size=12), st.data())
def test_notifies_in_any_split_give_what_the_general_path_gives(
    frames: list[bytes], data: st.DataObject
) -> None:
    """receive_data decodes the common NOTIFY (FIN only) inline; every other
    frame goes through _handle_frame. Whatever the ids, flags and read boundaries, the events
    must be those _handle_frame produces frame by frame."""
    reference = SpopConnection()
    reference.receive_data(HAPROXY_HELLO)
    expected: list = []
    for frame in frames:
        reference._handle_frame(frame[4:], expected)

    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    conn = SpopConnection()
    conn.receive_data(HAPROXY_HELLO)
    got = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got.extend(conn.receive_data(stream[start:stop]))
    assert got == expected
    assert conn.buffered == 0


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=24), st.binary(max_size=12))
def test_notify_ids_running_past_the_frame_are_refused_as_the_general_path_does(
    ids_and_payload: bytes, next_bytes: bytes
) -> None:
    """A FIN NOTIFY whose stream or frame id is truncated, too long or runs into the next
    frame: the inline path must answer exactly what _handle_frame answers, bytes included."""
    body = bytes((int(FrameType.NOTIFY),)) + FLAG_FIN.to_bytes(4, "big") + ids_and_payload
    wire = len(body).to_bytes(4, "big") + body + next_bytes

    reference = SpopConnection()
    reference.receive_data(HAPROXY_HELLO)
    reference.data_to_send()
    expected: list = []
    try:
        reference._handle_frame(body, expected)
    except ProtocolError as exc:
        reference._violation(exc.status, exc.message, expected)

    conn = SpopConnection()
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    got = conn.receive_data(wire)
    assert got[: len(expected)] == expected
    if reference.state is State.CLOSED:
        assert got == expected
        assert conn.data_to_send() == reference.data_to_send()


def test_an_oversized_length_is_refused_before_the_frame_arrives() -> None:
    conn = SpopConnection(max_frame_size=1024)
    conn.receive_data(HAPROXY_HELLO)
    conn.data_to_send()
    assert conn.receive_data(b"\x00\x00") == []  # not even the length yet
    events = conn.receive_data(b"\x10\x00")  # 4096 > 1024: no need to wait for its bytes
    assert isinstance(events[0], ProtocolViolation) and events[0].status == Status.FRAME_TOO_BIG
    assert conn.state is State.CLOSED and conn.buffered == 0


# ------------------------------------------------------------- moving a connection (--workers)


def test_a_ready_connection_moves_with_its_negotiated_state_and_goes_on_alike() -> None:
    """A worker hands an idle connection to another (``--workers``): the new process must
    answer the next frames exactly as the old one would have, without a HELLO."""
    old = ready(max_frame_size=16384)
    state = old.export_state()
    assert state == {"frame_size": 16380, "capabilities": ["async", "pipelining"],
                     "engine_id": old.engine_id}
    new = SpopConnection.resumed(state, max_frame_size=16384)
    assert new.state is State.READY and new.data_to_send() == b""
    frames = codec.notify(3, 1, [Message("m", [("i", 1)])]) + codec.encode_frame(
        FrameType.NOTIFY, 0, 3, codec.encode_messages([Message("f", [("q", "x" * 600)])])[:200], 0)
    for conn in (old, new):
        assert conn.receive_data(frames) == [NotifyReceived(3, 1, [Message("m", [("i", 1)])])]
        conn.send_ack(3, 1, [SetVar(Scope.TXN, "v", "x" * 20000)])  # over 16380: trimmed alike
    assert old.data_to_send() == new.data_to_send()
    assert old.frame_size == new.frame_size and old.peer_capabilities == new.peer_capabilities


def test_a_connection_moves_only_at_a_frame_boundary_with_nothing_owed() -> None:
    conn = SpopConnection()
    assert conn.export_state() is None and not conn.at_frame_boundary  # no HELLO yet
    conn = ready()
    assert conn.at_frame_boundary
    conn.receive_data(codec.notify(1, 1, [])[:7])
    assert conn.export_state() is None and not conn.at_frame_boundary  # half a frame read
    conn = ready()
    conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 0, 3, b"\x01m\x01\x01q\x08\x7f", 0))
    assert conn.export_state() is None  # a fragmented NOTIFY half reassembled
    assert not conn.at_frame_boundary
    conn = ready()
    conn.send_ack(1, 1)
    assert conn.export_state() is None  # an ACK not written yet
    conn.data_to_send()
    assert conn.export_state() is not None
    conn.receive_eof()
    assert conn.export_state() is None


@pytest.mark.parametrize("state", [
    None, {}, {"frame_size": 100, "capabilities": [], "engine_id": None},
    {"frame_size": 70000, "capabilities": [], "engine_id": None},
    {"frame_size": 16380, "capabilities": "async", "engine_id": None},
    {"frame_size": 16380, "capabilities": [], "engine_id": 3},
])
def test_a_state_that_is_not_one_is_refused(state: Any) -> None:
    with pytest.raises(ValueError):
        SpopConnection.resumed(state)


# ------------------------------------------------- ACKs queued as NOTIFYs decode (empty_ack)


def _payload(frame: bytes) -> bytes:
    return codec.decode_frame(frame[4:]).payload


def test_a_notify_the_application_answers_empty_is_acked_as_it_decodes() -> None:
    asked: list[bytes] = []
    conn = ready(empty_ack=lambda payload: asked.append(payload) or True)
    frame = codec.notify(300, 2, [Message("m", [("span", "s")])])
    events = conn.receive_data(frame)
    assert events == [NotifyReceived(300, 2, [Message("m", [("span", "s")])], acked=True)]
    assert asked == [_payload(frame)]  # the payload as sent, undecoded
    assert conn.data_to_send() == codec.ack(300, 2)


def test_only_the_notifies_that_lead_a_read_are_acked_early_so_acks_keep_their_order() -> None:
    conn = ready(empty_ack=lambda payload: b"wait" not in payload)
    read = b"".join([
        codec.notify(1, 1, [Message("a", [])]),
        codec.notify(3, 1, [Message("wait", [])]),
        codec.notify(5, 1, [Message("b", [])]),
    ])
    events = conn.receive_data(read)
    assert [(e.stream_id, e.acked) for e in events] == [(1, True), (3, False), (5, False)]
    assert conn.data_to_send() == codec.ack(1, 1)
    # The next read starts a new run.
    assert conn.receive_data(codec.notify(7, 1, [Message("c", [])]))[0].acked
    # Anything else leading a read ends the run too: a fragmented NOTIFY, its last fragment.
    conn.data_to_send()
    conn.receive_data(codec.encode_frame(FrameType.NOTIFY, 9, 1, b"\x01m", 0))
    events = conn.receive_data(codec.encode_frame(FrameType.UNSET, 9, 1, b"\x00", FLAG_FIN)
                               + codec.notify(11, 1, [Message("d", [])]))
    assert [(e.stream_id, e.acked) for e in events] == [(9, False), (11, False)]
    assert conn.data_to_send() == b""


def test_a_malformed_notify_gets_no_early_ack_only_the_disconnect() -> None:
    """The NOTIFYs before it in the read decoded and keep their ACKs, as they would read
    alone; it and what follows get none (a DISCONNECT that followed an ACK of the frame it
    refuses would tell HAProxy two things)."""
    conn = ready(empty_ack=lambda payload: True)
    good = codec.notify(1, 1, [Message("a", [])])
    bad = codec.encode_frame(FrameType.NOTIFY, 3, 1, b"\x01m\x01\x01q\x0f", FLAG_FIN)  # type 15
    events = conn.receive_data(good + bad + codec.notify(5, 1, [Message("b", [])]))
    assert events[0] == NotifyReceived(1, 1, [Message("a", [])], acked=True)
    assert [type(e) for e in events[1:]] == [ProtocolViolation, ConnectionClosed]
    out = conn.data_to_send()
    ack = codec.ack(1, 1)
    assert out[:len(ack)] == ack
    assert disconnect_status(out[len(ack):])[0] == Status.INVALID_FRAME


def test_notifies_before_a_bad_frame_in_the_read_are_acked_before_the_disconnect() -> None:
    """Without early ACKs (an application that answers each NOTIFY), the NOTIFYs decoded
    before the bad frame were handled and never ACKed: the DISCONNECT was queued first and
    the state CLOSED refused their ACKs (a black-box run). It now waits for them."""
    conn = ready()
    bad = codec.encode_frame(FrameType.NOTIFY, 3, 1, b"\x01m\x01\x01q\x0b", FLAG_FIN)  # type 11
    events = conn.receive_data(codec.notify(1, 1, [Message("a", [])])
                               + codec.notify(2, 1, [Message("b", [])]) + bad)
    assert [type(e) for e in events] == [NotifyReceived, NotifyReceived, ProtocolViolation,
                                         ConnectionClosed]
    assert conn.state is State.CLOSED and conn.disconnect_status == Status.INVALID_FRAME
    assert conn.data_to_send() == b""  # nothing yet: the goodbye waits for the two ACKs
    conn.send_ack(2, 1, [SetVar(Scope.TXN, "x", 1)])
    assert conn.data_to_send() == codec.ack(2, 1, [SetVar(Scope.TXN, "x", 1)])
    conn.send_ack(1, 1)
    out = conn.data_to_send()
    assert out[:len(codec.ack(1, 1))] == codec.ack(1, 1)
    assert disconnect_status(out[len(codec.ack(1, 1)):])[0] == Status.INVALID_FRAME
    conn.send_ack(9, 9)  # nothing is owed any more
    assert conn.data_to_send() == b""


def test_a_notify_of_an_earlier_read_still_handled_gets_its_ack_before_the_disconnect() -> None:
    """A concurrent handler (with --workers, an inject for a session another worker owns)
    can still run when a later read brings a bad frame: its ACK was refused, the DISCONNECT
    already queued, where the same frames in one read got it (live fuzzing, 1 run in 20)."""
    conn = ready()
    conn.receive_data(codec.notify(1, 1, [Message("a", [])]))  # handed to a handler
    events = conn.receive_data(codec.notify(2, 1, [Message("b", [])]) + b"\x00\x00\x00\x01\x03")
    assert [type(e) for e in events] == [NotifyReceived, ProtocolViolation, ConnectionClosed]
    assert conn.data_to_send() == b""  # the goodbye waits for both ACKs
    conn.send_ack(2, 1)
    assert conn.data_to_send() == codec.ack(2, 1)
    conn.send_ack(1, 1)
    out = conn.data_to_send()
    assert out[:len(codec.ack(1, 1))] == codec.ack(1, 1)
    assert disconnect_status(out[len(codec.ack(1, 1)):])[0] == Status.INVALID_FRAME


def test_notifies_before_haproxys_disconnect_in_one_read_are_acked_before_the_goodbye() -> None:
    """Black-box run: with --workers the read's ACKs are queued once all its frames decoded,
    and HAProxy's DISCONNECT at the read's end had already closed the connection to them."""
    conn = ready()
    events = conn.receive_data(codec.notify(1, 1, [Message("a", [])])
                               + codec.notify(2, 1, [Message("b", [])])
                               + codec.disconnect(FrameType.HAPROXY_DISCONNECT, 0, "normal"))
    assert [type(e) for e in events] == [NotifyReceived, NotifyReceived, DisconnectReceived,
                                         ConnectionClosed]
    assert conn.state is State.CLOSED and conn.disconnect_status == Status.NORMAL
    assert conn.data_to_send() == b""  # the goodbye waits for the two ACKs
    conn.send_ack(1, 1)
    conn.send_ack(2, 1, [SetVar(Scope.TXN, "x", 1)])
    out = conn.data_to_send()
    acks = codec.ack(1, 1) + codec.ack(2, 1, [SetVar(Scope.TXN, "x", 1)])
    assert out[:len(acks)] == acks
    assert disconnect_status(out[len(acks):]) == (Status.NORMAL, "normal")
    # Alone, it is answered at once, as before.
    alone = ready()
    alone.receive_data(codec.disconnect(FrameType.HAPROXY_DISCONNECT, 0, "normal"))
    assert disconnect_status(alone.data_to_send()) == (Status.NORMAL, "normal")


def test_a_goodbye_held_for_acks_is_sent_when_the_shell_gives_up_on_them() -> None:
    conn = ready()
    conn.receive_data(codec.notify(1, 1, [Message("a", [])]) + b"\x00\x00\x00\x01\x03")
    assert conn.data_to_send() == b""
    conn.release_goodbye()
    assert disconnect_status(conn.data_to_send())[0] == Status.INVALID_FRAME
    conn.send_ack(1, 1)
    assert conn.data_to_send() == b""
    conn.release_goodbye()  # once only
    assert conn.data_to_send() == b""


def test_without_empty_ack_nothing_is_queued_before_the_application_answers() -> None:
    conn = ready()
    events = conn.receive_data(codec.notify(1, 1, [Message("a", [])]))
    assert events == [NotifyReceived(1, 1, [Message("a", [])])] and not events[0].acked
    assert conn.data_to_send() == b""


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(_notify_frames, min_size=1, max_size=12), st.data(),
       st.sampled_from(["all", "none", "odd"]))
def test_early_acks_leave_the_bytes_an_application_acking_in_order_sends(
    frames: list[bytes], data: st.DataObject, which: str
) -> None:
    """Whatever the reads' boundaries and which NOTIFYs the check accepts: the same events
    (but for ``acked``), and the same bytes out as when the application ACKs every NOTIFY in
    the order its events came."""
    accepts = {"all": lambda p: True, "none": lambda p: False,
               "odd": lambda p: len(p) % 2 == 1}[which]
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    def run(conn: SpopConnection) -> tuple[list, bytes]:
        events, out = [], b""
        for read in reads:
            got = conn.receive_data(read)
            run_over = False
            for event in got:
                assert not event.acked or not run_over  # acked early: a leading run only
                run_over = run_over or not event.acked
                if type(event) is NotifyReceived and not event.acked:
                    conn.send_ack(event.stream_id, event.frame_id)
            events += [(type(e), getattr(e, "stream_id", None), getattr(e, "messages", None))
                       for e in got]
            out += conn.data_to_send()
        return events, out

    assert run(ready(empty_ack=accepts)) == run(ready())
