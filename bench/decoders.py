"""GPT-2-style decoders with random weights, traced to TorchScript as a user would export one.

Hugging Face ``GPT2LMHeadModel`` (token + learned position embeddings, pre-LN blocks, MLP 4x,
head tied to the token table), ``use_cache=False``, wrapped to return ``.logits`` and traced
with ``strict=False``. Built locally: nothing is downloaded. The benchmarks of issue 10 (scale,
Fisher and evaluation memory, the GPU projection) all measure this one architecture.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch

__all__ = ["DecoderConfig", "traced_decoder"]


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int
    width: int
    layers: int
    heads: int
    positions: int
    dtype: torch.dtype = torch.float32


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits  # type: ignore[no-any-return]


def traced_decoder(cfg: DecoderConfig, *, seed: int = 0, tokens: int = 2) -> tuple[bytes, int]:
    """The decoder's TorchScript archive and its parameter count (the tied head once).

    Args:
        cfg: the architecture.
        seed: the random weights.
        tokens: length of the example sequence traced with (the trace accepts any length up to
            ``cfg.positions``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=cfg.vocab,
        n_embd=cfg.width,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        n_positions=cfg.positions,
    )
    net = GPT2LMHeadModel(config).to(cfg.dtype).eval()
    net.config.use_cache = False
    params = sum(p.numel() for p in net.parameters())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = torch.zeros(2, tokens, dtype=torch.long)
        torch.jit.save(torch.jit.trace(_Logits(net), example, strict=False), buffer)
    return buffer.getvalue(), params
