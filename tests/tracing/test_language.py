"""The span language: what each message compiles to."""

from __future__ import annotations

import ipaddress
import marshal
import pickle
import sys
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoe_agent.protocol.types import DataType, Message, Typed
from spoe_agent.tracing import language
from spoe_agent.tracing.language import (
    OP_BAGGAGE,
    OP_CHILD_OF,
    OP_ERROR,
    OP_FINISH,
    OP_FINISH_ALL,
    OP_FOLLOWS_FROM,
    OP_INJECT,
    OP_KIND,
    OP_LOG,
    OP_SPAN,
    OP_TAG,
    Command,
    clean_str,
    parse_message,
)
from tests.support.examples import examples


def parse(*args: tuple[str, Any], stats: Counter[str] | None = None) -> Command | None:
    return parse_message(Message("m", list(args)), stats)


def ops(*args: tuple[str, Any]) -> tuple[tuple[Any, ...], ...]:
    command = parse(("id", "k"), *args)
    assert command is not None
    return command.ops


def test_reference_message_compiles_in_order() -> None:
    command = parse(
        ("id", "0af7:1"),
        ("span", "Frontend HTTP request"),
        ("follows-from", "Frontend TCP request"),
        ("tag", "http.method"),
        ("", "GET"),
        ("tag", "http.version"),
        ("", "HTTP/"),
        ("", "1.1"),
        ("finish", "Frontend TCP request"),
    )
    assert command == Command(
        key="0af7:1",
        ts_ns=None,
        service=None,
        carrier=None,
        ops=(
            (OP_SPAN, "Frontend HTTP request"),
            (OP_FOLLOWS_FROM, "Frontend TCP request"),
            (OP_TAG, "http.method", "GET"),
            (OP_TAG, "http.version", "HTTP/1.1"),
            (OP_FINISH, "Frontend TCP request"),
        ),
    )


def test_every_name_keyword() -> None:
    assert ops(
        ("span", "a"),
        ("child-of", "p"),
        ("child_of", "q"),
        ("follows_from", "r"),
        ("inject", "a"),
        ("log", "ev"),
        ("", 7),
        ("finish", "*"),
        ("finish", "a"),
    ) == (
        (OP_SPAN, "a"),
        (OP_CHILD_OF, "p"),
        (OP_CHILD_OF, "q"),
        (OP_FOLLOWS_FROM, "r"),
        (OP_INJECT, "a"),
        (OP_LOG, "ev", 7),
        (OP_FINISH, "a"),
        (OP_FINISH_ALL,),  # last, wherever the message says it: what follows it applies too
    )


def test_commands_are_plain_picklable_data() -> None:
    command = parse(
        ("id", "k"),
        ("ts", 12),
        ("service", "edge"),
        ("traceparent", "00-x"),
        ("span", "a"),
        ("kind", "client"),
        ("tag", "t"),
        ("", ipaddress.ip_address("::1")),
    )
    assert pickle.loads(pickle.dumps(command)) == command
    assert type(pickle.loads(pickle.dumps(command))) is Command


# -- the session key ----------------------------------------------------------------------------


def test_messages_without_span_arguments_are_ignored_without_counting() -> None:
    stats: Counter[str] = Counter()
    assert parse(("id", "k"), stats=stats) is None
    assert parse(("id", "k"), ("ts", 5), ("service", "x"), stats=stats) is None
    assert parse(("other", 1), stats=stats) is None
    assert stats["missing_id"] == 0


@pytest.mark.parametrize("ident", [None, "", b""])
def test_missing_or_empty_id_is_counted(ident: Any) -> None:
    stats: Counter[str] = Counter()
    args: list[tuple[str, Any]] = [("span", "a")]
    if ident is not None:
        args.insert(0, ("id", ident))
    assert parse(*args, stats=stats) is None
    stats2: Counter[str] = Counter()
    assert parse(("id", None), ("span", "a"), stats=stats2) is None
    assert stats["missing_id"] == 1 and stats2["missing_id"] == 1


@pytest.mark.parametrize(
    ("ident", "key"),
    [
        (1234, "1234"),
        (ipaddress.ip_address("10.0.0.1"), "10.0.0.1"),
        (b"ab\xff", "ab\ufffd"),
        ("x\udcffy", "x\ufffdy"),
        (True, "true"),
    ],
)
def test_id_of_any_type_is_stringified(ident: Any, key: str) -> None:
    command = parse(("id", ident), ("span", "a"))
    assert command is not None and command.key == key


def test_first_id_wins() -> None:
    command = parse(("id", "a"), ("span", "s"), ("id", "b"))
    assert command is not None and command.key == "a"


# -- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (200, 200),
        (True, True),
        (False, False),
        ("GET", "GET"),
        (ipaddress.ip_address("192.0.2.1"), "192.0.2.1"),
        (ipaddress.ip_address("2001:db8::1"), "2001:db8::1"),
        (b"caf\xc3\xa9\xff", "café\ufffd"),
        (2**64 - 1, str(2**64 - 1)),
        (-(2**63), -(2**63)),
        (Typed(DataType.UINT32, 7), 7),
    ],
)
def test_single_tag_value_keeps_its_type(value: Any, expected: Any) -> None:
    ((op, key, got),) = ops(("tag", "k"), ("", value))
    assert (op, key) == (OP_TAG, "k")
    assert got == expected and type(got) is type(expected)


def test_several_values_concatenate_as_text() -> None:
    assert ops(("tag", "k"), ("", "a"), ("", None), ("", 1), ("", True), ("", b"z")) == (
        (OP_TAG, "k", "a1truez"),
    )


def test_single_none_value_sets_nothing_and_missing_value_is_counted() -> None:
    stats: Counter[str] = Counter()
    command = parse(
        ("id", "k"),
        ("span", "s"),
        ("tag", "a"),
        ("", None),
        ("tag", "b"),
        ("log", "c"),
        stats=stats,
    )
    assert command is not None and command.ops == ((OP_SPAN, "s"),)
    assert stats["missing_value"] == 2


def test_stray_unnamed_values_are_counted() -> None:
    stats: Counter[str] = Counter()
    command = parse(("id", "k"), ("", 1), ("span", "a"), ("", 2), stats=stats)
    assert command is not None and command.ops == ((OP_SPAN, "a"),)
    assert stats["stray_value"] == 2


def test_empty_or_null_names_are_ignored_and_counted() -> None:
    stats: Counter[str] = Counter()
    command = parse(
        ("id", "k"),
        ("span", None),
        ("span", ""),
        ("finish", None),
        ("tag", ""),
        ("", "orphan value"),
        ("span", "ok"),
        stats=stats,
    )
    assert command is not None and command.ops == ((OP_SPAN, "ok"),)
    assert stats["empty_name"] == 4
    assert stats["stray_value"] == 1


@pytest.mark.parametrize("value", [None, ""])
def test_an_empty_service_is_the_agents_own_and_no_anomaly(value: object) -> None:
    """The reference config sends service=env(OTEL_SERVICE_NAME): unset in HAProxy's
    environment, every request counted an anomaly that hid real ones."""
    stats: Counter[str] = Counter()
    command = parse(("id", "k"), ("service", value), ("span", "a"), stats=stats)
    assert command is not None and command.service is None
    assert stats["empty_name"] == 0


def test_error_tag_also_sets_the_status() -> None:
    assert ops(("span", "a"), ("tag", "error"), ("", True)) == (
        (OP_SPAN, "a"),
        (OP_ERROR,),
    )
    assert ops(("tag", "error"), ("", False)) == ((OP_TAG, "error", False),)
    assert ops(("tag", "error"), ("", "true")) == ((OP_TAG, "error", "true"),)


def test_baggage_keyword_value_is_text() -> None:
    assert ops(("baggage", "n"), ("", 42)) == ((OP_BAGGAGE, "n", "42"),)
    assert ops(("baggage", "n"), ("", "a"), ("", "b")) == ((OP_BAGGAGE, "n", "ab"),)


def test_lone_surrogates_become_replacement_characters() -> None:
    command = parse(
        ("id", "k"),
        ("span", "s\udcff"),
        ("tag", "k\ud800"),
        ("", "\udcc3\udca9"),  # é as surrogate-escaped bytes: recovered
        ("traceparent", "t\udc80"),
    )
    assert command is not None
    assert command.ops == ((OP_SPAN, "s\ufffd"), (OP_TAG, "k\ufffd", "é"))
    assert command.carrier == {"traceparent": "t\ufffd"}
    for text in ("s\ufffd", "k\ufffd", "é", "t\ufffd"):
        text.encode("utf-8")


@given(st.text())
def test_clean_str_always_gives_encodable_text(text: str) -> None:
    cleaned = clean_str(text)
    cleaned.encode("utf-8")
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        assert cleaned == text


# -- extensions ---------------------------------------------------------------------------------


def test_ts_microseconds_become_nanoseconds() -> None:
    command = parse(("id", "k"), ("span", "a"), ("ts", 1_700_000_000_123_456))
    assert command is not None and command.ts_ns == 1_700_000_000_123_456_000


@pytest.mark.parametrize("ts", [True, "123", None, 0, -5])
def test_bad_ts_is_ignored_and_counted(ts: Any) -> None:
    stats: Counter[str] = Counter()
    command = parse(("id", "k"), ("ts", ts), ("span", "a"), stats=stats)
    assert command is not None and command.ts_ns is None
    assert stats["bad_ts"] == 1


def test_service() -> None:
    command = parse(("id", "k"), ("service", "edge-lb"), ("span", "a"))
    assert command is not None and command.service == "edge-lb"


@pytest.mark.parametrize(
    ("text", "value"),
    [("server", 1), ("CLIENT", 2), ("Internal", 0), ("producer", 3), ("consumer", 4)],
)
def test_kind(text: str, value: int) -> None:
    assert ops(("span", "a"), ("kind", text)) == ((OP_SPAN, "a"), (OP_KIND, value))


def test_unknown_kind_and_unknown_args_are_counted() -> None:
    stats: Counter[str] = Counter()
    command = parse(
        ("id", "k"), ("span", "a"), ("kind", "sideways"), ("colour", "blue"), stats=stats
    )
    assert command is not None and command.ops == ((OP_SPAN, "a"),)
    assert stats["bad_kind"] == 1
    assert stats["unknown_arg"] == 1


def test_another_engines_message_is_ignored_without_counting_typos() -> None:
    """A second SPOE engine (a WAF, a rate limiter) may share the agent: its messages hold no
    argument of the language, and counting theirs as typos cried wolf (black-box run)."""
    stats: Counter[str] = Counter()
    assert parse(("ip", "10.0.0.1"), ("host", "example.com"), ("", "stray"), stats=stats) is None
    assert not stats
    # An id= is no sign of ours: a WAF's messages carry unique-id too.
    assert parse(("id", "k"), ("ip", "10.0.0.1"), ("path", "/"), stats=stats) is None
    assert not stats
    assert parse(("id", "k"), ("ts", 1), ("spna", "x"), stats=stats) is None  # ours: a ts=
    assert stats["unknown_arg"] == 1


def test_the_unknown_names_counted_are_kept_for_the_warning_a_few_and_cut(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's warning names them (a count alone had a user bisect spoe.cfg); another
    engine's names are not typos of ours, and a peer cannot grow the record."""
    monkeypatch.setattr(language, "UNKNOWN_NAMES", {})
    stats: Counter[str] = Counter()
    parse(("id", "k"), ("ip", "10.0.0.1"), stats=stats)  # another engine's
    parse(("id", "k"), ("span", "a"), ("chlid-of", "b"), ("x" * 100, 1), stats=stats)
    for i in range(20):
        parse(("id", "k"), ("span", "a"), (f"typo{i}", 1), stats=stats)
    assert list(language.UNKNOWN_NAMES) == ["chlid-of", "x" * 64] + [f"typo{i}" for i in range(6)]
    assert stats["unknown_arg"] == 22


# -- propagation headers ------------------------------------------------------------------------


def test_a_header_given_again_is_joined_as_http_joins_repeated_lines() -> None:
    """spoe.cfg passes each header's first two lines (``req.fhdr(h,1)``, ``req.fhdr(h,2)``):
    a tracestate or baggage split over lines arrives whole, and two traceparents are one
    invalid value (a new trace, as W3C Trace Context asks); an absent line adds nothing."""
    command = parse(("id", "k"), ("tracestate", "a=1"), ("tracestate", "b=2"),
                    ("baggage", "k1=v1"), ("baggage", None), ("traceparent", "x"),
                    ("traceparent", "y"), ("span", "s"))
    assert command is not None and command.carrier == {
        "tracestate": "a=1,b=2", "baggage": "k1=v1", "traceparent": "x,y"}


def test_header_spellings() -> None:
    command = parse(
        ("id", "k"),
        ("traceparent", "tp"),
        ("TraceState", "ts"),
        ("x_b3_traceid", "a"),
        ("X-B3-SpanId", "b"),
        ("x-b3-parentspanid", "c"),
        ("X_B3_SAMPLED", "1"),
        ("x-b3-flags", "0"),
        ("b3", "d"),
        ("uber_trace_id", "e"),
        ("uberctx-user_id", "alice"),
        ("UBERCTX_Team", "core"),
    )
    assert command is not None
    assert command.ops == ()
    assert command.carrier == {
        "traceparent": "tp",
        "tracestate": "ts",
        "x-b3-traceid": "a",
        "x-b3-spanid": "b",
        "x-b3-parentspanid": "c",
        "x-b3-sampled": "1",
        "x-b3-flags": "0",
        "b3": "d",
        "uber-trace-id": "e",
        "uberctx-user_id": "alice",
        "uberctx-Team": "core",
    }


def test_absent_headers_still_mean_headers_were_seen() -> None:
    command = parse(("id", "k"), ("traceparent", None), ("tracestate", ""))
    assert command is not None and command.carrier == {} and command.ops == ()
    assert parse(("id", "k"), ("span", "a")).carrier is None  # type: ignore[union-attr]


def test_baggage_is_the_keyword_before_values_and_the_header_otherwise() -> None:
    command = parse(
        ("id", "k"),
        ("baggage", "haproxy_id"),
        ("", "abc"),
        ("baggage", "user=alice"),
        ("span", "a"),
    )
    assert command is not None
    assert command.ops == ((OP_BAGGAGE, "haproxy_id", "abc"), (OP_SPAN, "a"))
    assert command.carrier == {"baggage": "user=alice"}
    last = parse(("id", "k"), ("baggage", None))
    assert last is not None and last.carrier == {} and last.ops == ()
    upper = parse(("id", "k"), ("Baggage", "x=1"), ("", "ignored"))
    assert upper is not None and upper.carrier == {"baggage": "x=1"}


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["", "id", "span", "tag", "baggage", "finish", "ts", "kind", "traceparent", "x"]
            ),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.text(),
                st.binary(),
                st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
            ),
        ),
        max_size=12,
    )
)
def test_any_arguments_compile_or_are_ignored(args: list[tuple[str, Any]]) -> None:
    stats: Counter[str] = Counter()
    command = parse_message(Message("m", args), stats)
    if command is not None:
        assert command.key
        assert pickle.loads(pickle.dumps(command)) == command
        for op in command.ops:
            for item in op[1:]:
                if isinstance(item, str):
                    item.encode("utf-8")


_TAIL_ARGS = st.tuples(
    st.sampled_from(["", "id", "span", "child-of", "follows-from", "tag", "baggage", "log",
                     "finish", "ts", "kind", "service", "inject", "traceparent", "x-b3-sampled",
                     "nonsense"]),
    st.one_of(
        st.sampled_from([None, True, False, 0, 1, 2, -1, 10**20, "", "a", "*", "server", "b",
                         "\udcff", ipaddress.IPv4Address("192.0.2.1")]),
        st.integers(),
        st.text(max_size=4),
        st.builds(Typed, st.sampled_from([DataType.INT32, DataType.UINT32]), st.integers(0, 3)),
    ),
)


# Each message also comes back with True/1 and False/0 swapped: equal tails, other commands.
_TWIN = {(bool, True): 1, (int, 1): True, (bool, False): 0, (int, 0): False}


@given(st.lists(st.tuples(st.sampled_from(["k", "other", "ü"]),
                          st.one_of(st.integers(1, 3), st.integers(-1, 0), st.text(max_size=2)),
                          st.lists(_TAIL_ARGS, max_size=6)),
                min_size=1, max_size=8))
def test_cached_tails_compile_exactly_like_the_compiler(
    messages: list[tuple[str, Any, list[tuple[str, Any]]]]
) -> None:
    """parse_message answers a message starting ``id ts`` from its cache of compiled tails.
    Whatever the tail (repeated, or equal to another under ``==`` but not in type, like
    ``True`` and ``1``) and however often it comes back, the command and the counted anomalies
    must be exactly what compiling the whole message gives (compared by repr: ``True == 1``)."""
    language._TAILS.clear()
    language._MISSES.clear()
    give_up, language._GIVE_UP = language._GIVE_UP, 1 << 30  # never stop looking up here
    try:
        _compare_cached_and_compiled(messages)
    finally:
        language._GIVE_UP = give_up


def _compare_cached_and_compiled(messages: list[tuple[str, Any, list[tuple[str, Any]]]]) -> None:
    twins = [(key, ts, [(name, _TWIN.get((type(value), value), value)) for name, value in tail])
             for key, ts, tail in messages]
    for key, ts, tail in messages + twins + messages:
        _assert_parsed_as_compiled([("id", key), ("ts", ts), *tail])


def _assert_parsed_as_compiled(args: list[tuple[str, Any]]) -> None:
    """parse_message (from whatever cache) gives the compiler's command and anomaly counts
    (compared by repr: ``True == 1``)."""
    cached_stats: Counter[str] = Counter()
    compiled_stats: Counter[str] = Counter()
    cached = parse_message(Message("m", list(args)), cached_stats)
    compiled = language._compile(list(args), compiled_stats)
    assert repr(cached) == repr(compiled)
    assert cached_stats == compiled_stats


def test_a_message_whose_tails_never_repeat_stops_being_cached() -> None:
    """A URL path in every frontend message: after 16 misses in a row its name compiles
    directly (the cache stops growing), with one lookup every 1,024 messages in case its tails
    start repeating; a message that repeats is served from the cache meanwhile."""
    language._TAILS.clear()
    language._MISSES.clear()

    def message(name: str, path: str) -> Message:
        return Message(name, [("id", "k"), ("ts", 5), ("span", "s"), ("tag", "url.path"),
                              ("", path)])

    for i in range(16):
        assert parse_message(message("unique", f"/{i}")).ops[-1] == (OP_TAG, "url.path", f"/{i}")
    assert len(language._TAILS) == 16
    for i in range(16, 1024):
        assert parse_message(message("unique", f"/{i}")).ops[-1] == (OP_TAG, "url.path", f"/{i}")
    assert len(language._TAILS) == 16  # compiled directly, nothing stored
    parse_message(message("unique", "/1024"))  # the 1,024th: looked up (and stored) again
    assert len(language._TAILS) == 17
    parse_message(message("repeats", "/"))
    assert language._MISSES["repeats"] == 1
    parse_message(message("repeats", "/"))
    assert language._MISSES["repeats"] == 0 and len(language._TAILS) == 18


def test_tails_with_long_values_are_compiled_not_kept() -> None:
    """The cache holds up to 4,096 tails: one with a frame-sized value is compiled every time
    rather than kept, so the cache stays a few MB whatever HAProxy sends."""
    language._TAILS.clear()
    language._MISSES.clear()
    long_value = "x" * (language._TAIL_MAX_VALUE + 1)
    message = Message("ua", [("id", "k"), ("ts", 5), ("span", "s"), ("tag", "user_agent"),
                             ("", long_value)])
    for _ in range(2):
        assert parse_message(message).ops[-1] == (OP_TAG, "user_agent", long_value)
    assert not language._TAILS


_SHAPE_KEYWORDS = st.sampled_from(["span", "tag", "tag", "log", "baggage", "finish", "kind",
                                   "service", "traceparent", "ts", "id", "nonsense", ""])
# A keyword and the unnamed values after it (a tag's sample, or several concatenated).
_SHAPE_NAMES = st.lists(st.tuples(_SHAPE_KEYWORDS, st.sampled_from([0, 1, 1, 1, 2])),
                        min_size=1, max_size=5).map(
    lambda groups: [name for keyword, n in groups for name in [keyword] + [""] * n])
_SAMPLES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.integers(),
    st.text(max_size=3),
    st.sampled_from(["é", "\udcff", "\ue000", "\ue0001\ue000", "server", "*", "error",
                     "x" * 300]),
    st.binary(max_size=2),
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
    st.builds(Typed, st.sampled_from([DataType.INT32, DataType.UINT64]), st.integers(0, 2**64)),
)
# What fills a hole differently from the stand-in: text to clean, ints past int64, a bool.
_HOLE_SAMPLES = st.one_of(st.sampled_from(["/é", "\udcff", 2**64, -(2**63) - 1, True, "/a", 5]),
                          _SAMPLES)


@settings(max_examples=examples(300))
@given(
    names=_SHAPE_NAMES,
    rounds=st.lists(st.lists(_HOLE_SAMPLES, min_size=15, max_size=15), min_size=2, max_size=5),
    give_up=st.sampled_from([1, 1 << 30]),
)
def test_shapes_compile_exactly_like_the_compiler(
    names: list[str], rounds: list[list[Any]], give_up: int
) -> None:
    """Tails of one shape (the same arguments but for their unnamed values, like a URL path
    after ``tag=str("url.path")``) compile from the shape's entry, its holes filled with this
    message's values. Whatever the values (of any type: a bool or a Typed one is not a hole,
    non-ascii text is cleaned, an int past int64 becomes text, several values concatenate, a
    value may even look like the stand-ins a shape compiles with), whether the name was given
    up on or not, and with the named values' True/1 and False/0 twins (equal keys, other
    commands) coming next, the command and the counted anomalies are the compiler's."""
    language._TAILS.clear()
    language._MISSES.clear()
    language._SHAPES.clear()
    saved, language._GIVE_UP = language._GIVE_UP, give_up
    try:
        named = rounds[0]
        twins = [_TWIN.get((type(value), value), value) for value in named]
        for values, named_values in [(v, named) for v in rounds] + [(v, twins) for v in rounds]:
            tail = [(name, values[i] if not name else named_values[i])
                    for i, name in enumerate(names)]
            _assert_parsed_as_compiled([("id", "k"), ("ts", 7), *tail])
    finally:
        language._GIVE_UP = saved


def test_a_url_path_fills_the_shape_of_the_message_it_is_in() -> None:
    """The frontend message of the reference config carries a new path each request: its
    tails are compiled from one shape entry with a hole for each unnamed value."""
    language._TAILS.clear()
    language._MISSES.clear()
    language._SHAPES.clear()

    def message(path: Any) -> Message:
        return Message("fe", [("id", "k"), ("ts", 5), ("span", "s"), ("tag", "url.path"),
                              ("", path), ("tag", "http.request.method"), ("", "GET")])

    address = ipaddress.IPv6Address("2001:db8::1")
    expected: dict[Any, Any] = {"/\udcff": clean_str("/\udcff"), 10**20: str(10**20),
                                address: "2001:db8::1"}
    for path in ["/a", "/b", "/é", "/\udcff", 10**20, 42, address]:
        command = parse_message(message(path))
        assert command is not None
        assert command.ops[1] == (OP_TAG, "url.path", expected.get(path, path))
        assert command.ops[2] == (OP_TAG, "http.request.method", "GET")
    assert len(language._SHAPES) == 1
    (entry,) = language._SHAPES.values()
    assert entry is not None and entry[5] == ((1, 2), (2, 4))


def test_a_bool_is_no_hole() -> None:
    """``tag=str("error") bool(true)`` sets the status, where ``str("true")`` is a tag: a bool
    is part of a shape's key, not a hole a string could have compiled."""
    language._TAILS.clear()
    language._MISSES.clear()
    language._SHAPES.clear()
    saved, language._GIVE_UP = language._GIVE_UP, 1
    try:
        for value in ["yes", True, "no", True]:
            command = parse_message(Message("m", [("id", "k"), ("ts", 5), ("span", "s"),
                                                  ("tag", "error"), ("", value)]))
            assert command is not None
            assert command.ops[1] == ((OP_ERROR,) if value is True else (OP_TAG, "error", value))
    finally:
        language._GIVE_UP = saved


@pytest.mark.parametrize("values", [1, 2], ids=["a value in a hole", "two values joined"])
def test_cached_commands_hold_interned_strings_that_marshal_hands_back(values: int) -> None:
    """The workers' wire is marshal: an interned string comes back as the receiver's own copy,
    so the owner of a forwarded session keeps fewer copies of its span names and tag keys.
    (Two values joined into one tag do more than fill a hole: once its tails are given up on,
    such a message compiles every time and the owner's sharing table alone finds its strings.)"""
    # Equal strings interned already: the messages' own (equal, other) objects are not.
    span, key = (sys.intern(f"{part} {uuid.uuid4().hex}") for part in ("span", "tag"))

    def command(uid: str) -> Command:
        compiled = parse_message(Message(f"interned-{values}", [
            ("id", uid), ("ts", 1_700_000_000_000_000),
            ("span", "".join(span)), ("tag", "".join(key)), *[("", f"/{uid}")] * values,
        ]))
        assert compiled is not None
        return compiled

    commands = [command(f"req-{i}") for i in range(language._GIVE_UP + 2)]
    # The first compiled and kept whole; the last as its shape has it (its tails never repeat).
    for command_ in commands[:1] if values > 1 else (commands[0], commands[-1]):
        (_, name), (_, tag, _) = marshal.loads(marshal.dumps(command_.ops))
        assert name is command_.ops[0][1] and name == span
        assert tag is command_.ops[1][1] and tag == key
