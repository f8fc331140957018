"""Reading the sources in their order: agent.ini, then the ``OTEL_*`` environment, then the
command line's already-parsed flags; every refusal names the file and line, or the variable.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from spoe_agent.config.options import (
    _BY_KEY,
    _SDK_DISABLED,
    _SECTIONS,
    OPTIONS,
    AgentConfig,
)
from spoe_agent.config.values import (
    ConfigError,
    _has_control,
    _otlp_base,
    _percent_decoded,
    parse_workers,
)

_INLINE_COMMENT = re.compile(r"\s[#;]")


def _line_numbers(text: str) -> dict[tuple[str, str], int]:
    """Where each ``key = value`` stands, since configparser forgets line numbers."""
    lines: dict[tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(text.split("\n"), 1):
        # Without its inline comment, as configparser reads it: "[tracing] ; see [docs]" was
        # mapped as a section "tracing] ; see [docs", and its errors said "?" for the line.
        stripped = _INLINE_COMMENT.split(line, maxsplit=1)[0].strip()
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
        # Counted as the lines are split below: an old Mac file's bare CRs end lines too.
        before = raw_bytes[:exc.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        line = before.count(b"\n") + 1
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
