"""The tracing agent: the default app of ``spoe-agent``.

Every SPOE message goes through :func:`~spoe_agent.tracing.language.parse_message` into the shared
:class:`~spoe_agent.tracing.registry.SessionRegistry`; finished spans go to a queue processor
that exports them off the request path, so an ACK never waits for Jaeger.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import gevent

from spoe_agent.config import AgentConfig
from spoe_agent.handlers import Agent, MetricSample, Work
from spoe_agent.logs import EVERY_TIME
from spoe_agent.protocol.types import Action, Message, SetVar
from spoe_agent.tracing.language import (
    BAD_KINDS,
    INJECT_ARGS_ON_WIRE,
    LANGUAGE_EVENTS,
    UNKNOWN_NAMES,
    Command,
    after_finish,
    ends_session,
    has_inject,
    parse_message,
)
from spoe_agent.tracing.pipeline import Resources, build_exporter, build_sampler
from spoe_agent.tracing.processor import QueueSpanProcessor
from spoe_agent.tracing.propagation import build_propagator
from spoe_agent.tracing.registry import SessionRegistry

if TYPE_CHECKING:  # only --workers loads the mesh, which imports this module's registry
    from spoe_agent.workers.mesh import PeerMesh

log = logging.getLogger(__name__)

# One spelling today ("inject"): one ``in`` per NOTIFY. A second would fail this, loudly.
(_INJECT_ARG,) = INJECT_ARGS_ON_WIRE

FLUSH_TIMEOUT_S = 5.0
LIMIT_LOG_INTERVAL_S = 10.0
# Limit name (as in spoe_agent_limit_hits) -> the registry counter that records its hits.
_REGISTRY_LIMITS = {
    "sessions": "sessions_evicted_cap",
    "spans_per_session": "span_limit",
    "items_per_span": "item_limit",
    "attribute_length": "value_truncated",
    "open_bytes": "open_bytes",
}
_LIMIT_HELP = {
    "sessions": "max_sessions reached, the least recently active sessions were ended early",
    "spans_per_session": "max_spans_per_session reached, further spans were not started",
    "items_per_span": "too many tags, logs or follows-from links on one span (128 of each) or "
                      "baggage items in one session (64), the extra were dropped",
    "attribute_length": "max_attribute_length reached, a tag, log or baggage value was cut",
    "open_bytes": "max_open_bytes reached, spans, tags, logs or baggage of open sessions were "
                  "dropped (a peer sending huge values? or raise it)",
    "export_queue": "export_queue_size reached, spans were dropped (is the collector slow?)",
}
# Messages for sessions already ended early: the trace is cut and marked incomplete, and the
# usual cause, a server slower than session_ttl, is a setting to change.
_LATE_MESSAGES = ("%d SPOE messages came for sessions already ended by session_ttl or "
                  "max_sessions since the last report, and were dropped: those traces end "
                  "early, marked incomplete (a server slower than session_ttl? Keep it above "
                  "your longest 'timeout server')")
# Sessions that began mid-stream: a restart cuts a few; many mean another agent gets the rest.
_PARTIAL_SESSIONS = ("%d sessions began mid-stream since the last report (their first message "
                     "named spans they never had; marked haproxy.session.partial): an agent "
                     "restart cuts a few; many mean HAProxy spreads each stream's events over "
                     "several agents, as several servers in the spoe-agents backend do (keep "
                     "one, and mark the others 'backup'); or HAProxy could not send their first "
                     "messages (an error in its set-on-error variable: 3 or 259 is a message "
                     "larger than the negotiated frame size, 1 a timeout: the agent answered "
                     "after spoe.cfg's 'timeout processing', or was down); or, in a spoe.cfg of "
                     "your own, a session's first message names a span (child-of, finish) that "
                     "no message started)")
# Two services in one session: colliding session keys, which nothing else would show.
_SERVICE_CONFLICTS = ("%d messages named another service than their session's since the last "
                      "report (last: %r, then %r): two HAProxies send the same session key "
                      "(id=), and their spans are merged into broken traces; each hop's "
                      "unique-id must be its own (a request id passed from hop to hop is not)")
# An inject= naming a span the session does not have: the next hop gets no trace context, and
# its trace is cut from HAProxy's (the span is started in the same message in any working
# configuration, so this is a mistake: a typo, or an inject before its span=).
_INJECT_UNKNOWN = ("%d inject= arguments named a span their session does not have since the "
                   "last report (last: %r): no trace context was set for the next hop, whose "
                   "trace is cut from HAProxy's (a typo in the span's name? inject= must name "
                   "a span started before it, as the reference configuration's Backend HTTP "
                   "request)")
# Span-language events that mean a configuration mistake rather than one odd message: logged
# like the limits, since a counter alone is silent for whoever has no /metrics yet.
_MISTAKES = {
    "missing_id": "%d SPOE messages with span arguments but no id= value ignored since the last "
                  "report: without a session key there is no trace (is unique-id-format set in "
                  "the HAProxy frontend? The reference configuration sends id=unique-id)",
    # Typos: nothing in the reference configuration or HAProxy's behaviour causes them.
    "unknown_arg": "%d SPOE message arguments with a name the span language does not know "
                   "ignored since the last report (a typo? README.md, 'The configuration "
                   "language', lists the names; names first met since the last report: %s)",
    "bad_kind": "%d kind= values other than server, client, producer, consumer and internal "
                "ignored since the last report (values first met since the last report: %s)",
}
# The reasons of spans_dropped_total (_dropped_by_reason), as the stop summary says them.
_DROP_REASONS = {
    "queue_full": "queue full",
    "export_failed": "export failed",
    "refused": "refused after they were sent",
    "shutdown_deadline": "shutdown deadline",
    "after_shutdown": "ended after the stop began",
    "oversize": "too big for a datagram",
    "invalid": "invalid",
}
# The names the language keeps for the _MISTAKES lines that name them.
_NAMES_MET = {"unknown_arg": UNKNOWN_NAMES, "bad_kind": BAD_KINDS}
# Context headers after the trace was fixed: the caller's trace is lost without a word.
_LATE_CARRIER = ("%d incoming trace contexts (traceparent= and the other propagation "
                 "arguments) came after their session's trace was fixed since the last report, "
                 "and were ignored: those traces are cut from their callers' (in a spoe.cfg of "
                 "your own, the message that carries them must come before the first inject= "
                 "and while a span is still open)")
_AFTER_FINISH = ("%d SPOE messages came after the message with finish=str(\"*\") of their own "
                 "event since the last report, and were ignored: the spoe-agent section's "
                 "messages lines list that message before them (list it last)")
# finish=, child-of=, follows-from= naming a span not open: a typo's only trace, and what the
# reference configuration does in mode tcp and listen sections (so INFO, not a warning).
_UNKNOWN_SPANS = ("%d finish=, child-of= or follows-from= arguments named a span their session "
                  "does not have open since the last report (last: %r), counted as "
                  "unknown_span and unknown_parent: the reference configuration does this in "
                  "mode tcp frontends and listen sections; otherwise, a typo in a span's name, "
                  "or a span finished twice?")


class TracingAgent(Agent):
    """An :class:`Agent` whose fallback handler turns span arguments into spans."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__("tracing")
        self.config = config
        self.language_stats: Counter[str] = Counter()
        exporter = build_exporter(config)
        self.exporter = exporter
        self.processor: QueueSpanProcessor | None = None
        if exporter is not None:
            self.processor = QueueSpanProcessor(
                exporter,
                max_queue_size=config.export_queue_size,
                max_export_batch_size=config.export_batch_size,
                schedule_delay_s=config.export_delay,
                export_timeout_s=config.export_timeout,
            )
            emit = self.processor.on_end
        else:
            emit = _discard
        # An exporter that reads the registry's own span tuples (ours for Jaeger) spares the
        # request path building SDK spans that would only be taken apart again.
        records = exporter is None or getattr(exporter, "accepts_span_records", False)
        if records and self.processor is not None:
            emit = self.processor.enqueue  # the registry only ever emits sampled spans
        self.registry = SessionRegistry(
            emit,
            propagator=build_propagator(config.propagators),
            sampler=build_sampler(config.sampler, config.sampler_arg),
            ttl_s=config.session_ttl,
            max_sessions=config.max_sessions,
            resource_for_service=Resources(),
            default_service=config.service_name,
            max_spans_per_session=config.max_spans_per_session,
            max_open_bytes=config.max_open_bytes,
            max_attr_len=config.max_attribute_length,
            span_records=records,
            # OTEL_SDK_DISABLED: the services behind it join the incoming context, as they
            # would behind OpenTelemetry's API with no SDK.
            pass_through=config.sdk_disabled,
        )
        self._expiry: gevent.Greenlet | None = None
        # Set by a --workers worker (spoe_agent.workers.mesh.PeerMesh): sends each command to
        # the worker that owns its session. None in a single process: no routing cost at all.
        self.router: PeerMesh | None = None
        self._limits_seen: dict[str, int] = {}
        self._limits_logged: dict[str, float] = {}
        self._finished_in_event: str | None = None
        self.fallback(self.handle)
        self.on_startup.append(self.start)
        self.on_shutdown.append(self.stop)
        self.metric_sources.append(self.metric_samples)

    def prepare(self, messages: list[Message]) -> tuple[Work | None, Work | None]:
        """Compile the NOTIFY's messages: applying them is ``now`` only if one injects (its ACK
        carries the variables), else ``later``, once the empty ACK is written.

        Seven of the reference config's eight events inject nothing: HAProxy's stream no
        longer waits for their spans to be started and ended (nor, with ``empty_ack_check``,
        for their messages to compile). A stream's next event is only sent once this ACK is
        read, and the server runs deferred work before anything that could yield, so the next
        event always finds this one applied. With ``--workers``, what
        other workers own is forwarded now and only this worker's own share waits
        (``PeerMesh.keep_own`` says why the order still holds).
        """
        router = self.router
        if (router is not None and not router.drains_per_read) or (
            self._handlers and not self._all_fallback(messages)
        ):
            return super().prepare(messages)
        commands: list[Command] = []
        stats = self.language_stats
        for message in messages:
            try:
                command = parse_message(message, stats)
            except Exception:
                self.handler_errors += 1
                log.exception("handler for SPOE message %r failed", message.name,
                              extra={"rate_key": message.name})
                continue
            if command is not None:
                commands.append(command)
        if not commands:
            return None, None
        if len(commands) > 1:  # most events send one message
            kept = after_finish(commands)
            if kept is not None:
                self._after_finish(len(commands) - len(kept))
                commands = kept
        for command in commands:
            if has_inject(command):
                return partial(self._apply, commands, router and router.route), None
        if router is not None:
            try:
                commands = router.keep_own(commands)
            except Exception:
                self.handler_errors += 1
                log.exception("routing SPOE messages of session %r failed", commands[0].key)
                return None, None
            if not commands:
                return None, None
        return None, partial(self._apply_later, commands)

    def empty_ack_check(self) -> Callable[[bytes], bool] | None:
        """None with handlers or workers (set up before serving): messages may go elsewhere
        first, so their ACKs always wait."""
        if self.router is not None or self._handlers:
            return None
        return _acks_empty

    def _all_fallback(self, messages: list[Message]) -> bool:
        handlers = self._handlers
        return not any(message.name in handlers for message in messages)

    def _apply(self, commands: list[Command], via: Any = None) -> list[Action]:
        """Apply each command (``via`` the workers' router: where its session lives) and
        collect the variables to set; a command that fails costs itself only."""
        actions: list[Action] = []
        apply = self.registry.apply if via is None else via
        for command in commands:
            try:
                result = apply(command)
            except Exception:
                self.handler_errors += 1
                log.exception("applying SPOE message of session %r failed", command.key)
                continue
            if result:
                actions.extend(result)
        return actions

    def _apply_later(self, commands: list[Command]) -> None:
        """``_apply`` for commands that inject nothing, so set no variables."""
        apply = self.registry.apply
        for command in commands:
            try:
                apply(command)
            except Exception:
                self.handler_errors += 1
                log.exception("applying SPOE message of session %r failed", command.key)

    def _after_finish(self, dropped: int = 1) -> None:
        """Messages of the event whose earlier message had ``finish=*`` for their session: the
        spoe-agent section lists that one first. Applied, they started a second trace of the
        request's last spans (black-box run); one NOTIFY is one stream, so they are dropped."""
        self.registry.stats["after_finish"] += dropped

    def dispatch(self, messages: list[Message]) -> list[Action]:
        self._finished_in_event = None
        return super().dispatch(messages)

    def handle(self, message: Message) -> list[SetVar] | None:
        command = parse_message(message, self.language_stats)
        if command is None:
            return None
        # The dispatch path's check (prepare's): a route that yields (an inject waiting for
        # its owner) may let another NOTIFY reset it, which only misses a drop.
        if command[0] == self._finished_in_event:
            self._after_finish()
            return None
        if ends_session(command):
            self._finished_in_event = command[0]
        router = self.router
        if router is not None:
            return router.route(command)
        return self.registry.apply(command)

    def start(self) -> None:
        interval = max(0.05, min(1.0, self.config.session_ttl / 4))
        self._expiry = gevent.spawn(self._expire_loop, interval)
        log.info("tracing: exporter %s, propagators %s, sampler %s, session ttl %.1fs",
                 self.config.exporter_text(), ",".join(self.config.propagators) or "none",
                 self.config.sampler, self.config.session_ttl)
        warning = self.config.endpoint_warning()
        if warning:
            log.warning("%s", warning, extra=EVERY_TIME)  # once, at start: never held back

    def _expire_loop(self, interval: float) -> None:
        while True:
            gevent.sleep(interval)
            try:
                self.registry.expire()
                self._report_limits()
            except Exception:  # pragma: no cover - a bug here must not stop expiry for good
                log.exception("session expiry failed")

    def limit_hits(self) -> dict[str, int]:
        """The tracing side's limits and how often each was hit (never reset)."""
        reg = self.registry.stats
        hits = {name: reg[key] for name, key in _REGISTRY_LIMITS.items()}
        if self.processor is not None:
            hits["export_queue"] = self.processor.stats.dropped_queue_full
        return hits

    def _report_limits(self, final: bool = False) -> None:
        """Log the limits hit and the configuration mistakes met since the last look, once per
        interval each (the registry, the processor and the span language only count: they run
        on the request path and must not log per hit). ``final`` (at stop) logs all that grew
        since, however recent the last line: what the last seconds lost was never said."""
        now = float("inf") if final else time.monotonic()
        for name, value in self.limit_hits().items():
            # One template per limit (ours, not peer data): the root logging filter
            # rate-limits by template, and one limit must not silence another.
            self._report(name, value, now, f"tracing limit {name} hit %d times since the last "
                         f"report: {_LIMIT_HELP[name]}")
        registry = self.registry
        self._report("late_message", registry.stats["late_message"], now, _LATE_MESSAGES)
        self._report("sessions_partial", registry.stats["sessions_partial"], now,
                     _PARTIAL_SESSIONS)
        self._report("service_conflict", registry.stats["service_conflict"], now,
                     _SERVICE_CONFLICTS, *(registry.last_conflict or ("?", "?")))
        self._report("inject_unknown", registry.stats["inject_unknown"], now, _INJECT_UNKNOWN,
                     registry.last_named.get("inject_unknown", "?"))
        self._report("late_carrier", registry.stats["late_carrier"], now, _LATE_CARRIER)
        self._report("after_finish", registry.stats["after_finish"], now, _AFTER_FINISH)
        self._report("unknown_span", registry.stats["unknown_span"]
                     + registry.stats["unknown_parent"], now, _UNKNOWN_SPANS,
                     registry.last_named.get("unknown_span", "?"), level=logging.INFO)
        for name, template in _MISTAKES.items():
            met = _NAMES_MET.get(name)
            if met is not None:
                # repr: the names are a peer's bytes (HAProxy's configuration, or anyone
                # who reaches the port), kept to one line.
                names = ", ".join(map(repr, met)) or "none new"
                if self._report(name, self.language_stats[name], now, template, names):
                    met.clear()  # the next report names what is new since this one
            else:
                self._report(name, self.language_stats[name], now, template)

    def _report(self, name: str, value: int, now: float, template: str, *more: object,
                level: int = logging.WARNING) -> bool:
        grew = value - self._limits_seen.get(name, 0)
        if grew > 0 and now - self._limits_logged.get(name, -LIMIT_LOG_INTERVAL_S) >= (
            LIMIT_LOG_INTERVAL_S
        ):
            # At stop (now is then infinite), past the root filter, which would hold back a
            # template logged less than its interval ago.
            log.log(level, template, grew, *more,
                    extra=EVERY_TIME if now == float("inf") else None)
            self._limits_seen[name] = value
            self._limits_logged[name] = now
            return True
        return False

    def stop(self) -> None:
        """End what is still open as incomplete and flush the exporter within a deadline.

        A dead or stalled collector costs at most ``FLUSH_TIMEOUT_S`` here: the processor gives
        up on the queue at the deadline and the exporter's sockets are closed. What was given up
        (the batch being sent included) shows in the summary as dropped at the deadline.
        """
        if self._expiry is not None:
            self._expiry.kill(block=False)
        self._report_limits(final=True)
        registry = self.registry
        before = registry.stats["spans_incomplete"]
        ended = registry.close_all("shutdown")
        if ended:
            # A session whose spans all finished is held until finish=str("*") or the TTL
            # ends it: calling it incomplete sent users looking for lost spans.
            log.info("tracing: ended %d open sessions at shutdown, %d unfinished spans of them "
                     "marked incomplete", ended, registry.stats["spans_incomplete"] - before)
        if self.processor is not None:
            self.processor.shutdown(FLUSH_TIMEOUT_S)
            # Every reason of spans_dropped_total: "0 dropped" beside reason="oversize" misled.
            # Refused spans were sent, so counted exported too, and then lost: said twice, as
            # /metrics counts them, where "0 dropped" contradicted reason="refused".
            dropped = self._dropped_by_reason()
            log.info("tracing: %d spans exported in all, %d dropped (%s)",
                     self.processor.stats.exported, sum(dropped.values()),
                     ", ".join(f"{label} {dropped.get(reason, 0)}"
                               for reason, label in _DROP_REASONS.items()))

    def _dropped_by_reason(self) -> dict[str, int]:
        """The reasons of ``spoe_agent_spans_dropped_total`` and their counts: the processor's,
        and the exporter's own (Jaeger: too big for a datagram, untranslatable) if it has
        them. The stop summary and /metrics read the same."""
        dropped = {}
        if self.processor is not None:
            stats = self.processor.stats
            dropped.update(queue_full=stats.dropped_queue_full,
                           export_failed=stats.export_failed_spans,
                           refused=stats.export_refused_spans,
                           shutdown_deadline=stats.dropped_shutdown_deadline,
                           after_shutdown=stats.dropped_after_shutdown)
        estats = getattr(self.exporter, "stats", None)
        for name, reason in (("spans_dropped_oversize", "oversize"),
                             ("spans_dropped_invalid", "invalid")):
            if hasattr(estats, name):
                dropped[reason] = getattr(estats, name)
        return dropped

    def metric_samples(self) -> Iterator[MetricSample]:
        """The tracing series of /metrics, read from plain counters at scrape time, so that
        the request path only ever increments an int."""
        reg = self.registry.stats
        yield ("spoe_agent_sessions_open", "gauge", "Sessions (HAProxy streams) being traced",
               {}, len(self.registry))
        yield ("spoe_agent_spans_started", "counter", "Spans started", {},
               reg["spans_started"])
        for name, value in sorted(self.limit_hits().items()):
            yield ("spoe_agent_limit_hits", "counter", "Times a configured limit was reached",
                   {"limit": name}, value)
        for name, value in sorted(reg.items()):
            yield ("spoe_agent_tracing_events", "counter",
                   "Session registry events (sessions started/evicted, spans ended, anomalies)",
                   {"event": name}, value)
        stats = self.language_stats
        for name in sorted(set(LANGUAGE_EVENTS).union(stats)):
            yield ("spoe_agent_language_events", "counter",
                   "Span-language anomalies in SPOE message arguments", {"event": name},
                   stats[name])
        dropped = "Spans dropped, by reason"
        processor = self.processor
        if processor is not None:
            pstats = processor.stats
            yield ("spoe_agent_spans_queued", "counter", "Spans handed to the exporter queue",
                   {}, pstats.queued)
            yield ("spoe_agent_spans_exported", "counter", "Spans exported", {}, pstats.exported)
            yield ("spoe_agent_exporter_errors", "counter", "Failed export calls", {},
                   pstats.export_errors)
            yield ("spoe_agent_export_queue_size", "gauge", "Spans waiting for export", {},
                   processor.queue_size)
            yield ("spoe_agent_export_queue_limit", "gauge", "Capacity of the export queue", {},
                   processor.max_queue_size)
        for reason, value in self._dropped_by_reason().items():
            yield ("spoe_agent_spans_dropped", "counter", dropped, {"reason": reason}, value)
        estats = getattr(self.exporter, "stats", None)
        if estats is not None:
            for name in ("send_errors", "spans_failed", "spans_refused", "spans_sent"):
                if hasattr(estats, name):
                    yield ("spoe_agent_jaeger_exporter", "counter", "Jaeger exporter counters",
                           {"counter": name}, getattr(estats, name))


def _discard(span: Any) -> None:
    return None


def build_tracing_agent(config: AgentConfig) -> TracingAgent:
    return TracingAgent(config)


def _acks_empty(payload: bytes) -> bool:
    """Only a message with an ``inject`` argument sets variables, and on the wire such an
    argument is its name's bytes, length first: a payload without them is answered with an
    empty ACK, which can go before the messages are compiled. (Those bytes elsewhere, say in
    a URL, only make the ACK wait as it always did.)"""
    return _INJECT_ARG not in payload
