"""Shared helpers for the tests: child processes and real HAProxy instances."""
