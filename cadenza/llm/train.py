"""The generative training recipe (`model_type: llm`), read top to bottom in `fit`:

    data  the rows checked before the base model loads (a bad data set fails in seconds, not minutes)
    load  the base model and tokenizer; the rows tokenized (prompt + target, or prompt + chosen / rejected)
    model the reference model (preference trainers) while the model is still the base, then the adapter
    loss  LOSSES[trainer.type]: sft, dpo, orpo or kto, each a small function below with its formula
    loop  cadenza/train/loop.py, the loop shared with ecd: it divides each summed loss by the batch weight
    save  LlmModel.save writes the model folder (api.Model.train calls it); here the adapter is merged first when
          adapter.postprocessor.merge_adapter_into_base_model asks

`LlmModel.fit` is this function. A loss takes (module, batch, trainer config, reference) and returns the loss
summed over the batch's weight units (target tokens for sft, pairs for dpo/orpo, examples for kto) and the sums
that evaluations average into metrics (cadenza.llm.preference.summarize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch

from .. import device
from ..adapters import lora_plus_lr_ratio
from ..data.read import require_columns
from ..data.stream import FileRows
from ..errors import DataError
from ..phases import phase
from ..train import loop
from . import batching, preference
from .loss import TargetLoss, can_share_prefix, causal_lm_of
from .tokenize import TokenizedRows


# ================================================================================================== losses
def sft_loss(module: TargetLoss, batch: dict, trainer_cfg, reference=None) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning: loss = - sum over target tokens t of log p(y_t | x, y_<t)
    (summed; the loop divides by the effective batch's target tokens: the token mean)."""
    return module(batch), {}


def dpo_loss(module: TargetLoss, batch: dict, t, reference) -> tuple[torch.Tensor, dict]:
    """DPO (`dpo_loss_type: sigmoid`), per pair, with r = log pi(y|x) - log pi_ref(y|x):
        loss = -(1 - eps) log sigma(beta (r_w - r_l)) - eps log sigma(-beta (r_w - r_l))
    IPO (`ipo`): loss = ((r_w / |y_w| - r_l / |y_l|) - 1 / (2 beta))^2.   Rewards: beta r."""
    logps, ref = preference.policy_and_reference(module, batch, reference)
    tokens = batch["target_tokens"].to(logps.device)
    c, r = slice(0, None, 2), slice(1, None, 2)
    if t.dpo_loss_type == "ipo":
        losses = preference.ipo_loss(logps[c], logps[r], ref[c], ref[r], tokens[c], tokens[r], t.dpo_beta)
    else:
        losses = preference.dpo_sigmoid_loss(logps[c], logps[r], ref[c], ref[r], t.dpo_beta, t.dpo_label_smoothing)
    rewards = t.dpo_beta * (logps - ref).detach()
    return losses.sum(), preference.batch_stats(losses, rewards, logps, batch["desirable"].to(logps.device), True)


def orpo_loss(module: TargetLoss, batch: dict, t, reference=None) -> tuple[torch.Tensor, dict]:
    """ORPO (no reference model), per pair, with m = log P(y|x) / |y| and log odds(y|x) = m - log(1 - exp(m)):
        loss = -m_w - beta log sigma(log odds(y_w|x) - log odds(y_l|x)).   Rewards: beta m."""
    logps, _ = preference.policy_and_reference(module, batch, None)
    means = logps / batch["target_tokens"].to(logps.device)
    c, r = slice(0, None, 2), slice(1, None, 2)
    losses = preference.orpo_loss(means[c], means[r], -means[c], t.orpo_beta)
    rewards = t.orpo_beta * means.detach()
    stats = preference.batch_stats(losses, rewards, logps, batch["desirable"].to(logps.device), True)
    stats["nll_loss"] = float(-means[c].detach().sum())
    return losses.sum(), stats


def kto_loss(module: TargetLoss, batch: dict, t, reference) -> tuple[torch.Tensor, dict]:
    """KTO, per example, with r = log pi(y|x) - log pi_ref(y|x) and z0 = max(0, mean r of the batch's mismatched
    rows (prompt i, completion i-1)), without gradient:
        desirable: w_d (1 - sigma(beta (r - z0)))     undesirable: w_u (1 - sigma(beta (z0 - r))).   Rewards: beta r."""
    logps, ref = preference.policy_and_reference(module, batch, reference)
    n = batch["examples"]  # the batch's examples come first, their mismatched rows after them
    kl = preference.kto_kl(logps[n:].detach(), ref[n:])
    logps, ref = logps[:n], ref[:n]
    desirable = batch["desirable"].to(logps.device)
    losses = preference.kto_loss(logps - ref, desirable, kl, t.kto_beta, t.kto_desirable_weight,
                                 t.kto_undesirable_weight)
    rewards = t.kto_beta * (logps - ref).detach()
    return losses.sum(), preference.batch_stats(losses, rewards, logps, desirable, batch["paired"], kl=kl)


# the one table from trainer.type to its loss ("trainer" is Ludwig's name of finetune)
LOSSES: dict[str, Callable] = {"finetune": sft_loss, "trainer": sft_loss, "dpo": dpo_loss, "orpo": orpo_loss,
                               "kto": kto_loss}


# ================================================================================================== recipe
def fit(llm, splits: dict[str, pd.DataFrame], *, run_dir, resume: bool, seed: int, fingerprints: Optional[dict] = None,
        tracker=None, log=print) -> loop.TrainResult:
    t = llm.config.trainer
    loop.seed_everything(seed)
    prefers = preference.is_preference(t.type)

    # ---- data: checked before the base model loads
    records = None if prefers else sft_records(llm, splits["training"], log)
    if prefers:
        check_preference_data(llm, splits)

    # ---- load: base model, tokenizer, prompts; the rows tokenized
    with phase("model load"):
        llm._ensure_base(log)
        if not prefers:
            llm._build_labels(splits)
            llm._build_retriever(records, seed)
    if t.type == "none":
        log("trainer.type: none: no training (zero/few-shot); the base model is used as is")
        return loop.TrainResult()
    with phase("tokenize"):
        data = PreferenceRows.of(llm, splits, seed, log) if prefers else SftRows.of(llm, records, splits, seed, log)
    llm._train_rows = data.rows  # (EVA/CorDA calibrate on the training rows)
    llm.truncated_rows = data.rows.truncated

    # ---- model: the reference while the model is still the base, then the adapter (or every weight) trainable
    size = llm._batch_size()
    # AdaLoRA's schedule needs the run's length before the adapter exists: the loop's own step arithmetic
    llm._total_steps = loop.plan_steps(t, len(data.groups(0, size)), data.rows_per_micro_batch(size),
                                       loop.process_state().num_processes).total_steps
    precision = device.precision(t.use_mixed_precision, "train")
    with phase("model load"):  # the reference, then the adapter (EVA/CorDA: its calibration passes too)
        reference = reference_model(llm, data, precision, log) if prefers else None
        llm._prepare_for_training(log)
    params = llm.config.model_parameters
    neftune = params.neftune_noise_alpha if params and not prefers else 0.0
    module = TargetLoss(llm.model, neftune_noise_alpha=neftune)
    if not prefers and device.is_cuda() and t.batch_size == "auto":
        size = llm._auto_batch_size()
        log(f"batch_size auto: {size} rows per micro-batch")

    # ---- loss: one function per trainer type, the batches it reads, the evaluations it feeds
    loss = LOSSES[t.type]
    share = can_share_prefix(llm.model)
    groups0 = data.groups(0, size)

    def batches(epoch: int):
        return (data.batch(g, share) for g in (groups0 if epoch == 0 else data.groups(epoch, size)))

    def evaluate(split):
        return lambda m: data.evaluate(m, split, lambda mm, b: loss(mm, b, t, reference), share)

    # ---- loop
    task = loop.TrainTask(
        batches=batches, num_batches=len(groups0), weight=data.weight,
        loss_sum=lambda m, b: loss(m, b, t, reference)[0],
        evaluate=evaluate(data.val) if data.val is not None else None, evaluate_training=evaluate(data.train),
        unit=data.unit, flops_per_unit=data.flops_per_unit(groups0, share), tokens=lambda b: b["num_tokens"],
        micro_batch_rows=data.rows_per_micro_batch(size), lr_ratio=lora_plus_lr_ratio(llm.config.adapter))
    log(precision.describe("train"))
    log(data.describe(size))
    with phase("epochs"):  # its validation rounds count as evaluation
        result = loop.fit(module, task, t, run_dir=run_dir, resume=resume, seed=seed, precision=precision,
                          fingerprints=fingerprints, tracker=tracker, log=log, backend=llm.config.backend)
    result.precision = {"part": "train", "precision": precision.name, "reason": precision.reason}

    # ---- save: the caller (api.Model.train) writes the model folder; the adapter is merged first when asked
    llm.model.eval()
    if llm._should_merge():
        with phase("merge"):
            llm._merge(log)
    return result


def reference_model(llm, data: "PreferenceRows", precision, log):
    """batch -> log pi_ref per row: computed once and cached (trainer.precompute_ref_log_probs), or the adapter
    switched off / a frozen copy at each step; None without a reference (orpo, dpo_reference_free)."""
    t = llm.config.trainer
    if t.precompute_ref_log_probs and preference.needs_reference(t):
        return preference.precomputed_reference(llm, [d for d in (data.train, data.val) if d is not None],
                                                precision, log)
    return preference.reference_logps(llm, log)


# ============================================================================================ supervised data
def sft_records(llm, train_df: pd.DataFrame, log) -> Optional[list[dict]]:
    """The training rows to learn from (zero-shot needs no answers, unless few-shot examples come from them).
    None for a split streamed from a large Parquet file (its columns checked here): SftRows.of reads it in chunks."""
    if isinstance(train_df, FileRows):
        require_columns(train_df, {**{c: f"input_features ({c})" for c in llm.inputs},
                                   llm.output_column: f"output_features ({llm.output_column})"}, "llm data")
        return None
    if llm.config.trainer.type == "none" and not llm.config.prompt.retrieval.type:
        return llm._records(train_df, need_output=False)
    records = llm._answered_records(train_df, "training", log)
    if not records:
        raise DataError(f"training: no row has an answer in output column {llm.output_column!r} (every value is "
                        "missing or empty); check that it is the column of answers")
    return records


@dataclass
class SftRows:
    """Prompt + target rows; a batch's weight is its target tokens."""

    llm: Any
    train: TokenizedRows
    val: Optional[TokenizedRows]
    seed: int
    unit: str = "target_tokens"
    computed: Optional[int] = None  # tokens computed per epoch (shared prompt prefixes once), set by flops_per_unit

    @classmethod
    def of(cls, llm, records: Optional[list[dict]], splits: dict, seed: int, log) -> "SftRows":
        """records None: the splits are streamed (FileRows) and tokenized chunk by chunk into token stores."""
        t = llm.config.trainer
        if records is None:
            rows = llm._streamed_tokens(splits["training"], "training", log)
            if not len(rows):
                raise DataError(f"training: no row has an answer in output column {llm.output_column!r} (every "
                                "value is missing or empty); check that it is the column of answers")
        else:
            rows = llm._tokenize(records, with_targets=True, self_index=True)
        if rows.truncated:
            log(f"preprocessing.global_max_sequence_length={llm.config.preprocessing.global_max_sequence_length}: "
                f"{rows.truncated} of {len(rows)} training rows truncated")
        val_df, val_rows = splits.get("validation"), None
        if val_df is not None and len(val_df) and not t.skip_all_evaluation:
            if isinstance(val_df, FileRows):
                val_rows = llm._streamed_tokens(val_df, "validation", log)
                val_rows = val_rows if len(val_rows) else None
            else:
                val_records = llm._answered_records(val_df, "validation", log)
                val_rows = llm._tokenize(val_records, with_targets=True) if val_records else None
            if val_rows is None:
                log("warning: validation: no row has an answer; training runs without validation")
        return cls(llm, rows, val_rows, seed)

    @property
    def rows(self) -> TokenizedRows:
        return self.train

    def rows_per_micro_batch(self, size: int) -> int:
        t = self.llm.config.trainer
        return size * (t.packing_max_sequences_per_pack or 1) if t.packing else size

    def groups(self, epoch: int, size: int) -> batching.Groups:
        t = self.llm.config.trainer
        return batching.epoch_groups(self.train, epoch, self.seed, packed=t.packing,
                                     rows_per_batch=self.rows_per_micro_batch(size),
                                     max_tokens=t.max_tokens_per_batch if t.packing else None,
                                     shuffle=t.should_shuffle)

    def batch(self, group: list[int], share: bool) -> dict:
        t = self.llm.config.trainer
        return batching.make_batch(self.train, group, packed=t.packing, train_on_inputs=t.train_on_inputs,
                                   pad_id=self.llm.tokenizer.pad_token_id, share_prefix=share)

    @staticmethod
    def weight(batch: dict) -> float:
        return float(batch["target_ids"].numel())

    def evaluate(self, module, rows: TokenizedRows, loss, share: bool) -> dict:
        return token_metrics(self.llm, module, rows)

    def flops_per_unit(self, groups0: batching.Groups, share: bool) -> float:
        """FLOPs per target token: the weight counts target tokens but FLOPs go where the work is really done, so
        that MFU reports it. Per trained weight 4 FLOPs a token with an adapter (forward, backward to the
        activations), 6 in full fine-tuning (and to the weights): the transformer's weights on every computed token
        (shared prefixes once), the LM head's on target tokens only (loss.TargetLoss), the input embedding's never
        (a lookup). Counting all 135M of SmolLM2's weights on every token, a fifth of them its tied 28M-weight
        embedding, put a short run over MFU 100%."""
        llm, t = self.llm, self.llm.config.trainer
        lm = causal_lm_of(llm.model)
        n_params = sum(p.numel() for p in lm.parameters())  # a tied head and input embedding are one tensor
        embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
        body = n_params - embedding.numel() - (head.numel() if head is not embedding else 0)
        per_weight = 4 if llm.config.adapter is not None else 6
        self.computed = sum(batching.computed_tokens(self.train, g, packed=t.packing, share_prefix=share)
                            for g in groups0)
        targets = max(self.target_tokens, 1)
        return per_weight * (body * self.computed + head.numel() * targets) / targets

    @property
    def target_tokens(self) -> int:
        return int(self.train.target_tokens(self.llm.config.trainer.train_on_inputs).sum())

    def describe(self, size: int) -> str:
        t, total = self.llm.config.trainer, int(self.train.lengths.sum())
        shared = "" if self.computed is None or self.computed >= total else (
            f"; shared prompt prefixes: {self.computed:,} tokens computed per epoch for {total:,} "
                  f"({total / self.computed:.2f}x less work, same loss)")
        return (f"training on {len(self.train)} rows, {total:,} tokens ({self.target_tokens:,} target tokens), "
                f"{'packed' if t.packing else 'padded'} micro-batches of {size} rows"
                + (f" / {t.max_tokens_per_batch} tokens" if t.packing and t.max_tokens_per_batch else "") + shared)


def token_metrics(llm, module: torch.nn.Module, rows: TokenizedRows) -> dict:
    """loss (mean over target tokens), perplexity and token accuracy under teacher forcing."""
    loss, n, correct = llm._score(rows, module)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(n, 1)}
    return {llm.output.name: metrics, "combined": {"loss": loss}}


# ============================================================================================ preference data
def check_preference_data(llm, splits: dict) -> None:
    t = llm.config.trainer
    preference.check_data(splits["training"], llm.inputs, llm.output_column, llm.config, "training")
    val_df = splits.get("validation")
    if val_df is not None and len(val_df) and not t.skip_all_evaluation:
        preference.check_data(val_df, llm.inputs, llm.output_column, llm.config, "validation")


@dataclass
class PreferenceRows:
    """Chosen/rejected pairs (dpo, orpo; kto on paired data) or labelled examples (kto); a batch's weight is its
    pairs (kto: examples)."""

    llm: Any
    train: preference.PreferenceData
    val: Optional[preference.PreferenceData]
    seed: int

    @classmethod
    def of(cls, llm, splits: dict, seed: int, log) -> "PreferenceRows":
        t, val_df = llm.config.trainer, splits.get("validation")
        train = preference.prepare(llm, splits["training"], "training", log)
        use_val = val_df is not None and len(val_df) and not t.skip_all_evaluation
        return cls(llm, train, preference.prepare(llm, val_df, "validation", log) if use_val else None, seed)

    @property
    def kto(self) -> bool:
        return self.llm.config.trainer.type == "kto"

    @property
    def rows(self) -> TokenizedRows:
        return self.train.rows

    @property
    def unit(self) -> str:
        return "examples" if self.kto else "pairs"

    def rows_per_micro_batch(self, size: int) -> int:
        return size

    def groups(self, epoch: int, size: int) -> list[list[int]]:
        """Items (kto: single examples, else pairs) in a seeded order per epoch."""
        n = len(self.train.rows) if self.kto else self.train.items
        order = np.random.default_rng(self.seed * 1000003 + epoch).permutation(n) \
            if self.llm.config.trainer.should_shuffle else np.arange(n)
        order = [int(i) for i in order]
        return [order[i:i + size] for i in range(0, n, size)]

    def batch(self, group: list[int], share: bool) -> dict:
        rows = group if self.kto else preference.item_rows(self.train, group)
        return preference.make_batch(self.train, rows, kto=self.kto, packed=self.llm.config.trainer.packing,
                                     pad_id=self.llm.tokenizer.pad_token_id, share_prefix=share, paired=not self.kto)

    @staticmethod
    def weight(batch: dict) -> float:
        return batch["weight"]

    def evaluate(self, module, data: preference.PreferenceData, loss, share: bool) -> dict:
        """The reward metrics of a split, evaluated in pairs when it has them (rewards/accuracies), also for kto."""
        metrics = preference_metrics(self.llm, module, data, loss, share)
        return {self.llm.output.name: metrics, "combined": {"loss": metrics["loss"]}}

    def flops_per_unit(self, groups0, share) -> None:
        return None

    def describe(self, size: int) -> str:
        t = self.llm.config.trainer
        return (f"{t.type}: training on {self.train.items} {'pairs' if self.train.paired else 'examples'}"
                + (f", validating on {self.val.items}" if self.val is not None else "") + f", micro-batches of {size}")


def preference_metrics(llm, module, data: preference.PreferenceData, loss, share: bool) -> dict:
    """loss, rewards/*, logps/* (and kl, nll_loss) of a split: batch sums averaged over the whole split."""
    kto, n, size = llm.config.trainer.type == "kto", data.items, llm._batch_size(eval_=True)
    stats = []
    for start in range(0, n, size):
        rows = preference.item_rows(data, list(range(start, min(start + size, n))))
        batch = preference.make_batch(data, rows, kto=kto, packed=llm.config.trainer.packing,
                                      pad_id=llm.tokenizer.pad_token_id, share_prefix=share, paired=data.paired)
        stats.append(loss(module, batch)[1])
    return preference.summarize(stats)


@torch.no_grad()
def held_out_rewards(llm, df: pd.DataFrame) -> dict:
    """`evaluate` of a preference model: its validation rounds' reward metrics on these rows, when they hold the
    rejected completions (kto: its label column). The preference loss is reported as `preference_loss` (`loss`
    stays the token loss of the chosen completions, as for any llm)."""
    t = llm.config.trainer
    column = t.kto_label_column if t.type == "kto" and t.kto_label_column else t.rejected_column
    if column not in df.columns:
        return {}
    preference.check_data(df, llm.inputs, llm.output_column, llm.config, "evaluate")
    data = preference.prepare(llm, df, "evaluate", lambda *_: None)
    reference, loss = preference.evaluation_reference(llm), LOSSES[t.type]
    module = TargetLoss(llm.model).eval()
    metrics = preference_metrics(llm, module, data, lambda m, b: loss(m, b, t, reference), can_share_prefix(llm.model))
    metrics["preference_loss"] = metrics.pop("loss")
    return metrics
