"""Data sets larger than memory: a Parquet file read in chunks, split by row numbers, and row-aligned arrays on disk.

When it applies (`streams`): an ecd model given a Parquet *file* of at least `MIN_ROWS` rows (the row count is
in the file's footer, so asking costs nothing). Smaller data, CSV/JSON files and DataFrames take the in-memory
path, which is the faster one when the data fits.

How: the split is decided on row numbers alone (only the split column is read, for fixed/stratified splits), with
the same functions as the in-memory path, so a streamed run sees the same rows in the same order. Each split is a
`FileRows` (the file and its row numbers), read in chunks of `CHUNK_ROWS` (pyarrow). Preprocessed features go to
`RowArray`s: .npy files mapped into memory, whose resident pages are dropped (`release`) as reading moves on.
Per row in memory: the row numbers and the training order (8 bytes each), and during fitting the non-text
columns of the training split.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pandas as pd

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

    def __getitem__(self, column: str) -> pd.Series:
        """One column of these rows (what plots of a streamed test split read)."""
        return self.frame([column])[column]

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

    def frame(self, columns: list[str]) -> pd.DataFrame:
        """Only these columns, all rows, in split order (for fitting vocabularies and statistics)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.path, columns=columns).take(self.positions)
        frame = table.to_pandas()
        frame.index = pd.Index(self.positions)
        return frame

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
    """An (n, ...) array in a file of its raw bytes, mapped into memory: written and read by row like an array,
    without the file's size in memory. `release()` drops the pages this process holds (written pages go to the
    file first); they come back from the page cache or the disk when touched again."""

    def __init__(self, path: Path, dtype, shape: tuple):
        self.path = Path(path)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        with open(self.path, "wb+") as f:
            f.truncate(nbytes)
            self._map = mmap.mmap(f.fileno(), nbytes) if nbytes else None
        self.array = np.ndarray(shape, dtype, buffer=self._map) if self._map is not None else np.zeros(shape, dtype)

    def release(self) -> None:
        if self._map is not None:
            self._map.flush()
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.array = None
        if self._map is not None:
            self._map.close()
            self._map = None


class RowArrays:
    """The row-aligned arrays of one split, created when the first chunk shows their shapes."""

    def __init__(self, folder: Path, rows: int):
        self.folder, self.rows = Path(folder), rows
        self.folder.mkdir(parents=True, exist_ok=True)
        self.arrays: dict[str, RowArray] = {}

    def write(self, name: str, positions: np.ndarray, values: np.ndarray) -> None:
        if name not in self.arrays:
            self.arrays[name] = RowArray(self.folder / f"{len(self.arrays)}.bin", values.dtype,
                                         (self.rows,) + values.shape[1:])
        self.arrays[name].array[positions] = values

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name].array

    def release(self) -> None:
        for a in self.arrays.values():
            a.release()

    def close(self) -> None:
        for a in self.arrays.values():
            a.close()


def write_frames(frames: Iterable[pd.DataFrame], path: Path) -> int:
    """Write DataFrames one after another as one CSV or Parquet file (by suffix), atomically (a temporary name,
    then rename). Returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".csv", ".parquet"):
        raise DataError(f"{path}: predictions are written as .csv or .parquet")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
