"""Sphere label maps: landmarks as small labelled spheres on an image grid.

This is what the stock 3D Slicer and OHIF MONAI Label plugins display (as segments) and what Slicer's
"Submit Label" sends back. Landmark ``k`` (0-based, in ``names`` order) is drawn with value ``k + 1``,
so values are 1..N; a landmark that is not found is not drawn, and an absent value reads back as a
missing landmark. Where two spheres overlap, each voxel goes to the nearer centre.

Reading back gives the centre of each value: the centre of mass of its voxels, or, for a sphere
clipped by the image border, a sphere fitted to its voxels and the background voxels around it
inside the image
(the centre of mass of a clipped sphere is pulled inwards).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lmk3d import geometry
from lmk3d.errors import LandmarkFormatError
from lmk3d.io.image import Volume, read_image, write_image
from lmk3d.landmarks import LandmarkSet

DEFAULT_RADIUS_MM = 3.0


def label_values(names: Sequence[str]) -> dict[str, int]:
    """``{name: value}`` with contiguous values 1..N (MONAI Label's ``label_names``)."""
    return {n: i + 1 for i, n in enumerate(names)}


def sphere_label_map(
    landmarks: LandmarkSet, shape: Sequence[int], affine: np.ndarray, radius_mm: float = DEFAULT_RADIUS_MM
) -> np.ndarray:
    """Draw found landmarks as spheres.

    Returns:
        ``shape`` array (uint8 for up to 255 landmarks, else uint16), 0 = background.
    """
    shape3 = tuple(int(s) for s in shape[:3])
    dtype = np.uint8 if len(landmarks) < 256 else np.uint16
    out = np.zeros(shape3, dtype=dtype)
    best = np.full(shape3, np.inf, dtype=np.float32)
    inv = np.linalg.inv(geometry.check_affine(affine))
    # Half-extent of the sphere's bounding box in voxels along each axis.
    half = np.abs(inv[:3, :3]) @ np.full(3, radius_mm) + 1.0
    for k in np.flatnonzero(landmarks.found):
        c = landmarks.xyz_mm_ras[k]
        cijk = geometry.apply_affine(inv, c)
        lo = np.maximum(np.floor(cijk - half).astype(int), 0)
        hi = np.minimum(np.ceil(cijk + half).astype(int) + 1, shape3)
        if np.any(hi <= lo):
            continue  # entirely outside the grid
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1)
        d = np.linalg.norm(geometry.apply_affine(affine, grid.reshape(-1, 3)) - c, axis=1).reshape(grid.shape[:3])
        inside = d <= radius_mm
        nearest = np.clip(np.round(cijk).astype(int) - lo, 0, np.array(grid.shape[:3]) - 1)
        if geometry.inside_volume(cijk, shape3, margin=0.5):
            inside[tuple(nearest)] = True  # a sphere smaller than a voxel still marks its voxel
        sub = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        take = inside & (d < best[sub])
        out[sub][take] = k + 1
        best[sub][take] = d[take]
    return out


def _fit_clipped_sphere(mask: np.ndarray, lo: np.ndarray, shape: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World centre of a sphere whose voxels ``mask`` (a box starting at index ``lo``) touch the border.

    Fits centre and radius so that a soft "voxel centre inside the sphere" indicator matches the mask
    on every voxel of the box grown by 2 voxels *inside the image*; the missing part outside the image
    does not count, so the fit is not pulled inwards the way a centre of mass is.
    """
    from scipy.optimize import minimize

    glo = np.maximum(lo - 2, 0)
    ghi = np.minimum(lo + np.array(mask.shape) + 2, shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(glo, ghi, strict=True)], indexing="ij"), -1)
    target = np.zeros(grid.shape[:3])
    target[tuple(slice(a - g, a - g + n) for a, g, n in zip(lo, glo, mask.shape, strict=True))] = mask
    pts = geometry.apply_affine(affine, grid.reshape(-1, 3).astype(float))
    t = target.ravel()
    tau = 0.25 * float(geometry.spacing_from_affine(affine).min())
    c0 = pts[t > 0].mean(axis=0)
    r0 = float(np.cbrt(3.0 * t.sum() * abs(np.linalg.det(affine[:3, :3])) / (4.0 * np.pi)))

    def loss(x: np.ndarray) -> float:
        d = np.linalg.norm(pts - x[:3], axis=1)
        pred = 0.5 * (1.0 + np.tanh((x[3] - d) / (2.0 * tau)))
        return float(((pred - t) ** 2).sum())

    res = minimize(loss, np.r_[c0, r0], method="Nelder-Mead",
                   options={"xatol": 1e-3, "fatol": 1e-6, "maxiter": 4000})
    return np.asarray(res.x[:3])


def landmarks_from_label_map(
    labels: np.ndarray, affine: np.ndarray, names: Sequence[str] | Mapping[str, int], source: str = "<label map>"
) -> LandmarkSet:
    """Decode a sphere label map back to landmark centres (RAS mm).

    Args:
        labels: ``(I, J, K)`` integer array.
        affine: its ijk -> RAS affine.
        names: landmark names in value order (value ``k + 1`` = ``names[k]``), or ``{name: value}``.
    """
    arr = np.asarray(labels)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise LandmarkFormatError(f"{source}: a label map must be 3D, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise LandmarkFormatError(f"{source}: label map has non-integer values")
    arr = arr.astype(np.int64, copy=False)
    mapping = dict(names) if isinstance(names, Mapping) else label_values(list(names))
    unknown = sorted(set(np.unique(arr).tolist()) - {0} - set(mapping.values()))
    if unknown:
        raise LandmarkFormatError(f"{source}: label values {unknown[:10]} have no landmark name "
                                  f"(known: {', '.join(f'{v}={n}' for n, v in mapping.items())})")
    order = list(mapping)
    n = len(order)
    xyz, found = np.full((n, 3), np.nan), np.zeros(n, dtype=bool)
    from scipy import ndimage  # here: the reader of images and landmarks starts without SciPy

    objects = ndimage.find_objects(arr)
    shape = np.array(arr.shape)
    for k, name in enumerate(order):
        value = mapping[name]
        if value > len(objects) or objects[value - 1] is None:
            continue
        sl = objects[value - 1]
        lo = np.array([s.start for s in sl])
        mask = arr[sl] == value
        idx = np.argwhere(mask) + lo
        centre_ijk = idx.mean(axis=0)
        touches = np.any(idx.min(axis=0) == 0) or np.any(idx.max(axis=0) == shape - 1)
        if touches:
            xyz[k] = _fit_clipped_sphere(mask, lo, shape, affine)
            found[k] = True
            continue
        xyz[k] = geometry.ijk_to_ras(centre_ijk, affine)
        found[k] = True
    return LandmarkSet(tuple(order), xyz, np.where(found, 1.0, 0.0), found)


def write_label_map(
    path: str | os.PathLike[str],
    landmarks: LandmarkSet,
    reference: Volume,
    radius_mm: float = DEFAULT_RADIUS_MM,
    *,
    dtype: str | np.dtype | type | None = None,
    compress: bool = True,
) -> Path:
    """Write the sphere label map of ``landmarks`` on the grid of ``reference`` (atomically).

    Args:
        path: the file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``...).
        landmarks: the landmarks; ``k`` is drawn with value ``k + 1``, not-found ones not drawn.
        reference: the image whose ``(I, J, K)`` grid and affine the label map takes.
        radius_mm: sphere radius.
        dtype: ``uint8`` or ``uint16`` (None: uint8 for up to 255 landmarks); uint8 is widened to
            uint16 when there are more than 255 landmarks.
        compress: compress NRRD / MetaImage data (see :func:`lmk3d.io.image.write_image`).

    Raises:
        LandmarkFormatError: a ``dtype`` other than uint8 / uint16.
    """
    arr = sphere_label_map(landmarks, reference.shape, reference.affine, radius_mm)
    if dtype is not None:
        want = np.dtype(dtype)
        if want not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise LandmarkFormatError(f"label map dtype {want} is not one of uint8, uint16")
        if want.itemsize > arr.dtype.itemsize:
            arr = arr.astype(want)
    return write_image(path, arr, reference.affine, compress=compress)


def read_label_map(path: str | os.PathLike[str], names: Sequence[str] | Mapping[str, int]) -> LandmarkSet:
    vol = read_image(path, dtype=None)
    return landmarks_from_label_map(vol.array, vol.affine, names, str(path))
