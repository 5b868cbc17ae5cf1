"""Bad data gets an error or a warning that names the file, column or row and says what to do (docs/reliability.md,
"Bad data"). Through the Python API, and for a few cases through the `cadenza` command in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cadenza import Model
from cadenza.config.schema import SplitConfig
from cadenza.data.read import read_dataset, split_dataset, warn_empty_splits
from cadenza.errors import DataError

WORDS = ["good", "great", "bad", "awful", "plot", "actor"]


def reviews(n: int = 24, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    text = [" ".join(rng.choice(WORDS, 4)) for _ in range(n)]
    return pd.DataFrame({"review": text, "x": rng.normal(size=n),
                         "sentiment": ["pos" if i % 2 else "neg" for i in range(n)],
                         "rating": rng.normal(size=n)})


def ecd_config(bert, output: str = "sentiment", output_type: str = "category", **extra) -> dict:
    return {"input_features": [{"name": "review", "type": "text", "encoder": {
        "type": "auto_transformer", "pretrained_model_name_or_path": str(bert)},
        "preprocessing": {"max_sequence_length": 8}}, {"name": "x", "type": "number"}],
        "output_features": [{"name": output, "type": output_type}], "trainer": {"epochs": 1, "batch_size": 8},
        **extra}


def llm_config(base) -> dict:
    return {"model_type": "llm", "base_model": str(base), "input_features": [{"name": "question", "type": "text"}],
            "output_features": [{"name": "answer", "type": "text"}], "adapter": {"type": "lora", "r": 4},
            "trainer": {"type": "finetune", "epochs": 1, "batch_size": 4}, "generation": {"max_new_tokens": 4}}


def questions(n: int = 8) -> pd.DataFrame:
    return pd.DataFrame({"question": [f"what is {i} plus one?" for i in range(n)],
                         "answer": [str(i + 1) for i in range(n)]}, dtype=object)


class Log(list):
    """Collects a run's log lines (the `log` callable Model passes to fit)."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def warnings(self) -> list[str]:
        return [line for line in self if line.startswith("warning: ")]


# ------------------------------------------------------------------------------------------- reading files
def test_missing_file_names_the_path_and_where_relative_paths_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read_dataset("data/reviews.csv")
    assert str(e.value) == f"data set file 'data/reviews.csv' does not exist; relative paths start from {tmp_path}"
    with pytest.raises(DataError, match="did you mean the packaged data set 'rotten_tomatoes'"):
        read_dataset("rotten_tomato")
    with pytest.raises(DataError, match="is a folder; give one csv/tsv/json/jsonl/parquet file"):
        read_dataset(tmp_path)


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl", "empty.parquet", "empty.csv.gz"])
def test_empty_file_is_named_not_parsed(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError) as e:
        read_dataset(tmp_path / name)
    assert str(e.value) == f"{tmp_path / name}: the file is empty (0 bytes); write the data set into it, or check " \
                           "the path"


def test_header_only_csv_names_its_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\n")
    with pytest.raises(DataError) as e:
        read_dataset(path)
    assert str(e.value) == f"{path}: the file has a header (review, sentiment) but no data rows; add rows below " \
                           "the header"
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(DataError, match="rows.json: the file holds no rows"):
        read_dataset(tmp_path / "rows.json")


@pytest.mark.parametrize("name", ["latin.csv", "latin.tsv", "latin.csv.gz", "latin.jsonl"])
def test_latin1_file_is_an_error_naming_byte_row_and_column(tmp_path, name):
    """Guessing another encoding would silently change the text the model learns (Latin-1 and Windows-1252 differ
    on quotes and the euro sign, and any bytes decode as Latin-1), so the file is refused with the way to fix it."""
    frame = pd.DataFrame({"review": ["fine", "déjà vu", "ok"], "sentiment": ["pos", "neg", "pos"]})
    path = tmp_path / name
    if name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
        path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))
    else:
        frame.to_csv(path, sep="\t" if ".tsv" in name else ",", index=False, encoding="latin-1")
    with pytest.raises(DataError) as e:
        read_dataset(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not UTF-8 text: byte 0xe9 in row 1, column 'review' ('d\ufffdj\ufffd vu') "
                              "is not valid UTF-8")
    assert "Re-save it as UTF-8" in message and "iconv -f cp1252 -t utf-8" in message


def test_latin1_header_is_named(tmp_path):
    path = tmp_path / "header.csv"
    path.write_bytes("année,label\n2020,a\n".encode("latin-1"))
    with pytest.raises(DataError, match="header.csv: not UTF-8 text: byte 0xe9 in the header \\('ann\ufffde'\\)"):
        read_dataset(path)


def test_malformed_csv_line_is_named_with_the_quoting_hint(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("review,sentiment\ngood film,pos\ngood, but long,neg\n")
    with pytest.raises(DataError) as e:
        read_dataset(path)
    assert str(e.value) == f'{path}: cannot be read as csv: Expected 2 fields in line 3, saw 3; a text containing ' \
                           'the separator must be in double quotes ("a, b")'


# ------------------------------------------------------------------------------------------- splits
def test_one_row_data_set_warns_that_validation_and_test_are_empty(tiny_bert_dir, cache_dir, tmp_path):
    log = Log()
    Model(ecd_config(tiny_bert_dir, "rating", "number"), log=log).train(reviews(1), output_directory=tmp_path)
    assert "rows: training 1, validation 0, test 0" in log
    assert log.warnings()[:2] == [
        "warning: the validation split is empty (1 rows split by probabilities [0.7, 0.1, 0.2]): no validation "
        "metrics and no early stopping; the last epoch's weights are kept; add rows, change preprocessing.split, "
        "or give training_set/validation_set/test_set instead of one dataset",
        "warning: the test split is empty (1 rows split by probabilities [0.7, 0.1, 0.2]): `experiment` will have "
        "nothing to evaluate; add rows, change preprocessing.split, or give training_set/validation_set/test_set "
        "instead of one dataset"]


def test_split_with_zero_probability_is_empty_without_a_warning(tiny_bert_dir, cache_dir, tmp_path):
    log = Log()
    cfg = ecd_config(tiny_bert_dir, preprocessing={"split": {"probabilities": [0.8, 0.2, 0.0]}})
    Model(cfg, log=log).train(reviews(20), output_directory=tmp_path)
    assert log.warnings() == []


def test_fixed_split_without_test_rows_warns():
    df = pd.DataFrame({"v": range(4), "fold": ["train", "train", "validation", "train"]})
    log = Log()
    warn_empty_splits(split_dataset(df, SplitConfig(type="fixed", column="fold"), seed=0),
                      SplitConfig(type="fixed", column="fold"), log)
    assert log == ["warning: the test split is empty (split column 'fold' has no test rows): `experiment` will have "
                   "nothing to evaluate; add rows, change preprocessing.split, or give "
                   "training_set/validation_set/test_set instead of one dataset"]


def test_split_frames_keep_the_data_set_row_numbers():
    df = pd.DataFrame({"v": range(10), "fold": [0, 1, 2, 0, 0, 1, 0, 0, 2, 0]})
    fixed = split_dataset(df, SplitConfig(type="fixed", column="fold"), seed=0)
    assert fixed["validation"].index.tolist() == [1, 5] and fixed["test"].index.tolist() == [2, 8]
    shuffled = split_dataset(df, SplitConfig(), seed=0)
    for frame in shuffled.values():
        assert (frame.index == frame.v).all()


# ------------------------------------------------------------------------------------------- ecd cells
def test_missing_cells_are_counted_per_split_and_feature(tiny_bert_dir, cache_dir, tmp_path):
    train, validation = reviews(24), reviews(8, seed=1)
    train.loc[[1, 2], "x"] = np.nan
    train.loc[3, "review"] = None
    train.loc[[4, 5, 6], "sentiment"] = None
    train.loc[7, "sentiment"] = "  "  # an empty label cell is missing too
    validation.loc[0, "sentiment"] = np.nan
    log = Log()
    model = Model(ecd_config(tiny_bert_dir), log=log)
    model.train(training_set=train, validation_set=validation, output_directory=tmp_path)
    assert "training: 1 of 24 rows have no value in column 'review': filled with '' (fill_with_const)" in log
    assert "training: 2 of 24 rows have no value in column 'x': filled with 0.0 (fill_with_const)" in log
    assert log.warnings() == [
        "warning: training: 4 of 24 rows have no value in column 'sentiment': dropped (feature 'sentiment', "
        "missing_value_strategy: drop_row); fill those cells, or set the feature's "
        "preprocessing.missing_value_strategy to keep them",
        "warning: validation: 1 of 8 rows have no value in column 'sentiment': dropped (feature 'sentiment', "
        "missing_value_strategy: drop_row); fill those cells, or set the feature's "
        "preprocessing.missing_value_strategy to keep them"]
    stats = model.evaluate(validation)[0]
    assert 0 <= stats["sentiment"]["accuracy"] <= 1


def test_validation_emptied_by_dropped_rows_trains_without_validation(tiny_bert_dir, cache_dir, tmp_path):
    log = Log()
    validation = reviews(4, seed=1).assign(sentiment=None)
    out = Model(ecd_config(tiny_bert_dir), log=log).train(training_set=reviews(16), validation_set=validation,
                                                          output_directory=tmp_path)
    assert "warning: validation: no rows left after dropping rows with missing values; training runs without " \
           "validation (no early stopping, the last epoch's weights are kept)" in log
    assert out.model_dir.is_dir()


def test_evaluation_without_labelled_rows_is_an_error(tiny_bert_dir, cache_dir, tmp_path):
    model = Model(ecd_config(tiny_bert_dir), log=Log())
    model.train(training_set=reviews(16), output_directory=tmp_path)
    with pytest.raises(DataError, match="evaluation data: no rows left after dropping rows with missing values"):
        model.evaluate(reviews(4).assign(sentiment=np.nan))


@pytest.mark.parametrize("output_type,value,shown", [("category", "pos", "'pos'"), ("binary", True, "'True'")])
def test_single_class_label_is_an_error(tiny_bert_dir, cache_dir, tmp_path, output_type, value, shown):
    """A one-class classifier predicts that class whatever the input (a category head's loss is zero from the
    start): an error, since it almost always means the wrong column or data filtered to one class."""
    df = reviews(16).assign(sentiment=value)
    with pytest.raises(DataError) as e:
        Model(ecd_config(tiny_bert_dir, output_type=output_type), log=Log()).train(training_set=df,
                                                                                  output_directory=tmp_path)
    assert str(e.value) == (
        f"output column 'sentiment' has a single class ({shown}) in the training data: a {output_type} classifier "
        "needs at least two. Check that 'sentiment' is the label column and the data was not filtered to one class; "
        "with few rows, check preprocessing.sample_size/sample_ratio, or split with preprocessing.split.type: "
        "stratify")


def test_bad_cell_is_named_by_its_data_set_row_after_splitting(tiny_bert_dir, cache_dir, tmp_path):
    df = reviews(8).astype({"x": object})
    df["fold"] = [0, 0, 0, 0, 0, 1, 1, 2]
    df.loc[6, "x"] = "twelve"
    cfg = ecd_config(tiny_bert_dir, preprocessing={"split": {"type": "fixed", "column": "fold"}})
    with pytest.raises(DataError) as e:
        Model(cfg, log=Log()).train(df, output_directory=tmp_path)
    assert str(e.value) == "column 'x', row 6: 'twelve' is not a number; fix the cell or leave it empty " \
                           "(a missing value)"


def test_binary_cell_that_is_not_true_false_like_is_named(tiny_bert_dir, cache_dir, tmp_path):
    cfg = ecd_config(tiny_bert_dir)
    cfg["input_features"].append({"name": "flag", "type": "binary"})
    model = Model(cfg, log=Log())
    train = reviews(16).assign(flag=["yes", "no"] * 8)
    model.train(training_set=train, output_directory=tmp_path)
    with pytest.raises(DataError) as e:
        model.predict(train.assign(flag=["yes", "no", "no", "maybe"] * 4))
    assert str(e.value) == "binary column 'flag', row 3: 'maybe' is not true/false-like; use true/false, yes/no " \
                           "or 1/0, or set preprocessing.fallback_true_label"


# ------------------------------------------------------------------------------------------- llm answers
def test_llm_rows_without_an_answer_are_dropped_and_counted(tiny_llama_dir, cache_dir, tmp_path):
    train = questions(8)
    train.loc[1, "answer"] = np.nan
    train.loc[2, "answer"] = None
    train.loc[3, "answer"] = " "
    train.loc[4, "question"] = ""
    log = Log()
    model = Model(llm_config(tiny_llama_dir), log=log)
    model.train(training_set=train, validation_set=questions(2).assign(answer=""), output_directory=tmp_path)
    assert log.warnings() == [
        "warning: training: dropped 3 of 8 rows with no answer in output column 'answer' (2 missing, 1 empty text); "
        "fill them or remove those rows",
        "warning: training: 1 of 5 rows have no value in input column 'question'; their prompts carry an empty text "
        "for it",
        "warning: validation: dropped 2 of 2 rows with no answer in output column 'answer' (0 missing, 2 empty "
        "text); fill them or remove those rows",
        "warning: validation: no row has an answer; training runs without validation"]
    assert any(line.startswith("training on 5 rows,") for line in log)


def test_llm_without_any_answer_fails_before_loading_the_base_model(tiny_llama_dir, cache_dir, tmp_path):
    model = Model(llm_config(tiny_llama_dir), log=Log())
    with pytest.raises(DataError) as e:
        model.train(training_set=questions(4).assign(answer=np.nan), output_directory=tmp_path)
    assert str(e.value) == "training: no row has an answer in output column 'answer' (every value is missing or " \
                           "empty); check that it is the column of answers"
    assert model.model.model is None  # checked in seconds, before minutes of loading a real base model


# ------------------------------------------------------------------------------------------- the command
def cadenza(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "cadenza"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cadenza"]
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd, env=os.environ.copy(),
                          timeout=300)


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_bad_files_exit_2_with_one_paragraph(tiny_bert_dir, cache_dir, tmp_path):
    config = write_config(tmp_path, ecd_config(tiny_bert_dir))
    (tmp_path / "header.csv").write_text("review,x,sentiment\n")
    pd.DataFrame({"review": ["très bien", "mal"], "x": [1, 2], "sentiment": ["pos", "neg"]}).to_csv(
        tmp_path / "latin.csv", index=False, encoding="latin-1")
    expected = {"missing.csv": "error: data set file 'missing.csv' does not exist; relative paths start from",
                "header.csv": "error: header.csv: the file has a header (review, x, sentiment) but no data rows",
                "latin.csv": "error: latin.csv: not UTF-8 text: byte 0xe8 in row 0, column 'review'"}
    for name, start in expected.items():
        done = cadenza("train", "-c", str(config), "--dataset", name, "-od", str(tmp_path / "out"), cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(start) and "Traceback" not in done.stderr
        assert len(done.stderr.strip().split("\n\n")) == 1  # one paragraph, nothing from the libraries around it


def test_cli_single_class_names_the_column(tiny_bert_dir, cache_dir, tmp_path):
    config = write_config(tmp_path, ecd_config(tiny_bert_dir))
    reviews(12).assign(sentiment="pos").to_csv(tmp_path / "one_class.csv", index=False)
    done = cadenza("train", "-c", str(config), "--dataset", "one_class.csv", "-od", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: output column 'sentiment' has a single class ('pos') in the training data")
