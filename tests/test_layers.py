"""The package's layers import one way only: the import-linter contracts in pyproject.toml hold."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    from importlinter.cli import lint_imports  # noqa: PLC0415 (a test-only dependency)

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_contract_catches_an_upward_import(tmp_path, monkeypatch):
    """The contract fails on a lower layer that imports a higher one (so the check above can fail)."""
    import shutil

    from importlinter.cli import lint_imports

    pkg = tmp_path / "bertnmt"
    shutil.copytree(ROOT / "bertnmt", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "core" / "upward.py").write_text("from bertnmt.train import trainer  # noqa: F401\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in [m for m in __import__("sys").modules if m == "bertnmt" or m.startswith("bertnmt.")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 1


@pytest.mark.parametrize("layer", ["core", "model", "data", "decoding", "train", "recipe", "inference", "experiments"])
def test_every_layer_is_a_package(layer):
    assert (ROOT / "bertnmt" / layer / "__init__.py").is_file()
