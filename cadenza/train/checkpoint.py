"""Checkpoints for `--resume`: everything it takes to continue a run exactly where it stopped.

    checkpoint/
      state.json             format, file list, the loop's counters, running sums, statistics and best-so-far,
                             the python and numpy random states of each process, and the run's fingerprints
                             (config, seed, data, number of processes)
      weights.safetensors    trained parameters and buffers (frozen pretrained weights are left out: never change)
      best.safetensors       the best weights so far, only when they are not the current ones
      training_state.pt      optimizer and scheduler state, torch CPU/CUDA random states of each process:
                             tensors and plain containers only, read back with torch.load(weights_only=True)

A checkpoint is only ever written at an optimizer-step boundary, in one atomic folder swap, so what is on disk is
always a state the uninterrupted run also went through: resuming from it replays the same steps with the same
batches, dropout masks and learning rates.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..artifacts import atomic_dir, unshared, write_json
from ..config.load import flatten
from ..device import is_cuda
from ..errors import CadenzaError
from .sharding import full_tensors

CHECKPOINT = "checkpoint"
FORMAT = 2  # 1: before fingerprints and full random states (such checkpoints are refused)
STATE = "state.json"
WEIGHTS = "weights.safetensors"
BEST = "best.safetensors"
TRAINING_STATE = "training_state.pt"
MAX_LISTED = 6  # differences named in a refusal


class ResumeError(CadenzaError):
    """A run cannot be resumed: no checkpoint, an incomplete one, or a config or data that changed since."""


@dataclass
class Checkpoint:
    state: dict  # the loop's TrainState, as saved
    weights: dict[str, torch.Tensor]
    best_weights: Optional[dict[str, torch.Tensor]]
    optimizer: dict
    scheduler: dict
    rng: list[dict]  # one per process, in rank order
    fingerprints: dict


# ------------------------------------------------------------------------------------------------- weights
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trained parameters and buffers, copied to the CPU. Frozen parameters are left out under every name they
    have (a tied embedding is one parameter with two names)."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    # a sharded model's (FSDP2) shards are gathered: collective, so every process calls this
    trained = full_tensors({k: v for k, v in model.state_dict().items() if k not in frozen})
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trained.items()}


def load_trainable_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights saved by `trainable_state`, refusing any that do not fit the model."""
    device = next(model.parameters()).device
    try:
        result = model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise ResumeError(f"cannot resume: the weights in {source} do not fit this model ({detail}); "
                          "resume with the config the run was started with, or start a new run") from None
    expected = trainable_state_names(model)
    missing = [k for k in result.missing_keys if k in expected]
    if result.unexpected_keys or missing:
        names = (result.unexpected_keys or missing)[:3]
        raise ResumeError(f"cannot resume: the weights in {source} do not fit this model "
                          f"({'unexpected' if result.unexpected_keys else 'missing'}: {', '.join(names)}); "
                          "resume with the config the run was started with, or start a new run")


def trainable_state_names(model: torch.nn.Module) -> set[str]:
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k for k in model.state_dict() if k not in frozen}


# ------------------------------------------------------------------------------------------- random states
TENSOR_STATES = ("torch", "cuda")  # saved in training_state.pt; the others are JSON


def random_states() -> dict:
    """This process's state of every generator a step may draw from (dropout, noise, shuffles)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
              "python": [version, list(internal), gauss_next]}
    if is_cuda():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and is_cuda():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------------------- save and read
def save_checkpoint(ckpt_dir: Path, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler, state: dict,
                    best_weights: Optional[dict], best_is_current: bool, rng: list[dict],
                    fingerprints: Optional[dict]) -> None:
    """Write the checkpoint folder in one atomic swap (a crash leaves the previous checkpoint whole).
    weights: `trainable_state(model)`; rng: `random_states()` of every process, in rank order."""
    with atomic_dir(ckpt_dir) as tmp:
        save_file(unshared(weights), str(tmp / WEIGHTS))
        files = [STATE, WEIGHTS, TRAINING_STATE]
        best = None
        if best_weights is not None:
            best = "current" if best_is_current else BEST
            if not best_is_current:  # most evaluations improve: the best weights are then the current ones
                save_file(unshared(best_weights), str(tmp / BEST))
                files.append(BEST)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": [{k: v for k, v in r.items() if k in TENSOR_STATES} for r in rng]}, tmp / TRAINING_STATE)
        write_json(tmp / STATE, {"format": FORMAT, "files": files, "state": state, "best_weights": best,
                                 "rng": [{k: v for k, v in r.items() if k not in TENSOR_STATES} for r in rng],
                                 "fingerprints": fingerprints})


def read_checkpoint(ckpt_dir: Path) -> Checkpoint:
    saved = read_state(ckpt_dir)
    weights = load_file(str(ckpt_dir / WEIGHTS))
    best = None
    if saved["best_weights"] == BEST:
        best = load_file(str(ckpt_dir / BEST))
    elif saved["best_weights"] == "current":
        best = weights
    # optimizer state is moved to each parameter's device by Optimizer.load_state_dict
    extra = torch.load(ckpt_dir / TRAINING_STATE, weights_only=True, map_location="cpu")
    rng = [{**tensors, **plain} for tensors, plain in zip(extra["rng"], saved["rng"])]
    return Checkpoint(saved["state"], weights, best, extra["optimizer"], extra["scheduler"], rng,
                      saved.get("fingerprints") or {})


def read_state(ckpt_dir: Path) -> dict:
    """state.json of a complete checkpoint of this format; anything else is a ResumeError saying what is wrong."""
    run_dir = ckpt_dir.parent
    fresh = "start a new run (without --resume)"
    try:
        saved = json.loads((ckpt_dir / STATE).read_text())
    except FileNotFoundError:
        raise ResumeError(f"cannot resume {run_dir}: its checkpoint {ckpt_dir} is incomplete ({STATE} is missing); "
                          f"{fresh}") from None
    except ValueError as e:
        raise ResumeError(f"cannot resume {run_dir}: {ckpt_dir / STATE} is damaged ({e}); {fresh}") from None
    if saved.get("format") != FORMAT:
        raise ResumeError(f"cannot resume {run_dir}: its checkpoint was written by another Cadenza version "
                          f"(checkpoint format {saved.get('format', 1)}; this one reads {FORMAT}); {fresh}")
    missing = [name for name in saved["files"] if not (ckpt_dir / name).is_file()]
    if missing:
        raise ResumeError(f"cannot resume {run_dir}: its checkpoint {ckpt_dir} is incomplete "
                          f"({', '.join(missing)} missing); {fresh}")
    return saved


# ---------------------------------------------------------------------------------------------- fingerprints
def run_fingerprints(config: dict, splits: dict, seed: int, processes: int) -> dict:
    """What must not change between a run and its resumption: the whole resolved config (no key is exempt: each
    one changes either the model, the data it sees or the schedule), the seed, the training and validation data,
    and the number of processes (it decides which batches each process takes and the steps per epoch)."""
    return {"config": config, "random_seed": seed, "processes": processes,
            "data": {name: data_fingerprint(splits[name]) for name in ("training", "validation") if name in splits}}


def data_fingerprint(df) -> dict:
    """Rows and a content hash (column names, values and row order; not the index) of one split."""
    import pandas as pd

    if hasattr(df, "fingerprint"):  # a streamed split (cadenza.data.stream.FileRows) hashes its file and rows
        return df.fingerprint()

    digest = hashlib.sha256(json.dumps([str(c) for c in df.columns]).encode())
    try:
        digest.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    except TypeError:  # cells that pandas cannot hash (lists, dicts): hash their JSON text
        digest.update(df.to_json(orient="values", default_handler=str).encode())
    return {"rows": len(df), "sha256": digest.hexdigest()}


def check_resumable(run_dir: Path, fingerprints: dict) -> None:
    """Refuse to resume `run_dir` if its checkpoint is incomplete or was made with another config, seed or data."""
    then = read_state(run_dir / CHECKPOINT).get("fingerprints") or {}
    differences, remedies = _differences(then.get("config", {}), fingerprints["config"]), []
    if differences:
        remedies.append("the original config")
    seed = then.get("random_seed")
    if seed != fingerprints["random_seed"]:
        differences.append(f"random_seed: {seed} in the checkpoint, {fingerprints['random_seed']} now")
        remedies.append(f"--random_seed {seed}")
    processes = then.get("processes")
    if processes != fingerprints["processes"]:
        differences.append(f"processes: {processes} in the checkpoint, {fingerprints['processes']} now")
        remedies.append(f"the same number of processes ({processes})")
    # a random split depends on the seed: other splits are then its consequence, not news
    data = [f"{split} data: {_rows_then_and_now(then.get('data', {}).get(split), now)}"
            for split, now in fingerprints["data"].items() if then.get("data", {}).get(split) != now]
    if data and seed == fingerprints["random_seed"]:
        differences += data
        remedies.append("the original data")
    if differences:
        if len(differences) > MAX_LISTED:
            differences = differences[:MAX_LISTED] + [f"and {len(differences) - MAX_LISTED} more"]
        raise ResumeError(f"cannot resume {run_dir}: the run differs from its checkpoint: {'; '.join(differences)}; "
                          f"resume with {_and(remedies)} or start a new run")


def check_same_batches(ckpt_dir: Path, then: Optional[dict], now: dict) -> None:
    """The loop's step arithmetic must be the checkpoint's: `step_in_epoch` counts steps of these batches. The
    config and data are checked before (check_resumable); what is left is a batch size chosen at run time."""
    differences = _differences(then or {}, now)
    if differences:
        raise ResumeError(f"cannot resume {ckpt_dir.parent}: its batches differ from the checkpoint's: "
                          f"{'; '.join(differences)}; with trainer.batch_size: auto, set the batch size the run "
                          "started with (its log says it), or start a new run")


def _rows_then_and_now(then: Optional[dict], now: dict) -> str:
    if then is None:
        return f"none in the checkpoint, {now['rows']} rows now"
    if then["rows"] != now["rows"]:
        return f"{then['rows']} rows in the checkpoint, {now['rows']} now"
    return f"{now['rows']} rows then and now, but other values"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _differences(then: dict, now: dict) -> list[str]:
    before, after = flatten(then), flatten(now)
    keys = list(before) + [k for k in after if k not in before]
    return [f"{k}: {_shown(before.get(k, _ABSENT))} in the checkpoint, {_shown(after.get(k, _ABSENT))} now"
            for k in keys if before.get(k, _ABSENT) != after.get(k, _ABSENT)]


_ABSENT = object()


def _shown(value) -> str:
    return "absent" if value is _ABSENT else json.dumps(value)
