"""How many examples each property test tries.

All of them by default. tox runs the same pure-Python code on three interpreters (py310, py312,
py313) and gives each a third (``SPOE_AGENT_TEST_EXAMPLES``, tox.ini): with their own random
seeds, the three still try one full set between them, and the compiled build (py311-mypyc), the
one whose code differs, tries it whole. The property tests were ~100 of the ~300 s of CPU each
interpreter's run took on CI's 2 cores.
"""

from __future__ import annotations

import os

from hypothesis import settings

#: A share of each test's examples, in (0, 1].
SCALE = float(os.environ.get("SPOE_AGENT_TEST_EXAMPLES") or 1)
if not 0 < SCALE <= 1:
    raise ValueError(f"SPOE_AGENT_TEST_EXAMPLES={SCALE}: a share of the examples, in (0, 1]")

#: Fewer than this, and a test that draws from many shapes no longer meets each of them.
_FEWEST = 20


def examples(count: int) -> int:
    """``count`` examples, scaled: what a test's ``@settings(max_examples=...)`` asks for."""
    return max(min(count, _FEWEST), round(count * SCALE))


# For the tests that leave max_examples at hypothesis's default (100).
settings.register_profile("spoe-agent", max_examples=examples(settings.default.max_examples))
settings.load_profile("spoe-agent")
