"""The decoded-argument cache of ``codec.decode_messages``: same results, bounded size.

test_differential.py proves the decoder equal to the grammar on arbitrary input (the cache is
warm and cold by turns there); this checks what it cannot: what a peer sending ever new
arguments costs in memory, and that a hit is indistinguishable from a miss.
"""

from __future__ import annotations

from spoe_agent.protocol import codec, varint
from spoe_agent.protocol.types import Message


def _payload(i: int) -> bytes:
    return codec.encode_messages(
        [
            Message(
                f"msg-{i % 7}",
                [("id", f"uid-{i}"), ("span", "constant"), ("", i % 300), ("h", None), ("", "")],
            )
        ]
    )


def test_hits_and_misses_decode_the_same() -> None:
    codec._PAIRS.clear()
    codec._NAMES.clear()
    cold = codec.decode_messages(_payload(1))
    warm = codec.decode_messages(_payload(1))
    assert cold == warm == [
        Message("msg-1", [("id", "uid-1"), ("span", "constant"), ("", 1), ("h", None), ("", "")])
    ]
    assert [type(v) for _, v in warm[0].args] == [str, str, int, type(None), str]


def test_the_caches_stay_bounded_whatever_the_peer_sends() -> None:
    for i in range(3 * codec._PAIRS_LIMIT):
        codec.decode_messages(_payload(i))
        assert len(codec._PAIRS) <= codec._PAIRS_LIMIT
        assert len(codec._NAMES) <= codec._NAMES_LIMIT
    long_value = codec.encode_messages([Message("m", [("k", "x" * 200)])])
    codec._PAIRS.clear()
    assert codec.decode_messages(long_value)[0].args == [("k", "x" * 200)]
    assert not codec._PAIRS  # too long to be worth keeping


def test_the_varint_tail_cache_stays_bounded() -> None:
    for i in range(3 * varint._TAILS_LIMIT):
        value = (1 << 50) + (i << 18) + i
        assert varint.decode_varint(varint.encode_varint(value) + b"x", 0) == (value, 8)
        assert len(varint._TAILS) <= varint._TAILS_LIMIT


def test_runs_of_known_arguments_decode_as_walked_and_stay_bounded() -> None:
    """A run is reused after an unknown argument (the id here) only where its bytes come again;
    a message with another argument changed in the middle of the run decodes that change."""
    codec._RUNS.clear()
    for i in range(2 * codec._RUNS_LIMIT + 10):
        args = [("id", f"uid-{i}"), ("span", "constant"), ("tag", "k"), ("", "v"), ("x", None)]
        if i % 3 == 0:
            args[3] = ("", f"changed-{i % 9}")
        message = Message(f"msg-{i % 5000}", args)
        assert codec.decode_messages(codec.encode_messages([message, message])) == [
            message, message
        ]
        assert len(codec._RUNS) <= codec._RUNS_LIMIT
