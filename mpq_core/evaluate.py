"""Evaluation of a (quantized) model against labels and against the float model's outputs.

Metrics are running sums over batches (each batch computed in float32, the sums kept in
float64), so no output is held for more than one batch: a language model's outputs over the
whole evaluation set (samples x positions x vocabulary) would take gigabytes. The float model's
outputs, the reference, are recomputed batch by batch too (:meth:`Evaluator.compare` swaps the
float weights in for one forward pass), so memory is the model plus one batch whatever the
number of samples.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel, select_output
from mpq_core.runner import Batch, iter_batches
from mpq_core.weight_sets import WeightSet, load_weights, swapped_in

__all__ = [
    "Comparison",
    "Evaluator",
    "MetricSums",
    "Metrics",
    "compare",
    "evaluate",
    "model_outputs",
    "task_loss",
]

#: ``F.cosine_similarity``'s default: the product of the norms is at least this.
_COSINE_EPS = 1e-8


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


class Comparison(NamedTuple):
    """The float model's and the quantized (or fine-tuned) model's metrics on one data set,
    and the shape of one sample's scored output (e.g. ``(T, C)`` for a language model)."""

    float_metrics: Metrics
    quantized_metrics: Metrics
    output_shape: tuple[int, ...]


def is_class_scores(out: torch.Tensor) -> bool:
    """Whether a batch of outputs ``(N, C)`` or ``(N, T, C)`` holds class scores."""
    return out.dim() in (2, 3) and out.shape[-1] >= 2


def is_class_score_shape(output_shape: tuple[int, ...]) -> bool:
    """:func:`is_class_scores` for one sample's output shape (no batch dimension)."""
    return len(output_shape) in (1, 2) and output_shape[-1] >= 2


def model_outputs(
    model: LoadedModel,
    data: CalibrationData,
    *,
    batch_size: int = 64,
    output_key: Any = None,
    act_quant: Any = None,
) -> torch.Tensor:
    """The scored output over all samples (no gradients), optionally under activation
    quantization (an ``ActivationQuantizer``). It holds every sample's output: for small data
    (tests, probes); the job itself evaluates batch by batch (:func:`compare`)."""
    with capture_context(grad=False):
        outs = [
            _batch_output(model, batch, output_key, act_quant)
            for batch in iter_batches(model, data, batch_size)
        ]
    return torch.cat(outs)


def _batch_output(
    model: LoadedModel, batch: Batch, output_key: Any, act_quant: Any
) -> torch.Tensor:
    """One batch's scored output, padding dropped, detached, in float32."""
    with act_quant if act_quant is not None else nullcontext():
        out = select_output(model(*batch.inputs), output_key)
    return out[: batch.valid].detach().float()


def task_loss(
    out: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None
) -> torch.Tensor:
    """The evaluation loss (see ``Metrics.loss``) of whole outputs, a scalar."""
    total, count = _loss_sum(out, labels, reference)
    return total / count


def _loss_sum(
    out: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """The evaluation loss summed over what its mean runs over, and how many those are:
    labelled positions (cross entropy), rows of class scores (KL) or elements (MSE)."""
    if labels is not None and is_class_scores(out):
        flat = labels.reshape(-1)
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), flat, reduction="sum")
        return ce, int((flat != -100).sum())  # cross_entropy's ignore_index
    assert reference is not None, "without labels the loss is measured against the float model"
    if is_class_scores(out):
        logp, logq = F.log_softmax(reference, -1), F.log_softmax(out, -1)
        kl = F.kl_div(logq, logp, log_target=True, reduction="sum")  # sum p (log p - log q)
        return kl, out.numel() // out.shape[-1]
    return ((out - reference) ** 2).sum(), out.numel()


@dataclass
class MetricSums:
    """Running sums of :class:`Metrics` over batches, as float64 scalars.

    Each mean is a sum over batches divided by the total count (not a mean of batch means),
    so the batch size does not change the result.
    """

    loss: float = 0.0
    loss_count: int = 0
    hits: int = 0
    labelled: int = 0
    cosine: float = 0.0
    signal: float = 0.0
    noise: float = 0.0
    samples: int = 0
    has_labels: bool = False
    class_scores: bool = False
    sequence: bool = False
    #: Elements of output scored at once (16 MiB per float32 temporary; at least one sample).
    chunk_elements: int = 1 << 22

    def add(self, out: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Add one batch: ``out`` and ``reference`` ``(B, ...)`` float32, ``labels`` or None.

        The batch is taken a few samples at a time: the loss and the cosine each make several
        temporaries the size of what they are given (log-softmaxes, products), and a batch of
        language-model scores is hundreds of megabytes.
        """
        self.class_scores, self.sequence = is_class_scores(out), out.dim() == 3
        self.has_labels = labels is not None
        rows = max(1, self.chunk_elements // max(1, out[:1].numel()))
        for i in range(0, out.shape[0], rows):
            part = slice(i, i + rows)
            self._add_samples(out[part], reference[part], None if labels is None else labels[part])

    def _add_samples(
        self, out: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        """Add a few samples' sums (one chunk of :meth:`add`)."""
        loss, count = _loss_sum(out, labels, reference)
        self.loss += float(loss)
        self.loss_count += count
        if labels is not None and self.class_scores:
            self.hits += int((out.argmax(-1) == labels).sum())
            self.labelled += labels.numel()
        flat, ref = out.reshape(out.shape[0], -1), reference.reshape(reference.shape[0], -1)
        # Per-sample sums in float32, combined in float64: for identical outputs dot equals both
        # squared norms bit for bit and sqrt(dot * dot) is exact, so the cosine is exactly 1.
        dot, out_sq, ref_sq = ((flat * ref).sum(1), (flat * flat).sum(1), (ref * ref).sum(1))
        norms = (out_sq.double() * ref_sq.double()).clamp_min(_COSINE_EPS**2).sqrt()
        self.cosine += float((dot.double() / norms).sum())
        self.signal += float(ref_sq.double().sum())
        self.noise += float(((flat - ref) ** 2).sum())
        self.samples += out.shape[0]

    def metrics(self) -> Metrics:
        """The metrics of every batch added so far."""
        loss = self.loss / self.loss_count if self.loss_count else math.nan
        accuracy = perplexity = None
        if self.has_labels and self.class_scores:
            accuracy = self.hits / max(self.labelled, 1)
            if self.sequence:  # sequence outputs: a language model's perplexity
                perplexity = math.exp(loss) if loss < 50 else float("inf")
        return Metrics(
            loss=loss,
            accuracy=accuracy,
            perplexity=perplexity,
            cosine=self.cosine / max(self.samples, 1),
            sqnr_db=_sqnr_db(self.signal, self.noise),
            samples=self.samples,
        )


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def _labels(batch: Batch) -> torch.Tensor | None:
    return batch.labels[: batch.valid] if batch.labels is not None else None


def evaluate(
    model: LoadedModel,
    data: CalibrationData,
    reference: torch.Tensor,
    *,
    batch_size: int = 64,
    output_key: Any = None,
    act_quant: Any = None,
) -> Metrics:
    """Score ``model`` on ``data``; ``reference`` holds the float model's outputs on it (whole:
    for small data; :func:`compare` recomputes the reference batch by batch instead).

    Example:
        >>> ref = model_outputs(model, test)  # doctest: +SKIP
        >>> evaluate(model, test, ref).accuracy  # doctest: +SKIP
    """
    sums = MetricSums()
    with capture_context(grad=False):
        for batch in iter_batches(model, data, batch_size):
            ref = reference[batch.start : batch.start + batch.valid].float()
            # Passed on, not bound: the output is freed before the next batch runs.
            sums.add(_batch_output(model, batch, output_key, act_quant), ref, _labels(batch))
    return sums.metrics()


def compare(
    model: LoadedModel,
    data: CalibrationData,
    float_weights: WeightSet,
    quantized_weights: WeightSet | None = None,
    *,
    batch_size: int = 64,
    output_key: Any = None,
    act_quant: Any = None,
) -> Comparison:
    """Score the float and the quantized model on ``data`` in one pass, batch by batch: each
    batch runs with ``float_weights`` swapped in (the reference, never under ``act_quant``),
    then with the model's own weights (under ``act_quant``). The model ends holding
    ``quantized_weights``.

    Args:
        model: the model.
        data: what to score on.
        float_weights: the float values of the parameters that differ between the two models
            (swapped in, not copied: :func:`mpq_core.weight_sets.swapped_in`).
        quantized_weights: the quantized (or fine-tuned) values of the same parameters,
            loaded into the model first; None for the values the model holds now.
        batch_size, output_key, act_quant: as for :func:`evaluate`.

    Example:
        >>> float_metrics, quantized_metrics, _ = compare(model, test, float_weights)  # doctest: +SKIP
    """
    if quantized_weights is not None:
        load_weights(model, quantized_weights)
    ref_sums, sums = MetricSums(), MetricSums()
    shape: tuple[int, ...] = ()
    with capture_context(grad=False):
        for batch in iter_batches(model, data, batch_size):
            # One function call per batch: its outputs are freed on return, not kept alive by
            # loop variables while the next batch's outputs are computed.
            shape = _compare_batch(
                model, batch, float_weights, output_key, act_quant, (ref_sums, sums)
            )
    return Comparison(ref_sums.metrics(), sums.metrics(), shape)


def _compare_batch(
    model: LoadedModel,
    batch: Batch,
    float_weights: WeightSet,
    output_key: Any,
    act_quant: Any,
    sums: tuple[MetricSums, MetricSums],
) -> tuple[int, ...]:
    """Run ``batch`` with the ``float_weights``, then with the model's own, and add both to
    ``sums``; the shape of one sample's output."""
    with swapped_in(model, float_weights):
        ref = _batch_output(model, batch, output_key, None)
    out = _batch_output(model, batch, output_key, act_quant)
    labels = _labels(batch)
    sums[0].add(ref, ref, labels)
    sums[1].add(out, ref, labels)
    return tuple(out.shape[1:])


@dataclass(frozen=True)
class Evaluator:
    """:func:`compare`, :func:`evaluate` and :func:`model_outputs` bound to one job's batch
    size, output key and activation quantizer, so a job states them once.

    Example:
        >>> score = Evaluator(batch_size=32, output_key="logits")  # doctest: +SKIP
        >>> float_metrics, quantized_metrics, _ = score.compare(model, test, float_weights)  # doctest: +SKIP
    """

    batch_size: int = 64
    output_key: Any = None
    act_quant: Any = None

    def outputs(self, model: LoadedModel, data: CalibrationData) -> torch.Tensor:
        """The model's scored outputs on ``data``, all held (no activation quantization)."""
        return model_outputs(model, data, batch_size=self.batch_size, output_key=self.output_key)

    def compare(
        self,
        model: LoadedModel,
        data: CalibrationData,
        float_weights: WeightSet,
        quantized_weights: WeightSet | None = None,
    ) -> Comparison:
        """:func:`compare` with this evaluator's settings."""
        return compare(
            model,
            data,
            float_weights,
            quantized_weights,
            batch_size=self.batch_size,
            output_key=self.output_key,
            act_quant=self.act_quant,
        )

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
