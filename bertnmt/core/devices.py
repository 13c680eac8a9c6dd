"""Where a run computes, in which precision, and how much memory it took at most (``trainer.device``,
``trainer.precision``)."""
from __future__ import annotations

import resource
from contextlib import nullcontext

import torch

from bertnmt.core.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


def pick_device(name: str) -> torch.device:
    """``trainer.device``: auto = cuda when there is one, else cpu; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast | nullcontext:
    """``trainer.precision``: auto = bf16 autocast on CUDA, fp32 on the CPU (faster there, see
    docs/benchmarks.md); bf16 = autocast on any device; fp32 = none."""
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
