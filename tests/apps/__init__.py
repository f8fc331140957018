"""Small SPOE applications the integration tests serve through the real agent CLI."""
