"""The code is lint-clean: ``ruff check bertnmt scripts tests`` with the rules of pyproject.toml passes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("bertnmt", "scripts", "tests")


def ruff_bin() -> str:
    pytest.importorskip("ruff", reason="ruff is installed by the test extra: pip install -e .[test]")
    from ruff.__main__ import find_ruff_bin

    return str(find_ruff_bin())


def ruff_check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [ruff_bin(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean() -> None:
    out = ruff_check(*PATHS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_check_catches_what_the_rules_forbid(tmp_path: Path) -> None:
    """The same configuration fails on unsorted imports, an unused import, a long line and a bare ``Optional``."""
    bad = tmp_path / "bad.py"
    bad.write_text("from __future__ import annotations\n\nimport sys\nimport os\nfrom typing import Optional\n\n"
                   f"x: Optional[int] = None  # {'a' * 120}\nprint(os.sep)\n", encoding="utf-8")
    out = ruff_check("--output-format", "concise", str(bad), cwd=tmp_path)
    assert out.returncode == 1
    for code in ("I001", "F401", "E501", "UP045"):
        assert code in out.stdout, (code, out.stdout)
