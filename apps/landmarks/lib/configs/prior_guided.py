"""Prior-guided coarse-to-fine detector (Pang et al., MIDL 2023)."""

from __future__ import annotations

from lib.configs import LandmarkModelConfig

CONFIG = LandmarkModelConfig(detector="prior_guided",
                             description="Prior-guided coarse-to-fine landmark detection (Pang et al. 2023)")
