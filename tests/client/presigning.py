"""A deployment whose storage presigns downloads, in front of a real ``mpq serve``: two tiny
HTTP servers.

- ``front`` is the service's origin as the client sees it: it forwards every GET to the real
  service, except an artefact download, which it answers with a 307 to ``storage``, as the API
  does when its storage backend presigns URLs.
- ``storage`` is another host (``localhost`` and a port of its own, where the client talks to
  ``127.0.0.1``): it serves the artefact's bytes (read from the service with a key of its own;
  ``tamper`` flips the last byte) and records the headers of every request it gets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx

from tests.client.httpd import QuietHandler, serving

__all__ = ["Presigning", "presigning"]

_DOWNLOAD = re.compile(r"^/v1/jobs/[^/]+/artifacts/[^/]+$")


class _Host(ThreadingHTTPServer):
    """One recording server: what it forwards to and the headers of every request it got."""

    def __init__(self, upstream: str, key_headers: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.key_headers = key_headers  # the storage's own credentials towards the service
        self.seen: list[dict[str, str]] = []  # the headers of each request
        self.paths: list[str] = []  # the path and query of each request
        self.redirect_to: str | None = None  # set on the front: the storage's base URL
        self.tamper = False

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(QuietHandler):
    server: _Host

    def do_GET(self) -> None:
        host = self.server
        host.seen.append({k.lower(): v for k, v in self.headers.items()})
        host.paths.append(self.path)
        path = urlsplit(self.path).path
        if host.redirect_to is not None and _DOWNLOAD.match(path):
            self.reply(307, b"", {"Location": f"{host.redirect_to}{path}?X-Signature=abc"})
            return
        # The front forwards the caller's own key; the storage uses its own credentials.
        headers = dict(host.key_headers)
        if host.redirect_to is not None and "authorization" in host.seen[-1]:
            headers = {"Authorization": host.seen[-1]["authorization"]}
        upstream = httpx.get(host.upstream + self.path, headers=headers, timeout=30)
        body = upstream.content
        if host.tamper and body:
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        ctype = upstream.headers.get("content-type", "application/octet-stream")
        self.reply(upstream.status_code, body, {"Content-Type": ctype})


@dataclass
class Presigning:
    front: _Host
    storage: _Host

    @property
    def url(self) -> str:
        """The base URL clients use: the front's."""
        return f"http://127.0.0.1:{self.front.port}"


@contextmanager
def presigning(service_url: str, storage_key: str) -> Iterator[Presigning]:
    """The two servers in front of the service at ``service_url``, until the block ends."""
    storage = _Host(service_url, {"Authorization": f"Bearer {storage_key}"})
    front = _Host(service_url, {})
    front.redirect_to = f"http://localhost:{storage.port}"
    with serving(front, storage):
        yield Presigning(front, storage)
