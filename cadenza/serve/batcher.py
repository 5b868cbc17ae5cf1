"""Dynamic batching: one worker thread owns generation. Whenever it is free it takes the requests waiting, up to a
number of rows (once the rest of a burst has arrived: see _wait_for_company), and runs them as one batch.

Requests that arrive while a batch runs wait for the next one: a batch is not joined mid-flight (transformers'
`generate` has no way to add rows), so a request's latency includes the rest of the batch before it. The queue is
bounded: when it is full, `submit` refuses and the route answers 503 at once instead of letting waits pile up."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from typing import Callable

from .job import Failed, GenerationJob

log = logging.getLogger("cadenza.serve")
BURST_WAITS = 10  # the longest wait for a burst to complete, in --batch_wait_ms


class QueueFull(Exception):
    pass


class Batcher:
    def __init__(self, run_batch: Callable[[list[GenerationJob]], None], *, max_rows: int, wait_s: float,
                 max_queue: int):
        self.run_batch = run_batch
        self.max_rows, self.wait_s, self.max_queue = max_rows, wait_s, max_queue
        self._waiting: deque[GenerationJob] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._running: list[GenerationJob] = []
        self._thread = threading.Thread(target=self._work, name="cadenza-batcher", daemon=True)

    # ------------------------------------------------------------------------------- the requests' side
    def submit(self, job: GenerationJob) -> None:
        with self._changed:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the limit, --max_queue)")
            self._waiting.append(job)
            self._changed.notify()

    def queued(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Every request, waiting or running, gets a Failed event; the running batch stops at its next token."""
        with self._changed:
            self._stopping = True
            left, self._waiting = list(self._waiting) + self._running, deque()
            self._changed.notify_all()
        for job in left:
            job.deliver(Failed("the server is shutting down"))
            job.cancel()
        self._thread.join(timeout_s)

    # ----------------------------------------------------------------------------------- the worker side
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self._running = batch
            try:
                self.run_batch(batch)
            except Exception as e:  # the batch's requests get the error; the worker goes on with the next batch
                log.error("generation failed for a batch of %d requests:\n%s", len(batch), traceback.format_exc())
                for job in batch:  # (the details stay in the server's log: they are not the client's business)
                    job.deliver(Failed(f"generation failed ({type(e).__name__}); the server log has the details"))
            finally:
                self._running = []

    def _rows_waiting(self) -> int:
        return sum(job.rows for job in self._waiting)

    def _next_batch(self) -> list[GenerationJob]:
        """Blocks until there is work (or the batcher stops: then []), then gives the jobs of the next batch."""
        with self._changed:
            while True:
                while not self._waiting and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return []
                self._wait_for_company()
                batch = self._take()
                if batch:  # (empty when every waiting request was cancelled meanwhile)
                    return batch

    def _wait_for_company(self) -> None:
        """Let the rest of a burst arrive: wait until no request has come for wait_s (a burst of clients does not
        arrive at once: their requests trickle in over tens of milliseconds on a busy machine), at most
        BURST_WAITS x wait_s in all, and no longer once the batch is full."""
        now = time.monotonic()
        give_up = now + BURST_WAITS * self.wait_s
        quiet_until = now + self.wait_s
        while self._rows_waiting() < self.max_rows and not self._stopping:
            now = time.monotonic()
            if now >= min(quiet_until, give_up):
                return
            waiting = len(self._waiting)
            self._changed.wait(min(quiet_until, give_up) - now)
            if len(self._waiting) > waiting:  # another request came: give the next one wait_s again
                quiet_until = time.monotonic() + self.wait_s

    def _take(self) -> list[GenerationJob]:
        """The waiting jobs, oldest first, that fit in max_rows (the first one always goes)."""
        batch, rows = [], 0
        while self._waiting and (not batch or rows + self._waiting[0].rows <= self.max_rows):
            job = self._waiting.popleft()
            if not job.cancelled:
                batch.append(job)
                rows += job.rows
        return batch
