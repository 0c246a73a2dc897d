"""lmk3d.publish: a checkpoint replaces the served one atomically, and only if it loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmk3d.checkpoint import CHECKPOINT_FILE
from lmk3d.detectors import load_detector
from lmk3d.detectors.mean_shape import MeanShapeDetector
from lmk3d.errors import LandmarkError
from lmk3d.publish import PREVIOUS_CHECKPOINT, STAGING_PREFIX, publish, remove_stale_staging

NAMES = ("a", "b", "c")


class BrokenDetector:
    """Saves a file that is not a checkpoint."""

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / CHECKPOINT_FILE
        path.write_bytes(b"not a checkpoint")
        return path


def test_publish_then_replace_keeps_the_previous(tmp_path: Path) -> None:
    first = MeanShapeDetector.create(NAMES, "tiny")
    path = publish(first, tmp_path / "model")
    assert path == tmp_path / "model" / CHECKPOINT_FILE and path.is_file()
    assert not (tmp_path / "model" / PREVIOUS_CHECKPOINT).exists()
    old = path.read_bytes()
    publish(MeanShapeDetector.create(NAMES, "tiny"), tmp_path / "model")
    assert (tmp_path / "model" / PREVIOUS_CHECKPOINT).read_bytes() == old
    assert load_detector(tmp_path / "model", "cpu").landmark_names == NAMES
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted([CHECKPOINT_FILE, PREVIOUS_CHECKPOINT])


def test_a_checkpoint_that_does_not_load_is_not_published(tmp_path: Path) -> None:
    path = publish(MeanShapeDetector.create(NAMES, "tiny"), tmp_path)
    before = path.read_bytes()
    with pytest.raises(LandmarkError):
        publish(BrokenDetector(), tmp_path)  # type: ignore[arg-type]
    assert path.read_bytes() == before  # the served checkpoint is untouched, and no staging folder is left
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_the_new_checkpoint_is_flushed_before_it_is_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(MeanShapeDetector.create(NAMES, "tiny"), tmp_path)
    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def record_replace(a: Any, b: Any) -> None:
        events.append(f"replace {a} -> {Path(b).name}")
        replace(a, b)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    publish(MeanShapeDetector.create(NAMES, "tiny"), tmp_path)
    # the rename that publishes: staging/checkpoint.pt over the served file, after flushing that very file
    final = [i for i, e in enumerate(events) if e.startswith(f"replace {tmp_path}/{STAGING_PREFIX}")
             and e.endswith(f"/{CHECKPOINT_FILE} -> {CHECKPOINT_FILE}")]
    staged = events[final[0]].split(" ")[1] if len(final) == 1 else "?"
    assert len(final) == 1 and events.index(f"fsync {staged}") < final[0], events
    assert events[-1] == f"fsync {tmp_path}"  # and the folder, after the rename


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_folders_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = publish(MeanShapeDetector.create(NAMES, "tiny"), tmp_path)
    served = path.read_bytes()
    dead = _dead_pid()
    stale = [f"{STAGING_PREFIX}{dead}-abc", f"{STAGING_PREFIX}{os.getpid()}-def", f"{STAGING_PREFIX}legacy_x"]
    kept = [f"{STAGING_PREFIX}1-busy"]  # pid 1 always runs: a publish in progress elsewhere
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / CHECKPOINT_FILE).write_bytes(b"half a checkpoint")
    (tmp_path / f"{STAGING_PREFIX}{dead}-file").write_bytes(b"not a folder")
    caplog.set_level("WARNING")
    removed = remove_stale_staging(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    left = sorted([CHECKPOINT_FILE, *kept, f"{STAGING_PREFIX}{dead}-file"])
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    assert path.read_bytes() == served
    assert all(name in caplog.text for name in stale)
    assert remove_stale_staging(tmp_path / "missing") == []


def test_a_publish_in_progress_is_not_stale(tmp_path: Path) -> None:
    seen: list[list[Path]] = []

    class Checked(MeanShapeDetector):
        def save(self, directory: str | os.PathLike[str]) -> Path:
            out = super().save(directory)
            seen.append(remove_stale_staging(tmp_path))  # a server starting while this process publishes
            return out

    detector = Checked.create(NAMES, "tiny")
    path = publish(detector, tmp_path)
    assert seen == [[]] and load_detector(tmp_path, "cpu").landmark_names == NAMES and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
