"""Conditional and ranged downloads (RFC 9110): ``ETag``, ``If-None-Match``, ``Range`` with
one byte range, ``If-Range``.

Artifacts never change once stored, and their sha256 is known, so the strong ETag is the quoted
sha256. Only single ranges are served; a request for several, or a ``Range`` header that does
not parse, gets the whole file (a server may ignore ``Range``). A range that starts past the end
is ``416`` with ``Content-Range: bytes */SIZE``.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from starlette.datastructures import Headers

from api.errors import ApiError

__all__ = ["ByteRange", "etag_of", "not_modified", "repr_digest", "requested_range"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class ByteRange:
    """The bytes ``start`` to ``end`` inclusive, as ``Content-Range`` writes them."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def etag_of(sha256_hex: str) -> str:
    """The strong entity tag of a file with this sha256."""
    return f'"{sha256_hex}"'


def repr_digest(sha256_hex: str) -> str:
    """``Repr-Digest`` (RFC 9530) of the whole file: its sha256, base64 between colons."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


def _tags(header: str) -> list[str]:
    return [t.strip().removeprefix("W/") for t in header.split(",") if t.strip()]


def not_modified(headers: Headers, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (or ``*``): the client's copy is current."""
    header = headers.get("if-none-match")
    return header is not None and (header.strip() == "*" or etag in _tags(header))


def _unsatisfiable(size: int) -> ApiError:
    return ApiError(
        416,
        "range_not_satisfiable",
        f"the requested range starts past the end of the file ({size} bytes)",
        {"Content-Range": f"bytes */{size}"},
    )


def requested_range(headers: Headers, size: int, etag: str) -> ByteRange | None:
    """The one byte range to send, or None for the whole file.

    Raises:
        ApiError: 416 ``range_not_satisfiable`` when the range starts past the end.
    """
    header = headers.get("range")
    if header is None:
        return None
    if_range = headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        return None  # the client's partial copy is of another file: send it all
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:  # a suffix: the last N bytes
        if not last:
            return None  # "bytes=-" is not a range: ignored
        if int(last) == 0 or size == 0:
            raise _unsatisfiable(size)
        return ByteRange(max(size - int(last), 0), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # not a valid range: ignored
    if start >= size:
        raise _unsatisfiable(size)
    return ByteRange(start, min(int(last), size - 1) if last else size - 1)
