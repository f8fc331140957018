"""Open tracing sessions, keyed by HAProxy's unique-id, and the spans they become.

HAProxy reports a stream as a series of events; each compiled :class:`Command` starts, selects,
annotates and ends named spans of one session. Spans are kept as small records rather than SDK
spans because most of a session's life happens before its trace id is known: HAProxy sees the
request headers (and so the incoming trace context) only after the root span has started.
Span ids are assigned at start; the trace id and the sampling decision are fixed lazily, when
the headers arrive, at the first inject or at the session's end, and only then are finished
spans handed to ``emit``: as :class:`SpanRecord` tuples for an exporter that reads them (the
Jaeger one), as SDK :class:`ReadableSpan` objects for any other.

Sessions whose end HAProxy never reports (aborted streams, a restarted HAProxy, a lost
connection) are ended by TTL or by the session cap; their open spans are emitted marked
incomplete, so nothing leaks and nothing is emitted twice.
"""

from __future__ import annotations

import inspect
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Final, NamedTuple

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.trace.status import Status, StatusCode

from spoe_agent import __version__
from spoe_agent.protocol.types import Scope, SetVar
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
)
from spoe_agent.tracing.propagation import extract_context, inject_vars

INCOMPLETE_ATTRIBUTE = "haproxy.span.incomplete"
# On every span of a session whose first message already named spans it does not have: the
# agent came in the middle of the stream (it restarted, or HAProxy's earlier events went to
# another agent), and the trace is a fragment.
PARTIAL_ATTRIBUTE = "haproxy.session.partial"

# Bounds on what one span or session may accumulate, whatever HAProxy sends.
_MAX_ITEMS_PER_SPAN: Final = 128
_MAX_ATTR_SLOTS: Final = 2 * _MAX_ITEMS_PER_SPAN  # a span's tags are kept as a flat key, value list
#: How far a message's ts may be from the agent's clock (HAProxy's events wait seconds at
#: most; a wrong unit is decades off).
_TS_WINDOW_NS: Final = 3600 * 1_000_000_000
_MAX_BAGGAGE_ITEMS: Final = 64
_MAX_CACHED_RESOURCES: Final = 256

# The language's kind numbers (KIND_VALUES) index this; so does a SpanRecord's ``kind``.
SPAN_KINDS = (
    SpanKind.INTERNAL, SpanKind.SERVER, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER
)
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_EMPTY_TRACE_STATE: Final = TraceState()
_ID_LIMIT: Final = 1 << 64
_TRACE_ID_LIMIT: Final = 1 << 128
_UNSET_STATUS: Final = Status(StatusCode.UNSET)
_ERROR_STATUS: Final = Status(StatusCode.ERROR)
_EMPTY_CONTEXT: Final = Context()
_SCOPE: Final = InstrumentationScope("spoe_agent", __version__)
_CREATING_OPS: Final = frozenset({OP_SPAN, OP_BAGGAGE})


def _span_context_factory() -> Callable[[int, int, TraceFlags, TraceState], SpanContext]:
    """A constructor for local span contexts without ``SpanContext``'s validation.

    The ids are ours (checked when generated) or come from a context the propagator already
    validated, and building ten contexts per request through the validating constructor costs
    a tenth of the per-request budget. The layout is checked against the real constructor at
    import, falling back to it if a future API release changes the tuple.
    """
    state = TraceState()
    reference = SpanContext(1, 2, False, _SAMPLED, state)

    def fast(trace_id: int, span_id: int, flags: TraceFlags, trace_state: TraceState):
        return _tuple_new(SpanContext, (trace_id, span_id, False, flags, trace_state, True))

    def slow(trace_id: int, span_id: int, flags: TraceFlags, trace_state: TraceState):
        return SpanContext(trace_id, span_id, False, flags, trace_state)

    try:
        candidate = fast(1, 2, _SAMPLED, state)
        if tuple(candidate) == tuple(reference) and (
            candidate.trace_id,
            candidate.span_id,
            candidate.is_remote,
            candidate.trace_flags,
            candidate.trace_state,
            candidate.is_valid,
        ) == (1, 2, False, _SAMPLED, state, True):
            return fast
    except Exception:  # pragma: no cover - depends on the installed API
        pass
    return slow  # pragma: no cover


_tuple_new: Final = tuple.__new__
#: ``max_open_bytes`` counts in units of 1 << 6 = 64 bytes.
_UNIT_SHIFT: Final = 6
_UNIT: Final = 1 << _UNIT_SHIFT
_MAX_PARENT_WALK: Final = 1024
_new_context: Final = _span_context_factory()


def _descends(span: _Span, ancestor: _Span) -> bool:
    """Whether ``span`` is ``ancestor`` or below it: made its parent, a cycle. (Bounded: a
    configuration's own child-of lines may already have closed one.)"""
    node: _Span | None = span
    for _ in range(_MAX_PARENT_WALK):
        if node is None:
            return False
        if node is ancestor:
            return True
        node = node.parent
    return True


def _remote_context(
    trace_id: int, span_id: int, flags: TraceFlags, trace_state: TraceState
) -> SpanContext:
    """The incoming parent again: rebuilt for a ReadableSpan (rare: the SDK exporters' path), or
    to be handed on as it came (``pass_through``)."""
    return SpanContext(trace_id, span_id, True, flags, trace_state)
# ReadableSpan's parameters, in order: passing them positionally halves its construction cost.
_POSITIONAL_READABLE_SPAN = list(inspect.signature(ReadableSpan.__init__).parameters)[1:14] == [
    "name",
    "context",
    "parent",
    "resource",
    "attributes",
    "events",
    "links",
    "kind",
    "instrumentation_info",
    "status",
    "start_time",
    "end_time",
    "instrumentation_scope",
]

# The counters `stats` always holds, so exported metrics exist before the first anomaly.
STAT_KEYS = (
    "sessions_started",
    "sessions_finished",
    "sessions_evicted_ttl",
    "sessions_evicted_cap",
    "sessions_closed",
    "sessions_partial",
    "service_conflict",
    "spans_started",
    "spans_emitted",
    "spans_incomplete",
    "unknown_session",
    "late_message",
    "unknown_parent",
    "parent_loop",
    "unknown_span",
    "inject_unknown",
    "no_span_selected",
    "span_ended",
    "span_limit",
    "item_limit",
    "value_truncated",
    "open_bytes",
    "late_carrier",
    "after_finish",
    "bad_ts",
    "extract_error",
    "inject_error",
    "sampler_error",
    "emit_error",
)


class SpanRecord(NamedTuple):
    """An ended span as the registry holds it, for an exporter that reads it directly.

    The SDK's ``ReadableSpan`` needs three ``SpanContext`` objects, ``Link`` and ``Event``
    objects per span, which the exporter then takes apart again; an exporter that declares
    ``accepts_span_records`` (the Jaeger one) gets this tuple instead, built in a fraction of
    the time. It describes exactly the span the ``ReadableSpan`` path would: same trace and
    span ids, the parent's span id (0 for a root without remote parent), the follows-from
    targets' span ids (same trace), ``events`` as (name, value, time) with the value also the
    event's only attribute, ``status`` ``None`` for UNSET.
    """

    name: str
    trace_id: int
    span_id: int
    parent_id: int
    flags: int
    kind: int  # index into SPAN_KINDS
    attrs: dict[str, Any] | None
    events: list[tuple[str, Any, int]] | None
    link_ids: tuple[int, ...] | None
    status: Status | None
    start_ns: int
    end_ns: int
    resource: Resource
    scope: InstrumentationScope


def _attr_dict(pairs: list[Any]) -> dict[str, Any]:
    """Fold a span's flat ``[key, value, ...]`` tags into attributes: the last value of a
    repeated key wins, at the key's first position, exactly as dict assignment would."""
    it = iter(pairs)
    return dict(zip(it, it, strict=True))


def _events(events: list[tuple[str, Any, int]], epoch_ns: int) -> tuple[Event, ...]:
    # The Jaeger translator reads ``event.attributes.dropped``: BoundedAttributes it must be.
    return tuple(
        [
            Event(key, BoundedAttributes(attributes={key: value}), ts + epoch_ns)
            for key, value, ts in events
        ]
    )


class _Extra:
    """What few spans have: an error status, log events."""

    __slots__ = ("status", "events")

    def __init__(self) -> None:
        self.status: Status | None = None
        self.events: list[tuple[str, Any, int]] | None = None


class _Span:
    """A span of a session; ``parent`` and ``links`` point at records of the same session.

    Every open session holds several, so each field is paid for (the object is 96 B with eight
    slots, 112 B with nine or ten):

    * ``span_id`` is 0 until something needs it (the span's emission, a child's or a
      follower's, an inject): a 64-bit int costs 48 B, and a slow request's open spans mostly
      need none before they end;
    * ``links`` is the one span it follows from (the rule: a tuple of one would cost 48 B
      more), or a tuple of several;
    * ``start_ns`` is ``None`` once the span ended: it was emitted then, or waits in its
      session's ``pending`` list with its start and end;
    * ``extra`` holds the rare rest (:class:`_Extra`).
    """

    __slots__ = ("name", "span_id", "parent", "links", "kind", "attrs", "start_ns", "extra")

    def __init__(self, name: str, start_ns: int) -> None:
        self.name = name
        self.span_id = 0
        self.parent: _Span | None = None
        self.links: _Span | tuple[_Span, ...] | None = None
        self.kind = 0
        # Tags as a flat [key, value, ...] list, folded into a dict when the span is emitted:
        # the root span's eleven reference tags cost 248 B this way, 464 B as a dict.
        self.attrs: list[Any] | None = None
        self.start_ns: int | None = start_ns
        self.extra: _Extra | None = None

    def more(self) -> _Extra:
        extra = self.extra
        if extra is None:
            extra = self.extra = _Extra()
        return extra


class _Session:
    """One HAProxy stream: its spans by name (the latest record of each) and its trace context.

    ``trace_id is None`` means the context is not fixed yet; ended spans then wait in
    ``pending``, each with its start and end. Once fixed, an ended span has been emitted (or
    dropped, if unsampled).
    """

    __slots__ = (
        "key",
        "spans",
        "started",
        "last_ns",
        "last_t",
        "first",
        "partial",
        "service",
        "trace_id",
        "sampled",
        "flags",
        "trace_state",
        "remote_id",
        "remote_flags",
        "baggage",
        "pending",
        "resource",
        "held",
    )

    def __init__(self, key: str, now_ns: int) -> None:
        self.key = key
        # What its names and values were charged against ``max_open_bytes``, in units of
        # 64 bytes (a usual session's stays a small int, which costs no object of its own).
        self.held = 0
        self.spans: dict[str, _Span] = {}
        self.started = 0
        self.last_ns = now_ns  # the latest event, on the TTL's (monotonic) clock: what it counts from
        self.last_t = now_ns  # the latest event's own time (its ts=): where a cut span ends
        self.first: _Span | None = None  # the first span started: where orphans hang
        self.partial = False  # PARTIAL_ATTRIBUTE
        self.service: str | None = None
        self.trace_id: int | None = None
        self.sampled: bool | None = None
        self.flags = _NOT_SAMPLED
        self.trace_state = _EMPTY_TRACE_STATE
        # The incoming parent, as the two numbers emission needs: a SpanContext kept per open
        # session costs ~160 B more (its tuple, TraceFlags object and span id).
        self.remote_id = 0
        self.remote_flags = 0
        self.baggage: dict[str, str] | None = None
        self.pending: list[tuple[_Span, int, int]] | None = None
        self.resource: Resource | None = None  # resolved at the first emission


class SessionRegistry:
    """Applies commands to sessions and emits their spans (records or SDK spans: see above).

    All methods are pure Python with no I/O and no blocking call, so under gevent each call runs
    atomically with respect to other greenlets and no lock is needed; ``emit``, ``propagator``,
    ``sampler`` and ``resource_for_service`` must not block or yield either (a span processor's
    ``on_end`` that only enqueues is fine).
    """

    def __init__(
        self,
        emit: Callable[[Any], None],
        *,
        propagator: TextMapPropagator,
        sampler: Sampler,
        id_generator: IdGenerator | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        ttl_clock_ns: Callable[[], int] | None = None,
        ttl_s: float = 30.0,
        max_sessions: int = 100_000,
        resource_for_service: Callable[[str], Resource],
        default_service: str,
        max_spans_per_session: int = 64,
        max_attr_len: int = 4096,
        span_records: bool = False,
        pass_through: bool = False,
        max_open_bytes: int = 256 << 20,
    ) -> None:
        """``span_records`` makes ``emit`` receive :class:`SpanRecord` tuples rather than SDK
        ``ReadableSpan`` objects: only for an exporter that declares ``accepts_span_records``.

        ``pass_through`` is for a disabled SDK (``OTEL_SDK_DISABLED=true``): an inject then hands
        on the context that came in, as OpenTelemetry's API does without an SDK, and no trace
        context when none came (baggage still). The spans' own ids would name parents that no
        backend ever receives: the services' spans would hang under a missing span instead of
        under the client's.

        ``max_open_bytes`` bounds what the open sessions' span names, tags, logs and baggage
        may hold all together (roughly: each item counts 64 bytes and its text): the counts
        alone (sessions, spans, items, value length) allowed gigabytes, which a peer sending
        long values filled at 200 MB a second (black-box run). Past it, new tags, logs and
        baggage are dropped and counted (``open_bytes``); spans an eighth later, so that
        traces keep their shape."""
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._emit = emit
        self._records = span_records
        # Chosen once, as an attribute rather than by rebinding a method, which a class
        # compiled with mypyc (see setup.py) does not allow.
        self._emit_span: Callable[[_Session, _Span, int, int], None] = (
            self._emit_record if span_records else self._emit_readable
        )
        self._propagator = propagator
        self._pass_through = pass_through
        #: Units of 64 bytes the open sessions may still take (``max_open_bytes`` less what
        #: they hold; spans may go an eighth, ``_span_slack``, below zero).
        self._room = max(1, max_open_bytes >> _UNIT_SHIFT)
        self._span_slack = self._room >> 3
        self._sampler = sampler
        self._span_id: Callable[[], int]
        self._trace_id: Callable[[], int]
        if id_generator is None:
            # RandomIdGenerator's draws without its method call (zero is redrawn in _start).
            self._span_id = partial(random.getrandbits, 64)
            self._trace_id = partial(random.getrandbits, 128)
        else:
            self._span_id = id_generator.generate_span_id
            self._trace_id = id_generator.generate_trace_id
        self._clock_ns = clock_ns
        # Times are kept as nanoseconds since this epoch: today's time_ns() is a 61-bit int
        # (48 B), an offset from the agent's start a 32 B one, for every span start and every
        # session's last activity. Emission adds the epoch back.
        self._epoch_ns = clock_ns()
        # The TTL counts on the monotonic clock: on the wall clock, stepped back (NTP, a VM
        # resumed) nothing expired until it caught up, and stepped forward past the TTL every
        # open session was cut at once (code review). A test's fake clock serves for both.
        if ttl_clock_ns is None:
            ttl_clock_ns = time.monotonic_ns if clock_ns is time.time_ns else clock_ns
        self._ttl_clock_ns = ttl_clock_ns
        self._ttl_epoch_ns = ttl_clock_ns()
        # One clock read per message, not two: the wall time of an event without ts= is the
        # TTL clock's plus this offset, which expire() (every second at most) sets again, so
        # it follows a step of the wall clock within that.
        self._wall_offset_ns = 0
        self._sync_wall_clock()
        self._ttl_ns = int(ttl_s * 1e9)
        self._max_sessions = max_sessions
        self._resource_for_service = resource_for_service
        self._default_service = default_service
        self._max_spans = max_spans_per_session
        self._max_attr_len = max_attr_len
        self._resources: dict[str, Resource] = {}
        self._incomplete: dict[str, Status] = {}
        # Least recently active first: expiry scans from the front and stops at a live one.
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        # Keys of sessions ended by TTL or cap, with when: the rest of such a stream (a slow
        # response, a long websocket) must not come back as an orphan trace. Not those of
        # finish=*: a key may be used again on purpose (a per-connection id over keep-alive).
        self._evicted: OrderedDict[str, int] = OrderedDict()
        self.stats: Counter[str] = Counter(dict.fromkeys(STAT_KEYS, 0))
        #: The services of the last ``service_conflict``: (the session's, the message's).
        self.last_conflict: tuple[str, str] | None = None
        #: The span name of the last ``inject_unknown`` (a typo costs the next hop its
        #: context), and of the last ``unknown_span`` or ``unknown_parent``, for the log lines.
        self.last_named: dict[str, str] = {}
        #: Called with the key of every session this registry no longer answers for: at its
        #: ``finish=*`` or close, and for one ended by TTL or cap once its key is forgotten
        #: (until then, the rest of its stream must come here, to be counted as late). With
        #: ``--workers``, the peers that route its events here learn that they can stop.
        self.on_end: Callable[[str], None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: object) -> bool:
        return key in self._sessions

    def keys(self) -> list[str]:
        """The open sessions' keys and the evicted ones still remembered: what this registry
        answers for."""
        return [*self._sessions, *self._evicted]

    def remembers(self, key: str) -> bool:
        """Whether ``key`` is a session ended by TTL or cap whose late events are still
        expected (and counted as ``late_message``)."""
        return key in self._evicted

    # -- commands -------------------------------------------------------------------------------

    def apply(self, command: Command) -> list[SetVar]:
        """Apply one compiled message to its session; return the variables its injects set."""
        key, ts_ns, service, carrier, ops = command
        sessions = self._sessions
        active = self._ttl_clock_ns() - self._ttl_epoch_ns
        now = active + self._wall_offset_ns
        t = now
        if ts_ns:
            t = ts_ns - self._epoch_ns
            if not -_TS_WINDOW_NS < t - now < _TS_WINDOW_NS:
                # Seconds or milliseconds where microseconds are due (1970), or a date past
                # what an exporter can encode (one such span fails its whole batch): the
                # arrival time instead, counted.
                self.stats["bad_ts"] += 1
                t = now
        session = sessions.get(key)
        created = session is None
        if session is None:
            if key in self._evicted:
                self.stats["late_message"] += 1
                return []
            if carrier is None and not any(op[0] in _CREATING_OPS for op in ops):
                # Only ends or annotations for a session that is gone (or never started).
                self.stats["unknown_session"] += 1
                return []
            session = self._new_session(key, active)
        else:
            sessions.move_to_end(key)
            session.last_ns = active
        session.last_t = t
        if service and service != session.service:
            if session.service is not None:
                # One stream names one service: two mean two HAProxies sent the same session
                # key (a request id passed from hop to hop used as unique-id), and their spans
                # are being merged into one broken tree. Counted and named, as nothing else
                # would say it (black-box run: 4,752 of 4,752 traces broken, silently).
                self.stats["service_conflict"] += 1
                self.last_conflict = (session.service, service)
            session.service = service
            session.resource = None
        if carrier is not None:
            self._on_carrier(session, carrier)

        out: list[SetVar] = []
        spans = session.spans
        sel: _Span | None = None
        max_len = self._max_attr_len
        # What the open sessions may still take (units of 64 bytes): counted down here, and
        # what was taken written back at the end, for the registry and for this session
        # (``_start`` charges a long span name directly).
        room = start_room = self._room
        full = room <= 0  # once per command: one may go past the bound by its own size
        for op in ops:
            code: int = op[0]
            if code == OP_TAG:  # the most frequent op first (16 of a reference request's 48)
                if sel is None:
                    self.stats["no_span_selected"] += 1
                elif sel.start_ns is None and session.trace_id is not None:
                    self.stats["span_ended"] += 1
                elif full:
                    self.stats["open_bytes"] += 1
                elif session.sampled is not False:
                    attrs = sel.attrs
                    value = op[2]
                    room -= 1 + (len(op[1]) >> _UNIT_SHIFT)  # a peer's keys are its own too
                    if type(value) is str:
                        size = len(value)
                        if size >= _UNIT:
                            room -= (size if size <= max_len else max_len) >> _UNIT_SHIFT
                    else:
                        size = 0
                    if attrs is not None and len(attrs) < _MAX_ATTR_SLOTS and size <= max_len:
                        attrs.append(op[1])  # _set_attr's common case, inlined
                        attrs.append(value)
                    else:
                        self._set_attr(sel, op[1], value)
                continue
            if code == OP_SPAN:
                sel = spans.get(op[1])
                if sel is None or sel.start_ns is None:
                    name = op[1]
                    if not name:
                        sel = None
                    elif full and room + self._span_slack < 2:
                        # Spans have an eighth more: squeezed, a trace keeps its shape.
                        self.stats["open_bytes"] += 1
                        sel = None
                    else:
                        sel = self._start(session, name, t)  # charges a long name itself
                        room -= 2
                continue
            if code == OP_FINISH:
                span = spans.get(op[1])
                if span is None or span.start_ns is None:
                    self.stats["unknown_span"] += 1
                    self.last_named["unknown_span"] = op[1]
                    if created and not session.partial and span is None:
                        self._mark_partial(session)
                else:
                    self._end_span(session, span, t)
                continue
            if code == OP_BAGGAGE:
                if full:
                    self.stats["open_bytes"] += 1
                else:
                    self._set_baggage(session, op[1], op[2])
                    room -= 1 + ((len(op[1]) + len(op[2])) >> _UNIT_SHIFT)
                continue
            if code == OP_INJECT:
                self._inject(session, op[1], out)
                continue
            if code == OP_FINISH_ALL:
                session.held += start_room - room
                self._room -= start_room - room
                del sessions[key]
                self.stats["sessions_finished"] += 1
                self._end_session(session, t, None)
                if self.on_end is not None:
                    self.on_end(key)
                return out
            # The rest changes the selected span, which must not have been emitted yet.
            if sel is None:
                self.stats["no_span_selected"] += 1
                continue
            if sel.start_ns is None and session.trace_id is not None:
                self.stats["span_ended"] += 1
                continue
            if code == OP_CHILD_OF or code == OP_FOLLOWS_FROM:
                parent = spans.get(op[1])
                if parent is None or parent is sel:
                    # A parent the session does not have (yet): a listen section runs the
                    # backend's TCP rules before the frontend's HTTP ones, a mode tcp stream
                    # has no HTTP span at all. The span hangs under the session's first span
                    # rather than starting a second root in the trace (the first span itself
                    # stays a root: nothing is above it).
                    self.stats["unknown_parent"] += 1
                    self.last_named["unknown_span"] = op[1]
                    if created and not session.partial and parent is None:
                        self._mark_partial(session)
                    if sel.parent is None:
                        first = session.first
                        if first is not None and not _descends(first, sel):
                            sel.parent = first
                    continue
                if _descends(parent, sel):
                    # Below ``sel`` already (m1: B child-of A, then m2: A child-of B): a loop
                    # would leave the trace without a root. The earlier line stands.
                    self.stats["parent_loop"] += 1
                    continue
                sel.parent = parent
                if code == OP_FOLLOWS_FROM:
                    links = sel.links
                    if links is None:
                        sel.links = parent
                    elif isinstance(links, _Span):
                        sel.links = (links, parent)
                    elif len(links) < _MAX_ITEMS_PER_SPAN:
                        sel.links = links + (parent,)
                    else:
                        self.stats["item_limit"] += 1
            elif code == OP_KIND:
                sel.kind = op[1]
            elif code == OP_ERROR:
                extra = sel.more()
                if extra.status is None:
                    extra.status = _ERROR_STATUS
            elif code == OP_LOG:
                if session.sampled is not False:
                    value = op[2]
                    if full:
                        self.stats["open_bytes"] += 1
                    else:
                        self._add_event(sel, op[1], value, t)
                        room -= 2 + ((len(op[1]) + (len(value) if type(value) is str else 0))
                                     >> _UNIT_SHIFT)
        if room != start_room:
            self._room -= start_room - room
            session.held += start_room - room
        return out

    def expire(self, now_ns: int | None = None) -> int:
        """End the sessions idle for longer than the TTL; return how many were ended.

        Their open spans end at the session's last event, not now: most such sessions are
        streams HAProxy finished without an event (a deny, a redirect, a 502 or 504 of its
        own, a client abort), and a 1 ms deny shown as lasting the whole TTL misled. The
        incomplete attribute and the ERROR status say that the end is not known. ``now_ns``
        is on the TTL's clock (``time.monotonic_ns`` unless the registry was given others).
        """
        now = (self._ttl_clock_ns() if now_ns is None else now_ns) - self._ttl_epoch_ns
        self._sync_wall_clock()
        cutoff = now - self._ttl_ns
        sessions = self._sessions
        ended = 0
        while sessions:
            session = sessions[next(iter(sessions))]
            if session.last_ns >= cutoff:
                break
            sessions.popitem(last=False)
            self._end_session(session, session.last_t, "ttl")
            self._remember_evicted(session.key, now)
            ended += 1
        self.stats["sessions_evicted_ttl"] += ended
        evicted = self._evicted
        on_end = self.on_end
        while evicted and evicted[next(iter(evicted))] < cutoff:
            key, _ = evicted.popitem(last=False)
            if on_end is not None:
                on_end(key)
        return ended

    def _sync_wall_clock(self) -> None:
        """The wall clock's time since its epoch, less the TTL clock's since its own."""
        self._wall_offset_ns = ((self._clock_ns() - self._epoch_ns)
                                - (self._ttl_clock_ns() - self._ttl_epoch_ns))

    def close_all(self, reason: str = "shutdown") -> int:
        """End every session (at shutdown), their open spans marked incomplete, at each
        session's last event, as the TTL and the cap end them: a 1 ms deny open at a stop
        showed as lasting until the stop."""
        sessions = self._sessions
        ended = 0
        while sessions:
            _, session = sessions.popitem(last=False)
            self._end_session(session, session.last_t, reason)
            if self.on_end is not None:
                self.on_end(session.key)
            ended += 1
        self.stats["sessions_closed"] += ended
        return ended

    # -- sessions -------------------------------------------------------------------------------

    def _new_session(self, key: str, now: int) -> _Session:
        sessions = self._sessions
        while len(sessions) >= self._max_sessions:
            _, oldest = sessions.popitem(last=False)
            self.stats["sessions_evicted_cap"] += 1
            self._end_session(oldest, oldest.last_t, "cap")
            self._remember_evicted(oldest.key, now)
        session = _Session(key, now)
        sessions[key] = session
        self.stats["sessions_started"] += 1
        return session

    def _remember_evicted(self, key: str, now: int) -> None:
        evicted = self._evicted
        evicted[key] = now
        if len(evicted) > self._max_sessions:
            forgotten, _ = evicted.popitem(last=False)
            if self.on_end is not None:
                self.on_end(forgotten)

    def _end_session(self, session: _Session, t: int, reason: str | None) -> None:
        """End the open spans (children first), fix the context if needed, emit what is left.

        ``reason`` is ``None`` for a regular ``finish=*``; otherwise the open spans are
        incomplete: status ERROR and the incomplete attribute.
        """
        self._room += session.held
        session.held = 0
        status = None if reason is None else self._incomplete_status(reason)
        for span in reversed(session.spans.values()):
            if span.start_ns is not None:
                if status is not None:
                    span.more().status = status
                    self.stats["spans_incomplete"] += 1
                    if session.sampled is not False:
                        if span.attrs is None:
                            span.attrs = [INCOMPLETE_ATTRIBUTE, True]
                        else:
                            span.attrs += (INCOMPLETE_ATTRIBUTE, True)
                self._end_span(session, span, t)
        if session.trace_id is None and session.pending:
            self._fix(session, None, None)

    def _incomplete_status(self, reason: str) -> Status:
        status = self._incomplete.get(reason)
        if status is None:
            # Say how the end was cut, or a slow request cut at its last event would read as
            # a fast one (its spans end there, not at the expiry).
            why = {"ttl": f": no event for {self._ttl_ns / 1e9:g}s, ended at the last one",
                   "cap": ": max_sessions reached, ended at its last event"}.get(reason, "")
            status = Status(
                StatusCode.ERROR, f"span not finished before the session ended ({reason}){why}"
            )
            if len(self._incomplete) < 16:
                self._incomplete[reason] = status
        return status

    # -- trace context --------------------------------------------------------------------------

    def _on_carrier(self, session: _Session, carrier: Mapping[str, str]) -> None:
        if session.trace_id is not None:
            self.stats["late_carrier"] += 1
            return
        remote: SpanContext | None = None
        baggage: dict[str, str] | None = None
        if carrier:
            try:
                remote, baggage = extract_context(self._propagator, carrier)
            except Exception:
                self.stats["extract_error"] += 1
        self._fix(session, remote, baggage)

    def _fix(
        self, session: _Session, remote: SpanContext | None, baggage: dict[str, str] | None
    ) -> None:
        """Fix the trace id and the sampling decision, then emit the spans that already ended."""
        if remote is not None:
            trace_id = remote.trace_id
            parent_context = set_span_in_context(NonRecordingSpan(remote), _EMPTY_CONTEXT)
        else:
            trace_id = self._trace_id()
            while not 0 < trace_id < _TRACE_ID_LIMIT:
                trace_id = random.getrandbits(128)
            parent_context = _EMPTY_CONTEXT
        root = None
        for span in session.spans.values():
            if span.parent is None:
                root = span
                break
        try:
            if root is None:
                result = self._sampler.should_sample(
                    parent_context, trace_id, "", SpanKind.INTERNAL
                )
            else:
                result = self._sampler.should_sample(
                    parent_context,
                    trace_id,
                    root.name,
                    SPAN_KINDS[root.kind],
                    _attr_dict(root.attrs) if root.attrs else None,
                    (),
                )
            sampled = result.decision.is_sampled()
            trace_state = result.trace_state
        except Exception:
            self.stats["sampler_error"] += 1
            sampled = False
            trace_state = None
        if trace_state is None:
            trace_state = remote.trace_state if remote is not None else _EMPTY_TRACE_STATE
        session.trace_id = trace_id
        if remote is not None:
            session.remote_id = remote.span_id
            session.remote_flags = int(remote.trace_flags)
        session.sampled = sampled
        session.flags = _SAMPLED if sampled else _NOT_SAMPLED
        session.trace_state = trace_state
        if baggage:
            # The header's, kept until the session ends: charged as the configuration's are.
            units = len(baggage) + (sum(len(k) + len(v) for k, v in baggage.items()) >> _UNIT_SHIFT)
            if units > self._room:
                self.stats["open_bytes"] += 1
                baggage = None
            else:
                self._room -= units
                session.held += units
        if baggage:
            own = session.baggage
            if own is None:
                own = session.baggage = dict(list(baggage.items())[:_MAX_BAGGAGE_ITEMS])
                dropped = len(baggage) - len(own)
            else:
                # Baggage the configuration set explicitly wins over what came in.
                dropped = 0
                for k, v in baggage.items():
                    if k in own:
                        continue
                    if len(own) < _MAX_BAGGAGE_ITEMS:
                        own[k] = v
                    else:
                        dropped += 1
            if dropped:
                self.stats["item_limit"] += dropped  # the limit items_per_span, logged
        pending = session.pending
        session.pending = None
        if sampled:
            if pending:
                for span, start, end in pending:
                    self._emit_span(session, span, start, end)
        else:
            for span in session.spans.values():
                span.attrs = span.extra = None
            if pending:
                for span, _, _ in pending:
                    span.attrs = span.extra = span.links = None

    def _ctx(self, session: _Session, span: _Span) -> SpanContext:
        span_id = span.span_id or self._draw_span_id(span)
        trace_id = session.trace_id
        assert trace_id is not None
        return _new_context(trace_id, span_id, session.flags, session.trace_state)

    def _inject(self, session: _Session, name: str, out: list[SetVar]) -> None:
        span = session.spans.get(name)
        if span is None:
            self.stats["inject_unknown"] += 1
            self.last_named["inject_unknown"] = name
            return
        if session.trace_id is None:
            self._fix(session, None, None)
        try:
            if self._pass_through:
                context = INVALID_SPAN_CONTEXT
                if session.remote_id:
                    trace_id = session.trace_id
                    assert trace_id is not None
                    context = _remote_context(trace_id, session.remote_id,
                                              TraceFlags(session.remote_flags), session.trace_state)
            else:
                context = self._ctx(session, span)
            carrier = inject_vars(self._propagator, context, session.baggage)
        except Exception:
            self.stats["inject_error"] += 1
            return
        for var, value in carrier.items():
            out.append(SetVar(Scope.TXN, var, value))

    # -- spans ----------------------------------------------------------------------------------

    def _start(self, session: _Session, name: str, t: int) -> _Span | None:
        if session.started >= self._max_spans:
            self.stats["span_limit"] += 1
            return None
        session.started += 1
        self.stats["spans_started"] += 1
        if len(name) >= _UNIT:  # (apply charges the rest)
            units = len(name) >> _UNIT_SHIFT
            session.held += units
            self._room -= units
        span = _Span(name, t)
        session.spans[name] = span
        if session.first is None:
            session.first = span
        if session.partial and session.sampled is not False:
            self._set_attr(span, PARTIAL_ATTRIBUTE, True)
        return span

    def _mark_partial(self, session: _Session) -> None:
        """The session's first message named spans it does not have: mark its spans, open
        and to come, as a fragment of a trace whose beginning this agent did not see."""
        session.partial = True
        self.stats["sessions_partial"] += 1
        if session.sampled is not False:
            for span in session.spans.values():
                if span.start_ns is not None:
                    self._set_attr(span, PARTIAL_ATTRIBUTE, True)

    def _draw_span_id(self, span: _Span) -> int:
        """Give ``span`` its id, the first time one is needed (see ``_Span``)."""
        span_id = self._span_id()
        while not 0 < span_id < _ID_LIMIT:
            span_id = random.getrandbits(64)
        span.span_id = span_id
        return span_id

    def _set_attr(self, span: _Span, key: str, value: Any) -> None:
        if type(value) is str and len(value) > self._max_attr_len:
            self.stats["value_truncated"] += 1
            value = value[: self._max_attr_len]
        attrs = span.attrs
        if attrs is None:
            span.attrs = [key, value]
        elif len(attrs) < _MAX_ATTR_SLOTS:
            attrs.append(key)
            attrs.append(value)
        else:  # full: only a key already there may still change (repeats count as items)
            for i in range(len(attrs) - 2, -1, -2):
                if attrs[i] == key:
                    attrs[i + 1] = value
                    return
            self.stats["item_limit"] += 1

    def _add_event(self, span: _Span, key: str, value: Any, t: int) -> None:
        extra = span.more()
        events = extra.events
        if events is None:
            events = extra.events = []
        elif len(events) >= _MAX_ITEMS_PER_SPAN:
            self.stats["item_limit"] += 1
            return
        if type(value) is str and len(value) > self._max_attr_len:
            self.stats["value_truncated"] += 1
            value = value[: self._max_attr_len]
        events.append((key, value, t))

    def _set_baggage(self, session: _Session, key: str, value: str) -> None:
        baggage = session.baggage
        if baggage is None:
            baggage = session.baggage = {}
        elif len(baggage) >= _MAX_BAGGAGE_ITEMS and key not in baggage:
            self.stats["item_limit"] += 1
            return
        if len(value) > self._max_attr_len:
            self.stats["value_truncated"] += 1
            value = value[: self._max_attr_len]
        baggage[key] = value

    def _end_span(self, session: _Session, span: _Span, t: int) -> None:
        start = span.start_ns
        assert start is not None
        end = t if t >= start else start
        span.start_ns = None
        if session.trace_id is None:
            pending = session.pending
            if pending is None:
                pending = session.pending = [(span, start, end)]
            else:
                pending.append((span, start, end))
            if len(pending) >= session.started:
                # None open: the trace is fixed now, and the spans go out as they end, rather
                # than at finish=* or the TTL (a black-box run's configuration had no
                # traceparent= and no finish=*: every trace waited 30 s).
                self._fix(session, None, None)
        elif session.sampled:
            self._emit_span(session, span, start, end)
        else:
            span.attrs = span.extra = span.links = None

    def _emit_readable(self, session: _Session, span: _Span, start: int, end: int) -> None:
        """Emit an ended span as an SDK ``ReadableSpan`` (``_emit_span`` unless the registry
        emits records)."""
        trace_id = session.trace_id
        assert trace_id is not None
        flags = session.flags
        state = session.trace_state
        # Contexts are built when needed rather than kept: they would double a record's size.
        ctx = _new_context(trace_id, span.span_id or self._draw_span_id(span), flags, state)
        parent = span.parent
        if parent is not None:
            parent_id = parent.span_id or self._draw_span_id(parent)
            parent_ctx = _new_context(trace_id, parent_id, flags, state)
        elif session.remote_id:
            parent_ctx = _remote_context(
                trace_id, session.remote_id, TraceFlags(session.remote_flags), state
            )
        else:
            parent_ctx = None
        links = span.links
        extra = span.extra
        status, events = (None, None) if extra is None else (extra.status, extra.events)
        epoch = self._epoch_ns
        resource = session.resource
        if resource is None:
            resource = session.resource = self._resource(session.service)
        if _POSITIONAL_READABLE_SPAN:
            readable = ReadableSpan(
                span.name,
                ctx,
                parent_ctx,
                resource,
                _attr_dict(span.attrs) if span.attrs else None,
                _events(events, epoch) if events else (),
                self._links(session, links) if links else (),
                SPAN_KINDS[span.kind],
                None,
                status or _UNSET_STATUS,
                start + epoch,
                end + epoch,
                _SCOPE,
            )
        else:  # pragma: no cover - depends on the installed SDK
            readable = ReadableSpan(
                name=span.name,
                context=ctx,
                parent=parent_ctx,
                resource=resource,
                attributes=_attr_dict(span.attrs) if span.attrs else None,
                events=_events(events, epoch) if events else (),
                links=self._links(session, links) if links else (),
                kind=SPAN_KINDS[span.kind],
                status=status or _UNSET_STATUS,
                start_time=start + epoch,
                end_time=end + epoch,
                instrumentation_scope=_SCOPE,
            )
        span.attrs = span.extra = span.links = None
        self.stats["spans_emitted"] += 1
        try:
            self._emit(readable)
        except Exception:
            self.stats["emit_error"] += 1

    def _emit_record(self, session: _Session, span: _Span, start: int, end: int) -> None:
        """``_emit_readable`` for a direct exporter: the same span, as one plain tuple."""
        # Ids drawn in the order _emit_span draws them: the span's, its parent's, its links'.
        span_id = span.span_id or self._draw_span_id(span)
        parent = span.parent
        if parent is None:
            parent_id = session.remote_id
        else:
            parent_id = parent.span_id or self._draw_span_id(parent)
        links = span.links
        extra = span.extra
        status, events = (None, None) if extra is None else (extra.status, extra.events)
        epoch = self._epoch_ns
        resource = session.resource
        if resource is None:
            resource = session.resource = self._resource(session.service)
        record = _tuple_new(
            SpanRecord,
            (
                span.name,
                session.trace_id,
                span_id,
                parent_id,
                session.flags,
                span.kind,
                _attr_dict(span.attrs) if span.attrs else None,
                [(k, v, ts + epoch) for k, v, ts in events] if events else None,
                self._link_ids(links) if links else None,
                status,
                start + epoch,
                end + epoch,
                resource,
                _SCOPE,
            ),
        )
        span.attrs = span.extra = span.links = None
        self.stats["spans_emitted"] += 1
        try:
            self._emit(record)
        except Exception:
            self.stats["emit_error"] += 1

    def _link_ids(self, links: _Span | tuple[_Span, ...]) -> tuple[int, ...]:
        if isinstance(links, _Span):  # one link (follows-from) is the rule
            return (links.span_id or self._draw_span_id(links),)
        return tuple([target.span_id or self._draw_span_id(target) for target in links])

    def _links(self, session: _Session, links: _Span | tuple[_Span, ...]) -> tuple[Link, ...]:
        trace_id, flags, state = session.trace_id, session.flags, session.trace_state
        assert trace_id is not None
        return tuple(
            [Link(_new_context(trace_id, span_id, flags, state)) for span_id in self._link_ids(links)]
        )

    def _resource(self, service: str | None) -> Resource:
        name = service or self._default_service
        resource = self._resources.get(name)
        if resource is None:
            resource = self._resource_for_service(name)
            if len(self._resources) < _MAX_CACHED_RESOURCES:
                self._resources[name] = resource
        return resource
