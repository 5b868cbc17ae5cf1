"""How the processes of a distributed run share the work: the config's `backend:` section.

`local` and `ddp` keep a whole model in every process and average gradients (DistributedDataParallel, through
Accelerate); `fsdp` shards parameters, gradients and optimizer state (FSDP2: `cadenza.train.sharding`, torch's
`fully_shard`, on CPU and GPU processes alike); `deepspeed` hands it to DeepSpeed's ZeRO engine
(`cadenza.train.zero`; on CPU processes DeepSpeed's CPU accelerator, over gloo). Neither goes through Accelerate's
plugins, which shard GPU processes only and quietly run DDP on CPU processes. With one process every type trains the
plain model. See docs/distributed.md.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

from ..config.schema import BackendConfig, DdpOptions, DeepSpeedOptions, FsdpOptions
from ..device import is_cuda
from ..errors import HardwareError

__all__ = ["accelerator_options", "check_launch", "deepspeed_options", "sharding_options"]


def accelerator_options(backend: Optional[BackendConfig], world: int) -> dict:
    """Keyword arguments for `Accelerator(...)`: the DDP settings of `backend` (fsdp and deepspeed: none, the loop
    hands the model to torch's fully_shard or to DeepSpeed's engine itself)."""
    kind = backend.type if backend is not None else "local"
    if world == 1 or kind in ("local", "fsdp", "deepspeed"):
        return {}
    return {"kwargs_handlers": [ddp_kwargs(backend.ddp or DdpOptions())]}


def deepspeed_options(backend: Optional[BackendConfig], world: int) -> Optional[DeepSpeedOptions]:
    """The ZeRO settings when this run hands its model to DeepSpeed (type deepspeed with more than one process)."""
    if world == 1 or backend is None or backend.type != "deepspeed":
        return None
    if importlib.util.find_spec("deepspeed") is None:
        raise HardwareError("backend.type: deepspeed needs the deepspeed package: pip install 'cadenza[deepspeed]' "
                            "(or pip install deepspeed)")
    options = backend.deepspeed or DeepSpeedOptions()
    offloaded = [f"offload_{what}_device: {where}" for what, where in
                 (("optimizer", options.offload_optimizer_device), ("param", options.offload_param_device))
                 if where != "none"]
    if offloaded and not is_cuda():
        raise HardwareError(f"backend.deepspeed.{offloaded[0]} moves what GPU processes hold out of GPU memory; these "
                            "processes run on CPUs, where everything is in CPU memory already: remove the offload key")
    return options


def sharding_options(backend: Optional[BackendConfig], world: int) -> Optional[FsdpOptions]:
    """The FSDP2 settings when this run shards its model (type fsdp with more than one process), else None."""
    if world == 1 or backend is None or backend.type != "fsdp":
        return None
    options = backend.fsdp or FsdpOptions()
    if options.cpu_offload and not is_cuda():
        raise HardwareError("backend.fsdp.cpu_offload: true keeps the shards in CPU memory for GPU processes; these "
                            "processes run on CPUs, where everything is in CPU memory already: remove cpu_offload")
    return options


def check_launch(distributed_type) -> None:
    """`accelerate launch --use_fsdp` / `--use_deepspeed` turn Accelerate's own sharding on through the environment,
    bypassing the config: refused, with the config key that does it."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.FSDP:
        raise HardwareError("accelerate launch --use_fsdp: Cadenza shards the model itself; launch without "
                            "--use_fsdp and set backend.type: fsdp in the config (settings under backend.fsdp)")
    if distributed_type == DistributedType.DEEPSPEED:
        raise HardwareError("accelerate launch --use_deepspeed: launch without it and set backend.type: deepspeed "
                            "in the config (settings under backend.deepspeed)")


def ddp_kwargs(options: DdpOptions):
    from accelerate.utils import DistributedDataParallelKwargs

    extra = {"bucket_cap_mb": int(options.bucket_cap_mb)} if options.bucket_cap_mb else {}
    return DistributedDataParallelKwargs(find_unused_parameters=options.find_unused_parameters, **extra)
