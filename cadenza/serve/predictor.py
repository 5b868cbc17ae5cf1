"""`Model.predict` for the Ludwig routes, off the event loop: one prediction at a time on its own thread, within
the time limit and the queue bound. It shares the model with the generation worker through `model_lock`, so the
two never run forward passes at the same time (they would only split the same cores)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from ..errors import CadenzaError
from .errors import HttpError


class Predictor:
    def __init__(self, model, model_lock: threading.Lock, *, timeout_s: float, max_queue: int):
        self.model, self.model_lock = model, model_lock
        self.timeout_s, self.max_queue = timeout_s, max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cadenza-predict")
        self.pending = 0  # predictions submitted and not finished (also those whose client timed out)

    def _predict(self, df: pd.DataFrame) -> pd.DataFrame:
        with self.model_lock:
            return self.model.predict(df)

    async def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        if self.pending >= self.max_queue:
            raise HttpError(503, f"{self.pending} predictions are already waiting (the limit, --max_queue); "
                            "retry later", headers={"Retry-After": "1"})
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._predict, df)
        future.add_done_callback(self._finished)
        try:
            # on timeout wait_for cancels the future: a prediction still queued never runs; a running one can not
            # be interrupted and finishes unseen
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            raise HttpError(504, f"no prediction within {self.timeout_s:g} s (--prediction_timeout)") from None
        except CadenzaError as e:  # the data cannot be predicted as given (a DataError names the column or row)
            raise HttpError(400, str(e)) from None

    def _finished(self, _future) -> None:
        self.pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
