"""The supervisor's ``/metrics`` and ``/health``: the agent's, on the one configured address.

Prometheus should scrape one target per agent, whatever ``--workers`` is, and a dashboard should
not need to know N: the supervisor's endpoint shows the agent as one process would, every
sample summed over the workers, as ``prometheus_client``'s multiprocess mode does for a
gunicorn app. At scrape time it reads each worker's own endpoint (port + 1 + its index, see
:func:`spoe_agent.workers.worker_config`; still there for the detail of one worker) in
parallel. Counters and histograms stay monotonic across a worker's restart or a missed scrape:
a worker that does not answer counts with what it last reported, and a restarted worker's last
report before it died is kept (what it counted after that last scrape is lost, as it is with a
single process that dies). ``spoe_agent_worker_up`` and ``spoe_agent_worker_restarts_total``
carry a ``worker`` label.

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
from prometheus_client.samples import Sample

from spoe_agent.metrics import endpoint_server, url_of

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


SampleKey = tuple[str, tuple[tuple[str, str], ...]]

# Sample types whose value only grows while a process lives: summed with what dead or silent
# workers last reported, so the agent's total never goes down. Gauges are summed as they are.
_MONOTONIC = ("counter", "histogram", "summary")
# Samples that describe one process rather than count for it: the agent's is the earliest or
# the smallest of its workers', not their sum.
_PER_PROCESS = ("process_start_time_seconds", "process_max_fds")


def _smallest(sample_name: str) -> bool:
    return sample_name.endswith("_created") or sample_name in _PER_PROCESS


class WorkersCollector(Collector):
    """The workers' samples summed into the agent's, plus the supervisor's view of them."""

    def __init__(self, worker_urls: Sequence[str], restarts: Any,
                 spans_lost: Any = lambda: 0) -> None:
        self.worker_urls = list(worker_urls)
        self.restarts = restarts  # () -> restarts per worker index
        self.spans_lost = spans_lost  # () -> spans dead workers held for export, in all
        # Per worker: its restarts when last seen, and its monotonic samples as last reported.
        self._seen_restarts = [0] * len(self.worker_urls)
        self._last: list[dict[SampleKey, float]] = [{} for _ in self.worker_urls]
        self._retired: dict[SampleKey, float] = {}  # what workers that died had reported
        self._family_of: dict[SampleKey, str] = {}

    def collect(self) -> Iterator[Any]:
        """One scrape of every worker, summed into the series one process would show.

        Counters must never go down for Prometheus' ``rate()``: a worker that does not answer
        counts with what it last reported, and a replaced worker's last counts are kept
        (``_retired``) before its successor starts again from zero. Series that describe one
        process rather than count for it (``_smallest``) take the smallest worker's value.
        """
        jobs = [gevent.spawn(_fetch, f"{url}/metrics") for url in self.worker_urls]
        gevent.joinall(jobs)
        restarts = list(self.restarts())
        families: dict[str, Any] = {}  # name -> a family of the first worker that had it
        totals: dict[SampleKey, float] = {}
        up = GaugeMetricFamily("spoe_agent_worker_up",
                               "1 if the worker's metrics endpoint answered this scrape",
                               labels=["worker"])
        for index, job in enumerate(jobs):
            if index < len(restarts) and restarts[index] != self._seen_restarts[index]:
                # A new process since the last scrape: keep what the old one had counted.
                self._seen_restarts[index] = restarts[index]
                for key, value in self._last[index].items():
                    self._retired[key] = self._retired.get(key, 0.0) + value
                self._last[index] = {}
            status, text = job.value if job.successful() else (0, "")
            parsed = None
            if status == 200:
                try:
                    parsed = list(text_string_to_metric_families(text))
                except ValueError:
                    log.warning("worker %d served metrics that do not parse", index)
            up.add_metric([str(index)], 1 if parsed is not None else 0)
            if parsed is None:
                # Silent this time: its counters count with what it last reported.
                for key, value in self._last[index].items():
                    totals[key] = totals.get(key, 0.0) + value
                continue
            last: dict[SampleKey, float] = {}
            for family in parsed:
                families.setdefault(family.name, family)
                monotonic = family.type in _MONOTONIC
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    self._family_of[key] = family.name
                    if _smallest(sample.name):
                        known = totals.get(key)
                        totals[key] = sample.value if known is None else min(known, sample.value)
                        continue
                    totals[key] = totals.get(key, 0.0) + sample.value
                    if monotonic:
                        last[key] = sample.value
            self._last[index] = last
        for key, value in self._retired.items():
            totals[key] = totals.get(key, 0.0) + value
        if "spoe_agent_spans_dropped" in families:  # only where spans are exported at all
            key = ("spoe_agent_spans_dropped_total", (("reason", "worker_died"),))
            self._family_of[key] = "spoe_agent_spans_dropped"
            totals[key] = float(self.spans_lost())
        yield up
        restarted = CounterMetricFamily("spoe_agent_worker_restarts",
                                        "Times the supervisor restarted the worker",
                                        labels=["worker"])
        for index, count in enumerate(restarts):
            restarted.add_metric([str(index)], count)
        yield restarted
        by_family: dict[str, list[Sample]] = {name: [] for name in families}
        for key, value in totals.items():
            samples = by_family.get(self._family_of.get(key, ""))
            if samples is not None:
                samples.append(Sample(key[0], dict(key[1]), value))
        for name, family in families.items():
            family.samples = by_family[name]
            yield family


class WorkersMetricsServer:
    """The aggregated endpoint, served by the supervisor on the configured metrics address."""

    def __init__(self, bind: str, worker_urls: Sequence[str], restarts: Any,
                 spans_lost: Any = lambda: 0) -> None:
        self.worker_urls = list(worker_urls)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(worker_urls, restarts, spans_lost))
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
        log.info("metrics of all workers on %s/metrics", url_of(*self.wsgi.address[:2]))

    def stop(self) -> None:
        self.wsgi.stop(timeout=1)


def worker_metrics_urls(bind: str, workers: int) -> list[str]:
    """Where worker i serves its own endpoint: the configured port + 1 + i, same host."""
    host, _, port = bind.rpartition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    return [url_of(host, int(port) + 1 + i) for i in range(workers)]

