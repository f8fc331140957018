"""Values from HAProxy are data only, and the agent exposes nothing it was not asked to.

Hostile values (format strings, paths, control characters, huge strings, bytes that are not
UTF-8) go in where HAProxy puts request data: span names, tag keys and values, log events,
baggage, the session id, the service name, a DISCONNECT message. They must come out of Jaeger
exactly as sent (cut to max_attribute_length, invalid UTF-8 replaced), next to a clean span of
the same export batch; never be interpreted, never forge a log line or a header, never cost
the rest of the batch.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spoe_agent.config import load_config
from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType, Message
from spoe_agent.viewer.receiver import JaegerReceiver, ReceivedSpan
from tests.hardening.support import (
    clean_env,
    disconnect_status,
    notify_ok,
    scrape,
    total,
    trace,
    value,
    write_ini,
)
from tests.integration.backend import Backend
from tests.integration.tracing_support import describe, hop_config
from tests.support.haproxy import HAProxy
from tests.support.procs import REPO_ROOT, AgentProcess, free_port, wait_until
from tests.support.spop_client import SpopClient

AgentFactory = Callable[..., AgentProcess]
LIMIT = 64
FORMATS = "%s %n %x %(name)s {0} {} {__class__} ${HOME} $(id) `id`"
TRAVERSAL = "../../../../etc/passwd"
BAD_UTF8 = b"caf\xc3 \xff\xfe ok".decode("utf-8", "surrogateescape")  # as the codec decodes it


def test_defaults_expose_nothing_beyond_loopback() -> None:
    config = load_config(env={})
    assert config.bind.startswith("127.0.0.1:")
    assert config.metrics == ""  # the metrics endpoint is off unless asked for
    assert not config.tls_cert  # and TLS is opt-in, so plain SPOP stays on loopback
    result = subprocess.run(
        [sys.executable, "-m", "spoe_agent", "--check", "--exporter", "none"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "listening on 127.0.0.1:12345" in result.stdout


@pytest.fixture(params=["udp", "http"], ids=["jaeger-agent-udp", "jaeger-collector-http"])
def receiver(request: pytest.FixtureRequest) -> Iterator[JaegerReceiver]:
    udp = ("127.0.0.1", 0) if request.param == "udp" else None
    http = ("127.0.0.1", 0) if request.param == "http" else None
    with JaegerReceiver(udp_addr=udp, http_addr=http, quiet_s=0.5) as rec:
        yield rec


def exporting_to(receiver: JaegerReceiver, **extra: str) -> dict[str, str]:
    if receiver.udp_address is not None:
        host, port = receiver.udp_address
        return clean_env(OTEL_EXPORTER_JAEGER_AGENT_HOST=str(host),
                         OTEL_EXPORTER_JAEGER_AGENT_PORT=str(port),
                         OTEL_BSP_SCHEDULE_DELAY="300", **extra)
    host, port = receiver.http_address
    return clean_env(OTEL_EXPORTER_JAEGER_ENDPOINT=f"http://{host}:{port}/api/traces",
                     OTEL_BSP_SCHEDULE_DELAY="300", **extra)


def test_hostile_values_are_carried_as_data(
    spoe_agent: AgentFactory, receiver: JaegerReceiver, tmp_path: Path
) -> None:
    ini = write_ini(tmp_path, f"[tracing]\nmax_attribute_length = {LIMIT}\n")
    metrics = free_port()
    agent = spoe_agent("-c", ini, "--metrics", f"127.0.0.1:{metrics}", app=None,
                       env=exporting_to(receiver))
    hostile_session = f"{TRAVERSAL}{FORMATS}\udcff"
    with SpopClient((agent.host, agent.port), timeout=10) as client:
        client.handshake()
        # One NOTIFY, one export batch: the hostile session and a clean one side by side.
        ack = notify_ok(client, 1, [
            Message(FORMATS, [
                ("id", hostile_session), ("service", TRAVERSAL), ("span", FORMATS),
                ("kind", "server"),
                ("tag", "fmt"), ("", FORMATS),
                ("tag", "path"), ("", TRAVERSAL),
                ("tag", "huge"), ("", "H" * 10_000),
                ("tag", "utf8"), ("", BAD_UTF8),
                ("tag", "raw"), ("", b"\xff\x00bin%s"),
                ("tag", "key\r\nINJECTED: 1 %s"), ("", "v"),
                ("log", "event"), ("", f"{FORMATS}\nINJECTED line"),
                ("baggage", "user"), ("", "%s\r\nX-Injected: 1"),
                ("inject", FORMATS),
                ("finish", "*"),
            ]),
            trace("clean", ("span", "clean span"), ("tag", "ok"), ("", "yes"), ("finish", "*")),
        ])
        actions = {a.name: a.value for a in codec.decode_actions(ack.payload)}
        # The context injected for the next hop is a header value: no CR/LF may reach it.
        assert set(actions) == {"traceparent", "baggage"}, actions
        assert "\r" not in actions["baggage"] and "\n" not in actions["baggage"], actions
        # W3C Baggage's percent-encoding: ':' is a baggage octet, a space is %20
        assert actions["baggage"] == "user=%25s%0D%0AX-Injected:%201"
        # A DISCONNECT message is data too: it must not forge a line in the agent's log.
        client.send(codec.disconnect(FrameType.HAPROXY_DISCONNECT, 4,
                                     "bye\nCRITICAL INJECTED: forged %s"))
        assert disconnect_status(client.read_frame()) == 0

    def both_arrived(spans: list[ReceivedSpan]) -> bool:
        return {FORMATS, "clean span"} <= {s.operation_name for s in spans}

    assert receiver.wait_for(both_arrived, timeout=15), describe(receiver.spans)
    spans = {s.operation_name: s for s in receiver.spans}
    hostile, clean = spans[FORMATS], spans["clean span"]
    assert clean.tags["ok"] == "yes"
    assert hostile.service_name == TRAVERSAL
    tags = hostile.tags
    assert tags["fmt"] == FORMATS[:LIMIT]
    assert tags["path"] == TRAVERSAL
    assert tags["huge"] == "H" * LIMIT
    assert tags["utf8"] == "caf\ufffd \ufffd\ufffd ok"
    assert tags["raw"] == "\ufffd\x00bin%s"
    assert tags["key\r\nINJECTED: 1 %s"] == "v"
    assert hostile.logs and hostile.logs[0]
    samples = scrape(metrics)
    assert total(samples, "spoe_agent_spans_dropped_total") == 0, samples
    assert value(samples, "spoe_agent_handler_errors_total") == 0

    lines = agent.process.stderr_text().splitlines()
    assert not any(line.startswith(("CRITICAL INJECTED", "INJECTED")) for line in lines), lines
    assert any("bye\\x0aCRITICAL INJECTED: forged %s" in line for line in lines), lines
    assert "Traceback" not in agent.logs(), agent.describe_logs()


@pytest.mark.haproxy
def test_hostile_requests_through_haproxy_become_plain_span_data(
    haproxy: Callable[..., HAProxy],
    spoe_agent: AgentFactory,
    backend: Backend,
    tmp_path: Path,
) -> None:
    """The reference spoe.cfg records the path, query and User-Agent: send a request whose
    every one of those is hostile, byte for byte, and read the spans Jaeger gets."""
    with JaegerReceiver(udp_addr=("127.0.0.1", 0), http_addr=None, quiet_s=0.5) as receiver:
        ini = write_ini(tmp_path, f"[tracing]\nmax_attribute_length = {LIMIT}\n")
        agent = spoe_agent("-c", ini, app=None, env=exporting_to(receiver))
        port = free_port()
        hap = haproxy(hop_config(port=port, service="edge", server=backend.address,
                                 agent=agent))
        hap.wait_server_status("spoe-agents", "agent1", "UP", timeout=15)

        # HAProxy itself refuses raw non-ASCII and braces in the URI (400), so those go in a
        # header, where obs-text is allowed and HAProxy passes the bytes on untouched.
        path = b"/%s%n%x/../../etc/passwd"
        query = b"fmt=%25n%7B0%7D&x=%s"
        agent_header = b"evil %s %n {0} \xff\xfe " + b"U" * 6000
        request = (b"GET " + path + b"?" + query + b" HTTP/1.1\r\nHost: h\r\n"
                   b"User-Agent: " + agent_header + b"\r\nConnection: close\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            sock.sendall(request)
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        assert head.startswith("HTTP/1.1 200"), head
        assert "x-trace-error" not in head.lower(), head

        def root(spans: list[ReceivedSpan]) -> bool:
            return any(s.operation_name == "HAProxy session" for s in spans)

        assert receiver.wait_for(root, timeout=15), describe(receiver.spans)
        (session,) = [s for s in receiver.spans if s.operation_name == "HAProxy session"]
        tags = session.tags
        assert tags["url.path"] == path.decode("utf-8", "replace")
        assert tags["url.query"] == query.decode("utf-8", "replace")
        assert tags["user_agent.original"] == agent_header.decode("utf-8", "replace")[:LIMIT]
        assert "Traceback" not in agent.logs(), agent.describe_logs()


def test_half_sent_requests_to_the_metrics_endpoint_take_few_descriptors_and_few_lines(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """Code review: the endpoint took every connection and waited for ever for each request
    (200 of them took the agent's last descriptors: HAProxy's connections were no longer
    accepted), and logged each bad request on a line of its own."""
    import os
    import time

    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}")

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{agent.process.pid}/fd"))

    before = descriptors()
    held = []
    try:
        for _ in range(100):
            conn = socket.create_connection(("127.0.0.1", metrics), timeout=5)
            conn.sendall(b"G")
            held.append(conn)
        time.sleep(0.5)
        assert descriptors() - before <= 20  # the endpoint's 16 at most, and a few more
        with SpopClient((agent.host, agent.port)) as client:  # SPOP is served meanwhile
            assert client.handshake()["version"] == "2.0"
    finally:
        for conn in held:
            conn.close()
    for _ in range(20):  # malformed requests: one line for them all in 10 s
        with socket.create_connection(("127.0.0.1", metrics), timeout=5) as conn:
            conn.sendall(b"BREW /pot HTTP/1.1\r\n\r\n")
            conn.recv(1024)
    wait_until(lambda: "metrics endpoint:" in agent.logs(), what="the bad requests logged")
    assert agent.logs().count("metrics endpoint:") <= 2, agent.describe_logs()


METRICS_TRICKLE_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import socket, sys
import gevent
sys.path.insert(0, {repo!r})
from prometheus_client import CollectorRegistry
from spoe_agent import metrics

metrics.ENDPOINT_READ_TIMEOUT_S = 0.5
metrics.ENDPOINT_REQUEST_TIMEOUT_S = 1.0
server = metrics.endpoint_server("127.0.0.1:0", CollectorRegistry(), lambda: (True, b"ok\\n"))
server.start()
port = server.address[1]
request = b"GET /health HTTP/1.1\\r\\nHost: x\\r\\nUser-Agent: slow\\r\\n\\r\\n"
conn = socket.create_connection(("127.0.0.1", port))
answer = b""
try:
    for byte in request:  # a byte every 0.2 s: each read well within its 0.5 s
        conn.sendall(bytes([byte]))
        gevent.sleep(0.2)
    answer = conn.recv(1024)
except OSError:
    pass
print("trickled:", answer[:12])
with socket.create_connection(("127.0.0.1", port)) as plain:
    plain.sendall(b"GET /health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
    print("plain:", plain.recv(1024)[:15])
"""


def test_a_trickled_request_to_the_metrics_endpoint_is_cut_at_its_deadline() -> None:
    """Code review: the read timeout bounds each read, so a client sending a byte every few
    seconds held a slot for ever, and 16 of them kept /health from answering at all."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", METRICS_TRICKLE_SCRIPT.format(repo=str(repo))],
                          capture_output=True, text=True, timeout=120, cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[:2] == ["trickled: b''", "plain: b'HTTP/1.1 200 OK'"], \
        done.stdout + done.stderr
    assert "took over 1s; its connection is closed" in done.stdout + done.stderr
