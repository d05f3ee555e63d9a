"""Object storage behind one small interface: local disk (the embedded default) and S3.

Keys are relative, ``/``-separated names such as ``models/<id>/model.pt``. Both backends validate
them the same way (:func:`validate_key`), so a key that works on disk also works on S3.

Writes are all-or-nothing: a write that fails or is abandoned part way (the upload got too large,
the client went away, the iterator raised) leaves no object and no partial file behind, and an
object already stored under the key is only replaced once the new one is complete. Local disk
writes a temporary file and ``os.replace``-s it into place; S3 uses a multipart upload that is
aborted on failure (small bodies go in one ``PutObject``).

Outages: every S3 request is retried by botocore's "standard" mode (exponential backoff with
jitter, ``max_attempts`` attempts in all) on transient errors (connection refused or reset,
time-outs, 5xx, throttling); what still fails is raised as :class:`StorageUnavailable`, which the
API answers with 503 ``storage_unavailable``. Local disk raises it for a full or failing disk.
A multipart upload that fails or is abandoned is aborted on the server, retried too.

Downloads: :meth:`Storage.download_url` gives a presigned GET URL for S3 (the API answers 307 to
it) and ``None`` for local disk (the API streams the file itself, see :meth:`Storage.open_read`).

This module never imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import tempfile
import unicodedata
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast
from urllib.parse import quote

__all__ = [
    "ARTIFACT_CONTENT_TYPES",
    "DEFAULT_CHUNK",
    "LocalStorage",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageSettings",
    "StorageUnavailable",
    "artifact_content_type",
    "content_disposition",
    "make_storage",
    "validate_key",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024 * 1024  # 1 MiB
DEFAULT_S3_MAX_ATTEMPTS = 5  # botocore's attempts per request, the first included
_MAX_KEY_BYTES = 1024  # S3's limit on key length
_LOCAL_TMP = ".tmp"  # reserved first key segment: LocalStorage's temporary files live there


class ObjectNotFound(FileNotFoundError):
    """No object is stored under ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object stored under {key!r}")
        self.key = key


class StorageUnavailable(RuntimeError):
    """The storage cannot be reached or is failing (after the retries); try again later.

    The message says which operation failed and why; the original error is the ``__cause__``.
    """


# Local disk errors that are the disk's state, not the caller's key: a full disk, a failing one,
# a read-only remount. Anything else (a bad path, a permission) stays the error it is.
_LOCAL_OUTAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


@contextlib.contextmanager
def _local_outage(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in _LOCAL_OUTAGE_ERRNOS:
            raise StorageUnavailable(f"local storage cannot {what}: {exc.strerror}") from exc
        raise


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError.

    Refused: empty keys, absolute paths, backslashes, NUL and other control characters, empty,
    ``.`` or ``..`` segments (so no path traversal on disk and no surprises on S3), keys over
    1024 bytes, and the reserved first segment ``.tmp``.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("an object key must be a non-empty string")
    if key.startswith("/") or (len(key) > 1 and key[0].isalpha() and key[1] == ":"):
        raise ValueError(f"object key {key!r} must be relative, not an absolute path")
    if "\\" in key:
        raise ValueError(f"object key {key!r} must not contain backslashes")
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise ValueError(f"object key {key!r} must not contain control characters")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object key {key!r} must not contain empty, '.' or '..' segments")
    if parts[0] == _LOCAL_TMP:
        raise ValueError(f"object keys must not start with the reserved segment {_LOCAL_TMP!r}")
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise ValueError(f"object key is longer than {_MAX_KEY_BYTES} bytes")
    return key


# The types of a job's output files, by suffix; anything else is application/octet-stream. Every
# download is an attachment (content_disposition), so an SVG, whose text holds the user's layer
# names, is never rendered from the API's origin.
ARTIFACT_CONTENT_TYPES = {".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png"}
_OCTETS = "application/octet-stream"


def artifact_content_type(name: str) -> str:
    """The content type an artifact named ``name`` is stored and served with."""
    return ARTIFACT_CONTENT_TYPES.get(Path(name).suffix, _OCTETS)


def content_disposition(filename: str) -> str:
    """A ``Content-Disposition: attachment`` value for ``filename`` (RFC 6266 / RFC 5987).

    An ASCII fallback (quotes, backslashes, control characters and non-ASCII replaced by ``_``)
    plus ``filename*`` carrying the exact UTF-8 name for clients that understand it.
    """
    name = filename.replace("/", "_").replace("\\", "_") or "download"
    fallback = "".join(
        c if 32 <= ord(c) < 127 and c not in '"\\' else "_"
        for c in unicodedata.normalize("NFKD", name)
        if not unicodedata.combining(c)
    )
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value


def _iter_source(source: Iterable[bytes] | IO[bytes], chunk: int) -> Iterator[bytes]:
    """Chunks of a bytes iterable or a binary file object (read ``chunk`` bytes at a time)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        raise TypeError("put_stream takes an iterable of chunks or a file object, not bytes")
    read = getattr(source, "read", None)
    if callable(read):
        while True:
            data = read(chunk)
            if not data:
                return
            yield data
    else:
        yield from cast(Iterable[bytes], source)


class Storage(ABC):
    """Where uploads and artifacts live. Keys: see :func:`validate_key`."""

    @abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes] | IO[bytes]) -> int:
        """Store the bytes of ``chunks`` (an iterable of bytes, or a binary file object read to
        its end) under ``key``, replacing any object there; return the number of bytes stored.

        All or nothing: if the iterable or the backend raises, nothing is left behind under
        ``key`` (an earlier object stays as it was) and the exception propagates.
        """

    def put_file(self, key: str, path: str | os.PathLike[str]) -> int:
        """Store the file at ``path`` under ``key``; return its size."""
        with open(path, "rb") as f:
            return self.put_stream(key, f)

    def put_bytes(self, key: str, data: bytes) -> int:
        """Store a small in-memory body (JSON documents and the like)."""
        return self.put_stream(key, [data])

    @abstractmethod
    def open_read(self, key: str, offset: int = 0) -> BinaryIO:
        """A binary file object streaming the object's bytes from ``offset`` on (a ranged
        download); close it when done.

        Raises:
            ObjectNotFound: nothing is stored under ``key``.
        """

    def iter_chunks(self, key: str, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks of at most ``chunk`` bytes (opens on the first ``next``).

        Raises:
            ObjectNotFound: nothing is stored under ``key``.
        """
        with self.open_read(key) as f:
            while data := f.read(chunk):
                yield data

    def read_bytes(self, key: str) -> bytes:
        """The whole object in memory: only for small objects (JSON documents)."""
        with self.open_read(key) as f:
            return f.read()

    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> int:
        """Download the object to ``dest_path`` (written atomically); return its size.

        Raises:
            ObjectNotFound: nothing is stored under ``key``.
        """
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.open_read(key) as src, _atomic_file(dest) as out:
            shutil.copyfileobj(src, out, DEFAULT_CHUNK)
        return dest.stat().st_size

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object under ``key``; deleting a missing object is not an error."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes.

        Raises:
            ObjectNotFound: nothing is stored under ``key``.
        """

    @abstractmethod
    def download_url(self, key: str, filename: str, expires_s: int = 3600) -> str | None:
        """A URL a client can GET the object from for ``expires_s`` seconds, saved as
        ``filename``; ``None`` when the backend has none (the API streams the bytes itself).
        """

    def ensure_ready(self) -> None:
        """Create what the backend needs (directory, bucket); idempotent. Raises if unreachable."""
        return None


@contextlib.contextmanager
def _atomic_file(dest: Path, tmp_dir: Path | None = None) -> Iterator[IO[bytes]]:
    """A temporary file (in ``tmp_dir``, default beside ``dest``) moved onto ``dest`` on success
    and deleted on failure."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class LocalStorage(Storage):
    """Objects as files under ``root``; ``root/.tmp`` holds writes in progress."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._tmp = self.root / _LOCAL_TMP

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def ensure_ready(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file holding ``key`` (it may not exist); for the API's file responses."""
        validate_key(key)
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"object key {key!r} escapes the storage root")
        return path

    def put_stream(self, key: str, chunks: Iterable[bytes] | IO[bytes]) -> int:
        dest = self.path(key)
        self.ensure_ready()
        dest.parent.mkdir(parents=True, exist_ok=True)
        total = 0
        with _local_outage(f"store {key!r}"), _atomic_file(dest, self._tmp) as out:
            for data in _iter_source(chunks, DEFAULT_CHUNK):
                out.write(data)
                total += len(data)
        return total

    def put_file(self, key: str, path: str | os.PathLike[str]) -> int:
        dest = self.path(key)
        self.ensure_ready()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(path, "rb") as src,
            _local_outage(f"store {key!r}"),
            _atomic_file(dest, self._tmp) as out,
        ):
            shutil.copyfileobj(src, out, DEFAULT_CHUNK)
        return dest.stat().st_size

    def open_read(self, key: str, offset: int = 0) -> BinaryIO:
        path = self.path(key)
        try:
            f = cast(BinaryIO, open(path, "rb"))  # noqa: SIM115 - the caller closes it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        f.seek(offset)
        return f

    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> int:
        src = self.path(key)
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(src, "rb") as f, _atomic_file(dest) as out:
                shutil.copyfileobj(f, out, DEFAULT_CHUNK)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            if not src.is_file():
                raise ObjectNotFound(key) from None
            raise
        return dest.stat().st_size

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.path(key).unlink()

    def size(self, key: str) -> int:
        path = self.path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def download_url(self, key: str, filename: str, expires_s: int = 3600) -> str | None:
        validate_key(key)
        return None


class _BodyReader(io.RawIOBase):
    """A raw, readable file object over a botocore StreamingBody."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._body.read(len(view))
        n = len(data)
        view[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
# Error codes of a server that is overloaded or failing, not of a bad request.
_OUTAGE_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
}


def _is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (from boto3) says the S3 server is unreachable or failing."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return int(status) >= 500 or _error_code(exc) in _OUTAGE_CODES
    return False


@contextlib.contextmanager
def _s3_outage(what: str) -> Iterator[None]:
    """Raise :class:`StorageUnavailable` for an outage (botocore has retried already)."""
    try:
        yield
    except Exception as exc:
        if _is_outage(exc):
            raise StorageUnavailable(f"the S3 storage cannot {what}: {exc}") from exc
        raise


class S3Storage(Storage):
    """Objects in one bucket of an S3-compatible server (AWS, SeaweedFS, MinIO, ...).

    Path-style addressing (``http://host:port/bucket/key``), so a server on localhost or a
    docker-compose service name works without wildcard DNS. Streams are written with a manual
    multipart upload of ``part_size`` parts (one part buffered in memory at a time), aborted on
    any failure; bodies smaller than one part go in a single PutObject.

    ``public_endpoint_url``: where *clients* reach the server, when that differs from where the
    API does (``http://seaweedfs:8333`` inside docker-compose, ``http://localhost:8333`` outside);
    presigned URLs are signed for it. Defaults to ``endpoint_url``.

    ``max_attempts``: tries of each request on transient errors (botocore's standard retry mode);
    what still fails raises :class:`StorageUnavailable`.
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = "us-east-1",
        *,
        public_endpoint_url: str | None = None,
        part_size: int = 8 * 1024 * 1024,
        max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS,
    ) -> None:
        import boto3
        from botocore.config import Config

        if part_size < 5 * 1024 * 1024:
            raise ValueError("S3 multipart parts must be at least 5 MiB")
        self.bucket = bucket
        self.endpoint_url = endpoint_url or None
        self.region = region or "us-east-1"
        self.part_size = part_size
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # Transient errors (refused or reset connections, time-outs, 5xx, throttling) are
            # retried with exponential backoff and jitter, max_attempts tries in all.
            retries={"total_max_attempts": max(1, max_attempts), "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            region_name=self.region,
        )
        self.client: Any = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        public = public_endpoint_url or None
        self._presign_client: Any = (
            session.client("s3", endpoint_url=public, config=config)
            if public and public != self.endpoint_url
            else self.client
        )

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent, safe to race)."""
        with _s3_outage(f"reach the bucket {self.bucket!r}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:
                if _error_code(exc) not in _NOT_FOUND:
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self.client.create_bucket(**kwargs)
            except Exception as exc:
                if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    def ensure_ready(self) -> None:
        self.ensure_bucket()

    def put_stream(self, key: str, chunks: Iterable[bytes] | IO[bytes]) -> int:
        validate_key(key)
        source = _iter_source(chunks, self.part_size)
        upload: list[str] = []  # the multipart upload's id, once one is started
        try:
            with _s3_outage(f"store {key!r}"):
                return self._put_parts(key, source, upload)
        finally:
            if upload:
                self._abort_multipart(key, upload[0])
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _put_parts(self, key: str, source: Iterator[bytes], upload: list[str]) -> int:
        """Store ``source`` under ``key``: one PutObject when it fits a part, else a multipart
        upload whose id is put in ``upload`` while it is in progress (the caller aborts it)."""
        buf = bytearray()
        total = 0
        parts: list[dict[str, Any]] = []
        for data in source:
            buf += data
            total += len(data)
            if len(buf) < self.part_size:
                continue
            if not upload:
                created = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
                upload.append(created["UploadId"])
            # The bytearray itself is the body: no copy of the part is made.
            parts.append(self._upload_part(key, upload[0], len(parts) + 1, buf))
            buf = bytearray()
        if not upload:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=buf)
            return total
        if buf:
            parts.append(self._upload_part(key, upload[0], len(parts) + 1, buf))
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload[0], MultipartUpload={"Parts": parts}
        )
        upload.clear()
        return total

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an unfinished multipart upload, so its parts are not kept on the server."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            # Never hides the write's own error; the bucket's lifecycle rules are the backstop.
            log.warning("could not abort the multipart upload %s of %r: %s", upload_id, key, exc)

    def _upload_part(
        self, key: str, upload_id: str, number: int, body: bytes | bytearray
    ) -> dict[str, Any]:
        resp = self.client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
        return {"ETag": resp["ETag"], "PartNumber": number}

    def _get_object(self, key: str, offset: int = 0) -> dict[str, Any]:
        """The ``get_object`` response for ``key`` from ``offset`` on; ObjectNotFound when
        nothing is there."""
        validate_key(key)
        ranged = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with _s3_outage(f"read {key!r}"):
                resp = self.client.get_object(Bucket=self.bucket, Key=key, **ranged)
        except Exception as exc:
            if _error_code(exc) in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            raise
        return cast("dict[str, Any]", resp)

    def open_read(self, key: str, offset: int = 0) -> BinaryIO:
        resp = self._get_object(key, offset)
        return cast(BinaryIO, io.BufferedReader(_BodyReader(resp["Body"]), DEFAULT_CHUNK))

    def iter_chunks(self, key: str, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        resp = self._get_object(key)
        body = resp["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> int:
        validate_key(key)
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            with _s3_outage(f"read {key!r}"):
                self.client.download_file(self.bucket, key, str(tmp))
            os.replace(tmp, dest)
        except Exception as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if _error_code(exc) in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            raise
        return dest.stat().st_size

    def _head(self, key: str) -> dict[str, Any] | None:
        validate_key(key)
        try:
            with _s3_outage(f"look up {key!r}"):
                return cast(dict[str, Any], self.client.head_object(Bucket=self.bucket, Key=key))
        except Exception as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(key)
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            with _s3_outage(f"delete {key!r}"):
                self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _error_code(exc) not in _NOT_FOUND:
                raise

    def download_url(self, key: str, filename: str, expires_s: int = 3600) -> str | None:
        validate_key(key)
        return cast(
            str,
            self._presign_client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": key,
                    "ResponseContentDisposition": content_disposition(filename),
                },
                ExpiresIn=int(expires_s),
            ),
        )


class StorageSettings(Protocol):
    """The settings :func:`make_storage` reads (``mpq_service.settings.Settings`` has them all).

    Read-only properties, so narrower field types (``Literal``, ``SecretStr``) still match.
    """

    @property
    def storage(self) -> str: ...
    @property
    def data_dir(self) -> Any: ...
    @property
    def s3_endpoint_url(self) -> str | None: ...
    @property
    def s3_bucket(self) -> str | None: ...
    @property
    def s3_access_key(self) -> str | None: ...
    @property
    def s3_secret_key(self) -> Any: ...  # str, pydantic SecretStr or None
    @property
    def s3_region(self) -> str | None: ...


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    get = getattr(value, "get_secret_value", None)
    return str(get()) if callable(get) else str(value)


def make_storage(settings: StorageSettings) -> Storage:
    """The storage the settings name: ``local`` keeps objects under ``<data_dir>/objects``;
    ``s3`` uses ``s3_bucket`` at ``s3_endpoint_url``. Does no I/O: call
    :meth:`Storage.ensure_ready` on start (creates the directory or the bucket).

    Optional attributes, when present: ``s3_public_endpoint_url`` (where presigned URLs point)
    and ``s3_max_attempts`` (tries of each request), see :class:`S3Storage`.
    """
    kind = str(settings.storage).lower()
    if kind == "local":
        return LocalStorage(Path(settings.data_dir) / "objects")
    if kind == "s3":
        if not settings.s3_bucket:
            raise ValueError("storage 's3' needs a bucket (MPQ_S3_BUCKET)")
        return S3Storage(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url or None,
            access_key=settings.s3_access_key or None,
            secret_key=_secret(settings.s3_secret_key),
            region=settings.s3_region or "us-east-1",
            public_endpoint_url=getattr(settings, "s3_public_endpoint_url", None) or None,
            max_attempts=getattr(settings, "s3_max_attempts", DEFAULT_S3_MAX_ATTEMPTS),
        )
    raise ValueError(f"unknown storage {settings.storage!r}; use 'local' or 's3'")
