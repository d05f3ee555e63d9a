from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_core import packing
from mpq_core.packing import pack_codes, packed_nbytes, unpack_codes

ALL_BITS = list(range(2, 9))


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit by bit, with unpackbits/packbits: field ``i`` at stream bits ``[i*b, (i+1)*b)``."""
    fields = codes.astype(np.int64) + _qmax(bits)
    stream = ((fields[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 15, 17, 63, 64, 65, 1001])
def test_round_trip_every_width_and_odd_lengths(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    q = _qmax(bits)
    codes = rng.integers(-q, q + 1, n).astype(np.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == (n * bits + 7) // 8 == packed_nbytes(n, bits)
    np.testing.assert_array_equal(packed, _reference_pack(codes, bits))
    out = unpack_codes(packed, bits, n)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_extremes_and_known_layout(bits: int) -> None:
    q = _qmax(bits)
    codes = np.array([-q, q, 0, -q, q], dtype=np.int64)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, bits), bits, 5), codes)
    # Little-endian bit order: fields 0, 1, 2, 2 at 2 bits are 0b10_10_01_00.
    assert pack_codes(np.array([-1, 0, 1, 1]), 2).tolist() == [0b10100100]


def test_accepts_any_integer_dtype_and_shape() -> None:
    codes = np.arange(-7, 8, dtype=np.int32).reshape(3, 5)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, 4), 4, 15), codes.reshape(-1))


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(2, 8),
    data=st.data(),
)
def test_round_trip_property(bits: int, data: st.DataObject) -> None:
    q = _qmax(bits)
    codes = data.draw(st.lists(st.integers(-q, q), max_size=300))
    arr = np.array(codes, dtype=np.int64)
    packed = pack_codes(arr, bits)
    assert packed.size == -(-len(codes) * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, len(codes)), arr)


def test_chunked_path_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "_CHUNK", 16)  # force many chunks, with a partial last one
    rng = np.random.default_rng(0)
    for bits in ALL_BITS:
        q = _qmax(bits)
        codes = rng.integers(-q, q + 1, 101)
        packed = pack_codes(codes, bits)
        np.testing.assert_array_equal(packed, _reference_pack(codes, bits))
        np.testing.assert_array_equal(unpack_codes(packed, bits, 101), codes)


def test_large_layer_round_trip() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(-3, 4, 5_000_003).astype(np.int8)
    packed = pack_codes(codes, 3)
    assert packed.size == (5_000_003 * 3 + 7) // 8
    np.testing.assert_array_equal(unpack_codes(packed, 3, codes.size), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_codes_out_of_range_raise(bits: int) -> None:
    q = _qmax(bits)
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_codes(np.array([0, q + 1]), bits)
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_codes(np.array([-q - 1, 0]), bits)


def test_bad_arguments_raise() -> None:
    for bits in (0, 1, 9, 16):
        with pytest.raises(ValueError, match="bits"):
            pack_codes(np.array([0]), bits)
    with pytest.raises(ValueError, match="integers"):
        pack_codes(np.array([0.5]), 4)
    packed = pack_codes(np.zeros(10, dtype=np.int8), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(packed[:-1], 4, 10)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(packed.astype(np.int16), 4, 10)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_unused_field_value_is_corrupt(bits: int) -> None:
    # All-ones is 2^b - 1 = 2q + 1: no code maps to it.
    with pytest.raises(ValueError, match="corrupt"):
        unpack_codes(np.full(bits, 0xFF, dtype=np.uint8), bits, 8)
