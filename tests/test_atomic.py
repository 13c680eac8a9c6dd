"""The atomic-write helper: a file or folder appears complete under its name or not at all, fsynced before the
rename; a full disk is one line naming the path; temp files of dead processes are removed, live ones kept."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from bertnmt.core import atomic
from bertnmt.train.checkpoint import save_checkpoint
from bertnmt.core.errors import CheckpointError, OutputError


def no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_fsync_comes_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, the folder
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_keeps_the_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    atomic.write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(path) as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_a_full_disk_is_one_line_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "fsync_file", no_space)
    path = tmp_path / "sub" / "summary.json"
    with pytest.raises(OutputError) as err:
        atomic.write_json(path, {})
    assert str(err.value) == f"no space left on device while writing {path}; free some space and rerun the same command"
    assert os.listdir(tmp_path / "sub") == []
    with pytest.raises(CheckpointError, match=f"no space left on device while writing checkpoint {tmp_path}/c.pt; "
                                              "the previous checkpoint is intact"):
        save_checkpoint(tmp_path / "c.pt", {"model": {}})
    with pytest.raises(OutputError, match=f"no space left on device while writing {tmp_path}/folder;"):
        with atomic.atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["sub"]  # neither the checkpoint's nor the folder's temp is left


def test_a_read_only_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic, "open", denied, raising=False)  # the temp file cannot be created
    with pytest.raises(OutputError, match=f"cannot write {tmp_path}/x.json \\(Permission denied\\)"):
        atomic.write_json(tmp_path / "x.json", {})


def test_a_folder_is_published_whole_and_a_concurrent_winner_kept(tmp_path: Path) -> None:
    final = tmp_path / "cache"
    with atomic.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists()
    assert (final / "a").read_text() == "1"
    with atomic.atomic_dir(final) as tmp:  # another process published first: theirs stays
        (tmp / "a").write_text("2")
    assert (final / "a").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["cache"]


def test_only_temps_of_dead_processes_are_removed(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f".tmp-cache.{gone.pid}.0123abcd"
    live = tmp_path / f".tmp-cache.{os.getpid()}.0123abcd"
    other = tmp_path / ".tmp-not-ours"
    for p in (dead, live):
        p.mkdir()
        (p / "x").write_text("x")
    other.write_text("x")
    assert atomic.remove_stale_temps(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and other.is_file()
    assert atomic.is_temp(atomic.temp_name(tmp_path / "x.pt"))
