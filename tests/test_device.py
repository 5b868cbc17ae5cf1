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
        monkeypatch.setattr(device, "_measure_matmul_peak", lambda dtype: next(readings))
        return device.peak_flops(bf16)
    assert new_process() == 2e11
    assert new_process() == 2e11  # a slow moment (1e11): the best reading stands
    assert new_process() == 3e11  # a faster one replaces it ...
    stored = json.loads((cache_dir / device.PEAK_FILE).read_text())
    assert list(stored.values()) == [3e11] and list(stored)[0].endswith("|fp32")
    assert new_process(bf16=True) == 5e10  # ... per precision
    (cache_dir / device.PEAK_FILE).write_text("{not json")
    assert new_process() == 4e10 and json.loads((cache_dir / device.PEAK_FILE).read_text())


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
