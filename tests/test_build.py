"""The build under test is the one the environment asked for.

tox's ``py311-mypyc`` environment installs the wheel compiled with mypyc (``SPOE_AGENT_MYPYC=1``,
setup.py) and runs this suite against it; were the compilation silently skipped, every other
test would pass on pure Python and prove nothing about the compiled code.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
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


def test_the_wheel_ships_every_module_the_type_marker_and_the_licence(tmp_path: Path) -> None:
    """What `pip install .` puts in place: the package whole, ``py.typed`` (handlers and
    protocol are a library too) and the licence the metadata names."""
    env = {k: v for k, v in os.environ.items() if k != "SPOE_AGENT_MYPYC"}  # pure: faster
    # A copy: pip builds in the tree, and a build/ left in the checkout would go into the next
    # wheel tox builds from it.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "spoe_agent", source / "spoe_agent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md",
                 "LICENSE"):
        shutil.copy2(REPO_ROOT / name, source / name)
    out = tmp_path / "out"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True, text=True, check=False, env=env, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = out.glob("spoe_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    modules = {p.relative_to(REPO_ROOT).as_posix()
               for p in (REPO_ROOT / "spoe_agent").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "spoe_agent/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in names), sorted(names)
    assert b"License: Apache-2.0" in metadata or b"License-Expression: Apache-2.0" in metadata
