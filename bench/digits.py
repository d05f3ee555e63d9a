"""scikit-learn digits as a small, offline benchmark: two trained models saved as TorchScript.

``load_digits`` gives 1,797 8x8 images of hand-written digits (pixel values 0..16). They are
scaled to [0, 1] and split once with seed 0 into 1,000 training, 297 calibration and 500 test
images. Two models are trained on the training split (Adam, 20 epochs, a few seconds each)
and saved with ``torch.jit.script`` under ``bench/work/`` together with the calibration and test
splits as ``.npz`` (``input``, ``labels``), in the shape the model takes. Training is skipped
when the files are already there.

* ``cnn``: conv 1->16 3x3, conv 16->32 3x3 stride 2, conv 32->32 3x3, linear 512->10, ReLU
  (19k parameters).
* ``mlp``: 64->128->64->10, ReLU (17k parameters).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData, load_data
from mpq_core.intake import LoadedModel, load_model
from mpq_core.runner import run_model

__all__ = [
    "WORK",
    "DigitsCNN",
    "DigitsMLP",
    "Prepared",
    "accuracy",
    "mean_ce",
    "prepare",
    "split_digits",
]

WORK = Path(__file__).resolve().parent / "work"
ModelName = Literal["cnn", "mlp"]

N_TRAIN, N_CALIB, N_TEST = 1000, 297, 500


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@dataclass
class Prepared:
    """A trained digits model on disk and its data splits, loaded."""

    name: str
    model_path: Path
    model: LoadedModel
    calib: CalibrationData
    test: CalibrationData
    float_test_accuracy: float
    train_seconds: float
    train_calib: CalibrationData
    """The first 297 images of the training split: calibration data the model was trained on,
    as post-training quantization often uses in practice."""


def split_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed split: ``{"train"|"calib"|"test": (images (N, 8, 8) float32 in [0,1], labels)}``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cuts = {
        "train": order[:N_TRAIN],
        "calib": order[N_TRAIN : N_TRAIN + N_CALIB],
        "test": order[N_TRAIN + N_CALIB : N_TRAIN + N_CALIB + N_TEST],
    }
    return {k: (images[idx], labels[idx]) for k, idx in cuts.items()}


def _shape(name: ModelName, images: np.ndarray) -> np.ndarray:
    return images[:, None] if name == "cnn" else images.reshape(len(images), 64)


def _train(name: ModelName, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 20) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = DigitsCNN() if name == "cnn" else DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 50):
            idx = perm[start : start + 50]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(model: LoadedModel, data: CalibrationData, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on labelled ``data``."""
    assert data.labels is not None
    with capture_context(grad=False):
        out = run_model(model, data, batch_size)
    return float((out.argmax(dim=-1) == data.labels).float().mean())


def mean_ce(model: LoadedModel, data: CalibrationData, batch_size: int = 256) -> float:
    """Mean cross-entropy of ``model`` on labelled ``data`` (float64 accumulation)."""
    assert data.labels is not None
    with capture_context(grad=False):
        out = run_model(model, data, batch_size)
    return float(F.cross_entropy(out.double(), data.labels))


def prepare(name: ModelName, work: Path = WORK) -> Prepared:
    """Train (or reuse) the ``name`` digits model and load it with its calibration/test data."""
    work.mkdir(parents=True, exist_ok=True)
    model_path = work / f"digits_{name}.pt"
    calib_path = work / f"digits_{name}_calib.npz"
    test_path = work / f"digits_{name}_test.npz"
    meta_path = work / f"digits_{name}.json"
    if not all(p.exists() for p in (model_path, calib_path, test_path, meta_path)):
        parts = split_digits()
        for split, path in (("calib", calib_path), ("test", test_path)):
            images, labels = parts[split]
            np.savez(path, input=_shape(name, images), labels=labels)
        x_train, y_train = parts["train"]
        start = time.perf_counter()
        eager = _train(name, torch.from_numpy(_shape(name, x_train)), torch.from_numpy(y_train))
        seconds = time.perf_counter() - start
        torch.jit.save(torch.jit.script(eager), str(model_path))
        meta_path.write_text(json.dumps({"train_seconds": round(seconds, 2)}) + "\n")
    model = load_model(model_path)
    calib = load_data(calib_path)
    test = load_data(test_path)
    meta = json.loads(meta_path.read_text())
    x_train, y_train = split_digits()["train"]
    train_calib = CalibrationData(
        [torch.from_numpy(_shape(name, x_train[:N_CALIB]))], torch.from_numpy(y_train[:N_CALIB])
    )
    return Prepared(
        name=name,
        model_path=model_path,
        model=model,
        calib=calib,
        test=test,
        float_test_accuracy=accuracy(model, test),
        train_seconds=float(meta["train_seconds"]),
        train_calib=train_calib,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny models: threads only add OpenMP overhead on shared cores
    for model_name in ("cnn", "mlp"):
        p = prepare(model_name)
        params = sum(t.numel() for t in p.model.named_weights().values())
        print(
            f"{model_name}: {params} params, test accuracy {p.float_test_accuracy:.4f}, "
            f"trained in {p.train_seconds:.1f} s"
        )
