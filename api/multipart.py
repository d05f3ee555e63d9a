"""A streaming reader of ``multipart/form-data`` bodies (python-multipart's parser, fed chunk by
chunk as the body arrives), for the multipart form of ``POST /v1/jobs``: no part is spooled to
disk or held whole in memory."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

__all__ = ["FormPart", "MultipartStream"]


class FormPart:
    """One part of a ``multipart/form-data`` body: its field name and file name, if any."""

    __slots__ = ("filename", "name")

    def __init__(self, name: str, filename: str | None) -> None:
        self.name = name
        self.filename = filename


def _malformed(message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"malformed multipart body: {message}")


class MultipartStream:
    """The parts of a ``multipart/form-data`` body, read as the body arrives.

    python-multipart's streaming parser is fed one received chunk at a time; nothing is spooled
    to disk and at most about one chunk of the body is held. Parts must be read in order:
    :meth:`next_part` skips whatever the caller left of the previous part.
    """

    def __init__(self, body: AsyncIterable[bytes], boundary: bytes) -> None:
        self._body = aiter(body)
        self._events: deque[tuple[str, bytes]] = deque()
        self._heads: deque[FormPart] = deque()
        self._headers: dict[str, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._eof = False
        self._in_part = False
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_header_field": self._on_field,
                    "on_header_value": self._on_value,
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_data,
                    "on_part_end": lambda: self._events.append(("end", b"")),
                    "on_end": lambda: self._events.append(("done", b"")),
                },
            )
        except FormParserError as exc:
            raise _malformed(str(exc)) from None

    # parser callbacks (run inside MultipartParser.write)
    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        self._headers = {}
        if disposition != b"form-data" or b"name" not in params:
            raise _malformed("a part without 'Content-Disposition: form-data; name=...'")
        filename = params.get(b"filename")
        self._heads.append(
            FormPart(
                params[b"name"].decode("utf-8", "replace"),
                None if filename is None else filename.decode("utf-8", "replace"),
            )
        )
        self._events.append(("headers", b""))

    def _on_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(("data", data[start:end]))

    async def _next(self) -> tuple[str, bytes]:
        while not self._events:
            if self._eof:
                raise _malformed("the body ended before the closing boundary")
            try:
                chunk = await anext(self._body)
            except StopAsyncIteration:
                self._eof = True
                self._parser.finalize()
                continue
            try:
                self._parser.write(chunk)
            except FormParserError as exc:
                raise _malformed(str(exc)) from None
        return self._events.popleft()

    async def next_part(self) -> FormPart | None:
        """The next part (its data is then read with :meth:`read`), or None after the last."""
        while self._in_part:  # skip what is left of the previous part
            async for _ in self.read():
                pass
        kind, _ = await self._next()
        if kind == "done":
            return None
        if kind != "headers":  # pragma: no cover - the parser's event order
            raise _malformed(f"unexpected {kind!r}")
        self._in_part = True
        return self._heads.popleft()

    async def read(self) -> AsyncIterator[bytes]:
        """The current part's data, chunk by chunk."""
        while self._in_part:
            kind, data = await self._next()
            if kind == "data":
                yield data
            elif kind == "end":
                self._in_part = False
            else:  # pragma: no cover - the parser's event order
                raise _malformed(f"unexpected {kind!r} inside a part")

    async def read_field(self, max_bytes: int, name: str) -> bytes:
        """The current part's data as bytes; 413 ``upload_too_large`` past ``max_bytes``."""
        buf = bytearray()
        async for chunk in self.read():
            buf += chunk
            if len(buf) > max_bytes:
                raise ApiError(
                    413, "upload_too_large", f"the {name!r} part is larger than {max_bytes} bytes"
                )
        return bytes(buf)
