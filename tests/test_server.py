"""The gevent server as deployed (a real ``spoe-agent`` process), driven by a raw SPOP client."""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType, Message, Scope, SetVar
from tests.support.procs import free_port, wait_for_unix_socket, wait_until
from tests.support.spop_client import SpopClient, hello_frame

APP = "tests.apps.server_app:agent"


def ack_actions(frame) -> list:
    assert frame.type == FrameType.ACK and frame.fin
    return codec.decode_actions(frame.payload)


def test_inline_and_unhandled_and_failing_handlers(spoe_agent) -> None:
    agent = spoe_agent(app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        caps = client.handshake()
        assert caps["version"] == "2.0" and caps["max-frame-size"] == 16380
        client.send(codec.notify(0, 1, [Message("inline", [("v", 7)])]))
        frame = client.read_frame()
        assert (frame.stream_id, frame.frame_id) == (0, 1)
        assert ack_actions(frame) == [SetVar(Scope.TXN, "n", 7)]
        client.send(codec.notify(2, 1, [Message("nobody-handles-this", [("x", 1)])]))
        frame = client.read_frame()
        assert (frame.stream_id, frame.frame_id, frame.payload) == (2, 1, b"")
        # A failing handler costs its own actions only; the other message's still arrive.
        client.send(codec.notify(4, 1, [Message("boom", []), Message("inline", [("v", 1)])]))
        frame = client.read_frame()
        assert (frame.stream_id, ack_actions(frame)) == (4, [SetVar(Scope.TXN, "n", 1)])
    assert "handler for SPOE message 'boom' failed" in agent.process.stderr_text()


def test_an_action_that_cannot_be_encoded_costs_only_itself(spoe_agent) -> None:
    """HELLO and two NOTIFYs in one write, the first answered with a float: every frame of the
    read is still answered and the connection stays up (it used to die with a traceback, the
    AGENT-HELLO of the same read unsent)."""
    agent = spoe_agent(app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        client.send(hello_frame() + codec.notify(1, 1, [Message("floaty", [])])
                    + codec.notify(2, 1, [Message("inline", [("v", 5)])]))
        assert client.read_frame().type == FrameType.AGENT_HELLO
        first, second = client.read_frame(), client.read_frame()
        assert (first.stream_id, ack_actions(first)) == (1, [SetVar(Scope.TXN, "ok", 1)])
        assert (second.stream_id, ack_actions(second)) == (2, [SetVar(Scope.TXN, "n", 5)])
        client.send(codec.notify(3, 1, [Message("inline", [("v", 6)])]))
        assert ack_actions(client.read_frame()) == [SetVar(Scope.TXN, "n", 6)]
    assert ") of float cannot be encoded (cannot encode float" in agent.process.stderr_text()
    assert "Traceback" not in agent.process.stderr_text()


def test_pipelined_concurrent_handlers_get_whole_acks_in_any_order(spoe_agent) -> None:
    agent = spoe_agent(app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        count = 200
        client.send(b"".join(
            codec.notify(2 * i + 1, 1, [Message("slow", [("i", i)])]) for i in range(count)
        ))
        seen = {}
        for _ in range(count):
            frame = client.read_frame()
            actions = ack_actions(frame)
            seen[frame.stream_id] = actions[0].value
        assert seen == {2 * i + 1: i for i in range(count)}
        order = list(seen)
        assert order != sorted(order), "concurrent handlers should complete out of order"


def test_before_notifies_runs_once_per_read_of_notifies_before_any_is_handled(spoe_agent) -> None:
    agent = spoe_agent(app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()  # a read without NOTIFYs: no call
        client.send(b"".join(codec.notify(1 + 2 * i, 1, [Message("reads", [])]) for i in range(3)))
        counts = [ack_actions(client.read_frame())[0].value for _ in range(3)]
        assert counts == [1, 1, 1]  # one read, one call, before the first was handled
        client.send(codec.notify(7, 1, [Message("reads", [])]))
        assert ack_actions(client.read_frame())[0].value == 2


def test_malformed_frame_gets_agent_disconnect_with_status(spoe_agent) -> None:
    agent = spoe_agent(app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        client.send(codec.encode_frame(FrameType.NOTIFY, 1, 1, b"\x01m\x01\x01a\x0e"))
        frame = client.read_frame()
        assert frame.type == FrameType.AGENT_DISCONNECT
        items = codec.decode_kv_list(frame.payload)
        assert items["status-code"] == 4 and "unknown data type" in items["message"]
        assert client.read_frame() is None  # and the agent closed
    # The agent is still serving.
    with SpopClient((agent.host, agent.port)) as client:
        assert client.handshake()["version"] == "2.0"


def flooded(spoe_agent, tmp_path: Path, message: Message,  # type: ignore[no-untyped-def]
            receive_buffer: int) -> tuple[Any, socket.socket]:
    """An agent with a 1 s read_timeout, and a connection that sent it 399 NOTIFYs whose ACKs
    are 16 KB each, after its HELLO was read alone (the reader parked at a frame boundary)."""
    ini = tmp_path / "agent.ini"
    ini.write_text("[listener]\nread_timeout = 1s\n")
    agent = spoe_agent("-c", str(ini), app="tests.apps.echo:agent")  # both messages fill ACKs
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((agent.host, agent.port))
    sock.sendall(hello_frame())
    time.sleep(0.5)
    sock.sendall(b"".join(codec.notify(i, 1, [message]) for i in range(1, 400)))
    return agent, sock


@pytest.mark.parametrize("message", [
    # The reader's own write (an inline handler): the write's timeout was logged as "ended:
    # timed out", then as the peer having closed mid-frame ("HAProxy stopped or restarted,
    # or the network failed"): black-box run.
    Message("measure", [("blob", "fill=16000")]),
    # A concurrent handler's: begun while the reader was parked (socket timeout: none), it
    # waited for ever, holding the write lock; the other handlers and the reader queued
    # behind it, and the connection's slot was never freed: code review.
    Message("fill-slowly", [("size", 16000)]),
], ids=["inline", "concurrent"])
def test_a_peer_that_reads_no_acks_is_closed_at_the_write_deadline_and_said_so(
        spoe_agent, tmp_path: Path, message: Message) -> None:
    agent, sock = flooded(spoe_agent, tmp_path, message, receive_buffer=4096)
    try:
        deadline = time.monotonic() + 20
        while "read none of the agent's frames" not in agent.process.stderr_text():
            assert time.monotonic() < deadline, agent.process.stderr_text()
            time.sleep(0.1)
    finally:
        sock.close()
    text = agent.process.stderr_text()
    assert "it read none of the agent's frames for 1.0s (the socket's buffers stayed full)" \
        in text
    assert "closed in the middle of a frame" not in text and "ended: timed out" not in text
    with SpopClient((agent.host, agent.port)) as client:  # and it serves on
        client.handshake()
        client.send(codec.notify(1, 1, [Message("fill-slowly", [("size", 3)])]))
        assert client.read_frame().type == FrameType.ACK


@pytest.mark.parametrize("message", [
    Message("measure", [("blob", "fill=16000")]), Message("fill-slowly", [("size", 16000)]),
], ids=["inline", "concurrent"])
def test_a_slow_peer_that_keeps_reading_is_not_cut(spoe_agent, tmp_path: Path,
                                                    message: Message) -> None:
    """Black-box run: the write deadline first bounded a whole write, so a peer reading 30 MB
    of ACKs at 256 KB/s was cut as if it read nothing. It bounds each wait for room."""
    agent, sock = flooded(spoe_agent, tmp_path, message, receive_buffer=16384)
    try:
        received = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.5:  # three deadlines and more, reading slowly
            chunk = sock.recv(32768)
            assert chunk, ("closed", received, agent.process.stderr_text())
            received += len(chunk)
            time.sleep(0.1)
        assert received < 399 * 16000  # still reading: the agent had more to write
    finally:
        sock.close()
    assert "read none of the agent's frames" not in agent.process.stderr_text()


def test_a_haproxy_disconnect_without_status_is_logged_as_such(spoe_agent) -> None:
    """It read "status -1 ()" (black-box run); HAProxy always sends one."""
    agent = spoe_agent(app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        client.send(codec.encode_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, b""))
        assert client.read_frame().type == FrameType.AGENT_DISCONNECT
    deadline = time.monotonic() + 10
    while "without a status code" not in agent.process.stderr_text():
        assert time.monotonic() < deadline, agent.process.stderr_text()
        time.sleep(0.05)
    assert "status -1" not in agent.process.stderr_text()


def test_healthcheck_is_answered_and_closed(spoe_agent) -> None:
    agent = spoe_agent(app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        caps = client.handshake(capabilities="", healthcheck=True)
        assert caps["version"] == "2.0"
        assert client.read_frame() is None


def test_unix_socket_bind(spoe_agent) -> None:
    agent = spoe_agent(app=APP, unix=True)
    with SpopClient(str(agent.socket_path)) as client:
        client.handshake()
        client.send(codec.notify(9, 3, [Message("inline", [("v", -5)])]))
        assert ack_actions(client.read_frame()) == [SetVar(Scope.TXN, "n", -5)]


def test_start_up_objects_are_frozen_out_of_the_collector(spoe_agent) -> None:
    """A full collection walks every tracked object: ~15 ms of stall with the start-up's
    ~36,000 of them, so those are frozen before serving."""
    agent = spoe_agent(app="tests.apps.echo:agent")
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        client.send(codec.notify(1, 1, [Message("gc", [])]))
        (frozen,) = ack_actions(client.read_frame())
    assert frozen.name == "frozen" and frozen.value > 10_000


def test_sigterm_disconnects_open_connections_and_exits_zero(spoe_agent) -> None:
    agent = spoe_agent(app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        agent.process.send_signal(signal.SIGTERM)
        frame = client.read_frame()
        assert frame.type == FrameType.AGENT_DISCONNECT
        assert codec.decode_kv_list(frame.payload)["status-code"] == 0
        assert client.read_frame() is None
    assert agent.process.wait(10) == 0


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_cpu(pid: int, seconds: float = 1.0) -> float:
    """Cores the process used while nobody talked to it."""
    before, start = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_seconds(pid) - before) / (time.monotonic() - start)


def test_busy_poll_never_sleeps_serves_and_still_stops_cleanly(spoe_agent) -> None:
    """--busy-poll (HAProxy's busy-polling, for the agent): the loop polls instead of sleeping,
    so an idle agent keeps its core busy where a default one sleeps; it serves as usual, and
    SIGTERM still drains and exits 0."""
    plain = spoe_agent(app=APP)
    busy = spoe_agent("--busy-poll", app=APP)
    with SpopClient((busy.host, busy.port)) as client:
        client.handshake()
        client.send(codec.notify(3, 1, [Message("inline", [("v", 2)])]))
        assert ack_actions(client.read_frame()) == [SetVar(Scope.TXN, "n", 2)]
        plain_cpu, busy_cpu = _idle_cpu(plain.process.pid), _idle_cpu(busy.process.pid)
        # A sleeping agent uses ~0.00-0.01 of a core here and a polling one all it is given:
        # ~1 alone, 0.15 once beside a CPU-bound job on both cores. The bound tells them apart
        # without asking for a core the machine may not have free.
        assert plain_cpu < 0.1 and busy_cpu > 0.1 and busy_cpu > 5 * plain_cpu, (
            plain_cpu, busy_cpu)
        busy.process.send_signal(signal.SIGTERM)
        frame = client.read_frame()
        assert frame.type == FrameType.AGENT_DISCONNECT
        assert codec.decode_kv_list(frame.payload)["status-code"] == 0
    assert busy.process.wait(10) == 0
    assert "busy polling" in busy.process.stderr_text()


def test_busy_poll_window_polls_while_events_come_and_sleeps_when_idle(spoe_agent) -> None:
    """--busy-poll 50ms: the loop keeps polling for 50 ms after each read, so events that come
    closer together than that never find it asleep, and an idle agent sleeps like a default
    one."""
    windowed = spoe_agent("--busy-poll", "50ms", app=APP)
    with SpopClient((windowed.host, windowed.port)) as client:
        client.handshake()
        assert _idle_cpu(windowed.process.pid) < 0.1
        pid = windowed.process.pid
        before, start = _cpu_seconds(pid), time.monotonic()
        stream = 0
        while time.monotonic() - start < 1.0:  # an event every 10 ms: inside the window
            client.send(codec.notify(stream, 1, [Message("inline", [("v", 2)])]))
            assert ack_actions(client.read_frame()) == [SetVar(Scope.TXN, "n", 2)]
            stream += 1
            time.sleep(0.01)
        polling = (_cpu_seconds(pid) - before) / (time.monotonic() - start)
        time.sleep(0.1)  # the last read's 50 ms of polling are over
        idle = _idle_cpu(pid)
        # Sleeping between these events, an agent uses ~0.01 of a core; polling, all it is
        # given (see the test above for the bound).
        assert polling > 0.1 and polling > 5 * idle, (polling, idle)
    assert "busy polling 50ms after each read" in windowed.process.stderr_text()


def test_busy_poll_window_stops_polling_once_the_window_passes() -> None:
    import gevent

    from spoe_agent.busy_poll import BusyPoll

    poll = BusyPoll(0.02)
    try:
        gevent.sleep(0.1)
        assert not poll.watcher.active  # nothing read yet: the loop may sleep
        poll.touch()
        assert poll.watcher.active
        gevent.sleep(0.1)
        assert not poll.watcher.active
    finally:
        poll.stop()
    forever = BusyPoll(float("inf"))
    try:
        gevent.sleep(0.05)
        assert forever.watcher.active
    finally:
        forever.stop()


def test_busy_poll_true_from_code_still_means_forever() -> None:
    """``AgentConfig(busy_poll=True)``, as code written before windows says it: forever, not a
    window of one second."""
    from spoe_agent.config import AgentConfig
    from spoe_agent.handlers import Agent
    from spoe_agent.server import SpoaServer

    server = SpoaServer(Agent("t"), AgentConfig(bind="127.0.0.1:0", busy_poll=True))
    server.start()
    try:
        assert server._busy_poll is not None and server._busy_poll.window == float("inf")
    finally:
        server.stop()


def test_only_connections_silent_past_the_grace_count_as_evictable() -> None:
    """What a worker reports as free slots (workers.handoff.report): neither a connection that
    said HELLO nor one connected for less than HELLO_GRACE_S."""
    import gevent

    from spoe_agent.config import AgentConfig
    from spoe_agent.handlers import Agent
    from spoe_agent.server import HELLO_GRACE_S, SpoaServer

    server = SpoaServer(Agent("t"), AgentConfig(bind="127.0.0.1:0"))
    server.start()
    address = server.address
    silent = socket.create_connection(address)
    greeted = socket.create_connection(address)
    try:
        greeted.sendall(hello_frame())
        gevent.sleep(0.2)  # both accepted; the HELLO answered
        assert len(server._clients) == 2 and server.evictable() == 0  # too young, or greeted
        gevent.sleep(HELLO_GRACE_S)
        assert server.evictable() == 1
    finally:
        silent.close()
        greeted.close()
        server.stop(timeout=1)


def _agent_on(path: str, workers: str = "1", *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "spoe_agent", "--bind", f"unix:{path}", "--workers", workers,
         "--exporter", "none", "--app", APP, *args],
        stderr=subprocess.PIPE, text=True)


def _a_group_to_give() -> grp.struct_group:
    """A group this process may give its files other than its own when there is one (root:
    any; anyone else: a supplementary group), so that the chgrp shows."""
    mine = os.getegid()
    if os.geteuid() == 0:
        candidates = [g.gr_gid for g in grp.getgrall()]
    else:
        candidates = os.getgroups()
    others = [gid for gid in candidates if gid != mine]
    return grp.getgrgid(others[0] if others else mine)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unix_socket_gets_the_configured_mode_and_group(tmp_path: Path, workers: str) -> None:
    """HAProxy running as its own user (Debian's "user haproxy") needs write permission on the
    socket to connect; under the usual umask it was 0755 and HAProxy got nothing. With
    --workers N the supervisor makes the socket, so both paths are checked."""
    group = _a_group_to_give()
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[listener]\nunix_mode = 660\nunix_group = {group.gr_name}\n")
    path = Path(tempfile.mkdtemp(prefix="spoe-unix-")) / "agent.sock"
    agent = _agent_on(str(path), workers, "-c", str(ini))
    try:
        wait_for_unix_socket(path, 20)
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == group.gr_gid
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0, agent.stderr.read()


def test_make_listener_sets_the_mode_before_the_socket_listens() -> None:
    from spoe_agent.listeners import make_listener

    path = Path(tempfile.mkdtemp(prefix="spoe-unix-")) / "agent.sock"
    for mode in (0o600, 0o666):
        sock = make_listener(f"unix:{path}", listen=False, mode=mode)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == mode
        finally:
            sock.close()
            path.unlink()


def test_a_host_name_listens_where_haproxy_would_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """HAProxy connects a server named ``localhost`` to the first address getaddrinfo gives,
    ::1 on a stock Debian; the agent bound the name for IPv4 alone (black-box run), so a
    name is resolved the same way here, whichever family comes first."""
    from spoe_agent import listeners

    real = socket.getaddrinfo

    def resolver(host, port, family=0, type=0, *rest):  # type: ignore[no-untyped-def]
        if host == "dual.test":
            return [(socket.AF_INET6, type, 0, "", ("::1", 0, 0, 0)),
                    (socket.AF_INET, type, 0, "", ("127.0.0.1", 0))]
        return real(host, port, family, type, *rest)

    monkeypatch.setattr(listeners.socket, "getaddrinfo", resolver)
    sock = listeners.make_listener("dual.test:0", listen=False)
    try:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
    finally:
        sock.close()
    assert listeners.bind_problem("dual.test:9") is None
    assert listeners.resolve_host("127.0.0.1") == (socket.AF_INET, "127.0.0.1")
    assert listeners.resolve_host("::1") == (socket.AF_INET6, "::1")
    assert (listeners.bind_problem("nosuchhost.invalid:9") or "").startswith(
        "cannot resolve nosuchhost.invalid: ")


def test_unix_permissions_with_a_tcp_bind_are_said_to_be_ignored(caplog) -> None:
    from spoe_agent.listeners import make_listener

    with caplog.at_level(logging.WARNING, logger="spoe_agent.listeners"):
        make_listener("127.0.0.1:0", listen=False, mode=0o660).close()
    assert "unix_mode and unix_group apply to a unix: bind only; ignored for 127.0.0.1:0" in (
        caplog.text)


def test_check_says_unix_permissions_with_a_tcp_bind_are_ignored(tmp_path: Path) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[listener]\nbind = 127.0.0.1:9000\nunix_mode = 660\n")
    done = subprocess.run([sys.executable, "-m", "spoe_agent", "-c", str(ini), "--check",
                           "--exporter", "none"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "unix_mode and unix_group apply to a unix: bind only; ignored" in done.stdout


def test_start_up_log_writes_an_ipv6_bind_as_bind_takes_it() -> None:
    """``::1:PORT`` read as an address without a port; ``[::1]:PORT`` is what --bind takes."""
    port = free_port("::1")
    agent = subprocess.Popen(
        [sys.executable, "-m", "spoe_agent", "--bind", f"[::1]:{port}", "--workers", "1",
         "--exporter", "none", "--app", APP], stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stderr is not None
        line = ""
        while "listening on" not in line:
            line = agent.stderr.readline()
            assert line, "the agent exited without saying where it listens"
        assert f"listening on [::1]:{port} " in line, line
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0


def _start_with_the_metrics_port_taken(workers: str,
                                       *flags: str) -> tuple[subprocess.CompletedProcess[str], int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spop = free_port()
        result = subprocess.run(
            [sys.executable, "-m", "spoe_agent", "--bind", f"127.0.0.1:{spop}", "--workers",
             workers, "--metrics", f"127.0.0.1:{port}", "--exporter", "none", "--app", APP,
             *flags],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    return result, port


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_port_in_use_is_named_once(workers: str) -> None:
    """gevent appends the address to the reason, which the message names already."""
    result, port = _start_with_the_metrics_port_taken(workers)
    assert result.stderr.endswith(
        f"spoe-agent: cannot start: cannot serve metrics on 127.0.0.1:{port}: "
        "Address already in use\n"), result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_with_json_logs_a_failed_start_is_a_json_line_too(workers: str) -> None:
    """Black-box run: with --log-format json every line was JSON but the one saying why the
    agent did not start."""
    import json

    result, port = _start_with_the_metrics_port_taken(workers, "--log-format", "json")
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [r for r in records if r["level"] == "error" and r["msg"] == (
        f"cannot start: cannot serve metrics on 127.0.0.1:{port}: Address already in use")], (
        result.stderr)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bind_that_fails_at_start_names_the_line_that_set_it(workers: str,
                                                               tmp_path: Path) -> None:
    """The value was valid, the machine refused it: the operator still needs the line."""
    ini = tmp_path / "agent.ini"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ini.write_text(f"[listener]\nbind = 127.0.0.1:{port}\n")
        result = subprocess.run(
            [sys.executable, "-m", "spoe_agent", "-c", str(ini), "--workers", workers,
             "--exporter", "none", "--app", APP],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert (f"cannot listen on 127.0.0.1:{port} ({ini}:2): Address already in use"
            in result.stderr), result.stderr


def test_a_live_unix_socket_with_a_full_backlog_is_still_another_agents() -> None:
    """Black-box run: a second agent on the path of one whose backlog was full (stopped, say)
    said "Resource temporarily unavailable", the probe's EAGAIN, instead of naming it."""
    from spoe_agent.listeners import remove_stale_socket

    path = Path(tempfile.mkdtemp(prefix="spoe-unix-")) / "agent.sock"
    waiting = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(str(path))
        owner.listen(1)
        try:
            for _ in range(64):  # never accepted: the backlog fills
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                waiting.append(client)
                client.connect(str(path))
        except BlockingIOError:
            pass
        else:
            raise AssertionError("the backlog never filled")
        with pytest.raises(OSError, match=f"another process listens on {path}"):
            remove_stale_socket(str(path))
        assert path.exists()
    for client in waiting:
        client.close()
    path.unlink()


def test_unix_bind_never_replaces_a_file_or_a_live_socket(tmp_path: Path) -> None:
    """Where a TCP port in use is refused, a unix path in use must be too: unlinking it
    destroyed a regular file, or silently cut a running agent off from HAProxy."""
    precious = tmp_path / "precious.txt"
    precious.write_text("data")
    refused = _agent_on(str(precious))
    assert refused.wait(20) == 1
    assert "exists and is not a socket" in refused.stderr.read()
    assert precious.read_text() == "data"

    path = Path(tempfile.mkdtemp(prefix="spoe-unix-")) / "agent.sock"  # sun_path is short
    first = _agent_on(str(path))
    try:
        wait_for_unix_socket(path, 20)
        second = _agent_on(str(path))
        assert second.wait(20) == 1
        assert f"another spoe-agent is starting or serving on {path}" in second.stderr.read()
        with SpopClient(str(path)) as client:  # the first one still answers there
            client.handshake()
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
    assert not path.exists()  # a clean stop removes its socket file


def test_a_stale_socket_file_is_replaced_and_removed_at_stop(tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(prefix="spoe-unix-")) / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening, closed: what a killed agent leaves
    stale.close()
    for workers in ("1", "2"):
        agent = _agent_on(str(path), workers)
        try:
            wait_for_unix_socket(path, 20)
            with SpopClient(str(path)) as client:
                client.handshake()
        finally:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(20) == 0, agent.stderr.read()
        assert not path.exists(), workers


def test_a_stop_removes_its_own_socket_file_only(tmp_path: Path) -> None:
    """Code review: the stop of an agent whose path another agent had taken meanwhile probed
    the new socket, bound but not listening yet, took it for a stale one and unlinked it."""
    from spoe_agent.listeners import make_listener, remove_listener_socket

    path = Path(tempfile.mkdtemp(prefix="spoe-unix-")) / "agent.sock"
    old = make_listener(f"unix:{path}", listen=False)
    old.close()
    path.unlink()  # the new agent's start found it stale (as it is, between bind and listen)
    time.sleep(0.05)  # (file times tick every few ms: a real restart is seconds apart)
    new = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    new.bind(str(path))
    try:
        remove_listener_socket(f"unix:{path}")  # the old agent's stop
        assert path.exists(), "the new agent's socket was removed"
        mine = make_listener(f"unix:{tmp_path / 'mine.sock'}")
        mine.close()
        remove_listener_socket(f"unix:{tmp_path / 'mine.sock'}")
        assert not (tmp_path / "mine.sock").exists()
    finally:
        new.close()
        path.unlink()


STARTING_AGENT_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from spoe_agent.listeners import make_listener

mine = make_listener({bind!r}, listen=False)  # bound, as the runner binds, not listening yet
print("bound", flush=True)
sys.stdin.read()  # until the test lets it go; then it exits, its socket file left behind
"""


def test_a_path_another_agent_is_starting_on_is_refused(tmp_path: Path) -> None:
    """Black-box run: two agents started at once on one unix path. The first had bound but
    not listened yet, so the second's probe was refused, as by a stale socket: it unlinked the
    first one's socket and took the path, and the first served a file nobody could reach."""
    from spoe_agent.listeners import make_listener, remove_listener_socket

    path = Path(tempfile.mkdtemp(prefix="spoe-unix-")) / "agent.sock"
    repo = Path(__file__).resolve().parents[1]
    first = subprocess.Popen(
        [sys.executable, "-c", STARTING_AGENT_SCRIPT.format(repo=str(repo), bind=f"unix:{path}")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo)
    try:
        assert first.stdout is not None and first.stdout.readline() == "bound\n"
        bound = path.stat()
        with pytest.raises(OSError, match="another spoe-agent is starting or serving on"):
            make_listener(f"unix:{path}", listen=False)
        assert (path.stat().st_ino, path.stat().st_ctime_ns) == (bound.st_ino,
                                                                  bound.st_ctime_ns)
    finally:
        first.communicate("", timeout=30)
    # Its claim went with it: its socket file is stale now, and the path free.
    mine = make_listener(f"unix:{path}")
    mine.close()
    remove_listener_socket(f"unix:{path}")
    assert not path.exists()


LISTEN_RACE_SCRIPT = """
import socket, sys
sys.path.insert(0, {repo!r})
from spoe_agent.config import AgentConfig
from spoe_agent.handlers import Agent
from spoe_agent.listeners import make_listener
from spoe_agent.runner import StartupError, run

mine = make_listener("127.0.0.1:0", listen=False)  # bound, as the runner binds, not listening
port = mine.getsockname()[1]
other = socket.socket()
other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
other.bind(("127.0.0.1", port))  # SO_REUSEADDR both: Linux lets a second agent bind it too
other.listen(1)  # and it listens first
try:
    run(Agent("late"), AgentConfig(bind=f"127.0.0.1:{{port}}", exporter="none"), listener=mine)
except StartupError as exc:
    print("StartupError:", exc)
"""


def test_a_port_another_agent_listens_on_first_is_a_startup_error() -> None:
    """Code review: with the port bound but not listening during start-up, a second agent
    could bind and listen first, and the first one's listen() ended it with a traceback."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", LISTEN_RACE_SCRIPT.format(repo=str(repo))],
                          capture_output=True, text=True, timeout=60, cwd=repo)
    assert done.stdout.startswith("StartupError: cannot listen on 127.0.0.1:"), \
        done.stdout + done.stderr
    assert "Address already in use" in done.stdout and "Traceback" not in done.stderr


def test_a_protocol_errors_goodbye_read_while_stopping_is_still_sent() -> None:
    """Code review: at a stop, a buffered NOTIFY for a concurrent handler then a bad frame
    held the AGENT-DISCONNECT for the handler's ACK; the handler outlived the stop's deadline,
    and the goodbye was never written, though counted as sent."""
    import gevent
    import gevent.socket

    from spoe_agent.config import AgentConfig
    from spoe_agent.handlers import Agent
    from spoe_agent.server import SpoaServer

    agent = Agent("stopping")

    @agent.message("slow", concurrent=True)
    def slow(args):  # type: ignore[no-untyped-def]
        gevent.sleep(10)
        return []

    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = SpoaServer(agent, AgentConfig(exporter="none"), listener=listener)
    ours, theirs = gevent.socket.socketpair()
    try:
        theirs.sendall(hello_frame())
        serving = gevent.spawn(server._handle, ours, ("127.0.0.1", 40000))
        gevent.sleep(0.1)  # HELLO answered; the reader parks
        bad = codec.encode_frame(FrameType.NOTIFY, 3, 1, b"\x01m\x01\x01a\x0e")  # type 14
        theirs.sendall(codec.notify(1, 1, [Message("slow", [])]) + bad)
        server.stop(timeout=0.3)  # no yield since the send: the drain reads them
        serving.join(5)
        theirs.settimeout(5)
        received = b""
        while chunk := theirs.recv(65536):
            received += chunk
        frames = []
        while received:
            size = int.from_bytes(received[:4], "big")
            frames.append(codec.decode_frame(received[4:4 + size]))
            received = received[4 + size:]
        assert frames[-1].type == FrameType.AGENT_DISCONNECT, frames
        assert codec.decode_kv_list(frames[-1].payload)["status-code"] == 4
    finally:
        theirs.close()
        listener.close()


def test_with_read_timeout_off_a_connection_stuck_mid_frame_ends_at_idle_timeout_named_so(
        spoe_agent, tmp_path: Path) -> None:
    """Code review: the idle sweep ended it, and the log blamed "read_timeout (0.0s)"."""
    ini = tmp_path / "agent.ini"
    ini.write_text("[listener]\nread_timeout = 0\nidle_timeout = 500ms\n")
    agent = spoe_agent("-c", str(ini), app=APP)
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        client.send(codec.notify(1, 1, [Message("inline", [("v", 1)])])[:9])  # half a frame
        frame = client.read_frame()
        assert frame is not None and frame.type == FrameType.AGENT_DISCONNECT
        assert codec.decode_kv_list(frame.payload)["status-code"] == 2
    deadline = time.monotonic() + 10
    while "idle_timeout (0.5s)" not in agent.process.stderr_text():
        assert time.monotonic() < deadline, agent.process.stderr_text()
        time.sleep(0.05)
    assert "read_timeout (0.0s)" not in agent.process.stderr_text()


def test_a_connection_gone_before_accept_is_skipped_without_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Code review: accept() passes on a pending error of the connection it was to return
    (ECONNABORTED, a firewall's EPERM ...), which gevent printed as a traceback, past the log's
    format; accept(2) says to treat them as EAGAIN."""
    import errno

    import gevent

    from spoe_agent.acceptor import AcceptingServer

    served: list[object] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)  # as make_listener leaves it
    server = AcceptingServer(listener, lambda sock, address: served.append(address))

    class Aborting:
        """The listener, whose first accept finds the connection reset meanwhile."""

        def __init__(self, real: socket.socket) -> None:
            self.real, self.failed = real, False

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

        def _accept(self) -> tuple[int, object]:
            if not self.failed:
                self.failed = True
                raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
            return self.real._accept()

    server.start()
    aborting = server.socket = Aborting(server.socket)  # type: ignore[assignment]
    try:
        with socket.create_connection(listener.getsockname()):
            wait_until(lambda: gevent.sleep(0.01) or served, timeout=5, what="the connection served")
    finally:
        server.stop()
    assert aborting.failed and len(served) == 1
    assert "Traceback" not in capsys.readouterr().err
