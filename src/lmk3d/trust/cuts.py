"""Cut-off variants of an image: crops whose planes leave chosen landmarks outside the field of view.

Used to fit and to test the "not found" rule (:mod:`lmk3d.trust`): a landmark that the crop leaves
outside must be reported not found, the ones still inside found. A crop keeps the voxels and the world
geometry of the original (its affine is the original's moved to the crop's first voxel), so every
point keeps its world position.

Example:
    >>> import numpy as np
    >>> from lmk3d.io.image import Volume
    >>> v = Volume(np.zeros((10, 10, 10), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> crop(v, (2, 0, 0), (10, 10, 10)).ijk_to_ras(np.zeros(3)).tolist()
    [4.0, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume

__all__ = ["Cut", "crop", "cut_outside", "distance_to_faces_mm"]


def crop(volume: Volume, lo: Sequence[int], hi: Sequence[int]) -> Volume:
    """The voxels ``lo <= ijk < hi`` of ``volume``, with the affine that keeps their world positions."""
    lo_a, hi_a = np.asarray(lo, dtype=int), np.asarray(hi, dtype=int)
    shape = np.asarray(volume.shape)
    if lo_a.shape != (3,) or hi_a.shape != (3,) or np.any(lo_a < 0) or np.any(hi_a > shape) or np.any(hi_a <= lo_a):
        raise LandmarkError(f"crop [{lo_a.tolist()}, {hi_a.tolist()}) is not inside an image of shape {shape.tolist()}")
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ lo_a + affine[:3, 3]
    array = volume.array[lo_a[0]:hi_a[0], lo_a[1]:hi_a[1], lo_a[2]:hi_a[2]]
    return Volume(np.ascontiguousarray(array), affine, volume.path)


def distance_to_faces_mm(volume: Volume, xyz_mm_ras: np.ndarray) -> np.ndarray:
    """``(N, 6)`` signed distances (mm) of points to the six faces, positive inside.

    Faces in the order ``i-low, i-high, j-low, j-high, k-low, k-high``; a face lies half a voxel beyond
    the outer voxel centres (where the field of view ends).
    """
    ijk = volume.ras_to_ijk(np.asarray(xyz_mm_ras, dtype=np.float64)).reshape(-1, 3)
    spacing = volume.spacing_mm
    shape = np.asarray(volume.shape, dtype=np.float64)
    low = (ijk + 0.5) * spacing
    high = (shape - 0.5 - ijk) * spacing
    return np.stack([low[:, 0], high[:, 0], low[:, 1], high[:, 1], low[:, 2], high[:, 2]], axis=1)


@dataclass(frozen=True)
class Cut:
    """One cut-off variant: the cropped image, which face was cut, and how far beyond it the target lies."""

    volume: Volume
    target: int
    face: int
    outside_mm: float
    lo: tuple[int, int, int]
    hi: tuple[int, int, int]


def cut_outside(volume: Volume, xyz_mm_ras: np.ndarray, target: int, outside_mm: float,
                min_size: int = 8) -> Cut | None:
    """Crop the face nearest landmark ``target`` so that it lies ``outside_mm`` beyond the new face.

    Returns None when the crop would keep fewer than ``min_size`` voxels along the cut axis.
    """
    d = distance_to_faces_mm(volume, xyz_mm_ras[target:target + 1])[0]
    face = int(np.argmin(d))
    axis, high = divmod(face, 2)
    spacing = float(volume.spacing_mm[axis])
    ijk = volume.ras_to_ijk(np.asarray(xyz_mm_ras[target], dtype=np.float64)).reshape(3)
    lo, hi = [0, 0, 0], list(volume.shape)
    if high:
        # the new face (last voxel centre + 0.5) lies outside_mm before the target
        hi[axis] = int(np.floor(ijk[axis] - outside_mm / spacing + 0.5))
    else:
        lo[axis] = int(np.ceil(ijk[axis] + outside_mm / spacing - 0.5))
    if hi[axis] - lo[axis] < min_size or lo[axis] < 0 or hi[axis] > volume.shape[axis]:
        return None
    cropped = crop(volume, lo, hi)
    gone = -float(distance_to_faces_mm(cropped, xyz_mm_ras[target:target + 1])[0, face])
    return Cut(cropped, target, face, gone, (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]))
