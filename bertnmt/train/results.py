"""``results.jsonl``: one JSON record per line (per epoch and stage, per test decode), append-only,
except that a resumed stage drops the records it wrote after its checkpoint."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bertnmt.core.atomic import write_error, write_text

log = logging.getLogger(__name__)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    from bertnmt.train import distributed

    if not distributed.is_main():  # rank 0 writes the run's files
        return
    try:
        with open(path, "a", encoding="utf-8") as f:  # one line appended: a kill cuts at most that line
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as e:
        raise write_error(path, e) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line cut short by a kill is left out (with a warning)."""
    return _parse(path, path.read_text(encoding="utf-8").splitlines()) if path.is_file() else []


def _parse(path: Path, lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: dropping a damaged line (%s...)", path, line[:40])
    return out


def keep_until(path: Path, stage: str, completed: int) -> list[dict[str, Any]]:
    """Drop ``stage``'s records after epoch ``completed`` (and its test decodes); return its epoch records kept.

    A stage resumed from a checkpoint of epoch ``completed`` (or from inside epoch ``completed + 1``)
    writes those records again, so they must not appear twice. Rewritten atomically.
    """
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = _parse(path, lines)
    kept = [r for r in records if r.get("stage") != stage or ("epoch" in r and r["epoch"] <= completed)]
    if len(kept) != len(lines):
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return [r for r in kept if r.get("stage") == stage]
