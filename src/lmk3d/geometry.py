"""Voxel indices <-> world millimetres: the one place affines are applied.

Conventions (used everywhere in lmk3d):

- ``ijk``: 0-based continuous voxel indices in the array order of :class:`lmk3d.io.image.Volume`
  (nibabel order: ``array[i, j, k]``; for ITK-read images ``i`` is ITK's fastest axis ``x``).
  The centre of voxel ``(0, 0, 0)`` is ``ijk = (0, 0, 0)``.
- ``affine``: a 4x4 matrix mapping homogeneous ``ijk`` to world **RAS** millimetres
  (x grows to the patient's Right... no: x grows to the Left->Right is *R*, i.e. RAS means +x = right,
  +y = anterior, +z = superior), the NIfTI/nibabel convention.
- ``*_lps``: DICOM/ITK patient coordinates, ``LPS = diag(-1, -1, 1) @ RAS``.

Every function takes points as ``(3,)`` or ``(N, 3)`` arrays and returns the same leading shape.

Example:
    >>> import numpy as np
    >>> affine = np.diag([2.0, 2.0, 3.0, 1.0])
    >>> ijk_to_ras(np.array([1.0, 0.0, 2.0]), affine)
    array([2., 0., 6.])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmk3d.errors import GeometryError

#: Homogeneous RAS <-> LPS flip (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _points(points: np.ndarray | Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.shape[-1:] != (3,) or arr.ndim not in (1, 2):
        raise GeometryError(f"points must have shape (3,) or (N, 3), got {arr.shape}")
    return arr


def check_affine(affine: np.ndarray) -> np.ndarray:
    """Return ``affine`` as a float64 4x4 array after checking it is finite and invertible.

    Raises:
        GeometryError: wrong shape, non-finite entries, a last row other than (0, 0, 0, 1),
            or a singular 3x3 part.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise GeometryError(f"affine must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise GeometryError("affine has non-finite entries")
    if not np.allclose(a[3], [0, 0, 0, 1], atol=1e-6):
        raise GeometryError(f"affine last row must be (0, 0, 0, 1), got {a[3].tolist()}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise GeometryError("affine is singular (zero voxel size or collinear axes)")
    return a


def apply_affine(affine: np.ndarray, points: np.ndarray | Sequence[float]) -> np.ndarray:
    """Apply a 4x4 homogeneous transform to ``(3,)`` or ``(N, 3)`` points."""
    p = _points(points)
    a = np.asarray(affine, dtype=np.float64)
    return p @ a[:3, :3].T + a[:3, 3]


def ijk_to_ras(ijk: np.ndarray | Sequence[float], affine: np.ndarray) -> np.ndarray:
    """Continuous voxel indices -> world RAS mm."""
    return apply_affine(affine, ijk)


def ras_to_ijk(xyz_mm_ras: np.ndarray | Sequence[float], affine: np.ndarray) -> np.ndarray:
    """World RAS mm -> continuous voxel indices."""
    return apply_affine(np.linalg.inv(check_affine(affine)), xyz_mm_ras)


def ras_to_lps(xyz_mm_ras: np.ndarray | Sequence[float]) -> np.ndarray:
    """RAS mm -> LPS mm (negate x and y)."""
    return _points(xyz_mm_ras) * np.array([-1.0, -1.0, 1.0])


def lps_to_ras(xyz_mm_lps: np.ndarray | Sequence[float]) -> np.ndarray:
    """LPS mm -> RAS mm (negate x and y)."""
    return _points(xyz_mm_lps) * np.array([-1.0, -1.0, 1.0])


def ijk_to_lps(ijk: np.ndarray | Sequence[float], affine: np.ndarray) -> np.ndarray:
    """Continuous voxel indices -> world LPS mm (``affine`` is the RAS affine)."""
    return ras_to_lps(ijk_to_ras(ijk, affine))


def lps_to_ijk(xyz_mm_lps: np.ndarray | Sequence[float], affine: np.ndarray) -> np.ndarray:
    """World LPS mm -> continuous voxel indices (``affine`` is the RAS affine)."""
    return ras_to_ijk(lps_to_ras(xyz_mm_lps), affine)


def affine_from_itk(
    origin_lps: Sequence[float], spacing_mm: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """Build the ijk -> RAS affine from ITK/SimpleITK geometry (which is LPS).

    Args:
        origin_lps: ``image.GetOrigin()``, the LPS position of voxel (0, 0, 0).
        spacing_mm: ``image.GetSpacing()``.
        direction: ``image.GetDirection()``, 9 numbers, row-major 3x3 whose columns are the axis directions.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d @ np.diag(np.asarray(spacing_mm, dtype=np.float64))
    lps[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
    return check_affine(RAS_TO_LPS @ lps)


def itk_geometry_from_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Inverse of :func:`affine_from_itk`: ``(origin_lps, spacing_mm, direction)`` for SimpleITK setters."""
    lps = RAS_TO_LPS @ check_affine(affine)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    return tuple(lps[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along i, j, k: ``(3,)``."""
    return np.linalg.norm(check_affine(affine)[:3, :3], axis=0)


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """Closest anatomical direction of each voxel axis, e.g. ``('R', 'A', 'S')`` (nibabel convention)."""
    import nibabel as nib

    codes = nib.orientations.aff2axcodes(check_affine(affine))
    return (str(codes[0]), str(codes[1]), str(codes[2]))


def inside_volume(ijk: np.ndarray | Sequence[float], shape: Sequence[int], margin: float = 0.5) -> np.ndarray:
    """Whether continuous indices fall inside the image's field of view.

    The field of view spans ``[-0.5, size - 0.5]`` along each axis (voxel edges); ``margin`` moves
    that boundary (0.5 = voxel edges, 0 = outermost voxel centres).

    Returns:
        ``bool`` for one point, ``(N,)`` bool array for many.
    """
    p = _points(ijk)
    hi = np.asarray(shape[:3], dtype=np.float64) - 1.0 + margin
    ok = np.all((p >= -margin) & (p <= hi) & np.isfinite(p), axis=-1)
    return ok


def world_bounds_ras(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS bounding box ``(lo, hi)`` of the field of view (voxel edges included)."""
    s = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array([[x, y, z] for x in (-0.5, s[0] - 0.5) for y in (-0.5, s[1] - 0.5) for z in (-0.5, s[2] - 0.5)])
    w = ijk_to_ras(corners, affine)
    return w.min(axis=0), w.max(axis=0)
