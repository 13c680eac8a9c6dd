"""Shared pytest fixtures."""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bertnmt.model.fusion import seed_drop_net

# The read-only corpus mirror: $BERTNMT_MIRROR when set, else next to the repository (../shared/data).
MIRROR_DIR = Path(os.environ.get("BERTNMT_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The local corpus mirror, exported as BERTNMT_MIRROR; skips the test when it is absent."""
    if not MIRROR_DIR.is_dir():
        pytest.skip(f"corpus mirror {MIRROR_DIR} is absent")
    monkeypatch.setenv("BERTNMT_MIRROR", str(MIRROR_DIR))
    return MIRROR_DIR


@pytest.fixture(autouse=True)
def _fresh_drop_net_draws() -> Iterator[None]:
    """Drop-net draws from Python's RNG, or from the generator a Trainer seeds: every test (and a module
    fixture built between two tests) starts from the same state, whatever ran before it."""
    seed_drop_net(None)
    random.seed(0)
    yield
    seed_drop_net(None)
    random.seed(0)
