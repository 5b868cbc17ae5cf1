"""Prompt + response -> token ids, with the target boundary and truncation; cached on disk.

Each row is `prompt ids + response ids + [EOS]`. The EOS is appended as an id (not text), so it is trained
even when pad == EOS and generation learns to stop. `prompt_len` marks where the target starts: the loss
covers positions >= prompt_len (or every position after the first with trainer.train_on_inputs).
Multi-turn chat rows (cadenza.llm.chat) have several target spans: they carry a per-token `masks` entry instead,
and their prompt_len is only where the first target starts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..artifacts import temporary_sibling

CACHE_VERSION = "v1"


@dataclass
class TokenizedRows:
    # int64 token ids per row: a list, or rows read from disk (cadenza.llm.token_store.TokenIds) for data larger
    # than memory; either way `ids[i]` is row i
    ids: Sequence[np.ndarray]
    prompt_lens: np.ndarray        # int64, tokens of prompt per row (target starts there)
    truncated: int = 0             # rows shortened by global_max_sequence_length
    masks: Optional[list[np.ndarray]] = None  # chat rows: bool per token, True where the token is a target
    _lengths: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row (int64), computed once: batching asks for it per row and per epoch."""
        known = getattr(self.ids, "lengths", None)  # a store knows its rows' lengths without reading them
        if known is not None:
            return known
        if self._lengths is None or len(self._lengths) != len(self.ids):
            self._lengths = np.fromiter(map(len, self.ids), dtype=np.int64, count=len(self.ids))
        return self._lengths

    def target_tokens(self, train_on_inputs: bool = False) -> np.ndarray:
        if train_on_inputs:
            return self.lengths - 1
        if self.masks is not None:  # position 0 predicts nothing, so its mark never counts
            return np.array([int(m[1:].sum()) for m in self.masks], dtype=np.int64)
        return self.lengths - self.prompt_lens


_FINGERPRINTS: dict[int, str] = {}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normalizer), so a cache never outlives a change."""
    key = id(tokenizer)
    if key not in _FINGERPRINTS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}|{len(tokenizer)}"
        specials = f"|{tokenizer.eos_token_id}|{tokenizer.pad_token_id}|{tokenizer.bos_token_id}"
        _FINGERPRINTS[key] = hashlib.sha256((text + specials).encode()).hexdigest()
    return _FINGERPRINTS[key]


def truncate(prompt: list[int], target: list[int], max_len: Optional[int]) -> tuple[list[int], list[int], bool]:
    """Fit prompt + target into max_len. The prompt keeps its end (it holds the response header next to the
    answer) and gets at least half the budget when the target is long; the target keeps its beginning."""
    if not max_len or len(prompt) + len(target) <= max_len:
        return prompt, target, False
    keep_prompt = min(len(prompt), max(max_len // 2, max_len - len(target)))
    keep_target = max_len - keep_prompt
    return prompt[len(prompt) - keep_prompt:], target[:keep_target], True


def tokenize_rows(tokenizer, prompts: list[str], targets: Optional[list[str]], *, max_len: Optional[int],
                  add_special_tokens: bool, cache_dir: Optional[Path] = None) -> TokenizedRows:
    """targets None: prompts only (generation/zero-shot), no EOS appended."""
    key = None
    if cache_dir is not None:
        h = hashlib.sha256()
        for part in (CACHE_VERSION, tokenizer_fingerprint(tokenizer), str(max_len), str(add_special_tokens),
                     str(targets is None)):
            h.update(part.encode() + b"\x00")
        for text in prompts:
            h.update(text.encode() + b"\x01")
        for text in targets or []:
            h.update(text.encode() + b"\x02")
        key = h.hexdigest()[:24]
        cached = _read_cache(Path(cache_dir) / f"{key}.safetensors")
        if cached is not None:
            return cached

    prompt_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    if targets is None:
        rows, plens, truncated = [], [], 0
        for p in prompt_ids:
            if max_len and len(p) > max_len:
                p, truncated = p[len(p) - max_len:], truncated + 1
            rows.append(np.asarray(p, dtype=np.int64))
            plens.append(len(p))
        out = TokenizedRows(rows, np.asarray(plens, dtype=np.int64), truncated)
    else:
        target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        rows, plens, truncated = [], [], 0
        for p, t in zip(prompt_ids, target_ids):
            p, t, cut = truncate(list(p), list(t) + [eos], max_len)
            truncated += cut
            rows.append(np.asarray(p + t, dtype=np.int64))
            plens.append(len(p))
        out = TokenizedRows(rows, np.asarray(plens, dtype=np.int64), truncated)
    if key is not None:
        _write_cache(Path(cache_dir) / f"{key}.safetensors", out)
    return out


def _write_cache(path: Path, rows: TokenizedRows) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = rows.lengths
    flat = np.concatenate(rows.ids) if rows.ids else np.zeros(0, dtype=np.int64)
    tmp = temporary_sibling(path)
    save_file({"ids": flat, "lengths": lengths, "prompt_lens": rows.prompt_lens,
               "truncated": np.asarray([rows.truncated], dtype=np.int64)}, str(tmp))
    os.replace(tmp, path)


def _read_cache(path: Path) -> Optional[TokenizedRows]:
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        data = load_file(str(path))
    except Exception:  # a damaged cache entry is rebuilt, never trusted
        return None
    bounds = np.concatenate([[0], np.cumsum(data["lengths"])])
    ids = [data["ids"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return TokenizedRows(ids, data["prompt_lens"], int(data["truncated"][0]))
