"""An agent that reflects what HAProxy sent back into HAProxy variables.

Served through the real CLI (``--app tests.apps.echo:agent``), it lets integration tests check
the whole round trip from HAProxy's configuration: argument values and types as the agent
decoded them come back as ``txn.<prefix>.*`` variables, which the test config turns into
response headers. Every message HAProxy can send is covered: named, unnamed and repeated
arguments, every value type, a message with no handler (empty ACK), a handler that raises, and a
concurrent handler that yields to the event loop.
"""

from __future__ import annotations

import gc
import ipaddress
from typing import Any

import gevent

from spoe_agent.handlers import Agent, Args
from spoe_agent.protocol.types import Action, Scope, SetVar, UnsetVar

agent = Agent("echo")

#: Constants the tests expect verbatim; negative and beyond-32-bit values catch sign/width bugs.
IP_SCORE = 80
NEGATIVE = -42
BIG = 2**40 + 7
SIX = ipaddress.IPv6Address("2001:db8::1")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, ipaddress.IPv4Address):
        return "ipv4"
    if isinstance(value, ipaddress.IPv6Address):
        return "ipv6"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bin"
    return type(value).__name__


@agent.message("check")
def check(args: Args) -> list[Action]:
    """Fixed values of every type plus facts about the arguments (their count, names, types).

    ``arg<i>``/``type<i>``/``name<i>`` echo argument ``i`` positionally, so repeated and
    unnamed (empty-name) arguments stay distinguishable. ``gone`` is unset, to prove UNSET-VAR
    removes a variable the config set before the SPOE call.
    """
    named = dict(args)
    actions: list[Action] = [
        SetVar(Scope.TXN, "nargs", len(args)),
        SetVar(Scope.TXN, "ip_score", IP_SCORE),
        SetVar(Scope.TXN, "negative", NEGATIVE),
        SetVar(Scope.TXN, "big", BIG),
        SetVar(Scope.TXN, "yes", True),
        SetVar(Scope.TXN, "no", False),
        SetVar(Scope.TXN, "six", SIX),
        SetVar(Scope.TXN, "unnamed", sum(1 for name, _ in args if name == "")),
        UnsetVar(Scope.TXN, "gone"),
    ]
    if "path" in named:
        actions.append(SetVar(Scope.TXN, "echo_path", named["path"]))
    src = named.get("src")
    if src is not None:
        actions.append(SetVar(Scope.TXN, "src", src))
        actions.append(SetVar(Scope.TXN, "is_v4", isinstance(src, ipaddress.IPv4Address)))
    for i, (name, value) in enumerate(args):
        actions.append(SetVar(Scope.TXN, f"name{i}", name))
        actions.append(SetVar(Scope.TXN, f"type{i}", _type_name(value)))
        if value is not None:
            actions.append(SetVar(Scope.TXN, f"arg{i}", value))
    return actions


@agent.message("measure")
def measure(args: Args) -> list[Action]:
    """The length of a (possibly fragmented) argument, so a test can prove it arrived whole."""
    blob = dict(args).get("blob")
    if isinstance(blob, str) and blob.startswith("fill="):
        # An ACK of a chosen size, nearly all of it one variable no response header mirrors.
        return [SetVar(Scope.TXN, "filled", "x" * int(blob[5:]))]
    size = len(blob) if isinstance(blob, str | bytes) else -1
    tail = blob[-16:] if isinstance(blob, str) else ""
    return [SetVar(Scope.TXN, "blob_len", size), SetVar(Scope.TXN, "blob_tail", tail)]


@agent.message("slow", concurrent=True)
def slow(args: Args) -> list[Action]:
    """Yields to the event loop, so pipelined NOTIFYs on one connection overlap."""
    gevent.sleep(0.005)
    return [
        SetVar(Scope.TXN, "slow_done", True),
        SetVar(Scope.TXN, "slow_id", dict(args).get("id")),
    ]


@agent.message("fill-slowly", concurrent=True)
def fill_slowly(args: Args) -> list[Action]:
    """An ACK of a chosen size from a concurrent handler: its write is not the reader's."""
    gevent.sleep(0.001)
    return [SetVar(Scope.TXN, "filled", "x" * int(dict(args).get("size", 0)))]


@agent.message("gc")
def gc_state(args: Args) -> list[Action]:
    """How many objects start-up froze out of the cyclic collector's reach (the runner's doing)."""
    return [SetVar(Scope.TXN, "frozen", gc.get_freeze_count())]


@agent.message("explode")
def explode(args: Args) -> list[Action]:
    """A broken handler: the agent must still ACK, or HAProxy would time the request out."""
    raise RuntimeError("echo app: deliberate handler failure")


# "silent" (and any other message) has no handler on purpose: it must get an empty ACK.
