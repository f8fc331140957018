"""An app for the shutdown and limit tests: a handler that stays in flight as long as asked."""

from __future__ import annotations

import gevent

from spoe_agent.handlers import Agent, Args
from spoe_agent.protocol.types import Action, Scope, SetVar

agent = Agent("hardening")


@agent.message("nap", concurrent=True)
def nap(args: Args) -> list[Action]:
    """Sleep ``seconds`` (yielding), then answer ``done=<id>``: a NOTIFY in flight on demand."""
    named = dict(args)
    gevent.sleep(float(named.get("ms", 0)) / 1000)
    return [SetVar(Scope.TXN, "done", named.get("id", 0))]


@agent.message("inline")
def inline(args: Args) -> list[Action]:
    return [SetVar(Scope.TXN, "n", args[0][1] if args else -1)]
