"""Hardening: fuzzing, limits, faults, shutdown, metrics, TLS and hostile input (issue 5)."""
