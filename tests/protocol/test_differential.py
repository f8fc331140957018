"""Property tests: the hand-written codec and the construct grammar are the same function.

(a) On any input, valid or not, both decoders return equal results or both raise
    :class:`InvalidFrame`; no other exception may escape either of them.
(b) On any valid structure both encoders produce the same bytes, and decoding those bytes
    gives the structure back (modulo the documented normalisations in ``expected``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from spoe_agent.protocol import codec, grammar
from spoe_agent.protocol.errors import InvalidFrame
from spoe_agent.protocol.types import Frame, FrameType, Message
from spoe_agent.protocol.varint import _decode_long_varint, decode_varint
from tests.support.examples import examples

from .strategies import (
    CODEC,
    GRAMMAR,
    action_lists,
    canon,
    expected,
    frames,
    kv_items,
    message_lists,
    mutated,
    names,
    uint64s,
    values,
)

# Sized so the whole file runs in about 10 s on an idle 2-core box (under 30 s when loaded);
# the grammar is the slow half, and messages with 20 args are its slowest input.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=_QUIET)
VALID = settings(max_examples=examples(250), deadline=None, suppress_health_check=_QUIET)
BIG = settings(max_examples=examples(120), deadline=None, suppress_health_check=_QUIET)


def outcome(parse: Callable[[bytes], Any], data: bytes) -> tuple:
    """Result or rejection; anything other than InvalidFrame propagates and fails the test."""
    try:
        return ("ok", canon(parse(data)))
    except InvalidFrame as exc:
        assert str(exc), "an InvalidFrame must say what was wrong"
        return ("invalid",)


def agree(name: str, data: bytes) -> tuple:
    mine = outcome(getattr(CODEC, name), data)
    theirs = outcome(getattr(GRAMMAR, name), data)
    assert mine == theirs, f"{name} disagrees on {data.hex(' ')}"
    event(f"{name}: {mine[0]}")
    return mine


# ------------------------------------------------------------ (a) any input, same verdict

typed_encodings = values.map(codec.encode_typed)
kv_payloads = kv_items.map(codec.encode_kv_list)
message_payloads = message_lists.map(codec.encode_messages)
action_payloads = action_lists.map(codec.encode_actions)
frame_bodies = st.one_of(
    frames().map(lambda args: codec.encode_frame(*args)[4:]),
    st.builds(
        lambda sid, fid, payload: codec.notify(sid, fid, [])[4:11] + payload,
        uint64s,
        uint64s,
        message_payloads,
    ),
    st.builds(lambda sid, fid, acts: codec.ack(sid, fid, acts)[4:], uint64s, uint64s, action_lists),
)


def fuzz(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), mutated(valid), valid)


@FUZZ
@given(fuzz(st.one_of(uint64s.map(grammar.build_varint), typed_encodings)))
def test_varint_verdicts_agree(data: bytes) -> None:
    agree("parse_varint", data)
    # the codec decodes a prefix; the grammar must accept exactly that prefix and no more
    try:
        value, end = decode_varint(data, 0)
    except InvalidFrame:
        return
    assert grammar.parse_varint(data[:end]) == value


@FUZZ
@given(fuzz(typed_encodings))
def test_typed_verdicts_agree(data: bytes) -> None:
    agree("parse_typed", data)
    try:
        value, end = codec.decode_typed(data, 0)
    except InvalidFrame:
        return
    assert canon(grammar.parse_typed(data[:end])) == canon(value)


@FUZZ
@given(fuzz(kv_payloads))
def test_kv_list_verdicts_agree(data: bytes) -> None:
    agree("parse_kv_list", data)


@VALID
@given(fuzz(message_payloads))
def test_messages_verdicts_agree(data: bytes) -> None:
    agree("parse_messages", data)


@FUZZ
@given(fuzz(action_payloads))
def test_actions_verdicts_agree(data: bytes) -> None:
    agree("parse_actions", data)


@FUZZ
@given(fuzz(frame_bodies))
def test_frame_verdicts_agree(data: bytes) -> None:
    verdict = agree("parse_frame", data)
    if verdict[0] != "ok":
        return
    payload = codec.decode_frame(data).payload
    for name in ("parse_kv_list", "parse_messages", "parse_actions"):
        agree(name, payload)


# Grammar-aware "token soup": names, typed values, action headers with in- and out-of-range
# bytes, argument counts and short junk, glued in any order. Random bytes rarely get past
# the first item; this reaches every branch of the list grammars, right or wrong.
tokens = st.one_of(
    names.map(codec.encode_name),
    typed_encodings,
    st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 6)).map(bytes),
    st.integers(0, 3).map(lambda n: bytes((n,))),
    st.binary(max_size=3),
)
soups = st.lists(tokens, max_size=12).map(b"".join)


@FUZZ
@given(soups)
def test_token_soup_verdicts_agree(data: bytes) -> None:
    for name in ("parse_kv_list", "parse_messages", "parse_actions", "parse_typed"):
        agree(name, data)


# ------------------------------------------------- (b) valid structures, same bytes back


@VALID
@given(values)
def test_typed_encodings_match_and_round_trip(value: Any) -> None:
    encoded = codec.encode_typed(value)
    assert grammar.build_typed(value) == encoded
    for impl in (CODEC, GRAMMAR):
        assert canon(impl.parse_typed(encoded)) == canon(expected(value))


@VALID
@given(kv_items)
def test_kv_list_encodings_match_and_round_trip(items: list[tuple[str, Any]]) -> None:
    encoded = codec.encode_kv_list(items)
    assert grammar.build_kv_list(items) == encoded
    want: dict[str, Any] = {}
    for key, value in items:
        want.setdefault(key, expected(value))
    for impl in (CODEC, GRAMMAR):
        assert canon(impl.parse_kv_list(encoded)) == canon(want)
    # a dict builds the same bytes as its items, in order
    as_dict = dict(reversed(items))
    assert grammar.build_kv_list(as_dict) == codec.encode_kv_list(as_dict)


@BIG
@given(message_lists)
def test_message_encodings_match_and_round_trip(messages: list[Message]) -> None:
    encoded = codec.encode_messages(messages)
    assert grammar.build_messages(messages) == encoded
    want = [expected(message) for message in messages]
    for impl in (CODEC, GRAMMAR):
        assert canon(impl.parse_messages(encoded)) == canon(want)


@VALID
@given(action_lists)
def test_action_encodings_match_and_round_trip(actions: list) -> None:
    encoded = codec.encode_actions(actions)
    assert grammar.build_actions(actions) == encoded
    want = [expected(action) for action in actions]
    for impl in (CODEC, GRAMMAR):
        assert canon(impl.parse_actions(encoded)) == canon(want)


@VALID
@given(frames())
def test_frame_encodings_match_and_round_trip(args: tuple) -> None:
    ftype, stream_id, frame_id, payload, flags = args
    encoded = codec.encode_frame(ftype, stream_id, frame_id, payload, flags)
    assert grammar.build_frame(ftype, stream_id, frame_id, payload, flags) == encoded
    assert int.from_bytes(encoded[:4], "big") == len(encoded) - 4
    for impl in (CODEC, GRAMMAR):
        frame = impl.parse_frame(encoded[4:])
        assert canon(frame) == canon(Frame(ftype, flags, stream_id, frame_id, payload))


@BIG
@given(uint64s, uint64s, message_lists, action_lists)
def test_notify_and_ack_frames_end_to_end(
    stream_id: int, frame_id: int, messages: list[Message], actions: list
) -> None:
    notify = codec.notify(stream_id, frame_id, messages)
    assert notify == grammar.build_frame(
        FrameType.NOTIFY, stream_id, frame_id, grammar.build_messages(messages)
    )
    ack = codec.ack(stream_id, frame_id, actions)
    assert ack == grammar.build_frame(
        FrameType.ACK, stream_id, frame_id, grammar.build_actions(actions)
    )
    frame = grammar.parse_frame(notify[4:])
    assert (frame.stream_id, frame.frame_id) == (stream_id, frame_id)
    assert canon(grammar.parse_messages(frame.payload)) == canon(
        [expected(message) for message in messages]
    )
    assert canon(codec.decode_actions(grammar.parse_frame(ack[4:]).payload)) == canon(
        [expected(action) for action in actions]
    )


def _varint_outcome(decode: Callable[[bytes, int], tuple[int, int]], data: bytes) -> Any:
    try:
        return decode(data, 1)
    except InvalidFrame as exc:
        return str(exc)


@settings(max_examples=examples(500), deadline=None)
@given(
    st.integers(240, 255),
    st.lists(st.integers(128, 255), max_size=11),
    st.one_of(st.none(), st.integers(0, 127)),
    st.binary(max_size=3),
)
def test_unrolled_varint_decoder_is_the_loop(
    first: int, more: list[int], last: int | None, after: bytes
) -> None:
    """decode_varint unrolls the first bytes and caches what follows; at every length, truncated
    or too long, cold or warm, it must answer what the general loop answers (value, end, or
    error), read at an offset, also for other first bytes before the same later ones."""
    data = bytes([7, first, *more]) + (bytes([last]) if last is not None else b"") + after
    for _ in range(2):
        assert _varint_outcome(decode_varint, data) == _varint_outcome(_decode_long_varint, data)
    other = bytes([7, first ^ 1, *[b ^ 1 for b in more[:2]]]) + data[4:]
    assert _varint_outcome(decode_varint, other) == _varint_outcome(_decode_long_varint, other)


@FUZZ
@given(message_lists, st.lists(values, max_size=4), st.data())
def test_payloads_repeating_runs_of_known_arguments_decode_as_the_grammar_does(
    messages: list[Message], news: list[Any], data: st.DataObject
) -> None:
    """decode_messages reuses the decoded arguments that followed an unknown one in an earlier
    message of the same name when its bytes come again. Whatever changes around them (any
    argument, as a request's id, ts or URL path do, or a cut-off or mutated copy), every
    decode, with the cache cold or warm, must still give what the grammar gives."""
    codec._RUNS.clear()
    payloads = [codec.encode_messages(messages)]
    if any(message.args for message in messages):
        at = data.draw(st.sampled_from([i for i, m in enumerate(messages) if m.args]))
        i = data.draw(st.integers(0, len(messages[at].args) - 1))
        for value in news:
            args = list(messages[at].args)
            args[i] = (args[i][0], value)
            changed = [*messages[:at], Message(messages[at].name, args), *messages[at + 1:]]
            payloads.append(codec.encode_messages(changed))
    payloads.append(data.draw(mutated(st.sampled_from(payloads))))
    for payload in payloads + payloads:
        agree("parse_messages", payload)


@VALID
@given(uint64s, st.lists(uint64s, min_size=1, max_size=4))
def test_empty_acks_with_remembered_stream_ids_are_the_grammars(
    stream_id: int, frame_ids: list[int]
) -> None:
    """codec.ack remembers each stream id's encoding (a stream's events share it): cold or
    warm, an empty ACK is byte for byte the grammar's."""
    for frame_id in frame_ids + frame_ids:
        assert codec.ack(stream_id, frame_id) == grammar.build_frame(
            FrameType.ACK, stream_id, frame_id, b""
        )
