"""Detectors: ``prior_guided``, ``pin``, ``cascade`` (and the ``mean_shape`` baseline they must beat), and
``consensus``, built from the three (not trained itself).

Each registers itself lazily here so ``lmk3d --help`` does not import torch.
"""

from __future__ import annotations

import importlib

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

register("mean_shape", lambda: importlib.import_module("lmk3d.detectors.mean_shape").MeanShapeDetector)
register("cascade", lambda: importlib.import_module("lmk3d.detectors.cascade").CascadeDetector)
register("pin", lambda: importlib.import_module("lmk3d.detectors.pin").PinDetector)
register("prior_guided", lambda: importlib.import_module("lmk3d.detectors.prior_guided").PriorGuidedDetector)
register("consensus", lambda: importlib.import_module("lmk3d.detectors.consensus").ConsensusDetector,
         trainable=False)
