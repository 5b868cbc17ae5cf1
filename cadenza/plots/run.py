"""The plots `Model.experiment` leaves in the run folder: learning_curves.png and, for category outputs,
confusion_matrix.png. They are a by-product: a missing matplotlib or a failing plot is one line of log, never a
failed experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..artifacts import METADATA_FILE, MODEL_DIR, read_json


def write_run_plots(run_dir: Path, test=None, predictions=None, log: Callable[[str], None] = print) -> list[Path]:
    """test: the test split evaluated (the truth); predictions: what evaluation predicted for it, row for row.
    The paths written; never raises."""
    from .draw import MatplotlibMissing

    run_dir = Path(run_dir)
    written = []
    for name, make in (("learning_curves", lambda: _learning_curves(run_dir)),
                       ("confusion_matrix", lambda: _confusion_matrix(run_dir, test, predictions))):
        try:
            figure = make()
            if figure is not None:
                path = run_dir / f"{name}.png"
                figure.savefig(path, format="png")
                written.append(path)
        except MatplotlibMissing:
            log("note: no plots in the run folder: matplotlib is not installed (pip install 'cadenza[viz]')")
            break
        except Exception as e:  # a plot must never cost the experiment its results
            log(f"warning: {name}.png not written: {type(e).__name__}: {_first_line(e)}")
    return written


def _learning_curves(run_dir: Path):
    from .views import learning_curves_overview

    return learning_curves_overview(read_json(run_dir / "training_statistics.json"))


def _confusion_matrix(run_dir: Path, test, predictions) -> Optional[object]:
    metadata = run_dir / MODEL_DIR / METADATA_FILE
    if test is None or predictions is None or not metadata.is_file():
        return None  # no test split, or no model folder (skip_save_model): no labels to name the classes
    from .catalog import Request
    from .views import confusion_matrices_overview

    written_to = run_dir / "predictions.csv"
    return confusion_matrices_overview(Request(predictions=[written_to], ground_truth=test,
                                               ground_truth_metadata=metadata, loaded={written_to: predictions}))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
