"""Streamed uploads: hash, size-limit and store a request body without holding it in memory.

:func:`receive_upload` pipes the incoming async chunks to :meth:`Storage.put_stream`, which runs
in a worker thread (so disk and network writes never block the event loop), through a small
bounded queue: memory stays at a few MiB whatever the body size, the sha256 is computed on the
way, and the moment the size limit is crossed it stops reading, aborts the storage write (no
object is left behind) and raises :class:`UploadTooLarge`. It keeps the first
:data:`HEAD_BYTES` bytes for :mod:`api.sniffing`.

This module never imports torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass
from typing import Any

from mpq_core.errors import MpqError
from mpq_service.storage import Storage

__all__ = ["HEAD_BYTES", "UploadResult", "UploadTooLarge", "receive_upload"]

HEAD_BYTES = 4096

# Writer threads of uploads in progress. Not the loop's default executor: a writer thread waits
# on its client for as long as the upload lasts, and a few slow clients must not starve the
# default executor (asyncio.to_thread and friends). A writer starts only once a full batch has
# arrived (or the body has ended), so clients that stall early hold none; uploads past this
# many writers at once wait for one.
_UPLOAD_THREADS = concurrent.futures.ThreadPoolExecutor(
    max_workers=64, thread_name_prefix="mpq-upload"
)


class UploadTooLarge(MpqError):
    """The upload exceeded ``limit`` bytes (HTTP 413); nothing was stored."""

    code = "upload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the upload is larger than the limit of {limit} bytes ({limit / 2**20:.1f} MiB)"
        )
        self.limit = limit


@dataclass(frozen=True)
class UploadResult:
    """What was stored: byte count, hex sha256, and the first bytes for format sniffing."""

    size: int
    sha256: str
    head: bytes


class _Received:
    """Size, sha256 and first bytes of what arrived so far."""

    def __init__(self, head_bytes: int) -> None:
        self.size = 0
        self.hasher = hashlib.sha256()
        self.head = bytearray()
        self._head_bytes = head_bytes

    def add(self, chunk: bytes, max_bytes: int) -> None:
        """Count ``chunk`` in; :class:`UploadTooLarge` once more than ``max_bytes`` arrived."""
        self.size += len(chunk)
        if self.size > max_bytes:
            raise UploadTooLarge(max_bytes)
        self.hasher.update(chunk)
        if len(self.head) < self._head_bytes:
            self.head += chunk[: self._head_bytes - len(self.head)]


class _Aborted(Exception):
    """Raised inside the storage writer's iterator to make it abandon the write."""


class _StorageWriter:
    """``storage.put_stream(key, ...)`` running in ``executor``, fed batches from the event loop
    through a queue of ``queue_depth`` batches."""

    def __init__(
        self,
        storage: Storage,
        key: str,
        queue_depth: int,
        executor: concurrent.futures.Executor | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=max(1, queue_depth))
        self._abort = threading.Event()
        self._done: asyncio.Future[int] = self._loop.run_in_executor(
            executor or _UPLOAD_THREADS, storage.put_stream, key, self._batches()
        )

    def _take(self) -> bytes | None:  # runs in the writer thread
        fut = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop)
        while True:
            try:
                return fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if self._abort.is_set():
                    fut.cancel()
                    raise _Aborted from None

    def _batches(self) -> Iterator[bytes]:  # runs in the writer thread
        while True:
            item = self._take()
            if self._abort.is_set():
                raise _Aborted
            if item is None:
                return
            yield item

    async def send(self, item: bytes | None) -> None:
        """Queue a batch (None: the end), waiting while the queue is full; raises the storage's
        error if the write stopped early."""
        writer = self._done
        if writer.done():  # the storage write failed early: surface its error
            await writer
            raise RuntimeError("the storage writer stopped before the upload ended")
        try:
            self._queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        put: asyncio.Future[None] = asyncio.ensure_future(self._queue.put(item))
        waiting: set[asyncio.Future[Any]] = {put, writer}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        if not put.done() or put.cancelled():
            await writer
            raise RuntimeError("the storage writer stopped before the upload ended")

    async def finish(self) -> int:
        """End the write; the number of bytes the storage stored."""
        await self.send(None)
        return await self._done

    async def abandon(self) -> None:
        """Make the writer abandon its write and wait until it has (temp file removed, multipart
        upload aborted), so nothing is left under the key."""
        self._abort.set()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)  # wake a writer waiting on an empty queue
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._done)


async def receive_upload(
    stream: AsyncIterable[bytes],
    storage: Storage,
    key: str,
    max_bytes: int,
    *,
    head_bytes: int = HEAD_BYTES,
    batch_bytes: int = 1024 * 1024,
    queue_depth: int = 4,
    executor: concurrent.futures.Executor | None = None,
) -> UploadResult:
    """Stream ``stream`` into ``storage`` under ``key``, hashing it on the way.

    Chunks are coalesced into ``batch_bytes`` batches and handed to ``storage.put_stream`` in a
    worker thread through a queue of ``queue_depth`` batches, so at most about
    ``(queue_depth + 2) * batch_bytes`` plus the backend's own buffer (one S3 part) is in memory.
    The writer runs in ``executor`` (default: a pool of 64 threads kept for uploads); it starts
    with the first full batch, or at the end of a body smaller than one batch.

    Raises:
        UploadTooLarge: more than ``max_bytes`` arrived; raised as soon as the chunk crossing the
            limit is received (nothing after it is read) and after the storage write was
            abandoned, so nothing is left under ``key``.
        Exception: whatever the stream or the storage raised; nothing is left under ``key``.
    """
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    state = _Received(head_bytes)
    writer: _StorageWriter | None = None
    pending = bytearray()
    try:
        async for chunk in stream:
            state.add(chunk, max_bytes)
            pending += chunk
            if len(pending) >= batch_bytes:
                # The writer thread starts with the first full batch, not with the request:
                # a client that stalls before sending a batch holds no thread.
                writer = writer or _StorageWriter(storage, key, queue_depth, executor)
                await writer.send(bytes(pending))
                pending.clear()
        writer = writer or _StorageWriter(storage, key, queue_depth, executor)
        if pending:
            await writer.send(bytes(pending))
            pending.clear()
        stored = await writer.finish()
    except BaseException:
        if writer is not None:
            await writer.abandon()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        raise
    size = state.size
    if stored != size:  # pragma: no cover - a broken backend
        storage.delete(key)
        raise RuntimeError(f"storage stored {stored} bytes of an upload of {size}")
    return UploadResult(size=size, sha256=state.hasher.hexdigest(), head=bytes(state.head))
