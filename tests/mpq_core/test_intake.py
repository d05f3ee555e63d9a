from __future__ import annotations

import io
import os
import pickle
import random
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mpq_core.errors import DataMismatch, ModelFormatError
from mpq_core.intake import detect_format, load_model, select_output
from tests.conftest import FIXED_BATCH, zoo_inputs, zoo_module
from tests.zoo import SmallMLP

ZooBytes = Callable[[str, str], bytes]

# ---------------------------------------------------------------- traps proving nothing unpickles


def _write_marker(path: str) -> str:
    Path(path).write_text("unpickled")
    return "boom"


class Trap:
    """Unpickling this object writes ``marker`` (via ``__reduce__``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return (_write_marker, (self.marker,))


class TrapModule(nn.Module):
    """An nn.Module whose ``__setstate__`` (run on unpickling) writes a marker file."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("unpickled")
        super().__setstate__(state)


def _torch_save(obj: object, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _refused(source: bytes | Path) -> ModelFormatError:
    with pytest.raises(ModelFormatError) as info:
        load_model(source)
    return info.value


# ------------------------------------------------------------------------- detection by content

ACCEPTED = [
    ("mlp", "script", "torchscript"),
    ("mlp", "trace", "torchscript"),
    ("cnn", "script", "torchscript"),
    ("text", "trace", "torchscript"),
    ("mlp", "export", "export"),
    ("mlp", "export_fixed", "export"),
    ("text", "export", "export"),
]


@pytest.mark.parametrize(("name", "fmt", "expected"), ACCEPTED)
def test_detects_format_from_bytes(zoo_bytes: ZooBytes, name: str, fmt: str, expected: str) -> None:
    data = zoo_bytes(name, fmt)
    assert detect_format(data) == expected
    model = load_model(data)
    assert model.format == expected
    assert model.suffix == (".pt2" if expected == "export" else ".pt")
    # The loaded model computes what the original module computes.
    x = zoo_inputs(name, FIXED_BATCH, seed=3)
    with torch.no_grad():
        want = zoo_module(name)(*x)
        got = model(*x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "wrong_name", "expected"),
    [
        ("script", "model.pt2", "torchscript"),
        ("trace", "weights.npz", "torchscript"),
        ("export", "model.pt", "export"),
        ("export_fixed", "model.pth", "export"),
    ],
)
def test_detects_format_from_file_with_wrong_suffix(
    zoo_bytes: ZooBytes, tmp_path: Path, fmt: str, wrong_name: str, expected: str
) -> None:
    path = tmp_path / wrong_name
    path.write_bytes(zoo_bytes("mlp", fmt))
    model = load_model(path)
    assert model.format == expected
    assert model.num_inputs == 1
    assert model.sha256 == load_model(str(path)).sha256


def test_export_input_specs_and_fixed_batch(zoo_bytes: ZooBytes) -> None:
    dynamic = load_model(zoo_bytes("text", "export"))
    assert dynamic.num_inputs == 2
    assert dynamic.fixed_batch is None
    assert [s.shape for s in dynamic.input_specs] == [(None, 7), (None, 7)]
    assert [s.dtype for s in dynamic.input_specs] == [torch.int64, torch.float32]
    fixed = load_model(zoo_bytes("text", "export_fixed"))
    assert fixed.fixed_batch == FIXED_BATCH
    assert [s.shape for s in fixed.input_specs] == [(FIXED_BATCH, 7), (FIXED_BATCH, 7)]


def test_torchscript_num_inputs_from_schema(zoo_bytes: ZooBytes) -> None:
    assert load_model(zoo_bytes("text", "script")).num_inputs == 2
    assert load_model(zoo_bytes("lstm", "trace")).num_inputs == 1


# ------------------------------------------------------------------------------------ refusals


def test_pickled_module_refused_without_unpickling(tmp_path: Path) -> None:
    # Control: unpickling this file really does write the marker.
    control = tmp_path / "control"
    torch.load(io.BytesIO(_torch_save(TrapModule(control))), weights_only=False)
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    path.write_bytes(_torch_save(TrapModule(marker)))
    err = _refused(path)
    assert err.code == "model_pickle"
    assert "torch.jit" in err.message and "torch.export" in err.message  # says what to do
    assert not marker.exists()


def test_pickled_object_with_reduce_refused_without_unpickling(tmp_path: Path) -> None:
    control = tmp_path / "control"
    torch.load(
        io.BytesIO(_torch_save({"w": torch.ones(2), "t": Trap(control)})), weights_only=False
    )
    assert control.exists()

    marker = tmp_path / "marker"
    err = _refused(_torch_save({"w": torch.ones(2), "t": Trap(marker)}))
    assert err.code == "model_pickle"
    assert not marker.exists()


def test_state_dict_refused() -> None:
    err = _refused(_torch_save(SmallMLP().state_dict()))
    assert err.code == "model_pickle"
    assert "state_dict" in err.message


def test_legacy_non_zip_pickle_refused_without_unpickling(tmp_path: Path) -> None:
    control = tmp_path / "control"
    legacy = _torch_save({"t": Trap(control)}, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(io.BytesIO(legacy))
    torch.load(io.BytesIO(legacy), weights_only=False)
    assert control.exists()

    marker = tmp_path / "marker"
    err = _refused(_torch_save({"t": Trap(marker)}, _use_new_zipfile_serialization=False))
    assert err.code == "model_pickle"
    assert not marker.exists()
    # A whole module in the legacy format too.
    err = _refused(_torch_save(SmallMLP(), _use_new_zipfile_serialization=False))
    assert err.code == "model_pickle"


def test_plain_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    err = _refused(pickle.dumps({"t": Trap(marker)}))
    assert err.code == "model_pickle"
    assert not marker.exists()


def test_frozen_torchscript_refused() -> None:
    frozen = torch.jit.freeze(torch.jit.script(SmallMLP()).eval())
    buf = io.BytesIO()
    torch.jit.save(frozen, buf)
    data = buf.getvalue()
    assert detect_format(data) == "torchscript"  # it is an archive, but has nothing to quantize
    err = _refused(data)
    assert err.code == "model_frozen"
    assert "frozen" in err.message


@pytest.mark.parametrize("via", ["bytes", "path"])
def test_random_bytes_refused(via: str, tmp_path: Path) -> None:
    data = random.Random(0).randbytes(4096)
    assert data[:1] != b"\x80" and data[:2] != b"PK"  # neither pickle nor zip by accident
    err = _refused(_given(data, via, tmp_path))
    assert err.code == "model_format"


@pytest.mark.parametrize(("name", "fmt", "expected"), ACCEPTED)
def test_a_file_loads_as_its_bytes_do(
    zoo_bytes: ZooBytes, name: str, fmt: str, expected: str, tmp_path: Path
) -> None:
    data = zoo_bytes(name, fmt)
    from_file, from_bytes = load_model(_given(data, "path", tmp_path)), load_model(data)
    assert from_file.format == from_bytes.format == expected
    assert from_file.sha256 == from_bytes.sha256
    assert from_file.named_weights().keys() == from_bytes.named_weights().keys()
    for key, weight in from_file.named_weights().items():
        assert torch.equal(weight, from_bytes.named_weights()[key])


# The child loads a 128 MiB TorchScript model from its file and prints how far its resident
# memory rose at the peak, as a multiple of the file's size.
_LOAD_PEAK = """
import os, sys
import torch
from mpq_core.intake import load_model
from mpq_core.memory_plan import status_bytes

class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4096, 8192)

    def forward(self, x):
        return self.fc(x)

path = sys.argv[1]
torch.jit.save(torch.jit.script(Wide()), path)
before = status_bytes("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak restarts from here
model = load_model(path)
print((status_bytes("VmHWM") - before) / os.path.getsize(path))
"""


def test_loading_a_file_holds_its_weights_once(tmp_path: Path) -> None:
    script = tmp_path / "load.py"
    script.write_text(_LOAD_PEAK)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "wide.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    growth = float(done.stdout.strip().splitlines()[-1])
    # The weights once, and the mapping's pages (released before torch reads the weights);
    # reading the file into bytes and loading from them peaked at 4.1 times its size.
    assert growth < 1.5, f"loading peaked at {growth:.2f} times the file's size"


def test_zip_of_something_else_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "hello")
    err = _refused(buf.getvalue())
    assert err.code == "model_format"


def test_empty_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    err = _refused(path)
    assert err.code == "model_format"
    assert "empty" in err.message
    assert _refused(b"").code == "model_format"


def _given(data: bytes, via: str, tmp_path: Path) -> bytes | Path:
    """``data`` as load_model gets it: the bytes, or a file (read through a read-only mapping)."""
    if via == "bytes":
        return data
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("via", ["bytes", "path"])
@pytest.mark.parametrize("fmt", ["script", "export"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_archive_refused(
    zoo_bytes: ZooBytes, fmt: str, fraction: float, via: str, tmp_path: Path
) -> None:
    data = zoo_bytes("mlp", fmt)
    err = _refused(_given(data[: int(len(data) * fraction)], via, tmp_path))
    # A .pt2 holds a nested, uncompressed zip (data/sample_inputs/model.pt); cut after it, the
    # outer directory is gone but the nested one is still found: it must not pass for a pickle.
    assert err.code in ("model_truncated", "model_corrupt"), (
        f"a {fmt} archive cut at {fraction:.0%} was reported as {err.code!r}: {err.message}"
    )
    assert re.search(r"truncated|corrupt", err.message)


def test_error_to_dict_carries_code() -> None:
    err = _refused(b"not a model")
    assert err.to_dict() == {"code": "model_format", "message": err.message}
    assert str(err).startswith("[model_format] ")


# ------------------------------------------------------------------------------- select_output


def test_select_output_tensor() -> None:
    t = torch.randn(2, 3)
    assert select_output(t) is t


def test_select_output_tuple_first_floating() -> None:
    ids = torch.arange(4)
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    assert select_output((ids, a, b)) is a
    assert select_output([ids, b]) is b


def test_select_output_dict_first_floating() -> None:
    logits = torch.randn(2, 3)
    out = {"ids": torch.zeros(2, dtype=torch.long), "logits": logits, "h": torch.randn(2, 8)}
    assert select_output(out) is logits


def test_select_output_nested() -> None:
    target = torch.randn(2, 3)
    out = (torch.zeros(2, dtype=torch.long), (torch.ones(1, dtype=torch.int32),), {"x": target})
    assert select_output(out) is target
    assert select_output([[torch.arange(2)], [target]]) is target


def test_select_output_key_override() -> None:
    a, b = torch.randn(2, 3), torch.randn(2, 4)
    assert select_output({"a": a, "b": b}, "b") is b
    assert select_output((a, b), 1) is b
    ids = torch.arange(3)
    assert select_output((a, ids), 1) is ids  # an explicit key may pick a non-float tensor
    with pytest.raises(DataMismatch, match="no element"):
        select_output({"a": a}, "missing")
    with pytest.raises(DataMismatch, match="no element"):
        select_output((a, b), 5)
    with pytest.raises(DataMismatch, match="not a tensor"):
        select_output({"a": a, "n": 3}, "n")


def test_select_output_without_floating_tensor() -> None:
    with pytest.raises(DataMismatch) as info:
        select_output((torch.arange(3), {"m": torch.zeros(2, dtype=torch.bool)}))
    assert info.value.code == "data_mismatch"
    with pytest.raises(DataMismatch):
        select_output({})
    with pytest.raises(DataMismatch):
        select_output(3.0)
