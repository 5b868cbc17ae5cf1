"""Feature preprocessing for ecd: missing values, vocabularies, normalisation — fitted on the training split,
stored as plain JSON metadata, applied identically at train, evaluate and predict time."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from ..data.read import require_two_classes
from ..errors import DataError

TRUE_STRINGS = {"true", "t", "yes", "y", "1", "1.0", "on", "positive", "pos"}
FALSE_STRINGS = {"false", "f", "no", "n", "0", "0.0", "off", "negative", "neg"}
UNK = "<UNK>"
_SET_SPLIT = {"space": r"\s+", "comma": r"\s*,\s*", "pipe": r"\s*\|\s*", "space_punct": r"[\s\W]+"}


def column(feature) -> str:
    return feature.column or feature.name


# ------------------------------------------------------------------------------------------ missing values
def fill_missing(df: pd.DataFrame, feature, fitted: dict, where: str = "",
                 log: Optional[Callable[[str], None]] = None) -> pd.DataFrame:
    """Apply the feature's missing_value_strategy; `fitted` holds the training-split fill value. With `log`, say
    how many rows of `where` (a split's name) were dropped or filled, and with what."""
    col = column(feature)
    series = df[col]
    # an empty text or an empty set is a value; an empty cell of any other type is missing
    blank = series.astype(str).str.strip() == ""
    missing = series.isna() if feature.type in ("text", "set") else (series.isna() | blank)
    if not missing.any():
        return df
    strategy = feature.preprocessing.missing_value_strategy
    if log is not None:
        log(_missing_note(feature, strategy, fitted, int(missing.sum()), len(df), where))
    df = df.copy()
    if strategy == "drop_row":
        return df[~missing]  # the kept rows keep their data set row numbers, for errors that name a row
    if strategy == "bfill":
        df[col] = series.mask(missing).bfill().ffill()
    elif strategy == "ffill":
        df[col] = series.mask(missing).ffill().bfill()
    else:
        df[col] = series.mask(missing, fitted["fill_value"])
    return df


def _missing_note(feature, strategy: str, fitted: dict, count: int, total: int, where: str) -> str:
    rows = f"{where + ': ' if where else ''}{count} of {total} rows have no value in column {column(feature)!r}"
    if strategy == "drop_row":
        return (f"warning: {rows}: dropped (feature {feature.name!r}, missing_value_strategy: drop_row); "
                "fill those cells, or set the feature's preprocessing.missing_value_strategy to keep them")
    if strategy in ("bfill", "ffill"):
        return f"{rows}: filled from the {'next' if strategy == 'bfill' else 'previous'} row ({strategy})"
    return f"{rows}: filled with {fitted['fill_value']!r} ({strategy})"


def fit_fill_value(series: pd.Series, feature) -> Any:
    p = feature.preprocessing
    present = series.dropna()
    if p.missing_value_strategy == "fill_with_mode":
        return present.mode().iloc[0] if len(present) else p.fill_value
    if p.missing_value_strategy == "fill_with_mean":
        if feature.type != "number":
            raise DataError(f"feature {feature.name!r}: fill_with_mean needs a number feature")
        return float(pd.to_numeric(present, errors="coerce").mean())
    if p.missing_value_strategy == "fill_with_false":
        return False
    return p.fill_value


# --------------------------------------------------------------------------------------------- fitting
def fit_feature(train: pd.DataFrame, feature, is_output: bool) -> dict:
    """Metadata for one feature from the training split."""
    col = column(feature)
    series = train[col]
    if is_output and series.isna().all():
        raise DataError(f"output column {col!r} has no labels in the training data (every value is missing)")
    meta: dict[str, Any] = {"type": feature.type, "column": col, "fill_value": _plain(fit_fill_value(series, feature))}
    filled = fill_missing(train[[col]], feature, meta)[col]
    if feature.type == "number":
        values = _to_number(filled, col)
        meta.update(mean=float(np.mean(values)), std=float(np.std(values)) or 1.0, min=float(np.min(values)),
                    max=float(np.max(values)), q1=float(np.percentile(values, 25)), q3=float(np.percentile(values, 75)),
                    median=float(np.median(values)), normalization=feature.preprocessing.normalization)
    elif feature.type == "category":
        values = _category_strings(filled, feature)
        if is_output:
            require_two_classes(values, col, "category")
        counts = values.value_counts(sort=True)
        vocab = sorted(counts.index[: feature.preprocessing.most_common], key=lambda v: (-counts[v], v))
        if not is_output:
            vocab = [UNK] + [v for v in vocab if v != UNK]
        meta.update(vocab=vocab, counts={k: int(counts[k]) for k in vocab if k in counts})
    elif feature.type == "binary":
        meta.update(fallback_true_label=feature.preprocessing.fallback_true_label)
        if is_output:
            require_two_classes(filled.map(lambda v: str(v).strip()), col, "binary")
        meta["labels"] = _binary_labels(filled, meta["fallback_true_label"], col)
    elif feature.type == "set":
        tokens = _set_tokens(filled, feature)
        counts = pd.Series([t for row in tokens for t in row]).value_counts()
        meta.update(vocab=sorted(counts.index[: feature.preprocessing.most_common],
                                 key=lambda v: (-counts[v], v)))
    return meta


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------------------- transforms
def encode_input(df: pd.DataFrame, feature, meta: dict) -> np.ndarray:
    """number/binary → float (n, 1); category → int64 (n,). Text is handled by the encoder module."""
    col = meta["column"]
    values = df[col]
    if feature.type == "number":
        return _normalize(_to_number(values, col), meta)[:, None].astype(np.float32)
    if feature.type == "binary":
        return _to_binary(values, meta, col)[:, None].astype(np.float32)
    if feature.type == "category":
        index = {v: i for i, v in enumerate(meta["vocab"])}
        return np.array([index.get(v, 0) for v in _category_strings(values, feature)], dtype=np.int64)
    raise ValueError(feature.type)


def encode_target(df: pd.DataFrame, feature, meta: dict) -> np.ndarray:
    col = meta["column"]
    values = df[col]
    if feature.type == "number":
        return _normalize(_to_number(values, col), meta).astype(np.float32)
    if feature.type == "binary":
        return _to_binary(values, meta, col).astype(np.float32)
    if feature.type == "category":
        index = {v: i for i, v in enumerate(meta["vocab"])}
        # labels never seen in training get -1: they count as errors in metrics and are skipped by the loss
        return np.array([index.get(v, -1) for v in _category_strings(values, feature)], dtype=np.int64)
    if feature.type == "set":
        index = {v: i for i, v in enumerate(meta["vocab"])}
        out = np.zeros((len(values), len(index)), dtype=np.float32)
        for r, row in enumerate(_set_tokens(values, feature)):
            for t in row:
                if t in index:
                    out[r, index[t]] = 1.0
        return out
    raise ValueError(feature.type)


def denormalize(values: np.ndarray, meta: dict) -> np.ndarray:
    kind = meta.get("normalization")
    if kind == "zscore":
        return values * meta["std"] + meta["mean"]
    if kind == "minmax":
        return values * ((meta["max"] - meta["min"]) or 1.0) + meta["min"]
    if kind == "log1p":
        return np.expm1(values)
    if kind == "iq":
        return values * ((meta["q3"] - meta["q1"]) or 1.0) + meta["median"]
    return values


def _normalize(values: np.ndarray, meta: dict) -> np.ndarray:
    kind = meta.get("normalization")
    if kind == "zscore":
        return (values - meta["mean"]) / meta["std"]
    if kind == "minmax":
        return (values - meta["min"]) / ((meta["max"] - meta["min"]) or 1.0)
    if kind == "log1p":
        return np.log1p(values)
    if kind == "iq":
        return (values - meta["median"]) / ((meta["q3"] - meta["q1"]) or 1.0)
    return values


def _to_number(values: pd.Series, col: str) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & values.notna()
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])  # named by its data set row number (the index)
        raise DataError(f"column {col!r}, row {values.index[first]}: {values.iloc[first]!r} is not a number; fix "
                        "the cell or leave it empty (a missing value)")
    return numbers.to_numpy(dtype=np.float64)


def _category_strings(values: pd.Series, feature) -> pd.Series:
    out = values.map(_category_string)
    return out.str.lower() if feature.preprocessing.lowercase else out


def _category_string(v) -> str:
    # 1.0 and 1 from a CSV column with missing values are the same label
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _binary_labels(values: pd.Series, fallback_true_label, col: str) -> list[str]:
    distinct = sorted({str(v).strip() for v in values if not isinstance(v, bool)})
    unknown = [v for v in distinct if v.lower() not in TRUE_STRINGS | FALSE_STRINGS]
    if unknown and not fallback_true_label:
        if len(distinct) == 2:
            return distinct  # two arbitrary labels: the second (sorted) is "true"; recorded for predictions
        raise DataError(f"binary column {col!r} has values {distinct[:5]}: not true/false-like; set "
                        "preprocessing.fallback_true_label or use a category feature")
    return []


def _to_binary(values: pd.Series, meta: dict, col: str) -> np.ndarray:
    labels, fallback = meta.get("labels") or [], meta.get("fallback_true_label")
    out = np.empty(len(values), dtype=np.float64)
    for i, (row, v) in enumerate(values.items()):  # row: the data set row number, for the error
        if isinstance(v, (bool, np.bool_)):
            out[i] = float(v)
            continue
        s = str(v).strip()
        if labels:
            out[i] = float(s == labels[1])
        elif fallback:
            out[i] = float(s == fallback)
        elif s.lower() in TRUE_STRINGS:
            out[i] = 1.0
        elif s.lower() in FALSE_STRINGS:
            out[i] = 0.0
        else:
            raise DataError(f"binary column {col!r}, row {row}: {v!r} is not true/false-like; use true/false, "
                            "yes/no or 1/0, or set preprocessing.fallback_true_label")
    return out


def _set_tokens(values: pd.Series, feature) -> list[list[str]]:
    pattern = _SET_SPLIT[feature.preprocessing.tokenizer]
    lower = feature.preprocessing.lowercase
    rows = []
    for v in values:
        s = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
        s = s.lower() if lower else s
        rows.append(sorted({t for t in re.split(pattern, s.strip()) if t}))
    return rows
