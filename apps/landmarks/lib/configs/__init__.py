"""Model configs: one module per detector, found automatically by :func:`lib.model_config.discover_configs`.

A config module is a few lines naming its detector, e.g. ``lib/configs/pin.py``::

    from lib.configs import LandmarkModelConfig

    CONFIG = LandmarkModelConfig(detector="pin", description="Patch-based iterative network")

This package holds only those modules; it re-exports :mod:`lib.model_config` for them and the app.
"""

from lib.model_config import (
    DEFAULT_LANDMARK_OUTPUT,
    LANDMARK_OUTPUTS,
    DeclaredModel,
    LandmarkModelConfig,
    LoadedModel,
    discover_configs,
)

__all__ = ["DEFAULT_LANDMARK_OUTPUT", "LANDMARK_OUTPUTS", "DeclaredModel", "LandmarkModelConfig", "LoadedModel",
           "discover_configs"]
