"""The supervisor's ``/metrics`` and ``/health``: every worker's, on the one configured address.

Prometheus should scrape one target per agent, whatever ``--workers`` is, and a dashboard should
not need to know N. Each worker keeps serving its own endpoint (port + 1 + its index, see
:func:`spoe_agent.workers.worker_config`); at scrape time the supervisor reads them all in
parallel and re-exposes every sample with a ``worker`` label, so ``sum without (worker)`` gives
the agent's totals and a worker that restarts shows as its own counter reset. A worker that does
not answer is left out of that scrape and reported by ``spoe_agent_worker_up 0``.

Parsing and exposition are ``prometheus_client``'s; the counters are the workers' own.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import gevent
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from spoe_agent.metrics import endpoint_server

log = logging.getLogger(__name__)

#: How long a scrape waits for a worker's own endpoint (Prometheus' default timeout is 10 s).
WORKER_TIMEOUT_S = 3.0


def _fetch(url: str) -> tuple[int, str]:
    """(HTTP status, body) of a worker endpoint; status 0 when it cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=WORKER_TIMEOUT_S) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, ValueError):
        return 0, ""


class WorkersCollector(Collector):
    """Every worker's samples with a ``worker`` label, plus the supervisor's view of them."""

    def __init__(self, worker_urls: Sequence[str], restarts: Any) -> None:
        self.worker_urls = list(worker_urls)
        self.restarts = restarts  # () -> restarts per worker index

    def collect(self) -> Iterator[Any]:
        jobs = [gevent.spawn(_fetch, f"{url}/metrics") for url in self.worker_urls]
        gevent.joinall(jobs)
        merged: dict[str, Any] = {}
        up = GaugeMetricFamily("spoe_agent_worker_up",
                               "1 if the worker's metrics endpoint answered this scrape",
                               labels=["worker"])
        for index, job in enumerate(jobs):
            status, text = job.value if job.successful() else (0, "")
            worker = str(index)
            up.add_metric([worker], 1 if status == 200 else 0)
            if status != 200:
                continue
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError:
                log.warning("worker %d served metrics that do not parse", index)
                continue
            for family in families:
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = family
                    samples = family.samples
                    family.samples = []
                else:
                    samples = family.samples
                target.samples.extend(
                    s._replace(labels={**s.labels, "worker": worker}) for s in samples
                )
        yield up
        restarts = CounterMetricFamily("spoe_agent_worker_restarts",
                                       "Times the supervisor restarted the worker",
                                       labels=["worker"])
        for index, count in enumerate(self.restarts()):
            restarts.add_metric([str(index)], count)
        yield restarts
        yield from merged.values()


class WorkersMetricsServer:
    """The aggregated endpoint, served by the supervisor on the configured metrics address."""

    def __init__(self, bind: str, worker_urls: Sequence[str], restarts: Any) -> None:
        self.worker_urls = list(worker_urls)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(worker_urls, restarts))
        self.wsgi = endpoint_server(bind, registry, self._health)

    def _health(self) -> tuple[bool, bytes]:
        """Healthy only when every worker serves: a replaced worker's connections are being
        reset meanwhile."""
        jobs = [gevent.spawn(_fetch, f"{url}/health") for url in self.worker_urls]
        gevent.joinall(jobs)
        statuses = [job.value[0] if job.successful() else 0 for job in jobs]
        healthy = all(status == 200 for status in statuses)
        lines = [b"ok\n" if healthy else b"not serving\n"]
        lines += [
            f"worker {i}: {'ok' if status == 200 else 'not serving'}\n".encode()
            for i, status in enumerate(statuses)
        ]
        return healthy, b"".join(lines)

    def start(self) -> None:
        self.wsgi.start()
        log.info("metrics of all workers on http://%s:%d/metrics", *self.wsgi.address[:2])

    def stop(self) -> None:
        self.wsgi.stop(timeout=1)


def worker_metrics_urls(bind: str, workers: int) -> list[str]:
    """Where worker i serves its own endpoint: the configured port + 1 + i, same host."""
    host, _, port = bind.rpartition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    return [f"http://{host}:{int(port) + 1 + i}" for i in range(workers)]
