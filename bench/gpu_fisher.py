"""Fisher sensitivities on CUDA: agreement with the CPU result, and cost on a GPU.

Run on a machine with a GPU: ``python -m bench.gpu_fisher [OUT_DIR]``. Checks that the CUDA
path gives the same Omega as the CPU path on the small test models (TorchScript and
torch.export), then times fisher against one forward+backward pass over the calibration set on
a larger CNN, both on the GPU, and writes ``gpu_fisher.json``.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel, load_model
from mpq_core.profiling import profile_model
from mpq_core.sensitivity.fisher import fisher_sensitivity
from tests.zoo import SmallCNN, TinyTextEncoder, export_bytes, torchscript_bytes

BITS = [2, 3, 4, 5, 6, 8]


def _to(
    model: LoadedModel, data: CalibrationData, device: str
) -> tuple[LoadedModel, CalibrationData]:
    model.module.to(device)
    labels = data.labels.to(device) if data.labels is not None else None
    return model, CalibrationData([t.to(device) for t in data.inputs], labels)


@contextmanager
def _sdpa(which: str) -> Iterator[None]:
    if which == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield
    else:
        yield


def _compare(
    blob: bytes, example: tuple[torch.Tensor, ...], labels: torch.Tensor, sdpa: str
) -> dict[str, object]:
    results = {}
    try:
        for device in ("cpu", "cuda"):
            model, data = _to(load_model(blob), CalibrationData(list(example), labels), device)
            with _sdpa(sdpa):
                profile = profile_model(model, data)
                omega = fisher_sensitivity(model, data, profile, BITS, batch_size=16)
            results[device] = torch.tensor(omega)
    except RuntimeError as exc:
        return {"error": str(exc).splitlines()[0][:200]}
    rel = ((results["cuda"] - results["cpu"]).abs() / results["cpu"].abs().clamp_min(1e-30)).max()
    return {"max_rel_diff_cuda_vs_cpu": float(rel)}


def _agreement() -> list[dict[str, object]]:
    torch.manual_seed(0)
    n = 37
    cases = {
        "cnn": (SmallCNN().eval(), (torch.randn(n, 1, 8, 8),), 10),
        "text": (TinyTextEncoder().eval(), (torch.randint(0, 30, (n, 7)), torch.ones(n, 7)), 4),
    }
    rows = []
    for name, (module, example, classes) in cases.items():
        labels = torch.randint(0, classes, (n,))
        for fmt, blob in (
            ("torchscript", torchscript_bytes(module, example)),
            ("export", export_bytes(module, example)),
        ):
            for sdpa in ("default", "math"):
                rows.append(
                    {
                        "model": name,
                        "format": fmt,
                        "sdpa": sdpa,
                        **_compare(blob, example, labels, sdpa),
                    }
                )
                print(rows[-1], flush=True)
    return rows


class _WideCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = [3, 64, 128, 128, 256, 256]
        layers: list[nn.Module] = []
        for i in range(len(chans) - 1):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i % 2 else 1, padding=1),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(256, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _timing() -> dict[str, object]:
    torch.manual_seed(0)
    x = torch.randn(1024, 3, 32, 32)
    y = torch.randint(0, 100, (1024,))
    model, data = _to(
        load_model(torchscript_bytes(_WideCNN().eval(), (x[:2],))), CalibrationData([x], y), "cuda"
    )
    profile = profile_model(model, data)
    params = list(model.module.parameters())

    def forward_backward() -> None:
        with capture_context(grad=True):
            for s in range(0, 1024, 128):
                loss = nn.functional.cross_entropy(
                    model(data.inputs[0][s : s + 128]), data.labels[s : s + 128]
                )
                torch.autograd.grad(loss, params)
        torch.cuda.synchronize()

    def fisher() -> None:
        fisher_sensitivity(model, data, profile, BITS, batch_size=128)
        torch.cuda.synchronize()

    def best(fn: object, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return min(times)

    forward_backward(), fisher()  # warm-up
    base, fish = best(forward_backward), best(fisher)
    out = {
        "model": "5-conv CNN, 32x32x3 inputs, 1024 samples, batch 128",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "forward_backward_s": base,
        "fisher_s": fish,
        "fisher_over_forward_backward": fish / base,
    }
    print(out, flush=True)
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "tf32": {
            "cudnn": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        },
        "agreement": _agreement(),
        "timing": _timing(),
    }
    (out_dir / "gpu_fisher.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
