"""Run folders: claimed without races, locked while a process trains in them.

A new run takes the first free name of `<experiment>_<model>`, `_1`, `_2`, ... with an exclusive mkdir, so two runs
started at once into one output directory get two folders. While a process trains in a folder it holds an
exclusive lock on `<run>/.lock` (which also names its pid and host): a second `--resume` of that folder is refused
instead of both writing the same checkpoint. The lock is the operating system's (flock), so it goes away with its
process, however that ends: a folder whose trainer was killed with `kill -9` is free again, and the stale file is
simply locked anew.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

from ..errors import CadenzaError
from .checkpoint import CHECKPOINT, ResumeError

LOCK_FILE = ".lock"


class RunFolderBusy(CadenzaError):
    """Another process is training in this run folder."""


def new_run_dir(output_directory: str | Path, experiment_name: str, model_name: str) -> Path:
    """results/experiment_run, then experiment_run_1, _2, ... (Ludwig's naming); created empty, by this call only."""
    base = Path(output_directory) / f"{experiment_name}_{model_name}"
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = base if n == 0 else base.with_name(f"{base.name}_{n}")
        try:
            candidate.mkdir()  # atomic: of two processes racing for a name, one gets it and the other tries the next
            return candidate
        except FileExistsError:
            n += 1


def resumable_run_dir(output_directory: str | Path, experiment_name: str, model_name: str,
                      resume: bool | str | Path) -> Path:
    """The run folder `--resume` means: the one named, or the newest of this experiment/model name with a
    checkpoint."""
    if not isinstance(resume, bool):
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise ResumeError(f"--resume {run_dir}: no such run folder")
        if not (run_dir / CHECKPOINT).is_dir():
            finished = (run_dir / "model").is_dir()
            raise ResumeError(f"--resume {run_dir}: no checkpoint to resume there"
                              + (" (the run finished: its model is in model/)" if finished else ""))
        return run_dir
    base = Path(output_directory)
    candidates = sorted(base.glob(f"{experiment_name}_{model_name}*/{CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ResumeError(f"--resume: no interrupted run of {experiment_name}_{model_name} in {base}")
    return candidates[-1].parent


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block; RunFolderBusy if another process holds it."""
    import fcntl  # POSIX; Cadenza runs on Linux and macOS

    path = Path(run_dir) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderBusy(f"run folder {run_dir} is in use by {holder}; wait for it to finish or stop it, "
                                "or train into another folder") from None
        # the holder before us may have removed the file between our open and our lock: then ours is an orphan
        # inode nobody else will see, and we start over on the current file
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # the folder may be gone (a failed new run is removed)
            path.unlink()
        os.close(fd)
