"""Hydra multirun sweeps and the SLURM launcher config (hydra-submitit-launcher)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from bertnmt.core.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def test_slurm_launcher_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (pip install 'bertnmt[slurm]')")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "+exp=frozen_bert"])
    launcher = cfg.hydra.launcher
    cls = get_class(launcher._target_)
    assert cls.__name__ == "SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min == 1440 and launcher.max_num_timeout == 3
    assert "setup" in launcher and "signal_delay_s" in launcher  # the plugin's own SlurmQueueConf keys too
    params = OmegaConf.to_container(launcher, resolve=False)
    del params["_target_"]
    assert cls(**params).params["partition"] == "gpu"  # the launcher accepts every key (it submits nothing here)
    assert cfg.name == "frozen_bert"


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_run(tmp_path: Path, mirror: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BERTNMT_MIRROR": str(mirror), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/train.py", "-m", "+exp=transformer", "model=tiny", "trainer.seed=1,2",
           f"hydra.sweep.dir={sweep}", f"data.cache_dir={tmp_path / 'cache'}", "data=tatoeba_en_ko",
           "data.train_limit=60", "data.valid_limit=5", "data.test_limit=5", "data.vocab_size=300",
           "trainer.max_epochs=1", "trainer.progress=false", "trainer.tensorboard=false", "eval.beam=1"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_transformer", "1_transformer"]
    losses = []
    for seed, job in zip((1, 2), jobs):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["run_dir"] == str(job) and (job / "export" / "model.safetensors").is_file()
        assert f"seed: {seed}" in (job / "config.yaml").read_text()
        losses.append(json.loads((job / "results.jsonl").read_text().splitlines()[0])["train_loss"])
    assert losses[0] != losses[1]  # two seeds, two trainings
    assert (sweep / "multirun.yaml").is_file()
