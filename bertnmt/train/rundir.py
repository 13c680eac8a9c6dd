"""The run folder: auto-resume, the lock that keeps two processes out of one folder, stage markers.

"Rerun the same command" must continue an interrupted run, but Hydra names a fresh folder per
invocation (``runs/<name>/<date>``). With ``trainer.resume=auto`` (the default), :func:`open_run_dir`
looks for the newest *unfinished* run of the same experiment — the folder itself or a sibling
holding a ``config.yaml`` equal to this one (``output_dir`` and ``trainer.resume`` aside) and no
``summary.json`` — and continues in that folder; the fresh folder Hydra just made is removed (unless
another process started in it too) and its log file moves along. ``trainer.resume=never`` always starts afresh; a checkpoint path resumes
that checkpoint's stage from it, in the new folder.

A finished stage leaves ``stage_<stage>.json`` (its summary) and is never trained again in that folder.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bertnmt.core.atomic import write_text
from bertnmt.core.config import Config
from bertnmt.core.errors import ConfigError

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
    write_text(run_dir / CONFIG, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def stage_marker(run_dir: Path, stage: str) -> Path:
    return run_dir / f"stage_{stage}.json"


# -- the lock ---------------------------------------------------------------------------------------
# An flock on ``<run>/.lock``, held as long as the process lives (the kernel drops it when the process dies,
# also on kill -9), so that taking it is atomic and a killed run never leaves a stale lock. The file also
# names its holder, for the error message.
_held: dict[Path, int] = {}  # folder -> the descriptor whose flock this process holds
_users: dict[Path, int] = {}  # folder -> a descriptor of the folder itself, with a shared flock (see join)


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _key(run_dir: Path) -> Path:
    return Path(os.path.abspath(run_dir))


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The other live process that holds ``run_dir``'s lock (``{"pid": ..., "host": ...}``), or None."""
    if _key(run_dir) in _held:
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            except ValueError:
                info = {}
            return {"pid": info.get("pid", "?"), "host": info.get("host", "?")}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _busy(run_dir: Path, pid: Any) -> ConfigError:
    return ConfigError(f"output folder {run_dir} is in use by process {pid}; wait for it or choose another hydra.run.dir")


def _check_free(run_dir: Path) -> None:
    other = holder(run_dir)
    if other is not None:
        raise _busy(run_dir, other["pid"])


def try_acquire(run_dir: Path) -> bool:
    """Take ``run_dir``'s lock (creating the folder); False when another live process holds it.

    Atomic: of several processes trying at once, exactly one gets it. A ConfigError when the folder
    cannot be written.
    """
    key = _key(run_dir)
    if key in _held:
        return True
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the holder we waited for may have removed the file on release: lock the file that is there
                same = os.stat(run_dir / LOCK).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode("utf-8"), 0)
    except OSError as e:
        raise ConfigError(f"output folder {run_dir} cannot be written ({e.strerror or e})") from None
    _held[key] = fd
    return True


def acquire(run_dir: Path) -> None:
    """Take the folder (a ConfigError when it cannot be written or a live process holds it)."""
    if not try_acquire(run_dir):
        other = holder(run_dir)
        raise _busy(run_dir, other["pid"] if other else "?")


def join(folder: Path) -> None:
    """Mark ``folder`` (Hydra's fresh run folder) as used by this process, for the process's life: a shared flock
    on the folder itself. A process that resumes elsewhere removes its fresh folder only when no other process
    uses it (two processes started in the same second share one)."""
    key = _key(folder)
    if key in _users:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # being removed right now; the run gets its lock on a recreated folder
        os.close(fd)
        return
    _users[key] = fd


def _leave(folder: Path) -> None:
    fd = _users.pop(_key(folder), None)
    if fd is not None:
        os.close(fd)


def release(run_dir: Path) -> None:
    """Give the folder up (its lock file is removed while still locked, then unlocked)."""
    fd = _held.pop(_key(run_dir), None)
    if fd is None:
        return
    try:
        (run_dir / LOCK).unlink(missing_ok=True)
    except OSError:
        pass
    os.close(fd)


# -- finding the run to continue --------------------------------------------------------------------
def _same_unfinished(folder: Path, ours: dict[str, Any]) -> bool:
    if not (folder / CONFIG).is_file() or (folder / SUMMARY).exists() or holder(folder) is not None:
        return False
    try:
        theirs = comparable(OmegaConf.to_container(OmegaConf.load(folder / CONFIG), resolve=True))  # type: ignore[arg-type]
    except Exception:  # an unreadable config.yaml is not a run of ours
        return False
    return theirs == ours


def _candidates(run_dir: Path) -> list[Path]:
    """``run_dir``'s siblings that hold a config, newest first."""
    parent = run_dir.parent
    if not parent.is_dir():
        return []
    siblings = []
    for p in parent.iterdir():
        try:
            if p.is_dir() and p != run_dir:
                siblings.append(((p / CONFIG).stat().st_mtime, p))
        except OSError:  # no config.yaml (or it vanished meanwhile)
            continue
    return [p for _, p in sorted(siblings, reverse=True)]


def find_unfinished(run_dir: Path, cfg: Config) -> Path | None:
    """``run_dir`` or its newest sibling that holds an unfinished run of the same config."""
    ours = comparable(config_dict(cfg))
    if _same_unfinished(run_dir, ours):
        return run_dir
    return next((folder for folder in _candidates(run_dir) if _same_unfinished(folder, ours)), None)


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
    """Remove a folder this process holds that holds nothing but what Hydra puts in a new run folder, unless
    another process uses it too (its shared flock from :func:`join`); give the folder up either way."""
    _leave(folder)
    try:
        if _key(folder) not in _held or not folder.is_dir():
            return
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        release(folder)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("leaving %s in place: another process started in it", folder)
            return
        if all(p.name in (".hydra", LOCK) or p.suffix == ".log" for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)  # under both locks: nobody can start using it meanwhile
    finally:
        release(folder)
        os.close(fd)


def open_run_dir(cfg: Config) -> Path:
    """The folder this run writes to (``cfg.output_dir`` is updated), per ``trainer.resume``; takes its lock.

    The fresh folder is locked first, so that no other process uses or removes it; a sibling to resume is
    locked before anything moves into it (one that another process took meanwhile is passed over).
    """
    new = Path(cfg.output_dir)
    mode = cfg.trainer.resume
    join(new)  # scripts/train.py joined it already, as early as it could
    acquire(new)
    try:
        found = _resume_target(new, cfg) if mode == "auto" else None
        if found is not None and found != new:
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
    except BaseException:
        release(new)
        raise
    if found is not None:
        log.info("resuming the unfinished run in %s", new)
    return new


def _resume_target(new: Path, cfg: Config) -> Path | None:
    """:func:`find_unfinished`, locked: the folder returned is held by this process."""
    ours = comparable(config_dict(cfg))
    if _same_unfinished(new, ours):
        return new
    for folder in _candidates(new):
        if _same_unfinished(folder, ours) and try_acquire(folder):
            if (folder / SUMMARY).exists():  # finished while we looked
                release(folder)
                continue
            return folder
    return None
