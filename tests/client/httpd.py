"""Tiny HTTP servers on the loopback interface, run in a thread for the length of a block: the
hosts a test needs around the real service (another host for a redirect, a server that answers
what the test scripts)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

__all__ = ["QuietHandler", "serving"]

S = TypeVar("S", bound=ThreadingHTTPServer)


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that logs nothing and answers with :meth:`reply`."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serving(*servers: S) -> Iterator[tuple[S, ...]]:
    """Serve each of ``servers`` (bound already) in a thread until the block ends."""
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield servers
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
