"""``spoe-agent``: parse flags, load the configuration, serve until SIGTERM, SIGINT or SIGHUP.

gevent's monkey-patching happens here, first, because the exporter's HTTP client and the span
processor's flush loop must cooperate with the connection greenlets.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import math
import os
import sys
import traceback
from typing import Any

from spoe_agent import __version__

EXIT_STARTUP = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    from spoe_agent.config import EXPORTERS

    parser = argparse.ArgumentParser(
        prog="spoe-agent",
        description="HAProxy SPOE agent that turns stream events into OpenTelemetry traces.",
        epilog="Precedence: command-line flags > OTEL_* environment variables > agent.ini > "
               "defaults.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", action=_Once,
                        help="agent.ini configuration file")
    parser.add_argument("--bind", type=_option("bind"), metavar="HOST:PORT|unix:PATH",
                        help="where HAProxy connects (default 127.0.0.1:12345)")
    parser.add_argument("--workers", type=_option("workers"), metavar="N|auto",
                        help="worker processes (default auto: one per usable core; "
                             "1 serves in this process)")
    # Set by the --workers supervisor on the processes it starts (docs/scaling.md).
    parser.add_argument("--worker-index", dest="worker_index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--busy-poll", dest="busy_poll", nargs="?", const=math.inf,
                        type=_option("busy_poll"), metavar="WINDOW",
                        help="poll instead of sleeping, like HAProxy's busy-polling: lower "
                             "latency per event (on VMs especially); alone it never sleeps "
                             "(one busy core per process), with a WINDOW such as 1ms it polls "
                             "that long after each read and sleeps when idle")
    parser.add_argument("--no-busy-poll", dest="busy_poll", action="store_const", const=0.0,
                        help="sleep between events (the default)")
    parser.add_argument("--metrics", type=_option("metrics"), metavar="HOST:PORT",
                        help="serve Prometheus /metrics and /health there (off by default)")
    parser.add_argument("--service-name", dest="service_name", type=_option("service_name"),
                        metavar="NAME",
                        help="default service.name of the spans (OTEL_SERVICE_NAME)")
    parser.add_argument("--exporter", type=_option("exporter"),
                        metavar="{" + ",".join(EXPORTERS) + "}",
                        help="where spans go (OTEL_TRACES_EXPORTER)")
    parser.add_argument("--log-level", dest="log_level", type=_option("log_level"),
                        metavar="{debug,info,warning,error,critical}")
    parser.add_argument("--log-format", dest="log_format", type=_option("log_format"),
                        metavar="{text,json}", help="text lines or one JSON object per line")
    parser.add_argument("--app", metavar="MODULE:ATTR",
                        help="serve this spoe_agent.handlers.Agent instead of the tracing agent")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit (0 valid, 2 invalid)")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the version and the build (pure Python or compiled), exit")
    return parser


def _option(attr: str) -> Any:
    """The flag's value goes through the parser agent.ini and the environment use for the same
    option, so no flag accepts what the file refuses (an empty service name); a refusal is
    argparse's usage error, exit status 2."""
    from spoe_agent.config import OPTIONS

    parse = next(option.parse for option in OPTIONS if option.attr == attr)

    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse_flag


class _Once(argparse.Action):
    """``-c`` given twice is refused: argparse would keep the last file, silently, where
    HAProxy's ``-f a -f b`` loads both; neither guess is safe for a configuration."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error("-c/--config given twice: give one configuration file")
        setattr(namespace, self.dest, values)


class _Version(argparse.Action):
    """``--version``, with the build: which one is installed decides what a request costs."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from spoe_agent import build_description

        print(f"spoe-agent {__version__} ({build_description()})")
        parser.exit()


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags' values, already parsed by :func:`_option` (None: the flag was not given)."""
    return {attr: getattr(args, attr) for attr in (
        "bind", "workers", "metrics", "service_name", "exporter", "log_level", "log_format",
        "busy_poll")}


def load_app(spec: str) -> Any:
    """Import ``MODULE:ATTR``; the attribute is an Agent or a factory taking the config (a
    function: an Agent class is refused by :func:`_build_agent`)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app expects MODULE:ATTR, got {spec!r}")
    # The console script puts its own bin/ first on sys.path, not the current directory, so
    # `spoe-agent --app mymodule:agent` next to mymodule.py would not find it (gunicorn and
    # uvicorn add the directory too); `python -m spoe_agent` already has it.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise _app_failure(f"importing the --app module {module_name!r}", exc) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def _takes_one_argument(cls: type) -> bool:
    try:
        inspect.signature(cls).bind(object())
    except TypeError:
        return False
    except ValueError:  # no signature to read: let the call say
        return True
    return True


def _app_failure(what: str, exc: Exception) -> ValueError:
    """The app's own error ("boom") would read as the agent's: say whose it is, and where (in
    the app's code: a missing module has none, only importlib's frames)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename not in (__file__, importlib.__file__)
              and not f.filename.startswith("<frozen ")]
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return ValueError(f"{what} failed: {type(exc).__name__}: {exc}{where}")


def _patch_all() -> None:
    """gevent's ``monkey.patch_all``, with one look at the installed packages' entry points.

    For each module it patches, gevent looks up its plugins in the entry points of every
    installed distribution: 25 scans, 0.15-0.25 s of CPU at every start (a worker restarted
    with ``--workers``, each ``--check``), half of what patching costs. They are answered here
    from one scan; plugins registered there still run.
    """
    from importlib import metadata

    from gevent import monkey

    scanned = metadata.entry_points()
    lookup = metadata.entry_points
    metadata.entry_points = lambda **selection: scanned.select(**selection)  # type: ignore[assignment]
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = lookup


def main(argv: list[str] | None = None) -> int:
    from spoe_agent.stop_signals import catch_early_stop

    catch_early_stop()
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        _patch_all()

    from spoe_agent.config import ConfigError, bind_text, ignored_unix_options, load_config

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None and not args.config.strip():
        parser.error("-c/--config: an empty file name (leave the flag out for the defaults)")
    ini_bytes = None
    if args.worker_index is not None and args.config:
        from spoe_agent.workers import inherited_config_bytes

        ini_bytes = inherited_config_bytes()
    try:
        config = load_config(args.config, _overrides(args), ini_bytes=ini_bytes)
    except (ConfigError, ValueError) as exc:
        print(f"spoe-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from spoe_agent.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    if args.worker_index is not None:
        from spoe_agent.workers import prefix_log_records, worker_config

        config = worker_config(config, args.worker_index)
        prefix_log_records(f"worker {args.worker_index}: ")
    try:
        agent = _build_agent(args.app, config)
    except Exception as exc:  # a broken --app or tracing setup is a configuration problem
        _cannot_start(exc, args.worker_index, config.log_format)
        return EXIT_CONFIG
    from spoe_agent.runner import StartupError, run, tls_context

    if args.check:
        from spoe_agent.listeners import bind_problem

        problem = bind_problem(config.bind)
        if problem is not None:
            print(f"spoe-agent: configuration error: cannot listen on {bind_text(config.bind)} "
                  f"({config.set_by('bind')}): {problem}", file=sys.stderr)
            return EXIT_CONFIG
        # The metrics address too: one this machine does not have passed --check, and the
        # start failed (code review).
        problem = bind_problem(config.metrics) if config.metrics else None
        if problem is not None:
            print(f"spoe-agent: configuration error: cannot serve metrics on "
                  f"{bind_text(config.metrics)} ({config.set_by('metrics')}): {problem}",
                  file=sys.stderr)
            return EXIT_CONFIG
        try:
            tls = tls_context(config)  # certificates are read now, not at the first connection
        except StartupError as exc:
            print(f"spoe-agent: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        from spoe_agent.tracing.agent import TracingAgent

        # An --app of its own exports nothing: naming the exporter it would not use misleads.
        tracing = isinstance(agent, TracingAgent)
        serving = f"exporter {config.exporter_text()}" if tracing else f"app {args.app}"
        print(f"spoe-agent: configuration OK ({config.config_file or 'defaults'}; "
              f"listening on {bind_text(config.bind)}{' with TLS' if tls is not None else ''}; "
              f"workers {config.workers}; {serving})")
        warnings = [config.endpoint_warning()] if tracing else []
        for warning in (*warnings, config.frame_size_warning()):
            if warning:
                print(f"spoe-agent: warning: {warning}", file=sys.stderr)
        note = ignored_unix_options(config.bind, config.unix_mode, config.unix_group)
        if note:
            print(f"spoe-agent: note: {note}")
        return 0

    try:
        if config.workers > 1 or args.worker_index is not None:
            from spoe_agent.workers import serve

            return serve(agent, config, sys.argv[1:] if argv is None else list(argv),
                         args.worker_index)
        return run(agent, config)
    except StartupError as exc:
        _cannot_start(exc, args.worker_index, config.log_format)
        return EXIT_STARTUP


def _cannot_start(exc: Exception, worker_index: int | None, log_format: str = "text") -> None:
    """One process says it on stderr; a worker logs it, so that the line says which worker it
    is and has the configured format (JSON), as the supervisor's next line about it does. With
    JSON logs the process logs it too: a log pipeline that parses every line would otherwise
    get the one line that says why the agent is down as text (black-box run)."""
    if worker_index is None and log_format != "json":
        print(f"spoe-agent: cannot start: {exc}", file=sys.stderr)
        return
    from spoe_agent.logs import EVERY_TIME

    logging.getLogger("spoe_agent").error("cannot start: %s", exc, extra=EVERY_TIME)


def _build_agent(app_spec: str | None, config: Any) -> Any:
    from spoe_agent.handlers import Agent

    if app_spec:
        app = load_app(app_spec)
    else:
        from spoe_agent.tracing.agent import build_tracing_agent as app
    if isinstance(app, Agent):
        return app
    if isinstance(app, type) and issubclass(app, Agent) and app.__init__ is Agent.__init__:
        # Called as a factory it would build an empty Agent named after the configuration,
        # which answers every message with an empty ACK. A subclass with an __init__ of its
        # own (TracingAgent's takes the configuration) is a factory like any function.
        module = app_spec.partition(":")[0] if app_spec else "the module"
        raise TypeError(
            f"--app {app_spec} names a class: give an Agent instance (agent = "
            f"{app.__name__}(\"name\") and its handlers in {module}, then --app {module}:agent) "
            f"or a function that takes the configuration and returns one")
    if isinstance(app, type) and issubclass(app, Agent) and not _takes_one_argument(app):
        # Called with the configuration it fails inside the agent's own class, and the error
        # blamed "the --app factory" for a class nobody wrote as one.
        module = app_spec.partition(":")[0] if app_spec else "the module"
        raise TypeError(
            f"--app {app_spec} names a class whose __init__ does not take the configuration: "
            f"give an instance (agent = {app.__name__}() in {module}, then --app "
            f"{module}:agent) or let __init__(self, config) take it")
    if callable(app):
        try:
            agent = app(config)
        except Exception as exc:
            if not app_spec:  # the default agent's own failure: its traceback, as it is
                raise
            raise _app_failure(f"the --app factory {app_spec!r}", exc) from None
        if not isinstance(agent, Agent):
            raise TypeError(f"{app_spec} returned {type(agent).__name__}, not an Agent")
        return agent
    raise TypeError(f"{app_spec} is neither an Agent nor a factory of one")


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    raise SystemExit(main())
