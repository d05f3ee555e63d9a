"""The files of a job: what :func:`write_artifacts` writes from a :class:`JobResult`.

``model.pt`` / ``model.pt2`` (the drop-in model), ``model.mpq.safetensors`` (the packed
checkpoint), ``model.compressed.pt2`` and ``model.onnx`` (where torch's exporters can record
the model: :mod:`mpq_core.runtime_exports`), ``allocation.json``, ``sensitivity.json``,
``encodings.json`` (with activation quantization), the plots (:mod:`mpq_core.plots`) and, last,
``report.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq_core.dropin_model import save_quantized_model
from mpq_core.memory_plan import peak_resident_and_reset
from mpq_core.packed_checkpoint import CHECKPOINT_NAME, job_metadata, save_packed_checkpoint
from mpq_core.plots import write_figures
from mpq_core.progress import ProgressFn, StageClock, null_progress
from mpq_core.quant_primitives import FLOAT_BITS
from mpq_core.quantized_weights import QuantizedLayer
from mpq_core.report import SCHEMA_VERSION, finite, write_json
from mpq_core.runtime_exports import write_runtime_exports

if TYPE_CHECKING:
    from mpq_core.pipeline import JobResult

__all__ = ["write_artifacts"]


def _param_encoding(layer: QuantizedLayer) -> dict[str, Any]:
    """How a weight is stored: its bits and its quantizer's scheme, as the layer has it."""
    groups = 1 if layer.scales.dim() <= 1 else int(layer.scales.shape[-1])
    return {
        "bits": layer.bits,
        "symmetric": layer.zeros is None,
        "per_channel": layer.bits != FLOAT_BITS,
        "groups_per_channel": groups,
    }


def write_artifacts(
    result: JobResult, out_dir: str | Path, *, progress: ProgressFn | None = None
) -> dict[str, Path]:
    """Write a job's artefacts into ``out_dir`` (created if needed) as the ``export`` stage.

    The model's weights move to the CPU (artefacts hold CPU tensors, whatever device the job
    ran on). ``result.report`` gets the export timing, the packed checkpoint's size and the list
    of artefacts before it is written as ``report.json``.

    Returns:
        The path of every file written, by name.

    Example:
        >>> write_artifacts(run(spec, "model.pt", "calib.npz"), "out/")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, layers = result.model, result.layers
    report = result.report
    clock = StageClock(progress or null_progress, report["timings"])
    artifacts: dict[str, Path] = {}
    peak_resident_and_reset()  # the export stage's own peak, as every stage reports one
    with clock.stage("export"):
        model.module.to("cpu")
        artifacts[f"model{model.suffix}"] = dropin = out / f"model{model.suffix}"
        save_quantized_model(model, layers, dropin)
        artifacts[CHECKPOINT_NAME] = packed = out / CHECKPOINT_NAME
        packed_bytes = save_packed_checkpoint(packed, model, layers, metadata=job_metadata(model))
        if result.example_inputs:
            exported, report["exports"] = write_runtime_exports(
                model, layers, result.example_inputs, out, result.encodings
            )
            artifacts.update(exported)
        artifacts["allocation.json"] = out / "allocation.json"
        result.allocation.save(artifacts["allocation.json"])
        artifacts["sensitivity.json"] = out / "sensitivity.json"
        result.sensitivity.save(artifacts["sensitivity.json"])
        if result.encodings:
            doc = {
                "schema_version": SCHEMA_VERSION,
                "kind": "mpq.encodings",
                "activation_encodings": {n: enc.to_dict() for n, enc in result.encodings.items()},
                "param_encodings": {name: _param_encoding(layer) for name, layer in layers.items()},
            }
            artifacts["encodings.json"] = write_json(out / "encodings.json", doc)
        artifacts.update(write_figures(result, out, report["notes"]))  # mpq_core.plots
    peak = peak_resident_and_reset()
    if peak is not None and isinstance(report.get("memory"), dict):
        report["memory"].setdefault("peak_bytes_by_stage", {})["export"] = peak
    report["sizes"]["packed_checkpoint_bytes"] = packed_bytes
    report["timings"] = clock.seconds
    report["artifacts"] = sorted([*artifacts, "report.json"])
    result.report = finite(report)
    artifacts["report.json"] = write_json(out / "report.json", result.report)
    return artifacts
