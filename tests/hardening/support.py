"""Helpers shared by the hardening tests: agents on chosen ports, metrics scrapes, raw frames."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import Frame, FrameType, Message
from tests.support.procs import REPO_ROOT, AgentProcess, ManagedProcess
from tests.support.spop_client import SpopClient

SERVER_APP = "tests.apps.server_app:agent"
SLOW_APP = "tests.hardening.apps:agent"


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without OTEL_* (a developer's shell must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def write_ini(directory: Path, text: str, name: str = "agent.ini") -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def agent_on_port(
    log_dir: Path,
    port: int,
    *extra: str,
    app: str | None = SERVER_APP,
    env: Mapping[str, str] | None = None,
    name: str = "agent",
) -> AgentProcess:
    """Start the agent CLI on a given port (to restart one where HAProxy expects it)."""
    bind = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "spoe_agent", "--bind", bind, "--workers", "1"]
    if app is not None:
        argv += ["--app", app]
    argv += list(extra)
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    child_env["PYTHONUNBUFFERED"] = "1"
    proc = ManagedProcess(name, argv, log_dir, cwd=REPO_ROOT, env=child_env)
    agent = AgentProcess(proc, bind, "127.0.0.1", port, None)
    proc.start()
    return agent


# ------------------------------------------------------------------------------ metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, keyed by (sample name, label set)."""
    status, text = http_get(port, "/metrics")
    assert status == 200, (status, text)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# ------------------------------------------------------------------------------- frames


def disconnect_status(frame: Frame | None) -> int:
    """The status of an AGENT-DISCONNECT frame (fails on anything else)."""
    assert frame is not None, "connection closed without AGENT-DISCONNECT"
    assert frame.type == FrameType.AGENT_DISCONNECT, frame
    items = codec.decode_kv_list(frame.payload)
    return int(items["status-code"])


def read_until_eof(client: SpopClient) -> list[Frame]:
    """Every frame until the agent closes (a socket timeout fails the test, never hangs it)."""
    frames = []
    while True:
        frame = client.read_frame()
        if frame is None:
            return frames
        frames.append(frame)


def trace(session: str, *args: tuple[str, Any], ts_us: int | None = None) -> Message:
    """One span-language message for ``session`` (``id`` first, as the reference config)."""
    head: list[tuple[str, Any]] = [("id", session)]
    if ts_us is not None:
        head.append(("ts", ts_us))
    return Message("trace", head + list(args))


def whole_session(session: str, root: str = "root", child: str = "child") -> list[Message]:
    """A complete two-span session in two messages: started, then finished with ``finish=*``."""
    return [
        trace(session, ("span", root), ("kind", "server"), ("span", child), ("child-of", root)),
        trace(session, ("finish", child), ("finish", "*")),
    ]


def notify_ok(client: SpopClient, stream_id: int, messages: list[Message]) -> Frame:
    """Send one NOTIFY and return its ACK (fails on anything else)."""
    client.send(codec.notify(stream_id, 1, messages))
    frame = client.read_frame()
    assert frame is not None and frame.type == FrameType.ACK, frame
    assert frame.stream_id == stream_id
    return frame
