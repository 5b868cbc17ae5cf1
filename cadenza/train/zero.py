"""DeepSpeed ZeRO (`backend.type: deepspeed`): optimizer state (stage 1), gradients (2) and parameters (3)
partitioned over the processes by DeepSpeed's engine, built here with `deepspeed.initialize` in the process group
the launcher started (Accelerate's DeepSpeed plugin applies to GPU processes only). On CPU processes DeepSpeed runs on
its CPU accelerator over gloo, so the tests run this path on two CPU processes.

As with FSDP2 (`cadenza.train.sharding`), the engine trains a *copy* of the model and the caller's module receives
the trained weights at the end; checkpoints hold gathered weights and a per-parameter optimizer state in torch's
own `Optimizer.state_dict()` layout, so every file is the one a single process writes. What goes through the engine
here is DeepSpeed's public API: `engine.backward` / `engine.step` with the accumulation boundary, the
`GatheredParameters` context and the `safe_get/set_*_optimizer_state` tensor-fragment functions; a resumed engine's
empty optimizer state is filled in before its first step (`link_fresh_state`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ..config.schema import DeepSpeedOptions, TrainerConfig
from ..errors import ConfigError

__all__ = ["engine_config", "initialize", "is_engine", "backward", "gathered", "optimizer_state", "load_optimizer_state"]

# ZeRO-3's default memory_efficient_linear swaps torch.nn.functional.linear for its own and never swaps it back, so
# every later model trained or used in the process would run through it: off (stage 3 re-gathers weights for the
# backward either way)
KEEP_TORCH_LINEAR = {"memory_efficient_linear": False}


def engine_config(options: DeepSpeedOptions, cfg: TrainerConfig, accumulation: int,
                  micro_batch_rows: Optional[int]) -> dict:
    """DeepSpeed's JSON config: ZeRO from `backend.deepspeed` (or its config_file), the batch arithmetic and clipping
    from the trainer. Precision stays the trainer's (fp32 weights, bf16 autocast where chosen), so a file that turns
    DeepSpeed's own fp16/bf16 on is refused, as is one whose batch keys contradict the trainer's. The engine steps
    inside the backward of an optimizer step's last micro-batch, so nothing can act on the gradients between the
    two: clipping by value and l1 regularization (which add to the gradients) are refused."""
    if cfg.gradient_clipping.clipvalue:
        raise ConfigError([("trainer.gradient_clipping.clipvalue", "not available with backend.type: deepspeed "
                            "(DeepSpeed clips by norm only): use clipglobalnorm, or backend.type: fsdp / ddp")])
    if cfg.regularization_lambda and cfg.regularization_type in ("l1", "l1_l2"):
        raise ConfigError([("trainer.regularization_type", f"{cfg.regularization_type} is not available with "
                            "backend.type: deepspeed (its optimizer step leaves no room to add the l1 gradient): "
                            "use l2, or backend.type: fsdp / ddp")])
    clip = cfg.gradient_clipping.clipglobalnorm or cfg.gradient_clipping.clipnorm
    loop = {"train_micro_batch_size_per_gpu": micro_batch_rows or 1, "gradient_accumulation_steps": accumulation,
            "gradient_clipping": float(clip or 0.0)}
    # DeepSpeed lists only Adam-like optimizers as tested with ZeRO; what partitioning needs is a state kept element
    # by element, which every trainer.optimizer (sgd, adam, adamw) has (the tests run sgd and adamw)
    ours = {**loop, "zero_allow_untested_optimizer": True}
    if not options.config_file:
        zero = {"stage": options.zero_stage, **KEEP_TORCH_LINEAR}
        if options.offload_optimizer_device != "none":
            zero["offload_optimizer"] = {"device": options.offload_optimizer_device}
        if options.offload_param_device != "none":
            zero["offload_param"] = {"device": options.offload_param_device}
        return {**ours, "zero_optimization": zero}
    where = "backend.deepspeed.config_file"
    try:
        config = json.loads(Path(options.config_file).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError([(where, f"{options.config_file} cannot be read as JSON: {e}")]) from None
    if not isinstance(config, dict):
        raise ConfigError([(where, f"{options.config_file} holds no JSON object")])
    for key, owner in (("optimizer", "trainer.optimizer"), ("scheduler", "trainer.learning_rate_scheduler")):
        if key in config:
            raise ConfigError([(where, f"{options.config_file}: its {key} section would replace {owner}; "
                                "remove the section")])
    for key in ("fp16", "bf16"):
        if (config.get(key) or {}).get("enabled") not in (None, False, "auto"):
            raise ConfigError([(where, f"{options.config_file} turns {key}.enabled on: precision is "
                                f"trainer.use_mixed_precision's (bf16 autocast over fp32 weights); remove the {key} "
                                "section")])
    for key, value in loop.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ConfigError([(where, f"{options.config_file} sets {key}: {config[key]} but the trainer's settings "
                                f"give {value}; set it to \"auto\" or remove it")])
    zero = config.get("zero_optimization") or {}
    if zero.get("memory_efficient_linear") is True:
        raise ConfigError([(where, f"{options.config_file} sets zero_optimization.memory_efficient_linear: true, "
                            "which replaces torch.nn.functional.linear for the rest of the process (DeepSpeed never "
                            "puts it back): every later run in it would use ZeRO-3's linear; remove the key")])
    config.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch x accumulation x processes
    # "auto" is Accelerate's word for "fill in from the model"; DeepSpeed itself does not read it: its defaults apply
    return {**without_auto(config), "zero_optimization": {**without_auto(zero), **KEEP_TORCH_LINEAR}, **ours}


def without_auto(config: dict) -> dict:
    """`config` without its "auto" entries, at every depth."""
    return {k: without_auto(v) if isinstance(v, dict) else v for k, v in config.items() if v != "auto"}


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """DeepSpeed's engine around `model` and ZeRO's optimizer around `optimizer`, joining the process group torchrun /
    Accelerate started. The optimizer comes back as `SteppedByEngine`."""
    import deepspeed

    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                        dist_init_required=False)
    return engine, SteppedByEngine(zero_optimizer)


class SteppedByEngine(torch.optim.Optimizer):
    """The engine's optimizer as the loop sees it: the engine steps it and zeroes the gradients inside `backward`, so
    step() and zero_grad() do nothing here and the loop's recipe stays the same for every backend; the learning-rate
    scheduler sets the rates of its parameter groups. `base` is the torch optimizer that does the arithmetic: over
    this process's flat partitions under ZeRO (stages 1-3), over the parameters themselves at stage 0.
    (No Optimizer.__init__: it holds no parameters of its own.)"""

    def __init__(self, engine_optimizer) -> None:
        self.optimizer = engine_optimizer
        self.partitioned = hasattr(engine_optimizer, "optimizer")  # ZeRO's optimizer wraps the torch one
        self.base = engine_optimizer.optimizer if self.partitioned else engine_optimizer
        self.defaults = self.base.defaults

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.base.state

    def step(self, closure=None) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


def is_engine(model) -> bool:
    """Whether `model` is a DeepSpeed engine (without importing DeepSpeed where no run has)."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward; the last of an optimizer step reduces the gradients, clips them and steps (the
    engine does all three). The loss is already divided by the whole effective batch's weight, so DeepSpeed's own
    division by the accumulation steps is turned off."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)
    if last:
        engine.step()


def gathered(module: torch.nn.Module):
    """A context in which every parameter of `module` is whole on every process (ZeRO-3 partitions them; stages 1
    and 2 keep them whole and this does nothing). Collective: every process enters it."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def optimizer_state(module: torch.nn.Module, optimizer: SteppedByEngine, template: dict) -> dict:
    """The optimizer state in `torch.optim.Optimizer.state_dict()`'s layout, the partitions gathered: per-parameter
    states keyed by index, in the order of `template` (the optimizer's own state_dict before the engine took it).
    Collective."""
    if not optimizer.partitioned:  # stage 0: the optimizer holds the whole state, copied like the gathered one
        return copy.deepcopy(optimizer.base.state_dict())
    from deepspeed.utils import safe_get_full_optimizer_state

    tensors, scalars = state_entries(optimizer)
    state = {}
    for index, param in enumerate(trained_parameters(module) if tensors else []):  # no state before the first step
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape  # ZeRO-3 keeps the whole shape aside
        state[index] = {**{k: safe_get_full_optimizer_state(param, k).detach().to("cpu").reshape(shape)
                           for k in tensors}, **{k: v.detach().to("cpu", copy=True) for k, v in scalars.items()}}
    groups = [{**{k: v for k, v in live.items() if k != "params"}, "params": saved["params"]}
              for live, saved in zip(optimizer.param_groups, template["param_groups"])]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(module: torch.nn.Module, optimizer: SteppedByEngine, saved: dict) -> None:
    """`optimizer_state`'s dict back into the engine's partitions (each process keeps its part). Collective."""
    if not optimizer.partitioned:
        optimizer.base.load_state_dict(saved)
        return
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    for live, group in zip(optimizer.param_groups, saved["param_groups"]):
        live.update({k: v for k, v in group.items() if k != "params"})
    if not saved["state"]:
        return
    params = trained_parameters(module)
    # torch's optimizers keep one scalar, the step count (Adam, AdamW; SGD none); the rest is per element (by name,
    # not by shape: a 0-dimensional parameter's moments are 0-dimensional too)
    first = saved["state"][0]
    tensors = [k for k in first if k != "step"]
    link_fresh_state(optimizer, tensors, {k: v for k, v in first.items() if k == "step"})
    for index, param in enumerate(params):
        for key in tensors:
            value = saved["state"][index][key].reshape(-1).to(torch.float32)
            if hasattr(param, "ds_tensor"):
                # ZeRO-3: this process's slice, set directly (DeepSpeed 0.19's full-tensor setter reads past the end
                # of a tensor whose size the processes do not divide, such as a 1-element bias)
                safe_set_local_optimizer_state(param, local_slice(value, param.ds_tensor.numel()), key)
            else:
                safe_set_full_optimizer_state(param, value, key)


def local_slice(flat: torch.Tensor, size: int) -> torch.Tensor:
    """This process's part of a ZeRO-3 partitioned tensor: `size` elements at rank x size, the last part padded."""
    start = torch.distributed.get_rank() * size
    part = flat[start:start + size]
    return torch.nn.functional.pad(part, (0, size - part.numel()))


def trained_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """In the order torch's optimizer state_dict numbers them: the optimizer was built from this list."""
    return [p for p in module.parameters() if p.requires_grad]


def state_entries(optimizer: SteppedByEngine) -> tuple[list[str], dict[str, torch.Tensor]]:
    """What the base optimizer keeps per flat partition (a 1-dimensional tensor, so the two kinds cannot be confused):
    the names of its per-element tensors (exp_avg, exp_avg_sq, momentum_buffer, ...) and its scalars (Adam's step
    count, the same in every partition)."""
    for flat in flat_partitions(optimizer.optimizer):
        entries = optimizer.base.state.get(flat)
        if entries:
            return ([k for k, v in entries.items() if torch.is_tensor(v) and v.shape == flat.shape],
                    {k: v for k, v in entries.items() if torch.is_tensor(v) and v.dim() == 0})
    return [], {}


def flat_partitions(zero) -> list[torch.Tensor]:
    """This process's flat fp32 partitions, which key the base optimizer's state. Stage 3 hands each to the base
    optimizer only for the duration of its step, so its param_groups are empty in between."""
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is None:  # stages 1 and 2
        flats = zero.single_partition_of_fp32_groups
    return list(flats)


def link_fresh_state(optimizer: SteppedByEngine, tensors: list[str], scalars: dict[str, torch.Tensor]) -> None:
    """Before its first step a resumed engine has no optimizer state to write into: give each flat partition zeroed
    entries and the saved scalars. Stage 3 reads them from the base optimizer when asked; stages 1 and 2 link each
    parameter's fragment of them after the first step, which is done here instead."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = optimizer.optimizer
    for flat in flat_partitions(zero):
        optimizer.base.state[flat] = {**{k: v.clone() for k, v in scalars.items()},
                                      **{k: torch.zeros_like(flat) for k in tensors}}
    if hasattr(zero, "single_partition_of_fp32_groups"):  # stages 1 and 2
        for lp_params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp_params, flat, optimizer.base.state)
