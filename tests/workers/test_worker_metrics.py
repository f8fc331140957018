"""One metrics endpoint for ``--workers N``: the supervisor serves the agent's totals.

Real processes: a supervisor with two workers, driven by a raw SPOP client, scraped over HTTP and
parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType, Message
from tests.support.procs import AgentProcess, free_port, free_port_range, wait_until
from tests.support.spop_client import SpopClient
from tests.workers.test_multiworker import worker_pids

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def per_worker(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    want = set(labels.items())
    return {
        dict(ls)["worker"]: v
        for (n, ls), v in samples.items()
        if n == name and want <= ls and "worker" in dict(ls)
    }


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


def notify_some(agent: AgentProcess, count: int) -> None:
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        for i in range(count):
            client.send(codec.notify(2 * i + 1, 1, [Message("check", [("path", "/x")])]))
            assert client.read_frame().type == FrameType.ACK


def two_workers(spoe_agent: Callable[..., AgentProcess]) -> tuple[AgentProcess, int]:
    """A supervisor with two workers, serving metrics on the returned port, both serving."""
    port = free_port_range(3)  # the supervisor's, then one per worker
    agent = spoe_agent("--workers", "2", "--metrics", f"127.0.0.1:{port}")
    wait_until(lambda: health(port)[0] == 200, what="both workers serving")
    return agent, port


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` with exactly ``labels``."""
    return samples.get((name, frozenset(labels.items())))


def test_supervisor_serves_the_agents_totals_as_one_process_would(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    agent, port = two_workers(spoe_agent)
    with SpopClient((agent.host, agent.port)) as a, SpopClient((agent.host, agent.port)) as b:
        a.handshake()
        b.handshake()
        for n, client in enumerate((a, a, a, b, b)):
            client.send(codec.notify(2 * n + 1, 1, [Message("check", [("path", "/x")])]))
            assert client.read_frame().type == FrameType.ACK

        samples = scrape(port)
        assert per_worker(samples, "spoe_agent_worker_up") == {"0": 1, "1": 1}
        # Whichever worker got which connection (the hand-off's choice), the agent's totals,
        # labelled as one process labels them.
        assert total(samples, "spoe_agent_connections_open") == 2
        assert total(samples, "spoe_agent_frames_total", direction="in", type="notify") == 5
        assert not [key for key in samples if key[0].startswith("spoe_agent_frames")
                    and "worker" in dict(key[1])]
        assert per_worker(samples, "spoe_agent_worker_restarts_total") == {"0": 0, "1": 0}
        # Every family the workers expose comes through, histograms and process_* included;
        # what describes one process is not summed.
        names = {n for n, _ in samples}
        assert {"spoe_agent_ack_latency_seconds_count", "process_resident_memory_bytes"} <= names
        start = total(samples, "process_start_time_seconds")
        assert start is not None and start < 4e9  # a timestamp, not two added
        # Each worker's own detail stays on its own endpoint (port + 1 + index); the totals
        # are their sums.
        own = [scrape(port + 1 + i) for i in range(2)]
        for name, labels in (("spoe_agent_frames_total", {"direction": "in", "type": "notify"}),
                             ("spoe_agent_ack_latency_seconds_count", {})):
            parts = [total(worker, name, **labels) for worker in own]
            assert None not in parts and total(samples, name, **labels) == sum(parts), name
    status, body = health(port)
    assert status == 200 and "worker 0: ok" in body and "worker 1: ok" in body


@pytest.mark.slow
def test_a_dead_worker_shows_up_and_is_counted_when_replaced(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    agent, port = two_workers(spoe_agent)
    pids = wait_until(lambda: len(worker_pids(agent.process.pid)) == 2 and
                      worker_pids(agent.process.pid), what="two worker pids")
    # Two connections at once: the hand-off gives one to each worker, so each counts some.
    with SpopClient((agent.host, agent.port)) as a, SpopClient((agent.host, agent.port)) as b:
        a.handshake()
        b.handshake()
        for n, client in enumerate((a, a, b, b)):
            client.send(codec.notify(2 * n + 1, 1, [Message("check", [("path", "/x")])]))
            assert client.read_frame().type == FrameType.ACK
    notifies = {"direction": "in", "type": "notify"}
    assert total(scrape(port), "spoe_agent_frames_total", **notifies) == 4
    assert total(scrape(port + 2), "spoe_agent_frames_total", **notifies) == 2  # worker 1's
    # Stopped, not killed: it cannot answer, and the supervisor replaces it only once it has
    # been silent for supervisor.HUNG_AFTER_S (which these two scrapes, waiting for its
    # answer, may already take).
    os.kill(pids[1], signal.SIGSTOP)
    try:
        status, body = health(port)
        assert status == 503 and "worker 1: not serving" in body, body
        assert per_worker(scrape(port), "spoe_agent_worker_up") == {"0": 1, "1": 0}
    finally:
        # SIGKILL ends a stopped process too; no SIGCONT after it: the supervisor may already
        # have killed and reaped the pid (ProcessLookupError).
        try:
            os.kill(pids[1], signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: per_worker(scrape(port), "spoe_agent_worker_restarts_total").get("1") == 1,
               what="worker 1 restarted")
    wait_until(lambda: health(port)[0] == 200, what="the replacement serving")
    # What the dead worker had counted stays in the totals: a counter never goes down.
    assert total(scrape(port), "spoe_agent_frames_total", **notifies) == 4
    notify_some(agent, 3)
    samples = scrape(port)
    assert per_worker(samples, "spoe_agent_worker_up") == {"0": 1, "1": 1}
    assert total(samples, "spoe_agent_frames_total", **notifies) == 7


def test_each_death_and_restart_of_a_worker_is_logged_even_in_a_crash_loop(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """The supervisor's lines are what an operator reads in a crash loop: the generic rate
    limit of repeated lines (one per template per 10 s) hid every death after the first, with
    its exit status, lifetime, backoff and new pid, until some later death 10 s on."""
    agent, port = two_workers(spoe_agent)

    def restarts() -> float | None:
        return per_worker(scrape(port), "spoe_agent_worker_restarts_total").get("0")

    victims: list[int] = []
    for n in range(1, 4):
        pid = wait_until(lambda: worker_pids(agent.process.pid).get(0), what="worker 0's pid")
        victims.append(pid)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda n=n: restarts() == n, what=f"restart {n}")
        wait_until(lambda pid=pid: worker_pids(agent.process.pid).get(0) not in (None, pid),
                   what="the replacement's pid")
    replacement = worker_pids(agent.process.pid)[0]
    wait_until(lambda: f"started (pid {replacement})" in agent.logs(), what="the last start")
    logs = agent.logs()
    for pid in victims:
        assert f"worker 0 (pid {pid}) exited with signal SIGKILL" in logs, logs[-3000:]
    for pid in [*victims, replacement]:
        assert f"worker 0 started (pid {pid})" in logs, logs[-3000:]
    assert "similar suppressed" not in logs


def test_worker_endpoints_of_an_ipv6_bind_are_valid_urls() -> None:
    from spoe_agent.workers.metrics import worker_metrics_urls

    assert worker_metrics_urls("::1:9464", 2) == ["http://[::1]:9465", "http://[::1]:9466"]
    assert worker_metrics_urls("0.0.0.0:9464", 1) == ["http://127.0.0.1:9465"]
    assert worker_metrics_urls(":::9464", 1) == ["http://[::1]:9465"]


def test_spans_a_killed_worker_held_for_export_are_logged_and_counted(
    spoe_agent: Callable[..., AgentProcess],
) -> None:
    """Black-box run: SIGKILLing a worker under load lost ~40 finished traces, waiting in its
    export queue, and nothing said so (spans_dropped_total stayed 0). Its reports now carry
    its queue's size, which the supervisor logs and counts when the worker dies."""
    from tests.hardening.support import notify_ok, whole_session

    port = free_port_range(3)
    sink = free_port()  # UDP: nothing listens, and the queue is never flushed in the test
    agent = spoe_agent("--workers", "2", "--metrics", f"127.0.0.1:{port}", app=None,
                       env={"OTEL_EXPORTER_JAEGER_AGENT_HOST": "127.0.0.1",
                            "OTEL_EXPORTER_JAEGER_AGENT_PORT": str(sink),
                            "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    wait_until(lambda: health(port)[0] == 200, what="both workers serving")
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        for n in range(10):
            for m, message in enumerate(whole_session(f"held-{n}")):
                notify_ok(client, 2 * (10 * n + m) + 1, [message])

    def queued() -> dict[int, float]:
        return {i: total(scrape(port + 1 + i), "spoe_agent_export_queue_size") or 0.0
                for i in range(2)}

    # The report that carries the count comes once a second.
    wait_until(lambda: sorted(queued().values()) == [0, 20], what="20 spans queued in one worker")
    holder = next(i for i, size in queued().items() if size)
    time.sleep(1.5)
    pid = worker_pids(agent.process.pid)[holder]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: f"worker {holder} (pid {pid}) exited with signal SIGKILL" in agent.logs(),
               what="the death logged")
    assert ("about 20 spans waiting for export in it (their mean count over its last reported "
            "second) are lost") in agent.logs()
    wait_until(lambda: total(scrape(port), "spoe_agent_spans_dropped_total",
                             reason="worker_died") == 20, what="the loss counted")


def test_a_worker_reports_the_mean_of_what_it_held_for_export_over_the_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Chaos run: the queue is a saw (it fills, then a batch goes), and one sample a second
    read 0 after a batch as often as not; a SIGKILL lost 306 spans where the supervisor, told
    0, said nothing. Ten samples a second, and their mean reported."""
    import gevent

    from spoe_agent import workers

    monkeypatch.setattr(workers, "_REPORT_S", 0.01)
    held = iter([0] + [50] * 9 + [0] * 5 + [100] * 5 + [0] * 100)

    class Processor:
        @property
        def pending(self) -> int:
            return next(held)

    class Listener:
        closed = False
        reports: list[int | None] = []

        def report(self, pending: int | None) -> None:
            self.reports.append(pending)
            if len(self.reports) == 3:
                self.closed = True

    listener = Listener()
    gevent.spawn(workers._report_loop, listener, Processor()).join(10)
    assert listener.reports == [0, 45, 50]  # the first at once, then each over ten samples
