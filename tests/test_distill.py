"""Distillation (cadenza/distill.py): the teacher's one-pass answer scoring equals scoring each answer alone, the
teacher labels rows (cached by prompt), the student trains on those labels, the report compares both, and bad
distill sections are config errors naming their path. Tiny random models with real tokenizers."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.nn import functional as F

from cadenza import Model
from cadenza.cli import main
from cadenza.config.load import load_config
from cadenza.distill import (LABELS_FILE, REPORT_FILE, LabelCache, answer_log_likelihoods, distill, label_rows,
                             load_teacher, packed_batch, tempered, tree_batch)
from cadenza.ecd import soft_target
from cadenza.errors import ConfigError, DataError, ModelFolderError
from cadenza.llm.load import load_causal_lm, load_tokenizer

pytestmark = [pytest.mark.usefixtures("simulated_hardware"), pytest.mark.timeout(300)]

MATCH = {"fresh": {"type": "regex", "value": r"\b(fresh|positive)\b"},
         "rotten": {"type": "regex", "value": r"\b(rotten|negative)\b"}}


def teacher_config(llama, **extra) -> dict:
    cfg = {"model_type": "llm", "base_model": str(llama), "input_features": [{"name": "review", "type": "text"}],
           "output_features": [{"name": "sentiment", "type": "category", "match": MATCH}],
           # a plain prompt that ends with the review's last word: the random teacher's scores then depend on the
           # row (behind a chat template's fixed last tokens they hardly do), so it labels rows with both classes
           "prompt": {"template": "Review of the film: {review}", "use_chat_template": False},
           "generation": {"max_new_tokens": 3}, "trainer": {"type": "none"}}
    cfg.update(extra)
    return cfg


def student_config(bert, llama, **distill_keys) -> dict:
    section = {"teacher": {"config": teacher_config(llama), "verbalizer": {"fresh": "positive", "rotten": "negative"},
                           "batch_size": 4}, "rows": 24}
    section.update(distill_keys)
    return {"model_type": "ecd",
            "input_features": [{"name": "review", "type": "text", "encoder": {
                "type": "auto_transformer", "pretrained_model_name_or_path": str(bert), "trainable": False}}],
            "output_features": [{"name": "sentiment", "type": "category"}],
            "preprocessing": {"split": {"type": "random", "probabilities": [0.6, 0.2, 0.2]}},
            "trainer": {"epochs": 2, "batch_size": 8}, "distill": section}


def reviews(n=40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    words = ["a moving", "a dull", "witty", "tedious", "film", "story", "great acting", "awful pacing"]
    texts = [f"({i}) " + " ".join(rng.choice(words, 4)) for i in range(n)]
    return pd.DataFrame({"review": texts, "sentiment": ["fresh" if i % 2 else "rotten" for i in range(n)]})


# ------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("build", [tree_batch, packed_batch])
def test_one_pass_scores_equal_each_answer_scored_alone(tiny_llama_dir, simulated_hardware, build):
    tok = load_tokenizer(str(tiny_llama_dir))
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32).eval()
    system = "<|im_start|>system\nYou are a careful film critic who answers in one word.<|im_end|>\n"
    prompts = [np.asarray(tok(system + f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
               for t in ("a moving story", "tedious and long, with awful pacing", "witty")]
    answers = [[np.asarray(tok(w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                for w in ("positive", "negative", "not sure at all")] for _ in prompts]
    assert len({len(a) for a in answers[0]}) > 1  # answers of different lengths
    with torch.no_grad():
        expected = np.zeros((3, 3))
        for r, p in enumerate(prompts):
            for a, ans in enumerate(answers[r]):
                logits = model(torch.from_numpy(np.concatenate([p, ans])).view(1, -1)).logits[0].float()
                logp = torch.log_softmax(logits, -1)
                expected[r, a] = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(ans))
    if build is tree_batch:  # the common system prompt once, each row's prompt once
        every_prompt_once = sum(len(p) + sum(len(a) for a in ans) for p, ans in zip(prompts, answers))
        assert tree_batch(prompts, answers)["input_ids"].shape[1] < every_prompt_once
    got = answer_log_likelihoods(model, prompts, answers, batch_size=2, build=build)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    assert not np.allclose(got[0], got[1])  # rows do not see each other: different prompts, different scores


# ------------------------------------------------------------------------------------------- labelling
def test_teacher_labels_rows_and_the_cache_is_hit_on_rerun(tiny_llama_dir, tiny_bert_dir, cache_dir):
    config = load_config(student_config(tiny_bert_dir, tiny_llama_dir))
    df = reviews(12)
    teacher = load_teacher(config.distill.teacher, log=lambda _: None)
    assert teacher.classes == ["fresh", "rotten"] and teacher.answers == ["positive", "negative"]
    cache = LabelCache(cache_dir, teacher.fingerprint)
    first = label_rows(teacher, df, cache, "training", log=lambda _: None)
    assert first.computed == 12 and first.cached == 0
    assert set(first.labels) <= {"fresh", "rotten"} and first.probabilities.shape == (12, 2)
    np.testing.assert_allclose(first.probabilities.sum(1), 1.0, rtol=1e-6)
    assert [teacher.classes[i] for i in first.probabilities.argmax(1)] == first.labels
    # a new process (a new cache object on the same folder) computes nothing again, and labels the same
    again = label_rows(teacher, df, LabelCache(cache_dir, teacher.fingerprint), "training", log=lambda _: None)
    assert again.computed == 0 and again.cached == 12 and again.labels == first.labels
    assert again.seconds == pytest.approx(first.seconds)  # the teacher's time as measured when it labelled
    # another verbalizer is another teacher: its own cache entries
    other = load_config(student_config(tiny_bert_dir, tiny_llama_dir, teacher={
        "config": teacher_config(tiny_llama_dir), "verbalizer": {"fresh": "good", "rotten": "bad"}}))
    assert load_teacher(other.distill.teacher, log=lambda _: None).fingerprint != teacher.fingerprint


def test_generate_method_reads_the_class_with_the_match_rules(tiny_llama_dir, tiny_bert_dir, cache_dir):
    config = load_config(student_config(tiny_bert_dir, tiny_llama_dir, teacher={
        "config": teacher_config(tiny_llama_dir, output_features=[{
            "name": "sentiment", "type": "category", "fallback_label": "rotten",
            "match": {"fresh": {"type": "regex", "value": r"\w"}}}]), "method": "generate", "batch_size": 4}))
    teacher = load_teacher(config.distill.teacher, log=lambda _: None)
    df = reviews(6)
    labels = label_rows(teacher, df, LabelCache(cache_dir, teacher.fingerprint), "test", log=lambda _: None)
    texts = teacher.llm._generate_records(df.to_dict("records"), 4)
    assert labels.labels == ["fresh" if any(c.isalnum() for c in t) else "rotten" for t in texts]


# ------------------------------------------------------------------------------------------- the recipe
def test_student_trains_on_teacher_labels_and_the_report_compares_both(tiny_llama_dir, tiny_bert_dir, cache_dir,
                                                                       tmp_path):
    logs = []
    report = distill(student_config(tiny_bert_dir, tiny_llama_dir), reviews(), output_directory=tmp_path,
                     log=logs.append)
    run = tmp_path / "distill_run"
    assert json.loads((run / REPORT_FILE).read_text())["student"]["accuracy"] == report["student"]["accuracy"]
    assert report["labelled_rows"] == {"training": 24, "validation": 8}
    for who in ("teacher", "student"):
        assert 0 <= report[who]["accuracy"] <= 1 and report[who]["rows_per_second"] > 0
    assert report["test_rows"] == 8 and report["speedup"] > 0 and 0 <= report["agreement"] <= 1
    assert report["targets"] == "hard" and report["temperature"] is None  # the default
    assert "teacher accuracy" in "\n".join(logs) and "student accuracy" in "\n".join(logs)
    # the student learned the teacher's labels, not the data's: its training rows carry the teacher's classes
    labels = pd.read_csv(run / LABELS_FILE)
    teacher = load_teacher(load_config(student_config(tiny_bert_dir, tiny_llama_dir)).distill.teacher,
                           log=lambda _: None)
    training = labels[labels.split == "training"]
    again = label_rows(teacher, training, LabelCache(cache_dir, teacher.fingerprint), "training", log=lambda _: None)
    assert again.computed == 0 and list(training.sentiment) == again.labels
    assert (training.sentiment != training.sentiment_true).any()  # a random teacher disagrees with the truth
    saved = Model.load(run)
    assert set(json.loads((run / "model" / "training_set_metadata.json").read_text())["sentiment"]["vocab"]) \
        == set(training.sentiment)
    assert len(saved.predict(reviews(3))) == 3
    assert (run / "test_statistics.json").is_file() and (run / "predictions.csv").is_file()
    # a rerun labels nothing again
    logs.clear()
    rerun = distill(student_config(tiny_bert_dir, tiny_llama_dir), reviews(), output_directory=tmp_path,
                    log=logs.append)
    assert rerun["teacher"]["computed"] == 0 and rerun["teacher"]["from_cache"] == 8
    assert all(v["computed"] == 0 for v in rerun["teacher"]["labelling"].values())
    assert rerun["teacher"]["accuracy"] == report["teacher"]["accuracy"]
    assert not any(line.startswith("teacher: labelling") for line in logs)


# ------------------------------------------------------------------------------------------- soft targets
def numbers_student(output_type: str):
    """An ecd student without an encoder (one number input): its loss on a batch is easy to compute by hand."""
    cfg = {"model_type": "ecd", "input_features": [{"name": "x", "type": "number"}],
           "output_features": [{"name": "sentiment", "type": output_type}], "trainer": {"batch_size": 8}}
    model = Model(cfg, log=lambda _: None).model
    df = pd.DataFrame({"x": [0.1, 0.5, -0.3, 0.9, 1.2], "sentiment": ["rotten", "fresh", "fresh", "fresh", "rotten"]},
                      index=[10, 11, 12, 13, 14])
    model.metadata = model._fit_metadata(df)
    torch.manual_seed(0)
    model.net = model._build_net()
    return model, df


def loss_and_logits(model, data):
    batch = model._batch(data, np.arange(data["n"]), True)
    with torch.no_grad():
        return float(model._loss_sum(model.net, batch)), model.net(batch["inputs"])["sentiment"].float()


def test_soft_targets_reach_the_loss_in_the_student_vocab_order():
    model, df = numbers_student("category")
    assert model.metadata["sentiment"]["vocab"] == ["fresh", "rotten"]  # the student's order: by count
    # the teacher's order is another one, and it has a class the student never saw as a label
    teacher = pd.DataFrame({"rotten": [0.6, 0.2, 0.1, 0.3, 0.5], "mixed": [0.2, 0.0, 0.1, 0.1, 0.0],
                            "fresh": [0.2, 0.8, 0.8, 0.6, 0.5]}, index=df.index)
    model.soft_targets = {"training": {"sentiment": teacher.iloc[::-1]}}  # matched by row label, not position
    data = model._prepare({"training": df, "validation": df}, True)
    kept = teacher[["fresh", "rotten"]].to_numpy()
    expected = kept / kept.sum(1, keepdims=True)  # "mixed" is dropped and each row renormalized
    np.testing.assert_allclose(data["training"]["soft_targets"]["sentiment"], expected, rtol=1e-6)
    assert "soft_targets" not in data["validation"]  # only the splits given soft targets learn them
    loss, logits = loss_and_logits(model, data["training"])
    by_hand = -(torch.tensor(expected, dtype=torch.float32) * torch.log_softmax(logits, -1)).sum()
    assert loss == pytest.approx(float(by_hand), rel=1e-5)
    # the hard path is unchanged: the same rows without soft targets learn their labels' indices
    np.testing.assert_array_equal(data["training"]["targets"]["sentiment"], [1, 0, 0, 0, 1])
    hard_loss, _ = loss_and_logits(model, data["validation"])
    assert hard_loss == pytest.approx(float(F.cross_entropy(logits, torch.tensor([1, 0, 0, 0, 1]), reduction="sum")),
                                      rel=1e-5)
    # validation with soft targets: the loss is the soft one, the metrics compare with the hard labels
    model.soft_targets = {"validation": {"sentiment": teacher}}
    results, _ = model._evaluate_prepared(model._prepare({"validation": df}, True)["validation"])
    assert results["sentiment"]["loss"] == pytest.approx(float(by_hand) / 5, rel=1e-5)
    assert results["sentiment"]["accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1).numpy() ==
                                                                           [1, 0, 0, 0, 1])))


def test_a_binary_student_learns_the_probability_of_its_true_class():
    model, df = numbers_student("binary")
    assert model.metadata["sentiment"]["labels"] == ["fresh", "rotten"]  # "rotten" encodes as true
    teacher = pd.DataFrame({"fresh": [0.9, 0.3, 0.4, 0.2, 0.7], "rotten": [0.1, 0.7, 0.6, 0.8, 0.3]}, index=df.index)
    np.testing.assert_allclose(soft_target(teacher, model.config.output_features[0], model.metadata["sentiment"]),
                               teacher["rotten"], rtol=1e-6)
    model.soft_targets = {"training": {"sentiment": teacher}}
    loss, logits = loss_and_logits(model, model._prepare({"training": df}, True)["training"])
    by_hand = F.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor(teacher["rotten"].to_numpy(),
                                                                              dtype=torch.float32), reduction="sum")
    assert loss == pytest.approx(float(by_hand), rel=1e-5)


def test_tempered_teacher_probabilities():
    p = np.array([[0.6, 0.4], [0.2, 0.8]])
    np.testing.assert_array_equal(tempered(p, 1.0), p)
    sharp, flat = tempered(p, 0.5), tempered(p, 2.0)
    np.testing.assert_allclose(sharp[0], np.array([0.36, 0.16]) / 0.52)  # p ** 2, renormalized
    np.testing.assert_allclose(flat[1], np.sqrt([0.2, 0.8]) / np.sqrt([0.2, 0.8]).sum())
    assert (sharp.argmax(1) == p.argmax(1)).all() and (flat.argmax(1) == p.argmax(1)).all()


def test_distill_with_soft_targets_trains_on_the_teacher_probabilities(tiny_llama_dir, tiny_bert_dir, cache_dir,
                                                                         tmp_path):
    """The saved student's validation loss is the cross-entropy of its predictions against the teacher's tempered
    probabilities of those rows: what the loss learned is the teacher's distribution."""
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, targets="soft", temperature=0.5)
    logs = []
    report = distill(cfg, reviews(), output_directory=tmp_path, log=logs.append)
    assert report["targets"] == "soft" and report["temperature"] == 0.5
    assert any("soft targets, temperature 0.5" in line for line in logs)
    run = tmp_path / "distill_run"
    statistics = json.loads((run / "training_statistics.json").read_text())
    validation_loss = statistics["validation"][statistics["best_epoch"] - 1]["sentiment"]["loss"]
    rows = pd.read_csv(run / LABELS_FILE)
    rows = rows[rows.split == "validation"].drop(columns=["split", "sentiment_true"])
    teacher = load_teacher(load_config(cfg).distill.teacher, log=lambda _: None)
    probabilities = label_rows(teacher, rows, LabelCache(cache_dir, teacher.fingerprint), "validation",
                               log=lambda _: None).probabilities
    predicted = Model.load(run).predict(rows)
    student = np.stack([predicted[f"sentiment_probabilities_{c}"] for c in teacher.classes], axis=1)
    expected = -(tempered(probabilities, 0.5) * np.log(student)).sum(1).mean()
    assert validation_loss == pytest.approx(expected, rel=1e-4)
    hard = distill(student_config(tiny_bert_dir, tiny_llama_dir, targets="hard"), reviews(),
                   output_directory=tmp_path / "hard", log=lambda _: None)
    hard_statistics = json.loads((tmp_path / "hard" / "distill_run" / "training_statistics.json").read_text())
    assert hard["targets"] == "hard" and hard_statistics["validation"][0] != statistics["validation"][0]


def test_cli_distill_writes_the_report(tiny_llama_dir, tiny_bert_dir, cache_dir, tmp_path):
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher_config(tiny_llama_dir)))
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, rows=12)
    cfg["distill"]["teacher"]["config"] = str(tmp_path / "teacher.yaml")
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(cfg))
    reviews().to_csv(tmp_path / "reviews.csv", index=False)
    assert main(["distill", "-c", str(tmp_path / "student.yaml"), "--dataset", str(tmp_path / "reviews.csv"),
                 "-od", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "distill_run" / REPORT_FILE).read_text())
    assert report["labelled_rows"]["training"] == 12 and "accuracy" in report["student"]


# ------------------------------------------------------------------------------------------- errors
def problems_of(raw) -> dict:
    """key path -> its messages, joined"""
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    found: dict = {}
    for path, message in e.value.problems:
        found[path] = f"{found[path]}; {message}" if path in found else message
    return found


def test_bad_distill_sections_are_config_errors_naming_the_path(tiny_llama_dir, tiny_bert_dir, tmp_path):
    cfg = student_config(tiny_bert_dir, tiny_llama_dir)
    cfg["distill"]["teacher"]["verbalizr"] = {}
    cfg["distill"]["rows"] = 0
    found = problems_of(cfg)
    assert "did you mean 'verbalizer'" in found["distill.teacher.verbalizr"]
    assert "distill.rows" in found

    cfg = student_config(tiny_bert_dir, tiny_llama_dir, output_feature="sentimnt")
    assert "did you mean 'sentiment'" in problems_of(cfg)["distill.output_feature"]

    cfg = student_config(tiny_bert_dir, tiny_llama_dir)
    cfg["output_features"] = [{"name": "sentiment", "type": "number"}]
    assert "category or binary" in problems_of(cfg)["distill.output_feature"]

    cfg = student_config(tiny_bert_dir, tiny_llama_dir)
    cfg["distill"]["teacher"]["model"] = "somewhere"
    assert "either `config`" in problems_of(cfg)["distill.teacher"]

    bad_teacher = teacher_config(tiny_llama_dir, trainer={"type": "finetune"})
    bad_teacher["output_features"][0]["type"] = "categroy"
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, teacher={"config": bad_teacher})
    assert any(p.startswith("distill.teacher.config.output_features[0]") for p in problems_of(cfg))

    cfg = student_config(tiny_bert_dir, tiny_llama_dir, teacher={
        "config": teacher_config(tiny_llama_dir, trainer={"type": "finetune"})})
    cfg["distill"]["teacher"]["config"]["output_features"] = [{"name": "sentiment", "type": "text"}]
    assert "trainer.type: none" in problems_of(cfg)["distill.teacher.config.trainer.type"]

    no_classes = teacher_config(tiny_llama_dir, output_features=[{"name": "sentiment", "type": "category"}])
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, teacher={"config": no_classes, "method": "generate"})
    assert "classes are unknown" in problems_of(cfg)["distill.teacher.verbalizer"]
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, teacher={"config": no_classes, "method": "generate",
                                                                 "verbalizer": {"a": "x", "b": "y"}})
    assert "method: generate reads" in problems_of(cfg)["distill.teacher.config.output_features[0].match"]

    cfg = student_config(tiny_bert_dir, tiny_llama_dir, teacher={"config": teacher_config(tiny_llama_dir),
                                                                 "verbalizer": {"fressh": "positive"}})
    assert "'fressh' not among the teacher's classes" in problems_of(cfg)["distill.teacher.verbalizer"]

    cfg = student_config(tiny_bert_dir, tiny_llama_dir, teacher={"config": str(tmp_path / "missing.yaml")})
    assert "does not exist" in problems_of(cfg)["distill.teacher.config"]

    generate = {"config": teacher_config(tiny_llama_dir), "method": "generate"}
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, teacher=generate, targets="soft")
    assert "method: generate does not give" in problems_of(cfg)["distill.targets"]
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, targets="hard", temperature=2.0)
    assert "set targets: soft" in problems_of(cfg)["distill.temperature"]
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, targets="sof", temperature=0)
    found = problems_of(cfg)
    assert "did you mean 'soft'" in found["distill.targets"] and "must be > 0" in found["distill.temperature"]

    section = student_config(tiny_bert_dir, tiny_llama_dir)["distill"]
    llm_student = {**teacher_config(tiny_llama_dir), "distill": section}
    assert "model_type: ecd" in problems_of(llm_student)["distill"]


def test_train_refuses_a_student_config_and_unknown_true_labels_are_data_errors(tiny_llama_dir, tiny_bert_dir,
                                                                                cache_dir, tmp_path, capsys):
    cfg = student_config(tiny_bert_dir, tiny_llama_dir)
    with pytest.raises(ConfigError, match="cadenza distill"):
        Model(cfg).train(reviews(), output_directory=tmp_path)
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(cfg))
    reviews().to_csv(tmp_path / "reviews.csv", index=False)
    assert main(["train", "-c", str(tmp_path / "student.yaml"), "--dataset", str(tmp_path / "reviews.csv"),
                 "-od", str(tmp_path / "out")]) == 2
    assert "distill" in capsys.readouterr().err
    df = reviews()
    df.loc[df.index % 2 == 0, "sentiment"] = "plot"
    with pytest.raises(DataError, match=r"'plot'.*not among the teacher's classes"):
        distill(cfg, df, output_directory=tmp_path, log=lambda _: None)


def test_a_trained_llm_folder_teaches_few_shot(tiny_llama_dir, tiny_bert_dir, cache_dir, tmp_path):
    """teacher.model: an llm trained with cadenza train (here trainer.type none + prompt.retrieval: few-shot examples
    saved in its folder) labels with its saved classes and its few-shot prompts."""
    few_shot = teacher_config(tiny_llama_dir, prompt={
        "template": "{__context__}Review of the film: {review}", "use_chat_template": False,
        "retrieval": {"type": "random", "k": 1}})
    out = Model(few_shot, log=lambda _: None).train(reviews(), output_directory=tmp_path / "llm")
    cfg = student_config(tiny_bert_dir, tiny_llama_dir, teacher={"model": str(out.run_dir),
                                                                 "verbalizer": {"fresh": "positive"}})
    teacher = load_teacher(load_config(cfg).distill.teacher, log=lambda _: None)
    assert teacher.classes == ["fresh", "rotten"] and teacher.answers == ["positive", "rotten"]
    assert "Examples:" in teacher.llm._prompts(reviews(1).to_dict("records"))[0]
    labels = label_rows(teacher, reviews(6), LabelCache(cache_dir, teacher.fingerprint), "test", log=lambda _: None)
    assert labels.computed == 6 and set(labels.labels) <= {"fresh", "rotten"}
    student = load_config(cfg)
    with pytest.raises(ModelFolderError, match="distill.teacher.model: .* is not a Cadenza model folder"):
        load_teacher(student.distill.teacher.model_copy(update={"model": str(tiny_bert_dir)}), log=lambda _: None)
