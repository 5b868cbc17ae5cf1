"""Preference tuning of an llm: the pieces of DPO (sigmoid, IPO), ORPO and KTO; cadenza/llm/train.py trains
with them on the shared training loop (its dpo_loss / orpo_loss / kto_loss).

The prompt is the input feature, the chosen completion the output feature and the rejected completion the column
`trainer.rejected_column` names (KTO also takes unpaired rows with a boolean `trainer.kto_label_column`). With chat
data (`preprocessing.format: messages`) the prompt is a conversation ending with a user turn and each completion a
text or one assistant turn, rendered with the chat template.

A completion's log-probability log pi(y|x) is the SUM of log p over its tokens (the completion and the EOS), taken
from `TargetLoss.target_logits`, so packing and shared prompt prefixes work as in fine-tuning: a pair's chosen and
rejected rows go into one micro-batch and their common prompt is computed once.

The reference model: with an adapter, the same model with the adapter disabled (no second copy in memory; with
`adapter.pretrained_adapter_weights` that is the base, not the adapter you start from); for full fine-tuning a
frozen copy made before training, or (`trainer.precompute_ref_log_probs`, dpo) the reference log-probs of every
row computed once before training and cached. `trainer.dpo_reference_free: true` takes log pi_ref = 0 (as Ludwig's
dpo).

The shared loop divides `loss_sum` by the batch `weight`: weight = pairs (dpo, orpo) or examples (kto) and
loss_sum = the sum of the per-pair (per-example) losses, so every step is the mean over the effective batch.
The formulas follow TRL 1.x (its metric names too: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected); tests/test_preference.py checks them against TRL on a fixed batch.
Differences from TRL, on purpose: ORPO's NLL term is the per-pair mean over the chosen COMPLETION tokens (TRL: the
token mean over prompt + completion of the whole batch); `dpo_label_smoothing` is conservative DPO (TRL 1.x's
`sigmoid` ignores label smoothing).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import DataError
from . import batching
from .loss import TargetLoss, can_share_prefix
from .tokenize import TokenizedRows, tokenize_rows

PREFERENCE_TRAINERS = ("dpo", "orpo", "kto")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def is_preference(trainer_type: str) -> bool:
    return trainer_type in PREFERENCE_TRAINERS


# ============================================================================================================ losses
def dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al., 2023), conservative with label smoothing eps:
    delta = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    loss = -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta)            (per pair)"""
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, beta: float):
    """IPO (Azar et al., 2023, eq. 17) on per-token log-ratios, as TRL (which confirmed it with the authors):
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) / |y_w| - (log pi(y_l|x) - log pi_ref(y_l|x)) / |y_l|
    loss = (h - 1 / (2 beta))^2                                                       (per pair)"""
    h = (chosen - ref_chosen) / chosen_tokens.clamp_min(1) - (rejected - ref_rejected) / rejected_tokens.clamp_min(1)
    return (h - 1 / (2 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean, rejected_mean, chosen_nll, beta: float):
    """ORPO (Hong et al., 2024, eqs. 4-7), with the mean token log-probs m = log P(y|x) / |y|:
    log odds(y|x) = m - log(1 - exp(m))
    loss = NLL(y_w|x) - beta log sigma(log odds(y_w|x) - log odds(y_l|x))            (per pair)"""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return chosen_nll - beta * F.logsigmoid(log_odds)


def kto_loss(logratios, desirable, kl, beta: float, desirable_weight: float, undesirable_weight: float):
    """KTO (Ethayarajh et al., 2024, eq. 7), r = log pi(y|x) - log pi_ref(y|x), z0 = kl (detached, >= 0):
    desirable:   w_d (1 - sigma(beta (r - z0)))
    undesirable: w_u (1 - sigma(beta (z0 - r)))                                       (per example)"""
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, good, bad)


def kto_kl(kl_logps, ref_kl_logps):
    """KTO's reference point z0 = max(0, mean over the batch's mismatched pairs (x_i, y_{i-1}) of
    log pi(y|x) - log pi_ref(y|x)), without gradient."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp_min(0)


# =========================================================================================== sequence log-probs
def sequence_logps(module: TargetLoss, batch: dict) -> torch.Tensor:
    """log pi(y|x) of each row of a batch: the sum of log p over its target tokens (completion + EOS)."""
    logits = module.target_logits(batch)
    targets = batch["target_ids"].to(logits.device)
    token_logps = torch.log_softmax(logits, -1).gather(1, targets.view(-1, 1)).view(-1)
    rows = batch["target_row"].to(logits.device)
    return torch.zeros(batch["num_rows"], dtype=token_logps.dtype, device=logits.device).index_add(
        0, rows, token_logps)


# ================================================================================================== the data
@dataclass
class PreferenceData:
    """Tokenized completions: paired data holds (chosen, rejected) at rows (2i, 2i + 1)."""

    rows: TokenizedRows
    desirable: np.ndarray  # bool per row
    paired: bool
    long_prompts: int = 0  # prompts cut to fit global_max_sequence_length
    reference: Optional[np.ndarray] = None  # trainer.precompute_ref_log_probs: log pi_ref(y|x) per row, cached

    @property
    def items(self) -> int:
        return len(self.rows) // 2 if self.paired else len(self.rows)


def check_data(df: pd.DataFrame, prompt_columns: list[str], output_column: str, cfg, where: str) -> None:
    """The errors to name before any model loads: missing columns, empty completions, non-boolean labels."""
    t = cfg.trainer
    label = t.kto_label_column if t.type == "kto" else None
    need = {c: f"input_features ({c})" for c in prompt_columns}
    need[output_column] = f"output_features ({output_column}, the chosen completions)"
    if label:
        need[label] = "trainer.kto_label_column"
    else:
        need[t.rejected_column] = "trainer.rejected_column (the rejected completions)"
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column " + "; ".join(f"{c!r} (asked for by {need[c]})" for c in missing)
                        + f"; the data has columns {list(df.columns)}")
    if not len(df):
        raise DataError(f"{where}: the data set has no rows")
    completions = [output_column] if label else [output_column, t.rejected_column]
    for column in completions:
        blank = [i for i, v in enumerate(df[column]) if _blank(v)]
        if blank:
            raise DataError(f"{where}: {len(blank)} of {len(df)} rows have an empty completion in column {column!r} "
                            f"(rows {blank[:5]}{' ...' if len(blank) > 5 else ''}); fill or remove them")
    if label:
        bad = [i for i, v in enumerate(df[label]) if _as_bool(v) is None]
        if bad:
            raise DataError(f"{where}: trainer.kto_label_column {label!r} must be boolean (true/false, 1/0); rows "
                            f"{bad[:5]} hold {[df[label].iloc[i] for i in bad[:5]]}")


def prepare(llm, df: pd.DataFrame, where: str, log) -> PreferenceData:
    """Prompts as fine-tuning builds them (template, chat template; or a conversation column rendered with the
    chat template), completions + end of turn (EOS), tokenized and truncated."""
    t, max_len = llm.config.trainer, llm.config.preprocessing.global_max_sequence_length
    label = t.kto_label_column if t.type == "kto" else None
    if llm.chat:
        records = llm.chat.prompt_records(df, where)
        tokenize = lambda column: llm.chat.completion_rows(llm.tokenizer, records, column, max_len)  # noqa: E731
        prompt_lengths = lambda: llm.chat.prompt_lengths(llm.tokenizer, records)  # noqa: E731
    else:
        records = df.to_dict("records")
        prompts = llm._prompts(records)

        def tokenize(column: str) -> TokenizedRows:
            targets = [llm.builder.target(p, r.get(column)) for p, r in zip(prompts, records)]
            return tokenize_rows(llm.tokenizer, prompts, targets, max_len=max_len,
                                 add_special_tokens=llm.builder.add_special_tokens, cache_dir=llm._cache() / "tokens")

        def prompt_lengths() -> list[int]:
            return [len(x) for x in llm.tokenizer(prompts, add_special_tokens=llm.builder.add_special_tokens)[
                "input_ids"]]

    chosen = tokenize(llm.output_column)
    if label:
        rows, desirable, paired = chosen, np.array([_as_bool(r[label]) for r in records], dtype=bool), False
    else:
        rejected = tokenize(t.rejected_column)
        ids = [x for pair in zip(chosen.ids, rejected.ids) for x in pair]
        plens = np.stack([chosen.prompt_lens, rejected.prompt_lens], 1).reshape(-1)
        rows = TokenizedRows(ids, plens, chosen.truncated + rejected.truncated)
        desirable, paired = np.tile([True, False], len(records)), True
    long_prompts = sum(n >= max_len for n in prompt_lengths()) if max_len else 0
    if rows.truncated:
        log(f"{where}: preprocessing.global_max_sequence_length={max_len}: {rows.truncated} of {len(rows)} "
            f"completions truncated ({long_prompts} of {len(records)} prompts are longer than the limit; they keep "
            "their end and the completion keeps at least half the budget)")
    return PreferenceData(rows, desirable, paired, long_prompts)


def item_rows(data: PreferenceData, items: list[int]) -> list[int]:
    return [r for i in items for r in (2 * i, 2 * i + 1)] if data.paired else list(items)


def make_batch(data: PreferenceData, rows: list[int], *, kto: bool, packed: bool, pad_id: int,
               share_prefix: bool, paired: bool) -> dict:
    """A micro-batch of completion rows (pairs kept adjacent when `paired`). KTO adds one mismatched row per
    example, prompt i + completion i-1 (cyclic, as TRL), for its KL estimate; they come after the examples."""
    ids = [data.rows.ids[r] for r in rows]
    plens = [int(data.rows.prompt_lens[r]) for r in rows]
    n = len(rows)
    if kto:
        ids += [np.concatenate([ids[k][:plens[k]], ids[(k - 1) % n][plens[(k - 1) % n]:]]) for k in range(n)]
        plens += plens[:n]
    sub = TokenizedRows(ids, np.asarray(plens, dtype=np.int64))
    batch = batching.make_batch(sub, list(range(len(ids))), packed=packed, pad_id=pad_id, share_prefix=share_prefix)
    counts = sub.target_tokens()
    batch["target_row"] = torch.from_numpy(np.repeat(np.arange(len(ids)), counts))
    batch["target_tokens"] = torch.from_numpy(counts).float()
    batch["num_rows"] = len(ids)
    batch["examples"] = n
    batch["desirable"] = torch.from_numpy(data.desirable[rows].copy())
    batch["paired"] = paired
    batch["weight"] = float(n // 2 if paired and not kto else n)
    if data.reference is not None:
        batch["reference_logps"] = torch.from_numpy(data.reference[rows])
    return batch


# ======================================================================================= per-batch pieces
def policy_and_reference(module: TargetLoss, batch: dict, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y|x) of every row of the batch (with gradient) and log pi_ref(y|x) (without; zeros when there is no
    reference model: orpo, dpo_reference_free)."""
    logps = sequence_logps(module, batch)
    if reference is None:
        return logps, torch.zeros_like(logps)
    with torch.no_grad():
        return logps, reference(batch).to(logps.device, logps.dtype)


def batch_stats(losses, rewards, logps, desirable, paired: bool, kl=None) -> dict:
    """Sums (and counts) over the batch, so that an evaluation over many batches averages them exactly."""
    logps = logps.detach()
    stats = {"loss": float(losses.detach().sum()), "examples": int(losses.numel()),
             "chosen": int(desirable.sum()), "rejected": int((~desirable).sum()),
             "rewards/chosen": float(rewards[desirable].sum()), "rewards/rejected": float(rewards[~desirable].sum()),
             "logps/chosen": float(logps[desirable].sum()), "logps/rejected": float(logps[~desirable].sum())}
    if paired:
        stats["pairs"] = int(rewards.numel() // 2)
        stats["rewards/accuracies"] = float((rewards[0::2] > rewards[1::2]).sum())
    if kl is not None:
        stats["kl"] = float(kl)
    return stats


def summarize(stats: list[dict]) -> dict:
    """Means of the summed statistics of several batches: the metrics of one evaluation."""
    total = lambda key: sum(s.get(key, 0) for s in stats)  # noqa: E731
    out = {"loss": total("loss") / max(total("examples"), 1)}
    for side in ("chosen", "rejected"):
        count = max(total(side), 1)
        out[f"rewards/{side}"] = total(f"rewards/{side}") / count
        out[f"logps/{side}"] = total(f"logps/{side}") / count
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if all("pairs" in s for s in stats) and stats:
        out["rewards/accuracies"] = total("rewards/accuracies") / max(total("pairs"), 1)
    if any("kl" in s for s in stats):
        out["kl"] = total("kl") / len(stats)
    if any("nll_loss" in s for s in stats):
        out["nll_loss"] = total("nll_loss") / max(total("pairs"), 1)
    return out


# ================================================================================================ reference
def reference_logps(llm, log) -> Optional[Callable[[dict], torch.Tensor]]:
    """Called BEFORE the adapter is applied. Adapter: the trained model with the adapter disabled; full
    fine-tuning: a frozen copy of the model as it is now. None for orpo and dpo_reference_free.
    (trainer.precompute_ref_log_probs replaces both by `precomputed_reference`.)"""
    t = llm.config.trainer
    if not needs_reference(t):
        return None
    if llm.config.adapter is not None:
        log(f"{t.type}: reference model = the base model (the adapter disabled)")
        return adapter_off_reference(llm)
    frozen = TargetLoss(copy.deepcopy(llm.model).requires_grad_(False)).eval()
    log(f"{t.type}: reference model = a frozen copy of the base model")

    def from_copy(batch: dict) -> torch.Tensor:
        return sequence_logps(frozen.to(next(llm.model.parameters()).device), batch)

    return from_copy


def needs_reference(trainer_cfg) -> bool:
    return not (trainer_cfg.type == "orpo" or (trainer_cfg.type == "dpo" and trainer_cfg.dpo_reference_free))


def adapter_off_reference(llm) -> Callable[[dict], torch.Tensor]:
    """log pi_ref = the PEFT model with its adapter switched off (no second copy of the weights)."""
    def with_adapter_off(batch: dict) -> torch.Tensor:
        was_training = llm.model.training  # the policy's own mode (dropout) must survive the reference pass
        llm.model.eval()
        try:
            with llm.model.disable_adapter():
                return sequence_logps(TargetLoss(llm.model), batch)
        finally:
            llm.model.train(was_training)

    return with_adapter_off


@torch.no_grad()
def precomputed_reference(llm, datasets: list[PreferenceData], precision, log) -> Callable[[dict], torch.Tensor]:
    """trainer.precompute_ref_log_probs (dpo): log pi_ref(y|x) of every training and validation row, computed once
    before training with the model as it is then (the base model: called before the adapter is applied), in eval
    mode and the training precision; each batch then carries its rows' values. No frozen copy in memory and no
    reference pass per step."""
    t, pad = llm.config.trainer, llm.tokenizer.pad_token_id
    module, share = TargetLoss(llm.model), can_share_prefix(llm.model)
    was_training = llm.model.training
    llm.model.eval()
    size = llm._batch_size(eval_=True)
    try:
        with precision.autocast(next(llm.model.parameters()).device.type):
            for data in datasets:
                values = np.zeros(len(data.rows), dtype=np.float32)
                for start in range(0, data.items, size):
                    rows = item_rows(data, list(range(start, min(start + size, data.items))))
                    batch = make_batch(data, rows, kto=False, packed=t.packing, pad_id=pad, share_prefix=share,
                                       paired=data.paired)
                    values[rows] = sequence_logps(module, batch).float().cpu().numpy()
                data.reference = values
    finally:
        llm.model.train(was_training)
    log(f"{t.type}: reference log-probs of {sum(len(d.rows) for d in datasets)} completions computed once "
        "(trainer.precompute_ref_log_probs), before training")
    return lambda batch: batch["reference_logps"]


def evaluation_reference(llm) -> Optional[Callable[[dict], torch.Tensor]]:
    """The reference for `evaluate` of a trained preference model: the adapter switched off, or for full (or
    merged) weights the base model loaded again from base_model; None for orpo and dpo_reference_free."""
    t = llm.config.trainer
    if not needs_reference(t):
        return None
    if llm.weights_kind == "adapter":
        return adapter_off_reference(llm)
    from .load import load_causal_lm, plain_model_dir

    base = load_causal_lm(plain_model_dir(llm.config.base_model, str(llm._cache())),
                          dtype=next(llm.model.parameters()).dtype, trust_remote_code=llm.config.trust_remote_code,
                          rope_scaling=llm._rope_scaling())
    frozen = TargetLoss(base.requires_grad_(False).to(next(llm.model.parameters()).device)).eval()
    return lambda batch: sequence_logps(frozen, batch)


def _blank(value) -> bool:
    if value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str) and bool(pd.isna(value))):
        return True
    return not str(value).strip()


def _as_bool(value) -> Optional[bool]:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    return None
