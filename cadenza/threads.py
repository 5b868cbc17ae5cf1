"""torch's intra-op thread count following the machine's load while a run's big ops run (training steps, an
encoder's embedding pass).

torch gives each op as many threads as cores. When other processes keep some of those cores busy, every op waits for
the thread that got no core: on a 2-core machine next to one other busy process, LLM training steps took 2-5x as long
with 2 threads as with 1. Between steps, `follow.tick()` reads the load at most every RESAMPLE_SECONDS
(device.cpu_sample: /proc/stat minus this process's own CPU time) and sets the thread count to the cores other
processes leave free (device.threads_for_load), never above torch's setting at the start. The block's end restores
that setting, so nothing leaks into the next run in the same process.

Left alone: a count pinned by OMP_NUM_THREADS / MKL_NUM_THREADS (or CADENZA_FOLLOW_LOAD=0), a run that starts at one
thread (a small ecd head, see ecd/network.py), and machines without /proc/stat.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Optional

import torch

from . import device

RESAMPLE_SECONDS = 2.0  # long enough for a reading over many steps, short enough to follow a run that starts or ends


class LoadFollower:
    """Between steps, `tick()`; `threads_used()` is the mean thread count over the block's wall time so far."""

    def __init__(self, log: Optional[Callable[[str], None]] = None):
        self.log = log
        self.start = self.current = torch.get_num_threads()
        # one thread (a small ecd head) or a pinned count: nothing to follow, nothing read
        wanted = self.start > 1 and device.pinned_threads() is None
        self.last = device.cpu_sample() if wanted else None
        self.active = self.last is not None  # None: no /proc/stat on this system
        self.began = self.since = time.monotonic()
        self.thread_seconds = 0.0  # threads x wall seconds, for the mean
        self.mean: Optional[float] = None  # threads_used() at the block's end

    def tick(self) -> None:
        if not self.active or time.monotonic() - self.last.wall < RESAMPLE_SECONDS:
            return
        sample = device.cpu_sample()
        others = device.others_busy_cores(self.last, sample)
        self.last = sample
        choice = device.threads_for_load(sample.cores, others, self.current, self.start)
        if choice != self.current:
            if self.log:
                self.log(f"threads: {self.current} -> {choice} (other processes use ~{others:.1f} of "
                         f"{sample.cores} cores)")
            self._set(choice)

    def threads_used(self) -> float:
        """The mean thread count over the block so far, to 0.1 (a whole number when it never changed)."""
        if self.mean is not None:
            return self.mean
        now = time.monotonic()
        total = now - self.began
        mean = (self.thread_seconds + self.current * (now - self.since)) / total if total > 0 else self.current
        mean = round(mean, 1)
        return int(mean) if mean == int(mean) else mean

    def _set(self, n: int) -> None:
        now = time.monotonic()
        self.thread_seconds += self.current * (now - self.since)
        self.since, self.current = now, n
        torch.set_num_threads(n)


@contextlib.contextmanager
def follow_load(log: Optional[Callable[[str], None]] = None) -> Iterator[LoadFollower]:
    """A LoadFollower for the block; torch's thread count is back at its starting value when the block ends."""
    follower = LoadFollower(log)
    try:
        yield follower
    finally:
        follower.mean = follower.threads_used()
        if follower.current != follower.start:
            follower._set(follower.start)
