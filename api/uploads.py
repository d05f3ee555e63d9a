"""Streamed uploads: hash, size-limit and store a request body without holding it in memory,
plus cheap container sniffing of its first bytes.

:func:`receive_upload` pipes the incoming async chunks to :meth:`Storage.put_stream`, which runs
in a worker thread (so disk and network writes never block the event loop), through a small
bounded queue: memory stays at a few MiB whatever the body size, the sha256 is computed on the
way, and the moment the size limit is crossed it stops reading, aborts the storage write (no
object is left behind) and raises :class:`UploadTooLarge`.

The sniffers look at the container only, from the first few KiB (:data:`HEAD_BYTES`). A zip's
central directory sits at its *end*, so sniffing from the head is best effort: it reads the local
file headers that happen to be visible. It refuses what is clearly wrong (a torch.save pickle, a
.npy, an unknown file) at upload time; the worker loads the complete file with
``mpq_core.intake.detect_format`` / ``mpq_core.data.load_data`` and does the real validation
(truncated archives, frozen TorchScript, missing arrays, ...). Error codes match those modules.

This module never imports torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import re
import struct
import threading
from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from mpq_core.errors import DataError, ModelFormatError, MpqError
from mpq_service.storage import Storage

__all__ = [
    "HEAD_BYTES",
    "UploadResult",
    "UploadTooLarge",
    "receive_upload",
    "sniff_data_format",
    "sniff_model_format",
]

HEAD_BYTES = 4096

# Writer threads of uploads in progress. Not the loop's default executor: a writer thread waits
# on its client for as long as the upload lasts, and a few slow clients must not starve the
# default executor (asyncio.to_thread and friends). Uploads past this many at once wait.
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


class _Aborted(Exception):
    """Raised inside the storage writer's iterator to make it abandon the write."""


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
    The writer runs in ``executor`` (default: a pool of 64 threads kept for uploads).

    Raises:
        UploadTooLarge: more than ``max_bytes`` arrived; raised as soon as the chunk crossing the
            limit is received (nothing after it is read) and after the storage write was
            abandoned, so nothing is left under ``key``.
        Exception: whatever the stream or the storage raised; nothing is left under ``key``.
    """
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=max(1, queue_depth))
    abort = threading.Event()

    def take() -> bytes | None:  # runs in the writer thread
        fut = asyncio.run_coroutine_threadsafe(queue.get(), loop)
        while True:
            try:
                return fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if abort.is_set():
                    fut.cancel()
                    raise _Aborted from None

    def batches() -> Iterator[bytes]:  # runs in the writer thread
        while True:
            item = take()
            if abort.is_set():
                raise _Aborted
            if item is None:
                return
            yield item

    writer: asyncio.Future[int] = loop.run_in_executor(
        executor or _UPLOAD_THREADS, storage.put_stream, key, batches()
    )

    async def send(item: bytes | None) -> None:
        if writer.done():  # the storage write failed early: surface its error
            await writer
            raise RuntimeError("the storage writer stopped before the upload ended")
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        put: asyncio.Future[None] = asyncio.ensure_future(queue.put(item))
        waiting: set[asyncio.Future[Any]] = {put, writer}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        if not put.done() or put.cancelled():
            await writer
            raise RuntimeError("the storage writer stopped before the upload ended")

    hasher = hashlib.sha256()
    size = 0
    head = bytearray()
    pending = bytearray()
    try:
        async for chunk in stream:
            if not chunk:
                continue
            size += len(chunk)
            if size > max_bytes:
                raise UploadTooLarge(max_bytes)
            hasher.update(chunk)
            if len(head) < head_bytes:
                head += chunk[: head_bytes - len(head)]
            pending += chunk
            if len(pending) >= batch_bytes:
                await send(bytes(pending))
                pending.clear()
        if pending:
            await send(bytes(pending))
            pending.clear()
        await send(None)
        stored = await writer
    except BaseException:
        abort.set()
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(None)  # wake a writer waiting on an empty queue
        # Wait for the writer to abandon its write (temp file removed, multipart aborted).
        with contextlib.suppress(BaseException):
            await asyncio.shield(writer)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        raise
    if stored != size:  # pragma: no cover - a broken backend
        storage.delete(key)
        raise RuntimeError(f"storage stored {stored} bytes of an upload of {size}")
    return UploadResult(size=size, sha256=hasher.hexdigest(), head=bytes(head))


# --- container sniffing ---------------------------------------------------------------------

_LFH = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LFH_SIG = b"PK\x03\x04"
_NAME_OK = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True)
class _Entry:
    name: str
    method: int  # 0 stored, 8 deflated
    data_offset: int  # offset of the entry's data in the file


def _zip_entries(head: bytes) -> list[_Entry]:
    """Local file headers visible in ``head``, the first one at offset 0.

    torch's zip writer sets the data-descriptor flag (sizes follow the data), so the next header
    cannot be found by skipping; every plausible ``PK\\x03\\x04`` is parsed instead and kept only
    if its name is printable ASCII of sane length (tensor bytes rarely fake that).
    """
    entries: list[_Entry] = []
    off = 0
    while off >= 0 and off + _LFH.size <= len(head):
        fields = _LFH.unpack_from(head, off)
        nlen, xlen = fields[9], fields[10]
        raw = head[off + _LFH.size : off + _LFH.size + nlen]
        name = raw.decode("ascii", "replace")
        if 0 < nlen <= 512 and len(raw) == nlen and _NAME_OK.fullmatch(name):
            entries.append(_Entry(name, fields[3], off + _LFH.size + nlen + xlen))
            start = off + _LFH.size + nlen
        elif off == 0:
            return []
        else:
            start = off + 4
        off = head.find(_LFH_SIG, start)
    return entries


def _relative(name: str) -> str:
    # torch archives put every entry under one top folder ("archive/", or the file's stem).
    return name.split("/", 1)[1] if "/" in name else name


_EXPORT_PREFIXES = ("models/", "data/weights/", "data/constants/", "data/sample_inputs/")
_PICKLE_ENTRIES = {"byteorder", ".format_version", ".storage_alignment"}
_PICKLE_MESSAGE = (
    "this is a pickled nn.Module or state_dict (torch.save); mpq never unpickles uploads because "
    "loading them runs arbitrary code. Export the model instead: "
    "torch.jit.save(torch.jit.script(model), 'model.pt') or "
    "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"
)
_FORMAT_MESSAGE = (
    "not a TorchScript archive or torch.export program; save the model with "
    "torch.jit.save(torch.jit.script(model), 'model.pt') or "
    "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"
)


def sniff_model_format(head: bytes) -> Literal["torchscript", "export"]:
    """Tell a TorchScript archive from a torch.export program by the first bytes of the file.

    Best effort (see the module docstring): an archive accepted here may still be refused by
    the worker (truncated, frozen, corrupt).

    Raises:
        ModelFormatError: code ``model_pickle`` for torch.save files (zip or legacy pickle),
            ``model_format`` for anything else that is not one of the two formats.
    """
    if not head:
        raise ModelFormatError("the model file is empty", code="model_format")
    if head[:4] != _LFH_SIG:
        if head[:1] == b"\x80":  # pickle PROTO opcode: torch.save's legacy format
            raise ModelFormatError(_PICKLE_MESSAGE, code="model_pickle")
        raise ModelFormatError(_FORMAT_MESSAGE, code="model_format")
    entries = _zip_entries(head)
    if not entries:
        raise ModelFormatError(
            "the model file starts like a zip archive but its first entry is corrupt; "
            + _FORMAT_MESSAGE,
            code="model_format",
        )
    rel = [_relative(e.name) for e in entries]
    if any(
        r in ("archive_format", "archive_version") or r.startswith(_EXPORT_PREFIXES) for r in rel
    ):
        return "export"
    if any(r.startswith("code/") or r == "constants.pkl" for r in rel):
        return "torchscript"
    if rel[0] == "data.pkl" or any(r in _PICKLE_ENTRIES for r in rel):
        # torch.save writes data.pkl first; TorchScript writes its tensors first. A TorchScript
        # archive without tensors starts with data.pkl too, but its pickle names __torch__ classes.
        first = entries[0]
        if first.method == 0 and b"__torch__" in head[first.data_offset :]:
            return "torchscript"
        raise ModelFormatError(_PICKLE_MESSAGE, code="model_pickle")
    if re.fullmatch(r"data/\d+", rel[0]):  # TorchScript's first entries are its tensors
        return "torchscript"
    if all(e.name.endswith(".npy") for e in entries):
        raise ModelFormatError(
            "this looks like an .npz data file, not a model; upload it as a dataset. "
            + _FORMAT_MESSAGE,
            code="model_format",
        )
    raise ModelFormatError(
        "a zip file that is neither a TorchScript archive nor a torch.export program",
        code="model_format",
    )


_NPY_MAGIC = b"\x93NUMPY"
_OBJECT_DESCR = re.compile(r"'\|?O'")
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit
_DATA_MESSAGE = (
    "data must be a .npz (np.savez) or .safetensors file holding 'input' (or 'input_0', "
    "'input_1', ...) and optional 'labels'"
)


def _npy_header(data: bytes) -> str | None:
    """The dict text of a .npy header at the start of ``data``, if all of it is there."""
    if data[:6] != _NPY_MAGIC or len(data) < 10:
        return None
    if data[6] == 1:
        (hlen,) = struct.unpack_from("<H", data, 8)
        start = 10
    elif len(data) >= 12:
        (hlen,) = struct.unpack_from("<I", data, 8)
        start = 12
    else:
        return None
    text = data[start : start + hlen]
    return text.decode("latin-1") if len(text) == hlen else None


def sniff_data_format(head: bytes, size: int | None = None) -> Literal["npz", "safetensors"]:
    """Tell an ``.npz`` from a ``.safetensors`` file by its first bytes (``size``: the whole
    file's size, when known, to check the safetensors header length against).

    Best effort (see the module docstring): the worker checks the arrays themselves.

    Raises:
        DataError: code ``data_pickle`` when the first .npz array visibly needs pickle (object
            dtype), ``data_format`` for anything that is neither format.
    """
    if not head:
        raise DataError("the data file is empty", code="data_format")
    if head[:4] == _LFH_SIG:
        entries = _zip_entries(head)
        if not entries:
            raise DataError("the .npz file is corrupt: bad first zip entry", code="data_format")
        first = entries[0]
        if not first.name.endswith(".npy"):
            hint = ""
            if any(_relative(e.name) in ("data.pkl", "constants.pkl") for e in entries) or any(
                _relative(e.name).startswith(("data/", "code/", "models/")) for e in entries
            ):
                hint = "this looks like a model archive, not data; upload it as a model. "
            raise DataError(
                f"{hint}a zip file that is not an .npz (no .npy arrays); {_DATA_MESSAGE}",
                code="data_format",
            )
        if first.method == 0:
            header = _npy_header(head[first.data_offset :])
            if header is not None and _OBJECT_DESCR.search(header):
                raise DataError(
                    f"the .npz holds arrays that need pickle to load ({first.name[:-4]!r} has "
                    "dtype object); store plain numeric arrays",
                    code="data_pickle",
                )
        return "npz"
    if head[:6] == _NPY_MAGIC:
        raise DataError(
            "this is a single .npy array; save a .npz with np.savez('data.npz', input=x, labels=y)",
            code="data_format",
        )
    if len(head) >= 10:
        (hlen,) = struct.unpack_from("<Q", head, 0)
        fits = size is None or hlen <= size - 8
        if head[8:9] == b"{" and 0 < hlen <= _SAFETENSORS_MAX_HEADER and fits:
            return "safetensors"
    if head[:1] == b"\x80":
        raise DataError(
            "this is a pickle (torch.save or pickle.dump); mpq never unpickles uploads. "
            + _DATA_MESSAGE,
            code="data_format",
        )
    raise DataError(_DATA_MESSAGE, code="data_format")
