"""Every setting, declared once (:data:`OPTIONS`: its INI section and key, its standard
OpenTelemetry variable, its parser), and :class:`AgentConfig`, the values in effect with the
checks that span several of them.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from spoe_agent.config.values import (
    DEFAULT_JAEGER_COLLECTOR,
    EXPORTERS,
    JAEGER_PROTOCOLS,
    OTLP_DEFAULT_ENDPOINT,
    OTLP_PROTOCOLS,
    SAMPLERS,
    SMALL_FRAME_SIZE,
    ConfigError,
    _choice,
    _connection_timeout,
    _default_workers,
    _file_seconds,
    _group,
    _host,
    _http_url,
    _int_range,
    _level,
    _ms_duration,
    _name,
    _otlp_endpoint,
    _otlp_headers,
    _positive,
    _propagators,
    _readable_file,
    _sdk_seconds,
    _text,
    jaeger_collector_hint,
    parse_bind,
    parse_busy_poll,
    parse_duration,
    parse_metrics_bind,
    parse_size,
    parse_unix_mode,
    parse_workers,
    shown_url,
)
from spoe_agent.protocol.connection import MIN_FRAME_SIZE

# ------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    attr: str
    section: str
    key: str
    parse: Callable[[str], Any]
    env: str | None = None
    env_parse: Callable[[str], Any] | None = None
    help: str = ""
    #: OpenTelemetry's general variable for the same setting (``OTEL_EXPORTER_OTLP_PROTOCOL``
    #: for ``..._TRACES_PROTOCOL``): used when the specific one is not set, as the SDKs do.
    env_fallback: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option("bind", "listener", "bind", parse_bind, help="HOST:PORT or unix:/path to listen on"),
    Option("unix_mode", "listener", "unix_mode", parse_unix_mode,
           help="permissions of a unix: socket, octal (660)"),
    Option("unix_group", "listener", "unix_group", _group, help="group of a unix: socket"),
    Option("workers", "listener", "workers", parse_workers,
           help="worker processes: a number, or auto (the default: one per usable core)"),
    Option("max_frame_size", "listener", "max_frame_size", _int_range(MIN_FRAME_SIZE, 16 << 20)),
    Option("max_connections", "listener", "max_connections", _int_range(1, 1_000_000)),
    Option("max_in_flight", "listener", "max_in_flight", _int_range(1, 100_000)),
    Option("idle_timeout", "listener", "idle_timeout", _connection_timeout),
    Option("read_timeout", "listener", "read_timeout", _connection_timeout),
    Option("busy_poll", "listener", "busy_poll", parse_busy_poll,
           help="poll instead of sleeping, forever (true) or for a window after each read "
                "(1ms): lower latency on VMs, for CPU"),
    Option("tls_cert", "listener", "tls_cert", _text),
    Option("tls_key", "listener", "tls_key", _text),
    Option("tls_ca", "listener", "tls_ca", _text),
    Option("log_level", "logging", "level", _level),
    Option("log_format", "logging", "format", _choice("text", "json")),
    Option("metrics", "metrics", "bind", parse_metrics_bind),
    Option("exporter", "tracing", "exporter", _choice(*EXPORTERS), env="OTEL_TRACES_EXPORTER"),
    Option("service_name", "tracing", "service_name", _name, env="OTEL_SERVICE_NAME"),
    Option("jaeger_agent_host", "tracing", "jaeger_agent_host", _host,
           env="OTEL_EXPORTER_JAEGER_AGENT_HOST"),
    Option("jaeger_agent_port", "tracing", "jaeger_agent_port", _int_range(1, 65535),
           env="OTEL_EXPORTER_JAEGER_AGENT_PORT"),
    Option("jaeger_endpoint", "tracing", "jaeger_endpoint", _http_url,
           env="OTEL_EXPORTER_JAEGER_ENDPOINT"),
    Option("jaeger_protocol", "tracing", "jaeger_protocol", _choice(*JAEGER_PROTOCOLS),
           env="OTEL_EXPORTER_JAEGER_PROTOCOL"),
    Option("jaeger_user", "tracing", "jaeger_user", _text, env="OTEL_EXPORTER_JAEGER_USER"),
    Option("jaeger_password", "tracing", "jaeger_password", _text,
           env="OTEL_EXPORTER_JAEGER_PASSWORD"),
    Option("jaeger_timeout", "tracing", "jaeger_timeout", _sdk_seconds,
           env="OTEL_EXPORTER_JAEGER_TIMEOUT"),
    Option("jaeger_certificate", "tracing", "jaeger_certificate", _readable_file,
           env="OTEL_EXPORTER_JAEGER_CERTIFICATE"),
    Option("otlp_endpoint", "tracing", "otlp_endpoint", _otlp_endpoint,
           env="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", env_parse=_http_url),
    Option("otlp_protocol", "tracing", "otlp_protocol", _choice(*OTLP_PROTOCOLS),
           env="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env_fallback="OTEL_EXPORTER_OTLP_PROTOCOL"),
    Option("otlp_headers", "tracing", "otlp_headers", _otlp_headers,
           env="OTEL_EXPORTER_OTLP_TRACES_HEADERS", env_fallback="OTEL_EXPORTER_OTLP_HEADERS"),
    Option("otlp_timeout", "tracing", "otlp_timeout", _sdk_seconds,
           env="OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", env_fallback="OTEL_EXPORTER_OTLP_TIMEOUT"),
    Option("otlp_compression", "tracing", "otlp_compression", _choice("none", "gzip", "deflate"),
           env="OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
           env_fallback="OTEL_EXPORTER_OTLP_COMPRESSION"),
    Option("otlp_certificate", "tracing", "otlp_certificate", _readable_file,
           env="OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
           env_fallback="OTEL_EXPORTER_OTLP_CERTIFICATE"),
    Option("otlp_client_certificate", "tracing", "otlp_client_certificate", _readable_file,
           env="OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
           env_fallback="OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
    Option("otlp_client_key", "tracing", "otlp_client_key", _readable_file,
           env="OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", env_fallback="OTEL_EXPORTER_OTLP_CLIENT_KEY"),
    Option("propagators", "tracing", "propagators", _propagators, env="OTEL_PROPAGATORS"),
    Option("sampler", "tracing", "sampler", _choice(*SAMPLERS), env="OTEL_TRACES_SAMPLER"),
    Option("sampler_arg", "tracing", "sampler_arg", _text, env="OTEL_TRACES_SAMPLER_ARG"),
    Option("session_ttl", "tracing", "session_ttl", _positive(parse_duration)),
    Option("max_sessions", "tracing", "max_sessions", _int_range(1, 100_000_000)),
    Option("max_spans_per_session", "tracing", "max_spans_per_session", _int_range(1, 10_000)),
    Option("max_open_bytes", "tracing", "max_open_bytes", parse_size),
    Option("max_attribute_length", "tracing", "max_attribute_length", _int_range(1),
           env="OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
           env_fallback="OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"),
    Option("export_queue_size", "tracing", "export_queue_size", _int_range(1, 100_000_000),
           env="OTEL_BSP_MAX_QUEUE_SIZE"),
    Option("export_batch_size", "tracing", "export_batch_size", _int_range(1, 100_000_000),
           env="OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
    Option("export_delay", "tracing", "export_delay",
           _file_seconds(60, "OTEL_BSP_SCHEDULE_DELAY"),
           env="OTEL_BSP_SCHEDULE_DELAY", env_parse=_positive(_ms_duration)),
    Option("export_timeout", "tracing", "export_timeout",
           _file_seconds(600, "OTEL_BSP_EXPORT_TIMEOUT"),
           env="OTEL_BSP_EXPORT_TIMEOUT", env_parse=_positive(_ms_duration)),
)
#: Where ``exporter`` came from when OTEL_SDK_DISABLED=true turned it off.
_SDK_DISABLED = "environment variable OTEL_SDK_DISABLED"
_BY_KEY = {(o.section, o.key): o for o in OPTIONS}
_SECTIONS = sorted({o.section for o in OPTIONS})


@dataclass
class AgentConfig:
    """The effective configuration; ``sources`` says where each non-default value came from."""

    # Loopback unless told otherwise: the agent trusts what it is sent (and TLS is opt-in).
    bind: str = "127.0.0.1:12345"
    # A unix socket's permissions and group; unset, the umask's (often 0755, which an HAProxy
    # running as another user cannot connect to: connecting takes write permission).
    unix_mode: int | None = None
    unix_group: str = ""
    # One per core this process may use (docs/scaling.md): --workers 1 is the single process.
    workers: int = field(default_factory=_default_workers)
    max_frame_size: int = 65532
    # Beyond it new connections wait in the listen backlog (server._ConnectionPool says why).
    max_connections: int = 1000
    # Concurrent handlers per connection; HAProxy itself keeps <= 20 frames waiting by default.
    max_in_flight: int = 64
    # Longer than HAProxy's recommended "timeout idle" (2m, 2.6) and "timeout server" (3m, 3.x)
    # so that HAProxy, not the agent, closes ordinary idle connections; this only reaps what
    # HAProxy forgot (a dead peer, a half-open TCP connection, a client that says nothing).
    idle_timeout: float = 600.0
    # The HELLO must complete within it of the accept, and a started frame within it of its
    # first byte: generous for a loopback or LAN peer, short enough to free a slowloris's slot.
    read_timeout: float = 30.0
    # HAProxy's "busy-polling" for the agent: the event loop polls with a null timeout instead of
    # sleeping, so each NOTIFY does not pay a CPU (on VMs a vCPU) wake-up. Seconds after the last
    # read of a connection: inf never sleeps (a whole core, even idle); a window of about one
    # request's events (1ms) spares the wake-ups within a request and sleeps when idle; 0: off.
    busy_poll: float = 0.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    metrics: str = ""
    exporter: str = "jaeger"
    service_name: str = "haproxy"
    jaeger_agent_host: str = "localhost"
    jaeger_agent_port: int = 6831
    jaeger_endpoint: str = ""
    # OTEL_EXPORTER_JAEGER_PROTOCOL. Unset, the endpoint decides (a collector when one is
    # given, else the agent): the specification's default, http/thrift.binary, would break
    # every deployment that relies on the UDP agent, the exporter's own default.
    jaeger_protocol: str = ""
    jaeger_user: str = ""
    jaeger_password: str = ""
    # A collector post's bound, as OTEL_EXPORTER_JAEGER_TIMEOUT is the official exporter's
    # (seconds, 10 by default there too); export_timeout still bounds the whole export.
    jaeger_timeout: float = 10.0
    jaeger_certificate: str = ""  # CA bundle for an https:// collector (else the system's)
    otlp_endpoint: str = ""
    otlp_protocol: str = "http/protobuf"
    # The OTLP exporter's own settings, read and checked here rather than by the SDK, which
    # takes an empty OTEL_EXPORTER_OTLP_CERTIFICATE as "do not verify" and drops bad headers.
    otlp_headers: str = ""
    otlp_timeout: float = 10.0  # the SDK's default; export_timeout still bounds the export
    otlp_compression: str = "none"
    otlp_certificate: str = ""
    otlp_client_certificate: str = ""
    otlp_client_key: str = ""
    propagators: tuple[str, ...] = ("tracecontext", "baggage")
    sampler: str = "parentbased_always_on"
    sampler_arg: str = ""
    session_ttl: float = 30.0
    max_sessions: int = 100_000
    max_spans_per_session: int = 64
    max_open_bytes: int = 256 << 20  # per worker: names and values the open sessions hold
    max_attribute_length: int = 4096
    export_queue_size: int = 20480
    export_batch_size: int = 512
    export_delay: float = 0.5
    export_timeout: float = 30.0
    config_file: str = ""
    #: The file's bytes as read: ``--workers`` hands these, not the path, to every worker it
    #: starts, so a worker restarted after the file was edited (or moved) runs the same
    #: configuration as the others.
    config_bytes: bytes = field(default=b"", repr=False)
    sources: dict[str, str] = field(default_factory=dict)
    #: Bad ``OTEL_EXPORTER_JAEGER_*``/``OTEL_EXPORTER_OTLP_*`` values, by attribute, raised by
    #: :meth:`validate` only if the exporter they configure is the one chosen (see load_env).
    unused_errors: dict[str, ConfigError] = field(default_factory=dict, repr=False)

    def set_by(self, attr: str) -> str:
        """Where ``attr``'s value came from, for an error that only shows once it is used
        (a bind address this machine does not have): ``agent.ini:2``, ``command line``..."""
        return self.sources.get(attr, "the default")

    @property
    def sdk_disabled(self) -> bool:
        """Whether OTEL_SDK_DISABLED=true turned export off (a ``--exporter`` flag wins over it).

        Not the same as ``exporter = none``, which still makes spans whose ids HAProxy hands
        on, as an SDK without an exporter does: a disabled SDK hands on what came in."""
        return self.sources.get("exporter") == _SDK_DISABLED

    def exporter_text(self) -> str:
        """The exporter and where it sends, as ``--check`` and the start-up log name them: an
        operator must be able to tell that an endpoint variable was picked up, and see why the
        exporter is ``none`` when OTEL_SDK_DISABLED turned it off. Never a credential: no user
        info, no header."""
        if self.sdk_disabled:
            return f"{self.exporter} (OTEL_SDK_DISABLED=true)"
        if self.exporter == "jaeger":
            if self.jaeger_endpoint:
                return f"jaeger to collector {shown_url(self.jaeger_endpoint)}"
            host = self.jaeger_agent_host
            host = f"[{host}]" if ":" in host else host
            return f"jaeger to agent {host}:{self.jaeger_agent_port} (UDP)"
        if self.exporter == "otlp":
            return f"otlp to {shown_url(self.otlp_endpoint or OTLP_DEFAULT_ENDPOINT)}"
        return self.exporter

    def endpoint_warning(self) -> str | None:
        """What is likely wrong with the chosen exporter's endpoint though it is valid, for the
        start-up log and ``--check``: a Jaeger collector URL without a path."""
        if self.exporter != "jaeger" or not self.jaeger_endpoint:
            return None
        if urlsplit(self.jaeger_endpoint).path not in ("", "/"):
            return None
        where = self.set_by("jaeger_endpoint")
        return (f"jaeger_endpoint {shown_url(self.jaeger_endpoint)} ({where}) has no path: "
                f"{jaeger_collector_hint(self.jaeger_endpoint)}")

    def frame_size_warning(self) -> str | None:
        """For ``--check``: a max_frame_size that will cost spans, which otherwise shows only
        at HAProxy's first HELLO (server.py warns of it there, whichever side set it)."""
        if self.max_frame_size >= SMALL_FRAME_SIZE:
            return None
        return (f"max_frame_size {self.max_frame_size} ({self.set_by('max_frame_size')}) is "
                f"below {SMALL_FRAME_SIZE}: HAProxy drops every SPOE message larger than the "
                "negotiated frame, logging nothing, so it would never reach the agent (with the "
                "tracing agent, its spans would be missing: the reference spoe.cfg's messages "
                "reach ~750 bytes for an ordinary request): leave it at its default "
                f"({AgentConfig.max_frame_size})")

    def validate(self) -> None:
        """Cross-option checks that no single value can make."""
        for attr, error in self.unused_errors.items():
            if attr.startswith(self.exporter + "_"):
                raise error
        if bool(self.tls_cert) != bool(self.tls_key):
            attr = "tls_cert" if self.tls_cert else "tls_key"  # where the one given was set
            raise ConfigError(self.sources.get(attr, "tls"),
                              "tls_cert and tls_key must be set together")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError(self.sources.get("tls_ca", "tls"),
                              "tls_ca (client certificate verification) needs tls_cert and tls_key")
        if self.exporter == "jaeger" and self.jaeger_protocol:
            self._apply_jaeger_protocol()
        if self.exporter == "jaeger" and bool(self.jaeger_user) != bool(self.jaeger_password):
            # The official exporter then sends no Authorization at all: a collector answering
            # 401 to every batch, with nothing at start-up to say why.
            attr = "jaeger_user" if self.jaeger_user else "jaeger_password"
            raise ConfigError(self.sources.get(attr, attr),
                              "jaeger_user and jaeger_password must be set together")
        if self.exporter == "otlp" and self.otlp_client_key and not self.otlp_client_certificate:
            raise ConfigError(self.sources.get("otlp_client_key", "otlp_client_key"),
                              "an OTLP client key needs its client certificate")
        self._check_certificates()
        if self.export_batch_size > self.export_queue_size:
            if "export_batch_size" in self.sources:
                raise ConfigError(self.sources["export_batch_size"],
                                  f"export_batch_size ({self.export_batch_size}) cannot exceed "
                                  f"export_queue_size ({self.export_queue_size})")
            self.export_batch_size = self.export_queue_size  # only the queue was set: fit it
        if self.metrics:
            host, _, port = self.metrics.rpartition(":")
            # With N workers the metrics take PORT..PORT+N (the supervisor's, then each
            # worker's): all of them must be ports, none the SPOP listener's.
            last = int(port) + (self.workers if self.workers > 1 else 0)
            where = self.sources.get("metrics", "metrics")
            if last > 65535:
                raise ConfigError(where, f"with {self.workers} workers the metrics use ports "
                                  f"{port}-{last}: past 65535, choose a lower port")
            if not self.bind.startswith("unix:"):
                spop_host, _, spop_port = self.bind.rpartition(":")
                # "::" takes IPv4 too, as Linux binds it by default (IPV6_V6ONLY off).
                hosts = {spop_host.strip("[]"), host.strip("[]")}
                if int(port) <= int(spop_port) <= last and (
                        len(hosts) == 1 or hosts & {"0.0.0.0", "::"}):
                    span = f"ports {port}-{last}" if last > int(port) else f"port {port}"
                    raise ConfigError(where, f"the metrics ({span}) would take the SPOP "
                                      f"listener's port {spop_port}")
        if self.exporter == "otlp" and self.otlp_protocol != "http/protobuf":
            # Refused rather than ignored: an HTTP exporter pointed at a gRPC port (4317) fails
            # every export with nothing at start-up to say why.
            where = self.sources.get("otlp_protocol", "otlp_protocol")
            raise ConfigError(where, f"{_ini_key(where, 'otlp_protocol')}OTLP over "
                              f"{self.otlp_protocol} is not supported: spoe-agent exports OTLP "
                              "over HTTP (http/protobuf, a collector's port 4318)")
        if self.sampler.endswith("traceidratio") and self.sampler_arg:
            try:
                ratio = float(self.sampler_arg)
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 1.0:
                where = self.sources.get("sampler_arg", "sampler_arg")
                raise ConfigError(where, f"{_ini_key(where, 'sampler_arg')}expected a ratio "
                                  "between 0 and 1 for the "
                                  f"{self.sampler} sampler, got {self.sampler_arg!r}")


    def _apply_jaeger_protocol(self) -> None:
        """Honour the protocol the specification names, or say why not: ignoring it sent spans
        over UDP to an agent that a user who asked for the collector does not run."""
        where = self.sources.get("jaeger_protocol", "jaeger_protocol")
        if self.jaeger_protocol == "http/thrift.binary":
            if not self.jaeger_endpoint:
                self.jaeger_endpoint = DEFAULT_JAEGER_COLLECTOR
                self.sources["jaeger_endpoint"] = f"{where} (the specification's default endpoint)"
        elif self.jaeger_protocol == "udp/thrift.compact":
            if self.jaeger_endpoint:
                raise ConfigError(where, f"{_ini_key(where, 'jaeger_protocol')}"
                                  "udp/thrift.compact sends to a Jaeger agent, but "
                                  f"jaeger_endpoint ({self.set_by('jaeger_endpoint')}) names a "
                                  "collector: unset one of them")
        else:
            raise ConfigError(where, f"{_ini_key(where, 'jaeger_protocol')}"
                              f"{self.jaeger_protocol} is not supported: use "
                              "udp/thrift.compact (a Jaeger agent's port 6831), "
                              "http/thrift.binary (a collector's port 14268), or exporter otlp "
                              "for Jaeger >= 1.35 (OTEL_TRACES_EXPORTER=otlp)")

    def _check_certificates(self) -> None:
        """Load the exporter's certificate files now: one that exists but does not load (not
        PEM, a key that does not match, an encrypted key) would fail every export instead."""
        checks: list[tuple[str, Callable[[ssl.SSLContext], object]]] = []
        if self.exporter == "jaeger" and self.jaeger_certificate:
            checks.append(("jaeger_certificate",
                           lambda c: c.load_verify_locations(cafile=self.jaeger_certificate)))
        if self.exporter == "otlp":
            if self.otlp_certificate:
                checks.append(("otlp_certificate",
                               lambda c: c.load_verify_locations(cafile=self.otlp_certificate)))
            if self.otlp_client_certificate:
                # An empty password: an encrypted key fails here rather than prompting for one.
                checks.append(("otlp_client_certificate", lambda c: c.load_cert_chain(
                    self.otlp_client_certificate, self.otlp_client_key or None, password="")))
        for attr, load in checks:
            try:
                load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
            except (ssl.SSLError, OSError) as exc:
                hint = ""
                if attr == "otlp_client_certificate" and not self.otlp_client_key:
                    # "[SSL] PEM lib" alone did not say what was missing (black-box run).
                    hint = (" (no otlp_client_key is set, OTEL_EXPORTER_OTLP_CLIENT_KEY: this "
                            "file must then hold the key too)")
                raise ConfigError(self.sources.get(attr, attr),
                                  f"{attr}: cannot load {getattr(self, attr)!r}: {exc}{hint}"
                                  ) from None


def _ini_key(where: str, attr: str) -> str:
    """``[tracing] attr: `` before a reason given by a line of agent.ini, as every other
    agent.ini error reads; a variable's own name already says which it is."""
    if where.startswith("environment variable") or where.startswith("--") or ":" not in where:
        return ""
    return f"[tracing] {attr}: "
