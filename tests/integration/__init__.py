"""Tests that drive the agent through a real HAProxy (2.6 from Debian, 3.2 from sid)."""
