"""lmk3d.publish: a checkpoint replaces the served one atomically, and only if it loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmk3d.checkpoint import CHECKPOINT_FILE
from lmk3d.detectors import load_detector
from lmk3d.detectors.mean_shape import MeanShapeDetector
from lmk3d.errors import LandmarkError
from lmk3d.publish import PREVIOUS_CHECKPOINT, publish

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
