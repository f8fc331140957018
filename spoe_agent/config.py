"""Agent configuration: defaults < ``agent.ini`` < ``OTEL_*`` environment < command-line flags.

Every option is declared once in :data:`OPTIONS` with its INI section/key, its standard
OpenTelemetry environment variable where one exists, and a parser; a bad value is refused with
the file, line and reason (exit status 2 in the CLI) instead of surfacing later as a crash.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlsplit

from spoe_agent.protocol.connection import MIN_FRAME_SIZE

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)?\s*$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
EXPORTERS = ("jaeger", "otlp", "console", "none")
# What OTEL_EXPORTER_JAEGER_PROTOCOL may say; the first two are served (see validate).
JAEGER_PROTOCOLS = ("udp/thrift.compact", "http/thrift.binary", "udp/thrift.binary", "grpc")
DEFAULT_JAEGER_COLLECTOR = "http://localhost:14268/api/traces"
# Below this negotiated frame size HAProxy drops messages of ordinary requests: the reference
# spoe.cfg's on-frontend-http-request NOTIFY is ~490 bytes for a bare curl request and ~720 with a
# browser user-agent and a traceparent (benchmarks/spop_load.py's traced workload, re-encoded);
# a few hundred bytes of URL, tracestate or baggage add to it, and HAProxy 2.6 keeps 32 bytes of
# the frame for itself.
SMALL_FRAME_SIZE = 2048
#: The OTLP exporter's endpoint when none is set: the SDK's default, as pipeline.py passes it
#: (tests/tracing/test_destination_logs.py checks that the two agree).
OTLP_DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
# What OTEL_EXPORTER_OTLP_PROTOCOL may say; only the first is served (see validate).
OTLP_PROTOCOLS = ("http/protobuf", "grpc", "http/json")
SAMPLERS = (
    "always_on", "always_off", "traceidratio", "parentbased_always_on",
    "parentbased_always_off", "parentbased_traceidratio",
)
PROPAGATORS = ("tracecontext", "baggage", "b3", "b3multi", "jaeger", "none")


class ConfigError(Exception):
    """A refused setting; ``str()`` reads ``where: reason`` (``agent.ini:12: ...``)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


# ------------------------------------------------------------------------------- parsers


def parse_bind(text: str) -> str:
    """``HOST:PORT``, ``[v6]:PORT``, ``:PORT`` or ``unix:/path``; returned normalised."""
    text = text.strip()
    if text.startswith("unix:"):
        if len(text) <= 5:
            raise ValueError("unix: needs a socket path")
        if not text[5:].startswith("/"):
            # Resolved against the working directory, which is / under systemd: the socket
            # would not be where the configuration's author (or HAProxy's) looks for it.
            raise ValueError(f"unix: needs an absolute path, got {text!r}")
        return text
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://|(?:ipv4|ipv6|unix|abns|fd|sockpair)@", text):
        # tcp://host:port (a URL) or HAProxy's ipv4@host:port address prefixes: the rest
        # would be read as an IPv6 address, with a hint about brackets.
        raise ValueError(f"expected HOST:PORT or unix:/path, without a scheme or an address "
                         f"prefix, got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT or unix:/path, got {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"write an IPv6 address in brackets, as [::1]:PORT; got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    if not _DIGITS.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, got {port!r}")
    return f"{host}:{int(port)}"


def split_bind(bind: str) -> tuple[str, int] | str:
    """A TCP bind as ``(host, port)``, a unix one as its path."""
    if bind.startswith("unix:"):
        return bind[5:]
    host, _, port = bind.rpartition(":")
    return host, int(port)


def parse_unix_mode(text: str) -> int | None:
    """The unix socket's permissions, octal as chmod takes them (``660``, ``0660``, ``0o660``);
    empty leaves them to the umask."""
    text = str(text).strip()
    if not text:
        return None
    digits = text[2:] if text.lower().startswith("0o") else text
    if not re.fullmatch(r"[0-7]{1,4}", digits) or int(digits, 8) > 0o777:
        raise ValueError(f"expected octal permissions such as 660, got {text!r}")
    return int(digits, 8)


def _group(text: str) -> str:
    """A group name, looked up now: a typo must fail ``--check``, not the first start."""
    import grp

    name = str(text).strip()
    if name:
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ValueError(f"no group named {name!r} on this system") from None
    return name


def bind_text(bind: str) -> str:
    """``bind`` as ``--bind`` takes it, for messages: :func:`parse_bind` keeps an IPv6 host
    bare (``::1:7000``), which reads as an address without a port."""
    target = split_bind(bind)
    if isinstance(target, tuple) and ":" in target[0]:
        return f"[{target[0]}]:{target[1]}"
    return bind


def ignored_unix_options(bind: str, mode: int | None, group: str) -> str | None:
    """What to say when ``unix_mode``/``unix_group`` come with a TCP bind, which ignores them.
    Not refused: a file written for a unix: socket may be run with ``--bind HOST:PORT``."""
    if (mode is not None or group) and not bind.startswith("unix:"):
        return f"unix_mode and unix_group apply to a unix: bind only; ignored for {bind_text(bind)}"
    return None


def parse_duration(text: str) -> float:
    """Seconds; HAProxy-style units accepted (``500ms``, ``30s``, ``2m``); ``0`` means off."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"expected a duration such as 30s, 500ms or 2m, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _positive(parse: Callable[[str], float]) -> Callable[[str], float]:
    """``parse``, refusing 0: for durations where 0 would break the agent, not turn it off;
    and below a millisecond, HAProxy's and OpenTelemetry's finest unit, so surely a typo
    (``1us``) that would fail every export or end every session at once."""
    def parse_positive(text: str) -> float:
        value = parse(text)
        if value <= 0:
            raise ValueError(f"must be more than 0, got {text!r}")
        if value < 1e-3:
            raise ValueError(f"must be at least 1ms, got {text!r}")
        return value

    return parse_positive


def _connection_timeout(text: str) -> float:
    """read_timeout, idle_timeout: 0 is off; a value under 100 ms was a typo that passed
    --check, then closed every connection before HAProxy's HELLO could arrive."""
    value = parse_duration(text)
    if 0 < value < 0.1:
        raise ValueError(f"{str(text).strip()} is too short to wait for HAProxy: give at least "
                         "100ms (or 0 to turn it off)")
    return value


def _http_url(text: str) -> str:
    """An exporter endpoint: checked here, where its file line or variable is still known."""
    text = str(text).strip()
    if text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {_redacted(text)!r}")
        try:
            port = parts.port  # a port out of range or not a number: each export would fail
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"the port of {_redacted(text)!r} is not a number from 1 to "
                             "65535")
    return text


def _redacted(url: str) -> str:
    """``url`` with the password of its user info starred out, and its credential query
    values hidden as :func:`shown_url` hides them, for an error message."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    query = _shown_query(parts.query)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at and query == parts.query:
        return url
    if at:
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}:***" if colon else "***"  # a lone user part is often a token
        parts = parts._replace(netloc=f"{shown}@{host}")
    return parts._replace(query=query).geturl()


#: Words in a query parameter's name that say its value is a credential (``access_token``,
#: ``api_key``, ``X-Goog-Signature``, ``AWSAccessKeyId``, ``sig``...): :func:`shown_url` hides it.
_CREDENTIAL_NAMES = ("token", "key", "secret", "passw", "pwd", "auth", "sig", "credential")


def shown_url(url: str) -> str:
    """``url`` for a log line or ``--check``'s summary: without the user info it may carry, and
    with the values of query parameters named as credentials replaced by ``REDACTED``, as
    OpenTelemetry's ``url.full`` has them; the password or token would be in every log that
    quotes it. Other parameters (``format=jaeger.thrift``) stay: they help see what is used."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2],
                          query=_shown_query(parts.query)).geturl()


def _shown_query(query: str) -> str:
    return "&".join(_shown_parameter(item) for item in query.split("&"))


def _shown_parameter(item: str) -> str:
    name, equals, value = item.partition("=")
    plain = unquote(name.replace("+", " ")).lower()
    if equals and value and any(word in plain for word in _CREDENTIAL_NAMES):
        return f"{name}=REDACTED"
    return item


#: Where jaeger-collector takes Thrift batches over HTTP.
JAEGER_COLLECTOR_PATH = "/api/traces"


def jaeger_collector_hint(url: str) -> str:
    """Where the collector at ``url``'s host takes spans: the endpoint is used as written, as
    by the official exporter (a proxy may serve another path), so one without the path passes
    every check and then has each batch answered 404."""
    parts = urlsplit(shown_url(url))
    fixed = parts._replace(path=JAEGER_COLLECTOR_PATH, fragment="").geturl()
    return f"Jaeger's collector takes spans at {JAEGER_COLLECTOR_PATH} ({fixed})"


def _otlp_base(text: str) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT: a base URL, to which the traces path is appended (before a
    query string, which stays the collector's)."""
    parts = urlsplit(_http_url(text))
    return parts._replace(path=parts.path.rstrip("/") + "/v1/traces").geturl()


def _readable_file(text: str) -> str:
    """A certificate or key file: one that cannot be read would fail every export instead.
    Empty is unset (the system's CAs, no client certificate)."""
    path = _text(text)
    if not path:
        return ""
    _name(path)  # no control characters
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path!r}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path!r} (permission denied)")
    return path


# An HTTP token (RFC 7230): a header's name, a W3C baggage key (tracing.propagation).
HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# W3C baggage's value characters, which the SDK's parser accepts (percent-encode the rest).
_HEADER_VALUE = re.compile(r"[!#-+\--:<-\[\]-~ ]*")


def _has_control(text: str) -> bool:
    """A C0 control character or DEL: never right in a name, a header value or a log line."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _percent_decoded(value: str) -> str:
    """A W3C-baggage-style value, decoded strictly: ``unquote`` keeps a stray ``%`` and
    replaces bytes that are not UTF-8, so a mistyped value would otherwise travel altered."""
    if _BAD_ESCAPE.search(value):
        raise ValueError("a '%' not followed by two hex digits (write a literal % as %25)")
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("its percent-encoded bytes are not UTF-8") from None


def _otlp_headers(text: str) -> str:
    """OTEL_EXPORTER_OTLP_HEADERS: ``key=value`` pairs separated by commas, values
    percent-encoded. The SDK drops a malformed pair with a warning: an API key that never
    reaches the collector, so it is refused here."""
    text = str(text).strip()
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not HTTP_TOKEN.fullmatch(key.strip()):
            raise ValueError(f"expected name=value pairs separated by commas, got a pair "
                             f"named {key.strip()[:40]!r}")
        # What the SDK would drop (quotes, ";", a backslash) or requests refuse to send (a
        # control character, or one that is not Latin-1, once percent-decoded). The value is
        # not quoted back: it is often a secret.
        try:
            decoded = _percent_decoded(value.strip())
        except ValueError as exc:
            raise ValueError(f"the value of {key.strip()!r}: {exc}") from None
        if (not _HEADER_VALUE.fullmatch(value.strip())
                or _has_control(decoded) or any(ord(c) > 255 for c in decoded)):
            raise ValueError(f"the value of {key.strip()!r} is not a valid header value (no "
                             "quotes, ';' or '\\'; percent-decoded, printable Latin-1 only)")
    return text


def _seconds_at_most_bare(most: float, where: str, example: str) -> Callable[[str], float]:
    """A positive duration, seconds when bare; a bare number over ``most``, where milliseconds
    were surely meant, is refused rather than guessed: seconds ``where`` (the reason), give a
    unit (``example``, or the number in ms)."""
    def parse(text: str) -> float:
        return _refuse_bare_over(most, text, _positive(parse_duration)(text), where, example)

    return parse


def _refuse_bare_over(most: float, text: str, value: float, where: str, example: str) -> float:
    bare = str(text).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", bare) and value > most:
        raise ValueError(f"{bare} seconds? A bare number counts in seconds {where}: give a "
                         f"unit, such as {bare}ms or {example or bare + 's'}")
    return value


#: A timeout variable that OpenTelemetry's Python exporters read in seconds (the specification
#: says milliseconds): a unit says which; a bare number is seconds, as there.
_sdk_seconds = _seconds_at_most_bare(600, "here, as in OpenTelemetry's Python exporters", "10s")


def _otlp_endpoint(text: str) -> str:
    """agent.ini's ``otlp_endpoint``: one key standing for both OTLP endpoint variables, so a
    bare ``http://collector:4318`` is a base URL, as in OTEL_EXPORTER_OTLP_ENDPOINT (posting
    to ``/``, a collector would drop every batch); a URL with a path is used as given, as in
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT."""
    text = _http_url(text)
    parts = urlsplit(text)
    if text and parts.path in ("", "/"):
        return parts._replace(path="/v1/traces").geturl()
    return text


#: An integer as people write one: int() would also take "16_384" and other scripts' digits.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DIGITS = re.compile(r"[0-9]+")


def _int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not _INTEGER.fullmatch(str(text).strip()):
            raise ValueError(f"expected an integer, got {text!r}")
        value = int(str(text).strip())
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return parse


WORKERS_MAX = 256


def usable_cores() -> int:
    """How many CPUs this process may keep busy: what ``--workers auto`` (the default) starts.

    loky's count: the CPUs of this process's affinity (``taskset``, a cpuset), bounded by a
    cgroup CPU quota (a container's ``--cpus``, a Kubernetes CPU limit; rounded up) and by
    ``LOKY_MAX_CPU_COUNT`` if set. ``os.cpu_count()`` counts the host's CPUs instead, and a
    worker per host CPU in a 2-CPU container would only fight over those 2.
    """
    from loky import cpu_count

    try:
        return max(1, cpu_count(only_physical_cores=False))
    except ValueError as exc:  # loky reads LOKY_MAX_CPU_COUNT with int()
        raise ValueError(f"LOKY_MAX_CPU_COUNT (which bounds auto): {exc}") from None


def parse_workers(text: str) -> int:
    """``auto``: one worker per usable core (:func:`usable_cores`, at most 256); or a count."""
    if str(text).strip().lower() == "auto":
        return min(usable_cores(), WORKERS_MAX)
    try:
        return _int_range(1, WORKERS_MAX)(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (or auto: one per usable core)") from None


def _default_workers() -> int:
    try:
        return parse_workers("auto")
    except ValueError:
        return 1  # load_config reports it, if the default is what stays


def _bool(text: str) -> bool:
    """configparser's own words (``getboolean``), so agent.ini reads like any INI file."""
    try:
        return configparser.ConfigParser.BOOLEAN_STATES[str(text).strip().lower()]
    except KeyError:
        raise ValueError(f"expected true or false, got {text!r}") from None


def parse_busy_poll(text: str) -> float:
    """How long the event loop keeps polling after a read before it sleeps: ``true`` is
    forever (HAProxy's ``busy-polling``), ``false`` never, a duration (``1ms``) a window."""
    try:
        return math.inf if _bool(text) else 0.0
    except ValueError:
        pass
    try:
        value = parse_duration(text)
    except ValueError:
        raise ValueError(
            f"expected true, false or a duration such as 1ms or 500us, got {text!r}") from None
    # "1" is true, so "2" read as 2 s (or "1.0" as 1 s) of spinning after every read would be a
    # trap: a bare window past 0.1 s needs its unit, as the exporters' timeouts do past 600 s.
    return _refuse_bare_over(0.1, text, value, "(a busy-poll window)", "1ms")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def _propagators(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in str(text).split(",") if n.strip())
    for name in names:
        if name not in PROPAGATORS:
            raise ValueError(f"unknown propagator {name!r}; known: {', '.join(PROPAGATORS)}")
    if not names:
        raise ValueError("no propagator named (none turns propagation off)")
    if "none" in names and len(set(names)) > 1:
        raise ValueError("propagator 'none' cannot be combined with other propagators")
    return names


def parse_metrics_bind(text: str) -> str:
    """HOST:PORT, or empty (off): the metrics endpoint is HTTP over TCP only."""
    text = str(text).strip()
    if not text:
        return ""
    if text.startswith("unix:"):
        raise ValueError("the metrics endpoint listens on HOST:PORT, not on a unix socket")
    if ":" not in text:
        raise ValueError(f"expected HOST:PORT (or :PORT), got {text!r}")
    return parse_bind(text)


def _text(text: str) -> str:
    return str(text).strip()


def _name(text: str) -> str:
    """A value that cannot be empty (a service name, a host): empty would only fail later."""
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    if _has_control(value):
        raise ValueError(f"control characters are not allowed, got {value!r}")
    return value


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?")


def _host(text: str) -> str:
    """A host name or an IP address (an IPv6 one with or without brackets): anything else,
    a typo such as ``jaeger!``, would only fail at each send, once the agent serves."""
    value = _name(text)
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise ValueError(f"expected a host name or an IP address, got {text!r}")
    return value


def _level(text: str) -> str:
    return _choice("debug", "info", "warning", "error", "critical")(text).upper()


def _ms_duration(text: str) -> float:
    """OTEL_BSP_* durations are milliseconds when they carry no unit."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text) / 1000.0
    return parse_duration(text)


_SIZE = re.compile(r"\s*([0-9]+)\s*(|k|m|g)(?:i?b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes, with HAProxy's suffixes accepted (``256m``, ``1g``; ``MB`` and ``MiB`` alike,
    as powers of 1024)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"expected a size such as 256m, 1g or 1048576, got {text!r}")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 1 << 20:
        raise ValueError(f"must be at least 1m, got {text!r}")
    return value


def _file_seconds(most: float, variable: str) -> Callable[[str], float]:
    """An agent.ini duration whose variable counts in milliseconds: a bare number is seconds in
    the file (500 meaning 500 ms held exports back for 8 minutes)."""
    return _seconds_at_most_bare(most, f"in agent.ini ({variable} counts in milliseconds)", "")


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
                "negotiated frame, logging nothing, and the reference spoe.cfg's reach ~750 "
                "bytes for an ordinary request, so their spans would be missing: leave it at "
                f"its default ({AgentConfig.max_frame_size})")

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
            raise ConfigError(self.sources.get("otlp_protocol", "otlp_protocol"),
                              f"OTLP over {self.otlp_protocol} is not supported: spoe-agent "
                              "exports OTLP over HTTP (http/protobuf, a collector's port 4318)")
        if self.sampler.endswith("traceidratio") and self.sampler_arg:
            try:
                ratio = float(self.sampler_arg)
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 1.0:
                where = self.sources.get("sampler_arg", "sampler_arg")
                key = "" if where.startswith("environment variable") else "[tracing] sampler_arg: "
                raise ConfigError(where, f"{key}expected a ratio between 0 and 1 for the "
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
                raise ConfigError(where, "udp/thrift.compact sends to a Jaeger agent, but "
                                  f"jaeger_endpoint ({self.set_by('jaeger_endpoint')}) names a "
                                  "collector: unset one of them")
        else:
            raise ConfigError(where, f"{self.jaeger_protocol} is not supported: use "
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
                raise ConfigError(self.sources.get(attr, attr),
                                  f"{attr}: cannot load {getattr(self, attr)!r}: {exc}") from None


def _line_numbers(text: str) -> dict[tuple[str, str], int]:
    """Where each ``key = value`` stands, since configparser forgets line numbers."""
    lines: dict[tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue  # an indented line is a key too: continuation lines are refused
        if stripped.startswith("[") and "]" in stripped:
            # As configparser names it: everything up to the last "]", spaces kept.
            section = stripped[1:stripped.rindex("]")]
            lines.setdefault((section, ""), number)
            continue
        key = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
        lines.setdefault((section, key), number)
    return lines


def _syntax_error(path: str, lines: list[str], exc: configparser.Error) -> ConfigError:
    """configparser only quotes the bad line ("Source contains parsing errors"): say what is
    wrong with it."""
    line = getattr(exc, "lineno", None)
    if line is None and getattr(exc, "errors", None):
        line = exc.errors[0][0]  # ParsingError keeps (lineno, line) pairs
    where = f"{path}:{line}" if line else path
    text = lines[line - 1].strip() if line and line <= len(lines) else ""
    if isinstance(exc, configparser.DuplicateOptionError):
        reason = f"{exc.option!r} is set twice in [{exc.section}]"
    elif isinstance(exc, configparser.DuplicateSectionError):
        reason = f"section [{exc.section}] appears twice"
    elif text.startswith("[") and "]" not in text:
        reason = f"unclosed section header {text!r}: expected [section]"
    elif isinstance(exc, configparser.MissingSectionHeaderError):
        reason = f"{text!r} comes before any [section] header"
    elif isinstance(exc, configparser.ParsingError):
        reason = f"expected 'key = value', got {text!r}"
    else:
        reason = str(exc).splitlines()[0]
    return ConfigError(where, f"syntax error: {reason}")


_SECTION_LINE = re.compile(r"\[[^\[\]#;]+\](?:\s+[#;].*)?\s*")


def _check_headers(path: str, lines: list[str]) -> None:
    """configparser reads ``[tracing] sampler = x`` as the header ``[tracing]`` and drops the
    rest of the line, setting nothing and saying nothing: a header stands alone (a comment
    may follow it)."""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("[") and not _SECTION_LINE.fullmatch(stripped):
            where = f"{path}:{number}"
            if "]" not in stripped:
                raise ConfigError(where, f"syntax error: unclosed section header {stripped!r}: "
                                  "expected [section]")
            raise ConfigError(where, f"syntax error: expected a section header alone on its "
                              f"line, such as [tracing], got {stripped!r}")


def _continuation(lines: list[str], key_line: int) -> int:
    """The line that continued the value of the key at ``key_line``: the next one with text."""
    for number in range(key_line + 1, len(lines) + 1):
        stripped = lines[number - 1].strip()
        if stripped and stripped[0] not in "#;":
            return number
    return key_line


def load_ini(path: str, config: AgentConfig, raw: bytes | None = None) -> None:
    """Apply ``agent.ini``: unknown sections and keys are errors, so typos cannot hide.

    ``raw``: the file's bytes, already read (by the ``--workers`` supervisor); ``path`` then
    only names it in messages and sources.
    """
    if raw is None:
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise ConfigError(path, f"cannot read config file: {exc.strerror or exc}") from None
    raw_bytes = config.config_bytes = raw
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not a setting.
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw_bytes.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}", f"not UTF-8 text: {exc.reason}") from None
    # No DEFAULT section: configparser would copy its keys into every section, past the
    # check that refuses unknown keys; "[DEFAULT]" is then an unknown section like any other.
    # Lines end where configparser ends them, at "\n" only (str.splitlines also splits at
    # form feeds and U+2028, which shifted every later line number): old Mac files' bare CRs
    # become line ends first, or the whole file would be one line, silently ignored.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    _check_headers(path, lines)
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"),
                                       default_section="\0no default section")
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise _syntax_error(path, lines, exc) from None
    numbers = _line_numbers(text)
    config.config_file = path
    for section in parser.sections():
        if section not in _SECTIONS:
            where = f"{path}:{numbers.get((section, ''), '?')}"
            if section.strip() in _SECTIONS:
                raise ConfigError(where, f"[{section}] has spaces inside its brackets: "
                                  f"write [{section.strip()}]")
            raise ConfigError(where, f"unknown section [{section}]; known: "
                              + ", ".join(f"[{s}]" for s in _SECTIONS))
        for key, raw in parser.items(section, raw=True):
            where = f"{path}:{numbers.get((section, key), '?')}"
            if "\n" in raw:
                # configparser joins an indented line to the value above it: "bind = A" over
                # "  B" read as the bind "A\nB", refused with a reason about neither line.
                line = _continuation(lines, numbers.get((section, key), 0))
                raise ConfigError(f"{path}:{line}", f"syntax error: continuation lines are not "
                                  f"supported (this indented line would continue {key!r}); "
                                  "write each value on one line")
            option = _BY_KEY.get((section, key))
            if option is None:
                known = ", ".join(o.key for o in OPTIONS if o.section == section)
                raise ConfigError(where, f"unknown option {key!r} in [{section}]; known: {known}")
            try:
                setattr(config, option.attr, option.parse(raw))
            except ValueError as exc:
                raise ConfigError(where, f"[{section}] {key}: {exc}") from None
            config.sources[option.attr] = where


_SDK_DISABLED = "environment variable OTEL_SDK_DISABLED"


def load_env(env: Mapping[str, str], config: AgentConfig) -> None:
    """Apply the standard ``OTEL_*`` variables over agent.ini (command-line flags come later).

    An empty variable counts as unset, as the OpenTelemetry specification says; a bad value is
    refused with the variable's name, where the SDKs warn and fall back: a sampler or endpoint
    silently replaced by its default is a tracing outage nobody notices.

    Except the one exporter's variables while another exports: the environment is often shared
    (a pod's, a host's), and OTEL_EXPORTER_OTLP_TIMEOUT=10000, milliseconds for every other
    SDK, stopped a Jaeger-exporting agent that never reads it. Such errors wait in
    ``unused_errors`` for :meth:`AgentConfig.validate`, once the exporter is known.
    """
    for option in OPTIONS:
        for name in (option.env, option.env_fallback):
            if name is None:
                continue
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            parse = option.env_parse or option.parse
            try:
                setattr(config, option.attr, parse(raw))
            except ValueError as exc:
                error = ConfigError(f"environment variable {name}", str(exc))
                if not option.attr.startswith(("jaeger_", "otlp_")):
                    raise error from None
                config.unused_errors[option.attr] = error
            else:
                config.sources[option.attr] = f"environment variable {name}"
            break
    # OpenTelemetry's switch for the whole SDK. A disabled SDK still propagates what it
    # extracted: the agent hands on the incoming context unchanged (``sdk_disabled``) and
    # exports nothing; its spans are still made, for its metrics. The
    # specification reads any value but "true" as false; a value that is neither true nor false
    # is refused instead, as every other bad value is, since "1" or "yes" surely meant true.
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower()
    if disabled == "true":
        config.exporter = "none"
        config.sources["exporter"] = _SDK_DISABLED
    elif disabled not in ("", "false"):
        raise ConfigError("environment variable OTEL_SDK_DISABLED",
                          f"expected true or false, got {env['OTEL_SDK_DISABLED']!r}")
    # Not used (the span count limits are fixed), but the SDK reads this one when it is
    # imported and raises on anything but a non-negative integer: a typo stopped the agent
    # with the SDK's words, as "cannot start". Refused here the way every other variable is.
    limit = env.get("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "").strip()
    if limit:
        try:
            valid = int(limit) >= 0
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError("environment variable OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
                              f"expected a non-negative integer, got {limit!r} (the agent does "
                              "not use it, but the OpenTelemetry SDK refuses anything else)")
    # OpenTelemetry's order for service.name: OTEL_SERVICE_NAME, then OTEL_RESOURCE_ATTRIBUTES,
    # then the default; here agent.ini's service_name (set above) counts as the first.
    resource_name = _resource_service_name(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    if "service_name" not in config.sources and resource_name:
        config.service_name = resource_name
        config.sources["service_name"] = "environment variable OTEL_RESOURCE_ATTRIBUTES"
    # The OTLP exporter's generic endpoint variable, as a fallback for the traces-specific one
    # (which then wins), over agent.ini like every variable.
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base and not env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        try:
            config.otlp_endpoint = _otlp_base(base)
        except ValueError as exc:
            config.unused_errors["otlp_endpoint"] = ConfigError(
                "environment variable OTEL_EXPORTER_OTLP_ENDPOINT", str(exc))
        else:
            config.sources["otlp_endpoint"] = "environment variable OTEL_EXPORTER_OTLP_ENDPOINT"


def _resource_service_name(text: str) -> str | None:
    """Check ``OTEL_RESOURCE_ATTRIBUTES`` whole and return its ``service.name``, if any.

    The SDK drops a malformed member with a warning and keeps the rest, where the resource
    specification says to discard the whole value and report an error: refused here at start,
    as every other bad ``OTEL_*`` value is, so that a typo cannot lose an attribute unnoticed.
    Values are not echoed (they are the user's data).
    """
    where = "environment variable OTEL_RESOURCE_ATTRIBUTES"
    name = None
    if not text.strip():
        return None
    for number, item in enumerate(text.split(","), 1):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # An empty member (",," or a trailing comma) too: the SDK warns of it at start.
            raise ConfigError(where, f"member {number} is not key=value (expected "
                              "key1=value1,key2=value2, with ',' and '=' in values written %2C and %3D)")
        try:
            decoded = _percent_decoded(value).strip()
        except ValueError as exc:
            raise ConfigError(where, f"member {number}: {exc}") from None
        if key.strip() == "service.name" and decoded:
            if _has_control(decoded):
                raise ConfigError(where, "service.name: control characters are not allowed")
            name = decoded
    return name


def load_config(
    path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    ini_bytes: bytes | None = None,
) -> AgentConfig:
    """Build the effective configuration; ``overrides`` are already-parsed flag values;
    ``ini_bytes``, when given, are ``path``'s contents (see :func:`load_ini`)."""
    config = AgentConfig()
    if path:
        load_ini(path, config, ini_bytes)
    load_env(os.environ if env is None else env, config)
    names = {f.name for f in fields(AgentConfig)}
    for attr, value in (overrides or {}).items():
        if value is None:
            continue
        if attr not in names:
            raise ConfigError("command line", f"unknown option {attr}")
        setattr(config, attr, value)
        config.sources[attr] = "command line"
    if "workers" not in config.sources:
        try:
            config.workers = parse_workers("auto")
        except ValueError as exc:
            raise ConfigError("workers (auto, the default)", str(exc)) from None
    config.validate()
    return config
