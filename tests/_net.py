"""Network helpers for tests that start real servers or process groups on the loopback."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port free at the time of the call (another process may still take it before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
