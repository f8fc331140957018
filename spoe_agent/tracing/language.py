"""The span language: SPOE message arguments compiled into small, picklable commands.

A message is a sequence of ``name=value`` arguments, read in order: the keywords of
spoa-opentracing (``id``, ``span``, ``child-of``, ``follows-from``, ``tag``, ``baggage``, ``log``,
``finish``, with ``finish=*`` ending the session) plus ``ts`` (event time in microseconds),
``service``, ``kind``, ``inject`` and the propagation headers (``traceparent``, ``b3``,
``uber-trace-id``, ``uberctx-*``...). ``tag``, ``baggage`` and ``log`` take the unnamed arguments
after them as their value. Compiling happens apart from applying so that a command can be sent, as
plain tuples, to whichever process owns the session; nothing here touches session state.

Values from HAProxy are data only: they are converted to plain ``str``/``int``/``bool`` and
cleaned of lone surrogates (which the thrift and protobuf encoders reject, losing a whole batch),
never interpreted.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterable, MutableMapping
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, NamedTuple

from spoe_agent.protocol.codec import encode_name
from spoe_agent.protocol.types import Message, Typed
from spoe_agent.tracing.propagation import CARRIER_KEYS, UBERCTX_PREFIX

# Operation codes: the first item of each op tuple.
OP_SPAN: Final = 0  # (OP_SPAN, name): start the span, or select it if open
OP_CHILD_OF: Final = 1  # (OP_CHILD_OF, parent_name)
OP_FOLLOWS_FROM: Final = 2  # (OP_FOLLOWS_FROM, parent_name): parent and link
OP_KIND: Final = 3  # (OP_KIND, SpanKind value as int)
OP_TAG: Final = 4  # (OP_TAG, key, value)
OP_ERROR: Final = 5  # (OP_ERROR,): the selected span's status becomes ERROR
OP_BAGGAGE: Final = 6  # (OP_BAGGAGE, key, str value)
OP_LOG: Final = 7  # (OP_LOG, key, value)
OP_FINISH: Final = 8  # (OP_FINISH, name)
OP_FINISH_ALL: Final = 9  # (OP_FINISH_ALL,): end every open span and the session
OP_INJECT: Final = 10  # (OP_INJECT, name)

# SpanKind values, kept as ints so commands stay plain data.
KIND_VALUES = {"internal": 0, "server": 1, "client": 2, "producer": 3, "consumer": 4}

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class Command(NamedTuple):
    """One message's effect on one session, in argument order.

    ``carrier`` is ``None`` when the message named no propagation header, and a (possibly empty)
    dict of lowercased header names when it did: an empty dict still means "the headers were
    seen and carried no context", which lets the session fix its trace id.
    """

    key: str
    ts_ns: int | None
    service: str | None
    carrier: dict[str, str] | None
    ops: tuple[tuple[Any, ...], ...]


def has_inject(command: Command) -> bool:
    """Whether applying ``command`` answers with variables, so its ACK (or its sender, when
    forwarded to another worker) must wait for them."""
    for op in command[4]:
        if op[0] == OP_INJECT:
            return True
    return False


def ends_session(command: Command) -> bool:
    """Whether ``command`` has ``finish=*`` (compiled as its last op)."""
    ops = command[4]
    return bool(ops) and ops[-1][0] == OP_FINISH_ALL


def after_finish(commands: list[Command]) -> list[Command] | None:
    """One NOTIFY's commands without those that follow a ``finish=*`` of their own session
    (compiled as its last op), or None if there is none such."""
    finished: str | None = None
    kept: list[Command] | None = None
    for i, command in enumerate(commands):
        if command[0] == finished:
            if kept is None:
                kept = commands[:i]
            continue
        if kept is not None:
            kept.append(command)
        if ends_session(command):
            finished = command[0]
    return kept


# Argument names to codes: below _K_ID, the op the keyword compiles to.
_K_ID, _K_TS, _K_SERVICE, _K_KIND, _K_HEADER, _K_UNKNOWN = 20, 21, 22, 23, 24, 25
_ARGS: dict[str, int] = {
    "id": _K_ID,
    "span": OP_SPAN,
    "finish": OP_FINISH,
    "child-of": OP_CHILD_OF,
    "child_of": OP_CHILD_OF,
    "follows-from": OP_FOLLOWS_FROM,
    "follows_from": OP_FOLLOWS_FROM,
    "inject": OP_INJECT,
    "tag": OP_TAG,
    "log": OP_LOG,
    "baggage": OP_BAGGAGE,
    "ts": _K_TS,
    "service": _K_SERVICE,
    "kind": _K_KIND,
}
#: The argument names that compile to an inject, as SPOP writes them (the codec's own encoding).
#: A NOTIFY payload holding none of them cannot make its ACK carry variables.
INJECT_ARGS_ON_WIRE: Final = tuple(
    encode_name(name) for name, code in _ARGS.items() if code == OP_INJECT
)
# Whether an op's keyword takes the unnamed arguments after it as its value.
_TAKES_VALUES = tuple(op in (OP_TAG, OP_LOG, OP_BAGGAGE) for op in range(_K_ID))
# The exact spellings of the headers resolve without the slow path; "baggage" is a keyword
# first (see parse_message).
_HEADER_NAMES: dict[str, str] = {}
for _key in CARRIER_KEYS:
    for _alias in (_key, _key.replace("-", "_")):
        if _alias not in _ARGS:
            _ARGS[_alias] = _K_HEADER
            _HEADER_NAMES[_alias] = _key
del _key, _alias
_tuple_new = tuple.__new__
_FINISH_ALL_OP = (OP_FINISH_ALL,)
#: ``span=`` with an empty or null name: selects nothing (the registry never starts "").
_NO_SPAN_OP = (OP_SPAN, "")
_ERROR_OP = (OP_ERROR,)

_UBERCTX_LEN = len(UBERCTX_PREFIX)


def _surrogate_bytes(error: UnicodeError) -> tuple[bytes, int]:
    """Encode error handler: an escaped byte (U+DC80..U+DCFF) becomes that byte again, any
    other lone surrogate U+FFFD, so that decoding with ``replace`` recovers what was valid."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = bytearray()
    for char in error.object[error.start : error.end]:
        code = ord(char)
        out += bytes((code - 0xDC00,)) if 0xDC80 <= code <= 0xDCFF else b"\xef\xbf\xbd"
    return bytes(out), error.end


codecs.register_error("spoe_agent.surrogates", _surrogate_bytes)


def clean_str(s: str) -> str:
    """Make a string encodable as UTF-8: the protocol decodes with ``surrogateescape``, and a
    lone surrogate would make the exporter fail on the whole batch it sits in."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "spoe_agent.surrogates").decode("utf-8", "replace")


def to_text(value: Any) -> str:
    """Render a sample as text, for names, header values and concatenated tag values."""
    t = type(value)
    if t is str:
        return clean_str(value)
    if t is bytes:
        return value.decode("utf-8", "replace")
    if t is bool:
        return "true" if value else "false"
    if value is None:
        return ""
    if t is Typed:
        return to_text(value.value)
    if t is IPv4Address or t is IPv6Address:
        return _address_text(value)
    return clean_str(str(value))


# Client addresses repeat (keep-alive, the same clients all day) and the reference config tags
# each twice; ``str()`` of an address costs microseconds and a new string each time.
_ADDRESS_TEXT: dict[IPv4Address | IPv6Address, str] = {}
_ADDRESS_CACHE_SIZE = 4096


def _address_text(address: IPv4Address | IPv6Address) -> str:
    text = _ADDRESS_TEXT.get(address)
    if text is None:
        if len(_ADDRESS_TEXT) >= _ADDRESS_CACHE_SIZE:
            _ADDRESS_TEXT.clear()
        text = _ADDRESS_TEXT[address] = str(address)
    return text


def to_attribute(value: Any) -> str | int | bool | None:
    """Convert one sample to an attribute value, keeping its type where the exporters can."""
    t = type(value)
    if t is str:
        return clean_str(value)
    if t is bool:
        return value
    if t is int:
        # Jaeger and OTLP carry int64; a UINT64 beyond that is kept exact as text.
        return value if _INT64_MIN <= value <= _INT64_MAX else str(value)
    if value is None:
        return None
    if t is Typed:
        return to_attribute(value.value)
    return to_text(value)


def _header_key(name: str) -> str | None:
    """Slow path for header spellings not in the table: any case, ``_`` for ``-``."""
    low = name.lower()
    if low.startswith(UBERCTX_PREFIX) or low.startswith("uberctx_"):
        rest = name[_UBERCTX_LEN:]
        return UBERCTX_PREFIX + rest if rest else None
    low = low.replace("_", "-")
    return low if low in CARRIER_KEYS else None


#: What the compiler counts in its ``stats`` (the metrics show each, from 0).
LANGUAGE_EVENTS = (
    "bad_kind", "bad_ts", "empty_name", "missing_id", "missing_value", "stray_value",
    "unknown_arg",
)


#: The first argument names counted as ``unknown_arg`` (at most :data:`_UNKNOWN_NAMES_KEPT`,
#: each cut to 64 characters), for the agent's periodic warning to name: a count alone left a
#: user bisecting spoe.cfg for the typo.
UNKNOWN_NAMES: dict[str, None] = {}
_UNKNOWN_NAMES_KEPT = 8
#: The same for the ``kind=`` values counted as ``bad_kind`` (black-box run: the line did not
#: say which value).
BAD_KINDS: dict[str, None] = {}


def _remember(names: list[str], into: dict[str, None]) -> None:
    """Keep the first few of ``names`` met, for a log line (:data:`UNKNOWN_NAMES`)."""
    for name in names:
        if len(into) >= _UNKNOWN_NAMES_KEPT:
            return
        into[name[:64]] = None


def _count(stats: MutableMapping[str, int] | None, key: str, n: int = 1) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def _flush(
    op: int,
    key: str,
    values: list[Any],
    ops: list[tuple[Any, ...]],
    stats: MutableMapping[str, int] | None,
) -> None:
    """Turn a tag/baggage/log keyword and the unnamed values after it into one op."""
    if len(values) == 1:
        value = values[0]
        t = type(value)
        if t is str:
            if not value.isascii():
                value = clean_str(value)
        elif t is not int and t is not bool:
            value = to_attribute(value)
            if value is None:  # a failed fetch sets nothing
                return
        elif t is int and not _INT64_MIN <= value <= _INT64_MAX:
            value = str(value)
    elif values:
        value = "".join([to_text(v) for v in values])
    else:
        _count(stats, "missing_value")
        return
    if op == OP_BAGGAGE:
        if type(value) is not str:
            value = to_text(value)
    elif value is True and op == OP_TAG and key == "error":
        # The ERROR status is what OpenTelemetry means by it, and the Jaeger exporter already
        # renders it as error=true: keeping the attribute too would show the tag twice.
        ops.append(_ERROR_OP)
        return
    ops.append((op, key, value))


# Compiled message tails: what the arguments after ``id`` and ``ts`` compile to, keyed by those
# arguments. HAProxy sends a message's constant arguments (span names, tag keys, most tag values)
# as the same bytes every time, and the codec hands them over as the same (name, value) tuples,
# so most messages of a request compile exactly as last time; only id and ts always differ.
_TAILS: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_TAILS_LIMIT = 4096
_TAIL_MAX_VALUE = 256
# Messages whose tails never repeat (a URL path, a client port in them) would only pay for the
# lookup and fill the cache: after _GIVE_UP misses in a row a message name is compiled from its
# shape (below), but for one lookup every _RETRY messages (and all again once the cache is
# cleared).
_MISSES: dict[str, int] = {}
_GIVE_UP = 16
_RETRY = 1024
# Compiled shapes: a tail with its unnamed str, int and address values (the samples after
# ``tag`` and ``log``: a URL path, a client's address and port) left out, and what it compiles
# to with a hole for each. The tails that never repeat keep their shape from one request to
# the next, and filling holes costs a fraction of a compile. ``None`` marks a shape whose
# values do more than fill a hole (several concatenated, a baggage value): such tails always
# compile.
_SHAPES: dict[tuple[Any, ...], tuple[Any, ...] | None] = {}
_HOLE = object()  # a left-out value in a shape key
_HOLE_TYPES = frozenset({str, int, IPv4Address, IPv6Address})
_PROBE_MARK = "\ue000"  # in the strings that stand for left-out values while a shape compiles


def parse_message(
    message: Message, stats: MutableMapping[str, int] | None = None
) -> Command | None:
    """Compile a message, or return ``None`` when it asks nothing of a session.

    The usual message starts with ``id=<str> ts=<int>`` (the reference configuration's first
    line): its other arguments are looked up in a cache of compiled tails, so a message seen
    before costs a hash of its arguments instead of a compile. Anything else compiles.
    """
    args = message.args
    if len(args) > 2:
        first = args[0]
        second = args[1]
        if first[0] == "id" and second[0] == "ts":
            key = first[1]
            t = second[1]
            if type(key) is str and key and type(t) is int and t > 0 and key.isascii():
                name = message.name
                misses = _MISSES.get(name, 0)
                try:
                    if misses < _GIVE_UP or not misses % _RETRY:
                        tail = tuple(args[2:])
                        compiled = _TAILS.get(tail)
                        if compiled is None:
                            if len(_MISSES) >= _TAILS_LIMIT:
                                _MISSES.clear()
                            _MISSES[name] = misses + 1
                            compiled = _compile_tail(tail, key, t)
                        elif misses:
                            _MISSES[name] = 0
                    else:
                        # Given up on: counted on, and looked up again once every _RETRY.
                        _MISSES[name] = misses + 1
                        compiled = _compile_shaped(args, 2, key, t)
                except TypeError:  # an unhashable value: compile as usual
                    return _compile(args, stats)
                service, carrier, ops, ts_ns, counts = compiled
                if counts and stats is not None:
                    for name, n in counts:
                        stats[name] = stats.get(name, 0) + n
                if ops is None:
                    return None
                return _tuple_new(Command, (
                    key, t * 1000 if ts_ns is None else ts_ns, service,
                    None if carrier is None else dict(carrier), ops,
                ))
    return _compile(args, stats)


def _compile_tail(tail: tuple[Any, ...], key: str, t: int) -> tuple[Any, ...]:
    """Compile ``id=key ts=t`` + ``tail`` and keep what does not depend on key and t.

    Only ``_keepable`` tails are kept: ``bool(true)`` and ``int(1)``, equal as keys, compile
    differently, and the cache's memory must stay small.
    """
    compiled = _compile_shaped(tail, 0, key, t)
    if not _keepable(tail):
        return compiled
    if len(_TAILS) >= _TAILS_LIMIT:
        _TAILS.clear()
        _MISSES.clear()
    service, carrier, ops, ts_ns, counts = compiled
    compiled = (_intern(service), carrier, _interned(ops), ts_ns, counts)
    _TAILS[tail] = compiled
    return compiled


def _intern(text: str | None) -> str | None:
    return sys.intern(text) if type(text) is str and _PROBE_MARK not in text else text


def _interned(ops: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """Cached ops with their strings interned (a hole's stand-in aside).

    With ``--workers``, a command forwarded to its session's owner crosses the wire with
    ``marshal``, which makes every string anew except an interned one: that comes back as the
    owner's own interned copy. The owner's sharing table (``workers.router.command_of``)
    catches the rest, but with these strings interned the owner keeps less per forwarded
    session (in-process, 1,975 -> 1,912 B; the real agent with two workers, 1,960 -> 1,934 B
    of RSS). Only what the caches keep is interned: a request's own values (ids, paths) would
    fill the interpreter's table.
    """
    if ops is None:
        return None
    return tuple([tuple([_intern(x) if type(x) is str else x for x in op]) for op in ops])


def _keepable(pairs: Any) -> bool:
    """Whether a cache may key on these arguments: no bool and no int 0 or 1 (``True == 1``,
    with equal hashes), no value over _TAIL_MAX_VALUE (memory: 4096 entries of frame-sized
    values would be ~64 MB)."""
    for _, value in pairs:
        if value is True or value is False or (type(value) is int and 0 <= value <= 1):
            return False
        if (type(value) is str or type(value) is bytes) and len(value) > _TAIL_MAX_VALUE:
            return False
    return True


def _compile_shaped(args: Any, start: int, key: str, t: int) -> tuple[Any, ...]:
    """What ``id=key ts=t`` + ``args[start:]`` compiles to, from its shape if seen before.

    The values that may differ between tails of one shape are their unnamed str, int and
    address ones. A hole holds the one value of a ``tag`` or ``log``, which compiles to that
    value itself (as ``_flush`` has it: text cleaned when not ascii, an int beyond int64 or an
    address as text), whatever else the message holds; the rest is the shape's.
    """
    shape = tuple([
        _HOLE if not pair[0] and type(pair[1]) in _HOLE_TYPES else pair for pair in args[start:]
    ])
    entry: Any = _SHAPES.get(shape, _HOLE)  # _HOLE: not seen yet (None is an entry)
    if entry is _HOLE:
        entry = _compile_shape(args[start:], shape)
    if entry is None:
        return _compile_tail_args(args[start:], key, t)
    service, carrier, ops, ts_ns, counts, holes = entry
    if holes:
        filled = list(ops)
        for op_index, arg_index in holes:
            value = args[start + arg_index][1]
            kind = type(value)
            if kind is str:
                if not value.isascii():
                    value = clean_str(value)
            elif kind is int:
                if not _INT64_MIN <= value <= _INT64_MAX:
                    value = str(value)
            else:
                value = _address_text(value)
            op = filled[op_index]
            filled[op_index] = (op[0], op[1], value)
        ops = tuple(filled)
    return service, carrier, ops, ts_ns, counts


def _compile_tail_args(tail: Any, key: str, t: int) -> tuple[Any, ...]:
    """The compiler's answer for ``id=key ts=t`` + ``tail``, less what depends on key and t."""
    counts: dict[str, int] = {}
    command = _compile([("id", key), ("ts", t), *tail], counts)
    if command is None:
        return (None, None, None, None, tuple(counts.items()))
    return (command.service, command.carrier, command.ops, _tail_ts(tail), tuple(counts.items()))


def _compile_shape(tail: Any, shape: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Compile a shape with a marked stand-in string in each hole, and keep where each landed.

    A stand-in found whole as the value of a tag or log op is that op's hole. One found anywhere
    else (several values concatenated, a baggage value), or a marked string from the message
    itself, means the values do more than fill holes: the shape is kept as ``None``. A shape
    whose other values are not ``_keepable`` is not kept.
    """
    probe: list[tuple[str, Any]] = []
    stand_ins: dict[int, int] = {}  # id(stand-in) -> its argument's index in the tail
    for index, pair in enumerate(tail):
        if shape[index] is _HOLE:
            stand_in = f"{_PROBE_MARK}{index}{_PROBE_MARK}"
            stand_ins[id(stand_in)] = index
            probe.append(("", stand_in))
        else:
            probe.append(pair)
    # The key and ts only need to be valid: what depends on them is not part of the entry.
    service, carrier, ops, ts_ns, counts = _compile_tail_args(probe, "k", 1)
    holes: list[tuple[int, int]] = []
    mixed = any(_PROBE_MARK in text for text in [service, *(carrier or {}).values()] if text)
    for op_index, op in enumerate(ops or ()):
        for item_index, item in enumerate(op):
            if type(item) is str and _PROBE_MARK in item:
                if (item_index == 2 and (op[0] == OP_TAG or op[0] == OP_LOG)
                        and id(item) in stand_ins):
                    holes.append((op_index, stand_ins[id(item)]))
                else:
                    mixed = True
    if mixed:
        entry = None
    else:
        entry = (_intern(service), carrier, _interned(ops), ts_ns, counts, tuple(holes))
    if not _keepable(pair for pair in shape if pair is not _HOLE):
        return entry
    if len(_SHAPES) >= _TAILS_LIMIT:
        _SHAPES.clear()
    _SHAPES[shape] = entry
    return entry


def _tail_ts(tail: Iterable[tuple[str, Any]]) -> int | None:
    """The ts a tail sets by itself: its last valid one (an invalid one leaves the first)."""
    ts_ns = None
    for name, value in tail:
        if name == "ts" and type(value) is int and value > 0:
            ts_ns = value * 1000
    return ts_ns


def _compile(
    args: list[tuple[str, Any]], stats: MutableMapping[str, int] | None
) -> Command | None:
    """The compiler itself, argument by argument.

    Anomalies (a missing id, unknown argument names, stray unnamed values, bad names...) are
    counted in ``stats`` when given, and otherwise skipped: a configuration mistake must cost
    spans, never the agent.

    ``baggage`` is both a keyword and the W3C header: followed by unnamed values it is the
    keyword (``baggage=str("k") unique-id``), otherwise the header (``baggage=req.hdr(baggage)``).

    A message with no argument of the language at all is another SPOE engine's (a WAF's, a
    rate limiter's, sharing this agent): it is ignored, and its arguments are not counted as
    typos of ours.
    """
    counted = stats
    stats = None if counted is None else {}
    n = len(args)
    key: str | None = None
    ts_ns: int | None = None
    service: str | None = None
    carrier: dict[str, str] | None = None
    ops: list[tuple[Any, ...]] = []
    pending = -1  # the tag/baggage/log op collecting the unnamed values after it
    pending_key = ""
    values: list[Any] = []
    bad_name = 0
    unknown: list[str] | None = None
    # finish=str("*") takes effect once the rest of its message is applied: what a message
    # says after it (a last tag, a span ended by name) was dropped without a word.
    finish_all = False
    i = 0
    lookup = _ARGS.get
    for name, value in args:
        i += 1
        if not name:
            if pending >= 0:
                values.append(value)
            else:
                _count(stats, "stray_value")
            continue
        if pending >= 0:
            _flush(pending, pending_key, values, ops, stats)
            values = []
            pending = -1
        code = lookup(name, _K_UNKNOWN)
        if code < _K_ID and (code != OP_BAGGAGE or (i < n and not args[i][0])):
            # A keyword whose value is a name: ascii strings are the fast path.
            if type(value) is str and value:
                if not value.isascii():
                    value = clean_str(value)
            else:
                value = to_text(value)
                if not value:
                    bad_name += 1
                    if code == OP_SPAN and ops:
                        # No span selected, rather than the previous one: what follows
                        # (tags, kind...) was not meant for it (the registry counts it).
                        ops.append(_NO_SPAN_OP)
                    continue
            if _TAKES_VALUES[code]:
                pending = code
                pending_key = value
            elif code == OP_FINISH and value == "*":
                finish_all = True
            else:
                ops.append((code, value))
        elif code == _K_ID:
            if key is None and value is not None:
                key = value if type(value) is str else to_text(value)
        elif code == _K_TS:
            if type(value) is int and value > 0:
                ts_ns = value * 1000
            else:
                _count(stats, "bad_ts")
        elif code == _K_HEADER or code == _K_UNKNOWN or code == OP_BAGGAGE:
            # OP_BAGGAGE here: "baggage" with no value after it is the W3C header.
            header = _HEADER_NAMES.get(name) or _header_key(name)
            if header is None:
                _count(stats, "unknown_arg")
                if unknown is None:
                    unknown = [name]
                else:
                    unknown.append(name)
                continue
            if carrier is None:
                carrier = {}
            if value is not None:
                text = to_text(value)
                if text:
                    # A header given again (``req.fhdr(tracestate,1)``, then ``,2``) is joined
                    # as HTTP joins repeated lines (RFC 9110, 5.3): W3C tracestate and baggage
                    # may be split over lines, and two traceparents make an invalid one, so a
                    # new trace, as W3C Trace Context asks.
                    before = carrier.get(header)
                    carrier[header] = text if before is None else before + "," + text
        else:
            text = to_text(value)
            if not text:
                # An empty service= is the agent's own service name (the reference config
                # sends env(OTEL_SERVICE_NAME), empty when HAProxy's is unset): not an anomaly.
                if code != _K_SERVICE:
                    bad_name += 1
            elif code == _K_SERVICE:
                service = text
            else:
                kind = KIND_VALUES.get(text.lower())
                if kind is None:
                    _count(stats, "bad_kind")
                    _remember([text], BAD_KINDS)
                else:
                    ops.append((OP_KIND, kind))
    if pending >= 0:
        _flush(pending, pending_key, values, ops, stats)
    if finish_all:
        ops.append(_FINISH_ALL_OP)
    if bad_name:
        _count(stats, "empty_name", bad_name)
    # An id= alone does not make a message ours: other engines send unique-id too (a WAF's,
    # such as coraza-spoa's examples).
    if stats and counted is not None and (
            ops or carrier is not None or ts_ns is not None or service is not None):
        for event, times in stats.items():
            counted[event] = counted.get(event, 0) + times
        if unknown is not None:
            _remember(unknown, UNKNOWN_NAMES)

    if not ops and carrier is None:
        return None
    if not key:
        _count(counted, "missing_id")
        return None
    if not key.isascii():
        key = clean_str(key)
    # tuple.__new__ skips the NamedTuple's Python-level __new__: half the cost, same object.
    return _tuple_new(Command, (key, ts_ns, service, carrier, tuple(ops)))
