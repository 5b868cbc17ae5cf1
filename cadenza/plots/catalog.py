"""The two tables of `cadenza visualize`: the input flags (Ludwig's names) and the visualizations with the inputs
each one needs. Light to import (no numpy, pandas or matplotlib), since the `cadenza` command builds its parser
from them on every call; `cadenza.plots.views.<name>` draws visualization `<name>`.

Cadenza writes predictions and probabilities into one file (predictions.csv: `<output>_predictions` and
`<output>_probabilities_<label>`), so -pred and -prob name the same kind of file and either one serves both."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from ..errors import CadenzaError


class Flag(NamedTuple):
    field: str                # the Request field (and the keyword of cadenza.plots.visualize)
    names: tuple[str, str]    # Ludwig's short and long flag
    help: str
    many: bool = False        # one file per model


FLAGS = (
    Flag("training_statistics", ("-trs", "--training_statistics"), "training_statistics.json of each run", True),
    Flag("test_statistics", ("-tes", "--test_statistics"), "test_statistics.json of each run", True),
    Flag("predictions", ("-pred", "--predictions"), "predictions.csv of each run (its <output>_predictions)", True),
    Flag("probabilities", ("-prob", "--probabilities"),
         "predictions.csv of each run (its <output>_probabilities_<label> columns)", True),
    Flag("ground_truth", ("-g", "--ground_truth"),
         "the data set with the true labels: the one the predictions were made on, or the one an experiment split"),
    Flag("ground_truth_metadata", ("-gm", "--ground_truth_metadata"), "training_set_metadata.json in the model folder"),
    Flag("hyperopt_stats_path", ("-hs", "--hyperopt_stats_path"), "hyperopt_statistics.json"),
)
_FLAG = {f.field: f for f in FLAGS}


def flag(field_name: str) -> str:
    return _FLAG[field_name].names[0]


class Visualization(NamedTuple):
    name: str
    # alternatives, each a set of inputs that together suffice; the first fully given one is used
    needs: tuple[tuple[str, ...], ...]
    summary: str


_PREDICTED = ("predictions", "ground_truth", "ground_truth_metadata")
_SCORED = ("probabilities", "ground_truth", "ground_truth_metadata")

VISUALIZATIONS = {v.name: v for v in (
    Visualization("learning_curves", (("training_statistics",),),
                  "each metric of each output over the epochs: training (solid) and validation (dashed), per model"),
    Visualization("compare_performance", (("test_statistics",),),
                  "the test metrics of each output as bars, one bar per model (the loss is left out: other scale)"),
    Visualization("confusion_matrix", (("test_statistics", "ground_truth_metadata"), _PREDICTED),
                  "true against predicted class of each category/binary output, per model (the most frequent "
                  "--top_n_classes classes; --normalize: shares of each true class)"),
    Visualization("roc_curves_from_test_statistics", (("test_statistics",), _SCORED),
                  "ROC curves of each binary output (category: each class against the rest), with their AUC"),
    Visualization("precision_recall_curves_from_test_statistics", (("test_statistics",), _SCORED),
                  "precision against recall over every threshold, per binary output (category: per class)"),
    Visualization("calibration_1_vs_all", (_SCORED,),
                  "per class: predicted probability against the observed share (21 bins), and Brier scores"),
    Visualization("frequency_vs_f1", (("test_statistics", "ground_truth_metadata"), _PREDICTED),
                  "each class's F1 beside its training frequency, sorted by F1 and by frequency"),
    Visualization("hyperopt_report", (("hyperopt_stats_path",),),
                  "the metric of each trial against each hyperparameter, and mean metric over each pair"),
)}


@dataclass
class Request:
    """Everything a visualization may read, plus Ludwig's options that shape it."""
    training_statistics: Sequence = ()
    test_statistics: Sequence = ()
    predictions: Sequence = ()
    probabilities: Sequence = ()
    ground_truth: Optional[object] = None           # a path, a packaged data set's name, or a DataFrame
    ground_truth_metadata: Optional[object] = None
    hyperopt_stats_path: Optional[object] = None
    model_names: Sequence[str] = ()
    output_feature_name: Optional[str] = None
    top_n_classes: Sequence[int] = (0,)             # 0: every class
    normalize: bool = False
    # prediction frames already in memory (the experiment's own), by the path they were written to
    loaded: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name in ("training_statistics", "test_statistics", "predictions", "probabilities"):
            value = getattr(self, name)
            setattr(self, name, [Path(p) for p in ([value] if isinstance(value, (str, Path)) else value or [])])
        # one predictions.csv holds both: whichever flag was given serves the other too
        self.predictions = self.predictions or self.probabilities
        self.probabilities = self.probabilities or self.predictions
        self.model_names = list(self.model_names or [])
        self.top_n_classes = list(self.top_n_classes or []) or [0]

    def given(self, field_name: str) -> bool:
        value = getattr(self, field_name)
        return value is not None and not (isinstance(value, list) and not value)


def visualization(name: str) -> Visualization:
    if name not in VISUALIZATIONS:
        hint = difflib.get_close_matches(name, list(VISUALIZATIONS), n=1)
        raise CadenzaError(f"unknown visualization {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                           + f" (there are: {', '.join(VISUALIZATIONS)})")
    return VISUALIZATIONS[name]


def check_inputs(chosen: Visualization, request: Request) -> None:
    """A CadenzaError naming the missing flags unless one of the visualization's alternatives is fully given."""
    if any(all(request.given(f) for f in alternative) for alternative in chosen.needs):
        return
    closest = min(chosen.needs, key=lambda alternative: sum(not request.given(f) for f in alternative))
    missing = [flag(f) for f in closest if not request.given(f)]
    options = " or ".join(" + ".join(flag(f) for f in alternative) for alternative in chosen.needs)
    raise CadenzaError(f"{chosen.name} needs {options}; missing: {', '.join(missing)} (see `cadenza visualize "
                       f"--help` and docs/visualize.md)")
