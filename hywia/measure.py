"""What a run costs: parameter counts, peak memory, and each stage's seconds and peaks.

Kept below every other module (it imports none of them), so the API, evaluation, recovery and the benchmarks all
measure the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field_name: str) -> float | None:
    """A memory line of /proc/self/status in MB (VmRSS, VmHWM), or None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def release_freed_memory() -> None:
    """Hand memory that has been freed back to the OS (glibc keeps it otherwise: the process's memory creeps up
    from fragmentation, and a later stage's peak would start from what an earlier one left); elsewhere a no-op."""
    trim = getattr(LIBC, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


LIBC = _load_libc()  # the C library where it loads: malloc_trim here, madvise in hywia.io.mapped


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS mark (VmHWM) from the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class StageLog:
    """Wall and CPU seconds and peak memory of each named stage of a run, in the order they ran.

    On Linux each stage's peak RSS is its own (the peak mark is reset on entry); elsewhere it is the process peak so
    far and `rss_scope` says so. On a GPU the CUDA peak (allocated memory) is recorded too. Resetting the mark
    also resets what `peak_rss_mb()` reports afterwards: take the process peak before a logged run if it matters.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        release_freed_memory()  # what earlier stages freed is not counted in this one's peak, nor kept resident
        scoped = reset_peak_rss()
        if _cuda_in_use():  # never initialised here: a CPU run on a GPU machine keeps the GPU untouched
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            # CPU seconds of the whole process (every thread): the steadier cost on a shared machine
            entry = {"seconds": round(time.perf_counter() - started, 3),
                     "cpu_seconds": round(time.process_time() - cpu_started, 3)}
            peak = status_mb("VmHWM") if scoped else None
            entry["peak_rss_mb"] = peak if peak is not None else round(peak_rss_mb(), 1)
            entry["rss_scope"] = "stage" if peak is not None else "process"
            if _cuda_in_use():  # a stage that first touched the GPU (loading) reports its peak since the start
                torch.cuda.synchronize()
                entry["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            previous = self.stages.get(name)
            if previous is not None:  # a stage run twice (one per variant): the sum of seconds, the larger peaks
                entry = {key: (previous[key] + value if key in ("seconds", "cpu_seconds") else
                               max(previous[key], value) if isinstance(value, float) else value)
                         for key, value in entry.items()}
            self.stages[name] = entry

    def peak_rss_mb(self) -> float:
        """The largest stage peak (0 before any stage)."""
        return round(max([0.0] + [entry["peak_rss_mb"] for entry in self.stages.values()]), 1)

    def seconds(self) -> float:
        return round(sum(entry["seconds"] for entry in self.stages.values()), 2)

    def to_dict(self) -> dict:
        return {name: dict(entry) for name, entry in self.stages.items()}


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()
