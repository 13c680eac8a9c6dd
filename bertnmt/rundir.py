"""The run folder: auto-resume, the lock that keeps two processes out of one folder, stage markers.

"Rerun the same command" must continue an interrupted run, but Hydra names a fresh folder per
invocation (``runs/<name>/<date>``). With ``trainer.resume=auto`` (the default), :func:`open_run_dir`
looks for the newest *unfinished* run of the same experiment — the folder itself or a sibling
holding a ``config.yaml`` equal to this one (``output_dir`` and ``trainer.resume`` aside) and no
``summary.json`` — and continues in that folder; the fresh folder Hydra just made is removed and
its log file moves along. ``trainer.resume=never`` always starts afresh; a checkpoint path resumes
that checkpoint's stage from it, in the new folder.

A finished stage leaves ``stage_<stage>.json`` (its summary) and is never trained again in that folder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bertnmt.config import Config
from bertnmt.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG, SUMMARY, LOCK = "config.yaml", "summary.json", ".lock"
_IGNORED_KEYS = ("output_dir", "trainer.resume")  # what may differ between a run and its rerun


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A resolved config as a dict, without the keys a rerun may change."""
    out = json.loads(json.dumps(cfg))  # a deep copy of plain values
    for key in _IGNORED_KEYS:
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return out


def config_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Config, run_dir: Path) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / CONFIG)


def stage_marker(run_dir: Path, stage: str) -> Path:
    return run_dir / f"stage_{stage}.json"


# -- the lock ---------------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The process's start time (Linux /proc), so that a reused pid is not taken for a live run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The live process (on this host) that holds ``run_dir``, or None."""
    try:
        lock = json.loads((run_dir / LOCK).read_text(encoding="utf-8"))
        pid = int(lock["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if lock.get("host") != socket.gethostname() or pid == os.getpid():
        return None  # another machine's lock: its run was pre-empted (a shared file system)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    if lock.get("start") is not None and _start_time(pid) != lock["start"]:
        return None  # the pid was reused
    return lock


def _check_free(run_dir: Path) -> None:
    other = holder(run_dir)
    if other is not None:
        raise ConfigError(f"output folder {run_dir} is in use by process {other['pid']}; wait for it or choose another "
                          "hydra.run.dir")


def acquire(run_dir: Path) -> None:
    """Take the folder (a ConfigError when it cannot be written or a live process holds it)."""
    _check_free(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / LOCK).write_text(json.dumps(_me()), encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"output folder {run_dir} cannot be written ({e.strerror or e})") from None


def release(run_dir: Path) -> None:
    try:
        if json.loads((run_dir / LOCK).read_text(encoding="utf-8")).get("pid") == os.getpid():
            (run_dir / LOCK).unlink()
    except (OSError, ValueError):
        pass


# -- finding the run to continue --------------------------------------------------------------------
def _same_unfinished(folder: Path, ours: dict[str, Any]) -> bool:
    if not (folder / CONFIG).is_file() or (folder / SUMMARY).exists() or holder(folder) is not None:
        return False
    try:
        theirs = comparable(OmegaConf.to_container(OmegaConf.load(folder / CONFIG), resolve=True))  # type: ignore[arg-type]
    except Exception:  # an unreadable config.yaml is not a run of ours
        return False
    return theirs == ours


def find_unfinished(run_dir: Path, cfg: Config) -> Path | None:
    """``run_dir`` or its newest sibling that holds an unfinished run of the same config."""
    ours = comparable(config_dict(cfg))
    if _same_unfinished(run_dir, ours):
        return run_dir
    parent = run_dir.parent
    if not parent.is_dir():
        return None
    siblings = [p for p in parent.iterdir() if p.is_dir() and p != run_dir and (p / CONFIG).is_file()]
    for folder in sorted(siblings, key=lambda p: (p / CONFIG).stat().st_mtime, reverse=True):
        if _same_unfinished(folder, ours):
            return folder
    return None


def _move_logs(src: Path, dst: Path) -> None:
    """Point the root logger's file handlers in ``src`` (Hydra's ``<job>.log``) to the same file in ``dst``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if not isinstance(h, logging.FileHandler) or Path(h.baseFilename).parent != src.resolve():
            continue
        old = Path(h.baseFilename)
        root.removeHandler(h)
        h.close()
        new_path = dst / old.name
        with open(new_path, "a", encoding="utf-8") as out:
            out.write(old.read_text(encoding="utf-8", errors="replace") if old.is_file() else "")
        new = logging.FileHandler(new_path, mode="a", encoding=h.encoding or "utf-8")
        new.setFormatter(h.formatter)
        new.setLevel(h.level)
        root.addHandler(new)


def _remove_if_fresh(folder: Path) -> None:
    """Remove a folder that holds nothing but what Hydra puts in a new run folder."""
    if folder.is_dir() and all(p.name in (".hydra", LOCK) or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def open_run_dir(cfg: Config) -> Path:
    """The folder this run writes to (``cfg.output_dir`` is updated), per ``trainer.resume``; takes its lock."""
    new = Path(cfg.output_dir)
    mode = cfg.trainer.resume
    _check_free(new)
    found = find_unfinished(new, cfg) if mode == "auto" else None
    if found is not None and found != new:
        acquire(found)
        log.info("resuming the unfinished run in %s (same config, no %s); trainer.resume=never starts afresh",
                 found, SUMMARY)
        _move_logs(new, found)
        _remove_if_fresh(new)
        cfg.output_dir = str(found)
        return found
    if found is None and (new / CONFIG).is_file():
        what = ("a finished run" if (new / SUMMARY).exists() else
                "an unfinished run of another config" if mode == "auto" else f"a run (trainer.resume={mode})")
        raise ConfigError(f"output folder {new} already holds {what}; choose another hydra.run.dir")
    acquire(new)
    if found is not None:
        log.info("resuming the unfinished run in %s", new)
    return new
