"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from bertnmt.core.host_memory import tune_host_memory

tune_host_memory()  # before torch is imported, as the scripts do: large tensors reuse memory

from tests.helpers import MIRROR_DIR  # noqa: E402
from tests.helpers.tiny_encoder import make_tiny_bert  # noqa: E402

E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e ``e2e``, so ``-m "not e2e"`` selects the unit tests wherever they are run."""
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The local corpus mirror, exported as BERTNMT_MIRROR; skips the test when it is absent."""
    if not MIRROR_DIR.is_dir():
        pytest.skip(f"corpus mirror {MIRROR_DIR} is absent")
    monkeypatch.setenv("BERTNMT_MIRROR", str(MIRROR_DIR))
    return MIRROR_DIR


@pytest.fixture(scope="session")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The one plain tiny random BERT folder (2 layers, hidden 32, MiniLM's WordPiece tokenizer, seed 0), built once
    a session; tests only read it (a test that writes into an encoder folder builds its own)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert", numbered=False))
