"""Train a model: ``python scripts/train.py +exp=frozen_bert`` (see conf/exp/ for the recipes).

A mistake in the command line, the config or the data is one ``error: ...`` line on stderr and exit
code 2; SIGTERM / SIGINT save a checkpoint and exit with 143 / 130; rerunning the same command resumes.
On several GPUs: ``torchrun --nproc_per_node=N scripts/train.py +exp=frozen_bert`` (docs/distributed.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bertnmt.cli import check_command_line, exit_code
from bertnmt.core.config import register_configs, to_config
from bertnmt.core.paths import CONF_DIR
from bertnmt.train import distributed

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from bertnmt.recipe.pipeline import run  # torch and the model load only after the command line was checked
    from bertnmt.train.rundir import join

    cfg = to_config(dcfg)
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    join(Path(cfg.output_dir))  # another process that resumes elsewhere will not remove this folder
    code = exit_code(lambda: run(cfg))
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    code = exit_code(lambda: check_command_line(CONF_DIR, sys.argv[1:]))
    if code:
        raise SystemExit(code)
    sys.argv = distributed.hydra_argv(sys.argv)  # torchrun: ranks > 0 make no run folder of their own
    main()
