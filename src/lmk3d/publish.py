"""Publishing a trained detector into a model folder, atomically.

A served model folder (``models/<detector>-<dataset>/``) holds ``checkpoint.pt``, which a server may
be reading at any time. :func:`publish` writes the new checkpoint into a staging folder inside the
model folder (so on the same file system), loads it back as a check, and only then renames it over
``checkpoint.pt``; the previous file is kept as ``checkpoint.previous.pt``. A reader sees the old file
or the new one, never a partial one, and a failure at any step leaves the old checkpoint in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lmk3d.checkpoint import CHECKPOINT_FILE

if TYPE_CHECKING:
    from lmk3d.detectors import Detector

#: The checkpoint that was replaced by the latest :func:`publish`.
PREVIOUS_CHECKPOINT = "checkpoint.previous.pt"
STAGING_PREFIX = ".staging-"

__all__ = ["PREVIOUS_CHECKPOINT", "STAGING_PREFIX", "publish"]


def publish(detector: Detector, model_dir: str | os.PathLike[str]) -> Path:
    """Replace ``model_dir/checkpoint.pt`` by ``detector``'s, atomically; keep the old one as a backup.

    Args:
        detector: the trained detector to publish.
        model_dir: the model folder (created if missing).

    Returns:
        The path of the published ``checkpoint.pt``.

    Raises:
        LandmarkError: the saved checkpoint does not load back (the old one is left in place).
    """
    from lmk3d.detectors import load_detector

    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / CHECKPOINT_FILE
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        detector.save(staging)
        load_detector(staging, "cpu")  # what is published must load
        if final.is_file():
            backup = staging / PREVIOUS_CHECKPOINT
            try:
                os.link(final, backup)
            except OSError:
                shutil.copy2(final, backup)
            os.replace(backup, folder / PREVIOUS_CHECKPOINT)
        os.replace(staging / CHECKPOINT_FILE, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
