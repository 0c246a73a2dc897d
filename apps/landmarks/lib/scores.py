"""Per-image landmark scores, shared by the infer tasks (which fill it) and active learning (which reads it).

An entry stays valid while the image file and the model's checkpoint are the ones it was computed
with, so retraining or replacing an image invalidates it without anyone having to say so. The cache
also tells the background scorer (:mod:`lib.background`) when interactive inferences run: an
inference that records its scores (``put``), or runs inside :meth:`ScoreCache.inferring`, counts as
activity, and the scorer waits for a quiet moment before each image.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

FileSignature = tuple[int, int, int]  # (inode, mtime in ns, size)


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


class ScoreCache:
    """``(model, image path) -> per-landmark scores (N,)`` of the model's latest prediction."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._in_flight = 0
        self._last_activity = -math.inf  # time.monotonic() of the last interactive inference's start or end

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

    def put(self, model: str, image_path: str, checkpoint: FileSignature | None, scores: np.ndarray,
            interactive: bool = True) -> None:
        """Record ``scores: (N,)``; ``interactive`` (an inference a user asked for) also marks activity."""
        sig = file_signature(image_path)
        with self._lock:
            if interactive:
                self._last_activity = time.monotonic()
            if sig is not None:
                self._entries[(model, os.path.realpath(image_path))] = _Entry(sig, checkpoint, np.array(scores))

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
