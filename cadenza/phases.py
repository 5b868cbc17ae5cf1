"""Where a run's wall time goes: imports, data, estimate, model load, tokenize, embed, epochs, evaluation, writing.

A run opens one record with `recording()`; code marks its work with `with phase("embed"):`. A phase inside another
counts once: the outer phase's seconds leave out the inner one's, so the phases add up to the run's wall time, with
`other` for the unmarked rest. `note(phase, flops=...)` attaches figures to a phase (numbers add up across calls);
the summary turns `flops` into FLOP/s and, given `peak_flops`, into a share of that peak.

The CLI opens the record first, counted from the process's start, so the interpreter's start and every import count
too; `api.Model.train` opens one when called from Python, or joins the CLI's. Outside a recording `phase` and `note`
do nothing. The record lives in a context variable for the duration of the run only: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

# the order of the table; other phases follow in the order they first ran
ORDER = ("imports", "data", "estimate", "model load", "tokenize", "embed", "preprocessing", "measure peak",
         "head epochs", "epochs", "evaluation", "generate", "merge", "writing", "plots")

_CURRENT: contextvars.ContextVar[Optional["Phases"]] = contextvars.ContextVar("cadenza_phases", default=None)


@dataclass
class Phases:
    started: float  # time.perf_counter() at the start of the run
    seconds: dict[str, float] = field(default_factory=dict)  # exclusive seconds per phase
    figures: dict[str, dict] = field(default_factory=dict)
    _open: list[float] = field(default_factory=list)  # per open phase: seconds of the phases inside it

    def summary(self) -> dict:
        """{"total_seconds", "phases": {name: {"seconds", "share", figures...}}}, `other` last."""
        total = max(time.perf_counter() - self.started, 1e-9)
        names = [n for n in ORDER if n in self.seconds] + [n for n in self.seconds if n not in ORDER]
        phases = {name: self._entry(name, self.seconds[name], total) for name in names}
        phases["other"] = self._entry("other", max(0.0, total - sum(self.seconds.values())), total)
        return {"total_seconds": total, "phases": phases}

    def _entry(self, name: str, seconds: float, total: float) -> dict:
        entry = {"seconds": seconds, "share": seconds / total, **self.figures.get(name, {})}
        if entry.get("flops") and seconds > 0:
            entry["flops_per_second"] = entry["flops"] / seconds
            if entry.get("peak_flops"):
                entry["share_of_peak"] = entry["flops_per_second"] / entry["peak_flops"]
        return entry

    def table(self) -> str:
        s = self.summary()
        lines = [f"time by phase (wall {s['total_seconds']:.2f} s):"]
        for name, e in s["phases"].items():
            lines.append(f"  {name:<14}{e['seconds']:7.2f} s {100 * e['share']:5.1f}%{_details(e)}")
        return "\n".join(lines)


def _details(e: dict) -> str:
    parts = []
    if "flops_per_second" in e:
        rate = f"{_flop(e['flops'])} at {_flop(e['flops_per_second'])}/s"
        if "share_of_peak" in e:
            rate += f" = {100 * e['share_of_peak']:.0f}% of the {e.get('precision', '')} peak {_flop(e['peak_flops'])}/s"
        parts.append(rate)
    if e.get("tokens"):
        parts.append(f"{e['tokens']:,.0f} tokens")
    if e.get("rows") and e["seconds"] > 0:
        parts.append(f"{e['rows'] / e['seconds']:,.0f} rows/s")
    if e.get("threads"):
        parts.append(f"{e['threads']} thread{'s' if e['threads'] > 1 else ''}")
    return ("  " + ", ".join(parts)) if parts else ""


def _flop(x: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.3g} FLOP"


def process_age() -> float:
    """Seconds since this process started (Linux: /proc/self/stat), so interpreter start-up counts; 0 elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


@contextlib.contextmanager
def recording(from_process_start: bool = False) -> Iterator[Phases]:
    """The run's record: inside another recording, that one; else a new one (from the process's start: what ran
    before this call counts as imports), current until the block ends."""
    outer = _CURRENT.get()
    if outer is not None:
        yield outer
        return
    before = process_age() if from_process_start else 0.0
    record = Phases(time.perf_counter() - before)
    if before:
        record.seconds["imports"] = before  # the interpreter's start and the imports before this call
    token = _CURRENT.set(record)
    try:
        yield record
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    record = _CURRENT.get()
    if record is None:
        yield
        return
    t0 = time.perf_counter()
    record._open.append(0.0)
    try:
        yield
    finally:
        inner = record._open.pop()
        elapsed = time.perf_counter() - t0
        record.seconds[name] = record.seconds.get(name, 0.0) + elapsed - inner
        if record._open:
            record._open[-1] += elapsed


def note(name: str, **figures) -> None:
    """Figures of a phase: numbers add up over calls, anything else is replaced."""
    record = _CURRENT.get()
    if record is None:
        return
    entry = record.figures.setdefault(name, {})
    for key, value in figures.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        entry[key] = entry.get(key, 0) + value if number and key not in _NOT_ADDED else value


_NOT_ADDED = {"peak_flops", "threads"}  # figures that describe the phase rather than count its work


def current() -> Optional[Phases]:
    return _CURRENT.get()
