"""The training loop shared by ecd and llm: plain Python under 🤗 Accelerate.

The model type supplies four things: `batches(epoch)` (deterministic micro-batches for that epoch), `weight(batch)`
(rows or target tokens in it), `loss_sum(model, batch)` (the summed, not averaged, loss) and `evaluate(model)`.
Each optimizer step divides every micro-batch's summed loss by the total weight of the whole effective batch,
so gradient accumulation gives exactly the big-batch mean ((x1+x2)/(n1+n2), not x1/n1 + x2/n2).
Multi-GPU / multi-node: run the same command under `accelerate launch`; micro-batches are sharded by rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..artifacts import atomic_dir, write_json
from ..config.schema import TrainerConfig
from ..device import Precision, is_cuda, peak_flops

HIGHER_IS_BETTER = {"accuracy", "macro_f1", "roc_auc", "r2", "jaccard", "hits_at_k", "token_accuracy",
                    "exact_match", "rouge_l", "average_precision"}
CHECKPOINT = "checkpoint"


@dataclass
class TrainTask:
    """What a model type hands to `fit`."""

    batches: Callable[[int], Iterable[Any]]
    num_batches: int
    weight: Callable[[Any], float]
    loss_sum: Callable[[torch.nn.Module, Any], torch.Tensor]
    evaluate: Optional[Callable[[torch.nn.Module], dict]] = None
    evaluate_training: Optional[Callable[[torch.nn.Module], dict]] = None  # for trainer.evaluate_training_set
    unit: str = "rows"  # what `weight` counts, for throughput lines
    flops_per_unit: Optional[float] = None  # for MFU (llm: ~6N or 4N per trained token)
    tokens: Optional[Callable[[Any], int]] = None  # all tokens processed in a batch (throughput)
    micro_batch_rows: Optional[int] = None  # rows per micro-batch, for trainer.effective_batch_size


@dataclass
class TrainResult:
    # validation: one entry per epoch; validation_steps: the evaluations every trainer.eval_steps within epochs
    statistics: dict = field(default_factory=lambda: {"training": [], "validation": [], "validation_steps": []})
    best_epoch: int = 0
    best_step: int = 0
    best_value: Optional[float] = None
    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    throughput: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)  # filled by the model type: part, precision, reason


def process_state():
    """This process's place in a distributed run (`accelerate launch` / `torchrun`); one process otherwise."""
    from accelerate import PartialState

    return PartialState(cpu=not is_cuda())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def freeze_by_regex(model: torch.nn.Module, pattern: Optional[str]) -> int:
    if not pattern:
        return 0
    rx, n = re.compile(pattern), 0
    for name, p in model.named_parameters():
        if rx.search(name):
            p.requires_grad_(False)
            n += 1
    return n


def fit(model: torch.nn.Module, task: TrainTask, cfg: TrainerConfig, *, run_dir: Optional[Path] = None,
        resume: bool = False, seed: int = 42, precision: Precision = Precision(False, "fp32"),
        log: Callable = print) -> TrainResult:
    seed_everything(seed)
    # Accelerate's state is global to the process and refuses a second, different mixed_precision: keep it
    # constant ("no") and apply this run's precision with our own autocast, so runs in one process stay independent
    accelerator = Accelerator(mixed_precision="no", cpu=not is_cuda())
    autocast = lambda: precision.autocast(accelerator.device.type)  # noqa: E731
    model = model.to(accelerator.device)
    if cfg.compile:
        # in place (nn.Module.compile): parameter names and checkpoints stay those of the eager module
        model.compile(dynamic=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("nothing to train: every parameter is frozen")
    world = accelerator.num_processes
    optimizer = _optimizer(trainable, cfg, world)
    accum = accumulation_steps(cfg, task.micro_batch_rows, world)
    steps_per_epoch = max(1, math.ceil(task.num_batches / world / accum))
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.train_steps or 10**12)
    plateau = {"factor": 1.0}  # learning_rate_scheduler.reduce_on_plateau multiplies the schedule by this
    schedule = _lr_lambda(cfg, total_steps, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) * plateau["factor"])
    model, optimizer = accelerator.prepare(model, optimizer)

    result = TrainResult()
    # epoch_loss/epoch_weight: the running sums of the current epoch, checkpointed so a resumed epoch reports
    # the same mean loss as an uninterrupted one
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "since_best": 0, "epoch_loss": 0.0, "epoch_weight": 0.0}
    ckpt_dir = Path(run_dir) / CHECKPOINT if run_dir else None
    if resume and ckpt_dir and (ckpt_dir / "state.json").exists():
        state, result = _load_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, scheduler, result)
        log(f"resuming from {ckpt_dir}: epoch {state['epoch'] + 1}, step {state['global_step']}")
        plateau["factor"] = state.get("lr_factor", 1.0)
    best_weights = _trainable_state(accelerator.unwrap_model(model)) if result.best_value is None else None
    if result.best_value is not None and ckpt_dir and (ckpt_dir / "best.safetensors").exists():
        best_weights = load_file(str(ckpt_dir / "best.safetensors"))

    peak = peak_flops(precision.bf16) if task.flops_per_unit else None
    started = time.perf_counter()
    units_done = tokens_done = 0
    train_seconds = 0.0
    try:
        while state["epoch"] < cfg.epochs and state["global_step"] < total_steps:
            epoch = state["epoch"]
            model.train()
            groups = _groups(task.batches(epoch), accum, accelerator.process_index, world, task.num_batches)
            bar = tqdm(total=steps_per_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not accelerator.is_local_main_process, leave=False, dynamic_ncols=True)
            if state["step_in_epoch"] == 0:
                state["epoch_loss"] = state["epoch_weight"] = 0.0
            session_weight = session_tokens = 0.0  # trained in this process, for throughput
            t0 = time.perf_counter()
            for i, group in enumerate(groups):
                if i < state["step_in_epoch"]:
                    continue  # resumed mid-epoch: these steps were already taken
                local = float(sum(task.weight(b) for b in group))
                total = torch.tensor(local, device=accelerator.device)
                total = accelerator.reduce(total, "sum") if world > 1 else total
                group_loss = 0.0
                for j, batch in enumerate(group):
                    sync = contextlib.nullcontext() if j == len(group) - 1 else accelerator.no_sync(model)
                    with sync, autocast():
                        loss = task.loss_sum(model, batch)
                    accelerator.backward(loss * world / total.clamp_min(1.0))
                    group_loss += float(loss.detach())
                    session_tokens += task.tokens(batch) if task.tokens else 0
                if cfg.regularization_lambda and cfg.regularization_type in ("l1", "l1_l2"):
                    _add_l1_gradient(trainable, cfg.regularization_lambda)
                _clip(accelerator, model, cfg)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["epoch_loss"] += group_loss
                state["epoch_weight"] += local  # this rank's share: its loss sum is over these units
                session_weight += local
                units_done += float(total)
                state["global_step"] += 1
                state["step_in_epoch"] = i + 1
                bar.update(1)
                bar.set_postfix(loss=f"{state['epoch_loss'] / max(state['epoch_weight'], 1):.4f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}")
                last_step = state["step_in_epoch"] >= steps_per_epoch or state["global_step"] >= total_steps
                if cfg.eval_steps and state["global_step"] % cfg.eval_steps == 0 and not last_step:
                    improved, text, metrics = _validation_round(accelerator, model, task, cfg, result, state, epoch, autocast)
                    if metrics:
                        result.statistics["validation_steps"].append(
                            {"epoch": epoch + 1, "step": state["global_step"], **metrics})
                        bar.write(f"step {state['global_step']}: {text}")
                    if improved:
                        best_weights = _trainable_state(accelerator.unwrap_model(model))
                    _reduce_on_plateau(cfg, state, plateau, bar.write)
                    if _should_stop(cfg, state):
                        break
                if cfg.steps_per_checkpoint and state["global_step"] % cfg.steps_per_checkpoint == 0 and ckpt_dir:
                    _save_checkpoint(ckpt_dir, accelerator, model, optimizer, scheduler, state, result, best_weights)
                if state["global_step"] >= total_steps:
                    break
            bar.close()
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            train_stats = {"loss": state["epoch_loss"] / max(state["epoch_weight"], 1.0), "seconds": seconds,
                           f"{task.unit}_per_second": session_weight * world / max(seconds, 1e-9)}
            if session_tokens:
                train_stats["tokens_per_second"] = session_tokens * world / max(seconds, 1e-9)
            tokens_done += session_tokens * world
            if task.flops_per_unit and peak:
                train_stats["mfu"] = task.flops_per_unit * session_weight / max(seconds, 1e-9) / peak  # per device
            result.statistics["training"].append(train_stats)
            rate = f"{train_stats[f'{task.unit}_per_second']:.1f} {task.unit}/s"
            if "tokens_per_second" in train_stats:
                rate = f"{train_stats['tokens_per_second']:.1f} tokens/s ({rate})"
            line = f"epoch {epoch + 1}: train loss {train_stats['loss']:.4f}, {rate}"
            if "mfu" in train_stats:
                line += f", MFU {100 * train_stats['mfu']:.1f}% of {peak / 1e12:.2f} TFLOPS"

            if cfg.evaluate_training_set and task.evaluate_training and not cfg.skip_all_evaluation:
                train_stats["metrics"] = _evaluate(accelerator, model, task.evaluate_training, autocast)
                line += f", training set {_summary_metric(train_stats['metrics'], cfg)}"

            improved, text, metrics = _validation_round(accelerator, model, task, cfg, result, state, epoch, autocast)
            if metrics:
                result.statistics["validation"].append(metrics)
                line += f", {text}"
            if improved:
                best_weights = _trainable_state(accelerator.unwrap_model(model))
            _reduce_on_plateau(cfg, state, plateau, log)
            log(line + ("" if improved else f" (best: epoch {result.best_epoch}, step {result.best_step})"))
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            if ckpt_dir and cfg.checkpoints_per_epoch:
                _save_checkpoint(ckpt_dir, accelerator, model, optimizer, scheduler, state, result, best_weights)
            if _should_stop(cfg, state):
                log(f"early stop: no improvement in {cfg.early_stop} evaluations")
                result.stopped_early = True
                break
    except KeyboardInterrupt:
        if ckpt_dir:
            _save_checkpoint(ckpt_dir, accelerator, model, optimizer, scheduler, state, result, best_weights)
            log(f"interrupted: state saved in {ckpt_dir}; rerun with --resume to continue")
        raise

    unwrapped = accelerator.unwrap_model(model)
    if best_weights is not None:
        unwrapped.load_state_dict({k: v.to(accelerator.device) for k, v in best_weights.items()}, strict=False)
    result.steps = state["global_step"]
    result.seconds = time.perf_counter() - started
    if train_seconds > 0:
        result.throughput = {f"{task.unit}_per_second": units_done / train_seconds}
        if tokens_done:
            result.throughput["tokens_per_second"] = tokens_done / train_seconds
        if task.flops_per_unit and peak:
            result.throughput["mfu"] = task.flops_per_unit * units_done / train_seconds / peak
            result.throughput["peak_tflops"] = peak / 1e12
    return result


# ------------------------------------------------------------------------------------------------ pieces
def _shard(batches: Iterable, num_batches: int, rank: int, world: int):
    """This rank's micro-batches. Every rank must take the same number of steps (or the gradient all-reduce
    waits forever), so a rank left short re-uses one of the first batches, as Accelerate's even_batches does."""
    head, taken = [], 0
    for k, batch in enumerate(batches):
        if k < world:
            head.append(batch)
        if k % world == rank:
            taken += 1
            yield batch
    while world > 1 and taken < math.ceil(num_batches / world):
        taken += 1
        yield head[rank % len(head)]


def _groups(batches: Iterable, accum: int, rank: int, world: int, num_batches: int):
    group = []
    for batch in _shard(batches, num_batches, rank, world):
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


def scaled_learning_rate(cfg: TrainerConfig, world: int) -> float:
    """Ludwig's learning_rate_scaling: with `world` processes the effective batch is `world` times larger."""
    factor = {"linear": world, "sqrt": math.sqrt(world)}.get(cfg.learning_rate_scaling or "constant", 1.0)
    return cfg.learning_rate * factor


def _optimizer(params, cfg: TrainerConfig, world: int = 1) -> torch.optim.Optimizer:
    o = cfg.optimizer
    l2 = cfg.regularization_lambda if cfg.regularization_type in ("l2", "l1_l2") else 0.0
    decay = o.weight_decay + l2
    lr = scaled_learning_rate(cfg, world)
    if o.type == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=decay)
    cls = torch.optim.AdamW if o.type == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=decay)


def _lr_lambda(cfg: TrainerConfig, total_steps: int, steps_per_epoch: int):
    s = cfg.learning_rate_scheduler
    warmup = int(s.warmup_fraction * total_steps) or int(s.warmup_evaluations * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if s.decay == "linear":
            return s.min_lr_fraction + (1 - s.min_lr_fraction) * max(0.0, 1 - progress)
        if s.decay == "cosine":
            return s.min_lr_fraction + (1 - s.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if s.decay == "exponential":
            return s.decay_rate ** ((step - warmup) / steps_per_epoch)
        return 1.0

    return factor


def _add_l1_gradient(params: list[torch.Tensor], strength: float) -> None:
    """The (sub)gradient of strength * sum |w|, added once per optimizer step."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.add_(torch.sign(p), alpha=strength)


def _clip(accelerator: Accelerator, model, cfg: TrainerConfig) -> None:
    c = cfg.gradient_clipping
    if c.clipvalue:
        accelerator.clip_grad_value_(model.parameters(), c.clipvalue)
    norm = c.clipglobalnorm or c.clipnorm
    if norm:
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], norm)


def _watched(metrics: dict, cfg: TrainerConfig) -> tuple[float, str, str]:
    field_name = cfg.validation_field or "combined"
    metric = cfg.validation_metric or "loss"
    values = metrics.get(field_name, {})
    if metric not in values:
        raise KeyError(f"trainer.validation_metric {metric!r} is not computed for {field_name!r}; "
                       f"available: {sorted(values)}")
    return float(values[metric]), field_name, metric


def accumulation_steps(cfg: TrainerConfig, micro_batch_rows: Optional[int], world: int) -> int:
    """gradient_accumulation_steps, or with `auto` what Ludwig's effective_batch_size (rows per optimizer step
    over all processes) asks for."""
    if cfg.gradient_accumulation_steps != "auto":
        return cfg.gradient_accumulation_steps
    if isinstance(cfg.effective_batch_size, int) and micro_batch_rows:
        return max(1, round(cfg.effective_batch_size / (micro_batch_rows * world)))
    return 1


def _evaluate(accelerator, model, evaluate: Callable, autocast: Callable) -> dict:
    model.eval()
    with torch.no_grad(), autocast():
        metrics = evaluate(accelerator.unwrap_model(model))
    model.train()
    return metrics


def _validation_round(accelerator, model, task: TrainTask, cfg: TrainerConfig, result: TrainResult, state: dict,
                      epoch: int, autocast: Callable) -> tuple[bool, str, Optional[dict]]:
    """Evaluate on the validation split (if any) and track the best value: (improved, log text, metrics).
    Without validation every round counts as an improvement, so the last weights are kept."""
    improved, text, metrics = True, "", None
    if task.evaluate and not cfg.skip_all_evaluation:
        metrics = _evaluate(accelerator, model, task.evaluate, autocast)
        if metrics:
            value, _, metric = _watched(metrics, cfg)
            text = f"validation {_summary_metric(metrics, cfg)}"
            improved = result.best_value is None or _better(value, result.best_value, metric)
            if improved:
                result.best_value = value
    if improved:
        state["since_best"] = 0
        result.best_epoch, result.best_step = epoch + 1, state["global_step"]
    else:
        state["since_best"] += 1
    return improved, text, metrics


def _reduce_on_plateau(cfg: TrainerConfig, state: dict, plateau: dict, log: Callable) -> None:
    patience = cfg.learning_rate_scheduler.reduce_on_plateau
    if patience and state["since_best"] and state["since_best"] % patience == 0:
        plateau["factor"] *= cfg.learning_rate_scheduler.reduce_rate
        state["lr_factor"] = plateau["factor"]
        log(f"no improvement in {state['since_best']} evaluations: learning rate x{plateau['factor']:.3g}")


def _should_stop(cfg: TrainerConfig, state: dict) -> bool:
    """early_stop counts evaluations without improvement (one per epoch, more with eval_steps), as in Ludwig."""
    return cfg.early_stop > 0 and state["since_best"] >= cfg.early_stop


def _summary_metric(metrics: dict, cfg: TrainerConfig) -> str:
    value, field_name, metric = _watched(metrics, cfg)
    return f"{field_name}.{metric} {value:.4f}"


def _better(value: float, best: float, metric: str) -> bool:
    return value > best if metric in HIGHER_IS_BETTER else value < best


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trained parameters and buffers (frozen pretrained weights are left out: they never change)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items() if k not in frozen}


def _save_checkpoint(ckpt_dir: Path, accelerator, model, optimizer, scheduler, state, result, best_weights) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    with atomic_dir(ckpt_dir) as tmp:
        save_file(_shared_safe(_trainable_state(unwrapped)), str(tmp / "weights.safetensors"))
        if best_weights is not None:
            save_file(_shared_safe(best_weights), str(tmp / "best.safetensors"))
        # optimizer/scheduler states are tensors and plain containers: loaded back with weights_only=True
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    # batch order is derived from seed + epoch; torch's generator drives dropout
                    "rng": {"torch": torch.get_rng_state()}}, tmp / "optimizer.pt")
        write_json(tmp / "state.json", {"state": state, "statistics": result.statistics,
                                         "best_epoch": result.best_epoch, "best_step": result.best_step,
                                         "best_value": result.best_value})


def _shared_safe(tensors: dict) -> dict:
    """safetensors refuses tensors that share storage (tied weights): store independent copies."""
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _load_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, result: TrainResult):
    saved = json.loads((ckpt_dir / "state.json").read_text())
    weights = load_file(str(ckpt_dir / "weights.safetensors"))
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    extra = torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location=device)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["torch"].cpu())
    result.statistics = saved["statistics"]
    result.best_epoch, result.best_value = saved["best_epoch"], saved["best_value"]
    result.best_step = saved.get("best_step", 0)
    return saved["state"], result
