import numpy as np
import pandas as pd
import pytest

from cadenza.data.read import read_dataset, split_dataset
from cadenza.errors import DataError
from cadenza.config.schema import SplitConfig

FRAME = pd.DataFrame({"text": ["a b", "c d", "e f"], "label": ["x", "y", "x"]})


@pytest.mark.parametrize("suffix,write", [
    (".csv", lambda df, p: df.to_csv(p, index=False)),
    (".tsv", lambda df, p: df.to_csv(p, sep="\t", index=False)),
    (".json", lambda df, p: df.to_json(p, orient="records")),
    (".jsonl", lambda df, p: df.to_json(p, orient="records", lines=True)),
    (".parquet", lambda df, p: df.to_parquet(p)),
    (".csv.gz", lambda df, p: df.to_csv(p, index=False)),
])
def test_formats_round_trip(tmp_path, suffix, write):
    path = tmp_path / f"data{suffix}"
    write(FRAME, path)
    pd.testing.assert_frame_equal(read_dataset(path), FRAME)


def test_named_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown data format '.xlsx'"):
        read_dataset(tmp_path / "x.xlsx")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot be read as parquet"):
        read_dataset(tmp_path / "broken.parquet")


def test_random_split_proportions_and_determinism():
    df = pd.DataFrame({"v": range(1000)})
    a = split_dataset(df, SplitConfig(), seed=1)
    b = split_dataset(df, SplitConfig(), seed=1)
    assert [len(a[k]) for k in ("training", "validation", "test")] == [700, 100, 200]
    pd.testing.assert_frame_equal(a["test"], b["test"])
    assert not a["test"].equals(split_dataset(df, SplitConfig(), seed=2)["test"])
    assert set(a["training"].v) | set(a["validation"].v) | set(a["test"].v) == set(range(1000))


def test_fixed_split_and_bad_value():
    df = pd.DataFrame({"v": range(4), "split": [0, 1, 2, "train"]})
    s = split_dataset(df, SplitConfig(type="fixed", column="split"), seed=0)
    assert s["training"].v.tolist() == [0, 3] and s["test"].v.tolist() == [2]
    bad = pd.DataFrame({"v": range(2), "split": [0, "holdout"]})
    with pytest.raises(DataError, match="row 1: value 'holdout'"):
        split_dataset(bad, SplitConfig(type="fixed", column="split"), seed=0)


def test_stratified_split_keeps_class_ratio():
    df = pd.DataFrame({"label": ["a"] * 900 + ["b"] * 100})
    s = split_dataset(df, SplitConfig(type="stratify", column="label"), seed=0)
    assert (s["test"].label == "b").sum() == 20 and (s["validation"].label == "b").sum() == 10


def test_missing_split_column_is_named():
    with pytest.raises(DataError, match="missing column 'fold'"):
        split_dataset(FRAME, SplitConfig(type="fixed", column="fold"), seed=0)


def test_packaged_datasets_by_short_name():
    df = read_dataset("rotten_tomatoes_sentiment")
    assert set(df.columns) == {"review", "sentiment"} and set(df.sentiment) == {"fresh", "rotten"}
    assert len(df) == 12808
    pairs = read_dataset("chatterbot")
    assert len(pairs) == 2025 and not pairs.answer.isna().any()
    assert np.all(pairs.question.str.len() > 0)
