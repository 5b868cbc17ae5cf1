"""Experiment tracking: TensorBoard event files in every run folder, and MLflow with `--mlflow`.

One `Tracker` per run, opened by `tracking(...)` around training (api.Model.train) and handed to the loop, which
calls it where the statistics already exist: `begin` once the run (or the resumed run) is set up, `log_step` after
every optimizer step, `log_validation` after an eval_steps evaluation, `log_epoch` at each epoch's end, `flush`
before each checkpoint; `finish` after the model is saved. See docs/tracking.md for what lands where.

Nothing process-global is set: MLflow is driven through an `MlflowClient` with an explicit tracking URI (never
`mlflow.set_tracking_uri` / `mlflow.start_run`), so no active run or URI is left for the user's later code, and the
block that opened the run ends it however training ends (FINISHED, KILLED on an interruption, FAILED on an error).
The TensorBoard writer is closed the same way.

Resumed runs continue the same event folder and the same MLflow run (its id is kept in `<run>/tracking.json`):
the new event file purges every step after the checkpoint (`purge_step`, which TensorBoard's readers apply) and
nothing is written for a (tag, step) that the folder already holds, so no step is duplicated, also when the run
was killed after logging an epoch but before the checkpoint that follows it. MLflow metrics are per epoch, and an
epoch already in the run's history is not logged again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from .artifacts import write_json
from .config.load import flatten as flatten_keys
from .errors import CadenzaError

LOGS_DIR = "logs"  # <run>/logs: TensorBoard event files
TRACKING_FILE = "tracking.json"  # <run>/tracking.json: the MLflow run this run folder logs to
DEFAULT_MLFLOW_DB = "mlflow.db"  # <output_directory>/mlflow.db when MLFLOW_TRACKING_URI is unset
DEFAULT_MLFLOW_ARTIFACTS = "mlartifacts"  # artifacts of a local SQLite store: beside the .db file
INSTALL_HINT = "pip install 'cadenza[track]'"


class TrackingError(CadenzaError):
    """Tracking cannot start: a package is missing or the MLflow tracking store cannot be reached."""


# ============================================================================================== the tracker
class Tracker:
    """What a run reports while it trains. `Tracker()` (no outputs) does nothing: the loop's default, and what
    processes other than the main one get in a distributed run."""

    def __init__(self, tensorboard: Optional["TensorBoardLog"] = None, mlflow: Optional["MlflowRun"] = None,
                 log: Callable[[str], None] = print):
        self.tensorboard, self.mlflow, self.log = tensorboard, mlflow, log
        self._clock = time.perf_counter()
        self._unit = "rows"

    def begin(self, step: int, statistics: dict, unit: str = "rows") -> None:
        """Training starts at global step `step` (0, or the checkpoint's step when resumed) with the checkpoint's
        statistics (epochs MLflow lacks are logged from them)."""
        self._unit = unit
        if self.tensorboard:
            self.tensorboard.open(step)
        if self.mlflow:
            validation = statistics.get("validation", [])
            for epoch, train in enumerate(statistics.get("training", []), start=1):
                self.mlflow.log_epoch(epoch, self._epoch_scalars(train, validation[epoch - 1]
                                                                 if len(validation) >= epoch else None))
        self._clock = time.perf_counter()

    def log_step(self, step: int, *, loss: float, learning_rate: float, units: float, tokens: float = 0) -> None:
        """After optimizer step `step`: its loss (this process's share of the batch), the learning rate it used,
        and the rates since the previous step (units and tokens of all processes)."""
        if not self.tensorboard:
            return
        now = time.perf_counter()
        seconds, self._clock = max(now - self._clock, 1e-9), now
        scalars = {"step/loss": loss, "step/learning_rate": learning_rate,
                   f"step/{self._unit}_per_second": units / seconds}
        if tokens:
            scalars["step/tokens_per_second"] = tokens / seconds
        self.tensorboard.write(step, scalars)

    def log_validation(self, step: int, metrics: dict) -> None:
        """An evaluation within an epoch (trainer.eval_steps)."""
        if self.tensorboard:
            self.tensorboard.write(step, flatten(metrics, "validation"))
            self.tensorboard.flush()
        self._clock = time.perf_counter()  # the evaluation's time is not the next step's

    def log_epoch(self, epoch: int, step: int, train_stats: dict, metrics: Optional[dict],
                  learning_rate: Optional[float] = None) -> None:
        """Epoch `epoch` (from 1) ended at global step `step`: its training statistics and validation metrics."""
        scalars = self._epoch_scalars(train_stats, metrics)
        if learning_rate is not None:
            scalars["train/learning_rate"] = learning_rate
        if self.tensorboard:
            self.tensorboard.write(step, {**scalars, "epoch": epoch})
            self.tensorboard.flush()
        if self.mlflow:
            self.mlflow.log_epoch(epoch, scalars)
        self._clock = time.perf_counter()

    def flush(self) -> None:
        """Before a checkpoint: what was logged up to it is on disk (a resumed run relies on that)."""
        if self.tensorboard:
            self.tensorboard.flush()

    def finish(self, statistics: dict, model_dir: Optional[Path]) -> None:
        """After the model is saved: MLflow gets the tags and artifacts and is marked FINISHED."""
        if self.mlflow:
            self.mlflow.finish(statistics, model_dir)

    def close(self, error: Optional[BaseException] = None) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.mlflow:
            self.mlflow.close(error)

    @staticmethod
    def _epoch_scalars(train_stats: dict, metrics: Optional[dict]) -> dict[str, float]:
        train = {k: v for k, v in train_stats.items() if k != "metrics"}
        scalars = flatten(train, "train")
        scalars.update(flatten(train_stats.get("metrics") or {}, "train"))  # trainer.evaluate_training_set
        scalars.update(flatten(metrics or {}, "validation"))
        return scalars


def flatten(values: dict, prefix: str) -> dict[str, float]:
    """{"sentiment": {"accuracy": 0.8}} -> {"<prefix>/sentiment/accuracy": 0.8}; numbers only."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


@contextlib.contextmanager
def tracking(run_dir: Path, config: dict, *, tensorboard: bool = True, mlflow: Union[bool, str] = False,
             resume: bool = False, experiment_name: str = "experiment", output_directory: Union[str, Path] = ".",
             random_seed: int = 42, enabled: bool = True,
             log: Callable[[str], None] = print) -> Iterator[Tracker]:
    """The run's Tracker, closed however the block ends. `mlflow`: True (MLFLOW_TRACKING_URI, else a local store
    under output_directory) or a tracking URI. `enabled`: False on processes other than the main one."""
    if not enabled:
        yield Tracker(log=log)
        return
    board = TensorBoardLog.create(Path(run_dir) / LOGS_DIR, resume, log) if tensorboard else None
    run = None
    if mlflow:
        uri = mlflow if isinstance(mlflow, str) else tracking_uri(output_directory)
        run = MlflowRun.open(Path(run_dir), uri, experiment_name, config, random_seed, resume, log=log)
    elif resume and (Path(run_dir) / TRACKING_FILE).exists():
        log(f"this run logged to MLflow before ({Path(run_dir) / TRACKING_FILE}); resume with --mlflow to go on")
    tracker = Tracker(board, run, log)
    try:
        yield tracker
    except BaseException as e:
        tracker.close(e)
        raise
    tracker.close()


# =============================================================================================== TensorBoard
class TensorBoardLog:
    """Scalars in `<run>/logs`, through tensorboardX's FileWriter (a small pure-Python writer; `tensorboard` itself,
    55 MB with a web server and gRPC, is needed only to look at them). All scalars of one step go into one event:
    ~110 µs per optimizer step for four scalars, a third of what one `add_scalar` per value costs."""

    def __init__(self, folder: Path, resumed: bool):
        self.folder, self.resumed = folder, resumed
        self.writer = None
        self.present: set[tuple[str, int]] = set()  # (tag, step) already in the folder, up to the resume step

    @classmethod
    def create(cls, folder: Path, resume: bool, log: Callable[[str], None]) -> Optional["TensorBoardLog"]:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            log(f"no TensorBoard logs: tensorboardX is not installed ({INSTALL_HINT} or pip install tensorboardX)")
            return None
        return cls(folder, resume)

    def open(self, step: int) -> None:
        from tensorboardX import FileWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        resumed = self.resumed and self.folder.is_dir()
        if resumed:
            self.present = {(tag, s) for tag, s in scalars_in(self.folder) if s <= step}
        self.folder.mkdir(parents=True, exist_ok=True)
        # a distinct file per session: two sessions in the same second on one host would otherwise share a name
        self.writer = FileWriter(str(self.folder), flush_secs=30, filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        if resumed:  # purge_step: TensorBoard hides every earlier event after the checkpoint's step
            self.writer.add_event(Event(session_log=SessionLog(status=SessionLog.START)), step + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        if self.writer is None:
            return
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()
                  if (tag, step) not in self.present]
        if values:
            self.writer.add_summary(Summary(value=values), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def scalars_in(folder: Path) -> set[tuple[str, int]]:
    """(tag, step) of every scalar in an event folder as TensorBoard reads it: files in name order, a session
    start (purge_step) hiding what came before it at or after its step. A record cut short (a killed writer)
    ends its file."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    seen: set[tuple[str, int]] = set()
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in _records(path.read_bytes()):
            try:
                event = Event.FromString(record)
            except Exception:  # noqa: BLE001  (a damaged record: stop reading this file)
                break
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                seen = {(tag, s) for tag, s in seen if s < event.step}
            for value in event.summary.value:
                seen.add((value.tag, event.step))
    return seen


def _records(data: bytes) -> Iterator[bytes]:
    """The records of a TFRecord file: length (uint64), its CRC, the data, its CRC."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            return
        yield data[start:end]
        pos = end + 4


# ==================================================================================================== MLflow
def tracking_uri(output_directory: Union[str, Path]) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the output directory (MLflow 3 refuses new file stores)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + str((Path(output_directory) / DEFAULT_MLFLOW_DB).resolve())


class MlflowRun:
    """One MLflow run, through a client of its own tracking URI. Logging errors during training are reported and
    training goes on; errors opening the run stop it before training starts."""

    def __init__(self, client, run_id: str, run_dir: Path, log: Callable[[str], None]):
        self.client, self.run_id, self.run_dir, self.log = client, run_id, run_dir, log
        self.logged: set[tuple[str, int]] = set()  # (metric, epoch) already in the run
        self.finished = False
        self.failed = False  # one warning per run, not one per epoch

    @classmethod
    def open(cls, run_dir: Path, uri: str, experiment_name: str, config: dict, random_seed: int, resume: bool, *,
             log: Callable[[str], None]) -> "MlflowRun":
        client = _client(uri)
        saved = _read_tracking_file(run_dir) if resume else {}
        try:
            if saved.get("tracking_uri") == uri and _run_exists(client, saved.get("run_id")):
                run = cls(client, saved["run_id"], run_dir, log)
                client.update_run(run.run_id, status="RUNNING")
                run.logged = run._history()
                log(f"MLflow: continuing run {run.run_id} ({uri})")
                return run
            if saved:
                log(f"MLflow: run {saved.get('run_id')} of {saved.get('tracking_uri')} is not in {uri}: a new run")
            experiment_id = _experiment_id(client, experiment_name, _artifact_location(uri))
            from . import __version__

            tags = {"cadenza.version": __version__, "cadenza.model_type": str(config.get("model_type")),
                    "cadenza.run_dir": str(Path(run_dir).resolve())}
            info = client.create_run(experiment_id, run_name=Path(run_dir).name, tags=tags).info
            run = cls(client, info.run_id, run_dir, log)
            _write_tracking_file(run_dir, {"tracking_uri": uri, "experiment_id": experiment_id,
                                           "run_id": run.run_id})
            run._log_params({**flatten_config(config), "random_seed": str(random_seed)})
            client.log_dict(run.run_id, config, "config.yaml")
        except CadenzaError:
            raise
        except Exception as e:  # noqa: BLE001  (any store error, before training: say where)
            raise TrackingError(f"--mlflow: cannot log to {uri}: {type(e).__name__}: {str(e).splitlines()[0]}") \
                from e
        log(f"MLflow: run {run.run_id} in experiment {experiment_name!r} ({uri})")
        return run

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = {mlflow_name(k): v for k, v in scalars.items() if (mlflow_name(k), epoch) not in self.logged}
        metrics = [Metric(k, v, now, epoch) for k, v in new.items() if math.isfinite(v)]
        self._safely(f"epoch {epoch}", lambda: self.client.log_batch(self.run_id, metrics=metrics) if metrics
                     else None)
        self.logged.update((k, epoch) for k in new)

    def finish(self, statistics: dict, model_dir: Optional[Path]) -> None:
        precision = statistics.get("precision") or {}
        tags = {"precision": precision.get("precision"), "precision.part": precision.get("part"),
                "precision.reason": precision.get("reason"), "best_epoch": statistics.get("best_epoch"),
                "steps": statistics.get("steps")}

        def upload() -> None:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])
            if model_dir is not None and Path(model_dir).is_dir():
                self.client.log_artifacts(self.run_id, str(model_dir), "model")
            for name in ("training_statistics.json", "description.json"):
                if (self.run_dir / name).exists():
                    self.client.log_artifact(self.run_id, str(self.run_dir / name))

        self._safely("the model and tags", upload)
        self._safely("the end of the run", lambda: self.client.set_terminated(self.run_id, "FINISHED"))
        self.finished = True

    def close(self, error: Optional[BaseException]) -> None:
        if self.finished:
            return
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"  # TrainingInterrupted: KILLED
        self._safely(f"the run's end ({status})", lambda: self.client.set_terminated(self.run_id, status))
        self.finished = True

    def _safely(self, what: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001  (a tracking server's hiccup must not end a long training run)
            if not self.failed:
                self.log(f"warning: MLflow could not log {what}: {type(e).__name__}: {str(e).splitlines()[0]} "
                         "(training goes on)")
            self.failed = True

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        items = [Param(mlflow_name(k), v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def _history(self) -> set[tuple[str, int]]:
        keys = self.client.get_run(self.run_id).data.metrics
        return {(key, m.step) for key in keys for m in self.client.get_metric_history(self.run_id, key)}


def flatten_config(config: Any) -> dict[str, str]:
    """The resolved config as MLflow params: {"trainer.learning_rate": "0.0001", "input_features.0.name": ...}."""
    return {key: json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            for key, value in flatten_keys(config, index=".{}").items()}


def mlflow_name(name: str) -> str:
    """A metric/param name MLflow accepts (letters, digits, _ - . space / only)."""
    return re.sub(r"[^/\w.\- ]", "_", name)[:250]


def _client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise TrackingError(f"--mlflow needs MLflow: {INSTALL_HINT}") from None
    if uri.startswith("sqlite:"):
        try:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
        except ImportError:
            raise TrackingError(f"--mlflow with the SQLite store {uri} needs sqlalchemy and alembic: {INSTALL_HINT}, "
                                "or set MLFLOW_TRACKING_URI to a tracking server") from None
    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> Optional[str]:
    """Artifacts of a new experiment in a local SQLite store go beside the database (MLflow would put them in
    ./mlruns of whatever folder the process runs in); a tracking server decides for itself."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / DEFAULT_MLFLOW_ARTIFACTS).as_uri()


def _experiment_id(client, name: str, artifact_location: Optional[str]) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001  (another run created it meanwhile)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _run_exists(client, run_id: Optional[str]) -> bool:
    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001  (RESOURCE_DOES_NOT_EXIST)
        return False


def _read_tracking_file(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / TRACKING_FILE).read_text()).get("mlflow", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _write_tracking_file(run_dir: Path, mlflow: dict) -> None:
    write_json(run_dir / TRACKING_FILE, {"mlflow": mlflow})
