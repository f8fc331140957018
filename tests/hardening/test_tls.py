"""TLS on the SPOP listener, with client certificates verified against a CA.

Certificates are made with the ``openssl`` CLI in the test's directory (a CA, a server
certificate for 127.0.0.1, a client certificate, and a client certificate from another CA);
the agent gets them through an agent.ini, and HAProxy through its own ``server ... ssl verify
required ca-file ... crt ...`` line, exactly as an operator would deploy it.
"""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import Message, Scope, SetVar
from tests.hardening.support import (
    SERVER_APP,
    clean_env,
    notify_ok,
    scrape,
    value,
    write_ini,
)
from tests.integration.backend import Backend
from tests.integration.test_haproxy_core import haproxy_config, spoe_config
from tests.support.haproxy import HAProxy
from tests.support.procs import REPO_ROOT, AgentProcess, free_port, wait_until
from tests.support.spop_client import SpopClient, hello_frame

AgentFactory = Callable[..., AgentProcess]

if shutil.which("openssl") is None:  # pragma: no cover - the CLI is part of the test deps
    pytest.fail("the openssl command is needed to make test certificates", pytrace=False)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_pem: Path  # certificate and key in one file, as HAProxy's "crt" wants
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by another CA
    rogue_key: Path


def _openssl(cwd: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def _ca(cwd: Path, name: str) -> None:
    _openssl(cwd, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=spoe-agent test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _leaf(cwd: Path, name: str, ca: str, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(cwd, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n"
                             "extendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    _leaf(d, "rogue", "rogue-ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    client_pem = d / "client-full.pem"
    client_pem.write_text((d / "client.pem").read_text() + (d / "client.key").read_text())
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", client_pem, d / "client.pem",
               d / "client.key", d / "rogue.pem", d / "rogue.key")


def tls_agent(spoe_agent: AgentFactory, tmp_path: Path, pki: Pki, app: str) -> tuple[
    AgentProcess, int
]:
    ini = write_ini(tmp_path, f"[listener]\ntls_cert = {pki.server_cert}\n"
                              f"tls_key = {pki.server_key}\ntls_ca = {pki.ca}\n")
    metrics = free_port()
    agent = spoe_agent("-c", ini, "--metrics", f"127.0.0.1:{metrics}", app=app)
    return agent, metrics


def tls_client(agent: AgentProcess, pki: Pki, cert: Path | None, key: Path | None) -> SpopClient:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    client = SpopClient((agent.host, agent.port), timeout=10)
    client.sock = context.wrap_socket(client.sock, server_hostname="127.0.0.1")
    return client


def refused(client: SpopClient) -> bool:
    """True if the agent never answers this client's HELLO (the TLS session was refused)."""
    try:
        client.send(hello_frame())
        frame = client.read_frame()
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        client.close()
    return frame is None


def test_agent_requires_a_client_certificate_from_its_ca(
    spoe_agent: AgentFactory, tmp_path: Path, pki: Pki
) -> None:
    agent, metrics = tls_agent(spoe_agent, tmp_path, pki, SERVER_APP)
    with tls_client(agent, pki, pki.client_cert, pki.client_key) as client:
        assert client.handshake()["version"] == "2.0"
        ack = notify_ok(client, 1, [Message("inline", [("v", 42)])])
        assert codec.decode_actions(ack.payload) == [SetVar(Scope.TXN, "n", 42)]

    assert refused(tls_client(agent, pki, None, None))  # no certificate
    assert refused(tls_client(agent, pki, pki.rogue_cert, pki.rogue_key))  # another CA
    plain = SpopClient((agent.host, agent.port), timeout=10)  # no TLS at all
    assert refused(plain)

    wait_until(lambda: value(scrape(metrics), "spoe_agent_tls_handshake_errors_total") == 3,
               what="three refused handshakes")
    assert value(scrape(metrics), "spoe_agent_frames_total", direction="in",
                 type="haproxy_hello") == 1
    logs = agent.logs()
    assert "Traceback" not in logs, agent.describe_logs()
    assert logs.count("TLS handshake with") == 1, logs  # logged once per interval
    with tls_client(agent, pki, pki.client_cert, pki.client_key) as client:
        assert client.handshake()["version"] == "2.0"  # and still serving


@pytest.mark.haproxy
def test_haproxy_talks_to_the_agent_over_verified_tls(
    haproxy: Callable[..., HAProxy], spoe_agent: AgentFactory, backend: Backend, tmp_path: Path,
    pki: Pki,
) -> None:
    agent, metrics = tls_agent(spoe_agent, tmp_path, pki, "tests.apps.echo:agent")
    port = free_port()
    plain_line = f"server a1 {agent.server_address} check inter 500ms"
    config = haproxy_config(port, backend, agent)
    assert plain_line in config
    tls_line = (f"server a1 {agent.server_address} ssl verify required ca-file {pki.ca} "
                f"crt {pki.client_pem} check inter 500ms")
    hap = haproxy(config.replace(plain_line, tls_line), spoe_config())
    row = hap.wait_server_status("agents", "a1", "UP", timeout=15)
    assert row["check_status"] == "L7OK", row  # spop-check over TLS
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/check/over-tls")
    resp = conn.getresponse()
    resp.read()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    conn.close()
    assert resp.status == 200 and "x-v-err" not in headers, headers
    assert headers.get("x-v-echo_path") == "/check/over-tls"
    s = scrape(metrics)
    assert value(s, "spoe_agent_tls_handshake_errors_total") == 0
    assert value(s, "spoe_agent_frames_total", direction="out", type="ack") == 1

    # The same HAProxy without its client certificate is refused: the check fails.
    no_cert = config.replace(plain_line, f"server a1 {agent.server_address} ssl verify required "
                                         f"ca-file {pki.ca} check inter 500ms")
    other = haproxy(no_cert.replace(f"bind 127.0.0.1:{port}", f"bind 127.0.0.1:{free_port()}"),
                    spoe_config(), name="no-cert")
    row = other.wait_server_status("agents", "a1", "DOWN", timeout=15)
    assert not row["check_status"].startswith("L7OK"), row
    assert (value(scrape(metrics), "spoe_agent_tls_handshake_errors_total") or 0) >= 1
    assert hap.server_stats("agents", "a1")["status"] == "UP"


def test_unreadable_certificate_is_a_clean_startup_error(tmp_path: Path, pki: Pki) -> None:
    """``--check`` reads the certificates (exit 2); serving without them fails fast (exit 1),
    with one line that says why, not a traceback."""
    ini = write_ini(tmp_path, f"[listener]\ntls_cert = {tmp_path / 'missing.pem'}\n"
                              f"tls_key = {pki.server_key}\n")
    base = [sys.executable, "-m", "spoe_agent", "-c", ini, "--exporter", "none",
            "--bind", f"127.0.0.1:{free_port()}", "--workers", "1"]
    env = clean_env(PYTHONPATH=str(REPO_ROOT))
    check = subprocess.run([*base, "--check"], capture_output=True, text=True, timeout=60,
                           cwd=REPO_ROOT, env=env)
    assert check.returncode == 2, check.stderr
    said = f"{ini}:2: cannot read tls_cert {tmp_path / 'missing.pem'}: No such file or directory"
    assert said in check.stderr
    serve = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                           env=env)
    assert serve.returncode == 1, serve.stderr
    assert said in serve.stderr
    assert "Traceback" not in check.stderr + serve.stderr


@pytest.mark.parametrize("wrong", ["key", "ca"])
def test_a_certificate_that_does_not_load_is_named_with_its_line(
    tmp_path: Path, pki: Pki, wrong: str
) -> None:
    """OpenSSL's errors name no file: the agent says which setting, where, and which file."""
    key = pki.rogue_key if wrong == "key" else pki.server_key
    ca = pki.server_key if wrong == "ca" else pki.ca  # a key is no CA certificate
    ini = write_ini(tmp_path, f"[listener]\ntls_cert = {pki.server_cert}\ntls_key = {key}\n"
                              f"tls_ca = {ca}\n")
    check = subprocess.run(
        [sys.executable, "-m", "spoe_agent", "-c", ini, "--exporter", "none", "--check"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env=clean_env(PYTHONPATH=str(REPO_ROOT)),
    )
    assert check.returncode == 2, check.stderr
    if wrong == "key":
        assert (f"{ini}:2: cannot load the TLS certificate {pki.server_cert} with the key {key}: "
                in check.stderr), check.stderr
    else:
        assert f"{ini}:4: cannot load the CA certificates {ca}: " in check.stderr, check.stderr
    assert "Traceback" not in check.stderr


def test_a_jaeger_collector_over_https_is_verified_against_the_given_ca(pki: Pki) -> None:
    """OTEL_EXPORTER_JAEGER_CERTIFICATE: a collector whose certificate a private CA signed is
    trusted through that CA alone, and refused without it (the system's CAs do not know it)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from threading import Thread

    from spoe_agent.config import load_config
    from spoe_agent.tracing.jaeger import FastJaegerExporter
    from spoe_agent.tracing.pipeline import build_exporter

    posted: list[bytes] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            posted.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"https://127.0.0.1:{server.server_address[1]}/api/traces"
    try:
        def sender(env: dict[str, str]) -> Any:
            exporter = build_exporter(load_config(env={"OTEL_EXPORTER_JAEGER_ENDPOINT": endpoint,
                                                       **env}))
            assert isinstance(exporter, FastJaegerExporter) and exporter._http is not None
            return exporter._http

        sender({"OTEL_EXPORTER_JAEGER_CERTIFICATE": str(pki.ca)}).send(b"batch")
        assert posted == [b"batch"]
        with pytest.raises(ssl.SSLCertVerificationError):
            sender({}).send(b"not trusted")
        assert posted == [b"batch"]
    finally:
        server.shutdown()


def test_a_handshake_dribbled_a_byte_at_a_time_ends_at_read_timeout(
    spoe_agent: AgentFactory, tmp_path: Path, pki: Pki
) -> None:
    """Code review: the socket's timeout bounds each wait of the handshake, not the whole: a
    ClientHello a byte every read_timeout - ε held a slot for hours, out of eviction's reach."""
    import socket

    ini = write_ini(tmp_path, f"[listener]\ntls_cert = {pki.server_cert}\n"
                              f"tls_key = {pki.server_key}\nread_timeout = 1s\n")
    agent = spoe_agent("-c", ini, app=SERVER_APP)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    client_hello = outgoing.read()
    assert len(client_hello) > 50
    with socket.create_connection((agent.host, agent.port), timeout=10) as sock:
        for byte in client_hello[:40]:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.4)
                if sock.recv(1) == b"":
                    break  # the agent closed it
            except TimeoutError:
                continue  # still open: the next byte
            except ConnectionError:
                break
        else:
            pytest.fail("the agent still held the handshake after 40 bytes over ~16 s")
    wait_until(lambda: "not done within read_timeout (1s)" in agent.logs(), what="the log")
    with tls_client(agent, pki, None, None) as client:  # and it serves (no CA: no client cert)
        assert client.handshake()["version"] == "2.0"


def test_a_waiting_connection_takes_the_slot_of_one_stuck_in_its_tls_handshake(
    spoe_agent: AgentFactory, tmp_path: Path, pki: Pki
) -> None:
    """Code review: a connection still in its TLS handshake was out of eviction's reach, so
    with max_connections reached a waiting HAProxy connection waited out its whole
    read_timeout, where one that never said HELLO gives its slot up after a second."""
    import socket

    ini = write_ini(tmp_path, f"[listener]\ntls_cert = {pki.server_cert}\n"
                              f"tls_key = {pki.server_key}\ntls_ca = {pki.ca}\n"
                              "max_connections = 2\nread_timeout = 60s\n")
    metrics = free_port()
    agent = spoe_agent("-c", ini, "--metrics", f"127.0.0.1:{metrics}", app=SERVER_APP)
    stuck = [socket.create_connection((agent.host, agent.port), timeout=20) for _ in range(2)]
    try:
        wait_until(lambda: value(scrape(metrics), "spoe_agent_connections_open") == 2,
                   what="both stuck connections accepted")
        with tls_client(agent, pki, pki.client_cert, pki.client_key) as client:  # 10 s << 60 s
            assert client.handshake()["version"] == "2.0"
        assert stuck[0].recv(1) == b"", "the oldest was not closed"
        stuck[1].settimeout(0.5)
        with pytest.raises(TimeoutError):  # one slot was wanted: one connection gave it
            stuck[1].recv(1)
    finally:
        for sock in stuck:
            sock.close()
    samples = scrape(metrics)
    assert value(samples, "spoe_agent_limit_hits_total", limit="hello_evicted") == 1
    assert "its TLS handshake was not done" in agent.logs(), agent.describe_logs()
    assert "Traceback" not in agent.logs(), agent.describe_logs()
