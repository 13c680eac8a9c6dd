"""The host allocator, set up for training on the CPU: large tensors reuse memory instead of faulting in
fresh pages at every step.

glibc serves each block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on
free, and PyTorch's CPU allocator keeps no cache, so every training step faults in and zeroes its
logits, their gradient and the attention buffers again, 4 KB at a time. On a 2-core machine that was
half the CPU time of a tiny model's update and a tenth of a ``model=small`` one (docs/benchmarks.md).
:func:`tune_host_memory` makes glibc keep such blocks on its heap and reuse them (``mallopt``), and turns
on PyTorch's own transparent-huge-page allocation for large CPU tensors (``THP_MEM_ALLOC_ENABLE``, one
fault per 2 MB). Neither changes a result; the process keeps its peak heap instead of returning it.
``BERTNMT_HOST_MEMORY=default`` leaves both alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
_SETTINGS = ((_M_MMAP_THRESHOLD, 1 << 30),  # blocks under 1 GiB come from the heap and are reused
             (_M_TRIM_THRESHOLD, 1 << 34),  # free heap memory is kept (up to 16 GiB), not returned
             (_M_TOP_PAD, 1 << 26))  # the heap grows 64 MiB at a time


def setting() -> str:
    """``BERTNMT_HOST_MEMORY``: "tuned" (the default) or "default" (glibc's and PyTorch's own behaviour)."""
    return os.environ.get("BERTNMT_HOST_MEMORY", "tuned")


def tune_host_memory() -> dict[str, bool]:
    """Set up the allocator as above; what took effect, by name.

    Call it before torch is imported: PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first CPU
    allocation (``mallopt`` works at any time). Only Linux with glibc has ``mallopt``; elsewhere it is skipped.
    """
    if setting() == "default":
        return {"thp": False, "mallopt": False}
    thp = "torch" not in sys.modules and os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1") == "1"
    mallopt = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            mallopt = all(libc.mallopt(k, v) == 1 for k, v in _SETTINGS)  # 1 = accepted
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = False
    return {"thp": thp, "mallopt": mallopt}


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process that imports torch before it could call :func:`tune_host_memory`."""
    if setting() == "default":
        return dict(env)
    return {"THP_MEM_ALLOC_ENABLE": "1", **env}
