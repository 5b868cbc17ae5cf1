"""Reading data sets (files or DataFrames), splitting them, and the named errors for data a model cannot use."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd

from ..errors import DataError
from ..config.schema import SplitConfig

DatasetSource = Union[str, Path, pd.DataFrame]
SPLITS = ("training", "validation", "test")

# text formats take pandas' encoding_errors: "strict" to read, "replace" to find an undecodable cell
_READERS = {
    ".csv": lambda p, errors: pd.read_csv(p, encoding_errors=errors),
    ".tsv": lambda p, errors: pd.read_csv(p, sep="\t", encoding_errors=errors),
    ".json": lambda p, errors: pd.read_json(p, encoding_errors=errors),
    ".jsonl": lambda p, errors: pd.read_json(p, lines=True, encoding_errors=errors),
    ".parquet": lambda p, errors: pd.read_parquet(p),
}
_COMPRESSION = {".bz2", ".gz", ".xz", ".zip", ".zst"}


def read_dataset(source: DatasetSource) -> pd.DataFrame:
    """A DataFrame from a DataFrame, a file (csv, tsv, json, jsonl, parquet, optionally compressed) or a packaged
    data set's short name (`rotten_tomatoes`, `chatterbot`). A file that cannot give rows raises a DataError that
    names it and says why: missing, empty, not UTF-8, malformed, or a header without rows. A streamed split
    (cadenza.data.stream.FileRows: rows of a file larger than memory) is returned as it is."""
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True)
    from .stream import FileRows

    if isinstance(source, FileRows):
        return source
    from .assets import DATASET_SHORT_NAMES

    if isinstance(source, str) and source in DATASET_SHORT_NAMES and not Path(source).exists():
        return DATASET_SHORT_NAMES[source]()
    path = _existing_file(source, sorted(DATASET_SHORT_NAMES))
    kind = _format(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); write the data set into it, or check the path")
    df = _read(path, kind)
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{path}: does not hold a table of rows")
    if len(df) == 0 and len(df.columns):
        raise DataError(f"{path}: the file has a header ({', '.join(map(str, df.columns))}) but no data rows; "
                        "add rows below the header")
    if len(df) == 0:
        raise DataError(f"{path}: the file holds no rows")
    return df.reset_index(drop=True)


def _existing_file(source, short_names: list[str]) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        raise DataError(f"data set {str(path)!r} is a folder; give one csv/tsv/json/jsonl/parquet file")
    close = difflib.get_close_matches(str(source), short_names, n=1)
    hint = (f"; did you mean the packaged data set {close[0]!r}?" if close
            else f"; relative paths start from {Path.cwd()}")
    raise DataError(f"data set file {str(path)!r} does not exist{hint}")


def _format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in _READERS:
        raise DataError(f"{path}: unknown data format {kind or '(no extension)'!r}; "
                        f"use one of {', '.join(sorted(_READERS))}")
    return kind


def _read(path: Path, kind: str) -> pd.DataFrame:
    try:
        return _READERS[kind](path, "strict")
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8_message(path, kind, e)) from None
    except pd.errors.ParserError as e:
        reason = str(e).replace("Error tokenizing data. C error: ", "").strip()
        raise DataError(f"{path}: cannot be read as {kind[1:]}: {reason}; a text containing the separator must be "
                        'in double quotes ("a, b")') from None
    except Exception as e:  # pandas and pyarrow raise many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot be read as {kind[1:]}: {e}") from None


def _not_utf8_message(path: Path, kind: str, error: UnicodeDecodeError) -> str:
    """Name the first undecodable byte and, by reading again with replacement characters, its row and column."""
    byte = error.object[error.start:error.start + 1].hex()
    where = ""
    try:
        df = _READERS[kind](path, "replace")
        hits = df.astype(str).apply(lambda col: col.str.contains("\ufffd", regex=False))
        rows, cols = np.nonzero(hits.to_numpy())
        header = [name for name in df.columns if "\ufffd" in str(name)]
        if header:
            where = f" in the header ({header[0]!r})"
        elif len(rows):
            r, c = int(rows[0]), int(cols[0])
            where = f" in row {r}, column {df.columns[c]!r} ({df.iloc[r, c]!r})"
    except Exception:  # the locating read is best effort: the message stands without row and column
        pass
    return (f"{path}: not UTF-8 text: byte 0x{byte}{where} is not valid UTF-8 (files saved by spreadsheets and "
            "older tools are often Windows-1252 or Latin-1). Re-save it as UTF-8 (a spreadsheet's 'CSV UTF-8', or "
            "`iconv -f cp1252 -t utf-8 old.csv > new.csv`), or read it with pandas and the right "
            "encoding= and pass the DataFrame")


def require_columns(df: pd.DataFrame, columns: dict[str, str], where: str) -> None:
    """columns: column -> the config path that asks for it."""
    missing = {c: p for c, p in columns.items() if c not in df.columns}
    if missing:
        detail = "; ".join(f"{c!r} (asked for by {p})" for c, p in missing.items())
        raise DataError(f"{where}: missing column {detail}; the data has columns {list(df.columns)}")


def check_not_empty(df: pd.DataFrame, where: str) -> None:
    if len(df) == 0:
        raise DataError(f"{where}: the data set has no rows")


def require_two_classes(labels: pd.Series, column: str, kind: str) -> None:
    """A classifier trained on one class is trivial: it predicts that class whatever the input (for a category
    output the loss is zero from the first step), so its metrics mean nothing. That is an error, not a warning:
    it almost always means the wrong column, data filtered to one class, or a sample too small to hold both."""
    classes = labels.unique()
    if len(classes) < 2:
        only = f" ({classes[0]!r})" if len(classes) else ""
        raise DataError(f"output column {column!r} has a single class{only} in the training data: a {kind} "
                        f"classifier needs at least two. Check that {column!r} is the label column and the data was "
                        "not filtered to one class; with few rows, check preprocessing.sample_size/sample_ratio, or "
                        "split with preprocessing.split.type: stratify")


def sample(df: pd.DataFrame, ratio: float, size: Optional[int], seed: int) -> pd.DataFrame:
    """A random subset; rows keep their data set row numbers (see split_dataset)."""
    if size is not None and size < len(df):
        return df.sample(n=size, random_state=seed)
    if ratio < 1.0:
        return df.sample(frac=ratio, random_state=seed)
    return df


def split_dataset(df: pd.DataFrame, split: SplitConfig, seed: int) -> dict[str, pd.DataFrame]:
    """training/validation/test frames by `preprocessing.split` (random, fixed column, or stratified). Each keeps
    the data set's row numbers as its index, so an error about a row names the row of the user's file."""
    rng = np.random.default_rng(seed)
    if split.type == "fixed":
        require_columns(df, {split.column: "preprocessing.split.column"}, "split")
        names = {"0": "training", "1": "validation", "2": "test", "train": "training", "training": "training",
                 "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}
        labels = df[split.column].astype(str).str.strip().str.lower().map(lambda v: names.get(v.split(".")[0]))
        bad = labels.isna()
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"split column {split.column!r}, row {df.index[first]}: value "
                            f"{df[split.column].iloc[first]!r} is not one of 0/1/2 or train/validation/test")
        return {name: df[labels == name] for name in SPLITS}
    if split.type == "stratify":
        require_columns(df, {split.column: "preprocessing.split.column"}, "split")
        assignment = np.empty(len(df), dtype=object)
        for _, index in df.groupby(split.column, dropna=False, sort=True).indices.items():
            assignment[index] = _assign(len(index), split.probabilities, rng)
    else:
        assignment = _assign(len(df), split.probabilities, rng)
    return {name: df[assignment == name] for name in SPLITS}


def warn_empty_splits(splits: dict[str, pd.DataFrame], split: SplitConfig, log: Callable[[str], None]) -> None:
    """An empty validation or test split (a tiny data set, or a fixed split column without that value) changes
    what a run does; say so instead of letting it pass silently. A split given probability 0 is empty on purpose."""
    consequences = {"validation": "no validation metrics and no early stopping; the last epoch's weights are kept",
                    "test": "`experiment` will have nothing to evaluate"}
    total = sum(len(frame) for frame in splits.values())
    for index, name in enumerate(SPLITS[1:], start=1):
        if len(splits[name]):
            continue
        if split.type == "fixed":
            cause = f"split column {split.column!r} has no {name} rows"
        elif split.probabilities[index] > 0:
            cause = f"{total} rows split by probabilities {list(split.probabilities)}"
        else:
            continue
        log(f"warning: the {name} split is empty ({cause}): {consequences[name]}; add rows, change "
            "preprocessing.split, or give training_set/validation_set/test_set instead of one dataset")


def _assign(n: int, probabilities, rng) -> np.ndarray:
    """Exact proportions (rounded), shuffled: every split gets its share even for small n."""
    counts = np.floor(np.asarray(probabilities) * n).astype(int)
    counts[0] += n - counts.sum()
    labels = np.repeat(np.array(SPLITS, dtype=object), counts)
    rng.shuffle(labels)
    return labels
