"""Train a model: ``python scripts/train.py +exp=frozen_bert`` (see conf/exp/ for the recipes).

On several GPUs: ``torchrun --nproc_per_node=N scripts/train.py +exp=frozen_bert`` (README, "Multi-GPU training")."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bertnmt import distributed
from bertnmt.config import register_configs, to_config
from bertnmt.errors import BertNMTError
from bertnmt.pipeline import run

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg)
    except BertNMTError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.argv = distributed.hydra_argv(sys.argv)  # torchrun: ranks > 0 make no run folder of their own
    main()
