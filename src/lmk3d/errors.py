"""Exceptions raised by lmk3d. Each message names the file (when there is one) and the problem.

They subclass :class:`ValueError` so callers (the CLI, the MONAI Label app) can map bad input to
an HTTP 4xx / exit code 2 without catching programming errors.
"""

from __future__ import annotations


class LandmarkError(ValueError):
    """Base class for bad input to lmk3d."""


class GeometryError(LandmarkError):
    """An affine, a point array or a coordinate system that cannot be used."""


class ImageReadError(LandmarkError):
    """An image file that cannot be read, or is not a usable 3D scalar image."""


class LandmarkFormatError(LandmarkError):
    """A landmark file or table that is malformed (missing fields, unknown columns, duplicates...)."""
