"""Interrupted training, resumed, gives the uninterrupted run's statistics and weights; what cannot be resumed is
refused with a message; run folders are claimed and locked.

The interruptions are real: `cadenza train` runs in a subprocess (a small driver script around cadenza.cli.main)
that pauses inside a chosen optimizer step, and the test sends it SIGTERM, SIGINT or SIGKILL there. SIGTERM and
SIGINT must let the step finish, save a checkpoint and exit 143 / 130; SIGKILL loses the steps since the last
checkpoint, which the resumed run takes again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import load_file

from cadenza import Model
from cadenza.errors import ModelFolderError
from cadenza.train.checkpoint import ResumeError, check_resumable
from cadenza.train.interrupt import TrainingInterrupted
from cadenza.train.run_folder import LOCK_FILE, RunFolderBusy, locked, new_run_dir
from conftest import signal_in_step

# cadenza train, pausing inside optimizer step CADENZA_TEST_PAUSE_AT_STEP (counted in this process) until the
# test creates the file `go`; `paused` tells the test it got there
DRIVER = """
import os, signal, sys, time
from pathlib import Path
from torch.optim.optimizer import register_optimizer_step_post_hook
from cadenza.cli import main

pause_at, flags, steps = int(os.environ["CADENZA_TEST_PAUSE_AT_STEP"]), Path(os.environ["CADENZA_TEST_FLAGS"]), 0
await_signal = os.environ.get("CADENZA_TEST_AWAIT_SIGNAL") == "1"

def signal_received():
    # Cadenza's handler (a StopRequest's method) records the signal. Under torchrun the test signals torchrun,
    # which forwards it a moment later: without waiting, a fast step could end before it arrives
    request = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return getattr(request, "signum", None) is not None

def pause(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == pause_at:
        (flags / "paused").write_text("")
        deadline = time.monotonic() + 60
        while not (flags / "go").exists() or (await_signal and not signal_received()
                                               and time.monotonic() < deadline):
            time.sleep(0.01)

register_optimizer_step_post_hook(pause)
sys.exit(main(sys.argv[1:]))
"""


def quiet(*_):
    pass


def ecd_case(bert: Path, trainable: bool) -> tuple[dict, pd.DataFrame]:
    rng = np.random.default_rng(0)
    words = ["good", "great", "bad", "awful", "plot", "actor", "scene", "music"]
    text = [" ".join(rng.choice(words, 5)) for _ in range(48)]
    score = np.array([t.count("good") + t.count("great") - t.count("bad") - t.count("awful") for t in text])
    x = rng.normal(size=len(text))
    df = pd.DataFrame({"review": text, "x": x, "sentiment": np.where(score > 0, "pos", "neg"), "rating": 2 * x + score})
    config = {
        "input_features": [{"name": "review", "type": "text", "preprocessing": {"max_sequence_length": 12},
                            "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": str(bert),
                                        "trainable": trainable}},
                           {"name": "x", "type": "number"}],
        "output_features": [{"name": "sentiment", "type": "category"}, {"name": "rating", "type": "number"}],
        "combiner": {"dropout": 0.2},  # random draws in every step: resuming must replay them
        # 35 training rows in batches of 8: 5 steps per epoch; evaluations within epochs too
        "trainer": {"epochs": 2, "batch_size": 8, "learning_rate": 0.01, "early_stop": -1, "eval_steps": 3,
                    "steps_per_checkpoint": 2},
    }
    return config, df


def llm_case(llama: Path, adapter: bool) -> tuple[dict, pd.DataFrame]:
    fruit, colours = ["apple", "banana", "cherry", "grape", "lemon", "mango"], ["red", "green", "blue", "yellow"]
    df = pd.DataFrame({"question": [f"what colour is the {fruit[i % 6]}?" + " really" * (i // 6) for i in range(20)],
                       "answer": [" ".join(colours[: 1 + i % 4]) for i in range(20)]})
    config = {"model_type": "llm", "base_model": str(llama),
              "input_features": [{"name": "question", "type": "text"}],
              "output_features": [{"name": "answer", "type": "text"}],
              "preprocessing": {"split": {"probabilities": [0.8, 0.2, 0.0]}},
              # 16 training rows in batches of 4: 4 steps per epoch
              "trainer": {"type": "finetune", "epochs": 2, "batch_size": 4, "learning_rate": 0.01 if adapter else 1e-3,
                          "early_stop": -1, "steps_per_checkpoint": 2}}
    if adapter:
        config["adapter"] = {"type": "lora", "r": 4, "dropout": 0.1}  # LoRA dropout draws random numbers too
    return config, df


# kind -> (case, its argument, the signal that stops the first process, the step it pauses in)
# then each run is resumed, killed with SIGKILL inside the 3rd step after the resumption (a checkpoint was written
# after its 1st or 2nd), and resumed to the end
KINDS = {
    "ecd_cached": (ecd_case, False, signal.SIGTERM, 4),
    "ecd_trainable": (ecd_case, True, signal.SIGINT, 3),
    "llm_lora": (llm_case, True, signal.SIGTERM, 3),
    "llm_full": (llm_case, False, signal.SIGINT, 2),
}


def stop_in_step(workdir: Path, args: list[str], step: int, sig: int,
                 command: Optional[list[str]] = None) -> subprocess.CompletedProcess:
    """Run the driver until it pauses inside optimizer step `step`, send `sig`, let it go on, wait for its end."""
    flags = workdir / f"flags-{time.monotonic_ns()}"
    flags.mkdir()
    env = {**os.environ, "CADENZA_TEST_PAUSE_AT_STEP": str(step), "CADENZA_TEST_FLAGS": str(flags),
           "CADENZA_TEST_AWAIT_SIGNAL": "0" if sig == signal.SIGKILL else "1"}
    command = command or [sys.executable, str(workdir / "driver.py")]
    proc = subprocess.Popen(command + args, cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (flags / "paused").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the driver ended before pausing in step {step} (rc {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    (flags / "go").write_text("")
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def saved_weights(run_dir: Path) -> dict[str, np.ndarray]:
    weights = {}
    for path in sorted((run_dir / "model").rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            weights[f"{path.relative_to(run_dir)}:{key}"] = value.astype(np.float64)
    return weights


def statistics(run_dir: Path) -> dict:
    stats = json.loads((run_dir / "training_statistics.json").read_text())
    return {"training_loss": [e["loss"] for e in stats["training"]],
            "validation": [e["combined"]["loss"] for e in stats["validation"]],
            "validation_steps": [(e["step"], e["combined"]["loss"]) for e in stats["validation_steps"]],
            "best": (stats["best_epoch"], stats["best_step"]), "steps": stats["steps"]}


@pytest.mark.parametrize("kind", list(KINDS))
def test_interrupted_and_killed_runs_resume_to_the_uninterrupted_result(kind, request, cache_dir, tmp_path):
    case, argument, first_signal, first_pause = KINDS[kind]
    base = request.getfixturevalue("tiny_bert_dir" if kind.startswith("ecd") else "tiny_llama_dir")
    config, df = case(base, argument)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    df.to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "driver.py").write_text(DRIVER)
    reference = Model(config, log=quiet).train(df, output_directory=tmp_path / "reference").run_dir

    args = ["train", "-c", "config.yaml", "--dataset", "data.csv", "-od", "cut"]
    run_dir = tmp_path / "cut" / "experiment_run"
    stopped = stop_in_step(tmp_path, args, first_pause, first_signal)
    assert stopped.returncode == 128 + first_signal, stopped.stderr[-3000:]
    assert "interrupted: checkpoint saved in cut/experiment_run/checkpoint; rerun with --resume to continue" \
        in stopped.stderr
    saved = json.loads((run_dir / "checkpoint" / "state.json").read_text())["state"]
    assert saved["global_step"] == first_pause  # the step it was in was finished, not cut off or repeated

    killed = stop_in_step(tmp_path, args + ["--resume"], 3, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoint").is_dir() and (run_dir / LOCK_FILE).exists()  # the dead process's lock is stale
    assert not (run_dir / "model").exists()

    resumed = Model(config, log=quiet).train(df, output_directory=tmp_path / "cut", resume=True)
    assert resumed.run_dir == run_dir and not (run_dir / "checkpoint").exists()
    expected, got = statistics(reference), statistics(run_dir)
    assert got["steps"] == expected["steps"] and got["best"] == expected["best"]
    for name in ("training_loss", "validation"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(got["validation_steps"], expected["validation_steps"], rtol=1e-6)
    a, b = saved_weights(reference), saved_weights(run_dir)
    assert a.keys() == b.keys() and a
    worst_abs = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    worst_rel = max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in a)
    print(f"{kind}: resumed after {signal.Signals(first_signal).name} and SIGKILL: weights differ by at most "
          f"{worst_abs:.3g} (absolute), {worst_rel:.3g} (relative to the tensor's largest value)")
    assert worst_abs <= 1e-6 and worst_rel <= 1e-5


# ------------------------------------------------------------------------------------------------- refusals
@pytest.fixture
def interrupted_run(tiny_bert_dir, cache_dir, tmp_path):
    """An ecd run stopped by SIGTERM (sent by the process to itself) in its 3rd step: (config, data, run folder)."""
    config, df = ecd_case(tiny_bert_dir, trainable=False)
    with signal_in_step(3, signal.SIGTERM), pytest.raises(TrainingInterrupted) as stopped:
        Model(config, log=quiet).train(df, output_directory=tmp_path)
    assert stopped.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    return config, df, tmp_path / "experiment_run"


def test_resume_refuses_a_changed_config(interrupted_run):
    config, df, run_dir = interrupted_run
    config["trainer"]["learning_rate"] = 0.02
    config["combiner"]["output_size"] = 64  # an architecture change: a message, not a state_dict traceback
    with pytest.raises(ResumeError) as refused:
        Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=True)
    message = str(refused.value)
    assert message.startswith(f"cannot resume {run_dir}: the run differs from its checkpoint: ")
    assert "trainer.learning_rate: 0.01 in the checkpoint, 0.02 now" in message
    assert "combiner.output_size: 256 in the checkpoint, 64 now" in message
    assert message.endswith("resume with the original config or start a new run")


def test_resume_refuses_other_data_or_seed(interrupted_run):
    config, df, run_dir = interrupted_run
    # two more rows: the random split puts one in the validation split and moves others around
    with pytest.raises(ResumeError, match=r"checkpoint: training data: 35 rows then and now, but other values; "
                                          r"validation data: 4 rows in the checkpoint, 5 now; resume with the "
                                          r"original data or start a new run$"):
        Model(config, log=quiet).train(pd.concat([df, df.head(2)]), output_directory=run_dir.parent, resume=True)
    with pytest.raises(ResumeError, match=r"random_seed: 42 in the checkpoint, 7 now; .*resume with --random_seed 42"):
        Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=True, random_seed=7)
    fingerprints = json.loads((run_dir / "checkpoint" / "state.json").read_text())["fingerprints"]
    with pytest.raises(ResumeError, match=r"processes: 1 in the checkpoint, 2 now; resume with the same number of "
                                          r"processes \(1\) or start a new run$"):
        check_resumable(run_dir, {**fingerprints, "processes": 2})  # as under `torchrun --nproc_per_node 2`
    out = Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=run_dir)  # unchanged: resumes
    assert out.run_dir == run_dir and (run_dir / "model").is_dir()
    with pytest.raises(ResumeError, match=r"no checkpoint to resume there \(the run finished: its model is in "
                                          r"model/\)"):
        Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=run_dir)
    with pytest.raises(ResumeError, match=r"--resume: no interrupted run of experiment_run in "):
        Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=True)


def test_resume_refuses_an_incomplete_checkpoint(interrupted_run):
    config, df, run_dir = interrupted_run
    (run_dir / "checkpoint" / "training_state.pt").unlink()
    with pytest.raises(ResumeError, match=r"its checkpoint .*checkpoint is incomplete \(training_state.pt missing\); "
                                          r"start a new run \(without --resume\)"):
        Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=True)
    state = run_dir / "checkpoint" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "format": 1}))
    with pytest.raises(ResumeError, match=r"its checkpoint was written by another Cadenza version \(checkpoint format "
                                          r"1; this one reads 2\); start a new run \(without --resume\)"):
        Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=True)


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(interrupted_run):
    config, df, run_dir = interrupted_run
    with locked(run_dir):  # another trainer holds it (a lock taken here conflicts like one of another process)
        with pytest.raises(RunFolderBusy, match=rf"run folder {run_dir} is in use by process {os.getpid()} on "):
            Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=run_dir)
    # a lock file whose process died without removing it (kill -9) holds no lock any more
    (run_dir / LOCK_FILE).write_text("process 999999999 on elsewhere")
    assert Model(config, log=quiet).train(df, output_directory=run_dir.parent, resume=True).run_dir == run_dir
    assert not (run_dir / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------- run folders
def test_runs_started_at_once_get_distinct_folders(tmp_path):
    start, claimed = threading.Barrier(8), []

    def claim():
        start.wait()
        claimed.append(new_run_dir(tmp_path, "experiment", "run"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in claimed) == sorted(["experiment_run"] + [f"experiment_run_{i}" for i in range(1, 8)])


def test_a_run_that_fails_before_training_leaves_no_folder(tiny_bert_dir, cache_dir, tmp_path):
    config, df = ecd_case(tiny_bert_dir, trainable=False)
    config["input_features"][0]["encoder"]["pretrained_model_name_or_path"] = str(tmp_path / "no-such-model")
    with pytest.raises(ModelFolderError, match="does not exist"):
        Model(config, log=quiet).train(df, output_directory=tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    config, _ = ecd_case(tiny_bert_dir, trainable=False)
    config["trainer"].update(epochs=1)
    assert Model(config, log=quiet).train(df, output_directory=tmp_path / "out").run_dir.name == "experiment_run"


# two processes: an ecd head under DDP; LoRA under FSDP2, each decoder layer sharded (weights, gradients and optimizer
# state gathered for the checkpoint, put back into shards on resume); DeepSpeed ZeRO: a trained BERT encoder with the
# optimizer state partitioned (stage 1), LoRA with gradients too (2), full fine-tuning with the parameters too (3)
# (the step each pair is stopped in: 2 processes take 3 (ecd) and 2 (llm) steps per epoch)
TWO_PROCESS_KINDS = {"ecd_cached_ddp": (ecd_case, "tiny_bert_dir", False, None, 4),
                     "llm_lora_fsdp": (llm_case, "tiny_llama_dir", True, {"type": "fsdp"}, 3),
                     "ecd_trainable_zero1": (ecd_case, "tiny_bert_dir", True,
                                             {"type": "deepspeed", "deepspeed": {"zero_stage": 1}}, 4),
                     "llm_lora_zero2": (llm_case, "tiny_llama_dir", True, {"type": "deepspeed"}, 3),
                     "llm_full_zero3": (llm_case, "tiny_llama_dir", False,
                                        {"type": "deepspeed", "deepspeed": {"zero_stage": 3}}, 3)}


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(TWO_PROCESS_KINDS))
def test_two_processes_stop_together_on_sigterm_and_resume_to_the_same_model(kind, request, cache_dir, tmp_path):
    """torchrun forwards SIGTERM to both processes: they stop at the same step, the main one saves every process's
    random states, and the resumed pair trains on exactly as the uninterrupted pair."""
    case, model_dir, flag, backend, step = TWO_PROCESS_KINDS[kind]
    config, df = case(request.getfixturevalue(model_dir), flag)
    if backend:
        config["backend"] = backend
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    df.to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "driver.py").write_text(DRIVER)
    # --standalone: a free port of its own, not 29500 (which another torchrun on this machine may hold)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    args = ["train", "-c", "config.yaml", "--dataset", "data.csv"]
    reference = subprocess.run(torchrun + ["-m", "cadenza"] + args + ["-od", "reference"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-8000:]

    stopped = stop_in_step(tmp_path, args + ["-od", "cut"], step, signal.SIGTERM,
                           command=torchrun + [str(tmp_path / "driver.py")])
    assert "interrupted: checkpoint saved in cut/experiment_run/checkpoint" in stopped.stderr, stopped.stderr[-3000:]
    run_dir = tmp_path / "cut" / "experiment_run"
    saved = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert saved["state"]["global_step"] == step and len(saved["rng"]) == 2

    resumed = subprocess.run(torchrun + ["-m", "cadenza"] + args + ["-od", "cut", "--resume"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-8000:]
    expected, got = statistics(tmp_path / "reference" / "experiment_run"), statistics(run_dir)
    np.testing.assert_allclose(got["training_loss"], expected["training_loss"], rtol=1e-6)
    np.testing.assert_allclose(got["validation"], expected["validation"], rtol=1e-6)
    a, b = saved_weights(tmp_path / "reference" / "experiment_run"), saved_weights(run_dir)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
