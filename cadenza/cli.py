"""The `cadenza` command: train, predict, evaluate, experiment, hyperopt, estimate, generate, render_config, upload."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from . import phases

DEBUG_HINT = "rerun with --debug (or CADENZA_DEBUG=1) for the full traceback, and include it if you report a bug"


def _data_args(p: argparse.ArgumentParser, split_sets: bool = True) -> None:
    p.add_argument("--dataset", help="csv/tsv/json/jsonl/parquet file, or a packaged data set "
                   "(rotten_tomatoes, chatterbot)")
    if split_sets:
        p.add_argument("--training_set", help="explicit training set (instead of splitting --dataset)")
        p.add_argument("--validation_set")
        p.add_argument("--test_set")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    _data_args(p)
    p.add_argument("-od", "--output_directory", default="results")
    p.add_argument("--experiment_name", default="experiment")
    p.add_argument("--model_name", default="run")
    p.add_argument("--random_seed", type=int, default=42)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_FOLDER",
                   help="continue an interrupted run: the newest one of this experiment/model name, or RUN_FOLDER")
    p.add_argument("--skip_save_model", action="store_true")
    p.add_argument("--skip_save_log", action="store_true", help="write no TensorBoard event files (<run>/logs)")
    p.add_argument("--mlflow", action="store_true", help="log params, metrics and the model to MLflow "
                   "(MLFLOW_TRACKING_URI, else OUTPUT_DIRECTORY/mlflow.db); see docs/tracking.md")


def _train_kwargs(a) -> dict:
    return dict(dataset=a.dataset, training_set=a.training_set, validation_set=a.validation_set,
                test_set=a.test_set, output_directory=a.output_directory, experiment_name=a.experiment_name,
                model_name=a.model_name, resume=a.resume, random_seed=a.random_seed,
                skip_save_model=a.skip_save_model, skip_save_log=a.skip_save_log, mlflow=a.mlflow)


def cmd_train(a) -> None:
    with phases.phase("imports"):
        from .api import Model

    out = Model(a.config).train(**_train_kwargs(a))
    print(f"done: {out.run_dir}")


def cmd_experiment(a) -> None:
    with phases.phase("imports"):
        from .api import Model

    out, test_stats = Model(a.config).experiment(**_train_kwargs(a))
    print(json.dumps(_summary(test_stats), indent=2))
    print(f"done: {out.run_dir}")


def _summary(stats: dict) -> dict:
    return {feature: {k: round(v, 4) for k, v in values.items() if isinstance(v, float)}
            for feature, values in stats.items()}


def cmd_hyperopt(a) -> None:
    from .search import hyperopt

    hyperopt(a.config, a.dataset, output_directory=a.output_directory, experiment_name=a.experiment_name,
             random_seed=a.random_seed)


def cmd_estimate(a) -> None:
    from .api import Model

    available = int(a.available_memory_gb * 2**30) if a.available_memory_gb else None
    est = Model(a.config).estimate(a.dataset, training_set=a.training_set, validation_set=a.validation_set,
                                   test_set=a.test_set, random_seed=a.random_seed, available_bytes=available,
                                   refresh=a.recalibrate)
    print(json.dumps(est.to_dict(), indent=2) if a.output == "json" else "\n".join(est.lines))


def cmd_distill(a) -> None:
    from .distill import distill

    distill(a.config, a.dataset, training_set=a.training_set, validation_set=a.validation_set, test_set=a.test_set,
            output_directory=a.output_directory, experiment_name=a.experiment_name, model_name=a.model_name,
            random_seed=a.random_seed)


def cmd_predict(a) -> None:
    with phases.phase("imports"):
        from .api import Model

    model = Model.load(a.model_path)
    out = Path(a.output_directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = model.predict_to_file(a.dataset, out / "predictions.csv")  # chunk by chunk: any size of Parquet file
    print(f"{rows} predictions written to {out / 'predictions.csv'}")


def cmd_evaluate(a) -> None:
    with phases.phase("imports"):
        from .api import Model
        from .artifacts import write_json

    stats, predictions = Model.load(a.model_path).evaluate(a.dataset)
    out = Path(a.output_directory)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "test_statistics.json", stats)
    predictions.to_csv(out / "predictions.csv", index=False)
    print(json.dumps(_summary(stats), indent=2))


def cmd_generate(a) -> None:
    from .api import Model

    model = Model.load(a.model_path) if a.model_path else Model(a.config)
    for prompt, text in zip(a.prompt, model.generate(a.prompt, **({"max_new_tokens": a.max_new_tokens}
                                                                  if a.max_new_tokens else {}))):
        print(f"### {prompt}\n{text}\n")


def cmd_render_config(a) -> None:
    from .config.load import render_config, to_yaml

    text = to_yaml(render_config(a.config))
    if a.output:
        Path(a.output).write_text(text)
    else:
        print(text, end="")


def build_parser(verb: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole command line; with `verb` (the sub-command the command line names), one of this module's own
    sub-commands, the sub-commands of other modules (upload, serve, export_model, visualize, merge, ...) are left
    out, so that their modules are not imported for nothing."""
    parser = argparse.ArgumentParser(prog="cadenza", description="Declarative fine-tuning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model")
    _train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("experiment", help="train, then evaluate on the test split")
    _train_args(p)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("hyperopt", help="search the config's hyperopt parameters with Optuna (docs/hyperopt.md)")
    p.add_argument("-c", "--config", required=True, help="YAML config file with a hyperopt section")
    p.add_argument("--dataset", required=True, help="data set, split by preprocessing.split")
    p.add_argument("-od", "--output_directory", default="results")
    p.add_argument("--experiment_name", default="hyperopt", help="also the Optuna study name (shared storage)")
    p.add_argument("--random_seed", type=int, default=42)
    p.set_defaults(func=cmd_hyperopt)

    p = sub.add_parser("estimate", help="predict peak memory and time of `train` before running it "
                       "(docs/estimate.md)")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    _data_args(p)
    p.add_argument("--random_seed", type=int, default=42)
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.add_argument("--available_memory_gb", type=float, help="compare with this much memory instead of what the "
                   "machine has available now")
    p.add_argument("--recalibrate", action="store_true", help="measure this machine again (the calibration is "
                   "cached in <cache>/estimate/)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("distill", help="label rows with an llm teacher, train the ecd student on its labels, "
                       "compare both on the test rows (docs/distill.md)")
    p.add_argument("-c", "--config", required=True, help="the student's ecd config with a distill section")
    _data_args(p)
    p.add_argument("-od", "--output_directory", default="results")
    p.add_argument("--experiment_name", default="distill")
    p.add_argument("--model_name", default="run")
    p.add_argument("--random_seed", type=int, default=42)
    p.set_defaults(func=cmd_distill)

    for name, func, what in (("predict", cmd_predict, "predictions.csv"),
                             ("evaluate", cmd_evaluate, "test_statistics.json and predictions.csv")):
        p = sub.add_parser(name, help=f"{name} with a trained model; writes {what}")
        p.add_argument("-m", "--model_path", required=True, help="run folder or its model/ folder")
        p.add_argument("--dataset", required=True)
        p.add_argument("-od", "--output_directory", default="results")
        p.set_defaults(func=func)

    p = sub.add_parser("generate", help="llm: generate completions for prompts")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("-m", "--model_path", help="a trained llm")
    group.add_argument("-c", "--config", help="an llm config (zero-shot use of its base_model)")
    p.add_argument("-p", "--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--max_new_tokens", type=int)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("render_config", help="print the config with every default filled")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_render_config)

    if verb not in sub.choices:
        from .share.hub import register_cli

        register_cli(sub)
        from .serve import register_cli as register_serve; register_serve(sub)  # noqa: E702
        from .export import register_cli as register_export; register_export(sub)  # noqa: E702
        from .plots import register_cli as register_visualize; register_visualize(sub)  # noqa: E702
        from .merge_command import register_cli as register_merge; register_merge(sub)  # noqa: E702
    _add_debug_flag(parser, sub)
    return parser


def _verb(argv: Optional[list[str]]) -> Optional[str]:
    """The sub-command named on the command line: its first argument that is not an option (only --debug, a flag,
    may come before it)."""
    return next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)


def _add_debug_flag(parser: argparse.ArgumentParser, sub) -> None:
    """--debug before or after the sub-command. The sub-commands' copy defaults to SUPPRESS so that an absent
    flag after the sub-command does not overwrite one given before it."""
    help_text = "on any error, raise it with its full traceback (also: CADENZA_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=help_text)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=help_text)


def _debug_requested(args) -> bool:
    return args.debug or os.environ.get("CADENZA_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 a user error (CadenzaError: config, data, model folder, Hub, hardware) printed as
    one paragraph, 1 anything else (a bug: one line and how to see the traceback), 130 Ctrl-C and 143 SIGTERM
    (training saves a checkpoint first: rerun with --resume)."""
    # the run's breakdown of time by phase; as the `cadenza` command, from the process's start (the interpreter
    # starting and every import included)
    with phases.recording(from_process_start=argv is None) as record:
        with phases.phase("imports"):
            args = build_parser(_verb(argv)).parse_args(argv)
        code = _run(args)
    if code == 0 and args.func in RECORDED:
        from .train.loop import process_state  # imported by the verb already

        if process_state().is_main_process:
            print(record.table(), flush=True)
    if argv is None:
        if code == 0:
            _end_process_group()
        # The process ends now. Freezing every object skips the interpreter's final garbage collection over all
        # the objects torch, transformers and pandas made (measured on a busy 2-core machine: ~6-10 s between
        # atexit and exit, ~1.4 s frozen); atexit handlers still run and refcounted objects are still released.
        import gc

        gc.freeze()
    return code


def _end_process_group() -> None:
    """Under torchrun / `accelerate launch`, the process group is torn down before the interpreter ends: left to
    finalization, gloo's worker threads can still hold tensors and abort the process ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489). Seen once here in a 2-rank ecd train that had finished and
    saved. Only after success: ranks that failed may never reach the collective teardown (torchtitan does the same)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if "deepspeed" in sys.modules:  # a DeepSpeed engine's reference cycles hold the group: freed first
            import gc

            gc.collect()
        dist.destroy_process_group()


def _run(args) -> int:
    """Exit codes as main() documents them."""
    from .errors import CadenzaError
    from .train.interrupt import TrainingInterrupted

    debug = _debug_requested(args)
    try:
        args.func(args)
    except TrainingInterrupted as e:  # SIGINT/SIGTERM during training: where the checkpoint is, 128 + signal
        print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CadenzaError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"unexpected error: {_one_line(e)}\n{DEBUG_HINT}", file=sys.stderr)
        return 1
    return 0


# the verbs that print their breakdown of time by phase (cadenza.phases) at the end
RECORDED = {cmd_train, cmd_experiment, cmd_predict, cmd_evaluate}


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
