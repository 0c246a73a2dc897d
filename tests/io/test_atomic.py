"""lmk3d.io.atomic: a file is the old one or the new one, never part of one; killed writers' leftovers go."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmk3d.io import atomic
from lmk3d.io.atomic import TEMP_PREFIX, TEMP_SUFFIX, atomic_copy, atomic_write_bytes, remove_stale_temps


def test_write_creates_and_replaces_with_a_plain_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.json"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["a.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_rename_leaves_the_old_file_and_no_temporary_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.mrk.json"
    path.write_bytes(b"old")
    src = tmp_path / "src" / "upload"
    src.parent.mkdir()
    src.write_bytes(b"new" * 1000)

    def fail(a: Any, b: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    for write in (lambda: atomic_write_bytes(path, b"new"), lambda: atomic_copy(src, path)):
        with pytest.raises(OSError, match="No space"):
            write()
        assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.mrk.json", "src"]


def test_a_failed_copy_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.nii.gz"
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        atomic_copy(tmp_path / "missing", path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.nii.gz"]


def test_the_data_is_flushed_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def record_replace(a: Any, b: Any) -> None:
        events.append(f"replace {Path(b).name}")
        replace(a, b)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    atomic_write_bytes(tmp_path / "a.json", b"x")
    assert events[0].startswith(f"fsync {tmp_path}/{TEMP_PREFIX}") and events[0].endswith(TEMP_SUFFIX)
    assert events[1:] == ["replace a.json", f"fsync {tmp_path}"]  # then the folder, so the rename lasts


def test_a_link_at_the_destination_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    target.write_bytes(b"keep")
    link = tmp_path / "label.mrk.json"
    link.symlink_to(target)
    src = tmp_path / "src.bin"
    src.write_bytes(b"new")
    atomic_copy(src, link)
    assert target.read_bytes() == b"keep" and not link.is_symlink() and link.read_bytes() == b"new"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_stale_temps_removes_only_leftovers_of_gone_writers(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = [f"{TEMP_PREFIX}{dead}-x1{TEMP_SUFFIX}", f"{TEMP_PREFIX}{os.getpid()}-x2{TEMP_SUFFIX}",
             f"{TEMP_PREFIX}legacy{TEMP_SUFFIX}"]
    kept = [f"{TEMP_PREFIX}1-busy{TEMP_SUFFIX}",  # pid 1 always runs
            f"{TEMP_PREFIX}{dead}-x3.nii.gz", f".a.json.{dead}.tmp", "case.nii.gz"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / stale[0]).write_bytes(b"partial")  # sub-folders are the caller's to list
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "sub"]) and (tmp_path / "sub" / stale[0]).exists()
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_write_in_progress_in_this_process_is_not_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[Path]] = []
    fsync = os.fsync

    def clean_while_writing(fd: int) -> None:
        if not seen:
            seen.append(remove_stale_temps(tmp_path))  # another thread cleaning up in the middle of the write
        fsync(fd)

    monkeypatch.setattr(os, "fsync", clean_while_writing)
    atomic_write_bytes(tmp_path / "a.json", b"whole")
    assert seen == [[]] and (tmp_path / "a.json").read_bytes() == b"whole"
    assert not atomic._in_progress  # and forgotten once written
