"""The two agents the SPOP benchmark compares, doing the same minimal work.

Both answer every ``bench`` message with one ``set-var(txn.score, 1)``, built afresh per NOTIFY,
with logging below WARNING off, so the benchmark measures the protocol stack and not the app:

* spoe-agent: ``python -m spoe_agent --app benchmarks.apps:minimal_agent ...``;
* spoe-forge 0.0.8: ``/tmp/venv-forge/bin/python benchmarks/apps.py forge --port N``. It runs in
  its own venv, so this module imports neither library at the top level.

The forge handler is ``async def`` on purpose: a plain function would run in a worker thread
(``asyncio.to_thread``), which is forge's slow path, not its best case.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

MESSAGE = "bench"  # spop_load.MINIMAL_MESSAGE; not imported, so the forge venv needs nothing else
VAR_NAME = "score"
FORGE_MAX_FRAME_SIZE = 16380  # what HAProxy announces; forge's default (4096) would be smaller


def minimal_agent(config: Any = None) -> Any:
    """The spoe-agent app (a factory, so the forge venv can import this module)."""
    from spoe_agent.handlers import Agent
    from spoe_agent.protocol.types import Scope, SetVar

    agent = Agent("bench")

    @agent.message(MESSAGE)
    def bench(args: list[tuple[str, Any]]) -> list[SetVar]:
        return [SetVar(Scope.TXN, VAR_NAME, 1)]

    return agent


def run_forge(host: str, port: int) -> None:
    """Serve the spoe-forge equivalent of :func:`minimal_agent` until killed."""
    from spoe_forge import ActionScope, AgentContext, SetVarAction, SpoeForge

    # Set before SpoeForge creates its logger, which only defaults the level when none is set:
    # its per-message "handled ..." INFO line would otherwise be written for every NOTIFY.
    logging.getLogger("spoe_forge").setLevel(logging.WARNING)
    forge = SpoeForge(name="bench", max_frame_size=FORGE_MAX_FRAME_SIZE)

    @forge.message(MESSAGE)
    async def bench(ctx: AgentContext) -> list[SetVarAction]:
        return [SetVarAction(scope=ActionScope.TRANSACTION, name=VAR_NAME, value=1)]

    forge.run(host=host, port=port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark agents (spoe-forge side).")
    sub = parser.add_subparsers(dest="command", required=True)
    forge = sub.add_parser("forge", help="serve the spoe-forge minimal agent")
    forge.add_argument("--host", default="127.0.0.1")
    forge.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "forge":
        run_forge(args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
