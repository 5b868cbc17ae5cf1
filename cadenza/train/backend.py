"""How the processes of a distributed run share the work: the config's `backend:` section.

`local` and `ddp` keep a whole model in every process and average gradients (DistributedDataParallel, through
Accelerate); `fsdp` shards parameters, gradients and optimizer state (FSDP2: `cadenza.train.sharding`, torch's
`fully_shard`, on CPU and GPU processes alike); `deepspeed` maps to Accelerate's DeepSpeedPlugin (ZeRO) and is refused
at the start of a multi-process run with the reason (`check_runnable`). With one process every type trains the plain
model. See docs/distributed.md.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ..config.schema import BackendConfig, DdpOptions, DeepSpeedOptions, FsdpOptions
from ..device import is_cuda
from ..errors import HardwareError

__all__ = ["accelerator_options", "check_launch", "check_runnable", "deepspeed_plugin", "sharding_options"]


def accelerator_options(backend: Optional[BackendConfig], model: torch.nn.Module, world: int, *,
                        accumulation: int = 1, micro_batch_rows: Optional[int] = None,
                        clip_norm: Optional[float] = None) -> dict:
    """Keyword arguments for `Accelerator(...)`: the DDP settings or DeepSpeed plugin of `backend` (fsdp: none, the
    loop shards the model itself)."""
    kind = backend.type if backend is not None else "local"
    if world == 1 or kind in ("local", "fsdp"):
        return {}
    check_runnable(kind)
    if kind == "ddp":
        return {"kwargs_handlers": [ddp_kwargs(backend.ddp or DdpOptions())]}
    return {"deepspeed_plugin": deepspeed_plugin(backend.deepspeed or DeepSpeedOptions(), accumulation,
                                                 micro_batch_rows, clip_norm)}


def sharding_options(backend: Optional[BackendConfig], world: int) -> Optional[FsdpOptions]:
    """The FSDP2 settings when this run shards its model (type fsdp with more than one process), else None."""
    if world == 1 or backend is None or backend.type != "fsdp":
        return None
    options = backend.fsdp or FsdpOptions()
    if options.cpu_offload and not is_cuda():
        raise HardwareError("backend.fsdp.cpu_offload: true keeps the shards in CPU memory for GPU processes; these "
                            "processes run on CPUs, where everything is in CPU memory already: remove cpu_offload")
    return options


def check_runnable(kind: str) -> None:
    """deepspeed is refused until the loop can write what ZeRO shards: checkpoints, best weights and the model
    folder are written from whole weights and optimizer state, which DeepSpeed's engine would have to gather through
    its own API (`cadenza.train.sharding` does that for FSDP2). The plugin below is what the type maps to."""
    if kind != "deepspeed":
        return
    if not is_cuda():
        raise HardwareError("backend.type: deepspeed needs CUDA GPUs (DeepSpeed's kernels); on CPUs use "
                            "backend.type: fsdp (sharded) or ddp")
    if importlib.util.find_spec("deepspeed") is None:
        raise HardwareError("backend.type: deepspeed needs the deepspeed package: pip install deepspeed (it builds "
                            "its kernels against the installed torch and CUDA)")
    raise HardwareError("backend.type: deepspeed is not supported by Cadenza's training loop yet: its checkpoints and "
                        "model folder are written from whole weights. Use backend.type: fsdp (FSDP2 shards "
                        "parameters, gradients and optimizer state like ZeRO-3); see docs/distributed.md")


def check_launch(distributed_type) -> None:
    """`accelerate launch --use_fsdp` / `--use_deepspeed` turn Accelerate's own sharding on through the environment,
    which writes nothing gathered: refused, with the config key that does it."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.FSDP:
        raise HardwareError("accelerate launch --use_fsdp: Cadenza shards the model itself; launch without "
                            "--use_fsdp and set backend.type: fsdp in the config (settings under backend.fsdp)")
    if distributed_type == DistributedType.DEEPSPEED:
        check_runnable("deepspeed")


def ddp_kwargs(options: DdpOptions):
    from accelerate.utils import DistributedDataParallelKwargs

    extra = {"bucket_cap_mb": int(options.bucket_cap_mb)} if options.bucket_cap_mb else {}
    return DistributedDataParallelKwargs(find_unused_parameters=options.find_unused_parameters, **extra)


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
