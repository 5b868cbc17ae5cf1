"""Reading data sets (files or DataFrames), splitting them, and the named errors for data a model cannot use."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from ..errors import DataError
from ..config.schema import SplitConfig

DatasetSource = Union[str, Path, pd.DataFrame]
SPLITS = ("training", "validation", "test")

_READERS = {
    ".csv": lambda p: pd.read_csv(p),
    ".tsv": lambda p: pd.read_csv(p, sep="\t"),
    ".json": lambda p: pd.read_json(p),
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".parquet": lambda p: pd.read_parquet(p),
}
_COMPRESSION = {".bz2", ".gz", ".xz", ".zip", ".zst"}


def read_dataset(source: DatasetSource) -> pd.DataFrame:
    """A DataFrame from a DataFrame, a file (csv, tsv, json, jsonl, parquet, optionally compressed) or a packaged
    data set's short name (`rotten_tomatoes`, `chatterbot`)."""
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True)
    from .assets import DATASET_SHORT_NAMES

    if isinstance(source, str) and source in DATASET_SHORT_NAMES and not Path(source).exists():
        return DATASET_SHORT_NAMES[source]()
    path = Path(source)
    if not path.exists():
        raise DataError(f"data set file {str(path)!r} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in _READERS:
        raise DataError(f"{path}: unknown data format {kind or '(no extension)'!r}; "
                        f"use one of {', '.join(sorted(_READERS))}")
    try:
        df = _READERS[kind](path)
    except Exception as e:  # pandas raises many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot be read as {kind[1:]}: {e}") from None
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{path}: does not hold a table of rows")
    return df.reset_index(drop=True)


def require_columns(df: pd.DataFrame, columns: dict[str, str], where: str) -> None:
    """columns: column -> the config path that asks for it."""
    missing = {c: p for c, p in columns.items() if c not in df.columns}
    if missing:
        detail = "; ".join(f"{c!r} (asked for by {p})" for c, p in missing.items())
        raise DataError(f"{where}: missing column {detail}; the data has columns {list(df.columns)}")


def check_not_empty(df: pd.DataFrame, where: str) -> None:
    if len(df) == 0:
        raise DataError(f"{where}: the data set has no rows")


def sample(df: pd.DataFrame, ratio: float, size: Optional[int], seed: int) -> pd.DataFrame:
    if size is not None and size < len(df):
        return df.sample(n=size, random_state=seed).reset_index(drop=True)
    if ratio < 1.0:
        return df.sample(frac=ratio, random_state=seed).reset_index(drop=True)
    return df


def split_dataset(df: pd.DataFrame, split: SplitConfig, seed: int) -> dict[str, pd.DataFrame]:
    """training/validation/test frames by `preprocessing.split` (random, fixed column, or stratified)."""
    rng = np.random.default_rng(seed)
    if split.type == "fixed":
        require_columns(df, {split.column: "preprocessing.split.column"}, "split")
        names = {"0": "training", "1": "validation", "2": "test", "train": "training", "training": "training",
                 "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}
        labels = df[split.column].astype(str).str.strip().str.lower().map(lambda v: names.get(v.split(".")[0]))
        bad = labels.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"split column {split.column!r}, row {row}: value {df[split.column].iloc[row]!r} is "
                            "not one of 0/1/2 or train/validation/test")
        return {name: df[labels == name].reset_index(drop=True) for name in SPLITS}
    if split.type == "stratify":
        require_columns(df, {split.column: "preprocessing.split.column"}, "split")
        assignment = np.empty(len(df), dtype=object)
        for _, index in df.groupby(split.column, dropna=False, sort=True).indices.items():
            assignment[index] = _assign(len(index), split.probabilities, rng)
    else:
        assignment = _assign(len(df), split.probabilities, rng)
    return {name: df[assignment == name].reset_index(drop=True) for name in SPLITS}


def _assign(n: int, probabilities, rng) -> np.ndarray:
    """Exact proportions (rounded), shuffled: every split gets its share even for small n."""
    counts = np.floor(np.asarray(probabilities) * n).astype(int)
    counts[0] += n - counts.sum()
    labels = np.repeat(np.array(SPLITS, dtype=object), counts)
    rng.shuffle(labels)
    return labels
