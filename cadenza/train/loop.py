"""The training loop shared by ecd and llm: one recipe, read top to bottom, under 🤗 Accelerate.

The model type supplies four things: `batches(epoch)` (deterministic micro-batches for that epoch), `weight(batch)`
(rows or target tokens in it), `loss_sum(model, batch)` (the summed, not averaged, loss) and `evaluate(model)`.
Each optimizer step divides every micro-batch's summed loss by the total weight of the whole effective batch,
so gradient accumulation gives exactly the big-batch mean ((x1+x2)/(n1+n2), not x1/n1 + x2/n2).
Multi-GPU / multi-node: run the same command under `accelerate launch`; micro-batches are sharded by rank.

Checkpoints are written at step boundaries only (every `steps_per_checkpoint` steps, each epoch end, and when
SIGTERM or Ctrl-C asks the run to stop), and hold everything the next step depends on, so a resumed run takes the
very steps the uninterrupted one takes (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config.schema import BackendConfig, TrainerConfig
from ..device import Precision, is_cuda, peak_flops
from ..metrics import is_better
from ..phases import phase
from ..threads import follow_load
from ..track import Tracker
from . import sharding, zero
from .backend import accelerator_options, check_launch, deepspeed_options, sharding_options
from .checkpoint import (CHECKPOINT, check_same_batches, load_trainable_state, random_states, read_checkpoint,
                         restore_random_states, save_checkpoint, trainable_state)
from .interrupt import TrainingInterrupted, stop_on_signals

__all__ = ["CHECKPOINT", "TrainTask", "TrainResult", "StepPlan", "plan_steps", "fit", "process_state",
           "seed_everything", "freeze_by_regex", "accumulation_steps", "scaled_learning_rate"]


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
    lr_ratio: Optional[Callable[[str], float]] = None  # learning-rate factor by parameter name (LoRA+)


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


@dataclass
class TrainState:
    """Where the run is: all of it goes into each checkpoint (as JSON) and comes back on resume."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps taken in it
    global_step: int = 0
    # running sums of the epoch in progress, so that a resumed epoch reports the same mean loss
    epoch_loss: float = 0.0
    epoch_weight: float = 0.0
    evaluations_since_best: int = 0
    lr_factor: float = 1.0  # learning_rate_scheduler.reduce_on_plateau's multiplier
    stopped_early: bool = False  # early_stop evaluations without improvement: the epoch in progress is the last
    done: bool = False  # decided at an epoch's end: stopped early, or train_steps reached
    best_value: Optional[float] = None
    best_epoch: int = 0
    best_step: int = 0
    statistics: dict = field(default_factory=lambda: {"training": [], "validation": [], "validation_steps": []})

    def count_step(self, loss_sum: float, weight: float) -> None:
        """One optimizer step taken; `loss_sum` and `weight` are over all processes (the same on every rank)."""
        self.global_step += 1
        self.step_in_epoch += 1
        self.epoch_loss += loss_sum
        self.epoch_weight += weight


@dataclass(frozen=True)
class StepPlan:
    """The step arithmetic of a run, in one place (the llm model type asks it too: AdaLoRA needs total_steps)."""

    accumulation: int  # micro-batches per optimizer step, per process
    steps_per_epoch: int
    total_steps: int


def plan_steps(cfg: TrainerConfig, num_batches: int, micro_batch_rows: Optional[int], world: int) -> StepPlan:
    accumulation = accumulation_steps(cfg, micro_batch_rows, world)
    steps_per_epoch = max(1, math.ceil(num_batches / world / accumulation))
    total = cfg.epochs * steps_per_epoch
    return StepPlan(accumulation, steps_per_epoch, min(total, cfg.train_steps) if cfg.train_steps else total)


def accumulation_steps(cfg: TrainerConfig, micro_batch_rows: Optional[int], world: int) -> int:
    """gradient_accumulation_steps, or with `auto` what Ludwig's effective_batch_size (rows per optimizer step
    over all processes) asks for."""
    if cfg.gradient_accumulation_steps != "auto":
        return cfg.gradient_accumulation_steps
    if isinstance(cfg.effective_batch_size, int) and micro_batch_rows:
        return max(1, round(cfg.effective_batch_size / (micro_batch_rows * world)))
    return 1


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


# ==================================================================================================== the recipe
def fit(model: torch.nn.Module, task: TrainTask, cfg: TrainerConfig, *, run_dir: Optional[Path] = None,
        resume: bool = False, seed: int = 42, precision: Precision = Precision(False, "fp32"),
        fingerprints: Optional[dict] = None, tracker: Optional[Tracker] = None, log: Callable = print,
        backend: Optional[BackendConfig] = None) -> TrainResult:
    """Train `model` on `task`; with `run_dir`, checkpoints go to run_dir/checkpoint and `resume` continues one.
    `fingerprints` (config, seed, data) are stored in each checkpoint for `--resume` to compare against, with the
    step arithmetic, which the loop compares itself. `tracker` (cadenza.track) gets the statistics as they come.
    `backend` (the config's backend section) says how the processes of a distributed run share the work."""
    # ---- setup
    with phase("measure peak"):  # MFU's divisor: timed once a process (own random numbers), else read back
        peak = peak_flops(precision.bf16) if task.flops_per_unit else None
    seed_everything(seed)
    # Accelerate's state is global to the process and refuses a second, different mixed_precision: keep it
    # constant ("no") and apply this run's precision with our own autocast, so runs in one process stay independent
    world = process_state().num_processes
    plan = plan_steps(cfg, task.num_batches, task.micro_batch_rows, world)
    accelerator = Accelerator(mixed_precision="no", cpu=not is_cuda(), **accelerator_options(backend, world))
    check_launch(accelerator.distributed_type)
    autocast = lambda: precision.autocast(accelerator.device.type)  # noqa: E731
    shards = sharding_options(backend, world)
    zero_options = deepspeed_options(backend, world)  # DeepSpeed's config, checked before anything is built
    zero_config = zero.engine_config(zero_options, cfg, plan.accumulation, task.micro_batch_rows) if zero_options \
        else None
    deepspeed = zero_config is not None
    if shards is None and not deepspeed:  # a sharded or partitioned copy goes to the device, not the model given
        model = model.to(accelerator.device)

    # ---- resume, part 1: counters, statistics and weights as the checkpoint left them (weights into the plain model)
    ckpt_dir = Path(run_dir) / CHECKPOINT if run_dir else None
    fingerprints = {**(fingerprints or {}), "batches": {"micro_batches_per_epoch": task.num_batches, **asdict(plan)}}
    saved = read_checkpoint(ckpt_dir) if resume and ckpt_dir and ckpt_dir.is_dir() else None
    if saved:
        check_same_batches(ckpt_dir, saved.fingerprints.get("batches"), fingerprints["batches"])
        load_trainable_state(model, saved.weights, ckpt_dir)
    state = TrainState(**saved.state) if saved else TrainState()

    # ---- the module trained: the model itself, or a copy sharded by FSDP2 or partitioned by DeepSpeed's ZeRO, which
    # hands its weights back at the end
    given = model
    if shards is not None:
        model = sharding.shard(model, shards)
    elif deepspeed:
        model = copy.deepcopy(model)
    if cfg.compile:  # in place (nn.Module.compile): parameter names and checkpoints stay those of the eager module
        model.compile(dynamic=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("nothing to train: every parameter is frozen")
    ratios = [task.lr_ratio(n) for n, p in model.named_parameters() if p.requires_grad] if task.lr_ratio else None
    optimizer = build_optimizer(trainable, cfg, world, ratios)
    template = optimizer.state_dict()  # its layout (parameter indices by group), before any engine wraps it
    if deepspeed:
        model, optimizer = zero.initialize(model, optimizer, zero_config)
    elif shards is None:  # DDP (or nothing) around the model, through Accelerate
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = unwrap(model)

    def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trained weights, whole: ZeRO-3 gathers its partitions (collective), FSDP2 its shards."""
        with zero.gathered(module) if deepspeed else contextlib.nullcontext():
            return trainable_state(module)

    # ---- resume, part 2: optimizer and schedule
    scheduler = build_scheduler(optimizer, cfg, plan, plateau=lambda: state.lr_factor)
    best_weights = None  # the best weights so far; kept only when a validation metric says which are best
    if saved:
        if shards is not None:
            sharding.load_optimizer_state(unwrapped, optimizer, saved.optimizer)
        elif deepspeed:
            zero.load_optimizer_state(unwrapped, optimizer, saved.optimizer)
        else:
            optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        best_weights = saved.best_weights
        log(f"resuming from {ckpt_dir}: epoch {state.epoch + 1}, step {state.global_step}")
    tracker = tracker or Tracker()  # TensorBoard/MLflow, or nothing
    tracker.begin(state.global_step, state.statistics, task.unit)

    def save() -> None:
        rng = every_process_random_states(accelerator)  # each process draws its own dropout masks
        # a sharded model's weights and optimizer state are gathered by every process; the main process writes them
        gathers = ckpt_dir is not None and (accelerator.is_main_process or shards is not None or deepspeed)
        weights = state_of(unwrapped) if gathers else None
        if not gathers:
            optimizer_state = None
        elif shards is not None:
            optimizer_state = sharding.optimizer_state(unwrapped, optimizer)
        elif deepspeed:
            optimizer_state = zero.optimizer_state(unwrapped, optimizer, template)
        else:
            optimizer_state = optimizer.state_dict()
        if ckpt_dir and accelerator.is_main_process:
            tracker.flush()  # what was logged up to the checkpoint is on disk before it
            save_checkpoint(ckpt_dir, weights, optimizer_state, scheduler, asdict(state), best_weights,
                            state.best_step == state.global_step, rng, fingerprints)
        accelerator.wait_for_everyone()

    def stop_if_asked(stop) -> None:
        """At a step boundary: if SIGTERM/SIGINT asked to stop, save a checkpoint and stop."""
        signum = agreed_signal(stop, accelerator)
        if signum:
            save()
            raise TrainingInterrupted(signum, ckpt_dir)

    def evaluate_and_track(epoch: int, say: Callable) -> tuple[Optional[dict], bool]:
        """A validation round: update the best-so-far and the plateau/early-stop counters."""
        nonlocal best_weights
        metrics, improved = validation_round(model, task, cfg, state, epoch, autocast)
        if improved and metrics:
            best_weights = state_of(unwrapped)
        reduce_on_plateau(cfg, state, say)
        state.stopped_early = cfg.early_stop > 0 and state.evaluations_since_best >= cfg.early_stop
        return metrics, improved

    started, totals = time.perf_counter(), Throughput()
    # the thread count follows other processes' load between steps; back to its start value when the run ends
    with stop_on_signals(ckpt_dir) as stop, follow_load(log) as threads:
        if saved:  # last before the first step: from here on, draws happen exactly as in the uninterrupted run
            restore_random_states(saved.rng[accelerator.process_index])
        while state.epoch < cfg.epochs and not state.done:
            epoch = state.epoch
            model.train()
            if state.step_in_epoch == 0:
                state.epoch_loss = state.epoch_weight = 0.0
            session = Throughput()  # what this process trained of this epoch, for the throughput line
            groups = micro_batch_groups(task.batches(epoch), plan.accumulation, accelerator.process_index, world,
                                        task.num_batches)
            bar = tqdm(total=plan.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not accelerator.is_local_main_process, leave=False, dynamic_ncols=True)
            # above the bar, once (tqdm.write prints on the disabled bars of the other processes too)
            say = bar.write if accelerator.is_main_process else lambda _: None
            with bar:  # closed (and cleared) however the epoch ends, an interruption included
                for group in islice(groups, state.step_in_epoch, None):  # resumed mid-epoch: skip the steps taken
                    if state.stopped_early or state.global_step >= plan.total_steps:
                        break
                    stop_if_asked(stop)
                    # one optimizer step: accumulate over the effective batch, clip, step
                    loss_sum, weight, total_weight, tokens = accumulate_gradients(accelerator, model, task, group,
                                                                                  autocast, world)
                    if cfg.regularization_lambda and cfg.regularization_type in ("l1", "l1_l2"):
                        add_l1_gradient(trainable, cfg.regularization_lambda)
                    clip_gradients(accelerator, model, cfg)
                    lr = scheduler.get_last_lr()[0]  # the rate this step uses
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    threads.tick()

                    state.count_step(loss_sum, total_weight)
                    session.add(weight, tokens)
                    totals.add(total_weight, tokens * world)
                    tracker.log_step(state.global_step, loss=loss_sum / max(total_weight, 1.0), learning_rate=lr,
                                     units=total_weight, tokens=tokens * world)
                    # shown at the bar's next timed refresh: a redraw at every step (a terminal write, ~1 ms) was on
                    # the order of a whole step of a head on cached embeddings
                    bar.set_postfix(loss=f"{state.epoch_loss / max(state.epoch_weight, 1):.4f}",
                                    lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
                    bar.update(1)
                    epoch_done = state.step_in_epoch >= plan.steps_per_epoch or state.global_step >= plan.total_steps
                    if cfg.eval_steps and state.global_step % cfg.eval_steps == 0 and not epoch_done:
                        metrics, _ = evaluate_and_track(epoch, say)
                        if metrics:
                            state.statistics["validation_steps"].append({"epoch": epoch + 1, "step": state.global_step,
                                                                         **metrics})
                            tracker.log_validation(state.global_step, metrics)
                            say(f"step {state.global_step}: validation {summary_metric(metrics, cfg)}")
                    if checkpoint_due(cfg, plan, state) and not (epoch_done and cfg.checkpoints_per_epoch):
                        save()
            stop_if_asked(stop)  # every step of the epoch taken: a resumed run starts with the epoch's end

            # ---- epoch end: training figures, validation, best weights, plateau, early stopping, checkpoint
            session.stop()
            totals.seconds += session.seconds
            if peak:  # again if the epoch ran faster than the first reading
                reached = task.flops_per_unit * session.units / max(session.seconds, 1e-9)
                with phase("measure peak"):
                    peak = peak_flops(precision.bf16, reached=reached)
            train_stats = epoch_statistics(state, session, task, world, peak)
            line = f"epoch {epoch + 1}: train loss {train_stats['loss']:.4f}, {describe_rate(train_stats, task, peak)}"
            if cfg.evaluate_training_set and task.evaluate_training and not cfg.skip_all_evaluation:
                train_stats["metrics"] = evaluate(model, task.evaluate_training, autocast)
                line += f", training set {summary_metric(train_stats['metrics'], cfg)}"
            state.statistics["training"].append(train_stats)
            metrics, improved = evaluate_and_track(epoch, log)
            if metrics:
                state.statistics["validation"].append(metrics)
                line += f", validation {summary_metric(metrics, cfg)}"
            log(line + ("" if improved else f" (best: epoch {state.best_epoch}, step {state.best_step})"))
            tracker.log_epoch(epoch + 1, state.global_step, train_stats, metrics, scheduler.get_last_lr()[0])
            state.epoch += 1
            state.step_in_epoch = 0
            state.done = state.stopped_early or state.global_step >= plan.total_steps
            if cfg.checkpoints_per_epoch:
                save()
            if state.stopped_early:
                log(f"early stop: no improvement in {cfg.early_stop} evaluations")

    # ---- finish: the best weights back in the model; a sharded run's gathered into the model it was given
    if shards is not None or deepspeed:
        weights = best_weights if best_weights is not None else state_of(unwrapped)
        if deepspeed:
            model.destroy()  # DeepSpeed's hooks and buffers on the partitioned copy
        del model, unwrapped, optimizer  # the shards, before the whole model moves to the device
        given.load_state_dict(weights, strict=False)
        try:
            given.to(accelerator.device)
        except torch.OutOfMemoryError:  # trained sharded because it does not fit one GPU: it stays in CPU memory
            given.to("cpu")
            log(f"the trained model does not fit on {accelerator.device} alone: it stays in CPU memory")
    elif best_weights is not None:
        unwrapped.load_state_dict({k: v.to(accelerator.device) for k, v in best_weights.items()}, strict=False)
    return TrainResult(statistics=state.statistics, best_epoch=state.best_epoch, best_step=state.best_step,
                       best_value=state.best_value, steps=state.global_step, stopped_early=state.stopped_early,
                       seconds=time.perf_counter() - started,
                       # with torch's mean intra-op thread count over the epochs (it follows the load)
                       throughput={**totals.summary(task, peak), "threads": threads.threads_used()})


# =========================================================================================== builders and steps
def build_optimizer(params, cfg: TrainerConfig, world: int = 1,
                    lr_ratios: Optional[list[float]] = None) -> torch.optim.Optimizer:
    """`lr_ratios` (one per parameter; LoRA+) splits the parameters into groups learning at lr x ratio."""
    o = cfg.optimizer
    l2 = cfg.regularization_lambda if cfg.regularization_type in ("l2", "l1_l2") else 0.0
    decay = o.weight_decay + l2
    lr = scaled_learning_rate(cfg, world)
    if lr_ratios is not None:
        params = lr_ratio_groups(list(params), lr_ratios, lr)
    if o.type == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=decay)
    cls = torch.optim.AdamW if o.type == "adamw" else torch.optim.Adam
    # torch's fused Adam(W) updates each tensor in one pass instead of ~10 elementwise ops: 5x faster steps for a
    # full fine-tuning of 135M parameters on a CPU (0.06 vs 0.32 s); kept to one process (sharded parameters of
    # FSDP/DeepSpeed are the engines' business)
    return cls(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=decay, fused=world == 1 or None)


def lr_ratio_groups(params: list, ratios: list[float], lr: float) -> list[dict]:
    # the ratio-1 group first: the loop logs the first group's rate as the run's learning rate
    order = sorted(set(ratios), key=lambda r: (r != 1.0, r))
    return [{"params": [p for p, q in zip(params, ratios) if q == r], "lr": lr * r} for r in order]


def scaled_learning_rate(cfg: TrainerConfig, world: int) -> float:
    """Ludwig's learning_rate_scaling: with `world` processes the effective batch is `world` times larger."""
    factor = {"linear": world, "sqrt": math.sqrt(world)}.get(cfg.learning_rate_scaling or "constant", 1.0)
    return cfg.learning_rate * factor


def build_scheduler(optimizer, cfg: TrainerConfig, plan: StepPlan, plateau: Callable[[], float]):
    """Warm-up then decay, times the reduce_on_plateau factor (read at each step, as it changes during the run)."""
    schedule = lr_schedule(cfg, plan.total_steps, plan.steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) * plateau())


def lr_schedule(cfg: TrainerConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
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


def micro_batch_groups(batches: Iterable, accumulation: int, rank: int, world: int, num_batches: int):
    """This rank's micro-batches, `accumulation` at a time: one group per optimizer step."""
    group = []
    for batch in _shard(batches, num_batches, rank, world):
        group.append(batch)
        if len(group) == accumulation:
            yield group
            group = []
    if group:
        yield group


@dataclass(frozen=True)
class Repeated:
    """A micro-batch a rank runs again only to keep in step with the others: its loss and rows count zero."""

    batch: Any


def _shard(batches: Iterable, num_batches: int, rank: int, world: int):
    """Every rank must run the same number of micro-batches (or a collective — the gradient all-reduce, FSDP's
    all-gathers — waits forever), so a rank left short re-runs one of the first batches, as Accelerate's
    even_batches does; unlike even_batches, the re-run counts nothing, so the step equals the single-process one."""
    head, taken = [], 0
    for k, batch in enumerate(batches):
        if k < world:
            head.append(batch)
        if k % world == rank:
            taken += 1
            yield batch
    while world > 1 and taken < math.ceil(num_batches / world):
        taken += 1
        yield Repeated(head[rank % len(head)])


def accumulate_gradients(accelerator: Accelerator, model, task: TrainTask, group: list, autocast: Callable,
                         world: int) -> tuple[float, float, float, int]:
    """Backward over one effective batch, each micro-batch's summed loss divided by the total weight of the whole
    effective batch on all processes. Returns (loss sum over all processes, this process's weight, total weight,
    this process's tokens)."""
    deepspeed = zero.is_engine(model)
    weight = float(sum(task.weight(b) for b in group if not isinstance(b, Repeated)))
    total = torch.tensor(weight, device=accelerator.device)
    if world > 1:
        total = accelerator.reduce(total, "sum")
    loss_sum, tokens = 0.0, 0
    for j, item in enumerate(group):
        counts = 0.0 if isinstance(item, Repeated) else 1.0
        batch = item.batch if isinstance(item, Repeated) else item
        # gradients are all-reduced once, with the last micro-batch; DDP averages them over processes, hence * world
        last = j == len(group) - 1
        sync = contextlib.nullcontext() if last or deepspeed else accelerator.no_sync(model)
        with sync, autocast():
            loss = task.loss_sum(model, batch)
        scaled = loss * (counts * world) / total.clamp_min(1.0)
        if deepspeed:  # the engine reduces, clips and steps at the last micro-batch (optimizer.step() is then a no-op)
            zero.backward(model, scaled, last)
        else:
            accelerator.backward(scaled)
        loss_sum += counts * float(loss.detach())
        tokens += int(counts) * task.tokens(batch) if task.tokens else 0
    if world > 1:  # the step's loss over every rank's rows, as one process would report it
        loss_sum = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum"))
    return loss_sum, weight, float(total), tokens


def add_l1_gradient(params: list[torch.Tensor], strength: float) -> None:
    """The (sub)gradient of strength * sum |w|, added once per optimizer step."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.add_(torch.sign(p), alpha=strength)


def clip_gradients(accelerator: Accelerator, model, cfg: TrainerConfig) -> None:
    if zero.is_engine(model):  # DeepSpeed clipped (by norm) in its own step, inside the last backward
        return
    c = cfg.gradient_clipping
    if c.clipvalue:
        accelerator.clip_grad_value_(model.parameters(), c.clipvalue)
    norm = c.clipglobalnorm or c.clipnorm
    if norm:
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], norm)


def checkpoint_due(cfg: TrainerConfig, plan: StepPlan, state: TrainState) -> bool:
    """After this step? Every steps_per_checkpoint steps, or checkpoints_per_epoch > 1 spread over each epoch."""
    every = cfg.steps_per_checkpoint
    if not every and cfg.checkpoints_per_epoch > 1:
        every = max(1, plan.steps_per_epoch // cfg.checkpoints_per_epoch)
    return bool(every) and state.global_step % every == 0


def every_process_random_states(accelerator: Accelerator) -> list[dict]:
    """`random_states()` of every process, in rank order (the main process writes them all)."""
    if accelerator.num_processes == 1:
        return [random_states()]
    from accelerate.utils import gather_object

    return gather_object([random_states()])


def agreed_signal(stop, accelerator: Accelerator) -> Optional[int]:
    """The signal that asked the run to stop, if any; with several processes, any process's, so that all stop at
    the same step (a process that went on alone would wait forever in the next gradient all-reduce)."""
    if accelerator.num_processes == 1:
        return stop.signum
    asked = accelerator.gather(torch.tensor([stop.signum or 0], device=accelerator.device))
    return int(asked.max()) or None


# ================================================================================================== evaluation
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP or DeepSpeed's engine. (Accelerate's unwrap_model would import DeepSpeed, ~1 s, in every
    run of a process where DeepSpeed is installed, to check for its engine.)"""
    wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel) or zero.is_engine(model)
    return model.module if wrapped else model


def evaluate(model, evaluate_fn: Callable, autocast: Callable) -> dict:
    model.eval()
    with phase("evaluation"), torch.no_grad(), autocast():
        metrics = evaluate_fn(unwrap(model))
    model.train()
    return metrics


def validation_round(model, task: TrainTask, cfg: TrainerConfig, state: TrainState, epoch: int,
                     autocast: Callable) -> tuple[Optional[dict], bool]:
    """Evaluate on the validation split (if any) and track the best value: (metrics or None, improved).
    Without validation every round counts as an improvement: the last weights are the ones kept."""
    metrics, improved = None, True
    if task.evaluate and not cfg.skip_all_evaluation:
        metrics = evaluate(model, task.evaluate, autocast)
        if metrics:
            value, _, metric = watched(metrics, cfg)
            improved = is_better(metric, value, state.best_value)
            if improved:
                state.best_value = value
    if improved:
        state.evaluations_since_best = 0
        state.best_epoch, state.best_step = epoch + 1, state.global_step
    else:
        state.evaluations_since_best += 1
    return metrics, improved


def reduce_on_plateau(cfg: TrainerConfig, state: TrainState, log: Callable) -> None:
    patience = cfg.learning_rate_scheduler.reduce_on_plateau
    if patience and state.evaluations_since_best and state.evaluations_since_best % patience == 0:
        state.lr_factor *= cfg.learning_rate_scheduler.reduce_rate
        log(f"no improvement in {state.evaluations_since_best} evaluations: learning rate x{state.lr_factor:.3g}")


def watched(metrics: dict, cfg: TrainerConfig) -> tuple[float, str, str]:
    """(value, field, metric) of trainer.validation_field / validation_metric in one round's metrics."""
    field_name = cfg.validation_field or "combined"
    metric = cfg.validation_metric or "loss"
    values = metrics.get(field_name, {})
    if metric not in values:
        raise KeyError(f"trainer.validation_metric {metric!r} is not computed for {field_name!r}; "
                       f"available: {sorted(values)}")
    return float(values[metric]), field_name, metric


def summary_metric(metrics: dict, cfg: TrainerConfig) -> str:
    value, field_name, metric = watched(metrics, cfg)
    return f"{field_name}.{metric} {value:.4f}"


# ================================================================================================== throughput
@dataclass
class Throughput:
    """Units (rows or target tokens) and tokens trained, and the seconds it took."""

    units: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, units: float, tokens: float) -> None:
        self.units += units
        self.tokens += tokens

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.started

    def summary(self, task: TrainTask, peak: Optional[float]) -> dict:
        """The whole run's rates (all processes)."""
        if self.seconds <= 0:
            return {}
        out = {f"{task.unit}_per_second": self.units / self.seconds}
        if self.tokens:
            out["tokens_per_second"] = self.tokens / self.seconds
        if task.flops_per_unit and peak:
            out["mfu"] = task.flops_per_unit * self.units / self.seconds / peak
            out["peak_tflops"] = peak / 1e12
        return out


def epoch_statistics(state: TrainState, session: Throughput, task: TrainTask, world: int,
                     peak: Optional[float]) -> dict:
    """The epoch's entry in statistics["training"]: mean loss over the whole epoch, rates of this session."""
    seconds = max(session.seconds, 1e-9)
    stats = {"loss": state.epoch_loss / max(state.epoch_weight, 1.0), "seconds": session.seconds,
             f"{task.unit}_per_second": session.units * world / seconds}
    if session.tokens:
        stats["tokens_per_second"] = session.tokens * world / seconds
    if task.flops_per_unit and peak:
        stats["mfu"] = task.flops_per_unit * session.units / seconds / peak  # per device
    return stats


def describe_rate(stats: dict, task: TrainTask, peak: Optional[float]) -> str:
    rate = f"{stats[f'{task.unit}_per_second']:.1f} {task.unit}/s"
    if "tokens_per_second" in stats:
        rate = f"{stats['tokens_per_second']:.1f} tokens/s ({rate})"
    if "mfu" in stats:
        rate += f", MFU {100 * stats['mfu']:.1f}% of {peak / 1e12:.2f} TFLOPS"
    return rate
