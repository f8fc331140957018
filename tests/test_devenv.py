"""The demo stack (devenv/): its Compose file, its HAProxy configurations, the fake server, and
the Docker-free stack end to end on its real ports.

The end-to-end tests (marked ``haproxy``) are the check that the whole project works: two real
HAProxies, the real agent and the fake server, with the spans decoded off the wire from the same
UDP port a Jaeger agent would listen on. They need the stack's fixed ports (7000-7004, 8001,
8002, 8080, UDP 6831) free, and fail saying which one is taken rather than skipping.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devenv import fake_server, local

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVENV = REPO_ROOT / "devenv"
COMPOSE_FILE = DEVENV / "docker-compose.yml"

#: The span names of one HAProxy hop, as devenv/conf/spoe.cfg defines them.
HOP_SPANS = {
    "HAProxy session", "Client session", "Frontend TCP request", "Frontend HTTP request",
    "Backend TCP request", "Backend HTTP request", "Server session", "TCP response",
    "HTTP response",
}


# ------------------------------------------------------------------------------ helpers


def _haproxy() -> str:
    binary = local.find_haproxy()
    if binary is None:
        pytest.fail("haproxy is not installed: apt-get install haproxy (./dev test does it)")
    return binary


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("the docker-compose binary is missing: apt-get install docker-compose "
                    "(it parses compose files without a Docker engine; ./dev test installs it)")
    return subprocess.run([binary, "-f", str(COMPOSE_FILE), *args], capture_output=True,
                          text=True, timeout=120, cwd=DEVENV)


def _sections(conf: str) -> dict[str, list[str]]:
    """HAProxy config sections ("frontend traced") -> their directive lines, comments dropped."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in conf.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = " ".join(line.split())
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def _haproxy_check(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full_env.update(env)
    # From another directory on purpose: spoe.cfg must be found relative to the conf file.
    return subprocess.run([_haproxy(), "-c", "-f", str(conf)], env=full_env, cwd="/",
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------ docker compose


def test_compose_file_parses_and_everything_it_uses_is_in_the_repo() -> None:
    result = _compose("config")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    normalized = result.stdout

    services = _compose("config", "--services").stdout.split()
    assert sorted(services) == ["fake-server", "haproxy-1", "haproxy-2", "jaeger", "spoe-agent"]

    # Bind mounts, in v1's short syntax (SRC:DST[:ro]) or v2's long one (source: SRC).
    mounts = re.findall(r"^\s*- (/[^:\s]+):/", normalized, re.M)
    mounts += re.findall(r"^\s*source: (/\S+)", normalized, re.M)
    assert mounts, normalized
    for source in mounts:
        path = Path(source)
        assert path.is_file(), f"compose mounts {source}, which is not a file in the repo"
        assert REPO_ROOT in path.parents, f"compose mounts {source} from outside the repo"
    assert {Path(m).name for m in mounts} >= {"haproxy-1.conf", "haproxy-2.conf", "spoe.cfg",
                                              "agent.ini"}

    contexts = re.findall(r"^\s*context: (\S+)", normalized, re.M)
    dockerfiles = re.findall(r"^\s*dockerfile: (\S+)", normalized, re.M)
    assert contexts and len(contexts) == len(dockerfiles)
    for context, dockerfile in zip(contexts, dockerfiles, strict=True):
        assert Path(context) == REPO_ROOT
        assert (Path(context) / dockerfile).is_file(), f"no {dockerfile} in {context}"

    published = {int(p) for p in re.findall(r'published: "?(\d+)"?', normalized)}
    assert published >= {7000, 7001, 7002, 7004, 8001, 8002, 8080, 16686, 6831, 14268, 4317,
                         4318}
    assert re.search(r"protocol: udp\s+published: \"?6831", normalized), "6831 must be UDP"


def test_dockerfile_copies_only_what_exists() -> None:
    text = (DEVENV / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for item in source.split():
            assert (REPO_ROOT / item).exists(), f"Dockerfile copies {item}, not in the repo"
    assert 'CMD ["spoe-agent", "-c", "/etc/spoe-agent/agent.ini"]' in text
    # What setup.cfg reads (file: ...) is copied before pip installs, or the build warns and
    # the image's package has no description.
    before_install = text[:text.index("RUN pip install")]
    copied = {item for source in re.findall(r"^COPY (.+) \S+$", before_install, re.M)
              for item in source.split()}
    for needed in re.findall(r"= *file: *(\S+)", (REPO_ROOT / "setup.cfg").read_text()):
        assert needed in copied, f"setup.cfg reads {needed}, which the Dockerfile copies too late"


# ------------------------------------------------------------------------ haproxy configs


DOCKER_ENV = {
    "BIND_ADDR": "0.0.0.0",
    "SPOE_AGENT_ADDR": "spoe-agent:7000",
    "NEXT_HOP_HOST": "haproxy-2",
    "APP_ADDR": "fake-server:8080",
    "SPOE_CFG": str(DEVENV / "conf" / "spoe.cfg"),
}


@pytest.mark.parametrize("n", [1, 2])
def test_haproxy_conf_is_valid_with_the_local_environment(n: int) -> None:
    result = _haproxy_check(DEVENV / "conf" / f"haproxy-{n}.conf", local.HAPROXY_ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Configuration file is valid" in output
    # A machine whose resolv.conf lists no nameserver warns about "resolvers sys"; nothing else.
    warnings = [line for line in output.splitlines()
                if "WARNING" in line and "nameserver" not in line]
    assert warnings == []


@pytest.mark.parametrize("n", [1, 2])
def test_haproxy_conf_is_valid_without_any_environment(n: int) -> None:
    """The defaults in the file are the local stack's: plain ``haproxy -c -f`` works."""
    result = _haproxy_check(DEVENV / "conf" / f"haproxy-{n}.conf", {})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("n", [1, 2])
def test_haproxy_conf_accepts_the_compose_environment(n: int) -> None:
    """Service names do not resolve here; init-addr none keeps the config valid regardless."""
    result = _haproxy_check(DEVENV / "conf" / f"haproxy-{n}.conf", DOCKER_ENV)
    assert result.returncode == 0, result.stderr
    assert "could not resolve address" in result.stderr  # the Docker names were really used


def test_haproxy_conf_refuses_a_wrong_spoe_path() -> None:
    """SPOE_CFG is really read: a path that does not exist is an error, not a silent default."""
    result = _haproxy_check(DEVENV / "conf" / "haproxy-2.conf",
                            {**local.HAPROXY_ENV, "SPOE_CFG": "/nonexistent/spoe.cfg"})
    assert result.returncode != 0
    assert "/nonexistent/spoe.cfg" in result.stderr


@pytest.mark.parametrize("n", [1, 2])
def test_haproxy_conf_traces_only_the_traced_frontend(n: int) -> None:
    sections = _sections((DEVENV / "conf" / f"haproxy-{n}.conf").read_text())
    assert f"setenv OTEL_SERVICE_NAME haproxy-{n}" in sections["global"]
    traced = sections["frontend traced"]
    assert any(line.startswith("filter spoe engine trace config ") for line in traced)
    assert "unique-id-format %[uuid()]" in traced
    assert f'bind "${{BIND_ADDR-127.0.0.1}}:700{n}"' in traced
    untraced = sections["frontend untraced"]
    assert not any(line.startswith("filter") for line in untraced)
    assert f'bind "${{BIND_ADDR-127.0.0.1}}:800{n}"' in untraced

    agents = sections["backend spoe-agents"]
    for line in ("mode tcp", "option spop-check", "timeout connect 5s", "timeout server 3m"):
        assert line in agents
    assert 'server agent1 "${SPOE_AGENT_ADDR-127.0.0.1:7000}" check inter 2s' in agents

    http_backends = [name for name in sections
                     if name.startswith("backend ") and name != "backend spoe-agents"]
    assert http_backends
    for name in http_backends:
        for header in ("traceparent", "tracestate", "baggage"):
            line = (f"http-request set-header {header} %[var(txn.trace.{header})] "
                    f"if {{ var(txn.trace.{header}) -m found }}")
            assert line in sections[name], f"{name} does not forward {header}"


def test_haproxy_2_has_the_incomplete_trace_cases() -> None:
    sections = _sections((DEVENV / "conf" / "haproxy-2.conf").read_text())
    traced = sections["frontend traced"]
    # The group goes first: nothing runs after a deny.
    assert (traced.index("http-request send-spoe-group trace answered if denied")
            < traced.index("http-request deny if denied"))
    assert "use_backend no-server if { path_beg /noserver }" in traced
    assert not any(line.startswith("server") for line in sections["backend no-server"])


def test_haproxy_1_stats_page() -> None:
    sections = _sections((DEVENV / "conf" / "haproxy-1.conf").read_text())
    stats = sections["frontend stats"]
    assert 'bind "${BIND_ADDR-127.0.0.1}:7004"' in stats
    assert "stats uri /" in stats


def test_agent_ini_is_a_valid_agent_configuration() -> None:
    from spoe_agent.config import load_config

    config = load_config(str(DEVENV / "conf" / "agent.ini"), env={})
    assert config.bind == "0.0.0.0:7000"
    assert config.exporter == "jaeger"
    assert config.service_name == "spoe-agent"
    assert (config.jaeger_agent_host, config.jaeger_agent_port) == ("127.0.0.1", 6831)
    assert config.session_ttl == 10.0
    compose = load_config(str(DEVENV / "conf" / "agent.ini"),
                          env={"OTEL_EXPORTER_JAEGER_AGENT_HOST": "jaeger"})
    assert compose.jaeger_agent_host == "jaeger"


# --------------------------------------------------------------------------- fake server


@pytest.fixture
def traced_app() -> Iterator[tuple[fake_server.WSGIApp, object, list[float]]]:
    """The WSGI app with an in-memory exporter and a recording ``sleep`` (no real waiting)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    slept: list[float] = []
    app = fake_server.make_app(provider.get_tracer("test"), sleep=slept.append)
    yield app, exporter, slept
    provider.shutdown()


def _call(app, path: str, headers: dict[str, str] | None = None) -> tuple[str, dict, bytes]:
    path_info, _, query = path.partition("?")
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": path_info, "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000", "wsgi.url_scheme": "http",
        "HTTP_HOST": "127.0.0.1:8080",
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    captured: dict[str, object] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
        captured["status"] = status
        captured["headers"] = dict(response_headers)

    body = b"".join(app(environ, start_response))
    return captured["status"], captured["headers"], body  # type: ignore[return-value]


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_fake_server_continues_the_incoming_trace(traced_app) -> None:
    from opentelemetry.trace import SpanKind

    app, exporter, _ = traced_app
    status, headers, body = _call(app, "/", {"traceparent": TRACEPARENT, "baggage": "k=v",
                                             "x-forwarded-for": "10.1.2.3"})
    assert status == "200 OK"
    reply = json.loads(body)
    assert reply["received"] == {"traceparent": TRACEPARENT, "tracestate": None,
                                 "baggage": "k=v"}
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"GET /", "handle request"}
    server, inner = spans["GET /"], spans["handle request"]
    assert server.kind == SpanKind.SERVER and inner.kind == SpanKind.INTERNAL
    assert server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert server.parent is not None and server.parent.span_id == 0xB7AD6B7169203331
    assert server.parent.is_remote
    assert inner.parent is not None and inner.parent.span_id == server.context.span_id
    assert headers["X-Server-Trace-Id"] == reply["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert reply["span_id"] == f"{server.context.span_id:016x}"
    attrs = dict(server.attributes)
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/"
    assert attrs["http.route"] == "/"
    assert attrs["http.response.status_code"] == 200
    assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == 8080
    assert attrs["client.address"] == "10.1.2.3"
    assert attrs["network.peer.address"] == "127.0.0.1"


def test_fake_server_starts_a_trace_without_traceparent(traced_app) -> None:
    app, exporter, _ = traced_app
    _, headers, body = _call(app, "/")
    server = next(s for s in exporter.get_finished_spans() if s.name == "GET /")
    assert server.parent is None
    assert json.loads(body)["received"]["traceparent"] is None
    assert headers["X-Server-Trace-Id"] == f"{server.context.trace_id:032x}"


def test_fake_server_slow_and_status_routes(traced_app) -> None:
    from opentelemetry.trace import StatusCode

    app, exporter, slept = traced_app
    status, _, _ = _call(app, "/slow?ms=50")
    assert status == "200 OK" and slept == [0.05]
    status, _, _ = _call(app, "/status/503")
    assert status == "503 Service Unavailable"
    status, headers, body = _call(app, "/status/204")
    assert status == "204 No Content" and body == b"" and "Content-Length" not in headers
    assert _call(app, "/status/99")[0].startswith("400")
    assert _call(app, "/slow?ms=-1")[0].startswith("400")
    assert _call(app, "/nowhere")[0].startswith("404")
    by_name: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        by_name.setdefault(span.name, []).append(span)
    assert by_name["GET /slow"][0].attributes["http.route"] == "/slow"
    errors = [s for s in by_name["GET /status/{code}"] if s.status.status_code == StatusCode.ERROR]
    assert [s.attributes["http.response.status_code"] for s in errors] == [503]
    assert "GET" in by_name  # the unknown route: no route in the name


def _receiver(port: int = 0):
    """The project's Jaeger receiver on UDP only: it decodes exactly what goes on the wire."""
    from spoe_agent.viewer.receiver import JaegerReceiver

    receiver = JaegerReceiver(("127.0.0.1", port), None)
    try:
        return receiver.start()
    except OSError as exc:
        pytest.fail(f"UDP {port} must be free for the spans: {exc}")


def _wait_spans(receiver, predicate, what: str, timeout: float = 30.0) -> list:
    """Wait for ``predicate(spans)``; on failure show every span that did arrive."""
    if receiver.wait_for(predicate, timeout):
        return receiver.spans
    listing = "\n".join(f"  {s.service_name:12} {s.trace_id} {s.span_id} <- {s.parent_span_id} "
                        f"{s.operation_name}" for s in receiver.spans)
    pytest.fail(f"never received {what}; got {len(receiver.spans)} spans:\n{listing}\n"
                f"undecodable datagrams: {receiver.decode_errors}")


def test_fake_server_process_exports_over_udp_and_flushes_on_sigterm(tmp_path: Path) -> None:
    """``python -m devenv.fake_server`` as the stacks run it: its spans reach the Jaeger port,
    the last ones at the latest when it is stopped."""
    from tests.support.procs import ManagedProcess, free_port, wait_for_port

    receiver = _receiver()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    # Nothing leaves on the schedule: the spans can only arrive through the flush at SIGTERM.
    env["OTEL_BSP_SCHEDULE_DELAY"] = "600000"
    proc = ManagedProcess(
        "fake-server",
        [sys.executable, "-m", "devenv.fake_server", "--port", str(port),
         "--jaeger-agent-port", str(receiver.udp_address[1])],
        tmp_path, cwd=REPO_ROOT, env=env,
    ).start()
    try:
        wait_for_port("127.0.0.1", port, 20, proc)
        status, _, _ = _get(port, "/status/201", {"traceparent": TRACEPARENT})
        assert status == 201
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.describe_logs()
        spans = _wait_spans(receiver, lambda s: len(s) >= 2, "the fake server's two spans")
    finally:
        proc.stop()
        receiver.stop()
    by_name = {s.operation_name: s for s in spans}
    server = by_name["GET /status/{code}"]
    assert server.service_name == "fake-server"
    assert server.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert server.parent_span_id == "b7ad6b7169203331"
    assert server.tags["span.kind"] == "server"
    assert server.tags["http.response.status_code"] == 201
    assert by_name["handle request"].parent_span_id == server.span_id


# ------------------------------------------------------------------- local stack (unit)


def test_port_probes_see_listeners_and_free_ports() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        assert not local.tcp_port_free(taken)
        assert local.tcp_accepts(taken)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        assert not local.udp_port_free(udp.getsockname()[1])


def test_taken_port_is_named_with_its_owner(tmp_path: Path) -> None:
    stack = local.LocalStack(local.StackOptions(workdir=tmp_path, viewer=False, jaeger=False))
    free = [p for p in stack.ports() if local.port_free(p)]
    if not free:
        pytest.fail("every demo port is taken on this machine; is a demo running?")
    victim = free[0]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", victim.number))
        sock.listen()
        with pytest.raises(local.StackError) as info:
            stack.check_ports()
    assert info.value.status == local.EXIT_ENVIRONMENT
    assert f"port {victim} is in use; it should be free for {victim.owner}" in str(info.value)


def test_child_stop_takes_its_whole_process_group(tmp_path: Path) -> None:
    """A child that started a grandchild: stopping it must leave neither behind."""
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              "time.sleep(600)\n")
    child = local.Child("sleeper", [sys.executable, "-c", script], tmp_path,
                        env=dict(os.environ), stop_timeout=5)
    child.start()
    try:
        deadline = time.monotonic() + 20
        while len(_group_members(child.pid)) < 2:
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.05)
    finally:
        child.stop()
    deadline = time.monotonic() + 10
    while child.group_alive():
        assert time.monotonic() < deadline, f"left behind: {_group_members(child.pid)}"
        time.sleep(0.05)


def _group_members(pgid: int | None) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except ProcessLookupError:
                pass
    return members


def test_demo_requests_cover_the_advertised_cases() -> None:
    paths = [(r.port, r.path) for r in local.DEMO_REQUESTS]
    assert paths == [(7001, "/"), (7001, "/slow?ms=50"), (7001, "/status/503"),
                     (7001, "/denied"), (7001, "/noserver"), (8001, "/")]


# ------------------------------------------------------------------- local stack (e2e)


@pytest.fixture
def demo_ports() -> Iterator[None]:
    """Holds the demo stack's fixed ports for one test at a time, across xdist processes.

    The two tests that start the stack need the same ports; whichever xdist process runs
    second waits here for the first to finish instead of finding them taken.
    """
    with open(Path(tempfile.gettempdir()) / "spoe-agent-tests-demo-ports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _require_free_ports(ports: list[local.Port]) -> None:
    taken = [f"{p} ({p.owner})" for p in ports if not local.port_free(p)]
    if taken:
        pytest.fail("the demo stack's ports must be free for this test; taken: "
                    + ", ".join(taken) + ". Stop any running demo or docker-compose stack.")


def _get(port: int, path: str, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _one(spans: list, service: str, name: str):
    found = [s for s in spans if s.service_name == service and s.operation_name == name]
    assert len(found) == 1, f"{len(found)} {service} {name!r} spans: {found}"
    return found[0]


def _complete_trace(trace_id: str):
    def predicate(spans: list) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return (sum(s.service_name == "haproxy-1" for s in mine) >= len(HOP_SPANS)
                and sum(s.service_name == "haproxy-2" for s in mine) >= len(HOP_SPANS)
                and sum(s.service_name == "fake-server" for s in mine) >= 2)
    return predicate


def _assert_two_hop_trace(spans: list, trace_id: str, server_span: str = "GET /") -> dict:
    """Both hops' nine spans and the fake server's two, each hop nested under the previous."""
    mine = [s for s in spans if s.trace_id == trace_id]
    for hop in ("haproxy-1", "haproxy-2"):
        names = sorted(s.operation_name for s in mine if s.service_name == hop)
        assert names == sorted(HOP_SPANS), f"{hop}: {names}"
    assert sorted(s.operation_name for s in mine if s.service_name == "fake-server") == sorted(
        [server_span, "handle request"])
    assert {s.service_name for s in mine} == {"haproxy-1", "haproxy-2", "fake-server"}

    h1_backend = _one(mine, "haproxy-1", "Backend HTTP request")
    h2_session = _one(mine, "haproxy-2", "HAProxy session")
    h2_backend = _one(mine, "haproxy-2", "Backend HTTP request")
    server = _one(mine, "fake-server", server_span)
    assert h2_session.parent_span_id == h1_backend.span_id, "hop 2 not under hop 1's request"
    assert server.parent_span_id == h2_backend.span_id, "the server not under hop 2's request"
    assert _one(mine, "fake-server", "handle request").parent_span_id == server.span_id
    assert h1_backend.tags.get("span.kind") == "client"
    assert h2_session.tags.get("span.kind") == "server"
    for hop in ("haproxy-1", "haproxy-2"):
        session = _one(mine, hop, "HAProxy session")
        assert _one(mine, hop, "Client session").parent_span_id == session.span_id
        assert _one(mine, hop, "Server session").parent_span_id == session.span_id
    return {f"{s.service_name}/{s.operation_name}": s for s in mine}


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.mark.haproxy
def test_local_stack_end_to_end(tmp_path: Path, demo_ports: None) -> None:
    """Real HAProxies, agent and fake server on the demo ports: one trace across every hop."""
    _haproxy()
    stack = local.LocalStack(
        local.StackOptions(workdir=tmp_path / "demo", viewer=False, jaeger=False))
    _require_free_ports(stack.ports() + [local.VIEWER_UDP])
    receiver = _receiver(local.VIEWER_UDP.number)
    try:
        with stack:
            # First the untraced path: only the fake server may trace it. The agent exports in
            # order, so a haproxy span of this request would arrive before the traced ones.
            status, headers, _ = _get(8001, "/")
            assert status == 200
            untraced = headers["x-server-trace-id"]
            assert "x-trace-id" not in headers
            # A trace HAProxy 1 starts, and one that continues a caller's context.
            status, headers, body = _get(7001, "/")
            assert status == 200, body
            root_trace = headers["x-trace-id"]
            assert headers["x-server-trace-id"] == root_trace
            status, headers, body = _get(7001, "/", {"traceparent": f"00-{CALLER_TRACE}-"
                                                                    f"{CALLER_SPAN}-01"})
            assert status == 200, body
            assert headers["x-trace-id"] == CALLER_TRACE
            assert json.loads(body)["received"]["traceparent"].split("-")[1] == CALLER_TRACE

            spans = _wait_spans(
                receiver,
                lambda s: _complete_trace(root_trace)(s) and _complete_trace(CALLER_TRACE)(s)
                and sum(x.trace_id == untraced for x in s) >= 2,
                "both traced requests' 20 spans and the untraced request's 2")
        assert stack.stop() == []
    finally:
        receiver.stop()

    root = _assert_two_hop_trace(spans, root_trace)
    assert root["haproxy-1/HAProxy session"].parent_span_id is None
    continued = _assert_two_hop_trace(spans, CALLER_TRACE)
    assert continued["haproxy-1/HAProxy session"].parent_span_id == CALLER_SPAN

    untraced_spans = [s for s in spans if s.trace_id == untraced]
    assert sorted((s.service_name, s.operation_name) for s in untraced_spans) == [
        ("fake-server", "GET /"), ("fake-server", "handle request")]
    assert _one(untraced_spans, "fake-server", "GET /").parent_span_id is None
    assert {s.trace_id for s in spans if s.service_name.startswith("haproxy")} == {
        root_trace, CALLER_TRACE}
    assert receiver.decode_errors == 0
    for port in stack.ports():
        assert local.port_free(port), f"port {port} still taken after the stack stopped"


def _viewer_blocks(stdout: str) -> list[list[str]]:
    """The viewer's printed traces: a ``trace <id> (N spans, ...)`` header and its lines."""
    blocks: list[list[str]] = []
    for line in stdout.splitlines():
        if line.startswith("trace "):
            blocks.append([line])
        elif line.strip() and blocks:
            blocks[-1].append(line)
    return blocks


@pytest.mark.slow
@pytest.mark.haproxy
def test_demo_command_shows_every_demo_trace_and_leaves_nothing_running(
        tmp_path: Path, demo_ports: None) -> None:
    """``python -m devenv.local --exit-after-demo`` exactly as ./dev demo runs it, viewer and all."""
    _haproxy()
    stack = local.LocalStack(local.StackOptions(workdir=tmp_path, viewer=True, jaeger=False))
    _require_free_ports(stack.ports())
    jsonl = tmp_path / "traces.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "devenv.local", "--exit-after-demo", "--no-jaeger",
         "--workdir", str(tmp_path), "--jsonl", str(jsonl)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    logs = "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((tmp_path / "logs").glob("*.log")))
    context = f"stderr:\n{result.stderr}\nstdout:\n{result.stdout}\n{logs}"
    assert result.returncode == 0, context
    assert "nothing left running" in result.stderr, context

    # Each demo request's trace id, as the demo printed it.
    ids = dict(re.findall(r"GET (http://\S+) -> \d+  trace ([0-9a-f]{32})", result.stderr))
    assert len(ids) == len(local.DEMO_REQUESTS), context

    # The JSON lines: one record per printed trace; a trace may come in several records when
    # part of it arrived later (the hop HAProxy 2 never finished, exported at session_ttl).
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    spans_by_trace: dict[str, list] = {}
    for record in records:
        spans_by_trace.setdefault(record["trace_id"], []).extend(record["spans"])

    # The printed trees are exactly the recorded traces: same spans, same nesting.
    blocks = _viewer_blocks(result.stdout)
    assert len(blocks) == len(records), context
    for block, record in zip(blocks, records, strict=True):
        assert block[0].startswith(f"trace {record['trace_id']} ({record['span_count']} spans")
        expected = [f"{'  ' * s['depth']}{s['operation_name']} [{s['service_name']}] "
                    for s in record["spans"]]
        assert [line[:len(e)] for line, e in zip(block[1:], expected, strict=True)] == expected

    def services(url: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for span in spans_by_trace.get(ids[url], []):
            found.setdefault(span["service_name"], []).append(span["operation_name"])
        return {k: sorted(v) for k, v in found.items()}

    base = "http://127.0.0.1"
    for path, server_span in (("/", "GET /"), ("/slow?ms=50", "GET /slow"),
                              ("/status/503", "GET /status/{code}")):
        assert services(f"{base}:7001{path}") == {
            "haproxy-1": sorted(HOP_SPANS), "haproxy-2": sorted(HOP_SPANS),
            "fake-server": sorted([server_span, "handle request"])}, path
    error = [s for s in spans_by_trace[ids[f"{base}:7001/status/503"]] if s["error"]]
    assert {s["service_name"] for s in error} >= {"fake-server"}
    # HAProxy answered these on hop 2: hop 1 is whole, no request reached the fake server.
    # /denied's hop 2 session was finished by the "answered" group; /noserver's, which no SPOE
    # event ends, by the agent's session_ttl (not by the shutdown at the end: the demo waited
    # for it). Both hang under hop 1.
    for path in ("/denied", "/noserver"):
        found = services(f"{base}:7001{path}")
        assert found["haproxy-1"] == sorted(HOP_SPANS), path
        assert "fake-server" not in found, (path, found)
        trace = spans_by_trace[ids[f"{base}:7001{path}"]]
        h1_backend = next(s for s in trace if s["service_name"] == "haproxy-1"
                          and s["operation_name"] == "Backend HTTP request")
        h2_session = next((s for s in trace if s["service_name"] == "haproxy-2"
                           and s["operation_name"] == "HAProxy session"), None)
        assert h2_session is not None, (path, found)
        assert h2_session["parent_span_id"] == h1_backend["span_id"]
        if path == "/denied":
            assert not h2_session["error"], h2_session
        else:
            assert h2_session["error"]
            assert "(ttl)" in h2_session["tags"].get("otel.status_description", ""), h2_session
    assert services(f"{base}:8001/") == {"fake-server": ["GET /", "handle request"]}
    assert not any(local.tcp_accepts(p.number) for p in stack.ports() if p.proto == "tcp")
