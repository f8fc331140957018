"""A batching span processor whose ``on_end`` can never hold up an SPOE ACK.

The SDK's ``BatchSpanProcessor`` is close, but this agent needs three guarantees spelled out and
observable: ``on_end`` only appends to a bounded deque (a full queue drops the span and counts it,
it never blocks or raises); a slow or stalled exporter cannot make the queue grow past its bound;
and every failure is a counter, not an exception in the request path.

The flush loop uses ``threading``.  Once gevent has monkeypatched the process (``cli.main`` does so
first thing) that thread is a greenlet and its waits are cooperative; without monkeypatching it is
a real thread.  Both work: the only cross-thread operations are ``deque`` appends/pops (atomic)
and ``Event`` signalling.

Under gevent the flush loop shares the one thread with the request path, so any stretch of export
work delays every NOTIFY that arrives meanwhile: translating and encoding a 512-span batch in one
go takes ~5 ms, which was the whole of the agent's added p99 latency at low load (request p99
1.3 ms without export, 4.2 ms with it, ``benchmarks.spop_load --sequenced -c 1 -w 1``).  With an
exporter that can encode separately from sending (``encode``/``send_encoded``, as
``FastJaegerExporter``), the loop therefore encodes spans a few at a time as they end, each slice
when the event loop has served every ready connection, and sends the accumulated bytes once a
batch's worth is encoded or the delay is up: the transport still gets full datagrams and posts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from gevent import monkey
from gevent.hub import Waiter, get_hub
from opentelemetry.context import (
    _SUPPRESS_INSTRUMENTATION_KEY,
    Context,
    attach,
    detach,
    set_value,
)
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger(__name__)


@dataclass
class ProcessorStats:
    """Plain counters (spans unless named otherwise); never reset."""

    queued: int = 0
    exported: int = 0
    dropped_queue_full: int = 0
    dropped_after_shutdown: int = 0
    # queued, or taken by the worker and not yet exported, when shutdown's deadline passed
    dropped_shutdown_deadline: int = 0
    export_errors: int = 0  # export calls that raised, returned FAILURE or lost any span
    # The spans those calls lost: all they were handed, unless the exporter says which (ours
    # does: the spans it dropped as too big or unencodable are its own reasons, not these).
    export_failed_spans: int = 0
    # Spans counted in ``exported`` when sent that the destination refused afterwards (over
    # UDP, jaeger-agent's host answering "port unreachable"; the exporter says, in a Delivery).
    export_refused_spans: int = 0


class QueueSpanProcessor(SpanProcessor):
    """Queue ended spans and export them in batches from a background loop.

    A batch goes out as soon as ``max_export_batch_size`` spans are queued, and whatever is
    queued goes out at the latest ``schedule_delay_s`` after the previous flush.
    ``export_timeout_s`` is the default deadline for ``shutdown`` to drain the queue; an export
    call itself cannot be interrupted, so exporters must bound their own I/O (FastJaegerExporter
    has a socket timeout).
    """

    ERROR_LOG_INTERVAL_S = 60.0
    RECOVERED_AFTER_S = 10.0  # exports that worked this long after a failure: recovered

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = 20480,
        max_export_batch_size: int = 512,
        schedule_delay_s: float = 0.5,
        export_timeout_s: float = 30,
        encode_slice: int = 16,
    ) -> None:
        if max_queue_size < 1 or max_export_batch_size < 1:
            raise ValueError("max_queue_size and max_export_batch_size must be positive")
        if schedule_delay_s <= 0:
            raise ValueError("schedule_delay_s must be positive")
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.max_export_batch_size = min(max_export_batch_size, max_queue_size)
        self.schedule_delay_s = schedule_delay_s
        self.export_timeout_s = export_timeout_s
        # spans encoded, not yet sent (an exporter with encode/send_encoded only); the worker's.
        # It wakes to encode once encode_slice spans are queued rather than a whole batch.
        self._encoder: Any = exporter if hasattr(exporter, "send_encoded") else None
        self._encoded: Any = None
        self.encode_slice = max(1, min(encode_slice, self.max_export_batch_size))
        self._wake_at = self.encode_slice if self._encoder else self.max_export_batch_size
        self.stats = ProcessorStats()
        # maxlen is a backstop for racing threads; on_end checks the length itself to count drops
        self._queue: deque[ReadableSpan] = deque(maxlen=max_queue_size)
        self._shutdown = False
        # Spans the worker took from the queue and has not yet counted (being encoded, encoded
        # or being sent): shutdown counts them as dropped if the deadline passes meanwhile.
        # Once it has, ``_abandoned`` tells the worker they are no longer its to count.
        self._held = 0
        self._abandoned = False
        self._last_error_log = float("-inf")
        # Since when exports fail, and the spans lost since: the failures are logged once a
        # minute at most, and without a word when they stop an operator could not tell a
        # collector that came back from one whose failures are only not logged any more.
        self._failing_since: float | None = None
        self._failed_last = 0.0
        self._lost_while_failing = 0
        self._drain_deadline = float("inf")
        self._start_worker()
        if hasattr(os, "register_at_fork"):
            ref = weakref.WeakMethod(self._after_fork)
            os.register_at_fork(after_in_child=lambda: (ref() or (lambda: None))())

    def _start_worker(self) -> None:
        self._wake = threading.Event()
        self._count_lock = threading.Lock()  # held for counting only, never across I/O
        self._flush_lock = threading.Lock()
        self._flush_waiters: list[threading.Event] = []
        self._worker = threading.Thread(
            target=self._run, name="spoe-agent-span-export", daemon=True
        )
        self._worker.start()

    def _after_fork(self) -> None:
        # the worker did not survive the fork; the parent's queued spans are the parent's to send
        self._queue.clear()
        self._encoded = None
        self._held = 0
        if not self._shutdown:
            self._start_worker()

    @property
    def queue_size(self) -> int:
        """Spans ended and not yet handed to the transport (encoded ones included)."""
        if self._abandoned:  # what the worker still holds was counted as dropped
            return len(self._queue)
        encoded = self._encoded
        return len(self._queue) + (len(encoded) if encoded is not None else 0)

    @property
    def pending(self) -> int:
        """Spans ended and not yet exported or given up: queued, encoded, or being sent. What a
        process killed now would lose of them."""
        if self._abandoned:
            return len(self._queue)
        return len(self._queue) + self._held

    # -- SpanProcessor interface ---------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a sampled span, or drop and count it; never blocks, never raises."""
        if self._shutdown or span.context.trace_flags.sampled:
            self.enqueue(span)

    def enqueue(self, span: Any) -> None:
        """``on_end`` for an item the caller knows is sampled, e.g. a registry ``SpanRecord``
        (a tuple with no SpanContext to ask) bound for an exporter that takes those."""
        if self._shutdown:
            self.stats.dropped_after_shutdown += 1
            return
        queue = self._queue
        if len(queue) >= self.max_queue_size:
            self.stats.dropped_queue_full += 1
            return
        queue.append(span)
        self.stats.queued += 1
        if len(queue) >= self._wake_at and not self._wake.is_set():
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued so far; False if that did not finish within the timeout."""
        if self._shutdown:
            return not self._queue
        done = threading.Event()
        with self._flush_lock:
            self._flush_waiters.append(done)
        self._wake.set()
        return done.wait(timeout_millis / 1000)

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop accepting spans, export what is queued within the deadline, shut the exporter."""
        if self._shutdown:
            return
        timeout = self.export_timeout_s if timeout_s is None else timeout_s
        self._drain_deadline = time.monotonic() + timeout
        self._shutdown = True
        self._wake.set()
        self._worker.join(timeout)
        # Whatever is still queued or held by the worker (e.g. the batch a stalled collector
        # never answered) is lost when the process exits: count it now, or the summary and
        # /metrics would say nothing was dropped.
        with self._count_lock:
            self._abandoned = True
            lost = self._held + len(self._queue)
            self._held = 0
            self._queue.clear()
            self.stats.dropped_shutdown_deadline += lost
        if lost:
            log.warning(
                "span export did not finish within %.1fs; %d spans left, counted as dropped",
                timeout,
                lost,
            )
        try:
            self.exporter.shutdown()
        except Exception:
            log.exception("span exporter shutdown failed")

    # -- the flush loop ------------------------------------------------------------------------

    def _run(self) -> None:
        next_flush = time.monotonic() + self.schedule_delay_s
        while not self._shutdown:
            timeout = next_flush - time.monotonic()
            if timeout > 0:
                self._wake.wait(timeout)
            self._wake.clear()
            if self._shutdown:
                break
            with self._flush_lock:
                waiters, self._flush_waiters = self._flush_waiters, []
            now = time.monotonic()
            if waiters or now >= next_flush:
                self._export_guarded(everything=True)
                next_flush = time.monotonic() + self.schedule_delay_s
                for waiter in waiters:
                    waiter.set()
            else:
                self._export_guarded(everything=False)
        self._export_guarded(everything=True, deadline=self._drain_deadline)
        with self._flush_lock:
            waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            waiter.set()

    def _export_guarded(self, everything: bool, deadline: float = float("inf")) -> None:
        """A bug of ours in one export must cost that batch, not every span from then on: an
        exception that ended this thread would stop the export, silently, for good."""
        try:
            self._export(everything, deadline)
        except Exception:
            log.exception("span export failed unexpectedly; the export goes on")

    def _export(self, everything: bool, deadline: float = float("inf")) -> None:
        """Export full batches, then (if ``everything``) the remainder."""
        if self._encoder is not None:
            self._encode_and_send(everything, deadline)
            return
        queue = self._queue
        size = self.max_export_batch_size
        first = True
        while queue and (everything or len(queue) >= size):
            if not first:
                time.sleep(0)  # let the request path run between batches
                if time.monotonic() >= deadline:
                    return
            first = False
            batch = self._take(size)
            if batch:
                self._export_batch(batch)

    def _encode_and_send(self, everything: bool, deadline: float) -> None:
        """Encode what is queued, sending each time a batch's worth is encoded; if
        ``everything``, send the rest too.

        Each slice is what was queued when it starts (at most a batch), encoded once the
        ready connections were served: ``encode_slice`` spans or so at low load, which keeps
        each hold-up of the request path short. With a batch or more queued (a saturated
        agent, whose loop is never idle) slices follow each other without a pause, as whole
        batches did before, so export keeps up instead of doing one slice per turn of the loop.
        """
        queue = self._queue
        size = self.max_export_batch_size
        while queue:
            if len(queue) < size:  # light load: every ready connection goes first
                _pause()
            if time.monotonic() >= deadline:
                return
            # What tops up what is encoded so far to one batch, no more: the batch size is the
            # most a post holds (OTEL_BSP_MAX_EXPORT_BATCH_SIZE), which operators set to stay
            # under a collector's body limit; whole slices made posts of up to twice it.
            slice_ = self._take(size - (0 if self._encoded is None else len(self._encoded)))
            if not slice_:
                return
            try:
                self._encoded = self._encoder.encode(slice_, self._encoded)
            except Exception as exc:  # the exporter counts what it can; this must not kill us
                self._failed(len(slice_), exc)
            if self._encoded is not None and len(self._encoded) >= size:
                self._pause_if_light()  # the slice and the send are two hold-ups, not one
                self._send_encoded()
        if everything and self._encoded is not None:
            self._send_encoded()

    def _take(self, count: int) -> list[Any]:
        """Pop up to ``count`` spans, which the worker answers for from now on."""
        queue = self._queue
        with self._count_lock:
            if self._abandoned:
                return []
            taken = [queue.popleft() for _ in range(min(count, len(queue)))]
            self._held += len(taken)
        return taken

    def _settle(self, spans: int, exported: int, failed: int = 0, refused: int = 0) -> bool:
        """Count the outcome for ``spans`` the worker held, ``exported`` of them sent and
        ``failed`` lost in sends (the rest, if any, the exporter dropped and counts under a
        reason of its own), and ``refused`` spans exported before that the destination
        refused since; False if shutdown already counted them all as dropped (an export
        that outlived the deadline)."""
        recovered: tuple[int, float] | None = None
        with self._count_lock:
            if self._abandoned:
                return False
            self._held -= spans
            stats = self.stats
            stats.exported += exported
            if exported < spans or refused:
                stats.export_errors += 1
                stats.export_failed_spans += failed
                stats.export_refused_spans += refused
                if failed or refused:
                    now = time.monotonic()
                    if self._failing_since is None:
                        self._failing_since = now
                    self._failed_last = now
                    self._lost_while_failing += failed + refused
            elif (self._failing_since is not None
                  and time.monotonic() - self._failed_last >= self.RECOVERED_AFTER_S):
                # Only once exports have worked for a while: to a closed UDP port every other
                # datagram fails (the kernel reports each refusal once), and "works again"
                # between two failures would be false.
                recovered = (self._lost_while_failing, self._failed_last - self._failing_since)
                self._failing_since, self._lost_while_failing = None, 0
        if recovered is not None:
            log.info("exporting works again: %d spans were lost over the %.0fs it failed, and "
                     "none since", *recovered)
        return True

    def _send_encoded(self) -> None:
        encoded, self._encoded = self._encoded, None
        self._deliver(self._send_with_pauses, encoded)

    def _send_with_pauses(self, encoded: Any) -> Any:
        # A batch is several 65 KB datagrams: the ready connections go between two of them.
        return self._encoder.send_encoded(encoded, between=self._pause_if_light)

    def _pause_if_light(self) -> None:
        if len(self._queue) < self.max_export_batch_size:
            _pause()

    def _export_batch(self, batch: list[ReadableSpan]) -> None:
        self._deliver(self.exporter.export, batch)

    def _deliver(self, send: Any, spans: Any) -> None:
        """Hand ``spans`` (a list, or encoded ones) to ``send`` and count the outcome: a
        ``SpanExportResult``, or from an encoding exporter a ``Delivery`` that says what
        became of each span (one lost span must not count its batch as lost)."""
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        error: Exception | None = None
        try:
            result = send(spans)
        except Exception as exc:
            error, result = exc, SpanExportResult.FAILURE
        finally:
            detach(token)
        if result is SpanExportResult.SUCCESS:
            self._settle(len(spans), len(spans))
        elif result is SpanExportResult.FAILURE:
            self._failed(len(spans), error)
        elif (self._settle(len(spans), result.sent, result.failed, result.refused)
              and (result.failed or result.refused)):
            self._log_failure(result.failed, "see the exporter's warning above",
                              refused=result.refused)

    def _failed(self, spans: int, error: Exception | None) -> None:
        if self._settle(spans, 0, spans):
            self._log_failure(spans, "the exporter reported failure" if error is None
                              else describe_error(error), error)

    def _log_failure(self, spans: int, why: str, error: Exception | None = None,
                     refused: int = 0) -> None:
        """``refused`` spans went out in an earlier send and were lost after it: saying that
        they failed to export would send an operator looking for an error in the send."""
        now = time.monotonic()
        if now - self._last_error_log >= self.ERROR_LOG_INTERVAL_S:  # a dead exporter: log rarely
            self._last_error_log = now
            what = []
            if spans:
                what.append(f"exporting {spans} spans failed")
            if refused:
                what.append(f"{refused} spans sent before were refused by the destination")
            # One line, as the Jaeger exporter's own: an HTTP client's traceback (requests over
            # urllib3 chains four exceptions) is ~150 lines saying "connection refused".
            log.warning(
                "%s (%d failed exports so far): %s",
                " and ".join(what),
                self.stats.export_errors,
                why,
                exc_info=error if log.isEnabledFor(logging.DEBUG) else None,
            )


def describe_error(error: BaseException) -> str:
    """``error``'s type, and the innermost exception it was raised from or while handling.

    The outer exceptions of a chain mostly wrap the inner one's message in pool and URL details;
    the innermost is the cause an operator can act on: ``ConnectionError caused by
    ConnectionRefusedError: [Errno 111] Connection refused``.
    """
    inner = error
    seen = {id(error)}
    while True:
        below = inner.__cause__
        if below is None and not inner.__suppress_context__:
            below = inner.__context__
        if below is None or id(below) in seen:
            break
        seen.add(id(below))
        inner = below
    text = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
    return text if inner is error else f"{type(error).__name__} caused by {text}"


IDLE_WAIT_MAX_S = 0.001


def _pause() -> None:
    """Let the request path run before more export work.

    Under gevent, ``sleep(0)`` only requeues this greenlet behind the callbacks already due, and
    the hub may resume it without polling for I/O for up to the switch interval (5 ms). So this
    waits for the hub to be idle (every ready connection served first), but no longer than
    ``IDLE_WAIT_MAX_S``, since a busy agent is rarely idle. A real thread sleeps briefly.
    """
    if not monkey.is_module_patched("threading"):
        time.sleep(1e-6)
        return
    loop = get_hub().loop
    waiter = Waiter()
    idle = loop.idle()
    timer = loop.timer(IDLE_WAIT_MAX_S)
    idle.start(waiter.switch, None)
    timer.start(waiter.switch, None)
    try:
        waiter.get()
    finally:
        idle.close()
        timer.close()
