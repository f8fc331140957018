"""Session-owner routing without sockets: the peer wire format, stamp ordering."""

from __future__ import annotations

import marshal
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoe_agent.protocol.types import Scope, SetVar
from spoe_agent.tracing.language import OP_INJECT, OP_SPAN, OP_TAG, Command, has_inject
from spoe_agent.workers.router import (
    BATCH,
    COMMAND,
    HELLO,
    MAX_FRAME,
    REPLY,
    Backlog,
    FrameError,
    FrameReader,
    Reorderer,
    commands_of,
    encode,
    encode_batch,
    encode_command,
    encode_reply,
    reply_actions,
)
from tests.support.examples import examples
from tests.workers.streams import expected_shape, registry, shapes, stream

KEYS = [f"{i:08x}-4d2c-4e7b-9f3a-{i * 7919:012x}" for i in range(3000)]


def test_has_inject() -> None:
    key = "k"
    assert has_inject(Command(key, None, None, None, ((OP_SPAN, "a"), (OP_INJECT, "a"))))
    assert not has_inject(Command(key, None, None, None, ((OP_SPAN, "a"), (OP_TAG, "x", 1))))
    assert [has_inject(c) for c in stream(key, inject=True)] == [False, False, True, False]


# -------------------------------------------------------------------------------- framing

values = st.one_of(st.text(), st.integers(-(2**63), 2**63 - 1), st.booleans())
commands = st.builds(
    Command,
    key=st.text(min_size=1),
    ts_ns=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    service=st.one_of(st.none(), st.text()),
    carrier=st.one_of(st.none(), st.dictionaries(st.text(), st.text(), max_size=4)),
    ops=st.lists(st.one_of(
        st.tuples(st.just(OP_SPAN), st.text()),
        st.tuples(st.just(OP_TAG), st.text(), values),
        st.tuples(st.just(OP_INJECT), st.text()),
    ), max_size=8).map(tuple),
)


@settings(max_examples=examples(200), deadline=None)
@given(batch=st.lists(commands, min_size=1, max_size=5), cut=st.integers(1, 64),
       stamps=st.lists(st.integers(0, 2**63 - 1), min_size=5, max_size=5))
def test_commands_survive_the_wire_in_any_chunking(
    batch: list[Command], cut: int, stamps: list[int]
) -> None:
    wire = b"".join(encode_command(c, rpc_id=i, stamp_ns=stamps[i]) for i, c in enumerate(batch))
    reader = FrameReader()
    frames = []
    for start in range(0, len(wire), cut):
        frames += reader.feed(wire[start:start + cut])
    assert reader.buffered == 0
    assert [f[0] for f in frames] == [COMMAND] * len(batch)
    assert [f[1] for f in frames] == stamps[:len(batch)]
    assert [f[2] for f in frames] == list(range(len(batch)))
    decoded = [c for f in frames for c in commands_of(f)]
    assert decoded == batch
    # repr tells True from 1, which == does not: sharing must not swap one for the other.
    assert [repr(c) for c in decoded] == [repr(c) for c in batch]
    assert all(type(c) is Command for c in decoded)


@settings(max_examples=examples(200), deadline=None)
@given(batch=st.lists(commands, max_size=8), cut=st.integers(1, 64),
       stamp=st.integers(0, 2**63 - 1), owns=st.lists(st.text(), max_size=4).map(tuple),
       ended=st.lists(st.text(), max_size=4).map(tuple), drained=st.integers(0, 2**63 - 1))
def test_a_batch_is_one_frame_of_its_commands_in_order_and_announcements(
    batch: list[Command], cut: int, stamp: int, owns: tuple[str, ...], ended: tuple[str, ...],
    drained: int,
) -> None:
    wire = encode_batch(batch, stamp, owns, ended, drained)
    reader = FrameReader()
    frames = []
    for start in range(0, len(wire), cut):
        frames += reader.feed(wire[start:start + cut])
    (frame,) = frames
    assert frame[:2] == (BATCH, stamp)
    assert frame[3:] == (owns, ended, drained)
    decoded = commands_of(frame)
    assert decoded == batch
    assert [repr(c) for c in decoded] == [repr(c) for c in batch]
    assert all(type(c) is Command for c in decoded)


def test_forwarded_commands_share_their_strings() -> None:
    """marshal makes every string anew; an owner keeping thousands of forwarded sessions must
    not keep a copy of each span name and tag per session (the local decoder shares them)."""
    first, second = (
        commands_of(FrameReader().feed(encode_command(Command(
            key, 1, "svc", None,
            ((OP_SPAN, "HAProxy session"), (OP_TAG, "http.request.method", "GET"),
             (OP_TAG, "url.path", path), (OP_TAG, "n", n)),
        )))[0])[0]
        for key, path, n in (("k1", "/a", True), ("k2", "/b", 1))
    )
    assert second.service is first.service
    assert second.ops[0] is first.ops[0]  # an op of strings only: the op itself
    assert second.ops[1] is first.ops[1]
    assert second.ops[2][1] is first.ops[2][1]  # the key of an op whose value differs
    assert first.ops[3][2] is True
    assert type(second.ops[3][2]) is int  # not the True seen before, though True == 1
    assert second.ops[2][2] == "/b" and second.key == "k2"


def test_a_partial_frame_waits_for_the_rest() -> None:
    wire = encode((HELLO, 3, True, False))
    reader = FrameReader()
    assert reader.feed(wire[:5]) == []
    assert reader.buffered == 5
    assert reader.feed(wire[5:]) == [(HELLO, 3, True, False)]


@pytest.mark.parametrize("data, reason", [
    ((MAX_FRAME + 1).to_bytes(4, "big"), "frame of"),
    (len(b"\xff\xff").to_bytes(4, "big") + b"\xff\xff", "undecodable"),
    (len(marshal.dumps([1])).to_bytes(4, "big") + marshal.dumps([1]), "not a frame"),
    (len(marshal.dumps(())).to_bytes(4, "big") + marshal.dumps(()), "not a frame"),
])
def test_garbage_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        FrameReader().feed(data)


def test_replies_carry_set_vars() -> None:
    actions = [SetVar(Scope.TXN, "traceparent", "00-ab-cd-01"), SetVar(Scope.REQ, "n", 7)]
    (frame,) = FrameReader().feed(encode_reply(42, actions))
    assert frame[:2] == (REPLY, 42)
    assert reply_actions(frame) == actions
    assert reply_actions(FrameReader().feed(encode_reply(1, []))[0]) == []


# ---------------------------------------------------------------------------------- order


def test_reorderer_releases_in_stamp_order_whatever_the_arrival() -> None:
    reorder = Reorderer()
    # As libev may report them: the peer that wrote last is read first.
    for origin, stamp in (("b", 30), ("b", 40), ("a", 10), ("c", 20), ("a", 35)):
        reorder.push(stamp, origin, (COMMAND, stamp))
    assert [(o, f[1]) for o, f in reorder.pop_all()] == [
        ("a", 10), ("c", 20), ("b", 30), ("a", 35), ("b", 40)]
    assert len(reorder) == 0 and reorder.pop_all() == []


def test_equal_stamps_keep_arrival_order() -> None:
    reorder = Reorderer()
    for origin in "xyz":
        reorder.push(5, origin, (COMMAND, 5))
    assert [o for o, _ in reorder.pop_all()] == ["x", "y", "z"]


def test_stamp_order_rebuilds_streams_split_over_peers() -> None:
    """Each stream's events were forwarded by different workers and read back peer by peer,
    last writer first; sorted by stamp, the owner builds exactly the single-process trees."""
    keys = KEYS[:40]
    stamp = 0
    wires: dict[int, bytearray] = {0: bytearray(), 1: bytearray(), 2: bytearray()}
    # Interleave the streams event by event, each event through a different forwarder.
    per_key = {key: stream(key) for key in keys}
    for step in range(4):
        for n, key in enumerate(keys):
            stamp += 1
            wires[(n + step) % 3] += encode_command(per_key[key][step], stamp_ns=stamp)
    reorder = Reorderer()
    for peer in (2, 1, 0):
        for frame in FrameReader().feed(bytes(wires[peer])):
            reorder.push(frame[1], peer, frame)
    spans: list = []
    reg = registry(spans)
    for _, frame in reorder.pop_all():
        reg.apply(*commands_of(frame))
    assert shapes(spans) == Counter({expected_shape(key): 1 for key in keys})

    # The same bytes applied in arrival order (what trusting the event loop would do) break.
    arrival: list = []
    reg = registry(arrival)
    for peer in (2, 1, 0):
        for frame in FrameReader().feed(bytes(wires[peer])):
            reg.apply(*commands_of(frame))
    assert shapes(arrival) != shapes(spans)


# -------------------------------------------------------------------------------- backlog


def test_backlog_is_bounded_by_count() -> None:
    backlog = Backlog(max_items=3, max_age_s=60)
    for i in range(5):
        backlog.add(bytes([i]), now_ns=i)
    assert len(backlog) == 3 and backlog.dropped == 2
    assert backlog.take(now_ns=5) == b"\x02\x03\x04"
    assert len(backlog) == 0 and backlog.take(now_ns=6) == b""


def test_backlog_discards_and_counts_commands_not_frames() -> None:
    backlog = Backlog()
    backlog.add(b"batch", commands=5)
    backlog.add(b"one")
    assert backlog.discard() == 6
    assert len(backlog) == 0 and backlog.take() == b"" and backlog.dropped == 0


def test_backlog_counts_what_it_holds_and_drops_in_commands() -> None:
    """Code review: a frame dropped counted 1 whatever batch it held, and the held gauge
    counted frames: a loss was understated up to a batch's size."""
    backlog = Backlog(max_items=2, max_age_s=1.0)
    for i in range(4):
        backlog.add(bytes([i]), now_ns=i, commands=10)
    assert (len(backlog), backlog.commands, backlog.dropped) == (2, 20, 20)
    backlog.add(b"batch", now_ns=2_000_000_000, commands=50)  # the 4th frame drops: 10 more
    assert (backlog.commands, backlog.dropped) == (60, 30)
    assert backlog.expire(now_ns=2_500_000_000) == 10  # the 3rd frame aged out
    assert (backlog.commands, backlog.dropped) == (50, 40)
    assert backlog.take(now_ns=2_500_000_000) == b"batch" and backlog.commands == 0


def test_backlog_is_bounded_by_age() -> None:
    backlog = Backlog(max_items=100, max_age_s=1.0)
    backlog.add(b"old", now_ns=0)
    backlog.add(b"new", now_ns=900_000_000)
    assert backlog.expire(now_ns=1_500_000_000) == 1
    assert backlog.dropped == 1
    assert backlog.take(now_ns=1_500_000_000) == b"new"
