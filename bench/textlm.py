"""A tiny character-level transformer language model as an offline benchmark with real text.

Corpus: the docstrings (module, class, function) of the Python standard library that runs this
file, read with ``ast`` from the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` in
sorted path order (folders ``test``, ``tests``, ``idlelib``, ``tkinter``, ``lib2to3``,
``site-packages`` skipped, files that fail to parse skipped). Each docstring is cleaned by
``ast.get_docstring`` (dedent), tabs become spaces, trailing spaces go, runs of blank lines
shrink to one, and docstrings are joined by a blank line. The text therefore depends on the
Python version (3.11 here: about 1.52 M characters from 514 files:
1.31 M train, 61 k calibration, 158 k test).

Vocabulary: id 0 is padding, id 1 unknown (any character outside printable ASCII), ids 2..97
are ``"\\n"`` and ``chr(32)..chr(126)``: ``VOCAB = 98``.

Split by *file* (crc32 of the path relative to the stdlib folder, mod 100): < 10 test,
10..15 calibration, the rest training, so held-out text comes from files the model never saw.
Calibration and test are ``N_CALIB = 256`` and ``N_TEST = 512`` windows of ``T = 64`` tokens
taken at evenly spaced offsets of their split's character stream; ``labels`` are the next
characters. The windows are cut from a continuous stream, so there is no padding: the mask
(``input_1``) is all ones and every label is a real next-token id (no position needs an
ignore index, which mpq's per-sample cross entropy does not have). The model still honours the
mask (key padding), so padded data would work as long as the padded positions carry some valid
class id (e.g. 0) as label and are left out of the perplexity, as :func:`perplexity` does.

Model (:class:`TinyLM`): token and learned position embeddings (both ``nn.Embedding``), two
pre-norm transformer blocks with hand-written causal self-attention (separate ``q``, ``k``,
``v``, ``o`` ``nn.Linear``), a GELU MLP, a final LayerNorm and an untied LM head:
d_model 128, 4 heads, ff 512, about 0.43 M parameters. Trained with AdamW and a cosine
learning rate for a fixed number of steps on random training windows (seed 0, one thread);
saved as TorchScript (``textlm.pt``) and as a torch.export program with a dynamic batch
dimension (``textlm.pt2``), with ``textlm_calib.npz`` / ``textlm_test.npz`` (``input_0`` int64
ids, ``input_1`` float32 mask, ``labels`` int64 (N, T)) and ``textlm.json`` under
``bench/work/``. Training is skipped when the files are already there.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData, load_data
from mpq_core.intake import LoadedModel, load_model
from mpq_core.runner import run_model

__all__ = [
    "N_CALIB",
    "N_TEST",
    "SEQ_LEN",
    "VOCAB",
    "WORK",
    "PreparedLM",
    "TinyLM",
    "collect_docstrings",
    "decode",
    "encode",
    "perplexity",
    "prepare_textlm",
    "split_corpus",
]

WORK = Path(__file__).resolve().parent / "work"

SEQ_LEN = 64
N_CALIB, N_TEST = 256, 512
PAD_ID, UNK_ID = 0, 1
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = 2 + len(_CHARS)  # 98
_LUT = np.full(128, UNK_ID, dtype=np.int64)
for _i, _c in enumerate(_CHARS):
    _LUT[ord(_c)] = 2 + _i

_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "lib2to3", "site-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

# Training schedule: fixed, so the result does not depend on the machine's speed.
TRAIN_STEPS = 1300
BATCH = 64
LR = 3e-3
WARMUP = 50
TRAIN_THREADS = 1  # as fast as two on a 2-core machine for a model this small


# ---------------------------------------------------------------------------------------------
# Corpus


def _normalise(doc: str) -> str:
    doc = doc.expandtabs(4)
    doc = "\n".join(line.rstrip() for line in doc.splitlines())
    doc = re.sub(r"\n{3,}", "\n\n", doc)
    return doc.strip()


def collect_docstrings(root: Path | None = None) -> dict[str, str]:
    """``{relative path: that file's docstrings joined by blank lines}``, in sorted path order."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    out: dict[str, str] = {}
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if set(rel.parts[:-1]) & _SKIP_DIRS:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, _DOC_NODES)]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # reading order
        docs = [_normalise(d) for n in nodes if (d := ast.get_docstring(n))]
        text = "\n\n".join(d for d in docs if d)
        if text:
            out[rel.as_posix()] = text
    return out


def encode(text: str) -> np.ndarray:
    """Character ids (int64); characters outside printable ASCII and newline map to UNK_ID."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.full(codes.shape, UNK_ID, dtype=np.int64)
    ascii_ = codes < 128
    ids[ascii_] = _LUT[codes[ascii_]]
    return ids


def decode(ids: np.ndarray | torch.Tensor) -> str:
    """Text of ``ids`` (pad dropped, unknown as ``?``)."""
    chars = []
    for i in np.asarray(ids).reshape(-1).tolist():
        if i >= 2:
            chars.append(_CHARS[i - 2])
        elif i == UNK_ID:
            chars.append("?")
    return "".join(chars)


def _split_of(rel: str) -> str:
    bucket = zlib.crc32(rel.encode()) % 100
    return "test" if bucket < 10 else "calib" if bucket < 16 else "train"


def split_corpus(docs: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """``{"train"|"calib"|"test": id stream}``, split by file; files joined by a blank line."""
    docs = collect_docstrings() if docs is None else docs
    parts: dict[str, list[str]] = {"train": [], "calib": [], "test": []}
    for rel, text in docs.items():
        parts[_split_of(rel)].append(text)
    return {k: encode("\n\n".join(v) + "\n\n") for k, v in parts.items()}


def _windows(stream: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows at evenly spaced offsets: ids (count, T) and next ids (count, T)."""
    last = len(stream) - SEQ_LEN - 1
    if last < 0:
        raise ValueError(f"stream of {len(stream)} ids is shorter than one window")
    starts = np.linspace(0, last, count).round().astype(np.int64)
    idx = starts[:, None] + np.arange(SEQ_LEN + 1)[None, :]
    win = stream[idx]
    return win[:, :-1].copy(), win[:, 1:].copy()


# ---------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention written with plain matmuls, GELU MLP."""

    def __init__(self, d_model: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ff)
        self.fc2 = nn.Linear(ff, d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.ln1(x)
        q = self.q(h).reshape(n, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).reshape(n, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(h).reshape(n, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(torch.logical_not(allowed), -1e9)
        att = torch.softmax(scores, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.o(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Character-level causal transformer: ``forward(ids (N,T) int64, mask (N,T) float)`` gives
    logits ``(N, T, VOCAB)``; ``mask`` is 1 for real tokens, 0 for padding (keys masked out)."""

    def __init__(
        self,
        vocab: int = VOCAB,
        d_model: int = 128,
        heads: int = 4,
        ff: int = 512,
        layers: int = 2,
        max_len: int = SEQ_LEN,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList([Block(d_model, heads, ff) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        # Positions per sample (N, T), so each sample's rows of the lookup are its own.
        pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(n, t)
        x = self.tok(ids) + self.pos(pos)
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        allowed = causal.unsqueeze(0).unsqueeze(0) & (mask > 0.5).unsqueeze(1).unsqueeze(2)
        for block in self.blocks:
            x = block(x, allowed)
        return self.head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def _lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _train(train: np.ndarray, steps: int = TRAIN_STEPS) -> TinyLM:
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)  # the same float results wherever it runs
    try:
        return _train_steps(train, steps)
    finally:
        torch.set_num_threads(threads)


def _train_steps(train: np.ndarray, steps: int) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.98),
    )
    stream = torch.from_numpy(train)
    gen = torch.Generator().manual_seed(0)
    offsets = torch.arange(SEQ_LEN + 1)
    ones = torch.ones(BATCH, SEQ_LEN)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps)
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH,), generator=gen)
        win = stream[starts[:, None] + offsets[None, :]]
        logits = model(win[:, :-1], ones)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), win[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def _eager_perplexity(model: nn.Module, ids: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        x = torch.from_numpy(ids)
        logits = model(x, torch.ones(x.shape, dtype=torch.float32))
        ce = F.cross_entropy(
            logits.double().reshape(-1, VOCAB), torch.from_numpy(labels).reshape(-1)
        )
    return math.exp(float(ce))


def perplexity(model: LoadedModel, data: CalibrationData, batch_size: int = 64) -> float:
    """exp of the mean next-token cross entropy over real tokens (mask ``input_1`` > 0.5)."""
    assert data.labels is not None
    with capture_context(grad=False):
        out = run_model(model, data, batch_size)
    ce = F.cross_entropy(
        out.double().reshape(-1, out.shape[-1]), data.labels.reshape(-1), reduction="none"
    )
    real = (data.inputs[1] > 0.5).reshape(-1).double() if len(data.inputs) > 1 else None
    mean = ce.mean() if real is None else (ce * real).sum() / real.sum()
    return math.exp(float(mean))


@dataclass
class PreparedLM:
    """The trained TinyLM on disk in both formats, loaded, with its calibration/test data."""

    script_path: Path
    export_path: Path
    calib_path: Path
    test_path: Path
    model: LoadedModel
    """The TorchScript model."""
    export_model: LoadedModel
    """The torch.export program (dynamic batch)."""
    calib: CalibrationData
    test: CalibrationData
    float_test_perplexity: float
    train_seconds: float
    train_steps: int
    corpus_chars: dict[str, int]


def _build(work: Path) -> None:
    """Train and write every file, each under a temporary name first and then renamed into
    place, so a concurrent caller never loads a half-written file (both build the same bits)."""
    tmp = work / f".textlm-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    streams = split_corpus()
    held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, count in (("calib", N_CALIB), ("test", N_TEST)):
        ids, labels = _windows(streams[split], count)
        held[split] = (ids, labels)
        mask = np.ones(ids.shape, dtype=np.float32)
        np.savez(tmp / f"textlm_{split}.npz", input_0=ids, input_1=mask, labels=labels)
    start = time.perf_counter()
    eager = _train(streams["train"])
    seconds = time.perf_counter() - start
    torch.jit.save(torch.jit.script(eager), str(tmp / "textlm.pt"))
    example = (torch.from_numpy(held["calib"][0][:4]), torch.ones(4, SEQ_LEN))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(
        eager, example, dynamic_shapes=({0: batch}, {0: batch}), strict=False
    )
    torch.export.save(program, str(tmp / "textlm.pt2"))
    meta = {
        "train_seconds": round(seconds, 2),
        "train_steps": TRAIN_STEPS,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "threads": TRAIN_THREADS,
        "params": sum(p.numel() for p in eager.parameters()),
        "corpus_chars": {k: len(v) for k, v in streams.items()},
        "test_perplexity": round(_eager_perplexity(eager, *held["test"]), 4),
        "calib_perplexity": round(_eager_perplexity(eager, *held["calib"]), 4),
    }
    (tmp / "textlm.json").write_text(json.dumps(meta, indent=1) + "\n")
    for name in ("textlm_calib.npz", "textlm_test.npz", "textlm.pt", "textlm.pt2", "textlm.json"):
        os.replace(tmp / name, work / name)
    tmp.rmdir()


def prepare_textlm(work: Path = WORK) -> PreparedLM:
    """Train (or reuse) TinyLM on stdlib docstrings and load it with its calibration/test data."""
    work.mkdir(parents=True, exist_ok=True)
    script_path = work / "textlm.pt"
    export_path = work / "textlm.pt2"
    calib_path = work / "textlm_calib.npz"
    test_path = work / "textlm_test.npz"
    meta_path = work / "textlm.json"
    if not all(p.exists() for p in (script_path, export_path, calib_path, test_path, meta_path)):
        _build(work)
    meta = json.loads(meta_path.read_text())
    model = load_model(script_path)
    test = load_data(test_path)
    return PreparedLM(
        script_path=script_path,
        export_path=export_path,
        calib_path=calib_path,
        test_path=test_path,
        model=model,
        export_model=load_model(export_path),
        calib=load_data(calib_path),
        test=test,
        float_test_perplexity=perplexity(model, test),
        train_seconds=float(meta["train_seconds"]),
        train_steps=int(meta["train_steps"]),
        corpus_chars={k: int(v) for k, v in meta["corpus_chars"].items()},
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    p = prepare_textlm()
    params = sum(t.numel() for t in p.model.named_weights().values())
    print(
        f"textlm: {params} params, corpus chars {p.corpus_chars}, {p.train_steps} steps in "
        f"{p.train_seconds:.1f} s, test perplexity {p.float_test_perplexity:.3f} "
        f"(export: {perplexity(p.export_model, p.test):.3f})"
    )
