"""The OpenTelemetry side of the agent: sampler, exporter and resources, from the configuration.

Each piece is the SDK's own (samplers, ``Resource.create`` with ``OTEL_RESOURCE_ATTRIBUTES``, the
console and OTLP exporters) except the Jaeger exporter, which is ours only because the official
one costs ~85 µs per span on the request host and is frozen at 1.21.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from spoe_agent.config import SAMPLERS, AgentConfig

log = logging.getLogger(__name__)


def build_sampler(name: str, arg: str = "") -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER``/``_ARG`` name (the SDK's vocabulary)."""
    # The argument is the ratio's alone: the other samplers ignore it, as the SDKs do.
    ratio = float(arg) if arg and name.endswith("traceidratio") else 1.0
    samplers: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(ratio)),
    }
    try:
        return samplers[name]()
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}") from None


def build_exporter(config: AgentConfig) -> SpanExporter | None:
    """``jaeger`` (UDP agent, or HTTP collector when an endpoint is set), ``otlp``, ``console``."""
    kind = config.exporter
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "otlp":
        try:
            from spoe_agent.tracing.otlp import SlicedOTLPSpanExporter
        except ImportError:
            raise ValueError(
                "exporter 'otlp' needs the optional extra: pip install 'spoe-agent[otlp]'"
            ) from None
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.util.re import parse_env_headers

        # Every setting is given, none left for the exporter to read from the environment:
        # spoe_agent.config has read and checked its variables (empty ones unset, as the
        # specification says, where the exporter takes an empty certificate as "do not verify").
        with _without_otlp_variables():
            return SlicedOTLPSpanExporter(
                endpoint=config.otlp_endpoint or "http://localhost:4318/v1/traces",
                certificate_file=config.otlp_certificate or True,  # type: ignore[arg-type]
                client_certificate_file=config.otlp_client_certificate or None,
                client_key_file=config.otlp_client_key or None,
                headers=dict(parse_env_headers(config.otlp_headers, liberal=True)),
                timeout=min(config.otlp_timeout, config.export_timeout),
                compression=Compression(config.otlp_compression),
            )
    from spoe_agent.tracing.jaeger import codec
    from spoe_agent.tracing.jaeger.exporter import FastJaegerExporter

    if not codec.ACCELERATED:
        log.warning("thrift's C extension (thrift.protocol.fastbinary) is not installed: Jaeger "
                    "spans are encoded by its pure-Python protocols, the same bytes at ~8 times "
                    "the CPU (~25 us more per span); to get it, reinstall thrift where a C++ "
                    "compiler is available: pip install --force-reinstall --no-binary thrift "
                    "thrift")
    return FastJaegerExporter(
        agent_host_name=config.jaeger_agent_host,
        agent_port=config.jaeger_agent_port,
        collector_endpoint=config.jaeger_endpoint or None,
        username=config.jaeger_user or None,
        password=config.jaeger_password or None,
        max_tag_value_length=config.max_attribute_length,
        timeout=min(config.jaeger_timeout, config.export_timeout),
        certificate=config.jaeger_certificate or None,
        udp_split_oversized_batches=True,
    )


@contextlib.contextmanager
def _without_otlp_variables() -> Iterator[None]:
    """The OTLP exporter falls back to the environment for any argument given empty (a client
    key, the headers): spoe_agent.config has read and checked those variables, so the exporter is
    built with them out of its sight, and they are put back after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("OTEL_EXPORTER_OTLP_")}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


class Resources:
    """One ``Resource`` per service name: ``Resource.create({"service.name": name})``.

    The detection (``Resource.create``: the environment, ``OTEL_RESOURCE_ATTRIBUTES``, the
    detectors' entry points, run in a thread pool) happens once, here, before the agent serves:
    in the registry the first span of each new ``service=`` would otherwise wait for that pool,
    and under gevent a wait yields, in the middle of applying an event whose ACK HAProxy may
    already have (the stream's next event then overtook it, and the first traces of a fresh
    agent came out broken). Per service, the detected resource is merged with the name, which
    gives the same attributes without detecting again.
    """

    def __init__(self, limit: int = 1024) -> None:
        self._cache: dict[str, Resource] = {}
        self._limit = limit
        self._detected = Resource.create()

    def __call__(self, service: str) -> Resource:
        resource = self._cache.get(service)
        if resource is None:
            if len(self._cache) >= self._limit:
                # service= comes from HAProxy: bound what a misconfiguration can allocate.
                self._cache.clear()
            resource = self._cache[service] = self._detected.merge(
                Resource({"service.name": service})
            )
        return resource
