"""Fixtures shared by all tests: real HAProxy versions, the agent as a subprocess, an origin.

Processes started here are stopped at teardown whatever happens, and when a test fails their
logs (agent stderr, HAProxy's SPOE log lines) are attached to the report, because an
integration failure without them is usually undiagnosable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # ``tests`` is not a package, so pytest's rootdir-relative import would not find
    # ``tests.support`` on its own. Appended, so that ``spoe_agent`` stays the installed one:
    # tox tests the wheel it built (compiled, in the mypyc environment), not the source tree.
    sys.path.append(str(REPO_ROOT))

from tests.integration.backend import Backend  # noqa: E402
from tests.support import examples  # noqa: E402, F401 - loads the hypothesis profile
from tests.support.haproxy import HAProxy, binary_version, haproxy_binaries  # noqa: E402
from tests.support.procs import AgentProcess  # noqa: E402

HAPROXY_LABELS = ["2.6", "3.2"]
MISSING_REASON = {
    "2.6": "HAProxy 2.6 not available: install Debian's haproxy package (apt-get install haproxy)",
    "3.2": "HAProxy 3.2 not available: run scripts/fetch-haproxy-3.2.sh (download failed?)",
}

_LOGGED = pytest.StashKey[list]()


def _register(request: pytest.FixtureRequest, thing: object) -> None:
    """Remember a process so its logs are attached to the report if the test fails."""
    request.node.stash.setdefault(_LOGGED, []).append(thing)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for thing in item.stash.get(_LOGGED, []):
            describe = getattr(thing, "describe_logs", None)
            if describe is not None:
                report.sections.append((f"logs: {getattr(thing, 'name', thing)}", describe()))


def pytest_configure(config: pytest.Config) -> None:
    # Skips are always listed with their reasons: a missing HAProxy must never pass unnoticed.
    chars = config.option.reportchars or ""
    if "s" not in chars and "a" not in chars and "A" not in chars:
        config.option.reportchars = chars + "s"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding a test marked ``slow`` run first, each kept whole and in order.

    Most of the suite waits on agent processes rather than computing, so tox runs it with more
    xdist processes than cores and ``--dist worksteal``. What bounds the run then is the last
    long test to start: left in file order, tests/workers' 20-second ones started near the end
    and ran on alone (a 25-second tail). Whole modules move, so their module-scoped fixtures
    are still set up once.
    """
    slow = {item.module.__name__ for item in items
            if item.get_closest_marker("slow") is not None and item.module is not None}
    items.sort(key=lambda item: item.module is None or item.module.__name__ not in slow)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    missing = sorted(
        {
            label
            for report in terminalreporter.stats.get("skipped", [])
            for label, reason in MISSING_REASON.items()
            if isinstance(report.longrepr, tuple) and reason in str(report.longrepr[2])
        }
    )
    for label in missing:
        terminalreporter.write_sep("!", f"HAProxy {label} tests were SKIPPED", red=True, bold=True)
        terminalreporter.write_line(MISSING_REASON[label], red=True, bold=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    found = haproxy_binaries()
    lines = []
    for label in HAPROXY_LABELS:
        path = found.get(label)
        if path is None:
            lines.append(
                f"haproxy {label}: MISSING -> tests will be SKIPPED ({MISSING_REASON[label]})"
            )
        else:
            try:
                lines.append(f"haproxy {label}: {binary_version(path)} ({path})")
            except Exception as exc:  # a broken wrapper should not hide the whole session
                lines.append(f"haproxy {label}: {path} does not run: {exc}")
    return lines


# ----------------------------------------------------------------------------- HAProxy


@pytest.fixture(params=HAPROXY_LABELS, ids=lambda label: f"haproxy-{label}")
def haproxy_version(request: pytest.FixtureRequest) -> str:
    """The HAProxy version label under test; a missing binary is a loud, explained skip."""
    label: str = request.param
    if label not in haproxy_binaries():
        pytest.skip(MISSING_REASON[label])
    return label


@pytest.fixture
def haproxy_binary(haproxy_version: str) -> str:
    return haproxy_binaries()[haproxy_version]


@pytest.fixture
def haproxy(
    request: pytest.FixtureRequest, haproxy_binary: str, tmp_path: Path
) -> Iterator[Callable[..., HAProxy]]:
    """Factory: ``haproxy(config_text, spoe_text=None)`` -> a started, validated HAProxy.

    ``{tmp}`` in the texts is the instance directory (stats socket ``{tmp}/admin.sock``,
    SPOE file ``{tmp}/spoe.cfg``).
    """
    started: list[HAProxy] = []

    def start(config_text: str, spoe_text: str | None = None, *, name: str = "haproxy") -> HAProxy:
        hap = HAProxy(
            haproxy_binary, config_text, tmp_path / f"{name}-{len(started)}", spoe_text, name=name
        )
        started.append(hap)
        _register(request, hap)
        return hap.start()

    yield start
    for hap in started:
        hap.stop()


# ------------------------------------------------------------------------------- agent


@pytest.fixture
def spoe_agent(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: ``spoe_agent(*extra_cli_args, app=..., unix=False, env=None)`` -> an agent.

    The agent runs as a real subprocess of the CLI (not in-process), so the tests cover
    argument parsing, logging set-up and the gevent server exactly as deployed. ``env`` is the
    agent's whole environment (default: the test process's), so OTEL_* variables set in the
    shell running the tests cannot leak into a test that configures them itself.
    """
    started: list[AgentProcess] = []

    def start(
        *extra: str,
        app: str | None = "tests.apps.echo:agent",
        unix: bool = False,
        name: str = "agent",
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> AgentProcess:
        agent = AgentProcess.launch(
            tmp_path / "logs",
            *extra,
            app=app,
            unix=unix,
            name=f"{name}-{len(started)}",
            env=env,
        )
        # Registered before waiting, so an agent that never listens is still reaped and its
        # logs still reach the report.
        started.append(agent)
        _register(request, agent)
        agent.wait_ready(timeout)
        return agent

    yield start
    for agent in started:
        agent.stop()


# ------------------------------------------------------------------------------ origin


@pytest.fixture
def backend() -> Iterator[Backend]:
    """A running HTTP origin on a free 127.0.0.1 port (``backend.port``, ``backend.requests``)."""
    with Backend() as origin:
        yield origin
