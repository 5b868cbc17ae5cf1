"""The Python API: `Model(config).train(...)`, `.predict`, `.evaluate`, `.experiment`, `Model.load`, `.generate`,
`Model.upload_to_hf_hub`, `Model.from_pretrained`. Everything common to ecd and llm lives here; the model type
object (cadenza.ecd.EcdModel / cadenza.llm.LlmModel) does the rest (see docs/architecture.md)."""

from __future__ import annotations

import contextlib
import functools
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd

from . import __version__, phases
from .artifacts import (CONFIG_FILE, MODEL_DIR, SavedModel, atomic_dir, check_model_folder, write_json,
                        write_model_header)
from .config.load import ConfigSource, load_config
from .data.read import (DatasetSource, check_not_empty, read_dataset, sample, split_dataset,
                        warn_empty_splits)
from .errors import CadenzaError, ConfigError, ModelFolderError
from .track import Tracker, tracking
from .train import run_folder
from .train.checkpoint import CHECKPOINT, check_resumable, run_fingerprints
from .train.loop import process_state


@dataclass
class TrainOutput:
    statistics: dict
    run_dir: Optional[Path]
    model_dir: Optional[Path]
    throughput: dict = field(default_factory=dict)
    best_epoch: int = 0


def _model_type_class(model_type: str):
    # counted as imports in the run's breakdown: an llm's modules pull peft and transformers' generation (~3 s cold)
    with phases.phase("imports"):
        if model_type == "llm":
            from .llm import LlmModel

            return LlmModel
        from .ecd import EcdModel

        return EcdModel


def _say(message: str) -> None:
    print(message, flush=True)


def _from_main_process(value, dist):
    """The main process's value on every process (a no-op when there is one process)."""
    if dist.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _recorded(method):
    """The phase breakdown of a run (cadenza.phases) recorded around `method` and printed at its end by the main
    process; inside a recording already open (the CLI's, or experiment's around train) that one goes on."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with phases.recording() as record:
            result = method(self, *args, **kwargs)
        if phases.current() is None and process_state().is_main_process:  # this call opened the recording
            self.log(record.table())
        return result

    return run


def _saved_config(saved: SavedModel):
    """The saved config, validated; one that this Cadenza rejects names the file (a newer Cadenza may have added
    keys)."""
    try:
        return load_config(saved.config)
    except ConfigError as e:
        raise ModelFolderError(f"{saved.model_dir / CONFIG_FILE} does not load (saved by Cadenza "
                               f"{saved.info.get('cadenza_version', '?')}; this is {__version__}: upgrade cadenza if "
                               f"that is newer, else retrain): {e}") from None


class Model:
    """A Cadenza model: a config plus, once trained or loaded, its weights and preprocessing metadata."""

    def __init__(self, config: ConfigSource, log: Callable[[str], None] = _say):
        self.config = load_config(config)
        self.log = log
        self.model = _model_type_class(self.config.model_type)(self.config)
        self.model_dir: Optional[Path] = None

    # ---------------------------------------------------------------------------------------------- train
    @_recorded
    def train(self, dataset: Optional[DatasetSource] = None, *, training_set: Optional[DatasetSource] = None,
              validation_set: Optional[DatasetSource] = None, test_set: Optional[DatasetSource] = None,
              output_directory: Union[str, Path] = "results", experiment_name: str = "experiment",
              model_name: str = "run", resume: Union[bool, str, Path] = False, random_seed: int = 42,
              skip_save_model: bool = False, skip_save_log: bool = False,
              mlflow: Union[bool, str] = False, tracker: Optional[Tracker] = None) -> TrainOutput:
        """Train on `dataset` (split by preprocessing.split) or on explicit training/validation/test sets.
        resume: True continues the newest interrupted run of this experiment/model name; a path names the run.
        TensorBoard event files go to <run>/logs unless skip_save_log; mlflow: True logs to MLFLOW_TRACKING_URI
        (else <output_directory>/mlflow.db), a string is the tracking URI (docs/tracking.md). tracker: reports
        to it instead (cadenza.search's trials report epochs to their Optuna trial)."""
        if self.config.distill is not None:
            raise ConfigError([("distill", "this config is a student that learns an llm teacher's labels: run "
                                "`cadenza distill` (cadenza.distill.distill); train would use the data's own labels")])
        dist = process_state()
        log = self.log if dist.is_main_process else (lambda _: None)
        with phases.phase("data"):
            splits = self._splits(dataset, training_set, validation_set, test_set, random_seed, log)
        self._splits_used = splits
        if dist.is_main_process:
            with phases.phase("estimate"):
                self._say_estimate(splits, random_seed, log)
        # what a resumed run must find unchanged; stored in every checkpoint
        fingerprints = run_fingerprints(self.config.model_dump(mode="json"), splits, random_seed, dist.num_processes)
        description = self._description(splits, fingerprints)
        with (self._run_folder(output_directory, experiment_name, model_name, resume, fingerprints, description,
                               log) as run_dir,
              tracking(run_dir, fingerprints["config"], tensorboard=not skip_save_log, mlflow=mlflow,
                       resume=bool(resume), experiment_name=experiment_name, output_directory=output_directory,
                       random_seed=random_seed, enabled=dist.is_main_process, log=log) as run_tracker):
            tracker = tracker or run_tracker
            started = time.perf_counter()
            result = self.model.fit(splits, run_dir=run_dir, resume=bool(resume), seed=random_seed,
                                    fingerprints=fingerprints, tracker=tracker, log=log)
            statistics = {**result.statistics, "best_epoch": result.best_epoch, "best_step": result.best_step,
                          "steps": result.steps, "precision": result.precision,
                          "throughput": result.throughput, "seconds": time.perf_counter() - started,
                          "phases": phases.current().summary()}  # so far: experiment adds its evaluation later
            model_dir = None if skip_save_model else run_dir / MODEL_DIR
            if dist.is_main_process:
                with phases.phase("writing"):
                    write_json(run_dir / "training_statistics.json", statistics)
                    if model_dir is not None:
                        self.save(model_dir)
                    tracker.finish(statistics, model_dir)
                shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)  # finished: nothing left to resume
            dist.wait_for_everyone()
        return TrainOutput(statistics, run_dir, model_dir, result.throughput, result.best_epoch)

    def estimate(self, dataset: Optional[DatasetSource] = None, *, training_set: Optional[DatasetSource] = None,
                 validation_set: Optional[DatasetSource] = None, test_set: Optional[DatasetSource] = None,
                 random_seed: int = 42, available_bytes: Optional[int] = None, refresh: bool = False):
        """Predicted peak memory (RSS, or GPU memory on CUDA) and time per epoch and in total of train() on this
        data, without training (cadenza.estimate; docs/estimate.md). available_bytes: compare with this instead
        of the machine's available memory; refresh: calibrate this machine again."""
        from .estimate import estimate

        t0 = time.perf_counter()
        splits = self._splits(dataset, training_set, validation_set, test_set, random_seed, lambda _: None)
        return estimate(self.config, splits, available_bytes=available_bytes, refresh=refresh, seed=random_seed,
                        read_seconds=time.perf_counter() - t0, log=self.log)

    def _say_estimate(self, splits: dict, seed: int, log: Callable[[str], None]) -> None:
        """One or two lines before training: predicted peak memory and time, and a warning when the run will not
        fit (training goes on). Only a cached calibration is used, so this costs well under a second for ecd and a
        few seconds for llm (tokenizing, which training reuses); an estimate that fails never stops the run."""
        from .estimate import estimate

        try:
            for line in estimate(self.config, splits, cached_only=True, seed=seed, log=log).summary():
                log(line)
        except Exception as e:  # noqa: BLE001 - a prediction must never break a run
            log(f"estimate: skipped ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")

    def _splits(self, dataset, training_set, validation_set, test_set, seed: int,
                log: Callable[[str], None]) -> dict[str, pd.DataFrame]:
        pre = self.config.preprocessing
        if dataset is not None:
            if training_set is not None:
                raise CadenzaError("give either dataset or training_set (with optional validation/test sets)")
            # a Parquet file larger than memory: row numbers per split, read in chunks (docs/scale.md)
            streamed = getattr(self.model, "streamed_splits", None)
            splits = streamed(dataset, seed, log) if streamed else None
            if splits is None:
                df = sample(read_dataset(dataset), pre.sample_ratio, pre.sample_size, seed)
                check_not_empty(df, f"data set {dataset if not isinstance(dataset, pd.DataFrame) else '(DataFrame)'}")
                splits = split_dataset(df, pre.split, seed)
        elif training_set is not None:
            empty = pd.DataFrame()
            splits = {"training": read_dataset(training_set),
                      "validation": read_dataset(validation_set) if validation_set is not None else empty,
                      "test": read_dataset(test_set) if test_set is not None else empty}
        else:
            raise CadenzaError("no data: pass dataset=... or training_set=...")
        check_not_empty(splits["training"], "training split")
        log("rows: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
        if dataset is not None:
            warn_empty_splits(splits, pre.split, log)
        return splits

    @contextlib.contextmanager
    def _run_folder(self, output_directory, experiment_name, model_name, resume, fingerprints: dict,
                    description: dict, log: Callable[[str], None]):
        """The run folder, locked while this process trains in it. Under `accelerate launch` every process trains
        and the main one alone names, locks and writes the folder. A new folder is removed again when the run
        fails without leaving anything behind (no checkpoint, no model): a bad data set or model path leaves no
        debris."""
        dist = process_state()
        if not dist.is_main_process:
            run_dir = _from_main_process(None, dist)
            if run_dir is None:
                raise CadenzaError("the main process could not prepare the run folder (its error says why)")
            yield run_dir
            return
        new, run_dir = not resume, None
        with contextlib.ExitStack() as held:
            try:
                run_dir = self._run_dir(output_directory, experiment_name, model_name, resume)
                held.enter_context(run_folder.locked(run_dir))
                if new:
                    write_json(run_dir / "description.json", description)
                else:
                    check_resumable(run_dir, fingerprints)
            except BaseException:
                _from_main_process(None, dist)  # the other processes wait for the folder: tell them there is none
                if new and run_dir is not None:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            _from_main_process(run_dir, dist)
            log(f"run folder: {run_dir}")
            try:
                yield run_dir
            except BaseException:
                if new and not (run_dir / CHECKPOINT).exists() and not (run_dir / MODEL_DIR).exists():
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise

    def _run_dir(self, output_directory, experiment_name, model_name, resume) -> Path:
        """A new folder (first free name), or with `resume` the one named or the newest interrupted one."""
        if resume:
            return run_folder.resumable_run_dir(output_directory, experiment_name, model_name, resume)
        return run_folder.new_run_dir(output_directory, experiment_name, model_name)

    def _description(self, splits: dict, fingerprints: dict) -> dict:
        import torch

        return {"cadenza_version": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
                "platform": platform.platform(), "random_seed": fingerprints["random_seed"],
                "rows": {k: len(v) for k, v in splits.items()},
                "data_sha256": {k: v["sha256"] for k, v in fingerprints["data"].items()},
                "config": fingerprints["config"]}

    # ------------------------------------------------------------------------------------- use the model
    def predict(self, dataset: DatasetSource, batch_size: Optional[int] = None) -> pd.DataFrame:
        """A DataFrame with `<output>_predictions` (and probabilities) per row of `dataset`."""
        return self.model.predict(read_dataset(dataset), batch_size=batch_size)

    def predict_to_file(self, dataset: DatasetSource, path: Union[str, Path], batch_size: Optional[int] = None) -> int:
        """Predictions of every row of `dataset` written to `path` (.csv or .parquet); returns the rows written.
        ecd reads a Parquet file and writes its predictions a chunk at a time, so memory does not grow with the
        rows (docs/scale.md); otherwise the same as predict() then writing."""
        if hasattr(self.model, "predict_to_file"):
            return self.model.predict_to_file(dataset, Path(path), batch_size)
        from .data.stream import write_frames

        return write_frames([self.predict(dataset, batch_size)], Path(path))

    def evaluate(self, dataset: DatasetSource, batch_size: Optional[int] = None) -> tuple[dict, pd.DataFrame]:
        """(metrics per output feature and "combined", predictions)."""
        return self.model.evaluate(read_dataset(dataset), batch_size=batch_size)

    @_recorded
    def experiment(self, dataset: Optional[DatasetSource] = None, **train_kwargs) -> tuple[TrainOutput, dict]:
        """Train, then evaluate on the test split; writes test_statistics.json and predictions.csv, and the plots
        learning_curves.png and (category outputs) confusion_matrix.png when matplotlib is installed."""
        out = self.train(dataset, **train_kwargs)
        test = self._splits_used.get("test")
        test_stats: dict = {}
        predictions = None
        main = process_state().is_main_process  # under torchrun every process evaluates; the main one writes
        if test is not None and len(test):
            test_stats, predictions = self.evaluate(test)
            if main:
                with phases.phase("writing"):
                    write_json(out.run_dir / "test_statistics.json", test_stats)
                    predictions.to_csv(out.run_dir / "predictions.csv", index=False)
        elif main:
            self.log("no test split: skipping evaluation")
        if main:
            with phases.phase("plots"):
                from .plots import write_run_plots  # never raises: a plot that fails is one line of log

                write_run_plots(out.run_dir, test, predictions, self.log)
            # the whole experiment's breakdown, evaluation and plots included
            out.statistics["phases"] = phases.current().summary()
            write_json(out.run_dir / "training_statistics.json", out.statistics)
        return out, test_stats

    def generate(self, prompts: Union[str, list[str]], **generation) -> list[str]:
        """llm only: generate a completion for each prompt (the prompt template is not applied)."""
        if self.config.model_type != "llm":
            raise CadenzaError("generate() is for model_type: llm")
        return self.model.generate([prompts] if isinstance(prompts, str) else list(prompts), **generation)

    # ------------------------------------------------------------------------------------- save and load
    def save(self, model_dir: Union[str, Path]) -> Path:
        """Write the model folder atomically: a crash leaves the previous folder (or none), never half of one."""
        model_dir = Path(model_dir)
        with atomic_dir(model_dir) as tmp:
            write_model_header(tmp, self.config.model_dump(mode="json"))
            self.model.save(tmp)
        self.model_dir = model_dir
        self.log(f"model saved to {model_dir}")
        return model_dir

    @staticmethod
    def load(model_path: Union[str, Path], log: Callable[[str], None] = _say) -> "Model":
        """Load a run folder or its model/ folder; predictions equal the saved model's. The folder is checked first
        (cadenza.artifacts.check_model_folder): a damaged, unsafe or newer folder is one ModelFolderError naming
        the file."""
        saved = check_model_folder(model_path)
        config = _saved_config(saved)
        self = Model.__new__(Model)
        self.config, self.log, self.model_dir = config, log, saved.model_dir
        with phases.phase("model load"):  # (the model type's modules count as imports)
            self.model = _model_type_class(config.model_type).load(saved.model_dir, config)
        return self

    @staticmethod
    def upload_to_hf_hub(repo_id: str, model_path: Union[str, Path], **kwargs) -> str:
        """Publish a trained model (run or model folder) with a model card; see docs/upload.md."""
        from .share.hub import upload_to_hf_hub

        return upload_to_hf_hub(repo_id, model_path, **kwargs)

    @classmethod
    def from_pretrained(cls, repo_id: str, *, revision: Optional[str] = None, token: Optional[str] = None,
                        **download_kwargs) -> "Model":
        """Download a Cadenza model from the Hub (or HF_ENDPOINT) and load it. download_kwargs go to
        cadenza.share.hub.download_model (cache_dir, repo_type, trust_remote_code)."""
        from .share.hub import download_model

        return cls.load(download_model(repo_id, revision=revision, token=token, **download_kwargs))
