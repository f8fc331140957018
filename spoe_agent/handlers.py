"""The application-facing API: which function answers which SPOE message.

Handlers are plain functions; the server runs them inline in the connection's greenlet (cheapest
for CPU-only work such as tracing) unless registered ``concurrent=True``, in which case pipelined
NOTIFYs run them in parallel greenlets, bounded per connection, so one slow lookup does not hold
up the frames behind it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from spoe_agent.protocol.types import Action, Message, Scope, UnsetVar

log = logging.getLogger(__name__)

Args = list[tuple[str, Any]]
Handler = Callable[[Args], "Iterable[Action] | None"]
Fallback = Callable[[Message], "Iterable[Action] | None"]
Work = Callable[[], "list[Action] | None"]
MetricSample = tuple[str, str, str, dict[str, str], float]


# Variable names HAProxy can read back and set in any scope, met so far (bounded: a handler
# may make names up).
_READABLE_NAMES: set[str] = set()
_READABLE_NAMES_LIMIT = 1024
# HAProxy builds "<scope>.<var-prefix>.<name>" in a 64-byte buffer (measured on 2.6.12 and
# 3.2.26: 63 bytes set, 64 silently not), with a prefix of 1 byte at least: 57 bytes of name
# for txn, req and res, 56 for sess and proc.
_LONGEST_IN = {int(scope): 63 - len(scope.name) - len("..p") for scope in Scope}
_LONGEST_ANYWHERE = min(_LONGEST_IN.values())
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._")


def _longest(scope: Any) -> int:
    try:
        return _LONGEST_IN.get(int(scope), _LONGEST_ANYWHERE)
    except (TypeError, ValueError):  # not a scope: the ACK's encoding says so
        return _LONGEST_ANYWHERE


def _check_names(actions: list[Action], start: int, message: str) -> int:
    """Drop the actions from ``start`` on whose variable HAProxy could never read or set.

    SPOE.txt allows 'a-z', 'A-Z', '0-9', '.' and '_' in a name, and HAProxy's ``var()``
    refuses any other at configuration time: ``my-score`` would be set and never seen, with
    no word anywhere. The handler's message is known here, so the log names it.
    """
    kept = actions[:start]
    for action in actions[start:]:
        name = getattr(action, "name", None)
        if name in _READABLE_NAMES or not isinstance(name, str):  # not an action: the ACK says
            kept.append(action)
            continue
        verb = "unset" if isinstance(action, UnsetVar) else "set"
        if len(name) > _longest(getattr(action, "scope", None)):
            log.error("handler for SPOE message %r would %s variable %r, which HAProxy cannot "
                      "set: its whole name, <scope>.<var-prefix>.<name>, must fit in 63 bytes "
                      "(2.6 and 3.x alike drop a longer one, saying nothing): the action is "
                      "dropped", message, verb, name,
                      extra={"rate_key": f"var name {message} {name}"})
        elif name and _NAME_CHARS.issuperset(name):
            if len(name) <= _LONGEST_ANYWHERE:  # longer ones are checked per scope each time
                if len(_READABLE_NAMES) >= _READABLE_NAMES_LIMIT:
                    _READABLE_NAMES.clear()
                _READABLE_NAMES.add(name)
            kept.append(action)
        else:
            log.error("handler for SPOE message %r would %s variable %r, which HAProxy cannot "
                      "read (a name is of 'a-z', 'A-Z', '0-9', '.' and '_' only): the action is "
                      "dropped", message, verb, name,
                      extra={"rate_key": f"var name {message} {name}"})
    dropped = len(actions) - len(kept)
    actions[start:] = kept[start:]
    return dropped


class Agent:
    """A registry of message handlers; a message nobody handles gets an empty ACK."""

    def __init__(self, name: str = "spoe-agent") -> None:
        self.name = name
        self._handlers: dict[str, Handler] = {}
        self._concurrent: set[str] = set()
        self._fallback: Fallback | None = None
        self.handler_errors = 0
        # Called, without arguments, when serving starts / after it stopped (tracing uses them
        # to start its exporter and to end open spans and flush on shutdown).
        self.on_startup: list[Callable[[], None]] = []
        self.on_shutdown: list[Callable[[], None]] = []
        # Called by the server once per read that brought NOTIFYs, before it handles any of
        # them (the workers' mesh drains its peers there: see PeerMesh.drains_per_read).
        self.before_notifies: list[Callable[[], None]] = []
        # Called once per such read after the NOTIFYs it handled inline, before their ACKs are
        # queued (the mesh writes the read's forwarded commands there, in one write per owner).
        self.after_notifies: list[Callable[[], None]] = []
        # Extra samples for /metrics, read at scrape time: (name, kind, help, labels, value)
        # with kind "counter" or "gauge", so the request path pays nothing for them.
        self.metric_sources: list[Callable[[], Iterable[MetricSample]]] = []

    def on_message(self, name: str, handler: Handler, *, concurrent: bool = False) -> None:
        """Handle SPOE message ``name`` with ``handler``; one handler per message: a second
        one for the same name is refused (it silently replaced the first: black-box run)."""
        if inspect.iscoroutinefunction(handler):
            # Accepted, it failed on every call ("'coroutine' object is not iterable").
            raise TypeError(f"the handler of SPOE message {name!r} is async: the agent runs on "
                            "gevent, so write a plain function (blocking calls yield to the "
                            "other connections: gevent patches them)")
        existing = self._handlers.get(name)
        if existing is not None and existing is not handler:
            raise ValueError(f"SPOE message {name!r} already has a handler, "
                             f"{getattr(existing, '__qualname__', existing)!r}")
        self._handlers[name] = handler
        if concurrent:
            self._concurrent.add(name)
        else:
            self._concurrent.discard(name)

    def message(self, name: str, *, concurrent: bool = False) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`on_message`."""

        def register(handler: Handler) -> Handler:
            self.on_message(name, handler, concurrent=concurrent)
            return handler

        return register

    def fallback(self, handler: Fallback) -> Fallback:
        """Receive every message without a named handler (the tracing agent uses this)."""
        self._fallback = handler
        return handler

    def empty_ack_check(self) -> Callable[[bytes], bool] | None:
        """What tells, from a NOTIFY's payload as sent, that its ACK will be empty whatever
        the messages do, so the server writes it before they are applied
        (``SpopConnection.empty_ack``); asked once per connection. None here: any handler's
        result may be an action."""
        return None

    def needs_greenlet(self, messages: list[Message]) -> bool:
        concurrent = self._concurrent
        return bool(concurrent) and any(m.name in concurrent for m in messages)

    def prepare(self, messages: list[Message]) -> tuple[Work | None, Work | None]:
        """Split one NOTIFY's work into what its ACK waits for and what can run after it.

        Returns ``(now, later)``: the server calls ``now`` (if any) for the ACK's actions, writes
        the ACK, then calls ``later``. HAProxy's stream moves on meanwhile (the tracing agent
        defers every message that injects nothing). Work kept for later runs, in order, before
        the next ``now`` and before the connection can yield. Here every handler's result may
        be an action, so all of it is ``now``.
        """
        return partial(self.dispatch, messages), None

    def dispatch(self, messages: list[Message]) -> list[Action]:
        """Run the handlers of one NOTIFY in order and collect their actions.

        A handler that raises costs its own actions only: HAProxy still gets its ACK, and the
        error is logged, because failing the whole NOTIFY would fail the user's request path.
        """
        actions: list[Action] = []
        handlers = self._handlers
        for message in messages:
            handler = handlers.get(message.name)
            start = len(actions)
            try:
                if handler is not None:
                    result = handler(message.args)
                elif self._fallback is not None:
                    result = self._fallback(message)
                else:
                    continue
                if result:
                    actions.extend(result)
                    for i in range(start, len(actions)):  # no copy: each --app message does it
                        if getattr(actions[i], "name", None) not in _READABLE_NAMES:
                            if _check_names(actions, start, message.name):
                                self.handler_errors += 1
                            break
            except Exception:
                # A generator that raised part-way has added some: they go too, unchecked as
                # they are (code review: an invalid name reached HAProxy).
                del actions[start:]
                self.handler_errors += 1
                log.exception("handler for SPOE message %r failed", message.name,
                              extra={"rate_key": message.name})
        return actions
