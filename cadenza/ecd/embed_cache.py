"""Embeddings of a frozen text encoder, computed once per distinct text and kept on disk.

Layout: `<cache>/embeddings/<encoder fingerprint>/shard-*.safetensors`, each shard holding `keys` (16-byte text
hashes) and `embeddings`. The fingerprint covers weights/revision, tokenizer, max length and pooling, so a
second run with the same encoder (any head, any split) hits, and anything that changes an embedding misses.
Shards are written to a temporary name and renamed: a crash leaves no partial shard, and a shard that fails to
open (e.g. a disk fault) is removed and recomputed.

Lookups never hold the cache in memory: the shards' keys go into one sorted index (16 bytes and two int32 per
cached text), and vectors are copied out of the memory-mapped shards only for the rows asked for, one shard at a
time (each map is closed again, so its pages leave the process). A data set larger than memory is embedded in
chunks against the same index (`CachedEmbedder`); the in-memory path (`cached_embeddings`) is one such chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from ..artifacts import sweep_abandoned, temporary_sibling

KEY = np.dtype("S16")  # a text's key; numpy compares fixed-width bytes, so keys sort and search as arrays


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def text_keys(texts: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(text_key(t) for t in texts), dtype=KEY) if texts else np.zeros(0, KEY)


def _tensor_offsets(path: Path) -> dict[str, tuple[int, tuple, str]]:
    """name → (byte offset in the file, shape, dtype) from a safetensors header (8-byte little-endian header size,
    then JSON; offsets are relative to the end of the header). Raises on anything that is not a whole file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(f.read(header_size))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if 8 + header_size + end > size:
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated)")
        out[name] = (8 + header_size + begin, tuple(info["shape"]), info["dtype"])
    return out


@dataclass
class Shard:
    path: Path
    rows: int
    width: int
    embeddings_offset: int

    @classmethod
    def open(cls, path: Path) -> tuple["Shard", np.ndarray]:
        """The shard and a copy of its keys; raises when the file is damaged."""
        tensors = _tensor_offsets(path)
        (key_at, key_shape, key_dtype), (emb_at, emb_shape, emb_dtype) = tensors["keys"], tensors["embeddings"]
        if key_dtype != "U8" or emb_dtype != "F32" or key_shape[1:] != (16,) or emb_shape[0] != key_shape[0]:
            raise ValueError(f"unexpected tensors {tensors}")
        keys = np.fromfile(path, dtype=KEY, count=key_shape[0], offset=key_at)
        return cls(path, emb_shape[0], emb_shape[1], emb_at), keys

    def vectors(self) -> np.ndarray:
        """The shard's embeddings, memory-mapped (read on access; closed when the array is dropped)."""
        return np.memmap(self.path, dtype=np.float32, mode="r", offset=self.embeddings_offset,
                         shape=(self.rows, self.width))


@dataclass
class KeyIndex:
    """Every cached key, sorted, with the shard and row that hold its vector."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, KEY))
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Position in the index of each key, -1 where it is not cached."""
        if not len(self.keys) or not len(keys):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[at] == keys, at, -1)

    @classmethod
    def build(cls, parts: list[np.ndarray]) -> "KeyIndex":
        """From each shard's keys (a key in two shards keeps its first place)."""
        if not parts:
            return cls()
        keys = np.concatenate(parts)
        shards = np.concatenate([np.full(len(k), s, np.int32) for s, k in enumerate(parts)])
        rows = np.concatenate([np.arange(len(k), dtype=np.int32) for k in parts])
        order = np.argsort(keys, kind="stable")
        keys, shards, rows = keys[order], shards[order], rows[order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        return cls(keys[first], shards[first], rows[first])

    def with_shard(self, keys: np.ndarray, shard: int) -> "KeyIndex":
        """This index plus one more shard's keys, merged in (linear in the index, no re-sort)."""
        new, first = np.unique(keys, return_index=True)
        unseen = self.find(new) < 0
        new, rows = new[unseen], first[unseen].astype(np.int32)
        at = np.searchsorted(self.keys, new)
        return KeyIndex(np.insert(self.keys, at, new), np.insert(self.shard, at, np.int32(shard)),
                        np.insert(self.row, at, rows))


class EmbeddingCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.shards: list[Shard] = []
        self.index = KeyIndex()

    def open(self, log: Callable = print) -> "EmbeddingCache":
        """Index the shards on disk (keys only; vectors stay in the files)."""
        self.shards, self.index = [], KeyIndex()
        if not self.folder.exists():
            return self
        sweep_abandoned(self.folder)  # shards a killed run was writing
        parts = []
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                shard, keys = Shard.open(path)
            except Exception as e:  # a damaged shard must not poison the run: drop it and recompute
                log(f"embedding cache: dropping unreadable shard {path.name} ({e})")
                path.unlink(missing_ok=True)
                continue
            self.shards.append(shard)
            parts.append(keys)
        self.index = KeyIndex.build(parts)
        return self

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Write one shard (temporary name, then rename: all of it or nothing) and index it."""
        if not len(keys):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = temporary_sibling(self.folder / name)
        key_array = torch.from_numpy(np.frombuffer(np.ascontiguousarray(keys, KEY).tobytes(), np.uint8)
                                     .reshape(len(keys), 16).copy())
        save_file({"keys": key_array, "embeddings": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))},
                  str(tmp))
        os.replace(tmp, self.folder / name)
        shard, _ = Shard.open(self.folder / name)
        self.shards.append(shard)
        self.index = self.index.with_shard(np.ascontiguousarray(keys, KEY), len(self.shards) - 1)

    def gather(self, at: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Vectors at index positions `at` (all cached), copied shard by shard out of the memory maps."""
        width = self.shards[0].width if self.shards else 0
        out = np.empty((len(at), width), np.float32) if out is None else out
        shard_of = self.index.shard[at]
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            vectors = self.shards[s].vectors()
            out[rows] = vectors[self.index.row[at[rows]]]
            del vectors  # unmapped: the pages read leave this process
        return out


CHUNK = 8192  # texts embedded and written as one cache shard: an interrupted run keeps what it finished


@dataclass
class Ranks:
    """The processes of a distributed run that share one embedding pass: this one's index, how many, and a barrier
    (all processes call the embedder with the same texts, in the same order)."""
    index: int
    count: int
    barrier: Callable[[], None]


class CachedEmbedder:
    """Embeds texts chunk after chunk against one cache: each call computes only the distinct texts the cache
    lacks, writes them as shards and returns the row-aligned vectors. Memory: the key index, and one chunk.

    With `ranks` (several processes of one run), each process embeds its contiguous share of the missing texts and
    writes its own shards; after a barrier every process re-reads the index and gathers all rows. The cache then
    holds what one process would have written (the same texts; vectors equal up to float rounding, as batches
    differ). A barrier before the work too: no process writes before every one has listed what is missing."""

    def __init__(self, cache: EmbeddingCache, compute: Callable[[list[str]], np.ndarray], log: Callable = print,
                 chunk: int = CHUNK, ranks: Optional[Ranks] = None):
        self.cache, self.compute, self.log, self.chunk = cache.open(log), compute, log, chunk
        self.ranks = ranks if ranks is not None and ranks.count > 1 else None
        self.stats = CacheStats()

    def __call__(self, texts: list[str], out: Optional[np.ndarray] = None) -> np.ndarray:
        keys = text_keys(texts)
        at = self.cache.index.find(keys)
        missing_rows = np.flatnonzero(at < 0)
        # the distinct missing texts, in order of first appearance
        _, first = np.unique(keys[missing_rows], return_index=True)
        pending = missing_rows[np.sort(first)]
        self.stats.hits += len(texts) - len(missing_rows)
        self.stats.misses += len(pending)
        if len(pending):
            mine = pending
            if self.ranks:
                self.ranks.barrier()  # every process has listed the same missing texts
                mine = np.array_split(pending, self.ranks.count)[self.ranks.index]
                self.log(f"embedding {len(mine)} of {len(pending)} texts on process {self.ranks.index} of "
                         f"{self.ranks.count} ({len(texts) - len(missing_rows)} rows from cache)")
            else:
                self.log(f"embedding {len(pending)} texts ({len(texts) - len(missing_rows)} rows from cache)")
            for start in range(0, len(mine), self.chunk):
                part = mine[start:start + self.chunk]
                self.cache.add(keys[part], self.compute([texts[i] for i in part]))
                if len(mine) > self.chunk:
                    self.log(f"  {min(start + self.chunk, len(mine))}/{len(mine)} embedded and cached")
            if self.ranks:
                self.ranks.barrier()  # every share is on disk
                self.cache.open(self.log)
            at = self.cache.index.find(keys)
        else:
            self.log(f"embeddings: all {len(texts)} rows from cache")
        if not len(texts):
            return np.zeros((0, 0), np.float32)
        return self.cache.gather(at, out)


def cached_embeddings(texts: list[str], cache: EmbeddingCache, compute: Callable[[list[str]], np.ndarray],
                      log: Callable = print, chunk: int = CHUNK) -> tuple[np.ndarray, CacheStats]:
    """Embeddings for `texts` (row order kept), computing only the distinct texts the cache lacks."""
    embedder = CachedEmbedder(cache, compute, log, chunk)
    return embedder(texts), embedder.stats
