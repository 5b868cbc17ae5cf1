"""How the processes of a distributed run share the work: the config's `backend:` section as Accelerator arguments.

`local` and `ddp` keep a whole model in every process and average gradients (DistributedDataParallel); `fsdp` would
shard parameters, gradients and optimizer state (FSDP2, torch's `fully_shard`) and `deepspeed` hand the model to
DeepSpeed ZeRO: both validate and map to Accelerate's plugins, and are refused at the start of a multi-process run
with the reason (`check_runnable`). With one process every type trains the plain model. See docs/distributed.md.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ..config.schema import BackendConfig, DdpOptions, DeepSpeedOptions, FsdpOptions
from ..device import is_cuda
from ..errors import HardwareError

__all__ = ["accelerator_options", "check_launch", "check_runnable", "fsdp_plugin", "deepspeed_plugin",
           "layer_class_names"]


def accelerator_options(backend: Optional[BackendConfig], model: torch.nn.Module, world: int, *,
                        accumulation: int = 1, micro_batch_rows: Optional[int] = None,
                        clip_norm: Optional[float] = None) -> dict:
    """Keyword arguments for `Accelerator(...)`: the plugin or DDP settings of `backend` for `model`."""
    kind = backend.type if backend is not None else "local"
    if world == 1 or kind == "local":
        return {}
    check_runnable(kind)
    if kind == "ddp":
        return {"kwargs_handlers": [ddp_kwargs(backend.ddp or DdpOptions())]}
    if kind == "fsdp":
        return {"fsdp_plugin": fsdp_plugin(backend.fsdp or FsdpOptions(), model)}
    return {"deepspeed_plugin": deepspeed_plugin(backend.deepspeed or DeepSpeedOptions(), accumulation,
                                                 micro_batch_rows, clip_norm)}


def check_runnable(kind: str) -> None:
    """fsdp and deepspeed are refused until the loop can write what they shard. Under FSDP2 every process holds a
    shard of each weight (DTensor) and a forward needs all processes (measured: a forward on rank 0 alone waits
    forever), so checkpoints, best weights and the model folder, written by the main process from the module, would
    need the weights gathered first; ZeRO shards the optimizer state the same way. The plugins below are what
    these types map to once that is done."""
    if kind not in ("fsdp", "deepspeed"):
        return
    if not is_cuda():
        raise HardwareError(f"backend.type: {kind} shards a model over CUDA GPUs; Accelerate applies it only to GPU "
                            "processes (on CPU processes it quietly runs DDP). On CPUs use backend.type: ddp")
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise HardwareError("backend.type: deepspeed needs the deepspeed package: pip install deepspeed (it builds "
                            "its kernels against the installed torch and CUDA)")
    raise HardwareError(f"backend.type: {kind} is not supported by Cadenza's training loop yet: its checkpoints and "
                        "model folder are written from unsharded weights. Use backend.type: ddp (every GPU holds the "
                        "whole model) or QLoRA to fit a large model; see docs/distributed.md")


def check_launch(distributed_type) -> None:
    """`accelerate launch --use_fsdp` / `--use_deepspeed` turn sharding on through the environment: same refusal."""
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        check_runnable("fsdp" if distributed_type == DistributedType.FSDP else "deepspeed")


def ddp_kwargs(options: DdpOptions):
    from accelerate.utils import DistributedDataParallelKwargs

    extra = {"bucket_cap_mb": int(options.bucket_cap_mb)} if options.bucket_cap_mb else {}
    return DistributedDataParallelKwargs(find_unused_parameters=options.find_unused_parameters, **extra)


def fsdp_plugin(options: FsdpOptions, model: torch.nn.Module):
    """FSDP2 with every setting given, so that no FSDP_* environment variable of the launcher changes it silently."""
    from accelerate import FullyShardedDataParallelPlugin

    wrap = {"transformer": "TRANSFORMER_BASED_WRAP", "size": "SIZE_BASED_WRAP", "none": "NO_WRAP"}[options.auto_wrap]
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=options.reshard_after_forward, auto_wrap_policy=wrap,
        # the model handed to the loop wraps the transformers model (a loss module, a PEFT model, an ecd network),
        # so Accelerate would not find `_no_split_modules` on it: name the layer classes of every part
        transformer_cls_names_to_wrap=layer_class_names(model) if options.auto_wrap == "transformer" else None,
        min_num_params=options.min_num_params if options.auto_wrap == "size" else None,
        cpu_offload=options.cpu_offload, activation_checkpointing=options.activation_checkpointing,
        state_dict_type="FULL_STATE_DICT")


def layer_class_names(model: torch.nn.Module) -> list[str]:
    """The transformer layer classes (transformers' `_no_split_modules`) of every pretrained model inside `model`."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or []:
            if name not in names and any(type(m).__name__ == name for m in model.modules()):
                names.append(name)
    return names


def deepspeed_plugin(options: DeepSpeedOptions, accumulation: int, micro_batch_rows: Optional[int],
                     clip_norm: Optional[float]):
    """ZeRO with the run's accumulation and clipping (DeepSpeed applies both itself); needs the deepspeed package."""
    from accelerate import DeepSpeedPlugin

    if options.config_file:
        plugin = DeepSpeedPlugin(hf_ds_config=options.config_file, gradient_accumulation_steps=accumulation)
    else:
        plugin = DeepSpeedPlugin(zero_stage=options.zero_stage, gradient_accumulation_steps=accumulation,
                                 gradient_clipping=clip_norm or 0.0,
                                 offload_optimizer_device=options.offload_optimizer_device,
                                 offload_param_device=options.offload_param_device, zero3_init_flag=False)
    # Accelerate reads the micro-batch size off prepared data loaders; the loop feeds its own batches
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_rows or 1
    return plugin
