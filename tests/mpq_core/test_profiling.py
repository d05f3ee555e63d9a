from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from mpq_core.data import CalibrationData
from mpq_core.errors import DataMismatch
from mpq_core.intake import load_model
from mpq_core.profiling import profile_model
from mpq_core.runner import check_data_fits
from tests.conftest import save_bytes, zoo_data, zoo_module

ZooBytes = Callable[[str, str], bytes]
FORMATS = ["script", "trace", "export"]

# name -> every quantizable weight: (name, kind, shape, hand-counted MACs per sample).
# Inputs (tests/conftest.py): cnn (1, 8, 8); mlp (16,); text ids/mask (7,); lstm ids (5,).
EXPECTED = {
    "cnn": [
        # Conv2d(1, 4, 3, padding=1) on 1x8x8: 4*8*8 outputs, each 1*3*3 multiplies.
        ("conv1.weight", "conv2d", (4, 1, 3, 3), 4 * 8 * 8 * (1 * 3 * 3)),
        # Conv2d(4, 8, 3, stride=2, padding=1, groups=2) on 4x8x8: out 8x4x4
        # (floor((8 + 2 - 3) / 2) + 1 = 4), each output sees 4/2 = 2 input channels * 3*3.
        ("conv2.weight", "conv2d", (8, 2, 3, 3), 8 * 4 * 4 * (2 * 3 * 3)),
        # Conv1d(8, 8, 2) on 8x4: out 8x3, each 8*2 multiplies.
        ("conv3.weight", "conv1d", (8, 8, 2), 8 * 3 * (8 * 2)),
        ("fc.weight", "linear", (10, 24), 10 * 24),
    ],
    "mlp": [
        ("net.0.weight", "linear", (12, 16), 12 * 16),
        ("net.2.weight", "linear", (12, 12), 12 * 12),
        ("net.4.weight", "linear", (5, 12), 5 * 12),
    ],
    "text": [
        ("emb.weight", "embedding", (30, 16), 0),  # a lookup: no multiplies
        # Packed q/k/v projection applied per token: 7 tokens * 48 * 16.
        ("attn.in_proj_weight", "linear", (48, 16), 7 * 48 * 16),
        ("attn.out_proj.weight", "linear", (16, 16), 7 * 16 * 16),
        ("ff.weight", "linear", (16, 16), 7 * 16 * 16),  # linear on (N, 7, 16): per token
        ("head.weight", "linear", (4, 16), 4 * 16),  # on the pooled (N, 16)
    ],
    "lstm": [
        ("emb.weight", "embedding", (20, 8), 0),
        # LSTM(8, 8): 4 gates * 8 hidden rows, 8 inputs, at each of 5 steps.
        ("rnn.weight_ih_l0", "rnn", (32, 8), 32 * 8 * 5),
        ("rnn.weight_hh_l0", "rnn", (32, 8), 32 * 8 * 5),
        ("head.weight", "linear", (3, 8), 3 * 8),
    ],
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_quantizable_weight_found(zoo_bytes: ZooBytes, name: str, fmt: str) -> None:
    profile = profile_model(load_model(zoo_bytes(name, fmt)), zoo_data(name, 5))
    got = [(lay.name, lay.kind, lay.shape, lay.params, lay.channels) for lay in profile.layers]
    want = [(n, k, s, _numel(s), s[0]) for n, k, s, _ in EXPECTED[name]]
    assert got == want


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_macs_match_hand_counts(zoo_bytes: ZooBytes, name: str, fmt: str) -> None:
    profile = profile_model(load_model(zoo_bytes(name, fmt)), zoo_data(name, 5))
    assert {lay.name: lay.macs for lay in profile.layers} == {
        n: macs for n, _, _, macs in EXPECTED[name]
    }


@pytest.mark.parametrize("fmt", ["script", "export"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_macs_independent_of_batch_size(zoo_bytes: ZooBytes, name: str, fmt: str) -> None:
    model = load_model(zoo_bytes(name, fmt))
    data = zoo_data(name, 7)
    macs = [
        [lay.macs for lay in profile_model(model, data, batch_size=bs).layers] for bs in (1, 3, 7)
    ]
    assert macs[0] == macs[1] == macs[2]
    assert macs[0] == [m for *_, m in EXPECTED[name]]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_float_params_are_total_minus_quantized(zoo_bytes: ZooBytes, name: str, fmt: str) -> None:
    profile = profile_model(load_model(zoo_bytes(name, fmt)), zoo_data(name, 5))
    eager = zoo_module(name)
    total = sum(p.numel() for p in eager.parameters())
    quantized = sum(_numel(s) for _, _, s, _ in EXPECTED[name])
    assert profile.total_params == total
    assert profile.quantized_params == quantized
    assert profile.float_params == total - quantized


# ------------------------------------------------------------------- conv1d / conv3d hand counts


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(6 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=2)
        self.fc = nn.Linear(4 * 2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


CONV_CASES = {
    # Conv1d(4, 6, 3, stride=2, padding=1, groups=2) on 4x9: L_out = floor((9 + 2 - 3) / 2) + 1
    # = 5; each of the 6*5 outputs sees 4/2 = 2 channels * 3 taps.
    "conv1d": (
        Conv1dNet,
        (4, 9),
        [
            ("conv.weight", "conv1d", (6, 2, 3), 6 * 5 * (2 * 3)),
            ("fc.weight", "linear", (2, 30), 60),
        ],
    ),
    # Conv3d(2, 4, (2,3,3), stride (1,2,2), padding (0,1,1), groups=2) on 2x3x6x6:
    # D = 3 - 2 + 1 = 2, H = W = floor((6 + 2 - 3) / 2) + 1 = 3; each of the 4*2*3*3 outputs sees
    # 2/2 = 1 channel * 2*3*3 taps.
    "conv3d": (
        Conv3dNet,
        (2, 3, 6, 6),
        [
            ("conv.weight", "conv3d", (4, 1, 2, 3, 3), 4 * 2 * 3 * 3 * (1 * 2 * 3 * 3)),
            ("fc.weight", "linear", (3, 72), 3 * 72),
        ],
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_macs_hand_counts(case: str, fmt: str) -> None:
    cls, sample_shape, want = CONV_CASES[case]
    torch.manual_seed(0)
    x = torch.randn(5, *sample_shape)
    model = load_model(save_bytes(cls().eval(), (x[:2],), fmt))
    profile = profile_model(model, CalibrationData([x]), batch_size=3)
    got = [(lay.name, lay.kind, lay.shape, lay.macs) for lay in profile.layers]
    assert got == want


# --------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_projections_interleaved_linears_blocked(zoo_bytes: ZooBytes, fmt: str) -> None:
    profile = profile_model(load_model(zoo_bytes("text", fmt)), zoo_data("text", 5))
    layouts = {lay.name: lay.extra["layouts"] for lay in profile.layers}
    assert layouts == {
        "emb.weight": ["blocked"],
        "attn.in_proj_weight": ["interleaved"],  # MultiheadAttention runs sequence-first
        "attn.out_proj.weight": ["interleaved"],
        "ff.weight": ["blocked"],  # (N, 7, 16) rows: sample-major
        "head.weight": ["blocked"],
    }


def test_plain_mlp_layouts_blocked(zoo_bytes: ZooBytes) -> None:
    profile = profile_model(load_model(zoo_bytes("mlp", "script")), zoo_data("mlp", 5))
    assert all(lay.extra["layouts"] == ["blocked"] for lay in profile.layers)


# ------------------------------------------------------------------------------------ tied weight


class TiedLM(nn.Module):
    """Embedding and output head share one Parameter."""

    def __init__(self, vocab: int = 12, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))  # (N, 5, vocab)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_weight_appears_once_with_macs_summed(fmt: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 12, (4, 5))
    eager = TiedLM().eval()
    assert sum(p.numel() for p in eager.parameters()) == 12 * 6  # one shared tensor
    profile = profile_model(load_model(save_bytes(eager, (ids[:2],), fmt)), CalibrationData([ids]))
    assert [lay.name for lay in profile.layers] == ["emb.weight"]
    (layer,) = profile.layers
    assert layer.shape == (12, 6) and layer.params == 72
    # Embedding lookup (0 MACs) + head on 5 tokens (5 * 12 * 6).
    assert layer.macs == 5 * 12 * 6
    assert len(layer.extra["layouts"]) == 2  # two uses
    # Nothing is left in float: the only weight is the quantized, shared one.
    assert (profile.total_params, profile.float_params) == (72, 0), (
        f"{fmt}: the tied weight was counted as {profile.total_params} parameters with "
        f"{profile.float_params} left in float"
    )


class _Positions(nn.Module):
    """A position table looked up with (1, T) indices, refusing some batch size (as models that
    special-case a batch of 1 do)."""

    def __init__(self, refuse: int) -> None:
        super().__init__()
        self.refuse = refuse
        self.pos = nn.Embedding(6, 8)
        self.tok = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] == self.refuse:
            raise RuntimeError("this model refuses that batch size")
        p = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        return self.fc((self.tok(ids) + p).mean(1))


def _layouts(refuse: int) -> dict[str, list[str]]:
    model = load_model(save_bytes(_Positions(refuse), (torch.randint(0, 20, (4, 6)),), "script"))
    data = CalibrationData([torch.randint(0, 20, (8, 6))], None)
    return {layer.name: layer.extra["layouts"] for layer in profile_model(model, data).layers}


def test_a_model_refusing_a_batch_of_one_still_has_its_shared_table_found() -> None:
    assert _layouts(refuse=1) == {
        "pos.weight": ["shared"],
        "tok.weight": ["blocked"],
        "fc.weight": ["blocked"],
    }


def test_a_model_failing_on_the_probes_is_scored_per_sample_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="fails on them"):
        layouts = _layouts(refuse=3)
    assert layouts["pos.weight"] == ["blocked"]


def test_a_scripted_model_that_raises_on_the_data_is_refused_with_a_code() -> None:
    # TorchScript raises torch.jit.Error, which is not a RuntimeError: still a data_mismatch,
    # not an internal error.
    model = load_model(save_bytes(_Positions(refuse=2), (torch.randint(0, 20, (4, 6)),), "script"))
    with pytest.raises(DataMismatch) as err:
        check_data_fits(model, CalibrationData([torch.randint(0, 20, (8, 6))], None))
    assert err.value.code == "data_mismatch" and "refuses that batch size" in err.value.message
