"""The training case record every detector's training builds on: a case's truth, missing-aware.

A landmark absent from a case (partial annotation) is NaN in ``xyz`` and False in ``present``: it is
masked out of every loss and every error, never treated as (0, 0, 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmk3d.data.samples import Sample
from lmk3d.training.loop import mean_radial_error


def sample_truth(sample: Sample, landmark_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A labelled sample's landmarks in ``landmark_names`` order: ``(N, 3)`` world RAS mm (NaN where
    missing) and ``(N,)`` present flags."""
    if sample.landmarks is None:
        raise ValueError(f"case {sample.case!r} has no landmarks")
    lm = sample.landmarks.reorder(landmark_names)
    return np.where(lm.found[:, None], lm.xyz_mm_ras, np.nan), lm.found.copy()


@dataclass(eq=False)
class TrainingCase:
    """One training case: its id and truth (detectors extend it with what their training keeps).

    Attributes:
        case: the case id.
        xyz: ``(N, 3)`` world RAS mm, NaN where missing.
        present: ``(N,)`` bool.
    """

    case: str
    xyz: np.ndarray
    present: np.ndarray


def case_mre(cases: Sequence[TrainingCase], preds: Sequence[np.ndarray], cap_mm: float = np.inf) -> float:
    """MRE (mm) of per-case ``(N, 3)`` predictions over the present landmarks, each error capped at ``cap_mm``."""
    return mean_radial_error(preds, [c.xyz for c in cases], [c.present for c in cases], cap_mm)


__all__ = ["TrainingCase", "case_mre", "sample_truth"]
