"""`cadenza estimate`: peak memory and time of a training run, predicted before it starts.

What goes in:
- the model's shapes, read from its config.json without loading weights (hidden size, layers, heads, vocab);
  parameter counts are computed from them for BERT- and Llama-like models (checked against real tensors in
  tests/test_estimate.py) and taken from a weightless (meta-device) instance otherwise;
- the data: rows per split and their token counts (every row tokenized with the real tokenizer and, for llm,
  the real prompt template and micro-batch grouping, so packing and shared prompt prefixes count as in training);
- precision (`cadenza.device.precision`), batch size, adapter (LoRA's trainable parameters, a frozen base in the
  weights dtype), gradient checkpointing, embedding cache hits (ecd), quantization (GPU);
- a calibration on this machine, run once in a subprocess and cached in `<cache>/estimate/`: the real
  architecture cut to 1 and a few more layers (random weights) runs the micro-batch shape of the run in its precision —
  forward for embedding/evaluation, forward + backward + AdamW for training — which gives seconds per layer and
  for the rest (embeddings, LM head, loss); it also measures the resident memory of the imports a run needs.

Memory is the larger of the load phase and the training phase: the imports, the weights (plus the file pages
being read while weights are cast on load), trainable weights' gradients and AdamW states, activations kept for
backward (per token and layer, by precision and by what is trained), the target logits, and the transient
tensors of the largest forward pass. On CUDA the same sums give GPU memory (weights, optimizer, activations; no
imports). A prediction that exceeds the memory available prints a warning saying what to change; training goes
on (a warning, not an error).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import device
from .data.cache import cache_root, configured_cache_dir
from .errors import CadenzaError

CALIBRATION_VERSION = 7
PROBE_MAX_BLOCKS = 9  # the deeper probe's blocks (fewer when a block is large): its difference from 1 block is the per-block cost
PROBE_BLOCK_PARAMETERS = 300e6  # ...within this many parameters of extra blocks
LOAD_BYTES_PER_SECOND = 1.0e9  # safetensors from the page cache, cast to the weights dtype (measured ~1 GB/s here)
GGUF_SECONDS_PER_PARAMETER = 0.2e-6  # dequantizing a GGUF once (~25 s for SmolLM2-135M on 2 cores)
SAVE_BYTES_PER_SECOND = 0.5e9
MiB = 2**20


# ------------------------------------------------------------------------------------------------ model shapes
@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about a pretrained model."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    parameters: int  # all of them, a tied LM head counted once
    embedding_parameters: int  # input embeddings (and their positions/types)
    layer_parameters: int  # one transformer block
    weights_file_bytes: int  # on disk (0 when unknown, e.g. a hub id not downloaded)


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo", "smollm3")
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet")


def count_parameters(cfg: dict) -> Optional[tuple[int, int, int]]:
    """(total, embedding, per layer) for BERT- and Llama-like configs from config.json, or None for others."""
    kind = cfg.get("model_type", "")
    d, layers, ff, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    if kind in BERT_LIKE:
        embedding = (vocab + cfg.get("max_position_embeddings", 512) + cfg.get("type_vocab_size", 2)) * d + 2 * d
        attention = 4 * (d * d + d) + 2 * d  # q, k, v, output dense (+bias), its LayerNorm
        mlp = (d * ff + ff) + (ff * d + d) + 2 * d  # intermediate, output dense, LayerNorm
        layer = attention + mlp
        pooler = d * d + d if cfg.get("add_pooling_layer", True) and "Model" in "".join(cfg.get("architectures") or
                                                                                         ["BertModel"]) else 0
        return embedding + layers * layer + pooler, embedding, layer
    if kind in LLAMA_LIKE:
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or d // heads
        attention = d * heads * hd + 2 * d * kv * hd + heads * hd * d
        if cfg.get("attention_bias"):  # Llama's attention_bias covers q, k, v and o
            attention += heads * hd + 2 * kv * hd + d
        elif kind == "qwen2":  # Qwen2 always has q, k, v biases (none on o)
            attention += heads * hd + 2 * kv * hd
        mlp = 3 * d * ff + (2 * ff + d if cfg.get("mlp_bias") else 0)
        layer = attention + mlp + 2 * d  # two RMSNorms
        embedding = vocab * d
        head = 0 if cfg.get("tie_word_embeddings", kind.startswith("gemma")) else vocab * d
        return embedding + layers * layer + d + head, embedding, layer  # + the final norm
    return None


def _meta_count(folder: str, causal: bool, trust_remote_code: bool) -> tuple[int, int, int]:
    """Parameter counts of a weightless instance (meta device): exact for any architecture transformers knows."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, trust_remote_code=trust_remote_code)
    unique = {id(p): p.numel() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight.numel()
    layers = config.num_hidden_layers
    return sum(unique.values()), embedding, (sum(unique.values()) - embedding) // max(layers, 1)


def read_shape(folder: str, causal: bool, trust_remote_code: bool = False) -> Shape:
    """The shapes of the model in `folder` (a local folder with config.json) without loading its weights."""
    path = Path(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CadenzaError(f"estimate: {folder} has no config.json to read the model's shapes from; download or "
                           "convert the model first (a run does it), then estimate")
    cfg = json.loads(config_file.read_text())
    cfg = {**cfg, **(cfg.get("text_config") or {})}  # multimodal configs keep the language model's inside
    counts = count_parameters(cfg) or _meta_count(folder, causal, trust_remote_code)
    heads = cfg.get("num_attention_heads", 1)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return Shape(cfg.get("model_type", "?"), cfg["hidden_size"], cfg["num_hidden_layers"], heads,
                 cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                 cfg.get("intermediate_size", 4 * cfg["hidden_size"]), cfg.get("vocab_size", 0), *counts, weights)


def _linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer name in one block, for LoRA's parameter count."""
    d, ff, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if shape.model_type in BERT_LIKE:
        return {"query": (d, d), "key": (d, d), "value": (d, d), "dense": (d, d), "intermediate.dense": (d, ff),
                "output.dense": (ff, d)}
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, ff),
            "up_proj": (d, ff), "down_proj": (ff, d)}


DEFAULT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def adapter_parameters(shape: Shape, adapter) -> Optional[int]:
    """Trainable parameters of a LoRA adapter (r x (in + out) per adapted linear layer, in every block), or None
    when the adapter is not a plain LoRA on a known architecture (the caller counts on a meta instance)."""
    if adapter is None or adapter.type != "lora" or getattr(adapter, "rank_pattern", None) or \
            getattr(adapter, "layer_replication", None) or shape.model_type not in BERT_LIKE + LLAMA_LIKE:
        return None
    linears = _linear_shapes(shape)
    targets = adapter.target_modules or DEFAULT_TARGETS["bert" if shape.model_type in BERT_LIKE else "llama"]
    if isinstance(targets, str):
        targets = list(linears) if targets == "all-linear" else None
    if targets is None or any(t not in linears for t in targets):
        return None
    per_layer = sum(adapter.r * (linears[t][0] + linears[t][1]) for t in targets)
    if getattr(adapter, "use_dora", False):
        per_layer += sum(linears[t][1] for t in targets)  # DoRA's magnitude vector
    return per_layer * shape.layers


def adapter_dropout_width(shape: Shape, adapter) -> int:
    """Summed input widths of one block's LoRA-adapted layers when LoRA dropout is on (else 0)."""
    if adapter is None or not getattr(adapter, "dropout", 0) or adapter.type != "lora":
        return 0
    linears = _linear_shapes(shape)
    targets = adapter.target_modules or DEFAULT_TARGETS["bert" if shape.model_type in BERT_LIKE else "llama"]
    if targets == "all-linear":
        targets = list(linears)
    if isinstance(targets, str) or any(t not in linears for t in targets):
        return 2 * shape.hidden  # unknown names: as many as PEFT's usual two (q and v)
    return sum(linears[t][0] for t in targets)


def _meta_adapter_parameters(folder: str, adapter, causal: bool, trust_remote_code: bool) -> int:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .adapters import peft_config

    import peft

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, trust_remote_code=trust_remote_code)
        model = peft.get_peft_model(model, peft_config(adapter, "CAUSAL_LM" if causal else "FEATURE_EXTRACTION"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- activations
def saved_activation_bytes(shape: Shape, tokens: int, *, trains_base: bool, bf16: bool, checkpointing: bool,
                           adapter_dropout_width: int = 0, attention_scores: int = 0) -> int:
    """Bytes autograd keeps for backward in the transformer blocks for one micro-batch of `tokens` tokens.
    Per token and block a Llama/BERT block keeps about 8 hidden-wide and 3 FFN-wide tensors (norm inputs, the
    attention's q/k/v/output, the MLP's gate/up products); training the base weights too keeps ~2 more of each.
    Under bf16 autocast the matmul inputs are bf16 while norms and residuals stay fp32. With gradient
    checkpointing only each block's input is kept (one block's activations are rebuilt at a time in backward).
    adapter_dropout_width: the summed input widths of a block's adapted layers when LoRA dropout is on (PEFT
    keeps each dropped-out fp32 input and its mask: 5 bytes per input feature).
    attention_scores: scores per head and block that the explicit attention form keeps as bf16 probabilities
    (cadenza.llm.attention.masked_attention, bf16 training on bf16 weights: T^2 for a short pack); 0 where sdpa's
    flash kernel runs (fp32, or fp32 weights under autocast), which keeps O(T)."""
    d, ff = shape.hidden, shape.intermediate
    wide, ffn = (10, 4.5) if trains_base else (8, 3)
    per_token = (2 * (wide - 3) * d + 4 * 3 * d + 2 * ffn * ff) if bf16 else 4 * (wide * d + ffn * ff)
    per_token += 5 * adapter_dropout_width
    scores = 2 * shape.heads * attention_scores  # bf16 probabilities, per block
    if checkpointing:
        return int(tokens * (shape.layers * d * 4 + per_token) + scores)
    return int(tokens * shape.layers * per_token + shape.layers * scores)


def logits_bytes(shape: Shape, targets: int) -> int:
    """The LM head on target positions only (cadenza.llm.loss): fp32 logits, their log-softmax and gradient."""
    return 3 * targets * shape.vocab * 4


# On Linux/glibc the resident set grows by about this multiple of a forward pass's live tensors: freed blocks of
# earlier batches stay in the allocator's arenas (one per thread). Measured with MiniLM on batches of 64-128 rows
# x 64 tokens, fp32 and bf16 (2.3x-2.8x); GPU memory is counted without it.
CPU_ALLOCATOR_FACTOR = 2.5


def forward_transient_bytes(shape: Shape, rows: int, length: int, elem_bytes: int) -> int:
    """The largest tensors alive at once in a forward pass of `rows` x `length` tokens: the FFN's two products,
    a few hidden-wide tensors, and the attention scores with their softmax (the math kernel materializes them)."""
    tokens = rows * length
    return int(elem_bytes * tokens * (2 * shape.intermediate + 4 * shape.hidden)
               + 4 * 2 * rows * shape.heads * length * length)


def _resident(n: int, hw) -> int:
    return int(n * CPU_ALLOCATOR_FACTOR) if hw.device == "cpu" else int(n)


# ------------------------------------------------------------------------------------------------ calibration
def calibration_file(config) -> Path:
    return cache_root(configured_cache_dir(config)) / "estimate" / "calibration.json"


def calibrate(spec: dict, file: Path, *, refresh: bool = False, cached_only: bool = False,
              log: Callable = print) -> dict:
    """The probe's measurements for `spec` on this machine, from the cache file or measured now (seconds,
    in a subprocess: its memory and random draws stay out of this process). cached_only: never measure; without
    a cached entry the result has the resident memory of this process and no timings."""
    key = hashlib.sha256(json.dumps({**spec, "machine": device.machine_key(), "v": CALIBRATION_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:24]
    table = _read_table(file)
    if key in table and not refresh:
        return table[key]
    if cached_only:
        return {"base_rss_bytes": _current_base_rss(), "import_seconds": {}}
    log("estimate: calibrating on this machine (once; cached in " f"{file})")
    proc = subprocess.run([sys.executable, "-m", "cadenza.estimate", json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"estimate calibration failed: {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    from .artifacts import write_json

    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, {**_read_table(file), key: result})  # re-read: another process may have added entries
    return result


def _read_table(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def _cpu_seconds() -> float:
    return time.process_time()  # this process's CPU time, all its threads


def _timed(fn, reps: int = 3, parallel: bool = True) -> float:
    """Seconds `fn` takes on this machine unloaded: the best of `reps` runs after a warm-up, each run's wall time
    or, when other processes hold the cores, its CPU time (divided by the intra-op threads for work that keeps
    them all busy: matmuls), whichever is shorter. CPU time does not count the waits for a core, so a busy
    machine still gives a calibration of the machine itself."""
    import torch

    return _timed_with_warmup(fn, reps, parallel)[0]


def _timed_with_warmup(fn, reps: int = 3, parallel: bool = True) -> tuple[float, float]:
    """(_timed's seconds, the extra seconds of the first call: allocations, kernel selection, lazy set-up)."""
    import torch

    threads = torch.get_num_threads() if parallel else 1
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn()  # warm-up
    first = min(time.perf_counter() - t0, (_cpu_seconds() - c0) / threads)
    best = math.inf
    for _ in range(reps):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        fn()
        best = min(best, time.perf_counter() - t0, (_cpu_seconds() - c0) / threads)
    return best, max(first - best, 0.0)


def _timed_once(t0: float, c0: float) -> float:
    """Single-threaded work since (t0, c0) (imports): wall time, or CPU time when that is shorter."""
    return min(time.perf_counter() - t0, _cpu_seconds() - c0)


def probe(spec: dict) -> dict:
    """Run in a fresh process by `calibrate`: the imports' resident memory and time, then the architecture in
    spec["source"] cut to 1 and a few more blocks (random weights) timed on the run's micro-batch shape."""
    import resource

    t0, c0 = time.perf_counter(), _cpu_seconds()
    import torch

    import cadenza.api  # noqa: F401  (what every run imports)
    import_seconds = {"torch": _timed_once(t0, c0)}
    t0, c0 = time.perf_counter(), _cpu_seconds()
    from torch import _dynamo  # noqa: F401  (torch.optim's optimizers import torch's compiler stack on first use)

    import_seconds["torch._dynamo"] = _timed_once(t0, c0)
    torch.manual_seed(0)
    head_step = _head_step_seconds()
    if spec.get("head"):  # a head on cached embeddings: only the per-step overhead matters
        return {"base_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "import_seconds": import_seconds, "head_step": head_step}
    t0, c0 = time.perf_counter(), _cpu_seconds()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    import_seconds["transformers"] = _timed_once(t0, c0)
    if spec.get("adapter"):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        import peft  # noqa: F401

        import_seconds["peft"] = _timed_once(t0, c0)
    config = AutoConfig.from_pretrained(spec["source"])
    causal = spec["causal"]
    t0, c0 = time.perf_counter(), _cpu_seconds()
    with torch.device("meta"):  # imports the model class's modules: part of what a run holds before its weights
        skeleton = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    # transformers' modelling code (scipy, torch.distributed, ...: seconds), under the module's own name so that an
    # estimate in a process that has it imported already does not count it
    import_seconds[type(skeleton).__module__] = _timed_once(t0, c0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    precision = device.Precision(spec["bf16"], "calibration")
    weights_dtype = getattr(torch, spec["weights_dtype"])
    out: dict = {"base_rss_bytes": base_rss, "import_seconds": import_seconds, "threads": torch.get_num_threads(),
                 "head_step": head_step}
    if "train" in spec:  # the loop measures the peak for MFU once per process (a fresh one here)
        t0 = time.perf_counter()
        device.peak_flops(spec["bf16"])
        out["peak_flops_seconds"] = time.perf_counter() - t0
    torch.manual_seed(0)
    # 1 block and a few more: the difference of the two is several blocks' time, well above the timing noise (the
    # difference of 1 and 2 blocks was a few milliseconds of a noisy total, off by 2-3x for SmolLM2)
    deeper = 1 + _extra_blocks(skeleton, config.num_hidden_layers)
    del skeleton
    out["probe_layers"] = [1, deeper]
    for layers in (1, deeper):
        config.num_hidden_layers = layers
        for key in ("layer_types",):  # per-layer lists must match the layer count
            if isinstance(getattr(config, key, None), list):
                setattr(config, key, getattr(config, key)[:layers])
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, dtype=weights_dtype).eval()
        model.requires_grad_(False)
        if "forward" in spec:
            rows, length = spec["forward"]
            ids = torch.randint(5, config.vocab_size - 1, (rows, length))
            mask = torch.ones_like(ids)
            body = getattr(model, model.base_model_prefix, model) if causal else model
            with torch.no_grad(), precision.autocast("cpu"):
                out[f"forward_{layers}"] = _timed(lambda: body.train(spec.get("train_mode", False))(
                    input_ids=ids, attention_mask=mask))
                if spec.get("train_mode"):  # and as evaluation runs it
                    out[f"forward_eval_{layers}"] = _timed(lambda: body.eval()(input_ids=ids, attention_mask=mask))
        if "train" in spec:
            out.update({f"{k}_{layers}": v for k, v in _probe_train(model, spec, precision).items()})
        del model
    return out


def _extra_blocks(skeleton, layers: int) -> int:
    """How many blocks beyond the first the deeper probe adds: up to PROBE_MAX_BLOCKS - 1, fewer for large blocks
    (a 7B model's block is ~200M parameters: one more), at most the model's other blocks but at least one (the
    per-block time is a difference of two depths). `skeleton`: the full model on the meta device."""
    import torch

    block = max((sum(p.numel() for p in m[0].parameters()) for m in skeleton.modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == layers), default=1)
    return max(1, min(PROBE_MAX_BLOCKS - 1, layers - 1, int(PROBE_BLOCK_PARAMETERS // max(block, 1))))


def _probe_train(model, spec: dict, precision) -> dict:
    """Forward + backward of the training module on one packed micro-batch, and an AdamW step."""
    import torch

    from .llm import batching
    from .llm.loss import TargetLoss
    from .llm.tokenize import TokenizedRows

    if spec["train"]["mode"] == "adapter":
        from .adapters import apply_adapter
        from .config.schema import LoraConfig

        model = apply_adapter(model, LoraConfig(**spec["adapter"]), "CAUSAL_LM")
    else:
        model.requires_grad_(True)
    if spec["train"].get("checkpointing"):
        from .llm.model import _enable_activation_checkpointing
        from .llm.loss import causal_lm_of

        _enable_activation_checkpointing(causal_lm_of(model))
    model.train()
    tokens, row_length, prompt = spec["train"]["tokens"], spec["train"]["row_length"], spec["train"]["prompt_length"]
    n = max(1, tokens // row_length)
    vocab = model.config.vocab_size if hasattr(model, "config") else 1000
    rows = TokenizedRows([np.random.randint(5, vocab - 1, row_length) for _ in range(n)], np.full(n, prompt))
    batch = batching.make_batch(rows, list(range(n)), packed=True)
    module = TargetLoss(model)

    def step():
        model.zero_grad(set_to_none=True)  # as the loop after each optimizer step: backward allocates the gradients
        with precision.autocast("cpu"):
            loss = module(batch)
        loss.backward()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, fused=True)  # as train.loop.build_optimizer (one process)
    train_seconds, warmup = _timed_with_warmup(step)

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    module.eval()
    with torch.no_grad(), precision.autocast("cpu"):
        eval_seconds = _timed(lambda: module(batch))
    step()  # gradients for the optimizer's steps
    optimizer_seconds, optimizer_warmup = _timed_with_warmup(optimizer_step)  # the first step allocates AdamW's states
    return {"train": train_seconds, "train_warmup": warmup + optimizer_warmup, "optimizer": optimizer_seconds,
            "eval": eval_seconds,
            "trainable": sum(p.numel() for p in trainable), "train_tokens": batch["computed_tokens"]}


def _per_layer(cal: dict, name: str, layers: int) -> float:
    """Seconds of the full model from the shallow and deeper probes: rest + layers x per block (NaN: not calibrated)."""
    if f"{name}_1" not in cal:
        return math.nan
    a, b = cal["probe_layers"]
    one, deeper = cal[f"{name}_{a}"], cal[f"{name}_{b}"]
    block = max(deeper - one, 0.0) / (b - a)
    return max(one - block, 0.0) + layers * block


# ------------------------------------------------------------------------------------------------ the estimate
@dataclass
class Estimate:
    model_type: str
    device: str
    peak_memory_bytes: int
    memory_parts: dict  # name -> bytes, of the phase that peaks
    available_bytes: Optional[int]
    seconds_per_epoch: float
    total_seconds: float
    time_parts: dict  # name -> seconds (per epoch parts are per epoch)
    epochs: int
    facts: dict  # parameters, tokens, rows, precision, batch size, steps: what the figures rest on
    warnings: list = field(default_factory=list)

    @property
    def memory_kind(self) -> str:
        return "GPU memory" if self.device == "cuda" else "peak RSS"

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_memory_bytes <= self.available_bytes

    def summary(self) -> list[str]:
        """One or two lines for the start of `train`."""
        avail = f" of {_mb(self.available_bytes)} available" if self.available_bytes else ""
        timing = f"{_seconds(self.seconds_per_epoch)} per epoch, {_seconds(self.total_seconds)} in total " \
            f"({self.epochs} epochs)" if not math.isnan(self.total_seconds) else \
            "time: not calibrated on this machine yet (`cadenza estimate` calibrates once)"
        lines = [f"estimate: {self.memory_kind} {_mb(self.peak_memory_bytes)}{avail}; {timing}"]
        return lines + [f"warning: {w}" for w in self.warnings]

    @property
    def lines(self) -> list[str]:
        """The readable table `cadenza estimate` prints."""
        out = [f"{self.model_type} on {self.device}: " + ", ".join(f"{k} {_fact(v)}" for k, v in self.facts.items())]
        out.append(f"{self.memory_kind:<50}{_mb(self.peak_memory_bytes):>12}" +
                   (f"   (available: {_mb(self.available_bytes)})" if self.available_bytes else ""))
        for name, value in self.memory_parts.items():
            out.append(f"  {name:<48}{_mb(value):>12}")
        out.append(f"{'time per epoch':<50}{_seconds(self.seconds_per_epoch):>12}")
        out.append(f"{'time in total':<50}{_seconds(self.total_seconds):>12}   ({self.epochs} epochs)")
        for name, value in self.time_parts.items():
            out.append(f"  {name:<48}{_seconds(value):>12}")
        return out + [f"warning: {w}" for w in self.warnings]

    def to_dict(self) -> dict:
        """JSON-ready (an uncalibrated time is null)."""
        def clean(v):
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return None if isinstance(v, float) and math.isnan(v) else v

        return clean({**asdict(self), "memory_kind": self.memory_kind, "fits": self.fits, "lines": self.lines})


def _mb(n: Optional[float]) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GB" if n >= 10 * 2**30 else f"{n / MiB:,.0f} MB"


def _seconds(s: float) -> str:
    if math.isnan(s):
        return "?"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def _fact(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def estimate(config, splits: dict, *, available_bytes: Optional[int] = None,
             refresh: bool = False, cached_only: bool = False, seed: int = 42, read_seconds: Optional[float] = None,
             log: Callable = print) -> Estimate:
    """Predict peak memory and time of training `config` on `splits` (as api.Model.train splits them: DataFrames,
    or cadenza.data.stream.FileRows for a Parquet file that streams, estimated from an evenly spaced sample).
    read_seconds: what reading and splitting the data took here (train() does it again); None: already read.
    available_bytes: the memory to compare with (default: what cadenza.device.available_memory() reports).
    refresh: measure the calibration again; cached_only: use only a cached calibration (train's start line),
    without one the times are NaN and the imports' memory is this process's."""
    hw = device.hardware()
    available = available_bytes if available_bytes is not None else device.available_memory()
    already = set(sys.modules)  # imports this process has made: not counted again (before the estimate's own)
    data = DataSample.of(splits)
    if config.model_type == "llm":
        est = _estimate_llm(config, data, hw, already, refresh, cached_only, seed, log)
    else:
        est = _estimate_ecd(config, data, hw, already, refresh, cached_only, seed, log)
    est.available_bytes = available
    if data.streamed:
        est.facts["streamed"] = f"estimated from {sum(map(len, data.frames.values())):,} sampled rows"
    if read_seconds is not None and read_seconds > 0.05:
        est.time_parts = {"read and split the data": read_seconds, **est.time_parts}
        est.total_seconds += read_seconds
    if not est.fits:
        est.warnings.append(_advice(config, est))
    return est


# rows read from each streamed split (a Parquet file larger than memory): every per-row figure of the estimate is
# the sample's, scaled by the split's rows over the sample's. Reading them scans the file once (0.4 s for 1M rows).
STREAM_SAMPLE_ROWS = 5000


@dataclass
class DataSample:
    """The rows the estimate looks at, and how many rows each split really has."""

    frames: dict  # split -> DataFrame: every row, or an evenly spaced sample of a streamed split
    rows: dict  # split -> its rows
    streamed: bool
    chunk_bytes: int = 0  # a streamed pass's chunk of rows in memory (cadenza.data.stream.CHUNK_ROWS)
    files: dict = field(default_factory=dict)  # split -> its FileRows, for a streamed split

    @classmethod
    def of(cls, splits: dict) -> "DataSample":
        from .data.stream import CHUNK_ROWS, FileRows

        frames, rows, chunk = {}, {}, 0
        for name, split in splits.items():
            rows[name] = len(split)
            if isinstance(split, FileRows):
                picked = np.linspace(0, len(split) - 1, min(len(split), STREAM_SAMPLE_ROWS)).astype(np.int64)
                frames[name] = FileRows(split.path, split.positions[picked]).read()
                per_row = frames[name].memory_usage(deep=True).sum() / max(1, len(frames[name]))
                chunk = max(chunk, int(per_row * min(CHUNK_ROWS, len(split))))
            else:
                frames[name] = split
        files = {name: split for name, split in splits.items() if isinstance(split, FileRows)}
        return cls(frames, rows, bool(files), chunk, files)

    def scale(self, split: str) -> float:
        """How many rows of the split each row looked at stands for."""
        return self.rows[split] / max(1, len(self.frames[split]))

    def data_bytes(self) -> int:
        """The data in memory: every frame, or for a streamed run a chunk and the split's row numbers and order
        (16 bytes a row)."""
        if self.streamed:
            return self.chunk_bytes + 16 * sum(self.rows.values())
        return int(sum(df.memory_usage(deep=True).sum() for df in self.frames.values() if len(df)))


def _advice(config, est: Estimate) -> str:
    over = f"{est.memory_kind} of {_mb(est.peak_memory_bytes)} is predicted but only {_mb(est.available_bytes)} is " \
           "available: the run may be killed for memory"
    tips = [f"lower trainer.batch_size (now {config.trainer.batch_size})"]
    if config.model_type == "llm":
        if not config.trainer.enable_gradient_checkpointing:
            tips.append("set trainer.enable_gradient_checkpointing: true")
        if config.adapter is None and config.trainer.type != "none":
            tips.append("train a LoRA adapter instead of all weights (adapter: {type: lora})")
        if est.device == "cuda" and config.quantization is None:
            tips.append("quantize the frozen base (quantization: {bits: 4}) with a LoRA adapter")
    else:
        tips.append("cache the embeddings of a frozen encoder (trainable: false, cache_encoder_embeddings: true)")
        tips.append("lower preprocessing.max_sequence_length")
    return over + "; to fit: " + "; or ".join(tips)


def _base_parts(cal: dict, hw, data_bytes: int) -> dict:
    if hw.device == "cuda":
        return {}
    return {"imports (python, torch, transformers)": cal["base_rss_bytes"], "data": data_bytes}


def _import_seconds(cal: dict, already: set) -> float:
    return sum(v for k, v in cal["import_seconds"].items() if k != "torch" and k not in already)


# ------------------------------------------------------------------------------------------------------- ecd
def _estimate_ecd(config, data: DataSample, hw, already, refresh, cached_only, seed, log) -> Estimate:
    from .data import stream
    from .ecd import DEFAULT_BATCH_SIZE, EcdModel
    from .ecd import features as FT
    from .ecd.text_encoder import batch_token_budget, encoder_source

    model = EcdModel(config)
    t = config.trainer
    batch = DEFAULT_BATCH_SIZE if t.batch_size == "auto" else t.batch_size
    eval_batch = model.eval_batch_size
    n_train = data.rows["training"]
    n_eval = data.rows.get("validation", 0) + (n_train if t.evaluate_training_set else 0)
    memory = {}
    load, per_epoch, once = {}, {}, {}
    facts: dict = {"rows": n_train, "batch size": batch, "epochs": t.epochs}
    train_bf16 = False
    peak_phase: dict = {}
    cal_base = None
    texts = [f for f in config.input_features if f.type == "text"]
    widths = {}  # text input -> its encoder's width
    for f in texts:
        source = encoder_source(f.encoder)
        folder = _local_model_folder(source, config)
        shape = read_shape(folder, causal=False, trust_remote_code=f.encoder.trust_remote_code)
        widths[f.name] = shape.hidden
        cached = model.is_cached(f)
        max_len = model._max_length(f)
        column = f.column or f.name
        all_texts = {k: df[column].astype(str).tolist() for k, df in data.frames.items() if len(df)}
        if f.preprocessing.lowercase:
            all_texts = {k: [x.lower() for x in v] for k, v in all_texts.items()}
        n_texts = sum(data.rows[k] for k in all_texts)
        missing = _uncached_texts(model, f, max_len, all_texts, data) if cached else 0
        lengths, scale, longest, tokenize_seconds = {}, {}, 0, 0.0
        if missing or not cached:  # a warm cache needs no tokenizer (nor transformers) at all
            lengths, scale, longest, tokenize_seconds = _sampled_lengths(
                model._tokenizer(f), all_texts, max_len, warm=n_texts > 10 * LENGTH_SAMPLE)
            scale = {k: v * data.scale(k) for k, v in scale.items()}
        total_tokens = sum(scale[k] * float(v.sum()) for k, v in lengths.items())
        precision = device.precision(t.use_mixed_precision, "embed" if cached else "train")
        elem = 2 if precision.bf16 else 4
        # a cached (embedding-only) encoder loads in the embedding precision, a trained one in fp32 (ecd._encoder)
        weights_bytes = shape.parameters * (elem if cached else 4)
        if cached:
            facts[f"{f.name}: texts to embed"] = missing
            if missing:
                mean_len = max(1, int(total_tokens / n_texts))
                budget = batch_token_budget(shape.hidden)
                rows = max(1, budget // _bucket(mean_len))  # the pass's length-sorted batches
                cal = calibrate({"source": folder, "causal": False, "bf16": precision.bf16,
                                 "weights_dtype": "bfloat16" if precision.bf16 else "float32",
                                 "forward": [rows, _bucket(mean_len)]}, calibration_file(config),
                                refresh=refresh, cached_only=cached_only, log=log)
                cal_base = cal_base or cal
                per_token = _per_layer(cal, "forward", shape.layers) / (rows * _bucket(mean_len))
                share = missing / max(1, n_texts)
                tokens = share * total_tokens
                once[f"{f.name}: tokenize {missing:,} texts"] = missing * tokenize_seconds
                once[f"{f.name}: embed {missing:,} texts ({precision.name})"] = tokens * per_token
                load[f"{f.name}: load encoder"] = shape.weights_file_bytes / LOAD_BYTES_PER_SECOND
                peak_phase[f"{f.name}: encoder weights"] = weights_bytes
                embed_rows = max(1, budget // longest)  # the longest texts' batch: the largest scores
                peak_phase[f"{f.name}: embedding pass ({budget:,} tokens a batch)"] = \
                    _resident(forward_transient_bytes(shape, min(embed_rows, missing), longest, elem), hw)
            if not data.streamed:  # a streamed run reads them from the cache on disk, a batch at a time
                memory[f"{f.name}: cached embeddings"] = n_texts * shape.hidden * 4
        else:
            train_bf16 = train_bf16 or precision.bf16
            train_lengths = lengths["training"]
            order = np.random.default_rng(seed).permutation(len(train_lengths)) if t.should_shuffle else \
                np.arange(len(train_lengths))
            padded = int(scale["training"] * sum(int(train_lengths[order[i:i + batch]].max()) * len(order[i:i + batch])
                                                 for i in range(0, len(train_lengths), batch)))
            eval_padded = int(sum(scale[k] * _padded(lengths[k], eval_batch) for k in lengths if k == "validation"))
            if t.evaluate_training_set:
                eval_padded += int(scale["training"] * _padded(train_lengths, eval_batch))
            mean_len = _bucket(max(1, int(padded / n_train)))
            # the encoder runs inside training: in train mode (its dropout draws masks), as the probe times it
            cal = calibrate({"source": folder, "causal": False, "bf16": precision.bf16, "weights_dtype": "float32",
                             "forward": [batch, mean_len], "train_mode": True}, calibration_file(config),
                            refresh=refresh, cached_only=cached_only, log=log)
            cal_base = cal_base or cal
            per_token = _per_layer(cal, "forward", shape.layers) / (batch * mean_len)
            eval_per_token = _per_layer(cal, "forward_eval", shape.layers) / (batch * mean_len)
            once[f"{f.name}: tokenize {n_texts:,} texts"] = n_texts * tokenize_seconds
            per_epoch[f"{f.name}: encoder on {padded:,} padded tokens"] = padded * per_token
            per_epoch[f"{f.name}: evaluation ({eval_padded:,} tokens)"] = eval_padded * eval_per_token
            load[f"{f.name}: load encoder"] = shape.weights_file_bytes / LOAD_BYTES_PER_SECOND
            memory[f"{f.name}: encoder weights"] = weights_bytes
            trainable = f.encoder.trainable or f.encoder.adapter is not None
            if trainable:  # fine-tuned encoder: activations for backward, gradients, AdamW
                n_trainable = shape.parameters if f.encoder.trainable else \
                    (adapter_parameters(shape, f.encoder.adapter) or
                     _meta_adapter_parameters(folder, f.encoder.adapter, False, f.encoder.trust_remote_code))
                memory[f"{f.name}: gradients + AdamW ({n_trainable:,} params)"] = 12 * n_trainable
                memory[f"{f.name}: activations (batch {batch})"] = saved_activation_bytes(
                    shape, batch * longest, trains_base=f.encoder.trainable, bf16=precision.bf16,
                    checkpointing=False)
                per_epoch[f"{f.name}: encoder on {padded:,} padded tokens"] *= 3  # backward ~ 2x forward
            widest = max(min(batch, n_train), min(eval_batch, max(n_eval, 1)))
            memory[f"{f.name}: largest forward ({widest} rows)"] = \
                _resident(forward_transient_bytes(shape, widest, longest, elem), hw)
        if lengths:
            facts[f"{f.name}: tokens"] = int(total_tokens)
    steps = math.ceil(n_train / batch) * t.epochs
    head = cal_base if cal_base and "head_step" in cal_base else \
        calibrate({"head": True}, calibration_file(config), refresh=refresh, cached_only=cached_only, log=log)
    head_step = head.get("head_step", math.nan)
    cal_base = cal_base or head
    if not cached_only and all(model.is_cached(f) for f in texts):  # the head is the whole training: time it
        _fit_for_timing(model, data.frames["training"], widths)
        head_step = _own_head_step_seconds(model, data.frames["training"], batch, widths) or head_step
        if data.files:  # and the streamed pass that writes its rows: each split reads the whole file
            per_file_row, per_row = _streamed_prepare_seconds(model, data.files["training"])
            file_rows = stream.parquet_rows(data.files["training"].path)
            once["preprocessing (streamed, every split)"] = \
                len(data.files) * file_rows * per_file_row + sum(data.rows.values()) * per_row
    per_epoch["head: optimizer steps"] = math.ceil(n_train / batch) * head_step
    per_epoch["head: evaluation"] = math.ceil(max(n_eval, 1) / eval_batch) * head_step
    facts["steps"] = steps
    facts["precision"] = device.precision(t.use_mixed_precision, "train" if train_bf16 else "head").name
    base = _base_parts(cal_base, hw, data.data_bytes())
    if data.streamed and hw.device != "cuda":  # fitting vocabularies and statistics reads these columns whole
        fitted = [FT.column(f) for f in list(config.input_features) + list(config.output_features) if f.type != "text"]
        training = data.frames["training"]
        base["training split's non-text columns (fitting)"] = \
            int(training[list(dict.fromkeys(fitted))].memory_usage(deep=True).sum() * data.scale("training"))
        # targets and narrow inputs (a number, a category's index) stay in memory: at most 8 bytes a row each
        # (cadenza.data.stream.IN_MEMORY_ROW_BYTES; a set's multi-hot rows are wider and go to disk)
        base["targets and narrow inputs (8 bytes a row each)"] = 8 * len(fitted) * sum(data.rows.values())
    load = {"imports": _import_seconds(cal_base, already), **load}
    parts = {**base, **memory}
    peak = sum(parts.values())
    if peak_phase and sum(base.values()) + sum(peak_phase.values()) > peak:  # the embedding pass peaks
        parts = {**base, **peak_phase}
        peak = sum(parts.values())
    seconds_per_epoch = sum(per_epoch.values())
    time_parts = {**{k: v for k, v in load.items() if v > 0.05}, **once,
                  **{f"{k} (per epoch)": v for k, v in per_epoch.items()}}
    total = sum(load.values()) + sum(once.values()) + t.epochs * seconds_per_epoch
    return Estimate("ecd", hw.device, int(peak), {k: int(v) for k, v in parts.items()}, None, seconds_per_epoch,
                    total, time_parts, t.epochs, facts)


def _bucket(n: int) -> int:
    """Round a calibration shape to one of a few sizes, so nearby runs share the cached measurement."""
    return max(1, int(round(2 ** (round(2 * math.log2(max(n, 1))) / 2))))


# texts per split tokenized for their lengths: the estimate of a large split tokenizes an evenly spaced sample
# instead of every text a second time (the run tokenizes them anyway): at 14,000 rows that was 1 s of a 5 s train.
# 1,000 keeps the token sum within 2% (5 synthetic splits of 12,000 texts of 3-40 words, 14,000 review texts;
# 500 was off by up to 3.3%) and costs train's start line ~0.1 s less than 2,000 did on the README's 3,000 rows
LENGTH_SAMPLE = 1000
LONGEST_CANDIDATES = 32  # the texts with the most characters, tokenized for the longest row (memory peaks there)


def _sampled_lengths(tokenizer, texts: dict[str, list[str]], max_len: int,
                     warm: bool = False) -> tuple[dict, dict, int, float]:
    """Token lengths of each split's texts (at most LENGTH_SAMPLE of them, evenly spaced), per split how many texts
    each sampled one stands for, the longest text's token length (looked for among the longest by characters:
    an evenly spaced sample would miss the rare long text), and the seconds tokenizing takes per text (`warm`: as in
    a long pass, which is worth a warm-up pass first where tokenizing takes seconds): the fastest split's rate, as
    calibrations take the best of their runs (on this VM one call on the same 1,000 texts took 30 to 161 us a text)."""
    from .ecd.tokens import token_ids

    lengths, scale, longest, rates = {}, {}, 0, []

    def count(picked: list[str], timed: bool = True) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.fromiter(map(len, token_ids(tokenizer, picked, max_len)), dtype=np.int64, count=len(picked))
        if timed and picked:  # the longest texts are not a fair sample of the time a text takes
            rates.append(((time.perf_counter() - t0) / len(picked), len(picked)))
        return out

    token_ids(tokenizer, [""], max_len)  # not timed: the first call sets up the tokenizer's truncating copy
    spread = lambda values: [values[i] for i in np.linspace(0, len(values) - 1, LENGTH_SAMPLE).astype(int)]  # noqa: E731
    largest = max(texts.values(), key=len, default=[])
    if warm and len(largest) > 1:
        # not timed either: tokenizers keep a cache of the words they split, which a long pass keeps warm; on a cold
        # one the sample took 81 us a text where 65,536-text chunks of the same file took 58-63 (MiniLM's WordPiece)
        token_ids(tokenizer, spread(largest), max_len)
    for split, values in texts.items():
        if len(values) <= LENGTH_SAMPLE:
            lengths[split], scale[split] = count(values), 1.0
        else:
            lengths[split] = count(spread(values))
            scale[split] = len(values) / LENGTH_SAMPLE
            chars = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
            widest = np.argpartition(chars, -LONGEST_CANDIDATES)[-LONGEST_CANDIDATES:]
            longest = max(longest, int(count([values[i] for i in widest], timed=False).max()))
        longest = max(longest, int(lengths[split].max()))
    # a call on a few texts is mostly the call's own cost: the rate of the calls on 100 texts or more, if any
    fair = [rate for rate, n in rates if n >= 100] or [sum(r * n for r, n in rates) / max(1, sum(n for _, n in rates))]
    return lengths, scale, longest, min(fair)


def _padded(lengths: np.ndarray, batch: int) -> int:
    return sum(int(lengths[i:i + batch].max()) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))


def _uncached_texts(model, feature, max_len: int, texts: dict[str, list[str]], data: DataSample) -> int:
    """Distinct texts not yet in the embedding cache (reads only the cache shards' keys); for a streamed run, each
    split's sampled texts not in the cache, scaled to the split's rows."""
    from .ecd.embed_cache import text_key
    from .ecd.text_encoder import fingerprint, revision_known

    keys = {split: {text_key(x) for x in values} for split, values in texts.items()}
    known: set = set()
    folder = model._cache_folder() / "embeddings" / fingerprint(feature.encoder, max_len)
    if revision_known(feature.encoder) and folder.exists():
        from safetensors import safe_open

        for shard in folder.glob("shard-*.safetensors"):
            try:
                with safe_open(str(shard), "np") as f:
                    known.update(k.tobytes() for k in f.get_tensor("keys"))
            except Exception:  # an unreadable shard is recomputed by the run: count its texts as missing
                continue
    if data.streamed:
        return int(sum(data.scale(split) * len(k - known) for split, k in keys.items()))
    return len(set().union(*keys.values()) - known)


# the training loop's bookkeeping (Accelerate, progress, statistics) on top of a bare step of a small head: a 384 -> 2
# head took 0.58 ms a step through train.loop.fit against 0.47 ms bare (2-core AVX512-BF16 CPU, one thread)
LOOP_BOOKKEEPING = 1.25


def _fit_for_timing(model, train, widths: dict[str, int]) -> None:
    """What a run fits before it trains (vocabularies, statistics), on the training rows at hand, with each cached
    text input at its encoder's width: the metadata _own_head_step_seconds and _streamed_prepare_seconds use."""
    model.log = lambda _: None
    model.metadata = model._fit_metadata(train)
    for name, width in widths.items():
        model.metadata[name]["embedding_size"] = width


def _own_head_step_seconds(model, train, batch: int, widths: dict[str, int]) -> Optional[float]:
    """One optimizer step of this config's own head network (forward, loss, backward, clipping, the optimizer) on
    `batch` rows of the training split, cached text inputs as zero vectors of their encoder's width, on the threads
    the run would use. A head of several inputs and layers costs several times the generic 384 -> 2 probe's step
    (a text, a number and a category into a 2-class head, batches of 256: ~1.4 ms against 0.55). Its random draws
    (initial weights, dropout) come from a forked generator: the caller's torch random state is left as it was."""
    import torch

    from .ecd import features as FT
    from .ecd.network import threads_for, torch_threads
    from .train.loop import build_optimizer

    # `train`: the training split's frame (a streamed split's sample); model.metadata from _fit_for_timing
    rows = model._clean(train.head(batch), True, "training")
    if not len(rows):  # every row dropped for missing values: nothing to time (the generic step stands)
        return None
    inputs = {f.name: np.zeros((len(rows), widths[f.name]), np.float32) if f.name in widths else
              FT.encode_input(rows, f, model.metadata[f.name]) for f in model.config.input_features}
    targets = {f.name: FT.encode_target(rows, f, model.metadata[f.name]) for f in model.config.output_features}
    data = {"n": len(rows), "rows": None, "inputs": inputs, "targets": targets}
    one = model._batch(data, np.arange(len(rows)), True)
    t = model.config.trainer
    clip = t.gradient_clipping.clipglobalnorm or t.gradient_clipping.clipnorm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = model._build_net().train()
        optimizer = build_optimizer(net.parameters(), t)

        def steps():
            for _ in range(10):
                model._loss_sum(net, one).backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad()

        with torch_threads(threads_for(net, batch)):
            return LOOP_BOOKKEEPING * _timed(steps, parallel=False) / 10


def _streamed_prepare_seconds(model, split) -> tuple[float, float]:
    """What the streamed preprocessing pass (ecd._prepare_streamed) costs: (seconds a row of the file, read and
    decoded once per split: every split's pass scans the whole file; seconds a row of the split: cleaned, encoded,
    its texts' cache keys computed, written to row arrays). Measured on the file's first chunk, the split's rows
    among it, with row arrays in a scratch folder; tokenizing and embedding are estimated apart, and reading
    cached vectors back from the cache's shards is not counted. Needs model.metadata (_fit_for_timing)."""
    import shutil
    import tempfile

    from .data import stream
    from .ecd import features as FT
    from .ecd.embed_cache import text_keys

    features = list(model.config.input_features) + list(model.config.output_features)
    columns = list(dict.fromkeys(FT.column(f) for f in features))
    folder = Path(tempfile.mkdtemp(prefix="cadenza-estimate-"))
    try:
        t0 = time.perf_counter()
        positions, chunk = next(split.chunks(columns), (np.zeros(0, np.int64), None))
        if chunk is None or not len(chunk):
            return 0.0, 0.0
        read = time.perf_counter() - t0
        file_rows = int(chunk.index.max()) + 1  # the chunk's rows of the file (its index: file row numbers)
        t0 = time.perf_counter()
        chunk = model._clean(chunk, True, "training")
        store = stream.RowArrays(folder, len(split))
        at = positions[:len(chunk)]
        for f in model.config.input_features:
            if f.type == "text":
                keys = text_keys(model._texts(chunk, f))
                store.write(f.name, at, np.zeros((len(keys), model.metadata[f.name]["embedding_size"]), np.float32))
            else:
                store.write(f.name, at, np.asarray(FT.encode_input(chunk, f, model.metadata[f.name])))
        for f in model.config.output_features:
            FT.encode_target(chunk, f, model.metadata[f.name])
        return read / file_rows, (time.perf_counter() - t0) / len(positions)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _head_step_seconds() -> float:
    """One optimizer step of a small head (forward, backward, AdamW, the loop's bookkeeping), measured on a
    384 -> 2 linear layer: at this size the cost is per-call overhead, the same for any small head."""
    import torch

    layer = torch.nn.Linear(384, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    x, y = torch.randn(64, 384), torch.randint(0, 2, (64,))

    def step():
        loss = torch.nn.functional.cross_entropy(layer(x), y, reduction="sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    # the loop's accelerate/tqdm/tracker bookkeeping roughly doubles a step this small
    return 2 * _timed(lambda: [step() for _ in range(20)], parallel=False) / 20


def _current_base_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _local_model_folder(source: str, config) -> str:
    """A local folder with config.json for `source`: the folder itself, a converted GGUF copy, or the hub cache."""
    path = Path(source)
    if path.is_dir():
        return str(path)
    if path.suffix.lower() == ".gguf":
        from .llm.load import CONVERTED_MARKER, gguf_cache_dir

        folder = gguf_cache_dir(path, configured_cache_dir(config))
        if (folder / CONVERTED_MARKER).exists():
            return str(folder)
        return _gguf_config_folder(path, folder)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, allow_patterns=["*.json"], local_files_only=True)
    except Exception:
        raise CadenzaError(f"estimate: {source} is neither a local folder nor a model in the Hugging Face cache; "
                           "download it first (a run does), then estimate") from None


def _gguf_config_folder(gguf: Path, converted: Path) -> str:
    """A GGUF file not converted yet: write its config.json (read from the GGUF header) next to where the
    converted copy will go, so the shapes are known without dequantizing."""
    folder = converted.with_name(converted.name + "-config")
    if not (folder / "config.json").exists():
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------------------------------- llm
def _estimate_llm(config, data: DataSample, hw, already, refresh, cached_only, seed, log) -> Estimate:
    from .data.assets import resolve_model_name
    from .llm import batching
    from .llm.load import CONVERTED_MARKER, gguf_cache_dir, load_tokenizer, resolve_source
    from .llm.model import LlmModel

    t = config.trainer
    source, gguf = resolve_source(config.base_model)
    converted = gguf is None or (gguf_cache_dir(gguf, configured_cache_dir(config)) / CONVERTED_MARKER).exists()
    if not converted and cached_only:  # reading a GGUF's tokenizer takes seconds: the run converts it next anyway
        raise CadenzaError("the GGUF base model is converted first (`cadenza estimate` counts the conversion)")
    folder = _local_model_folder(resolve_model_name(config.base_model) if gguf else source, config)
    shape = read_shape(folder, causal=True, trust_remote_code=config.trust_remote_code)
    model = LlmModel(config)
    model.tokenizer = load_tokenizer(folder, config.trust_remote_code) if converted else _gguf_tokenizer(gguf)
    model._ensure_builder()
    quiet = lambda _: None  # noqa: E731
    records = model._answered_records(data.frames["training"], "training", quiet)
    # a streamed run's sample is not what training tokenizes: no token cache entry for it
    rows = model._tokenize(records, with_targets=True, cache=not data.streamed)
    scale = data.scale("training")
    size = model._batch_size()
    rows_per_batch = size * (t.packing_max_sequences_per_pack or 1) if t.packing else size
    groups = batching.epoch_groups(rows, 0, seed, packed=t.packing, rows_per_batch=rows_per_batch,
                                   max_tokens=t.max_tokens_per_batch if t.packing else None,
                                   shuffle=t.should_shuffle)
    share = _can_share_prefix(folder)
    computed = [batching.computed_tokens(rows, g, packed=t.packing, share_prefix=share) if t.packing else
                len(g) * int(max(len(rows.ids[i]) for i in g)) for g in groups]
    # a streamed split's sample stands for all its rows: counts and sums scale, shapes (longest, mean) do not
    computed_tokens = int(sum(computed) * scale)
    n_groups = int(round(len(groups) * scale))
    n_rows = int(round(len(rows) * scale))
    targets = int(rows.target_tokens(t.train_on_inputs).sum() * scale)
    total_tokens = int(rows.lengths.sum() * scale)
    val_df = data.frames.get("validation")
    val_tokens, val_batches = 0, 0
    if val_df is not None and len(val_df) and not t.skip_all_evaluation:
        val_records = model._answered_records(val_df, "validation", quiet)
        if val_records:
            val_rows = model._tokenize(val_records, with_targets=True, cache=not data.streamed)
            eval_groups = batching.eval_groups(val_rows, model._batch_size(eval_=True),
                                               t.max_tokens_per_batch if t.packing else None)
            val_tokens = int(data.scale("validation") * sum(
                batching.computed_tokens(val_rows, g, packed=True, share_prefix=share) for g in eval_groups))
            val_batches = int(round(len(eval_groups) * data.scale("validation")))
    if t.evaluate_training_set:
        val_tokens += computed_tokens
        val_batches += n_groups

    # ---- what trains, in which precision
    training = t.type != "none"
    adapter = config.adapter
    precision = device.precision(t.use_mixed_precision, "train")
    weights_precision = device.precision(t.use_mixed_precision, "weights")
    full = training and adapter is None
    weights_dtype = "float32" if full else weights_precision.name.replace("bf16", "bfloat16").replace("fp32", "float32")
    elem_weights = 4 if weights_dtype == "float32" else 2
    quantized = config.quantization is not None and hw.device == "cuda"
    if adapter is not None:
        trainable = adapter_parameters(shape, adapter) or _meta_adapter_parameters(folder, adapter, True,
                                                                                 config.trust_remote_code)
    else:
        trainable = shape.parameters if training else 0
    longest = max(computed) if computed else 0
    mean_tokens = int(np.mean(computed)) if computed else 1
    target_share = targets / max(total_tokens, 1)
    mean_row = max(2, int(total_tokens / max(n_rows, 1)))

    # ---- calibration: the architecture cut to 1 and a few more blocks, on this run's micro-batch shape
    spec = {"source": folder, "causal": True, "bf16": precision.bf16, "weights_dtype": weights_dtype,
            "adapter": adapter.model_dump(mode="json") if adapter is not None and adapter.type == "lora" else None}
    if training:
        spec["train"] = {"mode": "adapter" if spec["adapter"] else "full", "tokens": _bucket(mean_tokens),
                         "row_length": min(mean_row, _bucket(mean_tokens)),
                         "prompt_length": max(1, int(min(mean_row, _bucket(mean_tokens)) * (1 - target_share))),
                         "checkpointing": t.enable_gradient_checkpointing}
    else:
        spec["forward"] = [1, _bucket(mean_tokens)]
    cal = calibrate(spec, calibration_file(config), refresh=refresh, cached_only=cached_only, log=log)

    # ---- memory
    weights = int(shape.parameters * (0.56 if quantized else elem_weights))  # nf4 + its scales ~ 4.5 bits
    parts = _base_parts(cal, hw, data.data_bytes())
    if data.streamed and hw.device != "cuda":  # cadenza.llm.token_store keeps each split's row index in memory
        parts["token store index (24 bytes a row)"] = 24 * sum(data.rows.values())
    parts["base weights" + (f" ({weights_dtype})" if not quantized else " (4-bit)")] = weights
    load_parts = dict(parts)
    if not quantized and hw.device != "cuda":
        # the safetensors pages stay mapped while they are cast/copied into the model's tensors
        load_parts["weights file pages while loading"] = shape.weights_file_bytes
    if training:
        states = (12 if full else 16) * trainable  # full: + grads + 2 AdamW states; adapter: fp32 weights too
        parts[f"gradients + AdamW ({trainable:,} trainable)"] = states
        if full and precision.bf16:
            parts["bf16 copies of the weights (autocast)"] = 2 * shape.parameters
        explicit = precision.bf16 and weights_dtype == "bfloat16" and t.packing and share  # attention's bf16 form
        parts[f"activations ({longest:,} tokens)"] = saved_activation_bytes(
            shape, longest, trains_base=full, bf16=precision.bf16, checkpointing=t.enable_gradient_checkpointing,
            adapter_dropout_width=adapter_dropout_width(shape, adapter),
            attention_scores=_attention_scores(rows, groups, computed) if explicit else 0)
        parts["target logits"] = logits_bytes(shape, int(longest * target_share) + 1)
    peak_parts = parts if sum(parts.values()) >= sum(load_parts.values()) else load_parts

    # ---- time
    setup = {"imports": _import_seconds(cal, already)}
    if not converted:
        setup["convert GGUF once"] = shape.parameters * GGUF_SECONDS_PER_PARAMETER
        peak_gguf = {**_base_parts(cal, hw, 0), "converting GGUF (two fp32 copies)": 2 * 4 * shape.parameters}
        if sum(peak_gguf.values()) > sum(peak_parts.values()):
            peak_parts = peak_gguf
    setup["load base weights"] = shape.weights_file_bytes / LOAD_BYTES_PER_SECOND
    per_epoch: dict = {}
    if training:
        if not device.peak_flops_known(precision.bf16):
            setup["measure the peak FLOP/s (MFU)"] = cal.get("peak_flops_seconds", 0.0)
        setup["first step's warm-up"] = _per_layer(cal, "train_warmup", shape.layers)
        micro = _per_layer(cal, "train", shape.layers)
        tokens_cal = cal.get("train_tokens_1", math.nan)  # NaN: not calibrated (train's start line, cached_only)
        per_epoch[f"forward + backward ({computed_tokens:,} tokens)"] = micro * computed_tokens / tokens_cal
        from .train.loop import plan_steps

        plan = plan_steps(t, n_groups, rows_per_batch, 1)
        steps_per_epoch = plan.steps_per_epoch
        optimizer = _per_layer(cal, "optimizer", shape.layers)
        per_epoch[f"optimizer ({steps_per_epoch} steps)"] = optimizer * steps_per_epoch * \
            (trainable / max(1, _probe_trainable(cal, shape)))
        if val_tokens:
            per_epoch[f"evaluation ({val_tokens:,} tokens)"] = _per_layer(cal, "eval", shape.layers) * val_tokens \
                / tokens_cal
        saves = _checkpoints_per_epoch(t, steps_per_epoch)
        if saves:  # the trainable weights (fp32) and AdamW's two states, written for resume (train.checkpoint)
            per_epoch[f"checkpoint for resume ({saves} per epoch)"] = saves * 12 * trainable / SAVE_BYTES_PER_SECOND
        epochs = t.epochs if not t.train_steps else min(t.epochs, math.ceil(t.train_steps / max(steps_per_epoch, 1)))
    else:
        epochs = 0
    after = {}
    if full:
        after["save the weights"] = 4 * shape.parameters / SAVE_BYTES_PER_SECOND
    seconds_per_epoch = sum(per_epoch.values())
    total = sum(setup.values()) + epochs * seconds_per_epoch + sum(after.values())
    facts = {"parameters": shape.parameters, "trainable": trainable, "rows": n_rows, "tokens": total_tokens,
             "computed tokens": computed_tokens, "target tokens": targets, "micro-batches": n_groups,
             "batch size": size, "precision": precision.name if training else weights_precision.name,
             "weights": weights_dtype if not quantized else "4-bit",
             "gradient checkpointing": t.enable_gradient_checkpointing}
    time_parts = {**{k: v for k, v in setup.items() if v > 0.05}, **{f"{k} (per epoch)": v for k, v in per_epoch.items()},
                  **after}
    return Estimate("llm", hw.device, int(sum(peak_parts.values())), {k: int(v) for k, v in peak_parts.items()},
                    None, seconds_per_epoch, total, time_parts, epochs, facts)


def _attention_scores(rows, groups: list[list[int]], computed: list[int]) -> int:
    """The most attention scores per head that one micro-batch's attention keeps training in bf16: T^2 over a short
    pack's block mask, at most T x its longest row row by row over a long one (cadenza.llm.attention)."""
    from .llm import attention

    return max((t * t if not attention.rows_pay(t, low_precision=True) else t * int(max(rows.lengths[i] for i in g))
                for g, t in zip(groups, computed)), default=0)


def _checkpoints_per_epoch(t, steps_per_epoch: int) -> int:
    """How often train.loop writes its resume checkpoint in an epoch (loop.checkpoint_due, then the epoch's end)."""
    every = t.steps_per_checkpoint or (max(1, steps_per_epoch // t.checkpoints_per_epoch)
                                       if t.checkpoints_per_epoch > 1 else 0)
    during = steps_per_epoch // every if every else 0
    if t.checkpoints_per_epoch and every and steps_per_epoch % every == 0:
        during -= 1  # the last one falls on the epoch's end, which writes it
    return during + (1 if t.checkpoints_per_epoch else 0)


def _probe_trainable(cal: dict, shape: Shape) -> int:
    """Trainable parameters of the full-depth model as the probe's two models predict them."""
    if "probe_layers" not in cal:  # not calibrated: the times using this are NaN anyway
        return 1
    a, b = cal["probe_layers"]
    one, deeper = cal[f"trainable_{a}"], cal[f"trainable_{b}"]
    return one + (shape.layers - 1) * (deeper - one) // (b - a)


def _can_share_prefix(folder: str) -> bool:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return not cfg.get("sliding_window") and all(x == "full_attention" for x in cfg.get("layer_types") or [])


def _gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    from .llm.load import fix_special_tokens

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fix_special_tokens(tok)
    return tok


if __name__ == "__main__":  # the calibration probe: python -m cadenza.estimate '<spec json>'
    print(json.dumps(probe(json.loads(sys.argv[1]))))
