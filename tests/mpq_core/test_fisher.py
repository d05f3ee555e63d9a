from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.errors import SpecError
from mpq_core.intake import LoadedModel, load_model, select_output
from mpq_core.losses import PerSampleLoss, resolve_loss_kind
from mpq_core.profiling import ModelProfile, profile_model
from mpq_core.quant_primitives import output_major, quantization_error
from mpq_core.runner import iter_batches
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity import compute_sensitivity
from mpq_core.sensitivity.fisher import fisher_sensitivity
from mpq_core.sensitivity_table import SensitivityTable
from tests.conftest import FIXED_BATCH, save_bytes, zoo_data

ZooBytes = Callable[[str, str], bytes]
BITS = [2, 4, 8]
N = 7  # samples; batch size 3 does not divide it
BATCH = 3


class Regressor(nn.Module):
    """Regression output (N, 3, 4): a per-token MLP on (N, 3, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _regressor(fmt: str) -> tuple[LoadedModel, CalibrationData]:
    torch.manual_seed(0)
    x = torch.randn(N, 3, 6, generator=torch.Generator().manual_seed(4))
    return load_model(save_bytes(Regressor().eval(), (x[:2],), fmt)), CalibrationData([x])


def reference_omega(
    model: LoadedModel,
    data: CalibrationData,
    profile: ModelProfile,
    bits: list[int],
    *,
    batch_size: int,
    loss: str = "auto",
    scheme: QuantScheme | None = None,
) -> torch.Tensor:
    """Omega[l][b] = 1/2 mean_n <g_n, Q_b(W) - W>^2 with one backward pass per sample.

    The targets are those the library draws (same PerSampleLoss, same batches: model-sampled
    labels and Gaussian probes are drawn per batch); the gradients are taken sample by sample.
    A fixed-batch model gets each sample repeated to its batch size, and only row 0's loss.
    """
    weights = model.named_weights()
    params = [weights[layer.name] for layer in profile.layers]
    # A weight stored (in, out) is quantized along its output channels, dim 1.
    dws = [
        [
            output_major(
                quantization_error(output_major(p, layer.transposed), b, scheme=scheme),
                layer.transposed,
            ).double()
            for b in bits
        ]
        for p, layer in zip(params, profile.layers, strict=True)
    ]
    per_sample: PerSampleLoss | None = None
    targets = []
    with capture_context(grad=False):
        for batch in iter_batches(model, data, batch_size):
            out = select_output(model(*batch.inputs))
            if per_sample is None:
                per_sample = PerSampleLoss(resolve_loss_kind(loss, out))
            labels = batch.labels if per_sample.kind == "ce" else None
            targets.append(per_sample.targets(out, labels, batch.start)[: batch.valid])
    assert per_sample is not None
    target = torch.cat(targets)
    size = model.fixed_batch or 1
    sums = torch.zeros(len(params), len(bits), dtype=torch.float64)
    unused: set[int] = set()
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with capture_context(grad=True):
            for n in range(data.num_samples):
                inputs = [t[n : n + 1].repeat(size, *([1] * (t.dim() - 1))) for t in data.inputs]
                out = select_output(model(*inputs))
                tgt = target[n : n + 1].repeat(size, *([1] * (target.dim() - 1)))
                loss_n = per_sample(out, tgt)[0]
                grads = torch.autograd.grad(loss_n, params, allow_unused=True)
                for i, g in enumerate(grads):
                    if g is None:
                        unused.add(i)
                        continue
                    for j, dw in enumerate(dws[i]):
                        sums[i, j] += float((g.double() * dw).sum()) ** 2
    finally:
        for p, r in zip(params, saved, strict=True):
            p.requires_grad_(r)
    if unused:
        names = [profile.layers[i].name for i in sorted(unused)]
        raise AssertionError(
            f"autograd reaches no gradient to {names}: the reference cannot check them"
        )
    return 0.5 * sums / data.num_samples


def _assert_rel_close(got: list[list[float]], want: torch.Tensor, rtol: float) -> None:
    g = torch.tensor(got, dtype=torch.float64)
    assert g.shape == want.shape
    assert bool((want > 0).all()), want  # every layer and bit width is actually exercised
    rel = ((g - want).abs() / want).max()
    assert float(rel) <= rtol, f"max relative error {float(rel):.3g}\n{g}\n{want}"


# ---------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "sampled"])
@pytest.mark.parametrize("fmt", ["script", "export"])
@pytest.mark.parametrize("name", ["cnn", "mlp", "text", "lstm"])
def test_matches_per_sample_reference(
    zoo_bytes: ZooBytes, name: str, fmt: str, labels: bool
) -> None:
    model = load_model(zoo_bytes(name, fmt))
    data = zoo_data(name, N, labels=labels)
    profile = profile_model(model, data)
    omega = fisher_sensitivity(model, data, profile, BITS, batch_size=BATCH)
    want = reference_omega(model, data, profile, BITS, batch_size=BATCH)
    _assert_rel_close(omega, want, 1e-3)


@pytest.mark.parametrize("fmt", ["script", "trace", "export"])
def test_mse_output_matches_reference(fmt: str) -> None:
    model, data = _regressor(fmt)
    profile = profile_model(model, data)
    assert [lay.name for lay in profile.layers] == ["fc1.weight", "fc2.weight"]
    omega = fisher_sensitivity(model, data, profile, BITS, batch_size=BATCH, loss="mse")
    want = reference_omega(model, data, profile, BITS, batch_size=BATCH, loss="mse")
    _assert_rel_close(omega, want, 1e-3)


@pytest.mark.parametrize(("name", "labels"), [("cnn", True), ("text", True), ("text", False)])
def test_fixed_batch_export_with_padding_matches_reference(
    zoo_bytes: ZooBytes, name: str, labels: bool
) -> None:
    model = load_model(zoo_bytes(name, "export_fixed"))
    assert model.fixed_batch == FIXED_BATCH and N % FIXED_BATCH != 0  # last batch is padded
    data = zoo_data(name, N, labels=labels)
    profile = profile_model(model, data)
    omega = fisher_sensitivity(model, data, profile, BITS, batch_size=BATCH)
    want = reference_omega(model, data, profile, BITS, batch_size=BATCH)
    _assert_rel_close(omega, want, 1e-3)
    # Padding adds nothing: the same model with a dynamic batch gives the same table.
    dynamic = load_model(zoo_bytes(name, "export"))
    omega_dynamic = fisher_sensitivity(dynamic, data, profile_model(dynamic, data), BITS)
    if labels:
        _assert_rel_close(omega, torch.tensor(omega_dynamic, dtype=torch.float64), 1e-4)


# --------------------------------------------------------------------------------- invariances


@pytest.mark.parametrize(
    ("name", "fmt", "mode"),
    [
        ("mlp", "script", "labels"),
        ("text", "script", "labels"),
        ("lstm", "export", "labels"),
        ("mlp", "script", "sampled"),
        ("regressor", "export", "mse"),
    ],
)
def test_independent_of_batch_size(zoo_bytes: ZooBytes, name: str, fmt: str, mode: str) -> None:
    if name == "regressor":
        model, data = _regressor(fmt)
    else:
        model = load_model(zoo_bytes(name, fmt))
        data = zoo_data(name, N, labels=mode == "labels")
    loss = "mse" if mode == "mse" else "auto"
    profile = profile_model(model, data)
    tables = {
        bs: torch.tensor(
            fisher_sensitivity(model, data, profile, BITS, batch_size=bs, loss=loss),
            dtype=torch.float64,
        )
        for bs in (N, BATCH, 2)
    }
    tolerance = 1e-4
    for bs in (BATCH, 2):
        rel = float(((tables[bs] - tables[N]).abs() / tables[N]).max())
        # Without labels (model-sampled labels, Gaussian probes) each sample's random target
        # must be fixed by its index alone, not by how the samples were batched.
        assert rel <= tolerance, (
            f"{mode}: Omega with batch_size={bs} differs from batch_size={N} by {rel:.3g} "
            f"(relative)\n{tables[bs]}\n{tables[N]}"
        )


@pytest.mark.parametrize(
    ("name", "fmt"), [("cnn", "script"), ("text", "trace"), ("lstm", "export")]
)
def test_parameters_restored(zoo_bytes: ZooBytes, name: str, fmt: str) -> None:
    model = load_model(zoo_bytes(name, fmt))
    data = zoo_data(name, N)
    profile = profile_model(model, data)
    named = dict(model.module.named_parameters())
    # A mix of flags: some quantized weights frozen, some trainable, a bias frozen.
    for i, (_pname, p) in enumerate(sorted(named.items())):
        p.requires_grad_(i % 2 == 0)
    flags = {k: p.requires_grad for k, p in named.items()}
    values = {k: p.detach().clone() for k, p in named.items()}
    buffers = {k: b.clone() for k, b in model.module.named_buffers()}
    fisher_sensitivity(model, data, profile, BITS, batch_size=BATCH)
    assert {k: p.requires_grad for k, p in named.items()} == flags
    for k, p in named.items():
        assert torch.equal(p.detach(), values[k]), k
        assert p.grad is None, k
    for k, b in model.module.named_buffers():
        assert torch.equal(b, buffers[k]), k


# ------------------------------------------------------------------ compute_sensitivity + table


def test_compute_sensitivity_table_json_round_trip(zoo_bytes: ZooBytes, tmp_path: Path) -> None:
    model = load_model(zoo_bytes("text", "script"))
    data = zoo_data("text", N)
    profile = profile_model(model, data)
    table = compute_sensitivity("fisher", model, data, profile, [8, 2, 4, 2], batch_size=BATCH)
    assert isinstance(table, SensitivityTable)
    assert table.method == "fisher"
    assert table.bits == [2, 4, 8]  # sorted, deduplicated
    assert table.names == [lay.name for lay in profile.layers]
    assert table.float_params == profile.float_params
    direct = fisher_sensitivity(model, data, profile, [2, 4, 8], batch_size=BATCH)
    _assert_rel_close(table.omega, torch.tensor(direct, dtype=torch.float64), 1e-9)
    assert table.meta["model_sha256"] == model.sha256
    assert table.meta["model_format"] == "torchscript"
    assert table.meta["samples"] == N and table.meta["labels"] is True
    assert table.meta["options"] == {"batch_size": BATCH}
    assert table.row("head.weight") == dict(zip([2, 4, 8], table.omega[-1], strict=True))

    doc = json.loads(json.dumps(table.to_dict()))
    assert doc["schema_version"] == 1 and doc["kind"] == "mpq.sensitivity"
    back = SensitivityTable.from_dict(doc)
    assert back.to_dict() == table.to_dict()
    assert back.omega == table.omega  # floats survive JSON exactly
    assert back.layers == table.layers
    assert [lay.extra for lay in back.layers] == [lay.extra for lay in table.layers]
    path = tmp_path / "sens.json"
    table.save(path)
    assert SensitivityTable.load(path).to_dict() == table.to_dict()


def test_compute_sensitivity_rejects_bad_bits_and_method(zoo_bytes: ZooBytes) -> None:
    model = load_model(zoo_bytes("mlp", "script"))
    data = zoo_data("mlp", 4)
    profile = profile_model(model, data)
    for bits in ([1, 4], [4, 9], []):
        with pytest.raises(SpecError):
            compute_sensitivity("fisher", model, data, profile, bits)
    with pytest.raises(SpecError, match="unknown sensitivity method"):
        compute_sensitivity("magic", model, data, profile, [4])


class GRUClassifier(nn.Module):
    """nn.GRU runs as per-step linears on CPU: its matrices go through the exact path."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


class TransposedAnd3D(nn.Module):
    """A transposed 2-D convolution and a 3-D convolution (the per-bit-width conv path)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2)
        self.vol = nn.Conv3d(1, 2, 2)
        self.head = nn.Linear(3 * 9 * 9 + 2 * 3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.up(x)).flatten(1)
        return self.head(torch.cat([a, self.vol(v).flatten(1)], 1))


@pytest.mark.parametrize("fmt", ["script", "export"])
@pytest.mark.parametrize("which", ["gru", "transposed_3d"])
def test_more_layer_kinds_match_reference(fmt: str, which: str) -> None:
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    if which == "gru":
        module: nn.Module = GRUClassifier().eval()
        inputs = [torch.randint(0, 20, (N, 5), generator=g)]
        classes = 3
    else:
        module = TransposedAnd3D().eval()
        inputs = [torch.randn(N, 2, 4, 4, generator=g), torch.randn(N, 1, 4, 4, 4, generator=g)]
        classes = 4
    model = load_model(save_bytes(module, tuple(t[:2] for t in inputs), fmt))
    data = CalibrationData(inputs, torch.randint(0, classes, (N,), generator=g))
    profile = profile_model(model, data)
    kinds = {layer.kind for layer in profile.layers}
    assert kinds >= ({"embedding", "linear"} if which == "gru" else {"conv_transpose2d", "conv3d"})
    omega = fisher_sensitivity(model, data, profile, BITS, batch_size=BATCH)
    want = reference_omega(model, data, profile, BITS, batch_size=BATCH)
    _assert_rel_close(omega, want, 1e-3)


def test_fisher_keeps_no_batch_alive_after_it_is_scored() -> None:
    # Memory bounded by a batch, not by the data set: the tensors alive when each batch is
    # reported are the same in number from the second batch on (a result that kept its autograd
    # graph would hold every batch's activations, one batch more at each step).
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    model = load_model(save_bytes(net, (torch.randn(2, 32),), "trace"))
    data = CalibrationData(inputs=[torch.randn(256, 32)], labels=torch.randint(0, 5, (256,)))
    profile = profile_model(model, data)
    alive: list[int] = []

    def count(stage: str, fraction: float, metrics: dict[str, object]) -> None:
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))

    fisher_sensitivity(model, data, profile, [2, 4, 8], batch_size=32, progress=count)
    assert len(alive) == 8
    assert alive[1:] == [alive[1]] * 7, alive


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(group_size=32), QuantScheme(symmetric=False), QuantScheme(32, symmetric=False)],
    ids=["g32", "asym", "g32-asym"],
)
def test_scheme_matches_per_sample_reference(scheme: QuantScheme) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 96), nn.Tanh(), nn.Linear(96, 5)
    )
    model = load_model(save_bytes(net, (torch.randn(2, 64),), "trace"))
    data = CalibrationData(inputs=[torch.randn(N, 64)], labels=torch.randint(0, 5, (N,)))
    profile = profile_model(model, data)
    omega = fisher_sensitivity(model, data, profile, [2, 4, 16], batch_size=BATCH, scheme=scheme)
    want = reference_omega(model, data, profile, [2, 4, 16], batch_size=BATCH, scheme=scheme)
    _assert_rel_close(omega, want, 1e-3)
    plain = torch.tensor(fisher_sensitivity(model, data, profile, [2, 4], batch_size=BATCH))
    assert not torch.allclose(torch.tensor(omega)[:, :2], plain)  # the scheme changed dW
