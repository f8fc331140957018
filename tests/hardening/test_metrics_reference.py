"""docs/metrics.md against what a real agent serves: a series added without its row fails here.

The document's series are the first cells of its tables (`` `name` ``, then the type); those in
the section "Only with `--workers`" are the ones a single process must not serve. A single
process (the tracing app, exporting to Jaeger over UDP, so that every conditional family is
there) and a two-worker agent are scraped; every family either serves must be documented with
its type, every label value it serves must be named in the document, and every documented
series must be served by the process kind the document says.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType
from tests.hardening.support import (
    clean_env,
    disconnect_status,
    http_get,
    notify_ok,
    whole_session,
)
from tests.support.procs import AgentProcess, free_port, free_port_range, wait_until
from tests.support.spop_client import SpopClient

AgentFactory = Callable[..., AgentProcess]

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_ROW = re.compile(r"^\|\s*`((?:spoe_agent|process)_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|")
# Labels whose values are not a fixed set to document: histogram bounds, worker indexes.
_FREE_LABELS = {"le", "worker"}

Served = dict[str, tuple[str, set[tuple[str, str]]]]  # name -> (type, {(label, value)})


def documented() -> tuple[dict[str, str], set[str], str]:
    """(series -> documented type, the series documented as --workers only, the whole text)."""
    text = DOC.read_text()
    types: dict[str, str] = {}
    workers_only: set[str] = set()
    section = ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line
        match = _ROW.match(line)
        if match is None:
            continue
        name, kind = match.groups()
        assert name not in types, f"{name} has two rows in {DOC.name}"
        types[name] = kind
        if "only with `--workers" in section.lower():
            workers_only.add(name)
    return types, workers_only, text


def served(port: int) -> Served:
    """Each family of a scrape, named as Prometheus stores it (counters with ``_total``)."""
    status, text = http_get(port, "/metrics")
    assert status == 200, (status, text)
    out: Served = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {(k, v) for s in family.samples for k, v in s.labels.items()
                  if k not in _FREE_LABELS}
        out[name] = (family.type, labels)
    return out


def check_documented(families: Served, where: str) -> None:
    types, _, text = documented()
    missing = sorted(set(families) - set(types))
    assert not missing, f"{where} serves series {DOC.name} does not document: {missing}"
    wrong = {n: (types[n], t) for n, (t, _) in families.items() if types[n] != t}
    assert not wrong, f"documented type != served type ({where}): {wrong}"
    unnamed = sorted({f"{n}{{{k}={v!r}}}" for n, (_, labels) in families.items()
                      for k, v in labels if f"`{v}`" not in text})
    assert not unnamed, f"{where} serves label values {DOC.name} does not name: {unnamed}"


@pytest.fixture
def jaeger_port() -> Iterator[int]:
    """A UDP socket that takes the agent's Jaeger datagrams (nothing reads them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def agent_env(jaeger_port: int) -> dict[str, str]:
    env = clean_env(OTEL_TRACES_EXPORTER="jaeger", OTEL_EXPORTER_JAEGER_AGENT_HOST="127.0.0.1",
                    OTEL_EXPORTER_JAEGER_AGENT_PORT=str(jaeger_port), OTEL_BSP_SCHEDULE_DELAY="50")
    env.pop("PROMETHEUS_DISABLE_CREATED_SERIES", None)  # the document lists the _created series
    return env


def healthy(port: int) -> bool:
    """``/health`` says 200 (the endpoint may not listen yet: the SPOP port opens first)."""
    try:
        return http_get(port, "/health")[0] == 200
    except OSError:
        return False


def test_a_single_process_serves_exactly_the_documented_series(
    spoe_agent: AgentFactory, jaeger_port: int
) -> None:
    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=None, env=agent_env(jaeger_port))
    wait_until(lambda: healthy(metrics), what="the metrics endpoint to serve")
    with SpopClient((agent.host, agent.port)) as client:  # a traced request, then a goodbye
        client.handshake()
        first, last = whole_session("doc-0")
        notify_ok(client, 1, [first])
        notify_ok(client, 3, [last])
        # A DISCONNECT: spoe_agent_disconnects_total only exists from the first one.
        client.send(codec.disconnect(FrameType.HAPROXY_DISCONNECT, 0, "normal"))
        assert disconnect_status(client.read_frame()) == 0
    wait_until(lambda: "spoe_agent_disconnects_total" in served(metrics),
               what="the DISCONNECT to be counted")
    families = served(metrics)
    check_documented(families, "a single process")

    types, workers_only, _ = documented()
    absent = sorted(set(types) - workers_only - set(families))
    assert not absent, (f"{DOC.name} documents series a single process does not serve (mark "
                        f"them 'Only with `--workers`' if that is why): {absent}")
    leaked = sorted(workers_only & set(families))
    assert not leaked, f"documented as --workers only, but a single process serves {leaked}"
    # The scrape is the agent's, not an empty one: the request above was counted.
    assert ("type", "notify") in families["spoe_agent_frames_total"][1]
    assert ("reason", "normal") in families["spoe_agent_disconnects_total"][1]


def test_the_workers_series_are_documented_and_served(
    spoe_agent: AgentFactory, jaeger_port: int
) -> None:
    metrics = free_port_range(3)  # the supervisor's, then one per worker
    worker_metrics = metrics + 1
    spoe_agent("--metrics", f"127.0.0.1:{metrics}", "--workers", "2", app=None,
               env=agent_env(jaeger_port))
    wait_until(lambda: healthy(metrics), what="the supervisor and both workers to serve")
    supervisor, worker = served(metrics), served(worker_metrics)
    check_documented(supervisor, "the --workers supervisor")
    check_documented(worker, "a worker's own endpoint")

    _, workers_only, _ = documented()
    absent = sorted(workers_only - set(supervisor))
    assert not absent, f"documented as --workers series, but the supervisor does not serve {absent}"
    assert {"spoe_agent_worker_up", "spoe_agent_worker_routing_total"} <= workers_only
    # The supervisor serves the agent's series too, and the workers' own view of the routing.
    assert "spoe_agent_frames_total" in supervisor
    assert "spoe_agent_worker_routing_total" in worker
    assert "spoe_agent_worker_up" not in worker
