"""Figures from plain numbers. Each function returns a matplotlib `Figure` made directly (never through pyplot), so
plotting touches no global matplotlib state of the user's process: no current figure, no rcParams, no backend
switch. Every plotted line and bar carries a label, which is how the tests find it and read its data back."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import CadenzaError

MAX_COLUMNS = 4  # panels per row of a figure with many panels (the run folder's learning_curves.png)
PANEL_SIZE = (4.8, 3.4)


class MatplotlibMissing(CadenzaError):
    """matplotlib is an optional extra: `pip install cadenza[viz]`."""


# margins of a grid of learning-curve panels, in inches (left, right, bottom, top, between columns, between rows):
# its labels are short and alike (epoch, a metric's name), so fixed margins fit, where matplotlib's constrained
# layout measures every tick label first (in a fresh process this figure took 1.22 s with it, 0.94 s without)
CURVE_MARGINS = (0.85, 0.15, 0.55, 0.35, 0.9, 0.75)


def new_figure(panels: int = 1, size: tuple[float, float] = PANEL_SIZE, fixed_margins: bool = False):
    """A figure with `panels` axes in a grid of at most MAX_COLUMNS columns, and those axes in reading order.
    fixed_margins: CURVE_MARGINS instead of the constrained layout (for panels with short, uniform labels)."""
    columns = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / columns)
    width, height = size[0] * columns, size[1] * rows
    figure = _figure_class()(figsize=(width, height), layout=None if fixed_margins else "constrained")
    if fixed_margins:
        left, right, bottom, top, across, down = CURVE_MARGINS
        panel_w = (width - left - right - across * (columns - 1)) / columns
        panel_h = (height - bottom - top - down * (rows - 1)) / rows
        figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                               top=1 - top / height, wspace=across / panel_w, hspace=down / panel_h)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[panels:]:
        unused.remove()
    return figure, list(axes[:panels])


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing("plots need matplotlib, an optional extra of Cadenza: pip install 'cadenza[viz]' "
                                "(or pip install matplotlib)") from None
    return Figure


def save(figures: dict, directory: Path, file_format: str) -> list[Path]:
    """Write each figure as `<name>.<file_format>` into `directory`; the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures.items():
        path = directory / f"{safe_file_name(name)}.{file_format}"
        figure.savefig(path, format=file_format)
        written.append(path)
    return written


def safe_file_name(name: str) -> str:
    # feature, class and parameter names come from user data: keep them, minus path separators and the like
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "plot"


# ------------------------------------------------------------------------------------------ panels
def learning_curve_panel(ax, feature: str, metric: str, curves: Sequence[tuple[str, list, list]]) -> None:
    """One metric of one output over epochs: per model a solid training line and a dashed validation line in the
    model's colour. curves: (model label, training [(epoch, value)], validation [(epoch, value)])."""
    for index, (model, training, validation) in enumerate(curves):
        colour = f"C{index}"
        for split, points, style in (("training", training, "-"), ("validation", validation, "--")):
            if points:
                x, y = zip(*points)
                ax.plot(x, y, style, color=colour, marker="o", markersize=3, label=_join(model, split))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs; step evaluations still sit between them
    ax.set_title(f"{feature} {metric}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.legend(fontsize="small")


def confusion_matrix_panel(ax, values: np.ndarray, labels: Sequence[str], title: str, normalized: bool) -> None:
    """Rows: true class; columns: predicted class; each cell's count (or row share) written in it."""
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalized else max(values.max(), 1))
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = (1 if normalized else max(values.max(), 1)) / 2
    for (row, column), value in np.ndenumerate(values):
        ax.text(column, row, f"{value:.2f}" if normalized else f"{int(value)}", ha="center", va="center",
                fontsize="small", color="white" if value > threshold else "black")
    ax.figure.colorbar(image, ax=ax)


def bars_panel(ax, groups: Sequence[str], bars: dict[str, Sequence[float]], title: str, ylabel: str) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per key of `bars` (a model) in each group."""
    width = 0.8 / max(len(bars), 1)
    x = np.arange(len(groups))
    for index, (label, heights) in enumerate(bars.items()):
        container = ax.bar(x + (index - (len(bars) - 1) / 2) * width, heights, width, label=label)
        ax.bar_label(container, fmt="%.3g", fontsize="x-small")
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")


def lines_panel(ax, lines: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str,
                diagonal: Optional[tuple[tuple[float, float], tuple[float, float]]] = None, step: bool = False) -> None:
    """Labelled lines (ROC, precision-recall, calibration); `diagonal` draws the no-skill reference, which is
    labelled with a leading underscore so that legends and tests skip it."""
    if diagonal is not None:
        ax.plot(*diagonal, ":", color="grey", label="_reference")
    for label, x, y in lines:
        if step:
            ax.step(x, y, where="post", label=label)
        else:
            ax.plot(x, y, marker=".", label=label)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="best")


def two_scales_panel(ax, labels: Sequence[str], left: tuple[str, np.ndarray, str],
                     right: tuple[str, np.ndarray, str], title: str) -> None:
    """Two series over the same classes, each on its own y axis in its own colour: (name, values, colour)."""
    x = np.arange(len(labels))
    for axis, (name, values, colour), marker in ((ax, left, "-o"), (ax.twinx(), right, "-s")):
        axis.plot(x, values, marker, color=colour, label=name)
        axis.set_ylabel(name, color=colour)
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_title(title)


def scatter_panel(ax, x: Sequence, y: Sequence[float], xlabel: str, ylabel: str, title: str,
                  log_x: bool = False) -> None:
    """One point per trial. Text values (a `choice` space) go at evenly spaced positions named by the value."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
        ax.scatter(x, y, label="trials")
        if log_x:
            ax.set_xscale("log")
    else:
        names = sorted({str(v) for v in x})
        ax.scatter([names.index(str(v)) for v in x], y, label="trials")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def heatmap_panel(ax, rows: Sequence, columns: Sequence, values: np.ndarray, row_name: str, column_name: str,
                  value_name: str) -> None:
    """A matrix of means (NaN cells left blank) with its axes named by the values they stand for."""
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(rows)), [_short(v) for v in rows])
    ax.set_xticks(range(len(columns)), [_short(v) for v in columns], rotation=45, ha="right")
    ax.set_ylabel(row_name)
    ax.set_xlabel(column_name)
    ax.figure.colorbar(image, ax=ax, label=value_name)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)
