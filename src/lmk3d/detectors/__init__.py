"""Detectors: ``prior_guided``, ``pin``, ``cascade`` (and the ``mean_shape`` baseline they must beat).

Each registers itself lazily here so ``lmk3d --help`` does not import torch.
"""

from __future__ import annotations

from lmk3d.detectors.base import (
    Detector,
    Prediction,
    Stage,
    StageResult,
    detector_class,
    detector_names,
    load_detector,
    register,
)

__all__ = ["Detector", "Prediction", "Stage", "StageResult", "detector_class", "detector_names",
           "load_detector", "register"]
