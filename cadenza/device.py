"""The one place that looks at the machine: the device, its bf16 units, the precision of each part of a run, and
peak FLOPS for MFU. Everything else asks here, so tests can force every branch (see tests/test_device.py).

Precision follows Ludwig's `trainer.use_mixed_precision`: true means bf16 everywhere it applies, false means fp32
everywhere, unset (auto) means bf16 only for the parts that run faster in it on this hardware. A bf16 matmul is
native on CUDA GPUs with bf16 (compute capability 8.0+) and on CPUs with AMX or AVX512-BF16; elsewhere (an
AVX2-only CPU, say) it is emulated and hundreds of times slower than fp32.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

# The parts of a run whose precision is chosen separately. In auto mode a part runs bf16 when the hardware has bf16
# units and the part is listed as gaining from it: "head" (a small MLP on cached embeddings) gains nothing; a
# frozen encoder's embedding pass, a frozen base's dtype and training a transformer do.
PARTS = {
    "train": "training",
    "embed": "the frozen encoder's embedding pass",
    "weights": "frozen pretrained weights (loaded in bf16)",
    "head": "training a head on cached embeddings",
}
AUTO_BF16_PARTS = {"train", "embed", "weights"}


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str  # GPU name or CPU model
    bf16_units: Optional[str]  # e.g. "AMX", "AVX512-BF16", "CUDA sm_90"; None when bf16 would be emulated


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self, device_type: str):
        """bf16 autocast for this part, or a disabled one (fp32)."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16)

    def describe(self, part: str) -> str:
        """One line for the start of a run."""
        # training in bf16 is autocast over fp32 master weights; in fp32 there is nothing more to say
        how = "bf16 autocast (fp32 master weights)" if self.bf16 and part == "train" else self.name
        switch = "false for fp32" if self.bf16 else "true to force bf16"
        return f"precision: {how} for {PARTS[part]} — {self.reason}; set trainer.use_mixed_precision: {switch}"


def cpu_bf16_units(cpuinfo: str) -> Optional[str]:
    """The CPU's bf16 matrix instructions named in /proc/cpuinfo's flags, or None."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def _cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[-1].strip()
    return "CPU"


def cuda_bf16_units(capability: tuple[int, int]) -> Optional[str]:
    """bf16 tensor cores arrived with Ampere (compute capability 8.0)."""
    return f"CUDA sm_{capability[0]}{capability[1]}" if capability >= (8, 0) else None


@functools.cache
def hardware() -> Hardware:
    """This machine, looked at once per process."""
    if torch.cuda.is_available():
        return Hardware("cuda", torch.cuda.get_device_name(), cuda_bf16_units(torch.cuda.get_device_capability()))
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no claim of bf16 units
        cpuinfo = ""
    return Hardware("cpu", _cpu_model(cpuinfo), cpu_bf16_units(cpuinfo))


def precision(requested: Optional[bool], part: str, hw: Optional[Hardware] = None) -> Precision:
    """The precision of one part of a run: `requested` is trainer.use_mixed_precision (None: auto)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; one of {sorted(PARTS)}")
    hw = hw or hardware()
    if requested is True:
        slow = "" if hw.bf16_units else f" (no bf16 units on this {hw.device}: emulated, slow)"
        return Precision(True, "trainer.use_mixed_precision: true" + slow)
    if requested is False:
        return Precision(False, "trainer.use_mixed_precision: false")
    if not hw.bf16_units:
        return Precision(False, f"auto: this {hw.device} has no bf16 units ({hw.name})")
    if part not in AUTO_BF16_PARTS:
        return Precision(False, f"auto: {PARTS[part]} is too small to gain from bf16")
    return Precision(True, f"auto: {hw.device} has {hw.bf16_units}")


def is_cuda() -> bool:
    return hardware().device == "cuda"


def torch_device() -> torch.device:
    return torch.device(hardware().device)


_MEASURED_PEAK: dict[bool, float] = {}
# (name, dense bf16/fp16 tensor-core TFLOPS, plain fp32 TFLOPS) of common GPUs; longer names first ("A100" before
# "A10"). fp32 is the non-tensor-core figure: torch leaves TF32 matmuls off unless asked, and Cadenza does not ask.
GPU_PEAK_TFLOPS = (("H200", 989, 67), ("H100", 989, 67), ("A100", 312, 19.5), ("L40", 181, 90.5), ("L4", 121, 30.3),
                   ("A10", 125, 31.2), ("T4", 65, 8.1))


def gpu_peak_flops(name: str, bf16: bool) -> Optional[float]:
    """The table's peak for a GPU named `name` (as torch reports it), or None for one it does not know."""
    for key, half, single in GPU_PEAK_TFLOPS:
        if key in name:
            return (half if bf16 else single) * 1e12
    return None


def peak_flops(bf16: bool, reached: float = 0.0) -> float:
    """Peak FLOP/s for MFU: CADENZA_PEAK_TFLOPS if set, a table for known GPUs, else a quick matmul measurement on the
    device the work runs on (once a process; the best reading this machine has given wins, see best_peak_seen).
    `reached`: a rate the run has just achieved. A measured peak below it was read in a slow moment of a shared
    machine (with an empty cache folder there is no better reading to fall back on; "114% of the peak" was printed
    that way), so it is measured again, and the higher reading counts."""
    if os.environ.get("CADENZA_PEAK_TFLOPS"):
        return float(os.environ["CADENZA_PEAK_TFLOPS"]) * 1e12
    hw = hardware()
    if hw.device == "cuda" and gpu_peak_flops(hw.name, bf16):
        return gpu_peak_flops(hw.name, bf16)
    if _MEASURED_PEAK.get(bf16, 0.0) <= reached:  # not measured yet, or below what the run reached (~30 ms a time)
        measured = _measure_matmul_peak(torch.bfloat16 if bf16 else torch.float32, torch_device())
        _MEASURED_PEAK[bf16] = best_peak_seen(bf16, max(measured, _MEASURED_PEAK.get(bf16, 0.0)))
    return _MEASURED_PEAK[bf16]


# A shared VM's cores run at a varying share of their speed from one second to the next: on this project's 2-core
# machine one process's fp32 product read 200 GFLOP/s and the next process's 102 (all four reps equally slow), so that
# run printed "MFU 124.8%". The highest reading each machine has given is kept in the cache folder; a slow moment
# can only lower what one process measures, not the peak it divides by.
PEAK_FILE = "peak_flops.json"


def best_peak_seen(bf16: bool, measured: float) -> float:
    """max(measured, the best this machine (machine_key) has read before in this precision); a higher reading is
    written back. A cache folder that cannot be read or written changes nothing but the figure's steadiness."""
    from .artifacts import write_json
    from .data.cache import cache_root

    file = cache_root() / PEAK_FILE
    key = f"{machine_key()}|{'bf16' if bf16 else 'fp32'}"
    seen = _read_peaks(file).get(key, 0.0)
    if measured <= seen:
        return seen
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, {**_read_peaks(file), key: measured})  # re-read: another process may have added entries
    except OSError:
        pass
    return measured


def _read_peaks(file: Path) -> dict:
    try:
        table = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in table.items() if isinstance(v, (int, float))} if isinstance(table, dict) else {}


# the square product timed for the peak grows until one takes this long: big enough that the thread team's start-up
# does not count, small enough to cost ~30 ms on a 2-core CPU (a fixed 2048 product cost 0.24 s a process there and read
# no higher: 426 vs 439 GFLOP/s in bf16 at 1024) while a many-core CPU still gets a product that fills it
PEAK_PRODUCT_SECONDS = 0.003
PEAK_PRODUCT_SIZES = (1024, 2048, 4096)


def _measure_matmul_peak(dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> float:
    # its own generator: a measurement in the middle of a run (`reached`) must not move the run's random numbers
    generator = torch.Generator(device).manual_seed(0)
    wait = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA runs the product asynchronously
    for n in PEAK_PRODUCT_SIZES:
        a = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
        a @ a  # warm-up: the kernel's first call picks and prepares its code
        wait()
        fastest = math.inf
        for _ in range(4):  # the fastest product, not the mean: one slow rep (a page fault, another process) once
            t0 = time.perf_counter()  # made the peak read 241 GFLOP/s where it is ~400, and MFU over 100%
            a @ a
            wait()
            fastest = min(fastest, time.perf_counter() - t0)
        if fastest >= PEAK_PRODUCT_SECONDS:
            break
    return 2 * n**3 / fastest


def peak_flops_known(bf16: bool) -> bool:
    """True when peak_flops(bf16) costs nothing: set, tabled, or measured already in this process."""
    hw = hardware()
    return bool(os.environ.get("CADENZA_PEAK_TFLOPS") or bf16 in _MEASURED_PEAK
                or (hw.device == "cuda" and gpu_peak_flops(hw.name, bf16)))


def available_memory(hw: Optional[Hardware] = None) -> Optional[int]:
    """Bytes a new run can use: free GPU memory on CUDA, else the kernel's MemAvailable (RAM not needed by
    others, page cache included); None when the machine does not say."""
    hw = hw or hardware()
    if hw.device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def machine_key(hw: Optional[Hardware] = None) -> str:
    """What a speed measurement on this machine depends on: the device, its bf16 units, threads, torch."""
    hw = hw or hardware()
    return f"{hw.device}|{hw.name}|{hw.bf16_units}|{torch.get_num_threads()}|{torch.__version__}"


# ---------------------------------------------------------------------------------------------- the machine's load
# torch runs each big op on a team of as many threads as cores; when other processes keep some of those cores busy,
# the team waits at every op for its slowest member (on 2 cores with one other busy process, LLM training steps ran
# 2-5x slower with 2 threads than with 1). cadenza/threads.py follows the load between steps with these readings.
FOLLOW_LOAD = "CADENZA_FOLLOW_LOAD"  # "0": keep torch's thread count whatever the load (the bench's A/B switch)


def pinned_threads() -> Optional[str]:
    """The variable that pins the thread count, if set: the user's OMP_NUM_THREADS/MKL_NUM_THREADS (torchrun sets
    OMP_NUM_THREADS=1 in each process), or CADENZA_FOLLOW_LOAD=0. A pinned count is never adapted."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name):
            return name
    return FOLLOW_LOAD if os.environ.get(FOLLOW_LOAD, "").strip() in ("0", "false", "no") else None


@dataclass(frozen=True)
class CpuSample:
    busy: float  # seconds the cores this process may use have been busy since boot, all processes together
    own: float  # this process's CPU seconds, all its threads
    wall: float  # time.monotonic() of the reading
    cores: int  # the cores this process may use (its affinity)


def cpu_sample() -> Optional[CpuSample]:
    """One reading of /proc/stat's per-core busy time (user, nice, system, irq, softirq, steal: a core the hypervisor
    gives to another machine is not ours either) and of this process's CPU time; None where there is no /proc/stat."""
    try:
        allowed = os.sched_getaffinity(0)
        text = Path("/proc/stat").read_text()
    except (OSError, AttributeError):
        return None
    busy = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in allowed:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in rest.split()[:8])
            busy += user + nice + system + irq + softirq + steal  # guest time is counted in user and nice already
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSample(busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime, time.monotonic(), len(allowed))


def others_busy_cores(before: CpuSample, after: CpuSample) -> float:
    """Cores that other processes kept busy between two readings: all busy time minus this process's, per second."""
    elapsed = after.wall - before.wall
    if elapsed <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(max(others / elapsed, 0.0), float(after.cores))


HYSTERESIS = 0.1  # cores beyond the rounding boundary a reading must go before the thread count changes


def threads_for_load(cores: int, others: float, current: int, most: int) -> int:
    """The intra-op thread count when other processes keep `others` of this process's `cores` busy: the cores left,
    rounded, at least 1 and at most `most` (torch's setting at the start of the run). `current` stays unless the cores
    left are more than half a core plus HYSTERESIS away from it, so readings near a boundary do not flap."""
    free = cores - others
    choice = min(max(math.floor(free + 0.5), 1), most)
    if choice != current and abs(free - current) < 0.5 + HYSTERESIS:
        return current
    return choice
