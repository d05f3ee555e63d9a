"""Files in and out: an upload's body streamed from a path, bytes or an open file (never read
into memory whole), and an artefact streamed to a temporary file, checked against its size and
sha256, then renamed into place."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx

from mpq_client.errors import DownloadCorrupt, MpqConnectionError
from mpq_client.types import Artifact

__all__ = ["CHUNK_BYTES", "Body", "UploadSource", "save_stream", "upload_body"]

CHUNK_BYTES = 1024 * 1024

# A path (str or os.PathLike), the bytes themselves, or a file opened in binary mode.
UploadSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
Body = bytes | Iterator[bytes]


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while data := f.read(CHUNK_BYTES):
        yield data


def _remaining(f: BinaryIO) -> int | None:
    """Bytes left from the file's position to its end; None when it cannot seek."""
    try:
        here = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
    return end - here


@contextlib.contextmanager
def upload_body(
    source: UploadSource, filename: str | None
) -> Iterator[tuple[Body, dict[str, str], str | None]]:
    """The request body, its headers (``Content-Length`` when the size is known, so the server
    can refuse an oversized file before it is sent) and the file name to send (``filename``,
    else the path's or the open file's name)."""
    headers = {"Content-Type": "application/octet-stream"}
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source), headers, filename
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        with path.open("rb") as f:
            headers["Content-Length"] = str(os.fstat(f.fileno()).st_size)
            yield _chunks(f), headers, filename or path.name
    elif hasattr(source, "read"):
        size = _remaining(source)
        if size is not None:
            headers["Content-Length"] = str(size)
        name = getattr(source, "name", None)
        default = os.path.basename(name) if isinstance(name, str) else None
        yield _chunks(source), headers, filename or default
    else:
        raise TypeError(f"upload a path, bytes or a binary file, not {type(source).__name__}")


def save_stream(response: httpx.Response, artifact: Artifact, target: Path) -> Path:
    """Write the streamed ``response`` to ``target`` through a temporary file in the same
    folder, renamed into place only once its size and sha256 match ``artifact``.

    Raises:
        DownloadCorrupt: the bytes differ from what the artifact list says.
        MpqConnectionError: the connection broke mid-download.
    """
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
    # O_EXCL: never write through a file or link already there; 0o666: the umask decides, as
    # for any file the user writes (mkstemp would leave it readable by the owner only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            try:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            except httpx.TransportError as exc:
                raise MpqConnectionError(f"download of {artifact.name}: {exc!r}") from exc
        if (size, digest.hexdigest()) != (artifact.size, artifact.sha256):
            raise DownloadCorrupt(
                f"{artifact.name}: got {size} B with sha256 {digest.hexdigest()}, expected "
                f"{artifact.size} B with sha256 {artifact.sha256}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        response.close()
    return target
