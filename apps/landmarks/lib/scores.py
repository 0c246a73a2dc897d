"""Per-image landmark scores, shared by the infer tasks (which fill it) and active learning (which reads it).

An entry stays valid while the image file and the model's checkpoint are the ones it was computed
with, so retraining or replacing an image invalidates it without anyone having to say so. The cache
also tells the background scorer (:mod:`lib.background`) when interactive inferences run: an
inference that records its scores (``put``), or runs inside :meth:`ScoreCache.inferring`, counts as
activity, and the scorer waits for a quiet moment before each image.

Given a file (the registry's workspace holds ``scores.json``), the cache outlives the server: every
``put`` rewrites the file (temporary file, then rename) and a new server starts from it, so
``least_confident`` ranks by known scores from its first call after a restart. An entry read back is
used only while the image and checkpoint signatures still match; an unreadable file is set aside
with a warning and the cache starts empty.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from lmk3d.io.atomic import atomic_write_text

logger = logging.getLogger(__name__)

FileSignature = tuple[int, int, int]  # (inode, mtime in ns, size)
SCORES_FILE = "scores.json"


def file_signature(path: str | os.PathLike[str]) -> FileSignature | None:
    """What changes when a file is rewritten or replaced (by rename); None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class _Entry:
    image: FileSignature
    checkpoint: FileSignature | None
    scores: np.ndarray
    refused: str | None = None  # why the model refused the image (not of its kind), else None


class ScoreCache:
    """``(model, image path) -> per-landmark scores (N,)`` of the model's latest prediction."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        """``path``: the file that keeps the entries across restarts (None: memory only)."""
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._in_flight = 0
        self._last_activity = -math.inf  # time.monotonic() of the last interactive inference's start or end
        self.path = None if path is None else os.fspath(path)
        if self.path is not None:
            self._entries = _read(self.path)

    def get(self, model: str, image_path: str, checkpoint: FileSignature | None) -> np.ndarray | None:
        """The scores computed with ``checkpoint`` on the image file as it is now; None if there are none."""
        found = self.latest(model, image_path)
        if found is None or found[1] != checkpoint:
            return None
        return found[0]

    def latest(self, model: str, image_path: str) -> tuple[np.ndarray, FileSignature | None] | None:
        """The latest scores on the image file as it is now, whatever checkpoint made them, and that checkpoint."""
        sig = file_signature(image_path)
        with self._lock:
            e = self._entries.get((model, os.path.realpath(image_path)))
        if e is None or sig is None or e.image != sig:
            return None
        return e.scores, e.checkpoint

    def refusal(self, model: str, image_path: str) -> str | None:
        """Why the model refused the image file as it is now (its latest prediction), or None."""
        sig = file_signature(image_path)
        with self._lock:
            e = self._entries.get((model, os.path.realpath(image_path)))
        return e.refused if e is not None and sig is not None and e.image == sig else None

    def put(self, model: str, image_path: str, checkpoint: FileSignature | None, scores: np.ndarray,
            interactive: bool = True, refused: str | None = None) -> None:
        """Record ``scores: (N,)``; ``interactive`` (an inference a user asked for) also marks activity.

        ``refused``: the reason when the model found the image not of its kind (every score 0).
        """
        sig = file_signature(image_path)
        with self._lock:
            if interactive:
                self._last_activity = time.monotonic()
            if sig is None:
                return
            self._entries[(model, os.path.realpath(image_path))] = _Entry(sig, checkpoint, np.array(scores), refused)
        self._save()

    def _save(self) -> None:
        """Write every entry to :attr:`path` (atomically; one writer at a time, the newest state wins)."""
        if self.path is None:
            return
        with self._write_lock:
            with self._lock:
                rows = [{"model": m, "image": path, "image_signature": list(e.image),
                         "checkpoint_signature": None if e.checkpoint is None else list(e.checkpoint),
                         "scores": [float(s) for s in e.scores], "refused": e.refused}
                        for (m, path), e in sorted(self._entries.items())]
            try:
                atomic_write_text(self.path, json.dumps({"format": 1, "entries": rows}))
            except OSError as e:  # the cache still works in memory
                logger.warning("cannot save the score cache to %s: %s", self.path, e)

    # --- activity: when the background scorer may run ----------------------------------------------
    @contextmanager
    def inferring(self) -> Iterator[None]:
        """Mark an interactive inference as running for the duration of the block."""
        with self._lock:
            self._in_flight += 1
            self._last_activity = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_activity = time.monotonic()

    def quiet_s(self) -> float:
        """Seconds since the last interactive inference ended: 0 while one runs, ``inf`` if none ever ran."""
        with self._lock:
            if self._in_flight:
                return 0.0
            return time.monotonic() - self._last_activity


def _signature(value: object) -> FileSignature:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value)):
        raise ValueError(f"not a file signature: {value!r}")
    return (value[0], value[1], value[2])


def _read(path: str) -> dict[tuple[str, str], _Entry]:
    """The entries saved in ``path``; none if it does not exist, and none (file set aside) if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        return _set_aside(path, e)
    try:
        entries: dict[tuple[str, str], _Entry] = {}
        for row in doc["entries"]:
            ck = row["checkpoint_signature"]
            scores = np.asarray(row["scores"], dtype=np.float64)
            if scores.ndim != 1:
                raise ValueError("scores must be a list of numbers")
            refused = row.get("refused")  # absent in files written before it was kept
            if refused is not None and not isinstance(refused, str):
                raise ValueError(f"refused must be a reason or null, not {refused!r}")
            entries[(str(row["model"]), str(row["image"]))] = _Entry(
                _signature(row["image_signature"]), None if ck is None else _signature(ck), scores, refused)
        return entries
    except (KeyError, TypeError, ValueError) as e:
        return _set_aside(path, e)


def _set_aside(path: str, error: Exception) -> dict[tuple[str, str], _Entry]:
    aside = f"{path}.unreadable"
    logger.warning("score cache %s is unreadable (%s): moved to %s, starting empty", path, error, aside)
    try:
        os.replace(path, aside)
    except OSError:
        pass
    return {}
