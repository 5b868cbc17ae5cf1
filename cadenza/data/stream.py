"""Data sets larger than memory: a Parquet file read in chunks, split by row numbers, and row-aligned arrays on disk.

When it applies (`streams`): an ecd model given a Parquet *file* of at least `MIN_ROWS` rows (the row count is
in the file's footer, so asking costs nothing). Smaller data, CSV/JSON files and DataFrames take the in-memory
path, which is the faster one when the data fits.

How: the split is decided on row numbers alone (only the split column is read, for fixed/stratified splits), with
the same functions as the in-memory path, so a streamed run sees the same rows in the same order. Each split is a
`FileRows` (the file and its row numbers), read in chunks of `CHUNK_ROWS` (pyarrow). Preprocessed features go to
`RowArray`s: files of raw rows, written and read by row numbers (pread/pwrite), never held in memory.
Per row in memory: the row numbers and the training order (8 bytes each), and during fitting the non-text
columns of the training split.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import pandas as pd

from ..artifacts import sweep_abandoned, temporary_sibling
from ..errors import DataError
from .read import sample, split_dataset

MIN_ROWS = 100_000  # a Parquet file with fewer rows is read into memory (faster when it fits)
CHUNK_ROWS = 65_536  # rows read, preprocessed and embedded at a time


def parquet_rows(source) -> Optional[int]:
    """Rows of a Parquet file from its footer; None when `source` is not a Parquet file."""
    if isinstance(source, pd.DataFrame) or not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    if path.suffix.lower() != ".parquet" or not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # not readable as Parquet: the in-memory reader names the problem
        return None


def streams(source) -> bool:
    rows = parquet_rows(source)
    return rows is not None and rows >= MIN_ROWS


def streamed_splits(dataset, blocker: Callable[[], Optional[str]], preprocessing, seed: int, how: str,
                    log: Callable = print) -> Optional[dict]:
    """The splits of a Parquet file of MIN_ROWS rows or more as `FileRows`; None where the in-memory path applies:
    a smaller or non-Parquet source, or a config that needs every row in memory (`blocker()` says why)."""
    if not streams(dataset):
        return None
    reason = blocker()
    if reason:
        log(f"{dataset}: read into memory although it has {parquet_rows(dataset)} rows: {reason}")
        return None
    log(f"{dataset}: streamed {how} (docs/scale.md)")
    return split_file(dataset, preprocessing, seed)


@dataclass(frozen=True, eq=False)
class FileRows:
    """Some rows of a Parquet file, in a given order: one split of a data set that is not read into memory."""

    path: Path
    positions: np.ndarray  # the file's row numbers (0-based), in this split's order

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def columns(self) -> list[str]:
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(self.path).schema_arrow.names)

    def chunks(self, columns: Optional[list[str]] = None,
               rows: Optional[int] = None) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
        """(split positions, frame) per chunk, in file order; the frame's index holds the file's row numbers (so
        errors name the user's row) and position i of this split is the frame's row at split position i."""
        import pyarrow.parquet as pq

        order = np.argsort(self.positions, kind="stable")
        sorted_rows = self.positions[order]
        start = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=rows or CHUNK_ROWS, columns=columns):
            stop = start + batch.num_rows
            lo, hi = np.searchsorted(sorted_rows, [start, stop])
            if hi > lo:
                wanted = sorted_rows[lo:hi]
                frame = batch.take(wanted - start).to_pandas()
                frame.index = pd.Index(wanted)
                yield order[lo:hi], frame
            start = stop

    def read(self, columns: Optional[list[str]] = None) -> pd.DataFrame:
        """These rows (or only these columns of them), in split order and indexed by file row number, as one
        DataFrame read chunk by chunk (the rest of the file never in memory): a few columns of the training split
        to fit vocabularies and statistics on, or a split small enough to hold, such as a test split whose
        predictions are a DataFrame anyway."""
        parts, where = [], []
        for positions, frame in self.chunks(columns):
            parts.append(frame)
            where.append(positions)
        if not parts:
            return pd.DataFrame(columns=columns if columns is not None else self.columns)
        return pd.concat(parts).iloc[np.argsort(np.concatenate(where), kind="stable")]

    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged: the file (size, modification time, footer) and the rows."""
        import pyarrow.parquet as pq

        st = self.path.stat()
        digest = hashlib.sha256(f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        digest.update(str(pq.ParquetFile(self.path).metadata.to_dict()).encode())
        digest.update(np.ascontiguousarray(self.positions, np.int64).tobytes())
        return {"rows": len(self), "sha256": digest.hexdigest()}


def split_file(path, preprocessing, seed: int) -> dict[str, FileRows]:
    """The training/validation/test rows of a Parquet file by `preprocessing.sample_*` and `.split`, the same rows
    in the same order as read_dataset + sample + split_dataset give, reading at most the split column."""
    import pyarrow.parquet as pq

    path = Path(path)
    split = preprocessing.split
    rows = pq.ParquetFile(path).metadata.num_rows
    if split.type in ("fixed", "stratify"):
        if split.column not in pq.ParquetFile(path).schema_arrow.names:
            split_dataset(pd.DataFrame(index=pd.RangeIndex(rows)), split, seed)  # raises the named error
        skinny = pq.read_table(path, columns=[split.column]).to_pandas()
    else:
        skinny = pd.DataFrame(index=pd.RangeIndex(rows))
    skinny = sample(skinny, preprocessing.sample_ratio, preprocessing.sample_size, seed)
    if len(skinny) == 0:
        raise DataError(f"data set {path}: the data set has no rows")
    return {name: FileRows(path, part.index.to_numpy(np.int64)) for name, part in
            split_dataset(skinny, split, seed).items()}


def whole_file(path) -> FileRows:
    import pyarrow.parquet as pq

    return FileRows(Path(path), np.arange(pq.ParquetFile(path).metadata.num_rows, dtype=np.int64))


# ------------------------------------------------------------------------------------- arrays on disk
class RowArray:
    """An (n, ...) array in a file of its raw bytes, written and read by row numbers with pread/pwrite (one call
    per run of consecutive rows), so that neither the file nor the rows read stay in this process's memory.
    Not a memory map: recent kernels map whole large folios of the page cache on each fault, and random rows read
    through a map left most of a 1.5 GB file resident whatever was released."""

    def __init__(self, path: Path, dtype, shape: tuple):
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), tuple(shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.shape[0] * self.row_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def _runs(self, index: np.ndarray):
        """(order, [(start, end, file offset)] in bytes of each run of consecutive rows, once `index` is sorted by
        `order`). Plain ints: the loops over runs are a row's Python overhead, ~30% of a random row's read."""
        order = np.argsort(index, kind="stable")
        rows = index[order]
        if not len(rows):
            return order, iter(())
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])
        b = self.row_bytes
        return order, zip((starts * b).tolist(), (ends * b).tolist(), (rows[starts] * b).tolist())

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        ordered = np.empty((len(index),) + self.shape[1:], self.dtype)
        order, runs = self._runs(index)
        into = memoryview(ordered.reshape(-1)).cast("B")  # flat: no rows is then a valid (empty) view
        for start, end, offset in runs:
            os.preadv(self._fd, (into[start:end],), offset)
        if np.array_equal(order, np.arange(len(order))):
            return ordered
        out = np.empty_like(ordered)
        out[order] = ordered
        return out

    def write(self, index: np.ndarray, values: np.ndarray) -> None:
        order, runs = self._runs(np.asarray(index, dtype=np.int64))
        source = memoryview(np.ascontiguousarray(values[order], dtype=self.dtype).reshape(-1)).cast("B")
        for start, end, offset in runs:
            os.pwritev(self._fd, (source[start:end],), offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


# arrays of at most this many bytes a row (a number, a category's index) stay in memory, as targets do: 8 MB a
# million rows, where on disk each batch read them with a pread a row beside the text's embedding
IN_MEMORY_ROW_BYTES = 16


class RowArrays:
    """The row-aligned arrays of one split, created when the first chunk shows their shapes: on disk (RowArray),
    or in memory when narrow (IN_MEMORY_ROW_BYTES)."""

    def __init__(self, folder: Path, rows: int):
        self.folder, self.rows = Path(folder), rows
        self.folder.mkdir(parents=True, exist_ok=True)
        self.arrays: dict[str, Union[RowArray, np.ndarray]] = {}

    def write(self, name: str, positions: np.ndarray, values: np.ndarray) -> None:
        if name not in self.arrays:
            shape = (self.rows,) + values.shape[1:]
            narrow = int(np.prod(shape[1:], dtype=np.int64)) * values.dtype.itemsize <= IN_MEMORY_ROW_BYTES
            self.arrays[name] = np.zeros(shape, values.dtype) if narrow else \
                RowArray(self.folder / f"{len(self.arrays)}.bin", values.dtype, shape)
        array = self.arrays[name]
        if isinstance(array, np.ndarray):
            array[positions] = values
        else:
            array.write(positions, values)

    def __getitem__(self, name: str) -> Union[RowArray, np.ndarray]:
        return self.arrays[name]


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """`items`, each produced in a background thread while the caller works on the one before. For the batches of a
    streamed split: gathering rows from the row arrays (a `pread` a row) then overlaps the head's training step,
    which runs on one thread of a machine with more. The order is `items`' own; an error raised producing an item is
    raised here; closing this generator early stops the thread."""
    import queue
    import threading

    done, handoff, stop = object(), queue.Queue(maxsize=depth), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(error))

    thread = threading.Thread(target=produce, name="cadenza-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def write_frames(frames: Iterable[pd.DataFrame], path: Path) -> int:
    """Write DataFrames one after another as one CSV or Parquet file (by suffix), atomically (a temporary name,
    then rename). Returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".csv", ".parquet"):
        raise DataError(f"{path}: predictions are written as .csv or .parquet")
    sweep_abandoned(path.parent)  # what a killed writer of predictions left here
    tmp = temporary_sibling(path)
    writer, rows = None, 0
    try:
        for frame in frames:
            if kind == ".csv":
                frame.to_csv(tmp, mode="a" if rows else "w", header=not rows, index=False)
            else:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            rows += len(frame)
        if writer is not None:
            writer.close()
            writer = None
        if not tmp.exists():
            pd.DataFrame().to_csv(tmp, index=False) if kind == ".csv" else pq.write_table(pa.table({}), tmp)
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows


def release_freed_memory() -> None:
    """Hand the memory a chunk's short-lived objects used back to the system, after each chunk of a pass. The
    allocators keep freed memory otherwise: ~100 bytes a row over an llm tokenizing pass (200k rows: +19 MB in
    glibc's heap, +17 MB in Arrow's pool), and more over a bf16 embedding pass, whose batches of many shapes leave
    freed blocks of many sizes (docs/scale.md, "Known")."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl, not macOS)
    except OSError:
        return None


_LIBC = _glibc()
