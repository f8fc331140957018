"""The supervisor's side of ``--workers``: connection hand-off and each worker's configuration."""

from __future__ import annotations

import os
import socket

import pytest

from spoe_agent.config import AgentConfig
from spoe_agent.workers import worker_config
from spoe_agent.workers.handoff import (
    HandoffListener,
    channel_pair,
    read_report,
    send_connection,
)


def test_a_handed_connection_is_the_accepted_one() -> None:
    ours, theirs = channel_pair()
    listener = HandoffListener(os.dup(theirs.fileno()), socket.AF_INET, "127.0.0.1:0")
    theirs.close()
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, address = server.accept()
    try:
        send_connection(ours, accepted, address)
        accepted.close()  # the supervisor's copy: the worker's is the one that lives on
        fd, got_address = listener._accept()
        assert got_address == address
        handed = socket.socket(fileno=fd)
        client.sendall(b"ping")
        assert handed.recv(4) == b"ping"
        handed.sendall(b"pong")
        assert client.recv(4) == b"pong"
        assert listener.open_connections() == 1
        handed.close()
        assert listener.open_connections() == 0
        with pytest.raises(BlockingIOError):
            listener._accept()  # nothing more was handed over
    finally:
        client.close()
        server.close()
        listener.close()
        ours.close()


def test_the_worker_reports_its_open_connections() -> None:
    ours, theirs = channel_pair()
    listener = HandoffListener(os.dup(theirs.fileno()), socket.AF_INET, "x")
    theirs.close()
    try:
        listener.report()
        assert read_report(ours.recv(64)) == 0
        assert read_report(b"L12") == 12
        assert read_report(b"garbage") is None
    finally:
        listener.close()
        ours.close()


@pytest.mark.parametrize("metrics, index, expected", [
    ("127.0.0.1:9100", 0, "127.0.0.1:9101"),  # 9100 is the supervisor's, for all of them
    ("127.0.0.1:9100", 2, "127.0.0.1:9103"),
    ("", 3, ""),
])
def test_each_worker_gets_its_metrics_address(metrics: str, index: int, expected: str) -> None:
    config = AgentConfig(workers=4, metrics=metrics)
    assert worker_config(config, index).metrics == expected


@pytest.mark.parametrize("cap, workers, share", [(100_000, 2, 50_000), (10, 3, 4), (1, 4, 1)])
def test_the_session_cap_is_shared_by_the_workers(cap: int, workers: int, share: int) -> None:
    config = AgentConfig(workers=workers, max_sessions=cap, max_connections=cap)
    assert worker_config(config, 0).max_sessions == share
    assert worker_config(config, 0).max_connections == share
    assert config.max_sessions == cap  # the original is left alone


def test_the_supervisor_accepts_only_once_every_worker_serves() -> None:
    """At start a connection waits in the backlog until every worker has reported (its routing
    set up): a worker serving alone would route sessions to peers still starting."""
    import gevent
    import gevent.socket

    from spoe_agent.workers.handoff import REPORT_PREFIX, channel_pair
    from spoe_agent.workers.supervisor import Supervisor

    supervisor = Supervisor(AgentConfig(workers=2, exporter="none"), [])
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    supervisor._listener = listener
    workers = []
    for slot in supervisor.slots:
        ours, theirs = channel_pair()
        slot.channel = ours
        slot.reader = gevent.spawn(supervisor._read_reports, slot, ours)
        workers.append(theirs)
    acceptor = gevent.spawn(supervisor._accept_loop)
    client = gevent.socket.create_connection(listener.getsockname())
    try:
        gevent.sleep(0.05)
        workers[0].send(REPORT_PREFIX + b"0")
        gevent.sleep(0.05)
        assert sum(slot.handed for slot in supervisor.slots) == 0  # one worker is not enough
        workers[1].send(REPORT_PREFIX + b"0")
        with gevent.Timeout(5):
            while sum(slot.handed for slot in supervisor.slots) == 0:
                gevent.sleep(0.01)
        assert all(slot.serving for slot in supervisor.slots)
    finally:
        acceptor.kill()
        for slot in supervisor.slots:
            slot.reader.kill()
        client.close()
        listener.close()
        for sock in workers:
            sock.close()
