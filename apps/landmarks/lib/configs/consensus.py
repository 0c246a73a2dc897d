"""The three detectors together, weighted by their calibration (:mod:`lmk3d.detectors.consensus`).

Built, not trained: its checkpoint holds the shipped members, so retraining ``prior_guided``, ``pin`` or
``cascade`` through the server does not change it, and ``POST /train/consensus`` is refused (409).
"""

from __future__ import annotations

from lib.configs import LandmarkModelConfig

CONFIG = LandmarkModelConfig(detector="consensus",
                             description="prior_guided, pin and cascade together, weighted by their calibrated "
                                         "scores, 90 % radii or scores times fitted per-landmark weights, as the "
                                         "checkpoint says (their disagreement lowers the score); built from the "
                                         "shipped members, not trained")
