"""The shared training loop on a small linear model: exact accumulation, early stopping, schedules."""

import pytest
import torch

from cadenza.config.schema import TrainerConfig
from cadenza.train.loop import TrainTask, fit, lr_schedule

pytestmark = pytest.mark.usefixtures("simulated_hardware")  # every test runs as fp32 and as bf16 hardware


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, generator=g)


def task_for(batches, evaluate=None):
    def loss_sum(model, batch):
        x, y = batch
        return ((model(x).squeeze(-1) - y) ** 2).sum()

    return TrainTask(batches=lambda epoch: iter(batches), num_batches=len(batches), weight=lambda b: len(b[1]),
                     loss_sum=loss_sum, evaluate=evaluate)


def fresh_model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def test_accumulation_of_uneven_micro_batches_equals_one_big_batch():
    x, y = data()
    cfg = dict(epochs=1, learning_rate=0.1, optimizer={"type": "sgd"}, gradient_clipping={"clipglobalnorm": None},
               early_stop=-1, checkpoints_per_epoch=0)
    big = fresh_model()
    fit(big, task_for([(x, y)]), TrainerConfig(**cfg), log=lambda _: None)
    # 9 rows then 3 rows: a mean of per-batch means would weight the 3 rows three times as much
    small = fresh_model()
    fit(small, task_for([(x[:9], y[:9]), (x[9:], y[9:])]),
        TrainerConfig(**cfg, gradient_accumulation_steps=2), log=lambda _: None)
    torch.testing.assert_close(small.weight, big.weight)
    torch.testing.assert_close(small.bias, big.bias)


def test_early_stopping_keeps_the_best_weights():
    x, y = data()
    seen = []

    def evaluate(model):
        seen.append(model.weight.detach().clone())
        return {"combined": {"loss": [1.0, 0.5, 0.7, 0.9, 0.95, 0.99][len(seen) - 1]}}

    model = fresh_model()
    result = fit(model, task_for([(x, y)], evaluate), TrainerConfig(epochs=6, early_stop=2, learning_rate=0.1,
                                                                    checkpoints_per_epoch=0), log=lambda _: None)
    assert result.stopped_early and len(seen) == 4 and result.best_epoch == 2
    torch.testing.assert_close(model.weight, seen[1])


def test_warmup_then_linear_and_cosine_decay():
    linear = lr_schedule(TrainerConfig(learning_rate_scheduler={"decay": "linear", "warmup_fraction": 0.1}), 100, 10)
    assert linear(0) == 0.1 and linear(9) == 1.0 and abs(linear(55) - 0.5) < 1e-9 and linear(100) == 0.0
    cosine = lr_schedule(TrainerConfig(learning_rate_scheduler={"decay": "cosine", "min_lr_fraction": 0.1}), 100, 10)
    assert cosine(0) == 1.0 and abs(cosine(50) - 0.55) < 1e-9 and abs(cosine(100) - 0.1) < 1e-9


def test_compile_trains_the_same_model():
    """trainer.compile: torch.compile in place; the same steps, the same parameter names (checkpoints unchanged)."""
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    trained = []
    for compile_ in (False, True):
        model = fresh_model()
        cfg = TrainerConfig(epochs=2, learning_rate=0.1, compile=compile_)
        fit(model, task_for(batches), cfg, log=lambda *_: None)
        trained.append(dict(model.named_parameters()))
    assert trained[0].keys() == trained[1].keys()
    for name in trained[0]:
        torch.testing.assert_close(trained[1][name], trained[0][name], rtol=1e-5, atol=1e-6)


def test_learning_rate_scaling_with_processes():
    from cadenza.train.loop import scaled_learning_rate

    lr = lambda scaling, world: scaled_learning_rate(  # noqa: E731
        TrainerConfig(learning_rate=0.01, learning_rate_scaling=scaling), world)
    assert lr(None, 4) == lr("constant", 4) == 0.01
    assert lr("linear", 4) == pytest.approx(0.04) and lr("sqrt", 4) == pytest.approx(0.02)
    assert lr("linear", 1) == 0.01


def test_eval_steps_evaluate_within_epochs_and_drive_early_stopping():
    x, y = data(12)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]  # 3 steps per epoch
    seen = []

    def evaluate(model):
        seen.append(model.weight.detach().clone())
        return {"combined": {"loss": [1.0, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0][len(seen) - 1]}}

    model = fresh_model()
    result = fit(model, task_for(batches, evaluate),
                 TrainerConfig(epochs=5, eval_steps=2, early_stop=3, learning_rate=0.1, checkpoints_per_epoch=0),
                 log=lambda _: None)
    # evaluations: step 2, end of epoch 1 (step 3), step 4, end of epoch 2 (step 6): the best is at step 3; three
    # evaluations without improvement (steps 4, 6, 8) stop the run during epoch 3
    assert [e["step"] for e in result.statistics["validation_steps"]] == [2, 4, 8]
    assert len(result.statistics["validation"]) == 3  # one per epoch, the stopped epoch included
    assert result.stopped_early and (result.best_epoch, result.best_step) == (1, 3)
    torch.testing.assert_close(model.weight, seen[1])


def test_effective_batch_size_sets_accumulation():
    from cadenza.train.loop import accumulation_steps

    cfg = TrainerConfig(gradient_accumulation_steps="auto", effective_batch_size=16)
    assert accumulation_steps(cfg, 4, 1) == 4 and accumulation_steps(cfg, 4, 2) == 2
    assert accumulation_steps(TrainerConfig(gradient_accumulation_steps=3, effective_batch_size=16), 4, 1) == 3
    x, y = data(16)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    task = task_for(batches)
    task.micro_batch_rows = 4
    result = fit(fresh_model(), task, TrainerConfig(epochs=1, learning_rate=0.1, gradient_accumulation_steps="auto",
                                                    effective_batch_size=8), log=lambda _: None)
    assert result.steps == 2


def test_l1_regularization_adds_the_sign_of_each_weight():
    x, y = data()
    trained = {}
    for kind in ("l2", "l1"):
        model = fresh_model()
        start = model.weight.detach().clone()
        cfg = TrainerConfig(epochs=1, learning_rate=1.0, optimizer={"type": "sgd"}, regularization_type=kind,
                            regularization_lambda=0.0 if kind == "l2" else 0.1, gradient_clipping={"clipglobalnorm": None})
        fit(model, task_for([(x, y)]), cfg, log=lambda _: None)
        trained[kind] = model.weight.detach()
    torch.testing.assert_close(trained["l1"], trained["l2"] - 0.1 * torch.sign(start))


def test_reduce_on_plateau_lowers_the_learning_rate():
    x, y = data()
    lines = []
    fit(fresh_model(), task_for([(x, y)], lambda m: {"combined": {"loss": 1.0}}),
        TrainerConfig(epochs=4, learning_rate=0.1, early_stop=-1, checkpoints_per_epoch=0,
                      learning_rate_scheduler={"reduce_on_plateau": 1, "reduce_rate": 0.5}), log=lines.append)
    assert [line.split("x")[-1] for line in lines if "learning rate" in line] == ["0.5", "0.25", "0.125"]


def test_step_arithmetic_in_one_place():
    from cadenza.train.loop import plan_steps

    # 10 micro-batches, 2 processes, 2 per step: 3 steps per epoch (the last one short)
    plan = plan_steps(TrainerConfig(epochs=4, gradient_accumulation_steps=2), 10, 4, 2)
    assert (plan.accumulation, plan.steps_per_epoch, plan.total_steps) == (2, 3, 12)
    assert plan_steps(TrainerConfig(epochs=4, train_steps=5), 10, 4, 1).total_steps == 5
    plan = plan_steps(TrainerConfig(epochs=1, gradient_accumulation_steps="auto", effective_batch_size=16), 8, 4, 1)
    assert (plan.accumulation, plan.total_steps) == (4, 2)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """The first SIGTERM asks for a stop at the end of the step; a second one, in the same step, stops mid-step
    without saving: the checkpoint on disk stays the one of the last step boundary."""
    import json
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from cadenza.train.interrupt import TrainingInterrupted

    x, y = data(12)
    steps = []

    def terminate_twice_in_step_3(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    handle = register_optimizer_step_post_hook(terminate_twice_in_step_3)
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            fit(fresh_model(), task_for([(x[i:i + 3], y[i:i + 3]) for i in range(0, 12, 3)]),
                TrainerConfig(epochs=2, learning_rate=0.1, steps_per_checkpoint=1), run_dir=tmp_path,
                log=lambda _: None)
    finally:
        handle.remove()
    assert not stopped.value.saved and stopped.value.exit_code == 143
    assert str(stopped.value).startswith("interrupted twice: stopped at once without saving; rerun with --resume")
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["state"]["global_step"] == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_training_in_another_thread_installs_no_signal_handlers():
    """Python only lets the main thread install signal handlers: elsewhere fit trains without them."""
    import threading

    x, y = data()
    outcome = []

    def train():
        try:
            outcome.append(fit(fresh_model(), task_for([(x, y)]), TrainerConfig(epochs=1, learning_rate=0.1),
                               log=lambda _: None))
        except Exception as e:  # signal.signal outside the main thread raises ValueError
            outcome.append(e)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert [getattr(r, "steps", r) for r in outcome] == [1]


def test_resume_refuses_other_batches(tmp_path):
    """Config and data are compared before (tests/test_resume.py); a batch size chosen at run time (batch_size:
    auto on a GPU) could still change the steps per epoch, and with them what `step_in_epoch` means."""
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from cadenza.train.checkpoint import ResumeError
    from cadenza.train.interrupt import TrainingInterrupted

    x, y = data(12)
    cfg = TrainerConfig(epochs=2, learning_rate=0.1)
    handle = register_optimizer_step_post_hook(lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        with pytest.raises(TrainingInterrupted):
            fit(fresh_model(), task_for([(x[i:i + 3], y[i:i + 3]) for i in range(0, 12, 3)]), cfg, run_dir=tmp_path,
                log=lambda _: None)
    finally:
        handle.remove()
    with pytest.raises(ResumeError, match=r"its batches differ from the checkpoint's: micro_batches_per_epoch: 4 in "
                                          r"the checkpoint, 2 now; steps_per_epoch: 4 in the checkpoint, 2 now; "
                                          r"total_steps: 8 in the checkpoint, 4 now; with trainer.batch_size: auto"):
        fit(fresh_model(), task_for([(x[:6], y[:6]), (x[6:], y[6:])]), cfg, run_dir=tmp_path, resume=True,
            log=lambda _: None)
    result = fit(fresh_model(), task_for([(x[i:i + 3], y[i:i + 3]) for i in range(0, 12, 3)]), cfg, run_dir=tmp_path,
                 resume=True, log=lambda _: None)
    assert result.steps == 8
