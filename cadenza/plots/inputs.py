"""What the plots read: statistics, predictions and metadata files (each error names its flag and file), the
outputs a model knows, and the rows of the ground truth that a predictions file was made on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..artifacts import CONFIG_FILE, read_json
from ..errors import CadenzaError
from .catalog import Request, flag

UNSEEN = "<UNK>"  # the class of true labels the model never saw in training (they count as errors in metrics)


# ------------------------------------------------------------------------------------------ files
def read_json_input(path, field_name: str) -> dict:
    """A statistics or metadata file, or a CadenzaError naming the flag and the file."""
    path = Path(path)
    if not path.is_file():
        raise CadenzaError(f"{flag(field_name)} {path}: no such file")
    try:
        data = read_json(path)
    except ValueError as e:
        raise CadenzaError(f"{flag(field_name)} {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CadenzaError(f"{flag(field_name)} {path}: expected a JSON object")
    return data


def read_predictions(request: Request, path: Path) -> pd.DataFrame:
    if path in request.loaded:
        return request.loaded[path]
    from ..data.read import read_dataset

    return read_dataset(path)


def model_labels(paths: Sequence[Path], names: Sequence[str]) -> list[str]:
    """-mn names, one per file; else each file's folder (the run folder: experiment_run, experiment_run_1, ...),
    numbered where two files share one."""
    if names:
        if len(names) != len(paths):
            raise CadenzaError(f"-mn gives {len(names)} model names for {len(paths)} files; give one name per file")
        return list(names)
    labels = [p.parent.name or p.stem for p in paths]
    return [f"{label} {i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def select_features(available: Sequence[str], wanted: Optional[str], where: str) -> list[str]:
    """-ofn's output, or every available one when -ofn is not given."""
    if wanted is None:
        if not available:
            raise CadenzaError(f"{where}: no output feature to plot")
        return list(available)
    if wanted not in available:
        raise CadenzaError(f"-ofn {wanted!r}: not among the outputs of {where} ({', '.join(available) or 'none'})")
    return [wanted]


# ------------------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class Output:
    """A category or binary output as the trained model knows it (from training_set_metadata.json)."""
    name: str
    type: str                       # category | binary
    column: str                     # the true labels' column in the data set
    labels: tuple[str, ...]         # class order: the vocabulary (most frequent first); binary: (false, true)
    counts: Optional[dict]          # training rows per label (ecd category); None where the metadata has none
    meta: dict                      # the feature's metadata: how a binary value reads as true
    lowercase: bool = False

    def class_indices(self, values: pd.Series) -> np.ndarray:
        """Each value's class index; -1 for a label the model never saw in training."""
        from ..ecd.features import _category_string, _to_binary

        values = pd.Series(values).reset_index(drop=True)
        if self.type == "binary":  # the same true/false reading as training (labels, fallback_true_label, yes/no)
            return _to_binary(values, self.meta, self.column).astype(np.int64)
        strings = values.map(_category_string)
        strings = strings.str.lower() if self.lowercase else strings
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index.get(s, -1) for s in strings], dtype=np.int64)

    def probabilities(self, predictions: pd.DataFrame, where: str) -> np.ndarray:
        """(rows, classes) in class order from `<output>_probabilities_<label>` columns."""
        if self.type == "binary":
            columns = [f"{self.name}_probabilities_true"]
        else:
            columns = [f"{self.name}_probabilities_{label}" for label in self.labels]
        missing = [c for c in columns if c not in predictions]
        if missing:
            raise CadenzaError(f"{where}: no column {missing[0]!r}: probabilities are needed ({flag('probabilities')}"
                               " names a predictions.csv with <output>_probabilities_<label> columns)")
        values = predictions[columns].to_numpy(dtype=float)
        return np.column_stack([1 - values[:, 0], values[:, 0]]) if self.type == "binary" else values


def read_outputs(path) -> dict[str, Output]:
    """The category and binary outputs described by a training_set_metadata.json (ecd or llm)."""
    metadata = read_json_input(path, "ground_truth_metadata")
    config = _config_beside(Path(path))
    if metadata.get("model_type") == "llm":
        return _llm_outputs(metadata, config, path)
    output_names = {f["name"] for f in config["output_features"]} if config else None
    lowercase = {f["name"]: bool((f.get("preprocessing") or {}).get("lowercase"))
                 for f in (config or {}).get("output_features", [])}
    outputs = {}
    for name, meta in metadata.items():
        if not isinstance(meta, dict) or meta.get("type") not in ("category", "binary"):
            continue
        if output_names is not None and name not in output_names:
            continue  # a category input feature
        labels = meta.get("vocab") if meta["type"] == "category" else (meta.get("labels") or ["false", "true"])
        outputs[name] = Output(name, meta["type"], meta.get("column") or name, tuple(labels), meta.get("counts"),
                               meta, lowercase.get(name, False))
    return outputs


def _llm_outputs(metadata: dict, config: Optional[dict], path) -> dict[str, Output]:
    if config is None:
        raise CadenzaError(f"{flag('ground_truth_metadata')} {path}: an llm's metadata does not name its output; "
                           f"give the file inside its model folder (with {CONFIG_FILE} beside it)")
    feature = config["output_features"][0]
    labels = metadata.get("labels") or []
    if feature["type"] != "category" or not labels:
        return {}
    name = feature["name"]
    return {name: Output(name, "category", feature.get("column") or name, tuple(labels), None, {})}


def _config_beside(metadata_path: Path) -> Optional[dict]:
    path = metadata_path.parent / CONFIG_FILE
    return read_json(path) if path.is_file() else None


# ------------------------------------------------------------------------------------------ ground truth
@dataclass
class Classified:
    """One model's predictions of one output next to the true labels, as class indices (see Output)."""
    model: str
    output: Output
    truth: np.ndarray
    predicted: np.ndarray
    predictions: pd.DataFrame = field(repr=False)
    source: str = ""          # the predictions file, for messages

    def probabilities(self) -> np.ndarray:
        return self.output.probabilities(self.predictions, self.source)


def classified(request: Request, field_name: str, kinds: Sequence[str] = ("category", "binary")) -> list[Classified]:
    """Every (model, output of `kinds`) pair of the prediction files in `field_name`, with its truth."""
    from ..data.read import read_dataset

    outputs = read_outputs(request.ground_truth_metadata)
    data = read_dataset(request.ground_truth)
    files = getattr(request, field_name)
    result = []
    for path, model in zip(files, model_labels(files, request.model_names)):
        predictions = read_predictions(request, path)
        where = f"{flag(field_name)} {path}"
        present = [o for name, o in outputs.items() if f"{name}_predictions" in predictions]
        names = select_features([o.name for o in present if o.type in kinds], request.output_feature_name,
                                f"{where} ({' and '.join(kinds)} outputs)")
        truth = truth_rows(data, path, len(predictions), [o.column for o in present])
        for output in (outputs[name] for name in names):
            if output.column not in truth:
                raise CadenzaError(f"{flag('ground_truth')}: no column {output.column!r} (the true labels of "
                                   f"output {output.name!r}); the data has {list(truth.columns)}")
            result.append(Classified(model, output, output.class_indices(truth[output.column]),
                                     output.class_indices(predictions[f"{output.name}_predictions"]),
                                     predictions.reset_index(drop=True), where))
    return result


def truth_rows(data: pd.DataFrame, predictions_path: Path, rows: int, label_columns: Sequence[str]) -> pd.DataFrame:
    """The rows of `data` that a predictions file holds, in its order: all of them (`cadenza evaluate` on this
    data set), or the test split of the experiment whose run folder holds the predictions, drawn again from the
    config and seed in its description.json. Either way, rows without a label are left out, as evaluation does
    (output features drop them by default)."""
    for candidate in _candidates(data, predictions_path.parent):
        for rows_kept in (candidate, _labelled(candidate, label_columns)):
            if len(rows_kept) == rows:
                return rows_kept.reset_index(drop=True)
    raise CadenzaError(f"{flag('ground_truth')} has {len(data)} rows and {predictions_path} {rows} predictions: give "
                       "the data set the predictions were made on (`cadenza evaluate --dataset`), or the unchanged "
                       "data set of an experiment with predictions.csv still in its run folder")


def _candidates(data: pd.DataFrame, run_dir: Path):
    yield data
    test = _experiment_test_split(data, run_dir)  # only drawn when the whole data set does not fit
    if test is not None:
        yield test


def _labelled(data: pd.DataFrame, label_columns: Sequence[str]) -> pd.DataFrame:
    present = [c for c in label_columns if c in data]
    if not present:
        return data
    blank = data[present].apply(lambda col: col.isna() | (col.astype(str).str.strip() == ""))
    return data[~blank.any(axis=1)]


def _experiment_test_split(data: pd.DataFrame, run_dir: Path) -> Optional[pd.DataFrame]:
    """The test split an experiment took from `data`, or None when `run_dir` is not a run folder or `data` is not
    the data set it split (row counts or the training rows' hash differ from what description.json recorded)."""
    path = run_dir / "description.json"
    if not path.is_file():
        return None
    from ..config.schema import SplitConfig
    from ..data.read import sample, split_dataset
    from ..train.checkpoint import data_fingerprint

    description = read_json(path)
    preprocessing, seed = (description.get("config") or {}).get("preprocessing"), description.get("random_seed")
    if preprocessing is None or seed is None:
        return None  # a description without the split's config and seed: nothing to draw the split again from
    try:
        sampled = sample(data, preprocessing["sample_ratio"], preprocessing["sample_size"], seed)
        splits = split_dataset(sampled, SplitConfig(**preprocessing["split"]), seed)
    except CadenzaError:  # e.g. the fixed split's column is missing: not the data set that was split
        return None
    if {name: len(rows) for name, rows in splits.items()} != description.get("rows"):
        return None
    recorded = (description.get("data_sha256") or {}).get("training")
    if recorded and data_fingerprint(splits["training"])["sha256"] != recorded:
        return None
    return splits["test"]
