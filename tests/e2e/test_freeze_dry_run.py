"""scripts/train.py with freeze.dry_run=true: the freeze table of every epoch, printed before any data is prepared."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_table_without_data(bert_path: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "scripts/train.py", "+exp=unfreeze_bert", "freeze.dry_run=true", "model=tiny",
           f"bert.path={bert_path}", "trainer.max_epochs=3", f"data.cache_dir={tmp_path / 'cache'}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    bert = [r[2] for r in rows]
    assert bert[0].split("/")[0] == "0" and bert[1].split("/")[0] == bert[1].split("/")[1]
    assert "group:bert frozen" in out.stdout and "group:bert lr x0.1" in out.stdout
    assert not (tmp_path / "cache").exists()
