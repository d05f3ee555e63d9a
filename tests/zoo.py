"""Small models the tests build themselves, saved in both accepted formats."""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.conv3 = nn.Conv1d(8, 8, 2)
        self.fc = nn.Linear(8 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))  # (N, 8, 4, 4)
        x = x.mean(dim=3)  # (N, 8, 4)
        x = torch.relu(self.conv3(x))  # (N, 8, 3)
        return self.fc(torch.flatten(x, 1))


class SmallMLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyTextEncoder(nn.Module):
    """Two inputs: int64 token ids and a float attention mask; batch_first attention."""

    def __init__(self, vocab: int = 30, d: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        h = h + torch.relu(self.ff(h))
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(pooled)


class TinyLSTM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


def torchscript_bytes(
    model: nn.Module, example: tuple[torch.Tensor, ...], *, trace: bool = False
) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = (
            torch.jit.trace(model, example, check_trace=False) if trace else torch.jit.script(model)
        )
        torch.jit.save(scripted, buf)
    return buf.getvalue()


def export_bytes(
    model: nn.Module, example: tuple[torch.Tensor, ...], *, dynamic_batch: bool = True
) -> bytes:
    buf = io.BytesIO()
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: batch} for _ in example)
    program = torch.export.export(model.eval(), example, dynamic_shapes=dynamic_shapes)
    torch.export.save(program, buf)
    return buf.getvalue()
