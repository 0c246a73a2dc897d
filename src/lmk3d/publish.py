"""Publishing a trained detector into a model folder, atomically.

A served model folder (``models/<detector>-<dataset>/``) holds ``checkpoint.pt``, which a server may
be reading at any time. :func:`publish` writes the new checkpoint into a staging folder inside the
model folder (so on the same file system), loads it back as a check, and only then renames it over
``checkpoint.pt``; the previous file is kept as ``checkpoint.previous.pt``. A reader sees the old file
or the new one, never a partial one, and a failure at any step leaves the old checkpoint in place. The
new file is flushed to disk (``fsync``) before the rename, and the folder after it, so a power cut
cannot leave a renamed but empty checkpoint.

A publisher killed mid-way (``kill -9``) leaves its staging folder, ``.staging-<pid>-<random>``, behind;
:func:`remove_stale_staging` removes the ones whose process is gone (a server calls it at start-up).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lmk3d.checkpoint import CHECKPOINT_FILE
from lmk3d.io.atomic import fsync_dir, remove_stale_dirs

if TYPE_CHECKING:
    from lmk3d.detectors import Detector

#: The checkpoint that was replaced by the latest :func:`publish`.
PREVIOUS_CHECKPOINT = "checkpoint.previous.pt"
STAGING_PREFIX = ".staging-"

__all__ = ["PREVIOUS_CHECKPOINT", "STAGING_PREFIX", "publish", "remove_stale_staging"]

logger = logging.getLogger(__name__)

# Staging folders this process is filling now (see lmk3d.io.atomic.stale_owner).
_in_progress: set[str] = set()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    busy = os.path.realpath(staging)
    _in_progress.add(busy)
    try:
        detector.save(staging)
        load_detector(staging, "cpu")  # what is published must load
        _fsync_file(staging / CHECKPOINT_FILE)
        if final.is_file():
            backup = staging / PREVIOUS_CHECKPOINT
            try:
                os.link(final, backup)
            except OSError:
                shutil.copy2(final, backup)
                _fsync_file(backup)
            os.replace(backup, folder / PREVIOUS_CHECKPOINT)
        os.replace(staging / CHECKPOINT_FILE, final)
        fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _in_progress.discard(busy)
    return final


def remove_stale_staging(model_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging folders that killed :func:`publish` calls left in ``model_dir``.

    A staging folder (``.staging-<pid>-...``) is stale when its process is gone, or when it is this
    process's and no :func:`publish` of this process is filling it; another live process's publish
    in progress is left alone. Each removal is logged.

    Args:
        model_dir: a model folder (nothing happens when it does not exist).

    Returns:
        The removed folders.
    """
    return remove_stale_dirs(model_dir, STAGING_PREFIX, lambda path: path in _in_progress,
                             "an interrupted publish")
