"""Agent configuration: defaults < ``agent.ini`` < ``OTEL_*`` environment < command-line flags.

Every option is declared once in :data:`OPTIONS` with its INI section/key, its standard
OpenTelemetry environment variable where one exists, and a parser; a bad value is refused with
the file, line and reason (exit status 2 in the CLI) instead of surfacing later as a crash.

Split by concern: :mod:`.values` (what a setting's text may say), :mod:`.options` (the
settings and the checks across them), :mod:`.loading` (the sources, in their order).
"""

from spoe_agent.config.loading import load_config, load_env, load_ini
from spoe_agent.config.options import OPTIONS, AgentConfig, Option
from spoe_agent.config.values import (
    DEFAULT_JAEGER_COLLECTOR,
    EXPORTERS,
    HTTP_TOKEN,
    JAEGER_COLLECTOR_PATH,
    JAEGER_PROTOCOLS,
    OTLP_DEFAULT_ENDPOINT,
    OTLP_PROTOCOLS,
    PROPAGATORS,
    SAMPLERS,
    SMALL_FRAME_SIZE,
    WORKERS_MAX,
    ConfigError,
    bind_text,
    ignored_unix_options,
    jaeger_collector_hint,
    parse_bind,
    parse_busy_poll,
    parse_duration,
    parse_metrics_bind,
    parse_size,
    parse_unix_mode,
    parse_workers,
    shown_url,
    split_bind,
    usable_cores,
)

__all__ = [
    "DEFAULT_JAEGER_COLLECTOR", "EXPORTERS", "HTTP_TOKEN", "JAEGER_COLLECTOR_PATH",
    "JAEGER_PROTOCOLS", "OPTIONS", "OTLP_DEFAULT_ENDPOINT", "OTLP_PROTOCOLS", "PROPAGATORS",
    "SAMPLERS", "SMALL_FRAME_SIZE", "WORKERS_MAX", "AgentConfig", "ConfigError", "Option",
    "bind_text", "ignored_unix_options", "jaeger_collector_hint", "load_config", "load_env",
    "load_ini", "parse_bind", "parse_busy_poll", "parse_duration", "parse_metrics_bind",
    "parse_size", "parse_unix_mode", "parse_workers", "shown_url", "split_bind", "usable_cores",
]
