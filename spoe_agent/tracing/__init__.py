"""HAProxy stream events as OpenTelemetry traces: the span language, sessions, propagation."""
