"""Tokenized llm rows on disk: the training data of a Parquet file larger than memory (docs/scale.md, "LLM data").

A store is one folder under `<cache>/tokens/stream-<key>/`:
    ids.i32        every row's token ids, one after another, as int32 (token ids are below the vocabulary size,
                   far below 2^31, so int32 holds any of them in half the bytes of int64)
    starts.npy, lengths.npy, prompt_lens.npy
                   per row, in the split's order: where its ids start, its length and its prompt_len (int64;
                   plain .npy files, written array by array: no second copy of the index while it is saved)
    meta.json      what the reading pass counted (rows read, rows dropped without an answer, truncated rows), for
                   its log lines; written last, so a store without it is not complete
The key hashes everything that changes the tokens (the file and its rows, the tokenizer, the prompt, the maximum
length), so a second run with the same data reuses the store. It is written under a temporary name and renamed
when complete: a crash never leaves a store that is read.

Rows arrive a chunk at a time in the file's order and are appended; their split positions say where each goes, so
the index (kept in memory, 24 bytes a row) lists them in the split's order, the order the in-memory path has.
Rows are read back with pread, one call a row, not through a memory map: on this kernel random reads through a map
kept most of a big file resident (docs/scale.md, "Row arrays").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..artifacts import sweep_abandoned, temporary_sibling
from ..data import stream
from .tokenize import TokenizedRows

VERSION = "v2"  # changes when the layout does: older stores are then not read
IDS, META = "ids.i32", "meta.json"
INDEX = ("starts", "lengths", "prompt_lens")


class TokenIds:
    """The token ids of every row of a store, as a read-only sequence of int64 arrays (what `TokenizedRows.ids`
    holds in memory): `len`, `ids[i]`, `ids[a:b]`, and `lengths` known without reading a row."""

    def __init__(self, path: Path, starts: np.ndarray, lengths: np.ndarray):
        self.path, self.starts, self.lengths = Path(path), starts, lengths
        self._fd: Optional[int] = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = int(self.lengths[i])
        data = os.pread(self._fd, 4 * n, 4 * int(self.starts[i]))
        if len(data) != 4 * n:
            raise OSError(f"{self.path}: row {i} is cut short (the token store was changed after it was written)")
        return np.frombuffer(data, np.int32).astype(np.int64)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self, _close=os.close) -> None:  # (os may be gone when __del__ runs at interpreter exit)
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def read(folder: Path) -> Optional[tuple[TokenizedRows, dict]]:
    """The rows of a complete store and its counts, or None (absent, or not whole: it is then rebuilt)."""
    folder = Path(folder)
    if not (folder / META).is_file():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        index = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in INDEX}
        if not len({len(a) for a in index.values()}) == 1 or len(index["starts"]) != meta["kept"]:
            return None
        total = int((index["starts"] + index["lengths"]).max()) if len(index["starts"]) else 0
        if (folder / IDS).stat().st_size != 4 * total:
            return None
    except Exception:  # a damaged store is rebuilt, never trusted
        return None
    ids = TokenIds(folder / IDS, index["starts"], index["lengths"])
    return TokenizedRows(ids, index["prompt_lens"], int(meta["truncated"])), meta


def write(folder: Path, chunks: Iterable[tuple[np.ndarray, TokenizedRows]], rows: int,
          meta: dict) -> tuple[TokenizedRows, dict]:
    """Append each chunk's rows (with the split positions they hold: at most `rows` in all) to a new store, then
    rename it into place. `meta` is read after the chunks are consumed, so the caller's counts of the pass go in
    complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(folder.parent)  # stores and caches of killed runs: a store of 1M rows is GBs
    tmp = temporary_sibling(folder)
    tmp.mkdir()
    try:
        # the index is filled in place: arrays kept per chunk would each pin a piece of the heap that the chunk's
        # short-lived objects were spread around (measured: ~100 bytes a row of resident memory that stayed)
        positions, lengths, prompt_lens = (np.empty(rows, np.int64) for _ in range(3))
        kept, truncated = 0, 0
        with open(tmp / IDS, "wb") as out:
            for where, part in chunks:
                n = len(part)
                if n:
                    out.write(np.concatenate([np.asarray(x, np.int32) for x in part.ids]).tobytes())
                positions[kept:kept + n] = where
                lengths[kept:kept + n] = part.lengths
                prompt_lens[kept:kept + n] = part.prompt_lens
                kept, truncated = kept + n, truncated + part.truncated
                stream.release_freed_memory()
            out.flush()
            os.fsync(out.fileno())
        _write_index(tmp, positions[:kept], lengths[:kept], prompt_lens[:kept])
        del positions, lengths, prompt_lens
        (tmp / META).write_text(json.dumps({**meta, "kept": kept, "truncated": truncated}))
        try:
            os.rename(tmp, folder)
        except OSError:  # a folder of that name: another process's complete store (kept), or a damaged one
            if read(folder) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read(folder)


def _write_index(folder: Path, positions: np.ndarray, lengths: np.ndarray, prompt_lens: np.ndarray) -> None:
    """Rows were appended in file order; the index lists them in the split's order (their positions). One
    reordered array at a time, so the pass's peak holds ~48 bytes a row here."""
    order = np.argsort(positions, kind="stable")
    for name, values in (("starts", lambda: np.cumsum(lengths) - lengths), ("lengths", lambda: lengths),
                         ("prompt_lens", lambda: prompt_lens)):
        np.save(folder / f"{name}.npy", values()[order], allow_pickle=False)
