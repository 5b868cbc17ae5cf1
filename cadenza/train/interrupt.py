"""Stopping a training run cleanly on SIGTERM (docker stop, Kubernetes, batch schedulers) or SIGINT (Ctrl-C).

The first signal only asks: the loop finishes the optimizer step it is in, saves a checkpoint and raises
`TrainingInterrupted`, whose `exit_code` is the shell's convention (128 + signal: 130 for SIGINT, 143 for SIGTERM).
A second signal stops at once, mid-step, without saving: the last checkpoint on disk stays the resume point.

The handlers live only while `fit` runs and the previous ones are put back after, so a process that trains several
times keeps no global state from one run to the next. Python delivers signals to the main thread only: in any other
thread nothing is installed and the process's own handling applies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal. A KeyboardInterrupt, so code that handles Ctrl-C handles this too."""

    def __init__(self, signum: int, checkpoint: Optional[Path], saved: bool = True):
        self.signum, self.checkpoint, self.saved = signum, checkpoint, saved
        self.exit_code = 128 + signum
        if checkpoint is None:
            message = "interrupted: no run folder, so no checkpoint to resume from"
        elif saved:
            message = f"interrupted: checkpoint saved in {checkpoint}; rerun with --resume to continue"
        else:
            message = (f"interrupted twice: stopped at once without saving; rerun with --resume to continue from the "
                       f"last checkpoint in {checkpoint}, if there is one")
        super().__init__(message)


class StopRequest:
    """Set by the first SIGINT/SIGTERM; the loop reads it between steps."""

    def __init__(self, checkpoint: Optional[Path]):
        self.checkpoint = checkpoint
        self.signum: Optional[int] = None

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(signum, self.checkpoint, saved=False)
        self.signum = signum
        # os.write, not print: the signal may have arrived in the middle of a print (tqdm's bar) on the same stream
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                    f"(send it again to stop at once)\n".encode())


@contextlib.contextmanager
def stop_on_signals(checkpoint: Optional[Path]) -> Iterator[StopRequest]:
    """SIGINT and SIGTERM handlers for the duration of the block; the previous handlers are restored after it."""
    request = StopRequest(checkpoint)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request.handle) for signum in SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            # None: a handler installed from outside Python (C code); the default is the closest we can restore
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
