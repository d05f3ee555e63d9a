"""The plots: valid SVG and PNG, one bar per layer, odd sensitivities masked, never a failed job."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from mpq_core.allocation import Allocation, allocate_bits
from mpq_core.budgets import Budget
from mpq_core.layers import LayerInfo
from mpq_core.plots import bits_figure, sensitivity_figure, write_plots
from mpq_core.sensitivity_table import SensitivityTable

BITS = [2, 3, 4, 5, 6, 8]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG = "{http://www.w3.org/2000/svg}"


def _table(layers: int, *, odd: bool = False) -> SensitivityTable:
    rng = np.random.default_rng(0)
    infos = [
        LayerInfo(f"blocks.{i}.mlp.fc{i % 2}.weight", "linear", (64, 32), 2048, 64, 2048)
        for i in range(layers)
    ]
    omega = np.sort(10.0 ** rng.uniform(-8, -2, (layers, len(BITS))), axis=1)[:, ::-1]
    rows = omega.tolist()
    if odd:
        rows[0][0], rows[1][1], rows[2][2], rows[3][3] = math.nan, math.inf, 0.0, -1.0
    return SensitivityTable("fisher", BITS, infos, rows)


def _allocation(layers: int) -> Allocation:
    return allocate_bits(_table(layers), [Budget("avg-bits", 4)])


def _svg_root(path: Path) -> ET.Element:
    return ET.parse(path).getroot()  # raises on malformed XML


def test_plots_are_valid_svg_and_png_with_one_bar_per_layer(tmp_path: Path) -> None:
    alloc = _allocation(12)
    files = write_plots(tmp_path, allocation=alloc, sensitivity=_table(12))
    assert sorted(files) == ["bits.png", "bits.svg", "sensitivity.png", "sensitivity.svg"]
    for name, path in files.items():
        data = path.read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_MAGIC) and len(data) > 5_000
        else:
            assert _svg_root(path).tag == f"{SVG}svg"
    bars = [
        el.get("id")
        for el in _svg_root(files["bits.svg"]).iter(f"{SVG}g")
        if (el.get("id") or "").startswith("bar-")
    ]
    assert bars == [f"bar-{i}" for i in range(12)]
    ax = bits_figure(alloc).axes[0]
    heights = [round(bar.get_height()) for bar in ax.containers[0]]
    assert len(ax.patches) == 12 and heights == [la.bits for la in alloc.layers]


def test_svg_is_reproducible(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for out in (a, b):
        write_plots(out, allocation=_allocation(5), sensitivity=_table(5))
    for name in ("bits.svg", "sensitivity.svg"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_odd_sensitivities_are_masked_not_fatal(tmp_path: Path) -> None:
    table = _table(6, odd=True)
    notes: list[str] = []
    files = write_plots(tmp_path, sensitivity=table, notes=notes)
    assert notes == [] and set(files) == {"sensitivity.svg", "sensitivity.png"}
    image = sensitivity_figure(table).axes[0].images[0]
    drawn = image.get_array()
    assert drawn is not None
    mask = np.ma.getmaskarray(drawn)
    assert mask.sum() == 4 and mask[0, 0] and mask[1, 1] and mask[2, 2] and mask[3, 3]
    # Nothing drawable at all: still a plot, without a colour bar.
    empty = SensitivityTable("fisher", [2, 4], table.layers[:2], [[math.nan, 0.0], [math.inf, -1]])
    assert set(write_plots(tmp_path, sensitivity=empty, notes=notes)) == {
        "sensitivity.svg",
        "sensitivity.png",
    }
    assert notes == []


def test_a_plot_that_fails_is_a_note(tmp_path: Path) -> None:
    notes: list[str] = []
    files = write_plots(tmp_path, allocation="not an allocation", notes=notes)  # type: ignore[arg-type]
    assert files == {} and len(notes) == 1 and notes[0].startswith("the bits plot was not drawn")
