"""The host allocator setup (bertnmt.core.host_memory): a training step's large CPU tensors reuse memory
instead of faulting in fresh pages, and ``BERTNMT_HOST_MEMORY=default`` leaves the allocator alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bertnmt.core.paths import PROJECT_ROOT

# Allocates and fills a 64 MB tensor 8 times, as a step does with its logits, and counts the page faults.
_PROBE = """
import json, resource, sys
from bertnmt.core.host_memory import tune_host_memory
took = tune_host_memory()
import torch
torch.empty(16 * 2**20).fill_(1.0)  # the first one faults in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 * 2**20).fill_(1.0)
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env.update(BERTNMT_HOST_MEMORY=setting, PYTHONPATH=str(PROJECT_ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_tuned_allocator_reuses_large_blocks_instead_of_faulting_them_in() -> None:
    default, tuned = probe("default"), probe("tuned")
    assert default["took"] == {"thp": False, "mallopt": False}
    assert tuned["took"] == {"thp": True, "mallopt": True}
    # default glibc maps and unmaps each 64 MB block: 8 x 16,384 faults of 4 KB pages
    assert default["faults"] > 8 * 16_000
    assert tuned["faults"] < default["faults"] / 20, (tuned, default)


def test_every_entry_point_sets_it_up_before_torch() -> None:
    """The scripts import bertnmt.cli before torch; importing it sets the allocator up."""
    code = ("import sys; import bertnmt.cli, os; "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "BERTNMT_HOST_MEMORY")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]
