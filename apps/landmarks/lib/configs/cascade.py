"""Two-stage cascade: heatmap U-Net, then patch displacement regression (Tan et al., STACOM 2019)."""

from __future__ import annotations

from lib.configs import LandmarkModelConfig

CONFIG = LandmarkModelConfig(detector="cascade",
                             description="Coarse heatmap U-Net then fine patch regression (Tan et al. 2019)")
