"""The ``mean_shape`` baseline: each landmark at its mean position relative to the image's field of view.

Served beside the detectors so a radiologist (and the demo) can see what "better than the baseline"
looks like; it trains in seconds, which is also why the app's tests serve it.
"""

from __future__ import annotations

from lib.configs import LandmarkModelConfig

CONFIG = LandmarkModelConfig(detector="mean_shape",
                             description="Baseline: mean landmark positions relative to the field of view")
