"""What a job ships: file sizes of every output and their latency against the float model.

Per model (the test zoo's ResNet and GPT-2 at their tiny configs, and two models large enough
that weights outweigh the program: a ResNet-style CNN at 64-256 channels and the benchmark's
character LM at d_model 256, 4 blocks), one job at ``avg-bits=4`` (candidate bits 2..8, no
fine-tuning) from a torch.export upload, then:

- sizes: the uploaded float file, the dequantized drop-in (``model.pt2``), the compressed
  drop-in (``model.compressed.pt2``), the float ONNX export, ``model.onnx`` and the packed
  checkpoint;
- latency per batch, median of repeated runs in the same process, as ratios to the float
  model in the same runtime: onnxruntime (``model.onnx``, with its default session options,
  with mpq's float32-compute setting, and with ``session.disable_quant_qdq=1``, which folds the
  dequantization into float weights at load) against the float ONNX model, and stock torch
  (``model.compressed.pt2``, which unpacks its codes on every call) against the float program.

``python -m bench.bench_deploy`` writes ``bench/results/deploy.{md,json}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

from bench.textlm import VOCAB, TinyLM
from mpq_core import FinetuneSpec, JobSpec, load_model, quantize, write_artifacts
from mpq_core.data import CalibrationData
from mpq_core.onnx_export import _export_graph
from mpq_core.runtime_exports import ONNX_SESSION_CONFIG
from tests.conftest import save_bytes
from tests.real_zoo import build

RESULTS = Path(__file__).resolve().parent / "results"
BITS = [2, 3, 4, 5, 6, 8]
#: onnxruntime treats DequantizeLinear as a plain op and folds it into float weights at load:
#: float speed, the small file.
FOLDED = {"session.disable_quant_qdq": "1"}


class WideCNN(nn.Module):
    """A ResNet-style CNN whose weights (about 1.2M parameters) outweigh its program."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3, 64, 128, 256]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in itertools.pairwise(chans)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in chans[1:])
        self.mix = nn.Conv2d(256, 256, 3, padding=1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = torch.relu(bn(conv(x)))
        x = x + torch.relu(self.mix(x))
        return self.fc(x.mean(dim=(2, 3)))


def _models() -> dict[str, tuple[nn.Module, Callable[[int, int], list[torch.Tensor]], int]]:
    """name -> (eager module, inputs(n, seed), classes or 0)."""

    def images(n: int, seed: int) -> list[torch.Tensor]:
        return [torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))]

    def text(n: int, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(2, VOCAB, (n, 64), generator=g), torch.ones(n, 64)]

    out: dict[str, tuple[nn.Module, Callable[[int, int], list[torch.Tensor]], int]] = {}
    for name in ("resnet", "gpt2"):
        entry = build(name)
        out[f"zoo {name} (tiny)"] = (entry.module, entry.inputs, entry.classes)
    torch.manual_seed(0)
    out["wide CNN"] = (WideCNN().eval(), images, 10)
    out["char LM d256x4"] = (TinyLM(d_model=256, heads=4, ff=1024, layers=4).eval(), text, 0)
    return out


def _median_seconds(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up: first-call allocation and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ort(path: Path | bytes, config: dict[str, str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared: one thread, steadier numbers
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _one(name: str, module: nn.Module, inputs: Any, classes: int, repeats: int) -> dict[str, Any]:
    upload = save_bytes(module, tuple(inputs(2, 0)), "export")
    labels = torch.randint(0, classes, (32,)) if classes else None
    data = CalibrationData(inputs(32, 1), labels)
    spec = JobSpec(
        budgets=["avg-bits=4"], bits=BITS, eval_fraction=0.0, finetune=FinetuneSpec(epochs=0)
    )
    result = quantize(spec, load_model(upload), data)
    out = Path(tempfile.mkdtemp(prefix="mpq-deploy-"))
    files = write_artifacts(result, out)
    float_model = load_model(upload)
    batch = [t[:8] for t in inputs(8, 2)]
    float_onnx = _export_graph(float_model, tuple(t[:2] for t in batch))[0].SerializeToString()
    feeds = {f"input_{i}": t.numpy() for i, t in enumerate(batch)}
    sessions = {
        "float": _ort(float_onnx, {}),
        "quantized": _ort(files["model.onnx"], {}),
        "quantized_fp32": _ort(files["model.onnx"], ONNX_SESSION_CONFIG),
        "quantized_folded": _ort(files["model.onnx"], FOLDED),
    }
    onnx_s = {
        k: _median_seconds(lambda s=s: s.run(None, feeds), repeats) for k, s in sessions.items()
    }
    torch.set_num_threads(1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        compressed = torch.export.load(str(files["model.compressed.pt2"])).module()
        dropin = torch.export.load(str(files["model.pt2"])).module()
        torch_s = {
            "dequantized": _median_seconds(lambda: dropin(*batch), repeats),
            "compressed": _median_seconds(lambda: compressed(*batch), repeats),
        }
    sizes = {
        "float": len(upload),
        "dequantized_dropin": files["model.pt2"].stat().st_size,
        "compressed_dropin": files["model.compressed.pt2"].stat().st_size,
        "float_onnx": len(float_onnx),
        "onnx": files["model.onnx"].stat().st_size,
        "packed": files["model.mpq.safetensors"].stat().st_size,
    }
    return {
        "model": name,
        "params": result.report["model"]["params"],
        "avg_bits": round(float(result.allocation.budgets[0].achieved), 3),
        "sizes": sizes,
        "onnx_seconds": onnx_s,
        "torch_seconds": torch_s,
        "onnx_ratio": onnx_s["quantized"] / onnx_s["float"],
        "onnx_fp32_ratio": onnx_s["quantized_fp32"] / onnx_s["float"],
        "onnx_folded_ratio": onnx_s["quantized_folded"] / onnx_s["float"],
        "compressed_ratio": torch_s["compressed"] / torch_s["dequantized"],
        "exports": result.report["exports"],
    }


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _kb(n: int) -> str:
    return f"{n / 1000:,.1f} KB"


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Deployable outputs ({meta['date']}, {meta['cpu']}, torch {meta['torch']}, "
        f"onnxruntime {meta['onnxruntime']}; `python -m bench.bench_deploy`)",
        "",
        "| model | params | avg bits | float .pt2 | model.pt2 | model.compressed.pt2 | "
        "float ONNX | model.onnx | packed | ORT latency vs float (default / fp32 compute / "
        "folded) | "
        "compressed .pt2 latency vs model.pt2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["sizes"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['avg_bits']} | {_kb(s['float'])} | "
            f"{_kb(s['dequantized_dropin'])} | {_kb(s['compressed_dropin'])} | "
            f"{_kb(s['float_onnx'])} | {_kb(s['onnx'])} | {_kb(s['packed'])} | "
            f"{r['onnx_ratio']:.2f}x / {r['onnx_fp32_ratio']:.2f}x / {r['onnx_folded_ratio']:.2f}x "
            f"| {r['compressed_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for name, (module, inputs, classes) in _models().items():
        rows.append(_one(name, module, inputs, classes, args.repeats))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "exports"}), flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "repeats": args.repeats,
    }
    text = _markdown(rows, meta)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "deploy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS / "deploy.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
