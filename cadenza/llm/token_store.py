"""Tokenized llm rows on disk: the training data of a Parquet file larger than memory (docs/scale.md, "LLM data").

A store is one folder under `<cache>/tokens/stream-<key>/`:
    ids.i32        every row's token ids, one after another, as int32 (token ids are below the vocabulary size,
                   far below 2^31, so int32 holds any of them in half the bytes of int64)
    rows.safetensors  per row, in the split's order: where its ids start (int64), its length and its prompt_len,
                   plus the truncated-row count
    meta.json      what the reading pass counted (rows read, rows dropped without an answer, ...), for its log lines
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
import uuid
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .tokenize import TokenizedRows

VERSION = "v1"  # changes when the layout does: older stores are then not read
IDS, INDEX, META = "ids.i32", "rows.safetensors", "meta.json"


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

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def read(folder: Path) -> Optional[tuple[TokenizedRows, dict]]:
    """The rows of a complete store and its counts, or None (absent, or not whole: it is then rebuilt)."""
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        return None
    from safetensors.numpy import load_file

    try:
        index = load_file(str(folder / INDEX))
        meta = json.loads((folder / META).read_text())
        total = int(index["starts"][-1] + index["lengths"][-1]) if len(index["starts"]) else 0
        if (folder / IDS).stat().st_size < 4 * total:
            return None
    except Exception:  # a damaged store is rebuilt, never trusted
        return None
    ids = TokenIds(folder / IDS, index["starts"], index["lengths"])
    return TokenizedRows(ids, index["prompt_lens"], int(index["truncated"][0])), meta


def write(folder: Path, chunks: Iterable[tuple[np.ndarray, TokenizedRows]], meta: dict) -> tuple[TokenizedRows, dict]:
    """Append each chunk's rows (with the split positions they hold) to a new store, then rename it into place.
    `meta` is read after the chunks are consumed, so the caller's counts of the pass go in complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        positions, lengths, prompt_lens, truncated = [], [], [], 0
        with open(tmp / IDS, "wb") as out:
            for where, rows in chunks:
                lens = rows.lengths
                if len(rows):
                    out.write(np.concatenate([np.asarray(x, np.int32) for x in rows.ids]).tobytes())
                positions.append(np.asarray(where, np.int64))
                lengths.append(lens)
                prompt_lens.append(np.asarray(rows.prompt_lens, np.int64))
                truncated += rows.truncated
            out.flush()
            os.fsync(out.fileno())
        positions, lengths, prompt_lens = (np.concatenate(x) if x else np.zeros(0, np.int64)
                                           for x in (positions, lengths, prompt_lens))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        order = np.argsort(positions, kind="stable")  # file order -> the split's order
        from safetensors.numpy import save_file

        save_file({"starts": np.ascontiguousarray(starts[order]), "lengths": np.ascontiguousarray(lengths[order]),
                   "prompt_lens": np.ascontiguousarray(prompt_lens[order]),
                   "truncated": np.asarray([truncated], np.int64)}, str(tmp / INDEX))
        (tmp / META).write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same store first: keep theirs
            if read(folder) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read(folder)
