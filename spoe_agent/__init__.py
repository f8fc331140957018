"""spoe-agent: an HAProxy SPOE agent that turns stream events into OpenTelemetry traces."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The modules every traced request runs through, which ``SPOE_AGENT_MYPYC=1 pip install .``
# compiles with mypyc (setup.py reads this list); the same source runs as Python otherwise.
MYPYC_MODULES = (
    "spoe_agent.protocol.varint",
    "spoe_agent.protocol.codec",
    "spoe_agent.protocol.connection",
    "spoe_agent.tracing.language",
    "spoe_agent.tracing.registry",
    "spoe_agent.tracing.jaeger.wire",
    "spoe_agent.tracing.jaeger.tags",
    "spoe_agent.tracing.jaeger.encode",
    "spoe_agent.workers.router",
)


def compiled_modules() -> list[str]:
    """Which of ``MYPYC_MODULES`` this installation runs compiled (an empty list: pure Python),
    for ``--version``, the startup log and the tests that must not pass on the wrong build."""
    return [
        name for name in MYPYC_MODULES
        if not str(getattr(importlib.import_module(name), "__file__", "")).endswith(".py")
    ]


def build_description() -> str:
    compiled = compiled_modules()
    if not compiled:
        return "pure Python"
    if len(compiled) == len(MYPYC_MODULES):
        return "hot path compiled with mypyc"
    return f"partly compiled with mypyc ({len(compiled)} of {len(MYPYC_MODULES)} modules)"
