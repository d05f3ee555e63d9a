"""Intake refuses hostile model and data files before anything is deserialised (issue 9).

Every hostile file is built here (tests/support/hostile_files.py). Each refusal asserts the
specific error code, that the payload did not run (its marker file is absent) and, for the
bombs, that the check read no data (traced Python allocations stay far below the bomb's size).
The live exploits are shown to be live: stock torch runs their payload. And every model of the
test zoo, in every form the zoo tests save, passes the guard (no false positives).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mpq_core.archive_guard import ArchiveLimits, scan_zip
from mpq_core.data import load_data
from mpq_core.errors import DataError, ModelFormatError, MpqError
from mpq_core.intake import load_model
from mpq_core.load_guard import check_script_graphs, forbid_python_eval, forbid_unpickling
from mpq_core.op_allowlist import denied_names, export_target_refusal, op_refusal
from tests.conftest import ZOO as SMALL_ZOO
from tests.conftest import save_bytes, zoo_inputs, zoo_module
from tests.real_zoo import ZOO, build
from tests.support import hostile_files as hostile
from tests.support.files import npz_bytes

MiB = 1024**2
#: Far below any bomb's expanded size: a check that inflated the bomb would exceed it.
CHECK_MEMORY = 32 * MiB


def _model_refused(data: bytes, code: str, limits: ArchiveLimits | None = None) -> str:
    kwargs = {"limits": limits} if limits is not None else {}
    with pytest.raises(ModelFormatError) as info:
        load_model(data, **kwargs)
    assert info.value.code == code, info.value
    return info.value.message


def _data_refused(data: bytes, code: str) -> str:
    with pytest.raises(DataError) as info:
        load_data(data)
    assert info.value.code == code, info.value
    return info.value.message


@pytest.fixture
def traced() -> Iterator[None]:
    """Python allocations are traced during the test (``tracemalloc``)."""
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _peak_since_reset() -> int:
    return tracemalloc.get_traced_memory()[1]


# --------------------------------------------------------------------- the live exploits

PT2_EXPLOITS: dict[str, Callable[[Path], bytes]] = {
    "weight_use_pickle": hostile.pt2_pickled_weight,
    "sample_inputs_fallback": hostile.pt2_pickled_sample_inputs,
    "opaque_object_constant": hostile.pt2_opaque_constant,
}


@pytest.mark.parametrize("name", PT2_EXPLOITS)
def test_pt2_exploit_is_live_with_stock_torch(name: str, tmp_path: Path) -> None:
    # The control: these fixtures really run code when stock torch loads them.
    marker = tmp_path / "marker"
    data = PT2_EXPLOITS[name](marker)
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        # The payload runs before torch notices the result is no tensor.
        warnings.simplefilter("ignore")
        torch.export.load(io.BytesIO(data))
    assert marker.exists()


@pytest.mark.parametrize("name", PT2_EXPLOITS)
def test_pt2_exploit_refused_without_running(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    message = _model_refused(PT2_EXPLOITS[name](marker), "model_pickle")
    assert "re-export" in message.lower()
    assert not marker.exists()


@pytest.mark.parametrize("name", PT2_EXPLOITS)
def test_no_unpickling_inside_export_load_even_without_the_structural_check(
    name: str, tmp_path: Path
) -> None:
    # Defence in depth: torch.export.load called directly, the archive checks skipped.
    marker = tmp_path / "marker"
    data = PT2_EXPLOITS[name](marker)
    with pytest.raises(MpqError) as info, forbid_unpickling():
        torch.export.load(io.BytesIO(data))
    assert info.value.code == "model_pickle"
    assert not marker.exists()


PT2_PYTHON: dict[str, Callable[[Path], bytes]] = {
    "sympy_expr_str": hostile.pt2_sympy_expr,  # sympy.sympify (eval) while loading
    "guards_code": hostile.pt2_guard_code,  # exec by ExportedProgram.module(), run per call
}


@pytest.mark.parametrize("name", PT2_PYTHON)
def test_python_in_a_pt2_program_is_live_with_stock_torch(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = PT2_PYTHON[name](marker)
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")
        torch.export.load(io.BytesIO(data)).module()(torch.ones(2, 4))
    assert marker.exists()


@pytest.mark.parametrize("name", PT2_PYTHON)
def test_python_in_a_pt2_program_refused_without_running(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    message = _model_refused(PT2_PYTHON[name](marker), "model_unsafe_op")
    assert name.split("_")[-1] in message or "guards_code" in message
    assert not marker.exists()


@pytest.mark.parametrize("name", PT2_PYTHON)
def test_no_python_eval_inside_export_load_even_without_the_structural_check(
    name: str, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    data = PT2_PYTHON[name](marker)
    with pytest.raises(MpqError) as info, forbid_python_eval():
        torch.export.load(io.BytesIO(data)).module()(torch.ones(2, 4))
    assert info.value.code == "model_unsafe_op"
    assert not marker.exists()


def test_forbid_python_eval_restores_sympy() -> None:
    import sympy

    real = sympy.sympify
    with forbid_python_eval():
        assert sympy.sympify is not real
        assert sympy.sympify("Mul(Integer(2), Symbol('s0'))") == 2 * sympy.Symbol("s0")
    assert sympy.sympify is real


def test_forbid_unpickling_restores_torch() -> None:
    real_load, real_obj = torch.load, torch._C._pickle_load_obj
    with forbid_unpickling():
        assert torch.load is not real_load
    assert torch.load is real_load and torch._C._pickle_load_obj is real_obj


def test_plain_export_still_loads_under_forbid_unpickling() -> None:
    with forbid_unpickling():
        program = torch.export.load(io.BytesIO(hostile.small_export()))
    assert program.module()(torch.ones(2, 4)).shape == (2, 3)


def test_scripted_setstate_exploit_is_live_with_stock_torch(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.jit.load(io.BytesIO(hostile.script_bytes(hostile.TouchesOnLoad(str(marker)))))
    assert marker.exists()


def test_scripted_setstate_calling_from_file_refused_before_load(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = hostile.script_bytes(hostile.TouchesOnLoad(str(marker)))
    message = _model_refused(data, "model_unsafe_op")
    assert "torch.from_file" in message and "hostile_files.py" in message
    assert not marker.exists()


def test_scripted_forward_reading_files_refused() -> None:
    message = _model_refused(
        hostile.script_bytes(hostile.ReadsFiles("/etc/passwd")), "model_unsafe_op"
    )
    assert (
        "torch.from_file" in message and "code/__torch__/tests/support/hostile_files.py" in message
    )


def test_graph_walk_after_load_finds_from_file_exactly() -> None:
    # The second, exact check: the loaded module's inlined graphs (forward does not run on load).
    module = torch.jit.load(io.BytesIO(hostile.script_bytes(hostile.ReadsFiles("/etc/passwd"))))
    with pytest.raises(ModelFormatError) as info:
        check_script_graphs(module)
    assert info.value.code == "model_unsafe_op"
    assert "aten::from_file" in info.value.message


# --------------------------------------------------------------------- edited TorchScript source


def _edited_forward(line: str) -> bytes:
    """The harmless scripted model with ``line`` inserted at the top of its forward."""

    def edit(src: str) -> str:
        head, sep, tail = src.partition("x: Tensor) -> Tensor:\n")
        assert sep, src
        return head + sep + f"    {line}\n" + tail

    return hostile.edit_script_source(hostile.small_script(), edit)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("_9 = ops.evil.run(x)", "ops.evil.run"),  # custom-op namespace
        ("_9 = torch.ops.mylib.exfiltrate(x)", "torch.ops.mylib.exfiltrate"),
        ('torch.save(x, "/tmp/stolen.pt")', "torch.save"),
        ('_9 = ops.aten.from_file("/etc/passwd", False, 4)', "ops.aten.from_file"),
        ("_9 = torch.set_(x, x)", "torch.set_"),
        ("_9 = x.set_(x)", "'set_'"),
        ('_9 = getattr(torch, "from_file")', "a bare 'torch'"),
        ("import os", "an import statement"),
        ("_9 = ops.c10d.broadcast(x)", "ops.c10d.broadcast"),  # network collectives
        ("_9 = ops.prim.rpc_async(x)", "ops.prim.rpc_async"),
    ],
    ids=[
        "custom-ns",
        "torch.ops-custom-ns",
        "save",
        "ops.aten.from_file",
        "set_",
        "method-set_",
        "getattr-torch",
        "import",
        "c10d",
        "rpc",
    ],
)
def test_edited_source_with_unsafe_op_refused(line: str, named: str) -> None:
    message = _model_refused(_edited_forward(line), "model_unsafe_op")
    assert named in message


@pytest.mark.parametrize(
    ("global_", "named"),
    [
        (b"os\nsystem", "os system"),  # not something TorchScript's pickler writes
        (b"__torch__.torch.classes.dist_c10d\nFileStore", "dist_c10d"),  # TorchBind, C++ setstate
        (b"builtins\neval", "builtins eval"),
    ],
    ids=["os.system", "torchbind-c10d", "eval"],
)
def test_torchscript_pickle_with_foreign_global_refused(global_: bytes, named: str) -> None:
    # Read with pickletools (opcodes only): the global is named, never imported or called.
    evil = b"\x80\x02c" + global_ + b"\n)R."
    data = hostile.rewrite_zip(hostile.small_script(), {"constants.pkl": evil})
    assert named in _model_refused(data, "model_unsafe_op")


def test_torchscript_pickle_that_does_not_parse_refused() -> None:
    data = hostile.rewrite_zip(hostile.small_script(), {"constants.pkl": b"\x80\x02\xff"})
    _model_refused(data, "model_corrupt")


def test_own_method_named_like_a_refused_op_is_not_refused() -> None:
    # ``self.save(x)`` calls the model's own method (its code is checked too), not aten::save;
    # ``self.weight.set_(x)`` is a tensor method and stays refused.
    def edit(src: str) -> str:
        head, sep, tail = src.partition("  def forward(")
        own = (
            "  def save(self: __torch__.tests.support.hostile_files._Small, x: Tensor) -> Tensor:\n"
        )
        own += "    return torch.relu(x)\n"
        return head + own + sep + tail

    data = hostile.edit_script_source(hostile.small_script(), edit)
    load_model(data)
    _model_refused(_edited_forward("_9 = self.fc.weight.set_(x)"), "model_unsafe_op")
    _model_refused(_edited_forward("_9 = self.set_(x)"), "model_unsafe_op")  # self may be a tensor


def test_source_that_does_not_parse_refused() -> None:
    _model_refused(_edited_forward("def ("), "model_corrupt")


def test_edited_source_with_allowed_ops_still_loads() -> None:
    # The edit machinery itself is harmless: an allowed operator passes and the model runs.
    model = load_model(_edited_forward("_9 = torch.add(x, 1)"))
    assert model(torch.ones(2, 4)).shape == (2, 3)


# --------------------------------------------------------------------- torch.export structure


def _edit_pt2_config(rel: str, edit: Callable[[dict], None]) -> bytes:
    return hostile.edit_json_entry(hostile.small_export(), rel, edit)


def test_pt2_pickled_constant_refused() -> None:
    def add(config: dict) -> None:
        config["config"]["c"] = {"path_name": "tensor_9", "is_param": False, "use_pickle": True}

    data = _edit_pt2_config("data/constants/model_constants_config.json", add)
    data = hostile.rewrite_zip(data, {"data/constants/tensor_9": b"\x80\x04N."})
    assert "'c'" in _model_refused(data, "model_pickle")


def test_pt2_custom_object_constant_refused() -> None:
    def add(config: dict) -> None:
        config["config"]["obj"] = {
            "path_name": "custom_obj_0",
            "is_param": False,
            "use_pickle": True,
        }

    data = _edit_pt2_config("data/constants/model_constants_config.json", add)
    data = hostile.rewrite_zip(data, {"data/constants/custom_obj_0": b"PK"})
    assert "custom_obj_0" in _model_refused(data, "model_pickle")


@pytest.mark.parametrize("rel", ["data/weights/model.pt", "data/constants/model.pt"])
def test_pt2_legacy_pickled_files_refused(rel: str) -> None:
    data = hostile.rewrite_zip(hostile.small_export(), {rel: b"\x80\x04N."})
    assert "legacy" in _model_refused(data, "model_pickle")


def test_pt2_empty_record_declaring_a_huge_tensor_refused(traced: None) -> None:
    # torch allocates torch.zeros(sizes) for an empty record: 2**34 float32 zeros here.
    paths: list[str] = []

    def grow(config: dict) -> None:
        meta = config["config"]["fc.weight"]
        meta["tensor_meta"]["sizes"] = [{"as_int": 2**17}, {"as_int": 2**17}]
        paths.append(meta["path_name"])

    data = _edit_pt2_config("data/weights/model_weights_config.json", grow)
    data = hostile.rewrite_zip(data, {f"data/weights/{paths[0]}": b""})
    tracemalloc.reset_peak()
    assert "17179869184 elements" in _model_refused(data, "archive_too_large")
    assert _peak_since_reset() < CHECK_MEMORY


def test_pt2_aotinductor_native_code_refused() -> None:
    data = hostile.rewrite_zip(
        hostile.small_export(), {"data/aotinductor/model/model.so": b"\x7fELF"}
    )
    assert "AOTInductor" in _model_refused(data, "model_unsafe_op")


def test_pt2_unexpected_entry_refused() -> None:
    data = hostile.rewrite_zip(hostile.small_export(), {"serialized_state_dict.pt": b"x"})
    _model_refused(data, "model_pickle")
    data = hostile.rewrite_zip(hostile.small_export(), {"data/mtia/blob": b"x"})
    _model_refused(data, "model_format")


def _edit_graph(edit: Callable[[dict], None]) -> bytes:
    return _edit_pt2_config("models/model.json", edit)


@pytest.mark.parametrize(
    "target",
    [
        "torch.os.system",  # resolved by getattr on torch and called with the graph's args
        "torch.load",
        "torch.from_file",
        "torch.ops.mylib.evil.default",  # custom-op namespace
        "torch.ops.aten.from_file.default",
        "builtins.exec",
        "#some_extension",
    ],
)
def test_pt2_graph_node_target_outside_allow_list_refused(target: str) -> None:
    def edit(program: dict) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = target

    assert repr(target) in _model_refused(_edit_graph(edit), "model_unsafe_op")


def test_export_target_rules() -> None:
    assert export_target_refusal("torch.ops.aten.linear.default") is None
    assert export_target_refusal("_operator.getitem") is None
    assert export_target_refusal("torch.ops.higher_order.cond") is None
    assert export_target_refusal("torch.ops.higher_order.run_const_graph") is not None
    assert export_target_refusal("torch.sym_max") is None
    assert export_target_refusal("torch.os.system") is not None


def test_op_allow_list_is_derived_from_the_registry() -> None:
    # Every allowed-namespace operator taking a file name is refused, today from_file and save.
    assert {"from_file", "save"} <= denied_names()
    assert op_refusal("aten", "from_file.default") is not None
    assert op_refusal("aten", "linear") is None
    assert op_refusal("mylib", "linear") is not None


# --------------------------------------------------------------------- zip-level checks


def test_torchscript_with_1gib_deflated_record_refused_reading_no_data(traced: None) -> None:
    data = hostile.torchscript_bomb()
    assert len(data) < 2 * MiB
    tracemalloc.reset_peak()
    message = _model_refused(data, "archive_too_large")
    assert "expand" in message
    assert _peak_since_reset() < CHECK_MEMORY


def test_bomb_in_sample_inputs_refused_reading_no_data(traced: None) -> None:
    # The sample inputs are a torch.save zip inside the archive, scanned like the outer one.
    bomb = hostile.torchscript_bomb(512 * MiB)
    data = hostile.rewrite_zip(hostile.small_export(), {"data/sample_inputs/model.pt": bomb})
    tracemalloc.reset_peak()
    _model_refused(data, "archive_too_large")
    assert _peak_since_reset() < CHECK_MEMORY + len(data)


def test_expansion_above_the_service_limit_refused() -> None:
    # A genuine archive under a (tiny) service limit: the absolute cap holds whatever the ratio.
    limits = ArchiveLimits(max_expanded_bytes=1000, ratio_floor_bytes=0)
    _model_refused(hostile.small_script(), "archive_too_large", limits)
    assert ArchiveLimits.for_upload_limit(10).max_expanded_bytes == 40


def test_too_many_entries_refused() -> None:
    _model_refused(hostile.small_script(), "model_format", ArchiveLimits(max_entries=3))


@pytest.mark.parametrize(
    ("name", "why"),
    [("../escape", "'..'"), ("/etc/cron.d/x", "absolute"), ("C:/x", "absolute")],
)
def test_unsafe_entry_names_refused(name: str, why: str) -> None:
    data = hostile.rewrite_zip(hostile.small_script(), extra=[(name, b"x")], under_root=False)
    assert why in _model_refused(data, "model_format")


def test_duplicate_entry_names_refused() -> None:
    # zipfile and torch's reader may each pick a different one of the two: refused outright.
    data = hostile.small_script()
    code = next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith(".py"))
    rel = code.split("/", 1)[1]
    twin = hostile.rewrite_zip(data, extra=[(rel, b"import os\n")])
    assert "twice" in _model_refused(twin, "model_format")


def test_entries_outside_the_root_folder_refused() -> None:
    data = hostile.rewrite_zip(
        hostile.small_script(), extra=[("other/code/x.py", b"")], under_root=False
    )
    assert "one top-level folder" in _model_refused(data, "model_format")


# --------------------------------------------------------------------- data files


def test_savez_compressed_bomb_refused_reading_no_data(traced: None) -> None:
    data = hostile.npz_bomb()
    assert len(data) < 2 * MiB
    tracemalloc.reset_peak()
    assert "expand" in _data_refused(data, "data_too_large")
    assert _peak_since_reset() < CHECK_MEMORY


def test_npz_header_declaring_a_huge_shape_refused(traced: None) -> None:
    data = hostile.npz_with_header((10**9, 10**4), b"\0" * 64)
    tracemalloc.reset_peak()
    assert "declares shape" in _data_refused(data, "data_too_large")
    assert _peak_since_reset() < CHECK_MEMORY


def test_npz_header_declaring_more_than_stored_refused() -> None:
    _data_refused(hostile.npz_with_header((1000, 16), b"\0" * 64), "data_format")


def test_npz_object_array_refused_from_its_header(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    arr = np.array([hostile.Payload(marker)], dtype=object)
    data = hostile.npz_entries([("input.npy", hostile.npy_bytes(arr))])
    _data_refused(data, "data_pickle")
    assert not marker.exists()


def test_npz_duplicate_and_dotdot_names_refused() -> None:
    arr = hostile.npy_bytes(np.zeros((4, 2), np.float32))
    _data_refused(hostile.npz_entries([("input.npy", arr), ("input.npy", arr)]), "data_format")
    _data_refused(hostile.npz_entries([("../input.npy", arr)]), "data_format")


def test_npz_member_that_is_not_npy_refused() -> None:
    _data_refused(hostile.npz_entries([("input.pkl", b"\x80\x04N.")]), "data_format")


def test_safetensors_header_declaring_a_huge_shape_refused() -> None:
    header = {"input": {"dtype": "F32", "shape": [10**9, 10**4], "data_offsets": [0, 16]}}
    _data_refused(hostile.safetensors_with_header(header, b"\0" * 16), "data_too_large")


def test_safetensors_offsets_outside_the_file_refused() -> None:
    header = {"input": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**6]}}
    _data_refused(hostile.safetensors_with_header(header, b"\0" * 16), "data_format")


def test_plain_data_files_still_load() -> None:
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    for compressed in (False, True):
        data = load_data(npz_bytes(compressed=compressed, input=x, labels=np.arange(8)))
        assert data.num_samples == 8


def test_scan_zip_reads_only_the_directory() -> None:
    # The ZipFile returned has not inflated any member.
    zf = scan_zip(hostile.npz_bomb(64 * MiB), "data", ArchiveLimits(max_ratio=1e9))
    assert [i.filename for i in zf.infolist()] == ["input.npy"]


# --------------------------------------------------------------------- no false positives

ZOO_CASES = [(name, fmt) for name in ZOO for fmt in ("trace", "export")] + [
    (f"small:{name}", fmt)
    for name in SMALL_ZOO
    for fmt in ("script", "trace", "export", "export_fixed")
]


#: Half precision changes what the archives hold (BFloat16Storage, Half tensor records).
HALF_CASES = [(n, f, d) for n in ("resnet", "gpt2", "llama") for f in ("trace", "export")
              for d in (torch.bfloat16, torch.float16)]  # fmt: skip


@pytest.mark.parametrize(("name", "fmt"), ZOO_CASES, ids=[f"{n}-{f}" for n, f in ZOO_CASES])
def test_every_zoo_model_passes_the_guard(name: str, fmt: str) -> None:
    if name.startswith("small:"):
        small = name.removeprefix("small:")
        n = 4 if fmt == "export_fixed" else 2
        data = save_bytes(zoo_module(small), tuple(zoo_inputs(small, n, 0)), fmt)
    else:
        entry = build(name)
        data = save_bytes(entry.module, tuple(entry.inputs(2, 0)), fmt)
    _passes(data, fmt)


@pytest.mark.parametrize(
    ("name", "fmt", "dtype"), HALF_CASES, ids=[f"{n}-{f}-{d}" for n, f, d in HALF_CASES]
)
def test_half_precision_zoo_models_pass_the_guard(name: str, fmt: str, dtype: torch.dtype) -> None:
    entry = build(name, dtype)
    _passes(save_bytes(entry.module, tuple(entry.inputs(2, 0)), fmt), fmt)


class _EveryDtype(torch.nn.Module):
    """A linear layer beside buffers of every storage type a TorchScript pickle can name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                      torch.float16, torch.bfloat16, torch.float64, torch.complex64):  # fmt: skip
            self.register_buffer(
                f"b_{str(dtype).removeprefix('torch.')}", torch.ones(2, dtype=dtype)
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated, still loadable
            q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
        self.register_buffer("b_qint8", q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("trace", [False, True], ids=["script", "trace"])
def test_every_storage_dtype_passes_the_guard(trace: bool) -> None:
    model = _EveryDtype().eval()
    buf = io.BytesIO()
    saved = torch.jit.trace(model, torch.ones(2, 4)) if trace else torch.jit.script(model)
    torch.jit.save(saved, buf)
    _passes(buf.getvalue(), "script")


def _passes(data: bytes, fmt: str) -> None:
    # Under the service's own limits for its default 2 GiB uploads, and the tightest ratio.
    model = load_model(data, limits=ArchiveLimits.for_upload_limit(2 * 1024**3))
    assert model.format == ("export" if fmt.startswith("export") else "torchscript")


def test_guard_modules_import_no_torch() -> None:
    code = (
        "import sys, mpq_core.archive_guard, mpq_core.script_guard, mpq_core.op_allowlist;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_json_is_not_read_past_the_text_budget() -> None:
    big = json.dumps({"config": {}, "pad": "x" * 4096}).encode()
    data = hostile.rewrite_zip(
        hostile.small_export(), {"data/weights/model_weights_config.json": big}
    )
    _model_refused(data, "archive_too_large", ArchiveLimits(max_text_bytes=1024))


def test_pipeline_hands_the_service_limits_to_intake(tmp_path: Path) -> None:
    from mpq_core.pipeline import quantize_model
    from mpq_core.spec import JobSpec

    x = np.zeros((8, 4), np.float32)
    limits = ArchiveLimits(max_expanded_bytes=1000, ratio_floor_bytes=0)
    with pytest.raises(ModelFormatError) as info:
        quantize_model(
            hostile.small_script(),
            npz_bytes(input=x),
            JobSpec(budgets=["avg-bits=4"]),
            tmp_path,
            limits=limits,
        )
    assert info.value.code == "archive_too_large"
