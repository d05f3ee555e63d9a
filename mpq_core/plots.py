"""Plots of a job, as SVG and PNG: the trade-off curve, bits per layer, the sensitivity table.

Matplotlib's object API on the Agg canvas (``Figure`` + ``FigureCanvasAgg``): no pyplot, no
display, no global figure registry, so plotting from a worker or a thread touches no shared
state. SVG output is reproducible: no date in its metadata and a fixed hash salt for its ids.

Every figure function takes plain results (:class:`Allocation`, :class:`SensitivityTable`,
:class:`Curve`) and tolerates what a table may hold: NaN or infinite sensitivities are masked
(drawn grey), non-positive ones too on the log colour scale. :func:`write_plots` never fails a
job: a plot that cannot be drawn is skipped with a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from mpq_core.budgets import format_value

if TYPE_CHECKING:
    from mpq_core.allocation import Allocation
    from mpq_core.pipeline import JobResult
    from mpq_core.sensitivity_table import SensitivityTable
    from mpq_core.sweep_plan import Curve, CurvePoint

__all__ = [
    "PLOT_FORMATS",
    "bits_figure",
    "curve_figure",
    "methods_figure",
    "save_figure",
    "sensitivity_figure",
    "write_figures",
    "write_plots",
]

PLOT_FORMATS = ("svg", "png")
#: Layers beyond which their names are left off an axis (they would only overlap).
MAX_LABELLED_LAYERS = 80
_DPI = 100
_NAME_CHARS = 48  # longer layer names keep their last characters
_MIXED, _UNIFORM, _CHOSEN = "#1f77b4", "#7f7f7f", "#d62728"


def _figure(width: float, height: float, margins: tuple[float, float, float, float]) -> Figure:
    """A figure on the Agg canvas with fixed margins ``(left, bottom, right, top)`` in inches
    (a layout engine measures every label on every draw: several times slower)."""
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    left, bottom, right, top = margins
    fig.subplots_adjust(
        left=left / width,
        bottom=bottom / height,
        right=1 - right / width,
        top=1 - top / height,
        wspace=0.3,
    )
    return fig


def _short(name: str) -> str:
    """A layer name short enough for an axis (its tail: where names differ)."""
    return name if len(name) <= _NAME_CHARS else "…" + name[-(_NAME_CHARS - 1) :]


def _names_inches(names: Sequence[str]) -> float:
    """About how long the longest (shortened) layer name is at the axis font size."""
    if len(names) > MAX_LABELLED_LAYERS or not names:
        return 0.1
    return 0.2 + 0.045 * max(len(_short(n)) for n in names)


def _size_axis(ax: Any) -> None:
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value("size", v)))
    ax.set_xlabel("size (packed checkpoint)")


def _series(ax: Any, points: Sequence[CurvePoint], y: Any, **style: Any) -> None:
    """One series as a line over size; points without a finite ``y`` are left out."""
    xy = sorted((p.checkpoint_bytes, y(p)) for p in points if _finite(y(p)))
    if xy:
        xs, ys = zip(*xy, strict=True)
        ax.plot(xs, ys, **style)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


_LOSS = "measured_loss_increase"
#: A colour per sensitivity method when several are drawn together.
_METHOD_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")


def _panels(fig: Figure, curve: Curve) -> list[tuple[Any, str, str]]:
    """The two panels of a curve picture: (axes, what they plot, y label): the measured loss
    rise, then the curve's metric."""
    keys = [(_LOSS, f"measured loss increase ({curve.loss_unit})"), (curve.metric, curve.metric)]
    return [(ax, key, title) for ax, (key, title) in zip(fig.subplots(1, 2), keys, strict=True)]


def _float_line(ax: Any, curve: Curve, key: str) -> None:
    """The float model's metric as a dotted line (nothing for the loss rise, which is 0)."""
    base = curve.float_metrics.get(key)
    if key != _LOSS and isinstance(base, int | float) and math.isfinite(base):
        ax.axhline(base, color="black", lw=0.8, ls=":", label="float model")


def _finish(ax: Any, title: str) -> None:
    _size_axis(ax)
    ax.set_ylabel(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def curve_figure(curve: Curve) -> Figure:
    """The measured loss rise and the curve's metric against size: the method's allocations,
    uniform widths (labelled with their bits) and the job's own point (a star)."""
    fig = _figure(11, 4.5, (0.8, 0.6, 0.2, 0.5))
    for ax, key, title in _panels(fig, curve):

        def value(p: CurvePoint, key: str = key) -> float | None:
            return p.measured_loss_increase if key == _LOSS else p.metric(key)

        _series(ax, curve.mixed, value, marker="o", color=_MIXED, label=f"mixed ({curve.method})")
        _series(ax, curve.uniform, value, marker="s", color=_UNIFORM, ls="--", label="uniform")
        for p in curve.uniform:
            if _finite(value(p)):
                ax.annotate(
                    f"{p.uniform_bits}b",
                    (p.checkpoint_bytes, value(p)),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=_UNIFORM,
                )
        if key == _LOSS:
            _series(
                ax,
                curve.mixed,
                lambda p: p.predicted_metric_loss_increase,
                color=_MIXED,
                ls=":",
                label="predicted (mixed)",
            )
        _float_line(ax, curve, key)
        if curve.chosen is not None and _finite(value(curve.chosen)):
            ax.plot(
                [curve.chosen.checkpoint_bytes],
                [value(curve.chosen)],
                marker="*",
                ms=14,
                ls="none",
                color=_CHOSEN,
                label=f"chosen ({curve.chosen.label})",
            )
        _log_if_positive(ax)
        _finish(ax, title)
    fig.suptitle(f"trade-off curve ({curve.eval_samples} evaluation samples, no fine-tuning)")
    return fig


def methods_figure(curves: Sequence[Curve]) -> Figure:
    """Several sensitivity methods' curves of one model on one picture: the measured loss rise
    (log axis) and the metric against size, each method's allocations beside the uniform widths
    (drawn once, from the first curve)."""
    if not curves:
        raise ValueError("no curve to draw")
    first = curves[0]
    fig = _figure(11, 4.5, (0.8, 0.6, 0.2, 0.5))
    for ax, key, title in _panels(fig, first):

        def value(p: CurvePoint, key: str = key) -> float | None:
            if key != _LOSS:
                return p.metric(key)
            rise = p.measured_loss_increase  # on a log axis: a rise at or below 0 is left out
            return rise if rise is not None and rise > 0 else None

        _series(ax, first.uniform, value, marker="s", color=_UNIFORM, ls="--", label="uniform")
        for curve, colour in zip(curves, _METHOD_COLOURS, strict=False):
            _series(ax, curve.mixed, value, marker="o", color=colour, label=curve.method)
        _float_line(ax, first, key)
        if key == _LOSS:
            ax.set_yscale("log")
        _finish(ax, title)
    fig.suptitle(f"trade-off curves ({first.eval_samples} evaluation samples, no fine-tuning)")
    return fig


def _log_if_positive(ax: Any) -> None:
    """A log y axis when everything drawn is positive and spans more than a decade (loss
    rises of a few bits dwarf those of many)."""
    ys = np.concatenate([np.asarray(line.get_ydata(), dtype=np.float64) for line in ax.lines])
    ys = ys[np.isfinite(ys)]
    if ys.size and (ys > 0).all() and ys.max() > 10 * ys.min():
        ax.set_yscale("log")


def _layer_axis(ax: Any, names: Sequence[str], axis: str) -> None:
    ticks = np.arange(len(names))
    labelled = len(names) <= MAX_LABELLED_LAYERS
    if axis == "x":
        ax.set_xticks(
            ticks, [_short(n) for n in names] if labelled else [], rotation=90, fontsize=7
        )
        ax.set_xlim(-0.6, len(names) - 0.4)
    else:
        ax.set_yticks(ticks, [_short(n) for n in names] if labelled else [], fontsize=7)


def bits_figure(allocation: Allocation) -> Figure:
    """One bar per layer at its allocated width, coloured by width, with the layer's
    parameter count (log scale, right axis). Bar ``i`` has the SVG id ``bar-{i}``."""
    layers = allocation.layers
    n = len(layers)
    bottom = 0.3 + _names_inches([la.name for la in layers])
    fig = _figure(min(max(6.0, 0.25 * n + 2.0), 40.0), 3.5 + bottom, (0.7, bottom, 0.9, 0.45))
    ax = fig.subplots()
    bits = [la.bits for la in layers]
    widths = sorted(set(bits))
    colours = _width_colours(widths)
    bars = ax.bar(np.arange(n), bits, color=[colours[b] for b in bits], width=0.8)
    for i, bar in enumerate(bars):
        bar.set_gid(f"bar-{i}")
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(bits) + 1)
    _layer_axis(ax, [la.name for la in layers], "x")
    params = ax.twinx()
    params.plot(np.arange(n), [max(la.params, 1) for la in layers], "k.", ms=6, label="parameters")
    params.set_yscale("log")
    params.set_ylabel("parameters")
    ax.set_title(f"bits per layer ({n} layers, solver {allocation.solver})")
    return fig


def _width_colours(widths: Sequence[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    span = max(len(widths) - 1, 1)
    return {b: cmap(i / span) for i, b in enumerate(widths)}


def sensitivity_figure(table: SensitivityTable) -> Figure:
    """The table as a heatmap of layers (rows) by bit widths (columns), log colour scale;
    NaN, infinite and non-positive entries are masked (grey)."""
    omega = np.array(table.omega, dtype=np.float64).reshape(len(table.layers), len(table.bits))
    masked = np.ma.masked_where(~np.isfinite(omega) | (omega <= 0), omega)
    n = len(table.layers)
    left = 0.3 + _names_inches(table.names)
    height = min(max(3.0, 0.22 * n + 1.2), 40.0)
    fig = _figure(0.6 * len(table.bits) + left + 2.2, height, (left, 0.6, 1.0, 0.45))
    ax = fig.subplots()
    cmap = _cmap_with_bad()
    shown = masked.compressed()
    norm = None
    if shown.size:
        low = float(shown.min())
        norm = LogNorm(vmin=low, vmax=max(float(shown.max()), low * 1.0001))
    image = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(np.arange(len(table.bits)), [str(b) for b in table.bits])
    ax.set_xlabel("bits")
    _layer_axis(ax, table.names, "y")
    if shown.size:
        fig.colorbar(image, ax=ax, label="predicted loss increase (Omega)")
    ax.set_title(f"sensitivity ({table.method})")
    return fig


def _cmap_with_bad() -> Any:
    from matplotlib import colormaps

    return colormaps["magma_r"].with_extremes(bad="#cccccc")


def save_figure(fig: Figure, stem: Path) -> dict[str, Path]:
    """``stem.svg`` and ``stem.png``; the SVG without a date and with fixed ids."""
    written: dict[str, Path] = {}
    for fmt in PLOT_FORMATS:
        path = stem.with_suffix(f".{fmt}")
        metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {"Software": None}
        with rc_context({"svg.hashsalt": "mpq"}):
            fig.savefig(path, format=fmt, metadata=metadata)
        written[path.name] = path
    return written


def write_plots(
    out_dir: str | Path,
    *,
    allocation: Allocation | None = None,
    sensitivity: SensitivityTable | None = None,
    curve: Curve | None = None,
    notes: list[str] | None = None,
) -> dict[str, Path]:
    """Write ``bits``, ``sensitivity`` and ``curve`` plots (SVG and PNG) for what is given.

    A plot that fails is skipped and said in ``notes``: plots never fail a job.

    Returns:
        The path of every file written, by name.
    """
    out = Path(out_dir)
    jobs = [
        ("bits", bits_figure, allocation),
        ("sensitivity", sensitivity_figure, sensitivity),
        ("curve", curve_figure, curve),
    ]
    written: dict[str, Path] = {}
    for stem, draw, value in jobs:
        if value is None:
            continue
        try:
            written.update(save_figure(draw(value), out / stem))  # type: ignore[operator]
        except Exception as exc:  # a plot is a convenience: the job's results stand without it
            if notes is not None:
                notes.append(f"the {stem} plot was not drawn: {type(exc).__name__}: {exc}")
    return written


def write_figures(result: JobResult, out_dir: str | Path, notes: list[str]) -> dict[str, Path]:
    """A job's ``curve.json`` (when it has a curve) and its plots: bits per layer, the
    sensitivity table and the curve (:func:`write_plots`; a plot that fails is a note)."""
    from mpq_core.sweep_plan import write_curve

    written: dict[str, Path] = {}
    if result.curve is not None:
        written["curve.json"] = write_curve(result.curve, out_dir)
    written.update(
        write_plots(
            out_dir,
            allocation=result.allocation,
            sensitivity=result.sensitivity,
            curve=result.curve,
            notes=notes,
        )
    )
    return written
