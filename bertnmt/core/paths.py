"""Where the project's files are: the one module that knows the checkout's layout.

Library code finds the Hydra configs and the training script through these constants instead of
walking up from its own file, so moving a module never breaks them.
"""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: bertnmt/core/paths.py -> ../../
CONF_DIR = PROJECT_ROOT / "conf"  # the Hydra config tree (conf/config.yaml is the primary config)
SCRIPTS_DIR = PROJECT_ROOT / "scripts"
TRAIN_SCRIPT = SCRIPTS_DIR / "train.py"
