"""``prior_guided``: coarse ResNet regression, fine patch U-Nets, the correlated-landmark module.

The method is described in :mod:`lmk3d.detectors.prior_guided.detector`.
"""

from __future__ import annotations

from lmk3d.detectors.prior_guided.config import (
    CPU,
    PAPER,
    TINY,
    PriorGuidedConfig,
    find_groups,
    normalise_groups,
)
from lmk3d.detectors.prior_guided.detector import PriorGuidedDetector
from lmk3d.detectors.prior_guided.stages import CoarseStage, FineStage

__all__ = ["CPU", "PAPER", "TINY", "CoarseStage", "FineStage", "PriorGuidedConfig", "PriorGuidedDetector",
           "find_groups", "normalise_groups"]
