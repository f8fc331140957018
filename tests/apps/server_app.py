"""Handlers that exercise the server: inline, concurrent (yielding) and failing ones."""

from __future__ import annotations

import gevent

from spoe_agent.handlers import Agent
from spoe_agent.protocol.types import Scope, SetVar

agent = Agent("server-test")


@agent.message("inline")
def inline(args):
    return [SetVar(Scope.TXN, "n", args[0][1] if args else -1)]


@agent.message("slow", concurrent=True)
def slow(args):
    # Later NOTIFYs sleep less, so their ACKs overtake: replies go out in completion order.
    index = args[0][1]
    gevent.sleep(0.002 * (20 - index % 20))
    return [SetVar(Scope.TXN, "i", index), SetVar(Scope.TXN, "pad", "x" * 200)]


@agent.message("boom")
def boom(args):
    raise RuntimeError("handler bug")


@agent.message("floaty")
def floaty(args):
    """A handler bug the server only meets when it encodes the ACK: SPOP has no float."""
    return [SetVar(Scope.TXN, "ok", 1), SetVar(Scope.TXN, "fl", 1.5)]


reads_announced = 0


def _announce() -> None:
    global reads_announced
    reads_announced += 1


agent.before_notifies.append(_announce)


@agent.message("reads")
def reads(args):
    """How many reads of NOTIFYs the server announced so far (``Agent.before_notifies``)."""
    return [SetVar(Scope.TXN, "reads", reads_announced)]
