"""Faults around the agent: a collector that refuses or stalls, HAProxy restarting, the agent
being SIGKILLed. In each case the request path must not notice more than it has to.

The collector is the Jaeger HTTP endpoint (``OTEL_EXPORTER_JAEGER_ENDPOINT``) pointed at a
port where first nothing listens, or a server accepts and never answers; then a real
:class:`JaegerReceiver` takes over the same port, playing the collector coming back.
"""

from __future__ import annotations

import http.client
import re
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType, Message
from spoe_agent.viewer.receiver import JaegerReceiver
from tests.hardening.support import (
    SLOW_APP,
    agent_on_port,
    clean_env,
    notify_ok,
    scrape,
    value,
    whole_session,
    write_ini,
)
from tests.integration.backend import Backend
from tests.integration.test_haproxy_core import haproxy_config, spoe_config
from tests.integration.tracing_support import describe, get, hop_config
from tests.support.haproxy import HAProxy
from tests.support.procs import AgentProcess, free_port, wait_until
from tests.support.spop_client import SpopClient

AgentFactory = Callable[..., AgentProcess]


class StallingCollector:
    """Accepts connections, reads whatever is sent, never answers: a collector stuck for good."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.accepted: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    @staticmethod
    def _swallow(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        # shutdown() first: close() alone does not wake the thread blocked in accept(), and
        # until it wakes the port stays bound and the recovered collector cannot take it.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for conn in self.accepted:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()


def collector_env(port: int, **extra: str) -> dict[str, str]:
    # OTEL_BSP_EXPORT_TIMEOUT (ms) bounds one stalled HTTP export.
    settings = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BSP_EXPORT_TIMEOUT": "5000", **extra}
    return clean_env(OTEL_TRACES_EXPORTER="jaeger",
                     OTEL_EXPORTER_JAEGER_ENDPOINT=f"http://127.0.0.1:{port}/api/traces",
                     **settings)


@pytest.fixture
def collector_port() -> int:
    return free_port()


@pytest.fixture
def recovered(collector_port: int) -> Iterator[Callable[[], JaegerReceiver]]:
    """Factory: start the real collector on the port the agent exports to."""
    started: list[JaegerReceiver] = []

    def start() -> JaegerReceiver:
        rec = JaegerReceiver(udp_addr=None, http_addr=("127.0.0.1", collector_port), quiet_s=0.5)
        started.append(rec.start())
        return rec

    yield start
    for rec in started:
        rec.stop(flush=False)


def test_refusing_collector_costs_spans_not_acks_and_recovery_is_automatic(
    spoe_agent: AgentFactory, collector_port: int, recovered: Callable[[], JaegerReceiver]
) -> None:
    metrics = free_port()
    env = collector_env(collector_port, OTEL_BSP_MAX_QUEUE_SIZE="50",
                        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="10")
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=None, env=env)
    with SpopClient((agent.host, agent.port), timeout=10) as client:
        client.handshake()
        stream = 1
        for i in range(40):  # every NOTIFY is ACKed while nothing listens on the collector port
            for message in whole_session(f"down-{i}"):
                notify_ok(client, stream, [message])
                stream += 2
        wait_until(lambda: (value(scrape(metrics), "spoe_agent_exporter_errors_total") or 0) > 0,
                   what="failed exports to be counted")
        s = scrape(metrics)
        assert value(s, "spoe_agent_export_queue_size") <= 50
        failed = value(s, "spoe_agent_spans_dropped_total", reason="export_failed") or 0
        full = value(s, "spoe_agent_spans_dropped_total", reason="queue_full") or 0
        assert failed > 0 and failed + full <= 80

        receiver = recovered()
        for i in range(3):
            for message in whole_session(f"up-{i}", root=f"up-{i}", child=f"up-{i}-child"):
                notify_ok(client, stream, [message])
                stream += 2
        wanted = {f"up-{i}" for i in range(3)} | {f"up-{i}-child" for i in range(3)}
        assert receiver.wait_for(
            lambda spans: wanted <= {s.operation_name for s in spans}, timeout=15
        ), describe(receiver.spans)
    assert "Traceback" not in agent.logs(), agent.describe_logs()
    # One warning per minute at most, however many exports failed.
    assert agent.logs().count("exporting") <= 1, agent.describe_logs()


def test_refusing_otlp_collector_is_one_warning_line_naming_the_cause(
    spoe_agent: AgentFactory, collector_port: int
) -> None:
    """requests and urllib3 chain four exceptions for a refused connection: their traceback
    was ~150 lines a minute, where the Jaeger exporter says the same in one."""
    env = clean_env(OTEL_TRACES_EXPORTER="otlp",
                    OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}",
                    OTEL_BSP_SCHEDULE_DELAY="50")
    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=None, env=env)
    with SpopClient((agent.host, agent.port), timeout=10) as client:
        client.handshake()
        for i, message in enumerate(whole_session("refused")):
            notify_ok(client, 2 * i + 1, [message])
        wait_until(lambda: (value(scrape(metrics), "spoe_agent_exporter_errors_total") or 0) > 0,
                   what="the failed export to be counted")
        wait_until(lambda: "exporting" in agent.logs(), what="the failure to be logged")
    lines = [line for line in agent.logs().splitlines() if "exporting" in line]
    assert len(lines) == 1, agent.describe_logs()
    assert "WARNING" in lines[0] and "Connection refused" in lines[0], lines
    assert "Traceback" not in agent.logs(), agent.describe_logs()


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["jaeger", "otlp"])
def test_sigterm_with_a_stalled_collector_still_exits_zero(
    spoe_agent: AgentFactory, collector_port: int, exporter: str
) -> None:
    """The flush at shutdown has a deadline: a collector stuck for minutes cannot hold it.
    The spans it holds then are lost, and counted as such: the export being stalled took
    them off the queue, and the summary once said "0 dropped"."""
    stall = StallingCollector(collector_port)
    metrics = free_port()
    # An export that would wait a minute: only the shutdown deadline can end it.
    if exporter == "jaeger":
        env = collector_env(collector_port, OTEL_BSP_EXPORT_TIMEOUT="60000")
    else:
        env = clean_env(OTEL_TRACES_EXPORTER="otlp",
                        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}",
                        OTEL_BSP_SCHEDULE_DELAY="50", OTEL_BSP_EXPORT_TIMEOUT="60000")
    try:
        agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=None, env=env)
        with SpopClient((agent.host, agent.port), timeout=10) as client:
            client.handshake()
            stream = 1
            for session in range(3):
                for message in whole_session(f"stuck-{session}"):
                    notify_ok(client, stream, [message])
                    stream += 2
            wait_until(lambda: stall.accepted, what="the exporter to reach the collector")
            wait_until(lambda: value(scrape(metrics), "spoe_agent_spans_queued_total") == 6,
                       what="the six spans to be queued")
            s = scrape(metrics)
            assert value(s, "spoe_agent_spans_exported_total") == 0
            assert value(s, "spoe_agent_spans_dropped_total", reason="shutdown_deadline") == 0
            agent.process.send_signal(signal.SIGTERM)
            assert agent.process.wait(30) == 0, agent.describe_logs()
        logs = agent.logs()
        assert "span export did not finish within 5.0s; 6 spans left, counted as dropped" in (
            logs
        ), agent.describe_logs()
        assert ("tracing: 0 spans exported in all, 6 dropped (queue full 0, export failed 0, "
                "refused after they were sent 0, shutdown deadline 6, ended after the stop began "
                "0, too big for a datagram 0, invalid 0)") in logs, agent.describe_logs()
        # Black-box run: the aborted post then logged "export ... failed: File descriptor was
        # closed in another greenlet", after "stopped", about spans already counted.
        after = logs.split("spoe_agent.runner: stopped", 1)[1]
        assert "WARNING" not in after and "ERROR" not in after, agent.describe_logs()
    finally:
        stall.close()


# ------------------------------------------------------------------------- with HAProxy


@pytest.mark.haproxy
def test_stalled_collector_leaves_requests_untouched_and_the_queue_bounded(
    haproxy: Callable[..., HAProxy],
    spoe_agent: AgentFactory,
    backend: Backend,
    collector_port: int,
    recovered: Callable[[], JaegerReceiver],
) -> None:
    """The reference config has ``timeout processing 500ms``: an ACK held up by the stalled
    exporter would fail its event and show in X-Trace-Error. None may."""
    stall = StallingCollector(collector_port)
    metrics = free_port()
    queue = 200
    env = collector_env(collector_port, OTEL_BSP_MAX_QUEUE_SIZE=str(queue),
                        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="50")
    try:
        agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=None, env=env)
        port = free_port()
        hap = haproxy(hop_config(port=port, service="edge", server=backend.address, agent=agent))
        hap.wait_server_status("spoe-agents", "agent1", "UP", timeout=15)

        def requests(tag: str, count: int) -> list[str]:
            trace_ids = []
            for i in range(count):
                reply = get(port, f"/{tag}/{i}")
                assert reply.status == 200, reply
                assert "x-trace-error" not in reply.headers, reply.headers
                trace_ids.append(reply.headers["x-trace-id"])
                if i % 20 == 0:
                    size = value(scrape(metrics), "spoe_agent_export_queue_size")
                    assert size is not None and size <= queue
            return trace_ids

        requests("stalled", 60)  # 540 spans for a queue of 200
        wait_until(lambda: stall.accepted, what="the exporter to reach the stalled collector")
        s = scrape(metrics)
        assert value(s, "spoe_agent_export_queue_size") <= queue
        assert value(s, "spoe_agent_export_queue_limit") == queue
        assert value(s, "spoe_agent_spans_dropped_total", reason="queue_full") > 0
        # The exporter's own timeout ends the stuck export (it does not wedge the loop).
        wait_until(lambda: (value(scrape(metrics), "spoe_agent_exporter_errors_total") or 0) > 0,
                   timeout=30, what="the stalled export to time out")
        assert agent.process.running

        stall.close()
        receiver = recovered()
        after = requests("recovered", 5)
        for trace_id in after:
            assert receiver.wait_for(
                lambda spans, t=trace_id: sum(1 for s in spans if s.trace_id == t) >= 9,
                timeout=20,
            ), describe(receiver.spans)
        assert hap.server_stats("spoe-agents", "agent1")["status"] == "UP"
    finally:
        stall.close()


def _echo_request(port: int, path: str) -> dict[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200  # SPOE errors never fail the request itself
        return {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


@pytest.mark.haproxy
@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_frame_cut_off_by_the_peer_is_logged_with_what_was_lost(
    spoe_agent: AgentFactory, reset: bool
) -> None:
    """Events lost to a connection that ends mid-frame are said, not silently dropped."""
    agent = spoe_agent()
    frame = codec.notify(5, 1, [Message("m", [("q", "x" * 40)])])
    client = SpopClient((agent.host, agent.port), timeout=15)
    client.handshake()
    client.send(frame[:-10])
    if reset:  # SO_LINGER 0: the close sends a reset
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    wait_until(lambda: "closed in the middle of a frame" in agent.logs(), what="the warning")
    assert re.search(rf"connection from 127\.0\.0\.1:\d+ closed in the middle of a frame: "
                     rf"{len(frame) - 10} bytes of it lost", agent.logs()), agent.logs()
    with SpopClient((agent.host, agent.port), timeout=15) as probe:  # and it serves on
        assert probe.handshake()["version"] == "2.0"


def test_haproxy_restart_leaves_no_connection_behind(
    haproxy: Callable[..., HAProxy], spoe_agent: AgentFactory, backend: Backend,
) -> None:
    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app="tests.apps.echo:agent")
    port = free_port()
    config = haproxy_config(port, backend, agent)
    first = haproxy(config, spoe_config())
    first.wait_server_status("agents", "a1", "UP", timeout=15)
    assert _echo_request(port, "/check/one").get("x-v-echo_path") == "/check/one"
    assert value(scrape(metrics), "spoe_agent_connections_open") >= 1

    first.stop()  # a hard stop: HAProxy's connections vanish, with or without DISCONNECT
    wait_until(lambda: value(scrape(metrics), "spoe_agent_connections_open") == 0,
               what="the agent to let go of the dead HAProxy's connections")
    second = haproxy(config, spoe_config())
    second.wait_server_status("agents", "a1", "UP", timeout=15)
    headers = _echo_request(port, "/check/two")
    assert headers.get("x-v-echo_path") == "/check/two" and "x-v-err" not in headers, headers
    assert "Traceback" not in agent.logs(), agent.describe_logs()


@pytest.mark.haproxy
def test_sigkilled_agent_is_seen_down_then_back_by_spop_check(
    haproxy: Callable[..., HAProxy], backend: Backend, tmp_path: Path,
) -> None:
    port = free_port()
    agent = agent_on_port(tmp_path / "logs", port, app="tests.apps.echo:agent")
    restarted: AgentProcess | None = None
    try:
        agent.wait_ready()
        fe_port = free_port()
        hap = haproxy(haproxy_config(fe_port, backend, agent), spoe_config())
        hap.wait_server_status("agents", "a1", "UP", timeout=15)
        assert _echo_request(fe_port, "/check/before").get("x-v-echo_path") == "/check/before"

        agent.process.send_signal(signal.SIGKILL)
        assert agent.process.wait(10) == -signal.SIGKILL
        hap.wait_server_status("agents", "a1", "DOWN", timeout=15)
        assert "x-v-err" in _echo_request(fe_port, "/check/while-dead")  # HAProxy sees it

        restarted = agent_on_port(tmp_path / "logs", port, app="tests.apps.echo:agent",
                                  name="agent-restarted")
        restarted.wait_ready()  # the port is free again at once (SO_REUSEADDR)
        hap.wait_server_status("agents", "a1", "UP", timeout=15)
        headers = _echo_request(fe_port, "/check/after")
        assert headers.get("x-v-echo_path") == "/check/after" and "x-v-err" not in headers, headers
    finally:
        agent.stop()
        if restarted is not None:
            restarted.stop()


@pytest.mark.parametrize(
    ("app", "extra"),
    [(None, ()), ("tests.apps.echo:agent", ()), (None, ("--workers", "2"))],
    ids=["tracing", "application", "tracing-2-workers"],
)
def test_notifies_read_with_a_malformed_frame_are_acked_before_the_disconnect(
    spoe_agent: AgentFactory, app: str | None, extra: tuple[str, ...]
) -> None:
    """A black-box run sent a good NOTIFY and a bad one in one write: the good one was handled
    (its span exported) and never ACKed, the AGENT-DISCONNECT having closed the connection
    first. SPOE.txt: every NOTIFY is ACKed; the goodbye comes after."""
    agent = spoe_agent(*extra, "--exporter", "none", app=app)
    good = codec.notify(101, 1, [Message("m", [("k", "v")])])
    bad = codec.encode_frame(3, 0x2F7, 1, b"\x01\x01m\x01\x01x\x0b", 1)  # data type 11
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        client.send(good + bad)
        ack = client.read_frame()
        assert ack is not None and (ack.type, ack.stream_id, ack.frame_id) == (0x67, 101, 1), ack
        goodbye = client.read_frame()
        assert goodbye is not None and goodbye.type == 0x66, goodbye
        assert codec.decode_kv_list(goodbye.payload)["status-code"] == 4
        assert client.read_frame() is None


def test_a_handler_still_running_does_not_hold_the_goodbye(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """A concurrent handler that outlives the protocol error (here a 10-minute nap, with no
    read_timeout to bound the wait for it) loses its ACK; the inline NOTIFY of the same read
    keeps its own, and the AGENT-DISCONNECT still goes out (a re-test saw it held for good)."""
    ini = write_ini(tmp_path, "[listener]\nread_timeout = 0\n")
    agent = spoe_agent("-c", ini, app=SLOW_APP)
    bad = codec.encode_frame(3, 0x2F7, 1, b"\x01\x01m\x01\x01x\x0b", 1)  # data type 11
    with SpopClient((agent.host, agent.port), timeout=30) as client:
        client.handshake()
        client.send(codec.notify(1, 1, [Message("nap", [("ms", 600_000)])])
                    + codec.notify(2, 1, [Message("inline", [("n", 7)])]) + bad)
        frames = [client.read_frame(), client.read_frame()]
        # And the socket closes right after it (SPOE.txt 3.2.9: the agent "must close the
        # socket just after sending this frame"), not once the nap is over.
        end = client.read_frame()
    assert [(f.type, f.stream_id) for f in frames if f is not None] == [(0x67, 2), (0x66, 0)]
    assert codec.decode_kv_list(frames[1].payload)["status-code"] == 4  # type: ignore[union-attr]
    assert end is None, end


def test_haproxy_disconnect_is_answered_and_the_socket_closed_while_a_handler_runs(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """HAProxy's goodbye is answered at once, and the end of stream follows the answer even
    while a handler naps (a re-test kept the socket open until the handler returned): the
    handler's ACK could not follow an AGENT-DISCONNECT anyway."""
    ini = write_ini(tmp_path, "[listener]\nread_timeout = 0\n")
    agent = spoe_agent("-c", ini, app=SLOW_APP)
    with SpopClient((agent.host, agent.port), timeout=30) as client:
        client.handshake()
        client.send(codec.notify(1, 1, [Message("nap", [("ms", 600_000)])]))
        client.send(codec.disconnect(FrameType.HAPROXY_DISCONNECT, 0, "normal"))
        goodbye = client.read_frame()
        end = client.read_frame()
    assert goodbye is not None and goodbye.type == FrameType.AGENT_DISCONNECT, goodbye
    assert codec.decode_kv_list(goodbye.payload)["status-code"] == 0
    assert end is None, end
