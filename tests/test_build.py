"""The build under test is the one the environment asked for.

tox's ``py311-mypyc`` environment installs the wheel compiled with mypyc (``SPOE_AGENT_MYPYC=1``,
setup.py) and runs this suite against it; were the compilation silently skipped, every other
test would pass on pure Python and prove nothing about the compiled code.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import spoe_agent

REPO_ROOT = Path(__file__).resolve().parents[1]


def _from_setup(name: str) -> Any:
    """A function of setup.py, without the rest of it (setuptools is not in every test
    environment): the test asks what the build itself decided, the same way."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    function = next(node for node in tree.body
                    if isinstance(node, ast.FunctionDef) and node.name == name)
    namespace: dict[str, Any] = {"ast": ast, "os": os, "Path": Path}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


def test_the_installed_build_is_the_one_asked_for() -> None:
    compiled = spoe_agent.compiled_modules()
    if _from_setup("_wanted")():
        assert compiled == list(spoe_agent.MYPYC_MODULES)
        assert spoe_agent.build_description() == "hot path compiled with mypyc"
    else:
        assert compiled == []
        assert spoe_agent.build_description() == "pure Python"


def test_setup_compiles_the_modules_the_package_names() -> None:
    reader = _from_setup("_compiled_modules")
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # as pip runs it
    try:
        files = reader()
    finally:
        os.chdir(cwd)
    assert files == [name.replace(".", "/") + ".py" for name in spoe_agent.MYPYC_MODULES]
    assert all((REPO_ROOT / f).is_file() for f in files)


def test_version_names_the_build() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from spoe_agent.cli import main; main(['--version'])"],
        capture_output=True, text=True, check=False, cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"spoe-agent {spoe_agent.__version__} ({spoe_agent.build_description()})\n"
