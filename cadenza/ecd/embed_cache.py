"""Embeddings of a frozen text encoder, computed once per distinct text and kept on disk.

Layout: `<cache>/embeddings/<encoder fingerprint>/shard-*.safetensors`, each shard holding `keys` (16-byte text
hashes) and `embeddings`. The fingerprint covers weights/revision, tokenizer, max length and pooling, so a
second run with the same encoder (any head, any split) hits, and anything that changes an embedding misses.
Shards are written to a temporary name and renamed: a crash leaves no partial shard, and a shard that fails to
load (e.g. a disk fault) is removed and recomputed.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..device import Precision


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


class EmbeddingCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, log: Callable = print) -> dict[bytes, np.ndarray]:
        table: dict[bytes, np.ndarray] = {}
        if not self.folder.exists():
            return table
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                data = load_file(str(shard))
                keys, vectors = data["keys"].numpy(), data["embeddings"].numpy()
            except Exception as e:  # a damaged shard must not poison the run: drop it and recompute
                log(f"embedding cache: dropping unreadable shard {shard.name} ({e})")
                shard.unlink(missing_ok=True)
                continue
            for k, v in zip(keys, vectors):
                table[k.tobytes()] = v
        return table

    def add(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if not keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        key_array = torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16).copy())
        save_file({"keys": key_array, "embeddings": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))},
                  str(tmp))
        os.replace(tmp, self.folder / name)


def embed_texts(texts: list[str], encoder, tokenizer, max_length: int, precision: Precision,
                batch_size: int = 128) -> np.ndarray:
    """Embed with no grad, in length-sorted batches (little padding), in the given precision."""
    if not texts:
        return np.zeros((0, encoder.output_size), dtype=np.float32)
    ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    device = next(encoder.parameters()).device
    out = np.zeros((len(texts), encoder.output_size), dtype=np.float32)
    encoder.eval()
    with torch.no_grad(), precision.autocast(device.type):
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [ids[i] for i in index]}, return_tensors="pt")
            vectors = encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out[index] = vectors.float().cpu().numpy()
    return out


CHUNK = 8192  # texts embedded and written as one cache shard: an interrupted run keeps what it finished


def cached_embeddings(texts: list[str], cache: EmbeddingCache, compute: Callable[[list[str]], np.ndarray],
                      log: Callable = print, chunk: int = CHUNK) -> tuple[np.ndarray, CacheStats]:
    """Embeddings for `texts` (row order kept), computing only the distinct texts the cache lacks."""
    table = cache.load(log)
    keys = [text_key(t) for t in texts]
    missing: dict[bytes, str] = {}
    for k, t in zip(keys, texts):
        if k not in table and k not in missing:
            missing[k] = t
    stats = CacheStats(hits=len(texts) - sum(1 for k in keys if k in missing), misses=len(missing))
    if missing:
        log(f"embedding {len(missing)} texts ({stats.hits} rows from cache)")
        pending = list(missing.items())
        for start in range(0, len(pending), chunk):
            part = pending[start:start + chunk]
            vectors = compute([t for _, t in part])
            cache.add([k for k, _ in part], vectors)
            table.update(zip((k for k, _ in part), vectors))
            if len(pending) > chunk:
                log(f"  {min(start + chunk, len(pending))}/{len(pending)} embedded and cached")
    else:
        log(f"embeddings: all {len(texts)} rows from cache")
    return np.stack([table[k] for k in keys]) if keys else np.zeros((0, 0), np.float32), stats
