"""Patch-based iterative network (Li et al., MICCAI 2018)."""

from __future__ import annotations

from lib.configs import LandmarkModelConfig

CONFIG = LandmarkModelConfig(detector="pin",
                             description="Patch-based iterative network with a shape model (Li et al. 2018)")
