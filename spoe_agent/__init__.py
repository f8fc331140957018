"""spoe-agent: an HAProxy SPOE agent that turns stream events into OpenTelemetry traces."""

__version__ = "0.1.0"
