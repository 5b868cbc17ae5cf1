"""FSDP2 (`backend.type: fsdp`): parameters, gradients and optimizer state sharded over the processes by torch's
`fully_shard`, applied here rather than through Accelerate's plugin, which shards GPU processes only and quietly
runs DDP on CPU processes: CPU (gloo) and GPU (NCCL) runs take this one path, and the tests run it.

The loop trains a sharded *copy* of the model. The caller's module stays a plain one (the API saves it, predicts with
it, merges its adapter) and receives the trained weights at the end, gathered from the shards; checkpoints and best
weights are gathered the same way, so every file a sharded run writes is the one a single process writes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config.schema import FsdpOptions

__all__ = ["shard", "units", "layer_class_names", "full_tensors", "optimizer_state", "load_optimizer_state",
           "enable_activation_checkpointing"]


def shard(model: nn.Module, options: FsdpOptions) -> nn.Module:
    """A copy of `model` sharded over the processes: each unit (`units`) gathered for its own forward/backward,
    the rest (embeddings, a tied LM head, the loss wrapper) in the root unit. A module whose other methods run it
    names them in `forward_methods`. Collective: every process calls it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

    sharded = copy.deepcopy(model)
    if options.activation_checkpointing:
        enable_activation_checkpointing(sharded)
    kwargs = {"reshard_after_forward": options.reshard_after_forward}
    if options.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in units(sharded, options):
        fully_shard(unit, **kwargs)
    fully_shard(sharded, **kwargs)
    # methods other than forward that run the model (a loss module's `target_logits`) gather the root's shards too
    for name in getattr(sharded, "forward_methods", ()):
        register_fsdp_forward_method(sharded, name)
    return sharded


CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def units(model: nn.Module, options: FsdpOptions) -> list[nn.Module]:
    """The submodules sharded as units of their own, by `auto_wrap`: transformer: each transformer layer; size: each
    smallest submodule holding min_num_params parameters not in a unit below it; none: no unit but the root."""
    if options.auto_wrap == "transformer":
        names = set(layer_class_names(model))
        return [m for m in model.modules() if type(m).__name__ in names]
    if options.auto_wrap == "none":
        return []
    # a tied parameter (input embedding = LM head) must stay in one unit with every module using it: the root
    tied = {id(p) for p in _shared_parameters(model)}
    found: list[nn.Module] = []

    def uncovered(module: nn.Module) -> int:  # post-order: the parameters under `module` not in a unit yet
        count = sum(p.numel() for p in module.parameters(recurse=False))
        count += sum(uncovered(child) for child in module.children())
        # containers without a forward of their own (ModuleList, ModuleDict) cannot be units: their count goes up
        if module is not model and count >= options.min_num_params and not isinstance(module, CONTAINERS) and \
                not any(id(p) in tied for p in module.parameters()):
            found.append(module)
            return 0
        return count

    uncovered(model)
    return found


def _shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, int] = {}
    params = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
        params[id(p)] = p
    return [params[k] for k, n in seen.items() if n > 1]


def layer_class_names(model: nn.Module) -> list[str]:
    """The transformer layer classes (transformers' `_no_split_modules`) of every pretrained model inside `model`:
    the model handed to the loop wraps the transformers model (a loss module, a PEFT model, an ecd network)."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or []:
            if name not in names and any(type(m).__name__ == name for m in model.modules()):
                names.append(name)
    return names


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with each shard (DTensor) gathered into the whole tensor. Collective when anything is sharded:
    every process calls it, in the same order."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of a sharded model, gathered and keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer_state`'s dict back into the sharded optimizer (each process keeps its shard; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward, in every pretrained transformers model inside `model`."""
    from transformers import PreTrainedModel

    # transformers renamed gradient_checkpointing_enable (deprecated, gone in v6); our range spans both names
    kwargs = {"use_reentrant": False}
    enabled: set[int] = set()
    for module in model.modules():  # the outermost pretrained models: each enables its own layers
        if id(module) in enabled or not isinstance(module, PreTrainedModel) or not module.supports_gradient_checkpointing:
            continue
        if hasattr(module, "activation_checkpointing_enable"):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        enabled.update(id(m) for m in module.modules())
