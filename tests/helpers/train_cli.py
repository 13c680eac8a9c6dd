"""Test helper: run scripts/train.py in a subprocess with this checkout's bertnmt (not an installed one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "scripts/train.py", *args]


def run_train(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(args), cwd=ROOT, env=train_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def popen_train(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start a training run in the background; stdout and stderr go to ``log``."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(train_cmd(args), cwd=ROOT, env=train_env(**env), stdout=out, stderr=subprocess.STDOUT)
