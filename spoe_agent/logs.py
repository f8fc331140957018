"""Logging setup: plain text or JSON lines, rate limits for noisy warnings, and log-safe text.

Under a protocol error storm, a slowloris or an exporter outage the same warning can fire
thousands of times a second. :class:`RateLimitFilter` lets the first record of each message
template through per interval and reports how many were suppressed, so logs stay readable and
cheap; :class:`Throttle` does the same for call sites that want to log a limit once per interval
whatever the level or the handler configuration.

Log messages carry values from HAProxy (a DISCONNECT message, a peer address); the text formatter
escapes control characters so such a value can never forge a log line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

# C0 but tab, DEL, C1 (NEL ends a line for str.splitlines(), CSI starts a terminal escape: code
# review) and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}"


def log_safe(text: str) -> str:
    """``text`` on one line: control characters and lone surrogates become escapes."""
    text = _CONTROL.sub(_escape, text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class TextFormatter(logging.Formatter):
    """The usual text format, the message kept to one safe line, and each line of a traceback
    indented and made safe: an exception's text is often a peer's value, and flush left it
    could pass for a record of its own (code review)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = log_safe(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 (logging's name)
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + log_safe(line) for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": log_safe(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# ``log.warning(..., extra=EVERY_TIME)``: a line that RateLimitFilter never holds back.
EVERY_TIME = {"rate_limit": False}


class RateLimitFilter(logging.Filter):
    """At most one record per (logger, message template) per ``interval`` seconds.

    INFO is limited too (a storm of per-connection INFO lines is as bad as one of warnings);
    DEBUG is not, since whoever turns it on wants every line. A record whose ``extra`` has a
    ``rate_key`` is limited per that key too: the failures of two handlers share a template,
    and one failing handler must not hide another's error. One whose ``extra`` has
    ``rate_limit=False`` always passes (:data:`EVERY_TIME`): a worker's death and restart,
    bounded by the supervisor's backoff, where each line is what an operator needs to see.
    """

    def __init__(self, interval: float = 10.0, min_level: int = logging.INFO) -> None:
        super().__init__()
        self.interval = interval
        self.min_level = min_level
        self._last: dict[tuple[str, str, object], float] = {}
        self._suppressed: dict[tuple[str, str, object], int] = {}
        self._levels: dict[tuple[str, str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or getattr(record, "rate_limit", True) is False:
            return True
        key = (record.name, str(record.msg), getattr(record, "rate_key", None))
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            self._levels[key] = record.levelno
            return False
        self._last[key] = now
        if len(self._last) > 10_000:  # bounded: forget old keys
            self._last.clear()
            self._suppressed.clear()
            self._levels.clear()
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar suppressed)"
        return True

    def flush(self) -> None:
        """Say what is still held back: at exit no later record of its kind will, and a storm's
        count (the lines a black-box run caused in its last ten seconds) was lost there."""
        held, self._suppressed = self._suppressed, {}
        levels, self._levels = self._levels, {}
        for key, count in sorted(held.items(), key=lambda item: (item[0][0], item[0][1])):
            name, template, _ = key
            logging.getLogger(name).log(
                levels.get(key, logging.WARNING),
                "%d more lines like this one held back since it was last logged: %s",
                count, template, extra=EVERY_TIME,
            )


def flush_held_lines() -> None:
    """:meth:`RateLimitFilter.flush` for the filters :func:`setup_logging` installed: the last
    call of a process that stops."""
    for handler in logging.getLogger().handlers:
        for fltr in handler.filters:
            if isinstance(fltr, RateLimitFilter):
                fltr.flush()


class Throttle:
    """Log one warning per key per ``interval``, saying how many occurrences it stands for.

    Limits and timeouts are hit in storms (a slowloris, HAProxy saturating the connection cap);
    each hit is counted in the metrics, and this keeps the log to one line per kind per interval
    whatever the handler configuration is.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, template: str, *args: object) -> bool:
        """Log ``template % args`` unless ``key`` was logged within the interval; True if logged.

        ``template`` must be a constant of ours: peer-supplied values go in ``args``.
        """
        return self.log(logging.WARNING, key, template, *args)

    def log(self, level: int, key: str, template: str, *args: object) -> bool:
        """:meth:`warning` at ``level``: a configured, expected event is counted the same way
        without reading as a problem."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        # Limited here already: RateLimitFilter, on a clock read a moment apart, could hold
        # back a line due at the interval's edge, and its count of the held lines with it
        # (code review: 87 of 281 lines, with both intervals at 10 ms).
        extra = {"rate_key": key, "rate_limit": False}
        if held:
            self.logger.log(level, template + " (and %d more like it since the last report)",
                            *args, held, extra=extra)
        else:
            self.logger.log(level, template, *args, extra=extra)
        return True

    def flush(self) -> None:
        """Say what is still held back: at a stop, no later line of its kind would (two closes
        a black-box run caused were never logged, even at SIGTERM)."""
        held, self._held = self._held, {}
        for key, count in sorted(held.items()):
            self.logger.warning("%d more %s events since the last line about them, held back",
                                count, key, extra=EVERY_TIME)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
