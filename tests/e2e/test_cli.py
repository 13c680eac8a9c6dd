"""scripts/train.py: a user's mistake is one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def train(args: list[str], tmp_path: Path, mirror: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BERTNMT_MIRROR": str(mirror), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "scripts/train.py", f"hydra.run.dir={tmp_path / 'run'}",
           f"data.cache_dir={tmp_path / 'cache'}", "data.train_limit=20", "data.valid_limit=5", "data.test_limit=5",
           *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_encoder_folder(tmp_path: Path, mirror: Path) -> None:
    out = train(["+exp=frozen_bert", "bert.path=/no/such/encoder"], tmp_path, mirror)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "error: bert.path='/no/such/encoder'" in out.stderr


def test_encoder_not_available_offline(tmp_path: Path, mirror: Path) -> None:
    out = train(["+exp=frozen_bert", "bert=kobert"], tmp_path, mirror)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "skt/kobert-base-v1" in out.stderr and "bert.path=" in out.stderr


def test_unknown_key(tmp_path: Path, mirror: Path) -> None:
    out = train(["model.d_modle=3"], tmp_path, mirror)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr == "error: model.d_modle=3: model has no key 'd_modle'; did you mean model.d_model?\n"
    assert "+model" not in out.stderr  # no advice to add the misspelt key with +


@pytest.mark.parametrize("policy", ["thaw"])
def test_bad_policy_fails_before_data(tmp_path: Path, mirror: Path, policy: str) -> None:
    out = train([f"freeze.policy={policy}"], tmp_path, mirror)
    assert out.returncode == 2 and "error: freeze.policy='thaw'" in out.stderr
    assert not (tmp_path / "cache").exists()
