"""Distillation: an `llm` teacher labels rows, an `ecd` student learns from those labels (docs/distill.md).

The teacher labels by scoring (default): for each row it computes the log-likelihood of every class's answer
text (its `verbalizer` word, then the end-of-sequence token) after the row's prompt, and takes the likeliest.
The rows of a batch run as ONE packed sequence laid out as a tree: the prompt prefix every row shares (a chat
template's system prompt) once, then each row's own prompt once, then each answer of that row, which attends to
its row's prompt and itself only. One forward pass scores every answer of every row in the batch, with no
generation loop and no repeated prompt. `method: generate` instead generates text and reads the label with the
teacher's `match` rules, as zero-shot `predict` does.

The student learns the teacher's classes (`targets: hard`) or, for a scoring teacher, its class probabilities
(`targets: soft`, optionally tempered), handed to the ecd model as soft targets (cadenza.ecd: EcdModel.soft_targets).
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd
import torch

from .artifacts import read_json, temporary_sibling, write_json
from .config.load import (ConfigSource, distill_output, load_config, load_teacher_config, read_config_file,
                          teacher_classes, teacher_problems)
from .config.schema import CadenzaConfig
from .data.cache import cache_root, configured_cache_dir
from .data.read import DatasetSource
from .errors import ConfigError, DataError, ModelFolderError
from .llm.batching import common_prefix
from .llm.loss import TargetLoss, can_share_prefix
from .llm.outputs import extract_label
from .llm.tokenize import truncate

REPORT_FILE = "distill_report.json"
LABELS_FILE = "teacher_labels.csv"
CACHE_VERSION = "v1"
CHUNK_BATCHES = 8  # batches labelled between two saves of the label cache (and progress lines)


# ------------------------------------------------------------------------------------------ scoring answers
def tree_batch(prompts: list[np.ndarray], answers: list[list[np.ndarray]]) -> dict:
    """One packed sequence scoring answers[r][a] after prompts[r] for every row r and answer a.

    Layout: shared prefix | row 0 prompt | row 0 answer 0 | row 0 answer 1 | ... | row 1 prompt | ... A token sees
    the earlier tokens of the shared prefix, of its row's prompt and of its own answer (a 4D boolean mask); an
    answer's positions continue from its row's prompt, so every answer is computed as if it followed its prompt
    alone. `spans` lists (row, answer, number of target tokens) in the order of target_ids."""
    shared = common_prefix(prompts) if len(prompts) > 1 else 0
    parts, positions, rows_of, answers_of = [prompts[0][:shared]], [np.arange(shared)], [np.full(shared, -1)], \
        [np.full(shared, -1)]
    target_index, target_ids, spans = [], [], []
    offset = shared
    for r, (prompt, row_answers) in enumerate(zip(prompts, answers)):
        own = prompt[shared:]
        parts.append(own)
        positions.append(np.arange(shared, len(prompt)))
        rows_of.append(np.full(len(own), r))
        answers_of.append(np.full(len(own), -1))
        offset += len(own)
        last_prompt_token = offset - 1  # its hidden state predicts every answer's first token
        for a, answer in enumerate(row_answers):
            parts.append(answer)
            positions.append(np.arange(len(prompt), len(prompt) + len(answer)))
            rows_of.append(np.full(len(answer), r))
            answers_of.append(np.full(len(answer), a))
            target_index.append(np.concatenate([[last_prompt_token], offset + np.arange(len(answer) - 1)]))
            target_ids.append(answer)
            spans.append((r, a, len(answer)))
            offset += len(answer)
    row = torch.from_numpy(np.concatenate(rows_of))
    answer = torch.from_numpy(np.concatenate(answers_of))
    total = len(row)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    same_row = row.view(-1, 1) == row.view(1, -1)
    same_branch = (answer.view(1, -1) == -1) | (answer.view(-1, 1) == answer.view(1, -1))
    visible = (row.view(1, -1) == -1) | (same_row & same_branch)
    return {
        "input_ids": torch.from_numpy(np.concatenate(parts)).long().view(1, -1),
        "position_ids": torch.from_numpy(np.concatenate(positions)).long().view(1, -1),
        "attention_mask": (causal & visible).view(1, 1, total, total),
        "target_index": torch.from_numpy(np.concatenate(target_index)).long(),
        "target_ids": torch.from_numpy(np.concatenate(target_ids)).long(),
        "longest_row": int(max(len(p) + max(len(a) for a in ans) for p, ans in zip(prompts, answers))),
        "spans": spans,
    }


def packed_batch(prompts: list[np.ndarray], answers: list[list[np.ndarray]]) -> dict:
    """The same scores without a 4D mask (for attention that cannot take one): every prompt + answer as its own
    row of a plain packed sequence (position ids restart per row; transformers keeps rows apart)."""
    seqs, target_index, target_ids, spans = [], [], [], []
    offset = 0
    for r, (prompt, row_answers) in enumerate(zip(prompts, answers)):
        for a, answer in enumerate(row_answers):
            seqs.append(np.concatenate([prompt, answer]))
            target_index.append(offset + len(prompt) - 1 + np.arange(len(answer)))
            target_ids.append(answer)
            spans.append((r, a, len(answer)))
            offset += len(prompt) + len(answer)
    return {
        "input_ids": torch.from_numpy(np.concatenate(seqs)).long().view(1, -1),
        "position_ids": torch.cat([torch.arange(len(s)) for s in seqs]).view(1, -1),
        "attention_mask": None,
        "target_index": torch.from_numpy(np.concatenate(target_index)).long(),
        "target_ids": torch.from_numpy(np.concatenate(target_ids)).long(),
        "longest_row": int(max(len(s) for s in seqs)),
        "spans": spans,
    }


@torch.no_grad()
def answer_log_likelihoods(model, prompts: list[np.ndarray], answers: list[list[np.ndarray]],
                           batch_size: int, build: Optional[Callable] = None) -> np.ndarray:
    """(rows, answers) summed log-probabilities of each answer's tokens after its row's prompt. Rows go in
    length-sorted batches of batch_size, each one forward pass (a tree_batch, or a packed_batch for models that
    cannot take a 4D mask)."""
    module = TargetLoss(model).eval()
    build = build or (tree_batch if can_share_prefix(model) else packed_batch)
    k = max(len(a) for a in answers)
    out = np.full((len(prompts), k), -np.inf)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = build([prompts[i] for i in chunk], [answers[i] for i in chunk])
        logits = module.target_logits(batch)
        targets = batch["target_ids"].to(logits.device).view(-1, 1)
        logp = torch.log_softmax(logits, -1).gather(1, targets).view(-1).cpu()
        for (r, a, _), part in zip(batch["spans"], torch.split(logp, [n for _, _, n in batch["spans"]])):
            out[chunk[r], a] = float(part.sum())
    return out


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log-likelihoods / temperature) from the teacher's probabilities (softmax of those log-likelihoods,
    so their logs differ from them by a constant per row): below 1 sharper, above 1 flatter, at 1 themselves."""
    if temperature == 1.0:
        return probabilities
    return softmax_rows(np.log(np.clip(probabilities, np.finfo(float).tiny, None)) / temperature)


# ------------------------------------------------------------------------------------------- the teacher
@dataclass
class Teacher:
    llm: object              # cadenza.llm.LlmModel, loaded
    classes: list[str]       # what it chooses among
    answers: list[str]       # the answer text scored for each class
    method: str              # score | generate
    batch_size: int
    fingerprint: str         # names its label cache: model files, prompt, classes, method
    source: str              # for the report


def load_teacher(section, log: Callable[[str], None] = print) -> Teacher:
    """The teacher of a distill section, loaded: an llm config used as it is, or a trained llm's folder."""
    from .api import Model

    if section.model is not None:
        try:
            model = Model.load(section.model, log=log)
        except ModelFolderError as e:
            raise ModelFolderError(f"distill.teacher.model: {e}") from None
        if model.config.model_type != "llm":
            raise ConfigError([("distill.teacher.model", f"{section.model} holds a {model.config.model_type} model; "
                                "the teacher is an llm")])
        problems = teacher_problems(_as_used(model.config), section.method, section.verbalizer,
                                    "distill.teacher.model", saved=tuple(model.model.labels))
        if problems:
            raise ConfigError(problems)
        llm, config, source = model.model, model.config, str(model.model_dir)
        identity = _files_identity(Path(model.model_dir))
    else:
        config = load_teacher_config(section.config)
        llm = Model(config, log=log).model
        source = section.config if isinstance(section.config, str) else f"inline llm config ({config.base_model})"
        identity = _files_identity(_base_model_path(config.base_model))
    llm._ensure_base(log=log)
    classes = teacher_classes(config, section.verbalizer, saved=tuple(llm.labels))
    answers = [(section.verbalizer or {}).get(c, c) for c in classes]
    key = json.dumps({"version": CACHE_VERSION, "config": config.model_dump(mode="json"), "files": identity,
                      "method": section.method, "classes": classes, "answers": answers}, sort_keys=True, default=str)
    return Teacher(llm, classes, answers, section.method, section.batch_size,
                   hashlib.sha256(key.encode()).hexdigest()[:24], source)


def _as_used(config):
    """A trained teacher's saved config checked as a teacher: it was trained, and is now used as it is."""
    return config.model_copy(update={"trainer": config.trainer.model_copy(update={"type": "none"}),
                                     "prompt": config.prompt.model_copy(update={"retrieval": type(
                                         config.prompt.retrieval)()})})


def _base_model_path(base_model: str) -> Optional[Path]:
    from .data import assets

    path = Path(assets.resolve_model_name(base_model)).expanduser()
    return path if path.exists() else None


def _files_identity(path: Optional[Path]) -> list:
    """Names, sizes and modification times of a model's files: a changed model misses the label cache."""
    if path is None:
        return []
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path) if p != path else p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


# ------------------------------------------------------------------------------------------- labelling
@dataclass
class Labels:
    labels: list[Optional[str]]   # per row: the teacher's class (None: generate named none)
    probabilities: np.ndarray     # (rows, classes), score only (NaN for generate)
    seconds: float                # teacher time for these rows (cached rows: as measured when computed)
    computed: int                 # rows the teacher ran on now
    cached: int                   # rows read from the label cache

    @property
    def rows_per_second(self) -> float:
        return len(self.labels) / self.seconds if self.seconds > 0 else float("nan")


class LabelCache:
    """Teacher labels per prompt text, one JSON file per teacher fingerprint under <cache>/teacher-labels/,
    written whole through an atomic rename. Each entry keeps the seconds its row cost when it was computed."""

    def __init__(self, folder: Path, fingerprint: str):
        self.path = Path(folder) / "teacher-labels" / f"{fingerprint}.json"
        try:
            self.entries: dict = read_json(self.path) if self.path.is_file() else {}
        except Exception:  # an unreadable cache file is dropped and rebuilt, never trusted
            self.entries = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.entries)


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


def label_rows(teacher: Teacher, df: pd.DataFrame, cache: LabelCache, where: str,
               log: Callable[[str], None] = print) -> Labels:
    """The teacher's class for every row of df, from the cache where it has the row's prompt."""
    llm = teacher.llm
    records = llm._records(df, need_output=False)
    prompts = llm._prompts(records)
    keys = [prompt_key(p) for p in prompts]
    todo = list({k: i for i, k in enumerate(keys) if k not in cache.entries}.values())  # once per distinct prompt
    if todo:
        log(f"teacher: labelling {len(todo)} {where} rows ({len(df) - len(todo)} already labelled), "
            f"method {teacher.method}")
    done, started = 0, time.perf_counter()
    step = teacher.batch_size * CHUNK_BATCHES
    for start in range(0, len(todo), step):  # saved chunk by chunk: an interrupted run keeps what it labelled
        chunk = todo[start:start + step]
        chunk_started = time.perf_counter()
        labels, probabilities = _run_teacher(teacher, [records[i] for i in chunk], [prompts[i] for i in chunk])
        per_row = (time.perf_counter() - chunk_started) / len(chunk)
        for j, i in enumerate(chunk):
            cache.entries[keys[i]] = {"label": labels[j], "probabilities": probabilities[j].tolist(),
                                      "seconds": per_row}
        cache.save()
        done += len(chunk)
        log(f"teacher: {done}/{len(todo)} {where} rows, {done / (time.perf_counter() - started):.2f} rows/s")
    entries = [cache.entries[k] for k in keys]
    return Labels([e["label"] for e in entries], np.array([e["probabilities"] for e in entries], dtype=float),
                  float(sum(e["seconds"] for e in entries)), len(todo), len(df) - len(todo))


def _run_teacher(teacher: Teacher, records: list[dict], prompts: list[str]) -> tuple[list, np.ndarray]:
    llm = teacher.llm
    if teacher.method == "generate":
        texts = llm._generate_records(records, teacher.batch_size)
        output = llm.output
        labels = [extract_label(t, teacher.classes, output.match, output.fallback_label) for t in texts]
        return labels, np.full((len(records), len(teacher.classes)), np.nan)
    prompt_ids, answer_ids = _scoring_tokens(llm, prompts, teacher.answers)
    scores = answer_log_likelihoods(llm.model, prompt_ids, answer_ids, teacher.batch_size)
    probabilities = softmax_rows(scores)
    return [teacher.classes[i] for i in probabilities.argmax(1)], probabilities


def _scoring_tokens(llm, prompts: list[str], answers: list[str]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Token ids as the llm trains and scores them: prompt ids, then each answer's ids and EOS, cut to
    global_max_sequence_length (the prompt keeps its end)."""
    tokenizer, builder = llm.tokenizer, llm.builder
    max_len = llm.config.preprocessing.global_max_sequence_length
    prompt_ids = tokenizer(list(prompts), add_special_tokens=builder.add_special_tokens)["input_ids"]
    answer_cache: dict[str, list[int]] = {}
    rows, answer_rows = [], []
    for prompt, ids in zip(prompts, prompt_ids):
        targets = []
        for answer in answers:
            text = builder.target(prompt, answer)
            if text not in answer_cache:
                answer_cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            targets.append(answer_cache[text])
        longest = max(targets, key=len)
        kept, _, _ = truncate(list(ids), longest, max_len)
        rows.append(np.asarray(kept, dtype=np.int64))
        answer_rows.append([np.asarray(t[:max(1, (max_len or len(t)) - len(kept))], dtype=np.int64) for t in targets])
    return rows, answer_rows


# ------------------------------------------------------------------------------------------- the recipe
def distill(config: ConfigSource, dataset: Optional[DatasetSource] = None, *,
            training_set: Optional[DatasetSource] = None, validation_set: Optional[DatasetSource] = None,
            test_set: Optional[DatasetSource] = None, output_directory: Union[str, Path] = "results",
            experiment_name: str = "distill", model_name: str = "run", random_seed: int = 42,
            log: Callable[[str], None] = print) -> dict:
    """Label the training (and validation) rows with the teacher, train the student on those labels, and score
    both on the test rows that have true labels. Writes distill_report.json, teacher_labels.csv,
    test_statistics.json and predictions.csv into the student's run folder; returns the report."""
    from .api import Model

    if isinstance(config, CadenzaConfig):
        raw = config.model_dump(mode="json")
    else:
        raw = read_config_file(config) if isinstance(config, (str, Path)) else copy.deepcopy(config)
    checked = load_config(raw)
    section, output = checked.distill, distill_output(checked) if checked.distill else None
    if section is None:
        raise ConfigError([("distill", "the config has no distill section (docs/distill.md)")])
    student = Model({k: v for k, v in raw.items() if k != "distill"}, log=log)
    column = output.column or output.name
    splits = student._splits(dataset, training_set, validation_set, test_set, random_seed, log)
    train = splits["training"].iloc[:section.rows] if section.rows else splits["training"]
    validation, test = splits["validation"], splits["test"]
    test = test[test[column].notna()] if column in test.columns else test.iloc[:0]

    teacher = load_teacher(section.teacher, log=log)
    _check_true_labels(test, column, teacher.classes)
    cache = LabelCache(cache_root(configured_cache_dir(student.config)), teacher.fingerprint)
    labelled = {}
    for name, frame in (("training", train), ("validation", validation)):
        if len(frame):
            labels = label_rows(teacher, frame, cache, name, log)
            labelled[name] = (frame.assign(**{column: labels.labels}), labels)
    if not labelled.get("training"):
        raise DataError("distill: the training split has no rows for the teacher to label")
    teacher_on_test = label_rows(teacher, test, cache, "test", log) if len(test) else None

    frames = {name: _drop_unlabelled(frame, column, name, log) for name, (frame, _) in labelled.items()}
    targets = section.targets
    if targets == "soft":  # the student's loss learns the teacher's probabilities (cadenza.ecd: soft_targets)
        tables = {name: pd.DataFrame(tempered(labels.probabilities, section.temperature), index=frame.index,
                                     columns=teacher.classes).loc[frames[name].index]
                  for name, (frame, labels) in labelled.items()}
        # train() numbers a DataFrame's rows 0..n-1 (cadenza.data.read.read_dataset): the tables are numbered alike
        student.model.soft_targets = {name: {output.name: table.reset_index(drop=True)}
                                      for name, table in tables.items()}
        log(f"student: learns the teacher's class probabilities (soft targets, temperature {section.temperature:g})")
    try:
        out = student.train(training_set=frames["training"], validation_set=frames.get("validation"),
                            output_directory=output_directory, experiment_name=experiment_name,
                            model_name=model_name, random_seed=random_seed)
    finally:
        student.model.soft_targets = {}
    report = {"classes": teacher.classes, "column": column,
              "labelled_rows": {name: len(frame) for name, (frame, _) in labelled.items()},
              "targets": targets, "temperature": section.temperature if targets == "soft" else None,
              "teacher": {"source": teacher.source, "method": teacher.method,
                          "labelling": {name: _labelling(labels) for name, (_, labels) in labelled.items()}},
              "student": {"run_dir": str(out.run_dir), "train_seconds": out.statistics.get("seconds")}}
    _write_labels(out.run_dir / LABELS_FILE, labelled, splits, column)
    if teacher_on_test is not None:
        truth = test[column].astype(str).tolist()
        student_predictions, seconds = _timed_student_predict(out.model_dir or out.run_dir, test)
        predicted = [str(x) for x in student_predictions[f"{output.name}_predictions"]]
        test_stats, predictions = student.evaluate(test)
        write_json(out.run_dir / "test_statistics.json", test_stats)
        predictions.to_csv(out.run_dir / "predictions.csv", index=False)
        report["test_rows"] = len(test)
        report["teacher"].update(accuracy=_accuracy(teacher_on_test.labels, truth),
                                 rows_per_second=teacher_on_test.rows_per_second,
                                 seconds=teacher_on_test.seconds, computed=teacher_on_test.computed,
                                 from_cache=teacher_on_test.cached)
        report["student"].update(accuracy=_accuracy(predicted, truth), rows_per_second=len(test) / seconds,
                                 seconds=seconds)
        report["agreement"] = _accuracy(predicted, [str(x) for x in teacher_on_test.labels])
        report["accuracy_gap"] = report["teacher"]["accuracy"] - report["student"]["accuracy"]
        report["speedup"] = report["student"]["rows_per_second"] / report["teacher"]["rows_per_second"]
    else:
        log("no test rows with true labels: the report has no accuracies or speeds")
    write_json(out.run_dir / REPORT_FILE, report)
    log(summary(report))
    return report


def _check_true_labels(test: pd.DataFrame, column: str, classes: list[str]) -> None:
    unknown = sorted(set(test[column].astype(str)) - set(classes))
    if unknown:
        raise DataError(f"test split, column {column!r}: true labels {unknown[:5]} are not among the teacher's "
                        f"classes ({', '.join(classes)}), so neither model could ever predict them; add them to "
                        "distill.teacher.verbalizer (or the teacher's match rules), or leave those rows out")


def _drop_unlabelled(frame: pd.DataFrame, column: str, where: str, log: Callable[[str], None]) -> pd.DataFrame:
    missing = frame[column].isna()
    if missing.any():
        log(f"warning: {where}: the teacher named no class for {int(missing.sum())} of {len(frame)} rows "
            "(no match rule fired and no fallback_label); they are left out of training")
    return frame[~missing]


def _timed_student_predict(model_dir: Path, test: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """The saved student's predictions on the test rows and their wall time, with an empty embedding cache: the
    encoder runs on every row, as it would on rows never seen before (a warm cache would time a lookup). The first
    row is predicted once before timing, which loads the encoder."""
    from .api import Model

    with tempfile.TemporaryDirectory(prefix="cadenza-distill-") as fresh_cache:
        model = Model.load(model_dir, log=lambda _: None)
        model.config.preprocessing.cache_dir = fresh_cache
        model.predict(test.iloc[:1])
        started = time.perf_counter()
        predictions = model.predict(test)
        return predictions, time.perf_counter() - started


def _accuracy(predicted: list, truth: list[str]) -> float:
    return float(np.mean([p is not None and str(p) == t for p, t in zip(predicted, truth)])) if truth else float("nan")


def _labelling(labels: Labels) -> dict:
    return {"rows": len(labels.labels), "computed": labels.computed, "from_cache": labels.cached,
            "seconds": labels.seconds, "rows_per_second": labels.rows_per_second}


def _write_labels(path: Path, labelled: dict, splits: dict, column: str) -> None:
    """The rows the student learned from, with the teacher's label and (where the data had one) the true one."""
    parts = []
    for name, (frame, _) in labelled.items():
        part = frame.copy()
        true = splits[name].loc[frame.index, column] if column in splits[name].columns else None
        part.insert(0, "split", name)
        part[f"{column}_true"] = true
        parts.append(part)
    tmp = temporary_sibling(path)
    pd.concat(parts).to_csv(tmp, index=False)
    tmp.replace(path)


def summary(report: dict) -> str:
    teacher, student = report["teacher"], report["student"]
    lines = [f"distill: teacher labelled {sum(report['labelled_rows'].values())} rows "
             f"({', '.join(f'{k} {v}' for k, v in report['labelled_rows'].items())}), method {teacher['method']}; "
             f"the student learned its {report['targets']} targets"
             + (f" (temperature {report['temperature']:g})" if report["targets"] == "soft" else "")]
    if "accuracy" in teacher:
        lines += [f"  on {report['test_rows']} test rows with true labels:",
                  f"  teacher accuracy {teacher['accuracy']:.4f}  {teacher['rows_per_second']:8.2f} rows/s",
                  f"  student accuracy {student['accuracy']:.4f}  {student['rows_per_second']:8.2f} rows/s",
                  f"  student - teacher: {-report['accuracy_gap']:+.4f} accuracy, {report['speedup']:.1f}x rows/s; "
                  f"they agree on {report['agreement']:.3f} of rows"]
    lines.append(f"  report: {Path(student['run_dir']) / REPORT_FILE}")
    return "\n".join(lines)
