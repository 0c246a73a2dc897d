"""lmk3d: 3D anatomical landmark detection (prior_guided, pin, cascade), landmark I/O and metrics.

The library never imports monailabel; the MONAI Label app in ``apps/landmarks`` is a thin adapter.
"""

from __future__ import annotations

from lmk3d.landmarks import LandmarkSet

__version__ = "0.1.0"

__all__ = ["LandmarkSet", "__version__"]
