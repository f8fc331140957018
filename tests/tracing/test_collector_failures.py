"""A Jaeger collector that answers a byte at a time: one post is bounded as a whole, and a stop
cuts a post short without an error of the agent's own.

Plain threads here (the exporter's per-read bounds), and the agent's own setting in a
subprocess, monkeypatched by gevent (the timeout over the whole post, headers included).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from spoe_agent.tracing.jaeger import FastJaegerExporter, transport
from spoe_agent.tracing.jaeger.decode import decode_emit_batch
from tests.support.procs import free_port

REPO = Path(__file__).resolve().parents[2]
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000


class Trickle:
    """Reads one post, then answers it one byte every 0.1 s (the body only, or all of it)."""

    def __init__(self, headers_too: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requested = threading.Event()
        self.stop = threading.Event()
        self.headers_too = headers_too
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/traces"

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            length = int(match.group(1)) if match else 0
            while len(body) < length:
                body += conn.recv(65536)
            self.requested.set()
            start = 0 if self.headers_too else ANSWER.index(b"\r\n\r\n") + 4
            try:
                conn.sendall(ANSWER[:start])
                for i in range(start, len(ANSWER)):
                    if self.stop.wait(0.1):
                        return
                    conn.sendall(ANSWER[i:i + 1])
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def spans(n: int = 3) -> list[ReadableSpan]:
    return [
        ReadableSpan(name=f"span {i}", start_time=1, end_time=2,
                     context=SpanContext(i + 1, i + 1, False, TraceFlags(1)))
        for i in range(n)
    ]


def test_a_trickled_answer_fails_the_post_once_the_timeout_is_up() -> None:
    """Each byte came well within a per-read timeout, so the post went on for the whole
    answer (100 s here): the export stalled, and the queue behind it filled and dropped."""
    collector = Trickle()
    exporter = FastJaegerExporter(collector_endpoint=collector.endpoint, timeout=1.0)
    result: list[SpanExportResult] = []
    worker = threading.Thread(target=lambda: result.append(exporter.export(spans())))
    try:
        worker.start()
        worker.join(20)  # liveness only: without the bound it runs for 100 s
        assert not worker.is_alive() and result == [SpanExportResult.FAILURE]
        assert exporter.stats.send_errors == 1 and exporter.stats.spans_failed == 3
    finally:
        collector.close()
        worker.join(20)


GEVENT_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import logging, sys
import gevent
sys.path.insert(0, {repo!r})
from tests.tracing.test_collector_failures import Trickle, spans
from spoe_agent.tracing.jaeger import FastJaegerExporter

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")

# A post whose headers themselves trickle: bounded as a whole under gevent.
collector = Trickle(headers_too=True)
exporter = FastJaegerExporter(collector_endpoint=collector.endpoint, timeout=1.0)
post = gevent.spawn(exporter.export, spans())
post.join(20)
assert post.dead and post.value.name == "FAILURE", post.value
collector.close()

# A stop while a post reads its answer: the post fails at once, and the stop raises nothing.
collector = Trickle()
exporter = FastJaegerExporter(collector_endpoint=collector.endpoint, timeout=60.0)
post = gevent.spawn(exporter.export, spans())
assert collector.requested.wait(20)
gevent.sleep(0.3)  # reading the body now
exporter.shutdown()
post.join(20)
assert post.dead and post.value.name == "FAILURE", post.value
collector.close()
print("done")
"""


def test_under_gevent_the_whole_post_is_bounded_and_a_stop_cuts_it_cleanly() -> None:
    """The agent's setting. Closing the connection from the stop, while the post read its
    answer, raised "reentrant call inside BufferedReader" in the stop, logged as an ERROR."""
    done = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT.format(repo=str(REPO))],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "done", done.stdout + done.stderr
    assert "reentrant" not in done.stdout + done.stderr
    assert not [line for line in lines if line.startswith(("ERROR", "CRITICAL"))], done.stdout
    # The post that failed says why, with its endpoint; the one the stop cut says nothing at
    # warning level (the stop's deadline counts its spans, before "stopped" is logged).
    assert sum("export to http://127.0.0.1:" in line for line in lines) == 1, done.stdout
    # ... and names the bound that fired (black-box run: "the export timeout" read as
    # export_timeout, 30 s, where jaeger_timeout, 2 s, had cut the post).
    assert ("no complete answer within 1s (jaeger_timeout, or export_timeout if shorter)"
            in done.stdout), done.stdout
    assert "aborted" not in done.stdout


def test_a_failed_post_is_logged_without_the_credentials_of_its_url(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens: refused
    exporter = FastJaegerExporter(
        collector_endpoint=f"http://tracer:S3cr3t@127.0.0.1:{port}/api/traces", timeout=5)
    with caplog.at_level(logging.WARNING):
        assert exporter.export(spans()) is SpanExportResult.FAILURE
    assert f"export to http://127.0.0.1:{port}/api/traces failed" in caplog.text
    assert "S3cr3t" not in caplog.text and "tracer" not in caplog.text


def test_a_closed_jaeger_agent_port_shows_as_refused_spans_not_as_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A jaeger-agent down, or a wrong port: every datagram was lost while the counters said
    them all exported, and nothing was logged (black-box run: 42,795 spans). Then, counting the
    failed sends, half the loss went uncounted: the refusal a send reports is the datagram
    before's, and that send's own never left. Now every datagram is sent and each refusal
    is charged to the datagram it was for."""
    port = free_port()
    exporter = FastJaegerExporter(agent_host_name="127.0.0.1", agent_port=port)
    with caplog.at_level(logging.WARNING):
        deliveries = []
        for _ in range(6):
            deliveries.append(exporter.send_encoded(exporter.encode(spans())))
            time.sleep(0.05)  # the ICMP answer is back (on loopback, at once)
    # Each send but the first finds the refusal of the one before; the last one's is pending.
    assert [d.refused for d in deliveries] == [0, 3, 3, 3, 3, 3], deliveries
    assert all((d.sent, d.failed) == (3, 0) for d in deliveries), deliveries
    stats = exporter.stats
    assert (stats.spans_sent, stats.spans_failed, stats.spans_refused) == (18, 0, 15), stats
    assert f"Jaeger agent export to 127.0.0.1:{port} failed: Connection refused: the " \
        "datagram sent before (3 spans) was lost" in caplog.text
    exporter.shutdown()


def test_the_first_datagram_after_jaeger_agent_is_back_is_delivered() -> None:
    """Black-box run: the refusal of a datagram sent during the outage, still pending when
    jaeger-agent came back, failed the next send, and its 155 spans, which could have been
    delivered, were discarded."""
    port = free_port()
    exporter = FastJaegerExporter(agent_host_name="127.0.0.1", agent_port=port)
    first = exporter.send_encoded(exporter.encode(spans()))
    time.sleep(0.05)  # its refusal is pending on the socket
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", port))
    receiver.settimeout(5)
    try:
        second = exporter.send_encoded(exporter.encode(spans(2)))
        third = exporter.send_encoded(exporter.encode(spans(4)))
        got = [len(decode_emit_batch(receiver.recv(65536))[1].spans) for _ in range(2)]
    finally:
        receiver.close()
        exporter.shutdown()
    assert (first.sent, first.refused) == (3, 0)
    assert (second.sent, second.failed, second.refused) == (2, 0, 3)  # the first's refusal
    assert (third.sent, third.failed, third.refused) == (4, 0, 0)
    assert got == [2, 4]


def _sender_over(fake: object) -> transport._UDPSender:
    """A UDP sender whose socket is ``fake`` (getsockopt and send)."""
    sender = transport._UDPSender("127.0.0.1", 6831)
    sender._target = lambda: (fake, ("127.0.0.1", 6831))  # type: ignore[method-assign]
    return sender


def test_an_unreachable_host_is_charged_to_the_datagram_before_too() -> None:
    """An ICMP "host unreachable" is held on the socket as a refusal is, but a send that finds
    it would fail with an error that can also be its own: it is read (and cleared) before each
    send, so the datagram is sent and the error charged to the one before."""

    class Held:
        def __init__(self) -> None:
            self.pending, self.sent = errno.EHOSTUNREACH, []  # type: list[bytes]

        def getsockopt(self, level: int, option: int) -> int:
            assert (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR)
            pending, self.pending = self.pending, 0
            return pending

        def send(self, data: bytes) -> int:
            if self.pending:
                raise OSError(self.pending, os.strerror(self.pending))
            self.sent.append(data)
            return len(data)

    held = Held()
    sender = _sender_over(held)
    earlier = sender.send(b"one")
    assert earlier is not None and earlier.errno == errno.EHOSTUNREACH
    assert sender.send(b"two") is None
    assert held.sent == [b"one", b"two"]


def test_a_kept_alive_connection_gets_the_time_left_for_its_own_post() -> None:
    """Code review: a reused connection's socket kept the time its last post had left (0.3 s
    of 2 s), and the next, larger post failed with a timeout it had not used."""
    listener = socket.create_server(("127.0.0.1", 0))
    answered = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for delay in (1.7, 0.5):
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
                time.sleep(delay)  # the first answer leaves its post 0.3 s
                while len(body) < length:
                    body += conn.recv(1 << 20)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                answered.append(len(body))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    sender = transport._HTTPSender(
        f"http://127.0.0.1:{listener.getsockname()[1]}/api/traces", None, None, 2.0)
    try:
        sender.send(b"x")
        sender.send(b"y" * (8 << 20))  # its headers go out, then it waits 0.5 s for the read
    finally:
        sender.close()
        listener.close()
        server.join(20)
    assert answered == [1, 8 << 20]


def test_one_export_is_bounded_by_the_timeout_whatever_its_services() -> None:
    """Code review: each service's batch is a post of its own, and each took the whole
    timeout, so an export to a collector that never answers lasted a timeout per service
    (up to 1,024 of them). Once the first post has used up the export's time, the others
    fail without connecting."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                held.append(listener.accept()[0])  # never answered
        except OSError:
            return

    threading.Thread(target=accept, daemon=True).start()
    exporter = FastJaegerExporter(
        collector_endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}/api/traces",
        timeout=1.0)
    batch = []
    for service in "abcd":
        for span in spans(2):
            batch.append(ReadableSpan(name=span.name, context=span.context, start_time=1,
                                      end_time=2, resource=Resource({"service.name": service})))
    try:
        delivery = exporter.send_encoded(exporter.encode(batch))
    finally:
        exporter.shutdown()
        listener.close()
        for conn in held:
            conn.close()
    assert (delivery.sent, delivery.failed) == (0, 8)
    assert len(held) == 1, "a post per service was tried, each with the whole timeout"


def test_no_datagram_and_no_socket_once_the_exporter_is_shut_down() -> None:
    """Code review: a send in progress when the exporter shut down (its deadline past)
    reopened the UDP socket, sent on, and never closed it; those spans counted as sent,
    where the processor had counted them dropped."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(5)
    exporter = FastJaegerExporter("127.0.0.1", sink.getsockname()[1], max_packet_size=600)
    batch = [ReadableSpan(name=f"span {i}", context=SpanContext(i + 1, i + 1, False,
                                                                TraceFlags(1)),
                          start_time=1, end_time=2, attributes={"a": "x" * 200})
             for i in range(5)]
    try:
        delivery = exporter.send_encoded(exporter.encode(batch), between=exporter.shutdown)
        first = decode_emit_batch(sink.recv(65536))[1].spans
        sink.setblocking(False)
        with pytest.raises(BlockingIOError):
            sink.recv(65536)
    finally:
        sink.close()
    assert exporter._udp._sock is None
    assert delivery.sent == len(first) == exporter.stats.spans_sent
    assert delivery.sent + delivery.failed == 5
    with pytest.raises(OSError, match="shut down"):
        exporter._udp.send(b"late")
    assert exporter._udp._sock is None


def test_a_failed_lookup_is_not_asked_again_for_each_datagram(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Code review: every datagram after a failed lookup looked the host up again, so with a
    resolver that times out a batch took one timeout per datagram."""
    lookups = []

    def failing(*args: object, **kwargs: object) -> list[object]:
        lookups.append(args[0])
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    exporter = FastJaegerExporter("jaeger.invalid", 6831, max_packet_size=600)
    batch = [ReadableSpan(name=f"span {i}", context=SpanContext(i + 1, i + 1, False,
                                                                TraceFlags(1)),
                          start_time=1, end_time=2, attributes={"a": "x" * 200})
             for i in range(10)]
    delivery = exporter.send_encoded(exporter.encode(batch))
    assert (delivery.sent, delivery.failed) == (0, 10)
    assert exporter.stats.send_errors > 1  # each datagram failed, and was counted
    assert lookups == ["jaeger.invalid"]
    exporter.shutdown()


def test_a_refusal_read_before_a_failed_send_is_said_by_the_next_one() -> None:
    """Code review: reading the pending error clears it, and a send that then failed for a
    reason of its own lost it, so the datagram before stayed counted as delivered."""

    class Flaky:
        def __init__(self) -> None:
            self.pending, self.failures, self.sent = errno.ECONNREFUSED, 1, []  # type: ignore[var-annotated]

        def getsockopt(self, level: int, option: int) -> int:
            pending, self.pending = self.pending, 0
            return pending

        def send(self, data: bytes) -> int:
            if self.failures:
                self.failures -= 1
                raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
            self.sent.append(data)
            return len(data)

    flaky = Flaky()
    sender = _sender_over(flaky)
    with pytest.raises(OSError, match="unreachable"):
        sender.send(b"one")
    earlier = sender.send(b"two")
    assert earlier is not None and earlier.errno == errno.ECONNREFUSED
    assert sender.send(b"three") is None
    assert flaky.sent == [b"two", b"three"]
