"""The allocation as a bar chart: one horizontal bar per layer, its length the layer's bit width,
labelled with its parameter count. Only the geometry is computed here; the template draws it as
inline SVG (no script, no image file, readable with the page's own fonts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BAR_HEIGHT", "Bar", "BitsChart", "bits_chart", "layer_rows"]

BAR_HEIGHT = 18
_GAP = 6
_LABEL_WIDTH = 220  # layer names, right-aligned against the bars
_PLOT_WIDTH = 360
_NOTE_WIDTH = 200  # "4 bit · 12,345 params"
_AXIS_HEIGHT = 28


@dataclass(frozen=True)
class Bar:
    name: str
    bits: int
    params: int | None
    y: int
    width: float


@dataclass(frozen=True)
class BitsChart:
    bars: list[Bar]
    ticks: list[tuple[int, float]]  # (bits, x)
    label_width: int
    plot_width: int
    width: int
    height: int
    bar_height: int = BAR_HEIGHT


def layer_rows(allocation_doc: dict[str, Any] | None, bits: dict[str, Any]) -> list[Bar]:
    """Per-layer ``(name, bits, params)`` in model order: from ``allocation.json`` when it could
    be read (it has the parameter counts), else from the job result's ``allocation``."""
    rows: list[tuple[str, int, int | None]] = []
    layers = (allocation_doc or {}).get("layers")
    if isinstance(layers, list) and layers:
        for layer in layers:
            rows.append((str(layer["name"]), int(layer["bits"]), int(layer["params"])))
    else:
        rows = [(str(name), int(b), None) for name, b in bits.items()]
    return [Bar(name, b, params, 0, 0.0) for name, b, params in rows]


def bits_chart(rows: list[Bar], max_bits: int) -> BitsChart:
    """The chart of ``rows`` with bar lengths on a 0..``max_bits`` axis."""
    top = max(max_bits, max((r.bits for r in rows), default=1), 1)
    scale = _PLOT_WIDTH / top
    bars = [
        Bar(r.name, r.bits, r.params, i * (BAR_HEIGHT + _GAP), r.bits * scale)
        for i, r in enumerate(rows)
    ]
    step = 2 if top > 8 else 1
    ticks = [(b, b * scale) for b in range(0, top + 1, step)]
    height = len(bars) * (BAR_HEIGHT + _GAP) + _AXIS_HEIGHT
    width = _LABEL_WIDTH + _PLOT_WIDTH + _NOTE_WIDTH
    return BitsChart(bars, ticks, _LABEL_WIDTH, _PLOT_WIDTH, width, height)
