"""The OTLP/HTTP exporter, able to encode a batch a slice at a time.

Under gevent the export shares the one thread with the request path. The SDK's exporter encodes
a whole batch in one go when it sends it: ~15 ms for 512 spans on the benchmark VM, during
which no NOTIFY is answered (a black-box run: request p99 19-30 ms with OTLP against 5-7 ms
with Jaeger, at 330 requests/s). With ``encode``/``send_encoded``, as ``FastJaegerExporter``
has, ``QueueSpanProcessor`` encodes a few spans at a time as they end and posts a batch's worth
at once. Protobuf makes that exact: the encodings of several ``ExportTraceServiceRequest``
messages, end to end, are the encoding of one that holds all their ``resource_spans``.

The post itself is the SDK's (``_export``: compression, certificates, headers, one retry on a
dropped keep-alive connection); the retries around it follow the OTLP specification and the
SDK's own loop: 429, 502, 503 and 504 are retried with exponential backoff and jitter while the
exporter's timeout allows.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent
from gevent import monkey
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from spoe_agent.config import shown_url
from spoe_agent.tracing.jaeger.exporter import Delivery
from spoe_agent.tracing.processor import describe_error

log = logging.getLogger(__name__)

#: What the OTLP specification lets a client retry.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
_MAX_ATTEMPTS = 6
# Since SDK 1.33 or so, ``_export`` takes what is left of the deadline; before, its own timeout.
_EXPORT_TAKES_TIMEOUT = "timeout_sec" in inspect.signature(OTLPSpanExporter._export).parameters


class EncodedRequest:
    """Serialized ``ExportTraceServiceRequest`` parts, and how many spans they hold."""

    __slots__ = ("parts", "spans")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.spans = 0

    def __len__(self) -> int:
        return self.spans


class SlicedOTLPSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` with ``encode``/``send_encoded``; ``export`` is the SDK's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = threading.Event()
        #: The endpoint as logs may show it: without the user and password it may carry.
        self.shown = shown_url(self._endpoint)

    def encode(self, spans: Sequence[ReadableSpan],
               into: EncodedRequest | None = None) -> EncodedRequest:
        out = EncodedRequest() if into is None else into
        out.parts.append(encode_spans(spans).SerializePartialToString())
        out.spans += len(spans)
        return out

    def send_encoded(self, encoded: EncodedRequest,
                     between: Callable[[], None] | None = None) -> SpanExportResult | Delivery:
        """Post what ``encode`` produced as one request; raises OSError naming the endpoint
        and the status of a final refusal or the cause of a failed post, which the processor
        logs and counts (one line: the Jaeger exporter's failures name their destination, and
        so must these, or a wrong endpoint variable cannot be told from a collector down)."""
        if self._stopping.is_set():
            return SpanExportResult.FAILURE
        body = b"".join(encoded.parts)
        deadline = time.monotonic() + self._timeout
        for attempt in range(_MAX_ATTEMPTS):
            try:
                response = self._bounded_export(body, max(0.001, deadline - time.monotonic()))
            except Exception as exc:
                # The processor's DEBUG traceback shows this OSError only: the client's chain
                # is logged here instead.
                log.debug("OTLP export to %s failed", self.shown, exc_info=True)
                raise OSError(f"OTLP export to {self.shown} failed: "
                              f"{describe_error(exc)}") from None
            if response.ok:
                return self._accepted(response.content, encoded.spans)
            backoff = 2 ** attempt * random.uniform(0.8, 1.2)
            if (response.status_code not in RETRYABLE_STATUSES or attempt + 1 == _MAX_ATTEMPTS
                    or backoff > deadline - time.monotonic()
                    or self._stopping.wait(backoff)):
                raise OSError(f"OTLP export to {self.shown} failed: the collector answered "
                              f"HTTP {response.status_code} "
                              f"{response.reason}"
                              + (f" after {attempt + 1} tries" if attempt else ""))
        return SpanExportResult.FAILURE  # pragma: no cover - the loop always returns or raises

    def _bounded_export(self, body: bytes, seconds: float) -> Any:
        """The SDK's post, done within ``seconds``.

        ``requests`` applies its timeout to each socket operation: a collector trickling its
        answer a byte at a time held a post 26 s with a 1 s timeout, and the SDK posts again
        after a connection error (code review). Under gevent (the agent) a timer bounds it
        whole; it is not an ``OSError``, so neither urllib3 nor the SDK's retry catches it.
        """
        def post() -> Any:
            if _EXPORT_TAKES_TIMEOUT:
                return self._export(body, seconds)
            return self._export(body)  # pragma: no cover - depends on the installed SDK

        if not monkey.is_module_patched("socket"):
            return post()
        timer = gevent.Timeout(seconds)
        timer.start()
        try:
            return post()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise TimeoutError(f"no complete answer within {self._timeout:g}s (otlp_timeout, "
                               "or export_timeout if shorter)") from None
        finally:
            timer.close()

    def _accepted(self, body: bytes, spans: int) -> SpanExportResult | Delivery:
        """A 2xx may still reject spans: the specification's partial success, which the SDK
        ignores, so they vanished from every count (black-box run). They are counted as refused
        (sent, then refused by the destination), as Jaeger's port-unreachable datagrams are;
        the collector is not asked again, as the specification says."""
        try:
            partial = ExportTraceServiceResponse.FromString(body).partial_success
        except Exception:  # an empty body, or not protobuf: nothing rejected that we can tell
            return SpanExportResult.SUCCESS
        rejected = min(max(partial.rejected_spans, 0), spans)
        if not rejected and not partial.error_message:
            return SpanExportResult.SUCCESS
        log.warning("OTLP collector at %s rejected %d of %d spans: %s", self.shown, rejected,
                    spans, partial.error_message or "(it gave no reason)")
        return Delivery(sent=spans, failed=0, dropped=0, refused=rejected)

    def shutdown(self) -> None:
        self._stopping.set()  # a backoff in progress ends now
        super().shutdown()
