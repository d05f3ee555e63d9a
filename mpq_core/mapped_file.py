"""A model file mapped read-only into memory, so intake's checks and hash read it without a
copy of the whole file on the heap.

Reading an upload into ``bytes`` and then letting torch build the weights from those bytes held
the file twice at the peak of loading (4 GiB for a 2 GiB bfloat16 1B decoder). Mapped, the
checks read only the pages they touch; once the mapping is closed its pages are no longer this
process's, and torch reads the weights from the file itself, once.
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["Buffer", "MappedFile", "as_file", "mapped"]


class MappedFile(mmap.mmap):
    """A read-only mapping that also passes for a seekable binary file (``zipfile`` asks)."""

    def seekable(self) -> bool:
        return True


Buffer = bytes | MappedFile


@contextmanager
def mapped(path: str | Path) -> Iterator[Buffer]:
    """The file's content, mapped read-only for the ``with`` block (an empty file is ``b""``:
    an empty mapping is refused by the system)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        view = MappedFile(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield view
    finally:
        view.close()


def as_file(data: Buffer) -> BinaryIO:
    """A binary file reading ``data`` from its start, without copying it."""
    if isinstance(data, MappedFile):
        data.seek(0)
        return data  # type: ignore[return-value]  # read/seek/tell/seekable are all zipfile uses
    return io.BytesIO(data)  # shares the bytes object's buffer until written to
