"""Evaluation of a (quantized) model against labels and against the float model's outputs."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel, select_output
from mpq_core.runner import iter_batches

__all__ = ["Evaluator", "Metrics", "evaluate", "model_outputs", "task_loss"]


@dataclass
class Metrics:
    """Quality of a model's outputs on one data set.

    Attributes:
        loss: mean cross entropy against the labels (per position for sequence outputs) when
            labels exist; else the distillation loss against the float model (KL on class
            scores, mean squared error otherwise).
        accuracy: top-1 accuracy when labels exist.
        perplexity: ``exp(loss)`` for sequence outputs ``(N, T, C)`` with labels.
        cosine: mean cosine similarity of each sample's output with the float model's.
        sqnr_db: signal-to-quantization-noise ratio of the outputs, ``10 log10(|y|^2/|y-y_q|^2)``.
    """

    loss: float
    accuracy: float | None
    perplexity: float | None
    cosine: float
    sqnr_db: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_outputs(
    model: LoadedModel,
    data: CalibrationData,
    *,
    batch_size: int = 64,
    output_key: Any = None,
    act_quant: Any = None,
) -> torch.Tensor:
    """The scored output over all samples (no gradients), optionally under activation
    quantization (an ``ActivationQuantizer``)."""
    outs = []
    with capture_context(grad=False):
        for batch in iter_batches(model, data, batch_size):
            with act_quant if act_quant is not None else nullcontext():
                out = select_output(model(*batch.inputs), output_key)
            outs.append(out[: batch.valid].detach().float())
    return torch.cat(outs)


def is_class_scores(out: torch.Tensor) -> bool:
    return out.dim() in (2, 3) and out.shape[-1] >= 2


def task_loss(
    out: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None
) -> torch.Tensor:
    """The evaluation loss (see ``Metrics.loss``), a scalar."""
    if labels is not None and is_class_scores(out):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))
    assert reference is not None, "without labels the loss is measured against the float model"
    if is_class_scores(out):
        logp, logq = F.log_softmax(reference, -1), F.log_softmax(out, -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()
    return F.mse_loss(out, reference)


def evaluate(
    model: LoadedModel,
    data: CalibrationData,
    reference: torch.Tensor,
    *,
    batch_size: int = 64,
    output_key: Any = None,
    act_quant: Any = None,
) -> Metrics:
    """Score ``model`` on ``data``; ``reference`` holds the float model's outputs on it.

    Example:
        >>> ref = model_outputs(model, test)  # doctest: +SKIP
        >>> evaluate(model, test, ref).accuracy  # doctest: +SKIP
    """
    out = model_outputs(
        model, data, batch_size=batch_size, output_key=output_key, act_quant=act_quant
    )
    ref = reference.float()
    loss = float(task_loss(out.double(), data.labels, ref.double()))
    accuracy = perplexity = None
    if data.labels is not None and is_class_scores(out):
        accuracy = float((out.argmax(-1) == data.labels).double().mean())
        if out.dim() == 3:  # sequence outputs: a language model's perplexity
            perplexity = math.exp(loss) if loss < 50 else float("inf")
    flat, ref_flat = out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1)
    cosine = float(F.cosine_similarity(flat.double(), ref_flat.double(), dim=1).mean())
    noise = float(((flat.double() - ref_flat.double()) ** 2).sum())
    signal = float((ref_flat.double() ** 2).sum())
    sqnr = 10 * math.log10(signal / noise) if noise > 0 else float("inf")
    return Metrics(
        loss=loss,
        accuracy=accuracy,
        perplexity=perplexity,
        cosine=cosine,
        sqnr_db=sqnr,
        samples=out.shape[0],
    )


@dataclass(frozen=True)
class Evaluator:
    """:func:`evaluate` and :func:`model_outputs` bound to one job's batch size, output key and
    activation quantizer, so a job states them once.

    Example:
        >>> score = Evaluator(batch_size=32, output_key="logits")  # doctest: +SKIP
        >>> reference = score.outputs(model, test)  # doctest: +SKIP
        >>> score(model, test, reference).accuracy  # doctest: +SKIP
    """

    batch_size: int = 64
    output_key: Any = None
    act_quant: Any = None

    def outputs(self, model: LoadedModel, data: CalibrationData) -> torch.Tensor:
        """The model's scored outputs on ``data`` (the float reference: no activation
        quantization)."""
        return model_outputs(model, data, batch_size=self.batch_size, output_key=self.output_key)

    def __call__(
        self, model: LoadedModel, data: CalibrationData, reference: torch.Tensor
    ) -> Metrics:
        return evaluate(
            model,
            data,
            reference,
            batch_size=self.batch_size,
            output_key=self.output_key,
            act_quant=self.act_quant,
        )

    def with_act_quant(self, act_quant: Any) -> Evaluator:
        """The same evaluator with activations quantized by ``act_quant`` (or not, if None)."""
        return replace(self, act_quant=act_quant)
