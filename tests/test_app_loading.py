"""``--app MODULE:ATTR``: what ATTR may be, and the error when it is an Agent class."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoe_agent.config import load_config
from spoe_agent.handlers import Agent
from spoe_agent.protocol import Message, Scope, SetVar

APP_MODULE = """\
from spoe_agent.handlers import Agent
from spoe_agent.protocol import Scope, SetVar


class ScoringAgent(Agent):
    pass


class SelfMadeAgent(Agent):
    def __init__(self):
        super().__init__("self-made")


class ConfiguredAgent(Agent):
    def __init__(self, config):
        super().__init__("configured")
        self.on_message("check-client-ip", check)


agent = Agent("ip-reputation")


@agent.message("check-client-ip")
def check(args):
    return [SetVar(Scope.TXN, "score", 42)]


def make(config):
    return agent
"""


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "class_app.py").write_text(APP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("attr", ["Agent", "ScoringAgent"])
def test_an_agent_class_is_refused_with_the_fix(app_module: Path, attr: str) -> None:
    """Called as a factory, the class built an empty Agent named after the configuration,
    which answered every message with an empty ACK and never said why."""
    from spoe_agent.cli import _build_agent

    with pytest.raises(TypeError) as info:
        _build_agent(f"class_app:{attr}", load_config(env={}))
    assert str(info.value) == (
        f"--app class_app:{attr} names a class: give an Agent instance (agent = "
        f'{attr}("name") and its handlers in class_app, then --app class_app:agent) or a '
        "function that takes the configuration and returns one")


def test_an_agent_class_whose_init_takes_no_configuration_is_named_as_such(
        app_module: Path) -> None:
    """It was called with the configuration and blamed as "the --app factory"."""
    from spoe_agent.cli import _build_agent

    with pytest.raises(TypeError) as info:
        _build_agent("class_app:SelfMadeAgent", load_config(env={}))
    assert str(info.value) == (
        "--app class_app:SelfMadeAgent names a class whose __init__ does not take the "
        "configuration: give an instance (agent = SelfMadeAgent() in class_app, then --app "
        "class_app:agent) or let __init__(self, config) take it")


def test_an_instance_and_a_factory_are_still_served(app_module: Path) -> None:
    from spoe_agent.cli import _build_agent

    config = load_config(env={})
    built = _build_agent("class_app:agent", config)
    assert isinstance(built, Agent) and built.name == "ip-reputation"
    assert _build_agent("class_app:make", config) is built
    # A class with an __init__ of its own is a factory too (as TracingAgent is).
    configured = _build_agent("class_app:ConfiguredAgent", config)
    assert type(configured).__name__ == "ConfiguredAgent" and configured.name == "configured"
    assert type(_build_agent("spoe_agent.tracing.agent:TracingAgent", config)).__name__ == \
        "TracingAgent"


def test_the_cli_refuses_the_class_before_serving(app_module: Path) -> None:
    """The same exit status and stderr line as the other --app mistakes (a missing module or
    attribute), so it never gets as far as listening."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-m", "spoe_agent", "--app", "class_app:Agent", "--exporter", "none",
         "--check"],
        cwd=app_module, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.startswith(
        "spoe-agent: cannot start: --app class_app:Agent names a class: "), done.stderr
    assert "configuration OK" not in done.stdout


HOOKS_MODULE = """\
import logging
import os
from spoe_agent.handlers import Agent

agent = Agent("hooks")
LOG = os.environ["HOOKS_LOG"]


def note(what):
    with open(LOG, "a") as out:
        out.write(f"{os.getpid()} {what}\\n")


def start():
    note("startup")
    if os.environ.get("HOOKS_FAIL"):
        raise RuntimeError("no database")
    if os.environ.get("HOOKS_SLOW"):
        import time
        time.sleep(float(os.environ["HOOKS_SLOW"]))
        note("started")


agent.on_startup.append(start)
agent.on_shutdown.append(lambda: note("shutdown"))
"""


def _serve_hooks(tmp_path: Path, workers: str, fail: bool,
                 **extra: str) -> tuple[subprocess.Popen[str], Path]:
    from tests.support.procs import free_port

    (tmp_path / "hooks_app.py").write_text(HOOKS_MODULE)
    log = tmp_path / "hooks.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("OTEL_")}
    env.update(HOOKS_LOG=str(log), **({"HOOKS_FAIL": "1"} if fail else {}), **extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "spoe_agent", "--app", "hooks_app:agent", "--exporter", "none",
         "--workers", workers, "--bind", f"127.0.0.1:{free_port()}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_failing_startup_hook_is_a_failed_start_not_a_traceback(tmp_path: Path,
                                                                   workers: str) -> None:
    """Black-box run: an --app's on_startup hook that raised ended the agent with a raw
    traceback, where a failing factory gets one line."""
    proc, _ = _serve_hooks(tmp_path, workers, fail=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "cannot start: the on_startup hook start failed: RuntimeError: no database" in err, err
    assert "Traceback" not in err, err


def test_the_supervisor_runs_no_hook_of_an_app(tmp_path: Path) -> None:
    """Black-box run: with workers, the supervisor ran the app's on_shutdown hooks at start-up,
    before any worker started, in a process that never ran on_startup."""
    import signal

    from tests.support.procs import wait_until

    proc, log = _serve_hooks(tmp_path, "2", fail=False)
    try:
        wait_until(lambda: log.exists() and log.read_text().count("startup") == 2, timeout=30,
                   what="both workers' on_startup")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line.split() for line in log.read_text().splitlines()]
    started = {pid for pid, what in lines if what == "startup"}
    stopped = {pid for pid, what in lines if what == "shutdown"}
    assert len(started) == 2 and stopped == started, lines
    assert str(proc.pid) not in started | stopped, lines


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_during_start_up_is_a_clean_stop(tmp_path: Path, signum: str) -> None:
    """Code review: before the runner's handlers, SIGTERM exited 143, SIGHUP 129, and SIGINT
    with a KeyboardInterrupt traceback; the README says they stop the agent cleanly. And
    SIGUSR1 and SIGUSR2, which it says are ignored, killed it."""
    import signal

    from tests.support.procs import wait_until

    proc, log = _serve_hooks(tmp_path, "1", fail=False, HOOKS_SLOW="1.5")
    try:
        wait_until(lambda: log.exists() and "startup" in log.read_text(), timeout=30,
                   what="the on_startup hook running")
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGUSR2)
        proc.send_signal(getattr(signal, signum))
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"{signum} during start-up: stopping" in err and "Traceback" not in err, err
    assert "shutdown" in log.read_text()  # stopped as after serving: its hooks ran


def test_a_second_handler_for_one_message_is_refused() -> None:
    """Black-box run: registering two handlers for one SPOE message kept the second, silently
    (Flask refuses the same for a route)."""
    agent = Agent("twice")

    @agent.message("check")
    def first(args):  # type: ignore[no-untyped-def]
        return []

    agent.on_message("check", first, concurrent=True)  # the same handler again: a re-setting
    with pytest.raises(ValueError, match="SPOE message 'check' already has a handler, "
                                         "'test_a_second_handler_for_one_message_is_refused"):
        @agent.message("check")
        def second(args):  # type: ignore[no-untyped-def]
            return []


def test_an_async_handler_is_refused_at_registration() -> None:
    """Black-box run: an ``async def`` handler was taken and failed on every message."""
    agent = Agent("async")
    with pytest.raises(TypeError, match="the handler of SPOE message 'check' is async"):
        @agent.message("check")
        async def check(args):  # type: ignore[no-untyped-def]
            return []


def test_a_variable_haproxy_cannot_read_is_dropped_and_its_handler_named(
        caplog: pytest.LogCaptureFixture) -> None:
    """Black-box run: ``SetVar(Scope.TXN, "my-score", 1)`` went to HAProxy, whose ``var()``
    refuses a '-' at configuration time: set, never readable, and nothing said."""
    from spoe_agent.protocol import Message, Scope, SetVar, UnsetVar

    agent = Agent("names")

    @agent.message("check")
    def check(args):  # type: ignore[no-untyped-def]
        return [SetVar(Scope.TXN, "score", 1), SetVar(Scope.TXN, "my-score", 2),
                UnsetVar(Scope.SESS, ""), SetVar(Scope.TXN, "a.b_C9", 3)]

    @agent.message("other")
    def other(args):  # type: ignore[no-untyped-def]
        yield SetVar(Scope.REQ, "ok", 4)  # a generator's actions are checked too
        yield SetVar(Scope.REQ, "é", 5)
        yield SetVar(Scope.REQ, "n" * 57, 6)  # "req.p." and it: 63 bytes, the most HAProxy sets
        yield SetVar(Scope.REQ, "n" * 58, 7)
        yield SetVar(Scope.SESS, "n" * 57, 8)  # "sess.p." and it: 64 (black-box run)
        yield SetVar(Scope.SESS, "n" * 56, 9)

    with caplog.at_level(logging.ERROR, logger="spoe_agent.handlers"):
        actions = agent.dispatch([Message("check", []), Message("other", [])])
    assert actions == [SetVar(Scope.TXN, "score", 1), SetVar(Scope.TXN, "a.b_C9", 3),
                       SetVar(Scope.REQ, "ok", 4), SetVar(Scope.REQ, "n" * 57, 6),
                       SetVar(Scope.SESS, "n" * 56, 9)]
    assert [r.getMessage() for r in caplog.records] == [
        "handler for SPOE message 'check' would set variable 'my-score', which HAProxy cannot "
        "read (a name is of 'a-z', 'A-Z', '0-9', '.' and '_' only): the action is dropped",
        "handler for SPOE message 'check' would unset variable '', which HAProxy cannot "
        "read (a name is of 'a-z', 'A-Z', '0-9', '.' and '_' only): the action is dropped",
        "handler for SPOE message 'other' would set variable 'é', which HAProxy cannot "
        "read (a name is of 'a-z', 'A-Z', '0-9', '.' and '_' only): the action is dropped",
        f"handler for SPOE message 'other' would set variable '{'n' * 58}', which HAProxy cannot "
        "set: its whole name, <scope>.<var-prefix>.<name>, must fit in 63 bytes (2.6 and 3.x "
        "alike drop a longer one, saying nothing): the action is dropped",
        f"handler for SPOE message 'other' would set variable '{'n' * 57}', which HAProxy cannot "
        "set: its whole name, <scope>.<var-prefix>.<name>, must fit in 63 bytes (2.6 and 3.x "
        "alike drop a longer one, saying nothing): the action is dropped",
    ]
    assert agent.handler_errors == 2  # one per handler call that returned such a name
    assert agent.dispatch([Message("check", [])])[0] == SetVar(Scope.TXN, "score", 1)


def test_a_handler_that_raises_part_way_costs_all_its_own_actions(
        caplog: pytest.LogCaptureFixture) -> None:
    """Code review: a generator's actions yielded before it raised stayed in the ACK, and went
    unchecked (a name HAProxy cannot read reached it)."""
    agent = Agent("part-way")

    @agent.message("first")
    def first(args: list[tuple[str, object]]) -> list[SetVar]:
        return [SetVar(Scope.TXN, "kept", 1)]

    @agent.message("broken")
    def broken(args: list[tuple[str, object]]) -> Iterator[SetVar]:
        yield SetVar(Scope.TXN, "bad-name", 2)
        yield SetVar(Scope.TXN, "fine", 3)
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="spoe_agent.handlers"):
        actions = agent.dispatch([Message("first", []), Message("broken", []),
                                  Message("first", [])])
    assert actions == [SetVar(Scope.TXN, "kept", 1), SetVar(Scope.TXN, "kept", 1)]
    assert [r.getMessage() for r in caplog.records] == [
        "handler for SPOE message 'broken' failed"]
    assert agent.handler_errors == 1

