"""Test helpers shared by unit/ and e2e/: tiny random encoders, toy corpora, fake prepared data, subprocess runners."""
from __future__ import annotations

import os
from pathlib import Path

# The repository root (scripts/, conf/ and the bertnmt package live there).
ROOT = Path(__file__).resolve().parents[2]

# The read-only corpus mirror: $BERTNMT_MIRROR when set, else next to the repository (../shared/data).
MIRROR_DIR = Path(os.environ.get("BERTNMT_MIRROR") or ROOT.parent / "shared" / "data")
