"""Per-image landmark scores, shared by the infer tasks (which fill it) and active learning (which reads it).

An entry stays valid while the image file and the model's checkpoint are the ones it was computed
with, so retraining or replacing an image invalidates it without anyone having to say so.
"""

from __future__ import annotations

import os
import threading
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

    def get(self, model: str, image_path: str, checkpoint: FileSignature | None) -> np.ndarray | None:
        sig = file_signature(image_path)
        with self._lock:
            e = self._entries.get((model, os.path.realpath(image_path)))
        if e is None or sig is None or e.image != sig or e.checkpoint != checkpoint:
            return None
        return e.scores

    def put(self, model: str, image_path: str, checkpoint: FileSignature | None, scores: np.ndarray) -> None:
        sig = file_signature(image_path)
        if sig is None:
            return
        with self._lock:
            self._entries[(model, os.path.realpath(image_path))] = _Entry(sig, checkpoint, np.array(scores))
