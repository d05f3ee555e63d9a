"""Ports on the loopback interface."""

from __future__ import annotations

import socket

__all__ = ["free_port", "port_free"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a race with other processes is
    possible: callers that start a server on it retry, or fail with the server's log)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
