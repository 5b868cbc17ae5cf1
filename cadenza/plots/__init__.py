"""Plots: `cadenza visualize -v NAME` with Ludwig's visualization names and flags, and the plots an experiment
leaves in its run folder (learning_curves.png, confusion_matrix.png). See docs/visualize.md.

matplotlib is an optional extra (`pip install cadenza[viz]`) and is imported only when a plot is drawn; figures are
built as `matplotlib.figure.Figure` objects, never through pyplot, so no global matplotlib state changes.

    catalog.py   the tables: input flags, visualizations and the inputs each needs (light: the CLI imports it)
    views.py     one function per visualization: inputs → numbers → figures
    inputs.py    statistics, predictions, metadata and ground-truth files; which truth rows a predictions file holds
    compute.py   the numbers shown (numpy only): curves, confusion matrices, per-class F1, ROC/PR, calibration
    draw.py      figures from numbers
    run.py       the experiment's own plots (never fail the experiment)
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .catalog import FLAGS, VISUALIZATIONS, Request, check_inputs, visualization
from .cli import register_cli
from .run import write_run_plots

__all__ = ["FLAGS", "VISUALIZATIONS", "Request", "figures", "register_cli", "visualize", "write_run_plots"]


def figures(name: str, request: Request) -> dict:
    """{file name without extension: matplotlib Figure} of visualization `name`; nothing written."""
    from . import views

    chosen = visualization(name)
    check_inputs(chosen, request)
    return getattr(views, chosen.name)(request)


def visualize(name: str, *, output_directory: Union[str, Path] = "visualizations", file_format: str = "pdf",
              **inputs) -> list[Path]:
    """Draw visualization `name` and write its figures into output_directory; the files written. `inputs` are
    Request's fields (Ludwig's flag names: training_statistics, test_statistics, predictions, probabilities,
    ground_truth, ground_truth_metadata, hyperopt_stats_path, model_names, output_feature_name, top_n_classes,
    normalize)."""
    from . import draw

    if file_format not in ("pdf", "png"):
        raise ValueError(f"file_format {file_format!r}: use pdf or png")
    drawn = figures(name, Request(**inputs))
    if not drawn:
        from ..errors import CadenzaError

        raise CadenzaError(f"{name}: nothing to plot in the given files (no output with what it shows)")
    return draw.save(drawn, Path(output_directory), file_format)
