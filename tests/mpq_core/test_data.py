from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors

from mpq_core.data import CalibrationData, load_data
from mpq_core.errors import DataError, DataMismatch
from mpq_core.intake import load_model
from mpq_core.runner import check_data_fits, iter_batches, run_model
from tests.conftest import FIXED_BATCH, zoo_data, zoo_inputs, zoo_module
from tests.support.files import npz_bytes

ZooBytes = Callable[[str, str], bytes]


def _write_marker(path: str) -> str:
    Path(path).write_text("unpickled")
    return "boom"


class Trap:
    """Unpickling this object writes ``marker`` (via ``__reduce__``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return (_write_marker, (self.marker,))


def _st(**arrays: np.ndarray) -> bytes:
    return save_safetensors(arrays)


WRITERS = {"npz": npz_bytes, "safetensors": _st}


def _data_error(data: bytes) -> DataError:
    with pytest.raises(DataError) as info:
        load_data(data)
    return info.value


def _mismatch(model: object, data: CalibrationData) -> DataMismatch:
    with pytest.raises(DataMismatch) as info:
        check_data_fits(model, data)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------------------------ load_data


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_round_trip_single_input_with_labels(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 10, 6).astype(np.int64)
    raw = WRITERS[kind](input=x, labels=y)
    path = tmp_path / "calib.bin"  # the name does not matter: detected by content
    path.write_bytes(raw)
    for source in (raw, path, str(path)):
        data = load_data(source)
        assert data.num_samples == 6
        assert len(data.inputs) == 1
        assert data.inputs[0].dtype == torch.float32
        np.testing.assert_array_equal(data.inputs[0].numpy(), x)
        assert data.labels is not None and data.labels.dtype == torch.int64
        np.testing.assert_array_equal(data.labels.numpy(), y)


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_round_trip_numbered_inputs_without_labels(kind: str) -> None:
    ids = np.arange(15, dtype=np.int64).reshape(5, 3)
    mask = np.ones((5, 3), dtype=np.float32)
    mask[1, 2] = 0
    data = load_data(WRITERS[kind](input_1=mask, input_0=ids))
    assert data.labels is None
    assert [t.dtype for t in data.inputs] == [torch.int64, torch.float32]
    np.testing.assert_array_equal(data.inputs[0].numpy(), ids)
    np.testing.assert_array_equal(data.inputs[1].numpy(), mask)


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_int32_labels_widened_to_int64(kind: str) -> None:
    data = load_data(
        WRITERS[kind](input=np.zeros((3, 2), np.float32), labels=np.array([0, 2, 1], np.int32))
    )
    assert data.labels is not None and data.labels.dtype == torch.int64
    assert data.labels.tolist() == [0, 2, 1]


def test_object_array_npz_refused_without_unpickling(tmp_path: Path) -> None:
    control = tmp_path / "control"
    with np.load(
        io.BytesIO(npz_bytes(input=np.array([Trap(control)], dtype=object))), allow_pickle=True
    ) as f:
        f["input"]
    assert control.exists()  # control: unpickling this array does write the marker

    marker = tmp_path / "marker"
    raw = npz_bytes(input=np.array([Trap(marker)], dtype=object), labels=np.array([0]))
    err = _data_error(raw)
    assert err.code == "data_pickle"
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_missing_input_key_refused(kind: str) -> None:
    err = _data_error(WRITERS[kind](x=np.zeros((3, 2), np.float32), labels=np.zeros(3, np.int64)))
    assert err.code == "data_keys"
    assert "'input'" in err.message and "'x'" in err.message


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_gap_in_numbered_inputs_refused(kind: str) -> None:
    z = np.zeros((3, 2), np.float32)
    err = _data_error(WRITERS[kind](input_0=z, input_2=z))
    assert err.code == "data_keys"
    err = _data_error(WRITERS[kind](input_1=z))  # no input_0 at all
    assert err.code == "data_keys"


def test_input_and_numbered_inputs_together_refused() -> None:
    z = np.zeros((3, 2), np.float32)
    assert _data_error(npz_bytes(input=z, input_0=z)).code == "data_keys"


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_float64_cast_to_float32(kind: str) -> None:
    x = np.random.default_rng(1).standard_normal((4, 3))
    data = load_data(WRITERS[kind](input=x))
    assert data.inputs[0].dtype == torch.float32
    np.testing.assert_array_equal(data.inputs[0].numpy(), x.astype(np.float32))


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_non_integer_labels_refused(kind: str) -> None:
    err = _data_error(
        WRITERS[kind](input=np.zeros((3, 2), np.float32), labels=np.array([0.0, 1.0, 2.0]))
    )
    assert err.code == "data_dtype"
    assert "labels" in err.message


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_mismatched_sample_counts_refused(kind: str) -> None:
    err = _data_error(
        WRITERS[kind](input=np.zeros((4, 2), np.float32), labels=np.zeros(3, np.int64))
    )
    assert err.code == "data_shape"
    err = _data_error(
        WRITERS[kind](input_0=np.zeros((4, 2), np.int64), input_1=np.zeros((5, 2), np.float32))
    )
    assert err.code == "data_shape"


def test_not_a_data_file_refused() -> None:
    assert _data_error(b"hello world, not data").code == "data_format"
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    assert _data_error(buf.getvalue()).code == "data_format"  # a lone .npy


# ------------------------------------------------------------------------------ check_data_fits


@pytest.mark.parametrize("fmt", ["script", "export"])
def test_wrong_number_of_inputs(zoo_bytes: ZooBytes, fmt: str) -> None:
    model = load_model(zoo_bytes("text", fmt))
    ids = zoo_inputs("text", 4)[0]
    err = _mismatch(model, CalibrationData([ids]))
    assert err.code == "data_input_count"
    assert "'input_0', 'input_1'" in err.message


def test_wrong_per_sample_shape_for_export(zoo_bytes: ZooBytes) -> None:
    model = load_model(zoo_bytes("mlp", "export"))
    err = _mismatch(model, CalibrationData([torch.randn(4, 17)]))
    assert err.code == "data_shape"
    assert "(17,)" in err.message and "16" in err.message
    assert _mismatch(model, CalibrationData([torch.randn(4, 4, 4)])).code == "data_shape"


def test_wrong_dtype_for_export(zoo_bytes: ZooBytes) -> None:
    model = load_model(zoo_bytes("text", "export"))
    ids, mask = zoo_inputs("text", 4)
    err = _mismatch(model, CalibrationData([ids.int(), mask]))
    assert err.code == "data_dtype"
    assert "int32" in err.message and "int64" in err.message
    assert _mismatch(model, CalibrationData([ids, mask.double()])).code == "data_dtype"


@pytest.mark.parametrize("fmt", ["script", "trace"])
def test_torchscript_fed_wrong_shape(zoo_bytes: ZooBytes, fmt: str) -> None:
    model = load_model(zoo_bytes("mlp", fmt))
    err = _mismatch(model, CalibrationData([torch.randn(4, 17)]))
    assert err.code == "data_mismatch"
    assert "(17,)" in err.message


@pytest.mark.parametrize("fmt", ["script", "export"])
def test_labels_out_of_range(zoo_bytes: ZooBytes, fmt: str) -> None:
    model = load_model(zoo_bytes("mlp", fmt))  # 5 classes
    x = zoo_inputs("mlp", 4)
    check_data_fits(model, CalibrationData(x, torch.tensor([0, 4, 2, 1])))  # fits: no raise
    err = _mismatch(model, CalibrationData(x, torch.tensor([0, 5, 2, 1])))
    assert err.code == "data_labels"
    assert "5 classes" in err.message
    assert _mismatch(model, CalibrationData(x, torch.tensor([0, -1, 2, 1]))).code == "data_labels"


@pytest.mark.parametrize("name", ["cnn", "mlp", "text", "lstm"])
@pytest.mark.parametrize("fmt", ["script", "trace", "export", "export_fixed"])
def test_zoo_data_fits(zoo_bytes: ZooBytes, name: str, fmt: str) -> None:
    check_data_fits(load_model(zoo_bytes(name, fmt)), zoo_data(name, 5))


# ------------------------------------------------------------------------ batching and padding


def test_iter_batches_pads_fixed_batch_export(zoo_bytes: ZooBytes) -> None:
    model = load_model(zoo_bytes("mlp", "export_fixed"))
    assert model.fixed_batch == FIXED_BATCH
    data = zoo_data("mlp", 10)
    batches = list(iter_batches(model, data, batch_size=3))  # the fixed batch wins
    assert [b.start for b in batches] == [0, 4, 8]
    assert [b.valid for b in batches] == [4, 4, 2]
    x, labels = data.inputs[0], data.labels
    assert labels is not None
    for b in batches:
        assert b.inputs[0].shape == (FIXED_BATCH, 16)
        assert b.labels is not None and b.labels.shape == (FIXED_BATCH,)
        torch.testing.assert_close(b.inputs[0][: b.valid], x[b.start : b.start + b.valid])
    last = batches[-1]
    torch.testing.assert_close(last.inputs[0][2:], x[9:10].expand(2, 16))  # copies of sample 9
    assert last.labels is not None and last.labels[2:].tolist() == [int(labels[9])] * 2
    out = run_model(model, data, batch_size=3)
    assert out.shape == (10, 5)
    with torch.no_grad():
        torch.testing.assert_close(out, zoo_module("mlp")(x), rtol=1e-5, atol=1e-5)


def test_iter_batches_dynamic_model_does_not_pad(zoo_bytes: ZooBytes) -> None:
    model = load_model(zoo_bytes("mlp", "export"))
    batches = list(iter_batches(model, zoo_data("mlp", 10), batch_size=3))
    assert [b.valid for b in batches] == [3, 3, 3, 1]
    assert [b.inputs[0].shape[0] for b in batches] == [3, 3, 3, 1]
    assert [b.start for b in batches] == [0, 3, 6, 9]


@pytest.mark.parametrize("fmt", ["script", "trace", "export", "export_fixed"])
def test_text_encoder_two_inputs_from_file(zoo_bytes: ZooBytes, fmt: str) -> None:
    ids, mask = zoo_inputs("text", 7, seed=5)
    raw = npz_bytes(input_0=ids.numpy(), input_1=mask.numpy(), labels=np.arange(7) % 4)
    data = load_data(raw)
    assert data.inputs[0].dtype == torch.int64 and data.inputs[1].dtype == torch.float32
    model = load_model(zoo_bytes("text", fmt))
    check_data_fits(model, data)
    out = run_model(model, data, batch_size=3)
    with torch.no_grad():
        want = zoo_module("text")(ids, mask)
    assert out.shape == (7, 4)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
