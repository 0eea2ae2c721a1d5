"""Peak-memory readings shared by the benchmarks: CUDA's allocator counters, or the process's RSS on CPU.

On CPU the peak is VmHWM from /proc/self/status, which ``reset_peak`` lowers to the current RSS (writing 5 to
/proc/self/clear_refs). For RSS to follow the tensors, a benchmark process should start with
``MALLOC_MMAP_THRESHOLD_=65536`` in its environment (``CPU_ENV``): every block above 64 KiB is then its own mapping,
returned to the system when freed, rather than a heap chunk glibc may keep (which would hide a second peak).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def cpu_env() -> dict[str, str]:
    """The environment for a CPU benchmark child process (see the module docstring)."""
    return {**os.environ, **CPU_ENV}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: torch.device) -> float:
    """Start a new peak window; returns the memory held now (MiB), the baseline of ``peak_since``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return _status_mib("VmRSS")
    except OSError:  # no procfs: the lifetime peak (an over-estimate of the window's)
        return 0.0


def peak(device: torch.device) -> float:
    """Peak memory (MiB) since the last ``reset_peak``: allocated tensors on CUDA, RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _status_mib("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (before reading a clock); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
