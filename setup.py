"""Build hook for the optional compiled hot path; the metadata lives in setup.cfg.

With ``SPOE_AGENT_MYPYC=1`` in the environment, the modules that every traced request runs
through (``spoe_agent.MYPYC_MODULES``: the SPOP codec and connection, the span language and
registry, the Jaeger thrift writer, the workers' command codec) are compiled to C extensions
with mypyc, from the same Python source: a traced request then costs the agent about a third
fewer instructions (benchmarks/README.md, "The compiled build"). Without it, the package is
pure Python. Nothing compiled may yield to gevent (the server and the mesh stay Python).

    SPOE_AGENT_MYPYC=1 pip install .

mypy (which carries mypyc) is then a build requirement, fetched by pip into the isolated build
environment; a C compiler and the Python headers are needed. ``spoe-agent --version`` tells which
build is installed.
"""

import ast
import os
import sys
from pathlib import Path

from setuptools import setup


def _compiled_modules() -> list[str]:
    """The source files of ``spoe_agent.MYPYC_MODULES``, read without importing the package."""
    tree = ast.parse(Path("spoe_agent/__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MYPYC_MODULES":
            return [name.replace(".", "/") + ".py" for name in ast.literal_eval(node.value)]
    raise RuntimeError("spoe_agent/__init__.py defines no MYPYC_MODULES")


MYPY = "mypy==2.4.1"


def _wanted() -> bool:
    return os.environ.get("SPOE_AGENT_MYPYC", "").strip().lower() in ("1", "true", "yes", "on")


def _ext_modules() -> list:
    if not _wanted():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        # setuptools first runs this file only to collect setup_requires (so that pip installs
        # mypy into the build environment); the build itself runs it again with mypy present.
        print(f"SPOE_AGENT_MYPYC is set but mypyc is not importable: {MYPY} is needed",
              file=sys.stderr)
        return []
    # The build environment has none of the runtime dependencies: their types are Any here,
    # and only the modules compiled are checked.
    options = ["--ignore-missing-imports", "--follow-imports=silent"]
    return mypycify([*options, *_compiled_modules()], opt_level="3")


setup(
    ext_modules=_ext_modules(),
    setup_requires=[MYPY] if _wanted() else [],
)
