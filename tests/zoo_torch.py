"""The torchvision/timm architecture patterns and plain-torch layers of the test zoo, written
out here because torchvision (and timm, which needs it) cannot be installed beside this machine's
torch 2.13 CPU build (PyPI's torchvision 0.28 fails to load its operators against it: "operator
torchvision::nms does not exist"). Each keeps the pattern that matters to quantization:

- ResNet: 3x3 convs with BatchNorm, a strided 1x1 downsample on the skip path;
- MobileNetV3: depthwise convs, squeeze-excitation (1x1 convs on pooled features), hardswish;
- EfficientNet: MBConv (expand, depthwise, SE, project) with SiLU and a residual;
- ShuffleNetV2: channel split, branch convs and the channel shuffle (view/transpose);
- DenseNet: concatenating dense layers and a transition;
- ConvNeXt: 7x7 depthwise conv, channels-last LayerNorm, a Linear MLP, layer scale;
- plain torch: sequence-first nn.MultiheadAttention, 2-layer bidirectional LSTM and GRU,
  Conv3d, ConvTranspose2d, an embedding tied to the output projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo_hf import ZooEntry

__all__ = ["TORCH_ZOO"]

CLASSES = 5


Inputs = Callable[[int, int], list[torch.Tensor]]


def _images(channels: int = 3, size: int = 16) -> Inputs:
    def make(n: int, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(n, channels, size, size, generator=g)]

    return make


def _tokens(vocab: int = 20, seq: int = 5) -> Inputs:
    def make(n: int, seed: int) -> list[torch.Tensor]:
        return [torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))]

    return make


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


class _Head(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = _bn(8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = _bn(16)
        self.down = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.bn_down = _bn(16)
        self.head = _Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.head(F.relu(y + self.bn_down(self.down(x))))


class _SE(nn.Module):
    def __init__(self, c: int, gate: nn.Module) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, max(2, c // 4), 1)
        self.expand = nn.Conv2d(max(2, c // 4), c, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(F.relu(self.reduce(s))))


class MobileNetV3ish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn0 = _bn(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = _bn(8)
        self.se = _SE(8, nn.Hardsigmoid())
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = _bn(16)
        self.head = _Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.bn0(self.stem(x)))
        x = self.se(F.hardswish(self.bn1(self.dw(x))))
        return self.head(F.hardswish(self.bn2(self.pw(x))))


class EfficientNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = _bn(8)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.bn1 = _bn(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn2 = _bn(24)
        self.se = _SE(24, nn.Sigmoid())
        self.project = nn.Conv2d(24, 8, 1, bias=False)
        self.bn3 = _bn(8)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn0(self.stem(x)))
        y = F.silu(self.bn1(self.expand(x)))
        y = self.se(F.silu(self.bn2(self.dw(y))))
        return self.head(x + self.bn3(self.project(y)))


class ShuffleNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = _bn(8)
        self.pw1 = nn.Conv2d(4, 4, 1, bias=False)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.pw2 = nn.Conv2d(4, 4, 1, bias=False)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        keep, branch = x.chunk(2, dim=1)
        branch = F.relu(self.pw2(self.dw(F.relu(self.pw1(branch)))))
        x = torch.cat([keep, branch], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        return self.head(x)


class DenseNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.ModuleList()
        c = 8
        for _ in range(2):
            self.layers.append(
                nn.Sequential(
                    _bn(c),
                    nn.ReLU(),
                    nn.Conv2d(c, 8, 1, bias=False),
                    _bn(8),
                    nn.ReLU(),
                    nn.Conv2d(8, 4, 3, padding=1, bias=False),
                )
            )
            c += 4
        self.transition = nn.Sequential(_bn(c), nn.ReLU(), nn.Conv2d(c, 8, 1, bias=False))
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return self.head(F.avg_pool2d(self.transition(x), 2))


class ConvNeXtish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16)
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)  # channels last
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean(dim=(2, 3)))


class SeqFirstAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2)  # (T, N, D): rows interleave the samples
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(0, 1)
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(y.mean(dim=0))


class BiRNN(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = cell(8, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.emb(ids))
        return self.fc(y.mean(dim=1))  # every step of both directions reaches the output


class Volumetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3, 4)))


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.conv(x)))  # an image out: scored as a regression


class TiedLM(nn.Module):
    """The output projection is the input embedding: one weight, used twice per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.mix = nn.Linear(12, 12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(ids).mean(dim=1)))
        return F.linear(h, self.emb.weight)


def _entry(module: nn.Module, inputs: Inputs, classes: int, exercises: str) -> ZooEntry:
    return ZooEntry(module, inputs, classes, exercises)


def _volumes(n: int, seed: int) -> list[torch.Tensor]:
    return [torch.randn(n, 2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))]


TORCH_ZOO: dict[str, Callable[[], ZooEntry]] = {
    "resnet": lambda: _entry(ResNetish(), _images(), CLASSES, "BN convs, strided 1x1 skip"),
    "mobilenetv3": lambda: _entry(MobileNetV3ish(), _images(), CLASSES, "depthwise, SE"),
    "efficientnet": lambda: _entry(EfficientNetish(), _images(), CLASSES, "MBConv, SE, SiLU"),
    "shufflenet": lambda: _entry(ShuffleNetish(), _images(), CLASSES, "split and shuffle"),
    "densenet": lambda: _entry(DenseNetish(), _images(), CLASSES, "concatenation"),
    "convnext": lambda: _entry(ConvNeXtish(), _images(), CLASSES, "7x7 depthwise, LN, MLP"),
    "mha_seq_first": lambda: _entry(SeqFirstAttention(), _tokens(), CLASSES, "interleaved rows"),
    "bilstm": lambda: _entry(BiRNN(nn.LSTM), _tokens(), CLASSES, "2-layer bidirectional LSTM"),
    "bigru": lambda: _entry(BiRNN(nn.GRU), _tokens(), CLASSES, "2-layer bidirectional GRU"),
    "conv3d": lambda: _entry(Volumetric(), _volumes, CLASSES, "Conv3d"),
    "conv_transpose": lambda: _entry(Upsampler(), _images(size=4), 0, "ConvTranspose2d"),
    "tied_lm": lambda: _entry(TiedLM(), _tokens(), 20, "embedding tied to the output layer"),
}
