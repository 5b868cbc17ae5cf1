"""Hardware detection and the precision table (cadenza/device.py), against sample /proc/cpuinfo texts and CUDA
capabilities: every branch, whatever machine runs the suite."""

import json

import pytest
import torch

from cadenza import device
from cadenza.device import Hardware, Precision, cpu_bf16_units, cuda_bf16_units, precision

# flags lines as three real CPUs print them (trimmed to the flags that matter and a few neighbours)
AVX2_ONLY = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
AVX512_BF16 = ("model name\t: AMD EPYC 9B14\n"
               "flags\t\t: fpu avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n")
SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Platinum 8481C\n"
                   "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")


@pytest.mark.parametrize("cpuinfo, units", [(AVX2_ONLY, None), (AVX512_BF16, "AVX512-BF16"),
                                            (SAPPHIRE_RAPIDS, "AMX"), ("", None)])
def test_cpu_bf16_units_from_cpuinfo(cpuinfo, units):
    assert cpu_bf16_units(cpuinfo) == units


def test_a_flag_name_inside_another_is_not_taken_for_it():
    assert cpu_bf16_units("flags\t: avx512_bf16x avx2\n") is None


@pytest.mark.parametrize("capability, has", [((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)])
def test_cuda_bf16_units_from_capability(capability, has):
    assert (cuda_bf16_units(capability) is not None) == has


AVX2 = Hardware("cpu", "AVX2 CPU", None)
AMX = Hardware("cpu", "Xeon", "AMX")
A100 = Hardware("cuda", "NVIDIA A100", "CUDA sm_80")
T4 = Hardware("cuda", "Tesla T4", None)


@pytest.mark.parametrize("hw", [AVX2, AMX, A100, T4])
@pytest.mark.parametrize("part", sorted(device.PARTS))
def test_precision_table(hw, part):
    auto = precision(None, part, hw)
    assert auto.bf16 == (hw.bf16_units is not None and part in device.AUTO_BF16_PARTS)
    assert precision(True, part, hw).bf16 and not precision(False, part, hw).bf16  # the config always wins
    assert "use_mixed_precision" in auto.describe(part)


def test_reasons_say_why():
    assert precision(None, "train", AMX).describe("train") == (
        "precision: bf16 autocast (fp32 master weights) for training — auto: cpu has AMX; "
        "set trainer.use_mixed_precision: false for fp32")
    # fp32 training says fp32 and nothing about autocast
    assert precision(False, "train", AMX).describe("train").startswith("precision: fp32 for training — ")
    assert "no bf16 units" in precision(None, "train", AVX2).reason
    assert "emulated" in precision(True, "train", AVX2).reason
    assert "too small" in precision(None, "head", AMX).reason


def test_unknown_part_is_a_bug():
    with pytest.raises(ValueError):
        precision(None, "everything", AVX2)


@pytest.mark.parametrize("bf16", [False, True])
def test_autocast_computes_in_the_chosen_dtype(bf16):
    a = torch.randn(4, 4)
    with Precision(bf16, "test").autocast("cpu"):
        out = a @ a
    assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_this_machine_is_detected_once():
    hw = device.hardware()
    assert hw.device in ("cpu", "cuda") and device.hardware() is hw


def test_peak_flops_override(monkeypatch):
    monkeypatch.setenv("CADENZA_PEAK_TFLOPS", "2.5")
    assert device.peak_flops(True) == 2.5e12


def test_measured_peak_is_the_best_this_machine_has_read(cache_dir, monkeypatch):
    """A slow moment of a shared machine lowers one process's measurement, not the peak MFU divides by: the best
    reading per machine and precision is kept in the cache folder; a higher one replaces it; a broken file is
    ignored and rewritten."""
    monkeypatch.delenv("CADENZA_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(device, "hardware", lambda: device.Hardware("cpu", "test cpu", None))
    readings = iter([2e11, 1e11, 3e11, 5e10, 4e10])

    def new_process(bf16=False):  # each call: a fresh process's first measurement
        monkeypatch.setattr(device, "_MEASURED_PEAK", {})
        monkeypatch.setattr(device, "_measure_matmul_peak", lambda dtype, where: next(readings))
        return device.peak_flops(bf16)
    assert new_process() == 2e11
    assert new_process() == 2e11  # a slow moment (1e11): the best reading stands
    assert new_process() == 3e11  # a faster one replaces it ...
    stored = json.loads((cache_dir / device.PEAK_FILE).read_text())
    assert list(stored.values()) == [3e11] and list(stored)[0].endswith("|fp32")
    assert new_process(bf16=True) == 5e10  # ... per precision
    (cache_dir / device.PEAK_FILE).write_text("{not json")
    assert new_process() == 4e10 and json.loads((cache_dir / device.PEAK_FILE).read_text())


def test_a_peak_below_what_a_run_reached_is_measured_again(cache_dir, monkeypatch):
    """A first reading taken in a slow moment (an empty cache folder: nothing better to fall back on) would print a
    share of peak over 100%: a run that reached more has the peak measured again, and the higher reading counts."""
    monkeypatch.delenv("CADENZA_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(device, "hardware", lambda: device.Hardware("cpu", "test cpu", None))
    monkeypatch.setattr(device, "_MEASURED_PEAK", {})
    readings = iter([1e11, 3e11, 2e11, 5e10])
    monkeypatch.setattr(device, "_measure_matmul_peak", lambda dtype, where: next(readings))
    assert device.peak_flops(False) == 1e11
    assert device.peak_flops(False, reached=0.9e11) == 1e11  # below the peak: not measured again
    assert device.peak_flops(False, reached=1.5e11) == 3e11  # measured again: the higher reading
    assert device.peak_flops(False) == 3e11
    assert device.peak_flops(False, reached=4e11) == 3e11  # a lower second reading (2e11) changes nothing ...
    assert json.loads((cache_dir / device.PEAK_FILE).read_text()) == {f"{device.machine_key()}|fp32": 3e11}
    monkeypatch.setenv("CADENZA_PEAK_TFLOPS", "0.1")
    assert device.peak_flops(False, reached=1e15) == 1e11  # ... and a peak the user set is never measured


def test_measuring_the_peak_leaves_the_runs_random_numbers_alone(monkeypatch):
    """The peak may be measured again in the middle of a run (above), so it draws from its own generator: the run's
    random numbers, and a resumed run's equality with an uninterrupted one, cannot depend on it."""
    monkeypatch.setattr(device, "PEAK_PRODUCT_SIZES", (64,))
    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    device._measure_matmul_peak(torch.float32)
    assert torch.equal(torch.rand(5), expected)


def test_a_gpu_not_in_the_table_is_measured_on_the_gpu(monkeypatch):
    """MFU on a GPU the table does not know divides by a product timed on that GPU, not on the CPU beside it (which
    would give an MFU in the thousands of percent). The CUDA timing itself needs a GPU; the routing is tested here."""
    monkeypatch.delenv("CADENZA_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(device, "hardware", lambda: device.Hardware("cuda", "Some New GPU", "CUDA sm_90"))
    monkeypatch.setattr(device, "_MEASURED_PEAK", {})
    monkeypatch.setattr(device, "best_peak_seen", lambda bf16, measured: measured)
    asked = []
    monkeypatch.setattr(device, "_measure_matmul_peak", lambda dtype, where: asked.append((dtype, where)) or 1e14)
    assert device.peak_flops(True) == 1e14
    assert asked == [(torch.bfloat16, torch.device("cuda"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_peak_grows_the_product_until_it_takes_long_enough(monkeypatch, dtype):
    """A product too quick to time well (a many-core CPU's 1024 x 1024) is measured again at the next size."""
    sizes = []
    real_randn = torch.randn
    monkeypatch.setattr(device.torch, "randn", lambda *shape, **kw: sizes.append(shape) or real_randn(*shape, **kw))
    monkeypatch.setattr(device, "PEAK_PRODUCT_SIZES", (64, 128, 256))
    monkeypatch.setattr(device, "PEAK_PRODUCT_SECONDS", 3600.0)  # never long enough: every size, the last one counts
    assert 1e6 < device._measure_matmul_peak(dtype) < 1e16
    assert sizes == [(64, 64), (128, 128), (256, 256)]
    sizes.clear()
    monkeypatch.setattr(device, "PEAK_PRODUCT_SECONDS", 0.0)  # the first size is long enough
    device._measure_matmul_peak(dtype)
    assert sizes == [(64, 64)]


def test_gpu_peaks_per_precision_and_name():
    """MFU on a GPU divides by the peak of the precision that runs: tensor-core bf16, or plain fp32 (no TF32)."""
    assert device.gpu_peak_flops("NVIDIA H200", True) == 989e12
    assert device.gpu_peak_flops("NVIDIA H200", False) == 67e12
    assert device.gpu_peak_flops("NVIDIA A100-SXM4-80GB", False) == 19.5e12  # not the A10's figure
    assert device.gpu_peak_flops("NVIDIA A10", True) == 125e12
    assert device.gpu_peak_flops("NVIDIA L40S", True) == 181e12 and device.gpu_peak_flops("NVIDIA L4", True) == 121e12
    assert device.gpu_peak_flops("Some New GPU", True) is None  # measured by a matmul instead
