"""The span exporter: translate, encode, and send spans to jaeger-agent or jaeger-collector.

``FastJaegerExporter`` takes the official ``JaegerExporter``'s arguments and writes its bytes; it
can also encode spans ahead of sending them (``encode``/``send_encoded``, for the queue processor)
and takes the registry's ``SpanRecord`` tuples as well as SDK spans.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from spoe_agent.config import JAEGER_COLLECTOR_PATH, jaeger_collector_hint
from spoe_agent.tracing.jaeger.encode import (
    UDP_PACKET_MAX_LENGTH,
    _RecordHead,
    batch_binary_from_parts,
    datagram_size,
    emit_batch_datagram,
    encode_process_binary,
    encode_process_compact,
    encode_record_compact,
    encode_span_binary,
    encode_span_compact,
    pack_span_bytes,
)
from spoe_agent.tracing.jaeger.spans import ThriftBatch, ThriftProcess
from spoe_agent.tracing.jaeger.translate import _CACHE_LIMIT, JaegerTranslator
from spoe_agent.tracing.jaeger.transport import CollectorAnswered, _HTTPSender, _UDPSender
from spoe_agent.tracing.registry import SpanRecord

# The package's logger, as before it was split: log lines and logging configuration keep its name.
log = logging.getLogger(__package__)


@dataclass
class ExportStats:
    """Plain counters; read them for metrics, never reset by the exporter."""

    spans_sent: int = 0
    datagrams_sent: int = 0
    http_posts: int = 0
    bytes_sent: int = 0
    send_errors: int = 0
    spans_failed: int = 0  # spans in datagrams/posts that could not be sent
    # spans in datagrams sent (so in spans_sent) that the destination's host then refused
    spans_refused: int = 0
    spans_dropped_oversize: int = 0
    spans_dropped_invalid: int = 0  # spans that could not be translated or encoded


class Delivery(NamedTuple):
    """What became of the spans of one ``send_encoded``: ``sent``; ``failed`` in sends that
    failed (the collector or the network); ``dropped`` before any send, for a reason the
    exporter counts itself (``spans_dropped_invalid``, ``spans_dropped_oversize``).

    One bad span, or one datagram of eight that failed, must not count the batch's other
    spans as lost: the metrics would cry wolf.
    """

    sent: int
    failed: int
    dropped: int
    #: Spans of earlier sends, of this call or an earlier one, counted in their ``sent`` then,
    #: that the destination refused since (UDP: jaeger-agent's host said port unreachable).
    refused: int = 0

    @property
    def complete(self) -> bool:
        return not (self.failed or self.dropped)


class EncodedSpans:
    """Spans translated and encoded for one transport, grouped by service, not yet sent.

    ``spans`` counts every span handed to ``encode``; ``invalid`` those that could not be
    translated or encoded (dropped, and counted in the exporter's stats when found).
    """

    __slots__ = ("groups", "spans", "invalid")

    def __init__(self) -> None:
        self.groups: dict[str, tuple[ThriftProcess, list[bytes]]] = {}
        self.spans = 0
        self.invalid = 0

    def __len__(self) -> int:
        return self.spans


class FastJaegerExporter(SpanExporter):
    """A drop-in for the official ``JaegerExporter`` (same arguments, same wire bytes), but fast.

    With ``collector_endpoint`` set, batches go to the collector over HTTP only; otherwise to the
    agent over UDP, as the official exporter does. ``export`` also takes the registry's
    :class:`SpanRecord` tuples (``accepts_span_records``), mixed with SDK spans or not.
    """

    accepts_span_records = True

    def __init__(
        self,
        agent_host_name: str = "localhost",
        agent_port: int = 6831,
        collector_endpoint: str | None = None,
        username: str | None = None,
        password: str | None = None,
        max_tag_value_length: int | None = None,
        timeout: float = 10,
        udp_split_oversized_batches: bool = True,
        *,
        max_packet_size: int = UDP_PACKET_MAX_LENGTH,
        default_service_name: str | None = None,
        certificate: str | None = None,
    ) -> None:
        self.agent_host_name = agent_host_name
        self.agent_port = agent_port
        self.collector_endpoint = collector_endpoint or None
        self.udp_split_oversized_batches = udp_split_oversized_batches
        self.timeout = timeout
        self.max_packet_size = max_packet_size
        self.stats = ExportStats()
        self.translator = JaegerTranslator(max_tag_value_length, default_service_name)
        self._udp = _UDPSender(agent_host_name, agent_port)
        self._http = (
            _HTTPSender(self.collector_endpoint, username, password, timeout, certificate)
            if self.collector_endpoint
            else None
        )
        self._process_bytes: dict[str, bytes] = {}
        # The spans of the last datagram sent: a refusal the next send finds is theirs.
        self._udp_last_spans = 0
        self._lock = threading.Lock()
        self._shutdown = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Send the spans; FAILURE if any of them could not be sent (the others still are)."""
        if self._shutdown:
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        delivery = self.send_encoded(self.encode(spans))
        return SpanExportResult.SUCCESS if delivery.complete else SpanExportResult.FAILURE

    def encode(self, spans: Sequence[ReadableSpan], into: EncodedSpans | None = None) -> EncodedSpans:
        """Translate and encode spans for this exporter's transport, adding them to ``into``.

        Split from sending so that a processor can encode a few spans at a time as they end and
        still send them in the large units the transport wants (see ``QueueSpanProcessor``).
        """
        out = EncodedSpans() if into is None else into
        out.spans += len(spans)
        if self._http is None:
            self._encode_compact(spans, out)
        else:
            self._encode_binary(spans, out)
        return out

    def _encode_binary(self, spans: Sequence[ReadableSpan], out: EncodedSpans) -> None:
        """Translate all the spans into batches, then encode each batch's spans."""
        batches, invalid = self.translator.batches(spans)
        self.stats.spans_dropped_invalid += invalid
        out.invalid += invalid
        groups = out.groups
        for batch in batches:
            encoded = self._encode_spans(batch, encode_span_binary)
            out.invalid += len(batch.spans) - len(encoded)
            service = batch.process.serviceName
            group = groups.get(service)
            if group is None:
                groups[service] = (batch.process, encoded)
            else:
                group[1].extend(encoded)

    def _encode_compact(self, spans: Sequence[ReadableSpan], out: EncodedSpans) -> None:
        """Encode spans one by one, the registry's records straight from the tuple.

        Same groups, order and failures as translating everything first (``_encode_binary``):
        a span that cannot be translated joins no group, one that cannot be encoded still
        creates its service's group, just as its translation did there.
        """
        translator = self.translator
        max_len = translator.max_tag_value_length
        head = _RecordHead()
        groups = out.groups
        invalid = 0
        for span in spans:
            is_record = type(span) is SpanRecord
            try:
                if is_record:
                    tags = translator.record_tags(span)  # type: ignore[arg-type]
                    service = tags.service
                else:
                    translated = translator.translate(span)
                    service = translated.service
            except Exception:  # a malformed span must not sink the others
                log.debug("cannot translate span %r", getattr(span, "name", span), exc_info=True)
                invalid += 1
                continue
            group = groups.get(service)
            if group is None:
                group = groups[service] = (ThriftProcess(service), [])
            try:
                if is_record:
                    encoded = encode_record_compact(span, tags, max_len, head)  # type: ignore[arg-type]
                else:
                    encoded = encode_span_compact(translated)
            except Exception:  # e.g. a lone surrogate in a string cannot become UTF-8
                log.debug("cannot encode span %r", getattr(span, "name", span), exc_info=True)
                invalid += 1
                continue
            group[1].append(encoded)
        self.stats.spans_dropped_invalid += invalid
        out.invalid += invalid

    def send_encoded(
        self, encoded: EncodedSpans, between: Callable[[], None] | None = None
    ) -> Delivery:
        """Send what ``encode`` produced, and say what became of each span. ``between`` is
        called between two UDP datagrams (the caller's chance to let other work run)."""
        valid = encoded.spans - encoded.invalid
        if self._shutdown:
            return Delivery(0, valid, encoded.invalid)
        sent = failed = oversize = refused = 0
        with self._lock:
            # One bound for the whole export, whatever number of services it posts.
            deadline = time.monotonic() + self.timeout
            for process, spans in encoded.groups.values():
                if not spans:
                    continue
                if self._http is not None:
                    if self._send_http(process, spans, deadline):
                        sent += len(spans)
                    else:
                        failed += len(spans)
                else:
                    ok, lost, too_big, gone = self._send_udp(process, spans, between)
                    sent += ok
                    failed += lost
                    oversize += too_big
                    refused += gone
        return Delivery(sent, failed, encoded.invalid + oversize, refused)

    def _encode_spans(self, batch: ThriftBatch, encode: Any) -> list[bytes]:
        encoded = []
        for span in batch.spans:
            try:
                encoded.append(encode(span))
            except Exception:  # e.g. a lone surrogate in a string cannot become UTF-8
                log.debug("cannot encode span %r", span.operationName, exc_info=True)
                self.stats.spans_dropped_invalid += 1
        return encoded

    def _send_http(self, process: ThriftProcess, spans: list[bytes], deadline: float) -> bool:
        stats = self.stats
        body = batch_binary_from_parts(encode_process_binary(process), spans)
        try:
            self._http.send(body, deadline)  # type: ignore[union-attr]
        except Exception as exc:
            if self._shutdown:
                # Cut short by shutdown's abort, once its deadline had counted these spans as
                # dropped: a warning now would follow "stopped", about a failure of our making.
                log.debug("Jaeger collector export to %s aborted at shutdown: %s",
                          self._http.shown, exc)  # type: ignore[union-attr]
                return False
            stats.send_errors += 1
            stats.spans_failed += len(spans)
            log.warning("Jaeger collector export to %s failed: %s%s",
                        self._http.shown, exc, self._not_found_hint(exc))  # type: ignore[union-attr]
            return False
        stats.http_posts += 1
        stats.bytes_sent += len(body)
        stats.spans_sent += len(spans)
        return True

    def _not_found_hint(self, exc: Exception) -> str:
        """For a 404 from an endpoint whose path is not the collector's: the endpoint is used
        as written, and one without ``/api/traces`` has every batch refused this way."""
        if (not isinstance(exc, CollectorAnswered) or exc.status != 404
                or urlsplit(self.collector_endpoint or "").path == JAEGER_COLLECTOR_PATH):
            return ""
        return ": " + jaeger_collector_hint(self.collector_endpoint or "")

    def _send_udp(
        self,
        process_struct: ThriftProcess,
        spans: list[bytes],
        between: Callable[[], None] | None = None,
    ) -> tuple[int, int, int, int]:
        """Spans sent, spans in datagrams that failed, spans too big for a datagram, and spans
        of datagrams sent before that were refused."""
        stats = self.stats
        sent = failed = refused = 0
        service = process_struct.serviceName
        process = self._process_bytes.get(service)
        if process is None:
            process = encode_process_compact(process_struct)
            if len(self._process_bytes) >= _CACHE_LIMIT:
                self._process_bytes.clear()
            self._process_bytes[service] = process
        size = datagram_size(process, map(len, spans))
        if size <= self.max_packet_size:
            datagrams = [(emit_batch_datagram(process, spans), len(spans))]
        elif not self.udp_split_oversized_batches and len(spans) > 1:
            stats.spans_dropped_oversize += len(spans)
            log.warning(
                "Jaeger batch of ~%d bytes exceeds the max UDP packet size %d; dropped (%d "
                "spans so far)",
                size,
                self.max_packet_size,
                stats.spans_dropped_oversize,
            )
            return 0, 0, len(spans), 0
        else:
            datagrams, dropped = pack_span_bytes(process, spans, self.max_packet_size)
            if dropped:
                stats.spans_dropped_oversize += dropped
                # The running total: repeated lines are rate-limited, and the ones held back
                # are counted as lines, not spans (black-box run).
                log.warning("%d span(s) larger than a UDP packet dropped (%d so far)", dropped,
                            stats.spans_dropped_oversize)
        for n, (data, count) in enumerate(datagrams):
            if n and between is not None:
                between()
            if self._shutdown:
                # Shut down meanwhile, its deadline past: the processor has counted what is
                # left as dropped, and these are neither sent nor the transport's failures.
                failed += sum(c for _, c in datagrams[n:])
                break
            try:
                earlier = self._udp.send(data)
            except Exception as exc:
                stats.send_errors += 1
                stats.spans_failed += count
                failed += count
                log.warning("Jaeger agent export to %s:%s failed: %s", self.agent_host_name,
                            self.agent_port, exc)
                continue
            if earlier is not None:
                lost = self._udp_last_spans
                stats.send_errors += 1
                stats.spans_refused += lost
                refused += lost
                log.warning("Jaeger agent export to %s:%s failed: %s: the datagram sent before "
                            "(%d spans) was lost", self.agent_host_name, self.agent_port,
                            earlier.strerror, lost)
            stats.datagrams_sent += 1
            stats.bytes_sent += len(data)
            stats.spans_sent += count
            self._udp_last_spans = count
            sent += count
        return sent, failed, len(spans) - sent - failed, refused

    def shutdown(self) -> None:
        """Refuse further exports and close the sockets.

        Not under the export lock: an export stuck on a dead collector must not hold this up.
        """
        self._shutdown = True
        self._udp.shut()
        if self._http is not None:
            if self._lock.acquire(blocking=False):  # no post in progress
                try:
                    self._http.close()
                finally:
                    self._lock.release()
            else:
                self._http.abort()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here: every export is sent before it returns."""
        return True
