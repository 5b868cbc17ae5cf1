"""Preference trainers (dpo sigmoid/ipo, orpo, kto): golden tests against TRL on a fixed batch, training runs on
the tiny random Llama, and the data errors named before any model loads."""

import math
import tempfile
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from cadenza.config.load import load_config
from cadenza.errors import DataError
from cadenza.llm import LlmModel
from cadenza.llm import preference as pref
from cadenza.llm import train
from cadenza.llm.load import load_causal_lm, load_tokenizer
from cadenza.llm.loss import TargetLoss
from cadenza.llm.tokenize import TokenizedRows

TOL = dict(rel=1e-5, abs=1e-5)
PROMPTS = ["Q: what is red?\nA:", "Q: name a fruit\nA:", "Q: hi\nA:", "Q: what is two plus two?\nA:"]
CHOSEN = [" the colour of blood", " apple", " hello there, how are you", " four"]
REJECTED = [" no", " a car is not a fruit at all", " bye", " five or maybe six"]


# ------------------------------------------------------------------------------------------------ golden vs TRL
@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    """The policy: the tiny Llama with its weights moved a little; the reference: the tiny Llama itself."""
    tok = load_tokenizer(str(tiny_llama_dir))
    ref = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32).eval()
    policy = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, policy, ref


def trl_args(config_cls, **kw):
    return config_cls(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False,
                      per_device_train_batch_size=len(PROMPTS), **kw)


def rows_from_padded(input_ids, attention_mask, completion_mask) -> tuple[list, list]:
    """TRL's right-padded rows back to token ids + prompt length (where its completion mask starts)."""
    ids, plens = [], []
    for x, a, c in zip(input_ids, attention_mask, completion_mask):
        n = int(a.sum())
        ids.append(x[:n].numpy().astype(np.int64))
        plens.append(int(c[:n].nonzero()[0]))
    return ids, plens


def paired_data(chosen: tuple, rejected: tuple) -> pref.PreferenceData:
    ids = [x for pair in zip(chosen[0], rejected[0]) for x in pair]
    plens = [x for pair in zip(chosen[1], rejected[1]) for x in pair]
    return pref.PreferenceData(TokenizedRows(ids, np.asarray(plens)), np.tile([True, False], len(chosen[0])), True)


def cadenza_metrics(trainer_cfg, policy, ref, data, *, kto=False, packed=True) -> dict:
    """Our loss (loss_sum / weight, as the loop divides) and metrics on the whole fixed batch in one micro-batch."""
    reference = None if ref is None else (lambda b: pref.sequence_logps(TargetLoss(ref), b))
    loss = train.LOSSES[trainer_cfg.type]  # the recipe's table: the loss the training loop calls
    rows = list(range(len(data.rows))) if not data.paired or kto else pref.item_rows(data, range(data.items))
    batch = pref.make_batch(data, rows, kto=kto, packed=packed, pad_id=2, share_prefix=True,
                            paired=data.paired and not kto)
    with torch.no_grad():
        loss_sum, stats = loss(TargetLoss(policy), batch, trainer_cfg, reference)
    return {"loss": float(loss_sum) / batch["weight"], **pref.summarize([stats])}


def trainer_config(**kw):
    return load_config({"model_type": "llm", "base_model": "smollm2", "input_features": [{"name": "q", "type": "text"}],
                        "output_features": [{"name": "a", "type": "text"}], "trainer": kw}).trainer


def last(metrics, key):
    v = metrics[key]
    return float(v[-1] if isinstance(v, list) else v)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_matches_trl(models, loss_type):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, policy, ref = models
    ds = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=policy, ref_model=ref, args=trl_args(DPOConfig, beta=0.2, loss_type=[loss_type]),
                             train_dataset=ds, processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(policy, batch))
    policy.eval()
    n = len(PROMPTS)
    padded = rows_from_padded(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    data = paired_data((padded[0][:n], padded[1][:n]), (padded[0][n:], padded[1][n:]))
    ours = cadenza_metrics(trainer_config(type="dpo", dpo_beta=0.2, dpo_loss_type=loss_type), policy, ref, data)
    theirs = trainer._metrics["eval"]  # (TRL files them by the model's mode: eval here)
    assert ours["loss"] == pytest.approx(trl_loss, **TOL)
    for key in pref.METRICS:
        assert ours[key] == pytest.approx(last(theirs, key), **TOL), key
    assert 0 < ours["rewards/accuracies"] < 1  # the fixed batch has pairs on both sides
    # the same numbers padded instead of packed
    padded_ours = cadenza_metrics(trainer_config(type="dpo", dpo_beta=0.2, dpo_loss_type=loss_type), policy, ref,
                                  data, packed=False)
    assert padded_ours["loss"] == pytest.approx(ours["loss"], **TOL)


def test_dpo_label_smoothing_is_conservative_dpo():
    """TRL 1.x's sigmoid loss ignores label_smoothing; ours is conservative DPO (eps-weighted flipped label)."""
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta, eps = 0.5, 0.2
    got = pref.dpo_sigmoid_loss(chosen, rejected, ref_c, ref_r, beta, eps)
    for i in range(2):
        delta = (chosen[i] - ref_c[i]) - (rejected[i] - ref_r[i])
        sig = 1 / (1 + math.exp(-beta * delta))
        assert float(got[i]) == pytest.approx(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig), rel=1e-6)
    assert torch.allclose(pref.dpo_sigmoid_loss(chosen, rejected, ref_c, ref_r, beta, 0.0),
                          -torch.nn.functional.logsigmoid(beta * ((chosen - ref_c) - (rejected - ref_r))))


def test_orpo_matches_trl(models):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok, policy, _ = models
    ds = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=policy, args=trl_args(ORPOConfig, beta=0.3), train_dataset=ds,
                              processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            trl_loss, theirs = trainer.get_batch_loss_metrics(policy, batch)
    policy.eval()
    sides = []
    for side in ("chosen", "rejected"):
        ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        sides.append(rows_from_padded(ids, batch[f"{side}_attention_mask"], labels != -100))
    data = paired_data(*sides)
    ours = cadenza_metrics(trainer_config(type="orpo", orpo_beta=0.3), policy, None, data)
    # the documented difference: TRL's NLL term is the token mean over prompt AND completion of the whole batch,
    # ours the per-pair mean over the completion; the odds-ratio part is the same
    assert ours["loss"] - ours["nll_loss"] == pytest.approx(float(trl_loss) - theirs["nll_loss"], **TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert ours[key] == pytest.approx(theirs[key], **TOL), key
    # TRL logs mean token log-probs for orpo; ours are the sums (as for dpo and kto)
    assert ours["rewards/chosen"] == pytest.approx(0.3 * theirs["logps/chosen"], **TOL)


def test_kto_matches_trl(models):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    tok, ref, policy = models  # roles swapped: the unperturbed model is the likelier one, so KTO's KL is > 0
    labels = [True, False, True, False]
    completions = [c if good else r for c, r, good in zip(CHOSEN, REJECTED, labels)]
    ds = Dataset.from_dict({"prompt": PROMPTS, "completion": completions, "label": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(model=policy, ref_model=ref, train_dataset=ds, processing_class=tok,
                             args=trl_args(KTOConfig, beta=0.2, desirable_weight=1.5, undesirable_weight=1.0,
                                           train_sampling_strategy="sequential"))
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(policy, batch))
    policy.eval()
    ids, plens = rows_from_padded(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    data = pref.PreferenceData(TokenizedRows(ids, np.asarray(plens)), np.asarray(labels), False)
    cfg = trainer_config(type="kto", kto_beta=0.2, kto_desirable_weight=1.5, kto_undesirable_weight=1.0,
                         kto_label_column="label")
    ours = cadenza_metrics(cfg, policy, ref, data, kto=True)
    theirs = trainer._metrics["eval"]  # (TRL files them by the model's mode: eval here)
    assert last(theirs, "kl") > 0  # the KL reference point is in play
    assert ours["kl"] == pytest.approx(last(theirs, "kl"), **TOL)
    assert ours["loss"] == pytest.approx(trl_loss, **TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(last(theirs, key), **TOL), key


# ---------------------------------------------------------------------------------------------------- training
def make_config(base, trainer, adapter=True, **extra):
    cfg = {"model_type": "llm", "base_model": str(base), "input_features": [{"name": "question", "type": "text"}],
           "output_features": [{"name": "answer", "type": "text"}], "trainer": trainer, **extra}
    if adapter:
        cfg["adapter"] = {"type": "lora", "r": 4}
    return load_config(cfg)


def rule_pairs(n, offset=0):
    """The chosen answer always names a colour, the rejected one a number: a rule even a tiny model learns."""
    colours, numbers = ["red", "green", "blue", "yellow"], ["seven", "twelve", "three", "forty"]
    return pd.DataFrame({"question": [f"tell me about thing {i + offset}" for i in range(n)],
                         "answer": [f"it is {colours[i % 4]}" for i in range(n)],
                         "rejected": [f"it is {numbers[(i + 1) % 4]}" for i in range(n)]})


def fit(config, train, val=None, logs=None):
    model = LlmModel(config)
    splits = {"training": train} if val is None else {"training": train, "validation": val}
    return model, model.fit(splits, run_dir=None, resume=False, seed=3,
                            log=(logs.append if logs is not None else lambda *_: None))


@pytest.mark.parametrize("trainer", [
    {"type": "dpo"}, {"type": "dpo", "dpo_loss_type": "ipo"}, {"type": "kto"},
    # orpo's odds-ratio gradient is small next to its NLL on a random model: a stronger beta and more steps
    {"type": "orpo", "orpo_beta": 1.0, "epochs": 6, "learning_rate": 0.02}])
def test_preference_trainers_learn_the_rule(tiny_llama_dir, trainer):
    """A few epochs with LoRA on the tiny Llama: held-out rewards/accuracies reach 1 and the margin grows."""
    trainer = {"epochs": 4, "batch_size": 4, "learning_rate": 0.01, "use_mixed_precision": False, **trainer}
    _, result = fit(make_config(tiny_llama_dir, trainer), rule_pairs(16), rule_pairs(8, offset=100))
    history = [v["answer"] for v in result.statistics["validation"]]
    assert set(pref.METRICS) <= set(history[0])
    assert history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    assert history[-1]["loss"] < history[0]["loss"]


def test_adapter_reference_is_the_base_model(tiny_llama_dir):
    """With LoRA's B = 0 at the start the policy IS the reference: rewards 0 and the DPO loss log 2, before any step."""
    model = LlmModel(make_config(tiny_llama_dir, {"type": "dpo", "use_mixed_precision": False}))
    model._ensure_base(lambda *_: None)
    data = pref.prepare(model, rule_pairs(4), "training", print)
    reference = pref.reference_logps(model, lambda *_: None)
    model._prepare_for_training(lambda *_: None)
    with torch.no_grad():
        for p in model.model.parameters():  # an adapter that is not zero: the reference must not see it
            if p.requires_grad:
                p.add_(0.1)
    batch = pref.make_batch(data, list(range(8)), kto=False, packed=True, pad_id=2, share_prefix=True, paired=True)
    with torch.no_grad():
        with model.model.disable_adapter():
            base = pref.sequence_logps(TargetLoss(model.model).eval(), batch)
        adapted = pref.sequence_logps(TargetLoss(model.model).eval(), batch)
        model.model.train()
        assert torch.allclose(reference(batch), base)
        assert model.model.training  # the reference pass leaves the policy's mode (its dropout) as it was
        assert not torch.allclose(adapted, base)


def test_full_fine_tuning_dpo_uses_a_frozen_copy(tiny_llama_dir):
    logs = []
    _, result = fit(make_config(tiny_llama_dir, {"type": "dpo", "epochs": 2, "batch_size": 4, "learning_rate": 1e-3,
                                                 "use_mixed_precision": False}, adapter=False),
                    rule_pairs(8), rule_pairs(4, offset=50), logs)
    assert any("frozen copy" in line for line in logs)
    first, final = (v["answer"] for v in (result.statistics["validation"][0], result.statistics["validation"][-1]))
    assert final["rewards/margins"] > first["rewards/margins"] > 0


def test_kto_on_a_boolean_label_column(tiny_llama_dir):
    df = rule_pairs(8)
    unpaired = pd.DataFrame({"question": list(df.question) * 2, "answer": list(df.answer) + list(df.rejected),
                             "good": [True] * 8 + ["false"] * 8})
    _, result = fit(make_config(tiny_llama_dir, {"type": "kto", "kto_label_column": "good", "epochs": 1,
                                                 "batch_size": 4, "use_mixed_precision": False}), unpaired, unpaired)
    metrics = result.statistics["validation"][-1]["answer"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl"} <= set(metrics)
    assert "rewards/accuracies" not in metrics  # unpaired rows have no pairs to compare


def test_packed_padded_and_shared_prefix_log_probs_agree(models):
    tok, policy, _ = models
    prompts = tok(PROMPTS)["input_ids"]
    completions = tok(CHOSEN, add_special_tokens=False)["input_ids"]
    ids = [np.asarray(p + c + [tok.eos_token_id]) for p, c in zip(prompts, completions)]
    ids += [np.asarray(prompts[0] + c + [tok.eos_token_id]) for c in completions]  # a shared prompt
    data = pref.PreferenceData(TokenizedRows(ids, np.asarray([len(p) for p in prompts] + [len(prompts[0])] * 4)),
                               np.ones(8, dtype=bool), False)
    module = TargetLoss(policy)
    with torch.no_grad():
        by_row = torch.cat([pref.sequence_logps(module, pref.make_batch(data, [i], kto=False, packed=True, pad_id=2,
                                                                        share_prefix=False, paired=False))
                            for i in range(8)])
        for packed, share, rows in ((True, False, range(8)), (False, False, range(8)), (True, True, range(4, 8))):
            batch = pref.make_batch(data, list(rows), kto=False, packed=packed, pad_id=2, share_prefix=share,
                                    paired=False)
            assert torch.allclose(pref.sequence_logps(module, batch), by_row[list(rows)], atol=1e-4)
    assert batch["computed_tokens"] < batch["num_tokens"]  # the shared prompt ran once


# -------------------------------------------------------------------------------------------------- data errors
BOGUS_BASE = "/nonexistent/model"  # the data errors come before any model loads


@pytest.mark.parametrize("trainer, df, message", [
    ({"type": "dpo"}, rule_pairs(4).drop(columns="rejected"), "'rejected' (asked for by trainer.rejected_column"),
    ({"type": "orpo", "rejected_column": "worse"}, rule_pairs(4), "'worse' (asked for by trainer.rejected_column"),
    ({"type": "dpo"}, rule_pairs(4).assign(rejected=["a", " ", None, "b"]), "2 of 4 rows have an empty completion "
     "in column 'rejected' (rows [1, 2])"),
    ({"type": "kto"}, rule_pairs(4).assign(answer=["", "a", "b", "c"]), "1 of 4 rows have an empty completion in "
     "column 'answer'"),
    ({"type": "kto", "kto_label_column": "good"}, rule_pairs(4).assign(good=[True, "maybe", 0, 1]),
     "must be boolean"),
    ({"type": "kto", "kto_label_column": "good"}, rule_pairs(4), "'good' (asked for by trainer.kto_label_column)"),
])
def test_data_errors_are_named_before_loading(trainer, df, message):
    model = LlmModel(make_config(BOGUS_BASE, trainer))
    with pytest.raises(DataError, match=None) as err:
        model.fit({"training": df}, run_dir=None, resume=False, seed=0, log=lambda *_: None)
    assert message in str(err.value)
    assert model.model is None


def test_long_prompts_are_counted(tiny_llama_dir):
    logs = []
    df = rule_pairs(4).assign(question=["word " * 40, "short", "word " * 50, "short too"])
    model = LlmModel(make_config(tiny_llama_dir, {"type": "dpo"}, preprocessing={"global_max_sequence_length": 64}))
    model._ensure_base(lambda *_: None)
    data = pref.prepare(model, df, "training", logs.append)
    assert data.long_prompts == 2
    assert max(data.rows.lengths) <= 64
    assert any("2 of 4 prompts are longer than the limit" in line for line in logs)


def test_config_keys_and_ranges():
    t = trainer_config(type="dpo")
    assert (t.dpo_beta, t.dpo_loss_type, t.dpo_label_smoothing, t.rejected_column) == (0.1, "sigmoid", 0.0, "rejected")
    with pytest.raises(Exception, match="dpo_label_smoothing"):
        trainer_config(type="dpo", dpo_label_smoothing=0.6)
    with pytest.raises(Exception, match="dpo_loss_type"):
        trainer_config(type="dpo", dpo_loss_type="hinge")


@pytest.mark.parametrize("name", ["dpo", "orpo", "kto"])
def test_the_example_configs_load(name):
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml"
    config = load_config(yaml.safe_load(path.read_text()))
    assert (config.trainer.type, config.trainer.rejected_column, config.adapter.type) == (name, "rejected", "lora")


def test_disjoint_pairs_keep_held_out_completions_out_of_training():
    """examples/make_preference_pairs.py --disjoint: the default set shares completions between the splits (a held-out
    rejected answer can be a training chosen one); --disjoint draws each split's rejected answers from its own."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "make_preference_pairs.py"
    spec = importlib.util.spec_from_file_location("make_preference_pairs", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shared = script.pairs()
    assert shared.iloc[256:320].rejected.isin(set(shared.iloc[:256].answer)).sum() == 23  # the docs' count
    train_pairs, held_out = script.disjoint_pairs(256)
    assert (len(train_pairs), len(held_out)) == (256, 64)
    for part in (train_pairs, held_out):
        assert (part.rejected != part.answer).all()
        assert sorted(part.rejected) == sorted(part.answer)  # each split rejects only its own answers
    seen = set(train_pairs.answer) | set(train_pairs.rejected)
    # answer texts that two questions share are the only overlap
    repeated = set(shared.answer[shared.answer.duplicated()])
    assert set(held_out.answer) & seen <= repeated


# --------------------------------------------------------------- chat-form data, reward metrics, evaluate, reference
def chat_rule_pairs(n, offset=0):
    """rule_pairs with each prompt a conversation and the rejected answer as one assistant turn (TRL's format)."""
    df = rule_pairs(n, offset)
    df["question"] = [[{"role": "user", "content": "Which one?"}, {"role": "assistant", "content": "Which what?"},
                       {"role": "user", "content": q}] for q in df.question]
    df["rejected"] = [[{"role": "assistant", "content": r}] for r in df.rejected]
    return df


def test_chat_form_dpo_watches_rewards_accuracies_and_evaluate_reports_them(tiny_llama_dir, tmp_path):
    """Chat-form preference data trains; validation_metric rewards_accuracies picks the best weights; evaluate on
    the held-out pairs reports the rewards of that validation round, also after save and load."""
    config = load_config({
        "model_type": "llm", "base_model": str(tiny_llama_dir), "adapter": {"type": "lora", "r": 4},
        "input_features": [{"name": "question", "type": "text", "preprocessing": {"format": "messages"}}],
        "output_features": [{"name": "answer", "type": "text"}], "generation": {"max_new_tokens": 4},
        "trainer": {"type": "dpo", "epochs": 3, "batch_size": 4, "learning_rate": 0.01, "use_mixed_precision": False,
                    "validation_metric": "rewards_accuracies"}})
    assert (config.trainer.validation_field, config.trainer.validation_metric) == ("answer", "rewards/accuracies")
    train, val = chat_rule_pairs(16), chat_rule_pairs(8, offset=100)
    model, result = fit(config, train, val)
    history = [v["answer"] for v in result.statistics["validation"]]
    assert result.best_value == max(h["rewards/accuracies"] for h in history)
    best = history[result.best_epoch - 1]
    assert best["rewards/accuracies"] == 1.0 and best["rewards/margins"] > 0
    metrics, predictions = model.evaluate(val)
    for key in pref.METRICS:
        assert metrics["answer"][key] == pytest.approx(best[key], abs=1e-4), key
    assert metrics["answer"]["preference_loss"] == pytest.approx(best["loss"], abs=1e-4)
    assert {"loss", "perplexity", "rouge_l"} <= set(metrics["answer"]) and len(predictions) == len(val)
    model.save(tmp_path)
    loaded = LlmModel.load(tmp_path, config)
    again, _ = loaded.evaluate(val)
    assert again["answer"]["rewards/accuracies"] == best["rewards/accuracies"]
    assert again["answer"]["rewards/margins"] == pytest.approx(best["rewards/margins"], abs=1e-4)


def test_precomputed_reference_log_probs_replace_the_frozen_copy(tiny_llama_dir):
    """Full fine-tuning with precompute_ref_log_probs: no frozen copy; the cached values are the base model's own
    log-probs; training moves the margins as with the copy; evaluate loads the base again as its reference."""
    trainer = {"type": "dpo", "epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "use_mixed_precision": False,
               "precompute_ref_log_probs": True}
    logs = []
    train, val = rule_pairs(8), rule_pairs(4, offset=50)
    model, result = fit(make_config(tiny_llama_dir, trainer, adapter=False), train, val, logs)
    assert not any("frozen copy" in line for line in logs)
    assert any("computed once" in line for line in logs)
    history = [v["answer"] for v in result.statistics["validation"]]
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] > 0
    best = history[result.best_epoch - 1]  # the weights the loop keeps
    # the cache holds the base model's log-probs of each row
    base = LlmModel(make_config(tiny_llama_dir, trainer, adapter=False))
    base._ensure_base(lambda *_: None)
    data = pref.prepare(base, val, "validation", lambda *_: None)
    batch = pref.make_batch(data, list(range(8)), kto=False, packed=True, pad_id=2, share_prefix=True, paired=True)
    with torch.no_grad():
        expected = pref.sequence_logps(TargetLoss(base.model).eval(), batch)
    metrics, _ = model.evaluate(val)  # its reference: the base model loaded again
    assert metrics["answer"]["rewards/margins"] == pytest.approx(best["rewards/margins"], abs=1e-4)
    cached = pref.PreferenceData(data.rows, data.desirable, True)
    pref.precomputed_reference(base, [cached], device_precision(), lambda *_: None)
    assert np.allclose(cached.reference, expected.numpy(), atol=1e-4)


def device_precision():
    from cadenza.device import Precision

    return Precision(False, "fp32")
