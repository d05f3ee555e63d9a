"""Real architectures from Hugging Face ``transformers``, built from tiny configs with random
weights (nothing is downloaded), each wrapped to take positional tensors and return one tensor,
as a user would trace or export it.

``HF_ZOO[name]()`` returns a :class:`ZooEntry`: the module in eval mode, a function making ``n``
samples of its inputs, the number of classes its output scores (0 for a regression-like
output), and what the entry exercises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["HF_ZOO", "ZooEntry"]

VOCAB = 64
SEQ = 6


@dataclass
class ZooEntry:
    module: nn.Module
    inputs: Callable[[int, int], list[torch.Tensor]]  # (n, seed) -> inputs
    classes: int
    exercises: str


def _text(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[: n // 2, -2:] = 0  # some padding
    return [ids, mask]


class _Logits(nn.Module):
    """``model(input_ids, attention_mask).logits`` (or another field) with no cache."""

    def __init__(self, model: nn.Module, field: str = "logits", last_token: bool = False) -> None:
        super().__init__()
        self.model = model
        self.field = field
        self.last_token = last_token

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.last_token else {}
        out = getattr(self.model(input_ids=ids, attention_mask=mask, **kwargs), self.field)
        # A causal LM scored on its last position keeps the output (N, V): class scores.
        return out[:, -1] if self.last_token else out


class _Single(nn.Module):
    """``model(x).<field>`` for models with one tensor input (vision, audio)."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = getattr(self.model(x), self.field)
        return out


class _Seq2Seq(nn.Module):
    """An encoder-decoder scored on its decoder's first positions (teacher forcing)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        decoder = ids[:, :3]
        out: torch.Tensor = self.model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, use_cache=False
        ).logits
        return out[:, -1]


def _small(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2}
    base.update(num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    base.update(kw)
    return base


def bert() -> ZooEntry:
    from transformers import BertConfig, BertForSequenceClassification

    m = BertForSequenceClassification(BertConfig(**_small(num_labels=3)))
    return ZooEntry(_Logits(m), _text, 3, "learned positions shared by the batch (1, T)")


def distilbert() -> ZooEntry:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
        max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return ZooEntry(_Logits(DistilBertForSequenceClassification(cfg)), _text, 3, "positions")


def roberta() -> ZooEntry:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(**_small(num_labels=3, max_position_embeddings=SEQ + 4, pad_token_id=1))
    m = RobertaForSequenceClassification(cfg)
    return ZooEntry(_Logits(m), _text, 3, "positions computed from the ids (per sample)")


def albert() -> ZooEntry:
    from transformers import AlbertConfig, AlbertForSequenceClassification

    cfg = AlbertConfig(**_small(num_labels=3, embedding_size=8))
    m = AlbertForSequenceClassification(cfg)
    return ZooEntry(_Logits(m), _text, 3, "one layer's weights reused by every layer")


def gpt2() -> ZooEntry:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    m = GPT2LMHeadModel(cfg)
    return ZooEntry(
        _Logits(m, last_token=True), _text, VOCAB, "Conv1D (transposed weights), tied LM head"
    )


def llama() -> ZooEntry:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **_small(num_key_value_heads=1, head_dim=8, tie_word_embeddings=False, hidden_act="silu")
    )
    return ZooEntry(
        _Logits(LlamaForCausalLM(cfg), last_token=True),
        _text,
        VOCAB,
        "RMSNorm, rotary positions, SwiGLU, grouped-query attention",
    )


def t5() -> ZooEntry:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )  # fmt: skip
    return ZooEntry(
        _Seq2Seq(T5ForConditionalGeneration(cfg)),
        _text,
        VOCAB,
        "encoder-decoder, relative attention bias shared by the batch, tied embeddings",
    )


def vit() -> ZooEntry:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=4,
    )  # fmt: skip

    def images(n: int, seed: int) -> list[torch.Tensor]:
        return [torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))]

    return ZooEntry(_Single(ViTForImageClassification(cfg), "logits"), images, 4, "patch conv")


def _images(n: int, seed: int, size: int = 8) -> list[torch.Tensor]:
    return [torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))]


def clip_text() -> ZooEntry:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**_small(projection_dim=8, eos_token_id=2))
    return ZooEntry(
        _Logits(CLIPTextModelWithProjection(cfg), field="text_embeds"),
        _text,
        0,
        "causal text tower, positions shared by the batch, projection head",
    )


def clip_vision() -> ZooEntry:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, projection_dim=8,
    )  # fmt: skip
    return ZooEntry(
        _Single(CLIPVisionModelWithProjection(cfg), "image_embeds"),
        _images,
        0,
        "patch conv without bias, class embedding, positions shared by the batch",
    )


class _Encoder(nn.Module):
    """An encoder-only use of a model (``model.get_encoder()(x).last_hidden_state``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.encoder(x).last_hidden_state
        return out


def whisper_encoder() -> ZooEntry:
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=2, encoder_attention_heads=2,
        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=8, max_target_positions=8, pad_token_id=1, bos_token_id=2,
        eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip

    def mels(n: int, seed: int) -> list[torch.Tensor]:
        return [torch.randn(n, 8, 16, generator=torch.Generator().manual_seed(seed))]

    return ZooEntry(_Encoder(WhisperModel(cfg)), mels, 0, "conv1d front end, sinusoidal table")


def wav2vec2() -> ZooEntry:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    cfg = Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
        feat_extract_norm="layer",
    )  # fmt: skip

    def audio(n: int, seed: int) -> list[torch.Tensor]:
        return [torch.randn(n, 160, generator=torch.Generator().manual_seed(seed))]

    return ZooEntry(
        _Single(Wav2Vec2ForCTC(cfg), "logits"),
        audio,
        0,  # CTC scores per frame: labels are drawn from the model, per frame
        "conv feature encoder, grouped positional conv with weight norm (parametrised)",
    )


HF_ZOO: dict[str, Callable[[], ZooEntry]] = {
    "bert": bert,
    "distilbert": distilbert,
    "roberta": roberta,
    "albert": albert,
    "gpt2": gpt2,
    "llama": llama,
    "t5": t5,
    "vit": vit,
    "clip_text": clip_text,
    "clip_vision": clip_vision,
    "whisper_encoder": whisper_encoder,
    "wav2vec2": wav2vec2,
}
