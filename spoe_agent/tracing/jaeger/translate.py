"""Translation of SDK spans and registry records into Jaeger spans, as the official exporter does.

``JaegerTranslator`` gives the same result as the official ``ThriftTranslator`` (the tests compare
the encoded bytes), but caches what depends only on the Resource, kind, scope and status, and
reads the registry's ``SpanRecord`` tuples directly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from opentelemetry.exporter.jaeger.thrift.gen.jaeger import ttypes as jt
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from spoe_agent.tracing.jaeger.spans import JaegerSpan, ThriftBatch, ThriftProcess, _SpanRef
from spoe_agent.tracing.jaeger.tags import NO_VALUE, ConstTags, RecordTags, TagPairs, _pairs
from spoe_agent.tracing.jaeger.wire import _I64_MAX, _LOW64, _U64
from spoe_agent.tracing.registry import SPAN_KINDS, SpanRecord

# The package's logger, as before it was split: log lines and logging configuration keep its name.
log = logging.getLogger(__package__)

_KIND_NAMES = {
    SpanKind.CLIENT: "client",
    SpanKind.SERVER: "server",
    SpanKind.CONSUMER: "consumer",
    SpanKind.PRODUCER: "producer",
    SpanKind.INTERNAL: "internal",
}
_FOLLOWS_FROM = jt.SpanRefType.FOLLOWS_FROM
_UNSET = StatusCode.UNSET
_ERROR = StatusCode.ERROR
_STATUS_OK = [("otel.status_code", "OK")]
_STATUS_ERROR = [("otel.status_code", "ERROR")]
_CACHE_LIMIT = 256


def _i64(value: int) -> int:
    return value - _U64 if value > _I64_MAX else value


def _plain(attributes: Any) -> Any:
    """The dict behind BoundedAttributes: its public iteration locks and copies per access.

    Only used on ended spans, whose attributes no longer change.
    """
    return getattr(attributes, "_dict", attributes)


class JaegerTranslator:
    """Turns SDK spans into Jaeger spans; caches what depends only on Resource/kind/scope."""

    def __init__(
        self, max_tag_value_length: int | None = None, default_service_name: str | None = None
    ) -> None:
        self.max_tag_value_length = max_tag_value_length
        if default_service_name is None:
            default_service_name = Resource.create().attributes.get(SERVICE_NAME)
        self.default_service_name = default_service_name or "unknown_service"
        # keyed by id(obj); entries hold obj so its id cannot be reused while cached
        self._resources: dict[int, tuple[Any, ConstTags, str]] = {}
        self._suffixes: dict[tuple[int, int, bool], tuple[Any, ConstTags]] = {}
        self._record_tags: dict[tuple[int, int, Any], RecordTags] = {}

    def _resource_entry(self, resource: Any) -> tuple[Any, ConstTags, str]:
        entry = self._resources.get(id(resource))
        if entry is None or entry[0] is not resource:
            attrs = resource.attributes if resource is not None else None
            tags = ConstTags(list(_pairs(attrs)), self.max_tag_value_length)
            service = attrs.get(SERVICE_NAME) if attrs else None
            entry = (resource, tags, service or self.default_service_name)
            if len(self._resources) >= _CACHE_LIMIT:
                self._resources.clear()
            self._resources[id(resource)] = entry
        return entry

    def _suffix(self, kind: SpanKind, scope: Any, error: bool) -> ConstTags:
        """span.kind, the instrumentation scope tags and ``error``: what follows the status tags."""
        key = (id(kind), id(scope), error)  # ids: Enum hashing is a Python-level call
        entry = self._suffixes.get(key)
        if entry is None or entry[0] is not scope:
            pairs: list[tuple[str, Any]] = [("span.kind", _KIND_NAMES[kind])]
            if scope:
                version = NO_VALUE if scope.version is None else scope.version
                pairs += [
                    ("otel.library.name", scope.name),
                    ("otel.library.version", version),
                    ("otel.scope.name", scope.name),
                    ("otel.scope.version", version),
                ]
            if error:
                pairs.append(("error", True))
            entry = (scope, ConstTags(pairs, None))
            if len(self._suffixes) >= _CACHE_LIMIT:
                self._suffixes.clear()
            self._suffixes[key] = entry
        return entry[1]

    def service_name(self, span: ReadableSpan) -> str:
        """The Process service name the span belongs to (its Resource's ``service.name``)."""
        return self._resource_entry(span.resource)[2]

    def record_tags(self, record: SpanRecord) -> RecordTags:
        """The pre-encoded tags a record shares with others (see ``RecordTags``).

        The registry reuses a few resource, scope and status objects for all its records, so
        one lookup replaces the resource and suffix lookups and the status tags that
        ``translate_record`` does per span. Keyed by the resource's id (``Resource`` hashes its
        attributes, in Python), the kind and the status (hashed by identity); the scope, always
        the registry's, is checked rather than hashed: another one replaces the entry.
        """
        resource = record[12]
        key = (id(resource), record[5], record[9])
        entry = self._record_tags.get(key)
        if entry is None or entry.resource is not resource or entry.scope is not record[13]:
            entry = self._new_record_tags(key, record)
        return entry

    def _new_record_tags(self, key: tuple[int, int, Any], record: SpanRecord) -> RecordTags:
        resource, kind, scope, status = record[12], record[5], record[13], record[9]
        _, resource_tags, service = self._resource_entry(resource)
        error = False
        parts = [resource_tags]
        if status is not None and status.status_code is not _UNSET:
            error = status.status_code is _ERROR
            status_tags = _STATUS_ERROR if error else _STATUS_OK
            if status.description is not None:
                status_tags = [*status_tags, ("otel.status_description", status.description)]
            parts.append(ConstTags(status_tags, None))
        parts.append(self._suffix(SPAN_KINDS[kind], scope, error))
        entry = RecordTags(resource, scope, status, service, parts)
        if len(self._record_tags) >= _CACHE_LIMIT:
            self._record_tags.clear()
        self._record_tags[key] = entry
        return entry

    def translate(self, span: ReadableSpan) -> JaegerSpan:
        """Translate one ended span into what the official ``ThriftTranslator`` would produce."""
        if type(span) is SpanRecord:
            return self.translate_record(span)
        if isinstance(span, ReadableSpan):
            # the public properties copy these collections on every access
            attributes, events, links = span._attributes, span._events, span._links
        else:
            attributes, events, links = span.attributes, span.events, span.links
        ctx = span.context
        trace_id = ctx.trace_id
        start = span.start_time
        out = JaegerSpan()
        out.traceIdHigh = _i64(trace_id >> 64)
        out.traceIdLow = _i64(trace_id & _LOW64)
        out.spanId = _i64(ctx.span_id)
        parent = span.parent
        out.parentSpanId = _i64(parent.span_id) if parent else 0
        out.operationName = span.name
        out.flags = int(ctx.trace_flags)
        out.startTime = (start + 500) // 1000
        out.duration = (span.end_time - start + 500) // 1000
        out.max_len = self.max_tag_value_length

        out.own_tags = _plain(attributes) if attributes else None
        _, out.resource_tags, out.service = self._resource_entry(span.resource)
        status = span.status
        code = status.status_code
        if code is _UNSET:
            out.status_tags = None
        else:
            status_tags = _STATUS_ERROR if code is _ERROR else _STATUS_OK
            if status.description is not None:
                status_tags = [*status_tags, ("otel.status_description", status.description)]
            out.status_tags = status_tags
        out.suffix_tags = self._suffix(span.kind, span.instrumentation_scope, code is _ERROR)
        dropped_tags = None
        dropped_attributes = getattr(attributes, "dropped", 0)
        dropped_events = getattr(events, "dropped", 0)
        dropped_links = getattr(links, "dropped", 0)
        if dropped_attributes or dropped_events or dropped_links:
            dropped_tags = []
            if dropped_attributes:
                dropped_tags.append(("otel.dropped_attributes_count", dropped_attributes))
            if dropped_events:
                dropped_tags.append(("otel.dropped_events_count", dropped_events))
            if dropped_links:
                dropped_tags.append(("otel.dropped_links_count", dropped_links))
        out.dropped_tags = dropped_tags

        if links:
            refs = []
            for link in links:
                lctx = link.context
                ltrace = lctx.trace_id
                refs.append(
                    _SpanRef(
                        _FOLLOWS_FROM, _i64(ltrace & _LOW64), _i64(ltrace >> 64), _i64(lctx.span_id)
                    )
                )
            out.references = refs
        else:
            out.references = None

        if events:
            logs = []
            for event in events:
                event_attributes = event.attributes
                fields = _pairs(_plain(event_attributes))
                tail = [("message", event.name)]  # the official exporter never truncates these
                dropped = getattr(event_attributes, "dropped", 0)
                if dropped:
                    tail.insert(0, ("otel.dropped_attributes_count", dropped))
                logs.append(((event.timestamp + 500) // 1000, fields, tail))
            out.logs = logs
        else:
            out.logs = None
        return out

    def translate_record(self, record: SpanRecord) -> JaegerSpan:
        """``translate`` for the registry's own span tuples, with the same result as for the
        ``ReadableSpan`` the registry would otherwise have built (the tests compare the bytes).

        What the registry puts in a record is already plain: attributes and event values are
        str/int/bool, nothing was dropped by SDK limits, links share the span's trace.
        """
        (
            name,
            trace_id,
            span_id,
            parent_id,
            flags,
            kind,
            attrs,
            events,
            link_ids,
            status,
            start,
            end,
            resource,
            scope,
        ) = record
        # _i64, inlined: this runs for every span
        high = trace_id >> 64
        if high > _I64_MAX:
            high -= _U64
        low = trace_id & _LOW64
        if low > _I64_MAX:
            low -= _U64
        entry = self._resources.get(id(resource))
        if entry is None or entry[0] is not resource:
            entry = self._resource_entry(resource)
        out = JaegerSpan()
        out.traceIdHigh = high
        out.traceIdLow = low
        out.spanId = span_id - _U64 if span_id > _I64_MAX else span_id
        out.parentSpanId = parent_id - _U64 if parent_id > _I64_MAX else parent_id
        out.operationName = name
        out.flags = int(flags)
        out.startTime = (start + 500) // 1000
        out.duration = (end - start + 500) // 1000
        out.max_len = self.max_tag_value_length
        out.own_tags = attrs or None
        out.resource_tags = entry[1]
        out.service = entry[2]
        error = False
        out.status_tags = None
        if status is not None:
            code = status.status_code
            if code is not _UNSET:
                error = code is _ERROR
                status_tags = _STATUS_ERROR if error else _STATUS_OK
                if status.description is not None:
                    status_tags = [*status_tags, ("otel.status_description", status.description)]
                out.status_tags = status_tags
        out.suffix_tags = self._suffix(SPAN_KINDS[kind], scope, error)
        out.dropped_tags = None
        if link_ids:
            out.references = [
                _SpanRef(_FOLLOWS_FROM, low, high, i - _U64 if i > _I64_MAX else i)
                for i in link_ids
            ]
        else:
            out.references = None
        out.logs = _record_logs(events) if events else None
        return out

    def batches(self, spans: Iterable[ReadableSpan]) -> tuple[list[ThriftBatch], int]:
        """Group spans into one Batch per service; returns (batches, spans that failed to translate).

        Order is kept within each service so a single-service export is byte-identical to the
        official exporter's batch.
        """
        groups: dict[str, list[JaegerSpan]] = {}
        failed = 0
        for span in spans:
            try:
                translated = self.translate(span)
            except Exception:  # a malformed span must not sink its whole batch
                log.debug("cannot translate span %r", getattr(span, "name", span), exc_info=True)
                failed += 1
                continue
            group = groups.get(translated.service)
            if group is None:
                groups[translated.service] = [translated]
            else:
                group.append(translated)
        batches = [ThriftBatch(ThriftProcess(service), group) for service, group in groups.items()]
        return batches, failed


def _record_logs(events: list[tuple[str, Any, int]]) -> list[tuple[int, TagPairs, TagPairs]]:
    """A record's events as ``JaegerSpan.logs``: (time in µs, fields, tail).

    The event's value is its only attribute, under the event's name, which is also the message.
    """
    return [((ts + 500) // 1000, ((key, value),), [("message", key)]) for key, value, ts in events]
