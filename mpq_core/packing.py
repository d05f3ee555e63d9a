"""Dense bit packing of signed integer codes (pure numpy).

A code ``c`` of a ``b``-bit layer lies in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; it is stored as the
unsigned ``b``-bit field ``c + 2^(b-1) - 1`` (so ``0 .. 2^b - 2``). Fields are laid end to end
with no gaps, least significant bit first: bit ``k`` of the stream is bit ``k % 8`` of byte
``k // 8``, and field ``i`` occupies stream bits ``[i*b, (i+1)*b)``. ``n`` codes take exactly
``ceil(n*b / 8)`` bytes; the unused high bits of the last byte are zero.

Unsigned codes (``signed=False``, asymmetric quantization) lie in ``0 .. 2^b - 1`` and are stored
as they are.

Eight consecutive fields span exactly ``b`` bytes, so the work is done on groups of eight codes
held in one little-endian ``uint64``, a bounded chunk of the codes at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]

_MIN_BITS = 2
_MAX_BITS = 8
# Codes handled per step (a multiple of 8): bounds the temporaries to a few tens of MB.
_CHUNK = 1 << 21


def _qmax(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise ValueError(f"bits must be an integer in [{_MIN_BITS}, {_MAX_BITS}], got {bits!r}")
    if not _MIN_BITS <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be in [{_MIN_BITS}, {_MAX_BITS}], got {bits}")
    return 2 ** (int(bits) - 1) - 1


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed: ``ceil(count*bits/8)``."""
    _qmax(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * int(bits) + 7) // 8


def _shifts(bits: int) -> NDArray[np.uint64]:
    return np.arange(8, dtype=np.uint64) * np.uint64(bits)


def pack_codes(codes: ArrayLike, bits: int, *, signed: bool = True) -> NDArray[np.uint8]:
    """Pack signed codes into a dense little-endian bit stream.

    Args:
        codes: integers of any shape (flattened in C order), each in ``[-(2^(b-1)-1), 2^(b-1)-1]``
            (``signed``), else in ``[0, 2^b - 1]``.
        bits: 2..8.
        signed: whether the codes are signed (symmetric) or unsigned (asymmetric).

    Returns:
        ``uint8`` array of ``ceil(codes.size * bits / 8)`` bytes.

    Raises:
        ValueError: ``bits`` outside 2..8, non-integer codes, or a code out of range.

    Example:
        >>> pack_codes(np.array([-1, 0, 1, 1]), 2).tolist()  # fields 0, 1, 2, 2
        [164]
    """
    q = _qmax(bits)
    low, high, offset = (-q, q, q) if signed else (0, 2 * q + 1, 0)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {flat.dtype}")
    n = flat.size
    out = np.zeros(packed_nbytes(n, bits), dtype=np.uint8)
    if n == 0:
        return out
    lo, hi = int(flat.min()), int(flat.max())
    if lo < low or hi > high:
        raise ValueError(
            f"codes must lie in [{low}, {high}] for {bits} bits, got values in [{lo}, {hi}]"
        )
    shifts = _shifts(bits)
    for start in range(0, n, _CHUNK):
        part = flat[start : start + _CHUNK]
        m = part.size
        groups = -(-m // 8)
        fields = np.zeros(groups * 8, dtype=np.uint64)
        fields[:m] = part.astype(np.int64) + offset  # in [0, 2^b): the cast is exact
        words = np.bitwise_or.reduce(fields.reshape(groups, 8) << shifts, axis=1)
        raw = words.astype("<u8", copy=False).view(np.uint8).reshape(groups, 8)[:, :bits]
        first = start * bits // 8  # start is a multiple of 8
        stop = min(first + groups * bits, out.size)
        out[first:stop] = raw.reshape(-1)[: stop - first]
    return out


def unpack_codes(
    packed: ArrayLike, bits: int, count: int, *, signed: bool = True
) -> NDArray[np.integer[Any]]:
    """Inverse of :func:`pack_codes`: the first ``count`` codes, as a flat ``int8`` array
    (``uint8`` when not ``signed``).

    Raises:
        ValueError: ``bits`` outside 2..8, ``packed`` not ``uint8`` or not exactly
            ``ceil(count*bits/8)`` bytes, or a field holding ``2^b - 1`` (no code maps to it:
            the data is corrupt).
    """
    q = _qmax(bits)
    data = np.asarray(packed)
    if data.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got dtype {data.dtype}")
    data = data.reshape(-1)
    expected = packed_nbytes(count, bits)
    if data.size != expected:
        raise ValueError(
            f"{count} codes of {bits} bits take {expected} bytes packed, got {data.size}"
        )
    out = np.empty(count, dtype=np.int8 if signed else np.uint8)
    shifts = _shifts(bits)
    mask = np.uint64((1 << bits) - 1)
    for start in range(0, count, _CHUNK):
        m = min(_CHUNK, count - start)
        groups = -(-m // 8)
        first = start * bits // 8
        chunk = data[first : first + groups * bits]
        buf = np.zeros((groups, 8), dtype=np.uint8)
        if chunk.size == groups * bits:
            buf[:, :bits] = chunk.reshape(groups, bits)
        else:  # the last, partial group: pad its missing bytes with zeros
            padded = np.zeros(groups * bits, dtype=np.uint8)
            padded[: chunk.size] = chunk
            buf[:, :bits] = padded.reshape(groups, bits)
        words = buf.view("<u8").reshape(groups, 1)
        fields = ((words >> shifts) & mask).reshape(-1)[:m]
        if not signed:
            out[start : start + m] = fields.astype(np.uint8)
            continue
        if m and int(fields.max()) > 2 * q:
            raise ValueError(
                f"packed data holds the field value {2 * q + 1}, which no {bits}-bit code "
                "maps to; the data is corrupt"
            )
        out[start : start + m] = (fields.astype(np.int16) - q).astype(np.int8)
    return out
