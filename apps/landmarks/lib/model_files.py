"""Replacing a served model's checkpoint by an uploaded one, and rolling it back.

An uploaded checkpoint is a file from the network: it replaces ``checkpoint.pt`` only after
:func:`replace_checkpoint` has

1. read it weights-only (:func:`lmk3d.detectors.load_detector`, which reads through
   :mod:`lmk3d.checkpoint`: a pickle that would import or call anything is refused, never run);
2. checked it holds the served detector and the served landmark names, in the same order;
3. run it on a probe image (a datastore image, else a synthetic volume) and checked it returns one
   finite point, or "not found", per landmark.

The file is copied into a staging folder inside the model folder first (same file system), fsynced,
and renamed over ``checkpoint.pt``; the old file stays as ``checkpoint.previous.pt``. Any failure is
a 422 naming it and leaves the served checkpoint as it was. :func:`rollback_checkpoint` makes
``checkpoint.previous.pt`` current again; with no previous version it refuses (409) rather than
leave the model without weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import CONFLICT, UNPROCESSABLE, http_error
from lmk3d.checkpoint import CHECKPOINT_FILE
from lmk3d.detectors import load_detector
from lmk3d.io import read_image
from lmk3d.io.image import Volume
from lmk3d.publish import PREVIOUS_CHECKPOINT, STAGING_PREFIX

__all__ = ["probe_volume", "replace_checkpoint", "rollback_checkpoint"]


def probe_volume(image_path: str | None) -> Volume:
    """The image an uploaded model must run on: ``image_path`` when given, else a synthetic 48^3 volume."""
    if image_path:
        return read_image(image_path)
    rng = np.random.default_rng(0)
    array = rng.normal(100.0, 20.0, size=(48, 48, 48)).astype(np.float32)
    return Volume(array, np.diag([1.0, 1.0, 1.0, 1.0]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _refuse(name: str, why: str) -> Exception:
    return http_error(UNPROCESSABLE, f"model file for {name!r} refused, the served model is unchanged: {why}")


def replace_checkpoint(model_dir: Path, upload: str, landmark_names: Sequence[str], name: str,
                       probe_image: str | None) -> dict[str, Any]:
    """Check ``upload`` and make it ``model_dir/checkpoint.pt`` (see the module docstring).

    Raises:
        HTTPException: 422 naming the check that failed.
    """
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=model_dir))
    try:
        staged = staging / CHECKPOINT_FILE
        shutil.copyfile(upload, staged)
        try:
            detector = load_detector(staging, "cpu")
        except Exception as e:  # every reading failure is the file's fault here
            raise _refuse(name, f"{type(e).__name__}: {e}".replace(str(staged), "the uploaded file")) from None
        if detector.name != name:
            raise _refuse(name, f"it holds a {detector.name!r} detector, not {name!r}")
        if tuple(detector.landmark_names) != tuple(landmark_names):
            raise _refuse(name, f"its landmarks {list(detector.landmark_names)} differ from the served model's "
                                f"{list(landmark_names)}")
        try:
            landmarks = detector.predict_all(probe_volume(probe_image)).landmarks
        except Exception as e:
            raise _refuse(name, f"it failed on a probe image ({type(e).__name__}: {e})") from None
        coords = np.asarray(landmarks.xyz_mm_ras, dtype=float)
        found = np.asarray(landmarks.found, dtype=bool)
        if coords.shape != (len(landmark_names), 3) or not np.isfinite(coords[found]).all():
            raise _refuse(name, "its prediction on a probe image is not one finite point per landmark")
        with staged.open("rb") as f:
            os.fsync(f.fileno())
        final = model_dir / CHECKPOINT_FILE
        previous = None
        if final.is_file():
            backup = staging / PREVIOUS_CHECKPOINT
            os.link(final, backup)
            os.replace(backup, model_dir / PREVIOUS_CHECKPOINT)
            previous = str(model_dir / PREVIOUS_CHECKPOINT)
        os.replace(staged, final)
        _fsync_dir(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"model": name, "checkpoint": str(final), "previous": previous, "sha256": _sha256(final),
            "detector": detector.name, "landmarks": list(detector.landmark_names)}


def rollback_checkpoint(model_dir: Path, name: str) -> dict[str, Any]:
    """Make ``checkpoint.previous.pt`` current; the replaced file is kept as ``checkpoint.<time>.deleted``.

    Raises:
        HTTPException: 409 when there is no previous version.
    """
    final = model_dir / CHECKPOINT_FILE
    previous = model_dir / PREVIOUS_CHECKPOINT
    if not previous.is_file():
        raise http_error(CONFLICT, f"model {name!r} has no previous version to roll back to; the server keeps its "
                                   "only checkpoint (replace it with PUT /model/{name} instead)")
    aside = model_dir / f"checkpoint.{datetime.now().strftime('%Y%m%d_%H%M%S_%f')}.deleted"
    if final.is_file():
        os.link(final, aside)
    os.replace(previous, final)
    _fsync_dir(model_dir)
    return {"model": name, "checkpoint": str(final), "sha256": _sha256(final),
            "set_aside": str(aside) if aside.exists() else None}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
