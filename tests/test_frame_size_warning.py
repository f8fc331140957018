"""A negotiated frame too small for the reference messages is said at HELLO time.

HAProxy drops a message that does not fit the frame, logging nothing (its set-on-error
variable gets 3 or 259): the traces break, and the agent only saw sessions begin mid-stream.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import gevent
import gevent.socket
import pytest

from spoe_agent.config import AgentConfig, load_config
from spoe_agent.handlers import Agent
from spoe_agent.protocol.connection import MIN_FRAME_SIZE
from spoe_agent.server import SMALL_FRAME_SIZE, SpoaServer
from tests.support.spop_client import hello_frame


def serve_hellos(config: AgentConfig, *hellos: bytes) -> None:
    """Each HELLO on a connection of its own to one server, served to its end (EOF)."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = SpoaServer(Agent("frames"), config, listener=listener)
    try:
        for port, hello in enumerate(hellos, 40000):
            ours, haproxy = gevent.socket.socketpair()
            try:
                haproxy.sendall(hello)
                haproxy.shutdown(socket.SHUT_WR)
                serving = gevent.spawn(server._handle, ours, ("127.0.0.1", port))
                serving.join(10)
                assert serving.successful()
            finally:
                haproxy.close()
                ours.close()
    finally:
        listener.close()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "spoe_agent.server" and r.levelno == logging.WARNING]


def test_haproxys_small_max_frame_size_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="spoe_agent.server"):
        serve_hellos(AgentConfig(exporter="none"), hello_frame(max_frame_size=MIN_FRAME_SIZE))
    [line] = warnings(caplog)
    assert line.startswith(
        "HELLO from 127.0.0.1:40000 negotiated frames of 256 bytes, set by HAProxy's "
        "max-frame-size (spoe.cfg): HAProxy drops every SPOE message larger than 256 bytes, "
        "logging nothing (its set-on-error variable gets 3 or 259;"), line
    # Said to any agent, an --app's too: the messages are lost before they reach it.
    assert "so they never reach the agent (with the tracing agent, their spans are missing" in line
    assert "(HAProxy's is 16380)" in line


def test_the_agents_small_max_frame_size_is_named_with_its_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[listener]\nmax_frame_size = 1024\n")
    config = load_config(str(ini), env={})
    with caplog.at_level(logging.DEBUG, logger="spoe_agent.server"):
        serve_hellos(config, hello_frame())  # HAProxy's default, 16380
    [line] = warnings(caplog)
    assert line.startswith(
        f"HELLO from 127.0.0.1:40000 negotiated frames of 1024 bytes, set by the agent's "
        f"max_frame_size ({ini}:2): HAProxy drops every SPOE message larger than 1024 "
        f"bytes"), line


def test_one_warning_per_interval_and_none_for_ordinary_frames_or_health_checks(
        caplog: pytest.LogCaptureFixture) -> None:
    """HAProxy opens a connection per thread and reopens them after each idle close: the
    server's throttle keeps it to one line per 10 s. A health check carries no message."""
    small = hello_frame(max_frame_size=512)
    with caplog.at_level(logging.DEBUG, logger="spoe_agent.server"):
        serve_hellos(AgentConfig(exporter="none"), hello_frame(),
                     hello_frame(max_frame_size=SMALL_FRAME_SIZE),
                     hello_frame(max_frame_size=512, healthcheck=True), small, small, small)
    [line] = warnings(caplog)
    assert line.startswith("HELLO from 127.0.0.1:40003 negotiated frames of 512 bytes"), line
    hellos = [r for r in caplog.records if r.getMessage().startswith("HELLO from")
              and r.levelno == logging.DEBUG]
    assert len(hellos) == 6  # every HELLO was served: the others were held back, not missed


def test_the_reference_config_needs_more_than_a_minimum_frame() -> None:
    """The threshold's premise: the reference spoe.cfg's messages for one ordinary request
    (the bench's traced workload, built from devenv/conf/spoe.cfg) do not fit 256-byte frames,
    and fit SMALL_FRAME_SIZE with room for a longer URL and trace context."""
    from benchmarks.spop_load import traced_request

    sizes = [len(frame) - 4 for frame in traced_request(123456)]  # without the length prefix
    assert max(sizes) > MIN_FRAME_SIZE
    assert 2 * max(sizes) < SMALL_FRAME_SIZE, sizes
