"""A pretrained Hugging Face model as a text encoder: AutoModel (never the LM head) + pooling, optionally adapted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

import torch
from torch import nn

from ..adapters import apply_adapter
from ..artifacts import check_adapter_folder, check_local_source, check_remote_code, refuse_pickled_weights
from ..data.assets import resolve_model_name
from ..device import Precision, peak_flops
from ..phases import note, phase
from ..threads import follow_load
from .tokens import token_ids


def encoder_source(encoder_cfg) -> str:
    name = getattr(encoder_cfg, "pretrained_model_name_or_path", None) or encoder_cfg.base_model
    return resolve_model_name(name)


def check_encoder_sources(config, why: str = "") -> None:
    """Before any encoder loads, for each text input: a source that looks like a local path exists, a local folder
    runs no code its config does not trust and has safetensors weights, and a pretrained adapter folder is whole.
    Errors name the key (input_features[0].encoder.pretrained_model_name_or_path); `why` adds what to do."""
    for i, feature in enumerate(config.input_features):
        encoder = getattr(feature, "encoder", None)
        if feature.type != "text" or encoder is None:
            continue
        key = f"input_features[{i}].encoder"
        field = "pretrained_model_name_or_path" if hasattr(encoder, "pretrained_model_name_or_path") else "base_model"
        source = encoder_source(encoder)
        check_local_source(source, f"{key}.{field}", why)
        if Path(source).is_dir():
            check_remote_code(Path(source), encoder.trust_remote_code, f"{key}.trust_remote_code")
            refuse_pickled_weights(Path(source))
        adapter_weights = encoder.adapter.pretrained_adapter_weights if encoder.adapter is not None else None
        if adapter_weights:
            check_local_source(adapter_weights, f"{key}.adapter.pretrained_adapter_weights")
            if Path(adapter_weights).is_dir():
                check_adapter_folder(Path(adapter_weights))


def _load_kwargs(encoder_cfg, source: str, cache: Optional[str] = None) -> tuple[str, dict]:
    kwargs = dict(encoder_cfg.pretrained_kwargs or {})
    kwargs["trust_remote_code"] = encoder_cfg.trust_remote_code
    if source.lower().endswith(".gguf"):
        from ..llm.load import plain_model_dir

        # dequantized once and cached as safetensors (the same copy the llm path uses)
        return plain_model_dir(source, cache), kwargs
    return source, kwargs


def load_tokenizer(encoder_cfg, cache: Optional[str] = None):
    with phase("imports"):
        from transformers import AutoTokenizer

    path, kwargs = _load_kwargs(encoder_cfg, encoder_source(encoder_cfg), cache)
    kwargs.pop("dtype", None)
    tok = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("trust_remote_code", "revision")})
    if tok.pad_token is None:
        # decoder-only tokenizers often lack a pad token; padding is masked out, so any token serves
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def load_backbone(encoder_cfg, cache: Optional[str] = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """AutoModel gives the base transformer (LlamaModel, BertModel, ...) without any LM head. `dtype`: bf16 for a
    frozen encoder that only embeds in bf16 (no per-batch casts of its weights), fp32 where weights train."""
    path, kwargs = _load_kwargs(encoder_cfg, encoder_source(encoder_cfg), cache)
    with phase("imports"):
        from transformers import AutoConfig, AutoModel

        _import_model_code(path, encoder_cfg.trust_remote_code)
    if getattr(encoder_cfg, "use_pretrained", True):
        # safetensors only, whatever pretrained_kwargs say: transformers would otherwise fall back on pickled .bin
        kwargs["use_safetensors"] = True
        return AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
    return AutoModel.from_config(AutoConfig.from_pretrained(path, **kwargs)).to(dtype)


def _import_model_code(path: str, trust_remote_code: bool) -> None:
    """Import the module of the model class AutoModel will pick (from config.json's model type), so that the phase
    breakdown counts transformers' modelling code (torch's compiler stack, scipy, ...: most of a cold run's import
    time) as imports rather than as loading the weights. AutoModel itself imports nothing else."""
    from transformers import MODEL_MAPPING, AutoConfig

    try:
        MODEL_MAPPING[type(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))]
    except (KeyError, ValueError, OSError):  # remote code or an unusual folder: AutoModel reports it when it loads
        pass


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden (b, t, d), mask (b, t) of 0/1 → (b, d). Works for left and right padding."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "sum":
        return (hidden * m).sum(1)
    if how == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if how == "last":
        index = (positions * mask).argmax(1)  # the last non-pad position
    else:  # cls / cls_pooled: the first non-pad token
        index = torch.where(mask.bool(), positions, mask.shape[1]).argmin(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


# tokens per embedding batch: large enough for efficient matmuls, small enough that a layer's activations stay in
# cache (on a 2-core AVX512-BF16 CPU, 1024-2048 tokens gave ~20% more FLOP per CPU-second than 8192, 16384 ~40% less)
# for MiniLM's width (384). A narrower encoder gets proportionally more tokens, the same bytes a hidden state: its
# batches are otherwise all per-batch overhead (a forward's Python, kernels starting up). A 2-layer BERT of width 32
# embedded 100k 16-token texts in 2.84 s at 2,048 tokens a batch, 1.83 s at 24,576 (medians of 3, alternated).
TOKENS_PER_BATCH = 2048
TOKENS_PER_BATCH_WIDTH = 384


def batch_token_budget(hidden_size: int) -> int:
    """The embedding pass's token budget a batch for an encoder of this width (TOKENS_PER_BATCH above)."""
    return max(TOKENS_PER_BATCH, TOKENS_PER_BATCH * TOKENS_PER_BATCH_WIDTH // max(1, hidden_size))


class TextEncoder(nn.Module):
    """token ids → pooled vector. Frozen unless `trainable`; an adapter makes only its own weights trainable."""

    def __init__(self, encoder_cfg, backbone: Optional[nn.Module] = None, cache: Optional[str] = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = encoder_cfg
        self.backbone = backbone if backbone is not None else load_backbone(encoder_cfg, cache, dtype)
        if encoder_cfg.adapter is not None:
            self.backbone = apply_adapter(self.backbone, encoder_cfg.adapter, "FEATURE_EXTRACTION")
        elif not encoder_cfg.trainable:
            self.backbone.requires_grad_(False)
        self.output_size = self.backbone.config.hidden_size

    @property
    def frozen(self) -> bool:
        return not self.cfg.trainable and self.cfg.adapter is None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        # pooled in fp32: a bf16 sum over the tokens would round each embedding to 8 bits of mantissa
        return pool(out.last_hidden_state.float(), attention_mask, self.cfg.reduce_output)

    def embed(self, texts: list[str], tokenizer, max_length: int, precision: Precision,
              tokens_per_batch: Optional[int] = None) -> np.ndarray:
        """Pooled embeddings of `texts` (row order kept), as float32, for the embedding cache. Tokenized in one
        call; embedded in length-sorted batches of about `tokens_per_batch` tokens (little padding, large matmuls;
        default: batch_token_budget(width)),
        under inference_mode, in `precision` (bf16 weights run as they are; fp32 weights under bf16 autocast).
        FLOPs and tokens go to the run's phase breakdown (cadenza.phases)."""
        if not texts:
            return np.zeros((0, self.output_size), dtype=np.float32)
        with phase("tokenize"):
            ids = token_ids(tokenizer, texts, max_length)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            order = np.argsort(lengths, kind="stable")
        with phase("measure peak"):  # for the share of peak in the breakdown: measured once a process
            peak = peak_flops(precision.bf16)
        device = next(self.parameters()).device
        # weights already in the precision (a frozen encoder loaded in bf16) need no autocast re-casting them
        weights_dtype = next(self.parameters()).dtype
        cast = precision.autocast(device.type) if weights_dtype != precision.dtype else contextlib.nullcontext()
        out = np.zeros((len(texts), self.output_size), dtype=np.float32)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eval()
        padded_tokens = 0
        # the thread count follows other processes' load between batches (cadenza.threads)
        budget = tokens_per_batch or batch_token_budget(self.output_size)
        started = time.perf_counter()
        with phase("embed"), torch.inference_mode(), cast, follow_load() as threads:
            for index in length_batches(lengths, order, budget):
                input_ids, mask = _padded(ids, lengths, index, pad)
                out[index] = self(input_ids.to(device), mask.to(device)).float().cpu().numpy()
                padded_tokens += input_ids.numel()
                threads.tick()
        flops = self.flops(lengths)
        with phase("measure peak"):  # again if the pass ran faster than the first reading
            peak = peak_flops(precision.bf16, reached=flops / (time.perf_counter() - started))
        note("embed", flops=flops, tokens=int(lengths.sum()), padded_tokens=padded_tokens,
             texts=len(texts), peak_flops=peak, precision=precision.name, threads=threads.threads_used())
        return out

    def flops(self, lengths: np.ndarray) -> float:
        """Forward FLOPs of embedding sequences of these lengths (padding not counted): 2 per weight of every
        linear layer per token, plus attention's two (L x L x hidden) matmuls per layer per sequence. The pooler
        (once per sequence) and the embedding lookups are left out."""
        cfg = self.backbone.config
        linear = sum(m.weight.numel() for name, m in self.backbone.named_modules()
                     if isinstance(m, nn.Linear) and "pooler" not in name)
        layers = getattr(cfg, "num_hidden_layers", 0) or 0
        lengths = lengths.astype(np.float64)
        return float(2 * linear * lengths.sum() + 4 * layers * cfg.hidden_size * (lengths ** 2).sum())


def length_batches(lengths: np.ndarray, order: np.ndarray, tokens_per_batch: int):
    """Index arrays of texts of similar length (`order` sorts `lengths`), each padded to at most about
    `tokens_per_batch` tokens; a text longer than that is a batch of its own."""
    start = 0
    while start < len(order):
        end = start + 1
        # the batch grows while (rows x its longest length) stays within the budget; lengths grow along `order`
        while end < len(order) and (end + 1 - start) * lengths[order[end]] <= tokens_per_batch:
            end += 1
        yield order[start:end]
        start = end


def _padded(ids: list, lengths: np.ndarray, index: np.ndarray, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and attention mask of the texts `index` (pooling handles either side)."""
    width = int(lengths[index].max())
    input_ids = np.full((len(index), width), pad, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for row, i in enumerate(index):
        input_ids[row, :lengths[i]] = ids[i]
        mask[row, :lengths[i]] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def fingerprint(encoder_cfg, max_length: int) -> str:
    """Everything that changes an embedding except the text: weights/revision (file names, sizes, mtimes and the
    model config), tokenizer files, max length, pooling, and pretrained kwargs."""
    source = encoder_source(encoder_cfg)
    h = hashlib.sha256()
    h.update(json.dumps({"source": source, "max_length": max_length, "pool": encoder_cfg.reduce_output,
                         "kwargs": encoder_cfg.pretrained_kwargs or {}, "use_pretrained": encoder_cfg.use_pretrained
                         if hasattr(encoder_cfg, "use_pretrained") else True, "v": 1}, sort_keys=True).encode())
    path = Path(source)
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(path.parent if path.is_file() else path)}:{st.st_size}:{st.st_mtime_ns}".encode())
            if f.name.endswith(".json") and st.st_size < 5_000_000:
                h.update(f.read_bytes())
    else:
        # a hub id: the revision comes from the local HF cache (snapshot folder name = commit hash)
        h.update(_hub_revision(source).encode())
    return h.hexdigest()[:32]


def revision_known(encoder_cfg) -> bool:
    """False for a hub id not downloaded yet: its fingerprint cannot name the revision until it is."""
    source = encoder_source(encoder_cfg)
    return Path(source).exists() or _hub_revision(source) != "unknown"


def _hub_revision(repo_id: str) -> str:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
        return str(Path(found).parent.name) if isinstance(found, str) else "unknown"
    except Exception:  # an odd id is not fatal here: loading the model reports it properly
        return "unknown"
