"""The ``cascade`` detector (Tan et al., STACOM 2019); the method is described in :mod:`.detector`."""

from lmk3d.detectors.cascade.config import CPU, CPU_CT, PAPER, PROFILES, TINY, CascadeConfig
from lmk3d.detectors.cascade.detector import CascadeDetector
from lmk3d.detectors.cascade.stages import DisplacementStage, HeatmapStage
from lmk3d.detectors.cascade.training import CascadeCase

__all__ = ["CPU", "CPU_CT", "PAPER", "PROFILES", "TINY", "CascadeConfig", "CascadeDetector", "DisplacementStage",
           "HeatmapStage", "CascadeCase"]
