"""The whole job on CUDA: ``python -m bench.gpu_pipeline [OUT_DIR]`` on a machine with a GPU.

Runs ``quantize_model`` with ``device="auto"`` (CUDA there) and with ``device="cpu"`` on the
small test models, as TorchScript and torch.export programs, and on a larger CNN for timing;
checks that the artefacts are CPU tensors that load with stock torch, and that CUDA and CPU
runs agree. Writes ``gpu_pipeline.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_fisher import _WideCNN
from mpq_core.pipeline import quantize_model
from mpq_core.spec import FinetuneSpec, JobSpec
from tests.zoo import SmallCNN, TinyTextEncoder, export_bytes, torchscript_bytes


def _npz(path: Path, inputs: list[torch.Tensor], labels: torch.Tensor) -> Path:
    arrays: dict[str, Any] = {"labels": labels.numpy()}
    if len(inputs) == 1:
        arrays["input"] = inputs[0].numpy()
    else:
        arrays.update({f"input_{i}": t.numpy() for i, t in enumerate(inputs)})
    np.savez(path, **arrays)
    return path


def _run(blob: bytes, data: Path, device: str, epochs: int) -> dict[str, Any]:
    spec = JobSpec(
        budgets=["avg-bits=3"], finetune=FinetuneSpec(epochs=epochs, lr=1e-3), device=device
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            result = quantize_model(blob, data, spec, tmp)
        except Exception as exc:  # report, do not stop the check
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        seconds = time.perf_counter() - start
        name = next(n for n in result.artifacts if n.startswith("model.pt"))
        path = result.artifacts[name]
        loaded = (
            torch.jit.load(str(path))
            if name == "model.pt"
            else torch.export.load(str(path)).module()
        )
        devices = sorted({str(p.device) for p in loaded.parameters()})
        report = result.report
        return {
            "device": report["device"],
            "device_note": report.get("device_note"),
            "seconds": seconds,
            "timings": report["timings"],
            "allocation": report["allocation"],
            "metrics": report["metrics"],
            "artifact_param_devices": devices,
        }


def main() -> None:
    warnings.simplefilter("ignore")
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = 96
        cnn_x, cnn_y = torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))
        ids, mask = torch.randint(0, 30, (n, 7)), torch.ones(n, 7)
        text_y = torch.randint(0, 4, (n,))
        wide_x, wide_y = torch.randn(1024, 3, 32, 32), torch.randint(0, 100, (1024,))
        cases = [
            (
                "cnn",
                "torchscript",
                torchscript_bytes(SmallCNN().eval(), (cnn_x[:2],)),
                _npz(work / "c.npz", [cnn_x], cnn_y),
                2,
            ),
            ("cnn", "export", export_bytes(SmallCNN().eval(), (cnn_x[:2],)), work / "c.npz", 2),
            (
                "text",
                "torchscript",
                torchscript_bytes(TinyTextEncoder().eval(), (ids[:2], mask[:2])),
                _npz(work / "t.npz", [ids, mask], text_y),
                2,
            ),
            (
                "text",
                "export",
                export_bytes(TinyTextEncoder().eval(), (ids[:2], mask[:2])),
                work / "t.npz",
                2,
            ),
            (
                "wide cnn, 1024 x 32x32x3",
                "torchscript",
                torchscript_bytes(_WideCNN().eval(), (wide_x[:2],)),
                _npz(work / "w.npz", [wide_x], wide_y),
                3,
            ),
        ]
        for name, fmt, blob, data, epochs in cases:
            row = {
                "model": name,
                "format": fmt,
                "cuda": _run(blob, data, "auto", epochs),
                "cpu": _run(blob, data, "cpu", epochs),
            }
            rows.append(row)
            print(
                json.dumps(
                    {
                        k: (
                            v
                            if not isinstance(v, dict)
                            else {
                                kk: v.get(kk)
                                for kk in ("device", "device_note", "seconds", "error")
                            }
                        )
                        for k, v in row.items()
                    }
                ),
                flush=True,
            )
    doc = {
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "runs": rows,
    }
    (out_dir / "gpu_pipeline.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
