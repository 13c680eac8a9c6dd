"""Atomic writes: a file or folder appears under its name complete, or not at all.

Every output (checkpoints, caches, config, summaries, exports) goes through here: write to a temp
file in the same folder, flush and fsync it, ``os.replace`` it onto the final name, fsync the folder.
A kill leaves at most a temp file (``.tmp-<name>.<pid>.<hex>``), never a truncated file under the real
name, and :func:`remove_stale_temps` removes the temp files and folders of processes that are gone.
A full disk (or any other OS error) is an :class:`~bertnmt.core.errors.OutputError` naming the path.

    with atomic_path(out) as tmp:       # for a library that writes to a path (torch.save, np.save, ...)
        torch.save(obj, tmp)
    write_text(out, "...")              # text, bytes, JSON
    with atomic_dir(folder) as tmp:     # a folder of files, published by one rename
        ...
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from bertnmt.core.errors import ConfigError, OutputError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_TEMP = re.compile(r"\.tmp-(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}")


def write_error(path: Path | str, err: OSError) -> OutputError:
    """The one-line error for a failed write of ``path``."""
    if err.errno in DISK_FULL:
        return OutputError(f"no space left on device while writing {path}; free some space and rerun the same command")
    return OutputError(f"cannot write {path} ({err.strerror or err})")


def is_temp(path: Path) -> bool:
    """Whether ``path`` is one of this module's temp files or folders."""
    return _TEMP.fullmatch(path.name) is not None


def temp_name(path: Path) -> Path:
    """A unique temp name next to ``path``, recognisable (and removable once its process is gone)."""
    return path.with_name(f".tmp-{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path | str, on_error: Callable[[Path, OSError], Exception] = write_error) -> Iterator[Path]:
    """Yield a temp path next to ``path``; when the block ends without error, publish it as ``path``.

    The block writes the temp file by any means (it may also leave it alone: then nothing is
    published). On an error the temp file is removed and ``path`` keeps its previous content; an
    OSError becomes ``on_error(path, err)`` (by default an OutputError naming the path).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise on_error(path, e) from None
    tmp = temp_name(path)
    try:
        yield tmp
        if tmp.exists():
            fsync_file(tmp)
            os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise on_error(path, e) from None
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: Path | str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """``open(path, mode)`` on a temp file that replaces ``path`` when the block ends without error."""
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else "") as f:
            os.chmod(tmp, 0o666 & ~_umask())
            yield f
            f.flush()


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def copy_file(src: Path | str, dst: Path | str,
              on_error: Callable[[Path, OSError], Exception] = write_error) -> None:
    """Make ``dst`` an atomic copy of ``src`` (a hard link where the file system allows one)."""
    with atomic_path(dst, on_error) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield an empty temp folder next to ``path``; publish it as ``path`` by one rename when the block ends.

    Every file in it is fsynced first. If ``path`` exists by then (a concurrent process got there
    first), the temp folder is dropped and theirs is kept. On an error the temp folder is removed.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        _remove(tmp)
        raise write_error(path, e) from None
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Remove the temp files and folders in ``folder`` whose writing process is gone (a kill); return them."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        if m and not pid_alive(int(m["pid"])):
            _remove(p)
            removed.append(p)
    return removed


def check_writable(folder: Path, key: str) -> None:
    """``folder`` exists as a writable folder or can be created (its nearest existing ancestor is one)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={folder}: cannot create the output folder, {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={folder}: cannot create the output folder, {probe} is not writable")
