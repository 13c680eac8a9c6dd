"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# The read-only corpus mirror: $BERTNMT_MIRROR when set, else next to the repository (../shared/data).
MIRROR_DIR = Path(os.environ.get("BERTNMT_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The local corpus mirror, exported as BERTNMT_MIRROR; skips the test when it is absent."""
    if not MIRROR_DIR.is_dir():
        pytest.skip(f"corpus mirror {MIRROR_DIR} is absent")
    monkeypatch.setenv("BERTNMT_MIRROR", str(MIRROR_DIR))
    return MIRROR_DIR
