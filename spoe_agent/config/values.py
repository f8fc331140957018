"""What each setting's text may say: the value parsers, and the names and limits they check.

Each parser takes the text as written (agent.ini, an ``OTEL_*`` variable or a flag) and returns
the value or raises ``ValueError`` with the reason; :mod:`.loading` adds where it was written.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

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
        if not _valid_host(parts.hostname):
            # "127.0.0.1 x" or "exa_mple..com" passed, and then every export failed.
            raise ValueError(f"the host of {_redacted(text)!r} is not a host name or an IP "
                             "address")
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


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None
    return True


def _host(text: str) -> str:
    """A host name or an IP address (an IPv6 one with or without brackets): anything else,
    a typo such as ``jaeger!``, would only fail at each send, once the agent serves."""
    value = _name(text)
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if not _valid_host(value):
        raise ValueError(f"expected a host name or an IP address, got {text!r}")
    try:
        return str(ipaddress.ip_address(value))  # written as Python writes it
    except ValueError:
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
