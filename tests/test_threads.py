"""torch's thread count following the machine's load (cadenza.threads, device.cpu_sample/threads_for_load): the
decision on given readings, a real reading next to a spinning process, pins that are never adapted, and the count
restored after a training run and an embedding pass that adapted it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from cadenza import Model, device, phases, threads
from cadenza.device import CpuSample, others_busy_cores, threads_for_load


# ------------------------------------------------------------------------------------------------ the decision
def test_the_thread_count_is_the_cores_other_processes_leave_free():
    assert threads_for_load(cores=2, others=1.0, current=2, most=2) == 1
    assert threads_for_load(cores=2, others=0.0, current=1, most=2) == 2  # back to the start count
    assert threads_for_load(cores=2, others=0.0, current=2, most=2) == 2
    assert threads_for_load(cores=2, others=2.0, current=2, most=2) == 1  # at least one
    assert threads_for_load(cores=16, others=0.0, current=4, most=4) == 4  # never above the start count
    assert threads_for_load(cores=16, others=9.2, current=4, most=4) == 4  # 6.8 cores left: still 4
    assert threads_for_load(cores=16, others=13.0, current=4, most=4) == 3
    # 2 threads next to one busy process on 2 cores: the scheduler gives it ~2/3 of a core, and that is enough
    assert threads_for_load(cores=2, others=0.67, current=2, most=2) == 1


def test_readings_near_a_rounding_boundary_do_not_flap():
    # 1.45 cores left rounds to 1, but is within half a core + HYSTERESIS of 2: stay
    assert threads_for_load(cores=2, others=0.55, current=2, most=2) == 2
    assert threads_for_load(cores=2, others=0.45, current=1, most=2) == 1  # 1.55 left: stay at 1
    assert threads_for_load(cores=2, others=0.3, current=1, most=2) == 2  # 1.7 left: up


def test_others_use_is_all_busy_time_minus_this_process_per_second():
    before = CpuSample(busy=100.0, own=10.0, wall=50.0, cores=4)
    assert others_busy_cores(before, CpuSample(busy=106.0, own=12.0, wall=52.0, cores=4)) == pytest.approx(2.0)
    assert others_busy_cores(before, CpuSample(busy=101.0, own=11.5, wall=52.0, cores=4)) == 0.0  # jiffies rounding
    assert others_busy_cores(before, CpuSample(busy=130.0, own=10.0, wall=52.0, cores=4)) == 4.0  # at most the cores
    assert others_busy_cores(before, before) == 0.0


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs /proc/stat and two cores")
def test_a_spinning_process_reads_as_at_least_half_a_core():
    child = subprocess.Popen([sys.executable, "-c", "import time\nprint(flush=True)\nend = time.time() + 3\n"
                              "while time.time() < end: pass"], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # spinning from here on
        before = device.cpu_sample()
        time.sleep(1.5)
        after = device.cpu_sample()
    finally:
        child.kill()
        child.wait()
    assert after.cores == len(os.sched_getaffinity(0))
    assert others_busy_cores(before, after) >= 0.5


def test_no_proc_stat_means_no_adaptation(monkeypatch):
    monkeypatch.setattr(device, "cpu_sample", lambda: None)
    with threads.follow_load() as follow:
        follow.tick()
    assert not follow.active


# --------------------------------------------------------------------------------------- the follower in runs
class ScriptedLoad:
    """A stand-in for device.cpu_sample: other processes use `others[i]` cores in the second before reading i + 1;
    records the thread count at each reading."""

    def __init__(self, others: list[float], cores: int = 2):
        self.others, self.cores, self.busy, self.wall, self.seen = list(others), cores, 0.0, 0.0, []

    def __call__(self) -> CpuSample:
        self.seen.append(torch.get_num_threads())
        if len(self.seen) > 1:  # the first reading is the baseline
            self.busy += self.others.pop(0) if self.others else 0.0
        self.wall += 1.0
        return CpuSample(busy=self.busy, own=0.0, wall=self.wall, cores=self.cores)


@pytest.fixture
def two_threads_unpinned(monkeypatch):
    """torch at 2 threads, no pin in the environment, a reading at every tick; the count as before afterwards."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", device.FOLLOW_LOAD):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "RESAMPLE_SECONDS", 0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads_unpinned")
@pytest.mark.parametrize("pin", ["OMP_NUM_THREADS", "MKL_NUM_THREADS", device.FOLLOW_LOAD])
def test_a_pinned_count_is_never_adapted(monkeypatch, pin):
    monkeypatch.setenv(pin, "2" if pin != device.FOLLOW_LOAD else "0")
    load = ScriptedLoad([1.0, 1.0, 1.0])
    monkeypatch.setattr(device, "cpu_sample", load)
    with threads.follow_load() as follow:
        for _ in range(3):
            follow.tick()
            assert torch.get_num_threads() == 2
    assert not follow.active and load.seen == []  # not even read


@pytest.mark.usefixtures("two_threads_unpinned")
def test_one_change_per_change_logged_and_the_mean_recorded(monkeypatch):
    load = ScriptedLoad([1.0, 1.0, 1.0, 0.0])
    monkeypatch.setattr(device, "cpu_sample", load)
    lines = []
    with threads.follow_load(lines.append) as follow:
        for _ in range(4):
            follow.tick()
        assert torch.get_num_threads() == 2
    assert load.seen == [2, 2, 1, 1, 1]
    assert lines == ["threads: 2 -> 1 (other processes use ~1.0 of 2 cores)",
                     "threads: 1 -> 2 (other processes use ~0.0 of 2 cores)"]
    assert 1 <= follow.threads_used() <= 2


@pytest.mark.usefixtures("two_threads_unpinned")
def test_restored_after_an_error_in_the_block(monkeypatch):
    monkeypatch.setattr(device, "cpu_sample", ScriptedLoad([1.0]))
    with pytest.raises(RuntimeError), threads.follow_load() as follow:
        follow.tick()
        assert torch.get_num_threads() == 1
        raise RuntimeError("a step failed")
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("simulated_hardware", "two_threads_unpinned")
def test_a_training_run_adapts_and_restores_the_thread_count(tiny_llama_dir, cache_dir, tmp_path, monkeypatch):
    # 2 -> 1 while another process holds a core, back to 2 when it stops; torch's count as before after the run
    load = ScriptedLoad([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr(device, "cpu_sample", load)
    rows = pd.DataFrame([{"question": f"what comes after {i}", "answer": str(i + 1)} for i in range(16)])
    config = {"model_type": "llm", "base_model": str(tiny_llama_dir),
              "input_features": [{"name": "question", "type": "text"}],
              "output_features": [{"name": "answer", "type": "text"}],
              "prompt": {"template": "Q: {question}\nA:"}, "adapter": {"type": "lora", "r": 4},
              "preprocessing": {"split": {"type": "random", "probabilities": [1.0, 0.0, 0.0]}},
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": 2, "learning_rate": 0.01}}
    lines = []
    out = Model(config, log=lines.append).train(rows, output_directory=tmp_path)
    assert torch.get_num_threads() == 2
    assert 1 <= out.throughput["threads"] <= 2  # the mean over the epochs, reported with the throughput
    assert load.seen[:5] == [2, 2, 1, 1, 2]  # a reading per optimizer step
    assert [line for line in lines if line.startswith("threads:")] == [
        "threads: 2 -> 1 (other processes use ~1.0 of 2 cores)", "threads: 1 -> 2 (other processes use ~0.0 of 2 cores)"]


@pytest.mark.usefixtures("simulated_hardware", "two_threads_unpinned")
def test_the_embedding_pass_adapts_between_batches_and_records_its_threads(tiny_bert_dir, monkeypatch):
    from cadenza.config.load import load_config
    from cadenza.ecd.text_encoder import TextEncoder, load_tokenizer

    load = ScriptedLoad([1.0] * 100)  # busy throughout: one thread after the first batch
    monkeypatch.setattr(device, "cpu_sample", load)
    cfg = load_config({"model_type": "ecd",
                       "input_features": [{"name": "review", "type": "text", "encoder": {
                           "type": "auto_transformer", "pretrained_model_name_or_path": str(tiny_bert_dir)}}],
                       "output_features": [{"name": "sentiment", "type": "category"}]}).input_features[0].encoder
    precision = device.precision(None, "embed")
    encoder = TextEncoder(cfg, dtype=precision.dtype)
    texts = [" ".join(["good plot"] * (1 + i % 7)) for i in range(40)]
    with phases.recording() as record:
        vectors = encoder.embed(texts, load_tokenizer(cfg), 16, precision, tokens_per_batch=32)
    assert vectors.shape[0] == 40 and np.isfinite(vectors).all()
    assert torch.get_num_threads() == 2
    assert load.seen[:3] == [2, 2, 1]
    assert 1 <= record.figures["embed"]["threads"] < 2
